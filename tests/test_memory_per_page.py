"""Private memory per stored page: fingerprints, labels and the candidate list stay within 24
bytes a page plus a constant (docs/model.md, "Memory"), also for a kdump whose zero and data
pages alternate page by page (each page its own range of the bitmap before issue 11).

The peak is measured with ``tracemalloc`` in a child process: numpy reports its arrays to it,
so the peak counts every array and Python object the analysis allocates, and nothing that is
mapped page cache. (Throughput and Pss of the whole process are measured by
``benchmarks/bench_scan.py``.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import PS, ROOT

from dumpwriter.kdump import make_kdump

BYTES_PER_PAGE = 24
CONSTANT = 48 << 20
"""The constant of the bound (docs/model.md): parts of stage 2, batches of stage 1, tables."""

_CHILD = r"""
import json, sys, tracemalloc
from ksm_analyze import analyze
tracemalloc.start()
a = analyze([sys.argv[1]], jobs=int(sys.argv[2]))
print(json.dumps({"peak": tracemalloc.get_traced_memory()[1],
                  "zero": int(a.per_input["zero_pages"].sum()),
                  "pages": int(a.per_input["pages"].sum())}))
"""


def _peak(path, jobs: int = 1) -> dict:
    """The analysis's peak in a child; with two jobs on a raw dump, its threads count too
    (tracemalloc traces every thread; forked processes it would not see)."""
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(jobs)], capture_output=True,
                         text=True, cwd=ROOT, timeout=600, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("npages", [1 << 16, 1 << 18])
def test_alternating_zero_and_data_kdump_pages_cost_a_bounded_amount(tmp_path, npages):
    # Every other page zero (the shared zero descriptor), the others distinct.
    pages = {pfn: (bytes(PS) if pfn % 2 else (pfn + 1).to_bytes(8, "little") * (PS // 8))
             for pfn in range(npages)}
    make_kdump(tmp_path / "k", pages, max_mapnr=npages)
    got = _peak(tmp_path / "k")
    assert (got["pages"], got["zero"]) == (npages, npages // 2)
    assert got["peak"] <= BYTES_PER_PAGE * npages + CONSTANT, got["peak"]


@pytest.mark.parametrize("jobs", [1, 2])
def test_raw_dump_of_candidates_and_zero_pages_costs_a_bounded_amount(tmp_path, jobs):
    # A quarter zero, half copies of a few contents (every one a candidate), a quarter unique.
    rng = np.random.default_rng(0)
    npages = 1 << 18
    kind = rng.integers(0, 4, npages)
    pool = rng.integers(0, 256, (64, PS), dtype=np.uint8)
    with open(tmp_path / "r.raw", "wb") as f:
        for lo in range(0, npages, 4096):
            k = kind[lo : lo + 4096]
            block = rng.integers(0, 256, (len(k), PS), dtype=np.uint8)
            block[k == 0] = 0
            dup = np.flatnonzero(k >= 2)
            block[dup] = pool[rng.integers(0, 64, len(dup))]
            f.write(block.tobytes())
    got = _peak(tmp_path / "r.raw", jobs)
    assert got["zero"] == int(np.count_nonzero(kind == 0))
    assert got["peak"] <= BYTES_PER_PAGE * npages + CONSTANT, got["peak"]
