"""launch/train.sh and slurm/pr2_train.sbatch: the command lines they build (dry runs, fake Slurm
environment, no Slurm needed), their #SBATCH header, shellcheck, and a local signal stop/resume."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN_SH = REPO / "launch" / "train.sh"
SBATCH = REPO / "slurm" / "pr2_train.sbatch"
# Small enough for seconds per run on 2 CPU cores (2 ranks, EP=2, 4 responses per rank).
TINY = ["warm_start.steps=2", "rollout.prompts_per_step=2", "logging.tensorboard=false"]


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    for key in ("CONFIG", "NPROC", "NPROC_PER_NODE", "GPUS_PER_NODE", "OVERRIDES", "RUN_DIR",
                "CHECKPOINT_DIR", "RDZV_HOST", "RDZV_PORT", "CONTAINER_IMAGE", "CONTAINER_MOUNTS",
                "SETUP_CMD", "TRAIN_MODULE"):  # fmt: skip
        env.pop(key, None)
    env["PYTHON"] = sys.executable  # the launchers run this interpreter (its megatron-core)
    env.update(extra)
    return env


def _run(script, *args, cwd=REPO, **env):
    return subprocess.run(
        ["bash", str(script), *args], cwd=cwd, env=_clean_env(DRY_RUN="1", **env),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _sbatch_dry_run(*args, **env):
    fake = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    result = _run(SBATCH, *args, **{**fake, **env})
    assert result.returncode == 0, result.stderr
    lines = {}
    for line in result.stdout.splitlines():
        label, _, rest = line.partition(":")
        lines[label] = rest.strip() if label == "nodes" else shlex.split(rest)
    return lines


def _option(argv, name):
    """Value of ``--name=value`` (or ``--name value``) in argv; None when absent."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name:
            return argv[i + 1]
    return None


# --------------------------------------------------------------------------------- train.sh
def test_train_sh_dry_run_defaults():
    result = _run(TRAIN_SH)
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[1:3] == ["-m", "torch.distributed.run"]
    assert "--standalone" in argv and _option(argv, "--nproc-per-node") == "2"
    assert argv[-4:] == ["-m", "pr2_megatron.rl.train", "--config", "configs/tiny.yaml"]


def test_train_sh_dry_run_env_and_overrides():
    result = _run(TRAIN_SH, "steps=5", "logging.dir=/tmp/a b", NPROC="4", CONFIG="my.yaml")
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert _option(argv, "--nproc-per-node") == "4"
    assert argv[-5:] == [
        "pr2_megatron.rl.train",
        "--config",
        "my.yaml",
        "steps=5",
        "logging.dir=/tmp/a b",
    ]


# ------------------------------------------------------------------------------ sbatch script
def test_sbatch_dry_run_cpu_two_nodes():
    lines = _sbatch_dry_run("steps=3", "replay.mode=r3", OVERRIDES="seed=7 replay.off_n=2")
    assert lines["nodes"] == "gpu07 gpu08"
    srun, torchrun, trainer = lines["srun"], lines["torchrun"], lines["trainer"]
    assert srun[0] == "srun"
    assert _option(srun, "--nodes") == "2" and _option(srun, "--ntasks-per-node") == "1"
    assert not any(a.startswith(("--gpus", "--container")) for a in srun)
    # srun runs one torchrun per node (through bash, which makes it ignore SIGUSR1).
    node_cmd = srun[srun.index("bash") :]
    assert node_cmd[1] == "-c" and "trap '' USR1" in node_cmd[2]
    assert node_cmd[4:] == torchrun
    # torchrun: 2 nodes x 1 CPU rank, c10d rendezvous on the first node, named by the job id.
    assert _option(torchrun, "--nnodes") == "2"
    assert _option(torchrun, "--nproc-per-node") == "1"
    assert _option(torchrun, "--rdzv-backend") == "c10d"
    assert _option(torchrun, "--rdzv-endpoint") == f"gpu07:{20000 + 4242 % 10000}"
    assert _option(torchrun, "--rdzv-id") == "4242"
    assert torchrun[-len(trainer) + 1 :] == trainer[1:]
    # Trainer: config, run directories, then OVERRIDES, then the script's arguments (last wins).
    assert trainer[1:] == [
        "-m", "pr2_megatron.rl.train", "--config", "configs/tiny.yaml",
        "logging.dir=runs/pr2-train-4242", "checkpoint.dir=runs/pr2-train-4242/checkpoints",
        "seed=7", "replay.off_n=2", "steps=3", "replay.mode=r3",
    ]  # fmt: skip


