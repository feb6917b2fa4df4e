"""Loading a causal LM for generation, and greedy batched generation of chat answers."""

from __future__ import annotations

import os
from typing import List, Optional, Sequence


def load_model(model_dir: str, device: str = "cpu", dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"{model_dir}: not a model folder (no config.json); give the folder a merge or a lab build wrote")
    if not any(name.endswith((".safetensors", ".bin")) for name in os.listdir(model_dir)):
        raise ValueError(f"{model_dir}: no weights (*.safetensors) in this folder")
    tok = AutoTokenizer.from_pretrained(model_dir)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar per evaluated model
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model.to(device).eval(), tok


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
             batch_size: int = 128, progress: bool = False, description: str = "generate") -> List[str]:
    """Greedy completions of chat-formatted prompts (left-padded batches, sorted by length)."""
    import torch
    from tqdm.auto import tqdm

    from mergekit_safety.engine.data import collate, encode_example

    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    enc = [encode_example(tokenizer, p) for p in prompts]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]["input_ids"]))
    out: List[Optional[str]] = [None] * len(enc)
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), desc=description, disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        b = collate([enc[i] for i in idx], pad_id, padding_side="left")
        with torch.no_grad():
            g = model.generate(
                input_ids=b["input_ids"].to(device),
                attention_mask=b["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new = g[:, b["input_ids"].shape[1]:]
        for i, row in zip(idx, new.tolist()):
            out[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return [o or "" for o in out]
