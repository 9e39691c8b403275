"""Stage 2: decide which pages are equal, byte for byte.

Only pages whose prefix hash is shared by two or more non-zero pages (across all inputs) are
candidates. Each candidate gets xxh3-64 of its whole page; candidates with equal
(prefix, full) hashes are grouped, and every member of a group is compared byte for byte with
the group's representative before it is counted as a copy. A member that differs is a hash
collision: it starts a group of its own. With ``verify=False`` the comparison is skipped and
the report says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

from .fingerprint import PageTable
from .formats.base import DumpReader

__all__ = ["ContentClasses", "StageStats", "classify"]

_CHUNK = 4096  # candidate pages handled at a time when pages must be copied out of a reader


@dataclass(frozen=True)
class StageStats:
    """What each stage did; reported so users can see the cost of the partial hash."""

    pages_hashed: int
    """Non-zero stored pages whose prefix was hashed (stage 1)."""
    prefix_candidates: int
    """Pages whose prefix hash is shared with another page: they get a full look."""
    false_candidates: int
    """Candidates whose content turned out unique (prefix equal, content different)."""
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


def _full_hashes(reader: DumpReader, locators: np.ndarray) -> np.ndarray:
    """xxh3-64 of each whole page, read straight from the map when the reader allows it."""
    ps = reader.page_size
    digest = xxhash.xxh3_64_intdigest
    if type(reader).read_pages is DumpReader.read_pages:
        mm = memoryview(reader._mm)  # locators are file offsets into the map
        offs = locators.tolist()
        return np.fromiter((digest(mm[o : o + ps]) for o in offs), np.uint64, len(offs))
    out = np.empty(len(locators), np.uint64)
    for start in range(0, len(locators), _CHUNK):
        pages = reader.read_pages(locators[start : start + _CHUNK])
        flat = memoryview(np.ascontiguousarray(pages).reshape(-1))
        out[start : start + len(pages)] = [
            digest(flat[i * ps : (i + 1) * ps]) for i in range(len(pages))
        ]
    return out


def classify(
    tables: Sequence[PageTable],
    readers: Sequence[DumpReader],
    *,
    verify: bool = True,
    progress: Callable[[int], None] | None = None,
) -> ContentClasses:
    """Group candidate pages of all inputs into classes of byte-identical content.

    Args:
        tables: stage-1 fingerprints, one per input.
        readers: the open readers the tables came from (same order), to read pages again.
        verify: compare bytes before counting two pages as one (on by default).
        progress: called with bytes processed.

    Returns:
        The content classes of all candidate pages, with stage statistics.
    """
    rows_per_table = _candidates(tables)
    sources, rows, prefixes, fulls = [], [], [], []
    for i, (table, reader, rws) in enumerate(zip(tables, readers, rows_per_table, strict=True)):
        if rws.size == 0:
            continue
        # Read candidates in locator order: sequential access through the file.
        order = np.argsort(table.locators[rws], kind="stable")
        rws = rws[order]
        fulls.append(_full_hashes(reader, table.locators[rws]))
        sources.append(np.full(rws.size, i, np.int32))
        rows.append(rws)
        prefixes.append(table.prefix[rws])
        if progress is not None:
            progress(int(rws.size) * table.page_size)
    pages_hashed = sum(t.nonzero_pages for t in tables)
    if not rows:
        empty = np.empty(0, np.int64)
        stats = StageStats(pages_hashed, 0, 0, 0, 0, verify)
        return ContentClasses(empty.astype(np.int32), empty, empty, 0, stats)
    source = np.concatenate(sources)
    row = np.concatenate(rows)
    prefix = np.concatenate(prefixes)
    full = np.concatenate(fulls)
    del sources, rows, prefixes, fulls

    order = np.lexsort((full, prefix))
    source, row, prefix, full = source[order], row[order], prefix[order], full[order]
    new_group = np.ones(len(row), dtype=bool)
    new_group[1:] = (prefix[1:] != prefix[:-1]) | (full[1:] != full[:-1])
    klass = np.cumsum(new_group) - 1
    n_classes = int(klass[-1]) + 1 if len(klass) else 0
    compares = collisions = 0
    if verify:
        klass, n_classes, compares, collisions = _verify(
            tables, readers, source, row, klass, n_classes
        )
    counts = np.bincount(klass, minlength=n_classes)
    false_candidates = int((counts == 1).sum())
    stats = StageStats(
        pages_hashed=pages_hashed,
        prefix_candidates=len(row),
        false_candidates=false_candidates,
        full_compares=compares,
        hash_collisions=collisions,
        verified=verify,
    )
    return ContentClasses(source, row, klass.astype(np.int64), n_classes, stats)


def _page_getter(reader: DumpReader) -> Callable[[int], bytes]:
    """A function from locator to page bytes: a slice of the map when the reader allows."""
    ps = reader.page_size
    if type(reader).read_pages is DumpReader.read_pages:
        mm = reader._mm  # locators are file offsets into the map
        return lambda loc: mm[loc : loc + ps]
    return lambda loc: reader.read_pages(np.array([loc], np.uint64))[0].tobytes()


def _verify(
    tables: Sequence[PageTable],
    readers: Sequence[DumpReader],
    source: np.ndarray,
    row: np.ndarray,
    klass: np.ndarray,
    n_classes: int,
) -> tuple[np.ndarray, int, int, int]:
    """Compare every member of each multi-page group with its representative's bytes.

    Returns the corrected classes, their number, the compares made and the collisions found.
    """
    getters = [_page_getter(r) for r in readers]
    locator = np.empty(len(row), np.uint64)
    for i, table in enumerate(tables):
        mine = source == i
        locator[mine] = table.locators[row[mine]]
    first = np.r_[True, klass[1:] != klass[:-1]]
    rep_of = np.maximum.accumulate(np.where(first, np.arange(len(klass)), 0))
    members = np.flatnonzero(~first)
    src_l, loc_l, rep_l = source.tolist(), locator.tolist(), rep_of.tolist()
    mismatched: list[int] = []
    current, rep_bytes = -1, b""
    for m in members.tolist():
        r = rep_l[m]
        if r != current:
            current, rep_bytes = r, getters[src_l[r]](loc_l[r])
        if getters[src_l[m]](loc_l[m]) != rep_bytes:
            mismatched.append(m)
    compares = len(members)
    if not mismatched:
        return klass, n_classes, compares, 0
    # Hash collisions: regroup the mismatched pages of each group by exact bytes. This never
    # happened in any run so far, but the count must be right if it does.
    klass = klass.copy()
    by_group: dict[int, list[int]] = {}
    for m in mismatched:
        by_group.setdefault(rep_l[m], []).append(m)
    for pending in by_group.values():
        while pending:
            head, rest = pending[0], pending[1:]
            head_bytes = getters[src_l[head]](loc_l[head])
            klass[head] = n_classes
            still = []
            for m in rest:
                compares += 1
                if getters[src_l[m]](loc_l[m]) == head_bytes:
                    klass[m] = n_classes
                else:
                    still.append(m)
            n_classes += 1
            pending = still
    _, klass = np.unique(klass, return_inverse=True)  # dense numbering again
    return klass, int(klass.max()) + 1, compares, len(mismatched)
