"""T6 patients and subgroups on a small, hand-built MEDS dataset and stand-in T1/T2/T4 results."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ehrmem.audits.base import AuditContext
from ehrmem.audits.base import TestResult as Result
from ehrmem.audits.patients import PatientsAudit, PatientsConfig, age_band, json_clean, rank_normalise
from ehrmem.data.cohort import build_cohort
from ehrmem.data.meds import load_meds

MEMBERS = list(range(1, 37))  # train
NONMEMBERS = list(range(37, 61))  # held_out
OLD = {57, 58, 59, 60}  # non-members aged 95: the 90+ band has one class only
CHILDREN = {1, 2, 3, 37, 38}  # 3 members and 2 non-members under 18: too small
CLONES = set(range(1, 11)) | {41, 43}  # identical first events
HIV = "DIAGNOSIS//ICD//10//B20"
TOP = 4  # the subject built to be the most exposed (a member holding HIV)
CODES = ["LAB//A//mg", "LAB//B//mg", "DIAGNOSIS//ICD//10//I10", "MEDICATION//X", "PROCEDURE//ICD//9//8854"]


def _write(root: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = {"train": [], "held_out": []}
    clone_events = [str(c) for c in rng.choice(CODES, size=12)]
    for sid in MEMBERS + NONMEMBERS:
        split = "train" if sid in MEMBERS else "held_out"
        r = rows[split]
        r.append((sid, None, "GENDER//" + ("F" if sid % 2 else "M"), None))
        t = datetime(2100, 1, 1) + timedelta(days=sid)
        age = 95 if sid in OLD else 10 if sid in CHILDREN else 30 + sid % 40
        r.append((sid, t - timedelta(days=int(365.25 * age) + 30), "MEDS_BIRTH", None))
        n = 15 + (sid * 7) % 25
        codes = (
            clone_events + [str(c) for c in rng.choice(CODES, size=n)]
            if sid in CLONES
            else [str(c) for c in rng.choice(CODES, size=n)]
        )
        if sid % 2 == 0:
            codes.append(HIV)
        if sid in (1, 2):
            codes.append("LAB//RARE1")
        if sid == 40:
            codes.append("LAB//NEVER_TRAINED")
        for c in codes:
            t += timedelta(hours=1)
            r.append((sid, t, c, 1.0 if c.startswith("LAB") else None))
    schema = {"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float32}
    for split, r in rows.items():
        (root / "data" / split).mkdir(parents=True, exist_ok=True)
        pl.DataFrame(r, schema=schema, orient="row").write_parquet(root / "data" / split / "0.parquet")
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    pl.DataFrame(
        {"subject_id": MEMBERS + NONMEMBERS, "split": ["train"] * len(MEMBERS) + ["held_out"] * len(NONMEMBERS)}
    ).write_parquet(root / "metadata" / "subject_splits.parquet")
    (root / "metadata" / "dataset.json").write_text('{"dataset_name": "t6"}')
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    ds = load_meds(_write(tmp_path_factory.mktemp("t6") / "meds"))
    cohort = build_cohort(
        ds, None, membership="splits", member_splits=["train"], nonmember_splits=["held_out"], match_length=False
    )
    return ds, cohort


def _previous(cohort, *, which=("T1", "T2", "T4")) -> dict[str, Result]:
    rng = np.random.default_rng(1)
    a = cohort.audited
    ids, mem = a["subject_id"].to_list(), a["member"].to_list()
    out: dict[str, Result] = {}
    loss = [float(m + rng.normal()) for m in mem]
    loss[ids.index(TOP)] = 100.0
    out["T4"] = Result(
        "T4",
        "Membership inference",
        "ok",
        "stand-in",
        section={"best_attack": "loss", "attacks": {}},
        tables={"membership_scores": pl.DataFrame({"subject_id": ids, "member": mem, "loss": loss})},
    )
    rows = []
    for s, m in zip(ids, mem, strict=True):
        for k in (0, 10):
            lift = 100.0 if s == TOP else 0.3 * m + 0.1 * rng.random()
            rows.append(
                {
                    "subject_id": s,
                    "member": m,
                    "tier": "static" if k == 0 else "10",
                    "k_events": k,
                    "emd_mean": 10.0 * (1 - min(lift, 0.99)) if s != TOP else 0.0,
                    "baseline_emd_mean": 10.0,
                }
            )
    out["T1"] = Result(
        "T1", "Reconstruction", "ok", "stand-in", section={"tiers": []}, tables={"reconstruction": pl.DataFrame(rows)}
    )
    rows = []
    for s, m in zip(ids, mem, strict=True):
        has = int(s % 2 == 0)
        share = 1.0 if s == TOP else float(rng.random() * 0.5)
        rows.append(
            {
                "subject_id": s,
                "member": m,
                "category": "hiv",
                "tier": "static",
                "k_events": 0,
                "share": share,
                "label": has,
                "prompt_cut": False,
            }
        )
    out["T2"] = Result(
        "T2",
        "Sensitive attributes",
        "ok",
        "stand-in",
        section={"categories": {"hiv": {"unconditioned_rate": 0.1, "harm_tier": "stigmatised"}}, "settings": {}},
        tables={"sensitive": pl.DataFrame(rows)},
    )
    return {k: v for k, v in out.items() if k in which}


def _run(dataset, previous, **cfg) -> Result:
    ds, cohort = dataset
    ctx = AuditContext(
        dataset=ds,
        model=None,
        tokenizer=None,
        cohort=cohort,
        encoded={},
        manifest=None,
        model_dir=None,
        previous=previous,
    )
    settings = {"n_bootstrap": 100, "tiers": [0, 10], **cfg}
    return PatientsAudit(ctx, PatientsConfig(**settings)).run().result


def _group(result: Result, kind: str, name: str) -> dict:
    return next(g for g in result.section["subgroups"] if g["kind"] == kind and g["name"] == name)


def _numbers(obj, path=""):
    """Every float anywhere in a nested structure (counts are ints and do not count)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, float):
        yield path, obj


