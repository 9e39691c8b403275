"""The ``ksm-analyze`` command line: a thin typer layer over the library.

Each command calls one library function and renders what it returns. This is the only
module that turns errors into exit codes: a bad input is one line on stderr and exit 1.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from . import __version__
from .analysis import analyze
from .eligibility import Scope
from .errors import KsmAnalyzeError
from .formats import DumpFormat, open_dump
from .present import (
    render_capture,
    render_info,
    render_scan,
    render_status,
    to_json,
    write_csvs,
)
from .progress import ScanProgress
from .report import write_report

app = typer.Typer(
    name="ksm-analyze",
    help="Predict what Linux KSM would save, offline, from memory dumps.",
    no_args_is_help=True,
    add_completion=False,
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
    except BrokenPipeError:
        sys.stderr.close()  # e.g. `ksm-analyze scan ... | head`
        raise typer.Exit(0) from None


def _address(value: str) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise typer.BadParameter(f"not an address: {value!r} (use e.g. 0x100000)") from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ksm-analyze {__version__}")
        raise typer.Exit()


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
BasesOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--base-address",
        help="Address of the first byte of raw images (e.g. 0x100000): once for all inputs, "
        "or once per input in order.",
        show_default="0",
    ),
]
DumpsArg = Annotated[
    list[Path], typer.Argument(help="Dump files, all on one host.", show_default=False)
]
PrefixOpt = Annotated[
    int, typer.Option(help="Bytes of each page hashed in stage 1 (0 = whole page).")
]
MaxSharingOpt = Annotated[
    int, typer.Option(help="KSM's max_page_sharing: mappings per KSM page.")
]
ZeroPagesOpt = Annotated[
    bool, typer.Option("--use-zero-pages",
                       help="Predict with use_zero_pages=1 (zero pages map the zero page).")
]
PagesToScanOpt = Annotated[int, typer.Option(help="ksmd pages per wake-up.")]
SleepOpt = Annotated[int, typer.Option(help="ksmd sleep between wake-ups.")]
VerifyOpt = Annotated[
    bool, typer.Option("--verify/--no-verify",
                       help="Compare candidate pages byte for byte before merging them.")
]
JobsOpt = Annotated[
    int | None, typer.Option("--jobs", "-j", help="Worker processes (default: all CPUs).",
                             show_default=False)
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


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True,
                           help="Show the version and exit.")
    ] = False,
) -> None:
    """Predict what Linux KSM would save, offline, from memory dumps."""


@app.command()
def scan(
    dumps: DumpsArg,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
    = False,
    csv_dir: Annotated[
        Path | None,
        typer.Option("--csv", help="Also write one CSV per table into this directory.",
                     show_default=False),
    ] = None,
    format: FormatOpt = None,
    page_size: PageSizeOpt = 4096,
    prefix_bytes: PrefixOpt = 128,
    base_address: BasesOpt = None,
    max_page_sharing: MaxSharingOpt = 256,
    use_zero_pages: ZeroPagesOpt = False,
    pages_to_scan: PagesToScanOpt = 100,
    sleep_millisecs: SleepOpt = 20,
    verify: VerifyOpt = True,
    jobs: JobsOpt = None,
    scope: ScopeOpt = Scope.MERGEABLE.value,
    quiet: QuietOpt = False,
) -> None:
    """Predict the KSM counters and savings for DUMPS placed on one host."""
    with _errors():
        result = analyze(
            dumps,
            format=format,
            page_size=page_size,
            prefix_bytes=prefix_bytes,
            base_address=[_address(b) for b in base_address] if base_address else 0,
            max_page_sharing=max_page_sharing,
            use_zero_pages=use_zero_pages,
            pages_to_scan=pages_to_scan,
            sleep_millisecs=sleep_millisecs,
            verify=verify,
            jobs=jobs,
            scope=scope,
            progress=not quiet,
        )
        if csv_dir is not None:
            try:
                write_csvs(result, csv_dir)
            except OSError as e:
                typer.echo(f"Error: {csv_dir}: cannot write CSV files: {e.strerror}", err=True)
                raise typer.Exit(1) from None
        typer.echo(to_json(result) if json_out else render_scan(result))


@app.command()
def report(
    dumps: DumpsArg,
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Folder for the CSV, PNG and index.html files "
                     "(created if needed).", show_default=False),
    ],
    top: Annotated[
        int, typer.Option(help="Rows in the table of most duplicated contents.")
    ] = 20,
    show_content: Annotated[
        bool, typer.Option("--show-content",
                           help="Show the first 64 bytes of each most duplicated content. "
                           "Off by default: memory dumps hold secrets.")
    ] = False,
    format: FormatOpt = None,
    page_size: PageSizeOpt = 4096,
    prefix_bytes: PrefixOpt = 128,
    base_address: BasesOpt = None,
    max_page_sharing: MaxSharingOpt = 256,
    use_zero_pages: ZeroPagesOpt = False,
    pages_to_scan: PagesToScanOpt = 100,
    sleep_millisecs: SleepOpt = 20,
    verify: VerifyOpt = True,
    jobs: JobsOpt = None,
    quiet: QuietOpt = False,
    scope: ScopeOpt = Scope.MERGEABLE.value,
) -> None:
    """Write CSV tables, PNG charts and a self-contained index.html for DUMPS on one host."""
    with _errors():
        if top < 0:
            raise ValueError(f"--top cannot be negative, not {top}")
        _make_dir(output)
        result = analyze(
            dumps,
            format=format,
            page_size=page_size,
            prefix_bytes=prefix_bytes,
            base_address=[_address(b) for b in base_address] if base_address else 0,
            max_page_sharing=max_page_sharing,
            use_zero_pages=use_zero_pages,
            pages_to_scan=pages_to_scan,
            sleep_millisecs=sleep_millisecs,
            verify=verify,
            jobs=jobs,
            top=top,
            show_content=show_content,
            progress=not quiet,
            scope=scope,
        )
        try:
            written = write_report(result, output)
        except OSError as e:
            _cannot_write(output, e)
        typer.echo(f"Wrote {len(written)} files to {output}: open {output / 'index.html'}")


def _cannot_write(directory: Path, e: OSError) -> NoReturn:
    where = f" ({e.filename})" if e.filename and str(e.filename) != str(directory) else ""
    typer.echo(f"Error: {directory}: cannot write the report: {e.strerror or e}{where}",
               err=True)
    raise typer.Exit(1)


def _make_dir(directory: Path) -> None:
    """Create the output folder before the long work, so a bad -o fails at once."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        _cannot_write(directory, e)


