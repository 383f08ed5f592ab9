"""Every exact CPU int8 matmul route against an FP32 GEMM, for the three matmuls of a BitNet linear.

For ``(M, K, N)``: forward ``x_q (M, K) @ W_q.T``, grad_input ``g_q (M, N) @ W_q`` and grad_weight
``g'_q.T (N, M) @ x_q (M, K)``, each operand in the layout the BitNet linear passes it (the ternary weight in the
layout each route asks for). Every route this CPU can run (``cpu_matmul.available_routes``, not the float64
reference; ``int_mm`` only with int8 dot-product instructions, elsewhere it is scalar code) is timed with its
exact int32 result, beside ``torch.mm`` of float32 operands of the same shape: the FP32 training baseline's own
matmul. Median of ``--iters`` after ``--warmup``, the contenders called in turn.

    python benchmarks/bench_cpu_routes.py                        # (4096, 2048, 5632)
    python benchmarks/bench_cpu_routes.py --shape 1024,1024,2816 # an MLP matmul of the main job
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # run as `python benchmarks/bench_cpu_routes.py`: make the `benchmarks` package importable,
    # after site-packages so that the checkout's `kernels/` folder never shadows the Hub `kernels` package
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import hardware
from benchmarks.timing import measure
from bitnet_ao.kernels import cpu_matmul


def matmuls(m: int, k: int, n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, bool]]:
    """The three matmuls of a linear with weight ``(n, k)`` on ``m`` tokens: name -> ``(a, b (row-major), ternary)``."""
    g = torch.Generator().manual_seed(0)
    x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    g_q = torch.randint(-127, 128, (m, n), dtype=torch.int8, generator=g)
    w_q = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=g)
    return {
        "forward": (x_q, w_q.t(), True),
        "grad_input": (g_q, w_q, True),
        "grad_weight": (g_q.t(), x_q, False),
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Print the table; return its median seconds: ``{matmul: {"FP32 GEMM" or route: seconds}}``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4096,2048,5632", help="M,K,N: tokens, in_features, out_features")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)
    m, k, n = (int(v) for v in args.shape.split(","))
    print(hardware.summary("cpu"))
    print(f"{'matmul':<12} {'route':<8} {'ms':>9} {'GOPS':>7} {'x FP32':>7} {'x onednn':>9}")
    results = {}
    for name, (a, b, ternary) in matmuls(m, k, n).items():
        seconds = results[name] = time_routes(a, b, ternary, args.warmup, args.iters)
        ops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
        for route, s in seconds.items():
            vs_fp32, vs_onednn = seconds["FP32 GEMM"] / s, seconds["onednn"] / s if "onednn" in seconds else None
            onednn = f"{vs_onednn:.2f}" if vs_onednn is not None else "-"
            print(f"{name:<12} {route:<8} {s * 1e3:9.1f} {ops / s / 1e9:7.0f} {vs_fp32:7.2f} {onednn:>9}")
    return results


def time_routes(a: torch.Tensor, b: torch.Tensor, ternary: bool, warmup: int, iters: int) -> dict[str, float]:
    """Median seconds of an FP32 GEMM of the same shape and of every candidate route of this kind."""
    routes = cpu_matmul.candidates("ternary" if ternary else "full")
    af, bf = a.float(), b.float()
    fns = [lambda: torch.mm(af, bf)]
    for route in routes:
        operands = (a, cpu_matmul.ternary_layout(b, route) if ternary else b)
        fns.append(lambda route=route, operands=operands: cpu_matmul._route_mm(route, *operands, ternary))
    return dict(zip(("FP32 GEMM", *routes), measure(*fns, warmup=warmup, iters=iters), strict=True))


if __name__ == "__main__":
    main()
