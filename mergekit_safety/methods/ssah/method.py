"""``ssah``: protect safety-critical units of the aligned model from the fused task vectors.

SSAH (Li & Kim, "Safety-critical units", arXiv 2410.10862) finds that safety lives in few
structured units (attention heads, MLP neurons; see :mod:`mergekit_safety.methods.ssah.units`). This method
scores every unit of the aligned model θ_A on a safety set and a utility set, labels the units,
and protects the safety-critical ones during fusion:

    θ = θ_A + (1 − M_protect) ⊙ Merge(τ_1, …, τ_n),     τ_i = θ_i − θ_A

with ``M_protect`` the rows (q/k/v/gate/up) and columns (o/down) of the protected units, and
``Merge`` any backbone of the shared core (task arithmetic, TIES, DARE, mean). The same
artifact freezes those units during fine-tuning (:mod:`mergekit_safety.methods.ssah.freezing`).

Scoring (the authors' working code: FLAP-style, no gradients)
-------------------------------------------------------------
The inputs X of ``o_proj`` and ``down_proj`` are hooked (response tokens only by default);
for input channel j of a layer, ``S_j = Var_tokens(X[:, j]) · ‖W[:, j]‖²``.

* MLP neuron j: ``S_j`` of ``down_proj``, z-scored within the layer;
* head h: ``S_j²`` of ``o_proj``'s channels, z-scored within the layer, averaged over the
  head's ``head_dim`` channels.

Both are z-scores, so heads and neurons of all layers are ranked together. Scores are computed
separately on the safety set (harmful prompt + refusal) and the utility set (benign prompt +
answer); variances are per set (population variance over that set's response tokens).

Labels (thresholds on unit counts, configurable)
------------------------------------------------
``Sum = s_safety + s_utility``, ``Diff = s_safety − s_utility``:
RU = bottom ``ru_share`` (10 %) of Sum; EUU = bottom ``euu_share`` (10 %) of Diff; ESU = top
``esu_share`` (1 %) of Diff; CU = the rest; ESU and EUU override RU. Ties are broken by unit
order (stable sort), so labels are deterministic.

Protection (merge-time parameters, the artifact does not depend on them)
------------------------------------------------------------------------
``protect_share`` (default 0.075, the paper's ≈7.5 %) is the protected share of all units:
every ESU (by Diff) then the CU with the highest safety score, up to
``round(protect_share · units)``. ``control: random`` protects instead a seeded random set
with the same number of heads and the same number of neurons (``control_seed``). K/V rows of
grouped-query attention follow ``kv_policy`` (default ``any``; see :mod:`mergekit_safety.methods.ssah.units`).

Since the scores come from θ_A alone, the artifact does not bind the experts
(``binds_experts = False``): one artifact serves any set of experts fine-tuned from θ_A.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from mergekit_safety.fusion.artifacts import ArtifactError, open_artifact, tensor_key
from mergekit_safety.fusion.kernel import TensorMasks
from mergekit_safety.fusion.method import LocatingFusionMethod, TensorInputs
from mergekit_safety.methods.ssah.config import (
    LabelSettings,
    ProtectSettings,
    ScoreSettings,
    SSAHSettings,
)
from mergekit_safety.methods.ssah.units import (
    UnitError,
    UnitLayout,
    UnitSet,
    flatten,
    layout_parameter_count,
    random_like,
    split_flat,
    unit_axis,
    unit_parameter_count,
)

logger = logging.getLogger(__name__)

METHOD_NAME = "ssah"

# unit labels as stored in the artifact (int8)
CU, ESU, EUU, RU = 0, 1, 2, 3
LABEL_NAMES = {CU: "CU", ESU: "ESU", EUU: "EUU", RU: "RU"}


# --------------------------------------------------------------------------- scoring


def zscore(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """(x − mean) / std along ``dim`` (population std); all-equal rows give zeros."""
    values = values.double()
    mean = values.mean(dim=dim, keepdim=True)
    std = values.std(dim=dim, keepdim=True, unbiased=False)
    centred = values - mean
    return torch.where(std > 0, centred / std.clamp_min(1e-300), torch.zeros_like(centred))


def column_norms_sq(weight: torch.Tensor) -> torch.Tensor:
    """``‖W[:, j]‖²`` of a Linear weight ``[out, in]`` (float64, ``[in]``)."""
    return weight.double().pow(2).sum(dim=0)


def channel_scores(variance: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """FLAP fluctuation score ``S_j = Var(X[:, j]) · ‖W[:, j]‖²`` of a Linear's input channels
    (``variance`` is ``[in]``; ``weight`` is the weight ``[out, in]`` or already its squared
    column norms ``[in]`` — all the score needs, so streaming keeps only those)."""
    if variance.shape[-1] != weight.shape[-1]:
        raise UnitError(
            f"channel variance has {variance.shape[-1]} channels but the weight has "
            f"{weight.shape[-1]} input columns"
        )
    norms_sq = weight.double() if weight.dim() == 1 else column_norms_sq(weight)
    return variance.double() * norms_sq


def unit_scores(
    layout: UnitLayout,
    attention_variance: torch.Tensor,
    mlp_variance: torch.Tensor,
    o_weights: List[torch.Tensor],
    down_weights: List[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unit scores ``heads[L, H]``, ``neurons[L, I]`` from per-layer input variances of
    ``o_proj`` (``[L, H·d]``) and ``down_proj`` (``[L, I]``) and their weights."""
    heads, neurons = [], []
    for layer in range(layout.num_layers):
        attention = channel_scores(attention_variance[layer], o_weights[layer])
        heads.append(
            zscore(attention.pow(2)).view(layout.num_heads, layout.head_dim).mean(dim=-1)
        )
        neurons.append(zscore(channel_scores(mlp_variance[layer], down_weights[layer])))
    return torch.stack(heads).float(), torch.stack(neurons).float()


