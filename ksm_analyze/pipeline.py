"""``analyze()``: readers -> fingerprints -> content classes -> the core table -> tables.

Orchestration only: each step is a function of its own module that returns a value, and
:class:`~ksm_analyze.analysis.Analysis` is built once, complete, at the end. All inputs of
one call are treated as one host.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from typing import Any

import numpy as np

from ._signals import watching
from .analysis import TABLES, Analysis
from .columns import Columns
from .content_table import ContentTable, build_content_table
from .eligibility import ScanMask, Scope, opted_out, scan_mask
from .errors import KsmAnalyzeError
from .fleet.aggregate import (
    SERIES_REFUSED,
    aggregate,
    default_memory_limit,
    out_of_core_partitions,
)
from .fleet.cluster import aggregate_on_cluster
from .fleet.sources import (
    Source,
    add_content_hashes,
    fingerprint_sources,
    guest_check,
    open_sources,
)
from .formats import DumpFormat
from .hashing.stage1 import Fingerprints
from .hashing.stage2 import ContentClasses, StageStats, classify
from .ksm import KsmCounters, KsmSettings
from .options import DEFAULT_OPTIONS, ProgressCallback, ProgressReporter, ScanOptions
from .over_time import SETTINGS_COLUMNS, model_host, recorded_machine, steady_tables
from .pages import PageState
from .series import (
    STABILITY_COLUMNS,
    as_sample,
    group_samples,
    input_name,
    recorded_rmap_item_bytes,
    still_timeline,
)
from .sharing import ADDRESS_KINDS, address_map, pairwise, top_contents, twin_warnings
from .summary import summary_tables
from .units import size_text
from .vmconfig import VmConfig, match, read_configs
from .whatif.compression import Compressed, compress_contents, with_savings_row
from .whatif.compression import empty_table as no_compression
from .whatif.huge_pages import HugeRegions, huge_regions, ksm_saved_alone
from .whatif.huge_pages import empty_table as no_huge_pages
from .whatif.near_duplicates import empty_tables as no_near_duplicates
from .whatif.near_duplicates import near_duplicates
from .whatif.numa import empty_numa_table, merge_units, node_of, numa_table

__all__ = ["analyze"]

_OPTION_FIELDS = {f.name for f in fields(ScanOptions)}
_KSM_FIELDS = {f.name for f in fields(KsmSettings)}


def analyze(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    options: ScanOptions = DEFAULT_OPTIONS,
    ksm: KsmSettings | None = None,
    *,
    progress: ProgressReporter | None = None,
    **settings: Any,
) -> Analysis:
    """Predict what KSM would save on a host holding all of ``paths``.

    Args:
        paths: one dump or several (all on one host).
        options: how to read and fingerprint the inputs (:class:`ScanOptions`).
        ksm: the KSM knobs to predict with (:class:`KsmSettings`; kernel defaults).
        progress: called as ``progress(task, done_bytes, total_bytes)`` while reading
            (a task per input, and ``"all inputs"``) and comparing (``"comparing"``).
        **settings: any field of :class:`ScanOptions` or :class:`KsmSettings` by name, as a
            shorthand in notebooks: ``analyze(paths, max_page_sharing=4, jobs=1)``.

    Returns:
        An :class:`Analysis`.

    Raises:
        KsmAnalyzeError: an input cannot be read (the message names file, offset, problem).
        ValueError: an option is out of range, or one guest is given twice (a file twice,
            or a dump and a fingerprint file of it).
        TypeError: ``settings`` names no option.
    """
    unknown = set(settings) - _OPTION_FIELDS - _KSM_FIELDS
    if unknown:
        raise TypeError(f"analyze() got unknown options: {', '.join(sorted(unknown))}")
    options = replace(options, **{k: v for k, v in settings.items() if k in _OPTION_FIELDS})
    ksm = replace(ksm or KsmSettings(), **{k: v for k, v in settings.items() if k in _KSM_FIELDS})
    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not paths:
        raise ValueError("no input given")
    bases = options.bases_for(paths)
    configs = vm_configs_of(paths, options)  # before any hashing: a bad file fails now
    report = progress or _silent
    limit = options.memory_limit or default_memory_limit()
    cut = out_of_core_partitions(paths, limit, options.workers)
    if cut is not None and options.samples:
        raise ValueError(f"--samples: {SERIES_REFUSED}")
    if cut is not None and options.compress:
        raise KsmAnalyzeError(f"--compress needs the pages' bytes: these {cut[1]:,} pages of "
                              "fingerprint files hold none (give the dumps)")
    if cut is not None and options.vm_configs:
        raise ValueError("--vm-config: these fingerprint files are aggregated out of core "
                         "(--memory-limit), which does not take VM configurations yet; give "
                         "a larger --memory-limit")
    if cut is not None:
        return _out_of_core(paths, options, ksm, partitions=cut[0], jobs=cut[3], limit=limit,
                            pages=cut[1], in_memory=cut[2], report=report)

    with contextlib.ExitStack() as stack:
        sources = open_sources(paths, options, ksm.page_size, bases, stack)
        stack.enter_context(watching(s.reader.path for s in sources if s.reader))  # changed?
        total = sum(s.reader.page_counts()[PageState.DATA] for s in sources
                    if s.reader is not None and s.prints is None) * ksm.page_size
        done: dict[str, int] = {}
        report("all inputs", 0, total)

        def reading(name: str) -> ProgressCallback:
            def update(n: int, of: int) -> None:
                report(name, n, of)
                done[name] = n
                report("all inputs", sum(done.values()), total)
            return update

        started = time.perf_counter()
        all_prints, all_readers = fingerprint_sources(
            sources, options, reading, tasks=lambda n, of: report("Dask tasks", n, of))
        # Samples of one guest over time are one input: its latest sample.
        all_prints = [input_name(fp) for fp in all_prints]
        if options.samples:
            all_prints = _given_samples(all_prints, sources, options)
        samples = group_samples(all_prints)
        for members in samples.series:  # samples are compared by content hash
            for i in members if len(members) > 1 else ():
                reader = all_readers[i]
                if all_prints[i].content is None and reader is not None:
                    all_prints[i] = add_content_hashes(all_prints[i], reader)
        prints = [all_prints[i] for i in samples.latest]
        readers = [all_readers[i] for i in samples.latest]
        hashed = time.perf_counter()
        rmap_note = None
        if ksm.rmap_item_bytes is None:
            recorded, rmap_note = recorded_rmap_item_bytes(prints)
            ksm = replace(ksm, rmap_item_bytes=recorded)
        classes = classify(prints, readers, options,
                           progress=lambda n, of: report("comparing", n, of))
        compared = time.perf_counter()
        all_masks = [scan_mask(fp, options.scope) for fp in all_prints]
        if options.vm_configs:  # an input whose VM opted out: no page of it scanned
            off = {os.fspath(p) for p, c in zip(paths, configs, strict=True)
                   if c is not None and not c.eligible(options.scope.value)}
            files = [s.path for s in sources for _ in range(1 + len(s.more))]
            all_masks = [opted_out(m) if os.fspath(f) in off else m
                         for m, f in zip(all_masks, files, strict=True)]
        masks = [all_masks[i] for i in samples.latest]
        still = build_content_table(prints, classes, masks)
        huge = huge_regions(prints, classes.labels, classes.n_classes, options.scope)
        if samples.over_time:  # count what KSM keeps: the steady view
            view_prints, labels, late, tl, stab = steady_tables(
                prints, masks, classes.labels, all_prints, all_masks, samples, ksm)
            table = build_content_table(view_prints, replace(classes, labels=labels), masks)
        else:
            table, late, stab = still, 0, None
            tl = still_timeline(prints, masks, classes.labels)
        top = top_contents(still, classes, prints, readers, top=options.top,
                           show_content=options.show_content)
        near, near_notes = no_near_duplicates(), []
        if options.near_duplicates:  # reads every distinct content again: only when asked
            found = near_duplicates(prints, classes.labels, masks, readers,
                                    top=options.near_duplicates,
                                    max_page_sharing=ksm.max_page_sharing)
            near = {"near_duplicates": found.groups,
                    "near_duplicate_histogram": found.histogram}
            near_notes = found.warnings
        compressed = None
        if options.compress:
            if samples.over_time or options.policy:
                raise ValueError("--compress prices the pages of inputs seen once, merged "
                                 "across all of them: not with samples over time, --domain, "
                                 "--numa-nodes or --merge zero-only")
            started_compress = time.perf_counter()
            compressed = compress_contents(still, prints, masks, classes.labels, readers,
                                           codec=options.compress,
                                           sample=options.compress_sample,
                                           jobs=options.workers)
            compress_seconds = time.perf_counter() - started_compress

    timings = {"stage1_seconds": hashed - started, "stage2_seconds": compared - hashed,
               "inputs_from_cache": sum(s.origin == "cache" for s in sources),
               "inputs_from_fingerprint_files": sum(s.origin == "file" for s in sources)}
    if compressed is not None:
        timings["compress_seconds"] = compress_seconds
    # What the contents are and where they lie does not depend on a policy; what merges does.
    where = address_map(still, classes, prints, masks, scope=options.scope)
    over = model_host(tl, ksm, recorded_machine(prints), stability_table=stab,
                      late_duplicates=late)
    more = {"steady_state": over.steady} if over.steady else {}
    if samples.over_time:
        more["if_memory_stood_still"] = still.counters(ksm)
    tables = {**over.tables(), "top_contents": top, "address_map": where, **near,
              "compression": compressed.table if compressed else no_compression()}
    return _analysis(paths, options, ksm, table, prints, masks, classes.stats, timings, more,
                     tables, rmap_note=rmap_note, warnings_after=[*over.warnings, *near_notes],
                     huge=huge, compressed=compressed,
                     vm_configs=vm_config_records(paths, configs, options))


def _analysis(paths: Sequence[str | os.PathLike[str]], options: ScanOptions,
              ksm: KsmSettings, table: ContentTable, prints: Sequence[Fingerprints],
              masks: Sequence[ScanMask], stats: StageStats, timings: Mapping[str, float],
              more: Mapping[str, KsmCounters] | None, tables: dict[str, Columns], *,
              rmap_note: str | None, warnings_before: Sequence[str] = (),
              warnings_after: Sequence[str] = (), zero_pages_found: int | None = None,
              huge: HugeRegions | None = None,
              compressed: Compressed | None = None,
              vm_configs: Sequence[dict[str, Any]] = ()) -> Analysis:
    """The :class:`Analysis` of a core table, in memory or out of core alike: the merging
    policy applied, then the summary tables and pairwise beside the given ``tables``
    (``zero_pages_found``: for fingerprints held without their pages, the files' count;
    ``huge``: the inputs' 2 MiB pages, set beside the 4 KiB savings as ``huge_pages``)."""
    unrestricted, domain_names, nodes, across = None, [], [], None
    numa = empty_numa_table()
    if options.policy:
        unrestricted = table.counters(ksm)
        domains, domain_names = options.domain_of(table.names) if options.domains else (None, [])
        zero_only = options.merge == "zero-only"
        if options.numa_nodes is not None:  # a merge unit is a domain and a node (whatif/numa)
            nodes = node_of(table.names, table.column("pages") * table.page_size,
                            options.numa_nodes, options.numa_pins)
            across = table.with_policy(domains, zero_only=zero_only)
            table = table.with_policy(merge_units(domains, nodes, options.numa_nodes),
                                      zero_only=zero_only)
            numa = numa_table(table, across, nodes, options.numa_nodes, ksm)
        else:
            table = table.with_policy(domains, zero_only=zero_only)
    pairs = pairwise(table, max_page_sharing=ksm.max_page_sharing, top=options.pairs_top)
    note = pairs.note()
    tables = {**summary_tables(table, ksm, prints, masks, stats, timings, more), **tables,
              "pairwise": pairs.rows, "numa": numa}
    if huge is not None:
        per_input = tables["per_input"]
        tables["huge_pages"] = huge.table(
            [str(p) for p in per_input["input"]],
            ksm_saved_alone(per_input["self_sharing_pages"], per_input["zero_pages"], ksm),
            int(tables["savings"].at("saved", "with_zero_pages_pages")))
    if compressed is not None:  # the savings waterfall's last step
        tables["savings"] = with_savings_row(tables["savings"], tables["compression"])
    if zero_pages_found is not None:
        stages = tables["stages"]
        values = np.array(stages.data["value"], object)
        values[list(stages.data["statistic"]).index("zero_pages_found")] = zero_pages_found
        tables["stages"] = Columns({"statistic": stages.data["statistic"], "value": values},
                                   "statistic")
    return Analysis(
        columns={name: tables[name] for name in TABLES},
        counters=table.counters(ksm),
        options=options,
        ksm=ksm,
        contents=table,
        inputs=[os.fspath(p) for p in paths],
        warnings=[*warnings_before, *_warnings(prints, options), *twin_warnings(pairs, prints),
                  *([rmap_note] if rmap_note else []), *([note] if note else []),
                  *warnings_after],
        unrestricted=unrestricted,
        domains=domain_names,
        nodes=nodes,
        across_nodes=across,
        compressed=compressed,
        vm_configs=list(vm_configs),
    )


def vm_configs_of(paths: Sequence[str | os.PathLike[str]], options: ScanOptions
                  ) -> list[VmConfig | None]:
    """Each input's VM configuration of ``options.vm_configs`` (None: none given, assumed
    eligible); [] without ``vm_configs``.

    Raises:
        KsmAnalyzeError: a configuration file cannot be read (one line).
        ValueError: a configuration names no input, an input has two, or two describe one VM.
    """
    if not options.vm_configs:
        return []
    return match(read_configs(options.vm_configs), paths)


def vm_config_records(paths: Sequence[str | os.PathLike[str]],
                      configs: Sequence[VmConfig | None], options: ScanOptions
                      ) -> list[dict[str, Any]]:
    """``Analysis.vm_configs``: a record per input given with ``vm_configs`` (else none)."""
    scope = options.scope.value
    if not configs:
        return []
    return [{"input": os.fspath(p), **(c.record(scope) if c is not None else {
                "name": None, "config": None, "format": None, "eligible": True,
                "reasons": ["no VM configuration given: assumed eligible"],
                "other_reasons": [], "numa_nodes": [], "notes": []})}
            for p, c in zip(paths, configs, strict=True)]


NOT_OUT_OF_CORE = ("convergence", "timeline", "ksmd_settings", "address_map", "huge_pages")
"""Tables that need every page of every input in memory (the ksmd time model replays them
in address order; the address map bins them; 2 MiB pages are compared label by label): not
computed out of core."""


CLUSTER_PARTITIONS = 16
"""Fewest partitions of the content hashes on a Dask cluster (``--scheduler``): each is a
task, and the workers count them side by side."""


_TIMELINE_COLUMNS = ("full_scans", "time_seconds", "pages_to_scan", "pages_shared",
                     "pages_sharing", "pages_unshared", "pages_volatile", "pages_scanned",
                     "pages_skipped", "ksm_zero_pages", "ksm_rmap_items", "general_profit",
                     "ksmd_cpu_percent")


def _out_of_core(paths: Sequence[str | os.PathLike[str]], options: ScanOptions,
                 ksm: KsmSettings, *, partitions: int, jobs: int, limit: int, pages: int,
                 in_memory: int, report: ProgressReporter) -> Analysis:
    """:func:`analyze` of fingerprint files that do not fit in ``limit`` bytes: the core
    table built a partition of the content hashes at a time (:mod:`.fleet.aggregate`), and
    every table computed from it; the tables of :data:`NOT_OUT_OF_CORE` are left empty, and
    a warning says so."""
    if options.scheduler:  # the steps on the workers; the client takes rows and counts
        agg = aggregate_on_cluster(
            paths, scheduler=options.scheduler, scope=options.scope, page_size=ksm.page_size,
            prefix_bytes=options.hashed_bytes(ksm.page_size),
            partitions=max(partitions, CLUSTER_PARTITIONS), check_guest=guest_check(),
            tasks=lambda n, of: report("Dask tasks", n, of), ksm=ksm)
    else:
        agg = aggregate(paths, scope=options.scope, page_size=ksm.page_size,
                        prefix_bytes=options.hashed_bytes(ksm.page_size), partitions=partitions,
                        jobs=jobs, check_guest=guest_check(),
                        progress=lambda n, of: report("fingerprint files", n, of), ksm=ksm)
    partitions = agg.partitions
    prints, masks, table = agg.prints, agg.masks, agg.table
    rmap_note = None
    if ksm.rmap_item_bytes is None:
        recorded, rmap_note = recorded_rmap_item_bytes(prints)
        ksm = replace(ksm, rmap_item_bytes=recorded)
    # No page bytes here: the top contents are known by their hashes, as in memory for
    # fingerprint files whose dumps are elsewhere.
    classes = ContentClasses([], 0, agg.stats, {})
    top = top_contents(table, classes, [], [], top=options.top,
                       show_content=options.show_content)
    timings = {"stage1_seconds": agg.read_seconds, "stage2_seconds": agg.count_seconds,
               "inputs_from_cache": 0, "inputs_from_fingerprint_files": len(paths)}
    still = agg.if_memory_stood_still(ksm)
    note = (f"out of core: these {pages:,} pages of fingerprint files need about "
            f"{size_text(in_memory)} in memory, more than "
            f"--memory-limit {size_text(limit)}, so they were aggregated in {partitions:,} "
            f"part{'s' if partitions > 1 else ''} of the content hashes; the tables "
            f"{', '.join(NOT_OUT_OF_CORE)} and the host's steady_state counters need every "
            f"page in memory and were not computed (a --memory-limit above "
            f"{size_text(in_memory)} gives them)")
    notes = [note]
    if options.near_duplicates:
        notes.append("near_duplicates: fingerprint files hold no page bytes, and out of core "
                     "reads only them: the tables near_duplicates and "
                     "near_duplicate_histogram are left empty")
    return _analysis(paths, options, ksm, table, prints, masks, agg.stats, timings,
                       {"if_memory_stood_still": still} if still else None, {
        "convergence": Columns({"item": [], "value": []}, "item"),
        "timeline": Columns({c: [] for c in _TIMELINE_COLUMNS}),
        "ksmd_settings": Columns.from_records([], list(SETTINGS_COLUMNS)),
        "stability": Columns.from_records(agg.stability or [], list(STABILITY_COLUMNS)),
        "address_map": Columns({c: [] for c in ("input", "bin", "first_address",
                                                 "last_address", "pages", *ADDRESS_KINDS)}),
        "top_contents": top, **no_near_duplicates(), "huge_pages": no_huge_pages(),
        "compression": no_compression(),
    }, rmap_note=rmap_note, warnings_before=notes, zero_pages_found=agg.zero_pages_found)


def _warnings(prints: Sequence[Fingerprints], options: ScanOptions) -> list[str]:
    """The readers' warnings, and one per process core read under ``--scope mergeable``."""
    warnings = [w for fp in prints for w in fp.warnings]
    capped = options.jobs_warning()
    if capped:
        warnings.append(capped)
    if options.scope is Scope.MERGEABLE:
        warnings += [
            f"{fp.path}: a process core does not record which VMAs are mergeable; its "
            "pages are counted as with --scope anon"
            for fp in prints
            if fp.address_space == "virtual" and fp.format is not DumpFormat.SNAPSHOT
        ]
    return warnings


def _given_samples(prints: list[Fingerprints], sources: Sequence[Source],
                   options: ScanOptions) -> list[Fingerprints]:
    """The inputs ``--samples`` names as samples of one input, timed by their files' mtime
    (a fingerprint file: its dump's)."""
    files = [s for s in sources for _ in range(1 + len(s.more))]
    out = []
    for fp, source in zip(prints, files, strict=True):
        name = options.samples_of(source.path)
        if name is None:
            out.append(fp)
            continue
        recorded = fp.source.get("mtime_ns") if fp.source else None
        ns = recorded if isinstance(recorded, int) else os.stat(source.path).st_mtime_ns
        out.append(as_sample(fp, name, ns / 1e9))
    return out


def _silent(task: str, done: int, total: int) -> None:
    """The progress reporter when nobody listens."""
