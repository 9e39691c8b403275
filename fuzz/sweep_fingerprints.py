#!/usr/bin/env python3
"""Every one-byte change of a fingerprint file and of a cache entry: an error, or the answer
unchanged.

    python fuzz/sweep_fingerprints.py [--target fpfile|cache|both] [--values N] [--jobs J]

The seed is the fingerprint file (and the ``--cache`` entry) of sample_dumps/vm-b.raw. Each
case replaces one byte with another value (all 255 others by default: every one-byte
substitution, about 1.5 million cases per target) and reads the result the way a run does:

- ``fpfile``: :func:`ksm_analyze.fleet.fingerprint_files.load`;
- ``cache``: ``Cache.get`` of the dump under its key (the entry overwritten in place).

A case passes when it raises the package's own error (one line), is a cache miss, or gives
fingerprints equal to the seed's in every field. Anything else (another exception, other
fingerprints) is counted and its first few are printed with the byte and value; the exit
code is 1 if there is any. The atheris targets (fuzz_fpfile.py, fuzz_cache.py) explore
further but at tens of cases a second; this sweep runs in-process at about a thousand.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ksm_analyze import analyze  # noqa: E402
from ksm_analyze.errors import KsmAnalyzeError  # noqa: E402
from ksm_analyze.fleet import fingerprint_files  # noqa: E402
from ksm_analyze.fleet.sources import write_fingerprint_files  # noqa: E402
from ksm_analyze.options import ScanOptions  # noqa: E402


def _fields(fp):
    for f in dataclasses.fields(fp):
        value = getattr(fp, f.name)
        if f.name == "source" and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k != "file"}  # where it was read from
        yield value


def same(a, b) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
        for fa, fb in zip(a, b, strict=True)
        for x, y in zip(_fields(fa), _fields(fb), strict=True))


class Seed:
    """vm-b.raw copied into a private folder, its fingerprint file and its cache entry."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(mode=0o700)
        self.dump = folder / "vm-b.raw"
        shutil.copy(ROOT / "sample_dumps" / "vm-b.raw", self.dump)
        (written,) = write_fingerprint_files([self.dump], folder / "fp", ScanOptions(jobs=1),
                                             4096, reading=lambda name: lambda n, of: None)
        self.fpfile = Path(written)
        self.cache_dir = folder / "cache"
        analyze([str(self.dump)], jobs=1, cache=str(self.cache_dir))
        (self.entry,) = self.cache_dir.iterdir()
        self.key = fingerprint_files.options_of(self.entry)


def _run(args: tuple[str, str, int, int, int]) -> tuple[dict[str, int], list[str], int]:
    target, folder, start, stop, values = args
    seed = Seed(Path(folder) / f"w{start}")
    path = seed.fpfile if target == "fpfile" else seed.entry
    original = path.read_bytes()
    if target == "fpfile":
        want = fingerprint_files.load(path)
    else:
        want = fingerprint_files.Cache(seed.cache_dir).get(seed.dump, seed.key)
        assert want is not None, "the seed's cache entry is not used"
    counts = {"error": 0, "miss": 0, "same": 0, "changed": 0, "crash": 0}
    shown: list[str] = []
    step = max(1, 255 // values)
    cases = 0
    for at in range(start, min(stop, len(original))):
        for delta in range(1, 256, step):
            data = bytearray(original)
            data[at] ^= delta
            path.write_bytes(data)
            os.chmod(path, 0o600)
            cases += 1
            try:
                if target == "fpfile":
                    got = fingerprint_files.load(path)
                else:
                    cache = fingerprint_files.Cache(seed.cache_dir)
                    got = cache.get(seed.dump, seed.key)
                    if got is None:
                        counts["miss"] += 1
                        continue
            except KsmAnalyzeError as e:
                counts["error"] += 1
                if "\n" in str(e) and len(shown) < 5:
                    shown.append(f"byte {at} ^ {delta:#04x}: error of two lines: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - what the sweep is for
                counts["crash"] += 1
                if len(shown) < 5:
                    shown.append(f"byte {at} ^ {delta:#04x}: {type(e).__name__}: {e}")
                continue
            if same(got, want):
                counts["same"] += 1
            else:
                counts["changed"] += 1
                if len(shown) < 5:
                    shown.append(f"byte {at} ^ {delta:#04x}: loaded other fingerprints")
    path.write_bytes(original)
    return counts, shown, cases


def sweep(target: str, values: int, jobs: int) -> bool:
    with tempfile.TemporaryDirectory(prefix="ksm-sweep-", dir="/dev/shm"
                                     if os.path.isdir("/dev/shm") else None) as folder:
        os.chmod(folder, 0o700)
        size = Seed(Path(folder) / "probe").fpfile.stat().st_size if target == "fpfile" \
            else Seed(Path(folder) / "probe").entry.stat().st_size
        chunks = 8 * jobs
        bounds = [(target, folder, size * k // chunks, size * (k + 1) // chunks, values)
                  for k in range(chunks)]
        t = time.perf_counter()
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_run, bounds)
        seconds = time.perf_counter() - t
    total = {k: sum(r[0][k] for r in results) for k in results[0][0]}
    cases = sum(r[2] for r in results)
    print(f"{target}: {size:,}-byte file, {cases:,} cases in {seconds:.0f} s "
          f"({cases / seconds:,.0f}/s, {jobs} jobs): " +
          ", ".join(f"{v:,} {k}" for k, v in total.items()))
    for r in results:
        for line in r[1]:
            print("  " + line)
    return total["changed"] == 0 and total["crash"] == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", choices=("fpfile", "cache", "both"), default="both")
    ap.add_argument("--values", type=int, default=255,
                    help="values tried per byte (255: every other value)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    targets = ("fpfile", "cache") if args.target == "both" else (args.target,)
    ok = all([sweep(t, args.values, args.jobs) for t in targets])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
