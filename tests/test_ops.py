"""The ``bitnet_ao`` custom ops against spec §1 (tests/spec_reference.py), on the torch backend (CPU tensors).

Every op runs twice: eagerly (small tensors) and through the inductor-compiled path that large tensors take
(``COMPILE_MIN_NUMEL`` forced to 0), and both must give the spec's int8 values bit for bit.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bitnet_ao import kernels
from bitnet_ao.kernels import reference, torch_backend
from tests.conftest import random_int8
from tests.spec_reference import act_quant, binary_weight, ternary_weight

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=["eager", "compiled"])
def cpu_path(request, monkeypatch):
    monkeypatch.setattr(torch_backend, "COMPILE_MIN_NUMEL", 0 if request.param == "compiled" else 1 << 62)
    return request.param


def _rows_with_ties(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows whose absmax is 127 so that x / s hits exact .5 ties: rounding must go half-to-even."""
    x = torch.randn(m, k) * 40
    x[:, 0] = 127.0
    x[:, 1:6] = torch.tensor([0.5, 1.5, 2.5, -0.5, -3.5])
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (13, 33), (64, 96)])
def test_quantize_rowwise_matches_spec(cpu_path, dtype, shape):
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype) * 3
    x_q, s = kernels.quantize_rowwise(x, reference.ACTIVATION_EPS)
    q_ref, s_ref = act_quant(x)
    assert x_q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(x_q, q_ref.to(torch.int8))
    assert torch.equal(s, s_ref)


def test_quantize_rowwise_rounds_half_to_even(cpu_path):
    x = _rows_with_ties(3, 40, torch.float32)
    x_q, _ = kernels.quantize_rowwise(x, reference.ACTIVATION_EPS)
    assert x_q[0, 1:6].tolist() == [0, 2, 2, 0, -4]


def test_quantize_rowwise_zero_and_strided_rows(cpu_path):
    x = torch.randn(40, 24)[::2, ::3]  # non-contiguous view
    x[1] = 0
    x_q, s = kernels.quantize_rowwise(x, reference.ACTIVATION_EPS)
    q_ref, s_ref = act_quant(x)
    assert torch.equal(x_q, q_ref.to(torch.int8)) and torch.equal(s, s_ref)
    assert torch.equal(x_q[1], torch.zeros_like(x_q[1]))


