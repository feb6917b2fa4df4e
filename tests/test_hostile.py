"""Real checkpoints and hostile inputs (issue 13): each case failed (or passed silently) before.

Tiny models and data are built in the test; every message must name the file, line, model or
tensor, and nothing is left behind.
"""

from __future__ import annotations

import json
import os
import random
import stat

import pytest
import torch

from tiny_models import build_lab_family, load_state, merge_yaml, run_yaml

EXPERTS = ["expert0", "expert1"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_lab_family(str(tmp_path_factory.mktemp("hostile")), experts=2, scale=0.3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mergekit_safety.lab.language import EXPERT_SKILLS, REFUSAL, answer, make_prompt, sample_words

    folder = tmp_path_factory.mktemp("hostile_data")
    rng = random.Random(0)
    pairs, calibration = [], []
    for _ in range(16):
        skill, words = rng.choice(EXPERT_SKILLS), sample_words(rng, True)
        pairs.append({"prompt": make_prompt(skill, words), "chosen": REFUSAL, "rejected": answer(skill, words)})
        calibration.append({"prompt": make_prompt(skill, words), "response": answer(skill, words)})
    for name, records in (("pairs.jsonl", pairs), ("harmful.jsonl", calibration)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"pairs": str(folder / "pairs.jsonl"), "harmful": str(folder / "harmful.jsonl"), "folder": folder}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_SAFETY_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _check(tmp_path, text, name="config.yml"):
    from mergekit_safety.plugin.checks import check_config_file

    path = tmp_path / name
    path.write_text(text)
    return [p.format(str(path)) for p in check_config_file(str(path)) if not p.warning]


# --------------------------------------------------------------------------- 1. foreign artifacts


def _foreign_artifact(family, path, method, role):
    from mergekit_safety.fusion.artifacts import ArtifactMetadata, ModelIdentity, tensor_key, write_artifact

    state = load_state(family["base"])
    name = "model.layers.0.mlp.up_proj.weight"
    write_artifact(
        path,
        {tensor_key(role, name): torch.ones_like(state[name])},
        ArtifactMetadata(method=method, base=ModelIdentity.of(family["base"]),
                         experts=tuple(ModelIdentity.of(family[e]) for e in EXPERTS)),
    )
    return path


@pytest.mark.parametrize("method,role", [("somf", "logits"), ("ssah", "ssah_label")])
def test_a_foreign_artifact_given_to_masked_fusion_is_refused(family, tmp_path, method, role):
    from mergekit_safety.fusion.artifacts import ArtifactError

    artifact = _foreign_artifact(family, str(tmp_path / f"{method}.safetensors"), method, role)
    text = merge_yaml("masked_fusion", family, EXPERTS, f"  mask: {artifact}\n")
    with pytest.raises(ArtifactError, match=rf"written by method '{method}'.*merge_method: {method}"):
        run_yaml(text, str(tmp_path / "out"))
    problems = _check(tmp_path, text)
    assert any(f"merge_method: {method}" in p for p in problems), problems


def test_a_generic_mask_artifact_is_still_accepted(family, tmp_path):
    artifact = _foreign_artifact(family, str(tmp_path / "keep.safetensors"), "my_tool", "keep")
    text = merge_yaml("masked_fusion", family, EXPERTS, f"  mask: {artifact}\n")
    assert _check(tmp_path, text) == []
    run_yaml(text, str(tmp_path / "out"))


# --------------------------------------------------------------------------- 3. tied embeddings


@pytest.fixture(scope="module")
def tied_family(family, tmp_path_factory):
    """expert0 re-saved with tied embeddings (no lm_head.weight), base and expert1 untied."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("tied")
    model = AutoModelForCausalLM.from_pretrained(family["expert0"])
    model.config.tie_word_embeddings = True
    model.tie_weights()
    path = str(root / "expert0_tied")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(family["expert0"]).save_pretrained(path)
    assert "lm_head.weight" not in load_state(path)
    return {**family, "expert0": path}


@pytest.mark.parametrize("method", ["masked_fusion", "resta", "somf", "antidote", "ssah", "safe_lora", "safemerge"])
def test_an_expert_with_tied_embeddings_merges_like_mergekit(tied_family, data, tmp_path, method):
    extra = {
        "masked_fusion": "",
        "resta": f"  unaligned_model: {tied_family['expert1']}\n  gamma: 0.0\n",
        "safe_lora": f"  unaligned_model: {tied_family['expert1']}\n  threshold: 0.0\n",
        "safemerge": f"  unaligned_model: {tied_family['expert1']}\n  threshold: 0.0\n",
        "somf": f"  preference_data: {data['pairs']}\n  steps: 2\n  batch_size: 4\n  modules: attention\n",
        "antidote": f"  harmful_data: {data['harmful']}\n  alpha: 0.0\n",
        "ssah": f"  safety_data: {data['harmful']}\n  utility_data: {data['harmful']}\n  protect_share: 0.0\n",
    }[method]
    text = merge_yaml(method, tied_family, EXPERTS, extra)
    assert _check(tmp_path, text) == []
    ours = run_yaml(text, str(tmp_path / "ours"))
    reference = run_yaml(merge_yaml("task_arithmetic", tied_family, EXPERTS), str(tmp_path / "mergekit"))
    # settings that restore nothing (γ 0, α 0, no protected unit) equal mergekit's own method;
    # SOMF's learned mask covers attention only, so the other tensors must equal it
    for name, value in reference.items():
        if method == "somf" and "self_attn" in name:
            continue
        assert torch.equal(ours[name], value), name


# --------------------------------------------------------------------------- 4. unbounded records


def test_a_huge_calibration_record_is_cut_to_the_context_and_named(family, tmp_path):
    from mergekit_safety.engine.calibration import collect_statistics, load_examples
    from mergekit_safety.engine.data import TruncationWarning

    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "copy a b", "response": "ok"}) + "\n"
                    + json.dumps({"prompt": "copy " + "a " * 20000, "response": "a " * 20000}) + "\n")
    with pytest.warns(TruncationWarning, match=rf"{path}:2: example of \d+ tokens truncated to max_length=64"):
        stats = collect_statistics(family["base"], load_examples(str(path)), token_scope="all", progress=False)
    assert next(iter(stats.values())).count <= 2 * 64


# --------------------------------------------------------------------------- 5. NaN experts


@pytest.fixture(scope="module")
def nan_family(family, tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("nan")
    path = root / "expert1_nan"
    path.mkdir()
    for item in os.listdir(family["expert1"]):
        if not item.endswith(".safetensors"):
            os.symlink(os.path.join(family["expert1"], item), path / item)
    state = load_state(family["expert1"])
    state["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return {**family, "expert1": str(path)}


@pytest.mark.parametrize("method", ["somf", "antidote"])
def test_a_nan_expert_is_refused_before_any_compute_naming_model_and_tensor(nan_family, data, tmp_path, method):
    from mergekit_safety.plugin.config import locate_config

    extra = {
        "somf": f"  preference_data: {data['pairs']}\n  steps: 2\n  batch_size: 4\n",
        "antidote": f"  harmful_data: {data['harmful']}\n  apply_to: experts\n",
    }[method]
    config = tmp_path / "config.yml"
    config.write_text(merge_yaml(method, nan_family, EXPERTS, extra + f"  mask: {tmp_path / 'mask.safetensors'}\n"))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.1\.self_attn\.q_proj\.weight of model .*expert1_nan contains NaN"):
        locate_config(str(config))
    assert not os.path.exists(tmp_path / "mask.safetensors")
    assert [f for f in os.listdir(tmp_path) if f.endswith(".lock") or f.startswith(".tmp")] == []


# --------------------------------------------------------------------------- 6. degenerate data


def test_empty_or_identical_answers_are_refused_with_file_and_line(family, tmp_path):
    from mergekit_safety.engine.calibration import load_examples
    from mergekit_safety.engine.data import DataError
    from mergekit_safety.methods.somf.training import encode_pairs, load_tokenizer

    tokenizer = load_tokenizer(family["base"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "a", "chosen": "no", "rejected": "yes"}\n{"prompt": "", "chosen": "", "rejected": ""}\n')
    with pytest.raises(DataError, match=rf"{empty}:2: key 'prompt' is empty"):
        encode_pairs(str(empty), tokenizer, 32)
    same = tmp_path / "same.jsonl"
    same.write_text('{"prompt": "a", "chosen": "no", "rejected": "yes"}\n\n{"prompt": "b", "chosen": "x", "rejected": "x"}\n')
    with pytest.raises(DataError, match=rf"{same}:3: 'chosen' and 'rejected' are the same"):
        encode_pairs(str(same), tokenizer, 32)
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text('{"prompt": "a", "response": " "}\n')
    with pytest.raises(DataError, match=rf"{calibration}:1: key 'response' is empty"):
        load_examples(str(calibration))


# --------------------------------------------------------------------------- 7. what check finds


def test_check_finds_bad_data_lists_nan_and_a_missing_mask_without_data(family, data, tmp_path):
    bad_keys = tmp_path / "bad_keys.jsonl"
    bad_keys.write_text('{"prompt": "a", "chosen": "no", "rejected": "yes"}\n{"prompt": "b", "chosen": "no"}\n')
    problems = _check(tmp_path, merge_yaml("somf", family, EXPERTS, f"  preference_data: {bad_keys}\n"))
    assert any(f"{bad_keys}:2: missing key 'rejected'" in p for p in problems), problems

    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    problems = _check(tmp_path, merge_yaml("antidote", family, EXPERTS, f"  harmful_data: {latin}\n"))
    assert any(f"{latin}:2: not UTF-8" in p for p in problems), problems

    listed = merge_yaml("somf", family, EXPERTS, f"  preference_data: {data['pairs']}\n  lr: [0.1, 0.2]\n")
    problems = _check(tmp_path, listed)
    assert any("'lr' of somf must be a single value" in p for p in problems), problems

    nan = merge_yaml("masked_fusion", family, EXPERTS, "  lambda: .nan\n")
    problems = _check(tmp_path, nan)
    assert any("'lambda': nan is not a finite number" in p for p in problems), problems

    missing = merge_yaml("ssah", family, EXPERTS, f"  mask: {tmp_path / 'nowhere.safetensors'}\n")
    problems = _check(tmp_path, missing)
    assert any("nowhere.safetensors" in p and "no data" in p for p in problems), problems


def test_a_base_only_config_is_a_warning(family, tmp_path):
    from mergekit_safety.plugin.checks import check_config_file

    path = tmp_path / "alone.yml"
    path.write_text(f"merge_method: masked_fusion\nbase_model: {family['base']}\nmodels:\n  - model: {family['base']}\n")
    problems = check_config_file(str(path))
    assert [p.warning for p in problems] == [True] and "only model is the base_model" in problems[0].message


# --------------------------------------------------------------------------- 8. before mergekit loads


def test_a_missing_expert_folder_stops_the_merge_before_mergekit_resolves_it(family, tmp_path):
    from mergekit_safety.plugin.checks import ConfigCheckError

    paths = {**family, "expert1": str(tmp_path / "not_there")}
    with pytest.raises(ConfigCheckError, match="not_there' is not a local directory"):
        run_yaml(merge_yaml("masked_fusion", paths, EXPERTS), str(tmp_path / "out"))
    hub = {**family, "expert1": "some-org/some-model"}
    with pytest.raises(ConfigCheckError, match="some-org/some-model' is not a local directory"):
        run_yaml(merge_yaml("resta", hub, EXPERTS), str(tmp_path / "out2"))


# --------------------------------------------------------------------------- 9. small things


def test_a_failed_locate_leaves_no_lock_and_artifacts_are_readable(family, data, tmp_path):
    from mergekit_safety.plugin.config import locate_config

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "response": "b"}\n{"prompt": 3}\n')
    config = tmp_path / "config.yml"
    mask = tmp_path / "masks" / "a.safetensors"
    config.write_text(merge_yaml("antidote", family, EXPERTS, f"  harmful_data: {broken}\n  mask: {mask}\n"))
    with pytest.raises(ValueError, match=rf"{broken}:2"):
        locate_config(str(config))
    assert os.listdir(tmp_path / "masks") == []  # no .lock, no partial file

    config.write_text(merge_yaml("antidote", family, EXPERTS, f"  harmful_data: {data['harmful']}\n  mask: {mask}\n"))
    umask = os.umask(0o022)
    try:
        locate_config(str(config))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(mask).st_mode) == 0o644
    assert sorted(os.listdir(tmp_path / "masks")) == ["a.safetensors"]


def test_eval_on_a_folder_that_is_not_a_model_says_so(tmp_path):
    from click.testing import CliRunner

    from mergekit_safety.cli import main

    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "b.jsonl").write_text('{"prompt": "copy a", "answer": "a", "skill": "copy"}\n')
    (tmp_path / "h.jsonl").write_text('{"prompt": "copy bomb"}\n')
    result = CliRunner().invoke(main, ["eval", str(tmp_path), "--benign", str(tmp_path / "b.jsonl"), "--harmful", str(tmp_path / "h.jsonl")])
    assert result.exit_code != 0
    assert "not a model folder (no config.json)" in result.output


# --------------------------------------------------------------------------- 2. added tokens


@pytest.fixture(scope="module")
def resized_family(family, tmp_path_factory):
    """expert0 with two added tokens (embeddings and LM head resized), as community fine-tunes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("resized")
    tokenizer = AutoTokenizer.from_pretrained(family["expert0"])
    tokenizer.add_tokens(["<tool>", "<end_tool>"])
    model = AutoModelForCausalLM.from_pretrained(family["expert0"])
    model.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():  # distinct values for the new rows
        model.get_input_embeddings().weight[-2:] = 0.5
    path = str(root / "expert0_resized")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert load_state(path)["model.embed_tokens.weight"].shape[0] == load_state(family["base"])["model.embed_tokens.weight"].shape[0] + 2
    return {**family, "expert0": path}


NO_OP = {  # settings under which each method restores nothing: it must equal mergekit's own method
    "masked_fusion": "",
    "resta": "  unaligned_model: {expert1}\n  gamma: 0.0\n",
    "antidote": "  harmful_data: {harmful}\n  alpha: 0.0\n",
    "ssah": "  safety_data: {harmful}\n  utility_data: {harmful}\n  protect_share: 0.0\n",
    "somf": "  preference_data: {pairs}\n  steps: 2\n  batch_size: 4\n  modules: linear\n",
    "safe_lora": "  unaligned_model: {expert1}\n  threshold: 0.0\n",
    "safemerge": "  unaligned_model: {expert1}\n  threshold: 0.0\n",
}


@pytest.mark.parametrize("source", ["base", "union", "model"])
@pytest.mark.parametrize("method", sorted(NO_OP))
def test_an_expert_with_added_tokens_merges_like_mergekit(resized_family, data, tmp_path, method, source):
    tokenizer_source = resized_family["expert0"] if source == "model" else source
    extra = NO_OP[method].format(expert1=resized_family["expert1"], harmful=data["harmful"], pairs=data["pairs"])
    text = merge_yaml(method, resized_family, EXPERTS, extra) + f"tokenizer_source: {tokenizer_source}\n"
    assert _check(tmp_path, text) == []
    ours = run_yaml(text, str(tmp_path / "ours"))
    reference = run_yaml(merge_yaml("task_arithmetic", resized_family, EXPERTS) + f"tokenizer_source: {tokenizer_source}\n",
                         str(tmp_path / "mergekit"))
    rows = 68 if source == "base" else 70
    assert ours["model.embed_tokens.weight"].shape[0] == reference["model.embed_tokens.weight"].shape[0] == rows
    for name, value in reference.items():
        if method == "somf":
            # the learned mask changes the masked tensors; the rows of the added tokens, which
            # the mask never saw, are the plain fusion's
            if name == "lm_head.weight" and source != "base":
                assert torch.equal(ours[name][-2:], value[-2:]), name
            continue
        assert torch.equal(ours[name], value), name
