"""Hugging Face checkpoints in and out of the GPT-MoE of ``build_gpt_moe``.

Qwen3-MoE, OLMoE and DeepSeek-V3 / Moonlight (multi-latent attention), by a hand-written
mapping (tables in :mod:`.mapping`; why not a bridge: docs/trainer.md). In::

    hf_config, hf_state = read_hf_checkpoint("path/to/Qwen3-30B-A3B")   # config.json, lazy tensors
    model_cfg = moe_config_from_hf(hf_config)                          # -> MoEModelConfig
    model = build_gpt_moe(model_cfg, parallel, pr2_config)             # any TP/EP/PP layout
    load_hf_checkpoint(model, model_cfg, "path/to/Qwen3-30B-A3B")      # checked; rank: its shards

and out (collective, every rank; HF's on-disk layout, predictors excluded)::

    export_hf_checkpoint(model, model_cfg, "out/", hf_config="path/to/Qwen3-30B-A3B")

Modules: :mod:`.read` (safetensors read lazily, FP8 dequantised), :mod:`.config_map`
(``config.json`` <-> :class:`MoEModelConfig`, the architecture check), :mod:`.mapping`
(tensor names and layouts), :mod:`.load` (into a model's shards), :mod:`.export` (gather
and write). ``python -m pr2_megatron.models.hf config DIR`` prints the ``model:`` section of a
run config for a checkpoint.
"""

from pr2_megatron.models.hf.config_map import (
    SUPPORTED_MODEL_TYPES,
    check_model_config,
    hf_config_from_moe,
    moe_config_from_hf,
)
from pr2_megatron.models.hf.errors import ConversionError, ConversionNote
from pr2_megatron.models.hf.export import export_config, export_hf_checkpoint, hf_state_dict_shard
from pr2_megatron.models.hf.load import (
    LoadReport,
    load_hf_checkpoint,
    load_hf_weights,
    load_megatron_state,
)
from pr2_megatron.models.hf.mapping import MappingContext, import_plan
from pr2_megatron.models.hf.read import SafetensorsCheckpoint, read_hf_checkpoint

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ConversionError",
    "ConversionNote",
    "LoadReport",
    "MappingContext",
    "SafetensorsCheckpoint",
    "check_model_config",
    "convert_hf_state_dict",
    "export_config",
    "export_hf_checkpoint",
    "hf_config_from_moe",
    "hf_state_dict_shard",
    "import_plan",
    "load_hf_checkpoint",
    "load_hf_weights",
    "load_megatron_state",
    "moe_config_from_hf",
    "read_hf_checkpoint",
]


def convert_hf_state_dict(hf_state, model_cfg, hf_config=None):
    """Hugging Face tensors -> every full (unsharded) Megatron tensor under its global name."""
    plan = import_plan(hf_state.keys(), MappingContext.of(model_cfg, hf_config))
    return {name: build(hf_state) for name, build in plan.build.items()}
