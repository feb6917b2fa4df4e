"""Interrupted locate and merge runs: killed part-way, re-run, same result, nothing stale used."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import torch

from tiny_models import build_family, load_state, merge_yaml

from mergekit_safety.fusion.artifacts import open_artifact

WORKER = os.path.join(os.path.dirname(__file__), "fault_worker.py")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(str(tmp_path_factory.mktemp("family")), experts=2)


def run_worker(mode, config, out, kill_at, signal_name="SIGKILL", cache=None):
    env = {**os.environ, "MERGEKIT_SAFETY_CACHE": cache or ""}
    return subprocess.run(
        [sys.executable, WORKER, mode, config, out, kill_at, signal_name],
        capture_output=True, text=True, timeout=300, env=env,
    )


def write_config(tmp_path, family, mask):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"rows": 2}\n')
    config = tmp_path / "config.yml"
    config.write_text(
        merge_yaml("toy_locate_for_tests", family, ["expert0", "expert1"], f"  data: {data}\n  mask: {mask}\n")
    )
    return str(config)


@pytest.mark.parametrize("kill_at,signal_name", [("write", "SIGKILL"), ("compute", "SIGTERM")])
def test_killed_locate_leaves_no_complete_looking_artifact(family, tmp_path, kill_at, signal_name):
    mask = tmp_path / "masks" / "toy.safetensors"
    config = write_config(tmp_path, family, mask)
    killed = run_worker("locate", config, "", kill_at, signal_name, cache=str(tmp_path / "cache"))
    assert killed.returncode != 0
    assert not mask.exists()
    leftovers = [p for p in glob.glob(str(tmp_path / "masks" / "*")) if not p.endswith((".partial", ".lock"))]
    assert leftovers == []
    # the re-run computes a complete artifact, identical to an uninterrupted run's
    rerun = run_worker("locate", config, "", "never", cache=str(tmp_path / "cache"))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    reference_mask = tmp_path / "ref" / "toy.safetensors"
    (tmp_path / "ref_cfg").mkdir()
    reference = write_config(tmp_path / "ref_cfg", family, reference_mask)
    assert run_worker("locate", reference, "", "never", cache=str(tmp_path / "cache")).returncode == 0
    ours, ref = open_artifact(str(mask)), open_artifact(str(reference_mask))
    assert set(ours.keys()) == set(ref.keys())
    assert all(torch.equal(ours.get(k), ref.get(k)) for k in ours.keys())


def test_killed_merge_reruns_to_the_uninterrupted_result(family, tmp_path):
    config = write_config(tmp_path, family, "auto")
    cache = str(tmp_path / "cache")
    out = str(tmp_path / "out")
    killed = run_worker("merge", config, out, "tensor:5", "SIGKILL", cache=cache)
    assert killed.returncode != 0
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    assert run_worker("merge", config, out, "never", cache=cache).returncode == 0
    reference = str(tmp_path / "reference")
    fresh = run_worker("merge", config, reference, "never", cache=str(tmp_path / "fresh_cache"))
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    ours, expected = load_state(out), load_state(reference)
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[k], expected[k]) for k in ours)


def test_merge_killed_during_its_own_locate_recomputes(family, tmp_path):
    config = write_config(tmp_path, family, "auto")
    cache = str(tmp_path / "cache")
    killed = run_worker("merge", config, str(tmp_path / "out"), "write", "SIGKILL", cache=cache)
    assert killed.returncode != 0
    complete = [p for p in glob.glob(os.path.join(cache, "artifacts", "*")) if p.endswith(".safetensors")]
    assert complete == []  # only a .partial temp file may remain
    rerun = run_worker("merge", config, str(tmp_path / "out"), "never", cache=cache)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    merged, base = load_state(str(tmp_path / "out")), load_state(family["base"])
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(merged[name][:2], base[name][:2]) and not torch.equal(merged[name], base[name])
