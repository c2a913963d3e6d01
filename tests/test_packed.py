"""Packed (THD) micro-batches: targets, token names and gathers against brute-force references.

Megatron's THD attention needs Transformer Engine (the local ``DotProductAttention`` asserts
``packed_seq_params is None``), so a packed *model* forward cannot run on CPU. The route path is
tested at the target level against a brute-force reference, and through real Megatron MoE
layers (router, dispatcher, experts) fed the packed stream: every real token is dispatched to
its recorded experts.
"""

import dataclasses

import pytest
import torch

from pr2_megatron.errors import RouteError
from pr2_megatron.routes import (
    KEY_STRIDE,
    MicroBatch,
    PackedMicroBatch,
    RouteGroups,
    RoutePath,
    RouteTable,
    thd_partitioned_indices,
    token_keys,
)
from pr2_megatron.routes.packed import packed_targets
from pr2_megatron.routes.targets import micro_batch_targets, padding_routes_of

E, K, LAYERS = 8, 2, (1, 3)


def _table(lengths, seed=0, ids=None):
    generator = torch.Generator().manual_seed(seed)
    ids = ids or list(range(len(lengths)))
    per_sample = [
        torch.rand(n, len(LAYERS), E, generator=generator).argsort(-1)[..., :K] for n in lengths
    ]
    return RouteTable.from_samples(
        per_sample, sample_ids=ids, layer_numbers=LAYERS, num_experts=E, topk=K
    )


def _reference_rows(batch, cp_rank, cp_size, tp_rank, tp_size):
    """(sample index, position) of the rank's rows, by TE's documented THD partitioning."""
    stream = []
    for index, padded in enumerate(batch.padded_lengths):
        stream.append([(index, p) for p in range(padded)])
    rank_rows = []
    for rows in stream:
        if cp_size == 1:
            rank_rows += rows
            continue
        chunk = len(rows) // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            rank_rows += rows[c * chunk : (c + 1) * chunk]
    per_tp = len(rank_rows) // tp_size
    return rank_rows[tp_rank * per_tp : (tp_rank + 1) * per_tp]


def _reference_targets(table, batch, cp_rank, cp_size, tp_rank, tp_size):
    routes = {
        sid: table.routes_TLK[table.sample_slice(i)]
        for i, sid in enumerate(table.sample_ids.tolist())
    }
    padding_order = [
        (i, p)
        for i, (n, padded) in enumerate(zip(batch.lengths, batch.padded_lengths))
        for p in range(n, padded)
    ]
    out = []
    for index, position in _reference_rows(batch, cp_rank, cp_size, tp_rank, tp_size):
        if position < batch.lengths[index]:
            out.append(routes[batch.sample_ids[index]][position].long())
        else:
            number = torch.tensor([padding_order.index((index, position))])
            out.append(padding_routes_of(number, K, E).expand(len(LAYERS), K))
    return torch.stack(out)


LENGTHS = [5, 9, 3, 12]


@pytest.mark.parametrize(
    "cp_size, tp_size", [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1)], ids=lambda v: str(v)
)
def test_packed_targets_match_brute_force_for_every_rank(cp_size, tp_size):
    table = _table(LENGTHS)
    batch = PackedMicroBatch([2, 0, 3, 1], [3, 5, 12, 9], alignment=2 * cp_size * tp_size)
    covered = []
    for cp_rank in range(cp_size):
        for tp_rank in range(tp_size):
            got = packed_targets(
                table, batch, tp_rank=tp_rank, tp_size=tp_size, cp_rank=cp_rank, cp_size=cp_size
            )
            want = _reference_targets(table, batch, cp_rank, cp_size, tp_rank, tp_size)
            assert torch.equal(got, want), (cp_rank, tp_rank)
            covered += _reference_rows(batch, cp_rank, cp_size, tp_rank, tp_size)
    # the ranks together hold every row of the stream once
    assert sorted(covered) == sorted(
        (i, p) for i, padded in enumerate(batch.padded_lengths) for p in range(padded)
    )


