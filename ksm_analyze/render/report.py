"""``ksm-analyze report``: a folder of CSV tables, PNG charts and one self-contained HTML page.

Everything is written with :func:`~ksm_analyze.render.files.atomic_write`, files mode 0600 and
the folder 0700 when created: the tables name inputs and contents of memory dumps. The report
is whole or absent: its files are written into a hidden folder inside the output folder and
renamed into place only when all are written, ``index.html`` last, so a full disk or Ctrl-C
leaves a previous report as it was. The HTML
page embeds its charts as ``data:`` URIs and loads nothing, so it opens from disk in any
browser. Page bytes appear only if the analysis was made with ``show_content=True``.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from .._version import __version__
from ..analysis import TABLES
from ..errors import printable
from ..units import counted, human_bytes
from .files import DIR_MODE, FILE_MODE, atomic_write, csv_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..analysis import Analysis
    from ..planning.plan import Plan
    from ..whatif.tune import Tune

__all__ = ["CHARTS", "HOST_COLUMNS", "TABLES", "TIME_CHARTS", "png_bytes", "report_files",
           "write_report"]

CHARTS = {
    "savings": "Memory before and after KSM",
    "histogram": "Sharing-degree histogram",
    "pairwise": "Pairwise sharing between inputs",
    "address_map": "Where the pages lie in each input's address space",
    "timeline": "KSM counters against time, ksmd replayed",
    "ksmd_settings": "ksmd CPU against time to steady state, per ksmd setting",
}
"""The PNG files of a report (``<name>.png``) and their captions."""
TIME_CHARTS = ("timeline", "ksmd_settings")
PAIRS_SHOWN = 500
"""Rows of the pairwise table in index.html (the most alike pairs; the CSV has all)."""
ROWS_SHOWN = 100
"""Rows of a table of inputs or hosts in index.html (the first; the CSV has all)."""
NAMES_SHOWN = 4
"""Input names in the page's title and heading (beyond: "and N more")."""
TABLES_OF_CHARTS = ("address_map", *TIME_CHARTS)
"""Charts that draw the table of their name, which an analysis out of core leaves empty."""
NEAR_CHART = "near_duplicates"
NEAR_CAPTION = "Near-duplicates: pages by bytes differing, and by first differing byte"
"""The chart of the near-duplicates section (``near_duplicates.png``), and its caption:
written only when the what-if ran (``--near-duplicates N``), after those of ``CHARTS``."""
"""The charts of the "Over time" section (the others are under "Charts")."""
HOST_COLUMNS = {
    "steady_state": ("ksmd replayed, steady",
                     ("the counters ksmd settles at, replayed full scan by full scan over the "
                     "inputs (over time: what KSM keeps; pages_volatile and pages_unshared as "
                     "ksmd sees them)")),
    "if_memory_stood_still": ("if memory stood still",
                              ("the last samples counted as one frozen moment, as a one-time "
                              "count would")),
}
"""The ksmd model's columns of the host table: their text names (docs/glossary.md) and words."""
PLAN_CHARTS = {
    "plan_hosts": "Each host's memory after KSM, with and without sharing-aware placement",
    "plan_projection": "Host memory for more inputs like these, with and without KSM",
}
"""The PNG files of a report's capacity plan and their captions."""
TUNE_CHART = ("tune", "Seconds per GiB and false candidates against the prefix length")
"""The PNG file of a report's prefix-length section (``report --tune``) and its caption."""


def png_bytes(fig: Figure) -> bytes:
    """A figure as PNG bytes, the same for the same figure (no date or software tag)."""
    buf = io.BytesIO()
    # No "Software" or date metadata: the same analysis gives the same bytes.
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def report_files(directory: str | os.PathLike[str], plan: Plan | None = None,
                 tune: bool = False, *, near_duplicates: bool = False) -> list[Path]:
    """The files :func:`write_report` writes into ``directory``, in the order it writes them
    (with a ``plan``: its tables as ``plan_<name>.csv`` and charts as ``plan_<name>.png``;
    with ``tune``: ``tune_<name>.csv`` and ``tune.png``; with ``near_duplicates``, the
    what-if asked for, its chart)."""
    from ..whatif.tune import TUNE_TABLES

    out = Path(directory)
    files = [out / f"{name}.csv" for name in TABLES]
    if plan is not None:
        files += [out / f"plan_{name}.csv" for name in _plan_tables(plan)]
    if tune:
        files += [out / f"tune_{name}.csv" for name in TUNE_TABLES]
    files += [out / f"{name}.png" for name in CHARTS]
    if near_duplicates:
        files.append(out / f"{NEAR_CHART}.png")
    if plan is not None:
        files += [out / f"plan_{name}.png" for name in plan.charts()]
    if tune:
        files.append(out / f"{TUNE_CHART[0]}.png")
    return [*files, out / "index.html"]


