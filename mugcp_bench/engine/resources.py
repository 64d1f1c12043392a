"""What one run costs: peak memory (the GPU's allocator on CUDA, the process's resident set on the CPU) and the
device it ran on. Read by the report's efficiency table (`report --efficiency`).

On the CPU a sweep runs many runs in one process, and memory a run frees stays in the C heap for the next one to
reuse: the resident set then barely moves, and a run's peak above its start read 0 to 12 MB whatever it allocated.
So before each run the heap's free pages go back to the system (glibc's malloc_trim) and the peak is reset
(/proc/self/clear_refs); the run's peak is then what it added to the process's resident memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import platform
import re
import resource
import sys
from collections.abc import Callable
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


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim (None elsewhere: musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_free_heap() -> bool:
    """Hand the C heap's free pages back to the system (glibc), so that memory freed by earlier work is not reused
    unseen by the next run's resident-set peak. False where there is no malloc_trim."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


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

    CUDA: the allocator's peak over the run (`torch.cuda.max_memory_allocated`, reset at start; tensors only, the
    weights already loaded included). CPU on Linux: the peak resident set of the process during the run above its
    resident set at start, with the C heap's free pages released and the peak (VmHWM) reset through
    /proc/self/clear_refs at start: the memory the run itself added. Elsewhere (no /proc, or clear_refs refused):
    the growth of the process's lifetime peak RSS, a lower bound (0 when an earlier run peaked higher).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.measure = CUDA_MAX_ALLOCATED
            return
        release_free_heap()
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
