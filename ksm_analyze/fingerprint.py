"""Stage 1: one pass over a dump that flags zero pages and hashes every page's prefix.

Zero pages are found in bulk with numpy (a cheap look at the first 64 bytes, then a full check
of just those pages), never by hashing. Every other page gets xxh3-64 of its first
``prefix_bytes`` bytes, the first KSM design's partial hash; stage 2 (``dedup.py``) decides
which of them are really equal.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from ._parallel import imap_shards
from .formats import DumpFormat
from .formats.base import DEFAULT_BATCH_PAGES, DumpReader
from .pages import Extent, PageState
from .settings import DEFAULT_OPTIONS, ProgressCallback, ScanOptions

__all__ = ["Fingerprints", "fingerprint", "prefix_hashes", "zero_rows"]

_PROBE_WORDS = 8  # 64 bytes: one cache line decides most pages are not zero
PARALLEL_MIN_PAGES = 16384
"""Below 64 MiB of stored 4 KiB pages, forking workers costs more than it saves."""
SHARDS_PER_JOB = 4
"""More shards than workers, so the parent holds only a small share of results at a time."""


@dataclass(frozen=True)
class Fingerprints:
    """What stage 1 learns of one input: one row per stored page, 24 bytes a page.

    Pages the format marks ZERO, HOLE, EXCLUDED or NOT_SAVED have no rows; they are counted
    in ``state_pages`` from the extents.
    """

    path: str
    format: DumpFormat
    address_space: str
    page_size: int
    prefix_bytes: int
    extents: list[Extent]
    info: dict[str, Any]
    warnings: list[str]
    addrs: np.ndarray
    """uint64 address of each stored page."""
    locators: np.ndarray
    """uint64 reader locator of each stored page (to read it again in stage 2)."""
    prefix: np.ndarray
    """uint64 xxh3-64 of the page's first ``prefix_bytes`` bytes; 0 marks an all-zero page
    (a non-zero page whose hash is 0 is stored as 1: stage 2 compares bytes anyway)."""
    state_pages: dict[PageState, int] = field(default_factory=dict)
    """Pages per state from the extents (DATA counts stored pages, zero or not)."""

    @property
    def zero(self) -> np.ndarray:
        """bool per row: the stored page is all zero."""
        return np.asarray(self.prefix == 0)

    @property
    def zero_pages(self) -> int:
        """All-zero pages: found by content plus those the format marks ZERO."""
        return int(np.count_nonzero(self.prefix == 0)) + self.state_pages[PageState.ZERO]

    @property
    def nonzero_pages(self) -> int:
        """Stored pages with at least one non-zero byte."""
        return int(np.count_nonzero(self.prefix))


def zero_rows(pages: np.ndarray) -> np.ndarray:
    """Return a bool per row of ``pages`` (n, page_size): is the row all zero bytes."""
    words = pages.view(np.uint64)
    maybe = np.flatnonzero(~words[:, :_PROBE_WORDS].any(axis=1))
    zero = np.zeros(len(pages), dtype=bool)
    if maybe.size == 0:
        return zero
    # Check candidates run by run: slices of the batch need no copy, fancy indexing would.
    breaks = np.flatnonzero(np.diff(maybe) != 1) + 1
    for run in np.split(maybe, breaks):
        start, stop = int(run[0]), int(run[-1]) + 1
        zero[start:stop] = ~words[start:stop].any(axis=1)
    return zero


def prefix_hashes(pages: np.ndarray, rows: np.ndarray, nbytes: int) -> np.ndarray:
    """xxh3-64 of the first ``nbytes`` bytes of the given rows of ``pages``."""
    ps = pages.shape[1]
    flat = np.ascontiguousarray(pages).reshape(-1).data
    digest = xxhash.xxh3_64_intdigest
    offsets = (rows * ps).tolist()
    return np.fromiter(
        (digest(flat[o : o + nbytes]) for o in offsets), dtype=np.uint64, count=len(offsets)
    )


def _hash_shard(
    reader: DumpReader, nbytes: int, batch_pages: int, shard: int, shards: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Stage 1 over one shard of the reader's batches: (addrs, locators, prefix) per batch."""
    for batch in reader.iter_batches(batch_pages, shard=shard, shards=shards):
        zero = zero_rows(batch.pages)
        prefix = np.zeros(len(zero), dtype=np.uint64)
        rows = np.flatnonzero(~zero)
        if rows.size:
            hashed = prefix_hashes(batch.pages, rows, nbytes)
            hashed[hashed == 0] = 1  # 0 means "zero page"
            prefix[rows] = hashed
        yield batch.addrs, batch.locators, prefix


def fingerprint(
    reader: DumpReader,
    options: ScanOptions = DEFAULT_OPTIONS,
    *,
    batch_pages: int = DEFAULT_BATCH_PAGES,
    progress: ProgressCallback | None = None,
) -> Fingerprints:
    """Read every stored page of ``reader`` once and return its :class:`Fingerprints`.

    Args:
        reader: an open dump.
        options: ``prefix_bytes`` (0 or the page size hashes the whole page) and ``jobs``
            (inputs below PARALLEL_MIN_PAGES stored pages use one process).
        batch_pages: pages handed from the reader at a time.
        progress: called as ``progress(bytes_done, bytes_total)`` as batches arrive.

    Returns:
        The input's fingerprints (rows in no particular order).
    """
    ps, jobs = reader.page_size, options.workers
    nbytes = ps if options.prefix_bytes == 0 else min(options.prefix_bytes, ps)
    stored = reader.page_counts()[PageState.DATA]
    shards = jobs * SHARDS_PER_JOB if jobs > 1 and stored >= PARALLEL_MIN_PAGES else 1
    # Results go straight into arrays sized for every stored page, shard by shard as they
    # arrive, so the parent never holds the table twice.
    addrs = np.empty(stored, np.uint64)
    locators = np.empty(stored, np.uint64)
    prefix = np.empty(stored, np.uint64)
    filled = 0
    if progress is not None:
        progress(0, stored * ps)
    if shards == 1:
        parts: Iterable[Iterable[tuple[np.ndarray, ...]]] = [
            _hash_shard(reader, nbytes, batch_pages, 0, 1)
        ]
    else:
        parts = imap_shards(
            lambda k: list(_hash_shard(reader, nbytes, batch_pages, k, shards)), shards, jobs
        )
    for part in parts:
        for a, loc, p in part:
            end = filled + len(a)
            if end > stored:
                raise AssertionError(f"{reader.path}: reader yielded more pages than it stores")
            addrs[filled:end], locators[filled:end], prefix[filled:end] = a, loc, p
            filled = end
            if progress is not None:
                progress(filled * ps, stored * ps)
        del part
    if filled != stored:
        raise AssertionError(f"{reader.path}: reader yielded {filled} of {stored} stored pages")
    return Fingerprints(
        path=reader.name,
        format=reader.format,
        address_space=reader.address_space,
        page_size=ps,
        prefix_bytes=nbytes,
        extents=list(reader.extents),
        info=reader.info(),
        warnings=list(reader.warnings),
        addrs=addrs,
        locators=locators,
        prefix=prefix,
        state_pages=reader.page_counts(),
    )
