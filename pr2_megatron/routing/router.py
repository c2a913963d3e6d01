"""The PR2 router: Megatron's ``TopKRouter`` with an evolution predictor and route replay.

Legend of shape suffixes: S sequence, B batch, T = S·B tokens of one forward (flattened in
Megatron's ``[S, B]`` order, s-major), E experts, K top-k, H hidden.

One router per MoE layer, plugged in through ``MoESubmodules(router=...)`` (see
``pr2_megatron.routing.specs``). Megatron still does all the routing math -- score function, expert
bias, group-limited routing, scaling, aux losses -- through ``topk_routing_with_score_function``;
this router only decides *which* experts it selects, through that function's ``router_replay``
hook (:class:`_ExpertSelector`). :class:`pr2_megatron.routing.controller.RoutingController`
sets the phase:

* ``off``: live top-k;
* ``record``: live top-k, recorded (the r2/r3 capture);
* ``predict``: PR2 rollout: experts ``TopK(score_fn(z + Δ))``, gates from the live scores at
  those experts, recorded together with the live top-k; router features cached;
* ``replay``: experts from a target set beforehand, gates from the live scores at them.

With ``PR2RouterConfig(megatron_router_replay=True)`` the router also takes part in Megatron's
``RouterReplay`` protocol (RECORD = predict and record, REPLAY_FORWARD / REPLAY_BACKWARD =
replay), for stacks that drive it (verl, NeMo-RL, Megatron's inference engine):
:mod:`pr2_megatron.routing.megatron_replay`.

Whatever the phase, the forward recomputed in backward (Megatron's ``moe`` selective recompute
or full recompute) reuses the experts of the forward it recomputes, paired by forward number in
any backward order (:mod:`pr2_megatron.routing.recompute`).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Optional

import torch
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    topk_routing_with_score_function,
)
from megatron.core.transformer.moe.router import TopKRouter

from pr2_megatron.errors import RouteError
from pr2_megatron.routes.table import route_dtype
from pr2_megatron.routing.compat import require_router_seam
from pr2_megatron.routing.feature_cache import FeatureCache
from pr2_megatron.routing.megatron_replay import (
    KEY_STRIDE as RECORD_KEY_STRIDE,
)
from pr2_megatron.routing.megatron_replay import (
    PR2RouterReplay,
    RouterReplayAction,
)
from pr2_megatron.routing.predictor import (
    PREDICTOR_LOSSES,
    EvolutionPredictor,
    PredictorLoss,
    predictor_loss,
)
from pr2_megatron.routing.recompute import RecomputeRoutes, in_backward


class RoutingPhase(str, Enum):
    """What the routers do in the next forwards."""

    OFF = "off"
    RECORD = "record"
    PREDICT = "predict"
    REPLAY = "replay"


@dataclass
class PR2RouterConfig:
    """Settings of the PR2 router (docs/design.md, "The algorithm")."""

    #: Predictor learning rate = model lr × this (the paper sweeps 5e1…1e4).
    lr_multiplier: float = 1e3
    #: Predictor loss: ``kl-post`` (paper default), ``l2`` or ``kl``.
    loss: PredictorLoss = "kl-post"
    #: T_c: at most this many tokens per response are cached per layer for the predictor.
    feature_cache_tokens: int = 2048
    #: Seed of the cache's uniform token sampling (offset by the layer number).
    cache_seed: int = 1234
    #: At most this many tokens cached per MoE layer on a rank over all responses (None: no
    #: cap): the smallest sampling priorities of all responses' candidates, a uniform sample.
    #: Host memory per rank <= this × MoE layers × (2H + 4E) bytes (about 1.5x while filling).
    feature_cache_max_total_tokens: Optional[int] = None
    #: Take part in Megatron's ``RouterReplay`` protocol (needs Megatron's
    #: ``moe_enable_routing_replay=True``): stacks that drive it (verl R2/R3, NeMo-RL, Megatron's
    #: inference engine) get PR2 without changing their code -- RECORD records the predicted
    #: route, replay forwards replay and train the predictor once the router moved
    #: (:mod:`pr2_megatron.routing.megatron_replay`). Off: the router never registers there.
    megatron_router_replay: bool = False

    def __post_init__(self) -> None:
        if self.loss not in PREDICTOR_LOSSES:
            raise ValueError(f"pr2.loss must be one of {PREDICTOR_LOSSES}, got {self.loss!r}")
        if not self.lr_multiplier > 0:
            raise ValueError(f"pr2.lr_multiplier must be > 0, got {self.lr_multiplier}")
        if self.feature_cache_tokens < 1:
            raise ValueError(
                f"pr2.feature_cache_tokens must be >= 1, got {self.feature_cache_tokens}"
            )
        cap = self.feature_cache_max_total_tokens
        if cap is not None and cap < 1:
            raise ValueError(f"pr2.feature_cache_max_total_tokens must be >= 1 or None, got {cap}")


class _ExpertSelector:
    """Duck-types Megatron's ``RouterReplay.get_replay_topk``: the hook that picks experts.

    With a ``target`` it returns those experts and the scores gathered at them from the dense
    score tensor (so gradients reach every replayed expert, also those the live top-k would not
    pick); without, it runs Megatron's own top-k and remembers the indices it chose.
    """

    def __init__(self) -> None:
        self.target_TK: torch.Tensor | None = None
        self.chosen_TK: torch.Tensor | None = None

    def get_replay_topk(self, scores_TE, topk, num_groups=None, group_topk=None, default=None):
        if self.target_TK is not None:
            self.chosen_TK = self.target_TK.to(scores_TE.device, torch.long)
            return scores_TE.gather(1, self.chosen_TK), self.chosen_TK
        probs_TK, self.chosen_TK = default(scores_TE, topk, num_groups, group_topk)
        return probs_TK, self.chosen_TK


class PR2Router(TopKRouter):
    """``TopKRouter`` with PR2's evolution predictor and recompute-safe route record/replay."""

    def __init__(
        self,
        config,
        pg_collection=None,
        pr2_config: Optional[PR2RouterConfig] = None,
        is_mtp_layer: bool = False,
    ) -> None:
        features = require_router_seam()
        pr2_config = pr2_config or PR2RouterConfig()
        protocol = pr2_config.megatron_router_replay
        _check_config_supports_replay(config, megatron_router_replay=protocol)
        if protocol and type(self)._route is not PR2Router._route:
            raise ValueError(
                f"{type(self).__name__} chooses experts itself; megatron_router_replay is "
                "supported for the PR2 router only"
            )
        # Newer cores (0.19.2) build routers with is_mtp_layer=...; 0.16.1 has no such argument.
        extra = {"is_mtp_layer": is_mtp_layer} if features.router_init_has_is_mtp_layer else {}
        super().__init__(config=config, pg_collection=pg_collection, **extra)
        #: Built inside a multi-token-prediction layer (newer cores say so; on 0.16.1 the layer
        #: number past ``num_layers`` does, see :attr:`is_mtp`).
        self._built_as_mtp = bool(is_mtp_layer)
        self.pr2_config = pr2_config
        self.predictor = EvolutionPredictor(
            config.hidden_size, config.num_moe_experts, config.sequence_parallel
        )
        self._selector = _ExpertSelector()
        if protocol:
            # Protocol mode: our RouterReplay takes the place of the stock one TopKRouter made.
            stock = self.router_replay
            self.router_replay = PR2RouterReplay(self)
            _unregister(stock)
        else:
            # Megatron's routing calls router_replay.get_replay_topk: ours, not a RouterReplay,
            # so nothing is registered in Megatron's process-global replay registry.
            self.router_replay = self._selector
        self.phase = RoutingPhase.OFF
        self.train_predictor = False
        self.collect_metrics = False
        self._targets: collections.deque[torch.Tensor] = collections.deque()
        self._plain_targets: collections.deque[Optional[torch.Tensor]] = collections.deque()
        self._recompute_routes = RecomputeRoutes(lambda: self.route_layer_number)
        self._token_keys: collections.deque[tuple[torch.Tensor, torch.Tensor]] = collections.deque()
        self.recorded: list[torch.Tensor] = []
        self.recorded_plain: list[torch.Tensor] = []
        self.metric_records: list[dict[str, torch.Tensor]] = []
        #: Called with this router after each forward that recorded (not from recompute); the
        #: controller streams records with it (``RoutingController.replay(on_forward=...)``).
        self.on_forward_recorded: Optional[Callable[[PR2Router], None]] = None
        self.predictor_losses: list[float] = []
        #: Tokens each entry of ``predictor_losses`` is the mean over (token-weighted metrics).
        self.predictor_loss_tokens: list[int] = []
        self._token_counter = 0
        self._group_counter = 0
        self.feature_cache: FeatureCache | None = None

    # ----------------------------------------------------------------- control (used by the API)
    def set_layer_number(self, layer_number: int) -> None:
        """Megatron tells each router its (1-based) layer number."""
        super().set_layer_number(layer_number)
        if isinstance(self.router_replay, PR2RouterReplay):
            self.router_replay.layer_number = self.route_layer_number
        self.feature_cache = FeatureCache(
            self.pr2_config.feature_cache_tokens,
            self.pr2_config.cache_seed + layer_number,
            self.pr2_config.feature_cache_max_total_tokens,
        )

    @property
    def is_mtp(self) -> bool:
        """Whether this router belongs to a multi-token-prediction (MTP) layer.

        Newer cores (0.19.2) build MTP routers with ``is_mtp_layer=True`` and number them 1, 2,
        ... within the MTP block; 0.16.1 passes no flag and numbers them past the decoder
        (``num_layers + 1, ...``).
        """
        number = self.layer_number or 0
        return self._built_as_mtp or number > self.config.num_layers

    @property
    def route_layer_number(self) -> int:
        """The layer's number in route tables and errors: global, MTP layers past the decoder.

        Decoder layers: Megatron's global 1-based layer number. MTP layer j (1-based):
        ``num_layers + j`` on every core (0.19.2 numbers its MTP routers 1, 2, ..., which would
        collide with the decoder's layers 1, 2, ...).
        """
        if self._built_as_mtp and self.layer_number is not None:
            if self.layer_number <= self.config.num_layers:
                return self.config.num_layers + self.layer_number
        return self.layer_number

    def set_phase(
        self, phase: RoutingPhase, *, train_predictor: bool = False, collect_metrics: bool = False
    ) -> None:
        """Start a pass in ``phase``; drops records and recompute routes of the previous pass."""
        self.phase = RoutingPhase(phase)
        if train_predictor and self.phase != RoutingPhase.REPLAY:
            raise ValueError(f"train_predictor needs the replay phase, not {self.phase.value!r}")
        self.train_predictor = train_predictor
        self.collect_metrics = collect_metrics
        self._targets.clear()
        self._plain_targets.clear()
        self._recompute_routes.clear()
        self._token_keys.clear()
        self.recorded = []
        self.recorded_plain = []
        self.metric_records = []
        self.predictor_losses = []
        self.predictor_loss_tokens = []
        self._token_counter = 0
        self._group_counter = 0
        if self.phase == RoutingPhase.PREDICT and self.feature_cache is not None:
            self.feature_cache.clear()

    def push_target(self, target_TK: torch.Tensor, plain_TK: Optional[torch.Tensor] = None) -> None:
        """Queue the experts for the next replay forward (targets are consumed in order)."""
        self._targets.append(target_TK)
        self._plain_targets.append(plain_TK)

    def push_token_keys(self, keys_T: torch.Tensor, groups_T: torch.Tensor) -> None:
        """Name the tokens of the next forward for the feature cache (predict, predictor training).

        ``keys_T`` identify tokens across passes (e.g. ``sample_id * max_len + position``); a key
        of -1 marks a token the cache must skip (a padding position, a position already offered
        by an earlier generation step). ``groups_T`` is each token's response id (the cache
        samples at most T_c tokens per response). Without keys, running positions within the
        pass are used, which pair rollout and training tokens only when both passes run the
        same forwards in the same order.
        """
        if keys_T.shape != groups_T.shape or keys_T.dim() != 1:
            raise RouteError(
                f"token keys {tuple(keys_T.shape)} and groups {tuple(groups_T.shape)} must be "
                "equal-length vectors"
            )
        self._token_keys.append((keys_T.long().cpu(), groups_T.long().cpu()))

    def pending_targets(self) -> int:
        """Targets (and token keys) queued and not yet consumed by a forward."""
        return len(self._targets) + len(self._token_keys)

    # ------------------------------------------------------------------------------- forward
    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Route ``input`` ``[S, B, H]``; returns Megatron's ``(probs, routing_map)`` ``[T, E]``."""
        self._maintain_float32_expert_bias()
        input = self.apply_input_jitter(input)
        logits_SBE = self.gating(input)
        hidden_TH = input.reshape(-1, input.shape[-1])
        logits_TE = logits_SBE.reshape(-1, self.num_experts)
        num_tokens = logits_TE.shape[0]

        # Which experts: replayed (target), predicted (z + Δ), or live top-k (None).
        recomputing = self._is_recompute_in_backward()
        action = self._megatron_action()
        plain_TK = delta_TE = None
        if recomputing:
            target_TK, attach = self._recompute_routes.take_with_payload(num_tokens)
            if action is not None:
                self.router_replay.backward_fifo_pop()
        elif action == RouterReplayAction.RECORD:
            target_TK, delta_TE = self._predicted_route(hidden_TH, logits_TE)
        elif action is not None:
            target_TK = self.router_replay.replay_target(num_tokens)
        elif self.phase == RoutingPhase.REPLAY:
            target_TK, plain_TK = self._pop_target(num_tokens=num_tokens)
        elif self.phase == RoutingPhase.PREDICT:
            target_TK, delta_TE = self._predicted_route(hidden_TH, logits_TE)
        else:
            target_TK = None

        # Gates always come from the live scores at the chosen experts.
        probs_TE, routing_map_TE, chosen_TK = self._route(logits_SBE, target_TK, padding_mask)

        if recomputing:
            # The predictor loss of a checkpointed forward is attached here, in the recompute
            # (the checkpointed forward ran without a graph).
            if attach is not None:
                probs_TE = attach(probs_TE, hidden_TH, logits_TE)
            return probs_TE, routing_map_TE
        if action is not None:
            attach = self._megatron_bookkeeping(action, chosen_TK, hidden_TH, logits_TE)
        else:
            attach = self._phase_bookkeeping(chosen_TK, plain_TK, delta_TE, logits_SBE, hidden_TH)
        if self._will_be_recomputed():
            self._recompute_routes.file(chosen_TK, attach)
        elif attach is not None:
            probs_TE = attach(probs_TE, hidden_TH, logits_TE)
        if action is None and self.on_forward_recorded is not None:
            self.on_forward_recorded(self)
        return probs_TE, routing_map_TE

    def _phase_bookkeeping(self, chosen_TK, plain_TK, delta_TE, logits_SBE, hidden_TH):
        """Records, feature cache and metrics of the PR2 phases; the predictor loss to attach."""
        logits_TE = logits_SBE.reshape(-1, self.num_experts)
        # Token keys pair cached rollout tokens with training tokens.
        needs_keys = self.phase == RoutingPhase.PREDICT or self.train_predictor
        keys_T = groups_T = None
        if needs_keys:
            keys_T, groups_T = self._token_keys_of_forward(logits_TE.shape[0])
        if self.phase in (RoutingPhase.RECORD, RoutingPhase.PREDICT):
            self.recorded.append(chosen_TK.detach())
        if self.phase == RoutingPhase.PREDICT:
            live_TK = self._topk_indices(logits_TE.detach())
            self.recorded_plain.append(live_TK)
            if groups_T is None:
                groups_T = self._next_groups(logits_SBE.shape[:2])
            self.feature_cache.add(keys_T, groups_T, hidden_TH, logits_TE)
            if self.collect_metrics:
                self.metric_records.append(
                    {
                        "delta_abs": delta_TE.abs().mean(),
                        "logit_abs": logits_TE.abs().mean(),
                        "tokens": logits_TE.shape[0],
                    }
                )
        if self.phase == RoutingPhase.REPLAY:
            if self.collect_metrics:
                live_TK = self._topk_indices(logits_TE.detach())
                self.metric_records.append(self._route_record(chosen_TK, live_TK, plain_TK))
            if self.train_predictor:
                return functools.partial(self._attach_cached_loss, keys_T=keys_T)
        return None

    def _megatron_bookkeeping(self, action, chosen_TK, hidden_TH, logits_TE):
        """Protocol mode: RECORD records and caches; a replay forward may train the predictor.

        Returns the predictor loss to attach, or None (docs: :mod:`.megatron_replay`).
        """
        replay = self.router_replay
        if action == RouterReplayAction.RECORD:
            replay.record(self.weight, chosen_TK.detach(), self.feature_cache, hidden_TH, logits_TE)
            return None
        grad = torch.is_grad_enabled() or self._will_be_recomputed()
        if not (self.training and grad):
            return None
        if not replay.router_moved(self.weight):
            replay.pairing_counts["not_moved"] += 1
            return None
        forward = replay.matching_forward(chosen_TK)
        if forward is not None:
            keys_T = forward * RECORD_KEY_STRIDE + torch.arange(chosen_TK.shape[0])
            return functools.partial(self._attach_cached_loss, keys_T=keys_T, pairing="exact")
        return self._attach_snapshot_loss

    def _megatron_action(self) -> Optional[RouterReplayAction]:
        """The protocol action this forward follows (None: the PR2 phase rules)."""
        replay = self.router_replay
        if not isinstance(replay, PR2RouterReplay) or replay.router_replay_action is None:
            return None
        replay.check_registered()
        if self.phase != RoutingPhase.OFF:
            raise RouteError(
                f"MoE layer {self.route_layer_number}: Megatron's RouterReplay action "
                f"{replay.router_replay_action.name} and the PR2 phase {self.phase.value!r} are "
                "both set; drive the router through one of them (controller.off() or "
                "RouterReplay.clear_global_router_replay_action())"
            )
        return replay.router_replay_action

    # ------------------------------------------------------------------------------ helpers
    def _route(self, logits_SBE, target_TK, padding_mask=None):
        """Experts and gates of one forward: ``(probs_TE, routing_map_TE, chosen_TK)``.

        ``target_TK`` is the route to dispatch (replayed, predicted or recomputed), None for the
        live choice. Here Megatron's own routing does the math (score function, scaling, aux
        losses), picking ``target_TK`` through the ``router_replay`` hook; subclasses override
        this to choose experts another way (e.g. ProbMoE's subset sampling).
        """
        self._selector.target_TK = target_TK
        probs_TE, routing_map_TE = self.routing(logits_SBE, padding_mask=padding_mask)
        chosen_TK = self._selector.chosen_TK
        self._selector.target_TK = self._selector.chosen_TK = None
        return probs_TE, routing_map_TE, chosen_TK

    def _predicted_route(self, hidden_TH, logits_TE):
        """``(TopK(score_fn(z + Δ)), Δ)`` without grad: the PR2 prediction."""
        with torch.no_grad():
            delta_TE = self.predictor(hidden_TH)
            return self._topk_indices(logits_TE + delta_TE), delta_TE

    def _route_record(self, replayed_TK, live_TK, plain_TK) -> dict[str, Optional[torch.Tensor]]:
        """A replay forward's routes for metrics, in the route table's smallest dtype.

        uint8 up to 256 route ids (``route_id_bound``: E, or E + K for ProbMoE dynamic-k), all
        on the routes' device; ids are unchanged, so agreement numbers are too.
        """
        dtype = route_dtype(getattr(self, "route_id_bound", self.num_experts))
        device = replayed_TK.device
        plain = None if plain_TK is None else plain_TK.to(device, dtype, non_blocking=True)
        return {
            "replayed": replayed_TK.detach().to(dtype),
            "live": live_TK.to(dtype),
            "plain": plain,
        }

    def _topk_indices(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """Experts Megatron's routing would pick for these logits (score fn, bias, groups)."""
        selector = _ExpertSelector()
        with torch.no_grad():
            topk_routing_with_score_function(
                logits_TE,
                self.topk,
                use_pre_softmax=self.config.moe_router_pre_softmax,
                num_groups=self.config.moe_router_num_groups,
                group_topk=self.config.moe_router_group_topk,
                scaling_factor=self.config.moe_router_topk_scaling_factor,
                score_function=self.score_function,
                expert_bias=self.expert_bias,
                router_replay=selector,
            )
        return selector.chosen_TK

    def _pop_target(self, num_tokens: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not self._targets:
            raise RouteError(
                f"MoE layer {self.route_layer_number}: replay forward without a target "
                "(RoutingController.set_targets was not called for this forward)"
            )
        target_TK = self._targets.popleft()
        plain_TK = self._plain_targets.popleft()
        if tuple(target_TK.shape) != (num_tokens, self.topk):
            raise RouteError(
                f"MoE layer {self.route_layer_number}: replay target has shape "
                f"{tuple(target_TK.shape)}, this forward routes ({num_tokens}, {self.topk}) "
                "tokens x top-k"
            )
        return target_TK, plain_TK

    def _is_recompute_in_backward(self) -> bool:
        return in_backward()

    def _will_be_recomputed(self) -> bool:
        return mcore_random.is_checkpointing() and not in_backward() and self.training

    def end_pass(self) -> None:
        """After a pass's backward: drop routes filed for recomputes that never came.

        Those are the forwards that ran without a graph in training mode (e.g. reference
        log-probs under ``torch.no_grad()``): their routes are never taken by another
        forward's recompute, and are released here.
        """
        self._recompute_routes.clear()

    def _token_keys_of_forward(self, num_tokens: int):
        """``(keys_T, groups_T)``: the keys queued by ``push_token_keys``, else running positions.

        ``groups_T`` is None for running positions (the caller derives responses from [S, B]).
        """
        if not self._token_keys:
            return self._next_token_keys(num_tokens), None
        keys_T, groups_T = self._token_keys.popleft()
        if keys_T.numel() != num_tokens:
            raise RouteError(
                f"MoE layer {self.route_layer_number}: {keys_T.numel()} token keys for a forward "
                f"of {num_tokens} tokens"
            )
        return keys_T, groups_T

    def _next_token_keys(self, num_tokens: int) -> torch.Tensor:
        """Token keys of this forward: running positions within the pass."""
        keys_T = torch.arange(self._token_counter, self._token_counter + num_tokens)
        self._token_counter += num_tokens
        return keys_T

    def _next_groups(self, seq_batch: torch.Size) -> torch.Tensor:
        """Response id of each token: column ``b`` of ``[S, B]`` is one response."""
        seq_len, batch = int(seq_batch[0]), int(seq_batch[1])
        groups_SB = (torch.arange(batch) + self._group_counter).expand(seq_len, batch)
        self._group_counter += batch
        return groups_SB.reshape(-1)

    def _attach_cached_loss(self, probs_TE, hidden_TH, logits_TE, *, keys_T, pairing=None):
        """The predictor loss on the cached tokens named ``keys_T``, attached to ``probs_TE``."""
        if pairing is not None:
            self.router_replay.pairing_counts[pairing] += 1
        return self._attach_predictor_loss(probs_TE, keys_T, logits_TE)

    def _attach_snapshot_loss(self, probs_TE, hidden_TH, logits_TE):
        """Protocol mode, no exact pairing: the forward's own h against ``z_old = W_old h``."""
        replay = self.router_replay
        replay.pairing_counts["snapshot"] += 1
        loss = replay.snapshot_loss(self.pr2_config.loss, self.predictor, hidden_TH, logits_TE)
        return self._finish_predictor_loss(probs_TE, loss, logits_TE.shape[0])

    def _attach_predictor_loss(self, probs_TE, keys_T, logits_TE) -> torch.Tensor:
        """Add the predictor loss to this forward's backward (Megatron's aux-loss pattern)."""
        token_idx, cache_idx = self.feature_cache.lookup(keys_T)
        if token_idx.numel() == 0:
            # No cached token here: a zero loss keeps W_p in the graph so that data-parallel
            # gradient reductions see the same parameters on every rank.
            loss = self.predictor.weight.sum() * 0.0
        else:
            cached = self.feature_cache.features()
            device = logits_TE.device
            hidden_CH = cached.hidden_CH[cache_idx].to(device)
            delta_CE = self.predictor(hidden_CH)
            loss = predictor_loss(
                self.pr2_config.loss,
                logits_TE[token_idx.to(device)],
                cached.logits_CE[cache_idx].to(device),
                delta_CE,
            )
        return self._finish_predictor_loss(probs_TE, loss, token_idx.numel())

    def _finish_predictor_loss(self, probs_TE, loss, tokens: int) -> torch.Tensor:
        """Log ``loss`` (a mean over ``tokens``), attach it to ``probs_TE``'s backward."""
        self.predictor_losses.append(float(loss.detach()))
        self.predictor_loss_tokens.append(int(tokens))
        if self.config.sequence_parallel:
            # Each TP rank holds 1/TP of the tokens and Megatron sums sequence-parallel
            # gradients over TP: scale so the sum is the mean over the whole sequence.
            loss = loss / self.tp_group.size()
        return MoEAuxLossAutoScaler.apply(probs_TE, loss)


def _unregister(stock) -> None:
    """Drop the stock ``RouterReplay`` ``TopKRouter.__init__`` registered (protocol mode)."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    instances = RouterReplay.global_router_replay_instances
    for index, entry in enumerate(instances):
        if entry is stock:
            del instances[index]
            return


def _check_config_supports_replay(config, megatron_router_replay: bool = False) -> None:
    """Reject Megatron settings under which replayed routes would be silently changed."""
    if config.moe_enable_routing_replay and not megatron_router_replay:
        raise ValueError(
            "PR2Router records and replays routes itself; set moe_enable_routing_replay=False, "
            "or PR2RouterConfig(megatron_router_replay=True) for a stack that drives Megatron's "
            "RouterReplay protocol (verl, NeMo-RL, Megatron's inference engine)"
        )
    if megatron_router_replay and not config.moe_enable_routing_replay:
        raise ValueError(
            "PR2RouterConfig(megatron_router_replay=True) needs Megatron's "
            "moe_enable_routing_replay=True (the switch the stacks and Megatron's inference "
            "engine look at)"
        )
    if config.moe_router_load_balancing_type == "sinkhorn":
        raise ValueError("moe_router_load_balancing_type='sinkhorn' bypasses route replay")
    if config.moe_router_load_balancing_type == "quantile_balancing":
        # Newer cores (0.19.2): picks experts itself (precomputed_indices), ignoring replay.
        raise ValueError(
            "moe_router_load_balancing_type='quantile_balancing' bypasses route replay"
        )
    if config.moe_router_fusion:
        raise ValueError("moe_router_fusion=True (TE fused router) bypasses route replay")
    if config.moe_expert_capacity_factor is not None:
        raise ValueError(
            f"moe_expert_capacity_factor={config.moe_expert_capacity_factor}: capacity dropping "
            "runs after replay and would drop replayed experts; use dropless MoE with PR2"
        )
    if config.moe_router_force_load_balancing:
        raise ValueError("moe_router_force_load_balancing replaces logits with random ones")
    # Config field of newer cores (0.19.2) only; PR2Router.forward does not apply it.
    if getattr(config, "moe_router_force_biased", None) is not None:
        raise ValueError("moe_router_force_biased (benchmark logit bias) is not supported by PR2")


def pr2_router_builder(pr2_config: Optional[PR2RouterConfig] = None):
    """A ``MoESubmodules.router`` builder that makes :class:`PR2Router` with ``pr2_config``."""
    return functools.partial(PR2Router, pr2_config=pr2_config or PR2RouterConfig())