def _plan_tables(plan: Plan) -> dict[str, pd.DataFrame]:
    return {k: v for k, v in plan.tables().items() if len(v)}


def write_report(result: Analysis, directory: str | os.PathLike[str], plan: Plan | None = None,
                 tune: Tune | None = None) -> list[Path]:
    """Write the report of ``result`` into ``directory`` (created if needed).

    Args:
        result: what :func:`~ksm_analyze.analyze` returned.
        directory: the output folder; existing report files in it are replaced.
        plan: a capacity plan of the same analysis, for a "Capacity plan" section.
        tune: the prefix-length sweep of the same inputs, for a "Prefix length" section.

    Returns:
        The files written: ``<table>.csv`` for each of :data:`~ksm_analyze.analysis.TABLES`, ``<chart>.png`` for
        each of ``CHARTS``, and ``index.html``.

    Raises:
        OSError: the folder cannot be created or written (naming the file); no file of the
            report was replaced then.
    """
    out = Path(directory)
    out.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    tables = dict(result.tables())
    # A chart of a table not computed (out of core: a warning says so) is left out.
    charts = {name: getattr(result, f"plot_{name}") for name in CHARTS
              if name not in TABLES_OF_CHARTS or len(result.columns[name])}
    if len(result.columns["near_duplicate_histogram"]):  # the what-if ran
        charts[NEAR_CHART] = result.plot_near_duplicates
    if plan is not None:
        tables |= {f"plan_{k}": v.set_index(v.columns[0]) for k, v in _plan_tables(plan).items()}
        charts |= {f"plan_{k}": draw for k, draw in plan.charts().items()}
    if tune is not None:
        from .plots import plot_tune

        tables |= {f"tune_{k}": v for k, v in tune.tables().items()}
        charts[TUNE_CHART[0]] = lambda: plot_tune(tune)
    staging = Path(tempfile.mkdtemp(prefix=".ksm-report-", dir=out))  # mode 0700
    try:
        names = []
        try:
            for name, df in tables.items():
                atomic_write(staging / f"{name}.csv", csv_text(df), mode=FILE_MODE)
                names.append(f"{name}.csv")
            images = {}
            for name, draw in charts.items():
                images[name] = png_bytes(draw())
                atomic_write(staging / f"{name}.png", images[name], mode=FILE_MODE)
                names.append(f"{name}.png")
            atomic_write(staging / "index.html", render_html(result, images, plan, tune),
                         mode=FILE_MODE)
            names.append("index.html")
        except OSError as e:  # name the file of the report, not the staging copy
            if e.filename is not None:
                e.filename = os.fspath(out / Path(e.filename).name)
            raise
        for name in names:  # renames need no space: index.html, last, says it is whole
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out / name for name in names]


def _html_table(df: pd.DataFrame, **kwargs: Any) -> str:
    def number(v: Any) -> str:
        if v is pd.NA:  # a count some rows do not have (nullable Int64)
            return ""
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:,.3f}".rstrip("0").rstrip(".")
        return f"{v:,}" if isinstance(v, int) else html.escape(str(v))

    shown = df.copy()
    for col in shown.columns:
        if col == "bytes" or str(col).endswith("_bytes"):  # sizes for people: KiB, MiB, GiB
            shown[col] = ["" if pd.isna(v) else human_bytes(v) for v in shown[col]]
        elif shown[col].dtype == object and any(isinstance(v, list | dict)
                                                for v in shown[col]):
            shown[col] = [", ".join(f"{k}: {n:,}" for k, n in v.items()) if isinstance(v, dict)
                          else ", ".join(map(str, v)) if isinstance(v, list) else v
                          for v in shown[col]]
        elif shown[col].dtype.kind in "iuf":
            shown[col] = [number(v.item() if hasattr(v, "item") else v) for v in shown[col]]
    text: str = shown.to_html(escape=True, border=0, classes="data", na_rep="", **kwargs)
    # Long column names (memory_before_bytes) may break after an underscore, so a table of
    # many columns fits the page; the wrapper scrolls sideways what still does not.
    head, sep, body = text.partition("</thead>")
    head = re.sub(r"<th>([^<]*)</th>", lambda m: f"<th>{m[1].replace('_', '_<wbr>')}</th>",
                  head)
    text = head + sep + body
    return f'<div class="scroll">{text}</div>'


