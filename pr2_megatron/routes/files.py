"""Route-table files: safetensors with a SHA-256 over metadata and tensors; never pickle.

Legend: T tokens, L MoE layers, K top-k.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pr2_megatron.errors import RouteError
from pr2_megatron.routes.table import RouteTable

__all__ = ["load_route_table", "save_route_table"]

#: Value of the ``format`` metadata key in saved files.
FILE_FORMAT = "pr2_megatron.route_table"
#: Version of the on-disk layout; bumped on incompatible changes. Version 2 names the
#: plain-replay routes ``plain_routes_TLK`` (version 1: ``old_routes_TLK``, still read).
FORMAT_VERSION = 2
_READABLE_VERSIONS = ("1", "2")
#: Tensor names of version-1 files, mapped to today's on reading.
_LEGACY_TENSOR_NAMES = {"old_routes_TLK": "plain_routes_TLK"}

_TENSOR_KEYS = ("routes_TLK", "cu_seqlens", "sample_ids")
_OPTIONAL_TENSOR_KEYS = ("plain_routes_TLK", *_LEGACY_TENSOR_NAMES)
#: Metadata key of the SHA-256 over metadata and tensors.
_CHECKSUM_KEY = "sha256"
_METADATA_KEYS = ("format", "format_version", "layer_numbers", "num_experts", "topk")


def save_route_table(table: RouteTable, path: str | os.PathLike) -> None:
    """Write the table to a safetensors file (written to a temp file, then renamed)."""
    table._validate_layout()
    tensors = {
        "routes_TLK": table.routes_TLK.detach().cpu().contiguous(),
        "cu_seqlens": table.cu_seqlens.detach().cpu().contiguous(),
        "sample_ids": table.sample_ids.detach().cpu().contiguous(),
    }
    if table.plain_routes_TLK is not None:
        plain = table.plain_routes_TLK.detach().cpu().contiguous()
        if plain.untyped_storage().data_ptr() == tensors["routes_TLK"].untyped_storage().data_ptr():
            plain = plain.clone()  # safetensors refuses tensors that share storage
        tensors["plain_routes_TLK"] = plain
    metadata = {
        "format": FILE_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "layer_numbers": json.dumps(list(table.layer_numbers)),
        "num_experts": str(table.num_experts),
        "topk": str(table.topk),
    }
    metadata[_CHECKSUM_KEY] = _checksum(metadata, tensors)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_route_table(path: str | os.PathLike, *, unchecked: bool = False) -> RouteTable:
    """Read and validate a table written by :func:`save_route_table`.

    Raises :class:`~pr2_megatron.errors.RouteError` naming the path for a file that is not a
    readable safetensors route table: truncated, corrupt, pickle, missing or unknown keys, wrong
    format version, invalid routes, contents that do not match the SHA-256 written at save, or
    no SHA-256 at all. ``unchecked=True`` (asked for by name) loads a file without a SHA-256,
    e.g. one written by another tool; its routes are still validated. Never unpickles.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"route table file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = set(f.keys())
            missing = [k for k in _TENSOR_KEYS if k not in keys]
            unknown = sorted(keys - set(_TENSOR_KEYS) - set(_OPTIONAL_TENSOR_KEYS))
            if missing or unknown:
                raise RouteError(
                    f"{path}: not a route table file: missing tensors {missing}, "
                    f"unexpected tensors {unknown}"
                )
            tensors = {_LEGACY_TENSOR_NAMES.get(k, k): f.get_tensor(k) for k in keys}
    except SafetensorError as e:
        raise RouteError(f"{path}: not a readable safetensors file ({e})") from e

    missing = [k for k in _METADATA_KEYS if k not in metadata]
    if missing:
        raise RouteError(f"{path}: not a route table file: missing metadata {missing}")
    unknown = sorted(set(metadata) - set(_METADATA_KEYS) - {_CHECKSUM_KEY})
    if unknown:
        raise RouteError(
            f"{path}: unknown metadata key {unknown[0]!r} (a route table file holds "
            f"{list(_METADATA_KEYS) + [_CHECKSUM_KEY]})"
        )
    if _CHECKSUM_KEY not in metadata:
        if not unchecked:
            # A flipped bit in the key's name must not turn the check off.
            raise RouteError(
                f"{path}: route table file without its SHA-256 ({_CHECKSUM_KEY!r} metadata); "
                "pass unchecked=True to load a file without a checksum"
            )
    elif metadata[_CHECKSUM_KEY] != _checksum(metadata, _stored_names(tensors, metadata)):
        # safetensors has no checksum: a flipped bit in an id or a layer number would load.
        raise RouteError(
            f"{path}: corrupt route table file (contents do not match the SHA-256 written at save)"
        )
    if metadata["format"] != FILE_FORMAT:
        raise RouteError(f"{path}: format is {metadata['format']!r}, expected {FILE_FORMAT!r}")
    if metadata["format_version"] not in _READABLE_VERSIONS:
        raise RouteError(
            f"{path}: format version {metadata['format_version']!r} is not supported "
            f"(this reader supports {', '.join(_READABLE_VERSIONS)})"
        )
    try:
        layer_numbers = json.loads(metadata["layer_numbers"])
        num_experts = int(metadata["num_experts"])
        topk = int(metadata["topk"])
        if not isinstance(layer_numbers, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in layer_numbers
        ):
            raise RouteError(f"layer_numbers is not a list of ints: {layer_numbers!r}")
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise RouteError(f"{path}: bad route table metadata: {e}") from e

    table = RouteTable(
        routes_TLK=tensors["routes_TLK"],
        cu_seqlens=tensors["cu_seqlens"],
        sample_ids=tensors["sample_ids"],
        layer_numbers=tuple(layer_numbers),
        num_experts=num_experts,
        topk=topk,
        plain_routes_TLK=tensors.get("plain_routes_TLK"),
    )
    try:
        table.validate()
    except ValueError as e:
        raise RouteError(f"{path}: invalid route table: {e}") from e
    return table


def _stored_names(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    """The tensors under the names the file stored them with (version 1: legacy names)."""
    if metadata.get("format_version") != "1":
        return tensors
    legacy = {new: old for old, new in _LEGACY_TENSOR_NAMES.items()}
    return {legacy.get(name, name): tensor for name, tensor in tensors.items()}


def _checksum(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the metadata (less the checksum) and every tensor's dtype, shape and bytes."""
    digest = hashlib.sha256()
    meta = {k: v for k, v in metadata.items() if k != _CHECKSUM_KEY}
    digest.update(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"|{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
