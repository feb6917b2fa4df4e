"""SOMF's merge-time masks from learned logits, and the equal-density random control."""

from __future__ import annotations

import torch

from mergekit_safety.engine.seeding import tensor_seed


def random_control_mask(reference: torch.Tensor, name: str, seed: int) -> torch.Tensor:
    """A random binary mask with exactly as many ones as ``reference`` (per tensor), seeded by
    ``seed`` and the tensor name (independent of execution order)."""
    count = int(reference.sum().round().item()) if reference.dtype != torch.bool else int(reference.sum())
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    order = torch.randperm(reference.numel(), generator=generator)
    mask = torch.zeros(reference.numel(), dtype=torch.float32)
    mask[order[:count]] = 1.0
    return mask.reshape(reference.shape)


def mask_from_logits(logits: torch.Tensor, mode: str, name: str = "", seed: int = 0,
                     threshold: float = 0.0) -> torch.Tensor:
    """Merge-time mask: ``binary`` = 1[s > threshold] (deterministic; the learned mask at 0),
    ``expected`` = σ(s), ``sample`` = one Bernoulli(σ(s)) draw (the authors' export), seeded by
    ``seed`` and the tensor name."""
    logits = logits.float()
    if mode == "binary":
        return (logits > threshold).float()
    if mode == "expected":
        return torch.sigmoid(logits)
    if mode == "sample":
        generator = torch.Generator().manual_seed(tensor_seed(seed, name, offset=7))
        return (torch.rand(logits.shape, generator=generator) < torch.sigmoid(logits)).float()
    raise ValueError(f"somf: unknown mask_mode {mode!r} (binary, expected or sample)")
