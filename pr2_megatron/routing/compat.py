"""The one place that probes which megatron-core API is installed (0.16.1 in CI; 0.17-0.19 too).

Everything version-dependent is decided here once, with ``inspect.signature``, instead of
``hasattr`` checks scattered through the code.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class MegatronFeatures:
    """What the installed megatron-core offers that the project depends on."""

    version: str
    #: ``topk_routing_with_score_function(..., router_replay=...)``: the hook through which the
    #: PR2 router chooses experts while Megatron keeps the score function, expert bias,
    #: group-limited routing and scaling (core >= 0.16).
    topk_routing_has_router_replay: bool
    #: ``MoESubmodules.router``: the spec seam for swapping the router (core >= 0.16).
    moe_submodules_has_router: bool
    #: ``megatron.core.tensor_parallel.random.is_checkpointing``: lets a router tell the first
    #: forward of an activation-checkpointed region from its recompute in backward.
    has_is_checkpointing: bool
    #: Transformer Engine importable (GPU clusters, NGC containers).
    have_te: bool
    #: ``TopKRouter.__init__(..., is_mtp_layer=...)``: newer cores (0.19.2) build every router
    #: with this keyword from ``MoELayer``; 0.16.1 neither passes nor accepts it.
    router_init_has_is_mtp_layer: bool = False
    #: Newer cores (0.19.2, ``transformer/mla_qk_norm_config.py``) give a full-rank-query MLA
    #: (``q_lora_rank=None``, Moonlight) with ``qk_layernorm`` a query norm fused into
    #: ``linear_q_proj`` -- a fused norm+linear that only Transformer Engine provides; 0.16.1
    #: builds no query norm there.
    mla_full_rank_q_fuses_q_norm: bool = False
    #: The dropless token dispatchers of newer cores (0.17+; measured on 0.19.2) size the
    #: permuted buffer as ``tokens · topk`` and fail (``split_with_sizes``) when a token has
    #: fewer experts, so variable-size routes (ProbMoE dynamic-k) cannot be dispatched there;
    #: 0.16.1 sizes it from the routing map.
    dispatcher_needs_topk_per_token: bool = False


@lru_cache(maxsize=1)
def megatron_features() -> MegatronFeatures:
    """Probe the installed megatron-core once per process."""
    from megatron.core import package_info
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.moe import moe_layer, moe_utils
    from megatron.core.transformer.moe.router import TopKRouter

    routing_params = inspect.signature(moe_utils.topk_routing_with_score_function).parameters
    router_init_params = inspect.signature(TopKRouter.__init__).parameters
    submodule_fields = getattr(moe_layer.MoESubmodules, "__dataclass_fields__", {})
    return MegatronFeatures(
        version=package_info.__version__,
        topk_routing_has_router_replay="router_replay" in routing_params,
        moe_submodules_has_router="router" in submodule_fields,
        has_is_checkpointing=callable(getattr(mcore_random, "is_checkpointing", None)),
        have_te=_have_transformer_engine(),
        router_init_has_is_mtp_layer="is_mtp_layer" in router_init_params,
        dispatcher_needs_topk_per_token=_version_at_least(package_info.__version__, (0, 17)),
        mla_full_rank_q_fuses_q_norm=importlib.util.find_spec(
            "megatron.core.transformer.mla_qk_norm_config"
        )
        is not None,
    )


def _version_at_least(version: str, minimum: tuple[int, int]) -> bool:
    """Whether ``major.minor`` of ``version`` is at least ``minimum`` (for measured changes)."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return True  # an unparsable (development) version: assume the newer behaviour
    return (major, minor) >= minimum


def _have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        # A TE meta package without CUDA raises RuntimeError/OSError at import, not ImportError.
        return False
    return True


def require_router_seam() -> MegatronFeatures:
    """Raise a clear error when the installed megatron-core lacks what the PR2 router needs."""
    features = megatron_features()
    if not (features.topk_routing_has_router_replay and features.moe_submodules_has_router):
        raise RuntimeError(
            f"megatron-core {features.version} lacks the router seam PR2 builds on "
            "(MoESubmodules.router and topk_routing_with_score_function(router_replay=...)); "
            "megatron-core >= 0.16 is required"
        )
    return features
