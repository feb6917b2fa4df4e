"""Shared data machinery: JSONL reading, chat-format encoding with response masks, batching,
and content hashes for artifact fingerprints.

Used by the lab (training, evaluation), the calibration engine (Antidote, SSAH statistics) and
SOMF mask training. Import-light: torch is imported only by :func:`collate` / :func:`batches`.

Encoding contract (:func:`encode_example`)
------------------------------------------
* With a chat template, the prompt is rendered as one user turn with the generation prompt
  (``apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)``)
  and prompt + response as a user + assistant conversation. The response tokens are the full
  conversation's tokens after the prompt tokens. If the template does not render the prompt as
  a prefix of the conversation (some templates rewrite earlier turns), the response is encoded
  on its own (``add_special_tokens=False``) and appended, followed by ``eos`` — with a warning.
* Without a chat template: plain concatenation. The prompt is encoded with the tokenizer's
  special tokens (e.g. ``bos``), the response without them, then ``eos`` if the tokenizer has one.
* ``response_mask`` is 1 exactly on response tokens (including the closing ``eos``/end-of-turn
  tokens the template emits), 0 on prompt tokens.
* ``max_length``: the response is kept (right-truncated to ``max_length - 1`` if it alone is
  too long, so at least one prompt token remains) and the prompt is truncated **from the left**
  to fill the rest — the end of the prompt (the generation prompt, the latest words) is what
  conditions the answer. Any truncation emits a :class:`TruncationWarning`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

__all__ = [
    "DataError",
    "TruncationWarning",
    "read_jsonl",
    "read_jsonl_lines",
    "write_jsonl",
    "encode_example",
    "collate",
    "batches",
    "file_hash",
    "file_sha256",
    "records_hash",
]


class DataError(ValueError):
    """A data file is malformed. The message names the file and, where known, the line."""


class TruncationWarning(UserWarning):
    """An example was longer than ``max_length`` and was truncated."""


_TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "list", dict: "object"}


def _type_name(t: Any) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    return _TYPE_NAMES.get(t, getattr(t, "__name__", str(t)))


def read_jsonl(
    path: Union[str, os.PathLike],
    required_keys: Union[Sequence[str], Mapping[str, Any]] = (),
    nonempty: Sequence[str] = (),
) -> List[Dict[str, Any]]:
    """The records of :func:`read_jsonl_lines`, without their line numbers."""
    return [record for _line, record in read_jsonl_lines(path, required_keys, nonempty)]


def read_jsonl_lines(
    path: Union[str, os.PathLike],
    required_keys: Union[Sequence[str], Mapping[str, Any]] = (),
    nonempty: Sequence[str] = (),
) -> List[tuple]:
    """Read a JSON-lines file: one JSON object per line; blank lines are skipped.

    ``required_keys`` is either a sequence of keys whose values must be strings, or a mapping
    ``key -> type`` (or tuple of types) to check. Extra keys are kept. Raises :class:`DataError`
    naming the file and line for a missing file, malformed JSON, a line that is not an object,
    a missing key or a value of the wrong type, a ``nonempty`` key whose string is blank, bytes
    that are not UTF-8, and for a file without any record.
    """
    path = os.fspath(path)
    if isinstance(required_keys, Mapping):
        spec = dict(required_keys)
    else:
        spec = {k: str for k in required_keys}
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    records: List[tuple] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line); save the file as UTF-8") from None
            if lineno == 1 and line.startswith("\ufeff"):
                line = line[1:]  # a byte-order mark
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            for key, typ in spec.items():
                if key not in obj:
                    raise DataError(f"{path}:{lineno}: missing key {key!r}")
                value = obj[key]
                # bool is an int in Python; never accept it for a number/string field.
                bad_bool = isinstance(value, bool) and not (typ is bool or (isinstance(typ, tuple) and bool in typ))
                if bad_bool or not isinstance(value, typ):
                    raise DataError(
                        f"{path}:{lineno}: key {key!r} must be a {_type_name(typ)}, "
                        f"got {type(value).__name__}"
                    )
            for key in nonempty:
                if isinstance(obj.get(key), str) and not obj[key].strip():
                    raise DataError(f"{path}:{lineno}: key {key!r} is empty")
            records.append((lineno, obj))
    if not records:
        raise DataError(f"{path}: empty file (no records)")
    return records


def write_jsonl(path: Union[str, os.PathLike], records: Sequence[Mapping[str, Any]]) -> None:
    """Write records as JSON lines (UTF-8, keys in insertion order), atomically."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _ids(out: Any) -> List[int]:
    """apply_chat_template returns a list (transformers 4) or a BatchEncoding (transformers 5)."""
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):  # batched form
        out = out[0]
    return list(out)


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_example(
    tokenizer: Any,
    prompt: str,
    response: Optional[str] = None,
    max_length: Optional[int] = None,
) -> Dict[str, List[int]]:
    """Encode one (prompt, response) pair; see the module docstring for the exact contract.

    Returns ``{"input_ids": [...], "response_mask": [...]}`` (equal lengths; the mask is all
    zeros when ``response`` is None).
    """
    user = [{"role": "user", "content": prompt}]
    if _has_chat_template(tokenizer):
        p_ids = _ids(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True))
        if response is None:
            r_ids: List[int] = []
        else:
            conv = user + [{"role": "assistant", "content": response}]
            full = _ids(tokenizer.apply_chat_template(conv, tokenize=True))
            if full[: len(p_ids)] == p_ids and len(full) > len(p_ids):
                r_ids = full[len(p_ids):]
            else:
                warnings.warn(
                    "the chat template does not render the prompt as a prefix of the "
                    "conversation; appending the separately encoded response",
                    stacklevel=2,
                )
                r_ids = _ids(tokenizer(response, add_special_tokens=False))
                if tokenizer.eos_token_id is not None:
                    r_ids.append(tokenizer.eos_token_id)
    else:
        p_ids = _ids(tokenizer(prompt))
        if response is None:
            r_ids = []
        else:
            r_ids = _ids(tokenizer(" " + response if not response.startswith(" ") else response,
                                   add_special_tokens=False))
            if tokenizer.eos_token_id is not None:
                r_ids.append(tokenizer.eos_token_id)

    if max_length is not None and len(p_ids) + len(r_ids) > max_length:
        if max_length < 2 and r_ids:
            raise ValueError("max_length must be >= 2 to keep a prompt token and a response token")
        if len(r_ids) > max_length - 1 and r_ids:
            r_ids = r_ids[: max_length - 1]
        keep = max_length - len(r_ids)
        warnings.warn(
            f"example of {len(p_ids) + len(r_ids)} tokens truncated to max_length={max_length}: "
            f"prompt cut from the left to its last {keep} tokens",
            TruncationWarning,
            stacklevel=2,
        )
        p_ids = p_ids[len(p_ids) - keep:]
    return {"input_ids": p_ids + r_ids, "response_mask": [0] * len(p_ids) + [1] * len(r_ids)}


