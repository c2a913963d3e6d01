"""GPU stack detection and per-step GPU monitoring (NVML through ``nvidia-ml-py``).

Everything here is optional: on a machine without CUDA, Transformer Engine, apex or NVML the
run goes on with the CPU/local fallbacks, and each missing piece is reported once.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPUStack:
    """Which optional GPU components this process can use."""

    cuda: bool
    transformer_engine: bool
    apex: bool
    nvml: bool
    deep_ep: bool

    def describe(self) -> str:
        """One line for the run log."""
        flags = {
            "CUDA": self.cuda,
            "Transformer Engine": self.transformer_engine,
            "apex": self.apex,
            "NVML": self.nvml,
            "DeepEP (flex dispatcher)": self.deep_ep,
        }
        return ", ".join(f"{name}: {'yes' if on else 'no'}" for name, on in flags.items())


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def detect_gpu_stack() -> GPUStack:
    """Probe CUDA, TE, NVIDIA apex (its ``amp_C`` kernels, not the PyPI ``apex``), NVML, DeepEP."""
    return GPUStack(
        cuda=torch.cuda.is_available(),
        transformer_engine=torch.cuda.is_available() and _importable("transformer_engine"),
        apex=_importable("amp_C") and _importable("apex"),
        nvml=_importable("pynvml"),
        deep_ep=_importable("deep_ep"),
    )


class GPUMonitor:
    """Utilisation, memory and power of this rank's GPU, sampled once per step.

    Turns itself off with one log line when NVML is missing or cannot be initialised (no GPU,
    no driver), so the same config runs on CPU.
    """

    def __init__(self, enabled: bool = True, device_index: int | None = None) -> None:
        self.handle = None
        self._nvml = None
        if not enabled:
            return
        try:
            import pynvml
        except ImportError:
            logger.warning("GPU monitoring off: nvidia-ml-py is not installed")
            return
        try:
            pynvml.nvmlInit()
            index = torch.cuda.current_device() if device_index is None else device_index
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(index))
            self._nvml = pynvml
        except Exception as error:  # NVMLError_LibraryNotFound, DriverNotLoaded, no device ...
            logger.warning("GPU monitoring off: NVML unavailable (%s)", error)
            self.handle = None

    @property
    def active(self) -> bool:
        """Whether samples are taken."""
        return self.handle is not None

    def sample(self) -> dict[str, float]:
        """``gpu/utilization`` (%), ``gpu/memory_used_gib``, ``gpu/power_w``; {} when off."""
        if not self.active:
            return {}
        nvml = self._nvml
        utilization = nvml.nvmlDeviceGetUtilizationRates(self.handle)
        memory = nvml.nvmlDeviceGetMemoryInfo(self.handle)
        power_mw = nvml.nvmlDeviceGetPowerUsage(self.handle)
        return {
            "gpu/utilization": float(utilization.gpu),
            "gpu/memory_used_gib": memory.used / 2**30,
            "gpu/memory_total_gib": memory.total / 2**30,
            "gpu/power_w": power_mw / 1000.0,
        }
