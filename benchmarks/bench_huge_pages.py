#!/usr/bin/env python3
"""Time the huge-page what-if (``whatif/huge_pages.py``) that every in-memory ``scan`` runs.

Synthetic fingerprints of one guest (no dump: stage 1 and 2 are not what is measured):
``--gib`` GiB of 4 KiB pages, a share of them zero, the others labelled from a content
space of a million classes (rows whose label is seen once are stage 2's ``UNIQUE``), rows
in address order (as a raw or ELF dump's single pass gives them) or shuffled (as stage 1's
shards may). Prints seconds and the peak of numpy's allocations (tracemalloc) per case.

    python benchmarks/bench_huge_pages.py --gib 16 --repeat 3
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ksm_analyze.eligibility import Scope
from ksm_analyze.formats import DumpFormat
from ksm_analyze.hashing.stage1 import Fingerprints
from ksm_analyze.pages import Extent, PageState
from ksm_analyze.whatif.huge_pages import huge_regions

PS = 4096


def fingerprints(gib: int, zero_share: float, shuffled: bool) -> tuple[Fingerprints, np.ndarray]:
    n = gib << 18
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 1_000_000, n).astype(np.int32)
    labels[rng.random(n) < 0.3] = -2  # UNIQUE
    zero = rng.random(n) < zero_share
    labels[zero] = -1  # ZERO
    addrs = np.arange(n, dtype=np.uint64) * np.uint64(PS)
    prefix = np.where(zero, 0, 1).astype(np.uint64)
    if shuffled:
        order = rng.permutation(n)
        addrs, prefix, labels = addrs[order], prefix[order], labels[order]
    fp = Fingerprints("bench", DumpFormat.RAW, "physical", PS, 128,
                      [Extent(0, n, PageState.DATA, 0)], {}, [], addrs, prefix,
                      dict.fromkeys(PageState, 0))
    return fp, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=int, default=16)
    ap.add_argument("--zero-share", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"| rows | {args.gib} GiB: seconds (best of {args.repeat}) | peak numpy allocations |")
    print("|---|---|---|")
    for shuffled in (False, True):
        fp, labels = fingerprints(args.gib, args.zero_share, shuffled)
        best = float("inf")
        for _ in range(args.repeat):
            t = time.perf_counter()
            huge_regions([fp], [labels], 1_000_000, Scope.MERGEABLE)
            best = min(best, time.perf_counter() - t)
        tracemalloc.start()
        huge_regions([fp], [labels], 1_000_000, Scope.MERGEABLE)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        pages = len(labels)
        print(f"| {'shuffled' if shuffled else 'in address order'} | {best:.2f} s | "
              f"{peak / 2**20:.0f} MiB ({peak / pages:.1f} B a page) |")


if __name__ == "__main__":
    main()
