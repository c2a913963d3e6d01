"""Loading full tensors into a model's shards, and a Hugging Face checkpoint into a run."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from pr2_megatron.models.config import MoEModelConfig
from pr2_megatron.models.hf.config_map import check_model_config, config_dict, moe_config_from_hf
from pr2_megatron.models.hf.errors import ConversionError, note
from pr2_megatron.models.hf.mapping import MappingContext, canonical_name, import_plan
from pr2_megatron.models.hf.read import read_hf_checkpoint

__all__ = [
    "LoadReport",
    "load_hf_checkpoint",
    "load_hf_weights",
    "load_megatron_state",
    "model_chunks",
    "model_tensors",
]

_GATED_FC1 = re.compile(r"(^|\.)linear_fc1\.weight$")
#: Buffers a model must be given (a silent zero here changes the routing).
REQUIRED_BUFFERS = (".mlp.router.expert_bias",)


def model_chunks(model) -> list:
    """A model, or a rank's list of model chunks (VPP), as a list."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def shard_info(name: str, tensor) -> Optional[tuple[int, int, int, Any]]:
    """``(dim, size, rank, group)`` of a tensor-parallel tensor's shard; None if replicated.

    Experts are sliced over the expert-tensor-parallel group, the rest over TP.
    """
    from megatron.core import parallel_state as ps

    if not getattr(tensor, "tensor_model_parallel", False):
        return None
    if ".local_experts." in name:
        size = ps.get_expert_tensor_parallel_world_size()
        rank = ps.get_expert_tensor_parallel_rank()
        group = ps.get_expert_tensor_parallel_group() if size > 1 else None
    else:
        size = ps.get_tensor_model_parallel_world_size()
        rank = ps.get_tensor_model_parallel_rank()
        group = ps.get_tensor_model_parallel_group() if size > 1 else None
    return tensor.partition_dim, size, rank, group


def is_gated_fc1(name: str, model_cfg: MoEModelConfig) -> bool:
    """A SwiGLU ``linear_fc1`` (``[gate; up]``: TP slices each half)."""
    return model_cfg.activation == "swiglu" and bool(_GATED_FC1.search(name))


def shard_of(full: torch.Tensor, name: str, tensor, model_cfg: MoEModelConfig) -> torch.Tensor:
    """The calling rank's slice of ``full``, the full tensor of ``tensor`` named ``name``.

    A gated ``linear_fc1`` is sliced as gate and up halves separately (Megatron keeps
    ``[gate_r; up_r]`` on TP rank r).
    """
    info = shard_info(name, tensor)
    if info is None or info[1] == 1:
        return full
    dim, size, rank, _ = info
    if is_gated_fc1(name, model_cfg):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(size, dim=dim)[rank], up.chunk(size, dim=dim)[rank]], dim=dim)
    return full.chunk(size, dim=dim)[rank]


