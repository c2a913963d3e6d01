"""KV-cached rollout (rl/generation.py) against the full-forward sampler (rl/rollout.py).

With fp32 rollout numerics and the same generator, the cached sampler must draw the same tokens,
give the same log-probs (1e-5) and capture the same routes as the full-forward sampler, for
prompts of mixed lengths, in the record and the predict phase (PR2 routes, plain-replay routes
and feature-cache keys), with EP=2 on 2 gloo ranks (ranks with other prompt lengths, one rank
finishing early and running idle forwards) and TP=2; TP=2 with sequence parallelism falls back
to the full-forward sampler. The sampling noise itself is checked against ``torch.multinomial``.
"""

import dataclasses

import pytest
import torch
from support.mla import TINY_MLA

from pr2_megatron.models import MoEModelConfig
from pr2_megatron.rl.sampling import StepNoise, sample_tokens, sample_with_noise
from pr2_megatron.rl.tasks import Problem
from pr2_megatron.runtime.parallel import ParallelConfig
from pr2_megatron.testing.distributed import run_distributed
from pr2_megatron.testing.moe import TinySetup

EOS, PAD = 2, 0
MODEL = MoEModelConfig(
    num_experts=8, topk=2, vocab_size=32, max_sequence_length=32, init_method_std=0.2
)


# ------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("batch, vocab", [(1, 1), (4, 7), (32, 16), (3, 2000)])
def test_exponential_race_draws_what_multinomial_draws(batch, vocab):
    # The samplers replaced torch.multinomial(probs, 1): same tokens, same generator stream.
    for seed in range(5):
        logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(100 + seed)) * 3
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        tokens, logprobs = sample_tokens(logits, 0.8, 1.0, ours)
        probs = torch.softmax(logits / 0.8, -1)
        assert torch.equal(tokens, torch.multinomial(probs, 1, generator=theirs).squeeze(-1))
        assert torch.equal(ours.get_state(), theirs.get_state())
        expected = torch.log_softmax(logits / 0.8, -1).gather(-1, tokens[:, None]).squeeze(-1)
        torch.testing.assert_close(logprobs, expected)


def test_nucleus_truncation_never_samples_outside_top_p():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]]).expand(2000, -1)
    tokens, _ = sample_tokens(logits, 1.0, 0.6, torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0}  # p(0) = 0.71 > 0.6: the nucleus is one token
    with pytest.raises(ValueError, match="row 1 are not finite"):
        sample_with_noise(
            torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), 1.0, 1.0, torch.ones(2, 2)
        )


@pytest.mark.parametrize("vocab", [16, 3000])  # noise held as floats / as generator states
def test_step_noise_gives_each_row_its_block_row_in_any_order(vocab):
    batch, steps = 4, 5
    reference = torch.Generator().manual_seed(3)
    blocks = [torch.empty(batch, vocab).exponential_(1.0, generator=reference) for _ in range(5)]
    generator = torch.Generator().manual_seed(3)
    noise = StepNoise(generator, batch, vocab, steps)
    pending = torch.ones(batch, dtype=torch.bool)
    # Rows reach their steps at different times (prompts of different lengths).
    asks = [([0], [2]), ([1, 0], [2, 0]), ([2, 1, 0], [2, 0, 3]), ([1], [3])]
    for step_list, row_list in asks:
        got = noise.take(torch.tensor(step_list), torch.tensor(row_list), pending)
        for i, (k, b) in enumerate(zip(step_list, row_list)):
            assert torch.equal(got[i], blocks[k][b])
    assert noise.held_bytes() > 0
    noise.drop_row(1)
    noise.finish()  # the generator ends where `steps` blocks leave it
    assert torch.equal(generator.get_state(), reference.get_state())
    assert noise.held_bytes() == 0


def test_token_keys_of_a_decoding_window():
    # A decoding forward feeds position t of every sequence: keys name (sample, t) exactly.
    from pr2_megatron.errors import RouteError
    from pr2_megatron.routes import KEY_STRIDE, MicroBatch, RouteGroups, token_keys

    captured = torch.tensor([[True, False, True]])
    keys, groups = token_keys(MicroBatch([4, 5, 6], 1), RouteGroups(), captured, start=9)
    assert keys.tolist() == [4 * KEY_STRIDE + 9, -1, 6 * KEY_STRIDE + 9]
    assert groups.tolist() == [4, 5, 6]
    prefill, _ = token_keys(MicroBatch([4], 3), RouteGroups())
    assert prefill.tolist() == [4 * KEY_STRIDE + p for p in range(3)]  # start 0: as before
    with pytest.raises(RouteError, match="start position -1 is negative"):
        token_keys(MicroBatch([4], 1), RouteGroups(), start=-1)

    class SequenceParallelGroups(RouteGroups):
        @property
        def tp_rank_size(self):
            return 0, 2

    with pytest.raises(RouteError, match=r"from position 9 cannot be split .*\(TP=2\)"):
        token_keys(MicroBatch([4], 1), SequenceParallelGroups(), start=9)


