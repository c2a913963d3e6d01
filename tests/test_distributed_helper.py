"""The multi-rank test helper: results by rank for N = 1, 2, 4; failures carry tracebacks."""

import pytest

from pr2_megatron.testing.distributed import DistributedTestError, run_distributed


def _rank_sum():
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    value = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(value)
    return dist.get_rank(), dist.get_world_size(), value.item()


def _fail_on_rank_one():
    import os

    if os.environ["RANK"] == "1":
        raise ValueError("boom on rank one")
    return "ok"


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_results_come_back_by_rank(world_size):
    results = run_distributed(_rank_sum, world_size)
    expected_sum = world_size * (world_size + 1) / 2
    assert results == [(rank, world_size, expected_sum) for rank in range(world_size)]


def test_a_failing_rank_reports_its_traceback():
    with pytest.raises(DistributedTestError, match="(?s)rank 1 failed.*boom on rank one"):
        run_distributed(_fail_on_rank_one, 2)
