"""Time ``scan --compress`` (the compression pass) per GiB, beside ``cat`` and the codec alone,
and write BENCHMARKS.md's table.

    python benchmarks/bench_compress.py --size-gib 1 [--dir /dev/shm]

The dump is made at run time, a raw image of 4 KiB pages mixed as a guest's memory is:
30% zero pages, 40% pages of this machine's shared libraries (real code and data, /usr/lib),
10% text (lines of /usr/share or generated), 10% random (incompressible) pages, 10% copies
of earlier pages (so KSM leaves less than the dump). Then, best of 3 each:

* ``cat DUMP > /dev/null`` (the file in the page cache);
* the codec alone on the whole file: ``lz4 -1`` and ``zstd -3 -T0`` (every core) where the
  commands are installed, else nothing;
* the Python codec alone on the pages KSM leaves, one call a page on one thread
  (``lz4.block.compress`` / ``ZstdCompressor(level=3).compress``): what the pass costs
  without reading, threads or pricing;
* ``ksm-analyze scan DUMP --compress CODEC --json``: its ``compress_seconds`` (stages), the
  compression pass alone, per GiB of the dump and per GiB of the pages it compressed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_scan import command_line, machine  # this script's directory is on sys.path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench-compress:start -->", "<!-- bench-compress:end -->"
PS = 4096


def make_dump(path: Path, size: int, seed: int = 22) -> None:
    """A raw image of ``size`` bytes of mixed pages (module docstring)."""
    rng = np.random.default_rng(seed)
    n = size // PS
    libs = bytearray()
    for f in sorted(glob.glob("/usr/lib/x86_64-linux-gnu/*.so*") + glob.glob("/usr/lib/*/*.so*")):
        if len(libs) >= int(0.4 * n) * PS:
            break
        try:
            libs += Path(f).read_bytes()
        except OSError:
            continue
    words = b" ".join(Path(f).read_bytes()[:4096] for f in sorted(
        glob.glob("/usr/share/common-licenses/*"))[:20]) or b"the quick brown fox "
    text = (words * (n // max(1, len(words) // PS) + 2))
    kinds = rng.choice(5, n, p=[0.3, 0.4, 0.1, 0.1, 0.1])
    lib_pages = max(1, len(libs) // PS)
    with open(path, "wb") as out:
        written: list[int] = []  # offsets of non-zero pages, for copies
        for i, kind in enumerate(kinds.tolist()):
            if kind == 0 or (kind == 4 and not written):
                page = bytes(PS)
            elif kind == 1:
                at = (i % lib_pages) * PS
                page = bytes(libs[at:at + PS]).ljust(PS, b"\0")
            elif kind == 2:
                at = int(rng.integers(0, len(text) - PS))
                page = bytes(text[at:at + PS])
            elif kind == 3:
                page = rng.integers(0, 256, PS, dtype=np.uint8).tobytes()
            else:
                src = written[int(rng.integers(0, len(written)))]
                out.flush()
                with open(path, "rb") as f:
                    f.seek(src)
                    page = f.read(PS)
            if kind != 0 and any(page):
                written.append(i * PS)
            out.write(page)


def best(cmd: list[str] | str, shell: bool = False) -> float:
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, shell=shell, stdout=subprocess.DEVNULL)
        runs.append(time.perf_counter() - t)
    return min(runs)


def codec_loop(path: Path, codec: str) -> tuple[float, int]:
    """Seconds (best of 3) to compress every distinct non-zero page once, one call a page,
    and how many pages that was."""
    import lz4.block
    import zstandard

    data = np.fromfile(path, np.uint8)
    pages = data[:len(data) // PS * PS].reshape(-1, PS)
    pages = pages[pages.view(np.uint64).any(axis=1)]
    distinct = np.unique(pages, axis=0)
    view = memoryview(np.ascontiguousarray(distinct).reshape(-1))
    n = len(distinct)
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        if codec == "lz4":
            for i in range(n):
                lz4.block.compress(view[i * PS:(i + 1) * PS], mode="default", store_size=False)
        else:
            c = zstandard.ZstdCompressor(level=3)
            for i in range(n):
                c.compress(view[i * PS:(i + 1) * PS])
        runs.append(time.perf_counter() - t)
    return min(runs), n


def scan_pass(path: Path, codec: str) -> tuple[float, int]:
    """``compress_seconds`` (best of 3) of ``scan --compress``, and the pages compressed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs, pages = [], 0
    for _ in range(3):
        r = subprocess.run([sys.executable, "-m", "ksm_analyze", "scan", str(path), "--json",
                            "-q", "--format", "raw", "--compress", codec], check=True, capture_output=True,
                           env=env, text=True)
        out = json.loads(r.stdout)
        runs.append(float(out["stages"]["compress_seconds"]))
        pages = int(out["compression"][-1]["compressed_pages"])
    return min(runs), pages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--dir", default="/dev/shm", help="where the dump goes")
    ap.add_argument("--no-write", action="store_true", help="print, leave BENCHMARKS.md")
    args = ap.parse_args()
    size = int(args.size_gib * (1 << 30))
    dump = Path(args.dir) / "bench-compress.raw"
    try:
        make_dump(dump, size)
        gib = dump.stat().st_size / 2**30
        subprocess.run(["cat", str(dump)], check=True, stdout=subprocess.DEVNULL)  # cached
        cat = best(f"cat {dump} > /dev/null", shell=True)
        rows = [f"| `cat` of the dump | {gib:.2f} GiB | {cat:.2f} s | {gib / cat:.2f} GiB/s |"]
        for tool, cmd in (("lz4", f"lz4 -1 -c {dump} > /dev/null"),
                          ("zstd", f"zstd -3 -T0 -q -c {dump} > /dev/null")):
            if shutil.which(tool):
                t = best(cmd, shell=True)
                rows.append(f"| `{cmd.split(' -c')[0]}` of the dump (the CLI alone) | "
                            f"{gib:.2f} GiB | {t:.2f} s | {gib / t:.2f} GiB/s |")
        for codec in ("lz4", "zstd"):
            t, n = codec_loop(dump, codec)
            left = n * PS / 2**30
            rows.append(f"| Python {codec} alone, a call a page, 1 thread, on the pages KSM "
                        f"leaves | {left:.2f} GiB | {t:.2f} s | {left / t:.2f} GiB/s |")
            t, n = scan_pass(dump, codec)
            left = n * PS / 2**30
            rows.append(f"| `scan --compress {codec}`: the compression pass "
                        f"(`compress_seconds`) | {left:.2f} GiB left of {gib:.2f} GiB | "
                        f"{t:.2f} s | {left / t:.2f} GiB/s left, {gib / t:.2f} GiB/s of the "
                        "dump |")
    finally:
        dump.unlink(missing_ok=True)
    text = "\n".join([
        f"`{command_line()}` on {machine()}; best of 3 each:", "",
        "| what | bytes | seconds | throughput |", "|---|---:|---:|---:|", *rows])
    print(text)
    if not args.no_write:
        doc = ROOT / "BENCHMARKS.md"
        old = doc.read_text()
        if START in old:
            head, rest = old.split(START, 1)
            new = head + START + "\n" + text + "\n" + END + rest.split(END, 1)[1]
        else:
            new = old.rstrip("\n") + "\n\n## Compression (`--compress`)\n\n" + START + "\n" \
                + text + "\n" + END + "\n"
        doc.write_text(new)


if __name__ == "__main__":
    main()
