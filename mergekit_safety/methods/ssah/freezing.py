"""Training-time use of an SSAH artifact: freeze the safety-critical units while fine-tuning.

The paper's own use of its unit labels (Li & Kim, arXiv 2410.10862): during benign (or
contaminated) fine-tuning, the protected units — every ESU plus the most safety-relevant CU,
the same set :mod:`mergekit_safety.methods.ssah` keeps at θ_A when merging — receive no update.

    handle = freeze_units(model, "ssah.safetensors")      # protect_share 0.075 by default
    trainer = Trainer(model, args, ..., callbacks=[handle.callback()])
    trainer.train()
    handle.remove()

How entries are kept fixed
--------------------------
* A gradient hook on every unit tensor zeroes the gradient of the frozen rows (q/k/v/gate/up)
  or columns (o/down). With plain SGD/Adam without weight decay that alone keeps them fixed.
* Optimizers with **decoupled weight decay** (AdamW, the transformers default when
  ``weight_decay > 0``) still shrink entries whose gradient is zero, and momentum from steps
  before freezing would still move them. So the handle also keeps a copy of the frozen entries
  and writes it back after every optimizer step: ``handle.callback()`` does it for a
  ``transformers.Trainer`` (``on_step_end``), ``handle.attach(optimizer)`` for a hand-written
  loop (``register_step_post_hook``), ``handle.restore_()`` by hand. Frozen entries are then
  bit-identical through any optimizer.
* PEFT: full weights under a PEFT model (``….base_layer.weight`` if trainable,
  ``modules_to_save``) are found by name. For LoRA factors the unit axis is carried by
  ``lora_B`` (rows of q/k/v/gate/up) and ``lora_A`` (columns of o/down); their frozen entries
  are **set to zero** when freezing starts (a no-op for ``lora_B`` of a fresh adapter) and kept
  there, so the adapter's update ``B·A`` is exactly zero on the protected rows/columns.

The complementary "alignment budget" (:func:`train_only_budget`) trains only the redundant
units (RU): every unit tensor is frozen except the RU rows/columns (K/V heads only when all
their query heads are RU), and every tensor outside the units (embeddings, norms, LM head) is
frozen with ``requires_grad_(False)`` (restored by :meth:`FrozenUnits.remove`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

import torch

from mergekit_safety.methods.ssah.units import UnitLayout, UnitSet, parse_tensor_name, unit_axis

logger = logging.getLogger(__name__)


@dataclass
class _Frozen:
    name: str
    parameter: torch.nn.Parameter
    dim: int
    index: torch.Tensor  # frozen positions along dim
    saved: torch.Tensor


class FrozenUnits:
    """Handle of a freezing: gradient hooks, saved values, parameters switched off."""

    def __init__(self) -> None:
        self.frozen: List[_Frozen] = []
        self._hooks: List[Any] = []
        self._switched_off: List[torch.nn.Parameter] = []
        self._optimizer_hooks: List[Any] = []

    # ---- statistics

    @property
    def frozen_entries(self) -> int:
        return sum(item.saved.numel() for item in self.frozen) + sum(p.numel() for p in self._switched_off)

    def summary(self) -> Dict[str, int]:
        return {
            "tensors_partly_frozen": len(self.frozen),
            "tensors_switched_off": len(self._switched_off),
            "frozen_entries": self.frozen_entries,
        }

    # ---- keeping entries fixed

    @torch.no_grad()
    def restore_(self) -> None:
        """Write the saved values back into the frozen entries (after an optimizer step)."""
        for item in self.frozen:
            item.parameter.data.index_copy_(item.dim, item.index, item.saved.to(item.parameter.dtype))

    def attach(self, optimizer: torch.optim.Optimizer) -> "FrozenUnits":
        """Restore the frozen entries after every ``optimizer.step()``."""
        self._optimizer_hooks.append(optimizer.register_step_post_hook(lambda *_: self.restore_()))
        return self

    def callback(self):
        """A ``transformers.TrainerCallback`` restoring the frozen entries after each step."""
        from transformers import TrainerCallback

        handle = self

        class _RestoreFrozenUnits(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                handle.restore_()
                return control

        return _RestoreFrozenUnits()

    def remove(self) -> None:
        """Remove hooks and switch parameters back on; trained values stay as they are."""
        for hook in self._hooks + self._optimizer_hooks:
            hook.remove()
        for parameter in self._switched_off:
            parameter.requires_grad_(True)
        self._hooks, self._optimizer_hooks, self._switched_off = [], [], []

    def __enter__(self) -> "FrozenUnits":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ---- construction

    def _freeze(self, name: str, parameter: torch.nn.Parameter, dim: int, frozen_axis: torch.Tensor, zero: bool) -> None:
        index = frozen_axis.nonzero().view(-1).to(parameter.device)
        if index.numel() == 0:
            return
        if zero:
            with torch.no_grad():
                parameter.data.index_fill_(dim, index, 0)
        saved = parameter.detach().index_select(dim, index).clone()

        def hook(gradient: torch.Tensor, dim=dim, index=index) -> torch.Tensor:
            return gradient.index_fill(dim, index.to(gradient.device), 0)

        self._hooks.append(parameter.register_hook(hook))
        self.frozen.append(_Frozen(name, parameter, dim, index, saved))


def _model_layout(model: Any, layout: Optional[UnitLayout]) -> UnitLayout:
    if layout is not None:
        return layout
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):
        config = model.get_base_model().config
    if config is None:
        raise ValueError("cannot read the unit layout: the model has no .config; pass layout=")
    return UnitLayout.from_config(config)


def _check_layout(found: UnitLayout, expected: UnitLayout, source: str) -> None:
    if found != expected:
        raise ValueError(
            f"{source}: the artifact's unit layout {expected.to_dict()} does not match the "
            f"model's {found.to_dict()}"
        )


def _resolve_units(model, units, layout, settings):
    """(UnitSet, layout, scores or None) from a UnitSet or an SSAH artifact (path/object)."""
    from mergekit_safety.methods.ssah.method import ProtectSettings, load_unit_scores

    model_layout = _model_layout(model, layout)
    if isinstance(units, UnitSet):
        units.check(model_layout)
        return units, model_layout, None
    scores = load_unit_scores(units)
    _check_layout(model_layout, scores.layout, str(getattr(units, "path", units)))
    settings = settings if settings is not None else ProtectSettings()
    return scores.protected(settings), model_layout, scores


def freeze_units(
    model: torch.nn.Module,
    units: Union[str, os.PathLike, Any, UnitSet],
    *,
    settings: Any = None,
    layout: Optional[UnitLayout] = None,
) -> FrozenUnits:
    """Freeze the protected units of ``model`` during fine-tuning.

    ``units``: an SSAH artifact (path or opened) — the protected set is chosen by ``settings``
    (a :class:`~mergekit_safety.methods.ssah.ProtectSettings`: share, random control, K/V
    policy), exactly as the ``ssah`` merge method chooses it — or a :class:`UnitSet`
    (K/V policy from ``settings``, default ``any``). Returns the handle; use its
    :meth:`~FrozenUnits.callback` with a Trainer or :meth:`~FrozenUnits.attach` with an
    optimizer so weight decay cannot move frozen entries.
    """
    from mergekit_safety.methods.ssah.method import ProtectSettings

    settings = settings if settings is not None else ProtectSettings()
    unit_set, model_layout, _ = _resolve_units(model, units, layout, settings)
    handle = FrozenUnits()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        found = unit_axis(name, parameter.shape, unit_set, model_layout, settings.kv_policy)
        if found is None:
            continue
        dim, axis = found
        role = parse_tensor_name(name)
        handle._freeze(name, parameter, dim, axis, zero=role.part in ("lora_A", "lora_B"))
    logger.info("freezing: %s", handle.summary())
    return handle


def train_only_budget(
    model: torch.nn.Module,
    units: Union[str, os.PathLike, Any, UnitSet],
    *,
    layout: Optional[UnitLayout] = None,
) -> FrozenUnits:
    """Train only the redundant units (the "alignment budget"): the complement of the RU
    rows/columns is frozen, tensors outside the units are switched off (requires_grad False).

    ``units``: an SSAH artifact (its RU label) or a :class:`UnitSet` of trainable units.
    """
    model_layout = _model_layout(model, layout)
    if isinstance(units, UnitSet):
        units.check(model_layout)
        trainable = units
    else:
        from mergekit_safety.methods.ssah.method import load_unit_scores

        scores = load_unit_scores(units)
        _check_layout(model_layout, scores.layout, str(getattr(units, "path", units)))
        trainable = scores.budget()
    handle = FrozenUnits()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        role = parse_tensor_name(name)
        found = unit_axis(name, parameter.shape, trainable, model_layout, "all")
        if found is None:
            if role is not None and role.part in ("lora_A", "lora_B"):
                continue  # shared LoRA factor: its partner carries the unit axis
            parameter.requires_grad_(False)
            handle._switched_off.append(parameter)
            continue
        dim, axis = found
        handle._freeze(name, parameter, dim, ~axis, zero=role.part in ("lora_A", "lora_B"))
    logger.info("alignment budget: %s", handle.summary())
    return handle
