"""ProbMoE (arXiv 2606.01509): experts drawn as a cardinality-constrained subset.

``subsets``: the exact subset DP (normaliser, marginals, exact sampling); ``router``:
:class:`ProbMoERouter`, a PR2 router that chooses its live subset this way.
"""

from pr2_megatron.routing.probmoe.router import ProbMoEConfig, ProbMoERouter, probmoe_router_builder

__all__ = ["ProbMoEConfig", "ProbMoERouter", "probmoe_router_builder"]
