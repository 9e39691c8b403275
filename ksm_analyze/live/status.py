"""``ksm_status()``: the running kernel's KSM counters beside a prediction, with the difference.

Users run it after turning KSM on, to see how the prediction made from a snapshot held. The
host-wide counters cover every process KSM merges, not only the captured ones; the
per-process rows (``/proc/PID/ksm_stat``) compare like with like.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from ..analysis import Analysis
from ..eligibility import Scope
from ..errors import KsmAnalyzeError
from ..formats import open_inputs
from ..ksm import KSM_STAT_FIELDS, KsmSettings
from ..options import DEFAULT_OPTIONS
from ..pipeline import analyze
from . import procfs
from .procfs import ksm_stat, ksm_sysfs, process_facts

__all__ = ["HOST_COUNTERS", "WATCHED_COUNTERS", "KsmStatus", "KsmWatch", "ksm_status",
           "read_counters", "watch"]

HOST_COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                 "ksm_zero_pages", "general_profit")
KNOBS = ("run", "pages_to_scan", "sleep_millisecs", "max_page_sharing", "use_zero_pages",
         "merge_across_nodes", "smart_scan", "full_scans")


@dataclass
class KsmStatus:
    """The kernel's KSM state, and how a prediction compares with it.

    Attributes:
        knobs: the KSM settings and ``full_scans`` as the kernel shows them.
        host: one row per counter; columns ``actual`` and, with snapshots, ``predicted``,
            ``difference`` (actual - predicted) and ``difference_percent``.
        processes: with snapshots, one row per captured process still running: ``input``,
            ``pid``, then ``<field>_predicted`` / ``<field>_actual`` for each ksm_stat field.
        analysis: the prediction (None without snapshots).
    """

    knobs: dict[str, int | str]
    host: pd.DataFrame
    processes: pd.DataFrame
    analysis: Analysis | None = None


def ksm_status(
    snapshots: Sequence[str | os.PathLike[str]] = (), *, scope: str | Scope = DEFAULT_OPTIONS.scope
) -> KsmStatus:
    """Read ``/sys/kernel/mm/ksm`` and compare it with a prediction from ``snapshots``.

    The prediction uses the kernel's current ``max_page_sharing`` and ``use_zero_pages``.

    Raises:
        KsmAnalyzeError: the kernel has no KSM, or a snapshot cannot be read.
    """
    sysfs = ksm_sysfs()
    if sysfs is None:
        raise KsmAnalyzeError("/sys/kernel/mm/ksm: no such directory (kernel built without KSM)")
    knobs = {k: sysfs[k] for k in KNOBS if k in sysfs}
    actual = {k: int(sysfs[k]) for k in HOST_COUNTERS if k in sysfs}
    host = pd.DataFrame({"actual": pd.Series(actual, dtype="int64")})
    host.index.name = "counter"
    if not snapshots:
        return KsmStatus(knobs, host, pd.DataFrame())

    defaults = KsmSettings()  # for kernels that lack a knob
    kernel = replace(defaults,
                     max_page_sharing=int(sysfs.get("max_page_sharing", defaults.max_page_sharing)),
                     use_zero_pages=bool(int(sysfs.get("use_zero_pages", defaults.use_zero_pages))))
    result = analyze(list(snapshots), ksm=kernel, scope=scope)
    predicted = result.counters.as_dict()
    host["predicted"] = [predicted[k] for k in host.index]
    host["difference"] = host["actual"] - host["predicted"]
    host["difference_percent"] = [
        100.0 * d / p if p else (0.0 if d == 0 else float("inf"))
        for d, p in zip(host["difference"], host["predicted"], strict=True)
    ]
    return KsmStatus(knobs, host, _processes(result, snapshots), result)


def _processes(result: Analysis, snapshots: Sequence[str | os.PathLike[str]]) -> pd.DataFrame:
    captured = {}  # input name -> (pid, start time) of every process in the snapshots
    for path in snapshots:
        for reader in open_inputs(path):
            with reader:
                proc = getattr(reader, "process", None)
                if proc is not None:
                    captured[reader.name] = (int(proc["pid"]), proc.get("start_time"))
    rows = []
    for r in result.per_input.itertuples():
        if r.input not in captured:
            continue
        pid, start_time = captured[r.input]
        try:
            alive = process_facts(pid)["start_time"] == start_time
        except KsmAnalyzeError:
            alive = False
        stat = ksm_stat(pid) if alive else None
        if stat is None:
            continue  # gone, or a new process under the same PID
        row: dict[str, object] = {"input": r.input, "pid": pid}
        for f in KSM_STAT_FIELDS:
            row[f"{f}_predicted"] = getattr(r, f)
            row[f"{f}_actual"] = stat.get(f)
        rows.append(row)
    return pd.DataFrame(rows)


# -- ksm-status --watch -----------------------------------------------------------------------

WATCHED_COUNTERS = ("pages_to_scan", "pages_shared", "pages_sharing", "pages_unshared",
                    "pages_volatile", "ksm_zero_pages", "general_profit")
"""What a watch reads at each reading besides ``full_scans``: the counters (a kernel that
lacks one, ``ksm_zero_pages`` before 6.10 or ``general_profit`` before 6.7, goes without)
and ``pages_to_scan``, which the scan-time advisor rewrites after each full scan."""

FROM_START, STEADY = "from_start", "steady_state"
"""How a watch aligns the prediction with the kernel (:attr:`KsmWatch.alignment`)."""


def read_counters(directory: str | os.PathLike[str] | None = None) -> dict[str, int]:
    """``full_scans`` and :data:`WATCHED_COUNTERS` from ``directory`` (``/sys/kernel/mm/ksm``
    by default), as ints; a counter the kernel lacks is left out.

    Raises:
        KsmAnalyzeError: no such directory (a kernel without KSM), or no ``full_scans``.
    """
    d = Path(directory) if directory is not None else procfs.KSM_SYSFS
    out: dict[str, int] = {}
    for name in ("full_scans", *WATCHED_COUNTERS):
        try:
            out[name] = int((d / name).read_text().split()[0])
        except FileNotFoundError:
            continue
        except (OSError, ValueError, IndexError) as e:
            raise KsmAnalyzeError(f"{d / name}: cannot read the counter: {e}") from None
    if "full_scans" not in out:
        raise KsmAnalyzeError(f"{d}/full_scans: no such file (kernel built without KSM)"
                              if not d.is_dir() else f"{d}/full_scans: no such file")
    return out


def _kernel_settings(directory: Path) -> KsmSettings:
    """The KSM knobs ``directory`` shows, as the prediction takes them (a knob the kernel
    lacks keeps its default)."""
    values: dict[str, object] = {}
    for name, kind in (("max_page_sharing", int), ("use_zero_pages", bool),
                       ("pages_to_scan", int), ("sleep_millisecs", int), ("smart_scan", bool),
                       ("advisor_mode", str)):
        try:
            text = (directory / name).read_text().strip()
        except OSError:
            continue
        if kind is str:  # "[none] scan-time": the bracketed choice
            values[name] = text[text.find("[") + 1 : text.find("]")] if "[" in text else text
        else:
            values[name] = bool(int(text)) if kind is bool else int(text)
    return replace(KsmSettings(), **values)  # type: ignore[arg-type]


class KsmWatch:
    """The kernel's KSM counters read over time, beside a prediction's trajectory.

    ``prediction`` is a replay of ksmd from a fresh start (:attr:`Analysis.timeline`: one
    row per full scan, ``full_scans`` counting from 1). The first reading decides how it is
    aligned with the kernel (:attr:`alignment`):

    - ``from_start``: KSM had merged nothing when the watch began (``pages_shared`` and
      ``ksm_zero_pages`` 0), so it is taken to start then (``echo 1 > run`` after the watch
      began): a reading after k full scans since the watch began is set beside the replay's
      row for k full scans (none before the first ends; the last row once past it).
    - ``steady_state``: KSM was already merging; every reading is set beside the replay's
      last row, its steady state.

    Use :meth:`readings` (or :func:`watch`), then :attr:`frame`.
    """

    def __init__(self, prediction: pd.DataFrame | None = None, *,
                 directory: str | os.PathLike[str] | None = None,
                 analysis: Analysis | None = None) -> None:
        self.directory = Path(directory) if directory is not None else procfs.KSM_SYSFS
        self.prediction = prediction
        self.analysis = analysis
        self.alignment: str | None = None
        self.start: dict[str, int] | None = None
        self.counters: tuple[str, ...] = ()
        self._began = 0.0
        self._rows: list[dict[str, object]] = []

    @classmethod
    def of(cls, inputs: Sequence[str | os.PathLike[str]] = (), *,
           directory: str | os.PathLike[str] | None = None,
           scope: str | Scope = DEFAULT_OPTIONS.scope) -> KsmWatch:
        """A watch of ``directory`` beside the prediction for ``inputs`` (snapshots,
        fingerprint files, a series of them), made with the knobs the kernel shows now:
        ``max_page_sharing``, ``use_zero_pages``, ``pages_to_scan``, ``sleep_millisecs``,
        ``smart_scan``, ``advisor_mode``. No inputs: the kernel's counters alone.

        Raises:
            KsmAnalyzeError: no KSM in ``directory``, or an input cannot be read.
        """
        d = Path(directory) if directory is not None else procfs.KSM_SYSFS
        read_counters(d)  # KSM is there: fail before the analysis, not after
        if not inputs:
            return cls(directory=d)
        result = analyze(list(inputs), ksm=_kernel_settings(d), scope=scope)
        return cls(result.timeline, directory=d, analysis=result)

    def read(self, clock: Callable[[], float] = time.monotonic) -> dict[str, object]:
        """One reading now: ``time_seconds`` and ``full_scans`` since the watch began, then
        ``<counter>_actual`` and, with a prediction, ``<counter>_predicted`` (None where
        there is none yet)."""
        now = read_counters(self.directory)
        if self.start is None:
            self.start, self._began = now, clock()
            self.counters = tuple(c for c in WATCHED_COUNTERS if c in now)
            merged = now.get("pages_shared", 0) or now.get("ksm_zero_pages", 0)
            self.alignment = STEADY if merged else FROM_START
        scans = max(now["full_scans"] - self.start["full_scans"], 0)
        row: dict[str, object] = {"time_seconds": round(clock() - self._began, 3),
                                  "full_scans": scans}
        predicted = self._predicted(scans)
        for c in self.counters:
            row[f"{c}_actual"] = now.get(c)
            if self.prediction is not None:
                row[f"{c}_predicted"] = (None if predicted is None or c not in predicted
                                         else int(predicted[c]))
        self._rows.append(row)
        return row

    def _predicted(self, scans: int) -> pd.Series | None:
        """The prediction's row for ``scans`` full scans since KSM started (its last row in
        steady state, or past its end); None before the first full scan ends."""
        tl = self.prediction
        if tl is None or not len(tl):
            return None
        if self.alignment == STEADY:
            return tl.iloc[-1]
        if scans < 1:
            return None
        at = tl.index[tl["full_scans"] == scans]
        return tl.loc[at[0]] if len(at) else (tl.iloc[-1] if scans > tl["full_scans"].max()
                                               else None)

    def readings(self, interval: float, count: int | None = None,
                 duration: float | None = None, *,
                 sleep: Callable[[float], None] | None = None,
                 clock: Callable[[], float] | None = None) -> Iterator[dict[str, object]]:
        """Read every ``interval`` seconds: ``count`` readings, or those that start within
        ``duration`` seconds (``ceil(duration / interval)``, at least one), or without end.
        A reading late (a slow read, a busy host) is taken at once, and the next keep their
        times: reading i is due ``i * interval`` after the first. ``sleep`` and ``clock``:
        ``time.sleep`` and ``time.monotonic`` (looked up at the call)."""
        sleep = sleep or time.sleep
        clock = clock or time.monotonic
        if count is None and duration is not None:
            count = max(1, math.ceil(duration / interval)) if interval > 0 else 1
        first = clock()
        i = 0
        while count is None or i < count:
            if i:
                sleep(max(0.0, first + i * interval - clock()))
            yield self.read(clock)
            i += 1

    @property
    def frame(self) -> pd.DataFrame:
        """The readings so far, one row each: ``time_seconds``, ``full_scans`` (since the
        watch began), ``<counter>_actual`` (int64) and, with a prediction,
        ``<counter>_predicted`` (Int64: NA before the first full scan ends)."""
        columns = ["time_seconds", "full_scans"]
        for c in self.counters:
            columns += [f"{c}_actual"] + ([f"{c}_predicted"] if self.prediction is not None
                                          else [])
        df = pd.DataFrame(self._rows, columns=columns)
        return df.astype({c: "float64" if c == "time_seconds" else
                          "Int64" if c.endswith("_predicted") else "int64" for c in columns})


def watch(inputs: Sequence[str | os.PathLike[str]] = (), interval: float = 1.0,
          count: int | None = None, duration: float | None = None, *,
          directory: str | os.PathLike[str] | None = None,
          scope: str | Scope = DEFAULT_OPTIONS.scope) -> Iterator[dict[str, object]]:
    """Readings of the kernel's KSM counters beside the prediction for ``inputs``
    (:class:`KsmWatch`): ``pd.DataFrame(watch(files, 0.5, count=20))`` in a notebook.
    Start it, then turn KSM on (``echo 1 > /sys/kernel/mm/ksm/run``)."""
    yield from KsmWatch.of(inputs, directory=directory, scope=scope).readings(
        interval, count, duration)
