"""T3 embedding probes on stand-in embedders with known answers, and on a tiny real model."""

from __future__ import annotations

import zlib
from dataclasses import replace

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from ehrmem.audits.base import AuditContext
from ehrmem.audits.probing import (
    ProbingAudit,
    ProbingConfig,
    bag_of_codes,
    cross_fit,
    probe_metrics,
)
from ehrmem.data.cohort import build_cohort
from ehrmem.data.meds import load_meds
from ehrmem.data.tokenizer import EventTokenizer
from ehrmem.errors import InputError, ResultsNotReadyError

HIV = "DIAGNOSIS//ICD//9//V08"


class LabelEmbedder:
    """Embeds a prompt as [label, noise...], the label being that of the one record the prompt starts.

    ``signal`` scales the label feature (0 = pure noise); an ambiguous prompt (a prefix of records with
    different labels) gets 0.5. Every embedded sequence is recorded in ``seen``.
    """

    context_length = 10_000
    vocab_size = 100_000

    def __init__(self, records: list[tuple[np.ndarray, int]], *, signal: float = 1.0, dim: int = 4) -> None:
        self.records, self.signal, self.dim = records, signal, dim
        self.seen: list[np.ndarray] = []
        self.ambiguous = 0

    def _label(self, s: np.ndarray) -> float:
        labels = {y for ids, y in self.records if len(ids) >= len(s) and np.array_equal(ids[: len(s)], s)}
        if len(labels) != 1:
            self.ambiguous += 1
            return 0.5
        return float(labels.pop())

    def embed(self, sequences, *, pooling="mean", batch_size=16):
        out = []
        for s in sequences:
            s = np.asarray(s)
            self.seen.append(s)
            noise = np.random.default_rng(zlib.crc32(s.tobytes())).normal(size=self.dim)
            out.append(np.concatenate([[self.signal * self._label(s)], noise]))
        return np.asarray(out, dtype=np.float32)


def _dataset(tmp_path, *, n=60, hiv_subjects=None, hiv_after=0, static_hiv=()):
    """The tiny MEDS data with the HIV code kept only for ``hiv_subjects`` and only after event ``hiv_after``."""
    from conftest import write_meds

    data = write_meds(tmp_path / "m", n_subjects=n, splits={"train": 0.5, "tuning": 0.0, "held_out": 0.5})
    ds = load_meds(data)
    ev = ds.events.with_columns(
        pl.when(pl.col("time").is_null())
        .then(-1)
        .otherwise(pl.col("time").is_not_null().cum_sum().over("subject_id") - 1)
        .alias("_ev")
    )
    drop = (pl.col("code") == HIV) & (pl.col("_ev") < hiv_after)
    if hiv_subjects is not None:
        drop = drop | ((pl.col("code") == HIV) & ~pl.col("subject_id").is_in(list(hiv_subjects)))
    events = ev.filter(~drop).drop("_ev")
    if static_hiv:
        extra = pl.DataFrame(
            {"subject_id": list(static_hiv), "time": None, "code": HIV, "numeric_value": None},
            schema=events.schema,
        )
        events = pl.concat([events, extra]).sort("subject_id", "time", nulls_last=False, maintain_order=True)
    return replace(ds, events=events)


def _context(ds, model=None):
    train = ds.events.filter(pl.col("subject_id").is_in(ds.subject_ids("train")))
    tok = EventTokenizer.fit(train, min_code_subjects=1)
    cohort = build_cohort(
        ds, None, membership="splits", member_splits=["train"], nonmember_splits=["held_out"], match_length=False
    )
    encoded = {e.subject_id: e for e in tok.encode(ds.events)}
    has_hiv = set(ds.events.filter(pl.col("code") == HIV)["subject_id"].to_list())
    records = [(e.ids, int(s in has_hiv)) for s, e in encoded.items()]
    model = model if model is not None else LabelEmbedder(records)
    ctx = AuditContext(
        dataset=ds, model=model, tokenizer=tok, cohort=cohort, encoded=encoded, manifest=None, model_dir=None
    )
    return ctx, records


def _cfg(**kw):
    base = {"categories": ["hiv"], "tiers": [10], "n_folds": 3, "min_positives": 3, "n_bootstrap": 100}
    return ProbingConfig(**{**base, **kw})


def test_result_before_run_raises(tmp_path):
    ctx, _ = _context(_dataset(tmp_path, n=12))
    with pytest.raises(ResultsNotReadyError):
        _ = ProbingAudit(ctx).result


def test_config_rejects_unknown_fields_and_categories(tmp_path):
    with pytest.raises(ValueError, match="extra"):
        ProbingConfig(n_fold=3)
    with pytest.raises(ValueError, match="tiers"):
        ProbingConfig(tiers=[-1])
    ctx, _ = _context(_dataset(tmp_path, n=12))
    with pytest.raises(InputError, match="categories"):
        ProbingAudit(ctx, _cfg(categories=["hiv", "not_a_category"])).run()


