"""Where converted weights, trained heads, feature caches and finished rows live."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$ALGM_BENCH_CACHE`` (default ``~/.cache/algm-bench``) joined with ``parts``, created."""
    root = Path(os.environ.get("ALGM_BENCH_CACHE", Path.home() / ".cache" / "algm-bench"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
