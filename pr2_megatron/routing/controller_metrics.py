"""The metrics of a routing pass, read by :meth:`RoutingController.metrics` (a mixin).

Replay: agreement of the replayed (and plain-replay) routes with the live top-k, and when the
predictors train, their loss and the reference's predictive top-k accuracy; predict: the
predictor's logit shift relative to the logits, the routes it changes and the flip fallbacks.
The mixin uses the controller's ``routers``, ``phase``, ``layer_numbers`` and pass state.
"""

from __future__ import annotations

from typing import Optional

import torch

from pr2_megatron.metrics.agreement import RoutingAgreement
from pr2_megatron.routing.router_config import RoutingPhase

__all__ = ["ControllerMetrics"]


class ControllerMetrics:
    """:meth:`metrics` of a :class:`~pr2_megatron.routing.controller.RoutingController`."""

    def metrics(self, group: Optional[torch.distributed.ProcessGroup] = None) -> dict[str, float]:
        """Routing agreement and predictor numbers of this pass, all-reduced over ``group``.

        Replay with ``collect_metrics``: agreement of the replayed (and plain-replay) route with
        the live top-k (:func:`pr2_megatron.metrics.routing_agreement`); replay that trains the
        predictors: their loss (this rank's mean). Predict with ``collect_metrics``: the
        predictor's logit shift relative to the logits. Raises RuntimeError for a pass that
        collected nothing (no ``collect_metrics``, no predictor training, or no forward yet),
        where all-zero figures would look like data.
        """
        out: dict[str, float] = {}
        if self.phase == RoutingPhase.REPLAY and (self.collects_metrics or self.trains_predictor):
            if self.collects_metrics:
                self._require_forwards()
                agreement = self._agreement_of_pass()
                if group is not None:
                    agreement.reduce_(group)
                out.update(agreement.summary())
            if self.trains_predictor:
                out.update(self._predictor_losses())
        elif self.phase == RoutingPhase.PREDICT and self.collects_metrics:
            self._require_forwards()
            out.update(self._predict_metrics())
        else:
            raise RuntimeError(
                f"metrics(): this {self.phase.value} pass collects no metrics (start a replay "
                "or predict pass with collect_metrics=True, or train the predictors)"
            )
        return out

    def _predict_metrics(self) -> dict[str, float]:
        """Predict pass: mean|Δ|/mean|z|, routes changed by the predictor, flip fallbacks.

        ``predictor/route_change_fraction``: share of named token-layer routes whose predicted
        top-k set differs from the live top-k at rollout (the reference's
        ``predictive_route_change_fraction``); ``predictor/flip_fallback_fraction``: share the
        flip fallback returned to their old logits; overall and ``/layer_{n}``.
        """
        out: dict[str, float] = {}
        delta = [rec["delta_abs"] for r in self.routers for rec in r.metric_records]
        logit = [rec["logit_abs"] for r in self.routers for rec in r.metric_records]
        if not delta:
            return out
        mean_logit = float(torch.stack(logit).mean())
        out["predictor/delta_to_logit_ratio"] = (
            float(torch.stack(delta).mean()) / mean_logit if mean_logit else 0.0
        )
        totals = torch.zeros(3, dtype=torch.long)
        per_layer = {}
        for router in self.routers:
            counts = sum((rec["changed"] for rec in router.metric_records), torch.zeros(3))
            per_layer[router.route_layer_number] = counts
            totals = totals + counts.long()
        for suffix, counts in [("", totals), *((f"/layer_{n}", c) for n, c in per_layer.items())]:
            tokens = float(counts[2])
            out[f"predictor/route_change_fraction{suffix}"] = (
                float(counts[0]) / tokens if tokens else 0.0
            )
            out[f"predictor/flip_fallback_fraction{suffix}"] = (
                float(counts[1]) / tokens if tokens else 0.0
            )
        return out

    def _require_forwards(self) -> None:
        held = 0 if self._on_forward is not None else self._num_forwards()
        if self.routers and held + self._released_forwards == 0:
            raise RuntimeError(f"metrics(): no forward ran in this {self.phase.value} pass")

    def _agreement_of_pass(self) -> RoutingAgreement:
        """Agreement of every forward of the pass: released forwards' sums plus held forwards.

        The same sums, added in the same order, as one accumulator over all forwards.
        """
        layers = self.layer_numbers
        agreement = RoutingAgreement.from_tensor(self._pass_agreement.as_tensor(), layers)
        if self._on_forward is None:
            for index in range(self._num_forwards()):
                agreement.add_forward(self._stack_forward(index), layers)
        return agreement

    def _predictor_losses(self) -> dict[str, float]:
        losses = [loss for r in self.routers for loss in r.predictor_losses]
        if self.routers and not losses:
            raise RuntimeError("metrics(): the predictors trained in no forward of this pass")
        out = {}
        if losses:
            out["predictor/loss"] = sum(losses) / len(losses)
        for router in self.routers:
            values = router.predictor_losses
            out[f"predictor/loss/layer_{router.route_layer_number}"] = sum(values) / len(values)
        out.update(self._predictive_accuracy())
        return out

    def _predictive_accuracy(self) -> dict[str, float]:
        """The predictive top-k accuracy on the cached tokens this pass trained on.

        ``predictor/topk_accuracy``: overlap of TopK(z_old + Δ) with TopK(z_cur) (the
        reference's ``predictive_topk_accuracy``); ``predictor/topk_accuracy_plain``: the same
        for TopK(z_old); overall (token-weighted over this rank's routers) and per layer.
        """
        out: dict[str, float] = {}
        total = torch.zeros(3)
        for router in self.routers:
            sums = sum(router.predictor_accuracy, torch.zeros(3))
            total += sums
            if sums[2] > 0:
                n = router.route_layer_number
                out[f"predictor/topk_accuracy/layer_{n}"] = float(sums[0] / sums[2])
                out[f"predictor/topk_accuracy_plain/layer_{n}"] = float(sums[1] / sums[2])
        if total[2] > 0:
            out["predictor/topk_accuracy"] = float(total[0] / total[2])
            out["predictor/topk_accuracy_plain"] = float(total[1] / total[2])
        return out
