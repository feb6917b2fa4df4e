"""The SSAH freezing experiment on the lab: fine-tune the aligned model like an expert with and
without the protected units frozen (:mod:`mergekit_safety.methods.ssah.freezing`)."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

from mergekit_safety.methods.ssah.freezing import FrozenUnits, freeze_units, train_only_budget


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

    from mergekit_safety.lab.build import lab_manifest, reserved_prompts, special_ids, training_mix
    from mergekit_safety.lab.evaluate import evaluate_model
    from mergekit_safety.lab.train import TrainConfig, train
    from mergekit_safety.methods.ssah.method import ProtectSettings

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
            from mergekit_safety.methods.ssah.method import load_unit_scores
            from mergekit_safety.methods.ssah.units import unit_mask

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
            train(model, examples, config, special_ids()["pad"], seed=seed, desc=f"finetune ({mode})", progress=progress)
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
