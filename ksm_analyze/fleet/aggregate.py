"""Aggregating fingerprint files out of core: ``scan``, ``report`` and ``plan`` of a fleet
within ``--memory-limit``.

``analyze()`` holds every input's fingerprints at once: :data:`IN_MEMORY_BYTES_PER_PAGE` a
stored page at its peak. When the inputs are fingerprint files carrying content hashes and
that would exceed the limit (estimated from the row counts in the files' Parquet footers,
without reading a column), :func:`aggregate` builds the same core table with the
partitioned engine of :mod:`.combine`: it reads the files one at a time, spills each
scanned non-zero page's content hash and input into one of ``partitions`` files by the
hash's top bits, and counts one partition at a time. The stage statistics are counted the
same way from a second spill, by prefix hash, of every stored non-zero page (the pages
stage 1 would send to stage 2 are those whose prefix hash another page shares).

Samples of one guest over time are read together, a unit of files at a time
(:func:`file_units`), each series reduced to its latest sample's pages with their change
rates (:data:`SERIES` records); the steady view's rules that need the whole host are applied
as each partition is counted (:class:`SeriesRules`), so the counters and the stability table
are ``analyze()``'s.

Pages are told apart by their xxh3-128 content hashes, as ``analyze()`` does for fingerprint
files whose dumps are not here; a dump that is here is not read again.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..content_table import ContentTable, input_row
from ..eligibility import ScanMask, Scope, scan_mask
from ..errors import InputError, KsmAnalyzeError
from ..hashing.stage1 import Fingerprints
from ..hashing.stage2 import StageStats
from ..ksm import KsmCounters, KsmSettings, predict
from ..over_time import hold_time, ksm_ran
from ..series import (
    churn,
    duplicate_kinds,
    group_samples,
    identity_of,
    input_name,
    no_partner,
    recorded_rmap_item_bytes,
    stability,
    too_fast,
)
from ..units import size_text
from . import fingerprint_files
from .combine import (
    SPILL,
    PartitionCounts,
    _joined,
    assemble,
    count_partition,
    cut,
    prints_pieces,
)

__all__ = ["IN_MEMORY_BYTES_PER_PAGE", "SERIES", "SERIES_REFUSED", "Aggregate", "SeriesRules",
           "aggregate", "default_memory_limit", "file_units", "out_of_core_partitions"]

IN_MEMORY_BYTES_PER_PAGE = 100
"""Peak private memory of ``analyze()`` per stored page of fingerprint files with content
hashes. Measured: ``scan`` of 20 files of 1,000,000 pages each (``benchmarks/bench_fleet.py``
data) peaked at 1,924 MiB of Pss_Anon, 97 bytes a page with the interpreter: the fingerprints
(addr, prefix, content: 32 bytes), stage 2's labels and candidates, the scan masks, the
core table's keys and the ksmd model's timeline, all held at once."""
PARTITION_BYTES_PER_PAGE = 96
"""Peak memory of counting a partition, per stored page in it: the 20-byte (rows) and
24-byte (statistics) records, each's sorted copy and sort index, and the class, owner and
key arrays of :func:`.count_partition`. Measured: 81 bytes a stored page (one partition of
20 files of 1,000,000 pages, a quarter of them zero: 1,571 MiB of Pss_Anon at the peak)."""
RESULT_BYTES_PER_PAGE = 20
"""The result grows as partitions are counted: at most 20 bytes (a sparse row) per stored
page, reached when every content is held by two inputs or more, each one page of it."""
FILE_BYTES_PER_PAGE = 160
"""Peak memory of cutting one fingerprint file into partition pieces, per stored page: the
Parquet table and the columns read from it (64 bytes), the scan mask, and the two spills
(20 and 24 bytes a page) with their sort indexes."""
FIXED_BYTES = 1 << 20
"""Working memory that does not grow with the pages or the inputs."""
INPUT_BYTES = 6 << 10
"""Memory per input: its row of the core table, its fingerprints' metadata (measured: 3.9
KiB an input over 1,000 files of 64 pages)."""
MEMORY_FRACTION = 2
"""Without ``--memory-limit``, the aggregation may use 1/2 of the machine's memory (or of
its cgroup's limit)."""
MAX_PARTITIONS = 1 << 12
"""More partitions than this would mean files of a few records each; a limit needing more
is refused."""

SERIES_FILE_BYTES_PER_PAGE = FILE_BYTES_PER_PAGE
"""Peak memory of reducing the samples of a series together (:func:`read_files`), per
stored page of all its samples: their fingerprints and masks, the series' pages and content
ids across samples (:func:`~ksm_analyze.series.churn`), and the :data:`SERIES` records.
Measured: 125 bytes a page (32 samples of 8,192 pages)."""
SERIES_PARTITION_BYTES_PER_PAGE = 140
""":data:`PARTITION_BYTES_PER_PAGE` with samples over time: the records are :data:`SERIES`
(29 bytes, not 20), with the rules' flags and content ids per record. Measured: 1.36 times
the peak of counting the same 1,000,000 pages without (192 against 142 bytes a page, the
records included)."""

