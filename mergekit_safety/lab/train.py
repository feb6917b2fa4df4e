"""Model construction and a small, deterministic SFT loop for the lab (CPU)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch


@dataclass(frozen=True)
class ModelShape:
    """LlamaForCausalLM size. Grouped-query attention (kv heads < heads) on purpose."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 64

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def make_model(shape: ModelShape, vocab_size: int, special_ids: Dict[str, int], seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        **shape.to_dict(),  # ModelShape's fields are LlamaConfig's own names
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        pad_token_id=special_ids["pad"],
        bos_token_id=special_ids["bos"],
        eos_token_id=special_ids["eos"],
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = special_ids["pad"]
    model.generation_config.bos_token_id = special_ids["bos"]
    model.generation_config.eos_token_id = special_ids["eos"]
    return model


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float
    batch_size: int = 64
    warmup: int = 50
    weight_decay: float = 0.0
    min_lr_ratio: float = 0.1

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _pad(examples: Sequence[Tuple[List[int], List[int]]], pad_id: int):
    t = max(len(ids) for ids, _ in examples)
    n = len(examples)
    ids = torch.full((n, t), pad_id, dtype=torch.long)
    att = torch.zeros((n, t), dtype=torch.long)
    resp = torch.zeros((n, t), dtype=torch.bool)
    for i, (x, m) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        att[i, : len(x)] = 1
        resp[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids, att, resp


def response_loss(model, ids: torch.Tensor, att: torch.Tensor, resp: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over response tokens (right-padded batch)."""
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
    target = ids[:, 1:]
    mask = resp[:, 1:]
    return torch.nn.functional.cross_entropy(logits[mask].float(), target[mask])


def train(
    model,
    examples: Sequence[Tuple[List[int], List[int]]],
    cfg: TrainConfig,
    pad_id: int,
    seed: int,
    desc: str = "train",
    progress: bool = True,
) -> List[float]:
    """AdamW, linear warm-up then cosine decay to ``min_lr_ratio``; epoch-wise shuffling.

    ``examples`` are (input_ids, response_mask) pairs; the loss covers response tokens only.
    Deterministic for a seed (single-threaded data order; torch CPU kernels are deterministic).
    Returns the per-step losses.
    """
    from tqdm.auto import tqdm

    ids, att, resp = _pad(examples, pad_id)
    n = ids.shape[0]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))

    model.train()
    losses: List[float] = []
    perm = torch.randperm(n, generator=gen)
    pos = 0
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False, mininterval=0.5)
    for step in bar:
        if pos + cfg.batch_size > n:
            perm = torch.randperm(n, generator=gen)
            pos = 0
        idx = perm[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        b_att = att[idx]
        t = int(b_att.sum(1).max())
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = response_loss(model, ids[idx, :t], b_att[:, :t], resp[idx, :t])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses
