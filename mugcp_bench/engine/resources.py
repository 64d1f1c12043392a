"""What one run costs: peak memory (the GPU's allocator on CUDA, the process's resident set on the CPU) and the
device it ran on. Read by the report's efficiency table (`report --efficiency`)."""

from __future__ import annotations

import logging
import platform
import re
import resource
import sys
from pathlib import Path
from typing import Any

import torch

# How `peak_memory_mb` was measured (the efficiency table says which): the vocabulary is part of the run record's
# schema (store/records.py), which the report reads without importing torch.
from mugcp_bench.store.records import CUDA_MAX_ALLOCATED, RSS_MAXRSS_GROWTH, RSS_PEAK_ABOVE_START

log = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        hit = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), flags=re.M)
    except OSError:
        return None
    return int(hit.group(1)) if hit else None


def _maxrss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, kB elsewhere


def device_name(device: torch.device) -> str:
    """A readable device name: the GPU's name, or the CPU's model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        hit = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), flags=re.M)
    except OSError:
        hit = None
    return hit.group(1).strip() if hit else (platform.processor() or platform.machine() or "cpu")


class PeakMemory:
    """Measure one run's peak memory: start it before the run, `stop()` after.

    On CUDA the allocator's peak (reset at start); on Linux the process's peak resident set, reset at start through
    /proc/self/clear_refs, minus the resident set at start; elsewhere the growth of the lifetime peak RSS.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.measure = CUDA_MAX_ALLOCATED
            return
        self.start_kb = _status_kb("VmRSS")
        try:
            _CLEAR_REFS.write_text("5")  # resets VmHWM (the peak RSS) to the current RSS
            self.measure = RSS_PEAK_ABOVE_START if self.start_kb is not None else RSS_MAXRSS_GROWTH
        except OSError:
            self.measure = RSS_MAXRSS_GROWTH
        self.start_maxrss_mb = _maxrss_mb()

    def stop(self) -> dict[str, Any]:
        """{"peak_memory_mb", "memory_measure", "device", "device_name"} for the run record."""
        if self.measure == CUDA_MAX_ALLOCATED:
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.measure == RSS_PEAK_ABOVE_START and (hwm := _status_kb("VmHWM")) is not None:
            peak = max(hwm - self.start_kb, 0) / 2**10
        else:
            self.measure = RSS_MAXRSS_GROWTH
            peak = max(_maxrss_mb() - self.start_maxrss_mb, 0.0)
        return {
            "peak_memory_mb": round(peak, 1),
            "memory_measure": self.measure,
            "device": str(self.device),
            "device_name": device_name(self.device),
        }
