"""The operator registered in C++ (``kernels/cpu_ops.cpp``): ``torch.ops.bitnet_ao.packed_linear_cpu`` gives the spec's
packed forward bit for bit (RMSNorm with torch's eager rstd, per-row int8, the exact product, the epilogue), a packed
model reaches it in eager mode and from a ``torch.compile`` graph whose C++ wrapper calls it with no Python (the
generated code is checked), its fake implementation passes ``opcheck``, and bad input gets an error that names it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchao.quantization import quantize_

from bitnet_ao import bitnet_inference, bitnet_training
from bitnet_ao.kernels import cpu_ops, reference
from tests.conftest import random_int8
from tests.spec_reference import act_quant


@pytest.fixture(autouse=True, scope="module")
def _built():
    if not cpu_ops.available():
        pytest.skip("no C++ compiler: the Python op serves instead")


def _spec(x, gain, w, scale, bias, out_dtype):
    """docs/numerics.md#forward written out: the norm in float32 rounded to x's dtype and then the output dtype (the
    linear's input under autocast), act_quant, the float64 product, ((acc * s_x) * s_w) rounded, + bias."""
    h = x.float()
    if gain is not None:
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = (h * rstd * gain).to(x.dtype).to(out_dtype)
    q, s = act_quant(h)
    y = ((q.double() @ w.double().t()).float() * s[:, None] * scale).to(out_dtype)
    return y + bias.to(out_dtype) if bias is not None else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "normed"])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_the_cpp_op_is_the_spec_forward(dtype, norm, m):
    g = torch.Generator().manual_seed(m)
    k, n = 75, 33
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    w = random_int8(n, k, low=-1, high=2, generator=g)
    gain = torch.rand(k, generator=g) + 0.5 if norm else None
    scale, bias = torch.tensor(0.037), torch.randn(n, generator=g)
    for b in (bias, None):
        out = torch.ops.bitnet_ao.packed_linear_cpu(x, gain, 1e-6, reference.pack_weight(w, 2), k, 2, scale, b, dtype)
        assert out.dtype == dtype and torch.equal(out, _spec(x, gain, w, scale, b, dtype))


def _packed_model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.SiLU(), nn.Linear(96, 64, bias=False)).to(dtype)
    quantize_(model, bitnet_training())
    quantize_(model, bitnet_inference())
    return model


def test_a_packed_model_decodes_through_the_cpp_op_eager_and_compiled(monkeypatch, tmp_path):
    """Eager: run_packed_linear takes the C++ op for a decode-sized input. Compiled with inductor's C++ wrapper: the
    generated code calls it through the dispatcher (``aoti_torch_call_dispatcher``), and the outputs are the same
    bits as eager."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = _packed_model(torch.bfloat16)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        eager = model(x)
        assert torch.equal(eager, model[2](model[1](model[0](x))))
        with torch.profiler.profile() as prof:
            model(x)
        assert any(e.name == "bitnet_ao::packed_linear_cpu" for e in prof.events())
        torch._dynamo.reset()
        with inductor_config.patch(cpp_wrapper=True, fx_graph_cache=False):
            compiled, code = run_and_get_code(torch.compile(model, fullgraph=True), x)
    assert torch.equal(compiled, eager)
    assert 'aoti_torch_call_dispatcher("bitnet_ao::packed_linear_cpu"' in "\n".join(code)


def test_opcheck_the_fake_implementation():
    g = torch.Generator().manual_seed(1)
    w = random_int8(10, 12, low=-1, high=2, generator=g)
    args = (torch.randn(2, 12, dtype=torch.bfloat16), torch.rand(12) + 0.5, 1e-6, reference.pack_weight(w, 2), 12, 2,
            torch.tensor(0.03), torch.randn(10), torch.bfloat16)  # fmt: skip
    torch.library.opcheck(torch.ops.bitnet_ao.packed_linear_cpu.default, args)


def test_bad_input_names_the_op_and_what_was_expected():
    packed = reference.pack_weight(torch.zeros(10, 12, dtype=torch.int8), 2)
    with pytest.raises(RuntimeError, match=r"packed_linear_cpu: x must be \(M, 12\)"):
        torch.ops.bitnet_ao.packed_linear_cpu(torch.randn(2, 11), None, 1e-6, packed, 12, 2, torch.tensor(1.0),
                                              None, torch.float32)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"packed_linear_cpu: b_packed must be int8 \(N, 3\)"):
        torch.ops.bitnet_ao.packed_linear_cpu(torch.randn(2, 12), None, 1e-6, packed[:, :2], 12, 2,
                                              torch.tensor(1.0), None, torch.float32)  # fmt: skip
    with pytest.raises(RuntimeError, match="must be float32, bfloat16 or float16"):
        torch.ops.bitnet_ao.packed_linear_cpu(torch.randn(2, 12), None, 1e-6, packed, 12, 2, torch.tensor(1.0), None,
                                              torch.float64)  # fmt: skip


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
