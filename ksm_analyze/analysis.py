"""The result of an analysis: :class:`Analysis`, and the one list of its tables.

``TABLES`` names every table once: ``scan --json``, ``scan --csv``, ``report`` and the docs
all come from it, so adding a table is adding it here and to the analysis that builds it.

An analysis holds its tables as plain :class:`~ksm_analyze.columns.Columns`; each table
attribute makes its DataFrame when first read, so pandas is imported only by a caller that
reads one (``scan`` prints its text from the columns).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

from .columns import Columns, json_safe
from .content_table import ContentTable
from .ksm import KsmCounters, KsmSettings
from .options import ScanOptions
from .units import short_names

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from .whatif.compression import Compressed

__all__ = ["TABLES", "Analysis", "json_safe"]

TABLES = ("per_input", "host", "savings", "histogram", "stages", "convergence", "exclusions",
          "pairwise", "top_contents", "address_map", "stability", "timeline", "ksmd_settings",
          "compression", "huge_pages", "numa", "near_duplicates", "near_duplicate_histogram")
"""Every table of an :class:`Analysis`, in output order."""


class _Table:
    """A table attribute of :class:`Analysis`: the DataFrame of ``columns[<its name>]``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, result: None, owner: type) -> _Table: ...
    @overload
    def __get__(self, result: Analysis, owner: type) -> pd.DataFrame: ...
    def __get__(self, result: Analysis | None, owner: type) -> _Table | pd.DataFrame:
        return self if result is None else result.columns[self.name].frame()


