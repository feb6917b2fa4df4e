"""``safemerge``: blend the layers that left the safety subspace back towards a safe model
(Djuhera et al., arXiv 2503.17239; the data-free form).

Per layer (the 2-D Linear weights of the decoder layers), the fused update's projected cosine
to the alignment direction V = θ_A − θ_U is measured as in :mod:`.safe_lora`; where it is below
``threshold`` (or among the ``top_k`` lowest) the layer is blended towards the safe model:

    θ = (1 − w)·θ_fused + w·θ_S      (θ_S = the aligned base model, or ``safety_model``)

and elsewhere the fusion is kept. In the kernel's terms: ``post_keep = 1 − w`` on the fused
update, plus ``w·(θ_S − θ_A)`` added when a separate safety model is given. The paper selects
layers with a safety subspace measured on data; this data-free form uses the aligned-minus-
unaligned direction, like Safe LoRA. ``control: random`` blends a random set of the same number
of layers.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from mergekit_safety.fusion.kernel import TensorMasks
from mergekit_safety.fusion.method import TensorInputs, model_tensor
from mergekit_safety.fusion.settings import UnitInterval, setting
from mergekit_safety.methods.safe_lora import ProjectionMethod, ProjectionSettings


class SafeMergeSettings(ProjectionSettings):
    blend: UnitInterval = setting(0.5, "weight w of the safe model in the blended layers")
    safety_model: str = setting(
        "", "blend towards this model instead of the aligned base (a local model folder); empty = the base", model=True
    )


class SafeMerge(ProjectionMethod):
    name = "safemerge"
    pretty_name = "SafeMERGE (data-free): layers whose update leaves the safety subspace blended towards a safe model"
    reference_url = "https://arxiv.org/abs/2503.17239"
    summary = (
        "Where the fused update's projected cosine to θ_A − θ_U is below a threshold (or among the k "
        "lowest), the layer becomes (1 − w)·fused + w·safe; elsewhere the fusion; data-free."
    )
    settings = SafeMergeSettings

    def streaming_masks(self, inputs, parameters, projector, threshold, count) -> TensorMasks:
        weight = float(parameters["blend"])
        safe = None
        if parameters.get("safety_model"):
            safe = model_tensor(parameters["safety_model"], inputs.name, inputs.base).float() - inputs.base.float()

        def blend(update: torch.Tensor) -> torch.Tensor:
            _, cosine = projector.image_and_cosine(update)
            count(cosine < threshold)
            if cosine >= threshold:
                return update
            blended = update * (1.0 - weight)
            return blended if safe is None else (blended.float() + weight * safe).to(update.dtype)

        return TensorMasks(project=blend)

    def masks_from_artifact(self, artifact, inputs: TensorInputs, parameters: Dict[str, Any]) -> TensorMasks:
        _, fusion = self.choices(artifact, parameters, len(inputs.experts))
        if inputs.name not in fusion:
            return TensorMasks()
        weight = float(parameters["blend"])
        masks = TensorMasks(post_keep=torch.full((), 1.0 - weight, dtype=inputs.base.dtype, device=inputs.base.device))
        if parameters.get("safety_model"):
            safe = model_tensor(parameters["safety_model"], inputs.name, inputs.base)
            masks.add = (weight * (safe.double() - inputs.base.double())).to(inputs.base.dtype)
        return masks