def _plan_summary(plan: Plan) -> list[tuple[str, str]]:
    """The plan's headline: hosts needed by each method (and guests per host if projected)."""
    from .text import _METHODS  # the names the text report gives the methods

    rows = []
    size = human_bytes(plan.host_memory)
    for r in plan.summary.itertuples():
        hosts, after = int(r.hosts), human_bytes(int(r.memory_after_bytes))
        method = _METHODS.get(r.method, r.method)
        if r.method == "lower_bound":
            rows.append((f"Hosts of {size}, {method}", f"{hosts:,}"))
            continue
        what = f"{hosts:,}; memory after KSM {after}"
        if r.method == "sharing":
            saved = int(r.hosts_saved)
            against = (f"saving {saved:,} hosts ({float(r.hosts_saved_percent):.0f}%)"
                       if saved >= 0 else f"{-saved:,} hosts more")
            what = f"{hosts:,}, {against} against first-fit; memory after KSM {after}"
        rows.append((f"Hosts of {size} needed, {method}", what))
    if plan.fits is not None:
        expected, cautious, hopeful = plan.fits
        rows.append((f"Inputs like these per host of {size}",
                     f"{expected:,} ({cautious:,} to {hopeful:,} by the band)"))
    if len(plan.overcommit):
        from ..planning.overcommit import supported

        s = supported(plan)
        rows.append((f"Overcommit ratio hosts of {size} support",
                     "no memory limit (guests that cost nothing after KSM)" if math.isinf(s.ratio)
                     else f"{s.ratio:.2f} (expected {s.point:.2f}; low end of the band of "
                     f"{s.family})"))
    return rows


