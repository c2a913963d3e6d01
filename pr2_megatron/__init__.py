"""Predictive Routing Replay (PR2) for RL on Mixture-of-Experts LLMs, built into Megatron-core.

Public API (import from the submodules so that ``import pr2_megatron`` stays light):

* :class:`pr2_megatron.router.PR2Router`, :class:`pr2_megatron.router.PR2RouterConfig`
* :func:`pr2_megatron.specs.pr2_decoder_block_spec`, :func:`pr2_megatron.specs.with_router`
* :class:`pr2_megatron.api.RoutingController`, :func:`pr2_megatron.api.param_groups`
* :class:`pr2_megatron.route_table.RouteTable`
* :mod:`pr2_megatron.metrics`
"""

__version__ = "0.1.0"
