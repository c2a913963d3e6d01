"""Fuzzing (hypothesis) of the two inputs a user hands over: route tables and configs.

* Route tables built field by field with random shapes, dtypes and values: ``validate`` either
  accepts (and then save/load round-trips bit for bit) or raises ``ValueError`` -- never another
  exception type. Every corruption of a valid table is rejected with ``ValueError``; a corrupted
  file either fails to load with ``ValueError`` or loads the very same table (a flipped bit never
  comes back as a silently different route).
* Configs from random nested dicts, YAML files and ``key=value`` overrides: either load or raise
  ``ConfigError`` -- never ``TypeError`` / ``KeyError`` / ``AttributeError`` / ``ZeroDivisionError``
  -- and whatever loads dumps to YAML and loads back equal.
"""

import dataclasses
import math
import tempfile
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pr2_megatron.rl.config import ConfigError, TrainConfig, dump_yaml, from_dict, load_config
from pr2_megatron.routes.table import RouteTable, route_dtype

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))


# ------------------------------------------------------------------------------ route tables
def _distinct_routes(gen, num_tokens, num_layers, topk, num_experts):
    base = torch.randint(0, num_experts - topk + 1, (num_tokens, num_layers, topk), generator=gen)
    ids = base.sort(dim=-1).values + torch.arange(topk)
    return ids.gather(-1, torch.rand(ids.shape, generator=gen).argsort(dim=-1))


@st.composite
def valid_tables(draw):
    num_experts = draw(st.sampled_from([1, 2, 3, 8, 255, 256, 257, 1000, 32767, 32768, 70_000]))
    topk = draw(st.integers(1, min(num_experts, 5)))
    num_layers = draw(st.integers(0, 4))
    start = draw(st.integers(1, 5))
    gaps = draw(st.lists(st.integers(1, 4), min_size=num_layers, max_size=num_layers))
    layers = tuple(start + sum(gaps[:i]) for i in range(num_layers))
    lengths = draw(st.lists(st.integers(0, 6), max_size=5))
    ids = draw(
        st.lists(st.integers(-(2**40), 2**40), min_size=len(lengths), max_size=len(lengths)).filter(
            lambda x: len(set(x)) == len(x)
        )
    )
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    num_tokens = sum(lengths)
    routes = _distinct_routes(gen, num_tokens, num_layers, topk, num_experts)
    old = _distinct_routes(gen, num_tokens, num_layers, topk, num_experts)
    dtype = route_dtype(num_experts)
    return RouteTable(
        routes_TLK=routes.to(dtype),
        cu_seqlens=torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int64),
        sample_ids=torch.tensor(ids, dtype=torch.int64),
        layer_numbers=layers,
        num_experts=num_experts,
        topk=topk,
        plain_routes_TLK=old.to(dtype) if draw(st.booleans()) else None,
    )


_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float32]
_DTYPES += [torch.bool, torch.uint16]


def _anything():
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-3, 300),
        st.floats(allow_nan=True),
        st.text(max_size=3),
        st.lists(st.integers(-2, 9), max_size=4),
    )


@st.composite
def random_tensors(draw, max_dim=4):
    shape = draw(st.lists(st.integers(0, 4), min_size=1, max_size=max_dim))
    dtype = draw(st.sampled_from(_DTYPES))
    values = torch.tensor(
        draw(
            st.lists(
                st.integers(-3, 300),
                min_size=int(np.prod(shape)),
                max_size=int(np.prod(shape)),
            )
        ),
        dtype=torch.int64,
    ).reshape(shape)
    if dtype == torch.bool:
        return values > 0
    if dtype == torch.uint8:
        return values.clamp(0, 255).to(dtype)
    if dtype == torch.int8:
        return values.clamp(-128, 127).to(dtype)
    if dtype == torch.uint16:
        return values.clamp(min=0).to(torch.int32).to(torch.uint16)
    return values.to(dtype)


