"""The sensitivity catalogue: which codes reveal a sensitive condition, and how harmful disclosure is.

The catalogue ships with the package (``sensitive_catalogue.yaml``) and lists categories such as HIV,
substance use or cancer, each with a harm tier (``stigmatised`` > ``serious`` > ``low``), ICD-9-CM and
ICD-10-CM diagnosis patterns, optional ICD procedure patterns and optional medication patterns. T2 asks
whether the model discloses a category; T3 probes embeddings for it; the risk matrix crosses its tier
with the likelihood of disclosure.

Matching
--------
ICD patterns are prefixes of the undotted code, compared only with codes of the same ICD version and
kind (diagnosis or procedure), so ICD-9 ``042`` (HIV) never matches an ICD-10 code or the ICD-9
procedure ``04.2``. The version and kind come from the MEDS code string: ``DIAGNOSIS//ICD//9//V08``,
``DIAGNOSIS//ICD//10//F10.20``, ``ICD10CM/F10.20``, ``ICD9CM/303.91``, ``PROCEDURE//ICD//9//6901``,
``ICD10PCS/10A07ZZ``. In a pattern, dots are ignored, ``?`` is any one character and ``[...]`` one
character of a set or range. Medication patterns are case-insensitive regular expressions searched in
codes whose first ``//`` part is one of the catalogue's ``medication_code_prefixes`` (and in their
descriptions when given).

Extending
---------
``load_catalogue(extend="mine.yaml")`` adds the categories of ``mine.yaml`` to the packaged ones; a
category that already exists gains the extension's patterns (its tier must be the same).
``load_catalogue("mine.yaml")`` replaces the packaged catalogue. Every file is validated on load; a bad
entry raises :class:`~ehrmem.errors.InputError` naming the file, the category, the field and the value.

Examples
--------
>>> cat = default_catalogue()
>>> hits = cat.match(["DIAGNOSIS//ICD//9//V08", "DIAGNOSIS//ICD//10//I10", "ICD10CM/F10.20"])
>>> hits["hiv"].tolist(), hits["alcohol_use_disorder"].tolist()
([True, False, False], [False, False, True])
>>> cat.harm_tier("hiv")
'stigmatised'
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from ehrmem.data.hierarchy import DIAGNOSIS_KIND, PROCEDURE_KIND, icd_parts
from ehrmem.data.meds import CODE, SUBJECT_ID
from ehrmem.errors import InputError

__all__ = [
    "HARM_TIERS",
    "Catalogue",
    "Category",
    "HarmTier",
    "default_catalogue",
    "harm_tier",
    "load_catalogue",
]

logger = logging.getLogger(__name__)

HarmTier = Literal["stigmatised", "serious", "low"]
HARM_TIERS: tuple[str, ...] = ("stigmatised", "serious", "low")  # most harmful first

DEFAULT_CATALOGUE_FILE = "sensitive_catalogue.yaml"

# (field name, ICD kind, ICD version) of the ICD pattern fields.
ICD_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("icd9cm", DIAGNOSIS_KIND, 9),
    ("icd10cm", DIAGNOSIS_KIND, 10),
    ("icd9proc", PROCEDURE_KIND, 9),
    ("icd10pcs", PROCEDURE_KIND, 10),
)
PATTERN_FIELDS: tuple[str, ...] = (*(f for f, _, _ in ICD_FIELDS), "medications")

# One pattern element: a letter or digit, "?" (any one character) or a class such as [0-4] or [13467].
_CLASS = r"\[(?:[A-Z0-9](?:-[A-Z0-9])?)+\]"
_ICD_PATTERN_RE = re.compile(rf"^(?:[A-Z0-9?]|{_CLASS})+$")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_ICD_PATTERN_HELP = (
    "a prefix of the undotted code made of letters, digits, '?' (any one character) and classes such "
    "as '[0-4]' or '[13467]'; ranges of codes are written as classes ('F1[0-9]'), not 'F10-F19'"
)


# --------------------------------------------------------------------------------------------------------
# File schema (pydantic) and validation
# --------------------------------------------------------------------------------------------------------


class _CategorySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    tier: HarmTier
    description: StrictStr = ""
    icd9cm: list[StrictStr] = Field(default_factory=list)
    icd10cm: list[StrictStr] = Field(default_factory=list)
    icd9proc: list[StrictStr] = Field(default_factory=list)
    icd10pcs: list[StrictStr] = Field(default_factory=list)
    medications: list[StrictStr] = Field(default_factory=list)


class _CatalogueSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    medication_code_prefixes: list[StrictStr] = Field(default_factory=lambda: ["MEDICATION"])
    categories: list[_CategorySpec]


def _category_name(raw: Any, index: int) -> str:
    try:
        name = raw["categories"][index]["name"]
    except (KeyError, IndexError, TypeError):
        return f"#{index + 1}"
    return repr(name) if isinstance(name, str) else f"#{index + 1}"


def _expected_for(loc: tuple[Any, ...], err_type: str) -> str:
    last = next((p for p in reversed(loc) if isinstance(p, str)), "")
    if last == "tier":
        return f"one of {', '.join(HARM_TIERS)}"
    if last in PATTERN_FIELDS:
        return "a list of quoted strings (YAML reads an unquoted 042 as a number)"
    if err_type == "extra_forbidden":
        fields = ", ".join(("name", "tier", "description", *PATTERN_FIELDS))
        return f"only the fields {fields} in a category (version, medication_code_prefixes, categories at top)"
    if last == "version":
        return "version: 1"
    return "see the packaged sensitive_catalogue.yaml for the format"


def _raise_validation(err: ValidationError, raw: Any, source: str) -> None:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    where = "the catalogue"
    if len(loc) >= 2 and loc[0] == "categories" and isinstance(loc[1], int):
        where = f"category {_category_name(raw, loc[1])}"
    field_path = ".".join(str(p) for p in loc[2:]) if where != "the catalogue" else ".".join(map(str, loc))
    raise InputError(
        f"Invalid sensitivity catalogue: {where}, field {field_path or '?'}: {first['msg']}"
        + (f" ({len(err.errors()) - 1} more problem(s))" if len(err.errors()) > 1 else ""),
        file=source,
        column=field_path or None,
        value=first.get("input"),
        expected=_expected_for(loc, first["type"]),
    ) from None


def _normalise_icd_pattern(pattern: str) -> str:
    return pattern.strip().upper().replace(".", "")


def _icd_regex(patterns: Iterable[str]) -> str:
    # "?" -> any character; classes and literals are regex already (validated).
    return "^(?:" + "|".join(p.replace("?", ".") for p in patterns) + ")"


def _polars_accepts(regex: str) -> bool:
    try:
        pl.Series([""], dtype=pl.String).str.contains(regex)
    except Exception:  # polars raises ComputeError for a regex its engine rejects
        return False
    return True


def _check_class_ranges(pattern: str) -> bool:
    return all(start <= end for start, end in re.findall(r"([A-Z0-9])-([A-Z0-9])", pattern))


# --------------------------------------------------------------------------------------------------------
# The catalogue
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Category:
    """One sensitive category: its tier, description and (normalised) patterns.

    ICD patterns are upper-case and undotted; medication patterns are regular expressions matched
    case-insensitively.
    """

    name: str
    tier: HarmTier
    description: str = ""
    icd9cm: tuple[str, ...] = ()
    icd10cm: tuple[str, ...] = ()
    icd9proc: tuple[str, ...] = ()
    icd10pcs: tuple[str, ...] = ()
    medications: tuple[str, ...] = ()

    def icd_regex(self, field_name: str) -> str | None:
        """The anchored regular expression of one ICD pattern field, or ``None`` when it is empty."""
        patterns = getattr(self, field_name)
        return _icd_regex(patterns) if patterns else None

    @property
    def medication_regex(self) -> str | None:
        """The case-insensitive regular expression of the medication patterns, or ``None``."""
        return "(?i)(?:" + "|".join(self.medications) + ")" if self.medications else None


def _validate_category(spec: _CategorySpec, source: str) -> Category:
    """Normalise one parsed category and check its patterns, or raise naming file, category and value."""
    where = f"category {spec.name!r}"

    def fail(message: str, column: str, value: object, expected: str) -> None:
        raise InputError(
            f"Invalid sensitivity catalogue: {where}: {message}",
            file=source,
            column=column,
            value=value,
            expected=expected,
        )

    if not _NAME_RE.match(spec.name):
        fail("bad category name.", "name", spec.name, "lower-case letters, digits and '_', starting with a letter")
    if not any(getattr(spec, f) for f in PATTERN_FIELDS):
        fail("the category has no patterns.", ", ".join(PATTERN_FIELDS), [], "at least one ICD or medication pattern")

    normalised: dict[str, tuple[str, ...]] = {}
    for field_name, _, _ in ICD_FIELDS:
        out = []
        for raw in getattr(spec, field_name):
            pattern = _normalise_icd_pattern(raw)
            if not pattern:
                fail("empty ICD pattern.", field_name, raw, _ICD_PATTERN_HELP)
            if not _ICD_PATTERN_RE.match(pattern) or not _check_class_ranges(pattern):
                fail("malformed ICD pattern.", field_name, raw, _ICD_PATTERN_HELP)
            out.append(pattern)
        normalised[field_name] = tuple(dict.fromkeys(out))

    meds = []
    for raw in spec.medications:
        if not raw.strip():
            fail("empty medication pattern.", "medications", raw, "a regular expression such as '\\bmethadone\\b'")
        try:
            compiled = re.compile(raw, re.IGNORECASE)
        except re.error as err:
            fail(f"malformed medication pattern ({err}).", "medications", raw, "a valid regular expression")
        if compiled.search("") is not None:
            fail(
                "the medication pattern matches every code.",
                "medications",
                raw,
                "a pattern that needs at least one character, e.g. '\\bmethadone\\b'",
            )
        if not _polars_accepts("(?i)" + raw):
            fail(
                "the medication pattern uses syntax the matching engine does not support (look-around, "
                "back-references).",
                "medications",
                raw,
                "a regular expression without look-around",
            )
        meds.append(raw)

    return Category(
        name=spec.name,
        tier=spec.tier,
        description=" ".join(spec.description.split()),
        medications=tuple(dict.fromkeys(meds)),
        **normalised,
    )


def _read_spec(path: Path | str, text: str | None = None) -> tuple[_CatalogueSpec, list[Category]]:
    source = str(path)
    if text is None:
        fp = Path(path)
        if not fp.is_file():
            raise InputError(
                "The sensitivity catalogue file does not exist.",
                file=fp,
                expected="a YAML file like the packaged sensitive_catalogue.yaml",
            )
        text = fp.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InputError(
            f"The sensitivity catalogue is not valid YAML: {err}",
            file=source,
            expected="a YAML mapping with a 'categories' list",
        ) from None
    if not isinstance(raw, dict):
        raise InputError(
            "The sensitivity catalogue must be a YAML mapping.",
            file=source,
            value=type(raw).__name__,
            expected="a mapping with a 'categories' list",
        )
    try:
        spec = _CatalogueSpec.model_validate(raw)
    except ValidationError as err:
        _raise_validation(err, raw, source)
        raise  # unreachable: _raise_validation always raises
    seen: set[str] = set()
    for cat in spec.categories:
        if cat.name in seen:
            raise InputError(
                "Invalid sensitivity catalogue: duplicate category name.",
                file=source,
                column="name",
                value=cat.name,
                expected="each category name once per file",
            )
        seen.add(cat.name)
    for prefix in spec.medication_code_prefixes:
        if not prefix.strip() or "/" in prefix:
            raise InputError(
                "Invalid sensitivity catalogue: bad medication code prefix.",
                file=source,
                column="medication_code_prefixes",
                value=prefix,
                expected="the first '//' part of medication codes, e.g. MEDICATION",
            )
    return spec, [_validate_category(c, source) for c in spec.categories]


@dataclass(frozen=True)
class Catalogue:
    """A validated sensitivity catalogue.

    Attributes
    ----------
    categories
        Category name -> :class:`Category`, in file order.
    medication_code_prefixes
        First ``//`` parts of the codes that medication patterns are searched in.
    sources
        The files the catalogue was read from, for provenance.
    """

    categories: Mapping[str, Category]
    medication_code_prefixes: tuple[str, ...] = ("MEDICATION",)
    sources: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "categories", MappingProxyType(dict(self.categories)))

    @property
    def names(self) -> list[str]:
        """Category names, in catalogue order."""
        return list(self.categories)

    def __len__(self) -> int:
        return len(self.categories)

    def __contains__(self, name: object) -> bool:
        return name in self.categories

    def __getitem__(self, name: str) -> Category:
        return self._get(name)

    def _get(self, name: str) -> Category:
        try:
            return self.categories[name]
        except KeyError:
            raise InputError(
                "Unknown sensitive category.",
                column="category",
                value=name,
                expected=f"one of {', '.join(self.categories)}",
            ) from None

    def harm_tier(self, category: str) -> HarmTier:
        """The harm tier (``stigmatised``, ``serious`` or ``low``) of a category."""
        return self._get(category).tier

    def by_tier(self, tier: str) -> list[str]:
        """Names of the categories of one harm tier."""
        if tier not in HARM_TIERS:
            raise InputError("Unknown harm tier.", column="tier", value=tier, expected=f"one of {HARM_TIERS}")
        return [name for name, cat in self.categories.items() if cat.tier == tier]

    # ----------------------------------------------------------------------------------------------------
    # Matching
    # ----------------------------------------------------------------------------------------------------

    def _flag_exprs(self, with_descriptions: bool) -> list[pl.Expr]:
        kind, version, icd = pl.col("icd_kind"), pl.col("icd_version"), pl.col("icd_code")
        is_med = (
            pl.col(CODE)
            .str.split("//")
            .list.first()
            .str.strip_chars()
            .str.to_uppercase()
            .is_in([p.strip().upper() for p in self.medication_code_prefixes])
        )
        exprs = []
        for name, cat in self.categories.items():
            expr = pl.lit(False)
            for field_name, icd_kind, icd_version in ICD_FIELDS:
                regex = cat.icd_regex(field_name)
                if regex is not None:
                    expr = expr | ((kind == icd_kind) & (version == icd_version) & icd.str.contains(regex)).fill_null(
                        False
                    )
            med = cat.medication_regex
            if med is not None:
                text_hit = pl.col(CODE).str.contains(med)
                if with_descriptions:
                    text_hit = text_hit | pl.col("_description").str.contains(med).fill_null(False)
                expr = expr | (is_med & text_hit)
            exprs.append(expr.alias(name))
        return exprs

    def match_frame(
        self, codes: Sequence[str] | pl.Series, descriptions: Mapping[str, str] | None = None
    ) -> pl.DataFrame:
        """One boolean column per category for each distinct code.

        Parameters
        ----------
        codes
            MEDS code strings (duplicates are matched once).
        descriptions
            ``code -> description``; medication patterns are also searched there (e.g. for
            ``INFUSION_START//225975`` whose name lives only in ``codes.parquet``).

        Returns
        -------
        polars.DataFrame
            ``code`` (distinct, in first-seen order) then one boolean column per category.
        """
        series = codes if isinstance(codes, pl.Series) else pl.Series(CODE, list(codes), dtype=pl.String)
        unique = series.cast(pl.String).rename(CODE).drop_nulls().unique(maintain_order=True)
        frame = icd_parts(unique)
        if descriptions:
            frame = frame.with_columns(
                pl.col(CODE)
                .replace_strict(dict(descriptions), default=None, return_dtype=pl.String)
                .alias("_description")
            )
        return frame.select(CODE, *self._flag_exprs(bool(descriptions)))

    def match(
        self, codes: Sequence[str] | pl.Series, descriptions: Mapping[str, str] | None = None
    ) -> dict[str, np.ndarray]:
        """Which codes fall into each category.

        Parameters
        ----------
        codes
            MEDS code strings, e.g. ``DIAGNOSIS//ICD//10//B20``, ``ICD9CM/303.91``,
            ``MEDICATION//START//Methadone``.
        descriptions
            Optional ``code -> description`` searched by medication patterns.

        Returns
        -------
        dict of str to numpy.ndarray
            Category name -> boolean array aligned with ``codes``.
        """
        series = codes if isinstance(codes, pl.Series) else pl.Series(CODE, list(codes), dtype=pl.String)
        flags = self.match_frame(series, descriptions)
        aligned = pl.DataFrame({CODE: series.cast(pl.String).rename(CODE)}).join(
            flags, on=CODE, how="left", maintain_order="left"
        )
        return {name: aligned[name].fill_null(False).to_numpy().astype(bool) for name in self.categories}

    def category_codes(
        self, vocab: Sequence[str] | Mapping[str, int], descriptions: Mapping[str, str] | None = None
    ) -> dict[str, set[int]]:
        """Token ids of each category's codes in a vocabulary.

        Parameters
        ----------
        vocab
            A list of tokens (id = position, as ``EventTokenizer.vocab``) or a ``code -> id`` mapping.
        descriptions
            Optional ``code -> description`` searched by medication patterns.

        Returns
        -------
        dict of str to set of int
            Category name -> ids of the tokens that reveal it (possibly empty).
        """
        if isinstance(vocab, Mapping):
            codes, ids = list(vocab.keys()), np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab))
        else:
            codes, ids = list(vocab), np.arange(len(vocab), dtype=np.int64)
        hits = self.match(codes, descriptions)
        return {name: {int(i) for i in ids[mask]} for name, mask in hits.items()}

    def subject_flags(
        self,
        events: pl.DataFrame,
        *,
        subject_col: str = SUBJECT_ID,
        code_col: str = CODE,
        descriptions: Mapping[str, str] | None = None,
    ) -> pl.DataFrame:
        """Per subject, whether any of their events falls into each category.

        Parameters
        ----------
        events
            A MEDS events frame (at least ``subject_id`` and ``code``).
        subject_col, code_col
            Column names.
        descriptions
            Optional ``code -> description`` searched by medication patterns.

        Returns
        -------
        polars.DataFrame
            ``subject_id`` (every subject of ``events``, sorted) and one boolean column per category.
        """
        for col in (subject_col, code_col):
            if col not in events.columns:
                raise InputError(
                    "The events frame lacks a column.", column=col, expected=f"columns {subject_col!r} and {code_col!r}"
                )
        flags = self.match_frame(events[code_col], descriptions).rename({CODE: code_col})
        flagged = events.select(subject_col, code_col).join(flags, on=code_col, how="left")
        return (
            flagged.group_by(subject_col)
            .agg([pl.col(n).fill_null(False).any() for n in self.categories])
            .sort(subject_col)
        )

    # ----------------------------------------------------------------------------------------------------
    # Combining
    # ----------------------------------------------------------------------------------------------------

    def extended(self, other: Catalogue) -> Catalogue:
        """This catalogue plus another: new categories are appended, existing ones gain its patterns.

        Raises
        ------
        InputError
            When a category of ``other`` exists here with a different harm tier.
        """
        merged = dict(self.categories)
        for name, cat in other.categories.items():
            base = merged.get(name)
            if base is None:
                merged[name] = cat
                continue
            if base.tier != cat.tier:
                raise InputError(
                    "An extension changes the harm tier of an existing category.",
                    file=", ".join(other.sources) or None,
                    column=f"{name}.tier",
                    value=cat.tier,
                    expected=f"{base.tier!r} (the tier in {', '.join(self.sources)}) or a new category name",
                )
            merged[name] = Category(
                name=name,
                tier=base.tier,
                description=cat.description or base.description,
                **{f: tuple(dict.fromkeys(getattr(base, f) + getattr(cat, f))) for f in PATTERN_FIELDS},
            )
            logger.info("Category %r extended with patterns from %s", name, ", ".join(other.sources))
        prefixes = tuple(dict.fromkeys(self.medication_code_prefixes + other.medication_code_prefixes))
        return Catalogue(merged, prefixes, self.sources + other.sources)


def _catalogue_from_file(path: Path | str | None) -> Catalogue:
    if path is None:
        ref = resources.files("ehrmem.data").joinpath(DEFAULT_CATALOGUE_FILE)
        source = f"ehrmem/data/{DEFAULT_CATALOGUE_FILE}"
        spec, cats = _read_spec(source, ref.read_text(encoding="utf-8"))
    else:
        source = str(path)
        spec, cats = _read_spec(path)
    return Catalogue(
        {c.name: c for c in cats},
        tuple(p.strip() for p in spec.medication_code_prefixes),
        (source,),
    )


def load_catalogue(
    path: str | Path | None = None,
    extend: str | Path | Sequence[str | Path] | None = None,
) -> Catalogue:
    """Load and validate a sensitivity catalogue.

    Parameters
    ----------
    path
        A YAML file replacing the packaged catalogue; ``None`` for the packaged one.
    extend
        One or more YAML files whose categories are added to (or merged into) the catalogue, in order.

    Returns
    -------
    Catalogue

    Raises
    ------
    InputError
        For a missing or unreadable file, an unknown harm tier, a category without patterns, a duplicate
        category name, a malformed pattern, an unknown field, or an extension that changes a tier; the
        message names the file, the category, the field and the value.
    """
    catalogue = _catalogue_from_file(path)
    extensions = [extend] if isinstance(extend, str | Path) else list(extend or [])
    for ext in extensions:
        catalogue = catalogue.extended(_catalogue_from_file(ext))
    logger.debug("Sensitivity catalogue with %d categories from %s", len(catalogue), catalogue.sources)
    return catalogue


@lru_cache(maxsize=1)
def default_catalogue() -> Catalogue:
    """The packaged catalogue (loaded once)."""
    return load_catalogue()


def harm_tier(category: str, catalogue: Catalogue | None = None) -> HarmTier:
    """The harm tier of a category in ``catalogue`` (default: the packaged catalogue)."""
    return (catalogue or default_catalogue()).harm_tier(category)
