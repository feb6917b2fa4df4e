"""The fusion kernel every method of this package shares: one pure function, :func:`fuse`.

    θ = θ_A + project(post_keep ⊙ λ·Merge(P_1(τ_1 ⊙ keep_1), …, P_n(τ_n ⊙ keep_n))) + add,
    τ_i = θ_i − θ_A

θ_A is the config's ``base_model`` (the safety-aligned model), ``Merge`` a selectable backbone
(task arithmetic, TIES, DARE linear/TIES, mean) built from mergekit's own sparsification
(``mergekit.sparsify``) and sign consensus (``get_mask``), so that with every mask at "keep"
the output equals mergekit's built-in method bit for bit. Optional extras, used by the
methods built on this core:

* ``keep_rescale`` — SOMF's per-tensor rescale τ̃ = m ⊙ τ / mean(m);
* ``expert_zero`` — entries of an expert's weights set to 0 before fusion (Antidote's
  "zero" mode applied per expert);
* ``zero`` — entries of the fused output set to 0 (Antidote's "zero" mode on the fusion);
* ``expert_project`` — a function P_i applied to expert i's (masked) task vector before
  sparsification and fusion (e.g. Safe LoRA's projection of each update);
* ``project`` — a function applied to the fused update (after λ and ``post_keep``);
* ``add`` — a tensor added to the output (e.g. RESTA's safety vector γ·(θ_A − θ_U)).

Every slot left at None changes nothing, so with no masks the output is exactly the mergekit
backbone. A method supplies the slots for one output tensor through
:meth:`mergekit_safety.fusion.method.FusionMethod.tensor_masks`; the arithmetic lives once, here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Dict, List, Optional, Sequence

import torch

# mergekit's own sparsification and sign consensus (library code, reused so that the output
# equals mergekit's built-in methods bit for bit)
from mergekit.merge_methods.generalized_task_arithmetic import get_mask
from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify


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
    """What one method applies to one output tensor (None = leave alone)."""

    keep: List[Optional[torch.Tensor]] = field(default_factory=list)  # one per expert
    post_keep: Optional[torch.Tensor] = None
    zero: Optional[torch.Tensor] = None
    expert_zero: List[Optional[torch.Tensor]] = field(default_factory=list)
    keep_rescale: bool = False
    expert_project: List[Optional[Callable[[torch.Tensor], torch.Tensor]]] = field(default_factory=list)
    project: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    add: Optional[torch.Tensor] = None


def _select_from_top(counts: torch.Tensor, k: int):
    """Over bins of ascending value: the bin holding the k-th largest entry and how many
    entries lie in the bins above it."""
    from_top = counts.flip(0).cumsum(0)  # from_top[j]: entries in the top j + 1 bins
    j = int(torch.searchsorted(from_top, k))
    return counts.numel() - 1 - j, (int(from_top[j - 1]) if j else 0)


def top_k_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of a flat non-negative tensor; among entries
    equal to the k-th largest, the lowest indices win.

    Linear time, no sort: a non-negative float's bit pattern orders like the float, so the
    threshold is found by counting bit patterns — one 2^15-bin histogram of the high 16 bits
    (bf16/fp16: the whole value), then, for float32, one 2^16-bin histogram of the low 16 bits
    inside the threshold's bin. Other dtypes use a k-th-value search (same selection)."""
    n = magnitudes.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=magnitudes.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=magnitudes.device)
    if magnitudes.dtype == torch.float32:
        bits = magnitudes.view(torch.int32)
        high = bits >> 16
        bucket, above = _select_from_top(torch.bincount(high, minlength=1 << 15), k)
        low = torch.where(high == bucket, bits & 0xFFFF, 1 << 16)  # entries of other bins → a spare bin
        del high
        low_counts = torch.bincount(low, minlength=(1 << 16) + 1)[: 1 << 16]
        del low
        low_bin, above_low = _select_from_top(low_counts, k - above)
        keys, threshold, equal_count = bits, (bucket << 16) | low_bin, int(low_counts[low_bin])
        above += above_low
    elif magnitudes.dtype in (torch.bfloat16, torch.float16):
        keys = magnitudes.view(torch.int16)
        counts = torch.bincount(keys, minlength=1 << 15)
        threshold, above = _select_from_top(counts, k)
        equal_count = int(counts[threshold])
    else:
        keys = magnitudes
        threshold = torch.kthvalue(magnitudes, n - k + 1).values
        above, equal_count = int((magnitudes > threshold).sum()), None
    missing = k - above  # ≥ 1: the k-th largest itself equals the threshold
    if equal_count == missing:  # no surplus of equal entries (the usual case): one comparison
        return keys >= threshold
    mask = keys > threshold
    equal = (keys == threshold).nonzero().view(-1)[:missing]
    mask[equal] = True
    return mask


