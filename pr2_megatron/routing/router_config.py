"""Settings of the PR2 router: its phases, :class:`PR2RouterConfig`, what replay cannot run with.

* :class:`RoutingPhase`: what the routers do in the next forwards (set by the controller);
* :class:`PR2RouterConfig`: predictor, feature cache, Megatron's ``RouterReplay`` protocol, the
  PR2 authors' stabilisers (docs/pr2_effect.md) and the predictor's optimizer settings;
* :func:`check_config_supports_replay`: Megatron settings under which replayed routes would be
  changed silently (a ValueError naming the setting).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal, Optional

from pr2_megatron.routing.predictor import PREDICTOR_LOSSES, PredictorLoss
from pr2_megatron.routing.stabilisers import (
    DEPTH_SCHEDULES,
    SHIFT_WEIGHTINGS,
    DeltaSettings,
    margin_cap_eta,
)

__all__ = ["PR2RouterConfig", "RoutingPhase", "check_config_supports_replay"]


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


def check_config_supports_replay(config, megatron_router_replay: bool = False) -> None:
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
