"""What KSM keeps over time, and when, for the inputs of one host: the ksmd model applied.

:func:`steady_tables` picks what the analysis counts (with samples over time, the steady
view: pages that change faster than KSM merges, and late duplicates under smart_scan, never
merge); :func:`model_host` replays ksmd over the host (:mod:`ksm_analyze.ksmd`) for the
counters against time, the time to converge, ksmd's CPU and the settings grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .columns import Columns
from .eligibility import ScanMask
from .hashing.stage1 import Fingerprints
from .ksm import KsmCounters, KsmSettings
from .ksmd.advisor import Advisor
from .ksmd.cost import (
    DEFAULT_CPU_COST,
    PACE_SCANS,
    CpuCost,
    ScanTime,
    advisor_scan_seconds,
    cheapest,
    full_scan,
    grid,
    load_cost,
    tuner_conflicts,
)
from .ksmd.knobs import Knobs
from .ksmd.rules import KernelRules, rules_for
from .ksmd.simulate import Scans, ScanWork, Trajectory, simulate
from .ksmd.timeline import Timeline
from .series import (
    STABILITY_COLUMNS,
    Samples,
    churn,
    stability,
    steady_view,
    timeline,
)

__all__ = ["CONVERGENCE_ITEMS", "SETTINGS_COLUMNS", "OverTime", "cpu_cost", "hold_time",
           "ksm_ran", "model_host", "recorded_machine", "settings_for", "steady_tables"]

NEWEST_RULES = "6.18"
"""The rules used when no kernel is known (the inputs recorded none, no ``--kernel``)."""
CONVERGENCE_ITEMS = (
    "kernel_rules", "scanned_pages", "pages_to_scan", "sleep_millisecs", "smart_scan",
    "advisor_mode", "full_scan_seconds", "ksmd_cpu_percent", "time_to_50_percent_seconds",
    "time_to_90_percent_seconds", "steady_state_seconds", "full_scans_to_steady_state",
    "late_duplicate_pages", "cheapest_setting",
)
"""The rows of the ``convergence`` table (docs/glossary.md)."""
SETTINGS_COLUMNS = ("pages_to_scan", "sleep_millisecs", "advisor_mode", "full_scan_seconds",
                    "steady_state_seconds", "ksmd_cpu_percent", "advised_pages_to_scan")


def recorded_machine(prints: Sequence[Fingerprints]) -> dict[str, Any]:
    """The machine facts the latest input recorded (a live fingerprint: ``kernel``,
    ``ksm`` knobs...), or those of a snapshot (``kernel``); {} for a dump."""
    for fp in reversed(prints):
        machine = fp.info.get("machine")
        if isinstance(machine, dict):
            return machine
    for fp in reversed(prints):
        kernel = fp.info.get("kernel")
        if isinstance(kernel, str):
            return {"kernel": kernel}
    return {}


def settings_for(ksm: KsmSettings, machine: dict[str, Any]) -> tuple[Knobs, KernelRules, str]:
    """The knobs and kernel rules to replay ksmd with: what was asked (``ksm``), else what
    the inputs recorded of the machine, else the kernel's defaults; and where the rules came
    from, in words."""
    release = ksm.kernel or machine.get("kernel")
    if isinstance(release, str) and release:
        rules, said = rules_for(release), (
            f"kernel {release}" + (" (--kernel)" if ksm.kernel else " (recorded)"))
    else:
        rules, said = rules_for(NEWEST_RULES), f"kernel {NEWEST_RULES} (none recorded)"
    found = machine.get("ksm")
    sysfs: dict[str, Any] = found if isinstance(found, dict) else {}
    recorded = Knobs.from_sysfs(sysfs) if sysfs else Knobs()
    smart = ksm.smart_scan if ksm.smart_scan is not None else (
        recorded.smart_scan if "smart_scan" in sysfs else rules.has_smart_scan)
    advisor = ksm.advisor_mode or (recorded.advisor_mode if "advisor_mode" in sysfs else "none")
    knobs = replace(recorded, pages_to_scan=ksm.pages_to_scan,
                    sleep_millisecs=ksm.sleep_millisecs,
                    max_page_sharing=ksm.max_page_sharing, use_zero_pages=ksm.use_zero_pages,
                    smart_scan=bool(smart) and rules.has_smart_scan,
                    advisor_mode=advisor if rules.has_advisor else "none",
                    rmap_item_bytes=ksm.rmap_bytes, page_size=ksm.page_size)
    return knobs, rules, said


def cpu_cost(ksm: KsmSettings) -> CpuCost:
    """The calibration asked for (``--cpu-cost FILE``), else the shipped default."""
    return load_cost(ksm.cpu_cost) if ksm.cpu_cost else DEFAULT_CPU_COST


@dataclass(frozen=True)
class OverTime:
    """The ksmd model's answers for one host.

    Attributes:
        trajectory: ksmd replayed full scan by full scan.
        knobs, rules: what it was replayed with; ``rules_source`` says where they came from.
        stability: per input seen over time, how its pages changed (empty otherwise).
        late_duplicates: pages left unmerged as late duplicates in the steady view.
        settings: the ``pages_to_scan`` x ``sleep_millisecs`` x advisor grid.
        cheapest: the cheapest setting that converges within ``ksm.converge_within``, in
            words (None when not asked).
        warnings: tuners on the machine the inputs were taken on that fight the advisor.
    """

    trajectory: Trajectory
    knobs: Knobs
    rules: KernelRules
    rules_source: str
    stability: Columns
    late_duplicates: int
    settings: Columns
    cheapest: str | None
    warnings: list[str]

    def tables(self) -> dict[str, Columns]:
        """``convergence``, ``timeline``, ``stability`` and ``ksmd_settings``."""
        return {"convergence": self.convergence(), "timeline": self.timeline(),
                "stability": self.stability, "ksmd_settings": self.settings}

    @property
    def steady(self) -> KsmCounters | None:
        return self.trajectory.steady

    def timeline(self) -> Columns:
        return Columns(dict(self.trajectory.columns))

    def convergence(self) -> Columns:
        t, k = self.trajectory, self.knobs
        scans = t.columns
        values: dict[str, Any] = {
            "kernel_rules": self.rules_source,
            "scanned_pages": _scanned_pages(scans),
            "pages_to_scan": int(scans["pages_to_scan"][-1]),
            "sleep_millisecs": k.sleep_millisecs,
            "smart_scan": k.smart_scan,
            "advisor_mode": k.advisor_mode,
            "full_scan_seconds": _full_scan_seconds(scans),
            "ksmd_cpu_percent": _cpu_percent(scans),
            "time_to_50_percent_seconds": t.time_to["50%"],
            "time_to_90_percent_seconds": t.time_to["90%"],
            "steady_state_seconds": t.time_to["steady"],
            "full_scans_to_steady_state": t.scans_to["steady"],
            "late_duplicate_pages": self.late_duplicates,
            "cheapest_setting": self.cheapest,
        }
        return Columns({"item": list(CONVERGENCE_ITEMS),
                        "value": np.array([values[i] for i in CONVERGENCE_ITEMS], object)},
                       "item")


def steady_tables(prints: Sequence[Fingerprints], masks: Sequence[ScanMask],
                  labels: Sequence[np.ndarray], all_prints: Sequence[Fingerprints],
                  all_masks: Sequence[ScanMask], samples: Samples, ksm: KsmSettings
                  ) -> tuple[list[Fingerprints], list[np.ndarray], int, Timeline, Columns]:
    """For inputs seen over time: the fingerprints and labels to count as KSM keeps them
    (:func:`~ksm_analyze.series.steady_view`), the late duplicates left unmerged, the
    Timeline to replay and the stability table."""
    was_running = ksm_ran(all_prints)
    moves = churn(all_prints, all_masks, samples, ksm_was_running=was_running)
    hold, smart = hold_time(prints, int(sum(int(m.scanned.sum()) for m in masks)), ksm)
    view_prints, view_labels, late = steady_view(prints, masks, labels, moves,
                                                 hold_seconds=hold, smart_scan=smart)
    tl = timeline(all_prints, all_masks, samples, ksm_was_running=was_running)
    return view_prints, view_labels, late, tl, Columns.from_records(
        stability(all_prints, all_masks, samples), list(STABILITY_COLUMNS))


def hold_time(prints: Sequence[Fingerprints], scanned_pages: int, ksm: KsmSettings
              ) -> tuple[float, bool]:
    """The time a page must hold still to merge on the host of ``prints`` (its inputs'
    latest samples, ``scanned_pages`` pages KSM scans): two full scans; and whether ksmd
    runs with ``smart_scan``."""
    knobs, _, _ = settings_for(ksm, recorded_machine(prints))
    return 2 * full_scan(scanned_pages, 0, knobs, cpu_cost(ksm)).wall_seconds, knobs.smart_scan


def ksm_ran(prints: Sequence[Fingerprints]) -> bool:
    """Whether KSM ran on the machine while any of ``prints`` (samples) was taken (``run`` 1
    recorded)."""
    for fp in prints:
        machine = fp.info.get("machine")
        ksm = machine.get("ksm") if isinstance(machine, dict) else None
        if isinstance(ksm, dict) and str(ksm.get("run")) == "1":
            return True
    return False


def model_host(tl: Timeline, ksm: KsmSettings, machine: dict[str, Any], *,
               stability_table: Columns | None = None, late_duplicates: int = 0
               ) -> OverTime:
    """Replay ksmd over the host's pages ``tl`` with the settings asked or recorded."""
    knobs, rules, said = settings_for(ksm, machine)
    cost = cpu_cost(ksm)

    def scan_time(work: ScanWork, k: Knobs) -> tuple[float, float]:
        t = full_scan(work.processed, work.skipped, k, cost, merged=work.ksm_pages,
                      merges=work.merges, first_visits=work.first_visits)
        return t.wall_seconds, t.cpu_seconds

    works: list[ScanWork] = []

    def recorded(work: ScanWork, k: Knobs) -> tuple[float, float]:
        works.append(work)  # the last replay's scans, for the grid
        return scan_time(work, k)


    advisor = _Advised(knobs, cost) if knobs.advisor_mode == "scan-time" else None
    trajectory = simulate(tl, knobs, rules, scan_time=recorded, advisor=advisor)
    # Each setting of the grid is timed on the replay's own scans.
    scans = works[-len(trajectory.columns["full_scans"]):]
    rows = grid(scans, cost, steady_scans=trajectory.steady_scan, knobs=knobs)
    settings = Columns.from_records(
        [{"pages_to_scan": r.pages_to_scan, "sleep_millisecs": r.sleep_millisecs,
          "advisor_mode": "scan-time" if r.advisor else "none",
          "full_scan_seconds": r.full_scan_seconds,
          "steady_state_seconds": r.steady_state_seconds, "ksmd_cpu_percent": r.cpu_percent,
          "advised_pages_to_scan": r.advised_pages_to_scan} for r in rows],
        list(SETTINGS_COLUMNS))
    best = None
    if ksm.converge_within is not None:
        pick = cheapest(rows, ksm.converge_within)
        best = (f"within {_seconds(ksm.converge_within)}, the cheapest: {pick.describe()}"
                if pick else
            f"none of the settings tried reaches steady state within "
            f"{_seconds(ksm.converge_within)}")
    empty = Columns.from_records([], list(STABILITY_COLUMNS))
    tuners = machine.get("tuners")
    fights = tuner_conflicts({"advisor_mode": knobs.advisor_mode},
                             [t for t in tuners if isinstance(t, str)]
                             if isinstance(tuners, list) else [])
    return OverTime(trajectory, knobs, rules, said, stability_table or empty,
                    late_duplicates, settings, best, [f"recorded on the host: {w}" for w in fights])


