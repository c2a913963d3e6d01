"""Load Hugging Face Qwen3-MoE and OLMoE checkpoints into the GPT-MoE of ``build_gpt_moe``.

Two steps, usable separately::

    hf_config, hf_state = read_hf_checkpoint("path/to/Qwen3-30B-A3B")   # config.json + weights
    model_cfg = moe_config_from_hf(hf_config)                          # -> MoEModelConfig
    model = build_gpt_moe(model_cfg, parallel, pr2_config)             # any TP/EP layout
    load_hf_weights(model, model_cfg, hf_state)                        # each rank takes its shard

Architecture notes (what the converter maps, and how):

* q/k norm: Qwen3-MoE normalises each head (``q_norm.weight`` ``[head_dim]``), which is Megatron's
  own ``qk_layernorm``; OLMoE normalises the whole q and k projections (``[heads × head_dim]``),
  which Megatron's spec cannot express: ``model.qk_norm='projection'`` plugs in
  :class:`pr2_megatron.models.builder.ProjectionQKNorm`.
* Router: both take a softmax over all experts, then the top-k. Without renormalisation
  (OLMoE, ``norm_topk_prob=False``) that is Megatron's ``pre_softmax=True``; with it (Qwen3-MoE,
  ``norm_topk_prob=True``) the gates are a softmax over the k selected logits, which is exactly
  Megatron's ``pre_softmax=False``. The same experts are selected either way.
* Experts are SwiGLU (``gate_proj``, ``up_proj``, ``down_proj``): Megatron's gated ``linear_fc1``
  holds ``[gate; up]``. Checkpoints on disk keep one tensor per expert; transformers 5 holds
  fused ``experts.gate_up_proj [E, 2F, H]`` / ``experts.down_proj [E, H, F]`` in memory: both
  are accepted. No shared expert in either model.
* Attention: q/k/v go into Megatron's ``linear_qkv`` in its per-query-group interleaved layout
  ``[groups, (heads/groups) q + k + v, head_dim]``. RoPE is the non-interleaved (rotate-half)
  form in both. Embeddings may be tied (``tie_word_embeddings``) or not.

Rejected with a clear error (Megatron in this project cannot express them): attention or
MLP biases, OLMoE's ``clip_qkv``, RoPE scaling, sliding-window attention, a shared expert.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Union

import torch

from pr2_megatron.models.config import MoEModelConfig

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "olmoe")


class ConversionError(ValueError):
    """A Hugging Face checkpoint this converter cannot map exactly."""


# --------------------------------------------------------------------------------- reading
class SafetensorsCheckpoint(Mapping):
    """Tensors of a directory of ``*.safetensors`` files, each read from disk when accessed.

    Only the headers are read up front, so every rank of a large model can hold one of these
    and read just the tensors of its own shards.
    """

    def __init__(self, files: Iterable[Path]) -> None:
        from safetensors import safe_open

        self._file_of: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    self._file_of[key] = file

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._file_of[key]), framework="pt") as handle:
            return handle.get_tensor(key)

    def __iter__(self):
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def read_hf_checkpoint(path: Union[str, Path]) -> tuple[dict, Mapping[str, torch.Tensor]]:
    """``(config dict, tensors)`` of a Hugging Face checkpoint directory.

    Reads ``config.json``; the tensors of all ``*.safetensors`` files (sharded or not) come as a
    lazy :class:`SafetensorsCheckpoint`. Without safetensors files, ``pytorch_model*.bin`` are
    loaded whole with ``torch.load(weights_only=True)``.
    """
    directory = Path(path)
    config = json.loads((directory / "config.json").read_text())
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return config, SafetensorsCheckpoint(files)
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if not bins:
        raise ConversionError(f"{directory}: no *.safetensors or pytorch_model*.bin files")
    state: dict[str, torch.Tensor] = {}
    for file in bins:
        state.update(torch.load(file, map_location="cpu", weights_only=True))
    return config, state


def _config_dict(hf_config: Any) -> dict:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError(f"expected a config dict or a transformers config, got {type(hf_config)}")


def _rope_theta(config: dict) -> float:
    """RoPE base from transformers 4 (``rope_theta``) or 5 (``rope_parameters``) spellings."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise ConversionError(f"RoPE scaling {rope_type!r} is not supported")
    theta = params.get("rope_theta", config.get("rope_theta"))
    return float(theta if theta is not None else 10000.0)


