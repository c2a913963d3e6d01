"""A real Slurm cluster on this machine for tests: a controller and emulated nodes on localhost.

::

    with slurm_cluster(nodes=2) as cluster:
        job_id = cluster.sbatch("slurm/pr2_train.sbatch", "--nodes=2", cwd=work_dir)
        job = cluster.wait_job(job_id, timeout=300)
        assert job["JobState"] == "COMPLETED", cluster.describe(job_id)

Debian's Slurm 22.05 (``slurm-wlm``) and ``munge`` are installed with ``apt-get`` when missing
(:func:`ensure_slurm`; needs root, as do the daemons). Everything the cluster uses lives in one
directory: its own ``munged`` (own key and socket, run as the ``munge`` user), ``slurmctld`` and
one ``slurmd -N <node>`` per node (Debian builds Slurm with multiple-slurmd support: every node is
``NodeAddr=127.0.0.1`` on its own port), state, spool, pid and log files. Ports are free ones, so
two clusters can run side by side; nothing is started through the system's service manager and
the system's own ``/etc/slurm`` and ``/run/munge`` are not touched. Every command goes through
:meth:`SlurmCluster.run` with ``SLURM_CONF`` pointing at the cluster's ``slurm.conf``; jobs
inherit it (sbatch exports the environment), so ``srun``/``scontrol`` inside a job reach this
cluster too. Teardown cancels the jobs submitted through :meth:`SlurmCluster.sbatch`, then stops
exactly the daemons it started, by PID.

The settings follow measured facts of such a machine (no systemd, no cgroups): linuxproc process
tracking, no task plugin, no accounting (``sacct`` does not work; ``scontrol show job`` keeps a
finished job for ``MinJobAge`` seconds), ``AuthInfo=cred_expire=10`` and a 5-second scheduler
interval, which bring requeue-to-restart from about 2 minutes down to about 15 seconds.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

from pr2_megatron.testing.distributed import free_port

#: Programs the cluster needs, and the Debian packages that bring them.
REQUIRED_PROGRAMS = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "scontrol", "srun")
DEBIAN_PACKAGES = ("slurm-wlm", "munge")
#: Job states after which a job does not run again (unless requeued by hand).
FINISHED_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
     "DEADLINE", "PREEMPTED"}
)  # fmt: skip


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed here (not root, no package source, ...): a reason to skip."""


class SlurmClusterError(RuntimeError):
    """A daemon of the cluster died (its log tail is in the message): a failure, not a skip."""


def ensure_slurm(install: bool = True, timeout: float = 600.0) -> None:
    """Make sure Slurm and munge are installed; install them with apt-get when missing.

    Raises :class:`SlurmUnavailable` naming the reason (not root, no apt-get, apt-get failed —
    e.g. without network) so that callers can skip.
    """
    if os.geteuid() != 0:
        raise SlurmUnavailable("a local Slurm cluster needs root (slurmd, munged as 'munge')")
    missing = [name for name in REQUIRED_PROGRAMS if shutil.which(name) is None]
    if missing and install:
        if shutil.which("apt-get") is None:
            raise SlurmUnavailable(f"{', '.join(missing)} missing and no apt-get to install them")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install_cmd = ["apt-get", "install", "-y", "--no-install-recommends", *DEBIAN_PACKAGES]
        result = subprocess.run(
            install_cmd, env=env, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:  # stale package lists: refresh once, then try again
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=timeout)
            result = subprocess.run(
                install_cmd, env=env, capture_output=True, text=True, timeout=timeout
            )
        if result.returncode != 0:
            raise SlurmUnavailable(
                f"apt-get install {' '.join(DEBIAN_PACKAGES)} failed (exit {result.returncode}): "
                + (result.stderr or result.stdout).strip()[-500:]
            )
        missing = [name for name in REQUIRED_PROGRAMS if shutil.which(name) is None]
    if missing:
        raise SlurmUnavailable(f"not installed: {', '.join(missing)}")
    try:
        pwd.getpwnam("munge")
    except KeyError:
        raise SlurmUnavailable("the munge package did not create the 'munge' user") from None


