"""The Triton kernels against ``kernels/reference.py``: int8 values and int32 accumulations bit for bit.

With a GPU the compiled kernels run on CUDA tensors; without one, ``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` before ``bitnet_ao`` is imported and the same kernels run in Triton's interpreter on CPU
tensors. Shapes are small and deliberately not multiples of any block size.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import types

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (optional extra `bitnet_ao[triton]`)")

from bitnet_ao import kernels  # noqa: E402
from bitnet_ao.kernels import reference, triton_backend, triton_common, triton_mm, triton_quant  # noqa: E402
from tests.conftest import random_int8  # noqa: E402

pytestmark = pytest.mark.triton

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and not triton_common.INTERPRET:
    pytest.skip(
        "no GPU and TRITON_INTERPRET=1 was not set before bitnet_ao.kernels was imported", allow_module_level=True
    )

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ref(fn, *args):
    """Run a reference function on CPU (its int64 matmul has no CUDA kernel) and bring tensors back."""
    out = fn(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    if isinstance(out, tuple):
        return tuple(o.to(DEVICE) for o in out)
    return out.to(DEVICE)


def _layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same kind of values as ``x`` in three memory layouts: contiguous, transposed view, column-strided."""
    m, k = x.shape
    wide = torch.randn(m, 2 * k, device=x.device).to(x.dtype)
    return {"contiguous": x, "transposed": x.t().contiguous().t(), "strided": wide[:, ::2]}


def _randn(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 3.0) -> torch.Tensor:
    return (torch.randn(shape, device=DEVICE) * scale).to(dtype)


# --- registration ------------------------------------------------------------------------------------------


def test_triton_is_the_cuda_backend():
    assert kernels.backend_for(types.SimpleNamespace(device=torch.device("cuda"))) is triton_backend
    cpu_tensor = torch.zeros(1)
    with kernels.use_backend("triton"):
        assert kernels.backend_for(cpu_tensor) is triton_backend
    for name in ("quantize_rowwise", "quantize_colwise_scaled", "quantize_grad_output", "weight_stats", "ternarize",
                 "binarize", "scaled_int8_mm", "scaled_int8_mm_packed", "right_operand_k_contiguous",
                 "right_operand_either_layout", "rms_norm",
                 "rms_norm_quantize_rowwise", "rms_norm_backward"):  # fmt: skip
        assert callable(getattr(triton_backend, name)), name


def test_ops_route_through_triton(monkeypatch):
    calls = []
    original = triton_backend.quantize_rowwise
    monkeypatch.setattr(triton_backend, "quantize_rowwise", lambda *a: calls.append(1) or original(*a))
    x = _randn(3, 10)
    with kernels.use_backend("triton"):
        x_q, _ = kernels.quantize_rowwise(x, reference.ACTIVATION_EPS)
    assert calls and torch.equal(x_q, _ref(reference.quantize_rowwise, x, reference.ACTIVATION_EPS)[0])


def test_cpu_tensors_without_interpreter_fail_clearly(monkeypatch):
    monkeypatch.setattr(triton_common, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_common.check_tensors("quantize_rowwise", torch.zeros(2, 2))


# --- per-row int8 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_quantize_rowwise(dtype, layout):
    torch.manual_seed(0)
    x = _layouts(_randn(37, 53, dtype=dtype))[layout]
    x_q, s = triton_quant.quantize_rowwise(x, reference.ACTIVATION_EPS)
    q_ref, s_ref = _ref(reference.quantize_rowwise, x, reference.ACTIVATION_EPS)
    assert x_q.dtype == torch.int8 and x_q.is_contiguous() and s.dtype == torch.float32
    assert torch.equal(x_q, q_ref)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1, 9), (0, 9), (5, 1), (70, 67)])
def test_quantize_rowwise_edge_shapes(shape):
    x = _randn(*shape)
    x_q, s = triton_quant.quantize_rowwise(x, reference.GRADIENT_EPS)
    q_ref, s_ref = _ref(reference.quantize_rowwise, x, reference.GRADIENT_EPS)
    assert x_q.shape == shape and s.shape == (shape[0],)
    assert torch.equal(x_q, q_ref) and torch.equal(s, s_ref)


def test_quantize_rowwise_long_rows_two_passes(monkeypatch):
    """Rows longer than ONE_PASS_MAX_K are read in chunks; shrink the limits to reach that path at test size."""
    monkeypatch.setattr(triton_quant, "ONE_PASS_MAX_K", 16)
    monkeypatch.setattr(triton_quant, "TILE_ELEMS", 16)
    x = _randn(6, 61)
    x[2, 45] = 50.0  # the absmax in the last chunk must still set the scale
    x_q, s = triton_quant.quantize_rowwise(x, reference.ACTIVATION_EPS)
    q_ref, s_ref = _ref(reference.quantize_rowwise, x, reference.ACTIVATION_EPS)
    assert torch.equal(x_q, q_ref) and torch.equal(s, s_ref)


