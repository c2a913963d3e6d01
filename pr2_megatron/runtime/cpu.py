"""CPU bring-up: make stock megatron-core run forward/backward on CPU with gloo.

Megatron-core assumes CUDA in a few dozen places (docs/megatron-on-cpu.md lists them).
This module is the *only* place in the project that patches anything, and
:func:`enable_cpu_bringup` refuses to run when CUDA is available, so a GPU run never sees it.

What it changes, and why:

* ``torch.cuda.current_device`` answers ``"cpu"``: Megatron passes it as ``device=`` in ~90
  places (rotary embedding, global memory buffer, router buffers, TP mappings).
* Megatron's CUDA RNG tracker is replaced by :class:`CPURNGStatesTracker`, which keeps named
  CPU generator states (dropout under ``get_cuda_rng_tracker().fork()`` and activation
  recompute keep working, reproducibly).
* The alltoall dispatcher's device-to-host step converts split sizes to numpy, as its CUDA path
  does (gloo rejects tensors as split sizes); its side stream is an inert stand-in.
* the default causal attention mask is built on the CPU (Megatron builds it with
  ``device="cuda"``).
* ``moe_utils.te_general_gemm`` is defined as ``None`` where core 0.16.1 forgets it without TE.
* :func:`pipeline_on_cpu` is a context for Megatron's pipeline schedules: tensor factories
  asked for ``device="cuda"`` get the CPU, and batched p2p is off (active only inside it).
* Megatron's optimizers (``get_megatron_optimizer``: FP32, Float16 with fp32 main params,
  distributed), gradient clipping and ``dist_checkpointing`` run inside a scoped torch function
  mode (:class:`_CudaOnCPU`, active only within the wrapped entry points) that sends
  ``device="cuda"`` factories to the CPU, answers ``Tensor.type()`` in CUDA spelling
  (``"torch.cuda.FloatTensor"``, which their dtype checks compare against) and makes
  ``Tensor.cuda()`` the identity; ``torch.cuda.synchronize`` is a no-op (the checkpoint writer
  and batched p2p call it); the checkpoint writer's memory log works without ``psutil``; and
  the distributed optimizer's checkpoint load with torch's AdamW (no Apex/TE) gets the per-
  parameter ``step`` it expects (:func:`_enable_cpu_optimizer`).

Norms with sequence parallelism are not patched: :class:`SequenceParallelTorchNorm` is a norm
module that the spec builder (``pr2_megatron.routing.specs``) plugs in on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_ENABLED = False


class CPURNGStatesTracker:
    """Named RNG states on the CPU generator, with the interface of Megatron's tracker.

    Megatron keeps one CUDA generator state per parallel role (data-parallel, tensor-parallel,
    expert-parallel) and forks into them around dropout and weight init. On CPU the one
    generator is the CPU generator, so a fork swaps its state in and out.
    """

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        """Whether any state was added or set."""
        return self._is_initialized

    def reset(self) -> None:
        """Drop every tracked state."""
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        """A shallow copy of the tracked states."""
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Replace the tracked states (used by activation recompute)."""
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        """Track a new state seeded with ``seed``."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} is already tracked")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} is already tracked")
        self.seeds_.add(seed)
        generator = torch.Generator().manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        """Run the body with the CPU generator in state ``name``, then restore it."""
        if name not in self.states_:
            raise ValueError(f"RNG state {name!r} is not tracked")
        outer_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer_state)


def _cpu_dtoh_and_synchronize(self, point: str, tokens_per_expert=None):
    """CPU replacement for ``MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize``.

    The CUDA path copies split sizes to host numpy arrays at ``cuda_dtoh_point``; gloo needs
    exactly that (it rejects tensors as split sizes). There is no stream to synchronise.
    """
    if not self.drop_and_pad and point == self.cuda_dtoh_point:

        def to_numpy(value):
            return value.numpy() if torch.is_tensor(value) else value

        self.input_splits = to_numpy(self.input_splits)
        self.output_splits = to_numpy(self.output_splits)
        self.output_splits_tp = to_numpy(self.output_splits_tp)
    return tokens_per_expert


@functools.lru_cache(maxsize=32)
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    """Megatron's default causal mask (True = masked), built on the CPU."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


class _InertStream:
    """Stands in for the dispatcher's class-level device-to-host CUDA stream."""


class _HostStream:
    """``torch.cuda.current_stream()`` on CPU, as Megatron uses it: nothing to wait for."""

    def wait_event(self, event) -> None:
        """No CUDA events exist on CPU."""

    def wait_stream(self, stream) -> None:
        """Host work is already ordered."""

    def synchronize(self) -> None:
        """Nothing is in flight."""