def test_packed_targets_pick_layers_and_plain_routes():
    table = _table(LENGTHS)
    batch = PackedMicroBatch([2, 0, 3, 1], [3, 5, 12, 9], alignment=4)
    full = packed_targets(table, batch)
    assert torch.equal(packed_targets(table, batch, layer_numbers=[3]), full[:, 1:])
    assert packed_targets(table, batch, layer_numbers=[]).shape == (full.shape[0], 0, K)
    flipped = table.routes_TLK.flip(-1)
    with_plain = dataclasses.replace(table, plain_routes_TLK=flipped)
    assert torch.equal(
        packed_targets(with_plain, batch, plain=True),
        packed_targets(dataclasses.replace(table, routes_TLK=flipped), batch),
    )
    with pytest.raises(RouteError, match="no plain-replay"):
        packed_targets(table, batch, plain=True)
    with pytest.raises(RouteError, match="no plain-replay"):
        micro_batch_targets(table, [0], LENGTHS[0], plain=True)


def test_thd_partition_is_per_sequence():
    # two sequences of padded length 8, CP=2: rank 0 holds chunks 0 and 3 of each
    assert thd_partitioned_indices([8, 8], 0, 2).tolist() == [0, 1, 6, 7, 8, 9, 14, 15]
    assert thd_partitioned_indices([8, 8], 1, 2).tolist() == [2, 3, 4, 5, 10, 11, 12, 13]
    with pytest.raises(RouteError, match="packed sequence 1: padded length 6 is not divisible"):
        thd_partitioned_indices([8, 6], 0, 2)


def test_padding_is_never_a_token_and_gets_no_name():
    batch = PackedMicroBatch([4, 7], [3, 5], alignment=4)
    assert batch.padded_lengths == (4, 8) and batch.seq_len == 12
    assert batch.cu_seqlens.tolist() == [0, 3, 8] and batch.cu_seqlens_padded.tolist() == [0, 4, 12]
    keys, groups = token_keys(batch, RouteGroups())
    expected = [4 * KEY_STRIDE + p for p in range(3)] + [-1]
    expected += [7 * KEY_STRIDE + p for p in range(5)] + [-1] * 3
    assert keys.tolist() == expected
    assert groups.tolist() == [4] * 4 + [7] * 8
    again = PackedMicroBatch.from_cu_seqlens([4, 7], batch.cu_seqlens, batch.cu_seqlens_padded)
    assert (again.lengths, again.padded_lengths) == (batch.lengths, batch.padded_lengths)
    table = _table([3, 5], ids=[4, 7])
    table.check_tokens([4, 7], [3, 5])  # the table counts real tokens only
    with pytest.raises(RouteError):
        packed_targets(table, PackedMicroBatch([4, 7], [4, 5], alignment=4))


def test_bad_packed_batches_are_rejected():
    with pytest.raises(RouteError, match="sample id 1: length 5 and padded length 4"):
        PackedMicroBatch([0, 1], [2, 5], padded_lengths=[2, 4])
    with pytest.raises(RouteError, match="padded length 3 is not a multiple of the alignment 2"):
        PackedMicroBatch([0], [3], padded_lengths=[3], alignment=2)
    with pytest.raises(RouteError, match="not divisible by TP=2"):
        packed_targets(_table([3]), PackedMicroBatch([0], [3]), tp_rank=0, tp_size=2)