def test_sbatch_dry_run_gpus_port_and_dirs():
    lines = _sbatch_dry_run(
        "checkpoint.dir=/ckpt/x",
        SLURM_GPUS_ON_NODE="8",
        SLURM_CPUS_ON_NODE="96",
        RDZV_PORT="31000",
        RUN_DIR="/runs/a",
        CONFIG="configs/models/olmoe.yaml",
    )
    srun, torchrun, trainer = lines["srun"], lines["torchrun"], lines["trainer"]
    assert _option(srun, "--gpus-per-node") == "8" and _option(srun, "--cpus-per-task") == "96"
    assert _option(torchrun, "--nproc-per-node") == "8"
    assert _option(torchrun, "--rdzv-endpoint") == "gpu07:31000"
    assert _option(trainer, "--config") == "configs/models/olmoe.yaml"
    assert "logging.dir=/runs/a" in trainer and trainer[-1] == "checkpoint.dir=/ckpt/x"
    assert _option(_sbatch_dry_run(NPROC_PER_NODE="4", GPUS_PER_NODE="8")["torchrun"],
                   "--nproc-per-node") == "4"  # fmt: skip


def test_sbatch_dry_run_container():
    image = "nvcr.io#nvidia/pytorch:25.01-py3"
    srun = _sbatch_dry_run(CONTAINER_IMAGE=image)["srun"]
    assert _option(srun, "--container-image") == image
    assert _option(srun, "--container-mounts") == f"{REPO}:{REPO}"
    assert _option(srun, "--container-workdir") == str(REPO)
    srun = _sbatch_dry_run(CONTAINER_IMAGE=image, CONTAINER_MOUNTS="/data:/data,/ckpt:/ckpt")[
        "srun"
    ]
    assert _option(srun, "--container-mounts") == "/data:/data,/ckpt:/ckpt"
    # A setup command runs on every node before torchrun.
    srun = _sbatch_dry_run(CONTAINER_IMAGE=image, SETUP_CMD="pip install x")["srun"]
    assert "pip install x && exec" in srun[srun.index("-c") + 1]


def test_sbatch_without_slurm_environment_fails_clearly():
    result = _run(SBATCH)
    assert result.returncode != 0 and "SLURM_JOB_ID" in result.stderr


def test_sbatch_header():
    directives = [
        line.split(None, 1)[1] for line in SBATCH.read_text().splitlines()
        if line.startswith("#SBATCH")
    ]  # fmt: skip
    assert "--output=logs/%x-%j.out" in directives
    assert "--open-mode=append" in directives  # the requeued run continues the same log
    assert "--requeue" in directives and "--ntasks-per-node=1" in directives
    assert any(d.startswith("--signal=B:USR1@") for d in directives)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_are_shellcheck_clean():
    result = subprocess.run(
        ["shellcheck", "-s", "bash", str(TRAIN_SH), str(SBATCH)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


# ------------------------------------------------------------------- local signal stop, resume
def _rollout_steps(metrics: Path) -> list:
    if not metrics.exists():
        return []
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r["step"] for r in records if r.get("event") == "rollout"]


@pytest.mark.slow
def test_train_sh_usr1_stops_ranks_cleanly(tmp_path):
    """SIGUSR1 to launch/train.sh reaches the ranks (own sessions, children of torchrun): they
    finish the step, checkpoint and exit 0, and so do torchrun and the script."""
    run, ckpt = tmp_path / "run", tmp_path / "ckpt"
    args = [*TINY, "steps=100", f"logging.dir={run}", f"checkpoint.dir={ckpt}"]
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            ["bash", str(TRAIN_SH), *args], env=_clean_env(), stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 240
        while len(_rollout_steps(run / "metrics.jsonl")) < 2:  # in the RL loop: handlers set
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "no RL step within 240 s"
            time.sleep(0.3)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=180) == 0, log_path.read_text()
    out = log_path.read_text()
    assert "launch/train.sh: SIGUSR1: passing it to the ranks" in out
    assert "pr2-train: stopping on signal" in out
    stopped = int((ckpt / "STOPPED_BY_SIGNAL").read_text())
    assert 2 <= stopped < 100, out
    assert _rollout_steps(run / "metrics.jsonl") == list(range(1, stopped + 1))
    assert any(path.name.startswith("step_") for path in ckpt.iterdir())