def test_probe_metrics_use_probabilities_not_hard_labels():
    """AUROC is the ranking of predict_proba; thresholding at 0.5 first would change it."""
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.6, 0.2, 0.7, 0.4, 0.9])
    m = probe_metrics(y, p, min_positives=3, n_boot=200, seed=0)
    assert m["status"] == "ok"
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p)) == pytest.approx(8 / 9)
    assert roc_auc_score(y, p > 0.5) == pytest.approx(2 / 3)
    assert m["auroc"] != pytest.approx(roc_auc_score(y, p > 0.5))
    assert m["auroc_ci95"][0] <= m["auroc"] <= m["auroc_ci95"][1]
    assert m["prevalence"] == 0.5 and m["n_pos"] == 3 and m["n_neg"] == 3


def test_cross_fit_gives_out_of_fold_probabilities():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)
    x = rng.normal(size=(40, 3)) + y[:, None]
    fit = cross_fit("logistic", x, y, rng.normal(size=(7, 3)), n_folds=4, seed=0)
    assert fit.members.shape == (40,) and fit.nonmembers.shape == (7,)
    assert np.all(np.isfinite(fit.members)) and np.all((fit.members > 0) & (fit.members < 1))
    assert len(np.unique(fit.members)) > 2  # probabilities, not hard labels


def test_bag_of_codes_counts_nonspecial_tokens_seen():
    kind = np.array([0, 0, 0, 0, 1, 1, 2, 3, 1])
    x = bag_of_codes([np.array([1, 4, 4, 6]), np.array([1, 5, 7, 4])], kind).toarray()
    # columns: tokens 4, 5, 6, 7 (8 never seen, [BOS]=1 special)
    np.testing.assert_array_equal(x, [[2, 0, 1, 0], [1, 1, 0, 1]])


def test_audit_reports_probabilities_it_predicted(tmp_path):
    """The section's AUROC equals roc_auc_score over the table's probabilities (never hard labels)."""
    ds = _dataset(tmp_path, hiv_subjects=range(1000, 1060, 2), hiv_after=12)
    ctx, records = _context(ds)
    ctx.model = LabelEmbedder(records, signal=0.5, dim=4)
    res = ProbingAudit(ctx, _cfg(probes=["logistic"])).run().result
    assert res.status == "ok"
    entry = res.section["categories"]["hiv"]["by_tier"]["10"]["logistic"]
    table = res.tables["probe_predictions"]
    assert set(table.columns) == {
        "subject_id",
        "member",
        "tier",
        "category",
        "probe",
        "feature",
        "probability",
        "label",
    }
    for feature, prefix in (("embedding", ""), ("bag_of_codes", "bag_of_codes_")):
        for member, split in ((1, "members"), (0, "nonmembers")):
            sub = table.filter((pl.col("feature") == feature) & (pl.col("member") == member))
            expected = roc_auc_score(sub["label"].to_numpy(), sub["probability"].to_numpy())
            assert entry[prefix + split]["auroc"] == pytest.approx(expected)
    probs = table["probability"].to_numpy()
    assert np.all((probs > 0) & (probs < 1)) and len(np.unique(probs)) > 10
    gain = entry["members"]["auroc"] - entry["bag_of_codes_members"]["auroc"]
    assert entry["embedding_gain"] == pytest.approx(gain)


def test_perfect_separability_gives_auroc_one_with_interval(tmp_path):
    """Failure kind 4: an embedding that encodes the label gives AUROC 1 with a valid interval, no crash."""
    ds = _dataset(tmp_path, hiv_subjects=range(1000, 1060, 2), hiv_after=12)
    ctx, _ = _context(ds)
    res = ProbingAudit(ctx, _cfg()).run().result
    assert ctx.model.ambiguous == 0
    assert res.status == "ok"
    for probe in ("logistic", "mlp"):
        entry = res.section["categories"]["hiv"]["by_tier"]["10"][probe]
        for split in ("members", "nonmembers"):
            e = entry[split]
            assert e["status"] == "ok"
            assert e["auroc"] == 1.0 and e["auroc_ci95"] == [1.0, 1.0]
            assert e["auprc"] == pytest.approx(1.0) and e["auprc_ci95"][0] <= e["auprc"] <= e["auprc_ci95"][1] + 1e-12
    assert "1.000" in res.reason