def _bottom(values: torch.Tensor, count: int) -> torch.Tensor:
    return torch.argsort(values, stable=True)[:count]


def _top(values: torch.Tensor, count: int) -> torch.Tensor:
    return torch.argsort(values, descending=True, stable=True)[:count]


def share_count(share: float, total: int) -> int:
    """Number of units a share stands for (rounded half up, deterministic)."""
    return min(total, int(share * total + 0.5))


def classify(safety: torch.Tensor, utility: torch.Tensor, settings: LabelSettings = LabelSettings()) -> torch.Tensor:
    """Labels (int8: CU 0, ESU 1, EUU 2, RU 3) of flat unit score vectors."""
    if safety.shape != utility.shape or safety.dim() != 1:
        raise ValueError(f"safety {tuple(safety.shape)} and utility {tuple(utility.shape)} must be equal 1-D shapes")
    total = safety.numel()
    summed = safety.double() + utility.double()
    diff = safety.double() - utility.double()
    labels = torch.full((total,), CU, dtype=torch.int8)
    labels[_bottom(summed, share_count(settings.ru_share, total))] = RU
    labels[_bottom(diff, share_count(settings.euu_share, total))] = EUU
    labels[_top(diff, share_count(settings.esu_share, total))] = ESU
    return labels


def select_protected(
    labels: torch.Tensor, safety: torch.Tensor, utility: torch.Tensor, share: float
) -> torch.Tensor:
    """Flat boolean: every ESU (by Diff), then the CU with the highest safety score, up to
    ``round(share · units)`` units."""
    total = labels.numel()
    count = share_count(share, total)
    diff = safety.double() - utility.double()
    esu = (labels == ESU).nonzero().view(-1)
    esu = esu[torch.argsort(diff[esu], descending=True, stable=True)]
    cu = (labels == CU).nonzero().view(-1)
    cu = cu[torch.argsort(safety.double()[cu], descending=True, stable=True)]
    chosen = torch.cat([esu, cu])[:count]
    if chosen.numel() < count:
        logger.warning(
            "ssah: protect_share %.4f asks for %d units but only %d are ESU or CU; protecting those",
            share, count, chosen.numel(),
        )
    protected = torch.zeros(total, dtype=torch.bool)
    protected[chosen] = True
    return protected


