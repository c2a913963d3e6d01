"""Route communication: rollout routes -> one route table; table -> each training forward's targets.

Legend: S sequence (micro-batch length), B samples in a micro-batch, T = S·B tokens (Megatron's
``[S, B]`` order, s-major), L MoE layers, K top-k.

Rollout (capture): every forward on every rank yields ``[T_local, L, K]`` for the rank's
tokens. With sequence parallelism a rank holds ``S/TP`` of the sequence, so routes are first
gathered over the tensor-parallel group; then ranks holding other samples (the data-parallel
group, which contains the expert-parallel ranks of a layer) exchange theirs. Both happen in
**one collective per micro-batch for all layers at once**, in the smallest dtype that holds E.

Training (replay): whatever the training micro-batch layout -- other micro-batch size, order,
data-parallel split -- :func:`micro_batch_targets` takes the rows of the micro-batch's samples
from the table and slices the rank's sequence-parallel chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist

from pr2_megatron.route_table import RouteTable, route_dtype


def _sequence_parallel_gather(routes_SBLK: torch.Tensor, tp_group) -> torch.Tensor:
    """Concatenate the TP ranks' sequence chunks: ``[S/TP, B, L, K]`` -> ``[S, B, L, K]``."""
    size = dist.get_world_size(tp_group)
    if size == 1:
        return routes_SBLK
    out = routes_SBLK.new_empty((size * routes_SBLK.shape[0], *routes_SBLK.shape[1:]))
    dist.all_gather_into_tensor(out, routes_SBLK.contiguous(), group=tp_group)
    return out


def gather_route_table(
    routes_per_forward: Sequence[torch.Tensor],
    sample_ids_per_forward: Sequence[Sequence[int]],
    *,
    layer_numbers: Sequence[int],
    num_experts: int,
    topk: int,
    old_routes_per_forward: Optional[Sequence[torch.Tensor]] = None,
    lengths_per_forward: Optional[Sequence[Sequence[int]]] = None,
    data_group=None,
    tp_group=None,
    sequence_parallel: bool = False,
) -> RouteTable:
    """Build the rollout batch's route table on every rank from each rank's recorded forwards.

    ``routes_per_forward[f]`` is forward f's ``[T_local, L, K]`` (as returned by
    ``RoutingController.collect_routes``); ``sample_ids_per_forward[f]`` names its B samples
    (columns of ``[S, B]``). All data-parallel ranks must record the same number of forwards
    with the same ``[S, B]`` shape (Megatron's fixed micro-batch size and sequence length).
    ``old_routes_per_forward`` (the live top-k at rollout) travels in the same collective.
    ``lengths_per_forward[f][b]`` is sample b's real token count when forward f was right-padded
    (default: the full ``S``); only the real tokens enter the (packed) table.
    """
    if len(routes_per_forward) != len(sample_ids_per_forward):
        raise ValueError(
            f"{len(routes_per_forward)} forwards of routes but "
            f"{len(sample_ids_per_forward)} lists of sample ids"
        )
    dtype = route_dtype(num_experts)
    tp_size = dist.get_world_size(tp_group) if sequence_parallel else 1
    data_size = dist.get_world_size(data_group)
    per_sample: dict[int, torch.Tensor] = {}
    per_sample_old: dict[int, torch.Tensor] = {}
    for forward, (routes_TLK, ids) in enumerate(zip(routes_per_forward, sample_ids_per_forward)):
        batch = len(ids)
        if routes_TLK.shape[0] % batch:
            raise ValueError(
                f"forward {forward}: {routes_TLK.shape[0]} token rows are not a multiple of its "
                f"{batch} samples"
            )
        parts = [routes_TLK]
        if old_routes_per_forward is not None:
            parts.append(old_routes_per_forward[forward])
        # [parts, S/TP, B, L, K] in the compact dtype: one buffer for all layers.
        local = torch.stack([p.to(dtype).reshape(-1, batch, *p.shape[1:]) for p in parts])
        local = local.movedim(0, 2)  # [S/TP, B, parts, L, K]
        if tp_size > 1:
            local = _sequence_parallel_gather(local, tp_group)
        seq = local.shape[0]
        lengths = (
            [seq] * batch if lengths_per_forward is None else list(lengths_per_forward[forward])
        )
        if len(lengths) != batch or not all(0 <= n <= seq for n in lengths):
            raise ValueError(
                f"forward {forward}: lengths {lengths} do not fit {batch} samples of {seq} tokens"
            )
        ids_tensor = torch.as_tensor([list(ids), lengths], dtype=torch.long).T.contiguous()
        if data_size > 1:
            # Gathered along dim 0 (gloo needs the concatenated shape), then split per rank.
            gathered = local.new_empty((data_size * local.shape[0], *local.shape[1:]))
            dist.all_gather_into_tensor(gathered, local.contiguous(), group=data_group)
            gathered = gathered.view(data_size, *local.shape)
            all_ids = ids_tensor.new_empty((data_size * batch, 2))
            dist.all_gather_into_tensor(all_ids, ids_tensor, group=data_group)
            all_ids = all_ids.view(data_size, batch, 2)
        else:
            gathered, all_ids = local.unsqueeze(0), ids_tensor.unsqueeze(0)
        for rank in range(data_size):
            for column, (sample_id, length) in enumerate(all_ids[rank].tolist()):
                if sample_id in per_sample:
                    raise ValueError(f"sample id {sample_id} was recorded twice in the rollout")
                per_sample[sample_id] = gathered[rank, :length, column, 0]
                if old_routes_per_forward is not None:
                    per_sample_old[sample_id] = gathered[rank, :length, column, 1]
    sample_ids = sorted(per_sample)
    return RouteTable.from_samples(
        [per_sample[i] for i in sample_ids],
        sample_ids=sample_ids,
        layer_numbers=tuple(layer_numbers),
        num_experts=num_experts,
        topk=topk,
        old_per_sample=[per_sample_old[i] for i in sample_ids] if per_sample_old else None,
    )


