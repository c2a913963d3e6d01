"""PR2 routers speaking Megatron's ``RouterReplay`` protocol (opt-in, protocol mode).

Legend of shape suffixes: T tokens of one forward (Megatron's ``[S, B]`` or packed ``[T, 1]``
order flattened, the rank's SP chunk), K top-k, E experts, H hidden, F recorded forwards.

Stacks that drive Megatron's own route replay -- verl (R2 / R3), NeMo-RL, Megatron's inference
engine -- call ``RouterReplay.set_global_router_replay_action(RECORD | REPLAY_FORWARD |
REPLAY_BACKWARD)``, ``set_replay_data``, ``get_recorded_data`` and ``clear_global_*`` on the
process-global list ``RouterReplay.global_router_replay_instances``, or walk a model's routers
and use ``router.router_replay`` directly. With ``PR2RouterConfig(megatron_router_replay=True)``
(and Megatron's ``moe_enable_routing_replay=True``) every PR2 router registers a
:class:`PR2RouterReplay` there, in the place of the stock instance ``TopKRouter`` creates, and
the protocol's actions mean:

* ``RECORD``: dispatch the **predicted** route ``TopK(score_fn(z + Δ))`` with gates from the
  live scores at it, record it (``get_recorded_data`` returns it: actor-side PR2 in the
  old-log-prob pass, rollout-side PR2 in Megatron's inference engine), cache a sample of the
  forward's router inputs and logits for the predictor and snapshot the router weight
  (``W_old``) when a record pass starts (the first RECORD forward after another action, or
  after the router weight changed);
* ``REPLAY_FORWARD``: dispatch the data of ``set_replay_data`` / ``set_target_indices``, gates
  from the live scores at it (Megatron's rule);
* ``REPLAY_BACKWARD``: outside a backward pass, Megatron's FIFO (``replay_backward_list``); an
  activation recompute (inside backward) always replays the route **its own forward
  dispatched**, paired by forward number (:mod:`pr2_megatron.routing.recompute`) whatever the
  action, the backward order or the FIFO's content; the FIFO is still popped so that its
  bookkeeping stays what the stack expects;
* no action: the PR2 phase of the router (``RoutingController``; ``off`` = live top-k).

**Predictor training.** Stacks pass no mini-step counter: a replay forward (training mode,
grad enabled) trains the predictor exactly when the router weight differs bitwise from
``W_old``, i.e. from mini-step 2 on, and never before. Stacks pass no token names either, and
may cut micro-batches differently in RECORD and in training (verl's compute_log_prob and
update_policy use different micro-batch sizes), so a replay forward's tokens are paired with
cached RECORD features only when that is exact:

* ``exact``: the replay data equals, bit for bit, the route of exactly one RECORD forward of the
  pass (same token count; compared through a 128-bit fingerprint of the route, see
  :func:`route_fingerprint`): the forward holds the same tokens in the same order, and the
  predictor trains on that forward's cached tokens, ``KL(softmax(z_cur) ‖ softmax(z_old + W_p
  h_old))`` as in the library's own path;
* ``snapshot`` (an approximation, named in the metrics): no or more than one RECORD forward
  matches (another micro-batch layout). The forward's own router inputs are used against the
  snapshot ``z_old = W_old h``: ``KL(softmax(W_cur h) ‖ softmax(W_old h + W_p h))``. This is the
  router-weight drift exactly, without the representation drift (h moved too since RECORD); no
  token is ever paired with another token's features.

**Registration.** Megatron's list is indexed by position (``set_replay_data`` gives list entry i
the i-th tensor), so anything else in it shifts every layer silently. Before a stack's action
reaches a PR2 router the list is checked (:func:`check_registry`): every entry must belong to a
live PR2 router, layer numbers must be unique and ascending; otherwise a ``RouteError`` names
the layers (a model built twice, a reference model built with ``moe_enable_routing_replay``,
stale instances of a destroyed model: call
``RouterReplay.clear_global_router_replay_instances()`` before building the PR2 model). A PR2
router whose instance is no longer in the list (the list was cleared after the build) raises on
its next protocol forward.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

from pr2_megatron.errors import RouteError

__all__ = [
    "PR2RouterReplay",
    "RouterReplayAction",
    "check_registry",
    "megatron_replay_metrics",
    "route_fingerprint",
]

#: Token key of row r of RECORD forward f in the feature cache: ``f * KEY_STRIDE + r``.
KEY_STRIDE = 1 << 32

# splitmix64 constants as signed int64 (torch wraps int64 arithmetic).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A splitmix64-style scramble of int64 values (wrapping arithmetic)."""
    x = x * _GOLDEN
    x = x ^ (x >> 30)
    x = x * _MIX1
    x = x ^ (x >> 27)
    x = x * _MIX2
    return x ^ (x >> 31)


