"""``ksm-status --watch``: one text line per reading, and the chart of a watch.

matplotlib is imported only by :func:`plot_watch`: a watch without ``--png`` does not pay
for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..errors import printable
from ..live.status import STEADY, KsmWatch
from ..units import human_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["PLOTTED", "plot_watch", "watch_alignment", "watch_header", "watch_line",
           "watch_summary"]

PLOTTED = ("pages_sharing", "general_profit")
"""The counters the chart of a watch draws, actual beside predicted."""
_SECONDS, _SCANS = 9, 10  # widths of the first two columns


def _value(counter: str, v: Any) -> str:
    if v is None or pd.isna(v):  # no prediction yet
        return "-"
    return human_bytes(int(v)) if counter == "general_profit" else f"{int(v):,}"


def _width(w: KsmWatch, counter: str) -> int:
    """Wide enough for "1,234 / 1,234" and "-64.0 KiB / 3.5 MiB"; larger values push on."""
    both = 19 if counter == "general_profit" else 15
    return max(len(counter), both if w.prediction is not None else 9)


def watch_header(w: KsmWatch) -> str:
    """The column names, after the first reading (which fixes the counters the kernel has)."""
    cells = ["seconds".rjust(_SECONDS), "full_scans".rjust(_SCANS)]
    cells += [c.rjust(_width(w, c)) for c in w.counters]
    return "  ".join(cells)


def watch_line(w: KsmWatch, row: Mapping[str, Any]) -> str:
    """One reading: seconds and full scans since the watch began, then each counter,
    ``actual / predicted`` with a prediction."""
    cells = [f"{row['time_seconds']:.2f}".rjust(_SECONDS), f"{row['full_scans']:,}".rjust(_SCANS)]
    for c in w.counters:
        text = _value(c, row[f"{c}_actual"])
        if w.prediction is not None:
            text += f" / {_value(c, row[f'{c}_predicted'])}"
        cells.append(text.rjust(_width(w, c)))
    return "  ".join(cells)


def watch_alignment(w: KsmWatch) -> str:
    """What the predicted cells are, in one line (after the first reading)."""
    if w.prediction is None:
        return "No inputs: the kernel's counters alone."
    if w.alignment == STEADY:
        assert w.start is not None
        return (f"KSM was already merging when the watch began (pages_shared "
                f"{w.start.get('pages_shared', 0):,}, ksm_zero_pages "
                f"{w.start.get('ksm_zero_pages', 0):,}): predicted is the replay's steady "
                "state.")
    return ("Each cell: actual / predicted after as many full scans since the watch began "
            "(KSM starts from nothing; '-' until the first full scan ends).")


def watch_summary(frame: pd.DataFrame) -> str | None:
    """The last reading's predicted counters against the kernel's, or None without a
    prediction or a reading."""
    if not len(frame) or "pages_sharing_predicted" not in frame.columns:
        return None
    last = frame.iloc[-1]
    parts = []
    for c in PLOTTED:
        if f"{c}_predicted" not in frame.columns:
            continue
        actual, predicted = last[f"{c}_actual"], last[f"{c}_predicted"]
        if predicted is None or pd.isna(predicted):
            parts.append(f"{c} {_value(c, actual)} actual, none predicted yet")
            continue
        diff = int(actual) - int(predicted)
        pct = f" ({100.0 * diff / int(predicted):+.2f}%)" if int(predicted) else ""
        parts.append(f"{c} {_value(c, actual)} actual, {_value(c, predicted)} predicted: "
                     f"{diff:+,}{' bytes' if c == 'general_profit' else ''}{pct}")
    return printable(f"At the last reading ({int(last['full_scans']):,} full scans): "
                     + "; ".join(parts))


def plot_watch(frame: pd.DataFrame, *, alignment: str | None = None) -> Figure:
    """pages_sharing and general_profit against seconds since the watch began: the
    kernel's (solid) and, with a prediction, the replay's at the same point (dashed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(11.0, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(PLOTTED), squeeze=False)[0]
    t = frame["time_seconds"].to_numpy(dtype=float)
    for ax, c in zip(axes, PLOTTED, strict=True):
        if f"{c}_actual" in frame.columns:
            ax.plot(t, frame[f"{c}_actual"].to_numpy(dtype=float), color="#4c78a8",
                    label="actual (kernel)", drawstyle="steps-post")
        if f"{c}_predicted" in frame.columns:
            ax.plot(t, frame[f"{c}_predicted"].to_numpy(dtype=float, na_value=float("nan")),
                    color="#f58518", linestyle="--", label="predicted", drawstyle="steps-post")
        if c == "general_profit":
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: human_bytes(v)))
        ax.set_xlabel("seconds since the watch began")
        ax.set_ylabel(c)
        ax.set_title(c, fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=9)
    how = {STEADY: "predicted: the replay's steady state (KSM was already merging)",
           "from_start": "predicted: the replay after as many full scans since the watch began",
           None: "no prediction"}.get(alignment, "")
    fig.suptitle(f"KSM counters during the watch ({how})", fontsize=12)
    return fig
