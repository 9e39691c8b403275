"""Fleet scale: fingerprint files, the cache, and stage 1 on a real Dask cluster.

Every route must give the prediction a single process gives from the dumps, field for field:
fingerprint files (with the dumps here: bytes compared; without them: 128-bit content
hashes), cache hits, a LocalCluster of two workers, and a ``dask scheduler`` with two
``dask worker`` processes on 127.0.0.1, one of which is killed mid-run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import distributed  # tests/run.sh installs the [dask] extra: these tests are not optional
import numpy as np
import pytest
from conftest import PS, ROOT, SAMPLES, runner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fuzz import run_isolated

import workload
from ksm_analyze import analyze
from ksm_analyze.cli import app
from ksm_analyze.errors import DumpFormatError, InputError
from ksm_analyze.fleet import fingerprint_files as fpfile
from qemu_guest import Guest, ensure_guest_assets, qemu_available

PREDICTION = ("per_input", "host", "savings", "histogram", "exclusions", "convergence",
              "pairwise", "address_map")
"""The tables that must not depend on where stage 1 ran (``stages`` holds timings)."""



def _scan(*args: str) -> dict:
    out = runner.invoke(app, ["scan", *map(str, args), "--json", "-q"])
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout)


def _same_prediction(a: dict, b: dict, *, contents: bool = True) -> None:
    for name in PREDICTION:
        assert a[name] == b[name], name
    if contents:
        assert a["top_contents"] == b["top_contents"]


def _samples() -> list[Path]:
    return [Path(p) for p in SAMPLES]


def _fingerprint(dumps, out: Path, *extra: str) -> list[Path]:
    result = runner.invoke(app, ["fingerprint", *map(str, dumps), "-o", str(out), "-q", *extra])
    assert result.exit_code == 0, result.output
    return sorted(out.glob("*" + fpfile.SUFFIX))


def test_fingerprint_files_give_the_scan_of_the_dumps(tmp_path):
    files = _fingerprint(_samples(), tmp_path / "fp")
    assert len(files) == 2
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    dumps, prints = _scan(*_samples()), _scan(*files)
    _same_prediction(dumps, prints)
    assert prints["stages"]["verified"] is True  # the dumps are here: bytes compared
    assert prints["stages"]["inputs_from_fingerprint_files"] == 2
    # Mixed with a dump, in either order.
    _same_prediction(_scan(files[0], _samples()[1]), dumps)


def test_plan_and_report_take_fingerprint_files_too(tmp_path):
    files = _fingerprint(_samples(), tmp_path / "fp")

    def plan(*inputs: Path) -> dict:
        out = runner.invoke(app, ["plan", *map(str, inputs), "--host-memory", "400KiB",
                                  "--json", "-q"])
        assert out.exit_code == 0, out.output
        return json.loads(out.stdout)

    assert plan(*files) == plan(*_samples())
    out = runner.invoke(app, ["report", *map(str, files), "-o", str(tmp_path / "r"), "-q"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "r" / "index.html").exists()


def test_fingerprint_files_without_their_dumps_use_content_hashes(tmp_path):
    moved = [shutil.copy(p, tmp_path / p.name) for p in _samples()]
    files = _fingerprint(moved, tmp_path / "fp")
    want = _scan(*moved)
    for p in moved:
        os.unlink(p)
    got = _scan(*files)
    _same_prediction(got, want, contents=False)
    assert got["stages"]["verified"] is False and got["stages"]["hash_bits"] == 128
    assert got["stages"]["merges"] == want["stages"]["merges"] > 0
    text = runner.invoke(app, ["scan", *map(str, files), "-q"]).stdout
    assert "merges NOT verified byte for byte (a dump is not readable here)" in text
    # No page bytes anywhere in the files: the top content's bytes are not in them.
    page = Path(_samples()[1]).read_bytes()[:PS]
    for f in files:
        assert page[:64] not in f.read_bytes()


def test_a_damaged_fingerprint_file_is_one_line(tmp_path):
    (f,) = _fingerprint(_samples()[:1], tmp_path / "fp")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] + data[-8:])  # footer kept, middle gone
    out = runner.invoke(app, ["scan", str(f), "-q"])
    assert out.exit_code == 1
    assert out.output.count("\n") == 1 and str(f) in out.output, out.output
    with pytest.raises(DumpFormatError, match="fingerprint file"):
        fpfile.load(f)


def test_the_cache_skips_reading_and_says_so(tmp_path, monkeypatch):
    from ksm_analyze.fleet import sources

    dumps = [shutil.copy(p, tmp_path / p.name) for p in _samples()]
    first = _scan(*dumps, "--cache", tmp_path / "cache")
    assert first["stages"]["inputs_from_cache"] == 0
    assert len(list((tmp_path / "cache").glob("*" + fpfile.SUFFIX))) == 2

    def no_reading(*args, **kwargs):
        raise AssertionError("stage 1 read a cached dump")

    monkeypatch.setattr(sources, "fingerprint", no_reading)
    second = _scan(*dumps, "--cache", tmp_path / "cache")
    assert second["stages"]["inputs_from_cache"] == 2
    _same_prediction(first, second)
    text = runner.invoke(app, ["scan", *map(str, dumps), "--cache", str(tmp_path / "cache"),
                               "-q"]).stdout
    assert "Stage 1 skipped for 2 of 2 inputs: 2 from the cache (not read again)." in text
    # A changed dump is read again; so is one under other hashing options.
    monkeypatch.undo()
    os.utime(dumps[0], ns=(time.time_ns(), time.time_ns()))
    assert _scan(*dumps, "--cache", tmp_path / "cache")["stages"]["inputs_from_cache"] == 1
    assert _scan(*dumps, "--cache", tmp_path / "cache", "--prefix-bytes", "64")[
        "stages"]["inputs_from_cache"] == 0


HASHED = {0: PS, 1: 1, 64: 64, 128: 128, 4095: 4095, 4096: PS, 8192: PS, 1 << 20: PS}
"""--prefix-bytes -> the bytes of a 4 KiB page stage 1 hashes: 0 and anything past the page
mean the whole page."""


@pytest.mark.parametrize("prefix", sorted(HASHED))
def test_every_prefix_length_round_trips_through_files_and_the_cache(tmp_path, prefix):
    dumps = [shutil.copy(p, tmp_path / p.name) for p in _samples()]
    given = ("--prefix-bytes", str(prefix))
    want = _scan(*dumps, *given)
    assert want["options"]["prefix_bytes"] == HASHED[prefix]
    files = _fingerprint(dumps, tmp_path / "fp", *given)
    got = _scan(*files, *given)
    _same_prediction(got, want)
    assert got["stages"]["inputs_from_fingerprint_files"] == 2
    assert got["options"]["prefix_bytes"] == HASHED[prefix]
    # Every spelling of the same hashed length reads the file; another length is refused.
    for other, hashed in HASHED.items():
        out = runner.invoke(app, ["scan", *map(str, files), "--prefix-bytes", str(other), "-q"])
        assert (out.exit_code == 0) == (hashed == HASHED[prefix]), (other, out.output)
    # The cache: filled once, then hit, under every spelling of the same length.
    cache = ("--cache", tmp_path / "cache")
    assert _scan(*dumps, *cache, *given)["stages"]["inputs_from_cache"] == 0
    for other, hashed in HASHED.items():
        if hashed == HASHED[prefix]:
            hit = _scan(*dumps, *cache, "--prefix-bytes", other)
            assert hit["stages"]["inputs_from_cache"] == 2, other
            _same_prediction(hit, want)


# -- Dask ---------------------------------------------------------------------------------


def _many_inputs(tmp_path: Path, n: int = 6) -> list[Path]:
    """Inputs that share pages in known ways: copies of the samples, each changed a little."""
    out = []
    for k in range(n):
        src = _samples()[k % 2]
        data = bytearray(src.read_bytes())
        at = len(data) - (k + 1) * PS  # in the page data, past any header
        data[at : at + 8] = (k + 1).to_bytes(8, "little")
        path = tmp_path / f"in{k}{src.suffix}"
        path.write_bytes(bytes(data))
        out.append(path)
    return out


def test_a_local_cluster_gives_the_single_process_prediction(tmp_path):
    inputs = _many_inputs(tmp_path)
    _same_prediction(_scan(*inputs, "--scheduler", "local:2"), _scan(*inputs, "-j", "1"))


def test_a_dump_only_the_workers_can_read_is_hashed_there(tmp_path, monkeypatch):
    from ksm_analyze.fleet import sources

    inputs = _many_inputs(tmp_path, 4)
    want = _scan(*inputs, "-j", "1")
    hidden, readable = str(inputs[1]), sources.readable_here
    # As if inputs[1] lay on the workers' machines only: the workers (other processes)
    # read it and send its content hashes; this process compares the rest by them too.
    monkeypatch.setattr(sources, "readable_here", lambda p: p != hidden and readable(p))
    got = _scan(*inputs, "--scheduler", "local:2")
    _same_prediction(got, want, contents=False)
    assert got["stages"]["hash_bits"] == 128 and got["stages"]["verified"] is False
    assert got["stages"]["merges"] == want["stages"]["merges"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLOW_WORKER = """
import os, time
import ksm_analyze.hashing.stage1 as _fp
_hash_batch = _fp.hash_batch
def _slow(batch, nbytes):
    with open(os.environ["KSM_TEST_MARKS"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(1.0)
    return _hash_batch(batch, nbytes)
_fp.hash_batch = _slow
"""
"""sitecustomize for the cluster's workers: every batch notes the worker's pid in the file
KSM_TEST_MARKS, then takes a second more."""


@pytest.fixture
def cluster(tmp_path):
    """A ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1 (slowed down)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_WORKER)
    marks = tmp_path / "marks"
    marks.touch()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
           "KSM_TEST_MARKS": str(marks)}
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = [sys.executable, "-m", "dask"]  # the `dask` command of this Python
    procs = [subprocess.Popen([*dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", ":0"], env=env,
                              stderr=subprocess.DEVNULL)]
    workers = [subprocess.Popen([*dask, "worker", address, "--nthreads", "1", "--no-nanny"],
                                env=env, stderr=subprocess.DEVNULL) for _ in range(2)]
    procs += workers
    try:
        client = distributed.Client(address, timeout=30)
        client.wait_for_workers(2, timeout=60)
        client.close()
        yield address, workers, marks
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_scheduler_and_two_workers_give_the_single_process_prediction(tmp_path, cluster):
    address, _, _ = cluster
    inputs = _many_inputs(tmp_path)
    _same_prediction(_scan(*inputs, "--scheduler", address), _scan(*inputs, "-j", "1"))


def test_a_worker_killed_mid_run_changes_nothing(tmp_path, cluster):
    address, workers, marks = cluster
    inputs = _many_inputs(tmp_path, 8)  # 8 tasks of about a second on 2 workers
    run = subprocess.Popen([sys.executable, "-m", "ksm_analyze", "scan", *map(str, inputs),
                            "--json", "-q", "--scheduler", address], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    victim = workers[0]
    deadline = time.monotonic() + 60
    while str(victim.pid) not in marks.read_text().split():  # it is inside a task now
        assert time.monotonic() < deadline and run.poll() is None, run.stderr.read()
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err.decode()
    _same_prediction(json.loads(out), _scan(*inputs, "-j", "1"))


def test_an_input_a_worker_cannot_read_is_one_line_naming_it_and_the_worker(tmp_path):
    from ksm_analyze.fleet.sources import fingerprint_sources, open_sources
    from ksm_analyze.options import ScanOptions

    path = shutil.copy(_samples()[1], tmp_path / "gone.raw")
    options = ScanOptions(scheduler="local:1")
    import contextlib

    with contextlib.ExitStack() as stack:
        sources = open_sources([path], options, PS, [0], stack)
        os.unlink(path)  # open here; gone by the time the worker looks
        with pytest.raises(InputError) as e:
            fingerprint_sources(sources, options, lambda name: lambda n, of: None)
    message = str(e.value)
    assert message.startswith(f"{os.path.abspath(path)}: no such file (on Dask worker tcp://")
    assert "\n" not in message


def test_without_dask_the_error_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    out = runner.invoke(app, ["scan", str(_samples()[0]), "--scheduler", "local:2", "-q"])
    assert out.exit_code == 1
    assert "pip install 'ksm-analyze[dask]'" in out.output


# -- real dumps ------------------------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 is not installed")
def test_fingerprint_files_of_real_qemu_dumps(tmp_path):
    with Guest(ensure_guest_assets(), mem_mib=256, cmdline_extra="ksmfill=1:8:4",
               workdir=tmp_path) as guest:
        guest.pause()
        elf = guest.dump_elf(tmp_path / "guest.elf")
        kdump = guest.dump_kdump_zlib(tmp_path / "guest.kdump")
    files = _fingerprint([elf, kdump], tmp_path / "fp")
    _same_prediction(_scan(*files), _scan(elf, kdump))


@pytest.mark.skipif(os.geteuid() != 0, reason="capture needs root (kpageflags)")
def test_fingerprint_files_of_a_process_snapshot(tmp_path):
    from ksm_analyze.live.capture import capture

    snap = tmp_path / "wl.snap"
    with workload.running(7) as pid:
        capture([pid], snap)
    files = _fingerprint([snap], tmp_path / "fp")
    assert len(files) == 1
    want = _scan(snap)
    _same_prediction(_scan(*files), want)
    assert len(fpfile.load(files[0])) == len(want["per_input"])


def test_a_fingerprint_file_is_small(tmp_path):
    """No page bytes: a file costs about its fingerprints (16-32 bytes a page), compressed."""
    (f,) = _fingerprint(_samples()[:1], tmp_path / "fp")
    pages = int(np.ceil(Path(_samples()[0]).stat().st_size / PS))
    assert f.stat().st_size < 40 * pages + 16384


@pytest.mark.parametrize("partitions", [1, 4, 64])
def test_combine_builds_the_core_table_of_analyze(tmp_path, partitions):
    from ksm_analyze.fleet.combine import combine
    from ksm_analyze.ksm import KsmSettings

    inputs = _many_inputs(tmp_path)
    files = _fingerprint(inputs, tmp_path / "fp")
    got = combine(files, partitions=partitions, workdir=str(tmp_path))
    want = analyze(inputs, jobs=1).contents
    assert got.input_columns.rows() == want.input_columns.rows()
    for ksm in (KsmSettings(), KsmSettings(max_page_sharing=2, use_zero_pages=True)):
        assert got.counters(ksm) == want.counters(ksm)
        assert got.subset([0, 3, 4]).counters(ksm) == want.subset([0, 3, 4]).counters(ksm)
    assert sorted(map(len, (got.content, got.owner, got.pages))) == [len(want.content)] * 3
    assert list(tmp_path.glob("ksm-combine-*")) == []  # partition files removed


def test_combine_refuses_files_without_content_hashes(tmp_path):
    from ksm_analyze.fleet.combine import combine

    dump = shutil.copy(_samples()[0], tmp_path / "a.elf")
    _scan(dump, "--cache", tmp_path / "cache")  # cache files carry no content hashes
    (entry,) = (tmp_path / "cache").iterdir()
    with pytest.raises(InputError, match="no content hashes"):
        combine([entry])


# -- hostile fingerprint files --------------------------------------------------------------


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory):
    (f,) = _fingerprint(_samples()[:1], tmp_path_factory.mktemp("seed"))
    return f.read_bytes()


def _one_line_or_ok(path: Path) -> None:
    def load_and_scan() -> None:
        fpfile.load(path)
        analyze([path], jobs=1)

    size = path.stat().st_size
    result = run_isolated(load_and_scan, mem=(256 << 20) + 512 * size, seconds=10)
    assert result[0] in ("ok", "error"), result
    if result[0] == "error":
        message = result[2]
        assert message.startswith(str(path)) and "\n" not in message, message


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_fingerprint_files_fail_cleanly(tmp_path, seed_file, data):
    raw = bytearray(seed_file)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path / "f.ksmfp.parquet"
    path.write_bytes(bytes(raw))
    _one_line_or_ok(path)


HOSTILE_META = [
    {"rows": 1 << 40}, {"rows": -1}, {"page_size": 0}, {"page_size": "x"},
    {"extents": [[0, 1 << 50, 0, 0, "", 0]]}, {"extents": [[0, 1, 9, 0, "", 0]]},
    {"extents": "nope"}, {"format": "zip"}, {"info": []}, {"prefix_bytes": -5},
]


@pytest.mark.parametrize("change", HOSTILE_META, ids=lambda c: next(iter(c)))
def test_hostile_fingerprint_metadata_fails_cleanly(tmp_path, seed_file, change):
    import pyarrow as pa
    import pyarrow.parquet as pq

    seed = tmp_path / "seed.parquet"
    seed.write_bytes(seed_file)
    table = pq.read_table(seed)
    meta = json.loads(table.schema.metadata[fpfile.META_KEY])
    meta["inputs"][0].update(change)
    path = tmp_path / "f.ksmfp.parquet"
    raw = json.dumps(meta).encode()  # with a matching digest: the bounds must hold anyway
    columns = {name: table.column(name).to_numpy() for name in table.column_names}
    pq.write_table(table.replace_schema_metadata(
        {fpfile.META_KEY: raw, fpfile.DIGEST_KEY: fpfile.digest(raw, columns).encode()}), path)
    assert isinstance(table, pa.Table)
    _one_line_or_ok(path)