# -------------------------------------------------------------------- single process
def _problems(lengths, vocab=MODEL.vocab_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        Problem(tuple(torch.randint(3, vocab, (n,), generator=generator).tolist()), ())
        for n in lengths
    ]


def _sample(model, path, problems, cached, seed, **overrides):
    from pr2_megatron.rl.generation import generate_cached
    from pr2_megatron.rl.rollout import generate_full_forward

    kwargs = dict(seq_len=24, max_new_tokens=12, temperature=1.0, top_p=0.95)
    kwargs.update(overrides)
    generator = torch.Generator().manual_seed(seed)
    sampler = generate_cached if cached else generate_full_forward
    out = sampler(
        model,
        problems,
        generator=generator,
        eos_id=EOS,
        pad_id=PAD,
        path=path,
        sample_ids=[100 + i for i in range(len(problems))],
        **kwargs,
    )
    return out, generator.get_state()


def _cache_state(controller):
    out = []
    for router in controller.routers:
        features = router.feature_cache.features()
        out.append((features.keys_C.clone(), features.hidden_CH.float(), features.logits_CE))
    return out


def _assert_same_rollout(full, cached):
    assert torch.equal(cached.tokens, full.tokens)
    assert torch.equal(cached.total_lens, full.total_lens)
    torch.testing.assert_close(cached.logprobs, full.logprobs, rtol=0, atol=1e-5)
    if full.routes_SBLK is not None:
        assert cached.routes_SBLK.dtype == full.routes_SBLK.dtype == torch.uint8
        assert torch.equal(cached.routes_SBLK, full.routes_SBLK)
        assert torch.equal(cached.plain_routes_SBLK, full.plain_routes_SBLK)


def _build(model_config=MODEL, parallel=None, predictor_scale=0.0):
    from pr2_megatron.routes import RoutePath
    from pr2_megatron.routing import RoutingController
    from pr2_megatron.testing.moe import build, randomize_predictors

    setup = TinySetup(model=model_config, parallel=parallel or ParallelConfig())
    model = build(setup)
    if predictor_scale:
        randomize_predictors(model, scale=predictor_scale, seed=5)
    controller = RoutingController(model)
    return model, controller, RoutePath(controller)


@pytest.mark.parametrize("phase", ["record", "predict"])
def test_cached_sampler_equals_full_forward_sampler(megatron_single, phase):
    model, controller, path = _build(predictor_scale=2.0)
    problems = _problems([3, 7, 5, 9, 4, 9, 6, 8])
    results = {}
    for cached in (False, True):
        getattr(controller, phase)()
        out, state = _sample(model, path, problems, cached, seed=42)
        cache = _cache_state(controller) if phase == "predict" else None
        forwards = [r.shape[0] for r in controller.collect_routes()]
        results[cached] = (out, state, cache, forwards)
    (full, full_state, full_cache, _), (cached, state, cache, forwards) = results[0], results[1]
    _assert_same_rollout(full, cached)
    assert torch.equal(state, full_state)  # the generator advanced by the same draws
    # The router saw only new tokens: a prefill of P0 = 3 positions, then one per sequence.
    assert forwards[0] == 3 * 8 and set(forwards[1:]) == {8}
    if phase == "predict":
        # Predicted routes differ from the live top-k here (random predictors) ...
        assert not torch.equal(full.routes_SBLK, full.plain_routes_SBLK)
        # ... and the feature cache holds the same tokens under the same names.
        for (keys_a, hidden_a, logits_a), (keys_b, hidden_b, logits_b) in zip(full_cache, cache):
            assert torch.equal(keys_a, keys_b)
            assert keys_a.numel() == sum(n - 1 for n in full.total_lens.tolist())
            torch.testing.assert_close(hidden_a, hidden_b, rtol=0, atol=2e-2)  # bf16 storage
            torch.testing.assert_close(logits_a, logits_b, rtol=0, atol=1e-5)


