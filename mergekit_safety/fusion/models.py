"""Model references → local folders, and the package's cache folder.

A model reference is what a merge YAML names: a local directory, or ``base+adapter`` (a LoRA
adapter applied to a base model). This package never downloads models. ``base+adapter``
references are merged once into a cache folder with mergekit's own LoRA code (the way
``mergekit-yaml`` itself loads them), so the locate step sees the same weights as the merge.
"""

from __future__ import annotations

import os
from typing import Any


def cache_folder() -> str:
    """``MERGEKIT_SAFETY_CACHE``, default ``~/.cache/mergekit-safety``."""
    return os.environ.get(
        "MERGEKIT_SAFETY_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mergekit-safety")
    )


def local_directory(reference: Any) -> str:
    """The local directory part of a model reference (``path[@revision][+adapter]``)."""
    return str(reference or "").split("+")[0].split("@")[0]


def resolve_model(model: Any) -> str:
    """Local directory of a model reference; ``base+adapter`` references are merged once
    into the cache's ``lora-merged`` folder with mergekit's LoRA code."""
    from mergekit_safety.fusion.artifacts import ArtifactError

    text = str(model)
    if "+" not in text:
        path = text.split("@")[0]
        if not os.path.isdir(path):
            raise ArtifactError(
                f"model {text!r} is not a local directory; mergekit-safety never downloads "
                "models: download it first and use the local path"
            )
        return path
    from mergekit.common import ModelReference

    reference = model if not isinstance(model, str) else ModelReference.parse(model)
    cache = os.path.join(cache_folder(), "lora-merged")
    os.makedirs(cache, exist_ok=True)
    return reference.merged(cache_dir=cache).model.path
