#!/usr/bin/env python3
"""What ``scan --near-duplicates N`` costs beside a plain ``scan`` of the same dump.

A raw image of ``--gib`` GiB is written at run time (in a temporary folder, removed after):
a quarter zero pages, a quarter random pages, a quarter pages in families of 64 that differ
from each other only in their last 8 bytes (a trailer pointer, say), and a quarter copies of
a few hundred pages. Each case runs ``ksm-analyze scan`` as a separate process, once to warm
the page cache and then ``--repeat`` times; wall time (best) and peak private memory
(Pss_Anon summed over the process tree, the best run's) are printed as a Markdown table,
with the near-duplicate groups found (each family of 64 should be one group).

    python benchmarks/bench_near_duplicates.py --gib 1 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fleet import run_sampled

PS = 4096
FAMILY = 64


def write_image(path: Path, gib: float) -> int:
    """The image; returns the number of near-duplicate families in it."""
    pages = int(gib * (1 << 30)) // PS
    quarter = pages // 4
    rng = np.random.default_rng(0)
    families = quarter // FAMILY
    with open(path, "wb") as f:
        f.writelines(bytes(min(4096, quarter - start) * PS)  # zero pages
                     for start in range(0, quarter, 4096))
        f.writelines(rng.integers(0, 256, (min(4096, quarter - start), PS), np.uint8).tobytes()
                     for start in range(0, quarter, 4096))  # random pages
        bases = rng.integers(0, 256, (families, PS), np.uint8)
        for family in range(families):  # equal but for the last 8 bytes
            block = np.repeat(bases[family:family + 1], FAMILY, axis=0)
            block[:, -8:] = rng.integers(0, 256, (FAMILY, 8), np.uint8)
            f.write(block.tobytes())
        f.write(bytes((quarter - families * FAMILY) * PS))
        copies = rng.integers(0, 256, (300, PS), np.uint8)
        rest = pages - 3 * quarter
        for start in range(0, rest, 4096):
            n = min(4096, rest - start)
            f.write(copies[rng.integers(0, 300, n)].tobytes())
    return families


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ksm-bench-neardup-") as tmp:
        image = Path(tmp) / "guest.raw"
        families = write_image(image, args.gib)
        base = [sys.executable, "-m", "ksm_analyze", "scan", str(image), "--json", "-q"]
        print(f"{platform.node()}: {args.gib:g} GiB raw image, {families:,} near-duplicate "
              f"families of {FAMILY}; best of {args.repeat}\n")
        print("| case | seconds | peak Pss_Anon | groups reported |")
        print("|---|---:|---:|---:|")
        for name, extra in (("scan", []), (f"scan --near-duplicates {args.top}",
                                            ["--near-duplicates", str(args.top)])):
            run_sampled(base + extra)  # the page cache warm
            runs = [run_sampled(base + extra) for _ in range(args.repeat)]
            seconds, peak, out = min(runs, key=lambda r: r[0])
            groups = json.loads(out)["near_duplicates"]
            exact = sum(g["contents"] == FAMILY and g["differing_ranges"] == [f"{PS - 8}-{PS - 1}"]
                        for g in groups)
            print(f"| `{name}` | {seconds:.2f} | {peak / 2**20:.0f} MiB | {len(groups)} "
                  f"({exact} exactly a family, bytes {PS - 8}-{PS - 1}) |")


if __name__ == "__main__":
    main()
