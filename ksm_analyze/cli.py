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

from . import __version__
from ._signals import Interrupted, raise_on_interrupt
from .analysis import analyze
from .errors import KsmAnalyzeError
from .formats import DumpFormat, open_dump
from .ksm import KsmSettings
from .render.files import to_json, write_csvs
from .render.progress import ScanProgress
from .render.text import render_capture, render_info, render_scan, render_status
from .result import TABLES, Analysis
from .settings import DEFAULT_OPTIONS, ScanOptions

if TYPE_CHECKING:
    from .planning import Plan

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
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None
    except ValueError as e:
        typer.echo(f"Error: {e}", err=True)
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
        from . import kernels

        built = ("yes" if kernels.native is not None
                 else "no (numpy code: no C compiler when it was installed)")
        typer.echo(f"ksm-analyze {__version__}\ncompiled kernels: {built}")
        raise typer.Exit()


_KSM = KsmSettings()
"""Defaults of the KSM knobs, read from their one declaration."""
_SCAN_FIELDS = {f.name for f in fields(ScanOptions)}

FormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format",
        "-f",
        help="Read inputs as this format instead of detecting it: "
        + ", ".join(f.value for f in DumpFormat) + ".",
        show_default=False,
    ),
]
PageSizeOpt = Annotated[
    int, typer.Option(help="Page size in bytes; larger guest pages are split into these.")
]
BaseOpt = Annotated[
    str,
    typer.Option(help="Address of the first byte of a raw image (e.g. 0x100000)."),
]
DumpsArg = Annotated[
    list[Path], typer.Argument(help="Dump files, all on one host.", show_default=False)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
CsvOpt = Annotated[
    Path | None,
    typer.Option("--csv", help="Also write one CSV per table into this directory.",
                 show_default=False),
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
    ),
]


def _param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=default)


# Every option of an analysis, declared once: `scan`, `report` (and later commands) get
# them all through @_analysis_command, with defaults read from ScanOptions and KsmSettings.
SchedulerOpt = Annotated[
    str | None,
    typer.Option(help="Run stage 1 on a Dask cluster: tcp://HOST:PORT of its scheduler, or "
                 "local[:N] for a local cluster of N workers (pip install "
                 "'ksm-analyze[dask]').", show_default=False),
]

_ANALYSIS_PARAMS = (
    _param("format", FormatOpt, DEFAULT_OPTIONS.format),
    _param("scope", ScopeOpt, DEFAULT_OPTIONS.scope.value),
    _param("page_size", PageSizeOpt, _KSM.page_size),
    _param("prefix_bytes", Annotated[
        int, typer.Option(help="Bytes of each page hashed in stage 1 (0 = whole page).")
    ], DEFAULT_OPTIONS.prefix_bytes),
    _param("base_address", Annotated[
        list[str] | None,
        typer.Option(
            "--base-address",
            help="Address of the first byte of raw images (e.g. 0x100000): once for all "
            "inputs, or once per input in order.",
            show_default=str(DEFAULT_OPTIONS.base_address),
        ),
    ], None),
    _param("max_page_sharing", Annotated[
        int, typer.Option(help="KSM's max_page_sharing: mappings per KSM page.")
    ], _KSM.max_page_sharing),
    _param("use_zero_pages", Annotated[
        bool, typer.Option("--use-zero-pages",
                           help="Predict with use_zero_pages=1 (zero pages map the zero page).")
    ], _KSM.use_zero_pages),
    _param("pages_to_scan", Annotated[int, typer.Option(help="ksmd pages per wake-up.")],
           _KSM.pages_to_scan),
    _param("sleep_millisecs", Annotated[
        int, typer.Option(help="ksmd sleep between wake-ups.")
    ], _KSM.sleep_millisecs),
    _param("verify", Annotated[
        bool, typer.Option("--verify/--no-verify",
                           help="Compare candidate pages byte for byte before merging them.")
    ], DEFAULT_OPTIONS.verify),
    _param("jobs", Annotated[
        int | None, typer.Option("--jobs", "-j", show_default=False,
                                 help="Parallel jobs, threads or worker processes "
                                      "(default: all CPUs).")
    ], DEFAULT_OPTIONS.jobs),
    _param("domain", Annotated[
        list[str] | None,
        typer.Option("--domain", help="NAME=GLOB: inputs whose path or file name match GLOB "
                     "form trust domain NAME; pages never merge across domains (repeat it).",
                     show_default=False),
    ], None),
    _param("domains_file", Annotated[
        Path | None,
        typer.Option("--domains", help="CSV file of input,domain rows: the same policy as "
                     "--domain, one row per input.", show_default=False),
    ], None),
    _param("merge", Annotated[
        str, typer.Option(help="all (what KSM does) or zero-only (what if only zero pages "
                          "merged).")
    ], DEFAULT_OPTIONS.merge),
    _param("cache", Annotated[
        str | None,
        typer.Option(help="Folder of fingerprint files: a dump fingerprinted before (same "
                     "path, size, mtime, hashing options) is not read again in stage 1.",
                     show_default=False),
    ], DEFAULT_OPTIONS.cache),
    _param("scheduler", SchedulerOpt, DEFAULT_OPTIONS.scheduler),
    _param("quiet", QuietOpt, False),
)


