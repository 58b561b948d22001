"""Rendering ``report.html``: one self-contained page (inline SVG and CSS, no network access).

The page shows aggregate results only; it never reproduces a patient's record.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from jinja2 import Environment, PackageLoader, Undefined, select_autoescape

from ehrmem.report import plots


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or isinstance(x, Undefined):
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _t4_figures(report: dict, run_dir: Path) -> dict[str, Any]:
    t4 = report["tests"].get("T4", {})
    fp = run_dir / "T4_membership_scores.parquet"
    if t4.get("status") != "ok" or not fp.exists():
        return {}
    table = pl.read_parquet(fp)
    curves, dists = {}, {}
    for name, a in t4["attacks"].items():
        if a["status"] != "ok" or name not in table.columns:
            continue
        sub = table.filter(pl.col(name).is_not_null())
        y, s = sub["member"].to_numpy(), sub[name].to_numpy().astype(float)
        curves[name] = (y, s)
        dists[name] = plots.distribution_plot(y, s, name)
    return {"roc": plots.roc_plot(curves) if curves else None, "distributions": dists}


def _t1_figures(report: dict) -> dict[str, Any]:
    t1 = report["tests"].get("T1", {})
    if t1.get("status") != "ok" or not t1.get("tiers"):
        return {}
    return {"tiers": plots.tier_curve(t1["tiers"])}


def _last_tier(by_tier: dict) -> str | None:
    return list(by_tier)[-1] if by_tier else None


def _t2_figures(report: dict) -> dict[str, Any]:
    t2 = report["tests"].get("T2", {})
    if t2.get("status") != "ok":
        return {}
    rows = []
    for name, c in t2["categories"].items():
        tier = _last_tier(c.get("by_tier", {}))
        if tier is None:
            continue
        for who in ("members", "nonmembers"):
            e = c["by_tier"][tier][who]
            ok = e.get("status") == "ok"
            rows.append((f"{name} ({who}, tier {tier})", e.get("auroc") if ok else None, e.get("auroc_ci95")))
    return {"forest": plots.forest_plot(rows, "AUROC of the generated category (0.5 = chance)")} if rows else {}


def _t3_best(t3: dict) -> list[dict[str, Any]]:
    """Per category, the probe and tier with the highest unseen-member AUROC, beside its baselines."""
    out = []
    for name, c in t3.get("categories", {}).items():
        best = None
        for tier, probes in c.get("by_tier", {}).items():
            for probe, e in probes.items():
                m = e.get("members", {})
                if m.get("status") == "ok" and (best is None or m["auroc"] > best["members"]["auroc"]):
                    best = {"tier": tier, "probe": probe, **e}
        out.append({"category": name, "harm_tier": c.get("harm_tier"), "best": best})
    return out


def _t3_figures(report: dict) -> dict[str, Any]:
    t3 = report["tests"].get("T3", {})
    if t3.get("status") != "ok":
        return {}
    best = _t3_best(t3)
    rows: list[tuple[str, float | None, list[float] | None]] = []
    for b in best:
        e = b["best"]
        if e is None:
            rows.append((f"{b['category']}", None, None))
            continue
        for key, label in (("members", "unseen members"), ("bag_of_codes_members", "bag of codes")):
            m = e.get(key, {})
            ok = m.get("status") == "ok"
            rows.append((f"{b['category']} ({label})", m.get("auroc") if ok else None, m.get("auroc_ci95")))
    return {
        "best": best,
        "forest": plots.forest_plot(rows, "probe AUROC (0.5 = chance)") if rows else None,
    }


def _t6_figures(report: dict) -> dict[str, Any]:
    t6 = report["tests"].get("T6", {})
    if t6.get("status") != "ok" or not t6.get("subgroups"):
        return {}
    rows = []
    for g in t6["subgroups"]:
        m = g.get("membership_auc") or {}
        ok = g.get("status") == "ok" and m.get("status") == "ok"
        rows.append((f"{g['kind']}: {g['name']} (n={g['n']})", m.get("auc") if ok else None, m.get("auc_ci95")))
    return {"forest": plots.forest_plot(rows, "membership AUC (0.5 = chance)")}


def render_html(report: dict, run_dir: str | Path) -> str:
    env = Environment(loader=PackageLoader("ehrmem.report", "templates"), autoescape=select_autoescape())
    env.filters["fmt"] = _fmt
    env.filters["pct"] = lambda x: "—" if x is None or isinstance(x, Undefined) else f"{100 * x:.1f}%"
    template = env.get_template("report.html.j2")
    figures = {
        "T1": _t1_figures(report),
        "T2": _t2_figures(report),
        "T3": _t3_figures(report),
        "T4": _t4_figures(report, Path(run_dir)),
        "T6": _t6_figures(report),
    }
    return template.render(report=report, figures=figures, np=np)


def write_html(report: dict, run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    fp = run_dir / "report.html"
    tmp = fp.with_name(f".report.html.tmp-{os.getpid()}")
    tmp.write_text(render_html(report, run_dir), encoding="utf-8")
    os.replace(tmp, fp)
    return fp
