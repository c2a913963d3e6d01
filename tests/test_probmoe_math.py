"""ProbMoE subset math checked against brute-force enumeration over all subsets, and the
current DP against the previous one (``routing/probmoe/_reference.py``).

Every test runs twice: on the fused CPU kernel (``cpu_kernel``, which takes the exact-k
unsorted-path calls) and on the tensor ops alone (the kernel switched off).

Shape-suffix legend: T tokens, E experts, K sizes or index slots, S enumerated subsets.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pr2_megatron.routing.probmoe import _reference, cpu_kernel, subset_dp
from pr2_megatron.routing.probmoe.subsets import (
    SubsetDistribution,
    exact_marginals,
    log_partition_by_size,
    log_prob_size,
    mask_to_indices,
    sample_subsets,
    simple_straight_through,
    subset_log_partition,
    subset_log_prob,
    topk_of,
)

try:
    from scipy import stats
except ImportError:  # pragma: no cover - the fallback bound is exercised where scipy is absent
    stats = None

TOL = 1e-9


@pytest.fixture(autouse=True, params=["cpu_kernel", "tensor_ops"])
def dp_backend(request):
    """The DP backend of the exact-k unsorted-path calls (the kernel skips where it can't build)."""
    on = request.param == "cpu_kernel"
    cpu_kernel.set_enabled(on)
    if on and not cpu_kernel.available():
        cpu_kernel.set_enabled(None)
        pytest.skip("the ProbMoE CPU kernel did not build here")
    yield request.param
    cpu_kernel.set_enabled(None)


# --------------------------------------------------------------------------------------------
# Reference: enumerate every subset in float64
# --------------------------------------------------------------------------------------------


def all_subsets(num_experts: int) -> list[tuple[int, ...]]:
    return [
        s for j in range(num_experts + 1) for s in itertools.combinations(range(num_experts), j)
    ]


def subset_masks_SE(num_experts: int) -> torch.Tensor:
    subsets = all_subsets(num_experts)
    mask_SE = torch.zeros(len(subsets), num_experts, dtype=torch.float64)
    for i, s in enumerate(subsets):
        mask_SE[i, list(s)] = 1.0
    return mask_SE


def brute_force(logits_TE: torch.Tensor, k_min: int, k_max: int) -> dict[str, torch.Tensor]:
    """Log-partition by size, log Z, subset log-probs and marginals by enumeration."""
    num_experts = logits_TE.shape[1]
    mask_SE = subset_masks_SE(num_experts)
    size_S = mask_SE.sum(-1).long()
    score_TS = logits_TE @ mask_SE.T  # Σ_{e∈S} θ_e
    by_size_TK = torch.stack(
        [torch.logsumexp(score_TS[:, size_S == j], dim=-1) for j in range(num_experts + 1)], dim=-1
    )
    in_range_S = (size_S >= k_min) & (size_S <= k_max)
    log_z_T = torch.logsumexp(score_TS[:, in_range_S], dim=-1)
    log_p_TS = torch.where(in_range_S, score_TS - log_z_T[:, None], float("-inf"))
    marginals_TE = log_p_TS.exp() @ mask_SE
    return {
        "by_size": by_size_TK,
        "log_z": log_z_T,
        "log_p": log_p_TS,
        "marginals": marginals_TE,
        "mask": mask_SE,
    }


def random_logits(num_experts: int, seed: int) -> torch.Tensor:
    """Rows of ordinary, large (±30) and mixed-extreme (±50) logits, float64."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat(
        [
            torch.randn(2, num_experts, generator=g, dtype=torch.float64) * 2.0,
            (torch.rand(2, num_experts, generator=g, dtype=torch.float64) * 2 - 1) * 30.0,
            (torch.randint(0, 2, (1, num_experts), generator=g).double() * 2 - 1) * 50.0,
        ]
    )


def size_ranges(num_experts: int) -> list[tuple[int, int]]:
    return [(a, b) for b in range(1, num_experts + 1) for a in range(0, b + 1)]


# --------------------------------------------------------------------------------------------
# DP versus enumeration
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts", [3, 5, 7])
def test_log_partition_by_size_matches_enumeration(num_experts):
    logits_TE = random_logits(num_experts, seed=num_experts)
    ref = brute_force(logits_TE, 0, num_experts)
    for k_max in range(num_experts + 1):
        got_TK = log_partition_by_size(logits_TE, k_max)
        assert got_TK.shape == (logits_TE.shape[0], k_max + 1)
        torch.testing.assert_close(got_TK, ref["by_size"][:, : k_max + 1], rtol=0, atol=TOL)


def test_log_partition_impossible_sizes_are_minus_inf():
    logits_TE = random_logits(3, seed=0)
    got_TK = log_partition_by_size(logits_TE, 5)
    assert torch.isneginf(got_TK[:, 4:]).all()
    assert torch.isfinite(got_TK[:, :4]).all()


@pytest.mark.parametrize("num_experts", [3, 5, 7])
def test_log_prob_size_matches_enumeration(num_experts):
    logits_TE = random_logits(num_experts, seed=10 + num_experts)
    mask_SE = subset_masks_SE(num_experts)
    size_S = mask_SE.sum(-1)
    # Independent Bernoulli(sigmoid θ): log p(S) = Σ_{e∈S} log σ(θ_e) + Σ_{e∉S} log σ(−θ_e).
    logsig_TE = torch.nn.functional.logsigmoid(logits_TE)
    logsig_neg_TE = torch.nn.functional.logsigmoid(-logits_TE)
    log_p_TS = logsig_TE @ mask_SE.T + logsig_neg_TE @ (1 - mask_SE).T
    for k in range(num_experts + 1):
        want_T = torch.logsumexp(log_p_TS[:, size_S == k], dim=-1)
        torch.testing.assert_close(log_prob_size(logits_TE, k), want_T, rtol=0, atol=TOL)
    total_T = torch.logsumexp(
        torch.stack([log_prob_size(logits_TE, k) for k in range(num_experts + 1)]), dim=0
    )
    torch.testing.assert_close(total_T, torch.zeros_like(total_T), rtol=0, atol=TOL)


@pytest.mark.parametrize("num_experts", [3, 5, 7])
def test_partition_subset_probs_and_marginals_match_enumeration(num_experts):
    logits_TE = random_logits(num_experts, seed=20 + num_experts)
    for k_min, k_max in size_ranges(num_experts):
        ref = brute_force(logits_TE, k_min, k_max)
        torch.testing.assert_close(
            subset_log_partition(logits_TE, k_min, k_max), ref["log_z"], rtol=0, atol=TOL
        )
        # Probability of every enumerated subset, for every token (-inf outside the range).
        num_tokens, num_subsets = ref["log_p"].shape
        mask_TSE = ref["mask"].bool().expand(num_tokens, -1, -1)
        got_TS = subset_log_prob(
            logits_TE.repeat_interleave(num_subsets, dim=0),
            mask_TSE.reshape(-1, num_experts),
            k_min,
            k_max,
        ).reshape(num_tokens, num_subsets)
        assert torch.equal(torch.isneginf(got_TS), torch.isneginf(ref["log_p"]))
        finite_TS = torch.isfinite(ref["log_p"])
        torch.testing.assert_close(
            got_TS[finite_TS].exp(), ref["log_p"][finite_TS].exp(), rtol=0, atol=TOL
        )
        torch.testing.assert_close(
            exact_marginals(logits_TE, k_min, k_max), ref["marginals"], rtol=0, atol=TOL
        )


@pytest.mark.parametrize("num_experts, k", [(5, 1), (5, 2), (8, 3), (16, 8)])
def test_marginals_sum_to_k_and_lie_in_unit_interval(num_experts, k):
    g = torch.Generator().manual_seed(k)
    logits_TE = torch.randn(64, num_experts, generator=g, dtype=torch.float64) * 10
    mu_TE = exact_marginals(logits_TE, k, k)
    torch.testing.assert_close(mu_TE.sum(-1), torch.full((64,), float(k), dtype=torch.float64))
    assert (mu_TE >= -TOL).all() and (mu_TE <= 1 + TOL).all()


def test_marginals_sum_to_expected_size_for_dynamic_k():
    logits_TE = random_logits(6, seed=3)
    ref = brute_force(logits_TE, 2, 4)
    size_p_TK = ref["by_size"][:, 2:5] - ref["log_z"][:, None]
    expected_size_T = (size_p_TK.exp() * torch.arange(2, 5, dtype=torch.float64)).sum(-1)
    torch.testing.assert_close(exact_marginals(logits_TE, 2, 4).sum(-1), expected_size_T)


def test_unconstrained_marginals_are_sigmoid():
    logits_TE = random_logits(7, seed=4)
    torch.testing.assert_close(
        exact_marginals(logits_TE, 0, 7), torch.sigmoid(logits_TE), rtol=0, atol=TOL
    )


def test_float32_is_stable_for_logits_of_magnitude_50():
    g = torch.Generator().manual_seed(5)
    logits64_TE = (torch.rand(256, 32, generator=g, dtype=torch.float64) * 2 - 1) * 50
    logits64_TE[:4] = 50.0  # all ties at the top
    logits64_TE[4:8] = -50.0
    for k_min, k_max in [(4, 4), (1, 8)]:
        mu32_TE = exact_marginals(logits64_TE.float(), k_min, k_max)
        assert mu32_TE.dtype == torch.float32 and torch.isfinite(mu32_TE).all()
        mu64_TE = exact_marginals(logits64_TE, k_min, k_max)
        torch.testing.assert_close(mu32_TE.double(), mu64_TE, rtol=0, atol=1e-4)
        log_z32_T = subset_log_partition(logits64_TE.float(), k_min, k_max)
        log_z64_T = subset_log_partition(logits64_TE, k_min, k_max)
        torch.testing.assert_close(log_z32_T.double(), log_z64_T, rtol=1e-6, atol=1e-4)


def test_half_precision_logits_are_computed_in_float32():
    logits_TE = torch.randn(8, 16, generator=torch.Generator().manual_seed(6)) * 5
    mu_TE = exact_marginals(logits_TE.bfloat16(), 2, 2)
    assert mu_TE.dtype == torch.float32
    torch.testing.assert_close(mu_TE.sum(-1), torch.full((8,), 2.0))


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


def test_gradcheck_log_partition_and_marginals():
    g = torch.Generator().manual_seed(7)
    logits_TE = (torch.randn(3, 5, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: log_partition_by_size(x, 3), (logits_TE,))
    assert torch.autograd.gradgradcheck(lambda x: log_partition_by_size(x, 5), (logits_TE,))
    for k_min, k_max in [(2, 2), (1, 3), (0, 5)]:
        assert torch.autograd.gradcheck(
            lambda x, lo=k_min, hi=k_max: exact_marginals(x, lo, hi), (logits_TE,)
        )


def test_marginal_jacobian_is_inclusion_covariance():
    # ∂μ_e/∂θ_f = Cov(1[e∈S], 1[f∈S]) = P(e,f ∈ S) − μ_e μ_f, checked against enumeration.
    logits_E = random_logits(5, seed=8)[1]
    for k_min, k_max in [(2, 2), (1, 4)]:
        jac_EE = torch.autograd.functional.jacobian(
            lambda x, lo=k_min, hi=k_max: exact_marginals(x[None], lo, hi)[0], logits_E
        )
        ref = brute_force(logits_E[None], k_min, k_max)
        p_S, mask_SE = ref["log_p"][0].exp(), ref["mask"]
        joint_EE = mask_SE.T @ (p_S[:, None] * mask_SE)
        mu_E = ref["marginals"][0]
        torch.testing.assert_close(jac_EE, joint_EE - torch.outer(mu_E, mu_E), rtol=0, atol=TOL)


def test_marginals_carry_gradient_to_upstream_parameters():
    g = torch.Generator().manual_seed(9)
    weight_HE = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    hidden_TH = torch.randn(10, 4, generator=g, dtype=torch.float64)
    mu_TE = exact_marginals(hidden_TH @ weight_HE, 2, 2)
    assert mu_TE.requires_grad
    (mu_TE[:, 0].sum()).backward()
    assert weight_HE.grad is not None and weight_HE.grad.abs().sum() > 0


def test_marginals_without_grad_have_no_graph():
    logits_TE = random_logits(5, seed=10)
    with torch.no_grad():
        mu_TE = exact_marginals(logits_TE, 2, 2)
    assert not mu_TE.requires_grad
    # Under no_grad with logits that do require grad, μ is still computed.
    with torch.no_grad():
        mu2_TE = exact_marginals(logits_TE.clone().requires_grad_(True), 2, 2)
    torch.testing.assert_close(mu_TE, mu2_TE.detach())


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def assert_frequencies_match(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Chi-square goodness of fit (scipy) or a 4-standard-error bound per cell."""
    n = int(counts.sum())
    probs = probs / probs.sum()
    if stats is not None:
        result = stats.chisquare(counts.double().numpy(), (probs * n).double().numpy())
        assert result.pvalue > 1e-3, f"chi-square p={result.pvalue:.2e}"
    else:  # pragma: no cover
        freq = counts.double() / n
        stderr = (probs * (1 - probs) / n).sqrt()
        assert ((freq - probs).abs() <= 4 * stderr + 1e-12).all(), (freq, probs)


def subset_ids(mask_TE: torch.Tensor) -> torch.Tensor:
    """Bit-pattern id of each row's subset."""
    return (mask_TE.long() << torch.arange(mask_TE.shape[1])).sum(-1)


def empirical_vs_exact(logits_E: torch.Tensor, k_min: int, k_max: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    mask_TE, sizes_T = sample_subsets(logits_E.expand(n, -1), k_min, k_max, generator=g)
    ref = brute_force(logits_E[None].double(), k_min, k_max)
    in_range_S = torch.isfinite(ref["log_p"][0])
    ids_S = subset_ids(ref["mask"].bool())[in_range_S]
    counts_S = (subset_ids(mask_TE)[:, None] == ids_S[None]).sum(0)
    assert int(counts_S.sum()) == n  # every sample is one of the allowed subsets
    return mask_TE, sizes_T, counts_S, ref["log_p"][0][in_range_S].exp(), ref


@pytest.mark.parametrize("num_experts", [5, 8, 32])
@pytest.mark.parametrize("k_min, k_max", [(1, 1), (2, 2), (4, 4), (1, 4), (0, 3)])
def test_samples_have_sizes_in_range_and_distinct_experts(num_experts, k_min, k_max):
    g = torch.Generator().manual_seed(11)
    logits_TE = torch.cat(
        [
            torch.randn(200, num_experts, generator=g) * 3,
            (torch.rand(200, num_experts, generator=g) * 2 - 1) * 50,
            torch.full((4, num_experts), 50.0),
            torch.full((4, num_experts), -50.0),
        ]
    )
    mask_TE, sizes_T = sample_subsets(logits_TE, k_min, k_max, generator=g)
    assert mask_TE.dtype == torch.bool and mask_TE.shape == logits_TE.shape
    assert torch.equal(mask_TE.sum(-1), sizes_T)
    assert ((sizes_T >= k_min) & (sizes_T <= k_max)).all()


def test_sampling_follows_dominant_logits():
    logits_TE = torch.full((50, 6), -50.0)
    logits_TE[:, [1, 4]] = 50.0
    mask_TE, _ = sample_subsets(logits_TE, 2, 2, generator=torch.Generator().manual_seed(0))
    assert mask_TE[:, [1, 4]].all() and mask_TE.sum() == 100


def test_sampling_is_reproducible_with_a_generator():
    logits_TE = random_logits(8, seed=12).float()
    a = sample_subsets(logits_TE, 1, 4, generator=torch.Generator().manual_seed(3))
    b = sample_subsets(logits_TE, 1, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_exact_k_subset_frequencies_match_distribution():
    logits_E = torch.tensor([0.8, -0.5, 0.1, 1.2, -1.0], dtype=torch.float64)
    _, _, counts_S, probs_S, _ = empirical_vs_exact(logits_E, 2, 2, n=20000, seed=13)
    assert counts_S.numel() == 10
    assert_frequencies_match(counts_S, probs_S)


def test_dynamic_k_subset_and_size_frequencies_match_distribution():
    logits_E = torch.tensor([0.3, -0.4, 0.9, -0.2, 0.1], dtype=torch.float64)
    _, sizes_T, counts_S, probs_S, ref = empirical_vs_exact(logits_E, 1, 3, n=20000, seed=14)
    assert counts_S.numel() == 5 + 10 + 10
    assert_frequencies_match(counts_S, probs_S)
    size_counts_K = torch.bincount(sizes_T - 1, minlength=3)
    size_probs_K = (ref["by_size"][0, 1:4] - ref["log_z"][0]).exp()
    assert_frequencies_match(size_counts_K, size_probs_K)


def test_frequency_check_has_power():
    # Samples from one set of logits must be rejected against a moderately different one.
    logits_E = torch.tensor([0.8, -0.5, 0.1, 1.2, -1.0], dtype=torch.float64)
    _, _, counts_S, _, _ = empirical_vs_exact(logits_E, 2, 2, n=20000, seed=15)
    wrong = brute_force((logits_E + torch.tensor([0.2, 0, 0, 0, 0]))[None], 2, 2)
    wrong_probs_S = wrong["log_p"][0][torch.isfinite(wrong["log_p"][0])].exp()
    with pytest.raises(AssertionError):
        assert_frequencies_match(counts_S, wrong_probs_S)


# --------------------------------------------------------------------------------------------
# Straight-through, top-k and index helpers
# --------------------------------------------------------------------------------------------


def test_simple_straight_through_forwards_mask_and_backpropagates_marginals():
    g = torch.Generator().manual_seed(16)
    logits_TE = torch.randn(12, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weights_TE = torch.randn(12, 6, generator=g, dtype=torch.float64)
    mu_TE = exact_marginals(logits_TE, 1, 3)
    mask_TE, _ = sample_subsets(logits_TE, 1, 3, generator=g)
    gate_TE = simple_straight_through(mask_TE, mu_TE)
    assert torch.equal(gate_TE, mask_TE.double())  # bit-exact forward
    (grad_st,) = torch.autograd.grad((gate_TE * weights_TE).sum(), logits_TE, retain_graph=True)
    (grad_mu,) = torch.autograd.grad((mu_TE * weights_TE).sum(), logits_TE)
    assert grad_st.abs().sum() > 0
    torch.testing.assert_close(grad_st, grad_mu, rtol=0, atol=1e-12)


def test_topk_of_breaks_ties_towards_lower_index():
    scores_TE = torch.tensor([[0.1, 0.5, 0.5, 0.2, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0]])
    assert topk_of(scores_TE, 2).tolist() == [[1, 2], [0, 1]]
    assert topk_of(scores_TE, 4).tolist() == [[1, 2, 4, 3], [0, 1, 2, 3]]


def test_topk_of_matches_torch_topk_without_ties():
    scores_TE = torch.randn(32, 16, generator=torch.Generator().manual_seed(17))
    torch.testing.assert_close(topk_of(scores_TE, 4), torch.topk(scores_TE, 4).indices)


def test_mask_to_indices_sorts_and_pads():
    mask_TE = torch.tensor(
        [[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 1, 1, 0]], dtype=torch.bool
    )
    assert mask_to_indices(mask_TE, 3).tolist() == [
        [1, 3, 4],
        [-1, -1, -1],
        [0, -1, -1],
        [2, 3, -1],
    ]
    assert mask_to_indices(mask_TE, 7, pad=9).tolist()[0] == [1, 3, 4, 9, 9, 9, 9]


def test_mask_to_indices_round_trips_sampled_routes():
    logits_TE = torch.randn(100, 16, generator=torch.Generator().manual_seed(18))
    mask_TE, _ = sample_subsets(logits_TE, 0, 4, generator=torch.Generator().manual_seed(1))
    ids_TK = mask_to_indices(mask_TE, 4)
    rebuilt_TE = torch.zeros_like(mask_TE)
    valid_TK = ids_TK >= 0
    rebuilt_TE[torch.arange(100)[:, None].expand_as(ids_TK)[valid_TK], ids_TK[valid_TK]] = True
    assert torch.equal(rebuilt_TE, mask_TE)
    assert (ids_TK[:, 1:] > ids_TK[:, :-1])[valid_TK[:, 1:]].all()


# --------------------------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------------------------

LOGITS_TE = torch.zeros(2, 4)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: subset_log_partition(LOGITS_TE, 2, 5), "k_max=5"),
        (lambda: exact_marginals(LOGITS_TE, 3, 2), "k_min=3"),
        (lambda: sample_subsets(LOGITS_TE, -1, 2), "k_min=-1"),
        (lambda: sample_subsets(LOGITS_TE, 0, 0), "k_max=0"),
        (lambda: log_prob_size(LOGITS_TE, 5), "k=5"),
        (lambda: log_partition_by_size(LOGITS_TE, -1), "k_max=-1"),
        (lambda: log_partition_by_size(torch.zeros(4), 2), r"shape \(4,\)"),
        (lambda: exact_marginals(torch.zeros(1, 2, 4), 1, 1), r"shape \(1, 2, 4\)"),
        (lambda: exact_marginals(torch.zeros(2, 4, dtype=torch.long), 1, 1), "torch.int64"),
        (lambda: topk_of(LOGITS_TE, 5), "k=5"),
        (lambda: mask_to_indices(torch.ones(2, 4, dtype=torch.bool), 3), "k_max=3"),
        (lambda: simple_straight_through(torch.ones(2, 3), LOGITS_TE), r"\(2, 3\)"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_k_min_zero_allows_empty_subsets():
    # With strongly negative logits and k_min = 0 the empty subset dominates.
    logits_TE = torch.full((100, 5), -20.0)
    mask_TE, sizes_T = sample_subsets(logits_TE, 0, 2, generator=torch.Generator().manual_seed(0))
    assert (sizes_T == 0).all() and not mask_TE.any()
    assert math.isclose(float(subset_log_partition(logits_TE, 0, 2)[0]), 0.0, abs_tol=1e-6)


# --------------------------------------------------------------------------------------------
# Against the previous DP (E-loop in log space, kept in routing/probmoe/_reference.py)
# --------------------------------------------------------------------------------------------

REF_TOL = 1e-9  # float64: both implementations are exact up to rounding


def new_and_previous(logits_TE, k_min, k_max):
    """(log Z, μ, HVP) of both implementations; HVP = ∂(μ · c)/∂θ for a fixed random c."""
    coeff_TE = torch.randn(
        logits_TE.shape, generator=torch.Generator().manual_seed(99), dtype=logits_TE.dtype
    )
    out = []
    for log_z_fn, mu_fn in (
        (subset_log_partition, exact_marginals),
        (_reference.reference_subset_log_partition, _reference.reference_exact_marginals),
    ):
        theta_TE = logits_TE.clone().requires_grad_(True)
        mu_TE = mu_fn(theta_TE, k_min, k_max)
        (hvp_TE,) = torch.autograd.grad((mu_TE * coeff_TE).sum(), theta_TE)
        out.append((log_z_fn(logits_TE, k_min, k_max), mu_TE.detach(), hvp_TE))
    return out


@pytest.mark.parametrize("num_experts, k", [(8, 2), (64, 8), (256, 8), (16, 1), (12, 12)])
@pytest.mark.parametrize("dynamic", [False, True])
def test_matches_previous_dp_on_random_logits(num_experts, k, dynamic):
    g = torch.Generator().manual_seed(num_experts + k)
    logits_TE = torch.cat(
        [
            torch.randn(24, num_experts, generator=g, dtype=torch.float64) * 2.0,
            torch.randn(8, num_experts, generator=g, dtype=torch.float64) * 0.01,
            torch.zeros(2, num_experts, dtype=torch.float64),  # all ties
        ]
    )
    k_min = max(k - 3, 0) if dynamic else k
    assert not subset_dp.needs_ordered_path(logits_TE, k)  # the usual (unsorted) path
    (new_z, new_mu, new_hvp), (old_z, old_mu, old_hvp) = new_and_previous(logits_TE, k_min, k)
    torch.testing.assert_close(new_z, old_z, rtol=0, atol=REF_TOL)
    torch.testing.assert_close(new_mu, old_mu, rtol=0, atol=REF_TOL)
    torch.testing.assert_close(new_hvp, old_hvp, rtol=0, atol=REF_TOL)


@pytest.mark.parametrize("num_experts, k", [(8, 2), (32, 8), (64, 8)])
def test_matches_previous_dp_on_extreme_logits(num_experts, k):
    # Spreads of 100 and of 2e4: the ordered path. The previous DP's marginals are right there,
    # its second derivative is NaN (logaddexp backward at underflowing cells), so the new
    # Hessian-vector product is checked against finite differences of the marginals instead.
    g = torch.Generator().manual_seed(num_experts)
    logits_TE = torch.cat(
        [
            (torch.rand(6, num_experts, generator=g, dtype=torch.float64) * 2 - 1) * 50,
            torch.full((1, num_experts), 50.0, dtype=torch.float64),
            torch.randn(4, num_experts, generator=g, dtype=torch.float64) * 2,
        ]
    )
    logits_TE[-4:, ::3] = -1e4  # masked-like experts
    assert subset_dp.needs_ordered_path(logits_TE, k)
    for k_min in (k, 1):
        (new_z, new_mu, new_hvp), (old_z, old_mu, _) = new_and_previous(logits_TE, k_min, k)
        torch.testing.assert_close(new_z, old_z, rtol=1e-12, atol=REF_TOL)
        torch.testing.assert_close(new_mu, old_mu, rtol=0, atol=REF_TOL)
        assert torch.isfinite(new_hvp).all()
    theta_TE = logits_TE[:6].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: exact_marginals(x, k, k), (theta_TE,))


def test_minus_inf_logits_exclude_their_experts():
    g = torch.Generator().manual_seed(21)
    logits_TE = torch.randn(16, 10, generator=g, dtype=torch.float64)
    logits_TE[:, [2, 7]] = float("-inf")
    keep = [e for e in range(10) if e not in (2, 7)]
    for k_min, k_max in [(3, 3), (1, 4)]:
        mu_TE = exact_marginals(logits_TE, k_min, k_max)
        assert (mu_TE[:, [2, 7]] == 0).all()
        ref_mu_TE = _reference.reference_exact_marginals(logits_TE[:, keep], k_min, k_max)
        torch.testing.assert_close(mu_TE[:, keep], ref_mu_TE, rtol=0, atol=REF_TOL)
        torch.testing.assert_close(
            subset_log_partition(logits_TE, k_min, k_max),
            _reference.reference_subset_log_partition(logits_TE[:, keep], k_min, k_max),
            rtol=0,
            atol=REF_TOL,
        )
        theta_TE = logits_TE.clone().requires_grad_(True)
        (hvp_TE,) = torch.autograd.grad(
            exact_marginals(theta_TE, k_min, k_max)[:, 0].sum(), theta_TE
        )
        assert torch.isfinite(hvp_TE).all() and (hvp_TE[:, [2, 7]] == 0).all()
        mask_TE, _ = sample_subsets(logits_TE, k_min, k_max, generator=g)
        assert not mask_TE[:, [2, 7]].any()


def test_float32_logits_match_the_exact_result_within_1e_6():
    # float32 logits: the tables are float64, so the result is the exact one rounded to float32
    # (the previous DP ran in float32 and was off by up to a few 1e-6 at E = 256).
    g = torch.Generator().manual_seed(22)
    logits_TE = torch.randn(64, 256, generator=g) * 2
    exact_TE = _reference.reference_exact_marginals(logits_TE.double(), 8, 8)
    torch.testing.assert_close(
        exact_marginals(logits_TE, 8, 8).double(), exact_TE, rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        subset_log_partition(logits_TE, 8, 8).double(),
        _reference.reference_subset_log_partition(logits_TE.double(), 8, 8),
        rtol=1e-6,
        atol=0,
    )


def test_no_tokens():
    logits_TE = torch.zeros(0, 6, requires_grad=True)
    assert exact_marginals(logits_TE, 2, 2).shape == (0, 6)
    assert subset_log_partition(logits_TE, 1, 3).shape == (0,)
    assert log_partition_by_size(logits_TE, 3).shape == (0, 4)
    mask_TE, sizes_T = sample_subsets(logits_TE, 1, 3)
    assert mask_TE.shape == (0, 6) and sizes_T.shape == (0,)
    (grad_TE,) = torch.autograd.grad(exact_marginals(logits_TE, 2, 2).sum(), logits_TE)
    assert grad_TE.shape == (0, 6)


def test_k_one_is_softmax_and_k_all_is_certain():
    logits_TE = random_logits(6, seed=23).requires_grad_(True)
    torch.testing.assert_close(
        exact_marginals(logits_TE, 1, 1), torch.softmax(logits_TE, -1), rtol=0, atol=TOL
    )
    mu_TE = exact_marginals(logits_TE, 6, 6)
    torch.testing.assert_close(mu_TE, torch.ones_like(mu_TE), rtol=0, atol=TOL)
    (hvp_TE,) = torch.autograd.grad(mu_TE[:, 1].sum(), logits_TE)
    torch.testing.assert_close(hvp_TE, torch.zeros_like(hvp_TE), rtol=0, atol=TOL)
    mask_TE, _ = sample_subsets(logits_TE, 6, 6)
    assert mask_TE.all()


def test_blocks_of_rows_do_not_change_the_result(monkeypatch):
    g = torch.Generator().manual_seed(24)
    logits_TE = torch.randn(50, 20, generator=g, dtype=torch.float64) * 2
    coeff_TE = torch.randn(50, 20, generator=g, dtype=torch.float64)

    def run():
        theta_TE = logits_TE.clone().requires_grad_(True)
        mu_TE = exact_marginals(theta_TE, 1, 5)
        (hvp_TE,) = torch.autograd.grad((mu_TE * coeff_TE).sum(), theta_TE)
        return mu_TE.detach(), hvp_TE

    whole = run()
    monkeypatch.setattr(subset_dp, "_BLOCK_ROWS", 7)
    monkeypatch.setattr(subset_dp, "_BLOCK_CELLS", 0)
    assert len(subset_dp.row_blocks(50, 20, logits_TE.device)) == 8
    for a, b in zip(whole, run()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_straight_through_gate_equals_simple_of_exact_marginals():
    g = torch.Generator().manual_seed(25)
    logits_TE = torch.randn(12, 7, generator=g, dtype=torch.float64)
    weights_TE = torch.randn(12, 7, generator=g, dtype=torch.float64)
    for k_min, k_max in [(3, 3), (1, 4)]:
        theta_TE = logits_TE.clone().requires_grad_(True)
        distribution = SubsetDistribution(theta_TE, k_min, k_max)
        mask_TE, sizes_T, ids_TK = distribution.sample(g)
        assert torch.equal(ids_TK, mask_to_indices(mask_TE, k_max))
        assert torch.equal(mask_TE.sum(-1), sizes_T)
        gate_TE = distribution.straight_through(mask_TE)
        assert torch.equal(gate_TE, mask_TE.double())
        (got,) = torch.autograd.grad((gate_TE * weights_TE).sum(), theta_TE)
        reference_TE = simple_straight_through(mask_TE, exact_marginals(theta_TE, k_min, k_max))
        (want,) = torch.autograd.grad((reference_TE * weights_TE).sum(), theta_TE)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("k_min, k_max", [(2, 2), (1, 3)])
def test_ordered_path_samples_follow_the_distribution(k_min, k_max):
    # A spread of 360: sampled on the ordered path (largest logits first, then all experts).
    logits_E = torch.tensor([60.0, 59.5, 60.3, -300.0, 59.0, 0.0], dtype=torch.float64)
    assert subset_dp.needs_ordered_path(logits_E[None], k_max)
    _, _, counts_S, probs_S, _ = empirical_vs_exact(logits_E, k_min, k_max, n=20000, seed=26)
    keep_S = probs_S > 1e-12  # subsets of non-negligible probability
    assert int(counts_S[~keep_S].sum()) == 0
    assert_frequencies_match(counts_S[keep_S], probs_S[keep_S])


def test_sampling_is_distributed_like_the_previous_sampler():
    # Same distribution, different draws: the previous walk used one uniform per expert, the
    # new one one uniform per member. Both against the enumerated distribution, same data.
    logits_E = torch.tensor([0.8, -0.5, 0.1, 1.2, -1.0, 0.4], dtype=torch.float64)
    ref = brute_force(logits_E[None], 1, 3)
    in_range_S = torch.isfinite(ref["log_p"][0])
    ids_S = subset_ids(ref["mask"].bool())[in_range_S]
    probs_S = ref["log_p"][0][in_range_S].exp()
    for sampler in (sample_subsets, _reference.reference_sample_subsets):
        mask_TE, _ = sampler(logits_E.expand(20000, -1), 1, 3, torch.Generator().manual_seed(27))
        counts_S = (subset_ids(mask_TE)[:, None] == ids_S[None]).sum(0)
        assert int(counts_S.sum()) == 20000
        assert_frequencies_match(counts_S, probs_S)