def test_helpers():
    assert rank_normalise({1: 5.0, 2: 1.0, 3: 1.0, 4: 9.0}) == {1: 2 / 3, 2: 0.0, 3: 0.0, 4: 1.0}
    assert age_band(89.9, [18, 40, 65, 90]) == "65-89"
    assert age_band(90.0, [18, 40, 65, 90]) == "90+ (over 89)"
    assert age_band(None, [18, 40, 65, 90]) == "unknown"
    assert json_clean({"a": np.float32(1.5), "b": float("nan"), "c": [np.int64(2), np.bool_(True)]}) == {
        "a": 1.5,
        "b": None,
        "c": [2, True],
    }


def test_groups_below_min_size_or_with_one_class_print_no_number(dataset):
    r = _run(dataset, _previous(dataset[1]))
    assert r.status == "ok", r.reason
    old = _group(r, "age", "90+ (over 89)")
    assert (old["n_members"], old["n_nonmembers"]) == (0, 4)
    assert old["status"] == "undefined" and "one class" in old["reason"]
    young = _group(r, "age", "<18")
    assert (young["n_members"], young["n_nonmembers"]) == (3, 2)
    assert young["status"] == "undefined" and "at least 10" in young["reason"]
    rare = _group(r, "rare_codes", "holds a code held by <= 5 training patients")
    # two members with a rare code, and one non-member with a code no training patient holds
    assert (rare["n_members"], rare["n_nonmembers"]) == (2, 1) and rare["status"] == "undefined"
    for g in (old, young, rare):
        assert list(_numbers(g)) == [], g
        assert g["membership_auc"] is None and g["leakage_auc"] is None and g["leakage_mean"] is None
    table = r.tables["subgroups"].filter(pl.col("status") == "undefined")
    assert table.height >= 3
    assert table.select(pl.col("membership_auc", "membership_auc_lo", "leakage_auc").null_count()).row(0) == (
        table.height,
        table.height,
        table.height,
    )
    # groups large enough in both classes do get numbers with intervals
    f = _group(r, "sex", "F")
    assert f["status"] == "ok"
    auc = f["membership_auc"]
    assert auc["status"] == "ok" and 0.0 <= auc["auc_ci95"][0] <= auc["auc"] <= auc["auc_ci95"][1] <= 1.0
    assert f["leakage_mean"]["members"]["mean"] > f["leakage_mean"]["nonmembers"]["mean"]
    hiv = _group(r, "sensitive_category", "hiv")
    assert (hiv["n_members"], hiv["n_nonmembers"]) == (18, 12) and hiv["status"] == "ok"
    assert _group(r, "sensitive_category", "cancer")["status"] == "undefined"
    json.dumps(r.section, allow_nan=False)  # JSON-ready: no numpy types, no NaN


def test_min_group_size_decides_but_one_class_is_always_undefined(dataset):
    r = _run(dataset, _previous(dataset[1]), min_group_size=2)
    assert _group(r, "age", "<18")["status"] == "ok"
    assert _group(r, "age", "<18")["membership_auc"]["auc"] is not None
    assert _group(r, "age", "90+ (over 89)")["status"] == "undefined"


