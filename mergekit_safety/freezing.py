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

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

import torch

from mergekit_safety.units import UnitLayout, UnitSet, parse_tensor_name, unit_axis

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
    from mergekit_safety.methods.ssah import ProtectSettings, load_unit_scores

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
    from mergekit_safety.methods.ssah import ProtectSettings

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
        from mergekit_safety.methods.ssah import load_unit_scores

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


# --------------------------------------------------------------------------- lab experiment


def lab_freezing_experiment(
    lab_dir: str,
    artifact: str,
    *,
    skill: Optional[str] = None,
    harmful_ratio: Optional[float] = None,
    steps: int = 200,
    lr: Optional[float] = None,
    batch_size: int = 64,
    modes: tuple = ("plain", "ssah", "random"),
    settings: Any = None,
    seed: int = 0,
    eval_limit: Optional[int] = None,
    progress: bool = True,
) -> Dict[str, Dict[str, Any]]:
    """Fine-tune the lab's aligned model like an expert (skill + replay + harmful compliance,
    the lab's own expert mix) with and without freezing, and evaluate each result.

    ``modes``: ``plain`` (no freezing), ``ssah`` (protected units of ``artifact`` frozen),
    ``random`` (a seeded random unit set of equal size frozen), ``budget`` (only the redundant
    units trained), ``mask_after`` (the ``plain`` result with the protected units reset to the
    aligned model afterwards — the merge-time form; needs ``plain`` earlier in ``modes``). The lab trainer's AdamW runs with the lab's weight decay (0); frozen
    entries are additionally restored after training and checked bit-identical.
    Returns ``{mode: evaluation metrics (+ "frozen_entries")}``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_safety.lab.build import _special_ids, lab_manifest, reserved_prompts, training_mix
    from mergekit_safety.lab.evaluate import evaluate_model
    from mergekit_safety.lab.train import TrainConfig, train
    from mergekit_safety.methods.ssah import ProtectSettings

    manifest = lab_manifest(lab_dir)
    if manifest is None or not manifest.get("complete"):
        raise ValueError(f"{lab_dir}: not a complete lab (run `mergekit-safety lab --out {lab_dir}`)")
    recipe = json.loads(json.dumps(manifest["recipe"]))
    skill = skill or recipe["expert_skills"][0]
    if harmful_ratio is not None:
        recipe["expert_mix"]["harmful"] = harmful_ratio
    recipe["expert"]["steps"] = steps
    data_dir = os.path.join(lab_dir, "data")
    examples = training_mix("expert", recipe, reserved_prompts(data_dir), skill)
    config = TrainConfig(**{**recipe["expert"], "steps": steps, "batch_size": batch_size,
                            **({"lr": lr} if lr is not None else {})})
    settings = settings if settings is not None else ProtectSettings()
    aligned = os.path.join(lab_dir, "aligned")
    tokenizer = AutoTokenizer.from_pretrained(aligned)
    results: Dict[str, Dict[str, Any]] = {}
    plain_state = None
    for mode in modes:
        model = AutoModelForCausalLM.from_pretrained(aligned, dtype=torch.float32)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        moved = 0
        if mode == "mask_after":
            # Wei et al.'s "rewind": train without freezing, then reset the protected units to
            # the aligned model (the merge-time form applied to one fine-tune)
            if plain_state is None:
                raise ValueError("mode 'mask_after' needs mode 'plain' before it")
            from mergekit_safety.methods.ssah import load_unit_scores
            from mergekit_safety.units import unit_mask

            scores = load_unit_scores(artifact)
            units = scores.protected(settings.model_copy(update={"control": "none"}))
            frozen = 0
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    trained = plain_state[name]
                    mask = unit_mask(name, parameter.shape, units, scores.layout, settings.kv_policy)
                    parameter.copy_(trained if mask is None else torch.where(mask, before[name], trained))
                    frozen += 0 if mask is None else int(mask.sum())
        else:
            if mode == "plain":
                handle = FrozenUnits()
            elif mode in ("ssah", "random"):
                chosen = settings.model_copy(update={"control": "none" if mode == "ssah" else "random"})
                handle = freeze_units(model, artifact, settings=chosen)
            elif mode == "budget":
                handle = train_only_budget(model, artifact)
            else:
                raise ValueError(f"unknown mode {mode!r} (plain, ssah, random, budget, mask_after)")
            train(model, examples, config, _special_ids()["pad"], seed=seed, desc=f"finetune ({mode})", progress=progress)
            # with the lab trainer's weight decay 0, gradient hooks alone keep frozen entries
            # fixed; record it, then restore (a no-op unless weight decay moved them)
            moved = sum(
                int((item.parameter.detach().index_select(item.dim, item.index)
                     != before[item.name].index_select(item.dim, item.index).to(item.parameter.device)).sum())
                for item in handle.frozen
            )
            handle.restore_()
            frozen = handle.frozen_entries
            handle.remove()
            if mode == "plain":
                plain_state = {n: p.detach().clone() for n, p in model.named_parameters()}
        metrics = evaluate_model(None, data_dir=data_dir, model=model.eval(), tokenizer=tokenizer, limit=eval_limit)
        metrics.pop("samples", None)
        metrics["frozen_entries"] = frozen
        metrics["frozen_moved_before_restore"] = moved
        metrics["trained_skill"] = skill
        results[mode] = metrics
    return results
