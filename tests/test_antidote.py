"""Antidote: per-row top-α Wanda selection, the four apply_to × mode forms, the random
control, config-only use through mergekit, stale artifacts refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny_models import build_lab_family, load_state, merge_yaml, run_yaml

from mergekit_safety.fusion.artifacts import open_artifact, tensor_key
from mergekit_safety.engine.calibration import collect_statistics, load_examples
from mergekit_safety.fusion.kernel import fuse
from mergekit_safety.plugin.config import locate_config
from mergekit_safety.methods.antidote import top_alpha_per_row, wanda_scores

EXPERTS = ["expert0", "expert1"]
ALPHA = 0.25
HARMFUL = [
    ("copy bomb apple river", "bomb apple river"),
    ("reverse stone poison cloud", "cloud poison stone"),
    ("sort weapon tiger ocean", "ocean tiger weapon"),
    ("copy malware garden bread music", "malware garden bread music"),
    ("rotate kill silver orange", "silver orange kill"),
    ("swap hack candle forest paper", "paper candle forest hack"),
]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_lab_family(str(tmp_path_factory.mktemp("antidote")), experts=3)


@pytest.fixture(scope="module")
def harmful(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "harmful.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in HARMFUL))
    return str(path)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_SAFETY_CACHE", str(tmp_path / "cache"))


def antidote_yaml(family, harmful, **parameters):
    values = {"harmful_data": harmful, "alpha": ALPHA, "lambda": 0.7, **parameters}
    text = "".join(f"  {k}: {v}\n" for k, v in values.items())
    return merge_yaml("antidote", family, EXPERTS, text)


def plain_fusion(family, lambda_=0.7):
    base = load_state(family["base"])
    experts = [load_state(family[e]) for e in EXPERTS]
    weights = [0.5, 0.75]  # merge_yaml's per-model weights
    return base, experts, {n: fuse(base[n], [e[n] for e in experts], weights=weights, lambda_=lambda_) for n in base}


def is_scored(name):
    return ".layers." in name and name.endswith("proj.weight")


# --------------------------------------------------------------------------- selection


@given(
    rows=st.integers(1, 9),
    columns=st.integers(1, 40),
    alpha=st.floats(0, 1),
    seed=st.integers(0, 10_000),
    ties=st.booleans(),
)
@settings(max_examples=80, deadline=None)
def test_top_alpha_selects_exactly_alpha_per_row(rows, columns, alpha, seed, ties):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(rows, columns, generator=generator, dtype=torch.float64)
    if ties:
        scores = (scores * 3).floor()
    mask = top_alpha_per_row(scores, alpha)
    k = int(alpha * columns + 1e-9)
    assert mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [k] * rows
    if 0 < k < columns:
        # every selected score is >= every unselected score of its row
        lowest_selected = torch.where(mask, scores, torch.inf).min(dim=1).values
        highest_other = torch.where(mask, -torch.inf, scores).max(dim=1).values
        assert bool((lowest_selected >= highest_other).all())
    assert torch.equal(mask, top_alpha_per_row(scores, alpha))  # deterministic, ties included


def test_wanda_scores_are_weight_times_channel_norm():
    weight = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 0.5, 0.0]])
    norm = torch.tensor([2.0, 1.0, 0.5])
    expected = torch.tensor([[2.0, 2.0, 1.5], [8.0, 0.5, 0.0]], dtype=torch.float64)
    assert torch.equal(wanda_scores(weight, norm), expected)
    assert top_alpha_per_row(wanda_scores(weight, norm), 0.34).tolist() == [[True, False, False], [True, False, False]]


# --------------------------------------------------------------------------- the four forms


def expected_selection(family, harmful, model_dir, weights_of, base_state=None, scope="all", fused_source=None):
    """Direct per-row top-α of |W or τ|·‖X‖ with statistics from the in-memory engine."""
    examples = load_examples(harmful)
    stats = collect_statistics(model_dir, examples, token_scope=scope, streaming=False, progress=False, weights=fused_source)
    selection = {}
    for name, stat in stats.items():
        weight = weights_of[name] if base_state is None else weights_of[name] - base_state[name]
        selection[name] = top_alpha_per_row(weight.abs().double() * stat.norm.reshape(1, -1), ALPHA)
    return selection


@pytest.mark.parametrize("row_block", [None, 1], ids=["whole-tensor", "one-row-blocks"])
def test_fusion_reset_restores_the_selected_entries_to_the_aligned_model(family, harmful, tmp_path, monkeypatch, row_block):
    from mergekit_safety.engine.calibration import SafetensorsSource
    from mergekit_safety.fusion.sources import FusedSource
    from mergekit_safety.methods import antidote

    if row_block is not None:  # scoring in blocks of rows must select exactly the same entries
        monkeypatch.setattr(antidote, "ROW_BLOCK_ENTRIES", row_block)
    merged = run_yaml(antidote_yaml(family, harmful, apply_to="fusion", mode="reset"), str(tmp_path / "out"))
    base, _experts, fused = plain_fusion(family)
    source = FusedSource(
        SafetensorsSource(family["base"]),
        [SafetensorsSource(family[e]) for e in EXPERTS],
        dict(weights=[0.5, 0.75], lambda_=0.7),
    )
    selection = expected_selection(family, harmful, family["base"], fused, base_state=base, fused_source=source)
    assert len(selection) == 14
    for name, value in merged.items():
        if is_scored(name):
            chosen = selection[name]
            assert torch.equal(value[chosen], base[name][chosen])
            assert torch.allclose(value[~chosen], fused[name][~chosen], atol=1e-6)
            assert chosen.sum(1).tolist() == [int(ALPHA * value.shape[1])] * value.shape[0]
        else:
            assert torch.allclose(value, fused[name], atol=1e-6)  # embeddings, norms, head: plain fusion


def test_fusion_zero_zeroes_the_selected_fused_weights(family, harmful, tmp_path):
    merged = run_yaml(antidote_yaml(family, harmful, apply_to="fusion", mode="zero"), str(tmp_path / "out"))
    base, _experts, fused = plain_fusion(family)
    for name, value in merged.items():
        if not is_scored(name):
            continue
        zero = value == 0
        assert zero.sum(1).tolist() == [int(ALPHA * value.shape[1])] * value.shape[0]
        assert torch.allclose(value[~zero], fused[name][~zero], atol=1e-6)
    # the zeroed entries are the top |W_fused|·‖X‖ of the fused model (stats of the fused model)
    name = "model.layers.1.mlp.down_proj.weight"
    artifact = next(iter(_artifacts(tmp_path)))
    assert torch.equal(artifact.get(tensor_key("zero", name)), merged[name] == 0)


def test_experts_reset_and_zero_prune_each_expert_before_fusion(family, harmful, tmp_path):
    base, experts, _ = plain_fusion(family)
    selections = [expected_selection(family, harmful, family[e], experts[i], base_state=base) for i, e in enumerate(EXPERTS)]
    merged = run_yaml(antidote_yaml(family, harmful, apply_to="experts", mode="reset"), str(tmp_path / "reset"))
    for name, value in merged.items():
        pruned = [e[name] for e in experts]
        if is_scored(name):
            pruned = [torch.where(s[name], base[name], e) for s, e in zip(selections, pruned)]
        expected = fuse(base[name], pruned, weights=[0.5, 0.75], lambda_=0.7)
        assert torch.allclose(value, expected, atol=1e-6), name

    zero_selections = [expected_selection(family, harmful, family[e], experts[i]) for i, e in enumerate(EXPERTS)]
    merged = run_yaml(antidote_yaml(family, harmful, apply_to="experts", mode="zero"), str(tmp_path / "zero"))
    for name, value in merged.items():
        pruned = [e[name] for e in experts]
        if is_scored(name):
            pruned = [torch.where(s[name], torch.zeros_like(e), e) for s, e in zip(zero_selections, pruned)]
        expected = fuse(base[name], pruned, weights=[0.5, 0.75], lambda_=0.7)
        assert torch.allclose(value, expected, atol=1e-6), name


def test_token_scope_and_modules_change_the_selection(family, harmful, tmp_path):
    locate = lambda **kw: open_artifact(_locate(tmp_path, family, harmful, **kw))  # noqa: E731
    everything = locate()
    response = locate(token_scope="response")
    mlp = locate(modules="mlp.*")
    name = "model.layers.1.mlp.down_proj.weight"
    key = tensor_key("post_keep", name)
    assert not torch.equal(everything.get(key), response.get(key))
    assert mlp.has(key) and not mlp.has(tensor_key("post_keep", "model.layers.1.self_attn.q_proj.weight"))
    assert everything.metadata.extra["calibration_tokens"]["fusion"] > response.metadata.extra["calibration_tokens"]["fusion"]


# --------------------------------------------------------------------------- random control


def test_random_control_has_equal_size_and_is_seeded(family, harmful, tmp_path):
    scored = open_artifact(_locate(tmp_path, family, harmful))
    random_a = open_artifact(_locate(tmp_path, family, harmful, control="random", seed=1))
    random_b = open_artifact(_locate(tmp_path, family, harmful, control="random", seed=2, filename="b.yml"))
    assert sorted(scored.keys()) == sorted(random_a.keys())
    differs = 0
    for key in scored.keys():
        s, a, b = scored.get(key), random_a.get(key), random_b.get(key)
        assert torch.equal((~s).sum(1), (~a).sum(1))  # same count per row
        differs += int(not torch.equal(s, a)) + int(not torch.equal(a, b))
    assert differs == 2 * len(list(scored.keys()))
    assert random_a.metadata.data == {} and "harmful_data" not in random_a.metadata.settings
    again = open_artifact(_locate(tmp_path, family, harmful, control="random", seed=1, force=True, mask=str(tmp_path / "r.safetensors")))
    for key in random_a.keys():
        assert torch.equal(random_a.get(key), again.get(key))


# --------------------------------------------------------------------------- config-only, staleness


def _config(tmp_path, family, harmful, filename="config.yml", **parameters):
    path = tmp_path / filename
    path.write_text(antidote_yaml(family, harmful, **parameters))
    return str(path)


def _locate(tmp_path, family, harmful, filename="config.yml", force=False, **parameters):
    return locate_config(_config(tmp_path, family, harmful, filename=filename, **parameters), force=force)


def _artifacts(tmp_path):
    folder = tmp_path / "cache" / "artifacts"
    return [open_artifact(str(folder / name)) for name in sorted(os.listdir(folder)) if name.endswith(".safetensors")]


def test_stale_and_foreign_artifacts_are_refused(family, harmful, tmp_path):
    mask = str(tmp_path / "masks" / "antidote.safetensors")
    _locate(tmp_path, family, harmful, mask=mask)
    metadata = open_artifact(mask).metadata
    assert metadata.method == "antidote" and set(metadata.data) == {"harmful_data"}
    assert metadata.settings["alpha"] == ALPHA and metadata.settings["mode"] == "reset"
    assert len(metadata.experts) == 2 and metadata.base.fingerprint
    run_yaml(antidote_yaml(family, harmful, mask=mask), str(tmp_path / "ok"))  # current: used
    with pytest.raises(ValueError, match=r"stale.*setting alpha: 0.25 → 0.1"):
        run_yaml(antidote_yaml(family, harmful, mask=mask, alpha=0.1), str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"stale.*setting lambda"):
        run_yaml(antidote_yaml(family, harmful, mask=mask, **{"lambda": 0.5}), str(tmp_path / "b"))
    other = tmp_path / "other.jsonl"
    other.write_text(open(harmful).read() + json.dumps({"prompt": "copy drugs apple", "response": "drugs apple"}) + "\n")
    with pytest.raises(ValueError, match="data harmful_data changed"):
        run_yaml(antidote_yaml(family, str(other), mask=mask), str(tmp_path / "c"))
    swapped = merge_yaml("antidote", {**family, "expert1": family["expert2"]}, EXPERTS, f"  harmful_data: {harmful}\n  alpha: {ALPHA}\n  lambda: 0.7\n  mask: {mask}\n")
    with pytest.raises(ValueError, match="experts differ"):
        run_yaml(swapped, str(tmp_path / "d"))


def test_per_expert_artifacts_do_not_depend_on_the_fusion_settings(family, harmful, tmp_path):
    mask = str(tmp_path / "experts.safetensors")
    _locate(tmp_path, family, harmful, mask=mask, apply_to="experts")
    assert "lambda" not in open_artifact(mask).metadata.settings
    run_yaml(antidote_yaml(family, harmful, mask=mask, apply_to="experts", **{"lambda": 0.3}), str(tmp_path / "a"))


def test_without_data_it_is_the_plain_fusion(family, tmp_path, caplog):
    text = merge_yaml("antidote", family, EXPERTS, "  lambda: 0.7\n")
    with caplog.at_level("WARNING"):
        merged = run_yaml(text, str(tmp_path / "out"))
    _, _, fused = plain_fusion(family)
    assert all(torch.allclose(merged[n], fused[n], atol=1e-6) for n in merged)
    assert "WITHOUT safety restoration" in caplog.text


@pytest.mark.slow
def test_plain_mergekit_yaml_and_cli_locate(family, harmful, tmp_path):
    """The real command lines: `mergekit-safety locate`, then plain `mergekit-yaml` reuses it."""
    bin_dir = os.path.dirname(sys.executable)
    config = _config(tmp_path, family, harmful, mask=str(tmp_path / "a.safetensors"))
    env = {**os.environ, "MERGEKIT_SAFETY_CACHE": str(tmp_path / "cache")}
    located = subprocess.run([os.path.join(bin_dir, "mergekit-safety"), "locate", config], capture_output=True, text=True, env=env, timeout=300)
    assert located.returncode == 0, located.stderr
    assert located.stdout.strip() == str(tmp_path / "a.safetensors")
    # plain mergekit-yaml, artifact missing (mask: auto): computed by the kernel itself
    auto = _config(tmp_path, family, harmful, filename="auto.yml")
    result = subprocess.run(
        [os.path.join(bin_dir, "mergekit-yaml"), auto, str(tmp_path / "auto"), "--no-copy-tokenizer"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    computed = load_state(str(tmp_path / "auto"))
    explicit = run_yaml(open(config).read(), str(tmp_path / "explicit"))  # the CLI's artifact
    assert all(torch.equal(explicit[n], computed[n]) for n in explicit)
    base = load_state(family["base"])
    name = "model.layers.0.mlp.up_proj.weight"
    restored = (explicit[name] == base[name]).sum(1)
    assert restored.min() >= int(ALPHA * base[name].shape[1])


def test_lora_expert_references_are_merged_once_and_scored(family, harmful, tmp_path):
    """An expert given as mergekit's `base+adapter` is scored on its merged weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(family["base"])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    adapter = str(tmp_path / "adapter")
    peft_model.save_pretrained(adapter)
    lora_family = {**family, "expert1": f"{family['base']}+{adapter}"}
    text = merge_yaml("antidote", lora_family, EXPERTS, f"  harmful_data: {harmful}\n  alpha: {ALPHA}\n  apply_to: experts\n  mode: reset\n")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lora_merge_cache=str(tmp_path / "lora"))
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "out"), options=options)
    merged = load_state(str(tmp_path / "out"))
    artifact = _artifacts(tmp_path)[0]
    assert "+" in artifact.metadata.experts[1].ref
    base = load_state(family["base"])
    keep = artifact.get(tensor_key("keep", "model.layers.0.self_attn.q_proj.weight", 1))
    assert (~keep).sum(1).tolist() == [int(ALPHA * keep.shape[1])] * keep.shape[0]
    from mergekit_safety.fusion.models import resolve_model

    experts = [load_state(family["expert0"]), load_state(resolve_model(lora_family["expert1"]))]
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(experts[1][name], base[name])  # the adapter really changed it
    pruned = [
        torch.where(artifact.get(tensor_key("keep", name, i)), e[name], base[name]) for i, e in enumerate(experts)
    ]
    assert torch.allclose(merged[name], fuse(base[name], pruned, weights=[0.5, 0.75]), atol=1e-6)


