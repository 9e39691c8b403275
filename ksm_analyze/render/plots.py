"""matplotlib figures of an :class:`~ksm_analyze.pipeline.Analysis`, for reports and notebooks.

Every function returns a :class:`matplotlib.figure.Figure` drawn on an Agg canvas, never
touching pyplot's global state, so it works without a display, in threads and in Jupyter
(a notebook cell that ends with the figure shows it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator
from matplotlib.transforms import Affine2D, Bbox, TransformedBbox

from ..errors import printable
from ..sharing import ADDRESS_KINDS
from ..sharing import clusters as _clusters
from ..units import counted, human_bytes

if TYPE_CHECKING:
    import pandas as pd

    from ..analysis import Analysis
    from ..planning.plan import Plan
    from ..whatif.tune import Tune

__all__ = ["plot_address_map", "plot_histogram", "plot_hosts", "plot_ksmd_settings",
           "plot_near_duplicates", "plot_pairwise", "plot_projection", "plot_savings", "plot_timeline",
           "plot_tune"]

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
    ("rmap_overhead", "rmap_item\noverhead"),
    ("memory_after", "memory\nafter KSM"),
)
_COMPRESSED_STEP = ("compressed_zram", "compressed\n(zram)")
"""The waterfall's last bar with ``--compress``: what KSM leaves, as zram stores it."""
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
"""Inputs up to which every heatmap row and column is labelled (beyond: each cluster, or
every k-th cluster)."""
SHOWN_INPUTS = 1000
"""Most inputs in the pairwise heatmap: the largest clusters up to this many (whole
clusters; the CSV has every pair)."""
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
    """Waterfall per scenario: memory before, minus each source of savings, plus the
    rmap_items' metadata, memory after KSM (what the host needs)."""
    sav = result.savings
    scen = [s for s in _SCENARIOS if f"{s}_bytes" in sav.columns]
    fig = _figure(7.0 * len(scen), 5.0)
    axes = fig.subplots(1, len(scen), squeeze=False)[0]
    for ax, s in zip(axes, scen, strict=True):
        # Each panel its own scale: the untouched scenario is often a fifth of the other.
        largest = max(float(sav.at["memory_before", f"{s}_bytes"]), 1.0)
        div, unit = _unit(largest)
        level = 0.0
        steps = [*_STEPS, *([_COMPRESSED_STEP] if _COMPRESSED_STEP[0] in sav.index else [])]
        for i, (item, _label) in enumerate(steps):
            nbytes = float(sav.at[item, f"{s}_bytes"])
            value = nbytes / div
            pct = float(sav.at[item, f"{s}_percent"])
            if item == _COMPRESSED_STEP[0]:  # --compress: what zram needs of what is left
                bottom, height, color = 0.0, value, "#17becf"
                text = f"{human_bytes(nbytes)}\n({pct:.1f}%)"
            elif item in ("memory_before", "memory_after"):
                bottom, height, color = 0.0, value, "#4c78a8" if i == 0 else "#2ca02c"
                text = f"{human_bytes(nbytes)}\n({pct:.1f}%)"
                level = value
            elif item == "rmap_overhead":  # metadata KSM adds back
                bottom, height, color = level, value, "#9467bd"
                text = f"+{human_bytes(nbytes)}\n({pct:.1f}%)"
                level += value
            else:
                bottom, height, color = level - value, value, "#f58518"
                text = f"{_MINUS if nbytes else ''}{human_bytes(nbytes)}\n({pct:.1f}%)"
                level -= value
            ax.bar(i, height, bottom=bottom, color=color, edgecolor="black", linewidth=0.5)
            ax.annotate(text, (i, bottom + height), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=9)
        ax.set_xticks(range(len(steps)), [label for _, label in steps], fontsize=9)
        ax.set_ylabel(f"host memory ({unit})")
        ax.set_ylim(0, largest / div * 1.22)
        ax.set_title(_SCENARIOS[s], fontsize=11)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Memory before and after KSM, all inputs on one host ({_policy_words(result)})",
                 fontsize=12)
    return fig


def _bucket_label(copies: int) -> str:
    return "1" if copies == 1 else f"{copies:,}{_EN_DASH}{2 * copies - 1:,}"


