"""The fused CPU kernel of the exact-k subset DP: built on first use, loaded with ctypes.

:mod:`~pr2_megatron.routing.probmoe.subset_dp` runs the DP as tensor ops: on the CPU that is
~17 ``[rows, E]`` float64 ops per subset size in the backward, each re-reading its operands
from memory (docs/performance.md, section 5b). ``subset_dp_kernel.cpp`` does the same math
(the unsorted path, exact-k) in one pass per group of 16 tokens, its tables in the caches, the
group's tokens in vector registers (AVX2 where the CPU has it, chosen at load time). It has a
plain C ABI and no PyTorch headers: it builds with the system's C++ compiler once per machine
(about 20 s), into a cache folder keyed by the source, the flags and the compiler
(``$PR2_KERNEL_CACHE``, default ``~/.cache/pr2_megatron/kernels``), and loads with ctypes
(which releases the GIL during a call).

Used by ``subset_dp`` for CPU tensors on the unsorted path with ``k_min == k_max`` when
:func:`available`; everything else (dynamic-k, the ordered path, accelerators) runs the tensor
ops. ``PR2_PROBMOE_CPU_KERNEL=0`` turns the kernel off (then, and when no compiler is found or
the build fails, with one warning naming the cause, the tensor ops run: same results within
1e-12, same draws).

Shape-suffix legend:
    T  tokens
    E  experts
    K  subset size (k_min == k_max)
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

__all__ = ["available", "hvp", "marginals", "sample", "set_enabled"]

SOURCE = Path(__file__).with_name("subset_dp_kernel.cpp")
#: No -ffast-math and no FMA contraction: the sampling table keeps the tensor ops' bits.
#: No -march=native: a cache folder on a cluster's shared home serves nodes of other CPUs.
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno")
_ENV_SWITCH = "PR2_PROBMOE_CPU_KERNEL"

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_failure: Optional[str] = None  # why the kernel is not available (None: not tried or loaded)
_enabled: Optional[bool] = None  # None: from the environment


def set_enabled(enabled: Optional[bool]) -> None:
    """Let ``subset_dp`` use the kernel or not (None: ``$PR2_PROBMOE_CPU_KERNEL``, default on).

    :func:`marginals`, :func:`hvp` and :func:`sample` called directly run the kernel whenever it
    is loaded.
    """
    global _enabled
    _enabled = enabled


def _switched_on() -> bool:
    if _enabled is not None:
        return _enabled
    return os.environ.get(_ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compiler_version(compiler: str) -> str:
    done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    return done.stdout.splitlines()[0] if done.stdout else ""


def _cache_dir() -> Path:
    root = os.environ.get("PR2_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "pr2_megatron" / "kernels"


def _build(compiler: str) -> Path:
    """The shared library for this source, flags and compiler (built when not cached)."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join(FLAGS).encode())
    key.update(_compiler_version(compiler).encode())
    key.update(os.uname().machine.encode())
    target = _cache_dir() / f"pr2_probmoe_dp_{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Ranks of one job may build at once: each into its own file, then an atomic rename.
    handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        command = [compiler, *FLAGS, str(SOURCE), "-o", partial]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
            )
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _load() -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++ or clang++)")
    library = ctypes.CDLL(str(_build(compiler)))
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    library.pr2_probmoe_marginals.argtypes = [ptr, i64, i64, i64, i32, ptr]
    library.pr2_probmoe_hvp.argtypes = [ptr, ptr, i64, i64, i64, i32, ptr]
    library.pr2_probmoe_sample.argtypes = [ptr, ptr, i64, i64, i64, i32, ptr, ptr]
    for function in ("pr2_probmoe_marginals", "pr2_probmoe_hvp", "pr2_probmoe_sample"):
        getattr(library, function).restype = None
    return library


