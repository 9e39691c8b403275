"""Nothing lost, nothing changed: inputs are only ever read, and every output is the old file
or the whole new one, whatever stops the run (SIGINT, SIGTERM, a full disk), with no
temporary file left behind."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PS, SAMPLES, runner
from test_signals import Cli

from dumpwriter.kdump import make_kdump
from dumpwriter.lime import make_avml, make_lime
from ksm_analyze import analyze
from ksm_analyze.cli import app
from ksm_analyze.render.files import atomic_write
from ksm_analyze.render.report import report_files


def _inputs(directory: Path) -> list[Path]:
    """The samples and one dump of each other format, in ``directory``."""
    directory.mkdir(exist_ok=True)
    paths = [Path(shutil.copy(p, directory)) for p in SAMPLES]
    page = bytes(range(256)) * (PS // 256)
    make_kdump(directory / "k.kdump", {0: page, 3: page}, max_mapnr=8)
    paths.append(directory / "k.kdump")
    paths.append(make_lime(directory / "l.lime", [(0, page * 2)]))
    paths.append(make_avml(directory / "a.avml", [(0, page * 2)]))
    return paths


def _state(paths: list[Path]) -> list[tuple[bytes, int, int]]:
    return [(p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode) for p in paths]


def _leftovers(directory: Path) -> list[str]:
    """Temporary files (hidden, ``.NAME.XXXX``) left in ``directory``."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# -- inputs: read, never written --------------------------------------------------------------

def test_inputs_are_only_ever_opened_read_only(tmp_path, monkeypatch):
    paths = _inputs(tmp_path / "in")
    names = {str(p) for p in paths}
    opened: list[tuple[str, int]] = []
    real_open = os.open

    def spy(path, flags, *args, **kwargs):
        if os.fspath(path) in names:
            opened.append((os.fspath(path), flags))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    analyze(paths, jobs=2)
    assert {p for p, _ in opened} == names
    for path, flags in opened:
        assert flags & os.O_ACCMODE == os.O_RDONLY, path
        assert not flags & (os.O_CREAT | os.O_TRUNC | os.O_APPEND), path


@pytest.mark.parametrize("how", ["mode 0400", "chattr +i"])
def test_read_only_and_immutable_inputs_are_read_and_left_alone(tmp_path, how):
    paths = _inputs(tmp_path / "in")
    for p in paths:
        p.chmod(0o400)
    if how == "chattr +i":
        if shutil.which("chattr") is None:
            pytest.skip("no chattr here")
        r = subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True, text=True,
                           check=False)
        if r.returncode:
            pytest.skip(f"chattr +i does not work here: {r.stderr.strip()}")
    try:
        before = _state(paths)
        for args in (["scan", *map(str, paths), "-j", "2", "--json"],
                     ["report", *map(str, paths), "-o", str(tmp_path / "out")],
                     ["info", str(paths[0])]):
            r = runner.invoke(app, args)
            assert r.exit_code == 0, r.stderr
        assert _state(paths) == before
    finally:
        if how == "chattr +i":
            subprocess.run(["chattr", "-i", *map(str, paths)], check=False)


# -- atomic_write ------------------------------------------------------------------------------

def test_atomic_write_replaces_the_whole_file(tmp_path):
    path = tmp_path / "t.csv"
    atomic_write(path, "old\n")
    atomic_write(path, b"new\n")
    assert path.read_bytes() == b"new\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     KeyboardInterrupt()], ids=["disk full", "interrupt"])
def test_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch,
                                                                      failure):
    path = tmp_path / "t.csv"
    atomic_write(path, "old\n")

    def fail(fd: int) -> None:
        raise failure

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(type(failure)):
        atomic_write(path, "new and longer\n" * 1000)
    assert path.read_text() == "old\n"
    assert _leftovers(tmp_path) == []


# -- interrupted while writing, through the command line --------------------------------------

def _signal_at_fsync(n: int, sig: signal.Signals) -> str:
    """Prelude: the ``n``-th fsync (the ``n``-th output file) signals the process, which then
    sits in that write until the signal's handler unwinds it: mid-write, before the rename."""
    return f"""
import os, time
_fsync, _count = os.fsync, [0]
def _fs(fd):
    _count[0] += 1
    if _count[0] == {n}:
        os.kill(os.getpid(), {int(sig)})
        time.sleep(30)
    return _fsync(fd)
os.fsync = _fs
"""


_CLOCK = re.compile(rb"\d{4}-\d\d-\d\d \d\d:\d\d UTC|(?<=_seconds,)[0-9.e-]+")


def _content(path: Path) -> bytes:
    """The file's bytes, with what the clock writes (the time stamp, timings) blanked."""
    return _CLOCK.sub(b"CLOCK", path.read_bytes())


