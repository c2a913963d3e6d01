"""PR2's evolution predictor, its feature cache and its losses (DESIGN.md §2).

Legend of shape suffixes: T tokens of one forward, C cached tokens, H hidden, E experts.

The predictor is one zero-initialised ``Linear(H, E, bias=False)`` per MoE layer: ``Δ = W_p h``.
At rollout the router picks ``TopK(score_fn(z + Δ))``; in training mini-steps i >= 2 the
predictor learns to anticipate where the live router's logits have moved to, from a small
cache of rollout router inputs ``h`` (bf16) and logits ``z`` (fp32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

PredictorLoss = Literal["kl-post", "l2", "kl"]
PREDICTOR_LOSSES: tuple[str, ...] = ("kl-post", "l2", "kl")


class EvolutionPredictor(torch.nn.Module):
    """``Δ = W_p h`` with ``W_p ∈ R^{E×H}``, zero-initialised so PR2 starts as plain replay.

    The weight stays fp32 whatever the model's dtype (like Megatron's router weight with
    ``moe_router_dtype='fp32'``); it is replicated across tensor-parallel ranks and marked
    ``sequence_parallel`` like the router weight so Megatron all-reduces its gradient over TP
    when each TP rank sees its own sequence chunk.
    """

    def __init__(self, hidden_size: int, num_experts: int, sequence_parallel: bool) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(num_experts, hidden_size, dtype=torch.float32))
        self.weight.sequence_parallel = sequence_parallel
        self.weight.pr2_predictor = True  # lets optimizers find it without name matching

    def forward(self, hidden_TH: torch.Tensor) -> torch.Tensor:
        """Predicted logit shift ``Δ`` in fp32, shape ``[..., E]``."""
        return F.linear(hidden_TH.float(), self.weight.float())


def is_predictor_parameter(param: torch.nn.Parameter) -> bool:
    """Whether ``param`` is an evolution predictor's weight."""
    return bool(getattr(param, "pr2_predictor", False))


@dataclass
class CachedFeatures:
    """Rollout-time router features for a sample of tokens of one MoE layer."""

    keys_C: torch.Tensor  # int64, sorted ascending, unique token keys
    hidden_CH: torch.Tensor  # bf16 router inputs h
    logits_CE: torch.Tensor  # fp32 router logits z at θ_old


