"""NUMA nodes merged apart: what KSM saves with ``merge_across_nodes=0``.

With ``merge_across_nodes=0`` the kernel keeps one stable and one unstable tree per NUMA node
(mm/ksm.c: ``get_kpfn_nid()`` picks the tree of a page's node, ``root_stable_tree[nid]`` and
``root_unstable_tree[nid]`` in ``stable_tree_search()`` and ``unstable_tree_search_insert()``):
a page is only ever compared with pages of its own node, so pages on different nodes never
merge and a content present on k nodes costs k KSM pages. Guests pinned to nodes share
nothing across them.

That is a merging policy like trust domains (pages never merge across domains): each input
is pinned to one node, and a merge unit is a (domain, node) pair, so two pages merge only
when both their domain and their node match (:func:`merge_units`). The core table under
that policy gives every counter (:meth:`~ksm_analyze.content_table.ContentTable.with_policy`);
:func:`numa_table` sets it beside the same inputs merged across nodes.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence

import numpy as np

from ..columns import Columns
from ..content_table import ContentTable
from ..ksm import KsmCounters, KsmSettings
from ..units import short_names

__all__ = ["NUMA_COLUMNS", "empty_numa_table", "merge_units", "node_of", "numa_table"]

NUMA_COLUMNS = ("node", "inputs", "input_count", "pages", "pages_shared", "pages_sharing",
                "pages_unshared", "ksm_zero_pages", "general_profit", "saved_pages",
                "saved_bytes", "saved_across_nodes_pages", "saved_across_nodes_bytes",
                "lost_pages", "lost_bytes")
"""Columns of the ``numa`` table (:class:`~ksm_analyze.analysis.Analysis`)."""


def node_of(names: Sequence[str], sizes: Sequence[int] | np.ndarray, nodes: int,
            pins: Sequence[tuple[int, str]] = ()) -> list[int]:
    """The NUMA node of each input, as a scheduler pinning VMs would place them.

    Inputs whose path or file name match a pin's pattern (``fnmatch``, as ``--domain``) go
    to its node. The others are balanced by memory: largest first (``sizes``, bytes; ties
    in input order), each onto the node holding the least memory so far (pinned inputs
    included; ties: the lowest node number).

    Raises:
        ValueError: a pattern matches no input, or an input matches pins of two nodes.
    """
    found: list[int | None] = []
    matched = [False] * len(pins)
    for path in names:
        hits = set()
        for k, (node, pattern) in enumerate(pins):
            if fnmatch.fnmatchcase(path, pattern) or \
                    fnmatch.fnmatchcase(os.path.basename(path), pattern):
                hits.add(node)
                matched[k] = True
        if len(hits) > 1:
            raise ValueError(f"{path} is pinned to several NUMA nodes "
                             f"({', '.join(map(str, sorted(hits)))}): give each input one "
                             "--numa-node")
        found.append(hits.pop() if hits else None)
    for (node, pattern), hit in zip(pins, matched, strict=True):
        if not hit:
            raise ValueError(f"--numa-node {node}={pattern} matches no input")
    load = [0] * nodes
    for i, pinned in enumerate(found):
        if pinned is not None:
            load[pinned] += int(sizes[i])
    out = [-1 if n is None else n for n in found]
    for i in sorted((i for i, n in enumerate(found) if n is None), key=lambda i: -int(sizes[i])):
        least = min(range(nodes), key=lambda k: (load[k], k))
        out[i] = least
        load[least] += int(sizes[i])
    return out


def merge_units(domains: Sequence[int] | None, nodes: Sequence[int], n_nodes: int
                ) -> list[int]:
    """Each input's merge unit, ``domain * n_nodes + node``: pages merge only within one (a
    domain and a node both match)."""
    if domains is None:
        return list(nodes)
    return [d * n_nodes + n for d, n in zip(domains, nodes, strict=True)]


def _saved(c: KsmCounters) -> int:
    """Pages KSM frees: the pages mapped to a KSM page beyond its first, and zero pages
    mapped to the zero page (``use_zero_pages``)."""
    return c.pages_sharing + c.ksm_zero_pages


def numa_table(per_node: ContentTable, across: ContentTable, nodes: Sequence[int],
               n_nodes: int, settings: KsmSettings) -> Columns:
    """One row per NUMA node and a ``total`` row: inputs, scanned pages, the KSM counters
    with ``merge_across_nodes=0`` (zero pages present), pages saved; the ``total`` row also
    what merging across nodes would save (``across``: the same inputs under the same policy
    but one tree for all nodes) and the difference, ``lost_pages``.

    Args:
        per_node: the core table under the per-node policy (:func:`merge_units`).
        across: the core table under the other policies alone.
        nodes: each input's node.
        n_nodes: the nodes of the host (a node may hold no input: a row of zeros).
        settings: the KSM knobs.
    """
    ps = per_node.page_size
    names = short_names(per_node.names)  # as the other tables name inputs (Analysis.names)
    node = np.asarray(nodes, np.int64)
    scanned = per_node.nonzero_pages() + per_node.column("zero_pages")
    rows = []
    for k in range(n_nodes):
        members = np.flatnonzero(node == k).tolist()
        c = per_node.subset(members).counters(settings)
        rows.append(_row(str(k), [names[i] for i in members], int(scanned[members].sum()), c,
                         ps, None))
    whole = per_node.counters(settings)
    rows.append(_row("total", list(names), int(scanned.sum()), whole, ps,
                     _saved(across.counters(settings))))
    return Columns.from_records(rows, NUMA_COLUMNS)


def _row(node: str, inputs: list[str], pages: int, c: KsmCounters, page_size: int,
         across: int | None) -> dict[str, object]:
    saved = _saved(c)
    return {"node": node, "inputs": inputs, "input_count": len(inputs), "pages": pages,
            "pages_shared": c.pages_shared, "pages_sharing": c.pages_sharing,
            "pages_unshared": c.pages_unshared, "ksm_zero_pages": c.ksm_zero_pages,
            "general_profit": c.general_profit, "saved_pages": saved,
            "saved_bytes": saved * page_size,
            "saved_across_nodes_pages": across,
            "saved_across_nodes_bytes": None if across is None else across * page_size,
            "lost_pages": None if across is None else across - saved,
            "lost_bytes": None if across is None else (across - saved) * page_size}


def empty_numa_table() -> Columns:
    """The ``numa`` table without ``--numa-nodes``: no rows."""
    return Columns({c: [] for c in NUMA_COLUMNS})
