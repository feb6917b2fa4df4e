"""Safe LoRA and SafeMERGE (data-free): the projected cosine, the layer choice, the limits."""

from __future__ import annotations

import pytest
import torch

from tiny_models import build_lab_family, load_state, merge_yaml, run_yaml

from mergekit_safety.methods.safe_lora import chosen_layers, projected, projected_cosine, projected_cosines

EXPERTS = ["expert0", "expert1"]
WEIGHTS = [0.5, 0.75]  # merge_yaml's


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_SAFETY_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    paths = build_lab_family(str(tmp_path_factory.mktemp("projection")), experts=3, scale=0.3)
    paths["unaligned"] = paths.pop("expert2")
    return paths


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_projection_is_the_papers_formula_without_forming_c(shape):
    generator = torch.Generator().manual_seed(0)
    alignment = torch.randn(shape, generator=generator, dtype=torch.float64)
    update = torch.randn(shape, generator=generator, dtype=torch.float64)
    c = alignment @ alignment.T / alignment.norm()
    assert torch.allclose(projected(update, alignment), c @ update)
    image = c @ update
    expected = float((image * update).sum() / (image.norm() * update.norm()))
    assert projected_cosine(update, alignment) == pytest.approx(expected)
    # ⟨V Vᵀ ΔW, ΔW⟩ = ‖Vᵀ ΔW‖² ≥ 0: the cosine is never negative, so threshold 0 selects nothing
    assert 0 <= projected_cosine(update, alignment) <= 1
    assert projected_cosine(alignment, alignment) > projected_cosine(update, alignment)


@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (16, 16)])
def test_shared_float32_cosines_match_the_float64_formula(shape):
    """One Gram product shared by several updates (wide V) or M = VᵀΔ with H = VᵀV (tall V),
    in float32: the same cosines as C·ΔW formed in float64."""
    generator = torch.Generator().manual_seed(1)
    alignment = torch.randn(shape, generator=generator, dtype=torch.float64)
    updates = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3)]
    updates.append(alignment * 0.5 + 0.01 * updates[0])  # nearly V itself: a higher cosine than random
    updates.append(torch.zeros(shape, dtype=torch.float64))
    c = alignment @ alignment.T / alignment.norm()
    expected = []
    for update in updates[:-1]:
        image = c @ update
        expected.append(float((image * update).sum() / (image.norm() * update.norm())))
    got = projected_cosines([u.float() for u in updates], alignment.float())
    assert got[:-1] == pytest.approx(expected, abs=1e-5)
    assert got[-1] == 1.0 and got[3] > max(got[:3])
    assert projected_cosines([updates[0]], torch.zeros(shape)) == [1.0]


def test_layer_choice_threshold_top_k_and_random_control():
    cosines = {"a": 0.1, "b": 0.9, "c": 0.3, "d": 0.05}
    assert chosen_layers(cosines, 0.5, 0, "none", 0) == {"a", "c", "d"}
    assert chosen_layers(cosines, 0.0, 0, "none", 0) == set()
    assert chosen_layers(cosines, 0.5, 2, "none", 0) == {"a", "d"}
    random = chosen_layers(cosines, 0.5, 2, "random", 3)
    assert len(random) == 2 and random == chosen_layers(cosines, 0.5, 2, "random", 3)


def _run(method, family, tmp_path, extra, name):
    text = merge_yaml(method, family, EXPERTS, f"  unaligned_model: {family['unaligned']}\n" + extra)
    return run_yaml(text, str(tmp_path / name))


@pytest.mark.parametrize("method", ["safe_lora", "safemerge"])
def test_threshold_zero_is_the_backbone_bit_for_bit(family, tmp_path, method):
    ours = _run(method, family, tmp_path, "  threshold: 0.0\n", "zero")
    reference = run_yaml(merge_yaml("task_arithmetic", family, EXPERTS), str(tmp_path / "ta"))
    for name, value in reference.items():
        assert torch.equal(ours[name], value), name


def test_safe_lora_projects_each_expert_on_the_lowest_cosine_layers(family, tmp_path):
    from mergekit_safety.fusion.artifacts import open_artifact

    mask = tmp_path / "cos.safetensors"
    ours = _run("safe_lora", family, tmp_path, f"  top_k: 3\n  mask: {mask}\n", "top3")
    plain = run_yaml(merge_yaml("task_arithmetic", family, EXPERTS), str(tmp_path / "ta"))
    base, unaligned = load_state(family["base"]), load_state(family["unaligned"])
    experts = [load_state(family[e]) for e in EXPERTS]
    changed = {n for n in plain if not torch.equal(ours[n], plain[n])}
    artifact = open_artifact(str(mask))
    expected_layers = set()
    for index in range(2):
        cosines = {k.split("/", 1)[1]: float(artifact.get(k)[0]) for k in artifact.keys() if k.startswith(f"cosine@{index}/")}
        expected_layers |= set(sorted(cosines, key=lambda n: (cosines[n], n))[:3])
    assert changed == expected_layers and 3 <= len(changed) <= 6
    name = sorted(changed)[0]
    alignment = (base[name] - unaligned[name]).double()
    expected = base[name].double()
    for weight, expert, index in zip(WEIGHTS, experts, range(2)):
        tau = (expert[name] - base[name]).double()
        cosine = float(artifact.get(f"cosine@{index}/{name}")[0])
        lowest = sorted(float(artifact.get(k)[0]) for k in artifact.keys() if k.startswith(f"cosine@{index}/"))[:3]
        expected = expected + weight * (projected(tau, alignment) if cosine <= lowest[-1] else tau)
    assert torch.allclose(ours[name].double(), expected, atol=1e-5)


