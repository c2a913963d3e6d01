"""The route path in the remaining layouts: PP, VPP, TP×EP, CP, right-padded micro-batches, r3.

Every end-to-end test records routes at rollout in one layout, builds the route table on every
rank and replays it in another training layout (other micro-batch size and order). It checks that
every token is dispatched to the recorded experts and that, at the rollout weights, the training
log-probs equal the rollout log-probs (importance ratio 1). The pipeline tests run Megatron's own
schedules (``get_forward_backward_func``: 1F1B, interleaved) on gloo, including PR2's predictor
loss, and compare gradients with a single-process run of the same micro-batches.
"""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from pr2_megatron.models.builder import MoEModelConfig
from pr2_megatron.routes import (
    RouteTable,
    context_parallel_positions,
    gather_route_table,
    micro_batch_targets,
)
from pr2_megatron.runtime.parallel import ParallelConfig
from pr2_megatron.testing.distributed import run_distributed
from pr2_megatron.testing.moe import TinySetup

SEQ, NUM_SAMPLES, VOCAB = 8, 4, 64


def _samples():
    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(0, VOCAB, (NUM_SAMPLES, SEQ), generator=generator)
    labels = torch.randint(0, VOCAB, (NUM_SAMPLES, SEQ), generator=generator)
    return ids, labels


def _random_table(lengths, layer_numbers, num_experts, topk, seed):
    """A table of distinct random experts per row, with old routes, samples 0..N-1."""
    generator = torch.Generator().manual_seed(seed)

    def sample(length):
        scores = torch.rand((length, len(layer_numbers), num_experts), generator=generator)
        return scores.argsort(dim=-1)[..., :topk]

    return RouteTable.from_samples(
        [sample(n) for n in lengths],
        sample_ids=list(range(len(lengths))),
        layer_numbers=layer_numbers,
        num_experts=num_experts,
        topk=topk,
        plain_per_sample=[sample(n) for n in lengths],
    )


def _stack_metric(ctl, key):
    """Per forward of a replay pass with metrics: ``[T, L, K]`` of ``key`` over the routers."""
    num_forwards = len(ctl.routers[0].metric_records) if ctl.routers else 0
    return [
        torch.stack([r.metric_records[i][key] for r in ctl.routers], dim=1)
        for i in range(num_forwards)
    ]


