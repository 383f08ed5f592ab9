"""The ``bitnet_ao`` primitives as ``torch.library`` custom ops.

Each op has one name, a fake implementation (so ``torch.compile`` and FSDP2 trace through it without graph
breaks) and a real implementation that forwards to a *backend* module holding functions of the same names:
``torch_backend`` (``torch._int_mm`` + compiled elementwise, the default everywhere) or a backend registered with
:func:`register_backend` (the Triton kernels register themselves for CUDA). :func:`use_backend` forces one,
which is how the Triton kernels are tested on CPU under ``TRITON_INTERPRET=1``.

The math each op must reproduce is in ``reference.py``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from types import ModuleType

import torch
from torch import Tensor

from . import cpu_ops, cpu_vnni_gemm, reference, torch_backend
from .private_api import check, dense_tensor, dispatch_mode_active
from .ranges import kernel_range

_BACKENDS: dict[str, ModuleType] = {"torch": torch_backend}
#: Backend used for a device type when none is forced; devices not listed use "torch".
_DEVICE_DEFAULTS: dict[str, str] = {}
_forced_backend: str | None = None


def register_backend(name: str, module: ModuleType, default_for: tuple[str, ...] = ()) -> None:
    """Make ``module`` available as backend ``name`` and the default for the given device types."""
    _BACKENDS[name] = module
    for device_type in default_for:
        _DEVICE_DEFAULTS[device_type] = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every op on backend ``name`` inside the block, whatever the device."""
    global _forced_backend
    if name not in _BACKENDS:
        raise ValueError(f"bitnet_ao.kernels: unknown backend {name!r}; registered: {sorted(_BACKENDS)}")
    previous, _forced_backend = _forced_backend, name
    try:
        yield
    finally:
        _forced_backend = previous


def backend_for(t: Tensor) -> ModuleType:
    return _BACKENDS[_forced_backend or _DEVICE_DEFAULTS.get(t.device.type, "torch")]


def right_operand_k_contiguous(t: Tensor) -> bool:
    """Whether the backend for ``t`` wants the right matmul operand ``b`` contiguous along the reduction dim
    (a transposed view of a row-major ``(N, K)``) rather than row-major ``(K, N)``."""
    return backend_for(t).right_operand_k_contiguous(t)


def right_operand_either_layout(t: Tensor) -> bool:
    """Whether the backend for ``t`` multiplies as fast with ``b`` row-major as contiguous along the reduction:
    then the weight's int8 values are written without a transposition for both matmuls."""
    return backend_for(t).right_operand_either_layout(t)


class _EagerOp:
    """A ``torch.library`` custom op that eager code calls without the dispatcher: calling it runs its implementation
    directly when nothing needs to see the op (eager mode, plain tensors, no dispatch mode, no gradient asked of it),
    under a profiler inside a range of the op's name, and the op otherwise (torch.compile and torch.export traces, fake
    tensors, FLOP and communication counters, tensor subclasses).

    Why: the dispatcher's round trip into a Python op costs ~30 µs (its autograd wrapper, the redispatch), and a
    BitNet linear calls six to eight ops per training step: 4-5 ms of a step of the main job, and in a decode step
    more than the matmul of a 1024 x 1024 weight. ``op`` is the custom op itself (``opcheck``, fake
    implementations, ``torch.ops.bitnet_ao``)."""

    def __init__(self, op: Callable, name: str, fn: Callable) -> None:
        self.op = op
        self.fn = fn
        self.profile_name = name
        functools.update_wrapper(self, fn)

    def register_fake(self, fake: Callable) -> Callable:
        return torch.library.register_fake(self.profile_name)(fake)

    def __call__(self, *args, **kwargs):
        if not _runs_directly((*args, *kwargs.values())):
            return self.op(*args, **kwargs)
        with kernel_range(self.profile_name):  # a profile (or a step timer) still sees the op by its name
            return self.fn(*args, **kwargs)


def _custom_op(name: str) -> Callable[[Callable], _EagerOp]:
    """``torch.library.custom_op(name, mutates_args=())`` as an :class:`_EagerOp`."""
    return lambda fn: _EagerOp(torch.library.custom_op(name, fn, mutates_args=()), name, fn)


#: The library of the ops defined without ``torch.library.custom_op`` (:func:`_no_grad_op`).
_LIBRARY = torch.library.Library("bitnet_ao", "FRAGMENT")


