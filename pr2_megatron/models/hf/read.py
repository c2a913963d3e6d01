"""Reading a Hugging Face checkpoint directory: ``config.json`` and lazily read tensors.

Only the safetensors headers are read up front; a tensor is read from disk when it is
accessed, so every rank of a large model reads just the tensors of its own shards (its
experts, its pipeline stage). Block-quantised FP8 weights (DeepSeek-V3's released checkpoint:
``float8_e4m3fn`` weights with a ``<name>_scale_inv`` of one float32 per 128 x 128 block) are
dequantised to float32 on access; their scale tensors are not listed as tensors of their own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Optional, Union

import torch

from pr2_megatron.models.hf.errors import ConversionError

__all__ = ["SafetensorsCheckpoint", "dequantize_fp8_blocks", "read_hf_checkpoint"]

SCALE_SUFFIX = "_scale_inv"
_FP8_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)
)


def dequantize_fp8_blocks(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str = "tensor"
) -> torch.Tensor:
    """``weight`` (FP8, ``[rows, cols]``) times its per-block scale, as float32.

    ``scale_inv[i, j]`` multiplies the block ``[i*br:(i+1)*br, j*bc:(j+1)*bc]`` (the last
    blocks may be partial), as in DeepSeek-V3's ``weight_dequant``.
    """
    rows, cols = weight.shape
    block_rows, block_cols = block
    expected = (-(-rows // block_rows), -(-cols // block_cols))
    if tuple(scale_inv.shape) != expected:
        raise ConversionError(
            f"{name}{SCALE_SUFFIX}: shape {tuple(scale_inv.shape)} does not fit {name} "
            f"{(rows, cols)} in {block_rows} x {block_cols} blocks (expected {expected})"
        )
    scale = scale_inv.float().repeat_interleave(block_rows, 0)[:rows]
    scale = scale.repeat_interleave(block_cols, 1)[:, :cols]
    return weight.float() * scale


def _fp8_block_size(config: Mapping) -> Optional[tuple[int, int]]:
    """Block size of a ``quantization_config`` with FP8 block scales (None: not quantised)."""
    quant = config.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method")
    if method != "fp8":
        raise ConversionError(
            f"quantization_config.quant_method={method!r} is not supported (only the block-wise "
            "'fp8' of DeepSeek-V3, which is dequantised on reading)"
        )
    block = quant.get("weight_block_size") or [128, 128]
    if len(block) != 2:
        raise ConversionError(f"quantization_config.weight_block_size={block!r}: need 2 sizes")
    return int(block[0]), int(block[1])


class SafetensorsCheckpoint(Mapping):
    """Tensors of a directory of ``*.safetensors`` files, each read from disk when accessed.

    With ``fp8_block`` (the ``weight_block_size`` of an FP8 ``quantization_config``) an FP8
    tensor is returned dequantised to float32 with its ``<name>_scale_inv``; the scales are
    not keys of this mapping. :attr:`dequantized` counts the tensors dequantised so far.
    """

    def __init__(self, files: Iterable[Path], fp8_block: Optional[tuple[int, int]] = None):
        from safetensors import safe_open

        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._fp8_block = fp8_block
        self.dequantized = 0
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    self._file_of[key] = file
        self._scales = {
            key
            for key in self._file_of
            if key.endswith(SCALE_SUFFIX) and key[: -len(SCALE_SUFFIX)] in self._file_of
        }
        self._keys = [key for key in self._file_of if key not in self._scales]

    def _raw(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self._file_of[key]
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(str(file), framework="pt")
        return handle.get_tensor(key)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self:
            raise KeyError(key)
        tensor = self._raw(key)
        if tensor.dtype not in _FP8_DTYPES:
            return tensor
        scale_key = key + SCALE_SUFFIX
        if scale_key not in self._file_of:
            raise ConversionError(f"{key}: FP8 tensor without a {scale_key} to dequantise it")
        if self._fp8_block is None:
            raise ConversionError(
                f"{key}: FP8 tensor, but config.json has no fp8 quantization_config "
                "(weight_block_size)"
            )
        self.dequantized += 1
        return dequantize_fp8_blocks(tensor, self._raw(scale_key), self._fp8_block, key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._file_of and key not in self._scales


def read_hf_checkpoint(path: Union[str, Path]) -> tuple[dict, Mapping[str, torch.Tensor]]:
    """``(config dict, tensors)`` of a Hugging Face checkpoint directory.

    Reads ``config.json``; the tensors of all ``*.safetensors`` files (sharded or not) come as a
    lazy :class:`SafetensorsCheckpoint` (FP8 weights dequantised on access). Without
    safetensors files, ``pytorch_model*.bin`` are loaded whole with
    ``torch.load(weights_only=True)``.
    """
    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{directory}: no config.json (not a Hugging Face checkpoint)")
    config = json.loads(config_file.read_text())
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return config, SafetensorsCheckpoint(files, fp8_block=_fp8_block_size(config))
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if not bins:
        raise ConversionError(f"{directory}: no *.safetensors or pytorch_model*.bin files")
    state: dict[str, torch.Tensor] = {}
    for file in bins:
        state.update(torch.load(file, map_location="cpu", weights_only=True))
    return config, state
