"""The merge core every method of this package shares.

    θ = θ_A + post_keep ⊙ Merge(τ_1 ⊙ keep_1, …, τ_n ⊙ keep_n),   τ_i = θ_i − θ_A

θ_A is the config's ``base_model`` (the safety-aligned model), ``Merge`` a selectable backbone
(task arithmetic, TIES, DARE linear/TIES, mean) built from mergekit's own sparsification
(``mergekit.sparsify``) and sign consensus (``get_mask``), so that with every mask at "keep"
the output equals mergekit's built-in method bit for bit. Optional extras, used by the
methods built on this core:

* ``keep_rescale`` — SOMF's per-tensor rescale τ̃ = m ⊙ τ / mean(m);
* ``expert_zero`` — entries of an expert's weights set to 0 before fusion (Antidote's
  "zero" mode applied per expert);
* ``zero`` — entries of the fused output set to 0 (Antidote's "zero" mode on the fusion).

A method supplies its masks for one output tensor through :meth:`MaskedFusion.tensor_masks`;
the arithmetic lives once, in :func:`fuse`.
"""

from __future__ import annotations

import logging
import threading
import zlib
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import torch
from pydantic import Field
from typing_extensions import Annotated

from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)
from mergekit.merge_methods.generalized_task_arithmetic import get_mask
from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify

from mergekit_safety.artifacts import ArtifactError, open_artifact, tensor_key
from mergekit_safety.locate import AUTO, Locator, request_from_group

logger = logging.getLogger(__name__)


class Backbone(str, Enum):
    task_arithmetic = "task_arithmetic"
    ties = "ties"
    dare_linear = "dare_linear"
    dare_ties = "dare_ties"
    mean = "mean"


@dataclass(frozen=True)
class BackboneDefinition:
    sparsification: Optional[SparsificationMethod]
    consensus: bool
    default_normalize: bool
    default_rescale: bool
    mergekit_equivalent: str


# Defaults mirror the corresponding mergekit built-ins (registry.py of mergekit 0.1.5).
BACKBONES: Dict[Backbone, BackboneDefinition] = {
    Backbone.task_arithmetic: BackboneDefinition(None, False, False, False, "task_arithmetic"),
    Backbone.ties: BackboneDefinition(SparsificationMethod.magnitude, True, True, False, "ties"),
    Backbone.dare_linear: BackboneDefinition(SparsificationMethod.random, False, False, True, "dare_linear"),
    Backbone.dare_ties: BackboneDefinition(SparsificationMethod.random, True, False, True, "dare_ties"),
    # θ_A + Σ w_i τ_i / Σ w_i: with unit weights, the mean of the experts (mergekit `linear`
    # over the experts alone).
    Backbone.mean: BackboneDefinition(None, False, True, False, "linear"),
}


@dataclass
class TensorMasks:
    """The masks one method applies to one output tensor (None = leave alone)."""

    keep: List[Optional[torch.Tensor]] = field(default_factory=list)  # one per expert
    post_keep: Optional[torch.Tensor] = None
    zero: Optional[torch.Tensor] = None
    expert_zero: List[Optional[torch.Tensor]] = field(default_factory=list)
    keep_rescale: bool = False


