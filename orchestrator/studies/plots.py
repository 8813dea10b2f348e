"""Generic PNG plots (matplotlib, headless) for reports and sweeps.

Figures are built with matplotlib's object API (`Figure` + the Agg canvas), never pyplot, so
no global state or display backend is involved and plotting is safe in any process. Each
function renders into memory and writes the PNG atomically; it returns the path written.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

from ..run.files import atomic_write_bytes

Series = tuple[Sequence[float], Sequence[float]]  # (xs, ys)


def _figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def line_plot(path: str | Path, series: Mapping[str, Series], title: str, xlabel: str, ylabel: str,
              hlines: Mapping[str, float] | None = None, markers: bool = False, logy: bool = False,
              integer_x: bool = True) -> Path:
    """One line per labelled (xs, ys) series; `hlines` draws labelled horizontal reference
    lines (e.g. the AT's score on a plot over an NAT setting). A series of one point gets a
    marker whatever `markers` says (a line through one point is invisible)."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure()
    ax = fig.add_subplot()
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o" if markers or len(xs) == 1 else None, label=label)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for i, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, linestyle="--", color=f"C{len(series) + i}", label=label)
    if logy:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if series or hlines:
        ax.legend()
    return _save(fig, path)


def bar_plot(path: str | Path, groups: Mapping[str, Sequence[float]], title: str, xlabel: str, ylabel: str,
             categories: Sequence[str] | None = None, log: bool = False) -> Path:
    """Grouped bars: one colour per group, one slot per category (index i of every group's
    values). Groups may differ in length; `categories` labels the slots (default 0, 1, ...)."""
    fig = _figure(width=max(6.4, min(16.0, 0.35 * len(categories or ()))))
    ax = fig.add_subplot()
    n = max((len(v) for v in groups.values()), default=0)
    width = 0.8 / max(1, len(groups))
    for g, (label, values) in enumerate(groups.items()):
        xs = [i - 0.4 + width * (g + 0.5) for i in range(len(values))]
        ax.bar(xs, list(values), width=width, label=label, log=log)
    if categories is not None:
        ax.set_xticks(range(len(categories)), list(categories), rotation=30, ha="right")
    elif n <= 20:
        ax.set_xticks(range(n))
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(axis="y", alpha=0.3)
    if groups:
        ax.legend()
    return _save(fig, path)


def scatter_plot(path: str | Path, groups: Mapping[str, Series], title: str, xlabel: str, ylabel: str,
                 logx: bool = False, logy: bool = False) -> Path:
    """One colour of points per labelled (xs, ys) group (e.g. trials by action count)."""
    fig = _figure()
    ax = fig.add_subplot()
    for label, (xs, ys) in groups.items():
        ax.scatter(list(xs), list(ys), label=label)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if groups:
        ax.legend()
    return _save(fig, path)
