"""Reliability: faults under torchrun, silent-failure classes the peers hit, bad input, determinism.

* Faults (slow, real torchrun): a rank SIGKILLed mid-step under ``--max-restarts=1`` restarts,
  resumes from the last checkpoint and ends with the very metrics of an uninterrupted run;
  SIGTERM to ``launch/train.sh`` checkpoints and exits 0, and the resumed run again matches.
* Silent failures (docs/design.md, "Bugs the peers hit"): a second model built in the same process,
  routers sharing a layer number (MTP), dense first layers shifting the MoE layer mapping, replay
  targets never consumed, a replay forward without a target -- each an error or correct, never a
  replay that silently does nothing or goes to the wrong layer.
* Bad input: parallel sizes for the world size, token ids outside the vocabulary, batch sizes
  that do not divide, empty batches, route tables that do not fit the micro-batch.
* Determinism: same seed and config, bitwise-identical routes, losses, gradients and metrics.
"""

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch

from pr2_megatron.errors import RouteError
from pr2_megatron.models.builder import MoEModelConfig
from pr2_megatron.rl.config import ConfigError, load_config
from pr2_megatron.routes.table import RouteTable
from pr2_megatron.routing.controller import RoutingController
from pr2_megatron.routing.router import PR2Router, RoutingPhase
from pr2_megatron.runtime.parallel import ParallelConfig
from pr2_megatron.testing.moe import TinySetup, build, lm_loss, randomize_predictors, token_batch

REPO = Path(__file__).resolve().parents[1]
FAULT_TRAIN = REPO / "tests" / "fault_train.py"
TRAIN_SH = REPO / "launch" / "train.sh"
# 2 ranks (EP=2), 3 RL steps of 8 responses per rank: about a second per step on 2 CPU cores.
# 30 warm-start steps, so that some responses earn reward and the policy gradient is not zero.
TINY = [
    "steps=3",
    "model.num_layers=2",
    "warm_start.steps=30",
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "replay.off_n=2",
    "logging.tensorboard=false",
    "checkpoint.interval=1",
]
# In one process (world size 1): EP=1 and a small batch.
IN_PROCESS = [
    "parallel.expert_model_parallel_size=1",
    "model.num_layers=2",
    "warm_start.steps=0",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "rollout.micro_batch_size=4",
    "grpo.micro_batch_size=1",
    "replay.off_n=2",
    "logging.tensorboard=false",
]


# ================================================================ faults under torchrun (slow)
def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PR2_TEST_"))}
    for key in ("CONFIG", "NPROC", "TRAIN_MODULE", "DRY_RUN"):
        env.pop(key, None)
    env.update(TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    # The launchers run this interpreter (its megatron-core), as the in-process reference does.
    env["PYTHON"] = sys.executable
    # torch 2.13's torchrun shares its rendezvous TCPStore with the workers by default; after a
    # restart the new workers read the dead workers' gloo addresses from it and hang for the
    # 30-minute store timeout (pytorch/pytorch#135712). Every --max-restarts launch needs this.
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    env.update(extra)
    return env


def _kill_tree(pid):
    """SIGKILL a process and its descendants (torchrun's workers run in their own sessions)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    for child in children.split():
        _kill_tree(int(child))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait(proc, timeout, log_path):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        proc.wait()
        pytest.fail(f"no exit within {timeout} s:\n{Path(log_path).read_text()[-4000:]}")


def _torchrun(run_dir, overrides=(), max_restarts=0, timeout=420, **env):
    """Run tests/fault_train.py on 2 ranks; return (exit code, log text)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "torchrun.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += [f"--max-restarts={max_restarts}", str(FAULT_TRAIN), "--config", "configs/tiny.yaml"]
    cmd += [*TINY, f"logging.dir={run_dir}", f"checkpoint.dir={run_dir / 'ck'}", *overrides]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=_env(**env), stdout=log, stderr=subprocess.STDOUT
        )
        code = _wait(proc, timeout, log_path)
    return code, log_path.read_text()


