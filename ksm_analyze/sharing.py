"""Who shares with whom, what is shared, and where: the tables behind ``report``.

Three tables, built from the core :class:`~ksm_analyze.content_table.ContentTable` (and, for
where pages lie, the labels of stage 2 and the scan masks):

* ``pairwise``: for each ordered pair of inputs that share, the non-zero pages of one whose
  content also occurs in the other, and what KSM would save on top if only those two shared
  a host (pairs that share nothing are left out; at most ``top`` pairs per input are kept);
* ``top_contents``: the most duplicated contents, each with a SHA-256, its copies, the
  inputs it occurs in and a class (zero, repeated byte, repeated pattern, low entropy,
  other). Page bytes are never put in it unless asked for: memory dumps hold secrets;
* ``address_map``: each input's pages, in address order, cut into bins and counted per
  kind (zero, unique, duplicated within the input, duplicated across inputs, ...), so a
  chart can show where in the address space the sharing lies.

Zero pages are left out of ``pairwise``: the savings table has them in a row of their own,
and they would make every pair of guests look alike. Each table is returned as plain
:class:`~ksm_analyze.columns.Columns` (no pandas).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .columns import Columns
from .content_table import ContentTable
from .eligibility import ScanMask, Scope, excluded_by
from .formats.base import DumpReader
from .hashing.stage1 import Fingerprints
from .hashing.stage2 import UNIQUE, ZERO, ContentClasses
from .ksm import ROWS_AT_ONCE, content_chunks, row_digests, run_ranks
from .pages import PageState
from .units import human_bytes, short_names

__all__ = [
    "ADDRESS_KINDS",
    "CLUSTER_DROP",
    "CONTENT_HEAD_BYTES",
    "Pairs",
    "address_map",
    "classify_content",
    "clusters",
    "pairwise",
    "top_contents",
    "twin_warnings",
]

CONTENT_HEAD_BYTES = 64
"""Bytes of each top content shown with ``show_content`` (hex), from the page's start."""
LOW_ENTROPY_BITS = 2.0
"""Shannon entropy (bits per byte) under which a page counts as low entropy."""
ADDRESS_BINS = 256
"""Bins per input in ``address_map`` (fewer when the input has fewer pages)."""
ADDRESS_KINDS = (
    "zero_pages",
    "unique_pages",
    "duplicate_within_pages",
    "duplicate_across_pages",
    "ineligible_pages",
    "not_stored_pages",
)
"""Columns of ``address_map`` that count pages, in the order charts stack them."""
TWIN_SHARE = 0.9
"""Two inputs are nearly the same when at least this share of the smaller one's non-zero
pages also occur in the other (one guest given twice, or in two formats)."""
TWINS_SHOWN = 5
"""Pairs of nearly identical inputs named one by one; more are counted in one line."""

# include/linux/poison.h and mm/slub.c: bytes the kernel fills freed or guarded memory with.
_POISON = {
    0x5A: "POISON_INUSE",
    0x6B: "POISON_FREE",
    0xA5: "POISON_END",
    0xAA: "PAGE_POISON",
    0xBB: "SLUB_RED_INACTIVE",
    0xCC: "SLUB_RED_ACTIVE or x86 int3 padding",
    0xFF: "all ones",
}


_PAIRS_AT_ONCE = 1 << 18
"""Pair terms (a group's input paired with another of its inputs) made at a time by
:func:`pairwise` (its working memory: a few arrays of this length)."""
_CELLS_AT_ONCE = 1 << 18
"""Pairs of inputs summed at a time in dense arrays by :func:`pairwise` (a block of inputs
A times every input B); a block whose pair terms are far fewer is summed sparsely."""


@dataclass(frozen=True)
class Pairs:
    """What :func:`pairwise` finds.

    Attributes:
        rows: the ``pairwise`` table (see :func:`pairwise`).
        names: each input's short name, in table order.
        sharing: ordered pairs of inputs that share a non-zero content (every pair the
            table would hold without a bound).
        top: the bound the table was cut to (pairs kept per input A), or 0 (none).
        twins: every pair of nearly identical inputs (:data:`TWIN_SHARE`), found before
            the cut: ``(smaller, other, its non-zero pages, of those also in other)``,
            in ``itertools.combinations`` order of inputs.
    """

    rows: Columns
    names: list[str]
    sharing: int
    top: int
    twins: list[tuple[int, int, int, int]]

    @property
    def left_out(self) -> int:
        """Sharing pairs the bound left out of ``rows``."""
        return self.sharing - len(self.rows)

    def note(self) -> str | None:
        """The line saying how many pairs the bound left out, or None when none was."""
        if not self.left_out:
            return None
        return (f"pairwise: {self.left_out:,} of the {self.sharing:,} ordered pairs of inputs "
                f"that share pages are left out; it keeps, for each input, the {self.top:,} "
                "inputs holding most of its non-zero pages (--pairs-top; 0 keeps every pair)")


