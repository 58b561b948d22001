"""Tests for the sensitivity catalogue: matching on real MIMIC-IV demo codes, validation, extension."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ehrmem.data.catalogue import HARM_TIERS, Catalogue, default_catalogue, harm_tier, load_catalogue
from ehrmem.errors import InputError

BRIEF_CATEGORIES = {
    "hiv": "stigmatised",
    "substance_use": "stigmatised",
    "alcohol_use_disorder": "stigmatised",
    "mental_illness": "stigmatised",
    "sexually_transmitted_infection": "stigmatised",
    "pregnancy_loss_abortion": "stigmatised",
    "self_harm": "stigmatised",
    "abuse_violence": "stigmatised",
    "cancer": "serious",
    "serious_chronic_disease": "serious",
    "hypertension": "low",
    "type2_diabetes": "low",
}

# Real demo diagnosis codes (checked to be present below) and the categories they must (and must not) hit.
DEMO_EXPECTATIONS: list[tuple[str, set[str], set[str]]] = [
    ("DIAGNOSIS//ICD//9//V08", {"hiv"}, {"hypertension"}),
    ("DIAGNOSIS//ICD//10//B20", {"hiv"}, set()),
    ("DIAGNOSIS//ICD//10//Z21", {"hiv"}, set()),
    ("DIAGNOSIS//ICD//9//4019", {"hypertension"}, {"hiv", "serious_chronic_disease"}),
    ("DIAGNOSIS//ICD//10//I10", {"hypertension"}, {"hiv"}),
    ("DIAGNOSIS//ICD//10//I272", set(), {"hypertension"}),  # pulmonary hypertension
    ("DIAGNOSIS//ICD//9//5723", {"serious_chronic_disease"}, {"hypertension"}),  # portal hypertension
    ("DIAGNOSIS//ICD//10//F1020", {"alcohol_use_disorder"}, {"substance_use"}),
    ("DIAGNOSIS//ICD//9//30390", {"alcohol_use_disorder"}, {"substance_use"}),
    ("DIAGNOSIS//ICD//9//V113", {"alcohol_use_disorder"}, set()),
    ("DIAGNOSIS//ICD//10//K7030", {"alcohol_use_disorder", "serious_chronic_disease"}, set()),
    ("DIAGNOSIS//ICD//10//F1410", {"substance_use"}, {"alcohol_use_disorder"}),
    ("DIAGNOSIS//ICD//9//30553", {"substance_use"}, {"alcohol_use_disorder"}),
    ("DIAGNOSIS//ICD//9//3051", {"tobacco_use"}, {"substance_use", "alcohol_use_disorder"}),
    ("DIAGNOSIS//ICD//10//F17210", {"tobacco_use"}, {"substance_use"}),
    ("DIAGNOSIS//ICD//10//F209", {"mental_illness"}, set()),
    ("DIAGNOSIS//ICD//9//29680", {"mental_illness"}, set()),
    ("DIAGNOSIS//ICD//9//311", {"mental_illness"}, set()),
    ("DIAGNOSIS//ICD//10//F419", set(), {"mental_illness"}),  # unspecified anxiety: left out on purpose
    ("DIAGNOSIS//ICD//10//F0390", set(), {"mental_illness"}),  # dementia
    ("DIAGNOSIS//ICD//10//R45851", {"self_harm"}, set()),
    ("DIAGNOSIS//ICD//9//V6284", {"self_harm"}, set()),
    ("DIAGNOSIS//ICD//10//T383X1A", set(), {"self_harm"}),  # accidental poisoning
    ("DIAGNOSIS//ICD//10//Y040XXA", {"abuse_violence"}, set()),
    ("DIAGNOSIS//ICD//10//C3490", {"cancer"}, set()),
    ("DIAGNOSIS//ICD//9//1629", {"cancer"}, set()),
    ("DIAGNOSIS//ICD//9//V103", {"cancer"}, set()),
    ("DIAGNOSIS//ICD//9//V163", set(), {"cancer"}),  # family history only
    ("DIAGNOSIS//ICD//9//2252", set(), {"cancer"}),  # benign neoplasm
    ("DIAGNOSIS//ICD//10//N186", {"serious_chronic_disease"}, set()),
    ("DIAGNOSIS//ICD//9//42823", {"serious_chronic_disease"}, set()),
    ("DIAGNOSIS//ICD//10//E119", {"type2_diabetes"}, set()),
    ("DIAGNOSIS//ICD//9//25000", {"type2_diabetes"}, set()),
    ("DIAGNOSIS//ICD//10//E1010", set(), {"type2_diabetes"}),  # type 1
    ("DIAGNOSIS//ICD//10//B009", set(), {"sexually_transmitted_infection"}),  # non-genital herpes
    ("MEDICATION//START//Methadone", {"substance_use"}, set()),
    ("MEDICATION//Raltegravir//Administered", {"hiv"}, set()),
    ("MEDICATION//START//Methylnaltrexone", set(), {"substance_use", "alcohol_use_disorder"}),
    ("MEDICATION//START//Tamoxifen Citrate", {"cancer"}, set()),
]


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return default_catalogue()


@pytest.fixture(scope="module")
def demo_codes(demo_data: Path) -> pl.DataFrame:
    return pl.read_parquet(demo_data / "metadata" / "codes.parquet")


@pytest.fixture(scope="module")
def demo_events(demo_data: Path) -> pl.DataFrame:
    return pl.read_parquet(demo_data / "data" / "**" / "*.parquet", columns=["subject_id", "code"])


def _hits(catalogue: Catalogue, code: str, descriptions: dict[str, str] | None = None) -> set[str]:
    return {name for name, mask in catalogue.match([code], descriptions).items() if mask[0]}


# ------------------------------------------------------------------------------------------------------
# The packaged catalogue
# ------------------------------------------------------------------------------------------------------


def test_packaged_catalogue_has_the_categories_and_tiers(catalogue: Catalogue) -> None:
    for name, tier in BRIEF_CATEGORIES.items():
        assert name in catalogue
        assert catalogue.harm_tier(name) == tier
        assert harm_tier(name) == tier
        assert catalogue[name].description
    assert {c.tier for c in catalogue.categories.values()} <= set(HARM_TIERS)
    assert catalogue.by_tier("serious") == ["cancer", "serious_chronic_disease"]


def test_unknown_category_or_tier_is_an_input_error(catalogue: Catalogue) -> None:
    with pytest.raises(InputError, match="Unknown sensitive category"):
        catalogue.harm_tier("hiv_typo")
    with pytest.raises(InputError, match="Unknown harm tier"):
        catalogue.by_tier("mild")


@pytest.mark.parametrize(("code", "must", "must_not"), DEMO_EXPECTATIONS)
def test_real_demo_codes_fall_into_the_right_categories(
    catalogue: Catalogue, demo_events: pl.DataFrame, code: str, must: set[str], must_not: set[str]
) -> None:
    assert demo_events.filter(pl.col("code") == code).height > 0, f"{code} is not in the demo data"
    hits = _hits(catalogue, code)
    assert must <= hits
    assert not (must_not & hits)


def test_parent_code_notation_matches_like_the_meds_code(catalogue: Catalogue, demo_codes: pl.DataFrame) -> None:
    # Every demo diagnosis code has its ICD9CM/ICD10CM parent (dotted); both notations must agree.
    rows = (
        demo_codes.filter(pl.col("code").str.starts_with("DIAGNOSIS//ICD"))
        .with_columns(pl.col("parent_codes").list.first().alias("parent"))
        .filter(pl.col("parent").str.contains(r"^ICD(9|10)CM/"))
    )
    assert rows.height > 1000
    by_code = catalogue.match(rows["code"])
    by_parent = catalogue.match(rows["parent"])
    for name in catalogue.names:
        mismatch = rows.filter(pl.Series(by_code[name] != by_parent[name]))
        assert mismatch.height == 0, (name, mismatch.head(3).to_dicts())
    assert by_code["hiv"].sum() >= 3 and by_code["hypertension"].sum() >= 5


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("DIAGNOSIS//ICD//10//F10.2", {"alcohol_use_disorder"}),
        ("DIAGNOSIS//ICD//10//F10.20", {"alcohol_use_disorder"}),
        ("ICD10CM/F10.20", {"alcohol_use_disorder"}),
        ("ICD9CM/303.91", {"alcohol_use_disorder"}),
        ("icd10cm/b20", {"hiv"}),
        ("ICD//9//042", {"hiv"}),
        ("DIAGNOSIS//ICD//10//T402X2A", {"self_harm"}),
        ("DIAGNOSIS//ICD//10//T40602A", {"self_harm"}),
        ("DIAGNOSIS//ICD//10//T71162A", {"self_harm"}),
        ("DIAGNOSIS//ICD//10//T402X3A", {"abuse_violence"}),
        ("DIAGNOSIS//ICD//10//T402X5A", set()),  # adverse effect in therapeutic use
        ("DIAGNOSIS//ICD//9//E9500", {"self_harm"}),
        ("DIAGNOSIS//ICD//9//25001", set()),  # type I
        ("PROCEDURE//ICD//9//6901", {"pregnancy_loss_abortion"}),
        ("ICD10PCS/10A07ZZ", {"pregnancy_loss_abortion"}),
        ("PROCEDURE//ICD//9//042", set()),  # a procedure code is never a diagnosis pattern
        ("DIAGNOSIS//ICD//10//042", set()),  # ICD-9 patterns never match ICD-10 codes
        ("LAB//51301//K/uL", set()),
        ("MEDS_BIRTH", set()),
    ],
)
def test_code_formats_versions_and_kinds(catalogue: Catalogue, code: str, expected: set[str]) -> None:
    assert _hits(catalogue, code) == expected


def test_medication_descriptions_are_searched_when_given(catalogue: Catalogue, demo_codes: pl.DataFrame) -> None:
    # INFUSION_START//227520 is methadone, but only its description says so.
    code = "INFUSION_START//227520"
    desc = dict(demo_codes.select("code", "description").drop_nulls().iter_rows())
    assert "methadone" in desc[code].lower()
    assert "substance_use" not in _hits(catalogue, code)
    assert "substance_use" in _hits(catalogue, code, desc)


def test_category_codes_on_a_vocabulary(catalogue: Catalogue) -> None:
    vocab = ["[PAD]", "DIAGNOSIS//ICD//9//V08", "DIAGNOSIS//ICD//10//I10", "DIAGNOSIS//ICD//10//B20"]
    ids = catalogue.category_codes(vocab)
    assert ids["hiv"] == {1, 3}
    assert ids["hypertension"] == {2}
    assert ids["cancer"] == set()
    by_map = catalogue.category_codes({"DIAGNOSIS//ICD//9//V08": 17, "LAB//x": 4})
    assert by_map["hiv"] == {17}


def test_match_keeps_order_and_duplicates(catalogue: Catalogue) -> None:
    codes = ["DIAGNOSIS//ICD//9//V08", "LAB//x", "DIAGNOSIS//ICD//9//V08"]
    assert catalogue.match(codes)["hiv"].tolist() == [True, False, True]
    assert catalogue.match([])["hiv"].shape == (0,)


def test_subject_flags_on_the_demo(catalogue: Catalogue, demo_events: pl.DataFrame) -> None:
    flags = catalogue.subject_flags(demo_events)
    assert flags.height == demo_events["subject_id"].n_unique()
    # Independent check for HIV: subjects with one of the HIV diagnosis codes or an antiretroviral.
    hiv_codes = ["DIAGNOSIS//ICD//9//V08", "DIAGNOSIS//ICD//10//B20", "DIAGNOSIS//ICD//10//Z21"]
    expected = set(
        demo_events.filter(
            pl.col("code").is_in(hiv_codes)
            | pl.col("code").str.contains(r"(?i)^MEDICATION//.*(raltegravir|darunavir|emtricitabine|stribild)")
        )["subject_id"].unique()
    )
    assert set(flags.filter(pl.col("hiv"))["subject_id"]) == expected
    assert 1 <= len(expected) <= 5
    counts = {name: int(flags[name].sum()) for name in catalogue.names}
    assert counts["hypertension"] > counts["hiv"]
    assert counts["cancer"] > 0 and counts["mental_illness"] > 0


# ------------------------------------------------------------------------------------------------------
# User catalogues: validation and extension
# ------------------------------------------------------------------------------------------------------

GOOD = """
categories:
  - name: hepatitis_c
    tier: serious
    description: chronic hepatitis C
    icd9cm: ["070.44", "070.54", "070.7"]
    icd10cm: ["B18.2", "B19.2"]
