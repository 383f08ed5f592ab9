"""The BitNet linear (forward + backward) against spec §1's fake-quant reference, and its behaviour as ``F.linear``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

from bitnet_ao import BitNetTrainingLinearWeight, bitnet_training, kernels
from bitnet_ao.kernels import torch_backend
from tests.conftest import fit
from tests.spec_reference import FakeQuantBitLinear, act_quant, snr_db, ternary_weight

HIGH_PRECISION_BACKWARD = dict(int8_grad_input=False, int8_grad_weight=False)


class ReferenceComparableLM(nn.Module):
    """Embedding -> two residual MLP blocks -> head: enough depth for gradients to flow through quantized layers.

    Not tests/test_fsdp.py's ``ShardableLossLM``: this one takes the linear class as an argument, so that the
    spec's ``FakeQuantBitLinear`` reference is the same model with the same initial weights, and returns logits
    (the compile tests compare outputs, not only losses).
    """

    def __init__(self, linear=nn.Linear, vocab: int = 32, dim: int = 48) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), linear(dim, 2 * dim), nn.GELU(), linear(2 * dim, dim, bias=False))
            for _ in range(2)
        )
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def _not_head(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn != "head"


def _bitnet_and_reference(weights: str = "ternary", **config):
    """The same initial weights twice: quantized with bitnet_training, and built from FakeQuantBitLinear."""
    torch.manual_seed(0)
    ref = ReferenceComparableLM(linear=lambda i, o, bias=True: FakeQuantBitLinear(i, o, bias=bias, weights=weights))
    model = ReferenceComparableLM()
    model.load_state_dict(ref.state_dict())
    quantize_(model, bitnet_training(weights=weights, **config), filter_fn=_not_head)
    return model, ref


def _train(model: nn.Module, steps: int, step_fn=None) -> list[float]:
    torch.manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    data = torch.randint(0, 32, (steps, 4, 17))

    def loss_of(batch):
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    return fit(step_fn or loss_of, opt, data)


@pytest.mark.parametrize("weights", ["ternary", "binary"])
def test_training_parity_with_fake_quant_reference(weights):
    model, ref = _bitnet_and_reference(weights, **HIGH_PRECISION_BACKWARD)
    ours, theirs = _train(model, 6), _train(ref, 6)
    for a, b in zip(ours, theirs, strict=True):
        assert abs(a - b) / abs(b) < 1e-5, (ours, theirs)
    assert ours[-1] < ours[0]
    # After training both hold the same master weights, hence the same ternary values and scales.
    for ours_lin, ref_lin in ((model.blocks[0][1], ref.blocks[0][1]), (model.blocks[1][3], ref.blocks[1][3])):
        torch.testing.assert_close(ours_lin.weight._data, ref_lin.weight, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # torch.compile: 8 to 25 s on 2 cores with a cold inductor cache
def test_training_parity_compiled():
    model, ref = _bitnet_and_reference(**HIGH_PRECISION_BACKWARD)
    compiled = torch.compile(model, fullgraph=True)

    def step(batch):
        logits = compiled(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    ours, theirs = _train(model, 4, step_fn=step), _train(ref, 4)
    for a, b in zip(ours, theirs, strict=True):
        assert abs(a - b) / abs(b) < 1e-5, (ours, theirs)


def test_forward_equals_spec_exactly_in_integers():
    """y / (s_x s_w) must be the exact integer product x_q @ W_q.T (int32 accumulation, no float rounding)."""
    torch.manual_seed(2)
    layer = nn.Linear(64, 24, bias=False).double()
    x = torch.randn(10, 64, dtype=torch.float64)
    q, s = act_quant(x)
    wq, sw = ternary_weight(layer.weight.detach())
    quantize_(layer, bitnet_training())
    y = layer(x)
    exact = (q.double() @ wq.double().t()) * s.double()[:, None] * sw.double()
    torch.testing.assert_close(y, exact, rtol=1e-6, atol=0)


def _grads(config: dict, g_scale: float = 1.0, m: int = 256, k: int = 192, n: int = 160):
    torch.manual_seed(3)
    layer = nn.Linear(k, n, bias=False)
    x = torch.randn(m, k, requires_grad=True)
    grad_y = torch.randn(m, n) * g_scale
    quantize_(layer, bitnet_training(**config))
    layer(x).backward(grad_y)
    return x, layer, grad_y


@pytest.mark.parametrize("g_scale", [1.0, 1e-8])
def test_int8_grad_input_snr(g_scale):
    x, layer, grad_y = _grads(dict(int8_grad_input=True, int8_grad_weight=False), g_scale)
    wq, sw = ternary_weight(layer.weight._data)
    exact = grad_y @ (wq * sw)  # grad_y @ W_fq
    assert snr_db(x.grad, exact) > 30


@pytest.mark.parametrize("g_scale", [1.0, 1e-8])
def test_int8_grad_weight_snr(g_scale):
    x, layer, grad_y = _grads(dict(int8_grad_input=False, int8_grad_weight=True), g_scale)
    q, s = act_quant(x.detach())
    exact = grad_y.t() @ (q * s[:, None])  # grad_y.T @ x_fq
    assert snr_db(layer.weight.grad, exact) > 30


def test_high_precision_backward_is_the_ste_gradient():
    x, layer, grad_y = _grads(HIGH_PRECISION_BACKWARD)
    wq, sw = ternary_weight(layer.weight._data)
    q, s = act_quant(x.detach())
    torch.testing.assert_close(x.grad, grad_y @ (wq * sw), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, grad_y.t() @ (q * s[:, None]), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(16,), (3, 16), (2, 3, 5, 16)])
def test_dtypes_bias_and_leading_dims(dtype, bias, shape):
    torch.manual_seed(4)
    ref = FakeQuantBitLinear(16, 12, bias=bias).to(dtype)
    layer = copy.deepcopy(ref)
    quantize_(layer, bitnet_training(**HIGH_PRECISION_BACKWARD))
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = layer(x), ref(x_ref)
    assert y.shape == (*shape[:-1], 12) and y.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, y_ref, **tol)
    y.float().square().sum().backward()
    y_ref.float().square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    assert layer.weight.grad.dtype == dtype
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, **tol)
    if bias:
        torch.testing.assert_close(layer.bias.grad, ref.bias.grad, **tol)


def test_cpu_autocast_bf16():
    torch.manual_seed(5)
    layer = nn.Linear(32, 8)
    ref = FakeQuantBitLinear(32, 8)
    ref.load_state_dict(layer.state_dict())
    quantize_(layer, bitnet_training(**HIGH_PRECISION_BACKWARD))
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_ref = ref(x.bfloat16())  # what autocast does to a plain linear: cast input to bf16 first
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref.bfloat16(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and layer.bias.grad.dtype == torch.float32


def test_no_grad_and_eval():
    layer = nn.Linear(8, 4)
    quantize_(layer, bitnet_training())
    layer.eval()
    with torch.no_grad():
        y = layer(torch.randn(3, 8))
    assert not y.requires_grad and y.shape == (3, 4)
    with torch.inference_mode():
        assert layer(torch.randn(3, 8)).shape == (3, 4)


@pytest.mark.slow  # torch.compile: 8 to 25 s on 2 cores with a cold inductor cache
def test_compile_fullgraph_matches_eager():
    torch.manual_seed(6)
    model = ReferenceComparableLM()
    quantize_(model, bitnet_training(), filter_fn=_not_head)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True)
    idx = torch.randint(0, 32, (2, 9))
    y, y_c = model(idx), compiled(idx)
    torch.testing.assert_close(y_c, y, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    y_c.sum().backward()
    grad = model.blocks[0][1].weight.grad
    grad_c = compiled._orig_mod.blocks[0][1].weight.grad
    torch.testing.assert_close(grad_c, grad, rtol=1e-5, atol=1e-5)


def test_compiled_training_step_is_bit_identical_on_every_route(cpu_route):
    """fullgraph dynamo + AOT autograd (the layouts each route asks its weight in, the ops' fake implementations)
    on every CPU route: forward and gradients equal to eager bit for bit."""
    torch.manual_seed(6)
    model = ReferenceComparableLM()
    quantize_(model, bitnet_training(), filter_fn=_not_head)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend="aot_eager")
    idx = torch.randint(0, 32, (2, 9))
    y, y_c = model(idx), compiled(idx)
    assert torch.equal(y_c, y)
    y.square().sum().backward()
    y_c.square().sum().backward()
    for p, p_c in zip(model.parameters(), compiled._orig_mod.parameters(), strict=True):
        assert torch.equal(p_c.grad, p.grad)


@pytest.mark.slow  # torch.compile: 8 to 25 s on 2 cores with a cold inductor cache
def test_compiled_cpu_elementwise_path_in_training(monkeypatch):
    """Large layers take the inductor-compiled quantization path: same numbers as the eager path."""
    monkeypatch.setattr(torch_backend, "COMPILE_MIN_NUMEL", 1 << 62)
    x_eager, layer_eager, _ = _grads(dict(int8_grad_input=True, int8_grad_weight=True), m=24, k=40, n=32)
    monkeypatch.setattr(torch_backend, "COMPILE_MIN_NUMEL", 0)
    x_fused, layer_fused, _ = _grads(dict(int8_grad_input=True, int8_grad_weight=True), m=24, k=40, n=32)
    assert torch.equal(x_eager.grad, x_fused.grad)
    assert torch.equal(layer_eager.weight.grad, layer_fused.weight.grad)


def test_saved_for_backward_is_int8_activation_scales_and_the_parameter():
    layer = nn.Linear(64, 32)
    quantize_(layer, bitnet_training())
    x = torch.randn(5, 7, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    others = [t for t in saved if t is not layer.weight]
    assert len(others) < len(saved), "the master weight (the parameter itself, no copy) should be saved"
    described = sorted((str(t.dtype), tuple(t.shape)) for t in others)
    # The int8 activation, or, where grad_weight's matmul takes it packed (AVX-512 VNNI), the same bytes packed in
    # groups of 4 tokens and panels of 64 columns: 36 x 64.
    x_q = ("torch.uint8", (36 * 64,)) if kernels.prepacks_operand(x, b_ternary=False) else ("torch.int8", (35, 64))
    assert described == sorted([("torch.float32", ()), ("torch.float32", (35,)), x_q])


def test_empty_batch():
    layer = nn.Linear(8, 4)
    quantize_(layer, bitnet_training())
    x = torch.randn(0, 8, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert x.grad.shape == (0, 8)
    assert torch.equal(layer.weight.grad, torch.zeros(4, 8)) and torch.equal(layer.bias.grad, torch.zeros(4))


def test_all_zero_rows_give_zeros_and_finite_grads():
    layer = nn.Linear(8, 4, bias=False)
    quantize_(layer, bitnet_training())
    x = torch.zeros(3, 8, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, torch.zeros(3, 4))
    y.backward(torch.zeros(3, 4))
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_propagates_to_its_row_only(bad):
    layer = nn.Linear(8, 4, bias=False)
    quantize_(layer, bitnet_training())
    x = torch.randn(3, 8)
    x[1, 2] = bad
    y = layer(x)
    assert not torch.isfinite(y[1]).all()
    assert torch.isfinite(y[[0, 2]]).all()


def test_mismatched_in_features_names_the_layer():
    layer = nn.Linear(8, 4)
    quantize_(layer, bitnet_training())
    with pytest.raises(ValueError, match=r"in_features=8.*out_features=4|in_features=8"):
        layer(torch.randn(2, 9))
    with pytest.raises(TypeError, match="floating point"):
        F.linear(torch.ones(2, 8, dtype=torch.long), layer.weight)


def test_weight_is_the_subclass_and_grad_is_plain():
    layer = nn.Linear(8, 4)
    quantize_(layer, bitnet_training())
    assert isinstance(layer.weight, BitNetTrainingLinearWeight) and isinstance(layer.weight, nn.Parameter)
    layer(torch.randn(2, 8)).sum().backward()
    assert type(layer.weight.grad) is torch.Tensor


@pytest.mark.parametrize("fused", [False, True])
def test_every_forward_quantizes_the_weight_as_it_is_now(fused):
    """No cached weight quantization may outlive an optimizer step. torch 2.13's fused AdamW advances no version
    counter of a BitNet weight (neither the wrapper's nor the master's), so a cache keyed on versions would train
    on stale scales without a word: the scale used must be the abs-mean of the weight after the step."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    quantize_(layer, bitnet_training())
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=fused)
    x = torch.randn(4, 16)
    for _ in range(2):
        layer(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        _, s_w = ternary_weight(layer.weight._data)
        assert torch.equal(layer.weight.bitnet_quantization().scale, s_w)
        ref = FakeQuantBitLinear(16, 8)
        ref.load_state_dict(layer.state_dict())
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)
