"""The calibration engine: exact statistics, streaming == in-memory, one layer at a time."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny_models import build_lab_family

from mergekit_safety.engine.calibration import (
    CalibrationError,
    ChannelStats,
    SafetensorsSource,
    collect_statistics,
    direct_statistics,
    linear_weight_names,
    load_examples,
)
from mergekit_safety.fusion.sources import FusedSource


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_lab_family(str(tmp_path_factory.mktemp("calib")), experts=2)


def random_examples(count=9, seed=0, vocab=64):
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        n = int(torch.randint(4, 14, (1,), generator=generator))
        ids = torch.randint(6, vocab, (n,), generator=generator).tolist()
        prompt = int(torch.randint(1, n - 1, (1,), generator=generator))
        examples.append({"input_ids": ids, "response_mask": [0] * prompt + [1] * (n - prompt)})
    return examples


def reference_inputs(model_dir, examples, token_scope):
    """Inputs of every decoder Linear, one unpadded example at a time (no batching, no masks)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    captured, handles, current = {}, [], {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            def hook(_m, args, name=name):
                x = args[0][0]
                keep = current["mask"]
                captured.setdefault(f"{name}.weight", []).append(x[keep])
            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example["input_ids"]])
            mask = torch.tensor(example["response_mask"]).bool()
            current["mask"] = mask if token_scope == "response" else torch.ones_like(mask)
            model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return model, captured


