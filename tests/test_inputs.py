"""Inputs a user gets wrong, and reruns: each is refused early with a message naming the file, and nothing
already computed is lost or silently reused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from ehrmem.api import _inputs_digest, run_audit
from ehrmem.config import load_config
from ehrmem.errors import InputError

EHRMEM = [sys.executable, "-m", "ehrmem.cli", "-q"]
FAST = {
    "check_sample": 2,
    "sampling": {"n_samples": 2, "horizon_events": 3, "population_samples": 4},
    "T1": {"tiers": [0, 5], "n_bootstrap": 100, "min_per_class": 2, "greedy_extraction": False},
    "T2": {"enabled": False},
    "T3": {"enabled": False},
    "T4": {"n_bootstrap": 100, "min_per_class": 2, "masking": {"enabled": False}},
    "T5": {"enabled": False},
    "T6": {"enabled": False},
}


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*EHRMEM, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> tuple[Path, Path]:
    data, model = tiny_model_dir
    dst = tmp_path / "model"
    shutil.copytree(model, dst)
    return data, dst


def test_a_rerun_that_fails_on_its_inputs_keeps_the_finished_report(model_copy, tmp_path):
    data, model = model_copy
    run = tmp_path / "run"
    run_audit(data, model, run, load_config(**FAST))
    before = (run / "report.json").read_text()
    with pytest.raises(InputError, match="does not exist"):
        run_audit(tmp_path / "no-such-data", model, run, load_config(**FAST))
    assert (run / "report.json").read_text() == before and (run / "report.html").exists()


def test_finished_stages_are_not_reused_after_the_labels_or_vocabulary_change(model_copy, tmp_path):
    """The training manifest holds the membership labels; the vocabulary maps codes to the weights' rows."""
    data, model = model_copy
    cfg = load_config(**FAST)
    d0 = _inputs_digest(model, cfg)
    fp = model / "training_manifest.json"
    manifest = json.loads(fp.read_text())
    manifest["trained_subjects"] = manifest["trained_subjects"][:-1]
    fp.write_text(json.dumps(manifest))
    d1 = _inputs_digest(model, cfg)
    assert d1 != d0
    cat = tmp_path / "extra.yaml"
    cat.write_text("categories:\n  med_x: {tier: serious, codes: ['MEDICATION//X']}\n")
    with_cat = load_config(**{**FAST, "T2": {"enabled": False, "catalogue_extend": [str(cat)]}})
    d2 = _inputs_digest(model, with_cat)
    cat.write_text("categories:\n  med_y: {tier: serious, codes: ['MEDICATION//X']}\n")
    assert _inputs_digest(model, with_cat) != d2  # same path, other contents

    run = tmp_path / "run"
    run_audit(data, model, run, cfg)
    manifest["trained_subjects"] = manifest["trained_subjects"][:-2]
    fp.write_text(json.dumps(manifest))
    again = run_audit(data, model, run, cfg)
    assert again["tests"]["T4"]["n_members"] == again["cohort"]["n_members"]
    t4 = pl.read_parquet(run / "T4_membership_scores.parquet")
    assert set(t4.filter(pl.col("member") == 1)["subject_id"]) <= set(manifest["trained_subjects"])


def test_a_vocabulary_in_another_order_is_refused(model_copy, tmp_path):
    data, model = model_copy
    vocab = pl.read_parquet(model / "vocab.parquet")
    codes = vocab["code"].to_list()
    head, tail = codes[:4], codes[4:]
    shuffled = vocab.with_columns(pl.Series("code", head + tail[::-1]))
    shuffled.write_parquet(model / "vocab.parquet")
    with pytest.raises(InputError, match="not the one the model was trained with"):
        run_audit(data, model, tmp_path / "run", load_config(**FAST))


def test_a_model_trained_on_other_data_is_refused(tiny_model_dir, tmp_path):
    from conftest import write_meds

    _, model = tiny_model_dir
    other = write_meds(tmp_path / "other", n_subjects=30, codes=["LAB//Z//x", "DIAGNOSIS//ICD//10//Z99"])
    with pytest.raises(InputError, match="trained on another dataset"):
        run_audit(other, model, tmp_path / "run", load_config(**FAST))


def test_train_refuses_to_overwrite_before_training(tiny_model_dir, tmp_path):
    data, model = tiny_model_dir
    out = tmp_path / "m"
    shutil.copytree(model, out)
    (out / "notes.txt").write_text("important")
    r = _cli("train", data, "--out", out, "--epochs", "1")
    assert r.returncode == 2 and "notes.txt" in r.stderr and "Traceback" not in r.stderr
    assert (out / "notes.txt").read_text() == "important"
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = _cli("train", data, "--out", afile, "--epochs", "1")
    assert r.returncode == 2 and "is a file" in r.stderr
    r = _cli("train", data, "--out", tmp_path / "m2", "--canaries", "-2")
    assert r.returncode == 2


@pytest.mark.parametrize(
    "override, key",
    [
        ({"T1": {"tiers": [-5]}}, "T1.tiers"),
        ({"T4": {"target_fprs": [0.01, 2]}}, "T4.target_fprs"),
        ({"seed": -1}, "seed"),
    ],
)
def test_out_of_range_settings_are_refused_before_running(override, key):
    with pytest.raises(InputError) as e:
        load_config(**override)
    assert key in str(e.value)


def test_corrupt_files_and_unknown_devices_are_input_errors(model_copy, tmp_path):
    data, model = model_copy
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    shard = next((bad / "data").rglob("*.parquet"))
    shard.write_bytes(b"not a parquet file")
    r = _cli("audit", bad, "--model", model, "--out", tmp_path / "r1")
    assert r.returncode == 2 and shard.name in r.stderr and "Traceback" not in r.stderr
    r = _cli("audit", data, "--model", model, "--out", tmp_path / "r2", "--device", "tpu")
    assert r.returncode == 2 and "device" in r.stderr.lower() and "Traceback" not in r.stderr
    (model / "tokenizer.json").write_text("{not json")
    r = _cli("audit", data, "--model", model, "--out", tmp_path / "r3")
    assert r.returncode == 2 and "tokenizer.json" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "r4").mkdir()
    (tmp_path / "r4" / "report.json").write_text("{oops")
    r = _cli("gate", tmp_path / "r4")
    assert r.returncode == 2 and "report.json" in r.stderr and "Traceback" not in r.stderr