@dataclass(frozen=True)
class _Request:
    """What the shared options ask for: how to read, what KSM to assume, whether to draw."""

    options: ScanOptions
    ksm: KsmSettings
    quiet: bool

    def run(self, dumps: list[Path], **extra: Any) -> Analysis:
        """Analyse ``dumps``; ``extra`` sets further ScanOptions fields (``top``...)."""
        options = replace(self.options, **extra)
        with ScanProgress(enabled=not self.quiet) as bars:
            return analyze(dumps, options, self.ksm, progress=bars)


def _analysis_command(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` every analysis option; it receives them as ``request: _Request``."""
    names = [p.name for p in _ANALYSIS_PARAMS]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        given = {n: kwargs.pop(n) for n in names}
        quiet, bases = given.pop("quiet"), given.pop("base_address")
        with _errors():
            given["base_address"] = tuple(map(_address, bases)) if bases else 0
            given["domains"] = _domains(given.pop("domain") or [], given.pop("domains_file"))
            options = ScanOptions(**{k: v for k, v in given.items() if k in _SCAN_FIELDS})
            ksm = KsmSettings(**{k: v for k, v in given.items() if k not in _SCAN_FIELDS})
        command(**kwargs, request=_Request(options, ksm, quiet))

    own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
           if p.name != "request"]
    wrapper.__signature__ = inspect.Signature(own + list(_ANALYSIS_PARAMS))  # type: ignore[attr-defined]
    return wrapper


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True,
                           help="Show the version and exit.")
    ] = False,
) -> None:
    """Predict what Linux KSM would save, offline, from memory dumps."""


HostMemoryOpt = Annotated[
    str, typer.Option("--host-memory", help="Memory of one host, e.g. 256GiB.",
                      show_default=False),
]
ReserveOpt = Annotated[
    str, typer.Option(help="Memory each host keeps for itself: a size (16GiB) or a percentage "
                      "of --host-memory (10%).")
]
ProjectOpt = Annotated[
    str | None, typer.Option("--project", help="Also project host memory for these numbers "
                             "of inputs like these, e.g. 10,50,100.", show_default=False)
]


def _make_plan(result: Analysis, host_memory: str, reserve: str, project: str | None,
               **options: Any) -> Plan:
    """The plan of ``result`` for the command-line spelling of its sizes and counts."""
    from .planning import plan as make_plan
    from .units import parse_size

    size = parse_size(host_memory, what="--host-memory")
    spec = reserve.strip()
    if spec.endswith("%"):
        try:
            kept = int(size * float(spec[:-1]) / 100)
        except ValueError:
            raise ValueError(f"--reserve {reserve!r} is not a size or a percentage "
                             "(e.g. 16GiB or 10%)") from None
    else:
        kept = parse_size(spec, what="--reserve")
    try:
        counts = [int(c) for c in project.split(",")] if project else []
    except ValueError:
        raise ValueError(f"--project {project!r} is not a list of input counts "
                         "(e.g. 10,50,100)") from None
    return make_plan(result, size, reserve=kept, project=counts, **options)


@app.command()
@_analysis_command
def scan(
    dumps: DumpsArg,
    json_out: JsonOpt = False,
    csv_dir: CsvOpt = None,
    *,
    request: _Request,
) -> None:
    """Predict the KSM counters and savings for DUMPS placed on one host."""
    with _errors():
        if csv_dir is not None:
            _refuse_overwriting(dumps, [csv_dir / f"{name}.csv" for name in TABLES])
        result = request.run(dumps)
        if csv_dir is not None:
            try:
                write_csvs(result, csv_dir)
            except OSError as e:
                typer.echo(f"Error: {csv_dir}: cannot write CSV files: {e.strerror}", err=True)
                raise typer.Exit(1) from None
        typer.echo(to_json(result) if json_out else render_scan(result))


@app.command()
@_analysis_command
def report(
    dumps: DumpsArg,
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Folder for the CSV, PNG and index.html files "
                     "(created if needed).", show_default=False),
    ],
    top: Annotated[
        int, typer.Option(help="Rows in the table of most duplicated contents.")
    ] = DEFAULT_OPTIONS.top,
    show_content: Annotated[
        bool, typer.Option("--show-content",
                           help="Show the first 64 bytes of each most duplicated content. "
                           "Off by default: memory dumps hold secrets.")
    ] = DEFAULT_OPTIONS.show_content,
    host_memory: Annotated[
        str | None, typer.Option("--host-memory", help="Also plan hosts of this size, as "
                                 "'plan' does, in a Capacity plan section.", show_default=False)
    ] = None,
    reserve: ReserveOpt = "0",
    project: ProjectOpt = None,
    *,
    request: _Request,
) -> None:
    """Write CSV tables, PNG charts and a self-contained index.html for DUMPS on one host."""
    with _errors():
        from .render.report import report_files, write_report  # matplotlib: only for a report

        options = replace(request.options, top=top, show_content=show_content)  # checks top
        _refuse_overwriting(dumps, report_files(output))
        _make_dir(output)
        result = replace(request, options=options).run(dumps)
        planned = None if host_memory is None else _make_plan(result, host_memory, reserve,
                                                               project)
        try:
            written = write_report(result, output, planned)
        except OSError as e:
            _cannot_write(output, e)
        typer.echo(f"Wrote {len(written)} files to {output}: open {output / 'index.html'}")


@app.command()
@_analysis_command
def plan(
    dumps: DumpsArg,
    host_memory: HostMemoryOpt,
    reserve: ReserveOpt = "0",
    hosts: Annotated[
        int | None, typer.Option("--hosts", help="Spread over exactly this many hosts "
                                 "instead of as few as possible.", show_default=False)
    ] = None,
    project: ProjectOpt = None,
    untouched_zero: Annotated[
        bool, typer.Option("--zero-untouched", help="Count zero pages as never touched "
                           "(scan's 'without zero pages' column) instead of as host memory.")
    ] = False,
    json_out: JsonOpt = False,
    csv_dir: CsvOpt = None,
    png: Annotated[
        Path | None, typer.Option("--png", help="Also draw the hosts (and the projection) "
                                  "as PNG files with this name prefix.", show_default=False)
    ] = None,
    *,
    request: _Request,
) -> None:
    """Place DUMPS on hosts of --host-memory: sharing-aware beside first-fit.

    Sharing-aware: each host starts with the largest input left, then takes the input that
    adds the least memory after KSM (exact, from the content classes) while one fits; then
    the emptiest host is dissolved where its inputs fit elsewhere. First-fit decreasing
    ignores sharing. Costs one pass over the inputs' content classes per input placed.
    """
    from .planning import PLAN_TABLES  # pandas: only for a plan
    from .render.text import render_plan

    with _errors():
        if csv_dir is not None:
            _refuse_overwriting(dumps, [csv_dir / f"{name}.csv" for name in PLAN_TABLES])
        result = _make_plan(request.run(dumps), host_memory, reserve, project, hosts=hosts,
                            zero_pages=not untouched_zero)
        try:
            if csv_dir is not None:
                write_csvs(result, csv_dir)
            if png is not None:
                _write_pngs(result, png)
        except OSError as e:
            _cannot_write(csv_dir or png or Path("."), e)
        typer.echo(to_json(result) if json_out else render_plan(result))


def _write_pngs(result: Plan, prefix: Path) -> None:
    from .render.files import FILE_MODE, atomic_write
    from .render.report import png_bytes

    for name, draw in result.charts().items():
        atomic_write(f"{prefix}-{name}.png", png_bytes(draw()), mode=FILE_MODE)


def _domains(specs: list[str], table: Path | None) -> tuple[tuple[str, str], ...]:
    """``--domain NAME=GLOB`` and ``--domains FILE.csv`` as (name, pattern) pairs."""
    pairs = []
    for spec in specs:
        name, sep, pattern = spec.partition("=")
        if not (sep and name and pattern):
            raise ValueError(f"--domain {spec!r} is not NAME=GLOB (e.g. web=web-*.elf)")
        pairs.append((name, pattern))
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
    where = f" ({e.filename})" if e.filename and str(e.filename) != str(directory) else ""
    typer.echo(f"Error: {directory}: cannot write {what}: {e.strerror or e}{where}",
               err=True)
    raise typer.Exit(1)


def _make_dir(directory: Path, what: str = "the report") -> None:
    """Create the output folder before the long work, so a bad -o fails at once."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        _cannot_write(directory, e, what)


@app.command("fingerprint")
@_analysis_command
def fingerprint_cmd(
    dumps: Annotated[list[Path], typer.Argument(help="Dump files.", show_default=False)],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for the fingerprint files.",
                           show_default=False)],
    *,
    request: _Request,
) -> None:
    """Write each dump's fingerprints to OUTPUT as Parquet, for scan, report and plan.

    No page bytes are written. The files can be read on this machine or another; only the
    hashing options matter here.
    """
    from .sources import write_fingerprint_files

    with _errors():
        _make_dir(output, "fingerprint files")
        with ScanProgress(enabled=not request.quiet) as bars:
            try:
                written = write_fingerprint_files(
                    dumps, output, request.options, request.ksm.page_size,
                    reading=lambda name: lambda n, of: bars(name, n, of),
                    tasks=lambda n, of: bars("Dask tasks", n, of))
            except OSError as e:  # a full disk, say: the folder was writable at the start
                _cannot_write(output, e, "fingerprint files")
    for path in written:
        typer.echo(f"Wrote {path}")


@app.command()
def info(
    dump: Annotated[Path, typer.Argument(help="A dump file.", show_default=False)],
    format: FormatOpt = None,
    page_size: PageSizeOpt = _KSM.page_size,
    base_address: BaseOpt = str(DEFAULT_OPTIONS.base_address),
    ranges: Annotated[int, typer.Option(help="Show at most this many ranges.")] = 50,
) -> None:
    """Show a dump's detected format, its ranges and its pages per state."""
    with _errors():
        options = ScanOptions(format=DumpFormat.parse(format) if format else None,
                              base_address=_address(base_address))  # checks both
    with _errors(), open_dump(dump, options.format, page_size=page_size,
                              base_address=options.bases_for([dump])[0]) as reader:
        typer.echo(render_info(str(dump), reader, max_ranges=ranges))


@app.command()
def capture(
    pids: Annotated[list[int], typer.Argument(help="Process IDs to capture.", show_default=False)],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Snapshot file to write (mode 0600).",
                           show_default=False)
    ],
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


@app.command("ksm-status")
def ksm_status(
    snapshots: Annotated[
        list[Path] | None,
        typer.Argument(help="Snapshots to predict from (optional).", show_default=False),
    ] = None,
    scope: ScopeOpt = DEFAULT_OPTIONS.scope.value,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
    = False,
) -> None:
    """Show the kernel's KSM counters, beside a prediction from SNAPSHOTS if given.

    Run it after turning KSM on to see how the prediction held: host-wide counters from
    /sys/kernel/mm/ksm, and /proc/PID/ksm_stat of each captured process still running.
    """
    from .live.status import ksm_status as read_status

    with _errors():
        status = read_status(snapshots or [], scope=scope)
        typer.echo(render_status(status, as_json=json_out))


def main() -> None:
    """Console-script entry point. Ctrl-C and SIGTERM unwind (workers are killed, temporary
    files removed), then print one line and exit with 128 + the signal (130, 143)."""
    raise_on_interrupt()
    try:
        app()
    except Interrupted as e:
        typer.echo(f"Error: {e}", err=True)
        sys.exit(128 + e.signum)
