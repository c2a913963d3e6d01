"""ProbMoE routing as a Megatron router: experts drawn as a cardinality-constrained subset.

ProbMoE (arXiv 2606.01509) treats the router logits as independent per-expert Bernoulli logits
``θ = z / τ`` (``z`` the router's logits, ``τ`` :attr:`ProbMoEConfig.temperature`) and routes a
token to a subset ``S`` of experts drawn from

    p(S) ∝ Π_{e∈S} exp(θ_e)      restricted to  k_lo ≤ |S| ≤ k_hi,

``k_lo = k_hi = k`` for ``exact-k`` (k = the model's ``moe_router_topk``) and ``[k_min, k_max]`` for
``dynamic-k``. Everything is exact (:mod:`pr2_megatron.routing.probmoe.subsets`): the normaliser is
an O(E·k) dynamic programme (linear space, float64, one tensor step per subset size), subsets are
sampled exactly by a backward walk through the DP table, and the inclusion marginals
``μ_e = P(e ∈ S)`` are the gradient of ``log Z`` (with SIMPLE gates only the backward computes
them).

Which experts (the live choice; replay, prediction and recompute dispatch a given subset):

* sampling (training, see :attr:`ProbMoEConfig.sample`): ``S ~ p(S)``;
* deterministic (evaluation): the MAP subset (exact-k: the top-k logits; dynamic-k: the top
  ``k_min`` logits plus every further positive logit, up to ``k_max``), or with
  ``eval_selection="marginals"`` the experts of largest marginal (exact-k: top-k of ``μ``;
  dynamic-k: the experts with ``μ_e ≥ 1/2``, their count clamped to ``[k_min, k_max]``).

Gate weights (``probs``; zero outside ``S``), :attr:`ProbMoEConfig.gate`:

* ``simple`` (default, the SIMPLE estimator): forward value ``1[e∈S]``, backward through the
  exact marginals: ``g_e = 1[e∈S] + μ_e − stopgrad(μ_e)``, so ``∂g_e/∂θ = ∂μ_e/∂θ``
  (``= Cov(1[e∈S], 1[f∈S])`` for ``θ_f``). With ``normalize_gates`` the gates of a token are
  divided by ``|S|`` (a constant: forward gates ``1/|S|``, summing to 1).
* ``marginal``: ``g_e = μ_e`` for ``e ∈ S``, differentiable, no straight-through; with
  ``normalize_gates`` divided by ``Σ_{f∈S} μ_f`` (the gates of a token sum to 1).

Megatron's ``moe_router_topk_scaling_factor`` multiplies the gates when set. The layer's score
function (softmax/sigmoid), pre-softmax flag, expert bias and group-limited routing are top-k
notions that ProbMoE does not use: expert bias, groups and aux losses are rejected at build
time, z-loss is applied to the logits as in Megatron.

Routes are the chosen ids ``[T, K]`` with ``K = moe_router_topk`` (dynamic-k: ``K = k_max``),
ascending. In dynamic-k a row of ``|S| < K`` experts is right-padded, empty slot ``j`` holding
the id ``E + j`` (:func:`padded_route_ids`): every row stays a set of K distinct ids in
``[0, E + K)`` (:attr:`ProbMoERouter.route_id_bound`), so the whole route path -- controller
validation, the all-gathered route table (built with ``num_experts = route_id_bound``), its
safetensors file, micro-batch targets and the set metrics -- takes variable-size rows unchanged,
and two rows are the same route exactly when they hold the same experts. The token dispatchers
consume the ``[T, E]`` routing map, so a variable number of experts per token needs nothing from
them (``alltoall`` and ``allgather`` size their splits from the map); only the fused permutation
(``moe_permute_fusion``), which sizes its output as ``T · topk``, is rejected for dynamic-k.

:class:`ProbMoERouter` subclasses :class:`pr2_megatron.routing.router.PR2Router` and overrides only
how the live subset is chosen and how gates are computed (the ``_route`` hook) and the deterministic
choice (``_topk_indices``); phases, record/replay, activation-recompute replay, the PR2 predictor
(the predicted route is the deterministic choice of ``θ + Δ/τ``) and
:class:`pr2_megatron.routing.controller.RoutingController` work unchanged.

Legend of shape suffixes: S sequence, B batch, T tokens, E experts, K route width.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from pr2_megatron.errors import RouteError
from pr2_megatron.routing.probmoe.subsets import (
    SubsetDistribution,
    exact_marginals,
    mask_to_indices,
)
from pr2_megatron.routing.router import PR2Router, PR2RouterConfig

ProbMoEMode = Literal["exact-k", "dynamic-k"]
PROBMOE_MODES = ("exact-k", "dynamic-k")
GATES = ("simple", "marginal")
SAMPLING = ("train", "always", "never")
EVAL_SELECTIONS = ("map", "marginals")


@dataclass
class ProbMoEConfig:
    """Settings of the ProbMoE router (probabilistic k-subset routing, arXiv 2606.01509)."""

    #: ``exact-k``: every token gets exactly k = ``model.topk`` experts; ``dynamic-k``: between
    #: ``k_min`` and ``k_max`` experts, the size drawn with the subset.
    mode: ProbMoEMode = "exact-k"
    #: Dynamic-k: fewest experts per token (0 allows tokens that skip the routed experts).
    k_min: int = 1
    #: Dynamic-k: most experts per token; None means ``model.topk``, which it must equal
    #: (``model.topk`` is the route width; a row with fewer experts fills empty slot j with the
    #: id E + j, so route tables need ``num_experts = E + k_max``).
    k_max: Optional[int] = None
    #: τ: the Bernoulli logits are router logits / τ (lower: sharper subsets).
    temperature: float = 1.0
    #: Gate weights: ``simple`` = hard 0/1 mask forward, gradient of the exact marginals
    #: backward (SIMPLE straight-through); ``marginal`` = the exact marginals μ at the chosen
    #: experts (differentiable, no straight-through).
    gate: Literal["simple", "marginal"] = "simple"
    #: Normalise each token's gates to sum to 1: ``simple`` divides by the subset size |S|
    #: (a constant), ``marginal`` by the sum of the chosen experts' marginals.
    normalize_gates: bool = True
    #: When the live choice is sampled: ``train`` (module in training mode and autograd on),
    #: ``always`` (also under no_grad, e.g. stochastic RL rollouts that are then replayed) or
    #: ``never``; otherwise the deterministic ``eval_selection`` is used.
    sample: Literal["train", "always", "never"] = "train"
    #: Deterministic choice (evaluation, the PR2 prediction and the "live" route of metrics):
    #: ``map`` = most probable subset (exact-k: top-k logits; dynamic-k: top ``k_min`` logits
    #: plus further positive ones up to ``k_max``); ``marginals`` = largest marginals (exact-k:
    #: top-k of μ; dynamic-k: experts with μ >= 1/2, count clamped to [k_min, k_max]).
    eval_selection: Literal["map", "marginals"] = "map"
    #: Seed of each router's own sampling generator (offset by layer number and data-parallel
    #: rank); None samples from torch's default generator, which Megatron seeds identically on
    #: the tensor-parallel ranks that route the same tokens.
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.mode not in PROBMOE_MODES:
            raise ValueError(f"probmoe.mode must be one of {PROBMOE_MODES}, got {self.mode!r}")
        if self.gate not in GATES:
            raise ValueError(f"probmoe.gate must be one of {GATES}, got {self.gate!r}")
        if self.sample not in SAMPLING:
            raise ValueError(f"probmoe.sample must be one of {SAMPLING}, got {self.sample!r}")
        if self.eval_selection not in EVAL_SELECTIONS:
            raise ValueError(
                f"probmoe.eval_selection must be one of {EVAL_SELECTIONS}, "
                f"got {self.eval_selection!r}"
            )
        if not self.temperature > 0:
            raise ValueError(f"probmoe.temperature must be > 0, got {self.temperature}")
        if self.k_min < 0:
            raise ValueError(f"probmoe.k_min must be >= 0, got {self.k_min}")
        if self.k_max is not None and self.k_max < max(self.k_min, 1):
            raise ValueError(f"probmoe.k_max={self.k_max} must be >= max(k_min={self.k_min}, 1)")

    def size_range(self, topk: int) -> tuple[int, int]:
        """``(k_lo, k_hi)``: the allowed subset sizes for a model with ``topk`` route width."""
        if self.mode == "exact-k":
            return topk, topk
        k_max = topk if self.k_max is None else self.k_max
        if k_max != topk:
            raise ValueError(
                f"probmoe.k_max={k_max} differs from the model's topk={topk}: set model.topk = "
                "k_max (the route width that route tables and Megatron's buffers use)"
            )
        if self.k_min > k_max:
            raise ValueError(f"probmoe.k_min={self.k_min} exceeds k_max={k_max}")
        return self.k_min, k_max


def padded_route_ids(mask_TE: torch.Tensor, width: int) -> torch.Tensor:
    """Route ids ``[T, width]`` of subsets ``[T, E]``: experts ascending, empty slot j = E + j.

    Rows of one size share their padding ids and rows of different sizes differ in them, so two
    rows are equal as sets exactly when their subsets are; every row holds ``width`` distinct
    ids.
    """
    return fill_empty_slots(mask_to_indices(mask_TE, width, pad=-1), mask_TE.shape[1])


def fill_empty_slots(ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Route ids of expert ids ``[T, K]`` (ascending, -1 padded): empty slot j gets id E + j."""
    slot_TK = torch.arange(num_experts, num_experts + ids_TK.shape[1], device=ids_TK.device)
    return torch.where(ids_TK < 0, slot_TK.expand_as(ids_TK), ids_TK)


