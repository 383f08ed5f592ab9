"""Named ranges around the kernels' work: what a step profile attributes time by.

The ops that skip the dispatcher, the int8 GEMM of every CPU route and the BitNet linear's forward and backward each
run inside a :func:`kernel_range`. Under ``torch.profiler`` a range is a ``record_function`` range, so a profile
shows it by name. Inside a :class:`RangeTimer` (no profiler) it is two clock reads, summed per name.

Why a timer besides the profiler: on some machines the profiler changes what it measures. On a Zen 4 VM,
``torch.profiler`` over BitNet training steps made the SwiGLU's backward multiplications take 70 ms a step instead of
11 (with three times their page faults; glibc's heap grew by 300 MB over the three profiled steps); on a Sapphire
Rapids VM it put BitNet's passes at 100% of its int8 GEMM time where timing them by hand gave 55%. A timer around the
same ranges allocates nothing in the step and costs ~0.3 µs a range.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from typing import Any

import torch

from .private_api import profiler_enabled

#: The prefix of the range around an int8 GEMM (``bitnet_ao.gemm:<route>``): the GEMM itself, with the epilogue a
#: route fuses into it, without the packing, conversions or prepacks around it.
GEMM_RANGE_PREFIX = "bitnet_ao.gemm"
#: The range around a BitNet linear's autograd forward and backward (``bitnet_ao/linear.py``).
LINEAR_RANGE = "bitnet_ao.linear"

#: The timer recording now, if any (at most one: :meth:`RangeTimer.__enter__`).
_active: RangeTimer | None = None


class RangeTimer:
    """Wall time and calls per range name while it is entered, from the thread that entered it.

    ``seconds[name]`` sums every range of that name; ``outermost[name]`` only those opened inside no other range,
    so that nested ranges (an op's GEMM inside the op inside a linear) can be told apart without counting twice."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.outermost: defaultdict[str, float] = defaultdict(float)
        self.calls: defaultdict[str, int] = defaultdict(int)
        self._depth = 0
        self._thread = 0

    def __enter__(self) -> RangeTimer:
        global _active
        if _active is not None:
            raise RuntimeError("bitnet_ao RangeTimer: another timer is already recording; they do not nest")
        self._thread = threading.get_ident()
        _active = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        _active = None

    def _range(self, name: str) -> _TimedRange:
        return _TimedRange(self, name)


class _TimedRange:
    """One range of a :class:`RangeTimer` (a class rather than a generator: ~0.3 µs a range instead of ~1.5)."""

    __slots__ = ("_timer", "_name", "_start", "_outermost")

    def __init__(self, timer: RangeTimer, name: str) -> None:
        self._timer, self._name = timer, name

    def __enter__(self) -> None:
        timer = self._timer
        self._outermost = timer._depth == 0
        timer._depth += 1
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self._start
        timer = self._timer
        timer._depth -= 1
        timer.seconds[self._name] += elapsed
        timer.calls[self._name] += 1
        if self._outermost:
            timer.outermost[self._name] += elapsed


def kernel_range(name: str) -> Any:
    """A range named ``name``: ``torch.profiler.record_function`` while a profiler records, a timed range while a
    :class:`RangeTimer` records on this thread, else a context that does nothing (opening a ``record_function`` range
    with no profiler still costs ~6-12 µs, torch 2.13.0, on every kernel call)."""
    if profiler_enabled():
        return torch.profiler.record_function(name)
    timer = _active
    if timer is not None and timer._thread == threading.get_ident():
        return timer._range(name)
    return contextlib.nullcontext()
