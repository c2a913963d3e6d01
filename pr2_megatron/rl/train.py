"""``pr2-train``: GRPO on a verifiable task with none / r2 / r3 / pr2 routing replay.

Run under torchrun (``launch/train.sh`` does it: 2 CPU ranks, EP=2 by default)::

    torchrun --nproc-per-node 2 -m pr2_megatron.rl.train --config configs/tiny.yaml replay.mode=pr2

One RL step (docs/design.md):

1. **Rollout** with the Megatron model itself (``rollout.dtype`` numerics): every data-parallel
   rank samples ``group_size`` responses to its prompts. The routers record the routes the
   rollout dispatched (pr2: the *predicted* routes, with the live top-k beside them; the
   feature cache keeps router inputs and logits). One route table for the whole batch is
   all-gathered (:class:`~pr2_megatron.routes.RoutePath`, the library's route path).
2. **Old log-probs** at θ_old in training numerics: none routes live, r2 records its routes
   here, r3/pr2 replay the rollout table.
3. **GRPO**: group-normalised advantages of exact-match rewards.
4. **Off-N mini-steps**: the batch is split into ``replay.off_n`` mini-batches, one optimizer
   step each (PPO clipped loss, ε_low/ε_high), replaying according to ``replay.mode``; pr2
   trains the predictor from mini-step 2 on (its loss rides the same backward).
5. **Metrics** per mini-step (routing agreement overall and per layer, log-prob mismatch, clip
   fraction, predictor) to ``metrics.jsonl`` and TensorBoard, and a progress line.

Checkpoints (``checkpoint.dir``) are atomic and resumable; SIGTERM or SIGUSR1 makes every rank
finish the step, save, write ``STOPPED_BY_SIGNAL`` and exit 0.
"""

from __future__ import annotations

import argparse
import collections
import math
import random
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pr2_megatron.rl.config import ConfigError, TrainConfig, dump_yaml, load_config

STOPPED_BY_SIGNAL = "STOPPED_BY_SIGNAL"


class _StopFlag:
    """Set by SIGTERM / SIGUSR1; checked (and agreed on by all ranks) at the end of a step."""

    def __init__(self) -> None:
        self.raised = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True


