"""Hugging Face ``config.json`` <-> :class:`MoEModelConfig`, and the check that two agree.

Architecture notes (what is mapped, and how):

* **Qwen3-MoE / OLMoE** (``qwen3_moe``, ``olmoe``): softmax router; without renormalisation
  (``norm_topk_prob=False``) that is Megatron's ``pre_softmax=True``; with it, the gates are a
  softmax over the k selected logits, which is exactly Megatron's ``pre_softmax=False``.
  Qwen3-MoE normalises q/k per head (``qk_norm='head'``), OLMoE over the whole q and k
  projections (``qk_norm='projection'``). Dense layers: Qwen3's ``mlp_only_layers`` and
  ``decoder_sparse_step``. No shared expert.
* **DeepSeek-V3 / Moonlight** (``deepseek_v3``: Moonlight-16B-A3B is the same architecture with
  a full-rank query, ``q_lora_rank=None``, and one expert group): multi-latent attention
  (``qk_norm='head'`` = the latent q/kv RMSNorms), dense first ``first_k_dense_replace``
  layers, a shared expert of ``moe_intermediate_size * n_shared_experts``, a sigmoid router
  with the ``e_score_correction_bias`` (Megatron's ``expert_bias``), group-limited routing
  (``n_group`` / ``topk_group``), ``routed_scaling_factor``, YaRN.

Rejected with a ConversionError naming the key, because this project's Megatron model would
compute something else: attention or MLP biases, OLMoE's ``clip_qkv``, sliding windows, RoPE
scaling other than DeepSeek's YaRN (with Megatron's defaults ``beta_fast=32``, ``beta_slow=1``,
truncated correction range, no explicit ``attention_factor``), a softmax router for DeepSeek,
``norm_topk_prob`` other than ``topk > 1`` with sigmoid scores (Megatron renormalises exactly
when k > 1), and group-limited routing whose group score is not the top-2 sum HF uses (Megatron
sums the top ``topk // group_topk`` scores per group: equal when that is 2, as in DeepSeek-V3's
8 / 4).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Optional

from pr2_megatron.models.config import MoEModelConfig
from pr2_megatron.models.hf.errors import ConversionError

__all__ = [
    "ARCHITECTURES",
    "SUPPORTED_MODEL_TYPES",
    "check_model_config",
    "config_dict",
    "hf_config_from_moe",
    "hf_model_type",
    "moe_config_from_hf",
]

#: model_type -> the transformers class that loads it.
ARCHITECTURES = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)

#: YaRN settings Megatron's MLA fixes (``MLATransformerConfig`` defaults the builder keeps).
_YARN_FIXED = {"beta_fast": 32.0, "beta_slow": 1.0}


def config_dict(hf_config: Any) -> dict:
    """A plain dict of a config dict or a transformers config object."""
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError(f"expected a config dict or a transformers config, got {type(hf_config)}")


# ------------------------------------------------------------------------------------ rope
def _rope_settings(config: dict) -> tuple[float, Optional[str], dict]:
    """``(theta, rope type, scaling parameters)`` of a config.

    Reads transformers 4 (``rope_theta`` + ``rope_scaling``) and 5 (``rope_parameters``).
    """
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    merged = {**scaling, **params}
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None)
    merged.pop("type", None)
    theta = merged.pop("rope_theta", config.get("rope_theta"))
    rope_type = None if rope_type == "default" else rope_type
    return float(theta if theta is not None else 10000.0), rope_type, merged


def _yarn_fields(config: dict, scaling: dict) -> dict:
    """``MoEModelConfig`` YaRN fields of an HF ``yarn`` rope config (DeepSeek-V3)."""
    for key, value in _YARN_FIXED.items():
        given = scaling.get(key)
        if given is not None and float(given) != value:
            raise ConversionError(
                f"rope_parameters.{key}={given}: Megatron's YaRN here uses {key}={value:g}"
            )
    if scaling.get("attention_factor") is not None:
        raise ConversionError(
            "rope_parameters.attention_factor is not supported (Megatron derives it from "
            "factor, mscale and mscale_all_dim)"
        )
    if scaling.get("truncate", True) is False:
        raise ConversionError("rope_parameters.truncate=False is not supported")
    if scaling.get("original_max_position_embeddings") is None:
        raise ConversionError("rope_parameters.original_max_position_embeddings is missing")
    original = int(scaling["original_max_position_embeddings"])
    factor = scaling.get("factor")
    if factor is None:  # transformers' rule: the context extension ratio
        factor = int(config["max_position_embeddings"]) / original
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale_all_dim and not mscale:
        raise ConversionError(
            f"rope_parameters.mscale={mscale!r} with mscale_all_dim={mscale_all_dim}: "
            "transformers then scales cos/sin by mscale(factor) alone, which Megatron cannot "
            "express"
        )
    if not mscale_all_dim:  # transformers: attention factor mscale(factor), softmax unscaled
        mscale, mscale_all_dim = 1.0, 0.0
    return dict(
        yarn_scaling_factor=float(factor),
        yarn_original_max_position_embeddings=original,
        yarn_mscale=float(mscale),
        yarn_mscale_all_dim=float(mscale_all_dim),
    )


# ------------------------------------------------------------------------------ HF -> MoE
def _check_common(config: dict, model_type: str) -> None:
    if config.get("attention_bias"):
        raise ConversionError(f"{model_type}: attention_bias=True is not supported")
    if config.get("mlp_bias"):
        raise ConversionError(f"{model_type}: mlp_bias=True is not supported")
    if config.get("use_sliding_window"):
        raise ConversionError(f"{model_type}: use_sliding_window=True is not supported")
    if config.get("clip_qkv") is not None:
        raise ConversionError(
            f"{model_type}: clip_qkv={config['clip_qkv']} (clamping q/k/v) is not supported"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{model_type}: hidden_act={config['hidden_act']!r} (need silu)")


def _common_fields(config: dict) -> dict:
    return dict(
        num_layers=int(config["num_hidden_layers"]),
        hidden_size=int(config["hidden_size"]),
        num_attention_heads=int(config["num_attention_heads"]),
        topk=int(config["num_experts_per_tok"]),
        vocab_size=int(config["vocab_size"]),
        max_sequence_length=int(config.get("max_position_embeddings", 4096)),
        norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        activation="swiglu",
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        dropout=float(config.get("attention_dropout", 0.0) or 0.0),
        init_method_std=float(config.get("initializer_range", 0.02)),
    )


def _softmax_moe_fields(config: dict, model_type: str) -> dict:
    """Qwen3-MoE and OLMoE."""
    theta, rope_type, _ = _rope_settings(config)
    if rope_type is not None:
        raise ConversionError(f"{model_type}: RoPE scaling {rope_type!r} is not supported")
    fields = _common_fields(config)
    num_layers, heads = fields["num_layers"], fields["num_attention_heads"]
    head_dim = config.get("head_dim") or fields["hidden_size"] // heads
    if model_type == "qwen3_moe":
        step = int(config.get("decoder_sparse_step", 1) or 1)
        dense_only = set(config.get("mlp_only_layers") or [])
        pattern = [int(i not in dense_only and (i + 1) % step == 0) for i in range(num_layers)]
        expert_ffn = int(config["moe_intermediate_size"])
        dense_ffn = int(config["intermediate_size"])
        qk_norm = "head"
    else:
        pattern = [1] * num_layers
        expert_ffn = dense_ffn = int(config["intermediate_size"])
        qk_norm = "projection"
    fields.update(
        num_query_groups=int(config.get("num_key_value_heads") or heads),
        head_dim=None if head_dim * heads == fields["hidden_size"] else int(head_dim),
        ffn_hidden_size=dense_ffn,
        num_experts=int(config.get("num_experts") or config.get("num_local_experts")),
        expert_ffn_hidden_size=expert_ffn,
        moe_layer_freq=1 if all(pattern) else pattern,
        score_function="softmax",
        # Softmax over the selected logits == renormalised top-k of the full softmax.
        pre_softmax=not bool(config.get("norm_topk_prob", False)),
        qk_norm=qk_norm,
        rotary_base=theta,
    )
    return fields


def _group_fields(config: dict, topk: int, num_experts: int) -> dict:
    """Group-limited routing, or none where it selects every group."""
    groups = int(config.get("n_group") or 1)
    chosen = int(config.get("topk_group") or groups)
    if groups <= 1 or chosen >= groups:
        return dict(num_groups=None, group_topk=None)
    if num_experts % groups:
        raise ConversionError(f"n_group={groups} does not divide n_routed_experts={num_experts}")
    if topk // chosen != 2:
        raise ConversionError(
            f"n_group={groups}, topk_group={chosen}, num_experts_per_tok={topk}: transformers "
            "scores a group by its top-2 experts, Megatron by its top "
            f"num_experts_per_tok // topk_group = {topk // chosen}; they agree only when that is 2"
        )
    return dict(num_groups=groups, group_topk=chosen)


def _deepseek_v3_fields(config: dict) -> dict:
    """DeepSeek-V3 and Moonlight."""
    fields = _common_fields(config)
    num_layers, topk = fields["num_layers"], fields["topk"]
    num_experts = int(config.get("n_routed_experts") or config.get("num_local_experts"))
    for key, allowed in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        if config.get(key) not in (None, allowed):
            raise ConversionError(f"deepseek_v3: {key}={config[key]!r} (need {allowed!r})")
    if int(config.get("moe_layer_freq", 1) or 1) != 1:
        raise ConversionError(
            f"deepseek_v3: moe_layer_freq={config['moe_layer_freq']} (transformers' "
            "DeepseekV3 makes every layer from first_k_dense_replace on an MoE layer)"
        )
    norm_topk = bool(config.get("norm_topk_prob", True))
    if norm_topk != (topk > 1):
        raise ConversionError(
            f"deepseek_v3: norm_topk_prob={norm_topk} with num_experts_per_tok={topk}: "
            "Megatron's sigmoid router renormalises the top-k gates exactly when k > 1"
        )
    shared = int(config.get("n_shared_experts") or 0)
    if shared < 1:
        raise ConversionError("deepseek_v3: n_shared_experts must be >= 1")
    dense = int(config.get("first_k_dense_replace", 0) or 0)
    expert_ffn = int(config["moe_intermediate_size"])
    theta, rope_type, scaling = _rope_settings(config)
    if rope_type not in (None, "yarn"):
        raise ConversionError(f"deepseek_v3: RoPE scaling {rope_type!r} is not supported")
    q_lora = config.get("q_lora_rank")
    fields.update(
        num_query_groups=None,
        ffn_hidden_size=int(config["intermediate_size"]),
        num_experts=num_experts,
        expert_ffn_hidden_size=expert_ffn,
        moe_layer_freq=[int(i >= dense) for i in range(num_layers)] if dense else 1,
        shared_expert_ffn_hidden_size=expert_ffn * shared,
        score_function="sigmoid",
        pre_softmax=False,
        enable_expert_bias=True,
        topk_scaling_factor=float(config.get("routed_scaling_factor", 1.0) or 1.0),
        qk_norm="head",
        rotary_base=theta,
        multi_latent_attention=True,
        q_lora_rank=None if q_lora is None else int(q_lora),
        kv_lora_rank=int(config["kv_lora_rank"]),
        qk_head_dim=int(config["qk_nope_head_dim"]),
        qk_pos_emb_head_dim=int(config["qk_rope_head_dim"]),
        v_head_dim=int(config["v_head_dim"]),
        **_group_fields(config, topk, num_experts),
    )
    if rope_type == "yarn":
        fields.update(_yarn_fields(config, scaling))
    return fields


def moe_config_from_hf(hf_config: Any, **overrides: Any) -> MoEModelConfig:
    """:class:`MoEModelConfig` of a Qwen3-MoE, OLMoE or DeepSeek-V3 / Moonlight config.

    ``hf_config`` is a ``config.json`` dict or a transformers config. ``overrides`` set
    further fields (``params_dtype``, ``recompute_granularity``, ``token_dispatcher``, ...).
    """
    config = config_dict(hf_config)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"model_type {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})"
        )
    _check_common(config, model_type)
    if model_type == "deepseek_v3":
        fields = _deepseek_v3_fields(config)
    else:
        fields = _softmax_moe_fields(config, model_type)
    fields.update(overrides)
    return MoEModelConfig(**fields)


# ------------------------------------------------------------------------------ MoE -> HF
def hf_model_type(model: MoEModelConfig) -> str:
    """The Hugging Face architecture a model config exports to."""
    if model.multi_latent_attention:
        return "deepseek_v3"
    return "olmoe" if model.qk_norm == "projection" else "qwen3_moe"


def _common_hf(model: MoEModelConfig, model_type: str) -> dict:
    return dict(
        architectures=[ARCHITECTURES[model_type]],
        model_type=model_type,
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_experts_per_tok=model.topk,
        max_position_embeddings=model.max_sequence_length,
        rms_norm_eps=model.norm_epsilon,
        hidden_act="silu",
        tie_word_embeddings=model.tie_embeddings,
        attention_bias=False,
        attention_dropout=model.dropout,
        initializer_range=model.init_method_std,
        use_cache=True,
        # Token ids belong to the tokenizer, which the model config does not know.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def _softmax_moe_hf(model: MoEModelConfig, model_type: str) -> dict:
    heads = model.num_attention_heads
    out = _common_hf(model, model_type)
    pattern = _moe_pattern(model)
    out.update(
        num_key_value_heads=model.num_query_groups or heads,
        num_experts=model.num_experts,
        norm_topk_prob=not model.pre_softmax,
        rope_parameters={"rope_type": "default", "rope_theta": model.rotary_base},
    )
    if model_type == "qwen3_moe":
        out.update(
            head_dim=model.head_dim or model.hidden_size // heads,
            intermediate_size=model.ffn_hidden_size,
            moe_intermediate_size=model.expert_ffn_hidden_size,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i, is_moe in enumerate(pattern) if not is_moe],
            use_sliding_window=False,
        )
    else:
        out.update(intermediate_size=model.expert_ffn_hidden_size, clip_qkv=None)
    return out


def _deepseek_v3_hf(model: MoEModelConfig) -> dict:
    out = _common_hf(model, "deepseek_v3")
    pattern = _moe_pattern(model)
    dense = pattern.index(1) if 1 in pattern else len(pattern)
    if pattern != [0] * dense + [1] * (len(pattern) - dense):
        raise ConversionError(
            f"model.moe_layer_freq={model.moe_layer_freq}: DeepSeek-V3 has dense layers only "
            "before its first MoE layer (first_k_dense_replace)"
        )
    shared = model.shared_expert_ffn_hidden_size or 0
    if shared == 0 or shared % model.expert_ffn_hidden_size:
        raise ConversionError(
            f"model.shared_expert_ffn_hidden_size={model.shared_expert_ffn_hidden_size}: "
            "DeepSeek-V3 needs a multiple of expert_ffn_hidden_size "
            f"({model.expert_ffn_hidden_size}) = moe_intermediate_size * n_shared_experts"
        )
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": model.rotary_base}
    if model.yarn_scaling_factor is not None:
        rope = dict(
            rope_type="yarn",
            rope_theta=model.rotary_base,
            factor=model.yarn_scaling_factor,
            original_max_position_embeddings=model.yarn_original_max_position_embeddings,
            mscale=model.yarn_mscale,
            mscale_all_dim=model.yarn_mscale_all_dim,
            **_YARN_FIXED,
        )
    out.update(
        num_key_value_heads=model.num_attention_heads,
        intermediate_size=model.ffn_hidden_size,
        moe_intermediate_size=model.expert_ffn_hidden_size,
        n_routed_experts=model.num_experts,
        n_shared_experts=shared // model.expert_ffn_hidden_size,
        routed_scaling_factor=model.topk_scaling_factor or 1.0,
        n_group=model.num_groups or 1,
        topk_group=model.group_topk or 1,
        first_k_dense_replace=dense,
        norm_topk_prob=model.topk > 1,
        q_lora_rank=model.q_lora_rank,
        kv_lora_rank=model.kv_lora_rank,
        qk_nope_head_dim=model.qk_head_dim,
        qk_rope_head_dim=model.qk_pos_emb_head_dim,
        v_head_dim=model.v_head_dim,
        rope_parameters=rope,
        rope_interleave=True,
        num_nextn_predict_layers=0,
    )
    return out


def hf_config_from_moe(model: MoEModelConfig) -> dict:
    """A ``config.json`` dict that transformers loads as ``model``'s architecture.

    The architecture follows the config (:func:`hf_model_type`); a model the Hugging Face
    class cannot express raises ConversionError naming the key. The result is checked: it maps
    back to ``model`` under :func:`moe_config_from_hf`.
    """
    model_type = hf_model_type(model)
    if model_type == "deepseek_v3":
        out = _deepseek_v3_hf(model)
    else:
        out = _softmax_moe_hf(model, model_type)
    check_model_config(model, moe_config_from_hf(out), what="the exported config.json")
    return out


def _moe_pattern(model: MoEModelConfig) -> list[int]:
    moe = set(model.moe_layer_numbers())
    return [int(i + 1 in moe) for i in range(model.num_layers)]


# ------------------------------------------------------------------------------ the check
#: Fields that decide the weights' shapes or the forward's numbers (the rest -- dtype,
#: recompute, dispatcher, dropout, aux loss, sequence length, init -- belong to the run).
ARCHITECTURE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
    "num_experts",
    "topk",
    "expert_ffn_hidden_size",
    "moe_layer_freq",
    "shared_expert_ffn_hidden_size",
    "score_function",
    "pre_softmax",
    "enable_expert_bias",
    "num_groups",
    "group_topk",
    "topk_scaling_factor",
    "vocab_size",
    "head_dim",
    "qk_norm",
    "norm_epsilon",
    "rotary_base",
    "activation",
    "tie_embeddings",
    "multi_latent_attention",
)
_MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")
_YARN_FIELDS = (
    "yarn_scaling_factor",
    "yarn_original_max_position_embeddings",
    "yarn_mscale",
    "yarn_mscale_all_dim",
)


def _architecture(model: MoEModelConfig) -> dict[str, Any]:
    """The compared fields of ``model``, equivalent spellings made equal."""
    values = {name: getattr(model, name) for name in ARCHITECTURE_FIELDS}
    values["moe_layer_freq"] = _moe_pattern(model)
    heads = model.num_attention_heads
    if model.multi_latent_attention:
        values.update({name: getattr(model, name) for name in _MLA_FIELDS})
        values["num_query_groups"] = values["head_dim"] = None
        values["yarn_scaling_factor"] = model.yarn_scaling_factor
        if model.yarn_scaling_factor is not None:
            values.update({name: getattr(model, name) for name in _YARN_FIELDS})
    else:
        values["num_query_groups"] = model.num_query_groups or heads
        values["head_dim"] = model.head_dim or model.hidden_size // heads
    groups, chosen = model.num_groups, model.group_topk
    if not groups or groups <= 1 or not chosen or chosen >= groups:
        values["num_groups"] = values["group_topk"] = None
    values["topk_scaling_factor"] = model.topk_scaling_factor or 1.0
    if model.score_function == "sigmoid":
        values.pop("pre_softmax")  # no softmax to place
    if all(values["moe_layer_freq"]) and model.shared_expert_ffn_hidden_size is not None:
        values.pop("ffn_hidden_size")  # no dense FFN in the model
    return values


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9)
    return a == b


def check_model_config(
    run: MoEModelConfig, checkpoint: MoEModelConfig, what: str = "the Hugging Face checkpoint"
) -> None:
    """Raise ConversionError naming every architecture key where the two configs differ.

    One entry per key: ``model.<key>: the run has X, <what> Y``.
    """
    mine, theirs = _architecture(run), _architecture(checkpoint)
    bad = [
        f"model.{key}: the run has {mine.get(key)!r}, {what} {theirs.get(key)!r}"
        for key in sorted(set(mine) | set(theirs), key=_field_order)
        if not _same(mine.get(key), theirs.get(key))
    ]
    if bad:
        raise ConversionError("model config does not match: " + "; ".join(bad))


def _field_order(name: str) -> int:
    names = [f.name for f in dataclasses.fields(MoEModelConfig)]
    return names.index(name) if name in names else len(names)
