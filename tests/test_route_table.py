"""Tests for pr2_megatron.routes.table: packing, lookup, validation, I/O, engine ingest."""

import pickle
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from pr2_megatron.routes.engine import from_engine_routed_experts
from pr2_megatron.routes.files import FILE_FORMAT, FORMAT_VERSION, _checksum
from pr2_megatron.routes.table import RouteTable, route_dtype

LAYERS = (2, 4, 6)


def distinct_routes(num_tokens, num_layers, topk, num_experts, gen):
    """Random [T, L, K] int64 routes with k distinct ids in [0, E) per row."""
    # Sorted draws from [0, E-K] plus 0..K-1 are strictly increasing, hence distinct; then
    # shuffle the k columns of every row so ids are not sorted.
    base = torch.randint(0, num_experts - topk + 1, (num_tokens, num_layers, topk), generator=gen)
    ids = base.sort(dim=-1).values + torch.arange(topk)
    perm = torch.rand(ids.shape, generator=gen).argsort(dim=-1)
    return ids.gather(-1, perm)


def make_samples(lengths, num_experts=64, topk=2, layers=LAYERS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [distinct_routes(n, len(layers), topk, num_experts, gen) for n in lengths]


def make_table(
    lengths=(3, 0, 5, 2), sample_ids=(10, 3, 7, 42), num_experts=64, topk=2, plain=False
):
    per_sample = make_samples(lengths, num_experts, topk)
    plain_per_sample = make_samples(lengths, num_experts, topk, seed=1) if plain else None
    table = RouteTable.from_samples(
        per_sample,
        sample_ids=list(sample_ids),
        layer_numbers=LAYERS,
        num_experts=num_experts,
        topk=topk,
        plain_per_sample=plain_per_sample,
    )
    return table, per_sample, plain_per_sample


# ------------------------------------------------------------------------------------------
# dtype
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_experts, dtype",
    [
        (1, torch.uint8),
        (256, torch.uint8),
        (257, torch.int16),
        (32767, torch.int16),
        (32768, torch.int16),  # ids 0..32767 fit int16
        (32769, torch.int32),
        (2**31 - 1, torch.int32),
    ],
)
def test_route_dtype_boundaries(num_experts, dtype):
    assert route_dtype(num_experts) == dtype


@pytest.mark.parametrize("bad", [0, -3])
def test_route_dtype_rejects_nonpositive(bad):
    with pytest.raises(ValueError, match=f"num_experts must be >= 1, got {bad}"):
        route_dtype(bad)


def test_int16_keeps_high_ids_without_wrapping():
    per_sample = [torch.tensor([[[299, 0]], [[298, 1]]])]
    table = RouteTable.from_samples(
        per_sample, sample_ids=[0], layer_numbers=(1,), num_experts=300, topk=2
    )
    assert table.routes_TLK.dtype == torch.int16
    assert table.routes_TLK[0, 0, 0].item() == 299
    assert torch.equal(table.routes_TLK.long(), per_sample[0])


@pytest.mark.parametrize("num_experts, bad_id", [(256, 256), (300, 300), (300, 65536 + 5)])
def test_out_of_range_input_is_reported_not_wrapped(num_experts, bad_id):
    # Cast to uint8/int16, these ids would wrap to valid-looking small ids.
    per_sample = [torch.tensor([[[0, 1]], [[bad_id, 2]]])]
    with pytest.raises(ValueError, match=f"sample id 5, token 1, MoE layer 9: expert id {bad_id}"):
        RouteTable.from_samples(
            per_sample, sample_ids=[5], layer_numbers=(9,), num_experts=num_experts, topk=2
        )


@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_narrow_input_dtypes_with_wide_expert_range(in_dtype):
    # E - 1 = 299 does not fit the input dtype: comparing against it must not wrap.
    per_sample = [torch.tensor([[[120, 1]], [[100, 0]]], dtype=in_dtype)]
    table = RouteTable.from_samples(
        per_sample, sample_ids=[0], layer_numbers=(1,), num_experts=300, topk=2
    )
    assert table.routes_TLK.tolist() == [[[120, 1]], [[100, 0]]]


