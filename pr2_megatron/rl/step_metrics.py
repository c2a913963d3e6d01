"""The trainer's per-step metrics, model-wide under every layout (DP, TP+SP, CP, PP, VPP).

Legend: T tokens of a forward on this rank, L MoE layers of the rank, K top-k, N samples.

* :class:`MiniStepRouting`: routing agreement of a mini-step, reduced forward by forward.
  Under pipeline parallelism each stage routes its own layers: per-layer sums are summed over
  the stages, and a token's zero deviation (its experts equal in *every* layer) is the AND of
  each stage's per-token agreement, so the figures equal a PP=1 run's.
* :func:`logprob_metrics`: log-prob mismatch against the rollout, PPO clip fraction, ratio.
* :func:`predictor_metrics` / :func:`predict_metrics`: the predictors' loss (overall, per
  layer) and their logit shift at prediction, over every stage's layers.
* :class:`RouterDrift`: size and direction of the routers' update in a step.
"""

from __future__ import annotations

import collections
from typing import Optional

import torch
import torch.distributed as dist

from pr2_megatron.errors import RouteError

__all__ = [
    "MiniStepRouting",
    "RouterDrift",
    "logprob_metrics",
    "predict_metrics",
    "predictor_metrics",
    "prefixed",
]


def prefixed(prefix: str, metrics: dict) -> dict:
    """``metrics`` with ``prefix`` before every key."""
    return {f"{prefix}{key}": value for key, value in metrics.items()}


def _pp_group():
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return None
    return ps.get_pipeline_model_parallel_group()


def _reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class MiniStepRouting:
    """Routing agreement of a mini-step's forwards, reduced forward by forward.

    Before the schedule the trainer queues (:meth:`expect`) each forward's response-token rows
    (``[S, B]`` order, the rank's CP part and SP chunk) and its rollout routes; the controller
    calls this object with a forward's routes as soon as every MoE layer of the rank has routed
    it (``on_forward``): they are added to two accumulators and dropped.

    ``routing/``: the route the tokens were sampled and trained with (live routing: the
    rollout's; else the replayed one) against the live router, the plain-replay route beside
    it; ``rollout_vs_train/``: the rollout's route against the one trained with.
    """

    def __init__(
        self, layer_numbers: list[int], all_layer_numbers: list[int], live_routing: bool
    ) -> None:
        from pr2_megatron.metrics import RoutingAgreement

        self.layers = list(layer_numbers)
        self.all_layers = list(all_layer_numbers)
        self.live_routing = live_routing
        self.sampled_with = RoutingAgreement(self.all_layers)
        self.trained_with = RoutingAgreement(self.all_layers)
        self._agree = {"sampled": [], "trained": []}  # per forward: [T_resp] bool
        self._expected: collections.deque = collections.deque()
        self._rows_of_forwards: list[int] = []

    def expect(self, rows_T, route_TLK, plain_TLK) -> None:
        """The next forward's token rows and rollout routes ``[T, L, K]`` (plain: or None)."""
        self._expected.append((rows_T, route_TLK, plain_TLK))
        self._rows_of_forwards.append(int(rows_T.numel()))

    def __call__(self, forward: dict) -> None:
        """Add one forward's routes (``RoutingController`` ``on_forward``)."""
        from pr2_megatron.metrics.agreement import same_set

        if not self._expected:
            raise RouteError("a training forward ran that the trainer did not queue metrics for")
        rows, route, plain = self._expected.popleft()
        device = forward["live"].device
        rows, route = rows.to(device), route.to(device)
        plain = None if plain is None else plain.to(device)
        sampled = route if self.live_routing else forward["replayed"]
        pairs = {
            "sampled": ({"replayed": sampled, "live": forward["live"], "plain": plain}),
            "trained": ({"replayed": route, "live": forward["replayed"]}),
        }
        for name, accumulator in (("sampled", self.sampled_with), ("trained", self.trained_with)):
            routes = pairs[name]
            accumulator.add_forward(routes, self.layers, rows)
            agree_T = torch.ones(rows.numel(), dtype=torch.bool, device=device)
            for column in range(len(self.layers)):
                agree_T &= same_set(
                    routes["replayed"][rows, column].long(), routes["live"][rows, column].long()
                )
            self._agree[name].append(agree_T)

    def summary(self, groups, device: torch.device) -> dict:
        """Model-wide metrics: stages combined, then all-reduced over each of ``groups``."""
        from pr2_megatron.metrics import RoutingAgreement

        if self._expected and self.layers:
            raise RouteError(f"{len(self._expected)} training forward(s) never reported routes")
        out = {}
        for name, prefix, accumulator in (
            ("sampled", "routing/", self.sampled_with),
            ("trained", "rollout_vs_train/", self.trained_with),
        ):
            flat = self._pipeline_sums(accumulator, self._agree[name], device)
            combined = RoutingAgreement.from_tensor(flat, self.all_layers)
            for group in groups:
                combined.reduce_(group, device=device)
            out.update(prefixed(prefix, combined.summary()))
        return out

    def _pipeline_sums(self, accumulator, agree, device) -> torch.Tensor:
        """The flat sums with per-layer blocks summed and zero deviation ANDed over PP."""
        flat = accumulator.as_tensor(device).to(device)
        if self.layers:
            agree_T = torch.cat(agree) if agree else torch.zeros(0, dtype=torch.bool)
        else:  # a stage without MoE layers: every token agrees in its (no) layers
            agree_T = torch.ones(sum(self._rows_of_forwards), dtype=torch.bool)
        group = _pp_group()
        blocks = _reduce(flat[2:].clone(), group)
        agree_T = _reduce(agree_T.to(device, torch.float32), group, dist.ReduceOp.MIN)
        header = torch.tensor(
            [agree_T.numel(), float(agree_T.sum())], dtype=flat.dtype, device=device
        )
        return torch.cat([header, blocks])


