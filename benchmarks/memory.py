"""The benchmarks' memory probes: the peak of a span (CUDA allocator, or the process's resident set on CPU) and the
resident set now, kept in one place so that every figure of memory is measured, and described, the same way.
"""

from __future__ import annotations

import math
import os
import platform
import resource
from pathlib import Path

import torch


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak, so that each run's figure is its own and not the largest run's before it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        # Writing 5 resets the kernel's resident-set high-water mark (VmHWM) of this process.
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    """The peak since ``reset_peak_memory``: the CUDA allocator's, or the process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = _proc_status_mb("VmHWM")
    if not math.isnan(peak):
        return peak
    # No /proc (macOS): the lifetime peak of the process, in bytes on macOS and kB elsewhere.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if platform.system() == "Darwin" else rss / 2**10


def rss_mb() -> float:
    """The process's resident set now (Linux VmRSS; NaN without /proc): the reference a peak is a delta from."""
    return _proc_status_mb("VmRSS")


def peak_memory_note(device: torch.device) -> str:
    """What ``peak_memory_mb`` measures on ``device``, in words for a report's notes."""
    if device.type == "cuda":
        return "peak CUDA memory allocated by the run (torch.cuda.max_memory_allocated)"
    return "peak resident memory of the whole process during the run (Linux VmHWM, reset before each run)"


def _proc_status_mb(key: str) -> float:
    """A memory line of ``/proc/self/status`` (``VmHWM``, ``VmRSS``; in kB there) in MiB, NaN without it."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 2**10
    return math.nan
