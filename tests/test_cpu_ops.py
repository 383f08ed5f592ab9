"""The kernels registered in C++ (``kernels/cpu_ops.cpp``). ``torch.ops.bitnet_ao.packed_linear``'s CPU kernel gives
the spec's packed forward bit for bit (RMSNorm with torch's eager rstd, per-row int8, the exact product, the
epilogue) on decode-sized inputs (one C call) and larger ones (the ops composed) under every forced matmul route; a
packed model reaches it with no Python implementation on the way, in eager mode and from a ``torch.compile`` graph
whose C++ wrapper calls it (the generated code is checked); opcheck passes; bad input gets an error that names the
op. ``decode_attention`` is attention."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchao.quantization import quantize_

from bitnet_ao import bitnet_inference, bitnet_training, kernels
from bitnet_ao.kernels import cpu_gemv, cpu_ops, ops, reference, torch_backend
from tests.conftest import random_int8
from tests.spec_reference import act_quant, rms_norm_rstd


@pytest.fixture(autouse=True, scope="module")
def _built():
    if not cpu_ops.available():
        pytest.skip("no C++ compiler: the Python op serves instead")


@pytest.fixture
def no_python_implementation(monkeypatch):
    """The Python implementation of packed_linear, and the ctypes C call it makes, raise: whatever still runs is the
    C++ kernel."""

    def refuse(*args, **kwargs):
        raise AssertionError("the Python implementation of bitnet_ao::packed_linear ran")

    monkeypatch.setattr(ops, "_packed_linear", refuse)
    monkeypatch.setattr(torch_backend, "packed_linear", refuse)
    monkeypatch.setattr(cpu_gemv, "packed_linear", refuse)


def _spec(x, gain, w, scale, bias, out_dtype):
    """docs/numerics.md#forward written out: the norm in float32 rounded to x's dtype and then the output dtype (the
    linear's input under autocast), act_quant, the float64 product, ((acc * s_x) * s_w) rounded, + bias."""
    h = x.float()
    if gain is not None:
        h = (h * rms_norm_rstd(x, 1e-6) * gain).to(x.dtype).to(out_dtype)
    q, s = act_quant(h)
    y = ((q.double() @ w.double().t()).float() * s[:, None] * scale).to(out_dtype)
    return y + bias.to(out_dtype) if bias is not None else y


def test_the_cpu_kernel_is_cpp_with_no_python_autograd_kernel():
    """The CPU kernel is the library's, and no autograd kernel of the op (custom_op would register one in Python)
    stands between the dispatcher and it."""
    name = "bitnet_ao::packed_linear"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutogradCPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "normed"])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_the_one_c_call_is_the_spec_forward(dtype, norm, m, no_python_implementation):
    g = torch.Generator().manual_seed(m)
    k, n = 75, 33
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    w = random_int8(n, k, low=-1, high=2, generator=g)
    gain = torch.rand(k, generator=g) + 0.5 if norm else None
    scale, bias = torch.tensor(0.037), torch.randn(n, generator=g)
    for b in (bias, None):
        out = torch.ops.bitnet_ao.packed_linear(x, gain, 1e-6, reference.pack_weight(w, 2), k, 2, scale, b, dtype)
        assert out.dtype == dtype and torch.equal(out, _spec(x, gain, w, scale, b, dtype))


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "normed"])
def test_larger_inputs_compose_the_ops_on_every_route(norm, cpu_route):
    """Past the decode sizes (rows, or a dtype the C has no code for) the kernel composes the quantization and the
    packed matmul ops, which take the forced matmul route: still the spec's bits."""
    g = torch.Generator().manual_seed(2)
    k, n = 75, 33
    w = random_int8(n, k, low=-1, high=2, generator=g)
    gain = torch.rand(k, generator=g) + 0.5 if norm else None
    scale, bias = torch.tensor(0.037), torch.randn(n, generator=g)
    cases = [(cpu_gemv.MAX_M + 1, torch.bfloat16, torch.bfloat16), (2, torch.float32, torch.float64)]
    for m, dtype, out_dtype in cases:
        x = (torch.randn(m, k, generator=g) * 3).to(dtype)
        out = torch.ops.bitnet_ao.packed_linear(x, gain, 1e-6, reference.pack_weight(w, 2), k, 2, scale, bias,
                                                out_dtype)  # fmt: skip
        assert out.dtype == out_dtype and torch.equal(out, _spec(x, gain, w, scale, bias, out_dtype)), (m, out_dtype)


