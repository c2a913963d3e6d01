"""Tiny randomly initialised transformers MoE models, built from config (nothing downloaded).

Every architecture the converter supports, at sizes that run a forward in milliseconds:
Qwen3-MoE, OLMoE, DeepSeek-V3 (low-rank q, group-limited routing, expert bias, shared experts,
a dense first layer, optionally YaRN) and Moonlight-like (full-rank q, one expert group).
Weights are drawn so that routers make distinct choices (OLMoE initialises its router to zero)
and norms are not all ones; DeepSeek's ``e_score_correction_bias`` is random too.
"""

from __future__ import annotations

import torch

VOCAB, BATCH, SEQ = 96, 2, 12


def qwen3_config(**overrides):
    import transformers

    fields = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=80,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # 4 x 32 = 128 != hidden 64, as Qwen3-30B-A3B (32 x 128 vs 2048)
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=64,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
    )
    return transformers.Qwen3MoeConfig(**{**fields, **overrides})


def olmoe_config(**overrides):
    import transformers

    fields = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
    )
    return transformers.OlmoeConfig(**{**fields, **overrides})


YARN = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=16,
    mscale=1.0,
    mscale_all_dim=1.0,
    beta_fast=32,
    beta_slow=1,
)


def deepseek_v3_config(yarn: bool = False, **overrides):
    """DeepSeek-V3 layout: q_lora, 4 groups / 2 chosen with top-4 (4 // 2 = 2), 2 shared
    experts, routed scaling 2.5, a dense first layer; ``yarn``: YaRN factor 4."""
    import transformers

    fields = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_position_embeddings=64,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    if yarn:
        fields["rope_parameters"] = dict(YARN)
    return transformers.DeepseekV3Config(**{**fields, **overrides})


def moonlight_config(**overrides):
    """Moonlight-16B-A3B's layout: full-rank q (``q_lora_rank=None``), one expert group."""
    return deepseek_v3_config(**{"q_lora_rank": None, "n_group": 1, "topk_group": 1, **overrides})


CONFIGS = {
    # norm_topk_prob=True, GQA, per-head q/k norm, untied
    "qwen3_moe": lambda: qwen3_config(),
    # a dense first layer (mlp_only_layers), tied embeddings, no top-k renormalisation
    "qwen3_moe_dense_tied": lambda: qwen3_config(
        mlp_only_layers=[0], tie_word_embeddings=True, norm_topk_prob=False
    ),
    # q/k norm over the whole projections, norm_topk_prob=False
    "olmoe": lambda: olmoe_config(),
    # OLMoE with top-k renormalisation and GQA
    "olmoe_norm_topk_gqa": lambda: olmoe_config(norm_topk_prob=True, num_key_value_heads=2),
    # MLA with q_lora, group-limited routing, expert bias, shared experts, dense first layer
    "deepseek_v3": lambda: deepseek_v3_config(),
    # ... and YaRN (factor 4, mscale = mscale_all_dim = 1)
    "deepseek_v3_yarn": lambda: deepseek_v3_config(yarn=True),
    # full-rank q, one group
    "moonlight": lambda: moonlight_config(),
}


def randomize(model, seed: int = 0):
    """Distinct weights: matrices N(0, 0.2), vectors U(0.5, 1.5), expert bias N(0, 0.1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            else:
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
    return model


def build_hf(config, seed: int = 0):
    """The transformers model of ``config``, random weights, eager attention, eval mode."""
    import transformers

    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.config._attn_implementation = "eager"
    return randomize(model, seed).eval()


def tiny_hf(name: str, seed: int = 0):
    """The tiny model ``name`` of :data:`CONFIGS`."""
    return build_hf(CONFIGS[name](), seed)


def token_ids(seed: int = 3) -> torch.Tensor:
    """``[BATCH, SEQ]`` random token ids."""
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """``[B, S, V]`` logits of a transformers model."""
    with torch.no_grad():
        return model(ids).logits


def megatron_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """``[B, S, V]`` logits of a Megatron GPT model (eval, no grad)."""
    model.eval()
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)


def load_saved(path):
    """A saved checkpoint loaded back with transformers (fp32, eager attention)."""
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch.float32,
        attn_implementation="eager",
        local_files_only=True,
        output_loading_info=True,
    )
    problems = {kind: keys for kind, keys in info.items() if keys}  # missing, unexpected, ...
    assert not problems, f"transformers loading {path}: {problems}"
    return model.eval()


def perturb(model, scale: float = 0.05) -> None:
    """Move every parameter and persistent buffer by a deterministic, position-dependent
    factor (the same on replicas: a function of the local index and the tensor's name)."""
    from pr2_megatron.models.parameters import global_buffers

    with torch.no_grad():
        tensors = list(model.named_parameters()) + list(global_buffers(model).items())
        for name, tensor in tensors:
            if getattr(tensor, "pr2_predictor", False):
                continue  # stays at zero, as after loading
            index = torch.arange(tensor.numel(), dtype=torch.float32).reshape(tensor.shape)
            wave = torch.sin(index * 0.37 + len(name)).to(tensor.dtype)
            if name.endswith("expert_bias"):
                tensor.add_(wave * scale)
            else:
                tensor.mul_(1 + wave * scale)