@FUZZ
@given(data=st.data())
def test_random_fields_are_accepted_or_rejected_with_value_error(data):
    base = data.draw(valid_tables())
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(RouteTable)}
    for name in data.draw(st.sets(st.sampled_from(sorted(fields)), min_size=1)):
        if name in ("routes_TLK", "plain_routes_TLK", "cu_seqlens", "sample_ids"):
            value = data.draw(st.one_of(random_tensors(), _anything()))
        elif name == "layer_numbers":
            value = data.draw(
                st.one_of(st.lists(st.integers(-1, 8), max_size=4).map(tuple), _anything())
            )
        else:
            value = data.draw(st.one_of(st.integers(-2, 70_000), _anything()))
        if name == "plain_routes_TLK" and value is not None and data.draw(st.booleans()):
            value = fields["routes_TLK"]  # same storage: save must still work
        fields[name] = value
    table = RouteTable(**fields)
    try:
        table.validate()
    except ValueError:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.safetensors"
        table.save(path)
        assert RouteTable.load(path).equal(table)


def _corruptions(table):
    """(name, change) pairs, each of which makes ``table`` invalid."""
    out = []
    dtype = table.routes_TLK.dtype
    out.append(("routes as int64", dict(routes_TLK=table.routes_TLK.long())))
    if dtype != torch.int32:
        out.append(("routes as int32", dict(routes_TLK=table.routes_TLK.to(torch.int32))))
    out.append(("routes as float", dict(routes_TLK=table.routes_TLK.float())))
    flat = table.routes_TLK.reshape(table.num_tokens, table.num_layers * table.topk)
    out.append(("routes 2-D", dict(routes_TLK=flat)))
    out.append(("routes one more k", dict(topk=table.topk + 1)))
    out.append(("layer numbers 0-based", dict(layer_numbers=(0, *table.layer_numbers))))
    if len(table.layer_numbers) >= 2:
        layers = table.layer_numbers
        out.append(("layers decreasing", dict(layer_numbers=(layers[1], layers[0], *layers[2:]))))
    out.append(("a missing layer", dict(layer_numbers=table.layer_numbers + (10_000,))))
    out.append(("cu_seqlens int32", dict(cu_seqlens=table.cu_seqlens.int())))
    out.append(("cu_seqlens start", dict(cu_seqlens=table.cu_seqlens + 1)))
    longer = table.cu_seqlens.clone()
    longer[-1] += 1
    out.append(("one token more", dict(cu_seqlens=longer)))
    more_ids = torch.cat([table.sample_ids, torch.tensor([2**41])])
    out.append(("one sample id more", dict(sample_ids=more_ids)))
    if table.num_samples >= 2:
        repeat = table.sample_ids.clone()
        repeat[1] = repeat[0]
        out.append(("repeated sample id", dict(sample_ids=repeat)))
    out.append(("num_experts 0", dict(num_experts=0)))
    out.append(("topk 0", dict(topk=0)))
    out.append(("topk > E", dict(topk=table.num_experts + 1)))
    if table.num_tokens and table.num_layers:
        for name in ("routes_TLK", "plain_routes_TLK"):
            routes = getattr(table, name)
            if routes is None:
                continue
            if table.num_experts < torch.iinfo(dtype).max:
                bad = routes.clone()
                bad[-1, -1, -1] = table.num_experts  # one past the last expert
                out.append((f"{name} id == E", {name: bad}))
            if table.topk >= 2:
                bad = routes.clone()
                bad[0, 0, 1] = bad[0, 0, 0]
                out.append((f"{name} duplicate", {name: bad}))
            if dtype != torch.uint8:
                bad = routes.clone()
                bad[0, -1, 0] = -1
                out.append((f"{name} negative", {name: bad}))
    if table.plain_routes_TLK is not None and table.num_tokens:
        out.append(("old routes shorter", dict(plain_routes_TLK=table.plain_routes_TLK[:-1])))
    return out


@FUZZ
@given(table=valid_tables(), data=st.data())
def test_every_corruption_of_a_valid_table_is_a_value_error(table, data):
    table.validate()
    name, change = data.draw(st.sampled_from(_corruptions(table)))
    fields = {f.name: getattr(table, f.name) for f in dataclasses.fields(RouteTable)}
    fields.update(change)
    with pytest.raises(ValueError):
        RouteTable(**fields).validate()