def test_cached_samples_match_a_teacher_forced_full_forward(megatron_single):
    # Independent of the old sampler: log-probs and routes of the finished sequences.
    from pr2_megatron.rl.rollout import forward_logits

    model, controller, path = _build()
    problems = _problems([2, 6, 4, 5])
    controller.record()
    out, _ = _sample(model, path, problems, cached=True, seed=7, top_p=1.0)
    controller.record()
    with torch.no_grad():
        logits = forward_logits(model, out.tokens[:, :24])
    routes = controller.collect_routes()[0].view(24, 4, *out.routes_SBLK.shape[2:])
    logprobs = torch.log_softmax(logits, -1).gather(-1, out.tokens[:, 1:, None]).squeeze(-1)
    mask = out.loss_mask() > 0
    torch.testing.assert_close(out.logprobs[mask], logprobs[mask], rtol=0, atol=1e-5)
    for b, n in enumerate(out.input_lens):
        assert torch.equal(out.routes_SBLK[:n, b], routes[:n, b].to(torch.uint8))
        assert not out.routes_SBLK[n:, b].any()


def test_generation_stops_when_every_sequence_has_ended(megatron_single):
    # A 4-token vocabulary: <eos> comes soon for every sequence, long before 30 new tokens.
    small = MoEModelConfig(num_experts=4, vocab_size=4, max_sequence_length=48)
    model, controller, path = _build(small)
    problems = _problems([3, 5, 4, 6], vocab=4)
    kwargs = dict(seq_len=40, max_new_tokens=30)
    controller.record()
    full, full_state = _sample(model, path, problems, cached=False, seed=1, **kwargs)
    controller.record()
    cached, state = _sample(model, path, problems, cached=True, seed=1, **kwargs)
    forwards = len(controller.collect_routes())
    _assert_same_rollout(full, cached)
    assert torch.equal(state, full_state)
    assert (full.total_lens < full.prompt_lens + 30).all()  # every sequence ended with <eos>
    # One prefill, then one forward per position up to the last one any sequence consumed.
    assert forwards == 1 + int(max(full.input_lens)) - 3
    assert forwards < 30


def test_bf16_rollout_keeps_its_numerics(megatron_single):
    # rollout.dtype=bf16: autocast forwards with the KV cache in bf16. The sampled tokens'
    # log-probs are those of a bf16 teacher-forced full forward (up to bf16 rounding of other
    # shapes), not the fp32 ones.
    from pr2_megatron.rl.rollout import forward_logits, numerics

    model, controller, path = _build()
    problems = _problems([3, 7, 5, 9])
    controller.record()
    cached, _ = _sample(model, path, problems, cached=True, seed=3, dtype="bf16")
    mask = cached.loss_mask() > 0
    teacher = {}
    for dtype in ("bf16", "fp32"):
        with torch.no_grad(), numerics(dtype):
            logits = forward_logits(model, cached.tokens[:, :24]).float()
        logprobs = torch.log_softmax(logits, -1).gather(-1, cached.tokens[:, 1:, None])
        teacher[dtype] = logprobs.squeeze(-1)[mask]
    bf16_error = (cached.logprobs[mask] - teacher["bf16"]).abs().max()
    fp32_error = (cached.logprobs[mask] - teacher["fp32"]).abs().max()
    assert bf16_error < 0.05
    assert fp32_error > 0  # bf16 numerics were used


FEATURES = {
    "gqa-head-qk-norm": dict(num_query_groups=2, qk_norm="head"),
    "projection-qk-norm-tied": dict(qk_norm="projection", tie_embeddings=True),
    "dense-first-and-shared-expert": dict(
        moe_layer_freq=[0, 1, 1], num_layers=3, shared_expert_ffn_hidden_size=40
    ),
    "sigmoid-bias-groups": dict(
        score_function="sigmoid",
        enable_expert_bias=True,
        num_groups=4,
        group_topk=2,
        topk=4,
        pre_softmax=False,
    ),
    "mla-full-rank-q": dict(multi_latent_attention=True, q_lora_rank=None, qk_norm="head"),
    "mla-low-rank-q-yarn": dict(
        multi_latent_attention=True, q_lora_rank=40, qk_norm="none", yarn_scaling_factor=4.0
    ),
}


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.usefixtures("mla_on_cpu")
def test_cached_sampler_with_real_model_features(megatron_single, feature):
    # The attention and routing features of the real configs (Qwen3, OLMoE, DeepSeek-V3,
    # Moonlight) decode with the cache and give the full-forward sampler's results.
    config = dataclasses.replace(MODEL, **TINY_MLA, **FEATURES[feature])
    from pr2_megatron.testing.moe import mla_build_blocker

    if mla_build_blocker(config):
        pytest.skip(mla_build_blocker(config))
    model, controller, path = _build(config, predictor_scale=1.0)
    problems = _problems([3, 7, 5, 9])
    results = []
    for cached in (False, True):
        controller.predict()
        results.append(_sample(model, path, problems, cached, seed=4))
    (full, full_state), (cached_out, state) = results
    _assert_same_rollout(full, cached_out)
    assert torch.equal(state, full_state)


