"""The run report's plots: matplotlib figures rendered to inline SVG strings.

Each function takes plain numbers (from cai/report/data.py) and returns one `<svg>` element, text
kept as text (`svg.fonttype: none`, so the page's search and a screen reader see it), with a fixed
hash salt so the same run gives the same bytes and no two plots share an element id. Figures are
built on `matplotlib.figure.Figure` with no pyplot, so nothing global (backend, open figures) is
touched; SVG output needs no GUI backend (the process's backend is left as it is, Agg by default
on a headless machine).

    python -c "from cai.report import plots; print(plots.histogram([0.2, 0.7, 0.9], 'P(first better)', 'labels')[:200])"
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any

# Colour-blind-friendly categorical colours (one per model or group, in order).
PALETTE = ("#4269d0", "#efb118", "#ff725c", "#6cc5b0", "#3ca951", "#ff8ab7", "#a463f2", "#97bbf5", "#9c6b4e",
           "#9498a0")
OK_COLOUR, BAD_COLOUR, GRID = "#4269d0", "#ff725c", "#e3e3e3"
WIDTH = 6.4  # inches (96 CSS pixels each): a plot in one of two columns; the page scales plots down to fit
WIDE = 9.6  # a plot across the page
RC = {
    "svg.fonttype": "none",
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Helvetica", "Arial", "Liberation Sans"],
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.edgecolor": "#888888",
    "axes.grid": True,
    "grid.color": GRID,
    "grid.linewidth": 0.6,
    "axes.axisbelow": True,
    "xtick.color": "#444444",
    "ytick.color": "#444444",
    "legend.frameon": False,
    "legend.fontsize": 8,
}


@contextmanager
def _figure(name: str, height: float, width: float = WIDTH, **subplots: Any):
    """A figure and its axes under the report's style; yields (fig, axes, out) and fills `out[0]`
    with the SVG when the block ends. `name` salts the element ids."""
    import matplotlib
    from matplotlib.figure import Figure

    out: list[str] = []
    with matplotlib.rc_context({**RC, "svg.hashsalt": f"cai-report-{name}"}):
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots(**subplots) if subplots else fig.subplots()
        yield fig, axes, out
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    out.append(_clean(buf.getvalue()))


def _clean(svg: str) -> str:
    """The `<svg>` element alone: no XML prolog, doctype or RDF metadata."""
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    return svg.replace("<svg ", '<svg role="img" ', 1).strip()


def _short(label: str, n: int = 28) -> str:
    """A label from the run, cut to `n` characters, its `$` escaped so matplotlib never reads it as
    maths (`<` and `&` are escaped by matplotlib's SVG writer)."""
    label = str(label) if len(str(label)) <= n else str(label)[: n - 1] + "…"
    return label.replace("$", r"\$")


def _integers(axis: Any) -> None:
    """Ticks at whole numbers only (counts, rounds, steps)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _plain(axis: Any) -> None:
    """Tick labels as plain numbers: no offset or power-of-ten multiplier written above the panel,
    where it would run into the title."""
    from matplotlib.ticker import ScalarFormatter

    f = ScalarFormatter(useOffset=False)
    f.set_powerlimits((-100, 100))
    axis.set_major_formatter(f)


def _pct(ax: Any, axis: str = "x") -> None:
    from matplotlib.ticker import PercentFormatter

    (ax.xaxis if axis == "x" else ax.yaxis).set_major_formatter(PercentFormatter(1.0, decimals=0))


# ---- evaluation -----------------------------------------------------------------------------


def frontier(points: Sequence[Mapping[str, Any]]) -> str:
    """Harmlessness Elo (y) against helpfulness Elo (x) per model, with 95% interval bars: each
    point {name, x, x_low, x_high, y, y_low, y_high} (an interval may be None)."""
    with _figure("frontier", 4.2, 5.0) as (fig, ax, out):
        for i, p in enumerate(points):
            colour = PALETTE[i % len(PALETTE)]
            xerr = [[p["x"] - p["x_low"]], [p["x_high"] - p["x"]]] if p.get("x_low") is not None else None
            yerr = [[p["y"] - p["y_low"]], [p["y_high"] - p["y"]]] if p.get("y_low") is not None else None
            ax.errorbar([p["x"]], [p["y"]], xerr=xerr, yerr=yerr, fmt="o", color=colour, ms=7, capsize=3,
                        elinewidth=1.2, label=_short(p["name"], 24))
        ax.axhline(0, color="#bbbbbb", lw=0.8, zorder=0)
        ax.axvline(0, color="#bbbbbb", lw=0.8, zorder=0)
        ax.set_xlabel("helpfulness Elo (higher: more helpful)")
        ax.set_ylabel("harmlessness Elo (higher: more harmless)")
        ax.margins(0.15)
        # a legend below the axes rather than labels beside the points, which overlap when models are close
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(len(points), 4), frameon=False)
    return out[0]


def elo_bars(aspect: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """One aspect's Elo per model with its 95% interval: rows {name, elo, low, high}."""
    with _figure(f"elo-{aspect}", 0.5 + 0.35 * len(rows)) as (fig, ax, out):
        ys = list(range(len(rows)))[::-1]
        for y, (i, r) in zip(ys, enumerate(rows)):
            err = [[r["elo"] - r["low"]], [r["high"] - r["elo"]]] if r.get("low") is not None else None
            ax.errorbar([r["elo"]], [y], xerr=err, fmt="o", color=PALETTE[i % len(PALETTE)], capsize=3)
        ax.set_yticks(ys, [_short(r["name"]) for r in rows])
        ax.axvline(0, color="#bbbbbb", lw=0.8, zorder=0)
        ax.set_xlabel(f"{aspect}ness Elo (95% interval)")
        ax.margins(y=0.3)
    return out[0]


def heatmap(categories: Sequence[str], models: Sequence[str], values: Sequence[Sequence[float | None]],
            vmax: float = 4.0, label: str = "expected harm (0-4)") -> str:
    """A categories x models table of values in [0, vmax] as coloured cells with their numbers
    (a cell without a value is grey)."""
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    height = max(1.8, 1.0 + 0.32 * len(categories))
    width = min(WIDTH, 2.6 + 1.1 * len(models))
    with _figure("heatmap", height, width) as (fig, ax, out):
        ax.grid(False)
        cmap = _cmap().with_extremes(bad="#eeeeee")
        # cells as vector rectangles (imshow would embed a PNG)
        im = ax.pcolormesh(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=vmax, edgecolors="white",
                           linewidth=1.0)
        ax.set_xlim(0, len(models))
        ax.set_ylim(len(categories), 0)
        ax.set_xticks([j + 0.5 for j in range(len(models))], [_short(m, 16) for m in models])
        ax.set_yticks([i + 0.5 for i in range(len(categories))], [_short(c, 24) for c in categories])
        ax.tick_params(length=0)
        ax.xaxis.tick_top()
        for spine in ax.spines.values():
            spine.set_visible(False)
        for i in range(len(categories)):
            for j in range(len(models)):
                v = data[i, j]
                text = "–" if math.isnan(v) else f"{v:.2f}"
                dark = not math.isnan(v) and v > 0.6 * vmax
                ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize=8.5,
                        color="white" if dark else "#222222")
        # 32 bands: under matplotlib's 50, so the colour bar stays vector too
        fig.colorbar(im, ax=ax, label=label, shrink=0.9, pad=0.02, boundaries=np.linspace(0.0, vmax, 33),
                     ticks=np.arange(0.0, vmax + 0.5, 1.0))
    return out[0]


