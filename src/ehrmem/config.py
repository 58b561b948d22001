"""The audit configuration: one pydantic model, each test's settings defined beside the test."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ehrmem.audits.controls import ControlsConfig
from ehrmem.audits.generation import SamplingConfig
from ehrmem.audits.membership import MembershipConfig
from ehrmem.audits.patients import PatientsConfig
from ehrmem.audits.perturbation import PerturbationConfig
from ehrmem.audits.probing import ProbingConfig
from ehrmem.audits.reconstruction import ReconstructionConfig
from ehrmem.audits.sensitive import SensitiveConfig
from ehrmem.errors import InputError
from ehrmem.risk.gate import GateThresholds

Profile = Literal["quick", "thorough"]

# What each profile changes from the defaults (the defaults are the quick profile). Settings given
# explicitly in a file or on the command line win over the profile.
PROFILES: dict[str, dict] = {
    "quick": {"T4": {"masking": {"repeats": 20}}},
    "thorough": {
        "sampling": {"n_samples": 100, "horizon_events": 50, "population_samples": 500},
        "T4": {"masking": {"repeats": 100}},
    },
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class AuditConfig(BaseModel):
    """Everything that determines an audit's result. Hashed into the provenance of every report."""

    model_config = ConfigDict(extra="forbid")

    profile: Profile = "quick"
    seed: int = Field(0, ge=0)
    batch_size: int = Field(16, ge=1)
    device: str | None = None
    membership: Literal["auto", "manifest", "splits"] = "auto"
    member_splits: list[str] = Field(default_factory=lambda: ["train"])
    nonmember_splits: list[str] = Field(default_factory=lambda: ["tuning", "held_out"])
    match_length: bool = True
    max_match_ratio: int | None = Field(None, ge=1, description="most partners per subject of the smaller group")
    match_balance: float = Field(
        0.1, gt=0, description="largest |SMD| of log record length accepted when choosing the matching ratio"
    )
    value_column: str = "numeric_value"
    split_source: Literal["file", "directories", "none"] = "file"
    allow_pickle: bool = False
    check_sample: int = Field(4, ge=0, description="sequences checked batched vs single (failure kinds 8, 9)")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    T1: ReconstructionConfig = Field(default_factory=ReconstructionConfig)
    T2: SensitiveConfig = Field(default_factory=SensitiveConfig)
    T3: ProbingConfig = Field(default_factory=ProbingConfig)
    T4: MembershipConfig = Field(default_factory=MembershipConfig)
    T5: PerturbationConfig = Field(default_factory=PerturbationConfig)
    T6: PatientsConfig = Field(default_factory=PatientsConfig)
    controls: ControlsConfig = Field(default_factory=ControlsConfig)
    gate: GateThresholds = Field(default_factory=GateThresholds)

    def stage_digest(self, test_id: str, depends_on: tuple[str, ...] = ()) -> str:
        """A digest of the settings one test's result depends on: the shared settings, its own section and
        those of the tests it builds on. Changing T2's settings does not invalidate a finished T4 stage."""
        tests = {"T1", "T2", "T3", "T4", "T5", "T6", "controls", "gate"}
        keep = {test_id, *depends_on}
        payload = self.model_dump(mode="json", exclude=tests - keep)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def digest(self) -> str:
        """A digest of the settings that change measurements (the gate's thresholds do not: they only judge)."""
        payload = self.model_dump(mode="json", exclude={"gate"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: str | Path | None = None, **overrides) -> AuditConfig:
    """Read an audit configuration (YAML or JSON), apply overrides, and validate it."""
    data: dict = {}
    if path is not None:
        fp = Path(path)
        if not fp.exists():
            raise InputError("The configuration file does not exist.", file=fp)
        try:
            data = yaml.safe_load(fp.read_text()) or {}
        except yaml.YAMLError as e:
            raise InputError("The configuration file is not valid YAML/JSON.", file=fp, value=str(e)) from e
        if not isinstance(data, dict):
            raise InputError(
                "The configuration must be a mapping.",
                file=fp,
                value=type(data).__name__,
                expected="a YAML mapping of settings",
            )
    data.update({k: v for k, v in overrides.items() if v is not None})
    profile = data.get("profile", "quick")
    if profile not in PROFILES:
        raise InputError(
            "Unknown profile.", file=path, column="profile", value=profile, expected=f"one of {list(PROFILES)}"
        )
    data = _merge(PROFILES[profile], data)
    try:
        return AuditConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise InputError(
            f"Invalid audit configuration ({len(e.errors())} error(s)): {first['msg']}.",
            file=path,
            column=".".join(str(p) for p in first["loc"]),
            value=first.get("input"),
            expected="see `ehrmem audit --help` and the README's configuration section",
        ) from e