def fuse(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    backbone: Backbone = Backbone.task_arithmetic,
    weights: Optional[Sequence[float]] = None,
    densities: Optional[Sequence[float]] = None,
    lambda_: float = 1.0,
    normalize: Optional[bool] = None,
    rescale: Optional[bool] = None,
    int8_mask: bool = False,
    masks: Optional[TensorMasks] = None,
) -> torch.Tensor:
    """Fuse expert tensors with the aligned ``base`` through masked task vectors.

    Pure: inputs are not modified. Random backbones (DARE) draw from torch's global RNG,
    exactly as mergekit does; callers that want reproducibility seed it.
    """
    backbone = Backbone(backbone)
    definition = BACKBONES[backbone]
    count = len(experts)
    if count == 0:
        return base
    weights = [1.0] * count if weights is None else list(weights)
    densities = [1.0] * count if densities is None else list(densities)
    normalize = definition.default_normalize if normalize is None else normalize
    rescale = definition.default_rescale if rescale is None else rescale
    masks = masks or TensorMasks()

    deltas = base.new_empty((count, *base.shape))
    last_keep, density = None, None
    for index, expert in enumerate(experts):
        zero = masks.expert_zero[index] if index < len(masks.expert_zero) else None
        if zero is not None:
            expert = torch.where(zero.bool(), torch.zeros_like(expert), expert)
        keep = masks.keep[index] if index < len(masks.keep) else None
        slot = deltas[index]
        differentiable = torch.is_grad_enabled() and (
            expert.requires_grad or base.requires_grad or (keep is not None and keep.requires_grad)
        )
        if expert.dtype == base.dtype and not differentiable:
            # write τ_i straight into its slot and mask it in place: no temporary per expert
            # (not when autograd tracks the inputs, e.g. SOMF's mask logits: out= is not
            # differentiable, so that path keeps the out-of-place ops below)
            delta = torch.sub(expert, base, out=slot)
            if keep is not None:
                delta.mul_(keep)
        else:
            delta = expert - base
            if keep is not None:
                delta = delta * keep
        if keep is not None and masks.keep_rescale:
            if keep is not last_keep:  # SOMF shares one mask: its density is computed once
                last_keep, density = keep, keep.float().mean()
            delta = delta / density if density > 0 else torch.zeros_like(delta)
        if definition.sparsification is not None:
            delta = sparsify(
                delta,
                density=densities[index],
                method=definition.sparsification,
                rescale_norm=RescaleNorm.l1 if rescale else None,
            )
        if delta is not slot:  # computed out of place (or rescaled / sparsified since)
            slot.copy_(delta)
        del delta, slot

    weight_tensor = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > weight_tensor.dim():
        weight_tensor.unsqueeze_(-1)
    deltas.mul_(weight_tensor)

    if definition.consensus:
        mask_dtype = torch.int8 if int8_mask else base.dtype
        agree = get_mask(deltas, method="sum", mask_dtype=mask_dtype)
        mixed = (deltas * agree).sum(dim=0)
        divisor = (weight_tensor * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weight_tensor.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    del deltas

    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    if masks.post_keep is not None:
        mixed = mixed * masks.post_keep
    result = base + mixed
    if masks.zero is not None:
        result = torch.where(masks.zero.bool(), torch.zeros_like(result), result)
    return result.to(base.dtype)


# --------------------------------------------------------------------------- the method


@dataclass(frozen=True)
class NamedParameterSpec(ParameterSpec):
    """A ParameterSpec whose validation errors name the YAML parameter and the value."""

    def validate(self, value: Any) -> Any:
        from pydantic import ValidationError

        try:
            return super().validate(value)
        except ValidationError as error:
            reasons = "; ".join(item["msg"] for item in error.errors())
            raise ValueError(
                f"merge parameter {self.name!r}: invalid value {value!r} ({reasons})"
            ) from None


def _parameter(name, value_type, default, description, scope=ParameterScope.SHARED):
    return NamedParameterSpec(name, value_type, scope, default=default, description=description)


UnitInterval = Annotated[float, Field(ge=0.0, le=1.0)]


class MaskedFusion(GroupMergeMethod):
    """θ_A + post_keep ⊙ Merge(τ_i ⊙ keep_i) with masks read lazily from an artifact.

    Subclasses (one per safety method) add parameters and turn their artifact into
    :class:`TensorMasks` in :meth:`tensor_masks`; everything else is shared.
    """

    name = "masked_fusion"
    pretty_name = "Masked fusion (mergekit-safety core)"
    reference_url: Optional[str] = None
    summary = (
        "θ_A + Merge(τ_i ⊙ keep_i): task vectors against the aligned base, masked per tensor "
        "by a mask artifact, fused with a mergekit backbone."
    )
    mask_description = (
        "path of a mask artifact (safetensors, roles keep/post_keep/zero); empty = keep all. "
        "Relative paths resolve from the working directory."
    )

    def __init__(self) -> None:
        self._checked: set = set()
        self._check_lock = threading.Lock()

    # ---- declaration

    def extra_parameters(self) -> Tuple[ParameterSpec, ...]:
        return ()

    @cached_property
    def spec(self) -> MergeMethodSpec:
        parameters = (
            _parameter("mask", str, "", self.mask_description),
            _parameter(
                "backbone",
                Literal[tuple(b.value for b in Backbone)],
                Backbone.task_arithmetic.value,
                "how the masked task vectors are combined: task_arithmetic, ties, "
                "dare_linear, dare_ties or mean (mergekit's own code)",
            ),
            _parameter("lambda", float, 1.0, "scale of the fused task vector"),
            _parameter(
                "normalize",
                Optional[bool],
                None,
                "divide by the sum of weights (default: the backbone's mergekit default)",
            ),
            _parameter(
                "rescale",
                Optional[bool],
                None,
                "rescale sparsified task vectors to their L1 norm (default: as mergekit)",
            ),
            _parameter("int8_mask", bool, False, "store the TIES sign mask as int8"),
            _parameter(
                "seed",
                Optional[int],
                None,
                "seed for DARE's random drop (per tensor); empty = torch's global RNG",
            ),
            *self.extra_parameters(),
            _parameter(
                "weight", float, 1.0, "per-model weight of the task vector", ParameterScope.NON_BASE
            ),
            _parameter(
                "density",
                UnitInterval,
                1.0,
                "per-model share of the task vector TIES/DARE keep",
                ParameterScope.NON_BASE,
            ),
        )
        return MergeMethodSpec(
            name=self.name,
            pretty_name=self.pretty_name,
            reference_url=self.reference_url,
            parameters=parameters,
            contract=InputContract(base=BasePolicy.REQUIRED),
        )

    # ---- plan-time validation

    def validate_inputs(self, input_ids, base_id=None, *, group_name=None) -> None:
        super().validate_inputs(input_ids, base_id, group_name=group_name)
        config = _planning_config()
        if config is not None:
            from mergekit_safety.checks import check_at_plan_time

            check_at_plan_time(config)

    # ---- masks

    def check_models(self, artifact, group: TensorGroup) -> None:
        """Once per artifact and model set: refuse an artifact made for other models."""
        if not _is_model_reference(group.base.id):
            return  # direct tensor API (ids are not models): only shapes can be checked
        key = (artifact.path, group.base.id, tuple(entry.id for entry in group.non_base))
        with self._check_lock:
            if key in self._checked:
                return
        artifact.check_models(group.base.id, [entry.id for entry in group.non_base])
        with self._check_lock:
            self._checked.add(key)

    def read_mask(self, artifact, key: str, like: torch.Tensor, weight_name: str):
        if not artifact.has(key):
            return None
        shape = artifact.shape(key)
        if shape != tuple(like.shape):
            raise ArtifactError(
                f"{artifact.path}: mask {key!r} has shape {list(shape)} but tensor "
                f"{weight_name} has shape {list(like.shape)} — the artifact was made for "
                "other models (or the vocabulary was re-aligned); recompute it"
            )
        return artifact.get(key).to(device=like.device, dtype=like.dtype)

    def open_mask_artifact(self, group: TensorGroup, parameters: Dict[str, Any]):
        """The artifact this tensor's masks come from, or None (keep everything)."""
        path = parameters["mask"]
        if not path:
            return None
        artifact = open_artifact(path)
        self.check_models(artifact, group)
        return artifact

    def tensor_masks(self, group: TensorGroup, parameters: Dict[str, Any]) -> TensorMasks:
        artifact = self.open_mask_artifact(group, parameters)
        if artifact is None:
            return TensorMasks()
        return self.masks_from_artifact(artifact, group, parameters)

    def masks_from_artifact(self, artifact, group: TensorGroup, parameters: Dict[str, Any]) -> TensorMasks:
        """Generic artifact roles: keep (shared or per expert), post_keep, zero.

        Methods with their own artifact content (logits, unit labels, scores) override this.
        """
        name = group.metadata.name
        base = group.base.tensor
        experts = group.non_base
        shared_keep = self.read_mask(artifact, tensor_key("keep", name), base, name)
        keep, expert_zero = [], []
        for position, entry in enumerate(experts):
            index = self.expert_position(artifact, entry.id, position)
            own = self.read_mask(artifact, tensor_key("keep", name, index), base, name)
            keep.append(own if own is not None else shared_keep)
            expert_zero.append(self.read_mask(artifact, tensor_key("zero", name, index), base, name))
        return TensorMasks(
            keep=keep,
            post_keep=self.read_mask(artifact, tensor_key("post_keep", name), base, name),
            zero=self.read_mask(artifact, tensor_key("zero", name), base, name),
            expert_zero=expert_zero,
            keep_rescale=bool(artifact.metadata.settings.get("keep_rescale", False)),
        )

    @staticmethod
    def expert_position(artifact, model_id: Any, position: int) -> int:
        """Index of an expert in the artifact: by fingerprint for real models, else by order."""
        if _is_model_reference(model_id) and artifact.metadata.experts:
            return artifact.expert_index(model_id)
        return position

    # ---- execution

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base.tensor
        experts = group.non_base
        if not experts:
            return base
        masks = self.tensor_masks(group, parameters)
        kwargs = dict(
            backbone=parameters["backbone"],
            weights=[parameters["weight"][entry.id] for entry in experts],
            densities=[parameters["density"][entry.id] for entry in experts],
            lambda_=parameters["lambda"],
            normalize=parameters["normalize"],
            rescale=parameters["rescale"],
            int8_mask=parameters["int8_mask"],
            masks=masks,
        )
        tensors = [entry.tensor for entry in experts]
        seed = parameters.get("seed")
        if seed is None:
            result = fuse(base, tensors, **kwargs)
        else:
            # Per-tensor seed: reproducible whatever the execution order or thread.
            name = group.metadata.name or ""
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
                result = fuse(base, tensors, **kwargs)
        # NaN/Inf in any input reaches the output (NaN·0 is NaN), so one float32 sum of the
        # output detects it at a fraction of the cost of checking every input; only then are
        # the inputs scanned to name the culprit.
        if result.is_floating_point() and not bool(torch.isfinite(result.sum(dtype=torch.float32))):
            _refuse_non_finite(group)
            if not bool(torch.isfinite(result).all()):
                raise ValueError(
                    f"merging tensor {group.metadata.name} produced NaN/Inf values from finite "
                    "inputs (overflow in the output dtype?); try dtype: float32"
                )
        return result


def _planning_config():
    """The MergeConfiguration mergekit's planner is validating, if we are called from it.

    mergekit 0.1.5 gives methods no plan-time view of their parameters; the planner calls
    ``validate_inputs`` once per slice before any tensor task exists, so the config is
    found on the caller's frame. Any other caller (tests, direct API) gets None.
    """
    import sys

    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if type(owner).__name__ == "MergePlanner" and frame.f_code.co_name == "normalize_config":
            return getattr(owner, "config", None)
        frame = frame.f_back
    return None


def _stat_key(path: Any) -> tuple:
    import os

    try:
        stat = os.stat(path)
    except (OSError, TypeError):
        return (str(path),)
    return (str(path), stat.st_size, stat.st_mtime_ns)


def _is_model_reference(value: Any) -> bool:
    return type(value).__name__ == "ModelReference"


def _refuse_non_finite(group: TensorGroup) -> None:
    for entry in group.entries:
        tensor = entry.tensor
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            role = "base model" if entry.is_base else "model"
            raise ValueError(
                f"tensor {group.metadata.name} of {role} {entry.id} contains NaN or Inf "
                "values; refusing to merge a corrupted checkpoint"
            )


class LocatingMaskedFusion(Locator, MaskedFusion):
    """A masked fusion whose artifact is computed from the models and data in its YAML.

    ``mask: auto`` (default) puts the artifact in the cache under a content hash; a path
    makes it a file of the user's. Either way it is computed on first use if missing, and
    refused if stale (see mergekit_safety.locate).
    """

    mask_description = (
        "artifact path, or 'auto' (default: content-addressed file in the cache); computed "
        "from the models and data on first use if missing, refused if stale"
    )

    def __init__(self) -> None:
        super().__init__()
        self._located: Dict[tuple, str] = {}
        self._warned_no_data = False

    def can_locate(self, parameters: Dict[str, Any]) -> bool:
        """Whether the parameters name what the locate step needs (data files)."""
        return all(parameters.get(name) for name in self.data_parameters)

    @cached_property
    def spec(self) -> MergeMethodSpec:
        spec = super().spec
        parameters = tuple(
            _parameter("mask", str, AUTO, self.mask_description) if p.name == "mask" else p
            for p in spec.parameters
        )
        return MergeMethodSpec(
            name=spec.name,
            pretty_name=spec.pretty_name,
            reference_url=spec.reference_url,
            parameters=parameters,
            contract=spec.contract,
        )

    def open_mask_artifact(self, group: TensorGroup, parameters: Dict[str, Any]):
        path = parameters["mask"]
        explicit = path and path != AUTO
        if not _is_model_reference(group.base.id):
            # Direct tensor API (no models to compute from): only an explicit file can apply.
            return super().open_mask_artifact(group, parameters) if explicit else None
        if not explicit and not self.can_locate(parameters):
            if not self._warned_no_data:
                self._warned_no_data = True
                logger.warning(
                    "%s: no artifact and no calibration data (%s) given: merging with the "
                    "plain %s backbone, WITHOUT safety restoration",
                    self.name,
                    ", ".join(self.data_parameters),
                    parameters["backbone"],
                )
            return None
        request = request_from_group(self.name, group, parameters)
        key = (
            path,
            request.base,
            request.experts,
            tuple(sorted((k, str(v)) for k, v in request.parameters.items())),
            tuple((str(e), tuple(sorted((k, str(v)) for k, v in p.items()))) for e, p in request.expert_parameters.items()),
            # a data file edited between two merges in one process must be noticed
            tuple(_stat_key(parameters.get(name)) for name in self.data_parameters),
        )
        with self._check_lock:
            located = self._located.get(key)
        if located is None:
            located = self.locate(request)
            with self._check_lock:
                self._located[key] = located
        artifact = open_artifact(located)
        self.check_models(artifact, group)
        return artifact
