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
from pr2_megatron.routes.checks import _BAD_LENGTHS, FirstProblem
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


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """An integer tensor's last dim as raw bytes: ``[..., X] -> [..., X · itemsize]`` (uint8)."""
    tensor = tensor.contiguous()
    width = tensor.shape[-1] * tensor.element_size()
    return tensor.view(torch.uint8).reshape(*tensor.shape[:-1], width)


class _ForwardBuffers:
    """One forward's bytes on the wire, gathered over the data-parallel ranks in one collective.

    A rank's buffer is rows of ``W = L·K·itemsize`` bytes: the parts (replayed, plain-replay)
    as ``[P, S, B]`` token rows in the table's dtype, then the int64 sample ids and lengths in
    the last rows. Uniform rows make the received buffer one ``[R · rows, W]`` matrix, from
    which the table's rows are taken with a single ``index_select`` per part
    (:func:`_assemble`). The send buffer is written once (narrowing to the table's dtype).
    """

    def __init__(self, batch: int, seq: int, parts: int, layers: int, topk: int, dtype, device):
        self.batch, self.seq, self.parts, self.layers, self.topk = batch, seq, parts, layers, topk
        self.dtype = dtype
        self.width = self.row_width(layers, topk, dtype)
        self.route_width = self.route_bytes(layers, topk, dtype)
        self.token_rows = parts * seq * batch
        self.rows = self.rows_of(batch, seq, parts, self.width)
        self.send = torch.empty((self.rows, self.width), dtype=torch.uint8, device=device)
        self.send[self.token_rows :] = 0  # the ids' rows past the ids: defined bytes
        self.received = None

    @staticmethod
    def route_bytes(layers: int, topk: int, dtype) -> int:
        """Bytes of one token's routes: ``L · K · itemsize``."""
        return layers * topk * torch.empty(0, dtype=dtype).element_size()

    @classmethod
    def row_width(cls, layers: int, topk: int, dtype) -> int:
        """Bytes of a buffer row: a token's routes, rounded up to 8 (int64 ids stay aligned)."""
        return max(8, -(-cls.route_bytes(layers, topk, dtype) // 8) * 8)

    @staticmethod
    def rows_of(batch: int, seq: int, parts: int, width: int) -> int:
        """Rows of a rank's buffer: the token rows, then enough rows for ids and lengths."""
        return parts * seq * batch + -(-(2 * batch * 8) // width)

    def _meta(self, buffer_RW: torch.Tensor) -> torch.Tensor:
        """The int64 ``[B, 2]`` (sample id, length) of one rank's buffer."""
        meta = buffer_RW[self.token_rows :].reshape(-1)[: 2 * self.batch * 8]
        return meta.view(torch.long).view(self.batch, 2)

    def write(self, ids_B, lengths_B, parts_PSBLK) -> None:
        """Fill the send buffer: the routes in the table's dtype, then ids and lengths."""
        if self.layers:
            routes = self.send[: self.token_rows, : self.route_width].view(self.dtype)
            routes = routes.unflatten(0, (self.parts, self.seq, self.batch))
            routes = routes.unflatten(-1, (self.layers, self.topk))
            for part, source in zip(routes, parts_PSBLK):
                part.copy_(source)
        meta = self.send[self.token_rows :].reshape(-1)[: 2 * self.batch * 8].view(torch.long)
        meta.view(self.batch, 2).copy_(torch.stack([ids_B, lengths_B], dim=1))

    def gather(self, data_group, data_size: int, out: torch.Tensor) -> None:
        """All-gather the ranks' send buffers into ``out`` (contiguous ``[R, rows, W]``)."""
        if data_size == 1:
            out[0].copy_(self.send)
        else:
            dist.all_gather_into_tensor(out.view(-1), self.send.view(-1), group=data_group)
        self.received = out

    def meta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [R, B], lengths [R, B])`` of every rank."""
        metas = torch.stack([self._meta(rank) for rank in self.received])
        return metas[..., 0], metas[..., 1]


def _assemble(buffers, stacked_XW, layer_numbers, num_experts, topk, has_plain, dtype):
    """The forwards' real tokens, in ascending sample-id order, as a :class:`RouteTable`.

    ``stacked_XW`` holds every forward's received buffer, one after the other.
    """
    metas = [b.meta() for b in buffers]
    ids_N = torch.cat([ids.reshape(-1) for ids, _ in metas])
    lengths_N = torch.cat([lengths.reshape(-1) for _, lengths in metas])
    sorted_ids_N, order_N = torch.sort(ids_N)
    repeated = (sorted_ids_N[1:] == sorted_ids_N[:-1]).nonzero()
    if repeated.numel():
        raise RouteError(
            f"sample id {int(sorted_ids_N[int(repeated[0])])} was recorded twice in the rollout"
        )
    device = ids_N.device
    # Row of token (position 0, part 0) of every sample in the stacked received buffers.
    first_row_N = torch.cat([_first_rows(b, offset) for b, offset in _offsets(buffers)])
    stride_N = torch.cat(  # rows between a sample's consecutive positions
        [torch.full((b.received.shape[0] * b.batch,), b.batch, device=device) for b in buffers]
    )
    part_rows_N = torch.cat(  # rows between the parts of a sample's token
        [
            torch.full((b.received.shape[0] * b.batch,), b.seq * b.batch, device=device)
            for b in buffers
        ]
    )
    sorted_lengths_N = lengths_N[order_N]
    sample_T = torch.repeat_interleave(order_N, sorted_lengths_N)
    starts_N = sorted_lengths_N.cumsum(0) - sorted_lengths_N
    position_T = torch.arange(sample_T.numel(), device=device) - torch.repeat_interleave(
        starts_N, sorted_lengths_N
    )
    rows_T = first_row_N[sample_T] + position_T * stride_N[sample_T]
    route_width = buffers[0].route_width
    if route_width == stacked_XW.shape[1]:
        source_XW = stacked_XW.view(torch.int64)  # row copies in 8-byte words
    else:
        source_XW = stacked_XW[:, :route_width]  # rows padded for alignment: copy the bytes
    parts = []
    for part in range(2 if has_plain else 1):
        rows_TW = source_XW.index_select(0, rows_T + part * part_rows_N[sample_T])
        parts.append(rows_TW.view(torch.uint8).view(dtype).view(-1, len(layer_numbers), topk))
    table = RouteTable(
        routes_TLK=parts[0],
        cu_seqlens=torch.cat([lengths_N.new_zeros(1), sorted_lengths_N.cumsum(0)]),
        sample_ids=sorted_ids_N,
        layer_numbers=layer_numbers,
        num_experts=int(num_experts),
        topk=int(topk),
        plain_routes_TLK=parts[1] if has_plain else None,
    )
    table._validate_layout()  # the values were checked rank by rank before the gather
    return table


def _offsets(buffers):
    """Each forward's buffers with the row offset of its received block in the stack."""
    offset = 0
    for buffer in buffers:
        yield buffer, offset
        offset += buffer.received.shape[0] * buffer.rows


def _first_rows(buffer: _ForwardBuffers, offset: int) -> torch.Tensor:
    """``[R · B]`` row of (position 0, part 0) of each sample (rank-major, then column)."""
    ranks, device = buffer.received.shape[0], buffer.received.device
    rank_N = torch.arange(ranks, device=device).repeat_interleave(buffer.batch)
    column_N = torch.arange(buffer.batch, device=device).repeat(ranks)
    return offset + rank_N * buffer.rows + column_N


def _model_parallel_gather(parts, local_seq, batch, dtype, layout, pp_group, tp_group, cp_group):
    """Pipeline, sequence- and context-parallel gathers of a forward's parts, in bytes.

    ``parts`` are ``[T_local, L_stage, K]``; returns ``[S, B, L_all, K]`` per part (table
    dtype): every stage's layers in ascending order, every TP rank's sequence chunk, every CP
    rank's load-balanced chunks back in sequence order.
    """
    local = torch.stack([p.to(dtype).reshape(local_seq, batch, *p.shape[1:]) for p in parts])
    local = _as_bytes(local.movedim(0, 2))  # [S', B, P, L, K·size]: one buffer for all layers
    if layout is not None:
        local = layout.gather(local, pp_group)
    if tp_group is not None:
        local = _sequence_parallel_gather(local, tp_group)
    if cp_group is not None:
        local = _context_parallel_gather(local, cp_group)
    full = local.contiguous().view(dtype).movedim(2, 0)  # [P, S, B, L, K]
    return list(full)


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
