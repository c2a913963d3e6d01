"""Export a Megatron model in any TP / EP / PP layout to a Hugging Face checkpoint.

The layout on disk is what ``save_pretrained`` writes and ``from_pretrained`` reads:
``config.json`` plus ``model.safetensors`` (one writing rank) or
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``, one tensor per
expert (``model.layers.{i}.mlp.experts.{e}.gate_proj.weight``), no PR2 predictors.

**Who writes what.** Every rank writes the tensors it *owns*, each in full: its TP / expert-TP
shards are all-gathered first (collectively, within the TP or expert-TP group), and each
tensor is owned by the lowest global rank that holds it (so data-parallel replicas, and TP
peers after the gather, write nothing twice). So no rank ever holds more than its own stage's
and experts' tensors in full, and the files come out in parallel; rank 0 writes the index and
``config.json`` last, after every rank's file is in place (a directory with a
``config.json`` newer than the files is complete). The directory should be on a file system
every rank sees (the cluster's shared one), as for the trainer's checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from pr2_megatron.models.config import MoEModelConfig
from pr2_megatron.models.hf.config_map import (
    check_model_config,
    config_dict,
    hf_config_from_moe,
    moe_config_from_hf,
)
from pr2_megatron.models.hf.errors import ConversionError
from pr2_megatron.models.hf.load import is_gated_fc1, model_chunks, model_tensors, shard_info
from pr2_megatron.models.hf.mapping import MappingContext, canonical_name, export_rules

__all__ = ["export_config", "export_hf_checkpoint", "hf_state_dict_shard"]

#: Files besides the weights a source checkpoint directory hands on to the export.
COPIED_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template*",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "tiktoken.model",
    "tokenization_*.py",
)
#: Keys of a source ``config.json`` that no longer describe the exported weights.
DROPPED_KEYS = ("quantization_config",)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        dist.barrier()


def _all_gather_objects(value) -> list:
    rank, world = _rank_world()
    if world == 1:
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def _full_tensor(name: str, tensor: torch.Tensor, model_cfg: MoEModelConfig) -> torch.Tensor:
    """The full tensor of this rank's shard (collective over its TP / expert-TP group)."""
    info = shard_info(name, tensor)
    if info is None or info[1] == 1:
        return tensor.detach()
    dim, size, _, group = info
    shards = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(shards, tensor.detach().contiguous(), group=group)
    if is_gated_fc1(name, model_cfg):
        halves = [shard.chunk(2, dim=dim) for shard in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(shards, dim=dim)


def _owners(names: list[str], unknown: list[str]) -> dict[str, int]:
    """Each tensor name -> the lowest global rank holding it (collective).

    Raises on every rank if any rank holds a tensor without a Hugging Face name (so that no
    rank is left waiting in a later collective).
    """
    owners: dict[str, int] = {}
    strays: list[str] = []
    for rank, (held, stray) in enumerate(_all_gather_objects((names, unknown))):
        strays += [f"{name} (rank {rank})" for name in stray]
        for name in held:
            owners.setdefault(name, rank)
    if strays:
        raise ConversionError(
            f"{len(strays)} model tensor(s) have no Hugging Face name: " + ", ".join(strays[:5])
        )
    return owners


def _export_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"export dtype {dtype!r}: use one of {sorted(_DTYPES)} or a torch dtype")
    return _DTYPES[dtype]


def _local_tensors(model, model_cfg, rules):
    """``(canonical name -> (model name, local tensor), names without an HF rule)``."""
    out = {}
    unknown = []
    for name, tensor in model_tensors(model_chunks(model)).items():
        key = canonical_name(name)
        if key in rules:
            out[key] = (name, tensor)
        elif not (model_cfg.tie_embeddings and key == "output_layer.weight"):
            unknown.append(name)
    return out, unknown


def hf_state_dict_shard(
    model,
    model_cfg: MoEModelConfig,
    hf_config: Optional[Mapping] = None,
    dtype: Union[None, str, torch.dtype] = None,
) -> dict[str, torch.Tensor]:
    """The calling rank's share of the model as full Hugging Face tensors (collective).

    The shares of all ranks together are the whole model, each tensor once (see the module
    docstring for who owns what). ``hf_config`` gives the target's conventions (DeepSeek's
    ``rope_interleave``; None: HF's defaults); ``dtype`` casts floating tensors (``fp32``,
    ``bf16``; the router's ``e_score_correction_bias`` stays float32). CPU tensors.
    """
    rules = export_rules(MappingContext.of(model_cfg, hf_config))
    local, unknown = _local_tensors(model, model_cfg, rules)
    owners = _owners(sorted(local), unknown)
    absent = [name for name in rules if name not in owners]
    if absent:
        raise ConversionError(
            f"{len(absent)} tensor(s) of the model were found on no rank: " + ", ".join(absent[:5])
        )
    rank, _ = _rank_world()
    cast = _export_dtype(dtype)
    out: dict[str, torch.Tensor] = {}
    # Non-expert tensors first (TP group), then experts (expert-TP group): the same order on
    # every member of a group, so the gathers pair up.
    ordered = sorted(local, key=lambda n: (".local_experts." in n, n))
    for key in ordered:
        name, tensor = local[key]
        full = _full_tensor(name, tensor, model_cfg)
        if owners[key] != rank:
            continue
        rule = rules[key]
        for hf_name, value in zip(rule.hf, rule.transform.to_hf(full)):
            value = value.detach().to("cpu", copy=True).contiguous()
            keep_fp32 = "e_score_correction" in hf_name
            if cast is not None and value.is_floating_point() and not keep_fp32:
                value = value.to(cast)
            out[hf_name] = value
    return out


