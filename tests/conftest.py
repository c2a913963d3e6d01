"""Test setup: one gloo process group of size 1 for in-process tests; GPU marker; MLA on CPU."""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # Megatron compiles the expert-bias update

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def single_process_group():
    """World of one rank for tests that build Megatron models in the pytest process."""
    from pr2_megatron.testing.distributed import init_single_process_group

    init_single_process_group()
    yield


@pytest.fixture
def megatron_single(single_process_group):
    """Fresh Megatron parallel state (TP=EP=PP=1) for one test; torn down after it."""
    from pr2_megatron.runtime.parallel import release_parallel_state

    yield
    release_parallel_state()


@pytest.fixture
def mla_on_cpu(monkeypatch):
    """Build MLA without Transformer Engine for one test (:mod:`support.mla`)."""
    from support.mla import allow_mla_without_te

    allow_mla_without_te(monkeypatch)
