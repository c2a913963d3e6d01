"""What the route path sends, and how padding is routed.

* Every collective of the route path uses a dtype NCCL supports (no int16, no bool) while the
  table stays in the smallest dtype; checked on gloo by recording every collective's dtype for
  E <= 256, E > 256 and E > 32767.
* One collective per micro-batch for all layers (routes, sample ids and lengths together), for
  2 and 4 MoE layers on 1, 2 and 4 ranks.
* A bad route or length on one rank of a data-parallel x sequence-parallel grid makes every
  rank raise the same error (the data-parallel statuses ride in the route buffer).
* Padding tokens get routes spread over the experts and expert-parallel ranks (distinct per
  row, never in the table, never counted).
"""

import pytest
import torch
import torch.distributed as dist

from pr2_megatron.routes import RouteTable, gather_route_table, micro_batch_targets, route_dtype
from pr2_megatron.testing.distributed import run_distributed

NCCL_DTYPES = {
    torch.uint8, torch.int8, torch.int32, torch.int64, torch.float16, torch.bfloat16,
    torch.float32, torch.float64,
}  # fmt: skip
COLLECTIVES = ("all_gather_into_tensor", "all_gather", "all_reduce", "broadcast", "all_to_all")


class _Recorder:
    """Wraps torch.distributed's collectives; records (name, dtype) of every call."""

    def __init__(self):
        self.calls = []
        self._originals = {}
        for name in COLLECTIVES:
            original = getattr(dist, name)
            self._originals[name] = original

            def wrapper(*args, _name=name, _original=original, **kwargs):
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                self.calls.append((_name, tensors[0].dtype if tensors else None))
                return _original(*args, **kwargs)

            setattr(dist, name, wrapper)

    def restore(self):
        for name, original in self._originals.items():
            setattr(dist, name, original)


def _routes(num_tokens, num_layers, topk, num_experts, seed, top_id=False):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand((num_tokens, num_layers, num_experts), generator=generator)
    routes = scores.argsort(-1)[..., :topk]
    if top_id:  # the largest id must cross the wire intact
        routes[0, 0, 0] = num_experts - 1
        routes[0, 0, 1:] = torch.arange(topk - 1)
    return routes


def _gather_and_record(num_experts, num_layers, num_forwards, batch=2, seq=4, topk=2, init=True):
    if init:
        dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    layers = list(range(1, num_layers + 1))
    routes = [
        _routes(seq * batch, num_layers, topk, num_experts, seed=rank * 100 + f, top_id=True)
        for f in range(num_forwards)
    ]
    ids = [[(f * size + rank) * batch + b for b in range(batch)] for f in range(num_forwards)]
    lengths = [[seq - b for b in range(batch)] for _ in range(num_forwards)]
    recorder = _Recorder()
    try:
        table = gather_route_table(
            routes,
            ids,
            layer_numbers=layers,
            num_experts=num_experts,
            topk=topk,
            plain_routes_per_forward=routes,
            lengths_per_forward=lengths,
        )
    finally:
        recorder.restore()
    return {
        "calls": recorder.calls,
        "table": table,
        "routes": routes,
        "ids": ids,
        "lengths": lengths,
    }


@pytest.mark.parametrize("num_experts", [8, 300, 40000])
def test_every_collective_uses_an_nccl_dtype_and_the_table_the_smallest(num_experts):
    results = run_distributed(_gather_and_record, 2, num_experts, 2, 3)
    for result in results:
        assert result["calls"], "no collective recorded"
        dtypes = {dtype for _, dtype in result["calls"]}
        assert dtypes <= NCCL_DTYPES, dtypes
        table = result["table"]
        assert table.routes_TLK.dtype == route_dtype(num_experts)
        assert int(table.routes_TLK.max()) == num_experts - 1  # not wrapped on the wire
    # Every rank ends with the same table, and it holds every rank's real tokens.
    first = results[0]["table"]
    assert all(r["table"].equal(first) for r in results)
    for result in results:
        for routes, ids, lengths in zip(result["routes"], result["ids"], result["lengths"]):
            routes_SBLK = routes.view(4, 2, *routes.shape[1:])
            for column, (sample, length) in enumerate(zip(ids, lengths)):
                rows = first.rows_for([sample])
                assert torch.equal(first.routes_TLK[rows].long(), routes_SBLK[:length, column])


