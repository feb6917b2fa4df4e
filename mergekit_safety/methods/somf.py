"""``somf``: subspace-oriented model fusion (Yi et al., arXiv 2405.09055).

    θ[k] = θ_A[k] + Merge(τ̃_1[k], …, τ̃_n[k]),   τ̃_i[k] = m[k] ⊙ τ_i[k] / mean(m[k]),   τ_i = θ_i − θ_A

One real logit ``s`` per element of every *masked* tensor, **shared by all task vectors**,
is learned by :mod:`mergekit_safety.somf_training` (the locate step: Concrete relaxation,
DPO on safety preference pairs, gradients reach only the logits). At merge time the mask is

* ``mask_mode: binary`` (default) — the deterministic ``m = 1[s > 0]`` (the authors' code draws
  one unseeded Bernoulli sample; thresholding at 0 is its mode and reproducible), or
* ``mask_mode: expected`` — ``m = σ(s)``, the relaxed mask's mean.

The per-tensor rescale ``/ mean(m)`` of the paper is ``keep_rescale`` (on by default). Tensors
without logits (not selected by ``modules``, or with a zero task vector for every expert, e.g.
outside a LoRA's target modules) are fused by the plain backbone — exactly as training assumed.
``control: random`` replaces each learned binary mask by a seeded random mask of the same
per-tensor density: the equal-density control every masking result must beat.

Configuration (every YAML parameter has a default, so mergekit's regression test, which runs
every registered method with defaults, keeps passing; without ``preference_data`` and without
an explicit ``mask`` file the method warns and is the plain backbone):
the training settings are validated once by :class:`SOMFSettings` (pydantic). See docs/somf.md.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from typing import Any, Dict, Literal, Optional, Tuple

import torch
from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import Annotated

from mergekit.merge_methods.base import TensorGroup

from mergekit_safety.artifacts import ArtifactError, tensor_key
from mergekit_safety.core import Backbone, LocatingMaskedFusion, TensorMasks, _parameter

logger = logging.getLogger(__name__)

LOGITS_ROLE = "logits"
DARE_BACKBONES = (Backbone.dare_linear.value, Backbone.dare_ties.value)

Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
PositiveInt = Annotated[int, Field(ge=1)]


class SOMFSettings(BaseModel):
    """Everything the mask-learning step depends on (validated; recorded in the artifact)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # data
    preference_data: str = Field(description="JSONL: prompt, chosen (safe), rejected (harmful)")
    utility_data: str = Field("", description="JSONL: prompt, response (benign); optional")
    max_length: PositiveInt = 256
    # mask
    modules: str = "linear"
    temperature: Positive = 0.5
    init: float = 0.0
    keep_rescale: bool = True
    # objective
    beta: Positive = 0.1
    reference: Literal["fusion", "aligned", "none"] = "fusion"
    chosen_nll_weight: NonNegative = 0.0
    utility_weight: NonNegative = 0.0
    utility_loss: Literal["kl", "ce"] = "kl"
    sparsity_weight: NonNegative = 0.0
    entropy_weight: NonNegative = 0.0
    # optimisation
    lr: Positive = 1e-2
    steps: PositiveInt = 300
    batch_size: PositiveInt = 16
    train_seed: int = 0
    # fusion backbone (identical to the merge's)
    backbone: Backbone = Backbone.task_arithmetic
    lambda_: float = 1.0
    normalize: Optional[bool] = None
    rescale: Optional[bool] = None
    seed: Optional[int] = None
    weights: Tuple[float, ...] = ()
    densities: Tuple[float, ...] = ()
    # execution (not recorded: they do not change the result beyond float rounding)
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    offload_folder: str = ""
    threads: Annotated[int, Field(ge=0)] = 0

    @property
    def dare_seed(self) -> Optional[int]:
        """Seed of DARE's per-tensor random drop: ``seed`` if set, else ``train_seed`` — the
        merge uses the same rule, so the drop at merge time is the drop training saw."""
        if self.backbone.value not in DARE_BACKBONES:
            return self.seed
        return self.train_seed if self.seed is None else self.seed

    @classmethod
    def from_request(cls, request) -> "SOMFSettings":
        p = dict(request.parameters)
        fields = {name: p[name] for name in cls.model_fields if name in p}
        fields["lambda_"] = p.get("lambda", 1.0)
        fields["weights"] = tuple(
            float(request.expert_parameters.get(e, {}).get("weight", 1.0)) for e in request.experts
        )
        fields["densities"] = tuple(
            float(request.expert_parameters.get(e, {}).get("density", 1.0)) for e in request.experts
        )
        if not fields.get("preference_data"):
            raise ArtifactError(
                f"{request.method}: `preference_data` (JSONL of prompt/chosen/rejected safety "
                "pairs) is required to learn the mask"
            )
        return cls(**fields)


#: YAML parameters that change the learned logits (recorded; a change makes the artifact stale)
LOCATE_PARAMETERS = (
    "preference_data",
    "utility_data",
    "max_length",
    "modules",
    "temperature",
    "init",
    "keep_rescale",
    "beta",
    "reference",
    "chosen_nll_weight",
    "utility_weight",
    "utility_loss",
    "sparsity_weight",
    "entropy_weight",
    "lr",
    "steps",
    "batch_size",
    "train_seed",
    "backbone",
    "lambda",
    "normalize",
    "rescale",
    "seed",
)


def random_control_mask(reference: torch.Tensor, name: str, seed: int) -> torch.Tensor:
    """A random binary mask with exactly as many ones as ``reference`` (per tensor), seeded by
    ``seed`` and the tensor name (independent of execution order)."""
    count = int(reference.sum().round().item()) if reference.dtype != torch.bool else int(reference.sum())
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    order = torch.randperm(reference.numel(), generator=generator)
    mask = torch.zeros(reference.numel(), dtype=torch.float32)
    mask[order[:count]] = 1.0
    return mask.reshape(reference.shape)


def mask_from_logits(logits: torch.Tensor, mode: str, name: str = "", seed: int = 0) -> torch.Tensor:
    """Merge-time mask: ``binary`` = 1[s > 0] (deterministic), ``expected`` = σ(s),
    ``sample`` = one Bernoulli(σ(s)) draw (the authors' export), seeded by ``seed`` and the
    tensor name."""
    logits = logits.float()
    if mode == "binary":
        return (logits > 0).float()
    if mode == "expected":
        return torch.sigmoid(logits)
    if mode == "sample":
        generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()) + 7) % (2**63))
        return (torch.rand(logits.shape, generator=generator) < torch.sigmoid(logits)).float()
    raise ValueError(f"somf: unknown mask_mode {mode!r} (binary, expected or sample)")


