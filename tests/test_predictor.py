"""Evolution predictor: feature cache, losses, and that it learns a router's drift."""

import pytest
import torch

from pr2_megatron.metrics import topk_overlap
from pr2_megatron.models.builder import MoEModelConfig
from pr2_megatron.routing.controller import RoutingController
from pr2_megatron.routing.feature_cache import FeatureCache
from pr2_megatron.routing.predictor import predictor_loss
from pr2_megatron.testing.moe import TinySetup, build, token_batch


def test_feature_cache_keeps_at_most_tc_tokens_per_response_uniformly():
    cache = FeatureCache(max_tokens_per_group=3, seed=0)
    counts = torch.zeros(10)
    for trial in range(400):
        cache.clear()
        cache._generator.manual_seed(trial)
        keys = torch.arange(20)
        groups = torch.arange(20) // 10  # two responses of 10 tokens
        hidden = torch.arange(20, dtype=torch.float32).unsqueeze(1).repeat(1, 4)
        logits = torch.randn(20, 8)
        # Offered in two forwards of 10 tokens (5 of each response per forward).
        order = (
            torch.cat([torch.arange(0, 5), torch.arange(10, 15)]),
            torch.cat([torch.arange(5, 10), torch.arange(15, 20)]),
        )
        for idx in order:
            cache.add(keys[idx], groups[idx], hidden[idx], logits[idx])
        features = cache.features()
        assert len(cache) == 6
        assert torch.equal(features.keys_C, features.keys_C.sort().values)
        assert (features.keys_C < 10).sum() == 3
        assert torch.equal(features.hidden_CH[:, 0].float(), features.keys_C.float())
        assert features.hidden_CH.dtype == torch.bfloat16
        counts += torch.bincount(features.keys_C[features.keys_C < 10], minlength=10)
    # Uniform along the response: each of the 10 tokens kept 3/10 of the time.
    expected = 400 * 3 / 10
    assert (counts - expected).abs().max() < 4 * (expected * 0.7) ** 0.5


def test_cache_lookup_finds_cached_tokens_of_a_forward():
    cache = FeatureCache(max_tokens_per_group=100, seed=0)
    cache.add(torch.tensor([7, 3, 5]), torch.zeros(3), torch.zeros(3, 2), torch.zeros(3, 4))
    token_idx, cache_idx = cache.lookup(torch.tensor([5, 6, 7, 2]))
    assert token_idx.tolist() == [0, 2]
    assert cache.features().keys_C[cache_idx].tolist() == [5, 7]


@pytest.mark.parametrize("kind", ["kl-post", "l2", "kl"])
def test_predictor_losses_are_zero_at_the_target_and_reach_only_delta(kind):
    old = torch.randn(5, 8)
    shift = torch.randn(5, 8)
    current = (old + shift).requires_grad_(True)
    exact = shift.clone().requires_grad_(True)
    assert predictor_loss(kind, current, old, exact) < 1e-6
    delta = torch.zeros(5, 8, requires_grad=True)
    loss = predictor_loss(kind, current, old, delta)
    loss.backward()
    assert loss > 0 and delta.grad.abs().sum() > 0
    assert current.grad is None  # the target is detached


def test_unknown_loss_is_rejected():
    with pytest.raises(ValueError, match="'mse'"):
        predictor_loss("mse", torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2))


@pytest.mark.usefixtures("megatron_single")
def test_predictor_gradient_only_when_trained_and_only_from_its_loss():
    model = build(TinySetup())
    ctl = RoutingController(model)
    ids, labels = token_batch(2, 8, 64, seed=0)
    positions = torch.arange(8).expand_as(ids)
    ctl.predict()
    with torch.no_grad():
        model(ids, positions, None)
    routes = ctl.collect_routes()[0]
    with torch.no_grad():
        for router in ctl.routers:
            router.weight.add_(torch.randn_like(router.weight) * 0.3)
    for train_predictor in (False, True):
        model.zero_grad()
        ctl.replay(train_predictor=train_predictor)
        ctl.set_targets(routes)
        model(ids, positions, None, labels=labels).sum().backward()
        ctl.finish()
        grads = [p.grad for p in ctl.predictor_parameters()]
        if train_predictor:
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
            assert ctl.metrics()["predictor/loss"] > 0
        else:
            assert all(g is None for g in grads)
    # The predictor loss alone (no policy loss through it): zero the LM path and the predictor
    # still gets exactly the gradient of its own loss.
    model.zero_grad()
    ctl.replay(train_predictor=True)
    ctl.set_targets(routes)
    (model(ids, positions, None, labels=labels).sum() * 0.0).backward()
    ctl.finish()
    assert all(p.grad.abs().sum() > 0 for p in ctl.predictor_parameters())


