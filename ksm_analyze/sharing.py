"""Who shares with whom, what is shared, and where: the tables behind ``report``.

Three tables, built from the content classes of stage 2 over the pages the model counts:

* ``pairwise``: for each ordered pair of inputs, the non-zero pages of one whose content
  also occurs in the other, and what KSM would save on top if only those two shared a host;
* ``top_contents``: the most duplicated contents, each with a SHA-256, its copies, the
  inputs it occurs in and a class (zero, repeated byte, repeated pattern, low entropy,
  other). Page bytes are never put in it unless asked for: memory dumps hold secrets;
* ``address_map``: each input's pages, in address order, cut into bins and counted per
  kind (zero, unique, duplicated within the input, duplicated across inputs, ...), so a
  chart can show where in the address space the sharing lies.

Zero pages are left out of ``pairwise``: the savings table has them in a row of their own,
and they would make every pair of guests look alike.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .eligibility import Scope, excluded_by
from .fingerprint import UNIQUE, ZERO, PageTable
from .formats.base import DumpReader
from .ksm import merged_pages
from .pages import PageState

__all__ = [
    "ADDRESS_KINDS",
    "CONTENT_HEAD_BYTES",
    "SharingTables",
    "address_map",
    "classify_content",
    "pairwise",
    "sharing_tables",
    "top_contents",
    "with_zero_row",
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


@dataclass
class SharingTables:
    """What :func:`sharing_tables` computes while the inputs are open."""

    pairwise: pd.DataFrame
    top_contents: pd.DataFrame
    address_map: pd.DataFrame


def _name(table: PageTable) -> str:
    return Path(table.path).name


def _saved(copies: np.ndarray, mps: int) -> int:
    """Pages KSM frees merging contents seen ``copies`` times each (``ksm.merged_pages``)."""
    ksm, unshared = merged_pages(copies, mps)
    return int((copies - ksm - unshared).sum())


def _class_counts(tables: Sequence[PageTable], eligible: Sequence[np.ndarray]
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per input: the sorted non-zero content classes it holds and its copies of each."""
    out = []
    for t, elig in zip(tables, eligible, strict=True):
        assert t.content is not None, "classify() sets content"
        c = t.content[elig]
        cls, cnt = np.unique(c[c >= 0], return_counts=True)
        out.append((cls, cnt.astype(np.int64)))
    return out


