"""``analyze()``: readers -> fingerprints -> content classes -> KSM model -> DataFrames.

All inputs of one call are treated as one host. Guest dumps cannot tell a page the guest
zeroed (host-resident, mergeable) from one it never touched (costs the host nothing), so the
prediction is made twice: ``with_zero_pages`` counts every zero page as present on the host,
``without_zero_pages`` assumes none is. The footprint after KSM is nearly the same either way.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ._parallel import default_jobs
from .dedup import ContentClasses, StageStats, classify
from .eligibility import RULES, Scope, excluded_by, split_maps_zero_subpages
from .fingerprint import UNIQUE, ZERO, PageTable, fingerprint
from .formats import DumpFormat, open_inputs
from .ksm import RMAP_ITEM_BYTES, KsmCounters, KsmSettings, merged_pages, predict
from .pages import Extent, MapFlags, PageState
from .progress import ScanProgress
from .sharing import sharing_tables, with_zero_row

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Analysis", "analyze"]

SCENARIOS = ("with_zero_pages", "without_zero_pages")


@dataclass
class Analysis:
    """The result of :func:`analyze`: every table the CLI prints, as DataFrames.

    Attributes:
        per_input: one row per input. Columns: ``input``, ``format``, ``address_space``,
            ``pages`` (every page the dump describes), ``bytes``, ``nonzero_pages`` and
            ``zero_pages`` (pages KSM may merge), ``hole_pages``, ``excluded_pages``,
            ``not_saved_pages``, ``ineligible_pages`` (file-backed or shared memory in
            process cores, which KSM never merges),
            ``distinct_contents`` (non-zero contents in this input),
            ``self_sharing_pages`` (pages KSM would save merging within this input alone,
            zero pages apart), and the ``/proc/PID/ksm_stat`` fields KSM would show for the
            input with zero pages present: ``ksm_rmap_items``, ``ksm_merging_pages``,
            ``ksm_zero_pages``, ``ksm_process_profit`` (bytes).
        host: the KSM counters, one row per counter (``pages_shared``, ``pages_sharing``,
            ``pages_unshared``, ``pages_volatile``, ``ksm_zero_pages``, ``ksm_rmap_items``,
            ``general_profit`` in bytes), one column per scenario.
        savings: memory before and after KSM and where the savings come from; rows
            ``memory_before``, ``zero_pages``, ``sharing_within_inputs``,
            ``sharing_across_inputs``, ``saved``, ``memory_after``, ``rmap_overhead``;
            columns ``<scenario>_pages``, ``<scenario>_bytes``, ``<scenario>_percent``.
        histogram: the sharing-degree histogram (zdb -S style), one row per bucket of
            copies (1, 2, 4, 8, ...: a bucket holds copies from it up to the next one).
            Columns ``copies``, ``contents``, ``pages_referenced``, ``pages_after_merging``,
            ``bytes_referenced``, ``bytes_after_merging`` (zero pages included, as present).
        stages: fingerprinting statistics, one row per statistic (counts of pages, and
            ``stage1_seconds``/``stage2_seconds``, the wall time of each stage).
        convergence: seconds to one full scan and to steady state for each scenario.
        exclusions: pages kept from KSM's scan, one row per input, one column per rule
            (:data:`ksm_analyze.eligibility.RULES`: ``not_present``, ``swapped``,
            ``not_saved``, ``excluded``, ``shared``, ``special``, ``hugetlb``,
            ``file_backed``, ``zero_pfn``, ``not_mergeable``), under ``options["scope"]``.
        counters: the KSM counters of the ``with_zero_pages`` scenario.
        options: the options the analysis ran with.
        warnings: every warning the readers raised.
        pairwise: sharing between each ordered pair of inputs, non-zero pages only.
            Columns ``input_a``, ``input_b``, ``a_nonzero_pages``, ``a_pages_in_b`` (pages
            of A whose content also occurs in B), ``a_fraction_in_b`` (0 to 1),
            ``extra_saved_pages``/``extra_saved_bytes`` (saved on a host holding only A and
            B beyond A and B alone).
        top_contents: the most duplicated contents, most copies first (zero page
            included). Columns ``content_hash`` (SHA-256, hex), ``copies``, ``bytes``,
            ``input_count``, ``inputs`` (``name:copies`` separated by spaces),
            ``content_class`` (``zero``, ``repeated_byte``, ``repeated_pattern``,
            ``low_entropy``, ``other``), ``class_detail``, ``entropy_bits_per_byte``, and
            ``content_hex`` (first 64 bytes) only with ``show_content=True``.
        address_map: each input's pages in address order, in up to 256 bins. Columns
            ``input``, ``bin``, ``first_address``, ``last_address``, ``pages``,
            ``zero_pages``, ``unique_pages``, ``duplicate_within_pages``,
            ``duplicate_across_pages``, ``ineligible_pages``, ``not_stored_pages``.
    """

    per_input: pd.DataFrame
    host: pd.DataFrame
    savings: pd.DataFrame
    histogram: pd.DataFrame
    stages: pd.DataFrame
    convergence: pd.DataFrame
    exclusions: pd.DataFrame
    counters: KsmCounters
    options: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    pairwise: pd.DataFrame = field(default_factory=pd.DataFrame)
    top_contents: pd.DataFrame = field(default_factory=pd.DataFrame)
    address_map: pd.DataFrame = field(default_factory=pd.DataFrame)

    def plot_savings(self) -> Figure:
        """Waterfall: memory before, zero pages, sharing within and across, after."""
        from .plots import plot_savings

        return plot_savings(self)

    def plot_histogram(self) -> Figure:
        """Pages by number of copies, before and after merging (log scale)."""
        from .plots import plot_histogram

        return plot_histogram(self)

    def plot_pairwise(self) -> Figure:
        """Heatmap of pages of each input also present in each other input."""
        from .plots import plot_pairwise

        return plot_pairwise(self)

    def plot_address_map(self) -> Figure:
        """Where zero, unique and duplicated pages lie in each input's address space."""
        from .plots import plot_address_map

        return plot_address_map(self)

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON-able values (what ``scan --json`` prints)."""

        def records(df: pd.DataFrame) -> list[dict[str, Any]]:
            rows: list[dict[str, Any]] = json_safe(df.to_dict(orient="records"))
            return rows

        return {
            "options": json_safe(self.options),
            "per_input": records(self.per_input),
            "host": json_safe(self.host.to_dict(orient="index")),
            "savings": json_safe(self.savings.to_dict(orient="index")),
            "histogram": records(self.histogram),
            "stages": json_safe(self.stages["value"].to_dict()),
            "convergence": json_safe(self.convergence.to_dict(orient="index")),
            "exclusions": json_safe(self.exclusions.to_dict(orient="index")),
            "warnings": list(self.warnings),
            "pairwise": records(self.pairwise),
            "top_contents": records(self.top_contents),
        }


def json_safe(value: Any) -> Any:
    """numpy scalars and containers to plain Python values."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def analyze(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    format: str | DumpFormat | None = None,
    page_size: int = 4096,
    prefix_bytes: int = 128,
    base_address: int | Sequence[int] = 0,
    max_page_sharing: int = 256,
    use_zero_pages: bool = False,
    pages_to_scan: int = 100,
    sleep_millisecs: int = 20,
    verify: bool = True,
    jobs: int | None = None,
    scope: str | Scope = Scope.MERGEABLE,
    top: int = 20,
    show_content: bool = False,
    progress: bool = False,
) -> Analysis:
    """Predict what KSM would save on a host holding all of ``paths``.

    Args:
        paths: one dump or several (all on one host).
        format: force a format for every input; None detects each from its magic.
        page_size: analysis page size in bytes; larger guest pages are split.
        prefix_bytes: bytes hashed per page in stage 1 (0 = whole page).
        base_address: address of the first byte of raw images: one for all inputs, or one
            per input (e.g. ``pmemsave`` pieces of one guest taken at different addresses).
        max_page_sharing: KSM's limit of mappings per KSM page (kernel default 256).
        use_zero_pages: predict with ``use_zero_pages=1`` (zero pages map to the zero page).
        pages_to_scan: ksmd's pages per wake-up, for the time to converge.
        sleep_millisecs: ksmd's sleep between wake-ups, for the time to converge.
        verify: compare candidate pages byte for byte (off: trust the 64+64-bit hashes).
        jobs: worker processes for hashing and comparing (default: every CPU available).
        scope: which pages of process memory KSM scans: ``mergeable`` (VMAs marked
            mergeable, what KSM does), ``anon`` (as if ``PR_SET_MEMORY_MERGE`` were set),
            ``all`` (every page whose bytes are known, an upper bound). Guest dumps carry
            no mapping facts: every page is counted whatever the scope.
        top: rows of ``top_contents``.
        show_content: put the first bytes of each top content in ``top_contents``
            (off by default: memory dumps hold secrets).
        progress: show progress bars on stderr when it is a terminal.

    Returns:
        An :class:`Analysis`.

    Raises:
        KsmAnalyzeError: an input cannot be read (the message names file, offset, problem).
        ValueError: an option is out of range.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    if not paths:
        raise ValueError("no input given")
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    scope = Scope.parse(scope)
    if prefix_bytes < 0:
        raise ValueError(f"prefix_bytes cannot be negative, not {prefix_bytes}")
    bases = [base_address] if isinstance(base_address, int) else list(base_address)
    if len(bases) == 1:
        bases *= len(paths)
    if len(bases) != len(paths):
        raise ValueError(
            f"{len(bases)} base addresses for {len(paths)} inputs: give one, or one per input"
        )
    settings = KsmSettings(
        max_page_sharing=max_page_sharing,
        use_zero_pages=use_zero_pages,
        pages_to_scan=pages_to_scan,
        sleep_millisecs=sleep_millisecs,
        page_size=page_size,
    )
    with contextlib.ExitStack() as stack:
        readers = []
        for p, b in zip(paths, bases, strict=True):
            for r in open_inputs(p, format, page_size=page_size, base_address=b):
                readers.append(stack.enter_context(r))
        bars = stack.enter_context(ScanProgress(enabled=progress))
        bars.overall("all inputs", sum(r.page_counts()[PageState.DATA] for r in readers)
                     * page_size)
        started = time.perf_counter()
        tables = [fingerprint(r, prefix_bytes=prefix_bytes, jobs=jobs,
                              progress=bars.reading(os.path.basename(r.name)))
                  for r in readers]
        hashed = time.perf_counter()
        classes = classify(tables, readers, verify=verify, jobs=jobs,
                           progress=bars.comparing())
        compared = time.perf_counter()
        shared = sharing_tables(tables, readers, [scanned_rows(t, scope) for t in tables],
                                max_page_sharing=max_page_sharing, top=top,
                                show_content=show_content, scope=scope)
    options = {
        "inputs": [os.fspath(p) for p in paths],
        "format": DumpFormat.parse(format).value if format else "auto",
        "page_size": page_size,
        "prefix_bytes": tables[0].prefix_bytes if tables else prefix_bytes,
        "base_address": bases if len(set(bases)) > 1 else bases[0],
        "max_page_sharing": max_page_sharing,
        "use_zero_pages": use_zero_pages,
        "pages_to_scan": pages_to_scan,
        "sleep_millisecs": sleep_millisecs,
        "verify": verify,
        "jobs": jobs,
        "scope": scope.value,
    }
    timings = {"stage1_seconds": hashed - started, "stage2_seconds": compared - hashed}
    result = build_analysis(tables, classes, settings, options, timings, scope)
    return replace(
        result,
        pairwise=shared.pairwise,
        top_contents=with_zero_row(shared.top_contents, result.per_input, page_size,
                                   limit=top, show_content=show_content),
        address_map=shared.address_map,
    )


def eligible_rows(table: PageTable, scope: Scope = Scope.MERGEABLE) -> np.ndarray:
    """Bool per stored page: would KSM scan it (see :mod:`ksm_analyze.eligibility`)."""
    return _rows_where(table, lambda e: excluded_by(e, scope) is None)


def _rows_where(table: PageTable, test: Callable[[Extent], bool]) -> np.ndarray:
    """Bool per stored page: does ``test`` hold for the DATA extent holding it."""
    data = [e for e in table.extents if e.state == PageState.DATA]
    ok = np.array([test(e) for e in data], dtype=bool)
    if ok.all() or not ok.any():
        return np.full(len(table.addrs), bool(ok.all()))
    starts = np.array([e.addr for e in data], dtype=np.uint64)
    return ok[np.searchsorted(starts, table.addrs, side="right") - 1]


def scanned_rows(table: PageTable, scope: Scope) -> np.ndarray:
    """Bool per stored page: KSM scans it and keeps scanning it (eligible, not freed by a
    THP split). Needs the content classes of stage 2."""
    return np.asarray(eligible_rows(table, scope) & ~thp_zero_rows(table, scope))


def thp_zero_rows(table: PageTable, scope: Scope) -> np.ndarray:
    """Bool per stored page: an all-zero THP subpage that KSM's split frees (rule thp_zero)."""
    assert table.content is not None, "classify() sets content"
    if scope is Scope.ALL or not split_maps_zero_subpages(table.info.get("kernel")):
        return np.zeros(len(table.addrs), bool)
    in_thp = _rows_where(table, lambda e: bool(e.flags & MapFlags.THP))
    return np.asarray(in_thp & (table.content == ZERO))


