"""Hugging Face checkpoints loaded into the Megatron GPT-MoE give transformers' logits.

Tiny randomly initialised Qwen3-MoE, OLMoE, DeepSeek-V3 (low-rank q, group-limited routing,
expert bias, shared experts, a dense first layer; with and without YaRN) and Moonlight-like
(full-rank q, one group) models are built from their config classes (no download), saved with
``save_pretrained`` (safetensors, one tensor per expert, the on-disk layout of the real
checkpoints), loaded with ``load_hf_checkpoint`` and run on the same tokens: the same experts
in every layer, the same logits within 1e-4 (fp32). Also: the in-memory state dict of
transformers 5 (fused experts), DeepSeek's ``rope_interleave=False`` with its row permutation
(and a negative control without it), MTP layers skipped with a note, block-FP8 weights
dequantised, the config check, and every unsupported config rejected naming its key.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from support.hf_models import (  # noqa: E402
    BATCH,
    CONFIGS,
    SEQ,
    YARN,
    build_hf,
    deepseek_v3_config,
    hf_logits,
    megatron_logits,
    tiny_hf,
    token_ids,
)

from pr2_megatron.models.hf import (  # noqa: E402
    ConversionError,
    ConversionNote,
    check_model_config,
    convert_hf_state_dict,
    load_hf_checkpoint,
    load_hf_weights,
    moe_config_from_hf,
    read_hf_checkpoint,
)

pytestmark = pytest.mark.usefixtures("megatron_single")

MLA = ("deepseek_v3", "deepseek_v3_yarn", "moonlight")


def _skip_unbuildable(name):
    """A full-rank-q MLA with q norm needs TE on megatron-core >= 0.19 (builder rejects it)."""
    from pr2_megatron.routing.compat import megatron_features

    if name == "moonlight" and megatron_features().mla_full_rank_q_fuses_q_norm:
        pytest.skip("full-rank-q MLA with q/kv norms needs Transformer Engine on this core")


def _hf_routes(hf, ids):
    """Experts chosen by each HF MoE layer, as ``[S*B, layers, k]`` in Megatron's [S, B] order."""
    chosen = []
    hooks = []
    for layer in hf.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is None or not hasattr(gate, "top_k"):
            continue  # a dense layer
        hooks.append(gate.register_forward_hook(lambda _m, _i, out: chosen.append(out[2])))
    logits = hf_logits(hf, ids)
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
    logits = megatron_logits(model, ids)
    return logits, ctl.collect_routes()[0]


