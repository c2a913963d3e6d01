"""Analytic parameter counts and a per-GPU training-memory estimate for a :class:`MoEModelConfig`.

:func:`count_parameters` gives the exact number of parameters of the Megatron ``GPTModel`` that
:func:`pr2_megatron.models.builder.build_gpt_moe` builds (a test checks it against real models at
reduced size for every routing/attention feature), split by component, and the *active*
count: the parameters one token uses (all non-expert weights, k routed experts and the shared
expert in every MoE layer, embeddings included, as Qwen3 and OLMoE report theirs).

:func:`estimate_training_memory` is the arithmetic behind the layouts in ``configs/models/``:
bf16 weights, fp32 gradients and fp32 Adam (master weights, m, v) sharded over data-parallel
ranks by Megatron's distributed optimizer, plus a coarse activation estimate.

Legend: H hidden, V vocab, E routed experts, k top-k, F dense FFN, Fe expert FFN, Fs shared
expert FFN, g = 2 for SwiGLU (gate and up matrices) else 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from pr2_megatron.models.builder import MoEModelConfig
from pr2_megatron.runtime.parallel import ParallelConfig

GIB = 1024**3


@dataclass
class ParameterCount:
    """Parameters by component; ``total`` and ``active`` are the sums."""

    #: Input embedding and output layer (one matrix when tied).
    embedding: int
    #: Attention projections and q/k (or MLA latent) norms, all layers.
    attention: int
    #: Input and pre-MLP norms of every layer and the final norm.
    norms: int
    #: FFNs of the dense layers.
    dense_mlp: int
    #: Routed experts, all of them / the k a token uses.
    routed_experts: int
    routed_experts_active: int
    #: Shared experts.
    shared_experts: int
    #: Router weights.
    routers: int
    #: PR2 evolution predictors (counted only with ``include_predictor``).
    predictors: int

    @property
    def total(self) -> int:
        """All parameters."""
        return (
            self.embedding
            + self.attention
            + self.norms
            + self.dense_mlp
            + self.routed_experts
            + self.shared_experts
            + self.routers
            + self.predictors
        )

    @property
    def active(self) -> int:
        """Parameters used by one token (k routed experts instead of E)."""
        return self.total - self.routed_experts + self.routed_experts_active

    def as_dict(self) -> dict[str, int]:
        """Every component plus ``total`` and ``active``."""
        return {**asdict(self), "total": self.total, "active": self.active}


def _mlp(model: MoEModelConfig, ffn: int) -> int:
    gates = 2 if model.activation == "swiglu" else 1
    return model.hidden_size * ffn * gates + ffn * model.hidden_size


def attention_parameters(model: MoEModelConfig) -> int:
    """Parameters of one layer's attention (projections and q/k or latent norms)."""
    hidden, heads = model.hidden_size, model.num_attention_heads
    if model.multi_latent_attention:
        q_dim = model.qk_head_dim + model.qk_pos_emb_head_dim
        norm = model.qk_norm == "head"
        if model.q_lora_rank is None:
            query = hidden * heads * q_dim
        else:
            query = hidden * model.q_lora_rank + model.q_lora_rank * heads * q_dim
            query += model.q_lora_rank if norm else 0
        kv_down = hidden * (model.kv_lora_rank + model.qk_pos_emb_head_dim)
        kv_up = model.kv_lora_rank * heads * (model.qk_head_dim + model.v_head_dim)
        kv_norm = model.kv_lora_rank if norm else 0
        out = heads * model.v_head_dim * hidden
        return query + kv_down + kv_up + kv_norm + out
    head_dim = model.head_dim or hidden // heads
    groups = model.num_query_groups or heads
    qkv = hidden * (heads + 2 * groups) * head_dim
    out = heads * head_dim * hidden
    if model.qk_norm == "head":
        qk_norm = 2 * head_dim
    elif model.qk_norm == "projection":
        qk_norm = (heads + groups) * head_dim
    else:
        qk_norm = 0
    return qkv + out + qk_norm


def count_parameters(model: MoEModelConfig, include_predictor: bool = False) -> ParameterCount:
    """Exact parameter counts of the GPT-MoE ``build_gpt_moe`` builds for ``model``.

    ``include_predictor`` adds the PR2 evolution predictors (``E × H`` per MoE layer) that a
    model built with the PR2 router holds; published sizes exclude them.
    """
    hidden = model.hidden_size
    num_moe = len(model.moe_layer_numbers())
    num_dense = model.num_layers - num_moe
    per_router = model.num_experts * hidden
    expert = _mlp(model, model.expert_ffn_hidden_size)
    shared = (
        _mlp(model, model.shared_expert_ffn_hidden_size)
        if model.shared_expert_ffn_hidden_size
        else 0
    )
    return ParameterCount(
        embedding=model.vocab_size * hidden * (1 if model.tie_embeddings else 2),
        attention=model.num_layers * attention_parameters(model),
        norms=(2 * model.num_layers + 1) * hidden,
        dense_mlp=num_dense * _mlp(model, model.ffn_hidden_size),
        routed_experts=num_moe * model.num_experts * expert,
        routed_experts_active=num_moe * model.topk * expert,
        shared_experts=num_moe * shared,
        routers=num_moe * per_router,
        predictors=num_moe * per_router if include_predictor else 0,
    )


