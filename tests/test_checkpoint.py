"""Checkpoints (pr2_megatron.rl.checkpoint): crashes during save, corrupt and hostile files, other
world sizes, retention. Single-process tests call the module directly (world size 1, or a
monkeypatched rank/world); one test crashes a real rank of a 2-process gloo job mid-save."""

import os
import pickle
import re
import signal

import pytest
import torch

from pr2_megatron.rl import checkpoint
from pr2_megatron.rl.checkpoint import (
    COMPLETE,
    CheckpointError,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    step_dir,
)
from pr2_megatron.testing.distributed import DistributedTestError, run_distributed


def _state(step):
    gen = torch.Generator().manual_seed(step)
    return {
        "step": step,
        "model": {"w": torch.randn(64, 32, generator=gen), "b": torch.arange(5) * step},
        "rng": [1, 2, step],
    }


def _assert_state_equal(a, b):
    assert a["step"] == b["step"] and a["rng"] == b["rng"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def _rank_file(path, rank=0):
    return path / f"rank_{rank:05d}.pt"


# ------------------------------------------------------------------------- crash during save
def test_partial_directory_is_ignored_and_the_previous_checkpoint_loads(tmp_path):
    save_checkpoint(tmp_path, 1, _state(1))
    # A save of step 2 that died after writing its rank file: step_2.partial, no COMPLETE.
    partial = tmp_path / "step_00000002.partial"
    partial.mkdir()
    torch.save({"step": 2, "world_size": 1, "rank": 0, "state": _state(2)}, _rank_file(partial))
    # ... and one that died after the rename but before the marker.
    unmarked = tmp_path / "step_00000003"
    unmarked.mkdir()
    torch.save({"step": 3, "world_size": 1, "rank": 0, "state": _state(3)}, _rank_file(unmarked))
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 1)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [1]
    _assert_state_equal(load_checkpoint(latest_checkpoint(tmp_path)), _state(1))
    with pytest.raises(CheckpointError, match=f"step_00000003 is not a complete .*no {COMPLETE}"):
        load_checkpoint(unmarked)
    # The next save of step 2 replaces the debris and completes.
    save_checkpoint(tmp_path, 2, _state(2))
    assert not partial.exists()
    _assert_state_equal(load_checkpoint(latest_checkpoint(tmp_path)), _state(2))


@pytest.mark.parametrize("fail_at", ["torch.save", "rank rename", "directory rename", "marker"])
def test_an_exception_at_any_point_of_a_save_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, fail_at
):
    save_checkpoint(tmp_path, 1, _state(1))
    real_save, real_replace = torch.save, os.replace

    def failing_save(obj, path, *args, **kwargs):
        if fail_at == "torch.save":
            real_save(obj, path, *args, **kwargs)
            with open(path, "r+b") as handle:  # died halfway through writing
                handle.truncate(os.path.getsize(path) // 2)
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    def failing_replace(src, dst):
        name = os.path.basename(dst)
        if (
            (fail_at == "rank rename" and name.endswith(".pt"))
            or (fail_at == "directory rename" and name == "step_00000002")
            or (fail_at == "marker" and name == COMPLETE)
        ):
            raise OSError(f"killed before renaming to {name}")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    monkeypatch.setattr(checkpoint.os, "replace", failing_replace)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, _state(2))
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 1)
    _assert_state_equal(load_checkpoint(step_dir(tmp_path, 1)), _state(1))


