"""Tensor names and layouts: Hugging Face <-> Megatron (local spec), as tables.

A :class:`Rule` ties one Megatron tensor (its global, single-process name) to the Hugging Face
tensors it is made of (on-disk names: one tensor per expert) and a :class:`Transform` that goes
both ways. The rules of a model come from the tables below, per layer and per architecture;
:func:`import_plan` turns them into functions that build each Megatron tensor from an HF
mapping (reading only the tensors asked for), :func:`export_rules` gives the inverse.

Layouts that are not a plain copy:

* ``gated``: Megatron's SwiGLU ``linear_fc1`` holds ``[gate; up]``: HF ``gate_proj`` and
  ``up_proj`` stacked on rows.
* ``qkv``: Megatron's ``linear_qkv`` is per query group ``[its heads' q, k, v]`` of head_dim
  rows each; HF has separate ``q_proj``, ``k_proj``, ``v_proj``.
* ``q_rope`` / ``kv_rope`` (MLA): Megatron rotates the rope dims of each q head and the shared
  k_rope as interleaved pairs (it de-interleaves ``0::2``, ``1::2`` before rotate-half), which
  is HF DeepseekV3's ``rope_interleave=True`` (the default, and what DeepSeek-V3 and Moonlight
  ship). Only with ``rope_interleave=False`` are the rope rows permuted, from HF's half layout
  ``[x_0 .. x_{d/2-1} | y_0 .. y_{d/2-1}]`` to pairs ``[x_0, y_0, x_1, y_1, ...]``. Everything
  else of MLA maps by name (q per head ``[nope | rope]``, ``kv_a_proj_with_mqa`` = ``[kv latent
  | k_rope]``, ``kv_b_proj`` per head ``[k_nope | v]`` are Megatron's layouts too).
* transformers 5 keeps experts fused in memory (``experts.gate_up_proj [E, 2F, H]``,
  ``experts.down_proj [E, H, F]``); an in-memory state dict imports too (``expert_row``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Optional

import torch

from pr2_megatron.models.config import MoEModelConfig
from pr2_megatron.models.hf.errors import ConversionError

__all__ = [
    "MappingContext",
    "Rule",
    "Transform",
    "canonical_name",
    "export_rules",
    "import_plan",
    "model_rules",
]


# ------------------------------------------------------------------------------ the tables
#: Megatron name (global)  <-  HF names  (transform); outside the decoder layers.
GLOBAL_RULES = (
    ("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "copy"),
    ("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"),
)
UNTIED_OUTPUT = (("output_layer.weight", ("lm_head.weight",), "copy"),)
#: Tied embeddings: the last stage's output layer is the embedding (imported, not exported).
TIED_OUTPUT = (("output_layer.weight", ("model.embed_tokens.weight",), "copy"),)

#: Per layer: Megatron ``decoder.layers.{i}.<name>``  <-  HF ``model.layers.{i}.<names>``.
LAYER_NORMS = (
    ("input_layernorm.weight", ("input_layernorm.weight",), "copy"),
    ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "copy"),
)
GQA_ATTENTION = (
    (
        "self_attention.linear_qkv.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "qkv",
    ),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "copy"),
)
GQA_QK_NORMS = (
    ("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), "copy"),
    ("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), "copy"),
)
MLA_FULL_RANK_Q = (("self_attention.linear_q_proj.weight", ("self_attn.q_proj.weight",), "q_rope"),)
MLA_LOW_RANK_Q = (
    ("self_attention.linear_q_down_proj.weight", ("self_attn.q_a_proj.weight",), "copy"),
    ("self_attention.q_layernorm.weight", ("self_attn.q_a_layernorm.weight",), "copy"),
    ("self_attention.linear_q_up_proj.weight", ("self_attn.q_b_proj.weight",), "q_rope"),
)
MLA_KV = (
    (
        "self_attention.linear_kv_down_proj.weight",
        ("self_attn.kv_a_proj_with_mqa.weight",),
        "kv_rope",
    ),
    ("self_attention.kv_layernorm.weight", ("self_attn.kv_a_layernorm.weight",), "copy"),
    ("self_attention.linear_kv_up_proj.weight", ("self_attn.kv_b_proj.weight",), "copy"),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "copy"),
)
DENSE_MLP = (
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gated"),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "copy"),
)
ROUTER = (("mlp.router.weight", ("mlp.gate.weight",), "copy"),)
#: A buffer on both sides (Megatron's router keeps it out of the parameters).
EXPERT_BIAS = (("mlp.router.expert_bias", ("mlp.gate.e_score_correction_bias",), "copy"),)
SHARED_EXPERT = (
    (
        "mlp.shared_experts.linear_fc1.weight",
        ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"),
        "gated",
    ),
    ("mlp.shared_experts.linear_fc2.weight", ("mlp.shared_experts.down_proj.weight",), "copy"),
)
#: Per expert ``{e}`` (HF on disk: one tensor per expert).
EXPERT = (
    (
        "mlp.experts.local_experts.{e}.linear_fc1.weight",
        ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"),
        "gated",
    ),
    (
        "mlp.experts.local_experts.{e}.linear_fc2.weight",
        ("mlp.experts.{e}.down_proj.weight",),
        "copy",
    ),
)
#: transformers 5 in memory: Megatron expert tensor -> fused HF tensor (row e of it).
FUSED_EXPERT = {
    "linear_fc1.weight": "mlp.experts.gate_up_proj",
    "linear_fc2.weight": "mlp.experts.down_proj",
}

#: Transformer Engine spec names (GPU) -> the local-spec names the tables use. TE fuses the
#: norm before a linear into it.
TE_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "self_attention.linear_q_up_proj.layer_norm_weight": "self_attention.q_layernorm.weight",
    "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attention.kv_layernorm.weight",
}

#: HF tensors that have no Megatron counterpart and are not needed (recomputed from config).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def canonical_name(name: str) -> str:
    """The local-spec name of a (global) Megatron tensor name, TE's fused norms unfused."""
    if name.startswith("decoder.layers."):
        head, _, rest = name.partition(".layers.")
        index, _, suffix = rest.partition(".")
        if suffix in TE_NAMES:
            return f"{head}.layers.{index}.{TE_NAMES[suffix]}"
    return name


