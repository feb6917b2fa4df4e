"""Structured units of a decoder (attention heads, MLP neurons) and their expansion to tensors.

A **unit** is a group of weight rows and columns that together compute one thing (SSAH,
Li & Kim, arXiv 2410.10862):

* MLP neuron ``j`` of layer ``l``: row ``j`` of ``gate_proj`` and ``up_proj`` and column ``j``
  of ``down_proj``;
* attention head ``h`` of layer ``l``: rows ``h·d … (h+1)·d`` of ``q_proj`` (``d`` = head
  dimension), the same columns of ``o_proj``, and — see below — rows of ``k_proj``/``v_proj``.

Grouped-query attention (decision)
----------------------------------
With ``H`` query heads and ``G < H`` key/value heads, K/V head ``g`` serves the query heads
``g·H/G … (g+1)·H/G − 1``. A query head is its q rows + o columns; its K/V rows are shared,
so whether a set of heads "touches" a K/V head is a policy (``kv_policy``):

* ``any`` (default for protection): a K/V head's rows belong to the set when **any** of its
  query heads does. A protected head then computes exactly what it computed before (its
  attention pattern needs its keys, its output needs its values); the price is that the
  unprotected query heads of the same group also keep their K/V, so the protected parameter
  share grows by up to ``H/G`` K/V blocks per protected head.
* ``all``: only when **all** its query heads are in the set (used for the trainable
  "alignment budget", so a K/V head is trained only when no head that reads it is frozen).
* ``none``: K/V rows never belong to a set (protects q/o only; a protected head's attention
  pattern can still drift through its keys).

Unit sets are boolean tensors ``heads[L, H]`` and ``neurons[L, I]`` (:class:`UnitSet`);
:func:`unit_mask` turns one into the exact mask of one tensor. Tensor names follow the
Llama/Mistral/Qwen2 convention (``…layers.<l>.self_attn.q_proj.weight``,
``…layers.<l>.mlp.down_proj.weight``); the PEFT forms of the same modules
(``….q_proj.base_layer.weight``, ``….modules_to_save.<name>.weight``,
``….lora_A.<name>.weight``, ``….lora_B.<name>.weight``) are recognised too. Biases of
q/k/v/gate/up follow their rows; biases of o/down (per output feature) belong to no unit.
Tensors outside the units (embeddings, norms, the LM head) are never part of a set.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import torch

from mergekit_safety.methods.ssah.config import KV_POLICIES  # noqa: E402

#: projections whose output rows belong to units, and those whose input columns do
ROW_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
COLUMN_PROJECTIONS = ("o_proj", "down_proj")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

_NAME = re.compile(
    r"(?:^|\.)layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\."
    r"(?P<proj>q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.(?P<tail>.+)$"
)


class UnitError(ValueError):
    """A tensor or model does not match the unit layout (names the tensor and shapes)."""


@dataclass(frozen=True)
class UnitLayout:
    """Shape of a Llama-style decoder as far as units are concerned."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    hidden_size: int

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if int(value) <= 0:
                raise UnitError(f"unit layout: {name} must be positive, got {value}")
        if self.num_heads % self.num_kv_heads:
            raise UnitError(
                f"unit layout: {self.num_heads} attention heads are not a multiple of "
                f"{self.num_kv_heads} key/value heads"
            )

    # ---- construction

    @classmethod
    def from_config(cls, config: Any) -> "UnitLayout":
        """From a transformers config object or its dict (config.json)."""
        values = config if isinstance(config, Mapping) else config.to_dict()
        values = dict(values.get("text_config") or {}, **values) if "num_hidden_layers" not in values else values
        try:
            heads = int(values["num_attention_heads"])
            hidden = int(values["hidden_size"])
            kv = values.get("num_key_value_heads") or heads
            head_dim = values.get("head_dim") or hidden // heads
            return cls(
                num_layers=int(values["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(kv),
                head_dim=int(head_dim),
                intermediate_size=int(values["intermediate_size"]),
                hidden_size=hidden,
            )
        except KeyError as error:
            raise UnitError(f"model config has no {error.args[0]!r}: not a Llama-style decoder") from None

    @classmethod
    def from_model_dir(cls, path: str) -> "UnitLayout":
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise UnitError(f"{path}: no config.json to read the unit layout from")
        with open(config_path, "r", encoding="utf-8") as handle:
            return cls.from_config(json.load(handle))

    def to_dict(self) -> Dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "UnitLayout":
        return cls(**{k: int(values[k]) for k in cls.__dataclass_fields__})

    # ---- counts

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    @property
    def units_per_layer(self) -> int:
        return self.num_heads + self.intermediate_size

    @property
    def total_units(self) -> int:
        return self.num_layers * self.units_per_layer

    def expected_shape(self, proj: str, part: str) -> Optional[Tuple[Optional[int], ...]]:
        """Shape of a weight/bias (None = any size on that axis; LoRA rank)."""
        q, kv, hidden, inter = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.hidden_size,
            self.intermediate_size,
        )
        out_in = {
            "q_proj": (q, hidden),
            "k_proj": (kv, hidden),
            "v_proj": (kv, hidden),
            "o_proj": (hidden, q),
            "gate_proj": (inter, hidden),
            "up_proj": (inter, hidden),
            "down_proj": (hidden, inter),
        }[proj]
        if part == "weight":
            return out_in
        if part == "bias":
            return (out_in[0],)
        if part == "lora_A":
            return (None, out_in[1])
        if part == "lora_B":
            return (out_in[0], None)
        return None


@dataclass(frozen=True)
class TensorRole:
    layer: int
    proj: str
    part: str  # weight | bias | lora_A | lora_B


def parse_tensor_name(name: str) -> Optional[TensorRole]:
    """The unit role of a tensor name, or None when the tensor belongs to no unit."""
    match = _NAME.search(name)
    if match is None:
        return None
    tail = match.group("tail")
    parts = tail.split(".")
    if parts[-1] not in ("weight", "bias"):
        return None
    if parts[0] in ("lora_A", "lora_B"):
        if parts[-1] != "weight":
            return None
        part = parts[0]
    elif len(parts) == 1 or parts[0] in ("base_layer", "modules_to_save", "original_module"):
        part = parts[-1]
    else:  # e.g. lora_magnitude_vector (DoRA), lora_embedding_*: not handled
        return None
    return TensorRole(int(match.group("layer")), match.group("proj"), part)


@dataclass
class UnitSet:
    """A set of units: ``heads[L, H]`` and ``neurons[L, I]`` booleans."""

    heads: torch.Tensor
    neurons: torch.Tensor

    @classmethod
    def empty(cls, layout: UnitLayout) -> "UnitSet":
        return cls(
            torch.zeros(layout.num_layers, layout.num_heads, dtype=torch.bool),
            torch.zeros(layout.num_layers, layout.intermediate_size, dtype=torch.bool),
        )

    @classmethod
    def from_flat(cls, layout: UnitLayout, flat: torch.Tensor) -> "UnitSet":
        """From a flat vector in :func:`flatten` order (all heads, then all neurons)."""
        heads, neurons = split_flat(layout, flat)
        return cls(heads.bool(), neurons.bool())

    def flat(self) -> torch.Tensor:
        return torch.cat([self.heads.reshape(-1), self.neurons.reshape(-1)])

    def count(self) -> int:
        return int(self.heads.sum()) + int(self.neurons.sum())

    def complement(self) -> "UnitSet":
        return UnitSet(~self.heads, ~self.neurons)

    def check(self, layout: UnitLayout) -> None:
        want = ((layout.num_layers, layout.num_heads), (layout.num_layers, layout.intermediate_size))
        got = (tuple(self.heads.shape), tuple(self.neurons.shape))
        if got != want:
            raise UnitError(f"unit set of shapes {got} does not match the layout {want}")

    def kv_heads(self, layout: UnitLayout, kv_policy: str) -> torch.Tensor:
        """``[L, G]``: which key/value heads belong to the set under ``kv_policy``."""
        if kv_policy not in KV_POLICIES:
            raise UnitError(f"kv_policy must be one of {KV_POLICIES}, got {kv_policy!r}")
        grouped = self.heads.view(layout.num_layers, layout.num_kv_heads, layout.group_size)
        if kv_policy == "any":
            return grouped.any(dim=-1)
        if kv_policy == "all":
            return grouped.all(dim=-1)
        return torch.zeros(layout.num_layers, layout.num_kv_heads, dtype=torch.bool)


def flatten(heads: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
    """One vector over all units: every layer's heads, then every layer's neurons."""
    return torch.cat([heads.reshape(-1), neurons.reshape(-1)])


def split_flat(layout: UnitLayout, flat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    count = layout.num_layers * layout.num_heads
    if flat.numel() != layout.total_units:
        raise UnitError(f"flat unit vector has {flat.numel()} entries, layout has {layout.total_units} units")
    return (
        flat[:count].view(layout.num_layers, layout.num_heads),
        flat[count:].view(layout.num_layers, layout.intermediate_size),
    )


def _axis_mask(units: UnitSet, layout: UnitLayout, role: TensorRole, kv_policy: str) -> Optional[torch.Tensor]:
    """Boolean mask over the unit axis of one projection (rows or columns), or None."""
    layer = role.layer
    if layer >= layout.num_layers:
        raise UnitError(f"layer {layer} beyond the layout's {layout.num_layers} layers")
    if role.proj in ("q_proj", "o_proj"):
        return units.heads[layer].repeat_interleave(layout.head_dim)
    if role.proj in ("k_proj", "v_proj"):
        return units.kv_heads(layout, kv_policy)[layer].repeat_interleave(layout.head_dim)
    return units.neurons[layer]


def unit_axis(
    name: str,
    shape: Iterable[int],
    units: UnitSet,
    layout: UnitLayout,
    kv_policy: str = "any",
) -> Optional[Tuple[int, torch.Tensor]]:
    """``(dim, selected)``: the unit axis of tensor ``name`` (0 = rows of q/k/v/gate/up and
    their biases, 1 = columns of o/down) and a boolean over that axis, True where the entry
    belongs to ``units``. None when the tensor belongs to no unit (embeddings, norms, LM head,
    o/down biases, LoRA factors that carry no unit axis).

    Raises :class:`UnitError` naming the tensor when its shape does not match the layout.
    """
    role = parse_tensor_name(name)
    shape = tuple(int(s) for s in shape)
    if role is None:
        return None
    expected = layout.expected_shape(role.proj, role.part)
    if expected is None:
        return None
    if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
        raise UnitError(
            f"tensor {name} has shape {list(shape)} but the unit layout {layout.to_dict()} "
            f"expects {[('r' if e is None else e) for e in expected]}"
        )
    rows = role.proj in ROW_PROJECTIONS
    if role.part == "bias" and not rows:
        return None
    if (role.part == "lora_A" and rows) or (role.part == "lora_B" and not rows):
        return None  # this factor is shared by every row/column of the unit axis
    axis = _axis_mask(units, layout, role, kv_policy)
    if role.part == "bias" or rows:  # bias [out], weight [out, in], lora_B [out, r]
        return 0, axis.clone()
    return 1, axis.clone()  # weight [out, in] or lora_A [r, in]


def unit_mask(
    name: str,
    shape: Iterable[int],
    units: UnitSet,
    layout: UnitLayout,
    kv_policy: str = "any",
) -> Optional[torch.Tensor]:
    """Boolean mask of ``shape``: True on the entries of tensor ``name`` that belong to
    ``units`` (rows of q/k/v/gate/up, columns of o/down); None as in :func:`unit_axis`."""
    shape = tuple(int(s) for s in shape)
    found = unit_axis(name, shape, units, layout, kv_policy)
    if found is None:
        return None
    dim, axis = found
    if len(shape) == 1:
        return axis
    view = (-1, 1) if dim == 0 else (1, -1)
    return axis.view(view).expand(shape).clone()


def unit_parameter_count(units: UnitSet, layout: UnitLayout, kv_policy: str = "any") -> int:
    """Number of weight entries (no biases) a unit set covers across all unit tensors."""
    hidden, d = layout.hidden_size, layout.head_dim
    heads = int(units.heads.sum()) * 2 * d * hidden  # q rows + o columns
    kv = int(units.kv_heads(layout, kv_policy).sum()) * 2 * d * hidden  # k + v rows
    neurons = int(units.neurons.sum()) * 3 * hidden  # gate row + up row + down column
    return heads + kv + neurons


def layout_parameter_count(layout: UnitLayout) -> int:
    """Weight entries of all unit tensors (q, k, v, o, gate, up, down) of all layers."""
    hidden, d = layout.hidden_size, layout.head_dim
    per_layer = (2 * layout.num_heads + 2 * layout.num_kv_heads) * d * hidden + 3 * layout.intermediate_size * hidden
    return layout.num_layers * per_layer


def random_like(units: UnitSet, seed: int, exclude: Optional[UnitSet] = None) -> UnitSet:
    """A random unit set with as many heads and as many neurons as ``units`` (drawn uniformly
    over all layers, seeded). ``exclude`` units are never drawn (e.g. to make a disjoint
    control); the counts must fit in what remains."""
    generator = torch.Generator().manual_seed(int(seed))

    def draw(selected: torch.Tensor, excluded: Optional[torch.Tensor]) -> torch.Tensor:
        count = int(selected.sum())
        allowed = torch.ones(selected.numel(), dtype=torch.bool)
        if excluded is not None:
            allowed &= ~excluded.reshape(-1)
        candidates = allowed.nonzero().view(-1)
        if count > candidates.numel():
            raise UnitError(f"cannot draw {count} random units from {candidates.numel()} candidates")
        chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:count]]
        out = torch.zeros(selected.numel(), dtype=torch.bool)
        out[chosen] = True
        return out.view(selected.shape)

    return UnitSet(
        draw(units.heads, None if exclude is None else exclude.heads),
        draw(units.neurons, None if exclude is None else exclude.neurons),
    )
