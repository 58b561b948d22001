"""T6 patients and subgroups: who carries the risk that T1, T2 and T4 measured?

T6 runs no model. It reads the per-subject tables of earlier tests (``context.previous``) and the MEDS
records, and builds four things:

Per-patient risk score
    Three per-subject signals, each rank-normalised among the audited patients that have it, so that
    their scales agree (a percentile: the share of the *other* audited patients whose signal is strictly
    lower; ties share the lower value, so patients with no signal at all score 0):

    - ``T4``: the membership score of T4's best attack (``best_attack`` of its section; higher = more
      member-like).
    - ``T1``: reconstruction lift, ``1 - emd_mean / baseline_emd_mean`` averaged over the tiers at which the
      patient was prompted: the share of the population-baseline distance to the patient's true future
      that their own prompt removes (0 = the prompt helps no more than knowing nothing).
    - ``T2``: sensitive exposure, the largest excess, over the categories the patient truly has after the
      prompt and over tiers, of the share of continuations revealing the category above the unconditioned
      model's rate for it (clipped at 0; 0 for a patient with no such category).

    ``risk_score = mean of the available rank-normalised components`` (equal weights, between 0 and 1).
    A patient missing a component (e.g. too short a record for any T1 prompt) is scored on the others;
    ``n_components`` says on how many. A missing or skipped test contributes no component, and the
    section says so.

Most exposed patients
    The ``top_n`` highest scores: subject id, member flag, score, components and the names of the sensitive
    categories the record holds. Never codes, events or values.

Subgroups
    Age bands at the first timed event after ``MEDS_BIRTH`` (including 90+, the ages HIPAA treats as
    identifying), sex (static ``GENDER//`` codes), holders of rare codes, holders of each sensitive
    category, and record-length quartiles. Per subgroup: sizes; membership AUC of T4's best attack with a
    stratified bootstrap interval; T1 leakage as an AUC (members' lift against non-members') and as mean
    lift per class with bootstrap intervals. A subgroup with fewer than ``min_group_size`` members or
    non-members (one class only included) is ``undefined`` with its counts and the reason, and no number
    at all (failure kind 1); the same rule applies to each metric after dropping subjects that lack it.

Uniqueness
    For each tier k and audited patient: how many training patients (other than the patient) have exactly
    the same prompt codes (static codes plus the codes of the first k timed events; codes sharing a
    timestamp are compared as a set, times and values are ignored), and the cosine distance of the
    prompt's bag of codes to its nearest training patient (scikit-learn ``NearestNeighbors``). Both are set
    against the patient's leakage by a Spearman correlation with a bootstrap interval, among members
    (the patients the model could have memorised).

"Training patients" are the subjects the cohort labels as members (training manifest or member splits),
whether or not length matching kept them in the audit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, field_validator
from scipy import sparse
from scipy.stats import rankdata, spearmanr

from ehrmem.audits.base import Audit, AuditContext, TestResult
from ehrmem.data.catalogue import Catalogue, default_catalogue, load_catalogue
from ehrmem.data.meds import BIRTH_CODE, CODE, SUBJECT_ID, TIME
from ehrmem.data.prompts import DEFAULT_TIERS, Tiers, tier_name
from ehrmem.errors import NumericalError
from ehrmem.stats import auc_summary, bootstrap_ci

logger = logging.getLogger(__name__)

COMPONENTS = ("T1", "T2", "T4")
_SECONDS_PER_YEAR = 365.25 * 86400.0
_KEY_SEP = "\x1f"

RISK_FORMULA = (
    "risk_score = mean over the available components c in {T1, T2, T4} of rank_c, where rank_c is the share of "
    "the other audited patients whose signal c is strictly lower (0 = lowest, 1 = highest). "
    "T4 = membership score of T4's best attack; T1 = reconstruction lift 1 - emd_mean / baseline_emd_mean, "
    "averaged over tiers; T2 = max over held categories and tiers of (share of continuations revealing the "
    "category - unconditioned rate), clipped at 0."
)


class PatientsConfig(BaseModel):
    """Settings of T6."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    min_group_size: int = Field(
        10, ge=2, description="fewest members and fewest non-members for any subgroup number (else undefined)"
    )
    rare_max_subjects: int = Field(
        5, ge=1, description="a code is rare when at most this many training patients hold it (the patient counted)"
    )
    top_n: int = Field(20, ge=0, description="most exposed patients listed in the report")
    n_bootstrap: int = Field(1000, ge=100)
    tiers: Tiers = Field(
        default_factory=lambda: list(DEFAULT_TIERS), description="prompt tiers (k timed events) for uniqueness"
    )
    age_bands: list[int] = Field(
        default_factory=lambda: [18, 40, 65, 90],
        description="lower edges (years) of the age bands after the first; the last band is open (90+ = over 89)",
    )
    sex_code_prefixes: list[str] = Field(default_factory=lambda: ["GENDER//", "SEX//"])

    @field_validator("age_bands")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if not v or any(b <= a for a, b in zip(v, v[1:], strict=False)) or v[0] <= 0:
            raise ValueError("age_bands must be positive, strictly increasing ages, e.g. [18, 40, 65, 90]")
        return v

    @field_validator("tiers")
    @classmethod
    def _tiers(cls, v: list[int]) -> list[int]:
        if any(k < 0 for k in v):
            raise ValueError("tiers are numbers of known timed events, 0 or more")
        return sorted(set(v))


