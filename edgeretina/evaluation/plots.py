"""The evaluation plots as PNG bytes: confusion matrix, reliability diagram, referable ROC.

matplotlib is the optional `plot` extra, imported only when a plot is drawn; figures are drawn on the Agg
canvas without pyplot (no global state, never a display). Every function raises MissingDependencyError
without matplotlib.
"""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass

import numpy as np

from edgeretina.errors import MissingDependencyError
from edgeretina.grades import GRADES


@dataclass(frozen=True, eq=False)
class RocCurve:
    name: str
    fpr: np.ndarray
    tpr: np.ndarray
    auc: float | None
    operating_point: tuple[float, float] | None   # (1 - specificity, sensitivity) of the referable decision


def confusion_png(matrix: list[list[int]], title: str) -> bytes:
    """Heatmap of counts, rows true grade, columns predicted grade, ICDR names on the axes. The colour is
    the share of the row (the recall of each true grade), so a rare grade reads as clearly as a common one."""
    counts = np.asarray(matrix, dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    figure = _figure((7.2, 6.4))
    axes = figure.subplots()
    image = axes.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for (i, j), count in np.ndenumerate(counts):
        axes.text(j, i, f"{count}\n{100 * share[i, j]:.0f}%", ha="center", va="center", fontsize=9,
                  color="white" if share[i, j] > 0.5 else "black")
    names = [textwrap.fill(f"{g.value} {g.name}", 16) for g in GRADES[:len(counts)]]
    axes.set_xticks(range(len(counts)), names, fontsize=8, rotation=30, ha="right")
    axes.set_yticks(range(len(counts)), names, fontsize=8)
    axes.set_xlabel("predicted grade")
    axes.set_ylabel("true grade")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true grade")
    return _png(figure)


def reliability_png(bins: dict, ece: float, title: str) -> bytes:
    """Bars of accuracy per confidence bin (from `metrics.reliability_bins`), the mean confidence of each
    bin as a dot, the diagonal of perfect calibration, ECE in the title, case counts along the top."""
    edges = np.asarray(bins["edges"])
    width = np.diff(edges)
    filled = [i for i, count in enumerate(bins["count"]) if count > 0]
    figure = _figure((6.4, 6.0))
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    axes.bar(edges[:-1][filled], [bins["accuracy"][i] for i in filled], width=width[filled], align="edge",
             color="tab:blue", edgecolor="white", alpha=0.8, label="accuracy")
    centres = edges[:-1] + width / 2
    axes.scatter(centres[filled], [bins["confidence"][i] for i in filled], color="tab:red", s=14, zorder=3,
                 label="mean confidence")
    for i in filled:
        axes.annotate(str(bins["count"][i]), (centres[i], 1.0), textcoords="offset points", xytext=(0, 3),
                      ha="center", fontsize=7, color="dimgrey")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.06)
    axes.set_xlabel("confidence (top grade probability)")
    axes.set_ylabel("accuracy")
    axes.set_title(f"{title}  ECE {ece:.3f}")
    axes.legend(loc="upper left", bbox_to_anchor=(0.0, 0.95), fontsize=8)   # below the counts
    return _png(figure)


def roc_png(curves: list[RocCurve], title: str) -> bytes:
    """One ROC per mode (AUC in the legend) with its operating point marked; the chance diagonal."""
    figure = _figure((6.4, 6.0))
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    for index, curve in enumerate(curves):
        colour = f"C{index % 10}"
        auc = "n/a" if curve.auc is None else f"{curve.auc:.3f}"
        axes.plot(curve.fpr, curve.tpr, color=colour, label=f"{curve.name}  AUC {auc}")
        if curve.operating_point is not None:
            fpr, tpr = curve.operating_point
            axes.scatter([fpr], [tpr], color=colour, marker="o", s=50, edgecolors="black", zorder=3,
                         label=f"{curve.name} operating point (sens {tpr:.2f}, spec {1 - fpr:.2f})")
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    axes.set_xlabel("1 - specificity")
    axes.set_ylabel("sensitivity")
    axes.set_title(title)
    axes.legend(loc="lower right", fontsize=8)
    axes.grid(True, alpha=0.3)
    return _png(figure)


def _figure(size: tuple[float, float]):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("matplotlib", "plot", "the evaluation plots") from None
    figure = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
