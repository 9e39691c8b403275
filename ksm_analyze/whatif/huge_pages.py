"""What if merging kept transparent huge pages whole: only identical 2 MiB pages merge.

KSM merges 4 KiB pages and splits the huge page holding any page it merges
(``mm/ksm.c``: ``try_to_merge_one_page()`` calls ``split_huge_page()`` on a subpage of a
large folio before ``write_protect_page()``/``replace_page()``; no kernel merges a large
folio whole). This module prices the other way round, from the same inputs:

* a *huge page* is a 2 MiB-aligned region of an input (by the page addresses its
  fingerprints carry) all of whose pages are present and in KSM's scope; its content is the
  sequence of its pages' content labels (stage 2's exact content ids, the zero page one
  label), so two regions are identical exactly when their label sequences are equal
  (compared whole, no hash). Merging only those saves ``huge pages - distinct contents``
  2 MiB pages, within each input and across all inputs (the host);
* the THPs KSM would split: huge pages holding at least one page KSM would merge (a zero
  page, or a content with two or more scanned pages on the host). Live snapshots and live
  fingerprints of processes record which pages a THP maps (kpageflags bit 22, or
  PAGEMAP_SCAN's PAGE_IS_HUGE): a THP there is a huge page all of whose pages are so
  flagged (``basis`` ``recorded``). A guest dump cannot tell how the host backs its RAM:
  every huge page counts as a THP, as QEMU guest RAM usually is (``basis``
  ``if_thp_backed``), and so do process cores and snapshots without page flags.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..columns import Columns
from ..eligibility import Scope, excluded_by
from ..hashing.stage1 import Fingerprints
from ..hashing.stage2 import UNIQUE, ZERO
from ..ksm import KsmSettings, saved_pages
from ..pages import MapFlags, PageState

__all__ = ["HUGE_PAGES_COLUMNS", "HUGE_PAGE_BYTES", "HugeRegions", "empty_table",
           "huge_regions", "ksm_saved_alone"]

HUGE_PAGE_BYTES = 2 << 20
"""A PMD-mapped transparent huge page on x86-64 and arm64 with 4 KiB pages."""

HUGE_PAGES_COLUMNS = ("input", "basis", "huge_pages", "zero_huge_pages", "distinct_huge_pages",
                      "ksm_saved_pages", "ksm_saved_bytes", "thp_intact_saved_pages",
                      "thp_intact_saved_bytes", "split_cost_pages", "split_cost_bytes",
                      "thp_huge_pages", "split_huge_pages")
"""The columns of the ``huge_pages`` table (docs/model.md, "Huge pages")."""

RECORDED, IF_THP_BACKED = "recorded", "if_thp_backed"
CHUNK_ROWS = 1 << 18
"""Rows a step (1 GiB of 4 KiB pages): the what-if holds a few bytes a row of one chunk, not
of the input (docs/model.md, "Memory")."""
MAX_PASSES = 64
"""Passes over rows in no address order (each sorts the rows of one address range)."""


@dataclass(frozen=True)
class _Input:
    """One input's huge pages: counts, and the label rows of those neither all zero nor
    holding a page seen once (each distinct once)."""

    huge_pages: int
    zero: int
    unique: int
    others: np.ndarray
    thps: int
    split: int
    basis: str

    @property
    def distinct(self) -> int:
        return int(self.zero > 0) + self.unique + len(self.others)


@dataclass(frozen=True)
class HugeRegions:
    """The 2 MiB pages of every input (:func:`huge_regions`), before the 4 KiB figures are
    set beside them (:meth:`table`)."""

    inputs: list[_Input]
    host_distinct: int
    page_size: int

    def table(self, paths: Sequence[str], ksm_saved: Sequence[int], host_ksm_saved: int
              ) -> Columns:
        """The ``huge_pages`` table: a row per input (``paths``, and what KSM saves merging
        4 KiB pages within each alone, ``ksm_saved``), then the host row (``input``
        ``host``; ``host_ksm_saved``: the savings table's ``saved``)."""
        per_huge = HUGE_PAGE_BYTES // self.page_size if self.page_size else 0
        rows = []
        for path, r, saved in zip(paths, self.inputs, ksm_saved, strict=True):
            rows.append(self._row(path, r.basis, r.huge_pages, r.zero, r.distinct, saved,
                                  r.thps, r.split, per_huge))
        bases = {r.basis for r in self.inputs}
        rows.append(self._row(
            "host", bases.pop() if len(bases) == 1 else "mixed",
            sum(r.huge_pages for r in self.inputs), sum(r.zero for r in self.inputs),
            self.host_distinct, host_ksm_saved, sum(r.thps for r in self.inputs),
            sum(r.split for r in self.inputs), per_huge))
        return Columns.from_records(rows, HUGE_PAGES_COLUMNS)

    def _row(self, name: str, basis: str, huge: int, zero: int, distinct: int,
             ksm_saved: int, thps: int, split: int, per_huge: int) -> dict[str, object]:
        intact = (huge - distinct) * per_huge
        ps = self.page_size
        return {"input": name, "basis": basis, "huge_pages": huge, "zero_huge_pages": zero,
                "distinct_huge_pages": distinct, "ksm_saved_pages": int(ksm_saved),
                "ksm_saved_bytes": int(ksm_saved) * ps, "thp_intact_saved_pages": intact,
                "thp_intact_saved_bytes": intact * ps,
                "split_cost_pages": int(ksm_saved) - intact,
                "split_cost_bytes": (int(ksm_saved) - intact) * ps,
                "thp_huge_pages": thps, "split_huge_pages": split}


def empty_table() -> Columns:
    """The table not computed (out of core: a warning says so)."""
    return Columns({c: [] for c in HUGE_PAGES_COLUMNS})


def ksm_saved_alone(self_sharing: Sequence[int], zero_pages: Sequence[int],
                    ksm: KsmSettings) -> list[int]:
    """What KSM saves merging 4 KiB pages within each input alone: its self-sharing
    (``per_input``'s ``self_sharing_pages``) plus its zero pages merged (all of them with
    ``use_zero_pages``, else into one KSM page per ``max_page_sharing`` copies)."""
    return [int(s) + (int(z) if ksm.use_zero_pages
                      else saved_pages(np.array([z], np.int64), ksm.max_page_sharing))
            for s, z in zip(self_sharing, zero_pages, strict=True)]


def huge_regions(prints: Sequence[Fingerprints], labels: Sequence[np.ndarray],
                 n_classes: int, scope: Scope) -> HugeRegions:
    """Every input's 2 MiB pages under ``scope``: how many, how many distinct within it and
    on the host, and the THPs KSM would split.

    Args:
        prints: stage 1's fingerprints, one per input.
        labels: stage 2's content label per fingerprint row (``ContentClasses.labels``).
        n_classes: the number of content classes (``ContentClasses.n_classes``).
        scope: what KSM scans (``options.scope``).
    """
    page_size = prints[0].page_size if prints else 4096
    # A content KSM merges: two or more scanned pages hold it on the host (all inputs).
    copies = np.zeros(max(n_classes, 0) + 1, np.int64)
    in_scope = []
    for fp, lab in zip(prints, labels, strict=True):
        ok, thp = _row_facts(fp, scope)
        in_scope.append((ok, thp))
        for lo in range(0, len(lab), CHUNK_ROWS):  # no temporary of every row
            kept = lab[lo : lo + CHUNK_ROWS]
            if ok is not None:
                kept = kept[ok[lo : lo + CHUNK_ROWS]]
            copies += np.bincount(kept[kept >= 0], minlength=len(copies))[: len(copies)]
    duplicated = copies >= 2
    inputs = [_one_input(fp, lab, ok, thp, duplicated, scope)
              for fp, lab, (ok, thp) in zip(prints, labels, in_scope, strict=True)]
    others = [r.others for r in inputs if len(r.others)]
    # Each input's rows are distinct already: only rows from two inputs can be equal.
    across = (len(np.unique(np.concatenate(others), axis=0)) if len(others) > 1
              else sum(map(len, others)))
    host_distinct = (int(any(r.zero for r in inputs)) + sum(r.unique for r in inputs)
                     + across)
    return HugeRegions(inputs, host_distinct, page_size)


def _row_facts(fp: Fingerprints, scope: Scope) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Bool per fingerprint row, None where it holds for every row: KSM's scope holds it
    (before the ``thp_zero`` rule: a THP kept whole is not split, so its zero subpages stay
    in it); and a THP maps it (None also where none is)."""
    data = sorted((e for e in fp.extents if e.state == PageState.DATA), key=lambda e: e.addr)
    ok = np.array([excluded_by(e, scope) is None for e in data], bool)
    thp = np.array([bool(e.flags & MapFlags.THP) for e in data], bool)
    if ok.all() and not thp.any():  # a guest dump: no per-row column
        return None, None
    starts = np.array([e.addr for e in data], np.uint64)
    row_ok = None if ok.all() else np.empty(len(fp.addrs), bool)
    row_thp = np.empty(len(fp.addrs), bool) if thp.any() else None
    for lo in range(0, len(fp.addrs), CHUNK_ROWS):  # no index of every row
        at = np.searchsorted(starts, fp.addrs[lo : lo + CHUNK_ROWS], side="right") - 1
        if row_ok is not None:
            row_ok[lo : lo + CHUNK_ROWS] = ok[at]
        if row_thp is not None:
            row_thp[lo : lo + CHUNK_ROWS] = thp[at]
    return row_ok, row_thp


def _recorded(fp: Fingerprints) -> bool:
    """Whether the input records which pages THPs map: a live snapshot or fingerprint of a
    process whose page flags were read (kpageflags or PAGEMAP_SCAN)."""
    return (fp.address_space == "virtual"
            and fp.info.get("pfn_flags") in ("kpageflags", "pagemap_scan"))


@dataclass
class _Tally:
    """What the chunks of one input found so far."""

    huge_pages: int = 0
    zero: int = 0
    unique: int = 0
    thps: int = 0
    split: int = 0
    others: list[np.ndarray] = field(default_factory=list)


_Rows = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]
"""Rows: addresses, labels, in scope (None: all), THP-mapped (None: none)."""


def _one_input(fp: Fingerprints, labels: np.ndarray, ok: np.ndarray | None,
               thp_rows: np.ndarray | None, duplicated: np.ndarray, scope: Scope) -> _Input:
    ps = fp.page_size
    recorded = _recorded(fp)
    basis = RECORDED if recorded else IF_THP_BACKED
    if HUGE_PAGE_BYTES % ps or ps == HUGE_PAGE_BYTES:  # no 4 KiB-like pages
        return _Input(0, 0, 0, np.empty((0, 1), np.int32), 0, 0, basis)
    n = HUGE_PAGE_BYTES // ps
    thp_rows = thp_rows if recorded else None
    tally = _Tally()
    zero = _zero_rows(fp, scope, recorded, tally)
    rows = (fp.addrs, labels, ok, thp_rows)
    addrs = fp.addrs
    in_order = len(addrs) < 2 or bool((addrs[1:] > addrs[:-1]).all())
    for lo, hi in _ranges(addrs, zero[0], in_order):
        if in_order:  # a slice of the rows: views, no copy
            a, b = np.searchsorted(addrs, np.array([lo, hi], np.uint64)).tolist()
            part = _cut(rows, slice(a, b))
        else:
            part = _cut(rows, _select(addrs, lo, hi))
        a, b = np.searchsorted(zero[0], np.array([lo, hi], np.uint64)).tolist()
        extra = _cut(zero, slice(a, b))
        if len(extra[0]) or not in_order:
            part = _sorted(_join(part, extra))
        _count_regions(part, n, duplicated, recorded, tally)
    others = (np.unique(np.concatenate(tally.others), axis=0) if len(tally.others) > 1
              else tally.others[0] if tally.others else np.empty((0, n), np.int32))
    return _Input(tally.huge_pages, tally.zero, tally.unique, others, tally.thps,
                  tally.split, basis)


def _zero_rows(fp: Fingerprints, scope: Scope, recorded: bool, tally: _Tally) -> _Rows:
    """Pages the format marks zero have no rows: whole huge pages inside such an extent are
    counted into ``tally`` here; the pages of its ends come back as rows (address order)."""
    ps = fp.page_size
    addrs, flags = [], []
    for e in fp.extents:
        if e.state != PageState.ZERO or excluded_by(e, scope) is not None:
            continue
        start, end = e.addr, e.addr + e.npages * ps
        lo = -(-start // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
        hi = end // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
        pieces = [(start, end)]
        if lo < hi:
            full = (hi - lo) // HUGE_PAGE_BYTES
            tally.huge_pages += full
            tally.zero += full
            thp = full if not recorded or e.flags & MapFlags.THP else 0
            tally.thps += thp
            tally.split += thp  # zero pages merge
            pieces = [(start, lo), (hi, end)]
        for a, b in pieces:
            if b > a:
                addrs.append(np.arange(a, b, ps, dtype=np.uint64))
                flags.append(np.full(len(addrs[-1]), bool(e.flags & MapFlags.THP)))
    addr = np.concatenate(addrs) if addrs else np.empty(0, np.uint64)
    order = np.argsort(addr, kind="stable")
    return (addr[order], np.full(len(addr), ZERO, np.int32), None,
            np.concatenate(flags)[order] if recorded and flags else None)


def _ranges(addrs: np.ndarray, zero: np.ndarray, in_order: bool) -> list[tuple[int, int]]:
    """Address ranges, on 2 MiB boundaries, of about :data:`CHUNK_ROWS` rows each (at most
    :data:`MAX_PASSES` where the rows are in no order: each range is a pass over them)."""
    total = len(addrs) + len(zero)
    parts = -(-total // CHUNK_ROWS)
    if not in_order:
        parts = min(parts, MAX_PASSES)
    end = (1 << 64) - 1  # no page starts there
    if parts <= 1:
        return [(0, end)]
    step = max(1, total // (parts * 64))
    sample = np.sort(np.concatenate([addrs[::step], zero[::step]]))
    cuts = sample[(np.arange(1, parts) * len(sample)) // parts] & ~np.uint64(HUGE_PAGE_BYTES - 1)
    edges = [0, *np.unique(cuts[cuts > 0]).tolist(), end]
    return list(itertools.pairwise(edges))


def _select(addrs: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Rows with ``lo <= address < hi``, a chunk of rows at a time (no full-size temporary
    but the one bool a row)."""
    inside = np.empty(len(addrs), bool)
    low, high = np.uint64(lo), np.uint64(hi)
    for at in range(0, len(addrs), CHUNK_ROWS):
        a = addrs[at : at + CHUNK_ROWS]
        np.logical_and(a >= low, a < high, out=inside[at : at + CHUNK_ROWS])
    return np.flatnonzero(inside)


def _cut(rows: _Rows, which: slice | np.ndarray) -> _Rows:
    return (rows[0][which], rows[1][which], None if rows[2] is None else rows[2][which],
            None if rows[3] is None else rows[3][which])


def _join(a: _Rows, b: _Rows) -> _Rows:
    if not len(b[0]):
        return a

    def column(k: int, fill: bool) -> np.ndarray | None:
        x, y = a[k], b[k]
        if x is None and y is None:
            return None
        return np.concatenate([x if x is not None else np.full(len(a[0]), fill),
                               y if y is not None else np.full(len(b[0]), fill)])

    return (np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]]), column(2, True),
            column(3, False))


