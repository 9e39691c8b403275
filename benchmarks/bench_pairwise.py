#!/usr/bin/env python3
"""Time the pairwise table (and the twin check over it) for many inputs.

Two core tables are generated directly (no dumps):

1. ``empty``: inputs that hold no duplicated content (a fingerprint file declaring many
   empty inputs, issue 18 class 11);
2. ``fleet``: guests of ``--pages`` duplicated pages each: a tenth of them shared by every
   guest (a base image), a tenth shared within a group of ten, the rest pairs with one
   neighbour. Every pair of guests shares (the base image): the table is cut to ``--top``
   pairs per input, twins are found before the cut.

    python benchmarks/bench_pairwise.py --inputs 1000 2000 5000 --top 50
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ksm_analyze.columns import Columns
from ksm_analyze.content_table import ContentTable
from ksm_analyze.options import ScanOptions
from ksm_analyze.sharing import pairwise, twin_warnings

PS = 4096


def table(n: int, pages: int, kind: str) -> ContentTable:
    """A core table of ``n`` inputs (see the module's docstring)."""
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    if kind == "fleet":
        g = np.arange(n)
        base = pages // 10
        for c in range(base):  # held by every guest
            parts.append((np.full(n, c), g))
        for c in range(base):  # held by each group of ten
            parts.append((base + c + (g // 10) * base, g))
        rest = pages - 2 * base  # guest i shares with guest i ^ 1
        for c in range(rest):
            parts.append((base * (2 + n // 10) + c + (g // 2) * rest, g))
    if parts:
        content = np.concatenate([c for c, _ in parts]).astype(np.int64)
        owner = np.concatenate([o for _, o in parts]).astype(np.int32)
    else:
        content, owner = np.empty(0, np.int64), np.empty(0, np.int32)
    order = np.lexsort((owner, content))
    cols = Columns({"input": [f"/d/guest{i}.raw" for i in range(n)],
                    "unique_pages": np.full(n, pages, np.int64),
                    "zero_pages": np.zeros(n, np.int64), "domain": np.zeros(n, np.int64)})
    return ContentTable(cols, content[order], owner[order], np.ones(len(content), np.int64), PS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, nargs="+", default=[1000, 2000])
    ap.add_argument("--pages", type=int, default=100, help="duplicated pages per fleet guest")
    ap.add_argument("--top", type=int, default=ScanOptions().pairs_top,
                    help="pairs kept per input (0: every pair that shares)")
    args = ap.parse_args()
    for n in args.inputs:
        for kind in ("empty", "fleet"):
            t = table(n, args.pages, kind)
            start = time.perf_counter()
            pw = pairwise(t, max_page_sharing=256, top=args.top)
            mid = time.perf_counter()
            fps = [SimpleNamespace(page_size=PS, address_space="virtual")] * n
            warnings = twin_warnings(pw, fps)  # type: ignore[arg-type]
            end = time.perf_counter()
            print(f"{n:>6,} inputs, {kind:<5}: {len(t.content):>9,} sparse rows, "
                  f"{pw.sharing:>10,} sharing pairs, {len(pw.rows):>9,} kept: "
                  f"pairwise {mid - start:6.2f} s, "
                  f"twins {end - mid:6.2f} s ({len(warnings)} warnings)", flush=True)


if __name__ == "__main__":
    main()
