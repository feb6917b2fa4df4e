"""Unusual but legal inputs through mergekit-yaml's code path, and illegal ones refused."""

from __future__ import annotations

import shutil

import pytest
import torch

from tiny_models import build_family, load_state, merge_yaml, run_yaml

from mergekit_safety.plugin.checks import check_config_file


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(str(tmp_path_factory.mktemp("family")), experts=2)


@pytest.mark.parametrize("dtype,out_dtype", [("bfloat16", None), ("float16", "float32"), ("float32", "bfloat16")])
def test_dtypes_and_out_dtype(family, tmp_path, dtype, out_dtype):
    text = merge_yaml("masked_fusion", family, ["expert0", "expert1"], "  lambda: 0.5\n").replace(
        "dtype: float32", f"dtype: {dtype}" + (f"\nout_dtype: {out_dtype}" if out_dtype else "")
    )
    merged = run_yaml(text, str(tmp_path / "out"))
    expected_dtype = getattr(torch, out_dtype or dtype)
    assert all(v.dtype == expected_dtype for v in merged.values())
    # the merge happened in `dtype`: compare with mergekit's task_arithmetic in the same dtypes
    builtin = run_yaml(
        merge_yaml("task_arithmetic", family, ["expert0", "expert1"], "  lambda: 0.5\n").replace(
            "dtype: float32", f"dtype: {dtype}" + (f"\nout_dtype: {out_dtype}" if out_dtype else "")
        ),
        str(tmp_path / "builtin"),
    )
    assert all(torch.equal(merged[k], builtin[k]) for k in merged)


def test_tied_embeddings(tmp_path):
    paths = build_family(str(tmp_path / "tied"), experts=2, tie_word_embeddings=True)
    merged = run_yaml(merge_yaml("masked_fusion", paths, ["expert0", "expert1"]), str(tmp_path / "out"))
    builtin = run_yaml(merge_yaml("task_arithmetic", paths, ["expert0", "expert1"]), str(tmp_path / "b"))
    assert merged.keys() == builtin.keys()
    assert all(torch.equal(merged[k], builtin[k]) for k in merged)
    from transformers import LlamaForCausalLM

    shutil.copy(f"{paths['base']}/config.json", tmp_path / "out" / "config.json")
    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model.config.tie_word_embeddings


def test_one_expert_only(family, tmp_path):
    merged = run_yaml(merge_yaml("masked_fusion", family, ["expert0"]), str(tmp_path / "out"))
    base, expert = load_state(family["base"]), load_state(family["expert0"])
    # weight 0.5 on one expert: halfway between aligned and expert
    for name in base:
        torch.testing.assert_close(merged[name], base[name] + 0.5 * (expert[name] - base[name]))


def test_expert_equal_to_base_is_a_zero_task_vector(family, tmp_path):
    copy = shutil.copytree(family["base"], tmp_path / "base_copy")
    paths = dict(family, expert0=str(copy))
    merged = run_yaml(merge_yaml("masked_fusion", paths, ["expert0"]), str(tmp_path / "out"))
    base = load_state(family["base"])
    assert all(torch.equal(merged[k], base[k]) for k in base)


def test_missing_base_model_is_refused_clearly(family, tmp_path):
    text = merge_yaml("masked_fusion", family, ["expert0", "expert1"])
    text = "\n".join(l for l in text.splitlines() if not l.startswith("base_model")) + "\n"
    config = tmp_path / "c.yml"
    config.write_text(text)
    (problem,) = check_config_file(str(config))
    assert "needs a base_model" in problem.message
    # the plugin's pre-merge check stops the merge with the same message, before mergekit loads anything
    with pytest.raises(Exception, match="needs a base_model"):
        run_yaml(text, str(tmp_path / "out"))


def test_nan_in_an_expert_names_the_tensor(family, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(family["expert1"], tmp_path / "broken")
    state = load_file(str(broken / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    paths = dict(family, expert1=str(broken))
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight of model .*broken contains NaN"):
        run_yaml(merge_yaml("masked_fusion", paths, ["expert0", "expert1"]), str(tmp_path / "out"))
