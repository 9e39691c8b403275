"""ksmd's CPU bill: full-scan time, the advisor's arithmetic, the grid, tuners, calibration.

Expected values are derived by hand from mm/ksm.c (see each test); the tests marked ``ksm``
check the same arithmetic against the running kernel's ksmd.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
import time

import pytest
from conftest import runner

import ksm_sysfs
from ksm_analyze.cli import app
from ksm_analyze.errors import InputError
from ksm_analyze.ksmd import cost as cost_mod
from ksm_analyze.ksmd.advisor import Advisor
from ksm_analyze.ksmd.cost import (
    CpuCost,
    cheapest,
    full_scan,
    grid,
    load_cost,
    save_cost,
    say_cheapest,
    tuner_conflicts,
)
from ksm_analyze.ksmd.knobs import Knobs
from ksm_analyze.live import calibrate as calibrate_mod

TEN_US = CpuCost(seconds_per_page=1e-5, seconds_per_skipped=1e-6, machine={"hz": 250})
"""10 us a processed page, 1 us a skipped one, HZ 250 (a 4 ms tick)."""


# --- full_scan ---------------------------------------------------------------------------

def test_full_scan_wakeups_and_tick_rounded_sleep():
    # 1000 pages at 100 a wake-up: 10 full batches, then the wake-up that finds the end of
    # the scan (scan_get_next_rmap_item() returns NULL) = 11. Sleep 20 ms = 5 ticks, the
    # timer fires on the tick after: 6 ticks = 24 ms; a 1 ms batch stays inside its tick.
    t = full_scan(1000, 0, Knobs(pages_to_scan=100, sleep_millisecs=20), TEN_US)
    assert t.wakeups == 11
    assert t.cpu_seconds == pytest.approx(0.01)
    assert t.wall_seconds == pytest.approx(11 * 0.024)
    # 8 ms = 2 ticks + 1 = 12 ms a wake-up (measured on 6.18: 11.96 ms).
    assert full_scan(1000, 0, Knobs(pages_to_scan=100, sleep_millisecs=8),
                     TEN_US).wall_seconds == pytest.approx(11 * 0.012)


def test_full_scan_exact_multiple_still_ends_with_an_empty_wakeup():
    assert full_scan(1000, 0, Knobs(pages_to_scan=250), TEN_US).wakeups == 5
    assert full_scan(999, 0, Knobs(pages_to_scan=250), TEN_US).wakeups == 4


def test_skipped_pages_cost_cpu_but_do_not_count_toward_pages_to_scan():
    t = full_scan(1000, 5000, Knobs(pages_to_scan=100, sleep_millisecs=20), TEN_US)
    assert t.wakeups == 11
    assert t.cpu_seconds == pytest.approx(1000 * 1e-5 + 5000 * 1e-6)


def test_batch_longer_than_a_tick_adds_whole_ticks():
    # 1000 pages x 10 us = 10 ms = 2.5 ticks: the sleep is armed 2 ticks later, so a cycle
    # is 2 + 6 = 8 ticks = 32 ms. 2000 pages: two such cycles and an empty last wake-up
    # (6 ticks): 22 ticks = 88 ms.
    t = full_scan(2000, 0, Knobs(pages_to_scan=1000, sleep_millisecs=20), TEN_US)
    assert t.wakeups == 3
    assert t.wall_seconds == pytest.approx(0.088)


def test_no_sleep_long_sleep_and_other_hz():
    assert full_scan(2000, 0, Knobs(pages_to_scan=1000, sleep_millisecs=0),
                     TEN_US).wall_seconds == pytest.approx(0.02)
    # 1000 ms = 250 ticks: the timer wheel's level 1 (63..503 ticks) rounds the expiry up
    # by 1..8 ticks, 4.5 on average: 254.5 ticks = 1.018 s (plus 1 tick for the 1 ms batch
    # stays 0: under a tick).
    assert full_scan(100, 0, Knobs(pages_to_scan=100, sleep_millisecs=1000),
                     TEN_US).wall_seconds == pytest.approx(2 * 1.018)
    hz1000 = CpuCost(1e-5, 0.0, machine={"hz": 1000})
    assert full_scan(50, 0, Knobs(pages_to_scan=100, sleep_millisecs=20),
                     hz1000).wall_seconds == pytest.approx(0.021)


def test_merged_pages_cost_their_own_rate():
    c = CpuCost(1e-5, 0.0, machine={"hz": 250}, seconds_per_merged=1e-6)
    t = full_scan(1000, 0, Knobs(pages_to_scan=100), c, merged=400)
    assert t.cpu_seconds == pytest.approx(600 * 1e-5 + 400 * 1e-6)
    with pytest.raises(ValueError, match="merged"):
        full_scan(10, 0, Knobs(), c, merged=11)


# --- the advisor -------------------------------------------------------------------------

def test_advisor_starts_at_min_pages_and_cuts_the_first_step_to_thirty_percent():
    adv = Advisor(Knobs())
    assert adv.pages_to_scan == 500
    # scan_time 400 s, cpu 200 s: cpu_percent 200000*100 // 400000 = 50;
    # factor 200*100 // 400 = 50; change = 400*100 // 400 = 100, EWMA with 0: 30;
    # pages = 500*100 // 50 = 1000, * 30 // 100 = 300; per 1% CPU 500 // 50 = 10:
    # cap 10*70 = 700, floor 10*10 = 100: 300 (1000 without the x0.3 quirk, capped at 700).
    assert adv.after_scan(400.0, 200.0) == 300
    assert adv.cpu_percent == 50
    # Second: change EWMA (70*30 + 30*100) // 100 = 51; pages 300*100 // 50 = 600,
    # * 51 // 100 = 306; per 1% 300 // 50 = 6: cap 420, floor 60: 306.
    assert adv.after_scan(400.0, 200.0) == 306


def test_advisor_clamps():
    # advisor_max_pages_to_scan applied last.
    assert Advisor(Knobs(advisor_max_pages_to_scan=250)).after_scan(400.0, 200.0) == 250
    # A sub-second scan counts as 1 s; 1 ms of CPU is 0% -> 1%; factor 200*100 = 20000;
    # pages 500*100 // 20000 = 2, * 30 // 100 = 0; per 1% 500: the 10% floor gives 5000.
    assert Advisor(Knobs()).after_scan(0.5, 0.001) == 5000
    # The floor can beat advisor_max_cpu's cap? No: max_cpu 5 < 10 means the floor wins.
    assert Advisor(Knobs(advisor_max_cpu=5)).after_scan(0.5, 0.001) == 5000


def test_advisor_first_advice_counts_ksmds_lifetime_cpu():
    # advisor_ctx.cpu_time starts at 0: with 1000 s of ksmd CPU before, the first scan's
    # cpu_percent is (1000+200)*1000*100 // 400000 = 300; per 1% 500 // 300 = 1: cap 70.
    assert Advisor(Knobs(), ksmd_cpu_before=1000.0).after_scan(400.0, 200.0) == 70


# --- grid and cheapest -------------------------------------------------------------------

def test_grid_and_cheapest_by_hand():
    rows = grid([(1000, 0)] * 2, TEN_US, pages_to_scan=(100, 1000), sleep_millisecs=(20,),
                advisor=False)
    slow, fast = rows
    # (100, 20): 11 wake-ups x 24 ms = 0.264 s, CPU 10 ms = 3.79%; steady: 2 scans.
    assert (slow.pages_to_scan, slow.full_scan_seconds) == (100, pytest.approx(0.264))
    assert slow.steady_state_seconds == pytest.approx(0.528)
    assert slow.cpu_percent == pytest.approx(100 * 0.01 / 0.264)
    # (1000, 20): a 10 ms batch (8 ticks) then the empty wake-up (6 ticks) = 56 ms: 17.9%.
    assert fast.full_scan_seconds == pytest.approx(0.056)
    assert fast.cpu_percent == pytest.approx(100 * 0.01 / 0.056)
    assert cheapest(rows, 1.0) == slow
    assert cheapest(rows, 0.2) == fast
    assert cheapest(rows, 0.05) is None
    assert say_cheapest(rows, 0.05).startswith("no setting tried reaches steady state")
    assert "pages_to_scan 1000, sleep_millisecs 20" in say_cheapest(rows, 0.2)


def test_grid_has_the_advisor_at_each_sleep():
    rows = grid([(1000, 0)] * 3, TEN_US, pages_to_scan=(100,), sleep_millisecs=(0, 20))
    advised = [r for r in rows if r.advisor]
    assert [r.sleep_millisecs for r in advised] == [0, 20]
    assert all(r.advised_pages_to_scan and r.steady_state_seconds > 0 for r in advised)
    # Its first scan runs at advisor_min_pages_to_scan (500): 1000 pages, sleep 20 ms ->
    # 3 wake-ups; with the 5 ms batches (1 tick) 7 + 7 + 6 ticks = 80 ms.
    first = full_scan(1000, 0, Knobs(pages_to_scan=500, sleep_millisecs=20), TEN_US)
    assert first.wall_seconds == pytest.approx(0.080)


# --- tuners ------------------------------------------------------------------------------

def test_tuner_conflicts():
    on = {"advisor_mode": "none [scan-time]"}
    off = {"advisor_mode": "[none] scan-time"}
    (line,) = tuner_conflicts(on, ["bash /usr/sbin/ksmtuned", "sshd"])
    assert "ksmtuned" in line and "EINVAL" in line
    (line,) = tuner_conflicts(on, ["virt-handler"])
    assert "KubeVirt" in line
    assert len(tuner_conflicts(on, ["ksmtuned", "virt-handler"])) == 2
    assert tuner_conflicts(off, ["ksmtuned"]) == []
    assert tuner_conflicts(on, ["sshd", "ksmtuned-helper"]) == []
    assert tuner_conflicts({}, ["ksmtuned"]) == []  # no advisor on this kernel
    assert "both running" in tuner_conflicts(off, ["ksmtuned", "virt-handler"])[0]


# --- the calibration file ----------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    c = CpuCost(4e-6, 3e-7, machine={"kernel": "6.18", "hz": 250}, seconds_per_merged=1e-6)
    path = tmp_path / "cal.json"
    save_cost(path, c)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_cost(path) == c
    assert load_cost(path).hz == 250


@pytest.mark.parametrize(("text", "says"), [
    ("{", "not JSON"),
    (('{"format": "ksm-analyze-ksmd-cpu-cost", "version": 1, "seconds_per_page": NaN, '
     '"seconds_per_skipped": 0}'), "not JSON"),
    ('{"format": "other", "version": 1}', "not a ksmd calibration"),
    ('{"format": "ksm-analyze-ksmd-cpu-cost", "version": 2}', "version 2"),
    (('{"format": "ksm-analyze-ksmd-cpu-cost", "version": 1, "seconds_per_page": -1, '
     '"seconds_per_skipped": 0}'), "seconds_per_page"),
    (('{"format": "ksm-analyze-ksmd-cpu-cost", "version": 1, "seconds_per_page": "1", '
     '"seconds_per_skipped": 0}'), "seconds_per_page"),
    (('{"format": "ksm-analyze-ksmd-cpu-cost", "version": 1, "seconds_per_page": 1, '
     '"seconds_per_skipped": 0, "machine": []}'), "machine"),
    (('{"format": "ksm-analyze-ksmd-cpu-cost", "version": 1, "seconds_per_page": 1, '
     '"seconds_per_skipped": 0, "extra": 1}'), "unknown field"),
    ("\xff\xfe", "not JSON"),
])
def test_bad_calibration_files_are_one_line(tmp_path, text, says):
    path = tmp_path / "bad.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(InputError, match=says) as e:
        load_cost(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_missing_calibration_file(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_cost(tmp_path / "none.json")


def test_calibrate_without_ksm_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate_mod, "KSM", tmp_path / "no-ksm")
    r = runner.invoke(app, ["calibrate", "-o", str(tmp_path / "c.json")])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        (f"Error: {tmp_path / 'no-ksm'}: cannot calibrate: no /sys/kernel/mm/ksm "
        "(a kernel without KSM)")]
    assert not (tmp_path / "c.json").exists()


def test_default_cost_is_strict_and_measured():
    c = cost_mod.DEFAULT_CPU_COST
    assert c.hz == 250 and c.machine["kernel"].startswith("6.18")
    json.dumps(c.machine, allow_nan=False)
    assert 1e-7 < c.seconds_per_skipped < c.seconds_per_merged < c.seconds_per_page < 1e-4


# --- against the running kernel ----------------------------------------------------------

KSM = ksm_sysfs.KSM


def _mapping(pages: int) -> mmap.mmap:
    region = mmap.mmap(-1, pages * mmap.PAGESIZE,
                       flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_MERGEABLE)
    region[:] = os.urandom(pages * mmap.PAGESIZE)
    return region


def _wait_scan(after: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while (now := ksm_sysfs.read("full_scans")) <= after:
        assert time.monotonic() < deadline, "ksmd made no full scan"
        time.sleep(0.002)
    return now


@pytest.mark.ksm
@pytest.mark.skipif(ksm_sysfs.usable() is not None, reason=str(ksm_sysfs.usable()))
def test_advisor_matches_the_kernel():
    """advisor_mode scan-time over 1000 unique pages at sleep 100 ms (26 ticks + 1 = 108 ms
    a wake-up), target 1 s: the kernel's pages_to_scan after each full scan equals
    Advisor.after_scan fed the scan's measured wall time and ksmd's CPU."""
    pid = calibrate_mod.ksmd_pid()
    assert pid is not None
    region = _mapping(1000)
    others = ksm_sysfs.other_ksm_users([os.getpid()])
    try:
        with ksm_sysfs.ksm_session(sleep_millisecs=100, smart_scan=0):
            saved_target = (KSM / "advisor_target_scan_time").read_text().strip()
            try:
                (KSM / "advisor_target_scan_time").write_text("1\n")
                cpu_before = calibrate_mod.ksmd_cpu_seconds(pid)
                (KSM / "advisor_mode").write_text("scan-time\n")
                knobs = Knobs.from_sysfs({n: (KSM / n).read_text().strip()
                                          for n in ("advisor_mode", "advisor_max_cpu",
                                                    "advisor_min_pages_to_scan",
                                                    "advisor_max_pages_to_scan",
                                                    "advisor_target_scan_time")})
                model = Advisor(knobs, ksmd_cpu_before=cpu_before)
                assert ksm_sysfs.read("pages_to_scan") == model.pages_to_scan == 500
                with pytest.raises(OSError) as e:  # EINVAL while the advisor is on
                    (KSM / "pages_to_scan").write_text("1000\n")
                assert e.value.errno == 22
                scans = ksm_sysfs.read("full_scans")
                cpu = calibrate_mod.ksmd_cpu_seconds(pid)
                (KSM / "run").write_text("1\n")
                start = time.monotonic()
                seen = []
                for _ in range(5):
                    scans = _wait_scan(scans)
                    end = time.monotonic()
                    now_cpu = calibrate_mod.ksmd_cpu_seconds(pid)
                    kernel = ksm_sysfs.read("pages_to_scan")
                    predicted = model.after_scan(max(end - start, 0.0), now_cpu - cpu)
                    seen.append((round(end - start, 3), model.cpu_percent, kernel, predicted))
                    # The next scan starts after one sleep (its first batch starts it).
                    start, cpu = end + 0.108, now_cpu
                    if kernel != predicted:
                        break
            finally:
                (KSM / "advisor_mode").write_text("none\n")
                (KSM / "advisor_target_scan_time").write_text(saved_target + "\n")
    finally:
        region.close()
    assert "[none]" in (KSM / "advisor_mode").read_text()
    print("advisor (wall s, cpu %, kernel, model):", seen)
    if others:
        pytest.skip(f"other KSM users {others}: their pages change the scans ({seen})")
    assert [k for *_, k, _ in seen] == [p for *_, p in seen], seen


@pytest.mark.ksm
@pytest.mark.skipif(ksm_sysfs.usable() is not None, reason=str(ksm_sysfs.usable()))
@pytest.mark.parametrize(("pages_to_scan", "sleep"), [(1000, 20), (5000, 50)])
def test_full_scan_time_matches_the_kernel(pages_to_scan, sleep):
    """Predicted full-scan wall time within 20% of measured on 20,000 unique pages, with
    the CPU per page calibrated just before."""
    cost = calibrate_mod.calibrate(32, scans=6)
    region = _mapping(20000)
    try:
        with ksm_sysfs.ksm_session(pages_to_scan=pages_to_scan, sleep_millisecs=sleep,
                                   smart_scan=0):
            (KSM / "run").write_text("1\n")
            scans = _wait_scan(_wait_scan(ksm_sysfs.read("full_scans")))
            s0, t0 = ksm_sysfs.read("pages_scanned"), time.monotonic()
            end = scans
            for _ in range(4):
                end = _wait_scan(end)
            elapsed = time.monotonic() - t0
            processed = (ksm_sysfs.read("pages_scanned") - s0) // (end - scans)
    finally:
        region.close()
    measured = elapsed / (end - scans)
    predicted = full_scan(processed, 0, Knobs(pages_to_scan=pages_to_scan,
                                              sleep_millisecs=sleep), cost).wall_seconds
    print(f"pages_to_scan {pages_to_scan} sleep {sleep}: predicted {predicted:.3f} s, "
          f"measured {measured:.3f} s, {processed} pages a scan")
    assert math.isclose(predicted, measured, rel_tol=0.2), (predicted, measured, processed)
