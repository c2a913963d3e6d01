"""Real model configs (configs/models/): parameter counts, layouts, and PR2 at reduced size.

* The analytic count of ``pr2_megatron.models.size`` equals the parameter count of the Megatron
  model ``build_gpt_moe`` builds, for each config's attention/routing features at reduced width
  and depth, and for feature variants (q/k norms, GELU/SwiGLU, tied embeddings, head dim, MLA).
* At full size the counts match the published totals/actives.
* Each config's declared cluster (``# cluster:`` line) fits its TP/EP/PP/CP layout and 80 GB.
* Each config at reduced size, with the same routing features (score function, expert bias,
  groups, shared expert, dense first layers), runs PR2 predict -> replay through
  ``RoutingController``: replay dispatches exactly the predicted routes and the log-probs equal
  the rollout's (importance ratio 1).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from support.mla import TINY_MLA

from pr2_megatron.models.builder import MoEModelConfig
from pr2_megatron.models.size import GIB, count_parameters, estimate_training_memory
from pr2_megatron.rl.config import load_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"
CONFIGS = ["olmoe_1b_7b", "qwen3_30b_a3b", "moonlight_16b_a3b", "deepseek_v3_style"]

#: Published (total, active) parameters and the relative tolerance of the comparison:
#: 2 % where the figure has two or three significant digits, 5 % for Moonlight's "~16B / ~3B".
PUBLISHED = {
    "olmoe_1b_7b": (6.9e9, 1.3e9, 0.02),
    "qwen3_30b_a3b": (30.5e9, 3.3e9, 0.02),
    "moonlight_16b_a3b": (16e9, 3e9, 0.05),
    "deepseek_v3_style": (671e9, 37e9, 0.02),
}

#: Memory a GPU keeps free beyond the estimate (CUDA context, NCCL buffers, fragmentation,
#: the rollout forwards).
HEADROOM_GIB = 10


def _config(name: str):
    return load_config(CONFIG_DIR / f"{name}.yaml")


def _cluster(name: str) -> dict[str, int]:
    text = (CONFIG_DIR / f"{name}.yaml").read_text()
    match = re.search(r"^# cluster: (.*)$", text, flags=re.M)
    assert match, f"{name}.yaml has no '# cluster:' line"
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", match.group(1))}


def reduced(model: MoEModelConfig) -> MoEModelConfig:
    """The same attention and routing features at hidden 64, <= 8 experts, <= 3 layers."""
    num_experts = min(model.num_experts, 8)
    changes: dict = dict(
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=96,
        expert_ffn_hidden_size=24,
        num_experts=num_experts,
        vocab_size=96,
        max_sequence_length=64,
        params_dtype="fp32",
        recompute_granularity=None,
        token_dispatcher="alltoall",
    )
    if model.num_query_groups:
        changes["num_query_groups"] = 2
    if model.head_dim:
        changes["head_dim"] = 32  # != 64 / 4: exercises a head dim decoupled from the width
    if model.shared_expert_ffn_hidden_size:
        changes["shared_expert_ffn_hidden_size"] = 48
    # Dense first layers stay dense first layers: [0, 1, 1] for DeepSeek-V3 and Moonlight.
    if isinstance(model.moe_layer_freq, list) and 0 in model.moe_layer_freq:
        changes.update(num_layers=3, moe_layer_freq=[0, 1, 1])
    else:
        changes.update(num_layers=2, moe_layer_freq=1)
    if model.num_groups and model.num_groups > 1:
        # 4 groups of 2 experts, 2 groups per token, top-4 (DeepSeek-V3: 8 of 32, 4, top-8).
        changes.update(num_groups=4, group_topk=2, topk=4)
    else:
        changes["topk"] = min(model.topk, 3)
    if model.multi_latent_attention:
        changes.update(
            kv_lora_rank=32,
            qk_head_dim=16,
            qk_pos_emb_head_dim=8,
            v_head_dim=16,
            q_lora_rank=48 if model.q_lora_rank else None,
            yarn_original_max_position_embeddings=16,
        )
    return dataclasses.replace(model, **changes)


# ------------------------------------------------------------------------ full-size, no build
@pytest.mark.parametrize("name", CONFIGS)
def test_full_size_counts_match_published(name):
    total, active, rtol = PUBLISHED[name]
    counts = count_parameters(_config(name).model)
    assert counts.total == pytest.approx(total, rel=rtol), counts.as_dict()
    assert counts.active == pytest.approx(active, rel=rtol), counts.as_dict()


def test_known_full_size_counts_exactly():
    """Pin the exact counts (a regression check of the formula and the configs)."""
    exact = {name: count_parameters(_config(name).model) for name in CONFIGS}
    assert exact["olmoe_1b_7b"].total == 6_919_161_856
    assert exact["qwen3_30b_a3b"].total == 30_532_122_624
    assert exact["qwen3_30b_a3b"].active == 3_353_032_704
    assert exact["deepseek_v3_style"].total == 671_026_404_352


@pytest.mark.parametrize("name", CONFIGS)
def test_layout_fits_declared_cluster(name):
    config = _config(name)
    cluster = _cluster(name)
    num_gpus = cluster["nodes"] * cluster["gpus_per_node"]
    parallel = config.parallel
    parallel.check_world_size(num_gpus)  # raises when TP x PP x CP or EP x ETP x PP don't divide
    model = config.model
    assert model.num_attention_heads % parallel.tensor_model_parallel_size == 0
    assert (model.num_query_groups or model.num_attention_heads) % (
        parallel.tensor_model_parallel_size
    ) == 0
    assert model.num_experts % parallel.expert_model_parallel_size == 0
    assert model.vocab_size % parallel.tensor_model_parallel_size == 0
    assert model.num_layers % parallel.pipeline_model_parallel_size == 0
    # TP and EP stay inside a node.
    assert parallel.tensor_model_parallel_size <= cluster["gpus_per_node"]
    tokens = config.grpo.micro_batch_size * cluster["sequence_tokens"]
    estimate = estimate_training_memory(
        model, parallel, num_gpus, tokens, recompute=model.recompute_granularity
    )
    assert estimate.total / GIB < cluster["gpu_memory_gib"] - HEADROOM_GIB, estimate.summary()


def test_published_configs_keep_their_routing_features():
    olmoe, qwen = _config("olmoe_1b_7b").model, _config("qwen3_30b_a3b").model
    moon, dsv3 = _config("moonlight_16b_a3b").model, _config("deepseek_v3_style").model
    assert (olmoe.qk_norm, olmoe.pre_softmax) == ("projection", True)
    assert (qwen.qk_norm, qwen.pre_softmax, qwen.head_dim) == ("head", False, 128)
    for model in (moon, dsv3):
        assert model.score_function == "sigmoid" and model.enable_expert_bias
        assert model.multi_latent_attention and model.shared_expert_ffn_hidden_size
    assert moon.moe_layer_numbers()[0] == 2 and dsv3.moe_layer_numbers()[0] == 4
    assert (dsv3.num_groups, dsv3.group_topk, dsv3.topk_scaling_factor) == (8, 4, 2.5)


# --------------------------------------------------------------------- reduced, built on CPU
def _build(model: MoEModelConfig, router: str = "pr2"):
    from pr2_megatron.testing.moe import TinySetup, build, mla_build_blocker

    blocker = mla_build_blocker(model)
    if blocker:
        pytest.skip(blocker)
    return build(TinySetup(model=model), router=router)


def _num_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.usefixtures("megatron_single", "mla_on_cpu")
@pytest.mark.parametrize("name", CONFIGS)
def test_analytic_count_equals_megatron_model(name):
    model_cfg = reduced(_config(name).model)
    model = _build(model_cfg)
    counts = count_parameters(model_cfg, include_predictor=True)
    assert _num_params(model) == counts.total, counts.as_dict()
    predictors = sum(r.predictor.weight.numel() for r in _routers(model))
    assert predictors == counts.predictors


VARIANTS = {
    "gelu-no-qk-norm": dict(activation="gelu", qk_norm="none"),
    "head-qk-norm-gqa": dict(qk_norm="head", num_query_groups=2, head_dim=24),
    "projection-qk-norm-tied": dict(qk_norm="projection", tie_embeddings=True),
    "dense-and-shared": dict(
        moe_layer_freq=[0, 1, 1], num_layers=3, shared_expert_ffn_hidden_size=40
    ),
    "mla-full-rank-q": dict(multi_latent_attention=True, q_lora_rank=None, qk_norm="head"),
    "mla-low-rank-q-yarn": dict(
        multi_latent_attention=True, q_lora_rank=40, qk_norm="none", yarn_scaling_factor=4.0
    ),
}


@pytest.mark.usefixtures("megatron_single", "mla_on_cpu")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_analytic_count_feature_variants(variant):
    base = MoEModelConfig(num_attention_heads=4, **TINY_MLA)
    model_cfg = dataclasses.replace(base, **VARIANTS[variant])
    for router in ("pr2", "topk"):
        model = _build(model_cfg, router=router)
        expected = count_parameters(model_cfg, include_predictor=router == "pr2").total
        assert _num_params(model) == expected, (variant, router)


def _routers(model):
    from pr2_megatron.routing.router import PR2Router

    return [m for m in model.modules() if isinstance(m, PR2Router)]


@pytest.mark.usefixtures("megatron_single", "mla_on_cpu")
@pytest.mark.parametrize("name", CONFIGS)
def test_reduced_config_pr2_predict_then_replay_ratio_one(name):
    from pr2_megatron.routing.controller import RoutingController
    from pr2_megatron.testing.moe import randomize_predictors, token_batch

    model_cfg = reduced(_config(name).model)
    model = _build(model_cfg)
    model.eval()
    generator = torch.Generator().manual_seed(5)
    for router in _routers(model):
        if router.expert_bias is not None:  # the aux-loss-free bias takes part in selection
            router.expert_bias.copy_(torch.randn(router.expert_bias.shape, generator=generator))
    randomize_predictors(model, scale=1.0, seed=3)
    ctl = RoutingController(model)
    assert ctl.layer_numbers == model_cfg.moe_layer_numbers()

    ids, labels = token_batch(2, 12, model_cfg.vocab_size, seed=1)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    ctl.predict()
    with torch.no_grad():
        rollout_logprob = -model(ids, positions, None, labels=labels)
    predicted = ctl.collect_routes()[0]
    live = ctl.collect_plain_routes()[0]
    assert predicted.shape == (ids.numel(), len(model_cfg.moe_layer_numbers()), model_cfg.topk)
    # The predictor moved some routes: replay must follow the prediction, not the live router.
    assert not torch.equal(predicted, live)

    ctl.replay(collect_metrics=True)
    ctl.set_targets(predicted, plain_routes_TLK=live)
    train_logprob = -model(ids, positions, None, labels=labels)
    ctl.finish()
    for index, router in enumerate(ctl.routers):
        replayed = router.metric_records[0]["replayed"]
        assert torch.equal(replayed, predicted[:, index].long()), router.layer_number
    ratio = torch.exp(train_logprob.detach() - rollout_logprob)
    assert torch.allclose(ratio, torch.ones_like(ratio), rtol=0, atol=1e-6), ratio
    train_logprob.sum().backward()  # gradients flow through the replayed routes
    assert all(r.weight.grad is not None for r in ctl.routers)


# ----------------------------------------------------------- TP=2 + SP in two gloo ranks
def _tp_model_cfg(qk_norm: str) -> MoEModelConfig:
    if qk_norm == "mla-latent":  # DeepSeek-V3's MLA: RMSNorms of the q and kv latents
        return dataclasses.replace(
            _tp_model_cfg("head"),
            multi_latent_attention=True,
            q_lora_rank=48,
            kv_lora_rank=32,
            qk_head_dim=16,
            qk_pos_emb_head_dim=8,
            v_head_dim=16,
            head_dim=None,
            num_query_groups=None,
        )
    return MoEModelConfig(
        num_layers=2,
        moe_layer_freq=[0, 1],
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=24,
        ffn_hidden_size=48,
        num_experts=4,
        topk=2,
        expert_ffn_hidden_size=32,
        shared_expert_ffn_hidden_size=40,
        qk_norm=qk_norm,
        activation="swiglu",
        vocab_size=64,
    )


def _tp_forward_backward(setup, full_state, ids, labels):
    from megatron.core import parallel_state
    from megatron.core.transformer import multi_latent_attention

    if not isinstance(getattr(multi_latent_attention, "TELinear", None), type):
        multi_latent_attention.TELinear = type("NoTELinear", (), {})  # as ``mla_on_cpu``

    from pr2_megatron.models.hf import load_megatron_state
    from pr2_megatron.runtime.parallel import average_gradients
    from pr2_megatron.testing.moe import build, global_parameters

    model = build(setup, router="topk")
    load_megatron_state(model, full_state, setup.model)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    token_loss = model(ids, positions, None, labels=labels)
    token_loss.sum().backward()
    average_gradients(model)
    grads = {
        name: param.grad.detach().clone()
        for name, param in global_parameters(model).items()
        if ("layernorm" in name or "down_proj" in name) and "self_attention" in name
    }
    return {
        "token_loss": token_loss.detach(),
        "grads": grads,
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
    }


def _tp_reference(setup, ids, labels):
    from pr2_megatron.testing.moe import build, global_state_dict

    model = build(setup, router="topk")
    with torch.no_grad():  # non-trivial norm scales
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.uniform_(0.5, 1.5)
    full_state = global_state_dict(model)
    return full_state, _tp_forward_backward(setup, full_state, ids, labels)


@pytest.mark.slow
@pytest.mark.parametrize("qk_norm", ["projection", "head", "mla-latent"])
def test_qk_norms_and_gated_ffn_under_tp2_sp_match_single_process(qk_norm):
    """OLMoE's projection q/k norm (TP all-reduce of the sum of squares), the per-head norm
    with SP, MLA's latent norms with SP (``LatentNorm``: Megatron's torch norm refuses SP),
    and gated dense/shared FFN weights sliced by ``load_megatron_state`` under TP=2."""
    from pr2_megatron.runtime.parallel import ParallelConfig
    from pr2_megatron.testing.distributed import run_distributed
    from pr2_megatron.testing.moe import TinySetup

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 8), generator=generator)
    labels = torch.randint(0, 64, (2, 8), generator=generator)
    model_cfg = _tp_model_cfg(qk_norm)
    full_state, ref = run_distributed(_tp_reference, 1, TinySetup(model=model_cfg), ids, labels)[0]
    parallel = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    setup = TinySetup(model=model_cfg, parallel=parallel)
    results = run_distributed(_tp_forward_backward, 2, setup, full_state, ids, labels)
    for res in results:
        torch.testing.assert_close(res["token_loss"], ref["token_loss"], rtol=1e-5, atol=1e-5)
        assert res["grads"].keys() == ref["grads"].keys() and res["grads"]
        for name, grad in res["grads"].items():
            expected = ref["grads"][name]
            if qk_norm == "projection" and ("q_layernorm" in name or "k_layernorm" in name):
                expected = expected.chunk(2)[res["tp_rank"]]  # sharded with the heads
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------- shipped layouts; one trainer step per config
@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_layout_passes_validation_on_its_cluster(name):
    from pr2_megatron.rl.layout import check_layout

    config, cluster = _config(name), _cluster(name)
    num_gpus = cluster["nodes"] * cluster["gpus_per_node"]
    parallel = config.parallel
    dp = check_layout(config, num_gpus, cuda=True)
    tp, pp, cp = (
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        parallel.context_parallel_size,
    )
    assert dp == num_gpus // (tp * pp * cp)


def test_a_bad_layout_is_exit_2_naming_the_keys_before_any_process_group(monkeypatch, capsys):
    """Qwen3's shipped layout on its 16 GPUs with 12 experts (EP=8 cannot split them), one
    with an attention head count TP=2 does not divide: ``pr2-train`` exits 2 with the keys and
    values, and never reaches a process group."""
    import torch.distributed as dist

    from pr2_megatron.rl import train
    from pr2_megatron.runtime import parallel

    def no_process_group(*args, **kwargs):
        raise AssertionError("a process group was created before the layout check")

    monkeypatch.setattr(dist, "init_process_group", no_process_group)
    monkeypatch.setattr(parallel, "initialize_parallel", no_process_group)
    monkeypatch.setenv("WORLD_SIZE", "16")  # torchrun's, on the config's cluster
    config = str(CONFIG_DIR / "qwen3_30b_a3b.yaml")
    cases = [
        (
            "model.num_experts=12",
            "model.num_experts=12 is not divisible by parallel.expert_model_parallel_size=8 "
            "on 16 ranks",
        ),
        (
            "model.num_attention_heads=31",
            "model.num_attention_heads=31 is not divisible by "
            "parallel.tensor_model_parallel_size=2",
        ),
        (
            "parallel.context_parallel_size=3",
            "world size 16 is not divisible by TP×PP×CP = 2×1×3",
        ),
    ]
    for override, message in cases:
        assert train.main(["--config", config, override]) == 2
        err = capsys.readouterr().err
        assert message in err, err
    # As shipped it passes on a GPU cluster; on this CPU machine it names what the CPU lacks.
    if not torch.cuda.is_available():
        assert train.main(["--config", config]) == 2
        err = capsys.readouterr().err
        assert "parallel.context_parallel_size=2 needs Transformer Engine" in err, err


#: Each config's own kinds of parallelism at 2 CPU ranks: EP for OLMoE and Moonlight (EP=8 on
#: their GPUs), TP=2 + SP with EP=2 for Qwen3 (TP=2 + SP, CP=2, EP=8) and DeepSeek-V3 (TP=8 +
#: SP, EP=256). Qwen3's CP=2 needs Transformer Engine's attention (the layout check refuses it
#: on CPU), so it runs CP=1 here. No shipped config uses pipeline parallelism; DeepSeek-V3 also
#: runs PP=2 (an uneven split of its 3 reduced layers: the dense first layer and an MoE
#: layer on stage 1, an MoE layer on stage 2).
CPU_LAYOUTS = {
    "olmoe_1b_7b": {"expert_model_parallel_size": 2},
    "moonlight_16b_a3b": {"expert_model_parallel_size": 2},
    "qwen3_30b_a3b": {
        "tensor_model_parallel_size": 2,
        "sequence_parallel": True,
        "context_parallel_size": 1,
        "expert_model_parallel_size": 2,
    },
    "deepseek_v3_style": {
        "tensor_model_parallel_size": 2,
        "sequence_parallel": True,
        "expert_model_parallel_size": 2,
    },
    "deepseek_v3_style-pp2": {
        "tensor_model_parallel_size": 1,
        "sequence_parallel": False,
        "pipeline_model_parallel_size": 2,
        "num_layers_in_first_pipeline_stage": 2,
        "expert_model_parallel_size": 1,
    },
}


def _reduced_overrides(name: str, run_dir) -> list[str]:
    """``key=value`` overrides: the config at reduced width (``reduced``, shipped dtype and
    recompute kept), a CPU layout of its own kinds, one small RL step."""
    import json

    shipped = _config(name.split("-")[0])
    model = reduced(shipped.model)
    model = dataclasses.replace(
        model,
        params_dtype=shipped.model.params_dtype,
        recompute_granularity=shipped.model.recompute_granularity,
    )
    overrides = [
        f"model.{field.name}={json.dumps(getattr(model, field.name))}"
        for field in dataclasses.fields(model)
        if getattr(model, field.name) != getattr(shipped.model, field.name)
    ]
    overrides += [f"parallel.{k}={json.dumps(v)}" for k, v in CPU_LAYOUTS[name].items()]
    return overrides + [
        "steps=1",
        "warm_start.steps=0",
        "rollout.prompts_per_step=2",
        "rollout.group_size=4",
        "rollout.max_new_tokens=6",
        "rollout.micro_batch_size=2",
        "grpo.micro_batch_size=2",
        "replay.off_n=2",
        "checkpoint.dir=null",
        "logging.tensorboard=false",
        f"logging.dir={run_dir}",
    ]


def _one_trainer_step(config_path, overrides):
    """The trainer as ``pr2-train`` runs it (no test patches: MLA builds on CPU by itself)."""
    from pr2_megatron.rl.config import load_config
    from pr2_megatron.rl.layout import check_layout
    from pr2_megatron.rl.train import Trainer
    from pr2_megatron.runtime.parallel import destroy_parallel

    cfg = load_config(config_path, overrides)
    check_layout(cfg)
    trainer = Trainer(cfg)
    code = trainer.run()
    layers = trainer.controller.layer_numbers
    destroy_parallel()
    return code, trainer.step, layers


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CPU_LAYOUTS))
def test_reduced_config_runs_one_trainer_step_in_its_own_layout(name, tmp_path):
    import json
    import math

    from pr2_megatron.testing.distributed import run_distributed
    from pr2_megatron.testing.moe import mla_build_blocker

    base = name.split("-")[0]
    blocker = mla_build_blocker(reduced(_config(base).model))
    if blocker:
        pytest.skip(blocker)
    overrides = _reduced_overrides(name, tmp_path)
    results = run_distributed(
        _one_trainer_step, 2, CONFIG_DIR / f"{base}.yaml", overrides, timeout=400
    )
    assert [(code, step) for code, step, _ in results] == [(0, 1), (0, 1)]
    moe_layers = reduced(_config(base).model).moe_layer_numbers()
    assert sorted({n for _, _, layers in results for n in layers}) == moe_layers
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    mini = [r for r in records if r["event"] == "mini_step"]
    assert [r["mini_step"] for r in mini] == [1, 2]
    for record in mini:
        # Finite (0.0 where every reward of this untrained model is 0: no policy gradient).
        assert math.isfinite(record["ppo/grad_norm"])
        # pr2: training replayed exactly the routes the rollout used, in every MoE layer.
        assert record["rollout_vs_train/zero_deviation_ratio"] == 1.0
        for layer in moe_layers:
            assert f"rollout_vs_train/topk_overlap/replayed/layer_{layer}" in record
    assert mini[0]["ppo/ratio_max_abs_dev"] < 0.05  # rollout weights (bf16 rollout numerics)
    assert "predictor/loss" in mini[1]
