"""Exact math for ProbMoE routing: cardinality-constrained subset distributions over experts.

ProbMoE (arXiv 2606.01509) gives every expert ``e`` an independent Bernoulli logit ``θ_e`` and
routes a token to a subset ``S`` of experts drawn from

    p(S) ∝ Π_{e∈S} exp(θ_e)      restricted to  k_min ≤ |S| ≤ k_max

(exact-k routing is ``k_min == k_max == k``). Everything here is exact, with no relaxation:

* the normaliser is a sum of elementary symmetric polynomials ``e_j(exp θ)``, computed by an
  O(E·k_max) dynamic programme in linear space with one ``[T, E]`` step per size
  (:mod:`~pr2_megatron.routing.probmoe.subset_dp`: float64 tables, stable for logits of any
  spread);
* the marginals ``μ_e = P(e ∈ S) = ∂ log Z / ∂θ_e`` come from that programme's adjoint pass and
  stay differentiable with respect to the logits (a hand-written backward: the exact
  Hessian-vector product of ``log Z``);
* subsets are sampled exactly (size first, then a backward walk over the DP table, one
  inverse-CDF look-up per member);
* the SIMPLE estimator (Ahmed et al., 2023) forwards the hard sampled mask and backpropagates
  through ``μ`` (:meth:`SubsetDistribution.straight_through` does so without computing ``μ`` in
  the forward).

:class:`SubsetDistribution` holds one batch of logits and offers sampling, marginals and SIMPLE
gates; the functions below are its one-off uses. The previous implementation (a loop over experts
in log space) is kept in :mod:`~pr2_megatron.routing.probmoe._reference` for tests and benchmarks.

The subset range convention is ``0 ≤ k_min ≤ k_max ≤ E`` with ``k_max ≥ 1``. ``k_min = 0`` is
allowed: the empty subset is a well-defined outcome (weight ``e_0 = 1``), a sampled row may then be
all-False, and what an empty route means (drop the token, fall back to a shared expert) is the
router's decision, not this module's.

Pure torch; no Megatron import.

Shape-suffix legend:
    T  tokens (rows of the logits)
    E  experts
    K  subset sizes 0..k_max (k_max + 1 entries), or the width of an index list
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from pr2_megatron.routing.probmoe import subset_dp
from pr2_megatron.routing.probmoe.subset_dp import SubsetDP

__all__ = [
    "SubsetDistribution",
    "exact_marginals",
    "log_partition_by_size",
    "log_prob_size",
    "mask_to_indices",
    "sample_subsets",
    "simple_straight_through",
    "subset_log_partition",
    "subset_log_prob",
    "topk_of",
]


# --------------------------------------------------------------------------------------------
# Argument checks (user errors -> ValueError naming the bad value)
# --------------------------------------------------------------------------------------------


def _check_logits(logits_TE: torch.Tensor) -> None:
    if not isinstance(logits_TE, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits_TE).__name__}")
    if logits_TE.dim() != 2:
        raise ValueError(
            f"logits must be 2-D [tokens, experts], got shape {tuple(logits_TE.shape)}"
        )
    if not logits_TE.is_floating_point():
        raise ValueError(f"logits must be floating point, got dtype {logits_TE.dtype}")


def _check_size_range(k_min: int, k_max: int, num_experts: int) -> None:
    if k_min < 0:
        raise ValueError(f"k_min={k_min} must be >= 0")
    if k_max < 1:
        raise ValueError(f"k_max={k_max} must be >= 1")
    if k_min > k_max:
        raise ValueError(f"k_min={k_min} must be <= k_max={k_max}")
    if k_max > num_experts:
        raise ValueError(f"k_max={k_max} exceeds the number of experts E={num_experts}")


def _dp_input(logits_TE: torch.Tensor) -> torch.Tensor:
    # The DP accumulates E log-space sums per size; bf16/fp16 (8/11-bit mantissas) would bias the
    # partition and the marginals, so half precision is promoted (differentiably) to float32.
    if logits_TE.dtype in (torch.float16, torch.bfloat16):
        return logits_TE.float()
    return logits_TE


# --------------------------------------------------------------------------------------------
# The dynamic programme (pr2_megatron.routing.probmoe.subset_dp)
# --------------------------------------------------------------------------------------------


class _ExactMarginals(torch.autograd.Function):
    """``μ(θ)`` with a hand-written backward: the exact Hessian-vector product of ``log Z``."""

    @staticmethod
    def forward(ctx, theta_TE, k_min, k_max, ordered):
        ctx.save_for_backward(theta_TE)
        ctx.sizes = (k_min, k_max, ordered)
        return subset_dp.marginals(theta_TE, k_min, k_max, ordered)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_TE):
        (theta_TE,) = ctx.saved_tensors
        return subset_dp.hvp(theta_TE, grad_TE, *ctx.sizes), None, None, None


class _StraightThrough(torch.autograd.Function):
    """The SIMPLE gate: forward the hard mask, backward through the exact marginals.

    The marginals' values never enter the forward, so only the backward runs the DP.
    """

    @staticmethod
    def forward(ctx, theta_TE, mask_TE, k_min, k_max, ordered):
        ctx.save_for_backward(theta_TE)
        ctx.sizes = (k_min, k_max, ordered)
        return mask_TE.to(theta_TE.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_TE):
        (theta_TE,) = ctx.saved_tensors
        return subset_dp.hvp(theta_TE, grad_TE, *ctx.sizes), None, None, None, None


def log_partition_by_size(logits_TE: torch.Tensor, k_max: int) -> torch.Tensor:
    """Log elementary symmetric polynomials of ``exp θ`` for sizes 0..k_max.

    ``out[t, j] = log e_j(exp θ_t) = log Σ_{|S| = j} Π_{e∈S} exp(θ_{t,e})``, i.e. the log of the
    unnormalised mass of all size-``j`` subsets. ``out[:, 0] = 0``; sizes ``j > E`` are impossible
    and are ``-inf`` (``k_max > E`` is accepted here, unlike in the subset-level functions).

    Computed by a dynamic programme in linear space with one ``[T, E]`` step per size
    (:mod:`~pr2_megatron.routing.probmoe.subset_dp`): O(E·k_max) per token, stable for logits of
    any magnitude (±50 and beyond; ``-inf`` logits exclude their expert). Differentiable (twice)
    with respect to the logits. Half-precision logits are computed in float32.

    Args:
        logits_TE: Bernoulli logits θ, shape [T, E].
        k_max: largest size to report (>= 0).

    Returns:
        Tensor [T, k_max + 1].

    """
    _check_logits(logits_TE)
    if k_max < 0:
        raise ValueError(f"k_max={k_max} must be >= 0")
    return _log_esp(_dp_input(logits_TE), k_max)


def _log_esp(theta_TE: torch.Tensor, k_max: int) -> torch.Tensor:
    """``log e_j`` for sizes 0..k_max [T, K]; sizes above E are -inf."""
    num_tokens, num_experts = theta_TE.shape
    computed = min(k_max, num_experts)
    if computed == 0:
        log_esp_TK = theta_TE.new_zeros((num_tokens, 1))  # e_0 = 1, a constant
    else:
        log_esp_TK = SubsetDP(theta_TE, 0, computed).log_esp_TK.to(theta_TE.dtype)
    if k_max > computed:
        log_esp_TK = F.pad(log_esp_TK, (0, k_max - computed), value=float("-inf"))
    return log_esp_TK


def log_prob_size(logits_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Log-probability that independent Bernoulli(sigmoid θ_e) experts select exactly ``k``.

    ``log P(|S| = k) = log e_k(exp θ) − Σ_e log(1 + exp θ_e)``, since the unconstrained product
    of Bernoullis has normaliser ``Π_e (1 + exp θ_e) = Σ_j e_j(exp θ)``.

    Args:
        logits_TE: Bernoulli logits θ, shape [T, E].
        k: subset size, ``0 <= k <= E``.

    Returns:
        Tensor [T].

    """
    _check_logits(logits_TE)
    num_experts = logits_TE.shape[1]
    if not 0 <= k <= num_experts:
        raise ValueError(f"k={k} must be in [0, E={num_experts}]")
    theta_TE = _dp_input(logits_TE)
    log_esp_T = _log_esp(theta_TE, k)[:, k]
    # log(1 + exp θ) as logaddexp(θ, 0): F.softplus goes linear above θ = 20 and drops exp(−θ).
    log_one_plus_TE = torch.logaddexp(theta_TE, torch.zeros_like(theta_TE))
    return log_esp_T - log_one_plus_TE.sum(dim=-1)