def _old_or_new(out: Path, old: Path, new: Path) -> list[str]:
    """Which files in ``out`` are the new version; each must be the old or the new whole."""
    replaced = []
    for path in sorted(out.iterdir()):
        if _content(path) == _content(old / path.name):
            continue  # old, or the same in both (a table empty in both reports)
        if _content(path) == _content(new / path.name):
            replaced.append(path.name)
        else:
            assert _content(path) == _content(old / path.name), f"{path.name} is half written"
    return replaced


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> tuple[Path, Path]:
    """A report of one sample (the old one) and of both (what a rerun writes)."""
    old, new = (tmp_path_factory.mktemp(n) / "report" for n in ("old", "new"))
    for out, dumps in ((old, SAMPLES[:1]), (new, SAMPLES)):
        r = runner.invoke(app, ["report", *dumps, "-o", str(out)])
        assert r.exit_code == 0, r.stderr
    return old, new


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("nth", ["first", "middle", "last"])
def test_a_report_interrupted_while_writing_is_the_old_report_whole(tmp_path, reports, sig,
                                                                    code, nth):
    old, new = reports
    out = tmp_path / "report"
    shutil.copytree(old, out)
    files = len(report_files(out))
    n = {"first": 1, "middle": files // 2, "last": files}[nth]
    run = Cli("report", *SAMPLES, "-o", out, "-q", prelude=_signal_at_fsync(n, sig))
    rc, lines, _ = run.finish()
    assert (rc, lines) == (code, [f"Error: interrupted by {sig.name}"])
    assert _old_or_new(out, old, new) == []  # written aside, renamed in only when whole
    assert _leftovers(out) == []


def test_scan_csv_interrupted_while_writing(tmp_path):
    out = tmp_path / "csv"
    r = runner.invoke(app, ["scan", SAMPLES[0], "--csv", str(out)])
    assert r.exit_code == 0, r.stderr
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    run = Cli("scan", *SAMPLES, "--csv", out, "-q", prelude=_signal_at_fsync(3, signal.SIGTERM))
    rc, lines, _ = run.finish()
    assert (rc, lines) == (143, ["Error: interrupted by SIGTERM"])
    assert run.stdout == b""  # no report printed after the interruption
    for p in out.iterdir():  # each the old file or the new one (the first two), never half
        assert p.read_bytes() == old[p.name] or p.read_bytes().endswith(b"\n"), p.name
    assert _leftovers(out) == []


# -- a full disk -------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True, check=False)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` but for about ``leave`` bytes."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while f.write(b"\0" * 4096):
            pass
    os.truncate(filler, max(0, filler.stat().st_size - leave))


def test_a_report_on_a_full_disk(small_disk, reports):
    old, new = reports
    out = small_disk / "report"
    shutil.copytree(old, out)
    _fill(small_disk, 128 << 10)
    r = runner.invoke(app, ["report", *SAMPLES, "-o", str(out)])
    assert r.exit_code == 1
    assert re.fullmatch(rf"Error: {out}: cannot write the report: No space left on device "
                        r"\(.*\)\n", r.stderr), r.stderr
    assert _old_or_new(out, old, new) == []  # the old report, whole: nothing replaced
    assert _leftovers(out) == []


def test_scan_csv_on_a_full_disk(small_disk):
    out = small_disk / "csv"
    _fill(small_disk, 0)
    r = runner.invoke(app, ["scan", *SAMPLES, "--csv", str(out)])
    assert r.exit_code == 1
    assert r.stderr == (f"Error: {out}: cannot write CSV files: No space left on device "
                        f"({out / 'per_input.csv'})\n")
    assert _leftovers(out) == []


@pytest.fixture
def target() -> Iterator[int]:
    """A live process holding 256 KiB of random anonymous memory, far more than the full
    disk's 16 KiB ("sleep" alone has so few pages that its snapshot could fit)."""
    code = "import os, time; d = os.urandom(256 << 10); print('ready', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.communicate()


def test_a_snapshot_on_a_full_disk(small_disk, target):
    snap = small_disk / "t.snap"
    snap.write_bytes(b"the old snapshot")
    _fill(small_disk, 16 << 10)
    r = runner.invoke(app, ["capture", str(target), "-o", str(snap), "-q"])
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and "No space left on device" in r.stderr, r.stderr
    assert snap.read_bytes() == b"the old snapshot"
    assert _leftovers(small_disk) == []


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_capture_interrupted_while_writing(tmp_path, target, sig, code):
    snap = tmp_path / "t.snap"
    snap.write_bytes(b"the old snapshot")
    prelude = f"""
import os, time
from ksm_analyze.formats.snapshot import SnapshotWriter
_write = SnapshotWriter.write_pages
def _interrupted(self, vaddr, data):
    os.kill(os.getpid(), {int(sig)})
    time.sleep(0.5)
    return _write(self, vaddr, data)
SnapshotWriter.write_pages = _interrupted
"""
    run = Cli("capture", target, "-o", snap, "-q", prelude=prelude)
    rc, lines, _ = run.finish()
    assert (rc, lines) == (code, [f"Error: interrupted by {sig.name}"])
    assert snap.read_bytes() == b"the old snapshot"
    assert _leftovers(tmp_path) == []

