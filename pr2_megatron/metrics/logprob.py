"""Log-prob level metrics: training vs rollout mismatch, PPO clip fraction, predictor size.

k3 KL, extreme tokens and the IS ratio of training against rollout log-probs (pure torch, no
Megatron).

Shape legend: B samples, S positions (any ``[B, S]`` or flat layout, the same for every input).
Empty inputs never produce NaN: a ratio with a zero denominator is ``0.0``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "EXTREME_LOG_RATIO",
    "logprob_mismatch_metrics",
    "ppo_clip_fraction",
    "predictor_metrics",
]

# |Δ| above this (a factor of 2 between the two probabilities) makes a token "extreme".
EXTREME_LOG_RATIO = math.log(2.0)


def _ratio(num: float, den: float) -> float:
    """``num / den``, or 0.0 when there is nothing to divide by."""
    return num / den if den > 0 else 0.0


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shape mismatch: {shapes}")


def _mask_weights(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights float64, selected bool)``: a bool or 0/1 float mask as weights."""
    weights = mask.to(torch.float64)
    return weights, weights > 0


def logprob_mismatch_metrics(
    logp_train: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """Train-vs-rollout log-prob mismatch over the tokens selected by ``mask``.

    With ``Δ = logp_train - logp_rollout`` and ``r = exp(Δ) = π_train / π_rollout`` (tokens were
    sampled from the rollout policy):

    - ``k3_kl``: mean of ``r - 1 - Δ`` (Schulman's k3), an unbiased, non-negative per-token
      estimator of ``KL(π_rollout ‖ π_train)``;
    - ``extreme_token_fraction``: fraction of tokens with ``|Δ| > ln 2``;
    - ``is_ratio/mean``, ``is_ratio/std`` (population std, ddof=0), ``is_ratio/max`` of ``r``.

    ``mask`` (bool, or float used as weights, normally 0/1) has the shape of the log-probs;
    means are ``Σ m·x / Σ m``.  Unmasked positions may hold anything (padding, inf, NaN).
    Computed in float64.  With no masked token every value is 0.0.

    Raises:
        ValueError: if the three shapes differ.

    """
    _check_same_shape(logp_train=logp_train, logp_rollout=logp_rollout, mask=mask)
    weights, selected = _mask_weights(mask)
    delta = logp_train.to(torch.float64) - logp_rollout.to(torch.float64)
    # Zero Δ outside the mask so padding (possibly inf/NaN) cannot poison a masked sum.
    delta = torch.where(selected, delta, torch.zeros_like(delta))
    denom = weights.sum()
    keys = ("k3_kl", "extreme_token_fraction", "is_ratio/mean", "is_ratio/std", "is_ratio/max")
    if denom.item() <= 0:
        return dict.fromkeys(keys, 0.0)

    ratio = torch.exp(delta)
    k3 = torch.expm1(delta) - delta  # = r - 1 - Δ, without cancellation for small Δ
    extreme = (delta.abs() > EXTREME_LOG_RATIO).to(torch.float64)
    ratio_mean = (weights * ratio).sum() / denom
    ratio_var = (weights * (ratio - ratio_mean) ** 2).sum() / denom
    ratio_max = ratio.masked_fill(~selected, float("-inf")).max()
    values = torch.stack(
        [
            (weights * k3).sum() / denom,
            (weights * extreme).sum() / denom,
            ratio_mean,
            ratio_var.sqrt(),
            ratio_max,
        ]
    ).tolist()
    return dict(zip(keys, values))


def ppo_clip_fraction(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
) -> float:
    """Fraction of masked tokens on which PPO's clipped term is the active one.

    The per-token objective is ``min(r·A, clip(r, 1 - eps_low, 1 + eps_high)·A)``.  A token counts
    when the min picks the clipped term *and* it differs from the unclipped one, i.e.
    ``A > 0 and r > 1 + eps_high`` or ``A < 0 and r < 1 - eps_low`` (its policy gradient is zero).
    Tokens with ``A == 0`` or ``r`` on the clip boundary do not count.  This is the usual
    ``clipfrac`` (e.g. verl's ``pg_losses2 > pg_losses1``); dual-clip is not counted.
    ``mask`` is bool or float weights; returns 0.0 when no token is masked.

    Raises:
        ValueError: if the shapes differ or the epsilons are negative.

    """
    _check_same_shape(ratio=ratio, advantages=advantages, mask=mask)
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    weights, _ = _mask_weights(mask)
    r = ratio.to(torch.float64)
    a = advantages.to(torch.float64)
    clipped = ((a > 0) & (r > 1.0 + eps_high)) | ((a < 0) & (r < 1.0 - eps_low))
    denom = weights.sum().item()
    if denom <= 0:
        return 0.0
    # where(), not multiply: a NaN ratio at a padded position must not leak into the sum.
    return (torch.where(clipped, weights, torch.zeros_like(weights)).sum() / denom).item()


# --------------------------------------------------------------------------------------------
# Evolution predictor
# --------------------------------------------------------------------------------------------


def predictor_metrics(delta: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """Size of the predicted logit shift relative to the router logits it is added to.

    Args:
        delta: predictor output ``Δ = W_p h`` (e.g. ``[T, E]``).
        logits: router logits ``z`` for the same tokens, same shape.

    Returns:
        ``predictor/delta_to_logit_ratio`` = ``mean|Δ| / mean|z|`` (0.0 when ``mean|z|`` is 0 or
        there are no tokens), plus its parts ``predictor/delta_abs_mean`` and
        ``predictor/logit_abs_mean``.

    Raises:
        ValueError: if the shapes differ.

    """
    _check_same_shape(delta=delta, logits=logits)
    if delta.numel() == 0:
        delta_abs, logit_abs = 0.0, 0.0
    else:
        means = torch.stack(
            [
                delta.detach().to(torch.float64).abs().mean(),
                logits.detach().to(torch.float64).abs().mean(),
            ]
        )
        delta_abs, logit_abs = means.tolist()
    return {
        "predictor/delta_to_logit_ratio": _ratio(delta_abs, logit_abs),
        "predictor/delta_abs_mean": delta_abs,
        "predictor/logit_abs_mean": logit_abs,
    }
