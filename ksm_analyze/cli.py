"""The ``ksm-analyze`` command line: a thin typer layer over the library.

Each command calls one library function and renders what it returns. This is the only
module that turns errors into exit codes: a bad input is one line on stderr and exit 1.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import glob
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

try:  # typer >= 0.26 carries its own click
    from typer._click.exceptions import ClickException as _ClickException
except ImportError:  # pragma: no cover - older typer, click beside it
    from click.exceptions import ClickException as _ClickException  # type: ignore[assignment]

from . import _parallel, _signals
from ._signals import Interrupted, raise_on_interrupt
from ._version import __version__
from .analysis import TABLES, Analysis
from .errors import KsmAnalyzeError, printable
from .formats import DumpFormat, open_dump
from .ksm import KsmSettings
from .options import DEFAULT_OPTIONS, ScanOptions
from .pipeline import analyze
from .render.files import to_json, write_csvs
from .render.progress import ScanProgress
from .render.text import render_capture, render_info, render_scan, render_status
from .units import counted, parse_duration, parse_size
from .whatif.tune import DEFAULT_PREFIXES

if TYPE_CHECKING:
    from .planning.plan import Plan

app = typer.Typer(
    name="ksm-analyze",
    help="Predict what Linux KSM would save, offline, from memory dumps.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",  # docstring paragraphs are rewrapped to the terminal
    pretty_exceptions_enable=False,
)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Bad input -> one line and exit 1; a bad option value -> one line and exit 2."""
    try:
        yield
    except KsmAnalyzeError as e:
        typer.echo(f"Error: {e}", err=True)  # escaped by KsmAnalyzeError.__str__
        raise typer.Exit(1) from None
    except ValueError as e:  # may quote a file's name or content: escaped like the others
        typer.echo(f"Error: {printable(e)}", err=True)
        raise typer.Exit(2) from None
    except BrokenPipeError:  # e.g. `ksm-analyze scan ... | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # drop the rest quietly
        raise typer.Exit(0) from None


def _address(value: str) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise ValueError(f"--base-address {value!r} is not an address (use e.g. 0x100000)") \
            from None


def _version(value: bool) -> None:
    if value:
        from .hashing import compiled

        built = ("yes" if compiled.native is not None
                 else f"no (numpy code: {compiled.numpy_reason or 'turned off'})")
        typer.echo(f"ksm-analyze {__version__}\ncompiled kernels: {built}")
        raise typer.Exit()


_KSM = KsmSettings()
"""Defaults of the KSM knobs, read from their one declaration."""
_SCAN_FIELDS = {f.name for f in fields(ScanOptions)}

# Every option is declared once, here, and reused by each command that takes it. The options
# of an analysis come in bundles (reading and hashing, comparing, KSM knobs, merging policy):
# a command lists the bundles it uses (@_analysis_command), so its --help shows only options
# it reads, grouped in one panel per bundle. Defaults come from ScanOptions and KsmSettings.
_READING_PANEL = "Reading and hashing"
_COMPARING_PANEL = "Comparing"
_KSM_PANEL = "KSM knobs"
_POLICY_PANEL = "Merging policy"
_WHATIF_PANEL = "What-ifs"

FormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format",
        "-f",
        help="Read inputs as this format instead of detecting it: "
        + ", ".join(f.value for f in DumpFormat) + ".",
        show_default=False,
        rich_help_panel=_READING_PANEL,
    ),
]
PageSizeOpt = Annotated[
    int, typer.Option("--page-size",
                      help="Page size in bytes; larger guest pages are split into these.",
                      rich_help_panel=_READING_PANEL)
]
BaseOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--base-address",
        help="Address of the first byte of raw images (e.g. 0x100000): once for all "
        "inputs, or once per input in order.",
        show_default=str(DEFAULT_OPTIONS.base_address),
        rich_help_panel=_READING_PANEL,
    ),
]
DumpsArg = Annotated[
    list[Path], typer.Argument(help="Dump files, all on one host.", show_default=False)
]
PlanDumpsArg = Annotated[
    list[Path], typer.Argument(help="Dump files to spread over hosts: as few as hold them, "
                               "or exactly --hosts.", show_default=False)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
CsvOpt = Annotated[
    Path | None,
    typer.Option("--csv", help="Also write one CSV per table into this directory (ksm-status "
                 "--watch: the readings into this file).", show_default=False),
]
NearDuplicatesOpt = Annotated[
    int, typer.Option("--near-duplicates", metavar="N",
                      help="Also report the N largest groups of near-duplicate contents: "
                      "pages equal but for a few bytes (within 2 of 8 bands of the page), "
                      "with the byte ranges that differ (offsets and counts, no bytes). "
                      "0: off; on, it reads every distinct content again.",
                      rich_help_panel=_COMPARING_PANEL)
]
PngOpt = Annotated[
    Path | None,
    typer.Option("--png", help="Also draw PNG files with this name prefix (plan: the hosts and "
                 "the projection; ksm-status --watch: this file, pages_sharing and "
                 "general_profit, actual and predicted, against time).", show_default=False),
]
CountOpt = Annotated[
    int | None, typer.Option("--count", help="With --every (--watch): this many samples "
                             "(readings).", show_default=False)
]
ForOpt = Annotated[
    str | None, typer.Option("--for", help="With --every (--watch): the samples (readings) "
                             "that start within DURATION.", show_default=False,
                             metavar="DURATION")
]
QuietOpt = Annotated[
    bool,
    typer.Option("--quiet", "-q",
                 help="No progress bars (they are shown only when stderr is a terminal)."),
]
ScopeOpt = Annotated[
    str,
    typer.Option(
        "--scope",
        help="Process memory KSM scans: mergeable (VMAs marked mergeable, what KSM does), "
        "anon (as with prctl PR_SET_MEMORY_MERGE), all (every readable page, an upper bound). "
        "Guest dumps count every page whatever the scope.",
        rich_help_panel=_POLICY_PANEL,
    ),
]
SchedulerOpt = Annotated[
    str | None,
    typer.Option("--scheduler",
                 help="Run stage 1, and the aggregation of fingerprint files past "
                 "--memory-limit, on a Dask cluster: tcp://HOST:PORT of its scheduler, or "
                 "local[:N] for a local cluster of N workers, at most one per CPU (pip "
                 "install 'ksm-analyze[dask]'). KSM_ANALYZE_SCHEDULER_TIMEOUT: seconds it "
                 "must answer within (10).", show_default=False, rich_help_panel=_READING_PANEL),
]


def _output(help: str) -> Any:
    """``--output``/``-o``, required: one declaration, with what each command writes there."""
    return typer.Option("--output", "-o", help=help, show_default=False)


def _param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=default)


