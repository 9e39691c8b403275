"""The summary tables of an analysis, each computed from the core :class:`ContentTable`.

Guest dumps cannot tell a page the guest zeroed (host-resident, mergeable) from one it never
touched (costs the host nothing), so the host prediction is made twice: ``with_zero_pages``
counts every scanned zero page as present on the host, ``without_zero_pages`` assumes none
is. The footprint after KSM is nearly the same either way.

Each table is returned as plain :class:`~ksm_analyze.columns.Columns` (no pandas);
:class:`~ksm_analyze.analysis.Analysis` makes the DataFrames when they are read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from .columns import Columns
from .content_table import ContentTable
from .eligibility import RULES, ScanMask
from .hashing.stage1 import Fingerprints
from .hashing.stage2 import StageStats
from .ksm import (
    KSM_STAT_FIELDS,
    ROWS_AT_ONCE,
    KsmCounters,
    KsmSettings,
    memory_after,
    merged_pages,
    saved_pages,
)

__all__ = ["SCENARIOS", "host_counters", "summary_tables"]

PER_INPUT_COLUMNS = ("input", "format", "address_space", "pages", "bytes", "nonzero_pages",
                     "zero_pages", "hole_pages", "excluded_pages", "not_saved_pages",
                     "ineligible_pages", "distinct_contents", "self_sharing_pages",
                     *KSM_STAT_FIELDS)
SCENARIOS = ("with_zero_pages", "without_zero_pages")
"""The two columns of the host prediction: zero pages present, or never touched."""


def host_counters(table: ContentTable, settings: KsmSettings) -> dict[str, KsmCounters]:
    """The KSM counters of the whole table, per scenario."""
    return {s: table.counters(settings, zero_pages=s == "with_zero_pages") for s in SCENARIOS}


def summary_tables(
    table: ContentTable,
    settings: KsmSettings,
    fingerprints: Sequence[Fingerprints],
    masks: Sequence[ScanMask],
    stats: StageStats,
    timings: Mapping[str, float],
    more_counters: Mapping[str, KsmCounters] | None = None,
) -> dict[str, Columns]:
    """``per_input``, ``host``, ``savings``, ``histogram``, ``stages`` and ``exclusions``
    (columns documented on :class:`~ksm_analyze.analysis.Analysis`); ``more_counters`` are
    further columns of ``host`` (``steady_state``, ``if_memory_stood_still``)."""
    counters = host_counters(table, settings)
    host = Columns.from_dicts({k: v.as_dict() for k, v in
                               {**counters, **(more_counters or {})}.items()}, "counter")
    per_input = _per_input(table, settings)
    exclusions = Columns({"input": table.names,
                          **{r: [m.excluded[r] for m in masks] for r in RULES}}, "input")
    return {
        "per_input": per_input,
        "host": host,
        "savings": _savings(table, settings, counters, per_input),
        "histogram": _histogram(table, settings),
        "stages": _stages(stats, fingerprints, timings),
        "exclusions": exclusions,
    }


def _per_input(table: ContentTable, settings: KsmSettings) -> Columns:
    columns = {**table.input_columns.data, **table.per_input_columns(settings).data,
               "bytes": table.column("pages") * table.page_size}
    return Columns({c: columns[c] for c in PER_INPUT_COLUMNS})


def _savings(
    table: ContentTable,
    settings: KsmSettings,
    counters: Mapping[str, KsmCounters],
    per_input: Columns,
) -> Columns:
    """Memory before and after KSM, and where the savings come from, per scenario.

    ``memory_after`` is what the host needs (:func:`~ksm_analyze.ksm.memory_after`):
    ``pages_after_merging`` plus ``rmap_overhead``, the number ``plan`` gives a host of
    these inputs; ``memory_before - memory_after`` is the counters' ``general_profit``.
    """
    ps, mps = table.page_size, settings.max_page_sharing
    copies = table.copies()
    zero = int(table.column("zero_pages").sum())
    nonzero_pages = int(copies.sum()) + int(table.column("unique_pages").sum())
    within = int(per_input["self_sharing_pages"].sum())
    across = saved_pages(copies, mps) - within
    zero_saved = zero if settings.use_zero_pages else saved_pages(table.zero_by_domain(), mps)
    savings: dict[str, dict[str, float | None]] = {}
    for name, c in counters.items():
        present = name == "with_zero_pages"
        before = nonzero_pages + (zero if present else 0)
        saved = (zero_saved if present else 0) + within + across
        rows = {
            "memory_before": before,
            "zero_pages": zero_saved if present else 0,
            "sharing_within_inputs": within,
            "sharing_across_inputs": across,
            "saved": saved,
        }
        left = before - saved
        overhead = c.ksm_rmap_items * settings.rmap_bytes
        # What the host needs, and its two parts: the rows that are not whole pages have no
        # pages value.
        after = {"memory_after": memory_after(left, c.ksm_rmap_items, ps, settings.rmap_bytes),
                 "pages_after_merging": left * ps, "rmap_overhead": overhead}
        savings[f"{name}_pages"] = {**rows, "memory_after": None, "pages_after_merging": left,
                                    "rmap_overhead": None}
        savings[f"{name}_bytes"] = {**{k: v * ps for k, v in rows.items()}, **after}
        savings[f"{name}_percent"] = {
            k: (100.0 * v / (before * ps) if before else 0.0)
            for k, v in savings[f"{name}_bytes"].items() if v is not None}
    return Columns.from_dicts(savings, "item")


def _histogram(table: ContentTable, settings: KsmSettings) -> Columns:
    """zdb -S style: contents bucketed by the highest power of two not above their copies.

    Summed into 64 buckets a chunk of contents at a time (:data:`~.ksm.ROWS_AT_ONCE`): a
    few words of working memory a content, not a sort of them all."""
    ps, mps = table.page_size, settings.max_page_sharing
    zero = table.zero_by_domain()
    zero = zero[zero > 0]  # the zero page: one content per domain
    singletons = int(table.column("unique_pages").sum())
    contents, referenced, merged = (np.zeros(64, np.int64) for _ in range(3))

    def add(copies: np.ndarray, merges: bool) -> None:
        ksm, unshared = merged_pages(copies, mps)
        after = ksm + unshared if merges else np.zeros(len(copies), np.int64)
        power = np.floor(np.log2(np.maximum(copies, 1))).astype(np.int64)
        contents[:] += np.bincount(power, minlength=64)
        np.add.at(referenced, power, copies)
        np.add.at(merged, power, after)

    copies = table.copies()
    for lo in range(0, len(copies), ROWS_AT_ONCE):
        add(copies[lo:lo + ROWS_AT_ONCE], True)
    del copies
    add(zero, not settings.use_zero_pages)  # use_zero_pages: all map the kernel's zero page
    if singletons:  # one row standing for every content seen once
        contents[0] += singletons
        referenced[0] += singletons
        merged[0] += singletons
    held = np.flatnonzero(contents)
    referenced, merged = referenced[held], merged[held]
    return Columns({
        "copies": np.left_shift(1, held).astype(np.int64),
        "contents": contents[held],
        "pages_referenced": referenced,
        "pages_after_merging": merged,
        "bytes_referenced": referenced * ps,
        "bytes_after_merging": merged * ps,
    })


def _stages(
    stats: StageStats, fingerprints: Sequence[Fingerprints], timings: Mapping[str, float]
) -> Columns:
    values: dict[str, Any] = asdict(stats)
    values["zero_pages_found"] = sum(fp.zero_pages for fp in fingerprints)
    values["prefix_bytes"] = fingerprints[0].prefix_bytes if fingerprints else 0
    values.update({k: round(v, 3) for k, v in timings.items()})
    return Columns({"statistic": list(values), "value": np.array(list(values.values()), object)},
                   "statistic")
