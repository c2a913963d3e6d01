"""ProbMoE (arXiv 2606.01509): experts drawn as a cardinality-constrained subset.

``subsets``: the exact subset math (normaliser, marginals, exact sampling, SIMPLE gates) on the DP
of ``subset_dp``; ``router``: :class:`ProbMoERouter`, a PR2 router that chooses its live subset
this way. ``_reference`` keeps the previous DP for tests and benchmarks.
"""

from pr2_megatron.routing.probmoe.router import ProbMoEConfig, ProbMoERouter, probmoe_router_builder

__all__ = ["ProbMoEConfig", "ProbMoERouter", "probmoe_router_builder"]
