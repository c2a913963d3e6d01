"""Helpers for tests and benchmarks: build a tiny PR2 GPT-MoE and move full weights onto shards.

A reference model built in one process has the *full* parameters; :func:`load_full_state` copies
them into a model built under any TP/EP/PP layout (each rank takes its slice), so a distributed
run can be compared with the single-process reference on identical weights.
:func:`forward_backward` runs Megatron's pipeline schedules (PP, VPP) over a rank's model chunks
(:func:`build_chunks`), on CPU too (:func:`pipeline_on_cpu`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from pr2_megatron.models import MoEModelConfig, build_gpt_moe
from pr2_megatron.models.parameters import global_parameters
from pr2_megatron.routing.router import PR2RouterConfig
from pr2_megatron.runtime.cpu import pipeline_on_cpu
from pr2_megatron.runtime.parallel import ParallelConfig, initialize_parallel


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
    from pr2_megatron.routing.router import PR2Router

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

    from pr2_megatron.models.builder import transformer_config
    from pr2_megatron.routing.specs import pr2_decoder_block_spec

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


# ------------------------------------------------------------------ pipeline schedules on CPU
def forward_backward(
    model_chunks: Sequence[torch.nn.Module],
    forward_step_func,
    micro_batches: Sequence,
    *,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
) -> list:
    """Run Megatron's schedule for the current PP/VPP layout over ``micro_batches``.

    Every model chunk gets its own iterator over the same micro-batches (chunks after the
    first take their input from the previous stage, but still draw their micro-batch).
    Returns the schedule's ``forward_data_store`` (on the last stage: what the loss function
    returned as its last element, per micro-batch).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = list(model_chunks)
    schedule = get_forward_backward_func()
    with pipeline_on_cpu(chunks):
        return schedule(
            forward_step_func=forward_step_func,
            data_iterator=[iter(list(micro_batches)) for _ in chunks],
            model=chunks,
            num_microbatches=len(micro_batches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )


def build_chunks(setup: TinySetup, router: str = "pr2") -> list[torch.nn.Module]:
    """Initialise parallel state and build this rank's model chunks (one per VPP stage)."""
    initialize_parallel(setup.parallel, seed=setup.seed)
    vpp = setup.parallel.virtual_pipeline_model_parallel_size
    stages = [None] if vpp is None else list(range(vpp))
    return [
        build_gpt_moe(setup.model, setup.parallel, setup.pr2, router=router, vp_stage=stage)
        for stage in stages
    ]


def chunks_global_parameters(model_chunks: Sequence[torch.nn.Module]) -> dict:
    """:func:`global_parameters` of every chunk of a rank (VPP), in one dict."""
    out: dict[str, torch.nn.Parameter] = {}
    for chunk in model_chunks:
        out.update(global_parameters(chunk))
    return out


def mla_build_blocker(model: MoEModelConfig) -> Optional[str]:
    """Why this installed megatron-core cannot build ``model``'s MLA here, or None.

    Core 0.19.2 fuses a full-rank-query MLA's q norm into ``linear_q_proj``, a fused norm +
    linear only Transformer Engine provides; tests skip such a model without TE.
    """
    from pr2_megatron.routing.compat import megatron_features

    features = megatron_features()
    if (
        model.multi_latent_attention
        and model.q_lora_rank is None
        and model.qk_norm == "head"
        and features.mla_full_rank_q_fuses_q_norm
        and not features.have_te
    ):
        return (
            f"megatron-core {features.version} fuses a full-rank-query MLA's q norm into "
            "linear_q_proj (Transformer Engine only)"
        )
    return None
