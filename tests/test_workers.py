"""Errors and deaths in worker processes: the same one line as with one job, at once.

Every exception type of the package survives pickling whole; a corrupt page anywhere in a
dump read by several workers gives the line ``-j 1`` gives; a worker killed by SIGKILL ends
the run with one line and exit 1; no worker outlives a run, whatever ends it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SAMPLES, runner
from test_signals import NUMPY_ONLY, SLOW_BATCHES, Cli, gone

import ksm_analyze.hashing.stage1 as fp
from dumpwriter.kdump import make_kdump
from dumpwriter.lime import make_avml
from ksm_analyze._parallel import imap_shards, imap_threads, map_shards
from ksm_analyze.cli import app
from ksm_analyze.errors import KsmAnalyzeError, WorkerError
from ksm_analyze.formats.avml import AvmlReader
from ksm_analyze.hashing import compiled as kernels
from ksm_analyze.hashing import stage2 as dedup

PAGE = bytes(range(256)) * 16


def page(i: int) -> bytes:
    """Page ``i``: distinct from every other, and compressible by every codec."""
    return i.to_bytes(8, "little") + PAGE[8:]


def children() -> set[int]:
    """The processes this one has forked and not reaped."""
    me = os.getpid()
    return {int(p) for t in os.listdir(f"/proc/{me}/task")
            for p in Path(f"/proc/{me}/task/{t}/children").read_text().split()}


@pytest.fixture
def no_worker_left():
    before = children()
    yield
    assert children() == before, "a worker outlived the run"


# -- every exception type pickles whole -------------------------------------------------------

SAMPLE_ARGS = {"detail": "bad bytes", "path": "/dumps/vm.kdump", "offset": 0x1234, "pid": 4242,
               "signum": signal.SIGTERM, "args": ("a message",)}


def _exception_classes() -> list[type[BaseException]]:
    """Every exception class defined anywhere in the package (found in the source)."""
    found = []
    for path in sorted((ROOT / "ksm_analyze").rglob("*.py")):
        if path.name == "__main__.py":
            continue
        module = importlib.import_module(
            ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                cls = getattr(module, node.name)
                if issubclass(cls, BaseException):
                    found.append(cls)
    return found


@pytest.mark.parametrize("cls", _exception_classes(), ids=lambda c: c.__name__)
def test_every_exception_type_survives_pickling(cls):
    try:
        params = inspect.signature(cls).parameters
    except ValueError:  # Exception's own __init__: any positional arguments
        params = inspect.signature(lambda *args: None).parameters
    args, kwargs = [], {}
    for name, p in params.items():
        if p.kind is p.VAR_POSITIONAL:
            args += SAMPLE_ARGS["args"]
        elif p.kind is p.VAR_KEYWORD:
            continue
        elif p.kind is p.KEYWORD_ONLY:
            kwargs[name] = SAMPLE_ARGS[name]
        else:
            args.append(SAMPLE_ARGS[name])  # a new parameter name: add a sample above
    error = cls(*args, **kwargs)
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is cls
    assert str(back) == str(error)
    assert vars(back) == vars(error)
    for attr in ("path", "offset", "detail", "pid", "signum"):
        assert getattr(back, attr, None) == getattr(error, attr, None)


def test_the_project_errors_are_all_found():
    names = {c.__name__ for c in _exception_classes()}
    assert {"InputError", "DumpFormatError", "TruncatedDumpError", "UnsupportedDumpError",
            "CorruptPageError", "WorkerError", "ProcessError", "Interrupted"} <= names
    assert all(issubclass(c, KsmAnalyzeError) for c in _exception_classes()
               if c.__name__.endswith("Error") and not c.__name__.startswith("_"))


# -- imap_shards itself -----------------------------------------------------------------------

def _square(k: int) -> int:
    return k * k


@pytest.mark.usefixtures("no_worker_left")
@pytest.mark.parametrize(("shards", "jobs"), [(1, 4), (5, 1), (8, 2), (3, 8)])
def test_every_shard_once(shards, jobs):
    assert sorted(imap_shards(_square, shards, jobs)) == [k * k for k in range(shards)]
    assert map_shards(_square, shards, jobs) == [k * k for k in range(shards)]


@pytest.mark.usefixtures("no_worker_left")
def test_an_exception_in_a_worker_is_raised_in_the_parent_as_it_was():
    def task(k: int) -> int:
        if k == 5:
            raise LookupError(f"shard {k} failed")
        return k

    with pytest.raises(LookupError, match="shard 5 failed"):
        list(imap_shards(task, 8, 2))


@pytest.mark.usefixtures("no_worker_left")
def test_an_exception_that_does_not_pickle_still_comes_back():
    class Local(Exception):  # defined in a function: pickle cannot find it
        pass

    def task(k: int) -> int:
        raise Local("odd one")

    with pytest.raises(WorkerError, match="Local: odd one"):
        list(imap_shards(task, 4, 2))


@pytest.mark.usefixtures("no_worker_left")
def test_a_consumer_that_stops_early_leaves_no_worker():
    results = imap_shards(_square, 50, 2)
    next(results)
    results.close()


@pytest.mark.usefixtures("no_worker_left")
def test_results_come_one_at_a_time(tmp_path):
    # While the parent holds the first result, workers may finish the shard they hold and
    # one more, never run through all of them: the parent never holds every shard's result.
    def task(k: int) -> int:
        (tmp_path / f"started-{k}").touch()
        return k

    results = imap_shards(task, 20, 2)
    next(results)
    time.sleep(0.5)
    assert len(list(tmp_path.iterdir())) <= 3
    assert len(list(results)) == 19


# -- imap_threads: the kernels' shards ----------------------------------------------------------

def _pieces(k: int) -> Iterator[int]:
    yield from (k, k * k)


@pytest.mark.parametrize(("shards", "jobs"), [(1, 4), (5, 1), (8, 2), (3, 8)])
def test_every_thread_shard_once(shards, jobs):
    assert sorted(imap_threads(_pieces, shards, jobs)) == [[k, k * k] for k in range(shards)]
    assert map_shards(_square, shards, jobs, threads=True) == [k * k for k in range(shards)]


def test_a_failing_thread_stops_the_others_after_one_piece():
    seen: list[int] = []

    def task(k: int) -> Iterator[int]:
        if k == 0:
            raise LookupError("shard 0 failed")
        for piece in range(1000):
            time.sleep(0.001)
            seen.append(piece)
            yield piece

    start = time.monotonic()
    with pytest.raises(LookupError, match="shard 0 failed"):
        list(imap_threads(task, 4, 2))
    assert time.monotonic() - start < 0.5  # not the 1 s a shard's 1,000 pieces take
    assert len(seen) < 100
    assert not [t for t in threading.enumerate() if t.name.startswith("ksm-analyze")]


def test_a_consumer_that_stops_early_leaves_no_thread():
    def task(k: int) -> Iterator[int]:
        for piece in range(1000):
            time.sleep(0.001)
            yield piece

    results = imap_threads(task, 50, 2)
    next(results)
    results.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("ksm-analyze")]


@pytest.mark.usefixtures("no_worker_left")
def test_a_worker_killed_by_sigkill_is_an_error_not_a_hang():
    def task(k: int) -> int:
        if k == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return k

    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"^a worker process was killed by SIGKILL"):
        list(imap_shards(task, 8, 2))
    assert time.monotonic() - start < 5


# -- a corrupt page anywhere, through the command line ----------------------------------------

@pytest.fixture
def small_shards(monkeypatch):
    """Parallel from the first page, 8 pages a batch: dozens of shards in a small dump."""
    monkeypatch.setattr(fp, "PARALLEL_MIN_PAGES", 1)
    monkeypatch.setattr(dedup, "PARALLEL_MIN_CANDIDATES", 1)
    monkeypatch.setitem(fp.fingerprint.__kwdefaults__, "batch_pages", 8)


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _position(where: str, n: int) -> int:
    return {"start": 0, "middle": n // 2, "end": n - 1}[where]


def corrupt_kdump(path: Path, npages: int, where: str, compression: str = "zlib",
                  flattened: bool = False) -> str:
    """A kdump whose page at the start, middle or end fails to decompress."""
    lay = make_kdump(path, {i: page(i) for i in range(npages)}, max_mapnr=npages,
                     compression=compression, flattened=flattened)
    pfn = _position(where, npages)
    offset, size, _ = lay.descriptors[pfn]
    pos = 4096  # flattened: records {be64 offset, be64 size, bytes} after a 4 KiB header
    for at, data in lay.records or [(0, b"")]:
        lo, hi = max(at, offset), min(at + len(data), offset + size)
        if lay.records and lo < hi:
            _patch(path, pos + 16 + lo - at, b"\xff" * (hi - lo))
        pos += 16 + len(data)
    if not lay.records:
        _patch(path, offset, b"\xff" * size)
        return f"at offset {offset:#x}: page at PFN {pfn:#x} fails to decompress"
    return f"page at PFN {pfn:#x} fails to decompress"  # at a file offset, and the logical one


def corrupt_avml(path: Path, npages: int, where: str) -> str:
    """An AVML file whose Snappy chunk at the start, middle or end is garbled."""
    make_avml(path, [(0, b"".join(page(i) for i in range(npages)))])
    with AvmlReader(path) as r:
        chunks = r._chunk_off.tolist()
    # Past the chunk's type, length, CRC and length preamble: the compressed bytes.
    _patch(path, chunks[_position(where, len(chunks))] + 12, b"\xff" * 64)
    return "cannot decompress the Snappy chunks"


def _scan(path: Path, jobs: int) -> tuple[int, str]:
    r = runner.invoke(app, ["scan", str(path), "-j", str(jobs), "-q"])
    return r.exit_code, r.stderr


@pytest.mark.usefixtures("small_shards", "no_worker_left")
@pytest.mark.parametrize("where", ["start", "middle", "end"])
@pytest.mark.parametrize("fmt", ["kdump-zlib", "kdump-lzo", "kdump-snappy", "kdump-zstd",
                                 "kdump-flattened", "avml"])
def test_a_corrupt_page_anywhere_gives_the_one_job_line(tmp_path, fmt, where):
    path = tmp_path / "dump"
    if fmt == "avml":
        expected = corrupt_avml(path, 256, where)
    elif fmt == "kdump-flattened":
        expected = corrupt_kdump(path, 256, where, flattened=True)
    else:
        expected = corrupt_kdump(path, 256, where, compression=fmt.split("-")[1])
    one = _scan(path, 1)
    assert one[0] == 1 and expected in one[1] and one[1].count("\n") == 1, one
    assert _scan(path, 2) == one


@pytest.mark.usefixtures("no_worker_left")
def test_a_worker_killed_in_stage_1_is_one_line(tmp_path, small_shards, monkeypatch):
    hash_shard = fp._hash_shard

    def killed(reader, nbytes, batch_pages, shard, shards):
        if shard == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return hash_shard(reader, nbytes, batch_pages, shard, shards)

    monkeypatch.setattr(fp, "_hash_shard", killed)
    path = tmp_path / "dump.kdump"
    make_kdump(path, {i: page(i) for i in range(256)}, max_mapnr=256)
    code, err = _scan(path, 2)
    assert (code, err) == (1, "Error: a worker process was killed by SIGKILL (out of memory?)\n")


@pytest.mark.usefixtures("no_worker_left")
def test_a_worker_killed_in_stage_2_is_one_line(small_shards, monkeypatch):
    monkeypatch.setattr(kernels, "native", None)  # stage 2 in forked workers, not threads
    resolve = dedup._resolve_range

    def killed(*args):
        os.kill(os.getpid(), signal.SIGKILL)
        return resolve(*args)

    monkeypatch.setattr(dedup, "_resolve_range", killed)
    r = runner.invoke(app, ["scan", *SAMPLES, "-j", "2", "-q"])
    assert (r.exit_code, r.stderr) == (
        1, "Error: a worker process was killed by SIGKILL (out of memory?)\n")


# -- real sizes, in a subprocess, with a timeout ----------------------------------------------

REAL_PAGES = 17000
"""66 MiB of pages: more than fingerprint.PARALLEL_MIN_PAGES."""


def _cli(*args: object, timeout: float = 60) -> tuple[int, list[str], float]:
    start = time.monotonic()
    try:
        r = subprocess.run([sys.executable, "-m", "ksm_analyze", *map(str, args)], cwd=ROOT,
                           capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no answer in {timeout} s: a hang")
    return r.returncode, r.stderr.splitlines(), time.monotonic() - start


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_a_corrupt_page_in_a_real_size_kdump(tmp_path, where):
    assert REAL_PAGES >= fp.PARALLEL_MIN_PAGES
    path = tmp_path / "big.kdump"
    expected = corrupt_kdump(path, REAL_PAGES, where)
    code, lines, took = _cli("scan", path, "-j", 2, "-q")
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"Error: {path} ") and expected in lines[0]
    assert took < 30


def test_a_corrupt_chunk_in_a_real_size_avml(tmp_path):
    path = tmp_path / "big.avml"
    expected = corrupt_avml(path, REAL_PAGES, "middle")
    code, lines, _ = _cli("scan", path, "-j", 2, "-q")
    assert code == 1 and len(lines) == 1 and expected in lines[0], lines
    assert lines[0].startswith(f"Error: {path} at offset 0x")


def test_a_worker_killed_from_outside(tmp_path):
    path = tmp_path / "big.raw"
    np.repeat(np.arange(1, 65537, dtype=np.uint64), 512).tofile(path)  # 256 MiB, distinct pages
    run = Cli("scan", path, "-j", 2, "-q", prelude=SLOW_BATCHES + NUMPY_ONLY)  # processes
    run.wait_for("BATCH")
    workers = run.workers(2)
    killed = time.monotonic()
    os.kill(workers[0], signal.SIGKILL)
    code, lines, _ = run.finish()
    assert (code, lines) == (1, ["Error: a worker process was killed by SIGKILL (out of memory?)"])
    assert time.monotonic() - killed < 5
    assert gone(workers)
