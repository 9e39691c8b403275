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

Pages are told apart by their xxh3-128 content hashes, as ``analyze()`` does for fingerprint
files whose dumps are not here; a dump that is here is not read again.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..content_table import ContentTable
from ..eligibility import ScanMask, Scope, scan_mask
from ..errors import KsmAnalyzeError
from ..hashing.stage1 import Fingerprints
from ..hashing.stage2 import StageStats
from ..series import identity_of, input_name
from ..units import size_text
from . import fingerprint_files
from .combine import SPILL, PartitionCounts, _joined, assemble, count_partition, prints_pieces

__all__ = ["IN_MEMORY_BYTES_PER_PAGE", "SERIES_REFUSED", "Aggregate", "aggregate", "default_memory_limit",
           "out_of_core_partitions"]

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

STATS = np.dtype([("prefix", "<u8"), ("lo", "<u8"), ("hi", "<u8")])
"""One stored non-zero page for the stage statistics: its prefix hash and content hash."""


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


def _footer(path: str) -> tuple[int, bool] | None:
    """Stored pages of fingerprint file ``path`` and whether it has content hashes, from its
    Parquet footer (None: not readable as one; :func:`aggregate` then says why)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        return pf.metadata.num_rows, "content_lo" in pf.schema_arrow.names
    except (OSError, ValueError, pa.ArrowException):  # the in-memory path says what is wrong
        return None


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
    total, largest = sum(rows), max(rows, default=0)
    in_memory = total * IN_MEMORY_BYTES_PER_PAGE + len(rows) * INPUT_BYTES
    if in_memory <= memory_limit:
        return None
    held = FIXED_BYTES + len(rows) * INPUT_BYTES + largest * FILE_BYTES_PER_PAGE + total * RESULT_BYTES_PER_PAGE
    room, need = memory_limit - held, total * PARTITION_BYTES_PER_PAGE
    for at_once in dict.fromkeys((max(jobs, 1), 1)):  # jobs partitions in memory, else one
        partitions = 1
        while room > 0 and partitions < MAX_PARTITIONS and need * at_once // partitions > room:
            partitions *= 2
        if room > 0 and need * at_once // partitions <= room:
            return partitions, total, in_memory, min(at_once, partitions)
    least = held + need // MAX_PARTITIONS
    raise ValueError(f"--memory-limit {size_text(memory_limit)} is too small for these "
                     f"{len(rows):,} fingerprint files ({total:,} pages, the largest "
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
    """

    table: ContentTable
    prints: list[Fingerprints]
    masks: list[ScanMask]
    stats: StageStats
    zero_pages_found: int
    partitions: int
    read_seconds: float
    count_seconds: float


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
    """

    path: str
    rows: list[dict[str, Any]]
    prints: list[Fingerprints]
    masks: list[ScanMask]
    pages_hashed: int
    zero_pages: int


def read_files(paths: Sequence[str], *, scope: Scope, page_size: int, prefix_bytes: int,
               partitions: int, first_input: int = 0
               ) -> tuple[list[FileRead], list[np.ndarray], list[np.ndarray], Exception | None]:
    """The per-file step of :func:`aggregate`, on a run of files (run where they are: here,
    or on a Dask worker, :func:`.cluster.aggregate_on_cluster`): each file's
    :class:`FileRead`, and the run's pieces per partition: :data:`~.combine.SPILL` records
    (inputs numbered from ``first_input``) by content hash, :data:`STATS` records by prefix
    hash. Holds one file's fingerprints at a time.

    What is wrong with a file (damaged, no content hashes, another page size or prefix) is
    returned, not raised, with the files before it: the client checks those first (one
    guest given twice, samples over time: :class:`Taken`), in file order.
    """
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
                sum(fp.nonzero_pages for fp in prints), sum(fp.zero_pages for fp in prints)))
            del prints, masks
    except (KsmAnalyzeError, ValueError) as e:
        error = e
    return (reads, [_joined(part, SPILL) for part in parts],
            [_joined(part, STATS) for part in stat_parts], error)


def count_part(pieces: list[np.ndarray], stats: list[np.ndarray], ninputs: int
               ) -> tuple[PartitionCounts, tuple[int, int, int]]:
    """The per-partition step of :func:`aggregate`: one partition's counts
    (:func:`.count_partition`) and stage statistics (candidates, false candidates, merges)
    from its :data:`~.combine.SPILL` and :data:`STATS` pieces of every file. Frees what it
    is given as it goes (the lists are emptied)."""
    spill = _joined(pieces, SPILL)
    counted = count_partition([spill], ninputs)
    del spill
    records = _joined(stats, STATS)
    counts = _count_stats(records)
    del records
    return counted, counts


class Taken:
    """The client's part of :func:`aggregate`, whichever executor ran the steps: it takes
    the files' :class:`FileRead` in file order, refusing one guest given twice
    (``check_guest``) and samples of one guest over time as it goes, and builds the
    :class:`Aggregate` from the partitions' counts."""

    def __init__(self, check_guest: Callable[[str, dict[str, Any] | None], None] | None
                 ) -> None:
        self.check_guest = check_guest
        self.identities: set[str] = set()
        self.rows: list[dict[str, Any]] = []
        self.prints: list[Fingerprints] = []
        self.masks: list[ScanMask] = []
        self.pages_hashed = self.zero_pages = 0

    def take(self, reads: Sequence[FileRead], error: Exception | None = None) -> None:
        """Take ``reads`` (the next files, in order), then raise ``error`` (met on the file
        after them), if any.

        Raises:
            ValueError: a guest given twice, or a second sample of one guest.
        """
        for read in reads:
            if self.check_guest is not None:
                self.check_guest(read.path, read.prints[0].source if read.prints else None)
            for fp in read.prints:
                _refuse_series(fp, self.identities)
            self.rows += read.rows
            self.prints += read.prints
            self.masks += read.masks
            self.pages_hashed += read.pages_hashed
            self.zero_pages += read.zero_pages
        if error is not None:
            raise error

    def result(self, counted: list[tuple[PartitionCounts, tuple[int, int, int]]], *,
               page_size: int, read_seconds: float, count_seconds: float) -> Aggregate:
        """The :class:`Aggregate` from every partition's :func:`count_part`, in partition
        order (the list is emptied: each is freed as the table takes it)."""
        candidates, false, merges = (sum(s[k] for _, s in counted) for k in range(3))
        partitions = len(counted)
        counts = [c for c, _ in counted]
        counted.clear()
        table = assemble(self.rows, counts, page_size)
        stats = StageStats(pages_hashed=self.pages_hashed, prefix_candidates=candidates,
                           false_candidates=false, full_hashes=candidates, full_compares=0,
                           hash_collisions=0, verified=False, merges=merges, hash_bits=128)
        return Aggregate(table, self.prints, self.masks, stats, self.zero_pages, partitions,
                         read_seconds, count_seconds)