def collate(encoded: Sequence[Mapping[str, Sequence[int]]], pad_id: int, padding_side: str = "right"):
    """Pad encoded examples into tensors.

    Returns ``{"input_ids", "attention_mask", "response_mask"}``, each a ``LongTensor[B, T]``
    with ``T`` the longest example. Padding positions have attention and response mask 0.
    """
    import torch

    if not encoded:
        raise ValueError("collate needs at least one example")
    if padding_side not in ("right", "left"):
        raise ValueError("padding_side must be 'right' or 'left'")
    t = max(len(e["input_ids"]) for e in encoded)
    n = len(encoded)
    ids = torch.full((n, t), int(pad_id), dtype=torch.long)
    att = torch.zeros((n, t), dtype=torch.long)
    resp = torch.zeros((n, t), dtype=torch.long)
    for i, e in enumerate(encoded):
        k = len(e["input_ids"])
        sl = slice(0, k) if padding_side == "right" else slice(t - k, t)
        ids[i, sl] = torch.tensor(e["input_ids"], dtype=torch.long)
        att[i, sl] = 1
        rm = e.get("response_mask")
        if rm is not None:
            if len(rm) != k:
                raise ValueError(f"example {i}: response_mask length {len(rm)} != input length {k}")
            resp[i, sl] = torch.tensor(rm, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": att, "response_mask": resp}


def batches(
    encoded: Sequence[Mapping[str, Sequence[int]]],
    batch_size: int,
    pad_id: int,
    padding_side: str = "right",
) -> Iterator[Dict[str, Any]]:
    """Yield :func:`collate`-d batches of ``batch_size`` in order (the last may be smaller).

    Right padding (the default) is what training and activation statistics want; use
    ``padding_side="left"`` for batched generation.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    for start in range(0, len(encoded), batch_size):
        yield collate(encoded[start:start + batch_size], pad_id, padding_side)


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """SHA-256 (hex) of a file's exact bytes (wheels, data files recorded in artifacts)."""
    h = hashlib.sha256()
    with open(os.fspath(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hash(path: Union[str, os.PathLike]) -> str:
    """SHA-256 (hex) of a file's bytes, with CRLF line ends read as LF.

    Stable across runs and machines; changes whenever the content changes. Use it in artifact
    fingerprints so an artifact computed from other data is never silently reused.
    """
    h = hashlib.sha256()
    carry = b""
    with open(os.fspath(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            chunk = carry + chunk
            carry = b"\r" if chunk.endswith(b"\r") else b""  # a CRLF may span two chunks
            if carry:
                chunk = chunk[:-1]
            h.update(chunk.replace(b"\r\n", b"\n"))
    h.update(carry)
    return h.hexdigest()


def records_hash(records: Sequence[Mapping[str, Any]]) -> str:
    """SHA-256 (hex) of records as canonical JSON (sorted keys): independent of formatting."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()
