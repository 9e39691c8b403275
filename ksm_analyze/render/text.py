"""The Analysis tables, and what ``info``, ``capture`` and ``ksm-status`` found, as text.

Nothing here computes a number; it only formats what the library returns. ``scan`` reads
the analysis' plain columns (``Analysis.columns``), so printing it never imports pandas.

Text that came from a file (input names, paths, header facts, range labels, warnings)
goes through :func:`~ksm_analyze.errors.printable`: every table cell, every ``Warning:``
line and every ``key: value`` line, so a file never writes control characters or a line of
its own to the terminal. JSON output is left exact (``json`` escapes them itself).
"""

from __future__ import annotations

import itertools
import math
import textwrap
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..analysis import Analysis
from ..eligibility import RULES
from ..errors import printable
from ..pages import Extent, PageState
from ..units import counted, human_bytes
from ..whatif.near_duplicates import METHOD
from .files import to_json

if TYPE_CHECKING:
    from ..columns import Columns
    from ..formats.base import DumpReader
    from ..hashing.stage1 import Fingerprints
    from ..live.capture import CaptureSummary
    from ..live.status import KsmStatus
    from ..planning.marginal import Addition
    from ..planning.plan import Plan
    from ..whatif.tune import Tune

__all__ = ["render_capture", "render_info", "render_plan", "render_scan", "render_status",
           "render_tune"]

_SCENARIO_TITLES = {  # each key's words (docs/glossary.md)
    "with_zero_pages": "with zero pages",
    "without_zero_pages": "without zero pages",
    "steady_state": "ksmd replayed, steady",
    "if_memory_stood_still": "if memory stood still",
}
_SAVINGS_SCENARIOS = ("with_zero_pages", "without_zero_pages")


def _count(n: Any) -> str:
    return f"{int(n):,}"


TEXT_ROWS = 50
"""Rows of a per-input table ``scan`` prints; a fleet's others are in --json and --csv."""


