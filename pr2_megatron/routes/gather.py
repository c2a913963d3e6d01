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

Training (replay) takes its targets from the table: :mod:`pr2_megatron.routes.targets`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist

from pr2_megatron.errors import RouteError
from pr2_megatron.routes.table import RouteTable, route_dtype
from pr2_megatron.routes.targets import context_parallel_positions, local_positions


def _group_size(group) -> int:
    """Size of an optional group (None: no such parallelism here)."""
    return 1 if group is None else dist.get_world_size(group)


def _all_gather(local: torch.Tensor, group) -> torch.Tensor:
    """``[...]`` on each rank -> ``[group size, ...]`` (gloo needs the concatenated shape)."""
    size = dist.get_world_size(group)
    out = local.new_empty((size * local.shape[0], *local.shape[1:]))
    dist.all_gather_into_tensor(out, local.contiguous(), group=group)
    return out.view(size, *local.shape)


def _sequence_parallel_gather(routes_SBPLK: torch.Tensor, tp_group) -> torch.Tensor:
    """Concatenate the TP ranks' sequence chunks: ``[S/TP, ...]`` -> ``[S, ...]``."""
    if dist.get_world_size(tp_group) == 1:
        return routes_SBPLK
    gathered = _all_gather(routes_SBPLK, tp_group)
    return gathered.reshape(-1, *routes_SBPLK.shape[1:])


def _context_parallel_gather(routes_SBPLK: torch.Tensor, cp_group) -> torch.Tensor:
    """Put the CP ranks' load-balanced parts back in sequence order: ``[S/CP, ...]`` -> ``[S]``."""
    cp_size = dist.get_world_size(cp_group)
    gathered = _all_gather(routes_SBPLK, cp_group)
    seq_len = cp_size * routes_SBPLK.shape[0]
    positions = torch.cat([context_parallel_positions(seq_len, r, cp_size) for r in range(cp_size)])
    full = torch.empty_like(gathered.reshape(seq_len, *routes_SBPLK.shape[1:]))
    full[positions.to(full.device)] = gathered.reshape(seq_len, *routes_SBPLK.shape[1:])
    return full


class _PipelineLayout:
    """The MoE layers, E, k, parts and per-forward token counts of every pipeline stage.

    Gathered once per route table (two small collectives over the pipeline group), so a stage
    without MoE layers learns the shapes it must contribute to every per-forward gather.
    Every check runs on the gathered values, so every rank raises the same error (none hangs).
    """

    def __init__(
        self,
        pp_group,
        layer_numbers: Sequence[int],
        num_experts: int,
        topk: int,
        num_parts: int,
        tokens_per_forward: Sequence[int],
        device: torch.device,
    ) -> None:
        size = dist.get_world_size(pp_group)
        header = torch.tensor(
            [len(layer_numbers), num_experts, topk, num_parts, len(tokens_per_forward)],
            dtype=torch.long,
            device=device,
        )
        headers = _all_gather(header, pp_group).tolist()
        forwards = {h[4] for h in headers}
        if len(forwards) > 1:
            raise RouteError(
                "pipeline stages recorded different numbers of forwards: "
                + ", ".join(f"stage {s}: {h[4]}" for s, h in enumerate(headers))
            )
        with_layers = [h for h in headers if h[0] > 0]
        if not with_layers:
            raise RouteError("no pipeline stage has MoE layers: there are no routes to gather")
        for what, column in (("num_experts", 1), ("topk", 2), ("parts (plain-replay routes)", 3)):
            values = {h[column] for h in with_layers}
            if len(values) > 1:
                raise RouteError(
                    f"pipeline stages disagree on {what}: "
                    + ", ".join(f"stage {s}: {h[column]}" for s, h in enumerate(headers) if h[0])
                )
        self.num_experts, self.topk, self.num_parts = with_layers[0][1:4]
        self.max_layers = max(h[0] for h in headers)
        body = torch.full(
            (self.max_layers + len(tokens_per_forward),), -1, dtype=torch.long, device=device
        )
        body[: len(layer_numbers)] = torch.as_tensor(list(layer_numbers), dtype=torch.long)
        body[self.max_layers :] = torch.as_tensor(list(tokens_per_forward), dtype=torch.long)
        bodies = _all_gather(body, pp_group).tolist()
        self.stage_layers = [b[: h[0]] for b, h in zip(bodies, headers)]
        numbers = [n for layers in self.stage_layers for n in layers]
        if len(set(numbers)) != len(numbers):
            raise RouteError(
                "pipeline stages share MoE layer numbers: "
                + ", ".join(f"stage {s}: {layers}" for s, layers in enumerate(self.stage_layers))
            )
        self.layer_numbers = sorted(numbers)
        # Column order of the concatenated stages -> ascending layer numbers.
        self.order = torch.as_tensor(
            sorted(range(len(numbers)), key=numbers.__getitem__), device=device
        )
        self.tokens_per_forward = []
        for forward in range(len(tokens_per_forward)):
            counts = {b[self.max_layers + forward] for b in bodies} - {-1}
            if len(counts) != 1:
                raise RouteError(
                    f"forward {forward}: pipeline stages routed different token counts "
                    f"{sorted(counts)}"
                )
            self.tokens_per_forward.append(counts.pop())
        self.size = size

    def gather(self, local_SBPLK: torch.Tensor, pp_group) -> torch.Tensor:
        """``[S', B, P, L_stage, X]`` -> ``[S', B, P, L_all, X]`` in ascending layer order."""
        pad = self.max_layers - local_SBPLK.shape[3]
        if pad:
            zeros = local_SBPLK.new_zeros((*local_SBPLK.shape[:3], pad, local_SBPLK.shape[4]))
            local_SBPLK = torch.cat([local_SBPLK, zeros], dim=3)
        gathered = _all_gather(local_SBPLK, pp_group)
        stages = [gathered[s, :, :, :, : len(layers)] for s, layers in enumerate(self.stage_layers)]
        return torch.cat(stages, dim=3).index_select(3, self.order)