# --------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------


def json_clean(obj: Any) -> Any:
    """A JSON-ready copy: numpy scalars and arrays become Python values, NaN and infinities become None."""
    if isinstance(obj, Mapping):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [json_clean(v) for v in obj.tolist()]
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def rank_normalise(values: Mapping[int, float]) -> dict[int, float]:
    """Percentile of each value among the others: share of the other entries strictly lower (ties low)."""
    if not values:
        return {}
    ids = list(values)
    x = np.array([values[s] for s in ids], dtype=float)
    if x.size == 1:
        return {ids[0]: 0.0}
    r = (rankdata(x, method="min") - 1.0) / (x.size - 1.0)
    return {s: float(v) for s, v in zip(ids, r, strict=True)}


def age_band_labels(edges: list[int]) -> list[str]:
    """Labels of the bands defined by ``edges``: ``<18``, ``18-39``, ..., ``90+ (over 89)``."""
    labels = [f"<{edges[0]}"]
    labels += [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:], strict=False)]
    labels.append(f"{edges[-1]}+ (over {edges[-1] - 1})")
    return labels


def age_band(age: float | None, edges: list[int]) -> str:
    if age is None or not math.isfinite(age):
        return "unknown"
    return age_band_labels(edges)[int(np.searchsorted(edges, age, side="right"))]