def available() -> bool:
    """Whether the kernel is switched on and loaded (the first call builds or loads it)."""
    global _library, _failure
    if not _switched_on():
        return False
    if _library is not None:
        return True
    if _failure is not None:
        return False
    with _lock:
        if _library is None and _failure is None:
            try:
                _library = _load()
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                _failure = str(error)
                warnings.warn(
                    f"ProbMoE CPU kernel unavailable, using the tensor-op DP instead: {_failure}",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _library is not None


_DTYPES = {torch.float32: 0, torch.float64: 1}


def _loaded() -> ctypes.CDLL:
    """The library (built or loaded now if need be); RuntimeError when it is unavailable."""
    if _library is None and not available():
        why = _failure or f"switched off (${_ENV_SWITCH} or set_enabled)"
        raise RuntimeError(f"the ProbMoE CPU kernel is unavailable: {why}")
    return _library


def _logits(theta_TE: torch.Tensor, k: int) -> torch.Tensor:
    """The logits as the kernel reads them: 2-D, CPU, float32 or float64, contiguous."""
    if theta_TE.device.type != "cpu" or theta_TE.dim() != 2:
        raise ValueError(
            f"the CPU kernel takes 2-D CPU logits, got {theta_TE.dim()}-D on {theta_TE.device}"
        )
    if not 1 <= k <= theta_TE.shape[1]:
        raise ValueError(f"subset size k={k} must be in [1, E={theta_TE.shape[1]}]")
    if theta_TE.dtype not in _DTYPES:
        theta_TE = theta_TE.float()
    return theta_TE.detach().contiguous()


def marginals(theta_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Exact-k inclusion marginals [T, E] in the logits' dtype (unsorted path)."""
    dtype = theta_TE.dtype
    theta_TE = _logits(theta_TE, k)
    out_TE = torch.empty_like(theta_TE)
    _loaded().pr2_probmoe_marginals(
        theta_TE.data_ptr(), *theta_TE.shape, k, _DTYPES[theta_TE.dtype], out_TE.data_ptr()
    )
    return out_TE.to(dtype)  # half-precision logits: computed from their float32 values


def hvp(theta_TE: torch.Tensor, grad_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Exact-k ``(∂μ/∂θ)ᵀ g`` [T, E] in the logits' dtype (unsorted path)."""
    dtype = theta_TE.dtype
    theta_TE = _logits(theta_TE, k)
    grad_TE = grad_TE.detach().to(theta_TE.dtype).contiguous()
    if grad_TE.shape != theta_TE.shape:
        raise ValueError(f"gradient {tuple(grad_TE.shape)} for logits {tuple(theta_TE.shape)}")
    out_TE = torch.empty_like(theta_TE)
    _loaded().pr2_probmoe_hvp(
        theta_TE.data_ptr(),
        grad_TE.data_ptr(),
        *theta_TE.shape,
        k,
        _DTYPES[theta_TE.dtype],
        out_TE.data_ptr(),
    )
    return out_TE.to(dtype)


def sample(
    theta_TE: torch.Tensor, k: int, uniform_TK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact-k draws ``(mask_TE, ids_TK)`` for these uniforms, by ``SubsetDP.sample``'s rule."""
    theta_TE = _logits(theta_TE, k)
    num_tokens, num_experts = theta_TE.shape
    if tuple(uniform_TK.shape) != (num_tokens, k):
        raise ValueError(f"uniforms {tuple(uniform_TK.shape)} for ({num_tokens}, k={k})")
    fraction_TK = (1.0 - uniform_TK.to(torch.float64)).contiguous()
    ids_TK = torch.empty((num_tokens, k), dtype=torch.long)
    mask_TE = torch.empty((num_tokens, num_experts), dtype=torch.bool)
    _loaded().pr2_probmoe_sample(
        theta_TE.data_ptr(),
        fraction_TK.data_ptr(),
        num_tokens,
        num_experts,
        k,
        _DTYPES[theta_TE.dtype],
        ids_TK.data_ptr(),
        mask_TE.data_ptr(),
    )
    return mask_TE, ids_TK
