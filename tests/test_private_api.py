"""Each private torch / Triton API in ``bitnet_ao.private_api`` still behaves the way bitnet_ao relies on.

When one of these fails after a torch or Triton upgrade, the entry it names in ``bitnet_ao/private_api.py`` needs
a new implementation; the failure here says which, instead of a crash inside a training step.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from bitnet_ao import private_api
from tests.conftest import random_int8


def test_in_backward_is_true_only_inside_a_backward_pass():
    seen = []
    x = torch.ones(2, requires_grad=True)
    y = x * 2
    y.register_hook(lambda g: seen.append(private_api.in_backward()))
    assert not private_api.in_backward()
    y.sum().backward()
    assert seen == [True]
    assert not private_api.in_backward()


def test_outside_dispatch_modes_runs_on_real_tensors_under_fake_mode():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        assert isinstance(torch.ones(2), FakeTensor)
        with private_api.outside_dispatch_modes():
            real = torch.ones(2) * 3
        assert isinstance(torch.ones(2), FakeTensor)
    assert type(real) is Tensor and real.tolist() == [3.0, 3.0]


def test_tracing_context_is_seen_only_while_tracing():
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert not private_api.is_compiling_with_fake_tensors()
    with tracing(TracingContext(FakeTensorMode())):
        assert private_api.is_compiling_with_fake_tensors()
    assert not private_api.is_compiling_with_fake_tensors()


class _Marked(Tensor):
    """A subclass whose ``__torch_function__`` records every call, to see when it is bypassed."""

    calls: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(func)
        with private_api.disable_torch_function_subclass():
            return func(*args, **(kwargs or {}))


def test_dispatch_mode_active_only_inside_a_mode():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    assert not private_api.dispatch_mode_active()
    with Count():
        assert private_api.dispatch_mode_active()
    assert not private_api.dispatch_mode_active()


def test_disable_torch_function_subclass_bypasses_the_override():
    t = torch.ones(3).as_subclass(_Marked)
    _Marked.calls.clear()
    torch.add(t, 1)
    assert torch.add in _Marked.calls
    _Marked.calls.clear()
    with private_api.disable_torch_function_subclass():
        out = torch.add(t, 1)
    assert _Marked.calls == [] and type(out) is Tensor


class _Wrapper(Tensor):
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(func)


def test_make_wrapper_subclass_has_the_metadata_and_no_storage():
    t = private_api.make_wrapper_subclass(_Wrapper, (3, 5), dtype=torch.bfloat16, device="cpu", requires_grad=True)
    assert type(t) is _Wrapper and t.shape == (3, 5) and t.dtype == torch.bfloat16 and t.requires_grad
    # No data of its own: why checkpoints must hold the master weight instead (tests/test_checkpoint.py).
    with pytest.raises(RuntimeError, match="data pointer"):
        t.untyped_storage().data_ptr()


def test_tree_map_only_maps_only_instances_of_the_class():
    out = private_api.tree_map_only(Tensor, lambda t: t + 1, {"a": [torch.zeros(1), 5], "b": (torch.ones(1),)})
    assert (
        out["a"][1] == 5 and torch.equal(out["a"][0], torch.ones(1)) and torch.equal(out["b"][0], torch.full((1,), 2.0))
    )


def test_int_mm_is_exact_int32():
    g = torch.Generator().manual_seed(0)
    a = random_int8(32, 64, generator=g)
    b = random_int8(64, 24, generator=g)
    out = private_api.int_mm(a, b)
    assert out.dtype == torch.int32 and torch.equal(out, (a.double() @ b.double()).to(torch.int32))


@pytest.mark.skipif(not private_api.onednn_int8_linear_available(), reason="no oneDNN int8 linear in this build")
def test_onednn_int8_linear_subtracts_the_zero_point_and_sums_exactly():
    g = torch.Generator().manual_seed(1)
    a_u8 = torch.randint(0, 256, (20, 48), dtype=torch.uint8, generator=g)
    w = torch.randint(-1, 2, (12, 48), dtype=torch.int8, generator=g)
    out = private_api.onednn_int8_linear(a_u8, 128, w)
    assert out.dtype == torch.float32
    assert torch.equal(out.double(), (a_u8.double() - 128) @ w.double().t())


def test_dtensor_local_is_the_local_shard_object(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        dt = DTensor.from_local(torch.arange(6.0).reshape(3, 2), mesh, [Shard(0)])
        local = private_api.dtensor_local(dt)
        assert local is private_api.dtensor_local(dt), "the same object every time (identity is what FSDP2 keeps)"
        with torch.no_grad():
            assert dt.to_local() is local
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_knobs_report_the_interpreter():
    assert private_api.triton_interpreting() == (os.environ.get("TRITON_INTERPRET") == "1")
    ast_source, gpu_target = private_api.triton_compiler()
    assert ast_source.__name__ == "ASTSource" and gpu_target.__name__ == "GPUTarget"
    assert gpu_target("cuda", 90, 32).arch == 90