def exclusions(table: PageTable, scope: Scope) -> dict[str, int]:
    """Pages each eligibility rule keeps from KSM's scan (every rule, 0 where none)."""
    out = dict.fromkeys(RULES, 0)
    for e in table.extents:
        rule = excluded_by(e, scope)
        if rule:
            out[rule] += e.npages
    return out


def _zero_state_pages(table: PageTable, scope: Scope) -> int:
    """Pages the format marks all-zero that KSM would scan."""
    return sum(e.npages for e in table.extents
               if e.state == PageState.ZERO and excluded_by(e, scope) is None)


def _state_pages(table: PageTable, state: PageState) -> int:
    return sum(e.npages for e in table.extents if e.state == state)


@dataclass
class _Counts:
    """Eligible pages of every input, reduced to what the model needs."""

    copies: np.ndarray  # eligible copies per content class (0 = none eligible)
    singletons: int  # eligible non-zero pages whose content occurs once
    zero_pages: int  # eligible zero pages, all inputs
    per_input: list[dict[str, int]]


def _count(
    tables: Sequence[PageTable], classes: ContentClasses, settings: KsmSettings, scope: Scope
) -> _Counts:
    mps = settings.max_page_sharing
    copies = np.zeros(classes.n_classes, np.int64)
    per_input = []
    mine_list = []
    for t in tables:
        assert t.content is not None, "classify() sets content"
        eligible = eligible_rows(t, scope)
        thp_zero = eligible & thp_zero_rows(t, scope)
        content = t.content[eligible & ~thp_zero]
        zero_i = int(np.count_nonzero(content == ZERO)) + _zero_state_pages(t, scope)
        unique_i = int(np.count_nonzero(content == UNIQUE))
        mine, mine_copies = np.unique(content[content >= 0], return_counts=True)
        copies[mine] += mine_copies
        mine_list.append((mine, mine_copies))
        # The sharing this input would find on its own.
        ksm, unshared = merged_pages(mine_copies, mps)
        excluded = exclusions(t, scope)
        excluded["thp_zero"] = int(np.count_nonzero(thp_zero))
        per_input.append(
            {
                "nonzero_pages": unique_i + int(mine_copies.sum()),
                "zero_pages": zero_i,
                "distinct_contents": unique_i + len(mine),
                "self_sharing_pages": int((mine_copies - ksm - unshared).sum()),
                "ineligible_pages": sum(v for k, v in excluded.items() if k not in _NO_BYTES),
                "singletons": unique_i,
                **{f"excluded_{k}_pages": v for k, v in excluded.items()},
            }
        )
    zero_total = sum(row["zero_pages"] for row in per_input)
    _per_process_ksm_stat(per_input, mine_list, copies, zero_total, settings)
    singletons = sum(row.pop("singletons") for row in per_input)
    return _Counts(copies, singletons, zero_total, per_input)