def _node_hardware() -> str:
    """Node line fields ``CPUs Sockets CoresPerSocket ThreadsPerCore`` of this machine."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0]))
    sockets = int(fields.get("Boards", 1)) * int(fields.get("SocketsPerBoard", 1))
    return (
        f"CPUs={fields['CPUs']} Sockets={sockets} CoresPerSocket={fields['CoresPerSocket']} "
        f"ThreadsPerCore={fields['ThreadsPerCore']}"
    )


def parse_job(text: str) -> dict[str, str]:
    """``Key=Value`` fields of one ``scontrol show job -o`` line."""
    return dict(re.findall(r"(?:^|\s)([A-Za-z][\w:/]*)=(\S*)", text.strip()))


class SlurmCluster:
    """A Slurm controller and ``nodes`` emulated nodes on localhost, rooted at ``root``.

    Use :func:`slurm_cluster` (a context manager) rather than :meth:`start`/:meth:`stop`.
    """

    def __init__(
        self,
        root: Union[str, Path],
        nodes: int = 2,
        cred_expire: int = 10,
        sched_interval: int = 5,
        min_job_age: int = 300,
    ):
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        self.root = Path(root)
        self.node_names = [f"n{i + 1}" for i in range(nodes)]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.cred_expire = cred_expire
        self.sched_interval = sched_interval
        self.min_job_age = min_job_age
        #: Daemons this cluster started, by name (``munged``, ``slurmctld``, ``slurmd-n1``, ...).
        self.processes: dict[str, subprocess.Popen] = {}
        #: Jobs submitted through :meth:`sbatch` (cancelled at teardown).
        self.job_ids: list[int] = []
        self.startup_seconds: Optional[float] = None
        self._logs: dict[str, object] = {}

    # ------------------------------------------------------------------------- environment
    @property
    def env(self) -> dict[str, str]:
        """The environment of commands: ours without Slurm job variables, SLURM_CONF = ours."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(
        self, *args: str, check: bool = True, timeout: float = 60.0, **kwargs
    ) -> subprocess.CompletedProcess:
        """Run a Slurm command (``sinfo``, ``scontrol``, ...) against this cluster; text output."""
        env = self.env
        env.update(kwargs.pop("env", None) or {})
        result = subprocess.run(
            list(args), env=env, capture_output=True, text=True, timeout=timeout, **kwargs
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result

    # ------------------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 60.0) -> None:
        """Write the configuration, start munged, slurmctld and the slurmds; wait for idle nodes."""
        begin = time.monotonic()
        for sub in ("state", "log", "run", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged (user munge) must reach its socket directory
        self._start_munge(timeout)
        self.conf.write_text(self._slurm_conf())
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        for node in self.node_names:
            (self.root / "spool" / node).mkdir(exist_ok=True)
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node])
        self._wait(self._nodes_idle, timeout, "nodes to become idle")
        self.startup_seconds = time.monotonic() - begin

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel this cluster's jobs, then stop exactly the daemons it started."""
        if self.job_ids and "slurmctld" in self.processes:
            self.run("scancel", *map(str, self.job_ids), check=False)
            try:
                self._wait(self._jobs_gone, timeout, "cancelled jobs to end")
            except TimeoutError:
                pass  # stop the daemons anyway; their logs are in the cluster directory
        for name in reversed(list(self.processes)):
            proc = self.processes[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in reversed(list(self.processes.items())):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            self._close_log(name)
        self.processes.clear()

    def _start_munge(self, timeout: float) -> None:
        munge_dir = self.munge_socket.parent
        munge_dir.mkdir(exist_ok=True)
        user = pwd.getpwnam("munge")
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        for path, mode in ((munge_dir, 0o711), (key, 0o400)):
            os.chown(path, user.pw_uid, user.pw_gid)
            path.chmod(mode)
        command = [
            "setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
            "munged", "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
            f"--seed-file={munge_dir / 'munged.seed'}",
        ]  # fmt: skip
        self._spawn("munged", command)
        self._wait(self._munge_works, timeout, "munged to answer")

    def _munge_works(self) -> bool:
        encode = subprocess.run(
            ["munge", "-n", "-S", str(self.munge_socket)], capture_output=True, timeout=10
        )
        if encode.returncode != 0:
            return False
        decode = subprocess.run(
            ["unmunge", "-S", str(self.munge_socket)],
            input=encode.stdout,
            capture_output=True,
            timeout=10,
        )
        return decode.returncode == 0

    def _slurm_conf(self) -> str:
        root = self.root
        host = socket.gethostname().split(".")[0]
        hardware = _node_hardware()
        lines = [
            "ClusterName=pr2test",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "ReturnToService=2",
            "MailProg=/bin/true",
            "SlurmdParameters=config_overrides",
            f"SchedulerParameters=sched_interval={self.sched_interval},"
            f"bf_interval={self.sched_interval}",
            f"MinJobAge={self.min_job_age}",
            "KillWait=10",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool' / '%n'}",
            f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'run' / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
        ]
        for node in self.node_names:
            lines.append(f"NodeName={node} NodeAddr=127.0.0.1 Port={free_port()} {hardware}")
        lines.append(
            f"PartitionName=test Nodes={','.join(self.node_names)} Default=YES "
            "MaxTime=INFINITE State=UP"
        )
        return "\n".join(lines) + "\n"

    def _spawn(self, name: str, command: Sequence[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 - closed in stop()
        self.processes[name] = subprocess.Popen(
            list(command), env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.root
        )
        self._logs[name] = log

    def _close_log(self, name: str) -> None:
        log = self._logs.pop(name, None)
        if log is not None:
            log.close()

    def _check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                tail = (self.root / "log" / f"{name}.out").read_text(errors="replace")[-2000:]
                raise SlurmClusterError(f"{name} exited with {proc.returncode}:\n{tail}")

    def _wait(self, ready, timeout: float, what: str, interval: float = 0.25) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            if ready():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(interval)

    def _nodes_idle(self) -> bool:
        result = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=15)
        states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
        return result.returncode == 0 and all(
            states.get(node) == "idle" for node in self.node_names
        )

    def _jobs_gone(self) -> bool:
        for job_id in self.job_ids:
            job = self.job(job_id)
            if job is not None and job.get("JobState") not in FINISHED_STATES:
                return False
        return True

    # ------------------------------------------------------------------------- jobs
    def sbatch(
        self,
        script: Union[str, Path],
        *options: str,
        args: Sequence[str] = (),
        cwd: Optional[Union[str, Path]] = None,
        env: Optional[Mapping[str, str]] = None,
    ) -> int:
        """Submit ``script`` with sbatch ``options`` and script ``args``; the job id.

        ``env`` is added to the submitting environment (sbatch exports it to the job).
        """
        result = self.run(
            "sbatch", "--parsable", *options, str(script), *args, cwd=cwd, env=dict(env or {})
        )
        job_id = int(result.stdout.strip().split(";")[0])
        self.job_ids.append(job_id)
        return job_id

    def job(self, job_id: int) -> Optional[dict[str, str]]:
        """The job's ``scontrol show job`` fields, or None once Slurm has forgotten it."""
        result = self.run("scontrol", "show", "job", "-o", str(job_id), check=False, timeout=30)
        if result.returncode != 0 or not result.stdout.strip():
            return None
        return parse_job(result.stdout.splitlines()[0])

    def wait_job(
        self, job_id: int, timeout: float = 300.0, until=None, interval: float = 1.0
    ) -> dict[str, str]:
        """Poll ``scontrol show job`` until ``until(job)`` holds (default: the job finished)."""
        until = until or (lambda job: job.get("JobState") in FINISHED_STATES)
        deadline = time.monotonic() + timeout
        last: Optional[dict[str, str]] = None
        while time.monotonic() < deadline:
            self._check_alive()
            job = self.job(job_id)
            if job is not None:
                last = job
                if until(job):
                    return job
            time.sleep(interval)
        state = last.get("JobState") if last else "unknown"
        raise TimeoutError(
            f"job {job_id} still {state} after {timeout:.0f} s\n{self.describe(job_id)}"
        )

    def describe(self, job_id: int) -> str:
        """The job's fields, the tail of its output file and of the daemons' logs (for asserts)."""
        parts = []
        job = self.job(job_id)
        parts.append(f"job {job_id}: {job}")
        if job and job.get("StdOut"):
            out = Path(job["StdOut"])
            if out.exists():
                parts.append(f"--- {out}\n{out.read_text(errors='replace')[-4000:]}")
        for log in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {log}\n{log.read_text(errors='replace')[-1500:]}")
        return "\n".join(parts)


@contextmanager
def slurm_cluster(
    root: Optional[Union[str, Path]] = None, nodes: int = 2, install: bool = True, **options
) -> Iterator[SlurmCluster]:
    """Install Slurm if needed, start a cluster of ``nodes`` emulated nodes, stop it afterwards.

    ``root`` (default: a new directory under the system's temp dir, removed afterwards) holds
    everything; it is made world-traversable because munged runs as the ``munge`` user.
    ``options`` go to :class:`SlurmCluster`. Raises :class:`SlurmUnavailable` when Slurm cannot
    be installed, :class:`SlurmClusterError` when a daemon dies.
    """
    ensure_slurm(install=install)
    own_root = root is None
    path = Path(tempfile.mkdtemp(prefix="pr2-slurm-")) if own_root else Path(root)
    cluster = SlurmCluster(path, nodes=nodes, **options)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if own_root:
            shutil.rmtree(path, ignore_errors=True)