def test_quantize_rowwise_empty():
    x_q, s = kernels.quantize_rowwise(torch.empty(0, 16), reference.ACTIVATION_EPS)
    assert x_q.shape == (0, 16) and s.shape == (0,)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_colwise_scaled_matches_spec(cpu_path, dtype):
    torch.manual_seed(1)
    g = (torch.randn(37, 20) * 1e-3).to(dtype)
    s_x = torch.rand(37) * 0.1
    g_q, s = kernels.quantize_colwise_scaled(g, s_x, reference.GRADIENT_EPS)
    # Quantizing the columns of g * s_x is quantizing the rows of its transpose.
    q_ref, s_ref = act_quant((g.float() * s_x[:, None]).t(), eps=reference.GRADIENT_EPS)
    assert torch.equal(g_q, q_ref.t().to(torch.int8))
    assert torch.equal(s, s_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_grad_output_is_both_quantizations_of_the_spec(cpu_path, dtype):
    """The one-pass op of the INT8 backward: per-row int8 of g and per-column int8 of g * s_x, as the spec's
    quantizer gives them (tests/spec_reference.py)."""
    torch.manual_seed(2)
    g = (torch.randn(37, 20) * 1e-3).to(dtype)
    s_x = torch.rand(37) * 0.1
    g_q, s, g_q_cols, s_cols = kernels.quantize_grad_output(g, s_x, reference.GRADIENT_EPS)
    q_ref, s_ref = act_quant(g.float(), eps=reference.GRADIENT_EPS)
    assert torch.equal(g_q, q_ref.to(torch.int8)) and torch.equal(s, s_ref)
    q_ref, s_ref = act_quant((g.float() * s_x[:, None]).t(), eps=reference.GRADIENT_EPS)
    assert torch.equal(g_q_cols, q_ref.t().to(torch.int8)) and torch.equal(s_cols, s_ref)


def test_quantize_colwise_scaled_empty_batch():
    g_q, s = kernels.quantize_colwise_scaled(torch.empty(0, 5), torch.empty(0), reference.GRADIENT_EPS)
    assert g_q.shape == (0, 5) and s.shape == (5,) and torch.isfinite(s).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose", [False, True])
def test_ternarize_matches_spec(cpu_path, dtype, transpose):
    torch.manual_seed(2)
    w = (torch.randn(48, 33) * 0.02).to(dtype)
    stats = kernels.weight_stats(w)
    s_w, _ = reference.weight_scales_from_stats(stats, w.numel())
    q_ref, s_ref = ternary_weight(w)
    assert s_w.dtype == torch.float32 and torch.equal(s_w, s_ref)
    w_q = kernels.ternarize(w, s_w, transpose)
    expected = q_ref.to(torch.int8)
    assert torch.equal(w_q, expected.t() if transpose else expected)
    assert not transpose or w_q.is_contiguous()


@pytest.mark.parametrize("transpose", [False, True])
def test_binarize_matches_spec(cpu_path, transpose):
    torch.manual_seed(3)
    w = torch.randn(40, 24) * 0.02 + 0.01
    w[0, 0] = w.double().mean().float()  # exactly the centre: must map to +1
    s_w, alpha = reference.weight_scales_from_stats(kernels.weight_stats(w), w.numel())
    q_ref, s_ref = binary_weight(w)
    assert torch.equal(s_w, s_ref)
    w_q = kernels.binarize(w, alpha, transpose)
    expected = q_ref.to(torch.int8)
    assert torch.equal(w_q, expected.t() if transpose else expected)
    assert set(w_q.unique().tolist()) == {-1, 1}


def test_weight_scale_all_zero_weight_gives_zeros():
    w = torch.zeros(8, 8)
    s_w, _ = reference.weight_scales_from_stats(kernels.weight_stats(w), w.numel())
    assert torch.equal(kernels.ternarize(w, s_w, False), torch.zeros(8, 8, dtype=torch.int8))


@pytest.mark.parametrize("layout", ["NT", "NN", "TN"])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_scaled_int8_mm_layouts(cpu_path, layout, out_dtype):
    torch.manual_seed(4)
    m, k, n = 19, 45, 23
    a = random_int8(m, k) if layout != "TN" else random_int8(k, m).t()
    b = random_int8(n, k).t() if layout == "NT" else random_int8(k, n)
    row, col, scale = torch.rand(m), torch.rand(n), torch.tensor(0.37)
    bias = torch.randn(n).to(out_dtype)
    out = kernels.scaled_int8_mm(a, b, row, col, scale, bias, out_dtype)
    exact = a.double() @ b.double()  # small enough to be exact in float64
    expected = (exact * row.double()[:, None] * col.double()[None, :] * 0.37).to(out_dtype) + bias
    assert out.dtype == out_dtype
    # One rounding step of out_dtype at the output's magnitude (bias addition can cancel to near zero).
    atol = torch.finfo(out_dtype).eps * expected.float().abs().max().item()
    torch.testing.assert_close(out.float(), expected.float(), rtol=torch.finfo(out_dtype).eps, atol=atol)


def test_scaled_int8_mm_accumulates_exactly_in_int32():
    # Large K with extreme values: any accumulation narrower than int32 (or in float) would be off.
    k = 4096
    a = torch.full((2, k), -128, dtype=torch.int8)
    b = torch.full((k, 3), -128, dtype=torch.int8)
    b[0, 0] = 127
    out = kernels.scaled_int8_mm(a, b, None, None, None, None, torch.float64)
    exact = (a.long() @ b.long()).double()
    assert torch.equal(out, exact)


def test_scaled_int8_mm_empty_and_single_row():
    b = random_int8(8, 5)
    assert kernels.scaled_int8_mm(random_int8(0, 8), b, torch.rand(0), None, None, None, torch.float32).shape == (0, 5)
    a = random_int8(1, 8)
    out = kernels.scaled_int8_mm(a, b, None, None, None, None, torch.float32)
    assert torch.equal(out, (a.long() @ b.long()).float())


@pytest.mark.parametrize("k", [5, 32, 33])
@pytest.mark.parametrize("transpose_b", [True, False])
@pytest.mark.parametrize("m", [6, 30])  # the decode kernel (M <= 16) and the unpacking path
@pytest.mark.parametrize("bits", [2, 1])
def test_scaled_int8_mm_packed_matches_unpacked(k, transpose_b, m, bits):
    torch.manual_seed(5)
    n = 11
    w = random_int8(n, k, low=-1, high=2) if bits == 2 else random_int8(n, k, low=0, high=2) * 2 - 1
    a = random_int8(m, k if transpose_b else n)
    packed = reference.pack_i2_in_i8(w) if bits == 2 else reference.pack_i1_in_i8(w)
    out = kernels.scaled_int8_mm_packed(a, packed, k, transpose_b, None, None, None, None, torch.float32, bits)
    b = w.t() if transpose_b else w
    assert torch.equal(out, (a.long() @ b.long()).float())


def test_ops_reject_bad_input():
    with pytest.raises(RuntimeError, match="must be int8"):
        kernels.scaled_int8_mm(torch.zeros(2, 3), random_int8(3, 2), None, None, None, None, torch.float32)
    with pytest.raises(RuntimeError, match="inner dimensions"):
        kernels.scaled_int8_mm(random_int8(2, 3), random_int8(4, 2), None, None, None, None, torch.float32)
    with pytest.raises(RuntimeError, match="floating-point"):
        kernels.quantize_rowwise(random_int8(2, 3), 1e-5)
    with pytest.raises(RuntimeError, match="2-D"):
        kernels.ternarize(torch.randn(2, 3, 4), torch.tensor(1.0), False)


def _opcheck_samples() -> dict[str, tuple]:
    """Sample arguments for ``torch.library.opcheck``, one entry per op of ``kernels.OPS`` (by its name)."""
    torch.manual_seed(6)
    x, w, s = torch.randn(9, 12), torch.randn(10, 12), torch.tensor(0.5)
    a, b = random_int8(9, 12), random_int8(12, 10)
    packed = reference.pack_i2_in_i8(random_int8(10, 12, low=-1, high=2))
    return {
        "quantize_rowwise": (x, 1e-5),
        "quantize_colwise_scaled": (x, torch.rand(9), 1e-30),
        "quantize_grad_output": (x, torch.rand(9), 1e-30),
        "weight_stats": (w,),
        "ternarize": (w, s, True),
        "binarize": (w, s, False),
        "scaled_int8_mm": (a, b, torch.rand(9), torch.rand(10), s, torch.randn(10), torch.bfloat16),
        "scaled_int8_mm_packed": (a, packed, 12, True, torch.rand(9), None, s, None, torch.float32),
        "packed_linear": (x.bfloat16(), torch.rand(12) + 0.5, 1e-6, packed, 12, 2, s, torch.randn(10), torch.bfloat16),
        "rms_norm_quantize_rowwise": (x.bfloat16(), torch.rand(12) + 0.5, 1e-6, torch.bfloat16, 1e-5),
        "rms_norm_backward": (torch.randn(9, 12), x, torch.rand(12) + 0.5, torch.rand(9, 1) + 0.5),
        "pack_operand": (b, False),
        "ternarize_packed": (w, s),
        "scaled_int8_mm_prepacked": (a, _packed_operand(b), 10, torch.rand(9), None, s, None, torch.float32, False),
    }


#: The ops that exist only where the matmul takes a packed operand (``kernels.prepacks_operand``: AVX-512 VNNI).
PREPACKED_OPS = ("pack_operand", "ternarize_packed", "scaled_int8_mm_prepacked")


def _prepacks() -> bool:
    return kernels.prepacks_operand(torch.empty(0, dtype=torch.int8), b_ternary=False)


def _packed_operand(b: torch.Tensor) -> torch.Tensor:
    """``b`` packed where this machine packs, else bytes of the right size (the ops' samples are then skipped)."""
    if _prepacks():
        return kernels.pack_operand(b, False)
    k, n = b.shape
    return torch.zeros(-(-k // 4) * 4 * -(-n // 64) * 64, dtype=torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ternarize_packed_is_the_ternary_values_packed(dtype):
    """One pass over the master weight gives the bytes of ``pack_operand`` of the spec's ternary values and of their
    transpose, on shapes past a 64-row panel, a 4-row group and a 4-value group along K; and the forward's product
    through them is the spec's."""
    if not _prepacks():
        pytest.skip("this machine's matmul takes no packed operand (no AVX-512 VNNI)")
    g = torch.Generator().manual_seed(5)
    for n, k in ((1, 1), (3, 5), (65, 130), (130, 67), (257, 9)):
        w = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
        values, scale = ternary_weight(w)  # the spec's W_q and scale, independent of the kernels
        values = values.to(torch.int8)
        gi, fwd = kernels.ternarize_packed(w, scale)
        assert torch.equal(gi, kernels.pack_operand(values, True)), (n, k)
        assert torch.equal(fwd, kernels.pack_operand(values.t(), True)), (n, k)
        a = random_int8(7, k, generator=g)
        out = kernels.scaled_int8_mm_prepacked(a, fwd, n, None, None, None, None, torch.float32, True)
        assert torch.equal(out, (a.double() @ values.double().t()).float()), (n, k)


@pytest.mark.parametrize("ternary", [True, False], ids=["ternary", "full-range"])
def test_prepacked_matmul_is_the_exact_product(cpu_route, ternary):
    """``scaled_int8_mm_prepacked`` of ``pack_operand(b)``: the float64 product, scaled, on shapes past a 64-column
    panel and a 4-row group, b in both layouts; where the route packs nothing, ``pack_operand`` says so."""
    g = torch.Generator().manual_seed(3)
    b = random_int8(70, 67, low=-1, high=2, generator=g) if ternary else random_int8(70, 67, generator=g)
    if not kernels.prepacks_operand(b, ternary):
        with pytest.raises(RuntimeError, match="takes no packed operand"):
            kernels.pack_operand(b, ternary)
        return
    for m, b_layout in ((1, b), (13, b.t().contiguous().t()), (40, b)):
        a = random_int8(m, 70, generator=g)
        row, scale = torch.rand(m, generator=g), torch.rand(1, generator=g)
        out = kernels.scaled_int8_mm_prepacked(
            a, kernels.pack_operand(b_layout, ternary), 67, row, None, scale, None, torch.float32, ternary
        )
        expected = ((a.double() @ b.double()).float() * row[:, None]) * scale  # exact sums below 2**24
        assert torch.equal(out, expected), (m, b_layout.stride())
        raw = kernels.scaled_int8_mm_prepacked(
            a, kernels.pack_operand(b_layout, ternary), 67, row.double(), None, None, None, torch.float64, ternary
        )  # no fused epilogue for float64: the int32 sums, then the backend's epilogue
        assert torch.equal(raw, (a.double() @ b.double()) * row.double()[:, None]), m


@pytest.mark.parametrize("m", [1, 40])  # the fused C call and the composed path
@pytest.mark.parametrize("norm", [False, True])
def test_packed_linear_is_quantize_then_packed_matmul(m, norm):
    """The inference op against its definition: (RMSNorm +) row-wise quantization, then the packed matmul; and
    run_packed_linear (no dispatcher in eager) gives the same bits while a dispatch mode still sees the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(8)
    x, gain = torch.randn(m, 37, dtype=torch.bfloat16), torch.rand(37) + 0.5
    packed = reference.pack_i2_in_i8(random_int8(20, 37, low=-1, high=2))
    s, bias = torch.tensor(0.03), torch.randn(20, dtype=torch.bfloat16)
    if norm:
        x_q, row, _ = reference.rms_norm_quantize_rowwise(x, gain, 1e-5, torch.bfloat16, reference.ACTIVATION_EPS)
    else:
        x_q, row = reference.quantize_rowwise(x, reference.ACTIVATION_EPS)
    expected = reference.scaled_int8_mm_packed(x_q, packed, 37, True, row, None, s, bias, torch.bfloat16)
    args = (x, gain if norm else None, 1e-5, packed, 37, 2, s, bias, torch.bfloat16)
    assert torch.equal(kernels.packed_linear(*args), expected)
    assert torch.equal(kernels.run_packed_linear(*args), expected)

    class Seen(TorchDispatchMode):
        ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    with Seen() as mode:
        kernels.run_packed_linear(*args)
    assert torch.ops.bitnet_ao.packed_linear.default in mode.ops


def test_every_op_has_an_opcheck_sample():
    """A newly registered op must come with sample arguments, or ``test_opcheck`` would silently skip it."""
    names = {op._opname for op in kernels.OPS}
    samples = _opcheck_samples()
    assert not names - samples.keys(), f"ops in kernels.OPS without an opcheck sample: {sorted(names - samples.keys())}"
    assert not samples.keys() - names, f"opcheck samples for ops not in kernels.OPS: {sorted(samples.keys() - names)}"


@pytest.mark.parametrize("op", kernels.OPS, ids=lambda op: op._opname)
def test_opcheck(op):
    samples = _opcheck_samples()
    if op._opname not in samples:
        pytest.fail(f"no opcheck sample for {op._name}: add one to _opcheck_samples")
    if op._opname in PREPACKED_OPS and not _prepacks():
        pytest.skip("this machine's matmul takes no packed operand (no AVX-512 VNNI)")
    torch.library.opcheck(op, samples[op._opname])


def test_eager_calls_run_the_implementation_and_anything_that_watches_gets_the_op(monkeypatch):
    """``kernels.<op>`` in eager mode on plain tensors skips the dispatcher (~30 µs a call) and gives the op's
    results; a dispatch mode, a meta tensor or an input that needs a gradient still goes through the op, and a
    profile still names the op (tests/test_private_api.py: which tensors count as plain)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    def through_the_op(*args, **kwargs):
        raise AssertionError("went through the op")

    for name, args in _opcheck_samples().items():
        if name in PREPACKED_OPS and not _prepacks():
            continue
        direct, dispatched = getattr(kernels, name), getattr(torch.ops.bitnet_ao, name)
        for got, expected in zip(_as_tuple(direct(*args)), _as_tuple(dispatched(*args)), strict=True):
            assert torch.equal(got, expected), name
        monkeypatch.setattr(direct, "op", through_the_op)
        direct(*args)
        with Watch(), pytest.raises(AssertionError, match="went through the op"):
            direct(*args)
        i = next((i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        if i is not None:  # an op with a floating-point input
            needs_grad = (*args[:i], args[i].detach().requires_grad_(), *args[i + 1 :])
            with pytest.raises(AssertionError, match="went through the op"):
                direct(*needs_grad)
        meta = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)  # shapes only: no data
        with pytest.raises(AssertionError, match="went through the op"):
            direct(*meta)
    monkeypatch.undo()

    def traced(x):
        return kernels.quantize_rowwise(x, 1e-5)[0]

    graph = torch.fx.symbolic_trace(traced).graph  # FX proxies are no tensors: the op records itself
    assert [n.target for n in graph.nodes if n.op == "call_function"][0] is torch.ops.bitnet_ao.quantize_rowwise.default
    x = torch.randn(4, 8)
    with torch.profiler.profile() as prof:
        kernels.quantize_rowwise(x, 1e-5)
    assert "bitnet_ao::quantize_rowwise" in {e.name for e in prof.events()}


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def test_compiled_path_survives_more_variants_than_dynamos_recompile_limit(monkeypatch):
    """A training process meets many variants of one body (dtypes x eps x layouts); the compiled path must not hit
    dynamo's per-code-object recompile limit (8), which is a hard error under fullgraph."""
    monkeypatch.setattr(torch_backend, "COMPILE_MIN_NUMEL", 0)
    torch.manual_seed(7)
    x = torch.randn(6, 10)
    for dtype in DTYPES:
        for eps in (1e-5, 1e-7, 1e-30):
            x_q, s = kernels.quantize_rowwise(x.to(dtype), eps)
            q_ref, s_ref = act_quant(x.to(dtype), eps=eps)
            assert torch.equal(x_q, q_ref.to(torch.int8)) and torch.equal(s, s_ref)


_DUCK_SHAPED_REUSE = """
import torch
from bitnet_ao.kernels import reference, torch_backend
torch.manual_seed(0)
for k in [256] + ([704] + [256] * 6) * 3:  # the RMSNorm backward of a block: M == K, then M != K
    x, w, dy = torch.randn(256, k), torch.rand(k) + 0.5, torch.randn(256, k)
    _, rstd = reference.rms_norm(x, w, 1e-5)
    dx, dw = torch_backend.run_fused(reference.rms_norm_backward, 1 << 30, dy, x, w, rstd)
    ex, ew = reference.rms_norm_backward(dy, x, w, rstd)
    assert torch.allclose(dx, ex, atol=1e-4) and torch.allclose(dw, ew, atol=1e-3)
print("exact")
"""


@pytest.mark.slow
def test_compiled_body_is_not_reused_across_size_equality():
    """Regression (torch 2.13.0): inductor's FX graph cache served the graph compiled for M == K to the compile for
    M != K, which wrote out of bounds (heap corruption in float32 training); ``torch_backend.run_fused`` compiles
    without that cache. In a subprocess, since the failure kills the process."""
    out = subprocess.run([sys.executable, "-c", _DUCK_SHAPED_REUSE], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "exact" in out.stdout, out.stderr[-2000:]


def test_one_compiled_body_meets_every_training_and_inference_context(monkeypatch):
    """A fine-tuning process calls the compiled norm with inputs that do and do not require grad, gains that are
    trainable or frozen parameters of several widths, under grad mode, no_grad and inference_mode: more than the 8
    graphs dynamo keeps per code object if each were specialized (a fullgraph compile then fails). Every context
    gives the same bits, and the eager body's numbers up to rounding."""
    monkeypatch.setattr(torch_backend, "COMPILE_MIN_NUMEL", 0)
    contexts = (torch.enable_grad, torch.no_grad, torch.inference_mode)
    for width in (48, 80, 112):
        generator = torch.Generator().manual_seed(width)
        x0, w0 = torch.randn(64, width, generator=generator), torch.rand(width, generator=generator) + 0.5
        expected = torch_backend.rms_norm(x0, w0, 1e-5)
        for got, want in zip(expected, reference.rms_norm(x0, w0, 1e-5), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        for trainable in (True, False):
            weight = torch.nn.Parameter(w0.clone(), requires_grad=trainable)
            for requires_grad in (True, False):
                for context in contexts:
                    x = x0.clone().requires_grad_(requires_grad)
                    with context():
                        y, rstd = torch_backend.rms_norm(x, weight, 1e-5)
                    assert torch.equal(y, expected[0]) and torch.equal(rstd, expected[1]), (width, trainable, context)


def test_run_packed_linear_takes_any_output_dtype():
    """A decode-sized input whose output dtype the C code has no code for (float64) takes the composed path, as the
    op does, instead of the operator registered in C++ refusing it."""
    torch.manual_seed(9)
    x = torch.randn(1, 12, dtype=torch.bfloat16)
    packed = reference.pack_i2_in_i8(random_int8(10, 12, low=-1, high=2))
    s = torch.tensor(0.03)
    x_q, row = reference.quantize_rowwise(x, reference.ACTIVATION_EPS)
    expected = reference.scaled_int8_mm_packed(x_q, packed, 12, True, row, None, s, None, torch.float64)
    out = kernels.run_packed_linear(x, None, 1e-5, packed, 12, 2, s, None, torch.float64)
    assert out.dtype == torch.float64 and torch.equal(out, expected)
