"""SOMF: learned mask logits, the functional fused model, the merge method and its controls."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from tiny_models import build_lab_family, load_state, merge_yaml, run_yaml

from mergekit_safety.fusion.artifacts import ArtifactError, open_artifact, tensor_key, write_artifact
from mergekit_safety.plugin.config import locate_config, request_from_config
from mergekit_safety.methods.somf.method import SOMF, SOMFSettings, mask_from_logits, random_control_mask
from mergekit_safety.methods.somf.training import (
    FunctionalFusion,
    SOMFTrainingError,
    concrete_sample,
    train_mask,
)

EXPERTS = ["expert0", "expert1"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_lab_family(str(tmp_path_factory.mktemp("somf_family")), experts=2, scale=0.3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mergekit_safety.lab.language import EXPERT_SKILLS, REFUSAL, answer, make_prompt, sample_words

    folder = tmp_path_factory.mktemp("somf_data")
    rng = random.Random(0)
    pairs, utility = [], []
    for _ in range(24):
        skill, words = rng.choice(EXPERT_SKILLS), sample_words(rng, True)
        pairs.append({"prompt": make_prompt(skill, words), "chosen": REFUSAL, "rejected": answer(skill, words)})
        skill, words = rng.choice(EXPERT_SKILLS), sample_words(rng, False)
        utility.append({"prompt": make_prompt(skill, words), "response": answer(skill, words)})
    for name, records in (("pairs.jsonl", pairs), ("utility.jsonl", utility)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"pairs": str(folder / "pairs.jsonl"), "utility": str(folder / "utility.jsonl")}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_SAFETY_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one CPU thread is many times faster than two on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def somf_yaml(family, data, extra="", density=""):
    parameters = f"  preference_data: {data['pairs']}\n  steps: 4\n  batch_size: 8\n  preset: paper\n" + extra
    return merge_yaml("somf", family, EXPERTS, parameters, density)


def settings_for(family, data, **overrides):
    # the mechanics tests run the paper's preset (init 0: masks that move in a few steps)
    values = dict(preference_data=data["pairs"], steps=4, batch_size=8, weights=(0.5, 0.75), densities=(1.0, 1.0),
                  preset="paper")
    values.update(overrides)
    return SOMFSettings(**values)


def experts_of(family):
    return [family[n] for n in EXPERTS]


# --------------------------------------------------------------------------- train = merge


@pytest.mark.parametrize(
    "backbone, density, mode",
    [
        ("task_arithmetic", "", "binary"),
        ("task_arithmetic", "", "expected"),
        ("ties", "\n      density: 0.5", "binary"),
        ("dare_linear", "\n      density: 0.6", "binary"),
    ],
)
def test_frozen_logits_functional_model_equals_merge(family, data, tmp_path, backbone, density, mode):
    """The model training optimises, with the merge-time mask, IS the merged model."""
    mask = tmp_path / "somf.safetensors"
    extra = f"  backbone: {backbone}\n  lambda: 0.9\n  mask: {mask}\n  mask_mode: {mode}\n  modules: attention,mlp\n"
    text = somf_yaml(family, data, extra, density)
    (tmp_path / "c.yml").write_text(text)
    locate_config(str(tmp_path / "c.yml"))
    merged = run_yaml(text, str(tmp_path / "out"))

    method, request = request_from_config(str(tmp_path / "c.yml"))
    fusion = FunctionalFusion(family["base"], experts_of(family), SOMFSettings.from_request(request), progress=False)
    artifact = open_artifact(str(mask))
    with torch.no_grad():
        for name in fusion.names:
            fusion.logits[name].copy_(artifact.get(tensor_key("logits", name)))
    params = fusion.parameters_for(fusion.fixed_masks(mode))
    density_binary = sum(int((fusion.logits[n] > 0).sum()) for n in fusion.names) / fusion.masked_elements()
    assert 0.05 < density_binary < 0.95  # a real, non-trivial mask is being compared
    for name, value in params.items():
        assert torch.equal(value.detach(), merged[name]), name
    own = fusion.model.state_dict()
    for name in merged:  # unmasked tensors (embeddings, norms, lm_head) = the plain backbone
        if name not in params:
            assert torch.equal(own[name], merged[name]), name
    # and the logits of the two models agree
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 4, 7, 20, 21, 22, 5]])
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    with torch.no_grad():
        ours = fusion.forward(params, ids, torch.ones_like(ids))
        theirs = reference(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_gradients_reach_only_the_logits(family, data):
    settings = settings_for(family, data, modules="attention")
    fusion = FunctionalFusion(family["base"], experts_of(family), settings, progress=False)
    generator = torch.Generator().manual_seed(0)
    params = fusion.parameters_for(fusion.sample_masks(generator))
    ids = torch.tensor([[1, 4, 7, 20, 21, 22, 5], [1, 4, 8, 23, 24, 25, 5]])
    fusion.forward(params, ids, torch.ones_like(ids)).logsumexp(-1).mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in fusion.model.parameters())
    assert all(not t.requires_grad for t in fusion.base.values())
    assert all(not t.requires_grad for ts in fusion.experts.values() for t in ts)
    for name, logits in fusion.logits.items():
        assert logits.grad is not None and logits.grad.abs().sum() > 0, name
    assert set(fusion.names) == {n for n in load_state(family["base"]) if "self_attn" in n}


def test_concrete_sample_is_a_relaxed_bernoulli():
    logits = torch.full((200_000,), 1.0, requires_grad=True)
    sample = concrete_sample(logits, 0.5, torch.Generator().manual_seed(0))
    sample_values = sample.detach()
    assert 0.0 <= float(sample_values.min()) and float(sample_values.max()) <= 1.0
    # P(m > 1/2) = σ(s) for RelaxedBernoulli(T, s)
    assert abs(float((sample_values > 0.5).float().mean()) - float(torch.sigmoid(torch.tensor(1.0)))) < 0.01
    sample.sum().backward()
    assert logits.grad is not None and float((logits.grad > 0).float().mean()) > 0.99  # reparameterised


# --------------------------------------------------------------------------- export


def test_binary_export_is_deterministic_for_a_seed(family, data, tmp_path):
    text = somf_yaml(family, data, "  modules: attention\n  utility_data: " + data["utility"] + "\n  utility_weight: 1.0\n")
    first = run_yaml(text, str(tmp_path / "a"))
    (cached,) = (tmp_path / "cache" / "artifacts").glob("somf-*.safetensors")
    cached = open_artifact(str(cached))
    torch.manual_seed(12345)  # the global RNG state must not matter
    paths = {}
    for label, seed in (("again", 0), ("other", 1)):
        config = tmp_path / f"{label}.yml"
        config.write_text(text + f"  train_seed: {seed}\n  mask: {tmp_path / label}.safetensors\n")
        paths[label] = locate_config(str(config))
    again, other = open_artifact(paths["again"]), open_artifact(paths["other"])
    names = sorted(cached.keys())
    assert names == sorted(again.keys()) and len(names) == 8  # q, k, v, o × 2 layers
    assert all(torch.equal(cached.get(k), again.get(k)) for k in names)  # recomputed: identical
    assert any(not torch.equal((again.get(k) > 0), (other.get(k) > 0)) for k in names)
    second = run_yaml(text, str(tmp_path / "b"))
    assert all(torch.equal(first[k], second[k]) for k in first)
    meta = again.metadata
    assert meta.extra["masked_tensors"] == 8
    assert 0 < meta.extra["mask_density_binary"] < 1
    assert meta.settings["steps"] == 4 and meta.settings["beta"] == 0.1
    assert meta.settings["experts"] == [{"weight": 0.5, "density": 1.0}, {"weight": 0.75, "density": 1.0}]
    assert len(meta.extra["history"]) >= 2 and meta.extra["final_utility_loss"] is not None


def test_mask_modes_and_random_control():
    logits = torch.tensor([[-2.0, 0.5, 3.0], [0.0, -0.1, 1.0]])
    assert torch.equal(mask_from_logits(logits, "binary"), torch.tensor([[0.0, 1, 1], [0, 0, 1]]))
    torch.testing.assert_close(mask_from_logits(logits, "expected"), torch.sigmoid(logits))
    big = (torch.rand(50, 40, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    control = random_control_mask(big, "w", seed=0)
    assert control.sum() == big.sum() and not torch.equal(control, big)
    assert torch.equal(control, random_control_mask(big, "w", seed=0))
    assert not torch.equal(control, random_control_mask(big, "w", seed=1))
    assert not torch.equal(control, random_control_mask(big, "v", seed=0))


def test_random_control_merge_has_the_learned_density(family, data, tmp_path):
    text = somf_yaml(family, data, "  modules: attention\n  lambda: 1.0\n")
    learned = run_yaml(text, str(tmp_path / "a"))
    control = run_yaml(text + "  control: random\n", str(tmp_path / "b"))
    base = load_state(family["base"])
    artifact = open_artifact(next(iter((tmp_path / "cache" / "artifacts").glob("somf-*.safetensors"))).as_posix())
    name = "model.layers.0.self_attn.q_proj.weight"
    learned_keep = (artifact.get(tensor_key("logits", name)) > 0)
    changed = control[name] != base[name]
    assert int(changed.sum()) == int(learned_keep.sum())  # equal density, per tensor
    assert not torch.equal(changed, learned_keep)
    assert not torch.equal(control[name], learned[name])


def test_mask_threshold_moves_along_one_artifact(family, data, tmp_path):
    """mask_threshold: 1[s > t] from the same learned logits — t = 0 is the learned mask, a
    threshold above every logit keeps nothing (the base), one below keeps everything (the
    plain backbone); no new artifact is learned for any t."""
    text = somf_yaml(family, data, "  modules: attention\n  lambda: 1.0\n")
    learned = run_yaml(text, str(tmp_path / "a"))
    zero = run_yaml(text + "  mask_threshold: 0.0\n", str(tmp_path / "z"))
    none = run_yaml(text + "  mask_threshold: 1000.0\n", str(tmp_path / "n"))
    every = run_yaml(text + "  mask_threshold: -1000.0\n", str(tmp_path / "e"))
    plain = run_yaml(merge_yaml("task_arithmetic", family, EXPERTS, "  lambda: 1.0\n"), str(tmp_path / "p"))
    assert len(list((tmp_path / "cache" / "artifacts").glob("somf-*.safetensors"))) == 1
    base = load_state(family["base"])
    name = "model.layers.0.self_attn.q_proj.weight"
    assert all(torch.equal(zero[k], learned[k]) for k in learned)
    assert torch.equal(none[name], base[name].to(none[name].dtype))
    assert torch.equal(every[name], plain[name])
    artifact = open_artifact(next(iter((tmp_path / "cache" / "artifacts").glob("somf-*.safetensors"))).as_posix())
    assert 0 < int((artifact.get(tensor_key("logits", name)) > 0).sum()) < base[name].numel()  # a real middle point


# --------------------------------------------------------------------------- the method


@pytest.mark.parametrize("backbone, builtin, density", [
    ("task_arithmetic", "task_arithmetic", ""),
    ("ties", "ties", "\n      density: 0.5"),
])
def test_all_keep_mask_equals_the_backbone(family, data, tmp_path, backbone, builtin, density):
    mask = tmp_path / "keep.safetensors"
    extra = f"  backbone: {backbone}\n  lambda: 0.8\n  mask: {mask}\n  modules: linear\n"
    text = somf_yaml(family, data, extra, density)
    (tmp_path / "c.yml").write_text(text)
    locate_config(str(tmp_path / "c.yml"))
    artifact = open_artifact(str(mask))
    keep_all = {k: torch.full_like(artifact.get(k), 5.0) for k in artifact.keys()}
    write_artifact(str(mask), keep_all, artifact.metadata)
    ours = run_yaml(text, str(tmp_path / "ours"))
    expected = run_yaml(merge_yaml(builtin, family, EXPERTS, "  lambda: 0.8\n", density), str(tmp_path / "builtin"))
    for name in expected:
        assert torch.equal(ours[name], expected[name]), name


def test_config_only_merge_masks_only_the_chosen_modules(family, data, tmp_path):
    text = somf_yaml(family, data, "  modules: q_proj|v_proj\n  lambda: 1.0\n")
    ours = run_yaml(text, str(tmp_path / "ours"))
    plain = run_yaml(merge_yaml("task_arithmetic", family, EXPERTS, "  lambda: 1.0\n"), str(tmp_path / "plain"))
    artifacts = list((tmp_path / "cache" / "artifacts").glob("somf-*.safetensors"))
    assert len(artifacts) == 1
    masked = {k.split("/", 1)[1] for k in open_artifact(str(artifacts[0])).keys()}
    assert masked == {n for n in plain if "q_proj" in n or "v_proj" in n}
    for name in plain:
        if name in masked:
            assert not torch.equal(ours[name], plain[name]), name
        else:
            assert torch.equal(ours[name], plain[name]), name
    run_yaml(text, str(tmp_path / "again"))  # reused, not recomputed
    assert len(list((tmp_path / "cache" / "artifacts").glob("somf-*.safetensors"))) == 1


def test_changed_training_setting_makes_an_explicit_artifact_stale(family, data, tmp_path):
    mask = tmp_path / "m.safetensors"
    text = somf_yaml(family, data, f"  modules: attention\n  mask: {mask}\n")
    run_yaml(text, str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"stale .*setting temperature: 0.5 → 0.7"):
        run_yaml(text + "  temperature: 0.7\n", str(tmp_path / "b"))
    run_yaml(text + "  mask_mode: expected\n  control: random\n", str(tmp_path / "c"))  # merge-only


def test_without_data_the_method_is_the_plain_backbone(family, tmp_path, caplog):
    text = merge_yaml("somf", family, EXPERTS, "  lambda: 0.7\n")
    with caplog.at_level("WARNING"):
        ours = run_yaml(text, str(tmp_path / "a"))
    plain = run_yaml(merge_yaml("task_arithmetic", family, EXPERTS, "  lambda: 0.7\n"), str(tmp_path / "b"))
    assert all(torch.equal(ours[k], plain[k]) for k in plain)
    assert "WITHOUT safety restoration" in caplog.text


def test_bad_settings_are_named(family, data, tmp_path):
    with pytest.raises(SOMFTrainingError, match=r"`modules` entry 'nothing_like_this' matches no tensor"):
        train_mask(family["base"], experts_of(family), settings_for(family, data, modules="nothing_like_this"), progress=False)
    if not torch.cuda.is_available():  # a device this machine lacks: named before any model loads
        with pytest.raises(SOMFTrainingError, match=r"device 'cuda:1': no CUDA device"):
            train_mask(family["base"], experts_of(family), settings_for(family, data, device="cuda:1"), progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "copy apple", "chosen": "apple"}\n')
    with pytest.raises(Exception, match=r"bad.jsonl:1: missing key 'rejected'"):
        train_mask(family["base"], experts_of(family), settings_for(family, {"pairs": str(bad)}), progress=False)
    with pytest.raises(Exception, match="temperature"):
        run_yaml(somf_yaml(family, data, "  temperature: 0\n"), str(tmp_path / "o"))


# --------------------------------------------------------------------------- learning


def test_training_lowers_the_dpo_loss_of_the_binary_mask(family, data):
    """The objective is really optimised: the merge-time mask prefers the refusals more than
    the unmasked fusion (reference) does, on the training pairs."""
    settings = settings_for(family, data, steps=40, modules="linear", lr=0.05)
    logits, extra = train_mask(family["base"], experts_of(family), settings, progress=False)
    history = extra["history"]
    assert history[-1]["dpo"] < history[0]["dpo"] - 0.02
    assert extra["binary_mask_eval"]["dpo_loss"] < 0.69  # ln 2 = unmasked fusion
    assert extra["binary_mask_eval"]["reward_accuracy"] > 0.5


# --------------------------------------------------------------------------- memory paths


def test_offloaded_training_equals_in_memory_training(family, data, tmp_path):
    """Large-model path: only the masked modules in memory, the rest streamed from disk."""
    settings = settings_for(family, data, modules="attention", steps=3)
    in_memory, _ = train_mask(family["base"], experts_of(family), settings, progress=False)
    offloaded_settings = settings_for(family, data, modules="attention", steps=3, offload_folder=str(tmp_path / "off"))
    fusion = FunctionalFusion(family["base"], experts_of(family), offloaded_settings, progress=False)
    on_disk = [n for n, m in fusion.model.named_modules() if getattr(getattr(m, "_hf_hook", None), "offload", False)]
    assert any("mlp" in n for n in on_disk) and not any("self_attn" in n for n in on_disk)
    offloaded, _ = train_mask(family["base"], experts_of(family), offloaded_settings, progress=False)
    for name in in_memory:
        torch.testing.assert_close(offloaded[name], in_memory[name], rtol=0, atol=1e-5)


def test_lora_expert_masks_only_adapted_tensors(family, data, tmp_path):
    """`base+adapter` references: merged once, and only tensors the adapter changes are masked."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(family["base"], dtype=torch.float32)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    lora.save_pretrained(str(adapter))
    text = (
        f"merge_method: somf\nbase_model: {family['base']}\ndtype: float32\nmodels:\n"
        f"  - model: {family['base']}+{adapter}\n    parameters:\n      weight: 1.0\n"
        f"parameters:\n  preference_data: {data['pairs']}\n  steps: 3\n  batch_size: 8\n  modules: attention\n"
    )
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lora_merge_cache=str(tmp_path / "lora"))
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "out"), options=options)
    merged = load_state(str(tmp_path / "out"))
    artifact = open_artifact(str(next((tmp_path / "cache" / "artifacts").glob("somf-*.safetensors"))))
    masked = {k.split("/", 1)[1] for k in artifact.keys()}
    assert masked == {n for n in merged if "q_proj" in n or "v_proj" in n}
    assert len(artifact.metadata.extra["unmasked_selected_tensors"]) == 4  # k_proj, o_proj × 2 layers


