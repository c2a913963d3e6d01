"""Metrics of routing and of its effect (pure torch: CPU or GPU tensors, no Megatron).

* :mod:`pr2_megatron.metrics.agreement`: top-k overlap, zero deviation and disagreement of the
  dispatched route (and of the plain-replay route) against the live router;
* :mod:`pr2_megatron.metrics.logprob`: training vs rollout log-prob mismatch (k3 KL, extreme
  tokens, IS ratio), PPO clip fraction, predictor size.
"""

from pr2_megatron.metrics.agreement import (
    RoutingAgreement,
    routing_agreement,
    same_set,
    topk_overlap,
)
from pr2_megatron.metrics.logprob import (
    EXTREME_LOG_RATIO,
    logprob_mismatch_metrics,
    ppo_clip_fraction,
    predictor_metrics,
)

__all__ = [
    "EXTREME_LOG_RATIO",
    "RoutingAgreement",
    "logprob_mismatch_metrics",
    "ppo_clip_fraction",
    "predictor_metrics",
    "routing_agreement",
    "same_set",
    "topk_overlap",
]
