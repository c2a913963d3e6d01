"""Build a GPT-MoE (Megatron ``GPTModel``) with the PR2 router from one config dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import torch

from pr2_megatron.parallel import ParallelConfig
from pr2_megatron.router import PR2RouterConfig

RouterKind = Literal["pr2", "topk"]


@dataclass
class MoEModelConfig:
    """Architecture of a GPT-MoE; defaults are a tiny model that trains on 2 CPU cores."""

    #: Transformer layers (dense and MoE).
    num_layers: int = 2
    #: Hidden size H.
    hidden_size: int = 64
    #: Attention heads (must divide hidden_size).
    num_attention_heads: int = 4
    #: Query groups for GQA (None: multi-head attention).
    num_query_groups: Optional[int] = None
    #: Dense FFN size (dense layers and shared expert default).
    ffn_hidden_size: int = 128
    #: Routed experts E.
    num_experts: int = 4
    #: Experts per token k.
    topk: int = 2
    #: FFN size of each routed expert.
    expert_ffn_hidden_size: int = 64
    #: Which layers are MoE: int N = every N-th layer from the first, or a 0/1 list per layer
    #: (DeepSeek-V3-style dense first layers: [0, 0, 0, 1, ...]).
    moe_layer_freq: Union[int, list[int]] = 1
    #: Shared expert FFN size (None: no shared expert).
    shared_expert_ffn_hidden_size: Optional[int] = None
    #: ``softmax`` (Mixtral/Qwen/OLMoE) or ``sigmoid`` (DeepSeek-V3).
    score_function: Literal["softmax", "sigmoid"] = "softmax"
    #: Softmax before top-k (Qwen3/OLMoE style) instead of over the k selected logits.
    pre_softmax: bool = True
    #: Aux-loss-free balancing bias (DeepSeek-V3), updated outside the gradient.
    enable_expert_bias: bool = False
    #: Group-limited routing: number of expert groups and groups chosen per token.
    num_groups: Optional[int] = None
    group_topk: Optional[int] = None
    #: Scale applied to the top-k gate weights.
    topk_scaling_factor: Optional[float] = None
    #: Load-balancing aux loss: type and coefficient (0 disables it).
    aux_loss_type: str = "aux_loss"
    aux_loss_coeff: float = 0.0
    #: Token dispatcher: ``alltoall`` or ``allgather`` (``flex`` on GPU with DeepEP).
    token_dispatcher: Literal["alltoall", "allgather", "flex"] = "alltoall"
    #: Vocabulary size and longest sequence.
    vocab_size: int = 64
    max_sequence_length: int = 64
    #: Parameter dtype for the model (router math stays fp32).
    params_dtype: Literal["fp32", "bf16"] = "fp32"
    #: Activation recompute: None, ``full`` or ``selective`` (with ``recompute_modules``).
    recompute_granularity: Optional[Literal["full", "selective"]] = None
    recompute_modules: list[str] = field(default_factory=lambda: ["moe"])
    #: Dropout in attention and hidden states (0 for exact replay checks).
    dropout: float = 0.0
    #: Weight init std and seed.
    init_method_std: float = 0.02

    def __post_init__(self) -> None:
        if self.topk > self.num_experts:
            raise ValueError(f"model.topk={self.topk} exceeds model.num_experts={self.num_experts}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if isinstance(self.moe_layer_freq, list) and len(self.moe_layer_freq) != self.num_layers:
            raise ValueError(
                f"model.moe_layer_freq has {len(self.moe_layer_freq)} entries for "
                f"{self.num_layers} layers"
            )

    def moe_layer_numbers(self) -> list[int]:
        """Global (1-based) layer numbers of the MoE layers."""
        if isinstance(self.moe_layer_freq, int):
            pattern = [int(i % self.moe_layer_freq == 0) for i in range(self.num_layers)]
        else:
            pattern = list(self.moe_layer_freq)
        return [i + 1 for i, is_moe in enumerate(pattern) if is_moe]


def transformer_config(model: MoEModelConfig, parallel: ParallelConfig):
    """Megatron ``TransformerConfig`` for ``model`` under ``parallel``."""
    from megatron.core.transformer.transformer_config import TransformerConfig

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
    return TransformerConfig(
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
        moe_router_dtype="fp32",
        moe_token_dispatcher_type=model.token_dispatcher,
        moe_grouped_gemm=False,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
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
        gated_linear_unit=False,
        normalization="RMSNorm",
        use_cpu_initialization=True,
        perform_initialization=True,
        bias_dropout_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        **recompute,
    )


def build_gpt_moe(
    model: MoEModelConfig,
    parallel: ParallelConfig,
    pr2: Optional[PR2RouterConfig] = None,
    router: RouterKind = "pr2",
    use_transformer_engine: Optional[bool] = None,
    vp_stage: Optional[int] = None,
):
    """A Megatron ``GPTModel`` with the PR2 router (``router='pr2'``) or stock ``TopKRouter``.

    Call after :func:`pr2_megatron.parallel.initialize_parallel`. The pipeline stage is read
    from Megatron's parallel state; with VPP pass ``vp_stage``.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.moe.router import TopKRouter

    from pr2_megatron.specs import pr2_decoder_block_spec

    config = transformer_config(model, parallel)
    router_builder = TopKRouter if router == "topk" else None
    block_spec = pr2_decoder_block_spec(
        config,
        pr2_config=pr2,
        use_transformer_engine=use_transformer_engine,
        router_builder=router_builder,
        vp_stage=vp_stage,
    )
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
        vp_stage=vp_stage,
    )
    if torch.cuda.is_available():
        gpt.cuda()
    return gpt