_NO_BYTES = ("not_present", "swapped", "not_saved", "excluded")
"""Rules for pages whose bytes the dump does not hold (already counted per state)."""


def _per_process_ksm_stat(
    per_input: list[dict[str, int]],
    mine_list: list[tuple[np.ndarray, np.ndarray]],
    copies: np.ndarray,
    zero_total: int,
    settings: KsmSettings,
) -> None:
    """Add the ``/proc/PID/ksm_stat`` fields KSM would show for each input.

    A page merges when its content has a partner on the host; of a content seen
    ``k * max_page_sharing + 1`` times one page stays unmerged, which one is the kernel's
    scan order: it is charged here to the last input holding the content.
    """
    mps = settings.max_page_sharing
    leftover = (copies % mps == 1) & (copies > 1)
    zero_leftover = not settings.use_zero_pages and zero_total >= 2 and zero_total % mps == 1
    for row, (mine, mine_copies) in reversed(list(zip(per_input, mine_list, strict=True))):
        merging = int(mine_copies[copies[mine] >= 2].sum())
        merging -= int(np.count_nonzero(leftover[mine]))
        leftover[mine] = False
        zero = row["zero_pages"]
        if settings.use_zero_pages:
            kzero, rmap = zero, row["nonzero_pages"]
        else:
            kzero, rmap = 0, row["nonzero_pages"] + zero
            if zero_total >= 2:
                merging += zero
            if zero_leftover and zero:
                merging -= 1
                zero_leftover = False
        row["ksm_rmap_items"] = rmap
        row["ksm_merging_pages"] = merging
        row["ksm_zero_pages"] = kzero
        row["ksm_process_profit"] = (merging + kzero) * settings.page_size - rmap * RMAP_ITEM_BYTES