def model_tensors(chunks) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer of the chunks under its global name.

    The PR2 predictors are left out (they keep their zero initialisation).
    """
    from pr2_megatron.models.parameters import global_buffers, global_parameters
    from pr2_megatron.routing.predictor import is_predictor_parameter

    out: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        out.update(
            {n: p for n, p in global_parameters(chunk).items() if not is_predictor_parameter(p)}
        )
        out.update(global_buffers(chunk))
    return out


def load_megatron_state(model, full_state: Mapping[str, torch.Tensor], model_cfg: MoEModelConfig):
    """Copy full tensors (global names) into ``model``'s shards for the current TP/EP/PP layout.

    ``model`` is a model or a rank's model chunks. Tensor-parallel weights are sliced on their
    partition dim (:func:`shard_of`). Every parameter other than the PR2 predictors must be
    given; so must the router's ``expert_bias`` buffer where the model has one (other
    persistent buffers are loaded when given). Names may be TE-spec names (fused norms).
    """
    missing = []
    with torch.no_grad():
        for name, tensor in model_tensors(model_chunks(model)).items():
            key = canonical_name(name)
            is_buffer = not isinstance(tensor, torch.nn.Parameter)
            if key not in full_state:
                if not is_buffer or name.endswith(REQUIRED_BUFFERS):
                    missing.append(name)
                continue
            full = shard_of(full_state[key], name, tensor, model_cfg)
            if tuple(full.shape) != tuple(tensor.shape):
                raise ConversionError(
                    f"{name}: converted tensor {tuple(full.shape)} does not fit the model's "
                    f"{tuple(tensor.shape)}"
                )
            tensor.copy_(full.to(tensor.dtype))
    if missing:
        raise ConversionError(
            f"{len(missing)} model tensor(s) got no converted tensor: "
            + ", ".join(missing[:5])
            + (" ..." if len(missing) > 5 else "")
        )


class _PlannedState(Mapping):
    """Converted tensors built on access (a rank builds only the tensors it loads)."""

    def __init__(self, build: dict, hf_state: Mapping[str, torch.Tensor]) -> None:
        self._build = build
        self._hf_state = hf_state

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._build[name](self._hf_state)

    def __iter__(self):
        return iter(self._build)

    def __len__(self) -> int:
        return len(self._build)

    def __contains__(self, name) -> bool:
        return name in self._build


@dataclass
class LoadReport:
    """What :func:`load_hf_checkpoint` did (also given as :class:`ConversionNote` warnings)."""

    path: str
    model_type: str
    #: HF tensors read by this rank (its shards' tensors only), sorted.
    keys_read: list[str] = field(default_factory=list)
    #: FP8 tensors this rank dequantised.
    dequantized: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def tensors_read(self) -> int:
        """How many HF tensors this rank read."""
        return len(self.keys_read)


class _CountingState(Mapping):
    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state = state
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        return self.state[key]

    def __iter__(self):
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)

    def __contains__(self, key) -> bool:
        return key in self.state


def load_hf_weights(
    model,
    model_cfg: MoEModelConfig,
    hf_state: Mapping[str, torch.Tensor],
    hf_config: Optional[Any] = None,
) -> list[str]:
    """Convert Hugging Face tensors and load them into ``model`` (this rank's shards only).

    ``model`` is a model or a rank's model chunks; ``hf_state`` may be the lazy mapping of
    :func:`read_hf_checkpoint`: a rank then reads from disk only the tensors of what it holds
    (its experts, its pipeline stage; a TP rank reads the full tensor and keeps its slice).
    ``hf_config`` gives layout conventions (DeepSeek's ``rope_interleave``; None: HF's
    defaults). Returns the HF keys skipped (multi-token-prediction layers).
    """
    config = None if hf_config is None else config_dict(hf_config)
    plan = import_plan(hf_state.keys(), MappingContext.of(model_cfg, config))
    load_megatron_state(model, _PlannedState(plan.build, hf_state), model_cfg)
    return plan.skipped_mtp


def load_hf_checkpoint(
    model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
    model_cfg: MoEModelConfig,
    path: Union[str, Path],
) -> LoadReport:
    """Load the Hugging Face checkpoint directory ``path`` into a freshly built model.

    ``path`` holds ``config.json`` + ``*.safetensors``; this is the trainer's one call after
    building the model.

    The model config derived from ``config.json`` (:func:`moe_config_from_hf`) must match
    ``model_cfg`` in every architecture key (else ConversionError naming the keys); then every
    rank loads its shards' tensors, read lazily from disk, buffers (``expert_bias``) included;
    the PR2 predictors keep their zero initialisation. Multi-token-prediction layers are
    skipped and FP8 weights dequantised, each with a :class:`ConversionNote`.
    """
    hf_config, hf_state = read_hf_checkpoint(path)
    check_model_config(model_cfg, moe_config_from_hf(hf_config))
    counting = _CountingState(hf_state)
    skipped = load_hf_weights(model, model_cfg, counting, hf_config)
    report = LoadReport(str(path), hf_config["model_type"], keys_read=sorted(counting.read))
    report.dequantized = getattr(hf_state, "dequantized", 0)
    if skipped:
        layers = sorted({int(k.split(".")[2]) for k in skipped})
        report.notes.append(
            note(
                f"{path}: skipped {len(skipped)} tensors of multi-token-prediction layer(s) "
                f"{layers} (model.layers.{model_cfg.num_layers}+; the Megatron model has none)"
            )
        )
    if report.dequantized:
        report.notes.append(
            note(f"{path}: dequantised {report.dequantized} FP8 block-scaled tensors to float32")
        )
    return report