@app.command()
def info(
    dump: Annotated[Path, typer.Argument(help="A dump file.", show_default=False)],
    format: FormatOpt = None,
    page_size: PageSizeOpt = 4096,
    base_address: BaseOpt = "0",
    ranges: Annotated[int, typer.Option(help="Show at most this many ranges.")] = 50,
) -> None:
    """Show a dump's detected format, its ranges and its pages per state."""
    with _errors(), open_dump(dump, format, page_size=page_size,
                              base_address=_address(base_address)) as reader:
        counts = {s.name.lower(): n for s, n in reader.page_counts().items()}
        typer.echo(
            render_info(str(dump), reader.format.value, reader.info(), reader.extents, counts,
                        reader.page_size, reader.warnings, max_ranges=ranges)
        )


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
    from .capture import capture as capture_processes

    with _errors(), ScanProgress(enabled=not quiet) as bars:
        summary = capture_processes(pids, output, progress=bars.bar("capturing"))
    typer.echo(render_capture(summary))


@app.command("ksm-status")
def ksm_status(
    snapshots: Annotated[
        list[Path] | None,
        typer.Argument(help="Snapshots to predict from (optional).", show_default=False),
    ] = None,
    scope: ScopeOpt = Scope.MERGEABLE.value,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
    = False,
) -> None:
    """Show the kernel's KSM counters, beside a prediction from SNAPSHOTS if given.

    Run it after turning KSM on to see how the prediction held: host-wide counters from
    /sys/kernel/mm/ksm, and /proc/PID/ksm_stat of each captured process still running.
    """
    from .status import ksm_status as read_status

    with _errors():
        status = read_status(snapshots or [], scope=scope)
        typer.echo(render_status(status, as_json=json_out))


def main() -> None:
    """Console-script entry point."""
    app()
