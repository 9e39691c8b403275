"""The scan-time advisor's arithmetic: ``scan_time_advisor()`` of ``mm/ksm.c``, integer for
integer, as on the kernel this was checked against (6.18).

With ``advisor_mode`` ``scan-time`` the kernel rewrites ``pages_to_scan`` at the end of every
full scan, from that scan's wall time and ksmd's CPU time::

    scan_time   = max(1, wall ms // 1000)                 # whole seconds, at least 1
    cpu_ms      = ksmd CPU ns since the last advice // 10**6
    cpu_percent = max(1, cpu_ms * 100 // (scan_time * 1000))
    factor      = max(1, advisor_target_scan_time * 100 // scan_time)
    change      = max(1, scan_time * 100 // last_scan_time)   # last: this one on the first
    change      = (70 * previous_change + 30 * change) // 100  # EWMA, weight 30
    pages       = pages_to_scan * 100 // factor * change // 100
    per_cpu     = max(1, pages_to_scan // cpu_percent)        # pages per 1% CPU
    pages       = min(pages, per_cpu * advisor_max_cpu)
    pages       = max(pages, per_cpu * 10)                    # the 10% CPU floor
    pages       = min(pages, advisor_max_pages_to_scan)

Quirks that follow from it (each checked on 6.18 by ``tests/test_ksmd_cost.py``):

- Entering ``scan-time`` (``advisor_mode_store``, only when the mode changes) zeroes the
  advisor's state and sets ``pages_to_scan`` to ``advisor_min_pages_to_scan``; leaving it
  sets ``pages_to_scan`` back to 100. ``advisor_min_pages_to_scan`` is used nowhere else:
  the advice itself can go below it (down to the 10% CPU floor).
- The first advice has no previous change (0), so ``change`` is 30% of the ratio: the first
  advised ``pages_to_scan`` is cut to about 0.3 x what the target alone asks for.
- The state's CPU time starts at 0, not at ksmd's CPU time when the mode was entered, so the
  first advice sees ksmd's whole lifetime CPU as this scan's (``ksmd_cpu_before``): on a
  host where ksmd has run before, the first ``cpu_percent`` is huge and the cap
  ``per_cpu * advisor_max_cpu`` pulls the first advice far down.
- Scan times are whole seconds, at least 1: scans shorter than a second all count as 1 s,
  so with a target of T seconds ``factor`` is ``100 * T`` and the advice shrinks the rate.
- ``advisor_max_pages_to_scan`` is applied last, after the CPU floor.
- While the advisor is on, writes to ``pages_to_scan`` fail with EINVAL.

Versions: the advisor came in 6.8 (Stefan Roesch's "mm/ksm: add ksm advisor" series,
Dec 2023); kernels before have no ``advisor_*`` files. The posted versions had an
``advisor_min_cpu`` knob (merged as the constant 10) and reset the state on every write of
``advisor_mode``; the merged one resets it only when the mode changes. The arithmetic above
is the one in 6.8 through 6.18.
"""

from __future__ import annotations

from .knobs import Knobs

__all__ = ["EWMA_WEIGHT", "MIN_CPU", "Advisor"]

EWMA_WEIGHT = 30
"""Weight of the newest scan-time change, in percent (``EWMA_WEIGHT``)."""
MIN_CPU = 10
"""The CPU floor in percent (``KSM_ADVISOR_MIN_CPU``), not a knob."""


class Advisor:
    """The advisor's state as the kernel keeps it (``struct advisor_ctx``).

    Built as ``advisor_mode`` is switched to ``scan-time``: :attr:`pages_to_scan` starts at
    ``advisor_min_pages_to_scan``. ``ksmd_cpu_before`` is ksmd's CPU time in seconds at that
    moment (``/proc/<ksmd>/schedstat``): the first advice counts it as that scan's.
    """

    def __init__(self, knobs: Knobs, *, ksmd_cpu_before: float = 0.0) -> None:
        if ksmd_cpu_before < 0:
            raise ValueError(f"ksmd_cpu_before cannot be negative, not {ksmd_cpu_before}")
        self.knobs = knobs
        self.pages_to_scan = knobs.advisor_min_pages_to_scan
        self._scan_time = 0  # advisor_ctx.scan_time (s)
        self._change = 0  # advisor_ctx.change (%)
        self._ctx_cpu_ns = 0  # advisor_ctx.cpu_time: ksmd's runtime at the last advice
        self._cpu_ns = round(ksmd_cpu_before * 1e9)  # ksmd's runtime now
        self.cpu_percent = 0
        """The ``cpu_percent`` of the last advice (the ``ksm_advisor`` tracepoint's)."""
        self.scan_time = 0
        """The whole seconds the last advice counted (the tracepoint's ``scan_time``)."""

    def after_scan(self, wall_seconds: float, cpu_seconds: float) -> int:
        """The ``pages_to_scan`` the kernel sets after a full scan that took
        ``wall_seconds`` (from its first page to its last) and ``cpu_seconds`` of ksmd's
        CPU; also kept in :attr:`pages_to_scan`."""
        if wall_seconds < 0 or cpu_seconds < 0:
            raise ValueError("scan times cannot be negative")
        k = self.knobs
        scan_time = int(int(wall_seconds * 1000) // 1000) or 1
        self._cpu_ns += round(cpu_seconds * 1e9)
        cpu_ms = (self._cpu_ns - self._ctx_cpu_ns) // 1_000_000
        cpu_percent = (cpu_ms * 100) // (scan_time * 1000) or 1
        last_scan_time = self._scan_time or scan_time
        factor = (k.advisor_target_scan_time * 100) // scan_time or 1
        change = (scan_time * 100) // last_scan_time or 1
        change = ((100 - EWMA_WEIGHT) * self._change + EWMA_WEIGHT * change) // 100
        pages = self.pages_to_scan * 100 // factor
        pages = pages * change // 100
        per_cpu = self.pages_to_scan // cpu_percent or 1
        pages = min(pages, per_cpu * k.advisor_max_cpu)
        pages = max(pages, per_cpu * MIN_CPU)
        pages = min(pages, k.advisor_max_pages_to_scan)
        self._change = change
        self._scan_time = scan_time
        self._ctx_cpu_ns = self._cpu_ns
        self.cpu_percent = cpu_percent
        self.scan_time = scan_time
        self.pages_to_scan = pages
        return pages