def _cmap() -> Any:
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("harm", ["#f7fbff", "#fdd49e", "#fc8d59", "#d7301f", "#7f0000"])


def rate_panels(panels: Sequence[tuple[str, Mapping[str, Mapping[str, Any]]]], models: Sequence[str]) -> str:
    """Side-by-side panels of rates with 95% intervals: each (title, {model: {rate, low, high}});
    a model without a rate is left out of its panel."""
    n = len(panels)
    cols = min(n, 5)
    rows = math.ceil(n / cols)
    with _figure("rates", 0.3 + rows * (0.75 + 0.3 * len(models)), WIDE, squeeze=False, nrows=rows, ncols=cols,
                 sharey=True) as (fig, axes, out):
        ys = list(range(len(models)))[::-1]
        for k, (title, by_model) in enumerate(panels):
            ax = axes[k // cols][k % cols]
            for y, (i, m) in zip(ys, enumerate(models)):
                r = by_model.get(m) or {}
                if r.get("rate") is None:
                    continue
                err = [[r["rate"] - r["low"]], [r["high"] - r["rate"]]] if r.get("low") is not None else None
                ax.barh([y], [r["rate"]], color=PALETTE[i % len(PALETTE)], alpha=0.35, height=0.6)
                ax.errorbar([r["rate"]], [y], xerr=err, fmt="o", color=PALETTE[i % len(PALETTE)], capsize=3, ms=4)
            ax.set_xlim(-0.02, 1.1)
            ax.set_xticks([0, 0.5, 1])
            _pct(ax)
            ax.set_title(title, fontsize=9)
            ax.set_yticks(ys, [_short(m, 16) for m in models])
        for k in range(n, rows * cols):
            axes[k // cols][k % cols].set_visible(False)
    return out[0]


# ---- curves and counts ----------------------------------------------------------------------


def line_ci(points: Sequence[Mapping[str, Any]], xlabel: str, ylabel: str, name: str = "line") -> str:
    """A mean per x with its 95% band: points {x, mean, low, high} (low/high may be None)."""
    pts = [p for p in points if p.get("mean") is not None]
    with _figure(name, 2.8) as (fig, ax, out):
        xs = [p["x"] for p in pts]
        ax.plot(xs, [p["mean"] for p in pts], "o-", color=OK_COLOUR, lw=1.8, ms=5)
        band = [p for p in pts if p.get("low") is not None and p.get("high") is not None]
        if band:
            ax.fill_between([p["x"] for p in band], [p["low"] for p in band], [p["high"] for p in band],
                            color=OK_COLOUR, alpha=0.15, lw=0, label="95% interval")
            ax.legend(loc="best")
        ax.set_xticks(xs)
        _plain(ax.yaxis)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    return out[0]


def hbars(counts: Mapping[str, float], xlabel: str, part: Mapping[str, float] | None = None,
          labels: tuple[str, str] = ("", ""), name: str = "bars") -> str:
    """Horizontal bars, largest first as given; with `part`, the share of each bar it names is
    drawn over it in a second colour (e.g. degenerate revisions out of all draws)."""
    keys = list(counts)
    with _figure(name, 0.9 + 0.24 * len(keys)) as (fig, ax, out):
        ys = list(range(len(keys)))[::-1]
        ax.barh(ys, [counts[k] for k in keys], color=OK_COLOUR, height=0.7, label=labels[0] or None)
        if part is not None:
            ax.barh(ys, [part.get(k, 0) for k in keys], color=BAD_COLOUR, height=0.7, label=labels[1] or None)
            ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2)
        ax.set_yticks(ys, [_short(k, 32) for k in keys])
        _integers(ax.xaxis)
        ax.set_xlabel(xlabel)
        ax.grid(axis="y", visible=False)
        ax.margins(y=0.02)
    return out[0]


def stacked(groups: Sequence[str], series: Mapping[str, Sequence[float]], xlabel: str, ylabel: str,
            name: str = "stacked") -> str:
    """Vertical bars per group, the series stacked in order (first at the bottom)."""
    import numpy as np

    with _figure(name, 2.6) as (fig, ax, out):
        bottom = np.zeros(len(groups))
        for i, (label, vals) in enumerate(series.items()):
            colour = OK_COLOUR if i == 0 else PALETTE[(i + 1) % len(PALETTE)]
            ax.bar(groups, vals, bottom=bottom, color=colour, label=label, width=0.6)
            bottom += np.asarray(vals, dtype=float)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        _integers(ax.yaxis)
        ax.grid(axis="x", visible=False)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return out[0]


def histogram(values: Sequence[float], xlabel: str, ylabel: str, bins: int = 20, name: str = "hist") -> str:
    """A histogram over [0, 1] with the undecided 0.5 marked."""
    with _figure(name, 2.6) as (fig, ax, out):
        ax.hist(values, bins=bins, range=(0.0, 1.0), color=OK_COLOUR, edgecolor="white", linewidth=0.6)
        ax.axvline(0.5, color="#555555", lw=1, ls="--")
        ax.set_xlim(0, 1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        _integers(ax.yaxis)
        ax.grid(axis="x", visible=False)
    return out[0]


def orders(points: Sequence[tuple[float, float]]) -> str:
    """P(response 1) asked with it shown first (x) against shown second (y): points in the shaded
    quadrants are comparisons whose two orders agree."""
    with _figure("orders", 3.6, 3.9) as (fig, ax, out):
        ax.axhspan(0.5, 1, xmin=0.5, xmax=1, color="#3ca951", alpha=0.08, lw=0)
        ax.axhspan(0, 0.5, xmin=0, xmax=0.5, color="#3ca951", alpha=0.08, lw=0)
        ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=0.8)
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=14, color=OK_COLOUR, alpha=0.7, lw=0)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("P(response 1 better), shown as (A)")
        ax.set_ylabel("P(response 1 better), shown as (B)")
    return out[0]