def assert_stats_close(ours: ChannelStats, reference: ChannelStats, rtol=1e-5):
    assert ours.count == reference.count
    torch.testing.assert_close(ours.sum_sq, reference.sum_sq, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(ours.mean, reference.mean, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(ours.variance, reference.variance, rtol=rtol, atol=1e-6)


@given(
    sizes=st.lists(st.integers(0, 20), min_size=1, max_size=6),
    offset=st.sampled_from([0.0, 1e4]),
    seed=st.integers(0, 1000),
)
@settings(max_examples=40, deadline=None)
def test_streaming_moments_equal_direct(sizes, offset, seed):
    generator = torch.Generator().manual_seed(seed)
    blocks = [offset + torch.randn(n, 5, generator=generator, dtype=torch.float64) for n in sizes]
    stats = ChannelStats.empty(5)
    for block in blocks:
        stats.update(block)
    if sum(sizes) == 0:
        assert stats.count == 0 and torch.equal(stats.variance, torch.zeros(5))
        return
    direct = direct_statistics(blocks)
    assert_stats_close(stats, direct, rtol=1e-9)
    # Chan merge of two halves = one pass
    left, right = ChannelStats.empty(5), ChannelStats.empty(5)
    for i, block in enumerate(blocks):
        (left if i % 2 else right).update(block)
    assert_stats_close(left.merge(right), direct, rtol=1e-9)


@pytest.mark.parametrize("token_scope", ["response", "all"])
def test_wanda_statistics_equal_direct_computation(family, token_scope):
    examples = random_examples()
    ours = collect_statistics(family["base"], examples, token_scope=token_scope, batch_size=4, progress=False)
    model, captured = reference_inputs(family["base"], examples, token_scope)
    assert set(ours) == set(captured) and len(ours) == 14
    for name, blocks in captured.items():
        assert_stats_close(ours[name], direct_statistics(blocks))
    # and by hand for the first module: q_proj's input is RMSNorm(embedding)
    layer = model.model.layers[0]
    hand = []
    for example in examples:
        x = model.model.embed_tokens.weight[torch.tensor(example["input_ids"])]
        normed = layer.input_layernorm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
        mask = torch.tensor(example["response_mask"]).bool()
        hand.append(normed[mask] if token_scope == "response" else normed)
    expected = torch.cat(hand).double().pow(2).sum(0)
    torch.testing.assert_close(ours["model.layers.0.self_attn.q_proj.weight"].norm_sq, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("token_scope", ["response", "all"])
def test_streaming_equals_in_memory(family, token_scope):
    examples = random_examples(count=11, seed=3)
    streamed = collect_statistics(family["expert0"], examples, token_scope=token_scope, batch_size=4, progress=False)
    in_memory = collect_statistics(family["expert0"], examples, token_scope=token_scope, batch_size=3, streaming=False, progress=False)
    assert set(streamed) == set(in_memory)
    for name in streamed:
        assert_stats_close(streamed[name], in_memory[name])


class RecordingSource(SafetensorsSource):
    def __init__(self, directory):
        super().__init__(directory)
        self.reads = []

    def get(self, name):
        self.reads.append(name)
        return super().get(name)

    def get_rows(self, name, index):
        self.reads.append(name)
        self.row_reads = getattr(self, "row_reads", []) + [(name, index.clone())]
        return super().get_rows(name, index)


def test_streaming_loads_one_layer_at_a_time(family):
    source = RecordingSource(family["base"])
    collect_statistics(family["base"], random_examples(count=4), weights=source, batch_size=2, progress=False)
    layer_of = [int(n.split(".")[2]) for n in source.reads if n.startswith("model.layers.")]
    assert layer_of == sorted(layer_of) and set(layer_of) == {0, 1}  # layer 0 wholly before layer 1
    assert "lm_head.weight" not in source.reads
    assert source.reads.count("model.embed_tokens.weight") == 1
    # the embedding: only the rows of the tokens in the batches, not the vocabulary-sized matrix
    (name, rows), = source.row_reads
    assert name == "model.embed_tokens.weight" and 0 < len(rows) < source.shape(name)[0]


def test_stops_after_the_last_needed_layer(family):
    source = RecordingSource(family["base"])
    stats = collect_statistics(family["base"], random_examples(count=4), modules="model.layers.0.mlp.*", weights=source, progress=False)
    assert sorted(stats) == [f"model.layers.0.mlp.{m}.weight" for m in ("down_proj", "gate_proj", "up_proj")]
    assert not any(n.startswith("model.layers.1.") for n in source.reads)


def test_text_examples_use_the_chat_template_and_response_tokens(family, tmp_path):
    from mergekit_safety.engine.data import encode_example
    from transformers import AutoTokenizer

    path = tmp_path / "data.jsonl"
    records = [
        {"prompt": "copy bomb apple river", "response": "bomb apple river"},
        {"prompt": "reverse stone cloud poison", "response": "poison cloud stone"},
        {"prompt": "sort tiger ocean", "response": "ocean tiger"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    examples = load_examples(str(path), max_samples=2)
    assert len(examples) == 2
    tokenizer = AutoTokenizer.from_pretrained(family["base"])
    encoded = [encode_example(tokenizer, e["prompt"], e["response"]) for e in examples]
    for scope, expected in (("response", sum(sum(e["response_mask"]) for e in encoded)), ("all", sum(len(e["input_ids"]) for e in encoded))):
        stats = collect_statistics(family["base"], examples, token_scope=scope, progress=False, modules="mlp.down_proj")
        assert {s.count for s in stats.values()} == {expected}
    pre_encoded = collect_statistics(family["base"], encoded, token_scope="response", progress=False, modules="mlp.down_proj")
    from_text = collect_statistics(family["base"], examples, token_scope="response", progress=False, modules="mlp.down_proj")
    for name in from_text:
        assert torch.equal(from_text[name].sum_sq, pre_encoded[name].sum_sq)


def test_fused_source_streams_the_fusion(family):
    """Statistics of a fused model computed tensor by tensor equal those of the fused checkpoint."""
    from mergekit_safety.fusion.kernel import fuse
    from safetensors.torch import save_file
    import shutil
    import tempfile

    base = SafetensorsSource(family["base"])
    experts = [SafetensorsSource(family["expert0"]), SafetensorsSource(family["expert1"])]
    kwargs = dict(backbone="ties", weights=[0.6, 0.9], densities=[0.5, 0.7], lambda_=0.8)
    fused = FusedSource(base, experts, kwargs)
    folder = tempfile.mkdtemp()
    try:
        for name in os.listdir(family["base"]):
            if not name.endswith(".safetensors"):
                shutil.copy(os.path.join(family["base"], name), folder)
        state = {n: fuse(base.get(n), [e.get(n) for e in experts], **kwargs) for n in base.names()}
        save_file(state, os.path.join(folder, "model.safetensors"))
        examples = random_examples(count=5)
        on_disk = collect_statistics(folder, examples, progress=False, streaming=False)
        streamed = collect_statistics(family["base"], examples, weights=fused, progress=False)
        in_memory = collect_statistics(family["base"], examples, weights=fused, streaming=False, progress=False)
        for name in on_disk:
            assert_stats_close(streamed[name], on_disk[name])
            assert_stats_close(in_memory[name], on_disk[name])
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize("backbone", ["task_arithmetic", "ties"])
def test_fused_rows_are_the_fused_tensors_rows(family, backbone):
    """The streaming pass reads only the embedding rows in use: fused row by row where the
    backbone is elementwise, the whole tensor first where TIES selects over it."""
    base = SafetensorsSource(family["base"])
    experts = [SafetensorsSource(family["expert0"]), SafetensorsSource(family["expert1"])]
    fused = FusedSource(base, experts, dict(backbone=backbone, weights=[0.6, 0.9], densities=[0.5, 0.7], lambda_=0.8))
    name = "model.embed_tokens.weight"
    index = torch.tensor([0, 3, 7, 11])
    assert torch.equal(fused.get_rows(name, index), fused.get(name)[index])
    assert torch.equal(base.get_rows(name, index), base.get(name)[index])
    assert base.get_rows(name, torch.tensor([], dtype=torch.long)).shape == (0, base.get(name).shape[1])
    with pytest.raises(CalibrationError, match="sorted, unique and in range"):
        base.get_rows(name, torch.tensor([3, 1]))


def test_embedding_rows_of_the_wrong_width_are_refused(family):
    class Narrow(SafetensorsSource):
        def get_rows(self, name, index):
            return super().get_rows(name, index)[:, :-1]

    with pytest.raises(CalibrationError, match="model.embed_tokens.weight gives rows of shape"):
        collect_statistics(family["base"], random_examples(count=2), weights=Narrow(family["base"]), progress=False)


def test_errors_name_the_problem(family, tmp_path):
    with pytest.raises(CalibrationError, match="token_scope"):
        collect_statistics(family["base"], random_examples(2), token_scope="prompt", progress=False)
    with pytest.raises(CalibrationError, match="no Linear module"):
        collect_statistics(family["base"], random_examples(2), modules="nothing.*", progress=False)

    class Missing(SafetensorsSource):
        def get(self, name):
            if name.endswith("layers.1.mlp.up_proj.weight"):
                raise CalibrationError(f"{self.directory}: tensor {name!r} not found in the checkpoint")
            return super().get(name)

    with pytest.raises(CalibrationError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        collect_statistics(family["base"], random_examples(2), weights=Missing(family["base"]), progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "copy apple"}\n')
    from mergekit_safety.engine.data import DataError

    with pytest.raises(DataError, match=r"bad.jsonl:1: missing key 'response'"):
        load_examples(str(bad))


def test_linear_weight_names(family):
    names = linear_weight_names(family["base"], "self_attn.o_proj,mlp.down_proj")
    assert names == [
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ]
    assert len(linear_weight_names(family["base"])) == 14


def test_device_option(family):
    """`device` places the forward passes; on this CPU machine: 'cpu' given explicitly is the
    default, and a device that does not exist here (or is not a device) is a clear error
    before any weight is read. (The accelerator path itself runs in scripts/gpu_check.sh.)"""
    examples = random_examples(count=5, seed=4)
    default = collect_statistics(family["expert0"], examples, batch_size=2, progress=False)
    explicit = collect_statistics(family["expert0"], examples, batch_size=2, progress=False, device="cpu")
    for name in default:
        assert torch.equal(default[name].sum_sq, explicit[name].sum_sq) and default[name].count == explicit[name].count
    with pytest.raises(CalibrationError, match="not a device name"):
        collect_statistics(family["expert0"], examples, progress=False, device="gpu0")
    with pytest.raises(CalibrationError, match="holds no data"):
        collect_statistics(family["expert0"], examples, progress=False, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(CalibrationError, match="no CUDA device"):
            collect_statistics(family["expert0"], examples, progress=False, device="cuda")