def _mean_ci(values: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    if values.size == 0:
        return {"mean": None, "ci95": None, "n": 0}
    if values.size == 1:
        return {"mean": float(values[0]), "ci95": None, "n": 1}
    lo, hi = bootstrap_ci(np.mean, values, n_boot=n_boot, seed=seed)
    return {"mean": float(values.mean()), "ci95": [lo, hi], "n": int(values.size)}


def _too_small(n_mem: int, n_non: int, min_size: int) -> str | None:
    if n_mem == 0 and n_non == 0:
        return "no audited patient is in this group; no number is reported"
    if n_mem == 0 or n_non == 0:
        return (
            f"one class only ({n_mem} members, {n_non} non-members): membership metrics need both; "
            "no number is reported"
        )
    if n_mem < min_size or n_non < min_size:
        return (
            f"too small: {n_mem} members and {n_non} non-members, at least {min_size} of each are needed; "
            "no number is reported"
        )
    return None


def spearman_summary(x: np.ndarray, y: np.ndarray, *, min_n: int, n_boot: int, seed: int) -> dict[str, Any]:
    """Spearman correlation with a percentile-bootstrap interval, or ``undefined`` with the reason."""
    n = int(x.size)
    out: dict[str, Any] = {"status": "undefined", "reason": None, "rho": None, "ci95": None, "n": n}
    if n < max(min_n, 3):
        out["reason"] = f"{n} patients; at least {max(min_n, 3)} are needed"
        return out
    if np.unique(x).size < 2 or np.unique(y).size < 2:
        out["reason"] = "one of the two quantities is the same for every patient, so no rank correlation exists"
        return out
    rho = float(spearmanr(x, y).statistic)
    out.update(status="ok", rho=rho)
    data = np.column_stack([x, y])
    try:
        out["ci95"] = list(
            bootstrap_ci(lambda d: spearmanr(d[:, 0], d[:, 1]).statistic, data, n_boot=n_boot, seed=seed)
        )
    except NumericalError:
        out["ci95_reason"] = "some bootstrap resamples had a constant quantity; no interval is reported"
    return out


# --------------------------------------------------------------------------------------------------------
# The audit
# --------------------------------------------------------------------------------------------------------


class PatientsAudit(Audit):
    """T6: per-patient risk, subgroups and uniqueness, from the results of T1, T2 and T4."""

    test_id: ClassVar[str] = "T6"
    title: ClassVar[str] = "Patients and subgroups"

    def __init__(
        self, context: AuditContext, config: PatientsConfig | None = None, catalogue: Catalogue | None = None
    ) -> None:
        super().__init__(context)
        self.config = config or PatientsConfig()
        self._catalogue = catalogue

    # ------------------------------------------------------------------ inputs
    def catalogue(self) -> Catalogue:
        """The catalogue given, else the one T2 used (from its settings), else the packaged one."""
        if self._catalogue is not None:
            return self._catalogue
        t2 = self.context.previous.get("T2")
        settings = (t2.section.get("settings") if t2 is not None else None) or {}
        if settings.get("catalogue") or settings.get("catalogue_extend"):
            return load_catalogue(settings.get("catalogue"), extend=settings.get("catalogue_extend") or None)
        return default_catalogue()

    def _category_names(self, catalogue: Catalogue) -> list[str]:
        t2 = self.context.previous.get("T2")
        chosen = ((t2.section.get("settings") or {}).get("categories") if t2 is not None else None) or None
        return [n for n in (chosen or catalogue.names) if n in catalogue]

    def _sources(self) -> tuple[dict[str, dict[str, Any]], dict[str, pl.DataFrame]]:
        """Which earlier results are usable, and their per-subject tables."""
        table_of = {"T1": "reconstruction", "T2": "sensitive", "T4": "membership_scores"}
        info: dict[str, dict[str, Any]] = {}
        tables: dict[str, pl.DataFrame] = {}
        for tid, tname in table_of.items():
            r = self.context.previous.get(tid)
            if r is None:
                info[tid] = {"status": "missing", "used": False, "note": f"{tid} was not run before T6"}
                continue
            entry: dict[str, Any] = {"status": r.status, "used": False, "note": None}
            table = r.tables.get(tname)
            if r.status == "skipped":
                entry["note"] = f"{tid} was skipped ({r.reason})"
            elif table is None or table.height == 0:
                entry["note"] = f"{tid} has no per-subject table {tname!r}"
            elif tid == "T4":
                best = r.section.get("best_attack")
                if r.status != "ok" or best is None or best not in table.columns:
                    entry["note"] = f"T4 has no evaluable best attack ({r.reason})"
                else:
                    entry.update(used=True, attack=best)
                    tables[tid] = table
            else:
                entry["used"] = True
                if r.status != "ok":
                    entry["note"] = f"{tid} is {r.status} ({r.reason}); its per-subject values are still used"
                tables[tid] = table
            info[tid] = entry
        return info, tables

    # ------------------------------------------------------------------ per-subject signals
    def _t4_scores(self, table: pl.DataFrame, attack: str) -> dict[int, float]:
        t = table.select(SUBJECT_ID, attack).drop_nulls()
        t = t.filter(pl.col(attack).is_finite())
        return dict(zip(t[SUBJECT_ID].to_list(), t[attack].to_list(), strict=True))

    @staticmethod
    def _t1_lift(table: pl.DataFrame) -> pl.DataFrame:
        """Per subject and tier: ``lift = 1 - emd_mean / baseline_emd_mean`` (rows with a zero baseline dropped)."""
        return (
            table.filter(pl.col("baseline_emd_mean") > 0)
            .with_columns((1.0 - pl.col("emd_mean") / pl.col("baseline_emd_mean")).alias("lift"))
            .filter(pl.col("lift").is_finite())
            .select(SUBJECT_ID, "k_events", "lift")
        )

    def _t2_exposure(self, table: pl.DataFrame) -> tuple[dict[int, float], dict[int, list[str]]]:
        """Per subject: largest excess share over the unconditioned rate, and the categories revealed."""
        t2 = self.context.previous["T2"]
        cats = t2.section.get("categories") or {}
        rates = {n: e.get("unconditioned_rate") for n, e in cats.items()}
        rate_frame = pl.DataFrame(
            {"category": list(rates), "_rate": [float(r) if r is not None else None for r in rates.values()]},
            schema={"category": pl.String, "_rate": pl.Float64},
        )
        t = table.join(rate_frame, on="category", how="left").with_columns(pl.col("_rate").fill_null(0.0))
        pos = t.filter(pl.col("label") == 1).with_columns(
            (pl.col("share") - pl.col("_rate")).clip(lower_bound=0.0).alias("_excess")
        )
        exposure = {s: 0.0 for s in t[SUBJECT_ID].unique().to_list()}
        revealed: dict[int, list[str]] = {}
        if pos.height:
            agg = pos.group_by(SUBJECT_ID).agg(
                pl.col("_excess").max().alias("x"),
                pl.col("category").filter(pl.col("_excess") > 0).unique().sort().alias("cats"),
            )
            for s, x, c in agg.iter_rows():
                exposure[s] = float(x)
                revealed[s] = list(c)
        return exposure, revealed

    # ------------------------------------------------------------------ demographics and groups
    def _demographics(self, events: pl.DataFrame, ids: list[int]) -> pl.DataFrame:
        cfg = self.config
        timed = events.filter(pl.col(TIME).is_not_null())
        birth = timed.filter(pl.col(CODE) == BIRTH_CODE).group_by(SUBJECT_ID).agg(pl.col(TIME).min().alias("_birth"))
        first = timed.filter(pl.col(CODE) != BIRTH_CODE).group_by(SUBJECT_ID).agg(pl.col(TIME).min().alias("_first"))
        sex_expr = pl.lit(None, dtype=pl.String)
        for p in reversed(cfg.sex_code_prefixes):
            sex_expr = pl.when(pl.col(CODE).str.starts_with(p)).then(pl.col(CODE).str.slice(len(p))).otherwise(sex_expr)
        sex = (
            events.filter(pl.col(TIME).is_null())
            .with_columns(sex_expr.alias("_sex"))
            .filter(pl.col("_sex").is_not_null())
            .group_by(SUBJECT_ID)
            .agg(pl.col("_sex").unique().sort().str.join("/").alias("sex"))
        )
        out = (
            pl.DataFrame({SUBJECT_ID: ids}, schema={SUBJECT_ID: pl.Int64})
            .join(birth, on=SUBJECT_ID, how="left")
            .join(first, on=SUBJECT_ID, how="left")
            .join(sex, on=SUBJECT_ID, how="left")
            .with_columns(
                ((pl.col("_first") - pl.col("_birth")).dt.total_seconds() / _SECONDS_PER_YEAR).alias("age_years"),
                pl.col("sex").fill_null("unknown"),
            )
        )
        bands = [age_band(a, cfg.age_bands) for a in out["age_years"].to_list()]
        return out.with_columns(pl.Series("age_band", bands, dtype=pl.String)).select(
            SUBJECT_ID, "age_years", "age_band", "sex"
        )

    def _rare_holders(self, events: pl.DataFrame, audited: pl.DataFrame, training_ids: list[int]) -> dict[int, int]:
        """Per audited subject: how many of their distinct codes are held by <= k training patients.

        The count of holders includes the patient as if they were trained on (a non-member's code gets +1), so
        that members and non-members are held to the same standard."""
        k = self.config.rare_max_subjects
        ds_events = self.context.dataset.events
        counts = (
            ds_events.filter(pl.col(SUBJECT_ID).is_in(training_ids))
            .group_by(CODE)
            .agg(pl.col(SUBJECT_ID).n_unique().alias("_n_train"))
        )
        # Only codes the model's vocabulary kept: a code mapped to [UNK] cannot be memorised as itself.
        tok = self.context.tokenizer
        codes = events.select(SUBJECT_ID, CODE).unique()
        if tok is not None:
            codes = codes.filter(pl.col(CODE).is_in(list(tok.index)))
        per = (
            codes.join(counts, on=CODE, how="left")
            .join(audited.select(SUBJECT_ID, "member"), on=SUBJECT_ID, how="left")
            .with_columns((pl.col("_n_train").fill_null(0) + (1 - pl.col("member").cast(pl.Int64))).alias("_holders"))
            .group_by(SUBJECT_ID)
            .agg((pl.col("_holders") <= k).sum().alias("n_rare_codes"))
        )
        return dict(zip(per[SUBJECT_ID].to_list(), per["n_rare_codes"].to_list(), strict=True))

    # ------------------------------------------------------------------ uniqueness
    @staticmethod
    def _prompt_codes(events: pl.DataFrame, k: int) -> pl.DataFrame:
        """Per subject with at least k timed events: the prompt's codes (static + first k timed events) in a
        canonical order (codes sharing a timestamp sorted), as a list."""
        idx = (
            pl.when(pl.col(TIME).is_null())
            .then(-1)
            .otherwise(pl.col(TIME).is_not_null().cum_sum().over(SUBJECT_ID) - 1)
            .alias("_ev")
        )
        e = events.select(SUBJECT_ID, TIME, CODE).with_columns(idx)
        n_timed = e.group_by(SUBJECT_ID).agg((pl.col("_ev") >= 0).sum().alias("_n"))
        keep = n_timed.filter(pl.col("_n") >= k).select(SUBJECT_ID)
        p = e.filter(pl.col("_ev") < k).join(keep, on=SUBJECT_ID, how="semi")
        p = p.sort(SUBJECT_ID, pl.col(TIME).is_not_null(), TIME, CODE, nulls_last=False)
        return p.group_by(SUBJECT_ID, maintain_order=True).agg(pl.col(CODE).alias("codes"))

    def _uniqueness(
        self,
        events_all: pl.DataFrame,
        audited: pl.DataFrame,
        training_ids: list[int],
        lift: pl.DataFrame | None,
        risk: dict[int, float],
    ) -> tuple[dict[str, Any], pl.DataFrame]:
        from sklearn.neighbors import NearestNeighbors

        cfg, seed = self.config, self.context.seed
        train_set = set(training_ids)
        audited_ids = audited[SUBJECT_ID].to_list()
        member_of = dict(zip(audited_ids, audited["member"].to_list(), strict=True))
        by_tier: list[dict[str, Any]] = []
        frames = []
        for ti, k in enumerate(cfg.tiers):
            pc = self._prompt_codes(events_all, k)
            pc = pc.with_columns(pl.col("codes").list.join(_KEY_SEP).alias("_key"))
            is_train = pc[SUBJECT_ID].is_in(training_ids)
            key_counts = pc.filter(is_train).group_by("_key").agg(pl.len().alias("_n"))
            aud = (
                pc.filter(pl.col(SUBJECT_ID).is_in(audited_ids))
                .join(key_counts, on="_key", how="left")
                .with_columns(pl.col("_n").fill_null(0))
            )
            sharing = {
                s: int(n) - (1 if s in train_set else 0) for s, n in zip(aud[SUBJECT_ID], aud["_n"], strict=True)
            }
            # Nearest training neighbour on bags of codes (cosine distance), excluding the patient themselves.
            train_rows = pc.filter(is_train)
            nn_dist: dict[int, float] = {}
            if train_rows.height >= 2 and aud.height:
                vocab = (
                    pc.select(pl.col("codes").explode().unique().sort().alias(CODE)).drop_nulls().with_row_index("_col")
                )

                def bag(frame: pl.DataFrame, vocab: pl.DataFrame = vocab) -> sparse.csr_matrix:
                    long = (
                        frame.select(pl.col("codes"))
                        .with_row_index("_row")
                        .explode("codes")
                        .drop_nulls("codes")
                        .join(vocab, left_on="codes", right_on=CODE, how="inner")
                    )
                    data = np.ones(long.height, dtype=np.float64)
                    coo = (data, (long["_row"].to_numpy(), long["_col"].to_numpy()))
                    return sparse.csr_matrix(coo, shape=(frame.height, vocab.height))

                train_ids_order = train_rows[SUBJECT_ID].to_list()
                nn = NearestNeighbors(n_neighbors=2, metric="cosine", algorithm="brute").fit(bag(train_rows))
                dist, ind = nn.kneighbors(bag(aud))
                for s, d, i in zip(aud[SUBJECT_ID].to_list(), dist, ind, strict=True):
                    j = 0 if train_ids_order[i[0]] != s else 1
                    nn_dist[s] = max(0.0, float(d[j]))
            tname = tier_name(k)
            frames.append(
                pl.DataFrame(
                    {
                        SUBJECT_ID: audited_ids,
                        f"n_sharing_prompt_{tname}": [sharing.get(s) for s in audited_ids],
                        f"nn_distance_{tname}": [nn_dist.get(s) for s in audited_ids],
                    },
                    schema={
                        SUBJECT_ID: pl.Int64,
                        f"n_sharing_prompt_{tname}": pl.Int64,
                        f"nn_distance_{tname}": pl.Float64,
                    },
                )
            )
            entry: dict[str, Any] = {
                "tier": tname,
                "k_events": k,
                "n_patients_with_prompt": len(sharing),
                "n_without_prompt": len(audited_ids) - len(sharing),
            }
            for grp, flag in (("members", 1), ("nonmembers", 0)):
                vals = np.array([v for s, v in sharing.items() if member_of[s] == flag], dtype=float)
                d = np.array([v for s, v in nn_dist.items() if member_of[s] == flag], dtype=float)
                entry[grp] = {
                    "n": int(vals.size),
                    "n_unique_prompt": int((vals == 0).sum()),
                    "median_n_sharing": float(np.median(vals)) if vals.size else None,
                    "median_nn_distance": float(np.median(d)) if d.size else None,
                }
            # Against leakage, among members.
            leak_k: dict[int, float] = {}
            if lift is not None:
                lk = lift.filter(pl.col("k_events") == k)
                leak_k = dict(zip(lk[SUBJECT_ID].to_list(), lk["lift"].to_list(), strict=True))
            versus: dict[str, Any] = {}
            for lname, leak, missing in (
                ("t1_lift", leak_k, "T1 has no per-subject leakage at this tier"),
                ("risk_score", risk, "no per-patient risk score (T1, T2 and T4 all unavailable)"),
            ):
                for qname, q in (("n_sharing", sharing), ("nn_distance", nn_dist)):
                    common = [s for s in q if s in leak and member_of[s] == 1]
                    if not leak:
                        versus[f"{qname}_vs_{lname}"] = {
                            "status": "undefined",
                            "reason": missing,
                            "rho": None,
                            "ci95": None,
                            "n": 0,
                        }
                        continue
                    versus[f"{qname}_vs_{lname}"] = spearman_summary(
                        np.array([q[s] for s in common], dtype=float),
                        np.array([leak[s] for s in common], dtype=float),
                        min_n=cfg.min_group_size,
                        n_boot=cfg.n_bootstrap,
                        seed=seed + 100 + ti,
                    )
            entry["correlation_among_members"] = versus
            by_tier.append(entry)
        table = pl.DataFrame({SUBJECT_ID: audited_ids}, schema={SUBJECT_ID: pl.Int64})
        for f in frames:
            table = table.join(f, on=SUBJECT_ID, how="left")
        section = {
            "description": (
                "n_sharing: training patients other than the patient with exactly the same prompt codes (static codes "
                "and the first k timed events; codes at one timestamp compared as a set; times and values ignored). "
                "nn_distance: cosine distance of the prompt's bag of codes to the nearest other training patient. "
                "Correlations are Spearman's rho among members with a percentile-bootstrap 95% interval; a negative "
                "rho means more unique patients leak more."
            ),
            "n_training_patients": len(train_set),
            "by_tier": by_tier,
        }
        return section, table

    # ------------------------------------------------------------------ subgroup metrics
    def _subgroup(
        self,
        kind: str,
        name: str,
        ids: list[int],
        member_of: dict[int, int],
        t4: dict[int, float] | None,
        t1: dict[int, float] | None,
        seed: int,
    ) -> dict[str, Any]:
        cfg = self.config
        m = cfg.min_group_size
        n_mem = sum(member_of[s] for s in ids)
        n_non = len(ids) - n_mem
        out: dict[str, Any] = {
            "kind": kind,
            "name": name,
            "n": len(ids),
            "n_members": n_mem,
            "n_nonmembers": n_non,
            "status": "ok",
            "reason": None,
            "membership_auc": None,
            "leakage_auc": None,
            "leakage_mean": None,
        }
        why = _too_small(n_mem, n_non, m)
        if why is not None:
            out.update(status="undefined", reason=why)
            return out

        def auc_of(scores: dict[int, float] | None, what: str) -> dict[str, Any]:
            if scores is None:
                return {"status": "undefined", "reason": f"{what} not available", "auc": None, "auc_ci95": None}
            have = [s for s in ids if s in scores]
            y = np.array([member_of[s] for s in have], dtype=np.int8)
            x = np.array([scores[s] for s in have], dtype=float)
            r = auc_summary(y, x, n_boot=cfg.n_bootstrap, seed=seed, min_per_class=m) if len(have) else None
            if r is None or r["status"] != "ok":
                n_p, n_n = int(y.sum()), int(y.size - y.sum())
                return {
                    "status": "undefined",
                    "reason": f"{what}: " + (_too_small(n_p, n_n, m) or (r or {}).get("reason") or "no subjects"),
                    "auc": None,
                    "auc_ci95": None,
                    "n_members": n_p,
                    "n_nonmembers": n_n,
                }
            return {
                "status": "ok",
                "reason": None,
                "auc": r["auc"],
                "auc_ci95": r["auc_ci95"],
                "n_members": r["n_pos"],
                "n_nonmembers": r["n_neg"],
            }

        out["membership_auc"] = auc_of(t4, "T4 membership scores")
        out["leakage_auc"] = auc_of(t1, "T1 reconstruction lift")
        if out["leakage_auc"]["status"] == "ok" and t1 is not None:
            lm = np.array([t1[s] for s in ids if s in t1 and member_of[s] == 1], dtype=float)
            ln = np.array([t1[s] for s in ids if s in t1 and member_of[s] == 0], dtype=float)
            out["leakage_mean"] = {
                "measure": "T1 reconstruction lift (share of the population-baseline distance removed by the prompt)",
                "members": _mean_ci(lm, cfg.n_bootstrap, seed),
                "nonmembers": _mean_ci(ln, cfg.n_bootstrap, seed + 1),
            }
        if out["membership_auc"]["status"] != "ok" and out["leakage_auc"]["status"] != "ok":
            out.update(
                status="undefined",
                reason="; ".join(r for r in (out["membership_auc"]["reason"], out["leakage_auc"]["reason"]) if r),
            )
        return out

    # ------------------------------------------------------------------ run
    def _run(self) -> TestResult:
        ctx, cfg = self.context, self.config
        result = TestResult(test_id=self.test_id, title=self.title, status="ok")
        audited = ctx.cohort.audited.select(SUBJECT_ID, "member", "n_events").sort(SUBJECT_ID)
        ids = audited[SUBJECT_ID].to_list()
        member_of = {s: int(m) for s, m in zip(ids, audited["member"].to_list(), strict=True)}
        training_ids = ctx.cohort.table.filter(pl.col("member") == 1)[SUBJECT_ID].to_list()
        events = ctx.dataset.events.filter(pl.col(SUBJECT_ID).is_in(ids))
        catalogue = self.catalogue()
        names = self._category_names(catalogue)

        sources, tables = self._sources()
        notes = [f"{tid}: {e['note']}" for tid, e in sources.items() if e.get("note")]
        for n in notes:
            result.warn(n)

        # Per-subject components.
        raw: dict[str, dict[int, float]] = {}
        revealed: dict[int, list[str]] = {}
        lift = None
        if "T4" in tables:
            raw["T4"] = self._t4_scores(tables["T4"], sources["T4"]["attack"])
        if "T1" in tables:
            lift = self._t1_lift(tables["T1"])
            per = lift.group_by(SUBJECT_ID).agg(pl.col("lift").mean())
            raw["T1"] = dict(zip(per[SUBJECT_ID].to_list(), per["lift"].to_list(), strict=True))
        if "T2" in tables:
            raw["T2"], revealed = self._t2_exposure(tables["T2"])
        for c in list(raw):
            raw[c] = {s: v for s, v in raw[c].items() if s in member_of and math.isfinite(v)}
        norm = {c: rank_normalise(v) for c, v in raw.items()}
        risk: dict[int, float] = {}
        n_comp: dict[int, int] = {}
        for s in ids:
            vals = [norm[c][s] for c in COMPONENTS if c in norm and s in norm[c]]
            n_comp[s] = len(vals)
            if vals:
                risk[s] = float(np.mean(vals))

        # Demographics, categories, rare codes, length.
        demo = self._demographics(events, ids)
        flags = catalogue.subject_flags(events.select(SUBJECT_ID, CODE)) if names else None
        held: dict[int, list[str]] = {s: [] for s in ids}
        if flags is not None:
            for row in flags.select(SUBJECT_ID, *names).iter_rows(named=True):
                held[row[SUBJECT_ID]] = [n for n in names if row[n]]
        n_rare = self._rare_holders(events, audited, training_ids)
        lengths = audited["n_events"].to_numpy()
        q_edges = np.quantile(lengths, [0.25, 0.5, 0.75]) if lengths.size else np.zeros(3)
        quart = np.searchsorted(q_edges, lengths, side="left") if lengths.size else np.zeros(0, dtype=int)
        quart_of = {s: int(q) for s, q in zip(ids, quart, strict=True)}

        table = (
            audited.join(demo.select(SUBJECT_ID, "age_band", "sex"), on=SUBJECT_ID, how="left")
            .with_columns(
                pl.Series("length_quartile", [f"Q{quart_of[s] + 1}" for s in ids], dtype=pl.String),
                pl.Series("n_rare_codes", [int(n_rare.get(s, 0)) for s in ids], dtype=pl.Int64),
                pl.Series("sensitive_categories", [held[s] for s in ids], dtype=pl.List(pl.String)),
                pl.Series("categories_revealed", [revealed.get(s, []) for s in ids], dtype=pl.List(pl.String)),
                *[pl.Series(f"{c}_signal", [raw.get(c, {}).get(s) for s in ids], dtype=pl.Float64) for c in COMPONENTS],
                *[pl.Series(f"{c}_rank", [norm.get(c, {}).get(s) for s in ids], dtype=pl.Float64) for c in COMPONENTS],
                pl.Series("n_components", [n_comp[s] for s in ids], dtype=pl.Int64),
                pl.Series("risk_score", [risk.get(s) for s in ids], dtype=pl.Float64),
            )
            .sort("risk_score", SUBJECT_ID, descending=[True, False], nulls_last=True)
            .with_row_index("risk_rank", offset=1)
            .with_columns(
                pl.when(pl.col("risk_score").is_null()).then(None).otherwise(pl.col("risk_rank")).alias("risk_rank")
            )
        )

        # Most exposed patients: ids and category names only.
        top = []
        for row in table.filter(pl.col("risk_score").is_not_null()).head(cfg.top_n).iter_rows(named=True):
            top.append(
                {
                    "rank": row["risk_rank"],
                    SUBJECT_ID: row[SUBJECT_ID],
                    "member": bool(row["member"]),
                    "risk_score": row["risk_score"],
                    "components": {c: row[f"{c}_rank"] for c in COMPONENTS if c in norm},
                    "sensitive_categories": row["sensitive_categories"],
                    "categories_revealed": row["categories_revealed"],
                }
            )

        # Subgroups.
        t4 = raw.get("T4")
        t1 = raw.get("T1")
        groups: list[tuple[str, str, list[int]]] = []
        age_of = dict(zip(demo[SUBJECT_ID].to_list(), demo["age_band"].to_list(), strict=True))
        band_names = age_band_labels(cfg.age_bands) + (["unknown"] if "unknown" in age_of.values() else [])
        groups += [("age", b, [s for s in ids if age_of[s] == b]) for b in band_names]
        sex_of = dict(zip(demo[SUBJECT_ID].to_list(), demo["sex"].to_list(), strict=True))
        groups += [("sex", v, [s for s in ids if sex_of[s] == v]) for v in sorted(set(sex_of.values()))]
        k = cfg.rare_max_subjects
        counts_rare = [n_rare.get(s, 0) for s in ids]
        med = int(np.median(counts_rare)) if counts_rare else 0
        if med <= 1:
            groups.append(
                (
                    "rare_codes",
                    f"holds a code held by <= {k} training patients",
                    [s for s in ids if n_rare.get(s, 0) > 0],
                )
            )
            groups.append(("rare_codes", "holds no rare code", [s for s in ids if n_rare.get(s, 0) == 0]))
        else:
            # Most patients hold some rare code (long records): split at the median count so both groups say something.
            what = f"codes held by <= {k} training patients"
            groups.append(("rare_codes", f"holds >= {med} {what}", [s for s in ids if n_rare.get(s, 0) >= med]))
            groups.append(("rare_codes", f"holds < {med} {what}", [s for s in ids if n_rare.get(s, 0) < med]))
        groups += [("sensitive_category", n, [s for s in ids if n in held[s]]) for n in names]
        n_events_of = dict(zip(ids, lengths.tolist(), strict=True))
        for q in range(4):
            in_q = [s for s in ids if quart_of[s] == q]
            span = [n_events_of[s] for s in in_q]
            label = f"Q{q + 1} ({min(span)}-{max(span)} timed events)" if span else f"Q{q + 1} (empty: tied lengths)"
            groups.append(("record_length", label, in_q))
        subgroups = [
            self._subgroup(kind, name, g, member_of, t4, t1, ctx.seed + i) for i, (kind, name, g) in enumerate(groups)
        ]
        n_def = sum(g["status"] == "ok" for g in subgroups)

        uniq_section, uniq_table = self._uniqueness(
            ctx.dataset.events.filter(pl.col(SUBJECT_ID).is_in(list(set(ids) | set(training_ids)))),
            audited,
            training_ids,
            lift,
            risk,
        )
        table = table.join(uniq_table, on=SUBJECT_ID, how="left").sort("risk_rank", SUBJECT_ID, nulls_last=True)

        used = [c for c in COMPONENTS if c in raw]
        result.section = json_clean(
            {
                "sources": sources,
                "notes": notes,
                "risk_score": {
                    "formula": RISK_FORMULA,
                    "components_used": used,
                    "components_missing": [c for c in COMPONENTS if c not in raw],
                    "n_subjects": len(ids),
                    "n_scored": len(risk),
                    "n_with_all_used_components": sum(1 for s in ids if used and n_comp[s] == len(used)),
                    "t4_attack": sources["T4"].get("attack"),
                },
                "top_patients": top,
                "min_group_size": cfg.min_group_size,
                "subgroups": subgroups,
                "n_subgroups_defined": n_def,
                "uniqueness": uniq_section,
                "settings": cfg.model_dump(mode="json"),
            }
        )
        if not used:
            result.status = "undefined"
            result.reason = (
                "no per-patient signal: T1, T2 and T4 are all missing, skipped or without per-subject results; "
                "only subgroup sizes and prompt uniqueness are reported"
            )
        else:
            missing = [c for c in COMPONENTS if c not in raw]
            result.reason = (
                f"risk score from {', '.join(used)}"
                + (f" ({', '.join(missing)} not available)" if missing else "")
                + f"; {n_def} of {len(subgroups)} subgroups large enough in both classes "
                f"(>= {cfg.min_group_size} members and non-members)"
            )
        result.tables["patient_risk"] = table
        result.tables["subgroups"] = pl.DataFrame(
            [
                {
                    "kind": g["kind"],
                    "name": g["name"],
                    "n": g["n"],
                    "n_members": g["n_members"],
                    "n_nonmembers": g["n_nonmembers"],
                    "status": g["status"],
                    "reason": g["reason"],
                    "membership_auc": (g["membership_auc"] or {}).get("auc"),
                    "membership_auc_lo": ((g["membership_auc"] or {}).get("auc_ci95") or [None, None])[0],
                    "membership_auc_hi": ((g["membership_auc"] or {}).get("auc_ci95") or [None, None])[1],
                    "leakage_auc": (g["leakage_auc"] or {}).get("auc"),
                    "leakage_auc_lo": ((g["leakage_auc"] or {}).get("auc_ci95") or [None, None])[0],
                    "leakage_auc_hi": ((g["leakage_auc"] or {}).get("auc_ci95") or [None, None])[1],
                }
                for g in subgroups
            ],
            schema={
                "kind": pl.String,
                "name": pl.String,
                "n": pl.Int64,
                "n_members": pl.Int64,
                "n_nonmembers": pl.Int64,
                "status": pl.String,
                "reason": pl.String,
                "membership_auc": pl.Float64,
                "membership_auc_lo": pl.Float64,
                "membership_auc_hi": pl.Float64,
                "leakage_auc": pl.Float64,
                "leakage_auc_lo": pl.Float64,
                "leakage_auc_hi": pl.Float64,
            },
        )
        return result