def _summary(result: Analysis, plan: Plan | None = None) -> list[tuple[str, str]]:
    sav, host = result.savings, result.host
    rows = [] if plan is None else _plan_summary(plan)
    for scen, title in (("with_zero_pages", "with zero pages"),
                        ("without_zero_pages", "without zero pages")):
        if f"{scen}_bytes" not in sav.columns:
            continue
        before = sav.at["memory_before", f"{scen}_bytes"]
        after = sav.at["memory_after", f"{scen}_bytes"]
        left = sav.at["pages_after_merging", f"{scen}_bytes"]
        rmap = sav.at["rmap_overhead", f"{scen}_bytes"]
        saved = sav.at["saved", f"{scen}_bytes"]
        pct = sav.at["saved", f"{scen}_percent"]
        change = (f"{human_bytes(before)} → {human_bytes(after)} ({human_bytes(left)} of pages "
                  f"left after merging + {human_bytes(rmap)} of rmap_items), "
                  f"{human_bytes(saved)} of pages saved ({pct:.1f}%)")
        rows.append((f"Memory before → after KSM ({title})", change))
        rows.append((f"general_profit ({title})", human_bytes(host.at["general_profit", scen])))
    for column, (text, _) in HOST_COLUMNS.items():
        if column in host.columns:
            rows.append((f"general_profit ({text})",
                         human_bytes(host.at["general_profit", column])))
    rows.append(("Inputs", f"{len(result.per_input):,}"))
    for item, label in (("sharing_within_inputs", "Saved by sharing within inputs"),
                        ("sharing_across_inputs", "Saved by sharing across inputs")):
        rows.append((label, human_bytes(sav.at[item, "with_zero_pages_bytes"])))
    return rows


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table.data, table.summary { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
table.data th, table.data td, table.summary th, table.summary td {
  padding: 0.2em 0.6em; border-bottom: 1px solid #e3e3e3; }
table.data th { vertical-align: bottom; }
table.data td { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.summary th { text-align: left; font-weight: normal; color: #555; }
table.summary td { font-weight: bold; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.9em; }
.note { color: #555; font-size: 0.9em; } .warn { color: #a00; }
code { font-size: 0.95em; overflow-wrap: anywhere; } .scroll { overflow-x: auto; }
"""


def render_html(result: Analysis, images: dict[str, bytes], plan: Plan | None = None,
                tune: Tune | None = None) -> str:
    """The report page: summary, charts (embedded PNGs), tables, a plan and options."""
    e = html.escape
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    intro = (
        f'<p class="note">ksm-analyze {e(__version__)}, {e(stamp)}. '
        "All inputs are treated as one host. A guest dump cannot tell zero pages the guest "
        "wrote (host memory, merged by KSM) from pages it never touched (no host memory), so "
        "numbers are given both ways; <b>memory after KSM</b> (what the host needs: the pages "
        "left after merging plus KSM's rmap_items, as <code>plan</code> counts a host) differs "
        "only by what merged zero pages still cost.</p>"
    )
    names = _names_text(result.names)
    show_content = "content_hex" in result.top_contents.columns
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>KSM savings report: {e(names)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>KSM savings report: {e(names)}</h1>",
        intro,
        '<h2 id="summary">Summary</h2><table class="summary">',
        *(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _summary(result, plan)),
        "</table>",
    ]
    if show_content:
        parts.append('<p class="warn">This report was made with <code>--show-content</code>: '
                     "the most duplicated contents table shows the first bytes of each page, "
                     "which may be secret.</p>")
    for w in result.warnings:
        parts.append(f'<p class="warn">Warning: {e(w)}</p>')
    parts += _vm_config_section(result)
    parts.append('<h2 id="charts">Charts</h2>')
    parts += [_figure(name, caption, images) for name, caption in CHARTS.items()
              if name not in TIME_CHARTS]
    parts += _over_time_section(result, images)
    parts.append('<h2 id="tables">Tables</h2>')
    pairwise_title = (
        "Pairwise sharing (non-zero pages; extra saving if only the two share a host)"
    )
    pairs = result.pairwise
    if len(pairs) > PAIRS_SHOWN:  # thousands of inputs: the most alike pairs, not a book
        pairs = pairs.sort_values("a_pages_in_b", ascending=False, kind="stable").head(
            PAIRS_SHOWN)
        pairwise_title += (f": the {counted(PAIRS_SHOWN, 'pair')} with the most pages of A "
                           f"in B, of {len(result.pairwise):,}")
    sections = (
        ("per_input", "Inputs (pages)", result.per_input, False),
        ("host", ("KSM counters, all inputs on one host (general_profit in bytes; sizes "
                  "are in the savings table)"),
         result.host, True),
        ("savings", "Savings", result.savings, True),
        ("histogram", "Sharing-degree histogram", result.histogram, False),
        ("pairwise", pairwise_title, pairs, False),
        ("top_contents", "Most duplicated contents (SHA-256 shortened to 16 hex digits)",
         _short_hashes(result.top_contents), False),
    )
    for name, title, df, index in sections:
        parts.append(f'<h3 id="table-{name}">{e(title)}</h3>')
        if name == "per_input":
            df, cut = _first_rows(df, "input", "per_input.csv")
            parts += [cut] if cut else []
        parts.append(_html_table(df, index=index))
        if name == "host":
            parts += [f'<p class="note"><code>{e(col)}</code> ({e(text)}): {e(words)}.</p>'
                      for col, (text, words) in HOST_COLUMNS.items() if col in df.columns]
        parts.append(f'<p class="note">Also in <a href="{name}.csv">{name}.csv</a>.</p>')
    parts += _numa_section(result)
    parts.append('<p class="note">The page kinds per address bin are in '
                 '<a href="address_map.csv">address_map.csv</a>; fingerprinting statistics '
                 'in <a href="stages.csv">stages.csv</a>; time to converge in '
                 '<a href="convergence.csv">convergence.csv</a>, ksmd replayed full scan by '
                 'full scan in <a href="timeline.csv">timeline.csv</a> and each ksmd setting '
                 'in <a href="ksmd_settings.csv">ksmd_settings.csv</a>.</p>')
    parts += _compression_section(result)
    parts += _huge_pages_section(result)
    parts += _near_duplicates_section(result, images)
    options = {**result.options_record(), "show_content": show_content}
    if plan is not None:
        parts += _plan_section(plan, images)
    if tune is not None:
        parts += _tune_section(tune, images)
    parts.append('<h2 id="options">Options</h2><table class="summary">')
    inputs = options.get("inputs")
    if isinstance(inputs, list | tuple) and len(inputs) > NAMES_SHOWN:
        more = f"... and {len(inputs) - NAMES_SHOWN:,} more (per_input.csv has them all)"
        options["inputs"] = [*inputs[:NAMES_SHOWN], more]
    parts.extend(f"<tr><th>{e(str(k))}</th><td><code>{e(_option(v))}</code></td></tr>"
                 for k, v in options.items())
    parts.append("</table></body></html>")
    # html.escape leaves control characters: a name or warning from a file could still put
    # an ESC or a BEL in the page. Escape them as the text report does (a newline inside a
    # name is white space in HTML and stays).
    return "".join(printable(line) + "\n" for line in "\n".join(parts).split("\n"))


def _names_text(names: list[str]) -> str:
    """The inputs' names, the first :data:`NAMES_SHOWN` and how many more."""
    if len(names) <= NAMES_SHOWN:
        return ", ".join(names)
    return f"{', '.join(names[:NAMES_SHOWN])} and {len(names) - NAMES_SHOWN:,} more"


def _first_rows(df: pd.DataFrame, what: str, csv: str, by: str | None = None
                ) -> tuple[pd.DataFrame, str]:
    """The first :data:`ROWS_SHOWN` rows of a table of ``what`` (of each ``by`` value), and
    the note that says so (empty when all are shown): a page of thousands of rows is unread."""
    shown = df.groupby(by, sort=False).head(ROWS_SHOWN) if by else df.head(ROWS_SHOWN)
    if len(shown) == len(df):
        return df, ""
    which = (f"the first {counted(ROWS_SHOWN, what)} of each {by} ({len(shown):,} of "
             f"{len(df):,} rows)" if by else f"the first {len(shown):,} of {counted(len(df), what)}")
    return shown, (f'<p class="note">Shown: {which}; <a href="{csv}">{csv}</a> has them '
                   "all.</p>")


def _figure(name: str, caption: str, images: dict[str, bytes]) -> str:
    """A chart embedded as a ``data:`` URI, with its caption and file name."""
    if name not in images:
        return ""
    e = html.escape
    data = base64.b64encode(images[name]).decode("ascii")
    return (f'<figure id="chart-{name}"><img src="data:image/png;base64,{data}" '
            f'alt="{e(caption)}"><figcaption>{e(caption)} ({e(name)}.png)</figcaption></figure>')


def _over_time_section(result: Analysis, images: dict[str, bytes]) -> list[str]:
    """When ksmd gets there and at what CPU (the words ``scan`` prints), the two time
    charts, and with inputs seen over time, how their pages changed."""
    from .text import _over_time  # the same words as the text report

    e = html.escape
    stab = result.columns["stability"]
    words = _over_time({"stability": stab.take([]), "convergence": result.columns["convergence"]})
    parts = ['<h2 id="over-time">Over time: what ksmd keeps, and when</h2>',
             *(f"<p>{e(line)}</p>" for line in words if line)]
    if len(stab):
        shown, cut = _first_rows(result.stability, "input", "stability.csv")
        parts += [('<h3 id="table-stability">Stability: pages per input, first sample to '
                  "last (eligible pages)</h3>"),
                  *([cut] if cut else []), _html_table(shown, index=False),
                  ('<p class="note">Duplicates that are stable hold their content in every '
                  "sample; duplicates that only coincide are identical in the last sample "
                  "but change: KSM cannot keep them merged. Also in "
                  '<a href="stability.csv">stability.csv</a>.</p>')]
    else:
        parts.append('<p class="note">Each input was seen once: the replay assumes its '
                     "memory holds still. Samples over time (<code>ksm-analyze fingerprint "
                     "PID -o DIR --every 1s --count 3</code>) show what changes.</p>")
    parts += [_figure(name, CHARTS[name], images) for name in TIME_CHARTS]
    return parts


def _compression_section(result: Analysis) -> list[str]:
    """With ``--compress``: what zram and zswap would need of what KSM leaves."""
    table = result.columns["compression"]
    if not len(table["input"]):
        return []
    df = result.compression.drop(columns="codec")
    df, cut = _first_rows(df, "input", "compression.csv")
    return [
        '<h2 id="compression">Compression beside dedup (zram, zswap)</h2>',
        (f'<p>Codec: {html.escape(str(table["codec"][0]))}. What KSM leaves (a page per '
         "non-zero content: within the input alone on its row, across all inputs on "
         "<code>host</code>'s), compressed page by page and stored as zram and zswap store "
         "it: same-filled pages as a flag, zsmalloc's size classes, pages that do not shrink "
         "below zram's huge class stored whole, and below a page rejected by zswap (a page "
         "each). The savings chart's last bar is the host's zram bytes (docs/model.md, "
         '"Compression beside dedup").</p>'),
        *([cut] if cut else []),
        _html_table(df, index=False),
        '<p class="note">Also in <a href="compression.csv">compression.csv</a>.</p>',
    ]


def _huge_pages_section(result: Analysis) -> list[str]:
    """What merging only whole identical 2 MiB pages would save beside KSM's 4 KiB merging,
    and the THPs KSM splits: the words ``scan`` prints, and the table (nothing where it was
    not computed, out of core)."""
    from .text import _huge_pages  # the same words as the text report

    e = html.escape
    huge = result.columns["huge_pages"]
    if not len(huge):
        return []
    shown, cut = _first_rows(result.huge_pages, "input", "huge_pages.csv")
    return ['<h2 id="huge-pages">Huge pages: whole 2 MiB pages against KSM\'s 4 KiB</h2>',
            *(f"<p>{e(line.strip())}</p>" for line in _huge_pages(huge) if line),
            *([cut] if cut else []), _html_table(shown, index=False),
            ('<p class="note">A huge page is a 2 MiB-aligned region all of whose pages are '
             "present and in KSM's scope; the last row is the host (all inputs). "
             "<code>basis</code>: <code>recorded</code>, the THPs a snapshot recorded; "
             "<code>if_thp_backed</code>, every huge page counted as a THP (a guest dump "
             "cannot tell how the host backs its RAM). <code>split_cost</code>: what 4 KiB "
             "merging saves beyond merging whole huge pages (docs/model.md, \"Huge pages\"). "
             'Also in <a href="huge_pages.csv">huge_pages.csv</a>.</p>')]


def _vm_config_section(result: Analysis) -> list[str]:
    """With --vm-config: each input's VM and whether KSM scans it, with every reason."""
    if not result.vm_configs:
        return []
    frame = pd.DataFrame([{**r, **{k: "; ".join(r[k]) for k in ("reasons", "other_reasons",
                                                                  "notes")},
                           "numa_nodes": " ".join(map(str, r["numa_nodes"]))}
                          for r in result.vm_configs])
    return ['<h2 id="vm-configs">VM configurations: what KSM will not scan</h2>',
            _html_table(frame, index=False),
            ('<p class="note">An input whose VM KSM does not scan (<code>eligible</code> '
             "False) counts in no number of this report: its pages are the exclusion rule "
             "<code>vm_config</code>. Inputs given no configuration are assumed eligible.</p>")]


def _numa_section(result: Analysis) -> list[str]:
    """With --numa-nodes: each node's KSM (merge_across_nodes=0) and what merging across
    nodes would have saved, in the words ``scan`` prints."""
    from .text import _numa  # the same words as the text report

    lines = _numa(result)
    if not lines:
        return []
    e = html.escape
    return [('<h3 id="table-numa">NUMA nodes, merge_across_nodes=0 (each node its own KSM; '
            "zero pages present)</h3>"), _html_table(result.numa, index=False),
            f"<p>{e(lines[-1].strip())}</p>",
            ('<p class="note">The host\'s counters and savings above are those of the '
            'per-node KSM. Also in <a href="numa.csv">numa.csv</a>.</p>')]


def _near_duplicates_section(result: Analysis, images: dict[str, bytes]) -> list[str]:
    """With ``--near-duplicates``: the method, the groups and the chart of their bytes."""
    from ..whatif.near_duplicates import METHOD

    if not len(result.columns["near_duplicate_histogram"]):
        return []  # not asked
    e = html.escape
    groups = result.near_duplicates
    parts = ['<h2 id="near-duplicates">Near-duplicates: pages equal but for a few bytes</h2>',
             (f'<p class="note">Found as {e(METHOD)}. Byte offsets and counts only, ranges '
             "inclusive; <code>extra_saved</code>: what KSM would save beyond today were each "
             'group one content. Also in <a href="near_duplicates.csv">near_duplicates.csv'
             '</a> and <a href="near_duplicate_histogram.csv">near_duplicate_histogram.csv</a>'
             ".</p>")]
    if len(groups):
        parts.append(_html_table(groups, index=False))
    else:
        parts.append("<p>None found.</p>")
    parts.append(_figure(NEAR_CHART, NEAR_CAPTION, images))
    return parts


def _plan_section(plan: Plan, images: dict[str, bytes]) -> list[str]:
    """Hosts needed with and without sharing-aware placement, and each host's inputs."""
    e = html.escape
    parts = ['<h2 id="plan">Capacity plan</h2>',
             (f'<p class="note">Hosts of {e(human_bytes(plan.host_memory))} '
             f"({e(human_bytes(plan.capacity))} for inputs). Each host's memory after KSM is "
             "what a scan of its inputs prints (rmap_items included); "
             'see docs/planning.md.</p>'),
             _html_table(plan.summary, index=False)]
    for name, caption in PLAN_CHARTS.items():
        if name in images:
            data = base64.b64encode(images[name]).decode("ascii")
            parts.append(f'<figure id="chart-{name}"><img src="data:image/png;base64,{data}" '
                         f'alt="{e(caption)}"><figcaption>{e(caption)} ({name}.png)'
                         "</figcaption></figure>")
    hosts, cut = _first_rows(plan.hosts, "host", "plan_hosts.csv", by="method")
    parts += [*([cut] if cut else []), _html_table(hosts, index=False)]
    if len(plan.marginal):
        marginal, cut = _first_rows(plan.marginal, "input", "plan_marginal.csv", by="method")
        parts += [('<h3 id="table-plan_marginal">Marginal memory: what each input adds to its '
                   "host (the same is freed if it moves away)</h3>"),
                  *([cut] if cut else []), _html_table(marginal, index=False)]
    if plan.fits is not None:
        expected, cautious, hopeful = plan.fits
        fit = "input like these fits" if expected == 1 else "inputs like these fit"
        parts.append(f"<p>{expected:,} {fit} in one host ({cautious:,} to "
                     f"{hopeful:,} by the band; beyond the samples it is a model).</p>")
    if len(plan.overcommit):
        from ..planning.overcommit import advice

        ratios, cut = _first_rows(plan.overcommit, "row", "plan_overcommit.csv")
        parts += ['<h3 id="overcommit">Overcommit ratio</h3>',
                  ("<p>The guests' memory a host holds over its memory for guests, per "
                   "workload family and host size, with the band of the VMs-per-host "
                   "projection; see docs/planning.md.</p>"), *([cut] if cut else []),
                  _html_table(ratios, index=False),
                  f"<p><strong>{e(advice(plan))}</strong></p>"]
    parts += [f'<p class="warn">Warning: {e(w)}</p>' for w in plan.warnings
              if w not in plan.analysis.warnings]  # those are shown with the analysis
    return parts


def _tune_section(tune: Tune, images: dict[str, bytes]) -> list[str]:
    """The prefix-length sweep: its chart, its tables and the recommendation."""
    e = html.escape
    parts = ['<h2 id="tune">Prefix length</h2>',
             f"<p>Recommended: {e(tune.reason)}.</p>",
             (f'<p class="note">Times: {e(tune.method)}. See docs/model.md, "The prefix '
             'length".</p>'),
             _figure(TUNE_CHART[0], TUNE_CHART[1], images)]
    for name, title in (("prefixes", "Stage 1 and 2 at each prefix length"),
                        ("collisions", ("Trusting a full-page hash: the birthday bound "
                                       "n(n-1)/2 / 2^bits")),
                        ("comparing", ("Stage 2 comparing bytes, and trusting the 64-bit "
                                      "full-page hash"))):
        parts += [f'<h3 id="table-tune_{name}">{e(title)}</h3>',
                  _html_table(tune.tables()[name], index=False),
                  f'<p class="note">Also in <a href="tune_{name}.csv">tune_{name}.csv</a>.</p>']
    return parts


def _short_hashes(top: pd.DataFrame) -> pd.DataFrame:
    """The table with each SHA-256 cut to 16 hex digits (the CSV keeps them whole)."""
    if "content_hash" not in top.columns:
        return top
    return top.assign(content_hash=top["content_hash"].str[:16])


def _option(value: Any) -> str:
    if isinstance(value, list | tuple):
        return " ".join(map(str, value))
    return str(value)
