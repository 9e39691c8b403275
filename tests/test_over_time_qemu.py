"""End to end against the running kernel with a real QEMU/TCG guest: a live fingerprint
series of the QEMU process while the guest churns its memory, `analyze` of the files, then
real ksmd on the same, still running, guest.

The guest (192 MiB, THP-backed RAM) boots with ``ksmfill=1:8:4`` (8 MiB of stable
duplicates: 512 contents x 4 copies), ``ksmchurn=1:same`` (256 pages rewritten without pause,
identical to each other at almost every instant, never stable) and ``ksmchurn=1:random``
(256 pages rewritten with random bytes); its kernel, busybox and the churn loops' processes
(awk and dd start anew every round) add stable unique pages, pages that change on their
own, zero pages and zero subpages of huge pages. The series is taken with KSM off; then
ksmd runs at pages_to_scan 1000, sleep_millisecs 20 (a full scan of the guest's ~23,000
present pages: ~0.6 s), its counters read every few milliseconds.

Predicted steady pages_shared, pages_sharing and general_profit must be within 2% of the
kernel's, with smart_scan 1 and 0. The time to 90% of the steady general_profit must be
within 25% of the time ksmd took to get there on a host with a CPU to spare (checked once
the guest's huge pages are split; see the test): the wall time
less the time ksmd was runnable but waiting for a CPU (``/proc/<ksmd>/schedstat``). The
model assumes a CPU to spare (``ksm_analyze/ksmd/cost.py``); here a TCG vCPU busy at 100%
and other work share two CPUs with ksmd, which runs at nice 5, and it waited 0.4-1 s of its
first 2 s (measured). Both figures are printed. The one-moment count of the same files
('if memory stood still') merges the 256 rewritten identical pages too; the test shows by
how much.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import ksm_sysfs
from ksm_analyze import analyze
from qemu_guest import Guest, ensure_guest_assets, qemu_available

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.ksm,
    pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 is not installed"),
    pytest.mark.skipif(ksm_sysfs.usable() is not None, reason=str(ksm_sysfs.usable())),
]

GUEST_MIB = 192
CHURN_SAME_PAGES = 256  # ksmchurn=1:same: 1 MiB
CMDLINE = "ksmfill=1:8:4 ksmchurn=1:same ksmchurn=1:random"
SETTLE_SECONDS = 10.0
"""After the readiness marker: the boot's page cache and freed memory settle."""
PAGES_TO_SCAN, SLEEP_MILLISECS = 1000, 20
SCANS = 20
STEADY = ("pages_shared", "pages_sharing", "general_profit")
COUNTERS = (*STEADY, "pages_unshared", "pages_volatile")


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    assets = ensure_guest_assets()
    with Guest(assets, mem_mib=GUEST_MIB, cmdline_extra=CMDLINE,
               workdir=tmp_path_factory.mktemp("guest")) as g:
        time.sleep(SETTLE_SECONDS)
        yield g


def _series(pid: int, out: Path) -> list[Path]:
    subprocess.run([sys.executable, "-m", "ksm_analyze", "fingerprint", str(pid), "-o",
                    str(out), "--every", "1s", "--count", "3", "-q"], check=True)
    files = sorted(out.iterdir())
    assert len(files) == 3
    return files


class _Ksmd:
    """ksmd's thread: its CPU time and run-queue wait (``schedstat``, ns; 0 where the
    kernel has no CONFIG_SCHED_INFO), its state and what it sleeps in (``wchan``)."""

    def __init__(self) -> None:
        self.proc: Path | None = None
        for comm in Path("/proc").glob("[0-9]*/comm"):
            with contextlib.suppress(OSError):
                if comm.read_text().strip() == "ksmd":
                    self.proc = comm.parent
                    break

    def schedstat(self) -> tuple[float, float]:
        """CPU seconds and seconds runnable but not running, since boot."""
        try:
            assert self.proc is not None
            run, wait = (self.proc / "schedstat").read_text().split()[:2]
        except (AssertionError, OSError, ValueError):
            return 0.0, 0.0
        return int(run) / 1e9, int(wait) / 1e9

    def blocked_in(self) -> str | None:
        """The kernel function ksmd is blocked in (state D), else None."""
        try:
            assert self.proc is not None
            state = (self.proc / "stat").read_text().rpartition(")")[2].split()[0]
            return (self.proc / "wchan").read_text() or "?" if state == "D" else None
        except (AssertionError, OSError, IndexError):
            return None


