"""Shared fixtures."""

import pytest

import algm.methods


@pytest.fixture
def isolated_registry(monkeypatch):
    """Methods registered inside the test are forgotten after it (the registry is global)."""
    monkeypatch.setattr(algm.methods, "_REGISTRY", dict(algm.methods.methods()))
    return algm.methods._REGISTRY