def micro_batch_targets(
    table: RouteTable,
    sample_ids: Sequence[int],
    seq_len: int,
    *,
    lengths: Optional[Sequence[int]] = None,
    tp_rank: int = 0,
    tp_size: int = 1,
    sequence_parallel: bool = False,
    old: bool = False,
) -> torch.Tensor:
    """Replay targets ``[T_local, L, K]`` (int64) for a training micro-batch of these samples.

    Rows follow Megatron's flattened ``[S, B]`` order; with sequence parallelism only this TP
    rank's chunk of ``S/TP`` positions is returned. ``old=True`` returns the plain-replay
    (live top-k at rollout) routes instead of the replayed ones.

    ``lengths`` (default: ``seq_len`` for every sample) are the samples' real token counts when
    the micro-batch is right-padded to ``seq_len``: the table holds only the real tokens (it is
    packed), and the padding positions get the fixed route ``0..K-1``. Right padding never
    influences a real token (causal attention, per-token routing), so this is exact for every
    unmasked token.
    """
    lengths = [seq_len] * len(sample_ids) if lengths is None else list(lengths)
    if len(lengths) != len(sample_ids):
        raise ValueError(f"{len(sample_ids)} sample ids but {len(lengths)} lengths")
    too_long = [(s, n) for s, n in zip(sample_ids, lengths) if not 0 <= n <= seq_len]
    if too_long:
        sample, length = too_long[0]
        raise ValueError(f"sample id {sample}: length {length} is outside [0, {seq_len}]")
    table.check_tokens(sample_ids, lengths)
    source = table.old_routes_TLK if old else table.routes_TLK
    if source is None:
        raise ValueError("the route table holds no old (live top-k) routes")
    routes_BSLK = torch.empty(
        (len(sample_ids), seq_len, table.num_layers, table.topk), dtype=torch.long
    )
    routes_BSLK[:] = torch.arange(table.topk)  # the padding route
    rows = table.rows_for(sample_ids).split(lengths)
    for column, (sample_rows, length) in enumerate(zip(rows, lengths)):
        routes_BSLK[column, :length] = source[sample_rows].long()
    routes_SBLK = routes_BSLK.transpose(0, 1)
    if sequence_parallel and tp_size > 1:
        if seq_len % tp_size:
            raise ValueError(f"sequence length {seq_len} is not divisible by TP={tp_size}")
        chunk = seq_len // tp_size
        routes_SBLK = routes_SBLK[tp_rank * chunk : (tp_rank + 1) * chunk]
    return routes_SBLK.reshape(-1, table.num_layers, table.topk)
