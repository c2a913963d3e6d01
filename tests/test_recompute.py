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


# ------------------------------------------------------- pairing in any backward order
RECOMPUTE = {"moe": ("selective", ["moe"]), "full": ("full", ["moe"])}


def _model_pair(kind, router="pr2"):
    """The same moved-router weights without and with ``kind`` recompute."""
    base = MoEModelConfig(num_layers=2, num_experts=4, topk=2)
    plain = build(TinySetup(model=base), router=router)
    with torch.no_grad():
        for name, param in plain.named_parameters():
            if name.endswith("router.weight"):
                param.add_(torch.randn_like(param))
    state = global_state_dict(plain)
    granularity, modules = RECOMPUTE[kind]
    cfg = MoEModelConfig(
        num_layers=2,
        num_experts=4,
        topk=2,
        recompute_granularity=granularity,
        recompute_modules=modules,
    )
    recomputed = build(TinySetup(model=cfg), router=router)
    load_full_state(recomputed, state)
    return plain, recomputed


def _micro_batches():
    """Two same-shape micro-batches and a route per micro-batch that differs from the live one."""
    first, second = token_batch(2, 8, 64, seed=5), token_batch(2, 8, 64, seed=6)
    generator = torch.Generator().manual_seed(9)
    routes = [torch.rand(16, 2, 4, generator=generator).argsort(-1)[..., :2] for _ in range(2)]
    return [first, second], routes


def _loss(model, ids, labels):
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return model(ids, positions, None, labels=labels).sum()


def _train(model, batches, routes, order, phase="replay", no_grad_between=False):
    """Forward both micro-batches, then backward in ``order`` ('sum', 'reverse', 'forward')."""
    ctl = RoutingController(model)
    if phase == "replay":
        ctl.replay()
        for route in routes:
            ctl.set_targets(route)
    else:
        ctl.off()
    losses = []
    for index, (ids, labels) in enumerate(batches):
        losses.append(_loss(model, ids, labels))
        if no_grad_between and index == 0:
            if phase == "replay":
                ctl.set_targets(routes[1])
            with torch.no_grad():  # e.g. reference log-probs, model in training mode
                _loss(model, *batches[1])
    if order == "sum":
        (losses[0] + losses[1]).backward()
    else:
        for loss in losses[::-1] if order == "reverse" else losses:
            loss.backward()
    if phase == "replay":
        ctl.finish()
    return {n: p.grad.clone() for n, p in global_parameters(model).items() if p.grad is not None}


@pytest.mark.parametrize("kind", sorted(RECOMPUTE))
@pytest.mark.parametrize("order", ["sum", "reverse"])
def test_recompute_pairs_each_forward_with_its_route_in_any_backward_order(kind, order):
    plain, recomputed = _model_pair(kind)
    batches, routes = _micro_batches()
    reference = _train(plain, batches, routes, "forward")
    got = _train(recomputed, batches, routes, order)
    assert reference.keys() == got.keys()
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", sorted(RECOMPUTE))
def test_a_no_grad_forward_in_between_changes_nothing(kind):
    plain, recomputed = _model_pair(kind)
    batches, routes = _micro_batches()
    reference = _train(plain, batches, routes, "forward")
    ctl = RoutingController(recomputed)
    got = _train(recomputed, batches, routes, "sum", no_grad_between=True)
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-6, atol=1e-7, msg=name)
    # finish() released the route kept for the no-grad forward's (never coming) recompute.
    assert all(len(r._recompute_routes) == 0 for r in ctl.routers)


@pytest.mark.parametrize("kind", sorted(RECOMPUTE))
def test_phase_off_under_recompute_equals_the_stock_router(kind):
    _, stock = _model_pair(kind, router="topk")
    _, pr2 = _model_pair(kind)
    load_full_state(pr2, {**global_state_dict(stock), **_predictors(pr2)})
    batches, routes = _micro_batches()
    stock_grads = _train_stock(stock, batches)
    pr2_grads = _train(pr2, batches, routes, "sum", phase="off")
    for name in stock_grads:
        torch.testing.assert_close(pr2_grads[name], stock_grads[name], rtol=0, atol=0, msg=name)


def _predictors(model):
    return {n: p.detach().clone() for n, p in global_parameters(model).items() if "predictor" in n}


def _train_stock(model, batches):
    losses = [_loss(model, ids, labels) for ids, labels in batches]
    (losses[0] + losses[1]).backward()
    return {n: p.grad.clone() for n, p in global_parameters(model).items() if p.grad is not None}


def test_a_recompute_without_the_route_of_its_forward_is_an_error():
    from pr2_megatron.errors import RouteError
    from pr2_megatron.routing.recompute import RecomputeRoutes

    store = RecomputeRoutes(lambda: 3)
    store.file(torch.zeros(4, 2, dtype=torch.long))  # forward #n
    with pytest.raises(RouteError, match="MoE layer 3: activation recompute of forward #"):
        store.take(num_tokens=4)  # the counter moved on: #n+1 was never filed


@pytest.mark.parametrize("kind", sorted(RECOMPUTE))
def test_predictor_loss_reaches_backward_under_recompute(kind):
    """The checkpointed forward runs without a graph: the loss is attached in its recompute."""
    from pr2_megatron.testing.moe import randomize_predictors

    plain, recomputed = _model_pair(kind)
    randomize_predictors(plain, scale=1.0, seed=3)
    randomize_predictors(recomputed, scale=1.0, seed=3)
    batches, routes = _micro_batches()
    grads = []
    for model in (plain, recomputed):
        ctl = RoutingController(model)
        ctl.predict()
        with torch.no_grad():
            for ids, _ in batches:
                model(ids, torch.arange(8).expand_as(ids), None)
        ctl.replay(train_predictor=True)
        for route in routes:
            ctl.set_targets(route)
        losses = [_loss(model, ids, labels) for ids, labels in batches]
        (losses[0] + losses[1]).backward()
        ctl.finish()
        grads.append({n: p.grad for n, p in global_parameters(model).items() if "predictor" in n})
        assert ctl.metrics()["predictor/loss"] > 0
    reference, got = grads
    assert reference and all(g is not None and g.abs().sum() > 0 for g in reference.values())
    for name in reference:
        assert got[name] is not None, name
        torch.testing.assert_close(got[name], reference[name], rtol=1e-5, atol=1e-7, msg=name)
