"""Stage 1: one pass over a dump that flags zero pages and hashes every page's prefix.

Every batch is handled whole, with no Python per page. Where the compiled kernels are built
(:mod:`.compiled`), one call reads each page in place: a probe of its first cache line, a full
zero check only if that is zero, else xxh3-64 of its prefix (the first KSM design's partial
hash). Otherwise numpy does the same in passes: one gather copies the head of each page (its
first ``max(prefix_bytes, 64)`` bytes), the first 64 bytes rule out most pages being zero, the
rest are checked run by run, and the prefixes of the non-zero pages are hashed together by
:mod:`.xxh3`, bit-exact with the ``xxhash`` library. Stage 2 (``dedup.py``) decides which
pages are really equal.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._parallel import imap_shards, imap_threads
from ..formats import DumpFormat
from ..formats.base import DEFAULT_BATCH_PAGES, DumpReader
from ..options import DEFAULT_OPTIONS, ProgressCallback, ScanOptions
from ..pages import Extent, PageBatch, PageState
from . import compiled
from .xxh3 import xxh3_64_rows

__all__ = ["Fingerprints", "fingerprint", "hash_batch", "zero_rows"]

_PROBE_BYTES = 64  # one cache line decides most pages are not zero
PARALLEL_MIN_PAGES = 16384
"""Below 64 MiB of stored 4 KiB pages, forking workers costs more than it saves."""
SHARDS_PER_JOB = 4
"""More shards than workers, so the parent holds only a small share of results at a time."""


@dataclass(frozen=True)
class Fingerprints:
    """What stage 1 learns of one input: one row per stored page, 16 bytes a page.

    Pages the format marks ZERO, HOLE, EXCLUDED or NOT_SAVED have no rows; they are counted
    in ``state_pages`` from the extents. Rows are in no particular order; stage 2 reads a page
    again by its address.
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
    prefix: np.ndarray
    """uint64 xxh3-64 of the page's first ``prefix_bytes`` bytes; 0 marks an all-zero page
    (a non-zero page whose hash is 0 is stored as 1: stage 2 compares bytes anyway)."""
    state_pages: dict[PageState, int] = field(default_factory=dict)
    """Pages per state from the extents (DATA counts stored pages, zero or not)."""
    content: np.ndarray | None = None
    """``(rows, 2)`` uint64 xxh3-128 of each whole page (0 for a zero page), when known: read
    from a fingerprint file that carries it (:mod:`ksm_analyze.fleet.fingerprint_files`), for a dump not readable here."""
    source: dict[str, Any] | None = None
    """For fingerprints read from a file (or the cache): what it recorded of its dump
    (``path``, ``size``, ``mtime_ns``, ``ctime_ns``, ``dev``, ``ino``; see
    :func:`ksm_analyze.fleet.fingerprint_files.source_of`), and ``file``, the file read.
    Stage 2 checks the pages it reads of such a dump against these fingerprints."""

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