def test_uint8_full_range_is_valid():
    per_sample = [torch.tensor([[[255, 0]]])]
    table = RouteTable.from_samples(
        per_sample, sample_ids=[0], layer_numbers=(1,), num_experts=256, topk=2
    )
    assert table.routes_TLK.dtype == torch.uint8
    assert table.routes_TLK[0, 0, 0].item() == 255


# ------------------------------------------------------------------------------------------
# Packing and lookup
# ------------------------------------------------------------------------------------------


def test_pack_layout_and_properties():
    table, per_sample, _ = make_table()
    assert table.num_tokens == 10
    assert table.num_samples == 4
    assert table.num_layers == 3
    assert table.cu_seqlens.tolist() == [0, 3, 3, 8, 10]
    assert table.sample_ids.tolist() == [10, 3, 7, 42]
    assert table.routes_TLK.dtype == torch.uint8
    assert table.nbytes == 10 * 3 * 2
    for i, expected in enumerate(per_sample):
        assert torch.equal(table.routes_TLK[table.sample_slice(i)].long(), expected)
    assert table.sample_slice(-1) == slice(8, 10)
    with pytest.raises(IndexError):
        table.sample_slice(4)


def test_nbytes_counts_old_routes_and_dtype_width():
    table, _, _ = make_table(num_experts=300, plain=True)
    assert table.routes_TLK.dtype == torch.int16
    assert table.nbytes == 2 * (10 * 3 * 2 * 2)


def test_select_samples_reorders_exactly():
    table, per_sample, plain_per_sample = make_table(plain=True)
    by_id = dict(zip([10, 3, 7, 42], zip(per_sample, plain_per_sample)))
    order = [42, 3, 10]
    sub = table.select_samples(order)
    sub.validate()
    assert sub.sample_ids.tolist() == order
    assert sub.cu_seqlens.tolist() == [0, 2, 2, 5]
    for i, sid in enumerate(order):
        assert torch.equal(sub.routes_TLK[sub.sample_slice(i)].long(), by_id[sid][0])
        assert torch.equal(sub.plain_routes_TLK[sub.sample_slice(i)].long(), by_id[sid][1])
    # Selecting back restores the original table bit for bit.
    assert sub.select_samples([42, 10]).equal(table.select_samples([42, 10]))
    assert table.select_samples([10, 3, 7, 42]).equal(table)


def test_rows_for():
    table, _, _ = make_table()  # rows: 10 -> 0..2, 3 -> none, 7 -> 3..7, 42 -> 8..9
    assert table.rows_for([42, 10]).tolist() == [8, 9, 0, 1, 2]
    assert table.rows_for([3]).tolist() == []
    assert table.rows_for(torch.tensor([7])).tolist() == [3, 4, 5, 6, 7]
    assert table.rows_for([]).dtype == torch.int64
    with pytest.raises(ValueError, match="unknown sample id 99"):
        table.rows_for([10, 99])


def test_select_samples_rejects_repeats_and_unknown_ids():
    table, _, _ = make_table()
    with pytest.raises(ValueError, match="sample id 10 requested more than once"):
        table.select_samples([10, 10])
    with pytest.raises(ValueError, match="unknown sample id 5"):
        table.select_samples([5])


def test_layer_index_and_select_layers():
    table, per_sample, plain_per_sample = make_table(plain=True)
    assert table.layer_index(4) == 1
    with pytest.raises(ValueError, match=re.escape("layer 3 is not covered") + r".*\[2, 4, 6\]"):
        table.layer_index(3)
    sub = table.select_layers([2, 6])
    sub.validate()
    assert sub.layer_numbers == (2, 6)
    assert torch.equal(sub.routes_TLK, table.routes_TLK[:, [0, 2]])
    assert torch.equal(sub.plain_routes_TLK, table.plain_routes_TLK[:, [0, 2]])
    with pytest.raises(ValueError, match="strictly increasing"):
        table.select_layers([6, 2])
    with pytest.raises(ValueError, match="layer 5 is not covered"):
        table.select_layers([5])


