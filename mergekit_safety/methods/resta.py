"""``resta``: add the safety vector back (Bhardwaj et al., ACL 2024, arXiv 2402.11746).

    θ = θ_A + Merge(τ_1, …, τ_n) + γ · D(θ_A − θ_U),      τ_i = θ_i − θ_A

``θ_U`` is an unaligned counterpart of the aligned model (its base before safety tuning, or a
harmfully fine-tuned copy; in the lab: ``pretrained``), named by the ``unaligned_model``
parameter. ``θ_A − θ_U`` is the *safety vector*: what alignment added. ``D`` optionally
sparsifies it DARE-style (``safety_drop`` p: each entry dropped with probability p, the rest
rescaled by 1/(1 − p); seeded per tensor). Data-free: no artifact, no calibration.

``control: random`` adds instead a seeded Gaussian vector with the same per-tensor norm as
γ · D(θ_A − θ_U): the equal-norm control that shows whether the *direction* of the safety vector
matters, not just a perturbation of its size.

γ = 0 is exactly the backbone. With one expert and task arithmetic it is the paper's setting
(θ_f + γ·δ_safe); with several it adds the safety vector once to the fusion.
"""

from __future__ import annotations

from typing import Any, Dict, Literal

import torch

from mergekit_safety.engine.seeding import tensor_seed
from mergekit_safety.fusion.kernel import TensorMasks
from mergekit_safety.fusion.method import FusionMethod, TensorInputs, model_tensor
from mergekit_safety.fusion.settings import FusionSettings, UnitInterval, setting


class RESTASettings(FusionSettings):
    unaligned_model: str = setting(
        "",
        "the unaligned counterpart θ_U of the base model (a local model folder); the safety "
        "vector is θ_A − θ_U. Empty = no safety vector (the plain backbone, with a warning)",
        model=True,
    )
    gamma: float = setting(0.5, "scale γ of the safety vector added to the fusion", ge=0)
    safety_drop: UnitInterval = setting(0.0, "DARE drop rate p on the safety vector (rest rescaled by 1/(1−p))")
    control: Literal["none", "random"] = setting(
        "none", "random: a seeded random vector of the same per-tensor norm instead (control)"
    )
    control_seed: int = setting(0, "seed of safety_drop and of the random control")


class RESTA(FusionMethod):
    name = "resta"
    pretty_name = "RESTA: restoring safety through task arithmetic (safety vector θ_A − θ_U)"
    reference_url = "https://arxiv.org/abs/2402.11746"
    summary = (
        "θ_A + Merge(τ_i) + γ·(θ_A − θ_U): adds the aligned model's safety vector (aligned minus "
        "an unaligned counterpart) back to the fusion; optional DARE drop on it; data-free."
    )
    settings = RESTASettings

    def __init__(self) -> None:
        super().__init__()
        self._warned = False

    def tensor_masks(self, inputs: TensorInputs, parameters: Dict[str, Any]) -> TensorMasks:
        masks = super().tensor_masks(inputs, parameters)  # an optional mask artifact still applies
        unaligned, gamma = parameters["unaligned_model"], float(parameters["gamma"])
        if not unaligned or gamma == 0 or not inputs.base.is_floating_point():
            if not unaligned and not self._warned:
                self._warned = True
                import logging

                logging.getLogger(__name__).warning(
                    "resta: no unaligned_model given: merging with the plain backbone, WITHOUT a safety vector"
                )
            return masks
        base = inputs.base.float()
        vector = base - model_tensor(unaligned, inputs.name, base, inputs.vocabulary)
        seed = int(parameters["control_seed"])
        drop = float(parameters["safety_drop"])
        if drop > 0:
            generator = torch.Generator().manual_seed(tensor_seed(seed, inputs.name, offset=11))
            keep = torch.rand(vector.shape, generator=generator) >= drop
            vector = torch.where(keep, vector / (1 - drop), torch.zeros_like(vector)) if drop < 1 else torch.zeros_like(vector)
        vector = gamma * vector
        if parameters["control"] == "random":
            vector = random_like_norm(vector, seed, inputs.name)
        masks.add = vector.to(inputs.base.dtype)
        return masks


def random_like_norm(vector: torch.Tensor, seed: int, name: str) -> torch.Tensor:
    """A seeded Gaussian tensor with the Frobenius norm of ``vector``."""
    generator = torch.Generator().manual_seed(tensor_seed(seed, name, offset=13))
    noise = torch.randn(vector.shape, generator=generator, dtype=torch.float32)
    norm = noise.norm()
    return noise * (vector.float().norm() / norm) if norm > 0 else torch.zeros_like(vector)
