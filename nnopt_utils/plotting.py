"""The book's plotting theme and the few plot types chapters share.

Conventions: a colourblind-safe palette; theory drawn as dashed black lines, measurement
as coloured markers or solid lines, so the two are distinguishable without colour.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

__all__ = ["set_theme", "palette", "THEORY", "theory_line", "heatmap", "new_axes"]

#: style of every theoretical curve in the book
THEORY = dict(color="black", linestyle="--", linewidth=1.4)


def set_theme() -> None:
    """Install the book's seaborn theme (colourblind palette, readable sizes)."""
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    matplotlib.rcParams.update(
        {
            "figure.figsize": (6.4, 3.8),
            "figure.dpi": 100,
            "savefig.dpi": 150,
            "axes.titlesize": "medium",
            "legend.frameon": False,
            "figure.autolayout": True,
        }
    )


def palette(n: int) -> list:
    """``n`` colourblind-safe colours."""
    return sns.color_palette("colorblind", n)


def new_axes(ncols: int = 1, nrows: int = 1, width: float = 4.2, height: float = 3.4, **kw):
    """A figure with ``nrows x ncols`` axes sized for the book's page."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), **kw)
    return fig, axes


def theory_line(ax, x, y, label: str = "theory", **kw):
    """Draw a theoretical curve in the book's theory style."""
    style = {**THEORY, **kw}
    return ax.plot(x, y, label=label, **style)


def heatmap(ax, values, xticklabels: Sequence, yticklabels: Sequence, *, xlabel: str,
            ylabel: str, cbar_label: str, fmt: str = ".2f", annot: bool = True,
            cmap: str = "viridis", **kw):
    """An annotated heatmap with labelled axes and colour bar (rows = y, columns = x)."""
    values = np.asarray(values, dtype=float)
    sns.heatmap(values, ax=ax, xticklabels=xticklabels, yticklabels=yticklabels,
                annot=annot, fmt=fmt, cmap=cmap, cbar_kws={"label": cbar_label}, **kw)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return ax