def _sorted(rows: _Rows) -> _Rows:
    return _cut(rows, np.argsort(rows[0], kind="stable"))


def _count_regions(chunk: _Rows, n: int, duplicated: np.ndarray, recorded: bool,
                   tally: _Tally) -> None:
    """Add the whole 2 MiB regions of ``chunk`` (rows in address order) to ``tally``."""
    addr, lab, ok, thp = chunk
    if not len(addr):
        return
    region = addr >> np.uint64(HUGE_PAGE_BYTES.bit_length() - 1)
    starts = np.flatnonzero(np.r_[True, region[1:] != region[:-1]])
    lengths = np.diff(np.r_[starts, len(addr)])
    complete = starts[lengths == n]  # addresses are distinct: n of them fill the region
    take = (complete[:, None] + np.arange(n)).ravel()
    grid = lab[take].reshape(-1, n)
    keep = None if ok is None else ok[take].reshape(-1, n).all(axis=1)
    if keep is not None:  # a page out of scope: not a huge page KSM would see whole
        grid = grid[keep]
    zero_page = grid == ZERO
    # A page KSM merges: a zero page, or a content with two or more scanned pages.
    any_merge = (zero_page | ((grid >= 0) & duplicated[np.maximum(grid, 0)])).any(axis=1)
    if not recorded:
        is_thp = np.ones(len(grid), bool)
    elif thp is None:
        is_thp = np.zeros(len(grid), bool)
    else:
        is_thp = thp[take].reshape(-1, n).all(axis=1)
        is_thp = is_thp if keep is None else is_thp[keep]
    zero = zero_page.all(axis=1)
    unique = (grid == UNIQUE).any(axis=1)  # a page seen nowhere else: so is its region
    rest = grid[~zero & ~unique]
    tally.huge_pages += len(grid)
    tally.zero += int(zero.sum())
    tally.unique += int(unique.sum())
    tally.thps += int(is_thp.sum())
    tally.split += int((is_thp & any_merge).sum())
    if len(rest):
        tally.others.append(np.unique(rest, axis=0))
