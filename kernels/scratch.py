"""Per-thread scratch buffers of the CPU kernels: memory a call fills and reads back before it returns, kept for
the life of the thread and grown to the largest size asked for (like a BLAS workspace).

Why: glibc serves an allocation above its mmap threshold (32 MiB at most, and less until a large block has been
freed) with fresh pages, and the kernel zeroes each on its first write. A 4096 x 5632 int32 product (92 MiB) cost
~40 ms of page faults on every call on a Zen 4, against ~110 ms for the int8 GEMM that fills it; the 2.9 MB a
1024 x 2816 ternary operand packs into for ``vpdpbusd`` cost ~0.3 ms of faults per call, 42 calls a training step.
Nothing a caller keeps may live in one: results are always new tensors.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor


class ThreadScratch(threading.local):
    """One grow-only buffer of ``dtype`` per thread. Made outside inference mode, so that every later call may write
    it, inside inference mode or not."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.buffer: Tensor | None = None

    def get(self, numel: int) -> Tensor:
        """The first ``numel`` elements of this thread's buffer (1-D), valid until the thread's next ``get``."""
        if self.buffer is None or self.buffer.numel() < numel:
            with torch.inference_mode(False):
                self.buffer = torch.empty(numel, dtype=self.dtype)
        return self.buffer[:numel]