# ------------------------------------------------------------------------------ transforms
@dataclass(frozen=True)
class Transform:
    """One Megatron tensor from its HF tensors (``to_megatron``) and back (``to_hf``)."""

    to_megatron: Callable[[list[torch.Tensor]], torch.Tensor]
    to_hf: Callable[[torch.Tensor], list[torch.Tensor]]


COPY = Transform(lambda hf: hf[0], lambda mg: [mg])
GATED = Transform(lambda hf: torch.cat(hf, dim=0), lambda mg: list(mg.chunk(2, dim=0)))


def _qkv(heads: int, groups: int, head_dim: int) -> Transform:
    def to_megatron(hf):
        q, k, v = hf
        q = q.reshape(groups, heads // groups, head_dim, -1)
        k = k.reshape(groups, 1, head_dim, -1)
        v = v.reshape(groups, 1, head_dim, -1)
        fused = torch.cat([q, k, v], dim=1)
        return fused.reshape(-1, fused.shape[-1])

    def to_hf(mg):
        fused = mg.reshape(groups, heads // groups + 2, head_dim, -1)
        q, k, v = fused.split([heads // groups, 1, 1], dim=1)
        return [t.reshape(-1, mg.shape[-1]) for t in (q, k, v)]

    return Transform(to_megatron, to_hf)


def rope_rows_to_pairs(w: torch.Tensor, blocks: int, nope: int, rope: int) -> torch.Tensor:
    """HF ``rope_interleave=False`` rows -> Megatron's: the rope rows as interleaved pairs.

    ``w`` is ``blocks`` blocks of rows ``[nope | rope (half layout) | rest]``.
    """
    w = w.reshape(blocks, -1, w.shape[-1])
    r = w[:, nope : nope + rope]
    r = torch.stack([r[:, : rope // 2], r[:, rope // 2 :]], dim=2).reshape(blocks, rope, -1)
    return torch.cat([w[:, :nope], r, w[:, nope + rope :]], dim=1).reshape(-1, w.shape[-1])


def rope_rows_to_halves(w: torch.Tensor, blocks: int, nope: int, rope: int) -> torch.Tensor:
    """Inverse of :func:`rope_rows_to_pairs` (Megatron -> HF ``rope_interleave=False``)."""
    w = w.reshape(blocks, -1, w.shape[-1])
    r = w[:, nope : nope + rope].reshape(blocks, rope // 2, 2, -1)
    r = torch.cat([r[:, :, 0], r[:, :, 1]], dim=1)
    return torch.cat([w[:, :nope], r, w[:, nope + rope :]], dim=1).reshape(-1, w.shape[-1])


def _rope_rows(blocks: int, nope: int, rope: int) -> Transform:
    return Transform(
        lambda hf: rope_rows_to_pairs(hf[0], blocks, nope, rope),
        lambda mg: [rope_rows_to_halves(mg, blocks, nope, rope)],
    )


@dataclass(frozen=True)
class MappingContext:
    """What the layouts depend on: the model and HF's ``rope_interleave`` (MLA)."""

    model: MoEModelConfig
    rope_interleave: bool = True

    @classmethod
    def of(cls, model: MoEModelConfig, hf_config: Optional[Mapping] = None) -> MappingContext:
        """Context of ``model`` with the conventions of ``hf_config`` (None: HF defaults)."""
        interleave = True if hf_config is None else hf_config.get("rope_interleave", True)
        return cls(model, rope_interleave=bool(interleave))

    def transform(self, kind: str) -> Transform:
        """The transform named ``kind`` in the tables, for this model."""
        m = self.model
        if kind == "copy":
            return COPY
        if kind == "gated":
            return GATED
        if kind == "qkv":
            heads = m.num_attention_heads
            return _qkv(heads, m.num_query_groups or heads, m.head_dim or m.hidden_size // heads)
        if kind == "q_rope" and not self.rope_interleave:
            return _rope_rows(m.num_attention_heads, m.qk_head_dim, m.qk_pos_emb_head_dim)
        if kind == "kv_rope" and not self.rope_interleave:
            return _rope_rows(1, m.kv_lora_rank, m.qk_pos_emb_head_dim)
        if kind in ("q_rope", "kv_rope"):
            return COPY
        raise ValueError(f"unknown transform {kind!r}")


# ------------------------------------------------------------------------------ the rules
@dataclass(frozen=True)
class Rule:
    """Megatron tensor ``megatron`` is ``transform`` of the HF tensors ``hf``."""

    megatron: str
    hf: tuple[str, ...]
    transform: Transform
    #: False for tensors that exist in Megatron only as a copy (the tied output layer).
    export: bool = True


def _rules(table, ctx: MappingContext, mg_prefix="", hf_prefix="", **names) -> list[Rule]:
    return [
        Rule(
            mg_prefix + mg.format(**names),
            tuple(hf_prefix + h.format(**names) for h in hf),
            ctx.transform(kind),
        )
        for mg, hf, kind in table
    ]


def _layer_tables(ctx: MappingContext, is_moe: bool) -> list:
    m = ctx.model
    tables = [LAYER_NORMS]
    if m.multi_latent_attention:
        tables += [MLA_FULL_RANK_Q if m.q_lora_rank is None else MLA_LOW_RANK_Q, MLA_KV]
    else:
        tables.append(GQA_ATTENTION)
        if m.qk_norm != "none":
            tables.append(GQA_QK_NORMS)
    if not is_moe:
        tables.append(DENSE_MLP)
        return tables
    tables.append(ROUTER)
    if m.enable_expert_bias:
        tables.append(EXPERT_BIAS)
    if m.shared_expert_ffn_hidden_size:
        tables.append(SHARED_EXPERT)
    return tables


def model_rules(ctx: MappingContext) -> list[Rule]:
    """Every rule of the model (experts in on-disk HF layout)."""
    m = ctx.model
    if m.activation != "swiglu":
        raise ConversionError(f"model.activation={m.activation!r}: HF models here are swiglu")
    rules = _rules(GLOBAL_RULES, ctx)
    if m.tie_embeddings:
        rules += [
            Rule(r.megatron, r.hf, r.transform, export=False) for r in _rules(TIED_OUTPUT, ctx)
        ]
    else:
        rules += _rules(UNTIED_OUTPUT, ctx)
    moe = set(m.moe_layer_numbers())
    for i in range(m.num_layers):
        mg, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        for table in _layer_tables(ctx, i + 1 in moe):
            rules += _rules(table, ctx, mg, hf)
        if i + 1 in moe:
            for e in range(m.num_experts):
                rules += _rules(EXPERT, ctx, mg, hf, e=e)
    return rules


def export_rules(ctx: MappingContext) -> dict[str, Rule]:
    """Megatron name -> its rule, for the tensors that are written to HF."""
    return {rule.megatron: rule for rule in model_rules(ctx) if rule.export}


# ------------------------------------------------------------------------------ importing
Thunk = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


def _fused_expert_rule(rule: Rule, keys: set[str]) -> Optional[tuple[str, int]]:
    """``(fused HF key, expert)`` where an expert's tensors are fused (transformers 5).

    None where the per-expert tensors exist or the layer has no fused experts either.
    """
    if ".local_experts." not in rule.megatron or all(k in keys for k in rule.hf):
        return None
    layer_prefix, _, rest = rule.megatron.partition("mlp.experts.local_experts.")
    expert, _, suffix = rest.partition(".")
    fused = "model." + layer_prefix.removeprefix("decoder.") + FUSED_EXPERT[suffix]
    return (fused, int(expert)) if fused in keys else None


def _mtp_layer(key: str, num_layers: int) -> bool:
    """A DeepSeek-V3 multi-token-prediction layer: ``model.layers.{>= num_layers}.*``."""
    parts = key.split(".")
    return len(parts) > 2 and parts[:2] == ["model", "layers"] and int(parts[2]) >= num_layers


@dataclass
class ImportPlan:
    """Megatron name -> function building its full tensor; HF keys left out, and why."""

    build: dict[str, Thunk]
    skipped_mtp: list[str]


def import_plan(hf_keys: Iterable[str], ctx: MappingContext) -> ImportPlan:
    """Functions that build every Megatron tensor of the model from an HF tensor mapping.

    Only names are checked here: every HF tensor the rules need must exist (else
    ConversionError naming it), and every HF tensor must find a place, except rotary caches,
    ``lm_head.weight`` with tied embeddings and the multi-token-prediction layers
    (``model.layers.{num_layers}.*``, DeepSeek-V3; listed in ``skipped_mtp``). Tensors are read
    when a function is called, so a rank reads only the tensors of what it holds.
    """
    keys = set(hf_keys)
    used: set[str] = set()
    build: dict[str, Thunk] = {}
    for rule in model_rules(ctx):
        fused = _fused_expert_rule(rule, keys)
        if fused is not None:
            key, expert = fused
            used.add(key)
            build[rule.megatron] = lambda hf, key=key, expert=expert: hf[key][expert]
            continue
        missing = [k for k in rule.hf if k not in keys]
        if missing:
            raise ConversionError(
                f"Hugging Face tensor {missing[0]!r} is missing (for {rule.megatron})"
            )
        used.update(rule.hf)
        build[rule.megatron] = lambda hf, rule=rule: rule.transform.to_megatron(
            [hf[k] for k in rule.hf]
        )
    if ctx.model.tie_embeddings and "lm_head.weight" in keys:
        used.add("lm_head.weight")  # the same matrix as the embedding
    num_layers = ctx.model.num_layers
    mtp = sorted(k for k in keys - used if _mtp_layer(k, num_layers))
    unused = sorted(
        k for k in keys - used - set(mtp) if not any(k.endswith(s) for s in IGNORED_SUFFIXES)
    )
    if unused:
        shown = ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else "")
        raise ConversionError(
            f"{len(unused)} Hugging Face tensor(s) have no place in the Megatron model: {shown}"
        )
    return ImportPlan(build, mtp)
