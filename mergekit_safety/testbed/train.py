"""Supervised fine-tuning, loss on response tokens only: LoRA (peft) or full (``full=True``:
every weight of the decoder layers and the final norm; the tied embeddings stay frozen, so an
expert's task vector lives where a LoRA's does, in the decoder).

CPU-friendly: bf16 autocast (AMX/AVX-512 bf16 kernels where the CPU has them; fp32 master
weights), the output head computed only at response positions, sequences kept short by the
data stage. AdamW, linear warm-up (10 %) then cosine decay, gradient clipping at 1.0.
"""

from __future__ import annotations

import math
import os
import random
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_train(
    base: str,
    records: Sequence[Dict[str, str]],
    out: str,
    *,
    steps: int,
    batch_size: int = 8,
    lr: float = 1e-3,
    rank: int = 8,
    alpha: int = 16,
    targets: Sequence[str] = ALL_LINEAR,
    layers: Optional[Sequence[int]] = None,
    seed: int = 0,
    device: str = "cpu",
    bf16: bool = True,
    merge_into: Optional[str] = None,
    full: bool = False,
    log: Callable[[str], None] = print,
    callback: Optional[Callable[[int, Any], None]] = None,
) -> Dict[str, Any]:
    """Train a LoRA adapter on ``records`` (``prompt``/``response``) from model ``base``.

    Saves the adapter (``adapter_config.json`` + ``adapter_model.safetensors``) into ``out``;
    with ``merge_into`` also the merged full model (float32) there. With ``full`` the whole
    model (float32 safetensors) goes to ``out``. Returns a summary.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .chat import collate, encode
    from .fetch import save_model

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    if full:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(".layers." in name or name.startswith("model.norm"))
        inner = model
    else:
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets),
                            layers_to_transform=list(layers) if layers is not None else None, bias="none",
                            task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
        inner = model.base_model.model
    encoded = [encode(tokenizer, r["prompt"], r["response"]) for r in records]
    lengths = [len(e["input_ids"]) for e in encoded]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))),
    )
    rng = random.Random(seed)
    order: List[int] = []
    losses: List[float] = []
    started = time.time()
    model.train()
    for step in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(encoded)))
            rng.shuffle(fresh)
            order += fresh
        chunk, order = order[:batch_size], order[batch_size:]
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in chunk], pad).items()}
        with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden = inner.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            mask = batch["response_mask"][:, 1:].bool()
            logits = inner.lm_head(hidden[:, :-1][mask])
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["input_ids"][:, 1:][mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 10 == 0 or step == 0:
            log(f"  step {step + 1}/{steps} loss {losses[-1]:.3f} ({time.time() - started:.0f} s)")
        if callback is not None:
            callback(step + 1, model)
    model.eval()
    summary = {
        "kind": "full" if full else "lora", "trainable_parameters": sum(p.numel() for p in trainable),
        "steps": steps, "batch_size": batch_size, "lr": lr, "rank": rank, "alpha": alpha, "targets": list(targets),
        "layers": list(layers) if layers is not None else "all", "examples": len(records),
        "mean_tokens": round(sum(lengths) / len(lengths), 1), "max_tokens": max(lengths),
        "first_loss": round(losses[0], 4), "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "train_seconds": round(time.time() - started, 1),
    }
    if full:
        for key in ("rank", "alpha", "targets", "layers"):
            summary.pop(key)
        save_model(model.to("cpu"), tokenizer, out)
        return summary
    tmp = out + ".tmp"
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    if merge_into:
        merged = model.merge_and_unload()
        save_model(merged.to("cpu"), tokenizer, merge_into)
    return summary
