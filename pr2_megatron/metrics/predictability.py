"""How much of the router drift a linear predictor could anticipate: the predictability diagnostic.

Legend of shape suffixes: N tokens, H hidden (router input), E experts, K top-k.

Definition (fixed before any result was seen; docs/pr2_effect.md, "The diagnostic"). Per MoE
layer, each recorded response token has its router input ``h_old`` and logits ``z_old`` at
rollout and its logits ``z_cur`` in the training forward of its mini-step i. Only tokens of
mini-steps i >= 2 enter fits and evaluations (at i = 1 the router has not moved).

* **Ridge fit** of the shift ``z_cur − z_old`` on ``h_old``, bias-free like PR2's predictor
  ``Δ = W h``: ``W = argmin Σ_n ‖W h_n − (z_cur − z_old)_n‖² + λ̃ ‖W‖²`` with
  ``λ̃ = λ · tr(HᵀH) / H`` (λ times the mean eigenvalue of the Gram matrix: scale-free) and the
  fixed ``λ =`` :data:`RIDGE_LAMBDA` ``= 0.1``, one ``W`` for all mini-steps (as PR2 has one Δ).
* **Gain** of a fit on a set of tokens: mean over tokens of
  ``overlap(TopK(z_old + W h_old), TopK(z_cur)) − overlap(TopK(z_old), TopK(z_cur))``
  (top-k overlap |A ∩ B| / k; TopK on the logits, which is the router's choice for softmax or
  sigmoid scores without expert bias or group-limited routing), per layer, then the mean over
  layers (the per-router mean).
* **Lagged gain** of rollout step s (s >= 2): fit on step s − 1's tokens, evaluated on step s's:
  what a predictor trained on the previous rollout batch could gain over plain replay.
* **Within-batch ceiling** of step s: the step's prompts split by prompt-id parity (all
  responses of a prompt on one side), fit on one half, evaluated on the other, both ways; the
  gain over all of the step's tokens.
* **Paired standard error** over steps: each step's gain is a paired difference on the same
  tokens; the summary is its mean over steps and ``sd / √n_steps`` (:func:`summarize_gains`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "RIDGE_LAMBDA",
    "LayerTokens",
    "fit_gain",
    "ridge_fit",
    "step_gains",
    "summarize_gains",
]

#: λ of the ridge fit, relative to the mean eigenvalue of ``HᵀH``; fixed before any result.
RIDGE_LAMBDA = 0.1


@dataclass
class LayerTokens:
    """One MoE layer's recorded tokens of one rollout step (mini-steps >= 2 only, or all)."""

    hidden_old_NH: torch.Tensor
    logits_old_NE: torch.Tensor
    logits_cur_NE: torch.Tensor
    mini_step_N: torch.Tensor  # int64
    prompt_N: torch.Tensor  # int64 prompt ids (the GRPO group of the response)

    def select(self, rows_N: torch.Tensor) -> LayerTokens:
        """The tokens where ``rows_N`` (bool) is True."""
        return LayerTokens(
            self.hidden_old_NH[rows_N],
            self.logits_old_NE[rows_N],
            self.logits_cur_NE[rows_N],
            self.mini_step_N[rows_N],
            self.prompt_N[rows_N],
        )

    def moved(self) -> LayerTokens:
        """The tokens of mini-steps >= 2 (the router has moved since rollout)."""
        return self.select(self.mini_step_N >= 2)

    def __len__(self) -> int:
        return int(self.mini_step_N.numel())


def ridge_fit(
    hidden_NH: torch.Tensor, target_NE: torch.Tensor, lam: float = RIDGE_LAMBDA
) -> torch.Tensor:
    """``W_EH`` of the bias-free ridge fit ``target ≈ W h`` with ``λ̃ = λ · tr(HᵀH) / H``."""
    x_NH = hidden_NH.double()
    gram_HH = x_NH.T @ x_NH
    width = gram_HH.shape[0]
    reg = lam * float(torch.trace(gram_HH)) / max(width, 1)
    if reg <= 0:  # no data (or all-zero inputs): the zero predictor, i.e. plain replay
        return torch.zeros(target_NE.shape[1], width, dtype=torch.float32)
    eye_HH = torch.eye(width, dtype=torch.float64)
    w_HE = torch.linalg.solve(gram_HH + reg * eye_HH, x_NH.T @ target_NE.double())
    return w_HE.T.float()


