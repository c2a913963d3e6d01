"""The passes of one RL step, as the mode table (:mod:`pr2_megatron.rl.modes`) says.

Legend: N samples of this rank's rollout batch, S positions, T tokens of a forward on this rank
(``[S, B]`` order, its CP part and SP chunk), L MoE layers of the rank, K top-k.

Each function takes the :class:`~pr2_megatron.rl.train.Trainer` (its config, model chunks,
controller, route path, optimizer, device) and runs one pass of the step:

* :func:`rollout`: sample responses, capture routes (``mode.rollout``: record or predict),
  gather the rollout route table, score the rewards;
* :func:`old_logprobs`: log π_old in training numerics (``mode.old_logprob``: off, record,
  replay the rollout table, or predict), and its route table where it records one;
* :func:`mini_step`: one off-N mini-step: replay ``mode.replayed``'s table (or route live),
  train the predictors when ``mode.trains_predictor_at(i)``, one optimizer step, its metrics.

Every forward goes through Megatron's schedules (:func:`~pr2_megatron.rl.schedule.
run_schedule`), and every tensor that meets the model or a collective is on the rank's device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist

from pr2_megatron.rl.batches import RolloutBatch, mini_batch_rows, split_rows
from pr2_megatron.rl.layout import micro_size
from pr2_megatron.rl.schedule import (
    logprob_loss,
    ppo_loss_fn,
    run_schedule,
)
from pr2_megatron.rl.step_metrics import (
    MiniStepRouting,
    logprob_metrics,
    predict_metrics,
    predictor_metrics,
)
from pr2_megatron.routes.path import MicroBatch

__all__ = ["OldLogprobs", "Rollout", "mini_step", "old_logprobs", "rollout"]


@dataclass
class Rollout:
    """What step 1 produced on this rank."""

    batch: RolloutBatch
    #: ``[N]`` rewards (device).
    rewards_N: torch.Tensor
    #: The rollout's route table (None without a controller).
    table: Optional[object] = None
    #: Predictor metrics of a predict-phase rollout (pr2).
    metrics: dict = field(default_factory=dict)


@dataclass
class OldLogprobs:
    """What the old-log-prob pass produced."""

    #: ``[N, S]`` log π_old on every stage (device).
    logp_NS: torch.Tensor
    #: Its route table (r2, pr2-actor), else None.
    table: Optional[object] = None
    #: Predictor metrics of a predict-phase pass (pr2-actor).
    metrics: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------- rollout
def rollout(trainer, step: int, problems: list) -> Rollout:
    """Step 1: sample ``group_size`` responses per problem, capture and gather the routes."""
    cfg, ctl, path = trainer.cfg, trainer.controller, trainer.path
    samples = [p for p in problems for _ in range(cfg.rollout.group_size)]
    first_id = trainer.dp_rank * trainer.per_rank
    sample_ids = list(range(first_id, first_id + trainer.per_rank))
    predicting = trainer.mode.rollout == "predict"
    if ctl is not None:
        ctl.predict(collect_metrics=True) if predicting else ctl.record()
    trainer.diagnostics.begin_rollout(step)  # hook(effect)
    generators = [trainer.seeded(3, step, 1 + i) for i in sample_ids]
    pieces = split_rows(range(len(samples)), cfg.rollout.micro_batch_size)
    micro = _generate(trainer, samples, sample_ids, generators, pieces)
    trainer.diagnostics.end_rollout()  # hook(effect)
    metrics = (
        predict_metrics(ctl.routers, trainer.device, trainer.routing_groups()) if predicting else {}
    )
    batch = RolloutBatch.from_rollout(micro, trainer.seq_len, trainer.device)
    table = None
    if path is not None:
        routes = [m.routes_SBLK for m in micro]
        has_routes = all(r is not None for r in routes)

        def flat(routes_SBLK):
            return routes_SBLK.reshape(-1, *routes_SBLK.shape[2:]).to(trainer.device)

        table = path.gather(
            [MicroBatch(m.sample_ids, trainer.seq_len, m.input_lens) for m in micro],
            routes=[flat(r) for r in routes] if has_routes else None,
            plain_routes=[flat(m.plain_routes_SBLK) for m in micro] if has_routes else None,
            from_routers=True,  # the routers' own top-k, captured token by token
        )
    rewards = torch.tensor(
        [trainer.task.reward(p, r) for p, r in zip(samples, batch.responses)],
        device=trainer.device,
    )
    return Rollout(batch, rewards, table, metrics)


def _generate(trainer, samples, sample_ids, generators, pieces):
    """The rollout micro-batches: KV-cached (or full-forward) sampler, or the scheduled one."""
    cfg = trainer.cfg
    kwargs = dict(
        seq_len=trainer.seq_len,
        max_new_tokens=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        eos_id=trainer.task.eos_id,
        pad_id=trainer.task.pad_id,
        path=trainer.path,
        dtype=cfg.rollout.dtype,
    )
    if trainer.scheduled_rollout:
        from pr2_megatron.rl.pipeline_rollout import generate_scheduled

        return generate_scheduled(
            trainer.chunks,
            [[samples[r] for r in rows] for rows in pieces],
            generators=[[generators[r] for r in rows] for rows in pieces],
            sample_ids=[[sample_ids[r] for r in rows] for rows in pieces],
            vocab_size=cfg.model.vocab_size,
            device=trainer.device,
            **kwargs,
        )
    from pr2_megatron.rl.generation import generate

    return [
        generate(
            trainer.chunks[0],
            [samples[r] for r in rows],
            generator=[generators[r] for r in rows],
            sample_ids=[sample_ids[r] for r in rows],
            kv_cache=cfg.rollout.kv_cache,
            **kwargs,
        )
        for rows in pieces
    ]


# ------------------------------------------------------------------------------ old log-probs
def old_logprobs(trainer, rollout_: Rollout) -> OldLogprobs:
    """Step 3: ``[N, S]`` log π_old (no grad) in training numerics, per ``mode.old_logprob``."""
    mode, ctl, path, batch = trainer.mode, trainer.controller, trainer.path, rollout_.batch
    micro = batch.micro_batches(range(len(batch)), micro_size(trainer.cfg, len(batch)))
    if ctl is not None:
        phase = mode.old_logprob
        if phase == "off":
            ctl.off()
        elif phase == "record":
            ctl.record()
        elif phase == "predict":
            ctl.predict(collect_metrics=True)
        else:
            ctl.replay()
        for mb in micro:  # queued before the schedule: each router consumes them in order
            if phase == "replay" and ctl.routers:
                path.set_targets(rollout_.table, mb.route_batch)
            elif phase == "predict":
                path.name_tokens(mb.route_batch)  # the feature cache's names of the tokens
    store = run_schedule(
        trainer.ddp,
        micro,
        partial(
            logprob_loss, temperature=trainer.cfg.rollout.temperature, vocab_size=trainer.vocab
        ),
        seq_len=trainer.seq_len,
        vocab_size=trainer.vocab,
        forward_only=True,
    )
    logp_NS = trainer.last_stage_rows(store, "logp", len(batch))
    out = OldLogprobs(logp_NS)
    if ctl is not None and mode.records_old_logprob_routes:
        out.table = path.gather([mb.route_batch for mb in micro])
    if ctl is not None and mode.old_logprob == "predict":
        out.metrics = predict_metrics(ctl.routers, trainer.device, trainer.routing_groups())
    if ctl is not None and mode.old_logprob == "replay":
        ctl.finish()
    return out


# --------------------------------------------------------------------------------- mini-step
def mini_step(trainer, step: int, index: int, rollout_: Rollout, advantages_N, old: OldLogprobs):
    """Step 4, mini-step ``index``: replay per the mode table, one optimizer step; its record."""
    cfg, mode, ctl, batch = trainer.cfg, trainer.mode, trainer.controller, rollout_.batch
    rows = mini_batch_rows(len(batch), cfg.replay.off_n, index)
    micro = batch.micro_batches(
        rows, micro_size(cfg, len(rows)), old_logp_NS=old.logp_NS, advantages_N=advantages_N
    )
    train_predictor = mode.trains_predictor_at(index)
    trainer.diagnostics.begin_mini_step(index)  # hook(effect): before naming the tokens
    routing = _queue_routes(trainer, micro, rollout_, old, train_predictor)
    mask_NS = batch.mask_NS[rows]
    tokens = mask_NS.sum().detach().clone().float()
    dist.all_reduce(tokens, group=trainer.ps.get_data_parallel_group())
    scale = trainer.dp_size * len(micro) / float(tokens.clamp(min=1.0))
    trainer.optimizer.zero_grad()
    store = run_schedule(
        trainer.ddp,
        micro,
        partial(
            ppo_loss_fn,
            temperature=cfg.rollout.temperature,
            vocab_size=trainer.vocab,
            scale=scale,
            eps_low=cfg.grpo.eps_low,
            eps_high=cfg.grpo.eps_high,
        ),
        seq_len=trainer.seq_len,
        vocab_size=trainer.vocab,
        forward_only=False,
    )
    trainer.diagnostics.end_mini_step()  # hook(effect)
    if ctl is not None:
        ctl.finish()
    grad_norm = trainer.optimizer.step()

    record = {"event": "mini_step", "step": step, "mini_step": index, "mode": mode.name}
    if routing is not None:
        record.update(routing.summary(trainer.routing_groups(), trainer.device))
    logp = trainer.last_stage_rows(store, "logp", len(rows))
    ratio = trainer.last_stage_rows(store, "ratio", len(rows))
    record.update(
        logprob_metrics(
            logp,
            ratio,
            batch.rollout_logp_NS[rows],
            advantages_N[rows],
            mask_NS,
            cfg.grpo.eps_low,
            cfg.grpo.eps_high,
        )
    )
    record["ppo/grad_norm"] = grad_norm
    if train_predictor:
        record.update(predictor_metrics(ctl.routers, trainer.device, trainer.routing_groups()))
    return record


def _queue_routes(trainer, micro, rollout_: Rollout, old: OldLogprobs, train_predictor: bool):
    """Set the training phase and queue every forward's targets and metric rows."""
    mode, ctl, path = trainer.mode, trainer.controller, trainer.path
    if ctl is None:
        return None
    routing = MiniStepRouting(
        ctl.layer_numbers, trainer.moe_layer_numbers, live_routing=mode.replayed is None
    )
    if mode.replayed is not None:
        ctl.replay(train_predictor=train_predictor, collect_metrics=True, on_forward=routing)
    else:
        ctl.record(on_forward=routing)
    tables = {"rollout": rollout_.table, "old_logprob": old.table}
    for mb in micro:
        rows_T = token_rows(path, mb.mask_BS)
        if not ctl.routers:  # a pipeline stage without MoE layers: rows only
            routing.expect(rows_T, None, None)
            continue
        route = path.targets(rollout_.table, mb.route_batch)
        plain = path.targets(tables[mode.plain], mb.route_batch, plain=True)
        routing.expect(rows_T, route, plain)
        if mode.replayed is not None:
            replayed = (
                route if mode.replayed == "rollout" else path.targets(old.table, mb.route_batch)
            )
            ctl.set_targets(replayed, plain)
            path.name_tokens(mb.route_batch)  # the predictor's tokens (train_predictor)
    return routing


def token_rows(path, mask_BS: torch.Tensor) -> torch.Tensor:
    """Indices of response tokens among the forward's rows (``[S, B]`` order, CP part, SP chunk)."""
    return torch.nonzero(path.local_rows(mask_BS.T).reshape(-1) > 0).squeeze(-1)
