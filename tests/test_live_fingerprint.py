"""``fingerprint PID...``: live processes fingerprinted in place, equal to their ``capture``.

Expected hashes come from the snapshot's page bytes hashed here with the ``xxhash`` library
(not through ksm-analyze's hashing code), and from ``fingerprint`` of the snapshot file (the
dump path of stage 1); expected facts from ``/proc`` and ``/sys`` read here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash
from conftest import PS, runner
from test_capture import _present_map, _wait_gone, kill_midway

import workload
from ksm_analyze.cli import app
from ksm_analyze.fleet import fingerprint_files
from ksm_analyze.formats import open_inputs
from ksm_analyze.live import procfs
from ksm_analyze.live.capture import capture
from ksm_analyze.live.fingerprint import Schedule, fingerprint_processes, parse_duration
from ksm_analyze.options import ScanOptions

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (kpageflags)")
PREFIX = ScanOptions().hashed_bytes(PS)


def _rows(fp: Any) -> dict[int, tuple[int, int, int]]:
    """addr -> (prefix, content_lo, content_hi) of one input of a fingerprint file."""
    assert fp.content is not None
    return {int(a): (int(p), int(c[0]), int(c[1]))
            for a, p, c in zip(fp.addrs, fp.prefix, fp.content, strict=True)}


def _expected_rows(snapshot: Path) -> dict[int, tuple[int, int, int]]:
    """The same, hashed here from the snapshot's stored page bytes."""
    out = {}
    (reader,) = open_inputs(snapshot)
    with reader:
        for batch in reader.iter_batches():
            for a, page in zip(batch.addrs.tolist(), batch.pages, strict=True):
                raw = page.tobytes()
                if not any(raw):
                    out[a] = (0, 0, 0)
                    continue
                prefix = xxhash.xxh3_64_intdigest(raw[:PREFIX]) or 1
                c = xxhash.xxh3_128_intdigest(raw)
                out[a] = (prefix, c & (2**64 - 1), c >> 64)
    return out


def _shape(fp: Any) -> list[tuple[int, int, int, str, int]]:
    """Extents without file offsets (a snapshot's say where its bytes are; a live one has none)."""
    return [(e.addr, e.npages, int(e.state), e.label, int(e.flags)) for e in fp.extents]


def _fingerprint(pid: int, out: Path, *more: str) -> list[Path]:
    r = runner.invoke(app, ["fingerprint", str(pid), "-o", str(out), "-q", *more])
    assert r.exit_code == 0, r.output + r.stderr
    return sorted(out.glob("*.ksmfp.parquet"))


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """One workload with THP, SIGSTOPped: fingerprinted live, captured and the capture
    fingerprinted, all while stopped; its pagemap and Rss around the live fingerprint."""
    base = tmp_path_factory.mktemp("live")
    with workload.running(7, thp=True) as pid:
        os.kill(pid, signal.SIGSTOP)
        try:
            before = _present_map(pid)
            (live,) = _fingerprint(pid, base / "live")
            after = _present_map(pid)
            capture([pid], base / "wl.snap")
            (dump,) = _fingerprint_dump(base / "wl.snap", base / "dump")
        finally:
            os.kill(pid, signal.SIGCONT)
    return {"pid": pid, "live": live, "dump": dump, "snap": base / "wl.snap",
            "before": before, "after": after}


