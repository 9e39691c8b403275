"""matplotlib figures of an :class:`~ksm_analyze.analysis.Analysis`, for reports and notebooks.

Every function returns a :class:`matplotlib.figure.Figure` drawn on an Agg canvas, never
touching pyplot's global state, so it works without a display, in threads and in Jupyter
(a notebook cell that ends with the figure shows it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator

from ..sharing import ADDRESS_KINDS
from ..units import human_bytes

if TYPE_CHECKING:
    from ..planning import Plan
    from ..result import Analysis

__all__ = ["plot_address_map", "plot_histogram", "plot_hosts", "plot_pairwise", "plot_projection",
           "plot_savings"]

_MINUS = "\N{MINUS SIGN}"
_EN_DASH = "\N{EN DASH}"
_SCENARIOS = {
    "with_zero_pages": "with zero pages (each is host memory)",
    "without_zero_pages": "without zero pages (never touched)",
}
_STEPS = (
    ("memory_before", "memory\nbefore"),
    ("zero_pages", "zero pages\nmerged"),
    ("sharing_within_inputs", "sharing\nwithin inputs"),
    ("sharing_across_inputs", "sharing\nacross inputs"),
    ("memory_after", "memory\nafter KSM"),
)
_KIND_STYLE = {
    "zero_pages": ("zero", "#c7c7c7"),
    "unique_pages": ("unique", "#4c78a8"),
    "duplicate_within_pages": ("duplicated within this input", "#f58518"),
    "duplicate_across_pages": ("duplicated across inputs", "#d62728"),
    "ineligible_pages": ("KSM does not scan (see exclusions)", "#9467bd"),
    "not_stored_pages": ("not in the dump", "#ffffff"),
}


MAX_INCHES = 20.0
"""Largest side of the pairwise heatmap (2,000 pixels at 100 dpi)."""
ANNOTATED_INPUTS = 12
"""Inputs up to which each heatmap cell gets its numbers written in it."""
LABELLED_INPUTS = 60
"""Inputs up to which every heatmap row and column is labelled (beyond: every k-th)."""
STRIPS = 24
"""Inputs drawn in the address map chart."""


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _unit(largest: float) -> tuple[float, str]:
    """A binary byte unit that keeps ``largest`` readable: (divisor, name)."""
    for power, name in ((4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        if largest >= 1024**power:
            return float(1024**power), name
    return 1.0, "B"


def plot_savings(result: Analysis) -> Figure:
    """Waterfall per scenario: memory before, minus each source of savings, memory after."""
    sav = result.savings
    scen = [s for s in _SCENARIOS if f"{s}_bytes" in sav.columns]
    fig = _figure(6.0 * len(scen), 5.0)
    axes = fig.subplots(1, len(scen), squeeze=False)[0]
    for ax, s in zip(axes, scen, strict=True):
        # Each panel its own scale: the untouched scenario is often a fifth of the other.
        largest = max(float(sav.at["memory_before", f"{s}_bytes"]), 1.0)
        div, unit = _unit(largest)
        level = 0.0
        for i, (item, _label) in enumerate(_STEPS):
            nbytes = float(sav.at[item, f"{s}_bytes"])
            value = nbytes / div
            pct = float(sav.at[item, f"{s}_percent"])
            if item in ("memory_before", "memory_after"):
                bottom, height, color = 0.0, value, "#4c78a8" if i == 0 else "#2ca02c"
                text = f"{human_bytes(nbytes)}\n({pct:.1f}%)"
                level = value
            else:
                bottom, height, color = level - value, value, "#f58518"
                text = f"{_MINUS if nbytes else ''}{human_bytes(nbytes)}\n({pct:.1f}%)"
                level -= value
            ax.bar(i, height, bottom=bottom, color=color, edgecolor="black", linewidth=0.5)
            ax.annotate(text, (i, bottom + height), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=9)
        ax.set_xticks(range(len(_STEPS)), [label for _, label in _STEPS], fontsize=9)
        ax.set_ylabel(f"host memory ({unit})")
        ax.set_ylim(0, largest / div * 1.22)
        ax.set_title(_SCENARIOS[s], fontsize=11)
        ax.grid(axis="y", alpha=0.3)
    ksm = result.ksm
    fig.suptitle(
        "Memory before and after KSM, all inputs on one host "
        f"(max_page_sharing={ksm.max_page_sharing}, "
        f"use_zero_pages={int(ksm.use_zero_pages)})",
        fontsize=12,
    )
    return fig


def _bucket_label(copies: int) -> str:
    return "1" if copies == 1 else f"{copies:,}{_EN_DASH}{2 * copies - 1:,}"


def plot_histogram(result: Analysis) -> Figure:
    """Pages held by contents seen 1, 2-3, 4-7, ... times, before and after merging."""
    hist = result.histogram
    fig = _figure(max(6.0, 1.1 * len(hist) + 3), 5.0)
    ax = fig.subplots()
    x = np.arange(len(hist))
    before = hist["pages_referenced"].to_numpy()
    after = hist["pages_after_merging"].to_numpy()
    w = 0.4
    for offset, values, label, color in ((-w / 2, before, "pages before merging", "#4c78a8"),
                                         (w / 2, after, "pages after merging", "#2ca02c")):
        bars = ax.bar(x + offset, values, w, label=label, color=color)
        ax.bar_label(bars, labels=[f"{int(v):,}" for v in values], fontsize=9, padding=2)
    positive = np.concatenate([before, after])
    positive = positive[positive > 0]
    if len(positive) and positive.max() / positive.min() > 50:
        ax.set_yscale("log")
        ax.set_ylim(0.5, positive.max() * 3)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        scale = " (log scale)"
    else:
        ax.set_ylim(0, (positive.max() if len(positive) else 1) * 1.15)
        scale = ""
    ax.set_xticks(x, [f"{_bucket_label(int(c))}\n{int(n):,} content{'s' if n != 1 else ''}"
                      for c, n in zip(hist["copies"], hist["contents"], strict=True)])
    ax.set_xlabel("copies of a content (bucket), and how many contents fall in it")
    ps = result.ksm.page_size
    ax.set_ylabel(f"pages of {ps // 1024} KiB{scale}")
    ax.set_title("Sharing-degree histogram: pages by number of copies (with zero pages)")
    ax.legend(loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_pairwise(result: Analysis) -> Figure:
    """Heatmap: non-zero pages of the row input whose content is also in the column input."""
    pw = result.pairwise
    names = result.names
    n = len(names)
    frac = np.full((n, n), np.nan)
    pages = np.zeros((n, n), np.int64)
    extra = np.zeros((n, n), np.int64)
    pos = {name: i for i, name in enumerate(names)}
    for r in pw.itertuples():
        a, b = pos[r.input_a], pos[r.input_b]
        frac[a, b] = r.a_fraction_in_b
        pages[a, b] = r.a_pages_in_b
        extra[a, b] = r.extra_saved_bytes
    # At most 20 inches a side: a hundred inputs must not need tens of thousands of pixels.
    side = min(MAX_INCHES, max(5.0, 1.6 * n + 2.5))
    fig = _figure(side + 1.5, side)
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(frac) * 100, vmin=0, vmax=100, cmap="Blues")
    ax.set_facecolor("#eeeeee")
    fontsize = max(6, 11 - n)
    for a in range(n if n <= ANNOTATED_INPUTS else 0):  # beyond, cells are too small to read
        for b in range(n):
            if a == b:
                ax.text(b, a, "—", ha="center", va="center", fontsize=fontsize)
                continue
            label = (f"{pages[a, b]:,} pages\n{frac[a, b] * 100:.1f}%\n"
                     f"{human_bytes(extra[a, b])} more saved")
            color = "white" if frac[a, b] > 0.6 else "black"
            ax.text(b, a, label, ha="center", va="center", fontsize=fontsize, color=color)
    step = -(-n // LABELLED_INPUTS)  # label every input, or every step-th of many
    ax.set_xticks(range(0, n, step), names[::step], rotation=30, ha="right",
                  fontsize=min(10, max(4, 300 // n)))
    ax.set_yticks(range(0, n, step), names[::step], fontsize=min(10, max(4, 300 // n)))
    ax.set_xlabel("also present in (input B)")
    ax.set_ylabel("non-zero pages of (input A)")
    ax.set_title("Pairwise sharing: pages of A whose content is also in B\n"
                 "(and the extra memory saved if only A and B shared a host)", fontsize=11)
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label("pages of A also in B (% of A's non-zero pages)")
    return fig


def plot_address_map(result: Analysis) -> Figure:
    """A strip per input: the kinds of page in each bin of its address space, in percent."""
    amap = result.address_map
    every = list(dict.fromkeys(amap["input"])) if len(amap) else []
    inputs = every[:STRIPS]  # a strip per input up to a readable page; the CSV has them all
    fig = _figure(11.0, 1.3 + 1.9 * max(1, len(inputs)))
    axes = fig.subplots(max(1, len(inputs)), 1, squeeze=False)[:, 0]
    for ax, name in zip(axes, inputs, strict=False):
        rows = amap[amap["input"] == name]
        # Bin i spans [i - 0.5, i + 0.5); one stepped band per kind (256 bars each would
        # take seconds to draw).
        edges = np.arange(len(rows) + 1) - 0.5
        total = np.maximum(rows["pages"].to_numpy(), 1)
        bottom = np.zeros(len(rows) + 1)
        for kind in ADDRESS_KINDS:
            share = rows[kind].to_numpy() / total * 100
            top = bottom + np.append(share, share[-1:])
            label, color = _KIND_STYLE[kind]
            ax.fill_between(edges, bottom, top, step="post", color=color, linewidth=0,
                            label=label)
            bottom = top
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.set_ylim(0, 100)
        ax.set_yticks([0, 50, 100])
        ax.set_ylabel("% of bin")
        pages = int(rows["pages"].sum())
        ax.set_title(f"{name}: {pages:,} pages in {len(rows)} bins of "
                     f"{pages / max(len(rows), 1):,.0f} pages", fontsize=10, loc="left")
        ticks = MaxNLocator(nbins=7, integer=True).tick_values(0, len(rows) - 1)
        ticks = [int(t) for t in ticks if 0 <= t < len(rows)]
        first = rows["first_address"].to_numpy()
        ax.set_xticks(ticks, [f"{int(first[t]):#x}" for t in ticks], fontsize=8)
        ax.set_xlabel(f"page address ({'physical' if _physical(result, name) else 'virtual'}; "
                      "bins follow the pages the dump describes)", fontsize=9)
        ax.set_facecolor("white")
    handles = [Patch(facecolor=c, edgecolor="#888888", label=label)
               for label, c in _KIND_STYLE.values()]
    fig.legend(handles=handles, loc="outside lower center", ncols=6, fontsize=9)
    more = (f" (the first {len(inputs)} of {len(every)} inputs; address_map.csv has all)"
            if len(inputs) < len(every) else "")
    fig.suptitle(f"Where the pages lie in each input's address space{more}", fontsize=12)
    return fig


def _physical(result: Analysis, name: str) -> bool:
    spaces = dict(zip(result.names, result.per_input["address_space"], strict=True))
    return spaces.get(name) != "virtual"


def plot_hosts(plan: Plan) -> Figure:
    """Stacked bars per host, one panel per method: private pages, KSM pages, rmap_items,
    free memory; the marker is memory before KSM (the copy-on-write worst case)."""
    hosts = plan.hosts
    methods = list(dict.fromkeys(hosts["method"]))
    width = min(MAX_INCHES, max(9.0, 3.0 + 0.45 * len(hosts)))
    fig = _figure(width, 5.5)
    axes = fig.subplots(1, len(methods), squeeze=False, sharey=True,
                        width_ratios=[max(1, (hosts["method"] == m).sum()) for m in methods])[0]
    div, unit = _unit(max(plan.host_memory, 1))
    parts = (("private_bytes", "private pages", "#4c78a8"),
             ("shared_bytes", "KSM pages (shared)", "#f58518"),
             ("rmap_bytes", "rmap_items", "#e45756"),
             ("free_bytes", "free", "#e8e8e8"))
    for ax, method in zip(axes, methods, strict=True):
        rows = hosts[hosts["method"] == method]
        x = np.arange(len(rows))
        bottom = np.full(len(rows), plan.host_memory - plan.capacity, float) / div
        if plan.capacity < plan.host_memory:
            ax.bar(x, bottom, color="#bbbbbb", label="reserve")
        for column, label, color in parts:
            values = np.maximum(rows[column].to_numpy(float), 0) / div
            ax.bar(x, values, bottom=bottom, color=color, label=label)
            bottom = bottom + values
        ax.scatter(x, rows["memory_before_bytes"].to_numpy(float) / div, marker="_", s=300,
                   color="black", zorder=3, label="memory before KSM (worst case)")
        ax.axhline(plan.host_memory / div, color="black", linewidth=0.8)
        ax.set_xticks(x, [str(h) for h in rows["host"]], fontsize=8)
        ax.set_xlabel("host")
        ax.set_title(f"{method.replace('_', ' ')}: {len(rows)} host(s)", fontsize=11)
    axes[0].set_ylabel(f"host memory ({unit})")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=9)
    fig.suptitle(f"Hosts of {human_bytes(plan.host_memory)}: placement with and without "
                 "sharing-awareness", fontsize=12)
    return fig


def plot_projection(plan: Plan) -> Figure:
    """Host memory against the number of inputs like these, with and without KSM."""
    proj = plan.projection
    fig = _figure(8.0, 5.0)
    ax = fig.subplots()
    if len(proj):
        vms = proj["input_count"].to_numpy()
        div, unit = _unit(float(proj[["memory_before_bytes", "memory_after_high_bytes"]]
                                .to_numpy().max()))
        measured = proj["measured"].to_numpy(bool)
        ax.plot(vms, proj["memory_before_bytes"] / div, color="#9467bd", marker="o",
                label="without KSM")
        ax.plot(vms, proj["memory_after_bytes"] / div, color="#2ca02c", marker="o",
                label="with KSM (mean over random orders)")
        ax.fill_between(vms, proj["memory_after_low_bytes"] / div,
                        proj["memory_after_high_bytes"] / div, color="#2ca02c", alpha=0.2,
                        label="10th-90th percentile band")
        if (~measured).any():
            ax.axvspan(vms[~measured].min() - 0.5, vms.max() + 0.5, color="#eeeeee",
                       zorder=0, label="beyond the samples: a model")
        ax.axhline(plan.capacity / div, color="black", linewidth=0.8, linestyle="--",
                   label=f"host capacity ({human_bytes(plan.capacity)})")
        ax.set_ylabel(f"host memory ({unit})")
        ax.legend(fontsize=9)
    ax.set_xlabel("inputs like these on one host")
    title = "Host memory for more inputs like these"
    if plan.fits is not None:
        title += f": {plan.fits[0]:,} fit in {human_bytes(plan.capacity)}"
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    return fig