# ============================================================ pipeline (PP, VPP) end to end
def _pipeline_procedure(setup, full_state, rollout_batches, train_batches):
    """Predict rollout, predictor-training step, replay in another layout; under Megatron's
    schedule for the current PP/VPP layout (PP=1: the no-pipelining schedule)."""
    from megatron.core import parallel_state

    from pr2_megatron.routing.controller import RoutingController
    from pr2_megatron.testing.moe import (
        build_chunks,
        chunks_global_parameters,
        forward_backward,
        load_full_state,
    )

    chunks = build_chunks(setup)
    for chunk in chunks:
        load_full_state(chunk, full_state)
    ctl = RoutingController(chunks, allow_empty=True)  # PP: a stage may have none
    ids, labels = _samples()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    dp_group = parallel_state.get_data_parallel_group()

    def step(data_iterator, model):
        batch = next(data_iterator)
        x = ids[batch]
        out = model(x, torch.arange(SEQ).expand_as(x), None, labels=labels[batch])

        def loss_func(token_loss):  # [B, S] on the last stage
            return token_loss.sum(), {"samples": batch, "logprob": -token_loss.detach()}

        return out, loss_func

    def logprobs(store):
        return {s: rec["logprob"][b] for rec in store for b, s in enumerate(rec["samples"])}

    # Rollout: PR2 prediction, micro-batches of rollout_batches; routes -> one table.
    ctl.predict()
    with torch.no_grad():
        store = forward_backward(
            chunks,
            step,
            rollout_batches,
            seq_length=SEQ,
            micro_batch_size=len(rollout_batches[0]),
            forward_only=True,
        )
    rollout_logprob = logprobs(store)
    table = gather_route_table(
        ctl.collect_routes(),
        rollout_batches,
        layer_numbers=ctl.layer_numbers,
        num_experts=ctl.num_experts,
        topk=ctl.topk,
        plain_routes_per_forward=ctl.collect_plain_routes(),
        data_group=dp_group,
        pp_group=pp_group,
    )

    # Mini-step >= 2: replay with predictor training, in the rollout's micro-batches (the
    # feature cache pairs tokens by their running position within the pass).
    ctl.replay(train_predictor=True, collect_metrics=True)
    step_targets = []
    for batch in rollout_batches:
        step_targets.append(micro_batch_targets(table, batch, SEQ, layer_numbers=ctl.layer_numbers))
        ctl.set_targets(step_targets[-1])
    store = forward_backward(
        chunks, step, rollout_batches, seq_length=SEQ, micro_batch_size=len(rollout_batches[0])
    )
    ctl.finish()
    step_logprob, step_replayed = logprobs(store), _stack_metric(ctl, "replayed")
    grads = {
        name: param.grad.detach().clone()
        for name, param in chunks_global_parameters(chunks).items()
        if param.grad is not None
    }
    predictor_losses = [loss for r in ctl.routers for loss in r.predictor_losses]

    # Replay in another layout (micro-batch size and order) at the rollout weights.
    ctl.replay(collect_metrics=True)
    targets = []
    for batch in train_batches:
        target = micro_batch_targets(table, batch, SEQ, layer_numbers=ctl.layer_numbers)
        old = micro_batch_targets(table, batch, SEQ, layer_numbers=ctl.layer_numbers, plain=True)
        ctl.set_targets(target, old)
        targets.append(target)
    with torch.no_grad():
        store = forward_backward(
            chunks,
            step,
            train_batches,
            seq_length=SEQ,
            micro_batch_size=len(train_batches[0]),
            forward_only=True,
        )
    ctl.finish()
    return {
        "stage": parallel_state.get_pipeline_model_parallel_rank(),
        "layer_numbers": ctl.layer_numbers,
        "layers_per_chunk": [[layer.layer_number for layer in c.decoder.layers] for c in chunks],
        "table": table,
        "rollout_logprob": rollout_logprob,
        "train_logprob": logprobs(store),
        "targets": targets,
        "replayed": _stack_metric(ctl, "replayed"),
        "grads": grads,
        "predictor_losses": predictor_losses,
        "step_logprob": step_logprob,
        "step_replayed": step_replayed,
        "step_targets": step_targets,
    }


def _pipeline_reference(setup, rollout_batches, train_batches):
    from pr2_megatron.testing.moe import build, global_state_dict, randomize_predictors

    model = build(setup)
    randomize_predictors(model, scale=1.0, seed=7)
    full_state = global_state_dict(model)
    return full_state, _pipeline_procedure(setup, full_state, rollout_batches, train_batches)


ROLLOUT_BATCHES = [[0], [1], [2], [3]]  # micro-batch size 1
TRAIN_BATCHES = [[3, 1], [0, 2]]  # micro-batch size 2, another order