def _records(run_dir, max_step=None):
    """metrics.jsonl without wall-clock fields (``time/...``), optionally up to ``max_step``."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = {k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
        if max_step is None or record["step"] <= max_step:
            out.append(record)
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: 3 RL steps on 2 ranks, nothing goes wrong."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    code, log = _torchrun(run_dir)
    assert code == 0, log[-4000:]
    records = _records(run_dir)
    rollouts = [r for r in records if r["event"] == "rollout"]
    assert [r["step"] for r in rollouts] == [1, 2, 3]
    assert any(r["reward/mean"] > 0 for r in rollouts)  # real policy gradients, not only zeros
    return records


@pytest.mark.slow
def test_rank_killed_mid_step_restarts_resumes_and_loses_nothing(tmp_path, uninterrupted):
    mark = tmp_path / "killed"
    code, log = _torchrun(
        tmp_path / "run",
        max_restarts=1,
        PR2_TEST_KILL="1:2:2",  # rank 1, RL step 2, mini-step 2 (mini-step 1 already updated)
        PR2_TEST_KILL_MARK=str(mark),
    )
    assert code == 0, log[-4000:]
    assert mark.read_text().startswith("rank 1 killed at step 2 mini-step 2")
    assert "exitcode: -9" in log  # torchrun saw the SIGKILL ...
    assert "pr2-train: resumed from step 1" in log  # ... restarted, resumed from step 1
    # Step 2's records of the killed attempt were dropped and written again: the file reads as
    # one uninterrupted run, value for value.
    assert _records(tmp_path / "run") == uninterrupted
    assert (tmp_path / "run" / "ck" / "step_00000003" / "COMPLETE").is_file()


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_exits_0_and_resumes_exactly(tmp_path, uninterrupted):
    run_dir, ck = tmp_path / "run", tmp_path / "run" / "ck"
    args = [*TINY, "steps=100", f"logging.dir={run_dir}", f"checkpoint.dir={ck}"]
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            ["bash", str(TRAIN_SH), *args], cwd=REPO, env=_env(), stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        metrics = run_dir / "metrics.jsonl"
        # Signal handlers are installed before the first RL step: wait for its rollout record.
        while not (metrics.is_file() and '"event": "rollout"' in metrics.read_text()):
            if proc.poll() is not None or time.monotonic() > deadline:
                _kill_tree(proc.pid)
                pytest.fail(f"no RL step:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert _wait(proc, 240, log_path) == 0, log_path.read_text()[-4000:]
    out = log_path.read_text()
    assert "launch/train.sh: SIGTERM: passing it to the ranks" in out
    stopped = int((ck / "STOPPED_BY_SIGNAL").read_text())
    assert 1 <= stopped < 100
    assert (ck / f"step_{stopped:08d}" / "COMPLETE").is_file()
    # Resume with the same checkpoint directory up to step 3: the same metrics as a run that
    # was never stopped (steps after 3, if the stop came late, are not compared).
    with open(log_path, "a") as log:
        proc = subprocess.Popen(
            ["bash", str(TRAIN_SH), *args[:-2], "steps=3", f"logging.dir={run_dir}",
             f"checkpoint.dir={ck}"],
            cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        assert _wait(proc, 300, log_path) == 0, log_path.read_text()[-4000:]
    assert _records(run_dir, max_step=3) == uninterrupted


# ======================================================================= in-process trainer
def _trainer(tmp_path, *overrides):
    from pr2_megatron.rl.train import Trainer

    overrides = [*IN_PROCESS, f"logging.dir={tmp_path}", *overrides]
    return Trainer(load_config(REPO / "configs" / "tiny.yaml", overrides))


def _mini_steps(run_dir):
    return [r for r in _records(run_dir) if r["event"] == "mini_step"]


# ============================================================ silent-failure classes (peers)
def _routers(model):
    return [m for m in model.modules() if isinstance(m, PR2Router)]


def test_a_second_model_in_the_same_process_leaves_the_first_replaying(megatron_single):
    from megatron.core.transformer.moe.router_replay import RouterReplay

    registered = len(RouterReplay.global_router_replay_instances)
    setup = TinySetup(model=MoEModelConfig(num_layers=2))
    model_a = build(setup)
    ctl_a = RoutingController(model_a)
    model_b = build(setup)  # e.g. a reference model, or a rebuild after a failure
    ctl_b = RoutingController(model_b)
    # Each controller holds exactly its own model's routers; nothing went to Megatron's
    # process-global RouterReplay registry (where model B would orphan model A's entries).
    assert [id(r) for r in ctl_a.routers] == [id(r) for r in _routers(model_a)]
    assert [id(r) for r in ctl_b.routers] == [id(r) for r in _routers(model_b)]
    assert not {id(r) for r in ctl_a.routers} & {id(r) for r in ctl_b.routers}
    assert len(RouterReplay.global_router_replay_instances) == registered

    ids, labels = token_batch(2, 12, 64, seed=0)
    ctl_a.record()
    with torch.no_grad():
        lm_loss(model_a, ids, None)
    routes = ctl_a.collect_routes()[0]
    with torch.no_grad():  # move model A's routers: its live top-k is no longer the record
        for router in ctl_a.routers:
            router.weight.add_(torch.randn_like(router.weight) * 5)
    ctl_a.replay(collect_metrics=True)
    ctl_a.set_targets(routes)
    lm_loss(model_a, ids, labels).backward()
    ctl_a.finish()
    (forward,) = ctl_a.forward_routes()
    assert torch.equal(forward["replayed"], routes)  # model A replayed the record ...
    assert not torch.equal(forward["live"], routes)  # ... not what its routers now pick
    assert all(r.phase == RoutingPhase.OFF and r.pending_targets() == 0 for r in ctl_b.routers)

    # Driving the wrong model: targets queued on A, the forward runs B. Not silent.
    ctl_a.replay()
    ctl_a.set_targets(routes)
    with torch.no_grad():
        lm_loss(model_b, ids, None)
    with pytest.raises(RouteError, match="never consumed.*MoE layer 1: 1 target"):
        ctl_a.finish()
    # Routers of two models (or an MTP layer numbered like a decoder layer) under one
    # controller would share layer numbers: refused, not merged.
    with pytest.raises(ValueError, match="two PR2 routers share a layer number"):
        RoutingController([model_a, model_b])


def test_dense_first_layers_map_routes_by_global_layer_number(megatron_single, tmp_path):
    from pr2_megatron.routes import micro_batch_targets
    from pr2_megatron.routes.path import MicroBatch

    trainer = _trainer(tmp_path, "model.num_layers=3", "model.moe_layer_freq=[0,1,1]")
    ctl = trainer.controller
    assert ctl.layer_numbers == [2, 3]
    # End to end: rollout routes -> table -> replay in training, exactly the rollout's experts.
    trainer.rl_step()
    for record in _mini_steps(tmp_path):
        assert record["rollout_vs_train/zero_deviation_ratio"] == 1.0
        assert "rollout_vs_train/topk_overlap/replayed/layer_2" in record
        assert not any(key.endswith("/layer_1") for key in record)  # the dense layer
    # A table of other layers, e.g. one that counted the dense layer as MoE layer 1, has the
    # same shape [T, 2, k]: by position it would replay layer 1's routes in layer 2. Refused.
    gen = torch.Generator().manual_seed(0)
    per_sample = [torch.rand(n, 2, 8, generator=gen).argsort(-1)[..., :2] for n in (5, 4)]

    def table(layers):
        return RouteTable.from_samples(
            per_sample, sample_ids=[0, 1], layer_numbers=layers, num_experts=8, topk=2
        )

    batch = MicroBatch([0, 1], trainer.seq_len, [5, 4])
    targets = trainer.path.targets(table((2, 3)), batch)
    assert targets.shape == (trainer.seq_len * 2, 2, 2)
    assert torch.equal(targets[0::2][:5], per_sample[0].long())  # [S, B] order, sample 0
    with pytest.raises(ValueError, match=r"layer 3 is not covered .*covered: \[1, 2\]"):
        trainer.path.targets(table((1, 2)), batch)
    with pytest.raises(ValueError, match=r"layer 2 is not covered"):
        micro_batch_targets(
            table((3, 4)), [0, 1], trainer.seq_len, lengths=[5, 4], layer_numbers=[2, 3]
        )
    # Token counts that do not match the micro-batch: named, not padded or cut silently.
    with pytest.raises(
        ValueError, match="sample id 1: micro-batch has 3 tokens, route table has 4"
    ):
        trainer.path.targets(table((2, 3)), MicroBatch([0, 1], trainer.seq_len, [5, 3]))


def _logprobs(trainer, ids, labels, forward_only=True):
    """``[B, S]`` log-probs of one forward through the trainer's schedule (its only path)."""
    from pr2_megatron.rl.batches import SupervisedMicroBatch
    from pr2_megatron.rl.schedule import logprob_loss, run_schedule

    store = run_schedule(
        trainer.ddp,
        [SupervisedMicroBatch(ids, labels, torch.ones(ids.shape))],
        partial(logprob_loss, temperature=1.0, vocab_size=trainer.vocab),
        seq_len=trainer.seq_len,
        vocab_size=trainer.vocab,
        forward_only=forward_only,
    )
    return store[0]["logp"]


