"""Who shares with whom, what is shared, and where: the tables behind ``report``.

Three tables, built from the core :class:`~ksm_analyze.content_table.ContentTable` (and, for
where pages lie, the labels of stage 2 and the scan masks):

* ``pairwise``: for each ordered pair of inputs, the non-zero pages of one whose content
  also occurs in the other, and what KSM would save on top if only those two shared a host;
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
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .columns import Columns
from .content_table import ContentTable
from .eligibility import ScanMask, Scope, excluded_by
from .formats.base import DumpReader
from .hashing.stage1 import Fingerprints
from .hashing.stage2 import UNIQUE, ZERO, ContentClasses
from .ksm import merged_pages
from .pages import PageState
from .units import human_bytes, short_names

__all__ = [
    "ADDRESS_KINDS",
    "CONTENT_HEAD_BYTES",
    "address_map",
    "classify_content",
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


_PAIRS_AT_ONCE = 1 << 22
"""Pairs of sparse rows (same content, two inputs) summed at a time by :func:`pairwise`."""


def pairwise(table: ContentTable, *, max_page_sharing: int) -> Columns:
    """Sharing between every ordered pair of inputs (non-zero pages only).

    Args:
        table: the analysis' core table.
        max_page_sharing: KSM's limit of mappings per KSM page.

    Returns:
        One row per ordered pair ``(input_a, input_b)``, ``a != b``. Columns: ``input_a``,
        ``input_b``, ``a_nonzero_pages`` (scanned non-zero pages of A), ``a_pages_in_b``
        (those whose content also occurs in B), ``a_fraction_in_b`` (0 to 1),
        ``extra_saved_pages`` and ``extra_saved_bytes`` (what KSM saves on a host holding
        only A and B beyond what it saves on A and on B alone; the same both ways).

    Costs one step per pair of sparse rows of one content (two inputs that share it), not
    per pair of inputs: pairs that share nothing cost only their row of the output.
    """
    columns = ["input_a", "input_b", "a_nonzero_pages", "a_pages_in_b", "a_fraction_in_b",
               "extra_saved_pages", "extra_saved_bytes"]
    n = len(table.input_columns)
    if n < 2:
        return Columns({c: [] for c in columns})
    in_b, extra = _pair_sums(table, n, max_page_sharing)
    a, b = np.divmod(np.arange(n * n, dtype=np.int64), n)
    off = a != b  # itertools.permutations order: row-major, the diagonal left out
    a, b = a[off], b[off]
    in_b, extra = in_b.reshape(-1)[off], extra.reshape(-1)[off]
    nonzero = table.nonzero_pages()[a]
    fraction = np.divide(in_b, nonzero, out=np.zeros(len(a)), where=nonzero > 0)
    names = np.array(short_names(table.names), object)
    return Columns({
        "input_a": names[a].tolist(),
        "input_b": names[b].tolist(),
        "a_nonzero_pages": nonzero,
        "a_pages_in_b": in_b,
        "a_fraction_in_b": fraction,
        "extra_saved_pages": extra,
        "extra_saved_bytes": extra * table.page_size,
    })


def _pair_sums(table: ContentTable, n: int, max_page_sharing: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(in_b, extra)``, n x n: pages of A whose content B holds, and the pages KSM saves on
    top with A and B on one host, summed over the contents both hold."""
    in_b = np.zeros(n * n, np.int64)
    extra = np.zeros(n * n, np.int64)
    content, owner, pages = table.content, table.owner.astype(np.int64), table.pages
    if not len(content):
        return in_b.reshape(n, n), extra.reshape(n, n)
    # Rows are sorted by content: each content's rows form a run ``[start, start + k)``.
    starts = np.flatnonzero(np.r_[True, content[1:] != content[:-1]])
    sizes = np.diff(np.r_[starts, len(content)])
    k = np.repeat(sizes, sizes)  # per row: inputs holding its content
    first = np.repeat(starts, sizes)  # per row: its content's first row
    partners = k - 1  # per row: the other inputs holding its content
    ends = np.cumsum(partners)
    lo = 0
    while lo < len(content):
        # Rows [lo, hi): at most _PAIRS_AT_ONCE pairs (or one row, if it alone has more).
        base = ends[lo - 1] if lo else 0
        hi = max(lo + 1, int(np.searchsorted(ends, base + _PAIRS_AT_ONCE, side="right")))
        rows = np.arange(lo, hi)
        i = np.repeat(rows, partners[rows])  # row of input A
        t = np.arange(len(i)) - np.repeat(ends[rows] - partners[rows] - base, partners[rows])
        t += t >= (i - first[i])  # the t-th other row of the content, skipping row i itself
        j = first[i] + t  # row of input B
        key = owner[i] * n + owner[j]
        in_b += np.bincount(key, weights=pages[i], minlength=n * n).astype(np.int64)
        # Contents only one of them holds merge the same alone or together.
        gain = (_saved(pages[i] + pages[j], max_page_sharing)
                - _saved(pages[i], max_page_sharing) - _saved(pages[j], max_page_sharing))
        extra += np.bincount(key, weights=gain, minlength=n * n).astype(np.int64)
        lo = hi
    return in_b.reshape(n, n), extra.reshape(n, n)


def _saved(copies: np.ndarray, max_page_sharing: int) -> np.ndarray:
    """Pages KSM frees merging each content of ``copies`` pages (:func:`~ksm_analyze.ksm.saved_pages`,
    per content)."""
    ksm, unshared = merged_pages(copies, max_page_sharing)
    saved: np.ndarray = copies - ksm - unshared
    return saved


def twin_warnings(pairs: Columns, prints: Sequence[Fingerprints]) -> list[str]:
    """Warnings for pairs of inputs that are nearly the same (:data:`TWIN_SHARE`), and, for
    guests (physical address space), the address ranges one of such a pair holds and the
    other does not.

    One guest given twice, or in two formats (a QEMU ELF dump and a ``pmemsave`` image),
    shares nearly every page with itself: every figure counts it twice, and a projection
    of guests per host takes it for two guests that share almost everything.

    Args:
        pairs: :func:`pairwise` of the inputs of ``prints`` (rows in its order).
        prints: every input's fingerprints, in table order.
    """
    n = len(prints)
    if n < 2:
        return []
    names = list(pairs.data["input_a"][::n - 1])  # each input's, in order

    def square(column: str) -> np.ndarray:
        """A column as an n x n array (rows in itertools.permutations order; diagonal 0)."""
        out = np.zeros((n, n), np.int64)
        out[~np.eye(n, dtype=bool)] = np.asarray(pairs.data[column], np.int64)
        return out

    nonzero_ab, shared_ab = square("a_nonzero_pages"), square("a_pages_in_b")
    a, b = np.triu_indices(n, 1)  # itertools.combinations order
    a_small = nonzero_ab[a, b] <= nonzero_ab[b, a]
    small, big = np.where(a_small, a, b), np.where(a_small, b, a)
    nonzero, shared = nonzero_ab[small, big], shared_ab[small, big]
    twin = (nonzero > 0) & (shared >= TWIN_SHARE * nonzero)
    twins = list(zip(small[twin].tolist(), big[twin].tolist(), nonzero[twin].tolist(),
                     shared[twin].tolist(), strict=True))
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
