"""Where data and caches live: `--data-root`, else $MUGCP_DATA, else ./data; caches in $MUGCP_CACHE or
~/.cache/mugcp-bench."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "MUGCP_DATA"
CACHE_ENV = "MUGCP_CACHE"


def resolve_data_root(cli_value: str | os.PathLike[str] | None = None) -> Path:
    """The data root: the CLI value, else $MUGCP_DATA, else ./data (absolute, `~` expanded, not resolved)."""
    value = cli_value if cli_value not in (None, "") else os.environ.get(DATA_ENV) or "data"
    return Path(os.path.abspath(Path(value).expanduser()))


def default_cache_dir() -> Path:
    """The cache root: $MUGCP_CACHE, else ~/.cache/mugcp-bench."""
    value = os.environ.get(CACHE_ENV)
    return Path(os.path.abspath(Path(value).expanduser())) if value else Path.home() / ".cache" / "mugcp-bench"
