"""Cache keys of trained parts: content hashes and the cache folders they name.

A cache entry (encoder features, a trained head) is keyed by :func:`digest` of a JSON
identity that holds everything its content depends on, weights included through
:func:`weights_fingerprint`. Folder names start with a readable label
(:func:`cache_label`); the hash after it is the real key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from algm.build import Setup
from algm.cache import cache_dir


def digest(obj: Any, n: int = 16) -> str:
    """First ``n`` hex digits of sha256 over ``obj`` as canonical JSON (sorted keys)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def weights_fingerprint(*modules: nn.Module) -> str:
    """sha256 over the state dicts (names, dtypes, shapes, values) of ``modules``."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{i}:{name}:{t.dtype}:{tuple(t.shape)}".encode())
            if t.dtype == torch.bfloat16:  # numpy has no bf16; the values are exact in fp32
                t = t.float()
            h.update(t.numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def cache_label(setup: Setup, split: str) -> str:
    """Readable prefix of cache folder names: backbone, dataset, split and method."""
    return f"{setup.backbone.name}-{setup.dataset.name}-{split}-{setup.model.method.name}"


def cache_folder(cache: str | Path | None, *parts: str) -> Path:
    """``cache_dir(*parts)``, or ``cache/parts`` under another root (tests); created."""
    if cache is None:
        return cache_dir(*parts)
    path = Path(cache).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
