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
    # matplotlib's stubs type ``bins`` as Sequence[float], but its hist accepts an array of edges (np.histogram).
    bins = np.histogram_bin_edges(scores, bins=min(30, max(5, len(scores) // 4)))
    ax.hist(
        scores[labels == 1],
        bins=bins,  # type: ignore[arg-type]
        density=True,
        alpha=0.55,
        color=MEMBER_COLOR,
        label=f"members (n={int((labels == 1).sum())})",
    )
    ax.hist(
        scores[labels == 0],
        bins=bins,  # type: ignore[arg-type]
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


def tier_curve(tiers: list[dict]) -> str:
    """T1: leakage against attacker knowledge.

    Left: mean event-sequence distance of sampled continuations to the true future (lower = closer) for
    members, non-members and the unconditioned population baseline, with 95% intervals. Right: the
    membership AUC of that distance per tier with its interval.
    """
    names = [str(t["tier"]) for t in tiers]
    x = np.arange(len(names))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9.0, 3.6))
    for key, color, label, dx in (
        ("members", MEMBER_COLOR, "members", -0.06),
        ("nonmembers", NONMEMBER_COLOR, "non-members", 0.06),
        ("baseline", "grey", "population baseline", 0.0),
    ):
        m = np.array([t[key]["mean"] if t[key]["mean"] is not None else np.nan for t in tiers], dtype=float)
        lo = np.array([t[key]["ci95"][0] if t[key].get("ci95") else np.nan for t in tiers], dtype=float)
        hi = np.array([t[key]["ci95"][1] if t[key].get("ci95") else np.nan for t in tiers], dtype=float)
        ax.errorbar(
            x + dx,
            m,
            yerr=[m - lo, hi - m],
            fmt="o-" if key != "baseline" else "s--",
            color=color,
            label=label,
            capsize=3,
            lw=1.4,
        )
    ax.set_xticks(x, names)
    ax.set_xlabel("attacker knowledge (events in the prompt)")
    ax.set_ylabel("distance to the true future (lower = closer)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    auc = np.array([t["membership_auc"].get("auc") or np.nan for t in tiers], dtype=float)
    ci = [t["membership_auc"].get("auc_ci95") or [np.nan, np.nan] for t in tiers]
    lo = np.array([c[0] for c in ci], dtype=float)
    hi = np.array([c[1] for c in ci], dtype=float)
    ax2.errorbar(x, auc, yerr=[auc - lo, hi - auc], fmt="o-", color="black", capsize=3)
    ax2.axhline(0.5, ls="--", color="grey", lw=1)
    ax2.set_xticks(x, names)
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("attacker knowledge (events in the prompt)")
    ax2.set_ylabel("membership AUC of the distance")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return _svg(fig)


def forest_plot(rows: list[tuple[str, float | None, list[float] | None]], xlabel: str, ref: float = 0.5) -> str:
    """Point estimates with 95% intervals, one row each; rows without a number are drawn as 'undefined'."""
    fig, ax = plt.subplots(figsize=(6.4, 0.32 * max(3, len(rows)) + 0.8))
    y = np.arange(len(rows))[::-1]
    for yi, (_, est, ci) in zip(y, rows, strict=True):
        if est is None:
            ax.text(ref, yi, "undefined", va="center", ha="center", fontsize=7, color="#b35900")
            continue
        if ci is not None:
            ax.plot(ci, [yi, yi], color="black", lw=1.2)
        ax.plot([est], [yi], "o", color=MEMBER_COLOR, ms=5)
    ax.axvline(ref, ls="--", color="grey", lw=1)
    ax.set_yticks(y, [r[0] for r in rows], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return _svg(fig)