READING = (
    _param("format", FormatOpt, DEFAULT_OPTIONS.format),
    _param("page_size", PageSizeOpt, _KSM.page_size),
    _param("prefix_bytes", Annotated[
        int, typer.Option("--prefix-bytes",
                          help="Bytes of each page hashed in stage 1 (0, or more than a page: "
                          "the whole page).",
                          rich_help_panel=_READING_PANEL)
    ], DEFAULT_OPTIONS.prefix_bytes),
    _param("base_address", BaseOpt, None),
    _param("jobs", Annotated[
        int | None, typer.Option("--jobs", "-j", show_default=False,
                                 help="Parallel jobs, threads or worker processes "
                                      "(default: all CPUs).", rich_help_panel=_READING_PANEL)
    ], DEFAULT_OPTIONS.jobs),
    _param("scheduler", SchedulerOpt, DEFAULT_OPTIONS.scheduler),
    _param("quiet", QuietOpt, False),
)
"""How dumps are read and stage 1 hashes them: all that ``fingerprint`` uses."""
COMPARING = (
    _param("verify", Annotated[
        bool, typer.Option("--verify/--no-verify",
                           help="Compare candidate pages byte for byte before merging them.",
                           rich_help_panel=_COMPARING_PANEL)
    ], DEFAULT_OPTIONS.verify),
    _param("cache", Annotated[
        str | None,
        typer.Option("--cache",
                     help="Folder of fingerprint files, yours and writable by nobody "
                     "else: a dump fingerprinted before (the same file, unchanged, and the "
                     "same hashing options) is not read again in stage 1; an entry that is "
                     "not that dump's is not used, but rewritten.",
                     show_default=False, rich_help_panel=_COMPARING_PANEL),
    ], DEFAULT_OPTIONS.cache),
    _param("pairs_top", Annotated[
        int, typer.Option("--pairs-top", metavar="K",
                          help="Rows of the pairwise table per input: the K inputs holding "
                          "most of its non-zero pages (0: every input it shares with; pairs "
                          "that share nothing are never listed).",
                          rich_help_panel=_COMPARING_PANEL)
    ], DEFAULT_OPTIONS.pairs_top),
    _param("memory_limit", Annotated[
        str | None,
        typer.Option("--memory-limit",
                     help="Memory the aggregation of fingerprint files may use, a size "
                     "(8GiB; default: half of this machine's, or of its cgroup's limit). "
                     "Files whose fingerprints would not fit are aggregated out of core, a "
                     "part of the content hashes at a time, spilled to a temporary folder.",
                     show_default=False, rich_help_panel=_COMPARING_PANEL),
    ], None),
)
"""Stage 2, the fingerprint cache, the comparison of inputs (pairwise) and the memory of an
analysis."""
KSM_KNOBS = (
    _param("max_page_sharing", Annotated[
        int, typer.Option("--max-page-sharing",
                          help="KSM's max_page_sharing: mappings per KSM page.",
                          rich_help_panel=_KSM_PANEL)
    ], _KSM.max_page_sharing),
    _param("use_zero_pages", Annotated[
        bool, typer.Option("--use-zero-pages",
                           help="Predict with use_zero_pages=1 (zero pages map the zero page).",
                           rich_help_panel=_KSM_PANEL)
    ], _KSM.use_zero_pages),
    _param("pages_to_scan", Annotated[
        int, typer.Option("--pages-to-scan", help="ksmd pages per wake-up.",
                          rich_help_panel=_KSM_PANEL)
    ], _KSM.pages_to_scan),
    _param("sleep_millisecs", Annotated[
        int, typer.Option("--sleep-millisecs", help="ksmd sleep between wake-ups.",
                          rich_help_panel=_KSM_PANEL)
    ], _KSM.sleep_millisecs),
    _param("rmap_item_bytes", Annotated[
        int | None, typer.Option("--rmap-item-bytes", show_default=False,
                                 help="sizeof(struct ksm_rmap_item) on the host, in bytes "
                                 "(default: what live fingerprints recorded from "
                                 "/sys/kernel/slab, else 64).", rich_help_panel=_KSM_PANEL)
    ], _KSM.rmap_item_bytes),
    _param("smart_scan", Annotated[
        bool | None, typer.Option("--smart-scan/--no-smart-scan", show_default=False,
                                  help="ksmd's smart_scan in the time model (default: as the "
                                  "inputs recorded, else on where the kernel has it).",
                                  rich_help_panel=_KSM_PANEL)
    ], _KSM.smart_scan),
    _param("advisor_mode", Annotated[
        str | None, typer.Option("--advisor", show_default=False,
                                 help="none or scan-time: the scan-time advisor sets "
                                 "pages_to_scan after every full scan (default: as the inputs "
                                 "recorded, else none).", rich_help_panel=_KSM_PANEL)
    ], _KSM.advisor_mode),
    _param("kernel", Annotated[
        str | None, typer.Option("--kernel", show_default=False, metavar="VERSION",
                                 help="Replay ksmd by this kernel's rules (6.1, 6.18...; "
                                 "default: the kernel the inputs were taken on, else the "
                                 "newest rules; docs/model.md lists them).",
                                 rich_help_panel=_KSM_PANEL)
    ], _KSM.kernel),
    _param("cpu_cost", Annotated[
        str | None, typer.Option("--cpu-cost", show_default=False, metavar="FILE",
                                 help="ksmd's CPU per page from 'ksm-analyze calibrate' "
                                 "(default: measured on a 6.18 host, docs/model.md).",
                                 rich_help_panel=_KSM_PANEL)
    ], _KSM.cpu_cost),
    _param("converge_within", Annotated[
        str | None, typer.Option("--converge-within", show_default=False, metavar="DURATION",
                                 help="Name the ksmd setting with the least CPU that reaches "
                                 "steady state within DURATION (30s, 10m, 1h).",
                                 rich_help_panel=_KSM_PANEL)
    ], None),
)
"""The KSM knobs of the prediction (KsmSettings; its page_size comes from READING)."""
POLICY = (
    _param("scope", ScopeOpt, DEFAULT_OPTIONS.scope.value),
    _param("domain", Annotated[
        list[str] | None,
        typer.Option("--domain", help="NAME=GLOB: inputs whose path or file name match GLOB "
                     "form trust domain NAME; pages never merge across domains (repeat it).",
                     show_default=False, rich_help_panel=_POLICY_PANEL),
    ], None),
    _param("domains_file", Annotated[
        Path | None,
        typer.Option("--domains", help="CSV file of input,domain rows: the same policy as "
                     "--domain, one row per input.", show_default=False,
                     rich_help_panel=_POLICY_PANEL),
    ], None),
    _param("sample", Annotated[
        list[str] | None,
        typer.Option("--samples", help="NAME=GLOB: inputs whose path or file name match GLOB "
                     "are samples of one input NAME over time, ordered by their files' "
                     "modification times (repeat it; live fingerprints and captures of one "
                     "process are grouped without it).", show_default=False,
                     rich_help_panel=_POLICY_PANEL),
    ], None),
    _param("merge", Annotated[
        str, typer.Option("--merge", help="all (what KSM does) or zero-only (what if only zero "
                          "pages merged).", rich_help_panel=_POLICY_PANEL)
    ], DEFAULT_OPTIONS.merge),
    _param("numa_nodes", Annotated[
        int | None, typer.Option("--numa-nodes", metavar="N", show_default=False,
                                 help="The host has N NUMA nodes and KSM runs with "
                                 "merge_across_nodes=0: pages on different nodes never merge. "
                                 "Inputs not pinned by --numa-node are balanced by memory, "
                                 "largest first onto the least-filled node (plan: packs each "
                                 "node, N per host).", rich_help_panel=_POLICY_PANEL)
    ], DEFAULT_OPTIONS.numa_nodes),
    _param("numa_node", Annotated[
        list[str] | None,
        typer.Option("--numa-node", help="NODE=GLOB: pin the inputs whose path or file name "
                     "match GLOB to NUMA node NODE, 0 to N-1 (repeat it; with --numa-nodes).",
                     show_default=False, rich_help_panel=_POLICY_PANEL),
    ], None),
    _param("vm_config", Annotated[
        list[Path] | None,
        typer.Option("--vm-config", metavar="FILE", show_default=False,
                     help="A VM's configuration (repeat it; a folder: every file in it): "
                     "libvirt domain XML (virsh dumpxml), Proxmox qm config, Cloud Hypervisor "
                     "or Firecracker JSON, KubeVirt VirtualMachine YAML. Matched to the input "
                     "whose file name without suffixes is the VM's name (vm-a.elf: vm-a); an "
                     "input whose VM KSM will not scan (nosharepages, allow-ksm: 0, "
                     "hugepages, shared memory, Firecracker) is listed before hashing and "
                     "counted nowhere. Inputs without one are assumed eligible.",
                     rich_help_panel=_POLICY_PANEL),
    ], None),
)
"""Which pages KSM may merge: its scope, a merging policy and the VMs' configurations."""
WHATIFS = (
    _param("compress", Annotated[
        str | None, typer.Option("--compress", metavar="CODEC", show_default=False,
                                 help="Also price what zram and zswap would store of the "
                                 "pages KSM leaves, compressed with lz4 or zstd as the kernel "
                                 "calls them (the compression table).",
                                 rich_help_panel=_WHATIF_PANEL)
    ], DEFAULT_OPTIONS.compress),
    _param("compress_sample", Annotated[
        int, typer.Option("--compress-sample", metavar="PAGES",
                          help="With --compress: compress a uniform random sample of PAGES "
                          "remaining pages per input and for the host, with a 95% interval "
                          "of the ratio (0: every page).", rich_help_panel=_WHATIF_PANEL)
    ], DEFAULT_OPTIONS.compress_sample),
)
"""What-ifs beside the KSM number (issue 22): opt-in, each a field of ScanOptions."""
ANALYSIS = READING + COMPARING + KSM_KNOBS + POLICY + WHATIFS
"""Every bundle: what ``scan``, ``report`` and ``plan`` take."""


