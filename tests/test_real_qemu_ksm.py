"""Two QEMU/TCG guests: the host view (capture of the QEMU processes) against real KSM.

Both guests boot the same kernel and initramfs and fill some memory (``ksmfill``): sharing
within and across guests. They are paused, their QEMU processes are captured, the
prediction is made from the snapshot, then real ksmd merges the guests' RAM. The host-wide
counters and each QEMU process's ksm_stat must agree within 0.5%. The same guests'
``dump-guest-memory`` dumps (the guest view) are analysed too: they count pages the host
never backs, so they must predict more than the kernel merges (README, "Guest view and host
view").
"""

from __future__ import annotations

import contextlib

import pytest

import ksm_sysfs
from ksm_analyze import analyze
from ksm_analyze.capture import capture
from ksm_analyze.status import ksm_status
from qemu_guest import Guest, ensure_guest_assets, qemu_available

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.ksm,
    pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 is not installed"),
    pytest.mark.skipif(ksm_sysfs.usable() is not None, reason=str(ksm_sysfs.usable())),
]
MEM_MIB = 256
GUESTS = ("ksmfill=1:16:4", "ksmfill=2:16:4")


def test_two_guests_host_view_matches_real_ksm(tmp_path):
    assets = ensure_guest_assets()
    snap = tmp_path / "qemu.snap"
    with contextlib.ExitStack() as stack:
        guests = [stack.enter_context(Guest(assets, mem_mib=MEM_MIB, cmdline_extra=extra,
                                            workdir=tmp_path / f"g{i}"))
                  for i, extra in enumerate(GUESTS)]
        for g in guests:
            g.pause()
        dumps = [g.dump_elf(tmp_path / f"g{i}.elf") for i, g in enumerate(guests)]
        pids = [g.pid for g in guests]
        summary = capture(pids, snap)
        assert not ksm_sysfs.other_ksm_users(pids), "other processes use KSM: host counters not ours"
        with ksm_sysfs.ksm_session(pages_to_scan=20000, sleep_millisecs=10):
            ksm_sysfs.converge(timeout=300)
            status = ksm_status([snap])

    # Zero-page PTEs of guest RAM were found and left out, as KSM leaves them.
    assert sum(p["zero_pfn_pages"] for p in summary.processes) > 1000
    host = status.host
    for counter in ("pages_shared", "pages_sharing", "general_profit"):
        actual, predicted = host.at[counter, "actual"], host.at[counter, "predicted"]
        assert ksm_sysfs.within(actual, predicted), (counter, actual, predicted)
    assert host.at["pages_sharing", "predicted"] > 10000
    for _, row in status.processes.iterrows():
        for field in ("ksm_rmap_items", "ksm_merging_pages", "ksm_process_profit"):
            actual, predicted = row[f"{field}_actual"], row[f"{field}_predicted"]
            assert ksm_sysfs.within(actual, predicted), (row["pid"], field, actual, predicted)
    assert len(status.processes) == 2

    # The guest view counts every zero page of guest RAM as present: far more sharing.
    guest_view = analyze(dumps).counters
    assert guest_view.pages_sharing > 1.5 * host.at["pages_sharing", "actual"]