def test_smallest_dtype_is_exact_at_the_edges():
    assert route_dtype(256) == torch.uint8 and route_dtype(257) == torch.int16
    assert route_dtype(32768) == torch.int16  # ids 0..32767 fit int16
    assert route_dtype(32769) == torch.int32


def _collectives_for_layer_counts(layer_counts, num_forwards):
    dist.init_process_group("gloo")
    calls = {}
    for num_layers in layer_counts:
        calls[num_layers] = _gather_and_record(8, num_layers, num_forwards, init=False)["calls"]
    return calls


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_one_collective_per_micro_batch(world_size):
    results = run_distributed(_collectives_for_layer_counts, world_size, (2, 4), 3)
    for calls_by_layers in results:
        for num_layers, calls in calls_by_layers.items():
            # Per micro-batch (3 forwards): one data-parallel all-gather of routes, plain
            # routes, sample ids, lengths and the route checks' status together (none on one
            # rank); nothing else (the statuses ride in the last forward's buffer).
            expected = 0 if world_size == 1 else 3
            assert len(calls) == expected, (num_layers, calls)


def _gather_with_one_bad_rank(bad_rank, kind, tp_size):
    """4 ranks: data groups {r, r + TP...}, SP groups of ``tp_size``; ``bad_rank`` breaks."""
    from pr2_megatron.errors import RouteError

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tp_group = dp_group = None
    for start in range(0, world, tp_size):  # every rank creates every group, in one order
        group = dist.new_group(list(range(start, start + tp_size)))
        tp_group = group if start <= rank < start + tp_size else tp_group
    for offset in range(tp_size):
        group = dist.new_group(list(range(offset, world, tp_size)))
        dp_group = group if rank % tp_size == offset else dp_group
    batch, seq, local_seq = 2, 8, 8 // tp_size
    dp_rank = rank // tp_size
    routes = [
        _routes(local_seq * batch, 2, 2, 8, seed=rank * 10 + f).to(torch.long) for f in range(2)
    ]
    lengths = [[seq, seq - 1] for _ in range(2)]
    if rank == bad_rank and kind == "range":
        routes[1][3, 1, 0] = 8  # forward 1, token row 3 (position 1 of sample 1), layer 2
    if rank == bad_rank and kind == "length":
        lengths[0][1] = seq + 5
    ids = [[(f * 10 + dp_rank) * batch + b for b in range(batch)] for f in range(2)]
    try:
        gather_route_table(
            routes, ids, layer_numbers=[1, 2], num_experts=8, topk=2,
            lengths_per_forward=lengths, data_group=dp_group,
            tp_group=tp_group if tp_size > 1 else None, sequence_parallel=tp_size > 1,
        )  # fmt: skip
    except RouteError as error:
        return str(error)
    return None


@pytest.mark.parametrize(
    "kind,tp_size,bad_rank", [("range", 1, 3), ("range", 2, 3), ("length", 2, 0)]
)
def test_a_bad_route_on_one_rank_raises_the_same_error_on_every_rank(kind, tp_size, bad_rank):
    messages = run_distributed(_gather_with_one_bad_rank, 4, bad_rank, kind, tp_size)
    assert all(m is not None for m in messages), messages
    assert len(set(messages)) == 1, messages
    dp_rank = bad_rank // tp_size
    if kind == "range":
        # Token row 3 of the bad rank's SP chunk = position (3 // 2) + chunk start, sample 1.
        position = 3 // 2 + (bad_rank % tp_size) * (8 // tp_size)
        sample = (10 + dp_rank) * 2 + 1
        expected = (
            f"forward 1: sample id {sample}, token {position}, MoE layer 2: "
            "expert id 8 out of range [0, 8)"
        )
        assert messages[0] == expected, messages[0]
    else:
        assert f"sample id {dp_rank * 2 + 1}" in messages[0] and "13" in messages[0], messages


