"""Measure ksmd's CPU per page on the running kernel (root, writable KSM).

A child process maps N MiB of MADV_MERGEABLE memory, half unique random pages and half
copies of 64 contents, and ksmd runs over it twice:

1. ``smart_scan`` 0: every page is processed every scan. After three full scans (the copies
   are merged by then) ksmd's CPU time over the next full scans, over the ``pages_scanned``
   they add, is the CPU per processed page;
2. ``smart_scan`` 1: the unique pages age and smart_scan skips most of their visits. The
   CPU beyond what the processed pages cost, over the ``pages_skipped`` added, is the CPU per
   skipped page.

ksmd's CPU time is its own thread's: ``/proc/<ksmd>/schedstat`` (nanoseconds), or utime +
stime of ``/proc/<ksmd>/stat`` (clock ticks) where schedstat is missing; other work on the
host does not count. Every knob changed is put back; KSM is not unmerged (the child's pages
go when it exits), so a host's merged guests stay merged.
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..ksmd.cost import CpuCost

__all__ = ["calibrate", "ksmd_cpu_seconds", "ksmd_pid"]

KSM = Path("/sys/kernel/mm/ksm")
_CONTENTS = 64

_CHILD = r"""
import mmap, os, sys
ps = mmap.PAGESIZE
n = int(sys.argv[1]) * (1 << 20) // ps
region = mmap.mmap(-1, n * ps, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
region.madvise(mmap.MADV_MERGEABLE)
if hasattr(mmap, "MADV_HUGEPAGE"):  # as guest RAM is: merging a page splits its huge page
    region.madvise(mmap.MADV_HUGEPAGE)
unique = n // 2
region[: unique * ps] = os.urandom(unique * ps)
contents = [os.urandom(ps) for _ in range(int(sys.argv[2]))]
for i in range(unique, n):
    region[i * ps : (i + 1) * ps] = contents[i % len(contents)]
def spin():  # a running process, as a guest's vCPU is: each merge then flushes its TLBs
    while True:
        pass
import threading
threading.Thread(target=spin, daemon=True).start()
print(n, unique, flush=True)
sys.stdin.readline()  # "drop": the copies leave KSM (their VMA is no longer mergeable)
region.madvise(mmap.MADV_UNMERGEABLE, unique * ps, (n - unique) * ps)
print("dropped", flush=True)
sys.stdin.read()
"""


def ksmd_pid() -> int | None:
    """The PID of the ``ksmd`` kernel thread (found by its comm), or None."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "ksmd":
                    return int(entry.name)
    return None


def ksmd_cpu_seconds(pid: int) -> float:
    """ksmd's CPU time so far: schedstat's run time (ns), else utime + stime."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _read(name: str) -> int:
    return int((KSM / name).read_text().split()[0])


def _write(name: str, value: object) -> None:
    (KSM / name).write_text(f"{value}\n")


def usable() -> str | None:
    """None when KSM can be driven here, else why not (one line)."""
    if not (KSM / "run").exists():
        return "no /sys/kernel/mm/ksm (a kernel without KSM)"
    if os.geteuid() != 0 or not os.access(KSM / "run", os.W_OK):
        return "/sys/kernel/mm/ksm is not writable (needs root)"
    if ksmd_pid() is None:
        return "no ksmd thread in /proc"
    return None


@contextlib.contextmanager
def _knobs_restored() -> Iterator[None]:
    """Put back every knob calibration touches, the advisor's mode before pages_to_scan
    can be written and ``run`` last."""
    names = [n for n in ("pages_to_scan", "sleep_millisecs", "smart_scan")
             if (KSM / n).exists()]
    saved = {n: (KSM / n).read_text().strip() for n in [*names, "run"]}
    mode = (KSM / "advisor_mode").read_text() if (KSM / "advisor_mode").exists() else ""
    advisor_on = "[scan-time]" in mode
    try:
        if advisor_on:
            _write("advisor_mode", "none")  # pages_to_scan refuses writes while it is on
        yield
    finally:
        for n in names:
            with contextlib.suppress(OSError):
                _write(n, saved[n])
        if advisor_on:  # the kernel sets pages_to_scan to advisor_min_pages_to_scan
            with contextlib.suppress(OSError):
                _write("advisor_mode", "scan-time")
        with contextlib.suppress(OSError):
            _write("run", saved["run"])


def _wait_scans(count: int, timeout: float) -> None:
    target = _read("full_scans") + count
    deadline = time.monotonic() + timeout
    while _read("full_scans") < target:
        if time.monotonic() > deadline:
            raise InputError(f"ksmd did not finish {count} full scans within {timeout:g} s",
                             path=str(KSM))
        time.sleep(0.005)


def _phase(pid: int, scans: int, timeout: float) -> tuple[float, int, int]:
    """ksmd's CPU, pages processed and pages skipped over ``scans`` full scans, counted
    from a scan boundary."""
    _wait_scans(1, timeout)
    skipped = (KSM / "pages_skipped").exists()
    c0, s0 = ksmd_cpu_seconds(pid), _read("pages_scanned")
    k0 = _read("pages_skipped") if skipped else 0
    _wait_scans(scans, timeout)
    c1, s1 = ksmd_cpu_seconds(pid), _read("pages_scanned")
    k1 = _read("pages_skipped") if skipped else 0
    return c1 - c0, s1 - s0, k1 - k0


def _hz() -> int | None:
    """CONFIG_HZ from /proc/config.gz or /boot/config-RELEASE, when readable."""
    release = platform.release()
    for path, opener in ((Path("/proc/config.gz"), gzip.open),
                         (Path(f"/boot/config-{release}"), open)):
        with contextlib.suppress(OSError), opener(path, "rt") as f:
            for line in f:
                if line.startswith("CONFIG_HZ="):
                    return int(line.split("=", 1)[1])
    return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def calibrate(mib: int = 64, *, pages_to_scan: int = 20000, sleep_millisecs: int = 10,
              scans: int = 10, timeout: float = 60.0,
              progress: Callable[[str], None] | None = None) -> CpuCost:
    """Run ksmd over a known workload of ``mib`` MiB and fit its CPU per processed and per
    skipped page. Needs root and a writable ``/sys/kernel/mm/ksm``."""
    if mib < 4:
        raise ValueError(f"the workload needs at least 4 MiB, not {mib}")
    why = usable()
    if why:
        raise InputError(f"cannot calibrate: {why}", path=str(KSM))
    pid = ksmd_pid()
    assert pid is not None
    say = progress or (lambda _: None)
    smart = (KSM / "smart_scan").exists()
    figures: dict[str, Any] = {}
    with _knobs_restored():
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(mib), str(_CONTENTS)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            pages, unique = map(int, child.stdout.readline().split())
            _write("pages_to_scan", pages_to_scan)
            _write("sleep_millisecs", sleep_millisecs)
            if smart:
                _write("smart_scan", 0)
            say("smart_scan 0, the first two full scans: checksums, then the merges")
            c0, s0 = ksmd_cpu_seconds(pid), _read("pages_scanned")
            f0 = _read("full_scans")
            _write("run", 1)
            _wait_scans(1, timeout)  # scan 1: every page's first visit (checksum only)
            first = {"cpu_seconds": ksmd_cpu_seconds(pid) - c0,
                     "pages_scanned": _read("pages_scanned") - s0,
                     "full_scans": _read("full_scans") - f0}
            c1, s1 = ksmd_cpu_seconds(pid), _read("pages_scanned")
            _wait_scans(1, timeout)  # scan 2 merges the copies
            merging = {"cpu_seconds": ksmd_cpu_seconds(pid) - c1,
                       "pages_scanned": _read("pages_scanned") - s1,
                       "merges": _read("pages_shared") + _read("pages_sharing"),
                       "full_scans": 1}
            say("smart_scan 0, unique and merged pages: every page processed")
            _wait_scans(1, timeout)
            cpu_a, scanned_a, _ = _phase(pid, scans, timeout)
            assert child.stdin is not None
            child.stdin.write("drop\n")
            child.stdin.flush()
            child.stdout.readline()
            say("smart_scan 0, unique pages only")
            _wait_scans(2, timeout)
            cpu_u, scanned_u, _ = _phase(pid, scans, timeout)
            if scanned_u <= 0 or scanned_a <= scanned_u:
                raise InputError(f"ksmd processed no pages of the workload ({scanned_a} with the copies, "
                                 f"{scanned_u} without)", path=str(KSM))
            per_page = cpu_u / scanned_u
            # The first phase processed the same unique pages, and the merged copies.
            per_merged = max(cpu_a - per_page * scanned_u, 0.0) / (scanned_a - scanned_u)
            per_skipped = 0.0
            per_first = first["cpu_seconds"] / max(first["pages_scanned"], 1)
            # The merging scan processed pages at the unique pages' cost, plus the merges.
            extra = merging["cpu_seconds"] - per_page * merging["pages_scanned"]
            per_merge = max(extra, 0.0) / merging["merges"] if merging["merges"] else 0.0
            figures["first_visits"] = first
            figures["merging"] = merging
            figures["unique_and_merged"] = {"cpu_seconds": cpu_a, "pages_scanned": scanned_a,
                                            "full_scans": scans}
            figures["unique"] = {"cpu_seconds": cpu_u, "pages_scanned": scanned_u,
                                 "full_scans": scans}
            if smart:
                _write("smart_scan", 1)
                say("smart_scan 1: aged unique pages skipped")
                _wait_scans(6, timeout)  # ages 0..2 are never skipped
                cpu_b, scanned_b, skipped_b = _phase(pid, 2 * scans, timeout)
                figures["skipping"] = {"cpu_seconds": cpu_b, "pages_scanned": scanned_b,
                                       "pages_skipped": skipped_b, "full_scans": 2 * scans}
                if skipped_b > 0:
                    per_skipped = max(cpu_b - per_page * scanned_b, 0.0) / skipped_b
        finally:
            with contextlib.suppress(OSError):
                if child.stdin:
                    child.stdin.close()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            if child.stdout:
                child.stdout.close()
    machine = {
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "hz": _hz(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "workload": (f"{mib} MiB MADV_MERGEABLE: {unique} unique random pages, "
                     f"{pages - unique} copies of {_CONTENTS} contents"),
        "settings": {"pages_to_scan": pages_to_scan, "sleep_millisecs": sleep_millisecs},
        "cpu_clock": ("schedstat" if Path(f"/proc/{pid}/schedstat").exists()
                      else "stat utime+stime"),
        **figures,
    }
    if machine["hz"] is None:
        del machine["hz"]
    return CpuCost(seconds_per_page=per_page, seconds_per_skipped=per_skipped,
                   seconds_per_merged=per_merged, seconds_per_merge=per_merge,
                   seconds_per_first_visit=per_first,
                   machine=machine)