def _save_steps(directory, crash_at_step=None):
    """Two gloo ranks save steps 1 and 2; rank 1 dies (SIGKILL) in step 2 before its file."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    save_checkpoint(directory, 1, _state(1 + 10 * rank))
    if crash_at_step == 2 and rank == 1:
        real_save = torch.save

        def die_before_writing(obj, path, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.torch.save = die_before_writing
        try:
            save_checkpoint(directory, 2, _state(2 + 10 * rank))
        finally:
            checkpoint.torch.save = real_save
    save_checkpoint(directory, 2, _state(2 + 10 * rank))
    return rank


@pytest.mark.slow
def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint_complete(tmp_path):
    with pytest.raises(DistributedTestError, match="rank 1: no result"):
        run_distributed(_save_steps, 2, tmp_path, 2, timeout=60)
    # Rank 0 wrote its step-2 file into step_2.partial and then waited for rank 1 forever.
    assert (tmp_path / "step_00000002.partial" / "rank_00000.pt").is_file()
    assert not (tmp_path / "step_00000002").exists()
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 1)
    # A restarted job (same world size) resumes from step 1, each rank its own state.
    assert run_distributed(_load_both, 2, latest_checkpoint(tmp_path)) == [1, 11]


def _load_both(path):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    return load_checkpoint(path)["step"]


# --------------------------------------------------------------------- corrupt / hostile files
@pytest.mark.parametrize(
    "how, digest",
    [("truncate", True), ("empty", True), ("garbage", True), ("flip one bit", True)]
    + [("truncate", False), ("empty", False), ("garbage", False)],
)
def test_a_corrupt_rank_file_is_a_checkpoint_error_naming_the_file(tmp_path, how, digest):
    path = save_checkpoint(tmp_path, 1, _state(1))
    file = _rank_file(path)
    if not digest:  # a checkpoint of an older version: torch.load itself must fail clearly
        (path / "rank_00000.pt.sha256").unlink()
    raw = bytearray(file.read_bytes())
    if how == "truncate":
        raw = raw[: len(raw) // 2]
    elif how == "empty":
        raw = bytearray()
    elif how == "garbage":
        raw = bytearray(os.urandom(len(raw)))
    else:
        # A bit in the middle of a tensor's bytes: torch's zip reader checks no CRC, so without
        # the SHA-256 beside the file this loads silently with one weight changed.
        raw[len(raw) // 2] ^= 0x01
    file.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=re.escape(str(file))):
        load_checkpoint(path)


def test_a_bit_flip_is_silent_without_the_digest(tmp_path):
    """Why the SHA-256 exists: the same flip without it loads a different tensor, no error."""
    path = save_checkpoint(tmp_path, 1, _state(1))
    file = _rank_file(path)
    raw = bytearray(file.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    file.write_bytes(bytes(raw))
    (path / "rank_00000.pt.sha256").unlink()  # an older checkpoint: no digest
    loaded = load_checkpoint(path)
    assert not torch.equal(loaded["model"]["w"], _state(1)["model"]["w"])


class _CreatesMarker:
    """Unpickling this object creates a file: proof that the loader ran pickled code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_malicious_pickle_is_rejected_and_never_executed(tmp_path, writer):
    marker = tmp_path / "payload_ran"
    payload = {"step": 1, "world_size": 1, "rank": 0, "state": {"x": _CreatesMarker(marker)}}
    pickle.loads(pickle.dumps(payload))["state"]["x"].close()  # the payload does work ...
    assert marker.exists()
    marker.unlink()
    path = save_checkpoint(tmp_path / "ck", 1, _state(1))
    file = _rank_file(path)
    if writer == "torch.save":
        torch.save(payload, file)
    else:
        file.write_bytes(pickle.dumps(payload))
    (path / "rank_00000.pt.sha256").unlink()  # the attacker rewrote the digest away too
    with pytest.raises(CheckpointError, match=re.escape(f"{file}: cannot be loaded as a weights")):
        load_checkpoint(path)
    assert not marker.exists()  # ... and the loader never ran it


# ----------------------------------------------------------------------------- world size
def test_a_checkpoint_of_another_world_size_is_a_clear_error(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path, 1, _state(1))  # written by 1 rank
    for rank in (0, 1):
        monkeypatch.setattr(checkpoint, "_rank_and_world", lambda rank=rank: (rank, 2))
        with pytest.raises(CheckpointError, match="written by 1 ranks, this run has 2"):
            load_checkpoint(path)
    # Written by 2 ranks (simulated), loaded by 1.
    monkeypatch.setattr(checkpoint, "_rank_and_world", lambda: (0, 1))
    two = step_dir(tmp_path / "two", 5)
    two.mkdir(parents=True)
    for rank in (0, 1):
        payload = {"step": 5, "world_size": 2, "rank": rank, "state": _state(rank)}
        torch.save(payload, _rank_file(two, rank))
    (two / COMPLETE).write_text("step 5\nworld_size 2\n")
    with pytest.raises(CheckpointError, match="written by 2 ranks, this run has 1"):
        load_checkpoint(two)
    # A marker without the world size (hand-made): the payload's own world size still tells.
    (two / COMPLETE).write_text("")
    with pytest.raises(CheckpointError, match="written with world size 2, this run has 1"):
        load_checkpoint(two)


def test_a_missing_rank_file_is_named(tmp_path):
    path = save_checkpoint(tmp_path, 1, _state(1))
    _rank_file(path).unlink()
    with pytest.raises(CheckpointError, match="no file for rank 0 .rank_00000.pt is missing"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------ retention
@pytest.mark.parametrize(
    "keep, kept", [(1, [5]), (2, [4, 5]), (3, [3, 4, 5]), (0, [1, 2, 3, 4, 5])]
)
def test_keep_retains_the_newest_complete_checkpoints(tmp_path, keep, kept):
    (tmp_path / "step_00000009.partial").mkdir()  # debris of a crashed save is not counted
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, _state(step), keep=keep)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == kept
    _assert_state_equal(load_checkpoint(latest_checkpoint(tmp_path)), _state(5))


def test_negative_keep_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="keep must be >= 0"):
        save_checkpoint(tmp_path, 1, _state(1), keep=-1)
    assert latest_checkpoint(tmp_path) is None


def test_resaving_a_step_and_a_missing_directory(tmp_path):
    assert latest_checkpoint(tmp_path / "nowhere") is None
    save_checkpoint(tmp_path, 3, _state(3))
    save_checkpoint(tmp_path, 3, _state(4))  # same step again (e.g. a signal at the last step)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [3]
    _assert_state_equal(load_checkpoint(step_dir(tmp_path, 3)), _state(4))
    # Nothing but step directories, markers, rank files and their digests is left behind.
    names = sorted(p.name for p in step_dir(tmp_path, 3).iterdir())
    assert names == [COMPLETE, "rank_00000.pt", "rank_00000.pt.sha256"]
