"""The ranges a step profile attributes time by (``kernels/ranges.py``, ``benchmarks/step_profile.py``): the timer
sums them as a profiler would, every CPU route's int8 GEMMs run inside their GEMM range with the packing and
prepacks outside it, and a BitNet linear's forward and backward run inside the linear's range."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

from benchmarks import step_profile
from bitnet_ao import bitnet_training
from bitnet_ao.kernels import cpu_matmul
from bitnet_ao.kernels.ranges import GEMM_RANGE_PREFIX, LINEAR_RANGE, RangeTimer, kernel_range


def test_timer_sums_each_name_and_tells_the_outermost_ranges_apart():
    with RangeTimer() as timer:
        with kernel_range("outer"):
            time.sleep(0.02)
            with kernel_range("inner"):
                time.sleep(0.01)
        with kernel_range("inner"):
            time.sleep(0.01)
    with kernel_range("after") as nothing:  # an exited timer records nothing
        assert nothing is None
    assert dict(timer.calls) == {"outer": 1, "inner": 2}
    assert timer.seconds["outer"] >= 0.03 and timer.outermost["outer"] == timer.seconds["outer"]
    assert timer.seconds["inner"] >= 0.02
    assert 0.01 <= timer.outermost["inner"] < timer.seconds["inner"] - 0.005


def test_timer_records_its_own_thread_only_and_does_not_nest():
    with RangeTimer() as timer:
        worker = threading.Thread(target=lambda: kernel_range("elsewhere").__enter__())
        worker.start()
        worker.join()
        with pytest.raises(RuntimeError, match="already recording"), RangeTimer():
            pass
    assert "elsewhere" not in timer.calls


def test_a_profiler_sees_the_range_where_both_record():
    with RangeTimer() as timer, torch.profiler.profile() as prof, kernel_range("bitnet_ao.test_range"):
        torch.ones(2).sum()
    assert "bitnet_ao.test_range" in {e.name for e in prof.events()}
    assert not timer.calls, "under a profiler the profiler records the range, not the timer as well"


def _linear_step_under_timer(k: int = 64) -> RangeTimer:
    """A BitNet linear's forward and backward inside a :class:`RangeTimer`."""
    torch.manual_seed(0)
    model = nn.Linear(k, 48, bias=False)
    quantize_(model, bitnet_training())
    x = torch.randn(32, k, requires_grad=True)
    with RangeTimer() as timer:
        F.linear(x, model.weight).square().sum().backward()
    return timer


def test_every_route_runs_its_gemms_inside_their_range(cpu_route):
    ternary, full = cpu_route
    timer = _linear_step_under_timer()
    gemms = {name: n for name, n in timer.calls.items() if name.startswith(GEMM_RANGE_PREFIX)}
    expected = {f"{GEMM_RANGE_PREFIX}:{ternary}": 2}  # the forward and grad_input; grad_weight's is full-range
    key = f"{GEMM_RANGE_PREFIX}:{full}"
    expected[key] = expected.get(key, 0) + 1
    assert gemms == expected
    assert timer.calls[LINEAR_RANGE] == 2 and set(timer.outermost) == {LINEAR_RANGE}
    split = step_profile.split_ranges(timer)
    assert split["int8_matmul"] == pytest.approx(sum(timer.seconds[name] for name in gemms))
    assert split["bitnet_passes"] == pytest.approx(timer.seconds[LINEAR_RANGE] - split["int8_matmul"])
    assert split["int8_matmul"] > 0 and split["bitnet_passes"] > 0


@pytest.mark.parametrize("route", ["int_mm", "onednn"])
def test_what_a_route_does_around_its_gemm_counts_as_passes(route, force_routes, monkeypatch):
    """A slow layout conversion (``torch._int_mm``'s operands) or prepack (oneDNN's) lands in the passes."""
    if route not in cpu_matmul.available_routes("ternary"):
        pytest.skip(f"route {route} does not run here")
    force_routes(route, "fp32")
    name = {"int_mm": "_int_mm_operand", "onednn": "onednn_int8_prepack"}[route]
    real = getattr(cpu_matmul, name)

    def slow(t):
        time.sleep(0.05)
        return real(t)

    monkeypatch.setattr(cpu_matmul, name, slow)
    split = step_profile.split_ranges(_linear_step_under_timer())
    assert split["bitnet_passes"] >= 0.1 and split["int8_matmul"] < 0.05
