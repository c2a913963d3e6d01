"""Atomic, pickle-free checkpoints: one file per rank, a completion marker, newest-first resume.

Layout under the checkpoint directory::

    step_00000012/rank_00000.pt rank_00000.pt.sha256 ... rank_<world-1>.pt ...  COMPLETE
    step_00000016.partial/...                              (a save in progress or crashed)

A save writes every rank's file into ``step_N.partial`` (each file itself through a temporary
name, fsync and ``os.replace``, with its SHA-256 beside it), waits for all ranks, then rank 0
renames the directory to ``step_N`` and writes ``COMPLETE`` last. A crash at any point leaves
earlier complete checkpoints intact, and :func:`latest_checkpoint` only ever returns a directory
with ``COMPLETE``. Files are read with ``torch.load(weights_only=True)``: tensors, numbers,
strings and containers only, never arbitrary pickled objects; a file whose bytes no longer match
its SHA-256 (torch's zip reader does not check CRCs: a flipped bit in a tensor would load
silently) is rejected. The shared file system of a cluster is assumed.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_DIGEST_SUFFIX = ".sha256"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing rank file, other world size, corrupt file)."""


def step_dir(directory: Path, step: int) -> Path:
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


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sha256(path: Path, sync: bool = False) -> str:
    """SHA-256 of a file's bytes; with ``sync`` the file is also fsynced (on disk after this)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
        if sync:
            os.fsync(handle.fileno())
    return digest.hexdigest()


def _marker_world_size(path: Path) -> Optional[int]:
    """World size written in a checkpoint's ``COMPLETE`` marker (None if unreadable)."""
    try:
        for line in (path / COMPLETE).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "world_size":
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def save_checkpoint(directory, step: int, state: dict, keep: int = 2) -> Path:
    """Save this rank's ``state`` as part of checkpoint ``step`` (collective over all ranks).

    Returns the final directory. Older complete checkpoints beyond ``keep`` are removed once
    the new one is complete (``keep=0`` keeps all).
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0 (0 keeps every checkpoint), got {keep}")
    rank, world = _rank_and_world()
    final = step_dir(directory, step)
    partial = final.with_name(final.name + ".partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    payload = {"step": step, "world_size": world, "rank": rank, "state": state}
    path = partial / f"rank_{rank:05d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    digest_file = path.with_name(path.name + _DIGEST_SUFFIX)
    digest_tmp = digest_file.with_name(digest_file.name + ".tmp")
    digest_tmp.write_text(_sha256(tmp, sync=True) + "\n")
    os.replace(digest_tmp, digest_file)
    os.replace(tmp, path)
    _barrier()
    if rank == 0:
        missing = [r for r in range(world) if not (partial / f"rank_{r:05d}.pt").is_file()]
        if missing:
            raise CheckpointError(f"checkpoint step {step}: rank files {missing} were not written")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        marker = final / (COMPLETE + ".tmp")
        marker.write_text(f"step {step}\nworld_size {world}\n")
        os.replace(marker, final / COMPLETE)
        for old_step, old_path in complete_checkpoints(directory)[:-keep] if keep > 0 else []:
            if old_step != step:
                shutil.rmtree(old_path, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path) -> dict:
    """Load this rank's state from checkpoint directory ``path`` (complete, same world size)."""
    rank, world = _rank_and_world()
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    written = _marker_world_size(path)
    file = path / f"rank_{rank:05d}.pt"
    if written is not None and written != world:
        raise CheckpointError(
            f"{path} was written by {written} ranks, this run has {world}; resume with the same "
            "world size and parallel layout"
        )
    if not file.is_file():
        raise CheckpointError(f"{path} has no file for rank {rank} ({file.name} is missing)")
    digest_file = file.with_name(file.name + _DIGEST_SUFFIX)
    if digest_file.is_file():  # checkpoints of older versions have no digest
        expected = digest_file.read_text().strip()
        actual = _sha256(file)
        if actual != expected:
            raise CheckpointError(
                f"{file}: corrupt (SHA-256 {actual[:16]}... does not match the "
                f"{expected[:16]}... recorded at save); use an older checkpoint"
            )
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure means a corrupt or foreign file
        raise CheckpointError(
            f"{file}: cannot be loaded as a weights-only checkpoint: {error}"
        ) from None
    if payload.get("world_size") != world:
        raise CheckpointError(
            f"{file} was written with world size {payload.get('world_size')}, this run has {world}"
        )
    return payload["state"]