def route_fingerprint(route_TK: torch.Tensor) -> torch.Tensor:
    """int64 ``[3]``: token count and two pseudo-random weighted sums of a route's ids.

    Equal routes have equal fingerprints; two different routes of the same shape collide only
    if both 64-bit sums do (the weights are pseudo-random per position, ids are small, so a
    collision needs a difference vector orthogonal to two independent weight vectors modulo
    2^64: about 2^-100 for routes that are not built adversarially). Computed on the route's
    device without a host sync.
    """
    flat = route_TK.reshape(-1).long() + 1
    index = torch.arange(flat.numel(), device=flat.device, dtype=torch.long)
    first = (flat * _mix(2 * index + 1)).sum()
    second = (flat * _mix(2 * index + 2)).sum()
    count = torch.tensor(route_TK.shape[0], device=flat.device, dtype=torch.long)
    return torch.stack([count, first, second])


class PR2RouterReplay(RouterReplay):
    """The ``RouterReplay`` instance of one PR2 router in Megatron's global list.

    Keeps Megatron's attributes and methods (``router_replay_action``, ``target_topk_idx``,
    ``recorded_topk_idx``, ``replay_backward_list``, static buffers on newer cores), so every
    stack's calls work unchanged; the PR2 router reads them in its forward. ``get_replay_topk``
    (called by Megatron's routing) lets the PR2 router choose the experts. Also holds the record
    pass of protocol mode: the router-weight snapshot ``W_old``, the fingerprints of the RECORD
    forwards and the pairing counters.
    """

    def __init__(self, router) -> None:
        super().__init__()  # appends this instance to the global list
        self._router_ref = weakref.ref(router)
        self._selector = router._selector
        self.layer_number: Optional[int] = None
        #: W_old: the router weight when the record pass started (None: no record pass yet).
        self.weight_snapshot: Optional[torch.Tensor] = None
        self._record_fingerprints: list[torch.Tensor] = []
        self._new_pass = True
        self._moved_key: Optional[tuple] = None
        self._moved = False
        #: Replay forwards whose predictor loss used exactly paired / snapshot features, and
        #: replay forwards that did not train because the router had not moved.
        self.pairing_counts = {"exact": 0, "snapshot": 0, "not_moved": 0}

    # ------------------------------------------------------------------- Megatron's methods
    def router(self):
        """The PR2 router of this instance (None once it was garbage-collected)."""
        return self._router_ref()

    def set_router_replay_action(self, router_replay_action: RouterReplayAction) -> None:
        """Megatron's setter; a switch to RECORD starts a new record pass; checks the list."""
        check_registry()
        if router_replay_action == RouterReplayAction.RECORD and (
            self.router_replay_action != RouterReplayAction.RECORD
        ):
            self._new_pass = True
        super().set_router_replay_action(router_replay_action)

    def set_target_indices(self, topk_indices: torch.Tensor) -> None:
        """Megatron's setter (target and backward FIFO), with the route checked first."""
        self._validate_target(topk_indices)
        super().set_target_indices(topk_indices)

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default=None):
        """Called by Megatron's routing: the PR2 router has chosen the experts already."""
        return self._selector.get_replay_topk(scores, topk, num_groups, group_topk, default)

    # ------------------------------------------------------------------------ PR2 side
    def _layer(self) -> str:
        router = self.router()
        number = router.route_layer_number if router is not None else self.layer_number
        return f"MoE layer {number}"

    def _validate_target(self, target_TK: torch.Tensor) -> None:
        router = self.router()
        if router is None:
            raise RouteError(f"{self._layer()}: replay data for a router that no longer exists")
        if not isinstance(target_TK, torch.Tensor) or target_TK.dim() != 2:
            shape = tuple(target_TK.shape) if isinstance(target_TK, torch.Tensor) else target_TK
            raise RouteError(f"{self._layer()}: replay data must be [tokens, k], got {shape}")
        if target_TK.dtype.is_floating_point or target_TK.dtype == torch.bool:
            raise RouteError(f"{self._layer()}: replay data must hold integer expert ids")
        if target_TK.shape[1] != router.topk:
            raise RouteError(
                f"{self._layer()}: replay data has k={target_TK.shape[1]}, the router picks "
                f"k={router.topk}"
            )
        ids = target_TK.long()
        bad = (ids < 0) | (ids >= router.num_experts)
        if bool(bad.any()):
            row = int(torch.nonzero(bad)[0, 0])
            raise RouteError(
                f"{self._layer()}, token row {row}: expert ids {ids[row].tolist()} outside "
                f"[0, {router.num_experts})"
            )
        sorted_ids = ids.sort(dim=-1).values
        dup = (sorted_ids[:, 1:] == sorted_ids[:, :-1]).any(dim=-1)
        if bool(dup.any()):
            row = int(torch.nonzero(dup)[0, 0])
            raise RouteError(
                f"{self._layer()}, token row {row}: duplicate expert ids {ids[row].tolist()} "
                "(k distinct experts are required; duplicates break the dispatcher's splits)"
            )

    def check_registered(self) -> None:
        """Raise if this instance left Megatron's list (the list was cleared after the build)."""
        instances = RouterReplay.global_router_replay_instances
        if not any(entry is self for entry in instances):
            raise RouteError(
                f"{self._layer()}: this PR2 router's RouterReplay instance is not in Megatron's "
                "RouterReplay.global_router_replay_instances (the list was cleared after this "
                "model was built); the stack's set_replay_data / get_recorded_data would not "
                "reach this layer. Clear the list *before* building the model"
            )
        check_registry()

    def replay_target(self, num_tokens: int) -> torch.Tensor:
        """The route of a REPLAY_FORWARD forward (or a REPLAY_BACKWARD one outside backward)."""
        if self.router_replay_action == RouterReplayAction.REPLAY_BACKWARD:
            if not self.replay_backward_list:
                raise RouteError(
                    f"{self._layer()}: REPLAY_BACKWARD forward with an empty replay_backward_list"
                )
            target_TK = self.replay_backward_list.pop(0)
        else:
            target_TK = self.target_topk_idx
            if target_TK is None:
                raise RouteError(
                    f"{self._layer()}: REPLAY_FORWARD without replay data (set_replay_data / "
                    "set_target_indices was not called for this forward)"
                )
        if tuple(target_TK.shape) != (num_tokens, target_TK.shape[1]):
            raise RouteError(
                f"{self._layer()}: replay data has {target_TK.shape[0]} token rows, this forward "
                f"routes {num_tokens} tokens (another micro-batch, or the SP / CP slice of "
                "another rank)"
            )
        return target_TK

    def backward_fifo_pop(self) -> None:
        """Recompute under REPLAY_BACKWARD: keep Megatron's FIFO as the stack expects it."""
        if (
            self.router_replay_action == RouterReplayAction.REPLAY_BACKWARD
            and self.replay_backward_list
        ):
            self.replay_backward_list.pop(0)

    def record(
        self, weight: torch.Tensor, route_TK: torch.Tensor, feature_cache, hidden_TH, logits_TE
    ) -> None:
        """A RECORD forward: Megatron's record, the record pass, the features for the predictor."""
        self.record_indices(route_TK)
        snapshot = self.weight_snapshot
        if self._new_pass or snapshot is None or not _same(weight, snapshot):
            self.weight_snapshot = weight.detach().clone()
            self._record_fingerprints = []
            self._moved_key = None
            self._new_pass = False
            feature_cache.clear()
        forward = len(self._record_fingerprints)
        self._record_fingerprints.append(route_fingerprint(route_TK.detach()))
        num_tokens = route_TK.shape[0]
        keys_T = forward * KEY_STRIDE + torch.arange(num_tokens)
        groups_T = torch.full((num_tokens,), forward, dtype=torch.long)
        feature_cache.add(keys_T, groups_T, hidden_TH, logits_TE)

    def router_moved(self, weight: torch.Tensor) -> bool:
        """Whether the router weight differs bitwise from ``W_old`` (False without a record)."""
        if self.weight_snapshot is None:
            return False
        key = (weight.data_ptr(), weight._version)
        if key != self._moved_key:
            self._moved = not _same(weight, self.weight_snapshot)
            self._moved_key = key
        return self._moved

    def matching_forward(self, target_TK: torch.Tensor) -> Optional[int]:
        """The one RECORD forward whose recorded route equals ``target_TK``, or None."""
        if not self._record_fingerprints:
            return None
        recorded_F3 = torch.stack(self._record_fingerprints)
        probe_3 = route_fingerprint(target_TK).to(recorded_F3.device)
        matches = torch.nonzero((recorded_F3 == probe_3).all(dim=1)).flatten().tolist()
        return matches[0] if len(matches) == 1 else None

    def snapshot_loss(self, kind, predictor, hidden_TH, logits_TE) -> torch.Tensor:
        """The ``snapshot`` pairing: the forward's own h against ``z_old = W_old h``."""
        from pr2_megatron.routing.predictor import predictor_loss

        hidden_TH = hidden_TH.detach()
        old_TE = F.linear(hidden_TH.float(), self.weight_snapshot.float())
        return predictor_loss(kind, logits_TE, old_TE, predictor(hidden_TH))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.detach(), b)


