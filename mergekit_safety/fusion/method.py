"""The method framework: a safety method is its settings plus what it puts in the kernel's slots.

A method subclasses :class:`FusionMethod` (masks from an artifact file) or
:class:`LocatingFusionMethod` (an artifact computed from the models and data in its YAML),
declares its parameters once in ``settings`` (:mod:`mergekit_safety.fusion.settings`) and
overrides :meth:`~FusionMethod.masks_from_artifact` (or :meth:`~FusionMethod.tensor_masks`)
and, for a locating method, :meth:`~mergekit_safety.fusion.locate.Locator.compute_artifact`.
Nothing here knows mergekit's plugin API: :mod:`mergekit_safety.plugin.adapter` turns a
method into a mergekit merge method and its tensor groups into :class:`TensorInputs`.
See docs/adding_a_method.md.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from mergekit_safety.engine.seeding import seeded
from mergekit_safety.fusion.artifacts import ArtifactError, open_artifact, tensor_key
from mergekit_safety.fusion.kernel import TensorMasks, fuse
from mergekit_safety.fusion.locate import LocateRequest, Locator
from mergekit_safety.fusion.settings import AUTO, FusionSettings, LocatingSettings

logger = logging.getLogger(__name__)


@dataclass
class TensorInputs:
    """One output tensor's inputs: the base (aligned) tensor and the experts' tensors.

    ``base_model`` / ``expert_models`` are model references (paths, ``base+adapter``) when the
    merge runs on real models, and None when tensors are merged directly (no models to read
    fingerprints or compute artifacts from: only explicit artifact files can apply then).
    """

    name: str
    base: torch.Tensor
    experts: List[torch.Tensor]
    base_model: Any = None
    expert_models: Optional[List[Any]] = None
    #: how messages name the inputs (model references, or the ids of a direct tensor merge)
    labels: Optional[List[Any]] = None  # base first, then the experts
    #: for a vocabulary tensor re-aligned by mergekit (tokenizer_source union or a model):
    #: output row → base-vocabulary row (-1 for tokens the base lacks); artifacts are in the
    #: base's vocabulary (engine.vocabulary)
    vocabulary: Optional[torch.Tensor] = None

    @property
    def has_models(self) -> bool:
        return self.base_model is not None and self.expert_models is not None


class FusionMethod:
    """θ_A + Merge(τ_i) with the kernel's slots filled from a mask artifact (``mask``).

    ``parameters`` given to :meth:`merge` hold every global parameter by YAML name and every
    per-model parameter as a list in expert order.
    """

    name = "masked_fusion"
    pretty_name = "Masked fusion (mergekit-safety core)"
    reference_url: Optional[str] = None
    summary = (
        "θ_A + Merge(τ_i ⊙ keep_i): task vectors against the aligned base, masked per tensor "
        "by a mask artifact, fused with a mergekit backbone."
    )
    settings: type = FusionSettings
    #: artifact tensor roles this method applies (an artifact with none of them is refused)
    artifact_roles: tuple = ("keep", "post_keep", "zero")

    def __init__(self) -> None:
        self._checked: set = set()
        self._check_lock = threading.Lock()

    def check_roles(self, artifact) -> None:
        """Refuse an artifact that holds nothing this method applies — e.g. SOMF logits given
        to ``masked_fusion`` would otherwise merge silently as the plain backbone."""
        present = sorted({key.split("/", 1)[0].split("@", 1)[0] for key in artifact.keys()})
        if not set(present) & set(self.artifact_roles):
            writer = artifact.metadata.method
            hint = f"; merge with `merge_method: {writer}`" if writer and writer != self.name else ""
            raise ArtifactError(
                f"{artifact.path}: written by method {writer!r}, it holds {present or 'no'} tensors "
                f"but none of the roles {list(self.artifact_roles)} that {self.name} applies{hint}"
            )

    # ---- masks

    def check_models(self, artifact, inputs: TensorInputs) -> None:
        """Once per artifact and model set: refuse an artifact made for other models (or
        holding nothing this method applies)."""
        if not inputs.has_models:
            key = (artifact.path, None)
            with self._check_lock:
                if key in self._checked:
                    return
            self.check_roles(artifact)  # direct tensor API: roles and shapes can be checked
            with self._check_lock:
                self._checked.add(key)
            return
        key = (artifact.path, str(inputs.base_model), tuple(str(e) for e in inputs.expert_models))
        with self._check_lock:
            if key in self._checked:
                return
        self.check_roles(artifact)
        artifact.check_models(inputs.base_model, list(inputs.expert_models))
        with self._check_lock:
            self._checked.add(key)

    @staticmethod
    def read_mask(artifact, key: str, like: torch.Tensor, weight_name: str,
                  vocabulary: Optional[torch.Tensor] = None, fill: float = 1.0):
        """Tensor ``key`` of the artifact on ``like``'s device and dtype (None if absent).

        A vocabulary tensor whose rows mergekit re-aligned (``vocabulary``: output row → base
        row) is read row by row; rows of tokens the base lacks get ``fill`` (leave alone)."""
        if not artifact.has(key):
            return None
        values = read_rows(artifact, key, like, weight_name, vocabulary, fill)
        return values.to(device=like.device, dtype=like.dtype)

    def open_mask_artifact(self, inputs: TensorInputs, parameters: Dict[str, Any]):
        """The artifact this tensor's masks come from, or None (keep everything)."""
        path = parameters["mask"]
        if not path:
            return None
        artifact = open_artifact(path)
        self.check_models(artifact, inputs)
        return artifact

    def tensor_masks(self, inputs: TensorInputs, parameters: Dict[str, Any]) -> TensorMasks:
        artifact = self.open_mask_artifact(inputs, parameters)
        if artifact is None:
            return TensorMasks()
        return self.masks_from_artifact(artifact, inputs, parameters)

    def masks_from_artifact(self, artifact, inputs: TensorInputs, parameters: Dict[str, Any]) -> TensorMasks:
        """Generic artifact roles: keep (shared or per expert), post_keep, zero.

        Methods with their own artifact content (logits, unit labels, scores) override this.
        """
        name, base, rows = inputs.name, inputs.base, inputs.vocabulary
        shared_keep = self.read_mask(artifact, tensor_key("keep", name), base, name, rows)
        keep, expert_zero = [], []
        for position in range(len(inputs.experts)):
            index = self.expert_position(artifact, inputs, position)
            own = self.read_mask(artifact, tensor_key("keep", name, index), base, name, rows)
            keep.append(own if own is not None else shared_keep)
            expert_zero.append(self.read_mask(artifact, tensor_key("zero", name, index), base, name, rows, fill=0.0))
        return TensorMasks(
            keep=keep,
            post_keep=self.read_mask(artifact, tensor_key("post_keep", name), base, name, rows),
            zero=self.read_mask(artifact, tensor_key("zero", name), base, name, rows, fill=0.0),
            expert_zero=expert_zero,
            keep_rescale=bool(artifact.metadata.settings.get("keep_rescale", False)),
        )

    @staticmethod
    def expert_position(artifact, inputs: TensorInputs, position: int) -> int:
        """Index of an expert in the artifact: by fingerprint for real models, else by order."""
        if inputs.has_models and artifact.metadata.experts:
            return artifact.expert_index(inputs.expert_models[position])
        return position

    # ---- execution

    def fuse_arguments(self, parameters: Dict[str, Any], count: int) -> Dict[str, Any]:
        """Keyword arguments of :func:`~mergekit_safety.fusion.kernel.fuse` from the
        parameters (per-model values as lists in expert order)."""
        return dict(
            backbone=parameters["backbone"],
            weights=list(parameters["weight"])[:count],
            densities=list(parameters["density"])[:count],
            lambda_=parameters["lambda"],
            normalize=parameters["normalize"],
            rescale=parameters["rescale"],
            int8_mask=parameters.get("int8_mask", False),
            ties_selection=parameters.get("ties_selection", "mergekit"),
        )

    def merge(self, inputs: TensorInputs, parameters: Dict[str, Any]) -> torch.Tensor:
        base = inputs.base
        if not inputs.experts:
            if not getattr(self, "_warned_no_experts", False):
                self._warned_no_experts = True
                logger.warning(
                    "%s: the config has no model besides its base_model: the output is the base model", self.name
                )
            return base
        masks = self.tensor_masks(inputs, parameters)
        kwargs = self.fuse_arguments(parameters, len(inputs.experts))
        # a per-tensor seed (engine.seeding): reproducible whatever the order or thread
        with seeded(parameters.get("seed"), inputs.name or ""):
            result = fuse(base, inputs.experts, masks=masks, **kwargs)
        # NaN/Inf in any input reaches the output (NaN·0 is NaN), so one float32 sum of the
        # output detects it at a fraction of the cost of checking every input; only then are
        # the inputs scanned to name the culprit.
        if result.is_floating_point() and not bool(torch.isfinite(result.sum(dtype=torch.float32))):
            refuse_non_finite(inputs)
            if not bool(torch.isfinite(result).all()):
                raise ValueError(
                    f"merging tensor {inputs.name} produced NaN/Inf values from finite "
                    "inputs (overflow in the output dtype?); try dtype: float32"
                )
        return result


