"""The command line, run as a user runs it (subprocess), on a tiny dataset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl

from conftest import write_meds

EHRMEM = [sys.executable, "-m", "ehrmem.cli"]


def run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([*EHRMEM, "-q", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_train_then_audit(tmp_path: Path):
    data = write_meds(tmp_path / "meds", n_subjects=24)
    model = tmp_path / "model"
    r = run(
        "train",
        data,
        "--out",
        model,
        "--epochs",
        "1",
        "--n-layer",
        "1",
        "--n-embd",
        "32",
        "--n-head",
        "2",
        "--context-length",
        "64",
        "--max-events",
        "40",
        "--min-code-subjects",
        "1",
    )
    assert r.returncode == 0, r.stderr
    manifest = json.loads((model / "training_manifest.json").read_text())
    assert sorted(manifest["trained_subjects"]) == sorted(
        pl.read_parquet(data / "metadata" / "subject_splits.parquet")
        .filter(pl.col("split") == "train")["subject_id"]
        .to_list()
    )
    assert list(model.glob("*.safetensors")) and (model / "vocab.parquet").exists()

    r = run("audit", data, "--model", model, "--out", tmp_path / "run")
    assert r.returncode in (0, 4), r.stderr
    assert "report:" in r.stdout
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    # The exit code is the release gate's verdict: 0 only when it passed, 4 otherwise (7 non-members here
    # are fewer than the gate's minimum, so it cannot pass).
    assert r.returncode == (0 if report["gate"]["passed"] else 4)
    assert report["gate"]["verdict"] in ("fail", "underpowered") and r.returncode == 4
    assert "release gate:" in r.stderr
    assert report["status"] == "complete" and report["schema_version"]
    assert report["tests"]["T4"]["status"] in ("ok", "undefined")
    assert report["provenance"]["model"]["weights_sha256"]
    assert (tmp_path / "run" / "report.html").exists()


def test_bad_input_exit_code_and_message(tmp_path: Path):
    data = write_meds(tmp_path / "meds", n_subjects=6)
    (data / "metadata" / "subject_splits.parquet").unlink()
    r = run("train", data, "--out", tmp_path / "model", "--epochs", "1")
    assert r.returncode == 2
    assert "subject_splits.parquet" in r.stderr and "--split-source directories" in r.stderr
    assert "Traceback" not in r.stderr


def test_invalid_option_is_named(tmp_path: Path):
    data = write_meds(tmp_path / "meds", n_subjects=6)
    r = run("train", data, "--out", tmp_path / "model", "--epochs", "0")
    assert r.returncode == 2
    assert "--epochs" in r.stderr