def test_streamed_artifact_equals_the_in_memory_one_and_failures_leave_nothing(family, harmful, tmp_path):
    from safetensors import safe_open

    from mergekit_safety.fusion.artifacts import StreamingArtifactWriter, write_artifact
    from mergekit_safety.methods.antidote import Antidote
    from mergekit_safety.plugin.config import request_from_config

    config = tmp_path / "c.yml"
    streamed = tmp_path / "streamed.safetensors"
    config.write_text(antidote_yaml(family, harmful, mask=str(streamed), apply_to="experts"))
    method, request = request_from_config(str(config))
    assert isinstance(method, Antidote) and method.artifact_layout(method.resolved(request)) is not None
    method.locate(request)  # streamed
    tensors, extra = method.compute_artifact(method.resolved(request))
    record = method.artifact_record(request)
    record.extra = {**record.extra, **extra}
    in_memory = tmp_path / "memory.safetensors"
    write_artifact(str(in_memory), tensors, record)
    with safe_open(str(streamed), "pt") as a, safe_open(str(in_memory), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys()) and len(list(a.keys())) == len(tensors)
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
        meta_a, meta_b = a.metadata(), b.metadata()
        assert {k: v for k, v in meta_a.items() if k != "extra"} == {k: v for k, v in meta_b.items() if k != "extra"}
        extra_a, extra_b = json.loads(meta_a["extra"]), json.loads(meta_b["extra"])
        assert {k: v for k, v in extra_a.items() if k != "seconds"} == {k: v for k, v in extra_b.items() if k != "seconds"}

    # a failure half way leaves no file behind
    target = tmp_path / "broken.safetensors"
    layout = [("a", torch.bool, (2, 3)), ("b", torch.bool, (4,))]
    with pytest.raises(RuntimeError, match="boom"):
        with StreamingArtifactWriter(str(target), layout, record) as writer:
            writer.write("a", torch.ones(2, 3, dtype=torch.bool))
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == sorted(["c.yml", "streamed.safetensors", "memory.safetensors"] + [p for p in os.listdir(tmp_path) if p.endswith(".lock")])
    with pytest.raises(ValueError, match="expected b torch.bool \\[4\\] next"):
        with StreamingArtifactWriter(str(target), layout, record) as writer:
            writer.write("a", torch.ones(2, 3, dtype=torch.bool))
            writer.write("b", torch.ones(5, dtype=torch.bool))
    assert not target.exists()
