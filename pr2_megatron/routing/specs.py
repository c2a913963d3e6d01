"""Layer specs with the PR2 router: transform Megatron's stock specs, never patch Megatron.

``with_router`` takes any decoder block / layer spec and returns a copy whose MoE layers build
the given router through ``MoESubmodules.router``; dense layers (``moe_layer_freq``) and shared
experts are left as they are. ``pr2_decoder_block_spec`` does that for the Transformer-Engine
spec when TE is importable and for the local spec otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from pr2_megatron.routing.compat import megatron_features
from pr2_megatron.routing.router import PR2RouterConfig, pr2_router_builder


def with_router(spec, router_builder):
    """Copy of ``spec`` (block, layer or MoE spec) whose MoE layers build ``router_builder``."""
    if isinstance(spec, TransformerBlockSubmodules):
        layers = [with_router(layer, router_builder) for layer in spec.layer_specs]
        return dataclasses.replace(spec, layer_specs=layers)
    if isinstance(spec, ModuleSpec):
        if _is_moe_spec(spec):
            submodules = dataclasses.replace(spec.submodules, router=router_builder)
            return dataclasses.replace(spec, submodules=submodules)
        if spec.submodules is not None and dataclasses.is_dataclass(spec.submodules):
            mlp = getattr(spec.submodules, "mlp", None)
            if mlp is not None:
                submodules = dataclasses.replace(
                    spec.submodules, mlp=with_router(mlp, router_builder)
                )
                return dataclasses.replace(spec, submodules=submodules)
    if isinstance(spec, functools.partial) and _is_moe_builder(spec):
        # Newer cores (0.19.2) spell the MoE layer as a builder,
        # functools.partial(MoELayer, submodules=MoESubmodules(...)), instead of a ModuleSpec.
        submodules = dataclasses.replace(spec.keywords["submodules"], router=router_builder)
        keywords = {**spec.keywords, "submodules": submodules}
        return functools.partial(spec.func, *spec.args, **keywords)
    return spec


def _is_moe_builder(spec: functools.partial) -> bool:
    return (
        isinstance(spec.func, type)
        and issubclass(spec.func, MoELayer)
        and isinstance(spec.keywords.get("submodules"), MoESubmodules)
    )


def _router_of(layer_spec):
    """The router builder of a layer spec's MoE MLP, or None for a dense layer."""
    mlp = getattr(getattr(layer_spec, "submodules", None), "mlp", None)
    if isinstance(mlp, ModuleSpec) and isinstance(mlp.submodules, MoESubmodules):
        return mlp.submodules.router
    if isinstance(mlp, functools.partial) and _is_moe_builder(mlp):
        return mlp.keywords["submodules"].router
    return None


def _is_moe_spec(spec: ModuleSpec) -> bool:
    module = spec.module
    return (
        isinstance(module, type)
        and issubclass(module, MoELayer)
        and isinstance(spec.submodules, MoESubmodules)
    )


def with_norm(spec, norm_module):
    """Copy of a block spec whose layer norms (input, pre-MLP, final) are ``norm_module``."""
    layers = []
    for layer in spec.layer_specs:
        sub = layer.submodules
        replaced = {}
        for name in ("input_layernorm", "pre_mlp_layernorm", "pre_cross_attn_layernorm"):
            current = getattr(sub, name, None)
            if current is not None and _is_norm(current):
                replaced[name] = norm_module
        layers.append(dataclasses.replace(layer, submodules=dataclasses.replace(sub, **replaced)))
    return dataclasses.replace(spec, layer_specs=layers, layer_norm=norm_module)


def _is_norm(module) -> bool:
    name = getattr(module, "__name__", "") or getattr(
        getattr(module, "module", None), "__name__", ""
    )
    return "Norm" in name


def pr2_decoder_block_spec(
    config,
    pr2_config: Optional[PR2RouterConfig] = None,
    use_transformer_engine: Optional[bool] = None,
    router_builder=None,
    vp_stage: Optional[int] = None,
):
    """Megatron's GPT decoder block spec for ``config`` with the PR2 router in every MoE layer.

    ``use_transformer_engine=None`` picks the TE spec when TE is importable, else the local spec
    (on CPU with the torch norms of :mod:`pr2_megatron.runtime.cpu`, which accept sequence
    parallelism).
    ``router_builder`` overrides the router (e.g. Megatron's stock ``TopKRouter`` for baselines).
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    use_te = (
        megatron_features().have_te if use_transformer_engine is None else use_transformer_engine
    )
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, vp_stage=vp_stage)
    builder = router_builder or pr2_router_builder(pr2_config)
    block = with_router(block, builder)
    if (
        config.num_moe_experts
        and _stage_has_moe_layer(config, len(block.layer_specs), vp_stage)
        and not any(_router_of(layer) is builder for layer in block.layer_specs)
    ):
        # A spec shape with_router does not know would silently keep the stock router.
        raise RuntimeError(
            "pr2_decoder_block_spec found no MoE layer spec to give the PR2 router; the "
            "installed megatron-core spells MoE layers in a form with_router does not know"
        )
    if not use_te:
        from pr2_megatron.runtime.cpu import SequenceParallelTorchNorm

        block = with_norm(block, SequenceParallelTorchNorm)
    return block


def _stage_has_moe_layer(config, num_local_layers: int, vp_stage: Optional[int]) -> bool:
    """Whether this pipeline stage (VPP chunk) builds an MoE layer per ``moe_layer_freq``."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    if getattr(config, "pipeline_model_parallel_layout", None) is not None:
        return True  # custom layouts: keep the check
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        pattern = [int(i % freq == 0) for i in range(config.num_layers)]
    else:
        pattern = list(freq)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    return any(pattern[offset : offset + num_local_layers])
