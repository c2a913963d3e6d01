"""PR2's evolution predictor and its losses (docs/design.md, "The algorithm").

Legend of shape suffixes: T tokens of one forward, C cached tokens, H hidden, E experts.

The predictor is one zero-initialised ``Linear(H, E, bias=False)`` per MoE layer: ``Δ = W_p h``.
At rollout the router picks ``TopK(score_fn(z + Δ))``; in training mini-steps i >= 2 the
predictor learns to anticipate where the live router's logits have moved to, from a small
cache of rollout router inputs ``h`` (bf16) and logits ``z`` (fp32)
(:mod:`pr2_megatron.routing.feature_cache`).
"""

from __future__ import annotations

from typing import Literal, Optional

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


def predictor_loss(
    kind: PredictorLoss,
    current_logits_CE: torch.Tensor,
    old_logits_CE: torch.Tensor,
    delta_CE: torch.Tensor,
    weights_C: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean over cached tokens of the predictor's loss; only ``delta_CE`` carries gradient.

    * ``kl-post``: ``KL(softmax(z_cur) ‖ softmax(z_old + Δ))`` (the paper's default);
    * ``l2``: ``‖Δ − (z_cur − z_old)‖²`` averaged over experts;
    * ``kl``: ``KL(softmax(z_cur − z_old) ‖ softmax(Δ))`` on the logit shifts.

    ``weights_C`` (optional, detached) weights each token's loss in the mean (the hidden-shift
    and boundary stabilisers, :mod:`pr2_megatron.routing.stabilisers`): ``mean_c w_c ℓ_c``.
    """
    if kind not in PREDICTOR_LOSSES:
        raise ValueError(f"predictor loss must be one of {PREDICTOR_LOSSES}, got {kind!r}")
    per_token_C = _per_token_loss(kind, current_logits_CE, old_logits_CE, delta_CE)
    if weights_C is not None:
        per_token_C = per_token_C * weights_C.detach().to(per_token_C)
    return per_token_C.mean() if per_token_C.numel() else per_token_C.sum()


def _per_token_loss(kind, current_logits_CE, old_logits_CE, delta_CE) -> torch.Tensor:
    """``ℓ_C``: each cached token's loss (see :func:`predictor_loss`)."""
    target_CE = current_logits_CE.detach().float()
    old_CE = old_logits_CE.detach().float()
    if kind == "l2":
        return ((delta_CE - (target_CE - old_CE)) ** 2).mean(dim=-1)
    if kind == "kl-post":
        log_pred, log_target = old_CE + delta_CE, target_CE
    else:  # kl
        log_pred, log_target = delta_CE, target_CE - old_CE
    log_pred = torch.log_softmax(log_pred, dim=-1)
    log_target = torch.log_softmax(log_target, dim=-1)
    return F.kl_div(log_pred, log_target, log_target=True, reduction="none").sum(dim=-1)
