"""Helpers for tests and benchmarks: build a tiny PR2 GPT-MoE and move full weights onto shards.

A reference model built in one process has the *full* parameters; :func:`load_full_state` copies
them into a model built under any TP/EP/PP layout (each rank takes its slice), so a distributed
run can be compared with the single-process reference on identical weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from pr2_megatron.model import MoEModelConfig, build_gpt_moe
from pr2_megatron.parallel import ParallelConfig, initialize_parallel
from pr2_megatron.router import PR2RouterConfig


@dataclass
class TinySetup:
    """Everything a test needs to build the same tiny model in any layout."""

    model: MoEModelConfig = field(default_factory=MoEModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    pr2: PR2RouterConfig = field(default_factory=PR2RouterConfig)
    seed: int = 1234


def build(setup: TinySetup, router: str = "pr2"):
    """Initialise parallel state for ``setup.parallel`` and build the model."""
    initialize_parallel(setup.parallel, seed=setup.seed)
    return build_gpt_moe(setup.model, setup.parallel, setup.pr2, router=router)


def global_state_dict(model) -> dict[str, torch.Tensor]:
    """State of a single-process model keyed by global layer and expert index (detached copies)."""
    return {name: tensor.detach().clone() for name, tensor in global_parameters(model).items()}


def global_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Each parameter of ``model`` (any layout) under its global (single-process) name."""
    from megatron.core import parallel_state

    ep_rank = parallel_state.get_expert_model_parallel_rank()
    out = {}
    layers = model.decoder.layers
    for name, param in model.named_parameters():
        match = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
        if match:
            local, rest = int(match.group(1)), match.group(2)
            layer = layers[local]
            expert = re.match(r"(mlp\.experts\.local_experts\.)(\d+)(\..*)", rest)
            if expert:
                num_local = layer.mlp.num_local_experts
                global_expert = ep_rank * num_local + int(expert.group(2))
                rest = f"{expert.group(1)}{global_expert}{expert.group(3)}"
            name = f"decoder.layers.{layer.layer_number - 1}.{rest}"
        out[name] = param
    return out


def load_full_state(model, full_state: dict[str, torch.Tensor]) -> None:
    """Copy full (single-process) parameters into ``model``'s shards for the current layout."""
    from megatron.core import parallel_state

    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    etp_size = parallel_state.get_expert_tensor_parallel_world_size()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    with torch.no_grad():
        for name, param in global_parameters(model).items():
            full = full_state[name]
            if getattr(param, "tensor_model_parallel", False):
                size, rank = (
                    (etp_size, etp_rank) if ".local_experts." in name else (tp_size, tp_rank)
                )
                full = full.chunk(size, dim=param.partition_dim)[rank]
            if tuple(full.shape) != tuple(param.shape):
                raise ValueError(f"{name}: full slice {tuple(full.shape)} != {tuple(param.shape)}")
            param.copy_(full)


def randomize_predictors(model, scale: float, seed: int) -> None:
    """Give every evolution predictor the same random weights on every rank (test drift)."""
    from pr2_megatron.router import PR2Router

    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, PR2Router):
            weight = module.predictor.weight
            with torch.no_grad():
                weight.copy_(torch.randn(weight.shape, generator=generator) * scale)


def token_batch(batch: int, seq: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(input_ids [B, S], labels [B, S])`` with a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    return ids, labels


def lm_loss(model, ids: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
    """Forward; with labels, mean token cross-entropy (vocab-parallel), else the logits."""
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    out = model(ids, positions, None, labels=labels)
    return out.float().mean() if labels is not None else out


def build_megatron_replay_model(setup: TinySetup):
    """The same model with Megatron's stock ``TopKRouter`` and its own ``RouterReplay`` on."""
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.moe.router import TopKRouter

    from pr2_megatron.model import transformer_config
    from pr2_megatron.specs import pr2_decoder_block_spec

    initialize_parallel(setup.parallel, seed=setup.seed)
    config = transformer_config(setup.model, setup.parallel)
    config.moe_enable_routing_replay = True
    spec = pr2_decoder_block_spec(config, router_builder=TopKRouter)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=setup.model.vocab_size,
        max_sequence_length=setup.model.max_sequence_length,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )
