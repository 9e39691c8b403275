#!/usr/bin/env python3
"""``scan`` of Hyper-V ``.vmrs`` files whose every page is LZ77-compressed, beside ``cat`` of
them (issue 20, "Hyper-V compressed pages" in BENCHMARKS.md), and the decoders alone.

Writes ``--mib`` MiB of guest memory (``--mib`` RamBlocks in data objects, every 4 KiB page a
distinct data page, none a fill) three ways, with tests/dumpwriter/vmrs.py's layout:

* ``literal.vmrs``: random pages, each an EXPLICIT token of 4,096 literals (the worst case of
  the Python decoder: one flag word per 32 bytes);
* ``match.vmrs``: a distinct 16-byte head repeated, each page a page token of 16 literals and
  one 4,077-byte match (``lz77_periodic``);
* ``short.vmrs`` (``--short-mib`` MiB only: the Python decoder runs under 1 MiB/s on it): a
  distinct 3-byte head repeated, each page 3 literals then 1,364 matches of 3 bytes.

Then, warm cache, best of ``--repeat``, every scan a fresh process: ``cat FILE > /dev/null``,
``python -m ksm_analyze scan FILE --json`` (the compiled decoder where built), and with
``--before DIR`` the same scan run from another checkout (the Python decoder), both giving the
same counters. ``--decoders`` times the decoders alone on one RamBlock of each kind: the
Python decoder page by page, the compiled one called once a page, and once a block::

    python benchmarks/bench_vmrs.py --dir /work/bench-vmrs --mib 256 --decoders \\
        --before /tmp/lz77c-before
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from dumpwriter.vmrs import END, explicit, lz77_periodic, make_vmrs, page_token

PS = 4096
MiB = 1 << 20
PAGES = MiB // PS


def literal_page(page: bytes) -> bytes:
    """4,096 literals: a zero flag word before each 32 bytes."""
    return b"".join(bytes(4) + page[i : i + 32] for i in range(0, PS, 32))


def short_page(head: bytes) -> bytes:
    """``head`` (3 bytes) repeated: 3 literals, 1,364 matches of 3 bytes 3 back, 1 literal."""
    bits = [0, 0, 0] + [1] * 1364 + [0]
    body = bytearray()
    items = [head[0:1], head[1:2], head[2:3]] + [struct.pack("<H", 2 << 3)] * 1364 + [head[:1]]
    for w in range(0, len(bits), 32):
        chunk = bits[w : w + 32]
        word = 0
        for b in chunk:
            word = word << 1 | b
        word = (word << 1 | 1) << (31 - len(chunk)) | ((1 << (31 - len(chunk))) - 1) if len(
            chunk) < 32 else word
        body += struct.pack("<I", word & 0xFFFFFFFF) + b"".join(items[w : w + 32])
    return bytes(body)


def block(kind: str, number: int) -> bytes:
    """RamBlock ``number``'s token stream: 256 compressed pages, distinct across the file."""
    rng = np.random.default_rng(number)
    out = []
    for p in range(PAGES):
        tag = struct.pack("<I", number * PAGES + p)  # distinct per page
        if kind == "literal":
            page = tag + rng.integers(0, 256, PS - 4, dtype=np.uint8).tobytes()
            out.append(explicit(PS, literal_page(page)))
        elif kind == "match":
            head = tag + rng.integers(0, 256, 12, dtype=np.uint8).tobytes()
            out.append(page_token(lz77_periodic(head * (PS // 16), 16)))
        else:
            head = struct.pack("<I", number * PAGES + p + 1)[:3]  # never 0 0 0 (zero page)
            out.append(page_token(short_page(head)))
    return b"".join(out) + END


def decoded(kind: str, number: int) -> list[bytes]:
    """What block() encodes, for the checks."""
    rng = np.random.default_rng(number)
    pages = []
    for p in range(PAGES):
        tag = struct.pack("<I", number * PAGES + p)
        if kind == "literal":
            pages.append(tag + rng.integers(0, 256, PS - 4, dtype=np.uint8).tobytes())
        elif kind == "match":
            pages.append((tag + rng.integers(0, 256, 12, dtype=np.uint8).tobytes()) * (PS // 16))
        else:
            pages.append((struct.pack("<I", number * PAGES + p + 1)[:3] * 1366)[:PS])
    return pages


def best(cmd: list[str], repeat: int, checkout: Path | None = None) -> tuple[float, str]:
    """Best wall time of ``cmd`` (with ``checkout``: run in it, its package first on the path:
    ``python -m`` puts the working directory first)."""
    times, out = [], ""
    env = None if checkout is None else {**os.environ, "PYTHONPATH": str(checkout)}
    for _ in range(repeat):
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=checkout,
                           check=True)
        times.append(time.perf_counter() - t)
        out = r.stdout
    return min(times), out


def counters(stdout: str) -> tuple[int, ...]:
    row = json.loads(stdout)["per_input"][0]
    return row["pages"], row["zero_pages"], row["nonzero_pages"], row["distinct_contents"]


def decoders(kind: str) -> None:
    from ksm_analyze.formats.lz77 import decompress
    from ksm_analyze.hashing import compiled

    stream = block(kind, 1)
    want = b"".join(decoded(kind, 1))
    jobs, pos = [], 0
    while True:
        (token,) = struct.unpack_from("<I", stream, pos)
        if token == 0xFFFFFFFF:
            break
        if token == 0xFFFFFFFC:
            out_len, size = struct.unpack_from("<II", stream, pos + 4)
            pos += 12
        else:
            out_len, size = PS, token
            pos += 4
        jobs.append((pos, size, len(jobs) * PS, out_len))
        pos += size
    t = time.perf_counter()
    py = b"".join(decompress(stream[a : a + n], m) for a, n, _, m in jobs)
    t_py = time.perf_counter() - t
    assert py == want
    line = f"{kind:8s} Python {1 / t_py:8.1f} MiB/s"
    if compiled.native is not None:
        out = np.empty(MiB, np.uint8)
        arr = np.array(jobs, np.int64)
        rows = [arr[i : i + 1] for i in range(len(jobs))]
        reps = 50
        t = time.perf_counter()
        for _ in range(reps):
            for r in rows:
                compiled.lz77_pages(stream, r, out)
        t_page = (time.perf_counter() - t) / reps
        assert out.tobytes() == want
        out[:] = 0
        t = time.perf_counter()
        for _ in range(reps):
            compiled.lz77_pages(stream, arr, out)
        t_block = (time.perf_counter() - t) / reps
        assert out.tobytes() == want
        line += (f", C a call a page {1 / t_page:8.1f} MiB/s, C a call a block "
                 f"{1 / t_block:8.1f} MiB/s")
    print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--short-mib", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--reuse", action="store_true", help="keep files already written")
    ap.add_argument("--before", type=Path, help="a checkout to run the 'before' scan from")
    ap.add_argument("--decoders", action="store_true", help="time the decoders alone too")
    args = ap.parse_args()
    if args.decoders:
        for kind in ("literal", "match", "short"):
            decoders(kind)
    args.dir.mkdir(parents=True, exist_ok=True)
    for kind, mib in (("literal", args.mib), ("match", args.mib), ("short", args.short_mib)):
        path = args.dir / f"{kind}.vmrs"
        if not (args.reuse and path.exists()):
            make_vmrs(path, {n: (block(kind, n), True) for n in range(mib)})
        size = path.stat().st_size
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
        t_cat, _ = best(["sh", "-c", f"cat {path} > /dev/null"], args.repeat)
        scan = [sys.executable, "-m", "ksm_analyze", "scan", str(path), "--json"]
        t_scan, out = best(scan, args.repeat, ROOT)
        assert counters(out) == (mib * PAGES, 0, mib * PAGES, mib * PAGES), counters(out)
        line = (f"{kind}: {mib} MiB of memory in a {size / MiB:.1f} MiB file: cat {t_cat:.2f} s,"
                f" scan {t_scan:.2f} s ({mib / t_scan:.0f} MiB/s)")
        if args.before:
            t_old, old = best(scan, args.repeat, args.before)
            assert counters(old) == counters(out)
            line += f", before {t_old:.2f} s ({mib / t_old:.1f} MiB/s)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