def plot_histogram(result: Analysis) -> Figure:
    """Pages held by contents seen 1, 2-3, 4-7, ... times, before and after merging."""
    hist = result.histogram
    fig = _figure(max(7.0, 1.1 * len(hist) + 3), 5.0)
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
    ax.set_title("Sharing-degree histogram: pages by number of copies (with zero pages)\n"
                 f"({_policy_words(result)})", fontsize=10)
    ax.legend(loc="best")
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_near_duplicates(result: Analysis) -> Figure:
    """Near-duplicates (``--near-duplicates``): the groups' pages by bytes differing from
    their group's representative, and by where the first differing byte lies."""
    hist = result.columns["near_duplicate_histogram"]
    fig = _figure(12.0, 4.5)
    axes = fig.subplots(1, 2)
    kinds = (("differing_bytes", "bytes differing from the group's representative", "#4c78a8"),
             ("first_differing_offset", "offset of the first differing byte", "#f58518"))
    for ax, (kind, label, color) in zip(axes, kinds, strict=True):
        rows = [r for r in hist.rows() if r["histogram"] == kind]
        if kind == "differing_bytes":  # up to the largest bucket used (a page at most)
            used = [i for i, r in enumerate(rows) if r["pages"]]
            rows = rows[:max(used, default=0) + 1]
        x = np.arange(len(rows))
        pages = [int(r["pages"]) for r in rows]
        bars = ax.bar(x, pages, 0.7, color=color)
        ax.bar_label(bars, labels=[f"{v:,}" if v else "" for v in pages], fontsize=8,
                     padding=2)
        ax.set_xticks(x, [f"{r['low']:,}" if r["low"] == r["high"] else
                          f"{r['low']:,}{_EN_DASH}{r['high']:,}" for r in rows],
                      rotation=45 if len(rows) > 6 else 0, fontsize=8, ha="right"
                      if len(rows) > 6 else "center")
        ax.set_xlabel(label)
        ax.set_ylabel("pages")
        ax.set_ylim(0, max(pages, default=0) * 1.15 + 1)
        ax.grid(axis="y", alpha=0.3)
    groups = len(result.columns["near_duplicates"])
    fig.suptitle(f"Near-duplicates: pages of the {counted(groups, 'largest group')} "
                 "(representatives not counted)", fontsize=10)
    return fig