def test_a_skipped_training_forward_is_a_route_error_at_finish(
    megatron_single, tmp_path, monkeypatch
):
    from pr2_megatron.rl import steps

    trainer = _trainer(tmp_path)
    real = steps.run_schedule
    dropped = []

    def drops_the_second_replay_forward(chunks, micro_batches, *args, **kwargs):
        if trainer.controller.phase == RoutingPhase.REPLAY and not dropped:
            # e.g. a micro-batch lost by a data-loader bug: its targets stay queued
            dropped.append(micro_batches[1])
            micro_batches = [m for i, m in enumerate(micro_batches) if i != 1]
        return real(chunks, micro_batches, *args, **kwargs)

    monkeypatch.setattr(steps, "run_schedule", drops_the_second_replay_forward)
    with pytest.raises(RouteError, match=r"never consumed.*MoE layer 1: 1 target.*layer 2: 1"):
        trainer.rl_step()
    assert dropped


def test_a_replay_forward_without_a_target_is_a_route_error(megatron_single, tmp_path):
    trainer = _trainer(tmp_path, "replay.mode=r3")
    trainer.controller.set_targets = lambda *args, **kwargs: None  # targets never handed over
    with pytest.raises(RouteError, match="MoE layer 1: replay forward without a target"):
        trainer.rl_step()
    # In the training pass with gradients too (not only the no-grad old-log-prob pass).
    trainer.controller.replay(train_predictor=False)
    ids = torch.zeros(2, trainer.seq_len, dtype=torch.long)
    with pytest.raises(RouteError, match="replay forward without a target"):
        _logprobs(trainer, ids, ids, forward_only=False)


