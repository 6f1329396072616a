"""Where converted weights, trained heads, feature caches and finished rows live."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$ALGM_BENCH_CACHE`` (default ``~/.cache/algm-bench``) joined with ``parts``, created."""
    root = Path(os.environ.get("ALGM_BENCH_CACHE", Path.home() / ".cache" / "algm-bench"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def move_aside(path: Path, reason: str, what: str = "cache entry") -> Path | None:
    """Move a damaged cache entry (file or folder) out of the way, never deleting it: to
    ``<name>.bad``, or ``<name>.bad-<n>`` if that is taken. Says so on stderr, naming
    the entry (a ``what``) and ``reason``; returns the new path (None if another process
    moved it first)."""
    bad, n = path.with_name(f"{path.name}.bad"), 1
    while bad.exists():
        n += 1
        bad = path.with_name(f"{path.name}.bad-{n}")
    try:
        os.replace(path, bad)
    except FileNotFoundError:
        return None
    print(f"algm-bench: damaged {what} {path} ({reason}); moved to {bad.name}, computing it again",
          file=sys.stderr)
    return bad