def enable_cpu_bringup() -> None:
    """Apply the CPU workarounds once per process. Refuses to run when CUDA is available."""
    global _ENABLED
    if _ENABLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("enable_cpu_bringup() is for CPU-only runs; CUDA is available here")

    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer import utils as transformer_utils
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    torch.cuda.current_device = lambda: "cpu"
    # megatron-core 0.19's DDP asks for the current stream to wait on CUDA-graph gradient
    # events before each gradient sync; without CUDA there are no such events to wait for.
    torch.cuda.current_stream = lambda device=None: _HostStream()

    mcore_random._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Recompute saves/restores "the CUDA state": on CPU the CPU state is already saved beside it.
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: None
    mcore_random._set_cuda_rng_state = lambda *args, **kwargs: None

    dispatcher = token_dispatcher.MoEAlltoAllTokenDispatcher
    dispatcher.cuda_dtoh_stream = _InertStream()
    dispatcher._maybe_dtoh_and_synchronize = _cpu_dtoh_and_synchronize

    transformer_utils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # Multi-latent attention (DeepSeek-V3, Moonlight) checks isinstance(x, TELinear); without TE
    # that name is a placeholder object, not a type, and the check raises TypeError.
    from megatron.core.transformer import multi_latent_attention

    if not isinstance(getattr(multi_latent_attention, "TELinear", None), type):
        multi_latent_attention.TELinear = type("NoTELinear", (), {})

    _enable_cpu_optimizer()
    _ENABLED = True
    logger.info("CPU bring-up enabled for megatron-core (gloo, CPU RNG tracker)")


def cpu_bringup_enabled() -> bool:
    """Whether :func:`enable_cpu_bringup` ran in this process."""
    return _ENABLED


class SequenceParallelTorchNorm:
    """LayerNorm/RMSNorm from torch that accepts ``sequence_parallel=True`` configs.

    Megatron's torch-norm fallback (``WrappedTorchNorm``) asserts that sequence parallelism is
    off. A norm is token-wise, so under SP each rank simply normalises its own sequence chunk;
    the only thing SP changes is that the (replicated) weight's gradient must be all-reduced
    over TP, which Megatron does for every parameter marked ``sequence_parallel``.

    Like Megatron's wrapper, constructing it returns the torch norm itself, so parameter names
    (``...layernorm.weight``) equal the stock local spec's and stock checkpoints load.
    """

    def __new__(
        cls,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        """The torch norm for ``config.normalization``, its weights marked for the TP sum."""
        kind = getattr(config, "normalization", normalization)
        if kind == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif kind == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization {kind!r} is not supported on CPU")
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm


# ------------------------------------------------------------- pipeline schedules on CPU
class _CudaFactoriesOnCPU(TorchFunctionMode):
    """Turns ``device="cuda"`` of tensor factories into the CPU (see :func:`pipeline_on_cpu`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


class _CudaOnCPU(_CudaFactoriesOnCPU):
    """:class:`_CudaFactoriesOnCPU`, plus ``Tensor.type()`` in CUDA spelling and ``.cuda()`` = self.

    Megatron's optimizers check ``param.type() == "torch.cuda.FloatTensor"`` (or
    ``BFloat16Tensor``) and raise a TypeError otherwise; the fully-parallel checkpoint load
    calls ``.cuda()``. Active only inside the entry points :func:`_in_cpu_mode` wraps.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.cuda:
            return args[0]
        return super().__torch_function__(func, types, args, kwargs)


def _in_cpu_mode(owner, name: str) -> None:
    """Wrap ``owner.name`` so that it runs inside :class:`_CudaOnCPU` (once)."""
    function = getattr(owner, name)
    if getattr(function, "_pr2_cpu_mode", False):
        return

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with _CudaOnCPU():
            return function(*args, **kwargs)

    wrapper._pr2_cpu_mode = True
    setattr(owner, name, wrapper)


_OPTIMIZER_ENTRY_POINTS = (
    "step",
    "prepare_grads",
    "step_with_ready_grads",
    "get_grad_norm",
    "clip_grad_norm",
    "count_zeros",
    "state_dict",
    "sharded_state_dict",
    "load_state_dict",
    "reload_model_params",
)


