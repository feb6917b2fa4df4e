"""``somf``: subspace-oriented model fusion (Yi et al., arXiv 2405.09055).

    θ[k] = θ_A[k] + Merge(τ̃_1[k], …, τ̃_n[k]),   τ̃_i[k] = m[k] ⊙ τ_i[k] / mean(m[k]),   τ_i = θ_i − θ_A

One real logit ``s`` per element of every *masked* tensor, **shared by all task vectors**,
is learned by :mod:`mergekit_safety.methods.somf.training` (the locate step: Concrete relaxation,
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
every parameter is declared once, in :class:`SOMFSettings`. See docs/somf.md.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, Dict, Literal, Optional, Tuple

import torch

from mergekit_safety.fusion.artifacts import ArtifactError, tensor_key
from mergekit_safety.fusion.kernel import TensorMasks
from mergekit_safety.fusion.method import LocatingFusionMethod, TensorInputs, read_rows
from mergekit_safety.fusion.settings import (
    AUTO,
    DARE_BACKBONES,
    DeviceName,
    LocatingSettings,
    NonNegative,
    NonNegativeInt,
    Positive,
    PositiveInt,
    UnitInterval,
    setting,
)
from mergekit_safety.methods.somf.masks import mask_from_logits, random_control_mask

logger = logging.getLogger(__name__)

LOGITS_ROLE = "logits"


def rule_warning(stopping: Optional[Dict[str, Any]]) -> Optional[str]:
    """A warning when the stopping rule did not hold: its held-aside figures are the best guess
    of what the merged model does on new prompts, so the user hears them before merging."""
    if not stopping or stopping.get("held"):
        return None
    best = stopping.get("best") or (stopping.get("checks") or [None])[-1]
    if best is None:
        return None
    benign = (f" and keeps its own answer on {100 * best['benign_preferred']:.0f} % of held-aside benign prompts"
              if "benign_preferred" in best else "")
    measure = "starts the refusal" if stopping["rule"].get("stop_on") == "greedy" else "prefers the refusal"
    return (f"somf: the stopping rule did not hold ({stopping['reason']}); at its best check (step {best['step']}) "
            f"the mask {measure} on {100 * best['preferred']:.0f} % of held-aside harmful prompts{benign} "
            f"(needed {100 * stopping['rule']['stop_preference']:.0f} %) — expect a refusal rate near that on new "
            "harmful prompts; more preference pairs, lower expert weights or another backbone may help")


class SOMFSettings(LocatingSettings):
    """Every SOMF parameter (validated; the locate settings are recorded in the artifact).

    Two presets (docs/somf.md): ``recipe`` (default) — the measured working recipe: start from
    the unmasked fusion (init 1), no per-tensor rescale, an NLL pull towards the refusals and a
    strong KL utility term, lr 0.2, and a stopping rule with a 6000-step cap; ``paper`` — the
    paper's setting (init 0, rescale, DPO only, lr 0.01, 300 steps). Parameters left empty take
    the preset's value; an explicit value always wins.
    """

    artifact_depends_on_fusion: ClassVar[bool] = True  # the mask is trained through the fusion
    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = {
        "recipe": {"init": 1.0, "keep_rescale": False, "chosen_nll_weight": 0.5, "utility_weight": 10.0,
                   "benign_weight": 0.0, "prefix_weight": 0.0, "lr": 0.2, "steps": 6000, "stop_preference": 0.98},
        "paper": {"init": 0.0, "keep_rescale": True, "chosen_nll_weight": 0.0, "utility_weight": 0.0,
                  "benign_weight": 0.0, "prefix_weight": 0.0, "lr": 1e-2, "steps": 300, "stop_preference": 0.0},
    }

    preset: Literal["recipe", "paper"] = setting("recipe", "defaults of the parameters left empty: recipe (measured working recipe) or paper (Yi et al.'s setting)", locate=True)

    # data
    preference_data: str = setting("", "JSONL of safety preference pairs (prompt, chosen refusal, rejected harmful answer), or 'auto': built from the models themselves on harmful_prompts (the aligned model's refusals vs the unmasked fusion's compliant answers)", data=True, keys=("prompt", "chosen", "rejected"), auto_from="harmful_prompts")
    utility_data: str = setting("", "optional JSONL of benign (prompt, response) for the utility term, or 'auto': the unmasked fusion's own answers on benign_prompts", data=True, keys=("prompt", "response"), auto_from="benign_prompts")
    harmful_prompts: str = setting("", "JSONL of harmful prompts (key prompt) for preference_data: auto (e.g. harmful_calibration.jsonl of `mergekit-safety data`)", data=True, keys=("prompt",))
    benign_prompts: str = setting("", "JSONL of benign prompts (key prompt) for utility_data: auto", data=True, keys=("prompt",))
    pairs_max_new_tokens: PositiveInt = setting(64, "answer length generated for the auto data", locate=True)
    max_length: PositiveInt = setting(256, "token limit per example (prompt cut from the left)", locate=True)
    # mask
    modules: str = setting("linear", "masked tensors: comma list of presets (attention, mlp, linear, all) or regexes on tensor names", locate=True)
    temperature: Positive = setting(0.5, "Concrete relaxation temperature (paper: 0.5)", locate=True)
    init: Optional[float] = setting(None, "initial mask logit (paper: 0, p = 0.5)", locate=True)
    keep_rescale: Optional[bool] = setting(None, "per-tensor rescale τ̃ = m ⊙ τ / mean(m) (paper: on)", locate=True)
    # objective
    beta: Positive = setting(0.1, "DPO β", locate=True)
    reference: Literal["fusion", "aligned", "none"] = setting("fusion", "DPO reference log-probs: fusion = the unmasked fusion (default), aligned = the base (aligned) model — the mask must make the fusion prefer refusals at least as much as the aligned model does —, none = reference-free margin", locate=True)
    chosen_nll_weight: Optional[NonNegative] = setting(None, "weight of a per-token NLL on the chosen (safe) answers, RPO-style (extension; 0 = off)", locate=True)
    utility_weight: Optional[NonNegative] = setting(None, "weight of the utility term on utility_data (extension; 0 = off)", locate=True)
    utility_loss: Literal["kl", "ce"] = setting("kl", "utility term: kl to the unmasked fusion, or ce on the responses", locate=True)
    benign_weight: Optional[NonNegative] = setting(None, "weight of a DPO term on benign pairs from utility_data: the fusion's own answer (chosen) vs a refusal (rejected, the preference pairs' chosen answers) — against over-refusal; with the stopping rule, benign pairs are held aside and checked too (extension; 0 = off)", locate=True)
    prefix_weight: Optional[NonNegative] = setting(None, "weight of an NLL on the first prefix_tokens tokens of the chosen answers (the refusal; with benign_weight also the fusion's own answer on benign prompts, scaled by benign_weight): greedy decoding decides a refusal there (extension; 0 = off)", locate=True)
    prefix_tokens: PositiveInt = setting(1, "answer tokens that decide a refusal, for prefix_weight and stop_on: greedy", locate=True)
    sparsity_weight: NonNegative = setting(0.0, "weight of a penalty on the expected mask density (extension; 0 = off)", locate=True)
    entropy_weight: NonNegative = setting(0.0, "weight of a penalty on the mean binary entropy of σ(s): decided logits, so the exported binary mask is the model training saw (extension; 0 = off)", locate=True)
    # optimisation
    lr: Optional[Positive] = setting(None, "AdamW learning rate (cosine decay)", locate=True)
    steps: Optional[PositiveInt] = setting(None, "optimisation steps (the cap, with a stopping rule)", locate=True)
    batch_size: PositiveInt = setting(16, "preference pairs (and utility examples) per step", locate=True)
    train_seed: int = setting(0, "seed of the mask training (batches, Concrete noise; DARE drop if `seed` is empty)", locate=True)
    # stopping rule (docs/somf.md): stop once the merge-time mask prefers the refusal on held-aside pairs
    stop_preference: Optional[UnitInterval] = setting(None, "stop when the binary mask prefers the chosen answer on this share of the held-aside pairs (0 = off: run `steps`)", locate=True)
    stop_on: Literal["likelihood", "greedy"] = setting("likelihood", "what 'prefers' means for the stopping rule: likelihood = log p(chosen) exceeds log p(rejected) by stop_margin nats; greedy = greedy decoding starts with the refusal's first prefix_tokens tokens on harmful pairs and does not on benign pairs (what a generation-based refusal metric sees)", locate=True)
    stop_patience: NonNegativeInt = setting(0, "also stop after this many checks without a better held-aside score (0 = off)", locate=True)
    stop_keep: Literal["last", "best"] = setting("last", "mask exported when the rule does not hold: last = the last step's, best = the check with the best held-aside score (the weaker of the harmful and benign shares, then the other one; the earliest among equals)", locate=True)
    stop_margin: float = setting(0.0, "by more than this many nats: of log-likelihood (stop_on: likelihood), or of log-probability over every other token at each decision token (stop_on: greedy)", locate=True)
    max_utility_kl: NonNegative = setting(0.0, "and (with utility data) the per-token KL to the unmasked fusion is at most this (0 = no bound)", locate=True)
    validation_share: UnitInterval = setting(0.125, "share of the pairs held aside for the stopping rule (never trained on)", locate=True)
    check_every: PositiveInt = setting(50, "steps between two checks of the stopping rule", locate=True)
    # execution (not recorded: they do not change the result beyond float rounding)
    device: DeviceName = setting("cpu", "device of the mask training (cpu, cuda, cuda:1, ...)")
    dtype: Literal["float32", "bfloat16", "float16"] = setting("float32", "model dtype during mask training (logits stay float32)")
    offload_folder: str = setting("", "train with the unmasked modules offloaded to this folder (accelerate); empty = all in memory")
    threads: NonNegativeInt = setting(0, "torch CPU threads during mask training (0 = torch's default; 1 is fastest for tiny models)")
    logits_dtype: Literal["bfloat16", "float32"] = setting("bfloat16", "dtype of the stored logits: bfloat16 halves the artifact (and the merge's memory) and keeps every sign, so the binary mask at mask_threshold 0 is exact; float32 keeps σ(s) exact for mask_mode expected/sample and logits near a mask_threshold other than 0", locate=True)
    # merge time
    mask_mode: Literal["binary", "expected", "sample"] = setting("binary", "merge-time mask: binary 1[s>0], expected σ(s), or sample (one seeded Bernoulli(σ(s)) draw, as the authors' code)")
    mask_threshold: float = setting(0.0, "binary mask: keep the task-vector elements whose learned logit exceeds this (0 = the learned mask; > 0 keeps less, i.e. more safety, < 0 keeps more, i.e. more skill) — the strength knob of a sweep, one artifact for every value")
    control: Literal["none", "random"] = setting("none", "random = equal-density random mask per tensor (control experiment)")
    control_seed: int = setting(0, "seed of the random control mask and of mask_mode: sample")
    # filled from the per-model weight/density of the experts (training fuses like the merge)
    weights: Tuple[float, ...] = setting((), "per-expert weights", internal=True)
    densities: Tuple[float, ...] = setting((), "per-expert densities", internal=True)

    @property
    def dare_seed(self) -> Optional[int]:
        """Seed of DARE's per-tensor random drop: ``seed`` if set, else ``train_seed`` — the
        merge uses the same rule, so the drop at merge time is the drop training saw."""
        if self.backbone not in DARE_BACKBONES:
            return self.seed
        return self.train_seed if self.seed is None else self.seed

    @classmethod
    def from_request(cls, request) -> "SOMFSettings":
        p = dict(request.parameters)
        known = {q.name for q in cls.parameters() if not q.per_model}
        fields = {name: p[name] for name in known if name in p}
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
        return cls.model_validate(fields)


def store_logits(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Logits in the artifact's dtype with every sign kept: values so small that bfloat16
    would round them to 0 are moved to its smallest normal number (same sign), so the binary
    merge-time mask 1[s > 0] is exactly the one training exported."""
    if dtype == torch.float32:
        return logits.float()
    tiny = torch.finfo(dtype).tiny
    nudged = torch.where(logits > 0, logits.clamp(min=tiny), torch.where(logits < 0, logits.clamp(max=-tiny), logits))
    return nudged.to(dtype)


