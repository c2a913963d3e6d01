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
from typing import Literal, Optional

import torch
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    topk_routing_with_score_function,
)
from megatron.core.transformer.moe.router import TopKRouter

from pr2_megatron.errors import RouteError
from pr2_megatron.metrics.agreement import topk_overlap
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
from pr2_megatron.routing.stabilisers import (
    DEPTH_SCHEDULES,
    SHIFT_WEIGHTINGS,
    DeltaSettings,
    changed_routes,
    depth_fraction,
    loss_weights,
    margin_cap_eta,
    stabilise_delta,
)


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
    # ---- the PR2 authors' stabilisers (docs/pr2_effect.md); all off by default, as in their
    # "paper" ablation; values in comments are their last ablation's (all on) ----
    #: Depth scale γ_l on Δ: ``γ_l = 1 − decay(d)·(1 − γ_min)``, d = (l − 1)/(L − 1) of the
    #: 1-based layer l of L transformer layers; decay ``none`` (off: γ = 1), ``linear`` (d),
    #: ``sqrt`` (√d; theirs) or ``cosine`` (½(1 − cos πd)).
    delta_depth_schedule: Literal["none", "linear", "sqrt", "cosine"] = "none"
    #: γ_min of the depth scale (theirs: 0.5); used only with a depth schedule.
    delta_depth_gamma_min: float = 0.5
    #: Magnitude cap r_max (None: off; theirs 0.015): if mean|Δ| > r_max·mean|z_old| over a
    #: forward's tokens, Δ is scaled down to exactly that ratio.
    delta_magnitude_cap: Optional[float] = None
    #: Margin cap η (None: off; theirs 1.0): each token's Δ is scaled so that
    #: max|Δ| <= η·m/2, m = k-th minus (k+1)-th old logit. With η <= 1 no route can change.
    delta_margin_cap: Optional[float] = None
    #: η annealed linearly to this value (theirs 1.5) between the two rollout ids of
    #: ``delta_margin_cap_anneal`` ([first, last]; theirs [80, 160]); None: constant η.
    delta_margin_cap_final: Optional[float] = None
    delta_margin_cap_anneal: Optional[list[int]] = None
    #: Flip fallback (None: off; theirs 0.05): a token whose predicted top-k set differs from
    #: the old one and whose post-Δ boundary logit margin is below this keeps its old logits.
    flip_fallback_margin: Optional[float] = None
    #: Hidden-shift weighting of a cached token's loss by the headroom of
    #: r = |h_cur − h_old|/|h_old| under ``hidden_shift_threshold`` (theirs 0.02): ``none``
    #: (off), ``binary`` [r < τ], ``linear`` max(0, 1 − r/τ), ``quadratic`` its square.
    hidden_shift_weighting: Literal["none", "binary", "linear", "quadratic"] = "none"
    hidden_shift_threshold: float = 0.02
    #: Boundary weighting of the loss: weights ∝ 1/max(m, m_min) of the old boundary margin,
    #: normalised to mean 1 over a forward's cached tokens, clipped at ``boundary_weight_max``
    #: (theirs 4). m_min is not stated by the authors; 0.05 is this project's choice.
    boundary_weighting: bool = False
    boundary_margin_min: float = 0.05
    boundary_weight_max: float = 4.0
    #: Predictor Adam betas (None: the policy optimizer's, as the authors' code does).
    predictor_betas: Optional[list[float]] = None
    #: Predictor weight decay (None: the policy's, as the authors' code does; 0: none).
    predictor_weight_decay: Optional[float] = None

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
        self._check_stabilisers()

    def _check_stabilisers(self) -> None:
        """ValueError naming the key of a stabiliser or predictor-optimizer setting out of range."""
        if self.delta_depth_schedule not in DEPTH_SCHEDULES:
            raise ValueError(
                f"pr2.delta_depth_schedule must be one of {DEPTH_SCHEDULES}, "
                f"got {self.delta_depth_schedule!r}"
            )
        if self.hidden_shift_weighting not in SHIFT_WEIGHTINGS:
            raise ValueError(
                f"pr2.hidden_shift_weighting must be one of {SHIFT_WEIGHTINGS}, "
                f"got {self.hidden_shift_weighting!r}"
            )
        if not 0.0 <= self.delta_depth_gamma_min <= 1.0:
            raise ValueError(
                f"pr2.delta_depth_gamma_min must be in [0, 1], got {self.delta_depth_gamma_min}"
            )
        positive = {
            "delta_magnitude_cap": self.delta_magnitude_cap,
            "delta_margin_cap": self.delta_margin_cap,
            "delta_margin_cap_final": self.delta_margin_cap_final,
            "hidden_shift_threshold": self.hidden_shift_threshold,
            "boundary_margin_min": self.boundary_margin_min,
            "boundary_weight_max": self.boundary_weight_max,
        }
        for name, value in positive.items():
            if value is not None and not value > 0:
                raise ValueError(f"pr2.{name} must be > 0, got {value}")
        if self.flip_fallback_margin is not None and self.flip_fallback_margin < 0:
            raise ValueError(
                f"pr2.flip_fallback_margin must be >= 0, got {self.flip_fallback_margin}"
            )
        anneal = self.delta_margin_cap_anneal
        if (anneal is None) != (self.delta_margin_cap_final is None):
            raise ValueError(
                "pr2.delta_margin_cap_final and pr2.delta_margin_cap_anneal go together "
                f"(got {self.delta_margin_cap_final!r} and {anneal!r})"
            )
        if anneal is not None and (len(anneal) != 2 or not 0 <= anneal[0] < anneal[1]):
            raise ValueError(
                f"pr2.delta_margin_cap_anneal must be [first, last] rollout ids with "
                f"0 <= first < last, got {anneal!r}"
            )
        if anneal is not None and self.delta_margin_cap is None:
            raise ValueError("pr2.delta_margin_cap_anneal needs pr2.delta_margin_cap (η)")
        betas = self.predictor_betas
        if betas is not None and (len(betas) != 2 or not all(0 <= b < 1 for b in betas)):
            raise ValueError(f"pr2.predictor_betas must be two values in [0, 1), got {betas!r}")
        decay = self.predictor_weight_decay
        if decay is not None and decay < 0:
            raise ValueError(f"pr2.predictor_weight_decay must be >= 0, got {decay}")

    def delta_settings(self, rollout_id: Optional[int]) -> DeltaSettings:
        """The rollout-side stabilisers at ``rollout_id`` (the margin cap's η annealed)."""
        return DeltaSettings(
            depth_schedule=self.delta_depth_schedule,
            depth_gamma_min=self.delta_depth_gamma_min,
            magnitude_cap=self.delta_magnitude_cap,
            margin_cap=margin_cap_eta(
                self.delta_margin_cap,
                self.delta_margin_cap_final,
                self.delta_margin_cap_anneal,
                rollout_id,
            ),
            flip_fallback_margin=self.flip_fallback_margin,
        )


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
        #: Per training forward with predictor loss: ``[hits, plain hits, tokens]`` of the
        #: predictive top-k accuracy on its cached tokens (``predictor/topk_accuracy``).
        self.predictor_accuracy: list[torch.Tensor] = []
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

    def _predict_record(self, chosen_TK, live_TK, prediction, logits_TE, keys_T) -> dict:
        """Predict-phase metrics of one forward: |Δ|, |z|, routes changed, flip fallbacks.

        Counted over the named tokens (key >= 0) when the forward's tokens are named.
        """
        delta_TE, fallback_T = prediction
        real_T = torch.ones(chosen_TK.shape[0], dtype=torch.bool, device=chosen_TK.device)
        if keys_T is not None:
            real_T = (keys_T >= 0).to(chosen_TK.device)
        changed_T = changed_routes(chosen_TK, live_TK) & real_T
        fallbacks = 0 if fallback_T is None else int((fallback_T.to(real_T.device) & real_T).sum())
        return {
            "delta_abs": delta_TE.abs().mean(),
            "logit_abs": logits_TE.detach().abs().mean(),
            "changed": torch.tensor([int(changed_T.sum()), fallbacks, int(real_T.sum())]),
        }

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
        """``(TopK(score_fn(z + Δ)), Δ, fallback_T)`` without grad: the PR2 prediction.

        Δ after the configured stabilisers (:meth:`_stabilised`); ``fallback_T`` marks tokens
        the flip fallback returned to their old logits (None without it).
        """
        with torch.no_grad():
            delta_TE, fallback_T = self._stabilised(self.predictor(hidden_TH), logits_TE.detach())
            return self._topk_indices(logits_TE + delta_TE), delta_TE, fallback_T

    def _stabilised(self, delta_TE, logits_TE):
        """``(Δ', fallback_T)``: Δ through the stabilisers of :attr:`pr2_config` (or as it is)."""
        settings = self.pr2_config.delta_settings(self.current_rollout_id)
        if not settings.active:
            return delta_TE, None
        depth = depth_fraction(self.route_layer_number or 1, self.config.num_layers)
        return stabilise_delta(
            settings, delta_TE, logits_TE, k=self.topk, depth=depth, topk_fn=self._topk_indices
        )

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
        return self._attach_predictor_loss(probs_TE, keys_T, logits_TE, hidden_TH)

    def _attach_snapshot_loss(self, probs_TE, hidden_TH, logits_TE):
        """Protocol mode, no exact pairing: the forward's own h against ``z_old = W_old h``."""
        replay = self.router_replay
        replay.pairing_counts["snapshot"] += 1
        loss = replay.snapshot_loss(self.pr2_config.loss, self.predictor, hidden_TH, logits_TE)
        return self._finish_predictor_loss(probs_TE, loss)

    def _attach_predictor_loss(self, probs_TE, keys_T, logits_TE, hidden_TH) -> torch.Tensor:
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
            old_logits_CE = cached.logits_CE[cache_idx].to(device)
            current_logits_CE = logits_TE[token_idx.to(device)]
            delta_CE = self.predictor(hidden_CH)
            weights_C = self._loss_weights(hidden_TH, token_idx, hidden_CH, old_logits_CE)
            loss = predictor_loss(
                self.pr2_config.loss, current_logits_CE, old_logits_CE, delta_CE, weights_C
            )
            self.predictor_accuracy.append(
                self._predictive_accuracy(delta_CE.detach(), old_logits_CE, current_logits_CE)
            )
        return self._finish_predictor_loss(probs_TE, loss)

    def _loss_weights(self, hidden_TH, token_idx, hidden_CH, old_logits_CE):
        """Per-token loss weights of the hidden-shift and boundary stabilisers (None: off)."""
        cfg = self.pr2_config
        if cfg.hidden_shift_weighting == "none" and not cfg.boundary_weighting:
            return None
        with torch.no_grad():
            return loss_weights(
                shift_kind=cfg.hidden_shift_weighting,
                shift_threshold=cfg.hidden_shift_threshold,
                boundary=cfg.boundary_weighting,
                margin_min=cfg.boundary_margin_min,
                weight_max=cfg.boundary_weight_max,
                hidden_cur_CH=hidden_TH.detach()[token_idx.to(hidden_TH.device)],
                hidden_old_CH=hidden_CH,
                old_logits_CE=old_logits_CE,
                k=self.topk,
            )

    def _predictive_accuracy(self, delta_CE, old_logits_CE, current_logits_CE) -> torch.Tensor:
        """``[hits, plain hits, tokens]`` of the predictive top-k accuracy on cached tokens.

        Overlaps of TopK(z_old + Δ') and of TopK(z_old) with TopK(z_cur), summed; Δ' is the
        current predictor's shift through the stabilisers (the magnitude cap over these cached
        tokens rather than over a rollout forward's).
        """
        with torch.no_grad():
            old_CE, current_CE = old_logits_CE.detach(), current_logits_CE.detach()
            delta_CE, _ = self._stabilised(delta_CE, old_CE)
            live_CK = self._topk_indices(current_CE)
            predicted = topk_overlap(self._topk_indices(old_CE + delta_CE), live_CK).sum()
            plain = topk_overlap(self._topk_indices(old_CE), live_CK).sum()
        return torch.stack([predicted.cpu(), plain.cpu(), torch.tensor(float(live_CK.shape[0]))])

    def _finish_predictor_loss(self, probs_TE, loss) -> torch.Tensor:
        """Log ``loss`` and attach it to ``probs_TE``'s backward (SP-scaled)."""
        self.predictor_losses.append(float(loss.detach()))
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
