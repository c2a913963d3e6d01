"""Tests for pr2_megatron.metrics against brute-force set/loop references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from pr2_megatron.metrics import (
    RoutingAgreement,
    logprob_mismatch_metrics,
    ppo_clip_fraction,
    predictor_metrics,
    same_set,
    topk_overlap,
)
from pr2_megatron.testing.distributed import run_distributed

DTYPES = [torch.uint8, torch.int16, torch.int32, torch.int64]


# ---------------------------------------------------------------------------------------------
# Helpers: random routes and slow references
# ---------------------------------------------------------------------------------------------


def random_routes(gen: torch.Generator, T: int, K: int, E: int, dtype=torch.int64) -> torch.Tensor:
    """[T, K] rows of K distinct experts out of E."""
    return (
        torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
        .reshape(T, K)
        .to(dtype)
    )


def perturb(gen: torch.Generator, routes: torch.Tensor, E: int, p: float) -> torch.Tensor:
    """Copy of routes where each row is, with probability p, replaced by a fresh random row;
    rows are also shuffled so order within a row never matters."""
    T, K = routes.shape
    out = routes.clone().long()
    for t in range(T):
        if torch.rand((), generator=gen).item() < p:
            # keep some overlap: replace one id or the whole row
            if torch.rand((), generator=gen).item() < 0.5 and K < E:
                free = [e for e in range(E) if e not in set(out[t].tolist())]
                j = int(torch.randint(K, (), generator=gen))
                out[t, j] = free[int(torch.randint(len(free), (), generator=gen))]
            else:
                out[t] = torch.randperm(E, generator=gen)[:K]
        out[t] = out[t][torch.randperm(K, generator=gen)]
    return out.to(routes.dtype)


def ref_overlap(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    k = a.shape[1]
    return [len(set(x) & set(y)) / k for x, y in zip(a.tolist(), b.tolist())]


def ref_same(a: torch.Tensor, b: torch.Tensor) -> list[bool]:
    return [set(x) == set(y) for x, y in zip(a.tolist(), b.tolist())]


def ref_summary(forwards: list[dict[int, tuple]]) -> dict[str, float]:
    """Brute-force summary; forwards: list of {layer: (replayed, live, old|None)}."""
    pairs, ovl, dis = {}, {}, {}
    old_pairs, old_ovl = {}, {}
    tokens = zero_dev = 0
    for fwd in forwards:
        T = next(iter(fwd.values()))[0].shape[0]
        for t in range(T):
            tokens += 1
            all_same = True
            for n, (rep, live, old) in fwd.items():
                a, b = set(rep[t].tolist()), set(live[t].tolist())
                k = rep.shape[1]
                pairs[n] = pairs.get(n, 0) + 1
                ovl[n] = ovl.get(n, 0.0) + len(a & b) / k
                dis[n] = dis.get(n, 0) + (a != b)
                all_same = all_same and a == b
                if old is not None:
                    o = set(old[t].tolist())
                    old_pairs[n] = old_pairs.get(n, 0) + 1
                    old_ovl[n] = old_ovl.get(n, 0.0) + len(o & b) / k
            zero_dev += all_same
    out = {
        "topk_overlap/replayed": sum(ovl.values()) / sum(pairs.values()),
        "router_disagreement": sum(dis.values()) / sum(pairs.values()),
        "zero_deviation_ratio": zero_dev / tokens,
        "tokens_with_any_disagreement": (tokens - zero_dev) / tokens,
    }
    for n in pairs:
        out[f"topk_overlap/replayed/layer_{n}"] = ovl[n] / pairs[n]
        out[f"router_disagreement/layer_{n}"] = dis[n] / pairs[n]
    if old_pairs:
        out["topk_overlap/plain"] = sum(old_ovl.values()) / sum(old_pairs.values())
        for n in pairs:
            out[f"topk_overlap/plain/layer_{n}"] = (
                old_ovl[n] / old_pairs[n] if n in old_pairs else 0.0
            )
    return out


def assert_summary_close(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def make_forwards(seed: int, n_fwd: int, layers: list[int], E: int, K: int, with_old: bool):
    gen = torch.Generator().manual_seed(seed)
    dtypes = DTYPES if E <= 256 else DTYPES[1:]  # never wrap ids in uint8
    forwards = []
    for f in range(n_fwd):
        T = int(torch.randint(0 if f else 1, 24, (), generator=gen))
        fwd = {}
        for i, n in enumerate(layers):
            live = random_routes(gen, T, K, E, dtypes[(seed + i + f) % len(dtypes)])
            rep = perturb(gen, live, E, p=0.3).to(dtypes[(seed + 2 * i) % len(dtypes)])
            old = perturb(gen, live, E, p=0.5).to(dtypes[(seed + 3 * i + 1) % len(dtypes)])
            fwd[n] = (rep, live, old if with_old else None)
        forwards.append(fwd)
    return forwards


def accumulate(forwards, agreement: RoutingAgreement | None = None) -> RoutingAgreement:
    agreement = agreement if agreement is not None else RoutingAgreement()
    for fwd in forwards:
        agreement.begin_forward()
        for n, (rep, live, old) in fwd.items():
            agreement.update(n, rep, live, old)
    return agreement


# ---------------------------------------------------------------------------------------------
# topk_overlap / same_set
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_topk_overlap_and_same_set_match_set_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    E, K, T = [(8, 2, 50), (64, 6, 40), (300, 8, 30), (16, 16, 10)][seed]
    for da in DTYPES:
        for db in DTYPES:
            if E > 256 and torch.uint8 in (da, db):
                continue
            a = random_routes(gen, T, K, E, da)
            b = perturb(gen, a, E, p=0.6).to(db)
            got = topk_overlap(a, b)
            assert got.dtype == torch.float32 and got.shape == (T,)
            assert got.tolist() == pytest.approx(ref_overlap(a, b))
            assert same_set(a, b).tolist() == ref_same(a, b)
            assert same_set(a, b).dtype == torch.bool


def test_topk_overlap_hand_cases():
    a = torch.tensor([[0, 1, 2], [3, 4, 5], [7, 8, 9]], dtype=torch.uint8)
    b = torch.tensor([[2, 0, 1], [3, 9, 6], [0, 1, 2]], dtype=torch.int64)
    assert topk_overlap(a, b).tolist() == pytest.approx([1.0, 1 / 3, 0.0])
    assert same_set(a, b).tolist() == [True, False, False]
    assert topk_overlap(a[:0], b[:0]).shape == (0,)


def test_route_shape_errors():
    a = torch.zeros(4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="k mismatch"):
        topk_overlap(a, torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="T=4"):
        same_set(a, torch.zeros(5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="2-D"):
        topk_overlap(a.flatten(), a.flatten())
    with pytest.raises(ValueError, match="float32"):
        topk_overlap(a.float(), a)
    with pytest.raises(ValueError, match="k must be"):
        topk_overlap(a[:, :0], a[:, :0])


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_topk_overlap_properties(data):
    E = data.draw(st.integers(1, 40), label="E")
    K = data.draw(st.integers(1, min(E, 8)), label="K")
    T = data.draw(st.integers(0, 12), label="T")
    rows = st.permutations(list(range(E))).map(lambda p: p[:K])
    a_rows = data.draw(st.lists(rows, min_size=T, max_size=T), label="a")
    b_rows = data.draw(st.lists(rows, min_size=T, max_size=T), label="b")
    da = data.draw(st.sampled_from(DTYPES), label="dtype_a")
    db = data.draw(st.sampled_from(DTYPES), label="dtype_b")
    a = torch.tensor(a_rows, dtype=da).reshape(T, K)
    b = torch.tensor(b_rows, dtype=db).reshape(T, K)
    ab, ba = topk_overlap(a, b), topk_overlap(b, a)
    assert torch.equal(ab, ba)
    assert bool(((ab >= 0) & (ab <= 1)).all())
    perm = torch.tensor(data.draw(st.permutations(list(range(K))), label="perm"), dtype=torch.long)
    assert bool((topk_overlap(a, a[:, perm].to(db)) == 1).all())
    assert bool(same_set(a, a[:, perm]).all())
    assert same_set(a, b).tolist() == ref_same(a, b)


# ---------------------------------------------------------------------------------------------
# RoutingAgreement
# ---------------------------------------------------------------------------------------------


def test_agreement_hand_case_two_tokens_two_layers():
    live1 = torch.tensor([[0, 1], [2, 3]])
    live2 = torch.tensor([[4, 5], [6, 7]])
    rep1 = torch.tensor([[1, 0], [2, 3]])  # both agree (token 0 permuted)
    rep2 = torch.tensor([[4, 5], [6, 0]])  # token 1 differs in one expert
    old1 = torch.tensor([[0, 9], [8, 9]])  # 1/2, 0
    old2 = torch.tensor([[4, 5], [7, 6]])  # 1, 1
    acc = RoutingAgreement()
    acc.update(1, rep1, live1, old1)
    acc.update(2, rep2, live2, old2)
    s = acc.summary()
    assert s == {
        "topk_overlap/replayed": pytest.approx((1 + 1 + 1 + 0.5) / 4),
        "router_disagreement": pytest.approx(1 / 4),
        "zero_deviation_ratio": pytest.approx(1 / 2),
        "tokens_with_any_disagreement": pytest.approx(1 / 2),
        "topk_overlap/plain": pytest.approx((0.5 + 0 + 1 + 1) / 4),
        "topk_overlap/replayed/layer_1": pytest.approx(1.0),
        "topk_overlap/replayed/layer_2": pytest.approx(0.75),
        "router_disagreement/layer_1": pytest.approx(0.0),
        "router_disagreement/layer_2": pytest.approx(0.5),
        "topk_overlap/plain/layer_1": pytest.approx(0.25),
        "topk_overlap/plain/layer_2": pytest.approx(1.0),
    }
    assert acc.num_tokens == 2


def test_zero_deviation_is_per_token_across_layers():
    # Each layer alone agrees on half the tokens, but never on the same token.
    live = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    wrong = torch.tensor([[0, 9], [2, 9], [4, 9], [6, 9]])
    mix1 = torch.where(torch.tensor([[True], [True], [False], [False]]), live, wrong)
    mix2 = torch.where(torch.tensor([[False], [False], [True], [True]]), live, wrong)
    acc = RoutingAgreement()
    acc.update(3, mix1, live)
    acc.update(7, mix2, live)
    s = acc.summary()
    assert s["router_disagreement/layer_3"] == pytest.approx(0.5)
    assert s["router_disagreement/layer_7"] == pytest.approx(0.5)
    assert s["router_disagreement"] == pytest.approx(0.5)
    assert s["zero_deviation_ratio"] == 0.0
    assert s["tokens_with_any_disagreement"] == 1.0
    assert "topk_overlap/plain" not in s


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("with_old", [True, False])
def test_agreement_matches_brute_force(seed, with_old):
    layers = [[1, 2, 3], [5], [2, 4, 6, 8]][seed]
    E, K = [(8, 2), (64, 8), (300, 4)][seed]
    forwards = make_forwards(seed, n_fwd=4, layers=layers, E=E, K=K, with_old=with_old)
    acc = accumulate(forwards)
    assert_summary_close(acc.summary(), ref_summary(forwards))
    # summary() and as_tensor() do not close the open forward; begin_forward() does
    assert acc.summary() == acc.summary()
    # round trip through the flat tensor
    again = RoutingAgreement.from_tensor(acc.as_tensor(), acc.layer_numbers)
    assert_summary_close(again.summary(), ref_summary(forwards))


def test_agreement_forward_ordering_errors_and_empty():
    acc = RoutingAgreement()
    s = acc.summary()
    assert s == {
        "topk_overlap/replayed": 0.0,
        "router_disagreement": 0.0,
        "zero_deviation_ratio": 0.0,
        "tokens_with_any_disagreement": 0.0,
    }
    assert not any(math.isnan(v) for v in s.values())
    r = torch.tensor([[0, 1], [1, 2]])
    acc.update(1, r, r)
    with pytest.raises(ValueError, match="layer 1 updated twice"):
        acc.update(1, r, r)
    with pytest.raises(ValueError, match="T=1 tokens"):
        acc.update(2, r[:1], r[:1])
    with pytest.raises(ValueError, match="plain_TK shape"):
        acc.update(2, r, r, r[:1])
    with pytest.raises(ValueError, match="layer_number"):
        acc.update(-1, r, r)
    acc.begin_forward()
    acc.update(1, r[:1], r[:1])  # a new forward may have a different T
    assert acc.num_tokens == 3
    fixed = RoutingAgreement(layer_numbers=[1, 2])
    with pytest.raises(ValueError, match="not in the fixed layer set"):
        fixed.update(3, r, r)
    assert fixed.as_tensor().shape == (2 + 5 * 2,)
    assert set(fixed.summary()) >= {"topk_overlap/replayed/layer_1", "router_disagreement/layer_2"}
    with pytest.raises(ValueError, match="expected length 12"):
        RoutingAgreement.from_tensor(torch.zeros(7), [1, 2])
    acc.reset()
    assert acc.num_tokens == 0 and acc.layer_numbers == []


# ---------------------------------------------------------------------------------------------
# Distributed reduction (2 ranks, gloo)
# ---------------------------------------------------------------------------------------------


def _rank_forwards(rank: int):
    # Forwards after the first may be empty (T = 0) on either rank.
    return make_forwards(100 + rank, n_fwd=3, layers=[1, 2, 4], E=32, K=4, with_old=True)


def _dist_worker() -> dict:
    dist.init_process_group("gloo")  # env:// set by run_distributed
    rank = dist.get_rank()
    acc = accumulate(_rank_forwards(rank))
    acc.reduce_()
    result = {"summary": acc.summary()}
    # a rank with no tokens still takes part when the layer set is declared
    empty = RoutingAgreement(layer_numbers=[1, 2, 4])
    if rank == 0:
        accumulate(_rank_forwards(0), empty)
    result["declared"] = empty.reduce_().summary()
    # mismatched layer sets are detected on every rank (no hang)
    bad = RoutingAgreement(layer_numbers=[1, 2] if rank == 0 else [1, 3])
    try:
        bad.reduce_()
        result["mismatch_error"] = ""
    except ValueError as e:
        result["mismatch_error"] = str(e)
    return result


@pytest.mark.slow
def test_reduce_matches_single_process_on_concatenated_data():
    world_size = 2
    results = run_distributed(_dist_worker, world_size)
    # single process: forward f of the reference = forward f of every rank, tokens concatenated
    per_rank = [_rank_forwards(r) for r in range(world_size)]
    concatenated = []
    for f in range(len(per_rank[0])):
        fwd = {}
        for n in per_rank[0][f]:
            parts = [per_rank[r][f][n] for r in range(world_size)]
            fwd[n] = tuple(torch.cat([p[i].long() for p in parts]) for i in range(3))
        concatenated.append(fwd)
    want = accumulate(concatenated).summary()
    assert_summary_close(want, ref_summary(concatenated))
    only_rank0 = accumulate(per_rank[0]).summary()
    for result in results:
        assert_summary_close(result["summary"], want)
        assert_summary_close(result["declared"], only_rank0)
        assert "different MoE layer sets" in result["mismatch_error"]


# ---------------------------------------------------------------------------------------------
# Log-prob level
# ---------------------------------------------------------------------------------------------


def test_logprob_mismatch_hand_computed():
    lp_rollout = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, 0.0, -1.0]])
    delta = torch.tensor([[0.1, -1.0, 0.0], [0.8, 5.0, -0.2]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    lp_train = lp_rollout + delta
    lp_train[1, 2] = float("nan")  # padding garbage outside the mask
    d = [0.1, -1.0, 0.0, 0.8]
    r = [math.exp(x) for x in d]
    mean_r = sum(r) / 4
    want = {
        "k3_kl": sum(math.exp(x) - 1 - x for x in d) / 4,
        "extreme_token_fraction": 2 / 4,  # |-1.0| and |0.8| exceed ln 2 = 0.693
        "is_ratio/mean": mean_r,
        "is_ratio/std": math.sqrt(sum((x - mean_r) ** 2 for x in r) / 4),
        "is_ratio/max": math.exp(0.8),
    }
    for m in (mask, mask.float()):
        got = logprob_mismatch_metrics(lp_train, lp_rollout, m)
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-6), key


@pytest.mark.parametrize("seed", range(3))
def test_logprob_mismatch_matches_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    lp_rollout = -torch.rand(4, 17, generator=gen) * 3
    lp_train = lp_rollout + torch.randn(4, 17, generator=gen) * 0.5
    mask = torch.rand(4, 17, generator=gen) < 0.7
    d = [
        float(a) - float(b)
        for a, b, m in zip(lp_train.flatten(), lp_rollout.flatten(), mask.flatten())
        if m
    ]
    r = [math.exp(x) for x in d]
    got = logprob_mismatch_metrics(lp_train.bfloat16(), lp_rollout.bfloat16(), mask)
    got32 = logprob_mismatch_metrics(lp_train, lp_rollout, mask)
    assert got32["k3_kl"] == pytest.approx(sum(x - 1 - math.log(x) for x in r) / len(r), rel=1e-5)
    assert got32["extreme_token_fraction"] == pytest.approx(
        sum(abs(x) > math.log(2) for x in d) / len(d)
    )
    assert got32["is_ratio/mean"] == pytest.approx(sum(r) / len(r), rel=1e-5)
    assert got32["is_ratio/std"] == pytest.approx(torch.tensor(r).std(unbiased=False).item(), 1e-5)
    assert got32["is_ratio/max"] == pytest.approx(max(r), rel=1e-5)
    assert got["k3_kl"] >= 0  # bf16 inputs are accepted


def test_logprob_mismatch_small_delta_precision_and_empty():
    lp = torch.zeros(8)
    got = logprob_mismatch_metrics(lp + 1e-4, lp, torch.ones(8, dtype=torch.bool))
    assert got["k3_kl"] == pytest.approx(0.5e-8, rel=1e-3)  # Δ²/2, no cancellation
    empty = logprob_mismatch_metrics(lp, lp, torch.zeros(8, dtype=torch.bool))
    assert empty == dict.fromkeys(got, 0.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        logprob_mismatch_metrics(lp, lp[:4], torch.ones(8))


def test_ppo_clip_fraction_hand_and_loop():
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.0, 1.28, 0.8, 2.0, 9.0])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0, -1.0, 0.0, 1.0])
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
    # clipped: (1.5, A>0) and (0.5, A<0); boundaries 1.28 / 0.8 and A == 0 do not count
    assert ppo_clip_fraction(ratio, adv, mask) == pytest.approx(2 / 8)
    assert ppo_clip_fraction(ratio, adv, mask, eps_low=0.6, eps_high=0.6) == 0.0
    assert ppo_clip_fraction(ratio, adv, torch.zeros(9, dtype=torch.bool)) == 0.0
    # exactly on the clip boundary (binary-exact values): clipped term == unclipped, not counted
    on_edge = torch.tensor([0.75, 1.5, 0.75, 1.5])
    edge_adv = torch.tensor([-1.0, 1.0, 1.0, -1.0])
    edge_mask = torch.ones(4, dtype=torch.bool)
    assert ppo_clip_fraction(on_edge, edge_adv, edge_mask, eps_low=0.25, eps_high=0.5) == 0.0
    assert ppo_clip_fraction(on_edge, edge_adv, edge_mask, eps_low=0.125, eps_high=0.25) == 0.5
    with pytest.raises(ValueError, match="shape mismatch"):
        ppo_clip_fraction(ratio, adv[:3], mask)
    with pytest.raises(ValueError, match="eps_low"):
        ppo_clip_fraction(ratio, adv, mask, eps_low=-0.1)

    gen = torch.Generator().manual_seed(0)
    ratio = torch.exp(torch.randn(200, generator=gen) * 0.3)
    adv = torch.randn(200, generator=gen)
    mask = torch.rand(200, generator=gen) < 0.8
    n = clipped = 0
    for r, a, m in zip(ratio.tolist(), adv.tolist(), mask.tolist()):
        if not m:
            continue
        n += 1
        unclipped = r * a
        clip_term = min(max(r, 0.8), 1.28) * a
        clipped += clip_term < unclipped  # min() picks the clipped term, and it differs
    assert ppo_clip_fraction(ratio, adv, mask.float()) == pytest.approx(clipped / n)


def test_predictor_metrics():
    delta = torch.tensor([[0.1, -0.3], [0.0, 0.2]])
    logits = torch.tensor([[1.0, -2.0], [3.0, -2.0]])
    got = predictor_metrics(delta, logits)
    assert got["predictor/delta_to_logit_ratio"] == pytest.approx((0.6 / 4) / (8.0 / 4))
    assert got["predictor/delta_abs_mean"] == pytest.approx(0.15)
    assert got["predictor/logit_abs_mean"] == pytest.approx(2.0)
    zero = predictor_metrics(torch.zeros(0, 4), torch.zeros(0, 4))
    assert zero["predictor/delta_to_logit_ratio"] == 0.0
    assert predictor_metrics(delta, torch.zeros(2, 2))["predictor/delta_to_logit_ratio"] == 0.0
    with pytest.raises(ValueError, match="shape mismatch"):
        predictor_metrics(delta, logits[:1])