class SOMF(LocatingFusionMethod):
    name = "somf"
    pretty_name = "SOMF: subspace-oriented model fusion (learned safety-subspace mask)"
    reference_url = "https://arxiv.org/abs/2405.09055"
    summary = (
        "θ_A + Merge(m ⊙ τ_i / mean(m)) with one mask m shared by all task vectors, learned "
        "with DPO on safety preference pairs over the functionally fused model."
    )

    settings = SOMFSettings
    binds_experts = True
    artifact_roles = (LOGITS_ROLE,)

    def artifact_record(self, request):
        # The merge kernel substitutes train_seed for an empty DARE seed (merge_group below):
        # record the effective seed so `locate` and the kernel describe the same artifact.
        parameters = dict(request.parameters)
        if parameters.get("seed") is None and parameters.get("backbone") in DARE_BACKBONES:
            parameters["seed"] = parameters.get("train_seed", 0)
            request = dataclasses.replace(request, parameters=parameters)
        return super().artifact_record(request)

    def locate_description(self, request) -> str:
        p = request.parameters
        rule = (f", stopping once the mask prefers the refusal on {p.get('stop_preference')} of held-aside pairs"
                if p.get("stop_preference") else "")
        auto = " (after building preference pairs from the models' own answers)" if p.get("preference_data") == AUTO else ""
        return (f"learning the safety mask{auto}: up to {p.get('steps')} steps of DPO through the fused model{rule} — "
                "each step is about 3 forward+backward passes of the model (the lab: ~6 CPU-minutes; 7B: use a GPU, device: cuda)")

    def can_locate(self, parameters: Dict[str, Any]) -> bool:
        data = parameters.get("preference_data")  # utility_data is optional
        return bool(data) and (data != AUTO or bool(parameters.get("harmful_prompts")))

    def compute_artifact(self, request):
        from mergekit_safety.fusion.models import resolve_model
        from mergekit_safety.methods.somf.training import require_device, train_mask

        # a device this machine lacks: named before the pairs' generation loads any model
        require_device(request.parameters.get("device") or "cpu", request.method)
        base = resolve_model(request.base)
        experts = [resolve_model(e) for e in request.experts]
        extra: Dict[str, Any] = {}
        if AUTO in (request.parameters.get("preference_data"), request.parameters.get("utility_data")):
            request, extra["auto_data"] = self.auto_data(request, base, experts)
        settings = SOMFSettings.from_request(request)
        logits, trained = train_mask(base, experts, settings)
        warning = rule_warning(trained.get("stopping"))
        if warning:
            logger.warning(warning)
        dtype = getattr(torch, settings.logits_dtype)
        tensors = {tensor_key(LOGITS_ROLE, name): store_logits(value, dtype) for name, value in logits.items()}
        return tensors, {**trained, **extra}

    def auto_data(self, request, base: str, experts, out_dir: Optional[str] = None, progress: bool = True):
        """Build the 'auto' preference (and utility) data from the models (methods.somf.pairs);
        return the request with the files' paths filled in, and the build report."""
        import hashlib
        import json
        import os

        from mergekit_safety.fusion.artifacts import file_sha256, model_fingerprint
        from mergekit_safety.fusion.models import cache_folder
        from mergekit_safety.methods.somf.pairs import build_pairs

        p = dict(request.parameters)
        if p.get("preference_data") == AUTO and not p.get("harmful_prompts"):
            raise ArtifactError(f"{request.method}: preference_data: auto needs harmful_prompts (a JSONL of prompts)")
        if p.get("utility_data") == AUTO and not p.get("benign_prompts"):
            raise ArtifactError(f"{request.method}: utility_data: auto needs benign_prompts (a JSONL of prompts)")
        settings = SOMFSettings.from_request(dataclasses.replace(request, parameters={**p, "preference_data": p.get("preference_data") or AUTO}))
        fuse_kwargs = dict(backbone=settings.backbone, weights=list(settings.weights), densities=list(settings.densities),
                           lambda_=settings.lambda_, normalize=settings.normalize, rescale=settings.rescale,
                           ties_selection=settings.ties_selection)
        identity = {
            "models": [model_fingerprint(base)] + [model_fingerprint(e) for e in experts],
            "fusion": {k: str(v) for k, v in fuse_kwargs.items()}, "seed": settings.dare_seed,
            "prompts": [file_sha256(p[k]) if p.get(k) else None for k in ("harmful_prompts", "benign_prompts")],
            "tokens": settings.pairs_max_new_tokens,
        }
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
        out_dir = out_dir or os.path.join(cache_folder(), "pairs", key)
        logger.warning(
            "%s: building preference data from the models (greedy answers of the aligned model and of "
            "the unmasked fusion on %s) into %s — minutes per hundred prompts on a CPU; cached and resumable",
            request.method, p.get("harmful_prompts"), out_dir,
        )
        report = build_pairs(
            base, experts, p.get("harmful_prompts"), out_dir, fuse_kwargs=fuse_kwargs, seed=settings.dare_seed,
            benign_prompts=p.get("benign_prompts", "") if p.get("utility_data") == AUTO else "",
            max_new_tokens=settings.pairs_max_new_tokens, device=settings.device, progress=progress,
            # one generation cache for every pair folder: the aligned model's answers (keyed by its
            # fingerprint) serve every fusion of it, and `pairs --out` shares them with a merge
            cache_dir=os.path.join(cache_folder(), "pairs", "generations"),
        )
        if p.get("preference_data") == AUTO:
            p["preference_data"] = os.path.join(out_dir, "pairs.jsonl")
        if p.get("utility_data") == AUTO:
            p["utility_data"] = os.path.join(out_dir, "utility.jsonl")
        return dataclasses.replace(request, parameters=p), {**report, "folder": out_dir}

    # ---- merge

    def merge(self, inputs: TensorInputs, parameters: Dict[str, Any]) -> torch.Tensor:
        if parameters.get("seed") is None and parameters.get("backbone") in DARE_BACKBONES:
            # the same DARE drop the mask was trained through (SOMFSettings.dare_seed)
            parameters = {**parameters, "seed": parameters.get("train_seed", 0)}
        return super().merge(inputs, parameters)

    def masks_from_artifact(self, artifact, inputs: TensorInputs, parameters: Dict[str, Any]) -> TensorMasks:
        name = inputs.name
        base = inputs.base
        key = tensor_key(LOGITS_ROLE, name)
        if not artifact.has(key):
            return TensorMasks()  # not a masked tensor: plain backbone, as in training
        # the logits in the base's vocabulary; rows of tokens the base lacks (a re-aligned
        # output vocabulary) get a large logit: kept, i.e. the plain fusion, as never trained
        logits = read_rows(artifact, key, base, name, inputs.vocabulary, fill=30.0)
        mode = parameters.get("mask_mode", "binary")
        threshold = float(parameters.get("mask_threshold") or 0.0)
        if mode == "binary" and parameters.get("control", "none") != "random":
            # the same 1[s > t] as mask_from_logits, straight to the merge dtype (no float copy)
            mask = (logits > threshold).to(device=base.device, dtype=base.dtype)
        else:
            mask = mask_from_logits(logits, mode, name, int(parameters.get("control_seed", 0)), threshold)
            if parameters.get("control", "none") == "random":
                mask = random_control_mask(mask, name, int(parameters.get("control_seed", 0)))
            mask = mask.to(device=base.device, dtype=base.dtype)
        keep_rescale = bool(artifact.metadata.settings.get("keep_rescale", parameters.get("keep_rescale", True)))
        return TensorMasks(keep=[mask] * len(inputs.experts), keep_rescale=keep_rescale)
