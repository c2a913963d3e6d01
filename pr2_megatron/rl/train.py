"""``pr2-train``: GRPO on a verifiable task with none / r2 / r3 / pr2 / pr2-actor routing replay.

Run under torchrun (``launch/train.sh`` does it: 2 CPU ranks, EP=2 by default)::

    torchrun --nproc-per-node 2 -m pr2_megatron.rl.train --config configs/tiny.yaml replay.mode=pr2

One RL step (:meth:`Trainer.rl_step`; what the routers do in each pass is one row of the mode
table, :mod:`pr2_megatron.rl.modes`):

1. **Rollout** with the Megatron model itself (``rollout.dtype`` numerics): every data-parallel
   rank samples ``group_size`` responses to its share of the step's prompts (each sample from
   its own generator: the same tokens in any layout). The routers record the rollout's routes
   (``pr2``: the *predicted* routes, with the live top-k beside them; the feature cache keeps
   router inputs and logits); one route table for the whole batch is gathered
   (:class:`~pr2_megatron.routes.RoutePath`).
2. **GRPO**: group-normalised advantages of the rewards.
3. **Old log-probs** at θ_old in training numerics: none routes live, r2 records its routes,
   r3/pr2 replay the rollout table, pr2-actor predicts (and records) here.
4. **Off-N mini-steps**: mini-batch j holds every ``off_n``-th sample; one optimizer step each
   (PPO clipped loss) through Megatron's schedule, DDP, optimizer and clipping, replaying the
   mode's table; the predictors train from mini-step 2 on (their loss rides the same backward).
5. **Metrics** per mini-step (routing agreement overall and per layer, log-prob mismatch, clip
   fraction, predictor, router drift) to ``metrics.jsonl`` and TensorBoard, and a progress line.

Checkpoints (``checkpoint.dir``) are Megatron distributed checkpoints, atomic, resumable in
another layout (:mod:`pr2_megatron.rl.resume`); SIGTERM or SIGUSR1 makes every rank finish the
step, save, write ``STOPPED_BY_SIGNAL`` and exit 0. Layout errors are config errors, raised
before any process group exists (exit 2).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from pr2_megatron.rl.config import ConfigError, TrainConfig, dump_yaml, load_config

STOPPED_BY_SIGNAL = "STOPPED_BY_SIGNAL"


def sequence_length(cfg: TrainConfig, task, warm_task) -> int:
    """Training forward length, a multiple of TP (SP) × 2·CP; ConfigError when it cannot fit.

    The longest sequence of ``task`` (prompt + ``rollout.max_new_tokens``, prompt + answer)
    and, when the warm start runs, of ``warm_task`` (prompt + answer): a warm start on a longer
    task than RL's gets whole sequences too. ``model.max_sequence_length`` must hold it and
    ``model.vocab_size`` both tasks' vocabularies.
    """
    parallel = cfg.parallel
    multiple = 2 * parallel.context_parallel_size if parallel.context_parallel_size > 1 else 1
    if parallel.sequence_parallel:
        multiple *= parallel.tensor_model_parallel_size
    tasks = [task]
    if cfg.warm_start.steps and warm_task is not task:
        tasks.append(warm_task)
    longest = max(
        task.max_prompt_len + cfg.rollout.max_new_tokens - 1,
        *(t.max_prompt_len + t.max_answer_len - 1 for t in tasks),
    )
    seq_len = -(-longest // multiple) * multiple
    whose = "the task's" if len(tasks) == 1 else "the task's and the warm-start task's"
    if cfg.model.max_sequence_length < seq_len:
        raise ConfigError(
            f"model.max_sequence_length={cfg.model.max_sequence_length} is shorter than "
            f"{whose} sequences ({seq_len} tokens)"
        )
    vocab = max(t.vocab_size for t in tasks)
    if cfg.model.vocab_size < vocab:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than {whose} {vocab}"
        )
    return seq_len


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

        from pr2_megatron.rl.data import build_task, build_warm_start_task
        from pr2_megatron.rl.layout import check_layout
        from pr2_megatron.rl.modes import replay_mode
        from pr2_megatron.rl.resume import TrainerCheckpoint
        from pr2_megatron.rl.run_log import RunLog
        from pr2_megatron.rl.step_metrics import RouterDrift
        from pr2_megatron.runtime.parallel import initialize_parallel

        self.cfg = cfg
        self.mode = replay_mode(cfg.replay.mode, cfg.replay.predict_at)
        check_layout(cfg)  # ConfigError before any process group exists
        # Handlers first: a signal while the model is being built must not kill the rank.
        self.stop = _StopFlag()
        self.stop.install()
        self.device = initialize_parallel(cfg.parallel, seed=cfg.seed)
        self.ps = parallel_state
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.rank0 = dist.get_rank() == 0
        self.task = build_task(cfg)  # digit task, or task.dataset with its tokenizer
        self.warm_task = build_warm_start_task(cfg, self.task)  # warm_start.task, or self.task
        self.seq_len = sequence_length(cfg, self.task, self.warm_task)
        self.vocab = cfg.model.vocab_size
        self.per_rank = cfg.rollout.prompts_per_step // self.dp_size * cfg.rollout.group_size
        self.moe_layer_numbers = cfg.model.moe_layer_numbers()
        self.scheduled_rollout = (
            cfg.parallel.pipeline_model_parallel_size > 1 or cfg.parallel.context_parallel_size > 1
        )
        self._build_model()
        self.step = 0
        self.warm_started = False
        self.drift = RouterDrift()
        self.checkpoint = TrainerCheckpoint(self)
        self.log = RunLog(cfg.logging.dir, enabled=self.rank0, tensorboard=cfg.logging.tensorboard)
        from pr2_megatron.rl.diagnostics import StepDiagnostics  # hook(effect)

        self.diagnostics = StepDiagnostics(  # hook(effect): predictability diagnostic
            cfg, self.controller, self.log, rank0=self.rank0, groups=self.routing_groups()
        )
        self._start_monitoring()

    @property
    def model(self):
        """The rank's model (its first chunk under VPP: see :attr:`chunks`)."""
        return self.chunks[0]

    # ------------------------------------------------------------------------- setup pieces
    def _build_model(self) -> None:
        """Model chunks (one per VPP stage), their DDP wrappers, controller, path, optimizer."""
        from megatron.core.transformer.moe.router import Router

        from pr2_megatron.models.builder import build_gpt_moe
        from pr2_megatron.rl.init import initialize_layout_free
        from pr2_megatron.rl.optim import wrap_ddp
        from pr2_megatron.routing.controller import RoutingController

        cfg = self.cfg
        kwargs = {"probmoe": cfg.router.probmoe} if cfg.router.kind == "probmoe" else {}
        vpp = cfg.parallel.virtual_pipeline_model_parallel_size
        stages = [None] if vpp is None else list(range(vpp))
        self.chunks = [
            build_gpt_moe(
                cfg.model, cfg.parallel, cfg.router.pr2, router=cfg.router.kind, vp_stage=stage,
                **kwargs,
            )
            for stage in stages
        ]  # fmt: skip
        initialize_layout_free(self.chunks, cfg.seed)  # the same weights in every layout
        if cfg.model.hf_checkpoint:  # pretrained weights (models/hf: checked, read per rank)
            from pr2_megatron.models.hf import load_hf_checkpoint

            load_hf_checkpoint(self.chunks, cfg.model, cfg.model.hf_checkpoint)
        self.routers = [m for c in self.chunks for m in c.modules() if isinstance(m, Router)]
        self.ddp = wrap_ddp(self.chunks, cfg.optim.distributed_optimizer)
        # Megatron's stock router (router.kind=topk, replay.mode=none) has nothing to control.
        self.controller = None
        self.path = None
        if cfg.router.kind != "topk":
            from pr2_megatron.routes.path import RoutePath

            pipeline = cfg.parallel.pipeline_model_parallel_size > 1
            self.controller = RoutingController(self.chunks, allow_empty=pipeline)
            self.path = RoutePath(self.controller)
        self.optimizer = self._optimizer(cfg.optim.lr, cfg.steps * cfg.replay.off_n)

    def _optimizer(self, lr: float, total_steps: int):
        from pr2_megatron.rl.optim import Optimizer

        optim = self.cfg.optim
        return Optimizer(
            self.ddp,
            lr=lr,
            weight_decay=optim.weight_decay,
            betas=(optim.beta1, optim.beta2),
            grad_clip=optim.grad_clip,
            distributed=optim.distributed_optimizer,
            total_steps=total_steps,
        )

    def _start_monitoring(self) -> None:
        from pr2_megatron.runtime.gpu import GPUMonitor, detect_gpu_stack

        cfg = self.cfg
        self.gpu_monitor = GPUMonitor(enabled=cfg.logging.gpu_monitor and torch.cuda.is_available())
        if self.rank0:
            (Path(cfg.logging.dir) / "config.yaml").write_text(dump_yaml(cfg))
            print(f"pr2-train: {detect_gpu_stack().describe()}", flush=True)
            if cfg.logging.gpu_monitor and not torch.cuda.is_available():
                print("pr2-train: GPU monitoring off (no CUDA device)", flush=True)

    def seeded(self, purpose: int, step: int, index: int = 0) -> torch.Generator:
        """Data / sampling RNG: a pure function of (seed, purpose, step, global index)."""
        seed = (self.cfg.seed * 1_000_003 + purpose * 7_919 + step) * 4_099 + index
        return torch.Generator().manual_seed(seed % (2**63))

    def share_of(self, items: list) -> list:
        """The data-parallel rank's contiguous share of a global list."""
        per = len(items) // self.dp_size
        return items[self.dp_rank * per : (self.dp_rank + 1) * per]

    # ------------------------------------------------------------------ collectives helpers
    def routing_groups(self) -> list:
        """Groups routing agreement is summed over: DP, TP under SP, CP (a stage's ranks)."""
        ps = self.ps
        groups = [ps.get_data_parallel_group()]
        if self.cfg.parallel.sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1:
            groups.append(ps.get_tensor_model_parallel_group())
        if ps.get_context_parallel_world_size() > 1:
            groups.append(ps.get_context_parallel_group())
        return groups

    def last_stage_rows(self, store: list, key: str, rows: int) -> torch.Tensor:
        """``[rows, S]`` of the schedule's per-forward outputs ``key``, on every stage."""
        from pr2_megatron.rl.schedule import SequenceSlicer, from_last_stage

        full = None
        if self.ps.is_pipeline_last_stage(ignore_virtual=True):
            slicer = SequenceSlicer(self.seq_len)
            full = torch.cat([slicer.full(out[key]) for out in store]).float()
        return from_last_stage(full, (rows, self.seq_len), torch.float32, self.device)

    def global_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of a scalar over the data-parallel ranks (at least 1)."""
        total = value.detach().clone().float().to(self.device)
        dist.all_reduce(total, group=self.ps.get_data_parallel_group())
        return total.clamp(min=1.0)

    def stop_requested(self) -> bool:
        """Whether any rank got SIGTERM/SIGUSR1 (collective: every rank must call it)."""
        stop = torch.tensor([1.0 if self.stop.raised else 0.0], device=self.device)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        return bool(stop.item())

    # ---------------------------------------------------------------------------- warm start
    def warm_start(self) -> None:
        """Supervised steps on correct answers (router live, nothing recorded)."""
        warm = self.cfg.warm_start
        if self.warm_started or warm.steps == 0:
            self.warm_started = True
            return
        optimizer = self._optimizer(warm.lr, warm.steps)
        if self.controller is not None:
            self.controller.off()
        from pr2_megatron.rl.drivers import set_router_loss_coeffs  # hook(effect)

        rl_coeffs = set_router_loss_coeffs(  # hook(effect)
            self.chunks, aux_loss_coeff=warm.aux_loss_coeff, z_loss_coeff=warm.z_loss_coeff
        )
        try:
            self._warm_start_steps(optimizer)
        finally:  # hook(effect): RL's router-loss coefficients, also after a signal
            set_router_loss_coeffs(self.chunks, **rl_coeffs)

    def _warm_start_steps(self, optimizer) -> None:
        from pr2_megatron.rl.batches import SupervisedMicroBatch, split_rows
        from pr2_megatron.rl.layout import micro_size
        from pr2_megatron.rl.schedule import run_schedule, sft_loss_fn

        warm = self.cfg.warm_start
        start = time.time()
        for i in range(warm.steps):
            if i % 10 == 9 and self.stop_requested():
                if self.rank0:
                    print(f"pr2-train: signal during warm start (iteration {i})", flush=True)
                return
            problems = self.share_of(self.warm_task.sample(warm.batch_size, self.seeded(1, i)))
            ids, labels, mask = (
                t.to(self.device) for t in self.warm_task.supervised_batch(problems, self.seq_len)
            )
            pieces = split_rows(range(len(problems)), micro_size(self.cfg, len(problems)))
            micro = [SupervisedMicroBatch(ids[r], labels[r], mask[r]) for r in pieces]
            count = self.global_sum(mask.sum())
            scale = self.dp_size * len(micro) / float(count)
            optimizer.zero_grad()
            store = run_schedule(
                self.ddp,
                micro,
                partial(sft_loss_fn, vocab_size=self.vocab, scale=scale),
                seq_len=self.seq_len,
                vocab_size=self.vocab,
                forward_only=False,
            )
            optimizer.step()
            if (i + 1) % max(1, warm.steps // 5) == 0:
                self._log_warm_start(i + 1, store, count)
        self.optimizer.reload_model_params()  # the RL optimizer's main params: warm weights
        self.warm_started = True
        if self.rank0:
            print(f"warm start done in {time.time() - start:.1f}s", flush=True)

    def _log_warm_start(self, iteration: int, store: list, count: torch.Tensor) -> None:
        from pr2_megatron.rl.schedule import from_last_stage

        nll = torch.zeros(1, device=self.device)
        if store:
            nll += sum(out["nll"] for out in store)
        nll = from_last_stage(nll, (1,), torch.float32, self.device)
        groups = [self.ps.get_data_parallel_group()]
        if self.ps.get_context_parallel_world_size() > 1:
            groups.append(self.ps.get_context_parallel_group())
        for group in groups:
            dist.all_reduce(nll, group=group)
        value = float(nll) / float(count)
        if self.rank0:
            steps = self.cfg.warm_start.steps
            print(f"warm start {iteration}/{steps}: answer NLL {value:.3f}", flush=True)
            self.log.write({"event": "warm_start", "step": 0, "iter": iteration, "nll": value})

    # ------------------------------------------------------------------------------ RL step
    def rl_step(self) -> None:
        """One rollout batch and its off-N mini-steps (the numbered steps of the docstring)."""
        from pr2_megatron.rl import steps
        from pr2_megatron.rl.grpo import group_advantages

        cfg, step = self.cfg, self.step + 1
        start = time.time()
        before = self.drift.snapshot(self.routers)
        problems = self.share_of(
            self.task.sample(cfg.rollout.prompts_per_step, self.seeded(2, step))
        )
        if self.controller is not None and self.mode.predicts_in is not None:
            self.controller.set_rollout_id(step)  # hook(effect): stabiliser schedule
        # 1. Rollout (rollout numerics), routes captured and gathered into one table.
        rollout = steps.rollout(self, step, problems)
        # 2. GRPO advantages.
        advantages = group_advantages(
            rollout.rewards_N, cfg.rollout.group_size, cfg.grpo.advantage_eps
        )
        # 3. Old log-probs at θ_old in training numerics (r2 / pr2-actor: a route table).
        old = steps.old_logprobs(self, rollout)
        rollout_record = self._rollout_record(step, rollout, old)
        self.log.write(rollout_record, tb_step=step)
        # 4. Off-N mini-steps.
        records = [
            steps.mini_step(self, step, index, rollout, advantages, old)
            for index in range(1, cfg.replay.off_n + 1)
        ]
        self.diagnostics.end_step(  # hook(effect)
            step, rollout.batch.mask_NS.cpu(), rollout.batch.sample_ids
        )
        # 5. Metrics.
        records[-1].update(self.drift.measure(self.routers, before, self.device))
        records[-1]["time/step_seconds"] = time.time() - start
        for index, record in enumerate(records, start=1):
            self.log.write(record, tb_step=(step - 1) * cfg.replay.off_n + index)
        self.step = step
        if self.rank0:
            from pr2_megatron.rl.run_log import progress_line

            elapsed = time.time() - start
            print(progress_line(step, cfg.steps, rollout_record, records[-1], elapsed), flush=True)

    def _rollout_record(self, step: int, rollout, old) -> dict:
        from pr2_megatron.rl.step_metrics import gather_dp

        all_rewards = gather_dp(rollout.rewards_N.float())
        lengths = gather_dp(rollout.batch.response_lens_N.float())
        record = {
            "event": "rollout",
            "step": step,
            "mode": self.mode.name,
            "reward/mean": float(all_rewards.mean()),
            "reward/accuracy": float((all_rewards > 0.5).float().mean()),
            "response/length": float(lengths.mean()),
        }
        record.update(rollout.metrics)
        record.update(old.metrics)
        record.update(self.gpu_monitor.sample())
        return record

    # ---------------------------------------------------------------------------------- run
    def maybe_resume(self) -> None:
        """Load the newest complete checkpoint of ``checkpoint.dir`` if resuming is on."""
        path = self.checkpoint.resume()
        if path is None:
            self.log.start_fresh()
            return
        self.log.truncate_after(self.step)
        if self.rank0:
            print(f"pr2-train: resumed from step {self.step} ({path})", flush=True)

    def save(self) -> None:
        """Checkpoint after the current step (collective)."""
        self.checkpoint.save()

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
            self.checkpoint.wait(blocking=False)
            stop = self.stop_requested()
            due = ckpt.dir and ckpt.interval and self.step % ckpt.interval == 0
            if ckpt.dir and (due or stop or self.step == self.cfg.steps):
                self.save()
        if stop and not self.warm_started and ckpt.dir:
            self.save()
        self.checkpoint.close()
        if stop and self.rank0:
            if ckpt.dir:
                (Path(ckpt.dir) / STOPPED_BY_SIGNAL).write_text(f"{self.step}\n")
            print(f"pr2-train: stopping on signal after step {self.step}", flush=True)
        elif not stop and self.rank0 and ckpt.dir:
            (Path(ckpt.dir) / STOPPED_BY_SIGNAL).unlink(missing_ok=True)
        if ckpt.export_hf and not stop:  # collective; rank 0 writes config.json last
            from pr2_megatron.models.hf import export_hf_checkpoint

            export_hf_checkpoint(
                self.chunks, self.cfg.model, ckpt.export_hf, self.cfg.model.hf_checkpoint
            )
        self.log.close()
        return 0


def main(argv=None) -> int:
    """Console entry point ``pr2-train``: exit 2 on a config or layout error."""
    from pr2_megatron.rl.layout import check_layout

    parser = argparse.ArgumentParser(description="GRPO with none / r2 / r3 / pr2 routing replay")
    parser.add_argument("--config", default=None, help="YAML config (see docs/config.md)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. replay.off_n=8")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_layout(cfg)  # before any process group exists
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
