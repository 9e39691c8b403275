"""Compression beside dedup: what zram or zswap would need for the pages KSM leaves.

After KSM, a host holds one copy of each duplicated content and every unique page; zero
pages cost nothing (they merge, and both zram and zswap store a zero page as a flag). This
module compresses those pages with a kernel codec through maintained bindings and prices
each as the kernel would store it (docs/model.md, "Compression beside dedup"):

* ``lz4``: python-lz4's ``lz4.block.compress(mode="default")``, LZ4_compress_default,
  which is what zram's ``drivers/block/zram/backend_lz4.c`` (``lz4_compress``:
  ``LZ4_compress_fast`` at ``LZ4_ACCELERATION_DEFAULT``, 1) and the crypto API's lz4 run;
* ``zstd``: ``zstandard`` at level 3, ``zstd_default_clevel()``, which zram's
  ``backend_zstd.c`` (``zstd_setup_params``) and ``crypto/zstd.c`` (``ZSTD_DEF_LEVEL``) use.

zram (``drivers/block/zram/zram_drv.c``, ``zram_write_page``): a page whose 8-byte words are
all equal (``page_same_filled``) is a flag, no storage; a compressed length at or above
``huge_class_size`` is stored whole (``write_incompressible_page``, ZRAM_HUGE); any other is
one zsmalloc object. zswap (``mm/zswap.c``, ``zswap_compress``): a compressed length of a
page or more is not stored compressed (rejected, or kept as-is where writeback is allowed:
a page of memory either way); zero-filled pages are a flag (``zswap_is_folio_zero_filled``;
other same-filled pages are compressed like any). zsmalloc (``mm/zsmalloc.c``,
``zs_malloc``) stores an object in the size class of its length plus ``ZS_HANDLE_SIZE``,
classes merged as ``zs_create_pool`` merges them: :func:`zsmalloc_sizes`.

The pass reads each page once from the open readers (``DumpReader.read_pages``), batches of
pages on threads for zstd (it compresses a batch in one call without the GIL,
``multi_compress_to_buffer``; lz4, a call per page, runs on one), and keeps the stored bytes per duplicated content and per
input's unique pages, so any group of inputs can be priced (:meth:`Compressed.price`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._parallel import imap_threads
from ..columns import Columns
from ..content_table import ContentTable
from ..eligibility import ScanMask
from ..errors import KsmAnalyzeError
from ..formats.base import DumpReader
from ..hashing.stage1 import Fingerprints
from ..options import COMPRESS_CODECS

__all__ = ["CODECS", "COMPRESSION_COLUMNS", "SAVINGS_ROW", "Codec", "Compressed", "codec_info",
           "compress_contents", "empty_table", "page_costs", "same_filled", "with_savings_row",
           "zsmalloc_sizes"]

CODECS = COMPRESS_CODECS
"""``--compress``: the codecs a kernel's zram and zswap offer that have maintained bindings."""
ZSTD_LEVEL = 3
"""zstd's level: ``zstd_default_clevel()`` (ZSTD_CLEVEL_DEFAULT), what zram's backend_zstd.c
takes when no level is set, and crypto/zstd.c's ``ZSTD_DEF_LEVEL``."""
LZ4_ACCELERATION = 1
"""lz4's acceleration: ``LZ4_ACCELERATION_DEFAULT``, zram's backend_lz4.c default."""
ZS_HANDLE_SIZE = 8
"""``sizeof(unsigned long)``: zs_malloc adds it to every object (64-bit kernels)."""
ZS_MIN_ALLOC_SIZE = 32
"""``MAX(32, ZS_MAX_PAGES_PER_ZSPAGE << PAGE_SHIFT >> OBJ_INDEX_BITS)``: 32 on x86-64."""
ZSMALLOC_CHAIN_SIZE = 8
"""``CONFIG_ZSMALLOC_CHAIN_SIZE``'s default: the most pages a zspage chains."""
BATCH_PAGES = 4096
"""Pages compressed per task (16 MiB of 4 KiB pages)."""
CONFIDENCE_Z = 1.959963984540054
"""The standard normal quantile of a two-sided 95% interval."""
SAMPLE_SEED = 22
"""Seed of ``--compress-sample``'s draw: the same inputs give the same sample."""