class Trainer:
    """The GRPO loop for one config on this process's rank."""

    def __init__(self, cfg: TrainConfig) -> None:
        from megatron.core import parallel_state

        from pr2_megatron.models.builder import build_gpt_moe
        from pr2_megatron.rl.data import build_task
        from pr2_megatron.rl.run_log import RunLog
        from pr2_megatron.routing.controller import RoutingController
        from pr2_megatron.runtime.parallel import initialize_parallel

        self.cfg = cfg
        # Handlers first: a signal while the model is being built must not kill the rank.
        self.stop = _StopFlag()
        self.stop.install()
        initialize_parallel(cfg.parallel, seed=cfg.seed)
        _check_supported_layout(cfg)
        self.ps = parallel_state
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.rank0 = dist.get_rank() == 0
        self.task = build_task(cfg)  # digit task, or task.dataset with its tokenizer
        self.seq_len = _round_up(
            max(
                self.task.max_prompt_len + cfg.rollout.max_new_tokens - 1,
                self.task.max_prompt_len + self.task.max_answer_len - 1,
            ),
            self.tp_size if cfg.parallel.sequence_parallel else 1,
        )
        if cfg.model.max_sequence_length < self.seq_len:
            raise ConfigError(
                f"model.max_sequence_length={cfg.model.max_sequence_length} is shorter than the "
                f"task's sequences ({self.seq_len} tokens)"
            )
        if cfg.model.vocab_size < self.task.vocab_size:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the task's "
                f"{self.task.vocab_size}"
            )
        self.per_rank = _per_rank_samples(cfg, self.dp_size)
        kwargs = {}
        if cfg.router.kind == "probmoe":
            kwargs["probmoe"] = cfg.router.probmoe
        self.model = build_gpt_moe(
            cfg.model, cfg.parallel, cfg.router.pr2, router=cfg.router.kind, **kwargs
        )
        # Megatron's stock router (router.kind=topk, replay.mode=none) has nothing to control.
        self.controller = None
        self.path = None
        if cfg.router.kind != "topk":
            from pr2_megatron.routes.path import RoutePath

            self.controller = RoutingController(self.model)
            self.path = RoutePath(self.controller)
        self.optimizer = self._optimizer(cfg.optim.lr)
        self.step = 0
        self.warm_started = False
        self.log = RunLog(cfg.logging.dir, enabled=self.rank0, tensorboard=cfg.logging.tensorboard)
        from pr2_megatron.rl.diagnostics import StepDiagnostics  # hook(effect)

        self.diagnostics = StepDiagnostics(  # hook(effect): predictability diagnostic
            cfg, self.controller, self.log, rank0=self.rank0, groups=self._routing_groups()
        )
        from pr2_megatron.runtime.gpu import GPUMonitor, detect_gpu_stack

        self.gpu_monitor = GPUMonitor(enabled=cfg.logging.gpu_monitor and torch.cuda.is_available())
        if self.rank0:
            (Path(cfg.logging.dir) / "config.yaml").write_text(dump_yaml(cfg))
            print(f"pr2-train: {detect_gpu_stack().describe()}", flush=True)
            if cfg.logging.gpu_monitor and not torch.cuda.is_available():
                print("pr2-train: GPU monitoring off (no CUDA device)", flush=True)

    # ------------------------------------------------------------------------- setup pieces
    def _optimizer(self, lr: float):
        from pr2_megatron.routing.optimizer import param_groups

        optim = self.cfg.optim
        groups = param_groups(self.model, lr, optim.weight_decay)
        return torch.optim.AdamW(groups, lr=lr, betas=(optim.beta1, optim.beta2))

    def _generator(self, purpose: int, step: int) -> torch.Generator:
        """Data/sampling RNG of one step: a pure function of (seed, purpose, step, DP rank)."""
        seed = (self.cfg.seed * 1_000_003 + purpose * 7_919 + step) * 4_099 + self.dp_rank
        return torch.Generator().manual_seed(seed % (2**63))

    # ---------------------------------------------------------------------------- checkpoint
    def state(self) -> dict:
        """Everything a resumed run needs (this rank's shards)."""
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        return {
            "step": self.step,
            "warm_started": self.warm_started,
            "previous_router_update": getattr(self, "_previous_router_update", None),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "python": list(random.getstate()[1]),
                "tracker": get_cuda_rng_tracker().get_states(),
            },
        }

    def load_state(self, state: dict) -> None:
        """Restore :meth:`state` (the data position is the step: data RNG is per step)."""
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate((3, tuple(state["rng"]["python"]), None))
        get_cuda_rng_tracker().set_states(state["rng"]["tracker"])
        self.step = int(state["step"])
        self.warm_started = bool(state["warm_started"])
        self._previous_router_update = state.get("previous_router_update")

    def save(self) -> None:
        """Checkpoint after the current step (collective)."""
        from pr2_megatron.rl.checkpoint import save_checkpoint

        ckpt = self.cfg.checkpoint
        path = save_checkpoint(ckpt.dir, self.step, self.state(), keep=ckpt.keep)
        if self.rank0:
            print(f"pr2-train: checkpoint {path}", flush=True)

    def maybe_resume(self) -> None:
        """Load the newest complete checkpoint of ``checkpoint.dir`` if resuming is on."""
        from pr2_megatron.rl.checkpoint import latest_checkpoint, load_checkpoint

        ckpt = self.cfg.checkpoint
        if not ckpt.dir or not ckpt.resume:
            self.log.start_fresh()
            return
        path = latest_checkpoint(ckpt.dir)
        if path is None:
            self.log.start_fresh()
            return
        self.load_state(load_checkpoint(path))
        self.log.truncate_after(self.step)
        if self.rank0:
            print(f"pr2-train: resumed from step {self.step} ({path})", flush=True)

    # ---------------------------------------------------------------------------- warm start
    def warm_start(self) -> None:
        """Supervised steps on correct answers (router live, nothing recorded)."""
        from pr2_megatron.runtime.parallel import average_gradients

        warm = self.cfg.warm_start
        if self.warm_started or warm.steps == 0:
            self.warm_started = True
            return
        if warm.batch_size % self.dp_size:
            raise ConfigError(
                f"warm_start.batch_size={warm.batch_size} is not divisible by the "
                f"data-parallel size {self.dp_size}"
            )
        optimizer = self._optimizer(warm.lr)
        if self.controller is not None:
            self.controller.off()
        from pr2_megatron.rl.drivers import set_aux_loss_coeff  # hook(effect)

        rl_aux_coeff = set_aux_loss_coeff(self.model, warm.aux_loss_coeff)  # hook(effect)
        start = time.time()
        for i in range(warm.steps):
            if i % 10 == 9 and self.stop_requested():
                if self.rank0:
                    print(f"pr2-train: signal during warm start (iteration {i})", flush=True)
                return
            problems = self.task.sample(warm.batch_size // self.dp_size, self._generator(1, i))
            ids, labels, mask = self.task.supervised_batch(problems, self.seq_len)
            logp = self.token_logprobs(ids, labels, temperature=1.0)
            count = self._global_sum(mask.sum())
            loss = -(logp * mask).sum() / count * self.dp_size
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(self.model)
            self._clip_gradients()
            optimizer.step()
            if self.rank0 and (i + 1) % max(1, warm.steps // 5) == 0:
                value = float(loss.detach()) / self.dp_size
                print(f"warm start {i + 1}/{warm.steps}: answer NLL {value:.3f}", flush=True)
                self.log.write({"event": "warm_start", "step": 0, "iter": i + 1, "nll": value})
        self.warm_started = True
        set_aux_loss_coeff(self.model, rl_aux_coeff)  # hook(effect): RL's aux-loss coefficient
        if self.rank0:
            print(f"warm start done in {time.time() - start:.1f}s", flush=True)

    # ------------------------------------------------------------------------------- helpers
    def token_logprobs(self, ids, labels, temperature: float) -> torch.Tensor:
        """``[B, S]`` log π(label) in training numerics (full vocabulary over TP)."""
        from pr2_megatron.rl.rollout import forward_logits

        for name, tokens in (("input", ids), ("label", labels)):
            _check_token_ids(tokens, self.cfg.model.vocab_size, name)
        logits = forward_logits(self.model, ids).float() / temperature
        return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)

    def _global_sum(self, value: torch.Tensor) -> torch.Tensor:
        total = value.detach().clone().float()
        dist.all_reduce(total, group=self.ps.get_data_parallel_group())
        return total.clamp(min=1.0)

    def _gather_dp(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a tensor of equal shape on every data-parallel rank along dim 0."""
        if self.dp_size == 1:
            return tensor
        out = tensor.new_empty((self.dp_size * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_into_tensor(
            out, tensor.contiguous(), group=self.ps.get_data_parallel_group()
        )
        return out

    def _clip_gradients(self) -> float:
        clip = self.cfg.optim.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        # Every rank computes the norm over the full model: shards of TP/EP are summed.
        norm_sq = self._model_parallel_norm_sq(params)
        norm = math.sqrt(norm_sq)
        if clip > 0 and norm > clip:
            for p in params:
                p.grad.mul_(clip / (norm + 1e-6))
        return norm

    def _model_parallel_norm_sq(self, params) -> float:
        dense, expert = torch.zeros(1), torch.zeros(1)
        tp0 = self.tp_rank == 0
        for p in params:
            sq = p.grad.detach().float().pow(2).sum()
            if not getattr(p, "allreduce", True):
                expert += sq
            elif getattr(p, "tensor_model_parallel", False) or tp0:
                dense += sq
        dist.all_reduce(dense, group=self.ps.get_tensor_model_parallel_group())
        ep_group = self.ps.get_expert_model_parallel_group()
        dist.all_reduce(expert, group=ep_group)
        return float(dense + expert)

    def _rollout_phase(self) -> None:
        if self.cfg.replay.mode == "pr2":
            self.controller.set_rollout_id(self.step + 1)  # hook(effect): stabiliser schedule
            self.controller.predict(collect_metrics=True)
        elif self.controller is not None:
            self.controller.record()

    # ------------------------------------------------------------------------------ RL step
    def rl_step(self) -> None:
        """One rollout batch and its off-N mini-steps; logs and prints."""
        from pr2_megatron.rl.generation import generate
        from pr2_megatron.rl.grpo import group_advantages
        from pr2_megatron.routes.path import MicroBatch

        cfg, step = self.cfg, self.step + 1
        start = time.time()
        router_before = self._router_weights()
        group = cfg.rollout.group_size
        problems = self.task.sample(self.per_rank // group, self._generator(2, step))
        samples = [p for p in problems for _ in range(group)]
        first_id = self.dp_rank * self.per_rank
        sample_ids = list(range(first_id, first_id + self.per_rank))

        # 1. Rollout (rollout numerics), routes captured and gathered into one table.
        self._rollout_phase()
        self.diagnostics.begin_rollout(step)  # hook(effect)
        sampler = self._generator(3, step)
        micro = []
        mbs = cfg.rollout.micro_batch_size
        for lo in range(0, self.per_rank, mbs):
            micro.append(
                generate(
                    self.model,
                    samples[lo : lo + mbs],
                    seq_len=self.seq_len,
                    max_new_tokens=cfg.rollout.max_new_tokens,
                    temperature=cfg.rollout.temperature,
                    top_p=cfg.rollout.top_p,
                    generator=sampler,
                    path=self.path,
                    sample_ids=sample_ids[lo : lo + mbs],
                    dtype=cfg.rollout.dtype,
                    eos_id=self.task.eos_id,
                    pad_id=self.task.pad_id,
                    kv_cache=cfg.rollout.kv_cache,
                )
            )
        self.diagnostics.end_rollout()  # hook(effect)
        rollout_metrics = self.controller.metrics() if cfg.replay.mode == "pr2" else {}
        batch = _concat_rollout(micro)
        table = None
        if self.path is not None:
            table = self.path.gather(
                [MicroBatch(m.sample_ids, self.seq_len, m.input_lens) for m in micro],
                routes=[m.routes_SBLK.reshape(-1, *m.routes_SBLK.shape[2:]) for m in micro],
                plain_routes=[
                    m.plain_routes_SBLK.reshape(-1, *m.plain_routes_SBLK.shape[2:]) for m in micro
                ],
                from_routers=True,  # the routers' own top-k, captured token by token
            )
        rewards = torch.tensor(
            [self.task.reward(p, r) for p, r in zip(samples, batch["responses"])]
        )
        advantages = group_advantages(rewards, group, cfg.grpo.advantage_eps)

        # 2. Old log-probs at θ_old in training numerics (r2 records its routes here).
        old_logp, r2_table = self._old_logprobs(batch, sample_ids, table)
        replay_table = {"r2": r2_table, "r3": table, "pr2": table}.get(cfg.replay.mode)

        # 3.-4. Off-N mini-steps.
        rollout_record = self._rollout_record(step, rewards, batch, rollout_metrics)
        self.log.write(rollout_record, tb_step=step)
        mini_records = []
        per_mini = self.per_rank // cfg.replay.off_n
        for mini_step in range(1, cfg.replay.off_n + 1):
            rows = list(range((mini_step - 1) * per_mini, mini_step * per_mini))
            record = self._mini_step(
                step,
                mini_step,
                rows,
                batch,
                sample_ids,
                advantages,
                old_logp,
                replay_table,
                table,
            )
            mini_records.append(record)
        self.diagnostics.end_step(step, batch["mask"], sample_ids)  # hook(effect)
        mini_records[-1].update(self._router_drift(router_before))
        mini_records[-1]["time/step_seconds"] = time.time() - start
        for mini_step, record in enumerate(mini_records, start=1):
            self.log.write(record, tb_step=(step - 1) * cfg.replay.off_n + mini_step)
        self.step = step
        if self.rank0:
            from pr2_megatron.rl.run_log import progress_line

            print(
                progress_line(
                    step, cfg.steps, rollout_record, mini_records[-1], time.time() - start
                ),
                flush=True,
            )

    def _routers(self) -> list:
        from megatron.core.transformer.moe.router import Router

        return [m for m in self.model.modules() if isinstance(m, Router)]

    def _router_weights(self) -> list[torch.Tensor]:
        return [r.weight.detach().clone() for r in self._routers()]

    def _router_drift(self, before: list[torch.Tensor]) -> dict:
        """How far and in which direction the routers moved in this step's mini-steps.

        ``router/update_cosine_prev``: cosine between this step's router-weight update and the
        previous step's (all layers flattened). Near 0 the drift is a random walk, which no
        predictor trained on one rollout batch can anticipate for the next.
        """
        if not before:
            return {}
        update = torch.cat(
            [(r.weight.detach() - b).flatten() for r, b in zip(self._routers(), before)]
        )
        out = {"router/update_norm": float(update.norm())}
        previous = getattr(self, "_previous_router_update", None)
        if previous is not None and previous.norm() > 0 and update.norm() > 0:
            out["router/update_cosine_prev"] = float(
                torch.dot(update, previous) / (update.norm() * previous.norm())
            )
        self._previous_router_update = update
        return out

    def _old_logprobs(self, batch, sample_ids, table):
        """``[N, S]`` log π_old (no grad) and, for r2, the routes recorded in this pass."""
        mode = self.cfg.replay.mode
        if mode == "r2":
            self.controller.record()
        elif mode in ("r3", "pr2"):
            self.controller.replay()
        elif self.controller is not None:
            self.controller.off()
        out = []
        groups = self._train_micro_batches(range(self.per_rank))
        with torch.no_grad():
            for rows in groups:
                if mode in ("r3", "pr2"):
                    self.path.set_targets(table, self._micro_batch(rows, batch, sample_ids))
                ids, labels = batch["ids"][rows], batch["labels"][rows]
                out.append(self.token_logprobs(ids, labels, self.cfg.rollout.temperature))
        r2_table = None
        if mode == "r2":
            r2_table = self.path.gather([self._micro_batch(r, batch, sample_ids) for r in groups])
        if mode in ("r3", "pr2"):
            self.controller.finish()
        return torch.cat(out), r2_table

    def _train_micro_batches(self, rows) -> list[list[int]]:
        rows = list(rows)
        size = self.cfg.grpo.micro_batch_size
        return [rows[i : i + size] for i in range(0, len(rows), size)]

    def _micro_batch(self, rows, batch, sample_ids):
        """The :class:`MicroBatch` of these rows of the rollout batch (right-padded)."""
        from pr2_megatron.routes.path import MicroBatch

        return MicroBatch(
            [sample_ids[r] for r in rows], self.seq_len, [batch["input_lens"][r] for r in rows]
        )

    def _rollout_routes(self, table, micro_batch):
        """``(route, plain-replay route)`` ``[T, L, K]`` of a micro-batch, as at rollout."""
        if table is None:
            return None, None
        return (
            self.path.targets(table, micro_batch),
            self.path.targets(table, micro_batch, plain=True),
        )

    def _mini_step(
        self, step, mini_step, rows, batch, sample_ids, advantages, old_logp, replay_table, table
    ) -> dict:
        from pr2_megatron.rl.grpo import ppo_loss
        from pr2_megatron.runtime.parallel import average_gradients

        cfg = self.cfg
        mode = cfg.replay.mode
        train_predictor = mode == "pr2" and mini_step >= 2
        routing = None
        if self.controller is not None:
            # Each forward's routes are reduced as soon as it has run, then released.
            routing = _MiniStepRouting(self.controller.layer_numbers, live_routing=mode == "none")
        if mode != "none":
            self.controller.replay(
                train_predictor=train_predictor, collect_metrics=True, on_forward=routing
            )
        elif self.controller is not None:
            self.controller.record(on_forward=routing)
        mask = batch["mask"][rows]
        tokens = self._global_sum(mask.sum())
        self.optimizer.zero_grad(set_to_none=True)
        logp_all, ratio_all = [], []
        micro_rows = self._train_micro_batches(rows)
        micro_batches = [self._micro_batch(m, batch, sample_ids) for m in micro_rows]
        self.diagnostics.begin_mini_step(mini_step)  # hook(effect)
        for mrows, micro_batch in zip(micro_rows, micro_batches):
            # The rollout's routes of this micro-batch only (targets and metrics share them).
            rollout_route, rollout_plain = self._rollout_routes(table, micro_batch)
            if routing is not None:
                routing.expect(self._token_rows(batch["mask"][mrows]), rollout_route, rollout_plain)
            if mode != "none":
                targets = rollout_route
                if replay_table is not table:  # r2: the routes of the old-log-prob pass
                    targets = self.path.targets(replay_table, micro_batch)
                self.controller.set_targets(targets, rollout_plain)
                self.path.name_tokens(micro_batch)  # the predictor's tokens (train_predictor)
            ids, labels = batch["ids"][mrows], batch["labels"][mrows]
            logp = self.token_logprobs(ids, labels, cfg.rollout.temperature)
            loss, ratio = ppo_loss(
                logp,
                old_logp[mrows],
                advantages[mrows].unsqueeze(-1),
                batch["mask"][mrows],
                cfg.grpo.eps_low,
                cfg.grpo.eps_high,
            )
            (loss / tokens * self.dp_size).backward()
            logp_all.append(logp.detach())
            ratio_all.append(ratio.detach())
        self.diagnostics.end_mini_step()  # hook(effect)
        if self.controller is not None:
            self.controller.finish()
        average_gradients(self.model)
        grad_norm = self._clip_gradients()
        self.optimizer.step()

        record = {"event": "mini_step", "step": step, "mini_step": mini_step, "mode": mode}
        if routing is not None:
            record.update(routing.summary(self._routing_groups()))
        record.update(
            self._logprob_metrics(
                torch.cat(logp_all),
                torch.cat(ratio_all),
                batch["rollout_logp"][rows],
                advantages[rows],
                mask,
            )
        )
        record["ppo/grad_norm"] = grad_norm
        if train_predictor:
            predictor = self.controller.metrics()
            for key, value in predictor.items():
                if key.startswith("predictor/"):
                    record[key] = self._dp_mean(value)
        return record

    def _routing_groups(self) -> list:
        """Groups the routing agreement is summed over: DP, and TP under sequence parallelism."""
        groups = [self.ps.get_data_parallel_group()]
        if self.cfg.parallel.sequence_parallel and self.tp_size > 1:
            groups.append(self.ps.get_tensor_model_parallel_group())
        return groups

    def _token_rows(self, mask_BS: torch.Tensor) -> torch.Tensor:
        """Indices of response tokens among the forward's rows (``[S, B]`` order, SP chunk)."""
        return torch.nonzero(self.path.local_rows(mask_BS.T).reshape(-1) > 0).squeeze(-1)

    def _dp_mean(self, value: float) -> float:
        tensor = torch.tensor([float(value)])
        dist.all_reduce(tensor, group=self.ps.get_data_parallel_group())
        return float(tensor) / self.dp_size

    def _logprob_metrics(self, logp, ratio, rollout_logp, advantages, mask) -> dict:
        from pr2_megatron.metrics import logprob_mismatch_metrics, ppo_clip_fraction

        logp, ratio = self._gather_dp(logp), self._gather_dp(ratio)
        rollout_logp, mask = self._gather_dp(rollout_logp), self._gather_dp(mask)
        advantages = self._gather_dp(advantages.unsqueeze(-1)).expand_as(ratio)
        out = _prefixed("logprob/", logprob_mismatch_metrics(logp, rollout_logp, mask))
        out["ppo/clip_fraction"] = ppo_clip_fraction(
            ratio, advantages, mask, self.cfg.grpo.eps_low, self.cfg.grpo.eps_high
        )
        selected = mask > 0
        out["ppo/ratio_mean"] = float(ratio[selected].mean()) if selected.any() else 1.0
        out["ppo/ratio_max_abs_dev"] = (
            float((ratio[selected] - 1).abs().max()) if selected.any() else 0.0
        )
        return out

    def _rollout_record(self, step, rewards, batch, rollout_metrics) -> dict:
        all_rewards = self._gather_dp(rewards.float())
        lengths = self._gather_dp(batch["response_lens"].float())
        record = {
            "event": "rollout",
            "step": step,
            "mode": self.cfg.replay.mode,
            "reward/mean": float(all_rewards.mean()),
            "reward/accuracy": float((all_rewards > 0.5).float().mean()),
            "response/length": float(lengths.mean()),
        }
        for key, value in rollout_metrics.items():
            record[key] = self._dp_mean(value)
        record.update(self.gpu_monitor.sample())
        return record

    # ---------------------------------------------------------------------------------- run
    def stop_requested(self) -> bool:
        """Whether any rank got SIGTERM/SIGUSR1 (collective: every rank must call it)."""
        stop = torch.tensor([1.0 if self.stop.raised else 0.0])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        return bool(stop.item())

    def run(self) -> int:
        """Resume if possible, warm start, RL steps; returns the process exit code.

        A signal during the warm start stops it at the next check (every 10 iterations) and
        saves a step-0 checkpoint without the warm start: a resumed run warm-starts again.
        """
        self.maybe_resume()
        self.warm_start()
        ckpt = self.cfg.checkpoint
        stop = self.warm_started is False and self.stop_requested()
        while self.step < self.cfg.steps and not stop:
            self.rl_step()
            stop = self.stop_requested()
            due = ckpt.dir and ckpt.interval and self.step % ckpt.interval == 0
            if ckpt.dir and (due or stop or self.step == self.cfg.steps):
                self.save()
        if stop and not self.warm_started and ckpt.dir:
            self.save()
        if stop and self.rank0:
            if ckpt.dir:
                (Path(ckpt.dir) / STOPPED_BY_SIGNAL).write_text(f"{self.step}\n")
            print(f"pr2-train: stopping on signal after step {self.step}", flush=True)
        elif not stop and self.rank0 and ckpt.dir:
            (Path(ckpt.dir) / STOPPED_BY_SIGNAL).unlink(missing_ok=True)
        self.log.close()
        return 0


class _MiniStepRouting:
    """Routing agreement of a mini-step's forwards, reduced forward by forward.

    Before each forward the trainer queues (:meth:`expect`) the forward's response-token rows
    (``[S, B]`` order, SP chunk) and its rollout routes; the controller calls this object with
    the forward's routes as soon as the forward has run (``on_forward``), they are added to two
    accumulators and dropped with the rollout routes: one forward's routes are held at a time.

    ``routing/``: the route the tokens were sampled and trained with (live routing: the
    rollout's; else the replayed one) against the live router, the plain-replay route beside
    it; ``rollout_vs_train/``: the rollout's route against the one trained with.
    """

    def __init__(self, layer_numbers: list[int], live_routing: bool) -> None:
        from pr2_megatron.metrics import RoutingAgreement

        self.layers = list(layer_numbers)
        self.live_routing = live_routing
        self.sampled_with = RoutingAgreement(self.layers)
        self.trained_with = RoutingAgreement(self.layers)
        self._expected: collections.deque = collections.deque()

    def expect(self, rows, route_TLK, plain_TLK) -> None:
        """The next forward's token rows and rollout routes ``[T, L, K]`` (plain: or None)."""
        self._expected.append((rows, route_TLK, plain_TLK))

    def __call__(self, forward: dict) -> None:
        """Add one forward's routes (``RoutingController`` ``on_forward``)."""
        from pr2_megatron.errors import RouteError

        if not self._expected:
            raise RouteError("a training forward ran that the trainer did not queue metrics for")
        rows, route, plain = self._expected.popleft()
        device = forward["live"].device
        route = route.to(device)
        plain = None if plain is None else plain.to(device)
        sampled = route if self.live_routing else forward["replayed"]
        self.sampled_with.add_forward(
            {"replayed": sampled, "live": forward["live"], "plain": plain}, self.layers, rows
        )
        self.trained_with.add_forward(
            {"replayed": route, "live": forward["replayed"]}, self.layers, rows
        )

    def summary(self, groups) -> dict:
        """All-reduce over each of ``groups`` in turn and return the prefixed metrics."""
        from pr2_megatron.errors import RouteError

        if self._expected:
            raise RouteError(f"{len(self._expected)} training forward(s) never reported routes")
        for group in groups:
            self.sampled_with.reduce_(group)
            self.trained_with.reduce_(group)
        return {
            **_prefixed("routing/", self.sampled_with.summary()),
            **_prefixed("rollout_vs_train/", self.trained_with.summary()),
        }


def _prefixed(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}{key}": value for key, value in metrics.items()}


def _check_token_ids(tokens: torch.Tensor, vocab_size: int, what: str) -> None:
    """ValueError naming the first token id outside ``[0, vocab_size)``, its row and position.

    Without it a bad id fails deep inside the embedding or the log-prob gather with a bare
    "index out of range" on CPU, and with a device-side assert that names nothing on GPU.
    """
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bool(bad.any()):
        row, position = (int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(
            f"{what} token id {int(tokens[row, position])} at sample row {row}, position "
            f"{position} is outside the vocabulary [0, {vocab_size}) (model.vocab_size)"
        )


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _per_rank_samples(cfg: TrainConfig, dp_size: int) -> int:
    rollout = cfg.rollout
    if rollout.prompts_per_step % dp_size:
        raise ConfigError(
            f"rollout.prompts_per_step={rollout.prompts_per_step} is not divisible by the "
            f"data-parallel size {dp_size}"
        )
    per_rank = rollout.prompts_per_step // dp_size * rollout.group_size
    if per_rank % cfg.replay.off_n:
        raise ConfigError(
            f"each data-parallel rank holds {per_rank} responses, not divisible by "
            f"replay.off_n={cfg.replay.off_n} mini-batches"
        )
    return per_rank


def _check_supported_layout(cfg: TrainConfig) -> None:
    parallel = cfg.parallel
    if parallel.pipeline_model_parallel_size > 1 or parallel.context_parallel_size > 1:
        raise ConfigError(
            "pr2-train runs TP/SP/EP/DP layouts; pipeline_model_parallel_size="
            f"{parallel.pipeline_model_parallel_size} and context_parallel_size="
            f"{parallel.context_parallel_size} are supported by the route path "
            "(pr2_megatron.routes.gather) but not by this trainer's loop yet"
        )


def _concat_rollout(micro) -> dict:
    """One dict of ``[N, ...]`` tensors from the rollout micro-batches."""
    tokens = torch.cat([m.tokens for m in micro])
    prompt_lens = torch.cat([m.prompt_lens for m in micro])
    total_lens = torch.cat([m.total_lens for m in micro])
    seq = tokens.shape[1] - 1
    return {
        "ids": tokens[:, :seq],
        "labels": tokens[:, 1:],
        "mask": torch.cat([m.loss_mask() for m in micro]),
        "rollout_logp": torch.cat([m.logprobs for m in micro]),
        "input_lens": (total_lens - 1).tolist(),
        "response_lens": total_lens - prompt_lens,
        "responses": [r for m in micro for r in m.responses()],
    }


def main(argv=None) -> int:
    """Console entry point ``pr2-train``."""
    parser = argparse.ArgumentParser(description="GRPO with none / r2 / r3 / pr2 routing replay")
    parser.add_argument("--config", default=None, help="YAML config (see docs/config.md)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. replay.off_n=8")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"pr2-train: {error}", file=sys.stderr)
        return 2
    from pr2_megatron.runtime.parallel import destroy_parallel

    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        destroy_parallel()


if __name__ == "__main__":
    sys.exit(main())