def read_rows(artifact, key: str, like: torch.Tensor, weight_name: str,
              vocabulary: Optional[torch.Tensor] = None, fill: float = 1.0) -> torch.Tensor:
    """Artifact tensor ``key`` shaped like ``like``: as stored, or — for a vocabulary tensor
    re-aligned by mergekit — gathered row by row through ``vocabulary`` (``fill`` for rows of
    tokens the base lacks). Any other shape difference is refused, naming file and tensor."""
    shape = tuple(artifact.shape(key))
    if shape == tuple(like.shape):
        return artifact.get(key)
    if (vocabulary is not None and len(shape) == like.dim() and shape[1:] == tuple(like.shape[1:])
            and vocabulary.numel() == like.shape[0] and int(vocabulary.max()) < shape[0]):
        values = artifact.get(key)
        out = torch.full(tuple(like.shape), fill, dtype=values.dtype if values.is_floating_point() else torch.float32)
        present = vocabulary >= 0
        out[present] = values[vocabulary[present]].to(out.dtype)
        return out
    raise ArtifactError(
        f"{artifact.path}: mask {key!r} has shape {list(shape)} but tensor "
        f"{weight_name} has shape {list(like.shape)} — the artifact was made for "
        "other models (or the vocabulary was re-aligned); recompute it"
    )