def test_cached_rope_attention_rotates_each_key_once(megatron_single):
    # Megatron's static cache rotates every cached key in every step; ours rotates a key when
    # it enters the cache. Same logits, step by step, as the stock SelfAttention.
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.transformer.attention import SelfAttention

    from pr2_megatron.models.attention import CachedRopeSelfAttention

    model, _, _ = _build()
    layers = model.decoder.layers
    assert all(type(layer.self_attention) is CachedRopeSelfAttention for layer in layers)
    model.eval()
    ids = torch.randint(0, 32, (3, 12), generator=torch.Generator().manual_seed(0))
    logits = {}
    for cls in (CachedRopeSelfAttention, SelfAttention):
        for layer in layers:
            layer.self_attention.__class__ = cls
        context = StaticInferenceContext(3, 12)
        context.materialize_only_last_token_logits = False
        steps = []
        with torch.no_grad():
            for start, width in [(0, 5), *((t, 1) for t in range(5, 12))]:
                positions = torch.arange(start, start + width).expand(3, -1)
                steps.append(
                    model(
                        ids[:, start : start + width],
                        positions,
                        None,
                        inference_context=context,
                        runtime_gather_output=True,
                    )
                )
                context.increment_sequence_len_offset(width)
        logits[cls] = torch.cat(steps, dim=1)
    assert torch.equal(logits[CachedRopeSelfAttention], logits[SelfAttention])


# ---------------------------------------------------------------------- multi-rank
def _distributed_equivalence(
    parallel: ParallelConfig, lengths_per_rank, short_rank_new_tokens, model_config=MODEL
):
    import torch.distributed as dist

    from pr2_megatron.rl.generation import generate, generate_cached
    from pr2_megatron.rl.rollout import generate_full_forward

    model, controller, path = _build(model_config, parallel=parallel, predictor_scale=2.0)
    if parallel.tensor_model_parallel_size > 1:
        # Megatron's MoE layer refuses TP without SP in training mode only (it would be slow):
        # the full-forward reference runs in eval mode, as the cached sampler always does.
        model.eval()
    rank = dist.get_rank()
    problems = _problems(lengths_per_rank[rank], seed=rank)
    report = {}
    for phase in ("record", "predict"):
        results = []
        for cached in (False, True):
            getattr(controller, phase)()
            out, state = _sample(model, path, problems, cached, seed=10 + rank)
            keys = [k for k, _, _ in _cache_state(controller)] if phase == "predict" else None
            results.append((out, state, keys))
        report[phase] = results
    # A rank that needs fewer tokens finishes first and runs idle forwards: its samples are the
    # first tokens of the long run's (the k-th token uses the k-th noise block).
    controller.record()
    new_tokens = short_rank_new_tokens if rank == 0 else 12
    report["short"] = _sample(
        model, path, problems, True, seed=10 + rank, max_new_tokens=new_tokens
    )
    report["short_forwards"] = len(controller.collect_routes())
    controller.record()
    try:
        generate_cached(
            model,
            problems,
            seq_len=24,
            max_new_tokens=2,
            temperature=1.0,
            top_p=1.0,
            generator=torch.Generator(),
            eos_id=EOS,
            pad_id=PAD,
        )
        report["cached_error"] = None
    except ValueError as error:
        report["cached_error"] = str(error)
    controller.record()
    fallback = generate(
        model,
        problems,
        seq_len=24,
        max_new_tokens=4,
        temperature=1.0,
        top_p=1.0,
        generator=torch.Generator().manual_seed(1),
        eos_id=EOS,
        pad_id=PAD,
        path=path,
    )
    controller.record()
    reference = generate_full_forward(
        model,
        problems,
        seq_len=24,
        max_new_tokens=4,
        temperature=1.0,
        top_p=1.0,
        generator=torch.Generator().manual_seed(1),
        eos_id=EOS,
        pad_id=PAD,
        path=path,
    )
    report["generate"] = (fallback, reference)
    return report


