"""``ksm_status()``: the running kernel's KSM counters beside a prediction, with the difference.

Users run it after turning KSM on, to see how the prediction made from a snapshot held. The
host-wide counters cover every process KSM merges, not only the captured ones; the
per-process rows (``/proc/PID/ksm_stat``) compare like with like.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import pandas as pd

from ..analysis import Analysis
from ..eligibility import Scope
from ..errors import KsmAnalyzeError
from ..formats import open_inputs
from ..ksm import KSM_STAT_FIELDS, KsmSettings
from ..options import DEFAULT_OPTIONS
from ..pipeline import analyze
from .procfs import ksm_stat, ksm_sysfs, process_facts

__all__ = ["HOST_COUNTERS", "KsmStatus", "ksm_status"]

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