STATS = np.dtype([("prefix", "<u8"), ("lo", "<u8"), ("hi", "<u8")])
"""One stored non-zero page for the stage statistics: its prefix hash and content hash."""
SERIES = np.dtype([("lo", "<u8"), ("hi", "<u8"), ("input", "<u4"), ("rate", "<f8"),
                   ("flags", "u1")])
"""With samples over time, one scanned page of an input's latest sample in a partition: its
content hash, its input, its change rate (writes per second, from its series' samples) and
:data:`ZERO_PAGE` | :data:`CHANGED`. The rules that need the whole host (the hold time, KSM
running, a late duplicate's partners, the stability table's copies) are applied when the
partition is counted (:func:`count_part`)."""
ZERO_PAGE = 1
"""An all-zero page (of a series: those of inputs seen once are counted, not spilled)."""
CHANGED = 2
"""Its content at the last sample is not the one at the first (aged, if KSM ran)."""


def default_memory_limit(meminfo: str = "/proc/meminfo",
                         cgroup: str = "/sys/fs/cgroup/memory.max") -> int:
    """:data:`MEMORY_FRACTION` of the memory this process may have: the machine's
    (``MemTotal``), or its cgroup's limit where that is less (a container's)."""
    total = None
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if total is None:
        total = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    with contextlib.suppress(OSError, ValueError), open(cgroup) as f:  # "max": no limit
        total = min(total, int(f.read().strip()))
    return total // MEMORY_FRACTION


