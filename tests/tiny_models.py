"""Tiny random Llama checkpoints built inside the test session (no downloads).

The aligned base is a random 2-layer Llama with grouped-query attention; each expert is the
base plus a seeded perturbation, so task vectors are non-trivial and distinct.
"""

from __future__ import annotations

import os
from typing import Dict, List

import torch

VOCAB = 64
HIDDEN = 32


def tiny_config(**overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def save_model(path: str, state: Dict[str, torch.Tensor], config) -> str:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    model.save_pretrained(path, safe_serialization=True)
    return path


def build_family(root: str, experts: int = 3, seed: int = 0, scale: float = 0.05, **config_overrides) -> Dict[str, str]:
    """Write base + `experts` expert checkpoints under root; return name -> path."""
    from transformers import LlamaForCausalLM

    config = tiny_config(**config_overrides)
    torch.manual_seed(seed)
    base_model = LlamaForCausalLM(config)
    base_state = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    paths = {"base": save_model(os.path.join(root, "base"), base_state, config)}
    for index in range(experts):
        generator = torch.Generator().manual_seed(seed * 100 + index + 1)
        state = {
            k: v + scale * torch.randn(v.shape, generator=generator) * (v.std() + 1e-3)
            for k, v in base_state.items()
        }
        paths[f"expert{index}"] = save_model(os.path.join(root, f"expert{index}"), state, config)
    return paths


def build_lab_family(root: str, experts: int = 3, **kwargs) -> Dict[str, str]:
    """:func:`build_family` with the lab's vocabulary and its tokenizer saved beside every
    checkpoint, so text data and chat templates work on the tiny models."""
    from mergekit_safety.lab.language import build_tokenizer, vocabulary

    paths = build_family(root, experts=experts, vocab_size=len(vocabulary()), **kwargs)
    tokenizer = build_tokenizer()
    for path in paths.values():
        tokenizer.save_pretrained(path)
    return paths


def load_state(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(path, name)))
    return state


def run_yaml(config_text: str, out_path: str, cwd: str | None = None) -> Dict[str, torch.Tensor]:
    """Run a merge through mergekit's own API, exactly as mergekit-yaml does."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    previous = os.getcwd()
    if cwd:
        os.chdir(cwd)
    try:
        config = MergeConfiguration.model_validate(yaml.safe_load(config_text))
        run_merge(
            config,
            out_path,
            options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True),
        )
    finally:
        os.chdir(previous)
    return load_state(out_path)


def merge_yaml(method: str, paths: Dict[str, str], experts: List[str], parameters: str = "", model_parameters: str = "") -> str:
    models = "\n".join(
        f"  - model: {paths[name]}\n    parameters:\n      weight: {0.5 + 0.25 * i}{model_parameters}"
        for i, name in enumerate(experts)
    )
    text = f"merge_method: {method}\nbase_model: {paths['base']}\ndtype: float32\nmodels:\n{models}\n"
    if parameters:
        text += "parameters:\n" + parameters
    return text
