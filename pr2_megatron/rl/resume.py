"""The trainer's checkpoint: what a resumed run needs, as one Megatron sharded state dict.

* ``model``: every model chunk's ``sharded_state_dict()`` (the predictors included: they are
  modules of the routers), global keys, so any TP / PP / VPP / EP / DP layout loads it;
* ``optimizer``: Megatron's optimizer state (``fully_reshardable`` for the distributed
  optimizer; ``chained_optim_avoid_prefix``: the dense and expert optimizers keep their keys
  at every EP); ``scheduler``: the lr scheduler (common);
* ``trainer``: step (= the data position: every step's data is a function of seed, step and
  global sample ids) and whether the warm start is done (common);
* ``router_update``: the previous step's router update per MoE layer (the drift metric;
  replicated tensors, written once);
* ``rng``: each rank's torch / CUDA / Python / Megatron-tracker RNG states, loaded only when
  the layout is the same (another layout has other ranks; the step's data RNG does not depend
  on them).

:class:`TrainerCheckpoint` saves (synchronously, or asynchronously with Megatron's
``AsyncCallsQueue(persistent=False)``: a forked writer per save) and resumes.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import torch

from pr2_megatron.rl.checkpoint import (
    CheckpointError,
    checkpoint_info,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

__all__ = ["TrainerCheckpoint"]

#: ``sharded_state_dict`` metadata of Megatron's optimizers (see the module docstring).
OPTIMIZER_METADATA = {
    "chained_optim_avoid_prefix": True,
    "distrib_optim_sharding_type": "fully_reshardable",
}


class TrainerCheckpoint:
    """Save and resume one :class:`~pr2_megatron.rl.train.Trainer`."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.cfg = trainer.cfg.checkpoint
        self.queue = None
        if self.cfg.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.queue = AsyncCallsQueue(persistent=False)

    # ------------------------------------------------------------------------------ layout
    def layout(self) -> dict:
        """The parallel layout of this run (a checkpoint of another one is resharded)."""
        import torch.distributed as dist

        parallel = self.trainer.cfg.parallel
        keys = (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "virtual_pipeline_model_parallel_size",
            "context_parallel_size",
            "expert_model_parallel_size",
            "expert_tensor_parallel_size",
            "sequence_parallel",
            "num_layers_in_first_pipeline_stage",
            "num_layers_in_last_pipeline_stage",
        )
        return {"world_size": dist.get_world_size(), **{k: getattr(parallel, k) for k in keys}}

    # ------------------------------------------------------------------------- state dict
    def sharded_state(self, *, loading: bool, rng: bool, update_layers) -> dict:
        """The trainer's sharded state dict (for saving, or as the load request)."""
        t = self.trainer
        model = {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(t.chunks)}
        state = {
            "model": model,
            "optimizer": t.optimizer.optimizer.sharded_state_dict(
                model, is_loading=loading, metadata=OPTIMIZER_METADATA
            ),
            "scheduler": t.optimizer.scheduler.state_dict(),
            "trainer": {"step": t.step, "warm_started": t.warm_started},
            "router_update": self._router_update(update_layers, loading),
        }
        if rng:
            state["rng"] = _rng_state()
        return state

    def _router_update(self, layers, loading: bool) -> dict:
        """The previous router update of this rank's MoE layers in ``layers`` (replicated)."""
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        t = self.trainer
        replica = (ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(True))
        out = {}
        for router in t.routers:
            layer = int(getattr(router, "route_layer_number", router.layer_number))
            if layer not in layers:
                continue
            data = t.drift.previous.get(layer)
            if data is None or loading:
                data = torch.zeros_like(router.weight, dtype=torch.float32)
            out[f"layer_{layer}"] = ShardedTensor.from_rank_offsets(
                f"trainer.router_update.layer_{layer}", data, replica_id=replica
            )
        return out

    # -------------------------------------------------------------------------------- save
    def save(self) -> Path:
        """Checkpoint after the current step (collective)."""
        t = self.trainer
        self.wait(blocking=False)
        layers = sorted(_all_ranks_layers(t.drift.previous))
        info = {
            "step": t.step,
            "warm_started": t.warm_started,
            "layout": self.layout(),
            "router_update_layers": layers,
        }
        state = self.sharded_state(loading=False, rng=True, update_layers=set(layers))
        path = save_checkpoint(
            self.cfg.dir, t.step, state, keep=self.cfg.keep, info=info, async_queue=self.queue
        )
        if t.rank0:
            how = "scheduled (async)" if self.queue is not None else "written"
            print(f"pr2-train: checkpoint {path} {how}", flush=True)
        return path

    def wait(self, blocking: bool = True) -> None:
        """Finalize the asynchronous saves that are done (all of them with ``blocking``)."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=blocking)

    def close(self) -> None:
        """Wait for every asynchronous save and stop the queue."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=True)
            self.queue.close()
            self.queue = None

    # ------------------------------------------------------------------------------ resume
    def resume(self) -> Optional[Path]:
        """Load the newest complete checkpoint of ``checkpoint.dir``; its path, or None."""
        t = self.trainer
        if not self.cfg.dir or not self.cfg.resume:
            return None
        path = latest_checkpoint(self.cfg.dir)
        if path is None:
            return None
        info = checkpoint_info(path)
        same_layout = info.get("layout") == self.layout()
        layers = set(info.get("router_update_layers", []))
        request = self.sharded_state(loading=True, rng=same_layout, update_layers=layers)
        state = load_checkpoint(path, request)
        for index, chunk in enumerate(t.chunks):
            _load_model_chunk(chunk, state["model"][f"chunk{index}"], path)
        t.optimizer.optimizer.load_state_dict(state["optimizer"])
        t.optimizer.scheduler.load_state_dict(state["scheduler"])
        t.step = int(state["trainer"]["step"])
        t.warm_started = bool(state["trainer"]["warm_started"])
        t.drift.previous = {
            int(key.split("_")[1]): value.float() for key, value in state["router_update"].items()
        }
        if same_layout:
            _set_rng_state(state["rng"])
        elif t.rank0:
            print(
                f"pr2-train: resharding {path} from layout {info.get('layout')} to "
                f"{self.layout()} (RNG states not restored: other ranks)",
                flush=True,
            )
        return path


def _load_model_chunk(chunk, state: dict, path: Path) -> None:
    """Load a chunk's weights; only Megatron's empty ``_extra_state`` entries may be absent."""
    result = chunk.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: model weights do not match this model (missing {missing[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]})"
        )


def _all_ranks_layers(previous: dict) -> set[int]:
    """MoE layers with a previous router update on any rank (every rank saves the same keys)."""
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(previous))
    return {layer for part in gathered for layer in part}


def _rng_state() -> dict:
    """The rank's RNG states as per-rank ShardedTensors (``rng.rank_<r>.*``)."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    rank = dist.get_rank()
    tensors = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    for name, value in get_cuda_rng_tracker().get_states().items():
        tensors[f"tracker.{name}"] = value
    return {
        name: ShardedTensor.from_rank_offsets(f"rng.rank_{rank}.{name}", value.clone())
        for name, value in tensors.items()
    }


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8).cpu())
    tracker = {k[len("tracker.") :]: v.cpu() for k, v in state.items() if k.startswith("tracker.")}
    if tracker:
        get_cuda_rng_tracker().set_states(tracker)