def test_safemerge_blends_the_chosen_layers_towards_the_base(family, tmp_path):
    ours = _run("safemerge", family, tmp_path, "  top_k: 2\n  blend: 0.25\n", "blend")
    plain = run_yaml(merge_yaml("task_arithmetic", family, EXPERTS), str(tmp_path / "ta"))
    base = load_state(family["base"])
    changed = [n for n in plain if not torch.equal(ours[n], plain[n])]
    assert len(changed) == 2
    for name in changed:
        assert torch.allclose(ours[name], 0.75 * plain[name] + 0.25 * base[name], atol=1e-6)
    control = _run("safemerge", family, tmp_path, "  top_k: 2\n  blend: 0.25\n  control: random\n  control_seed: 5\n", "ctl")
    assert len([n for n in plain if not torch.equal(control[n], plain[n])]) == 2


def test_check_wants_a_matching_unaligned_model(family, tmp_path):
    from mergekit_safety.plugin.checks import check_config_file

    config = tmp_path / "c.yml"
    config.write_text(merge_yaml("safe_lora", family, EXPERTS, f"  unaligned_model: {tmp_path / 'missing'}\n"))
    assert any("missing" in p.message for p in check_config_file(str(config)))


@pytest.mark.parametrize("method", ["safe_lora", "safemerge"])
def test_a_threshold_that_selects_every_layer_is_named(family, tmp_path, caplog, method):
    """Cosines ≤ 1: a threshold above every cosine acts everywhere, and the random control is
    then the same merge — said in a warning (the real testbed's LoRA updates hit this at 0.5)."""
    import logging

    with caplog.at_level(logging.WARNING):
        _run(method, family, tmp_path, "  threshold: 1.5\n", "all")
    assert "selects every one of the" in caplog.text and "random control is the same merge" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _run(method, family, tmp_path, "  top_k: 2\n", "two")
    assert "selects every one" not in caplog.text


@pytest.mark.parametrize("method,apply_to,expected", [
    ("safe_lora", "experts", {"cosine@0", "cosine@1"}),
    ("safe_lora", "fusion", {"cosine"}),
    ("safemerge", None, {"cosine"}),
])
def test_the_artifact_holds_only_the_cosines_the_method_reads(family, tmp_path, method, apply_to, expected):
    from mergekit_safety.fusion.artifacts import open_artifact

    mask = tmp_path / f"{method}-{apply_to}.safetensors"
    extra = f"  top_k: 2\n  mask: {mask}\n" + (f"  apply_to: {apply_to}\n" if apply_to else "")
    _run(method, family, tmp_path, extra, f"{method}-{apply_to}")
    artifact = open_artifact(str(mask))
    assert {key.split("/", 1)[0] for key in artifact.keys()} == expected


@pytest.mark.parametrize("method,apply_to", [("safe_lora", "experts"), ("safe_lora", "fusion"), ("safemerge", None)])
def test_threshold_choice_in_the_merge_equals_the_artifacts(family, tmp_path, method, apply_to, caplog):
    """Threshold mode decides each layer in the merge from its own cosine (no locate pass, no
    artifact); with the artifact (an explicit ``mask`` file) the same layers are acted on and
    the outputs are bit-identical."""
    import logging

    from mergekit_safety.fusion.artifacts import open_artifact

    apply = f"  apply_to: {apply_to}\n" if apply_to else ""
    probe = tmp_path / "probe.safetensors"
    _run(method, family, tmp_path, f"  top_k: 1\n  mask: {probe}\n" + apply, "probe")
    cosines = sorted(float(open_artifact(str(probe)).get(k)[0]) for k in open_artifact(str(probe)).keys())
    threshold = (cosines[len(cosines) // 2] + cosines[len(cosines) // 2 - 1]) / 2  # between two cosines
    settings = apply + f"  threshold: {threshold}\n"
    with caplog.at_level(logging.INFO):
        streamed = _run(method, family, tmp_path, settings, "streamed")
    assert "acted on" in caplog.text
    cache = tmp_path / "cache" / "artifacts"
    assert not cache.exists() or not any(method in p.name for p in cache.iterdir())  # no artifact written
    stored = _run(method, family, tmp_path, settings + f"  mask: {tmp_path / 'stored.safetensors'}\n", "stored")
    plain = run_yaml(merge_yaml("task_arithmetic", family, EXPERTS), str(tmp_path / "ta"))
    assert any(not torch.equal(streamed[n], plain[n]) for n in plain)  # some layers acted on
    assert any(torch.equal(streamed[n], plain[n]) for n in plain if "layers" in n and n.endswith("proj.weight"))
    for name in stored:
        assert torch.equal(streamed[name], stored[name]), name
