"""The route path as one public API: rollout routes -> route table -> each training forward.

Legend: S sequence (a micro-batch's forward length), B samples of a micro-batch, T = S·B tokens
in Megatron's flattened ``[S, B]`` order (s-major: row ``s·B + b`` is position s of sample b),
L MoE layers of this rank, K top-k.

Any Megatron training loop drives PR2 with these calls (the reference trainer makes the same)::

    path = RoutePath(controller)                      # groups from Megatron's parallel state
    # rollout (or the old-log-prob pass of actor-side PR2 / r2)
    controller.predict()                              # record() for r2 / r3
    for batch in rollout_batches:                     # MicroBatch(sample_ids, seq_len, lengths)
        path.name_tokens(batch)                       # feature-cache keys (predict phase)
        model(...)                                    # one forward per micro-batch
    table = path.gather(rollout_batches)              # the same table on every rank
    # training: any micro-batch layout, any order, other data-parallel split
    for mini_step in range(1, N + 1):
        controller.replay(train_predictor=mini_step >= 2, collect_metrics=True)
        for batch in training_batches:
            path.set_targets(table, batch)            # before the forward (queued per layer)
            ... forward / backward ...                # recompute replays the same route
        controller.finish()

Under Megatron's schedules (``get_forward_backward_func``, PP/VPP), queue every micro-batch's
targets before calling the schedule: each layer consumes them in micro-batch order.

What the path handles for the caller: sequence parallelism (a TP rank routes ``S/TP`` tokens),
context parallelism (Megatron's load-balanced split), pipeline stages (each routes its own
layers; a stage without MoE layers joins every collective), data parallelism and expert
parallelism (the table holds every rank's samples), right-padded micro-batches
(:class:`MicroBatch`) and packed THD micro-batches (:class:`~pr2_megatron.routes.packed.
PackedMicroBatch`, per-sequence CP split and alignment padding) -- only real tokens enter the
table, padding gets spread-out routes -- and the tokens' names for the
predictor's feature cache, so that a reordered mini-step trains the predictor on the right
tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from pr2_megatron.errors import RouteError
from pr2_megatron.routes.gather import gather_route_table
from pr2_megatron.routes.packed import (
    PackedMicroBatch,
    gather_packed_route_table,
    packed_targets,
    packed_token_keys,
)
from pr2_megatron.routes.table import RouteTable
from pr2_megatron.routes.targets import context_parallel_positions, micro_batch_targets

__all__ = ["KEY_STRIDE", "MicroBatch", "PackedMicroBatch", "RouteGroups", "RoutePath", "token_keys"]

#: Token key = ``sample_id * KEY_STRIDE + position``: the same token has the same key in every
#: layout (rollout generation steps, training micro-batches of any size and order).
KEY_STRIDE = 1 << 32


@dataclass(frozen=True)
class MicroBatch:
    """One forward's samples, right-padded to ``seq_len`` in Megatron's ``[S, B]`` layout.

    ``sample_ids[b]`` names column b (unique over the rollout batch, on every rank);
    ``lengths[b]`` is its real token count (None: all ``seq_len``). Only real tokens have rows in
    a route table; the padding positions are never counted as tokens.
    """

    sample_ids: tuple[int, ...]
    seq_len: int
    lengths: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_ids", tuple(int(i) for i in self.sample_ids))
        if self.lengths is not None:
            object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))
            if len(self.lengths) != len(self.sample_ids):
                raise RouteError(
                    f"micro-batch of {len(self.sample_ids)} samples has {len(self.lengths)} lengths"
                )
            bad = [
                (s, n) for s, n in zip(self.sample_ids, self.lengths) if not 0 <= n <= self.seq_len
            ]
            if bad:
                raise RouteError(
                    f"sample id {bad[0][0]}: length {bad[0][1]} is outside [0, {self.seq_len}]"
                )
        if not self.sample_ids:
            raise RouteError("a micro-batch needs at least one sample")

    @property
    def real_lengths(self) -> list[int]:
        """Real token count of each sample (``seq_len`` when the batch is not padded)."""
        return list(self.lengths) if self.lengths is not None else [self.seq_len] * len(self)

    def __len__(self) -> int:
        return len(self.sample_ids)


@dataclass(frozen=True)
class RouteGroups:
    """The process groups routes cross; None means that kind of parallelism is absent.

    ``data``: data-parallel group (it contains the expert-parallel ranks of a layer; None: the
    world). ``tensor`` with ``sequence_parallel``: each TP rank routes its ``S/TP`` chunk.
    ``context``: Megatron's load-balanced CP split. ``pipeline``: each stage routes its layers.
    """

    data: Optional[dist.ProcessGroup] = None
    tensor: Optional[dist.ProcessGroup] = None
    sequence_parallel: bool = False
    context: Optional[dist.ProcessGroup] = None
    pipeline: Optional[dist.ProcessGroup] = None

    @classmethod
    def from_parallel_state(cls, sequence_parallel: bool) -> RouteGroups:
        """The groups of Megatron's initialised parallel state (``parallel_state``)."""
        from megatron.core import parallel_state as ps

        def group_if_parallel(group):
            return group if dist.get_world_size(group) > 1 else None

        return cls(
            data=ps.get_data_parallel_group(),
            tensor=group_if_parallel(ps.get_tensor_model_parallel_group()),
            sequence_parallel=sequence_parallel,
            context=group_if_parallel(ps.get_context_parallel_group()),
            pipeline=group_if_parallel(ps.get_pipeline_model_parallel_group()),
        )

    @staticmethod
    def _rank_size(group) -> tuple[int, int]:
        if group is None:
            return 0, 1
        return dist.get_rank(group), dist.get_world_size(group)

    @property
    def tp_rank_size(self) -> tuple[int, int]:
        """``(rank, size)`` in the tensor-parallel group ((0, 1) without sequence parallelism)."""
        return self._rank_size(self.tensor) if self.sequence_parallel else (0, 1)

    @property
    def cp_rank_size(self) -> tuple[int, int]:
        """``(rank, size)`` in the context-parallel group."""
        return self._rank_size(self.context)