def subset_log_partition(logits_TE: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
    """Log normaliser of the cardinality-constrained subset distribution.

    ``log Z = log Σ_{j=k_min..k_max} e_j(exp θ)`` (exact-k: ``log e_k``). Its gradient is the
    vector of inclusion marginals (see :func:`exact_marginals`); differentiable twice.

    Args:
        logits_TE: Bernoulli logits θ, shape [T, E].
        k_min: smallest allowed subset size, ``0 <= k_min <= k_max``.
        k_max: largest allowed subset size, ``1 <= k_max <= E``.

    Returns:
        Tensor [T].

    """
    _check_logits(logits_TE)
    _check_size_range(k_min, k_max, logits_TE.shape[1])
    theta_TE = _dp_input(logits_TE)
    return SubsetDP(theta_TE, k_min, k_max).log_z_T.to(theta_TE.dtype)


def subset_log_prob(
    logits_TE: torch.Tensor, mask_TE: torch.Tensor, k_min: int, k_max: int
) -> torch.Tensor:
    """Log-probability of given subsets under the constrained distribution.

    ``log p(S) = Σ_{e∈S} θ_e − log Z`` for ``k_min <= |S| <= k_max``, and ``-inf`` outside it.

    Args:
        logits_TE: Bernoulli logits θ, shape [T, E].
        mask_TE: subsets as a boolean mask, shape [T, E].
        k_min: smallest allowed subset size, as in :func:`subset_log_partition`.
        k_max: largest allowed subset size, as in :func:`subset_log_partition`.

    Returns:
        Tensor [T], differentiable with respect to the logits.

    """
    _check_logits(logits_TE)
    if mask_TE.shape != logits_TE.shape:
        raise ValueError(
            f"mask shape {tuple(mask_TE.shape)} must equal logits shape {tuple(logits_TE.shape)}"
        )
    theta_TE = _dp_input(logits_TE)
    log_z_T = subset_log_partition(theta_TE, k_min, k_max)
    mask_TE = mask_TE.bool()
    score_T = torch.where(mask_TE, theta_TE, torch.zeros_like(theta_TE)).sum(dim=-1)
    size_T = mask_TE.sum(dim=-1)
    in_range_T = (size_T >= k_min) & (size_T <= k_max)
    return torch.where(in_range_T, score_T - log_z_T, torch.full_like(log_z_T, float("-inf")))


class SubsetDistribution:
    """The subset distribution of a batch of logits: sampling, marginals and SIMPLE gates.

    ``p(S) ∝ Π_{e∈S} exp θ_e`` restricted to ``k_min <= |S| <= k_max``, per row.
    :func:`sample_subsets` and :func:`exact_marginals` are this class used once. It decides the
    DP's path for all rows once (:func:`~.subset_dp.needs_ordered_path`, one host
    synchronisation), and offers :meth:`straight_through`, the SIMPLE gate whose forward needs
    no DP at all (the ProbMoE router samples, then backpropagates through the marginals).

    Args:
        logits_TE: Bernoulli logits θ, shape [T, E] (half precision is computed in float32).
        k_min: smallest allowed subset size, as in :func:`subset_log_partition`.
        k_max: largest allowed subset size, as in :func:`subset_log_partition`.

    """

    def __init__(self, logits_TE: torch.Tensor, k_min: int, k_max: int) -> None:
        _check_logits(logits_TE)
        _check_size_range(k_min, k_max, logits_TE.shape[1])
        self.k_min, self.k_max = k_min, k_max
        self.theta_TE = _dp_input(logits_TE)
        self.ordered = subset_dp.needs_ordered_path(self.theta_TE.detach(), k_max)

    def _differentiable(self) -> bool:
        return torch.is_grad_enabled() and self.theta_TE.requires_grad

    def marginals(self) -> torch.Tensor:
        """Exact inclusion marginals ``μ`` [T, E], as :func:`exact_marginals`."""
        if self._differentiable():
            return _ExactMarginals.apply(self.theta_TE, self.k_min, self.k_max, self.ordered)
        return subset_dp.marginals(self.theta_TE.detach(), self.k_min, self.k_max, self.ordered)

    def straight_through(self, mask_TE: torch.Tensor) -> torch.Tensor:
        """``simple_straight_through(mask, exact_marginals(θ))`` without computing ``μ``.

        Forward value: the mask as 0/1 in the logits' (DP) dtype; gradient: ``∂μ/∂θ``.
        """
        if self._differentiable():
            sizes = (self.k_min, self.k_max, self.ordered)
            return _StraightThrough.apply(self.theta_TE, mask_TE, *sizes)
        return mask_TE.to(self.theta_TE.dtype)

    @torch.no_grad()
    def sample(
        self, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One exact draw per row, as :func:`sample_subsets`: ``(mask_TE, sizes_T, ids_TK)``.

        ``ids_TK`` [T, k_max] lists each row's experts ascending, right-padded with -1 (what
        :func:`mask_to_indices` returns for the mask).
        """
        theta_TE = self.theta_TE.detach()
        return subset_dp.sample(theta_TE, self.k_min, self.k_max, self.ordered, generator)


def exact_marginals(logits_TE: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
    """Exact inclusion marginals ``μ_e = P(e ∈ S)`` of the constrained subset distribution.

    ``μ_e = Σ_{S∋e} p(S) = ∂ log Z / ∂θ_e`` with ``log Z`` from :func:`subset_log_partition`,
    computed by the adjoint (backward) pass of the DP. When autograd is on and the logits require
    grad, ``μ`` is differentiable with respect to the logits (``∂μ_e/∂θ_f = Cov(1[e∈S],
    1[f∈S])``), through a hand-written backward: the exact Hessian-vector product of ``log Z``,
    itself not differentiable again (for higher derivatives, differentiate
    :func:`subset_log_partition` with ``create_graph=True``). Gradients flow on to whatever
    produced the logits. Under ``torch.no_grad()`` the result carries no graph.

    ``Σ_e μ_e = E[|S|]``, which is ``k`` for exact-k routing. With ``k_min = 0, k_max = E`` the
    constraint vanishes and ``μ = sigmoid(θ)``.

    Args:
        logits_TE: Bernoulli logits θ, shape [T, E].
        k_min: smallest allowed subset size, as in :func:`subset_log_partition`.
        k_max: largest allowed subset size, as in :func:`subset_log_partition`.

    Returns:
        Tensor [T, E] (float32 for half-precision logits, else the logits' dtype).

    """
    return SubsetDistribution(logits_TE, k_min, k_max).marginals()


def sample_subsets(
    logits_TE: torch.Tensor,
    k_min: int,
    k_max: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one subset per token exactly from ``p(S) ∝ Π_{e∈S} exp θ_e``, ``k_min<=|S|<=k_max``.

    Two stages, both exact:

    1. the size: ``P(|S| = j) = e_j(exp θ) / Z`` for ``j`` in ``[k_min, k_max]`` (exact-k: ``k``,
       no draw);
    2. given the size, walk the DP table backwards, one member per step: with ``r`` members
       still to pick among the first ``p`` positions, the last of them is position ``q`` with
       probability ``exp(θ_q) · e_{r-1}(θ_{0..q-1}) / e_r(θ_{0..p-1})``, drawn by inverse CDF
       from one uniform (``k_max`` uniforms per token, drawn up front).

    Vectorised over tokens; the only Python loop runs over sizes. Not differentiable (use
    :func:`exact_marginals` with :func:`simple_straight_through` for the gradient). For a given
    generator the draws differ from those of the previous per-expert walk (one uniform per
    expert, ``_reference.reference_sample_subsets``); the distribution is the same.

    Args:
        logits_TE: Bernoulli logits θ, shape [T, E].
        k_min: smallest allowed subset size, as in :func:`subset_log_partition`.
        k_max: largest allowed subset size, as in :func:`subset_log_partition`.
        generator: optional ``torch.Generator`` on the logits' device, for reproducible draws.

    Returns:
        ``(mask_TE, sizes_T)``: a bool mask with exactly ``sizes_T[t]`` True entries in row ``t``,
        and the sampled sizes (int64).

    """
    mask_TE, sizes_T, _ = SubsetDistribution(logits_TE, k_min, k_max).sample(generator)
    return mask_TE, sizes_T


def simple_straight_through(mask_TE: torch.Tensor, marginals_TE: torch.Tensor) -> torch.Tensor:
    """Build the SIMPLE gate: forward the hard mask, backpropagate through the marginals.

    Mathematically ``mask − μ.detach() + μ``; computed as ``mask + (μ − μ.detach())`` so the
    forward value is bit-for-bit the hard 0/1 mask, and ``∂out/∂θ = ∂μ/∂θ``.

    Args:
        mask_TE: sampled subsets, bool (or 0/1) of shape [T, E].
        marginals_TE: exact marginals μ from :func:`exact_marginals`, shape [T, E].

    Returns:
        Tensor [T, E] in the marginals' dtype.

    """
    if mask_TE.shape != marginals_TE.shape:
        raise ValueError(
            f"mask shape {tuple(mask_TE.shape)} must equal marginals shape "
            f"{tuple(marginals_TE.shape)}"
        )
    return mask_TE.to(marginals_TE.dtype) + (marginals_TE - marginals_TE.detach())


def topk_of(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Deterministic top-k expert indices per row, e.g. of the marginals for evaluation.

    Sorted by descending score; ties go to the lower expert index (stable sort), so the result
    does not depend on the backend's ``topk`` tie-breaking.

    Args:
        scores_TE: scores, shape [T, E].
        k: number of experts, ``1 <= k <= E``.

    Returns:
        LongTensor [T, k].

    """
    _check_logits(scores_TE)
    num_experts = scores_TE.shape[1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"k={k} must be in [1, E={num_experts}]")
    order_TE = torch.sort(scores_TE, dim=-1, descending=True, stable=True).indices
    return order_TE[:, :k]


def mask_to_indices(mask_TE: torch.Tensor, k_max: int, pad: int = -1) -> torch.Tensor:
    """Expert ids of each row's subset, ascending, right-padded with ``pad`` to width ``k_max``.

    For variable-size routes: row ``t`` holds ``sorted({e : mask[t, e]})`` followed by
    ``k_max − |S_t|`` copies of ``pad``. Raises if a row has more than ``k_max`` experts
    (that would silently drop experts). ``k_max`` may exceed E (extra columns are all ``pad``).

    Args:
        mask_TE: bool (or 0/1) mask, shape [T, E].
        k_max: output width (>= 0).
        pad: fill value for unused slots.

    Returns:
        LongTensor [T, k_max].

    """
    if mask_TE.dim() != 2:
        raise ValueError(f"mask must be 2-D [tokens, experts], got shape {tuple(mask_TE.shape)}")
    if k_max < 0:
        raise ValueError(f"k_max={k_max} must be >= 0")
    mask_TE = mask_TE.bool()
    num_tokens, num_experts = mask_TE.shape
    if num_tokens > 0:
        largest = int(mask_TE.sum(dim=-1).max())
        if largest > k_max:
            raise ValueError(f"a row selects {largest} experts, more than k_max={k_max}")
    expert_ids_TE = torch.arange(num_experts, device=mask_TE.device).expand(num_tokens, -1)
    # Selected experts sort first (by id), unselected ones after them (key offset by E).
    key_TE = torch.where(mask_TE, expert_ids_TE, expert_ids_TE + num_experts)
    width = min(k_max, num_experts)
    sorted_key_TK = torch.sort(key_TE, dim=-1).values[:, :width]
    ids_TK = torch.where(
        sorted_key_TK < num_experts, sorted_key_TK, torch.full_like(sorted_key_TK, pad)
    )
    if k_max > width:
        ids_TK = F.pad(ids_TK, (0, k_max - width), value=pad)
    return ids_TK
