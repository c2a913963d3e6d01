"""Megatron -> Hugging Face export: transformers loads it and gives the Megatron logits.

Round trip per architecture: import a tiny checkpoint, move every weight and the expert bias
(a stand-in for training), export, load the directory with ``from_pretrained`` (no missing or
unexpected keys) and compare the logits with the Megatron model's (within 1e-4). Without a
change the export is the source checkpoint bit for bit. ``config.json`` is either the source's
(checked against the model) or generated from the model config; configs transformers cannot
express are rejected naming the key.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from support.hf_models import (  # noqa: E402
    CONFIGS,
    build_hf,
    deepseek_v3_config,
    hf_logits,
    load_saved,
    megatron_logits,
    perturb,
    tiny_hf,
    token_ids,
)

from pr2_megatron.models import MoEModelConfig  # noqa: E402
from pr2_megatron.models.hf import (  # noqa: E402
    ConversionError,
    export_hf_checkpoint,
    hf_config_from_moe,
    load_hf_checkpoint,
    moe_config_from_hf,
)

pytestmark = pytest.mark.usefixtures("megatron_single")


def _imported(name_or_hf, directory):
    from pr2_megatron.routing.compat import megatron_features
    from pr2_megatron.testing.moe import TinySetup, build

    hf = tiny_hf(name_or_hf) if isinstance(name_or_hf, str) else name_or_hf
    model_cfg = moe_config_from_hf(hf.config)
    if model_cfg.multi_latent_attention and model_cfg.q_lora_rank is None:
        if megatron_features().mla_full_rank_q_fuses_q_norm:
            pytest.skip("full-rank-q MLA with q/kv norms needs Transformer Engine on this core")
    hf.save_pretrained(directory)
    model = build(TinySetup(model=model_cfg))
    load_hf_checkpoint(model, model_cfg, directory)
    return hf, model_cfg, model


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("config_source", ["checkpoint", "generated"])
def test_round_trip_gives_the_megatron_logits(name, config_source, tmp_path):
    hf, model_cfg, model = _imported(name, tmp_path / "source")
    ids = token_ids()
    perturb(model)
    expected = megatron_logits(model, ids)
    assert (expected - hf_logits(hf, ids)).abs().max() > 1e-2  # the weights really moved
    source = tmp_path / "source" if config_source == "checkpoint" else None
    out = export_hf_checkpoint(model, model_cfg, tmp_path / "out", hf_config=source)
    files = {p.name for p in out.iterdir()}
    assert files - {"generation_config.json"} == {"config.json", "model.safetensors"}
    exported = load_saved(out)
    torch.testing.assert_close(hf_logits(exported, ids), expected, rtol=1e-5, atol=1e-4)
    if model_cfg.enable_expert_bias:  # the buffer went out too
        bias = exported.model.layers[1].mlp.gate.e_score_correction_bias
        assert not torch.equal(bias, hf.model.layers[1].mlp.gate.e_score_correction_bias)


@pytest.mark.parametrize("name", ["qwen3_moe", "olmoe", "deepseek_v3"])
def test_unchanged_model_exports_the_source_bit_for_bit(name, tmp_path):
    from safetensors.torch import load_file

    _, model_cfg, model = _imported(name, tmp_path / "source")
    out = export_hf_checkpoint(model, model_cfg, tmp_path / "out", hf_config=tmp_path / "source")
    source = load_file(tmp_path / "source" / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(source)
    assert all(torch.equal(exported[k], source[k]) for k in source)
    assert not any("predictor" in k for k in exported)  # PR2's own weights stay out
    written = json.loads((out / "config.json").read_text())
    assert (
        written["architectures"]
        == json.loads((tmp_path / "source/config.json").read_text())["architectures"]
    )


def test_rope_interleave_false_exports_back_to_half_layout(tmp_path):
    from safetensors.torch import load_file

    hf = build_hf(deepseek_v3_config(rope_interleave=False))
    _, model_cfg, model = _imported(hf, tmp_path / "source")
    out = export_hf_checkpoint(model, model_cfg, tmp_path / "out", hf_config=tmp_path / "source")
    source = load_file(tmp_path / "source" / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    assert all(torch.equal(exported[k], source[k]) for k in source)
    assert json.loads((out / "config.json").read_text())["rope_interleave"] is False


def test_export_drops_quantization_and_mtp_and_casts(tmp_path):
    hf, model_cfg, model = _imported("deepseek_v3", tmp_path / "source")
    config = {
        **hf.config.to_dict(),
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
        "num_nextn_predict_layers": 1,
    }
    out = export_hf_checkpoint(model, model_cfg, tmp_path / "out", hf_config=config, dtype="bf16")
    written = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in written and written["num_nextn_predict_layers"] == 0
    assert written["dtype"] == "bfloat16"
    from safetensors.torch import load_file

    tensors = load_file(out / "model.safetensors")
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32


def test_export_copies_tokenizer_files_and_replaces_old_weights(tmp_path):
    _, model_cfg, model = _imported("qwen3_moe", tmp_path / "source")
    (tmp_path / "source" / "tokenizer.json").write_text("{}")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model-00001-of-00002.safetensors").write_text("stale")
    out = export_hf_checkpoint(model, model_cfg, tmp_path / "out", hf_config=tmp_path / "source")
    files = {p.name for p in out.iterdir()}
    assert files == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}


def test_source_config_must_match_the_model(tmp_path):
    _, model_cfg, model = _imported("qwen3_moe", tmp_path / "source")
    other = CONFIGS["qwen3_moe"]().to_dict()
    other["num_experts_per_tok"] = 4
    with pytest.raises(ConversionError, match=r"model\.topk: the run has 2"):
        export_hf_checkpoint(model, model_cfg, tmp_path / "out", hf_config=other)


def _model(**fields):
    base = dict(activation="swiglu", qk_norm="head", num_experts=4, topk=2)
    return MoEModelConfig(**{**base, **fields})


def test_configs_transformers_cannot_express_are_rejected():
    with pytest.raises(ConversionError, match="shared_expert_ffn_hidden_size"):
        hf_config_from_moe(_model(shared_expert_ffn_hidden_size=32))  # Qwen3-MoE has none
    with pytest.raises(ConversionError, match="score_function"):
        hf_config_from_moe(_model(score_function="sigmoid"))
    mla = dict(
        multi_latent_attention=True,
        score_function="sigmoid",
        enable_expert_bias=True,
        pre_softmax=False,
        shared_expert_ffn_hidden_size=64,
        kv_lora_rank=16,
        qk_head_dim=8,
        qk_pos_emb_head_dim=8,
        v_head_dim=8,
    )
    with pytest.raises(ConversionError, match="moe_layer_freq"):
        hf_config_from_moe(_model(**mla, num_layers=3, moe_layer_freq=[1, 0, 1]))
    with pytest.raises(ConversionError, match="shared_expert_ffn_hidden_size"):
        hf_config_from_moe(_model(**{**mla, "shared_expert_ffn_hidden_size": 40}))
    with pytest.raises(ConversionError, match="enable_expert_bias"):
        hf_config_from_moe(_model(**{**mla, "enable_expert_bias": False}))
    with pytest.raises(ConversionError, match="activation"):
        hf_config_from_moe(_model(activation="gelu"))
    assert hf_config_from_moe(_model(**mla))["model_type"] == "deepseek_v3"


def test_tensors_without_a_counterpart_are_named(tmp_path):
    _, model_cfg, model = _imported("olmoe", tmp_path / "source")
    model.decoder.layers[0].register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ConversionError, match=r"no Hugging Face name: decoder\.layers\.0\.extra"):
        export_hf_checkpoint(model, model_cfg, tmp_path / "out")
    with pytest.raises(
        ConversionError, match=r"got no converted tensor: decoder\.layers\.0\.extra"
    ):
        load_hf_checkpoint(model, model_cfg, tmp_path / "source")
