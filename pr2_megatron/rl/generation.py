"""KV-cached rollout: incremental decoding on megatron-core's ``StaticInferenceContext``.

Legend: B sequences of a micro-batch, S the buffer length (``seq_len``), P0 the prefill length,
F decoding forwards, L MoE layers of this rank, K top-k, V vocabulary.

:func:`generate` is the rollout sampler of the trainer. It decodes with a KV cache
(:func:`generate_cached`) wherever the cache runs, CPU included, and falls back to the
full-forward sampler (:func:`pr2_megatron.rl.rollout.generate_full_forward`) with a one-line
notice where it does not (:func:`kv_cache_unsupported`: tensor parallelism with sequence
parallelism, whose ``S/TP`` split cannot cut a one-token decoding step).

The scheme is the one of Megatron's static engine
(``TextGenerationController.generate_all_output_tokens_static_batch``), driven directly:

* prompts are right-padded as in training; one *prefill* forward feeds positions ``[0, P0)``,
  P0 the shortest prompt of the whole decode group (so every rank prefills the same shape);
* then one forward per position t feeds token t of every sequence: a sequence still inside its
  prompt is teacher-forced with its own prompt token, one past it gets the token sampled from
  the previous forward. Positions are training's (0-based, right padding; RoPE positions come
  from the context's offset) and no attention mask is needed: a sequence never attends to a
  position after its own.
* Each forward covers one window of positions, the same for every sequence, so its routes
  belong to known positions: ``[P0·B, L, K]`` from the prefill, ``[B, L, K]`` from each
  decoding forward (the router sees only the new tokens). Each token's route is kept from the
  forward that consumed it and offered once to the predictor's feature cache, under
  :class:`~pr2_megatron.routes.RoutePath`'s names (``name_tokens(..., start=t)``).
* Generation stops when no sequence of the *decode group* needs another forward: every rank
  whose collectives a forward joins (the tensor-parallel group; the expert-parallel group of the
  dispatcher) all-reduces (MAX) "this rank still needs a forward" before each decoding forward,
  and a rank whose sequences have all finished runs the remaining forwards idle. Nothing hangs
  and nothing runs ``max_new_tokens`` steps for nothing.

Sampling uses :class:`~pr2_megatron.rl.sampling.StepNoise`: the k-th new token of sequence b
uses row b of the k-th ``[B, V]`` noise block, exactly as the full-forward sampler, so both draw
the same tokens from the same generator (equal up to numerics: the cached forward computes the
same math on other shapes, about 1e-7 apart in fp32). Rollout numerics stay ``dtype``
(``fp32``, or ``bf16`` autocast with the KV cache in bf16).

Differences from the full-forward sampler, by design: the model runs in eval mode (no dropout
at rollout; the full-forward sampler ran the training mode's dropout when ``model.dropout > 0``),
and ProbMoE routers that sample subsets at rollout (``probmoe.sample: always``) sample each
token's subset once, in the forward that consumes it (the full-forward sampler re-sampled the
earlier positions in every step, so later tokens saw other routes than the recorded ones).
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.distributed as dist

from pr2_megatron.rl.rollout import (
    RolloutMicroBatch,
    generate_full_forward,
    model_device,
    numerics,
    prompt_buffer,
)
from pr2_megatron.rl.sampling import make_noise, sample_with_noise
from pr2_megatron.rl.tasks import Problem
from pr2_megatron.routes.path import MicroBatch
from pr2_megatron.routes.table import route_dtype

__all__ = ["decode_group", "generate", "generate_cached", "kv_cache_unsupported"]

_NOTICES: set[str] = set()


def _unwrap(model):
    """The ``GPTModel`` inside wrappers (DDP, Float16Module) that keep it as ``.module``."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def kv_cache_unsupported(model) -> Optional[str]:
    """Why :func:`generate_cached` cannot run ``model`` in this layout, or None when it can.

    Tensor parallelism with sequence parallelism: a decoding forward has one token per
    sequence, which the ``S/TP`` sequence split cannot cut. Megatron's static engine turns
    sequence parallelism off outside the MoE layers for TP×EP and refuses it otherwise; here the
    routes and feature-cache names of PR2 follow the SP chunks of the route path, so the
    rollout falls back to the full forward instead. (megatron-core 0.16.1's MoE layer refuses
    TP without SP in training mode, so every trainer layout with TP > 1 has SP and falls back;
    TP without SP decodes with the cache, in eval mode.) Pipeline and context parallelism are
    not supported by either sampler (ValueError from :func:`generate`).
    """
    config = _unwrap(model).config
    if config.sequence_parallel and config.tensor_model_parallel_size > 1:
        return (
            f"tensor parallelism with sequence parallelism (TP={config.tensor_model_parallel_size}"
            "): a one-token decoding step cannot be split over the TP ranks"
        )
    return None


def _check_layout(model) -> None:
    config = _unwrap(model).config
    if config.pipeline_model_parallel_size > 1 or config.context_parallel_size > 1:
        raise ValueError(
            "rollout sampling runs TP/SP/EP/DP layouts; pipeline_model_parallel_size="
            f"{config.pipeline_model_parallel_size} and context_parallel_size="
            f"{config.context_parallel_size} are not supported by the rollout samplers"
        )


def _notice(message: str) -> None:
    """Print ``message`` once per process (rank 0 of the world, or the only process)."""
    if message in _NOTICES:
        return
    _NOTICES.add(message)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"pr2-train: {message}", file=sys.stderr, flush=True)


def generate(
    model,
    problems: list[Problem],
    *,
    seq_len: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    generator,
    eos_id: int,
    pad_id: int,
    path=None,
    sample_ids: Optional[list[int]] = None,
    dtype: str = "fp32",
    kv_cache: bool = True,
) -> RolloutMicroBatch:
    """Sample responses for one micro-batch and capture their routes (the trainer's sampler).

    KV-cached decoding (:func:`generate_cached`) when ``kv_cache`` and the layout allows it;
    else the full-forward sampler (:func:`~pr2_megatron.rl.rollout.generate_full_forward`),
    with a one-line notice when the cache was asked for but cannot run. Both take the same
    arguments and return the same :class:`~pr2_megatron.rl.rollout.RolloutMicroBatch`.
    ``generator``: one CPU ``torch.Generator`` for the micro-batch (:class:`~pr2_megatron.rl.
    sampling.StepNoise`), or one per sequence (:class:`~pr2_megatron.rl.sampling.SampleNoise`:
    the tokens then do not depend on how samples are grouped into micro-batches).
    """
    _check_layout(model)
    kwargs = dict(
        seq_len=seq_len,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        generator=generator,
        eos_id=eos_id,
        pad_id=pad_id,
        path=path,
        sample_ids=sample_ids,
        dtype=dtype,
    )
    if kv_cache:
        reason = kv_cache_unsupported(model)
        if reason is None:
            return generate_cached(model, problems, **kwargs)
        _notice(f"rollout without KV cache (full forward per token): {reason}")
    return generate_full_forward(model, problems, **kwargs)


def decode_group() -> Optional[dist.ProcessGroup]:
    """The ranks that must run the same number of rollout forwards (None: this rank alone).

    A forward joins the tensor-parallel group's collectives (attention, MLP, logits) and the
    expert-parallel dispatcher's (alltoall / allgather over EP×ETP). With only one of them the
    group is that one; with both, the tensor-and-data-parallel group (it contains both, and
    with them every rank transitively tied to this one's forwards).
    """
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    expert = ps.get_expert_tensor_and_model_parallel_group()
    expert_size = dist.get_world_size(expert) if expert is not None else 1
    if tp == 1 and expert_size == 1:
        return None
    if expert_size == 1:
        return ps.get_tensor_model_parallel_group()
    if tp == 1:
        return expert
    return ps.get_tensor_and_data_parallel_group(with_context_parallel=True)


def _group_max(values: list[int], group) -> list[int]:
    """Element-wise MAX of small integers over ``group`` (identity without a group).

    The tensor lives where the group's backend wants it (NCCL: the current CUDA device).
    """
    if group is None:
        return values
    device = "cpu"
    if torch.cuda.is_available() and dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    tensor = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor.tolist()