# Per page (and summed): bytes the codec produced, zram's bytes, zswap's bytes,
# then counts of same-filled (zram stores nothing), huge (zram stores the whole page),
# and zswap-rejected (compressed to a page or more) pages.
_F_CODEC, _F_ZRAM, _F_ZSWAP, _F_SAME, _F_HUGE, _F_REJECTED = range(6)
_FIELDS = 6

COMPRESSION_COLUMNS = (
    "input", "codec", "pages", "bytes", "distinct_pages", "distinct_bytes", "dedup_ratio",
    "compressed_pages", "codec_bytes", "compression_ratio", "same_filled_pages",
    "zram_huge_pages", "zram_bytes", "zram_ratio", "zram_ratio_low", "zram_ratio_high",
    "zswap_rejected_pages", "zswap_bytes", "zswap_ratio", "zram_combined_ratio",
    "zswap_combined_ratio")
"""Columns of the ``compression`` table (docs/cli.md, "--compress")."""


@dataclass(frozen=True)
class Codec:
    """A codec as this run calls it: its name, the binding and its version, the setting."""

    name: str
    library: str
    version: str
    setting: str

    def describe(self) -> str:
        """``lz4 (python-lz4 4.4.5, LZ4 1.9.4, acceleration 1)``."""
        return f"{self.name} ({self.library} {self.version}, {self.setting})"


def codec_info(name: str) -> Codec:
    """The :class:`Codec` of ``name``.

    Raises:
        ValueError: not one of :data:`CODECS`.
    """
    if name == "lz4":
        import lz4

        return Codec("lz4", "python-lz4", f"{lz4.__version__}, LZ4 {lz4.library_version_string()}",
                     f"acceleration {LZ4_ACCELERATION}: LZ4_compress_default")
    if name == "zstd":
        import zstandard

        return Codec("zstd", "zstandard", f"{zstandard.__version__}, zstd "
                     + ".".join(map(str, zstandard.ZSTD_VERSION)), f"level {ZSTD_LEVEL}")
    raise ValueError(f"--compress {name!r}: choose one of {', '.join(CODECS)}")


