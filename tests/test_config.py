"""The audit configuration: profiles, overrides, validation errors and stage digests."""

from __future__ import annotations

import pytest

from ehrmem.config import load_config
from ehrmem.errors import InputError


def test_profiles_set_masking_repeats_and_explicit_settings_win():
    assert load_config().T4.masking.repeats == 20
    assert load_config(profile="thorough").T4.masking.repeats == 100
    assert load_config(profile="thorough").sampling.n_samples == 100
    assert load_config(profile="thorough", T4={"masking": {"repeats": 7}}).T4.masking.repeats == 7


def test_invalid_setting_names_the_field(tmp_path):
    fp = tmp_path / "audit.yaml"
    fp.write_text("T4:\n  masking:\n    repeats: 1\n")
    with pytest.raises(InputError) as e:
        load_config(fp)
    assert "T4.masking.repeats" in str(e.value) and str(fp) in str(e.value)
    with pytest.raises(InputError, match="profile"):
        load_config(profile="fastest")


def test_stage_digest_depends_only_on_what_the_stage_reads():
    base = load_config()
    t2 = load_config(T2={"min_positives": 9})
    gate = load_config(gate={"max_membership_auc_lower": 0.9})
    assert base.stage_digest("T4") == t2.stage_digest("T4")  # T2's settings do not invalidate T4
    assert base.stage_digest("T2") != t2.stage_digest("T2")
    assert base.stage_digest("T5", ("T1", "T2")) != t2.stage_digest("T5", ("T1", "T2"))  # T5 reads T2
    assert base.digest() == gate.digest()  # thresholds judge, they do not measure
    assert base.stage_digest("T4") != load_config(seed=1).stage_digest("T4")
