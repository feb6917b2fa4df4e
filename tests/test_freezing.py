"""Training-time freezing of SSAH units: frozen entries stay bit-identical through optimizers."""

from __future__ import annotations

import pytest
import torch

from tiny_models import build_family, tiny_config

from mergekit_safety.freezing import freeze_units, train_only_budget
from mergekit_safety.methods.ssah.method import ProtectSettings, UnitScores, write_scores_artifact
from mergekit_safety.methods.ssah.units import UnitLayout, UnitSet, unit_mask

LAYOUT = UnitLayout(2, 4, 2, 8, 64, 32)


def _model(seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config())


def _units():
    units = UnitSet.empty(LAYOUT)
    units.heads[0, 1] = True
    units.heads[1, 2] = units.heads[1, 3] = True
    units.neurons[0, [3, 9, 40]] = True
    units.neurons[1, 0] = True
    return units


def _masks(model, units, kv_policy="any"):
    masks = {}
    for name, parameter in model.named_parameters():
        mask = unit_mask(name, parameter.shape, units, LAYOUT, kv_policy)
        if mask is not None:
            masks[name] = mask
    return masks


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _train(model, steps=5, optimizer=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        ids = torch.randint(0, 64, (4, 12), generator=generator)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def _check_frozen(before, after, masks):
    moved = 0
    for name, mask in masks.items():
        assert torch.equal(after[name][mask], before[name][mask]), name  # bit-identical
        moved += int((after[name][~mask] != before[name][~mask]).any())
    assert moved >= 5  # the rest of the unit tensors did train


@pytest.mark.parametrize("optimizer_name", ["adamw", "sgd_momentum", "adam"])
def test_frozen_entries_are_bit_identical_through_optimizer_steps(optimizer_name):
    model = _model()
    units = _units()
    # momentum from steps *before* freezing must not move frozen entries either
    factories = {
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        "sgd_momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=0.01),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    }
    optimizer = factories[optimizer_name](model.parameters())
    _train(model, steps=2, optimizer=optimizer)
    before = _snapshot(model)
    handle = freeze_units(model, units, settings=ProtectSettings(kv_policy="any")).attach(optimizer)
    _train(model, steps=4, optimizer=optimizer, seed=1)
    _check_frozen(before, _snapshot(model), _masks(model, units))
    assert handle.frozen_entries == sum(int(m.sum()) for m in _masks(model, units).values())
    handle.remove()
    _train(model, steps=1, optimizer=optimizer, seed=2)
    after = _snapshot(model)
    assert any((after[n][m] != before[n][m]).any() for n, m in _masks(model, units).items())  # hooks removed


def test_gradient_hooks_alone_leave_weight_decay_to_move_frozen_entries():
    """Why restore_ exists: with AdamW's decoupled weight decay a zero gradient is not enough."""
    model = _model()
    units = _units()
    before = _snapshot(model)
    handle = freeze_units(model, units)
    _train(model, steps=3)  # no attach/callback
    masks = _masks(model, units)
    after = _snapshot(model)
    assert any((after[n][m] != before[n][m]).any() for n, m in masks.items())
    handle.restore_()
    _check_frozen(before, _snapshot(model), masks)
    # without weight decay, gradient hooks alone keep them fixed
    model2 = _model()
    before2 = _snapshot(model2)
    freeze_units(model2, units)
    _train(model2, steps=3, optimizer=torch.optim.AdamW(model2.parameters(), lr=1e-2, weight_decay=0.0))
    _check_frozen(before2, _snapshot(model2), _masks(model2, units))


def test_freezing_with_a_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _model()
    units = _units()
    before = _snapshot(model)
    handle = freeze_units(model, units)
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 64, (12,), generator=generator) for _ in range(16)]
    dataset = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=4,
        learning_rate=1e-2, weight_decay=0.1, report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[handle.callback()]).train()
    _check_frozen(before, _snapshot(model), _masks(model, units))