def plot_pairwise(result: Analysis) -> Figure:
    """Heatmap: non-zero pages of the row input whose content is also in the column input.

    Up to :data:`ANNOTATED_INPUTS` inputs, in their order, each cell with its numbers. More
    are ordered by cluster (inputs that share most kept together, :func:`_clusters`), each
    cluster outlined; beyond :data:`LABELLED_INPUTS`, a cluster is labelled by its first
    input and its size, and the largest clusters up to :data:`SHOWN_INPUTS` inputs are drawn.
    """
    pw = result.columns["pairwise"]
    names = result.names
    n = len(names)
    pos = {name: i for i, name in enumerate(names)}
    a = np.array([pos[x] for x in pw["input_a"]], np.int64)
    b = np.array([pos[x] for x in pw["input_b"]], np.int64)
    fraction = np.asarray(pw["a_fraction_in_b"], np.float64)
    shared = np.asarray(pw["a_pages_in_b"], np.float64)
    clusters = [list(range(n))] if n <= ANNOTATED_INPUTS else _clusters(n, a, b, shared)
    shown: list[list[int]] = []
    kept: list[int] = []
    total = 0
    for members in clusters:  # the largest first
        if total + len(members) > SHOWN_INPUTS and shown:
            break
        shown.append(members)
        kept += members
        total += len(members)
    m = len(kept)
    at = np.full(n, -1, np.int64)
    at[kept] = np.arange(m)
    inside = (at[a] >= 0) & (at[b] >= 0)
    ra, rb = at[a[inside]], at[b[inside]]
    frac = np.zeros((m, m))  # a pair not in the table shares nothing (or was cut)
    frac[ra, rb] = fraction[inside]
    np.fill_diagonal(frac, np.nan)
    pages = np.zeros((m, m), np.int64)
    pages[ra, rb] = np.asarray(pw["a_pages_in_b"], np.int64)[inside]
    extra = np.zeros((m, m), np.int64)
    extra[ra, rb] = np.asarray(pw["extra_saved_bytes"], np.int64)[inside]
    # At most 20 inches a side: a hundred inputs must not need tens of thousands of pixels.
    side = min(MAX_INCHES, max(5.0, 1.6 * m + 2.5))
    fig = _figure(side + 1.5, side)
    ax = fig.subplots()
    # Coloured here, m x m x 4 bytes, and sampled to the pixels in bytes (_CellImage): imshow
    # of the float matrix resamples it in float64 RGBA at the figure's pixels (hundreds of
    # MiB for a thousand inputs). The diagonal (NaN) stays transparent, on the grey face, as
    # a masked cell would; the pixels are imshow's.
    norm, cmap = Normalize(0, 100), colormaps["Blues"]
    cells = _CellImage(ax, interpolation="nearest", origin="upper")
    cells.set_data(cmap(norm(frac * 100), bytes=True))
    cells.set_clip_path(ax.patch)
    cells.set_extent(cells.get_extent())
    ax.set_aspect("equal")
    ax.add_image(cells)
    image = ScalarMappable(norm, cmap)  # the colour bar's scale
    ax.set_facecolor("#eeeeee")
    fontsize = max(6, 11 - m)
    for i in range(m if m <= ANNOTATED_INPUTS else 0):  # beyond, cells are too small to read
        for j in range(m):
            if i == j:
                ax.text(j, i, "—", ha="center", va="center", fontsize=fontsize)
                continue
            label = (f"{pages[i, j]:,} pages\n{frac[i, j] * 100:.1f}%\n"
                     f"{human_bytes(extra[i, j])} more saved")
            color = "white" if frac[i, j] > 0.6 else "black"
            ax.text(j, i, label, ha="center", va="center", fontsize=fontsize, color=color)
    labels = [printable(names[i]) for i in kept]  # from files: no control characters
    if m <= LABELLED_INPUTS:
        ticks = list(range(m))
    else:  # one label per cluster, at its middle (every step-th of many clusters)
        starts = np.cumsum([0] + [len(c) for c in shown])
        step = -(-len(shown) // LABELLED_INPUTS)
        ticks = [(starts[k] + starts[k + 1] - 1) / 2 for k in range(0, len(shown), step)]
        labels = [printable(names[c[0]]) + (f" +{len(c) - 1:,}" if len(c) > 1 else "")
                  for c in shown[::step]]
    size = min(10, max(5, 300 // max(len(ticks), 1)))
    ax.set_xticks(ticks, labels, rotation=30 if m <= ANNOTATED_INPUTS else 90,
                  ha="right" if m <= ANNOTATED_INPUTS else "center", fontsize=size)
    ax.set_yticks(ticks, labels, fontsize=size)
    if len(clusters) > 1 and m > ANNOTATED_INPUTS:
        edge = 0
        for members in shown:  # each cluster of two or more outlined on the diagonal
            if len(members) > 1:
                ax.add_patch(Rectangle((edge - 0.5, edge - 0.5), len(members), len(members),
                                       fill=False, edgecolor="#d62728",
                                       linewidth=1.2 if m <= LABELLED_INPUTS else 0.8))
            edge += len(members)
    many = m > ANNOTATED_INPUTS
    ax.set_xlabel("also present in (input B)" + (", by cluster" if many else ""))
    ax.set_ylabel("non-zero pages of (input A)" + (", by cluster" if many else ""))
    notes = []
    if many:
        big = sum(len(c) > 1 for c in clusters)
        lone = len(clusters) - big
        notes.append(f"{counted(n, 'input')} in {counted(big, 'cluster')} of inputs that share "
                     "most (outlined)" + (f" and {counted(lone, 'lone input')}" if lone else ""))
    if m < n:
        notes.append(f"the largest clusters shown: {m:,} of {n:,} inputs (pairwise.csv has all)")
    top = result.options.pairs_top
    if top and len(a) and np.bincount(a).max() >= top:  # some row may have been cut
        notes.append(f"at most {top:,} inputs per row (--pairs-top): a blank cell shares "
                     "nothing or less")
    ax.set_title("Pairwise sharing: pages of A whose content is also in B\n"
                 + ("" if many else "(and the extra memory saved if only A and B shared a "
                    "host)\n")
                 + "".join(f"{note}\n" for note in notes)
                 + f"({_policy_words(result)})", fontsize=11)
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label("pages of A also in B (% of A's non-zero pages)")
    return fig


class _CellImage(AxesImage):
    """An RGBA image of bytes drawn nearest-neighbour by picking, for each pixel, the cell
    its centre falls in: the pixels imshow draws with ``interpolation="nearest"``, without its
    float32 RGBA copies at the figure's size (16 bytes a pixel, several times over)."""

    def make_image(self, renderer: Any, magnification: float = 1.0, unsampled: bool = False
                   ) -> tuple[np.ndarray, float, float, Affine2D]:
        to_pixels = self.get_transform() + Affine2D().scale(magnification)
        x1, x2, y1, y2 = self.get_extent()
        box = TransformedBbox(Bbox([[x1, y1], [x2, y2]]), self.get_transform())
        cut = Bbox.intersection(box, self.axes.bbox)  # clipped to the axes, as imshow is
        e = np.asarray(cut.extents if cut else (0, 0, 0, 0)) * magnification
        x0, y0 = np.floor(e[0] + 0.5), np.ceil(e[1] - 0.5 - 1e-8)  # matplotlib's rounding
        w, h = int(np.floor(e[2] + 0.5 + 1e-8) - x0), int(np.ceil(e[3] - 0.5) - y0)
        if w <= 0 or h <= 0:  # nothing to draw: matplotlib's own way
            return super().make_image(renderer, magnification, unsampled)
        back = to_pixels.inverted()  # pixel centres to data: cell i spans i - 0.5 to i + 0.5
        xs = back.transform(np.column_stack([x0 + np.arange(w) + 0.5, np.full(w, y0)]))[:, 0]
        ys = back.transform(np.column_stack([np.full(h, x0), y0 + np.arange(h) + 0.5]))[:, 1]
        data = np.asarray(self.get_array())
        cols = np.clip(np.floor(xs + 0.5).astype(np.intp), 0, data.shape[1] - 1)
        rows = np.clip(np.floor(ys + 0.5).astype(np.intp), 0, data.shape[0] - 1)
        return data[rows][:, cols], x0 / magnification, y0 / magnification, Affine2D()


def plot_address_map(result: Analysis) -> Figure:
    """A strip per input: the kinds of page in each bin of its address space, in percent."""
    amap = result.address_map
    by_input = amap["input"].to_numpy(object)  # once: comparing Arrow strings is slow
    every = list(dict.fromkeys(by_input.tolist()))
    inputs = every[:STRIPS]  # a strip per input up to a readable page; the CSV has them all
    spaces = dict(zip(result.names, result.per_input["address_space"], strict=True))
    fig = _figure(11.0, 1.3 + 1.9 * max(1, len(inputs)))
    axes = fig.subplots(max(1, len(inputs)), 1, squeeze=False)[:, 0]
    for ax, name in zip(axes, inputs, strict=False):
        rows = amap[by_input == name]
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
        per_bin = pages / max(len(rows), 1)
        size = counted(round(per_bin), "page")
        ax.set_title(f"{printable(name)}: {counted(pages, 'page')} in {counted(len(rows), 'bin')} of "
                     f"{size if per_bin == round(per_bin) else 'about ' + size}", fontsize=10,
                     loc="left")
        ticks = MaxNLocator(nbins=7, integer=True).tick_values(0, len(rows) - 1)
        ticks = [int(t) for t in ticks if 0 <= t < len(rows)]
        first = rows["first_address"].to_numpy()
        ax.set_xticks(ticks, [f"{int(first[t]):#x}" for t in ticks], fontsize=8)
        space = "virtual" if spaces.get(name) == "virtual" else "physical"
        ax.set_xlabel(f"page address ({space}; "
                      "bins follow the pages the dump describes)", fontsize=9)
        ax.set_facecolor("white")
    handles = [Patch(facecolor=c, edgecolor="#888888", label=label)
               for label, c in _KIND_STYLE.values()]
    fig.legend(handles=handles, loc="outside lower center", ncols=6, fontsize=9)
    more = (f" (the first {len(inputs)} of {len(every):,} inputs; address_map.csv has all)"
            if len(inputs) < len(every) else "")
    fig.suptitle(f"Where the pages lie in each input's address space{more}", fontsize=12)
    return fig


_TIMELINE_STYLE = (
    ("pages_shared", "#4c78a8", "-"),
    ("pages_sharing", "#2ca02c", "-"),
    ("pages_unshared", "#9467bd", "-"),
    ("pages_volatile", "#d62728", "-"),
)
_MARKS = (("time_to_50_percent_seconds", "50%", ":"), ("time_to_90_percent_seconds", "90%", "--"),
          ("steady_state_seconds", "steady", "-"))


def _convergence(result: Analysis) -> dict[str, object]:
    return result.columns["convergence"].by_key("value")


def _ksmd_words(result: Analysis, *, pace: bool = True, lines: bool = False) -> str:
    """The kernel rules and ksmd settings a time chart assumes, for its title."""
    c = _convergence(result)
    words = [f"rules of {c['kernel_rules']}", f"smart_scan={int(bool(c['smart_scan']))}"]
    if pace:
        words.append("the scan-time advisor" if c["advisor_mode"] == "scan-time"
                     else f"pages_to_scan={c['pages_to_scan']}")
        words.append(f"sleep_millisecs={c['sleep_millisecs']}")
    ksm = result.ksm
    words += [f"max_page_sharing={ksm.max_page_sharing}",
              f"use_zero_pages={int(ksm.use_zero_pages)}"]
    if lines:  # the kernel on one line, the knobs on the next
        return words[0] + ";\n" + ", ".join(words[1:])
    return ", ".join(words)


def _seconds_label(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def plot_timeline(result: Analysis) -> Figure:
    """ksmd replayed: the KSM counters and general_profit against time, full scan by full
    scan, with the times to 50% and 90% of the steady general_profit and to steady state."""
    tl = result.timeline
    c = _convergence(result)
    fig = _figure(11.0, 5.5)
    ax = fig.subplots()
    if len(tl):
        # Each full scan's counters hold from its end to the next one's: steps, from t=0.
        t = np.concatenate([[0.0], tl["time_seconds"].to_numpy(float)])
        for column, color, style in _TIMELINE_STYLE:
            values = np.concatenate([[0], tl[column].to_numpy()])
            ax.step(t, values, where="post", color=color, linestyle=style, label=column)
        ps = result.ksm.page_size
        ax.set_ylabel(f"pages of {ps // 1024} KiB")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        profit = np.concatenate([[0], tl["general_profit"].to_numpy(float)])
        right = ax.twinx()
        right.step(t, profit, where="post", color="black", linewidth=2, label="general_profit")
        # Zero on both axes at one height (general_profit starts below zero: rmap_items).
        low, high = min(float(profit.min()), 0.0) * 1.1, max(float(profit.max()), 1.0) * 1.1
        right.set_ylim(low, high)
        top = max(ax.get_ylim()[1], 1.0)
        ax.set_ylim(top * low / high, top)
        right.yaxis.set_major_formatter(FuncFormatter(lambda v, _: (
            _MINUS + human_bytes(-v) if v < 0 else human_bytes(v))))
        right.set_ylabel("general_profit")
        for key, label, style in _MARKS:
            when = c.get(key)
            if isinstance(when, int | float):
                ax.axvline(float(when), color="#555555", linestyle=style, linewidth=1,
                           label=f"{label} after {_seconds_label(float(when))}")
        ax.set_xlim(0, float(t.max()) or 1.0)
        handles, names = ax.get_legend_handles_labels()
        more, more_names = right.get_legend_handles_labels()
        fig.legend(more + handles, more_names + names, loc="outside right upper", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no page for ksmd to scan", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("seconds since ksmd started (each step: one full scan)")
    ax.grid(alpha=0.3)
    fig.suptitle("KSM counters against time, ksmd replayed (50%, 90%: of the steady "
                 f"general_profit)\n({_ksmd_words(result, lines=True)})", fontsize=10)
    return fig


def plot_ksmd_settings(result: Analysis) -> Figure:
    """ksmd's CPU % against the time to steady state, one point per setting of the
    ``ksmd_settings`` grid (``pages_to_scan`` x ``sleep_millisecs``, and the advisor at each
    sleep), the setting replayed and the cheapest within ``--converge-within`` marked.

    On log scales where the values span more than a factor of 20."""
    grid = result.ksmd_settings
    c = _convergence(result)
    fig = _figure(12.0, 6.0)
    ax = fig.subplots()
    if len(grid):
        x = grid["steady_state_seconds"].to_numpy(float)
        y = grid["ksmd_cpu_percent"].to_numpy(float)
        advised = (grid["advisor_mode"] == "scan-time").to_numpy(bool)
        sleeps = grid["sleep_millisecs"].to_numpy()
        colors = dict(zip(sorted(set(sleeps.tolist())), _palette(), strict=False))
        for sleep, color in colors.items():
            rows = (sleeps == sleep) & ~advised
            ax.plot(x[rows], y[rows], marker="o", linestyle="-", linewidth=0.8, color=color,
                    label=f"sleep_millisecs={sleep}")
        if advised.any():
            ax.scatter(x[advised], y[advised], marker="*", s=160,
                       color=[colors[s] for s in sleeps[advised]], edgecolors="black",
                       linewidths=0.6, zorder=3,
                       label="the scan-time advisor (advisor_mode=scan-time)")
        rates = grid["pages_to_scan"].to_numpy()
        at: dict[tuple[float, float], list[int]] = {}
        for i in np.flatnonzero(~advised & (sleeps == max(colors))):
            at.setdefault((float(x[i]), float(y[i])), []).append(int(rates[i]))
        for (px, py), same in at.items():  # the rates beside the points of one sleep
            text = (f"{same[0]:,}" if len(same) == 1
                    else f"{min(same):,}{_EN_DASH}{max(same):,}")
            ax.annotate(text, (px, py), xytext=(4, 4), textcoords="offset points", fontsize=7)
        now = _replayed_row(grid, c)
        if now is not None:
            ax.scatter([x[now]], [y[now]], marker="o", s=260, facecolors="none",
                       edgecolors="black", linewidths=1.8, zorder=4,
                       label=f"replayed: {_setting_words(grid, now)}")
        best = _cheapest_row(grid, result.ksm.converge_within)
        if best is not None and result.ksm.converge_within is not None:
            limit = result.ksm.converge_within
            ax.scatter([x[best]], [y[best]], marker="s", s=220, facecolors="none",
                       edgecolors="#d62728", linewidths=1.8, zorder=4,
                       label=f"cheapest within {_seconds_label(limit)}: "
                             f"{_setting_words(grid, best)}")
            ax.axvline(limit, color="#d62728", linestyle=":", linewidth=1,
                       label=f"--converge-within {_seconds_label(limit)}")
        for axis, values, label in ((ax.xaxis, x, "time to steady state (s)"),
                                    (ax.yaxis, y, "ksmd CPU (% of one CPU)")):
            positive = values[values > 0]
            log = len(positive) > 0 and positive.max() / positive.min() > 20
            if log:
                (ax.set_xscale if axis is ax.xaxis else ax.set_yscale)("log")
                label += " (log scale)"
            (ax.set_xlabel if axis is ax.xaxis else ax.set_ylabel)(label)
        fig.legend(loc="outside lower center", ncols=3, fontsize=8)  # clear of the title
    else:
        ax.text(0.5, 0.5, "no setting replayed", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_xlabel("time to steady state (s)")
        ax.set_ylabel("ksmd CPU (% of one CPU)")
    ax.grid(alpha=0.3, which="both")
    cost = ("CPU cost " + printable(result.ksm.cpu_cost) if result.ksm.cpu_cost
            else "the shipped CPU cost")
    fig.suptitle("ksmd CPU against time to steady state, per ksmd setting\n(a line per "
                 "sleep_millisecs through its pages_to_scan, numbered at the longest sleep)\n"
                 f"({_ksmd_words(result, pace=False)}, {cost})", fontsize=10)
    return fig


def _palette() -> list[str]:
    return ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6",
            "#9d755d", "#bab0ac", "#eeca3b"]


def _replayed_row(grid: pd.DataFrame, c: dict[str, object]) -> int | None:
    """The row of the setting the replay ran with (the advisor at its sleep, or its
    pages_to_scan and sleep_millisecs); None when the grid does not hold it."""
    same_sleep = grid["sleep_millisecs"] == c["sleep_millisecs"]
    if c["advisor_mode"] == "scan-time":
        rows = same_sleep & (grid["advisor_mode"] == "scan-time")
    else:
        rows = same_sleep & (grid["advisor_mode"] != "scan-time") & (
            grid["pages_to_scan"] == c["pages_to_scan"])
    found = np.flatnonzero(rows.to_numpy(bool))
    return int(found[0]) if len(found) else None


def _cheapest_row(grid: pd.DataFrame, limit: float | None) -> int | None:
    """The least CPU % among the settings at steady state within ``limit`` (the faster on a
    tie), as ``--converge-within`` picks it; None without a limit or a setting within it."""
    if limit is None:
        return None
    fit = np.flatnonzero((grid["steady_state_seconds"] <= limit).to_numpy(bool))
    if not len(fit):
        return None
    cpu = grid["ksmd_cpu_percent"].to_numpy(float)
    steady = grid["steady_state_seconds"].to_numpy(float)
    return int(min(fit, key=lambda i: (cpu[i], steady[i])))


def _setting_words(grid: pd.DataFrame, i: int) -> str:
    row = grid.iloc[i]
    rate = ("advisor" if row["advisor_mode"] == "scan-time"
            else f"pages_to_scan={int(row['pages_to_scan']):,}")
    return (f"{rate}, sleep_millisecs={int(row['sleep_millisecs'])}\n"
            f"({float(row['ksmd_cpu_percent']):.3g}% CPU, steady in "
            f"{_seconds_label(float(row['steady_state_seconds']))})")


def _policy_words(analysis: Analysis, zero_pages: bool | None = None) -> str:
    """The merging policy and KSM knobs a chart's numbers assume, for its title: ``merge=``
    as ``--merge`` spells it, the domains, how zero pages count (when one way is chosen),
    ``max_page_sharing`` and ``use_zero_pages``."""
    words = [f"merge={analysis.options.merge}"]
    if analysis.domains:
        words.append(f"{len(analysis.domains)} domains")
    if zero_pages is not None:
        words.append(_ZERO_WORDS[zero_pages])
    ksm = analysis.ksm
    words += [f"max_page_sharing={ksm.max_page_sharing}",
              f"use_zero_pages={int(ksm.use_zero_pages)}"]
    return ", ".join(words)


_ZERO_WORDS = {True: "with zero pages", False: "without zero pages"}
_METHOD_WORDS = {"sharing": "sharing-aware", "first_fit": "first-fit (ignores sharing)"}
NAMED_INPUTS = 4
"""Input names written under a host's bar (beyond: "+N more")."""
LABEL_CHARS = 48
"""Longest rotated label of a host's inputs (many bars), cut with an ellipsis beyond."""


def _host_label(host: int, names: list[str], upright: bool) -> str:
    shown = names[:NAMED_INPUTS]
    more = [f"+{len(names) - len(shown)} more"] if len(names) > len(shown) else []
    if upright:
        return "\n".join([f"host {host}", *shown, *more])
    line = f"host {host}: " + ", ".join(names)
    return line if len(line) <= LABEL_CHARS else line[:LABEL_CHARS - 1] + "\N{HORIZONTAL ELLIPSIS}"


def plot_hosts(plan: Plan) -> Figure:
    """Stacked bars per host, one panel per method: reserve, private pages, KSM pages,
    rmap_items, free memory, each bar named by its inputs. The scale is the host's: memory
    before KSM (the copy-on-write worst case) is a tick where it fits and an arrow with its
    size at the top where it does not."""
    hosts = plan.hosts
    methods = list(dict.fromkeys(hosts["method"]))
    guests: dict[tuple[str, int], list[str]] = {}
    for a in plan.assignments.itertuples():
        guests.setdefault((str(a.method), int(a.host)), []).append(printable(a.input))
    most = max((hosts["method"] == m).sum() for m in methods)
    upright = most <= 8  # few bars: names stacked under each; many: one rotated line each
    labels = {key: _host_label(key[1], names, upright) for key, names in guests.items()}
    lines = max((label.count("\n") + 1 for label in labels.values()), default=1)
    chars = max((len(label) for label in labels.values()), default=0)
    width = min(MAX_INCHES, max(9.0, 3.0 + (1.6 if upright else 0.45) * len(hosts)))
    fig = _figure(width, 5.0 + (0.16 * lines if upright else 0.065 * chars))
    axes = fig.subplots(1, len(methods), squeeze=False, sharey=True,
                        width_ratios=[max(1, (hosts["method"] == m).sum()) for m in methods])[0]
    used = (hosts["memory_after_bytes"].to_numpy(float).max(initial=0)
            + plan.host_memory - plan.capacity)
    # The bars' and the capacity's scale, with room above for the worst cases it leaves out.
    off_scale = (hosts["memory_before_bytes"] + plan.host_memory - plan.capacity
                 > 1.15 * max(plan.host_memory, used, 1)).any()
    top = (1.15 if upright or not off_scale else 1.35) * max(plan.host_memory, used, 1)
    div, unit = _unit(top)
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
        # On the reserve, as the bars are.
        before = rows["memory_before_bytes"].to_numpy(float) + plan.host_memory - plan.capacity
        inside = before <= top
        if inside.any() and upright:
            ax.scatter(x[inside], before[inside] / div, marker="_", s=400, linewidths=2,
                       color="black", zorder=3, label="memory before KSM (worst case)")
        elif inside.any():  # many bars: a tick as wide as its bar, not one line across them
            ax.hlines(before[inside] / div, x[inside] - 0.4, x[inside] + 0.4, linewidths=2,
                      color="black", zorder=3, label="memory before KSM (worst case)")
        for i in np.flatnonzero(~inside):
            worst = int(rows["memory_before_bytes"].iloc[i])
            ax.annotate(f"\N{UPWARDS ARROW} {human_bytes(worst)}", (x[i], top / div),
                        xytext=(0, -3), textcoords="offset points", ha="center", va="top",
                        fontsize=8 if upright else 7, rotation=0 if upright else 90)
        ax.axhline(plan.host_memory / div, color="black", linewidth=0.8)
        ax.set_ylim(0, top / div)
        ax.set_xticks(x, [labels.get((method, int(h)), f"host {h}") for h in rows["host"]],
                      fontsize=8, rotation=0 if upright else 90)
        n = len(rows)
        ax.set_title(f"{_METHOD_WORDS.get(method, method)}: {n} host{'s' if n != 1 else ''}",
                     fontsize=11)
    axes[0].set_ylabel(f"host memory ({unit})")
    handles, names = axes[0].get_legend_handles_labels()
    if "memory before KSM (worst case)" not in names:  # drawn in a later panel
        handles.append(Line2D([], [], linestyle="none", marker="_", markersize=15,
                              markeredgewidth=2, color="black"))
        names.append("memory before KSM (worst case)")
    if off_scale:
        handles.append(Line2D([], [], linestyle="none", marker="$\u2191$", color="black"))
        names.append("memory before KSM above the scale (its size written)")
    fig.legend(handles, names, loc="outside lower center", ncols=3, fontsize=9)
    reserve = (f" ({human_bytes(plan.capacity)} for inputs)"
               if plan.capacity < plan.host_memory else "")
    fig.suptitle(f"Hosts of {human_bytes(plan.host_memory)}{reserve}: placement with and "
                 f"without sharing-awareness\n({_policy_words(plan.analysis, plan.zero_pages)})",
                 fontsize=12)
    return fig


def plot_projection(plan: Plan) -> Figure:
    """Host memory against the number of inputs like these, with and without KSM.

    On log scales when the values span more than a factor of 20 (a small host beside a
    hundred guests), so the with-KSM curve and the capacity stay apart from the axis."""
    proj = plan.projection
    fig = _figure(8.0, 5.0)
    ax = fig.subplots()
    if len(proj):
        vms = proj["input_count"].to_numpy()
        before = proj["memory_before_bytes"].to_numpy(float)
        after = proj["memory_after_bytes"].to_numpy(float)
        low = proj["memory_after_low_bytes"].to_numpy(float)
        high = proj["memory_after_high_bytes"].to_numpy(float)
        values = np.concatenate([before, after, low, high, [plan.capacity]])
        values = values[values > 0]
        logy = len(values) > 0 and values.max() / values.min() > 20
        div, unit = (1.0, "") if logy else _unit(float(values.max(initial=1)))
        measured = proj["measured"].to_numpy(bool)
        ax.plot(vms, before / div, color="#9467bd", marker="o", label="without KSM")
        ax.plot(vms, after / div, color="#2ca02c", marker="o",
                label="with KSM (mean over random orders)")
        ax.fill_between(vms, low / div, high / div, color="#2ca02c", alpha=0.2,
                        label=f"10th{_EN_DASH}90th percentile band")
        if (~measured).any():
            first = vms[~measured].min()
            ax.axvspan(first * 0.9 if vms.max() / vms.min() > 20 else first - 0.5,
                       vms.max() * 1.1 if vms.max() / vms.min() > 20 else vms.max() + 0.5,
                       color="#eeeeee", zorder=0, label="beyond the samples: a model")
        ax.axhline(plan.capacity / div, color="black", linewidth=0.8, linestyle="--",
                   label=f"host capacity ({human_bytes(plan.capacity)})")
        if plan.fits is not None and vms.min() <= plan.fits[0] <= vms.max():  # else: title
            ax.axvline(plan.fits[0], color="black", linewidth=0.8, linestyle=":",
                       label=f"{plan.fits[0]:,} fit (with KSM)")
        if logy:
            ax.set_yscale("log", base=2)
            ax.set_ylim(values.min() / 1.5, values.max() * 1.5)
            ax.yaxis.set_major_locator(LogLocator(base=4))
            ax.yaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: human_bytes(int(v))))
            ax.set_ylabel("host memory (log scale)")
        else:
            ax.set_ylim(0, values.max(initial=1) / div * 1.1)
            ax.set_ylabel(f"host memory ({unit})")
        if vms.max() / max(vms.min(), 1) > 20:
            ax.set_xscale("log")
            ax.set_xticks(vms, [f"{int(v):,}" for v in vms])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel("inputs like these on one host (log scale)")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("inputs like these on one host")
        ax.legend(fontsize=9)
    else:
        ax.set_xlabel("inputs like these on one host")
    title = "Host memory for more inputs like these"
    if plan.fits is not None:
        title += f": {plan.fits[0]:,} fit in {human_bytes(plan.capacity)}"
    ax.set_title(f"{title}\n({_policy_words(plan.analysis, plan.zero_pages)})", fontsize=11)
    ax.grid(alpha=0.3)
    return fig


def plot_tune(result: Tune) -> Figure:
    """Seconds per GiB of stage 1, stage 2 and both against the prefix length (above), and
    the candidates and false candidates each length lets through (below)."""
    table = result.columns["prefixes"]
    x = np.asarray(table["prefix_bytes"], float)
    fig = _figure(8.0, 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    for column, label, style in (("stage1_seconds_per_gib", "stage 1 (hash prefixes)", "--"),
                                 ("stage2_seconds_per_gib", "stage 2 (compare candidates)", ":"),
                                 ("total_seconds_per_gib", "both", "-")):
        values = np.array([np.nan if v is None else v for v in table[column]], float)
        top.plot(x, values, style, marker="o", label=label)
    chosen = result.recommended_prefix_bytes
    for ax in (top, bottom):
        ax.axvline(chosen, color="#2ca02c", alpha=0.5, linewidth=3)
        ax.grid(alpha=0.3)
    top.set_ylabel("seconds per GiB of stored pages")
    top.set_ylim(bottom=0)
    top.legend(fontsize=9, title=f"recommended: {chosen} bytes", title_fontsize=9)
    width = 0.35
    positions = np.log2(x)
    bottom.bar(2 ** (positions - width / 2), table["prefix_candidates"],
               width=2 ** (positions - width / 2) * (2**width - 1) * 0.9, align="edge",
               color="#4c78a8", label="candidates")
    bottom.bar(2 ** positions, table["false_candidates"],
               width=2 ** positions * (2**width - 1) * 0.9, align="edge", color="#d62728",
               label="false candidates")
    bottom.set_ylabel("pages")
    bottom.legend(fontsize=9)
    bottom.set_xscale("log", base=2)
    bottom.set_xticks(x, [f"{int(v):,}" for v in x])
    bottom.xaxis.set_minor_locator(NullLocator())
    bottom.set_xlabel("prefix length hashed in stage 1 (bytes)")
    fig.suptitle(f"Prefix length: {counted(len(result.inputs), 'input')}, "
                 f"{human_bytes(result.stored_bytes)} of stored pages (best of "
                 f"{counted(result.runs, 'run')}, warm page cache)", fontsize=11)
    return fig
