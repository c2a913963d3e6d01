"""slurm/pr2_train.sbatch on a real Slurm 22.05 cluster on this machine (two emulated nodes).

The cluster (support.slurm) is installed with apt-get when missing and brought up
once for the module; the tests are skipped only when that cannot be done (not root, apt-get
cannot install Slurm). Jobs run the tiny CPU config, 2 nodes x 1 rank, so torchrun rendezvouses
across the two Slurm nodes (EP=2 spans them).
"""

import json
import time
from pathlib import Path

import pytest
from support.slurm import SlurmUnavailable, slurm_cluster

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "slurm" / "pr2_train.sbatch"
TINY = ["warm_start.steps=2", "rollout.prompts_per_step=2", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def cluster():
    try:
        with slurm_cluster(nodes=2) as running:
            print(f"\nslurm cluster up in {running.startup_seconds:.1f} s")
            yield running
    except SlurmUnavailable as error:
        pytest.skip(f"no local Slurm cluster: {error}")


def _submit(cluster, work: Path, *args: str) -> int:
    (work / "logs").mkdir(parents=True, exist_ok=True)
    env = {"CONFIG": str(REPO / "configs" / "tiny.yaml")}
    return cluster.sbatch(SBATCH, "--nodes=2", args=[*TINY, *args], cwd=work, env=env)


def _rollout_steps(metrics: Path) -> list:
    if not metrics.exists():
        return []
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r["step"] for r in records if r.get("event") == "rollout"]


def _log(work: Path, job_id: int) -> str:
    return (work / "logs" / f"pr2-train-{job_id}.out").read_text()


def test_two_node_job_stops_on_usr1_requeues_and_resumes(cluster, tmp_path):
    """One torchrun per node with a c10d rendezvous across the two nodes; SIGUSR1 to the batch
    shell (what --signal=B:USR1@N sends before the time limit) reaches the ranks on both nodes,
    they checkpoint and exit 0, the job requeues itself, and the restarted job resumes from that
    checkpoint, appends to the same log and runs to completion."""
    steps = 10
    submitted = time.monotonic()
    job_id = _submit(cluster, tmp_path, f"steps={steps}")
    run_dir = tmp_path / "runs" / f"pr2-train-{job_id}"  # the default: runs/<job name>-<job id>
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while len(_rollout_steps(metrics)) < 2:  # the ranks are in the RL loop (handlers installed)
        assert time.monotonic() < deadline, cluster.describe(job_id)
        state = (cluster.job(job_id) or {}).get("JobState")
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), cluster.describe(job_id)
        time.sleep(0.5)
    signalled = time.monotonic()
    print(f"submit to 2 RL steps: {signalled - submitted:.1f} s")
    cluster.run("scancel", "--signal=USR1", "--batch", str(job_id))
    cluster.wait_job(
        job_id, timeout=180, until=lambda j: j["Restarts"] == "1" and j["JobState"] == "RUNNING"
    )
    print(f"signal to running again: {time.monotonic() - signalled:.1f} s")
    job = cluster.wait_job(job_id, timeout=300)
    print(f"signal to done: {time.monotonic() - signalled:.1f} s")
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", cluster.describe(job_id)
    assert job["Restarts"] == "1" and job["NodeList"] == "n[1-2]"

    # Both runs: the srun step put one task (torchrun) on each node, and they rendezvoused.
    for node in ("n1", "n2"):
        slurmd_log = (cluster.root / "log" / f"slurmd-{node}.log").read_text()
        assert slurmd_log.count(f"launch task StepId={job_id}.0 ") == 2, node
    log = _log(tmp_path, job_id)
    assert log.count("on n1 n2: 2 x 1 ranks, rendezvous 127.0.0.1:") == 2, log
    # The stop: forwarded by the batch shell, agreed by the ranks, checkpointed, requeued.
    assert "pr2_train.sbatch: SIGUSR1: asking the trainer to checkpoint and stop" in log
    assert f"requeueing job {job_id}" in log and "restart 1 on n1 n2" in log
    stop_line = next(line for line in log.splitlines() if "pr2-train: stopping on signal" in line)
    stopped = int(stop_line.split()[-1])  # "... stopping on signal after step N"
    assert 2 <= stopped < steps, log
    assert f"pr2-train: resumed from step {stopped}" in log
    # Every step exactly once: the restarted job continued from the checkpoint step.
    assert _rollout_steps(metrics) == list(range(1, steps + 1)), log
    assert not (run_dir / "checkpoints" / "STOPPED_BY_SIGNAL").exists()
