"""The replay modes as one table: what the routers do in each pass of an RL step.

An RL step has three kinds of pass (docs/trainer.md): the **rollout** (sampling, rollout
numerics), the **old-log-prob** pass (θ_old, training numerics, no grad) and the **training**
forwards of the off-N mini-steps. A mode is one row of :data:`MODES`:

=============  =========  ============  ======================  ===========  =================
mode           rollout    old log-prob  route replayed in       plain route  predictor trains
                                        training                (metrics)
=============  =========  ============  ======================  ===========  =================
``none``       record     off           none (live top-k)       rollout      no
``r2``         record     record        old-log-prob pass       rollout      no
``r3``         record     replay        rollout                 rollout      no
``pr2``        predict    replay        rollout (predicted)     rollout      mini-step >= 2
``pr2-actor``  record     predict       old-log-prob pass       old-log-     mini-step >= 2
                                        (predicted)             prob pass
=============  =========  ============  ======================  ===========  =================

*record*: live top-k, recorded; *predict*: PR2's ``TopK(score_fn(z + Δ))``, recorded with the
live top-k beside it, router inputs and logits cached for the predictor; *replay*: the routes
of the named pass. The rollout always records (the rollout table feeds the
``rollout_vs_train/*`` metrics), except that ``pr2`` records its predictions there.

``pr2-actor`` (``replay.mode: pr2`` with ``replay.predict_at: old_logprob``) is actor-side PR2:
the predictor is applied in the trainer's own old-log-prob pass, in training numerics, and the
routes recorded there are replayed in every training forward (R2-style), so the rollout routes
live and any engine (vLLM, SGLang) needs no change. ``pr2`` (``predict_at: rollout``) is
rollout-side PR2: the rollout engine itself must run the predictor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

RolloutPhase = Literal["record", "predict"]
OldLogprobPhase = Literal["off", "record", "replay", "predict"]
Pass = Literal["rollout", "old_logprob"]

__all__ = ["MODES", "ReplayMode", "replay_mode"]


@dataclass(frozen=True)
class ReplayMode:
    """One row of the mode table (see the module docstring)."""

    #: Name in logs and ``pr2-compare`` (``none``, ``r2``, ``r3``, ``pr2``, ``pr2-actor``).
    name: str
    #: What the routers do at rollout.
    rollout: RolloutPhase
    #: What the routers do in the old-log-prob pass (replay: the rollout table).
    old_logprob: OldLogprobPhase
    #: The pass whose route table every training forward replays (None: live routing).
    replayed: Optional[Pass]
    #: The pass whose table gives the plain-replay route of the routing metrics.
    plain: Pass
    #: Whether the predictors train (from mini-step 2 on, when the router has moved).
    trains_predictor: bool

    @property
    def predicts_in(self) -> Optional[Pass]:
        """The pass in the predict phase (its predictor metrics are logged), or None."""
        if self.rollout == "predict":
            return "rollout"
        if self.old_logprob == "predict":
            return "old_logprob"
        return None

    @property
    def records_old_logprob_routes(self) -> bool:
        """Whether the old-log-prob pass produces a route table."""
        return self.old_logprob in ("record", "predict")

    def trains_predictor_at(self, mini_step: int) -> bool:
        """Whether mini-step ``mini_step`` (1-based) trains the predictors."""
        return self.trains_predictor and mini_step >= 2


#: Every mode, by name.
MODES: dict[str, ReplayMode] = {
    mode.name: mode
    for mode in (
        ReplayMode("none", "record", "off", None, "rollout", False),
        ReplayMode("r2", "record", "record", "old_logprob", "rollout", False),
        ReplayMode("r3", "record", "replay", "rollout", "rollout", False),
        ReplayMode("pr2", "predict", "replay", "rollout", "rollout", True),
        ReplayMode("pr2-actor", "record", "predict", "old_logprob", "old_logprob", True),
    )
}


def replay_mode(mode: str, predict_at: str = "rollout") -> ReplayMode:
    """The table row of ``replay.mode`` and ``replay.predict_at`` (ValueError naming both)."""
    if predict_at not in ("rollout", "old_logprob"):
        raise ValueError(
            f"replay.predict_at={predict_at!r} is not one of ['rollout', 'old_logprob']"
        )
    if predict_at == "old_logprob":
        if mode != "pr2":
            raise ValueError(
                f"replay.predict_at='old_logprob' (actor-side PR2) needs replay.mode='pr2', "
                f"got replay.mode={mode!r}"
            )
        return MODES["pr2-actor"]
    if mode not in MODES or mode == "pr2-actor":
        raise ValueError(f"replay.mode={mode!r} is not one of ['none', 'r2', 'r3', 'pr2']")
    return MODES[mode]