def test_quantize_rowwise_rounds_half_to_even():
    # absmax 127 makes the scale exactly 1, so these values are exact .5 ties after scaling.
    ties = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5]
    x = torch.tensor([[127.0, *ties]], device=DEVICE)
    x_q, s = triton_quant.quantize_rowwise(x, reference.ACTIVATION_EPS)
    assert s.item() == 1.0
    assert x_q[0, 1:].tolist() == [0, 2, 2, 0, -2, -2, 126, -126]
    assert torch.equal(x_q, _ref(reference.quantize_rowwise, x, reference.ACTIVATION_EPS)[0])


def test_quantize_rowwise_zero_rows_use_eps():
    x = torch.zeros(3, 8, device=DEVICE)
    x_q, s = triton_quant.quantize_rowwise(x, reference.ACTIVATION_EPS)
    assert torch.equal(x_q, torch.zeros_like(x_q))
    torch.testing.assert_close(s, torch.full((3,), reference.ACTIVATION_EPS / 127, device=DEVICE))


# --- per-column int8 of g * row_scale -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("tile", [None, 64], ids=["one-split", "token-split"])
def test_quantize_colwise_scaled(dtype, layout, tile, monkeypatch):
    if tile is not None:  # small tiles split the token dimension over several programs (stage 1 partials)
        monkeypatch.setattr(triton_quant, "TILE_ELEMS", tile)
    torch.manual_seed(1)
    g = _layouts(_randn(61, 19, dtype=dtype, scale=1e-3))[layout]
    row_scale = torch.rand(61, device=DEVICE) + 0.01
    g_q, s = triton_quant.quantize_colwise_scaled(g, row_scale, reference.GRADIENT_EPS)
    q_ref, s_ref = _ref(reference.quantize_colwise_scaled, g, row_scale, reference.GRADIENT_EPS)
    assert g_q.shape == (61, 19) and g_q.is_contiguous()
    assert torch.equal(g_q, q_ref)
    assert torch.equal(s, s_ref)


@pytest.mark.parametrize("shape", [(1, 7), (0, 7), (70, 1)])
def test_quantize_colwise_scaled_edge_shapes(shape):
    g = _randn(*shape)
    row_scale = torch.rand(shape[0], device=DEVICE)
    g_q, s = triton_quant.quantize_colwise_scaled(g, row_scale, reference.GRADIENT_EPS)
    q_ref, s_ref = _ref(reference.quantize_colwise_scaled, g, row_scale, reference.GRADIENT_EPS)
    assert torch.equal(g_q, q_ref) and torch.equal(s, s_ref)


def test_quantize_colwise_scaled_rounds_half_to_even():
    g = torch.tensor([[127.0, 1.0], [2.5, 1.0], [-0.5, 1.0], [3.5, 1.0]], device=DEVICE)
    row_scale = torch.tensor([1.0, 1.0, 1.0, 1.0], device=DEVICE)
    g_q, s = triton_quant.quantize_colwise_scaled(g, row_scale, reference.GRADIENT_EPS)
    assert s[0].item() == 1.0
    assert g_q[:, 0].tolist() == [127, 2, 0, 4]


def test_quantize_colwise_scaled_checks_row_scale():
    with pytest.raises(ValueError, match=r"row_scale must have shape \(4,\)"):
        triton_quant.quantize_colwise_scaled(_randn(4, 3), torch.ones(3, device=DEVICE), 1e-30)


# --- weight statistics and int8 weights -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_weight_stats(dtype, layout, monkeypatch):
    # Small tiles and chunks: many stage-1 partials, several stage-2 steps.
    monkeypatch.setattr(triton_quant, "TILE_ELEMS", 64)
    monkeypatch.setattr(triton_quant, "STATS_CHUNK", 4)
    w = _layouts(_randn(29, 43, dtype=dtype, scale=0.02) + 0.001)[layout]
    stats = triton_quant.weight_stats(w)
    assert stats.dtype == torch.float64 and stats.shape == (2,)
    torch.testing.assert_close(stats, _ref(reference.weight_stats, w), rtol=1e-12, atol=1e-12)
    assert torch.equal(stats, triton_quant.weight_stats(w)), "weight_stats must be deterministic"


