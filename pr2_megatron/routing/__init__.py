"""Routing: the PR2 router, its evolution predictor, the layer specs, the controller.

* :class:`PR2Router` / :class:`PR2RouterConfig` (``router``): Megatron's ``TopKRouter`` with
  the predictor and recompute-safe route record / replay;
* :func:`pr2_decoder_block_spec` / :func:`with_router` (``specs``): Megatron's stock specs
  with the PR2 router in every MoE layer;
* :class:`RoutingController` (``controller``): phases, targets, recorded routes, metrics;
* :func:`param_groups` / :func:`predictor_config_overrides` (``optimizer``): the predictors'
  optimizer group (lr × α, no decay) for a torch optimizer / Megatron's ``get_megatron_optimizer``;
* ``predictor``, ``feature_cache``: the predictor ``Δ = W_p h``, its losses and token cache;
* ``probmoe``: ProbMoE routing (k-subsets) as a PR2 router;
* ``compat``: the one place that probes the installed megatron-core API.
"""

from pr2_megatron.routing.controller import RoutingController
from pr2_megatron.routing.optimizer import (
    lr_multiplier_of,
    param_groups,
    predictor_config_overrides,
)
from pr2_megatron.routing.router import PR2Router, PR2RouterConfig, RoutingPhase, pr2_router_builder
from pr2_megatron.routing.specs import pr2_decoder_block_spec, with_router

__all__ = [
    "PR2Router",
    "PR2RouterConfig",
    "RoutingController",
    "RoutingPhase",
    "lr_multiplier_of",
    "param_groups",
    "pr2_decoder_block_spec",
    "predictor_config_overrides",
    "pr2_router_builder",
    "with_router",
]