# Codes of the first problem a rank found in its own routes (propagated to every rank).
_OK, _OUT_OF_RANGE, _DUPLICATE, _BAD_LENGTHS = range(4)
_STATUS_FIELDS = 6  # code, forward, sample id, position, layer number, value


class _FirstProblem:
    """The first bad route (or length) among this rank's own real tokens, as a status vector.

    Each rank checks only the rows it recorded (cost proportional to its own tokens); the
    statuses are exchanged once per table, so every rank raises the same kind of error and
    none is left waiting in a collective.
    """

    def __init__(self, device: torch.device) -> None:
        self.status = torch.zeros(_STATUS_FIELDS, dtype=torch.long, device=device)
        self.found = False

    def note(self, code: int, forward: int, sample: int, position: int, layer: int, value: int):
        """Keep the first problem only."""
        if not self.found:
            self.found = True
            self.status = torch.tensor(
                [code, forward, sample, position, layer, value],
                dtype=torch.long,
                device=self.status.device,
            )

    def check_routes(self, routes_SBLK, real_SB, sample_ids, positions_S, layers, bound, forward):
        """Expert ids in ``[0, bound)`` and k distinct ids per row, on real tokens only."""
        if self.found or routes_SBLK.numel() == 0:
            return
        routes = routes_SBLK[real_SB]  # [N_real, L, K], (position, sample) row-major
        if routes.numel() == 0:
            return
        info = torch.iinfo(routes.dtype)
        bad_NLK = torch.zeros(routes.shape, dtype=torch.bool, device=routes.device)
        if info.min < 0:
            bad_NLK |= routes < 0
        if bound - 1 < info.max:
            bad_NLK |= routes > bound - 1
        code, bad_NL = _OUT_OF_RANGE, bad_NLK.any(-1)
        if not bool(bad_NL.any()):
            code, bad_NL = _DUPLICATE, _rows_with_duplicates(routes)
            if not bool(bad_NL.any()):
                return
        row, column = (int(i) for i in bad_NL.nonzero()[0])
        position_index, sample_index = (int(i) for i in real_SB.nonzero()[row])
        value = routes[row, column]
        value = int(value[bad_NLK[row, column]][0]) if code == _OUT_OF_RANGE else 0
        self.note(
            code,
            forward,
            int(sample_ids[sample_index]),
            int(positions_S[position_index]),
            int(layers[column]),
            value,
        )

    def raise_if_any(self, groups, bound: int) -> None:
        """Exchange the statuses over every group in turn; raise on every rank if any is bad."""
        status = self.status
        for group in groups:
            if group is None or dist.get_world_size(group) == 1:
                continue
            gathered = _all_gather(status, group)
            bad = (gathered[:, 0] != _OK).nonzero()
            if bad.numel():
                status = gathered[int(bad[0])]
        code, forward, sample, position, layer, value = (int(v) for v in status.tolist())
        if code == _OUT_OF_RANGE:
            raise RouteError(
                f"forward {forward}: sample id {sample}, token {position}, MoE layer {layer}: "
                f"expert id {value} out of range [0, {bound})"
            )
        if code == _DUPLICATE:
            raise RouteError(
                f"forward {forward}: sample id {sample}, token {position}, MoE layer {layer}: "
                "duplicate expert ids in the row (k distinct experts are required; duplicates "
                "break alltoall split sizes)"
            )
        if code == _BAD_LENGTHS:
            raise RouteError(
                f"forward {forward}: sample id {sample} has length {value}, outside the "
                f"forward's [0, {position}] tokens"
            )