@dataclass(frozen=True)
class _Request:
    """What the shared options ask for: how to read, what KSM to assume, whether to draw."""

    options: ScanOptions
    ksm: KsmSettings
    quiet: bool

    def run(self, dumps: list[Path], **extra: Any) -> Analysis:
        """Analyse ``dumps``; ``extra`` sets further ScanOptions fields (``top``...)."""
        options = replace(self.options, **extra)
        if options.vm_configs:  # before any hashing: the inputs KSM will not touch, and why
            from .pipeline import vm_configs_of
            from .vmconfig import notice

            scope = options.scope.value
            for dump, config in zip(dumps, vm_configs_of(dumps, options), strict=True):
                if config is not None and not config.eligible(scope):
                    typer.echo(f"Note: {printable(notice(dump, config, scope))}", err=True)
        with ScanProgress(enabled=not self.quiet) as bars:
            return analyze(dumps, options, self.ksm, progress=bars)


def _say_local_workers(options: ScanOptions) -> None:
    """Warn when ``--scheduler local:N`` asks for more workers than there are CPUs."""
    workers = options.local_workers()
    if workers is not None and options.scheduler != "local" and \
            workers < int((options.scheduler or "").partition(":")[2]):
        typer.echo(f"Warning: --scheduler {options.scheduler}: {counted(workers, 'worker')}, "
                   "one per CPU this process may use", err=True)


