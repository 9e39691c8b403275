"""Near-duplicates: contents that differ from another content in a few bytes.

Pages that "should" be equal often are not: a trailer pointer, a counter, a per-process
canary, ASLR in a page table or a heap header. KSM merges only pages equal byte for byte
(``mm/ksm.c``: ``memcmp_pages()`` before ``try_to_merge_one_page()``), so each such page
costs a page of its own. This what-if finds them and says where they differ, with offsets
and counts only: no page bytes leave the machine.

The method (:data:`METHOD`): every distinct non-zero content KSM scans (one page of each:
the pages of a stage 2 class hold the same bytes) is cut into :data:`BANDS` bands of equal
length, and each band is hashed (a multiply-add hash of its 64-bit words, then a 64-bit
mix). For each of the 28 pairs of bands ``{b1, b2}``, contents are sorted by a key made of
every other band's hash: contents with equal keys (and every other band's hash equal) are
equal outside ``b1`` and ``b2``. Contents linked that way form a group; its representative
is the content with the most pages, and each member is compared with it byte for byte: a
member is kept only when its bytes differ from the representative's inside at most two
bands (so nothing reported rests on a hash), and the differing bytes are counted, the
first differing offset found and the differing ranges merged. Contents that differ in more
than two bands from every other are not found; nor are contents that differ only by a
shift of their bytes.

Cost: one read of every distinct content (blocks of :data:`BLOCK_PAGES` pages), 64 bytes of
band hashes per content, 28 sorts of the contents, and one more read of the reported
groups' contents. Beyond ``max_contents`` distinct contents, a uniform sample of them is
compared, and a warning says so with the fraction (a pair is found with the square of it).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..columns import Columns
from ..eligibility import ScanMask
from ..formats.base import DumpReader
from ..hashing.stage1 import Fingerprints
from ..hashing.stage2 import ZERO
from ..units import short_names

__all__ = ["BANDS", "GROUP_COLUMNS", "HISTOGRAM_COLUMNS", "METHOD", "NearDuplicates",
           "empty_tables", "near_duplicates"]

BANDS = 8
"""Bands each page is cut into (512 bytes each in a 4 KiB page)."""
MAX_CONTENTS = 1 << 20
"""Distinct contents compared at most; beyond it, a uniform sample of this many."""
BLOCK_PAGES = 4096
"""Pages read and hashed at a time (16 MiB of 4 KiB pages): the bound on the pages held."""
RANGES_SHOWN = 16
"""Differing ranges listed per group (``differing_range_count`` counts them all)."""
SEED = 0
"""Seed of the hash constants and of the sample: the same inputs give the same groups."""

METHOD = (f"contents equal outside at most 2 of {BANDS} equal bands of the page (band hashes "
          "matched, then every member compared byte for byte with its group's "
          "representative, the content with the most pages)")
"""The method in one phrase, for the text, the warnings and the docs."""

GROUP_COLUMNS = ("group", "pages", "contents", "input_count", "inputs", "differing_ranges",
                 "differing_range_count", "differing_bytes_min", "differing_bytes_max",
                 "first_differing_offset", "saved_pages", "saved_if_equal_pages",
                 "extra_saved_pages", "extra_saved_bytes")
"""Columns of the ``near_duplicates`` table."""
HISTOGRAM_COLUMNS = ("histogram", "low", "high", "contents", "pages")
"""Columns of the ``near_duplicate_histogram`` table."""


@dataclass(frozen=True)
class NearDuplicates:
    """What :func:`near_duplicates` finds.

    Attributes:
        groups: the ``near_duplicates`` table, one row per group, most pages first.
        histogram: the ``near_duplicate_histogram`` table.
        contents_compared: distinct contents whose bands were hashed.
        contents_found: distinct non-zero contents KSM scans whose bytes are readable.
        warnings: the sampling, and inputs whose bytes are not here.
    """

    groups: Columns
    histogram: Columns
    contents_compared: int = 0
    contents_found: int = 0
    warnings: list[str] = field(default_factory=list)


def empty_tables() -> dict[str, Columns]:
    """The two tables with no rows (the what-if off, or out of core)."""
    return {"near_duplicates": Columns.from_records([], list(GROUP_COLUMNS)),
            "near_duplicate_histogram": Columns.from_records([], list(HISTOGRAM_COLUMNS))}


def near_duplicates(
    fingerprints: Sequence[Fingerprints],
    labels: Sequence[np.ndarray],
    masks: Sequence[ScanMask],
    readers: Sequence[DumpReader | None],
    *,
    top: int,
    max_page_sharing: int,
    max_contents: int | None = None,
) -> NearDuplicates:
    """The ``top`` groups of near-duplicate contents (most pages first), by :data:`METHOD`.

    Args:
        fingerprints: each input's stage 1 fingerprints.
        labels: stage 2's content label of each stored page (``ContentClasses.labels``).
        masks: which pages KSM scans (only those are counted).
        readers: each input's open reader; None where its bytes are not here (a fingerprint
            file): contents found only there are left out, and a warning names the inputs.
        top: groups reported at most.
        max_page_sharing: KSM's limit of pages per KSM page, for the pages saved.
        max_contents: distinct contents compared at most; beyond it a uniform sample
            (None: :data:`MAX_CONTENTS`).

    Returns:
        :class:`NearDuplicates`. ``near_duplicates`` columns: ``group`` (1, 2, ...),
        ``pages`` (scanned pages holding the group's contents, all inputs), ``contents``,
        ``input_count``, ``inputs`` (pages per input name), ``differing_ranges`` (byte
        ranges ``first-last``, inclusive, where some member differs from the
        representative; the first :data:`RANGES_SHOWN`), ``differing_range_count``,
        ``differing_bytes_min``/``_max`` (bytes a member differs from the representative
        in), ``first_differing_offset`` (the lowest), ``saved_pages`` (what KSM saves on
        these pages now), ``saved_if_equal_pages`` (what it would save if they were one
        content: ``pages - ceil(pages / max_page_sharing)``), ``extra_saved_pages`` and
        ``extra_saved_bytes`` (the difference). ``near_duplicate_histogram``: one row per
        bucket, over the groups' members other than their representatives; ``histogram``
        ``differing_bytes`` (buckets 1, 2-3, 4-7, ... up to the page size) or
        ``first_differing_offset`` (one bucket per band), ``low`` and ``high`` (inclusive),
        ``contents`` and ``pages``.
    """
    ps = fingerprints[0].page_size if fingerprints else 4096
    warnings: list[str] = []
    names = short_names([fp.path for fp in fingerprints])
    blind = [names[i] for i, r in enumerate(readers) if r is None]
    if blind:
        warnings.append(f"near_duplicates: no page bytes of {', '.join(blind)} (fingerprint "
                        "files whose dumps are not readable here): contents found only there "
                        "are left out")
    if ps % (8 * BANDS):
        warnings.append(f"near_duplicates: a page of {ps:,} bytes does not cut into "
                        f"{BANDS} bands of 64-bit words: not computed")
        empty = empty_tables()
        return NearDuplicates(empty["near_duplicates"], empty["near_duplicate_histogram"],
                              warnings=warnings)
    max_contents = MAX_CONTENTS if max_contents is None else max_contents
    rep_input, rep_row, pages, klass = _contents(labels, masks, readers)
    found = len(pages)
    chosen = np.arange(found)
    if found > max_contents:
        rng = np.random.default_rng(SEED)
        chosen = np.sort(rng.choice(found, max_contents, replace=False))
        warnings.append(
            f"near_duplicates: {found:,} distinct contents, more than {max_contents:,}: a "
            f"uniform sample of {max_contents:,} ({max_contents / found:.1%}) was compared, "
            f"so a near-duplicate pair is found with a chance of about "
            f"{(max_contents / found) ** 2:.1%} and groups count only their sampled "
            f"contents; method: {METHOD}")
    rep_input, rep_row, pages, klass = (a[chosen] for a in (rep_input, rep_row, pages, klass))
    hashes = _band_hashes(fingerprints, readers, rep_input, rep_row, ps)
    component = _components(hashes)
    rows: list[dict[str, object]] = []
    counts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # bytes, first, pages
    for members in _ranked_groups(component, pages):
        if len(rows) >= top:
            break
        compared = _compare(members, fingerprints, readers, rep_input, rep_row, pages, ps)
        if compared is None:
            continue
        kept, n_bytes, first, union = compared
        row = _group_row(kept, n_bytes, first, union, pages, klass, rep_input, rep_row,
                         fingerprints, labels, masks, names, max_page_sharing, ps)
        row["group"] = len(rows) + 1
        rows.append(row)
        counts.append((n_bytes, first, pages[kept[1:]]))
    return NearDuplicates(Columns.from_records(rows, list(GROUP_COLUMNS)),
                          _histogram(counts, ps), len(chosen), found, warnings)


def _contents(labels: Sequence[np.ndarray], masks: Sequence[ScanMask],
              readers: Sequence[DumpReader | None]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every distinct non-zero scanned content with readable bytes: the input and row of a
    page holding it, its scanned pages (all inputs), its stage 2 class (-1: a unique page).
    Classes first (by number), then unique pages in input and row order."""
    n_classes = max((int(lab.max(initial=-1)) for lab in labels), default=-1) + 1
    class_pages = np.zeros(n_classes, np.int64)
    class_input = np.full(n_classes, -1, np.int64)
    class_row = np.full(n_classes, -1, np.int64)
    unique_input, unique_row = [], []
    for i, (lab, mask, reader) in enumerate(zip(labels, masks, readers, strict=True)):
        rows = np.flatnonzero(mask.scanned & (lab != ZERO))
        cls = lab[rows]
        shared = cls >= 0
        class_pages += np.bincount(cls[shared], minlength=n_classes)
        if reader is None:
            continue
        present, first = np.unique(cls[shared], return_index=True)
        new = class_input[present] < 0
        class_input[present[new]] = i
        class_row[present[new]] = rows[shared][first[new]]
        singles = rows[~shared]
        unique_input.append(np.full(len(singles), i, np.int64))
        unique_row.append(singles)
    readable = np.flatnonzero(class_input >= 0)
    empty = np.empty(0, np.int64)
    u_in = np.concatenate(unique_input) if unique_input else empty
    u_row = np.concatenate(unique_row) if unique_row else empty
    return (np.concatenate([class_input[readable], u_in]),
            np.concatenate([class_row[readable], u_row]),
            np.concatenate([class_pages[readable], np.ones(len(u_in), np.int64)]),
            np.concatenate([readable, np.full(len(u_in), -1, np.int64)]))


def _read(fingerprints: Sequence[Fingerprints], readers: Sequence[DumpReader | None],
          rep_input: np.ndarray, rep_row: np.ndarray, which: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    """The pages of contents ``which`` (one input's, in row order) as
    ``(len(which), page_size)`` bytes, and ``which`` in the order read."""
    i = int(rep_input[which[0]])
    reader = readers[i]
    assert reader is not None  # _contents keeps only readable contents
    order = which[np.argsort(rep_row[which], kind="stable")]
    data = reader.read_pages(fingerprints[i].addrs[rep_row[order]])
    return np.ascontiguousarray(data), order


def _blocks(rep_input: np.ndarray, rep_row: np.ndarray, which: np.ndarray
            ) -> list[np.ndarray]:
    """``which`` cut into blocks of one input, rows ascending, at most BLOCK_PAGES each."""
    which = which[np.lexsort((rep_row[which], rep_input[which]))]
    cuts = np.flatnonzero(np.diff(rep_input[which])) + 1
    return [part[s:s + BLOCK_PAGES] for part in np.split(which, cuts) if len(part)
            for s in range(0, len(part), BLOCK_PAGES)]


def _band_hashes(fingerprints: Sequence[Fingerprints], readers: Sequence[DumpReader | None],
                 rep_input: np.ndarray, rep_row: np.ndarray, ps: int) -> np.ndarray:
    """A 64-bit hash of each band of each content: ``(contents, BANDS)`` uint64."""
    words = ps // 8
    rng = np.random.default_rng(SEED)
    mult = rng.integers(0, 1 << 63, words, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    out = np.empty((len(rep_input), BANDS), np.uint64)
    for block in _blocks(rep_input, rep_row, np.arange(len(rep_input))):
        data, order = _read(fingerprints, readers, rep_input, rep_row, block)
        w = data.view(np.uint64).reshape(len(order), BANDS, words // BANDS)
        h = (w * mult.reshape(BANDS, -1)).sum(axis=2, dtype=np.uint64)
        out[order] = _mix(h)
    return out


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit moves every output bit."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    out: np.ndarray = h ^ (h >> np.uint64(31))
    return out


def _components(hashes: np.ndarray) -> np.ndarray:
    """Each content's group: the lowest content linked to it through contents whose band
    hashes are equal outside two bands (itself when none is)."""
    n = len(hashes)
    rng = np.random.default_rng(SEED + 1)
    weight = rng.integers(0, 1 << 63, BANDS, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    weighted = hashes * weight
    total = weighted.sum(axis=1, dtype=np.uint64)
    us, vs = [], []
    for b1, b2 in itertools.combinations(range(BANDS), 2):
        key = total - weighted[:, b1] - weighted[:, b2]
        order = np.argsort(key, kind="stable")
        ranked = key[order]
        same = np.flatnonzero(ranked[1:] == ranked[:-1]) + 1  # rows equal to the one before
        if not len(same):
            continue
        starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
        head = order[starts[np.searchsorted(starts, same, side="right") - 1]]
        u, v = head, order[same]
        others = [b for b in range(BANDS) if b not in (b1, b2)]
        really = (hashes[u][:, others] == hashes[v][:, others]).all(axis=1)  # not a sum's
        us.append(u[really])
        vs.append(v[really])
    group = np.arange(n)
    if not us:
        return group
    u, v = np.concatenate(us), np.concatenate(vs)
    while True:  # label propagation: each edge pulls both ends to the lower label
        low = np.minimum(group[u], group[v])
        before = group.copy()
        np.minimum.at(group, u, low)
        np.minimum.at(group, v, low)
        group = group[group]
        if np.array_equal(group, before):
            return group


def _ranked_groups(component: np.ndarray, pages: np.ndarray) -> list[np.ndarray]:
    """Groups of two or more contents, most pages first (ties: the lower content first),
    each its contents with the representative (most pages, then lowest) first."""
    n = len(component)
    linked = np.flatnonzero(component != np.arange(n))
    roots = np.unique(component[linked])
    members = np.concatenate([roots, linked])
    members = members[np.lexsort((members, -pages[members], component[members]))]
    cuts = np.flatnonzero(np.diff(component[members])) + 1
    groups = np.split(members, cuts) if len(members) else []
    totals = [int(pages[g].sum()) for g in groups]
    order = sorted(range(len(groups)), key=lambda k: (-totals[k], int(groups[k].min())))
    return [groups[k] for k in order]


def _compare(members: np.ndarray, fingerprints: Sequence[Fingerprints],
             readers: Sequence[DumpReader | None], rep_input: np.ndarray,
             rep_row: np.ndarray, pages: np.ndarray, ps: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Each member compared with the representative (``members[0]``) byte for byte: the
    contents kept (the representative first, then those differing inside at most two
    bands), their differing bytes and first differing offsets (members after the first),
    and the union of their differing bytes; None when no member is kept."""
    rep = members[:1]
    ref = _read(fingerprints, readers, rep_input, rep_row, rep)[0][0]
    kept, n_bytes, first = [], [], []
    union = np.zeros(ps, bool)
    for block in _blocks(rep_input, rep_row, members[1:]):
        data, order = _read(fingerprints, readers, rep_input, rep_row, block)
        diff = data != ref
        bands = diff.reshape(len(order), BANDS, -1).any(axis=2).sum(axis=1)
        ok = (bands >= 1) & (bands <= 2)
        kept.append(order[ok])
        n_bytes.append(diff[ok].sum(axis=1))
        first.append(diff[ok].argmax(axis=1))
        union |= diff[ok].any(axis=0)
    if not kept or not sum(map(len, kept)):
        return None
    back = np.concatenate(kept)
    rank = np.lexsort((back, -pages[back]))  # the group's order: most pages first
    return (np.concatenate([rep, back[rank]]), np.concatenate(n_bytes)[rank].astype(np.int64),
            np.concatenate(first)[rank].astype(np.int64), union)


def _saved(n: np.ndarray | int, max_page_sharing: int) -> np.ndarray:
    """Pages KSM saves on ``n`` pages of one content: all but one KSM page per
    ``max_page_sharing`` of them."""
    n = np.asarray(n, np.int64)
    return np.where(n > 0, n - -(-n // max_page_sharing), 0)


def _group_row(kept: np.ndarray, n_bytes: np.ndarray, first: np.ndarray, union: np.ndarray,
               pages: np.ndarray, klass: np.ndarray, rep_input: np.ndarray,
               rep_row: np.ndarray, fingerprints: Sequence[Fingerprints],
               labels: Sequence[np.ndarray], masks: Sequence[ScanMask], names: list[str],
               max_page_sharing: int, ps: int) -> dict[str, object]:
    """One row of ``near_duplicates``."""
    total = int(pages[kept].sum())
    where: dict[str, int] = {}
    classes = klass[kept][klass[kept] >= 0]
    singles = rep_input[kept][klass[kept] < 0]
    for i, (lab, mask) in enumerate(zip(labels, masks, strict=True)):
        n = int(np.count_nonzero(np.isin(lab[mask.scanned], classes))) if len(classes) else 0
        n += int(np.count_nonzero(singles == i))
        if n:
            where[names[i]] = n
    edges = np.diff(np.r_[0, union.astype(np.int8), 0])
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    now = int(_saved(pages[kept], max_page_sharing).sum())
    equal = int(_saved(total, max_page_sharing))
    return {
        "pages": total,
        "contents": len(kept),
        "input_count": len(where),
        "inputs": where,
        "differing_ranges": [f"{s}-{e}" for s, e in zip(starts[:RANGES_SHOWN].tolist(),
                                                       ends[:RANGES_SHOWN].tolist(),
                                                       strict=True)],
        "differing_range_count": len(starts),
        "differing_bytes_min": int(n_bytes.min()),
        "differing_bytes_max": int(n_bytes.max()),
        "first_differing_offset": int(first.min()),
        "saved_pages": now,
        "saved_if_equal_pages": equal,
        "extra_saved_pages": equal - now,
        "extra_saved_bytes": (equal - now) * ps,
    }


def _histogram(counts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], ps: int) -> Columns:
    """``near_duplicate_histogram``: the members' differing bytes in power-of-two buckets
    and their first differing offsets by band, contents and pages in each."""
    n_bytes, first, pages = (np.concatenate([c[k] for c in counts]) if counts
                             else np.empty(0, np.int64) for k in range(3))
    records: list[dict[str, object]] = []
    for k in range(int(math.log2(ps)) + 1):
        low, high = 1 << k, min((2 << k) - 1, ps)
        inside = (n_bytes >= low) & (n_bytes <= high)
        records.append({"histogram": "differing_bytes", "low": low, "high": high,
                        "contents": int(inside.sum()), "pages": int(pages[inside].sum())})
    band = ps // BANDS
    for b in range(BANDS):
        inside = first // band == b
        records.append({"histogram": "first_differing_offset", "low": b * band,
                        "high": (b + 1) * band - 1, "contents": int(inside.sum()),
                        "pages": int(pages[inside].sum())})
    return Columns.from_records(records, list(HISTOGRAM_COLUMNS))
