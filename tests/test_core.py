"""The shared merge core (masked_fusion): equality with mergekit's built-ins, masks, refusals."""

from __future__ import annotations

import os

import pytest
import torch

from tiny_models import build_family, load_state, merge_yaml, run_yaml

from mergekit_safety.fusion.artifacts import (
    ArtifactError,
    ArtifactMetadata,
    ModelIdentity,
    tensor_key,
    write_artifact,
)
from mergekit_safety.fusion.kernel import BACKBONES, Backbone, TensorMasks, fuse

EXPERTS = ["expert0", "expert1", "expert2"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(str(tmp_path_factory.mktemp("family")), experts=3)


@pytest.fixture(scope="module")
def other_family(tmp_path_factory):
    return build_family(str(tmp_path_factory.mktemp("other")), experts=3, seed=7)


def write_masks(path, family, fill, names=EXPERTS, per_expert=None, role="keep", shape_of=None):
    state = load_state(family["base"])
    tensors = {}
    for name, value in state.items():
        shape = value.shape if shape_of is None else shape_of(value.shape)
        if per_expert is None:
            tensors[tensor_key(role, name)] = torch.full(shape, float(fill))
        else:
            for index, expert_fill in enumerate(per_expert):
                tensors[tensor_key(role, name, index)] = torch.full(shape, float(expert_fill))
    metadata = ArtifactMetadata(
        method="masked_fusion",
        base=ModelIdentity.of(family["base"]),
        experts=[ModelIdentity.of(family[n]) for n in names],
    )
    write_artifact(path, tensors, metadata)
    return path


def builtin_parameters(backbone: Backbone) -> str:
    if backbone in (Backbone.ties, Backbone.dare_ties, Backbone.dare_linear):
        return "  lambda: 0.8\n"
    return "  lambda: 0.8\n" if backbone == Backbone.task_arithmetic else ""


@pytest.mark.parametrize("backbone", list(Backbone))
def test_all_keep_mask_equals_mergekit_builtin(family, tmp_path, backbone):
    """Through mergekit-yaml's own code path, an all-keep mask changes nothing."""
    mask = write_masks(str(tmp_path / "keep.safetensors"), family, 1.0)
    definition = BACKBONES[backbone]
    density = "\n      density: 0.6" if definition.sparsification else ""
    shared = builtin_parameters(backbone)
    if backbone == Backbone.mean:
        # mergekit `linear` over the experts alone is θ_A + Σ w τ / Σ w.
        models = "\n".join(
            f"  - model: {family[n]}\n    parameters:\n      weight: {0.5 + 0.25 * i}"
            for i, n in enumerate(EXPERTS)
        )
        builtin_text = f"merge_method: linear\ndtype: float32\nmodels:\n{models}\n"
    else:
        builtin_text = merge_yaml(definition.mergekit_equivalent, family, EXPERTS, shared, density)
    ours_text = merge_yaml(
        "masked_fusion",
        family,
        EXPERTS,
        shared + f"  backbone: {backbone.value}\n  mask: {mask}\n",
        density,
    )
    torch.manual_seed(1234)
    expected = run_yaml(builtin_text, str(tmp_path / "builtin"))
    torch.manual_seed(1234)
    ours = run_yaml(ours_text, str(tmp_path / "ours"))
    assert expected.keys() == ours.keys()
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-6, atol=1e-6, msg=name)
    base = load_state(family["base"])
    # the check can fail: the fusion really moved away from the base
    assert any(not torch.equal(ours[n], base[n]) for n in base)


@pytest.mark.parametrize("backbone", list(Backbone))
def test_all_restore_mask_equals_aligned_exactly(family, tmp_path, backbone):
    mask = write_masks(str(tmp_path / "restore.safetensors"), family, 0.0)
    density = "\n      density: 0.6" if BACKBONES[backbone].sparsification else ""
    text = merge_yaml(
        "masked_fusion", family, EXPERTS, f"  backbone: {backbone.value}\n  mask: {mask}\n", density
    )
    merged = run_yaml(text, str(tmp_path / "out"))
    base = load_state(family["base"])
    for name, value in base.items():
        assert torch.equal(merged[name], value), name