def _enable_cpu_optimizer() -> None:
    """Megatron's optimizer stack and ``dist_checkpointing`` on CPU (see the module docstring).

    megatron-core 0.16.1 builds its optimizers with ``torch.tensor(..., device="cuda")`` and
    ``param.type()`` checks, computes every grad norm (``ChainedOptimizer.step`` always does)
    with CUDA scratch tensors, and its checkpoint writer calls ``torch.cuda.synchronize`` and,
    for a debug line, ``psutil``.
    """
    import megatron.core.optimizer as megatron_optimizer
    from megatron.core.dist_checkpointing.strategies import filesystem_async, fully_parallel
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    _in_cpu_mode(megatron_optimizer, "_get_megatron_optimizer_based_on_param_groups")
    for cls in (
        optimizer.FP32Optimizer,
        optimizer.MixedPrecisionOptimizer,
        optimizer.Float16OptimizerWithFloat16Params,
        optimizer.ChainedOptimizer,
        distrib_optimizer.DistributedOptimizer,
    ):
        for name in _OPTIMIZER_ENTRY_POINTS:
            if name in vars(cls):
                _in_cpu_mode(cls, name)
    for name in ("clip_grad_by_total_norm_fp32", "get_grad_norm_fp32", "count_zeros_fp32"):
        _in_cpu_mode(clip_grads, name)
    _in_cpu_mode(fully_parallel.FullyParallelLoadStrategyWrapper, "load")
    torch.cuda.synchronize = lambda device=None: None  # nothing to wait for without CUDA
    if not getattr(filesystem_async, "HAVE_PSUTIL", True):
        filesystem_async._process_memory = lambda: 0  # only feeds a debug log line
    if not distrib_optimizer.HAVE_APEX_OR_TE:
        _patch_distributed_optimizer_step_state(distrib_optimizer.DistributedOptimizer)


def _patch_distributed_optimizer_step_state(cls) -> None:
    """The distributed optimizer's checkpoint load with torch's AdamW (no Apex / TE).

    megatron-core 0.16.1, torch-AdamW fallback: ``state_dict()`` asserts one common per-param
    ``step``, which a fresh optimizer (empty state: exactly when ``sharded_state_dict(
    is_loading=True)`` calls it) lacks; ``load_state_dict`` then puts one *shared* ``step``
    tensor into every parameter's state (AdamW would increment it once per parameter per step:
    16 instead of 2 after one step) and copies every state key, ``step`` included, from tensors
    that never hold it (KeyError). Fresh state gets ``step = 0``; the copy skips absent keys;
    each parameter gets its own ``step`` after the load.
    """
    state_dict, load_state_dict = cls.state_dict, cls.load_state_dict
    set_states = cls._set_main_param_and_optimizer_states

    def fresh_state_dict(self):
        if len(self.optimizer.state) == 0:
            self.init_state_fn(self.optimizer, self.config)
            for state in self.optimizer.state.values():
                state["step"] = torch.tensor(0.0)
        return state_dict(self)

    def unshared_load_state_dict(self, state):
        load_state_dict(self, state)
        for param_state in self.optimizer.state.values():
            if "step" in param_state:
                param_state["step"] = param_state["step"].clone()

    def copy_present_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return set_states(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        targets = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            targets[key].copy_(value)

    cls.state_dict = fresh_state_dict
    cls.load_state_dict = unshared_load_state_dict
    cls._set_main_param_and_optimizer_states = copy_present_states


@contextlib.contextmanager
def pipeline_on_cpu(model_chunks: Sequence[torch.nn.Module]):
    """Let Megatron's pipeline schedules (``get_forward_backward_func``) run on CPU with gloo.

    megatron-core 0.16.1's schedules need two things a CPU build of torch lacks:

    * ``total_num_tokens = torch.zeros([], dtype=torch.int, device="cuda")`` in all three
      schedules (no pipelining, 1F1B, interleaved): inside this context tensor factories asked
      for ``device="cuda"`` get the CPU (a torch function mode, active only in the context);
    * ``batch_p2p_comm`` (on by default) is switched off in the chunks' config. With it,
      ``torch.cuda.synchronize()`` runs after every batched p2p (``batch_p2p_sync``), and,
      worse, on gloo the interleaved (VPP) schedule with PP=2 silently crosses messages: one
      ``batch_isend_irecv`` posts a gradient (``send_prev``) and an activation (``send_next``)
      to the same rank with the same tag, that rank posts its activation receive first, and
      gloo matches them in posting order -- same shapes, so no error, wrong numbers from the
      first steady-state micro-batch on. Megatron's unbatched path (``_p2p_ops``) posts each
      rank's sends in the order its peer posts the receives (one group per sending rank when
      PP=2), so nothing crosses.

    On a machine with CUDA this changes nothing; on CPU the configs are restored on exit.
    """
    if torch.cuda.is_available():
        yield
        return
    configs = [chunk.config for chunk in model_chunks]
    saved = [config.batch_p2p_comm for config in configs]
    for config in configs:
        config.batch_p2p_comm = False
    try:
        with _CudaFactoriesOnCPU():
            yield
    finally:
        for config, value in zip(configs, saved):
            config.batch_p2p_comm = value
