"""The bitnet_ao kernels against their torch counterparts, one process, same inputs.

What it measures (median of ``--iters`` timed calls after ``--warmup`` untimed ones; the contenders of one row
are called in turn, so load from other processes slows them alike):

1. Scaled INT8 matmul per layout, NT (forward ``x_q @ W_q.T``), NN (grad_input ``g_q @ W_q``) and TN
   (grad_weight ``g'_q.T @ x_q``), operands passed as strided views exactly as the BitNet linear passes them:
   ``bitnet_ao.kernels.scaled_int8_mm`` (the Triton kernel on CUDA, the torch backend on CPU, whichever int8
   route ``bitnet_ao.kernels.cpu_matmul`` chose; it includes the scaled epilogue) in TOPS, against
   ``torch._int_mm`` (bare int32 result) and a dense ``torch.mm`` in TFLOPS.
2. Quantization kernels in GB/s of the minimum traffic (each input read once, each output written once), against a
   copy of as many bytes, and, when a peak is known, as a fraction of the memory-bandwidth peak (``--peak-gbps``;
   H100 SXM by default on CUDA). Every call starts with its inputs out of the caches (``--warm-caches``: in cache).
3. One BitNet linear (``quantize_(nn.Linear, bitnet_training())``), forward + backward, against a dense
   ``nn.Linear``.

"Dense" is the dtype a user of this hardware trains in (``--dtype auto``, ``benchmarks/hardware.py``): BF16 on
CUDA and on CPUs with native BF16 matmuls, FP32 on other CPUs (AVX2 only: a BF16 matmul there is scalar code,
and beating it would mean nothing). The activations, gradients and outputs of every contender are in that dtype.
Every ratio is measured in the same process. On CUDA the defaults are Llama-7B/8B shapes (M = 8192 tokens); on CPU
(the default without a GPU) the shapes are scaled down so the whole run stays under two minutes on 2 cores, and the
kernels run on the torch backend (the Triton interpreter is switched off: its timings mean nothing).

    python benchmarks/bench_kernels.py                           # CPU, small shapes
    python benchmarks/bench_kernels.py --device cuda             # M = 8192, (K, N) from Llama-7B/8B
    python benchmarks/bench_kernels.py --device cuda --m 4096 --kn 4096,4096 --peak-gbps 2039   # A100 80GB
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

# Interpreted Triton kernels would be timed instead of compiled ones; make sure the real thing runs.
os.environ.pop("TRITON_INTERPRET", None)
if not __package__:  # run as `python benchmarks/bench_kernels.py`: make the `benchmarks` package importable,
    # after site-packages so that the checkout's `kernels/` folder never shadows the Hub `kernels` package
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torchao.quantization import quantize_  # noqa: E402

from benchmarks import hardware  # noqa: E402
from benchmarks.timing import cache_evictor, keep_freed_memory, measure, synchronize  # noqa: E402
from bitnet_ao import bitnet_training, kernels  # noqa: E402
from bitnet_ao.kernels import reference, torch_backend  # noqa: E402

GPU_M = 8192
GPU_KN = ["4096,4096", "4096,14336", "14336,4096"]  # attention projections, MLP up, MLP down
CPU_M = 512
CPU_KN = ["1024,1024", "1024,3584", "3584,1024"]  # the same aspect ratios, scaled down
H100_PEAK_GBPS = 3350.0


def _int8(*shape: int, device: str) -> torch.Tensor:
    return torch.randint(-128, 128, shape, dtype=torch.int8, device=device)


def layout_operands(layout: str, m: int, k: int, n: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``a (M, K)`` and ``b (K, N)`` with the strides the BitNet linear uses for this matmul."""
    if layout == "NT":
        return _int8(m, k, device=device), _int8(n, k, device=device).t()
    if layout == "NN":
        return _int8(m, k, device=device), _int8(k, n, device=device)
    return _int8(k, m, device=device).t(), _int8(k, n, device=device)


def bench_matmuls(
    m: int, kns: list[tuple[int, int]], device: str, dtype: torch.dtype, warmup: int, iters: int
) -> list[list[str]]:
    """Scaled INT8 matmul (output in ``dtype``) against ``torch._int_mm`` and a ``dtype`` matmul, per layout."""
    rows = []
    for layout in ("NT", "NN", "TN"):
        for k, n in kns:
            a, b = layout_operands(layout, m, k, n, device)
            row_scale = torch.rand(m, device=device)
            scale = torch.tensor(0.01, device=device)
            ops = 2 * m * n * k
            ours = functools.partial(kernels.scaled_int8_mm, a, b, row_scale, None, scale, None, dtype)
            dense = functools.partial(torch.mm, a.to(dtype), b.to(dtype))
            int_mm = functools.partial(torch._int_mm, a, b)
            try:  # cuBLASLt INT8 has layout and size constraints; a layout it refuses is reported, not fatal
                int_mm()
            except RuntimeError:
                int_mm = None
            calls = [ours, dense] + ([int_mm] if int_mm else [])
            sync = functools.partial(synchronize, device)
            tops = [ops / t / 1e12 for t in measure(*calls, warmup=warmup, iters=iters, sync=sync)]
            t_ours, t_dense, t_int_mm = tops[0], tops[1], (tops[2] if int_mm else None)
            rows.append(
                [layout, f"{m}x{k}x{n}", f"{t_ours:.3g}", f"{t_int_mm:.3g}" if t_int_mm else "n/a", f"{t_dense:.3g}",
                 f"{t_ours / t_int_mm:.2f}x" if t_int_mm else "n/a", f"{t_ours / t_dense:.2f}x"]
            )  # fmt: skip
    return rows