def _full_scan_seconds(scans: Scans) -> float:
    """The replay's pace: its last :data:`PACE_SCANS` full scans' mean time (as the grid's)."""
    wall = np.diff(scans["time_seconds"], prepend=0.0)[-PACE_SCANS:]
    return float(wall.mean()) if len(wall) else 0.0


def _cpu_percent(scans: Scans) -> float:
    """ksmd CPU % over the replay's last :data:`PACE_SCANS` full scans, as the grid's pace:
    CPU seconds over wall seconds."""
    wall = np.diff(scans["time_seconds"], prepend=0.0)[-PACE_SCANS:]
    cpu = scans["ksmd_cpu_percent"][-PACE_SCANS:] * wall
    return float(cpu.sum() / wall.sum()) if wall.sum() > 0 else 0.0


class _Advised:
    """The scan-time advisor fed as the kernel feeds it: a scan timed from its first batch
    to its last (:func:`~ksm_analyze.ksmd.cost.advisor_scan_seconds`)."""

    def __init__(self, knobs: Knobs, cost: CpuCost) -> None:
        self.advisor, self.knobs, self.cost = Advisor(knobs), knobs, cost

    @property
    def pages_to_scan(self) -> int:
        return self.advisor.pages_to_scan

    def after_scan(self, wall_seconds: float, cpu_seconds: float) -> int:
        sleep = replace(self.knobs, pages_to_scan=self.pages_to_scan)
        measured = advisor_scan_seconds(ScanTime(wall_seconds, cpu_seconds, 0), sleep,
                                        self.cost)
        return self.advisor.after_scan(measured, cpu_seconds)


def _scanned_pages(scans: Scans) -> int:
    """Pages a full scan visits, leaving out those only the first scan visits (zero THP
    subpages: :attr:`~ksm_analyze.ksmd.timeline.Timeline.first_scan_only`)."""
    items = scans["ksm_rmap_items"]
    return int(items[1:].max()) if len(items) > 1 else int(items[0])


def _seconds(value: float) -> str:
    return f"{value:g} s" if math.isfinite(value) else "ever"