"""


def _write(tmp_path: Path, text: str, name: str = "cat.yaml") -> Path:
    fp = tmp_path / name
    fp.write_text(text)
    return fp


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ("  - name: hiv2\n    tier: secret\n    icd10cm: ['B20']\n", ["'hiv2'", "tier", "secret", "stigmatised"]),
        ("  - name: empty\n    tier: low\n", ["'empty'", "no patterns"]),
        (
            "  - name: dup\n    tier: low\n    icd10cm: ['I10']\n  - name: dup\n    tier: low\n    icd10cm: ['I11']\n",
            ["duplicate", "dup"],
        ),
        ("  - name: rng\n    tier: low\n    icd10cm: ['F10-F19']\n", ["'rng'", "malformed", "F10-F19"]),
        ("  - name: cls\n    tier: low\n    icd10cm: ['F1[9-0]']\n", ["'cls'", "F1[9-0]"]),
        ("  - name: blank\n    tier: low\n    icd10cm: ['  ']\n", ["'blank'", "empty ICD pattern"]),
        ("  - name: num\n    tier: stigmatised\n    icd9cm: [042]\n", ["'num'", "icd9cm", "quoted"]),
        ("  - name: rx\n    tier: low\n    medications: ['(methadone']\n", ["'rx'", "medications", "(methadone"]),
        ("  - name: any\n    tier: low\n    medications: ['.*']\n", ["'any'", "every code"]),
        ("  - name: look\n    tier: low\n    medications: ['(?<!methyl)naltrexone']\n", ["'look'", "look-around"]),
        ("  - name: typo\n    tier: low\n    icd10: ['I10']\n", ["'typo'", "icd10", "Extra"]),
        ("  - name: Bad Name\n    tier: low\n    icd10cm: ['I10']\n", ["Bad Name", "name"]),
    ],
)
def test_bad_user_catalogue_names_file_category_and_value(tmp_path: Path, body: str, fragments: list[str]) -> None:
    fp = _write(tmp_path, "categories:\n" + body)
    with pytest.raises(InputError) as info:
        load_catalogue(fp)
    message = str(info.value)
    assert str(fp) in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("categories: [", "not valid YAML"), ("- a\n- b\n", "mapping"), ("version: 2\ncategories: []\n", "version")],
)
def test_unreadable_user_catalogue(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment):
        load_catalogue(_write(tmp_path, text))


def test_missing_catalogue_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_catalogue(tmp_path / "nope.yaml")


def test_replace_catalogue(tmp_path: Path) -> None:
    cat = load_catalogue(_write(tmp_path, GOOD))
    assert cat.names == ["hepatitis_c"]
    assert cat.match(["DIAGNOSIS//ICD//9//07054", "DIAGNOSIS//ICD//10//B182"])["hepatitis_c"].all()
    assert cat.sources == (str(tmp_path / "cat.yaml"),)


def test_extend_adds_categories_and_merges_patterns(tmp_path: Path) -> None:
    extra = (
        GOOD
        + """
  - name: hiv
    tier: stigmatised
    medications: ['\\btenofovir\\b']
