"""The one timing helper of the benchmarks, so that every script times the same way.

``measure`` times calls with ``time.perf_counter`` and reports the median: one slow call (a page fault, another
process waking up) moves the median much less than a mean. ``synchronize`` is the device barrier it builds on,
for the code that times a span instead of repeated calls (``training_loop.py``). ``keep_freed_memory`` and
``cache_evictor`` are for bandwidth tables, which must time the code rather than the allocator or the caches.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on a CUDA device: its calls return before the kernels have run. No-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    *fns: Callable[[], object],
    warmup: int,
    iters: int,
    sync: Callable[[], object] | None = None,
    after: Callable[[], object] | None = None,
) -> list[float]:
    """Median wall seconds of one call of each ``fn``, after ``warmup`` untimed rounds; one figure per ``fn``.

    With several functions they are called in turn, round by round, so that whatever else the machine is doing
    slows them alike and the ratios between them stay meaningful.

    ``sync`` runs just before the clock starts and just before it stops (``functools.partial(synchronize,
    device)`` for a GPU, ``dist.barrier`` for ranks that should be timed together). ``after`` runs after each
    call, untimed: e.g. dropping the gradients, so that every backward allocates them afresh as in training.
    """
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + iters):
        for fn, fn_times in zip(fns, times, strict=True):
            if sync is not None:
                sync()
            start = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            if i >= warmup:
                fn_times.append(time.perf_counter() - start)
            if after is not None:
                after()
    return [statistics.median(t) for t in times]


def keep_freed_memory() -> None:
    """Make glibc's malloc keep the memory a process frees for its next allocations, instead of mapping large blocks
    afresh (and returning them) each time: a tensor of tens of MB allocated on every call then page-faults its way
    in, a cost of the allocator that varied run to run from 5 to 48 GB/s for the same 12 MB copy on a Zen 4
    (jemalloc and tcmalloc, which PyTorch's CPU tuning guides recommend, keep memory too). Process-wide and for good;
    a no-op off glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    mallopt(m_mmap_max, 0)  # every block from the heap, never its own mapping
    mallopt(m_trim_threshold, 2**30)  # and the heap's top not given back below 1 GiB


def cache_evictor(device: torch.device | str, nbytes: int = 2**27) -> Callable[[], object]:
    """A call that pushes every cache out by reading ``nbytes`` (128 MiB: several times a CPU's last-level cache
    or a GPU's L2) that nothing else touches, so that the next timed call reads its inputs from memory: what a
    memory bandwidth is measured on. Reading leaves no dirty lines for the timed call to write back."""
    buffer = torch.ones(nbytes // 8, dtype=torch.int64, device=device)
    return lambda: int(buffer.max())
