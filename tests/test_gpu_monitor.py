"""GPU stack detection and NVML monitoring: off with one log line on CPU, real numbers with NVML."""

import logging
import sys
import types

import pytest
import torch

from pr2_megatron.runtime.gpu import GPUMonitor, detect_gpu_stack


def test_detection_on_this_machine():
    stack = detect_gpu_stack()
    assert stack.cuda == torch.cuda.is_available()
    if not stack.cuda:
        assert not stack.transformer_engine
    assert "CUDA: " in stack.describe()


def test_monitor_turns_off_with_one_log_line_without_nvml(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails like a missing package
    with caplog.at_level(logging.WARNING):
        monitor = GPUMonitor()
    assert not monitor.active and monitor.sample() == {}
    assert [r.message for r in caplog.records] == [
        "GPU monitoring off: nvidia-ml-py is not installed"
    ]


def test_monitor_turns_off_when_nvml_init_fails(monkeypatch, caplog):
    fake = types.SimpleNamespace(nvmlInit=lambda: (_ for _ in ()).throw(RuntimeError("no driver")))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with caplog.at_level(logging.WARNING):
        monitor = GPUMonitor(device_index=0)
    assert not monitor.active
    assert "no driver" in caplog.text


def test_monitor_reads_nvml_units(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        nvmlInit=lambda: calls.append("init"),
        nvmlDeviceGetHandleByIndex=lambda i: ("handle", i),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=87),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30),
        nvmlDeviceGetPowerUsage=lambda h: 412_500,  # milliwatts
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monitor = GPUMonitor(device_index=2)
    assert monitor.active and monitor.handle == ("handle", 2) and calls == ["init"]
    assert monitor.sample() == {
        "gpu/utilization": 87.0,
        "gpu/memory_used_gib": 3.0,
        "gpu/memory_total_gib": 80.0,
        "gpu/power_w": 412.5,
    }


@pytest.mark.gpu
def test_monitor_on_a_real_gpu():
    monitor = GPUMonitor()
    assert monitor.active
    sample = monitor.sample()
    assert 0 <= sample["gpu/utilization"] <= 100 and sample["gpu/memory_total_gib"] > 1
