"""Figures for the HTML report, drawn with matplotlib and inlined as SVG (the report works offline)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ehrmem.stats import roc_curve  # noqa: E402

MEMBER_COLOR, NONMEMBER_COLOR = "#c0392b", "#2471a3"


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.find("<svg") :]


def roc_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """ROC curves with a log-scale false-positive rate, plus the chance diagonal.

    ``curves`` maps an attack name to (labels, scores). On a log axis FPR = 0 cannot be drawn, so the axis
    starts at half the smallest resolvable FPR (1 / (2 n_nonmembers)).
    """
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    floor = 1.0
    for name, (y, s) in curves.items():
        roc = roc_curve(y, s)
        f = 1 / (2 * roc.n_neg)
        floor = min(floor, f)
        ax.step(np.maximum(roc.fpr, f), roc.tpr, where="post", label=name, lw=1.6)
    grid = np.logspace(np.log10(floor), 0, 100)
    ax.plot(grid, grid, ls="--", color="grey", lw=1, label="chance")
    ax.set_xscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false-positive rate (log scale)")
    ax.set_ylabel("true-positive rate")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    return _svg(fig)


def distribution_plot(labels: np.ndarray, scores: np.ndarray, title: str) -> str:
    """Histograms of one score for members and non-members (densities, shared bins)."""
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    bins = np.histogram_bin_edges(scores, bins=min(30, max(5, len(scores) // 4)))
    ax.hist(
        scores[labels == 1],
        bins=bins,
        density=True,
        alpha=0.55,
        color=MEMBER_COLOR,
        label=f"members (n={int((labels == 1).sum())})",
    )
    ax.hist(
        scores[labels == 0],
        bins=bins,
        density=True,
        alpha=0.55,
        color=NONMEMBER_COLOR,
        label=f"non-members (n={int((labels == 0).sum())})",
    )
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("score (higher = more likely member)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    return _svg(fig)
