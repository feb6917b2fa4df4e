"""`mergekit-safety check` and the same checks at mergekit's plan time."""

from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner

from tiny_models import build_family, merge_yaml, run_yaml, save_model, tiny_config

from mergekit_safety.plugin.checks import ConfigCheckError, check_config_file
from mergekit_safety.cli import main


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    paths = build_family(str(root), experts=2)
    from transformers import LlamaForCausalLM

    wide = tiny_config(vocab_size=80)
    torch.manual_seed(5)
    paths["wide_vocab"] = save_model(str(root / "wide"), LlamaForCausalLM(wide).state_dict(), wide)
    return paths


def problems_of(tmp_path, text):
    path = tmp_path / "c.yml"
    path.write_text(text)
    return [p.format(str(path)) for p in check_config_file(str(path))]


def test_clean_config_passes(family, tmp_path):
    assert problems_of(tmp_path, merge_yaml("masked_fusion", family, ["expert0", "expert1"], "  lambda: 0.5\n")) == []


def test_misspelled_parameter_suggests_the_name_with_line(family, tmp_path):
    text = merge_yaml("masked_fusion", family, ["expert0", "expert1"], "  mask_flie: x.safetensors\n")
    (problem,) = problems_of(tmp_path, text)
    line = text.splitlines().index("  mask_flie: x.safetensors") + 1
    assert f"c.yml:{line}: unknown parameter 'mask_flie'" in problem
    assert "did you mean 'mask'" in problem


def test_global_parameter_under_a_model_is_reported(family, tmp_path):
    text = merge_yaml("masked_fusion", family, ["expert0", "expert1"], model_parameters="\n      lambda: 0.3")
    problems = problems_of(tmp_path, text)
    assert len(problems) == 2 and all("'lambda' is global" in p for p in problems)


def test_out_of_range_and_invalid_values(family, tmp_path):
    text = merge_yaml(
        "masked_fusion", family, ["expert0", "expert1"], "  backbone: tie\n", model_parameters="\n      density: 1.5"
    )
    problems = problems_of(tmp_path, text)
    assert any("'backbone': invalid value 'tie'" in p for p in problems)
    assert sum("'density': invalid value 1.5" in p for p in problems) == 2
    problems = problems_of(tmp_path, merge_yaml("antidote", family, ["expert0"], "  device: gpu\n"))
    assert any("'device': invalid value 'gpu'" in p for p in problems), problems


def test_missing_files_and_models(family, tmp_path):
    text = merge_yaml("masked_fusion", family, ["expert0"], "  mask: nowhere.safetensors\n")
    assert any("mask artifact 'nowhere.safetensors' not found" in p for p in problems_of(tmp_path, text))
    text = text.replace(family["expert0"], str(tmp_path / "no_such_model"))
    assert any("is not a local directory" in p for p in problems_of(tmp_path, text))


def test_expert_with_other_shapes_is_reported(family, tmp_path):
    paths = dict(family, expert1=family["wide_vocab"])
    problems = problems_of(tmp_path, merge_yaml("masked_fusion", paths, ["expert0", "expert1"]))
    assert len(problems) == 1 and "has shape [80, 32], base has [64, 32]" in problems[0]
    assert "vocabulary" in problems[0]
    # with the tokenizer configured, mergekit aligns the vocabulary itself: not a problem
    text = merge_yaml("masked_fusion", paths, ["expert0", "expert1"]) + "tokenizer:\n  source: base\n"
    assert problems_of(tmp_path, text) == []


def test_unknown_method_and_bad_yaml(tmp_path):
    (tmp_path / "bad.yml").write_text("merge_method: masked_fusoin\n")
    (problem,) = check_config_file(str(tmp_path / "bad.yml"))
    assert "did you mean 'masked_fusion'" in problem.message and problem.line == 1
    (tmp_path / "broken.yml").write_text("merge_method: [\n")
    (problem,) = check_config_file(str(tmp_path / "broken.yml"))
    assert problem.message.startswith("invalid YAML")


def test_cli_exit_codes(family, tmp_path):
    good = tmp_path / "good.yml"
    good.write_text(merge_yaml("masked_fusion", family, ["expert0"]))
    bad = tmp_path / "bad.yml"
    bad.write_text(merge_yaml("masked_fusion", family, ["expert0"], "  lamda: 2\n"))
    runner = CliRunner()
    assert runner.invoke(main, ["check", str(good)]).exit_code == 0
    result = runner.invoke(main, ["check", str(good), str(bad)])
    assert result.exit_code == 1
    assert "did you mean 'lambda'" in result.output


def test_same_checks_run_at_mergekit_plan_time(family, tmp_path):
    text = merge_yaml("masked_fusion", family, ["expert0", "expert1"], "  mask_flie: x\n")
    with pytest.raises(ConfigCheckError, match="unknown parameter 'mask_flie'"):
        run_yaml(text, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


def test_plan_time_check_is_not_skipped_for_a_new_config_with_a_reused_id(family, tmp_path, monkeypatch):
    # Python reuses the id of a freed object: a config planned after another one was freed
    # may get its id. The plan-time check must still run for it (this was a real flake).
    import yaml
    from mergekit.config import MergeConfiguration

    from mergekit_safety.plugin import checks

    text = merge_yaml("masked_fusion", family, ["expert0", "expert1"], "  mask: nowhere.safetensors\n")
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    monkeypatch.setitem(checks._checked_configs, id(config), object())  # a freed config's entry
    with pytest.raises(ConfigCheckError, match="nowhere.safetensors"):
        checks.check_at_plan_time(config)
