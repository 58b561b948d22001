"""Event tokenization of MEDS records, as published EHR foundation models do it.

A subject's record becomes ``[BOS]``, the static codes, then for each timed event its code token and,
when the event carries a numeric value, a quantile-bin token ``VALUE//Q<k>`` whose bins were fitted per
code on the training split only. A time-gap token ``TIME//<bucket>`` stands between distinct timestamps.
Tokens decode back to ``(code, elapsed seconds, value bin)``, so generated trajectories can be compared
with real records.

Codes held by fewer than ``min_code_subjects`` training subjects map to ``[UNK]`` (so that the model
sees the unknown token in training and non-members' unseen codes are not scored as impossible tokens);
the unknown rate per split is reported by :meth:`EventTokenizer.unknown_rate`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ehrmem.data.meds import CODE, NUMERIC_VALUE, SUBJECT_ID, TIME
from ehrmem.errors import InputError

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
VOCAB_INDEX = "code/vocab_index"
VOCAB_FILE = "vocab.parquet"
TOKENIZER_FILE = "tokenizer.json"

# Upper bounds (seconds, inclusive) of the time-gap buckets between two distinct timestamps.
_MIN, _H, _D, _Y = 60.0, 3600.0, 86400.0, 365.25 * 86400.0
TIME_BUCKETS: tuple[tuple[str, float], ...] = (
    ("<=5m", 5 * _MIN),
    ("5m-15m", 15 * _MIN),
    ("15m-1h", _H),
    ("1h-3h", 3 * _H),
    ("3h-6h", 6 * _H),
    ("6h-12h", 12 * _H),
    ("12h-1d", _D),
    ("1d-3d", 3 * _D),
    ("3d-1w", 7 * _D),
    ("1w-1mo", _Y / 12),
    ("1mo-3mo", _Y / 4),
    ("3mo-6mo", _Y / 2),
    ("6mo-1y", _Y),
    ("1y-2y", 2 * _Y),
    ("2y-5y", 5 * _Y),
    ("5y-10y", 10 * _Y),
    ("10y-20y", 20 * _Y),
    ("20y-40y", 40 * _Y),
    ("40y-70y", 70 * _Y),
    (">70y", math.inf),
)


def _bucket_midpoints() -> list[float]:
    mids, lower = [], 60.0
    for _, upper in TIME_BUCKETS:
        up = upper if math.isfinite(upper) else 100 * _Y
        mids.append(math.sqrt(lower * up))
        lower = up
    return mids


@dataclass(frozen=True)
class EncodedSubject:
    """One subject's token ids, with the index of the timed event each token belongs to.

    ``event_index`` is -1 for ``[BOS]`` and static codes; a time-gap token belongs to the event after it.
    """

    subject_id: int
    ids: np.ndarray
    event_index: np.ndarray

    @property
    def n_events(self) -> int:
        return int(self.event_index.max()) + 1 if self.event_index.size else 0

    def prompt(self, k_events: int) -> np.ndarray:
        """Tokens of the static codes plus the first ``k_events`` timed events."""
        return self.ids[self.event_index < k_events]

    def continuation(self, k_events: int, horizon_events: int | None = None) -> np.ndarray:
        """Tokens of the timed events after the first ``k_events`` (at most ``horizon_events`` of them)."""
        upper = np.inf if horizon_events is None else k_events + horizon_events
        mask = (self.event_index >= k_events) & (self.event_index < upper)
        return self.ids[mask]


class EventTokenizer:
    """Maps MEDS events to token ids and back.

    Use :meth:`fit` on training events, then :meth:`encode` any events. :meth:`save` writes a vocabulary
    table (``code``, ``code/vocab_index``, as in the MEDS tokenization conventions) and a JSON file with
    the value bins and time buckets.
    """

    def __init__(
        self,
        vocab: list[str],
        value_bins: dict[str, list[float]],
        *,
        n_value_bins: int,
        min_code_subjects: int,
        code_counts: dict[str, int] | None = None,
    ) -> None:
        if list(vocab[: len(SPECIAL_TOKENS)]) != list(SPECIAL_TOKENS):
            raise InputError(
                "The vocabulary must start with the special tokens.",
                value=vocab[:4],
                expected=str(list(SPECIAL_TOKENS)),
            )
        if len(set(vocab)) != len(vocab):
            dup = [t for t in vocab if vocab.count(t) > 1][:3]
            raise InputError("The vocabulary repeats tokens.", value=dup, expected="unique tokens")
        self.vocab = list(vocab)
        self.index = {tok: i for i, tok in enumerate(self.vocab)}
        self.value_bins = {c: list(map(float, e)) for c, e in value_bins.items()}
        self.n_value_bins = int(n_value_bins)
        self.min_code_subjects = int(min_code_subjects)
        self.code_counts = dict(code_counts or {})
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (self.index[t] for t in SPECIAL_TOKENS)
        self._time_ids = np.array([self.index[f"TIME//{name}"] for name, _ in TIME_BUCKETS])
        self._time_uppers = np.array([u for _, u in TIME_BUCKETS])
        self._value_ids = np.array([self.index[f"VALUE//Q{k}"] for k in range(1, self.n_value_bins + 1)])
        kinds = np.zeros(len(self.vocab), dtype=np.int8)  # 0 special, 1 code, 2 time, 3 value
        seconds = np.zeros(len(self.vocab))
        for i, tok in enumerate(self.vocab):
            if tok.startswith("TIME//"):
                kinds[i] = 2
            elif tok.startswith("VALUE//Q"):
                kinds[i] = 3
            elif tok not in SPECIAL_TOKENS:
                kinds[i] = 1
        seconds[self._time_ids] = _bucket_midpoints()
        self.token_kind = kinds
        self.token_seconds = seconds

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, events: pl.DataFrame, *, n_value_bins: int = 10, min_code_subjects: int = 2) -> EventTokenizer:
        """Build the vocabulary and per-code value quantiles from (training) events only."""
        if n_value_bins < 2:
            raise InputError("n_value_bins must be at least 2.", value=n_value_bins, expected=">= 2")
        if min_code_subjects < 1:
            raise InputError("min_code_subjects must be at least 1.", value=min_code_subjects, expected=">= 1")
        per_code = (
            events.group_by(CODE)
            .agg(pl.col(SUBJECT_ID).n_unique().alias("n_subjects"), pl.len().alias("count"))
            .filter(pl.col("n_subjects") >= min_code_subjects)
            .sort(["count", CODE], descending=[True, False])
        )
        codes = per_code[CODE].to_list()
        vocab = list(SPECIAL_TOKENS)
        vocab += [f"TIME//{name}" for name, _ in TIME_BUCKETS]
        vocab += [f"VALUE//Q{k}" for k in range(1, n_value_bins + 1)]
        clash = set(codes) & set(vocab)
        if clash:
            raise InputError(
                "Data codes collide with ehrmem's reserved token names.",
                column=CODE,
                value=sorted(clash)[:3],
                expected="codes other than [PAD]/[BOS]/TIME//.../VALUE//Q..",
            )
        vocab += codes
        kept = set(codes)
        valued = events.filter(pl.col(NUMERIC_VALUE).is_not_null() & pl.col(CODE).is_in(list(kept)))
        qs = np.linspace(0, 1, n_value_bins + 1)[1:-1]
        value_bins: dict[str, list[float]] = {}
        for (code,), grp in valued.group_by(CODE):
            vals = grp[NUMERIC_VALUE].to_numpy().astype(np.float64)
            value_bins[str(code)] = np.unique(np.quantile(vals, qs)).tolist()
        return cls(
            vocab,
            value_bins,
            n_value_bins=n_value_bins,
            min_code_subjects=min_code_subjects,
            code_counts=dict(zip(per_code[CODE].to_list(), per_code["n_subjects"].to_list(), strict=True)),
        )

    # ------------------------------------------------------------------ encoding
    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, events: pl.DataFrame, *, max_events: int | None = None) -> list[EncodedSubject]:
        """Encode every subject of ``events`` (sorted by subject, static first, then time).

        ``max_events`` keeps only each subject's first timed events (static codes are always kept).
        """
        df = events.select(SUBJECT_ID, TIME, CODE, NUMERIC_VALUE)
        df = df.with_columns(
            pl.when(pl.col(TIME).is_null())
            .then(-1)
            .otherwise(pl.col(TIME).is_not_null().cum_sum().over(SUBJECT_ID) - 1)
            .cast(pl.Int32)
            .alias("_ev")
        )
        if max_events is not None:
            df = df.filter(pl.col("_ev") < max_events)
        vocab_df = pl.DataFrame(
            {CODE: self.vocab, "_id": np.arange(len(self.vocab), dtype=np.int32)},
            schema={CODE: pl.String, "_id": pl.Int32},
        )
        df = df.join(vocab_df, on=CODE, how="left", maintain_order="left").with_columns(
            pl.col("_id").fill_null(self.unk_id)
        )
        prev = pl.col(TIME).shift(1).over(SUBJECT_ID)
        gap = (pl.col(TIME) - prev).dt.total_microseconds() / 1e6
        df = df.with_columns(gap.alias("_gap"))
        sid = df[SUBJECT_ID].to_numpy()
        ev = df["_ev"].to_numpy()
        code_id = df["_id"].to_numpy().astype(np.int64)
        gaps = df["_gap"].to_numpy()
        has_gap = (ev > 0) & np.nan_to_num(gaps, nan=0.0).__gt__(0)
        gap_id = np.where(has_gap, self._time_ids[np.searchsorted(self._time_uppers, np.nan_to_num(gaps))], -1)
        value_id = self._value_tokens(df[CODE], df[NUMERIC_VALUE], code_id)
        # Interleave (gap, code, value) per event and drop the empty slots.
        stacked = np.stack([gap_id, code_id, value_id], axis=1).reshape(-1)
        ev3 = np.repeat(ev, 3)
        sid3 = np.repeat(sid, 3)
        keep = stacked >= 0
        stacked, ev3, sid3 = stacked[keep], ev3[keep], sid3[keep]
        out: list[EncodedSubject] = []
        if sid3.size == 0:
            return out
        bounds = np.flatnonzero(np.diff(sid3)) + 1
        for ids, evs, sids in zip(
            np.split(stacked, bounds), np.split(ev3, bounds), np.split(sid3, bounds), strict=True
        ):
            out.append(
                EncodedSubject(
                    subject_id=int(sids[0]),
                    ids=np.concatenate([[self.bos_id], ids]).astype(np.int64),
                    event_index=np.concatenate([[-1], evs]).astype(np.int32),
                )
            )
        return out

    def _value_tokens(self, codes: pl.Series, values: pl.Series, code_id: np.ndarray) -> np.ndarray:
        out = np.full(len(codes), -1, dtype=np.int64)
        vals = values.to_numpy()
        has_value = ~np.isnan(vals.astype(np.float64)) & (code_id != self.unk_id)
        if not has_value.any():
            return out
        idx = np.flatnonzero(has_value)
        sub = pl.DataFrame({"_i": idx, CODE: codes.gather(idx), "_v": vals[idx]})
        for (code,), grp in sub.group_by(CODE):
            edges = self.value_bins.get(str(code))
            if edges is None:
                continue
            bins = np.searchsorted(np.asarray(edges), grp["_v"].to_numpy(), side="right")
            out[grp["_i"].to_numpy()] = self._value_ids[np.minimum(bins, self.n_value_bins - 1)]
        return out

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: np.ndarray) -> list[tuple[str, float, int | None]]:
        """Decode token ids into ``(code, elapsed seconds since the first token, value bin)``.

        Special tokens are dropped; a value-bin token attaches to the code before it.
        """
        events: list[tuple[str, float, int | None]] = []
        elapsed = 0.0
        for t in np.asarray(ids).tolist():
            if t < 0 or t >= len(self.vocab):
                raise InputError("Token id outside the vocabulary.", value=t, expected=f"0..{len(self.vocab) - 1}")
            kind = self.token_kind[t]
            if kind == 2:
                elapsed += float(self.token_seconds[t])
            elif kind == 3:
                if events and events[-1][2] is None:
                    code, secs, _ = events[-1]
                    events[-1] = (code, secs, int(self.vocab[t].removeprefix("VALUE//Q")))
            elif kind == 1 or t == self.unk_id:
                events.append((self.vocab[t], elapsed, None))
        return events

    def unknown_rate(self, encoded: list[EncodedSubject]) -> float:
        """Share of code tokens that are ``[UNK]`` (failure kind 13)."""
        n_code = sum(int(((self.token_kind[e.ids] == 1) | (e.ids == self.unk_id)).sum()) for e in encoded)
        n_unk = sum(int((e.ids == self.unk_id).sum()) for e in encoded)
        return n_unk / n_code if n_code else 0.0

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        kinds = ["special", "code", "time", "value"]
        pl.DataFrame(
            {
                CODE: self.vocab,
                VOCAB_INDEX: np.arange(len(self.vocab), dtype=np.int64),
                "kind": [kinds[k] for k in self.token_kind],
                "n_train_subjects": [self.code_counts.get(t) for t in self.vocab],
            },
            schema={CODE: pl.String, VOCAB_INDEX: pl.Int64, "kind": pl.String, "n_train_subjects": pl.Int64},
        ).write_parquet(d / VOCAB_FILE)
        (d / TOKENIZER_FILE).write_text(
            json.dumps(
                {
                    "format": "ehrmem-event-tokenizer/1",
                    "n_value_bins": self.n_value_bins,
                    "min_code_subjects": self.min_code_subjects,
                    "time_buckets": [[n, None if math.isinf(u) else u] for n, u in TIME_BUCKETS],
                    "value_bins": self.value_bins,
                },
                indent=1,
            )
        )

    @classmethod
    def load(cls, directory: str | Path) -> EventTokenizer:
        d = Path(directory)
        vfp, tfp = d / VOCAB_FILE, d / TOKENIZER_FILE
        for fp in (vfp, tfp):
            if not fp.exists():
                raise InputError(
                    "The tokenizer files are missing from the model directory.",
                    file=fp,
                    expected=f"{VOCAB_FILE} and {TOKENIZER_FILE} as written by `ehrmem train`",
                )
        from ehrmem.data.meds import read_parquet_file

        table = read_parquet_file(vfp)
        for col in (CODE, VOCAB_INDEX):
            if col not in table.columns:
                raise InputError(
                    "The vocabulary table lacks a column.",
                    file=vfp,
                    column=col,
                    expected=f"columns {CODE!r} and {VOCAB_INDEX!r}",
                )
        table = table.sort(VOCAB_INDEX)
        idx = table[VOCAB_INDEX].to_numpy()
        if not np.array_equal(idx, np.arange(len(idx))):
            raise InputError(
                "Vocabulary indices must be 0..n-1 without gaps or repeats.",
                file=vfp,
                column=VOCAB_INDEX,
                value=idx[:10].tolist(),
                expected="0, 1, 2, ...",
            )
        try:
            cfg = json.loads(tfp.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError("The tokenizer file is not valid JSON.", file=tfp, value=str(e)[:200]) from e
        missing = [k for k in ("value_bins", "n_value_bins", "min_code_subjects") if k not in cfg]
        if not isinstance(cfg, dict) or missing:
            raise InputError(
                "The tokenizer file lacks required entries.",
                file=tfp,
                value=missing or type(cfg).__name__,
                expected="value_bins, n_value_bins and min_code_subjects, as written by `ehrmem train`",
            )
        counts = {}
        if "n_train_subjects" in table.columns:
            counts = {c: int(n) for c, n in zip(table[CODE], table["n_train_subjects"], strict=True) if n is not None}
        return cls(
            table[CODE].to_list(),
            cfg["value_bins"],
            n_value_bins=cfg["n_value_bins"],
            min_code_subjects=cfg["min_code_subjects"],
            code_counts=counts,
        )
