"""Run shards of one job on several CPU cores with forked worker processes.

Hashing is per-page Python work, so threads would queue on the GIL; forked processes share
the parent's open readers (and their page-cache-backed maps) without pickling them. The
task is left in a module global before the fork, so only shard numbers cross the pipe.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

__all__ = ["default_jobs", "imap_shards", "map_shards"]

T = TypeVar("T")
_TASK: Callable[[int], Any] | None = None


def default_jobs() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _run(shard: int) -> Any:
    assert _TASK is not None
    return _TASK(shard)


def imap_shards(task: Callable[[int], T], shards: int, jobs: int) -> Iterator[T]:
    """``task(0), ..., task(shards - 1)`` in any order, from up to ``jobs`` forked processes.

    Results arrive one at a time, so the caller can store each and drop it before the next.
    With one job (or one shard), or where fork is unavailable, runs in this process.
    """
    global _TASK
    if jobs <= 1 or shards <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for k in range(shards):
            yield task(k)
        return
    _TASK = task
    try:
        with multiprocessing.get_context("fork").Pool(min(jobs, shards)) as pool:
            yield from pool.imap_unordered(_run, range(shards))
    finally:
        _TASK = None


def map_shards(task: Callable[[int], T], shards: int, jobs: int) -> list[T]:
    """``[task(0), ..., task(shards - 1)]`` in shard order (see :func:`imap_shards`)."""
    done = dict(imap_shards(lambda k: (k, task(k)), shards, jobs))
    return [done[k] for k in range(shards)]
