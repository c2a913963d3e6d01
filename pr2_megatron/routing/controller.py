"""The routers' switchboard for a Megatron training stack: :class:`RoutingController`.

Legend: T tokens of one forward (Megatron's ``[S, B]`` order flattened, the rank's SP chunk), L
MoE layers of this rank, K top-k.

The controller switches the phase of every PR2 router of the given model chunks, queues replay
targets and token names, collects recorded routes and reads the pass's metrics. Route tables
and targets for any layout come from :class:`pr2_megatron.routes.RoutePath`, built on it::

    controller = RoutingController(model_chunks)
    path = RoutePath(controller)
    controller.predict()                        # PR2 rollout (or .record() for r2/r3)
    ... rollout forwards (path.name_tokens(batch) before each) ...
    table = path.gather(rollout_batches)
    controller.replay(train_predictor=mini_step >= 2, collect_metrics=True)
    for batch in training_batches:
        path.set_targets(table, batch)          # before each training forward
        ... forward / backward (recompute replays the same route) ...
    controller.finish()                         # every target consumed, or RouteError
    metrics = controller.metrics(group=data_parallel_group)

Metrics need each forward's replayed and live routes. By default they are held until the pass
ends (``forward_routes()``); ``replay(collect_metrics=True, on_forward=fn)`` streams them
instead: each forward's routes go to ``fn`` once every MoE layer of the rank has routed it,
are added to the pass's agreement sums and released, so at most the forwards in flight are
held (``held_record_bytes()``), under Megatron's schedules too.

The routers are found by walking the given modules (no process-global registry), so a model
built twice in one process cannot leave stale routers behind.

Multi-token-prediction (MTP) layers have PR2 routers too, numbered past the decoder
(``num_layers + j``, :attr:`PR2Router.route_layer_number`). A model with MTP routers needs a
choice: ``mtp="exclude"`` keeps them out of the route path (they route live in every phase and
never expect targets: the engine format, whose ``routed_experts`` cover the decoder layers
only), ``mtp="include"`` treats them as further MoE layers of the route table.

A pass's metrics (:meth:`RoutingController.metrics`) are read in
:mod:`pr2_megatron.routing.controller_metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Optional, Union

import torch

from pr2_megatron.errors import RouteError
from pr2_megatron.metrics.agreement import RoutingAgreement
from pr2_megatron.routing.controller_metrics import ControllerMetrics
from pr2_megatron.routing.router import PR2Router, RoutingPhase

#: One forward's routes, ``[T, L, K]`` each: ``replayed``, ``live`` and ``plain`` (or None).
ForwardRoutes = dict[str, Optional[torch.Tensor]]


class RoutingController(ControllerMetrics):
    """Switch phases, hand over and collect routes, and read metrics for every PR2 router.

    Raises ``ValueError`` for a model whose MoE layers have other routers than PR2's (Megatron's
    stock ``TopKRouter`` would ignore every target silently) and, unless ``allow_empty`` (a
    pipeline stage without MoE layers), for a model with no PR2 router at all.
    """

    def __init__(
        self,
        model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
        *,
        allow_empty: bool = False,
        mtp: Optional[Literal["exclude", "include"]] = None,
    ) -> None:
        from megatron.core.transformer.moe.router import Router

        chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        modules = [m for chunk in chunks for m in chunk.modules()]
        foreign = [m for m in modules if isinstance(m, Router) and not isinstance(m, PR2Router)]
        if foreign:
            raise ValueError(
                f"the model's MoE layers {sorted(getattr(m, 'layer_number', -1) for m in foreign)} "
                f"have a {type(foreign[0]).__name__}, not a PR2Router: build the model with "
                "pr2_megatron.routing.pr2_decoder_block_spec (a stock router ignores replay)"
            )
        routers = [m for m in modules if isinstance(m, PR2Router)]
        if mtp not in (None, "exclude", "include"):
            raise ValueError(f"mtp must be 'exclude' or 'include', got {mtp!r}")
        mtp_routers = [r for r in routers if r.is_mtp]
        if mtp_routers and mtp is None:
            raise ValueError(
                f"the model has multi-token-prediction routers (MoE layers "
                f"{sorted(r.route_layer_number for r in mtp_routers)}, past the decoder's "
                f"{mtp_routers[0].config.num_layers} layers): pass mtp='exclude' (they route "
                "live, outside route tables: engine-format routes) or mtp='include' (further "
                "layers of the route table)"
            )
        #: MTP routers kept out of the route path (``mtp="exclude"``): always live top-k.
        self.excluded_routers: list[PR2Router] = mtp_routers if mtp == "exclude" else []
        if self.excluded_routers:
            routers = [r for r in routers if not r.is_mtp]
        if not routers and not allow_empty:
            raise ValueError(
                "the model has no PR2 router (no MoE layer, or a spec without the PR2 router); "
                "pass allow_empty=True for a pipeline stage without MoE layers"
            )
        numbers = [r.route_layer_number for r in routers]
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"two PR2 routers share a layer number: {numbers}")
        self.routers: list[PR2Router] = sorted(routers, key=lambda r: r.route_layer_number)
        self.phase = RoutingPhase.OFF
        self.trains_predictor = False
        self.collects_metrics = False
        self._on_forward: Optional[Callable[[ForwardRoutes], None]] = None
        self._reset_pass_sums()

    @property
    def layer_numbers(self) -> list[int]:
        """Global (1-based) layer numbers of this rank's MoE layers, ascending."""
        return [r.route_layer_number for r in self.routers]

    @property
    def topk(self) -> int:
        """Experts per token (the same in every layer; 0 without routers)."""
        return self.routers[0].topk if self.routers else 0

    @property
    def num_experts(self) -> int:
        """Routed experts per layer (0 without routers)."""
        return self.routers[0].num_experts if self.routers else 0

    @property
    def sequence_parallel(self) -> bool:
        """Whether the routers see sequence-parallel chunks (``S/TP`` tokens per TP rank)."""
        return bool(self.routers and self.routers[0].config.sequence_parallel)

    @property
    def route_id_bound(self) -> int:
        """Route ids lie in ``[0, route_id_bound)``: E, or E + K with variable-size routes.

        ProbMoE dynamic-k fills empty slot j of a row with ``E + j``. Pass it as ``num_experts``
        of route tables, so that they hold padded rows unchanged.
        """
        if not self.routers:
            return 0
        return getattr(self.routers[0], "route_id_bound", self.routers[0].num_experts)

    # ----------------------------------------------------------------------------- phases
    def set_phase(
        self,
        phase: RoutingPhase,
        *,
        train_predictor: bool = False,
        collect_metrics: bool = False,
        on_forward: Optional[Callable[[ForwardRoutes], None]] = None,
    ) -> None:
        """Start a pass in ``phase`` on every router (drops the previous pass's records).

        ``on_forward`` (record, or replay with ``collect_metrics``) streams the pass's routes:
        see :meth:`replay`.
        """
        phase = RoutingPhase(phase)
        if on_forward is not None and not (
            phase == RoutingPhase.RECORD or (phase == RoutingPhase.REPLAY and collect_metrics)
        ):
            raise ValueError(
                f"on_forward streams recorded routes: it needs the record phase or the replay "
                f"phase with collect_metrics=True, not {phase.value!r} with "
                f"collect_metrics={collect_metrics}"
            )
        self.phase = phase
        self.trains_predictor = train_predictor
        self.collects_metrics = collect_metrics
        self._on_forward = on_forward
        self._reset_pass_sums()
        hook = None if on_forward is None else self._forward_recorded
        for router in self.routers:
            router.set_phase(
                self.phase, train_predictor=train_predictor, collect_metrics=collect_metrics
            )
            router.on_forward_recorded = hook
        for router in self.excluded_routers:
            router.set_phase(RoutingPhase.OFF)  # live top-k, nothing recorded or expected

    def off(self) -> None:
        """Live top-k, nothing recorded."""
        self.set_phase(RoutingPhase.OFF)

    def record(self, *, on_forward: Optional[Callable[[ForwardRoutes], None]] = None) -> None:
        """Live top-k, recorded (r2: the old-log-prob pass at θ_old; r3: the rollout).

        With ``on_forward`` each forward's route goes to it (as ``replayed`` and ``live``) and
        is released instead of being kept for :meth:`collect_routes`.
        """
        self.set_phase(RoutingPhase.RECORD, on_forward=on_forward)

    def predict(self, collect_metrics: bool = False) -> None:
        """PR2 rollout: predicted routes, recorded with the plain-replay ones; features cached."""
        self.set_phase(RoutingPhase.PREDICT, collect_metrics=collect_metrics)

    def replay(
        self,
        *,
        train_predictor: bool = False,
        collect_metrics: bool = False,
        on_forward: Optional[Callable[[ForwardRoutes], None]] = None,
    ) -> None:
        """Replay targets given with :meth:`set_targets`; optionally train the predictors.

        ``collect_metrics`` records each forward's replayed route, the live top-k and the
        plain-replay route, in the route table's smallest dtype. Without ``on_forward`` they are
        held until the pass ends (:meth:`forward_routes`, :meth:`release_forward_records`).
        With ``on_forward(routes)`` (needs ``collect_metrics``), each forward's routes (as
        :meth:`forward_routes` gives them) are handed to it as soon as every MoE layer of this
        rank has routed that forward -- from inside the forward of its last layer, under any
        schedule -- then added to the pass's agreement sums (:meth:`metrics`) and released: the
        caller selects rows or compares with its own reference there, and memory stays bounded
        by the forwards in flight. :meth:`forward_routes` is then unavailable.
        """
        self.set_phase(
            RoutingPhase.REPLAY,
            train_predictor=train_predictor,
            collect_metrics=collect_metrics,
            on_forward=on_forward,
        )

    # ----------------------------------------------------------------------- probes, schedule
    def attach_probe(self, probe: Callable) -> None:
        """Hand every named forward's router inputs and logits to ``probe`` (any phase).

        ``probe(router, keys_T, hidden_TH, logits_TE)`` is called by each router after a
        forward whose tokens were named (``RoutePath.name_tokens`` names them in every phase
        while a probe is attached); a diagnostic recorder, e.g.
        :class:`pr2_megatron.routing.probe.FeatureRecorder`.
        """
        for router in self.routers:
            router.feature_probe = probe

    def detach_probe(self) -> None:
        """Stop handing forwards to the probe (token names are again needed only by PR2)."""
        for router in self.routers:
            router.feature_probe = None

    @property
    def probing(self) -> bool:
        """Whether a probe is attached (forwards' tokens must then be named)."""
        return bool(self.routers) and self.routers[0].feature_probe is not None

    def set_rollout_id(self, rollout_id: int) -> None:
        """The rollout id the stabilisers' schedules follow (the margin cap's η anneal)."""
        for router in self.routers:
            router.rollout_id = int(rollout_id)

    # ----------------------------------------------------------------------------- routes
    def set_targets(
        self, routes_TLK: torch.Tensor, plain_routes_TLK: Optional[torch.Tensor] = None
    ) -> None:
        """Queue the route of the next forward (one micro-batch) for every MoE layer.

        ``routes_TLK[:, l]`` goes to the l-th MoE layer of :attr:`layer_numbers`; rows are the
        forward's tokens in Megatron's flattened ``[S, B]`` order (the rank's SP chunk).
        ``plain_routes_TLK`` (the plain-replay route: the live top-k at rollout) is used for
        metrics only.
        """
        if self.phase != RoutingPhase.REPLAY:
            raise RouteError(f"set_targets needs the replay phase; the phase is {self.phase.value}")
        self.validate_routes(routes_TLK, what="replay target")
        if plain_routes_TLK is not None and plain_routes_TLK.shape != routes_TLK.shape:
            raise RouteError(
                f"plain-replay routes have shape {tuple(plain_routes_TLK.shape)}, targets "
                f"{tuple(routes_TLK.shape)}"
            )
        for index, router in enumerate(self.routers):
            plain = None if plain_routes_TLK is None else plain_routes_TLK[:, index]
            router.push_target(routes_TLK[:, index], plain)

    def set_token_keys(self, keys_T: torch.Tensor, groups_T: torch.Tensor) -> None:
        """Name the next forward's tokens for the predictor's feature cache (every MoE layer).

        Needed when rollout and training forwards differ in layout (generation steps at rollout,
        other micro-batches in training): the same key must name the same token in both
        (:func:`pr2_megatron.routes.token_keys` makes such keys). ``keys_T``/``groups_T`` are
        ``[T]`` in Megatron's flattened ``[S, B]`` order (the rank's SP chunk); key -1 skips a
        token. See :meth:`PR2Router.push_token_keys`.
        """
        for router in self.routers:
            router.push_token_keys(keys_T, groups_T)

    def forward_routes(self) -> list[ForwardRoutes]:
        """Per forward held: ``replayed`` (dispatched) and ``live`` (top-k) ``[T, L, K]``.

        ``record``: both are the live top-k. ``replay`` with ``collect_metrics``: the replayed
        route, the live router's own top-k at that moment (both in the route table's smallest
        dtype), and ``plain`` (the plain-replay route) where it was given with the targets.
        Forwards released with :meth:`release_forward_records` are not included; a pass that
        streams its routes (``on_forward``) holds none and raises RuntimeError.
        """
        self._require_held_routes("forward_routes")
        return [self._stack_forward(i) for i in range(self._num_forwards())]

    def release_forward_records(self) -> int:
        """Add the held forwards to the pass's agreement sums and drop their routes.

        For callers that read :meth:`forward_routes` after each forward (or group of forwards):
        :meth:`metrics` still covers the whole pass, while the records held stay bounded.
        Returns the number of forwards released.
        """
        self._require_held_routes("release_forward_records")
        released = self._num_forwards()
        for _ in range(released):
            self._fold(self._pop_forward())
        return released

    def held_record_bytes(self) -> int:
        """Bytes of the per-forward route records the routers hold right now.

        Recorded routes (record / predict), plain-replay routes (predict) and replay metric
        records, each tensor counted by its own elements (a view as its size, not its base's).
        """
        total = 0
        for router in self.routers:
            tensors = [*router.recorded, *router.recorded_plain]
            for record in router.metric_records:
                tensors += [t for t in record.values() if isinstance(t, torch.Tensor)]
            total += sum(t.nbytes for t in tensors)
        return total

    # ------------------------------------------------------------------ per-forward records
    def _require_held_routes(self, what: str) -> None:
        if self.phase == RoutingPhase.REPLAY:
            self._require_metrics(what)
        elif self.phase != RoutingPhase.RECORD:
            raise RouteError(f"{what} needs the record or replay phase, not {self.phase.value}")
        if self._on_forward is not None:
            raise RuntimeError(
                f"{what}: this {self.phase.value} pass streams its routes to on_forward and "
                "holds none"
            )

    def _records_of(self, router: PR2Router) -> list:
        """The router's per-forward records of this pass's phase."""
        return router.recorded if self.phase == RoutingPhase.RECORD else router.metric_records

    def _stack_forward(self, index: int) -> ForwardRoutes:
        """Forward ``index`` of the held records, every layer stacked: ``[T, L, K]``."""
        records = [self._records_of(r)[index] for r in self.routers]
        if self.phase == RoutingPhase.RECORD:
            routes_TLK = torch.stack(records, dim=1)
            return {"replayed": routes_TLK, "live": routes_TLK}
        forward = {
            key: torch.stack([rec[key] for rec in records], dim=1) for key in ("replayed", "live")
        }
        plains = [rec["plain"] for rec in records]
        forward["plain"] = None if plains[0] is None else torch.stack(plains, dim=1)
        return forward

    def _pop_forward(self) -> ForwardRoutes:
        """The oldest held forward, stacked, and dropped from every router."""
        forward = self._stack_forward(0)
        for router in self.routers:
            del self._records_of(router)[0]
        return forward

    def _reset_pass_sums(self) -> None:
        self._pass_agreement = RoutingAgreement(self.layer_numbers)
        self._released_forwards = 0

    def _fold(self, forward: ForwardRoutes) -> None:
        """Add a released forward to the pass's sums (replay metrics)."""
        if self.phase == RoutingPhase.REPLAY:
            self._pass_agreement.add_forward(forward, self.layer_numbers)
        self._released_forwards += 1

    def _forward_recorded(self, router: PR2Router) -> None:
        """Router hook (streaming passes): hand over and release every complete forward."""
        while all(self._records_of(r) for r in self.routers):
            forward = self._pop_forward()
            self._fold(forward)
            self._on_forward(forward)

    def validate_routes(self, routes_TLK: torch.Tensor, what: str = "routes") -> None:
        """Shape, id range and k distinct experts per row; errors name the layer and the row.

        Ids range over ``[0, route_id_bound)``: variable-size routes (ProbMoE dynamic-k) fill
        empty slots with distinct ids ``>= E``; the router checks each row's size at replay.
        """
        expected = (len(self.routers), self.topk)
        if not self.routers and routes_TLK.dim() == 3:
            expected = (0, routes_TLK.shape[2])  # a pipeline stage without MoE layers: any k
        if routes_TLK.dim() != 3 or tuple(routes_TLK.shape[1:]) != expected:
            raise RouteError(
                f"{what} must have shape [tokens, {expected[0]} MoE layers "
                f"{self.layer_numbers}, k={expected[1]}], got {tuple(routes_TLK.shape)}"
            )
        if routes_TLK.dtype.is_floating_point or routes_TLK.dtype == torch.bool:
            raise RouteError(f"{what} must hold integer expert ids, got {routes_TLK.dtype}")
        ids = routes_TLK.long()
        bound = self.route_id_bound
        bad = (ids < 0) | (ids >= bound)
        if bad.any():
            row, layer, slot = (int(i) for i in torch.nonzero(bad)[0])
            raise RouteError(
                f"{what}: MoE layer {self.layer_numbers[layer]}, token row {row}: expert id "
                f"{int(ids[row, layer, slot])} is outside [0, {bound})"
            )
        sorted_ids = ids.sort(dim=-1).values
        dup = (sorted_ids[..., 1:] == sorted_ids[..., :-1]).any(dim=-1)
        if dup.any():
            row, layer = (int(i) for i in torch.nonzero(dup)[0])
            raise RouteError(
                f"{what}: MoE layer {self.layer_numbers[layer]}, token row {row}: duplicate "
                f"expert ids {ids[row, layer].tolist()} (k distinct experts are required; "
                "duplicates break the dispatcher's split sizes)"
            )

    def collect_routes(self) -> list[torch.Tensor]:
        """Routes recorded in this pass: one ``[T, L, K]`` tensor per forward, in order."""
        return self._stack_per_forward([r.recorded for r in self.routers])

    def collect_plain_routes(self) -> list[torch.Tensor]:
        """Predict phase: each forward's plain-replay route (the live top-k at θ_old)."""
        if self.phase != RoutingPhase.PREDICT:
            raise RouteError(
                f"plain-replay routes are recorded in the predict phase, not {self.phase.value}"
            )
        return self._stack_per_forward([r.recorded_plain for r in self.routers])

    def _stack_per_forward(self, per_router: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        counts = {len(records) for records in per_router}
        if len(counts) > 1:
            raise RouteError(
                "MoE layers recorded different numbers of forwards: "
                + ", ".join(f"layer {n}: {len(r)}" for n, r in zip(self.layer_numbers, per_router))
            )
        num_forwards = counts.pop() if counts else 0
        return [
            torch.stack([records[i] for records in per_router], dim=1) for i in range(num_forwards)
        ]

    def finish(self) -> None:
        """End a replay pass (after its backward): every queued target must have been consumed.

        Also releases the routes kept for activation recomputes that never came (forwards
        without a graph in training mode).
        """
        for router in self.routers + self.excluded_routers:
            router.end_pass()
        leftovers = {r.route_layer_number: r.pending_targets() for r in self.routers}
        leftovers = {n: c for n, c in leftovers.items() if c}
        if leftovers:
            raise RouteError(
                "replay targets set but never consumed (a forward was skipped or the model "
                "has other routers than the controller knows): "
                + ", ".join(f"MoE layer {n}: {c} target(s)" for n, c in leftovers.items())
            )
        if self._on_forward is not None:
            partial = {r.layer_number: len(self._records_of(r)) for r in self.routers}
            partial = {n: c for n, c in partial.items() if c}
            if partial:
                raise RouteError(
                    "forwards routed by some MoE layers of this rank only (their routes never "
                    "reached on_forward): "
                    + ", ".join(f"MoE layer {n}: {c} forward(s)" for n, c in partial.items())
                )

    # ---------------------------------------------------------------------------- metrics
    def _require_metrics(self, what: str) -> None:
        if not self.collects_metrics:
            raise RuntimeError(
                f"{what}: this {self.phase.value} pass collects no metrics; start it with "
                "collect_metrics=True"
            )

    def _num_forwards(self) -> int:
        """Forwards held by every router (the record lists of this pass's phase)."""
        counts = {len(self._records_of(r)) for r in self.routers}
        if len(counts) > 1:
            raise RouteError(
                "MoE layers recorded different numbers of forwards: "
                + ", ".join(
                    f"layer {r.layer_number}: {len(self._records_of(r))}" for r in self.routers
                )
            )
        return counts.pop() if counts else 0

    # -------------------------------------------------------------------------- optimizer
    def predictor_parameters(self) -> list[torch.nn.Parameter]:
        """The evolution predictors' weights (one per MoE layer of this rank)."""
        return [r.predictor.weight for r in self.routers]
