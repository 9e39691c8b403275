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

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

from ._parallel import map_shards
from .fingerprint import Fingerprints
from .formats.base import DumpReader
from .settings import DEFAULT_OPTIONS, ProgressCallback, ScanOptions

__all__ = ["UNIQUE", "ZERO", "ContentClasses", "StageStats", "classify"]

ZERO = -1
"""Label of an all-zero page."""
UNIQUE = -2
"""Label of a page whose content occurs nowhere else."""

PARALLEL_MIN_CANDIDATES = 20000
"""Fewer candidates than this are resolved in one process."""
PART_CANDIDATES = 1 << 18
"""Candidates resolved at a time: bounds stage 2's working memory to some 50 MiB."""
_SCAN_ROWS = 1 << 20  # table rows examined at a time while looking for candidates


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
    """What stage 2 found: which stored pages of all inputs hold equal bytes.

    ``labels[i][row]`` is the content of row ``row`` of input ``i``'s fingerprints: a class
    number ``0 .. n_classes - 1`` shared by pages with equal bytes, ``ZERO`` or ``UNIQUE``
    (int32, 4 bytes a stored page).
    """

    labels: list[np.ndarray]
    n_classes: int
    stats: StageStats


def _chunks(n: int) -> Iterator[slice]:
    for start in range(0, n, _SCAN_ROWS):
        yield slice(start, min(n, start + _SCAN_ROWS))


def _shared_prefixes(tables: Sequence[Fingerprints]) -> tuple[np.ndarray, np.ndarray]:
    """Prefix hashes that two or more non-zero pages share (sorted), and how many pages each.

    The hash space is sorted a sixteenth at a time, so the sort needs about half a byte a
    page instead of eight.
    """
    shared, counts = [], []
    for top in range(16):
        parts = []
        for t in tables:
            for sl in _chunks(len(t.prefix)):
                p = t.prefix[sl]
                parts.append(p[((p >> np.uint64(60)) == top) & (p != 0)])
        values = np.concatenate(parts) if parts else np.empty(0, np.uint64)
        del parts
        values.sort()
        uniq, n = np.unique(values, return_counts=True)
        del values
        shared.append(uniq[n > 1])
        counts.append(n[n > 1])
    return np.concatenate(shared), np.concatenate(counts)


def _rows_with_prefix_in(table: Fingerprints, wanted: np.ndarray) -> np.ndarray:
    """Rows of ``table`` whose prefix hash is one of ``wanted`` (sorted)."""
    lo, hi = (wanted[0], wanted[-1]) if len(wanted) else (1, 0)
    rows = [np.empty(0, np.int64)]  # an input with no stored page has no chunk
    for sl in _chunks(len(table.prefix)):
        p = table.prefix[sl]
        maybe = np.flatnonzero((p >= lo) & (p <= hi))
        pos = np.minimum(np.searchsorted(wanted, p[maybe]), len(wanted) - 1)
        rows.append(maybe[wanted[pos] == p[maybe]] + sl.start)
    return np.concatenate(rows)


