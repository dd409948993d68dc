"""The machine-local cache for trained zoo weights and downloads (never inside the repo)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$MLOPT_CACHE` (default ~/.cache/mlopt) joined with parts, created on demand."""
    root = Path(os.environ.get("MLOPT_CACHE") or Path.home() / ".cache" / "mlopt")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