def pairwise(table: ContentTable, *, max_page_sharing: int, top: int = 0) -> Pairs:
    """Sharing between the pairs of inputs that share (non-zero pages only).

    Args:
        table: the analysis' core table.
        max_page_sharing: KSM's limit of mappings per KSM page.
        top: keep, for each input A, the ``top`` pairs ``(A, B)`` with the most pages of A
            in B (ties: the most extra saved, then B's order in the table); 0 keeps every
            pair that shares.

    Returns:
        :class:`Pairs`. Its table has one row per ordered pair ``(input_a, input_b)`` that
        shares a non-zero content (``a_pages_in_b > 0``; a pair absent shares nothing, or
        was cut by ``top``), by input A in table order, then most pages of A in B first.
        Columns: ``input_a``, ``input_b``, ``a_nonzero_pages`` (scanned non-zero pages of
        A), ``a_pages_in_b`` (those whose content also occurs in B), ``a_fraction_in_b``
        (0 to 1), ``extra_saved_pages`` and ``extra_saved_bytes`` (what KSM saves on a host
        holding only A and B beyond what it saves on A and on B alone; the same both ways).

    Contents held by the same inputs (the pages of one base image under many guests) are
    summed as one group first, so the cost is one step per pair of inputs of a group, not
    per pair per content; inputs that share nothing cost nothing, and memory stays bounded
    (:data:`_CELLS_AT_ONCE`, :data:`_PAIRS_AT_ONCE`) however many inputs share.
    """
    n = len(table.input_columns)
    names = short_names(table.names)
    nonzero = table.nonzero_pages()
    kept: list[tuple[np.ndarray, ...]] = []
    twins: list[np.ndarray] = []
    sharing = 0
    # in_b, then extra, as one number to rank by (extra <= in_b <= the most non-zero pages).
    scale = int(nonzero.max(initial=0)) + 1
    for lo_a, block in _pair_blocks(table, n, max_page_sharing):
        if len(block) == 2 and scale * scale < 1 << 62:  # dense: cut each row in place
            in_b_sum, extra_sum = block
            sharing += int(np.count_nonzero(in_b_sum))
            chosen = in_b_sum > 0
            if top:
                chosen &= _top_cells(in_b_sum * scale + extra_sum, top)
            a_nz = nonzero[lo_a:lo_a + len(in_b_sum), None]
            twin = (a_nz > 0) & (in_b_sum >= TWIN_SHARE * a_nz)
            rows, cols = np.nonzero(chosen | twin)  # few: at most top per row, and twins
            a, b = rows + lo_a, cols
            in_b, extra = in_b_sum[rows, cols], extra_sum[rows, cols]
            cut = chosen[rows, cols]
        else:
            a, b, in_b, extra = block if len(block) == 4 else _cells(lo_a, *block)
            sharing += len(a)
            cut = _top_rows(a, b, in_b, extra, top) if top else np.ones(len(a), bool)
        # The smaller of the two (the first on a tie) is checked for being nearly the other.
        small = (nonzero[a] < nonzero[b]) | ((nonzero[a] == nonzero[b]) & (a < b))
        twin = small & (nonzero[a] > 0) & (in_b >= TWIN_SHARE * nonzero[a])
        twins.append(np.stack([a[twin], b[twin], nonzero[a][twin], in_b[twin]], axis=1))
        a, b, in_b, extra = a[cut], b[cut], in_b[cut], extra[cut]
        order = np.lexsort((b, -extra, -in_b, a))
        kept.append((a[order], b[order], in_b[order], extra[order]))
    a, b, in_b, extra = (np.concatenate([k[i] for k in kept]) if kept else np.empty(0, np.int64)
                         for i in range(4))
    found = np.concatenate(twins) if twins else np.empty((0, 4), np.int64)
    found = found[np.lexsort((np.maximum(found[:, 0], found[:, 1]),
                              np.minimum(found[:, 0], found[:, 1])))]
    nz = nonzero[a]
    fraction = np.divide(in_b, nz, out=np.zeros(len(a)), where=nz > 0)
    shown = np.array(names, object)
    table_rows = Columns({
        "input_a": shown[a].tolist(),
        "input_b": shown[b].tolist(),
        "a_nonzero_pages": nz,
        "a_pages_in_b": in_b,
        "a_fraction_in_b": fraction,
        "extra_saved_pages": extra,
        "extra_saved_bytes": extra * table.page_size,
    })
    twin_rows = [(int(x), int(y), int(z), int(w)) for x, y, z, w in found.tolist()]
    return Pairs(table_rows, names, sharing, top, twin_rows)


