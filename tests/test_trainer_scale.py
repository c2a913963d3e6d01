"""The trainer on Megatron's machinery at scale-relevant settings, each against a reference run.

* bf16 parameters at a tiny lr: the fp32 main parameters of Megatron's optimizer carry the
  router update fp32 training makes (a bf16 weight alone would round most of it away);
* actor-side PR2 (``replay.mode=pr2 replay.predict_at=old_logprob``): the rollout routes live,
  the old-log-prob pass records the predicted routes, every training forward replays exactly
  those, and the predictors train from mini-step 2 on;
* PP=2, PP=2 x VPP=2 (2 gloo ranks) and PP=2 x EP=2 x DP=2 (4) log the metrics PP=1 logs on
  the same seed (slow);
* context parallelism is refused on CPU with the reason.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from pr2_megatron.rl.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"

# One rank in the pytest process (EP=1), 2 MoE layers, no warm start, one RL step of 2 mini-steps.
IN_PROCESS = [
    "parallel.expert_model_parallel_size=1",
    "model.num_layers=2",
    "warm_start.steps=0",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.micro_batch_size=8",
    "grpo.micro_batch_size=2",
    "replay.off_n=2",
    "logging.tensorboard=false",
]


def _parity_reward(problem, response) -> float:
    """Fraction of even token ids: a reward an untrained policy earns unevenly within a group,
    so the advantages and the router gradient are not zero (the digit tasks give 0 at init)."""
    return sum(int(t) % 2 == 0 for t in response) / max(1, len(response))


def _trainer(run_dir, *overrides):
    from pr2_megatron.rl.train import Trainer

    trainer = Trainer(load_config(TINY, [*IN_PROCESS, f"logging.dir={run_dir}", *overrides]))
    trainer.task.reward = _parity_reward
    return trainer


# ============================================================================ bf16 parameters
def _router_update(run_dir, dtype: str, steps: int):
    trainer = _trainer(run_dir, f"model.params_dtype={dtype}", "optim.lr=1e-6", f"steps={steps}")
    with torch.no_grad():  # both runs start from the same (bf16-representable) weights
        for chunk in trainer.chunks:
            for param in chunk.parameters():
                param.copy_(param.to(torch.bfloat16).to(param.dtype))
    trainer.optimizer.reload_model_params()
    before = [r.weight.detach().float().clone() for r in trainer.routers]
    for _ in range(steps):
        trainer.rl_step()
    after = [r.weight.detach().float().clone() for r in trainer.routers]
    main = [getattr(r.weight, "main_param", None) for r in trainer.routers]
    main = [None if m is None else m.detach().float().clone().view(r.weight.shape)
            for m, r in zip(main, trainer.routers)]  # fmt: skip
    return before, after, main, [r.weight.dtype for r in trainer.routers]


def test_bf16_parameters_get_the_fp32_router_update_at_lr_1e6(megatron_single, tmp_path):
    from pr2_megatron.runtime.parallel import release_parallel_state

    ref_before, ref_after, _, ref_dtypes = _router_update(tmp_path / "fp32", "fp32", 2)
    release_parallel_state()
    before, after, main, dtypes = _router_update(tmp_path / "bf16", "bf16", 2)
    assert set(ref_dtypes) == {torch.float32} and set(dtypes) == {torch.bfloat16}
    assert len(main) == 2 and all(m is not None for m in main)  # fp32 main params exist
    for layer, (r0, r1, b0, b1, m1) in enumerate(zip(ref_before, ref_after, before, after, main)):
        assert torch.equal(r0, b0), layer  # same starting weights
        ref_update, update = r1 - r0, m1 - b0
        assert ref_update.norm() > 0, layer  # 4 Adam steps moved the router
        # The optimizer's update equals fp32 training's: the same size and direction, every
        # element within 5% of the largest (bf16 forward/backward numerics; Adam normalises).
        ratio = float(update.norm() / ref_update.norm())
        cosine = float((update * ref_update).sum() / (update.norm() * ref_update.norm()))
        assert 0.98 < ratio < 1.02, (layer, ratio)
        assert cosine > 0.999, (layer, cosine)
        assert (update - ref_update).abs().max() < 0.05 * ref_update.abs().max(), layer
        # The model runs with those weights rounded to bf16 (nothing else lost) ...
        assert torch.equal(b1, m1.to(torch.bfloat16).float()), layer
        # ... which are the fp32 run's final weights within bf16 rounding (half an ulp of the
        # 8-bit significand, at most |w| / 2^8, plus the small update difference).
        half_ulp = m1.abs() * 2.0**-8
        assert ((b1 - r1).abs() <= half_ulp + (m1 - r1).abs() + 1e-12).all(), layer
        # Control: the bf16 weight alone kept only a few percent of the update (what a plain
        # bf16 AdamW step would have applied), so the checks above can tell the two apart.
        kept = float(((b1 - b0) * ref_update).sum() / ref_update.norm() ** 2)
        assert kept < 0.5, (layer, kept)


# ===================================================================== actor-side PR2 (pr2-actor)
class _PassCapture:
    """Every router forward of an RL step: the pass, phase, flags, dispatched and live routes.

    Wraps each PR2 router's ``_route`` (the experts it dispatches: the replayed target, the
    prediction, or the live top-k) and ``_predicted_route`` (the predictor applied), and the
    step functions and ``run_schedule`` of :mod:`pr2_megatron.rl.steps` to name the pass and
    the micro-batches of each schedule (forwards run in that order at PP=1).
    """

    def __init__(self, trainer, monkeypatch) -> None:
        from pr2_megatron.rl import steps

        self.trainer = trainer
        self.pass_name = None
        # (pass, layer index) -> [(phase, train_predictor, chosen, live)] per forward
        self.forwards = defaultdict(list)
        self.predictions = defaultdict(int)  # pass -> calls of the predictor's route
        self.schedules = defaultdict(list)  # pass -> [route_batch of every micro-batch]
        self.predictor_weights = {}  # pass -> predictor weights after it
        for index, router in enumerate(trainer.routers):
            self._wrap_router(index, router)
        for name in ("rollout", "old_logprobs"):
            named = self._named(getattr(steps, name), lambda *a, n=name: n)
            monkeypatch.setattr(steps, name, named)
        monkeypatch.setattr(
            steps, "mini_step", self._named(steps.mini_step, lambda *a: f"mini_step_{a[2]}")
        )
        original_schedule = steps.run_schedule

        def run_schedule(chunks, micro_batches, *args, **kwargs):
            self.schedules[self.pass_name].extend(mb.route_batch for mb in micro_batches)
            return original_schedule(chunks, micro_batches, *args, **kwargs)

        monkeypatch.setattr(steps, "run_schedule", run_schedule)

    def _named(self, function, name_of):
        def wrapper(*args, **kwargs):
            self.pass_name = name_of(*args)
            out = function(*args, **kwargs)
            self.predictor_weights[self.pass_name] = [
                r.predictor.weight.detach().clone() for r in self.trainer.routers
            ]
            self.pass_name = None
            return out

        return wrapper

    def _wrap_router(self, index, router) -> None:
        route, predicted = router._route, router._predicted_route

        def wrapped_route(logits_SBE, target_TK, padding_mask=None):
            out = route(logits_SBE, target_TK, padding_mask)
            live = router._topk_indices(logits_SBE.detach().reshape(-1, router.num_experts))
            self.forwards[(self.pass_name, index)].append(
                (router.phase.value, router.train_predictor, out[2].detach().clone(), live)
            )
            return out

        def wrapped_predicted(hidden_TH, logits_TE):
            self.predictions[self.pass_name] += 1
            return predicted(hidden_TH, logits_TE)

        router._route = wrapped_route
        router._predicted_route = wrapped_predicted

    def token_routes(self, pass_name: str, index: int):
        """``{(sample id, position): sorted experts}`` of a scheduled pass's real tokens, and
        ``{...: live top-k}``; forwards and micro-batches in schedule order, ``[S, B]`` rows."""
        forwards = self.forwards[(pass_name, index)]
        batches = self.schedules[pass_name]
        assert len(forwards) == len(batches), (pass_name, len(forwards), len(batches))
        chosen, live = {}, {}
        for (_, _, chosen_TK, live_TK), batch in zip(forwards, batches):
            width = len(batch.sample_ids)
            for b, (sample, length) in enumerate(zip(batch.sample_ids, batch.lengths)):
                for s in range(length):
                    row = s * width + b
                    chosen[(sample, s)] = tuple(sorted(chosen_TK[row].tolist()))
                    live[(sample, s)] = tuple(sorted(live_TK[row].tolist()))
        return chosen, live


def test_actor_side_pr2_replays_exactly_the_old_logprob_pass_predictions(
    megatron_single, tmp_path, monkeypatch
):
    from pr2_megatron.testing.moe import randomize_predictors

    trainer = _trainer(
        tmp_path, "replay.mode=pr2", "replay.predict_at=old_logprob", "steps=1", "replay.off_n=2"
    )
    assert trainer.mode.name == "pr2-actor"
    # A predictor that already moves routes, so predicted and live top-k differ for many tokens.
    for chunk in trainer.chunks:
        randomize_predictors(chunk, scale=0.02, seed=3)
    trainer.optimizer.reload_model_params()
    start = [r.predictor.weight.detach().clone() for r in trainer.routers]
    capture = _PassCapture(trainer, monkeypatch)
    trainer.rl_step()

    layers = range(len(trainer.routers))
    assert len(trainer.routers) == 2
    # Rollout: live routing, recorded; the predictor is never applied.
    assert capture.predictions["rollout"] == 0
    for index in layers:
        forwards = capture.forwards[("rollout", index)]
        assert forwards and all(phase == "record" for phase, *_ in forwards)
        for _, _, chosen, live in forwards:
            assert torch.equal(chosen.sort(-1).values, live.sort(-1).values)
    # Old-log-prob pass: the predictor routes every forward (predict phase) ...
    assert capture.predictions["old_logprobs"] == len(capture.schedules["old_logprobs"]) * 2
    differing = 0
    for index in layers:
        forwards = capture.forwards[("old_logprobs", index)]
        assert all(phase == "predict" for phase, *_ in forwards)
        predicted, live = capture.token_routes("old_logprobs", index)
        differing += sum(predicted[t] != live[t] for t in predicted)
        # ... and its route table holds exactly those predicted routes.
        for mini in (1, 2):
            replayed, train_live = capture.token_routes(f"mini_step_{mini}", index)
            assert replayed.keys() <= predicted.keys() and len(replayed) > 0
            # Every training forward dispatches exactly the old-log-prob pass's predictions.
            assert {t: predicted[t] for t in replayed} == replayed, (index, mini)
            phases = {(p, tp) for p, tp, *_ in capture.forwards[(f"mini_step_{mini}", index)]}
            assert phases == {("replay", mini >= 2)}, (index, mini, phases)
        # The two mini-batches together train every token of the batch once.
        tokens = [t for m in (1, 2) for t in capture.token_routes(f"mini_step_{m}", index)[0]]
        assert sorted(tokens) == sorted(predicted)
    total = sum(len(capture.token_routes("old_logprobs", i)[0]) for i in layers)
    # Predicted != live top-k for most tokens (111 of 130 token-layers seen): the test can tell.
    assert differing > 0.05 * total, (differing, total)
    # The predictors train at mini-step 2 only: unchanged by rollout, old log-probs, mini-step 1.
    for name in ("rollout", "old_logprobs", "mini_step_1"):
        for w0, w in zip(start, capture.predictor_weights[name]):
            assert torch.equal(w0, w), name
    for w0, w in zip(start, capture.predictor_weights["mini_step_2"]):
        assert not torch.equal(w0, w)


# ============================================================= pipeline layouts (slow: 2 ranks)
# 4 MoE layers: PP=2 gives 2 per stage, PP=2 x VPP=2 one per virtual stage. 16 samples per
# data-parallel rank (8 at DP=2) in micro-batches of 4 (8 for the rollout): micro-batches of one
# size in every schedule, an even number of them under VPP (a multiple of PP). fp32 rollout;
# a warm start so the policy gradient is real. The scheduled rollout under PP runs a full
# forward per new token, so the PP=1 reference does too (rollout.kv_cache=false): the KV-cached
# sampler's predictor metric averages over other positions (docs/trainer.md).
PIPELINE = [
    "steps=2",
    "model.num_layers=4",
    "parallel.expert_model_parallel_size=1",
    "warm_start.steps=4",
    "warm_start.batch_size=16",
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "rollout.micro_batch_size=8",
    "rollout.dtype=fp32",
    "rollout.kv_cache=false",
    "grpo.micro_batch_size=4",
    "replay.off_n=2",
    "logging.tensorboard=false",
]
VPP2 = "parallel.virtual_pipeline_model_parallel_size=2"
LAYOUTS = {
    "pp2": (2, ["parallel.pipeline_model_parallel_size=2"]),
    "pp2-vpp2": (2, ["parallel.pipeline_model_parallel_size=2", VPP2]),
    "pp2-ep2-dp2": (
        4,
        ["parallel.pipeline_model_parallel_size=2", "parallel.expert_model_parallel_size=2"],
    ),
}


def _train_in_rank(overrides):
    from pr2_megatron.rl.train import Trainer
    from pr2_megatron.runtime.parallel import destroy_parallel

    trainer = Trainer(load_config(TINY, overrides))
    trainer.task.reward = _parity_reward
    code = trainer.run()
    destroy_parallel()
    return code


def _metric_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = map(json.loads, lines)
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


@pytest.fixture(scope="module")
def pp1_records(tmp_path_factory):
    from pr2_megatron.testing.distributed import run_distributed

    run_dir = tmp_path_factory.mktemp("pp1")
    assert run_distributed(_train_in_rank, 1, [*PIPELINE, f"logging.dir={run_dir}"]) == [0]
    records = _metric_records(run_dir)
    assert any(r.get("reward/mean", 0) > 0 for r in records)  # a non-zero policy gradient
    assert any(r.get("ppo/grad_norm", 0) > 0 for r in records)
    return records


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_layouts_log_the_metrics_of_pp1(tmp_path, pp1_records, layout):
    from pr2_megatron.testing.distributed import run_distributed

    ranks, extra = LAYOUTS[layout]
    codes = run_distributed(_train_in_rank, ranks, [*PIPELINE, *extra, f"logging.dir={tmp_path}"])
    assert codes == [0] * ranks
    records = _metric_records(tmp_path)
    assert [(r["event"], r["step"]) for r in records] == [
        (r["event"], r["step"]) for r in pp1_records
    ]
    exact = ("routing/", "rollout_vs_train/", "reward/", "response/", "event", "step", "mode")
    for ref, got in zip(pp1_records, records):
        assert got.keys() == ref.keys(), set(got) ^ set(ref)
        for key, value in ref.items():
            if key.startswith(exact) or not isinstance(value, float):
                # Same sampled tokens, same routes: agreement counts are equal, not close.
                assert got[key] == value, (ref["event"], ref["step"], key, value, got[key])
            else:  # losses, ratios, grad norm, predictor: fp32 reductions in another order
                assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (key, ref["step"])


def test_context_parallelism_is_refused_on_cpu_naming_what_it_needs():
    from pr2_megatron.rl.layout import check_layout

    cp2 = ["parallel.context_parallel_size=2", "parallel.expert_model_parallel_size=1"]
    cfg = load_config(TINY, cp2)
    with pytest.raises(ConfigError, match="context_parallel_size=2 needs Transformer Engine"):
        check_layout(cfg, world_size=2, cuda=False)
    assert check_layout(cfg, world_size=2, cuda=True) == 1  # the layout itself is valid
