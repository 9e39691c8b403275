"""A process with a known memory mix, for capture and real-KSM tests.

    python tests/workload.py --seed N [--thp]

Maps and fills, then prints ``ready <pid>`` and sleeps until killed. The layout (pages):

* ``mergeable`` (MADV_MERGEABLE, private anonymous, 2048 pages): 300 copies of pattern A
  (past max_page_sharing 256), 8 patterns x 64 copies, 6 pages shared with the other
  workload seed (pattern S), 400 random pages, 200 zero pages *written*, 100 pages *read*
  but never written (they map the kernel's zero page), the rest never touched;
* ``thp`` (with ``--thp``; 2 MiB aligned, MADV_HUGEPAGE + MADV_MERGEABLE, 1024 pages):
  384 copies of pattern A, 128 zero pages and 512 random pages, backed by transparent huge
  pages;
* ``plain`` (private anonymous, not mergeable, 256 pages): 256 copies of pattern A, for
  ``--scope anon``;
* ``shared`` (MAP_SHARED anonymous, 256 pages, MADV_MERGEABLE ignored by the kernel): 256
  copies of pattern A, which KSM must never merge.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
from numpy.random import default_rng

PS = 4096
THP = 2 << 20


def patterns(seed: int) -> dict[str, np.ndarray]:
    """The page contents: A and S are the same in every seed; the others are per seed."""
    common = default_rng(12345)
    rng = default_rng(seed)
    return {
        "A": common.integers(0, 256, PS, dtype=np.uint8),
        "S": common.integers(0, 256, PS, dtype=np.uint8),
        "own": rng.integers(0, 256, (8, PS), dtype=np.uint8),
        "random": rng.integers(0, 256, (1024, PS), dtype=np.uint8),
    }


def _pages(region: mmap.mmap) -> np.ndarray:
    return np.frombuffer(region, np.uint8).reshape(-1, PS)


def build(seed: int, thp: bool) -> list[mmap.mmap]:
    p = patterns(seed)
    private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    keep = []

    mergeable = mmap.mmap(-1, 2048 * PS, flags=private)
    mergeable.madvise(mmap.MADV_MERGEABLE)
    m = _pages(mergeable)
    m[0:300] = p["A"]
    m[300:812] = np.repeat(p["own"], 64, axis=0)
    m[812:818] = p["S"]
    m[818:1218] = p["random"][:400]
    m[1218:1418] = 0  # written: resident zero pages that KSM scans
    _ = int(m[1418:1518].sum())  # read only: zero-page PTEs that KSM never scans
    keep.append(mergeable)

    if thp:
        # Over-map so a 2 MiB aligned window exists, then use only that window.
        big = mmap.mmap(-1, 1024 * PS + THP, flags=private)
        base = np.frombuffer(big, np.uint8).ctypes.data
        skip = (-base) % THP
        big.madvise(mmap.MADV_HUGEPAGE, skip, 1024 * PS)
        big.madvise(mmap.MADV_MERGEABLE, skip, 1024 * PS)
        t = np.frombuffer(big, np.uint8)[skip : skip + 1024 * PS].reshape(-1, PS)
        t[:384] = p["A"]
        t[384:512] = 0  # zero-filled subpages: KSM's split of the THP frees them
        t[512:] = p["random"][400:912]
        keep.append(big)

    plain = mmap.mmap(-1, 256 * PS, flags=private)
    _pages(plain)[:] = p["A"]
    keep.append(plain)

    shared = mmap.mmap(-1, 256 * PS, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    shared.madvise(mmap.MADV_MERGEABLE)  # the kernel ignores this for shared mappings
    _pages(shared)[:] = p["A"]
    keep.append(shared)
    return keep


LAYOUT = {
    # (first page, pages) of each kind in the ``mergeable`` region
    "A": (0, 300), "own": (300, 512), "S": (812, 6), "random": (818, 400),
    "zero_written": (1218, 200), "zero_read": (1418, 100), "untouched": (1518, 530),
}
MERGEABLE_PAGES, THP_PAGES, PLAIN_PAGES, SHARED_PAGES = 2048, 1024, 256, 256
THP_ZERO_PAGES = 128


@contextlib.contextmanager
def running(seed: int, *, thp: bool = False) -> Iterator[int]:
    """Start a workload process; yield its PID once its memory is filled; stop it after."""
    cmd = [sys.executable, __file__, "--seed", str(seed), *(["--thp"] if thp else [])]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("ready"):
                raise RuntimeError(f"workload did not start: {line!r}")
            yield proc.pid
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--thp", action="store_true")
    args = ap.parse_args()
    regions = build(args.seed, args.thp)
    print(f"ready {os.getpid()}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    del regions
    sys.exit(0)


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main()