def pairwise(
    tables: Sequence[PageTable],
    eligible: Sequence[np.ndarray],
    *,
    max_page_sharing: int = 256,
) -> pd.DataFrame:
    """Sharing between every ordered pair of inputs (non-zero pages only).

    Args:
        tables: fingerprints with content classes (after ``classify``).
        eligible: per table, a bool per row: the pages the model counts.
        max_page_sharing: KSM's limit of mappings per KSM page.

    Returns:
        One row per ordered pair ``(input_a, input_b)``, ``a != b``. Columns: ``input_a``,
        ``input_b``, ``a_nonzero_pages`` (eligible non-zero pages of A), ``a_pages_in_b``
        (those whose content also occurs in B), ``a_fraction_in_b`` (0 to 1),
        ``extra_saved_pages`` and ``extra_saved_bytes`` (what KSM saves on a host holding
        only A and B beyond what it saves on A and on B alone; the same both ways).
    """
    counts = _class_counts(tables, eligible)
    ps = tables[0].page_size if tables else 4096
    nonzero = []
    for t, elig in zip(tables, eligible, strict=True):
        assert t.content is not None
        nonzero.append(int(np.count_nonzero(t.content[elig] != ZERO)))
    rows = []
    for a, b in itertools.permutations(range(len(tables)), 2):
        (cls_a, cnt_a), (cls_b, cnt_b) = counts[a], counts[b]
        _, ia, ib = np.intersect1d(cls_a, cls_b, assume_unique=True, return_indices=True)
        in_b = int(cnt_a[ia].sum())
        # Contents only one of them holds merge the same alone or together.
        extra = (_saved(cnt_a[ia] + cnt_b[ib], max_page_sharing)
                 - _saved(cnt_a[ia], max_page_sharing) - _saved(cnt_b[ib], max_page_sharing))
        rows.append({
            "input_a": _name(tables[a]),
            "input_b": _name(tables[b]),
            "a_nonzero_pages": nonzero[a],
            "a_pages_in_b": in_b,
            "a_fraction_in_b": in_b / nonzero[a] if nonzero[a] else 0.0,
            "extra_saved_pages": extra,
            "extra_saved_bytes": extra * ps,
        })
    columns = ["input_a", "input_b", "a_nonzero_pages", "a_pages_in_b", "a_fraction_in_b",
               "extra_saved_pages", "extra_saved_bytes"]
    return pd.DataFrame(rows, columns=columns)


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
    tables: Sequence[PageTable],
    readers: Sequence[DumpReader],
    eligible: Sequence[np.ndarray],
    *,
    top: int = 20,
    show_content: bool = False,
) -> pd.DataFrame:
    """The ``top`` non-zero contents with the most eligible copies, across all inputs.

    Reads one page of each (the readers must be open). Zero pages are added afterwards by
    :func:`with_zero_row`, from the counts the model uses.

    Returns:
        One row per content, most copies first. Columns: ``content_hash`` (SHA-256 of the
        page, hex), ``copies`` (eligible pages holding it), ``bytes`` (``copies`` times the
        page size), ``input_count``, ``inputs`` (file names and copies, ``a.elf:13 b.raw:12``),
        ``content_class``, ``class_detail``, ``entropy_bits_per_byte``; with
        ``show_content``, also ``content_hex``: the first ``CONTENT_HEAD_BYTES`` bytes.
    """
    columns = ["content_hash", "copies", "bytes", "input_count", "inputs", "content_class",
               "class_detail", "entropy_bits_per_byte"]
    if show_content:
        columns.append("content_hex")
    counts = _class_counts(tables, eligible)
    if top <= 0 or not any(len(cls) for cls, _ in counts):
        return pd.DataFrame([], columns=columns)
    all_cls = np.concatenate([cls for cls, _ in counts])
    all_cnt = np.concatenate([cnt for _, cnt in counts])
    cls, inverse = np.unique(all_cls, return_inverse=True)
    total = np.bincount(inverse, weights=all_cnt).astype(np.int64)
    # Most copies first; ties by class number, so the order is repeatable.
    order = np.lexsort((cls, -total))[:top]
    chosen, chosen_total = cls[order], total[order]
    ps = tables[0].page_size
    pages: dict[int, bytes] = {}
    for t, r, elig in zip(tables, readers, eligible, strict=True):
        assert t.content is not None
        missing = np.setdiff1d(chosen, np.fromiter(pages, np.int64, len(pages)))
        if not len(missing):
            break
        rows = np.flatnonzero(elig & np.isin(t.content, missing))
        found, first = np.unique(t.content[rows], return_index=True)
        data = r.read_pages(t.locators[rows[first]])
        for c, page in zip(found.tolist(), data, strict=True):
            pages[c] = page.tobytes()
    records = []
    for c, n in zip(chosen.tolist(), chosen_total.tolist(), strict=True):
        page = pages[c]
        where = [
            f"{_name(t)}:{int(cnt[np.searchsorted(tc, c)])}"
            for t, (tc, cnt) in zip(tables, counts, strict=True)
            if np.searchsorted(tc, c) < len(tc) and tc[np.searchsorted(tc, c)] == c
        ]
        kind, detail, entropy = classify_content(page)
        row = {
            "content_hash": hashlib.sha256(page).hexdigest(),
            "copies": n,
            "bytes": n * ps,
            "input_count": len(where),
            "inputs": " ".join(where),
            "content_class": kind,
            "class_detail": detail,
            "entropy_bits_per_byte": round(entropy, 3),
        }
        if show_content:
            row["content_hex"] = page[:CONTENT_HEAD_BYTES].hex()
        records.append(row)
    return pd.DataFrame(records, columns=columns)


