"""Trained parts shipped inside the package: a pre-filled cache for the default suite.

Training the default suite's parts (the off-the-shelf head, a head trained with a
method, a method's own networks) takes far longer on a 2-core CPU than measuring the
rows that use them. The package therefore ships the files that produced its committed
reference run, under the cache-relative paths the framework would write them to
(``algm/shipped/<path>``), listed with their sha256 in ``algm/shipped/manifest.json``.

A cache path names everything its content depends on (a head's folder holds the hash of
its encoder weights, training frames, method and recipe), so a shipped file is used
exactly where a cached one would be: :func:`install` copies it into the cache, after
checking its checksum, instead of training. Which parts are shipped, and for which
rows, is written by :mod:`suites.shipped_parts`, which also retrains them and compares
(``algm-bench parts --verify``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterable

from algm import atomic
from algm.cache import cache_dir
from algm.files import file_sha256, read_text

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
MANIFEST_FORMAT = "algm-bench/shipped/v1"
# Set to "0" to train every part here instead (also what --verify does)
ENV = "ALGM_BENCH_SHIPPED"


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def _read_manifest(path: Path) -> dict:
    if not path.is_file():
        return {"format": MANIFEST_FORMAT, "parts": []}
    try:
        manifest = json.loads(read_text(path, "shipped-parts manifest"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err}); reinstall the package") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: not a shipped-parts manifest ({MANIFEST_FORMAT})")
    return manifest


def manifest(folder: Path | None = None) -> dict:
    """The manifest of ``folder`` (default :data:`SHIPPED_DIR`): ``{"format", "suite",
    "trained_on", "parts": [{"path", "what", "sha256", "bytes", "used_by", ...}]}``."""
    return _read_manifest((folder or SHIPPED_DIR) / "manifest.json")


def entry(relpath: str, folder: Path | None = None) -> dict | None:
    """The manifest entry of cache-relative ``relpath`` (POSIX form), or None."""
    return next((p for p in manifest(folder)["parts"] if p["path"] == relpath), None)


def relative_to_cache(path: Path) -> str | None:
    """``path`` relative to the cache root, or None if it lies elsewhere."""
    try:
        return Path(path).resolve().relative_to(cache_dir().resolve()).as_posix()
    except ValueError:
        return None


def install(path: str | Path, folder: Path | None = None) -> bool:
    """Copy the shipped file for cache file ``path`` into place, if the package ships one
    (and :data:`ENV` is not ``0``); True if ``path`` now holds it. A shipped file whose
    sha256 differs from its manifest entry is refused (ValueError, one line)."""
    path, folder = Path(path), folder or SHIPPED_DIR
    relpath = relative_to_cache(path)
    part = entry(relpath, folder) if relpath is not None and enabled() else None
    if part is None:
        return False
    source = folder / relpath
    if not source.is_file() or file_sha256(source) != part["sha256"]:
        raise ValueError(f"{source}: the shipped file is missing or does not match the sha256 of "
                         f"{folder / 'manifest.json'}; reinstall the package")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.copy_file(source, path)
    print(f"algm-bench: using the shipped {part['what']} ({relpath}, sha256 {part['sha256'][:12]}); "
          f"`algm-bench parts --verify` retrains it and compares", file=sys.stderr)
    return True


def install_tasks(tasks: Iterable) -> list:
    """The :class:`~algm.reduction.TrainingTask` list left to run once every shipped part
    among ``tasks`` is installed."""
    return [task for task in tasks if not install(task.path)]
