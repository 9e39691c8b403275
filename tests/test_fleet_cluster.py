"""combine_on_cluster and aggregate_on_cluster: combine()'s core table and aggregate()'s
result with the aggregation on Dask workers; ``scan --scheduler`` of fingerprint files out
of core.

One LocalCluster of two worker processes (loopback) for the whole module, given to the
function by its scheduler's address as ``--scheduler tcp://...`` would be.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import time
import weakref

import distributed
import numpy as np
import pytest
from conftest import runner
from test_fleet import _fingerprint, _many_inputs

from ksm_analyze import analyze, pipeline
from ksm_analyze.cli import app
from ksm_analyze.content_table import INPUT_COLUMNS
from ksm_analyze.eligibility import Scope
from ksm_analyze.errors import DumpFormatError, InputError
from ksm_analyze.fleet import aggregate as aggregate_module
from ksm_analyze.fleet import combine as combine_module
from ksm_analyze.fleet import fingerprint_files as fpfile
from ksm_analyze.fleet.aggregate import aggregate
from ksm_analyze.fleet.cluster import aggregate_on_cluster, combine_on_cluster
from ksm_analyze.fleet.combine import PartitionCounts, assemble, combine
from ksm_analyze.ksm import KsmSettings


@pytest.fixture(scope="module")
def cluster():
    with (distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                   host="127.0.0.1", dashboard_address=None) as c,
          distributed.Client(c) as watcher):  # the test's own view of the cluster
        yield c.scheduler_address, watcher


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Six inputs sharing pages in known ways, their fingerprint files, and analyze()'s
    core table of the inputs (bytes compared: the other path)."""
    tmp = tmp_path_factory.mktemp("fleet")
    inputs = _many_inputs(tmp)
    files = _fingerprint(inputs, tmp / "fp")
    return inputs, files, analyze(inputs, jobs=1).contents


