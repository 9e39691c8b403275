"""End to end against the running kernel: a live fingerprint series of a process whose
memory churns, `scan` of the files, then real ksmd on the same process.

The target holds stable duplicates (40 contents x 15), 300 stable unique pages, 100 written
zero pages, 400 pages a thread rewrites without pause with one content that changes every
round (identical to each other at almost every instant, never stable) and 100 pages it
rewrites with random bytes. The series is taken with KSM off; then ksmd runs with the
kernel's default pace (pages_to_scan 100, sleep_millisecs 20), polled every millisecond.
Predicted steady pages_shared, pages_sharing and general_profit must be within 2% of the
kernel's, and the time to 90% of the steady general_profit within 25%. The one-moment count
of the same files ('if memory stood still') is far off; the test says by how much.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import series_target

import ksm_sysfs
from ksm_analyze import analyze

pytestmark = [
    pytest.mark.ksm,
    pytest.mark.skipif(ksm_sysfs.usable() is not None, reason=str(ksm_sysfs.usable())),
]

STEADY = ("pages_shared", "pages_sharing", "general_profit")


@pytest.fixture
def target():
    with series_target.churning() as pid:
        yield pid


def _series(pid: int, out: Path) -> list[Path]:
    subprocess.run([sys.executable, "-m", "ksm_analyze", "fingerprint", str(pid), "-o",
                    str(out), "--every", "0.3s", "--count", "3", "-q"], check=True)
    files = sorted(out.iterdir())
    assert len(files) == 3
    return files


def _run_ksmd(scans: int, timeout: float = 60.0) -> list[tuple[float, int, dict[str, int]]]:
    """Start ksmd and read (seconds since start, full scans, counters) every millisecond
    until ``scans`` full scans are done."""
    readings = []
    ksm_sysfs._write("run", 1)
    start = time.monotonic()
    first = ksm_sysfs.read("full_scans")
    while time.monotonic() - start < timeout:
        done = ksm_sysfs.read("full_scans") - first
        readings.append((time.monotonic() - start, done,
                         {k: ksm_sysfs.read(k) for k in STEADY}))
        if done >= scans:
            break
        time.sleep(0.001)
    return readings


@pytest.mark.parametrize("smart_scan", [1, 0])
def test_series_predicts_what_real_ksmd_keeps_and_when(tmp_path, target, smart_scan):
    if ksm_sysfs.read("run") != 0 or ksm_sysfs.read("pages_shared"):
        pytest.skip("KSM is in use on this host: the host-wide counters would mix")
    files = _series(target, tmp_path / "fp")
    result = analyze(files, smart_scan=bool(smart_scan))
    assert len(result.per_input) == 1  # three samples of one process: one input
    predicted = result.host["with_zero_pages"]
    conv = result.convergence["value"]
    with ksm_sysfs.ksm_session(smart_scan=smart_scan, pages_to_scan=100, sleep_millisecs=20):
        readings = _run_ksmd(scans=30)
    assert readings[-1][1] >= 30, "ksmd did not finish 30 full scans in time"
    steady = readings[-1][2]
    for counter in STEADY:
        assert abs(predicted[counter] - steady[counter]) <= 0.02 * abs(steady[counter]), (
            counter, predicted[counter], steady[counter])
    # The replay's own steady state is the same figure.
    for counter in STEADY:
        assert result.host.at[counter, "steady_state"] == predicted[counter]
    # When: 90% of the steady general_profit.
    reached = next(t for t, _, c in readings if c["general_profit"] >= 0.9 * steady["general_profit"])
    print(f"smart_scan={smart_scan}: predicted {[int(predicted[c]) for c in STEADY]}, real "
          f"{[steady[c] for c in STEADY]}; 90% predicted at "
          f"{conv['time_to_90_percent_seconds']:.3f} s, reached at {reached:.3f} s")
    assert conv["time_to_90_percent_seconds"] == pytest.approx(reached, rel=0.25), (
        conv["time_to_90_percent_seconds"], reached)
    # A one-moment count of the same files merges the rewritten pages too: 398 pages more
    # (the 400 identical rewritten pages make 2 KSM pages at max_page_sharing 256).
    still = result.host["if_memory_stood_still"]
    assert still["pages_sharing"] - steady["pages_sharing"] >= 390
    stab = result.stability.iloc[0]
    assert stab["pages_changed"] >= 490 and stab["coinciding_duplicate_pages"] >= 390
