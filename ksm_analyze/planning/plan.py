"""``plan()``: hosts for a set of guests, with and without sharing-aware placement.

Built on one analysis of every input (the core table); placements and projections are
computed from it (:mod:`~ksm_analyze.planning.placement`, :mod:`~ksm_analyze.planning.projection`) without
reading a dump again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..analysis import Analysis, json_safe
from ..ksm import memory_after
from ..units import counted, human_bytes, size_text
from .marginal import marginal_table
from .overcommit import overcommit
from .placement import (
    CompressedModel,
    HostModel,
    Placement,
    first_fit,
    host_tables,
    lower_bound,
    place,
    place_compressed,
    spread,
    unmerged_bytes,
)
from .projection import Projection

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["PLAN_TABLES", "Plan", "plan"]

PLAN_TABLES = ("summary", "hosts", "assignments", "marginal", "projection", "overcommit", "nodes")
"""Every table of a :class:`Plan`, in output order."""


@dataclass(frozen=True)
class Plan:
    """Hosts for the inputs of an analysis: a sharing-aware placement beside first-fit.

    Attributes:
        summary: one row per method (``sharing``, ``first_fit``, ``lower_bound``):
            ``method``, ``hosts``, ``memory_after_bytes`` (all hosts), ``hosts_saved``
            and ``hosts_saved_percent`` (against first-fit; None for the sharing-aware
            row under ``hosts_asked``: that count was given, not found), ``overcommit``
            (the guests' memory over the hosts' memory: each input's described size).
        hosts: one row per host of each placement: ``method``, ``host``, ``inputs``
            (a list of the inputs' names; separated by spaces in CSV), ``input_count``, ``memory_before_bytes`` (the scanned
            pages without KSM: also the worst case, when every merged page is written
            again), ``memory_after_bytes`` (the number ``scan`` prints for these inputs:
            pages after merging plus rmap_items), ``saved_bytes``, ``free_bytes`` (of
            ``capacity``), ``worst_case_fits`` (memory before KSM fits the host),
            ``unmerged_bytes`` (of ``memory_after_bytes``: the bytes of its inputs whose VM
            configuration opts out of KSM, held whole; ``memory_after_bytes`` is ``scan``
            of its inputs plus these, see ``unmerged_inputs``).
        assignments: ``method``, ``input``, ``host``: one row per input and method.
        marginal: one row per input and method: ``method``, ``host`` (with NUMA nodes,
            ``node``), ``input``, ``memory_before_bytes`` (its pages without KSM),
            ``alone_bytes`` (its memory after KSM alone on a host), ``added_bytes`` (the
            host's memory after KSM less that of the host without it: what it adds there,
            and the same, exactly, is what moving it away frees) and ``added_percent`` (of
            its memory before KSM; None for an input of no pages)
            (:mod:`~ksm_analyze.planning.marginal`).
        nodes: with ``numa_nodes``, one row per NUMA node of each host of each placement:
            ``method``, ``host``, ``node`` (0 to ``numa_nodes``-1), then the columns of
            ``hosts`` for that node alone (``free_bytes`` of the node's share of
            ``capacity``); empty without.
        projection: inputs per host (:meth:`~ksm_analyze.planning.projection.Projection.table`);
            empty unless counts were asked for.
        overcommit: the memory overcommit ratio a host can run at, per workload family and
            host size, with its band (:func:`~ksm_analyze.planning.overcommit.overcommit`;
            the number to set: :func:`~ksm_analyze.planning.overcommit.supported_ratio`).
        fits: guests like the samples that fit one host: (expected, cautious, hopeful);
            None unless projected.
        warnings: the analysis' warnings (nearly identical inputs among them), then the
            plan's own (hosts whose copy-on-write worst case does not fit).
        host_memory: bytes per host; ``capacity`` what is left for guests after the reserve.
        hosts_asked: the sharing-aware placement was spread over exactly this many hosts
            (``hosts=``); None: as few as it could.
        analysis: the analysis every number comes from.
        numa_nodes: the analysis' ``numa_nodes``: each host is that many NUMA nodes of
            ``capacity / numa_nodes`` with ``merge_across_nodes=0``, each input pinned to
            one node and sharing only with the inputs of its node; the placements pack
            nodes, and a host is ``numa_nodes`` nodes in placement order. None: no nodes.
        zero_pages: scanned zero pages counted as host memory (True) or as never touched.
        compressed_hosts: with an analysis made with ``compress`` (``plan --compress``),
            the hosts of the ``sharing_zram`` placement, where a host's footprint is its
            distinct non-zero contents as zram stores them: ``method``, ``host``,
            ``inputs``, ``input_count``, ``memory_before_bytes``, ``zram_bytes``,
            ``free_bytes``; empty without. Its summary row is ``sharing_zram``.
        unmerged_inputs: one record per input whose VM configuration opts out of KSM
            (``--vm-config``, exclusion rule ``vm_config``), which every host, marginal and
            ratio counts as resident memory KSM never merges: ``input``, ``unmerged_bytes``
            (:func:`~ksm_analyze.planning.placement.unmerged_bytes`), ``unmerged_human``,
            ``reasons`` (why KSM will not scan it, from its configuration). ``--json``
            also carries ``vm_configs`` (every input's record, as ``scan --json``) when
            configurations were given.
    """

    summary: pd.DataFrame
    hosts: pd.DataFrame
    assignments: pd.DataFrame
    projection: pd.DataFrame
    host_memory: int
    capacity: int
    analysis: Analysis
    fits: tuple[int, int, int] | None = None
    warnings: list[str] = field(default_factory=list)
    zero_pages: bool = True
    hosts_asked: int | None = None
    numa_nodes: int | None = None
    nodes: pd.DataFrame = field(default_factory=pd.DataFrame)
    compressed_hosts: pd.DataFrame = field(default_factory=pd.DataFrame)
    marginal: pd.DataFrame = field(default_factory=pd.DataFrame)
    overcommit: pd.DataFrame = field(default_factory=pd.DataFrame)
    unmerged_inputs: list[dict[str, Any]] = field(default_factory=list)

    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table by name (:data:`PLAN_TABLES`), as ``--csv`` writes them (``nodes``
        only with ``numa_nodes``)."""
        return {name: getattr(self, name) for name in PLAN_TABLES
                if name != "nodes" or self.numa_nodes is not None}

    def to_dict(self) -> dict[str, Any]:
        """Everything as strict JSON values (``plan --json``)."""
        fits = None if self.fits is None else dict(zip(("expected", "cautious", "hopeful"),
                                                        self.fits, strict=True))
        out: dict[str, Any] = {
            "host_memory_bytes": self.host_memory, "host_memory_human": human_bytes(self.host_memory),
            "capacity_bytes": self.capacity, "capacity_human": human_bytes(self.capacity),
            "hosts_asked": self.hosts_asked, "inputs_per_host": fits,
        }
        out |= {name: df.to_dict(orient="records") for name, df in self.tables().items()}
        if len(self.compressed_hosts):
            out["compressed_hosts"] = self.compressed_hosts.to_dict(orient="records")
        out["unmerged_inputs"] = list(self.unmerged_inputs)
        if self.analysis.vm_configs:  # as scan --json: each input's VM and KSM's verdict
            out["vm_configs"] = self.analysis.vm_configs
        out["warnings"] = list(self.warnings)
        return {k: json_safe(v) for k, v in out.items()}

    def charts(self) -> dict[str, Callable[[], Figure]]:
        """Every chart by name: ``hosts``, and ``projection`` when one was made."""
        charts = {"hosts": self.plot_hosts}
        if len(self.projection):
            charts["projection"] = self.plot_projection
        return charts

    # Charts live in render/ (the one deliberate upward edge, as on Analysis).
    def plot_hosts(self) -> Figure:
        """Stacked bars per host of each method: memory after KSM, saved, free."""
        from ..render.plots import plot_hosts

        return plot_hosts(self)

    def plot_projection(self) -> Figure:
        """Host memory against the number of guests, with and without KSM."""
        from ..render.plots import plot_projection

        return plot_projection(self)


def plan(
    analysis: Analysis,
    host_memory: int,
    *,
    reserve: int = 0,
    hosts: int | None = None,
    zero_pages: bool = True,
    project: Sequence[int] = (),
    orders: int = 200,
    host_sizes: Sequence[int] = (),
) -> Plan:
    """Place the inputs of ``analysis`` on hosts of ``host_memory`` bytes.

    Args:
        analysis: what :func:`~ksm_analyze.analyze` returned for every input (its KSM
            settings and scope are the plan's).
        host_memory: bytes of memory per host.
        reserve: bytes each host keeps for itself (the rest is ``capacity``).
        hosts: spread onto exactly this many hosts, each holding an input, instead of as
            few as possible (:func:`~ksm_analyze.planning.placement.spread`).
        zero_pages: count scanned zero pages as host memory (``scan``'s ``with_zero_pages``
            column, the default); False: as never touched.
        project: guest counts to project host memory for (inputs per host).
        orders: random orders of the samples the projection measures.
        host_sizes: more host sizes (bytes) for the ``overcommit`` table, beside
            ``host_memory``; each keeps the same share of its memory for itself as
            ``reserve`` is of ``host_memory``.

    Raises:
        ValueError: a size out of range, an input that alone does not fit a host, more
            ``hosts`` than inputs, or inputs that do not fit on ``hosts`` hosts.
    """
    capacity = host_memory - reserve
    if host_memory <= 0 or reserve < 0 or capacity <= 0:
        raise ValueError(f"a host of {size_text(host_memory)} with a reserve of "
                         f"{size_text(reserve)} leaves no memory for inputs")
    bad = [s for s in host_sizes if s <= 0 or s * reserve // host_memory >= s]
    if bad:
        raise ValueError(f"--host-sizes: a host of {size_text(bad[0])} leaves no memory for "
                         "inputs")
    if hosts is not None and hosts < 1:
        raise ValueError(f"--hosts must be at least 1, not {hosts}")
    if hosts is not None and hosts > len(analysis.names):  # before anything is sized by it
        raise ValueError(f"--hosts {hosts:,} is more hosts than the "
                         f"{counted(len(analysis.names), 'input')}: every host needs at least "
                         "one")
    # With NUMA nodes (merge_across_nodes=0) a placement packs nodes of capacity / N, each
    # sharing only within itself: the table merged across nodes, placed into node-sized bins.
    n_nodes = analysis.options.numa_nodes or 1
    numa = analysis.options.numa_nodes is not None and analysis.across_nodes is not None
    if numa and project:
        raise ValueError("--project with --numa-nodes: the projection does not model NUMA "
                         "nodes; plan without --project")
    if numa and hosts is not None and hosts * n_nodes > len(analysis.names):
        raise ValueError(f"--hosts {hosts:,} of {counted(n_nodes, 'NUMA node')} is more nodes "
                         f"than the {counted(len(analysis.names), 'input')}: every node needs "
                         "at least one")
    table = analysis.across_nodes if numa and analysis.across_nodes is not None else \
        analysis.contents
    bin_capacity = capacity // n_nodes if numa else capacity
    unmerged = unmerged_bytes(analysis)  # opted-out VMs: resident, never merged
    model = HostModel(table, analysis.ksm, zero_pages=zero_pages, unmerged=unmerged)
    names = analysis.names
    guest_bytes = [int(b) for b in analysis.per_input["bytes"]]
    sharing = (place(model, bin_capacity) if hosts is None
               else spread(model, bin_capacity, hosts * (n_nodes if numa else 1)))
    placements = [sharing, first_fit(model, bin_capacity)]
    host_rows, node_rows, assignments, summary, marginal = [], [], [], [], []
    host_counts = {}
    for p in placements:
        if numa:
            nodes_frame = _host_frame(p, model, bin_capacity, names, zero_pages)
            frame = _numa_hosts(nodes_frame, n_nodes, capacity)
            node_rows.append(nodes_frame.assign(host=nodes_frame["host"] // n_nodes,
                                                node=nodes_frame["host"] % n_nodes))
            assignments += [{"method": p.method, "input": names[i], "host": k // n_nodes,
                             "node": k % n_nodes}
                            for k, inputs in enumerate(p.hosts) for i in inputs]
        else:
            frame = _host_frame(p, model, capacity, names, zero_pages)
            assignments += [{"method": p.method, "input": names[i], "host": k}
                            for k, inputs in enumerate(p.hosts) for i in inputs]
        host_rows.append(frame)
        marginal.append(marginal_table(model, p, names, n_nodes if numa else None))
        host_counts[p.method] = len(frame)
        summary.append({"method": p.method, "hosts": len(frame),
                        "memory_after_bytes": int(frame["memory_after_bytes"].sum()),
                        "overcommit": sum(guest_bytes) / (len(frame) * host_memory)})
    bound = lower_bound(model, capacity)
    summary.append({"method": "lower_bound", "hosts": bound,
                    "memory_after_bytes": model.footprint(range(model.n)),
                    "overcommit": sum(guest_bytes) / (bound * host_memory)})
    zram_hosts = pd.DataFrame()
    if analysis.compressed is not None:  # plan --compress: hosts with zram too
        zmodel = CompressedModel(analysis.contents, analysis.compressed)
        zplaced = place_compressed(zmodel, capacity)
        zram_hosts = pd.DataFrame([
            {"method": zplaced.method, "host": k, "inputs": [names[i] for i in inputs],
             "input_count": len(inputs), "memory_before_bytes": model.before(inputs),
             "zram_bytes": zmodel.footprint(inputs),
             "free_bytes": capacity - zmodel.footprint(inputs)}
            for k, inputs in enumerate(zplaced.hosts)])
        assignments += [{"method": zplaced.method, "input": names[i], "host": k}
                        for k, inputs in enumerate(zplaced.hosts) for i in inputs]
        summary.append({"method": zplaced.method, "hosts": len(zplaced.hosts),
                        "memory_after_bytes": int(zram_hosts["zram_bytes"].sum()),
                        "overcommit": sum(guest_bytes) / (len(zplaced.hosts) * host_memory)})
    table = pd.DataFrame(summary)
    baseline = host_counts["first_fit"]
    # Hosts a method saves against first-fit; not for a count that was given (--hosts).
    given = (table["method"] == "sharing") & (hosts is not None)
    table["hosts_saved"] = pd.Series([None if g else int(baseline - n) for g, n in zip(
        given, table["hosts"], strict=True)], dtype=object)  # integers, None where given
    table["hosts_saved_percent"] = [None if g else 100.0 * (baseline - n) / baseline
                                    for g, n in zip(given, table["hosts"], strict=True)]
    hosts_df = pd.concat(host_rows, ignore_index=True)
    over = hosts_df[(hosts_df["method"] == "sharing") & ~hosts_df["worst_case_fits"]]
    # The analysis' warnings first (nearly identical inputs mislead the projection below).
    one = len(over) == 1
    warnings = list(analysis.warnings) + ([] if over.empty else [
        (f"{len(over)} of {counted(host_counts['sharing'], 'sharing-aware host')} "
         f"({'host' if one else 'hosts'} {', '.join(map(str, over['host']))}) would need more "
         f"than {'its' if one else 'their'} {size_text(capacity)} if every merged page were "
         "written again (the copy-on-write worst case is memory before KSM, up to "
         f"{size_text(int(over['memory_before_bytes'].max()))}): keep headroom or swap")])
    projection = Projection(model, orders=orders) if project else None
    sizes = [(s, s - s * reserve // host_memory) for s in sorted({host_memory, *host_sizes})]
    sizes = [(s, capacity if s == host_memory else kept) for s, kept in sizes]
    ratios = overcommit(analysis, model, sizes, zero_pages=zero_pages,
                        nodes=n_nodes if numa else 1, orders=orders, whole=projection)
    return Plan(
        summary=table,
        hosts=hosts_df,
        assignments=pd.DataFrame(assignments, columns=["method", "input", "host",
                                                       *(["node"] if numa else [])]),
        projection=projection.table(project) if projection else pd.DataFrame(),
        host_memory=host_memory,
        capacity=capacity,
        analysis=analysis,
        fits=projection.fits(capacity) if projection else None,
        warnings=warnings,
        zero_pages=zero_pages,
        hosts_asked=hosts,
        numa_nodes=analysis.options.numa_nodes if numa else None,
        nodes=pd.concat(node_rows, ignore_index=True)[_NODE_COLUMNS] if numa else
        pd.DataFrame(),
        compressed_hosts=zram_hosts,
        marginal=pd.concat(marginal, ignore_index=True),
        overcommit=ratios,
        unmerged_inputs=_unmerged_inputs(analysis, unmerged),
    )


def _unmerged_inputs(analysis: Analysis, unmerged: np.ndarray) -> list[dict[str, Any]]:
    """:attr:`Plan.unmerged_inputs`: the inputs counted whole and unmerged, and why."""
    records = analysis.vm_configs or [{} for _ in analysis.names]
    return [{"input": name, "unmerged_bytes": int(b), "unmerged_human": human_bytes(int(b)),
             "reasons": list(r.get("reasons", []))}
            for name, b, r in zip(analysis.names, unmerged, records, strict=True)
            if not r.get("eligible", True)]


_NODE_COLUMNS = ["method", "host", "node", "inputs", "input_count", "memory_before_bytes",
                 "memory_after_bytes", "private_bytes", "shared_bytes", "rmap_bytes",
                 "saved_bytes", "free_bytes", "worst_case_fits", "unmerged_bytes"]


def _numa_hosts(nodes: pd.DataFrame, n_nodes: int, capacity: int) -> pd.DataFrame:
    """Hosts of ``n_nodes`` NUMA nodes from the rows of the nodes (``host`` numbering the
    nodes in placement order): each host the sum of its nodes, which share nothing."""
    rows = []
    for k, group in nodes.groupby(nodes["host"] // n_nodes, sort=True):
        row = {"method": group["method"].iloc[0], "host": int(k),
               "inputs": [n for inputs in group["inputs"] for n in inputs],
               **{c: int(group[c].sum()) for c in ("input_count", "memory_before_bytes",
                                                    "memory_after_bytes", "private_bytes",
                                                    "shared_bytes", "rmap_bytes",
                                                    "saved_bytes")}}
        row["free_bytes"] = capacity - row["memory_after_bytes"]
        row["worst_case_fits"] = row["memory_before_bytes"] <= capacity
        row["unmerged_bytes"] = int(group["unmerged_bytes"].sum())
        rows.append(row)
    return pd.DataFrame(rows)


def _host_frame(p: Placement, model: HostModel, capacity: int, names: list[str],
                zero_pages: bool) -> pd.DataFrame:
    rows = []
    ps = model.table.page_size
    for k, (inputs, table) in enumerate(zip(p.hosts, host_tables(model.table, p.hosts),
                                            strict=True)):
        c = table.counters(model.settings, zero_pages=zero_pages)
        # Pages left after merging (KSM pages and unshared pages) plus rmap_items: the same
        # number as the model's footprint, and as scan's memory after KSM, from the counters;
        # plus the inputs KSM never scans (their VM opted out), whole.
        before = model.before(inputs)
        unmerged = int(model.unmerged[list(inputs)].sum())
        after = memory_after(c.pages_shared + c.pages_unshared, c.ksm_rmap_items, ps,
                             model.settings.rmap_bytes) + unmerged
        rows.append({"method": p.method, "host": k,
                     "inputs": [names[i] for i in inputs], "input_count": len(inputs),
                     "memory_before_bytes": before, "memory_after_bytes": after,
                     "private_bytes": c.pages_unshared * ps, "shared_bytes": c.pages_shared * ps,
                     "rmap_bytes": c.ksm_rmap_items * model.settings.rmap_bytes,
                     "saved_bytes": before - after, "free_bytes": capacity - after,
                     "worst_case_fits": before <= capacity, "unmerged_bytes": unmerged})
        del table  # the next host's table is made without this one's
    return pd.DataFrame(rows)