def with_zero_row(
    top: pd.DataFrame, per_input: pd.DataFrame, page_size: int, *, limit: int,
    show_content: bool = False,
) -> pd.DataFrame:
    """Add the all-zero page to ``top_contents`` with the model's zero page counts."""
    zero = per_input[per_input["zero_pages"] > 0]
    total = int(zero["zero_pages"].sum())
    if total < 2 or limit <= 0:
        return top.head(limit).reset_index(drop=True)
    page = bytes(page_size)
    row = {
        "content_hash": hashlib.sha256(page).hexdigest(),
        "copies": total,
        "bytes": total * page_size,
        "input_count": len(zero),
        "inputs": " ".join(f"{Path(p).name}:{n}" for p, n in
                           zip(zero["input"], zero["zero_pages"], strict=True)),
        "content_class": "zero",
        "class_detail": "",
        "entropy_bits_per_byte": 0.0,
    }
    if show_content:
        row["content_hex"] = page[:CONTENT_HEAD_BYTES].hex()
    df = pd.concat([pd.DataFrame([row], columns=top.columns), top], ignore_index=True)
    df = df.sort_values("copies", ascending=False, kind="stable").head(limit)
    return df.reset_index(drop=True)


def address_map(
    tables: Sequence[PageTable],
    eligible: Sequence[np.ndarray],
    *,
    bins: int = ADDRESS_BINS,
    scope: Scope = Scope.MERGEABLE,
) -> pd.DataFrame:
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
    counts = _class_counts(tables, eligible)
    # Classes held by two or more inputs.
    held = np.concatenate([cls for cls, _ in counts]) if counts else np.empty(0, np.int64)
    cls, n_inputs = np.unique(held, return_counts=True)
    across = cls[n_inputs > 1]
    frames = []
    for t, elig in zip(tables, eligible, strict=True):
        assert t.content is not None
        ps = t.page_size
        ext = sorted(t.extents, key=lambda e: e.addr)
        starts = np.array([e.addr for e in ext], np.uint64)
        sizes = np.array([e.npages for e in ext], np.int64)
        first_index = np.concatenate([[0], np.cumsum(sizes)])
        total = int(first_index[-1])
        nb = max(1, min(bins, total))
        edges = np.linspace(0, total, nb + 1).round().astype(np.int64)
        kinds = {k: np.zeros(nb, np.int64) for k in ADDRESS_KINDS}
        # Stored pages, by content.
        k = np.searchsorted(starts, t.addrs, side="right") - 1
        index = first_index[k] + ((t.addrs - starts[k]) // np.uint64(ps)).astype(np.int64)
        which = np.searchsorted(edges, index, side="right") - 1
        c = t.content
        dup = c >= 0
        is_across = dup & np.isin(c, across)
        for name, mask in (
            ("zero_pages", elig & (c == ZERO)),
            ("unique_pages", elig & (c == UNIQUE)),
            ("duplicate_within_pages", elig & dup & ~is_across),
            ("duplicate_across_pages", elig & is_across),
            ("ineligible_pages", ~elig),
        ):
            kinds[name] += np.bincount(which[mask], minlength=nb)[:nb]
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
        frames.append(pd.DataFrame({
            "input": _name(t),
            "bin": np.arange(nb),
            "first_address": addr_of(edges[:-1]),
            "last_address": addr_of(np.maximum(edges[1:] - 1, edges[:-1])),
            "pages": np.diff(edges),
            **kinds,
        }))
    columns = ["input", "bin", "first_address", "last_address", "pages", *ADDRESS_KINDS]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


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


def sharing_tables(
    tables: Sequence[PageTable],
    readers: Sequence[DumpReader],
    eligible: Sequence[np.ndarray],
    *,
    max_page_sharing: int = 256,
    top: int = 20,
    show_content: bool = False,
    scope: Scope = Scope.MERGEABLE,
) -> SharingTables:
    """All three tables; call while ``readers`` are open (``top_contents`` reads pages)."""
    return SharingTables(
        pairwise=pairwise(tables, eligible, max_page_sharing=max_page_sharing),
        top_contents=top_contents(tables, readers, eligible, top=top,
                                  show_content=show_content),
        address_map=address_map(tables, eligible, scope=scope),
    )