def _rows_with_duplicates(routes_NLK: torch.Tensor) -> torch.Tensor:
    """``[N, L]`` bool: rows with a repeated id (pairwise compares: k is small)."""
    dup_NL = torch.zeros(routes_NLK.shape[:2], dtype=torch.bool, device=routes_NLK.device)
    k = routes_NLK.shape[-1]
    for i in range(k):
        for j in range(i + 1, k):
            dup_NL |= routes_NLK[..., i] == routes_NLK[..., j]
    return dup_NL


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """An integer tensor's last dim as raw bytes: ``[..., X] -> [..., X · itemsize]`` (uint8)."""
    tensor = tensor.contiguous()
    width = tensor.shape[-1] * tensor.element_size()
    return tensor.view(torch.uint8).reshape(*tensor.shape[:-1], width)


def _data_parallel_gather(routes_SBPLX, ids_B, lengths_B, data_group):
    """One all-gather of the routes (bytes) with their sample ids and lengths.

    Returns ``(routes [R, S, B, P, L, X], ids [R, B], lengths [R, B])``.
    """
    meta = torch.stack([ids_B, lengths_B], dim=1).reshape(-1)  # int64 [2B]
    buffer = torch.cat([_as_bytes(meta.unsqueeze(0)).reshape(-1), routes_SBPLX.reshape(-1)])
    size = _group_size(data_group) if data_group is not None else dist.get_world_size()
    if size > 1:
        gathered = _all_gather(buffer, data_group)
    else:
        gathered = buffer.unsqueeze(0)
    meta_bytes = meta.numel() * meta.element_size()
    # A fresh 1-D copy: a [1, n] slice keeps the row stride, which view(long) rejects.
    meta_R = gathered[:, :meta_bytes].reshape(-1).clone().view(torch.long).view(size, -1, 2)
    routes = gathered[:, meta_bytes:].reshape(size, *routes_SBPLX.shape)
    return routes, meta_R[:, :, 0], meta_R[:, :, 1]


def _packed_forward(routes_RSBPLK, ids_RB, lengths_RB):
    """``[T_f, P, L, K]`` rows of a forward's real tokens, sample after sample, and ``[N]`` ids."""
    num_ranks, seq, batch = routes_RSBPLK.shape[:3]
    routes_NSPLK = routes_RSBPLK.transpose(1, 2).reshape(
        num_ranks * batch, seq, *routes_RSBPLK.shape[3:]
    )
    lengths_N = lengths_RB.reshape(-1)
    real_NS = torch.arange(seq, device=lengths_N.device).unsqueeze(0) < lengths_N.unsqueeze(1)
    return routes_NSPLK[real_NS], ids_RB.reshape(-1), lengths_N


