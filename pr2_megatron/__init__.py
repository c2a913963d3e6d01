"""Predictive Routing Replay (PR2) for reinforcement learning on MoE LLMs, built into Megatron-core.

The library (what a Megatron training stack imports):

* :mod:`pr2_megatron.routing`: the PR2 router and predictor as Megatron layer specs, and the
  :class:`~pr2_megatron.routing.RoutingController` that switches their phases;
* :mod:`pr2_megatron.routes`: route tables and the :class:`~pr2_megatron.routes.RoutePath`
  from rollout capture to every training forward's targets, in any layout;
* :mod:`pr2_megatron.metrics`: routing agreement and log-prob mismatch;
* :mod:`pr2_megatron.models`: a GPT-MoE builder, sizes and Hugging Face conversion;
* :mod:`pr2_megatron.runtime`: parallel state, the CPU bring-up, the GPU stack;
* :class:`pr2_megatron.errors.RouteError`: every bad-route error.

The reference trainer built on it: :mod:`pr2_megatron.rl` (``pr2-train``, ``pr2-compare``).

``import pr2_megatron`` stays light (no torch, no Megatron); the names below are imported on
first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_PUBLIC = {
    "PR2Router": "pr2_megatron.routing.router",
    "PR2RouterConfig": "pr2_megatron.routing.router",
    "RoutingPhase": "pr2_megatron.routing.router",
    "RoutingController": "pr2_megatron.routing.controller",
    "param_groups": "pr2_megatron.routing.optimizer",
    "pr2_decoder_block_spec": "pr2_megatron.routing.specs",
    "with_router": "pr2_megatron.routing.specs",
    "RoutePath": "pr2_megatron.routes.path",
    "MicroBatch": "pr2_megatron.routes.path",
    "RouteGroups": "pr2_megatron.routes.path",
    "RouteTable": "pr2_megatron.routes.table",
    "RouteError": "pr2_megatron.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'pr2_megatron' has no attribute {name!r}")