def check_registry() -> None:
    """Raise ``RouteError`` unless Megatron's list is exactly one model's PR2 routers, in order.

    Every entry must be a :class:`PR2RouterReplay` of a live PR2 router; their layer numbers
    must be unique and ascending (the order of ``set_replay_data``'s list). Cheap when the list
    is unchanged since the last check.
    """
    instances = RouterReplay.global_router_replay_instances
    signature = tuple(id(entry) for entry in instances)
    if signature == _checked["signature"]:
        return
    foreign = [i for i, e in enumerate(instances) if not isinstance(e, PR2RouterReplay)]
    dead = [
        (i, e.layer_number)
        for i, e in enumerate(instances)
        if isinstance(e, PR2RouterReplay) and e.router() is None
    ]
    if foreign or dead:
        parts = []
        if foreign:
            parts.append(
                f"positions {foreign} hold stock RouterReplay instances (a model with "
                "Megatron's own router built in this process with moe_enable_routing_replay: "
                "a reference model, an earlier build)"
            )
        if dead:
            parts.append(
                "positions "
                + ", ".join(f"{i} (layer {n})" for i, n in dead)
                + " belong to PR2 routers that no longer exist (a destroyed model)"
            )
        raise RouteError(
            "Megatron's RouterReplay.global_router_replay_instances is not one PR2 model's "
            "routers: "
            + "; ".join(parts)
            + ". set_replay_data / get_recorded_data index that list by position, so every "
            "layer would be shifted. Call RouterReplay.clear_global_router_replay_instances() "
            "before building the PR2 model, and build other models without "
            "moe_enable_routing_replay"
        )
    numbers = [e.router().route_layer_number for e in instances]
    repeated = sorted({n for n in numbers if numbers.count(n) > 1})
    if repeated:
        raise RouteError(
            f"Megatron's RouterReplay list holds two PR2 routers for MoE layers {repeated} "
            f"(layer order {numbers}): two models registered (a model built twice, or a "
            "reference model beside the policy with moe_enable_routing_replay). Clear the list "
            "before building the policy and build the reference model without "
            "moe_enable_routing_replay"
        )
    if numbers != sorted(numbers):
        raise RouteError(
            f"Megatron's RouterReplay list is not in ascending layer order: {numbers}; "
            "set_replay_data's i-th tensor would reach another layer"
        )
    _checked["signature"] = signature


