"""RESTA: θ_A + Merge(τ_i) + γ·D(θ_A − θ_U), config-only, through plain mergekit."""

from __future__ import annotations

import pytest
import torch

from tiny_models import build_family, load_state, merge_yaml, run_yaml

EXPERTS = ["expert0", "expert1"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("resta"))
    paths = build_family(root, experts=3)
    # the third "expert" plays the unaligned model θ_U
    paths["unaligned"] = paths.pop("expert2")
    return paths


def _merge(family, tmp_path, name, parameters):
    text = merge_yaml("resta", family, EXPERTS, parameters)
    return run_yaml(text, str(tmp_path / name))


def test_formula_with_task_arithmetic(family, tmp_path):
    out = _merge(family, tmp_path, "r", f"  unaligned_model: {family['unaligned']}\n  gamma: 0.7\n")
    base, unaligned = load_state(family["base"]), load_state(family["unaligned"])
    experts = [load_state(family[n]) for n in EXPERTS]
    weights = [0.5, 0.75]  # merge_yaml's weights
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        expected = base[name] + sum(w * (e[name] - base[name]) for w, e in zip(weights, experts))
        expected = expected + 0.7 * (base[name] - unaligned[name])
        assert torch.allclose(out[name], expected, atol=1e-6), name


def test_gamma_zero_is_the_backbone_bit_for_bit(family, tmp_path):
    resta = _merge(family, tmp_path, "r0", f"  unaligned_model: {family['unaligned']}\n  gamma: 0.0\n")
    plain = _merge(family, tmp_path, "plain", "")  # no unaligned model: the plain backbone
    core = run_yaml(merge_yaml("masked_fusion", family, EXPERTS), str(tmp_path / "core"))
    for name in core:
        assert torch.equal(resta[name], core[name]), name
        assert torch.equal(plain[name], core[name]), name


def test_drop_keeps_the_expected_share_and_rescales(family, tmp_path):
    out = _merge(family, tmp_path, "drop", f"  unaligned_model: {family['unaligned']}\n  gamma: 1.0\n  safety_drop: 0.5\n")
    base, unaligned = load_state(family["base"]), load_state(family["unaligned"])
    plain = run_yaml(merge_yaml("masked_fusion", family, EXPERTS), str(tmp_path / "core2"))
    name = "model.layers.1.mlp.up_proj.weight"
    added = out[name] - plain[name]
    vector = base[name] - unaligned[name]
    kept = added.abs() > 1e-9
    share = kept.float().mean().item()
    assert 0.4 < share < 0.6, share
    assert torch.allclose(added[kept], 2.0 * vector[kept], atol=1e-5)


def test_random_control_has_the_same_norm_but_not_the_direction(family, tmp_path):
    params = f"  unaligned_model: {family['unaligned']}\n  gamma: 0.5\n"
    real = _merge(family, tmp_path, "real", params)
    control = _merge(family, tmp_path, "ctl", params + "  control: random\n")
    plain = run_yaml(merge_yaml("masked_fusion", family, EXPERTS), str(tmp_path / "core3"))
    name = "model.layers.0.mlp.down_proj.weight"
    a, b = real[name] - plain[name], control[name] - plain[name]
    assert torch.allclose(a.norm(), b.norm(), rtol=1e-4)
    cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert abs(float(cosine)) < 0.2


def test_check_refuses_a_missing_or_mismatched_unaligned_model(family, tmp_path):
    from mergekit_safety.plugin.checks import check_config_file

    missing = tmp_path / "missing.yml"
    missing.write_text(merge_yaml("resta", family, EXPERTS, f"  unaligned_model: {tmp_path / 'nope'}\n"))
    problems = check_config_file(str(missing))
    assert any("unaligned_model" in p.message or "nope" in p.message for p in problems), problems

    other = build_family(str(tmp_path / "other"), experts=0, hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    mismatched = tmp_path / "mismatched.yml"
    mismatched.write_text(merge_yaml("resta", family, EXPERTS, f"  unaligned_model: {other['base']}\n"))
    problems = check_config_file(str(mismatched))
    assert any("unaligned_model" in p.message and "shape" in p.message for p in problems), problems

    good = tmp_path / "good.yml"
    good.write_text(merge_yaml("resta", family, EXPERTS, f"  unaligned_model: {family['unaligned']}\n"))
    assert check_config_file(str(good)) == []


def test_listed_by_methods():
    from mergekit_safety.plugin.registration import describe_methods

    text = describe_methods()
    assert "resta —" in text and "unaligned_model (str, global" in text and "gamma (float (>=0)" in text
