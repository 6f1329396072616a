"""Atomic file writes: a reader sees the old file or the whole new one, never half of it.

Every writer of a cache entry, checkpoint or report goes through :func:`write_with`:
the content goes to a temporary file in the same directory (same file system, so the
rename is atomic), which is renamed over the target only once it is complete. A failed
write (full disk, exception) leaves the target as it was and removes the temporary file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch


def write_with(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically."""
    return write_with(path, lambda tmp: torch.save(obj, tmp))


def copy_file(source: str | Path, path: str | Path) -> Path:
    """A copy of ``source``'s bytes at ``path``, atomically."""
    return write_with(path, lambda tmp: shutil.copyfile(source, tmp))


def write_text(path: str | Path, text: str) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, obj: Any, indent: int | None = 1) -> Path:
    """``obj`` as JSON (``default=str`` for paths and the like)."""
    return write_text(path, json.dumps(obj, indent=indent, default=str))