def _predictors(model):
    from pr2_megatron.routing.predictor import is_predictor_parameter

    return [p for p in model.parameters() if is_predictor_parameter(p)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_converted_checkpoint_gives_hf_logits_and_routes(name, tmp_path):
    _skip_unbuildable(name)
    hf = tiny_hf(name)
    ids = token_ids()
    hf_out, hf_routes = _hf_routes(hf, ids)

    hf.save_pretrained(tmp_path)
    hf_config, hf_state = read_hf_checkpoint(tmp_path)
    assert any(".experts.0.gate_proj.weight" in key for key in hf_state)  # per-expert on disk
    model_cfg = moe_config_from_hf(hf_config)
    model = _megatron(model_cfg)
    report = load_hf_checkpoint(model, model_cfg, tmp_path)
    logits, routes = _megatron_forward(model, ids)

    assert report.tensors_read == len(hf_state) and report.notes == []
    assert routes.shape == hf_routes.shape
    assert torch.equal(routes.sort(dim=-1).values, hf_routes.sort(dim=-1).values)
    torch.testing.assert_close(logits, hf_out, rtol=1e-5, atol=1e-4)
    assert all(torch.count_nonzero(p) == 0 for p in _predictors(model))  # PR2 starts at zero
    if name in MLA:  # the bias buffer was loaded, not left at zero
        bias = dict(model.named_buffers())["decoder.layers.1.mlp.router.expert_bias"]
        hf_bias = hf.model.layers[1].mlp.gate.e_score_correction_bias
        assert torch.equal(bias, hf_bias) and torch.count_nonzero(bias) > 0

    # transformers 5 keeps fused experts in memory; they convert to the same model.
    fused_state = hf.state_dict()
    assert any(key.endswith("experts.gate_up_proj") for key in fused_state)
    model2 = _megatron(model_cfg)
    load_hf_weights(model2, model_cfg, fused_state, hf_config)
    assert torch.equal(megatron_logits(model2, ids), logits)


def test_config_mapping():
    qwen = moe_config_from_hf(tiny_hf("qwen3_moe").config)
    assert (qwen.qk_norm, qwen.pre_softmax, qwen.head_dim, qwen.num_query_groups) == (
        "head",
        False,
        32,
        2,
    )
    assert qwen.rotary_base == 1e6 and qwen.norm_epsilon == 1e-6
    dense = moe_config_from_hf(CONFIGS["qwen3_moe_dense_tied"]())
    assert dense.moe_layer_freq == [0, 1, 1] and dense.tie_embeddings and dense.pre_softmax
    olmoe = moe_config_from_hf(CONFIGS["olmoe"]())
    assert (olmoe.qk_norm, olmoe.pre_softmax, olmoe.head_dim) == ("projection", True, None)
    ds = moe_config_from_hf(CONFIGS["deepseek_v3"]())
    assert ds.multi_latent_attention and ds.enable_expert_bias and ds.score_function == "sigmoid"
    assert (ds.num_groups, ds.group_topk, ds.topk_scaling_factor) == (4, 2, 2.5)
    assert (ds.q_lora_rank, ds.kv_lora_rank, ds.qk_head_dim, ds.qk_pos_emb_head_dim) == (
        48,
        32,
        16,
        8,
    )
    assert ds.moe_layer_freq == [0, 1, 1] and ds.shared_expert_ffn_hidden_size == 48
    assert ds.yarn_scaling_factor is None
    yarn = moe_config_from_hf(CONFIGS["deepseek_v3_yarn"]())
    assert (yarn.yarn_scaling_factor, yarn.yarn_original_max_position_embeddings) == (4.0, 16)
    assert (yarn.yarn_mscale, yarn.yarn_mscale_all_dim) == (1.0, 1.0)
    moon = moe_config_from_hf(CONFIGS["moonlight"]())
    assert moon.q_lora_rank is None and (moon.num_groups, moon.group_topk) == (None, None)


def test_transformers4_config_json_spelling():
    """A DeepSeek-V3 config.json as released (rope_theta + rope_scaling 'type', scoring_func,
    FP8 quantization_config) maps like transformers 5's rope_parameters."""
    five = deepseek_v3_config(yarn=True).to_dict()
    four = {k: v for k, v in five.items() if k != "rope_parameters"}
    # transformers 4: rope_theta at the top level, the scaling's kind under "type".
    scaling = {k: v for k, v in YARN.items() if k not in ("rope_type", "rope_theta")}
    four.update(
        rope_theta=YARN["rope_theta"],
        rope_scaling={"type": YARN["rope_type"], **scaling},
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        moe_layer_freq=1,
    )
    assert moe_config_from_hf(four) == moe_config_from_hf(five)


def _reject(config, match):
    with pytest.raises(ConversionError, match=match):
        moe_config_from_hf(config)


def test_unsupported_configs_are_rejected_naming_the_key():
    olmoe = CONFIGS["olmoe"]().to_dict()
    _reject({**olmoe, "clip_qkv": 8.0}, "clip_qkv")
    _reject({**olmoe, "attention_bias": True}, "attention_bias")
    _reject({**olmoe, "model_type": "mixtral"}, "model_type")
    ds = CONFIGS["deepseek_v3"]().to_dict()
    # Megatron scores a group by its top topk // topk_group experts, HF by its top 2.
    _reject({**ds, "num_experts_per_tok": 3}, "topk_group")
    _reject({**ds, "norm_topk_prob": False}, "norm_topk_prob")
    _reject({**ds, "scoring_func": "softmax"}, "scoring_func")
    _reject({**ds, "n_shared_experts": 0}, "n_shared_experts")
    _reject({**ds, "moe_layer_freq": 2}, "moe_layer_freq")
    yarn = CONFIGS["deepseek_v3_yarn"]().to_dict()
    rope = yarn["rope_parameters"]
    _reject({**yarn, "rope_parameters": {**rope, "beta_fast": 64}}, "beta_fast")
    _reject({**yarn, "rope_parameters": {**rope, "mscale": 0.0}}, "mscale")
    _reject({**yarn, "rope_parameters": {**rope, "attention_factor": 1.2}}, "attention_factor")
    _reject({**yarn, "rope_parameters": {**rope, "rope_type": "linear"}}, "linear")
    # Group-limited routing that selects every group is no restriction: accepted.
    assert moe_config_from_hf({**ds, "topk_group": 4, "num_experts_per_tok": 3}).num_groups is None


def test_incomplete_or_extra_tensors_are_rejected():
    hf = tiny_hf("olmoe")
    model_cfg = moe_config_from_hf(hf.config)
    state = dict(hf.state_dict())
    with pytest.raises(ConversionError, match="no place"):
        convert_hf_state_dict(
            {**state, "model.layers.0.mlp.shared_expert.weight": state["model.norm.weight"]},
            model_cfg,
        )
    del state["model.layers.1.self_attn.k_norm.weight"]
    with pytest.raises(ConversionError, match="k_norm.weight' is missing"):
        convert_hf_state_dict(state, model_cfg)


def test_run_config_must_match_the_checkpoint(tmp_path):
    hf = tiny_hf("deepseek_v3")
    hf.save_pretrained(tmp_path)
    model_cfg = moe_config_from_hf(hf.config)
    model = _megatron(model_cfg)
    wrong = moe_config_from_hf(hf.config, hidden_size=128, num_groups=8, group_topk=4)
    with pytest.raises(ConversionError, match=r"model\.hidden_size: the run has 128") as error:
        load_hf_checkpoint(model, wrong, tmp_path)
    assert "model.num_groups: the run has 8" in str(error.value)
    # Run-side keys and equivalent spellings are no mismatch.
    same = moe_config_from_hf(
        hf.config,
        params_dtype="bf16",
        recompute_granularity="full",
        max_sequence_length=32,
        token_dispatcher="allgather",
        moe_layer_freq=[0, 1, 1],
        topk_scaling_factor=2.5,
    )
    check_model_config(same, model_cfg)
    moon = moe_config_from_hf(CONFIGS["moonlight"]())
    check_model_config(moon, moe_config_from_hf(CONFIGS["moonlight"](), num_groups=1, group_topk=1))


# ------------------------------------------------------------------ DeepSeek's rope layout
def test_rope_interleave_false_is_permuted_and_needed(tmp_path):
    hf = build_hf(deepseek_v3_config(rope_interleave=False))
    ids = token_ids()
    reference = hf_logits(hf, ids)
    hf.save_pretrained(tmp_path)
    hf_config, hf_state = read_hf_checkpoint(tmp_path)
    assert hf_config["rope_interleave"] is False
    model_cfg = moe_config_from_hf(hf_config)
    model = _megatron(model_cfg)
    load_hf_checkpoint(model, model_cfg, tmp_path)
    torch.testing.assert_close(megatron_logits(model, ids), reference, rtol=1e-5, atol=1e-4)
    # Negative control: the same weights taken as interleaved (no permutation) are wrong.
    load_hf_weights(model, model_cfg, hf_state, {**hf_config, "rope_interleave": True})
    assert (megatron_logits(model, ids) - reference).abs().max() > 0.1


# ------------------------------------------------------------------ MTP layers and FP8
def _with_mtp_layer(directory, hf):
    """The checkpoint plus DeepSeek-V3's MTP layer ``model.layers.{num_layers}.*``."""
    from safetensors.torch import load_file, save_file

    layers = hf.config.num_hidden_layers
    state = load_file(directory / "model.safetensors")
    extra = {
        k.replace(f"model.layers.{layers - 1}.", f"model.layers.{layers}."): v.clone()
        for k, v in state.items()
        if k.startswith(f"model.layers.{layers - 1}.")
    }
    hidden = hf.config.hidden_size
    extra[f"model.layers.{layers}.eh_proj.weight"] = torch.zeros(hidden, 2 * hidden)
    extra[f"model.layers.{layers}.enorm.weight"] = torch.ones(hidden)
    save_file({**state, **extra}, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (directory / "config.json").write_text(json.dumps(config))
    return len(extra)


def test_mtp_layers_are_skipped_with_a_note(tmp_path):
    hf = tiny_hf("deepseek_v3")
    ids = token_ids()
    hf.save_pretrained(tmp_path)
    extra = _with_mtp_layer(tmp_path, hf)
    model_cfg = moe_config_from_hf(hf.config)
    model = _megatron(model_cfg)
    with pytest.warns(ConversionNote, match="multi-token-prediction"):
        report = load_hf_checkpoint(model, model_cfg, tmp_path)
    assert f"skipped {extra} tensors" in report.notes[0] and "[3]" in report.notes[0]
    torch.testing.assert_close(megatron_logits(model, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)


def _fp8_blocks(weight, block):
    """(FP8 weight, float32 scale_inv) with one scale per ``block`` (DeepSeek-V3's format)."""
    rows, cols = weight.shape
    br, bc = block
    scale = torch.ones(-(-rows // br), -(-cols // bc))
    quantized = torch.empty_like(weight)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = weight[i * br : (i + 1) * br, j * bc : (j + 1) * bc]
            scale[i, j] = tile.abs().max().clamp(min=1e-12) / 448.0
            quantized[i * br : (i + 1) * br, j * bc : (j + 1) * bc] = tile / scale[i, j]
    return quantized.to(torch.float8_e4m3fn), scale


def test_fp8_block_weights_are_dequantised(tmp_path):
    from safetensors.torch import load_file, save_file

    from pr2_megatron.models.hf.read import dequantize_fp8_blocks

    hf = tiny_hf("deepseek_v3")
    ids = token_ids()
    hf.save_pretrained(tmp_path)
    block = (16, 16)
    state = load_file(tmp_path / "model.safetensors")
    quantized, dequantized = {}, {}
    for key, value in state.items():
        # as released: the linear weights of the layers are FP8, embeddings/norms/router not
        if key.startswith("model.layers.") and key.endswith("proj.weight") and value.dim() == 2:
            weight, scale = _fp8_blocks(value, block)
            quantized[key], quantized[key + "_scale_inv"] = weight, scale
            dequantized[key] = dequantize_fp8_blocks(weight, scale, block, key)
        else:
            quantized[key] = value
    save_file(quantized, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    # The reference: transformers with the dequantised weights.
    hf.load_state_dict({**hf.state_dict(), **_fused(dequantized, hf)}, strict=True)
    rounded = [(dequantized[k] - state[k]).abs().max() for k in dequantized]
    assert max(rounded) > 1e-3  # FP8 really rounded
    model_cfg = moe_config_from_hf(config)
    model = _megatron(model_cfg)
    with pytest.warns(ConversionNote, match="dequantised"):
        report = load_hf_checkpoint(model, model_cfg, tmp_path)
    assert report.dequantized == len(dequantized)
    torch.testing.assert_close(megatron_logits(model, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)


def _fused(per_expert, hf):
    """Per-expert on-disk tensors -> transformers 5's in-memory fused names (for the reference)."""
    out = dict(per_expert)
    for i, layer in enumerate(hf.model.layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            continue
        prefix = f"model.layers.{i}.mlp.experts."
        count = experts.gate_up_proj.shape[0]
        gate_up = [
            torch.cat(
                [out.pop(f"{prefix}{e}.gate_proj.weight"), out.pop(f"{prefix}{e}.up_proj.weight")]
            )
            for e in range(count)
        ]
        out[prefix + "gate_up_proj"] = torch.stack(gate_up)
        out[prefix + "down_proj"] = torch.stack(
            [out.pop(f"{prefix}{e}.down_proj.weight") for e in range(count)]
        )
    return out


def test_fp8_errors_name_the_tensor(tmp_path):
    from safetensors.torch import save_file

    from pr2_megatron.models.hf.read import SafetensorsCheckpoint

    weight = torch.randn(4, 4).to(torch.float8_e4m3fn)
    save_file({"w.weight": weight}, tmp_path / "a.safetensors")
    with pytest.raises(ConversionError, match="w.weight: FP8 tensor without"):
        SafetensorsCheckpoint([tmp_path / "a.safetensors"], fp8_block=(2, 2))["w.weight"]
    save_file(
        {"w.weight": weight, "w.weight_scale_inv": torch.ones(3, 2)}, tmp_path / "a.safetensors"
    )
    checkpoint = SafetensorsCheckpoint([tmp_path / "a.safetensors"], fp8_block=(2, 2))
    assert list(checkpoint) == ["w.weight"]  # the scale is no tensor of its own
    with pytest.raises(ConversionError, match="w.weight_scale_inv: shape"):
        checkpoint["w.weight"]
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "deepseek_v3", "quantization_config": {"quant_method": "gptq"}})
    )
    with pytest.raises(ConversionError, match="quant_method='gptq'"):
        read_hf_checkpoint(tmp_path)


def test_command_prints_the_model_section_of_a_run_config(tmp_path, capsys):
    import yaml

    from pr2_megatron.models import MoEModelConfig
    from pr2_megatron.models.hf.__main__ import main

    hf = tiny_hf("deepseek_v3_yarn")
    hf.save_pretrained(tmp_path)
    assert main(["config", str(tmp_path)]) == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["hf_checkpoint"] == str(tmp_path)
    check_model_config(MoEModelConfig(**model), moe_config_from_hf(hf.config))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "norm_topk_prob": False}))
    assert main(["config", str(tmp_path)]) == 1
    assert "norm_topk_prob=False" in capsys.readouterr().err
