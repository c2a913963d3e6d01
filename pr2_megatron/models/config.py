"""The architecture of a GPT-MoE in one dataclass: :class:`MoEModelConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

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
    #: Router z-loss coefficient (ST-MoE: ``coeff · mean(logsumexp(z)²)``, keeps the router's
    #: logits small; Megatron's ``moe_z_loss_coeff``). 0 disables it.
    z_loss_coeff: float = 0.0
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
    #: Start from this local Hugging Face checkpoint directory (config.json + *.safetensors:
    #: Qwen3-MoE, OLMoE, DeepSeek-V3 / Moonlight) instead of random weights; its config must
    #: match the keys above (``python -m pr2_megatron.models.hf config DIR`` prints them).
    #: Each rank reads only its shards' tensors; the PR2 predictors start at zero.
    hf_checkpoint: Optional[str] = None

    def __post_init__(self) -> None:
        if self.topk > self.num_experts:
            raise ValueError(f"model.topk={self.topk} exceeds model.num_experts={self.num_experts}")
        for name in ("aux_loss_coeff", "z_loss_coeff"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0, got {getattr(self, name)}")
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