@pytest.mark.usefixtures("megatron_single")
def test_trained_predictor_anticipates_router_drift_better_than_plain_replay():
    """Synthetic drift: the router follows a fixed objective for N mini-steps per rollout.

    PR2's predicted route must overlap the live route *after* the mini-steps more than the old
    route (plain replay) does, once the predictor has seen a few rollout batches.
    """
    model = build(TinySetup(model=MoEModelConfig(num_layers=2, num_experts=8, topk=2)))
    ctl = RoutingController(model)
    for param in model.parameters():
        param.requires_grad_(False)
    generator = torch.Generator().manual_seed(5)
    drift = []
    for router in ctl.routers:
        router.weight.requires_grad_(True)
        router.predictor.weight.requires_grad_(True)
        drift.append(torch.randn(router.weight.shape, generator=generator))
    opt_router = torch.optim.SGD([r.weight for r in ctl.routers], lr=1e-3)
    # Predictor lr sized to the drift per step (α = 1 relative to the router's 1e-3 here).
    opt_predictor = torch.optim.Adam(ctl.predictor_parameters(), lr=1e-3)
    ids, labels = token_batch(8, 16, 64, seed=0)
    positions = torch.arange(16).expand_as(ids)
    mini_steps = 4
    predicted_overlap, old_overlap = [], []
    for _rollout in range(10):
        ctl.predict()
        with torch.no_grad():
            model(ids, positions, None)
        predicted, old = ctl.collect_routes()[0], ctl.collect_plain_routes()[0]
        for step in range(1, mini_steps + 1):
            ctl.replay(train_predictor=step >= 2)
            ctl.set_targets(predicted, old)
            opt_router.zero_grad()
            opt_predictor.zero_grad()
            policy = model(ids, positions, None, labels=labels).float().mean() * 0.0
            objective = sum((r.weight * d).sum() for r, d in zip(ctl.routers, drift))
            (policy + objective).backward()
            ctl.finish()
            opt_router.step()
            opt_predictor.step()
        ctl.record()
        with torch.no_grad():
            model(ids, positions, None)
        future = ctl.collect_routes()[0].reshape(-1, 2)
        predicted_overlap.append(topk_overlap(predicted.reshape(-1, 2), future).mean().item())
        old_overlap.append(topk_overlap(old.reshape(-1, 2), future).mean().item())
    assert predicted_overlap[0] == old_overlap[0]  # zero-initialised: PR2 == plain replay
    late_predicted = sum(predicted_overlap[-4:]) / 4
    late_old = sum(old_overlap[-4:]) / 4
    assert late_predicted > late_old + 0.01, (predicted_overlap, old_overlap)


def test_cache_skips_negative_keys_like_offering_only_the_others():
    generator = torch.Generator().manual_seed(3)
    keys = torch.tensor([0, -1, 2, 3, -1, 5, 6, 7])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    hidden = torch.randn(8, 4, generator=generator)
    logits = torch.randn(8, 3, generator=generator)
    skipping, filtered = FeatureCache(2, seed=9), FeatureCache(2, seed=9)
    skipping.add(keys, groups, hidden, logits)
    keep = keys >= 0
    filtered.add(keys[keep], groups[keep], hidden[keep], logits[keep])
    a, b = skipping.features(), filtered.features()
    assert torch.equal(a.keys_C, b.keys_C) and (a.keys_C >= 0).all()
    assert torch.equal(a.hidden_CH, b.hidden_CH) and torch.equal(a.logits_CE, b.logits_CE)