# ==================================================================================== bad input
def test_token_ids_outside_the_vocabulary_are_named(megatron_single, tmp_path):
    trainer = _trainer(tmp_path)
    trainer.controller.off()
    vocab = trainer.cfg.model.vocab_size
    ids = torch.randint(0, vocab, (3, trainer.seq_len), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    assert _logprobs(trainer, ids, labels).shape == ids.shape  # in range: fine
    bad = ids.clone()
    bad[1, 3] = vocab + 83
    message = rf"input token id {vocab + 83} at sample row 1, position 3 is outside the "
    with pytest.raises(ValueError, match=message + rf"vocabulary \[0, {vocab}\)"):
        _logprobs(trainer, bad, labels)
    bad_labels = labels.clone()
    bad_labels[2, 0] = -1
    message = r"label token id -1 at sample row 2, position 0 .*model.vocab_size"
    with pytest.raises(ValueError, match=message):
        _logprobs(trainer, ids, bad_labels)


def test_parallel_sizes_that_do_not_fit_the_world_size(megatron_single, tmp_path):
    cases = [
        (
            dict(tensor_model_parallel_size=2),
            3,
            "world size 3 is not divisible by TP×PP×CP = 2×1×1",
        ),
        (
            dict(expert_model_parallel_size=4),
            2,
            "world size 2 is not divisible by EP×ETP×PP = 4×1×1",
        ),
        (
            dict(pipeline_model_parallel_size=2, expert_model_parallel_size=2),
            2,
            "EP×ETP×PP = 2×1×2",
        ),
    ]
    for sizes, world, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            ParallelConfig(**sizes).check_world_size(world)
    assert ParallelConfig(tensor_model_parallel_size=2).check_world_size(4) == 2
    # The usual mistake: the 2-rank tiny config (EP=2) started as one process.
    from pr2_megatron.rl.train import Trainer

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"logging.dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"world size 1 is not divisible by EP×ETP×PP = 2×1×1"):
        Trainer(cfg)
    with pytest.raises(ConfigError, match="tensor_model_parallel_size must be >= 1, got 0"):
        load_config(None, ["parallel.tensor_model_parallel_size=0"])


def test_batch_sizes_that_do_not_divide_over_ranks_and_mini_steps():
    from pr2_megatron.rl.layout import check_layout

    cfg = load_config(
        None, ["rollout.prompts_per_step=4", "rollout.group_size=2", "replay.off_n=4"]
    )
    assert check_layout(cfg, 2) == 2
    message = "rollout.prompts_per_step=4 is not divisible by the data-parallel size 3"
    with pytest.raises(ConfigError, match=message):
        check_layout(cfg, 3)
    with pytest.raises(ConfigError, match=r"holds 2 responses .*not divisible by replay.off_n=4"):
        check_layout(cfg, 4)


@pytest.mark.parametrize(
    "override",
    [
        "rollout.prompts_per_step=0",
        "rollout.group_size=0",
        "rollout.micro_batch_size=0",
        "rollout.max_new_tokens=0",
        "grpo.micro_batch_size=0",
        "warm_start.batch_size=0",
        "warm_start.steps=-1",
        "steps=-1",
        "checkpoint.keep=-1",
        "checkpoint.interval=-1",
        "optim.lr=-0.001",
        "optim.beta2=1.0",
        "rollout.temperature=.nan",
        "grpo.eps_high=.inf",
    ],
)
def test_empty_or_nonsensical_sizes_are_config_errors_naming_key_and_value(override):
    key, value = override.split("=")
    shown = {".nan": "nan", ".inf": "inf"}.get(value, value)
    with pytest.raises(ConfigError, match=rf"{key}.*{shown}") as info:
        load_config(REPO / "configs" / "tiny.yaml", [override])
    assert "tiny.yaml" in str(info.value)  # where it came from


def test_a_size_of_zero_in_a_divisibility_check_is_a_config_error():
    with pytest.raises(ConfigError, match="invalid values in model"):
        load_config(None, ["model.num_attention_heads=0"])


# ================================================================================= determinism
def _routes_loss_grads(seed):
    setup = TinySetup(model=MoEModelConfig(num_layers=2), seed=seed)
    model = build(setup)
    randomize_predictors(model, scale=1.0, seed=seed)  # predicted routes differ from live ones
    ctl = RoutingController(model)
    ids, labels = token_batch(2, 16, 64, seed=seed)
    ctl.predict()
    with torch.no_grad():
        logits = lm_loss(model, ids, None)
    routes = ctl.collect_routes()[0]
    ctl.replay(train_predictor=False)
    ctl.set_targets(routes)
    loss = lm_loss(model, ids, labels)
    loss.backward()
    ctl.finish()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return routes, logits, loss.detach(), grads


def test_same_seed_gives_bitwise_identical_routes_losses_and_gradients(megatron_single):
    first, second, other = (_routes_loss_grads(s) for s in (11, 11, 12))
    routes, logits, loss, grads = first
    assert torch.equal(routes, second[0])
    assert torch.equal(logits, second[1])
    assert torch.equal(loss, second[2])  # bitwise, not close
    assert grads.keys() == second[3].keys() and len(grads) > 10
    for name, grad in grads.items():
        assert torch.equal(grad, second[3][name]), name
    assert not torch.equal(routes, other[0])  # the comparison can tell runs apart


def test_same_seed_gives_identical_trainer_metrics(megatron_single, tmp_path):
    def one_step(run_dir, *overrides):
        sizes = ["rollout.prompts_per_step=4", "rollout.group_size=4", "grpo.micro_batch_size=4"]
        trainer = _trainer(run_dir, "warm_start.steps=30", *sizes, *overrides)
        trainer.warm_start()
        trainer.rl_step()
        return _records(run_dir), trainer.model.state_dict()

    a, state_a = one_step(tmp_path / "a")
    b, state_b = one_step(tmp_path / "b")
    c, _ = one_step(tmp_path / "c", "seed=7")
    assert any(r.get("reward/mean", 0) > 0 for r in a)  # a non-zero policy gradient
    assert a == b  # rollout samples, rewards, routing, losses, grad norms
    for name, tensor in state_a.items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, state_b[name]), name
    assert a != c