def _no_grad_op(name: str) -> Callable[[Callable], _EagerOp]:
    """An :class:`_EagerOp` for an op nothing differentiates, defined with torch.library's low-level API: the schema
    ``custom_op`` would infer, the implementation as the kernel of every device (``CompositeExplicitAutograd``), and
    no autograd kernel. Why: ``custom_op`` registers an autograd kernel in Python that every dispatcher call crosses,
    in grad mode or not, compiled code included; without one, a device whose kernel is C++ (``cpu_ops.cpp``
    registers the CPU kernel of ``packed_linear``) runs the op with no Python on the way."""

    def define(fn: Callable) -> _EagerOp:
        namespace, opname = name.split("::")
        _LIBRARY.define(opname + torch.library.infer_schema(fn, mutates_args=()))
        _LIBRARY.impl(opname, fn, "CompositeExplicitAutograd")
        return _EagerOp(getattr(getattr(torch.ops, namespace), opname).default, name, fn)

    return define


def _runs_directly(args: tuple) -> bool:
    """Whether an op may run its implementation on ``args`` without the dispatcher: nothing traces or intercepts
    it, every tensor is a plain dense one (no subclass, functorch wrapper, functional or meta tensor), and no input
    needs a gradient (the ops have no autograd formula: the op decides what such a call gets)."""
    if torch.compiler.is_compiling() or dispatch_mode_active():
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, Tensor):
            if type(a) not in _PLAIN or (grad and a.requires_grad) or not dense_tensor(a):
                return False
        elif a is not None and not isinstance(a, _SCALARS):  # an FX proxy, a SymInt: the op records or traces it
            return False
    return True


_PLAIN = (Tensor, torch.nn.Parameter)
_SCALARS = (bool, int, float, torch.dtype)


def prepacks_operand(t: Tensor, b_ternary: bool) -> bool:
    """Whether the matmul for ``t``'s device takes a right operand of this kind (ternary or full range) packed ahead
    of time (:func:`pack_operand`, :func:`scaled_int8_mm_prepacked`): AVX-512 VNNI CPUs, where packing is part of
    every product and a weight or an activation can be packed once, while it is in cache."""
    fn = getattr(backend_for(t), "prepacks_operand", None)
    return fn is not None and fn(t, b_ternary)


def _check_2d(name: str, t: Tensor, what: str) -> None:
    check(t.dim() == 2, lambda: f"bitnet_ao.{name}: {what} must be 2-D, got shape {tuple(t.shape)}")


def _check_float(name: str, t: Tensor, what: str) -> None:
    check(
        t.dtype.is_floating_point,
        lambda: f"bitnet_ao.{name}: {what} must be a floating-point tensor, got {t.dtype}",
    )


def _check_gain(name: str, weight: Tensor, x: Tensor) -> None:
    """An RMSNorm's gain: one float per column of the 2-D ``x`` (the kernels read exactly that many)."""
    check(
        weight.dim() == 1 and weight.shape[0] == x.shape[-1] and weight.dtype.is_floating_point,
        lambda: (
            f"bitnet_ao.{name}: the norm weight must be 1-D with one float per column of x {tuple(x.shape)}, "
            f"got {weight.dtype} {tuple(weight.shape)}"
        ),
    )


# --- activations and output gradients: per-row int8 ---------------------------------------------------