def test_check_tokens():
    table, _, _ = make_table()
    table.check_tokens([42, 10, 3], [2, 3, 0])
    with pytest.raises(
        ValueError, match="sample id 7: micro-batch has 6 tokens, route table has 5"
    ):
        table.check_tokens([10, 7], [3, 6])
    with pytest.raises(ValueError, match="unknown sample id 8"):
        table.check_tokens([8], [1])
    with pytest.raises(ValueError, match="2 sample ids but 1 token counts"):
        table.check_tokens([10, 7], [3])


def test_concat():
    a, _, _ = make_table(lengths=(3, 1), sample_ids=(0, 1))
    b, _, _ = make_table(lengths=(2,), sample_ids=(5,))
    joined = RouteTable.concat([a, b])
    assert joined.sample_ids.tolist() == [0, 1, 5]
    assert joined.cu_seqlens.tolist() == [0, 3, 4, 6]
    assert joined.select_samples([5]).equal(b)
    assert joined.select_samples([0, 1]).equal(a)
    with pytest.raises(ValueError, match="duplicate sample id 1 .in table 0 and table 1"):
        RouteTable.concat([a, make_table(lengths=(2,), sample_ids=(1,))[0]])
    with pytest.raises(ValueError, match="layer_numbers"):
        RouteTable.concat([a, b.select_layers([2, 4])])
    with pytest.raises(ValueError, match="plain_routes_TLK"):
        RouteTable.concat([a, make_table(lengths=(2,), sample_ids=(5,), plain=True)[0]])
    with pytest.raises(ValueError, match="at least one"):
        RouteTable.concat([])


# ------------------------------------------------------------------------------------------
# Validation: every bad input names what and where
# ------------------------------------------------------------------------------------------


def _from(per_sample, **kw):
    args = dict(sample_ids=[10, 7], layer_numbers=LAYERS, num_experts=64, topk=2)
    args.update(kw)
    return RouteTable.from_samples(per_sample, **args)


def _two_samples():
    return make_samples((2, 3))


def test_rejects_out_of_range_id_naming_sample_layer_value():
    per_sample = _two_samples()
    per_sample[1][1, 2, 0] = 64
    with pytest.raises(ValueError, match="sample id 7, token 1, MoE layer 6: expert id 64 out of"):
        _from(per_sample)


def test_rejects_negative_id():
    per_sample = _two_samples()
    per_sample[0][0, 1, 1] = -1
    with pytest.raises(ValueError, match="sample id 10, token 0, MoE layer 4: expert id -1"):
        _from(per_sample)


def test_rejects_duplicate_ids_naming_sample_token_layer_id():
    per_sample = _two_samples()
    per_sample[1][2, 1] = torch.tensor([5, 5])
    with pytest.raises(
        ValueError, match=r"sample id 7, token 2 \(row 4\), MoE layer 4: duplicate expert id 5"
    ):
        _from(per_sample)


def test_rejects_duplicates_in_old_routes():
    old = _two_samples()
    old[0][1, 0] = torch.tensor([9, 9])
    with pytest.raises(
        ValueError,
        match="plain_routes_TLK: sample id 10, token 1.*MoE layer 2: duplicate expert id 9",
    ):
        _from(_two_samples(), plain_per_sample=old)


def test_rejects_wrong_sample_shape():
    per_sample = _two_samples()
    per_sample[1] = per_sample[1][:, :2]
    with pytest.raises(ValueError, match=r"sample id 7: shape \(3, 2, 2\), expected.*\[2, 4, 6\]"):
        _from(per_sample)
    per_sample = _two_samples()
    per_sample[0] = per_sample[0][:, :, :1]
    with pytest.raises(ValueError, match="sample id 10: shape"):
        _from(per_sample)


def test_rejects_non_integer_input():
    per_sample = _two_samples()
    per_sample[0] = per_sample[0].float()
    with pytest.raises(ValueError, match="sample id 10: expected an integer dtype"):
        _from(per_sample)


def test_rejects_sample_id_count_mismatch():
    with pytest.raises(ValueError, match="2 samples but 3 sample_ids"):
        _from(_two_samples(), sample_ids=[1, 2, 3])


