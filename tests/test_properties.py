"""Property-based tests (hypothesis) of the fusion kernel shared by every method."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_safety.fusion.kernel import Backbone, TensorMasks, fuse

SYMMETRIC = [Backbone.task_arithmetic, Backbone.ties, Backbone.mean]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def problems(draw):
    rows = draw(st.integers(1, 7))
    cols = draw(st.integers(1, 7))
    count = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=generator)
    experts = [base + torch.randn(rows, cols, generator=generator) * 0.1 for _ in range(count)]
    weights = draw(st.lists(st.floats(0.1, 2.0), min_size=count, max_size=count))
    densities = draw(st.lists(st.floats(0.05, 1.0), min_size=count, max_size=count))
    return base, experts, weights, densities


common = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@common
@given(problems(), st.sampled_from(list(Backbone)), st.floats(0.1, 2.0), st.integers(0, 1000))
def test_deterministic_given_the_rng(problem, backbone, lambda_, seed):
    base, experts, weights, densities = problem
    outputs = []
    for _ in range(2):
        torch.manual_seed(seed)
        outputs.append(fuse(base, experts, backbone=backbone, weights=weights, densities=densities, lambda_=lambda_))
    assert torch.equal(outputs[0], outputs[1])


@common
@given(problems(), st.sampled_from(list(Backbone)), st.integers(0, 1000))
def test_all_keep_equals_the_backbone(problem, backbone, seed):
    base, experts, weights, densities = problem
    torch.manual_seed(seed)
    plain = fuse(base, experts, backbone=backbone, weights=weights, densities=densities)
    ones = [torch.ones_like(base) for _ in experts]
    torch.manual_seed(seed)
    kept = fuse(
        base, experts, backbone=backbone, weights=weights, densities=densities,
        masks=TensorMasks(keep=ones, post_keep=torch.ones_like(base)),
    )
    assert torch.equal(plain, kept)


@common
@given(problems(), st.sampled_from(list(Backbone)), st.booleans())
def test_all_restore_equals_aligned(problem, backbone, via_post):
    base, experts, weights, densities = problem
    zeros = torch.zeros_like(base)
    masks = TensorMasks(post_keep=zeros) if via_post else TensorMasks(keep=[zeros] * len(experts))
    out = fuse(base, experts, backbone=backbone, weights=weights, densities=densities, masks=masks)
    assert torch.equal(out, base)


@common
@given(problems(), st.sampled_from(list(Backbone)), st.sampled_from(DTYPES))
def test_shape_and_dtype_are_kept(problem, backbone, dtype):
    base, experts, weights, densities = problem
    out = fuse(base.to(dtype), [e.to(dtype) for e in experts], backbone=backbone, weights=weights, densities=densities)
    assert out.shape == base.shape and out.dtype == dtype
    assert bool(torch.isfinite(out).all())


@common
@given(problems(), st.sampled_from(SYMMETRIC), st.randoms(use_true_random=False))
def test_expert_order_does_not_matter_for_symmetric_backbones(problem, backbone, rng):
    base, experts, weights, densities = problem
    order = list(range(len(experts)))
    rng.shuffle(order)
    out = fuse(base, experts, backbone=backbone, weights=weights, densities=densities)
    permuted = fuse(
        base,
        [experts[i] for i in order],
        backbone=backbone,
        weights=[weights[i] for i in order],
        densities=[densities[i] for i in order],
    )
    torch.testing.assert_close(out, permuted, rtol=1e-5, atol=1e-6)


@common
@given(problems())
def test_expert_equal_to_base_contributes_nothing(problem):
    base, experts, weights, _ = problem
    with_copy = fuse(base, experts + [base.clone()], weights=weights + [1.0])
    torch.testing.assert_close(with_copy, fuse(base, experts, weights=weights), rtol=0, atol=0)
