"""The merged model's card carries a safety section (method, fingerprints) and, after
`eval --card`, the measured rates with the judge's known accuracy — nothing unmeasured."""

from __future__ import annotations

import os

import pytest
import yaml

from tiny_models import build_family, merge_yaml


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    paths = build_family(str(tmp_path_factory.mktemp("card")), experts=3)
    paths["unaligned"] = paths.pop("expert2")
    return paths


def _merge_with_card(text: str, out: str) -> str:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), out,
              options=MergeOptions(copy_tokenizer=False, write_model_card=True, quiet=True))
    return open(os.path.join(out, "README.md"), encoding="utf-8").read()


def test_a_merge_with_our_method_gets_a_safety_section(family, tmp_path):
    from mergekit_safety.fusion.artifacts import model_fingerprint

    text = merge_yaml("resta", family, ["expert0", "expert1"], f"  unaligned_model: {family['unaligned']}\n")
    card = _merge_with_card(text, str(tmp_path / "out"))
    front = yaml.safe_load(card.split("---")[1])
    assert {"mergekit", "mergekit-safety", "safety", "resta"} <= set(front["tags"])
    assert "## Safety restoration (mergekit-safety)" in card and "arxiv.org/abs/2402.11746" in card
    assert model_fingerprint(family["unaligned"]) in card and model_fingerprint(family["expert0"]) in card
    assert "has **not been measured**" in card and "refusal of harmful prompts" not in card


def test_eval_card_writes_the_measured_rates_once(family, tmp_path):
    from mergekit_safety.plugin.card import add_measurements

    out = str(tmp_path / "out")
    _merge_with_card(merge_yaml("masked_fusion", family, ["expert0"]), out)
    result = {"refusal_rate": 0.9, "refusal_interval": [0.8, 0.95], "n_harmful": 100, "over_refusal_rate": 0.02,
              "over_refusal_interval": [0.005, 0.07], "n_benign": 100, "accuracy": {}, "judge": "keyword",
              "max_new_tokens": 64, "dtype": "bfloat16"}
    add_measurements(out, result)
    card = add_measurements(out, {**result, "refusal_rate": 0.5, "refusal_interval": [0.4, 0.6]})
    text = open(card, encoding="utf-8").read()
    assert text.count("### Measured with `mergekit-safety eval`") == 1  # replaced, not appended
    assert "refusal of harmful prompts: 50.0 % (95 % CI 40.0–60.0 %), n = 100" in text
    assert "82.9 % agreement" in text and "not been measured" not in text


def test_mergekit_own_methods_get_no_section(family, tmp_path):
    card = _merge_with_card(merge_yaml("task_arithmetic", family, ["expert0"]), str(tmp_path / "out"))
    assert "mergekit-safety" not in card