def _packed_model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.SiLU(), nn.Linear(96, 64, bias=False)).to(dtype)
    quantize_(model, bitnet_training())
    quantize_(model, bitnet_inference())
    return model


def test_a_packed_model_decodes_through_the_cpp_kernel_eager_and_compiled(
    monkeypatch, tmp_path, no_python_implementation
):
    """With the Python implementation refusing to run, a packed model still decodes: eager (run_packed_linear calls
    the op through the dispatcher) and compiled with inductor's C++ wrapper, whose generated code calls the op
    (``aoti_torch_call_dispatcher``); the same bits as the layers run one by one, under no_grad and
    inference_mode."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = _packed_model(torch.bfloat16)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            eager = model(x)
            assert torch.equal(eager, model[2](model[1](model[0](x))))
            torch._dynamo.reset()
            with inductor_config.patch(cpp_wrapper=True, fx_graph_cache=False):
                compiled, code = run_and_get_code(torch.compile(model, fullgraph=True), x)
        assert torch.equal(compiled, eager)
        assert 'aoti_torch_call_dispatcher("bitnet_ao::packed_linear"' in "\n".join(code)


def test_opcheck_on_the_cpp_kernel():
    g = torch.Generator().manual_seed(1)
    w = random_int8(10, 12, low=-1, high=2, generator=g)
    for m in (2, cpu_gemv.MAX_M + 1):  # the one C call, the composed ops
        args = (torch.randn(m, 12, dtype=torch.bfloat16), torch.rand(12) + 0.5, 1e-6, reference.pack_weight(w, 2),
                12, 2, torch.tensor(0.03), torch.randn(10), torch.bfloat16)  # fmt: skip
        torch.library.opcheck(torch.ops.bitnet_ao.packed_linear.default, args)


def test_bad_input_names_the_op_and_what_was_expected():
    packed = reference.pack_weight(torch.zeros(10, 12, dtype=torch.int8), 2)
    op = torch.ops.bitnet_ao.packed_linear
    with pytest.raises(RuntimeError, match=r"bitnet_ao.packed_linear: x must be \(M, 12\)"):
        op(torch.randn(2, 11), None, 1e-6, packed, 12, 2, torch.tensor(1.0), None, torch.float32)
    with pytest.raises(RuntimeError, match=r"bitnet_ao.packed_linear: b_packed must be int8 \(N, 3\)"):
        op(torch.randn(2, 12), None, 1e-6, packed[:, :2], 12, 2, torch.tensor(1.0), None, torch.float32)
    with pytest.raises(RuntimeError, match="bitnet_ao.packed_linear: bits must be 1 or 2"):
        op(torch.randn(2, 12), None, 1e-6, packed, 12, 3, torch.tensor(1.0), None, torch.float32)
    assert kernels.packed_linear.op is op.default


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length", [1, 17, 40])
def test_decode_attention_is_attention(dtype, length):
    """One query per head against a cache's first keys (strided views of the buffers, as the decode step passes
    them): softmax(q k^T / sqrt(d)) v of float64 SDPA, to the output dtype's rounding; a head size past one lane
    block. opcheck covers the fake implementation."""
    g = torch.Generator().manual_seed(length)
    q = torch.randn(2, 3, 1, 20, generator=g).to(dtype)
    keys, values = (torch.randn(2, 3, 48, 20, generator=g).to(dtype) for _ in range(2))
    k, v = keys[:, :, :length], values[:, :, :length]
    out = torch.ops.bitnet_ao.decode_attention(q, k, v, 20**-0.5)
    expected = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    torch.library.opcheck(torch.ops.bitnet_ao.decode_attention.default, (q, k, v, 20**-0.5))
    with pytest.raises(RuntimeError, match=r"decode_attention: q \(B, H, 1, D\) and keys / values"):
        torch.ops.bitnet_ao.decode_attention(q, k[:, :2], v, 1.0)