@pytest.mark.parametrize(
    "n_hiv_members, min_positives, n_folds, needle",
    [(2, 3, 2, "2 with the category"), (4, 3, 5, "n_folds=5")],
)
def test_too_few_positives_is_undefined_with_counts(tmp_path, n_hiv_members, min_positives, n_folds, needle):
    """Failure kind 1: too few subjects with the category -> undefined with the counts, never 0.5."""
    ds0 = _dataset(tmp_path, n=40)
    members = sorted(ds0.subject_ids("train"))[:n_hiv_members]
    ds = _dataset(tmp_path / "b", n=40, hiv_subjects=members)
    ctx, _ = _context(ds)
    res = ProbingAudit(ctx, _cfg(min_positives=min_positives, n_folds=n_folds)).run().result
    assert res.status == "undefined"
    cat = res.section["categories"]["hiv"]
    assert cat["n_positive_members"] == n_hiv_members and cat["n_positive_nonmembers"] == 0
    for probe in ("logistic", "mlp"):
        entry = cat["by_tier"]["10"][probe]
        for key in ("members", "nonmembers", "bag_of_codes_members", "bag_of_codes_nonmembers"):
            e = entry[key]
            assert e["status"] == "undefined" and e["auroc"] is None and e["auprc"] is None
            assert str(e["n_pos"]) in e["reason"] and str(e["n_neg"]) in e["reason"] or "no probe" in e["reason"]
        assert needle in entry["members"]["reason"]
        assert entry["embedding_gain"] is None
    assert res.tables["probe_predictions"].height == 0
    assert len([w for w in res.warnings if w.startswith("tier 10")]) == 1


def test_prompts_never_contain_the_category(tmp_path):
    """Prompts stop before the category's first event; a static occurrence excludes the subject."""
    ds = _dataset(tmp_path, hiv_subjects=range(1000, 1060, 2), static_hiv=(1000,))
    ctx, _ = _context(ds)
    hiv_id = ctx.tokenizer.index[HIV]
    res = ProbingAudit(ctx, _cfg(tiers=[0, 10, 20], probes=["logistic"])).run().result
    seen = ctx.model.seen
    assert seen and not any(hiv_id in s for s in seen)
    cat = res.section["categories"]["hiv"]
    assert cat["excluded"] == 1
    assert cat["prompts_cut"]["static"] == 0 and cat["prompts_cut"]["20"] > cat["prompts_cut"]["10"] > 0
    assert res.status == "ok"
    assert 1000 not in res.tables["probe_predictions"]["subject_id"].to_list()
    assert cat["prompt_events"]["20"]["with_category"] < cat["prompt_events"]["20"]["without_category"]
    # Each distinct prompt is embedded once, across categories and tiers.
    keys = [s.tobytes() for s in seen]
    assert len(keys) == len(set(keys)) == res.section["n_prompts_embedded"]


def test_real_tiny_model(tiny_model_dir):
    from ehrmem.models.hf import HFCausalLM
    from ehrmem.models.train import read_manifest

    data, model_dir = tiny_model_dir
    ds = load_meds(data)
    tok = EventTokenizer.load(model_dir)
    model = HFCausalLM.from_pretrained(model_dir, pad_id=tok.pad_id, device="cpu")
    manifest = read_manifest(model_dir)
    cohort = build_cohort(ds, manifest, match_length=False)
    ids = cohort.audited["subject_id"].to_list()
    encoded = {e.subject_id: e for e in tok.encode(ds.events.filter(pl.col("subject_id").is_in(ids)))}
    ctx = AuditContext(
        dataset=ds,
        model=model,
        tokenizer=tok,
        cohort=cohort,
        encoded=encoded,
        manifest=manifest,
        model_dir=model_dir,
        batch_size=4,
    )
    cfg = ProbingConfig(tiers=[0, 10], n_folds=2, min_positives=2, n_bootstrap=100, probes=["logistic"])
    res = ProbingAudit(ctx, cfg).run().result
    assert res.status in ("ok", "undefined")
    sec = res.section
    assert sec["tiers"] == ["static", "10"] and sec["pooling"] == "mean"
    assert sec["settings"]["n_folds"] == 2
    for cat in sec["categories"].values():
        assert set(cat["by_tier"]) == {"static", "10"}
        for by_probe in cat["by_tier"].values():
            for e in by_probe["logistic"].values():
                if isinstance(e, dict):
                    assert e["auroc"] != 0.5 or e["status"] == "ok"
                    assert (e["auroc"] is None) == (e["status"] == "undefined")
    assert res.tables["probe_predictions"].schema["probability"] == pl.Float64


def test_nonfinite_embeddings_fail_naming_the_subject(tmp_path):
    """Failure kind 2: a NaN embedding aborts T3 and names the subject instead of probing on it."""
    from ehrmem.errors import NumericalError

    ds = _dataset(tmp_path, hiv_subjects=range(1000, 1060, 2), hiv_after=12)
    ctx, records = _context(ds)
    victim = int(ctx.cohort.audited["subject_id"][3])
    bad_prompt = ctx.encoded[victim].prompt(10)

    class NaNForVictim(LabelEmbedder):
        def embed(self, sequences, *, pooling="mean", batch_size=16):
            out = super().embed(sequences, pooling=pooling, batch_size=batch_size)
            for i, s in enumerate(sequences):
                if np.array_equal(s, bad_prompt):
                    out[i, 1] = np.nan
            return out

    ctx.model = NaNForVictim(records)
    with pytest.raises(NumericalError, match=str(victim)):
        ProbingAudit(ctx, _cfg()).run()