def _footer(path: str) -> tuple[int, bool, list[str | None]] | None:
    """Stored pages of fingerprint file ``path``, whether it has content hashes, and the
    identity of each of its inputs (samples of one guest over time share one), from its
    Parquet footer (None: not readable as one; :func:`aggregate` then says why)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        found = pf.metadata.num_rows, "content_lo" in pf.schema_arrow.names
    except (OSError, ValueError, pa.ArrowException):  # the in-memory path says what is wrong
        return None
    identities: list[str | None] = []
    try:  # a plan only: the file is checked whole as it is read
        meta = fingerprint_files.checked_meta(
            (pf.schema_arrow.metadata or {})[fingerprint_files.META_KEY], found[0])
        for m in meta["inputs"]:
            identity = m["info"].get("identity")
            identities.append(identity if isinstance(identity, str) and identity else None)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        identities = []  # hostile or damaged metadata: reading the file says what is wrong
    return *found, identities


def file_units(identities: Sequence[Sequence[str | None]]) -> list[list[int]]:
    """The files (numbers, by their inputs' ``identities``) to read together: those holding
    samples of one guest over time, joined with every file sharing a guest with them; in
    the order of each unit's first file."""
    parent = list(range(len(identities)))

    def root(f: int) -> int:
        while parent[f] != f:
            parent[f] = parent[parent[f]]
            f = parent[f]
        return f

    first: dict[str, int] = {}
    for f, of_file in enumerate(identities):
        for identity in of_file:
            if identity is None:
                continue
            if identity in first:
                a, b = root(first[identity]), root(f)
                parent[max(a, b)] = min(a, b)
            else:
                first[identity] = f
    units: dict[int, list[int]] = {}
    for f in range(len(identities)):
        units.setdefault(root(f), []).append(f)
    return list(units.values())


def _over_time(identities: Sequence[Sequence[str | None]]) -> bool:
    """Whether some guest has two samples or more among the files' inputs."""
    seen = [i for of_file in identities for i in of_file if i is not None]
    return len(set(seen)) < len(seen)


def series_units(paths: Sequence[str | os.PathLike[str]]) -> list[list[int]] | None:
    """:func:`file_units` of fingerprint files ``paths`` from their footers, or None when no
    guest has two samples among them (each file is then read alone)."""
    footers = [_footer(os.fspath(p)) for p in paths]
    identities = [f[2] if f is not None else [] for f in footers]
    return file_units(identities) if _over_time(identities) else None


def out_of_core_partitions(paths: Sequence[str | os.PathLike[str]], memory_limit: int,
                           jobs: int = 1) -> tuple[int, int, int, int] | None:
    """``(partitions, stored pages, bytes in memory, jobs)`` to aggregate ``paths`` out of
    core (bytes in memory: what analysing them in memory would take; jobs: partitions
    counted at once, up to ``jobs`` as the limit allows), or None when they are to be
    analysed in memory: that fits in ``memory_limit`` (:data:`IN_MEMORY_BYTES_PER_PAGE`,
    :data:`INPUT_BYTES`), or one is not a fingerprint file with content hashes (a dump, a
    cache file: stage 2 reads dumps).

    Raises:
        ValueError: the limit is too small for one file plus one partition.
    """
    if not all(fingerprint_files.is_fingerprint_file(p) for p in paths):
        return None
    footers = [_footer(os.fspath(p)) for p in paths]
    if any(f is None or not f[1] for f in footers):
        return None
    rows = [f[0] for f in footers if f is not None]
    total = sum(rows)
    in_memory = total * IN_MEMORY_BYTES_PER_PAGE + len(rows) * INPUT_BYTES
    if in_memory <= memory_limit:
        return None
    identities = [f[2] for f in footers if f is not None]
    series = _over_time(identities)
    if series:  # a series' samples are read together
        largest = max((sum(rows[f] for f in unit) for unit in file_units(identities)),
                      default=0)
        per_file, per_partition = SERIES_FILE_BYTES_PER_PAGE, SERIES_PARTITION_BYTES_PER_PAGE
    else:
        largest = max(rows, default=0)
        per_file, per_partition = FILE_BYTES_PER_PAGE, PARTITION_BYTES_PER_PAGE
    held = (FIXED_BYTES + len(rows) * INPUT_BYTES + largest * per_file
            + total * RESULT_BYTES_PER_PAGE)
    room, need = memory_limit - held, total * per_partition
    for at_once in dict.fromkeys((max(jobs, 1), 1)):  # jobs partitions in memory, else one
        partitions = 1
        while room > 0 and partitions < MAX_PARTITIONS and need * at_once // partitions > room:
            partitions *= 2
        if room > 0 and need * at_once // partitions <= room:
            return partitions, total, in_memory, min(at_once, partitions)
    least = held + need // MAX_PARTITIONS
    raise ValueError(f"--memory-limit {size_text(memory_limit)} is too small for these "
                     f"{len(rows):,} fingerprint files ({total:,} pages, the largest "
                     f"{'series (its samples are read together) ' if series else ''}"
                     f"{largest:,}): give at least {size_text(least)}")


@dataclass(frozen=True)
class Aggregate:
    """What :func:`aggregate` found.

    Attributes:
        table: the core table, as ``analyze()`` builds it.
        prints: every input's fingerprints without their per-page arrays (the metadata:
            extents, format facts, warnings).
        masks: every input's scan mask without its per-page array (``excluded`` per rule).
        stats: stage 2's statistics, as ``analyze()`` counts them by content hash.
        zero_pages_found: zero pages of all inputs (stored all zero or marked zero).
        partitions: the partitions the hash space was cut into.
        read_seconds, count_seconds: time reading the files, and counting the partitions.
        stability: with samples over time, the stability table's rows (else None).
        stood_still: with samples over time, the duplicated contents' pages, the zero pages
            and the unique pages of the latest samples as they stand.
    """

    table: ContentTable
    prints: list[Fingerprints]
    masks: list[ScanMask]
    stats: StageStats
    zero_pages_found: int
    partitions: int
    read_seconds: float
    count_seconds: float
    stability: list[dict[str, Any]] | None = None
    stood_still: tuple[np.ndarray, int, int] | None = None

    def if_memory_stood_still(self, ksm: KsmSettings) -> KsmCounters | None:
        """With samples over time, the counters of the latest samples as they stand (not
        the steady view), as ``analyze()``'s ``if_memory_stood_still``; else None."""
        if self.stood_still is None:
            return None
        copies, zero, unique = self.stood_still
        return predict(copies, np.array([zero], np.int64), ksm, singletons=unique)


@dataclass(frozen=True)
class FileRead:
    """What the client keeps of one fingerprint file (:func:`read_files`): small, whatever
    the file's size.

    Attributes:
        path: the file.
        rows: its inputs' rows of the core table (``unique_pages`` still 0).
        prints: its inputs' fingerprints without their per-page arrays (the metadata).
        masks: their scan masks without the per-page array.
        pages_hashed, zero_pages: its stored non-zero pages, and its zero pages.
        source: the dump it records (one guest given twice is refused).

    With samples over time, a unit of files read together (:func:`file_units`): the first
    file's read holds the unit's inputs (each input's latest sample, in the order of its
    first sample), and these (the others' are empty):

    Attributes:
        first: per input, where its first sample is (the file's place in the unit, the
            input's in the file): ``analyze()`` orders inputs by it.
        scanned: per input, its latest sample's pages KSM scans (the host's hold time).
        ran: whether a sample recorded KSM running.
        stability: per input seen over time, its row of the stability table (the duplicate
            pages still to count: :func:`count_part`).
        over_time: per input, whether it has two samples or more.
        still_zero: scanned zero pages of the inputs seen once (never spilled: they hold
            still).
    """

    path: str
    rows: list[dict[str, Any]]
    prints: list[Fingerprints]
    masks: list[ScanMask]
    pages_hashed: int
    zero_pages: int
    source: dict[str, Any] | None = None
    first: list[tuple[int, int]] = field(default_factory=list)
    scanned: list[int] = field(default_factory=list)
    ran: bool = False
    stability: dict[int, dict[str, Any]] = field(default_factory=dict)
    over_time: list[bool] = field(default_factory=list)
    still_zero: int = 0


def read_files(paths: Sequence[str], *, scope: Scope, page_size: int, prefix_bytes: int,
               partitions: int, first_input: int = 0, over_time: bool = False
               ) -> tuple[list[FileRead], list[np.ndarray], list[np.ndarray], Exception | None]:
    """The per-file step of :func:`aggregate`, on a run of files (run where they are: here,
    or on a Dask worker, :func:`.cluster.aggregate_on_cluster`): each file's
    :class:`FileRead`, and the run's pieces per partition: :data:`~.combine.SPILL` records
    (inputs numbered from ``first_input``) by content hash, :data:`STATS` records by prefix
    hash. Holds one file's fingerprints at a time.

    What is wrong with a file (damaged, no content hashes, another page size or prefix) is
    returned, not raised, with the files before it: the client checks those first (one
    guest given twice, samples over time: :class:`Taken`), in file order.

    ``over_time``: the files are a unit of :func:`file_units`, read together; the pieces are
    :data:`SERIES` records (:func:`_read_unit`).
    """
    if over_time:
        return _read_unit(paths, scope=scope, page_size=page_size, prefix_bytes=prefix_bytes,
                          partitions=partitions, first_input=first_input)
    reads: list[FileRead] = []
    parts: list[list[np.ndarray]] = [[] for _ in range(partitions)]
    stat_parts: list[list[np.ndarray]] = [[] for _ in range(partitions)]
    error: Exception | None = None
    try:
        for path in paths:
            prints = [input_name(fp) for fp in fingerprint_files.load(path)]
            _check_file(path, prints, page_size, prefix_bytes)
            masks = [scan_mask(fp, scope) for fp in prints]
            mine, pieces, _ = prints_pieces(prints, path=path, scope=scope,
                                            partitions=partitions,
                                            first_input=first_input + sum(len(r.rows)
                                                                          for r in reads),
                                            masks=masks)
            for part, piece in zip(parts, pieces, strict=True):
                part.append(piece)
            for part, piece in zip(stat_parts, _stats_pieces(prints, partitions), strict=True):
                part.append(piece)
            del pieces
            # Empty arrays of their own (a slice would keep the file's alive).
            reads.append(FileRead(
                path, mine,
                [replace(fp, addrs=np.empty(0, fp.addrs.dtype),
                         prefix=np.empty(0, fp.prefix.dtype), content=None) for fp in prints],
                [replace(mask, scanned=np.empty(0, bool)) for mask in masks],
                sum(fp.nonzero_pages for fp in prints), sum(fp.zero_pages for fp in prints),
                prints[0].source if prints else None))
            del prints, masks
    except (KsmAnalyzeError, ValueError) as e:
        error = e
    return (reads, [_joined(part, SPILL) for part in parts],
            [_joined(part, STATS) for part in stat_parts], error)


def _read_unit(paths: Sequence[str], *, scope: Scope, page_size: int, prefix_bytes: int,
               partitions: int, first_input: int
               ) -> tuple[list[FileRead], list[np.ndarray], list[np.ndarray], Exception | None]:
    """:func:`read_files` of a unit of files holding samples over time: each series reduced
    alone to its latest sample, each scanned page of it with its change rate and whether it
    changed (:func:`~ksm_analyze.series.churn`), and its stability row but for the duplicate
    pages (:func:`~ksm_analyze.series.stability`); inputs in the order of their first
    sample."""
    empty: tuple[list[FileRead], list[np.ndarray], list[np.ndarray]] = (
        [], [np.empty(0, SERIES)] * partitions, [np.empty(0, STATS)] * partitions)
    try:
        everything: list[Fingerprints] = []
        first: list[tuple[int, int]] = []
        sources: list[dict[str, Any] | None] = []
        for f, path in enumerate(paths):
            prints = [input_name(fp) for fp in fingerprint_files.load(path)]
            _check_file(path, prints, page_size, prefix_bytes)
            for fp in prints:
                if fp.content is None:
                    raise InputError("no content hashes: write it with ksm-analyze "
                                     "fingerprint", path=path)
            everything += prints
            first += [(f, k) for k in range(len(prints))]
            sources.append(prints[0].source if prints else None)
        samples = group_samples(everything)
    except (KsmAnalyzeError, ValueError) as e:
        return (*empty, e)
    all_masks = [scan_mask(fp, scope) for fp in everything]
    moves = churn(everything, all_masks, samples, ksm_was_running=True)  # aged: changed
    series_rows = iter(stability(everything, all_masks, samples))
    records, rows_of, scanned, still_zero = [], [], [], 0
    by_input: dict[int, dict[str, Any]] = {}
    for k, (members, rate, changed) in enumerate(zip(samples.series, moves.rate, moves.aged,
                                                     strict=True)):
        fp, mask = everything[members[-1]], all_masks[members[-1]]
        zero = fp.prefix == 0
        mine = mask.scanned & ~zero if len(members) < 2 else mask.scanned
        if len(members) < 2:
            still_zero += int(np.count_nonzero(mask.scanned & zero))
        else:
            by_input[k] = next(series_rows)
        r = np.empty(int(np.count_nonzero(mine)), SERIES)
        r["lo"], r["hi"] = fp.content[mine, 0], fp.content[mine, 1]  # type: ignore[index]
        r["input"] = first_input + k
        r["rate"] = rate[mine]
        r["flags"] = np.where(zero[mine], ZERO_PAGE, 0) | np.where(changed[mine], CHANGED, 0)
        records.append(r)
        rows_of.append(input_row(fp, mask, unique_pages=0))
        scanned.append(int(np.count_nonzero(mask.scanned)))
    latest = [everything[i] for i in samples.latest]
    pieces = cut(_joined(records, SERIES), partitions)
    stats = _stats_pieces(latest, partitions)
    masks = [all_masks[i] for i in samples.latest]
    head = FileRead(
        paths[0] if paths else "", rows_of,
        [replace(fp, addrs=np.empty(0, fp.addrs.dtype), prefix=np.empty(0, fp.prefix.dtype),
                 content=None) for fp in latest],
        [replace(mask, scanned=np.empty(0, bool)) for mask in masks],
        sum(fp.nonzero_pages for fp in latest), sum(fp.zero_pages for fp in latest),
        sources[0] if sources else None,
        first=[first[s[0]] for s in samples.series], scanned=scanned,
        ran=ksm_ran(everything), stability=by_input,
        over_time=[len(s) > 1 for s in samples.series], still_zero=still_zero)
    others = [FileRead(path, [], [], [], 0, 0, source)
              for path, source in zip(paths[1:], sources[1:], strict=True)]
    return [head, *others], pieces, stats, None


@dataclass(frozen=True)
class SeriesRules:
    """What the host as a whole decides of its pages over time, known once every unit is
    read (:meth:`Taken.rules`), for :func:`count_part`.

    Attributes:
        hold_seconds: the time a page must hold still to merge (two full scans of the host:
            :func:`~ksm_analyze.over_time.hold_time`).
        smart_scan: ksmd skips pages that did not change (late duplicates stay unmerged).
        ran: KSM ran while some sample was taken (a page that changed is aged).
        still_zero: scanned zero pages of the inputs seen once (not spilled: all steady).
    """

    hold_seconds: float
    smart_scan: bool
    ran: bool
    still_zero: int


@dataclass(frozen=True)
class SeriesCounts:
    """One partition's share, per input (numbered as read), of what the rules change:
    zero pages that do not merge (counted unique instead), and the stability table's
    stable and coinciding duplicate pages; and the contents as if memory stood still."""

    zero_unmerged: np.ndarray
    stable: np.ndarray
    coinciding: np.ndarray
    still_copies: np.ndarray
    """Pages of each content held twice or more as the latest samples stand (the host's
    ``if_memory_stood_still`` counters)."""
    still_unique: int


def _count_series(records: np.ndarray, ninputs: int, rules: SeriesRules
                  ) -> tuple[PartitionCounts, SeriesCounts]:
    """:func:`count_partition` of :data:`SERIES` records under the steady view's rules
    (:func:`~ksm_analyze.series.steady_view`): pages that change faster than the hold time,
    and late duplicates that no two steady pages of the host hold, count as unique; and the
    stability table's duplicates (:func:`~ksm_analyze.series.duplicate_kinds`). Every
    record of a content is in this partition, so both are exact here."""
    r = records[np.lexsort((records["hi"], records["lo"]))]
    del records
    new = np.r_[True, (r["lo"][1:] != r["lo"][:-1]) | (r["hi"][1:] != r["hi"][:-1])]
    ids = np.cumsum(new) - 1
    del new
    zero = (r["flags"] & ZERO_PAGE) != 0
    more = None
    if zero.any():  # the zero pages of the inputs seen once: steady, still
        more = np.zeros(int(ids[zero][0]) + 1, np.int64)
        more[-1] = rules.still_zero
    fast = too_fast(r["rate"], rules.hold_seconds)
    aged = ((r["flags"] & CHANGED) != 0) & rules.ran
    gone = fast
    if rules.smart_scan:
        gone = fast | no_partner(ids, ~fast & ~aged, aged & ~fast, more=more)
    owner = r["input"].astype(np.int64)
    dup, stable = duplicate_kinds(ids, r["rate"] == 0, more=more)
    kept = ~gone & ~zero
    spill = np.empty(int(np.count_nonzero(kept)), SPILL)
    for name in ("lo", "hi", "input"):
        spill[name] = r[name][kept]
    del r
    counted = count_partition([spill], ninputs)
    counted.unique[:] += np.bincount(owner[gone], minlength=ninputs)
    held = np.bincount(ids[~zero])
    held = held[held > 0]
    return counted, SeriesCounts(np.bincount(owner[gone & zero], minlength=ninputs),
                                 np.bincount(owner[stable], minlength=ninputs),
                                 np.bincount(owner[dup & ~stable], minlength=ninputs),
                                 held[held >= 2], int(np.count_nonzero(held == 1)))


def count_part(pieces: list[np.ndarray], stats: list[np.ndarray], ninputs: int,
               rules: SeriesRules | None = None
               ) -> tuple[PartitionCounts, tuple[int, int, int], SeriesCounts | None]:
    """The per-partition step of :func:`aggregate`: one partition's counts
    (:func:`.count_partition`) and stage statistics (candidates, false candidates, merges)
    from its :data:`~.combine.SPILL` and :data:`STATS` pieces of every file. Frees what it
    is given as it goes (the lists are emptied). With samples over time (``rules``), the
    pieces are :data:`SERIES` records, and their :class:`SeriesCounts` come third (else
    None)."""
    spill = _joined(pieces, SERIES if rules is not None else SPILL)
    series = None
    if rules is not None:
        counted, series = _count_series(spill, ninputs, rules)
    else:
        counted = count_partition([spill], ninputs)
    del spill
    records = _joined(stats, STATS)
    counts = _count_stats(records)
    del records
    return counted, counts, series


class Taken:
    """The client's part of :func:`aggregate`, whichever executor ran the steps: it takes
    the files' :class:`FileRead` in file order, refusing one guest given twice
    (``check_guest``) and a guest sampled in two units as it goes, and builds the
    :class:`Aggregate` from the partitions' counts. ``files``: with samples over time, every
    file in the order given (the reads are of whole units, :func:`series_units`; their
    inputs are put in ``analyze()``'s order at the end); else None."""

    def __init__(self, check_guest: Callable[[str, dict[str, Any] | None], None] | None,
                 files: Sequence[str | os.PathLike[str]] | None = None) -> None:
        self.check_guest = check_guest
        self.units = None if files is None else {
            os.path.abspath(os.fspath(f)): n for n, f in enumerate(files)}
        self.identities: set[str] = set()
        self.rows: list[dict[str, Any]] = []
        self.prints: list[Fingerprints] = []
        self.masks: list[ScanMask] = []
        self.pages_hashed = self.zero_pages = 0
        # With samples over time, per input (numbered as read):
        self.first: list[tuple[int, int]] = []
        self.scanned: list[int] = []
        self.stability: dict[int, dict[str, Any]] = {}
        self.ran = False
        self.still_zero = 0

    def take(self, reads: Sequence[FileRead], error: Exception | None = None) -> None:
        """Take ``reads`` (the next files, in order; with ``units``, the next unit), then
        raise ``error`` (met on the file after them), if any.

        Raises:
            ValueError: a guest given twice, or sampled in two units.
        """
        for read in reads:
            if self.check_guest is not None:
                self.check_guest(read.path, read.source)
            for fp in read.prints:
                _refuse_series(fp, self.identities, SERIES_REFUSED if self.units is None
                               else "its other samples were read apart (did the files "
                               "change while read?)")
            if self.units is not None:
                before = len(self.rows)
                self.first += [(self.units[os.path.abspath(reads[f].path)], k)
                               for f, k in read.first]
                self.scanned += read.scanned
                self.stability.update({before + k: row for k, row in read.stability.items()})
                self.ran |= read.ran
                self.still_zero += read.still_zero
            self.rows += read.rows
            self.prints += read.prints
            self.masks += read.masks
            self.pages_hashed += read.pages_hashed
            self.zero_pages += read.zero_pages
        if error is not None:
            raise error

    def _order(self) -> list[int]:
        """The inputs (numbered as read) in ``analyze()``'s order: by first sample."""
        return sorted(range(len(self.first)), key=self.first.__getitem__)

    def rules(self, ksm: KsmSettings) -> SeriesRules | None:
        """What the host decides of its pages over time (None: no samples over time), once
        every file is taken; ``ksm``: the settings the time model is to use."""
        if self.units is None:
            return None
        prints = [self.prints[i] for i in self._order()]
        if ksm.rmap_item_bytes is None:  # as analyze() does, before the steady view
            ksm = replace(ksm, rmap_item_bytes=recorded_rmap_item_bytes(prints)[0])
        hold, smart = hold_time(prints, sum(self.scanned), ksm)
        return SeriesRules(hold, smart, self.ran, self.still_zero)

    def result(self, counted: list[tuple[PartitionCounts, tuple[int, int, int],
                                         SeriesCounts | None]], *,
               page_size: int, read_seconds: float, count_seconds: float) -> Aggregate:
        """The :class:`Aggregate` from every partition's :func:`count_part`, in partition
        order (the list is emptied: each is freed as the table takes it)."""
        candidates, false, merges = (sum(s[k] for _, s, _ in counted) for k in range(3))
        partitions = len(counted)
        counts = [c for c, _, _ in counted]
        series = [c for _, _, c in counted if c is not None]
        counted.clear()
        totals = [np.zeros(len(self.rows), np.int64) for _ in range(3)]
        for c in series:
            for total, part in zip(totals, (c.zero_unmerged, c.stable, c.coinciding),
                                   strict=True):
                total += part
        stood_still = None
        if series:
            stood_still = (np.concatenate([c.still_copies for c in series]),
                           sum(int(row["zero_pages"]) for row in self.rows),
                           sum(c.still_unique for c in series))
            for row, n in zip(self.rows, totals[0].tolist(), strict=True):
                row["zero_pages"] -= n  # counted unique by the partition
        table = assemble(self.rows, counts, page_size)
        stats = StageStats(pages_hashed=self.pages_hashed, prefix_candidates=candidates,
                           false_candidates=false, full_hashes=candidates, full_compares=0,
                           hash_collisions=0, verified=False, merges=merges, hash_bits=128)
        prints, masks, rows = self.prints, self.masks, None
        if self.units is not None:
            _, stable, coinciding = totals
            order = self._order()
            if order != sorted(order):
                table = table.subset(order)
                prints, masks = [prints[i] for i in order], [masks[i] for i in order]
            rows = [{**self.stability[i], "stable_duplicate_pages": int(stable[i]),
                     "coinciding_duplicate_pages": int(coinciding[i])}
                    for i in order if i in self.stability]
        return Aggregate(table, prints, masks, stats, self.zero_pages, partitions,
                         read_seconds, count_seconds, rows, stood_still)


def aggregate(paths: Sequence[str | os.PathLike[str]], *, scope: Scope, page_size: int,
              prefix_bytes: int, partitions: int, jobs: int = 1, workdir: str | None = None,
              check_guest: Callable[[str, dict[str, Any] | None], None] | None = None,
              progress: Callable[[int, int], None] | None = None,
              ksm: KsmSettings | None = None) -> Aggregate:
    """The core table and stage statistics of fingerprint files ``paths``, one file, then
    ``jobs`` partitions (counted by as many threads: numpy's sorts run without the GIL), in
    memory at a time; partition files go to a private (0700) temporary folder under
    ``workdir`` and are removed as they are counted. The local executor of
    :func:`read_files` and :func:`count_part` (:func:`.cluster.aggregate_on_cluster` is the
    Dask one).

    Args:
        check_guest: called with each file's path and the dump it records, to refuse one
            guest given twice.
        progress: called as ``progress(bytes_read, bytes)`` over the files' sizes.
        ksm: the settings of the time model (samples over time: the hold time, smart_scan).

    Samples of one guest over time are read together, a unit of files at a time
    (:func:`series_units`), and counted as ``analyze()`` counts them (the steady view:
    :class:`SeriesRules`).

    Raises:
        DumpFormatError: a file is damaged.
        InputError: a file carries no content hashes (:func:`.prints_pieces`).
        ValueError: a file's page size or prefix bytes differ from the analysis', or two
            samples of one guest have no distinct times.
    """
    import time

    started = time.perf_counter()
    units = series_units(paths)
    taken = Taken(check_guest, None if units is None else paths)
    sizes = [os.path.getsize(p) for p in paths]
    read_bytes, all_bytes = 0, sum(sizes)
    with tempfile.TemporaryDirectory(dir=workdir, prefix="ksm-aggregate-") as tmp:
        names = [(os.path.join(tmp, f"rows-{p}"), os.path.join(tmp, f"stats-{p}"))
                 for p in range(partitions)]
        with contextlib.ExitStack() as stack:
            spills = [(stack.enter_context(open(a, "wb")), stack.enter_context(open(b, "wb")))
                      for a, b in names]
            for unit in units or [[f] for f in range(len(paths))]:
                reads, pieces, by_prefix, error = read_files(
                    [os.fspath(paths[f]) for f in unit], scope=scope, page_size=page_size,
                    prefix_bytes=prefix_bytes, partitions=partitions,
                    first_input=len(taken.rows), over_time=units is not None)
                taken.take(reads, error)
                for (spill, spill_stats), piece, stat in zip(spills, pieces, by_prefix,
                                                             strict=True):
                    piece.tofile(spill)
                    stat.tofile(spill_stats)
                del pieces, by_prefix
                _give_back()
                if progress is not None:
                    read_bytes += sum(sizes[f] for f in unit)
                    progress(read_bytes, all_bytes)
        read = time.perf_counter()
        rules = taken.rules(ksm or KsmSettings())

        def count(files: tuple[str, str]
                  ) -> tuple[PartitionCounts, tuple[int, int, int], SeriesCounts | None]:
            pieces = [np.fromfile(files[0], SERIES if rules is not None else SPILL)]
            os.unlink(files[0])
            # Mapped, not read: its pages are the file's, not the process's, until sorted
            # (after the rows' counting has freed its memory).
            stats = [np.memmap(files[1], STATS, mode="r") if os.path.getsize(files[1])
                     else np.empty(0, STATS)]
            os.unlink(files[1])
            counted = count_part(pieces, stats, len(taken.rows), rules)
            _give_back()
            return counted

        if jobs > 1:
            with ThreadPoolExecutor(jobs) as pool:  # results in partition order
                results = list(pool.map(count, names))
        else:
            results = [count(n) for n in names]
    return taken.result(results, page_size=page_size, read_seconds=read - started,
                        count_seconds=time.perf_counter() - read)


def _give_back() -> None:
    """Return freed memory to the system: Arrow's pool and glibc's heap keep what a file or
    a partition used (measured: 90 MiB left of five 1M-page files without this), and the
    limit is on what the process holds."""
    import ctypes

    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _check_file(path: str, prints: Sequence[Fingerprints], page_size: int,
                prefix_bytes: int) -> None:
    """The checks ``analyze()`` makes of a fingerprint file it takes."""
    if prints and prints[0].page_size != page_size:
        raise ValueError(f"{path} holds {prints[0].page_size}-byte pages; analyze it with "
                         f"--page-size {prints[0].page_size}")
    if prints and prints[0].prefix_bytes != prefix_bytes:
        raise ValueError(f"{path} was fingerprinted with --prefix-bytes "
                         f"{prints[0].prefix_bytes}; give the same")


SERIES_REFUSED = ("samples of one input over time are not aggregated out of core yet; give a "
                  "--memory-limit large enough to analyse them in memory, or analyse each "
                  "series on its own")


def _refuse_series(fp: Fingerprints, seen: set[str], why: str) -> None:
    """Refuse a second latest sample of one guest (``seen``: the guests sampled so far):
    samples over time are one input whose steady view needs all its samples' pages
    together (read as a unit, or, without units, not aggregated: ``why``)."""
    identity = identity_of(fp)
    if identity is not None and identity in seen:
        raise ValueError(f"{fp.path}: {why}")
    if identity is not None:
        seen.add(identity)


def _stats_pieces(prints: Sequence[Fingerprints], partitions: int) -> list[np.ndarray]:
    """Every stored non-zero page of ``prints`` as :data:`STATS` records, cut into
    ``partitions`` pieces by the prefix hash's top bits (equal contents have equal prefixes,
    so a prefix group and its classes lie in one partition)."""
    parts: list[list[np.ndarray]] = [[] for _ in range(partitions)]
    for fp in prints:
        assert fp.content is not None  # prints_pieces refused it
        nonzero = fp.prefix != 0
        records = np.empty(int(np.count_nonzero(nonzero)), STATS)
        records["prefix"] = fp.prefix[nonzero]
        records["lo"], records["hi"] = fp.content[nonzero, 0], fp.content[nonzero, 1]
        if partitions == 1:
            parts[0].append(records)
            continue
        part = (records["prefix"] >> np.uint64(64 - (partitions.bit_length() - 1))
                ).astype(np.int64)
        order = np.argsort(part, kind="stable")
        cuts = np.searchsorted(part[order], np.arange(partitions + 1))
        for p in range(partitions):
            parts[p].append(records[order[cuts[p]:cuts[p + 1]]])
        del records, part, order
    return [np.concatenate(ps) if ps else np.empty(0, STATS) for ps in parts]


def _count_stats(records: np.ndarray) -> tuple[int, int, int]:
    """Stage 2's counts over one partition of :data:`STATS` records: candidates (pages
    whose prefix hash another page shares), false candidates (classes of one page among
    them) and merges (a class of n pages makes n - 1)."""
    if not len(records):
        return 0, 0, 0
    records = records[np.lexsort((records["hi"], records["lo"], records["prefix"]))]
    prefix = records["prefix"]
    starts = np.flatnonzero(np.r_[True, prefix[1:] != prefix[:-1]])
    sizes = np.diff(np.r_[starts, len(prefix)])
    cand = records[np.repeat(sizes >= 2, sizes)]
    del records, prefix
    if not len(cand):
        return 0, 0, 0
    new = np.r_[True, (cand["prefix"][1:] != cand["prefix"][:-1])
                | (cand["lo"][1:] != cand["lo"][:-1]) | (cand["hi"][1:] != cand["hi"][:-1])]
    classes = np.diff(np.r_[np.flatnonzero(new), len(cand)])
    return len(cand), int(np.count_nonzero(classes == 1)), int(np.sum(classes - 1))

