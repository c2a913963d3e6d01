"""Rollout under pipeline and context parallelism: full-forward sampling through the schedules.

Legend: M rollout micro-batches of the rank, B sequences each, S the buffer length, S_c = S/CP,
V vocabulary, L MoE layers of the rank, K top-k.

The KV-cached sampler (:mod:`pr2_megatron.rl.generation`) decodes one model; under PP a forward
crosses every stage and under CP every sequence is split over the CP ranks, so
:func:`generate_scheduled` samples as the full-forward sampler does (one forward over the whole
``[B, S]`` buffer per new token, ``max_new_tokens`` of them), each generation step being one
forward-only Megatron schedule over all M micro-batches (1F1B or interleaved):

* the first stage feeds the buffer (the rank's CP part of it), the last stage takes the logits
  at each sequence's last position: the CP rank that holds that position writes its row, the
  full vocabulary is gathered over TP, and one all-reduce over the CP group gives every CP
  rank the ``[M, B, V]`` logits;
* the last stage samples (each sequence from its own generator, :class:`~pr2_megatron.rl.
  sampling.SampleNoise`, or one per micro-batch) and broadcasts the buffers to every stage;
* every stage's routers record their layers' routes of every forward; each micro-batch's
  routes are assembled from its forwards (:func:`~pr2_megatron.rl.rollout.captured_routes`)
  for the rank's CP part and SP chunk, and the route path gathers them over PP, CP, TP and DP.

Token names for the feature cache are queued for all M forwards of a step before its schedule
(each router consumes them in micro-batch order). Under VPP, M must be a multiple of PP
(Megatron's interleaved schedule); every micro-batch has the same B (p2p shapes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from pr2_megatron.rl.rollout import (
    RolloutMicroBatch,
    _captured_positions,
    _local_positions,
    captured_routes,
    full_vocab_logits,
    numerics,
    prompt_buffer,
    sample_step,
)
from pr2_megatron.rl.sampling import make_noise
from pr2_megatron.rl.schedule import SequenceSlicer, from_last_stage, run_schedule
from pr2_megatron.routes.path import MicroBatch
from pr2_megatron.routes.table import route_dtype

__all__ = ["generate_scheduled"]


@dataclass
class _GenerationBatch:
    """One micro-batch of a generation step: the buffer and each sequence's last position."""

    ids_BS: torch.Tensor
    last_B: torch.Tensor  # position whose logits sample the next token

    def __len__(self) -> int:
        return self.ids_BS.shape[0]


def _last_logits(batch, logits_BSV, slicer: SequenceSlicer, *, vocab: int):
    """Loss function of a generation step: ``[B, V]`` logits at the last positions.

    Rows whose position lies on another CP rank are 0 (the CP all-reduce fills them).
    """
    positions = slicer.positions_of[slicer.rank].to(logits_BSV.device)
    hit_BS = positions.unsqueeze(0) == batch.last_B.to(logits_BSV.device).unsqueeze(1)
    owned_B = hit_BS.any(dim=1)
    local_B = hit_BS.float().argmax(dim=1)
    rows = torch.arange(logits_BSV.shape[0], device=logits_BSV.device)
    picked_BV = logits_BSV[rows, local_B].float() * owned_B.unsqueeze(1)
    full_BV = full_vocab_logits(picked_BV)
    return full_BV.sum() * 0.0, {"last": full_BV[:, :vocab].detach()}


