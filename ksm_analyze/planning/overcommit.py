"""The memory overcommit ratio a host can run at with KSM, measured from the inputs.

Schedulers take a hand-set ratio (OpenStack's ``ram_allocation_ratio``, KubeVirt's
``memoryOvercommit`` percentage). Here it is measured: for each *workload family* and each
host size, how many guests like the family's fit in the memory a host leaves for guests
(the VMs-per-host projection of :mod:`~ksm_analyze.planning.projection`, over that family's
inputs alone), and the ratio is the memory those guests are given (each input's described
size: the memory before KSM a scheduler counts) over that memory:

    ratio = vms_per_host x mean guest memory / capacity (host memory - reserve)

The band is the projection's: ``vms_per_host_low``/``_high`` are the guests that fit by its
cautious (90th percentile) and hopeful (10th percentile) memory (see the projection's
docstring; up to the samples, the 10th-90th percentile over random orders of the family's
inputs; beyond them, every further guest costs the 10th/90th percentile of what a sampled
guest added). Families: the inputs of each ``--domain`` when a policy names domains, else the
clusters of inputs that share pages (:func:`~ksm_analyze.sharing.clusters`, the report's
heatmap clusters); with more than one family, a row ``all inputs`` too (guests of every
family mixed at random, as a scheduler that ignores sharing mixes them). The number to set
is the lowest ``ratio_low`` at the plan's host size (:func:`supported_ratio`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import printable
from ..sharing import clusters
from ..units import human_bytes
from .placement import HostModel, host_tables
from .projection import Projection

if TYPE_CHECKING:
    from ..analysis import Analysis
    from .plan import Plan

__all__ = [
    "ALL_INPUTS",
    "ORDER_BUDGET",
    "OVERCOMMIT_COLUMNS",
    "Supported",
    "advice",
    "families",
    "overcommit",
    "supported",
    "supported_ratio",
    "t90",
]

OVERCOMMIT_COLUMNS = ("family", "inputs", "input_count", "host_memory_bytes", "capacity_bytes",
                      "guest_memory_bytes", "vms_per_host", "vms_per_host_low",
                      "vms_per_host_high", "ratio", "ratio_low", "ratio_high", "method")
"""Columns of the ``overcommit`` table of a plan."""
ALL_INPUTS = "all inputs"
"""The family name of the row of every input mixed at random (with more than one family)."""
ORDER_BUDGET = 20_000
"""Guests added by the projections of every family (and the mix) together, at most, unless
that leaves fewer than 20 orders: ``orders`` random orders, fewer for a plan of over 50
inputs (100 orders of 100 inputs in two families and the mix), so a plan of thousands of
guests is not slowed by its overcommit table."""
_NAMED_MEMBERS = 3
"""A family of up to this many inputs is named by all of them, a larger one by its first."""


def families(analysis: Analysis) -> list[tuple[str, list[int]]]:
    """The workload families of ``analysis``: (name, input positions), largest first.

    With domains (``--domain``), each domain's inputs, named by the domain; else the
    clusters of inputs that share pages (:func:`~ksm_analyze.sharing.clusters` over the
    ``pairwise`` table: single linkage on the pages shared, cut at the largest drop), each
    named by its members (``a+b+c``; more than three: ``a+7 more``).
    """
    names = analysis.names
    if analysis.domains:
        numbers = np.asarray(analysis.domain_numbers())
        found = [(name, np.flatnonzero(numbers == d).tolist())
                 for d, name in enumerate(analysis.domains)]
        return sorted(((n, m) for n, m in found if m), key=lambda f: (-len(f[1]), f[1][0]))
    pw = analysis.columns["pairwise"]
    pos = {name: i for i, name in enumerate(names)}
    a = np.array([pos[x] for x in pw["input_a"]], np.int64)
    b = np.array([pos[x] for x in pw["input_b"]], np.int64)
    shared = np.asarray(pw["a_pages_in_b"], np.float64)
    return [(_name([names[i] for i in members]), sorted(members))
            for members in clusters(len(names), a, b, shared)]


def _name(members: list[str]) -> str:
    if len(members) <= _NAMED_MEMBERS:
        return "+".join(members)
    return f"{members[0]}+{len(members) - 1} more"


def overcommit(
    analysis: Analysis,
    model: HostModel,
    sizes: Sequence[tuple[int, int]],
    *,
    zero_pages: bool = True,
    nodes: int = 1,
    orders: int = 200,
    whole: Projection | None = None,
) -> pd.DataFrame:
    """The ``overcommit`` table: one row per family (then ``all inputs``) and host size.

    Args:
        analysis: the analysis the plan is made from (names, sizes, pairwise, domains).
        model: every input, as the plan prices its hosts (across NUMA nodes with nodes).
        sizes: (host memory, capacity for guests) pairs, in bytes.
        zero_pages: scanned zero pages count as host memory (``model``'s choice).
        nodes: NUMA nodes per host (merge_across_nodes=0): a host holds ``nodes`` times
            what fits in a node of ``capacity / nodes``.
        orders: random orders of each family's inputs to measure (see :data:`ORDER_BUDGET`).
        whole: the projection of every input with ``orders`` orders, when the plan made one.

    Returns:
        The columns :data:`OVERCOMMIT_COLUMNS`, by family (largest first) then host size:
        ``inputs`` (the family's names), ``guest_memory_bytes`` (the mean input's described
        size), ``vms_per_host`` (expected) and its band, ``ratio`` = ``vms_per_host x
        guest_memory_bytes / capacity_bytes`` and the band's ratios (``ratio_low`` <=
        ``ratio`` <= ``ratio_high``), ``method`` (``measured``: no more guests than the
        family's samples; ``fit a+b/k``: beyond them, the projection's model; ``last guest
        repeated``: beyond 2 or 3 samples; ``one sample``: one input, no sharing between
        guests measured).
    """
    names = analysis.names
    described = np.asarray(analysis.per_input["bytes"], np.int64)
    groups = families(analysis)
    if len(groups) > 1:
        groups.append((ALL_INPUTS, list(range(len(names)))))
    subsets = [members for _, members in groups if len(members) < len(names)]
    tables = iter(host_tables(model.table, subsets)) if subsets else iter(())
    rows = []
    added = sum(len(members) for _, members in groups)  # guests added by one order of each
    runs = max(min(orders, ORDER_BUDGET // added), min(orders, 20))
    for family, members in groups:
        everything = len(members) == len(names)
        n = len(members)
        sub = model if everything else HostModel(next(tables), model.settings,
                                                 zero_pages=zero_pages,
                                                 unmerged=model.unmerged[members])
        projection = (whole if everything and whole is not None and runs == orders
                      else Projection(sub, orders=runs))
        costs = _last_costs(sub)
        guest = round(float(described[members].mean()))
        for host_memory, capacity in sizes:
            fit = _fits(projection, costs, capacity // nodes)
            row = {"family": family, "inputs": [names[i] for i in members], "input_count": n,
                   "host_memory_bytes": host_memory, "capacity_bytes": capacity,
                   "guest_memory_bytes": guest}
            if fit[0] >= NO_LIMIT:  # guests that cost nothing after KSM: memory sets no limit
                rows.append({**row, **dict.fromkeys(_VMS), **dict.fromkeys(_RATIOS, math.inf),
                             "method": NO_LIMIT_METHOD})
                continue
            expected, low, high = (nodes * k for k in fit)
            method = ("measured" if expected <= n else "one sample" if n == 1
                      else "fit a+b/k" if n >= 4 else "last guest repeated")
            rows.append({
                **row, "vms_per_host": expected,
                "vms_per_host_low": low, "vms_per_host_high": high,
                "ratio": expected * guest / capacity, "ratio_low": low * guest / capacity,
                "ratio_high": high * guest / capacity, "method": method})
    table = pd.DataFrame(rows, columns=list(OVERCOMMIT_COLUMNS))
    for column in _VMS:  # whole numbers, None where there is no limit (not floats)
        table[column] = pd.Series([r[column] for r in rows], dtype=object)
    return table


NO_LIMIT = (1 << 40) - 1
"""Guests per host the projection stops counting at (``Projection.fits``): guests that
cost no host memory after KSM (every page a never-touched zero page) fit without limit."""
NO_LIMIT_METHOD = "no memory limit"
"""The ``method`` of a row whose guests cost nothing: its counts are null, its ratios
infinite (null in JSON)."""
_VMS = ("vms_per_host", "vms_per_host_low", "vms_per_host_high")
_RATIOS = ("ratio", "ratio_low", "ratio_high")


def _last_costs(model: HostModel) -> np.ndarray:
    """Each input's cost added last: the memory a host of every input needs beyond a host of
    the others (one pass over each input's classes out and back)."""
    host = model.holding(range(model.n))
    total = model.bytes(host)
    costs = np.empty(model.n, np.int64)
    for i in range(model.n):
        model.remove(host, i)
        costs[i] = total - model.bytes(host)
        model.add(host, i)
    return costs


_T90 = (3.078, 1.886, 1.638, 1.533, 1.476, 1.440, 1.415, 1.397, 1.383, 1.372, 1.363, 1.356,
        1.350, 1.345, 1.341, 1.337, 1.333, 1.330, 1.328, 1.325, 1.323, 1.321, 1.319, 1.318,
        1.316, 1.315, 1.314, 1.313, 1.311, 1.310)
"""Student's t, 90th percentile, for 1 to 30 degrees of freedom."""


def t90(df: int) -> float:
    """Student's t distribution's 90th percentile with ``df`` degrees of freedom (a table to
    30, then the Cornish-Fisher expansion around the normal's 1.2816: within 0.001)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, not {df}")
    if df <= len(_T90):
        return _T90[df - 1]
    z = 1.2815515655446004
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df * df)


def _fits(projection: Projection, costs: np.ndarray, capacity: int) -> tuple[int, int, int]:
    """Guests like the samples that fit in ``capacity``: (expected, low, high).

    Expected: the projection's. Up to the samples, the band is the projection's (10th-90th
    percentile over random orders). Beyond them (k samples' memory ``base``, the same in
    every order, plus m further guests), an 80% prediction interval for the further guests'
    mean cost: the projection's mean cost at the expected count, plus or minus
    ``t90(n-1) x s x sqrt(1/m + 1/n)``, where ``s`` is the spread of the n samples' costs
    added last (each guest beyond the other n - 1): the guests' own variation (1/m) and the
    uncertainty of the mean of n samples (1/n); never below the cheapest sample's cost. One
    sample: no spread is measured, the band is the projection's.
    """
    n = projection.samples
    expected, cautious, hopeful = projection.fits(capacity)
    if expected <= n or n < 2:
        vms = (expected, cautious, hopeful)
        return expected, min(vms), max(vms)
    base = float(projection.steps[:, -1].mean())
    m = expected - n
    mean = (projection.memory(expected)[0] - base) / m
    half = t90(n - 1) * float(np.std(costs, ddof=1)) * math.sqrt(1 / m + 1 / n)
    rates = mean + half, max(mean - half, float(costs.min()))
    # A guest that costs nothing after KSM (all zero pages, counted as never touched): no
    # rate to divide by; the projection's own band says how many fit.
    low, high = (n + int((capacity - base) // rate) if rate > 0 else bound
                 for rate, bound in zip(rates, (cautious, hopeful), strict=True))
    return expected, min(low, expected), max(high, expected)


@dataclass(frozen=True)
class Supported:
    """The overcommit ratio a plan supports on its hosts, and where it comes from.

    Attributes:
        ratio: the number to set (``ram_allocation_ratio``; KubeVirt's ``memoryOvercommit``
            is ``100 x ratio`` percent): the lowest ``ratio_low`` of the plan's
            ``overcommit`` table at the plan's host size, over every family and the mix.
        point: that row's expected ratio; ``high``: its hopeful end.
        family: that row's family (the one that shares least).
        host_memory: the host size (bytes); ``capacity``: what it leaves for guests.
    """

    ratio: float
    point: float
    high: float
    family: str
    host_memory: int
    capacity: int


def supported(plan: Plan) -> Supported:
    """The ratio ``plan`` supports on its hosts, with its band (:class:`Supported`).

    Raises:
        ValueError: the plan has no overcommit table.
    """
    table = plan.overcommit
    rows = table[table["host_memory_bytes"] == plan.host_memory] if len(table) else table
    if not len(rows):
        raise ValueError("the plan has no overcommit ratio for its host size")
    r = rows.loc[rows["ratio_low"].idxmin()]
    return Supported(ratio=float(r["ratio_low"]), point=float(r["ratio"]),
                     high=float(r["ratio_high"]), family=str(r["family"]),
                     host_memory=int(r["host_memory_bytes"]), capacity=int(r["capacity_bytes"]))


def supported_ratio(plan: Plan) -> float:
    """The memory overcommit ratio to set for the hosts of ``plan``: OpenStack's
    ``ram_allocation_ratio`` (of the memory left after ``reserved_host_memory_mb``), or
    KubeVirt's ``memoryOvercommit`` as ``100 x`` this percent. The low end of the band of
    the family that shares least (:func:`supported`)."""
    return supported(plan).ratio


def advice(plan: Plan) -> str:
    """The ratio ``plan`` supports said plainly, for a person: what to set, and from what."""
    s = supported(plan)
    host = human_bytes(s.host_memory)
    if math.isinf(s.ratio):
        return (f"Guests like {printable(s.family)} cost no host memory after KSM: memory sets "
                "no overcommit limit (other resources do).")
    if s.ratio <= 0:
        return (f"No guest like {printable(s.family)} fits in the {human_bytes(s.capacity)} a host of "
                f"{host} leaves for guests: no overcommit ratio to set.")
    cut = math.floor(s.ratio * 100) / 100  # "at most": rounded down, never up
    least = ", the family that shares least" if plan.overcommit["family"].nunique() > 1 else ""
    return (f"Set ram_allocation_ratio to at most {cut:.2f} (KubeVirt memoryOvercommit: at "
            f"most {math.floor(s.ratio * 100)}%) for hosts of {host}: the low end of the band "
            f"of {printable(s.family)}{least} (expected {s.point:.2f}).")
