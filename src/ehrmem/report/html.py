"""Rendering ``report.html``: one self-contained page (inline SVG and CSS, no network access).

The page shows aggregate results only; it never reproduces a patient's record.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from jinja2 import Environment, PackageLoader, select_autoescape

from ehrmem.report import plots


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
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


def render_html(report: dict, run_dir: str | Path) -> str:
    env = Environment(loader=PackageLoader("ehrmem.report", "templates"), autoescape=select_autoescape())
    env.filters["fmt"] = _fmt
    env.filters["pct"] = lambda x: "—" if x is None else f"{100 * x:.1f}%"
    template = env.get_template("report.html.j2")
    figures = {"T4": _t4_figures(report, Path(run_dir))}
    return template.render(report=report, figures=figures, np=np)


def write_html(report: dict, run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    fp = run_dir / "report.html"
    tmp = fp.with_name(f".report.html.tmp-{os.getpid()}")
    tmp.write_text(render_html(report, run_dir), encoding="utf-8")
    os.replace(tmp, fp)
    return fp
