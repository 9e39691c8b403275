"""``capture`` on real processes: what it records, that it changes nothing, and its errors.

The workload (``tests/workload.py``) fills memory with a known mix; expected page counts come
from its layout, and expected bytes from its own pattern generator, not from ksm-analyze.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import PS, runner

import workload
from ksm_analyze import analyze
from ksm_analyze.cli import app
from ksm_analyze.formats import DumpFormat, open_inputs
from ksm_analyze.live import capture as capture_module
from ksm_analyze.live.capture import capture
from ksm_analyze.live.procfs import ProcessError
from ksm_analyze.pages import PageState

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (kpageflags, setuid)")


def _vma(reader: Any, vmflags: str, npages: int) -> tuple[int, int]:
    """[start, end) of the workload VMA with these flags and this size."""
    for v in reader.process["vmas"]:
        if set(vmflags.split()) <= set(v["vmflags"].split()) and \
                v["end"] - v["start"] == npages * PS:
            return v["start"], v["end"]
    raise AssertionError(f"no {npages}-page VMA with {vmflags}")


def _pages_in(reader: Any, lo: int, hi: int) -> dict[int, bytes]:
    out = {}
    for b in reader.iter_batches():
        for a, page in zip(b.addrs.tolist(), b.pages, strict=True):
            if lo <= a < hi:
                out[a] = page.tobytes()
    return out


def _present_map(pid: int) -> tuple[bytes, str]:
    """Every VMA's pagemap present/swapped bits and the resident totals (Shared_* move when
    other processes map the same files, so they are left out)."""
    bits = []
    with open(f"/proc/{pid}/pagemap", "rb") as pm:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo >= 1 << 63:
                continue
            pm.seek(lo // PS * 8)
            entries = np.frombuffer(pm.read((hi - lo) // PS * 8), "<u8")
            bits.append((entries >> np.uint64(62)).astype(np.uint8).tobytes())
    rollup = [ln for ln in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
              if ln.split(":")[0] in ("Rss", "Anonymous", "AnonHugePages", "Swap")]
    return b"".join(bits), "\n".join(rollup)


@pytest.fixture(scope="module")
def snap(tmp_path_factory):
    """One workload with THP, captured (as root: kpageflags)."""
    path = tmp_path_factory.mktemp("capture") / "wl.snap"
    with workload.running(7, thp=True) as pid:
        before = _present_map(pid)
        summary = capture([pid], path)
        after = _present_map(pid)
    return {"path": path, "pid": pid, "summary": summary, "before": before, "after": after}


@root_only
def test_capture_stores_present_pages_and_describes_the_rest(snap):
    path, pid = snap["path"], snap["pid"]
    assert snap["summary"].pfn_flags == "kpageflags"
    readers = open_inputs(path)
    assert len(readers) == 1
    with readers[0] as r:
        assert r.format is DumpFormat.SNAPSHOT
        assert r.name == f"{path}:{pid}"
        lo, hi = _vma(r, "mg", workload.MERGEABLE_PAGES)
        kinds = {}
        for e in r.extents:
            if lo <= e.addr < hi:
                kinds[e.state] = kinds.get(e.state, 0) + e.npages
        lay = workload.LAYOUT
        assert kinds == {
            PageState.DATA: lay["zero_read"][0],  # everything written
            PageState.ZERO: lay["zero_read"][1],  # read, never written: the zero page
            PageState.HOLE: lay["untouched"][1],
        }
        pages = _pages_in(r, lo, hi)
        p = workload.patterns(7)
        want = {}
        for k in range(lay["A"][1]):
            want[lo + k * PS] = p["A"].tobytes()
        first, n = lay["own"]
        for k in range(n):
            want[lo + (first + k) * PS] = p["own"][k // 64].tobytes()
        first, n = lay["random"]
        for k in range(n):
            want[lo + (first + k) * PS] = p["random"][k].tobytes()
        first, n = lay["zero_written"]
        for k in range(n):
            want[lo + (first + k) * PS] = bytes(PS)
        first, n = lay["S"]
        for k in range(n):
            want[lo + (first + k) * PS] = p["S"].tobytes()
        assert pages == want
        info = r.info()
        assert info["thp_pages"] >= 512  # the THP region really was huge-page backed
        assert info["pfn_flags"] == "kpageflags"


@root_only
def test_capture_leaves_the_target_as_it_was(snap):
    assert snap["before"] == snap["after"]


@root_only
def test_snapshot_is_private_and_no_temporary_file_remains(snap):
    path = snap["path"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@root_only
def test_snapshot_is_an_elf_core_other_tools_read(snap):
    out = subprocess.run(["readelf", "-n", "-l", str(snap["path"])], capture_output=True,
                         text=True, check=True).stdout
    assert "CORE (Core file)" in out
    assert out.count("KSM-ANALYZE") == 3
    assert "LOAD" in out


@root_only
def test_scope_counts_follow_the_workload_layout(snap):
    lay = workload.LAYOUT
    by_scope = {s: analyze(snap["path"], scope=s) for s in ("mergeable", "anon", "all")}
    mergeable = by_scope["mergeable"]
    # mg VMAs: 1418 written pages + the THP region's 1024 but its 128 zero-filled subpages
    # (KSM's split of the huge page frees them, Linux 6.12+); zero-page PTEs never count.
    written = lay["zero_read"][0]
    assert mergeable.counters.ksm_rmap_items == (
        written + workload.THP_PAGES - workload.THP_ZERO_PAGES
    )
    ex = mergeable.exclusions.iloc[0]
    assert ex["thp_zero"] == workload.THP_ZERO_PAGES
    assert ex["zero_pfn"] >= lay["zero_read"][1]
    assert ex["shared"] >= workload.SHARED_PAGES
    assert ex["not_mergeable"] >= workload.PLAIN_PAGES
    anon = by_scope["anon"]
    assert anon.exclusions.iloc[0]["not_mergeable"] == 0
    # The plain region (256 copies of A) joins: more sharing, never less.
    assert anon.counters.pages_sharing >= mergeable.counters.pages_sharing + workload.PLAIN_PAGES
    everything = by_scope["all"]
    assert everything.exclusions.iloc[0][["shared", "file_backed", "zero_pfn"]].sum() == 0
    assert everything.counters.ksm_rmap_items > anon.counters.ksm_rmap_items
    assert mergeable.options.scope.value == "mergeable"


@root_only
def test_scan_prints_scope_exclusions_and_ksm_stat(snap):
    r = runner.invoke(app, ["scan", str(snap["path"]), "--scope", "anon"])
    assert r.exit_code == 0, r.output
    assert "Excluded from KSM's scan (--scope anon; pages per rule)" in r.output
    assert "ksm_merging_pages" in r.output
    r = runner.invoke(app, ["scan", str(snap["path"]), "--scope", "some"])
    assert r.exit_code == 2
    assert "unknown scope 'some'; choose one of: mergeable, anon, all" in r.output


def test_capture_of_a_missing_process_is_one_line_and_writes_nothing(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "x.snap"
    r = runner.invoke(app, ["capture", str(gone.pid), "-o", str(out)])
    assert r.exit_code == 1
    assert r.output == (
        f"Error: process {gone.pid}: no such process (it does not exist or has exited)\n"
    )
    assert list(tmp_path.iterdir()) == []


@root_only
def test_process_exiting_during_capture_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "x.snap"
    with workload.running(3) as pid:
        kill_midway(monkeypatch, pid)
        with pytest.raises(ProcessError) as e:
            capture([pid], out)
    assert str(e.value) == f"process {pid}: exited during capture; nothing was written"
    assert list(tmp_path.iterdir()) == []


def kill_midway(monkeypatch: pytest.MonkeyPatch, pid: int) -> None:
    """Kill ``pid`` (and wait until it is dead) when the page source reaches its 5th VMA."""
    real = capture_module._capture_vma
    calls = []

    def killing(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 5:
            os.kill(pid, 9)
            _wait_gone(pid)
        return real(*args, **kwargs)

    monkeypatch.setattr(capture_module, "_capture_vma", killing)


def _wait_gone(pid: int) -> None:
    """Until /proc/PID shows the process dead (a zombie counts: its memory is gone)."""
    for _ in range(200):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.01)


def _as_nobody(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a forked child with uid/gid nobody; return its result or raise its error."""
    rfd, wfd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child, which must never return
        try:
            os.close(rfd)
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                result: Any = ("ok", fn())
            except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
                result = ("error", e)
            with os.fdopen(wfd, "wb") as w:
                pickle.dump(result, w)
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        kind, value = pickle.load(r)
    os.waitpid(child, 0)
    if kind == "error":
        raise value
    return value


