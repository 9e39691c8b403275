"""ksmd's CPU bill: CPU per page, the time a full scan takes, and the settings grid.

How ksmd spends a full scan (``ksm_scan_thread()``, ``ksm_do_scan()``,
``scan_get_next_rmap_item()`` of ``mm/ksm.c``, 6.18):

- each wake-up processes up to ``pages_to_scan`` pages. Pages smart_scan skips are walked
  inside ``scan_get_next_rmap_item()`` and do **not** count toward ``pages_to_scan``
  (nor toward ``pages_scanned``); they cost CPU, less than a processed page;
- the wake-up that reaches the end of the scan stops there (``scan_get_next_rmap_item()``
  returns NULL), so a full scan of P processed pages takes ``P // pages_to_scan + 1``
  wake-ups (the last one may process nothing);
- between wake-ups ksmd sleeps ``msecs_to_jiffies(sleep_millisecs)`` ticks (rounded up to
  the tick), and the timer wheel never fires early: the sleep ends on the tick after
  that (measured on 6.18 at HZ 250: 20 ms gives 24 ms a wake-up, 8 ms gives 12 ms); from
  64 ticks on the wheel rounds the expiry up to its level's granularity (8 ticks, then 64)
  as well. The tick count starts from the tick the batch ended in, so a batch shorter
  than a tick costs no wall time of its own. ``sleep_millisecs`` 0 does not sleep.

So a full scan's wall time is ``wakeups x (sleep ticks + 1 + batch ticks) x tick``, about
``wakeups x sleep + CPU`` as a first approximation. ksmd runs at nice 5: on a busy host it
yields to other work and a scan takes longer than this (not modelled: the figures are for a
host with a CPU to spare).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .._files import atomic_write
from ..errors import InputError
from .advisor import Advisor
from .knobs import Knobs

__all__ = [
    "DEFAULT_CPU_COST",
    "DEFAULT_PAGES_TO_SCAN_GRID",
    "DEFAULT_SLEEP_GRID",
    "CpuCost",
    "GridRow",
    "ScanTime",
    "cheapest",
    "full_scan",
    "grid",
    "load_cost",
    "save_cost",
    "say_cheapest",
    "tuner_conflicts",
]

FORMAT = "ksm-analyze-ksmd-cpu-cost"
VERSION = 1
DEFAULT_HZ = 250
"""CONFIG_HZ where the calibration does not say (the tick of the machine measured here)."""


@dataclass(frozen=True)
class CpuCost:
    """ksmd's CPU time per page, and where it was measured.

    Attributes:
        seconds_per_page: CPU per page ksmd processes (checksum, tree searches, merges:
            what ``pages_scanned`` counts).
        seconds_per_skipped: CPU per page smart_scan skips (``pages_skipped``).
        seconds_per_merged: CPU per processed page that is already a KSM page (its visit
            stops at the stable-node check); 0 means "as ``seconds_per_page``".
        seconds_per_merge: CPU each merge adds to its page's visit (write-protecting the
            page, replacing the mapping, splitting a huge page): 0 when not measured.
        seconds_per_first_visit: CPU of a page's first visit (its rmap_item made and its
            checksum taken: no tree search, the gate fails); 0 means "as
            ``seconds_per_page``".
        machine: where it was measured: kernel, CPU model, CONFIG_HZ (``hz``, used for the
            sleep's tick), date, workload.
    """

    seconds_per_page: float
    seconds_per_skipped: float
    machine: dict[str, Any] = field(default_factory=dict, hash=False)
    seconds_per_merged: float = 0.0
    seconds_per_merge: float = 0.0
    seconds_per_first_visit: float = 0.0

    def __post_init__(self) -> None:
        for name in ("seconds_per_page", "seconds_per_skipped", "seconds_per_merged",
                     "seconds_per_merge", "seconds_per_first_visit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number of seconds >= 0, "
                                 f"not {value!r}")
        if self.seconds_per_page <= 0:
            raise ValueError("seconds_per_page must be more than 0")
        if not isinstance(self.machine, dict):
            raise TypeError("machine must be an object")

    @property
    def hz(self) -> int:
        """The tick rate ksmd's sleep is rounded to (``machine["hz"]``, else 250)."""
        hz = self.machine.get("hz", DEFAULT_HZ)
        return hz if isinstance(hz, int) and not isinstance(hz, bool) and hz > 0 else DEFAULT_HZ


DEFAULT_CPU_COST = CpuCost(
    seconds_per_page=4.0e-6,
    seconds_per_skipped=0.3e-6,
    seconds_per_merged=1.0e-6,
    seconds_per_merge=20e-6,
    seconds_per_first_visit=0.75e-6,
    machine={"kernel": "6.18.44", "cpu": "AMD EPYC (2 vCPUs, shared)", "hz": 250,
             "date": "2026-12-06",
             "workload": "ksm-analyze calibrate -o FILE (64 MiB THP-backed, its owner "
                         "running: 8192 unique random pages, 8192 copies of 64 contents)",
             "source": "default"},
)
"""Measured on the project's machine with ``ksm-analyze calibrate``: per processed page
3.2-4.7 us, per page already merged 0.1-1.3 us, per skipped page 0.2-0.4 us, per first visit
0.65-0.9 us, per merge 15-23 us while the pages' process runs (each merge write-protects a
page mapped by running threads: a TLB shootdown), about 0 while it sleeps; a QEMU/TCG guest
measured 26 us per merge (see ``docs/model.md``, "ksmd's CPU bill")."""


@dataclass(frozen=True)
class ScanTime:
    """One full scan: wall time, ksmd's CPU time and how many times ksmd woke up."""

    wall_seconds: float
    cpu_seconds: float
    wakeups: int

    @property
    def cpu_percent(self) -> float:
        """ksmd's CPU over the scan, in percent of one CPU."""
        return 100.0 * self.cpu_seconds / self.wall_seconds if self.wall_seconds else 100.0


def _sleep_ticks(sleep_millisecs: int, hz: int) -> float:
    """Ticks from arming ksmd's sleep to the tick it ends on (0 for no sleep).

    ``msecs_to_jiffies()`` rounds up; the timer wheel fires on the tick after the expiry at
    level 0 (under 63 ticks) and rounds up to 8**level ticks above (on average half of it
    plus one tick, the phase being unknown)."""
    if sleep_millisecs <= 0:
        return 0.0
    ticks = -(-sleep_millisecs * hz // 1000)
    level = 0
    while level < 8 and ticks >= 63 << (3 * level):
        level += 1
    granularity: int = 1 << (3 * level)
    return float(ticks) + (granularity + 1) / 2


def full_scan(processed: int, skipped: int, knobs: Knobs, cost: CpuCost, *,
              merged: int = 0, merges: int = 0, first_visits: int = 0) -> ScanTime:
    """Wall and CPU time of one full scan that processes ``processed`` pages and skips
    ``skipped`` (smart_scan) with ``knobs.pages_to_scan`` and ``knobs.sleep_millisecs``.
    ``merged`` of the processed pages are KSM pages already (cheaper to visit, when the
    calibration measured ``seconds_per_merged``); ``merges`` pages are merged in the scan
    (each costing ``seconds_per_merge`` more); ``first_visits`` of the others are visited
    for the first time (``seconds_per_first_visit`` each).

    Wake-ups are ``processed // pages_to_scan + 1``; each is a batch of CPU then a sleep
    (see the module's docstring for the tick arithmetic)."""
    if processed < 0 or skipped < 0 or merges < 0 or not 0 <= merged <= processed \
            or not 0 <= first_visits <= processed - merged:
        raise ValueError("page counts cannot be negative, nor merged and first visits above "
                         "processed")
    per = knobs.pages_to_scan
    per_merged = cost.seconds_per_merged or cost.seconds_per_page
    per_first = cost.seconds_per_first_visit or cost.seconds_per_page
    others = processed - merged - first_visits
    per_page = (cost.seconds_per_page * others + per_merged * merged + per_first * first_visits
                + cost.seconds_per_merge * merges) / processed if processed \
        else cost.seconds_per_page
    full = processed // per
    wakeups = full + 1
    skipped_per_page = skipped / processed if processed else 0.0
    batch_full = per * (per_page + skipped_per_page * cost.seconds_per_skipped)
    cpu = processed * per_page + skipped * cost.seconds_per_skipped
    batch_last = max(cpu - full * batch_full, 0.0)
    tick = 1.0 / cost.hz
    sleep = _sleep_ticks(knobs.sleep_millisecs, cost.hz)
    if sleep == 0:
        wall = cpu
    else:
        def cycle(batch: float) -> float:
            return (sleep + math.floor(batch / tick)) * tick
        wall = full * cycle(batch_full) + cycle(batch_last)
    return ScanTime(wall_seconds=wall, cpu_seconds=cpu, wakeups=wakeups)


# --- the settings grid -------------------------------------------------------------------

DEFAULT_PAGES_TO_SCAN_GRID = (100, 500, 1000, 2000, 5000, 10000, 20000)
DEFAULT_SLEEP_GRID = (0, 10, 20, 50, 100, 200, 500, 1000)


@dataclass(frozen=True)
class GridRow:
    """One setting: its full-scan time, time to steady state and ksmd's CPU.

    ``pages_to_scan`` is None for the advisor (``advisor_mode`` scan-time), whose rate
    changes scan by scan: ``advised_pages_to_scan`` is where it ends, ``full_scan_seconds``
    the mean over the scans to steady state."""

    pages_to_scan: int | None
    sleep_millisecs: int
    full_scan_seconds: float
    steady_state_seconds: float
    cpu_percent: float
    advised_pages_to_scan: int | None = None

    @property
    def advisor(self) -> bool:
        return self.pages_to_scan is None

    def describe(self) -> str:
        rate = ("advisor_mode scan-time" if self.advisor
                else f"pages_to_scan {self.pages_to_scan}")
        return (f"{rate}, sleep_millisecs {self.sleep_millisecs}: full scan "
                f"{self.full_scan_seconds:.3g} s, steady state in "
                f"{self.steady_state_seconds:.3g} s, ksmd {self.cpu_percent:.3g}% of a CPU")


def grid(scans: Sequence[Sequence[int]], cost: CpuCost, *, steady_scans: int | None = None,
         knobs: Knobs | None = None,
         pages_to_scan: Iterable[int] = DEFAULT_PAGES_TO_SCAN_GRID,
         sleep_millisecs: Iterable[int] = DEFAULT_SLEEP_GRID,
         advisor: bool = True, ksmd_cpu_before: float = 0.0) -> list[GridRow]:
    """Every ``pages_to_scan`` x ``sleep_millisecs`` (and, with ``advisor``, the advisor at
    each sleep) for a host whose full scans process and skip ``scans[k] = (processed,
    skipped[, merged, merges])`` pages (from the model's replay, :func:`full_scan`'s), steady from scan ``steady_scans`` (1-based;
    default: the last): the time to steady state is the sum of the scans' times up to it;
    the full-scan time and CPU % are the pace of the last :data:`PACE_SCANS` scans (a
    smart_scan cycle), as ksmd runs once steady. ``knobs`` gives the advisor's settings."""
    if not scans or any(min(work) < 0 for work in scans):
        raise ValueError("give the pages of at least one full scan, none negative")
    steady = len(scans) if steady_scans is None else min(max(steady_scans, 1), len(scans))
    base = knobs or Knobs()
    rows = []
    for sleep in sorted(set(sleep_millisecs)):
        for rate in sorted(set(pages_to_scan)):
            setting = replace(base, pages_to_scan=rate, sleep_millisecs=sleep)
            rows.append(_row(rate, sleep, [_timed(work, setting, cost) for work in scans],
                             steady))
        if advisor:
            rows.append(_advised(scans, steady, replace(base, sleep_millisecs=sleep), cost,
                                 ksmd_cpu_before))
    return rows


PACE_SCANS = 9
"""Full scans a steady pace is averaged over: one smart_scan cycle."""


def pace(times: Sequence[ScanTime]) -> tuple[float, float]:
    """Mean full-scan time and ksmd CPU % over the last :data:`PACE_SCANS` scans."""
    last = times[-PACE_SCANS:]
    wall = sum(t.wall_seconds for t in last)
    cpu = sum(t.cpu_seconds for t in last)
    return wall / len(last), 100.0 * cpu / wall if wall else 0.0


def _timed(work: Sequence[int], knobs: Knobs, cost: CpuCost) -> ScanTime:
    """:func:`full_scan` of ``(processed, skipped[, merged, merges, first_visits])``."""
    processed, skipped, *more = work
    merged, merges, first = [*more, 0, 0, 0][:3]
    return full_scan(processed, skipped, knobs, cost, merged=merged, merges=merges,
                     first_visits=first)


def _row(rate: int | None, sleep: int, times: Sequence[ScanTime], steady: int,
         advised: int | None = None) -> GridRow:
    full, percent = pace(times)
    return GridRow(rate, sleep, full, sum(t.wall_seconds for t in times[:steady]), percent,
                   advised)


def advisor_scan_seconds(t: ScanTime, knobs: Knobs, cost: CpuCost) -> float:
    """A full scan's time as the advisor measures it: from its first batch to its last,
    one sleep less than :func:`full_scan`'s wall time."""
    return max(t.wall_seconds - _sleep_ticks(knobs.sleep_millisecs, cost.hz) / cost.hz,
               t.cpu_seconds)


def _advised(scans: Sequence[Sequence[int]], steady: int, knobs: Knobs, cost: CpuCost,
             ksmd_cpu_before: float) -> GridRow:
    """The advisor replayed scan by scan from ``advisor_min_pages_to_scan``."""
    adv = Advisor(knobs, ksmd_cpu_before=ksmd_cpu_before)
    times = []
    for work in scans:
        t = _timed(work, replace(knobs, pages_to_scan=adv.pages_to_scan), cost)
        times.append(t)
        adv.after_scan(advisor_scan_seconds(t, knobs, cost), t.cpu_seconds)
    return _row(None, knobs.sleep_millisecs, times, steady, adv.pages_to_scan)


def cheapest(rows: Sequence[GridRow], converge_within_seconds: float) -> GridRow | None:
    """The row with the least CPU % that reaches steady state within the limit (the faster
    one on a tie); None when none does."""
    fit = [r for r in rows if r.steady_state_seconds <= converge_within_seconds]
    return min(fit, key=lambda r: (r.cpu_percent, r.steady_state_seconds), default=None)


def say_cheapest(rows: Sequence[GridRow], converge_within_seconds: float) -> str:
    """One line: the cheapest setting within the limit, or that none reaches it."""
    best = cheapest(rows, converge_within_seconds)
    if best is None:
        fastest = min(rows, key=lambda r: r.steady_state_seconds, default=None)
        tail = f" (the fastest: {fastest.describe()})" if fastest else ""
        return (f"no setting tried reaches steady state within "
                f"{converge_within_seconds:g} s{tail}")
    return f"cheapest within {converge_within_seconds:g} s: {best.describe()}"


# --- tuners ------------------------------------------------------------------------------

TUNERS = {
    "ksmtuned": "ksmtuned",
    "virt-handler": "KubeVirt's virt-handler",
}
"""Processes that rewrite ``pages_to_scan``, by the name they run under, and in words."""


def tuner_conflicts(sysfs: dict[str, Any], processes: list[str]) -> list[str]:
    """What to tell an operator when tuners and the scan-time advisor fight over
    ``pages_to_scan``. ``sysfs`` is a ``/sys/kernel/mm/ksm`` reading, ``processes`` the
    names (``comm``, or command lines) of the host's processes."""
    mode = str(sysfs.get("advisor_mode", ""))
    advisor_on = "[scan-time]" in mode or mode.strip() == "scan-time"
    running = []
    for name, label in TUNERS.items():
        if any(_is(p, name) for p in processes):
            running.append(label)
    out: list[str] = []
    if advisor_on:
        out.extend(
            f"{label} is running and advisor_mode is scan-time: both want pages_to_scan, "
            f"and the kernel refuses every write to it (EINVAL) while the advisor is on, "
            f"so {label}'s settings do not apply" for label in running)
    elif len(running) > 1:
        out.append(f"{' and '.join(running)} are both running: each rewrites pages_to_scan "
                   f"and sleep_millisecs, the last write wins")
    return out


def _is(process: str, name: str) -> bool:
    words = process.split()
    if not words:
        return False
    # A script (ksmtuned is one) shows as "bash /usr/sbin/ksmtuned" in a command line.
    return any(os.path.basename(w) == name for w in words[:2])


# --- the calibration file ----------------------------------------------------------------

def save_cost(path: str | os.PathLike[str], cost: CpuCost) -> None:
    """Write ``cost`` as strict JSON (mode 0600, atomically)."""
    doc = {"format": FORMAT, "version": VERSION, "seconds_per_page": cost.seconds_per_page,
           "seconds_per_skipped": cost.seconds_per_skipped,
           "seconds_per_merged": cost.seconds_per_merged,
           "seconds_per_merge": cost.seconds_per_merge,
           "seconds_per_first_visit": cost.seconds_per_first_visit, "machine": cost.machine}
    atomic_write(path, json.dumps(doc, indent=2, allow_nan=False, sort_keys=True) + "\n")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def load_cost(path: str | os.PathLike[str]) -> CpuCost:
    """A calibration written by :func:`save_cost`; a bad file raises one
    :class:`~ksm_analyze.errors.InputError` line."""
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
    except OSError as e:
        raise InputError(f"cannot read the calibration: {e.strerror or e}", path=path) from None
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"not a ksmd calibration (not JSON: {e})", path=path) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InputError(f"not a ksmd calibration (no \"format\": \"{FORMAT}\")", path=path)
    if doc.get("version") != VERSION:
        raise InputError(f"calibration version {doc.get('version')!r} is not {VERSION}",
                         path=path)
    unknown = sorted(set(doc) - {"format", "version", "seconds_per_page",
                                 "seconds_per_skipped", "seconds_per_merged",
                                 "seconds_per_merge", "seconds_per_first_visit", "machine"})
    if unknown:
        raise InputError(f"unknown field {unknown[0]!r} in the calibration", path=path)
    try:
        return CpuCost(seconds_per_page=doc.get("seconds_per_page"),  # type: ignore[arg-type]
                       seconds_per_skipped=doc.get("seconds_per_skipped"),  # type: ignore[arg-type]
                       seconds_per_merged=doc.get("seconds_per_merged", 0.0),
                       seconds_per_merge=doc.get("seconds_per_merge", 0.0),
                       seconds_per_first_visit=doc.get("seconds_per_first_visit", 0.0),
                       machine=doc.get("machine", {}))
    except (TypeError, ValueError) as e:
        raise InputError(f"bad calibration: {e}", path=path) from None
