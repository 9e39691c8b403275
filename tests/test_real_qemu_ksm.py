"""Two QEMU/TCG guests: the host view (capture of the QEMU processes) against real KSM.

Both guests boot the same kernel and initramfs and fill some memory (``ksmfill``): sharing
within and across guests. They are paused, their QEMU processes are captured, the
prediction is made from the snapshot, then real ksmd merges the guests' RAM. The host-wide
counters and each QEMU process's ksm_stat must agree within 0.5%. The same guests'
``dump-guest-memory`` dumps (the guest view) count pages the host never backs, so they
predict far more sharing than the kernel finds (README, "Guest view and host view").
"""

from __future__ import annotations

import pytest

import ksm_sysfs
import validation_runs
from qemu_guest import qemu_available

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.ksm,
    pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 is not installed"),
    pytest.mark.skipif(ksm_sysfs.usable() is not None, reason=str(ksm_sysfs.usable())),
]


def test_two_guests_host_view_matches_real_ksm(tmp_path):
    run = validation_runs.qemu_guests(tmp_path)
    # Guest RAM is THP-backed: zero-filled subpages of huge pages are left out, as KSM's
    # split frees them.
    assert run.status.analysis is not None
    assert run.status.analysis.exclusions["thp_zero"].sum() > 1000
    host = run.status.host
    for counter in ("pages_shared", "pages_sharing", "general_profit"):
        actual, predicted = host.at[counter, "actual"], host.at[counter, "predicted"]
        assert ksm_sysfs.within(actual, predicted), (counter, actual, predicted)
    assert host.at["pages_sharing", "predicted"] > 10000
    procs = run.status.processes
    assert len(procs) == 2
    for _, row in procs.iterrows():
        for field in ("ksm_rmap_items", "ksm_merging_pages", "ksm_process_profit"):
            actual, predicted = row[f"{field}_actual"], row[f"{field}_predicted"]
            assert ksm_sysfs.within(actual, predicted), (row["pid"], field, actual, predicted)
    # The guest view counts every zero page of guest RAM as present: far more sharing.
    assert run.guest_view is not None
    assert run.guest_view.counters.pages_sharing > 1.5 * host.at["pages_sharing", "actual"]