def _check_pipeline(moe_layer_freq, parallel, expected_layers):
    model = MoEModelConfig(
        num_layers=len(moe_layer_freq), num_experts=4, topk=2, moe_layer_freq=moe_layer_freq
    )
    ref_setup = TinySetup(model=model)
    full_state, ref = run_distributed(
        _pipeline_reference, 1, ref_setup, ROLLOUT_BATCHES, TRAIN_BATCHES
    )[0]
    assert not torch.equal(ref["table"].routes_TLK, ref["table"].plain_routes_TLK), (
        "predictor too weak to change routes"
    )
    setup = dataclasses.replace(ref_setup, parallel=parallel)
    results = run_distributed(
        _pipeline_procedure, 2, setup, full_state, ROLLOUT_BATCHES, TRAIN_BATCHES
    )

    moe_layers = tuple(n for n, f in enumerate(moe_layer_freq, start=1) if f)
    for res in results:
        assert res["layers_per_chunk"] == expected_layers[res["stage"]]
        owned = [n for layers in res["layers_per_chunk"] for n in layers if n in moe_layers]
        assert res["layer_numbers"] == sorted(owned)
        # Each stage recorded only its layers; the pipeline gather gives every rank all of them.
        assert res["table"].layer_numbers == moe_layers
        assert res["table"].equal(ref["table"]), f"stage {res['stage']}: table differs"
        # Every token went to the recorded experts of the stage's layers.
        assert len(res["replayed"]) == (len(TRAIN_BATCHES) if res["layer_numbers"] else 0)
        for replayed, target in zip(res["replayed"], res["targets"]):
            assert torch.equal(replayed, target)
        assert len(res["step_replayed"]) == (len(ROLLOUT_BATCHES) if res["layer_numbers"] else 0)
        for replayed, target in zip(res["step_replayed"], res["step_targets"]):
            assert torch.equal(replayed, target)
    last = next(res for res in results if res["train_logprob"])
    # The forward/backward step's log-probs (every micro-batch of the 1F1B steady state too).
    for sample, logprob in last["step_logprob"].items():
        torch.testing.assert_close(logprob, ref["step_logprob"][sample], rtol=1e-5, atol=1e-5)
    assert set(last["train_logprob"]) == set(range(NUM_SAMPLES))
    for sample, logprob in last["train_logprob"].items():
        torch.testing.assert_close(logprob, ref["rollout_logprob"][sample], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logprob, last["rollout_logprob"][sample], rtol=1e-5, atol=1e-5)
        ratio = torch.exp(logprob - last["rollout_logprob"][sample])
        assert (ratio - 1).abs().max() < 1e-4
    # Gradients of the predictor-training step: each parameter lives on one stage.
    held = {}
    for res in results:
        assert not set(held) & set(res["grads"]), "a parameter is on two stages"
        held.update(res["grads"])
    assert set(held) == set(ref["grads"])
    for name, ref_grad in ref["grads"].items():
        torch.testing.assert_close(held[name], ref_grad, rtol=1e-4, atol=1e-6, msg=name)
    predictor = [n for n in ref["grads"] if "predictor" in n]
    assert len(predictor) == len(moe_layers)
    assert all(ref["grads"][n].abs().sum() > 0 for n in predictor)
    assert ref["predictor_losses"] and all(loss > 0 for loss in ref["predictor_losses"])


@pytest.mark.slow
def test_pipeline_1f1b_gathers_layers_and_replays_in_another_layout():
    # Stage 0: dense layer 1 and MoE layer 2; stage 1: MoE layers 3 and 4.
    _check_pipeline(
        [0, 1, 1, 1],
        ParallelConfig(pipeline_model_parallel_size=2),
        expected_layers={0: [[1, 2]], 1: [[3, 4]]},
    )


@pytest.mark.slow
def test_pipeline_stage_without_moe_layers_joins_the_gather():
    # Stage 0 holds only dense layers (no router): it must still enter every collective.
    _check_pipeline(
        [0, 0, 1, 1],
        ParallelConfig(pipeline_model_parallel_size=2),
        expected_layers={0: [[1, 2]], 1: [[3, 4]]},
    )


@pytest.mark.slow
def test_virtual_pipeline_interleaved_schedule_replays_every_chunk():
    # PP=2 × VPP=2 over 8 layers: rank 0 holds chunks [1, 2] and [5, 6], rank 1 [3, 4], [7, 8].
    _check_pipeline(
        [0, 1, 1, 1, 1, 1, 1, 1],
        ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
        expected_layers={0: [[1, 2], [5, 6]], 1: [[3, 4], [7, 8]]},
    )


# ============================================================ TP=2 × EP=2 (SP), padded
LENGTHS = {0: 8, 1: 5, 2: 6, 3: 7}