def test_rejects_bad_layer_numbers_and_topk():
    with pytest.raises(ValueError, match="MoE layer 4 follows layer 6"):
        _from(_two_samples(), layer_numbers=(2, 6, 4))
    with pytest.raises(ValueError, match="ints >= 1"):
        _from(_two_samples(), layer_numbers=(0, 4, 6))
    per_sample = [torch.zeros(1, 3, 3, dtype=torch.long) + torch.arange(3)]
    with pytest.raises(ValueError, match="topk=3 exceeds num_experts=2"):
        _from(per_sample, sample_ids=[0], num_experts=2, topk=3)


def _valid_fields():
    table, _, _ = make_table()
    return dict(
        routes_TLK=table.routes_TLK,
        cu_seqlens=table.cu_seqlens,
        sample_ids=table.sample_ids,
        layer_numbers=table.layer_numbers,
        num_experts=table.num_experts,
        topk=table.topk,
    )


@pytest.mark.parametrize(
    "change, pattern",
    [
        (dict(cu_seqlens=torch.tensor([1, 3, 3, 8, 10])), "must start at 0"),
        (dict(cu_seqlens=torch.tensor([0, 3, 2, 8, 10])), "non-decreasing: sample id 3"),
        (dict(cu_seqlens=torch.tensor([0, 3, 3, 8, 9])), "ends at 9 but routes_TLK has T=10"),
        (dict(cu_seqlens=torch.tensor([0, 3, 3, 8, 10], dtype=torch.int32)), "int64"),
        (dict(sample_ids=torch.tensor([10, 3, 7])), "3 sample_ids for N=4"),
        (dict(sample_ids=torch.tensor([10, 3, 7, 3])), "sample id 3 occurs more than once"),
        (dict(num_experts=300), "dtype torch.uint8, expected torch.int16"),
        (dict(layer_numbers=(2, 4)), r"shape \(10, 3, 2\), expected .*\[2, 4\]"),
        (dict(topk=3), r"expected \(T, L, K\) = \(T, 3, 3\)"),
    ],
)
def test_validate_rejects_bad_layout(change, pattern):
    fields = _valid_fields()
    RouteTable(**fields).validate()
    fields.update(change)
    with pytest.raises(ValueError, match=pattern):
        RouteTable(**fields).validate()


def test_validate_rejects_bad_values_in_stored_table():
    fields = _valid_fields()
    routes = fields["routes_TLK"].clone()
    routes[9, 2, 1] = 200  # row 9 = sample id 42, token 1; column 2 = layer 6
    with pytest.raises(
        ValueError, match="sample id 42, token 1 .row 9., MoE layer 6: expert id 200"
    ):
        RouteTable(**{**fields, "routes_TLK": routes}).validate()
    routes = fields["routes_TLK"].clone()
    routes[3, 0] = torch.tensor([17, 17], dtype=torch.uint8)  # row 3 = sample id 7, token 0
    with pytest.raises(
        ValueError, match="sample id 7, token 0 .row 3., MoE layer 2: duplicate .* 17"
    ):
        RouteTable(**{**fields, "routes_TLK": routes}).validate()


def test_validate_is_vectorized():
    # A per-token Python loop over 400k (token, layer) rows takes seconds; vectorized checks, ms.
    num_tokens, num_layers, topk = 50_000, 8, 8
    t = torch.arange(num_tokens).view(-1, 1, 1)
    layer = torch.arange(num_layers).view(1, -1, 1)
    routes = (t + layer + 17 * torch.arange(topk)) % 256  # k distinct ids per row
    table = RouteTable(
        routes_TLK=routes.to(torch.uint8),
        cu_seqlens=torch.tensor([0, 20_000, num_tokens]),
        sample_ids=torch.tensor([0, 1]),
        layer_numbers=tuple(range(1, num_layers + 1)),
        num_experts=256,
        topk=topk,
    )
    start = time.perf_counter()
    table.validate()
    assert time.perf_counter() - start < 1.0
    table.routes_TLK[-1, -1, -1] = table.routes_TLK[-1, -1, 0]
    with pytest.raises(ValueError, match="sample id 1, token 29999 .row 49999., MoE layer 8"):
        table.validate()


