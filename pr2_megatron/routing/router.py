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

The router's pieces: :mod:`.router_config` (phases, :class:`PR2RouterConfig`, the Megatron
settings replay cannot run with), :mod:`.router_predictor` (the predict-phase shift through the
stabilisers and the predictor loss), :mod:`.router_protocol` (Megatron's ``RouterReplay``
protocol); this module keeps the forward, the phase bookkeeping and the route queues.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import Optional

import torch
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.transformer.moe.moe_utils import (
    topk_routing_with_score_function,
)
from megatron.core.transformer.moe.router import TopKRouter

from pr2_megatron.errors import RouteError
from pr2_megatron.routes.table import route_dtype
from pr2_megatron.routing.compat import require_router_seam
from pr2_megatron.routing.feature_cache import FeatureCache
from pr2_megatron.routing.megatron_replay import (
    PR2RouterReplay,
    RouterReplayAction,
)
from pr2_megatron.routing.predictor import (
    EvolutionPredictor,
)
from pr2_megatron.routing.recompute import RecomputeRoutes, in_backward
from pr2_megatron.routing.router_config import (
    PR2RouterConfig,
    RoutingPhase,
    check_config_supports_replay,
)
from pr2_megatron.routing.router_predictor import PredictorSide
from pr2_megatron.routing.router_protocol import MegatronProtocol, unregister_stock_replay


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


class PR2Router(PredictorSide, MegatronProtocol, TopKRouter):
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
        check_config_supports_replay(config, megatron_router_replay=protocol)
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
            unregister_stock_replay(stock)
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
        #: Per training forward with predictor loss: ``[hits, plain hits, tokens]`` of the
        #: predictive top-k accuracy on its cached tokens (``predictor/topk_accuracy``).
        self.predictor_accuracy: list[torch.Tensor] = []
        #: Tokens each entry of ``predictor_losses`` is the mean over (token-weighted metrics).
        self.predictor_loss_tokens: list[int] = []
        self._token_counter = 0
        self._group_counter = 0
        self.feature_cache: FeatureCache | None = None
        #: The rollout id the margin cap's η anneals over (None: the count of predict passes).
        self.rollout_id: Optional[int] = None
        self._predict_passes = 0
        #: Called as ``probe(router, keys_T, hidden_TH, logits_TE)`` by every forward whose
        #: tokens were named (``RoutingController.attach_probe``; not from recompute, not in
        #: protocol mode): a recorder of router inputs and logits per named token.
        self.feature_probe: Optional[Callable] = None

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
        self.predictor_accuracy = []
        self.predictor_loss_tokens = []
        self._token_counter = 0
        self._group_counter = 0
        if self.phase == RoutingPhase.PREDICT:
            self._predict_passes += 1
            if self.feature_cache is not None:
                self.feature_cache.clear()

    @property
    def current_rollout_id(self) -> int:
        """The rollout id of the stabilisers' schedule: set by the controller, else counted."""
        return self._predict_passes if self.rollout_id is None else self.rollout_id

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
        plain_TK = delta_TE = fallback_T = None
        if recomputing:
            target_TK, attach = self._recompute_routes.take_with_payload(num_tokens)
            if action is not None:
                self.router_replay.backward_fifo_pop()
        elif action == RouterReplayAction.RECORD:
            target_TK, delta_TE, _ = self._predicted_route(hidden_TH, logits_TE)
        elif action is not None:
            target_TK = self.router_replay.replay_target(num_tokens)
        elif self.phase == RoutingPhase.REPLAY:
            target_TK, plain_TK = self._pop_target(num_tokens=num_tokens)
        elif self.phase == RoutingPhase.PREDICT:
            target_TK, delta_TE, fallback_T = self._predicted_route(hidden_TH, logits_TE)
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
            attach = self._phase_bookkeeping(
                chosen_TK, plain_TK, (delta_TE, fallback_T), logits_SBE, hidden_TH
            )
        if self._will_be_recomputed():
            self._recompute_routes.file(chosen_TK, attach)
        elif attach is not None:
            probs_TE = attach(probs_TE, hidden_TH, logits_TE)
        if action is None and self.on_forward_recorded is not None:
            self.on_forward_recorded(self)
        return probs_TE, routing_map_TE

    def _phase_bookkeeping(self, chosen_TK, plain_TK, prediction, logits_SBE, hidden_TH):
        """Records, feature cache and metrics of the PR2 phases; the predictor loss to attach.

        ``prediction`` is ``(Δ_TE, fallback_T)`` of the predict phase (else Nones).
        """
        logits_TE = logits_SBE.reshape(-1, self.num_experts)
        # Token keys pair cached rollout tokens with training tokens (and name them for a probe).
        probe = self.feature_probe
        needs_keys = self.phase == RoutingPhase.PREDICT or self.train_predictor or probe is not None
        keys_T = groups_T = None
        if needs_keys:
            keys_T, groups_T = self._token_keys_of_forward(logits_TE.shape[0])
        if probe is not None and groups_T is not None:  # only tokens the caller named
            probe(self, keys_T, hidden_TH.detach(), logits_TE.detach())
        if self.phase in (RoutingPhase.RECORD, RoutingPhase.PREDICT):
            self.recorded.append(chosen_TK.detach())
        if self.phase == RoutingPhase.PREDICT:
            live_TK = self._topk_indices(logits_TE.detach())
            self.recorded_plain.append(live_TK)
            if self.collect_metrics:
                self.metric_records.append(
                    self._predict_record(chosen_TK, live_TK, prediction, logits_TE, keys_T)
                )
            if groups_T is None:
                groups_T = self._next_groups(logits_SBE.shape[:2])
            self.feature_cache.add(keys_T, groups_T, hidden_TH, logits_TE)
        if self.phase == RoutingPhase.REPLAY:
            if self.collect_metrics:
                live_TK = self._topk_indices(logits_TE.detach())
                self.metric_records.append(self._route_record(chosen_TK, live_TK, plain_TK))
            if self.train_predictor:
                return functools.partial(self._attach_cached_loss, keys_T=keys_T)
        return None

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


def pr2_router_builder(pr2_config: Optional[PR2RouterConfig] = None):
    """A ``MoESubmodules.router`` builder that makes :class:`PR2Router` with ``pr2_config``."""
    return functools.partial(PR2Router, pr2_config=pr2_config or PR2RouterConfig())
