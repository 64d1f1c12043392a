"""Test-wide settings: offline, small thread counts, caches in a temporary folder."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets a session-shared cache outside the user's home (the toy world is prepared once)."""
    monkeypatch.setenv("MUGCP_CACHE", str(tmp_path_factory.getbasetemp() / "mugcp-cache"))
    monkeypatch.delenv("MUGCP_DATA", raising=False)


@pytest.fixture(scope="session")
def tiny_backbone():
    from mugcp_bench.model.backbone import load_backbone

    return load_backbone("tiny")
