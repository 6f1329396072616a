"""The project's own top-level packages come from beside ``algm``, never from the working directory.

``suites`` and ``baselines`` are generic names. ``python -m algm.cli`` (and so every
torchrun worker) puts the working directory first on ``sys.path``, where a folder of that
name, even an empty one (a namespace package), would be imported instead of the
project's. :func:`guard` drops the working directory from ``sys.path`` in that case, and
refuses to go on if such a folder was imported already. Workers are also started with
``PYTHONSAFEPATH=1`` (:func:`algm.distributed.launch`), which keeps the working
directory off their ``sys.path`` from the start.
"""

from __future__ import annotations

import sys
from pathlib import Path

import algm

PACKAGES = ("suites", "baselines")


def home() -> Path:
    """The folder holding ``algm`` and its sibling packages (a checkout or site-packages)."""
    return Path(algm.__file__).resolve().parents[1]


def guard() -> None:
    """Keep the working directory from shadowing :data:`PACKAGES`; ImportError (one line)
    if one of them was already imported from elsewhere."""
    cwd = Path.cwd().resolve()
    if cwd != home() and any((cwd / name).exists() for name in PACKAGES):
        sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != cwd]
    for name in PACKAGES:
        module = sys.modules.get(name)
        found = [Path(p).resolve() for p in getattr(module, "__path__", [])]
        if module is not None and found != [home() / name]:
            raise ImportError(f"the package {name!r} was imported from {found[0] if found else module} "
                              f"instead of {home() / name}; run from a folder without a {name}/ "
                              f"sub-folder, or with python -P")
