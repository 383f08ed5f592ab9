"""Each private torch / Triton API wrapper still behaves the way bitnet_ao relies on: those of ``bitnet_ao/`` in
``bitnet_ao.private_api``, the kernels' own in ``bitnet_ao.kernels.private_api``.

When one of these fails after a torch or Triton upgrade, the entry it names in ``bitnet_ao/private_api.py`` or
``kernels/private_api.py`` needs a new implementation; the failure here says which, instead of a crash inside a
training step.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import platform
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from bitnet_ao import private_api
from bitnet_ao.kernels import cpu_build
from bitnet_ao.kernels import private_api as kernels_private_api
from tests.conftest import random_int8

ROOT = Path(__file__).resolve().parents[1]


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
        with kernels_private_api.outside_dispatch_modes():
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

    assert not kernels_private_api.dispatch_mode_active()
    with Count():
        assert kernels_private_api.dispatch_mode_active()
    assert not kernels_private_api.dispatch_mode_active()


def test_dense_tensor_is_false_for_everything_the_dispatcher_must_handle():
    from torch.func import functionalize, grad, vmap

    seen = {}

    def probe(name):
        def f(x):
            seen[name] = kernels_private_api.dense_tensor(x)
            return x.sum()

        return f

    assert kernels_private_api.dense_tensor(torch.randn(2))
    assert kernels_private_api.dense_tensor(torch.nn.Parameter(torch.randn(2)))
    assert kernels_private_api.dense_tensor(torch.zeros(2, dtype=torch.int8))
    with torch.inference_mode():
        assert kernels_private_api.dense_tensor(torch.randn(2))
    assert not kernels_private_api.dense_tensor(torch.randn(2, device="meta"))
    vmap(probe("vmap"))(torch.randn(3, 2))
    functionalize(probe("functionalize"))(torch.randn(2))
    grad(probe("grad"))(torch.randn(2))
    assert seen == {"vmap": False, "functionalize": False, "grad": False}

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.randn(2)
    assert not kernels_private_api.dense_tensor(fake)


def test_profiler_enabled_only_while_a_profiler_records():
    assert not kernels_private_api.profiler_enabled()
    with torch.profiler.profile() as prof:
        assert kernels_private_api.profiler_enabled()
        with torch.profiler.record_function("bitnet_ao.test_range"):
            assert kernels_private_api.profiler_enabled()
    assert not kernels_private_api.profiler_enabled()
    assert "bitnet_ao.test_range" in {e.name for e in prof.events()}


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
    # No data of its own: why checkpoints must hold the master weight instead (tests/test_checkpoint_hooks.py).
    with pytest.raises(RuntimeError, match="data pointer"):
        t.untyped_storage().data_ptr()


def test_module_hook_wrapper_is_what_a_pickled_module_holds():
    hook = lambda *args: None  # noqa: E731
    module = torch.nn.Linear(2, 2)
    module.register_load_state_dict_pre_hook(hook)
    (wrapped,) = module._load_state_dict_pre_hooks.values()
    assert type(wrapped) is private_api.module_hook_wrapper and wrapped.hook is hook


def test_tree_map_only_maps_only_instances_of_the_class():
    out = private_api.tree_map_only(Tensor, lambda t: t + 1, {"a": [torch.zeros(1), 5], "b": (torch.ones(1),)})
    assert (
        out["a"][1] == 5 and torch.equal(out["a"][0], torch.ones(1)) and torch.equal(out["b"][0], torch.full((1,), 2.0))
    )


def test_is_mutable_op_is_true_for_in_place_and_out_ops_only():
    aten = torch.ops.aten
    assert private_api.is_mutable_op(aten.copy_.default) and private_api.is_mutable_op(aten.add_.Tensor)
    assert private_api.is_mutable_op(aten.add.out)
    assert not private_api.is_mutable_op(aten.add.Tensor) and not private_api.is_mutable_op(aten.detach.default)


def test_int_mm_is_exact_int32():
    if kernels_private_api.onednn_isa_below_vnni():
        pytest.skip("ONEDNN_MAX_CPU_ISA keeps oneDNN below VNNI: int_mm saturates there, and no route uses it for this")
    g = torch.Generator().manual_seed(0)
    a = random_int8(32, 64, generator=g)
    b = random_int8(64, 24, generator=g)
    out = kernels_private_api.int_mm(a, b)
    assert out.dtype == torch.int32 and torch.equal(out, (a.double() @ b.double()).to(torch.int32))


@pytest.mark.skipif(not kernels_private_api.onednn_int8_linear_available(), reason="no oneDNN int8 linear here")
def test_onednn_int8_linear_subtracts_the_zero_point_and_sums_exactly():
    g = torch.Generator().manual_seed(1)
    a_u8 = torch.randint(0, 256, (20, 48), dtype=torch.uint8, generator=g)
    w = torch.randint(-1, 2, (12, 48), dtype=torch.int8, generator=g)
    out = kernels_private_api.onednn_int8_linear(a_u8, 128, kernels_private_api.onednn_int8_prepack(w), 12)
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
    assert kernels_private_api.triton_interpreting() == (os.environ.get("TRITON_INTERPRET") == "1")
    ast_source, gpu_target = kernels_private_api.triton_compiler()
    assert ast_source.__name__ == "ASTSource" and gpu_target.__name__ == "GPUTarget"
    assert gpu_target("cuda", 90, 32).arch == 90


def test_check_raises_its_message_and_traces_without_a_graph_break():
    kernels_private_api.check(True, lambda: "never built")
    with pytest.raises(RuntimeError, match="rows must be positive"):
        kernels_private_api.check(False, lambda: "rows must be positive")

    @torch.compile(backend="eager", fullgraph=True, dynamic=True)
    def double(x: Tensor) -> Tensor:
        kernels_private_api.check(x.shape[0] > 0, lambda: "rows must be positive")
        return x * 2

    assert torch.equal(double(torch.ones(3)), torch.full((3,), 2.0))


def test_a_function_with_its_own_code_object_has_its_own_dynamo_cache():
    def body(x: Tensor, k: int) -> Tensor:
        return x * k

    def compiled(fn):
        return torch.compile(fn, backend="eager", fullgraph=True, dynamic=False)

    copy = kernels_private_api.with_own_code_object(body)
    assert copy.__code__ is not body.__code__ and copy.__name__ == "body" and copy(3, 2) == 6
    with torch._dynamo.config.patch(recompile_limit=1):
        compiled(body)(torch.ones(2), 2)
        compiled(copy)(torch.ones(2), 3)  # a second variant, on the copy's own cache: no recompile of body's
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
            compiled(body)(torch.ones(2), 3)  # the same variant on body's cache is past the limit


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or "flags" not in cpu_build.cpuinfo(),
    reason="needs an x86 CPU and its /proc/cpuinfo flags",
)
def test_cpu_capabilities_match_the_cpu_flags():
    flags = set(cpu_build.cpuinfo()["flags"].split())
    limited = kernels_private_api.onednn_isa_below_vnni()  # an emulation keeps oneDNN below the CPU's flags
    assert kernels_private_api.cpu_has_int8_dot_product() == (bool({"avx512_vnni", "amx_tile"} & flags) and not limited)
    assert kernels_private_api.cpu_has_native_bf16() == bool({"avx512_bf16", "amx_tile"} & flags)


def _definitions(path: Path) -> dict[str, ast.AST]:
    """The top-level functions and assignments of a module, by name."""
    found: dict[str, ast.AST] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    found[target.id] = node
    return found


def test_each_wrapper_lives_in_one_module_and_names_its_version():
    package = _definitions(ROOT / "bitnet_ao" / "private_api.py")
    kernel = _definitions(ROOT / "kernels" / "private_api.py")
    assert set(package) & set(kernel) == {"CHECKED_ON"}, "a wrapper defined in both private_api modules"
    unversioned = [
        name
        for name, node in {**package, **kernel}.items()
        if isinstance(node, ast.FunctionDef)
        and not any(v in (ast.get_docstring(node) or "") for v in ("torch 2.", "Triton 3.", "Python 3."))
    ]
    assert not unversioned, f"wrappers whose docstring does not say the version they were checked on: {unversioned}"


def _private_uses(path: Path) -> list[str]:
    """Private torch/Triton names a module reaches: ``torch._x`` / ``triton.x._y`` attributes, imports of private
    modules, and function internals (``__code__``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            chain, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if node.attr == "__code__" or (
                isinstance(inner, ast.Name)
                and inner.id in ("torch", "triton", "tl")
                and any(part.startswith("_") and not part.endswith("__") for part in chain)
            ):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                parts = module.split(".")
                if parts[0] in ("torch", "triton") and any(p.startswith("_") for p in parts):
                    found.append(f"line {node.lineno}: import {module}")
    return found


def test_kernels_reach_private_apis_only_through_their_private_api_module():
    """The one door: a kernel module that needs a torch or Triton internal adds a wrapper to kernels/private_api.py
    (with the version it was checked on and a test here) instead of calling it directly."""
    uses = {
        path.name: found
        for path in sorted((ROOT / "kernels").glob("*.py"))
        if path.name != "private_api.py" and (found := _private_uses(path))
    }
    assert not uses, f"private torch/Triton APIs used outside kernels/private_api.py: {uses}"
    assert _private_uses(ROOT / "kernels" / "private_api.py"), "the checker must see the wrappers' own uses"


def test_torchtitan_sharding_config_is_the_one_the_config_gave():
    pytest.importorskip("torchtitan", reason="torchtitan is not installed")
    from torchtitan.models.common.decoder_sharding import colwise_config
    from torchtitan.models.common.linear import Linear

    sharding = colwise_config()
    assert private_api.torchtitan_sharding_config(Linear.Config(in_features=4, out_features=2).build()) is None
    built = Linear.Config(in_features=4, out_features=2, sharding_config=sharding).build()
    assert private_api.torchtitan_sharding_config(built) is sharding
