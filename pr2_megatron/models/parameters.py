"""Each parameter of a model shard under its global (single-process) name.

A model built under TP/EP/PP holds local layer indices and local expert indices; the global
name is the one the same parameter has in a model built in one process: decoder layer
``layer_number - 1``, expert ``ep_rank * num_local_experts + local index``. Conversion and
checkpoint code map tensors by these names.
"""

from __future__ import annotations

import re

import torch

__all__ = ["global_buffers", "global_parameters"]

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.*)")
_EXPERT = re.compile(r"(mlp\.experts\.local_experts\.)(\d+)(\..*)")


def global_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Each parameter of ``model`` (any layout) under its global (single-process) name."""
    return {_global_name(model, name): param for name, param in model.named_parameters()}


def global_buffers(model) -> dict[str, torch.Tensor]:
    """Each persistent buffer of ``model`` (the router's ``expert_bias``) by global name.

    Non-persistent buffers (token counts), which are not in the state dict, are left out.
    """
    out = {}
    for module_name, module in model.named_modules():
        skipped = getattr(module, "_non_persistent_buffers_set", set())
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is None or name in skipped:
                continue
            full = f"{module_name}.{name}" if module_name else name
            out[_global_name(model, full)] = buffer
    return out


def _global_name(model, name: str) -> str:
    """The global (single-process) name of the local parameter or buffer ``name``."""
    from megatron.core import parallel_state

    match = _LAYER.match(name)
    if not match:
        return name
    local, rest = int(match.group(1)), match.group(2)
    layer = model.decoder.layers[local]
    expert = _EXPERT.match(rest)
    if expert:
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        global_expert = ep_rank * layer.mlp.num_local_experts + int(expert.group(2))
        rest = f"{expert.group(1)}{global_expert}{expert.group(3)}"
    return f"decoder.layers.{layer.layer_number - 1}.{rest}"
