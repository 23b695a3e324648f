"""One plotting style for every figure: titles, axis labels with units, log axes where growth is the point.

Every function returns the matplotlib Figure; ``save(fig, name)`` also writes
``output/plots/<name>.png`` so the figures exist outside the notebook.
"""

from __future__ import annotations

import matplotlib

if matplotlib.get_backend().lower() not in ("module://matplotlib_inline.backend_inline", "inline"):
    try:  # headless runs (nbmake, scripts) without a display
        import IPython

        if IPython.get_ipython() is None:
            matplotlib.use("Agg")
    except ImportError:
        matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .config import output_dir, write_whole

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]
STYLE = {
    "figure.figsize": (8, 4.5),
    "figure.dpi": 100,
    "savefig.dpi": 120,
    "savefig.bbox": "tight",
    "axes.titlesize": 13,
    "axes.titleweight": "bold",
    "axes.labelsize": 11,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
    "legend.frameon": False,
}


def style() -> None:
    plt.rcParams.update(STYLE)


style()


def figure(title: str, xlabel: str, ylabel: str, *, logx: bool = False, logy: bool = False, size=None):
    """A new (fig, ax) with title and labels set; labels should carry units, e.g. "time (ms)"."""
    fig, ax = plt.subplots(figsize=size or STYLE["figure.figsize"])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    return fig, ax


def lines(
    df: pd.DataFrame,
    x: str,
    y: str,
    hue: str,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    logy: bool = False,
    marker: str = "o",
    legend_title: str | None = None,
    errors: tuple[str, str] | None = None,
):
    """One line per value of ``hue`` (e.g. a loader strategy), points marked.

    ``errors=(low, high)``: columns of the spread around ``y`` (e.g. min and max over repeats), drawn as error bars.
    """
    fig, ax = figure(title, xlabel, ylabel, logx=logx, logy=logy)
    for name, part in df.groupby(hue, sort=False):
        part = part.sort_values(x)
        if errors:
            lo, hi = errors
            yerr = [(part[y] - part[lo]).clip(lower=0), (part[hi] - part[y]).clip(lower=0)]
            ax.errorbar(part[x], part[y], yerr=yerr, marker=marker, capsize=3, label=str(name))
        else:
            ax.plot(part[x], part[y], marker=marker, label=str(name))
    # outside the axes: never on top of a line, whatever the data looks like
    ax.legend(title=legend_title or hue, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def bars(
    labels,
    values,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logy: bool = False,
    horizontal: bool = False,
    annotate: str | None = "{:,.0f}",
    colors=None,
):
    """A bar chart with each bar's value written on it."""
    fig, ax = figure(title, xlabel, ylabel, logy=logy and not horizontal, logx=logy and horizontal)
    labels = [str(v) for v in labels]
    colors = colors or PALETTE[0]
    if horizontal:
        b = ax.barh(labels, values, color=colors)
        ax.invert_yaxis()
        ax.grid(axis="y", visible=False)
    else:
        b = ax.bar(labels, values, color=colors)
        ax.grid(axis="x", visible=False)
        if max(len(s) for s in labels) > 8:
            plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    if annotate:
        ax.bar_label(b, labels=[annotate.format(v) for v in values], padding=2, fontsize=9)
    fig.tight_layout()
    return fig


def heatmap(
    matrix: pd.DataFrame,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    fmt: str = "{}",
    cmap: str = "RdYlGn_r",
    vmin=None,
    vmax=None,
    cbar_label: str | None = None,
):
    """A labelled heatmap; booleans show as ✗ (True, e.g. conflicts) and · (False)."""
    values = matrix.to_numpy()
    is_bool = values.dtype == bool
    numeric = values.astype(float)
    fig, ax = figure(title, xlabel, ylabel, size=(1.0 + 0.9 * matrix.shape[1], 1.2 + 0.6 * matrix.shape[0]))
    im = ax.imshow(numeric, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(matrix.shape[1]), [str(c) for c in matrix.columns], rotation=35, ha="right")
    ax.set_yticks(range(matrix.shape[0]), [str(i) for i in matrix.index])
    ax.grid(False)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            v = values[i, j]
            label = ("✗" if v else "·") if is_bool else fmt.format(v)
            ax.text(
                j,
                i,
                label,
                ha="center",
                va="center",
                fontsize=9,
                color="white"
                if not is_bool and np.isfinite(numeric[i, j]) and im.norm(numeric[i, j]) > 0.6
                else "black",
            )
    if not is_bool:
        cb = fig.colorbar(im, ax=ax)
        if cbar_label:
            cb.set_label(cbar_label)
    fig.tight_layout()
    return fig


def save(fig, name: str) -> str:
    """Write ``output/plots/<name>.png``; returns the path."""
    path = output_dir("plots") / f"{name}.png"
    write_whole(path, lambda fh: fig.savefig(fh, format="png"))
    return str(path)


def show(fig, name: str) -> None:
    """Save ``fig`` as ``output/plots/<name>.png`` (``save``), display that file, and close the figure.

    The figure is rendered once, for the file, and the notebook shows exactly what was saved.
    """
    from IPython.display import Image, display

    path = save(fig, name)
    plt.close(fig)
    display(Image(filename=path))
