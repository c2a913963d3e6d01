"""Activation recompute replays the recorded route, also after the router weights moved."""

import pytest
import torch

from pr2_megatron.models.builder import MoEModelConfig
from pr2_megatron.routing.controller import RoutingController
from pr2_megatron.testing.moe import (
    TinySetup,
    build,
    global_parameters,
    global_state_dict,
    load_full_state,
    token_batch,
)

pytestmark = pytest.mark.usefixtures("megatron_single")


def _replay_step(model, routes, ids, labels):
    ctl = RoutingController(model)
    ctl.replay(collect_metrics=True)
    ctl.set_targets(routes)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    loss = model(ids, positions, None, labels=labels).sum()
    loss.backward()
    ctl.finish()
    grads = {n: p.grad.clone() for n, p in global_parameters(model).items() if p.grad is not None}
    return loss.detach(), grads, ctl.metrics()


@pytest.mark.parametrize(
    "granularity, modules", [("selective", ["moe"]), ("full", ["moe"])], ids=["moe", "full"]
)
def test_recompute_replays_recorded_route_after_router_moved(granularity, modules):
    base = MoEModelConfig(num_layers=2, num_experts=4, topk=2)
    plain = build(TinySetup(model=base))
    ctl = RoutingController(plain)
    ids, labels = token_batch(2, 12, 64, seed=3)
    positions = torch.arange(12).expand_as(ids)
    ctl.record()
    with torch.no_grad():
        plain(ids, positions, None)
    routes = ctl.collect_routes()[0]
    with torch.no_grad():
        for router in ctl.routers:
            router.weight.add_(torch.randn_like(router.weight) * 1.0)
    moved = global_state_dict(plain)
    loss_plain, grads_plain, metrics = _replay_step(plain, routes, ids, labels)
    assert metrics["zero_deviation_ratio"] < 1.0, "router did not move enough to test recompute"

    recomputed_cfg = MoEModelConfig(
        num_layers=2,
        num_experts=4,
        topk=2,
        recompute_granularity=granularity,
        recompute_modules=modules,
    )
    recomputed = build(TinySetup(model=recomputed_cfg))
    load_full_state(recomputed, moved)
    rctl = RoutingController(recomputed)
    calls = []
    for router in rctl.routers:
        router.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    loss_rec, grads_rec, _ = _replay_step(recomputed, routes, ids, labels)
    # Each router ran twice: the checkpointed forward (no grad) and its recompute (grad).
    assert calls.count(False) == 2 and calls.count(True) == 2
    assert torch.equal(loss_plain, loss_rec)
    assert grads_plain.keys() == grads_rec.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_rec[name], grads_plain[name], rtol=0, atol=0, msg=name)
