"""engine.resources.PeakMemory: a run's peak memory, not the process's history (CPU), and the allocator's (CUDA)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mugcp_bench.engine import resources
from mugcp_bench.engine.resources import PeakMemory
from mugcp_bench.store.records import CUDA_MAX_ALLOCATED, RSS_MAXRSS_GROWTH, RSS_PEAK_ABOVE_START

LINUX_PROC = sys.platform.startswith("linux") and Path("/proc/self/clear_refs").exists()
MB = 2**20
SLACK_MB = 1.0  # after a trim glibc keeps M_TOP_PAD (128 KB) per arena, which a run may reuse unseen


def _run(total_mb: int, chunk_kb: int) -> dict:
    """A 'run' that holds `total_mb` of float32 tensors of `chunk_kb` each at its peak, then frees them all (as a
    training run's activations come and go). Small chunks stay in the C heap after they are freed."""
    meter = PeakMemory(torch.device("cpu"))
    n = total_mb * 1024 // chunk_kb
    held = [torch.ones(chunk_kb * 256) for _ in range(n)]  # ones: every page written, hence resident
    assert sum(t.numel() * 4 for t in held) == total_mb * MB
    del held
    return meter.stop()


@pytest.mark.skipif(not LINUX_PROC, reason="the resident-set peak is reset through Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("chunk_kb", [256, 64 * 1024])  # heap-allocated chunks, and mmap-ed ones
def test_cpu_peak_is_the_runs_own_not_an_earlier_ones(chunk_kb: int) -> None:
    big = _run(256, chunk_kb)
    assert big["memory_measure"] == RSS_PEAK_ABOVE_START
    assert big["peak_memory_mb"] >= 256 - SLACK_MB  # at least what it held
    small = _run(64, chunk_kb)  # the big run's freed memory is not what this one reports...
    assert 64 - SLACK_MB <= small["peak_memory_mb"] < 0.5 * big["peak_memory_mb"]
    again = _run(64, chunk_kb)  # ...and the heap the small run left behind is not free memory for the next
    assert again["peak_memory_mb"] >= 64 - SLACK_MB
    assert big["device"] == "cpu" and big["device_name"]


@pytest.mark.skipif(not LINUX_PROC, reason="the resident-set peak is reset through Linux's /proc/self/clear_refs")
def test_without_clear_refs_the_lifetime_peak_growth_is_a_lower_bound(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _run(64, 256)
    monkeypatch.setattr(resources, "_CLEAR_REFS", tmp_path)  # a folder: writing to it fails as a refused write does
    out = _run(16, 256)
    assert out["memory_measure"] == RSS_MAXRSS_GROWTH and out["peak_memory_mb"] >= 0.0


def test_cuda_reads_the_allocator_peak_reset_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(("reset", d)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: calls.append(("peak", d)) or 300 * MB)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "Fake GPU")
    device = torch.device("cuda", 1)
    meter = PeakMemory(device)
    assert calls == [("reset", device)]
    out = meter.stop()
    assert calls[-1] == ("peak", device)
    assert out == {
        "peak_memory_mb": 300.0,
        "memory_measure": CUDA_MAX_ALLOCATED,
        "device": "cuda:1",
        "device_name": "Fake GPU",
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_of_a_real_allocation() -> None:
    device = torch.device("cuda")
    big = PeakMemory(device)
    x = torch.ones(256 * MB // 4, device=device)
    del x
    first = big.stop()["peak_memory_mb"]
    small = PeakMemory(device)
    y = torch.ones(16 * MB // 4, device=device)
    del y
    second = small.stop()["peak_memory_mb"]
    assert first >= 256 and second < first - 200
