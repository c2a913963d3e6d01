"""PR2's stabilisers of the predicted logit shift Δ and of the predictor loss (all opt-in).

Legend of shape suffixes: T tokens of one forward, C cached tokens, H hidden, E experts.

The PR2 authors' implementation has five stabilisers, all off in their "paper" ablation and all
on in their last one; here each is a :class:`~pr2_megatron.routing.router.PR2RouterConfig` key,
off by default (docs/pr2_effect.md, "Stabilisers"). On the shift Δ = W_p h at rollout, applied
in this order by :func:`stabilise_delta`:

1. **Depth scale** γ_l: ``Δ ← γ_l Δ`` with depth fraction ``d = (l − 1) / (L − 1)`` of the
   1-based layer number l of L transformer layers and ``γ_l = 1 − decay(d) (1 − γ_min)``,
   ``decay`` one of ``none`` (0: γ = 1), ``linear`` (d), ``sqrt`` (√d), ``cosine``
   (½(1 − cos πd)) (:func:`depth_scale`);
2. **Magnitude cap** r_max: if ``mean|Δ| > r_max · mean|z_old|`` over the forward's tokens, Δ is
   scaled down to exactly that ratio (:func:`cap_magnitude`);
3. **Margin cap** η: with ``m`` the k-th minus the (k+1)-th largest old logit of a token, the
   token's Δ is scaled so that ``max_e |Δ_e| ≤ η m / 2``; η can anneal linearly between two
   rollout ids (:func:`margin_cap_eta`, :func:`cap_margin`). With ``η ≤ 1`` no route can change
   (the k-th and (k+1)-th logits close their gap by at most m): prediction starts as plain replay;
4. **Flip fallback**: a token whose predicted top-k set differs from the old one while its
   post-Δ boundary margin (k-th minus (k+1)-th of ``z_old + Δ``) is below a threshold falls back
   to its old logits (Δ = 0) (:func:`flip_fallback`).

On the predictor loss (per cached token, :func:`loss_weights`):

5. **Hidden-shift weighting**: weight ``w(r)`` of the relative shift
   ``r = |h_cur − h_old| / |h_old|`` of the router input under a threshold τ: ``binary``
   ``[r < τ]``, ``linear`` ``max(0, 1 − r/τ)``, ``quadratic`` ``max(0, 1 − r/τ)²``;
6. **Boundary weighting**: ``w ∝ 1 / max(m, m_min)`` of the old boundary margin, normalised to
   mean 1 over the forward's cached tokens, then clipped at ``w_max``.

Margins are taken on the router logits, which order experts as the router does for the softmax
and sigmoid score functions without expert bias or group-limited routing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

DEPTH_SCHEDULES: tuple[str, ...] = ("none", "linear", "sqrt", "cosine")
SHIFT_WEIGHTINGS: tuple[str, ...] = ("none", "binary", "linear", "quadratic")

#: ``topk_fn(logits_TE) -> experts_TK``: the router's own expert choice for some logits.
TopKFn = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------- Δ at rollout
def depth_fraction(layer_number: int, num_layers: int) -> float:
    """``d = (l − 1) / (L − 1)`` of 1-based layer ``l`` of ``L``, in [0, 1] (0 when L = 1)."""
    if num_layers <= 1:
        return 0.0
    return min(max((layer_number - 1) / (num_layers - 1), 0.0), 1.0)


def depth_scale(schedule: str, depth: float, gamma_min: float) -> float:
    """``γ = 1 − decay(d) (1 − γ_min)`` for ``schedule`` in :data:`DEPTH_SCHEDULES`."""
    if schedule == "none":
        return 1.0
    if schedule == "linear":
        decay = depth
    elif schedule == "sqrt":
        decay = math.sqrt(depth)
    elif schedule == "cosine":
        decay = 0.5 * (1.0 - math.cos(math.pi * depth))
    else:
        raise ValueError(f"depth schedule must be one of {DEPTH_SCHEDULES}, got {schedule!r}")
    return 1.0 - decay * (1.0 - gamma_min)


def margin_cap_eta(
    eta: Optional[float],
    eta_final: Optional[float],
    anneal: Optional[list[int]],
    rollout_id: Optional[int],
) -> Optional[float]:
    """η of the margin cap at ``rollout_id``: ``eta``, annealed linearly to ``eta_final``.

    ``anneal = [first, last]`` rollout ids: η = ``eta`` up to ``first``, ``eta_final`` from
    ``last`` on, linear between. None: no margin cap.
    """
    if eta is None:
        return None
    if eta_final is None or anneal is None or rollout_id is None:
        return eta
    first, last = anneal
    if rollout_id <= first:
        return eta
    if rollout_id >= last:
        return eta_final
    return eta + (eta_final - eta) * (rollout_id - first) / (last - first)


def boundary_margin(logits_TE: torch.Tensor, k: int) -> torch.Tensor:
    """``m_T``: the k-th minus the (k+1)-th largest logit of each token (>= 0)."""
    top_TK1 = logits_TE.float().topk(min(k + 1, logits_TE.shape[-1]), dim=-1).values
    if top_TK1.shape[-1] <= k:  # k = E: no expert outside the top-k, nothing can flip
        return torch.full(logits_TE.shape[:-1], math.inf, device=logits_TE.device)
    return top_TK1[..., k - 1] - top_TK1[..., k]


def cap_magnitude(delta_TE: torch.Tensor, logits_TE: torch.Tensor, ratio: float) -> torch.Tensor:
    """Δ scaled down so that ``mean|Δ| <= ratio · mean|z|`` over the tokens (unchanged if so)."""
    if delta_TE.numel() == 0:
        return delta_TE
    bound = ratio * logits_TE.float().abs().mean()
    size = delta_TE.abs().mean()
    if size <= bound:
        return delta_TE
    return delta_TE * (bound / size)


def cap_margin(delta_TE: torch.Tensor, logits_TE: torch.Tensor, k: int, eta: float) -> torch.Tensor:
    """Each token's Δ scaled down so that ``max_e |Δ_e| <= η m / 2`` (m: old boundary margin)."""
    bound_T = eta * boundary_margin(logits_TE, k) / 2
    largest_T = delta_TE.abs().amax(dim=-1)
    scale_T = torch.where(
        largest_T > bound_T, bound_T / largest_T.clamp(min=1e-30), torch.ones_like(largest_T)
    )
    return delta_TE * scale_T.unsqueeze(-1)