def _top_cells(score: np.ndarray, top: int) -> np.ndarray:
    """Per row of ``score`` (A x every B), the ``top`` largest cells (ties: the first
    columns), as a mask."""
    n = score.shape[1]
    if top >= n:
        return np.ones(score.shape, bool)
    # The top-th largest of each row; every cell above it is in, and of the cells equal to
    # it, the first ones until the row has top. (A sort: np.partition slows down a
    # hundredfold on rows of many equal cells, the usual row of a fleet.)
    edge = np.sort(score, axis=1)[:, n - top, None]
    above = score > edge
    level = score == edge
    room = top - above.sum(axis=1, keepdims=True)
    mask: np.ndarray = above | (level & (np.cumsum(level, axis=1) <= room))
    return mask


def _top_rows(a: np.ndarray, b: np.ndarray, in_b: np.ndarray, extra: np.ndarray, top: int
              ) -> np.ndarray:
    """Which of the pairs ``(a, b)`` are among the ``top`` of their input A (most ``in_b``,
    then most ``extra``, then first ``b``), as a mask."""
    order = np.lexsort((b, -extra, -in_b, a))
    ranked = a[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    rank = np.arange(len(a)) - np.repeat(starts, np.diff(np.append(starts, len(a))))
    mask = np.zeros(len(a), bool)
    mask[order[rank < top]] = True
    return mask


def _cells(lo_a: int, in_b_sum: np.ndarray, extra_sum: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The pairs that share in a dense block of rows from input ``lo_a``."""
    rows, cols = np.nonzero(in_b_sum)
    return rows + lo_a, cols, in_b_sum[rows, cols], extra_sum[rows, cols]


def _groups(table: ContentTable, max_page_sharing: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Contents held by two or more inputs, grouped when they pair alike.

    A content held by A and B adds its pages in A to ``a_pages_in_b`` and, to
    ``extra_saved_pages``, 1 when A's and B's copies of it fit in their KSM pages together
    (``s_a + s_b <= max_page_sharing``, where ``s = (pages - 1) % max_page_sharing + 1`` are
    the copies on a KSM page not yet full), else 0. So contents held by the same inputs are
    one group, and when some input holds more than half a KSM page's worth (``2 s >
    max_page_sharing``: rare), the same ``s`` per input too. Grouped by a 128-bit digest,
    then checked row by row against the group's first content (exact).

    Returns:
        Per row of a group (its inputs, a group's rows adjacent, in input order):
        ``owner``, ``s`` (0 when no input of the group holds over half a KSM page),
        ``pages`` (summed over the group's contents), ``weight`` (the group's contents),
        ``first`` (the group's first row).
    """
    content, owner, pages, mps = table.content, table.owner, table.pages, max_page_sharing
    # Per content held by two or more inputs: its first row, rows, whether some input holds
    # over half a KSM page, and a digest of its rows and (input, s) rows: a chunk of rows at
    # a time. One 64-bit digest (the check below splits what collides): a few words a
    # content, where a sort of rows of three was ~130 bytes.
    parts: list[tuple[np.ndarray, ...]] = []
    for lo, hi in content_chunks(content):
        c = content[lo:hi]
        start = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
        length = np.diff(np.append(start, len(c)))
        s = (pages[lo:hi] - 1) % mps + 1
        over = np.maximum.reduceat(2 * s > mps, start)
        s = np.where(np.repeat(over, length), s, 0)
        shared = length >= 2  # a content of one input pairs with none
        digest = row_digests(owner[lo:hi], s, start, length)
        parts.append((start[shared] + lo, length[shared], over[shared], digest[shared]))
        del c, s, digest
    if not parts or not sum(len(p[0]) for p in parts):
        empty = np.empty(0, np.int64)
        return empty, empty, empty, empty, empty
    start, length, over, digest = (np.concatenate([p[i] for p in parts]) for i in range(4))
    del parts
    _, rep, group = np.unique(digest, return_index=True, return_inverse=True)
    del digest

    def s_of(rows: np.ndarray, is_over: np.ndarray) -> np.ndarray:
        return np.where(is_over, (pages[rows] - 1) % mps + 1, 0)

    # Exact: each content's rows against its group's first content's, contents in chunks.
    ends = np.cumsum(length)
    lone_parts = []
    for lo, hi in _content_runs(ends):
        size, rank, first = length[lo:hi], run_ranks(length[lo:hi]), rep[group[lo:hi]]
        mine = np.repeat(start[lo:hi], size) + rank
        # (rows past the table's end of a first content of fewer rows: it differs anyway)
        theirs = np.minimum(np.repeat(start[first], size) + rank, len(owner) - 1)
        differs = (owner[mine] != owner[theirs]) | (
            s_of(mine, np.repeat(over[lo:hi], size))
            != s_of(theirs, np.repeat(over[first], size)))
        differs |= np.repeat(size != length[first], size)
        lone_parts.append(np.unique(np.repeat(np.arange(lo, hi), size)[differs]))
    lone = np.concatenate(lone_parts)  # digest collisions
    group[lone] = len(rep) + np.arange(len(lone))
    rep = np.concatenate([rep, lone])
    weight = np.bincount(group, minlength=len(rep))
    size = length[rep]
    at = np.cumsum(size) - size  # each group's first row
    rows = np.repeat(start[rep], size) + run_ranks(size)
    summed = np.zeros(len(rows), np.int64)
    for lo, hi in _content_runs(ends):
        rank = run_ranks(length[lo:hi])
        np.add.at(summed, np.repeat(at[group[lo:hi]], length[lo:hi]) + rank,
                  pages[np.repeat(start[lo:hi], length[lo:hi]) + rank])
    return (owner[rows].astype(np.int64), s_of(rows, np.repeat(over[rep], size)), summed,
            np.repeat(weight, size), np.repeat(at, size))


def _content_runs(ends: np.ndarray) -> Iterator[tuple[int, int]]:
    """``(lo, hi)`` runs of contents of about :data:`~.ksm.ROWS_AT_ONCE` rows in all
    (``ends``: each content's last row + 1, counted over the contents)."""
    lo = 0
    while lo < len(ends):
        base = int(ends[lo - 1]) if lo else 0
        hi = max(lo + 1, int(np.searchsorted(ends, base + ROWS_AT_ONCE, side="right")))
        yield lo, hi
        lo = hi


def _pair_blocks(table: ContentTable, n: int, max_page_sharing: int
                 ) -> Iterator[tuple[int, tuple[np.ndarray, ...]]]:
    """Every ordered pair of inputs that share, a block of inputs A at a time: ``(lo_a,
    block)``, the block ``(in_b, extra)`` as dense arrays (its inputs A from ``lo_a`` x every
    input B) or ``(a, b, in_b, extra)``, one entry per pair (its pairs are few)."""
    owner, s, pages, weight, first = _groups(table, max_page_sharing)
    if not len(owner):
        return
    partners = _group_sizes(first) - 1  # per row: the other inputs of its group
    by_input = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[by_input], np.arange(n + 1))  # rows of each input A
    terms = np.r_[0, np.cumsum(partners[by_input])]
    per_block = max(1, _CELLS_AT_ONCE // n)
    for lo_a in range(0, n, per_block):
        hi_a = min(n, lo_a + per_block)
        lo, hi = int(bounds[lo_a]), int(bounds[hi_a])
        total = int(terms[hi] - terms[lo])
        if not total:
            continue
        cells = (hi_a - lo_a) * n
        dense = total * 4 >= cells
        parts = []
        in_b_sum = np.zeros(cells if dense else 0, np.int64)
        extra_sum = np.zeros(cells if dense else 0, np.int64)
        while lo < hi:
            # Rows [lo, end): at most _PAIRS_AT_ONCE terms (or one row, if it alone has more).
            end = max(lo + 1, min(hi, int(np.searchsorted(terms, terms[lo] + _PAIRS_AT_ONCE,
                                                           side="right")) - 1))
            i = by_input[lo:end]
            i = np.repeat(i, partners[i])  # a row of input A, once per other row of its group
            t = run_ranks(partners[by_input[lo:end]])
            t += t >= (i - first[i])  # the t-th other row of the group, skipping i itself
            j = first[i] + t  # row of input B
            key = (owner[i] - lo_a) * n + owner[j]
            # Contents whose copies overflow a KSM page together save nothing more.
            gain = weight[i] * (s[i] + s[j] <= max_page_sharing)
            if dense:
                in_b_sum += np.bincount(key, weights=pages[i], minlength=cells).astype(np.int64)
                extra_sum += np.bincount(key, weights=gain, minlength=cells).astype(np.int64)
            else:
                parts.append((key, pages[i], gain))
            lo = end
        if dense:
            yield lo_a, (in_b_sum.reshape(-1, n), extra_sum.reshape(-1, n))
        else:
            keys = np.concatenate([p[0] for p in parts])
            key, inverse = np.unique(keys, return_inverse=True)
            in_b = np.bincount(inverse, weights=np.concatenate([p[1] for p in parts]),
                               minlength=len(key)).astype(np.int64)
            extra = np.bincount(inverse, weights=np.concatenate([p[2] for p in parts]),
                                minlength=len(key)).astype(np.int64)
            a, b = np.divmod(key, n)
            yield lo_a, (a + lo_a, b, in_b, extra)


def _group_sizes(first: np.ndarray) -> np.ndarray:
    """Per row, the rows of its group (``first`` holds each row's group's first row)."""
    at = np.flatnonzero(np.r_[True, first[1:] != first[:-1]])
    size = np.diff(np.append(at, len(first)))
    sizes: np.ndarray = np.repeat(size, size)
    return sizes


def twin_warnings(pairs: Pairs, prints: Sequence[Fingerprints]) -> list[str]:
    """Warnings for pairs of inputs that are nearly the same (:data:`TWIN_SHARE`), and, for
    guests (physical address space), the address ranges one of such a pair holds and the
    other does not.

    One guest given twice, or in two formats (a QEMU ELF dump and a ``pmemsave`` image),
    shares nearly every page with itself: every figure counts it twice, and a projection
    of guests per host takes it for two guests that share almost everything.

    Args:
        pairs: :func:`pairwise` of the inputs of ``prints`` (its twins are found before its
            table is cut to ``top`` pairs per input: none is missed).
        prints: every input's fingerprints, in table order.
    """
    names, twins = pairs.names, pairs.twins
    out = []
    for small, big, nonzero, shared in twins[:TWINS_SHOWN]:
        ps = prints[small].page_size
        out.append(
            f"{names[small]} and {names[big]} are nearly the same input: "
            f"{_percent(shared, nonzero)} of the {nonzero:,} non-zero pages "
            f"({human_bytes(nonzero * ps)}) of {names[small]} are also in {names[big]}. If "
            "they are one guest (or process) given twice or in two formats, every figure "
            "counts it twice and a projection of guests per host overstates what fits: give "
            "each guest once (guests cloned from one image may well be this alike)")
        if prints[small].address_space == prints[big].address_space == "physical":
            for x, y in ((small, big), (big, small)):
                missing = _minus(_held(prints[x]), _held(prints[y]))
                if missing:
                    out.append(_ranges_warning(names[x], names[y], missing, ps))
    if len(twins) > TWINS_SHOWN:
        out.append(f"{len(twins) - TWINS_SHOWN:,} more pairs of inputs are nearly the same "
                   f"(at least {TWIN_SHARE:.0%} of the smaller one's non-zero pages shared): see "
                   "the pairwise table")
    return out


def _percent(part: int, whole: int) -> str:
    """``part / whole`` as a percentage rounded down to 0.1 (99.96% is not 100%)."""
    tenths = part * 1000 // whole
    return f"{tenths // 10}%" if tenths % 10 == 0 else f"{tenths / 10:.1f}%"


def _held(fp: Fingerprints) -> list[tuple[int, int]]:
    """The address ranges ``[start, end)`` whose pages ``fp`` holds (stored or known to be
    zero), sorted and merged."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted((e.addr, e.addr + e.npages * fp.page_size) for e in fp.extents
                             if e.state in (PageState.DATA, PageState.ZERO)):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _minus(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ranges ``a`` outside ranges ``b`` (both sorted and merged)."""
    out, j = [], 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        cur, k = start, j
        while k < len(b) and b[k][0] < end:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur, k = max(cur, b[k][1]), k + 1
        if cur < end:
            out.append((cur, end))
    return out


def _ranges_warning(has: str, lacks: str, ranges: list[tuple[int, int]], page_size: int,
                    shown: int = 3) -> str:
    total = sum(end - start for start, end in ranges)
    where = ", ".join(f"{s:#x}-{e - 1:#x} ({human_bytes(e - s)})" for s, e in ranges[:shown])
    if len(ranges) > shown:
        where += f" and {len(ranges) - shown:,} more ranges"
    return (f"{has} holds {total // page_size:,} pages ({human_bytes(total)}) that {lacks} "
            f"does not: {where}. One format covers address ranges the other leaves out (a "
            "pmemsave image holds the BIOS ROM at 0xc0000-0xfffff, an ELF dump does not), so "
            "their page counts differ by that much")


def classify_content(page: bytes) -> tuple[str, str, float]:
    """Name what kind of content a page holds, without quoting it.

    Returns:
        ``(content_class, detail, entropy_bits_per_byte)``. Classes: ``zero``,
        ``repeated_byte`` (detail: the byte and its kernel poison name, if any),
        ``repeated_pattern`` (detail: the period in bytes, up to 64), ``low_entropy``
        (under ``LOW_ENTROPY_BITS`` bits a byte) and ``other``.
    """
    arr = np.frombuffer(page, np.uint8)
    freq = np.bincount(arr, minlength=256)
    p = freq[freq > 0] / len(arr)
    entropy = float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: no "-0.0"
    if not arr.any():
        return "zero", "", entropy
    if (arr == arr[0]).all():
        byte = int(arr[0])
        name = _POISON.get(byte)
        return "repeated_byte", f"{byte:#04x}" + (f" ({name})" if name else ""), entropy
    for period in (2, 4, 8, 16, 32, 64):
        if len(arr) % period == 0 and (arr.reshape(-1, period) == arr[:period]).all():
            return "repeated_pattern", f"period {period} bytes", entropy
    if entropy < LOW_ENTROPY_BITS:
        return "low_entropy", "", entropy
    return "other", "", entropy


def top_contents(
    table: ContentTable,
    classes: ContentClasses,
    fingerprints: Sequence[Fingerprints],
    readers: Sequence[DumpReader | None],
    *,
    top: int,
    show_content: bool = False,
) -> Columns:
    """The ``top`` contents with the most scanned copies across all inputs, zero page included.

    Reads one page of each (the readers must be open).

    Returns:
        One row per content, most copies first. Columns: ``content_hash`` (SHA-256 of the
        page, hex), ``copies`` (scanned pages holding it), ``bytes`` (``copies`` times the
        page size), ``input_count``, ``inputs`` (copies per input name, ``{"a.elf": 13, "b.raw": 12}``;
        ``a.elf:13 b.raw:12`` in CSV),
        ``content_class``, ``class_detail``, ``entropy_bits_per_byte``; with
        ``show_content``, also ``content_hex``: the first ``CONTENT_HEAD_BYTES`` bytes.
    """
    columns = ["content_hash", "copies", "bytes", "input_count", "inputs", "content_class",
               "class_detail", "entropy_bits_per_byte"]
    if show_content:
        columns.append("content_hex")
    total = table.copies()
    cls = table.classes()
    # Most copies first; ties by class number, so the order is repeatable.
    order = np.lexsort((cls, -total))[:top]
    chosen, chosen_total = cls[order], total[order]
    # Pages stage 2 kept (from dumps that decode their pages: reading again costs a pass).
    pages = {c: classes.pages[c] for c in chosen.tolist() if c in classes.pages}
    for fp, labels, r in zip(fingerprints, classes.labels, readers, strict=True):
        missing = np.setdiff1d(chosen, np.fromiter(pages, np.int64, len(pages)))
        if not len(missing):
            break
        if r is None:
            continue  # its dump is not readable here (a fingerprint file)
        rows = np.flatnonzero(np.isin(labels, missing))
        found, first = np.unique(labels[rows], return_index=True)
        data = r.read_pages(fp.addrs[rows[first]])
        for c, page in zip(found.tolist(), data, strict=True):
            pages[c] = page.tobytes()
    names = short_names(table.names)
    records = []
    # The zero page first: on a tie in copies it stays ahead of the others.
    zero = table.column("zero_pages")
    zero_total = int(zero.sum())
    if zero_total >= 2:
        where = {names[i]: int(zero[i]) for i in np.flatnonzero(zero)}
        records.append(_content_row(bytes(table.page_size), zero_total, table.page_size,
                                    where, show_content))
    for c, n in zip(chosen.tolist(), chosen_total.tolist(), strict=True):
        mine = table.content == c
        where = {names[i]: k for i, k in zip(table.owner[mine].tolist(),
                                             table.pages[mine].tolist(), strict=True)}
        records.append(_content_row(pages.get(c), n, table.page_size, where, show_content))
    records.sort(key=lambda r: -r["copies"])  # stable: the zero page first on a tie
    return Columns.from_records(records[:top], columns)


def _content_row(page: bytes | None, copies: int, page_size: int, where: dict[str, int],
                 show_content: bool) -> dict[str, Any]:
    if page is None:  # no dump holding it is readable here: known by its hashes only
        kind, detail, entropy = "unknown", "no dump holding it is readable here", None
    else:
        kind, detail, entropy = classify_content(page)
    row: dict[str, Any] = {
        "content_hash": "" if page is None else hashlib.sha256(page).hexdigest(),
        "copies": copies,
        "bytes": copies * page_size,
        "input_count": len(where),
        "inputs": where,
        "content_class": kind,
        "class_detail": detail,
        "entropy_bits_per_byte": None if entropy is None else round(entropy, 3),
    }
    if show_content:
        row["content_hex"] = "" if page is None else page[:CONTENT_HEAD_BYTES].hex()
    return row


_ROWS_AT_ONCE = 1 << 18
"""Stored pages placed in bins at a time by :func:`address_map` (its working memory)."""


def address_map(
    table: ContentTable,
    classes: ContentClasses,
    fingerprints: Sequence[Fingerprints],
    masks: Sequence[ScanMask],
    *,
    scope: Scope,
    bins: int = ADDRESS_BINS,
) -> Columns:
    """Each input's pages in address order, cut into ``bins`` runs of equal page count.

    Bins follow the pages the dump describes, not raw addresses, so a sparse address space
    (a process core) does not spread into empty bins; each bin gives its first and last
    address.

    Returns:
        One row per bin and input. Columns: ``input``, ``bin``, ``first_address``,
        ``last_address`` (of a page in the bin), ``pages``, and per kind of page
        (``ADDRESS_KINDS``): ``zero_pages`` (stored all zero or marked zero),
        ``unique_pages`` (content nowhere else), ``duplicate_within_pages`` (content also
        elsewhere in this input only), ``duplicate_across_pages`` (content also in another
        input), ``ineligible_pages`` (pages KSM would not scan under ``scope``: file-backed,
        shared, zero-page mappings, not mergeable; see ``Analysis.exclusions``),
        ``not_stored_pages`` (holes, excluded, not saved).
    """
    # Classes held by two or more inputs: a content's rows are adjacent in the table.
    across_mask = np.zeros(max(classes.n_classes, 1), bool)
    across_mask[table.content[1:][table.content[1:] == table.content[:-1]]] = True
    parts = []
    for input_name, fp, c, mask in zip(short_names(table.names), fingerprints, classes.labels,
                                       masks, strict=True):
        elig = mask.scanned
        ps = fp.page_size
        ext = sorted(fp.extents, key=lambda e: e.addr)
        starts = np.array([e.addr for e in ext], np.uint64)
        sizes = np.array([e.npages for e in ext], np.int64)
        first_index = np.concatenate([[0], np.cumsum(sizes)])
        total = int(first_index[-1])
        nb = max(1, min(bins, total))
        edges = np.linspace(0, total, nb + 1).round().astype(np.int64)
        kinds = {k: np.zeros(nb, np.int64) for k in ADDRESS_KINDS}
        # Stored pages, by content, a slice of rows at a time (a few bytes a row at once).
        for lo in range(0, len(fp.addrs), _ROWS_AT_ONCE):
            rows = slice(lo, lo + _ROWS_AT_ONCE)
            addrs, cls, ok = fp.addrs[rows], c[rows], elig[rows]
            k = np.searchsorted(starts, addrs, side="right") - 1
            index = first_index[k] + ((addrs - starts[k]) // np.uint64(ps)).astype(np.int64)
            which = np.searchsorted(edges, index, side="right") - 1
            dup = cls >= 0
            is_across = dup & across_mask[np.maximum(cls, 0)]
            for name, chosen in (
                ("zero_pages", ok & (cls == ZERO)),
                ("unique_pages", ok & (cls == UNIQUE)),
                ("duplicate_within_pages", ok & dup & ~is_across),
                ("duplicate_across_pages", ok & is_across),
                ("ineligible_pages", ~ok),
            ):
                kinds[name] += np.bincount(which[chosen], minlength=nb)[:nb]
        # Pages with no stored bytes, run by run: pages of a run in each bin.
        for e, lo in zip(ext, first_index[:-1].tolist(), strict=True):
            if e.state == PageState.DATA:
                continue
            name = ("zero_pages" if excluded_by(e, scope) is None else "ineligible_pages") \
                if e.state == PageState.ZERO else "not_stored_pages"
            hi = lo + e.npages
            overlap = np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo)
            kinds[name] += np.maximum(overlap, 0)
        # The address of the first and last page of every bin.
        addr_of = _index_to_addr(starts, first_index, ps)
        parts.append(Columns({
            "input": [input_name] * nb,
            "bin": np.arange(nb),
            "first_address": addr_of(edges[:-1]),
            "last_address": addr_of(np.maximum(edges[1:] - 1, edges[:-1])),
            "pages": np.diff(edges),
            **kinds,
        }))
    columns = ["input", "bin", "first_address", "last_address", "pages", *ADDRESS_KINDS]
    if not parts:
        return Columns({c: [] for c in columns})
    return Columns({"input": [name for p in parts for name in p["input"]],
                    **{c: np.concatenate([p[c] for p in parts]) for c in columns[1:]}})


def _index_to_addr(starts: np.ndarray, first_index: np.ndarray, ps: int
                   ) -> Callable[[np.ndarray], np.ndarray]:
    """Map page indices (in address order over all extents) to page addresses."""

    def addr_of(index: np.ndarray) -> np.ndarray:
        if not len(starts):
            return np.zeros(len(index), np.uint64)
        k = np.searchsorted(first_index[:-1], index, side="right") - 1
        addrs: np.ndarray = starts[k] + (index - first_index[k]).astype(np.uint64) * np.uint64(ps)
        return addrs

    return addr_of


CLUSTER_DROP = 1.5
"""The cut of :func:`clusters`: the largest ratio between two successive joins, when it is
at least this."""


def clusters(n: int, a: np.ndarray, b: np.ndarray, shared: np.ndarray) -> list[list[int]]:
    """Inputs ``0..n-1`` in clusters of inputs that share most, the largest first.

    Single linkage over the pairs given: pairs joined by their similarity (``shared``: the
    pages of A whose content B holds; the larger of the two ways), highest first, as a
    dendrogram is built; the cut is at the largest ratio between two successive joins (when
    it is at least :data:`CLUSTER_DROP`; else every join counts), so a fleet of families
    under one base image falls into its families. Pages, not fractions: a family's layers
    are most of a small guest and a sliver of a large one, and fractions of guests of mixed
    sizes run together. Within a cluster, inputs follow the order they joined in: the most
    alike side by side.
    """
    sim: dict[tuple[int, int], float] = {}
    for x, y, f in zip(a.tolist(), b.tolist(), shared.tolist(), strict=True):
        key = (x, y) if x < y else (y, x)
        sim[key] = max(sim.get(key, 0.0), f)
    edges = sorted(((f, x, y) for (x, y), f in sim.items() if f > 0),
                   key=lambda e: (-e[0], e[1], e[2]))
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    joins: list[tuple[float, int, int]] = []
    for f, x, y in edges:  # Kruskal: the joins of the dendrogram, highest first
        rx, ry = root(x), root(y)
        if rx != ry:
            parent[ry] = rx
            joins.append((f, x, y))
    heights = np.array([f for f, _, _ in joins])
    cut = len(joins)
    if len(joins) > 1:
        ratios = heights[:-1] / heights[1:]
        if ratios.max() >= CLUSTER_DROP:
            cut = int(np.argmax(ratios)) + 1
    parent = list(range(n))
    members = {i: [i] for i in range(n)}
    for _, x, y in joins[:cut]:
        rx, ry = root(x), root(y)
        if len(members[rx]) < len(members[ry]):
            rx, ry = ry, rx
        parent[ry] = rx
        members[rx] += members.pop(ry)
    return sorted(members.values(), key=lambda c: (-len(c), min(c)))