def aggregate(paths: Sequence[str | os.PathLike[str]], *, scope: Scope, page_size: int,
              prefix_bytes: int, partitions: int, jobs: int = 1, workdir: str | None = None,
              check_guest: Callable[[str, dict[str, Any] | None], None] | None = None,
              progress: Callable[[int, int], None] | None = None) -> Aggregate:
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

    Raises:
        DumpFormatError: a file is damaged.
        InputError: a file carries no content hashes (:func:`.prints_pieces`).
        ValueError: a file's page size or prefix bytes differ from the analysis', or inputs
            are samples of one guest over time (not aggregated out of core yet).
    """
    import time

    started = time.perf_counter()
    taken = Taken(check_guest)
    sizes = [os.path.getsize(p) for p in paths]
    read_bytes, all_bytes = 0, sum(sizes)
    with tempfile.TemporaryDirectory(dir=workdir, prefix="ksm-aggregate-") as tmp:
        names = [(os.path.join(tmp, f"rows-{p}"), os.path.join(tmp, f"stats-{p}"))
                 for p in range(partitions)]
        with contextlib.ExitStack() as stack:
            spills = [(stack.enter_context(open(a, "wb")), stack.enter_context(open(b, "wb")))
                      for a, b in names]
            for done, path in enumerate(paths):
                reads, pieces, by_prefix, error = read_files(
                    [os.fspath(path)], scope=scope, page_size=page_size,
                    prefix_bytes=prefix_bytes, partitions=partitions,
                    first_input=len(taken.rows))
                taken.take(reads, error)
                for (spill, spill_stats), piece, stat in zip(spills, pieces, by_prefix,
                                                             strict=True):
                    piece.tofile(spill)
                    stat.tofile(spill_stats)
                del pieces, by_prefix
                _give_back()
                if progress is not None:
                    read_bytes += sizes[done]
                    progress(read_bytes, all_bytes)
        read = time.perf_counter()

        def count(files: tuple[str, str]) -> tuple[PartitionCounts, tuple[int, int, int]]:
            pieces = [np.fromfile(files[0], SPILL)]
            os.unlink(files[0])
            # Mapped, not read: its pages are the file's, not the process's, until sorted
            # (after the rows' counting has freed its memory).
            stats = [np.memmap(files[1], STATS, mode="r") if os.path.getsize(files[1])
                     else np.empty(0, STATS)]
            os.unlink(files[1])
            counted = count_part(pieces, stats, len(taken.rows))
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


def _refuse_series(fp: Fingerprints, seen: set[str]) -> None:
    """Refuse a second sample of one guest (``seen``: the guests sampled so far): samples
    over time are one input whose steady view needs all its samples' pages together, not
    built out of core yet."""
    identity = identity_of(fp)
    if identity is not None and identity in seen:
        raise ValueError(f"{fp.path}: {SERIES_REFUSED}")
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

