"""Build a GPT-MoE (Megatron ``GPTModel``) with the PR2 router from one config dataclass."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from pr2_megatron.models.attention import with_attention_features
from pr2_megatron.models.config import MoEModelConfig, RouterKind
from pr2_megatron.routing.router import PR2RouterConfig
from pr2_megatron.runtime.parallel import ParallelConfig, mark_expert_parameters

if TYPE_CHECKING:
    from pr2_megatron.routing.probmoe.router import ProbMoEConfig

__all__ = ["build_gpt_moe", "transformer_config"]


def transformer_config(model: MoEModelConfig, parallel: ParallelConfig):
    """Megatron ``TransformerConfig`` for ``model`` under ``parallel``.

    With ``model.multi_latent_attention`` it is an ``MLATransformerConfig``.
    """
    from megatron.core.transformer.transformer_config import (
        MLATransformerConfig,
        TransformerConfig,
    )

    dtype = torch.bfloat16 if model.params_dtype == "bf16" else torch.float32
    recompute = {}
    if model.recompute_granularity == "full":
        recompute = dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    elif model.recompute_granularity == "selective":
        recompute = dict(
            recompute_granularity="selective", recompute_modules=list(model.recompute_modules)
        )
    config_class = MLATransformerConfig if model.multi_latent_attention else TransformerConfig
    return config_class(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        num_moe_experts=model.num_experts,
        moe_router_topk=model.topk,
        moe_ffn_hidden_size=model.expert_ffn_hidden_size,
        moe_layer_freq=model.moe_layer_freq,
        moe_shared_expert_intermediate_size=model.shared_expert_ffn_hidden_size,
        moe_router_score_function=model.score_function,
        moe_router_pre_softmax=model.pre_softmax,
        moe_router_enable_expert_bias=model.enable_expert_bias,
        moe_router_num_groups=model.num_groups,
        moe_router_group_topk=model.group_topk,
        moe_router_topk_scaling_factor=model.topk_scaling_factor,
        moe_router_load_balancing_type=model.aux_loss_type,
        moe_aux_loss_coeff=model.aux_loss_coeff,
        moe_z_loss_coeff=model.z_loss_coeff or None,  # None: Megatron skips the z-loss
        moe_router_dtype="fp32",
        moe_token_dispatcher_type=model.token_dispatcher,
        moe_grouped_gemm=False,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=parallel.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=parallel.num_layers_in_last_pipeline_stage,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        bf16=model.params_dtype == "bf16",
        pipeline_dtype=dtype,
        hidden_dropout=model.dropout,
        attention_dropout=model.dropout,
        init_method_std=model.init_method_std,
        add_bias_linear=False,
        gated_linear_unit=model.activation == "swiglu",
        activation_func=torch.nn.functional.silu
        if model.activation == "swiglu"
        else torch.nn.functional.gelu,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        kv_channels=model.head_dim,
        qk_layernorm=model.qk_norm != "none",
        use_cpu_initialization=True,
        perform_initialization=True,
        bias_dropout_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        **_mla_kwargs(model),
        **recompute,
    )


def _mla_kwargs(model: MoEModelConfig) -> dict:
    """``MLATransformerConfig`` fields for an MLA model (empty for standard attention)."""
    if not model.multi_latent_attention:
        return {}
    yarn = model.yarn_scaling_factor is not None
    return dict(
        q_lora_rank=model.q_lora_rank,
        kv_lora_rank=model.kv_lora_rank,
        qk_head_dim=model.qk_head_dim,
        qk_pos_emb_head_dim=model.qk_pos_emb_head_dim,
        v_head_dim=model.v_head_dim,
        rope_type="yarn" if yarn else "rope",
        rotary_base=model.rotary_base,
        rotary_scaling_factor=model.yarn_scaling_factor if yarn else 1.0,
        original_max_position_embeddings=model.yarn_original_max_position_embeddings,
        mscale=model.yarn_mscale,
        mscale_all_dim=model.yarn_mscale_all_dim,
        apply_rope_fusion=False,
    )


def build_gpt_moe(
    model: MoEModelConfig,
    parallel: ParallelConfig,
    pr2: Optional[PR2RouterConfig] = None,
    router: RouterKind = "pr2",
    use_transformer_engine: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    probmoe: Optional[ProbMoEConfig] = None,
):
    """A Megatron ``GPTModel`` with the PR2 router (``router='pr2'``) or stock ``TopKRouter``.

    ``router='probmoe'`` builds :class:`pr2_megatron.routing.probmoe.router.ProbMoERouter` with the
    ``probmoe`` settings (PR2 phases and replay included). Call after
    :func:`pr2_megatron.runtime.parallel.initialize_parallel`. The pipeline stage is read
    from Megatron's parallel state; with VPP pass ``vp_stage``. Routed experts are marked
    ``allreduce = False`` at every EP (``runtime.parallel.mark_expert_parameters``).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.moe.router import TopKRouter

    from pr2_megatron.routing.specs import pr2_decoder_block_spec

    config = transformer_config(model, parallel)
    if pr2 is not None and pr2.megatron_router_replay:
        # Protocol mode: Megatron's switch on, so that stacks drive the PR2 routers through it.
        config.moe_enable_routing_replay = True
    router_builder = TopKRouter if router == "topk" else None
    if router == "probmoe":
        from pr2_megatron.routing.probmoe.router import probmoe_router_builder

        router_builder = probmoe_router_builder(probmoe, pr2)
    elif probmoe is not None:
        raise ValueError(f"probmoe settings given for router={router!r}; use router='probmoe'")
    block_spec = pr2_decoder_block_spec(
        config,
        pr2_config=pr2,
        use_transformer_engine=use_transformer_engine,
        router_builder=router_builder,
        vp_stage=vp_stage,
    )
    block_spec = with_attention_features(block_spec, model, use_transformer_engine)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        position_embedding_type="rope",
        rotary_base=model.rotary_base,
        share_embeddings_and_output_weights=model.tie_embeddings,
        vp_stage=vp_stage,
    )
    # Experts reduced over the expert-data-parallel group at every EP (TP=2 at EP=1 included).
    mark_expert_parameters(gpt)
    if torch.cuda.is_available():
        gpt.cuda()
    return gpt