def test_per_expert_keep_selects_experts(family, tmp_path):
    """Keeping only expert0's task vector equals a task-arithmetic merge of expert0 alone."""
    mask = write_masks(str(tmp_path / "m.safetensors"), family, None, per_expert=[1.0, 0.0, 0.0])
    ours = run_yaml(
        merge_yaml("masked_fusion", family, EXPERTS, f"  mask: {mask}\n"), str(tmp_path / "ours")
    )
    alone = run_yaml(merge_yaml("task_arithmetic", family, ["expert0"]), str(tmp_path / "alone"))
    for name in alone:
        torch.testing.assert_close(ours[name], alone[name], rtol=0, atol=1e-7)


def test_mask_for_other_shapes_is_refused(family, tmp_path):
    mask = write_masks(
        str(tmp_path / "bad.safetensors"), family, 1.0, shape_of=lambda s: (*s[:-1], s[-1] + 1)
    )
    with pytest.raises(ValueError, match=r"has shape .* but tensor .* has shape"):
        run_yaml(merge_yaml("masked_fusion", family, EXPERTS, f"  mask: {mask}\n"), str(tmp_path / "o"))


def test_mask_for_other_models_is_refused(family, other_family, tmp_path):
    mask = write_masks(str(tmp_path / "other.safetensors"), other_family, 1.0)
    with pytest.raises(ValueError, match="computed for base model"):
        run_yaml(merge_yaml("masked_fusion", family, EXPERTS, f"  mask: {mask}\n"), str(tmp_path / "o"))


def test_mask_for_other_experts_is_refused(family, tmp_path):
    mask = write_masks(str(tmp_path / "two.safetensors"), family, 1.0, names=EXPERTS[:2])
    with pytest.raises(ValueError, match="computed for experts"):
        run_yaml(merge_yaml("masked_fusion", family, EXPERTS, f"  mask: {mask}\n"), str(tmp_path / "o"))


def test_missing_mask_file_names_the_path(family, tmp_path):
    with pytest.raises(ValueError, match="nowhere.safetensors' not found"):
        run_yaml(
            merge_yaml("masked_fusion", family, EXPERTS, "  mask: nowhere.safetensors\n"),
            str(tmp_path / "o"),
        )


def test_relative_mask_path_resolves_from_working_directory(family, tmp_path):
    write_masks(str(tmp_path / "rel.safetensors"), family, 0.0)
    text = merge_yaml("masked_fusion", family, EXPERTS, "  mask: rel.safetensors\n")
    merged = run_yaml(text, str(tmp_path / "out"), cwd=str(tmp_path))
    base = load_state(family["base"])
    assert all(torch.equal(merged[n], base[n]) for n in base)


def test_invalid_parameter_fails_before_merging(family, tmp_path):
    text = merge_yaml("masked_fusion", family, EXPERTS, "  backbone: tie\n")
    with pytest.raises(Exception, match="backbone"):
        run_yaml(text, str(tmp_path / "o"))
    assert not os.path.exists(tmp_path / "o" / "model.safetensors")


# ---- the pure kernel


def _tensors(seed=0, count=3, shape=(6, 5)):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, [base + 0.1 * torch.randn(shape, generator=generator) for _ in range(count)]


def test_fuse_post_keep_and_zero_roles():
    base, experts = _tensors()
    plain = fuse(base, experts)
    post = torch.zeros_like(base)
    post[0] = 1
    masked = fuse(base, experts, masks=TensorMasks(post_keep=post))
    assert torch.equal(masked[0], plain[0]) and torch.equal(masked[1:], base[1:])
    zero = torch.zeros_like(base, dtype=torch.bool)
    zero[:, 2] = True
    zeroed = fuse(base, experts, masks=TensorMasks(zero=zero))
    assert torch.all(zeroed[:, 2] == 0) and torch.equal(zeroed[:, :2], plain[:, :2])


def test_fuse_keep_rescale_is_somf_rescale():
    base, experts = _tensors(count=1)
    keep = (torch.arange(base.numel()).reshape(base.shape) % 2).float()
    out = fuse(base, experts, masks=TensorMasks(keep=[keep], keep_rescale=True))
    expected = base + keep * (experts[0] - base) / keep.mean()
    torch.testing.assert_close(out, expected)


def test_fuse_does_not_modify_inputs():
    base, experts = _tensors()
    copies = [base.clone()] + [e.clone() for e in experts]
    fuse(base, experts, backbone=Backbone.ties, densities=[0.5] * 3)
    assert all(torch.equal(a, b) for a, b in zip([base] + experts, copies))


def test_non_finite_input_names_the_tensor(family, tmp_path):
    from mergekit.merge_methods import get, merge_state_dicts

    base, experts = _tensors()
    experts[1] = experts[1].clone()
    experts[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="w of model 2 contains NaN"):
        merge_state_dicts([{"w": base}] + [{"w": e} for e in experts], get("masked_fusion"), base=0)


