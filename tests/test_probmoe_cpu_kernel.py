"""The fused CPU kernel of the ProbMoE subset DP against the tensor-op DP (``SubsetDP``).

The brute-force checks of the math run on both backends (``test_probmoe_math.py``); here the
kernel is compared with ``SubsetDP`` value by value (marginals, Hessian-vector products, the
draws for given uniforms), its build is checked from a fresh cache folder by two processes at
once, and a failed build falls back to the tensor ops with a warning that names the cause.

Shape-suffix legend: T tokens, E experts, K subset size.
"""

from __future__ import annotations

import multiprocessing
import warnings

import pytest
import torch

from pr2_megatron.routing.probmoe import cpu_kernel, subset_dp
from pr2_megatron.routing.probmoe.subset_dp import SubsetDP

pytestmark = pytest.mark.skipif(not cpu_kernel.available(), reason="no C++ compiler here")

SHAPES = [(64, 8), (256, 8), (8, 2), (16, 1), (10, 10), (33, 5), (7, 6)]


def _logits(num_tokens, num_experts, dtype, seed, spread=2.0):
    generator = torch.Generator().manual_seed(seed)
    theta_TE = torch.randn(num_tokens, num_experts, generator=generator, dtype=torch.float64)
    return (theta_TE * spread).to(dtype), generator


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("num_experts, k", SHAPES)
def test_marginals_and_hvp_equal_the_tensor_op_dp(num_experts, k, dtype):
    # 37 tokens: four full groups of 8 and a partial one.
    theta_TE, generator = _logits(37, num_experts, dtype, seed=num_experts * 10 + k)
    grad_TE = torch.randn(theta_TE.shape, generator=generator, dtype=torch.float64).to(dtype)
    reference = SubsetDP(theta_TE, k, k, ordered=False)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    mu_TE = cpu_kernel.marginals(theta_TE, k)
    assert mu_TE.dtype == dtype
    torch.testing.assert_close(mu_TE, reference.marginals(), rtol=0, atol=tol)
    torch.testing.assert_close(mu_TE.sum(dim=-1), torch.full((37,), float(k), dtype=dtype))
    torch.testing.assert_close(
        cpu_kernel.hvp(theta_TE, grad_TE, k), reference.hvp(grad_TE), rtol=0, atol=tol
    )


@pytest.mark.parametrize("num_experts, k", SHAPES)
def test_draws_equal_the_tensor_op_dp_for_the_same_uniforms(num_experts, k):
    theta_TE, generator = _logits(203, num_experts, torch.float32, seed=k)
    uniform_TK = torch.rand((203, k), generator=generator)
    mask_TE, ids_TK = cpu_kernel.sample(theta_TE, k, uniform_TK)
    sizes_T = torch.full((203,), k, dtype=torch.long)
    reference_mask_TE, reference_ids_TK = SubsetDP(theta_TE, k, k, False).sample(
        sizes_T, uniform_TK
    )
    assert torch.equal(ids_TK, reference_ids_TK)
    assert torch.equal(mask_TE, reference_mask_TE)
    assert bool((ids_TK[:, 1:] > ids_TK[:, :-1]).all())  # ascending, distinct


def test_excluded_and_tied_experts():
    """``-inf`` logits exclude their expert, ties split evenly; both as the tensor-op DP."""
    theta_TE = torch.zeros(9, 12, dtype=torch.float64)
    theta_TE[8, :] = torch.arange(12, dtype=torch.float64) * 5.0  # a wide row
    theta_TE[:, 3] = float("-inf")
    theta_TE[4:, 5:9] = float("-inf")
    reference = SubsetDP(theta_TE, 3, 3, ordered=False)
    mu_TE = cpu_kernel.marginals(theta_TE, 3)
    torch.testing.assert_close(mu_TE, reference.marginals(), rtol=0, atol=1e-12)
    assert bool((mu_TE[:, 3] == 0).all()) and bool((mu_TE[4:8, 5:9] == 0).all())
    torch.testing.assert_close(mu_TE[0], torch.tensor([3 / 11] * 3 + [0.0] + [3 / 11] * 8).double())
    uniform_TK = torch.rand((9, 3), generator=torch.Generator().manual_seed(0))
    mask_TE, _ = cpu_kernel.sample(theta_TE, 3, uniform_TK)
    assert not bool(mask_TE[:, 3].any()) and not bool(mask_TE[4:8, 5:9].any())


def test_the_block_drivers_take_the_kernel_for_exact_k_only(monkeypatch):
    theta_TE, _ = _logits(600, 16, torch.float32, seed=3)
    calls = []
    for name in ("marginals", "hvp", "sample"):
        original = getattr(cpu_kernel, name)
        monkeypatch.setattr(
            cpu_kernel, name, lambda *a, _o=original, _n=name: calls.append(_n) or _o(*a)
        )
    generator = torch.Generator().manual_seed(1)
    mask_TE, sizes_T, ids_TK = subset_dp.sample(theta_TE, 4, 4, False, generator=generator)
    mu_TE = subset_dp.marginals(theta_TE, 4, 4, False)
    subset_dp.hvp(theta_TE, torch.ones_like(theta_TE), 4, 4, False)
    assert calls == ["sample", "marginals", "hvp"]
    # The same generator state gives the same draws with the kernel off.
    cpu_kernel.set_enabled(False)
    try:
        generator = torch.Generator().manual_seed(1)
        reference = subset_dp.sample(theta_TE, 4, 4, False, generator=generator)
        reference_mu_TE = subset_dp.marginals(theta_TE, 4, 4, False)
    finally:
        cpu_kernel.set_enabled(None)
    assert all(torch.equal(a, b) for a, b in zip((mask_TE, sizes_T, ids_TK), reference))
    torch.testing.assert_close(mu_TE, reference_mu_TE, rtol=0, atol=1e-6)
    # Dynamic-k and the ordered path stay on the tensor ops.
    subset_dp.marginals(theta_TE, 2, 4, False)
    subset_dp.marginals(theta_TE * 100, 4, 4, True)
    assert calls == ["sample", "marginals", "hvp"]


def _build_in(queue):
    from pr2_megatron.routing.probmoe import cpu_kernel as kernel

    ok = kernel.available()
    theta_TE = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
    queue.put(
        (ok, str(kernel._cache_dir()), kernel.marginals(theta_TE, 1).tolist() if ok else None)
    )


def test_two_processes_build_into_a_fresh_cache_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PR2_KERNEL_CACHE", str(tmp_path))  # the spawned children's
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_build_in, args=(queue,)) for _ in range(2)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    softmax = torch.softmax(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), 0).tolist()
    for ok, cache, mu in results:
        assert ok and cache == str(tmp_path)
        assert mu[0] == pytest.approx(softmax, abs=1e-15)
    assert len(list(tmp_path.glob("pr2_probmoe_dp_*.so"))) == 1  # no partial files left
    assert list(tmp_path.iterdir()) == list(tmp_path.glob("pr2_probmoe_dp_*.so"))


def test_a_failed_build_warns_and_the_tensor_ops_take_over(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_library", None)
    monkeypatch.setattr(cpu_kernel, "_failure", None)
    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: None)
    theta_TE, _ = _logits(20, 8, torch.float64, seed=5)
    with pytest.warns(RuntimeWarning, match="ProbMoE CPU kernel unavailable.*no C\\+\\+ compiler"):
        assert not cpu_kernel.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning only
        assert not cpu_kernel.available()
        mu_TE = subset_dp.marginals(theta_TE, 3, 3, False)
    torch.testing.assert_close(mu_TE, SubsetDP(theta_TE, 3, 3, False).marginals())
    with pytest.raises(RuntimeError, match="CPU kernel is unavailable: no C\\+\\+ compiler"):
        cpu_kernel.marginals(theta_TE, 3)  # called directly: an error, not a silent fallback


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match=r"subset size k=9 must be in \[1, E=8\]"):
        cpu_kernel.marginals(torch.zeros(2, 8), 9)
    with pytest.raises(ValueError, match="takes 2-D CPU logits, got 3-D"):
        cpu_kernel.marginals(torch.zeros(2, 8, 1), 2)
    with pytest.raises(ValueError, match=r"uniforms \(2, 3\) for \(2, k=2\)"):
        cpu_kernel.sample(torch.zeros(2, 8), 2, torch.zeros(2, 3))


def test_half_precision_logits_are_computed_from_their_float32_values():
    theta_TE, generator = _logits(19, 16, torch.float32, seed=11)
    half_TE = theta_TE.bfloat16()
    grad_TE = torch.randn(half_TE.shape, generator=generator).bfloat16()
    reference = SubsetDP(half_TE.float(), 4, 4, ordered=False)
    mu_TE = cpu_kernel.marginals(half_TE, 4)
    assert mu_TE.dtype == torch.bfloat16
    assert torch.equal(mu_TE, reference.marginals().bfloat16())
    hvp_TE = cpu_kernel.hvp(half_TE, grad_TE, 4)
    assert hvp_TE.dtype == torch.bfloat16
    torch.testing.assert_close(hvp_TE.float(), reference.hvp(grad_TE.float()), rtol=1e-2, atol=1e-3)
