"""Attention features the real models need that Megatron's stock local spec lacks.

Per-head q/k RMSNorm usable with sequence parallelism (Qwen3-MoE), an RMSNorm over a token's
whole q or k projection (OLMoE), MLA's core attention with separate q/k and v head dims
(DeepSeek-V3, Moonlight) on the local spec, and self-attention that rotates each key once when
it enters a static KV cache (:class:`CachedRopeSelfAttention`: KV-cached rollout).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention

from pr2_megatron.models.config import MoEModelConfig

__all__ = [
    "CachedRopeSelfAttention",
    "DuplicatedLinear",
    "HeadQKNorm",
    "LatentNorm",
    "MLACoreAttention",
    "ProjectionQKNorm",
    "with_attention_features",
]


def with_attention_features(block_spec, model: MoEModelConfig, use_transformer_engine=None):
    """Copy of a decoder block spec with the attention features ``model`` asks for.

    * ``qk_norm='projection'`` (OLMoE): q/k norms become :class:`ProjectionQKNorm`, one RMSNorm
      over all heads of a token (Megatron's spec only has per-head q/k norms).
    * ``qk_norm='head'`` on the local spec: the torch norm of :class:`HeadQKNorm`, which accepts
      sequence parallelism and marks its weight for a TP gradient sum.
    * MLA on the local spec: :class:`MLACoreAttention` as core attention (core 0.16.1's local
      ``DotProductAttention`` does not take MLA's separate q/k and v head dims), and
      :class:`LatentNorm` for the q/kv latent norms (usable with sequence parallelism).
    * Standard self-attention becomes :class:`CachedRopeSelfAttention` (the same module outside
      a static inference context; decoding with one rotates each key once, not the whole cache
      at every step).
    """
    from pr2_megatron.routing.compat import megatron_features

    use_te = (
        megatron_features().have_te if use_transformer_engine is None else use_transformer_engine
    )
    if model.multi_latent_attention:
        if not megatron_features().have_te:
            _use_duplicated_down_projections()
        _check_mla_buildable()
        if model.q_lora_rank is None and model.qk_norm == "head" and not use_te:
            features = megatron_features()
            if features.mla_full_rank_q_fuses_q_norm:
                raise RuntimeError(
                    f"megatron-core {features.version} builds a full-rank-query MLA "
                    "(q_lora_rank=None, Moonlight) with qk_norm as a query norm fused into "
                    "linear_q_proj, a fused norm+linear only Transformer Engine provides: "
                    "without TE use model.qk_norm='none' or megatron-core 0.16.1 (which builds "
                    "no query norm there)"
                )
    layers = []
    for layer in block_spec.layer_specs:
        attention = layer.submodules.self_attention
        replaced = {}
        if model.multi_latent_attention:
            if not use_te:
                replaced["core_attention"] = MLACoreAttention
                # Megatron's torch-norm fallback refuses sequence parallelism; under SP each
                # TP rank normalises its own tokens' latents with the replicated weight.
                if model.qk_norm != "none":  # "none": Megatron's IdentityOp stays
                    replaced["q_layernorm"] = LatentNorm
                    replaced["kv_layernorm"] = LatentNorm
                if not megatron_features().have_te:
                    replaced["linear_q_down_proj"] = DuplicatedLinear
                    replaced["linear_kv_down_proj"] = DuplicatedLinear
        elif model.qk_norm == "projection":
            replaced["q_layernorm"] = _projection_norm_spec("query")
            replaced["k_layernorm"] = _projection_norm_spec("key")
        elif model.qk_norm == "head" and not use_te:
            replaced["q_layernorm"] = HeadQKNorm
            replaced["k_layernorm"] = HeadQKNorm
        module = {}
        if attention.module is SelfAttention:
            module["module"] = CachedRopeSelfAttention
        if replaced or module:
            if replaced:
                submodules = dataclasses.replace(attention.submodules, **replaced)
                attention = dataclasses.replace(attention, submodules=submodules)
            attention = dataclasses.replace(attention, **module)
            layer = dataclasses.replace(
                layer, submodules=dataclasses.replace(layer.submodules, self_attention=attention)
            )
        layers.append(layer)
    return dataclasses.replace(block_spec, layer_specs=layers)


def _projection_norm_spec(role: Literal["query", "key"]):
    from megatron.core.transformer.spec_utils import ModuleSpec

    return ModuleSpec(module=ProjectionQKNorm, params={"role": role})


def _check_mla_buildable() -> None:
    """Fail clearly where core 0.16.1 cannot build ``MLASelfAttention`` (no TE, CPU).

    Without Transformer Engine, ``megatron.core.extensions.transformer_engine`` still imports
    and leaves ``TELinear`` as a ``MagicMock`` instance, so ``MLASelfAttention.__init__``'s
    ``isinstance(self.linear_proj, TELinear)`` raises ``TypeError``.
    :func:`_use_duplicated_down_projections` (run first without TE) sets it to
    :class:`DuplicatedLinear`, so this only fires where something else replaced it.
    """
    from megatron.core.transformer import multi_latent_attention

    te_linear = getattr(multi_latent_attention, "TELinear", None)
    if getattr(multi_latent_attention, "HAVE_TE", False) and not isinstance(te_linear, type):
        raise RuntimeError(
            "megatron-core cannot build multi-latent attention here: Transformer Engine is not "
            "installed, but megatron.core.transformer.multi_latent_attention.TELinear is a "
            f"placeholder ({type(te_linear).__name__}), which MLASelfAttention passes to "
            "isinstance(); give it a plain class in the CPU bring-up, or use "
            "model.multi_latent_attention=false (standard attention) on CPU"
        )


class HeadQKNorm(torch.nn.RMSNorm):
    """Per-head q/k RMSNorm (Qwen3-MoE) from torch, usable with sequence parallelism.

    Megatron's torch-norm fallback asserts that sequence parallelism is off. The weight is
    replicated over TP while each TP rank normalises only its own heads, so its gradient is a
    sum over TP: it is marked ``sequence_parallel`` (the attribute Megatron and
    :func:`pr2_megatron.runtime.parallel.average_gradients` use for a TP all-reduce) when TP > 1.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.tensor_model_parallel_size > 1


class LatentNorm(HeadQKNorm):
    """MLA's RMSNorm of the q and kv latents (DeepSeek-V3, Moonlight) on the local spec.

    Under sequence parallelism each TP rank holds ``[s / TP, b, rank]`` latents and normalises
    its own tokens with the replicated weight, so the weight's gradient is a sum over TP: the
    same torch norm and ``sequence_parallel`` mark as :class:`HeadQKNorm` (Megatron's torch-norm
    fallback asserts that SP is off). Parameter names are those of the stock norm.
    """


class DuplicatedLinear(torch.nn.Module):
    """MLA's q/kv down projections on the local spec: one linear replicated over TP.

    Transformer Engine builds them as ``TELinear(parallel_mode='duplicated')``: under sequence
    parallelism each TP rank projects its own tokens, and the rotary key part is all-gathered
    with a reduce-scatter backward. Megatron's local alternative, a ``ColumnParallelLinear``
    whose output is gathered over TP, gives a wrong input gradient under TP > 1: every TP rank
    applies the rotary key to its own heads, and the gather's backward keeps only the rank's
    slice of that partial gradient (the other ranks' heads' share is dropped). This module
    takes TE's place (megatron-core's ``multi_latent_attention.TELinear`` is set to it when TE
    is absent: :func:`_use_duplicated_down_projections`). The weight is replicated over TP, its
    gradient a sum over TP (``sequence_parallel``); checkpoints see a replicated tensor.
    TP > 1 without sequence parallelism (which the MoE trainer refuses) gives the right forward,
    but the rotary-key part of the input gradient is then only the rank's heads' share.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config,
        init_method,
        bias: bool,
        skip_bias_add: bool = False,
        **_unused,
    ) -> None:
        super().__init__()
        tp = config.tensor_model_parallel_size
        self.weight = torch.nn.Parameter(
            torch.empty(output_size, input_size, dtype=config.params_dtype)
        )
        if config.perform_initialization:
            init_method(self.weight)
        self.bias = None
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(output_size, dtype=config.params_dtype))
        self.skip_bias_add = skip_bias_add
        for param in (self.weight, self.bias):
            if param is not None:
                param.sequence_parallel = tp > 1

    def forward(self, input_):
        """``(output, bias)``: the bias is returned separately with ``skip_bias_add``."""
        bias = None if self.skip_bias_add else self.bias
        output = torch.nn.functional.linear(input_, self.weight, bias)
        return output, self.bias if self.skip_bias_add else None


def _use_duplicated_down_projections() -> None:
    """Without TE, make megatron-core's MLA treat :class:`DuplicatedLinear` as its TELinear.

    ``MLASelfAttention`` picks the duplicated layout for a down projection whose class is
    ``TELinear`` (core 0.16.1 leaves a ``MagicMock`` there without TE, which also breaks its
    ``isinstance`` check; 0.19 leaves None). No TE module exists in such a process.
    """
    from megatron.core.transformer import multi_latent_attention

    multi_latent_attention.TELinear = DuplicatedLinear


class ProjectionQKNorm(torch.nn.Module):
    """RMSNorm over a token's whole query or key projection (all heads), as OLMoE does.

    Built by Megatron's attention with ``hidden_size`` = head dim; it normalises the
    ``[s, b, heads, head_dim]`` tensor over ``heads × head_dim``. Under TP each rank holds its
    heads' slice of the weight (``tensor_model_parallel``, partition dim 0) and the sum of
    squares is all-reduced over the TP group (autograd-aware), so the result equals the
    unsharded norm.
    """

    def __init__(
        self,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        role: Literal["query", "key"] = "query",
        **_unused,
    ) -> None:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        super().__init__()
        heads = config.num_attention_heads
        if role == "key":
            heads = config.num_query_groups or config.num_attention_heads
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        if heads % tp_size:
            raise ValueError(f"{heads} {role} heads do not split over TP={tp_size}")
        self.eps = eps
        self.full_width = heads * hidden_size
        self.tp_group = parallel_state.get_tensor_model_parallel_group() if tp_size > 1 else None
        local = heads // tp_size * hidden_size
        self.weight = torch.nn.Parameter(torch.ones(local, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``[s, b, heads, head_dim]`` over its last two dimensions (all TP ranks)."""
        flat = x.reshape(*x.shape[:-2], -1).float()
        square_sum = flat.pow(2).sum(-1, keepdim=True)
        if self.tp_group is not None:
            from torch.distributed.nn.functional import all_reduce

            square_sum = all_reduce(square_sum, group=self.tp_group)
        normed = flat * torch.rsqrt(square_sum / self.full_width + self.eps)
        return (self.weight * normed.to(x.dtype)).reshape(x.shape)


class MLACoreAttention(DotProductAttention):
    """Megatron's local ``DotProductAttention`` with MLA's separate q/k and v head dims.

    MLA builds its core attention with ``k_channels`` (qk_head_dim + qk_pos_emb_head_dim) and
    ``v_channels`` (v_head_dim); the local class takes neither in core 0.16.1. The score and
    softmax math are the base class's (shape-generic); only the output width is
    ``heads × v_channels``.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, **kwargs) -> None:
        kwargs.pop("k_channels", None)
        v_channels = kwargs.pop("v_channels", None)
        super().__init__(config, layer_number, attn_mask_type, attention_type, **kwargs)
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition


class CachedRopeSelfAttention(SelfAttention):
    """Megatron's ``SelfAttention``; in a static KV cache each key is rotated once, on entry.

    Under ``StaticInferenceContext`` megatron-core caches keys *before* RoPE and rotates the
    whole cache ``[:offset + s]`` in every forward: O(S) elementwise work per layer and decoding
    step, more than half of a decoding step at S = 2048 on CPU (docs/performance.md). Here the
    new keys are rotated with their own positions' embedding before they are cached (the same
    ``apply_rotary_pos_emb``, elementwise, so the same numbers) and the cached keys are used
    as they are. Everything else -- training, forwards without an inference context, the
    dynamic context, flash decoding, context parallelism -- is the stock module's code path.
    """

    def _adjust_key_value_for_inference(
        self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs
    ):
        if not self._rotates_on_entry(inference_context, rotary_pos_emb):
            return super()._adjust_key_value_for_inference(
                inference_context, query, key, value, rotary_pos_emb, *args, **kwargs
            )
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
        from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
            _yarn_get_concentration_factor_from_config,
        )

        start = inference_context.sequence_len_offset
        key = apply_rotary_pos_emb(
            key,
            rotary_pos_emb[1][start : start + key.shape[0]],
            config=self.config,
            mscale=_yarn_get_concentration_factor_from_config(self.config),
            cp_group=self.pg_collection.cp,
        )
        query, key, value, rotary_pos_emb, mask_type, block_table = (
            super()._adjust_key_value_for_inference(
                inference_context, query, key, value, rotary_pos_emb, *args, **kwargs
            )
        )
        # The cached keys are rotated already: only the query's embedding is left to apply.
        return query, key, value, (rotary_pos_emb[0], None), mask_type, block_table

    def _rotates_on_entry(self, inference_context, rotary_pos_emb) -> bool:
        cp = getattr(getattr(self, "pg_collection", None), "cp", None)
        return (
            inference_context is not None
            and inference_context.is_static_batching()
            and not self.training
            and not self.config.flash_decode
            and isinstance(rotary_pos_emb, tuple)
            and len(rotary_pos_emb) == 2
            and rotary_pos_emb[1] is not None
            and cp is not None
            and cp.size() == 1
        )
