"""Build a GPT-MoE (Megatron ``GPTModel``) with the PR2 router from one config dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Optional, Union

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention

from pr2_megatron.parallel import ParallelConfig
from pr2_megatron.router import PR2RouterConfig

if TYPE_CHECKING:
    from pr2_megatron.probmoe_router import ProbMoEConfig

RouterKind = Literal["pr2", "topk", "probmoe"]


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
    # ---- real-model features (issue 5); the defaults keep the tiny model as it was ----
    #: Attention head dimension (None: hidden_size / num_attention_heads). Qwen3-MoE: 128 with
    #: hidden 2048 and 32 heads.
    head_dim: Optional[int] = None
    #: Query/key RMSNorm: ``none``; ``head`` (per head: Qwen3-MoE; with MLA the latent q/kv
    #: norms of DeepSeek-V3/Moonlight); ``projection`` (over the whole q and k projections of a
    #: token: OLMoE).
    qk_norm: Literal["none", "head", "projection"] = "none"
    #: Epsilon of every RMSNorm (also the q/k norms).
    norm_epsilon: float = 1e-5
    #: RoPE base θ.
    rotary_base: float = 10000.0
    #: FFN activation of dense layers, experts and the shared expert: ``gelu`` (two matrices)
    #: or ``swiglu`` (SiLU-gated, three matrices: Qwen3-MoE, OLMoE, DeepSeek-V3, Moonlight).
    activation: Literal["gelu", "swiglu"] = "gelu"
    #: Share the input embedding with the output layer (False: untied, as all four real configs).
    tie_embeddings: bool = False
    #: Multi-Latent Attention (DeepSeek-V3, Moonlight) instead of (GQA) multi-head attention.
    multi_latent_attention: bool = False
    #: MLA query low rank (None: full-rank query projection, as Moonlight) and key/value low rank.
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 512
    #: MLA head dims: q/k without position, q/k rotary part, v.
    qk_head_dim: int = 128
    qk_pos_emb_head_dim: int = 64
    v_head_dim: int = 128
    #: MLA YaRN RoPE scaling factor (None: plain RoPE) and its original context length, mscale
    #: and mscale_all_dim (DeepSeek-V3: 40, 4096, 1.0, 1.0).
    yarn_scaling_factor: Optional[float] = None
    yarn_original_max_position_embeddings: int = 4096
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 0.0

    def __post_init__(self) -> None:
        if self.topk > self.num_experts:
            raise ValueError(f"model.topk={self.topk} exceeds model.num_experts={self.num_experts}")
        if (
            self.head_dim is None
            and not self.multi_latent_attention
            and self.hidden_size % self.num_attention_heads
        ):
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads} (set model.head_dim)"
            )
        if self.multi_latent_attention and self.qk_norm == "projection":
            raise ValueError(
                "model.qk_norm='projection' (OLMoE) is for standard attention; with "
                "multi_latent_attention use 'head' (the latent q/kv norms) or 'none'"
            )
        if self.yarn_scaling_factor is not None and not self.multi_latent_attention:
            raise ValueError("model.yarn_scaling_factor is only supported with MLA")
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

    ``router='probmoe'`` builds :class:`pr2_megatron.probmoe_router.ProbMoERouter` with the
    ``probmoe`` settings (PR2 phases and replay included). Call after
    :func:`pr2_megatron.parallel.initialize_parallel`. The pipeline stage is read
    from Megatron's parallel state; with VPP pass ``vp_stage``.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.moe.router import TopKRouter

    from pr2_megatron.specs import pr2_decoder_block_spec

    config = transformer_config(model, parallel)
    router_builder = TopKRouter if router == "topk" else None
    if router == "probmoe":
        from pr2_megatron.probmoe_router import probmoe_router_builder

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
    if torch.cuda.is_available():
        gpt.cuda()
    return gpt


# ------------------------------------------------------------------ attention features (issue 5)
def with_attention_features(block_spec, model: MoEModelConfig, use_transformer_engine=None):
    """Copy of a decoder block spec with the attention features ``model`` asks for.

    * ``qk_norm='projection'`` (OLMoE): q/k norms become :class:`ProjectionQKNorm`, one RMSNorm
      over all heads of a token (Megatron's spec only has per-head q/k norms).
    * ``qk_norm='head'`` on the local spec: the torch norm of :class:`HeadQKNorm`, which accepts
      sequence parallelism and marks its weight for a TP gradient sum.
    * MLA on the local spec: :class:`MLACoreAttention` as core attention (core 0.16.1's local
      ``DotProductAttention`` does not take MLA's separate q/k and v head dims).
    """
    from pr2_megatron.compat import megatron_features

    use_te = (
        megatron_features().have_te if use_transformer_engine is None else use_transformer_engine
    )
    if model.multi_latent_attention:
        _check_mla_buildable()
    layers = []
    for layer in block_spec.layer_specs:
        attention = layer.submodules.self_attention
        replaced = {}
        if model.multi_latent_attention:
            if not use_te:
                replaced["core_attention"] = MLACoreAttention
        elif model.qk_norm == "projection":
            replaced["q_layernorm"] = _projection_norm_spec("query")
            replaced["k_layernorm"] = _projection_norm_spec("key")
        elif model.qk_norm == "head" and not use_te:
            replaced["q_layernorm"] = HeadQKNorm
            replaced["k_layernorm"] = HeadQKNorm
        if replaced:
            submodules = dataclasses.replace(attention.submodules, **replaced)
            attention = dataclasses.replace(attention, submodules=submodules)
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
    ``isinstance(self.linear_proj, TELinear)`` raises ``TypeError``. A CPU bring-up that sets
    ``multi_latent_attention.TELinear`` to a plain class makes it build.
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
    :func:`pr2_megatron.parallel.average_gradients` use for a TP all-reduce) when TP > 1.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.tensor_model_parallel_size > 1


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