def routes_to_mask(routes_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Boolean ``[T, E]`` routing mask of routes ``[T, K]``; ids ``>= E`` (padding) are skipped.

    Ids must be ``>= 0``; duplicates collapse (callers compare the mask's row sums with the
    number of expert ids to detect them).
    """
    routes_TK = routes_TK.long().clamp(max=num_experts)
    wide_TE = torch.zeros(
        (routes_TK.shape[0], num_experts + 1), dtype=torch.bool, device=routes_TK.device
    )
    wide_TE.scatter_(1, routes_TK, True)
    return wide_TE[:, :num_experts]


class ProbMoERouter(PR2Router):
    """PR2 router whose experts are a ProbMoE subset: sampled, replayed or deterministic."""

    def __init__(
        self,
        config,
        pg_collection=None,
        probmoe_config: Optional[ProbMoEConfig] = None,
        pr2_config: Optional[PR2RouterConfig] = None,
        is_mtp_layer: bool = False,
    ) -> None:
        probmoe_config = probmoe_config or ProbMoEConfig()
        _check_config_supports_probmoe(config, probmoe_config)
        if probmoe_config.mode == "dynamic-k":
            from pr2_megatron.routing.compat import megatron_features

            features = megatron_features()
            if features.dispatcher_needs_topk_per_token:
                raise ValueError(
                    f"ProbMoE dynamic-k: megatron-core {features.version}'s dropless token "
                    "dispatchers assume exactly moe_router_topk experts per token (the "
                    "permuted buffer is tokens x topk); use mode='exact-k' or megatron-core "
                    "0.16.1"
                )
        super().__init__(
            config, pg_collection=pg_collection, pr2_config=pr2_config, is_mtp_layer=is_mtp_layer
        )
        self.probmoe_config = probmoe_config
        self.k_lo, self.k_hi = probmoe_config.size_range(self.topk)
        if self.is_aux_loss_enabled():
            raise ValueError(
                "ProbMoE router: Megatron's load-balancing aux losses (moe_aux_loss_coeff > 0) "
                "are defined on its top-k map and are not applied by this router; set "
                "moe_aux_loss_coeff=0"
            )
        self._generator: Optional[torch.Generator] = None

    @property
    def route_id_bound(self) -> int:
        """Route ids lie in ``[0, route_id_bound)``: E, or ``E + K`` in dynamic-k (padding)."""
        padded = self.probmoe_config.mode == "dynamic-k"
        return self.num_experts + self.topk if padded else self.num_experts

    @property
    def is_sampling(self) -> bool:
        """Whether a live forward now samples its subset (else the deterministic choice)."""
        policy = self.probmoe_config.sample
        if policy == "always":
            return True
        if policy == "never":
            return False
        return self.training and torch.is_grad_enabled()

    # --------------------------------------------------------------------- routing (the hook)
    def _route(self, logits_SBE, target_TK, padding_mask=None):
        """ProbMoE experts and gates: ``(probs_TE, routing_map_TE, chosen_TK)``."""
        logits_TE = logits_SBE.reshape(-1, self.num_experts)
        if padding_mask is None:
            logits_TE = self.apply_z_loss(logits_TE)
        else:
            logits_TE = self.apply_z_loss(logits_TE, padding_mask=padding_mask.reshape(-1))
        theta_TE = self._theta(logits_TE)

        distribution = None  # built when sampling; the gates reuse it (its DP path decision)
        if target_TK is None:
            if self.is_sampling:  # reads the autograd mode: outside no_grad
                distribution = SubsetDistribution(theta_TE, self.k_lo, self.k_hi)
                generator = self._sampling_generator(theta_TE)
                mask_TE, _, ids_TK = distribution.sample(generator)
                chosen_TK = fill_empty_slots(ids_TK, self.num_experts)
            else:
                with torch.no_grad():
                    mask_TE = self._deterministic_mask(theta_TE.detach())
                chosen_TK = padded_route_ids(mask_TE, self.topk)
        else:
            chosen_TK = target_TK.to(logits_TE.device, torch.long)
            mask_TE = self._target_mask(chosen_TK)

        probs_TE = self._gates(theta_TE, mask_TE, distribution).to(logits_TE.dtype)
        return probs_TE, mask_TE, chosen_TK

    def _theta(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits θ = z / τ (float32 at least)."""
        half = logits_TE.dtype in (torch.float16, torch.bfloat16)
        theta_TE = logits_TE.float() if half else logits_TE
        temperature = self.probmoe_config.temperature
        return theta_TE / temperature if temperature != 1.0 else theta_TE

    def _gates(
        self,
        theta_TE: torch.Tensor,
        mask_TE: torch.Tensor,
        distribution: Optional[SubsetDistribution] = None,
    ) -> torch.Tensor:
        """Gate weights at the chosen experts (see the module docstring), zero elsewhere.

        ``distribution``: the subset distribution of ``theta_TE`` when the caller built it.
        """
        cfg = self.probmoe_config
        needs_grad = torch.is_grad_enabled() and theta_TE.requires_grad
        mask_f_TE = mask_TE.to(theta_TE.dtype)
        if distribution is None and (needs_grad or cfg.gate == "marginal"):
            distribution = SubsetDistribution(theta_TE, self.k_lo, self.k_hi)
        if cfg.gate == "simple":
            if needs_grad:  # simple_straight_through(mask, μ), μ computed only in the backward
                gates_TE = distribution.straight_through(mask_TE) * mask_f_TE
            else:
                gates_TE = mask_f_TE  # forward value of the straight-through gate
            if cfg.normalize_gates:
                gates_TE = gates_TE / mask_f_TE.sum(dim=-1, keepdim=True).clamp(min=1.0)
        else:
            marginals_TE = distribution.marginals()  # differentiable exactly when needs_grad
            gates_TE = marginals_TE * mask_f_TE
            if cfg.normalize_gates:
                total_T1 = gates_TE.sum(dim=-1, keepdim=True)
                gates_TE = gates_TE / total_T1.clamp(min=torch.finfo(total_T1.dtype).tiny)
        scaling = self.config.moe_router_topk_scaling_factor
        return gates_TE * scaling if scaling else gates_TE

    def _target_mask(self, routes_TK: torch.Tensor) -> torch.Tensor:
        """Mask of a given route; RouteError naming the layer and row for a malformed one."""
        bound = self.route_id_bound
        bad_TK = (routes_TK < 0) | (routes_TK >= bound)
        if bool(bad_TK.any()):
            row = int(bad_TK.any(dim=1).nonzero()[0])
            raise RouteError(
                f"MoE layer {self.layer_number}, token row {row}: route ids "
                f"{routes_TK[row].tolist()} outside [0, {bound})"
            )
        mask_TE = routes_to_mask(routes_TK, self.num_experts)
        size_T = mask_TE.sum(dim=-1)
        given_T = (routes_TK < self.num_experts).sum(dim=-1)
        wrong_T = (size_T != given_T) | (size_T < self.k_lo) | (size_T > self.k_hi)
        if bool(wrong_T.any()):
            row = int(wrong_T.nonzero()[0])
            raise RouteError(
                f"MoE layer {self.layer_number}, token row {row}: route "
                f"{routes_TK[row].tolist()} is not a set of {self.k_lo}..{self.k_hi} distinct "
                "experts"
            )
        return mask_TE

    def _deterministic_mask(self, theta_TE: torch.Tensor) -> torch.Tensor:
        """The deterministic subset (``eval_selection``) of each row, as a ``[T, E]`` mask."""
        if self.probmoe_config.eval_selection == "marginals":
            score_TE = exact_marginals(theta_TE, self.k_lo, self.k_hi)
            preferred_T = (score_TE >= 0.5).sum(dim=-1)
        else:
            score_TE = theta_TE
            preferred_T = (theta_TE > 0).sum(dim=-1)
        size_T = preferred_T.clamp(min=self.k_lo, max=self.k_hi)
        order_TE = torch.sort(score_TE, dim=-1, descending=True, stable=True).indices
        rank_TE = torch.empty_like(order_TE).scatter_(
            1, order_TE, torch.arange(self.num_experts, device=theta_TE.device).expand_as(order_TE)
        )
        return rank_TE < size_T.unsqueeze(1)

    def _topk_indices(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """The deterministic choice for these logits (PR2 prediction, metrics' live route)."""
        with torch.no_grad():
            mask_TE = self._deterministic_mask(self._theta(logits_TE.detach()))
        return padded_route_ids(mask_TE, self.topk)

    def _sampling_generator(self, like: torch.Tensor) -> Optional[torch.Generator]:
        """The router's own generator when ``seed`` is set, else None (torch's default)."""
        seed = self.probmoe_config.seed
        if seed is None:
            return None
        if self._generator is None or self._generator.device != like.device:
            offset = 1009 * int(self.layer_number or 0) + 1_000_003 * _token_owner_rank(self.config)
            self._generator = torch.Generator(device=like.device).manual_seed(seed + offset)
        return self._generator


def _token_owner_rank(config) -> int:
    """A rank id shared exactly by the ranks that route the same tokens."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0
    rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    if config.sequence_parallel:
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        rank = rank * tp_size + parallel_state.get_tensor_model_parallel_rank()
    return rank


def _check_config_supports_probmoe(config, probmoe_config: ProbMoEConfig) -> None:
    """Reject Megatron settings that ProbMoE routing does not define or would not honour."""
    if config.moe_router_enable_expert_bias:
        raise ValueError(
            "ProbMoE router: moe_router_enable_expert_bias is a top-k selection bias and is not "
            "defined for subset distributions"
        )
    if config.moe_router_num_groups or config.moe_router_group_topk:
        raise ValueError("ProbMoE router: group-limited routing is not supported")
    if probmoe_config.mode == "dynamic-k" and getattr(config, "moe_permute_fusion", False):
        raise ValueError(
            "ProbMoE dynamic-k: moe_permute_fusion sizes the permuted buffer as tokens x topk; a "
            "variable number of experts per token needs the unfused permutation"
        )


def probmoe_router_builder(
    probmoe_config: Optional[ProbMoEConfig] = None, pr2_config: Optional[PR2RouterConfig] = None
):
    """A ``MoESubmodules.router`` builder for :class:`ProbMoERouter` (local and TE specs)."""
    return functools.partial(
        ProbMoERouter,
        probmoe_config=probmoe_config or ProbMoEConfig(),
        pr2_config=pr2_config or PR2RouterConfig(),
    )
