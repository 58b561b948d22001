"""Positive and negative controls of T4 on the real MIMIC-IV demo (slow: they train real models).

Run with ``make test-slow``. Figures are printed so they can be quoted.
"""

from __future__ import annotations

import json

import pytest

from ehrmem.api import run_audit
from ehrmem.config import AuditConfig
from ehrmem.data.meds import load_meds
from ehrmem.models.train import TrainConfig, train_reference_model

pytestmark = pytest.mark.slow


def _best(report: dict) -> dict:
    t4 = report["tests"]["T4"]
    return t4["attacks"][t4["best_attack"]]


def test_positive_control_overfit_model_is_detected(demo_data, tmp_path):
    """A model trained until it overfits: membership AUC >= 0.9, and the interval excludes chance."""
    ds = load_meds(demo_data)
    model = train_reference_model(ds, tmp_path / "overfit", TrainConfig(epochs=60, max_events=150))
    report = run_audit(demo_data, model, tmp_path / "run", AuditConfig())
    print(json.dumps({k: (a["auc"], a["auc_ci95"]) for k, a in report["tests"]["T4"]["attacks"].items()}))
    best = _best(report)
    assert best["auc"] >= 0.9
    assert best["auc_ci95"][0] > 0.5
    # the plain loss attack, which needs no reference, must find it too
    assert report["tests"]["T4"]["attacks"]["loss"]["auc_ci95"][0] > 0.5


def test_negative_control_unseen_splits_are_indistinguishable(demo_data, tmp_path):
    """A model trained only on `tuning`; `train` vs `held_out`, neither seen: every interval contains 0.5."""
    ds = load_meds(demo_data)
    model = train_reference_model(ds, tmp_path / "tuning-only", TrainConfig(splits=["tuning"]))
    cfg = AuditConfig(membership="splits", member_splits=["train"], nonmember_splits=["held_out"])
    report = run_audit(demo_data, model, tmp_path / "run", cfg)
    attacks = report["tests"]["T4"]["attacks"]
    print(json.dumps({k: (a["auc"], a["auc_ci95"]) for k, a in attacks.items()}))
    assert any("negative control" in w for w in report["warnings"])
    for name, a in attacks.items():
        assert a["status"] == "ok", name
        assert a["auc_ci95"][0] <= 0.5 <= a["auc_ci95"][1], (name, a["auc"], a["auc_ci95"])
