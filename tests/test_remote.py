"""``--scheduler``: only the forms that work are accepted, ``local:N`` is held to the machine's
CPUs, and a scheduler address that does not answer as a Dask scheduler (a silent listener, a
web server) is one line naming it and exit 1 within ``KSM_ANALYZE_SCHEDULER_TIMEOUT``.

Network tests use loopback only, each bounded in time (the subprocess is killed at 60 s).
"""

from __future__ import annotations

import http.server
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import ROOT, SAMPLES, runner

from ksm_analyze.cli import app
from ksm_analyze.options import ScanOptions

TIMEOUT = 1
"""KSM_ANALYZE_SCHEDULER_TIMEOUT in these tests, in seconds."""


def _run(*args: str) -> tuple[int, list[str], float]:
    """``ksm-analyze ARGS`` in a subprocess with a 1 s scheduler timeout: exit code, stderr
    lines, seconds taken."""
    env = {**os.environ, "KSM_ANALYZE_SCHEDULER_TIMEOUT": str(TIMEOUT),
           "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    try:
        run = subprocess.run([sys.executable, "-m", "ksm_analyze", *args], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("still running after 60 s: a hang")
    return run.returncode, run.stderr.splitlines(), time.monotonic() - start


@pytest.fixture
def silent() -> Iterator[str]:
    """tcp://127.0.0.1:PORT of a listener that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:  # closed: the test is over
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"tcp://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()
        for conn in accepted:
            conn.close()


class _Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def web() -> Iterator[str]:
    """tcp://127.0.0.1:PORT of an HTTP server (it answers a Dask handshake with a 400)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"tcp://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("command", ["scan", "fingerprint"])
@pytest.mark.parametrize("service", ["silent", "web"])
def test_a_scheduler_that_does_not_answer_as_dask_is_one_line_within_the_timeout(
        command, service, request, tmp_path):
    address = request.getfixturevalue(service)
    extra = ["-o", str(tmp_path / "fp")] if command == "fingerprint" else []
    rc, lines, took = _run(command, SAMPLES[1], "--scheduler", address, "-q", *extra)
    assert rc == 1, lines
    assert lines == [f"Error: {address}: no Dask scheduler answered there within {TIMEOUT} s"]
    assert took < 15


@pytest.mark.parametrize("value", ["0", "-1", "1.5"])
def test_a_bad_timeout_is_one_line(value, silent):
    env = {**os.environ, "KSM_ANALYZE_SCHEDULER_TIMEOUT": value, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "ksm_analyze", "scan", SAMPLES[1], "-q",
                          "--scheduler", silent], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    if value == "1.5":  # seconds need not be whole
        assert run.returncode == 1
        assert run.stderr.endswith("within 1.5 s\n")
    else:
        assert (run.returncode, run.stderr) == (2, (
            f"Error: KSM_ANALYZE_SCHEDULER_TIMEOUT={value!r}: give the seconds to wait for "
            "the Dask scheduler, more than 0\n"))


@pytest.mark.parametrize("address", ["tls://127.0.0.1:8786", "ucx://127.0.0.1:8786",
                                     "inproc://x", "ws://127.0.0.1:8786", "tcp://",
                                     "tcp://127.0.0.1", "tcp://127.0.0.1:0",
                                     "tcp://127.0.0.1:65536", "tcp://a b:1",
                                     "local:0", "local:-1", "local:1.5", "local:x", "local:",
                                     "local2", "localhost:8786"])
def test_only_the_supported_scheduler_forms_are_accepted(address):
    out = runner.invoke(app, ["scan", SAMPLES[1], "--scheduler", address, "-q"])
    assert out.exit_code == 2
    assert out.output == (f"Error: --scheduler {address!r}: give tcp://HOST:PORT of a Dask "
                          "scheduler, local or local:N (N workers, at least 1)\n")


@pytest.mark.parametrize(("address", "workers"), [
    ("local", 2), ("local:1", 1), ("local:2", 2), ("local:3", 2), ("local:24", 2),
    ("local:100000", 2), ("tcp://127.0.0.1:8786", None)])
def test_a_local_cluster_is_held_to_the_cpus(address, workers, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # this process: 2 CPUs
    assert ScanOptions(scheduler=address).local_workers() == workers


def test_a_local_cluster_of_more_workers_than_cpus_starts_as_many_as_cpus_and_says_so(
        monkeypatch, tmp_path):
    # A real LocalCluster: how many workers it was asked to start, and the one warning.
    import distributed

    cpus = len(os.sched_getaffinity(0))
    started: list[int] = []
    real = distributed.LocalCluster

    def counted(*args, n_workers: int, **kwargs):  # type: ignore[no-untyped-def]
        started.append(n_workers)
        return real(*args, n_workers=n_workers, **kwargs)

    monkeypatch.setattr(distributed, "LocalCluster", counted)
    out = runner.invoke(app, ["fingerprint", SAMPLES[1], "-o", str(tmp_path / "fp"), "-q",
                              "--scheduler", f"local:{cpus + 22}"])
    assert out.exit_code == 0, out.output
    assert started == [cpus]
    workers = "1 worker" if cpus == 1 else f"{cpus} workers"
    assert out.stderr.splitlines() == [
        f"Warning: --scheduler local:{cpus + 22}: {workers}, one per CPU this process may use"]


@pytest.fixture
def lone_scheduler() -> Iterator[tuple[str, subprocess.Popen[str], queue.Queue[str]]]:
    """A real ``dask scheduler`` on 127.0.0.1 with no worker (tasks wait there for ever), and
    the lines of its log as they come."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1",
                             "--port", str(port), "--dashboard-address", ":0"],
                            stderr=subprocess.PIPE, text=True)
    log: queue.Queue[str] = queue.Queue()

    def read() -> None:  # always: a full pipe would stall the scheduler
        assert proc.stderr is not None
        with proc.stderr:
            for line in proc.stderr:
                log.put(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        _wait_for(log, "Scheduler at:")
        yield f"tcp://127.0.0.1:{port}", proc, log
    finally:
        proc.kill()
        proc.wait()


def _wait_for(log: queue.Queue[str], text: str) -> None:
    end = time.monotonic() + 30
    while text not in log.get(timeout=max(0.01, end - time.monotonic())):
        pass


def test_a_scheduler_without_workers_is_one_line_after_six_timeouts(lone_scheduler):
    address, _, _ = lone_scheduler
    rc, lines, took = _run("scan", SAMPLES[1], "--scheduler", address, "-q")
    assert (rc, lines) == (1, [(f"Error: {address}: the Dask scheduler has no worker to run "
                               f"the tasks (none for {6 * TIMEOUT} s)")])
    assert 6 * TIMEOUT <= took < 30


def test_a_scheduler_that_stops_answering_mid_run_is_one_line(lone_scheduler):
    address, scheduler, log = lone_scheduler
    env = {**os.environ, "KSM_ANALYZE_SCHEDULER_TIMEOUT": "2", "PYTHONPATH": str(ROOT)}
    run = subprocess.Popen([sys.executable, "-m", "ksm_analyze", "scan", SAMPLES[1], "-q",
                            "--scheduler", address], cwd=ROOT, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(log, "Receive client connection")  # its tasks come next, and wait there
        time.sleep(0.5)
        scheduler.send_signal(signal.SIGSTOP)  # hung: the connection stays open, silent
        stopped = time.monotonic()
        _, err = run.communicate(timeout=60)
        took = time.monotonic() - stopped
    finally:
        run.kill()
        scheduler.send_signal(signal.SIGCONT)
    assert (run.returncode, err) == (1, (f"Error: {address}: the Dask scheduler stopped "
                                        "answering (nothing for 2 s)\n"))
    assert took < 15


SLOW_WORKER = """
import os, time
import ksm_analyze.hashing.stage1 as _fp
_hash_batch = _fp.hash_batch
def _slow(batch, nbytes):
    with open(os.environ["KSM_TEST_MARKS"], "a") as f:
        f.write("batch\\n")
    time.sleep(1.0)
    return _hash_batch(batch, nbytes)
_fp.hash_batch = _slow
"""
"""sitecustomize for a LocalCluster's workers: each batch is noted in KSM_TEST_MARKS, then
waits a second before it is hashed."""


def test_a_dump_truncated_under_a_dask_worker_is_one_line_naming_it_and_the_worker(
        tmp_path, monkeypatch):
    # The dump only the workers read (this process cannot): truncated while a worker hashes
    # it, the worker must neither die of SIGBUS (then, run again, it would hash what is left
    # and the prediction would silently be of 1 MiB) nor hide it.
    from test_signals import write_pages

    from ksm_analyze.fleet import sources

    site, marks = tmp_path / "site", tmp_path / "marks"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_WORKER)
    marks.touch()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(ROOT)]))
    monkeypatch.setenv("KSM_TEST_MARKS", str(marks))
    dump = write_pages(tmp_path / "dump.raw", 16384)  # 64 MiB: two batches
    monkeypatch.setattr(sources, "readable_here", lambda path: False)

    def truncate() -> None:
        end = time.monotonic() + 60
        while not marks.read_text() and time.monotonic() < end:
            time.sleep(0.02)
        os.truncate(dump, 1 << 20)

    cutter = threading.Thread(target=truncate, daemon=True)
    cutter.start()
    out = runner.invoke(app, ["scan", str(dump), "--scheduler", "local:1", "-q"])
    cutter.join()
    assert out.exit_code == 1, out.output
    assert out.output.startswith(f"Error: {dump}: truncated while reading (size was 64 MiB, "
                                 "now 1 MiB) (on Dask worker tcp://127.0.0.1:")
    assert out.output.count("\n") == 1