def token_keys(
    batch: MicroBatch | PackedMicroBatch,
    groups: RouteGroups,
    captured_SB: Optional[torch.Tensor] = None,
    *,
    start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature-cache names ``(keys_T, groups_T)`` of this rank's tokens of a forward.

    Key ``sample_id * KEY_STRIDE + position``, group the sample id (the cache keeps at most T_c
    tokens per response); rows in the ``[S, B]`` order of the rank's CP part and SP chunk.
    Padding positions, and those where ``captured_SB`` (``[S, B]`` bool) is False, get key -1:
    the cache skips them (e.g. positions an earlier generation step already offered).

    A :class:`PackedMicroBatch` names its rows in the rank's stream order (alignment padding:
    key -1; ``captured_SB`` and ``start`` are for right-padded batches only).

    ``start``: the forward's rows are positions ``start .. start + batch.seq_len - 1`` of its
    samples (incremental decoding with a KV cache: a prefill chunk, or a decoding step of
    ``seq_len=1``); ``batch.lengths`` then count real tokens within that window. Such a window
    is not split over CP or SP ranks (RouteError), as no decoding forward is.
    """
    if isinstance(batch, PackedMicroBatch):
        if captured_SB is not None or start:
            raise RouteError(
                "captured_SB and start apply to right-padded [S, B] micro-batches only"
            )
        tp_rank, tp_size = groups.tp_rank_size
        cp_rank, cp_size = groups.cp_rank_size
        return packed_token_keys(
            batch,
            key_stride=KEY_STRIDE,
            tp_rank=tp_rank,
            tp_size=tp_size,
            cp_rank=cp_rank,
            cp_size=cp_size,
        )
    if start < 0:
        raise RouteError(f"token_keys: start position {start} is negative")
    if start and (groups.cp_rank_size[1] > 1 or groups.tp_rank_size[1] > 1):
        raise RouteError(
            f"token_keys: a forward from position {start} cannot be split over context-parallel "
            f"(CP={groups.cp_rank_size[1]}) or sequence-parallel (TP={groups.tp_rank_size[1]}) "
            "ranks; incremental decoding runs without CP and SP"
        )
    ids_B = torch.tensor(batch.sample_ids, dtype=torch.long)
    positions_S = torch.arange(start, start + batch.seq_len)
    keys_SB = ids_B.unsqueeze(0) * KEY_STRIDE + positions_S.unsqueeze(1)
    real_SB = positions_S.unsqueeze(1) - start < torch.tensor(batch.real_lengths).unsqueeze(0)
    if captured_SB is not None:
        real_SB = real_SB & captured_SB.to(torch.bool)
    keys_SB = torch.where(real_SB, keys_SB, torch.full_like(keys_SB, -1))
    groups_SB = ids_B.unsqueeze(0).expand(batch.seq_len, -1)
    keys_SB, groups_SB = _local_rows(keys_SB, groups), _local_rows(groups_SB, groups)
    return keys_SB.reshape(-1), groups_SB.reshape(-1)


def _local_rows(tensor_SB: torch.Tensor, groups: RouteGroups) -> torch.Tensor:
    """The rows of ``[S, ...]`` this rank routes: its CP part, then its SP chunk."""
    seq_len = tensor_SB.shape[0]
    cp_rank, cp_size = groups.cp_rank_size
    if cp_size > 1:
        tensor_SB = tensor_SB[context_parallel_positions(seq_len, cp_rank, cp_size)]
    tp_rank, tp_size = groups.tp_rank_size
    if tp_size > 1:
        local = tensor_SB.shape[0]
        if local % tp_size:
            raise RouteError(
                f"sequence length {local} (of {seq_len}, context-parallel size {cp_size}) is not "
                f"divisible by TP={tp_size}"
            )
        chunk = local // tp_size
        tensor_SB = tensor_SB[tp_rank * chunk : (tp_rank + 1) * chunk]
    return tensor_SB


class RoutePath:
    """Rollout routes -> route table -> targets, for one model's controller on this rank.

    ``controller`` is the :class:`~pr2_megatron.routing.controller.RoutingController` of this
    rank's model chunks; ``groups`` default to Megatron's parallel state (with the routers'
    sequence parallelism).
    """

    def __init__(self, controller, groups: Optional[RouteGroups] = None) -> None:
        self.controller = controller
        if groups is None:
            groups = RouteGroups.from_parallel_state(controller.sequence_parallel)
        self.groups = groups

    def local_rows(self, tensor_SB: torch.Tensor) -> torch.Tensor:
        """The rows of a ``[S, ...]`` tensor that this rank routes (its CP part, SP chunk)."""
        return _local_rows(tensor_SB, self.groups)

    # --------------------------------------------------------------------------- rollout
    def name_tokens(
        self,
        batch: MicroBatch | PackedMicroBatch,
        captured_SB: Optional[torch.Tensor] = None,
        *,
        start: int = 0,
    ) -> None:
        """Queue the feature-cache names of the next forward's tokens (see :func:`token_keys`).

        Only when the pass uses them (predict phase, replay that trains the predictor, or a
        probe attached: ``RoutingController.attach_probe``), so it is safe to call before every
        forward. ``start``: first position of a decoding
        forward's window (KV-cached generation feeds positions ``start .. start + seq_len - 1``).
        """
        ctl = self.controller
        if ctl.routers and (ctl.phase.value == "predict" or ctl.trains_predictor or ctl.probing):
            ctl.set_token_keys(*token_keys(batch, self.groups, captured_SB, start=start))

    def gather(
        self,
        batches: Sequence[MicroBatch | PackedMicroBatch],
        routes: Optional[Sequence[torch.Tensor]] = None,
        plain_routes: Optional[Sequence[torch.Tensor]] = None,
        *,
        from_routers: Optional[bool] = None,
    ) -> RouteTable:
        """The route table of a pass on every rank (collective over all the path's groups).

        ``routes[f]`` / ``plain_routes[f]`` are this rank's ``[T, L, K]`` routes of
        ``batches[f]``; by default the routes the controller recorded in this pass, one per
        forward, and (predict phase) the plain-replay routes beside them. The batches are all
        right-padded (:class:`MicroBatch`) or all packed (:class:`PackedMicroBatch`). Every rank
        checks its own real tokens' ids; routes given from elsewhere (``from_routers`` False,
        the default when ``routes`` is given) are also checked for k distinct ids per row.
        """
        ctl = self.controller
        if from_routers is None:
            from_routers = routes is None
        if routes is None:
            routes = ctl.collect_routes() if ctl.routers else None
            if plain_routes is None and ctl.phase.value == "predict" and ctl.routers:
                plain_routes = ctl.collect_plain_routes()
        packed = [isinstance(b, PackedMicroBatch) for b in batches]
        if any(packed):
            if not all(packed):
                raise RouteError("gather: mix of packed and right-padded micro-batches")
            return gather_packed_route_table(
                routes,
                batches,
                layer_numbers=ctl.layer_numbers,
                num_experts=ctl.route_id_bound,
                topk=ctl.topk,
                plain_routes_per_forward=plain_routes,
                data_group=self.groups.data,
                tp_group=self.groups.tensor,
                sequence_parallel=self.groups.sequence_parallel,
                cp_group=self.groups.context,
                pp_group=self.groups.pipeline,
            )
        return gather_route_table(
            routes,
            [b.sample_ids for b in batches],
            layer_numbers=ctl.layer_numbers,
            num_experts=ctl.route_id_bound,
            topk=ctl.topk,
            plain_routes_per_forward=plain_routes,
            lengths_per_forward=[b.real_lengths for b in batches],
            data_group=self.groups.data,
            tp_group=self.groups.tensor,
            sequence_parallel=self.groups.sequence_parallel,
            cp_group=self.groups.context,
            pp_group=self.groups.pipeline,
            check_distinct=not from_routers,
        )

    # -------------------------------------------------------------------------- training
    def targets(
        self, table: RouteTable, batch: MicroBatch | PackedMicroBatch, *, plain: bool = False
    ):
        """The ``[T, L, K]`` (int64) rows of ``table`` for ``batch``'s forward on this rank.

        Columns by global layer number (never by position): a table of other MoE layers is an
        error, not a shifted replay. ``plain=True``: the table's plain-replay routes.
        """
        tp_rank, tp_size = self.groups.tp_rank_size
        cp_rank, cp_size = self.groups.cp_rank_size
        if isinstance(batch, PackedMicroBatch):
            return packed_targets(
                table,
                batch,
                tp_rank=tp_rank,
                tp_size=tp_size,
                cp_rank=cp_rank,
                cp_size=cp_size,
                layer_numbers=self.controller.layer_numbers,
                plain=plain,
                padding_experts=self.controller.num_experts or None,
            )
        return micro_batch_targets(
            table,
            batch.sample_ids,
            batch.seq_len,
            lengths=batch.real_lengths,
            tp_rank=tp_rank,
            tp_size=tp_size,
            sequence_parallel=tp_size > 1,
            cp_rank=cp_rank,
            cp_size=cp_size,
            layer_numbers=self.controller.layer_numbers,
            plain=plain,
        )

    def set_targets(
        self,
        table: RouteTable,
        batch: MicroBatch | PackedMicroBatch,
        *,
        plain_from: Optional[RouteTable] = None,
    ) -> None:
        """Queue ``batch``'s replay targets (and, when the predictor trains, its token names).

        The plain-replay route for the metrics comes from ``plain_from`` (default ``table``)
        when that table holds one: r2 replays the old-log-prob pass's table and compares with
        the rollout's plain route.
        """
        source = table if plain_from is None else plain_from
        plain = None
        if source.plain_routes_TLK is not None:
            plain = self.targets(source, batch, plain=True)
        self.controller.set_targets(self.targets(table, batch), plain)
        self.name_tokens(batch)
