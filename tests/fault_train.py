"""``pr2-train`` with a rank killed mid-step, for the fault tests (run by torchrun as a script).

    torchrun --max-restarts=1 ... tests/fault_train.py --config configs/tiny.yaml key=value ...

``PR2_TEST_KILL=<rank>:<step>:<mini_step>`` makes that rank SIGKILL itself at the start of that
mini-step of that RL step (after the previous mini-step's optimizer update: the in-memory state
is ahead of every checkpoint), in the first attempt only (``TORCHELASTIC_RESTART_COUNT`` 0), and
first touches ``PR2_TEST_KILL_MARK`` so the test can tell that the fault really happened. Without
``PR2_TEST_KILL`` this is plain ``pr2-train``. A test hook only: the package reads no such
variable.
"""

import os
import signal
import sys
from pathlib import Path

import torch.distributed as dist

from pr2_megatron.rl import steps, train


def _install_kill(spec: str) -> None:
    rank, step, mini_step = (int(part) for part in spec.split(":"))
    original = steps.mini_step  # Trainer.rl_step calls it through the module

    def mini_step_or_die(trainer, step_, mini_step_, *args, **kwargs):
        if (dist.get_rank(), step_, mini_step_) == (rank, step, mini_step):
            mark = os.environ.get("PR2_TEST_KILL_MARK")
            if mark:
                Path(mark).write_text(f"rank {rank} killed at step {step} mini-step {mini_step}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        return original(trainer, step_, mini_step_, *args, **kwargs)

    steps.mini_step = mini_step_or_die


if __name__ == "__main__":
    spec = os.environ.get("PR2_TEST_KILL")
    if spec and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        _install_kill(spec)
    sys.exit(train.main())
