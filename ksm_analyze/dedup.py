"""Stage 2: decide which pages are equal, byte for byte.

Only pages whose prefix hash is shared by two or more non-zero pages (across all inputs) are
candidates. Candidates are grouped by prefix hash, and each member of a group is compared
byte for byte with the group's first page. Where that finds pages that differ (equal
prefixes, different pages: "false candidates"), those pages get xxh3-64 of the whole page,
are bucketed by it, and each bucket is compared byte for byte again; a page whose full hash
matches but whose bytes do not is a hash collision and starts a class of its own. So two
pages are counted as one only if their bytes are equal.

With ``verify=False`` no page is compared: candidates are grouped by (prefix, full) hash,
and the report says so with the collision bound.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

from ._parallel import map_shards
from .fingerprint import PageTable
from .formats.base import DumpReader

__all__ = ["ContentClasses", "StageStats", "classify"]

PARALLEL_MIN_CANDIDATES = 20000
"""Fewer candidates than this are resolved in one process."""


@dataclass(frozen=True)
class StageStats:
    """What each stage did; reported so users can see the cost of the partial hash."""

    pages_hashed: int
    """Non-zero stored pages whose prefix was hashed (stage 1)."""
    prefix_candidates: int
    """Pages whose prefix hash is shared with another page: they get a full look."""
    false_candidates: int
    """Candidates whose content turned out unique (prefix equal, content different)."""
    full_hashes: int
    """Candidates whose whole page was hashed to sort out different pages."""
    full_compares: int
    """Byte-for-byte page comparisons made (0 with verify off)."""
    hash_collisions: int
    """Pages with equal prefix and full hashes but different bytes."""
    verified: bool


@dataclass(frozen=True)
class ContentClasses:
    """Content identity of every candidate page; a non-candidate page is unique content.

    Arrays are parallel, one entry per candidate page.
    """

    source: np.ndarray
    """int32 index of the input (PageTable) the page belongs to."""
    row: np.ndarray
    """int64 row of the page in its PageTable."""
    klass: np.ndarray
    """int64 content class, 0..n_classes-1; equal class means equal bytes."""
    n_classes: int
    stats: StageStats


def _candidates(tables: Sequence[PageTable]) -> list[np.ndarray]:
    """Per table, the rows whose prefix hash occurs on two or more non-zero pages overall."""
    nonzero = [t.prefix[~t.zero] for t in tables]
    allp = np.sort(np.concatenate(nonzero)) if nonzero else np.empty(0, np.uint64)
    del nonzero
    shared = np.unique(allp[1:][allp[1:] == allp[:-1]])
    del allp
    out = []
    for t in tables:
        if shared.size == 0:
            out.append(np.empty(0, np.int64))
            continue
        pos = np.minimum(np.searchsorted(shared, t.prefix), shared.size - 1)
        out.append(np.flatnonzero((shared[pos] == t.prefix) & ~t.zero))
    return out


class _Candidates:
    """Candidate pages of all inputs (parallel arrays) and how to read them one by one.

    Comparing one page at a time in Python beats gathering pages with numpy here: a slice
    of the map is one 4 KiB copy and ``==`` is a memcmp, while fancy indexing copies every
    page two or three times.
    """

    def __init__(
        self, readers: Sequence[DumpReader], source: np.ndarray, locator: np.ndarray
    ) -> None:
        getters = [_page_getter(r) for r in readers]
        src, loc = source.tolist(), locator.tolist()
        self.fetch: Callable[[int], bytes] = lambda m: getters[src[m]](loc[m])

    def full_hashes(self, idx: np.ndarray) -> np.ndarray:
        """xxh3-64 of the whole page of each candidate ``idx``."""
        fetch, digest = self.fetch, xxhash.xxh3_64_intdigest
        return np.fromiter((digest(fetch(m)) for m in idx.tolist()), np.uint64, len(idx))

    def peel(self, members: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
        """Compare each member with the first member of its run of equal ``key``.

        ``members`` must be ordered so equal keys are adjacent. Returns a run number for
        every member (meaningful for those equal to their run's first), the number of runs,
        and the members whose bytes differ from their run's first.
        """
        if not len(members):
            return np.empty(0, np.int64), 0, members
        first = np.r_[True, key[1:] != key[:-1]]
        run = np.cumsum(first) - 1
        fetch = self.fetch
        differ = []
        rep = b""
        for m, starts_run in zip(members.tolist(), first.tolist(), strict=True):
            if starts_run:
                rep = fetch(m)
            elif fetch(m) != rep:
                differ.append(m)
        return run, int(run[-1]) + 1, np.array(differ, dtype=np.int64)


def _page_getter(reader: DumpReader) -> Callable[[int], bytes]:
    """A function from locator to page bytes: a slice of the map when pages are stored raw."""
    ps = reader.page_size
    if type(reader).read_pages is DumpReader.read_pages:
        mm = reader._mm  # locators are file offsets into the map
        return lambda loc: mm[loc : loc + ps]
    return lambda loc: reader.read_pages(np.array([loc], np.uint64))[0].tobytes()


def _dense(*keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An order sorting by ``keys`` (last is primary) and a dense id per distinct key tuple."""
    order = np.lexsort(keys)
    sorted_keys = [k[order] for k in keys]
    new = np.zeros(len(order), dtype=bool)
    if len(order):
        new[0] = True
        for k in sorted_keys:
            new[1:] |= k[1:] != k[:-1]
    return order, np.cumsum(new) - 1


def _resolve_range(
    cands: _Candidates, starts: np.ndarray, lo: int, hi: int
) -> tuple[np.ndarray, int, int, int, int]:
    """Split groups ``lo..hi-1`` of equal prefix hash into classes of equal bytes.

    Group ``g`` spans candidates ``starts[g]:starts[g+1]``. Returns a class label (local to
    this range) for each candidate of the range, the number of classes, and the compares,
    hash collisions and full hashes made.
    """
    first, last = int(starts[lo]), int(starts[hi])
    members = np.arange(first, last)
    group = np.repeat(np.arange(hi - lo), np.diff(starts[lo : hi + 1]))
    labels, n, rest = cands.peel(members, group)
    compares = len(members) - n
    full_hashes = collisions = 0
    if rest.size:
        # Equal prefixes, different pages: bucket them by full hash within their group and
        # compare each bucket with its first page again.
        full_hashes = len(rest)
        order, key = _dense(cands.full_hashes(rest), group[rest - first])
        rest = rest[order]
        sub, nsub, rest_next = cands.peel(rest, key)
        labels[rest - first] = sub + n
        n += nsub
        compares += len(rest) - nsub
        rest = rest_next
    while rest.size:
        # Equal full hashes, different bytes: a real collision. Split by bytes alone, each
        # round settling at least the first page of every bucket.
        collisions += len(rest)
        bucket = labels[rest - first]
        order = np.argsort(bucket, kind="stable")
        rest, bucket = rest[order], bucket[order]
        sub, nsub, rest_next = cands.peel(rest, bucket)
        labels[rest - first] = sub + n
        n += nsub
        compares += len(rest) - nsub
        rest = rest_next
    return labels, n, compares, collisions, full_hashes


def _balanced_cuts(starts: np.ndarray, shards: int) -> list[int]:
    """Group indices splitting the groups into ``shards`` runs of about equal members."""
    ngroups = len(starts) - 1
    targets = np.linspace(0, starts[-1], shards + 1)[1:-1]
    inner = np.searchsorted(starts[:-1], targets).tolist()
    return sorted({0, *inner, ngroups})


def classify(
    tables: Sequence[PageTable],
    readers: Sequence[DumpReader],
    *,
    verify: bool = True,
    jobs: int = 1,
) -> ContentClasses:
    """Group candidate pages of all inputs into classes of byte-identical content.

    Args:
        tables: stage-1 fingerprints, one per input.
        readers: the open readers the tables came from (same order), to read pages again.
        verify: compare bytes before counting two pages as one (on by default).
        jobs: worker processes for large candidate sets.

    Returns:
        The content classes of all candidate pages, with stage statistics.
    """
    rows_per_table = _candidates(tables)
    pages_hashed = sum(t.nonzero_pages for t in tables)
    source = np.concatenate(
        [np.full(r.size, i, np.int32) for i, r in enumerate(rows_per_table)] or [[]]
    ).astype(np.int32)
    row = np.concatenate(rows_per_table or [[]]).astype(np.int64)
    prefix = np.concatenate(
        [t.prefix[r] for t, r in zip(tables, rows_per_table, strict=True)] or [[]]
    ).astype(np.uint64)
    locator = np.concatenate(
        [t.locators[r] for t, r in zip(tables, rows_per_table, strict=True)] or [[]]
    ).astype(np.uint64)
    if not len(row):
        stats = StageStats(pages_hashed, 0, 0, 0, 0, 0, verify)
        return ContentClasses(source, row, row.copy(), 0, stats)
    # Group by prefix; within a group, read in file order.
    order = np.lexsort((locator, source, prefix))
    source, row, prefix, locator = source[order], row[order], prefix[order], locator[order]
    starts = np.flatnonzero(np.r_[True, prefix[1:] != prefix[:-1]])
    starts = np.append(starts, len(row))
    shards = jobs if len(row) >= PARALLEL_MIN_CANDIDATES else 1
    cuts = _balanced_cuts(starts, shards)

    cands = _Candidates(readers, source, locator)
    if verify:
        parts = map_shards(
            lambda k: _resolve_range(cands, starts, cuts[k], cuts[k + 1]), len(cuts) - 1, jobs
        )
        offsets = np.cumsum([0] + [p[1] for p in parts])
        klass = np.concatenate([p[0] + off for p, off in zip(parts, offsets, strict=False)])
        n_classes = int(offsets[-1])
        compares = sum(p[2] for p in parts)
        collisions = sum(p[3] for p in parts)
        full_hashes = sum(p[4] for p in parts)
    else:
        bounds = [int(starts[c]) for c in cuts]
        full = np.concatenate(
            map_shards(
                lambda k: cands.full_hashes(np.arange(bounds[k], bounds[k + 1])),
                len(bounds) - 1,
                jobs,
            )
        )
        order, klass = _dense(full, prefix)
        source, row = source[order], row[order]
        n_classes = int(klass[-1]) + 1
        compares = collisions = 0
        full_hashes = len(row)
    counts = np.bincount(klass, minlength=n_classes)
    stats = StageStats(
        pages_hashed=pages_hashed,
        prefix_candidates=len(row),
        false_candidates=int((counts == 1).sum()),
        full_hashes=full_hashes,
        full_compares=compares,
        hash_collisions=collisions,
        verified=verify,
    )
    return ContentClasses(source, row, klass.astype(np.int64), n_classes, stats)
