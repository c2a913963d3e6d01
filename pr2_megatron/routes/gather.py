"""Route communication: every rank's rollout routes -> one route table on every rank.

Legend: S sequence (micro-batch length), B samples in a micro-batch, T = S·B tokens (Megatron's
``[S, B]`` order, s-major), L MoE layers, K top-k, P parts (replayed routes, and the plain-replay
route when it travels with them).

Rollout (capture): every forward on every rank yields ``[T_local, L_local, K]`` for the rank's
tokens and the rank's MoE layers. The pieces are put back together group by group, each in
**one collective per micro-batch for all layers at once**, in the smallest dtype that holds E:

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
from pr2_megatron.routes.targets import context_parallel_positions


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
    full[positions] = gathered.reshape(seq_len, *routes_SBPLK.shape[1:])
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
    ) -> None:
        size = dist.get_world_size(pp_group)
        header = torch.tensor(
            [len(layer_numbers), num_experts, topk, num_parts, len(tokens_per_forward)],
            dtype=torch.long,
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
        body = torch.full((self.max_layers + len(tokens_per_forward),), -1, dtype=torch.long)
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
        self.order = torch.as_tensor(sorted(range(len(numbers)), key=numbers.__getitem__))
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
        """``[S', B, P, L_stage, K]`` -> ``[S', B, P, L_all, K]`` in ascending layer order."""
        pad = self.max_layers - local_SBPLK.shape[3]
        if pad:
            zeros = local_SBPLK.new_zeros((*local_SBPLK.shape[:3], pad, local_SBPLK.shape[4]))
            local_SBPLK = torch.cat([local_SBPLK, zeros], dim=3)
        gathered = _all_gather(local_SBPLK, pp_group)
        stages = [gathered[s, :, :, :, : len(layers)] for s, layers in enumerate(self.stage_layers)]
        return torch.cat(stages, dim=3).index_select(3, self.order)


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
    the same collective.
    ``lengths_per_forward[f][b]`` is sample b's real token count when forward f was right-padded
    (default: the full ``S``); only the real tokens enter the (packed) table.

    Groups: ``data_group`` None is the default (world) group; ``tp_group`` is used only with
    ``sequence_parallel``; ``cp_group`` and ``pp_group`` None mean no context / pipeline
    parallelism. With ``pp_group`` the table covers the MoE layers of every stage; a stage
    without MoE layers must call too, with ``routes_per_forward`` None or empty (and any
    ``num_experts``/``topk``, e.g. the controller's 0): it learns the shapes from the others.
    """
    num_forwards = len(sample_ids_per_forward)
    layer_numbers = [int(n) for n in layer_numbers]
    no_layers_here = not layer_numbers
    if no_layers_here and not routes_per_forward:
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

    layout = None
    if pp_size > 1:
        tokens = [-1] * num_forwards
        if routes_per_forward is not None:
            tokens = [int(r.shape[0]) for r in routes_per_forward]
        num_parts = 0
        if routes_per_forward is not None:
            num_parts = 1 if plain_routes_per_forward is None else 2
        layout = _PipelineLayout(
            pp_group,
            layer_numbers,
            num_experts if layer_numbers else 0,
            topk if layer_numbers else 0,
            num_parts,
            tokens,
        )
        num_experts, topk = layout.num_experts, layout.topk
        has_plain = layout.num_parts == 2
    else:
        has_plain = plain_routes_per_forward is not None
    dtype = route_dtype(num_experts)
    tp_size = _group_size(tp_group) if sequence_parallel else 1
    cp_size = _group_size(cp_group)
    data_size = dist.get_world_size(data_group)

    per_sample: dict[int, torch.Tensor] = {}
    per_sample_plain: dict[int, torch.Tensor] = {}
    for forward, ids in enumerate(sample_ids_per_forward):
        batch = len(ids)
        if routes_per_forward is None:
            num_tokens = layout.tokens_per_forward[forward]
            parts = [torch.empty((num_tokens, 0, topk), dtype=dtype)] * layout.num_parts
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
        # [P, S', B, L, K] in the compact dtype: one buffer for all layers.
        local = torch.stack(
            [p.to(dtype).reshape(num_tokens // batch, batch, *p.shape[1:]) for p in parts]
        )
        local = local.movedim(0, 2)  # [S', B, P, L, K]
        if layout is not None:
            local = layout.gather(local, pp_group)
        if tp_size > 1:
            local = _sequence_parallel_gather(local, tp_group)
        if cp_size > 1:
            local = _context_parallel_gather(local, cp_group)
        seq = local.shape[0]
        lengths = (
            [seq] * batch if lengths_per_forward is None else list(lengths_per_forward[forward])
        )
        if len(lengths) != batch or not all(0 <= n <= seq for n in lengths):
            raise RouteError(
                f"forward {forward}: lengths {lengths} do not fit {batch} samples of {seq} tokens"
            )
        ids_tensor = torch.as_tensor([list(ids), lengths], dtype=torch.long).T.contiguous()
        if data_size > 1:
            gathered = _all_gather(local, data_group)
            all_ids = _all_gather(ids_tensor, data_group)
        else:
            gathered, all_ids = local.unsqueeze(0), ids_tensor.unsqueeze(0)
        for rank in range(data_size):
            for column, (sample_id, length) in enumerate(all_ids[rank].tolist()):
                if sample_id in per_sample:
                    raise RouteError(f"sample id {sample_id} was recorded twice in the rollout")
                per_sample[sample_id] = gathered[rank, :length, column, 0]
                if has_plain:
                    per_sample_plain[sample_id] = gathered[rank, :length, column, 1]
    sample_ids = sorted(per_sample)
    return RouteTable.from_samples(
        [per_sample[i] for i in sample_ids],
        sample_ids=sample_ids,
        layer_numbers=tuple(layout.layer_numbers if layout is not None else layer_numbers),
        num_experts=num_experts,
        topk=topk,
        plain_per_sample=[per_sample_plain[i] for i in sample_ids] if has_plain else None,
    )
