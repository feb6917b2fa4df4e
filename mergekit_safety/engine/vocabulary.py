"""Vocabulary alignment: experts whose embeddings have more (or other) rows than the base's.

Community fine-tunes often add tokens (chat markers, padding to a multiple of 64), so an
expert's ``embed_tokens``/``lm_head`` can have more rows than the aligned base model's. mergekit
aligns them itself when it merges (``tokenizer_source``); the locate steps of this package read
checkpoints directly, so they align them the same way: every vocabulary tensor of an expert is
re-indexed to the **base model's vocabulary** — row ``i`` is the expert's row of the base's token
``i`` (matched by token string), or the base's own row where the expert lacks that token (a zero
task vector). Artifacts are therefore always in the base vocabulary; at merge time a re-aligned
output vocabulary is mapped back to it (:mod:`mergekit_safety.plugin.adapter`).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, Optional

import torch

from mergekit_safety.engine.checkpoint import Checkpoint, CheckpointError

logger = logging.getLogger(__name__)

VOCABULARY_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_out.weight")


def is_vocabulary_tensor(name: str) -> bool:
    return name.endswith(VOCABULARY_SUFFIXES)


def load_vocabulary(model_dir: str) -> Optional[Dict[str, int]]:
    """Token → id of a model folder's tokenizer (None if it has none)."""
    path = os.path.join(model_dir, "tokenizer.json")
    if os.path.isfile(path):  # fast path: no tokenizer object needed
        with open(path, "r", encoding="utf-8") as handle:
            data = json.load(handle)
        vocab = dict((data.get("model") or {}).get("vocab") or {})
        if isinstance(vocab, dict) and vocab:
            for token in data.get("added_tokens") or []:
                vocab[token["content"]] = token["id"]
            return vocab
    try:
        from transformers import AutoTokenizer

        return dict(AutoTokenizer.from_pretrained(model_dir).get_vocab())
    except Exception:  # noqa: BLE001 - no usable tokenizer
        return None


def row_map(target: Dict[str, int], source: Dict[str, int], target_rows: int, source_rows: int) -> torch.Tensor:
    """For each target row, the source row of the same token (-1: the source lacks it)."""
    rows = torch.full((target_rows,), -1, dtype=torch.long)
    for token, index in target.items():
        found = source.get(token)
        if index < target_rows and found is not None and found < source_rows:
            rows[index] = found
    return rows


class AlignedCheckpoint:
    """An expert's checkpoint whose vocabulary tensors are re-indexed to the base's vocabulary
    (everything else is passed through)."""

    def __init__(self, expert: Checkpoint, base: Checkpoint):
        self.expert = expert
        self.base = base
        self._rows: Optional[torch.Tensor] = None
        self.directory = expert.directory
        self.aliases = expert.aliases
        self.weight_map = expert.weight_map

    def __getattr__(self, name):  # names, names_in, files, dtype_name, describe, release, ...
        return getattr(self.expert, name)

    def has(self, name: str) -> bool:
        return self.expert.has(name)

    def _needs_alignment(self, name: str) -> bool:
        if not is_vocabulary_tensor(name) or (not self.base.has(name) and name not in self.base.aliases):
            return False
        return self.expert.shape(name)[0] != self.base.shape(name)[0]

    def rows(self, name: str) -> torch.Tensor:
        if self._rows is None:
            base_rows, expert_rows = self.base.shape(name)[0], self.expert.shape(name)[0]
            target, source = load_vocabulary(self.base.directory), load_vocabulary(self.expert.directory)
            if target is not None and source is not None:
                self._rows = row_map(target, source, base_rows, expert_rows)
                missing = int((self._rows < 0).sum())
                if missing:
                    logger.warning("%s lacks %d token(s) of the base vocabulary: their rows keep the base's",
                                   self.expert.directory, missing)
            elif expert_rows > base_rows:
                logger.warning("%s: no tokenizer to align its %d vocabulary rows to the base's %d: "
                               "assuming the extra tokens were appended", self.expert.directory, expert_rows, base_rows)
                self._rows = torch.arange(base_rows)
            else:
                raise CheckpointError(
                    f"{self.expert.directory}: tensor {name} has {expert_rows} vocabulary rows, the base "
                    f"model {base_rows}, and no tokenizer says which token is which"
                )
        return self._rows

    def shape(self, name: str):
        if self._needs_alignment(name):
            return (self.base.shape(name)[0], *self.expert.shape(name)[1:])
        return self.expert.shape(name)

    def get(self, name: str) -> torch.Tensor:
        tensor = self.expert.get(name)
        if not self._needs_alignment(name):
            return tensor
        rows = self.rows(name)
        out = self.base.get(name).to(tensor.dtype).clone()
        present = rows >= 0
        out[present] = tensor[rows[present]]
        return out

    def get_rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        if not self._needs_alignment(name):
            return self.expert.get_rows(name, index)
        return self.get(name)[index]


def aligned(expert: Checkpoint, base: Checkpoint):
    """``expert`` as read against ``base``: aligned where any vocabulary tensor differs."""
    for name in base.names():
        if is_vocabulary_tensor(name) and expert.has(name) and expert.shape(name)[0] != base.shape(name)[0]:
            return AlignedCheckpoint(expert, base)
    return expert