"""
    )
    cat = load_catalogue(extend=_write(tmp_path, extra))
    base = default_catalogue()
    assert cat.names == [*base.names, "hepatitis_c"]
    assert cat.harm_tier("hepatitis_c") == "serious"
    assert "\\btenofovir\\b" in cat["hiv"].medications
    assert set(base["hiv"].icd10cm) == set(cat["hiv"].icd10cm)
    hits = cat.match(["MEDICATION//START//Tenofovir Disoproxil", "DIAGNOSIS//ICD//9//V08"])
    assert hits["hiv"].tolist() == [True, True]
    assert not base.match(["MEDICATION//START//Tenofovir Disoproxil"])["hiv"][0]


def test_extension_cannot_change_a_tier(tmp_path: Path) -> None:
    fp = _write(tmp_path, "categories:\n  - name: hiv\n    tier: low\n    icd10cm: ['B20']\n")
    with pytest.raises(InputError, match="harm tier") as info:
        load_catalogue(extend=[fp])
    assert str(fp) in str(info.value)


def test_extension_can_add_medication_code_prefixes(tmp_path: Path) -> None:
    fp = _write(
        tmp_path,
        "medication_code_prefixes: ['RX']\ncategories:\n  - name: hiv\n    tier: stigmatised\n"
        "    medications: ['\\bdolutegravir\\b']\n",
    )
    cat = load_catalogue(extend=fp)
    assert "RX" in cat.medication_code_prefixes
    assert cat.match(["RX//Dolutegravir 50 mg"])["hiv"].tolist() == [True]
    assert not np.any(default_catalogue().match(["RX//Dolutegravir 50 mg"])["hiv"])
