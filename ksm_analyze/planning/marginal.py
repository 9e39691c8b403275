"""Marginal memory: what each input costs the host it is on, and the best host for a new one.

**Added** (``added_bytes``) is the host's memory after KSM with the input less the same
host's memory after KSM without it, each counted as :func:`~ksm_analyze.planning.plan.plan`
counts a host and ``scan`` prints it: pages left after merging (KSM pages under
``max_page_sharing``, unshared pages, zero pages by ``use_zero_pages``) plus one rmap_item per
page ksmd tracks. It is the input's pages that are not already on the host, plus its
rmap_items, plus the KSM pages its copies open where they pass ``max_page_sharing``.

**Freed if it moves away** is the same number: the host's memory after KSM depends only on
which inputs it holds, so taking the input away returns the host to the state it would have
without it (KSM's steady state, once ksmd has scanned again: a KSM page left with one mapping
stays one page, as the unshared page it would otherwise be). Both are shown once, as
``added_bytes``: the analogue of Windows dedup's ``DedupDistinctSize``.

Pricing is incremental (:class:`~ksm_analyze.planning.placement.HostModel`): a host is built
once, then each input is taken off, priced and put back, one pass over that input's content
classes each: a host of k inputs costs about three passes over their classes, not k + 1
pricings of the host.

:func:`add` answers "which host for this new input" against an existing placement (the
``assignments`` table ``plan`` writes): what the new input adds on every host, whether it
fits, and the host where it adds least and fits (ties: the least filled, then the lowest
number), or a new host.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ..analysis import Analysis, json_safe
from ..errors import InputError
from ..units import counted, human_bytes, size_text
from .placement import HostModel, HostState, Placement, unmerged_bytes

__all__ = ["ADD_TABLES", "MARGINAL_COLUMNS", "Addition", "add", "host_marginals",
           "marginal_table", "read_placement"]

ADD_TABLES = ("choices", "options", "hosts")
"""Every table of an :class:`Addition`, in output order."""

MARGINAL_COLUMNS = ["method", "host", "input", "memory_before_bytes", "alone_bytes",
                    "added_bytes", "added_percent"]
"""Columns of ``Plan.marginal`` (with NUMA nodes, ``node`` after ``host``)."""

PLACEMENT_MAX_BYTES = 64 << 20
"""Largest placement file read (an assignments table of a million inputs is ~40 MiB)."""


def host_marginals(model: HostModel, host: HostState) -> list[int]:
    """Bytes each input of ``host`` adds to it (= frees if it moves away), in the order of
    ``host.inputs``: each taken off, the host priced, the input put back."""
    inputs = list(host.inputs)
    total = model.bytes(host)
    added = []
    for i in inputs:
        model.remove(host, i)
        added.append(total - model.bytes(host))
        model.add(host, i)
    return added


def marginal_table(model: HostModel, placement: Placement, names: Sequence[str],
                   n_nodes: int | None = None) -> pd.DataFrame:
    """One row per input of ``placement``: its memory before KSM, its memory after KSM alone
    on a host (``alone_bytes``), what it adds to its host (``added_bytes``, also what moving
    it away frees) and that as a percentage of its memory before KSM.

    With ``n_nodes`` the placement's bins are NUMA nodes, ``n_nodes`` per host (they share
    nothing): ``host`` is the bin over ``n_nodes`` and ``node`` the rest.
    """
    rows = []
    for k, inputs in enumerate(placement.hosts):
        state = model.holding(inputs)
        for i, added in zip(inputs, host_marginals(model, state), strict=True):
            before = model.before([i])
            rows.append({"method": placement.method,
                         "host": k if n_nodes is None else k // n_nodes,
                         **({} if n_nodes is None else {"node": k % n_nodes}),
                         "input": names[i], "memory_before_bytes": before,
                         "alone_bytes": int(model.alone[i]), "added_bytes": added,
                         "added_percent": 100.0 * added / before if before else None})
    columns = MARGINAL_COLUMNS if n_nodes is None else [*MARGINAL_COLUMNS[:2], "node",
                                                        *MARGINAL_COLUMNS[2:]]
    return pd.DataFrame(rows, columns=columns)


# --- the best host for a new input ----------------------------------------------------------


def read_placement(path: str | os.PathLike[str]) -> dict[str, int]:
    """Input name -> host number, from a placement file.

    Accepted: the ``assignments`` table as CSV (``plan --csv DIR`` writes
    ``DIR/assignments.csv``, ``report --host-memory`` writes ``plan_assignments.csv``) or as
    JSON (``plan --json``'s whole output, or its ``assignments`` list alone). Columns
    ``input`` and ``host`` (a whole number) are needed; with a ``method`` column, the rows of
    the sharing-aware placement (``sharing``) are taken, or those of the one method there is.

    Raises:
        InputError: the file cannot be read, is not such a table, or names an input twice.
    """
    def bad(detail: str) -> InputError:
        return InputError(f"{detail} (a placement is the assignments table of `plan --csv` or "
                          "`plan --json`: columns input and host)", path=path)

    try:
        with open(path, "rb") as f:
            data = f.read(PLACEMENT_MAX_BYTES + 1)
    except OSError as e:
        raise InputError(f"cannot read the placement: {e.strerror or e}", path=path) from None
    if len(data) > PLACEMENT_MAX_BYTES:
        raise bad(f"larger than {size_text(PLACEMENT_MAX_BYTES)}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise bad("not UTF-8 text") from None
    if not text.strip():
        raise bad("empty")
    records: Any
    if text.lstrip()[:1] in "[{":
        try:
            records = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise bad(f"not valid JSON ({e})" if isinstance(e, json.JSONDecodeError)
                      else "JSON nested too deeply") from None
        if isinstance(records, dict):
            if "assignments" not in records:
                raise bad("a JSON object without an 'assignments' key")
            records = records["assignments"]
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise bad("'assignments' is not a list of rows")
        frame = pd.DataFrame.from_records(records)
    else:
        try:
            frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
            raise bad(f"not a CSV table ({str(e).splitlines()[0] if str(e) else e})") from None
    missing = [c for c in ("input", "host") if c not in frame.columns]
    if missing:
        raise bad(f"no {' or '.join(repr(c) for c in missing)} column")
    if "node" in frame.columns and any(not pd.isna(v) and str(v).strip()
                                       for v in frame["node"]):
        raise bad("a placement with NUMA nodes (a 'node' column): --add does not place on "
                  "nodes yet")
    if "method" in frame.columns:
        methods = list(dict.fromkeys(frame["method"].astype(str)))
        if "sharing" in methods:
            frame = frame[frame["method"].astype(str) == "sharing"]
        elif len(methods) > 1:
            raise bad(f"{len(methods)} methods ({', '.join(methods)}) and none is 'sharing'")
    if frame.empty:
        raise bad("no rows")
    placement: dict[str, int] = {}
    for name, host in zip(frame["input"], frame["host"], strict=True):
        name = str(name)
        number = _host_number(host)
        if number is None:
            raise bad(f"input {name!r}: host {host!r} is not a host number (0, 1...)")
        if name in placement:
            raise bad(f"input {name!r} is placed twice")
        placement[name] = number
    return placement


def _host_number(value: Any) -> int | None:
    """A host number from a cell (``3``, ``"3"``, ``3.0``), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float):
        return int(value) if value.is_integer() and value >= 0 else None
    text = str(value).strip()
    return int(text) if text.isascii() and text.isdigit() else None