def build_analysis(
    tables: Sequence[PageTable],
    classes: ContentClasses,
    settings: KsmSettings,
    options: dict[str, Any],
    timings: dict[str, float] | None = None,
    scope: Scope = Scope.MERGEABLE,
) -> Analysis:
    """Turn fingerprints and content classes into the :class:`Analysis` tables."""
    ps = settings.page_size
    mps = settings.max_page_sharing
    counts = _count(tables, classes, settings, scope)
    copies = counts.copies[counts.copies > 0]
    zero = counts.zero_pages

    counters = {
        "with_zero_pages": predict(copies, zero, settings, singletons=counts.singletons),
        "without_zero_pages": predict(copies, 0, settings, singletons=counts.singletons),
    }
    host = pd.DataFrame({k: v.as_dict() for k, v in counters.items()})
    host.index.name = "counter"

    nonzero_pages = int(copies.sum()) + counts.singletons
    within = sum(row["self_sharing_pages"] for row in counts.per_input)
    ksm, unshared = merged_pages(copies, mps)
    across = int((copies - ksm - unshared).sum()) - within
    if settings.use_zero_pages:
        zero_saved = zero
    else:
        zk, zu = merged_pages(np.array([zero]), mps)
        zero_saved = int(zero - zk[0] - zu[0])
    savings: dict[str, dict[str, float | None]] = {}
    for name, c in counters.items():
        z = zero if name == "with_zero_pages" else 0
        zs = zero_saved if name == "with_zero_pages" else 0
        before = nonzero_pages + z
        saved = zs + within + across
        rows = {
            "memory_before": before,
            "zero_pages": zs,
            "sharing_within_inputs": within,
            "sharing_across_inputs": across,
            "saved": saved,
            "memory_after": before - saved,
        }
        savings[f"{name}_pages"] = {**rows, "rmap_overhead": None}
        savings[f"{name}_bytes"] = {
            **{k: v * ps for k, v in rows.items()},
            "rmap_overhead": c.ksm_rmap_items * 64,
        }
        savings[f"{name}_percent"] = {
            **{k: (100.0 * v / before if before else 0.0) for k, v in rows.items()},
            "rmap_overhead": (100.0 * c.ksm_rmap_items * 64 / (before * ps)) if before else 0.0,
        }
    savings_df = pd.DataFrame(savings)
    savings_df.index.name = "item"

    histogram = _histogram(copies, counts.singletons, zero, settings)
    stages = _stages(classes.stats, tables, timings or {})
    convergence = pd.DataFrame(
        {name: _convergence(c.ksm_rmap_items + c.ksm_zero_pages, settings)
         for name, c in counters.items()}
    )
    convergence.index.name = "item"

    per_input = pd.DataFrame([_input_row(t, row) for t, row in zip(tables, counts.per_input,
                                                                   strict=True)])
    excluded = pd.DataFrame(
        [{"input": t.path, **{k: row[f"excluded_{k}_pages"] for k in RULES}}
         for t, row in zip(tables, counts.per_input, strict=True)]
    ).set_index("input")
    warnings = [w for t in tables for w in t.warnings]
    if scope is Scope.MERGEABLE:
        warnings += [
            f"{t.path}: a process core does not record which VMAs are mergeable; its "
            "pages are counted as with --scope anon"
            for t in tables if t.address_space == "virtual" and t.format is not DumpFormat.SNAPSHOT
        ]
    return Analysis(
        per_input=per_input,
        host=host,
        savings=savings_df,
        histogram=histogram,
        stages=stages,
        convergence=convergence,
        exclusions=excluded,
        counters=counters["with_zero_pages"],
        options=options,
        warnings=warnings,
    )


