"""``capture`` of targets that change underneath it (issue 9, item 6).

Targets (``tests/stress_targets.py``) exit, fork, exec, or map and unmap memory while being
captured, or unmap their memory exactly between capture's pagemap and mem reads; one is not
ours to trace; one lives in another PID namespace; one is a zombie. Each capture must end
in a snapshot that reads back with the stable region's exact bytes, or in one error line
naming the process, exit 1, and no file; never a hang (every capture runs in a forked child
with a deadline), and never a change to the target's stable memory.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import stress_targets
from conftest import PS, runner
from stress_targets import Target

from ksm_analyze.cli import app
from ksm_analyze.formats import open_inputs
from ksm_analyze.formats.snapshot import RunFlags
from ksm_analyze.live import capture as capture_module
from ksm_analyze.live.procfs import KPF_ZERO_PAGE, PM_PFN_MASK, PM_PRESENT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (targets of other users)")

DEADLINE = 60.0
"""Seconds any one capture may take before the test fails (they take well under one)."""
GONE = (  # the one-line reasons for a process that exits or execs under capture
    "exited during capture; nothing was written",
    "ran a new program (exec) during capture; nothing was written",
    "no such process (it does not exist or has exited)",
    "has exited (a zombie): no memory to capture",
)


class _Child:
    """``fn()`` in a forked child (as ``uid`` if given): its result or error, or a failure
    after ``DEADLINE`` seconds, so a hang fails the test instead of blocking CI."""

    def __init__(self, fn: Callable[[], Any], uid: int | None = None) -> None:
        rfd, wfd = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child, which must never return
            try:
                os.close(rfd)
                try:
                    if uid is not None:
                        # Load what the CLI imports lazily while site-packages is readable.
                        runner.invoke(app, ["capture", "--help"])
                        os.setgroups([])
                        os.setgid(uid)
                        os.setuid(uid)
                    result: Any = ("ok", fn())
                except BaseException as e:  # noqa: BLE001 - everything goes to the parent
                    result = ("error", e)
                with os.fdopen(wfd, "wb") as w:
                    pickle.dump(result, w)
            finally:
                os._exit(0)
        os.close(wfd)
        self.rfd = rfd

    def done(self) -> bool:
        return bool(select.select([self.rfd], [], [], 0)[0])

    def result(self) -> Any:
        try:
            with os.fdopen(self.rfd, "rb") as r:
                if not select.select([r], [], [], DEADLINE)[0]:
                    os.kill(self.pid, signal.SIGKILL)
                    raise AssertionError(f"capture still running after {DEADLINE} s")
                kind, value = pickle.load(r)
        finally:
            os.waitpid(self.pid, 0)
        if kind == "error":
            raise value
        return value


def _cli(pids: list[int], out: Path) -> tuple[int, str, str]:
    """``ksm-analyze capture --quiet PIDS -o OUT``: exit code, stdout, stderr."""
    r = runner.invoke(app, ["capture", "--quiet", *map(str, pids), "-o", str(out)])
    return r.exit_code, r.stdout, r.stderr


def _expected(tag: int, npages: int) -> np.ndarray:
    """The stable region's words: page k holds ``tag << 32 | k``."""
    words = (np.uint64(tag) << np.uint64(32)) | np.arange(npages, dtype=np.uint64)
    return np.repeat(words[:, None], PS // 8, axis=1)


def _pages(reader: Any, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Stored pages of ``reader`` in [lo, hi): their addresses and bytes (reads every batch,
    so a snapshot whose segments do not match its runs fails here)."""
    addrs, pages = [], []
    for b in reader.iter_batches():
        keep = (b.addrs >= lo) & (b.addrs < hi)
        addrs.append(b.addrs[keep])
        pages.append(b.pages[keep])
    return (np.concatenate(addrs) if addrs else np.zeros(0, np.uint64),
            np.concatenate(pages) if pages else np.zeros((0, PS), np.uint8))


def _check_snapshot(out: Path, stable: dict[int, tuple[int, int, int]], *,
                    exact: bool = True, churn: dict[int, int] | None = None) -> None:
    """The snapshot at ``out`` reads back; per process (pid -> stable address, pages, tag)
    the stable region is stored whole with its bytes (``exact``), or at least holds only
    its own words or zeros (an exec target's region may be half filled); a churn range
    (pid -> address) holds only 0x00 and 0xC5 bytes."""
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left
    assert out.stat().st_mode & 0o777 == 0o600
    readers = open_inputs(out)
    assert sorted(r.process["pid"] for r in readers) == sorted(stable)
    for r in readers:
        with r:
            pid = r.process["pid"]
            addr, npages, tag = stable[pid]
            got, pages = _pages(r, addr, addr + npages * PS)
            want = _expected(tag, npages)
            words = pages.view("<u8")
            idx = ((got - np.uint64(addr)) // np.uint64(PS)).astype(np.int64)
            if exact:
                assert len(got) == npages
                assert np.array_equal(words, want[idx])
            else:
                assert np.all((words == want[idx]) | (words == 0))
            if churn and pid in churn:
                _, cpages = _pages(r, churn[pid], churn[pid] + stress_targets.CHURN_PAGES * PS)
                assert np.isin(cpages, [0, stress_targets.CHURN_BYTE]).all()


def _outcome(result: tuple[int, str, str], pids: list[int], out: Path) -> str:
    """'ok', or the error reason after checking it is one line naming a captured PID, exit 1,
    with nothing written."""
    code, stdout, stderr = result
    if code == 0:
        return "ok"
    assert code == 1 and stdout == "", result
    assert stderr.endswith("\n") and stderr.count("\n") == 1, stderr
    prefix, _, reason = stderr.rstrip("\n").partition(": ")
    head, _, pid = reason.partition(": ")[0].partition(" ")
    assert prefix == "Error" and head == "process" and int(pid) in pids, stderr
    assert list(out.parent.iterdir()) == []
    return reason.partition(": ")[2]


def _stable_bits(pid: int, addr: int, npages: int) -> bytes:
    """pagemap present/swapped bits of the stable region: all present, and must not move."""
    with open(f"/proc/{pid}/pagemap", "rb") as pm:
        pm.seek(addr // PS * 8)
        entries = np.frombuffer(pm.read(npages * 8), "<u8")
    assert (entries & np.uint64(PM_PRESENT)).all()
    return (entries >> np.uint64(62)).astype(np.uint8).tobytes()


@pytest.fixture
def out_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "out"
    d.mkdir()
    d.chmod(0o777)  # writable by nobody too
    yield d


def test_target_exiting_at_any_moment_gives_a_snapshot_or_one_line(out_dir: Path) -> None:
    reasons = []
    for delay in (0, 0, 0.002, 0.01, 0.03, 0.1, 0.3):
        out = out_dir / "x.snap"
        with Target("hold", pages=16384) as t:
            job = _Child(lambda t=t, out=out: _cli([t.pid], out))
            _when_writing(out_dir, job)  # exit once capture has started writing
            time.sleep(delay)
            t.send("exit")
            reason = _outcome(job.result(), [t.pid], out)
            if reason == "ok":
                _check_snapshot(out, {t.pid: (t.stable, t.pages, t.tag)})
                out.unlink()
            else:
                assert reason in GONE
            reasons.append(reason)
    assert GONE[0] in reasons  # the exits really landed during capture


def test_forking_target_and_its_short_lived_children(out_dir: Path) -> None:
    with Target("fork", pages=2048, tag=2) as t:
        before = _stable_bits(t.pid, t.stable, t.pages)
        region = (t.stable, t.pages, t.tag)
        results = []
        for _ in range(4):
            out = out_dir / "x.snap"
            assert _outcome(_Child(lambda out=out: _cli([t.pid], out)).result(), [t.pid],
                            out) == "ok"
            _check_snapshot(out, {t.pid: region})
            out.unlink()
            # The parent and one of its children (which share the stable pages).
            children = Path(f"/proc/{t.pid}/task/{t.pid}/children").read_text().split()
            if not children:
                continue
            child = int(children[-1])  # the youngest
            reason = _outcome(_Child(lambda c=child, o=out: _cli([t.pid, c], o)).result(),
                              [t.pid, child], out)
            results.append(reason)
            if reason == "ok":
                _check_snapshot(out, {t.pid: region, child: region})
                out.unlink()
            else:
                assert reason in GONE
        assert results
        assert _stable_bits(t.pid, t.stable, t.pages) == before


def _when_writing(out_dir: Path, job: _Child) -> None:
    """Until capture has started writing (its temporary file appears) or has ended."""
    while not any(out_dir.iterdir()) and not job.done():
        time.sleep(0.0005)


def test_execing_target_never_mixes_two_programs(out_dir: Path) -> None:
    reasons: dict[str, list[str]] = {"before": [], "during": [], "after": []}
    with Target("exec", pages=4096, tag=100) as t:
        for when in ("before", "during", "after") * 3:
            out = out_dir / "x.snap"
            known = {t.pid: (t.stable, t.pages, t.tag)}
            if when == "before":
                t.send("go 0")  # exec now: capture catches the old or the new program
            job = _Child(lambda out=out: _cli([t.pid], out))
            if when == "during":
                _when_writing(out_dir, job)
                t.send("go 0")
            reason = _outcome(job.result(), [t.pid], out)
            if when == "after":
                t.send("go 0")
            reasons[when].append(reason)
            if reason == "ok":
                (r,) = open_inputs(out)
                tag = int(r.process["cmdline"][-1])
                r.close()
                # The program it caught is in the snapshot's command line. The known one
                # (ready, waiting) holds its whole stable region; a next one caught starting
                # may hold part of its own, so just read the snapshot back.
                _check_snapshot(out, known if tag == t.tag else {t.pid: (0, 0, tag)},
                                exact=tag == t.tag)
                out.unlink()
            else:
                assert reason == GONE[1]
            t.ready()  # the next program
    assert reasons["after"] == ["ok"] * 3
    assert GONE[1] in reasons["during"]  # an exec really landed during capture


def test_mapping_and_unmapping_target(out_dir: Path) -> None:
    with Target("churn", pages=2048, tag=3) as t:
        before = _stable_bits(t.pid, t.stable, t.pages)
        for _ in range(5):
            out = out_dir / "x.snap"
            assert _outcome(_Child(lambda out=out: _cli([t.pid], out)).result(), [t.pid],
                            out) == "ok"
            _check_snapshot(out, {t.pid: (t.stable, t.pages, t.tag)}, churn={t.pid: t.extra})
            out.unlink()
        assert _stable_bits(t.pid, t.stable, t.pages) == before


def _victim_runs(out: Path, lo: int) -> dict[int, int]:
    """Pages of the victim range by run flags."""
    (r,) = open_inputs(out)
    with r:
        counts: dict[int, int] = {}
        for vaddr, npages, flags in r.run_flags.tolist():
            if lo <= vaddr < lo + stress_targets.VICTIM_PAGES * PS:
                counts[flags] = counts.get(flags, 0) + npages
    return counts


def _assert_unreadable(counts: dict[int, int]) -> None:
    """Every victim page recorded present but unreadable, none stored."""
    assert sum(counts.values()) == stress_targets.VICTIM_PAGES
    want = RunFlags.PRESENT | RunFlags.UNREADABLE
    assert all(f & (want | RunFlags.STORED) == want for f in counts), counts


def _between_pagemap_and_mem(monkeypatch: pytest.MonkeyPatch, t: Target, command: str) -> None:
    """Make the target run ``command`` on its victim right after capture read the victim's
    pagemap and before it reads its bytes: the window a running target leaves open."""
    real = capture_module._store
    done: list[bool] = []

    def store(start: int, copier: Any, flags: np.ndarray, *args: Any) -> None:
        if not done and start <= t.extra < start + len(flags) * PS:
            done.append(True)
            t.send(command)
            assert t.line() == "ok"
        real(start, copier, flags, *args)

    monkeypatch.setattr(capture_module, "_store", store)


def test_vma_unmapped_before_its_bytes_are_read(out_dir, monkeypatch) -> None:
    with Target("hold", pages=1024, tag=4) as t:
        before = _stable_bits(t.pid, t.stable, t.pages)
        _between_pagemap_and_mem(monkeypatch, t, "unmap")
        out = out_dir / "x.snap"
        assert _outcome(_Child(lambda: _cli([t.pid], out)).result(), [t.pid], out) == "ok"
        _check_snapshot(out, {t.pid: (t.stable, t.pages, t.tag)})
        # Present when pagemap was read, gone when read: recorded present but unreadable.
        _assert_unreadable(_victim_runs(out, t.extra))
        # Nothing faulted in: nothing is mapped there now, and the rest did not move.
        maps = Path(f"/proc/{t.pid}/maps").read_text().splitlines()
        spans = [[int(x, 16) for x in ln.split()[0].split("-")] for ln in maps]
        assert not any(lo <= t.extra < hi for lo, hi in spans)
        assert _stable_bits(t.pid, t.stable, t.pages) == before


@pytest.mark.parametrize("facts", ["kpageflags", "pagemap_scan"])
def test_vma_replaced_before_its_bytes_are_read(out_dir, monkeypatch, facts) -> None:
    if facts == "pagemap_scan":
        monkeypatch.setattr(capture_module.KPageFlags, "available", property(lambda s: False))
    with Target("hold", pages=1024, tag=5) as t:
        before = _stable_bits(t.pid, t.stable, t.pages)
        _between_pagemap_and_mem(monkeypatch, t, "remap")
        out = out_dir / "x.snap"
        assert _outcome(_Child(lambda: _cli([t.pid], out)).result(), [t.pid], out) == "ok"
        _check_snapshot(out, {t.pid: (t.stable, t.pages, t.tag)})
        # The read of the fresh mapping maps the zero page (the one window): capture sees it
        # and keeps the bytes out, recording the pages as present but unreadable.
        _assert_unreadable(_victim_runs(out, t.extra))
        # All the read can have left there is the shared zero page: no memory allocated.
        with open(f"/proc/{t.pid}/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kpf:
            pm.seek(t.extra // PS * 8)
            for e in np.frombuffer(pm.read(stress_targets.VICTIM_PAGES * 8), "<u8").tolist():
                if e & PM_PRESENT:
                    kpf.seek((e & PM_PFN_MASK) * 8)
                    assert int.from_bytes(kpf.read(8), "little") & KPF_ZERO_PAGE
        assert _stable_bits(t.pid, t.stable, t.pages) == before


def test_target_the_user_may_not_trace(out_dir: Path) -> None:
    nobody = 65534
    with Target("hold", pages=256, tag=6) as t:  # root's process
        out = out_dir / "x.snap"
        result = _Child(lambda: _cli([t.pid], out), uid=nobody).result()
        assert _outcome(result, [t.pid], out) == (
            f"permission denied reading /proc/{t.pid}/pagemap: ptrace access rules apply; "
            "capture as root or as the process's user (see /proc/sys/kernel/yama/ptrace_scope)"
        )
    # nobody's own process, made undumpable (as setuid programs and ssh-agent are).
    with Target("hold", "--undumpable", pages=256, tag=6, prefix=(
            "setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups")) as t:
        result = _Child(lambda: _cli([t.pid], out), uid=nobody).result()
        assert _outcome(result, [t.pid], out).startswith("permission denied reading ")


def test_target_in_another_pid_namespace_is_captured_by_its_host_pid(out_dir: Path) -> None:
    prefix = ("unshare", "--pid", "--fork", "--mount-proc", "--kill-child")
    with Target("hold", pages=2048, tag=7, prefix=prefix) as t:
        (host,) = map(int, Path(f"/proc/{t.proc.pid}/task/{t.proc.pid}/children").read_text()
                      .split())
        nspid = Path(f"/proc/{host}/status").read_text().split("NSpid:")[1].split("\n")[0]
        assert nspid.split() == [str(host), str(t.pid)]  # host PID, then the namespace's
        before = _stable_bits(host, t.stable, t.pages)
        out = out_dir / "x.snap"
        assert _outcome(_Child(lambda: _cli([host], out)).result(), [host], out) == "ok"
        _check_snapshot(out, {host: (t.stable, t.pages, t.tag)})
        assert _stable_bits(host, t.stable, t.pages) == before


def _task_flags(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[6])
    except OSError:  # gone meanwhile
        return 0


def test_a_zombie_and_a_kernel_thread_are_one_line_each(out_dir: Path) -> None:
    zombie = os.fork()
    if zombie == 0:  # pragma: no cover - the child exits at once and stays unreaped
        os._exit(0)
    try:
        while Path(f"/proc/{zombie}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.001)
        out = out_dir / "x.snap"
        assert _outcome(_Child(lambda: _cli([zombie], out)).result(), [zombie], out) == (
            "has exited (a zombie): no memory to capture")
    finally:
        os.waitpid(zombie, 0)
    k = next((pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
              if _task_flags(pid) & 0x00200000), None)  # PF_KTHREAD
    if k is not None:  # none are visible in some containers
        assert _outcome(_Child(lambda: _cli([k], out)).result(), [k], out) == (
            "is a kernel thread: it has no user memory to capture")