@dataclass
class MemoryEstimate:
    """Bytes per GPU of one training rank (the heaviest pipeline stage), coarse."""

    #: Parameters held by this GPU: non-expert (TP shard of its stage) and expert (EP shard).
    dense_params: int
    expert_params: int
    #: Data-parallel sizes that shard the optimizer state of each kind.
    dense_dp: int
    expert_dp: int
    #: bf16 weights + fp32 gradients (6 bytes per held parameter).
    weights_and_grads: float
    #: fp32 master weights and Adam m, v (12 bytes per parameter / data-parallel size).
    optimizer: float
    #: Activations of the micro-batches in flight, and fp32 logits with their gradient.
    activations: float
    logits: float

    @property
    def total(self) -> float:
        """Sum of all terms, bytes."""
        return self.weights_and_grads + self.optimizer + self.activations + self.logits

    def summary(self) -> str:
        """One line in GiB."""
        return (
            f"weights+grads {self.weights_and_grads / GIB:.1f} GiB, optimizer "
            f"{self.optimizer / GIB:.1f} GiB, activations {self.activations / GIB:.1f} GiB, "
            f"logits {self.logits / GIB:.1f} GiB, total {self.total / GIB:.1f} GiB"
        )


def _activation_bytes_per_token_layer(model: MoEModelConfig, parallel: ParallelConfig, moe: bool):
    """bf16 bytes one token leaves for backward in one layer (no recompute), per GPU."""
    tp = parallel.tensor_model_parallel_size
    sp = tp if parallel.sequence_parallel else 1
    hidden = model.hidden_size
    heads = model.num_attention_heads
    if model.multi_latent_attention:
        q_dim = model.qk_head_dim + model.qk_pos_emb_head_dim
        qkv = heads * (2 * q_dim + model.v_head_dim) + model.kv_lora_rank + (model.q_lora_rank or 0)
        context = heads * model.v_head_dim
    else:
        head_dim = model.head_dim or hidden // heads
        qkv = (heads + 2 * (model.num_query_groups or heads)) * head_dim
        context = heads * head_dim
    gates = 2 if model.activation == "swiglu" else 1
    # Two norm inputs and two residuals (sequence-parallel), q/k/v and the context (TP-split).
    elements = 4 * hidden / sp + (qkv + context) / tp
    if moe:
        ffn = model.expert_ffn_hidden_size
        # Permuted tokens in and out, fc1 output and activation output, for k experts.
        elements += model.topk * (2 * hidden + ffn * (gates + 1))
        if model.shared_expert_ffn_hidden_size:
            elements += model.shared_expert_ffn_hidden_size * (gates + 1) / tp
    else:
        elements += model.ffn_hidden_size * (gates + 1) / tp
    return 2 * elements


def estimate_training_memory(
    model: MoEModelConfig,
    parallel: ParallelConfig,
    num_gpus: int,
    micro_batch_tokens: int,
    recompute: Optional[str] = None,
) -> MemoryEstimate:
    """Per-GPU bytes for training ``model`` with ``parallel`` on ``num_gpus`` GPUs.

    Assumes bf16 weights, fp32 gradients, Megatron's distributed optimizer (fp32 master
    weights and Adam moments sharded over data-parallel ranks; experts over expert-data-
    parallel ranks), ``micro_batch_tokens`` tokens per micro-batch (before CP), 1F1B pipelining
    (the first stage holds PP micro-batches) and ``recompute`` None or ``"full"`` (a layer
    keeps only its input; one layer is live at a time). Embedding and output layer are both
    charged to the heaviest stage. Activations are an estimate (no s² term: flash attention).
    """
    tp = parallel.tensor_model_parallel_size
    pp = parallel.pipeline_model_parallel_size
    cp = parallel.context_parallel_size
    ep = parallel.expert_model_parallel_size
    etp = parallel.expert_tensor_parallel_size
    dense_dp = parallel.check_world_size(num_gpus)
    expert_dp = num_gpus // (ep * etp * pp)
    counts = count_parameters(model)
    layers_per_stage = -(-model.num_layers // pp)
    stage = layers_per_stage / model.num_layers
    non_expert_layers = (
        counts.attention + counts.norms + counts.dense_mlp + counts.shared_experts + counts.routers
    )
    dense_params = int((non_expert_layers * stage + counts.embedding) / tp)
    expert_params = int(counts.routed_experts * stage / (ep * etp))
    weights_and_grads = 6.0 * (dense_params + expert_params)
    optimizer = 12.0 * (dense_params / dense_dp + expert_params / expert_dp)

    tokens = micro_batch_tokens / cp
    moe_fraction = len(model.moe_layer_numbers()) / model.num_layers
    per_layer = moe_fraction * _activation_bytes_per_token_layer(model, parallel, True) + (
        1 - moe_fraction
    ) * _activation_bytes_per_token_layer(model, parallel, False)
    sp = tp if parallel.sequence_parallel else 1
    if recompute == "full":
        stored = layers_per_stage * 2 * model.hidden_size / sp + per_layer
    else:
        stored = layers_per_stage * per_layer
    activations = tokens * stored * pp
    logits = tokens * model.vocab_size / tp * 4 * 2
    return MemoryEstimate(
        dense_params=dense_params,
        expert_params=expert_params,
        dense_dp=dense_dp,
        expert_dp=expert_dp,
        weights_and_grads=weights_and_grads,
        optimizer=optimizer,
        activations=activations,
        logits=logits,
    )