def _input_row(table: PageTable, counted: dict[str, int]) -> dict[str, Any]:
    pages = sum(e.npages for e in table.extents)
    return {
        "input": table.path,
        "format": table.format.value,
        "address_space": table.address_space,
        "pages": pages,
        "bytes": pages * table.page_size,
        "nonzero_pages": counted["nonzero_pages"],
        "zero_pages": counted["zero_pages"],
        "hole_pages": _state_pages(table, PageState.HOLE),
        "excluded_pages": _state_pages(table, PageState.EXCLUDED),
        "not_saved_pages": _state_pages(table, PageState.NOT_SAVED),
        "ineligible_pages": counted["ineligible_pages"],
        "distinct_contents": counted["distinct_contents"],
        "self_sharing_pages": counted["self_sharing_pages"],
        **{k: counted[k] for k in KSM_STAT_FIELDS},
    }


KSM_STAT_FIELDS = ("ksm_rmap_items", "ksm_merging_pages", "ksm_zero_pages", "ksm_process_profit")
"""The ``/proc/PID/ksm_stat`` fields predicted per input."""


def _histogram(
    copies: np.ndarray, singletons: int, zero: int, settings: KsmSettings
) -> pd.DataFrame:
    """zdb -S style: contents bucketed by the highest power of two not above their copies."""
    ps, mps = settings.page_size, settings.max_page_sharing
    all_copies = np.append(copies, [zero]) if zero else copies
    ksm, unshared = merged_pages(all_copies, mps)
    after = ksm + unshared
    if zero and settings.use_zero_pages:
        after[-1] = 0  # every zero page maps the kernel's zero page
    if singletons:
        all_copies = np.append(all_copies, 1)
        after = np.append(after, 1)
    weights = np.ones(len(all_copies), np.int64)
    if singletons:
        weights[-1] = singletons  # one row standing for every content seen once
    bucket = np.left_shift(1, np.floor(np.log2(np.maximum(all_copies, 1))).astype(np.int64))
    df = pd.DataFrame(
        {
            "copies": bucket,
            "contents": weights,
            "pages_referenced": all_copies * weights,
            "pages_after_merging": after * weights,
        }
    )
    df = df.groupby("copies", as_index=False).sum().sort_values("copies")
    df["bytes_referenced"] = df["pages_referenced"] * ps
    df["bytes_after_merging"] = df["pages_after_merging"] * ps
    return df.reset_index(drop=True)


def _stages(
    stats: StageStats, tables: Sequence[PageTable], timings: dict[str, float]
) -> pd.DataFrame:
    values: dict[str, Any] = asdict(stats)
    values["zero_pages_found"] = sum(t.zero_pages for t in tables)
    values["prefix_bytes"] = tables[0].prefix_bytes if tables else 0
    values.update({k: round(v, 3) for k, v in timings.items()})
    df = pd.DataFrame({"value": pd.Series(values, dtype=object)})
    df.index.name = "statistic"
    return df


def _convergence(scanned_pages: int, settings: KsmSettings) -> dict[str, float]:
    """Seconds for ksmd to visit every page once, and to merge static duplicates.

    ksmd wakes every ``sleep_millisecs`` and scans ``pages_to_scan`` pages; a page merges on
    its second visit (its checksum must be stable), so steady state takes two full scans.
    The CPU time of scanning itself and smart_scan's skipping are not modelled.
    """
    wakeups = -(-scanned_pages // settings.pages_to_scan)
    full = wakeups * settings.sleep_millisecs / 1000.0
    return {"scanned_pages": scanned_pages, "full_scan_seconds": full,
            "steady_state_seconds": 2 * full}
