"""Atomic, reshardable checkpoints with Megatron's ``dist_checkpointing`` (``torch_dist``).

Layout under the checkpoint directory::

    step_00000012/   metadata.json  common.pt  .metadata  __<rank>_<i>.distcp ...
                     MANIFEST.json  COMPLETE
    step_00000016.partial/...            (a save in progress, or one that crashed)

What a step directory holds is a Megatron *sharded state dict*: every tensor is a
``ShardedTensor`` with its global shape and this rank's offsets, so a checkpoint written in one
layout (TP / PP / VPP / EP / DP sizes) loads in another; a replicated tensor is written once
(its main replica), the plain values of the state dict ("common": step, scheduler, layout) once
by rank 0. ``MANIFEST.json`` records the SHA-256 of every file, the format and what the trainer
needs before it builds its sharded state dict (step, layout: :func:`checkpoint_info`).

A save writes into ``step_N.partial`` (Megatron's writers, or its asynchronous writer: a
forked process per save), hashes the files (every rank a share of them, each fsynced), and
rank 0 writes ``MANIFEST.json``, renames the directory to ``step_N`` and writes ``COMPLETE``
last, each through a temporary name and ``os.replace``. A crash or ``kill -9`` at any point
leaves the earlier complete checkpoints as they were; :func:`latest_checkpoint` only returns a
directory with ``COMPLETE``, and the next save of that step replaces the debris.

Loading checks, before anything is unpickled: ``COMPLETE``, the format, every file's SHA-256
(the ranks share the work; any mismatch raises :class:`CheckpointError` naming the file on
every rank), and that torch's ``.metadata`` pickle references only torch's checkpoint metadata
classes, dtypes and sizes (an allowlist). ``common.pt`` is read with ``weights_only=True``.
Megatron's ``_extra_state`` objects (bytes) are not written when they are None (the local
layer spec); Transformer Engine's are, and torch unpickles those without ``weights_only``: on a
TE run treat a checkpoint directory as trusted input.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = [
    "COMPLETE",
    "FORMAT",
    "MANIFEST",
    "CheckpointError",
    "checkpoint_info",
    "complete_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "step_dir",
    "strip_empty_extra_state",
]

COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
FORMAT = "pr2-dist-checkpoint-1"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (incomplete, other format, corrupt or foreign file)."""


def step_dir(directory, step: int) -> Path:
    """The directory of the checkpoint taken after ``step``."""
    return Path(directory) / f"step_{step:08d}"


def complete_checkpoints(directory) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / COMPLETE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(directory) -> Optional[Path]:
    """The newest complete checkpoint in ``directory``, or None."""
    found = complete_checkpoints(directory)
    return found[-1][1] if found else None


def _ensure_cpu_bringup() -> None:
    """Without CUDA, Megatron's checkpoint writer needs the CPU bring-up (``runtime/cpu.py``)."""
    if not torch.cuda.is_available():
        from pr2_megatron.runtime.cpu import enable_cpu_bringup

        enable_cpu_bringup()


def _rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _sha256(path: Path, sync: bool = False) -> str:
    """SHA-256 of a file's bytes; with ``sync`` it is also fsynced (on disk after this)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
        if sync:
            os.fsync(handle.fileno())
    return digest.hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _gather(value: Any) -> list:
    if not dist.is_initialized():
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _my_share(files: list[str]) -> list[str]:
    """The rank's share of a sorted file list (the ranks hash and verify in parallel)."""
    rank, world = _rank_and_world()
    return [name for index, name in enumerate(files) if index % world == rank]