def _overlap_N(logits_NE: torch.Tensor, live_NK: torch.Tensor, k: int) -> torch.Tensor:
    chosen_NK = logits_NE.topk(k, dim=-1).indices
    return (chosen_NK.unsqueeze(2) == live_NK.unsqueeze(1)).any(dim=2).sum(dim=1).double() / k


def fit_gain(w_EH: torch.Tensor, tokens: LayerTokens, k: int) -> tuple[float, float, int]:
    """``(Σ gain, Σ plain overlap, N)`` of ``Δ = W h_old`` on ``tokens`` (see the module doc)."""
    if len(tokens) == 0:
        return 0.0, 0.0, 0
    live_NK = tokens.logits_cur_NE.topk(k, dim=-1).indices
    plain_N = _overlap_N(tokens.logits_old_NE, live_NK, k)
    predicted_NE = tokens.logits_old_NE + tokens.hidden_old_NH @ w_EH.T
    gain_N = _overlap_N(predicted_NE, live_NK, k) - plain_N
    return float(gain_N.sum()), float(plain_N.sum()), len(tokens)


def _within_gain(tokens: LayerTokens, k: int, lam: float) -> tuple[float, int]:
    """``(Σ gain, N)``: 2-fold by prompt-id parity, fit on one half, evaluated on the other."""
    total, count = 0.0, 0
    for parity in (0, 1):
        train = tokens.select(tokens.prompt_N % 2 == parity)
        test = tokens.select(tokens.prompt_N % 2 != parity)
        if len(train) == 0 or len(test) == 0:
            continue
        w_EH = ridge_fit(train.hidden_old_NH, train.logits_cur_NE - train.logits_old_NE, lam)
        gain, _, n = fit_gain(w_EH, test, k)
        total, count = total + gain, count + n
    return total, count


def step_gains(
    current: dict[int, LayerTokens],
    previous: dict[int, LayerTokens] | None,
    k: int,
    lam: float = RIDGE_LAMBDA,
) -> dict[str, float]:
    """One rollout step's diagnostic: lagged gain (needs ``previous``), within-batch ceiling.

    ``current`` / ``previous``: tokens per MoE layer of this and the previous rollout step (any
    mini-steps; only >= 2 are used). Keys: ``lagged_gain``, ``within_gain``, ``plain_overlap``
    (the mean over layers) and each ``.../layer_{n}``; ``tokens`` per layer (the smallest).
    """
    out: dict[str, float] = {}
    lagged, within, plain = [], [], []
    counts = []
    for layer in sorted(current):
        tokens = current[layer].moved()
        if len(tokens) == 0:
            continue
        counts.append(len(tokens))
        live_NK = tokens.logits_cur_NE.topk(k, dim=-1).indices
        plain_value = float(_overlap_N(tokens.logits_old_NE, live_NK, k).mean())
        plain.append(plain_value)
        out[f"plain_overlap/layer_{layer}"] = plain_value
        within_sum, within_n = _within_gain(tokens, k, lam)
        if within_n:
            within.append(within_sum / within_n)
            out[f"within_gain/layer_{layer}"] = within[-1]
        fit_set = None if previous is None else previous.get(layer)
        if fit_set is not None and len(fit_set.moved()) > 0:
            fit_set = fit_set.moved()
            shift_NE = fit_set.logits_cur_NE - fit_set.logits_old_NE
            w_EH = ridge_fit(fit_set.hidden_old_NH, shift_NE, lam)
            gain, _, n = fit_gain(w_EH, tokens, k)
            lagged.append(gain / n)
            out[f"lagged_gain/layer_{layer}"] = lagged[-1]
    summaries = (("plain_overlap", plain), ("within_gain", within), ("lagged_gain", lagged))
    for name, values in summaries:
        if values:
            out[name] = sum(values) / len(values)
    if counts:
        out["tokens"] = float(min(counts))
    return out


def summarize_gains(values: Sequence[float]) -> dict[str, float]:
    """``{mean, se, n}`` over steps: the paired standard error is ``sd / √n`` (sd with n − 1)."""
    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(values)
    if n == 0:
        return {"mean": float("nan"), "se": float("nan"), "n": 0}
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "se": float("nan"), "n": 1}
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return {"mean": mean, "se": math.sqrt(var / n), "n": n}
