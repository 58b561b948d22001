"""Reading and validating a MEDS dataset directory.

Names, paths and schemas come from the ``meds`` package; ehrmem only adds the checks that a privacy
audit needs (codes read as strings, one shard per subject, splits that are known) and explicit options
for the common variants of the standard, so that nothing is ever guessed silently.

Examples
--------
>>> from ehrmem.data.meds import load_meds
>>> ds = load_meds("path/to/meds")                     # doctest: +SKIP
>>> ds.split_of(ds.subject_ids()[:3])                  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import meds
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ehrmem.errors import InputError

logger = logging.getLogger(__name__)

SUBJECT_ID = meds.DataSchema.subject_id_name
TIME = meds.DataSchema.time_name
CODE = meds.DataSchema.code_name
NUMERIC_VALUE = meds.DataSchema.numeric_value_name
SPLIT = meds.SubjectSplitSchema.split_name
SPLITS = (meds.train_split, meds.tuning_split, meds.held_out_split)
BIRTH_CODE = meds.birth_code
DEATH_CODE = meds.death_code

SplitSource = Literal["file", "directories", "none"]


@dataclass
class MedsDataset:
    """A MEDS dataset held in memory as one events frame plus its metadata.

    Attributes
    ----------
    root
        The dataset directory.
    events
        ``subject_id`` (int64), ``time`` (datetime[us], null = static), ``code`` (str) and
        ``numeric_value`` (float32, null when the event has no value), sorted by subject then time
        with static events first.
    splits
        ``subject_id`` and ``split`` for every subject, or ``None`` when the dataset has no split
        information and the caller said so explicitly.
    codes
        ``metadata/codes.parquet`` (``code``, optional ``description``, ``parent_codes``) or ``None``.
    metadata
        The contents of ``metadata/dataset.json`` (all fields optional).
    data_hash
        SHA-256 over the bytes of every data and metadata file, for provenance.
    """

    root: Path
    events: pl.DataFrame
    splits: pl.DataFrame | None
    codes: pl.DataFrame | None
    metadata: dict
    data_hash: str
    files: list[Path] = field(default_factory=list)

    def subject_ids(self, split: str | None = None) -> list[int]:
        """Subjects present in the events, optionally restricted to one split."""
        if split is None:
            return self.events[SUBJECT_ID].unique(maintain_order=True).to_list()
        if self.splits is None:
            raise InputError(
                "This dataset was loaded without split information, so subjects cannot be selected by split.",
                value=split,
                expected="load it with split_source='file' or 'directories', or pass a training manifest",
            )
        present = set(self.events[SUBJECT_ID].unique().to_list())
        return [s for s in self.splits.filter(pl.col(SPLIT) == split)[SUBJECT_ID].to_list() if s in present]

    def split_of(self, subject_ids: Iterable[int]) -> dict[int, str | None]:
        """Map subjects to their split (``None`` when unknown)."""
        if self.splits is None:
            return {int(s): None for s in subject_ids}
        lookup = dict(zip(self.splits[SUBJECT_ID].to_list(), self.splits[SPLIT].to_list(), strict=True))
        return {int(s): lookup.get(int(s)) for s in subject_ids}

    def record_lengths(self) -> pl.DataFrame:
        """Number of timed events per subject (``subject_id``, ``n_events``)."""
        return (
            self.events.filter(pl.col(TIME).is_not_null())
            .group_by(SUBJECT_ID)
            .agg(pl.len().alias("n_events"))
            .sort(SUBJECT_ID)
        )


def _unreadable(fp: Path, e: Exception) -> InputError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return InputError("Cannot read the parquet file.", file=fp, value=first, expected="a readable parquet file")


def _read_schema(fp: Path) -> pa.Schema:
    try:
        return pq.read_schema(fp)
    except (OSError, pa.ArrowException) as e:
        raise _unreadable(fp, e) from e


def read_parquet_file(fp: Path, columns: list[str] | None = None) -> pl.DataFrame:
    """``polars.read_parquet`` whose failures on a corrupt or foreign file are input errors naming the file."""
    try:
        return pl.read_parquet(fp, columns=columns)
    except (OSError, pa.ArrowException, pl.exceptions.PolarsError) as e:
        raise _unreadable(fp, e) from e


def _data_files(root: Path) -> list[Path]:
    data_dir = root / meds.data_subdirectory
    if not data_dir.is_dir():
        raise InputError(
            "Not a MEDS dataset: the data directory is missing.",
            file=data_dir,
            expected=f"a directory '{meds.data_subdirectory}/' holding parquet shards (data/**/*.parquet)",
        )
    files = sorted(data_dir.rglob("*.parquet"))
    if not files:
        raise InputError(
            "Not a MEDS dataset: no parquet shards found.",
            file=data_dir,
            expected="one or more files matching data/**/*.parquet",
        )
    return files


def _check_columns(fp: Path, schema: pa.Schema, value_column: str) -> None:
    names = set(schema.names)
    for col, want in ((SUBJECT_ID, "int64"), (TIME, "timestamp"), (CODE, "string")):
        if col not in names:
            raise InputError(
                "A required MEDS column is missing.",
                file=fp,
                column=col,
                expected=f"a column {col!r} of type {want}; columns found: {sorted(names)}",
            )
    code_type = schema.field(CODE).type
    if not (pa.types.is_string(code_type) or pa.types.is_large_string(code_type)):
        # Failure kind 13: codes must be read as strings, never as numbers.
        raise InputError(
            "Codes must be stored as strings so that, for example, 'V08' and '0042' keep their identity.",
            file=fp,
            column=CODE,
            value=str(code_type),
            expected="string or large_string",
        )
    if not pa.types.is_integer(schema.field(SUBJECT_ID).type):
        raise InputError(
            "subject_id must be an integer column.",
            file=fp,
            column=SUBJECT_ID,
            value=str(schema.field(SUBJECT_ID).type),
            expected="int64",
        )
    if not pa.types.is_timestamp(schema.field(TIME).type):
        raise InputError(
            "time must be a timestamp column (null for static events).",
            file=fp,
            column=TIME,
            value=str(schema.field(TIME).type),
            expected="timestamp[us]",
        )
    if value_column == NUMERIC_VALUE and NUMERIC_VALUE not in names and "value" in names:
        raise InputError(
            "This dataset has a 'value' column but no 'numeric_value' column. ehrmem does not guess which "
            "column holds the numeric values.",
            file=fp,
            column="value",
            expected="pass value_column='value' (CLI: --value-column value) if 'value' holds numeric values",
        )
    if value_column != NUMERIC_VALUE and value_column not in names:
        raise InputError(
            "The value column given in the options is not in the data.",
            file=fp,
            column=value_column,
            expected=f"one of the columns {sorted(names)}",
        )
    if value_column in names:
        vt = schema.field(value_column).type
        if not (pa.types.is_floating(vt) or pa.types.is_integer(vt) or pa.types.is_null(vt)):
            raise InputError(
                "The numeric value column must hold numbers.",
                file=fp,
                column=value_column,
                value=str(vt),
                expected="a float or integer column (null where an event has no value)",
            )


def _read_shard(fp: Path, value_column: str) -> pl.DataFrame:
    schema = _read_schema(fp)
    _check_columns(fp, schema, value_column)
    cols = [SUBJECT_ID, TIME, CODE] + ([value_column] if value_column in schema.names else [])
    df = read_parquet_file(fp, columns=cols)
    if value_column in df.columns:
        df = df.rename({value_column: NUMERIC_VALUE}) if value_column != NUMERIC_VALUE else df
        df = df.with_columns(pl.col(NUMERIC_VALUE).cast(pl.Float32))
    else:
        df = df.with_columns(pl.lit(None, dtype=pl.Float32).alias(NUMERIC_VALUE))
    df = df.with_columns(
        pl.col(SUBJECT_ID).cast(pl.Int64), pl.col(TIME).cast(pl.Datetime("us")), pl.col(CODE).cast(pl.String)
    )
    for col in (SUBJECT_ID, CODE):
        n_null = df[col].null_count()
        if n_null:
            rows = df.with_row_index("row").filter(pl.col(col).is_null())["row"].head(5).to_list()
            raise InputError(
                f"{n_null} events have a null {col}.",
                file=fp,
                column=col,
                value=f"null at rows {rows}",
                expected="no nulls",
            )
    # NaN/inf in numeric_value are corrupt data (a null value by design is not a NaN value).
    bad = df.filter(pl.col(NUMERIC_VALUE).is_not_null() & ~pl.col(NUMERIC_VALUE).is_finite())
    if bad.height:
        raise InputError(
            f"{bad.height} events have a non-finite numeric value (NaN or inf).",
            file=fp,
            column=NUMERIC_VALUE,
            value=f"subjects {bad[SUBJECT_ID].unique().head(5).to_list()}, codes {bad[CODE].head(3).to_list()}",
            expected="a finite number, or null when the event has no value",
        )
    return df


def _hash_files(files: Iterable[Path], root: Path) -> str:
    h = hashlib.sha256()
    for fp in sorted(files):
        h.update(str(fp.relative_to(root)).encode())
        with open(fp, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _read_splits(root: Path, data_files: list[Path], split_source: SplitSource) -> pl.DataFrame | None:
    if split_source == "none":
        return None
    if split_source == "directories":
        rows = []
        for fp in data_files:
            rel = fp.relative_to(root / meds.data_subdirectory).parts
            if len(rel) < 2 or rel[0] not in SPLITS:
                raise InputError(
                    "split_source='directories' needs every shard under data/<split>/.",
                    file=fp,
                    value=rel[0] if len(rel) > 1 else "(top level)",
                    expected=f"one of {list(SPLITS)}",
                )
            ids = read_parquet_file(fp, columns=[SUBJECT_ID])[SUBJECT_ID].unique()
            rows.append(pl.DataFrame({SUBJECT_ID: ids, SPLIT: [rel[0]] * len(ids)}))
        return pl.concat(rows).unique(maintain_order=True)
    fp = root / meds.subject_splits_filepath
    if not fp.exists():
        raise InputError(
            "The split file is missing. ehrmem needs to know which subjects are members, and does not guess.",
            file=fp,
            expected=(
                "a subject_splits.parquet, or an explicit option: split_source='directories' (CLI: "
                "--split-source directories) when shards live in data/train, data/tuning, data/held_out; "
                "or split_source='none' with a model whose training manifest lists its members"
            ),
        )
    schema = _read_schema(fp)
    for col in (SUBJECT_ID, SPLIT):
        if col not in schema.names:
            raise InputError(
                "The split file lacks a required column.",
                file=fp,
                column=col,
                expected=f"columns {SUBJECT_ID!r} and {SPLIT!r}; found {schema.names}",
            )
    raw = read_parquet_file(fp, columns=[SUBJECT_ID, SPLIT])
    if not (raw[SUBJECT_ID].dtype.is_integer() or raw[SUBJECT_ID].dtype == pl.Null):
        raise InputError(
            "Subject ids in the split file are not integers.",
            file=fp,
            column=SUBJECT_ID,
            value=f"{raw[SUBJECT_ID].dtype}: {raw[SUBJECT_ID].head(3).to_list()}",
            expected="int64 subject ids, as in the data shards",
        )
    splits = raw.with_columns(pl.col(SUBJECT_ID).cast(pl.Int64), pl.col(SPLIT).cast(pl.String))
    unknown = sorted(set(splits[SPLIT].drop_nulls().unique().to_list()) - set(SPLITS))
    if unknown or splits[SPLIT].null_count():
        raise InputError(
            "The split file holds split names outside the MEDS standard.",
            file=fp,
            column=SPLIT,
            value=unknown or "null",
            expected=f"one of {list(SPLITS)}",
        )
    dup = splits.group_by(SUBJECT_ID).len().filter(pl.col("len") > 1)
    if dup.height:
        raise InputError(
            f"{dup.height} subjects appear more than once in the split file.",
            file=fp,
            column=SUBJECT_ID,
            value=dup[SUBJECT_ID].head(5).to_list(),
            expected="each subject in exactly one split",
        )
    return splits


def load_meds(
    root: str | Path,
    *,
    value_column: str = NUMERIC_VALUE,
    split_source: SplitSource = "file",
    subjects: Iterable[int] | None = None,
) -> MedsDataset:
    """Read and validate a MEDS dataset directory.

    Parameters
    ----------
    root
        The dataset directory (``data/**/*.parquet`` and ``metadata/``).
    value_column
        The column holding numeric values. Some exports name it ``value``; ehrmem refuses to guess and
        asks for this option instead.
    split_source
        ``"file"`` reads ``metadata/subject_splits.parquet``; ``"directories"`` takes each subject's split
        from its shard folder (``data/train/...``); ``"none"`` loads no splits (membership must then come
        from a model's training manifest).
    subjects
        Only keep these subjects (all when ``None``).

    Raises
    ------
    InputError
        Naming the file, column, value and what was expected, for any violation of the standard that
        would corrupt an audit.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError("The MEDS dataset directory does not exist.", file=root, expected="a directory")
    if split_source not in ("file", "directories", "none"):
        raise InputError("Unknown split source.", value=split_source, expected="'file', 'directories' or 'none'")
    if value_column in (SUBJECT_ID, TIME, CODE):
        raise InputError(
            "The value column cannot be one of the MEDS key columns.",
            column=value_column,
            expected=f"the column of numeric values (default {NUMERIC_VALUE!r}), not {SUBJECT_ID}, {TIME} or {CODE}",
        )
    files = _data_files(root)
    keep = None if subjects is None else {int(s) for s in subjects}
    shards = []
    seen: dict[int, Path] = {}
    for fp in files:
        df = _read_shard(fp, value_column)
        ids = df[SUBJECT_ID].unique().to_list()
        clash = [s for s in ids if s in seen]
        if clash:
            raise InputError(
                "A subject's events are split across shards; MEDS keeps each subject in one shard.",
                file=fp,
                column=SUBJECT_ID,
                value=f"subject {clash[0]} also in {seen[clash[0]]}",
                expected="each subject_id in exactly one data file",
            )
        seen.update(dict.fromkeys(ids, fp))
        if keep is not None:
            df = df.filter(pl.col(SUBJECT_ID).is_in(list(keep)))
        shards.append(df)
    events = pl.concat(shards, how="vertical")
    # Static (null-time) events first, then by time; stable so same-time events keep file order.
    events = events.sort([SUBJECT_ID, TIME], nulls_last=False, maintain_order=True)
    splits = _read_splits(root, files, split_source)
    if splits is not None:
        missing = set(events[SUBJECT_ID].unique().to_list()) - set(splits[SUBJECT_ID].to_list())
        if missing:
            raise InputError(
                f"{len(missing)} subjects in the data have no split.",
                file=root / meds.subject_splits_filepath,
                column=SUBJECT_ID,
                value=sorted(missing)[:5],
                expected="every subject of data/ listed in the split file",
            )
    codes = None
    codes_fp = root / meds.code_metadata_filepath
    if codes_fp.exists():
        cschema = _read_schema(codes_fp)
        if CODE not in cschema.names:
            raise InputError("codes.parquet has no code column.", file=codes_fp, column=CODE)
        cols = [c for c in (CODE, "description", "parent_codes") if c in cschema.names]
        codes = read_parquet_file(codes_fp, columns=cols).with_columns(pl.col(CODE).cast(pl.String))
    meta_fp = root / meds.dataset_metadata_filepath
    metadata: dict = {}
    if meta_fp.exists():
        try:
            metadata = json.loads(meta_fp.read_text())
        except json.JSONDecodeError as e:
            raise InputError("dataset.json is not valid JSON.", file=meta_fp, value=str(e)) from e
    hashed = files + [p for p in (codes_fp, root / meds.subject_splits_filepath, meta_fp) if p.exists()]
    data_hash = _hash_files(hashed, root)
    logger.info(
        "Read %d events of %d subjects from %d shards in %s",
        events.height,
        events[SUBJECT_ID].n_unique(),
        len(files),
        root,
    )
    return MedsDataset(
        root=root,
        events=events,
        splits=splits,
        codes=codes,
        metadata=metadata,
        data_hash=data_hash,
        files=files,
    )
