"""Shared fixtures: a tiny readable MEDS dataset, a tiny model on it, and the real MIMIC-IV demo."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_CANDIDATES = [
    os.environ.get("EHRMEM_DEMO_DATA"),
    str(REPO.parent / "shared" / "data" / "mimic-iv-demo-meds"),
    # The copy `ehrmem demo-data` (or `make demo`) caches from the package registry.
    str(Path(os.environ.get("EHRMEM_CACHE_DIR") or Path.home() / ".cache" / "ehrmem") / "mimic-iv-demo-meds"),
]

CODES = [
    "LAB//A//mg",
    "LAB//B//mg",
    "DIAGNOSIS//ICD//10//I10",
    "DIAGNOSIS//ICD//9//V08",
    "MEDICATION//X",
    "PROCEDURE//ICD//9//8854",
]


def write_meds(
    root: Path,
    n_subjects: int = 12,
    *,
    seed: int = 0,
    events_per_subject: tuple[int, int] = (20, 60),
    splits: dict[str, float] | None = None,
    codes: list[str] | None = None,
) -> Path:
    """Write a small synthetic MEDS dataset (one shard per split, splits file, codes and dataset.json)."""
    rng = np.random.default_rng(seed)
    split_names = ["train", "tuning", "held_out"]
    probs = np.array([(splits or {"train": 0.6, "tuning": 0.2, "held_out": 0.2})[s] for s in split_names])
    assignment = {}
    rows: dict[str, list] = {s: [] for s in split_names}
    for i in range(n_subjects):
        sid = 1000 + i
        split = split_names[i % 3] if i < 3 else str(rng.choice(split_names, p=probs / probs.sum()))
        assignment[sid] = split
        rows[split].append((sid, None, "GENDER//" + ("F" if i % 2 else "M"), None))
        t = datetime(2100, 1, 1) + timedelta(days=int(rng.integers(0, 1000)))
        rows[split].append((sid, t - timedelta(days=365 * 60), "MEDS_BIRTH", None))
        for _ in range(int(rng.integers(*events_per_subject))):
            t += timedelta(minutes=int(rng.choice([0, 0, 5, 60, 600, 3000])))
            code = str(rng.choice(codes or CODES))
            value = float(rng.normal(5, 2)) if code.startswith("LAB") else None
            rows[split].append((sid, t, code, value))
    schema = {
        "subject_id": pl.Int64,
        "time": pl.Datetime("us"),
        "code": pl.String,
        "numeric_value": pl.Float32,
    }
    for split, r in rows.items():
        (root / "data" / split).mkdir(parents=True, exist_ok=True)
        pl.DataFrame(r, schema=schema, orient="row").write_parquet(root / "data" / split / "0.parquet")
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"subject_id": list(assignment), "split": list(assignment.values())}).write_parquet(
        root / "metadata" / "subject_splits.parquet"
    )
    pl.DataFrame(
        {
            "code": codes or CODES,
            "description": [c.lower() for c in codes or CODES],
            "parent_codes": [[] for _ in codes or CODES],
        }
    ).write_parquet(root / "metadata" / "codes.parquet")
    (root / "metadata" / "dataset.json").write_text('{"dataset_name": "tiny"}')
    return root


@pytest.fixture
def tiny_meds(tmp_path: Path) -> Path:
    return write_meds(tmp_path / "meds")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny GPT-2 trained for one epoch on the tiny dataset: (data dir, model dir)."""
    from ehrmem.data.meds import load_meds
    from ehrmem.models.train import TrainConfig, train_reference_model

    root = tmp_path_factory.mktemp("tiny")
    data = write_meds(root / "meds", n_subjects=30)
    cfg = TrainConfig(
        n_layer=1,
        n_embd=32,
        n_head=2,
        context_length=64,
        epochs=1,
        max_events=40,
        min_code_subjects=1,
        batch_size=8,
    )
    model = train_reference_model(load_meds(data), root / "model", cfg)
    return data, model


@pytest.fixture(scope="session")
def demo_data() -> Path:
    for cand in DEMO_CANDIDATES:
        if cand and (Path(cand) / "metadata" / "subject_splits.parquet").exists():
            return Path(cand)
    pytest.skip("the MIMIC-IV demo copy (../shared/data/mimic-iv-demo-meds or $EHRMEM_DEMO_DATA) is not present")