def _device_of(routes_per_forward) -> torch.device:
    if routes_per_forward:
        return routes_per_forward[0].device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
    checks its own, and every rank raises if any rank found a bad route.

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
        routes_per_forward = None
        plain_routes_per_forward = None
    elif routes_per_forward is None or len(routes_per_forward) != num_forwards:
        raise RouteError(
            f"{0 if routes_per_forward is None else len(routes_per_forward)} forwards of routes "
            f"but {num_forwards} lists of sample ids"
        )
    if plain_routes_per_forward is not None and len(plain_routes_per_forward) != num_forwards:
        raise RouteError(
            f"{len(plain_routes_per_forward)} forwards of plain-replay routes but "
            f"{num_forwards} of routes"
        )
    for forward, routes_TLK in enumerate(routes_per_forward or []):
        if routes_TLK.dim() != 3 or tuple(routes_TLK.shape[1:]) != (len(layer_numbers), topk):
            raise RouteError(
                f"forward {forward}: routes of shape {tuple(routes_TLK.shape)}, expected "
                f"[tokens, {len(layer_numbers)} MoE layers {layer_numbers}, k={topk}]"
            )
    pp_size = _group_size(pp_group)
    if routes_per_forward is None and pp_size == 1:
        raise RouteError(
            "this rank has no MoE layers and there is no pipeline group to gather them from"
        )
    device = _device_of(routes_per_forward)

    layout = None
    if pp_size > 1:
        tokens = [-1] * num_forwards
        num_parts = 0
        if routes_per_forward is not None:
            tokens = [int(r.shape[0]) for r in routes_per_forward]
            num_parts = 1 if plain_routes_per_forward is None else 2
        layout = _PipelineLayout(
            pp_group,
            layer_numbers,
            num_experts if layer_numbers else 0,
            topk if layer_numbers else 0,
            num_parts,
            tokens,
            device,
        )
        num_experts, topk = layout.num_experts, layout.topk
        num_parts = layout.num_parts
    else:
        num_parts = 1 if plain_routes_per_forward is None else 2
    dtype = route_dtype(num_experts)
    tp_size = _group_size(tp_group) if sequence_parallel else 1
    tp_rank = dist.get_rank(tp_group) if tp_size > 1 else 0
    cp_size = _group_size(cp_group)
    cp_rank = dist.get_rank(cp_group) if cp_size > 1 else 0
    problems = _FirstProblem(device)

    packed, ids, lengths = [], [], []
    for forward, sample_ids in enumerate(sample_ids_per_forward):
        batch = len(sample_ids)
        if routes_per_forward is None:
            num_tokens = layout.tokens_per_forward[forward]
            parts = [torch.empty((num_tokens, 0, topk), dtype=dtype, device=device)] * num_parts
        else:
            parts = [routes_per_forward[forward]]
            if plain_routes_per_forward is not None:
                parts.append(plain_routes_per_forward[forward])
            num_tokens = int(parts[0].shape[0])
        if batch == 0 or num_tokens % batch:
            raise RouteError(
                f"forward {forward}: {num_tokens} token rows are not a multiple of its "
                f"{batch} samples"
            )
        local_seq = num_tokens // batch
        seq = local_seq * tp_size * cp_size
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
                )
        # [S', B, P, L, K] in the compact dtype, sent as bytes: one buffer for all layers.
        local = torch.stack([p.to(dtype).reshape(local_seq, batch, *p.shape[1:]) for p in parts])
        local = _as_bytes(local.movedim(0, 2))
        if layout is not None:
            local = layout.gather(local, pp_group)
        if tp_size > 1:
            local = _sequence_parallel_gather(local, tp_group)
        if cp_size > 1:
            local = _context_parallel_gather(local, cp_group)
        routes_RSBPLX, ids_RB, lengths_RB = _data_parallel_gather(
            local, ids_B, lengths_B, data_group
        )
        routes_RSBPLK = routes_RSBPLX.contiguous().view(dtype)
        forward_rows, forward_ids, forward_lengths = _packed_forward(
            routes_RSBPLK, ids_RB, lengths_RB
        )
        packed.append(forward_rows)
        ids.append(forward_ids)
        lengths.append(forward_lengths)
    world_if_none = data_group if data_group is not None else dist.group.WORLD
    problems.raise_if_any(
        (pp_group, tp_group if tp_size > 1 else None, cp_group, world_if_none), num_experts
    )
    layers = tuple(layout.layer_numbers if layout is not None else layer_numbers)
    return _sorted_table(packed, ids, lengths, layers, num_experts, topk, num_parts == 2)


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


def _sorted_table(packed, ids, lengths, layer_numbers, num_experts, topk, has_plain) -> RouteTable:
    """The forwards' packed rows in ascending sample-id order, as a :class:`RouteTable`."""
    rows_TPLK = torch.cat(packed)
    ids_N, lengths_N = torch.cat(ids), torch.cat(lengths)
    ids_sorted_N, order_N = torch.sort(ids_N)
    repeated = (ids_sorted_N[1:] == ids_sorted_N[:-1]).nonzero()
    if repeated.numel():
        raise RouteError(
            f"sample id {int(ids_sorted_N[int(repeated[0])])} was recorded twice in the rollout"
        )
    starts_N = lengths_N.cumsum(0) - lengths_N
    sorted_lengths_N = lengths_N[order_N]
    sorted_starts_N = sorted_lengths_N.cumsum(0) - sorted_lengths_N
    shift_T = torch.repeat_interleave(starts_N[order_N] - sorted_starts_N, sorted_lengths_N)
    rows_TPLK = rows_TPLK[torch.arange(shift_T.numel(), device=shift_T.device) + shift_T]
    cu_seqlens = torch.cat([lengths_N.new_zeros(1), sorted_lengths_N.cumsum(0)])
    table = RouteTable(
        routes_TLK=rows_TPLK[:, 0],
        cu_seqlens=cu_seqlens,
        sample_ids=ids_sorted_N,
        layer_numbers=layer_numbers,
        num_experts=int(num_experts),
        topk=int(topk),
        plain_routes_TLK=rows_TPLK[:, 1] if has_plain else None,
    )
    table._validate_layout()  # the values were checked rank by rank before the gather
    return table