def refuse_non_finite(inputs: TensorInputs) -> None:
    """Raise, naming the model and tensor, if any input has NaN or Inf values."""
    labels = inputs.labels or [inputs.base_model] + list(inputs.expert_models or [None] * len(inputs.experts))
    entries = [("base model", labels[0], inputs.base)] + [
        ("model", labels[i + 1], tensor) for i, tensor in enumerate(inputs.experts)
    ]
    for role, model, tensor in entries:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"tensor {inputs.name} of {role} {model} contains NaN or Inf "
                "values; refusing to merge a corrupted checkpoint"
            )


def _stat_key(path: Any) -> tuple:
    try:
        stat = os.stat(path)
    except (OSError, TypeError):
        return (str(path),)
    return (str(path), stat.st_size, stat.st_mtime_ns)


def _frozen(values: Dict[str, Any]) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in values.items()))


class LocatingFusionMethod(Locator, FusionMethod):
    """A fusion method whose artifact is computed from the models and data in its YAML.

    ``mask: auto`` (default) puts the artifact in the cache under a content hash; a path
    makes it a file of the user's. Either way it is computed on first use if missing, and
    refused if stale (see :mod:`mergekit_safety.fusion.locate`).
    """

    settings: type = LocatingSettings

    def __init__(self) -> None:
        super().__init__()
        self._located: Dict[tuple, str] = {}
        self._warned_no_data = False

    def can_locate(self, parameters: Dict[str, Any]) -> bool:
        """Whether the parameters name what the locate step needs (data files)."""
        return all(parameters.get(name) for name in self.data_parameters)

    def wants_artifact(self, parameters: Dict[str, Any]) -> bool:
        """Whether a merge with these parameters reads an artifact (then computed ahead, at
        plan time, if missing)."""
        mask = parameters.get("mask")
        return bool(mask and mask != AUTO) or self.can_locate(parameters)

    def request(self, inputs: TensorInputs, parameters: Dict[str, Any]) -> LocateRequest:
        """The locate request of a merge, built from one tensor's inputs and parameters."""
        per_model = {p.name for p in self.settings.parameters() if p.per_model}
        experts = tuple(inputs.expert_models)
        shared = {k: v for k, v in parameters.items() if k not in per_model}
        expert_parameters = {
            expert: {k: parameters[k][i] for k in per_model if k in parameters}
            for i, expert in enumerate(experts)
        }
        models = {name: parameters.get(name) for name in self.model_parameters if parameters.get(name)}
        return LocateRequest(
            method=self.name,
            base=inputs.base_model,
            experts=experts,
            parameters=shared,
            expert_parameters=expert_parameters,
            models=models,
        )

    def open_mask_artifact(self, inputs: TensorInputs, parameters: Dict[str, Any]):
        path = parameters["mask"]
        explicit = path and path != AUTO
        if not inputs.has_models:
            # Direct tensor API (no models to compute from): only an explicit file can apply.
            return super().open_mask_artifact(inputs, parameters) if explicit else None
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
        request = self.request(inputs, parameters)
        key = (
            path,
            str(request.base),
            tuple(str(e) for e in request.experts),
            _frozen(request.parameters),
            tuple((str(e), _frozen(p)) for e, p in request.expert_parameters.items()),
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
        self.check_models(artifact, inputs)
        return artifact


_checkpoints: Dict[str, Any] = {}
_checkpoints_lock = threading.Lock()


def model_tensor(reference: Any, name: str, like: torch.Tensor, vocabulary: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tensor ``name`` of a further model (e.g. an unaligned model named by a parameter), on
    ``like``'s device and dtype — read lazily, one tensor at a time, with its shape checked.
    A vocabulary tensor re-aligned by mergekit (``vocabulary``: output row → base row; the
    further model shares the base's vocabulary) is gathered row by row; rows of tokens the
    base lacks are ``like``'s (so their difference to it is zero)."""
    from mergekit_safety.engine.checkpoint import Checkpoint, CheckpointError
    from mergekit_safety.fusion.models import resolve_model

    directory = os.path.abspath(resolve_model(reference))
    with _checkpoints_lock:
        checkpoint = _checkpoints.get(directory)
        if checkpoint is None:
            checkpoint = Checkpoint(directory)
            _checkpoints[directory] = checkpoint
    try:
        tensor = checkpoint.get(name)
    except CheckpointError as error:
        raise ArtifactError(f"model {reference}: {error}") from None
    if (tuple(tensor.shape) != tuple(like.shape) and vocabulary is not None and vocabulary.numel() == like.shape[0]
            and tuple(tensor.shape[1:]) == tuple(like.shape[1:]) and int(vocabulary.max()) < tensor.shape[0]):
        out = like.detach().to(tensor.dtype).clone()
        present = vocabulary >= 0
        out[present] = tensor[vocabulary[present]]
        tensor = out
    if tuple(tensor.shape) != tuple(like.shape):
        raise ArtifactError(
            f"model {reference}: tensor {name} has shape {list(tensor.shape)}, the merge's "
            f"has {list(like.shape)}"
        )
    return tensor.to(device=like.device, dtype=like.dtype)
