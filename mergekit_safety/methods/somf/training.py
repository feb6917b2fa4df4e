"""SOMF mask learning: the functionally fused model, the DPO objective and the training loop.

The fused model is one ``transformers`` model instance whose own weights are the **unmasked**
fusion θ_A + Merge(τ_1, …, τ_n) (built tensor by tensor with :func:`mergekit_safety.fusion.kernel.fuse`,
the merge's own arithmetic). For the *masked* tensors, every step computes

    θ[k] = fuse(θ_A[k], [θ_1[k], …, θ_n[k]], masks=TensorMasks(keep=[m[k]]*n, keep_rescale))

from a reparameterised Concrete sample ``m[k] = σ((s[k] + log u − log(1 − u)) / T)`` of the
logits ``s[k]`` and runs the model with :func:`torch.func.functional_call` over those tensors.
Only the logits require gradients, so gradients reach only them; and because training and
merging call the same ``fuse``, a frozen mask gives exactly the merged model.

Backbones with a selection step:

* TIES: the top-k magnitude selection runs on the **masked** (and rescaled) task vector — as at
  merge time, where ``fuse`` applies the mask before sparsifying. The selected indices are
  piecewise constant in the mask (no gradient flows through the choice, and no straight-through
  estimator is used); gradients flow through the values of the selected entries and through
  the sign election's weighted sum. The same holds for the sign election.
* DARE: the random drop is drawn per tensor from a fixed seed (``seed``, else ``train_seed``)
  with the merge kernel's per-tensor seeding, so training sees exactly the drop the merge uses.

Reference model of DPO (``reference``; the authors' code used a randomly masked copy):

* ``fusion`` (default) — the unmasked fusion, the natural "before the mask" policy;
* ``aligned`` — the base (aligned) model: the loss only becomes small once the masked fusion
  prefers the refusal over the harmful answer by at least the aligned model's margin (a
  "realign to the aligned model" target). With several large task vectors the unmasked
  fusion's margin can be so negative (−61 nats on the lab) that a relative gain small enough
  for a low ``fusion``-reference loss still leaves the harmful answer far more likely;
* ``none`` — reference-free (the reference log-probs are 0; SimPO/ORPO-like margin).

Every reference's log-probabilities are computed once, before training. The optional
``chosen_nll_weight`` adds a per-token NLL on the chosen (safe) answers (RPO-style): an
absolute pull towards the refusal, which DPO's relative margin does not provide.

Memory: only the masked tensors are held per expert (θ_A and each θ_i, plus the logits and
AdamW's two moments); every other tensor exists once, fused. With ``offload_folder`` the
unmasked fusion is written there as a checkpoint and loaded with an accelerate device map that
keeps only the modules holding masked tensors on the device and streams the rest from disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from mergekit_safety.engine.checkpoint import Checkpoint, CheckpointError
from mergekit_safety.engine.modules import ModuleSelectionError, select
from mergekit_safety.engine.seeding import seeded
from mergekit_safety.engine.tokenizer import TokenizerError, pad_id
from mergekit_safety.engine.vocabulary import aligned
from mergekit_safety.fusion.kernel import TensorMasks, fuse
from mergekit_safety.methods.somf.masks import mask_from_logits

logger = logging.getLogger(__name__)


class SOMFTrainingError(ValueError):
    """Mask learning cannot run (models, data or settings); the message says which."""


# --------------------------------------------------------------------------- masked tensors


def linear_weight_names(model) -> set:
    return {
        f"{module_name}.weight" if module_name else "weight"
        for module_name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def select_masked(names: Iterable[str], spec: str, linear_names: set, shapes: Dict[str, tuple]) -> List[str]:
    """Tensor names selected by the ``modules`` parameter (:mod:`mergekit_safety.engine.modules`:
    ``linear`` includes ``lm_head``; ``all`` is every floating tensor)."""
    try:
        return select(names, spec, is_linear=lambda name: name in linear_names, shapes=shapes, owner="somf")
    except ModuleSelectionError as error:
        raise SOMFTrainingError(str(error)) from None


# --------------------------------------------------------------------------- fusion


def concrete_sample(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """Reparameterised RelaxedBernoulli(temperature, logits) sample (Gumbel-sigmoid):
    σ((s + log u − log(1 − u)) / T), u ~ U(0, 1) clamped to [1e-6, 1 − 1e-6]."""
    # drawn on the generator's device (an accelerator's own generator avoids moving a
    # model-sized noise tensor to it every step), then used where the logits are
    uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float32, device=generator.device).to(logits.device)
    # in place, one mask-sized buffer instead of four: the same operations in the same order,
    # so the same bits as the out-of-place formula (a mask step on a CPU is memory-bound)
    uniform.clamp_(1e-6, 1 - 1e-6)
    log_rest = torch.neg(uniform).log1p_()
    noise = uniform.log_().sub_(log_rest)
    return torch.sigmoid(noise.add_(logits).div_(temperature))


class FunctionalFusion:
    """The fused model as a function of the mask logits (see the module docstring)."""

    def __init__(self, base_path: str, expert_paths: Sequence[str], settings, progress: bool = True):
        from tqdm.auto import tqdm

        self.settings = settings
        self.device = torch.device(settings.device)
        self.dtype = getattr(torch, settings.dtype)
        if len(settings.weights) != len(expert_paths):
            raise SOMFTrainingError("somf: one weight per expert is required")
        self.fuse_kwargs = dict(
            backbone=settings.backbone,
            weights=list(settings.weights),
            densities=list(settings.densities),
            lambda_=settings.lambda_,
            normalize=settings.normalize,
            rescale=settings.rescale,
            ties_selection=settings.ties_selection,
        )
        self.seed = settings.dare_seed
        try:
            base = Checkpoint(base_path, check_finite=True)
            # experts with added tokens: vocabulary rows re-indexed to the base's (engine.vocabulary)
            experts = [aligned(Checkpoint(p, check_finite=True), base) for p in expert_paths]
        except CheckpointError as error:
            raise SOMFTrainingError(f"somf: {error} (SOMF reads safetensors only)") from None
        for path, checkpoint in zip(expert_paths, experts):
            missing = {n for n in base.weight_map if not checkpoint.has(n) and n not in checkpoint.aliases}
            if missing:
                raise SOMFTrainingError(f"{path}: lacks tensors of the base model, e.g. {sorted(missing)[:3]}")

        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(base_path)
        with _meta_device():
            skeleton = AutoModelForCausalLM.from_config(config)
        linear_names = linear_weight_names(skeleton)
        known = set(skeleton.state_dict().keys())
        floating = [n for n in base.names() if torch.empty((), dtype=_dtype_of(base, n)).is_floating_point()]
        unknown = [n for n in floating if n not in known]
        if unknown:
            raise SOMFTrainingError(
                f"{base_path}: checkpoint tensors {unknown[:3]} are not parameters of the "
                f"{type(skeleton).__name__} model (renamed weights are not supported by SOMF training)"
            )
        shapes = {n: base.shape(n) for n in floating}
        selected = select_masked(floating, settings.modules, linear_names, shapes)

        # Masked tensors: θ_A and every θ_i kept (on the training device); task vectors that are
        # zero for every expert (outside a LoRA's targets) are not masked: nothing to select.
        self.base: Dict[str, torch.Tensor] = {}
        self.experts: Dict[str, List[torch.Tensor]] = {}
        skipped = []
        for name in tqdm(selected, desc="somf: load masked tensors", disable=not progress, leave=False):
            b = base.get(name).to(self.device, self.dtype)
            ex = [c.get(name).to(self.device, self.dtype) for c in experts]
            if all(torch.equal(e, b) for e in ex):
                skipped.append(name)
                continue
            self.base[name] = b
            self.experts[name] = ex
        if not self.base:
            raise SOMFTrainingError(
                f"somf: `modules: {settings.modules}` selects only tensors the experts do not change; nothing to mask"
            )
        if skipped:
            logger.info("somf: %d selected tensors have a zero task vector for every expert: not masked", len(skipped))
        self.names = sorted(self.base)
        self.skipped = skipped
        self.summed = self._precompute_sums()

        self.model = self._load_unmasked(base_path, base, experts, config, progress)
        self.model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.logits: Dict[str, torch.Tensor] = {
            name: torch.full(self.base[name].shape, float(settings.init), dtype=torch.float32, device=self.device, requires_grad=True)
            for name in self.names
        }

    # ---- building the unmasked fusion

    def _fused_plain(self, name: str, base: torch.Tensor, experts: List[torch.Tensor]) -> torch.Tensor:
        if not base.is_floating_point():
            return base
        with seeded(self.seed, name):
            return fuse(base, experts, **self.fuse_kwargs)

    def _load_unmasked(self, base_path, base: "Checkpoint", experts, config, progress):
        from tqdm.auto import tqdm
        from transformers import AutoModelForCausalLM

        names = base.names()
        if self.settings.offload_folder:
            return self._load_offloaded(base_path, base, experts, progress)
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=self.dtype)
        model.to(self.device)
        state = model.state_dict()
        with torch.no_grad():
            for name in tqdm(names, desc="somf: unmasked fusion", disable=not progress, leave=False):
                b = base.get(name).to(self.device, self.dtype)
                fused = self._fused_plain(name, b, [c.get(name).to(self.device, self.dtype) for c in experts])
                if name in state:
                    state[name].copy_(fused)
        return model

    def _load_offloaded(self, base_path, base: "Checkpoint", experts, progress):
        """Write the unmasked fusion as a checkpoint, load it with only the masked modules on
        the device and everything else offloaded to disk (accelerate)."""
        import shutil

        from safetensors.torch import save_file
        from tqdm.auto import tqdm
        from transformers import AutoConfig, AutoModelForCausalLM

        folder = os.path.abspath(self.settings.offload_folder)
        fused_dir = os.path.join(folder, "unmasked-fusion")
        os.makedirs(fused_dir, exist_ok=True)
        for item in os.listdir(base_path):
            if item.endswith(".json") and not item.startswith("model.safetensors"):
                shutil.copy(os.path.join(base_path, item), os.path.join(fused_dir, item))
        weight_map = {}
        for path in tqdm(base.files, desc="somf: write unmasked fusion", disable=not progress, leave=False):
            file = os.path.basename(path)
            tensors = {}
            for name in base.names_in(path):
                b = base.get(name).to(self.dtype) if base.get(name).is_floating_point() else base.get(name)
                tensors[name] = self._fused_plain(name, b, [c.get(name).to(b.dtype) for c in experts]).contiguous()
                weight_map[name] = file
            save_file(tensors, os.path.join(fused_dir, file), metadata={"format": "pt"})
            del tensors
        if len(base.files) > 1:
            with open(os.path.join(fused_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as handle:
                json.dump({"metadata": {}, "weight_map": weight_map}, handle)
        config = AutoConfig.from_pretrained(fused_dir)
        with _meta_device():
            skeleton = AutoModelForCausalLM.from_config(config)
        device_map = masked_device_map(skeleton, self.names, str(self.device))
        model = AutoModelForCausalLM.from_pretrained(
            fused_dir, dtype=self.dtype, device_map=device_map, offload_folder=os.path.join(folder, "offload")
        )
        for name in self.names:
            module = model.get_submodule(name.rsplit(".", 1)[0])
            hook = getattr(module, "_hf_hook", None)
            if hook is not None and getattr(hook, "offload", False):
                raise SOMFTrainingError(f"somf: masked tensor {name} was offloaded; masked modules must stay on {self.device}")
        return model

    # ---- the function of the mask

    def _precompute_sums(self) -> Optional[Dict[str, torch.Tensor]]:
        """For linear backbones (task arithmetic, mean) one mask shared by every expert gives
        Σ w_i (m ⊙ τ_i) = m ⊙ Σ w_i τ_i: the weighted sum of the task vectors is computed once,
        and a training step fuses one tensor per masked weight instead of one per expert."""
        from mergekit_safety.fusion.kernel import BACKBONES, Backbone

        backbone = Backbone(self.fuse_kwargs["backbone"])
        definition = BACKBONES[backbone]
        if definition.sparsification is not None or definition.consensus:
            return None  # TIES/DARE select per expert: no shortcut
        weights = list(self.fuse_kwargs["weights"])
        normalize = definition.default_normalize if self.fuse_kwargs["normalize"] is None else self.fuse_kwargs["normalize"]
        scale = float(self.fuse_kwargs["lambda_"])
        total = sum(weights)
        if normalize and abs(total) >= 1e-8:
            scale = scale / total
        summed = {}
        with torch.no_grad():
            for name in self.names:
                base = self.base[name]
                acc = torch.zeros_like(base)
                for weight, expert in zip(weights, self.experts[name]):
                    acc.add_(expert - base, alpha=weight)
                summed[name] = acc.mul_(scale)
        return summed

    def fused_tensor(self, name: str, mask: torch.Tensor) -> torch.Tensor:
        """The merge's exact arithmetic (:func:`fuse`): used for the merge-time mask."""
        masks = TensorMasks(keep=[mask] * len(self.experts[name]), keep_rescale=self.settings.keep_rescale)
        with seeded(self.seed, name):
            return fuse(self.base[name], self.experts[name], masks=masks, **self.fuse_kwargs)

    def fused_tensor_fast(self, name: str, mask: torch.Tensor) -> torch.Tensor:
        """Algebraically the same as :meth:`fused_tensor` for linear backbones (rounding aside),
        one multiply per weight: what a training step uses."""
        delta = self.summed[name] * mask
        if self.settings.keep_rescale:
            density = mask.float().mean()
            delta = delta / density if density > 0 else torch.zeros_like(delta)
        # in place on the product (autograd keeps the factors, not the product): one
        # weight-sized buffer less per step, the same bits as base + delta
        return delta.add_(self.base[name])

    def parameters_for(self, masks: Dict[str, torch.Tensor], exact: bool = True) -> Dict[str, torch.Tensor]:
        """Fused weights for ``masks``: the merge's exact arithmetic, or (``exact=False``, in
        training steps) the precomputed-sum form where the backbone allows it."""
        fused = self.fused_tensor_fast if not exact and self.summed is not None else self.fused_tensor
        # float32 masks promote a bfloat16/float16 weight: back to the model's dtype (the cast
        # is differentiable, so the gradient still reaches the float32 logits)
        return {name: fused(name, masks[name]).to(self.dtype) for name in self.names}

    def sample_masks(self, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        return {name: concrete_sample(self.logits[name], self.settings.temperature, generator) for name in self.names}

    def fixed_masks(self, mode: str = "binary") -> Dict[str, torch.Tensor]:
        return {name: mask_from_logits(self.logits[name].detach(), mode).to(self.device) for name in self.names}

    def forward(self, params: Optional[Dict[str, torch.Tensor]], input_ids, attention_mask,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits of the fused model (``params`` None: the unmasked fusion itself); with
        ``positions``, only at those sequence positions ([batch, len(positions), vocab]).

        The output head is the costliest single matrix of a small chat model (SmolLM2-135M:
        49152 × 576, a fifth of the forward's multiply-adds) and its log-softmax is the largest
        tensor of a step; the losses need it only where a response token is predicted, so it
        runs there only (transformers' ``logits_to_keep``, where the model takes it)."""
        kwargs: Dict[str, Any] = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
        keep_in_model = positions is not None and self._takes_logits_to_keep
        if keep_in_model:
            kwargs["logits_to_keep"] = positions.to(self.device)
        if params is None:
            logits = self.model(**kwargs).logits
        else:
            logits = torch.func.functional_call(self.model, params, args=(), kwargs=kwargs, strict=False).logits
        if positions is not None and not keep_in_model:
            logits = logits[:, positions.to(logits.device)]
        return logits

    @property
    def _takes_logits_to_keep(self) -> bool:
        if not hasattr(self, "_logits_to_keep"):
            import inspect

            self._logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        return self._logits_to_keep

    def response_logps(self, params, ids, att, resp, prefix_tokens: int = 0):
        """Σ log p(response tokens) per sequence, the head computed at response positions only;
        with ``prefix_tokens`` k > 0 also Σ log p of each answer's first k tokens (same pass)."""
        positions = response_positions(resp)
        logits = self.forward(params, ids, att, positions)
        total = sequence_logps(logits, ids, resp, positions)
        if not prefix_tokens:
            return total
        return total, sequence_logps(logits, ids, prefix_mask(resp, prefix_tokens), positions)

    def greedy_prefix(self, params, ids, att, resp, prefix_tokens: int, margin: float = 0.0) -> torch.Tensor:
        """Per row: greedy decoding starts with the row's answer — at each of its first
        ``prefix_tokens`` answer positions the answer's token beats every other token by more
        than ``margin`` nats of log-probability (0: it is the argmax; teacher forcing: while they
        all match, the forced path is the greedy one)."""
        positions = response_positions(resp)
        logps = torch.log_softmax(self.forward(params, ids, att, positions).float(), -1)
        prefix = prefix_mask(resp, prefix_tokens)[:, positions + 1].to(logps.device).bool()
        target = ids[:, positions + 1].to(logps.device).unsqueeze(-1)
        chosen = logps.gather(-1, target).squeeze(-1)
        best_other = logps.scatter(-1, target, float("-inf")).max(-1).values
        return ((chosen - best_other > margin) | ~prefix).all(-1).cpu()

    @torch.no_grad()
    def load_logits(self, logits: Dict[str, torch.Tensor]) -> None:
        """Set every mask logit from ``logits`` (name -> tensor, any device and dtype)."""
        missing = sorted(set(self.logits) - set(logits))
        if missing:
            raise SOMFTrainingError(f"somf: the mask has no logits for {len(missing)} masked tensors (e.g. {missing[0]})")
        for name, value in self.logits.items():
            value.copy_(logits[name].to(value.device, value.dtype))

    def masked_elements(self) -> int:
        return sum(t.numel() for t in self.base.values())


class _meta_device(contextlib.ContextDecorator):
    def __enter__(self):
        self._context = torch.device("meta")
        self._context.__enter__()
        return self

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


def _dtype_of(checkpoint: Checkpoint, name: str) -> torch.dtype:
    dtype = checkpoint.dtype_name(name)
    table = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    return table.get(dtype, torch.int64)


def masked_device_map(skeleton, masked_names: Sequence[str], device: str) -> Dict[str, str]:
    """Leaf modules holding a masked tensor (and buffer-only modules) on ``device``; every other
    module with parameters on "disk"."""
    masked_modules = {n.rsplit(".", 1)[0] for n in masked_names}
    device_map = {}
    for name, module in skeleton.named_modules():
        if not name:
            continue
        own_params = list(module.named_parameters(recurse=False))
        own_buffers = list(module.named_buffers(recurse=False))
        if not own_params and not own_buffers:
            continue
        device_map[name] = device if (name in masked_modules or not own_params) else "disk"
    return device_map


# --------------------------------------------------------------------------- data


def load_tokenizer(base_path: str):
    from mergekit_safety.engine.tokenizer import load_tokenizer as load

    try:
        return load(base_path)
    except TokenizerError as error:
        raise SOMFTrainingError(f"{base_path}: no usable tokenizer for the SOMF data ({error})") from None


def encode_pairs(path: str, tokenizer, max_length: int):
    """(ids [2N, T], attention [2N, T], response [2N, T]): N chosen rows then N rejected rows."""
    from mergekit_safety.engine.data import DataError, collate, encode_example, read_jsonl_lines

    keys = ("prompt", "chosen", "rejected")
    lines = read_jsonl_lines(path, keys, nonempty=keys)
    for line, record in lines:
        if record["chosen"].strip() == record["rejected"].strip():
            raise DataError(f"{path}:{line}: 'chosen' and 'rejected' are the same answer: the pair carries no preference")
    records = [record for _line, record in lines]
    encoded = [encode_example(tokenizer, r["prompt"], r["chosen"], max_length) for r in records]
    encoded += [encode_example(tokenizer, r["prompt"], r["rejected"], max_length) for r in records]
    batch = collate(encoded, pad_id(tokenizer))
    return batch["input_ids"], batch["attention_mask"], batch["response_mask"], len(records)


def encode_benign_pairs(utility_path: str, pairs_path: str, tokenizer, max_length: int):
    """Benign pairs for ``benign_weight``: each utility prompt with the fusion's own answer
    (chosen) against a refusal (rejected) — the preference pairs' chosen answers, in turn — so
    the mask cannot buy refusals of harmful prompts with refusals of benign ones. Rows: the
    chosen then the rejected; records whose answer is itself that refusal are left out."""
    from mergekit_safety.engine.data import collate, encode_example, read_jsonl

    refusals = [r["chosen"] for r in read_jsonl(pairs_path, ("prompt", "chosen", "rejected"))]
    records = read_jsonl(utility_path, ("prompt", "response"), nonempty=("prompt", "response"))
    pairs = [(r["prompt"], r["response"], refusals[i % len(refusals)]) for i, r in enumerate(records)
             if r["response"].strip() != refusals[i % len(refusals)].strip()]
    if not pairs:
        raise SOMFTrainingError(f"{utility_path}: no benign record differs from the refusals: nothing for benign_weight")
    encoded = [encode_example(tokenizer, p, a, max_length) for p, a, _ in pairs]
    encoded += [encode_example(tokenizer, p, r, max_length) for p, _, r in pairs]
    batch = collate(encoded, pad_id(tokenizer))
    return batch["input_ids"], batch["attention_mask"], batch["response_mask"], len(pairs)


def encode_utility(path: str, tokenizer, max_length: int):
    from mergekit_safety.engine.data import collate, encode_example, read_jsonl

    records = read_jsonl(path, ("prompt", "response"), nonempty=("prompt", "response"))
    encoded = [encode_example(tokenizer, r["prompt"], r["response"], max_length) for r in records]
    batch = collate(encoded, pad_id(tokenizer))
    return batch["input_ids"], batch["attention_mask"], batch["response_mask"]


def _trim(ids, att, resp):
    t = int(att.sum(1).max())
    return ids[:, :t], att[:, :t], resp[:, :t]


def response_positions(resp: torch.Tensor) -> torch.Tensor:
    """Positions p whose logits predict a response token (p + 1) in some row of the batch."""
    return resp[:, 1:].bool().any(0).nonzero().squeeze(1)


def prefix_mask(resp: torch.Tensor, k: int) -> torch.Tensor:
    """The response mask cut to each row's first ``k`` response tokens."""
    return resp * (resp.cumsum(1) <= k).to(resp.dtype)


def sequence_logps(logits: torch.Tensor, ids: torch.Tensor, resp: torch.Tensor,
                   positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ log p(token) over response tokens, per sequence (teacher forcing, right padding).
    ``logits`` covers every position, or only ``positions`` (see FunctionalFusion.forward)."""
    if positions is None:
        logits = logits[:, :-1].float()
        target = ids[:, 1:].to(logits.device)
        mask = resp[:, 1:].to(logits.device).float()
    else:
        logits = logits.float()
        target = ids[:, positions + 1].to(logits.device)
        mask = resp[:, positions + 1].to(logits.device).float()
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Sigmoid DPO loss; returns (mean loss, reward accuracy)."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    loss = -torch.nn.functional.logsigmoid(beta * margin)
    return loss.mean(), (margin > 0).float().mean()


# --------------------------------------------------------------------------- training


@contextlib.contextmanager
def _cpu_threads(count: int):
    if not count:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def require_device(device: str, who: str = "somf") -> None:
    """A SOMFTrainingError naming ``device`` if this machine lacks it (before any model loads)."""
    from mergekit_safety.engine.calibration import CalibrationError, resolve_device

    try:
        resolve_device(device)
    except CalibrationError as error:
        raise SOMFTrainingError(f"{who}: {error}") from None


def train_mask(base_path: str, expert_paths: Sequence[str], settings, progress: bool = True):
    """Learn the SOMF mask logits. Returns ({tensor name: logits}, metadata dict)."""
    with _cpu_threads(settings.threads):
        return _train_mask(base_path, expert_paths, settings, progress)


def _train_mask(base_path: str, expert_paths: Sequence[str], settings, progress: bool):
    from tqdm.auto import tqdm

    require_device(settings.device)  # a device this machine lacks fails here, before any model is loaded
    started = time.time()
    torch.manual_seed(settings.train_seed)
    generator = torch.Generator().manual_seed(settings.train_seed)
    # the Concrete noise: the CPU stream on a CPU (unchanged results), the device's own elsewhere
    noise_generator = (generator if torch.device(settings.device).type == "cpu"
                       else torch.Generator(device=settings.device).manual_seed(settings.train_seed))
    tokenizer = load_tokenizer(base_path)
    ids, att, resp, n_pairs = encode_pairs(settings.preference_data, tokenizer, settings.max_length)
    utility = None
    if settings.utility_weight > 0 and settings.utility_data:
        utility = encode_utility(settings.utility_data, tokenizer, settings.max_length)
    elif not settings.utility_data:
        logger.warning(
            "somf: no utility_data: the mask is learned from DPO alone, which on the lab keeps "
            "refusals but destroys the experts' skills (docs/somf.md); give utility_data"
        )

    benign = None
    if settings.benign_weight > 0:
        if not settings.utility_data:
            raise SOMFTrainingError("somf: benign_weight needs utility_data (benign prompts with the fusion's answers)")
        benign = encode_benign_pairs(settings.utility_data, settings.preference_data, tokenizer, settings.max_length)

    batch = min(settings.batch_size, n_pairs)
    # Reference log-probs of the safety pairs and (with benign_weight) of the benign pairs. The
    # aligned reference is computed before the fusion is built, in one load of the aligned model
    # for both sets: one model in memory at a time.
    sets = [(ids, att, resp)] + ([tuple(benign[:3])] if benign is not None else [])
    refs = reference_logps(settings, base_path, sets, batch) if settings.reference == "aligned" else None
    fusion = FunctionalFusion(base_path, expert_paths, settings, progress=progress)
    if refs is None:
        refs = reference_logps(settings, base_path, sets, batch, fusion=fusion)
    ref = refs[0]
    benign_ref = refs[1] if benign is not None else None
    ref_chosen, ref_rejected = ref[:n_pairs], ref[n_pairs:]
    chosen_tokens = resp[:n_pairs, 1:].sum(1).clamp(min=1).float()  # response tokens per chosen answer
    prefix_on = settings.prefix_weight > 0
    prefix_k = settings.prefix_tokens if prefix_on else 0  # 0: response_logps returns the sums alone
    chosen_prefix = prefix_mask(resp[:n_pairs], settings.prefix_tokens)[:, 1:].sum(1).clamp(min=1).float()
    benign_prefix = (prefix_mask(benign[2][:benign[3]], settings.prefix_tokens)[:, 1:].sum(1).clamp(min=1).float()
                     if benign is not None else None)

    utility_ref = None
    if utility is not None and settings.utility_loss == "kl":
        u_ids, u_att, u_resp = utility
        size = u_ids.shape[0] * u_ids.shape[1] * fusion.model.config.vocab_size * 4
        if size <= 512 * 2**20:
            with torch.no_grad():
                utility_ref = torch.cat([
                    torch.log_softmax(fusion.forward(None, u_ids[s:s + batch], u_att[s:s + batch]).float(), -1).cpu()
                    for s in range(0, u_ids.shape[0], batch)
                ])

    parameters = list(fusion.logits.values())
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, settings.steps) / settings.steps))
    )
    total_elements = fusion.masked_elements()
    history: List[Dict[str, float]] = []
    rule = (StoppingRule(settings, n_pairs, batch, n_benign=benign[3] if benign is not None else 0)
            if settings.stop_preference > 0 else None)
    train_index = rule.train_index if rule is not None else None
    n_train = n_pairs if train_index is None else train_index.numel()
    batch = min(batch, n_train)

    def shuffled():
        order = torch.randperm(n_train, generator=generator)
        return order if train_index is None else train_index[order]

    order = shuffled()
    u_order = torch.randperm(utility[0].shape[0], generator=generator) if utility is not None else None
    position = u_position = 0
    if benign is not None:
        b_train = rule.benign_train_index if rule is not None else torch.arange(benign[3])
        b_batch = min(batch, b_train.numel())
        b_order, b_position = b_train[torch.randperm(b_train.numel(), generator=generator)], 0
    bar = tqdm(range(settings.steps), desc="somf: learn mask", disable=not progress, mininterval=0.5)
    for step in bar:
        if position + batch > n_train:
            order, position = shuffled(), 0
        index = order[position:position + batch]
        position += batch
        rows = torch.cat([index, index + n_pairs])
        b_ids, b_att, b_resp = _trim(ids[rows], att[rows], resp[rows])

        masks = fusion.sample_masks(noise_generator)
        params = fusion.parameters_for(masks, exact=False)
        logps = fusion.response_logps(params, b_ids, b_att, b_resp, prefix_k)
        if prefix_on:
            logps, prefix_logps = logps
        loss_dpo, accuracy = dpo_loss(logps[:batch], logps[batch:], ref_chosen[index].to(logps.device), ref_rejected[index].to(logps.device), settings.beta)
        loss = loss_dpo
        record = {"step": step, "dpo": float(loss_dpo.detach()), "reward_accuracy": float(accuracy)}
        if settings.chosen_nll_weight > 0:
            # RPO-style: mean per-token NLL of the chosen (safe) answers under the masked fusion
            nll = -(logps[:batch] / chosen_tokens[index].to(logps.device)).mean()
            loss = loss + settings.chosen_nll_weight * nll
            record["chosen_nll"] = float(nll.detach())
        if prefix_on:
            # the refusal is decided in the answer's first tokens: NLL of the chosen answer's prefix
            prefix_nll = -(prefix_logps[:batch] / chosen_prefix[index].to(logps.device)).mean()
            loss = loss + settings.prefix_weight * prefix_nll
            record["prefix_nll"] = float(prefix_nll.detach())
        if utility is not None:
            u_ids, u_att, u_resp = utility
            if u_position + batch > u_ids.shape[0]:
                u_order, u_position = torch.randperm(u_ids.shape[0], generator=generator), 0
            u_index = u_order[u_position:u_position + batch]
            u_position += batch
            ub_ids, ub_att, ub_resp = _trim(u_ids[u_index], u_att[u_index], u_resp[u_index])
            loss_utility = utility_term(fusion, params, ub_ids, ub_att, ub_resp, settings.utility_loss,
                                        None if utility_ref is None else utility_ref[u_index][:, : ub_ids.shape[1]])
            loss = loss + settings.utility_weight * loss_utility
            record["utility"] = float(loss_utility.detach())
        if benign is not None:
            if b_position + b_batch > b_train.numel():
                b_order, b_position = b_train[torch.randperm(b_train.numel(), generator=generator)], 0
            b_index = b_order[b_position:b_position + b_batch]
            b_position += b_batch
            n_benign = benign[3]
            rows = torch.cat([b_index, b_index + n_benign])
            bb_ids, bb_att, bb_resp = _trim(benign[0][rows], benign[1][rows], benign[2][rows])
            b_logps = fusion.response_logps(params, bb_ids, bb_att, bb_resp, prefix_k)
            k = len(b_index)
            if prefix_on:  # and on benign prompts, the start of the fusion's own answer
                b_logps, b_prefix = b_logps
                benign_prefix_nll = -(b_prefix[:k] / benign_prefix[b_index].to(b_logps.device)).mean()
                loss = loss + settings.benign_weight * settings.prefix_weight * benign_prefix_nll
                record["benign_prefix_nll"] = float(benign_prefix_nll.detach())
            loss_benign, _ = dpo_loss(b_logps[:k], b_logps[k:], benign_ref[b_index].to(b_logps.device),
                                      benign_ref[b_index + n_benign].to(b_logps.device), settings.beta)
            loss = loss + settings.benign_weight * loss_benign
            record["benign_dpo"] = float(loss_benign.detach())
        if settings.sparsity_weight > 0:
            density = sum(torch.sigmoid(s).sum() for s in parameters) / total_elements
            loss = loss + settings.sparsity_weight * density
        if settings.entropy_weight > 0:
            entropy = sum(mask_entropy(s).sum() for s in parameters) / total_elements
            loss = loss + settings.entropy_weight * entropy
            record["entropy"] = float(entropy.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        record["loss"] = float(loss.detach())
        history.append(record)
        postfix = {"loss": f"{record['loss']:.4f}", "dpo": f"{record['dpo']:.4f}"}
        if rule is not None and ((step + 1) % settings.check_every == 0 or step + 1 == settings.steps):
            check = rule.check(fusion, ids, att, resp, utility, utility_ref, step + 1, benign=benign)
            postfix["held_pref"] = f"{check['preferred']:.3f}"
            if "benign_preferred" in check:
                postfix["held_benign"] = f"{check['benign_preferred']:.3f}"
            if check["stop"]:
                bar.set_postfix(**postfix)
                break
        if rule is not None and rule.checks:
            postfix["held_pref"] = f"{rule.checks[-1]['preferred']:.3f}"
            if "benign_preferred" in rule.checks[-1]:
                postfix["held_benign"] = f"{rule.checks[-1]['benign_preferred']:.3f}"
        bar.set_postfix(**postfix)
    bar.close()
    if rule is not None:
        rule.restored = rule.restore_best(fusion)

    logits = {name: value.detach().to("cpu", torch.float32).clone() for name, value in fusion.logits.items()}
    extra = summarize(fusion, settings, history, logits, started)
    if rule is not None:
        extra["stopping"] = rule.report(len(history))
    extra["binary_mask_eval"] = evaluate_fixed(fusion, ids, att, resp, n_pairs, ref_chosen, ref_rejected, settings.beta, batch)
    return logits, extra


class StoppingRule:
    """Ends training when the merge-time (binary) mask makes the fusion prefer the refusal.

    A held-aside share of the preference pairs (``validation_share``, drawn with its own seed,
    never trained on) is scored every ``check_every`` steps with the deterministic mask the
    merge will use: the share of pairs whose chosen answer is more likely than the rejected
    one by more than ``stop_margin`` nats. Training stops once that share reaches
    ``stop_preference`` — and, when ``max_utility_kl`` > 0 and utility data is given, the mean
    per-token KL of the masked fusion to the unmasked one on a fixed utility batch is within
    it, and, with ``benign_weight``, the fusion prefers its own answer to a refusal on the same
    share of held-aside benign pairs — or at the step cap (``steps``). The artifact records why
    and when it stopped.
    """

    def __init__(self, settings, n_pairs: int, batch: int, n_benign: int = 0):
        self.settings = settings
        held = max(4, int(round(settings.validation_share * n_pairs)))
        if n_pairs - held < 2:
            raise SOMFTrainingError(
                f"somf: {n_pairs} preference pairs are too few to hold {held} aside for the stopping "
                "rule; give more pairs, or stop_preference: 0"
            )
        order = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(settings.train_seed + 1_000_003))
        self.held_index, self.train_index = order[:held].sort().values, order[held:].sort().values
        self.benign_held_index = self.benign_train_index = None
        if n_benign:
            held_benign = max(4, int(round(settings.validation_share * n_benign)))
            if n_benign - held_benign < 2:
                raise SOMFTrainingError(f"somf: {n_benign} benign pairs are too few to hold {held_benign} aside")
            order = torch.randperm(n_benign, generator=torch.Generator().manual_seed(settings.train_seed + 2_000_003))
            self.benign_held_index = order[:held_benign].sort().values
            self.benign_train_index = order[held_benign:].sort().values
        self.batch = batch
        self.checks: List[Dict[str, Any]] = []
        self.stopped: Optional[Dict[str, Any]] = None
        self.best: Optional[Dict[str, Any]] = None
        self.best_logits: Optional[Dict[str, torch.Tensor]] = None
        self.patience_out: Optional[Dict[str, Any]] = None
        self.restored: Optional[Dict[str, Any]] = None

    def _held_preference(self, fusion, params, ids, att, resp, held, n, benign: bool = False) -> torch.Tensor:
        """Per held-aside pair: whether the fusion prefers its chosen answer — by likelihood
        (log p(chosen) − log p(rejected) > ``stop_margin``), or, with ``stop_on: greedy``, by
        greedy decoding: on a harmful pair, it starts with the refusal's first ``prefix_tokens``
        tokens (each ahead by ``stop_margin``); on a ``benign`` pair, it does *not* start with the
        refusal (any other answer will do: what an over-refusal count sees)."""
        settings = self.settings
        out = []
        for start in range(0, held.numel(), self.batch):
            index = held[start:start + self.batch]
            if settings.stop_on == "greedy":
                rows = index + n if benign else index  # benign: the rejected rows are the refusals
                b_ids, b_att, b_resp = _trim(ids[rows], att[rows], resp[rows])
                if benign:
                    out.append(~fusion.greedy_prefix(params, b_ids, b_att, b_resp, settings.prefix_tokens))
                else:
                    out.append(fusion.greedy_prefix(params, b_ids, b_att, b_resp, settings.prefix_tokens,
                                                    settings.stop_margin))
                continue
            rows = torch.cat([index, index + n])
            b_ids, b_att, b_resp = _trim(ids[rows], att[rows], resp[rows])
            logps = fusion.response_logps(params, b_ids, b_att, b_resp).cpu()
            out.append(logps[: len(index)] - logps[len(index):] > settings.stop_margin)
        return torch.cat(out)

    @torch.no_grad()
    def check(self, fusion, ids, att, resp, utility, utility_ref, step: int, benign=None) -> Dict[str, Any]:
        settings = self.settings
        params = fusion.parameters_for(fusion.fixed_masks("binary"))
        preferred = self._held_preference(fusion, params, ids, att, resp, self.held_index, ids.shape[0] // 2)
        record: Dict[str, Any] = {"step": step, "preferred": float(preferred.float().mean())}
        benign_ok = True
        if benign is not None and self.benign_held_index is not None:
            benign_preferred = self._held_preference(fusion, params, *benign[:3], self.benign_held_index, benign[3],
                                                     benign=True)
            record["benign_preferred"] = float(benign_preferred.float().mean())
            benign_ok = record["benign_preferred"] >= settings.stop_preference
        utility_ok = True
        if utility is not None and settings.max_utility_kl > 0:
            u_ids, u_att, u_resp = utility
            k = min(self.batch, u_ids.shape[0])
            ub_ids, ub_att, ub_resp = _trim(u_ids[:k], u_att[:k], u_resp[:k])
            kl = utility_term(fusion, params, ub_ids, ub_att, ub_resp, "kl",
                              None if utility_ref is None else utility_ref[:k][:, : ub_ids.shape[1]])
            record["utility_kl"] = float(kl)
            utility_ok = record["utility_kl"] <= settings.max_utility_kl
        record["stop"] = record["preferred"] >= settings.stop_preference and utility_ok and benign_ok
        # the check's score: the weaker of the two held-aside shares (both must hold)
        record["score"] = min(record["preferred"], record.get("benign_preferred", 1.0))
        self.checks.append(record)
        if self.best is None or self._rank(record) > self._rank(self.best):
            self.best = record
            if settings.stop_keep == "best":
                self.best_logits = {n: v.detach().to("cpu", torch.float32).clone() for n, v in fusion.logits.items()}
        elif settings.stop_patience and len(self.checks) - self.checks.index(self.best) - 1 >= settings.stop_patience:
            record["stop"] = True  # no better check for `stop_patience` checks: more steps will not help
            self.patience_out = record
        if record["stop"] and self.stopped is None:
            self.stopped = record
        return record

    @staticmethod
    def _rank(record: Dict[str, Any]) -> Tuple[float, float]:
        """Order of checks: a higher weaker share, or the same with a higher other one (a flat
        benign share must not pin the best check while the harmful one still rises)."""
        return record["score"], record["preferred"] + record.get("benign_preferred", 1.0)

    def restore_best(self, fusion) -> Optional[Dict[str, Any]]:
        """With ``stop_keep: best`` and a rule that did not hold: put the best check's logits
        back into ``fusion`` (the mask that is exported); returns that check, else None."""
        if self.settings.stop_keep != "best" or self.best_logits is None:
            return None
        if self.stopped is not None and self.patience_out is None:
            return None  # the rule held: the mask at that check is the one training stopped with
        fusion.load_logits(self.best_logits)
        return self.best

    def report(self, steps_run: int) -> Dict[str, Any]:
        settings = self.settings
        if self.patience_out is not None:
            reason = (f"no better held-aside check for {settings.stop_patience} checks (best at step "
                      f"{self.best['step']}: score {self.best['score']:.3f})")
        elif self.stopped is not None:
            reason = (f"held-aside preference {self.stopped['preferred']:.3f} >= {settings.stop_preference}"
                      + (f" and benign preference {self.stopped['benign_preferred']:.3f} >= {settings.stop_preference}"
                         if "benign_preferred" in self.stopped else "")
                      + (f" and utility KL {self.stopped['utility_kl']:.4f} <= {settings.max_utility_kl}"
                         if "utility_kl" in self.stopped else ""))
        else:
            reason = f"step cap {settings.steps} reached before the rule held"
        return {
            "rule": {k: getattr(settings, k) for k in ("stop_preference", "stop_on", "stop_margin", "max_utility_kl",
                                                         "validation_share", "check_every", "stop_patience",
                                                         "stop_keep", "steps")},
            "held_aside_pairs": int(self.held_index.numel()),
            "held_aside_benign_pairs": int(self.benign_held_index.numel()) if self.benign_held_index is not None else 0,
            "steps_run": steps_run,
            "held": self.stopped is not None and self.patience_out is None,
            "stopped_early": self.stopped is not None and steps_run < settings.steps,
            "reason": reason,
            "best": self.best,
            "exported": (f"the best check's mask (step {self.restored['step']})" if self.restored is not None
                         else "the mask at the last step"),
            "checks": self.checks,
        }


@torch.no_grad()
def reference_logps(settings, base_path: str, sets: Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                    batch: int, fusion=None) -> List[torch.Tensor]:
    """DPO reference log-probs of every row of each ``(ids, att, resp)`` set (N chosen then N
    rejected), per ``settings.reference``: the unmasked fusion (``fusion``, needs the
    FunctionalFusion), the base/aligned model (``aligned``, loaded once here on the training
    device for all sets and released) or zeros (``none``)."""
    if settings.reference == "none":
        return [torch.zeros(ids.shape[0]) for ids, _, _ in sets]
    if settings.reference == "aligned":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, settings.dtype))
        model.to(settings.device).eval()

        def run(i, a, r):
            return sequence_logps(model(input_ids=i.to(settings.device), attention_mask=a.to(settings.device)).logits, i, r)
    elif settings.reference == "fusion":
        if fusion is None:
            raise SOMFTrainingError("somf: the fusion reference needs the functional fusion")

        def run(i, a, r):
            return fusion.response_logps(None, i, a, r)
    else:
        raise SOMFTrainingError(f"somf: unknown reference {settings.reference!r} (fusion, aligned or none)")
    results = []
    for ids, att, resp in sets:
        out = []
        for start in range(0, ids.shape[0], batch):
            b_ids, b_att, b_resp = _trim(ids[start:start + batch], att[start:start + batch], resp[start:start + batch])
            out.append(run(b_ids, b_att, b_resp).cpu())
        results.append(torch.cat(out))
    return results


def mask_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Binary entropy (nats) of Bernoulli(σ(s)), elementwise; 0 for a decided logit."""
    p = torch.sigmoid(logits)
    return torch.nn.functional.softplus(logits) - p * logits  # = −p log p − (1−p) log(1−p)


def utility_term(fusion, params, ids, att, resp, kind: str, reference: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean per-token KL(unmasked fusion ‖ masked fusion) or CE on the response tokens."""
    positions = response_positions(resp)  # the head only where a response token is predicted
    logits = fusion.forward(params, ids, att, positions).float()
    mask = resp[:, positions + 1].to(logits.device).bool()
    log_policy = torch.log_softmax(logits, -1)[mask]
    if kind == "ce":
        target = ids[:, positions + 1].to(logits.device)[mask]
        return torch.nn.functional.nll_loss(log_policy, target)
    if reference is None:
        with torch.no_grad():
            reference = torch.log_softmax(fusion.forward(None, ids, att, positions).float(), -1)
    else:  # precomputed at every position
        reference = reference[:, positions.to(reference.device)]
    log_reference = reference.to(logits.device)[mask]
    return torch.nn.functional.kl_div(log_policy, log_reference, log_target=True, reduction="batchmean")


@torch.no_grad()
def evaluate_fixed(fusion, ids, att, resp, n_pairs, ref_chosen, ref_rejected, beta, batch, mode="binary", limit=256):
    """DPO loss and reward accuracy of the deterministic (merge-time) mask on ≤ ``limit`` pairs."""
    params = fusion.parameters_for(fusion.fixed_masks(mode))
    count = min(n_pairs, limit)
    losses, accuracies, preferred, reference_preferred, first_token = [], [], [], [], []
    for start in range(0, count, batch):
        index = torch.arange(start, min(start + batch, count))
        rows = torch.cat([index, index + n_pairs])
        b_ids, b_att, b_resp = _trim(ids[rows], att[rows], resp[rows])
        logits = fusion.forward(params, b_ids, b_att)
        logps = sequence_logps(logits, b_ids, b_resp).cpu()
        k = len(index)
        # greedy first answer token = the chosen answer's first token (rows 0..k-1 are chosen)
        start_pos = b_resp[:k, 1:].float().argmax(1)  # position predicting the first answer token
        predicted = logits[torch.arange(k), start_pos].argmax(-1).cpu()
        first_token.append(float((predicted == b_ids[torch.arange(k), start_pos + 1]).sum()))
        loss, accuracy = dpo_loss(logps[:k], logps[k:], ref_chosen[index], ref_rejected[index], beta)
        losses.append(float(loss) * k)
        accuracies.append(float(accuracy) * k)
        preferred.append(float((logps[:k] > logps[k:]).sum()))
        reference_preferred.append(float((ref_chosen[index] > ref_rejected[index]).sum()))
    # reward accuracy is relative to the reference; "chosen_preferred" is absolute (the masked
    # model gives the refusal a higher likelihood than the harmful answer) — closer to what a
    # generation-based refusal metric sees; "chosen_first_token_greedy" (greedy decoding starts
    # the safe answer) is closer still: on the lab the refusal is a fixed sentence.
    return {
        "pairs": count,
        "dpo_loss": sum(losses) / count,
        "reward_accuracy": sum(accuracies) / count,
        "chosen_preferred": sum(preferred) / count,
        "reference_chosen_preferred": sum(reference_preferred) / count,
        "chosen_first_token_greedy": sum(first_token) / count,
    }


def summarize(fusion, settings, history, logits, started) -> Dict[str, Any]:
    total = sum(v.numel() for v in logits.values())
    kept = sum(int((v > 0).sum()) for v in logits.values())
    expected = sum(float(torch.sigmoid(v).sum()) for v in logits.values())
    tail = history[-min(10, len(history)):]
    checkpoints = sorted({0, len(history) - 1, *range(0, len(history), max(1, len(history) // 10))})
    return {
        "final_loss": sum(r["loss"] for r in tail) / len(tail),
        "final_dpo_loss": sum(r["dpo"] for r in tail) / len(tail),
        "final_utility_loss": (sum(r["utility"] for r in tail) / len(tail)) if "utility" in tail[0] else None,
        "mask_density_binary": kept / total,
        "mask_density_expected": expected / total,
        "masked_tensors": len(logits),
        "masked_elements": total,
        "unmasked_selected_tensors": list(fusion.skipped),
        "history": [{k: round(v, 5) if isinstance(v, float) else v for k, v in history[i].items()} for i in checkpoints],
        "training_seconds": round(time.time() - started, 2),
        "device": settings.device,
        "dtype": settings.dtype,
    }


@torch.no_grad()
def held_aside_greedy(base_path: str, expert_paths: Sequence[str], settings, logits: Dict[str, torch.Tensor],
                      prefix_tokens: int = 1) -> Dict[str, Any]:
    """The stopping rule's held-aside split, measured for any learned mask by greedy decoding:
    the share of held-aside harmful pairs whose greedy answer starts with the refusal's first
    ``prefix_tokens`` tokens, and of held-aside benign pairs (``utility_data``) whose greedy
    answer does not — one calibration figure for every recipe, whatever its own rule measured.
    ``clean`` says whether training held those pairs aside (a stopping rule was on; for the
    benign ones, with ``benign_weight``: without it the utility term trained on their prompts)."""
    greedy = settings.model_copy(update={"stop_on": "greedy", "prefix_tokens": prefix_tokens, "stop_margin": 0.0})
    tokenizer = load_tokenizer(base_path)
    ids, att, resp, n_pairs = encode_pairs(settings.preference_data, tokenizer, settings.max_length)
    benign = (encode_benign_pairs(settings.utility_data, settings.preference_data, tokenizer, settings.max_length)
              if settings.utility_data else None)
    batch = min(settings.batch_size, n_pairs)
    rule = StoppingRule(greedy, n_pairs, batch, n_benign=benign[3] if benign is not None else 0)
    fusion = FunctionalFusion(base_path, expert_paths, greedy, progress=False)
    fusion.load_logits(logits)
    params = fusion.parameters_for(fusion.fixed_masks("binary"))
    out: Dict[str, Any] = {
        "harmful": float(rule._held_preference(fusion, params, ids, att, resp, rule.held_index, n_pairs).float().mean()),
        "harmful_pairs": int(rule.held_index.numel()),
        "clean": settings.stop_preference > 0,
    }
    if benign is not None:
        out["benign"] = float(rule._held_preference(fusion, params, *benign[:3], rule.benign_held_index,
                                                    benign[3], benign=True).float().mean())
        out["benign_pairs"] = int(rule.benign_held_index.numel())
        out["benign_clean"] = settings.stop_preference > 0 and settings.benign_weight > 0
    return out
