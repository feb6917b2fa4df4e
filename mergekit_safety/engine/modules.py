"""The ``modules`` parameter: which weights a method works on — one grammar for every method.

A comma-separated list of tokens; each is a preset or a regular expression searched in the
checkpoint tensor name (``model.layers.0.self_attn.q_proj.weight``):

* ``linear`` — the weights of every ``nn.Linear`` the method can handle;
* ``attention`` / ``mlp`` — 2-D weights inside attention / MLP blocks;
* ``all`` (or ``*``) — every candidate tensor of the method;
* anything else — a regular expression, e.g. ``q_proj|v_proj`` or ``mlp\\.down_proj``.

Each method decides its candidates (SOMF: every floating tensor; Antidote: the Linear weights
of the decoder layers, the ones it can calibrate); ``modules`` narrows them.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, List, Mapping, Sequence

PRESETS = ("attention", "mlp", "linear", "all")
DEFAULT = "linear"

_ATTENTION = re.compile(r"(self_attn|attention|attn)\.")
_MLP = re.compile(r"(mlp|feed_forward|ffn)\.")


class ModuleSelectionError(ValueError):
    """A ``modules`` value selects nothing or is not valid (the message names the token)."""


def tokens_of(spec: str) -> List[str]:
    tokens = [t.strip() for t in str(spec if spec is not None else "").split(",") if t.strip()]
    return tokens or [DEFAULT]


def validate(spec: str) -> None:
    """Raise on a token that is neither a preset nor a valid regular expression."""
    for token in tokens_of(spec):
        if token in PRESETS or token == "*":
            continue
        try:
            re.compile(token)
        except re.error as error:
            raise ModuleSelectionError(
                f"`modules` entry {token!r} is neither a preset {PRESETS} nor a valid regex ({error})"
            ) from None


def select(
    names: Iterable[str],
    spec: str,
    *,
    is_linear: Callable[[str], bool],
    shapes: Mapping[str, Sequence[int]],
    owner: str = "",
) -> List[str]:
    """The names among ``names`` selected by ``spec`` (sorted); every token must match."""
    names = list(names)
    prefix = f"{owner}: " if owner else ""
    chosen = set()
    for token in tokens_of(spec):
        if token in ("all", "*"):
            hits = set(names)
        elif token == "linear":
            hits = {n for n in names if is_linear(n)}
        elif token in ("attention", "mlp"):
            pattern = _ATTENTION if token == "attention" else _MLP
            hits = {n for n in names if pattern.search(n) and n.endswith(".weight") and len(shapes[n]) == 2}
        else:
            try:
                pattern = re.compile(token)
            except re.error as error:
                raise ModuleSelectionError(
                    f"{prefix}`modules` entry {token!r} is neither a preset {PRESETS} nor a valid regex ({error})"
                ) from None
            hits = {n for n in names if pattern.search(n)}
        if not hits:
            raise ModuleSelectionError(f"{prefix}`modules` entry {token!r} matches no tensor of the model")
        chosen |= hits
    return sorted(chosen)
