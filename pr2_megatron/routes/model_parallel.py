"""The pipeline, sequence- and context-parallel gathers of one forward's routes (in bytes).

Legend: S' local positions, S sequence, B samples, P parts, L MoE layers, X bytes per (token,
layer) row of K ids.

* pipeline parallelism: a stage -- with VPP all its model chunks -- routes only its own layers,
  so the layer dimension is gathered over the pipeline group (a stage without MoE layers takes
  part all the same);
* sequence parallelism: a rank routes ``S/TP`` of the sequence, so the TP ranks' chunks are
  concatenated;
* context parallelism: a rank holds 2 of ``2·CP`` chunks (Megatron's load-balanced split); they
  are put back in sequence order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from pr2_megatron.errors import RouteError
from pr2_megatron.routes.targets import context_parallel_positions
from pr2_megatron.routes.wire import _all_gather, _as_bytes


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
