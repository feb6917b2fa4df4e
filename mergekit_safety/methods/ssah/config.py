"""SSAH's parameters: scoring, labels and protection — the single declaration of each
(pydantic only, so the CLI can derive options without importing torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from mergekit_safety.fusion.settings import DeclaredSettings, DeviceName, LocatingSettings, UnitInterval, setting

KV_POLICIES = ("any", "all", "none")
CONTROLS = ("none", "random")


class LabelSettings(DeclaredSettings):
    """Thresholds of the unit labels, as shares of the number of units."""

    esu_share: UnitInterval = setting(0.01, "top share of Diff labelled ESU", locate=True)
    euu_share: UnitInterval = setting(0.10, "bottom share of Diff labelled EUU", locate=True)
    ru_share: UnitInterval = setting(0.10, "bottom share of Sum labelled RU", locate=True)

    @model_validator(mode="after")
    def _disjoint(self) -> "LabelSettings":
        if self.esu_share + self.euu_share > 1.0:
            raise ValueError(
                f"esu_share + euu_share = {self.esu_share + self.euu_share} > 1: ESU and EUU would overlap"
            )
        return self


class ScoreSettings(DeclaredSettings):
    """How the calibration statistics are gathered."""

    safety_data: str = setting("", "JSONL of harmful prompts + refusals (prompt, response)", data=True, keys=("prompt", "response"))
    utility_data: str = setting("", "JSONL of benign prompts + answers (prompt, response)", data=True, keys=("prompt", "response"))
    max_samples: int = setting(128, "calibration samples per set", locate=True, ge=1)
    max_length: int = setting(256, "tokens per calibration sample", locate=True, ge=2)
    batch_size: int = setting(8, "calibration batch size (does not change the result)", ge=1)
    device: DeviceName = setting("cpu", "device of the calibration passes (cpu, cuda, cuda:1, ...; one decoder layer at a time is moved there)")
    response_only: bool = setting(True, "statistics over response tokens only", locate=True)


class ProtectSettings(DeclaredSettings):
    """Which units a merge (or a fine-tuning run) protects, from one artifact."""

    protect_share: UnitInterval = setting(0.075, "share of all units protected (ESU first, then CU by safety score)")
    control: Literal[CONTROLS] = setting("none", "'random': protect a seeded random set of equal size instead")
    control_seed: int = setting(0, "seed of the random control")
    kv_policy: Literal[KV_POLICIES] = setting("any", "GQA: protect a K/V head when any/all/none of its query heads is protected")


class SSAHSettings(ProtectSettings, LabelSettings, ScoreSettings, LocatingSettings):
    """Every SSAH parameter: the fusion's, then scoring, labels and protection."""