def _check_distributed(results, short_rank_new_tokens):
    for rank, report in enumerate(results):
        for phase in ("record", "predict"):
            (full, full_state, full_keys), (cached, state, keys) = report[phase]
            _assert_same_rollout(full, cached)
            assert torch.equal(state, full_state)
            if phase == "predict":
                assert all(torch.equal(a, b) for a, b in zip(full_keys, keys))
        full = report["record"][0][0]
        short, _ = report["short"]
        limit = short_rank_new_tokens if rank == 0 else 12
        expected_lens = torch.minimum(full.total_lens, full.prompt_lens + limit)
        assert torch.equal(short.total_lens, expected_lens)
        for b, n in enumerate(expected_lens.tolist()):
            assert torch.equal(short.tokens[b, :n], full.tokens[b, :n])
            torch.testing.assert_close(short.logprobs[b, : n - 1], full.logprobs[b, : n - 1])
            assert torch.equal(short.routes_SBLK[: n - 1, b], full.routes_SBLK[: n - 1, b])
    # Every rank ran the same number of forwards (the group agreed on the step count).
    assert len({report["short_forwards"] for report in results}) == 1


@pytest.mark.slow
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_ep2_cached_equals_full_forward_with_idle_rank(dispatcher):
    # Rank 0's prompts are shorter than rank 1's (the group prefills the shortest, 2 positions:
    # the allgather dispatcher needs equal token counts on every rank).
    lengths = [[3, 5, 4, 7], [6, 2, 9, 8]]
    model = dataclasses.replace(MODEL, token_dispatcher=dispatcher)
    results = run_distributed(
        _distributed_equivalence,
        2,
        ParallelConfig(expert_model_parallel_size=2),
        lengths,
        3,
        model,
    )
    _check_distributed(results, 3)
    for report in results:
        assert report["cached_error"] is None
        fallback, reference = report["generate"]
        assert fallback.routes_SBLK is not None
        _assert_same_rollout(reference, fallback)


@pytest.mark.slow
def test_tp2_without_sequence_parallelism_cached_equals_full_forward():
    lengths = [[3, 5, 4, 7], [3, 5, 4, 7]]  # TP ranks hold the same sequences
    results = run_distributed(
        _distributed_equivalence,
        2,
        ParallelConfig(tensor_model_parallel_size=2),
        lengths,
        12,
    )
    _check_distributed(results, 12)


def _sequence_parallel_fallback():
    import torch.distributed as dist

    from pr2_megatron.rl.generation import generate, generate_cached, kv_cache_unsupported

    parallel = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    model, controller, path = _build(parallel=parallel)
    problems = _problems([3, 5, 4, 7])
    kwargs = dict(seq_len=24, max_new_tokens=6, temperature=1.0, top_p=1.0, eos_id=EOS, pad_id=PAD)
    reason = kv_cache_unsupported(model)
    try:
        generate_cached(model, problems, generator=torch.Generator(), **kwargs)
        error = None
    except ValueError as caught:
        error = str(caught)
    controller.record()
    fell_back = generate(
        model, problems, generator=torch.Generator().manual_seed(2), path=path, **kwargs
    )
    from pr2_megatron.rl.rollout import generate_full_forward

    controller.record()
    reference = generate_full_forward(
        model, problems, generator=torch.Generator().manual_seed(2), path=path, **kwargs
    )
    return dist.get_rank(), reason, error, fell_back, reference


@pytest.mark.slow
def test_tp2_with_sequence_parallelism_falls_back_to_the_full_forward(capfd):
    for _rank, reason, error, fell_back, reference in run_distributed(
        _sequence_parallel_fallback, 2
    ):
        assert "sequence parallelism" in reason and "TP=2" in reason
        assert error is not None and "cannot run" in error
        _assert_same_rollout(reference, fell_back)
        # SP routes stay this TP rank's S/TP chunk, as the route path expects.
        assert fell_back.routes_SBLK.shape[0] == 24 // 2
    assert "rollout without KV cache" in capfd.readouterr().err