@_custom_op("bitnet_ao::quantize_rowwise")
def quantize_rowwise(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-row int8 quantization: ``(x_q int8 (M, K), s float32 (M,))``, see ``reference.quantize_rowwise``."""
    _check_2d("quantize_rowwise", x, "x")
    _check_float("quantize_rowwise", x, "x")
    return backend_for(x).quantize_rowwise(x, eps)


@quantize_rowwise.register_fake
def _(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _check_2d("quantize_rowwise", x, "x")
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32)


# --- RMSNorm, alone or fused with the activation quantization, and its backward -----------------------------


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """RMSNorm of a 2-D ``x`` and its ``rstd`` for :func:`rms_norm_backward`, see ``reference.rms_norm``. A plain
    function, not a custom op: its one caller, ``bitnet_ao.norm.RMSNorm``, runs it eagerly only (torch.compile
    traces ``reference.rms_norm`` instead), so no trace needs to see it as one op."""
    _check_2d("rms_norm", x, "x")
    _check_gain("rms_norm", weight, x)
    return backend_for(x).rms_norm(x, weight, eps)


@_custom_op("bitnet_ao::rms_norm_quantize_rowwise")
def rms_norm_quantize_rowwise(
    x: Tensor, weight: Tensor, norm_eps: float, norm_dtype: torch.dtype, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """RMSNorm of ``x`` rounded to ``norm_dtype``, quantized per row, in one pass: ``(x_q int8 (M, K), s float32
    (M,), rstd float32 (M, 1))``, see ``reference.rms_norm_quantize_rowwise``."""
    _check_2d("rms_norm_quantize_rowwise", x, "x")
    _check_float("rms_norm_quantize_rowwise", x, "x")
    _check_gain("rms_norm_quantize_rowwise", weight, x)
    return backend_for(x).rms_norm_quantize_rowwise(x, weight, norm_eps, norm_dtype, eps)


@rms_norm_quantize_rowwise.register_fake
def _(x, weight, norm_eps, norm_dtype, eps):
    _check_2d("rms_norm_quantize_rowwise", x, "x")
    _check_gain("rms_norm_quantize_rowwise", weight, x)
    m = x.shape[0]
    return (
        x.new_empty(x.shape, dtype=torch.int8),
        x.new_empty(m, dtype=torch.float32),
        x.new_empty((m, 1), dtype=torch.float32),
    )


@_custom_op("bitnet_ao::rms_norm_backward")
def rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of the RMSNorm for its input and its gain, see ``reference.rms_norm_backward``."""
    _check_norm_backward(dy, x, weight, rstd)
    return backend_for(x).rms_norm_backward(dy, x, weight, rstd)


@rms_norm_backward.register_fake
def _(dy, x, weight, rstd):
    _check_norm_backward(dy, x, weight, rstd)
    return torch.empty_like(x), torch.empty_like(weight)


def _check_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> None:
    _check_2d("rms_norm_backward", x, "x")
    _check_gain("rms_norm_backward", weight, x)
    check(
        dy.shape == x.shape and rstd.numel() == x.shape[0],
        lambda: (
            f"bitnet_ao.rms_norm_backward: dy {tuple(dy.shape)} must have x's shape {tuple(x.shape)} and rstd "
            f"{tuple(rstd.shape)} one value per row"
        ),
    )


# --- weight-gradient operand: grad_output * s_x, per-column int8 ----------------------------------------


@_custom_op("bitnet_ao::quantize_colwise_scaled")
def quantize_colwise_scaled(g: Tensor, row_scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``g * row_scale[:, None]`` quantized per column: ``(g_q int8 (M, N), s float32 (N,))``."""
    _check_2d("quantize_colwise_scaled", g, "g")
    _check_float("quantize_colwise_scaled", g, "g")
    return backend_for(g).quantize_colwise_scaled(g, row_scale, eps)


@quantize_colwise_scaled.register_fake
def _(g: Tensor, row_scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _check_2d("quantize_colwise_scaled", g, "g")
    return g.new_empty(g.shape, dtype=torch.int8), g.new_empty(g.shape[1], dtype=torch.float32)


@_custom_op("bitnet_ao::quantize_grad_output")
def quantize_grad_output(g: Tensor, row_scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`quantize_rowwise` and :func:`quantize_colwise_scaled` of the same ``g`` in one pass: ``(g_q int8
    (M, N), s float32 (M,), g'_q int8 (M, N), s' float32 (N,))``, see ``reference.quantize_grad_output``."""
    _check_2d("quantize_grad_output", g, "g")
    _check_float("quantize_grad_output", g, "g")
    return backend_for(g).quantize_grad_output(g, row_scale, eps)


@quantize_grad_output.register_fake
def _(g: Tensor, row_scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_2d("quantize_grad_output", g, "g")
    m, n = g.shape
    rows, cols = g.new_empty((m, n), dtype=torch.int8), g.new_empty((m, n), dtype=torch.int8)
    return rows, g.new_empty(m, dtype=torch.float32), cols, g.new_empty(n, dtype=torch.float32)


# --- weights: abs-mean statistics, ternary / binary values ------------------------------------------------


@_custom_op("bitnet_ao::weight_stats")
def weight_stats(w: Tensor) -> Tensor:
    """``(sum |w|, sum w)`` in float64, shape ``(2,)``: the all-reducible form of the weight scales."""
    _check_float("weight_stats", w, "weight")
    return backend_for(w).weight_stats(w)


@weight_stats.register_fake
def _(w: Tensor) -> Tensor:
    return w.new_empty(2, dtype=torch.float64)


@_custom_op("bitnet_ao::ternarize")
def ternarize(w: Tensor, scale: Tensor, transpose: bool) -> Tensor:
    """Ternary int8 weight ``clamp(round(w / max(scale, 1e-5)), -1, 1)``; ``transpose`` writes ``(K, N)``."""
    _check_2d("ternarize", w, "weight")
    _check_float("ternarize", w, "weight")
    return backend_for(w).ternarize(w, scale, transpose)


@ternarize.register_fake
def _(w: Tensor, scale: Tensor, transpose: bool) -> Tensor:
    shape = (w.shape[1], w.shape[0]) if transpose else tuple(w.shape)
    return w.new_empty(shape, dtype=torch.int8)


@_custom_op("bitnet_ao::binarize")
def binarize(w: Tensor, center: Tensor, transpose: bool) -> Tensor:
    """Binary int8 weight ``sign(w - center)`` (0 -> +1); ``transpose`` writes ``(K, N)``."""
    _check_2d("binarize", w, "weight")
    _check_float("binarize", w, "weight")
    return backend_for(w).binarize(w, center, transpose)


@binarize.register_fake
def _(w: Tensor, center: Tensor, transpose: bool) -> Tensor:
    shape = (w.shape[1], w.shape[0]) if transpose else tuple(w.shape)
    return w.new_empty(shape, dtype=torch.int8)


# --- the matmul: int8 x int8 -> int32, scaled epilogue ------------------------------------------------------


def _check_mm(a: Tensor, b: Tensor) -> None:
    _check_2d("scaled_int8_mm", a, "a")
    _check_2d("scaled_int8_mm", b, "b")
    check(
        a.dtype == torch.int8 and b.dtype == torch.int8,
        lambda: f"bitnet_ao.scaled_int8_mm: a and b must be int8, got {a.dtype} and {b.dtype}",
    )
    check(
        a.shape[1] == b.shape[0],
        lambda: f"bitnet_ao.scaled_int8_mm: inner dimensions differ, a {tuple(a.shape)} @ b {tuple(b.shape)}",
    )


@_custom_op("bitnet_ao::scaled_int8_mm")
def scaled_int8_mm(
    a: Tensor,
    b: Tensor,
    row_scale: Tensor | None,
    col_scale: Tensor | None,
    scale: Tensor | None,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    b_ternary: bool = False,
) -> Tensor:
    """``(a @ b)`` exactly in int32, times ``row_scale[:, None] * col_scale[None, :] * scale``, cast to
    ``out_dtype``, plus ``bias``. The layout (NT forward, NN grad_input, TN grad_weight) is read from the
    strides of ``a`` and ``b``: pass transposed views, not copies. ``b_ternary`` promises ``b`` only holds
    {-1, 0, 1} (a BitNet weight), which lets CPUs without VNNI use oneDNN's u8 x s8 kernels exactly."""
    _check_mm(a, b)
    return backend_for(a).scaled_int8_mm(a, b, row_scale, col_scale, scale, bias, out_dtype, b_ternary)


@scaled_int8_mm.register_fake
def _(a, b, row_scale, col_scale, scale, bias, out_dtype, b_ternary=False):
    _check_mm(a, b)
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


@_custom_op("bitnet_ao::scaled_int8_mm_packed")
def scaled_int8_mm_packed(
    a: Tensor,
    b_packed: Tensor,
    k: int,
    transpose_b: bool,
    row_scale: Tensor | None,
    col_scale: Tensor | None,
    scale: Tensor | None,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    bits: int = 2,
) -> Tensor:
    """:func:`scaled_int8_mm` with a BitNet weight ``B`` packed along ``k`` (``reference.pack_weight``): ternary
    values 2 bits each (``bits=2``, ``(N, ceil(k / 4))``) or binary values 1 bit each (``bits=1``,
    ``(N, ceil(k / 8))``). ``transpose_b=True`` computes ``a (M, k) @ B.T``; ``False`` computes ``a (M, N) @ B``.
    ``B`` must hold weight values ({-1, 0, 1}; the 2-bit code of -2 is not a weight value)."""
    _check_packed(a, b_packed, k, transpose_b, bits)
    return backend_for(a).scaled_int8_mm_packed(
        a, b_packed, k, transpose_b, row_scale, col_scale, scale, bias, out_dtype, bits
    )


def _check_packed(a: Tensor, b_packed: Tensor, k: int, transpose_b: bool, bits: int) -> None:
    _check_2d("scaled_int8_mm_packed", a, "a")
    _check_2d("scaled_int8_mm_packed", b_packed, "b_packed")
    check(bits in (1, 2), lambda: f"bitnet_ao.scaled_int8_mm_packed: bits must be 1 or 2, got {bits}")
    check(
        b_packed.shape[1] == reference.packed_columns(k, bits),
        lambda: (
            f"bitnet_ao.scaled_int8_mm_packed: b_packed {tuple(b_packed.shape)} does not hold k={k} "
            f"{bits}-bit values per row"
        ),
    )
    _, inner = reference.packed_matmul_dims(b_packed, k, transpose_b)
    check(
        a.shape[1] == inner,
        lambda: f"bitnet_ao.scaled_int8_mm_packed: a {tuple(a.shape)} needs {inner} columns",
    )


@scaled_int8_mm_packed.register_fake
def _(a, b_packed, k, transpose_b, row_scale, col_scale, scale, bias, out_dtype, bits=2):
    _check_packed(a, b_packed, k, transpose_b, bits)
    n, _ = reference.packed_matmul_dims(b_packed, k, transpose_b)
    return a.new_empty((a.shape[0], n), dtype=out_dtype)


# --- the matmul with its right operand packed ahead of time ---------------------------------------------------


@_custom_op("bitnet_ao::pack_operand")
def pack_operand(b: Tensor, b_ternary: bool) -> Tensor:
    """The right operand ``b (K, N)`` of :func:`scaled_int8_mm` packed the way this device's matmul reads it, for
    :func:`scaled_int8_mm_prepacked`: a flat uint8 tensor. Only where :func:`prepacks_operand` says so."""
    _check_2d("pack_operand", b, "b")
    check(b.dtype == torch.int8, lambda: f"bitnet_ao.pack_operand: b must be int8, got {b.dtype}")
    check(
        prepacks_operand(b, b_ternary),
        lambda: (
            f"bitnet_ao.pack_operand: the matmul for {b.device.type} tensors takes no packed operand "
            "(see prepacks_operand)"
        ),
    )
    return backend_for(b).pack_operand(b, b_ternary)


@pack_operand.register_fake
def _(b: Tensor, b_ternary: bool) -> Tensor:
    _check_2d("pack_operand", b, "b")
    return b.new_empty(cpu_vnni_gemm.packed_size(*b.shape), dtype=torch.uint8)


@_custom_op("bitnet_ao::ternarize_packed")
def ternarize_packed(w: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`ternarize` of ``w (N, K)`` (``transpose=False``) as the two right operands :func:`pack_operand` makes
    of it: ``(W_q, W_q.T)`` packed, for ``grad_input`` and the forward of a BitNet linear, in one pass over ``w``.
    Only where :func:`prepacks_operand` says so."""
    _check_2d("ternarize_packed", w, "weight")
    _check_float("ternarize_packed", w, "weight")
    check(
        prepacks_operand(w, True),
        lambda: (
            f"bitnet_ao.ternarize_packed: the matmul for {w.device.type} tensors takes no packed operand "
            "(see prepacks_operand)"
        ),
    )
    return backend_for(w).ternarize_packed(w, scale)


@ternarize_packed.register_fake
def _(w: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    _check_2d("ternarize_packed", w, "weight")
    n, k = w.shape
    sizes = cpu_vnni_gemm.packed_size(n, k), cpu_vnni_gemm.packed_size(k, n)
    return w.new_empty(sizes[0], dtype=torch.uint8), w.new_empty(sizes[1], dtype=torch.uint8)


@_custom_op("bitnet_ao::scaled_int8_mm_prepacked")
def scaled_int8_mm_prepacked(
    a: Tensor,
    b_packed: Tensor,
    n: int,
    row_scale: Tensor | None,
    col_scale: Tensor | None,
    scale: Tensor | None,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    b_ternary: bool,
) -> Tensor:
    """:func:`scaled_int8_mm` of ``a (M, K)`` and the ``(K, n)`` operand that :func:`pack_operand` packed into
    ``b_packed`` (with the same ``b_ternary``)."""
    _check_prepacked(a, b_packed, n)
    return backend_for(a).scaled_int8_mm_prepacked(a, b_packed, n, row_scale, col_scale, scale, bias, out_dtype,
                                                   b_ternary)  # fmt: skip


def _check_prepacked(a: Tensor, b_packed: Tensor, n: int) -> None:
    _check_2d("scaled_int8_mm_prepacked", a, "a")
    check(a.dtype == torch.int8, lambda: f"bitnet_ao.scaled_int8_mm_prepacked: a must be int8, got {a.dtype}")
    size = cpu_vnni_gemm.packed_size(a.shape[1], n)
    check(
        b_packed.dtype == torch.uint8 and b_packed.dim() == 1 and b_packed.shape[0] == size,
        lambda: (
            f"bitnet_ao.scaled_int8_mm_prepacked: b_packed must be the uint8 ({size},) pack_operand makes of a "
            f"({a.shape[1]}, {n}) operand, got {b_packed.dtype} {tuple(b_packed.shape)}"
        ),
    )


@scaled_int8_mm_prepacked.register_fake
def _(a, b_packed, n, row_scale, col_scale, scale, bias, out_dtype, b_ternary):
    _check_prepacked(a, b_packed, n)
    return a.new_empty((a.shape[0], n), dtype=out_dtype)


# --- the whole inference forward of a packed linear -------------------------------------------------------


def _packed_linear(
    x: Tensor,
    norm_weight: Tensor | None,
    norm_eps: float,
    b_packed: Tensor,
    k: int,
    bits: int,
    scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    backend = backend_for(x)
    fused = getattr(backend, "packed_linear", None)
    out = fused(x, norm_weight, norm_eps, b_packed, k, bits, scale, bias, out_dtype) if fused is not None else None
    if out is not None:
        return out
    if norm_weight is None:
        x_q, s = backend.quantize_rowwise(x, reference.ACTIVATION_EPS)
    else:
        x_q, s, _ = backend.rms_norm_quantize_rowwise(x, norm_weight, norm_eps, out_dtype, reference.ACTIVATION_EPS)
    return backend.scaled_int8_mm_packed(x_q, b_packed, k, True, s, None, scale, bias, out_dtype, bits)


@_no_grad_op("bitnet_ao::packed_linear")
def packed_linear(
    x: Tensor,
    norm_weight: Tensor | None,
    norm_eps: float,
    b_packed: Tensor,
    k: int,
    bits: int,
    scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """The forward of a packed BitNet linear when nothing needs a gradient (inference): ``x (M, k)``, through the
    RMSNorm with gain ``norm_weight`` first when given, quantized per row, times ``B.T`` (packed as in
    :func:`scaled_int8_mm_packed`), scaled by the row scales and ``scale``, plus ``bias``, in ``out_dtype``. The
    numbers of :func:`rms_norm_quantize_rowwise` / :func:`quantize_rowwise` followed by
    :func:`scaled_int8_mm_packed`; a backend may do it in one step (the CPU does, for decode-sized ``x``)."""
    _check_packed_linear(x, norm_weight, b_packed, k, bits)
    return _packed_linear(x, norm_weight, norm_eps, b_packed, k, bits, scale, bias, out_dtype)


@packed_linear.register_fake
def _(x, norm_weight, norm_eps, b_packed, k, bits, scale, bias, out_dtype):
    _check_packed_linear(x, norm_weight, b_packed, k, bits)
    return x.new_empty((x.shape[0], b_packed.shape[0]), dtype=out_dtype)


def _check_packed_linear(x: Tensor, norm_weight: Tensor | None, b_packed: Tensor, k: int, bits: int) -> None:
    _check_packed(x, b_packed, k, True, bits)
    if norm_weight is not None:
        _check_gain("packed_linear", norm_weight, x)


def run_packed_linear(
    x: Tensor,
    norm_weight: Tensor | None,
    norm_eps: float,
    b_packed: Tensor,
    k: int,
    bits: int,
    scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """:func:`packed_linear`, through the dispatcher where its CPU kernel is C++ (``cpu_ops.cpp``) and the input
    is decode-sized: a call of a few microseconds where the op's Python implementation takes tens."""
    args = (x, norm_weight, norm_eps, b_packed, k, bits, scale, bias, out_dtype)
    if backend_for(x) is torch_backend and torch_backend.decode_linear_applies(x, k, out_dtype) and cpu_ops.available():
        return packed_linear.op(*args)
    return packed_linear(*args)


#: Every op this module registers (``torch.ops.bitnet_ao.<name>.default``), for code that must cover them all
#: (opcheck, docs).
OPS = tuple(
    getattr(torch.ops.bitnet_ao, op.profile_name.removeprefix("bitnet_ao::")).default
    for op in (
        quantize_rowwise,
        rms_norm_quantize_rowwise,
        rms_norm_backward,
        quantize_colwise_scaled,
        quantize_grad_output,
        weight_stats,
        ternarize,
        binarize,
        scaled_int8_mm,
        scaled_int8_mm_packed,
        pack_operand,
        ternarize_packed,
        scaled_int8_mm_prepacked,
        packed_linear,
    )
)