def test_dare_seed_is_reproducible():
    from mergekit.merge_methods import get, merge_state_dicts

    base, experts = _tensors(shape=(40, 30))
    dicts = [{"w": base}] + [{"w": e} for e in experts]
    parameters = {"backbone": "dare_ties", "density": 0.5, "seed": 3}
    first = merge_state_dicts(dicts, get("masked_fusion"), base=0, parameters=parameters)["w"]
    torch.manual_seed(999)  # the global RNG must not matter once a seed is given
    second = merge_state_dicts(dicts, get("masked_fusion"), base=0, parameters=parameters)["w"]
    other = merge_state_dicts(dicts, get("masked_fusion"), base=0, parameters={**parameters, "seed": 4})["w"]
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_fuse_is_differentiable_in_the_mask():
    # SOMF learns its mask through fuse(); the in-place fast path must not be taken then
    from mergekit_safety.fusion.kernel import TensorMasks, fuse

    generator = torch.Generator().manual_seed(0)
    base = torch.randn(4, 5, generator=generator)
    experts = [torch.randn(4, 5, generator=generator) for _ in range(2)]
    logits = torch.zeros(4, 5, requires_grad=True)
    keep = torch.sigmoid(logits)
    fused = fuse(base, experts, masks=TensorMasks(keep=[keep, keep]))
    fused.sum().backward()
    expected = 0.25 * sum(e - base for e in experts)  # σ'(0) = 1/4
    torch.testing.assert_close(logits.grad, expected)
    with torch.no_grad():  # and the fast path gives the same value
        torch.testing.assert_close(fuse(base, experts, masks=TensorMasks(keep=[keep.detach()] * 2)), fused.detach())


# --------------------------------------------------------------------------- fast TIES selection


def test_fast_ties_selection_differs_from_mergekit_only_among_ties_at_the_threshold():
    from mergekit.sparsify import SparsificationMethod, sparsify

    from mergekit_safety.fusion.kernel import magnitude_fast, top_k_mask

    generator = torch.Generator().manual_seed(0)
    for case in range(200):
        shape = (int(torch.randint(1, 9, (1,), generator=generator)), int(torch.randint(1, 33, (1,), generator=generator)))
        # few distinct magnitudes: many ties, also at the threshold
        tensor = torch.randint(-3, 4, shape, generator=generator).float()
        density = float(torch.rand(1, generator=generator)) * 0.9 + 0.05
        ours = magnitude_fast(tensor, density)
        theirs = sparsify(tensor, density=density, method=SparsificationMethod.magnitude)
        k = max(1, int(density * tensor.numel()))
        assert int((ours != 0).sum()) == int((theirs != 0).sum()) or (tensor == 0).any()
        differ = (ours != theirs).reshape(-1)
        if differ.any():
            magnitudes = tensor.abs().reshape(-1)
            threshold = torch.kthvalue(magnitudes, magnitudes.numel() - k + 1).values
            assert bool((magnitudes[differ] == threshold).all()), case  # only ties at the threshold
    # without ties both select the same entries
    distinct = torch.randn(64, 48, generator=generator)
    assert torch.equal(magnitude_fast(distinct, 0.3), sparsify(distinct, density=0.3, method=SparsificationMethod.magnitude))
    mask = top_k_mask(torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5]), 3)
    assert mask.tolist() == [False, True, True, True, False]
    mask = top_k_mask(torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5]), 2)
    assert mask.tolist() == [False, True, True, False, False]  # lowest indices among the ties


def test_fast_sign_consensus_is_mergekits_bit_for_bit():
    """The fast path's consensus (sign bits, a table of weight sums) gives exactly mergekit's
    get_mask("sum") + agreeing sums, in every float dtype, with negative weights, exact zeros,
    sums of exactly 0 and more experts than the table covers."""
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask

    from mergekit_safety.fusion.kernel import sign_consensus

    generator = torch.Generator().manual_seed(3)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for count in (1, 2, 3, 5, 9):
            shape = (count, 17, 23)
            deltas = (torch.randn(shape, generator=generator) * 0.01).to(dtype)
            deltas[torch.rand(shape, generator=generator) < 0.4] = 0  # sparsified entries
            deltas[:, 0, :4] = 0  # columns whose sum is exactly 0 (majority +1, as in get_mask)
            if count >= 2:
                deltas[1, 1, :5] = -deltas[0, 1, :5]  # opposite entries: sums of 0 with disagreement
            weights = (torch.rand(count, generator=generator) * 2 - 0.5).tolist()
            weight_tensor = torch.tensor(weights, dtype=dtype).view(count, 1, 1)
            deltas = deltas * weight_tensor
            agree = get_mask(deltas, method="sum", mask_dtype=dtype)
            expected_mixed = (deltas * agree).sum(dim=0)
            expected_divisor = (weight_tensor * agree).sum(dim=0)
            mixed, divisor = sign_consensus(deltas.clone(), weights)
            assert torch.equal(mixed, expected_mixed), (dtype, count)
            assert torch.equal(divisor, expected_divisor), (dtype, count)
    assert sign_consensus(torch.zeros(2, 3, dtype=torch.float64), [1.0, 1.0]) is None  # no bit view: the caller's path