def generate_cached(
    model,
    problems: list[Problem],
    *,
    seq_len: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    generator,
    eos_id: int,
    pad_id: int,
    path=None,
    sample_ids: Optional[list[int]] = None,
    dtype: str = "fp32",
) -> RolloutMicroBatch:
    """KV-cached sampling of one micro-batch (arguments as the full-forward sampler's).

    ``eos_id`` ends a response, ``pad_id`` fills the buffer. ``path`` (a RoutePath whose
    controller is in the ``record`` or ``predict`` phase, or None) supplies the routes of the
    forwards this call runs; in the predict phase the feature cache is offered each token once
    under the path's names of ``sample_ids`` (default ``0..B-1``). Collective over
    :func:`decode_group`: every rank of it must call, with the same ``seq_len`` and B.
    ValueError for a layout the cache does not run (:func:`kv_cache_unsupported`).
    """
    from megatron.core.inference.contexts import StaticInferenceContext

    _check_layout(model)
    reason = kv_cache_unsupported(model)
    if reason is not None:
        raise ValueError(f"KV-cached generation cannot run: {reason}")
    batch = len(problems)
    sample_ids = list(range(batch)) if sample_ids is None else list(sample_ids)
    tokens_BS, prompt_lens_B = prompt_buffer(problems, seq_len, max_new_tokens, pad_id)
    lengths_B = prompt_lens_B.clone()
    finished_B = torch.zeros(batch, dtype=torch.bool)
    logprobs_BS = torch.zeros(batch, seq_len)
    controller = None if path is None else path.controller
    recording = (
        controller is not None
        and bool(controller.routers)
        and controller.phase.value in ("record", "predict")
    )
    first_forward = len(controller.routers[0].recorded) if recording else 0
    group = decode_group()
    # One collective for the prefill shape: the group's shortest prompt, and its B (equal B
    # is required: the allgather dispatcher gathers equal shapes).
    neg_p0, batch_max, neg_batch_min = _group_max([-int(prompt_lens_B.min()), batch, -batch], group)
    p0 = -neg_p0
    if batch_max != -neg_batch_min:
        raise ValueError(
            f"KV-cached generation needs the same micro-batch size on every rank of the decode "
            f"group; this rank has {batch}, others between {-neg_batch_min} and {batch_max}"
        )
    device = model_device(model)
    context = StaticInferenceContext(batch, seq_len)
    context.materialize_only_last_token_logits = True  # only the last position is sampled
    noise = None  # StepNoise or SampleNoise, once the vocabulary size is known
    captured_FB: list[torch.Tensor] = []  # decoding forwards: which rows keep their route
    inner = _unwrap(model)
    was_training = inner.training
    inner.eval()  # Megatron's inference branches test `not self.training`
    try:
        start, width = 0, p0
        while True:
            position = start + width - 1  # the position whose logits this forward samples from
            step_B = position - prompt_lens_B + 1  # which new token each sequence would sample
            sampling_B = (step_B >= 0) & (step_B < max_new_tokens) & ~finished_B
            in_prompt_B = position < prompt_lens_B - 1
            if start > 0:
                captured_B = in_prompt_B | sampling_B
                (needed,) = _group_max([int(bool(captured_B.any()))], group)
                if not needed:
                    break
                if position >= seq_len:
                    raise ValueError(
                        f"the decode group needs position {position}, beyond seq_len={seq_len} "
                        "of this rank (every rank must pass the same seq_len)"
                    )
                captured_FB.append(captured_B)
            if recording:
                names = MicroBatch(sample_ids, width)
                captured_SB = None if start == 0 else captured_B.unsqueeze(0)
                path.name_tokens(names, captured_SB, start=start)
            ids_BW = tokens_BS[:, start : start + width].to(device)
            positions_BW = torch.arange(start, start + width, device=device).expand(batch, -1)
            with torch.no_grad(), numerics(dtype):
                logits_B1V = model(
                    ids_BW,
                    positions_BW,
                    None,
                    inference_context=context,
                    runtime_gather_output=True,
                )
            context.increment_sequence_len_offset(width)
            if noise is None:
                noise = make_noise(generator, batch, logits_B1V.shape[-1], max_new_tokens)
            rows_R = torch.nonzero(sampling_B).squeeze(-1)
            if rows_R.numel():
                noise_RV = noise.take(step_B[rows_R], rows_R, ~finished_B)
                new_R, logprob_R = sample_with_noise(
                    logits_B1V[rows_R.to(device), -1], temperature, top_p, noise_RV
                )
                new_R, logprob_R = new_R.cpu(), logprob_R.float().cpu()
                tokens_BS[rows_R, position + 1] = new_R
                logprobs_BS[rows_R, position] = logprob_R
                lengths_B[rows_R] = position + 2
                for row in rows_R[new_R == eos_id].tolist():
                    finished_B[row] = True
                    noise.drop_row(row)
            if position + 1 >= int(prompt_lens_B.max()) - 1:
                context.enable_decode_mode()  # every sequence is past its prompt
            start, width = start + width, 1
    finally:
        inner.train(was_training)
    noise.finish()
    out = RolloutMicroBatch(tokens_BS, prompt_lens_B, lengths_B, logprobs_BS, sample_ids)
    if recording:
        out.routes_SBLK, out.plain_routes_SBLK = _decoded_routes(
            controller, first_forward, seq_len, batch, p0, captured_FB
        )
    return out


def _decoded_routes(controller, first_forward, seq_len, batch, p0, captured_FB):
    """``[S, B, L, K]`` routes (and plain-replay routes) of one :func:`generate_cached` call.

    Forward 0 is the prefill (positions ``[0, P0)``, all kept); forward ``f >= 1`` fed position
    ``P0 + f - 1`` and keeps the rows of ``captured_FB[f - 1]``. Positions never kept are 0.
    """
    routes = controller.collect_routes()[first_forward:]
    if controller.phase.value == "predict":
        plain = controller.collect_plain_routes()[first_forward:]
    else:
        plain = routes
    if len(routes) != 1 + len(captured_FB):
        raise RuntimeError(
            f"the routers recorded {len(routes)} forwards of this generation, expected "
            f"{1 + len(captured_FB)} (another forward ran in the middle of it?)"
        )
    dtype = route_dtype(controller.route_id_bound)
    layers, topk = routes[0].shape[1:]
    outs = []
    for per_forward in (routes, plain):
        out_SBLK = torch.zeros((seq_len, batch, layers, topk), dtype=dtype)
        out_SBLK[:p0] = per_forward[0].view(p0, batch, layers, topk).to(dtype)
        if captured_FB:
            decoded_FBLK = torch.stack(per_forward[1:]).view(-1, batch, layers, topk).to(dtype)
            keep_FB11 = torch.stack(captured_FB)[:, :, None, None]
            out_SBLK[p0 : p0 + len(captured_FB)] = decoded_FBLK * keep_FB11
        outs.append(out_SBLK)
    return outs[0], outs[1]
