"""The previous ProbMoE subset DP (a Python loop over experts in log space), kept as a reference.

:mod:`pr2_megatron.routing.probmoe.subsets` now runs the DP in linear space over subset sizes
(:mod:`pr2_megatron.routing.probmoe.subset_dp`). This module keeps the implementation it replaced,
unchanged, so that tests compare the two on random and extreme inputs and
``benchmarks/probmoe_vs_topk.py`` measures both in one run. Not used by the router.

Shape-suffix legend:
    T  tokens (rows of the logits)
    E  experts
    K  subset sizes 0..k_max (k_max + 1 entries)
    P  expert prefixes 0..E (E + 1 entries): prefix p holds experts 0..p-1
"""

from __future__ import annotations

import torch

__all__ = [
    "ReferenceSubsetDistribution",
    "reference_exact_marginals",
    "reference_log_esp_prefixes",
    "reference_sample_subsets",
    "reference_subset_log_partition",
]


def reference_log_esp_prefixes(theta_TE: torch.Tensor, k_max: int) -> list[torch.Tensor]:
    """Return ``[row_p for p in 0..E]``, ``row_p[t, j] = log e_j(exp θ_t[0:p])`` of shape [T, K].

    Recurrence over experts: ``e_j(x_0..x_p) = e_j(x_0..x_{p-1}) + x_p · e_{j-1}(x_0..x_{p-1})``,
    each step a ``logaddexp`` of the finite cells (the -inf tail is a constant carried along).
    """
    num_tokens, num_experts = theta_TE.shape
    row_TK = theta_TE.new_full((num_tokens, k_max + 1), float("-inf"))
    row_TK[:, 0] = 0.0
    rows = [row_TK]
    for e in range(num_experts):
        theta_T1 = theta_TE[:, e : e + 1]
        finite = min(e, k_max)
        parts = [row_TK[:, :1]]
        if finite >= 1:
            parts.append(torch.logaddexp(row_TK[:, 1 : finite + 1], row_TK[:, :finite] + theta_T1))
        if e + 1 <= k_max:
            parts.append(row_TK[:, e : e + 1] + theta_T1)
            parts.append(row_TK[:, e + 2 :])
        row_TK = torch.cat(parts, dim=1)
        rows.append(row_TK)
    return rows


def _as_dp_input(logits_TE: torch.Tensor) -> torch.Tensor:
    if logits_TE.dtype in (torch.float16, torch.bfloat16):
        return logits_TE.float()
    return logits_TE


def reference_subset_log_partition(logits_TE: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
    """``log Σ_{j=k_min..k_max} e_j(exp θ)`` [T] by the E-loop DP (differentiable by autograd)."""
    log_esp_TK = reference_log_esp_prefixes(_as_dp_input(logits_TE), k_max)[-1]
    return torch.logsumexp(log_esp_TK[:, k_min:], dim=-1)


def reference_exact_marginals(logits_TE: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
    """Marginals ``∂ log Z / ∂θ`` [T, E]: autograd on the E-loop DP (``create_graph`` if needed)."""
    differentiable = logits_TE.requires_grad
    with torch.enable_grad():
        if differentiable:
            theta_TE = _as_dp_input(logits_TE)
        else:
            theta_TE = _as_dp_input(logits_TE.detach()).requires_grad_(True)
        log_z_T = reference_subset_log_partition(theta_TE, k_min, k_max)
        (marginals_TE,) = torch.autograd.grad(log_z_T.sum(), theta_TE, create_graph=differentiable)
    return marginals_TE


@torch.no_grad()
def reference_sample_subsets(
    logits_TE: torch.Tensor,
    k_min: int,
    k_max: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact subsets ``(mask_TE, sizes_T)``: the size, then a backward walk over all E experts.

    One uniform per (token, expert); expert ``e`` is included with probability
    ``exp(θ_e + log e_{r-1}(θ_{0..e-1}) − log e_r(θ_{0..e}))`` with ``r`` experts still to pick.
    """
    num_tokens, num_experts = logits_TE.shape
    theta_TE = _as_dp_input(logits_TE.detach())
    log_esp_TPK = torch.stack(reference_log_esp_prefixes(theta_TE, k_max), dim=1)
    size_probs_TK = torch.softmax(log_esp_TPK[:, num_experts, k_min:], dim=-1)
    sizes_T = torch.multinomial(size_probs_TK, 1, generator=generator).squeeze(1) + k_min
    uniform_TE = torch.rand(
        (num_tokens, num_experts), generator=generator, dtype=theta_TE.dtype, device=theta_TE.device
    )
    mask_TE = torch.zeros((num_tokens, num_experts), dtype=torch.bool, device=theta_TE.device)
    remaining_T = sizes_T.clone()
    for e in reversed(range(num_experts)):
        prev_idx_T1 = (remaining_T - 1).clamp(min=0).unsqueeze(1)
        log_without_T = log_esp_TPK[:, e].gather(1, prev_idx_T1).squeeze(1)
        log_with_T = log_esp_TPK[:, e + 1].gather(1, remaining_T.unsqueeze(1)).squeeze(1)
        include_prob_T = torch.exp(theta_TE[:, e] + log_without_T - log_with_T)
        forced_T = remaining_T > e
        include_T = (remaining_T > 0) & (forced_T | (uniform_TE[:, e] < include_prob_T))
        mask_TE[:, e] = include_T
        remaining_T = remaining_T - include_T.long()
    return mask_TE, sizes_T


class ReferenceSubsetDistribution:
    """:class:`~pr2_megatron.routing.probmoe.subsets.SubsetDistribution` on the previous DP.

    Same interface, each call running the previous functions on their own, as the router did
    before (sample, then the route ids by sorting the mask, then the marginals).
    """

    def __init__(self, logits_TE: torch.Tensor, k_min: int, k_max: int) -> None:
        self.k_min, self.k_max = k_min, k_max
        self.theta_TE = _as_dp_input(logits_TE)

    def marginals(self) -> torch.Tensor:
        """Marginals [T, E], differentiable when autograd is on and the logits require grad."""
        differentiable = torch.is_grad_enabled() and self.theta_TE.requires_grad
        theta_TE = self.theta_TE if differentiable else self.theta_TE.detach()
        return reference_exact_marginals(theta_TE, self.k_min, self.k_max)

    def straight_through(self, mask_TE: torch.Tensor) -> torch.Tensor:
        """The SIMPLE gate ``mask + (μ − stopgrad μ)``, ``μ`` by :meth:`marginals`."""
        marginals_TE = self.marginals()
        return mask_TE.to(marginals_TE.dtype) + (marginals_TE - marginals_TE.detach())

    def sample(self, generator: torch.Generator | None = None):
        """``(mask_TE, sizes_T, ids_TK)`` by :func:`reference_sample_subsets`."""
        from pr2_megatron.routing.probmoe.subsets import mask_to_indices

        theta_TE = self.theta_TE
        mask_TE, sizes_T = reference_sample_subsets(theta_TE, self.k_min, self.k_max, generator)
        return mask_TE, sizes_T, mask_to_indices(mask_TE, self.k_max)
