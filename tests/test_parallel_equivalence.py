"""PR2 under expert and tensor/sequence parallelism equals the single-process reference.

Each layout runs predict (with a non-zero predictor, so predicted != live routes) and then a
replay training forward/backward with predictor training, in 2 gloo ranks; the reference runs
the same in one process with the same weights. Routes must be identical token by token, token
losses equal within float tolerance, and gradients equal after the reduction Megatron applies
(sum over data-parallel ranks for the token-sum loss; predictor losses are means, so averaged
over data-parallel ranks and summed over sequence-parallel ranks).
"""

import dataclasses

import pytest
import torch

from pr2_megatron.models.builder import MoEModelConfig
from pr2_megatron.runtime.parallel import ParallelConfig
from pr2_megatron.testing.distributed import run_distributed
from pr2_megatron.testing.moe import TinySetup

pytestmark = pytest.mark.slow

BATCH, SEQ = 2, 8


def _model_cfg(dispatcher):
    return MoEModelConfig(num_layers=2, num_experts=4, topk=2, token_dispatcher=dispatcher)


def _pr2_step(setup, full_state, ids, labels, batch_index):
    """Predict, then one replay training step with predictor training; return what to compare."""
    from megatron.core import parallel_state

    from pr2_megatron.routing.controller import RoutingController
    from pr2_megatron.testing.moe import build, global_parameters, load_full_state

    model = build(setup)
    load_full_state(model, full_state)
    ctl = RoutingController(model)
    ids, labels = ids[batch_index], labels[batch_index]
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    ctl.predict()
    with torch.no_grad():
        model(ids, positions, None)
    routes = ctl.collect_routes()[0]
    live = ctl.collect_plain_routes()[0]
    ctl.replay(train_predictor=True)
    ctl.set_targets(routes)
    token_loss = model(ids, positions, None, labels=labels)
    token_loss.sum().backward()
    ctl.finish()
    grads = {
        name: param.grad.detach().clone()
        for name, param in global_parameters(model).items()
        if param.grad is not None and ("router" in name or "local_experts" in name)
    }
    return {
        "routes": routes,
        "live": live,
        "token_loss": token_loss.detach(),
        "grads": grads,
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "dp_rank": parallel_state.get_data_parallel_rank(),
    }


def _reference(setup, ids, labels):
    from pr2_megatron.testing.moe import build, global_state_dict, randomize_predictors

    model = build(setup)
    randomize_predictors(model, scale=1.0, seed=7)
    full_state = global_state_dict(model)
    return full_state, _pr2_step(setup, full_state, ids, labels, slice(None))


def _by_sample(routes_TLK, seq, batch):
    """[S·B, L, K] in Megatron's [S, B] order -> [S, B, L, K]."""
    return routes_TLK.reshape(seq, batch, *routes_TLK.shape[1:])


@pytest.mark.parametrize(
    "layout",
    ["ep2_alltoall", "ep2_allgather", "tp2_sp"],
)
def test_two_rank_layout_matches_single_process(layout):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (BATCH, SEQ), generator=generator)
    labels = torch.randint(0, 64, (BATCH, SEQ), generator=generator)
    dispatcher = "allgather" if layout == "ep2_allgather" else "alltoall"
    ref_setup = TinySetup(model=_model_cfg(dispatcher))
    full_state, ref = run_distributed(_reference, 1, ref_setup, ids, labels)[0]
    ref_routes = _by_sample(ref["routes"], SEQ, BATCH)
    assert not torch.equal(ref["routes"], ref["live"]), "predictor too weak to change routes"

    if layout.startswith("ep2"):
        parallel = ParallelConfig(expert_model_parallel_size=2)
        batch_of_rank = [slice(0, 1), slice(1, 2)]  # data parallel: one sample per rank
    else:
        parallel = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
        batch_of_rank = [slice(None), slice(None)]
    setup = dataclasses.replace(ref_setup, parallel=parallel)
    results = [run_distributed(_rank_entry, 2, setup, full_state, ids, labels, batch_of_rank)][0]

    for rank, res in enumerate(results):
        if layout.startswith("ep2"):
            expected = ref_routes[:, rank : rank + 1].reshape(SEQ, -1, 2)
            expected_loss = ref["token_loss"][rank : rank + 1]
        else:
            chunk = SEQ // 2
            expected = ref_routes[rank * chunk : (rank + 1) * chunk].reshape(-1, 2, 2)
            expected_loss = ref["token_loss"]
        assert torch.equal(res["routes"], expected), f"rank {rank}: routes differ"
        torch.testing.assert_close(res["token_loss"], expected_loss, rtol=1e-5, atol=1e-6)

    for name, ref_grad in ref["grads"].items():
        holders = [res["grads"][name] for res in results if name in res["grads"]]
        assert holders, f"{name}: no rank holds a gradient"
        if "predictor" in name and layout.startswith("ep2"):
            combined = torch.stack(holders).mean(0)  # DP average of per-rank means
        else:
            combined = torch.stack(holders).sum(0)
        torch.testing.assert_close(combined, ref_grad, rtol=1e-4, atol=1e-6, msg=name)
    assert any("predictor" in name for name in ref["grads"])


def _rank_entry(setup, full_state, ids, labels, batch_of_rank):
    import torch.distributed as dist

    from pr2_megatron.runtime.parallel import initialize_parallel

    initialize_parallel(setup.parallel, seed=setup.seed)
    return _pr2_step(setup, full_state, ids, labels, batch_of_rank[dist.get_rank()])
