"""Shared fixtures."""

import pytest
import torch

import algm.methods


@pytest.fixture
def isolated_registry(monkeypatch):
    """Methods registered inside the test are forgotten after it (the registry is global)."""
    monkeypatch.setattr(algm.methods, "_REGISTRY", dict(algm.methods.methods()))
    return algm.methods._REGISTRY


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster and immune to a busy CPU (two OpenMP
    threads spin-wait on a shared 2-core machine). A module asks for it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