def zsmalloc_sizes(page_size: int, chain: int = ZSMALLOC_CHAIN_SIZE) -> tuple[np.ndarray, int]:
    """Bytes zsmalloc takes for an object of each length ``0 .. page_size``, and zram's
    ``huge_class_size``.

    ``zs_create_pool`` (mm/zsmalloc.c) makes a size class every ``page_size >> 8`` bytes
    from ZS_MIN_ALLOC_SIZE up to the page, largest first: each chains the pages
    (``calculate_zspage_chain_size``: 1 for a power of two, else the fewest pages, up to
    ``chain``, that waste the least) and a class with the same pages and objects per zspage
    as the one above it is merged into that one (``can_merge``). ``huge_class_size`` is the
    size of the largest class that is not huge (more than one page and one object a zspage)
    less ``ZS_HANDLE_SIZE - 1``. ``zs_malloc`` adds ``ZS_HANDLE_SIZE`` and takes the class
    of ``get_size_class_index``.
    """
    delta = page_size >> 8
    classes = -(-(page_size - ZS_MIN_ALLOC_SIZE) // delta) + 1
    class_size = np.zeros(classes, np.int64)
    huge = 0
    prev: tuple[int, int, int] | None = None  # size, pages, objects of the class above
    for i in range(classes - 1, -1, -1):
        size = min(ZS_MIN_ALLOC_SIZE + i * delta, page_size)
        pages = _chain_size(size, page_size, chain)
        objects = pages * page_size // size
        if pages != 1 and objects != 1 and not huge:
            huge = size - (ZS_HANDLE_SIZE - 1)
        if prev is not None and prev[1:] == (pages, objects):
            class_size[i] = prev[0]
            continue
        prev = (size, pages, objects)
        class_size[i] = size
    want = np.arange(page_size + 1) + ZS_HANDLE_SIZE
    index = np.where(want > ZS_MIN_ALLOC_SIZE,
                     -(-(want - ZS_MIN_ALLOC_SIZE) // delta), 0)
    return class_size[np.minimum(index, classes - 1)], huge


def _chain_size(size: int, page_size: int, chain: int) -> int:
    """``calculate_zspage_chain_size``: pages a zspage of objects of ``size`` chains."""
    if size & (size - 1) == 0:
        return 1
    best, pages = page_size, 1
    for i in range(1, chain + 1):
        waste = i * page_size % size
        if waste < best:
            best, pages = waste, i
    return pages


def same_filled(pages: np.ndarray) -> np.ndarray:
    """bool per page of ``pages`` ``(n, page_size)``: every 8-byte word equals the first
    (zram_drv.c's ``page_same_filled``)."""
    words = pages.view(np.uint64)
    return np.asarray((words == words[:, :1]).all(axis=1))


def compressed_lengths(pages: np.ndarray, codec: str, threads: int = 1) -> np.ndarray:
    """The codec's output length of each page of ``pages`` ``(n, page_size)`` (int64):
    zstd's frame (level 3, no checksum, the content size in its header, as the kernel's
    ``zstd_compress_cctx`` writes it), lz4's raw block (no size prefix)."""
    n, size = pages.shape
    if not n:
        return np.empty(0, np.int64)
    flat = np.ascontiguousarray(pages).reshape(-1)
    if codec == "zstd":
        import zstandard

        segments = np.empty((n, 2), np.uint64)
        segments[:, 0] = np.arange(n, dtype=np.uint64) * np.uint64(size)
        segments[:, 1] = size
        batch = zstandard.BufferWithSegments(flat.tobytes(), segments.tobytes())
        out: Any = zstandard.ZstdCompressor(level=ZSTD_LEVEL).multi_compress_to_buffer(
            batch, threads=threads)  # a collection of the frames, in order
        return np.fromiter((len(s) for s in out), np.int64, n)
    import lz4.block

    view = flat.data
    compress = lz4.block.compress
    return np.fromiter((len(compress(view[i * size:(i + 1) * size], mode="default",
                                     store_size=False)) for i in range(n)), np.int64, n)


def page_costs(lengths: np.ndarray, same: np.ndarray, page_size: int) -> np.ndarray:
    """``(n, 6)`` int64 per page: codec bytes, zram bytes, zswap bytes, same-filled, huge,
    zswap-rejected (0/1), from each page's compressed length and same-filled flag."""
    alloc, huge_class = zsmalloc_sizes(page_size)
    lengths = np.asarray(lengths, np.int64)
    out = np.zeros((len(lengths), _FIELDS), np.int64)
    stored = alloc[np.minimum(lengths, page_size)]
    huge = ~same & (lengths >= huge_class)
    rejected = lengths >= page_size
    out[:, _F_CODEC] = lengths
    out[:, _F_ZRAM] = np.where(same, 0, np.where(huge, page_size, stored))
    out[:, _F_ZSWAP] = np.where(rejected, page_size, stored)
    out[:, _F_SAME] = same
    out[:, _F_HUGE] = huge
    out[:, _F_REJECTED] = rejected
    return out


@dataclass(frozen=True)
class Compressed:
    """Stored bytes of the pages KSM leaves, kept so any group of inputs can be priced.

    Attributes:
        codec: what compressed them.
        page_size: bytes per page.
        content: sorted ids of the duplicated contents (``ContentTable.classes()``).
        content_costs: ``(len(content), 6)`` per content: codec bytes, zram bytes, zswap
            bytes, same-filled, huge, zswap-rejected (one page of each content).
        unique_costs: ``(inputs, 6)`` the same summed over each input's unique pages.
        sample: pages sampled per row (0: every page was compressed; then only the
            ``compression`` table is estimated and :meth:`price` is not available).
    """

    codec: Codec
    page_size: int
    content: np.ndarray
    content_costs: np.ndarray
    unique_costs: np.ndarray
    sample: int = 0
    table: Columns = field(default_factory=lambda: empty_table())

    def price(self, table: ContentTable, inputs: Sequence[int]) -> np.ndarray:
        """The six sums (codec, zram, zswap bytes; same-filled, huge, rejected pages) of a
        host holding ``inputs`` (positions in ``table``, the analysis' core table)."""
        if self.sample:
            raise ValueError("--compress-sample prices a sample: planning needs every page "
                             "compressed (--compress-sample 0)")
        held = np.isin(table.owner, np.asarray(inputs, np.int32))
        contents = np.unique(table.content[held])
        at = np.searchsorted(self.content, contents)
        return np.asarray(self.unique_costs[list(inputs)].sum(axis=0)
                          + self.content_costs[at].sum(axis=0), np.int64)


SAVINGS_ROW = "compressed_zram"
"""The row ``--compress`` adds to the ``savings`` table: the host's zram bytes."""


def with_savings_row(savings: Columns, compression: Columns) -> Columns:
    """``savings`` with a row :data:`SAVINGS_ROW`: what zram would need for what KSM leaves
    of all inputs (the host's ``zram_bytes``), in every scenario (zero pages cost nothing
    in either); no pages value (not whole pages), its percent of memory before."""
    zram = int(compression["zram_bytes"][-1])
    keys = list(savings.keys)
    data: dict[str, list[Any]] = {}
    for name in savings.data:
        values = list(savings[name])
        if name == savings.index:
            values.append(SAVINGS_ROW)
        elif name.endswith("_pages"):
            values.append(None)
        elif name.endswith("_bytes"):
            values.append(zram)
        else:  # _percent
            before = savings.at("memory_before", name.removesuffix("_percent") + "_bytes")
            values.append(100.0 * zram / before if before else 0.0)
        data[name] = values
    assert len(data[savings.index or "item"]) == len(keys) + 1
    return Columns(data, savings.index)


def empty_table() -> Columns:
    """The ``compression`` table of an analysis without ``--compress``."""
    return Columns.from_records([], list(COMPRESSION_COLUMNS))


def _items(table: ContentTable, prints: Sequence[Fingerprints], masks: Sequence[ScanMask],
           labels: Sequence[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Per input, the rows of its unique scanned non-zero pages; the duplicated contents
    (sorted) and for each, one input and row holding it (as input * 2^40 + row)."""
    dup = table.classes()
    unique_rows, reps = [], np.full(len(dup), -1, np.int64)
    for k, (fp, mask, lab) in enumerate(zip(prints, masks, labels, strict=True)):
        rows = np.flatnonzero(mask.scanned & (fp.prefix != 0))
        lab = lab[rows]
        at = np.searchsorted(dup, lab)
        is_dup = (lab >= 0) & (at < len(dup)) & (dup[np.minimum(at, len(dup) - 1)] == lab) \
            if len(dup) else np.zeros(len(rows), bool)
        unique_rows.append(rows[~is_dup])
        found, first = np.unique(at[is_dup], return_index=True)
        need = reps[found] < 0
        reps[found[need]] = (np.int64(k) << 40) + rows[is_dup][first[need]]
    return unique_rows, dup, reps


def compress_contents(table: ContentTable, prints: Sequence[Fingerprints],
                      masks: Sequence[ScanMask], labels: Sequence[np.ndarray],
                      readers: Sequence[DumpReader | None], *, codec: str, sample: int = 0,
                      jobs: int = 1) -> Compressed:
    """Compress the pages KSM leaves of the inputs of ``table`` (the core table these
    fingerprints, masks and stage-2 labels built) and price them as zram and zswap store
    them; with ``sample``, only a uniform random sample of that many remaining pages per
    input and for the host.

    Raises:
        KsmAnalyzeError: an input has no page bytes here (a fingerprint file).
    """
    info = codec_info(codec)
    for fp, reader in zip(prints, readers, strict=True):
        if reader is None:
            raise KsmAnalyzeError(f"{fp.path}: --compress needs the pages' bytes, and a "
                                  "fingerprint file holds none: give its dump")
    ps = table.page_size
    unique_rows, dup, reps = _items(table, prints, masks, labels)
    n = len(prints)
    # The items: every unique page of each input, then one page of each duplicated content.
    item_input = np.concatenate([np.full(len(r), k, np.int64) for k, r in
                                 enumerate(unique_rows)] + [reps >> 40])
    item_row = np.concatenate([*unique_rows, reps & ((1 << 40) - 1)])
    n_unique = len(item_input) - len(dup)
    rows_of = _sample_rows(table, unique_rows, dup, n_unique, sample) if sample else None
    wanted = np.arange(len(item_input)) if rows_of is None else \
        np.unique(np.concatenate([r for r in rows_of.values()] + [np.empty(0, np.int64)]))
    costs = np.zeros((len(item_input), _FIELDS), np.int64)
    known = np.zeros(len(item_input), bool)
    batches = list(_batches(item_input, item_row, wanted, prints))
    threads = all(r is not None and r.in_place for r in readers)
    # zstd compresses a batch in one call, without the GIL: a thread per CPU scales. lz4 is
    # a call per page, and two threads fighting for the GIL between calls ran slower than
    # one (BENCHMARKS.md, "Compression"): one thread.
    workers = jobs if threads and codec == "zstd" else 1

    def task(b: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        k, items = batches[b]
        reader = readers[k]
        assert reader is not None
        pages = reader.read_pages(prints[k].addrs[item_row[items]])
        lengths = compressed_lengths(pages, codec, 1 if workers > 1 else jobs)
        yield items, page_costs(lengths, same_filled(pages), ps)

    for done in imap_threads(task, len(batches), workers):
        for items, part in done:
            costs[items] = part
            known[items] = True
    unique_costs = np.zeros((n, _FIELDS), np.int64)
    np.add.at(unique_costs, item_input[:n_unique], costs[:n_unique])
    result = Compressed(info, ps, dup, costs[n_unique:], unique_costs, sample)
    rows = _rows(table, result, costs, rows_of, n_unique)
    return Compressed(info, ps, dup, costs[n_unique:], unique_costs, sample,
                      Columns.from_records(rows, list(COMPRESSION_COLUMNS)))


def _batches(item_input: np.ndarray, item_row: np.ndarray, wanted: np.ndarray,
             prints: Sequence[Fingerprints]) -> Iterator[tuple[int, np.ndarray]]:
    """The wanted items, by input and in file order (address), :data:`BATCH_PAGES` at a
    time."""
    for k, fp in enumerate(prints):
        mine = wanted[item_input[wanted] == k]
        mine = mine[np.argsort(fp.addrs[item_row[mine]], kind="stable")]
        for lo in range(0, len(mine), BATCH_PAGES):
            yield k, mine[lo:lo + BATCH_PAGES]


def _sample_rows(table: ContentTable, unique_rows: Sequence[np.ndarray], dup: np.ndarray,
                 n_unique: int, sample: int) -> dict[int, np.ndarray]:
    """Per row of the table (input k, and -1 for the host), the items drawn: a uniform
    random sample without replacement of ``sample`` of its remaining pages (all of them
    when it has no more)."""
    rng = np.random.default_rng(SAMPLE_SEED)
    starts = np.cumsum([0] + [len(r) for r in unique_rows])
    out = {}
    for k in range(len(unique_rows)):
        held = n_unique + np.searchsorted(dup, np.unique(table.content[table.owner == k]))
        items = np.concatenate([np.arange(starts[k], starts[k + 1]), held])
        out[k] = _draw(rng, items, sample)
    out[-1] = _draw(rng, np.arange(n_unique + len(dup)), sample)
    return out


def _draw(rng: np.random.Generator, items: np.ndarray, sample: int) -> np.ndarray:
    return np.sort(items if len(items) <= sample else rng.choice(items, sample, replace=False))


def _rows(table: ContentTable, result: Compressed, costs: np.ndarray,
          rows_of: dict[int, np.ndarray] | None, n_unique: int) -> list[dict[str, Any]]:
    """The ``compression`` table: a row per input (dedup within it alone), then the host."""
    ps = result.page_size
    zero = table.column("zero_pages")
    nonzero = table.nonzero_pages()
    unique = table.column("unique_pages")
    held = np.bincount(table.owner, minlength=len(zero)) if len(table.owner) else \
        np.zeros(len(zero), np.int64)
    rows = []
    names = table.names
    for k in [*range(len(names)), -1]:
        if k >= 0:
            pages = int(zero[k] + nonzero[k])
            distinct = int(unique[k] + held[k])
            exact = None if rows_of is not None else result.price(table, [k])
        else:
            pages = int(zero.sum() + nonzero.sum())
            distinct = int(unique.sum()) + len(result.content)
            exact = None if rows_of is not None else (result.unique_costs.sum(axis=0)
                                                      + result.content_costs.sum(axis=0))
        drawn = costs[rows_of[k]] if rows_of is not None else None
        rows.append(_row("host" if k < 0 else names[k], result.codec, ps, pages, distinct,
                         exact, drawn))
    return rows


def _row(name: str, codec: Codec, ps: int, pages: int, distinct: int,
         exact: np.ndarray | None, drawn: np.ndarray | None) -> dict[str, Any]:
    """One row: from every page's sums (``exact``) or from a sample's pages (``drawn``),
    scaled to the ``distinct`` remaining pages, with a 95% interval of zram's ratio."""
    low = high = None
    if exact is not None:
        sums, compressed = exact.astype(float), distinct
    else:
        assert drawn is not None
        compressed = len(drawn)
        sums = drawn.sum(axis=0) * (distinct / compressed) if compressed else \
            np.zeros(_FIELDS)
        low, high = _interval(drawn[:, _F_ZRAM], distinct, ps)
    zram, zswap = sums[_F_ZRAM], sums[_F_ZSWAP]
    zram_ratio = _ratio(distinct * ps, zram)
    if exact is not None:
        low = high = zram_ratio
    return {
        "input": name, "codec": codec.describe(), "pages": pages, "bytes": pages * ps,
        "distinct_pages": distinct, "distinct_bytes": distinct * ps,
        "dedup_ratio": _ratio(pages, distinct), "compressed_pages": compressed,
        "codec_bytes": round(sums[_F_CODEC]),
        "compression_ratio": _ratio(distinct * ps, sums[_F_CODEC]),
        "same_filled_pages": round(sums[_F_SAME]), "zram_huge_pages": round(sums[_F_HUGE]),
        "zram_bytes": round(zram), "zram_ratio": zram_ratio,
        "zram_ratio_low": low, "zram_ratio_high": high,
        "zswap_rejected_pages": round(sums[_F_REJECTED]), "zswap_bytes": round(zswap),
        "zswap_ratio": _ratio(distinct * ps, zswap),
        "zram_combined_ratio": _ratio(pages * ps, zram),
        "zswap_combined_ratio": _ratio(pages * ps, zswap),
    }


def _ratio(a: float, b: float) -> float | None:
    """``a / b``, None where ``b`` is 0 (nothing stored: no finite ratio)."""
    return float(a) / float(b) if b else None


def _interval(zram: np.ndarray, population: int, ps: int) -> tuple[float | None, float | None]:
    """95% interval of ``page_size / mean(zram bytes per page)`` over ``population`` pages
    from a simple random sample of them: the normal approximation of the sample mean, with
    the finite population correction, its bounds inverted. None for a bound with no finite
    value (the mean's interval reaching 0), or for a sample of fewer than two pages."""
    n = len(zram)
    if n < 2:
        return None, None
    mean = float(zram.mean())
    se = float(zram.std(ddof=1)) / math.sqrt(n) * math.sqrt(
        max(population - n, 0) / max(population - 1, 1))
    lo, hi = mean - CONFIDENCE_Z * se, mean + CONFIDENCE_Z * se
    return (ps / hi if hi > 0 else None), (ps / lo if lo > 0 else None)
