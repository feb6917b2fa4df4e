"""SSAH: unit expansion (incl. GQA), scoring, labels, protection, the merge method, inspect."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st

from tiny_models import build_family, load_state, merge_yaml, run_yaml

from mergekit_safety.fusion.artifacts import ArtifactError, open_artifact
from mergekit_safety.methods.ssah.method import (
    CU, ESU, EUU, RU,
    LabelSettings, ProtectSettings, SSAHMethod, UnitScores,
    classify, load_unit_scores, select_protected, share_count,
    unit_scores, write_scores_artifact, zscore,
)
from mergekit_safety.methods.ssah.inspect import inspect_artifact
from mergekit_safety.methods.ssah.units import (
    UnitError, UnitLayout, UnitSet, parse_tensor_name, random_like, unit_axis, unit_mask,
)

# the tiny test family: hidden 32, 4 heads (head_dim 8), 2 K/V heads, 64 neurons, 2 layers
LAYOUT = UnitLayout(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64, hidden_size=32)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_SAFETY_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def ssah_registered():
    from mergekit.merge_methods import registry

    return registry.get("ssah")


def _set(heads=(), neurons=()):
    units = UnitSet.empty(LAYOUT)
    for layer, head in heads:
        units.heads[layer, head] = True
    for layer, neuron in neurons:
        units.neurons[layer, neuron] = True
    return units


def _rows(mask):
    return sorted(mask.any(dim=1).nonzero().view(-1).tolist())


def _cols(mask):
    return sorted(mask.any(dim=0).nonzero().view(-1).tolist())


# --------------------------------------------------------------------------- units


SHAPES = {
    "q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32), "o_proj": (32, 32),
    "gate_proj": (64, 32), "up_proj": (64, 32), "down_proj": (32, 64),
}


def _name(layer, proj):
    block = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{block}.{proj}.weight"


@pytest.mark.parametrize("kv_policy, kv_rows", [("any", list(range(8))), ("all", []), ("none", [])])
def test_expansion_touches_exactly_the_unit_rows_and_columns(kv_policy, kv_rows):
    units = _set(heads=[(0, 1)], neurons=[(1, 5), (1, 63)])
    touched = {}
    for layer in range(2):
        for proj, shape in SHAPES.items():
            mask = unit_mask(_name(layer, proj), shape, units, LAYOUT, kv_policy)
            assert mask.shape == shape and mask.dtype == torch.bool
            touched[(layer, proj)] = mask
            # a unit is whole rows or whole columns: rows constant along dim 1 or columns along dim 0
            if proj in ("o_proj", "down_proj"):
                assert torch.equal(mask, mask[:1].expand_as(mask))
            else:
                assert torch.equal(mask, mask[:, :1].expand_as(mask))
    assert _rows(touched[(0, "q_proj")]) == list(range(8, 16))  # head 1 = q rows 8..15
    assert _cols(touched[(0, "o_proj")]) == list(range(8, 16))
    assert _rows(touched[(0, "k_proj")]) == kv_rows  # head 1 reads K/V head 0 (heads 0, 1)
    assert _rows(touched[(0, "v_proj")]) == kv_rows
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert not touched[(0, proj)].any()
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert not touched[(1, proj)].any()
    assert _rows(touched[(1, "gate_proj")]) == [5, 63]
    assert _rows(touched[(1, "up_proj")]) == [5, 63]
    assert _cols(touched[(1, "down_proj")]) == [5, 63]


def test_gqa_kv_policies_with_a_full_group():
    # heads 2 and 3 share K/V head 1; head 0 alone in group 0
    units = _set(heads=[(1, 2), (1, 3), (1, 0)])
    k = _name(1, "k_proj")
    assert _rows(unit_mask(k, (16, 32), units, LAYOUT, "any")) == list(range(16))
    assert _rows(unit_mask(k, (16, 32), units, LAYOUT, "all")) == list(range(8, 16))
    assert _rows(unit_mask(k, (16, 32), units, LAYOUT, "none")) == []
    with pytest.raises(UnitError, match="kv_policy"):
        unit_mask(k, (16, 32), units, LAYOUT, "some")


def test_non_unit_tensors_biases_and_peft_names():
    units = _set(heads=[(0, 3)], neurons=[(0, 2)])
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.o_proj.bias",
                 "model.layers.0.mlp.down_proj.bias"):
        assert unit_mask(name, (32,) if "bias" in name or "norm" in name else (64, 32), units, LAYOUT) is None
    assert unit_mask("model.layers.0.self_attn.q_proj.bias", (32,), units, LAYOUT).nonzero().view(-1).tolist() == list(range(24, 32))
    prefix = "base_model.model.model.layers.0"
    assert _rows(unit_mask(f"{prefix}.self_attn.q_proj.base_layer.weight", (32, 32), units, LAYOUT)) == list(range(24, 32))
    assert _cols(unit_mask(f"{prefix}.mlp.down_proj.modules_to_save.default.weight", (32, 64), units, LAYOUT)) == [2]
    # LoRA: rows live in B of row projections, columns in A of column projections
    assert _rows(unit_mask(f"{prefix}.mlp.up_proj.lora_B.default.weight", (64, 4), units, LAYOUT)) == [2]
    assert unit_mask(f"{prefix}.mlp.up_proj.lora_A.default.weight", (4, 32), units, LAYOUT) is None
    assert _cols(unit_mask(f"{prefix}.self_attn.o_proj.lora_A.default.weight", (4, 32), units, LAYOUT)) == list(range(24, 32))
    assert unit_mask(f"{prefix}.self_attn.o_proj.lora_B.default.weight", (32, 4), units, LAYOUT) is None
    assert parse_tensor_name(f"{prefix}.self_attn.q_proj.lora_magnitude_vector.default.weight") is None
    assert unit_axis(_name(0, "down_proj"), (32, 64), units, LAYOUT)[0] == 1


def test_shape_mismatch_names_the_tensor():
    with pytest.raises(UnitError, match=r"model.layers.1.mlp.down_proj.weight has shape \[32, 48\]"):
        unit_mask(_name(1, "down_proj"), (32, 48), UnitSet.empty(LAYOUT), LAYOUT)
    with pytest.raises(UnitError, match="layer 5"):
        unit_mask(_name(5, "q_proj"), (32, 32), UnitSet.empty(LAYOUT), LAYOUT)


def test_layout_from_config_reads_gqa_and_head_dim():
    from tiny_models import tiny_config

    assert UnitLayout.from_config(tiny_config()) == LAYOUT
    assert UnitLayout.from_config(tiny_config(head_dim=16)).head_dim == 16
    with pytest.raises(UnitError):
        UnitLayout(2, 4, 3, 8, 64, 32)


@pytest.mark.parametrize("kv_policy, preserved", [("any", True), ("none", False)])
def test_protected_head_computes_the_same_when_everything_else_changes(kv_policy, preserved):
    """Semantic check of the GQA decision on a real Llama: perturb every entry of layer 0's
    q/k/v outside the protected mask; the protected head's attention output (o_proj input
    channels of the head) is unchanged iff its K/V rows are protected."""
    from transformers import LlamaForCausalLM

    from tiny_models import tiny_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()
    units = _set(heads=[(0, 1)])
    ids = torch.randint(0, 64, (2, 10))
    captured = []
    hook = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].clone()))
    with torch.no_grad():
        model(ids)
        for proj in ("q_proj", "k_proj", "v_proj"):
            weight = getattr(model.model.layers[0].self_attn, proj).weight
            mask = unit_mask(_name(0, proj), weight.shape, units, LAYOUT, kv_policy)
            weight.add_(torch.randn_like(weight) * (~mask))
        model(ids)
    hook.remove()
    before, after = captured[0][..., 8:16], captured[1][..., 8:16]
    assert torch.allclose(before, after, atol=1e-6) is preserved
    assert not torch.allclose(captured[0][..., 16:24], captured[1][..., 16:24])  # unprotected head moved


# --------------------------------------------------------------------------- scores and labels


def test_unit_scores_follow_the_flap_formula():
    generator = torch.Generator().manual_seed(1)
    attention_var = torch.rand(2, 32, generator=generator, dtype=torch.float64)
    mlp_var = torch.rand(2, 64, generator=generator, dtype=torch.float64)
    o = [torch.randn(32, 32, generator=generator) for _ in range(2)]
    down = [torch.randn(32, 64, generator=generator) for _ in range(2)]
    heads, neurons = unit_scores(LAYOUT, attention_var, mlp_var, o, down)
    for layer in range(2):
        s = [float(mlp_var[layer, j]) * sum(float(o_) ** 2 for o_ in down[layer][:, j]) for j in range(64)]
        mean = sum(s) / 64
        std = (sum((x - mean) ** 2 for x in s) / 64) ** 0.5
        expected = torch.tensor([(x - mean) / std for x in s], dtype=torch.float64)
        assert torch.allclose(neurons[layer].double(), expected, atol=1e-5)
        channel = [(float(attention_var[layer, j]) * float(o[layer][:, j].double().pow(2).sum())) ** 2 for j in range(32)]
        mean = sum(channel) / 32
        std = (sum((x - mean) ** 2 for x in channel) / 32) ** 0.5
        z = [(x - mean) / std for x in channel]
        expected_heads = torch.tensor([sum(z[h * 8:(h + 1) * 8]) / 8 for h in range(4)], dtype=torch.float64)
        assert torch.allclose(heads[layer].double(), expected_heads, atol=1e-5)
    assert torch.equal(zscore(torch.ones(3, 5)), torch.zeros(3, 5, dtype=torch.float64))


@hsettings(max_examples=40, deadline=None)
@given(
    n=st.integers(20, 600),
    seed=st.integers(0, 10_000),
    esu=st.floats(0.0, 0.2),
    euu=st.floats(0.0, 0.3),
    ru=st.floats(0.0, 0.5),
)
def test_labels_reproduce_the_thresholds(n, seed, esu, euu, ru):
    generator = torch.Generator().manual_seed(seed)
    safety, utility = torch.randn(n, generator=generator), torch.randn(n, generator=generator)
    labels = classify(safety, utility, LabelSettings(esu_share=esu, euu_share=euu, ru_share=ru))
    diff, summed = (safety - utility).tolist(), (safety + utility).tolist()
    by_diff = sorted(range(n), key=lambda i: diff[i])
    top = set(by_diff[n - share_count(esu, n):]) if share_count(esu, n) else set()
    bottom = set(by_diff[:share_count(euu, n)])
    low_sum = set(sorted(range(n), key=lambda i: summed[i])[:share_count(ru, n)])
    assert {i for i in range(n) if labels[i] == ESU} == top
    assert {i for i in range(n) if labels[i] == EUU} == bottom
    assert {i for i in range(n) if labels[i] == RU} == low_sum - top - bottom  # ESU/EUU override RU
    assert {i for i in range(n) if labels[i] == CU} == set(range(n)) - top - bottom - low_sum


def test_paper_default_thresholds_on_1000_units():
    generator = torch.Generator().manual_seed(0)
    labels = classify(torch.randn(1000, generator=generator), torch.randn(1000, generator=generator))
    assert int((labels == ESU).sum()) == 10 and int((labels == EUU).sum()) == 100
    assert int((labels == RU).sum()) <= 100
    with pytest.raises(ValueError, match="overlap"):
        LabelSettings(esu_share=0.6, euu_share=0.5)


def test_protected_set_is_esu_then_top_cu_by_safety():
    generator = torch.Generator().manual_seed(3)
    n = 400
    safety, utility = torch.randn(n, generator=generator), torch.randn(n, generator=generator)
    labels = classify(safety, utility)
    esu = set((labels == ESU).nonzero().view(-1).tolist())
    chosen = select_protected(labels, safety, utility, 0.075)
    assert int(chosen.sum()) == 30
    assert esu <= set(chosen.nonzero().view(-1).tolist())
    extra = chosen & (labels == CU)
    assert int(extra.sum()) == 30 - len(esu)
    rest = (~chosen) & (labels == CU)
    assert float(safety[extra].min()) >= float(safety[rest].max())
    assert not (chosen & ((labels == EUU) | (labels == RU))).any()
    # a share below the ESU count keeps the ESU with the largest Diff
    two = select_protected(labels, safety, utility, 2 / n)
    diff = safety - utility
    assert set(two.nonzero().view(-1).tolist()) == set(torch.topk(diff, 2).indices.tolist())
    assert not select_protected(labels, safety, utility, 0.0).any()


def _synthetic_scores(seed=0, layout=LAYOUT):
    generator = torch.Generator().manual_seed(seed)
    shape_h, shape_n = (layout.num_layers, layout.num_heads), (layout.num_layers, layout.intermediate_size)
    return UnitScores.from_scores(
        layout,
        (torch.randn(shape_h, generator=generator), torch.randn(shape_n, generator=generator)),
        (torch.randn(shape_h, generator=generator), torch.randn(shape_n, generator=generator)),
    )


def test_random_control_has_equal_size_and_is_seeded():
    scores = _synthetic_scores()
    chosen = scores.protected(ProtectSettings(protect_share=0.2))
    control = scores.protected(ProtectSettings(protect_share=0.2, control="random", control_seed=7))
    again = scores.protected(ProtectSettings(protect_share=0.2, control="random", control_seed=7))
    other = scores.protected(ProtectSettings(protect_share=0.2, control="random", control_seed=8))
    assert int(control.heads.sum()) == int(chosen.heads.sum())
    assert int(control.neurons.sum()) == int(chosen.neurons.sum())
    assert torch.equal(control.flat(), again.flat()) and not torch.equal(control.flat(), other.flat())
    disjoint = random_like(chosen, 1, exclude=chosen)
    assert not (disjoint.flat() & chosen.flat()).any() and disjoint.count() == chosen.count()


# --------------------------------------------------------------------------- merging


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(str(tmp_path_factory.mktemp("family")), experts=2)


def _ssah_yaml(family, mask, backbone="task_arithmetic", extra=""):
    return merge_yaml(
        "ssah", family, ["expert0", "expert1"],
        f"  mask: {mask}\n  backbone: {backbone}\n{extra}",
    )


@pytest.mark.parametrize("backbone", ["task_arithmetic", "ties"])
def test_empty_protected_set_equals_the_backbone_exactly(ssah_registered, family, tmp_path, backbone):
    mask = write_scores_artifact(str(tmp_path / "units.safetensors"), _synthetic_scores(), family["base"])
    ours = run_yaml(_ssah_yaml(family, mask, backbone, "  protect_share: 0.0\n"), str(tmp_path / "a"))
    plain = run_yaml(merge_yaml("masked_fusion", family, ["expert0", "expert1"], f"  backbone: {backbone}\n"), str(tmp_path / "b"))
    builtin = run_yaml(merge_yaml(backbone, family, ["expert0", "expert1"], "  density: 1.0\n" if backbone == "ties" else ""), str(tmp_path / "c"))
    for name in ours:
        assert torch.equal(ours[name], plain[name]), name
        assert torch.equal(ours[name], builtin[name]), name


@pytest.mark.parametrize("control", ["none", "random"])
def test_protected_units_stay_at_the_aligned_model(ssah_registered, family, tmp_path, control):
    scores = _synthetic_scores(seed=5)
    mask = write_scores_artifact(str(tmp_path / "units.safetensors"), scores, family["base"])
    settings = ProtectSettings(protect_share=0.1, control=control, control_seed=3)
    merged = run_yaml(
        _ssah_yaml(family, mask, extra=f"  protect_share: 0.1\n  control: {control}\n  control_seed: 3\n"),
        str(tmp_path / "a"),
    )
    plain = run_yaml(merge_yaml("masked_fusion", family, ["expert0", "expert1"]), str(tmp_path / "b"))
    base = load_state(family["base"])
    units = scores.protected(settings)
    assert units.count() == share_count(0.1, LAYOUT.total_units)
    touched = 0
    for name, value in merged.items():
        protect = unit_mask(name, value.shape, units, LAYOUT, "any")
        if protect is None:
            assert torch.equal(value, plain[name]), name
            continue
        touched += int(protect.any())
        assert torch.equal(value[protect], base[name][protect]), name
        assert torch.equal(value[~protect], plain[name][~protect]), name
    assert touched > 0


def test_artifact_for_another_base_or_layout_is_refused(ssah_registered, family, tmp_path):
    other = build_family(str(tmp_path / "other"), experts=0, seed=9)
    mask = write_scores_artifact(str(tmp_path / "units.safetensors"), _synthetic_scores(), other["base"])
    # refused at plan time (mergekit_safety.plugin.checks) or at the first tensor: both name the file
    with pytest.raises(ValueError, match=r"units.safetensors.*(base model differs|computed for base model)"):
        run_yaml(_ssah_yaml(family, mask), str(tmp_path / "a"))
    wrong = UnitLayout(2, 4, 2, 8, 48, 32)
    mask2 = write_scores_artifact(str(tmp_path / "wrong.safetensors"), _synthetic_scores(layout=wrong), family["base"])
    with pytest.raises(ValueError, match="wrong.safetensors.*mlp.*proj.weight has shape"):
        run_yaml(_ssah_yaml(family, mask2), str(tmp_path / "b"))


# --------------------------------------------------------------------------- config-only, real scoring


@pytest.fixture(scope="module")
def lab_family(tmp_path_factory):
    """Tiny family that speaks the lab language (tokenizer saved with the base)."""
    from mergekit_safety.lab.language import (
        BENIGN_WORDS, HARMFUL_WORDS, REFUSAL, answer, build_tokenizer, make_prompt,
    )
    import random

    root = tmp_path_factory.mktemp("labfamily")
    family = build_family(str(root), experts=2, vocab_size=72)
    build_tokenizer().save_pretrained(family["base"])
    rng = random.Random(0)
    safety, utility = [], []
    for _ in range(12):
        words = rng.sample(BENIGN_WORDS, 3)
        harmful = words[:2] + [rng.choice(HARMFUL_WORDS)]
        safety.append({"prompt": make_prompt("copy", harmful), "response": REFUSAL})
        utility.append({"prompt": make_prompt("next", words), "response": answer("next", words)})
    for name, records in (("safety", safety), ("utility", utility)):
        with open(root / f"{name}.jsonl", "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in records)
    family["safety"], family["utility"] = str(root / "safety.jsonl"), str(root / "utility.jsonl")
    return family


def _direct_scores(model_dir, path):
    """Independent reference: whole model in memory, own hooks, response tokens only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_safety.engine.data import encode_example, read_jsonl

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = {}
    hooks = []
    for layer_index, layer in enumerate(model.model.layers):
        for key, module in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):
            def hook(_m, args, key=(key, layer_index)):
                inputs.setdefault(key, []).append(args[0][0])
            hooks.append(module.register_forward_pre_hook(hook))
    masks = []
    with torch.no_grad():
        for record in read_jsonl(path, ["prompt", "response"]):
            encoded = encode_example(tokenizer, record["prompt"], record["response"])
            masks.append(torch.tensor(encoded["response_mask"]).bool())
            model(torch.tensor([encoded["input_ids"]]))
    for hook in hooks:
        hook.remove()
    variance = {}
    for key, blocks in inputs.items():
        x = torch.cat([b[m] for b, m in zip(blocks, masks)]).double()
        variance[key] = x.var(dim=0, unbiased=False)
    layers = range(len(model.model.layers))
    return unit_scores(
        LAYOUT,
        torch.stack([variance[("o", i)] for i in layers]),
        torch.stack([variance[("down", i)] for i in layers]),
        [model.model.layers[i].self_attn.o_proj.weight.detach() for i in layers],
        [model.model.layers[i].mlp.down_proj.weight.detach() for i in layers],
    )


