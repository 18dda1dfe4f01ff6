"""`kvcompress eval --plot FILE`: quality against bits per element and against bytes held, one point per spec,
the baseline marked; the series come from the result rows (`plot_data`), the figure from the series alone."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kvcompress.errors import KVCompressError
from kvcompress.eval.runners import BASELINE

SUFFIXES = (".png", ".svg")
LABEL_SIZE = 8
INSTALL = 'pip install "kvcompress[plot]" (in a checkout: pip install -e ".[plot]", which make install runs)'


@dataclass(frozen=True)
class Point:
    """One row of the results as the plot shows it."""

    name: str
    bits: float
    nbytes: int
    quality: float


@dataclass(frozen=True)
class PlotData:
    """What the figure draws: the quality's label, the baseline and the specs' points, and a title."""

    title: str
    quality_label: str
    baseline: Point
    specs: tuple[Point, ...]


def check_plot_path(path: Path) -> None:
    """Refuse, before anything runs, a --plot FILE that could not be written or matplotlib that is missing."""
    if path.suffix.lower() not in SUFFIXES:
        raise KVCompressError(f"--plot {path}: give a .png or .svg file name (the format follows the suffix)")
    if path.is_dir() or not path.parent.is_dir():
        raise KVCompressError(f"--plot {path}: not a file in an existing directory")
    if importlib.util.find_spec("matplotlib") is None:
        raise KVCompressError(f"--plot needs matplotlib, which is not installed: {INSTALL}")


def quality(task: str, row: dict[str, Any]) -> tuple[str, float]:
    """(label, value) of a row's quality: perplexity, needle accuracy, or the RULER-style average at the
    longest length (the length whose cache the bytes and bits describe)."""
    if task == "ppl":
        return "perplexity (lower is better)", row["ppl"]
    if task == "needle":
        return "needle accuracy % (higher is better)", 100 * row["accuracy"]
    longest = max(row["average"], key=int)
    return f"RULER-style average % at {longest} tokens (higher is better)", row["average"][longest]["mean"]


def plot_data(header: dict[str, Any], rows: list[dict[str, Any]]) -> PlotData:
    """The plot's series from an eval run's JSON (header and rows): exactly the rows' figures."""
    points = []
    label = ""
    for row in rows:
        label, value = quality(header["task"], row)
        points.append(Point(row["name"], row["bits_per_element"], row["cache_bytes"], value))
    baseline = [p for p in points if p.name == BASELINE]
    if not baseline:
        raise KVCompressError("the results have no baseline row to plot against")
    title = f"{header['model']} ({header['model_dtype']}), {header['task']}"
    return PlotData(title, label, baseline[0], tuple(p for p in points if p.name != BASELINE))


def figure(data: PlotData) -> Any:
    """The matplotlib figure: two panels (quality against bits per element, against bytes held), each spec a
    labelled point, the baseline a star with a dashed line at its quality."""
    # A bare Figure, not pyplot: no display backend, no global state; savefig picks the writer by format.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    panels = [("bits per element (log scale)", lambda p: p.bits), ("KiB held (log scale)", lambda p: p.nbytes / 1024)]
    for ax, (xlabel, x) in zip(axes, panels):
        ax.axhline(data.baseline.quality, color="0.45", linestyle="--", linewidth=1, zorder=1)
        ax.scatter([x(data.baseline)], [data.baseline.quality], marker="*", s=220, color="black", zorder=3,
                   label=f"{BASELINE} {data.baseline.quality:.3g}")
        ax.scatter([x(p) for p in data.specs], [p.quality for p in data.specs], s=40, color="tab:blue", zorder=3)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    axes[0].set_ylabel(data.quality_label)
    fig.suptitle(data.title)
    # Labels are placed where the final layout puts the points, so the layout runs first.
    fig.draw_without_rendering()
    for ax, (_, x) in zip(axes, panels):
        spots = label_spots(ax, data.specs, x)
        for p in data.specs:
            dx, dy, align = spots[p.name]
            ax.annotate(p.name, (x(p), p.quality), textcoords="offset points", xytext=(dx, dy), ha=align, fontsize=LABEL_SIZE)
    return fig


# Where a label may go, in points from its point (dx, dy, alignment), tried in order until it covers no other.
LABEL_SPOTS = ((5, 3, "left"), (5, -11, "left"), (-5, 3, "right"), (-5, -11, "right"), (5, 13, "left"), (5, -21, "left"))


def label_spots(ax: Any, points: tuple[Point, ...], x: Callable[[Point], float]) -> dict[str, tuple[int, int, str]]:
    """Each label's spot beside its point, chosen so that labels do not cover one another (specs with the same
    bits, such as rot-k4v2 and streaming-rot-k4v2, would otherwise print on top of each other)."""
    scale = 72 / ax.figure.dpi  # display pixels to points

    def where(p: Point) -> tuple[float, float]:
        px, py = ax.transData.transform((x(p), p.quality))
        return px * scale, py * scale

    # the markers are obstacles too (4 points around each)
    boxes = [(px - 4, py - 4, px + 4, py + 4) for px, py in map(where, points)]
    spots = {}
    for p in sorted(points, key=lambda p: (x(p), p.quality)):
        px, py = where(p)
        width = 0.6 * LABEL_SIZE * len(p.name)
        for dx, dy, align in LABEL_SPOTS:
            left = px + dx - (width if align == "right" else 0)
            box = (left, py + dy, left + width, py + dy + LABEL_SIZE)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
                break
        boxes.append(box)
        spots[p.name] = (dx, dy, align)
    return spots


def save_plot(data: PlotData, path: Path) -> None:
    """Write the figure to `path`, as PNG or SVG by its suffix."""
    figure(data).savefig(path, format=path.suffix.lower().lstrip("."), dpi=120)
