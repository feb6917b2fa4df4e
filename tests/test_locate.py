"""Config-only use: artifacts computed on first use, cached by content, stale ones refused."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tiny_models import build_family, load_state, merge_yaml, run_yaml

from mergekit_safety.fusion.artifacts import ArtifactError, open_artifact, tensor_key
from mergekit_safety.fusion.method import LocatingFusionMethod
from mergekit_safety.fusion.settings import LocatingSettings, setting
from mergekit_safety.plugin.config import locate_config


class ToySettings(LocatingSettings):
    data: str = setting("", "data file", data=True)
    fraction: float = setting(1.0, "unused setting", locate=True)


class ToyLocate(LocatingFusionMethod):
    """Restores the first `rows` rows of every 2-D tensor; `rows` is read from a data file."""

    name = "toy_locate_for_tests"
    settings = ToySettings
    calls = 0

    def compute_artifact(self, request):
        type(self).calls += 1
        rows = json.loads(open(request.parameters["data"]).read())["rows"]
        tensors = {}
        for name, value in load_state(request.model_path(request.base)).items():
            if value.dim() == 2:
                keep = torch.ones_like(value)
                keep[:rows] = 0
                tensors[tensor_key("post_keep", name)] = keep
        return tensors, {"rows": rows}


@pytest.fixture(scope="module")
def toy():
    from mergekit.merge_methods import registry

    from mergekit_safety.plugin.adapter import MergekitMethod

    method = ToyLocate()
    registry.register(MergekitMethod(method))
    yield method
    registry._METHODS.pop(method.name, None)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(str(tmp_path_factory.mktemp("family")), experts=2)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_SAFETY_CACHE", str(tmp_path / "cache"))


def _config(tmp_path, family, data, mask="auto", fraction=1.0, filename="config.yml"):
    text = merge_yaml(
        ToyLocate.name, family, ["expert0", "expert1"],
        f"  data: {data}\n  mask: {mask}\n  fraction: {fraction}\n",
    )
    path = tmp_path / filename
    path.write_text(text)
    return text, str(path)


def test_merge_computes_missing_artifact_once_and_uses_it(toy, family, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"rows": 2}\n')
    text, _ = _config(tmp_path, family, data)
    ToyLocate.calls = 0
    first = run_yaml(text, str(tmp_path / "a"))
    assert ToyLocate.calls == 1
    second = run_yaml(text, str(tmp_path / "b"))
    assert ToyLocate.calls == 1  # reused from the content-addressed cache
    base = load_state(family["base"])
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(first[name][:2], base[name][:2])
    assert not torch.equal(first[name][2:], base[name][2:])
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_changed_data_makes_a_new_auto_artifact(toy, family, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"rows": 1}\n')
    text, _ = _config(tmp_path, family, data)
    ToyLocate.calls = 0
    run_yaml(text, str(tmp_path / "a"))
    data.write_text('{"rows": 3}\n')
    merged = run_yaml(text, str(tmp_path / "b"))
    assert ToyLocate.calls == 2
    base = load_state(family["base"])
    name = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(merged[name][:3], base[name][:3])


def test_explicit_artifact_is_refused_when_stale(toy, family, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"rows": 2}\n')
    mask = tmp_path / "masks" / "toy.safetensors"
    text, config = _config(tmp_path, family, data, mask=str(mask))
    assert locate_config(config) == str(mask)
    assert open_artifact(str(mask)).metadata.extra == {"rows": 2}
    run_yaml(text, str(tmp_path / "a"))  # current: used as is
    text2, _ = _config(tmp_path, family, data, mask=str(mask), fraction=0.5, filename="c2.yml")
    with pytest.raises(ValueError, match=r"stale .*setting fraction: 1.0 → 0.5"):
        run_yaml(text2, str(tmp_path / "b"))
    data.write_text('{"rows": 3}\n')
    with pytest.raises(ValueError, match="data data changed"):
        run_yaml(text, str(tmp_path / "c"))
    # --force recomputes; then the merge accepts it
    locate_config(config, force=True)
    run_yaml(text, str(tmp_path / "d"))


def test_cli_locate_and_merge_agree(toy, family, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"rows": 1}\n')
    text, config = _config(tmp_path, family, data)
    ToyLocate.calls = 0
    path = locate_config(config)
    assert os.path.exists(path) and ToyLocate.calls == 1
    run_yaml(text, str(tmp_path / "a"))
    assert ToyLocate.calls == 1  # the merge found the CLI's artifact


def test_no_data_falls_back_to_plain_backbone_with_warning(toy, family, tmp_path, caplog):
    text = merge_yaml(ToyLocate.name, family, ["expert0", "expert1"])
    plain = merge_yaml("task_arithmetic", family, ["expert0", "expert1"])
    with caplog.at_level("WARNING"):
        ours = run_yaml(text, str(tmp_path / "a"))
    expected = run_yaml(plain, str(tmp_path / "b"))
    assert all(torch.equal(ours[k], expected[k]) for k in ours)
    assert "WITHOUT safety restoration" in caplog.text


def test_missing_data_file_is_named(toy, family, tmp_path):
    text, _ = _config(tmp_path, family, tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="data file .*missing.jsonl.* not found"):
        run_yaml(text, str(tmp_path / "a"))