def _same_table(got, want) -> None:
    assert got.input_columns.rows() == want.input_columns.rows()
    for name in ("content", "owner", "pages"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name
    assert got.page_size == want.page_size


def _same_counters(got, want) -> None:
    for ksm in (KsmSettings(), KsmSettings(max_page_sharing=2, use_zero_pages=True)):
        assert got.counters(ksm) == want.counters(ksm)
        assert got.subset([0, 3, 4]).counters(ksm) == want.subset([0, 3, 4]).counters(ksm)


@pytest.mark.parametrize(("partitions", "files_per_task", "tasks"), [(1, None, 6), (4, 4, 2)])
def test_the_cluster_gives_the_table_of_combine_and_analyze(cluster, fleet, partitions,
                                                             files_per_task, tasks, monkeypatch):
    address, _ = cluster
    _, files, analyzed = fleet
    arrived: list[object] = []  # everything the client receives from the workers
    result, gather = distributed.Future.result, distributed.Client.gather

    def noted_result(self, *args, **kwargs):
        value = result(self, *args, **kwargs)
        arrived.append(value)
        return value

    def noted_gather(self, *args, **kwargs):
        value = gather(self, *args, **kwargs)
        arrived.append(value)
        return value

    monkeypatch.setattr(distributed.Future, "result", noted_result)
    monkeypatch.setattr(distributed.Client, "gather", noted_gather)
    progress: list[tuple[int, int]] = []
    got = combine_on_cluster(files, scheduler=address, partitions=partitions,
                             files_per_task=files_per_task,
                             tasks=lambda done, of: progress.append((done, of)))
    monkeypatch.undo()
    _same_table(got, combine(files, partitions=partitions))
    _same_counters(got, analyzed)
    assert len(got.content) > 0 and sum(r["unique_pages"] for r in got.input_columns.rows()) > 0
    # Only each file's rows and each partition's counts came to the client: no pieces.
    # (6 files: one a task on two workers; 4 a task at most: tasks of 4 and 2 files.)
    heads = [a for a in arrived if isinstance(a, tuple)]
    assert len(heads) == tasks
    assert sorted(len(rows) for rows, _ in heads) == ([1] * 6 if tasks == 6 else [2, 4])
    assert all(isinstance(r, dict) for rows, size in heads for mine in rows for r in mine)
    assert {size for _, size in heads} == {4096}
    assert sum(isinstance(a, PartitionCounts) for a in arrived) == partitions
    assert len(arrived) == tasks + partitions
    total = tasks + partitions
    assert progress == [(k, total) for k in range(total + 1)]


AGGREGATING = {"prefix_bytes": 128, "page_size": 4096, "scope": Scope.MERGEABLE}
"""The analysis' settings, as analyze() gives them to aggregate()."""


def _same_aggregate(got, want) -> None:
    _same_table(got.table, want.table)
    assert got.stats == want.stats and got.zero_pages_found == want.zero_pages_found
    assert [fp.path for fp in got.prints] == [fp.path for fp in want.prints]
    assert [m.excluded for m in got.masks] == [m.excluded for m in want.masks]


class _MadeCount(distributed.diagnostics.plugin.SchedulerPlugin):
    """How many times each key reached memory: the scheduler's own transition_log keeps only
    the last ``distributed.admin.low-level-log-length`` (1,000) transitions of the module."""

    def __init__(self) -> None:
        self.made: dict[str, int] = {}

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        if finish == "memory":
            self.made[str(key)] = self.made.get(str(key), 0) + 1


def test_a_worker_killed_after_the_file_tasks_changes_nothing(cluster, fleet):
    # aggregate_on_cluster, what the command line runs; combine_on_cluster shares its
    # executor (_run), and a killed worker costs a worker's restart (seconds): once is enough.
    address, watcher = cluster
    _, files, analyzed = fleet
    killed: list[str] = []
    lost: list[str] = []
    watcher.run_on_scheduler(lambda dask_scheduler: dask_scheduler.add_plugin(
        _MadeCount(), name="made-count"))

    def kill_a_holder(done: int, of: int) -> None:
        if done != of - 4:  # every file task done; the partition tasks not yet sent
            return
        held = {w: [str(k) for k in keys if str(k).startswith("ksm-piece-")]
                for w, keys in watcher.has_what().items()}
        victim = max(held, key=lambda w: len(held[w]))
        assert held[victim], held  # it holds pieces: they must be made again
        pid = watcher.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        killed.append(victim)
        lost.extend(held[victim])

    try:
        agg = aggregate_on_cluster(files, scheduler=address, partitions=4, files_per_task=2,
                                   tasks=kill_a_holder, **AGGREGATING)
    finally:
        made = watcher.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins.pop(
            "made-count").made)
    _same_aggregate(agg, aggregate(files, partitions=4, **AGGREGATING))
    got = agg.table
    assert killed
    # Every piece the killed worker held was made again: from its files task if that was
    # still in memory on the other worker, else after running the files task again.
    assert lost and all(made.get(k, 0) >= 2 for k in lost), (lost, made)
    _same_table(got, combine(files, partitions=4))
    _same_counters(got, analyzed)
    watcher.wait_for_workers(2, timeout=60)  # the nanny started another (for the next test)
    assert killed[0] not in watcher.scheduler_info()["workers"]