_checked: dict = {"signature": None}


def protocol_instances(model) -> list[PR2RouterReplay]:
    """The :class:`PR2RouterReplay` instances of a model's (chunks') PR2 routers, by layer."""
    from pr2_megatron.routing.router import PR2Router

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    routers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, PR2Router)]
    replays = [r.router_replay for r in routers if isinstance(r.router_replay, PR2RouterReplay)]
    return sorted(replays, key=lambda e: e.router().route_layer_number)


def megatron_replay_metrics(model) -> dict[str, float]:
    """Protocol-mode counters and predictor losses of a model's PR2 routers since the last call.

    ``predictor/pairing/exact`` and ``predictor/pairing/snapshot``: replay forwards (summed over
    layers) whose predictor loss used exactly paired RECORD features or the ``snapshot``
    approximation; ``predictor/pairing/not_moved``: replay forwards that did not train because
    the router weight still equalled ``W_old``; ``predictor/loss``: mean predictor loss. The
    counters and losses are reset.
    """
    out = {"predictor/pairing/exact": 0.0, "predictor/pairing/snapshot": 0.0}
    out["predictor/pairing/not_moved"] = 0.0
    losses = []
    for replay in protocol_instances(model):
        for name, count in replay.pairing_counts.items():
            out[f"predictor/pairing/{name}"] += count
            replay.pairing_counts[name] = 0
        router = replay.router()
        losses.extend(router.predictor_losses)
        router.predictor_losses = []
        router.predictor_loss_tokens = []
    if losses:
        out["predictor/loss"] = sum(losses) / len(losses)
    return out