@root_only
def test_capture_without_root_finds_zero_pages_and_thp_with_pagemap_scan():
    shared_dir = Path(tempfile.mkdtemp(prefix="ksm-nobody-"))
    shared_dir.chmod(0o777)
    ready_r, ready_w = os.pipe()
    target = os.fork()
    if target == 0:  # pragma: no cover - the workload, as nobody; must never return
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            # A process that changed its uid is not dumpable, so not ptrace-readable even by
            # its own user; one started by exec as that user is. PR_SET_DUMPABLE = 4.
            ctypes.CDLL(None, use_errno=True).prctl(4, 1, 0, 0, 0)
            regions = workload.build(5, thp=True)
            os.write(ready_w, b"x")
            signal.pause()
            del regions
        finally:
            os._exit(0)
    os.close(ready_w)
    try:
        if os.read(ready_r, 1) != b"x":
            raise AssertionError("the workload child died before filling its memory")
        out = shared_dir / "nobody.snap"
        summary = _as_nobody(lambda: capture([target], out))
        assert summary.pfn_flags == "pagemap_scan"
        # The read-only pages map the zero page: found without PFNs.
        assert summary.processes[0]["zero_pfn_pages"] >= workload.LAYOUT["zero_read"][1]
        result = analyze(out)
        # PAGEMAP_SCAN also tells THP without root: the zero-filled subpages are left out.
        assert result.exclusions.iloc[0]["thp_zero"] == workload.THP_ZERO_PAGES
        assert result.counters.ksm_rmap_items == (
            workload.LAYOUT["zero_read"][0] + workload.THP_PAGES - workload.THP_ZERO_PAGES
        )
        me = os.getpid()  # root's process: not nobody's to read
        with pytest.raises(ProcessError) as e:
            _as_nobody(lambda: capture([me], shared_dir / "root.snap"))
        assert str(e.value).startswith(f"process {me}: permission denied reading ")
        assert "ptrace" in str(e.value)
        assert not (shared_dir / "root.snap").exists()
    finally:
        os.kill(target, 9)
        os.waitpid(target, 0)
        for f in shared_dir.iterdir():
            f.unlink()
        shared_dir.rmdir()


