"""Tests for the event tokenizer (ehrmem.data.tokenizer)."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from ehrmem.data.meds import load_meds
from ehrmem.data.tokenizer import BOS, TIME_BUCKETS, UNK, VOCAB_FILE, VOCAB_INDEX, EventTokenizer
from ehrmem.errors import InputError

SCHEMA = {"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float32}
T0 = datetime(2100, 1, 1)


def frame(rows: list[tuple]) -> pl.DataFrame:
    """Events from ``(subject_id, time or None, code, value or None)`` rows, in MEDS order."""
    return pl.DataFrame(rows, schema=SCHEMA, orient="row").sort(
        ["subject_id", "time"], nulls_last=False, maintain_order=True
    )


def train_events(ds) -> pl.DataFrame:
    return ds.events.filter(pl.col("subject_id").is_in(ds.subject_ids("train")))


def tokens(tok: EventTokenizer, ids: np.ndarray) -> list[str]:
    return [tok.vocab[i] for i in ids]


def bucket_bounds(gap: float) -> tuple[float, float]:
    lower = 0.0
    for _, upper in TIME_BUCKETS:
        if gap <= upper:
            return lower, upper
        lower = upper
    raise AssertionError(gap)


# ---------------------------------------------------------------------------------------------- fitting
def test_value_bins_are_fitted_on_the_train_split_only(tiny_meds):
    ds = load_meds(tiny_meds)
    before = EventTokenizer.fit(train_events(ds), n_value_bins=5).value_bins
    fp = tiny_meds / "data" / "held_out" / "0.parquet"
    pl.read_parquet(fp).with_columns(pl.col("numeric_value") * 100 + 1000).write_parquet(fp)
    changed = load_meds(tiny_meds)
    assert EventTokenizer.fit(train_events(changed), n_value_bins=5).value_bins == before
    # The change is large enough that bins fitted on every split would have moved.
    assert EventTokenizer.fit(changed.events, n_value_bins=5).value_bins != before


def test_training_pipeline_fits_the_tokenizer_on_train_only(tiny_model_dir):
    data, model = tiny_model_dir
    ds = load_meds(data)
    saved = EventTokenizer.load(model)
    on_train = EventTokenizer.fit(train_events(ds), n_value_bins=10, min_code_subjects=1)
    on_all = EventTokenizer.fit(ds.events, n_value_bins=10, min_code_subjects=1)
    assert saved.value_bins == on_train.value_bins
    assert saved.value_bins != on_all.value_bins


def test_value_bins_are_quantiles_of_the_training_values():
    train = frame([(s, T0 + timedelta(hours=v), "LAB", float(v)) for s in (1, 2) for v in range(1, 9)])
    tok = EventTokenizer.fit(train, n_value_bins=4, min_code_subjects=1)
    np.testing.assert_allclose(tok.value_bins["LAB"], np.quantile(np.arange(1, 9), [0.25, 0.5, 0.75]))


@pytest.mark.parametrize("min_code_subjects", [1, 2, 3])
def test_codes_of_too_few_training_subjects_are_unknown(min_code_subjects):
    # RARE is held by one subject (many times), COMMON by two, ALL by three.
    rows = [(1, T0 + timedelta(days=d), "RARE", 1.0 + d) for d in range(6)]
    rows += [(s, T0 + timedelta(days=10), "COMMON", None) for s in (1, 2)]
    rows += [(s, T0 + timedelta(days=20), "ALL", None) for s in (1, 2, 3)]
    events = frame(rows)
    tok = EventTokenizer.fit(events, min_code_subjects=min_code_subjects)
    held = {"RARE": 1, "COMMON": 2, "ALL": 3}
    for code, n in held.items():
        assert (code in tok.index) == (n >= min_code_subjects)
        if n >= min_code_subjects:
            assert tok.code_counts[code] == n
    subject1 = tok.encode(events)[0]
    names = tokens(tok, subject1.ids)
    assert names.count(UNK) == sum(
        n_events for code, n_events in (("RARE", 6), ("COMMON", 1), ("ALL", 1)) if held[code] < min_code_subjects
    )
    # An unknown code gets no value token (its values were never binned).
    assert all(not b.startswith("VALUE//") for a, b in zip(names, names[1:], strict=False) if a == UNK)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"n_value_bins": 1}, "n_value_bins"), ({"min_code_subjects": 0}, "min_code_subjects")],
)
def test_fit_rejects_bad_settings(kwargs, name):
    with pytest.raises(InputError, match=name):
        EventTokenizer.fit(frame([(1, T0, "A", None)]), **kwargs)


def test_codes_clashing_with_reserved_tokens():
    with pytest.raises(InputError, match="reserved"):
        EventTokenizer.fit(frame([(s, T0, "TIME//<=5m", None) for s in (1, 2)]))


# ---------------------------------------------------------------------------------------------- encoding
def test_static_codes_first_then_gaps_only_between_distinct_times():
    events = frame(
        [
            (7, T0, "A", None),
            (7, None, "GENDER//F", None),
            (7, T0, "B", None),
            (7, T0 + timedelta(minutes=10), "A", None),
            (7, T0 + timedelta(minutes=10), "B", None),
            (7, T0 + timedelta(days=2, minutes=10), "C", None),
        ]
    )
    tok = EventTokenizer.fit(events, min_code_subjects=1)
    (enc,) = tok.encode(events)
    assert enc.subject_id == 7
    assert tokens(tok, enc.ids) == [BOS, "GENDER//F", "A", "B", "TIME//5m-15m", "A", "B", "TIME//1d-3d", "C"]
    assert enc.event_index.tolist() == [-1, -1, 0, 1, 2, 2, 3, 4, 4]
    assert enc.n_events == 5


@pytest.mark.parametrize(
    ("seconds", "bucket"),
    [
        (1, "<=5m"),
        (300, "<=5m"),
        (301, "5m-15m"),
        (3600, "15m-1h"),
        (86400, "12h-1d"),
        (400 * 86400, "1y-2y"),
        (80 * 366 * 86400, ">70y"),
    ],
)
def test_time_gap_bucket_edges(seconds, bucket):
    events = frame([(1, T0, "A", None), (1, T0 + timedelta(seconds=seconds), "B", None)])
    tok = EventTokenizer.fit(events, min_code_subjects=1)
    assert tokens(tok, tok.encode(events)[0].ids) == [BOS, "A", f"TIME//{bucket}", "B"]


def test_static_codes_come_first_after_bos_on_every_subject(tiny_meds):
    ds = load_meds(tiny_meds)
    tok = EventTokenizer.fit(train_events(ds), min_code_subjects=1)
    encoded = tok.encode(ds.events)
    assert len(encoded) == 12
    for enc in encoded:
        assert enc.ids[0] == tok.bos_id and enc.event_index[0] == -1
        n_static = int((enc.event_index == -1).sum()) - 1
        assert n_static == 1
        assert tok.vocab[enc.ids[1]].startswith("GENDER//")
        assert np.all(np.diff(enc.event_index) >= 0)
        assert enc.n_events == ds.record_lengths().filter(pl.col("subject_id") == enc.subject_id)["n_events"][0]


def test_value_tokens_follow_their_code():
    train = frame([(s, T0 + timedelta(hours=v), "LAB", float(v)) for s in (1, 2) for v in range(1, 9)])
    tok = EventTokenizer.fit(train, n_value_bins=4, min_code_subjects=1)
    test = frame(
        [
            (9, T0, "LAB", -100.0),
            (9, T0, "LAB", 5.0),
            (9, T0, "LAB", None),
            (9, T0, "LAB", 100.0),
        ]
    )
    (enc,) = tok.encode(test)
    assert tokens(tok, enc.ids) == [BOS, "LAB", "VALUE//Q1", "LAB", "VALUE//Q3", "LAB", "LAB", "VALUE//Q4"]
    assert enc.event_index.tolist() == [-1, 0, 0, 1, 1, 2, 3, 3]
    assert tok.decode(enc.ids) == [("LAB", 0.0, 1), ("LAB", 0.0, 3), ("LAB", 0.0, None), ("LAB", 0.0, 4)]


def test_max_events_keeps_static_codes(tiny_meds):
    ds = load_meds(tiny_meds)
    tok = EventTokenizer.fit(train_events(ds), min_code_subjects=1)
    for enc in tok.encode(ds.events, max_events=3):
        assert enc.n_events == 3
        assert tok.vocab[enc.ids[1]].startswith("GENDER//")


# ---------------------------------------------------------------------------------------------- decoding
def test_decode_gives_back_codes_times_and_value_bins(tiny_meds):
    ds = load_meds(tiny_meds)
    tok = EventTokenizer.fit(train_events(ds), n_value_bins=4, min_code_subjects=1)
    encoded = {e.subject_id: e for e in tok.encode(ds.events)}
    n_checked_gaps = 0
    for (sid,), ev in ds.events.group_by("subject_id"):
        decoded = tok.decode(encoded[sid].ids)
        codes = [c if c in tok.index else UNK for c in ev["code"].to_list()]
        assert [d[0] for d in decoded] == codes
        elapsed = np.array([d[1] for d in decoded])
        assert np.all(np.diff(elapsed) >= 0)
        times = ev["time"].to_list()
        for i in range(1, len(times)):
            if times[i - 1] is None:
                assert elapsed[i] == 0.0
                continue
            gap = (times[i] - times[i - 1]).total_seconds()
            step = elapsed[i] - elapsed[i - 1]
            if gap == 0:
                assert step == 0
            else:
                lower, upper = bucket_bounds(gap)
                assert lower < step <= (upper if math.isfinite(upper) else np.inf)
                n_checked_gaps += 1
        for (code, _, vbin), value in zip(decoded, ev["numeric_value"].to_list(), strict=True):
            if value is None or code == UNK:
                assert vbin is None
            else:
                edges = np.asarray(tok.value_bins[code])
                assert vbin == 1 + min(int(np.searchsorted(edges, value, side="right")), tok.n_value_bins - 1)
    assert n_checked_gaps > 50


@pytest.mark.parametrize("bad", [-1, "vocab_size"])
def test_decode_refuses_ids_outside_the_vocabulary(bad):
    tok = EventTokenizer.fit(frame([(1, T0, "A", None)]), min_code_subjects=1)
    bad_id = tok.vocab_size if bad == "vocab_size" else bad
    with pytest.raises(InputError, match="outside the vocabulary"):
        tok.decode(np.array([tok.bos_id, bad_id]))


# ---------------------------------------------------------------------------------------------- unknowns
def test_unknown_codes_map_to_unk_and_their_rate_is_reported_per_split():
    train = frame(
        [(s, None, "GENDER//F", None) for s in (1, 2)]
        + [(s, T0 + timedelta(hours=h), c, None) for s in (1, 2) for h, c in enumerate("ABAB")]
    )
    held_out = frame(
        [
            (3, None, "GENDER//X", None),
            (3, T0, "A", None),
            (3, T0 + timedelta(hours=1), "Z", None),
            (3, T0 + timedelta(hours=2), "Z", None),
        ]
    )
    tok = EventTokenizer.fit(train, min_code_subjects=1)
    assert "Z" not in tok.index
    (enc,) = tok.encode(held_out)
    assert tokens(tok, enc.ids) == [BOS, UNK, "A", "TIME//15m-1h", UNK, "TIME//15m-1h", UNK]
    assert [d[0] for d in tok.decode(enc.ids)] == [UNK, "A", UNK, UNK]
    rates = {"train": tok.unknown_rate(tok.encode(train)), "held_out": tok.unknown_rate([enc])}
    assert rates == {"train": 0.0, "held_out": pytest.approx(3 / 4)}
    assert tok.unknown_rate([]) == 0.0


# ---------------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("horizon", [1, 3, 100])
def test_prompt_and_continuation_partition_the_timed_events(tiny_meds, horizon):
    ds = load_meds(tiny_meds)
    tok = EventTokenizer.fit(train_events(ds), min_code_subjects=1)
    for enc in tok.encode(ds.events):
        assert tokens(tok, enc.prompt(0))[0] == BOS and len(enc.prompt(0)) == 2  # [BOS] + gender
        for k in range(enc.n_events + 1):
            prompt, rest = enc.prompt(k), enc.continuation(k)
            np.testing.assert_array_equal(np.concatenate([prompt, rest]), enc.ids)
            window = enc.continuation(k, horizon)
            np.testing.assert_array_equal(window, rest[: len(window)])
            np.testing.assert_array_equal(np.concatenate([prompt, window, enc.continuation(k + horizon)]), enc.ids)
            events_in_window = set(enc.event_index[len(prompt) : len(prompt) + len(window)].tolist())
            assert events_in_window == set(range(k, min(k + horizon, enc.n_events)))
            if k > 0:
                assert tok.token_kind[prompt[-1]] != 2  # a time-gap token belongs to the event after it
            if len(rest):
                assert tok.token_kind[rest[0]] != 3  # never cut between a code and its value


# ---------------------------------------------------------------------------------------------- persistence
def test_save_load_round_trip(tiny_meds, tmp_path):
    ds = load_meds(tiny_meds)
    tok = EventTokenizer.fit(train_events(ds), n_value_bins=6, min_code_subjects=2)
    tok.save(tmp_path / "tok")
    back = EventTokenizer.load(tmp_path / "tok")
    assert back.vocab == tok.vocab
    assert back.value_bins == tok.value_bins
    assert back.code_counts == tok.code_counts
    assert (back.n_value_bins, back.min_code_subjects) == (6, 2)
    for a, b in zip(tok.encode(ds.events), back.encode(ds.events), strict=True):
        assert a.subject_id == b.subject_id
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.event_index, b.event_index)
        assert tok.decode(a.ids) == back.decode(b.ids)


@pytest.mark.parametrize("damage", ["gap", "repeat", "drop_column"])
def test_load_refuses_a_damaged_vocabulary_table(tiny_meds, tmp_path, damage):
    ds = load_meds(tiny_meds)
    EventTokenizer.fit(train_events(ds), min_code_subjects=1).save(tmp_path)
    fp = tmp_path / VOCAB_FILE
    table = pl.read_parquet(fp)
    idx = pl.col(VOCAB_INDEX)
    if damage == "gap":
        table = table.with_columns(pl.when(idx >= 10).then(idx + 1).otherwise(idx).alias(VOCAB_INDEX))
    elif damage == "repeat":
        table = table.with_columns(pl.when(idx == 5).then(4).otherwise(idx).alias(VOCAB_INDEX))
    else:
        table = table.drop(VOCAB_INDEX)
    table.write_parquet(fp)
    with pytest.raises(InputError) as info:
        EventTokenizer.load(tmp_path)
    assert str(fp) in str(info.value) and repr(VOCAB_INDEX) in str(info.value)


def test_load_names_missing_files(tmp_path):
    with pytest.raises(InputError, match=VOCAB_FILE):
        EventTokenizer.load(tmp_path)
