"""Hugging Face Qwen3-MoE and OLMoE checkpoints loaded into the Megatron GPT-MoE give its logits.

Tiny randomly initialised ``Qwen3MoeForCausalLM`` / ``OlmoeForCausalLM`` are built from their
config classes (no download), saved with ``save_pretrained`` (safetensors, one tensor per
expert, the on-disk layout of the real checkpoints), converted, and run on the same tokens:
same experts in every layer, same logits (fp32 tolerance). The in-memory state dict of
transformers 5 (fused ``gate_up_proj`` experts) converts to the same model.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pr2_megatron.models.hf import (  # noqa: E402
    ConversionError,
    convert_hf_state_dict,
    load_hf_weights,
    moe_config_from_hf,
    read_hf_checkpoint,
)

pytestmark = pytest.mark.usefixtures("megatron_single")

VOCAB, BATCH, SEQ = 96, 2, 12


def _qwen3(**overrides):
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
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**{**fields, **overrides}))


def _olmoe(**overrides):
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
    return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**{**fields, **overrides}))


MODELS = {
    # norm_topk_prob=True, GQA, per-head q/k norm, untied
    "qwen3_moe": lambda: _qwen3(),
    # a dense first layer (mlp_only_layers), tied embeddings, no top-k renormalisation
    "qwen3_moe_dense_tied": lambda: _qwen3(
        mlp_only_layers=[0], tie_word_embeddings=True, norm_topk_prob=False
    ),
    # q/k norm over the whole projections, norm_topk_prob=False
    "olmoe": lambda: _olmoe(),
    # OLMoE with top-k renormalisation and GQA
    "olmoe_norm_topk_gqa": lambda: _olmoe(norm_topk_prob=True, num_key_value_heads=2),
}


def _random_hf(name):
    torch.manual_seed(0)
    hf = MODELS[name]()
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        for param in hf.parameters():
            # Routers included (OLMoE initialises its router to zero): distinct expert choices.
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
            else:
                param.uniform_(0.5, 1.5)
    return hf.eval()


def _hf_routes(hf, ids):
    """Experts chosen by each HF MoE layer, as ``[S*B, layers, k]`` in Megatron's [S, B] order."""
    chosen = []
    hooks = []
    for layer in hf.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is None or not hasattr(gate, "top_k"):
            continue  # a dense layer
        hooks.append(gate.register_forward_hook(lambda _m, _i, out: chosen.append(out[2])))
    with torch.no_grad():
        logits = hf(ids).logits
    for hook in hooks:
        hook.remove()
    routes = [c.reshape(BATCH, SEQ, -1).transpose(0, 1).reshape(BATCH * SEQ, -1) for c in chosen]
    return logits, torch.stack(routes, dim=1)


def _megatron(model_cfg):
    from pr2_megatron.testing.moe import TinySetup, build

    return build(TinySetup(model=model_cfg))


def _megatron_forward(model, ids):
    from pr2_megatron.routing.controller import RoutingController

    ctl = RoutingController(model)
    ctl.record()
    with torch.no_grad():
        logits = model(ids, torch.arange(SEQ).expand(BATCH, SEQ), None)
    return logits, ctl.collect_routes()[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_checkpoint_gives_hf_logits_and_routes(name, tmp_path):
    hf = _random_hf(name)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    hf_logits, hf_routes = _hf_routes(hf, ids)

    hf.save_pretrained(tmp_path)
    hf_config, hf_state = read_hf_checkpoint(tmp_path)
    assert any(".experts.0.gate_proj.weight" in key for key in hf_state)  # per-expert on disk
    model_cfg = moe_config_from_hf(hf_config)
    model = _megatron(model_cfg)
    load_hf_weights(model, model_cfg, hf_state)
    logits, routes = _megatron_forward(model, ids)

    assert routes.shape == hf_routes.shape
    assert torch.equal(routes.sort(dim=-1).values, hf_routes.sort(dim=-1).values)
    torch.testing.assert_close(logits, hf_logits, rtol=1e-5, atol=1e-4)

    # transformers 5 keeps fused experts in memory; they convert to the same model.
    fused_state = hf.state_dict()
    if any(key.endswith("experts.gate_up_proj") for key in fused_state):
        model2 = _megatron(model_cfg)
        load_hf_weights(model2, model_cfg, fused_state)
        logits2, _ = _megatron_forward(model2, ids)
        assert torch.equal(logits2, logits)


def test_config_mapping():
    qwen = moe_config_from_hf(_random_hf("qwen3_moe").config)
    assert (qwen.qk_norm, qwen.pre_softmax, qwen.head_dim, qwen.num_query_groups) == (
        "head",
        False,
        32,
        2,
    )
    assert qwen.rotary_base == 1e6 and qwen.norm_epsilon == 1e-6
    dense = moe_config_from_hf(_random_hf("qwen3_moe_dense_tied").config)
    assert dense.moe_layer_freq == [0, 1, 1] and dense.tie_embeddings and dense.pre_softmax
    olmoe = moe_config_from_hf(_random_hf("olmoe").config)
    assert (olmoe.qk_norm, olmoe.pre_softmax, olmoe.head_dim) == ("projection", True, None)


def test_unsupported_and_incomplete_checkpoints_are_rejected():
    hf = _random_hf("olmoe")
    config = hf.config.to_dict()
    with pytest.raises(ConversionError, match="clip_qkv"):
        moe_config_from_hf({**config, "clip_qkv": 8.0})
    with pytest.raises(ConversionError, match="attention_bias"):
        moe_config_from_hf({**config, "attention_bias": True})
    with pytest.raises(ConversionError, match="model_type"):
        moe_config_from_hf({**config, "model_type": "mixtral"})
    model_cfg = moe_config_from_hf(config)
    state = dict(hf.state_dict())
    with pytest.raises(ConversionError, match="no place"):
        convert_hf_state_dict(
            {**state, "model.layers.0.mlp.shared_expert.weight": state["model.norm.weight"]},
            model_cfg,
        )
    del state["model.layers.1.self_attn.k_norm.weight"]
    with pytest.raises(ConversionError, match="missing"):
        convert_hf_state_dict(state, model_cfg)
