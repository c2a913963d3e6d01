"""Run a function in N gloo ranks on this machine and collect what each rank returns.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes with torchrun's
environment variables (a free port on 127.0.0.1), calls ``fn(*args)`` in each and returns the
results ordered by rank. If any rank fails, times out or dies, every rank's traceback is raised
together in one :class:`DistributedTestError`. ``fn`` must be importable (module level) and its
arguments and result picklable.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


class DistributedTestError(RuntimeError):
    """One or more ranks failed; the message holds each rank's traceback."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank, world_size, port, fn, args, kwargs, results):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        TORCHDYNAMO_DISABLE="1",
        OMP_NUM_THREADS="1",
    )
    try:
        import torch.distributed as dist

        # Plain pickle (by value): the queue's own pickler would pass tensors as shared-memory
        # handles that die with this process.
        value = pickle.dumps(fn(*args, **kwargs))
        results.put((rank, True, value))
        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240.0, **kwargs: Any
) -> list[Any]:
    """Call ``fn(*args, **kwargs)`` in ``world_size`` gloo ranks; return results by rank."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_rank_main, args=(rank, world_size, port, fn, args, kwargs, results))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    try:
        while len(outcomes) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                break
            outcomes[rank] = (ok, value)
            if not ok:
                # A failed rank usually leaves the others blocked in a collective.
                _collect_more(results, outcomes, world_size, wait=5.0)
                break
    finally:
        for process in processes:
            process.join(timeout=5.0 if len(outcomes) == world_size else 0.1)
            if process.is_alive():
                process.kill()
                process.join()
    failures = {rank: value for rank, (ok, value) in outcomes.items() if not ok}
    missing = [rank for rank in range(world_size) if rank not in outcomes]
    if failures or missing:
        parts = [f"--- rank {rank} failed:\n{tb}" for rank, tb in sorted(failures.items())]
        parts += [f"--- rank {rank}: no result (timed out, killed or blocked)" for rank in missing]
        raise DistributedTestError(
            f"{len(failures)} of {world_size} ranks failed\n" + "\n".join(parts)
        )
    return [pickle.loads(outcomes[rank][1]) for rank in range(world_size)]


def _collect_more(results, outcomes, world_size, wait):
    while len(outcomes) < world_size:
        try:
            rank, ok, value = results.get(timeout=wait)
        except queue.Empty:
            return
        outcomes[rank] = (ok, value)


def init_single_process_group() -> None:
    """Join a gloo world of one rank (tests and benchmarks that build models in-process)."""
    import torch.distributed as dist

    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    if dist.is_initialized():
        return
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
    )
    dist.init_process_group(backend="gloo")