def magnitude_fast(tensor: torch.Tensor, density: float, rescale_norm=None, inplace: bool = False) -> torch.Tensor:
    """mergekit's magnitude sparsification (TIES) with a histogram selection instead of a full
    argsort (:func:`top_k_mask`): the same ``k`` entries except, possibly, which of several equal
    magnitudes at the threshold are kept (mergekit's argsort order among them is unspecified;
    here: lowest index). ``inplace``: zero the dropped entries of ``tensor`` itself."""
    from mergekit.sparsify import rescaled_masked_tensor

    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return tensor.zero_() if inplace else torch.zeros_like(tensor)
    k = max(1, int(density * tensor.numel()))
    drop = top_k_mask(tensor.abs().reshape(-1), k).logical_not_().reshape_as(tensor)
    if rescale_norm is None:
        return tensor.masked_fill_(drop, 0) if inplace else tensor.masked_fill(drop, 0)
    return rescaled_masked_tensor(tensor, drop.logical_not_().to(tensor.dtype), rescale_norm)


# integer views whose sign bit is the float's (sign flips and "> 0" tests on the bits)
_SIGN_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def sign_consensus(deltas: torch.Tensor, weights: Sequence[float]):
    """mergekit's TIES consensus on weighted task vectors (``get_mask(method="sum")``; then the
    sum of the agreeing entries and of their weights), bit for bit, in fewer passes: the
    majority sign is flipped into the entries' sign bits, so "agrees" is "> 0" on an integer
    view. Returns ``(mixed, divisor)`` or None for a dtype without such a view. Overwrites
    ``deltas``."""
    view = _SIGN_VIEW.get(deltas.dtype)
    if view is None:
        return None
    # get_mask: majority +1 where the sum is ≥ 0 (-0.0 included), else -1 — as a sign-bit flip
    flip = (deltas.sum(dim=0) < 0).to(view).bitwise_left_shift_(torch.iinfo(view).bits - 1)
    bits = deltas.view(view)
    bits.bitwise_xor_(flip)  # agreeing entries are now > 0 (their sign bit clear, not ±0)
    bits.clamp_(min=0)  # the others (sign bit set) → +0.0
    agreeing = bits > 0
    mixed = deltas.sum(dim=0)
    mixed.view(view).bitwise_xor_(flip)  # back to the majority's sign
    # Σ w_i over the agreeing experts: torch sums over dim 0 in an order of its own, so a table
    # of the subsets' sums is used only where every subset sums exactly in float32 (then every
    # order gives the same value; e.g. bf16 weights); otherwise mergekit's own expression
    weights = torch.tensor(list(weights), dtype=deltas.dtype)
    exact = [] if len(weights) > 8 else [sum(w for i, w in enumerate(weights.double().tolist()) if s >> i & 1)
                                         for s in range(1 << len(weights))]
    if not exact or any(float(torch.tensor(v, dtype=torch.float32)) != v for v in exact):
        weight_tensor = weights.view(-1, *([1] * (deltas.dim() - 1)))
        return mixed, (weight_tensor * agreeing).sum(dim=0).to(deltas.dtype)
    subset = agreeing[0].view(torch.uint8).clone()  # bit i: expert i agrees
    for index in range(1, len(weights)):
        subset.add_(agreeing[index].view(torch.uint8), alpha=1 << index)
    table = torch.tensor(exact, dtype=torch.float32, device=deltas.device).to(deltas.dtype)
    return mixed, torch.index_select(table, 0, subset.reshape(-1).to(torch.int32)).reshape(subset.shape)


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
    ties_selection: str = "mergekit",
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
        project = masks.expert_project[index] if index < len(masks.expert_project) else None
        if project is not None:
            delta = project(delta)
        if definition.sparsification is SparsificationMethod.magnitude and ties_selection == "fast":
            delta = magnitude_fast(delta, densities[index], RescaleNorm.l1 if rescale else None,
                                   inplace=delta is slot)
        elif definition.sparsification is not None:
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

    fast_consensus = None
    if definition.consensus and ties_selection == "fast" and not deltas.requires_grad:  # bit tricks: no autograd
        fast_consensus = sign_consensus(deltas, weights)
    if fast_consensus is not None:
        mixed, divisor = fast_consensus
        divisor[divisor == 0] = 1
    elif definition.consensus:
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
    if masks.project is not None:
        mixed = masks.project(mixed)
    result = base + mixed
    if masks.add is not None:
        result = result + masks.add
    if masks.zero is not None:
        result = torch.where(masks.zero.bool(), torch.zeros_like(result), result)
    return result.to(base.dtype)
