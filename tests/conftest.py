"""Test-wide settings: offline, small thread counts, caches in a temporary folder."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    """The cache the whole session shares, outside the user's home: the quick toy world is prepared once (the demo
    and the toy-world tests), image features and descriptions once per content."""
    return tmp_path_factory.getbasetemp() / "mugcp-cache"


@pytest.fixture(autouse=True)
def _isolated_cache(session_cache, monkeypatch):
    """Every test gets the session-shared cache (MUGCP_CACHE)."""
    monkeypatch.setenv("MUGCP_CACHE", str(session_cache))
    monkeypatch.delenv("MUGCP_DATA", raising=False)


@pytest.fixture(scope="session")
def tiny_backbone():
    from mugcp_bench.model.backbone import load_backbone

    return load_backbone("tiny")
