"""Drive the kernel's real KSM from tests: set knobs, wait for convergence, restore everything.

Used only by tests that compare predictions with the running kernel. Every knob touched is
put back on exit, after ``run=2`` has unmerged what KSM merged.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

KSM = Path("/sys/kernel/mm/ksm")
_KNOBS = ("max_page_sharing", "pages_to_scan", "sleep_millisecs", "use_zero_pages",
          "smart_scan", "run")
COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
            "ksm_zero_pages", "general_profit", "full_scans")


def usable() -> str | None:
    """None when real KSM can be driven here, else the reason it cannot."""
    if not (KSM / "run").exists():
        return "no /sys/kernel/mm/ksm (kernel without KSM)"
    if os.geteuid() != 0 or not os.access(KSM / "run", os.W_OK):
        return "/sys/kernel/mm/ksm is not writable (needs root)"
    return None


def read(name: str) -> int:
    """A KSM counter or knob as an int ('[none] scan-time' style values are not read here)."""
    return int((KSM / name).read_text().split()[0])


def _write(name: str, value: object) -> None:
    (KSM / name).write_text(f"{value}\n")


@contextlib.contextmanager
def ksm_session(**knobs: int) -> Iterator[None]:
    """Unmerge everything, set ``knobs``, and restore every knob afterwards."""
    saved = {k: (KSM / k).read_text().strip() for k in _KNOBS if (KSM / k).exists()}
    try:
        _write("run", 2)  # unmerge: max_page_sharing can change only with no KSM pages
        for k, v in knobs.items():
            _write(k, v)
        yield
    finally:
        _write("run", 2)
        for k, v in saved.items():
            if k != "run":
                _write(k, v)
        _write("run", saved.get("run", "0"))


def converge(min_scans: int = 3, timeout: float = 120.0) -> dict[str, int]:
    """Run ksmd until ``full_scans`` advanced ``min_scans`` times and the counters held still
    over two more full scans (stale rmap_items of split huge pages go only at a later scan)."""
    _write("run", 1)
    start = read("full_scans")
    deadline = time.monotonic() + timeout
    last: dict[str, int] | None = None
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = {c: read(c) for c in COUNTERS}
        if now["full_scans"] < start + min_scans:
            continue
        if last is not None and now["full_scans"] >= last["full_scans"] + 2:
            if all(now[c] == last[c] for c in COUNTERS[:-1]):
                return now
            last = now
        elif last is None:
            last = now
    raise TimeoutError(f"KSM did not converge within {timeout} s: {last}")


def ksm_stat(pid: int | str = "self") -> dict[str, int]:
    """/proc/PID/ksm_stat as ints (yes/no lines dropped)."""
    out = {}
    for line in Path(f"/proc/{pid}/ksm_stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key.rstrip(":")] = int(value)
    return out


def other_ksm_users(ours: list[int]) -> list[int]:
    """PIDs besides ``ours`` with mergeable memory: their pages would be in the host counters."""
    others = []
    for stat in Path("/proc").glob("[0-9]*/ksm_stat"):
        with contextlib.suppress(OSError):
            if "ksm_mergeable: yes" in stat.read_text() and int(stat.parent.name) not in ours:
                others.append(int(stat.parent.name))
    return others


TOLERANCE = 0.005
"""Agreement the issue asks for between predicted and real counters: 0.5%."""


def within(actual: int, predicted: int) -> bool:
    """``actual`` is within :data:`TOLERANCE` of ``predicted``."""
    return abs(actual - predicted) <= TOLERANCE * max(abs(predicted), 1)
