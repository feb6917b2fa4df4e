"""Tokenizer loading and the padding id, shared by calibration, SOMF training and evaluation."""

from __future__ import annotations

from typing import Any, Optional, Sequence


class TokenizerError(ValueError):
    """No usable tokenizer for a model (the message names the folders tried)."""


def load_tokenizer(path: str, fallbacks: Sequence[str] = ()):
    """The tokenizer of the model at ``path``, else of the first of ``fallbacks`` that has one
    (e.g. the adapter and base folders of a ``base+adapter`` reference)."""
    from transformers import AutoTokenizer

    errors = []
    for candidate in (path, *fallbacks):
        try:
            return AutoTokenizer.from_pretrained(candidate)
        except Exception as error:  # transformers raises many types here
            errors.append(f"{candidate}: {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}")
    raise TokenizerError("no usable tokenizer (" + "; ".join(errors) + ")")


def tokenizer_folders(model: Any, directory: str) -> list:
    """Folders that may hold the tokenizer of a model reference: its directory, then for a
    ``base+adapter`` reference (merged into a cache folder without tokenizer files) the
    adapter's and the base's folders."""
    text = str(model)
    if "+" not in text:
        return [directory]
    return [directory] + [part.split("@")[0] for part in reversed(text.split("+"))]


def pad_id(tokenizer: Any, config: Optional[Any] = None) -> int:
    """The id to pad batches with: the tokenizer's or config's pad id, else eos, else 0."""
    for value in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(config, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        getattr(config, "eos_token_id", None),
    ):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0