def strip_empty_extra_state(sharded_state_dict: dict) -> dict:
    """``sharded_state_dict`` without Megatron's ``_extra_state`` objects that hold None.

    The local layer spec's linear layers report ``None`` as extra state; written, each would be
    a pickled bytes object that torch unpickles without ``weights_only`` at load time.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    def keep(value) -> bool:
        return not (
            isinstance(value, ShardedObject)
            and value.key.endswith("_extra_state")
            and value.data is None
        )

    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items() if keep(v)}
        if isinstance(node, list):
            return [walk(v) for v in node if keep(v)]
        return node

    return walk(sharded_state_dict)


# ------------------------------------------------------------------------------------ save
def save_checkpoint(
    directory,
    step: int,
    sharded_state_dict: dict,
    *,
    keep: int = 2,
    info: Optional[dict] = None,
    async_queue=None,
) -> Path:
    """Save ``sharded_state_dict`` as checkpoint ``step`` (collective over all ranks).

    ``info`` (JSON-serializable) goes into ``MANIFEST.json`` (:func:`checkpoint_info`). With
    ``async_queue`` (Megatron's ``AsyncCallsQueue``) the shards are written by a forked worker
    and the manifest, rename and marker happen when the queue finalizes the save
    (``maybe_finalize_async_calls``, on every rank). Older complete checkpoints beyond ``keep``
    are removed once the new one is complete (``keep=0`` keeps all). Returns the final path.
    """
    from megatron.core import dist_checkpointing

    if keep < 0:
        raise ValueError(f"keep must be >= 0 (0 keeps every checkpoint), got {keep}")
    _ensure_cpu_bringup()
    rank, _ = _rank_and_world()
    final = step_dir(directory, step)
    partial = final.with_name(final.name + ".partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    state = strip_empty_extra_state(sharded_state_dict)

    def finalize() -> None:
        _complete(directory, step, partial, final, keep, dict(info or {}))

    if async_queue is None:
        dist_checkpointing.save(state, str(partial))
        finalize()
        return final
    request = dist_checkpointing.save(state, str(partial), async_sharded_save=True)
    request.add_finalize_fn(finalize)
    async_queue.schedule_async_request(request)
    return final


def _complete(directory, step: int, partial: Path, final: Path, keep: int, info: dict) -> None:
    """Hash (a share per rank), then rank 0: manifest, rename, ``COMPLETE``, retention."""
    rank, world = _rank_and_world()
    _barrier()  # every rank's files are written
    files = sorted(p.name for p in partial.iterdir() if p.is_file())
    digests = {name: _sha256(partial / name, sync=True) for name in _my_share(files)}
    merged: dict[str, str] = {}
    for part in _gather(digests):
        merged.update(part)
    if rank == 0:
        missing = sorted(set(files) - set(merged))
        if missing:
            raise CheckpointError(f"checkpoint step {step}: files {missing} were not hashed")
        manifest = {"format": FORMAT, "step": step, "world_size": world, "info": info}
        manifest["files"] = merged
        _write_atomically(partial / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        _write_atomically(final / COMPLETE, f"step {step}\nworld_size {world}\nformat {FORMAT}\n")
        for old_step, old_path in complete_checkpoints(directory)[:-keep] if keep > 0 else []:
            if old_step != step:
                shutil.rmtree(old_path, ignore_errors=True)
    _barrier()


# ------------------------------------------------------------------------------------ load
def checkpoint_info(path) -> dict:
    """The manifest's ``info`` of a complete checkpoint (JSON: nothing is unpickled)."""
    return _manifest(Path(path))["info"]


def _manifest(path: Path) -> dict:
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{file}: missing or unreadable manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(
            f"{file}: checkpoint format {found!r}, this pr2-train reads {FORMAT!r} (older "
            "checkpoints with one file per rank cannot be resumed)"
        )
    return manifest


def verify_checkpoint(path) -> dict:
    """Check a checkpoint before loading it (collective); its manifest. See the docstring."""
    path = Path(path)
    manifest = _manifest(path)
    expected = manifest["files"]
    present = sorted(
        p.name for p in path.iterdir() if p.is_file() and p.name not in (COMPLETE, MANIFEST)
    )
    problem = None
    extra = sorted(set(present) - set(expected))
    if extra:
        problem = f"{path / extra[0]}: a file the manifest does not list"
    for name in _my_share(sorted(expected)):
        if problem:
            break
        file = path / name
        if not file.is_file():
            problem = f"{file}: missing (listed in {MANIFEST})"
        elif _sha256(file) != expected[name]:
            problem = f"{file}: corrupt (its SHA-256 does not match the one recorded at save)"
    if problem is None and (path / ".metadata").is_file():
        problem = _check_metadata_pickle(path / ".metadata")
    problems = [p for p in _gather(problem) if p]
    if problems:
        raise CheckpointError(problems[0] + "; use an older checkpoint")
    return manifest


def load_checkpoint(path, sharded_state_dict: dict) -> dict:
    """Verify, then load ``sharded_state_dict``'s keys from ``path`` (collective)."""
    from megatron.core import dist_checkpointing

    _ensure_cpu_bringup()
    verify_checkpoint(path)
    state = strip_empty_extra_state(sharded_state_dict)
    return dist_checkpointing.load(state, str(path))


# ----------------------------------------------------------------- pickled metadata allowlist


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only torch's checkpoint metadata dataclasses / enums, dtypes, sizes, layouts."""

    def find_class(self, module: str, name: str):
        obj = None
        if module.startswith("torch.distributed.checkpoint."):
            candidate = getattr(__import__(module, fromlist=[name]), name, None)
            if isinstance(candidate, type) and (
                dataclasses.is_dataclass(candidate) or issubclass(candidate, enum.Enum)
            ):
                obj = candidate
        elif module == "torch":
            candidate = getattr(torch, name, None)
            if name == "Size" or isinstance(candidate, (torch.dtype, torch.layout)):
                obj = candidate
            elif isinstance(candidate, torch.memory_format):
                obj = candidate
        elif (module, name) == ("torch.serialization", "_get_layout"):
            obj = torch.serialization._get_layout
        elif (module, name) == ("collections", "OrderedDict"):
            from collections import OrderedDict

            obj = OrderedDict
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not checkpoint metadata")
        return obj


def _check_metadata_pickle(file: Path) -> Optional[str]:
    """None if ``file`` unpickles with :class:`_MetadataUnpickler` only, else the problem."""
    try:
        with open(file, "rb") as handle:
            _MetadataUnpickler(handle).load()
    except Exception as error:  # any failure: a foreign or corrupt pickle
        return f"{file}: not torch checkpoint metadata ({error})"
    return None
