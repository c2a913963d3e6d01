"""Each parameter of a model shard under its global (single-process) name.

A model built under TP/EP/PP holds local layer indices and local expert indices; the global
name is the one the same parameter has in a model built in one process: decoder layer
``layer_number - 1``, expert ``ep_rank * num_local_experts + local index``. Conversion and
checkpoint code map tensors by these names.
"""

from __future__ import annotations

import re

import torch

__all__ = ["global_parameters"]

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.*)")
_EXPERT = re.compile(r"(mlp\.experts\.local_experts\.)(\d+)(\..*)")


def global_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Each parameter of ``model`` (any layout) under its global (single-process) name."""
    from megatron.core import parallel_state

    ep_rank = parallel_state.get_expert_model_parallel_rank()
    out = {}
    layers = model.decoder.layers
    for name, param in model.named_parameters():
        match = _LAYER.match(name)
        if match:
            local, rest = int(match.group(1)), match.group(2)
            layer = layers[local]
            expert = _EXPERT.match(rest)
            if expert:
                num_local = layer.mlp.num_local_experts
                global_expert = ep_rank * num_local + int(expert.group(2))
                rest = f"{expert.group(1)}{global_expert}{expert.group(3)}"
            name = f"decoder.layers.{layer.layer_number - 1}.{rest}"
        out[name] = param
    return out