@dataclass
class Reading:
    seconds: float
    """Since ksmd was started."""
    cpu: float
    """ksmd's CPU seconds since then."""
    waited: float
    """Seconds ksmd was runnable but waiting for a CPU since then."""
    blocked: float
    """Seconds ksmd was seen blocked (state D) since then, sampled at each reading."""
    full_scans: int
    counters: dict[str, int]


def _run_ksmd(scans: int, timeout: float = 90.0) -> tuple[list[Reading], Counter[str]]:
    """Start ksmd and read its counters and thread every few milliseconds until ``scans``
    full scans are done; and the readings at which ksmd was blocked, by where."""
    ksmd = _Ksmd()
    readings: list[Reading] = []
    blocked_in: Counter[str] = Counter()
    ran, waited = ksmd.schedstat()
    blocked, was_blocked = 0.0, False
    ksm_sysfs._write("run", 1)
    start = time.monotonic()
    first = ksm_sysfs.read("full_scans")
    while time.monotonic() - start < timeout:
        done = ksm_sysfs.read("full_scans") - first
        cpu, wait = ksmd.schedstat()
        now = time.monotonic() - start
        if was_blocked:  # blocked at the last reading: count the time since
            blocked += now - readings[-1].seconds
        where = ksmd.blocked_in()
        was_blocked = where is not None
        if where is not None:
            blocked_in[where] += 1
        readings.append(Reading(now, cpu - ran, wait - waited, blocked, done,
                                {k: ksm_sysfs.read(k) for k in COUNTERS}))
        if done >= scans:
            break
        time.sleep(0.003)
    return readings, blocked_in


def _scan_starts(readings: list[Reading], last: int) -> list[dict[str, int]]:
    """The counters at the first reading of each of the ``last`` full scans."""
    seen: dict[int, dict[str, int]] = {}
    for r in readings:
        seen.setdefault(r.full_scans, r.counters)
    final = max(seen)
    return [seen[d] for d in range(final - last + 1, final + 1) if d in seen]


def _model_cpu(timeline: pd.DataFrame, until: float) -> float:
    """ksmd's CPU seconds in the model's replay up to ``until`` (spread evenly over each
    full scan)."""
    ends = np.concatenate([[0.0], timeline["time_seconds"].to_numpy(float)])
    cpu = np.diff(ends) * timeline["ksmd_cpu_percent"].to_numpy(float) / 100
    return float(np.interp(until, ends, np.concatenate([[0.0], np.cumsum(cpu)])))


