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


# ------------------------------------------------------------------------- the total cap
def _brute_force_sample(offers, per_response, total, seed):
    """Keys the cache must keep: scan every offered token by priority (the cache's generator,
    one draw per add of its non-negative keys), keep it while its response holds fewer than
    ``per_response`` and the sample fewer than ``total`` (None: no cap)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = []
    for keys, groups in offers:
        offered = keys >= 0
        priority = torch.rand(int(offered.sum()), generator=generator, dtype=torch.float64)
        tokens += zip(priority.tolist(), keys[offered].tolist(), groups[offered].tolist())
    kept, per_group = [], {}
    for _, key, group in sorted(tokens):
        if total is not None and len(kept) == total:
            break
        if per_group.get(group, 0) < per_response:
            per_group[group] = per_group.get(group, 0) + 1
            kept.append(key)
    return sorted(kept)


def _random_offers(rng, responses, max_len, max_per_forward):
    """Forwards of a rollout pass: each offers a few next positions of random responses (some
    keys -1), rows shuffled; responses span forwards like chunked prefill or decoding."""
    lengths = [rng.randint(1, max_len) for _ in range(responses)]
    done = [0] * responses
    offers = []
    while any(d < n for d, n in zip(done, lengths)):
        keys, groups = [], []
        for response in range(responses):
            for _ in range(rng.randint(0, max_per_forward)):
                if done[response] < lengths[response]:
                    skipped = rng.random() < 0.1
                    keys.append(-1 if skipped else response * 1000 + done[response])
                    groups.append(response)
                    done[response] += 1
        order = list(range(len(keys)))
        rng.shuffle(order)
        if keys:
            offers.append((torch.tensor(keys)[order], torch.tensor(groups)[order]))
    return offers


def _offer(cache, keys, groups):
    """Router inputs / logits that name their token: h = key (bf16-rounded), z = key."""
    values = keys.float().unsqueeze(1)
    cache.add(keys, groups, values.repeat(1, 3), values.repeat(1, 2))


def test_total_cap_keeps_exactly_what_brute_force_selects_and_bounds_held_tokens():
    import random

    rng = random.Random(0)
    capped = 0
    for trial in range(300):
        per_response = rng.choice([1, 2, 3, 8, 50])
        total = rng.choice([None, 1, 2, 5, 10, 30])
        cache = FeatureCache(per_response, seed=trial, max_total_tokens=total)
        offers = _random_offers(rng, rng.randint(1, 8), 40, rng.choice([1, 6, 20]))
        for keys, groups in offers:
            _offer(cache, keys, groups)
            if total is not None:
                assert cache.held_tokens() <= 1.5 * total + keys.numel()
            if rng.random() < 0.2:
                cache.features()  # a read in the middle of the pass changes nothing
        expected = _brute_force_sample(offers, per_response, total, seed=trial)
        features = cache.features()
        kept = [] if features is None else features.keys_C.tolist()
        assert kept == expected, (trial, per_response, total)
        assert len(cache) == len(expected)
        if total is not None:
            assert len(cache) <= total
            capped += len(cache) == total
        if features is not None:
            assert torch.equal(features.logits_CE[:, 0], features.keys_C.float())
            assert torch.equal(features.hidden_CH[:, 0], features.keys_C.float().bfloat16())
    assert capped > 60  # the cap bound in many trials


def test_total_cap_is_a_uniform_sample_of_all_responses_tokens():
    # Responses of 4, 8 and 12 tokens, T_c above every length, a total of 6: every one of the
    # 24 tokens is kept with probability 6/24, whichever forward offered it.
    trials, counts = 600, torch.zeros(24)
    groups = torch.repeat_interleave(torch.arange(3), torch.tensor([4, 8, 12]))
    for trial in range(trials):
        cache = FeatureCache(100, seed=trial, max_total_tokens=6)
        for half in (torch.arange(0, 24, 2), torch.arange(1, 24, 2)):
            _offer(cache, half, groups[half])
        counts += torch.bincount(cache.features().keys_C, minlength=24)
    expected = trials * 6 / 24
    assert (counts - expected).abs().max() < 4 * (expected * (1 - 6 / 24)) ** 0.5


def test_total_cap_holds_the_bytes_it_promises():
    hidden, experts, cap = 64, 16, 100
    cache = FeatureCache(512, seed=0, max_total_tokens=cap)
    generator = torch.Generator().manual_seed(0)
    for forward in range(8):  # 8 prefill forwards of 4 new responses x 256 tokens
        keys = torch.arange(1024) + forward * 1024
        groups = (torch.arange(4) + forward * 4).repeat(256)
        h = torch.randn(1024, hidden, generator=generator)
        cache.add(keys, groups, h, torch.randn(1024, experts, generator=generator))
        assert cache.held_tokens() <= 1.5 * cap + 1024
    assert len(cache) == cap and cache.nbytes() == cap * (2 * hidden + 4 * experts)
    uncapped = FeatureCache(512, seed=0)
    uncapped.add(keys, groups, h, torch.zeros(1024, experts))
    assert len(uncapped) == 1024


def test_bad_total_caps_are_rejected_naming_the_value():
    from pr2_megatron.routing.router import PR2RouterConfig

    with pytest.raises(ValueError, match="total cap must be >= 1 or None, got 0"):
        FeatureCache(4, seed=0, max_total_tokens=0)
    with pytest.raises(ValueError, match="feature_cache_max_total_tokens must be >= 1.*got -3"):
        PR2RouterConfig(feature_cache_max_total_tokens=-3)


# ------------------------------------------------------------------ device-to-host copies
class _LateCopies:
    """Stands in for the GPU's non-blocking copies on CPU: a copy's values (NaN until then)
    arrive only at wait(), so a cache that reads before waiting reads garbage."""

    def __init__(self):
        self._pending = []

    def copy(self, source, dtype, fresh=False):
        host = torch.full(source.shape, float("nan"), dtype=dtype)
        self._pending.append((host, source.detach().to(dtype, copy=True)))
        return host

    @property
    def pending(self):
        return len(self._pending)

    def wait(self):
        for host, value in self._pending:
            host.copy_(value)
        self._pending.clear()

    def forget(self):
        self._pending.clear()


@pytest.mark.parametrize("total", [None, 12])
def test_cache_waits_for_late_host_copies_before_every_read(total):
    import random

    offers = _random_offers(random.Random(1), 6, 30, 5)  # responses span forwards: compactions
    late, direct = FeatureCache(3, seed=4, max_total_tokens=total), FeatureCache(3, 4, total)
    late._copies = _LateCopies()
    generator = torch.Generator().manual_seed(0)
    for step, (keys, groups) in enumerate(offers):
        h = torch.randn(keys.numel(), 5, generator=generator)
        z = torch.randn(keys.numel(), 7, generator=generator)
        late.add(keys, groups, h, z)
        direct.add(keys, groups, h, z)
        if step == len(offers) // 2:
            token_idx, _ = late.lookup(keys)  # a read mid-pass waits too
            assert torch.equal(token_idx, direct.lookup(keys)[0])
            assert late._copies.pending == 0
    a, b = late.features(), direct.features()
    assert late._copies.pending == 0
    assert torch.equal(a.keys_C, b.keys_C)
    assert torch.equal(a.hidden_CH, b.hidden_CH) and torch.equal(a.logits_CE, b.logits_CE)


@pytest.mark.gpu
def test_gpu_cache_copies_into_pinned_memory_without_blocking_and_matches_cpu():
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(4096, 256, generator=generator)
    z = torch.randn(4096, 64, generator=generator)
    keys, groups = torch.arange(4096), torch.arange(4).repeat(1024)
    on_gpu, on_cpu = FeatureCache(512, seed=1), FeatureCache(512, seed=1)
    on_gpu.add(keys, groups, h.cuda(), z.cuda())
    on_cpu.add(keys, groups, h, z)
    assert on_gpu._copies.pending == 2  # issued, not waited for
    chunk = on_gpu._chunks[0]
    assert chunk.hidden_CH.is_pinned() and chunk.logits_CE.is_pinned()
    a, b = on_gpu.features(), on_cpu.features()
    assert on_gpu._copies.pending == 0
    assert a.hidden_CH.device.type == "cpu"
    assert torch.equal(a.keys_C, b.keys_C)
    assert torch.equal(a.hidden_CH, b.hidden_CH) and torch.equal(a.logits_CE, b.logits_CE)
