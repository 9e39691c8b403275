"""Capture, predict, then merge for real: the runs behind the real-KSM tests and VALIDATION.md.

Each run captures live processes into a snapshot, predicts from it with the kernel's current
KSM settings, lets the running kernel's ksmd merge the same processes until its counters
hold still, and returns both side by side (:class:`ksm_analyze.live.status.KsmStatus`). Every KSM
knob is restored afterwards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import ksm_sysfs
import workload
from ksm_analyze import Analysis, analyze
from ksm_analyze.live.capture import CaptureSummary, capture
from ksm_analyze.live.status import KsmStatus, ksm_status
from qemu_guest import Guest, ensure_guest_assets

GUEST_MIB = 256
GUEST_FILLS = ("ksmfill=1:16:4", "ksmfill=2:16:4")
"""Both guests boot the same kernel and initramfs and fill 16 MiB, each page 4 times."""


@dataclass
class Run:
    """One validation run: the capture, the comparison, and (guests) the guest view."""

    summary: CaptureSummary
    status: KsmStatus
    guest_view: Analysis | None = None


def _merge_and_compare(pids: list[int], snap: Path, **knobs: int) -> tuple[CaptureSummary,
                                                                          KsmStatus]:
    summary = capture(pids, snap)
    others = ksm_sysfs.other_ksm_users(pids)
    if others:
        raise RuntimeError(f"processes {others} also use KSM: host counters would not be ours")
    # smart_scan=0: with it, pages that did not merge are revisited only every 2-8 scans,
    # so "unchanged over two full scans" does not yet mean converged.
    with ksm_sysfs.ksm_session(pages_to_scan=20000, sleep_millisecs=10, smart_scan=0,
                               **knobs):
        ksm_sysfs.converge(timeout=300)
        return summary, ksm_status([snap])


def workloads(workdir: Path, *, use_zero_pages: int) -> Run:
    """Two workload processes (one with a THP region), all of tests/workload.py's mix."""
    with contextlib.ExitStack() as stack:
        pids = [stack.enter_context(workload.running(11, thp=True)),
                stack.enter_context(workload.running(12))]
        summary, status = _merge_and_compare(pids, workdir / "workloads.snap",
                                             use_zero_pages=use_zero_pages,
                                             max_page_sharing=256)
    return Run(summary, status)


def qemu_guests(workdir: Path) -> Run:
    """Two paused QEMU/TCG guests: host view (capture) against real KSM, and guest view."""
    assets = ensure_guest_assets()
    with contextlib.ExitStack() as stack:
        guests = [stack.enter_context(Guest(assets, mem_mib=GUEST_MIB, cmdline_extra=fill,
                                            workdir=workdir / f"guest{i}"))
                  for i, fill in enumerate(GUEST_FILLS)]
        for g in guests:
            g.pause()
        summary, status = _merge_and_compare([g.pid for g in guests], workdir / "qemu.snap")
        # Dump only now: dump-guest-memory reads every guest page through QEMU, which maps
        # never-touched guest RAM to the zero page and so changes the host view.
        dumps = [g.dump_elf(workdir / f"guest{i}.elf") for i, g in enumerate(guests)]
    return Run(summary, status, guest_view=analyze(dumps))
