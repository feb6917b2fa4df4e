"""``antidote``: one-shot Wanda pruning of harmful-data-critical weights (Huang et al., 2024).

Paper: "Antidote: Post-fine-tuning safety alignment for large language models against harmful
fine-tuning attack", arXiv 2408.09600 (ICML 2025).

Locate step (one calibration pass over the *unpruned* model, as in the authors' code):
statistics ‖X_j‖₂ of every input channel of the selected decoder-layer Linear modules on
**harmful** prompt + harmful answer data (:mod:`mergekit_safety.engine.calibration`), Wanda scores
h_ij = |W_ij|·‖X_j‖₂, and in each **output row** the top-α share of scores
(``floor(α · in_features)`` entries per row, exactly) is selected. The selection is applied at
merge time through the shared kernel (:func:`mergekit_safety.fusion.kernel.fuse`):

============  ===============================  =========================================  ======
apply_to      mode ``zero`` (paper)            mode ``reset`` (task-vector form)          role
============  ===============================  =========================================  ======
``experts``   W_i from expert i's stats;       score |τ_i|·‖X_j‖ (expert i's stats); the  zero@i
              selected θ_i entries set to 0    selected τ_i entries dropped (θ_i → θ_A)   keep@i
              before fusion
``fusion``    W of the plain fusion, stats of  score |θ_f − θ_A|·‖X_j‖ (fused model's     zero
              the fused model; selected        stats); selected entries restored to θ_A   post_keep
              output entries set to 0
============  ===============================  =========================================  ======

The fused model of ``apply_to: fusion`` is the merge's own backbone fusion without masks
(same backbone, λ, weights, densities, seed), built tensor by tensor while the calibration
streams through it layer by layer: it is never written to disk.

``control: random`` replaces the scores by seeded uniform noise — the same number of entries
per row, the same roles — the equal-size random mask every report needs to show whether the
Wanda scores beat chance.

Defaults (``mode: reset``, ``apply_to: fusion``, ``alpha: 0.05`` — the paper's most used value —, ``token_scope: all``) were
chosen on the safety lab; the measurements that decided them are in docs/antidote.md.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, ClassVar, Dict, List, Literal, Optional, Sequence, Tuple

import torch

from mergekit_safety.engine.seeding import tensor_seed
from mergekit_safety.fusion.artifacts import tensor_key
from mergekit_safety.fusion.kernel import Backbone
from mergekit_safety.fusion.locate import LocateRequest
from mergekit_safety.fusion.method import LocatingFusionMethod
from mergekit_safety.fusion.models import resolve_model
from mergekit_safety.fusion.settings import (
    DeviceName,
    LocatingSettings,
    NonNegativeInt,
    PositiveInt,
    UnitInterval,
    setting,
)

logger = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.05
ROW_BLOCK_ENTRIES = 1 << 22  # entries scored and sorted at once (≈ 100 MB of float64 + indices)
DEFAULT_MODE = "reset"
DEFAULT_APPLY_TO = "fusion"

FUSION_SETTINGS = ("backbone", "lambda", "normalize", "rescale", "ties_selection")


def top_alpha_per_row(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """Boolean mask selecting, in every output row, the ``floor(alpha · columns)`` largest
    scores (ties broken by column order, deterministically)."""
    if scores.dim() < 2:
        raise ValueError(f"per-row selection needs a matrix, got shape {list(scores.shape)}")
    rows = scores.reshape(scores.shape[0], -1)
    k = int(alpha * rows.shape[1] + 1e-9)
    mask = torch.zeros(rows.shape, dtype=torch.bool)
    if k > 0:
        order = torch.sort(rows, dim=1, descending=True, stable=True).indices[:, :k]
        mask.scatter_(1, order, True)
    return mask.reshape(scores.shape)


def top_alpha_per_row_in_blocks(score_rows, shape: Sequence[int], alpha: float) -> torch.Tensor:
    """:func:`top_alpha_per_row` of a ``shape`` matrix whose scores ``score_rows(row_slice)``
    computes for a block of rows at a time. The selection is per row, so the mask is the same,
    while the float64 scores and the sort's buffers stay at ``ROW_BLOCK_ENTRIES`` entries."""
    selected = torch.empty(tuple(shape), dtype=torch.bool)
    step = max(1, ROW_BLOCK_ENTRIES // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], step):
        rows = slice(start, start + step)
        selected[rows] = top_alpha_per_row(score_rows(rows), alpha)
    return selected


def wanda_scores(weight: torch.Tensor, channel_norm: torch.Tensor) -> torch.Tensor:
    """h_ij = |W_ij| · ‖X_j‖₂ (float64)."""
    if weight.shape[-1] != channel_norm.numel():
        raise ValueError(
            f"weight has {weight.shape[-1]} input channels, statistics have {channel_norm.numel()}"
        )
    return weight.to(torch.float64).abs() * channel_norm.to(torch.float64).reshape(1, -1)


def random_scores(shape: Sequence[int], seed: int, name: str, expert: Optional[int] = None) -> torch.Tensor:
    """Seeded uniform scores for the random control (independent of execution order)."""
    generator = torch.Generator().manual_seed(tensor_seed(seed, f"{name}@{'fusion' if expert is None else expert}"))
    return torch.rand(tuple(shape), generator=generator, dtype=torch.float64)


class AntidoteSettings(LocatingSettings):
    """Every Antidote parameter (the locate settings are recorded in the artifact)."""

    # apply_to: fusion scores the merge's own fusion (its backbone settings are recorded)
    artifact_depends_on_fusion: ClassVar[bool] = True

    harmful_data: str = setting(
        "",
        "JSONL of harmful prompts with harmful answers (keys prompt, response) the "
        "scores are computed on; empty = no locate step (plain fusion, with a warning)",
        data=True,
        keys=("prompt", "response"),
    )
    alpha: UnitInterval = setting(DEFAULT_ALPHA, "share of each output row selected (floor(α·columns) entries)", locate=True)
    mode: Literal["zero", "reset"] = setting(
        DEFAULT_MODE,
        "zero: selected weights set to 0 (paper); reset: score |τ|·‖X‖ and restore the "
        "selected entries to the aligned model",
        locate=True,
    )
    apply_to: Literal["experts", "fusion"] = setting(
        DEFAULT_APPLY_TO,
        "experts: score and prune each expert before fusion (its own statistics); "
        "fusion: score and prune the fused model (the fused model's statistics)",
        locate=True,
    )
    modules: str = setting(
        "linear",
        "decoder-layer Linear weights scored: comma list of presets (attention, mlp, linear, "
        "all) or regexes on tensor names (e.g. 'mlp,self_attn.o_proj')",
        locate=True,
    )
    token_scope: Literal["all", "response"] = setting(
        "all",
        "tokens the statistics run over: all (prompt + answer, as Wanda/Antidote) or "
        "response only",
        locate=True,
    )
    max_samples: NonNegativeInt = setting(0, "use the first N records of harmful_data (0 = all)", locate=True)
    max_length: NonNegativeInt = setting(0, "truncate calibration examples to N tokens (0 = the model's context length, at most 2048; a cut record is named in a warning)", locate=True)
    batch_size: PositiveInt = setting(8, "calibration batch size (does not change the result)")
    device: DeviceName = setting("cpu", "device of the calibration pass (cpu, cuda, cuda:1, ...; one decoder layer at a time is moved there)")
    streaming: bool = setting(
        True,
        "calibrate layer by layer from the safetensors shards (peak memory ≈ one layer); "
        "false = whole model in memory",
    )
    control: Literal["none", "random"] = setting(
        "none",
        "random: the equal-size random mask (same count per row, seeded by seed) "
        "instead of the Wanda scores — a control for reports",
        locate=True,
    )


class Antidote(LocatingFusionMethod):
    name = "antidote"
    pretty_name = "Antidote (Wanda pruning on harmful data)"
    reference_url = "https://arxiv.org/abs/2408.09600"
    summary = (
        "Wanda scores |W|·‖X‖ on harmful prompt+answer data; per output row the top-α weights "
        "are zeroed (mode zero, paper) or restored to the aligned model (mode reset), per "
        "expert before fusion or on the fused model; control: random gives the equal-size "
        "random mask."
    )

    settings = AntidoteSettings

    # ---- locate framework

    def can_locate(self, parameters: Dict[str, Any]) -> bool:
        if parameters.get("control") == "random":
            return True
        return super().can_locate(parameters)

    def artifact_record(self, request: LocateRequest):
        record = super().artifact_record(request)
        parameters = request.parameters
        drop = set()
        backbone = Backbone(parameters.get("backbone") or Backbone.task_arithmetic.value)
        if parameters.get("apply_to") == "experts":
            drop |= set(FUSION_SETTINGS) | {"experts"}
        random_backbone = backbone in (Backbone.dare_linear, Backbone.dare_ties)
        if parameters.get("control") != "random" and not (parameters.get("apply_to") == "fusion" and random_backbone):
            drop.add("seed")
        if parameters.get("control") == "random":
            drop |= {"harmful_data", "token_scope", "max_samples", "max_length"}
            record.data = {}
        record.settings = {k: v for k, v in record.settings.items() if k not in drop}
        return record

    @staticmethod
    def _key(mode: str, name: str, index: Optional[int]) -> str:
        if mode == "zero":
            return tensor_key("zero", name, index)
        return tensor_key("keep" if index is not None else "post_keep", name, index)

    def artifact_layout(self, request: LocateRequest):
        """Every mask's key, dtype (bool) and shape, known before any calibration: the artifact
        is streamed to disk mask by mask (peak memory: one mask, not all of them)."""
        from mergekit_safety.engine.calibration import linear_weight_names
        from mergekit_safety.engine.checkpoint import header_shapes

        p = request.parameters
        base_dir = resolve_model(request.base)
        names = linear_weight_names(base_dir, p["modules"])
        shapes = header_shapes(base_dir)
        targets = range(len(request.experts)) if p["apply_to"] == "experts" else [None]
        return [(self._key(p["mode"], name, index), torch.bool, shapes[name]) for index in targets for name in names]

    def stream_artifact(self, request: LocateRequest, writer) -> Dict[str, Any]:
        return self._compute(request, writer.write)

    def compute_artifact(self, request: LocateRequest) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        tensors: Dict[str, torch.Tensor] = {}
        extra = self._compute(request, tensors.__setitem__)
        return tensors, extra

    def _compute(self, request: LocateRequest, emit) -> Dict[str, Any]:
        from mergekit_safety.engine.calibration import (
            SafetensorsSource,
            collect_statistics,
            linear_weight_names,
            load_examples,
            load_tokenizer,
        )
        from mergekit_safety.engine.tokenizer import tokenizer_folders
        from mergekit_safety.engine.vocabulary import aligned
        from mergekit_safety.fusion.sources import FusedSource

        p = request.parameters
        started = time.time()
        alpha, mode, apply_to = float(p["alpha"]), p["mode"], p["apply_to"]
        random_control = p["control"] == "random"
        seed = 0 if p.get("seed") is None else int(p["seed"])
        base_dir = resolve_model(request.base)
        base = SafetensorsSource(base_dir)
        expert_dirs = [resolve_model(e) for e in request.experts]
        experts = [aligned(SafetensorsSource(d), base) for d in expert_dirs]  # added tokens: base vocabulary

        calibration = {}
        examples: List[Dict[str, str]] = []
        tokenizer = None
        if not random_control:
            examples = load_examples(p["harmful_data"], int(p["max_samples"] or 0))
            folders = tokenizer_folders(request.base, base_dir)
            tokenizer = load_tokenizer(folders[0], folders[1:])
            calibration = dict(
                examples=examples,
                modules=p["modules"],
                token_scope=p["token_scope"],
                batch_size=int(p.get("batch_size") or 8),
                streaming=bool(p.get("streaming", True)),
                tokenizer=tokenizer,
                max_length=int(p["max_length"]) or None,
                device=p.get("device") or "cpu",
            )

        # (expert index or None, weight source, statistics) per target model
        targets = []
        if apply_to == "experts":
            for index, (directory, source) in enumerate(zip(expert_dirs, experts)):
                stats = None
                if not random_control:
                    stats = collect_statistics(directory, description=f"antidote: expert {index}", **calibration)
                targets.append((index, source, stats))
        else:
            fused = FusedSource(base, experts, request.fuse_arguments(), seed=self._fusion_seed(request))
            stats = None
            if not random_control:
                stats = collect_statistics(base_dir, weights=fused, description="antidote: fused model", **calibration)
            targets.append((None, fused, stats))

        names = linear_weight_names(base_dir, p["modules"])
        selected_total = 0
        entries_total = 0
        tokens = {}
        for index, source, stats in targets:
            if stats is not None:
                tokens["fusion" if index is None else f"expert{index}"] = next(iter(stats.values())).count
            for name in names:
                weight = source.get(name).to(torch.float32)
                if random_control:
                    scored = random_scores(weight.shape, seed, name, index)
                    score_rows = lambda rows: scored[rows]  # noqa: E731
                else:
                    if name not in stats:
                        raise RuntimeError(f"antidote: no calibration statistics for {name}")
                    norm = stats[name].norm
                    scored = weight
                    if mode != "zero":
                        # the fused tensor is this loop's own memory: τ in its place (one
                        # weight-sized buffer, not two); a checkpoint's tensor is a read-only map
                        base_weight = base.get(name).to(torch.float32)
                        scored = weight.sub_(base_weight) if isinstance(source, FusedSource) else weight - base_weight
                        del base_weight
                    score_rows = lambda rows: wanda_scores(scored[rows], norm)  # noqa: E731
                selected = top_alpha_per_row_in_blocks(score_rows, weight.shape, alpha)
                selected_total += int(selected.sum())
                entries_total += selected.numel()
                emit(self._key(mode, name, index), selected if mode == "zero" else ~selected)
                del weight, scored, score_rows, selected
                # unmap what was read for this tensor: pages of memory-mapped shards count in
                # the resident set until their handle closes (docs/performance_calibration.md)
                source.release()
                base.release()
        extra = {
            "selected_entries": selected_total,
            "selected_fraction": selected_total / max(entries_total, 1),
            "tensors": len(names),
            "calibration_examples": len(examples),
            "calibration_tokens": tokens,
            "batch_size": int(p.get("batch_size") or 8),
            "streaming": bool(p.get("streaming", True)),
            "seconds": round(time.time() - started, 2),
        }
        logger.info(
            "antidote: %s/%s α=%s%s: %d entries selected in %d tensors",
            apply_to, mode, alpha, " (random control)" if random_control else "", selected_total, len(names),
        )
        return extra

    # ---- the fused model the merge would produce without masks

    @staticmethod
    def _fusion_seed(request: LocateRequest) -> Optional[int]:
        p = request.parameters
        backbone = Backbone(p.get("backbone") or Backbone.task_arithmetic.value)
        if backbone in (Backbone.dare_linear, Backbone.dare_ties) and p.get("seed") is None:
            logger.warning(
                "antidote: apply_to=fusion with the random %s backbone and no seed: the fused "
                "model scored here (seed 0) is not the one the merge draws; set `seed`",
                backbone.value,
            )
            return 0
        return p.get("seed")