@root_only
def test_without_zero_page_facts_the_capture_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(capture_module.KPageFlags, "available", property(lambda self: False))
    monkeypatch.setattr(capture_module, "pagemap_scan", lambda *a: None)
    out = tmp_path / "blind.snap"
    with workload.running(4) as pid:
        r = runner.invoke(app, ["capture", str(pid), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "could NOT be told from written zero pages" in r.output
    result = analyze(out)
    # The 100 zero-page PTEs now read as written zero pages: the upper bound counts them.
    lay = workload.LAYOUT
    assert result.counters.ksm_rmap_items == lay["zero_read"][0] + lay["zero_read"][1]


def test_capture_needs_pids_and_an_output(tmp_path):
    r = runner.invoke(app, ["capture", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2
    r = runner.invoke(app, ["capture", str(os.getpid())])
    assert r.exit_code == 2
    assert "--output" in r.output


def test_capture_of_the_same_pid_twice_is_refused(tmp_path):
    r = runner.invoke(app, ["capture", str(os.getpid()), str(os.getpid()), "-o",
                            str(tmp_path / "x")])
    assert r.exit_code == 2
    assert r.output == "Error: a process is given twice\n"


@root_only
def test_capture_reports_progress_up_to_the_stored_bytes(tmp_path):
    seen: list[tuple[int, int]] = []
    with workload.running(8) as pid:
        summary = capture([pid], tmp_path / "p.snap",
                          progress=lambda done, total: seen.append((done, total)))
    done = [d for d, _ in seen]
    assert done == sorted(done) and len(done) > 1
    assert done[-1] == summary.processes[0]["stored_pages"] * PS
    assert all(d <= t for d, t in seen)