def logprob_metrics(logp, ratio, rollout_logp, advantages, mask, eps_low, eps_high) -> dict:
    """Log-prob mismatch vs the rollout and PPO ratio metrics of ``[N, S]`` rows (all DP ranks)."""
    from pr2_megatron.metrics import logprob_mismatch_metrics, ppo_clip_fraction

    logp, ratio = _gather_dp(logp), _gather_dp(ratio)
    rollout_logp, mask = _gather_dp(rollout_logp), _gather_dp(mask)
    advantages = _gather_dp(advantages.unsqueeze(-1)).expand_as(ratio)
    out = prefixed("logprob/", logprob_mismatch_metrics(logp, rollout_logp, mask))
    out["ppo/clip_fraction"] = ppo_clip_fraction(ratio, advantages, mask, eps_low, eps_high)
    selected = mask > 0
    out["ppo/ratio_mean"] = float(ratio[selected].mean()) if selected.any() else 1.0
    out["ppo/ratio_max_abs_dev"] = (
        float((ratio[selected] - 1).abs().max()) if selected.any() else 0.0
    )
    return out


def _gather_dp(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor of equal shape on every data-parallel rank along dim 0."""
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_world_size() == 1:
        return tensor
    size = ps.get_data_parallel_world_size()
    out = tensor.new_empty((size * tensor.shape[0], *tensor.shape[1:]))
    dist.all_gather_into_tensor(out, tensor.contiguous(), group=ps.get_data_parallel_group())
    return out


def gather_dp(tensor: torch.Tensor) -> torch.Tensor:
    """Public name of the data-parallel concatenation (rewards, lengths)."""
    return _gather_dp(tensor)


def predictor_metrics(routers, device: torch.device, groups=()) -> dict:
    """``predictor/loss`` (overall and per layer) of a replay pass that trained the predictors.

    Token means: each forward's loss weighted by its cached tokens, summed over the model's
    stages and over ``groups`` (the trainer's routing groups: DP, TP under SP, CP), so the
    figure is the same in every layout (not one TP rank's sequence chunk).
    """
    local = {
        r.route_layer_number: (
            sum(loss * n for loss, n in zip(r.predictor_losses, r.predictor_loss_tokens)),
            sum(r.predictor_loss_tokens),
            len(r.predictor_losses),
        )
        for r in routers
    }
    if routers and not any(forwards for _, _, forwards in local.values()):
        raise RuntimeError("the predictors trained in no forward of this pass")
    merged = _merge_over_pipeline(local)
    layers = sorted(merged)
    sums = torch.tensor(
        [[merged[layer][0], merged[layer][1]] for layer in layers],
        dtype=torch.float64,
        device=device,
    ).reshape(-1, 2)
    for group in groups:
        _reduce(sums, group)
    total, count = (float(x) for x in sums.sum(0)) if layers else (0.0, 0.0)
    out = {"predictor/loss": total / count} if count else {}
    for layer, (s, c) in zip(layers, sums.tolist()):
        if c:
            out[f"predictor/loss/layer_{layer}"] = s / c
    accuracy = {  # hook(effect): the reference's predictive_topk_accuracy, per router
        r.route_layer_number: [float(v) for v in sum(r.predictor_accuracy, torch.zeros(3))]
        for r in routers
    }
    names = ["predictor/topk_accuracy", "predictor/topk_accuracy_plain"]
    out.update(layer_count_ratios(accuracy, names, device, groups))
    return out


def predict_metrics(routers, device: torch.device, groups=()) -> dict:
    """``predictor/delta_to_logit_ratio`` of a predict pass: mean |Δ| / mean |z|.

    Token means over every stage and over ``groups`` (DP, TP under SP, CP).
    """
    records = [rec for r in routers for rec in r.metric_records]
    sums = torch.tensor(
        [
            float(sum(float(rec["delta_abs"]) * rec["tokens"] for rec in records)),
            float(sum(float(rec["logit_abs"]) * rec["tokens"] for rec in records)),
            float(sum(rec["tokens"] for rec in records)),
        ],
        dtype=torch.float64,
        device=device,
    )
    _reduce(sums, _pp_group())
    for group in groups:
        _reduce(sums, group)
    if not float(sums[2]):
        return {}
    delta, logit = float(sums[0]), float(sums[1])
    out = {"predictor/delta_to_logit_ratio": delta / logit if logit else 0.0}
    changed = {  # hook(effect): routes the predictor changes, flip fallbacks, per router
        r.route_layer_number: [
            float(v) for v in sum((rec["changed"] for rec in r.metric_records), torch.zeros(3))
        ]
        for r in routers
    }
    names = ["predictor/route_change_fraction", "predictor/flip_fallback_fraction"]
    out.update(layer_count_ratios(changed, names, device, groups, empty=0.0))
    return out


def layer_count_ratios(
    local: dict, names: list[str], device: torch.device, groups=(), empty: Optional[float] = None
) -> dict:
    """Ratios of per-layer counts ``{layer: [a, b, ..., tokens]}`` over all stages and ``groups``.

    ``names[i]`` is ``count[i] / tokens``, overall and ``/layer_{n}``, the counts summed over
    the model's stages and over ``groups`` (the trainer's routing groups: DP, TP under SP, CP);
    a layer (or the total) without tokens gets ``empty`` (None: no entry).
    """
    merged = _merge_over_pipeline(local)
    layers = sorted(merged)
    if not layers:
        return {}
    counts = torch.tensor([merged[n] for n in layers], dtype=torch.float64, device=device)
    for group in groups:
        _reduce(counts, group)
    counts = counts.cpu()
    out = {}
    rows = [("", counts.sum(0)), *((f"/layer_{n}", counts[i]) for i, n in enumerate(layers))]
    for suffix, row in rows:
        tokens = float(row[-1])
        if not tokens and empty is None:
            continue
        for index, name in enumerate(names):
            out[f"{name}{suffix}"] = float(row[index]) / tokens if tokens else empty
    return out


def _merge_over_pipeline(local: dict) -> dict:
    """Union of every stage's ``{layer: (sum, count)}`` (layers are disjoint over stages)."""
    group = _pp_group()
    if group is None:
        return dict(local)
    gathered: list[Optional[dict]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, local, group=group)
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged


class RouterDrift:
    """How far and in which direction the routers moved in a step's mini-steps.

    ``router/update_norm``: norm of the step's update of every router weight (all layers, all
    stages). ``router/update_cosine_prev``: cosine between this step's update and the previous
    step's. Near 0 the drift is a random walk, which no predictor trained on one rollout batch
    can anticipate for the next. :attr:`previous` (per MoE layer) is checkpointed.
    """

    def __init__(self) -> None:
        self.previous: dict[int, torch.Tensor] = {}

    def snapshot(self, routers) -> dict[int, torch.Tensor]:
        """The routers' weights before a step (any Megatron router, by its layer number)."""
        return {_layer_of(r): r.weight.detach().float().clone() for r in routers}

    def measure(self, routers, before: dict, device: torch.device) -> dict:
        """The step's drift metrics; remembers the update for the next step."""
        update = {_layer_of(r): r.weight.detach().float() - before[_layer_of(r)] for r in routers}
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # |u|², |u_prev|², u·u_prev
        has_previous = torch.zeros(1, dtype=torch.float64, device=device)
        for layer, u in update.items():
            sums[0] += float(u.pow(2).sum())
            previous = self.previous.get(layer)
            if previous is not None:
                has_previous += 1
                sums[1] += float(previous.to(u.device).pow(2).sum())
                sums[2] += float((u * previous.to(u.device)).sum())
        group = _pp_group()
        _reduce(sums, group)
        _reduce(has_previous, group)
        self.previous = update
        out = {"router/update_norm": float(sums[0].sqrt())}
        if float(has_previous) and float(sums[0]) > 0 and float(sums[1]) > 0:
            out["router/update_cosine_prev"] = float(sums[2] / (sums[0].sqrt() * sums[1].sqrt()))
        return out


def _layer_of(router) -> int:
    """A router's MoE layer number (PR2's, MTP-aware; a stock router's own)."""
    return int(getattr(router, "route_layer_number", router.layer_number))