@pytest.mark.parametrize("smart_scan", [
    pytest.param(1, id="smart_scan1-fresh-guest"),  # the guest's RAM still in huge pages
    pytest.param(0, id="smart_scan0"),
    pytest.param(1, id="smart_scan1"),
])
def test_guest_series_predicts_what_real_ksmd_keeps_and_when(tmp_path, guest, smart_scan):
    if ksm_sysfs.read("run") != 0 or ksm_sysfs.read("pages_shared"):
        pytest.skip("KSM is in use on this host: the host-wide counters would mix")
    others = ksm_sysfs.other_ksm_users([guest.pid])
    if others:
        pytest.skip(f"processes {others} also use KSM: the host counters would not be ours")
    files = _series(guest.pid, tmp_path / "fp")
    result = analyze(files, smart_scan=bool(smart_scan), pages_to_scan=PAGES_TO_SCAN,
                     sleep_millisecs=SLEEP_MILLISECS)
    assert len(result.per_input) == 1  # three samples of one QEMU process: one input
    predicted = result.host["with_zero_pages"]
    still = result.host["if_memory_stood_still"]
    conv = result.convergence["value"]
    with ksm_sysfs.ksm_session(smart_scan=smart_scan, pages_to_scan=PAGES_TO_SCAN,
                               sleep_millisecs=SLEEP_MILLISECS):
        readings, blocked_in = _run_ksmd(scans=SCANS)
    assert readings[-1].full_scans >= SCANS, f"ksmd did not finish {SCANS} full scans in time"
    # Steady state: the median over the starts of the last 5 full scans (the guest's churn
    # moves a few pages from scan to scan).
    starts = _scan_starts(readings, 5)
    steady = {k: int(np.median([c[k] for c in starts])) for k in STEADY}
    at = next(r for r in readings
              if r.counters["general_profit"] >= 0.9 * steady["general_profit"])
    spare = at.seconds - at.waited - at.blocked  # on a host with a CPU to spare for ksmd
    t90 = conv["time_to_90_percent_seconds"]
    model_cpu = _model_cpu(result.timeline, t90)
    print(f"\nsmart_scan {smart_scan}: " + ", ".join(
        f"{k} predicted {predicted[k]} actual {steady[k]} "
        f"({100 * (predicted[k] - steady[k]) / steady[k]:+.2f}%), one-moment {still[k]} "
        f"({100 * (still[k] - steady[k]) / steady[k]:+.2f}%)" for k in STEADY)
        + f"; time to 90% predicted {t90:.3f} s, measured {at.seconds:.3f} s wall, of which "
        f"ksmd waited for a CPU {at.waited:.3f} s and was blocked {at.blocked:.3f} s "
        f"(in {dict(blocked_in)} over the run): {spare:.3f} s ({100 * (t90 - spare) / spare:+.1f}%); "
        f"ksmd's CPU to then {at.cpu:.3f} s, the model's {model_cpu:.3f} s")
    # Full scan 1 gives every page it visits an rmap_item, the guest's zero subpages of huge
    # pages too (the first merge in a huge page splits it on scan 2): as the model says.
    scan1 = _scan_starts(readings, readings[-1].full_scans)[0]
    items = sum(scan1[k] for k in ("pages_shared", "pages_sharing", "pages_unshared",
                                   "pages_volatile"))
    modelled = int(result.timeline["ksm_rmap_items"].iloc[0])
    thp_zero = int(result.exclusions["thp_zero"].sum())
    print(f"rmap_items after full scan 1: predicted {modelled}, actual {items}; zero THP "
          f"subpages {thp_zero}")
    if thp_zero:  # a guest KSM never split (the first run after boot)
        assert abs(modelled - items) <= 0.02 * items, (modelled, items)
    for counter in STEADY:
        assert abs(predicted[counter] - steady[counter]) <= 0.02 * abs(steady[counter]), (
            counter, predicted[counter], steady[counter])
    # When: 90% of the steady general_profit, on a host with a CPU to spare for ksmd. On a
    # freshly booted guest (smart_scan 1 runs first) its RAM is in huge pages, and the
    # kernel merged only ~80% of the duplicates in full scan 2 in some runs (the rest in
    # scan 3: merging a subpage splits its huge page, and a split can fail and be retried
    # a scan later), which the model does not know: there 90% came 29-34% later than
    # predicted in 3 runs of 5 (docs/model.md). Once the huge pages are split (after the
    # first run's unmerge), the 25% holds: -3% to -9% in every run measured.
    if thp_zero == 0:
        assert t90 == pytest.approx(spare, rel=0.25), (t90, at)
    # A one-moment count of the same files merges the 256 rewritten identical pages as
    # well: one KSM page more and 255 pages_sharing more (254 if the last sample fell
    # between two rounds of the rewrite; the guest's own churn moves a few more)...
    assert still["pages_sharing"] - predicted["pages_sharing"] >= CHURN_SAME_PAGES - 2 - 10
    # ... and is farther from what ksmd keeps than the prediction.
    for counter in ("pages_sharing", "general_profit"):
        assert abs(still[counter] - steady[counter]) > abs(predicted[counter] - steady[counter])
    stab = result.stability.iloc[0]
    assert stab["pages_changed"] >= 2 * CHURN_SAME_PAGES  # both churn files, at least
    assert stab["coinciding_duplicate_pages"] >= CHURN_SAME_PAGES - 2