def changed_routes(experts_TK: torch.Tensor, reference_TK: torch.Tensor) -> torch.Tensor:
    """``BoolTensor[T]``: where the two top-k sets differ."""
    shared_T = (experts_TK.unsqueeze(2) == reference_TK.unsqueeze(1)).any(dim=2).sum(dim=1)
    return shared_T < experts_TK.shape[1]


def flip_fallback(
    delta_TE: torch.Tensor, logits_TE: torch.Tensor, k: int, threshold: float, topk_fn: TopKFn
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Δ, fallback_T)``: tokens whose route flips with a post-Δ margin < threshold get Δ = 0."""
    shifted_TE = logits_TE.float() + delta_TE
    flipped_T = changed_routes(topk_fn(shifted_TE), topk_fn(logits_TE.float()))
    fallback_T = flipped_T & (boundary_margin(shifted_TE, k) < threshold)
    return delta_TE.masked_fill(fallback_T.unsqueeze(-1), 0.0), fallback_T


@dataclass
class DeltaSettings:
    """The rollout-side stabilisers of one router (None / ``none``: off)."""

    depth_schedule: str = "none"
    depth_gamma_min: float = 0.5
    magnitude_cap: Optional[float] = None
    margin_cap: Optional[float] = None  # η at this rollout (annealed by the caller)
    flip_fallback_margin: Optional[float] = None

    @property
    def active(self) -> bool:
        """Whether any stabiliser changes Δ."""
        return (
            self.depth_schedule != "none"
            or self.magnitude_cap is not None
            or self.margin_cap is not None
            or self.flip_fallback_margin is not None
        )


def stabilise_delta(
    settings: DeltaSettings,
    delta_TE: torch.Tensor,
    logits_TE: torch.Tensor,
    *,
    k: int,
    depth: float,
    topk_fn: TopKFn,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(Δ', fallback_T)``: Δ after the stabilisers 1-4 (module docstring), in that order.

    ``fallback_T`` marks the tokens the flip fallback reset (None without flip fallback).
    ``depth`` is the layer's :func:`depth_fraction`.
    """
    delta_TE = delta_TE.float()
    gamma = depth_scale(settings.depth_schedule, depth, settings.depth_gamma_min)
    if gamma != 1.0:
        delta_TE = delta_TE * gamma
    if settings.magnitude_cap is not None:
        delta_TE = cap_magnitude(delta_TE, logits_TE, settings.magnitude_cap)
    if settings.margin_cap is not None:
        delta_TE = cap_margin(delta_TE, logits_TE, k, settings.margin_cap)
    fallback_T = None
    if settings.flip_fallback_margin is not None:
        delta_TE, fallback_T = flip_fallback(
            delta_TE, logits_TE, k, settings.flip_fallback_margin, topk_fn
        )
    return delta_TE, fallback_T


# ------------------------------------------------------------------------ loss weights
def hidden_shift_weights(
    hidden_cur_CH: torch.Tensor, hidden_old_CH: torch.Tensor, kind: str, threshold: float
) -> torch.Tensor:
    """``w_C`` of the relative router-input shift ``r = |h_cur − h_old| / |h_old|`` under τ."""
    if kind not in SHIFT_WEIGHTINGS or kind == "none":
        raise ValueError(f"hidden-shift weighting must be one of {SHIFT_WEIGHTINGS[1:]}: {kind!r}")
    old_CH = hidden_old_CH.float()
    shift_C = (hidden_cur_CH.float() - old_CH).norm(dim=-1) / old_CH.norm(dim=-1).clamp(min=1e-12)
    if kind == "binary":
        return (shift_C < threshold).float()
    headroom_C = (1.0 - shift_C / threshold).clamp(min=0.0)
    return headroom_C if kind == "linear" else headroom_C**2


def boundary_weights(
    old_logits_CE: torch.Tensor, k: int, margin_min: float, weight_max: float
) -> torch.Tensor:
    """``w_C ∝ 1 / max(m, m_min)``, normalised to mean 1, then clipped at ``weight_max``."""
    inverse_C = 1.0 / boundary_margin(old_logits_CE, k).clamp(min=margin_min)
    weights_C = inverse_C / inverse_C.mean()
    return weights_C.clamp(max=weight_max)


def loss_weights(
    *,
    shift_kind: str,
    shift_threshold: float,
    boundary: bool,
    margin_min: float,
    weight_max: float,
    hidden_cur_CH: torch.Tensor,
    hidden_old_CH: torch.Tensor,
    old_logits_CE: torch.Tensor,
    k: int,
) -> Optional[torch.Tensor]:
    """Per-token predictor-loss weights of stabilisers 5 and 6 (their product), or None if off."""
    weights_C = None
    if shift_kind != "none":
        weights_C = hidden_shift_weights(hidden_cur_CH, hidden_old_CH, shift_kind, shift_threshold)
    if boundary:
        margin_C = boundary_weights(old_logits_CE, k, margin_min, weight_max)
        weights_C = margin_C if weights_C is None else weights_C * margin_C
    return weights_C
