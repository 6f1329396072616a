"""Shared fixtures."""

import os
from pathlib import Path

import pytest
import torch

import algm.methods

# This repository's data (CamVid) lives beside the checkout, as in the Makefile.
os.environ.setdefault("ALGM_BENCH_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def isolated_registry(monkeypatch):
    """Methods registered inside the test are forgotten after it (the registry is global)."""
    monkeypatch.setattr(algm.methods, "_REGISTRY", dict(algm.methods.methods()))
    return algm.methods._REGISTRY


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A fresh ``$ALGM_BENCH_CACHE`` under the test's tmp_path and no ``$DATA_ROOT``: a
    command reads only what the test wrote."""
    monkeypatch.setenv("ALGM_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DATA_ROOT", raising=False)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster and immune to a busy CPU (two OpenMP
    threads spin-wait on a shared 2-core machine). A module asks for it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