def _fingerprint_dump(path: Path, out: Path) -> list[Path]:
    r = runner.invoke(app, ["fingerprint", str(path), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output + r.stderr
    return sorted(out.glob("*.ksmfp.parquet"))


@root_only
def test_live_fingerprint_equals_the_capture_of_the_stopped_process(stopped):
    (live,) = fingerprint_files.load(stopped["live"])
    (dump,) = fingerprint_files.load(stopped["dump"])
    expected = _expected_rows(stopped["snap"])
    assert len(live.addrs) == len(expected) > 2000
    assert _rows(live) == expected  # row for row, by address: prefix and content
    assert _rows(dump) == expected
    assert np.array_equal(np.sort(live.addrs), np.sort(dump.addrs))
    assert _shape(live) == _shape(dump)  # page states, and the eligibility flags per run
    assert live.state_pages == dump.state_pages
    for key in ("present_pages", "stored_pages", "zero_pfn_pages", "thp_pages", "ksm_pages",
                "swapped_pages", "unreadable_pages", "file_pages", "vmas", "pfn_flags"):
        assert live.info[key] == dump.info[key], key
    assert live.info["thp_pages"] >= 512
    assert live.info["ksm_stat_at_capture"] == dump.info["ksm_stat_at_capture"]


@root_only
def test_live_fingerprint_leaves_pagemap_and_rss_as_they_were(stopped):
    assert stopped["before"] == stopped["after"]  # present bits of every mapping, and Rss


@root_only
def test_live_fingerprint_of_a_running_process(tmp_path):
    """Not stopped: it keeps running (its pagemap and Rss unmoved), and its memory, which it
    does not change, fingerprints as a capture of it does."""
    with workload.running(5) as pid:
        before = _present_map(pid)
        (live,) = _fingerprint(pid, tmp_path / "live")
        after = _present_map(pid)
        capture([pid], tmp_path / "wl.snap")
        assert Path(f"/proc/{pid}/stat").read_text().split()[2] in "RS"
    assert before == after
    (fp,) = fingerprint_files.load(live)
    expected = _expected_rows(tmp_path / "wl.snap")
    lo, hi = _mergeable_range(tmp_path / "wl.snap")
    # The workload's own region cannot change; the interpreter's heap may, a little.
    mine = {a: v for a, v in _rows(fp).items() if lo <= a < hi}
    assert mine == {a: v for a, v in expected.items() if lo <= a < hi}
    assert len(mine) == workload.LAYOUT["zero_read"][0]


def _mergeable_range(snapshot: Path) -> tuple[int, int]:
    (reader,) = open_inputs(snapshot)
    with reader:
        for v in reader.process["vmas"]:
            if "mg" in v["vmflags"].split() and v["end"] - v["start"] == \
                    workload.MERGEABLE_PAGES * PS:
                return v["start"], v["end"]
    raise AssertionError("no mergeable VMA")


@root_only
def test_live_input_records_identity_sample_and_machine_facts(stopped):
    (fp,) = fingerprint_files.load(stopped["live"])
    info, pid = fp.info, stopped["pid"]
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert info["identity"].split(":")[:2] == [boot_id, str(pid)]
    assert info["sample"] == 0
    assert isinstance(info["sampled_at"], float)
    assert 0 < info["sample_seconds"] < 60
    assert time.time() - 3600 < info["sampled_at"] <= time.time()
    machine = info["machine"]
    assert machine["kernel"] == os.uname().release == info["kernel"]
    assert machine["boot_id"] == boot_id
    ksm_dir = Path("/sys/kernel/mm/ksm")
    if ksm_dir.is_dir():
        assert set(machine["ksm"]) == {f.name for f in ksm_dir.iterdir()
                                       if os.access(f, os.R_OK)}
        assert machine["ksm"]["pages_to_scan"] == int((ksm_dir / "pages_to_scan").read_text())
    slab = Path("/sys/kernel/slab/ksm_rmap_item/object_size")
    if slab.exists():
        assert machine["rmap_item_bytes"] == int(slab.read_text())
    stat = Path("/proc/self/ksm_stat")
    if stat.exists() and "ksm_merge_any" in stat.read_text():
        assert set(info["ksm_stat_at_capture"]) >= {"ksm_merge_any", "ksm_mergeable"}
        assert info["ksm_stat_at_capture"]["ksm_mergeable"] is True  # MADV_MERGEABLE regions
    assert "cmdline" not in info  # a secret unless --keep-cmdline
    assert fingerprint_files.metadata(stopped["live"])["source"]["path"] == \
        f"live:{info['identity']}"


def test_identity_start_time_is_stat_field_22(tmp_path):
    with _sleeper() as child:
        (path,) = _fingerprint(child.pid, tmp_path)
        # field 22 of /proc/PID/stat, the 20th after "(comm)"
        start_time = int(Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        comm = Path(f"/proc/{child.pid}/comm").read_text().strip()  # python, python3...
    (fp,) = fingerprint_files.load(path)
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert fp.info["identity"] == f"{boot_id}:{child.pid}:{start_time}"
    assert path.name == f"{comm}-{child.pid}.ksmfp.parquet"


@contextlib.contextmanager
def _sleeper(name: str | None = None) -> Iterator[subprocess.Popen[str]]:
    """A child that sleeps (with its comm set to ``name``) once it is ready; killed after."""
    code = "import sys, time\n"
    if name:  # prctl(PR_SET_NAME)
        code += f"import ctypes; ctypes.CDLL(None).prctl(15, {name.encode()!r}, 0, 0, 0)\n"
    code += "print('ready', flush=True)\ntime.sleep(600)\n"
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                          text=True) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
            yield child
        finally:
            child.kill()


def test_rmap_item_bytes_from_sysfs_else_slabinfo_else_unknown(tmp_path, monkeypatch):
    sysfs, slabinfo = tmp_path / "object_size", tmp_path / "slabinfo"
    monkeypatch.setattr(procfs, "SLAB_OBJECT_SIZE", sysfs)
    monkeypatch.setattr(procfs, "SLABINFO", slabinfo)
    assert procfs.rmap_item_bytes() is None  # neither: not assumed
    slabinfo.write_text("slabinfo - version: 2.1\n# name <active_objs> <num_objs> <objsize> ...\n"
                        "ksm_stable_node 0 0 48 85 1 : tunables 0 0 0\n"
                        "ksm_rmap_item 10 20 72 56 1 : tunables 0 0 0\n")
    assert procfs.rmap_item_bytes() == 72
    sysfs.write_text("64\n")
    assert procfs.rmap_item_bytes() == 64


def test_ksm_stat_yes_no_fields_are_booleans(monkeypatch, tmp_path):
    fake = tmp_path / "ksm_stat"
    fake.write_text("ksm_rmap_items 3\nksm_merge_any: no\nksm_mergeable: yes\n")
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: real(
        fake if str(self) == "/proc/42/ksm_stat" else self, *a, **k))
    assert procfs.ksm_stat(42) == {"ksm_rmap_items": 3, "ksm_merge_any": False,
                                   "ksm_mergeable": True}


def test_series_writes_each_sample_with_its_index_and_time(tmp_path):
    with _sleeper() as child:
        comm = Path(f"/proc/{child.pid}/comm").read_text().strip()  # python, python3...
        started = time.time()
        paths = _fingerprint(child.pid, tmp_path, "--every", "0.2s", "--count", "3")
    assert [p.name for p in paths] == [f"{comm}-{child.pid}.s{k:03d}.ksmfp.parquet"
                                       for k in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]  # no spill
    infos = [fingerprint_files.load(p)[0].info for p in paths]
    assert [i["sample"] for i in infos] == [0, 1, 2]
    at = [i["sampled_at"] for i in infos]
    assert started <= at[0] < at[1] < at[2]
    assert at[2] - at[0] >= 0.4 - 0.05  # one every 0.2 s
    assert len({i["identity"] for i in infos}) == 1
    assert all(os.stat(p).st_mode & 0o777 == 0o600 for p in paths)


def test_durations_and_schedules():
    assert [parse_duration(t, "--every") for t in ("500ms", "2s", "1m", "1h", "0.2s")] == \
        [0.5, 2.0, 60.0, 3600.0, 0.2]
    assert Schedule.of("1s", 3, None) == Schedule(1.0, 3)
    assert Schedule.of("500ms", None, "10s") == Schedule(0.5, 20)
    assert Schedule.of(None, None, None) == Schedule(0.0, 1)


@pytest.mark.parametrize(("args", "message"), [
    (["--every", "5x", "--count", "2"], "--every '5x' is not a duration"),
    (["--every", "1s"], "--every takes --count N or --for DURATION"),
    (["--count", "3"], "--count and --for go with --every"),
    (["--every", "1s", "--count", "2", "--for", "3s"], "--every takes --count N or --for"),
])
def test_bad_series_options_are_one_usage_line(tmp_path, args, message):
    r = runner.invoke(app, ["fingerprint", str(os.getpid()), "-o", str(tmp_path / "o"), *args])
    assert r.exit_code == 2
    assert r.stderr.startswith(f"Error: {message}") and r.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def _fails(pid: int, tmp_path: Path) -> str:
    out = tmp_path / "out"
    r = runner.invoke(app, ["fingerprint", str(pid), "-o", str(out), "-q"])
    assert r.exit_code == 1, r.output
    assert r.stderr.count("\n") == 1 and r.stdout == ""
    assert not out.exists()  # no file, and no folder it made
    return r.stderr


def test_bad_pid_kernel_thread_and_zombie_are_one_line(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert _fails(gone.pid, tmp_path) == (
        f"Error: process {gone.pid}: no such process (it does not exist or has exited)\n")
    assert _fails(2, tmp_path) == (  # kthreadd
        "Error: process 2: is a kernel thread: it has no user memory to capture\n")
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    _wait_gone(zombie.pid)  # exited, not reaped
    try:
        assert "has exited (a zombie)" in _fails(zombie.pid, tmp_path)
    finally:
        zombie.wait()


@root_only
def test_process_exiting_during_the_sample_is_one_line_and_leaves_nothing(tmp_path,
                                                                          monkeypatch):
    with workload.running(3) as pid:
        kill_midway(monkeypatch, pid)
        assert _fails(pid, tmp_path) == (
            f"Error: process {pid}: exited during capture; nothing was written\n")


def test_a_target_that_exits_mid_series_stops_its_series_only(tmp_path):
    with _sleeper() as a, _sleeper() as b:
        warnings: list[str] = []

        def after(sample: Any) -> None:
            if sample.pid == a.pid and sample.sample == 0:
                a.kill()
                _wait_gone(a.pid)

        done = fingerprint_processes([a.pid, b.pid], tmp_path, ScanOptions(),
                                     Schedule(0.05, 3), written=after, warn=warnings.append)
    assert [(s.pid, s.sample) for s in done] == [(a.pid, 0), (b.pid, 0), (b.pid, 1),
                                                 (b.pid, 2)]
    assert len(warnings) == 1 and warnings[0].startswith(f"process {a.pid}: has exited")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(s.path.name for s in done)


def test_qemu_takes_every_qemu_process(tmp_path):
    if procfs.qemu_pids():
        pytest.skip("a QEMU process is running here: the count below would not be ours")
    with _sleeper("qemu-system-fake") as fake, _sleeper() as other:
        assert procfs.qemu_pids() == [fake.pid]
        r = runner.invoke(app, ["fingerprint", "--qemu", "-o", str(tmp_path), "-q"])
        assert r.exit_code == 0, r.output + r.stderr
        assert r.stdout == f"Wrote {tmp_path}/qemu-system-fak-{fake.pid}.ksmfp.parquet\n"
        assert other.pid != fake.pid


def test_qemu_with_none_running_is_one_line(tmp_path):
    if procfs.qemu_pids():
        pytest.skip("a QEMU process is running here")
    r = runner.invoke(app, ["fingerprint", "--qemu", "-o", str(tmp_path / "o")])
    assert r.exit_code == 1
    assert r.stderr == "Error: --qemu: no QEMU process (qemu-system-*) is running\n"
    assert not (tmp_path / "o").exists()


def test_dumps_and_pids_together_are_refused(tmp_path):
    dump = tmp_path / "d.raw"
    dump.write_bytes(bytes(PS))
    r = runner.invoke(app, ["fingerprint", str(dump), str(os.getpid()), "-o",
                            str(tmp_path / "o")])
    assert r.exit_code == 2
    assert r.stderr == "Error: give dump files or processes (PIDs, --qemu), not both\n"


@root_only
@pytest.mark.qemu
def test_live_fingerprint_of_a_real_qemu_guest(tmp_path):
    """A real guest: --qemu finds it, it fingerprints while it runs; paused, fingerprinting
    moves nothing of it and its guest RAM fingerprints as the capture of it does."""
    qemu_guest = pytest.importorskip("qemu_guest")
    if not qemu_guest.qemu_available():
        pytest.skip("qemu-system-x86_64 is not installed")
    try:
        assets = qemu_guest.ensure_guest_assets()
    except qemu_guest.GuestError as e:
        pytest.skip(f"no guest kernel: {e}")
    with qemu_guest.Guest(assets, mem_mib=128, cmdline_extra="ksmfill=7:8:4") as guest:
        assert guest.pid in procfs.qemu_pids()
        _fingerprint(guest.pid, tmp_path / "running")  # while it runs (and changes)
        guest.pause()
        before = _present_map(guest.pid)
        (live,) = _fingerprint(guest.pid, tmp_path / "paused")
        after = _present_map(guest.pid)
        capture([guest.pid], tmp_path / "guest.snap")
    assert before == after  # present bits of every mapping, and Rss
    (fp,) = fingerprint_files.load(live)
    (reader,) = open_inputs(tmp_path / "guest.snap")
    with reader:
        ram = [(v["start"], v["end"]) for v in reader.process["vmas"]
               if v["end"] - v["start"] >= 128 << 20]
    assert ram
    expected = _expected_rows(tmp_path / "guest.snap")

    def in_ram(rows: dict[int, Any]) -> dict[int, Any]:
        return {a: v for a, v in rows.items() if any(lo <= a < hi for lo, hi in ram)}

    assert in_ram(_rows(fp)) == in_ram(expected)
    assert len(in_ram(expected)) > 8 * 256  # the fill at least