@FUZZ
@given(table=valid_tables(), data=st.data())
def test_corrupted_file_fails_with_value_error_or_loads_the_same_table(table, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.safetensors"
        table.save(path)
        raw = bytearray(path.read_bytes())
        # safetensors: 8-byte header length, JSON header (metadata), then the tensor bytes.
        data_start = 8 + int.from_bytes(raw[:8], "little")
        kinds = ["flip", "truncate", "splice"] + (["flip data"] if data_start < len(raw) else [])
        kind = data.draw(st.sampled_from(kinds))
        if kind.startswith("flip"):
            low = data_start if kind == "flip data" else 0
            for _ in range(data.draw(st.integers(1, 3))):
                at = data.draw(st.integers(low, len(raw) - 1))
                raw[at] ^= data.draw(st.integers(1, 255))
        elif kind == "truncate":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        else:
            at = data.draw(st.integers(0, len(raw)))
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        path.write_bytes(bytes(raw))
        try:
            loaded = RouteTable.load(path)
        except ValueError as error:
            assert str(path) in str(error)
            return
        assert loaded.equal(table), "a corrupted file loaded as a different route table"


@pytest.mark.parametrize("num_experts", [256, 300])
def test_every_single_bit_flip_and_truncation_of_a_saved_table_is_caught(tmp_path, num_experts):
    """Exhaustive: each of the file's bits flipped, and each truncation. Every id of a uint8
    table with E=256 is valid, so only a checksum can tell a flipped route from a real one."""
    gen = torch.Generator().manual_seed(0)
    per_sample = [_distinct_routes(gen, n, 3, 2, num_experts) for n in (3, 4)]
    table = RouteTable.from_samples(
        per_sample, sample_ids=[7, 9], layer_numbers=(2, 3, 5), num_experts=num_experts, topk=2
    )
    path = tmp_path / "t.safetensors"
    table.save(path)
    clean = path.read_bytes()
    silent = []
    variants = [
        (
            f"byte {at} ^ {1 << bit:#04x}",
            clean[:at] + bytes([clean[at] ^ (1 << bit)]) + clean[at + 1 :],
        )
        for at in range(len(clean))
        for bit in range(8)
    ] + [(f"first {n} bytes", clean[:n]) for n in range(len(clean))]
    for what, raw in variants:
        path.write_bytes(raw)
        try:
            loaded = RouteTable.load(path)
        except ValueError:
            continue
        if not loaded.equal(table):
            silent.append(what)
    assert not silent, f"{len(silent)} corruptions loaded as a different table: {silent[:8]}"


def test_renaming_the_checksum_key_and_editing_an_id_is_caught(tmp_path):
    """A two-byte edit: one bit of the metadata key "sha256" and one expert id."""
    gen = torch.Generator().manual_seed(0)
    table = RouteTable.from_samples(
        [_distinct_routes(gen, 4, 2, 2, 8)], sample_ids=[0], layer_numbers=(1, 2), num_experts=8,
        topk=2,
    )  # fmt: skip
    path = tmp_path / "t.safetensors"
    table.save(path)
    raw = bytearray(path.read_bytes())
    key = raw.index(b'"sha256"') + 1
    raw[key] ^= 0x01  # "sha256" -> "rha256": without the check, the checksum would be "absent"
    data_start = 8 + int.from_bytes(raw[:8], "little")
    first_id = raw[data_start]  # routes_TLK is stored first (names sorted)
    raw[data_start] = (
        (first_id + 1) % 8 if raw[data_start + 1] != (first_id + 1) % 8 else (first_id + 2) % 8
    )
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="unknown metadata key 'rha256'"):
        RouteTable.load(path)
    with pytest.raises(ValueError, match="unknown metadata key"):
        RouteTable.load(path, unchecked=True)  # unknown keys are rejected even then


def test_a_file_without_its_checksum_loads_only_when_asked_by_name(tmp_path):
    from safetensors.torch import save_file

    from pr2_megatron.routes.files import FILE_FORMAT, FORMAT_VERSION

    gen = torch.Generator().manual_seed(0)
    table = RouteTable.from_samples(
        [_distinct_routes(gen, 4, 2, 2, 8)], sample_ids=[3], layer_numbers=(1, 2), num_experts=8,
        topk=2,
    )  # fmt: skip
    path = tmp_path / "other_tool.safetensors"
    tensors = {"routes_TLK": table.routes_TLK, "cu_seqlens": table.cu_seqlens,
               "sample_ids": table.sample_ids}  # fmt: skip
    metadata = {"format": FILE_FORMAT, "format_version": str(FORMAT_VERSION),
                "layer_numbers": "[1, 2]", "num_experts": "8", "topk": "2"}  # fmt: skip
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="without its SHA-256.*unchecked=True"):
        RouteTable.load(path)
    assert RouteTable.load(path, unchecked=True).equal(table)


