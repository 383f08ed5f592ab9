"""The one timing helper of the benchmarks, so that every script times the same way.

``measure`` times calls with ``time.perf_counter`` and reports the median: one slow call (a page fault, another
process waking up) moves the median much less than a mean. ``synchronize`` is the device barrier it builds on,
for the code that times a span instead of repeated calls (``training_loop.py``).
"""

from __future__ import annotations

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