def test_histogram_selection_equals_the_kth_value_selection():
    """top_k_mask's histogram of bit patterns selects exactly the k largest, equal values at the
    threshold by lowest index — checked against a k-th-value selection, in every float dtype."""
    from mergekit_safety.fusion.kernel import top_k_mask

    generator = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for trial in range(150):
            n = int(torch.randint(1, 300, (1,), generator=generator))
            if trial % 3 == 0:  # few distinct values: surplus ties at the threshold
                magnitudes = torch.randint(0, 4, (n,), generator=generator).to(dtype)
            else:
                scale = 10.0 ** int(torch.randint(-6, 3, (1,), generator=generator))
                magnitudes = (torch.randn(n, generator=generator) * scale).abs().to(dtype)
            k = int(torch.randint(0, n + 2, (1,), generator=generator))
            values = magnitudes.double()
            expected = torch.zeros(n, dtype=torch.bool)
            if k >= n:
                expected[:] = True
            elif k > 0:
                threshold = torch.kthvalue(values, n - k + 1).values
                expected = values > threshold
                expected[(values == threshold).nonzero().view(-1)[: k - int(expected.sum())]] = True
            assert torch.equal(top_k_mask(magnitudes, k), expected), (dtype, trial)


def test_fast_ties_equals_mergekit_ties_without_ties_at_the_threshold():
    """The whole fast TIES path (selection, sparsified slots in place, consensus) against the
    default path, which is mergekit's code: identical outputs whenever magnitudes are distinct."""
    from mergekit_safety.fusion.kernel import fuse

    generator = torch.Generator().manual_seed(7)
    for dtype in (torch.float32, torch.bfloat16):
        for count in (1, 3, 4):
            # 96 distinct magnitudes (exact in bf16) with random signs; a float32 base on a grid
            # coarse enough that θ_i − θ_A is exactly the task vector again (bf16: base 0)
            base = (torch.randint(-512, 512, (8, 12), generator=generator) / 1024) if dtype == torch.float32 \
                else torch.zeros(8, 12)
            experts = [(base + ((1 + torch.randperm(96, generator=generator) / 128) * 2.0 ** -6
                                * (torch.randint(0, 2, (96,), generator=generator) * 2 - 1)).reshape(8, 12)).to(dtype)
                       for _ in range(count)]
            base = base.to(dtype)
            for expert in experts:  # the test's premise: no two equal magnitudes in a task vector
                magnitudes = (expert - base).abs().reshape(-1)
                assert magnitudes.unique().numel() == magnitudes.numel()
            weights = (torch.rand(count, generator=generator) + 0.2).tolist()
            densities = (torch.rand(count, generator=generator) * 0.8 + 0.1).tolist()
            for normalize in (None, False):
                default = fuse(base, experts, backbone="ties", weights=weights, densities=densities, normalize=normalize)
                fast = fuse(base, experts, backbone="ties", weights=weights, densities=densities, normalize=normalize,
                            ties_selection="fast")
                assert torch.equal(default, fast), (dtype, count, normalize)


def test_fast_ties_through_mergekit_yaml(family, tmp_path):
    text = merge_yaml("masked_fusion", family, ["expert0", "expert1"], "  backbone: ties\n  ties_selection: fast\n",
                      model_parameters="\n      density: 0.4")
    fast = run_yaml(text, str(tmp_path / "fast"))
    reference = run_yaml(merge_yaml("ties", family, ["expert0", "expert1"], model_parameters="\n      density: 0.4"),
                         str(tmp_path / "ties"))
    for name, value in reference.items():  # random float weights: no ties at the threshold
        assert torch.equal(fast[name], value), name