class _Candidates:
    """Candidate pages of all inputs (parallel arrays) and how to read them one by one.

    Comparing one page at a time in Python beats gathering pages with numpy here: a slice
    of the map is one 4 KiB copy and ``==`` is a memcmp, while fancy indexing copies every
    page two or three times.
    """

    def __init__(
        self, readers: Sequence[DumpReader], source: np.ndarray, locator: np.ndarray
    ) -> None:
        self.page_size = readers[0].page_size if readers else 4096
        # Raw-stored pages are sliced straight from the map (one copy); others are decoded.
        self.maps = [r._mm if type(r).read_pages is DumpReader.read_pages else None
                     for r in readers]
        self.readers = readers
        self.src, self.loc = source.tolist(), locator.tolist()

    def fetch(self, m: int) -> bytes:
        """The bytes of candidate ``m``."""
        s: int = self.src[m]
        o: int = self.loc[m]
        mm = self.maps[s]
        if mm is not None:
            return mm[o : o + self.page_size]
        page: bytes = self.readers[s].read_pages(np.array([o], np.uint64))[0].tobytes()
        return page

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
        # The hot loop of stage 2: locals only, the raw-map case inline.
        src, loc, maps, ps, fetch = self.src, self.loc, self.maps, self.page_size, self.fetch
        differ = []
        rep = b""
        for m, starts_run in zip(members.tolist(), first.tolist(), strict=True):
            mm = maps[src[m]]
            if mm is not None:
                o = loc[m]
                page = mm[o : o + ps]
            else:
                page = fetch(m)
            if starts_run:
                rep = page
            elif page != rep:
                differ.append(m)
        return run, int(run[-1]) + 1, np.array(differ, dtype=np.int64)


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
    tables: Sequence[Fingerprints],
    readers: Sequence[DumpReader],
    options: ScanOptions = DEFAULT_OPTIONS,
    *,
    progress: ProgressCallback | None = None,
) -> ContentClasses:
    """Find which stored pages of all inputs hold byte-identical content.

    Candidates are resolved in parts of about PART_CANDIDATES pages, each part a range of
    prefix hashes.

    Args:
        tables: stage-1 fingerprints, one per input.
        readers: the open readers the tables came from (same order), to read pages again.
        options: ``verify`` (compare bytes before counting two pages as one) and ``jobs``
            (worker processes for large candidate sets).
        progress: called as ``progress(bytes_done, bytes_total)`` over the candidate pages,
            after each part.

    Returns:
        A label per stored page (class number, ``ZERO`` or ``UNIQUE``), the number of
        classes, and stage statistics.
    """
    verify, jobs = options.verify, options.workers
    labels_of = []
    for t in tables:
        content = np.full(len(t.prefix), UNIQUE, np.int32)
        content[t.prefix == 0] = ZERO
        labels_of.append(content)
    shared, counts = _shared_prefixes(tables)
    ends = np.cumsum(counts)
    cuts = [0]
    while cuts[-1] < len(shared):
        target = (ends[cuts[-1] - 1] if cuts[-1] else 0) + PART_CANDIDATES
        cuts.append(max(cuts[-1] + 1, int(np.searchsorted(ends, target, side="right"))))
    n_classes = candidates = false_candidates = compares = collisions = full_hashes = 0
    ps = tables[0].page_size if tables else 0
    total_bytes = int(counts.sum()) * ps
    if progress is not None:
        progress(0, total_bytes)
    for a, b in itertools.pairwise(cuts):
        part = _resolve_part(tables, readers, labels_of, shared[a:b], first_class=n_classes,
                             verify=verify, jobs=jobs)
        labels, n, done = part[0], part[1], part[2:]
        candidates += len(labels)
        false_candidates += int(np.count_nonzero(np.bincount(labels, minlength=n) == 1))
        compares, collisions, full_hashes = (
            x + y for x, y in zip((compares, collisions, full_hashes), done, strict=True)
        )
        n_classes += n
        if progress is not None:
            progress(candidates * ps, total_bytes)
    stats = StageStats(
        pages_hashed=sum(t.nonzero_pages for t in tables),
        prefix_candidates=candidates,
        false_candidates=false_candidates,
        full_hashes=full_hashes,
        full_compares=compares,
        hash_collisions=collisions,
        verified=verify,
    )
    return ContentClasses(labels_of, n_classes, stats)


def _resolve_part(
    tables: Sequence[Fingerprints],
    readers: Sequence[DumpReader],
    labels_of: Sequence[np.ndarray],
    wanted: np.ndarray,
    *,
    first_class: int,
    verify: bool,
    jobs: int,
) -> tuple[np.ndarray, int, int, int, int]:
    """Classify the candidates whose prefix hash is in ``wanted`` and write their classes,
    numbered from ``first_class``, into ``labels_of`` (one array per table).

    Returns the part's labels, its number of classes, compares, collisions, full hashes.
    """
    rows_per_table = [_rows_with_prefix_in(t, wanted) for t in tables]
    source = np.concatenate(
        [np.full(len(r), i, np.int32) for i, r in enumerate(rows_per_table)]
    )
    row = np.concatenate(rows_per_table)
    prefix = np.concatenate([t.prefix[r] for t, r in zip(tables, rows_per_table, strict=True)])
    locator = np.concatenate(
        [t.locators[r] for t, r in zip(tables, rows_per_table, strict=True)]
    )
    del rows_per_table
    # Group by prefix; within a group, read in file order.
    order = np.lexsort((locator, source, prefix))
    source, row, prefix, locator = source[order], row[order], prefix[order], locator[order]
    del order
    starts = np.append(np.flatnonzero(np.r_[True, prefix[1:] != prefix[:-1]]), len(row))
    shards = jobs if len(row) >= PARALLEL_MIN_CANDIDATES else 1
    cuts = _balanced_cuts(starts, shards)
    cands = _Candidates(readers, source, locator)
    if verify:
        parts = map_shards(
            lambda k: _resolve_range(cands, starts, cuts[k], cuts[k + 1]), len(cuts) - 1, jobs
        )
        offsets = np.cumsum([0] + [p[1] for p in parts])
        labels = np.concatenate([p[0] + off for p, off in zip(parts, offsets, strict=False)])
        n = int(offsets[-1])
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
        order, dense = _dense(full, prefix)
        labels = np.empty(len(row), np.int64)
        labels[order] = dense
        n = int(dense[-1]) + 1 if len(dense) else 0
        compares = collisions = 0
        full_hashes = len(row)
    for i, content in enumerate(labels_of):
        mine = source == i
        content[row[mine]] = labels[mine] + first_class
    return labels, n, compares, collisions, full_hashes