@dataclass(frozen=True)
class Addition:
    """The best host for each new input against an existing placement.

    Attributes:
        options: one row per new input and candidate host: ``new_input``, ``host``,
            ``memory_after_bytes`` (the host's memory after KSM before the new input joins),
            ``added_bytes`` (what the new input adds there), ``fits`` (the host's memory
            after KSM with it is at most ``capacity``), ``headroom_after_bytes`` (capacity
            less that memory; negative where it does not fit), ``chosen``.
        choices: one row per new input, in the order given: ``new_input``, ``host`` (the
            chosen host; a new host gets the next free number), ``new_host`` (True: it fits
            none of the hosts there were), ``memory_before_bytes`` (the new input's pages
            without KSM), ``added_bytes``, ``headroom_after_bytes``.
        hosts: the placement after every new input joined: ``host``, ``inputs``,
            ``input_count``, ``memory_after_bytes``, ``free_bytes``.
        host_memory: bytes per host; ``capacity`` what is left for inputs after the reserve.
        analysis: the analysis of the placed and the new inputs.
        warnings: the analysis' warnings.

    New inputs are placed one after another in the order given: the second is priced
    against the hosts with the first on its chosen host (a new host opened for the first is
    a candidate for the second).
    """

    options: pd.DataFrame
    choices: pd.DataFrame
    hosts: pd.DataFrame
    host_memory: int
    capacity: int
    analysis: Analysis
    warnings: list[str] = field(default_factory=list)

    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table by name, as ``--csv`` writes them."""
        return {name: getattr(self, name) for name in ADD_TABLES}

    def to_dict(self) -> dict[str, Any]:
        """Everything as strict JSON values (``plan --add ... --json``)."""
        out: dict[str, Any] = {
            "host_memory_bytes": self.host_memory, "host_memory_human": human_bytes(self.host_memory),
            "capacity_bytes": self.capacity, "capacity_human": human_bytes(self.capacity),
        }
        out |= {name: df.to_dict(orient="records") for name, df in self.tables().items()}
        if self.analysis.vm_configs:  # as scan --json: each input's VM and KSM's verdict
            out["vm_configs"] = self.analysis.vm_configs
        out["warnings"] = list(self.warnings)
        return {k: json_safe(v) for k, v in out.items()}


def add(analysis: Analysis, placement: dict[str, int], new: Sequence[str], host_memory: int,
        *, reserve: int = 0, zero_pages: bool = True, source: str = "placement"
        ) -> Addition:
    """The best host for each of the ``new`` inputs, against ``placement``.

    Args:
        analysis: what :func:`~ksm_analyze.analyze` returned for the placed inputs and the
            new ones together (its KSM settings are the hosts').
        placement: input name -> host number (:func:`read_placement`), for every input of
            ``analysis`` but the new ones.
        new: the names of the new inputs (as ``analysis.names`` spells them).
        host_memory: bytes per host; ``reserve``: bytes each host keeps for itself.
        zero_pages: count scanned zero pages as host memory (as ``plan``).
        source: how errors name the placement (its file).

    Raises:
        ValueError: a size out of range, a new input unknown or given twice, or one that
            alone does not fit a host.
        InputError: the placement (named by ``source``) places a new input, an input not
            among the inputs, leaves one out, or holds a host that already needs more than
            ``capacity``.
    """
    capacity = host_memory - reserve
    if host_memory <= 0 or reserve < 0 or capacity <= 0:
        raise ValueError(f"a host of {size_text(host_memory)} with a reserve of "
                         f"{size_text(reserve)} leaves no memory for inputs")
    if analysis.options.numa_nodes is not None:
        raise ValueError("--add with --numa-nodes: the best host is not chosen per NUMA node "
                         "yet; add without --numa-nodes")
    names = analysis.names
    index = {n: i for i, n in enumerate(names)}
    unknown_new = [n for n in new if n not in index]
    if unknown_new:
        raise ValueError(f"new input {unknown_new[0]!r} is not among the inputs")
    if len(set(new)) != len(new):
        raise ValueError("a new input is given twice")
    both = [n for n in new if n in placement]
    if both:
        raise InputError(f"{both[0]!r} is placed already, and given as new (--add)",
                         path=source)
    unknown = [n for n in placement if n not in index]
    if unknown:
        raise InputError(f"input {unknown[0]!r} is not among the inputs given "
                         f"({counted(len(unknown), 'placed input')} unknown: give every placed "
                         "input's dump or fingerprint file)", path=source)
    unplaced = [n for n in names if n not in placement and n not in new]
    if unplaced:
        raise InputError(f"input {unplaced[0]!r} is given but not placed here, nor given "
                         "with --add", path=source)
    model = HostModel(analysis.contents, analysis.ksm, zero_pages=zero_pages,
                      unmerged=unmerged_bytes(analysis))  # opted-out VMs: whole, unmerged
    numbers = sorted(set(placement.values()))
    states = {k: model.holding([index[n] for n, h in placement.items() if h == k])
              for k in numbers}
    used = {k: model.bytes(s) for k, s in states.items()}
    over = [k for k in numbers if used[k] > capacity]
    if over:
        k = over[0]
        raise InputError(f"host {k} already needs {size_text(used[k])} after KSM, more than "
                         f"the {size_text(capacity)} a host holds for inputs (--host-memory "
                         "less --reserve)", path=source)
    options, choices = [], []
    for name in new:
        i = index[name]
        hosts = sorted(states)
        added = (model.marginals([states[k] for k in hosts], i).tolist() if hosts else [])
        fits = [used[k] + a <= capacity for k, a in zip(hosts, added, strict=True)]
        fitting = [(a, used[k], k) for k, a, f in zip(hosts, added, fits, strict=True) if f]
        if fitting:
            _, _, chosen = min(fitting)  # least added, then least filled, then lowest number
            extra, fresh = int(added[hosts.index(chosen)]), False
        else:
            chosen, extra, fresh = (max(hosts) + 1 if hosts else 0), int(model.alone[i]), True
        for k, a, f in zip(hosts, added, fits, strict=True):
            options.append({"new_input": name, "host": k, "memory_after_bytes": used[k],
                            "added_bytes": int(a), "fits": f,
                            "headroom_after_bytes": capacity - used[k] - int(a),
                            "chosen": k == chosen})
        if fresh:
            if extra > capacity:
                raise ValueError(f"new input {name!r} alone needs {size_text(extra)} after KSM, "
                                 f"more than a host holds: {size_text(capacity)}")
            states[chosen], used[chosen] = model.empty(), 0
        model.add(states[chosen], i)
        used[chosen] += extra
        choices.append({"new_input": name, "host": chosen, "new_host": fresh,
                        "memory_before_bytes": model.before([i]), "added_bytes": extra,
                        "headroom_after_bytes": capacity - used[chosen]})
    hosts_rows = [{"host": k, "inputs": [names[i] for i in sorted(states[k].inputs)],
                   "input_count": len(states[k].inputs), "memory_after_bytes": used[k],
                   "free_bytes": capacity - used[k]} for k in sorted(states)]
    return Addition(
        options=pd.DataFrame(options, columns=["new_input", "host", "memory_after_bytes",
                                               "added_bytes", "fits", "headroom_after_bytes",
                                               "chosen"]),
        choices=pd.DataFrame(choices, columns=["new_input", "host", "new_host",
                                               "memory_before_bytes", "added_bytes",
                                               "headroom_after_bytes"]),
        hosts=pd.DataFrame(hosts_rows, columns=["host", "inputs", "input_count",
                                                "memory_after_bytes", "free_bytes"]),
        host_memory=host_memory, capacity=capacity, analysis=analysis,
        warnings=list(analysis.warnings))