def export_config(
    model_cfg: MoEModelConfig,
    hf_config: Optional[Any] = None,
    dtype: Union[None, str, torch.dtype] = None,
) -> dict:
    """The ``config.json`` of an export.

    With ``hf_config`` (the source checkpoint's config: a dict, a transformers config) it is
    that config, checked against ``model_cfg`` (ConversionError naming the keys), without its
    ``quantization_config`` and multi-token-prediction layers; else it is generated from
    ``model_cfg`` (:func:`hf_config_from_moe`).
    """
    if hf_config is None:
        config = hf_config_from_moe(model_cfg)
    else:
        config = config_dict(hf_config)
        check_model_config(model_cfg, moe_config_from_hf(config), what="the source config.json")
        for key in DROPPED_KEYS:
            config.pop(key, None)
        for key in ("num_nextn_predict_layers", "num_mtp_layers"):
            if key in config:
                config[key] = 0
    cast = _export_dtype(dtype)
    weights = cast or (torch.bfloat16 if model_cfg.params_dtype == "bf16" else torch.float32)
    config["dtype"] = config["torch_dtype"] = _DTYPE_NAMES[weights]
    return config


def _prepare_directory(out: Path) -> None:
    """Rank 0: create ``out`` and remove the weights and index of an earlier export."""
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model*.safetensors.*")):
        old.unlink()
    (out / "config.json").unlink(missing_ok=True)


def _file_names(sizes: list[int]) -> list[Optional[str]]:
    """The weight file of each rank (None: it owns nothing), HF's sharded naming."""
    writers = [rank for rank, size in enumerate(sizes) if size]
    names: list[Optional[str]] = [None] * len(sizes)
    for index, rank in enumerate(writers):
        names[rank] = (
            "model.safetensors"
            if len(writers) == 1
            else f"model-{index + 1:05d}-of-{len(writers):05d}.safetensors"
        )
    return names


def _write_index(out: Path, shards: list, names: list[Optional[str]]) -> None:
    weight_map, total = {}, 0
    for (keys, size), name in zip(shards, names):
        total += size
        weight_map.update({key: name for key in keys})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _copy_side_files(source: Optional[Path], out: Path) -> None:
    if source is None:
        return
    for pattern in COPIED_FILES:
        for file in source.glob(pattern):
            if file.is_file():
                shutil.copy2(file, out / file.name)


def export_hf_checkpoint(
    model,
    model_cfg: MoEModelConfig,
    out: Union[str, Path],
    hf_config: Union[None, str, Path, Mapping, Any] = None,
    dtype: Union[None, str, torch.dtype] = None,
) -> Path:
    """Write ``model`` (a model or a rank's chunks, any layout) as a Hugging Face checkpoint.

    Collective: every rank calls it. ``hf_config`` is the source: a checkpoint directory
    (its ``config.json`` is reused and its tokenizer files copied), a config dict or a
    transformers config; None generates ``config.json`` from ``model_cfg``. ``dtype`` casts
    the weights (None: the model's). Returns ``out``.
    """
    out = Path(out)
    source = None
    if isinstance(hf_config, (str, Path)):
        source = Path(hf_config)
        hf_config = json.loads((source / "config.json").read_text())
    config = export_config(model_cfg, hf_config, dtype)
    rank, _ = _rank_world()
    if rank == 0:
        _prepare_directory(out)
    _barrier()
    shard = hf_state_dict_shard(model, model_cfg, config, dtype)
    size = sum(t.numel() * t.element_size() for t in shard.values())
    shards = _all_gather_objects((sorted(shard), size))
    names = _file_names([s for _, s in shards])
    if names[rank] is not None:
        from safetensors.torch import save_file

        target = out / names[rank]
        tmp = target.with_name(target.name + ".tmp")
        save_file(shard, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, target)
    _barrier()
    if rank == 0:
        if sum(name is not None for name in names) > 1:
            _write_index(out, shards, names)
        _copy_side_files(source, out)
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _barrier()
    return out