# ---------------------------------------------------------------------------- padding


def _padded_table(lengths, num_experts, topk):
    generator = torch.Generator().manual_seed(0)
    per_sample = [
        torch.rand((n, 1, num_experts), generator=generator).argsort(-1)[..., :topk]
        for n in lengths
    ]
    return RouteTable.from_samples(
        per_sample,
        sample_ids=list(range(len(lengths))),
        layer_numbers=[1],
        num_experts=num_experts,
        topk=topk,
    )


def test_padding_routes_spread_over_experts_and_expert_parallel_ranks():
    num_experts, topk, seq, ep = 64, 8, 512, 8
    lengths = [128, 512, 256, 384, 128, 200]  # 4x spread in response lengths
    table = _padded_table(lengths, num_experts, topk)
    targets = micro_batch_targets(table, list(range(6)), seq, lengths=lengths)
    targets_SBK = targets.view(seq, 6, topk)
    pad_SB = torch.arange(seq).unsqueeze(1) >= torch.tensor(lengths).unsqueeze(0)
    padding_NK = targets_SBK[pad_SB]
    assert padding_NK.shape[0] > 0.4 * pad_SB.numel()  # most tokens of the batch are padding
    assert (padding_NK.sort(-1).values.diff(dim=-1) > 0).all()  # distinct within a row
    per_expert = torch.bincount(padding_NK.reshape(-1), minlength=num_experts)
    per_rank = per_expert.view(ep, num_experts // ep).sum(1)
    assert per_rank.max() - per_rank.min() <= topk  # even over the EP ranks (to one row)
    assert per_expert.max() - per_expert.min() <= 1  # and over the experts
    # Real tokens are exactly the table's, padding never counted as a token.
    for column, length in enumerate(lengths):
        rows = table.rows_for([column])
        assert torch.equal(targets_SBK[:length, column], table.routes_TLK[rows][:, 0].long())
    assert table.num_tokens == sum(lengths)


def test_padding_routes_of_a_slice_equal_the_full_micro_batch():
    table = _padded_table([3, 8, 5], num_experts=8, topk=2)
    full = micro_batch_targets(table, [0, 1, 2], 8, lengths=[3, 8, 5]).view(8, 3, 1, 2)
    for tp_rank in range(2):
        sp = micro_batch_targets(
            table, [0, 1, 2], 8, lengths=[3, 8, 5], tp_rank=tp_rank, tp_size=2,
            sequence_parallel=True,
        )  # fmt: skip
        assert torch.equal(sp.view(4, 3, 1, 2), full[tp_rank * 4 : (tp_rank + 1) * 4])


def test_tables_never_share_the_reused_gather_workspace(single_process_group):
    # The CPU gathers reuse one workspace: a second gather (of other routes, smaller and larger)
    # must leave the first table's routes, ids and lengths as they were.
    def gather(seed, batch):
        routes = _routes(4 * batch, 2, 2, 8, seed=seed)
        ids = [seed * 100 + b for b in range(batch)]
        lengths = [4 - b % 2 for b in range(batch)]
        table = gather_route_table(
            [routes], [ids], layer_numbers=[1, 2], num_experts=8, topk=2,
            plain_routes_per_forward=[routes.flip(-1)], lengths_per_forward=[lengths],
        )  # fmt: skip
        return table, routes

    first, first_routes = gather(1, 3)
    snapshot = (first.routes_TLK.clone(), first.plain_routes_TLK.clone(), first.sample_ids.clone())
    for seed, batch in ((2, 2), (3, 6)):
        gather(seed, batch)
    assert torch.equal(first.routes_TLK, snapshot[0])
    assert torch.equal(first.plain_routes_TLK, snapshot[1])
    assert torch.equal(first.sample_ids, snapshot[2])
    # And the table is right: sample b's real tokens, [S, B] order undone.
    routes_SB = first_routes.view(4, 3, 2, 2)
    for b in range(3):
        rows = first.rows_for([100 + b])
        assert torch.equal(first.routes_TLK[rows].long(), routes_SB[: 4 - b % 2, b])


def _gather_against_packed_reference(num_experts, topk, num_layers, id_stride, padded):
    """In each rank: two forwards of interleaved (or consecutive) sample ids, right-padded or
    not, routes and plain routes; the table against ``RouteTable.from_samples`` of every rank's
    real tokens (brute force, no wire layout)."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shapes = [(3, 5), (2, 7)]  # (B, S) of each forward, the same on every rank
    routes, plains, ids, lengths = [], [], [], []
    reference = {}
    next_id = 0
    for forward, (batch, seq) in enumerate(shapes):
        forward_ids, forward_lengths = [], []
        for r in range(world):
            for b in range(batch):
                sid = next_id + (b * world + r if id_stride == "interleaved" else r * batch + b)
                length = (seq - (sid % 3)) if padded else seq
                if r == rank:
                    forward_ids.append(sid)
                    forward_lengths.append(length)
                seed = 1000 * forward + 10 * r
                all_SBLK = _routes(seq * batch, num_layers, topk, num_experts, seed)
                all_SBLK = all_SBLK.view(seq, batch, num_layers, topk)
                plain_SBLK = _routes(seq * batch, num_layers, topk, num_experts, seed + 1)
                plain_SBLK = plain_SBLK.view(seq, batch, num_layers, topk)
                reference[sid] = (all_SBLK[:length, b], plain_SBLK[:length, b])
                if r == rank and b == batch - 1:
                    routes.append(all_SBLK.reshape(seq * batch, num_layers, topk))
                    plains.append(plain_SBLK.reshape(seq * batch, num_layers, topk))
        next_id += world * batch
        ids.append(forward_ids)
        lengths.append(forward_lengths)
    table = gather_route_table(
        routes, ids, layer_numbers=list(range(1, num_layers + 1)), num_experts=num_experts,
        topk=topk, plain_routes_per_forward=plains, lengths_per_forward=lengths,
    )  # fmt: skip
    order = sorted(reference)
    expected = RouteTable.from_samples(
        [reference[s][0] for s in order], sample_ids=order,
        layer_numbers=list(range(1, num_layers + 1)), num_experts=num_experts, topk=topk,
        plain_per_sample=[reference[s][1] for s in order],
    )  # fmt: skip
    same = [
        torch.equal(table.routes_TLK, expected.routes_TLK),
        torch.equal(table.plain_routes_TLK, expected.plain_routes_TLK),
        torch.equal(table.cu_seqlens, expected.cu_seqlens),
        torch.equal(table.sample_ids, expected.sample_ids),
        table.routes_TLK.dtype == route_dtype(num_experts),
    ]
    return same


@pytest.mark.parametrize(
    "num_experts, topk, num_layers, id_stride, padded",
    [
        (8, 2, 3, "interleaved", True),  # uint8, rows padded to 8 bytes, one run per sample
        (8, 2, 4, "consecutive", False),  # uint8, 8-byte rows, runs merge to one per rank
        (300, 3, 2, "interleaved", False),  # int16 routes
        (300, 4, 1, "consecutive", True),
    ],
)
@pytest.mark.parametrize("world", [1, 2])
def test_table_equals_the_packed_samples_of_every_rank(
    num_experts, topk, num_layers, id_stride, padded, world
):
    results = run_distributed(
        _gather_against_packed_reference, world, num_experts, topk, num_layers, id_stride, padded
    )
    for rank, same in enumerate(results):
        assert all(same), f"rank {rank}: routes, plain, cu_seqlens, ids, dtype equal = {same}"