# --------------------------------------------- through Megatron MoE layers, both directions
@pytest.mark.usefixtures("megatron_single")
def test_right_padded_rollout_replays_into_packed_training_and_back():
    from pr2_megatron.models import MoEModelConfig
    from pr2_megatron.routing import RoutingController
    from pr2_megatron.testing.moe import TinySetup, build, randomize_predictors

    model = build(TinySetup(model=MoEModelConfig(num_layers=2, num_experts=E, topk=K)))
    randomize_predictors(model, scale=1.0, seed=2)
    ctl = RoutingController(model)
    path = RoutePath(ctl)
    moe_layers = [layer.mlp for layer in model.decoder.layers]
    hidden = 64
    generator = torch.Generator().manual_seed(5)
    lengths = {0: 5, 1: 9, 2: 3, 3: 12}
    tokens = {s: torch.randn(n, hidden, generator=generator) for s, n in lengths.items()}

    def run_layers(x_SBH):
        maps = []
        for layer in moe_layers:
            handle = layer.router.register_forward_hook(lambda m, i, o: maps.append(o[1].clone()))
            layer(x_SBH)
            handle.remove()
        return maps

    def right_padded(samples):
        seq = max(lengths[s] for s in samples)
        x = torch.zeros(seq, len(samples), hidden)
        for b, s in enumerate(samples):
            x[: lengths[s], b] = tokens[s]
        return MicroBatch(samples, seq, [lengths[s] for s in samples]), x

    def packed(samples, alignment):
        batch = PackedMicroBatch(samples, [lengths[s] for s in samples], alignment=alignment)
        x = torch.zeros(batch.seq_len, 1, hidden)
        start = 0
        for s, padded in zip(samples, batch.padded_lengths):
            x[start : start + lengths[s], 0] = tokens[s]
            start += padded
        return batch, x

    def rollout(batches_and_inputs):
        ctl.predict()
        with torch.no_grad():
            for batch, x in batches_and_inputs:
                path.name_tokens(batch)
                run_layers(x)
        return path.gather([b for b, _ in batches_and_inputs])

    def replay_and_check(table, batches_and_inputs):
        ctl.replay()
        for batch, x in batches_and_inputs:
            targets = path.targets(table, batch)
            path.set_targets(table, batch)
            maps = run_layers(x)
            for column, routing_map in enumerate(maps):
                expected = torch.zeros_like(routing_map).scatter_(1, targets[:, column], True)
                assert torch.equal(routing_map, expected)
            # every real token on its recorded experts
            if isinstance(batch, PackedMicroBatch):
                rows, start = [], 0
                for s, padded in zip(batch.sample_ids, batch.padded_lengths):
                    rows += list(range(start, start + lengths[s]))
                    start += padded
                real = torch.cat([table.routes_TLK[table.rows_for([s])] for s in batch.sample_ids])
                assert torch.equal(targets[rows], real.long())
        ctl.finish()

    # right-padded rollout -> table -> packed training layout (other grouping and order)
    table = rollout([right_padded([0, 1]), right_padded([2, 3])])
    assert table.num_tokens == sum(lengths.values())  # padding never counted
    replay_and_check(table, [packed([3, 0], alignment=4), packed([2, 1], alignment=4)])
    # packed rollout -> table -> right-padded training layout
    table2 = rollout([packed([1, 2, 0], alignment=8), packed([3], alignment=8)])
    assert table2.num_tokens == sum(lengths.values())
    assert torch.equal(table2.routes_TLK, table.routes_TLK)  # same tokens, same predictions
    replay_and_check(table2, [right_padded([3, 1]), right_padded([0, 2])])


# ------------------------------------------------------ SP: TP=2 in 2 gloo ranks (route level)
def _sp_rank(lengths, alignment):
    import torch.distributed as dist

    from pr2_megatron.routes.packed import gather_packed_route_table, packed_local_rows

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    group = dist.new_group([0, 1])
    singles = [dist.new_group([0]), dist.new_group([1])]
    table = _table(lengths)
    batch = PackedMicroBatch(list(range(len(lengths))), lengths, alignment=alignment)
    local = packed_targets(table, batch, tp_rank=rank, tp_size=2)
    sample_T, position_T = packed_local_rows(batch, tp_rank=rank, tp_size=2)
    gathered = gather_packed_route_table(
        [local],
        [batch],
        layer_numbers=LAYERS,
        num_experts=E,
        topk=K,
        data_group=singles[rank],
        tp_group=group,
        sequence_parallel=True,
    )
    return gathered.equal(table), local.shape[0], sample_T.tolist()


@pytest.mark.slow
def test_sequence_parallel_packed_gather_rebuilds_the_table():
    from pr2_megatron.testing.distributed import run_distributed

    results = run_distributed(_sp_rank, 2, [5, 9, 3], 2)
    assert all(equal for equal, _, _ in results)
    assert [rows for _, rows, _ in results] == [10, 10]  # (6 + 10 + 4) / 2 each