@dataclass(frozen=True)
class Analysis:
    """The result of :func:`analyze`: every table the CLI prints, as DataFrames.

    Each table is made from ``columns`` when first read, then stays the same object.

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
            ``sharing_across_inputs``, ``saved``, ``memory_after`` (what the host needs, the
            number ``plan`` counts per host: ``pages_after_merging`` plus
            ``rmap_overhead``, the 64-byte rmap_item per page KSM tracks), and those two
            parts; columns ``<scenario>_pages`` (empty, null in JSON, for ``memory_after`` and
            ``rmap_overhead``, not whole pages), ``<scenario>_bytes``,
            ``<scenario>_percent`` (of memory before).
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
            ``file_backed``, ``zero_pfn``, ``not_mergeable``), under ``options.scope``.
        counters: the KSM counters of the ``with_zero_pages`` scenario.
        options: the reading and fingerprinting options the analysis ran with.
        ksm: the KSM knobs the prediction assumed.
        contents: the core inputs x contents table every number above comes from
            (:class:`~ksm_analyze.content_table.ContentTable`): restrict it to any subset of
            inputs and ask for that host's counters.
        inputs: the paths given, in order (a snapshot of N processes is one path, N inputs).
        warnings: every warning the readers raised.
        unrestricted: under a merging policy (``options.domains``, ``options.merge``), the
            counters KSM would show without it; None without a policy.
        domains: the domains' names (``contents.inputs["domain"]`` numbers them).
        pairwise: sharing between ordered pairs of inputs, non-zero pages only: the pairs
            that share a content (a pair absent shares nothing), at most
            ``options.pairs_top`` per input A (those with the most pages of A in B; a
            warning says how many sharing pairs that left out), by input A, most pages of A
            in B first. Columns ``input_a``, ``input_b``, ``a_nonzero_pages``,
            ``a_pages_in_b`` (pages of A whose content also occurs in B),
            ``a_fraction_in_b`` (0 to 1), ``extra_saved_pages``/``extra_saved_bytes`` (saved
            on a host holding only A and B beyond A and B alone).
        top_contents: the most duplicated contents, most copies first (zero page
            included). Columns ``content_hash`` (SHA-256, hex), ``copies``, ``bytes``,
            ``input_count``, ``inputs`` (``{name: copies}``; ``name:copies`` separated by
            spaces in CSV),
            ``content_class`` (``zero``, ``repeated_byte``, ``repeated_pattern``,
            ``low_entropy``, ``other``), ``class_detail``, ``entropy_bits_per_byte``, and
            ``content_hex`` (first 64 bytes) only with ``show_content=True``.
        address_map: each input's pages in address order, in up to 256 bins. Columns
            ``input``, ``bin``, ``first_address``, ``last_address``, ``pages``,
            ``zero_pages``, ``unique_pages``, ``duplicate_within_pages``,
            ``duplicate_across_pages``, ``ineligible_pages``, ``not_stored_pages``.
        compression: with ``options.compress`` (else empty), what zram and zswap would
            need for the pages KSM leaves (docs/model.md, "Compression beside dedup"): a row
            per input (dedup within it alone), then ``host`` (across all inputs). Columns
            ``input``, ``codec`` (codec, binding and version, level), ``pages``/``bytes``
            (scanned pages, zero pages included), ``distinct_pages``/``distinct_bytes``
            (what KSM leaves: a page per non-zero content), ``dedup_ratio``
            (pages / distinct_pages), ``compressed_pages`` (pages compressed: all distinct
            pages, or the sample's), ``codec_bytes`` and ``compression_ratio`` (the codec
            alone), ``same_filled_pages`` (zram stores none), ``zram_huge_pages`` (zram stores
            them whole), ``zram_bytes``, ``zram_ratio`` (distinct_bytes / zram_bytes) and its
            95% interval ``zram_ratio_low``/``zram_ratio_high`` (the ratio itself without a
            sample), ``zswap_rejected_pages`` (compressed to a page or more),
            ``zswap_bytes`` (rejected pages count a page each), ``zswap_ratio``, and the
            combined footprint as ratios of ``bytes``: ``zram_combined_ratio``,
            ``zswap_combined_ratio``. With a sample, sums and counts are estimates scaled
            to ``distinct_pages``.
        compressed: with ``options.compress``, the stored bytes per duplicated content
            and per input's unique pages, to price any group of inputs
            (:class:`~ksm_analyze.whatif.compression.Compressed`); else None.
        huge_pages: what merging only whole identical 2 MiB pages (THPs kept intact) would
            save beside KSM's 4 KiB merging, and the THPs KSM splits; one row per input, then
            ``host`` (all inputs). Columns ``input``, ``basis`` (``recorded``: THPs as the
            snapshot recorded them; ``if_thp_backed``: every huge page counted as a THP, as
            for a guest dump; ``mixed`` on the host row), ``huge_pages`` (2 MiB-aligned
            regions all of whose pages are present and in scope), ``zero_huge_pages``,
            ``distinct_huge_pages``, ``ksm_saved_pages``/``_bytes`` (4 KiB merging: within
            the input alone, or the savings table's ``saved`` on the host row),
            ``thp_intact_saved_pages``/``_bytes`` (merging whole identical huge pages),
            ``split_cost_pages``/``_bytes`` (the difference), ``thp_huge_pages`` (THPs) and
            ``split_huge_pages`` (THPs holding a page KSM merges: split). Empty out of core.
        numa: with ``options.numa_nodes`` (``merge_across_nodes=0``: pages on different
            NUMA nodes never merge; :mod:`ksm_analyze.whatif.numa`), one row per node and a
            ``total`` row: ``node`` (``0``, ``1``... or ``total``), ``inputs`` (their
            names; separated by spaces in CSV), ``input_count``, ``pages`` (scanned pages,
            zero pages included), the node's KSM counters with zero pages present
            (``pages_shared``, ``pages_sharing``, ``pages_unshared``, ``ksm_zero_pages``,
            ``general_profit`` in bytes), ``saved_pages``/``saved_bytes``; on the ``total``
            row only (null on node rows) ``saved_across_nodes_pages``/``_bytes``, what
            ``merge_across_nodes=1`` would save on the same inputs, and
            ``lost_pages``/``lost_bytes``, the difference. Empty without ``numa_nodes``.
            With it, ``host``, ``savings`` and every other table are those of the per-node
            KSM.
        nodes: the NUMA node of each input (``numa``); empty without ``options.numa_nodes``.
        across_nodes: with ``options.numa_nodes``, the core table under the other policies
            alone (merged across nodes), as ``plan`` places per node; else None.
        near_duplicates: with ``options.near_duplicates`` N > 0, the N largest groups of
            near-duplicate contents, most pages first (empty otherwise, and for inputs
            whose bytes are not here): non-zero contents KSM scans that are equal outside
            at most two of eight equal bands of the page, found by band hashes and each
            member compared byte for byte with the group's representative (the content
            with the most pages); beyond 1,048,576 distinct contents a uniform sample of
            them, with a warning giving the fraction
            (:mod:`ksm_analyze.whatif.near_duplicates`). Columns ``group``, ``pages``
            (holding the group's contents, every input), ``contents``, ``input_count``,
            ``inputs`` (``{name: pages}``), ``differing_ranges`` (``"first-last"``
            inclusive byte offsets where a member differs from the representative, the
            first 16), ``differing_range_count``, ``differing_bytes_min``,
            ``differing_bytes_max``, ``first_differing_offset``, ``saved_pages`` (what KSM
            saves on them now), ``saved_if_equal_pages`` (if they were one content),
            ``extra_saved_pages``, ``extra_saved_bytes``. No page bytes.
        near_duplicate_histogram: the groups' members other than their representatives,
            by bytes differing (``histogram`` ``differing_bytes``: buckets 1, 2-3, 4-7,
            ...) and by first differing offset (``first_differing_offset``: one bucket per
            eighth of the page). Columns ``histogram``, ``low``, ``high`` (inclusive),
            ``contents``, ``pages``; empty when the what-if did not run.
        columns: every table above by name, as plain columns (numpy arrays and lists, no
            pandas): what the text report reads.
        vm_configs: with ``options.vm_configs``, one record per input (``vm_configs`` in
            ``--json``): ``input``, ``name`` (the VM's), ``config`` (the file; None: none
            given, the input assumed eligible), ``format``, ``eligible`` (KSM scans it
            under ``options.scope``), ``reasons`` (why not, each with its documented rule),
            ``other_reasons`` (opt-outs another scope would apply), ``numa_nodes`` (host
            nodes its memory is bound to), ``notes``. An input not eligible is counted in
            no table of KSM's view: its pages are the exclusion rule ``vm_config``.
    """

    columns: dict[str, Columns]
    counters: KsmCounters
    options: ScanOptions
    ksm: KsmSettings
    contents: ContentTable
    inputs: list[str]
    warnings: list[str] = field(default_factory=list)
    unrestricted: KsmCounters | None = None
    domains: list[str] = field(default_factory=list)
    compressed: Compressed | None = None
    nodes: list[int] = field(default_factory=list)
    across_nodes: ContentTable | None = None
    vm_configs: list[dict[str, Any]] = field(default_factory=list)

    per_input = _Table()
    host = _Table()
    savings = _Table()
    histogram = _Table()
    stages = _Table()
    convergence = _Table()
    exclusions = _Table()
    pairwise = _Table()
    top_contents = _Table()
    address_map = _Table()
    stability = _Table()
    timeline = _Table()
    ksmd_settings = _Table()
    compression = _Table()
    huge_pages = _Table()
    numa = _Table()
    near_duplicates = _Table()
    near_duplicate_histogram = _Table()

    @property
    def names(self) -> list[str]:
        """A short, distinct name per input (``per_input`` order): its file name, with parent
        folders where two inputs share one. Tables and charts show inputs by these."""
        return short_names([str(p) for p in self.columns["per_input"]["input"]])

    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table by name, in :data:`TABLES` order, indexed as its CSV file is: tables of
        rows (a plain 0, 1, ... index) by their first column."""
        return {name: df.set_index(df.columns[0]) if self._is_rows(name) else df
                for name, df in ((name, getattr(self, name)) for name in TABLES)}

    def options_record(self) -> dict[str, Any]:
        """The options the analysis ran with, as plain values (``options`` in ``--json``)."""
        o, k = self.options, self.ksm
        bases = o.bases_for(self.inputs)
        knobs = ("max_page_sharing", "use_zero_pages", "pages_to_scan", "sleep_millisecs")
        return {"inputs": list(self.inputs), "format": o.format.value if o.format else "auto",
                "page_size": k.page_size,
                "prefix_bytes": int(self.columns["stages"].at("prefix_bytes", "value")),
                "base_address": bases if len(set(bases)) > 1 else bases[0],
                **{knob: getattr(k, knob) for knob in knobs},
                "verify": o.verify, "jobs": o.workers, "scope": o.scope.value,
                **({"compress": self.compressed.codec.describe(),
                    "compress_sample": o.compress_sample} if self.compressed else {}),
                **({"near_duplicates": o.near_duplicates} if o.near_duplicates else {}),
                **({"numa_nodes": o.numa_nodes} if o.numa_nodes else {})}

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON values, no NaN (what ``scan --json`` prints): tables of
        rows as lists of rows, ``stages`` as statistic -> value, the others keyed by index."""
        out: dict[str, Any] = {"options": self.options_record()}
        for name in TABLES:  # from the columns, as the DataFrames would give them: no pandas
            table = self.columns[name]
            out[name] = table.records() if self._is_rows(name) else table.keyed()
        out["warnings"] = list(self.warnings)
        if self.vm_configs:
            out["vm_configs"] = self.vm_configs
        if self.unrestricted is not None:
            out["policy"] = {"domains": dict(zip(self.names, (self.domains[d] for d in
                                                   self.domain_numbers()), strict=True))
                             if self.domains else {},
                             "merge": self.options.merge,
                             "unrestricted": self.unrestricted.as_dict()}
            if self.options.numa_nodes is not None:
                out["policy"] |= {"numa_nodes": self.options.numa_nodes,
                                  "numa_node": dict(zip(self.names, self.nodes, strict=True))}
        return {k: json_safe(v) for k, v in out.items()}

    def domain_numbers(self) -> list[int]:
        """Each input's domain (a number of ``domains``; all 0 without domains): the merge
        unit of ``contents`` is a domain and a NUMA node (``domain * numa_nodes + node``)."""
        units = self.contents.column("domain")
        return (units // (self.options.numa_nodes or 1)).tolist()  # type: ignore[no-any-return]

    def _is_rows(self, table: str) -> bool:
        """A table of rows (its index only numbers them), not one keyed by its index."""
        return self.columns[table].index is None

    # The one deliberate upward edge: plots live in render/, which imports this module, so
    # these accessors import it when called (and matplotlib with it, only then).
    def plot_savings(self) -> Figure:
        """Waterfall: memory before, zero pages, sharing within and across, after."""
        from .render.plots import plot_savings

        return plot_savings(self)

    def plot_histogram(self) -> Figure:
        """Pages by number of copies, before and after merging (log scale)."""
        from .render.plots import plot_histogram

        return plot_histogram(self)

    def plot_pairwise(self) -> Figure:
        """Heatmap of pages of each input also present in each other input."""
        from .render.plots import plot_pairwise

        return plot_pairwise(self)

    def plot_address_map(self) -> Figure:
        """Where zero, unique and duplicated pages lie in each input's address space."""
        from .render.plots import plot_address_map

        return plot_address_map(self)

    def plot_timeline(self) -> Figure:
        """ksmd replayed: KSM counters and general_profit against time (``timeline``), the
        times to 50%, 90% and steady state marked (``convergence``)."""
        from .render.plots import plot_timeline

        return plot_timeline(self)

    def plot_near_duplicates(self) -> Figure:
        """Near-duplicates (``near_duplicates=N``): pages by bytes differing from their
        group's representative, and by the offset of the first differing byte."""
        from .render.plots import plot_near_duplicates

        return plot_near_duplicates(self)

    def plot_ksmd_settings(self) -> Figure:
        """ksmd CPU % against time to steady state per setting (``ksmd_settings``), the
        advisor, the setting replayed and the cheapest within ``converge_within`` marked."""
        from .render.plots import plot_ksmd_settings

        return plot_ksmd_settings(self)