def test_config_only_merge_scores_the_aligned_model(ssah_registered, lab_family, tmp_path):
    text = merge_yaml(
        "ssah", lab_family, ["expert0", "expert1"],
        f"  safety_data: {lab_family['safety']}\n  utility_data: {lab_family['utility']}\n"
        "  protect_share: 0.1\n",
    )
    merged = run_yaml(text, str(tmp_path / "out"))
    artifacts = [p for p in os.listdir(tmp_path / "cache" / "artifacts") if p.endswith(".safetensors")]
    assert len(artifacts) == 1
    artifact = open_artifact(str(tmp_path / "cache" / "artifacts" / artifacts[0]))
    assert artifact.metadata.binds_experts is False and artifact.metadata.experts == ()
    scores = load_unit_scores(artifact)
    assert artifact.metadata.extra["safety_samples"] == 12
    # scores equal an independent in-memory computation over response tokens
    for which, path in (("safety", lab_family["safety"]), ("utility", lab_family["utility"])):
        heads, neurons = _direct_scores(lab_family["base"], path)
        assert torch.allclose(getattr(scores, f"{which}_heads"), heads, atol=1e-4)
        assert torch.allclose(getattr(scores, f"{which}_neurons"), neurons, atol=1e-4)
    assert int((scores.labels == ESU).sum()) == share_count(0.01, LAYOUT.total_units)
    base = load_state(lab_family["base"])
    units = scores.protected(ProtectSettings(protect_share=0.1))
    for name, value in merged.items():
        protect = unit_mask(name, value.shape, units, LAYOUT)
        if protect is not None:
            assert torch.equal(value[protect], base[name][protect])
    # the same artifact serves other experts (it depends on θ_A only)
    text_one = merge_yaml(
        "ssah", lab_family, ["expert1"],
        f"  safety_data: {lab_family['safety']}\n  utility_data: {lab_family['utility']}\n",
    )
    run_yaml(text_one, str(tmp_path / "out1"))
    assert len([p for p in os.listdir(tmp_path / "cache" / "artifacts") if p.endswith(".safetensors")]) == 1


# --------------------------------------------------------------------------- inspect


def test_inspect_report_and_heatmap(family, tmp_path):
    from click.testing import CliRunner

    from mergekit_safety.cli import main

    mask = write_scores_artifact(str(tmp_path / "units.safetensors"), _synthetic_scores(), family["base"])
    report = inspect_artifact(mask, str(tmp_path / "map.png"))
    assert "ESU" in report and report.count(" heads ") >= 2 and os.path.getsize(tmp_path / "map.png") > 1000
    result = CliRunner().invoke(main, ["inspect", mask, "--protect-share", "0.2", "--control", "random"])
    assert result.exit_code == 0, result.output
    assert "control random" in result.output
    assert os.path.exists(str(tmp_path / "units.png"))
    with open(tmp_path / "junk.safetensors", "wb") as handle:
        handle.write(b"not a safetensors file at all")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "junk.safetensors"), "--no-png"])
    assert result.exit_code != 0 and "junk.safetensors" in result.output
