"""GPU-only checks (skipped without CUDA): the Transformer Engine spec and NCCL expert parallelism.

Run them on a GPU machine with ``pytest -m gpu``. They use the same code paths as the CPU tests
(spec transform, PR2 router, replay), with TE layers and NCCL collectives instead of the local
spec and gloo.
"""

import dataclasses

import pytest
import torch

from pr2_megatron.models.builder import MoEModelConfig
from pr2_megatron.runtime.parallel import ParallelConfig
from pr2_megatron.testing.distributed import run_distributed
from pr2_megatron.testing.moe import TinySetup

pytestmark = pytest.mark.gpu

SETUP = TinySetup(model=MoEModelConfig(num_layers=2, hidden_size=64, num_experts=8, topk=2))


def _predict_then_replay(setup, use_te):
    from megatron.core import parallel_state

    from pr2_megatron.models.builder import build_gpt_moe
    from pr2_megatron.routing.controller import RoutingController
    from pr2_megatron.runtime.parallel import destroy_parallel, initialize_parallel
    from pr2_megatron.testing.moe import randomize_predictors

    initialize_parallel(setup.parallel, seed=setup.seed)
    model = build_gpt_moe(setup.model, setup.parallel, setup.pr2, use_transformer_engine=use_te)
    randomize_predictors(model, scale=1.0, seed=7)
    ctl = RoutingController(model)
    generator = torch.Generator().manual_seed(parallel_state.get_data_parallel_rank())
    ids = torch.randint(0, 64, (2, 16), generator=generator).cuda()
    positions = torch.arange(16, device="cuda").expand_as(ids)
    ctl.predict()
    with torch.no_grad():
        rollout = model(ids, positions, None, labels=ids)
    routes = ctl.collect_routes()[0]
    ctl.replay(collect_metrics=True)
    ctl.set_targets(routes)
    replayed = model(ids, positions, None, labels=ids)
    replayed.float().mean().backward()
    ctl.finish()
    used = ctl.forward_routes()[0]["replayed"]
    result = (
        torch.equal(used.cpu(), routes.cpu()),
        float((replayed.detach() - rollout).abs().max()),
    )
    destroy_parallel()
    return result


def test_transformer_engine_spec_replays_predicted_routes():
    pytest.importorskip("transformer_engine")
    same_routes, max_diff = run_distributed(_predict_then_replay, 1, SETUP, True)[0]
    assert same_routes
    assert max_diff < 1e-3  # bf16/TF32 kernels: same routes, loss equal to kernel tolerance


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL EP=2")
def test_nccl_expert_parallel_replay():
    setup = dataclasses.replace(SETUP, parallel=ParallelConfig(expert_model_parallel_size=2))
    for same_routes, max_diff in run_distributed(_predict_then_replay, 2, setup, None):
        assert same_routes
        assert max_diff < 1e-3