@pytest.mark.parametrize("shape", [(0, 5), (7,), (2, 3, 5), ()])
def test_weight_stats_other_shapes(shape):
    w = _randn(*shape)
    torch.testing.assert_close(triton_quant.weight_stats(w), _ref(reference.weight_stats, w), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("transpose", [False, True])
def test_ternarize_and_binarize(dtype, layout, transpose):
    torch.manual_seed(2)
    w = _layouts(_randn(23, 37, dtype=dtype, scale=0.02))[layout]
    s_w, alpha = reference.weight_scales_from_stats(_ref(reference.weight_stats, w), w.numel())
    t = triton_quant.ternarize(w, s_w, transpose)
    b = triton_quant.binarize(w, alpha, transpose)
    assert t.is_contiguous() and b.is_contiguous()
    assert torch.equal(t, _ref(reference.ternarize, w, s_w, transpose))
    assert torch.equal(b, _ref(reference.binarize, w, alpha, transpose))
    assert set(t.unique().tolist()) == {-1, 0, 1} and set(b.unique().tolist()) == {-1, 1}


def test_ternarize_ties_eps_and_binarize_zero():
    w = torch.tensor([[0.5, -0.5, 1.5, -1.5, 0.49, 0.51, 0.0, -7.0]], device=DEVICE)
    one = torch.tensor(1.0, device=DEVICE)
    assert triton_quant.ternarize(w, one, False).tolist() == [[0, 0, 1, -1, 0, 1, 0, -1]]
    # A scale below 1e-5 is clamped to 1e-5, not divided by.
    tiny = torch.tensor(1e-9, device=DEVICE)
    assert torch.equal(triton_quant.ternarize(w * 1e-5, tiny, True), _ref(reference.ternarize, w * 1e-5, tiny, True))
    # w == centre maps to +1.
    assert triton_quant.binarize(w, torch.tensor(0.5, device=DEVICE), False).tolist() == [[1, -1, 1, -1, -1, 1, -1, -1]]


def test_int8_weight_of_empty_and_single_row():
    scale = torch.tensor(0.1, device=DEVICE)
    assert triton_quant.ternarize(_randn(0, 4), scale, True).shape == (4, 0)
    w = _randn(1, 11)
    assert torch.equal(triton_quant.ternarize(w, scale, True), _ref(reference.ternarize, w, scale, True))


# --- scaled int8 matmul -----------------------------------------------------------------------------------------


def _operands(layout: str, m: int, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``a (M, K)`` and ``b (K, N)`` as the three BitNet matmuls hold them (views, not copies)."""
    if layout == "NT":  # forward: x_q @ W_q.T, W_q stored (N, K)
        return random_int8(m, k, device=DEVICE), random_int8(n, k, low=-1, high=2, device=DEVICE).t()
    if layout == "NN":  # grad_input: g_q @ W_q, W_q stored (K, N) here
        return random_int8(m, k, device=DEVICE), random_int8(k, n, low=-1, high=2, device=DEVICE)
    # TN, grad_weight: g'_q.T @ x_q, g'_q stored (K, M)
    return random_int8(k, m, device=DEVICE).t(), random_int8(k, n, device=DEVICE)


@pytest.mark.parametrize("layout", ["NT", "NN", "TN"])
@pytest.mark.parametrize("mkn", [(37, 45, 29), (1, 70, 33), (70, 17, 66), (16, 16, 16)])
def test_scaled_int8_mm_int32_accumulation_is_exact(layout, mkn):
    """Unit scales and float32 output: the output is the int32 accumulation (|acc| < 2**24, exact in float32)."""
    torch.manual_seed(3)
    a, b = _operands(layout, *mkn)
    out = triton_mm.scaled_int8_mm(a, b, None, None, None, None, torch.float32)
    assert out.shape == (mkn[0], mkn[2]) and out.is_contiguous()
    assert torch.equal(out, _ref(reference.int8_mm, a, b).float())


def test_scaled_int8_mm_extreme_values():
    """-128 * -128 summed over K: no int8 overflow in the products, exact int32 sums."""
    a = torch.full((5, 70), -128, dtype=torch.int8, device=DEVICE)
    b = torch.full((70, 3), -128, dtype=torch.int8, device=DEVICE)
    out = triton_mm.scaled_int8_mm(a, b, None, None, None, None, torch.float32)
    assert (out == 70 * 128 * 128).all()


@pytest.mark.parametrize("layout", ["NT", "NN", "TN"])
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("epilogue", ["row+scale+bias", "row+col", "col+bias"])
def test_scaled_int8_mm_epilogue(layout, out_dtype, epilogue):
    torch.manual_seed(4)
    m, k, n = 21, 38, 27
    a, b = _operands(layout, m, k, n)
    row = torch.rand(m, device=DEVICE) * 0.1 if "row" in epilogue else None
    col = torch.rand(n, device=DEVICE) * 0.1 if "col" in epilogue else None
    scale = torch.tensor(0.37, device=DEVICE) if "scale" in epilogue else None
    bias = torch.randn(n, device=DEVICE).to(out_dtype) if "bias" in epilogue else None
    out = triton_mm.scaled_int8_mm(a, b, row, col, scale, bias, out_dtype)
    ref = _ref(reference.scaled_int8_mm, a, b, row, col, scale, bias, out_dtype)
    assert out.dtype == out_dtype
    _assert_epilogue_close(out, ref)


def _assert_epilogue_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """float32/float16: bit-exact (same float32 math, round-to-nearest casts). bfloat16: within two ulps of the
    largest output (the cast, then the bias add), because Triton 3.8's interpreter truncates float32 -> bfloat16
    where compiled kernels round to nearest even."""
    if out.dtype == torch.bfloat16 and not CUDA:
        two_ulps = 2**-6 * ref.float().abs().max().item()
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-6, atol=two_ulps)
    elif CUDA:
        torch.testing.assert_close(out, ref)
    else:
        assert torch.equal(out, ref)


def test_scaled_int8_mm_empty_m_does_not_launch(monkeypatch):
    monkeypatch.setattr(triton_mm, "_scaled_mm_kernel", None)  # any launch would now fail
    monkeypatch.setattr(triton_mm, "_scaled_mm_autotuned", None)
    out = triton_mm.scaled_int8_mm(
        random_int8(0, 8, device=DEVICE), random_int8(8, 5, device=DEVICE), None, None, None, None, torch.bfloat16
    )
    assert out.shape == (0, 5) and out.dtype == torch.bfloat16


def test_scaled_int8_mm_rejects_bad_epilogue():
    a, b = random_int8(4, 8, device=DEVICE), random_int8(8, 5, device=DEVICE)
    with pytest.raises(ValueError, match=r"col_scale must have shape \(5,\)"):
        triton_mm.scaled_int8_mm(a, b, None, torch.ones(4, device=DEVICE), None, None, torch.float32)
    with pytest.raises(ValueError, match="out_dtype"):
        triton_mm.scaled_int8_mm(a, b, None, None, None, None, torch.int32)


@pytest.mark.parametrize("transpose_b", [True, False], ids=["NT", "NN"])
@pytest.mark.parametrize("k", [45, 30, 4, 1])
def test_scaled_int8_mm_packed(transpose_b, k):
    """2-bit packed B with k not a multiple of 4 (zero-padded bytes), values in {-2, -1, 0, 1}."""
    torch.manual_seed(5)
    n, m = 27, 19
    w = random_int8(n, k, low=-2, high=2, device=DEVICE)
    packed = _ref(reference.pack_i2_in_i8, w)
    a = random_int8(m, k, device=DEVICE) if transpose_b else random_int8(m, n, device=DEVICE)
    acc = triton_mm.scaled_int8_mm_packed(a, packed, k, transpose_b, None, None, None, None, torch.float32)
    acc_ref = _ref(reference.int8_mm, a, w.t() if transpose_b else w).float()
    assert torch.equal(acc, acc_ref)
    row = torch.rand(m, device=DEVICE)
    scale = torch.tensor(0.05, device=DEVICE)
    bias = torch.randn(n if transpose_b else k, device=DEVICE)
    out = triton_mm.scaled_int8_mm_packed(a, packed, k, transpose_b, row, None, scale, bias, torch.float16)
    ref = _ref(reference.scaled_int8_mm_packed, a, packed, k, transpose_b, row, None, scale, bias, torch.float16)
    _assert_epilogue_close(out, ref)


@pytest.mark.parametrize("transpose_b", [True, False], ids=["NT", "NN"])
def test_scaled_int8_mm_packed_binary(transpose_b):
    """1-bit packed (binary) B, k not a multiple of 8: re-packed to 2 bits, then the same kernel."""
    n, k, m = 21, 27, 5
    w = random_int8(n, k, low=0, high=2, device=DEVICE) * 2 - 1
    packed = _ref(reference.pack_i1_in_i8, w)
    a = random_int8(m, k, device=DEVICE) if transpose_b else random_int8(m, n, device=DEVICE)
    acc = triton_mm.scaled_int8_mm_packed(a, packed, k, transpose_b, None, None, None, None, torch.float32, 1)
    assert torch.equal(acc, _ref(reference.int8_mm, a, w.t() if transpose_b else w).float())


def test_packed_inference_linear_on_the_triton_backend():
    """quantize_(..., bitnet_inference()) then F.linear with every op on the Triton kernels: the torch backend's
    outputs, bit for bit (decode-sized M = 1 and a larger M, ternary and binary)."""
    from torchao.quantization import quantize_

    from bitnet_ao import bitnet_inference, bitnet_training

    for kind in ("ternary", "binary"):
        torch.manual_seed(0)
        linear = torch.nn.Linear(37, 23).to(DEVICE)
        quantize_(linear, bitnet_training(weights=kind))
        quantize_(linear, bitnet_inference())
        for m in (1, 20):
            x = torch.randn(m, 37, device=DEVICE)
            with torch.no_grad(), kernels.use_backend("triton"):
                out = linear(x)
            with torch.no_grad(), kernels.use_backend("torch"):
                expected = linear(x)
            assert torch.equal(out, expected), (kind, m)


def test_scaled_int8_mm_packed_strided_and_single_row():
    k, n = 22, 13
    w = random_int8(n, k, low=-1, high=2, device=DEVICE)
    padded = torch.zeros(n, 16, dtype=torch.int8, device=DEVICE)
    padded[:, : (k + 3) // 4] = _ref(reference.pack_i2_in_i8, w)
    packed = padded[:, : (k + 3) // 4]  # row stride 16, not ceil(k / 4)
    a = random_int8(1, 2 * k, device=DEVICE)[:, ::2]
    out = triton_mm.scaled_int8_mm_packed(a, packed, k, True, None, None, None, None, torch.float32)
    assert torch.equal(out, _ref(reference.int8_mm, a, w.t()).float())


def test_autotune_configs_fit_the_packed_kernel_and_prune_by_m():
    for c in triton_mm.AUTOTUNE_CONFIGS:
        # Packed B loads BLOCK_K / 4 (or BLOCK_N / 4) bytes per row; int8 dot needs K tiles of at least 32.
        assert c.kwargs["BLOCK_K"] % 64 == 0 and c.kwargs["BLOCK_N"] % 64 == 0
    small = triton_mm._prune_configs(triton_mm.AUTOTUNE_CONFIGS, {"M_BUCKET": 1})
    large = triton_mm._prune_configs(triton_mm.AUTOTUNE_CONFIGS, {"M_BUCKET": 8192})
    assert small and all(c.kwargs["BLOCK_M"] == 16 for c in small)
    assert large and all(c.kwargs["BLOCK_M"] >= 64 for c in large)


# --- the whole BitNet linear, forward and backward ---------------------------------------------------------------


def _forward_backward(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Output, input gradient and every parameter gradient of ``model(x).square().sum()``."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = model(x)
    y.float().square().sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("weights", ["ternary", "binary"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitnet_linear_forward_backward_through_triton(weights, dtype):
    """``quantize_(model, bitnet_training())``: the Triton path equals the torch path, forward and backward."""
    from torchao.quantization import quantize_

    from bitnet_ao import bitnet_training

    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(37, 29), torch.nn.GELU(), torch.nn.Linear(29, 13, bias=False))
    model = model.to(dtype)
    # The torch path always runs on CPU (on CUDA its small-shape fallback is an int64 matmul CUDA lacks).
    models = {"torch": copy.deepcopy(model), "triton": copy.deepcopy(model).to(DEVICE)}
    x = _randn(3, 7, 37, dtype=dtype)
    results = {}
    for backend, m in models.items():
        quantize_(m, bitnet_training(weights=weights))
        with kernels.use_backend(backend):
            results[backend] = [t.cpu() for t in _forward_backward(m, x.to(next(m.parameters()).device))]
    for name, g, e in zip(["output", "grad_input", "w0", "b0", "w1"], results["triton"], results["torch"], strict=True):
        if dtype == torch.bfloat16:
            scale = e.float().abs().max().item()
            torch.testing.assert_close(g.float(), e.float(), rtol=2**-6, atol=2**-6 * scale, msg=name)
        else:
            torch.testing.assert_close(g, e, msg=name)


# --- GPU lowering, checked without a GPU ---------------------------------------------------------------------------


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The interpreter checks the math, not the GPU lowering: compile every kernel to an sm_90 cubin (no GPU needed,
    Triton ships ptxas), in a subprocess because this session's kernels are interpreted."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "bitnet_ao.kernels.triton_aot_check", "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("sm_90")]
    assert len(lines) == 18, result.stdout
    # The int8 matmuls must reach the tensor cores (wgmma for the large tiles, mma.sync for the small-M ones).
    assert all("mma -" not in line for line in lines if "scaled_mm" in line), result.stdout
