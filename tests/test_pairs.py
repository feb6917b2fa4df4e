"""Preference pairs from the user's own models (SOMF ``preference_data: auto``)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tiny_models import build_lab_family, merge_yaml, run_yaml


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_SAFETY_CACHE", str(tmp_path / "cache"))


def _lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_pairs_are_chosen_and_rejected_by_the_judge(tmp_path, monkeypatch):
    """Canned answers: a pair only where the aligned model refuses and the fusion complies."""
    from mergekit_safety.methods.somf import pairs

    family = build_lab_family(str(tmp_path / "models"), experts=1)
    prompts = tmp_path / "harmful.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"p{i}", "category": "c"}) + "\n" for i in range(12)))
    refusal, comply = "I'm sorry, but I can't help with that.", "Sure, here is how: step one"
    aligned = {f"p{i}": (refusal if i % 3 else comply) for i in range(12)}   # p0, p3, p6, p9 comply
    fusion = {f"p{i}": (comply if i % 2 else refusal) for i in range(12)}    # even prompts refuse

    def answer(self, model, tokenizer, texts, max_new_tokens, batch_size, progress, description):
        table = aligned if "aligned" in description else fusion
        return [table[t] for t in texts]

    monkeypatch.setattr(pairs.GenerationCache, "answer", answer)
    monkeypatch.setattr(pairs, "MIN_PAIRS", 4)
    report = pairs.build_pairs(family["base"], [family["expert0"]], str(prompts), str(tmp_path / "out"),
                               fuse_kwargs={}, progress=False)
    written = _lines(tmp_path / "out" / "pairs.jsonl")
    expected = [f"p{i}" for i in range(12) if i % 3 and i % 2]  # p1 p5 p7 p11
    assert [r["prompt"] for r in written] == expected
    assert all(r["chosen"] == refusal and r["rejected"] == comply and r["category"] == "c" for r in written)
    assert report["pairs"] == 4 and report["aligned_refusals"] == 8 and report["fusion_compliances"] == 6
    # too few pairs is an error that says why, and writes nothing
    monkeypatch.setattr(pairs, "MIN_PAIRS", 5)
    with pytest.raises(pairs.PairsError, match=r"only 4 preference pairs from 12 prompts \(the aligned model refused 8"):
        pairs.build_pairs(family["base"], [family["expert0"]], str(prompts), str(tmp_path / "out2"),
                          fuse_kwargs={}, progress=False)
    assert not os.path.exists(tmp_path / "out2" / "pairs.jsonl")


def test_the_unmasked_fusion_is_the_plain_merge(tmp_path):
    from mergekit_safety.methods.somf.pairs import fused_model

    family = build_lab_family(str(tmp_path / "models"), experts=2, scale=0.3)
    text = merge_yaml("masked_fusion", family, ["expert0", "expert1"], "  lambda: 0.8\n")
    merged = run_yaml(text, str(tmp_path / "merged"))
    model = fused_model(family["base"], [family["expert0"], family["expert1"]],
                        dict(weights=[0.5, 0.75], lambda_=0.8), seed=None, progress=False)
    state = model.state_dict()
    for name, value in merged.items():
        assert torch.equal(state[name], value), name


def test_generation_resumes_from_its_cache(tmp_path, monkeypatch):
    from mergekit_safety.engine import generation
    from mergekit_safety.methods.somf.pairs import GenerationCache

    calls = []

    def fake_generate(model, tokenizer, prompts, max_new_tokens=32, batch_size=128, **_):
        calls.append(list(prompts))
        return [p.upper() for p in prompts]

    monkeypatch.setattr(generation, "generate", fake_generate)
    path = tmp_path / "g.jsonl"
    path.write_text('{"prompt": "a", "response": "A"}\n{"prompt": "b", "resp')  # cut by a kill
    answers = GenerationCache(str(path)).answer(None, None, ["a", "b", "c"], 8, 2, False, "x")
    assert answers == ["A", "B", "C"] and calls == [["b", "c"]]
    assert GenerationCache(str(path)).answer(None, None, ["c", "a"], 8, 2, False, "x") == ["C", "A"]
    assert calls == [["b", "c"]]  # nothing generated the second time


def _auto_config(lab, tmp_path, n_prompts, experts, extra):
    """A `preference_data: auto` SOMF config on the lab's first n harmful prompts; (config, prompts)."""
    prompts = tmp_path / "harmful_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in _lines(f"{lab}/data/harmful.jsonl")[:n_prompts]))
    config = tmp_path / "auto.yml"
    config.write_text(
        f"merge_method: somf\nbase_model: {lab}/aligned\nmodels:\n"
        + "".join(f"  - model: {lab}/{e}\n    parameters:\n      weight: 0.7\n" for e in experts)
        + f"parameters:\n  preference_data: auto\n  harmful_prompts: {prompts}\n"
        f"  mask: {tmp_path / 'mask.safetensors'}\n" + extra
    )
    return config, prompts


