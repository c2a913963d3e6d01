"""Layout-free weight initialization: the same weights for the same seed in every layout.

Megatron draws initial weights from the torch RNG in module order, so a pipeline stage, an
expert-parallel rank or a virtual chunk starts its draws at another point of the stream than a
one-process model does: PP=2 and PP=1 on the same seed start from different weights.
:func:`initialize_layout_free` re-draws every matrix of the rank's model chunks from its own
generator, seeded by (seed, the parameter's global name: decoder layer and expert index as in
one process), as a full tensor on the parameter's device, with Megatron's distribution for it
(``output_layer_init_method`` for ``linear_proj`` and ``linear_fc2``, ``embedding_init_method``
for the embedding, ``init_method`` otherwise), and keeps the rank's shard (tensor-parallel
partition; gated FFNs shard gate and up separately, as Megatron does). Vectors (norm weights,
biases) and the zero-initialised PR2 predictors keep their constant initialization.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

__all__ = ["initialize_layout_free"]


def _seed_of(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def _init_method(config, name: str):
    if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
        return config.output_layer_init_method
    if name.startswith("embedding."):
        return getattr(config, "embedding_init_method", None) or config.init_method
    return config.init_method


def _shard(full: torch.Tensor, param, name: str, config) -> torch.Tensor:
    """The rank's tensor-parallel shard of ``full`` (the parameter's layout)."""
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return full
    expert = ".experts." in name and ".shared_experts." not in name
    if expert:
        size = ps.get_expert_tensor_parallel_world_size()
        rank = ps.get_expert_tensor_parallel_rank()
    else:
        size = ps.get_tensor_model_parallel_world_size()
        rank = ps.get_tensor_model_parallel_rank()
    dim = param.partition_dim
    if config.gated_linear_unit and name.endswith("linear_fc1.weight"):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(size, dim=dim)[rank], up.chunk(size, dim=dim)[rank]], dim=dim)
    return full.chunk(size, dim=dim)[rank]


def initialize_layout_free(chunks: Sequence[torch.nn.Module], seed: int) -> int:
    """Re-draw the matrices of every chunk (see the module docstring); returns how many."""
    from megatron.core import parallel_state as ps

    from pr2_megatron.models.parameters import global_parameters
    from pr2_megatron.routing.predictor import is_predictor_parameter

    count = 0
    for chunk in chunks:
        config = chunk.config
        for name, param in global_parameters(chunk).items():
            if param.dim() < 2 or is_predictor_parameter(param):
                continue
            shape = list(param.shape)
            if getattr(param, "tensor_model_parallel", False):
                expert = ".experts." in name and ".shared_experts." not in name
                size = (
                    ps.get_expert_tensor_parallel_world_size()
                    if expert
                    else ps.get_tensor_model_parallel_world_size()
                )
                shape[param.partition_dim] *= size
            full = torch.empty(shape, dtype=torch.float32, device=param.device)
            devices = [param.device] if param.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(_seed_of(seed, name))
                _init_method(config, name)(full)
            with torch.no_grad():
                param.copy_(_shard(full, param, name, config).to(param.dtype))
            count += 1
    return count