# --------------------------------------------------------------------------- extensions


def test_dpo_reference_options(family, data):
    """`reference`: the unmasked fusion, the aligned (base) model, or none — each really used."""
    from transformers import AutoModelForCausalLM

    from mergekit_safety.methods.somf.training import encode_pairs, load_tokenizer, reference_logps, sequence_logps

    tokenizer = load_tokenizer(family["base"])
    ids, att, resp, n = encode_pairs(data["pairs"], tokenizer, 64)
    fusion = FunctionalFusion(family["base"], experts_of(family), settings_for(family, data), progress=False)
    of = lambda kind, **kw: reference_logps(settings_for(family, data, reference=kind), family["base"], [(ids, att, resp)], 8, **kw)[0]
    aligned_model = AutoModelForCausalLM.from_pretrained(family["base"], dtype=torch.float32)
    with torch.no_grad():
        expected_aligned = sequence_logps(aligned_model(input_ids=ids, attention_mask=att).logits, ids, resp)
        expected_fusion = sequence_logps(fusion.forward(None, ids, att), ids, resp)
    torch.testing.assert_close(of("aligned"), expected_aligned, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(of("fusion", fusion=fusion), expected_fusion, rtol=1e-4, atol=1e-3)
    assert torch.equal(of("none"), torch.zeros(2 * n))
    assert not torch.allclose(expected_aligned, expected_fusion, atol=1e-2)  # the options differ here
    # several sets (safety and benign pairs): the aligned model is loaded once for all of them
    loads = []
    original = AutoModelForCausalLM.from_pretrained
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a) or original(*a, **k))
        two = reference_logps(settings_for(family, data, reference="aligned"), family["base"],
                              [(ids, att, resp), (ids[:2], att[:2], resp[:2])], 8)
    assert len(loads) == 1
    torch.testing.assert_close(two[0], expected_aligned, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(two[1], expected_aligned[:2], rtol=1e-4, atol=1e-3)
    # and training uses the chosen reference: different logits for different references
    learned = {
        kind: train_mask(family["base"], experts_of(family), settings_for(family, data, reference=kind, steps=3, lr=0.05), progress=False)[0]
        for kind in ("fusion", "aligned", "none")
    }
    some = next(iter(learned["fusion"]))
    assert not torch.equal(learned["fusion"][some], learned["aligned"][some])
    assert not torch.equal(learned["fusion"][some], learned["none"][some])
    with pytest.raises(Exception, match="reference"):
        settings_for(family, data, reference="random")


def test_head_at_response_positions_equals_the_full_head(family, data):
    """Training computes the output head only where a response token is predicted: the same
    log-probs and utility KL as the full head, with or without the model's logits_to_keep."""
    from mergekit_safety.methods.somf.training import (
        encode_utility, load_tokenizer, response_positions, sequence_logps, utility_term)

    tokenizer = load_tokenizer(family["base"])
    ids, att, resp = encode_utility(data["utility"], tokenizer, 64)
    fusion = FunctionalFusion(family["base"], experts_of(family), settings_for(family, data), progress=False)
    params = fusion.parameters_for(fusion.sample_masks(torch.Generator().manual_seed(0)))
    positions = response_positions(resp)
    assert 0 < len(positions) < ids.shape[1] - 1
    with torch.no_grad():
        full_logits = fusion.forward(params, ids, att)
        full = sequence_logps(full_logits, ids, resp)
        reference = torch.log_softmax(fusion.forward(None, ids, att).float(), -1)
        mask = resp[:, 1:].bool()
        expected_kl = torch.nn.functional.kl_div(torch.log_softmax(full_logits[:, :-1].float(), -1)[mask],
                                                 reference[:, :-1][mask], log_target=True, reduction="batchmean")
        assert fusion._takes_logits_to_keep
        for takes in (True, False):
            fusion._logits_to_keep = takes
            assert fusion.forward(params, ids, att, positions).shape[1] == len(positions)
            torch.testing.assert_close(fusion.response_logps(params, ids, att, resp), full, rtol=1e-5, atol=1e-4)
            computed = utility_term(fusion, params, ids, att, resp, "kl", None)
            precomputed = utility_term(fusion, params, ids, att, resp, "kl", reference)
            torch.testing.assert_close(computed, expected_kl, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(precomputed, expected_kl, rtol=1e-4, atol=1e-6)
    assert float(expected_kl) > 0  # a sampled mask changes the model: the check compares something


def test_chosen_nll_term_is_optimised(family, data):
    """`chosen_nll_weight` adds an NLL on the safe answers: recorded, and it changes the mask
    towards a higher likelihood of the refusals."""
    base = settings_for(family, data, steps=30, lr=0.05, modules="linear")
    plain, plain_extra = train_mask(family["base"], experts_of(family), base, progress=False)
    nll, nll_extra = train_mask(family["base"], experts_of(family), base.model_copy(update={"chosen_nll_weight": 5.0}), progress=False)
    assert "chosen_nll" in nll_extra["history"][-1] and "chosen_nll" not in plain_extra["history"][-1]
    assert nll_extra["history"][-1]["chosen_nll"] < nll_extra["history"][0]["chosen_nll"]
    assert any(not torch.equal(plain[k], nll[k]) for k in plain)
    assert 0.0 <= nll_extra["binary_mask_eval"]["chosen_first_token_greedy"] <= 1.0


# --------------------------------------------------------------------------- stopping rule


def test_stopping_rule_stops_early_and_records_why(family, data):
    from mergekit_safety.methods.somf.training import train_mask

    # a generous rule (any margin, half of the held-aside pairs) holds at the first check
    settings = settings_for(family, data, steps=40, lr=0.05, modules="attention", stop_preference=0.5,
                            stop_margin=-1e9, check_every=5, validation_share=0.25)
    logits, extra = train_mask(family["base"], experts_of(family), settings, progress=False)
    stopping = extra["stopping"]
    assert stopping["stopped_early"] and stopping["steps_run"] == 5
    assert stopping["held_aside_pairs"] == 6 and "held-aside preference" in stopping["reason"]
    from mergekit_safety.methods.somf.method import rule_warning

    assert stopping["held"] and rule_warning(stopping) is None
    assert stopping["checks"][0]["preferred"] == 1.0

    # an impossible rule runs to the cap and says so
    settings = settings_for(family, data, steps=10, modules="attention", stop_preference=1.0,
                            stop_margin=1e9, check_every=5)
    _, extra = train_mask(family["base"], experts_of(family), settings, progress=False)
    assert not extra["stopping"]["stopped_early"] and extra["stopping"]["steps_run"] == 10
    assert "step cap 10 reached" in extra["stopping"]["reason"] and len(extra["stopping"]["checks"]) == 2


def spy_on_stopping_rules(monkeypatch):
    """The StoppingRule instances training creates (appended to the returned list)."""
    from mergekit_safety.methods.somf import training

    rules = []

    class Spy(training.StoppingRule):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            rules.append(self)

    monkeypatch.setattr(training, "StoppingRule", Spy)
    return rules


def test_held_aside_pairs_are_never_trained_on(family, data, monkeypatch):
    from mergekit_safety.methods.somf import training

    last, trained = {}, []
    original_trim, original_sample = training._trim, training.FunctionalFusion.sample_masks

    def trim(ids, att, resp):
        last["ids"] = ids
        return original_trim(ids, att, resp)

    def sample_masks(self, generator):  # called once per step, right after its batch is cut
        trained.append(last["ids"])
        return original_sample(self, generator)

    rules = spy_on_stopping_rules(monkeypatch)
    monkeypatch.setattr(training, "_trim", trim)
    monkeypatch.setattr(training.FunctionalFusion, "sample_masks", sample_masks)
    settings = settings_for(family, data, steps=12, modules="attention", stop_preference=1.0, stop_margin=1e9,
                            check_every=100, validation_share=0.25, batch_size=4)
    training.train_mask(family["base"], experts_of(family), settings, progress=False)
    ids, _, _, _ = training.encode_pairs(data["pairs"], training.load_tokenizer(family["base"]), settings.max_length)
    held = {tuple(ids[i].tolist()) for i in rules[0].held_index.tolist()}
    rows = {tuple(row.tolist()) for batch in trained for row in batch}
    assert len(trained) == 12 and len(held) == 6
    # a batch is trimmed to its longest row: compare each trained row with the held rows' prefixes
    assert not any(h[: len(r)] == r for h in held for r in rows)


def test_benign_pairs_term_and_its_held_aside_check(family, data, tmp_path, monkeypatch):
    """benign_weight: the fusion's own benign answers (chosen) against the pairs' refusals
    (rejected); trained on, recorded, and — with the stopping rule — held aside and checked."""
    from mergekit_safety.lab.language import REFUSAL
    from mergekit_safety.methods.somf import training

    tokenizer = training.load_tokenizer(family["base"])
    utility = tmp_path / "utility.jsonl"
    records = [json.loads(line) for line in open(data["utility"])]
    records.insert(1, {"prompt": records[0]["prompt"], "response": REFUSAL})  # a refusal is no benign pair
    utility.write_text("".join(json.dumps(r) + "\n" for r in records))
    ids, att, resp, n = training.encode_benign_pairs(str(utility), data["pairs"], tokenizer, 64)
    assert n == len(records) - 1 and ids.shape[0] == 2 * n
    decoded = [tokenizer.decode(ids[i][resp[i].bool()], skip_special_tokens=True).strip() for i in (0, n)]
    assert decoded == [records[0]["response"], REFUSAL]

    settings = settings_for(family, data, utility_data=str(utility), benign_weight=1.0, steps=6, modules="attention",
                            stop_preference=1.0, stop_margin=1e9, check_every=3, validation_share=0.25)
    rules = spy_on_stopping_rules(monkeypatch)
    _, extra = training.train_mask(family["base"], experts_of(family), settings, progress=False)
    assert all("benign_dpo" in h for h in extra["history"])
    checks = extra["stopping"]["checks"]
    assert len(checks) == 2 and all(0.0 <= c["benign_preferred"] <= 1.0 for c in checks)
    rule = rules[0]
    held, train = set(rule.benign_held_index.tolist()), set(rule.benign_train_index.tolist())
    assert held and not held & train and held | train == set(range(n))
    assert extra["stopping"]["held_aside_benign_pairs"] == len(held)
    # bad inputs: nothing but refusals in the utility data; too few benign pairs to hold some aside
    only_refusals = tmp_path / "refusals.jsonl"
    only_refusals.write_text(json.dumps({"prompt": "p", "response": REFUSAL}) + "\n")
    with pytest.raises(SOMFTrainingError, match="no benign record differs from the refusals"):
        training.encode_benign_pairs(str(only_refusals), data["pairs"], tokenizer, 64)
    with pytest.raises(SOMFTrainingError, match="5 benign pairs are too few to hold 4 aside"):
        training.StoppingRule(settings, 24, 8, n_benign=5)
    # off (the default of both presets): no benign pairs at all
    _, extra = training.train_mask(family["base"], experts_of(family), settings_for(family, data, steps=2), progress=False)
    assert "benign_dpo" not in extra["history"][0]
    with pytest.raises(SOMFTrainingError, match="benign_weight needs utility_data"):
        training.train_mask(family["base"], experts_of(family), settings_for(family, data, benign_weight=1.0), progress=False)


def test_prefix_mask_and_greedy_prefix_follow_the_answers_first_tokens(family, data):
    """prefix_mask keeps each row's first k answer tokens; greedy_prefix is true exactly where
    the argmax at those positions is the answer's token (checked against a full forward pass)."""
    from mergekit_safety.methods.somf import training

    resp = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    assert training.prefix_mask(resp, 2).tolist() == [[0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]]
    settings = settings_for(family, data, steps=1, modules="attention")
    tokenizer = training.load_tokenizer(family["base"])
    ids, att, resp, n = training.encode_pairs(data["pairs"], tokenizer, settings.max_length)
    fusion = training.FunctionalFusion(family["base"], experts_of(family), settings)
    params = fusion.parameters_for(fusion.fixed_masks("binary"))
    rows = torch.arange(8)
    b_ids, b_att, b_resp = training._trim(ids[rows], att[rows], resp[rows])
    with torch.no_grad():
        logits = fusion.forward(params, b_ids, b_att)
        for k in (1, 3):
            got = fusion.greedy_prefix(params, b_ids, b_att, b_resp, k)
            expected = []
            for r in range(len(rows)):
                positions = training.prefix_mask(b_resp, k)[r, 1:].nonzero().squeeze(1)  # p predicts p + 1
                expected.append(bool((logits[r, positions].argmax(-1) == b_ids[r, positions + 1]).all()))
            assert got.tolist() == expected
            # a margin asks for a confident decision: none is infinitely sure, any passes -inf
            assert not fusion.greedy_prefix(params, b_ids, b_att, b_resp, k, 1e9).any()
            assert fusion.greedy_prefix(params, b_ids, b_att, b_resp, k, float("-inf")).all()
        total, prefix = fusion.response_logps(params, b_ids, b_att, b_resp, prefix_tokens=1)
        assert torch.allclose(total, fusion.response_logps(params, b_ids, b_att, b_resp))
        assert bool((prefix >= total - 1e-5).all()) and bool((prefix <= 0).all())  # a part of a sum of log p


def test_prefix_term_and_greedy_stopping_rule(family, data, monkeypatch):
    """prefix_weight adds an NLL on the refusals' first tokens (recorded, lowered, and changing
    the mask); stop_on: greedy checks held-aside pairs by greedy decoding, not likelihood."""
    from mergekit_safety.methods.somf import training

    base = settings_for(family, data, steps=30, lr=0.05, modules="linear")
    plain, _ = training.train_mask(family["base"], experts_of(family), base, progress=False)
    prefixed, extra = training.train_mask(family["base"], experts_of(family),
                                          base.model_copy(update={"prefix_weight": 5.0}), progress=False)
    assert extra["history"][-1]["prefix_nll"] < extra["history"][0]["prefix_nll"]
    assert any(not torch.equal(plain[k], prefixed[k]) for k in plain)

    calls = []
    original = training.FunctionalFusion.greedy_prefix

    def spy(self, *args):
        calls.append(args[4])  # prefix_tokens
        return original(self, *args)

    monkeypatch.setattr(training.FunctionalFusion, "greedy_prefix", spy)
    rules = spy_on_stopping_rules(monkeypatch)
    greedy = settings_for(family, data, steps=10, modules="attention", stop_preference=1.0, stop_on="greedy",
                          prefix_tokens=2, check_every=5, validation_share=0.25)
    logits, extra = training.train_mask(family["base"], experts_of(family), greedy, progress=False)
    assert calls and set(calls) == {2}
    # the recorded share is the held-aside pairs' greedy agreement under the merge-time mask
    fusion = training.FunctionalFusion(family["base"], experts_of(family), greedy)
    for name, value in logits.items():
        fusion.logits[name].data.copy_(value)
    ids, att, resp, _ = training.encode_pairs(data["pairs"], training.load_tokenizer(family["base"]), greedy.max_length)
    held = rules[0].held_index
    b = training._trim(ids[held], att[held], resp[held])
    with torch.no_grad():
        share = float(fusion.greedy_prefix(fusion.parameters_for(fusion.fixed_masks("binary")), *b, 2).float().mean())
    # (the last check saw the final logits: training ends right after a check or at the cap's check)
    assert extra["stopping"]["checks"][-1]["preferred"] == share


def test_greedy_rule_on_benign_pairs_counts_answers_that_do_not_start_refusing(family, data, tmp_path, monkeypatch):
    """stop_on: greedy, benign side: a held-aside benign prompt counts when greedy decoding
    does not start with the refusal (any other answer is fine) — the over-refusal view."""
    from mergekit_safety.methods.somf import training

    rules = spy_on_stopping_rules(monkeypatch)
    settings = settings_for(family, data, utility_data=data["utility"], benign_weight=1.0, steps=4,
                            modules="attention", stop_preference=1.0, stop_on="greedy", prefix_tokens=3,
                            check_every=4, validation_share=0.25)
    logits, extra = training.train_mask(family["base"], experts_of(family), settings, progress=False)
    tokenizer = training.load_tokenizer(family["base"])
    ids, att, resp, n = training.encode_benign_pairs(data["utility"], data["pairs"], tokenizer, settings.max_length)
    fusion = training.FunctionalFusion(family["base"], experts_of(family), settings)
    for name, value in logits.items():
        fusion.logits[name].data.copy_(value)
    held = rules[0].benign_held_index
    with torch.no_grad():
        params = fusion.parameters_for(fusion.fixed_masks("binary"))
        refusing = fusion.greedy_prefix(params, *training._trim(ids[held + n], att[held + n], resp[held + n]), 3)
    assert extra["stopping"]["checks"][-1]["benign_preferred"] == float((~refusing).float().mean())


def test_load_logits_sets_every_mask_and_names_a_missing_one(family, data):
    from mergekit_safety.methods.somf import training

    fusion = training.FunctionalFusion(family["base"], experts_of(family), settings_for(family, data, modules="attention"))
    logits = {name: torch.full_like(value, -2.0, dtype=torch.bfloat16) for name, value in fusion.logits.items()}
    fusion.load_logits(logits)
    assert all(bool((value == -2.0).all()) and value.dtype == torch.float32 for value in fusion.logits.values())
    name = sorted(logits)[0]
    del logits[name]
    with pytest.raises(SOMFTrainingError, match=f"no logits for 1 masked tensors \\(e.g. {name}\\)"):
        fusion.load_logits(logits)


def test_patience_stops_and_the_best_checks_mask_is_exported(family, data, monkeypatch):
    """stop_patience ends training after that many checks without a better held-aside score;
    stop_keep: best exports the best check's logits (the earliest among equals), not the last."""
    from mergekit_safety.methods.somf import training

    rules = spy_on_stopping_rules(monkeypatch)
    # an impossible rule: every check scores 0, so the first check is the best
    settings = settings_for(family, data, steps=40, lr=0.05, modules="attention", stop_preference=1.0,
                            stop_margin=1e9, check_every=3, stop_patience=2, stop_keep="best")
    logits, extra = training.train_mask(family["base"], experts_of(family), settings, progress=False)
    stopping = extra["stopping"]
    assert stopping["steps_run"] == 9 and "no better held-aside check for 2 checks" in stopping["reason"]
    assert stopping["best"]["step"] == 3 and stopping["exported"] == "the best check's mask (step 3)"
    assert not stopping["held"]
    from mergekit_safety.methods.somf.method import rule_warning

    warning = rule_warning(stopping)  # the user hears the held-aside figure before the merge
    assert "did not hold" in warning and "at its best check (step 3)" in warning and "0 % of held-aside" in warning
    best = rules[0].best_logits
    assert all(torch.equal(logits[n], best[n]) for n in logits)
    # the last step's logits differ from the exported ones (training went on after the best check)
    last, _ = training.train_mask(family["base"], experts_of(family),
                                  settings.model_copy(update={"stop_keep": "last"}), progress=False)
    assert any(not torch.equal(last[n], logits[n]) for n in logits)
    # without patience the cap is reached; "last" exports the last step's mask
    _, extra = training.train_mask(family["base"], experts_of(family),
                                   settings.model_copy(update={"stop_patience": 0, "steps": 6, "stop_keep": "last"}),
                                   progress=False)
    assert extra["stopping"]["steps_run"] == 6 and extra["stopping"]["exported"] == "the mask at the last step"


# --------------------------------------------------------------------------- presets


def test_presets_fill_only_what_is_left_empty(family, data, tmp_path):
    from mergekit_safety.fusion.artifacts import open_artifact as open_

    recipe = SOMFSettings(preference_data="x")
    assert (recipe.init, recipe.lr, recipe.keep_rescale, recipe.chosen_nll_weight, recipe.stop_preference) == (1.0, 0.2, False, 0.5, 0.98)
    paper = SOMFSettings(preference_data="x", preset="paper", lr=0.05)
    assert (paper.init, paper.lr, paper.keep_rescale, paper.steps, paper.stop_preference) == (0.0, 0.05, True, 300, 0.0)
    # the artifact records the resolved values, so a preset change makes it stale
    mask = tmp_path / "m.safetensors"
    text = merge_yaml("somf", family, EXPERTS, f"  preference_data: {data['pairs']}\n  steps: 2\n  batch_size: 8\n  modules: attention\n  mask: {mask}\n")
    (tmp_path / "c.yml").write_text(text)
    locate_config(str(tmp_path / "c.yml"))
    settings = open_(str(mask)).metadata.settings
    assert settings["preset"] == "recipe" and settings["init"] == 1.0 and settings["steps"] == 2
    (tmp_path / "c.yml").write_text(text.replace("  steps: 2\n", "  steps: 2\n  preset: paper\n"))
    with pytest.raises(ArtifactError, match="setting init: 1.0 → 0.0"):
        locate_config(str(tmp_path / "c.yml"))


@pytest.mark.parametrize("keep_rescale,normalize", [(False, False), (True, False), (False, True)])
def test_training_shortcut_equals_the_exact_fusion(family, data, keep_rescale, normalize):
    """Task arithmetic with one shared mask: m ⊙ Σ w_i τ_i (precomputed) = Σ w_i (m ⊙ τ_i)."""
    settings = settings_for(family, data, modules="attention,mlp", keep_rescale=keep_rescale, normalize=normalize)
    fusion = FunctionalFusion(family["base"], experts_of(family), settings, progress=False)
    assert fusion.summed is not None
    masks = fusion.sample_masks(torch.Generator().manual_seed(3))
    fast = fusion.parameters_for(masks, exact=False)
    exact = fusion.parameters_for(masks, exact=True)
    for name in fusion.names:
        assert torch.allclose(fast[name], exact[name], atol=1e-6, rtol=1e-5), name
    ties = FunctionalFusion(family["base"], experts_of(family), settings_for(family, data, modules="attention", backbone="ties"), progress=False)
    assert ties.summed is None  # selection per expert: no shortcut


def test_compact_logits_keep_every_sign():
    from mergekit_safety.methods.somf.method import store_logits

    logits = torch.tensor([3.0, -2.5, 1e-42, -1e-42, 0.0, 1e-39, 123456.0])
    stored = store_logits(logits, torch.bfloat16)
    assert stored.dtype == torch.bfloat16
    assert torch.equal(stored.float() > 0, logits > 0) and torch.equal(stored.float() < 0, logits < 0)
    assert torch.equal(store_logits(logits, torch.float32), logits)