# ------------------------------------------------------------------------------- config map
def moe_config_from_hf(hf_config: Any, **overrides: Any) -> MoEModelConfig:
    """:class:`MoEModelConfig` of a Qwen3-MoE or OLMoE config (dict or transformers config).

    ``overrides`` set further fields (``params_dtype``, ``recompute_granularity``,
    ``token_dispatcher``, ...).
    """
    config = _config_dict(hf_config)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"model_type {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})"
        )
    if config.get("attention_bias"):
        raise ConversionError(f"{model_type}: attention_bias=True is not supported")
    if config.get("use_sliding_window"):
        raise ConversionError(f"{model_type}: sliding-window attention is not supported")
    if config.get("clip_qkv") is not None:
        raise ConversionError(
            f"{model_type}: clip_qkv={config['clip_qkv']} (clamping q/k/v) is not supported"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{model_type}: hidden_act={config['hidden_act']!r} (need silu)")
    num_layers = int(config["num_hidden_layers"])
    num_experts = int(config.get("num_experts") or config.get("num_local_experts"))
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = config.get("head_dim") or hidden // heads
    if model_type == "qwen3_moe":
        step = int(config.get("decoder_sparse_step", 1) or 1)
        dense_only = set(config.get("mlp_only_layers") or [])
        pattern = [int(i not in dense_only and (i + 1) % step == 0) for i in range(num_layers)]
        expert_ffn = int(config["moe_intermediate_size"])
        dense_ffn = int(config["intermediate_size"])
        qk_norm = "head"
    else:
        pattern = [1] * num_layers
        expert_ffn = int(config["intermediate_size"])
        dense_ffn = expert_ffn
        qk_norm = "projection"
    fields: dict[str, Any] = dict(
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=int(config.get("num_key_value_heads") or heads),
        head_dim=None if head_dim * heads == hidden else int(head_dim),
        ffn_hidden_size=dense_ffn,
        num_experts=num_experts,
        topk=int(config["num_experts_per_tok"]),
        expert_ffn_hidden_size=expert_ffn,
        moe_layer_freq=1 if all(pattern) else pattern,
        score_function="softmax",
        # Softmax over the selected logits == renormalised top-k of the full softmax.
        pre_softmax=not bool(config.get("norm_topk_prob", False)),
        vocab_size=int(config["vocab_size"]),
        max_sequence_length=int(config.get("max_position_embeddings", 4096)),
        qk_norm=qk_norm,
        norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        rotary_base=_rope_theta(config),
        activation="swiglu",
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        dropout=float(config.get("attention_dropout", 0.0) or 0.0),
        init_method_std=float(config.get("initializer_range", 0.02)),
    )
    fields.update(overrides)
    return MoEModelConfig(**fields)


# -------------------------------------------------------------------------------- weights
def _layer_index(key: str) -> int:
    return int(key.split(".")[2])


Thunk = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


def conversion_plan(hf_keys: Iterable[str], model: MoEModelConfig) -> dict[str, Thunk]:
    """Megatron global name -> function that builds its full tensor from the HF tensors.

    Names are those of a single-process ``build_gpt_moe`` model on the local spec
    (``decoder.layers.{i}.self_attention.linear_qkv.weight``, ``...local_experts.{e}...``).
    Only key names are checked here (every Hugging Face tensor must find a place, rotary caches
    aside, else ConversionError); tensors are read when a function is called, so a rank reads
    only the tensors of the parameters it holds.
    """
    keys = set(hf_keys)
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    head_dim = model.head_dim or model.hidden_size // heads
    used: set[str] = set()

    def need(key: str) -> str:
        if key not in keys:
            raise ConversionError(f"Hugging Face tensor {key!r} is missing")
        used.add(key)
        return key

    def copy(key: str) -> Thunk:
        key = need(key)
        return lambda hf: hf[key]

    def gated(gate: str, up: str) -> Thunk:
        gate, up = need(gate), need(up)
        return lambda hf: torch.cat([hf[gate], hf[up]], dim=0)

    def qkv(prefix: str) -> Thunk:
        q, k, v = (need(f"{prefix}{name}_proj.weight") for name in ("q", "k", "v"))

        def build(hf):
            # Megatron's layout: per query group, its heads' queries, then its key and value.
            q_ = hf[q].reshape(groups, heads // groups, head_dim, -1)
            k_ = hf[k].reshape(groups, 1, head_dim, -1)
            v_ = hf[v].reshape(groups, 1, head_dim, -1)
            fused = torch.cat([q_, k_, v_], dim=1)
            return fused.reshape(-1, fused.shape[-1])

        return build

    def fused_expert(key: str, index: int) -> Thunk:
        key = need(key)
        return lambda hf: hf[key][index]

    plan: dict[str, Thunk] = {}
    plan["embedding.word_embeddings.weight"] = copy("model.embed_tokens.weight")
    if not model.tie_embeddings:
        plan["output_layer.weight"] = copy("lm_head.weight")
    elif "lm_head.weight" in keys:
        used.add("lm_head.weight")  # tied: the same matrix as the embedding
    plan["decoder.final_layernorm.weight"] = copy("model.norm.weight")
    moe_layers = set(model.moe_layer_numbers())
    for i in range(model.num_layers):
        hf = f"model.layers.{i}."
        mg = f"decoder.layers.{i}."
        plan[mg + "input_layernorm.weight"] = copy(hf + "input_layernorm.weight")
        plan[mg + "pre_mlp_layernorm.weight"] = copy(hf + "post_attention_layernorm.weight")
        plan[mg + "self_attention.linear_qkv.weight"] = qkv(hf + "self_attn.")
        plan[mg + "self_attention.linear_proj.weight"] = copy(hf + "self_attn.o_proj.weight")
        if model.qk_norm != "none":
            plan[mg + "self_attention.q_layernorm.weight"] = copy(hf + "self_attn.q_norm.weight")
            plan[mg + "self_attention.k_layernorm.weight"] = copy(hf + "self_attn.k_norm.weight")
        if i + 1 not in moe_layers:
            plan[mg + "mlp.linear_fc1.weight"] = gated(
                hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"
            )
            plan[mg + "mlp.linear_fc2.weight"] = copy(hf + "mlp.down_proj.weight")
            continue
        plan[mg + "mlp.router.weight"] = copy(hf + "mlp.gate.weight")
        fused = hf + "mlp.experts.gate_up_proj"
        for e in range(model.num_experts):
            expert = f"{mg}mlp.experts.local_experts.{e}."
            if fused in keys:  # transformers 5 in memory: [E, 2F, H] with [gate; up] per expert
                plan[expert + "linear_fc1.weight"] = fused_expert(fused, e)
                plan[expert + "linear_fc2.weight"] = fused_expert(hf + "mlp.experts.down_proj", e)
            else:
                he = f"{hf}mlp.experts.{e}."
                plan[expert + "linear_fc1.weight"] = gated(
                    he + "gate_proj.weight", he + "up_proj.weight"
                )
                plan[expert + "linear_fc2.weight"] = copy(he + "down_proj.weight")
    unused = sorted(k for k in keys if k not in used and not k.endswith("rotary_emb.inv_freq"))
    if unused:
        shown = ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else "")
        raise ConversionError(
            f"{len(unused)} Hugging Face tensor(s) have no place in the Megatron model: {shown}"
        )
    return plan


def convert_hf_state_dict(
    hf_state: Mapping[str, torch.Tensor], model: MoEModelConfig
) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> every full (unsharded) tensor under Megatron's global names."""
    plan = conversion_plan(hf_state.keys(), model)
    return {name: build(hf_state) for name, build in plan.items()}


class _PlannedState(Mapping):
    """Converted tensors built on access (a rank builds only the tensors it loads)."""

    def __init__(self, plan: dict[str, Thunk], hf_state: Mapping[str, torch.Tensor]) -> None:
        self._plan = plan
        self._hf_state = hf_state

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._plan[name](self._hf_state)

    def __iter__(self):
        return iter(self._plan)

    def __len__(self) -> int:
        return len(self._plan)


# --------------------------------------------------------------------------------- loading
_GATED_FC1 = re.compile(r"(^|\.)linear_fc1\.weight$")


def _aliases(name: str) -> list[str]:
    """Canonical (local-spec) names a model parameter may be stored under."""
    names = [name]
    # Transformer Engine fuses the input norm into linear_qkv.
    names.append(
        name.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
    )
    names.append(name.replace("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"))
    return names


def load_megatron_state(model, full_state: Mapping[str, torch.Tensor], model_cfg: MoEModelConfig):
    """Copy full tensors (global names) into ``model``'s shards for the current TP/EP/PP layout.

    Tensor-parallel weights are sliced on their partition dim; a gated ``linear_fc1`` is sliced
    as gate and up halves separately (Megatron keeps ``[gate_r; up_r]`` on TP rank r). Every
    parameter of the model other than the PR2 predictors must be given.
    """
    from megatron.core import parallel_state

    from pr2_megatron.models.parameters import global_parameters
    from pr2_megatron.routing.predictor import is_predictor_parameter

    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    etp_size = parallel_state.get_expert_tensor_parallel_world_size()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    gated = model_cfg.activation == "swiglu"
    missing = []
    with torch.no_grad():
        for name, param in global_parameters(model).items():
            if is_predictor_parameter(param):
                continue
            key = next((alias for alias in _aliases(name) if alias in full_state), None)
            if key is None:
                missing.append(name)
                continue
            full = full_state[key]
            if getattr(param, "tensor_model_parallel", False):
                expert = ".local_experts." in name
                size, rank = (etp_size, etp_rank) if expert else (tp_size, tp_rank)
                dim = param.partition_dim
                if gated and _GATED_FC1.search(name) and size > 1:
                    gate, up = full.chunk(2, dim=dim)
                    full = torch.cat(
                        [gate.chunk(size, dim=dim)[rank], up.chunk(size, dim=dim)[rank]], dim=dim
                    )
                else:
                    full = full.chunk(size, dim=dim)[rank]
            if tuple(full.shape) != tuple(param.shape):
                raise ConversionError(
                    f"{name}: converted tensor {tuple(full.shape)} does not fit the model's "
                    f"{tuple(param.shape)}"
                )
            param.copy_(full.to(param.dtype))
    if missing:
        raise ConversionError(
            f"{len(missing)} model parameter(s) got no converted tensor: "
            + ", ".join(missing[:5])
            + (" ..." if len(missing) > 5 else "")
        )


def load_hf_weights(model, model_cfg: MoEModelConfig, hf_state: Mapping[str, torch.Tensor]):
    """Convert Hugging Face tensors and load them into ``model`` (this rank's shards only).

    ``hf_state`` may be the lazy mapping of :func:`read_hf_checkpoint`: a rank then reads from
    disk only the tensors of the parameters it holds (its experts, its pipeline stage).
    """
    plan = conversion_plan(hf_state.keys(), model_cfg)
    load_megatron_state(model, _PlannedState(plan, hf_state), model_cfg)
