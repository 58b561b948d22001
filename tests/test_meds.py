"""Tests for reading and validating MEDS datasets (ehrmem.data.meds)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ehrmem.data.meds import load_meds
from ehrmem.errors import InputError


def _rewrite(fp: Path, change: Callable[[pl.DataFrame], pl.DataFrame]) -> Path:
    """Apply ``change`` to one parquet file in place."""
    change(pl.read_parquet(fp)).write_parquet(fp)
    return fp


def _error(root: Path, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        load_meds(root, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------------------------------------- real demo
def test_demo_loads_with_standard_splits_and_schema(demo_data):
    ds = load_meds(demo_data)
    assert ds.events["subject_id"].n_unique() == 100
    assert ds.events.schema["code"] == pl.String
    assert ds.events.schema["numeric_value"] == pl.Float32
    assert ds.events.schema["subject_id"] == pl.Int64
    counts = dict(ds.splits.group_by("split").len().iter_rows())
    assert counts == {"train": 80, "tuning": 10, "held_out": 10}
    assert len(ds.subject_ids("train")) == 80
    assert len(ds.data_hash) == 64


def test_demo_static_gender_events_come_first(demo_data):
    ev = load_meds(demo_data).events
    first = ev.group_by("subject_id", maintain_order=True).first()
    assert first.height == 100
    assert first["time"].null_count() == 100
    assert all(c.startswith("GENDER//") for c in first["code"].to_list())
    # Within a subject, no static (null-time) event follows a timed one, and times never go backwards.
    ordered = ev.with_columns(
        pl.col("time").is_null().cast(pl.Int8).diff().over("subject_id").alias("static_step"),
        pl.col("time").diff().over("subject_id").alias("dt"),
    )
    assert ordered.filter(pl.col("static_step") > 0).height == 0
    assert ordered.filter(pl.col("dt") < pl.duration(microseconds=0)).height == 0


# ---------------------------------------------------------------------------------------------- the tiny set
def test_tiny_dataset_round_trips(tiny_meds):
    ds = load_meds(tiny_meds)
    assert ds.events["subject_id"].n_unique() == 12
    assert ds.splits.height == 12
    assert ds.codes is not None and "LAB//A//mg" in ds.codes["code"].to_list()
    assert ds.metadata == {"dataset_name": "tiny"}
    # A null numeric value by design is not a NaN (failure kind 2): nulls load, and stay nulls.
    assert ds.events["numeric_value"].null_count() > 0
    assert not ds.events["numeric_value"].drop_nulls().is_nan().any()


def test_subjects_option_restricts_events(tiny_meds):
    ds = load_meds(tiny_meds, subjects=[1000, 1001])
    assert sorted(ds.subject_ids()) == [1000, 1001]


def test_missing_directory_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    msg = _error(missing)
    assert str(missing) in msg and "does not exist" in msg


def test_missing_data_directory_is_named(tmp_path):
    (tmp_path / "meds" / "metadata").mkdir(parents=True)
    msg = _error(tmp_path / "meds")
    assert str(tmp_path / "meds" / "data") in msg
    assert "data/**/*.parquet" in msg  # what was expected


def test_missing_code_column(tiny_meds):
    fp = _rewrite(tiny_meds / "data" / "train" / "0.parquet", lambda df: df.drop("code"))
    with pytest.raises(InputError) as info:
        load_meds(tiny_meds)
    msg = str(info.value)
    assert str(fp) in msg and "'code'" in msg and "missing" in msg
    assert info.value.column == "code"


def test_codes_stored_as_floats_are_refused(tiny_meds):
    """Failure kind 13: an ICD code such as 428.0 read as a float loses its identity."""
    fp = _rewrite(
        tiny_meds / "data" / "tuning" / "0.parquet",
        lambda df: df.with_columns(pl.Series("code", np.linspace(1, 2, df.height), dtype=pl.Float64)),
    )
    with pytest.raises(InputError) as info:
        load_meds(tiny_meds)
    msg = str(info.value)
    assert str(fp) in msg and "'code'" in msg
    assert "double" in msg  # the type found
    assert "string" in msg  # what was expected
    assert info.value.column == "code"


def test_value_column_is_not_guessed(tiny_meds):
    original = load_meds(tiny_meds).events
    for split in ("train", "tuning", "held_out"):
        _rewrite(tiny_meds / "data" / split / "0.parquet", lambda df: df.rename({"numeric_value": "value"}))
    msg = _error(tiny_meds)
    assert "value_column='value'" in msg and "'value'" in msg
    assert str(tiny_meds / "data") in msg
    ds = load_meds(tiny_meds, value_column="value")
    assert "value" not in ds.events.columns
    assert ds.events["numeric_value"].equals(original["numeric_value"])


def test_value_column_option_that_is_absent(tiny_meds):
    msg = _error(tiny_meds, value_column="lab_value")
    assert "'lab_value'" in msg and "numeric_value" in msg


def test_non_numeric_value_column(tiny_meds):
    fp = _rewrite(
        tiny_meds / "data" / "train" / "0.parquet",
        lambda df: df.with_columns(pl.col("numeric_value").cast(pl.String)),
    )
    msg = _error(tiny_meds)
    assert str(fp) in msg and "'numeric_value'" in msg


def test_missing_split_file_needs_an_explicit_option(tiny_meds):
    file_splits = load_meds(tiny_meds).splits.sort("subject_id")
    (tiny_meds / "metadata" / "subject_splits.parquet").unlink()
    msg = _error(tiny_meds)
    assert "subject_splits.parquet" in msg and "split_source='directories'" in msg
    from_dirs = load_meds(tiny_meds, split_source="directories")
    assert from_dirs.splits.sort("subject_id").equals(file_splits)
    none = load_meds(tiny_meds, split_source="none")
    assert none.splits is None
    assert none.split_of([1000]) == {1000: None}
    with pytest.raises(InputError, match="without split information"):
        none.subject_ids("train")


def test_directories_split_source_needs_split_folders(tiny_meds):
    (tiny_meds / "data" / "train" / "0.parquet").rename(tiny_meds / "data" / "train.parquet")
    msg = _error(tiny_meds, split_source="directories")
    assert str(tiny_meds / "data" / "train.parquet") in msg and "data/<split>/" in msg


def test_unknown_split_source_option(tiny_meds):
    msg = _error(tiny_meds, split_source="guess")
    assert "'guess'" in msg


def test_unknown_split_name(tiny_meds):
    fp = _rewrite(
        tiny_meds / "metadata" / "subject_splits.parquet",
        lambda df: df.with_columns(
            pl.when(pl.col("subject_id") == 1001).then(pl.lit("validation")).otherwise(pl.col("split")).alias("split")
        ),
    )
    with pytest.raises(InputError) as info:
        load_meds(tiny_meds)
    msg = str(info.value)
    assert str(fp) in msg and "'split'" in msg and "validation" in msg
    assert "held_out" in msg  # the allowed names are listed


def test_subject_listed_twice_in_split_file(tiny_meds):
    _rewrite(
        tiny_meds / "metadata" / "subject_splits.parquet",
        lambda df: pl.concat([df, pl.DataFrame({"subject_id": [1000], "split": ["held_out"]})]),
    )
    msg = _error(tiny_meds)
    assert "more than once" in msg and "1000" in msg


def test_subject_without_split(tiny_meds):
    _rewrite(tiny_meds / "metadata" / "subject_splits.parquet", lambda df: df.filter(pl.col("subject_id") != 1002))
    msg = _error(tiny_meds)
    assert "no split" in msg and "1002" in msg


def test_subject_in_two_shards(tiny_meds):
    train_fp = tiny_meds / "data" / "train" / "0.parquet"
    tuning_fp = tiny_meds / "data" / "tuning" / "0.parquet"
    moved = pl.read_parquet(train_fp).head(1)
    sid = moved["subject_id"][0]
    _rewrite(tuning_fp, lambda df: pl.concat([df, moved]))
    with pytest.raises(InputError) as info:
        load_meds(tiny_meds)
    msg = str(info.value)
    assert f"subject {sid}" in msg
    assert str(train_fp) in msg and str(tuning_fp) in msg
    assert "'subject_id'" in msg


def test_nan_numeric_value_is_an_error_but_null_is_not(tiny_meds):
    fp = tiny_meds / "data" / "held_out" / "0.parquet"
    df = pl.read_parquet(fp)
    assert df["numeric_value"].null_count() > 0  # nulls by design already present: they load (see above)
    row = df.with_row_index("i").filter(pl.col("numeric_value").is_not_null())["i"][0]
    sid = df["subject_id"][row]
    values = df["numeric_value"].to_numpy(allow_copy=True).copy()
    values[row] = np.nan
    df.with_columns(pl.Series("numeric_value", values, dtype=pl.Float32)).write_parquet(fp)
    with pytest.raises(InputError) as info:
        load_meds(tiny_meds)
    msg = str(info.value)
    assert str(fp) in msg and "'numeric_value'" in msg and "NaN" in msg
    assert str(sid) in msg


@pytest.mark.parametrize("column", ["subject_id", "code"])
def test_null_identifiers(tiny_meds, column):
    fp = _rewrite(
        tiny_meds / "data" / "train" / "0.parquet",
        lambda df: df.with_columns(
            pl.when(pl.int_range(pl.len()) == 3).then(None).otherwise(pl.col(column)).alias(column)
        ),
    )
    with pytest.raises(InputError) as info:
        load_meds(tiny_meds)
    msg = str(info.value)
    assert str(fp) in msg and f"'{column}'" in msg and "rows [3]" in msg


def test_time_must_be_a_timestamp(tiny_meds):
    fp = _rewrite(
        tiny_meds / "data" / "train" / "0.parquet", lambda df: df.with_columns(pl.col("time").cast(pl.String))
    )
    msg = _error(tiny_meds)
    assert str(fp) in msg and "'time'" in msg and "timestamp" in msg


def test_invalid_dataset_json(tiny_meds):
    (tiny_meds / "metadata" / "dataset.json").write_text("{not json")
    msg = _error(tiny_meds)
    assert "dataset.json" in msg


def test_data_hash_changes_with_the_data(tiny_meds):
    before = load_meds(tiny_meds).data_hash
    assert load_meds(tiny_meds).data_hash == before
    _rewrite(
        tiny_meds / "data" / "train" / "0.parquet",
        lambda df: pl.concat([df, df.tail(1).with_columns(pl.lit(datetime(2200, 1, 1)).alias("time"))]),
    )
    assert load_meds(tiny_meds).data_hash != before
