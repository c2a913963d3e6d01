"""The public entry point for a Megatron training stack: :class:`RoutingController`.

Legend: T tokens of one forward (Megatron's ``[S, B]`` order flattened), L MoE layers of this
rank, K top-k.

A stack that keeps its own trainer (verl, slime, NeMo-RL, a custom loop) needs only this::

    controller = RoutingController(model_chunks)
    controller.predict()                        # PR2 rollout (or .record() for r2/r3)
    ... rollout forwards ...
    routes = controller.collect_routes()        # one [T, L, K] tensor per forward
    controller.replay(train_predictor=mini_step >= 2, collect_metrics=True)
    for micro_batch_routes in ...:
        controller.set_targets(micro_batch_routes)   # before each training forward
        ... forward / backward (recompute replays the same route) ...
    controller.finish()                         # every target consumed, or RouteError
    metrics = controller.metrics()

The routers are found by walking the given modules (no process-global registry), so a model
built twice in one process cannot leave stale routers behind.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional, Union

import torch

from pr2_megatron.metrics import RoutingAgreement
from pr2_megatron.predictor import is_predictor_parameter
from pr2_megatron.router import PR2Router, RouteError, RoutingPhase


class RoutingController:
    """Switch phases, hand over and collect routes, and read metrics for every PR2 router."""

    def __init__(self, model: Union[torch.nn.Module, Sequence[torch.nn.Module]]) -> None:
        chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        routers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, PR2Router)]
        numbers = [r.layer_number for r in routers]
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"two PR2 routers share a layer number: {numbers}")
        self.routers: list[PR2Router] = sorted(routers, key=lambda r: r.layer_number)
        self.phase = RoutingPhase.OFF

    @property
    def layer_numbers(self) -> list[int]:
        """Global (1-based) layer numbers of this rank's MoE layers, ascending."""
        return [r.layer_number for r in self.routers]

    @property
    def topk(self) -> int:
        """Experts per token (the same in every layer)."""
        return self.routers[0].topk if self.routers else 0

    @property
    def num_experts(self) -> int:
        """Routed experts per layer."""
        return self.routers[0].num_experts if self.routers else 0

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
        self, phase: RoutingPhase, *, train_predictor: bool = False, collect_metrics: bool = False
    ) -> None:
        """Start a pass in ``phase`` on every router (drops the previous pass's records)."""
        self.phase = RoutingPhase(phase)
        for router in self.routers:
            router.set_phase(
                self.phase, train_predictor=train_predictor, collect_metrics=collect_metrics
            )

    def off(self) -> None:
        """Live top-k, nothing recorded."""
        self.set_phase(RoutingPhase.OFF)

    def record(self) -> None:
        """Live top-k, recorded (r2: old-policy pass; r3: rollout)."""
        self.set_phase(RoutingPhase.RECORD)

    def predict(self, collect_metrics: bool = False) -> None:
        """PR2 rollout: predicted routes, recorded with the live ones; features cached."""
        self.set_phase(RoutingPhase.PREDICT, collect_metrics=collect_metrics)

    def replay(self, *, train_predictor: bool = False, collect_metrics: bool = False) -> None:
        """Replay targets given with :meth:`set_targets`; optionally train the predictors."""
        self.set_phase(
            RoutingPhase.REPLAY, train_predictor=train_predictor, collect_metrics=collect_metrics
        )

    # ----------------------------------------------------------------------------- routes
    def set_targets(
        self, routes_TLK: torch.Tensor, old_routes_TLK: Optional[torch.Tensor] = None
    ) -> None:
        """Queue the route of the next forward (one micro-batch) for every MoE layer.

        ``routes_TLK[:, l]`` goes to the l-th MoE layer of :attr:`layer_numbers`; rows are the
        forward's tokens in Megatron's flattened ``[S, B]`` order (the rank's SP chunk).
        ``old_routes_TLK`` (the plain-replay route) is used for metrics only.
        """
        if self.phase != RoutingPhase.REPLAY:
            raise RouteError(f"set_targets needs the replay phase; the phase is {self.phase.value}")
        self.validate_routes(routes_TLK, what="replay target")
        if old_routes_TLK is not None and old_routes_TLK.shape != routes_TLK.shape:
            raise ValueError(
                f"old routes have shape {tuple(old_routes_TLK.shape)}, targets "
                f"{tuple(routes_TLK.shape)}"
            )
        for index, router in enumerate(self.routers):
            old = None if old_routes_TLK is None else old_routes_TLK[:, index]
            router.push_target(routes_TLK[:, index], old)

    def set_token_keys(self, keys_T: torch.Tensor, groups_T: torch.Tensor) -> None:
        """Name the next forward's tokens for the predictor's feature cache (every MoE layer).

        Needed when rollout and training forwards differ in layout (generation steps at rollout,
        other micro-batches in training): the same key must name the same token in both.
        ``keys_T``/``groups_T`` are ``[T]`` in Megatron's flattened ``[S, B]`` order (the rank's
        SP chunk); key -1 skips a token. See :meth:`PR2Router.push_token_keys`.
        """
        for router in self.routers:
            router.push_token_keys(keys_T, groups_T)

    def forward_routes(self) -> list[dict[str, torch.Tensor]]:
        """Per forward of this pass: ``used`` (dispatched) and ``live`` (top-k) ``[T, L, K]``.

        ``record``: both are the live top-k. ``replay`` with ``collect_metrics``: the replayed
        route and the live router's own top-k at that moment.
        """
        if self.phase == RoutingPhase.RECORD:
            return [{"used": r, "live": r} for r in self.collect_routes()]
        if self.phase == RoutingPhase.REPLAY:
            used = self._stack_per_forward(
                [[rec["replayed"] for rec in r.metric_records] for r in self.routers]
            )
            live = self._stack_per_forward(
                [[rec["live"] for rec in r.metric_records] for r in self.routers]
            )
            return [{"used": u, "live": v} for u, v in zip(used, live)]
        raise RouteError(f"forward_routes needs the record or replay phase, not {self.phase.value}")

    def validate_routes(self, routes_TLK: torch.Tensor, what: str = "routes") -> None:
        """Shape, id range and k distinct experts per row; errors name the layer and the row.

        Ids range over ``[0, route_id_bound)``: variable-size routes (ProbMoE dynamic-k) fill
        empty slots with distinct ids ``>= E``; the router checks each row's size at replay.
        """
        expected = (len(self.routers), self.topk)
        if not self.routers and routes_TLK.dim() == 3:
            expected = (0, routes_TLK.shape[2])  # a pipeline stage without MoE layers: any k
        if routes_TLK.dim() != 3 or tuple(routes_TLK.shape[1:]) != expected:
            raise ValueError(
                f"{what} must have shape [tokens, {expected[0]} MoE layers "
                f"{self.layer_numbers}, k={expected[1]}], got {tuple(routes_TLK.shape)}"
            )
        if routes_TLK.dtype.is_floating_point or routes_TLK.dtype == torch.bool:
            raise ValueError(f"{what} must hold integer expert ids, got {routes_TLK.dtype}")
        ids = routes_TLK.long()
        bound = self.route_id_bound
        bad = (ids < 0) | (ids >= bound)
        if bad.any():
            row, layer, slot = (int(i) for i in torch.nonzero(bad)[0])
            raise ValueError(
                f"{what}: MoE layer {self.layer_numbers[layer]}, token row {row}: expert id "
                f"{int(ids[row, layer, slot])} is outside [0, {bound})"
            )
        sorted_ids = ids.sort(dim=-1).values
        dup = (sorted_ids[..., 1:] == sorted_ids[..., :-1]).any(dim=-1)
        if dup.any():
            row, layer = (int(i) for i in torch.nonzero(dup)[0])
            raise ValueError(
                f"{what}: MoE layer {self.layer_numbers[layer]}, token row {row}: duplicate "
                f"expert ids {ids[row, layer].tolist()} (k distinct experts are required; "
                "duplicates break the dispatcher's split sizes)"
            )

    def collect_routes(self) -> list[torch.Tensor]:
        """Routes recorded in this pass: one ``[T, L, K]`` tensor per forward, in order."""
        return self._stack_per_forward([r.recorded for r in self.routers])

    def collect_live_routes(self) -> list[torch.Tensor]:
        """In the predict phase: the live top-k of each forward (the plain-replay route)."""
        return self._stack_per_forward([r.recorded_live for r in self.routers])

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
        """End a replay pass: every queued target must have been consumed by a forward."""
        leftovers = {r.layer_number: r.pending_targets() for r in self.routers}
        leftovers = {n: c for n, c in leftovers.items() if c}
        if leftovers:
            raise RouteError(
                "replay targets set but never consumed (a forward was skipped or the model "
                "has other routers than the controller knows): "
                + ", ".join(f"MoE layer {n}: {c} target(s)" for n, c in leftovers.items())
            )

    # ---------------------------------------------------------------------------- metrics
    def metrics(self, group: Optional[torch.distributed.ProcessGroup] = None) -> dict[str, float]:
        """Routing agreement and predictor numbers of this pass, all-reduced over ``group``."""
        out: dict[str, float] = {}
        if self.phase == RoutingPhase.REPLAY:
            agreement = RoutingAgreement(self.layer_numbers)
            num_forwards = max((len(r.metric_records) for r in self.routers), default=0)
            for i in range(num_forwards):
                agreement.begin_forward()
                for router in self.routers:
                    record = router.metric_records[i]
                    agreement.update(
                        router.layer_number, record["replayed"], record["live"], record["old"]
                    )
            if group is not None:
                agreement.reduce_(group)
            out.update(agreement.summary())
            losses = [loss for r in self.routers for loss in r.predictor_losses]
            if losses:
                out["predictor/loss"] = sum(losses) / len(losses)
                for router in self.routers:
                    if router.predictor_losses:
                        out[f"predictor/loss/layer_{router.layer_number}"] = sum(
                            router.predictor_losses
                        ) / len(router.predictor_losses)
        if self.phase == RoutingPhase.PREDICT:
            delta = [rec["delta_abs"] for r in self.routers for rec in r.metric_records]
            logit = [rec["logit_abs"] for r in self.routers for rec in r.metric_records]
            if delta:
                mean_logit = float(torch.stack(logit).mean())
                ratio = float(torch.stack(delta).mean()) / mean_logit if mean_logit else 0.0
                out["predictor/delta_to_logit_ratio"] = ratio
        return out

    # -------------------------------------------------------------------------- optimizer
    def predictor_parameters(self) -> list[torch.nn.Parameter]:
        """The evolution predictors' weights (one per MoE layer of this rank)."""
        return [r.predictor.weight for r in self.routers]

    @property
    def lr_multiplier(self) -> float:
        """α: predictor lr = model lr × α."""
        return self.routers[0].pr2_config.lr_multiplier if self.routers else 1.0


def param_groups(
    model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
    lr: float,
    weight_decay: float,
    lr_multiplier: float,
) -> list[dict]:
    """Torch optimizer param groups: the model, and the predictors at ``lr × α`` without decay.

    For Megatron's ``get_megatron_optimizer`` use :func:`is_predictor_parameter` in its param
    overrides with the same lr multiplier and weight decay 0.
    """
    chunks: Iterable[torch.nn.Module] = model if isinstance(model, (list, tuple)) else [model]
    model_params, predictor_params = [], []
    for chunk in chunks:
        for param in chunk.parameters():
            if not param.requires_grad:
                continue
            (predictor_params if is_predictor_parameter(param) else model_params).append(param)
    groups = [{"params": model_params, "lr": lr, "weight_decay": weight_decay}]
    if predictor_params:
        groups.append(
            {
                "params": predictor_params,
                "lr": lr * lr_multiplier,
                "weight_decay": 0.0,
                "pr2_predictor": True,
            }
        )
    return groups
