"""Where a training step's time goes: the step profile the main job prints for every run.

Each step's wall time is split into

- ``int8_matmul``: the exact int8 GEMMs of the BitNet linears, whatever the route (``aten::_int_mm``, oneDNN's
  ``qlinear_pointwise``, the C kernels, the FP32 GEMM of integer values), each inside a ``bitnet_ao.gemm:<route>``
  range (``kernels/ranges.py``);
- ``bitnet_passes``: everything else BitNet adds: the time inside the BitNet linears' forward and backward and inside
  ``bitnet_ao::`` ops that is not their GEMM (quantization, ternarization and weight statistics, the norms the recipe
  fuses, scaling the int32 output, oneDNN prepacks, layout conversions, the autograd functions' Python);
- ``dense_matmul``: floating-point GEMMs outside BitNet ops (every linear of the dense baseline; the output head
  and the attention's matmuls in both runs);
- ``other``: what is left of the wall time (attention, embeddings, loss, optimizer, the model's elementwise ops,
  Python).

Two measurements: :class:`StepProfiler` (``torch.profiler`` over a few steps) splits them all; :class:`StepTimer`
times the BitNet ranges around the steps it wraps, with no profiler, since on some machines the profiler slows the
elementwise passes more than the GEMMs (``kernels/ranges.py``). A run on CPU without ``torch.compile`` reports the
timer's ``int8_matmul``, ``bitnet_passes`` and step time with the profiler's ``dense_matmul`` (:func:`combine`).

The figure of merit is ``bitnet_passes / int8_matmul``: what BitNet spends around its fast matmuls, against them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from torch.autograd.profiler_util import FunctionEvent

from bitnet_ao.kernels.ranges import GEMM_RANGE_PREFIX, LINEAR_RANGE, RangeTimer

#: The categories, in the order the report prints them.
CATEGORIES = ("int8_matmul", "bitnet_passes", "dense_matmul", "other")
#: GEMM ops; inside a ``bitnet_ao::`` op they are the int8 matmul of a route (the FP32 route multiplies the integer
#: values in float32), outside one they are dense matmuls.
GEMMS = frozenset(
    {"aten::_int_mm", "onednn::qlinear_pointwise", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
)

#: bitnet_ao ops that a dense model uses too (the benchmark model's RMSNorms): BitNet's only inside a BitNet linear.
SHARED_OPS = frozenset({"bitnet_ao::rms_norm", "bitnet_ao::rms_norm_backward"})


#: The autograd engine's range around a node's backward. Besides the node it holds the engine's own work, adding
#: up the gradients of a tensor that several ops read (``aten::add_``), which every model does wherever its graph
#: branches: that is not BitNet's, the node inside is.
ENGINE_RANGE_PREFIX = "autograd::engine::evaluate_function:"


def _opens_bitnet(name: str) -> bool:
    """Whether the event is BitNet's work: a BitNet linear's autograd function (forward or backward) or an op only
    BitNet runs."""
    if name.startswith(ENGINE_RANGE_PREFIX):
        return False
    if "BitNetLinearFunction" in name or name == LINEAR_RANGE:
        return True
    return name.startswith("bitnet_ao::") and name not in SHARED_OPS


def split_events(events: list[FunctionEvent]) -> dict[str, float]:
    """Seconds per category (without ``other``) of the profiled CPU events on the calling thread."""
    totals = dict.fromkeys(CATEGORIES[:-1], 0.0)

    def walk(event: FunctionEvent, in_op: bool, in_bitnet: bool) -> None:
        name = event.name
        if in_op and in_bitnet and (name in GEMMS or name.startswith(GEMM_RANGE_PREFIX)):
            totals["int8_matmul"] += event.cpu_time_total / 1e6  # the GEMM with whatever it calls
            return
        in_op = in_op or name.startswith("bitnet_ao::")
        in_bitnet = in_bitnet or _opens_bitnet(name)
        if name in GEMMS:  # a float GEMM outside the ops: the dense baseline, the head, a high-precision backward
            totals["dense_matmul"] += event.self_cpu_time_total / 1e6
        elif in_bitnet:
            totals["bitnet_passes"] += event.self_cpu_time_total / 1e6
        for child in event.cpu_children:
            walk(child, in_op, in_bitnet)

    for event in events:
        if event.cpu_parent is None:
            walk(event, False, False)
    return totals


class StepProfiler:
    """``torch.profiler`` around the training steps between :meth:`start` and :meth:`stop`."""

    def __init__(self) -> None:
        self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._start = 0.0

    def start(self) -> None:
        self._profile.__enter__()
        self._start = time.perf_counter()

    def stop(self, steps: int) -> dict[str, float]:
        """Seconds per step for each category, the wall time (``step_s``, profiler overhead included) and
        ``passes_vs_int8`` (``bitnet_passes / int8_matmul``; 0 for a run with no int8 matmul)."""
        wall = time.perf_counter() - self._start
        self._profile.__exit__(None, None, None)
        per_step = {name: seconds / steps for name, seconds in split_events(self._profile.events()).items()}
        per_step["other"] = max(0.0, wall / steps - sum(per_step.values()))
        per_step["step_s"] = wall / steps
        int8 = per_step["int8_matmul"]
        per_step["passes_vs_int8"] = per_step["bitnet_passes"] / int8 if int8 else 0.0
        return per_step


class StepTimer:
    """The BitNet ranges of the steps run inside :meth:`step`, timed without a profiler (:class:`RangeTimer`).

    Eager CPU runs only: under ``torch.compile`` the linear's range is traced away, and on a GPU the clock around a
    launch is not the kernel's time."""

    def __init__(self) -> None:
        self._timer = RangeTimer()
        self._steps = 0
        self._wall = 0.0

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        start = time.perf_counter()
        with self._timer:
            yield
        self._wall += time.perf_counter() - start
        self._steps += 1

    def split(self) -> dict:
        """Seconds per step: ``int8_matmul``, ``bitnet_passes``, the steps' wall time ``step_s``, and under
        ``ranges`` each range's (every op and GEMM by name, nested ones included: where the passes go)."""
        per_step = {name: seconds / self._steps for name, seconds in split_ranges(self._timer).items()}
        ranges = {name: seconds / self._steps for name, seconds in sorted(self._timer.seconds.items())}
        return {**per_step, "step_s": self._wall / self._steps, "ranges": ranges}