def _input_table(headers: Sequence[str], rows: Iterable[Sequence[str]], inputs: int) -> str:
    """:func:`_table` of a table with a row per input: its first :data:`TEXT_ROWS` rows,
    and a line saying how many more there are."""
    text = _table(headers, itertools.islice(rows, TEXT_ROWS))
    more = inputs - TEXT_ROWS
    return text + (f"\n  ... and {more:,} more inputs (every input: --json, --csv)"
                   if more > 0 else "")


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], indent: str = "  ") -> str:
    """Left-align the first column, right-align the others (cells escaped: ``printable``)."""
    headers = [printable(h) for h in headers]
    rows = [list(map(printable, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return (indent + "  ".join([first, *rest])).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


_SAVINGS_LABELS = {
    "memory_before": "memory before",
    "zero_pages": "  zero pages merged",
    "sharing_within_inputs": "  sharing within inputs",
    "sharing_across_inputs": "  sharing across inputs",
    "saved": "saved",
    "memory_after": "memory after KSM",
    "pages_after_merging": "  pages left after merging",
    "rmap_overhead": "  rmap_item overhead",
    "compressed_zram": "compressed (zram)",
}
_ZERO_NOTE = {
    True: "  A snapshot knows which pages are resident and which map the zero page (unless\n"
          "  capture said otherwise): 'with zero pages' is the prediction.",
    False: "  A guest dump cannot tell zero pages the guest wrote (resident on the host, merged "
           "by\n  KSM) from pages it never touched (cost the host nothing): 'with zero pages' "
           "counts every\n  zero page as host memory, 'without zero pages' none. 'memory after "
           "KSM' differs\n  only by what merged zero pages still cost; the savings are an upper "
           "and a lower bound.",
}


def render_scan(result: Analysis) -> str:
    """The readable ``scan`` report: inputs, host prediction, savings, histogram, stages."""
    ksm, tables = result.ksm, result.columns
    pi, host, sav = tables["per_input"], tables["host"], tables["savings"]
    columns = host.names
    scen = [s for s in _SAVINGS_SCENARIOS if s in columns]
    titles = [_SCENARIO_TITLES[s] for s in scen]
    out = ["Inputs", _input_table(
        ["input", "format", "size", "non-zero", "zero", "holes", "excluded", "not saved",
         "file/shared", "distinct", "self-sharing"],
        ([name, r["format"], human_bytes(r["bytes"]),
          *(_count(r[c]) for c in ("nonzero_pages", "zero_pages", "hole_pages",
                                   "excluded_pages", "not_saved_pages", "ineligible_pages",
                                   "distinct_contents", "self_sharing_pages"))]
         for name, r in zip(result.names, pi.rows(), strict=True)),
        len(result.names),
    ), ("  (pages; file/shared = file-backed or shared memory, which KSM never merges;\n"
        "   self-sharing = pages saved merging within that input alone)")]
    out += vm_config_lines(result)
    if any(space == "virtual" for space in pi["address_space"]):
        out += _process_sections(result)
    out += ["", (f"KSM prediction, all inputs on one host (max_page_sharing="
                 f"{ksm.max_page_sharing}, use_zero_pages={int(ksm.use_zero_pages)})")]
    if "if_memory_stood_still" in columns:
        out.append("  Observed over time: the columns count what KSM keeps (pages that change "
                   "faster than\n  ksmd merges them never stay merged); 'if memory stood "
                   "still' counts the last samples\n  as one frozen moment.")
    out.append(_table(["counter", *(_SCENARIO_TITLES[s] for s in columns)], (
        [name, *(human_bytes(host.at(name, s)) if name == "general_profit"
                 else _count(host.at(name, s)) for s in columns)] for name in host.keys)))
    out += _policy(result)
    out += _numa(result)
    out += ["", "Savings", _table(["", *titles], (
        [label, *(f"{human_bytes(sav.at(item, f'{s}_bytes'))} "
                  f"({sav.at(item, f'{s}_percent'):.1f}%)" for s in scen)]
        for item, label in _SAVINGS_LABELS.items() if item in sav.keys))]
    out.append("  Memory after KSM is what the host needs: the pages left after merging plus "
               f"KSM's\n  {result.ksm.rmap_bytes}-byte rmap_item per page it tracks; 'plan' "
               "counts each host the same way.")
    out.append(_ZERO_NOTE[all(f == "snapshot" for f in pi["format"])])
    before = sav.at("memory_before", "with_zero_pages_bytes")
    after = sav.at("memory_after", "with_zero_pages_bytes")
    if after:
        out.append(f"  Headroom: if every merged page were written again (copy-on-write), the "
                   f"host would need\n  the memory before KSM, {human_bytes(before)}: "
                   f"{before / after:.1f}x what it needs after KSM.")
    out += ["", "Sharing-degree histogram (with zero pages)", _table(
        ["copies", "contents", "pages", "after merging", "size", "after merging"],
        ([*(_count(r[c]) for c in ("copies", "contents", "pages_referenced",
                                   "pages_after_merging")),
          human_bytes(r["bytes_referenced"]), human_bytes(r["bytes_after_merging"])]
         for r in tables["histogram"].rows()))]
    out += _compression(result)
    out += _huge_pages(tables["huge_pages"])
    out.append("")
    st = tables["stages"].by_key("value")
    if st["verified"]:
        verified = f"all {counted(int(st['merges']), 'merge')} verified byte for byte"
    elif st["hash_bits"] == 128:
        verified = (f"{counted(int(st['merges']), 'merge')} NOT verified byte for byte (a "
                    "dump is not readable here): two pages with equal 128-bit content hashes "
                    "count as one; "
                    f"chance of any false merge below {_collision_bound(st, 128):.1e}")
    else:
        verified = ("NOT verified (--no-verify): two pages with equal 64-bit prefix and full "
                    "hashes count as one; chance of any false merge below "
                    f"{_collision_bound(st, 64):.1e}")
    out.append(
        f"Fingerprinting: {_count(st['pages_hashed'])} pages hashed over their first "
        f"{st['prefix_bytes']} bytes, {_count(st['zero_pages_found'])} zero pages, "
        f"{_count(st['prefix_candidates'])} candidates, {_count(st['false_candidates'])} false "
        f"candidates, {_count(st['full_hashes'])} full-page hashes, "
        f"{_count(st['full_compares'])} full compares, "
        f"{_count(st['hash_collisions'])} hash collisions; {verified}."
    )
    reused = [f"{n:,} from the cache (not read again)" if what == "cache" else
              f"{n:,} from fingerprint files"
              for what, n in (("cache", st["inputs_from_cache"]),
                              ("file", st["inputs_from_fingerprint_files"])) if n]
    if reused:
        skipped = st["inputs_from_cache"] + st["inputs_from_fingerprint_files"]
        out.append(f"Stage 1 skipped for {skipped:,} of {counted(len(result.names), 'input')}: "
                   f"{' and '.join(reused)}.")
    out += _over_time(tables)
    out += near_duplicates_text(tables, result.options.near_duplicates, ksm.page_size)
    out += [f"Warning: {printable(w)}" for w in result.warnings]
    return "\n".join(out)


_THP_BASIS = {"recorded": "THPs as recorded",
              "if_thp_backed": "THPs: every huge page, as if THP-backed",
              "mixed": "THPs as recorded, else every huge page"}


def _huge_pages(huge: Columns) -> list[str]:
    """The host's 2 MiB what-if, three lines (nothing where not computed)."""
    if not len(huge["input"]):
        return []
    h = huge.rows()[-1]
    basis = _THP_BASIS[h["basis"]]
    intact = (f"  merging only whole identical 2 MiB pages would save "
              f"{human_bytes(h['thp_intact_saved_bytes'])} "
              f"({counted(h['huge_pages'], 'huge page')}, "
              f"{_count(h['distinct_huge_pages'])} distinct);")
    split = (f"  KSM at 4 KiB saves {human_bytes(h['ksm_saved_bytes'])}, splitting "
             f"{_count(h['split_huge_pages'])} of {counted(h['thp_huge_pages'], 'THP')}: "
             f"{human_bytes(h['split_cost_bytes'])} more than THPs kept whole.")
    return ["", f"Huge pages, all inputs (2 MiB, every page in scope; {basis})", intact, split]


def near_duplicates_text(tables: Mapping[str, Columns], asked: int, page_size: int
                         ) -> list[str]:
    """The near-duplicates section (``--near-duplicates N``): nothing when not asked."""
    hist = tables["near_duplicate_histogram"]
    if not len(hist):
        return []
    groups = tables["near_duplicates"]
    out = ["", f"Near-duplicates (--near-duplicates {asked:,}, the largest groups)",
           textwrap.fill(f"Found as {METHOD}.", 96, initial_indent="  ",
                         subsequent_indent="  ")]
    if not len(groups):
        return [*out, "  none found"]

    def spread(low: int, high: int) -> str:
        return f"{low:,}" if low == high else f"{low:,}-{high:,}"

    out.append(_table(
        ["group", "pages", "contents", "inputs", "bytes differing", "first at",
         "differing ranges", "saved if equal"],
        ([_count(r["group"]), _count(r["pages"]), _count(r["contents"]),
          _count(r["input_count"]),
          spread(r["differing_bytes_min"], r["differing_bytes_max"]),
          _count(r["first_differing_offset"]),
          " ".join(r["differing_ranges"][:4]) + (
              f" +{r['differing_range_count'] - 4:,} more"
              if r["differing_range_count"] > 4 else ""),
          f"+{human_bytes(r['extra_saved_bytes'])} ({_count(r['extra_saved_pages'])} pages)"]
         for r in groups.rows())))
    for kind, title in (("differing_bytes", "bytes differing"),
                        ("first_differing_offset", "first differing byte")):
        cells = [f"{spread(r['low'], r['high'])}: {_count(r['contents'])}"
                 for r in hist.rows() if r["histogram"] == kind and r["contents"]]
        out.append(f"  Contents by {title}: {', '.join(cells)}")
    out.append(textwrap.fill(
        f"(byte offsets in a {page_size:,}-byte page, ranges inclusive; contents compared "
        "with their group's representative, which is not counted; saved if equal: what KSM "
        "would save beyond today were they one content)", 96, initial_indent="  ",
        subsequent_indent="   "))
    return out


def _times(ratio: Any) -> str:
    """A ratio as ``8.8x``; ``-`` where there is none (nothing stored)."""
    return "-" if ratio is None or (isinstance(ratio, float) and math.isnan(ratio)) \
        else f"{ratio:.1f}x"


def _compression(result: Analysis) -> list[str]:
    """The ``compression`` table (``--compress``): nothing without it."""
    table = result.columns["compression"]
    if not len(table["input"]):
        return []
    rows = list(table.rows())
    sampled = any(r["compressed_pages"] < r["distinct_pages"] for r in rows)

    def zram(r: Mapping[str, Any]) -> str:
        text = f"{human_bytes(r['zram_bytes'])} {_times(r['zram_ratio'])}"
        if sampled:
            text += f" ({_times(r['zram_ratio_low'])}-{_times(r['zram_ratio_high'])})"
        return text

    names = [*result.names, "host"]
    out = ["", f"Compression of what KSM leaves: {printable(rows[0]['codec'])}", _table(
        ["input", "size", "after dedup", "zram" + (" (95% interval)" if sampled else ""),
         "zswap", "combined"],
        ([name, human_bytes(r["bytes"]),
          f"{human_bytes(r['distinct_bytes'])} {_times(r['dedup_ratio'])}", zram(r),
          f"{human_bytes(r['zswap_bytes'])} {_times(r['zswap_ratio'])}",
          f"{_times(r['zram_combined_ratio'])} / {_times(r['zswap_combined_ratio'])}"]
         for name, r in itertools.islice(zip(names, rows, strict=True), TEXT_ROWS + 1)))]
    host = rows[-1]
    out.append(
        f"  (after dedup: a page per non-zero content, within the input alone on its row, "
        f"across all\n   inputs on host's; host: {_count(host['same_filled_pages'])} "
        f"same-filled pages zram stores as a flag, {_count(host['zram_huge_pages'])} it stores "
        f"whole;\n   {_count(host['zswap_rejected_pages'])} pages zswap rejects "
        "(a page each); combined = size / zram, size / zswap"
        + (f";\n   {_count(host['compressed_pages'])} pages sampled for host's row, "
           "figures scaled to all)" if sampled else ")"))
    return out


def _policy(result: Analysis) -> list[str]:
    """One line: what a merging policy costs against no policy (nothing without one)."""
    u, c = result.unrestricted, result.counters
    if u is None:
        return []
    if result.domains:
        sizes = Counter(result.domain_numbers())
        what = "pages merge only within domains " + ", ".join(
            f"{printable(name)} ({counted(sizes.get(k, 0), 'input')})"
            for k, name in enumerate(result.domains))
    else:
        what = ""
    if result.options.numa_nodes is not None:
        numa = (f"a NUMA node (merge_across_nodes=0, "
                f"{counted(result.options.numa_nodes, 'node')})")
        what = f"{what} and within {numa}" if what else f"pages merge only within {numa}"
    if result.options.merge == "zero-only":
        what = f"{what}; only zero pages merge" if what else "only zero pages merge"
    lost = u.general_profit - c.general_profit
    return [(f"  Policy: {what}. general_profit {human_bytes(c.general_profit)} against "
            f"{human_bytes(u.general_profit)} with no policy: it costs {human_bytes(lost)}.")]


def _numa(result: Analysis) -> list[str]:
    """Per NUMA node with merge_across_nodes=0 (only with --numa-nodes): what each node's KSM
    saves, and what merging across nodes would have saved."""
    numa = result.columns["numa"]
    if not len(numa["node"]):
        return []
    rows = numa.rows()
    total = rows[-1]
    out = ["", "NUMA nodes, merge_across_nodes=0 (each node its own KSM; zero pages present)",
           _table(["node", "inputs", "pages", "pages_shared", "pages_sharing", "saved"],
                  ([r["node"], _count(r["input_count"]), _count(r["pages"]),
                    _count(r["pages_shared"]), _count(r["pages_sharing"]),
                    human_bytes(r["saved_bytes"])] for r in rows))]
    out.append(f"  Merging across nodes (merge_across_nodes=1) would save "
               f"{human_bytes(total['saved_across_nodes_bytes'])}: keeping nodes apart costs "
               f"{human_bytes(total['lost_bytes'])} ({_count(total['lost_pages'])} pages).")
    return out


def vm_config_lines(result: Analysis) -> list[str]:
    """With --vm-config: each input's VM, whether KSM scans it, and every reason why not
    (nothing without --vm-config)."""
    records = result.vm_configs
    if not records:
        return []
    out = ["", f"VM configurations (--vm-config; --scope {result.options.scope.value})",
           _input_table(
               ["input", "VM", "format", "KSM scans it", "config"],
               ([name, r["name"] or "-", r["format"] or "-", "yes" if r["eligible"] else "NO",
                 r["config"] or "none given: assumed eligible"]
                for name, r in zip(result.names, records, strict=True)), len(records))]
    for name, r in zip(result.names, records, strict=True):
        if r["config"] is None:
            continue
        out += [f"  {name}: {why}" for why in r["reasons"]]
        out += [f"  {name}: (not under this scope) {why}" for why in r["other_reasons"]]
        out += [f"  {name}: note: {note}" for note in r["notes"]]
    if not all(r["eligible"] for r in records):
        out.append("  (an input KSM does not scan counts in no number below: its pages are "
                   "the exclusion rule vm_config)")
    return out


def _process_sections(result: Analysis) -> list[str]:
    """Eligibility exclusions and per-process ksm_stat, for process memory inputs."""
    scope = result.options.scope.value
    ex = result.columns["exclusions"]
    rules = [r for r in ex.names if any(ex[r])]
    out = ["", f"Excluded from KSM's scan (--scope {scope}; pages per rule)"]
    if rules:
        counts = zip(*(ex[r] for r in rules), strict=True)
        out.append(_input_table(
            ["input", *rules],
            ([name, *map(_count, row)] for name, row in zip(result.names, counts, strict=True)),
            len(result.names)))
        out += [f"  {r}: {RULES[r]}" for r in rules]
    else:
        out.append("  none")
    out.append("")
    out.append("Per process: /proc/PID/ksm_stat after KSM converges (with zero pages)")
    out.append(_input_table(
        ["input", "ksm_rmap_items", "ksm_merging_pages", "ksm_zero_pages", "ksm_process_profit"],
        ([name, _count(r["ksm_rmap_items"]), _count(r["ksm_merging_pages"]),
          _count(r["ksm_zero_pages"]), human_bytes(r["ksm_process_profit"])]
         for name, r in zip(result.names, result.columns["per_input"].rows(), strict=True)),
        len(result.names),
    ))
    return out


def _collision_bound(stats: Mapping[str, Any], bits: int) -> float:
    n = float(stats["prefix_candidates"])
    return n * n / 2.0 ** (bits + 1)


def _over_time(tables: Mapping[str, Columns]) -> list[str]:
    """The stability of inputs seen over time, and when ksmd gets there at what CPU."""
    out = []
    stab = tables["stability"]
    if len(stab["input"]):
        out += ["", "Over time (pages per input, first sample to last)", _table(
            ["input", "samples", "over", "unchanged", "changed", "appeared", "gone",
             "changed/s", "stable dups", "coinciding dups"],
            ([printable(r["input"]), _count(r["samples"]), _duration(r["observed_seconds"]),
              *(_count(r[c]) for c in ("pages_unchanged", "pages_changed", "pages_appeared",
                                       "pages_gone")),
              f"{r['change_rate_per_second']:.3g}",
              _count(r["stable_duplicate_pages"]), _count(r["coinciding_duplicate_pages"])]
             for r in stab.rows()))]
    if not len(tables["convergence"]):  # not computed (out of core: a warning says so)
        return out
    c = tables["convergence"].by_key("value")
    when = ", ".join(f"{label} after {_duration(c[key])}" for label, key in (
        ("50%", "time_to_50_percent_seconds"), ("90%", "time_to_90_percent_seconds"))
        if c[key] is not None)
    steady = (f"steady state after {_duration(c['steady_state_seconds'])} "
              f"({counted(c['full_scans_to_steady_state'], 'full scan')})"
              if c["steady_state_seconds"] is not None else "no steady state in the scans replayed")
    rate = ("the scan-time advisor" if c["advisor_mode"] == "scan-time"
            else f"pages_to_scan={c['pages_to_scan']}")
    out.append(
        f"Convergence, ksmd replayed with the rules of {c['kernel_rules']}, smart_scan="
        f"{int(c['smart_scan'])}, {rate}, sleep_millisecs={c['sleep_millisecs']}: "
        f"{_count(c['scanned_pages'])} pages; general_profit reaches "
        f"{when + ', ' if when else ''}{steady}; then a full scan takes "
        f"{_duration(c['full_scan_seconds'])}, ksmd at {c['ksmd_cpu_percent']:.1f}% of a CPU.")
    if c["late_duplicate_pages"]:
        out.append(f"Late duplicates: {counted(c['late_duplicate_pages'], 'page')} took "
                   "their content while KSM was running; with smart_scan on they merge only "
                   "with a page already merged, so they are counted unmerged (docs/model.md).")
    if c["cheapest_setting"]:
        out.append(f"ksmd settings: {c['cheapest_setting']}.")
    return out


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def render_info(path: str, reader: DumpReader, max_ranges: int = 50) -> str:
    """The ``info`` report of an open dump: format, header facts, ranges, pages per state."""
    out = [f"{printable(path)}: {reader.format.value}"]
    if (src := reader.source) is not None:
        out[0] += f" inside {src.codec.value}"
        out.append(f"  unwrapped: {src.codec.value}, {human_bytes(src.compressed_size)} "
                   f"compressed -> {human_bytes(src.size)} decompressed (ratio "
                   f"{src.size / max(src.compressed_size, 1):.1f}); file offsets below are "
                   "offsets in the decompressed stream")
    out += _facts(reader.info())
    out += _ranges_and_states(reader.extents, reader.page_size, reader.page_counts(),
                              max_ranges)
    out += [f"Warning: {printable(w)}" for w in reader.warnings]
    return "\n".join(out)


def render_fingerprint_info(path: str, prints: Sequence[Fingerprints], meta: Mapping[str, Any],
                            max_ranges: int = 50) -> str:
    """The ``info`` report of a fingerprint file: where it came from, how it was hashed,
    and per input what ``info`` shows of a dump (header facts, ranges, pages per state)."""
    from ..fleet.fingerprint_files import unchanged

    src, opts = meta["source"], meta["options"]
    here = unchanged(src) if src["size"] else False
    if not prints:
        hashed = "nothing (no inputs)"
    elif prints[0].prefix_bytes < prints[0].page_size:
        hashed = f"the first {prints[0].prefix_bytes} bytes of each page"
    else:
        hashed = "the whole of each page"
    stored = all(fp.content is not None for fp in prints)
    out = [f"{printable(path)}: fingerprint file (written by {printable(meta['tool'])})",
           f"  source dump: {printable(src['path'])} ({human_bytes(int(src['size']))}), "
           + ("here and unchanged" if here else
              "not here or changed since: stage 2 compares content hashes"),
           (f"  hashing: format {printable(opts['format'])}, page size "
            f"{printable(opts['page_size'])}, base "
            f"address {int(opts['base_address']):#x}, {hashed} hashed"),
           "  content hashes: " + ("stored (scan, report and plan work without the source "
                                   "dump)" if stored else "not stored (a cache entry: needs "
                                   "its dump)"),
           f"  inputs: {len(prints):,}"]
    for fp in prints:
        out += ["", (f"Input {printable(fp.path)}: {fp.format.value}, "
                     f"{printable(fp.address_space)} address space")]
        out += _facts(fp.info)
        out += _ranges_and_states(fp.extents, fp.page_size, fp.state_pages, max_ranges)
        zero = fp.zero_pages - fp.state_pages[PageState.ZERO]  # stored, found by content
        out.append(f"  stored pages found all zero when fingerprinted: {zero:,} "
                   f"({human_bytes(zero * fp.page_size)})")
        out += [f"Warning: {printable(w)}" for w in fp.warnings]
    return "\n".join(out)


def _facts(info: Mapping[str, Any]) -> list[str]:
    """``info``'s header facts as ``  key: value`` lines (lists and mappings left out)."""
    return [f"  {printable(k)}: {printable(v)}" for k, v in info.items()
            if not isinstance(v, list | dict)]


def _ranges_and_states(extents: Sequence[Extent], page_size: int,
                       page_counts: Mapping[PageState, int], max_ranges: int) -> list[str]:
    """The ranges and pages-per-state tables of ``info``."""
    out: list[str] = []
    counts = {s.name.lower(): n for s, n in page_counts.items()}
    out.append("")
    shown = extents if len(extents) <= max_ranges else extents[:max_ranges]
    out.append(f"Ranges ({len(extents):,})")
    out.append(
        _table(
            ["address", "size", "file offset", "state", "label"],
            (
                [f"{e.addr:#x}", human_bytes(e.npages * page_size),
                 f"{e.file_offset:#x}" if e.file_offset >= 0 else "-",
                 e.state.name.lower(), e.label]
                for e in shown
            ),
        )
    )
    if len(shown) < len(extents):
        out.append(f"  ... {len(extents) - len(shown):,} more (--ranges N shows more)")
    out.append("")
    out.append("Pages per state (stored pages may still be all zero: 'scan' looks at content)")
    out.append(_table(["state", "pages", "size"],
                      ([k, _count(v), human_bytes(v * page_size)] for k, v in counts.items())))
    return out


_ZERO_SOURCES = {
    "kpageflags": "zero-page mappings found with /proc/kpageflags",
    "pagemap_scan": "zero-page mappings found with PAGEMAP_SCAN",
    "none": "zero-page mappings could NOT be told from written zero pages (needs root, or "
    "Linux 6.7+ for PAGEMAP_SCAN): they count as zero pages, so 'with zero pages' is an "
    "upper bound and 'without zero pages' a lower one",
}


def render_capture(summary: CaptureSummary) -> str:
    """What ``capture`` wrote: per process, pages by what the kernel said of them."""
    size = human_bytes(summary.bytes_written)
    head = (f"Captured {counted(len(summary.processes), 'process', 'processes')} into "
            f"{printable(summary.path)} ({size}, mode 0600); {_ZERO_SOURCES[summary.pfn_flags]}.")
    out = [head]
    out.append(_table(
        ["pid", "command", "VMAs", "present", "stored", "zero page", "swapped", "unreadable"],
        ([str(p["pid"]), str(p["comm"]), _count(p["vmas"]), _count(p["present_pages"]),
          _count(p["stored_pages"]), _count(p["zero_pfn_pages"]), _count(p["swapped_pages"]),
          _count(p["unreadable_pages"])] for p in summary.processes),
    ))
    out.append("  (pages; only present pages that do not map the zero page are stored)")
    out.append(f"Next: ksm-analyze scan {printable(summary.path)}")
    return "\n".join(out)


def render_status(status: KsmStatus, *, as_json: bool = False) -> str:
    """The kernel's KSM counters, and the prediction beside them when there is one."""
    if as_json:
        return to_json({
            "knobs": status.knobs,
            "host": status.host.to_dict(orient="index"),
            "processes": status.processes.to_dict(orient="records"),
        })
    knobs = printable(", ".join(f"{k}={v}" for k, v in status.knobs.items()))
    out = [f"KSM on this host: {knobs}"]
    host = status.host
    compare = "predicted" in host.columns

    def value(name: str, v: Any) -> str:
        return human_bytes(v) if name == "general_profit" else _count(v)

    headers = ["counter", "actual"] + (["predicted", "difference"] if compare else [])
    rows = []
    for name, r in host.iterrows():
        cells = [str(name), value(str(name), r["actual"])]
        if compare:
            cells += [value(str(name), r["predicted"]),
                      f"{int(r['difference']):+,} ({r['difference_percent']:+.2f}%)"]
        rows.append(cells)
    out.append(_table(headers, rows))
    if compare:
        out.append("  (actual counts every process KSM merges on this host; difference = "
                   "actual - predicted)")
    procs = status.processes
    if len(procs):
        out.append("")
        out.append("Per process (/proc/PID/ksm_stat): actual / predicted")
        fields = [c.removesuffix("_actual") for c in procs.columns if c.endswith("_actual")]
        out.append(_table(
            ["input", *fields],
            ([Path(r["input"]).name, *(f"{_count(r[f + '_actual'])} / "
                                        f"{_count(r[f + '_predicted'])}" for f in fields)]
             for _, r in procs.iterrows()),
        ))
    elif compare:
        out.append("No captured process is still running: no per-process comparison.")
    if not compare and int(status.knobs.get("run", 0)) == 0:
        out.append("KSM is not running (run=0): turn it on with 'echo 1 > /sys/kernel/mm/ksm/run'.")
    return "\n".join(out)


_METHODS = {"sharing": "sharing-aware", "first_fit": "first-fit (ignores sharing)",
            "lower_bound": "lower bound (one infinite host)",
            "sharing_zram": "sharing-aware, compressed (zram)"}


def _hosts_saved(saved: int | None, percent: float | None) -> str:
    """``+2 (+50%)``; a dash where the count of hosts was given, not found."""
    if saved is None or percent is None or math.isnan(percent):  # NaN: pandas' None
        return "-"
    return f"{int(saved):+,} ({percent:+.0f}%)"


def render_plan(plan: Plan) -> str:
    """The ``plan`` report: hosts per method, each host's inputs and memory, the projection."""
    ksm = plan.analysis.ksm
    out = [(f"Plan: hosts of {human_bytes(plan.host_memory)}, {human_bytes(plan.capacity)} "
            f"for inputs (max_page_sharing={ksm.max_page_sharing}, "
            f"use_zero_pages={int(ksm.use_zero_pages)})")]
    out.append(_table(["method", "hosts", "memory after KSM", "overcommit", "hosts saved"], (
        [_METHODS[r.method], _count(r.hosts), human_bytes(r.memory_after_bytes),
         f"{r.overcommit:.2f}", _hosts_saved(r.hosts_saved, r.hosts_saved_percent)]
        for r in plan.summary.itertuples())))
    out.append("  (overcommit = the inputs' memory / the hosts' memory; hosts saved: against "
               "first-fit" + (", not for a number of hosts given" if plan.hosts_asked else "")
               + ")")
    out += _policy(plan.analysis)
    for method in ("sharing", "first_fit"):
        rows = plan.hosts[plan.hosts["method"] == method]
        spread = (f", spread over {plan.hosts_asked} hosts as asked (--hosts "
                  f"{plan.hosts_asked})" if plan.hosts_asked and method == "sharing" else "")
        out += ["", f"Hosts, {_METHODS[method]}{spread}"]
        if plan.numa_nodes is not None:  # a row per node of each host
            rows = plan.nodes[plan.nodes["method"] == method]
        out.append(_table(["host", *(["node"] if plan.numa_nodes is not None else []),
                           "before KSM", "after KSM", "saved", "free", "inputs"], (
            [str(r.host), *([str(r.node)] if plan.numa_nodes is not None else []),
             human_bytes(r.memory_before_bytes), human_bytes(r.memory_after_bytes),
             human_bytes(r.saved_bytes), human_bytes(r.free_bytes), " ".join(r.inputs)]
            for r in rows.itertuples())))
    out.append("  (after KSM = what 'scan' of those inputs prints as memory after KSM, "
               "rmap_items included" + ("; plus the inputs below, whole" if
                                        plan.unmerged_inputs else "") + ")")
    out += _unmerged(plan)
    if plan.numa_nodes is not None:
        out.append(f"  (NUMA: each host is {counted(plan.numa_nodes, 'node')} of "
                   f"{human_bytes(plan.capacity // plan.numa_nodes)} with merge_across_nodes=0; "
                   "a node's inputs share only with each other,\n   a host needs the sum of "
                   "its nodes; free = of the node)")
    if len(plan.compressed_hosts):
        out += ["", f"Hosts, {_METHODS['sharing_zram']}"]
        out.append(_table(["host", "before KSM", "zram", "free", "inputs"], (
            [str(r.host), human_bytes(r.memory_before_bytes), human_bytes(r.zram_bytes),
             human_bytes(r.free_bytes), " ".join(r.inputs)]
            for r in plan.compressed_hosts.itertuples())))
        out.append("  (zram = the host's distinct non-zero contents compressed as zram "
                   "stores them, --compress)")
    out += _marginal(plan)
    if len(plan.projection):
        out += ["", "Inputs like these on one host (beyond the samples: a model)"]
        out.append(_table(["inputs", "with KSM", "band (10%-90%)", "without KSM", ""], (
            [_count(r.input_count), human_bytes(r.memory_after_bytes),
             (f"{human_bytes(r.memory_after_low_bytes)} - "
              f"{human_bytes(r.memory_after_high_bytes)}"),
             human_bytes(r.memory_before_bytes), "measured" if r.measured else "model"]
            for r in plan.projection.itertuples())))
        if plan.fits is not None:
            expected, cautious, hopeful = plan.fits
            fit = "input like these fits" if expected == 1 else "inputs like these fit"
            out.append(f"  {expected:,} {fit} in {human_bytes(plan.capacity)} "
                       f"({cautious:,} to {hopeful:,} by the band).")
    out += _overcommit(plan)
    out += [f"Warning: {printable(w)}" for w in plan.warnings]
    return "\n".join(out)


def _unmerged(plan: Plan) -> list[str]:
    """The inputs whose VM opted out of KSM, one line each: counted whole, never merged."""
    if not plan.unmerged_inputs:
        return []
    out = [("  Counted whole, unmerged (their VM configuration keeps KSM off them, "
            "--vm-config):")]
    for r in plan.unmerged_inputs:
        why = "; ".join(text.split(": ", 1)[0] for text in r["reasons"]) or "not scanned"
        out.append(f"    {r['input']}: {human_bytes(r['unmerged_bytes'])} ({printable(why)})")
    return out


MARGINAL_ROWS = 20
"""Rows of the marginal table ``plan`` prints (``--csv``/``--json`` have every one)."""


def _marginal(plan: Plan) -> list[str]:
    """What each input of the sharing-aware placement adds to its host (the first rows)."""
    rows = plan.marginal[plan.marginal["method"] == "sharing"] if len(plan.marginal) else \
        plan.marginal
    if not len(rows):
        return []
    numa = "node" in rows.columns
    out = ["", ("Marginal memory, sharing-aware (what each input adds to its host = what "
                "moving it away frees)"),
           _table(["host", *(["node"] if numa else []), "before KSM", "alone", "adds",
                   "adds %", "input"], (
               [str(r.host), *([str(r.node)] if numa else []),
                human_bytes(r.memory_before_bytes), human_bytes(r.alone_bytes),
                human_bytes(r.added_bytes),
                "-" if r.added_percent is None or r.added_percent != r.added_percent
                else f"{r.added_percent:.1f}%", r.input]
               for r in rows.head(MARGINAL_ROWS).itertuples()))]
    if len(rows) > MARGINAL_ROWS:
        out.append(f"  (the first {MARGINAL_ROWS} of {len(rows):,} inputs; marginal.csv of "
                   "--csv and --json have them all)")
    return out


def render_addition(result: Addition, source: str) -> str:
    """``plan --add``: per new input, what it adds on each host and the host chosen."""
    ksm = result.analysis.ksm
    out = [(f"Adding to the placement of {printable(source)}: hosts of "
            f"{human_bytes(result.host_memory)}, {human_bytes(result.capacity)} for inputs "
            f"(max_page_sharing={ksm.max_page_sharing}, "
            f"use_zero_pages={int(ksm.use_zero_pages)})")]
    out += _policy(result.analysis)
    for c in result.choices.itertuples():
        rows = result.options[result.options["new_input"] == c.new_input]
        out += ["", f"{c.new_input}: {human_bytes(c.memory_before_bytes)} before KSM"]
        if len(rows):
            out.append(_table(["host", "after KSM now", "it adds", "fits", "free after", ""], (
                [str(r.host), human_bytes(r.memory_after_bytes), human_bytes(r.added_bytes),
                 "yes" if r.fits else "no",
                 human_bytes(r.headroom_after_bytes) if r.headroom_after_bytes >= 0
                 else f"-{human_bytes(-r.headroom_after_bytes)}",
                 "<- best" if r.chosen else ""] for r in rows.itertuples())))
        if c.new_host:
            why = "it fits none of the hosts" if len(rows) else "there are no hosts"
            out.append(f"  Best: a new host (host {c.host}): {why}; alone it needs "
                       f"{human_bytes(c.added_bytes)}, {human_bytes(c.headroom_after_bytes)} "
                       "free after")
        else:
            out.append(f"  Best: host {c.host}: it adds {human_bytes(c.added_bytes)}, "
                       f"{human_bytes(c.headroom_after_bytes)} free after")
    out.append("  (it adds = the host's memory after KSM with it less without it, as 'scan' "
               "counts both;\n   best = the least added where it fits, then the least filled "
               "host; new inputs join one by one, in the order given)")
    out += [f"Warning: {printable(w)}" for w in result.warnings]
    return "\n".join(out)


def _overcommit(plan: Plan) -> list[str]:
    """The plan's overcommit table (a row per family and host size) and the number to set."""
    from ..planning.overcommit import advice

    table = plan.overcommit
    if not len(table):
        return []
    rows = ([r.family, human_bytes(r.host_memory_bytes), "no limit", "no limit", "-", r.method]
            if r.vms_per_host is None else
            [r.family, human_bytes(r.host_memory_bytes),
             f"{r.vms_per_host:,} ({r.vms_per_host_low:,}-{r.vms_per_host_high:,})",
             f"{r.ratio:.2f}", f"{r.ratio_low:.2f} - {r.ratio_high:.2f}", r.method]
            for r in table.itertuples())
    return ["", "Overcommit ratio (guests' memory / host memory for guests, by workload family)",
            _table(["family", "host", "guests per host", "ratio", "band", ""],
                   itertools.islice(rows, TEXT_ROWS)),
            *([f"  ... and {len(table) - TEXT_ROWS:,} more rows (every row: --json, --csv)"]
              if len(table) > TEXT_ROWS else []),
            textwrap.fill(advice(plan), 96, initial_indent="  ", subsequent_indent="  ")]


def render_tune(result: Tune) -> str:
    """``tune``'s text: the counters and times at each prefix length, the recommendation, and
    what trusting a full-page hash would risk and save."""
    rows = result.columns["prefixes"].rows()

    def per_gib(value: float | None) -> str:
        return "-" if value is None else f"{value:.3g}"

    stage2 = "compares bytes" if result.verify else "trusts 64-bit full-page hashes (--no-verify)"
    header = (f"Prefix length ({counted(len(result.inputs), 'input')}, "
              f"{human_bytes(result.stored_bytes)} of stored pages; stage 2 {stage2})")
    out = [header,
           _table(["prefix", "hashed", "candidates", "false cand.", "full hashes",
                   "full compares", "stage 1 s/GiB", "stage 2 s/GiB", "total s/GiB", ""],
                  ([f"{r['prefix_bytes']} B", human_bytes(r["bytes_hashed"]),
                    *(_count(r[c]) for c in ("prefix_candidates", "false_candidates",
                                             "full_hashes", "full_compares")),
                    per_gib(r["stage1_seconds_per_gib"]), per_gib(r["stage2_seconds_per_gib"]),
                    per_gib(r["total_seconds_per_gib"]),
                    "<- recommended" if r["recommended"] else ""] for r in rows)),
           textwrap.fill(f"Times: {result.method}.", 96, initial_indent="  ",
                         subsequent_indent="  "),
           textwrap.fill(f"Recommended: {result.reason}.", 96, initial_indent="  ",
                         subsequent_indent="  "), "",
           ("Trusting a full-page hash instead of comparing bytes (birthday bound: "
            "P(any collision) <= n(n-1)/2 / 2^bits)"),
           _table(["pages", "n", "64-bit: expected", "P at most", "128-bit: expected",
                   "P at most"],
                  ([population, _count(by_bits[64]["pages"]),
                    *(f"{by_bits[b][c]:.3g}" for b in (64, 128)
                      for c in ("expected_collisions", "probability_bound"))]
                   for population, by_bits in _by_population(result).items()))]
    cost = {r["stage2"]: r for r in result.columns["comparing"].rows()}
    verify, trust = cost["verify"], cost["no-verify"]
    out.append(f"  Stage 2 at {verify['prefix_bytes']} bytes: comparing bytes "
               f"{per_gib(verify['stage2_seconds_per_gib'])} s/GiB "
               f"({_count(verify['full_compares'])} compares), trusting the 64-bit hash "
               f"{per_gib(trust['stage2_seconds_per_gib'])} s/GiB "
               f"({_count(trust['full_hashes'])} full-page hashes); merges "
               f"{_count(verify['merges'])} and {_count(trust['merges'])}.")
    out += [f"Warning: {printable(w)}" for w in result.warnings]
    return "\n".join(out)


def _by_population(result: Tune) -> dict[str, dict[int, dict[str, Any]]]:
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for r in result.columns["collisions"].rows():
        rows.setdefault(r["population"], {})[int(r["hash_bits"])] = r
    return rows