def test_risk_score_and_most_exposed_patients(dataset):
    r = _run(dataset, _previous(dataset[1]), top_n=3)
    sec = r.section
    assert sec["risk_score"]["components_used"] == ["T1", "T2", "T4"]
    top = sec["top_patients"]
    assert len(top) == 3
    assert top[0]["subject_id"] == TOP and top[0]["risk_score"] == pytest.approx(1.0) and top[0]["rank"] == 1
    assert top[0]["components"] == {"T1": 1.0, "T2": 1.0, "T4": 1.0}
    assert top[0]["categories_revealed"] == ["hiv"] and "hiv" in top[0]["sensitive_categories"]
    assert not any("//" in c for t in top for c in t["sensitive_categories"])  # category names, never codes
    assert set(top[0]) == {
        "rank",
        "subject_id",
        "member",
        "risk_score",
        "components",
        "sensitive_categories",
        "categories_revealed",
    }
    assert [t["risk_score"] for t in top] == sorted((t["risk_score"] for t in top), reverse=True)
    table = r.tables["patient_risk"]
    assert table.height == 60 and table["risk_score"].min() >= 0 and table["risk_score"].max() <= 1
    even = table.filter(pl.col("subject_id") == 2).row(0, named=True)
    assert "hiv" in even["sensitive_categories"] and even["age_band"] == "<18" and even["sex"] == "M"
    assert table.filter(pl.col("subject_id") == 57)["age_band"].item() == "90+ (over 89)"


def test_missing_and_skipped_tests_are_said_and_worked_around(dataset):
    prev = _previous(dataset[1], which=("T4",))
    prev["T1"] = Result("T1", "Reconstruction", "skipped", "disabled in the configuration")
    r = _run(dataset, prev)
    assert r.status == "ok"
    assert r.section["risk_score"]["components_used"] == ["T4"]
    assert r.section["sources"]["T1"]["status"] == "skipped" and not r.section["sources"]["T1"]["used"]
    assert r.section["sources"]["T2"]["status"] == "missing"
    assert any("T1" in n and "skipped" in n for n in r.section["notes"])
    f = _group(r, "sex", "F")
    assert f["membership_auc"]["status"] == "ok"
    assert f["leakage_auc"]["status"] == "undefined" and "not available" in f["leakage_auc"]["reason"]
    json.dumps(r.section, allow_nan=False)

    none = _run(dataset, {})
    assert none.status == "undefined" and "T1, T2 and T4" in none.reason
    assert none.section["top_patients"] == []
    assert all(g["status"] == "undefined" for g in none.section["subgroups"])
    assert not [p for g in none.section["subgroups"] for p in _numbers(g)]


def test_uniqueness_counts_identical_prompts_and_nearest_neighbours(dataset):
    r = _run(dataset, _previous(dataset[1]))
    t = r.tables["patient_risk"]
    row = {s: t.filter(pl.col("subject_id") == s).row(0, named=True) for s in (1, 2, 41, 11)}
    # Tier 10: static codes + first 10 events. Odd clones 1,3,5,7,9 are F members, 41 and 43 F non-members.
    assert row[1]["n_sharing_prompt_10"] == 4  # the other four F member clones
    assert row[41]["n_sharing_prompt_10"] == 5  # all five F member clones
    assert row[2]["n_sharing_prompt_10"] == 4  # M member clones 4, 6, 8, 10
    assert row[1]["nn_distance_10"] == pytest.approx(0.0, abs=1e-9)
    assert row[11]["nn_distance_10"] > 0
    # Static tier: everyone of a sex shares GENDER + nothing else (MEDS_BIRTH is a timed event).
    assert row[1]["n_sharing_prompt_static"] == sum(1 for s in MEMBERS if s % 2) - 1
    tiers = {e["tier"]: e for e in r.section["uniqueness"]["by_tier"]}
    corr = tiers["10"]["correlation_among_members"]
    assert set(corr) == {
        "n_sharing_vs_t1_lift",
        "nn_distance_vs_t1_lift",
        "n_sharing_vs_risk_score",
        "nn_distance_vs_risk_score",
    }
    c = corr["nn_distance_vs_t1_lift"]
    assert c["status"] == "ok" and -1 <= c["rho"] <= 1 and c["n"] == 36
    # static tier: n_sharing is the same for every member of a sex, not constant overall; still well-defined
    assert tiers["static"]["members"]["n"] == 36