def split_ranges(timer: RangeTimer) -> dict[str, float]:
    """Seconds of ``int8_matmul`` and ``bitnet_passes`` in ``timer``'s ranges: BitNet's time is that of the ranges
    opened inside no other (the linears, the ops BitNet alone runs outside them, GEMMs outside both), its passes
    that time less the GEMMs in it."""
    int8 = sum(t for name, t in timer.seconds.items() if name.startswith(GEMM_RANGE_PREFIX))
    bitnet = sum(t for name, t in timer.outermost.items() if _opens_bitnet(name) or name.startswith(GEMM_RANGE_PREFIX))
    return {"int8_matmul": int8, "bitnet_passes": bitnet - int8}


def combine(profiled: dict[str, float], timed: dict) -> dict:
    """The step profile of a run with both measurements: the timer's ``int8_matmul``, ``bitnet_passes``, ``step_s``
    and ``ranges``, the profile's ``dense_matmul`` (no range marks a float GEMM), ``other`` what is left, and the
    profile itself under ``profiled`` for comparison."""
    figures = {**timed, "dense_matmul": profiled["dense_matmul"]}
    figures["other"] = max(0.0, timed["step_s"] - sum(figures[c] for c in CATEGORIES[:-1]))
    int8 = figures["int8_matmul"]
    figures["passes_vs_int8"] = figures["bitnet_passes"] / int8 if int8 else 0.0
    keys = (*CATEGORIES, "step_s", "passes_vs_int8", "ranges")
    return {**{key: figures[key] for key in keys}, "profiled": profiled}


def profile_rows(runs: list[dict]) -> list[tuple[str, ...]]:
    """The step profiles of ``runs`` (each with a ``step_profile``) as table cells, header first, in ms per step."""
    rows = [("run", *CATEGORIES, "step", "passes / int8 mm")]
    for r in runs:
        p = r["step_profile"]
        ratio = f"{p['passes_vs_int8']:.0%}" if p["int8_matmul"] else "-"
        rows.append((r["name"], *(f"{p[c] * 1e3:.0f}" for c in CATEGORIES), f"{p['step_s'] * 1e3:.0f}", ratio))
    return rows