def test_freezing_from_the_artifact_uses_the_merge_selection(tmp_path):
    family = build_family(str(tmp_path / "family"), experts=0)
    generator = torch.Generator().manual_seed(4)
    scores = UnitScores.from_scores(
        LAYOUT,
        (torch.randn(2, 4, generator=generator), torch.randn(2, 64, generator=generator)),
        (torch.randn(2, 4, generator=generator), torch.randn(2, 64, generator=generator)),
    )
    path = write_scores_artifact(str(tmp_path / "units.safetensors"), scores, family["base"])
    settings = ProtectSettings(protect_share=0.15)
    model = _model()
    before = _snapshot(model)
    handle = freeze_units(model, path, settings=settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    handle.attach(optimizer)
    _train(model, steps=3, optimizer=optimizer)
    _check_frozen(before, _snapshot(model), _masks(model, scores.protected(settings)))
    # a layout mismatch is refused with both layouts named
    from transformers import LlamaForCausalLM

    with pytest.raises(ValueError, match="does not match"):
        freeze_units(LlamaForCausalLM(tiny_config(intermediate_size=48)), path)


def test_alignment_budget_trains_only_redundant_units():
    model = _model()
    budget = UnitSet.empty(LAYOUT)
    budget.neurons[0, [1, 2]] = True
    budget.heads[1, 0] = True  # K/V head 0 of layer 1 is shared with head 1: stays frozen ("all")
    budget.heads[0, 2] = budget.heads[0, 3] = True  # full group: K/V head 1 of layer 0 trains
    before = _snapshot(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    handle = train_only_budget(model, budget).attach(optimizer)
    _train(model, steps=3, optimizer=optimizer)
    after = _snapshot(model)
    trainable = _masks(model, budget, kv_policy="all")
    for name in before:
        mask = trainable.get(name)
        if mask is None:
            assert torch.equal(after[name], before[name]), name  # embeddings, norms, head
        else:
            assert torch.equal(after[name][~mask], before[name][~mask]), name
    changed = [n for n, m in trainable.items() if m.any() and not torch.equal(after[n][m], before[n][m])]
    assert "model.layers.0.self_attn.k_proj.weight" in changed and "model.layers.0.mlp.down_proj.weight" in changed
    assert not trainable["model.layers.1.self_attn.k_proj.weight"].any()
    handle.remove()
    assert all(p.requires_grad for p in model.parameters())


def test_peft_lora_update_is_zero_on_protected_rows_and_columns():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _model(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj", "down_proj"],
                   modules_to_save=None, init_lora_weights=True),
    )
    # make every LoRA factor non-zero so a missed row/column would show
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.1)
    units = _units()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    handle = freeze_units(model, units).attach(optimizer)
    _train(model, steps=3, optimizer=optimizer)
    checked = 0
    for layer in range(2):
        attention = model.base_model.model.model.layers[layer].self_attn
        mlp = model.base_model.model.model.layers[layer].mlp
        for module, proj in ((attention.q_proj, "q_proj"), (attention.o_proj, "o_proj"), (mlp.up_proj, "up_proj"), (mlp.down_proj, "down_proj")):
            delta = module.lora_B["default"].weight @ module.lora_A["default"].weight
            block = "self_attn" if proj in ("q_proj", "o_proj") else "mlp"
            mask = unit_mask(f"model.layers.{layer}.{block}.{proj}.weight", delta.shape, units, LAYOUT)
            assert torch.equal(delta[mask], torch.zeros_like(delta[mask])), (layer, proj)
            assert delta[~mask].abs().sum() > 0
            checked += int(mask.any())
    assert checked >= 4


def test_peft_modules_to_save_full_weights_are_frozen():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _model(), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["down_proj", "gate_proj"])
    )
    units = _units()
    before = _snapshot(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    freeze_units(model, units).attach(optimizer)
    _train(model, steps=3, optimizer=optimizer)
    after = _snapshot(model)
    names = [n for n in after if "modules_to_save" in n and "layers.0" in n]
    assert len(names) == 2
    for name in names:
        mask = unit_mask(name, after[name].shape, units, LAYOUT)
        assert mask.any() and torch.equal(after[name][mask], before[name][mask]), name
        assert not torch.equal(after[name][~mask], before[name][~mask]), name


@pytest.mark.slow
def test_lab_freezing_keeps_more_refusals_under_benign_fine_tuning(quick_lab, tmp_path):
    """The paper's use on the lab: fine-tune the aligned model like an expert and compare
    refusals with and without the SSAH units frozen.

    Measured setting: benign fine-tuning (the lab's expert mix without harmful data, 500 steps),
    where plain fine-tuning erodes refusals a little and freezing keeps more of them (quick lab,
    seed 0, trained with one thread since LAB_VERSION 2: plain 94.5 %, frozen 98.0 %; at 250
    steps neither loses any refusal on this build, so the comparison would say nothing). With
    harmful contamination (even 2 %) every variant loses its refusals in the lab — freezing
    7.5 % of units does not stop explicit harmful training (docs/ssah.md has the numbers); that
    is a measurement, not a property, so it is not asserted here.
    """
    from mergekit_safety.lab.freezing_experiment import lab_freezing_experiment
    from mergekit_safety.methods.ssah.method import ScoreSettings, score_model

    lab = quick_lab["path"]
    settings = ScoreSettings(
        safety_data=f"{lab}/data/safety_calibration.jsonl",
        utility_data=f"{lab}/data/utility_calibration.jsonl",
    )
    scores, info = score_model(f"{lab}/aligned", settings)
    artifact = write_scores_artifact(
        str(tmp_path / "units.safetensors"), scores, f"{lab}/aligned",
        {"safety_data": settings.safety_data, "utility_data": settings.utility_data}, info,
    )
    results = lab_freezing_experiment(lab, artifact, harmful_ratio=0.0, steps=500, modes=("plain", "ssah"), progress=False)
    plain, frozen = results["plain"], results["ssah"]
    assert frozen["frozen_entries"] > 0 and frozen["frozen_moved_before_restore"] == 0
    skill = frozen["trained_skill"]
    assert frozen["accuracy"][skill] >= 0.9 and plain["accuracy"][skill] >= 0.9  # both learnt the skill
    assert plain["refusal_rate"] < 1.0  # benign fine-tuning did erode some refusals
    assert frozen["refusal_rate"] > plain["refusal_rate"]
