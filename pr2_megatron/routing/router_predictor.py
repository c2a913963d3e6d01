"""The PR2 router's predictor side: the predict-phase shift and the predictor loss.

A mixin of :class:`~pr2_megatron.routing.router.PR2Router` (it uses the router's
``predictor``, ``pr2_config``, ``feature_cache``, ``topk`` and ``_topk_indices``):

* predict phase: ``Δ = W_p h`` through the PR2 authors' stabilisers
  (:mod:`pr2_megatron.routing.stabilisers`; all off by default), the predicted route
  ``TopK(score_fn(z + Δ))``, and its per-forward metric record (|Δ|, |z|, routes changed, flip
  fallbacks);
* replay that trains the predictor: its loss on the cached tokens (hidden-shift and boundary
  loss weights), the reference's predictive top-k accuracy, attached to the forward's backward
  with Megatron's aux-loss pattern.

Legend of shape suffixes: T tokens of one forward, C cached tokens among them, E experts,
K top-k, H hidden.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from pr2_megatron.metrics.agreement import topk_overlap
from pr2_megatron.routing.predictor import predictor_loss
from pr2_megatron.routing.stabilisers import (
    changed_routes,
    depth_fraction,
    loss_weights,
    stabilise_delta,
)

__all__ = ["PredictorSide"]


class PredictorSide:
    """The predict-phase shift and the predictor loss of a PR2 router (a mixin)."""

    def _predicted_route(self, hidden_TH, logits_TE):
        """``(TopK(score_fn(z + Δ)), Δ, fallback_T)`` without grad: the PR2 prediction.

        Δ after the configured stabilisers (:meth:`_stabilised`); ``fallback_T`` marks tokens
        the flip fallback returned to their old logits (None without it).
        """
        with torch.no_grad():
            delta_TE, fallback_T = self._stabilised(self.predictor(hidden_TH), logits_TE.detach())
            return self._topk_indices(logits_TE + delta_TE), delta_TE, fallback_T

    def _stabilised(self, delta_TE, logits_TE):
        """``(Δ', fallback_T)``: Δ through the stabilisers of :attr:`pr2_config` (or as it is)."""
        settings = self.pr2_config.delta_settings(self.current_rollout_id)
        if not settings.active:
            return delta_TE, None
        depth = depth_fraction(self.route_layer_number or 1, self.config.num_layers)
        return stabilise_delta(
            settings, delta_TE, logits_TE, k=self.topk, depth=depth, topk_fn=self._topk_indices
        )

    def _predict_record(self, chosen_TK, live_TK, prediction, logits_TE, keys_T) -> dict:
        """Predict-phase metrics of one forward: |Δ|, |z|, routes changed, flip fallbacks.

        Counted over the named tokens (key >= 0) when the forward's tokens are named.
        """
        delta_TE, fallback_T = prediction
        real_T = torch.ones(chosen_TK.shape[0], dtype=torch.bool, device=chosen_TK.device)
        if keys_T is not None:
            real_T = (keys_T >= 0).to(chosen_TK.device)
        changed_T = changed_routes(chosen_TK, live_TK) & real_T
        fallbacks = 0 if fallback_T is None else int((fallback_T.to(real_T.device) & real_T).sum())
        return {
            "delta_abs": delta_TE.abs().mean(),
            "logit_abs": logits_TE.detach().abs().mean(),
            "changed": torch.tensor([int(changed_T.sum()), fallbacks, int(real_T.sum())]),
            "tokens": logits_TE.shape[0],
        }

    def _attach_cached_loss(self, probs_TE, hidden_TH, logits_TE, *, keys_T, pairing=None):
        """The predictor loss on the cached tokens named ``keys_T``, attached to ``probs_TE``."""
        if pairing is not None:
            self.router_replay.pairing_counts[pairing] += 1
        return self._attach_predictor_loss(probs_TE, keys_T, logits_TE, hidden_TH)

    def _attach_snapshot_loss(self, probs_TE, hidden_TH, logits_TE):
        """Protocol mode, no exact pairing: the forward's own h against ``z_old = W_old h``."""
        replay = self.router_replay
        replay.pairing_counts["snapshot"] += 1
        loss = replay.snapshot_loss(self.pr2_config.loss, self.predictor, hidden_TH, logits_TE)
        return self._finish_predictor_loss(probs_TE, loss, logits_TE.shape[0])

    def _attach_predictor_loss(self, probs_TE, keys_T, logits_TE, hidden_TH) -> torch.Tensor:
        """Add the predictor loss to this forward's backward (Megatron's aux-loss pattern)."""
        token_idx, cache_idx = self.feature_cache.lookup(keys_T)
        if token_idx.numel() == 0:
            # No cached token here: a zero loss keeps W_p in the graph so that data-parallel
            # gradient reductions see the same parameters on every rank.
            loss = self.predictor.weight.sum() * 0.0
        else:
            cached = self.feature_cache.features()
            device = logits_TE.device
            hidden_CH = cached.hidden_CH[cache_idx].to(device)
            old_logits_CE = cached.logits_CE[cache_idx].to(device)
            current_logits_CE = logits_TE[token_idx.to(device)]
            delta_CE = self.predictor(hidden_CH)
            weights_C = self._loss_weights(hidden_TH, token_idx, hidden_CH, old_logits_CE)
            loss = predictor_loss(
                self.pr2_config.loss, current_logits_CE, old_logits_CE, delta_CE, weights_C
            )
            self.predictor_accuracy.append(
                self._predictive_accuracy(delta_CE.detach(), old_logits_CE, current_logits_CE)
            )
        return self._finish_predictor_loss(probs_TE, loss, token_idx.numel())

    def _loss_weights(self, hidden_TH, token_idx, hidden_CH, old_logits_CE):
        """Per-token loss weights of the hidden-shift and boundary stabilisers (None: off)."""
        cfg = self.pr2_config
        if cfg.hidden_shift_weighting == "none" and not cfg.boundary_weighting:
            return None
        with torch.no_grad():
            return loss_weights(
                shift_kind=cfg.hidden_shift_weighting,
                shift_threshold=cfg.hidden_shift_threshold,
                boundary=cfg.boundary_weighting,
                margin_min=cfg.boundary_margin_min,
                weight_max=cfg.boundary_weight_max,
                hidden_cur_CH=hidden_TH.detach()[token_idx.to(hidden_TH.device)],
                hidden_old_CH=hidden_CH,
                old_logits_CE=old_logits_CE,
                k=self.topk,
            )

    def _predictive_accuracy(self, delta_CE, old_logits_CE, current_logits_CE) -> torch.Tensor:
        """``[hits, plain hits, tokens]`` of the predictive top-k accuracy on cached tokens.

        Overlaps of TopK(z_old + Δ') and of TopK(z_old) with TopK(z_cur), summed; Δ' is the
        current predictor's shift through the stabilisers (the magnitude cap over these cached
        tokens rather than over a rollout forward's).
        """
        with torch.no_grad():
            old_CE, current_CE = old_logits_CE.detach(), current_logits_CE.detach()
            delta_CE, _ = self._stabilised(delta_CE, old_CE)
            live_CK = self._topk_indices(current_CE)
            predicted = topk_overlap(self._topk_indices(old_CE + delta_CE), live_CK).sum()
            plain = topk_overlap(self._topk_indices(old_CE), live_CK).sum()
        return torch.stack([predicted.cpu(), plain.cpu(), torch.tensor(float(live_CK.shape[0]))])

    def _finish_predictor_loss(self, probs_TE, loss, tokens: int) -> torch.Tensor:
        """Log ``loss`` (a mean over ``tokens``), attach it to ``probs_TE``'s backward."""
        self.predictor_losses.append(float(loss.detach()))
        self.predictor_loss_tokens.append(int(tokens))
        if self.config.sequence_parallel:
            # Each TP rank holds 1/TP of the tokens and Megatron sums sequence-parallel
            # gradients over TP: scale so the sum is the mean over the whole sequence.
            loss = loss / self.tp_group.size()
        return MoEAuxLossAutoScaler.apply(probs_TE, loss)