def _analysis_command(*bundles: tuple[inspect.Parameter, ...]
                      ) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command the options of ``bundles``; it receives them as ``request: _Request``
    (an option not taken keeps its default)."""
    params = [p for bundle in bundles for p in bundle]
    names = [p.name for p in params]

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> None:
            given = {n: kwargs.pop(n) for n in names}
            quiet = given.pop("quiet", False)
            with _errors():
                if "base_address" in given:
                    bases = given.pop("base_address")
                    given["base_address"] = tuple(map(_address, bases)) if bases else 0
                if given.get("memory_limit") is not None:
                    given["memory_limit"] = parse_size(given["memory_limit"],
                                                       what="--memory-limit")
                if "sample" in given:
                    given["samples"] = tuple(_name_globs(given.pop("sample") or [],
                                                         "--samples"))
                if "vm_config" in given:
                    given["vm_configs"] = tuple(map(str, given.pop("vm_config") or []))
                if "numa_node" in given:
                    given["numa_pins"] = _numa_pins(given.pop("numa_node") or [])
                if "domain" in given:
                    given["domains"] = _domains(given.pop("domain") or [],
                                                given.pop("domains_file"))
                options = ScanOptions(**{k: v for k, v in given.items() if k in _SCAN_FIELDS})
                if given.get("converge_within") is not None:
                    given["converge_within"] = parse_duration(given["converge_within"],
                                                              "--converge-within")
                ksm = KsmSettings(**{k: v for k, v in given.items() if k not in _SCAN_FIELDS})
                _say_local_workers(options)
            command(**kwargs, request=_Request(options, ksm, quiet))

        own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
               if p.name != "request"]
        wrapper.__signature__ = inspect.Signature(own + params)  # type: ignore[attr-defined]
        return wrapper

    return decorate


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True,
                           help="Show the version and exit.")
    ] = False,
) -> None:
    """Predict what Linux KSM would save, offline, from memory dumps."""


HostMemoryOpt = Annotated[
    str | None, typer.Option("--host-memory", help="Memory of one host, e.g. 256GiB: plan "
                             "hosts of this size.", show_default=False),
]
ReserveOpt = Annotated[
    str, typer.Option("--reserve", help="Memory each host keeps for itself: a size (16GiB) "
                      "or a percentage of --host-memory (10%).")
]
HostSizesOpt = Annotated[
    str | None, typer.Option("--host-sizes", help="More host sizes for the overcommit table, "
                             "e.g. 64GiB,256GiB,1TiB (default: --host-memory alone); each "
                             "keeps the share --reserve keeps of --host-memory.",
                             show_default=False)
]
ProjectOpt = Annotated[
    str | None, typer.Option("--project", help="Also project host memory for these numbers "
                             "of inputs like these, e.g. 10,50,100.", show_default=False)
]


def _make_plan(result: Analysis, host_memory: str, reserve: str, project: str | None,
               host_sizes: str | None = None, **options: Any) -> Plan:
    """The plan of ``result`` for the command-line spelling of its sizes and counts."""
    from .planning.plan import plan as make_plan
    from .units import parse_size

    size, kept = _host_sizes(host_memory, reserve)
    try:
        counts = [int(c) for c in project.split(",")] if project else []
    except ValueError:
        raise ValueError(f"--project {project!r} is not a list of input counts "
                         "(e.g. 10,50,100)") from None
    sizes = [parse_size(s, what="--host-sizes") for s in host_sizes.split(",")] \
        if host_sizes is not None else []
    return make_plan(result, size, reserve=kept, project=counts, host_sizes=sizes, **options)


def _host_sizes(host_memory: str, reserve: str) -> tuple[int, int]:
    """``--host-memory`` and ``--reserve`` (a size or a percentage of it) in bytes."""
    from .units import human_bytes, parse_size

    size = parse_size(host_memory, what="--host-memory")
    spec = reserve.strip()
    if spec.endswith("%"):
        try:
            percent = float(spec[:-1])
        except ValueError:
            raise ValueError(f"--reserve {reserve!r} is not a size or a percentage "
                             "(e.g. 16GiB or 10%)") from None
        if not 0 <= percent < 100:  # NaN and infinities too
            raise ValueError(f"--reserve {reserve!r}: give a percentage from 0 up to (not "
                             "including) 100% of --host-memory")
        kept = int(size * percent / 100)
    else:
        kept = parse_size(spec, what="--reserve")
        if kept >= size:
            raise ValueError(f"--reserve {reserve!r} ({human_bytes(kept)}) leaves no memory "
                             f"of a host of {human_bytes(size)} (--host-memory): give less")
    return size, kept


@app.command()
@_analysis_command(READING, COMPARING, KSM_KNOBS, POLICY, WHATIFS)
def scan(
    dumps: DumpsArg,
    json_out: JsonOpt = False,
    csv_dir: CsvOpt = None,
    near_duplicates: NearDuplicatesOpt = DEFAULT_OPTIONS.near_duplicates,
    *,
    request: _Request,
) -> None:
    """Predict the KSM counters and savings for DUMPS placed on one host."""
    with _errors():
        request = replace(request, options=replace(request.options,
                                                   near_duplicates=near_duplicates))
        if csv_dir is not None:
            _refuse_overwriting(dumps, [csv_dir / f"{name}.csv" for name in TABLES])
        result = request.run(dumps)
        if csv_dir is not None:
            try:
                write_csvs(result, csv_dir)
            except OSError as e:
                _cannot_write(csv_dir, e, "CSV files")
        typer.echo(to_json(result) if json_out else render_scan(result))


@app.command()
@_analysis_command(READING, COMPARING, KSM_KNOBS, POLICY, WHATIFS)
def report(
    dumps: DumpsArg,
    output: Annotated[
        Path, _output("Folder for the CSV, PNG and index.html files (created if needed).")
    ],
    top: Annotated[
        int, typer.Option("--top", help="Rows in the table of most duplicated contents.")
    ] = DEFAULT_OPTIONS.top,
    show_content: Annotated[
        bool, typer.Option("--show-content",
                           help="Show the first 64 bytes of each most duplicated content. "
                           "Off by default: memory dumps hold secrets.")
    ] = DEFAULT_OPTIONS.show_content,
    near_duplicates: NearDuplicatesOpt = DEFAULT_OPTIONS.near_duplicates,
    host_memory: HostMemoryOpt = None,
    reserve: ReserveOpt = "0",
    project: ProjectOpt = None,
    host_sizes: HostSizesOpt = None,
    tune_section: Annotated[
        bool, typer.Option("--tune", help="Also a Prefix length section, as `tune` makes it "
                           "(every prefix length timed: several passes over the dumps).")
    ] = False,
    *,
    request: _Request,
) -> None:
    """Write CSV tables, PNG charts and a self-contained index.html for DUMPS on one host.

    With --host-memory, also a Capacity plan section, as `plan` makes it; with --tune, a
    Prefix length section, as `tune` makes it.
    """
    with _errors():
        from .render.report import report_files, write_report  # matplotlib: only for a report

        options = replace(request.options, top=top, show_content=show_content,
                          near_duplicates=near_duplicates)  # checks top and this
        near = options.near_duplicates > 0
        _refuse_overwriting(dumps, report_files(output, tune=tune_section, near_duplicates=near))
        if tune_section:  # before the analysis: a fingerprint file has no bytes to time
            from .whatif.tune import refuse_fingerprint_files

            refuse_fingerprint_files(dumps)
        created = not output.exists()
        _make_dir(output)
        with contextlib.ExitStack() as undo:  # no report: no folder made for it either
            if created:
                undo.callback(_remove_if_empty, output)
            result = replace(request, options=options).run(dumps)
            planned = None if host_memory is None else _make_plan(result, host_memory,
                                                                   reserve, project,
                                                                   host_sizes)
            if planned is not None:  # its files are known once it is made
                _refuse_overwriting(dumps, report_files(output, planned, tune_section,
                                                        near_duplicates=near))
            swept = None
            if tune_section:
                from .whatif.tune import tune as run_tune

                with ScanProgress(enabled=not request.quiet) as bars:
                    swept = run_tune(dumps, options, page_size=request.ksm.page_size,
                                     progress=bars)
            try:
                written = write_report(result, output, planned, swept)
            except OSError as e:
                _cannot_write(output, e)
            undo.pop_all()
        typer.echo(f"Wrote {counted(len(written), 'file')} to {printable(output)}: "
                   f"open {printable(output / 'index.html')}")


@app.command()
@_analysis_command(READING, COMPARING, KSM_KNOBS, POLICY, WHATIFS)
def plan(
    dumps: PlanDumpsArg,
    host_memory: HostMemoryOpt,
    reserve: ReserveOpt = "0",
    hosts: Annotated[
        int | None, typer.Option("--hosts", help="Spread over exactly this many hosts, "
                                 "each holding an input, instead of as few as possible.",
                                 show_default=False)
    ] = None,
    project: ProjectOpt = None,
    host_sizes: HostSizesOpt = None,
    without_zero_pages: Annotated[
        bool, typer.Option("--without-zero-pages", help="Plan with scan's 'without zero "
                           "pages' column: zero pages never touched, not host memory.")
    ] = False,
    json_out: JsonOpt = False,
    csv_dir: CsvOpt = None,
    png: PngOpt = None,
    export: Annotated[
        tuple[str, Path] | None,
        typer.Option("--export", metavar="ECOSYSTEM DIR", show_default=False,
                     help="Also write the sharing-aware placement for a scheduler into DIR: "
                     "kubevirt (VirtualMachine affinity patches), openstack (Nova server "
                     "groups, ram_allocation_ratio) or proxmox (HA rules and groups), with "
                     "a README.txt of the commands that apply it.")
    ] = None,
    add_new: Annotated[
        list[Path] | None,
        typer.Option("--add", help="A new input (dump or fingerprint file; repeat it): find "
                     "the host of --placement where it adds least and fits. DUMPS are then "
                     "the placed inputs.", show_default=False)
    ] = None,
    placement: Annotated[
        Path | None,
        typer.Option("--placement", help="With --add: the existing placement, the "
                     "assignments table of `plan --csv` (assignments.csv) or `plan --json`.",
                     show_default=False)
    ] = None,
    *,
    request: _Request,
) -> None:
    """Place DUMPS on hosts of --host-memory: sharing-aware beside first-fit.

    Sharing-aware: inputs largest first, each onto the host where it adds the least memory
    after KSM (exact, from the content classes) among those where it fits; then the
    emptiest host is dissolved where its inputs fit elsewhere. First-fit's hosts and (up to
    2,000 inputs) a seed-and-grow order are consolidated alike and the fewest hosts win:
    never more than first-fit decreasing, which ignores sharing.

    With --add NEW --placement FILE: the best host of FILE's placement of DUMPS for each NEW
    input instead (what it adds on each host, whether it fits).
    """
    from .planning.plan import PLAN_TABLES  # pandas: only for a plan
    from .render.text import render_plan

    assert host_memory is not None  # a required option: typer refuses the command without it
    with _errors():
        if export is not None:  # a bad ecosystem before the analysis
            from .planning.export import check_ecosystem

            check_ecosystem(export[0])
        if add_new or placement is not None:
            _plan_add(dumps, add_new or [], placement, host_memory, reserve,
                      zero_pages=not without_zero_pages, json_out=json_out, csv_dir=csv_dir,
                      request=request, others={"--hosts": hosts, "--project": project,
                                               "--png": png,
                                               "--export": export})
            return
        if csv_dir is not None:
            _refuse_overwriting(dumps, [csv_dir / f"{name}.csv" for name in PLAN_TABLES])
        result = _make_plan(request.run(dumps), host_memory, reserve, project, host_sizes,
                            hosts=hosts, zero_pages=not without_zero_pages)
        if png is not None:
            _refuse_overwriting(dumps, _png_paths(result, png))
        if csv_dir is not None:
            try:
                write_csvs(result, csv_dir)
            except OSError as e:
                _cannot_write(csv_dir, e, "CSV files")
        if png is not None:
            try:
                _write_pngs(result, png)
            except OSError as e:
                _cannot_write(png, e, "PNG files")
        if export is not None:
            _write_export(dumps, result, *export)
        typer.echo(to_json(result) if json_out else render_plan(result))


def _write_export(dumps: list[Path], result: Plan, ecosystem: str, directory: Path) -> None:
    """``plan --export``: the files in ``directory``, never over an input."""
    from .planning.export import export_files, write_export

    _refuse_overwriting(dumps, [directory / name for name in export_files(result, ecosystem)])
    try:
        write_export(result, ecosystem, directory)
    except OSError as e:
        _cannot_write(directory, e, f"the {ecosystem} export")


def _plan_add(dumps: list[Path], new: list[Path], placement: Path | None, host_memory: str,
              reserve: str, *, zero_pages: bool, json_out: bool, csv_dir: Path | None,
              request: _Request, others: dict[str, Any]) -> None:
    """``plan DUMPS --placement FILE --add NEW...``: the best host for each NEW input."""
    from .planning.marginal import ADD_TABLES, add, read_placement
    from .render.text import render_addition

    if not new:
        raise ValueError("--placement needs --add NEW (a new input to find a host for)")
    if placement is None:
        raise ValueError("--add needs --placement FILE: the assignments table of `plan --csv` "
                         "or `plan --json` that placed DUMPS")
    given = [k for k, v in others.items() if v is not None]
    if given:
        raise ValueError(f"{given[0]} does not apply with --add (it finds a host for each new "
                         "input in --placement)")
    placed = {os.path.realpath(p) for p in dumps}
    twice = [p for p in new if os.path.realpath(p) in placed]
    if twice:
        raise ValueError(f"{printable(twice[0])} is given both as a placed input and with --add")
    size, kept = _host_sizes(host_memory, reserve)
    where = read_placement(placement)  # before the analysis: a bad file fails at once
    if csv_dir is not None:
        _refuse_overwriting([*dumps, *new], [csv_dir / f"{name}.csv" for name in ADD_TABLES])
    analysis = request.run([*dumps, *new])
    result = add(analysis, where, analysis.names[len(dumps):], size, reserve=kept,
                 zero_pages=zero_pages, source=str(placement))
    if csv_dir is not None:
        try:
            write_csvs(result, csv_dir)
        except OSError as e:
            _cannot_write(csv_dir, e, "CSV files")
    typer.echo(to_json(result) if json_out else render_addition(result, str(placement)))


TUNE_OPTIONS = (*(p for p in READING if p.name not in ("prefix_bytes", "scheduler")),
                *(p for p in COMPARING if p.name == "verify"))
"""What ``tune`` takes: READING but the prefix length it sweeps (and Dask: it reads the
dumps here), and whether stage 2 compares bytes."""


@app.command()
@_analysis_command(TUNE_OPTIONS)
def tune(
    dumps: Annotated[list[Path], typer.Argument(help="Dump files, all on one host (not "
                                                "fingerprint files: they hold no page "
                                                "bytes).", show_default=False)],
    prefixes: Annotated[
        str, typer.Option("--prefixes", help="Prefix lengths to sweep, bytes, 1 to the page "
                          "size, comma-separated.")
    ] = ",".join(map(str, DEFAULT_PREFIXES)),
    runs: Annotated[
        int, typer.Option("--runs", help="Time each stage this many times at each prefix "
                          "length; the fastest counts.")
    ] = 3,
    json_out: JsonOpt = False,
    csv_dir: CsvOpt = None,
    *,
    request: _Request,
) -> None:
    """Sweep the prefix length stage 1 hashes and recommend one for DUMPS.

    For each length: bytes hashed, candidates, false candidates, full compares (the counters
    of scan's stages table), and the measured seconds per GiB of stage 1 and stage 2. Then
    the birthday bound on a false merge if stage 2 trusted a 64- or 128-bit full-page hash
    instead of comparing bytes, beside what comparing costs.
    """
    from .whatif.tune import TUNE_TABLES, parse_prefixes
    from .whatif.tune import tune as run_tune

    with _errors():
        lengths = parse_prefixes(prefixes, request.ksm.page_size)
        if runs < 1:
            raise ValueError(f"--runs must be at least 1, not {runs}")
        if csv_dir is not None:
            _refuse_overwriting(dumps, [csv_dir / f"{name}.csv" for name in TUNE_TABLES])
        with ScanProgress(enabled=not request.quiet) as bars:
            result = run_tune(dumps, request.options, prefixes=lengths,
                              page_size=request.ksm.page_size, runs=runs, progress=bars)
        if csv_dir is not None:
            try:
                write_csvs(result, csv_dir)
            except OSError as e:
                _cannot_write(csv_dir, e, "CSV files")
        if json_out:
            typer.echo(to_json(result))
        else:
            from .render.text import render_tune

            typer.echo(render_tune(result))


def _write_pngs(result: Plan, prefix: Path) -> None:
    from .render.files import FILE_MODE, atomic_write
    from .render.report import png_bytes

    for path, draw in zip(_png_paths(result, prefix), result.charts().values(), strict=True):
        atomic_write(path, png_bytes(draw()), mode=FILE_MODE)


def _png_paths(result: Plan, prefix: Path) -> list[Path]:
    """The PNG files ``plan --png PREFIX`` writes, one per chart."""
    return [Path(f"{prefix}-{name}.png") for name in result.charts()]


def _name_globs(specs: list[str], option: str) -> list[tuple[str, str]]:
    """``NAME=GLOB`` options as (name, pattern) pairs."""
    pairs = []
    for spec in specs:
        name, sep, pattern = spec.partition("=")
        if not (sep and name and pattern):
            raise ValueError(f"{option} {spec!r} is not NAME=GLOB (e.g. web=web-*.elf)")
        pairs.append((name, pattern))
    return pairs


def _numa_pins(specs: list[str]) -> tuple[tuple[int, str], ...]:
    """``--numa-node NODE=GLOB`` options as (node, pattern) pairs."""
    pins = []
    for node, pattern in _name_globs(specs, "--numa-node"):
        if not node.isdigit():
            raise ValueError(f"--numa-node {node}={pattern}: NODE is a node number (0, 1...)")
        pins.append((int(node), pattern))
    return tuple(pins)


def _domains(specs: list[str], table: Path | None) -> tuple[tuple[str, str], ...]:
    """``--domain NAME=GLOB`` and ``--domains FILE.csv`` as (name, pattern) pairs."""
    pairs = _name_globs(specs, "--domain")
    if table is not None:
        try:
            with open(table, newline="") as f:
                rows = [r for r in csv.reader(f) if r and r[0].strip() != "input"]
        except (OSError, UnicodeDecodeError) as e:
            raise KsmAnalyzeError(f"{table}: cannot read the domains: {e}") from None
        for n, row in enumerate(rows, 1):
            if len(row) != 2 or not all(cell.strip() for cell in row):
                raise ValueError(f"{table} row {n}: expected input,domain, not {row!r}")
            pairs.append((row[1].strip(), glob.escape(row[0].strip())))
        if not rows:  # an empty file is a mistake, not "no policy"
            raise ValueError(f"{table}: no domains in the file (expected input,domain rows)")
    return tuple(pairs)


def _refuse_overwriting(dumps: list[Path], outputs: list[Path]) -> None:
    """ValueError if an output would replace one of the inputs (``-o`` the dumps' folder)."""
    for out in outputs:
        for dump in dumps:
            with contextlib.suppress(OSError):
                if os.path.samefile(out, dump):
                    raise ValueError(f"{dump}: this input would be overwritten by the output "
                                     f"{out.name}; write into another folder")


def _cannot_write(directory: Path, e: OSError, what: str = "the report") -> NoReturn:
    """One line naming the output (a folder, a file prefix) and what could not be written
    there: ``the report``, ``CSV files``, ``PNG files``, ``fingerprint files``."""
    where = f" ({e.filename})" if e.filename and str(e.filename) != str(directory) else ""
    typer.echo(printable(f"Error: {directory}: cannot write {what}: {e.strerror or e}{where}"),
               err=True)
    raise typer.Exit(1)


def _remove_if_empty(directory: Path) -> None:
    with contextlib.suppress(OSError):
        directory.rmdir()


def _make_dir(directory: Path, what: str = "the report") -> None:
    """Create the output folder before the long work, so a bad -o fails at once."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        _cannot_write(directory, e, what)


@app.command("fingerprint")
@_analysis_command(READING)
def fingerprint_cmd(
    targets: Annotated[
        list[str] | None,
        typer.Argument(help="Dump files, or IDs of running processes (an argument of digits "
                       "only that is not a file is a PID); not both in one run.",
                       show_default=False, metavar="DUMPS_OR_PIDS..."),
    ] = None,
    *,
    output: Annotated[Path, _output("Folder for the fingerprint files.")],
    keep_cmdline: Annotated[
        bool, typer.Option("--keep-cmdline",
                           help="Keep each process's full command line in the files. "
                           "Off by default: arguments can hold secrets (--password=...).")
    ] = False,
    qemu: Annotated[
        bool, typer.Option("--qemu", help="Also take every running QEMU process "
                           "(qemu-system-*), as if its PID were given.")
    ] = False,
    every: Annotated[
        str | None, typer.Option("--every", help="Processes: take a sample every DURATION "
                                 "(500ms, 2s, 1m, 1h), with --count or --for; file names then "
                                 "carry the sample index (.s000, .s001...).",
                                 show_default=False, metavar="DURATION")
    ] = None,
    count: CountOpt = None,
    duration: ForOpt = None,
    request: _Request,
) -> None:
    """Write fingerprints to OUTPUT as Parquet, for scan, report and plan: each dump's, or
    each running process's, read in place from /proc/PID/mem.

    No page bytes are written, nor command lines unless --keep-cmdline. The files can be
    read on this machine or another; only the hashing options matter here. A process is
    read as `capture` reads it (present pages only: nothing is faulted in; it keeps
    running) into `<comm>-<pid>.ksmfp.parquet`, or `<comm>-<pid>.sNNN.ksmfp.parquet` for
    sample NNN of a series (--every). A process that exits during a series ends its series
    with a warning; the run fails only if a process has no sample at all.
    """
    from .fleet.sources import write_fingerprint_files
    from .live.fingerprint import Schedule, fingerprint_processes
    from .live.procfs import HOST_PAGE_SIZE, qemu_pids

    with _errors(), contextlib.ExitStack() as undo:
        given = targets or []
        pids = [int(t) for t in given if t.isdigit() and not os.path.exists(t)]
        dumps = [Path(t) for t in given if not (t.isdigit() and not os.path.exists(t))]
        schedule = Schedule.of(every, count, duration)
        if dumps and (pids or qemu):
            raise ValueError("give dump files or processes (PIDs, --qemu), not both")
        if dumps and schedule.series:
            raise ValueError("--every samples running processes; a dump file does not change")
        if qemu:
            found = qemu_pids()
            if not found:
                typer.echo("Error: --qemu: no QEMU process (qemu-system-*) is running",
                           err=True)
                raise typer.Exit(1)
            pids += [p for p in found if p not in pids]
        if not pids and not dumps:
            raise ValueError("give dump files, process IDs or --qemu")
        if pids and request.ksm.page_size != HOST_PAGE_SIZE:
            raise ValueError(f"a process's pages are this host's ({HOST_PAGE_SIZE} bytes): "
                             f"--page-size {request.ksm.page_size} does not apply")
        if not output.exists():  # no file written: no folder made for them either
            undo.callback(_remove_if_empty, output)
        _make_dir(output, "fingerprint files")
        with ScanProgress(enabled=not request.quiet) as bars:
            try:
                if pids:
                    fingerprint_processes(
                        pids, output, request.options, schedule, keep_cmdline=keep_cmdline,
                        progress=lambda name: lambda n, of: bars(name, n, of),
                        written=lambda s: typer.echo(f"Wrote {printable(s.path)}"),
                        warn=lambda line: typer.echo(f"Warning: {printable(line)}", err=True))
                    return
                written = write_fingerprint_files(
                    dumps, output, request.options, request.ksm.page_size,
                    reading=lambda name: lambda n, of: bars(name, n, of),
                    tasks=lambda n, of: bars("Dask tasks", n, of), keep_cmdline=keep_cmdline)
            except OSError as e:  # a full disk, say: the folder was writable at the start
                _cannot_write(output, e, "fingerprint files")
    for path in written:
        typer.echo(f"Wrote {printable(path)}")


@app.command()
def info(
    dump: Annotated[Path, typer.Argument(help="A dump file.", show_default=False)],
    format: FormatOpt = None,
    page_size: PageSizeOpt = _KSM.page_size,
    base_address: BaseOpt = None,
    ranges: Annotated[int, typer.Option("--ranges", help="Show at most this many ranges.")]
    = 50,
) -> None:
    """Show a dump's detected format, its ranges and its pages per state; of a fingerprint
    file, its source dump, hashing options and what it holds of each input."""
    with _errors():
        options = ScanOptions(format=DumpFormat.parse(format) if format else None,
                              base_address=tuple(map(_address, base_address))
                              if base_address else 0)  # checks both
        base = options.bases_for([dump])[0]
        from .fleet import fingerprint_files

        if options.format is None and fingerprint_files.is_fingerprint_file(dump):
            from .render.text import render_fingerprint_info

            typer.echo(render_fingerprint_info(str(dump), fingerprint_files.load(dump),
                                               fingerprint_files.metadata(dump),
                                               max_ranges=ranges))
            return
    with _errors(), open_dump(dump, options.format, page_size=page_size,
                              base_address=base) as reader:
        typer.echo(render_info(str(dump), reader, max_ranges=ranges))


@app.command()
def capture(
    pids: Annotated[list[int], typer.Argument(help="Process IDs to capture.", show_default=False)],
    output: Annotated[Path, _output("Snapshot file to write (mode 0600).")],
    quiet: QuietOpt = False,
) -> None:
    """Snapshot live processes' memory and page flags, for `scan` to analyse later.

    Reads /proc/PID/smaps and pagemap, /proc/kpageflags when root, and /proc/PID/mem for
    present pages only, so the targets' memory is left as it was.
    """
    from .live.capture import capture as capture_processes

    with _errors(), ScanProgress(enabled=not quiet) as bars:
        summary = capture_processes(pids, output, progress=bars.bar("capturing"))
    typer.echo(render_capture(summary))


@app.command()
def calibrate(
    output: Annotated[Path, _output("Calibration file to write (JSON, mode 0600).")],
    mib: Annotated[int, typer.Option("--mib", help="Size of the workload process, MiB.")]
    = 64,
    quiet: QuietOpt = False,
) -> None:
    """Measure ksmd's CPU per page on this host's kernel (root, writable KSM).

    Runs ksmd for a few seconds over a process of known pages (unique, merged copies, and
    pages smart_scan skips), reads the ksmd thread's CPU time from /proc, and writes the
    costs with the machine they were measured on. Every KSM knob is put back; nothing of
    the host's is unmerged.
    """
    from .ksmd.cost import save_cost
    from .live.calibrate import calibrate as run_calibration

    def say(line: str) -> None:
        if not quiet:
            typer.echo(line, err=True)

    with _errors():
        cost = run_calibration(mib, progress=say)
    try:
        save_cost(output, cost)
    except OSError as e:
        _cannot_write(output, e, "the calibration")
    typer.echo(f"ksmd CPU per processed page {cost.seconds_per_page * 1e6:.3g} us, "
               f"per merged page {cost.seconds_per_merged * 1e6:.3g} us, "
               f"per skipped page {cost.seconds_per_skipped * 1e6:.3g} us "
               f"({printable(cost.machine.get('kernel', '?'))})")
    typer.echo(f"Wrote {printable(output)}")


@app.command("ksm-status")
def ksm_status(
    snapshots: Annotated[
        list[Path] | None,
        typer.Argument(help="Snapshots or fingerprint files (a series too) to predict from "
                       "(optional).", show_default=False, metavar="[INPUTS]..."),
    ] = None,
    scope: ScopeOpt = DEFAULT_OPTIONS.scope.value,
    json_out: JsonOpt = False,
    watch: Annotated[
        str | None, typer.Option("--watch", help="Read the counters every INTERVAL (500ms, "
                                 "2s, 1m) and print a line per reading, until Ctrl-C, --count "
                                 "or --for.", show_default=False, metavar="INTERVAL")
    ] = None,
    count: CountOpt = None,
    duration: ForOpt = None,
    csv_file: CsvOpt = None,
    png: PngOpt = None,
) -> None:
    """Show the kernel's KSM counters, beside a prediction from INPUTS if given.

    Run it after turning KSM on to see how the prediction held: host-wide counters from
    /sys/kernel/mm/ksm, and /proc/PID/ksm_stat of each captured process still running.

    With --watch, the counters over time beside the prediction's trajectory: set the knobs,
    start the watch, then turn KSM on (`echo 1 > /sys/kernel/mm/ksm/run`); each reading is
    set beside the prediction after as many full scans as KSM did since the watch began. If
    KSM had already merged pages when the watch began, beside the prediction's steady state.
    Ctrl-C ends the watch (exit 0, the files written).
    """
    from .live.status import ksm_status as read_status

    with _errors():
        if watch is None:
            given = [n for n, v in (("--count", count), ("--for", duration),
                                    ("--csv", csv_file), ("--png", png)) if v is not None]
            if given:
                raise ValueError(f"{given[0]} goes with --watch INTERVAL")
            status = read_status(snapshots or [], scope=scope)
            typer.echo(render_status(status, as_json=json_out))
            return
        _watch_status(snapshots or [], scope, json_out, watch, count, duration, csv_file, png)


def _watch_status(inputs: list[Path], scope: str, json_out: bool, every: str,
                  count: int | None, duration: str | None, csv_file: Path | None,
                  png: Path | None) -> None:
    """``ksm-status --watch``: a line per reading, the CSV after each, the PNG at the end."""
    import signal

    from .live.status import KsmWatch
    from .render.files import csv_text
    from .render.watch import watch_alignment, watch_header, watch_line, watch_summary

    if json_out:
        raise ValueError("--json does not go with --watch: write the readings with --csv FILE")
    interval = parse_duration(every, "--watch")
    if interval <= 0:
        raise ValueError(f"--watch {every!r}: give an interval above 0 (e.g. 500ms)")
    if count is not None and duration is not None:
        raise ValueError("--watch takes --count N or --for DURATION, not both")
    if count is not None and count < 1:
        raise ValueError(f"--count {count}: at least 1")
    seconds = parse_duration(duration, "--for") if duration is not None else None
    outputs = [p for p in (csv_file, png) if p is not None]
    if csv_file is not None and png is not None and csv_file.resolve() == png.resolve():
        raise ValueError(f"--csv and --png name the same file ({csv_file}): give two")
    _refuse_overwriting(inputs, outputs)
    for out in outputs:  # a bad folder fails now, not after the watch
        folder = out.parent
        if not folder.is_dir():
            _cannot_write(out, FileNotFoundError(2, "No such file or directory"), "the file")
        if not os.access(folder, os.W_OK | os.X_OK):
            _cannot_write(out, PermissionError(13, "Permission denied"), "the file")
    w = KsmWatch.of(inputs, scope=scope)
    stopped: Interrupted | None = None
    try:
        for n, row in enumerate(w.readings(interval, count, seconds)):
            if n == 0:
                typer.echo(watch_alignment(w))
                typer.echo(watch_header(w))
            typer.echo(watch_line(w, row))
            if csv_file is not None:
                _write_watch_file(csv_file, lambda: csv_text(w.frame).encode())
    except Interrupted as e:  # Ctrl-C (SIGTERM too): the end of the watch, files written
        stopped = e
    except KeyboardInterrupt:  # the library's caller, no handler installed (tests)
        stopped = Interrupted(signal.SIGINT)
    if stopped is not None:
        typer.echo(f"Watch ended by {signal.Signals(stopped.signum).name} after "
                   f"{counted(len(w.frame), 'reading')}.")
    frame = w.frame
    if csv_file is not None and len(frame):
        _write_watch_file(csv_file, lambda: csv_text(frame).encode())
        typer.echo(f"Wrote {printable(csv_file)}")
    if png is not None and len(frame):
        from .render.report import png_bytes
        from .render.watch import plot_watch

        alignment = w.alignment if w.prediction is not None else None
        _write_watch_file(png, lambda: png_bytes(plot_watch(frame, alignment=alignment)))
        typer.echo(f"Wrote {printable(png)}")
    if (summary := watch_summary(frame)) is not None:
        typer.echo(summary)
    if stopped is not None and stopped.signum != signal.SIGINT:
        raise stopped  # SIGTERM: the files are written; exit 143 as any command


def _write_watch_file(path: Path, data: Callable[[], bytes]) -> None:
    from .render.files import atomic_write

    try:
        atomic_write(path, data())
    except OSError as e:
        _cannot_write(path, e, "the file")


def main() -> None:
    """Console-script entry point. Ctrl-C and SIGTERM unwind (workers are killed, temporary
    files removed), then print one line and exit with 128 + the signal (130, 143).

    The process is the command line's own, so it also takes the settings a library call
    leaves alone: one malloc arena for the threads, one line and exit 1 for a SIGBUS that
    is no input's."""
    raise_on_interrupt()
    _parallel.ONE_MALLOC_ARENA = True
    _signals.EXIT_ON_OTHER_BUS_ERRORS = True
    if len(sys.argv) < 2:
        app(prog_name="ksm-analyze")  # `ksm-analyze` alone: typer shows the help
        return
    try:
        code = app(standalone_mode=False, prog_name="ksm-analyze")
    except Interrupted as e:
        typer.echo(f"Error: {e}", err=True)
        sys.exit(128 + e.signum)
    except _ClickException as e:  # a bad option value, a missing argument: one line, exit 2
        ctx = getattr(e, "ctx", None)
        where = f"{ctx.command_path}: " if ctx is not None else ""
        typer.echo(f"Error: {where}{printable(e.format_message())}", err=True)
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