# ------------------------------------------------------------------------------------- config
def _schema(cls=TrainConfig, prefix=""):
    """(dotted key, type hint) of every leaf field of the config."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += _schema(hint, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", hint))
    return out


SCHEMA = _schema()
SECTIONS = sorted({key.rsplit(".", 1)[0] for key, _ in SCHEMA if "." in key})


def _plausible(hint):
    """Values of the right type (often), so that validation past the type check is fuzzed."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin is typing.Union:
        return st.one_of([_plausible(a) for a in args if a is not type(None)] + [st.none()])
    if origin is list:
        return st.lists(_plausible(args[0]), max_size=4)
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.one_of(st.integers(-2, 8), st.integers(), st.just(2**70))
    if hint is float:
        return st.one_of(st.floats(-2, 2), st.floats(), st.just(10**400), st.just("1e-3"))
    if hint is str:
        return st.text(max_size=6)
    return st.none()


_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=6),
    st.lists(st.integers(-1, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@st.composite
def config_dicts(draw):
    data: dict = {}
    for key, hint in draw(st.lists(st.sampled_from(SCHEMA), max_size=6)):
        value = draw(st.one_of(_plausible(hint), _JUNK))
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    if draw(st.booleans()):  # an unknown key, a section replaced by a scalar, a non-str key
        where = draw(st.sampled_from(["top", *SECTIONS]))
        node = data if where == "top" else data.setdefault(where.split(".")[0], {})
        if isinstance(node, dict):
            node[draw(st.one_of(st.text(max_size=5), st.integers(), st.none()))] = draw(_JUNK)
    return data


def _loads_or_config_error(load):
    try:
        cfg = load()
    except ConfigError:
        return None
    assert isinstance(cfg, TrainConfig)
    assert load_config_from_text(dump_yaml(cfg)) == cfg  # what loads, round-trips
    return cfg


def load_config_from_text(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(text)
        return load_config(path)


@FUZZ
@given(data=config_dicts())
def test_random_config_dicts_load_or_raise_config_error(data):
    _loads_or_config_error(lambda: from_dict(TrainConfig, data, source="<fuzz>"))


@FUZZ
@given(data=config_dicts())
def test_random_yaml_files_load_or_raise_config_error(data):
    try:
        text = yaml.safe_dump(data)
    except yaml.YAMLError:
        assume(False)
    _loads_or_config_error(lambda: load_config_from_text(text))


@FUZZ
@given(
    overrides=st.lists(
        st.one_of(
            st.tuples(st.sampled_from([k for k, _ in SCHEMA] + SECTIONS), _JUNK).map(
                lambda kv: f"{kv[0]}={yaml.safe_dump(kv[1], default_flow_style=True).strip()}"
            ),
            st.tuples(st.sampled_from([k for k, _ in SCHEMA]), st.text(max_size=8)).map(
                lambda kv: f"{kv[0]}={kv[1]}"
            ),
            st.text(max_size=12),
        ),
        max_size=4,
    )
)
def test_random_overrides_load_or_raise_config_error(overrides):
    _loads_or_config_error(lambda: load_config(None, overrides))


def test_regressions_found_by_the_fuzzer():
    # An int too large for a float raised OverflowError; NaN loaded (and broke the round trip),
    # also through an Optional[float]; a zero size in a divisibility check was a ZeroDivisionError.
    for override, pattern in [
        (f"optim.lr={10**400}", r"optim.lr = 1000.* is not a valid float"),
        ("model.topk_scaling_factor=.nan", r"model.topk_scaling_factor = nan is not a valid"),
        ("model.num_attention_heads=0", "invalid values in model: integer modulo by zero"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            load_config(None, [override])
    assert math.isclose(load_config(None, ["optim.lr=1e-3"]).optim.lr, 1e-3)