class SOMF(LocatingMaskedFusion):
    name = "somf"
    pretty_name = "SOMF: subspace-oriented model fusion (learned safety-subspace mask)"
    reference_url = "https://arxiv.org/abs/2405.09055"
    summary = (
        "θ_A + Merge(m ⊙ τ_i / mean(m)) with one mask m shared by all task vectors, learned "
        "with DPO on safety preference pairs over the functionally fused model."
    )

    locate_parameters = LOCATE_PARAMETERS
    data_parameters = ("preference_data", "utility_data")
    expert_locate_parameters = ("weight", "density")
    binds_experts = True

    def extra_parameters(self):
        return (
            _parameter("preference_data", str, "", "JSONL of safety preference pairs (prompt, chosen refusal, rejected harmful answer)"),
            _parameter("utility_data", str, "", "optional JSONL of benign (prompt, response) for the utility term"),
            _parameter("max_length", PositiveInt, 256, "token limit per example (prompt cut from the left)"),
            _parameter("modules", str, "linear", "masked tensors: comma list of presets (attention, mlp, linear, all) or regexes on tensor names"),
            _parameter("temperature", Positive, 0.5, "Concrete relaxation temperature (paper: 0.5)"),
            _parameter("init", float, 0.0, "initial mask logit (paper: 0, p = 0.5)"),
            _parameter("keep_rescale", bool, True, "per-tensor rescale τ̃ = m ⊙ τ / mean(m) (paper)"),
            _parameter("beta", Positive, 0.1, "DPO β"),
            _parameter("reference", Literal["fusion", "aligned", "none"], "fusion", "DPO reference log-probs: fusion = the unmasked fusion (default), aligned = the base (aligned) model — the mask must make the fusion prefer refusals at least as much as the aligned model does —, none = reference-free margin"),
            _parameter("chosen_nll_weight", NonNegative, 0.0, "weight of a per-token NLL on the chosen (safe) answers, RPO-style (extension; 0 = off)"),
            _parameter("utility_weight", NonNegative, 0.0, "weight of the utility term on utility_data (extension; 0 = off)"),
            _parameter("utility_loss", Literal["kl", "ce"], "kl", "utility term: kl to the unmasked fusion, or ce on the responses"),
            _parameter("sparsity_weight", NonNegative, 0.0, "weight of a penalty on the expected mask density (extension; 0 = off)"),
            _parameter("entropy_weight", NonNegative, 0.0, "weight of a penalty on the mean binary entropy of σ(s): decided logits, so the exported binary mask is the model training saw (extension; 0 = off)"),
            _parameter("lr", Positive, 1e-2, "AdamW learning rate (cosine decay)"),
            _parameter("steps", PositiveInt, 300, "optimisation steps"),
            _parameter("batch_size", PositiveInt, 16, "preference pairs (and utility examples) per step"),
            _parameter("train_seed", int, 0, "seed of the mask training (batches, Concrete noise; DARE drop if `seed` is empty)"),
            _parameter("device", str, "cpu", "device of the mask training (cpu, cuda, cuda:1, ...)"),
            _parameter("dtype", Literal["float32", "bfloat16", "float16"], "float32", "model dtype during mask training (logits stay float32)"),
            _parameter("offload_folder", str, "", "train with the unmasked modules offloaded to this folder (accelerate); empty = all in memory"),
            _parameter("threads", Annotated[int, Field(ge=0)], 0, "torch CPU threads during mask training (0 = torch's default; 1 is fastest for tiny models)"),
            _parameter("mask_mode", Literal["binary", "expected", "sample"], "binary", "merge-time mask: binary 1[s>0], expected σ(s), or sample (one seeded Bernoulli(σ(s)) draw, as the authors' code)"),
            _parameter("control", Literal["none", "random"], "none", "random = equal-density random mask per tensor (control experiment)"),
            _parameter("control_seed", int, 0, "seed of the random control mask and of mask_mode: sample"),
        )

    def artifact_record(self, request):
        # The merge kernel substitutes train_seed for an empty DARE seed (merge_group below):
        # record the effective seed so `locate` and the kernel describe the same artifact.
        parameters = dict(request.parameters)
        if parameters.get("seed") is None and parameters.get("backbone") in DARE_BACKBONES:
            parameters["seed"] = parameters.get("train_seed", 0)
            request = dataclasses.replace(request, parameters=parameters)
        return super().artifact_record(request)

    def can_locate(self, parameters: Dict[str, Any]) -> bool:
        return bool(parameters.get("preference_data"))  # utility_data is optional

    def compute_artifact(self, request):
        from mergekit_safety.locate import resolve_model
        from mergekit_safety.somf_training import train_mask

        settings = SOMFSettings.from_request(request)
        base = resolve_model(request.base)
        experts = [resolve_model(e) for e in request.experts]
        logits, extra = train_mask(base, experts, settings)
        tensors = {tensor_key(LOGITS_ROLE, name): value for name, value in logits.items()}
        return tensors, extra

    # ---- merge

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        if parameters.get("seed") is None and parameters.get("backbone") in DARE_BACKBONES:
            # the same DARE drop the mask was trained through (SOMFSettings.dare_seed)
            parameters = {**parameters, "seed": parameters.get("train_seed", 0)}
        return super().merge_group(group, **parameters)

    def masks_from_artifact(self, artifact, group: TensorGroup, parameters: Dict[str, Any]) -> TensorMasks:
        name = group.metadata.name
        base = group.base.tensor
        key = tensor_key(LOGITS_ROLE, name)
        if not artifact.has(key):
            return TensorMasks()  # not a masked tensor: plain backbone, as in training
        shape = artifact.shape(key)
        if shape != tuple(base.shape):
            raise ArtifactError(
                f"{artifact.path}: logits {key!r} have shape {list(shape)} but tensor {name} has "
                f"shape {list(base.shape)} — the artifact was made for other models; recompute it"
            )
        mode = parameters.get("mask_mode", "binary")
        if mode == "binary" and parameters.get("control", "none") != "random":
            # the same 1[s > 0] as mask_from_logits, straight to the merge dtype (no float copy)
            mask = (artifact.get(key) > 0).to(device=base.device, dtype=base.dtype)
        else:
            mask = mask_from_logits(artifact.get(key), mode, name, int(parameters.get("control_seed", 0)))
            if parameters.get("control", "none") == "random":
                mask = random_control_mask(mask, name, int(parameters.get("control_seed", 0)))
            mask = mask.to(device=base.device, dtype=base.dtype)
        keep_rescale = bool(artifact.metadata.settings.get("keep_rescale", parameters.get("keep_rescale", True)))
        return TensorMasks(keep=[mask] * len(group.non_base), keep_rescale=keep_rescale)
