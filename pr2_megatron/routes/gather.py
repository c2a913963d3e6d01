"""Route communication: every rank's rollout routes -> one route table on every rank.

Legend: S sequence (micro-batch length), B samples in a micro-batch, T = S·B tokens (Megatron's
``[S, B]`` order, s-major), L MoE layers, K top-k, P parts (replayed routes, and the plain-replay
route when it travels with them).

Rollout (capture): every forward on every rank yields ``[T_local, L_local, K]`` for the rank's
tokens and the rank's MoE layers. The pieces are put back together group by group, each in
**one collective per micro-batch for all layers at once** (the data-parallel one carries the
sample ids and lengths in the same buffer). Routes travel in the table's smallest dtype as raw
bytes (``uint8`` on the wire, a dtype every backend supports: NCCL has no int16):

* pipeline parallelism (``pp_group``): a stage -- with VPP all its model chunks -- routes only
  its own layers, so the layer dimension is gathered over the pipeline group. A stage without
  MoE layers takes part all the same (it passes no routes);
* sequence parallelism (``tp_group``): a rank routes ``S/TP`` of the sequence (of its context
  parallel part), so the tensor-parallel ranks' sequence chunks are concatenated;
* context parallelism (``cp_group``): a rank holds 2 of ``2·CP`` sequence chunks (Megatron's
  load-balanced split, :func:`context_parallel_positions`); they are put back in sequence order;
* data parallelism (``data_group``, which contains the expert-parallel ranks of a layer): ranks
  holding other samples exchange theirs.

The pipeline / sequence / context gathers are in :mod:`.model_parallel`, the data-parallel
buffer and the table's assembly in :mod:`.wire`. Training (replay) takes its targets from the
table: :mod:`pr2_megatron.routes.targets`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist

from pr2_megatron.errors import RouteError
from pr2_megatron.routes.checks import _BAD_LENGTHS, FirstProblem
from pr2_megatron.routes.model_parallel import _model_parallel_gather, _PipelineLayout
from pr2_megatron.routes.table import RouteTable, route_dtype
from pr2_megatron.routes.targets import local_positions
from pr2_megatron.routes.wire import _assemble, _ForwardBuffers, _group_size

__all__ = ["gather_route_table"]


def _forward_shapes(routes_per_forward, layout, sample_ids_per_forward):
    """``(B, S_local)`` of every forward (a stage without MoE layers learns them from others)."""
    shapes = []
    for forward, sample_ids in enumerate(sample_ids_per_forward):
        batch = len(sample_ids)
        if routes_per_forward is None:
            tokens = layout.tokens_per_forward[forward]
        else:
            tokens = int(routes_per_forward[forward].shape[0])
        if batch == 0 or tokens % batch:
            raise RouteError(
                f"forward {forward}: {tokens} token rows are not a multiple of its {batch} samples"
            )
        shapes.append((batch, tokens // batch))
    return shapes


def _device_of(routes_per_forward) -> torch.device:
    if routes_per_forward:
        return routes_per_forward[0].device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_arguments(routes_per_forward, plain_routes_per_forward, num_forwards, layers, topk):
    """Shapes and counts of the arguments (the same on every rank, so raising here is safe)."""
    if routes_per_forward is None or len(routes_per_forward) != num_forwards:
        raise RouteError(
            f"{0 if routes_per_forward is None else len(routes_per_forward)} forwards of routes "
            f"but {num_forwards} lists of sample ids"
        )
    if plain_routes_per_forward is not None and len(plain_routes_per_forward) != num_forwards:
        raise RouteError(
            f"{len(plain_routes_per_forward)} forwards of plain-replay routes but "
            f"{num_forwards} of routes"
        )
    for forward, routes_TLK in enumerate(routes_per_forward):
        if routes_TLK.dim() != 3 or tuple(routes_TLK.shape[1:]) != (len(layers), topk):
            raise RouteError(
                f"forward {forward}: routes of shape {tuple(routes_TLK.shape)}, expected "
                f"[tokens, {len(layers)} MoE layers {layers}, k={topk}]"
            )


def gather_route_table(
    routes_per_forward: Optional[Sequence[torch.Tensor]],
    sample_ids_per_forward: Sequence[Sequence[int]],
    *,
    layer_numbers: Sequence[int],
    num_experts: int,
    topk: int,
    plain_routes_per_forward: Optional[Sequence[torch.Tensor]] = None,
    lengths_per_forward: Optional[Sequence[Sequence[int]]] = None,
    data_group=None,
    tp_group=None,
    sequence_parallel: bool = False,
    cp_group=None,
    pp_group=None,
    check_distinct: bool = True,
) -> RouteTable:
    """Build the rollout batch's route table on every rank from each rank's recorded forwards.

    ``routes_per_forward[f]`` is forward f's ``[T_local, L, K]`` for this rank's MoE layers
    ``layer_numbers`` (as returned by ``RoutingController.collect_routes`` and
    ``RoutingController.layer_numbers``); ``sample_ids_per_forward[f]`` names its B samples
    (columns of ``[S, B]``). All data-parallel ranks must record the same number of forwards
    with the same ``[S, B]`` shape (Megatron's fixed micro-batch size and sequence length).
    ``plain_routes_per_forward`` (the plain-replay route: the live top-k at rollout) travels in
    the same collective. ``lengths_per_forward[f][b]`` is sample b's real token count when
    forward f was right-padded (default: the full ``S``); only the real tokens enter the
    (packed) table, and only they are checked (ids in range, k distinct per row): each rank
    checks its own, and every rank raises if any rank found a bad route. ``check_distinct=False``
    skips the k-distinct check (k(k-1)/2 compares per row) for routes Megatron's top-k
    produced, which are distinct by construction; the id range is always checked.

    Groups: ``data_group`` None is the default (world) group; ``tp_group`` is used only with
    ``sequence_parallel``; ``cp_group`` and ``pp_group`` None mean no context / pipeline
    parallelism. With ``pp_group`` the table covers the MoE layers of every stage; a stage
    without MoE layers must call too, with ``routes_per_forward`` None or empty (and any
    ``num_experts``/``topk``, e.g. the controller's 0): it learns the shapes from the others.
    Collectives: one per micro-batch per group kind (pipeline, sequence, context, data), plus a
    few small ones per table (the pipeline stages' shapes, the route checks' statuses).
    """
    num_forwards = len(sample_ids_per_forward)
    layer_numbers = [int(n) for n in layer_numbers]
    if not layer_numbers and not routes_per_forward:
        routes_per_forward = plain_routes_per_forward = None
    else:
        _check_arguments(
            routes_per_forward, plain_routes_per_forward, num_forwards, layer_numbers, topk
        )
    pp_size = _group_size(pp_group)
    if routes_per_forward is None and pp_size == 1:
        raise RouteError(
            "this rank has no MoE layers and there is no pipeline group to gather them from"
        )
    device = _device_of(routes_per_forward)
    num_parts = 1 if plain_routes_per_forward is None else 2
    layout = None
    if pp_size > 1:
        tokens = [-1] * num_forwards
        if routes_per_forward is not None:
            tokens = [int(r.shape[0]) for r in routes_per_forward]
        local_parts = num_parts if routes_per_forward is not None else 0
        layout = _PipelineLayout(
            pp_group,
            layer_numbers,
            num_experts if layer_numbers else 0,
            topk if layer_numbers else 0,
            local_parts,
            tokens,
            device,
        )
        num_experts, topk, num_parts = layout.num_experts, layout.topk, layout.num_parts
    dtype = route_dtype(num_experts)
    tp_size = _group_size(tp_group) if sequence_parallel else 1
    tp_rank = dist.get_rank(tp_group) if tp_size > 1 else 0
    cp_size = _group_size(cp_group)
    cp_rank = dist.get_rank(cp_group) if cp_size > 1 else 0
    data_size = dist.get_world_size(data_group)
    all_layers = tuple(layout.layer_numbers if layout is not None else layer_numbers)
    problems = FirstProblem(device)

    # Every forward's received buffer in one tensor: the table is read out with one index.
    width = _ForwardBuffers.row_width(len(all_layers), topk, dtype)
    shapes = _forward_shapes(routes_per_forward, layout, sample_ids_per_forward)
    seqs = [local_seq * tp_size * cp_size for _, local_seq in shapes]
    rows = [
        _ForwardBuffers.rows_of(batch, seq, num_parts, width)
        for (batch, _), seq in zip(shapes, seqs)
    ]
    received_XW = torch.empty((data_size * sum(rows), width), dtype=torch.uint8, device=device)
    receive_blocks = received_XW.split([data_size * n for n in rows])
    buffers: list[_ForwardBuffers] = []
    for forward, sample_ids in enumerate(sample_ids_per_forward):
        (batch, local_seq), seq = shapes[forward], seqs[forward]
        if routes_per_forward is None:  # a stage without MoE layers: empty parts of its shape
            empty = torch.empty((batch * local_seq, 0, topk), dtype=dtype, device=device)
            parts = [empty] * num_parts
        else:
            parts = [routes_per_forward[forward]]
            if plain_routes_per_forward is not None:
                parts.append(plain_routes_per_forward[forward])
        lengths_B = _lengths(lengths_per_forward, forward, batch, seq, sample_ids, problems)
        ids_B = torch.as_tensor(list(sample_ids), dtype=torch.long, device=device)
        if routes_per_forward is not None:
            positions_S = local_positions(
                seq, tp_rank=tp_rank, tp_size=tp_size, cp_rank=cp_rank, cp_size=cp_size
            ).to(device)
            real_SB = positions_S.unsqueeze(1) < lengths_B.unsqueeze(0)
            for part in parts:  # checked in the recorded dtype: never narrowed before
                problems.check_routes(
                    part.reshape(local_seq, batch, *part.shape[1:]),
                    real_SB,
                    sample_ids,
                    positions_S,
                    layer_numbers,
                    num_experts,
                    forward,
                    distinct=check_distinct,
                )
        if layout is not None or tp_size > 1 or cp_size > 1:
            parts = _model_parallel_gather(
                parts,
                local_seq,
                batch,
                dtype,
                layout,
                pp_group,
                tp_group if tp_size > 1 else None,
                cp_group if cp_size > 1 else None,
            )
        else:
            parts = [p.reshape(local_seq, batch, *p.shape[1:]) for p in parts]
        buffer = _ForwardBuffers(batch, seq, num_parts, len(all_layers), topk, dtype, device)
        buffer.write(ids_B, lengths_B, parts)
        buffer.gather(data_group, data_size, receive_blocks[forward].view(data_size, -1, width))
        buffers.append(buffer)
    world_if_none = data_group if data_group is not None else dist.group.WORLD
    problems.raise_if_any(
        (pp_group, tp_group if tp_size > 1 else None, cp_group, world_if_none), num_experts
    )
    return _assemble(buffers, received_XW, all_layers, num_experts, topk, num_parts == 2, dtype)


def _lengths(lengths_per_forward, forward, batch, seq, sample_ids, problems) -> torch.Tensor:
    """``[B]`` real token counts of a forward (bad ones noted, clamped so collectives match)."""
    device = problems.status.device
    if lengths_per_forward is None:
        return torch.full((batch,), seq, dtype=torch.long, device=device)
    lengths = [int(n) for n in lengths_per_forward[forward]]
    if len(lengths) != batch:
        raise RouteError(f"forward {forward}: {len(lengths)} lengths for {batch} samples")
    for sample, length in zip(sample_ids, lengths):
        if not 0 <= length <= seq:
            problems.note(_BAD_LENGTHS, forward, int(sample), seq, 0, length)
    return torch.tensor(lengths, dtype=torch.long, device=device).clamp(0, seq)