def _tp_ep_rollout_then_train(setup, rollout_batches, train_batches):
    from megatron.core import parallel_state

    from pr2_megatron.routing.controller import RoutingController
    from pr2_megatron.testing.moe import build, randomize_predictors

    model = build(setup)
    randomize_predictors(model, scale=1.0, seed=7)
    ctl = RoutingController(model)
    ids, labels = _samples()
    data_rank = parallel_state.get_data_parallel_rank()
    tp = dict(
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        sequence_parallel=True,
    )

    def logprob(batch):
        x = ids[batch]
        return -model(x, torch.arange(SEQ).expand_as(x), None, labels=labels[batch])

    ctl.predict()
    rollout_logprob = {}
    with torch.no_grad():
        for batch in rollout_batches[data_rank]:
            rollout_logprob.update(zip(batch, logprob(batch)))
    table = gather_route_table(
        ctl.collect_routes(),
        rollout_batches[data_rank],
        layer_numbers=ctl.layer_numbers,
        num_experts=ctl.num_experts,
        topk=ctl.topk,
        plain_routes_per_forward=ctl.collect_plain_routes(),
        lengths_per_forward=[[LENGTHS[s] for s in b] for b in rollout_batches[data_rank]],
        data_group=parallel_state.get_data_parallel_group(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        sequence_parallel=True,
    )

    ctl.replay(collect_metrics=True)
    train_logprob, targets = {}, []
    for batch in train_batches[data_rank]:
        target = micro_batch_targets(table, batch, SEQ, lengths=[LENGTHS[s] for s in batch], **tp)
        ctl.set_targets(target)
        targets.append(target)
        train_logprob.update(zip(batch, logprob(batch).detach()))
    ctl.finish()
    return {
        "table": table,
        "rollout_logprob": rollout_logprob,
        "train_logprob": train_logprob,
        "targets": targets,
        "replayed": _stack_metric(ctl, "replayed"),
    }


@pytest.mark.slow
def test_tp2_ep2_sequence_parallel_padded_replay_in_another_layout():
    setup = TinySetup(
        model=MoEModelConfig(num_experts=4, topk=2),
        parallel=ParallelConfig(
            tensor_model_parallel_size=2, expert_model_parallel_size=2, sequence_parallel=True
        ),
    )
    # DP=2: rollout in micro-batches of 2 (right-padded to SEQ); training in micro-batches of
    # 1, other samples per data-parallel rank, another order.
    rollout = [[[0, 1]], [[2, 3]]]
    train = [[[3], [0]], [[2], [1]]]
    results = run_distributed(_tp_ep_rollout_then_train, 4, setup, rollout, train)
    rollout_logprob = {}
    for res in results:
        rollout_logprob.update(res["rollout_logprob"])
    table = results[0]["table"]
    assert table.cu_seqlens.diff().tolist() == [LENGTHS[s] for s in range(NUM_SAMPLES)]
    assert not torch.equal(table.routes_TLK, table.plain_routes_TLK)
    for res in results:
        assert res["table"].equal(table)
        for replayed, target in zip(res["replayed"], res["targets"], strict=True):
            assert torch.equal(replayed, target)
    for rank in (0, 2):  # tp rank 0 of each data-parallel rank: the [B, S] log-probs
        for sample, train_lp in results[rank]["train_logprob"].items():
            real = LENGTHS[sample]
            rollout_lp = rollout_logprob[sample][:real]
            torch.testing.assert_close(train_lp[:real], rollout_lp, rtol=1e-5, atol=1e-5)
            assert (torch.exp(train_lp[:real] - rollout_lp) - 1).abs().max() < 1e-4


# ============================================================ CP slicing and gathering
def _megatron_cp_split(batch, cp_group):
    """Megatron's ``get_batch_on_this_cp_rank`` for ``cp_group`` (a real or a fake group).

    Core 0.19 added a leading ``is_hybrid_cp`` and asks ``torch.distributed`` for the group's
    size and rank (0.16.1 asks the group): a fake group answers both ways.
    """
    import inspect

    from megatron.core.utils import get_batch_on_this_cp_rank

    parameters = inspect.signature(get_batch_on_this_cp_rank).parameters
    kwargs = {"is_hybrid_cp": False} if "is_hybrid_cp" in parameters else {}
    if not isinstance(cp_group, _FakeGroup):
        return get_batch_on_this_cp_rank(batch, cp_group=cp_group, **kwargs)
    sizes, ranks = torch.distributed.get_world_size, torch.distributed.get_rank
    torch.distributed.get_world_size = lambda group=None: (
        group.size() if isinstance(group, _FakeGroup) else sizes(group)
    )
    torch.distributed.get_rank = lambda group=None: (
        group.rank() if isinstance(group, _FakeGroup) else ranks(group)
    )
    try:
        return get_batch_on_this_cp_rank(batch, cp_group=cp_group, **kwargs)
    finally:
        torch.distributed.get_world_size, torch.distributed.get_rank = sizes, ranks


class _FakeGroup(SimpleNamespace):
    """What ``get_batch_on_this_cp_rank`` asks of a context-parallel group."""

    def size(self):
        return self.world

    def rank(self):
        return self.me


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_context_parallel_targets_match_megatron_cp_split(single_process_group, cp_size):
    seq = 16
    table = _random_table([seq, seq, seq], (1, 3), num_experts=8, topk=2, seed=3)
    batch = [2, 0, 1]
    full_BSLK = torch.stack([table.routes_TLK[table.rows_for([s])].long() for s in batch])
    seen = []
    for cp_rank in range(cp_size):
        group = _FakeGroup(world=cp_size, me=cp_rank)
        expected_BSLK = _megatron_cp_split({"routes": full_BSLK.clone()}, group)["routes"]
        targets = micro_batch_targets(table, batch, seq, cp_rank=cp_rank, cp_size=cp_size)
        got_BSLK = targets.reshape(seq // cp_size, len(batch), 2, 2).transpose(0, 1)
        assert torch.equal(got_BSLK, expected_BSLK)
        positions = context_parallel_positions(seq, cp_rank, cp_size)
        assert torch.equal(full_BSLK[:, positions], expected_BSLK)
        seen.append(positions)
        # With sequence parallelism each TP rank takes its chunk of the CP-local sequence.
        for tp_rank in range(2):
            sp = micro_batch_targets(
                table,
                batch,
                seq,
                cp_rank=cp_rank,
                cp_size=cp_size,
                tp_rank=tp_rank,
                tp_size=2,
                sequence_parallel=True,
            )
            chunk = seq // cp_size // 2
            expected_SBLK = expected_BSLK.transpose(0, 1)[tp_rank * chunk : (tp_rank + 1) * chunk]
            assert torch.equal(sp, expected_SBLK.reshape(-1, 2, 2))
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(seq))


def test_context_parallel_split_needs_two_chunks_per_rank():
    with pytest.raises(ValueError, match="not divisible by 2·CP = 4"):
        context_parallel_positions(6, 0, 2)
    with pytest.raises(ValueError, match="outside a group of 2"):
        context_parallel_positions(8, 2, 2)


CP_SEQ = 16
CP_LENGTHS = [16, 11, 13, 9]


def _cp_round_trip(rollout_batches):
    """CP=2 × TP=2 (SP): each rank records its CP/SP slice of padded micro-batches; gather."""
    from megatron.core import parallel_state

    from pr2_megatron.runtime.parallel import initialize_parallel

    initialize_parallel(
        ParallelConfig(
            context_parallel_size=2, tensor_model_parallel_size=2, sequence_parallel=True
        )
    )
    table = _random_table(CP_LENGTHS, (2, 4), num_experts=8, topk=2, seed=5)
    where = dict(
        cp_rank=parallel_state.get_context_parallel_rank(),
        cp_size=parallel_state.get_context_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        sequence_parallel=True,
    )
    routes, old, lengths = [], [], []
    for batch in rollout_batches:
        lengths.append([CP_LENGTHS[s] for s in batch])
        routes.append(micro_batch_targets(table, batch, CP_SEQ, lengths=lengths[-1], **where))
        old.append(
            micro_batch_targets(table, batch, CP_SEQ, lengths=lengths[-1], plain=True, **where)
        )
        # The slice is what Megatron's CP split + SP scatter give this rank of the padded batch.
        full_BSLK = micro_batch_targets(table, batch, CP_SEQ, lengths=lengths[-1])
        full_BSLK = full_BSLK.reshape(CP_SEQ, len(batch), 2, 2).transpose(0, 1)
        cp_BSLK = _megatron_cp_split({"r": full_BSLK}, parallel_state.get_context_parallel_group())[
            "r"
        ]
        chunk = cp_BSLK.shape[1] // where["tp_size"]
        sp_SBLK = cp_BSLK.transpose(0, 1)[where["tp_rank"] * chunk : (where["tp_rank"] + 1) * chunk]
        assert torch.equal(routes[-1], sp_SBLK.reshape(-1, 2, 2))
    gathered = gather_route_table(
        routes,
        rollout_batches,
        layer_numbers=table.layer_numbers,
        num_experts=8,
        topk=2,
        plain_routes_per_forward=old,
        lengths_per_forward=lengths,
        data_group=parallel_state.get_data_parallel_group(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        sequence_parallel=True,
        cp_group=parallel_state.get_context_parallel_group(),
    )
    return gathered.equal(table)


@pytest.mark.slow
def test_context_parallel_routes_gather_back_into_sequence_order():
    assert run_distributed(_cp_round_trip, 4, [[1, 3], [2, 0]]) == [True] * 4


def _pp_dp_round_trips(layouts):
    from pr2_megatron.runtime.parallel import initialize_parallel

    initialize_parallel(ParallelConfig(pipeline_model_parallel_size=2))
    return [_pp_dp_round_trip(stage_layers) for stage_layers in layouts]


def _pp_dp_round_trip(stage_layers):
    """PP=2 × DP=2 with synthetic routes; ``stage_layers[s]`` are stage s's MoE layers."""
    from megatron.core import parallel_state

    from pr2_megatron.routing.controller import RoutingController

    table = _random_table([8, 5, 7, 8], (3, 4), num_experts=8, topk=2, seed=9)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    data_rank = parallel_state.get_data_parallel_rank()
    layers = stage_layers[stage]
    batches = [[data_rank], [data_rank + 2]]
    lengths = [[int(table.cu_seqlens.diff()[s])] for [s] in batches]
    routes = old = None
    if layers:
        routes = [
            micro_batch_targets(table, b, 8, lengths=n, layer_numbers=layers)
            for b, n in zip(batches, lengths)
        ]
        old = [
            micro_batch_targets(table, b, 8, lengths=n, layer_numbers=layers, plain=True)
            for b, n in zip(batches, lengths)
        ]
    gathered = gather_route_table(
        routes,
        batches,
        layer_numbers=layers,
        num_experts=8 if layers else 0,
        topk=2 if layers else 0,
        plain_routes_per_forward=old,
        lengths_per_forward=lengths,
        data_group=parallel_state.get_data_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
    )
    # A stage without routers takes zero-layer targets through a controller with no routers.
    stage_targets = micro_batch_targets(gathered, [1, 0], 8, lengths=[5, 8], layer_numbers=layers)
    assert stage_targets.shape == (16, len(layers), 2)
    if not layers:
        ctl = RoutingController([], allow_empty=True)
        ctl.replay()
        ctl.set_targets(stage_targets)
        ctl.finish()
    return gathered.equal(table)


@pytest.mark.slow
def test_pipeline_gather_with_data_parallel_and_a_stage_without_layers():
    # Stage 0 without MoE layers (passes no routes); then layers split out of order by stage.
    layouts = [[[], [3, 4]], [[4], [3]]]
    assert run_distributed(_pp_dp_round_trips, 4, layouts) == [[True, True]] * 4


# ============================================================ right-padded micro-batches
def test_padded_targets_real_rows_exact_padding_rows_distinct(single_process_group):
    table = _random_table([8, 3, 6], (2, 5), num_experts=8, topk=3, seed=1)
    batch, lengths = [1, 2, 0], [3, 6, 8]
    targets_SBLK = micro_batch_targets(table, batch, 8, lengths=lengths).reshape(8, 3, 2, 3)
    old_SBLK = micro_batch_targets(table, batch, 8, lengths=lengths, plain=True).reshape(8, 3, 2, 3)
    for column, (sample, length) in enumerate(zip(batch, lengths)):
        rows = table.rows_for([sample])
        assert torch.equal(targets_SBLK[:length, column], table.routes_TLK[rows].long())
        assert torch.equal(old_SBLK[:length, column], table.plain_routes_TLK[rows].long())
        padding = targets_SBLK[length:, column]
        assert padding.lt(8).all() and padding.ge(0).all()
        assert (padding.sort(-1).values.diff(dim=-1) > 0).all()  # distinct ids in every row
    # Sequence parallel: rank r holds positions r*4 .. r*4+3 of every column.
    for tp_rank in range(2):
        sp = micro_batch_targets(
            table, batch, 8, lengths=lengths, tp_rank=tp_rank, tp_size=2, sequence_parallel=True
        )
        assert torch.equal(sp.reshape(4, 3, 2, 3), targets_SBLK[tp_rank * 4 : (tp_rank + 1) * 4])
    # Layer selection keeps the requested columns.
    only5 = micro_batch_targets(table, batch, 8, lengths=lengths, layer_numbers=[5])
    assert torch.equal(only5.reshape(8, 3, 1, 3), targets_SBLK[:, :, 1:])
    assert micro_batch_targets(table, batch, 8, lengths=lengths, layer_numbers=[]).shape == (
        24,
        0,
        3,
    )


def test_padded_micro_batches_round_trip_through_the_table(single_process_group):
    table = _random_table([8, 3, 6, 1], (1, 2, 4), num_experts=300, topk=2, seed=2)
    assert table.routes_TLK.dtype == torch.int16
    forwards = [[3, 0], [2, 1]]
    lengths = [[1, 8], [6, 3]]
    routes = [micro_batch_targets(table, b, 8, lengths=n) for b, n in zip(forwards, lengths)]
    old = [
        micro_batch_targets(table, b, 8, lengths=n, plain=True) for b, n in zip(forwards, lengths)
    ]
    gathered = gather_route_table(
        routes,
        forwards,
        layer_numbers=table.layer_numbers,
        num_experts=300,
        topk=2,
        plain_routes_per_forward=old,
        lengths_per_forward=lengths,
    )
    assert gathered.equal(table)
    # The padding rows (route 0..K-1) never enter the packed table.
    assert gathered.num_tokens == 18


def test_padded_targets_reject_bad_lengths(single_process_group):
    table = _random_table([8, 3], (2,), num_experts=8, topk=2, seed=4)
    with pytest.raises(ValueError, match="2 sample ids but 1 lengths"):
        micro_batch_targets(table, [0, 1], 8, lengths=[8])
    with pytest.raises(ValueError, match="sample id 1: length 9 is outside"):
        micro_batch_targets(table, [0, 1], 8, lengths=[8, 9])
    with pytest.raises(ValueError, match="sample id 1: length -1 is outside"):
        micro_batch_targets(table, [0, 1], 8, lengths=[8, -1])
    with pytest.raises(
        ValueError, match="sample id 1: micro-batch has 4 tokens, route table has 3"
    ):
        micro_batch_targets(table, [0, 1], 8, lengths=[8, 4])
    with pytest.raises(ValueError, match="sample id 1: micro-batch has 8 tokens"):
        micro_batch_targets(table, [0, 1], 8)  # unpadded, but sample 1 is shorter
    with pytest.raises(ValueError, match="layer 3 is not covered"):
        micro_batch_targets(table, [0], 8, layer_numbers=[3])
    routes = [micro_batch_targets(table, [0, 1], 8, lengths=[8, 3])]
    common = dict(layer_numbers=(2,), num_experts=8, topk=2)
    with pytest.raises(ValueError, match=r"forward 0: 1 lengths for 2 samples"):
        gather_route_table(routes, [[0, 1]], lengths_per_forward=[[8]], **common)
    with pytest.raises(ValueError, match=r"sample id 1 has length 9, outside .*\[0, 8\] tokens"):
        gather_route_table(routes, [[0, 1]], lengths_per_forward=[[8, 9]], **common)
    with pytest.raises(ValueError, match=r"expected \[tokens, 2 MoE layers \[2, 3\], k=2\]"):
        gather_route_table(routes, [[0, 1]], layer_numbers=(2, 3), num_experts=8, topk=2)
    with pytest.raises(ValueError, match="no MoE layers and there is no pipeline group"):
        gather_route_table(None, [[0, 1]], layer_numbers=(), num_experts=0, topk=0)


# ============================================================ r3: engine-format routes
R3_LENGTHS = [8, 6, 8, 5]


def _r3_engine_routes_replay(setup):
    """Record (r3 rollout), hand routes over in vLLM/SGLang's format, replay them."""
    from pr2_megatron.routes.engine import from_engine_routed_experts
    from pr2_megatron.routing.controller import RoutingController
    from pr2_megatron.testing.moe import build

    model = build(setup)
    ctl = RoutingController(model)
    ids, labels = _samples()
    num_hidden_layers = setup.model.num_layers

    def logprob(batch):
        x = ids[batch]
        return -model(x, torch.arange(SEQ).expand_as(x), None, labels=labels[batch])

    ctl.record()
    rollout_batches = [[0, 1], [2, 3]]
    rollout_logprob = {}
    with torch.no_grad():
        for batch in rollout_batches:
            rollout_logprob.update(zip(batch, logprob(batch)))
    # The engine returns, per request, [tokens, num_hidden_layers, k] over *all* decoder
    # layers; dense layers hold garbage (here 255, not even a valid expert id).
    per_request = {}
    for batch, routes_TLK in zip(rollout_batches, ctl.collect_routes()):
        routes_SBLK = routes_TLK.reshape(SEQ, len(batch), *routes_TLK.shape[1:])
        for column, sample in enumerate(batch):
            engine = torch.full((R3_LENGTHS[sample], num_hidden_layers, ctl.topk), 255)
            for index, layer in enumerate(ctl.layer_numbers):
                engine[:, layer - 1] = routes_SBLK[: R3_LENGTHS[sample], column, index]
            per_request[sample] = engine.to(torch.int32)
    table = from_engine_routed_experts(
        [per_request[s] for s in range(NUM_SAMPLES)],
        moe_layer_numbers=ctl.layer_numbers,
        num_experts=ctl.num_experts,
        topk=ctl.topk,
        num_hidden_layers=num_hidden_layers,
    )

    def replay(train_batches):
        ctl.replay(collect_metrics=True)
        out, targets = {}, []
        for batch in train_batches:
            target = micro_batch_targets(table, batch, SEQ, lengths=[R3_LENGTHS[s] for s in batch])
            ctl.set_targets(target)
            targets.append(target)
            with torch.no_grad():
                out.update(zip(batch, logprob(batch)))
        ctl.finish()
        return out, targets, _stack_metric(ctl, "replayed"), _stack_metric(ctl, "live")

    same_weights = replay([[3], [1], [2], [0]])
    # The router moves: the live top-k changes, the replayed experts must not.
    with torch.no_grad():
        for router in ctl.routers:
            router.weight.add_(torch.randn_like(router.weight) * 0.5)
    moved = replay([[2, 0], [3, 1]])
    return {
        "layer_numbers": ctl.layer_numbers,
        "table": table,
        "rollout_logprob": rollout_logprob,
        "same_weights": same_weights,
        "moved": moved,
    }


@pytest.mark.slow
def test_r3_engine_format_routes_with_dense_first_layer_replay_recorded_experts():
    setup = TinySetup(model=MoEModelConfig(num_layers=3, num_experts=8, moe_layer_freq=[0, 1, 1]))
    res = run_distributed(_r3_engine_routes_replay, 1, setup)[0]
    assert res["layer_numbers"] == [2, 3]
    assert res["table"].layer_numbers == (2, 3)
    assert res["table"].cu_seqlens.diff().tolist() == R3_LENGTHS
    logprob, targets, replayed, _ = res["same_weights"]
    for r, t in zip(replayed, targets, strict=True):
        assert torch.equal(r, t)
    for sample, lp in logprob.items():
        real = R3_LENGTHS[sample]
        rollout_lp = res["rollout_logprob"][sample][:real]
        torch.testing.assert_close(lp[:real], rollout_lp, rtol=1e-5, atol=1e-5)
    _, targets, replayed, live = res["moved"]
    for r, t in zip(replayed, targets, strict=True):
        assert torch.equal(r, t)
    assert any(not torch.equal(r, v) for r, v in zip(replayed, live)), "router did not move"