def reliability(groups: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Reliability diagram: per group (AI, human labels), each bin's mean predicted probability
    against its mean label, the marker's area by the bin's size; the diagonal is calibration."""
    with _figure("reliability", 3.6, 4.2) as (fig, ax, out):
        ax.plot([0, 1], [0, 1], color="#999999", lw=1, ls="--", label="calibrated")
        biggest = max((c["n"] for cells in groups.values() for c in cells), default=1)
        for i, (name, cells) in enumerate(groups.items()):
            colour = PALETTE[i % len(PALETTE)]
            ax.plot([c["p"] for c in cells], [c["target"] for c in cells], "-", color=colour, lw=1.2, alpha=0.7)
            ax.scatter([c["p"] for c in cells], [c["target"] for c in cells],
                       s=[12 + 90 * c["n"] / biggest for c in cells], color=colour, label=name, zorder=3)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("predicted P(preferred), sigmoid(margin)")
        ax.set_ylabel("label (mean in the bin)")
        ax.legend(loc="upper left")
    return out[0]


def curves(series: Mapping[str, Sequence[tuple[float, float]]], name: str, cols: int = 3) -> str:
    """Small multiples: one panel per metric, its value per step."""
    keys = list(series)
    cols = min(cols, len(keys))
    rows = math.ceil(len(keys) / cols)
    with _figure(f"curves-{name}", 0.3 + 2.0 * rows, WIDE * cols / 3, squeeze=False, nrows=rows,
                 ncols=cols) as (fig, axes, out):
        for k, key in enumerate(keys):
            ax = axes[k // cols][k % cols]
            pts = series[key]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=PALETTE[k % len(PALETTE)], lw=1.5,
                    marker="o" if len(pts) <= 20 else None, ms=3)
            ax.set_title(key.replace("_", " "), fontsize=9)
            ax.tick_params(labelsize=8)
            ax.locator_params(axis="x", integer=True, nbins=5)
            ax.locator_params(axis="y", nbins=4)
            _plain(ax.yaxis)
            if k // cols == rows - 1 or k + cols >= len(keys):
                ax.set_xlabel("step", fontsize=8)
        for k in range(len(keys), rows * cols):
            axes[k // cols][k % cols].set_visible(False)
    return out[0]