def test_a_damaged_file_is_one_line_naming_it_and_the_worker(cluster, fleet, tmp_path):
    address, _ = cluster
    _, files, _ = fleet
    bad = tmp_path / "bad.ksmfp.parquet"
    data = files[1].read_bytes()
    bad.write_bytes(data[: len(data) // 2] + data[-8:])  # footer kept, middle gone
    started = time.monotonic()
    with pytest.raises(DumpFormatError) as e:
        combine_on_cluster([files[0], bad, files[2]], scheduler=address, partitions=2)
    message = str(e.value)
    assert message.startswith(f"{bad}: fingerprint file: "), message
    assert " (on Dask worker tcp://127.0.0.1:" in message and "\n" not in message
    assert time.monotonic() - started < 30  # not retried until some timeout


def test_a_file_without_content_hashes_is_refused(cluster, fleet, tmp_path):
    address, _ = cluster
    _, files, _ = fleet
    stripped = tmp_path / "stripped.ksmfp.parquet"
    prints = fpfile.load(files[0])
    fpfile.save(stripped, prints, source=fpfile.metadata(files[0])["source"],
                options=fpfile.options_of(files[0]), contents=None)  # no content columns
    with pytest.raises(InputError, match="no content hashes") as e:
        combine_on_cluster([stripped], scheduler=address, partitions=2)
    assert str(stripped) in str(e.value)


def test_no_files_is_the_empty_table_without_a_cluster():
    got = combine_on_cluster([], scheduler="tcp://127.0.0.1:1", partitions=4)
    _same_table(got, combine_module.combine([], partitions=4))
    assert len(got.input_columns) == 0


def test_no_scheduler_there_is_one_line_naming_the_address(fleet, monkeypatch):
    _, files, _ = fleet
    monkeypatch.setenv("KSM_ANALYZE_SCHEDULER_TIMEOUT", "0.5")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(InputError) as e:
        combine_on_cluster(files, scheduler=address, partitions=2)
    assert str(e.value) == f"{address}: no Dask scheduler answered there within 0.5 s"


def test_a_task_that_kept_killing_its_workers_is_one_line(monkeypatch):
    from ksm_analyze.fleet import cluster as cluster_module
    from ksm_analyze.fleet import sources

    def dying(client, futures, address):
        raise distributed.KilledWorker(futures[0], None, 3)
        yield  # a generator, as sources.finished is

    monkeypatch.setattr(sources, "finished", dying)
    named = {"ksm-files-x-0": "/fp/a.ksmfp.parquet"}
    with pytest.raises(InputError) as e:
        list(cluster_module._finished(None, ["ksm-files-x-0"], "tcp://h:1", named))
    assert str(e.value) == ("/fp/a.ksmfp.parquet: the Dask workers reading it kept dying "
                            "(a worker's memory limit too small for it?)")
    with pytest.raises(InputError, match=r"^tcp://h:1: the Dask workers counting a partition"):
        list(cluster_module._finished(None, ["ksm-partition-x-3"], "tcp://h:1", named))


def test_assemble_frees_each_partitions_counts_as_it_copies_them():
    """The client's peak is the table, not the table twice: when a partition's rows are
    copied, the partitions before it are freed already (and the list given is emptied)."""
    refs: list[weakref.ref] = []
    freed: list[list[bool]] = []  # per partition copied: are the ones before it freed?

    class Probe:  # a partition's pages: notes, as it is copied, what is still alive
        def __init__(self, k, pages):
            self.k, self.pages = k, np.array(pages, np.int64)

        def __len__(self):
            return len(self.pages)

        def __array__(self, dtype=None, copy=None):
            gc.collect()
            freed.append([r() is None for r in refs[: self.k]])
            return self.pages

    counts = [PartitionCounts(np.array(content, np.int64), np.array(owner, np.int32),
                              Probe(k, pages), np.array(unique, np.int64), classes)
              for k, (content, owner, pages, unique, classes) in enumerate([
                  ([0, 0, 1, 1], [0, 1, 0, 2], [1, 2, 3, 1], [5, 0, 0], 2),
                  ([], [], [], [0, 1, 0], 0),
                  ([0, 0], [1, 2], [4, 4], [0, 0, 7], 1)])]
    refs += [weakref.ref(c) for c in counts]
    rows = [{**dict.fromkeys(INPUT_COLUMNS, 0), "input": f"in{k}"} for k in range(3)]
    table = assemble(rows, counts, 4096)
    assert freed == [[], [True], [True, True]]
    assert counts == [] and [r() for r in refs] == [None] * 3
    # By hand: partition 2's class follows partition 0's two.
    assert table.content.tolist() == [0, 0, 1, 1, 2, 2]
    assert table.owner.tolist() == [0, 1, 0, 2, 1, 2]
    assert table.pages.tolist() == [1, 2, 3, 1, 4, 4]
    assert [r["unique_pages"] for r in rows] == [5, 1, 7]


def _scan_json(files, *extra: str) -> dict:
    out = runner.invoke(app, ["scan", *files, "--json", "-q", "-j", "1", *extra])
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout)


def _out_of_core(monkeypatch, partitions: int = 16) -> None:
    """Force the out-of-core path, ``partitions`` parts (the limit's choice is
    tests/test_out_of_core.py's)."""
    monkeypatch.setattr(pipeline, "out_of_core_partitions",
                        lambda paths, limit, jobs: (partitions, 3072, 1 << 30, jobs))


def test_scan_with_a_scheduler_aggregates_out_of_core_on_the_workers(cluster, fleet,
                                                                     monkeypatch):
    """``scan --scheduler`` of fingerprint files past --memory-limit: the JSON of the local
    out-of-core scan (and so of the in-memory one: tests/test_out_of_core.py), with no file
    read on the client."""
    address, _ = cluster
    _, files, _ = fleet
    files = [str(f) for f in files]
    _out_of_core(monkeypatch)
    local = _scan_json(files, "--memory-limit", "1MiB")
    in_memory = _scan_json(files)
    loaded = []
    monkeypatch.setattr(fpfile, "load", lambda *a, **k: loaded.append(a))  # the client's
    monkeypatch.setattr(aggregate_module, "read_files", lambda *a, **k: loaded.append(a))
    got = _scan_json(files, "--memory-limit", "1MiB", "--scheduler", address)
    assert loaded == []
    for s in (got, local):
        for timing in ("stage1_seconds", "stage2_seconds"):
            assert s["stages"].pop(timing) >= 0
    assert got == local
    assert got["warnings"][0].startswith("out of core: ") and "in 16 parts" in got["warnings"][0]
    # The counters of the in-memory scan (stage 2 compared bytes there: the dumps are here).
    assert got["host"] == {k: {s: v for s, v in by.items() if s != "steady_state"}
                           for k, by in in_memory["host"].items()}
    assert got["per_input"] == in_memory["per_input"]
    assert got["host"]["pages_sharing"]["without_zero_pages"] > 0


def test_out_of_core_on_the_cluster_refuses_as_the_client_does(cluster, fleet, tmp_path,
                                                               monkeypatch):
    """A damaged file: one line naming it and the worker, exit 1; one guest given twice:
    the client's message, in file order (before a damaged file after it)."""
    address, _ = cluster
    _, files, _ = fleet
    files = [str(f) for f in files]
    bad = tmp_path / "bad.ksmfp.parquet"
    data = fleet[1][1].read_bytes()
    bad.write_bytes(data[: len(data) // 2] + data[-8:])  # footer kept, middle gone
    _out_of_core(monkeypatch, 2)
    args = ["--memory-limit", "1MiB", "-q", "--scheduler", address]
    out = runner.invoke(app, ["scan", files[0], str(bad), files[2], *args])
    assert out.exit_code == 1
    (line,) = out.output.strip().splitlines()
    assert line.startswith(f"Error: {bad}: fingerprint file: ") and \
        " (on Dask worker tcp://127.0.0.1:" in line, line
    twice = [*files, files[0], str(bad)]
    lines = []
    for extra in (args, args[:-2]):  # on the cluster, here
        out = runner.invoke(app, ["scan", *twice, *extra])
        assert out.exit_code == 2
        lines.append(out.output.strip())
    assert lines[0] == lines[1] == (f"Error: {files[0]} is given twice (inputs 1 and 7): "
                                    "each input is one guest or process; to model two "
                                    "identical guests, give a copy")


def test_series_aggregate_on_the_workers_as_on_the_client(cluster, tmp_path, monkeypatch):
    """Samples over time out of core with --scheduler: a task reads a series' samples
    together (two series and inputs seen once, interleaved; one file holds a sample and
    another input): the scan of the local out-of-core path (and so of the in-memory one:
    tests/test_series_out_of_core.py), stability table included."""
    from test_series_out_of_core import RAN, _files, _host

    address, _ = cluster
    files = [str(f) for f in _files(tmp_path / "fp", _host(1.0, "xgqc"), RAN)]
    _out_of_core(monkeypatch, 4)
    local = _scan_json(files, "--memory-limit", "1MiB")
    got = _scan_json(files, "--memory-limit", "1MiB", "--scheduler", address)
    notes = []
    for s in (got, local):
        for timing in ("stage1_seconds", "stage2_seconds"):
            assert s["stages"].pop(timing) >= 0
        notes.append(s["warnings"].pop(0))
    assert got == local
    assert "in 16 parts" in notes[0] and "in 4 parts" in notes[1]  # at least 16 on a cluster
    assert [r["input"] for r in got["per_input"]] == ["a", "b", "c", "d"]
    assert len(got["stability"]) == 2 and "if_memory_stood_still" in got["host"]["pages_sharing"]