# --------------------------------------------------------------------------- artifact

ROLE_SAFETY, ROLE_UTILITY, ROLE_LABEL = "ssah_safety", "ssah_utility", "ssah_label"


@dataclass
class UnitScores:
    """What an SSAH artifact holds: layout, z-scores per set and labels, per layer."""

    layout: UnitLayout
    safety_heads: torch.Tensor
    safety_neurons: torch.Tensor
    utility_heads: torch.Tensor
    utility_neurons: torch.Tensor
    label_heads: torch.Tensor
    label_neurons: torch.Tensor
    label_settings: LabelSettings = LabelSettings()

    @classmethod
    def from_scores(
        cls,
        layout: UnitLayout,
        safety: Tuple[torch.Tensor, torch.Tensor],
        utility: Tuple[torch.Tensor, torch.Tensor],
        settings: LabelSettings = LabelSettings(),
    ) -> "UnitScores":
        labels = classify(flatten(*safety), flatten(*utility), settings)
        label_heads, label_neurons = split_flat(layout, labels)
        return cls(layout, *safety, *utility, label_heads, label_neurons, settings)

    @property
    def safety(self) -> torch.Tensor:
        return flatten(self.safety_heads, self.safety_neurons)

    @property
    def utility(self) -> torch.Tensor:
        return flatten(self.utility_heads, self.utility_neurons)

    @property
    def labels(self) -> torch.Tensor:
        return flatten(self.label_heads, self.label_neurons)

    def label_set(self, label: int) -> UnitSet:
        return UnitSet(self.label_heads == label, self.label_neurons == label)

    def protected(self, settings: ProtectSettings = ProtectSettings()) -> UnitSet:
        chosen = UnitSet.from_flat(
            self.layout, select_protected(self.labels, self.safety, self.utility, settings.protect_share)
        )
        if settings.control == "random":
            return random_like(chosen, settings.control_seed)
        return chosen

    def budget(self) -> UnitSet:
        """The redundant units (the "alignment budget")."""
        return self.label_set(RU)

    def label_shares(self) -> Dict[str, float]:
        labels = self.labels
        return {name: float((labels == code).float().mean()) for code, name in LABEL_NAMES.items()}

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {
            tensor_key(ROLE_SAFETY, "heads"): self.safety_heads.float(),
            tensor_key(ROLE_SAFETY, "neurons"): self.safety_neurons.float(),
            tensor_key(ROLE_UTILITY, "heads"): self.utility_heads.float(),
            tensor_key(ROLE_UTILITY, "neurons"): self.utility_neurons.float(),
            tensor_key(ROLE_LABEL, "heads"): self.label_heads.to(torch.int8),
            tensor_key(ROLE_LABEL, "neurons"): self.label_neurons.to(torch.int8),
        }

    def metadata(self) -> Dict[str, Any]:
        return {
            "layout": self.layout.to_dict(),
            "label_settings": self.label_settings.model_dump(),
            "label_shares": self.label_shares(),
        }

    @classmethod
    def from_artifact(cls, artifact) -> "UnitScores":
        if artifact.metadata.method != METHOD_NAME:
            raise ArtifactError(
                f"{artifact.path}: written by method {artifact.metadata.method!r}, not an SSAH unit artifact"
            )
        extra = artifact.metadata.extra
        if "layout" not in extra:
            raise ArtifactError(f"{artifact.path}: SSAH artifact without a unit layout in its metadata")
        layout = UnitLayout.from_dict(extra["layout"])
        values = {}
        for role in (ROLE_SAFETY, ROLE_UTILITY, ROLE_LABEL):
            for kind in ("heads", "neurons"):
                key = tensor_key(role, kind)
                if not artifact.has(key):
                    raise ArtifactError(f"{artifact.path}: SSAH artifact lacks tensor {key!r}")
                values[(role, kind)] = artifact.get(key)
        scores = cls(
            layout,
            values[(ROLE_SAFETY, "heads")], values[(ROLE_SAFETY, "neurons")],
            values[(ROLE_UTILITY, "heads")], values[(ROLE_UTILITY, "neurons")],
            values[(ROLE_LABEL, "heads")], values[(ROLE_LABEL, "neurons")],
            LabelSettings(**extra.get("label_settings", {})),
        )
        UnitSet(scores.label_heads.bool(), scores.label_neurons.bool()).check(layout)
        return scores