# ------------------------------------------------------------------------------------------
# Save / load
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts", [256, 300, 40_000])
@pytest.mark.parametrize("plain", [False, True])
def test_save_load_bit_for_bit(tmp_path, num_experts, plain):
    table, _, _ = make_table(num_experts=num_experts, topk=4, plain=plain)
    # The largest id must survive the narrow dtype (255 / 299 / 39999).
    table.routes_TLK[0, 0] = torch.tensor([num_experts - 1, 0, 1, 2])
    table.validate()
    path = tmp_path / "routes.safetensors"
    table.save(path)
    loaded = RouteTable.load(path)
    assert loaded.routes_TLK.dtype == route_dtype(num_experts)
    assert loaded.equal(table)
    assert (loaded.plain_routes_TLK is None) == (not plain)
    assert loaded.layer_numbers == LAYERS
    assert [p.name for p in tmp_path.iterdir()] == ["routes.safetensors"]  # no temp leftovers


def test_save_load_empty_table(tmp_path):
    table = RouteTable.from_samples([], sample_ids=[], layer_numbers=(1, 2), num_experts=8, topk=2)
    table.save(tmp_path / "empty.safetensors")
    assert RouteTable.load(tmp_path / "empty.safetensors").equal(table)


class _CreatesMarker:
    """Unpickling this object creates a file: proof that a loader unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _assert_load_fails(path, pattern=""):
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + pattern):
        RouteTable.load(path)


def test_load_never_unpickles(tmp_path):
    marker = tmp_path / "unpickled.marker"
    payload = pickle.dumps({"routes_TLK": _CreatesMarker(str(marker)), "topk": 2})
    pickle.loads(payload)["routes_TLK"].close()  # the payload works when unpickled ...
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "pickle.safetensors"
    path.write_bytes(payload)
    _assert_load_fails(path, "not a readable safetensors file")
    assert not marker.exists()  # ... and the loader never unpickled it

    torch_path = tmp_path / "torch_save.safetensors"
    torch.save({"routes_TLK": _CreatesMarker(str(marker))}, torch_path)
    _assert_load_fails(torch_path, "not a readable safetensors file")
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0, 4, 9, 40, -1])
def test_load_rejects_truncated_file(tmp_path, keep):
    table, _, _ = make_table(plain=True)
    path = tmp_path / "routes.safetensors"
    table.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) + keep] if keep < 0 else data[:keep])
    _assert_load_fails(path, "not a readable safetensors file")


def test_load_rejects_random_bytes(tmp_path):
    path = tmp_path / "random.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    _assert_load_fails(path)


def _sealed(metadata, tensors):
    """``metadata`` with a correct SHA-256: the file's checks after the checksum's run."""
    if metadata is None:
        return None
    return {**metadata, "sha256": _checksum(metadata, tensors)}


def _metadata(**change):
    meta = {
        "format": FILE_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "layer_numbers": "[2, 4, 6]",
        "num_experts": "64",
        "topk": "2",
    }
    meta.update(change)
    return {k: v for k, v in meta.items() if v is not None}


@pytest.mark.parametrize(
    "drop_tensor, metadata, pattern",
    [
        ("routes_TLK", _metadata(), r"missing tensors \['routes_TLK'\]"),
        ("sample_ids", _metadata(), r"missing tensors \['sample_ids'\]"),
        (None, _metadata(topk=None), r"missing metadata \['topk'\]"),
        (None, None, "missing metadata"),
        (None, _metadata(format_version="99"), "format version '99' is not supported"),
        (None, _metadata(format="something_else"), "format is 'something_else'"),
        (None, _metadata(layer_numbers="[2, 4"), "bad route table metadata"),
        (None, _metadata(num_experts="300"), "invalid route table: routes_TLK has dtype"),
        (None, _metadata(num_experts="8"), "invalid route table: .*sample id 10.*expert id"),
    ],
)
def test_load_rejects_incomplete_or_inconsistent_files(tmp_path, drop_tensor, metadata, pattern):
    table, _, _ = make_table()
    table.routes_TLK[0, 0] = torch.tensor([40, 41], dtype=torch.uint8)
    tensors = {
        "routes_TLK": table.routes_TLK,
        "cu_seqlens": table.cu_seqlens,
        "sample_ids": table.sample_ids,
    }
    tensors.pop(drop_tensor, None)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=_sealed(metadata, tensors))
    _assert_load_fails(path, pattern)


def test_load_rejects_unexpected_tensor(tmp_path):
    table, _, _ = make_table()
    path = tmp_path / "extra.safetensors"
    tensors = {"routes_TLK": table.routes_TLK, "cu_seqlens": table.cu_seqlens}
    tensors.update(sample_ids=table.sample_ids, weights=torch.zeros(2))
    save_file(tensors, str(path), metadata=_metadata())
    _assert_load_fails(path, r"unexpected tensors \['weights'\]")


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        RouteTable.load(tmp_path / "nope.safetensors")


# ------------------------------------------------------------------------------------------
# Engine ingest (vLLM / SGLang routed_experts: all decoder layers, dense ones included)
# ------------------------------------------------------------------------------------------


def _engine_request(num_tokens, num_hidden_layers, topk, dense):
    # Entry [t, i, k] = 4 * i + k + (t % 2): the 0-based layer index is recoverable. Dense layers
    # hold garbage (out of range and duplicated) that must be ignored.
    t = torch.arange(num_tokens).view(-1, 1, 1)
    i = torch.arange(num_hidden_layers).view(1, -1, 1)
    k = torch.arange(topk).view(1, 1, -1)
    values = 4 * i + k + t % 2
    values[:, :dense] = 10_000
    return values


@pytest.mark.parametrize("as_numpy", [False, True])
def test_engine_ingest_maps_layer_numbers(as_numpy):
    per_request = [_engine_request(n, 6, 2, dense=2) for n in (3, 1)]
    if as_numpy:
        per_request = [r.numpy().astype(np.int64) for r in per_request]
    table = from_engine_routed_experts(
        per_request,
        moe_layer_numbers=[3, 4, 5, 6],
        num_experts=64,
        topk=2,
        num_hidden_layers=6,
        sample_ids=[8, 9],
    )
    assert table.layer_numbers == (3, 4, 5, 6)
    assert table.sample_ids.tolist() == [8, 9]
    for col, layer_number in enumerate(table.layer_numbers):
        t = torch.tensor([0, 1, 2, 0]).view(-1, 1)
        expected = 4 * (layer_number - 1) + torch.arange(2) + t % 2
        assert torch.equal(table.routes_TLK[:, col].long(), expected), layer_number


def test_engine_ingest_deepseek_v3_layout():
    per_request = [_engine_request(2, 61, 8, dense=3)]
    table = from_engine_routed_experts(
        per_request, moe_layer_numbers=range(4, 62), num_experts=256, topk=8, num_hidden_layers=61
    )
    assert table.layer_numbers == tuple(range(4, 62))
    assert table.sample_ids.tolist() == [0]
    assert table.routes_TLK[0, table.layer_index(4)].tolist() == list(range(12, 20))
    assert table.routes_TLK[1, table.layer_index(61)].tolist() == list(range(241, 249))


def test_engine_ingest_rejects_bad_inputs():
    good = _engine_request(2, 6, 2, dense=2)
    kw = dict(moe_layer_numbers=[3, 4, 5, 6], num_experts=64, topk=2, num_hidden_layers=6)
    with pytest.raises(ValueError, match=r"sample id 1: shape \(2, 5, 2\).*num_hidden_layers=6"):
        from_engine_routed_experts([good, good[:, :5]], **kw)
    with pytest.raises(ValueError, match="MoE layer number 7 is out of range 1..6"):
        from_engine_routed_experts([good], **{**kw, "moe_layer_numbers": [3, 7]})
    with pytest.raises(ValueError, match="MoE layer number 0 is out of range"):
        from_engine_routed_experts([good], **{**kw, "moe_layer_numbers": [0, 3]})
    # A dense layer listed as MoE exposes its garbage: caught, naming the layer.
    with pytest.raises(ValueError, match="sample id 0, token 0, MoE layer 2: expert id 10000"):
        from_engine_routed_experts([good], **{**kw, "moe_layer_numbers": [2, 3]})


# ------------------------------------------------------------------------------------------
# Property tests
# ------------------------------------------------------------------------------------------


@st.composite
def table_specs(draw):
    num_experts = draw(st.sampled_from([1, 2, 8, 255, 256, 257, 300, 32767, 32768, 40_000]))
    topk = draw(st.integers(1, min(num_experts, 4)))
    num_layers = draw(st.integers(1, 3))
    first = draw(st.integers(1, 4))
    gaps = draw(st.lists(st.integers(1, 3), min_size=num_layers - 1, max_size=num_layers - 1))
    layers = [first]
    for gap in gaps:
        layers.append(layers[-1] + gap)
    lengths = draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))
    sample_ids = draw(
        st.lists(st.integers(-5, 1000), min_size=len(lengths), max_size=len(lengths), unique=True)
    )
    seed = draw(st.integers(0, 2**31))
    gen = torch.Generator().manual_seed(seed)
    per_sample = [distinct_routes(n, num_layers, topk, num_experts, gen) for n in lengths]
    old = [distinct_routes(n, num_layers, topk, num_experts, gen) for n in lengths]
    with_old = draw(st.booleans())
    kwargs = dict(
        sample_ids=sample_ids,
        layer_numbers=tuple(layers),
        num_experts=num_experts,
        topk=topk,
        plain_per_sample=old if with_old else None,
    )
    return per_sample, kwargs


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=table_specs())
def test_property_valid_tables_round_trip(spec):
    per_sample, kwargs = spec
    table = RouteTable.from_samples(per_sample, **kwargs)
    assert table.routes_TLK.dtype == route_dtype(kwargs["num_experts"])
    ids = kwargs["sample_ids"]
    reordered = table.select_samples(ids[::-1])
    reordered.validate()
    for i, sid in enumerate(ids[::-1]):
        assert torch.equal(
            reordered.routes_TLK[reordered.sample_slice(i)].long(), per_sample[ids.index(sid)]
        )
    assert reordered.select_samples(ids).equal(table)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.safetensors"
        table.save(path)
        assert RouteTable.load(path).equal(table)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=table_specs(), data=st.data())
def test_property_injected_bad_id_is_detected(spec, data):
    per_sample, kwargs = spec
    candidates = [i for i, s in enumerate(per_sample) if s.shape[0] > 0]
    if not candidates:
        return
    num_experts, topk = kwargs["num_experts"], kwargs["topk"]
    i = data.draw(st.sampled_from(candidates))
    t = data.draw(st.integers(0, per_sample[i].shape[0] - 1))
    col = data.draw(st.integers(0, per_sample[i].shape[1] - 1))
    k = data.draw(st.integers(0, topk - 1))
    kind = data.draw(
        st.sampled_from(["duplicate", "out_of_range"] if topk > 1 else ["out_of_range"])
    )
    bad = [s.clone() for s in per_sample]
    if kind == "duplicate":
        other = (k + data.draw(st.integers(1, topk - 1))) % topk
        value = int(bad[i][t, col, other])
        bad[i][t, col, k] = value
        pattern = f"token {t} .row \\d+., MoE layer .*: duplicate expert id {value}"
    else:
        value = data.draw(st.sampled_from([-1, num_experts, num_experts + 256, 2**40]))
        bad[i][t, col, k] = value
        pattern = f"token {t}, MoE layer .*: expert id {value} out of range"
    sid = kwargs["sample_ids"][i]
    layer = kwargs["layer_numbers"][col]
    with pytest.raises(ValueError, match=f"sample id {sid}, " + pattern) as info:
        RouteTable.from_samples(bad, **kwargs)
    assert f"MoE layer {layer}" in str(info.value)
    if kind == "duplicate":
        # Also caught when the bad row is already stored in a table.
        table = RouteTable.from_samples(per_sample, **kwargs)
        row = int(table.cu_seqlens[i]) + t
        table.routes_TLK[row, col, k] = table.routes_TLK[row, col, other]
        with pytest.raises(ValueError, match=f"sample id {sid}, token {t} .row {row}.") as info:
            table.validate()
        assert f"MoE layer {layer}: duplicate" in str(info.value)