def generate_scheduled(
    chunks: Sequence[torch.nn.Module],
    problems: Sequence[Sequence],
    *,
    seq_len: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    generators: Sequence,
    eos_id: int,
    pad_id: int,
    vocab_size: int,
    device: torch.device,
    path=None,
    sample_ids: Sequence[Sequence[int]] = (),
    dtype: str = "fp32",
) -> list[RolloutMicroBatch]:
    """Sample responses for M micro-batches of ``problems`` under PP/CP; capture their routes.

    ``generators[m]``: micro-batch m's CPU generator or one per sequence; ``sample_ids[m]``
    its sample ids. ``path``'s controller is in the record or predict phase (or None).
    Collective over the whole model-parallel group (every stage, CP and TP rank calls it).
    """
    from megatron.core import parallel_state as ps

    batch_size = len(problems[0])
    if any(len(p) != batch_size for p in problems):
        raise ValueError(
            "rollout under pipeline/context parallelism needs equal micro-batch sizes "
            f"(rollout.micro_batch_size), got {[len(p) for p in problems]}"
        )
    buffers = [prompt_buffer(list(p), seq_len, max_new_tokens, pad_id) for p in problems]
    tokens = torch.stack([t for t, _ in buffers])  # [M, B, S + 1]
    prompt_lens = torch.stack([lens for _, lens in buffers])  # [M, B]
    lengths, active = prompt_lens.clone(), torch.ones_like(prompt_lens, dtype=torch.bool)
    logprobs = torch.zeros(len(problems), batch_size, seq_len)
    controller = None if path is None else path.controller
    recording = controller is not None and controller.phase.value in ("record", "predict")
    first_forward = len(controller.routers[0].recorded) if recording and controller.routers else 0
    keep = [[] for _ in problems]
    last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
    noise = [make_noise(g, batch_size, vocab_size, max_new_tokens) for g in generators]
    slicer = SequenceSlicer(seq_len)
    for step in range(max_new_tokens):
        if recording:
            for m, ids in enumerate(sample_ids):
                captured = _captured_positions(step, prompt_lens[m], lengths[m], active[m], seq_len)
                path.name_tokens(MicroBatch(ids, seq_len), captured)
        micro = [
            _GenerationBatch(tokens[m, :, :seq_len].to(device), (lengths[m] - 1).to(device))
            for m in range(len(problems))
        ]
        with numerics(dtype):
            store = run_schedule(
                chunks,
                micro,
                partial(_last_logits, vocab=vocab_size),
                seq_len=seq_len,
                vocab_size=vocab_size,
                forward_only=True,
            )
        if step > 0:
            for m in range(len(problems)):
                keep[m].append(torch.where(active[m], lengths[m] - 1, -1))
        if last_stage:
            last_MBV = torch.stack([out["last"] for out in store])
            if slicer.group is not None:
                dist.all_reduce(last_MBV, group=slicer.group)
            for m in range(len(problems)):
                sample_step(
                    tokens[m], logprobs[m], lengths[m], active[m], last_MBV[m], step, noise[m],
                    temperature, top_p,
                )  # fmt: skip
        tokens, logprobs, lengths = _share_buffers(tokens, logprobs, lengths, device)
        ended = tokens.gather(2, (lengths - 1).unsqueeze(2)).squeeze(2) == eos_id
        active &= ~ended
    out = [
        RolloutMicroBatch(tokens[m], prompt_lens[m], lengths[m], logprobs[m], list(ids))
        for m, ids in enumerate(sample_ids or [[]] * len(problems))
    ]
    if recording and controller.routers:  # a stage without MoE layers keeps None
        _attach_routes(out, controller, path, first_forward, seq_len, batch_size, keep)
    return out


def _share_buffers(tokens, logprobs, lengths, device):
    """The last stage's buffers on every pipeline stage (CPU copies)."""
    shared = []
    for tensor in (tokens, logprobs, lengths):
        moved = from_last_stage(tensor.to(device), tensor.shape, tensor.dtype, device)
        shared.append(moved.cpu())
    return shared


def _attach_routes(out, controller, path, first_forward, seq_len, batch_size, keep) -> None:
    """Each micro-batch's ``[S_local, B, L, K]`` routes from the interleaved forwards."""
    num = len(out)
    routes = controller.collect_routes()[first_forward:]
    predict = controller.phase.value == "predict"
    plain = controller.collect_plain_routes()[first_forward:] if predict else routes
    positions = _local_positions(seq_len, routes[0].shape[0] // batch_size, path)
    dtype = route_dtype(controller.route_id_bound)
    for m, micro_batch in enumerate(out):
        mine = range(m, len(routes), num)  # forward step·M + m
        micro_batch.routes_SBLK = captured_routes(
            [routes[f] for f in mine],
            positions,
            batch_size,
            micro_batch.prompt_lens,
            keep[m],
            dtype,
        )
        micro_batch.plain_routes_SBLK = captured_routes(
            [plain[f] for f in mine], positions, batch_size, micro_batch.prompt_lens, keep[m], dtype
        )