def load_unit_scores(path_or_artifact) -> UnitScores:
    artifact = open_artifact(path_or_artifact) if isinstance(path_or_artifact, (str, os.PathLike)) else path_or_artifact
    return UnitScores.from_artifact(artifact)


def write_scores_artifact(path: str, scores: UnitScores, base_model: Any, parameters: Optional[Dict[str, Any]] = None, extra: Optional[Dict[str, Any]] = None) -> str:
    """Write unit scores computed elsewhere (or synthetic) as an SSAH artifact for
    ``base_model``, recorded with the method's locate settings (defaults overridden by
    ``parameters``) so a merge with the same settings accepts it."""
    from mergekit_safety.fusion.artifacts import write_artifact
    from mergekit_safety.fusion.locate import LocateRequest

    method = SSAHMethod()
    values = SSAHSettings.defaults()
    values.update(parameters or {})
    values["mask"] = path
    record = method.artifact_record(LocateRequest(METHOD_NAME, base_model, (), values))
    record.extra = {**scores.metadata(), **(extra or {})}
    write_artifact(path, scores.tensors(), record)
    return path


def score_model(model_dir: str, settings: ScoreSettings, label_settings: LabelSettings = LabelSettings()) -> Tuple[UnitScores, Dict[str, Any]]:
    """Score every unit of the model in ``model_dir`` on the safety and utility sets."""
    layout = UnitLayout.from_model_dir(model_dir)
    per_set = {}
    info: Dict[str, Any] = {}
    for name, path in (("safety", settings.safety_data), ("utility", settings.utility_data)):
        stats = input_variances(model_dir, path, layout, settings)
        per_set[name] = unit_scores(
            layout, stats.attention_variance, stats.mlp_variance, stats.o_weights, stats.down_weights
        )
        info[f"{name}_tokens"] = stats.tokens
        info[f"{name}_samples"] = stats.samples
    scores = UnitScores.from_scores(layout, per_set["safety"], per_set["utility"], label_settings)
    return scores, info


@dataclass
class InputStatistics:
    """Per-layer input variances of o_proj ``[L, H·d]`` and down_proj ``[L, I]`` on one set,
    with the squared column norms of the weights they multiply (``o_weights``/``down_weights``,
    ``[in]`` each)."""

    attention_variance: torch.Tensor
    mlp_variance: torch.Tensor
    o_weights: List[torch.Tensor]
    down_weights: List[torch.Tensor]
    tokens: int
    samples: int


def input_variances(model_dir: str, data_path: str, layout: UnitLayout, settings: ScoreSettings) -> InputStatistics:
    """Variances of the inputs of every layer's o_proj and down_proj on one calibration set,
    through the shared calibration engine (:mod:`mergekit_safety.engine.calibration`, streaming layer
    by layer), and the o_proj/down_proj weights read from the checkpoint."""
    from mergekit_safety.engine.calibration import SafetensorsSource, collect_statistics, load_examples

    examples = load_examples(data_path, max_samples=settings.max_samples)
    stats = collect_statistics(
        model_dir,
        examples,
        modules="self_attn.o_proj,mlp.down_proj",
        token_scope="response" if settings.response_only else "all",
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        device=settings.device,
        description=f"ssah statistics ({os.path.basename(data_path)})",
    )
    source = SafetensorsSource(model_dir)
    attention, mlp, o_weights, down_weights, tokens = [], [], [], [], 0
    for layer in range(layout.num_layers):
        for module, variances, weights in (
            ("self_attn.o_proj", attention, o_weights),
            ("mlp.down_proj", mlp, down_weights),
        ):
            name = next((n for n in stats if n.endswith(f"layers.{layer}.{module}.weight")), None)
            if name is None:
                raise UnitError(f"{model_dir}: no statistics for layer {layer}'s {module} (not a Llama-style decoder?)")
            variances.append(stats[name].variance)
            weights.append(column_norms_sq(source.get(name)))  # not the weight: O(in) memory
            tokens = stats[name].count
        source.release()  # unmap the shard pages read for this layer: only the norms are kept
    if not tokens:
        raise UnitError(f"{data_path}: no {'response ' if settings.response_only else ''}tokens to score units on")
    return InputStatistics(
        torch.stack(attention), torch.stack(mlp), o_weights, down_weights, int(tokens), len(examples)
    )


# --------------------------------------------------------------------------- the method


class SSAHMethod(LocatingFusionMethod):
    """θ_A + (1 − M_protect) ⊙ Merge(τ_1 … τ_n): safety-critical units of θ_A kept intact."""

    name = METHOD_NAME
    pretty_name = "SSAH safety-critical unit protection"
    reference_url = "https://arxiv.org/abs/2410.10862"
    summary = (
        "Scores heads and neurons of the aligned model on safety vs utility data (FLAP-style), "
        "labels ESU/EUU/CU/RU and keeps the safety-critical units' rows/columns at θ_A while "
        "fusing the task vectors with any backbone."
    )

    settings = SSAHSettings
    binds_experts = False
    artifact_roles = (ROLE_LABEL,)

    def __init__(self) -> None:
        super().__init__()
        self._units: Dict[tuple, Tuple[Any, UnitScores, UnitSet]] = {}
        self._units_lock = threading.Lock()

    def compute_artifact(self, request):
        parameters = request.parameters
        settings = ScoreSettings(**{k: parameters[k] for k in ScoreSettings.model_fields})
        labels = LabelSettings(**{k: parameters[k] for k in LabelSettings.model_fields})
        scores, info = score_model(request.model_path(request.base), settings, labels)
        logger.info("ssah: label shares %s", scores.label_shares())
        return scores.tensors(), {**scores.metadata(), **info}

    def protected_units(self, artifact, parameters: Dict[str, Any]) -> Tuple[UnitScores, UnitSet]:
        settings = ProtectSettings(**{k: parameters[k] for k in ProtectSettings.model_fields})
        key = (artifact.path, id(artifact), settings)
        with self._units_lock:
            cached = self._units.get(key)
        if cached is None:
            scores = UnitScores.from_artifact(artifact)
            units = scores.protected(settings)
            cached = (artifact, scores, units)  # holding the artifact keeps id() unique
            with self._units_lock:
                self._units[key] = cached
            logger.info(
                "ssah: protecting %d heads + %d neurons (%.2f%% of units, %.2f%% of unit weights)%s",
                int(units.heads.sum()), int(units.neurons.sum()),
                100 * units.count() / scores.layout.total_units,
                100 * unit_parameter_count(units, scores.layout, settings.kv_policy)
                / layout_parameter_count(scores.layout),
                " [random control]" if settings.control == "random" else "",
            )
        return cached[1], cached[2]

    def masks_from_artifact(self, artifact, inputs: TensorInputs, parameters: Dict[str, Any]) -> TensorMasks:
        scores, units = self.protected_units(artifact, parameters)
        name = inputs.name
        base = inputs.base
        try:
            found = unit_axis(name, base.shape, units, scores.layout, parameters["kv_policy"])
        except UnitError as error:
            raise ArtifactError(f"{artifact.path}: {error}") from None
        if found is None:
            return TensorMasks()
        dim, protect = found
        # a row (or column) vector that broadcasts over the tensor: the same mask as
        # unit_mask() without materialising one entry per weight
        view = (-1,) + (1,) * (base.dim() - 1) if dim == 0 else (1, -1)
        return TensorMasks(post_keep=(~protect).view(view).to(device=base.device, dtype=base.dtype))