def test_config_only_auto_pairs_on_the_lab(quick_lab, tmp_path):
    """The lab's aligned model refuses, its experts comply: `preference_data: auto` builds
    pairs from them and trains the mask; the artifact records how."""
    from mergekit_safety.fusion.artifacts import open_artifact
    from mergekit_safety.lab.language import REFUSAL
    from mergekit_safety.plugin.config import locate_config

    config, prompts = _auto_config(quick_lab["path"], tmp_path, 48, ("expert_next", "expert_twin"),
                                   "  steps: 3\n  batch_size: 8\n  modules: attention\n  threads: 1\n")
    from mergekit_safety.plugin.checks import check_config_file

    assert [p for p in check_config_file(str(config)) if not p.warning] == []
    path = locate_config(str(config))
    extra = open_artifact(path).metadata.extra
    report = extra["auto_data"]
    assert report["pairs"] >= 8 and report["prompts"] == 48
    written = _lines(os.path.join(report["folder"], "pairs.jsonl"))
    assert all(r["chosen"] == REFUSAL and r["rejected"] != REFUSAL for r in written)
    # the generations live in one shared cache (the aligned answers serve every fusion of it)
    generations = sorted(os.listdir(tmp_path / "cache" / "pairs" / "generations"))
    assert [g.split("-")[0] for g in generations] == ["aligned", "fusion"]
    assert not os.path.exists(os.path.join(report["folder"], "generations"))
    # stale when the prompts change
    prompts.write_text(prompts.read_text() + json.dumps({"prompt": "another prompt"}) + "\n")
    with pytest.raises(ValueError, match="harmful_prompts changed"):
        locate_config(str(config))


def test_auto_without_prompts_is_reported_by_check(tmp_path):
    from mergekit_safety.plugin.checks import check_config_file

    family = build_lab_family(str(tmp_path / "models"), experts=1)
    config = tmp_path / "c.yml"
    config.write_text(merge_yaml("somf", family, ["expert0"], "  preference_data: auto\n"))
    problems = [p.message for p in check_config_file(str(config))]
    assert any("preference_data: auto needs harmful_prompts" in p for p in problems), problems


def test_auto_pairs_name_a_missing_device_before_generating(quick_lab, tmp_path, monkeypatch):
    """With `preference_data: auto`, a device this machine lacks is named before any answer is
    generated (the pairs' generation would otherwise load the aligned model first)."""
    import torch

    from mergekit_safety.methods.somf import pairs as pairs_module
    from mergekit_safety.methods.somf.training import SOMFTrainingError
    from mergekit_safety.plugin.config import locate_config

    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    config, _ = _auto_config(quick_lab["path"], tmp_path, 16, ("expert_next",), "  device: 'cuda:7'\n")
    monkeypatch.setattr(pairs_module, "build_pairs", lambda *a, **k: pytest.fail("generation started"))
    with pytest.raises(SOMFTrainingError, match=r"somf: device 'cuda:7': no CUDA device|this machine has"):
        locate_config(str(config))