def bench_quantization(
    m: int,
    kns: list[tuple[int, int]],
    device: str,
    dtype: torch.dtype,
    peak_gbps: float | None,
    warmup: int,
    iters: int,
    warm_caches: bool = False,
) -> list[list[str]]:
    """Every elementwise pass of a BitNet linear on ``dtype`` inputs (what training feeds them), in GB/s of the
    minimum traffic (each input read once, each output written once), against a plain copy of the same number of
    bytes (read half, write half, into a new tensor as the passes write theirs) timed in the same process: the
    fraction of the bandwidth a copy reaches that the pass reaches. Each call, the pass's and the copy's alike,
    starts with its inputs out of every cache (``cache_evictor``; ``warm_caches``: as the calls before left them),
    and freed memory is kept for the next allocation (``keep_freed_memory``, in ``main``): the memory's bandwidth,
    not the caches' or the allocator's."""
    rows = []
    evict = (lambda: None) if warm_caches else cache_evictor(device)
    seen: set[tuple[str, tuple[int, int]]] = set()
    size = dtype.itemsize  # bytes per input element; each int8 output element is one byte
    sync = functools.partial(synchronize, device)
    for k, n in kns:
        x = torch.randn(m, k, device=device, dtype=dtype)
        g = torch.randn(m, n, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device) * 0.02  # the float32 master weight
        gain = torch.ones(k, device=device)
        s_x, s_g = torch.rand(m, device=device), torch.rand(n, device=device)
        s_w = w.abs().mean()
        acc = torch.randint(-(2**20), 2**20, (m, n), device=device, dtype=torch.int32)
        _, rstd = kernels.rms_norm(x, gain, 1e-6)
        cases = [  # name, shape, call, bytes read + written once
            ("quantize_rowwise", (m, k), functools.partial(kernels.quantize_rowwise, x, reference.ACTIVATION_EPS),
             m * k * (size + 1) + m * 4),
            ("rms_norm_quantize_rowwise", (m, k), functools.partial(
                kernels.rms_norm_quantize_rowwise, x, gain, 1e-6, dtype, reference.ACTIVATION_EPS),
             m * k * (size + 1) + m * 8),
            ("quantize_grad_output", (m, n),
             functools.partial(kernels.quantize_grad_output, g, s_x, reference.GRADIENT_EPS),
             m * n * (size + 2) + m * 8 + n * 4),
            ("rms_norm_backward", (m, k), functools.partial(kernels.rms_norm_backward, x, x, gain, rstd),
             m * k * 3 * size + m * 4),
            ("scale_output (forward epilogue)", (m, n),
             functools.partial(torch_backend.scale_output, acc, s_x, None, s_w, None, dtype),
             m * n * (4 + size) + m * 4),
            ("weight_stats", (n, k), functools.partial(kernels.weight_stats, w), n * k * 4),
            ("ternarize (K, N)", (n, k), functools.partial(kernels.ternarize, w, s_w, True), n * k * 5),
            ("ternarize (N, K)", (n, k), functools.partial(kernels.ternarize, w, s_w, False), n * k * 5),
            ("scale_output (grad_weight)", (n, k),
             functools.partial(torch_backend.scale_output, acc.new_ones(n, k), s_g, None, None, None, torch.float32),
             n * k * 8 + n * 4),
        ]  # fmt: skip
        x_q = torch.randint(-127, 128, (m, k), device=device, dtype=torch.int8)
        # Packed operands (the vnni route, AVX-512 VNNI), each kind where its measured route is that one.
        if kernels.prepacks_operand(x_q, b_ternary=False):
            cases.append(("pack_operand", (m, k), functools.partial(kernels.pack_operand, x_q, False), m * k * 2))
        if kernels.prepacks_operand(x_q, b_ternary=True):
            cases.append(("ternarize_packed", (n, k), functools.partial(kernels.ternarize_packed, w, s_w), n * k * 6))
        for name, shape, fn, nbytes in cases:
            if (name, shape) in seen:  # e.g. the row-wise shape depends on K only
                continue
            seen.add((name, shape))
            # Written bytes: a never-written tensor's pages all map the kernel's one zero page, which a copy reads
            # from L1 (0.3 to 1.05 ms for the same 12 MB, run to run, on a Zen 4).
            src = torch.randint(0, 256, (nbytes // 2,), dtype=torch.uint8, device=device)
            t, t_copy = measure(fn, src.clone, warmup=warmup, iters=iters, sync=sync, after=evict)
            gbps, copy_gbps = nbytes / t / 1e9, 2 * src.numel() / t_copy / 1e9
            peak = f"{gbps / peak_gbps:.1%}" if peak_gbps else "n/a"
            row = [name, "x".join(map(str, shape)), f"{t * 1e3:.3f}", f"{gbps:.1f}", f"{copy_gbps:.1f}"]
            rows.append([*row, f"{gbps / copy_gbps:.0%}", peak])
    return rows


def _forward_backward(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    layer(x).backward(grad)


def bench_linear(
    m: int, kns: list[tuple[int, int]], device: str, dtype: torch.dtype, warmup: int, iters: int
) -> list[list[str]]:
    """A BitNet linear against a dense ``dtype`` ``nn.Linear`` with the same weights, forward + backward."""
    rows = []
    for k, n in kns:
        dense = nn.Linear(k, n, device=device, dtype=dtype)
        bitnet = nn.Linear(k, n, device=device, dtype=dtype)
        bitnet.load_state_dict(dense.state_dict())
        quantize_(bitnet, bitnet_training())
        x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(m, n, device=device, dtype=dtype)
        calls = [functools.partial(_forward_backward, layer, x, grad) for layer in (bitnet, dense)]
        times = measure(*calls, warmup=warmup, iters=iters, sync=functools.partial(synchronize, device))
        rows.append([f"{m}x{k}x{n}", f"{times[0] * 1e3:.2f}", f"{times[1] * 1e3:.2f}", f"{times[1] / times[0]:.2f}x"])
    return rows


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A Markdown table, ready to paste into docs/benchmarks.md."""
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main(argv: list[str] | None = None) -> dict[str, list[list[str]]]:
    """Print the three tables; return their rows: ``{"matmul": ..., "passes": ..., "linear": ...}``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--m", type=int, help=f"tokens (default {GPU_M} on CUDA, {CPU_M} on CPU)")
    parser.add_argument("--kn", nargs="+", help="K,N pairs (default Llama-7B/8B on CUDA, scaled down on CPU)")
    parser.add_argument("--peak-gbps", type=float, help=f"memory-bandwidth peak (default {H100_PEAK_GBPS} on CUDA)")
    parser.add_argument("--dtype", choices=hardware.DTYPE_CHOICES, default="auto",
                        help="dtype of the dense contenders and of every activation; auto: bfloat16 on CUDA or a "
                        "CPU with native BF16, float32 otherwise")  # fmt: skip
    parser.add_argument("--warm-caches", action="store_true",
                        help="time the elementwise passes (and their copies) with their inputs in cache, as the calls "
                        "before left them, instead of from memory")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)

    gpu = args.device == "cuda"
    keep_freed_memory()
    if not gpu:
        # Compile the CPU backend's fused helpers in this process: a pool of compile workers would keep running
        # beside the first timed calls on a 2-core machine.
        torch._inductor.config.compile_threads = 1
    m = args.m or (GPU_M if gpu else CPU_M)
    kns = [tuple(int(v) for v in kn.split(",")) for kn in (args.kn or (GPU_KN if gpu else CPU_KN))]
    peak = args.peak_gbps or (H100_PEAK_GBPS if gpu else None)
    dtype = hardware.resolve_dtype(args.dtype, args.device)
    dense = hardware.short_name(dtype).upper()
    backend = kernels.backend_for(torch.empty(0, device=args.device)).__name__.rsplit(".", 1)[-1]
    print(hardware.summary(args.device))
    print(f"bitnet_ao kernels (backend module: {backend}) against {dense}, torch {torch.__version__}")

    tables = {"matmul": bench_matmuls(m, kns, args.device, dtype, args.warmup, args.iters)}
    print_table(
        f"Scaled INT8 matmul (TOPS; {dense} in TFLOPS)",
        ["layout", "MxKxN", "bitnet_ao", "torch._int_mm", f"{dense} mm", "vs _int_mm", f"vs {dense}"],
        tables["matmul"],
    )
    tables["passes"] = bench_quantization(m, kns, args.device, dtype, peak, args.warmup, args.iters, args.warm_caches)
    print_table(
        f"BitNet's elementwise passes, {dense.lower()} activations, float32 weights, inputs "
        + ("in cache" if args.warm_caches else "from memory")
        + ", against a copy of the same bytes ("
        + (f"peak {peak:g} GB/s)" if peak else "no bandwidth peak given)"),
        ["pass", "shape", "ms", "GB/s", "copy GB/s", "vs copy", "of peak"],
        tables["passes"],
    )
    tables["linear"] = bench_linear(m, kns, args.device, dtype, args.warmup, args.iters)
    print_table(
        f"BitNet linear forward + backward vs {dense} nn.Linear (ms)",
        ["MxKxN", "BitNet", dense, "speedup"],
        tables["linear"],
    )
    return tables


if __name__ == "__main__":
    main()