class FeatureCache:
    """Uniform sample of at most ``max_tokens_per_group`` tokens per group (response).

    Every token offered gets a random priority; the cache keeps, within each group, the tokens
    with the smallest priorities seen so far. That is a uniform sample without replacement
    along the response, whatever the number and size of the forwards that offered its tokens,
    in O(cache + new tokens) per forward.
    """

    def __init__(self, max_tokens_per_group: int, seed: int) -> None:
        if max_tokens_per_group < 1:
            raise ValueError(f"feature cache size must be >= 1, got {max_tokens_per_group}")
        self.max_tokens_per_group = max_tokens_per_group
        self._generator = torch.Generator().manual_seed(seed)
        self.clear()

    def clear(self) -> None:
        """Drop every cached token (a new rollout batch starts)."""
        self._keys_C = torch.empty(0, dtype=torch.long)
        self._groups_C = torch.empty(0, dtype=torch.long)
        self._priority_C = torch.empty(0)
        self._hidden_CH: torch.Tensor | None = None
        self._logits_CE: torch.Tensor | None = None
        self._sorted: CachedFeatures | None = None

    def __len__(self) -> int:
        return int(self._keys_C.numel())

    def add(
        self,
        keys_T: torch.Tensor,
        groups_T: torch.Tensor,
        hidden_TH: torch.Tensor,
        logits_TE: torch.Tensor,
    ) -> None:
        """Offer one forward's tokens to the cache (router inputs and logits, detached)."""
        priority_T = torch.rand(keys_T.numel(), generator=self._generator)
        hidden_TH = hidden_TH.detach().to("cpu", torch.bfloat16)
        logits_TE = logits_TE.detach().to("cpu", torch.float32)
        if self._hidden_CH is not None:
            keys_T = torch.cat([self._keys_C, keys_T.cpu()])
            groups_T = torch.cat([self._groups_C, groups_T.cpu()])
            priority_T = torch.cat([self._priority_C, priority_T])
            hidden_TH = torch.cat([self._hidden_CH, hidden_TH])
            logits_TE = torch.cat([self._logits_CE, logits_TE])
        keep = _smallest_per_group(groups_T.cpu(), priority_T, self.max_tokens_per_group)
        self._keys_C = keys_T.cpu()[keep]
        self._groups_C = groups_T.cpu()[keep]
        self._priority_C = priority_T[keep]
        self._hidden_CH = hidden_TH[keep]
        self._logits_CE = logits_TE[keep]
        self._sorted = None

    def features(self) -> CachedFeatures | None:
        """The cached tokens sorted by key, or ``None`` when the cache is empty."""
        if self._hidden_CH is None or len(self) == 0:
            return None
        if self._sorted is None:
            order = torch.argsort(self._keys_C)
            self._sorted = CachedFeatures(
                keys_C=self._keys_C[order],
                hidden_CH=self._hidden_CH[order],
                logits_CE=self._logits_CE[order],
            )
        return self._sorted

    def lookup(self, keys_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``(token_idx, cache_idx)`` of this forward's tokens that are cached."""
        cached = self.features()
        if cached is None:
            empty = torch.empty(0, dtype=torch.long)
            return empty, empty
        keys_T = keys_T.cpu()
        pos_T = torch.searchsorted(cached.keys_C, keys_T).clamp(max=cached.keys_C.numel() - 1)
        hit_T = cached.keys_C[pos_T] == keys_T
        token_idx = torch.nonzero(hit_T).squeeze(1)
        return token_idx, pos_T[token_idx]

    def nbytes(self) -> int:
        """Bytes held by cached features."""
        if self._hidden_CH is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self._hidden_CH, self._logits_CE))


def _smallest_per_group(groups: torch.Tensor, priority: torch.Tensor, limit: int) -> torch.Tensor:
    """Indices of the ``limit`` smallest priorities within each group."""
    order = torch.argsort(priority)
    order = order[torch.argsort(groups[order], stable=True)]  # by group, then by priority
    sorted_groups = groups[order]
    starts = torch.ones_like(sorted_groups, dtype=torch.bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    position = torch.arange(sorted_groups.numel())
    group_start = torch.cummax(torch.where(starts, position, 0), dim=0).values
    rank_in_group = position - group_start
    return order[rank_in_group < limit]


def predictor_loss(
    kind: PredictorLoss,
    current_logits_CE: torch.Tensor,
    old_logits_CE: torch.Tensor,
    delta_CE: torch.Tensor,
) -> torch.Tensor:
    """Mean over cached tokens of the predictor's loss; only ``delta_CE`` carries gradient.

    * ``kl-post``: ``KL(softmax(z_cur) ‖ softmax(z_old + Δ))`` (the paper's default);
    * ``l2``: ``‖Δ − (z_cur − z_old)‖²`` averaged over experts;
    * ``kl``: ``KL(softmax(z_cur − z_old) ‖ softmax(Δ))`` on the logit shifts.
    """
    target_CE = current_logits_CE.detach().float()
    old_CE = old_logits_CE.detach().float()
    if kind == "kl-post":
        log_pred = torch.log_softmax(old_CE + delta_CE, dim=-1)
        log_target = torch.log_softmax(target_CE, dim=-1)
        return F.kl_div(log_pred, log_target, log_target=True, reduction="batchmean")
    if kind == "l2":
        return ((delta_CE - (target_CE - old_CE)) ** 2).mean()
    if kind == "kl":
        log_pred = torch.log_softmax(delta_CE, dim=-1)
        log_target = torch.log_softmax(target_CE - old_CE, dim=-1)
        return F.kl_div(log_pred, log_target, log_target=True, reduction="batchmean")
    raise ValueError(f"predictor loss must be one of {PREDICTOR_LOSSES}, got {kind!r}")
