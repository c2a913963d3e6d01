"""launch/gpu_check.sh on a machine without a GPU: the refusal, the dry run, and the summary.

The refusal and the dry run run the script as it is. The summary logic (status, wall time, key
lines per part, exit code) runs against a stand-in interpreter (``PYTHON``) that claims a GPU and
answers each part's command, so it is checked here without one; the real parts run on a GPU
machine only.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "gpu_check.sh"
PARTS = ["gpu-tests", "train", "bench-router", "bench-probmoe"]


def _run(*args, timeout=60, **env):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TIMEOUT_")}
    environment.pop("OUT", None)
    environment.update({"PYTHON": sys.executable, **env})
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=REPO, env=environment, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_it_exits_1_with_one_line_and_runs_nothing(tmp_path):
    summary = tmp_path / "out" / "summary.md"
    result = _run(str(summary))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()  # nothing was run or written


def test_dry_run_prints_every_part_with_its_timeout_and_the_summary_path(tmp_path):
    result = _run("--dry-run", timeout=30, OUT=str(tmp_path), TIMEOUT_TRAIN="99")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith(str(tmp_path / "gpu_check_summary.md"))
    found = {m.group(1): (int(m.group(2)), m.group(3)) for m in map(
        re.compile(r"part (\S+) \(timeout (\d+)s\): (.*)").fullmatch, lines[1:]) if m}  # fmt: skip
    assert list(found) == PARTS
    assert sum(limit for limit, _ in found.values()) <= 8 * 60 - 60  # parts fit in 8 minutes
    assert found["train"][0] == 99
    assert "-m pytest -m gpu" in found["gpu-tests"][1]
    train = found["train"][1]
    assert "NPROC=1" in train and "bash launch/train.sh" in train  # torchrun, NCCL on CUDA
    assert f"logging.dir={tmp_path}/train" in train
    assert "benchmarks/router_cost.py --quick" in found["bench-router"][1]
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


FAKE_PYTHON = """#!/usr/bin/env bash
# A stand-in interpreter: a GPU, and each part's command answered without running it.
case "$*" in
  -c*) echo "Fake GPU 80GB" ;;
  *"-m pytest"*) echo "....s"; echo "4 passed, 1 skipped in 3.2s"; exit "${FAKE_TESTS_EXIT:-0}" ;;
  *torch.distributed.run*) echo "pr2-train: CUDA: yes"; echo "step    3/3 | reward 0.5" ;;
  *probmoe_router_cost*) sleep "${FAKE_SLEEP:-0}"; echo "| probmoe | 2.0 |" ;;
  *router_cost*) echo "| replay | 1.00 |"; echo "wrote outputs" ;;
esac
"""


def test_summary_gives_each_parts_status_wall_time_and_key_lines(tmp_path):
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    summary = tmp_path / "check" / "summary.md"
    failing = dict(TIMEOUT_BENCH="2", FAKE_TESTS_EXIT="1", FAKE_SLEEP="30")
    result = _run(str(summary), PYTHON=str(python), **failing)
    assert result.returncode == 1, result.stdout + result.stderr  # a part failed
    text = summary.read_text()
    assert "- GPU: Fake GPU 80GB" in text
    rows = {m.group(1): (m.group(2), float(m.group(3))) for m in re.finditer(
        r"^\| (\S+) \| ([^|]+) \| ([\d.]+) \| \d+ \|$", text, re.M)}  # fmt: skip
    assert list(rows) == PARTS
    assert rows["gpu-tests"][0] == "FAIL (exit 1)"
    assert rows["train"][0] == "PASS" and rows["bench-router"][0] == "PASS"
    assert rows["bench-probmoe"][0] == "TIMEOUT" and 1.5 < rows["bench-probmoe"][1] < 20
    assert "4 passed, 1 skipped" in text and "step    3/3" in text and "| replay | 1.00 |" in text
    assert "overall: FAIL" in text
    for part in PARTS:
        assert (summary.parent / f"{part}.log").exists()

    result = _run(str(summary), PYTHON=str(python))  # every part passes
    assert result.returncode == 0, result.stdout + result.stderr
    text = summary.read_text()
    assert "overall: PASS" in text and text.count("| PASS |") == len(PARTS)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_gpu_check_is_shellcheck_clean():
    command = ["shellcheck", "-s", "bash", str(SCRIPT)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
