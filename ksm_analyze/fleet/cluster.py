"""Aggregating fingerprint files on a Dask cluster: :func:`~.aggregate.aggregate`'s result
(``--scheduler`` past ``--memory-limit``: :func:`aggregate_on_cluster`) and
:func:`~.combine.combine`'s (:func:`combine_on_cluster`), with the work on the workers.

Both are one executor (:func:`_run`) of their module's steps, run as Dask tasks (futures,
no graph of our own):

1. one task per fingerprint file, or per run of small ones (``read_files``,
   ``file_pieces``), on a worker that reads the files by path as stage 1's tasks read dumps
   (:mod:`.sources`); its ``partitions`` pieces stay on that worker, each a future of its
   own (a small task picks it out of the task's result, where that result is);
2. the client takes each run's head in file order (rows and metadata: its checks, and the
   input numbers of the runs after it);
3. one task per partition (``count_part``, ``count_partition``) on that partition's pieces
   from every run: Dask moves them worker to worker, never through the client; the client
   receives each partition's counts (sparse rows of the contents held twice or more, unique
   pages per input) and assembles the core table.

A worker that dies loses the pieces it held; Dask runs the tasks that made them again
(their lineage), and a task whose worker died is run again (:data:`~.sources.TASK_RETRIES`
counts the other failures). Workers spill what they hold to disk past Dask's
``distributed.worker.memory.target`` (0.6 of their memory limit, by the size of what they
hold) or ``distributed.worker.memory.spill`` (0.7, by the process's memory); the limit is
``dask worker --memory-limit``, or the machine's memory divided among a ``local:N``
cluster's workers.

Input numbers: a files task numbers its inputs from 0 (it does not know how many inputs
the files before it hold, and reading every file's metadata on the client first would need
the files here and cost a Parquet open each before any task starts); each partition's task
adds every files task's offset, from the rows the client received, as it joins the pieces
(a copy ``count_partition`` would make anyway).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import numpy as np

from ..content_table import ContentTable
from ..eligibility import Scope
from ..errors import InputError, KsmAnalyzeError
from ..ksm import KsmSettings
from ..options import DEFAULT_OPTIONS, ProgressCallback
from . import aggregate as _aggregate
from . import combine as _combine
from . import sources

__all__ = ["aggregate_on_cluster", "combine_on_cluster"]


GROUP_BYTES = 64 << 20
"""Most bytes on disk of the fingerprint files one task reads past its first (a file not
readable here counts as this much: a task of its own), and at most a worker's memory limit
divided by :data:`GROUP_SHARE`."""
GROUP_SHARE = 32
"""A fingerprint file holds about 20 bytes a page on disk, and a task holds 20 bytes a page
of its files, twice while it joins them: a task's files take about a 16th of a worker's
memory limit, leaving room for the worker itself and for what it keeps before it spills."""
TASKS_PER_WORKER = 4
"""Fewest file tasks per worker the files are cut into, where there are enough files."""


def combine_on_cluster(files: Sequence[str | os.PathLike[str]], *, scheduler: str,
                       partitions: int = 16, scope: Scope = DEFAULT_OPTIONS.scope,
                       tasks: ProgressCallback | None = None,
                       files_per_task: int | None = None) -> ContentTable:
    """:func:`~.combine.combine` of ``files`` with the work on the Dask cluster ``scheduler``
    (``tcp://HOST:PORT``, or ``local[:N]``: ``--scheduler``); the same table.

    Args:
        files: fingerprint files with content hashes, read by the workers by path (made
            absolute here).
        scheduler: the cluster, as ``--scheduler`` takes it.
        partitions: how many parts the hash space is cut into (a power of two): each is
            one task, holding about 60 bytes times the fleet's non-zero pages divided by this.
        scope: which process memory KSM scans (as ``--scope``).
        tasks: called with (tasks done, tasks in all): the file tasks, then the partitions.
        files_per_task: how many files one task reads, at most (default: consecutive files
            up to :data:`GROUP_BYTES` on disk or a worker's memory limit over
            :data:`GROUP_SHARE`, and at least :data:`TASKS_PER_WORKER` tasks
            per worker; a file not readable here is a task of its own). Dask spends about a
            millisecond on each task, and each task here is ``partitions + 2`` of them: one
            task per small file would cost more than reading it.

    Raises:
        DumpFormatError: a file is damaged (the worker that read it named).
        InputError: a file carries no content hashes or cannot be read there; the scheduler
            does not answer, or a task's workers kept dying.
        ValueError: ``scheduler`` is not a form ``--scheduler`` takes, ``partitions`` not a
            power of two, or ``files_per_task`` below 1.
    """
    _combine._check_partitions(partitions)
    if not files:
        return _combine.combine([], partitions=partitions, scope=scope)
    rows: list[dict[str, Any]] = []
    page_size = 0

    def take(head: tuple[list[list[dict[str, Any]]], int] | KsmAnalyzeError) -> int:
        nonlocal page_size
        if isinstance(head, KsmAnalyzeError):
            raise head
        of_files, page_size = head
        before = len(rows)
        for mine in of_files:
            rows.extend(mine)
        return len(rows) - before

    counts = _run(files, scheduler=scheduler, partitions=partitions,
                  read=partial(_files_task, scope=scope, partitions=partitions),
                  take=take, count=_partition_task, tasks=tasks, files_per_task=files_per_task)
    return _combine.assemble(rows, counts, page_size)


def aggregate_on_cluster(files: Sequence[str | os.PathLike[str]], *, scheduler: str,
                         scope: Scope, page_size: int, prefix_bytes: int, partitions: int,
                         check_guest: Callable[[str, dict[str, Any] | None], None] | None = None,
                         tasks: ProgressCallback | None = None,
                         files_per_task: int | None = None,
                         ksm: KsmSettings | None = None) -> _aggregate.Aggregate:
    """:func:`~.aggregate.aggregate` of fingerprint files ``files`` with its steps
    (:func:`~.aggregate.read_files`, :func:`~.aggregate.count_part`) run as tasks on the
    Dask cluster ``scheduler``; the same :class:`~.aggregate.Aggregate`. The client receives
    each file's :class:`~.aggregate.FileRead` (its inputs' rows and metadata: it checks
    them in file order, :class:`~.aggregate.Taken`) and each partition's counts; the pieces
    go from worker to worker. Arguments and errors as :func:`combine_on_cluster` and
    :func:`~.aggregate.aggregate` (``tasks`` in place of ``progress``). Samples over time:
    a task reads whole units of files (:func:`~.aggregate.series_units`: a series' samples
    together), and the partitions are counted under the host's rules
    (:meth:`~.aggregate.Taken.rules`)."""
    import time

    _combine._check_partitions(partitions)
    started = time.perf_counter()
    units = _aggregate.series_units(files) if files else None
    taken = _aggregate.Taken(check_guest, None if units is None else files)
    read_at = started

    def take(head: tuple[list[_aggregate.FileRead], Exception | None]) -> int:
        nonlocal read_at
        before = len(taken.rows)
        taken.take(*head)
        read_at = time.perf_counter()
        return len(taken.rows) - before

    if files:
        counted = _run(files, scheduler=scheduler, partitions=partitions,
                       read=partial(_aggregate_files_task, scope=scope, page_size=page_size,
                                    prefix_bytes=prefix_bytes, partitions=partitions,
                                    over_time=units is not None),
                       take=take, count=_aggregate_partition_task, tasks=tasks,
                       files_per_task=files_per_task, units=units,
                       rules=lambda: (taken.rules(ksm or KsmSettings()),))
    else:
        counted = [_aggregate.count_part([], [], 0) for _ in range(partitions)]
    return taken.result(counted, page_size=page_size, read_seconds=read_at - started,
                        count_seconds=time.perf_counter() - read_at)


def _run(files: Sequence[str | os.PathLike[str]], *, scheduler: str, partitions: int,
         read: Callable[[Sequence[str]], tuple[Any, list[Any]]], take: Callable[[Any], int],
         count: Callable[..., Any],
         tasks: ProgressCallback | None, files_per_task: int | None,
         units: Sequence[Sequence[int]] | None = None,
         rules: Callable[[], tuple[Any, ...]] = tuple) -> list[Any]:
    """The Dask executor of both: ``read`` (a run of files -> what goes to the client, and
    one piece per partition, inputs numbered from 0) as a task per run of files (of whole
    ``units`` of file numbers, if given, each unit's files together), its pieces kept on
    the workers; ``take`` on the client, of
    each run's head in file order (the inputs it holds: the offsets of the next runs' input
    numbers); then ``count`` (pieces, offsets, inputs, and what ``rules`` returns once
    every head is taken) as a task per partition. Returns the partitions' counts, in
    order."""
    if files_per_task is not None and files_per_task < 1:
        raise ValueError(f"files_per_task must be at least 1, not {files_per_task}")
    paths = [os.path.abspath(os.fspath(f)) for f in files]
    run = uuid.uuid4().hex[:12]  # keys of this run, apart from others' on a shared scheduler
    with sources.dask_client(scheduler) as client:
        workers = client.scheduler_info().get("workers", {})
        limits = [w.get("memory_limit") or 0 for w in workers.values()]
        most_bytes = min([GROUP_BYTES] + [limit // GROUP_SHARE for limit in limits if limit])
        whole = units if units is not None else [[f] for f in range(len(paths))]
        most = files_per_task or -(-len(whole) // (TASKS_PER_WORKER * max(len(workers), 1)))
        runs = [[paths[f] for u in run for f in whole[int(u)]] for run in _groups(
            [str(u) for u in range(len(whole))], most, most_bytes,
            [sum(_size(paths[f], most_bytes) for f in unit) for unit in whole])]
        total = len(runs) + partitions
        heads, pieces = [], []
        named: dict[str, str] = {}  # a task that kept dying: its first file
        for g, group in enumerate(runs):
            whole = client.submit(read, group, pure=False, key=f"ksm-files-{run}-{g}",
                                  retries=sources.TASK_RETRIES)
            heads.append(client.submit(_head, whole, key=f"ksm-rows-{run}-{g}"))
            pieces.append(client.map(_piece, [whole] * partitions, range(partitions),
                                     key=[f"ksm-piece-{run}-{g}-{p}" for p in range(partitions)]))
            named[whole.key] = named[heads[-1].key] = group[0]
            del whole  # its pieces and rows hold it until they are made, then it is freed
        if tasks is not None:
            tasks(0, total)
        number = {h.key: g for g, h in enumerate(heads)}
        got: dict[int, Any] = {}
        offsets = np.zeros(len(runs), np.uint32)
        ninputs = after = 0  # after: the runs taken so far, in file order
        for done, (future, head) in enumerate(_finished(client, heads, scheduler, named), 1):
            got[number[future.key]] = head
            del head
            while after in got:
                offsets[after] = ninputs
                ninputs += take(got.pop(after))
                after += 1
            if tasks is not None:
                tasks(done, total)
        del heads
        extra = rules()
        counting = [client.submit(count, [of_group[p] for of_group in pieces],
                                  offsets, ninputs, *extra, key=f"ksm-partition-{run}-{p}",
                                  pure=False, retries=sources.TASK_RETRIES)
                    for p in range(partitions)]
        del pieces  # held by the partition tasks now; freed as they finish
        number = {c.key: p for p, c in enumerate(counting)}
        counts: list[Any] = [None] * partitions
        for done, (future, c) in enumerate(_finished(client, counting, scheduler, named),
                                           len(runs) + 1):
            counts[number[future.key]] = c
            del c
            if tasks is not None:
                tasks(done, total)
    return counts


def _size(path: str, most_bytes: int = GROUP_BYTES) -> int:
    """Bytes of ``path`` on disk (not readable here: ``most_bytes``)."""
    try:
        return os.path.getsize(path) if sources.readable_here(path) else most_bytes
    except OSError:
        return most_bytes


def _groups(paths: Sequence[str], most: int, most_bytes: int = GROUP_BYTES,
            sizes: Sequence[int] | None = None) -> list[list[str]]:
    """``paths`` cut into runs of consecutive files, each one task's: at most ``most``
    files, and no more than ``most_bytes`` on disk past its first file (a file not
    readable here counts as that much; ``sizes``: the paths' sizes, if known)."""
    groups: list[list[str]] = []
    size = 0
    for k, path in enumerate(paths):
        mine = sizes[k] if sizes is not None else _size(path, most_bytes)
        if groups and len(groups[-1]) < most and size + mine <= most_bytes:
            groups[-1].append(path)
            size += mine
        else:
            groups.append([path])
            size = mine
    return groups


def _finished(client: Any, futures: Sequence[Any], address: str, named: dict[str, str]
              ) -> Iterator[tuple[Any, Any]]:
    """:func:`.sources.finished`, with a task whose workers kept dying one line naming its
    file (``named``: by key) or the scheduler."""
    from distributed import KilledWorker

    try:
        yield from sources.finished(client, futures, address)
    except KilledWorker as e:
        file = named.get(str(e.task))
        if file is not None:
            raise InputError("the Dask workers reading it kept dying (a worker's memory "
                             "limit too small for it?)", path=file) from None
        raise InputError("the Dask workers counting a partition kept dying (a worker's "
                         "memory limit too small for it? more partitions make each smaller)",
                         path=address) from None


def _files_task(paths: Sequence[str], scope: Scope, partitions: int
                ) -> tuple[tuple[list[list[dict[str, Any]]], int] | KsmAnalyzeError,
                           list[np.ndarray]]:
    """:func:`combine_on_cluster`'s files task: some files' rows (a list per file) and page
    size, and pieces (inputs numbered from 0 at the first file), on a worker. What is wrong
    with a file comes back as a value, not raised: Dask would run it again."""
    rows: list[list[dict[str, Any]]] = []
    parts: list[list[np.ndarray]] = [[] for _ in range(partitions)]
    page_size = 0
    try:
        for path in paths:
            mine, pieces, page_size = _combine.file_pieces(
                path, scope=scope, partitions=partitions, first_input=sum(map(len, rows)))
            rows.append(mine)
            for part, piece in zip(parts, pieces, strict=True):
                part.append(piece)
            del pieces
    except KsmAnalyzeError as e:
        from distributed import get_worker

        return (sources._on_worker(e, get_worker().address),
                [np.empty(0, _combine.SPILL)] * partitions)
    return (rows, page_size), [_joined(part) for part in parts]


def _aggregate_files_task(paths: Sequence[str], *, scope: Scope, page_size: int,
                          prefix_bytes: int, partitions: int, over_time: bool = False
                          ) -> tuple[tuple[list[_aggregate.FileRead], Exception | None],
                                     list[tuple[np.ndarray, np.ndarray]]]:
    """:func:`aggregate_on_cluster`'s files task: :func:`~.aggregate.read_files` on a worker
    (a damaged file's error names the worker)."""
    reads, pieces, stats, error = _aggregate.read_files(
        paths, scope=scope, page_size=page_size, prefix_bytes=prefix_bytes,
        partitions=partitions, over_time=over_time)
    if isinstance(error, KsmAnalyzeError):
        from distributed import get_worker

        error = sources._on_worker(error, get_worker().address)
    return (reads, error), list(zip(pieces, stats, strict=True))


def _head(whole: tuple[Any, list[Any]]) -> Any:
    """What of a files task goes to the client (rows, metadata, or its error)."""
    return whole[0]


def _piece(whole: tuple[Any, list[Any]], p: int) -> Any:
    """Partition ``p``'s piece of a files task."""
    return whole[1][p]


def _renumbered(pieces: Sequence[np.ndarray], offsets: np.ndarray) -> np.ndarray:
    """The :data:`~.combine.SPILL` records of every files task's piece of a partition in one
    new array (the pieces stay as they are, should a retry need them), each renumbered by
    the first input of its files."""
    lengths = [len(piece) for piece in pieces]
    spill = _joined(pieces)
    spill["input"] += np.repeat(offsets, lengths)
    return spill


def _partition_task(pieces: Sequence[np.ndarray], offsets: np.ndarray, ninputs: int
                    ) -> _combine.PartitionCounts:
    """:func:`combine_on_cluster`'s partition task: one partition's counts."""
    return _combine.count_partition([_renumbered(pieces, offsets)], ninputs)


def _aggregate_partition_task(pieces: Sequence[tuple[np.ndarray, np.ndarray]],
                              offsets: np.ndarray, ninputs: int,
                              rules: _aggregate.SeriesRules | None = None
                              ) -> tuple[_combine.PartitionCounts, tuple[int, int, int],
                                         _aggregate.SeriesCounts | None]:
    """:func:`aggregate_on_cluster`'s partition task: :func:`~.aggregate.count_part`."""
    spill = _renumbered([rows for rows, _ in pieces], offsets)
    return _aggregate.count_part([spill], [stats for _, stats in pieces], ninputs, rules)


def _joined(pieces: Sequence[np.ndarray]) -> np.ndarray:
    """The records of ``pieces`` (:data:`~.combine.SPILL`, or :data:`~.aggregate.SERIES`)
    in one new array."""
    out = np.empty(sum(len(piece) for piece in pieces),
                   pieces[0].dtype if pieces else _combine.SPILL)
    at = 0
    for piece in pieces:
        out[at : at + len(piece)] = piece
        at += len(piece)
    return out