def zero_rows(pages: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """bool per entry of ``rows`` (sorted row numbers of ``pages``, ``(n, page_size)``; all
    rows by default): is that row all zero bytes. Consecutive rows are checked as one block,
    without a copy."""
    words = pages.view(np.uint64)
    if rows is None:
        rows = np.arange(len(pages))
    zero = np.zeros(len(rows), dtype=bool)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    first, last = rows[np.r_[0, breaks]].tolist(), (rows[np.r_[breaks, len(rows)] - 1] + 1).tolist()
    at = np.r_[0, breaks].tolist()
    count = np.count_nonzero
    for lo, start, stop in zip(at, first, last, strict=True):
        block = words[start:stop]
        # Zero pages come in runs: one count settles a whole run of them.
        zero[lo : lo + stop - start] = True if not count(block) else block.max(axis=1) == 0
    return zero


def hash_batch(batch: PageBatch, nbytes: int) -> np.ndarray:
    """The prefix column of a batch: xxh3-64 of each page's first ``nbytes`` bytes, 0 for an
    all-zero page (and 1 for a non-zero page whose hash is 0)."""
    pages = batch.pages
    if compiled.usable(pages):
        return compiled.prefix_hashes(pages, nbytes, batch.zero)  # in place, one call
    prefix = np.zeros(len(pages), np.uint64)
    rows = np.arange(len(pages)) if batch.zero is None else np.flatnonzero(~batch.zero)
    if not len(rows):
        return prefix
    head = pages[rows, : max(nbytes, _PROBE_BYTES)]  # the one gather: a row's first lines
    probe = head[:, :_PROBE_BYTES].view(np.uint64)
    any_set = probe[:, 0] | probe[:, 1]
    for column in range(2, _PROBE_BYTES // 8):
        any_set |= probe[:, column]
    maybe = np.flatnonzero(any_set == 0)
    nonzero = np.ones(len(rows), bool)
    if len(maybe):
        nonzero[maybe] = ~zero_rows(pages, rows[maybe])
    hashed = xxh3_64_rows(np.ascontiguousarray(head[nonzero, :nbytes]))
    hashed[hashed == 0] = 1  # 0 means "zero page"
    prefix[rows[nonzero]] = hashed
    return prefix


def _hash_shard(
    reader: DumpReader, nbytes: int, batch_pages: int, shard: int, shards: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stage 1 over one shard of the reader's batches: (addrs, prefix) per batch."""
    for batch in reader.iter_batches(batch_pages, shard=shard, shards=shards):
        yield batch.addrs, hash_batch(batch, nbytes)
        del batch  # decoded batches are 32 MiB: let it go before the next is made


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
        options: ``prefix_bytes`` (bytes hashed:
            :meth:`~ksm_analyze.options.ScanOptions.hashed_bytes`) and ``jobs`` (inputs
            below PARALLEL_MIN_PAGES stored pages use one process).
        batch_pages: pages handed from the reader at a time.
        progress: called as ``progress(bytes_done, bytes_total)`` as batches arrive.

    Returns:
        The input's fingerprints (rows in no particular order).
    """
    ps, jobs = reader.page_size, options.workers
    nbytes = options.hashed_bytes(ps)
    stored = reader.page_counts()[PageState.DATA]
    # A compressed input is one stream, decoded once (a thread ahead of the hashing, in
    # iter_batches): shards would each decode it from the start.
    shards = (jobs * SHARDS_PER_JOB if jobs > 1 and stored >= PARALLEL_MIN_PAGES
              and reader.source is None else 1)
    # Results go straight into arrays sized for every stored page, a batch at a time, so
    # the table is never held twice; each batch claims the next free rows.
    addrs = np.empty(stored, np.uint64)
    prefix = np.empty(stored, np.uint64)
    claimed = 0
    claiming = threading.Lock()

    def place(a: np.ndarray, p: np.ndarray) -> int:
        nonlocal claimed
        with claiming:
            start = claimed
            claimed += len(a)
        if claimed > stored:
            raise AssertionError(f"{reader.path}: reader yielded more pages than it stores")
        addrs[start : start + len(a)], prefix[start : start + len(a)] = a, p
        return len(a)

    def placed(shard: int, of: int) -> Iterator[int]:
        for a, p in _hash_shard(reader, nbytes, batch_pages, shard, of):
            yield place(a, p)

    if progress is not None:
        progress(0, stored * ps)
    parts: Iterable[list[int]]
    if shards == 1:
        parts = ([n] for n in placed(0, 1))
    elif compiled.reads_in_place([reader]):
        # The kernels hash pages in place without the GIL: threads share the map's page
        # tables and write their rows themselves. Decoding formats need processes.
        parts = imap_threads(lambda k: placed(k, shards), shards, jobs)
    else:
        parts = ([place(a, p) for a, p in part] for part in imap_shards(
            lambda k: list(_hash_shard(reader, nbytes, batch_pages, k, shards)), shards, jobs))
    done = 0
    for counts in parts:
        done += sum(counts)
        if progress is not None:
            progress(done * ps, stored * ps)
    if claimed != stored:
        raise AssertionError(f"{reader.path}: reader yielded {claimed} of {stored} stored pages")
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
        prefix=prefix,
        state_pages=reader.page_counts(),
    )
