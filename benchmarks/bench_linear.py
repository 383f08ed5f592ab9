"""One linear layer, forward + backward: BitNet (bitnet_ao) against a dense ``nn.Linear`` and torchao's prototype.

The dense baseline runs in the dtype a user of this hardware trains in (``--dtype auto``,
``benchmarks/hardware.py``): BF16 on CUDA and on CPUs with native BF16 matmuls, FP32 on other CPUs (AVX2 only,
where a BF16 matmul is scalar code); every layer gets inputs in that dtype.

Everything runs in one process on the same inputs, so the printed ratios compare like with like. Times are the
median of ``--iters`` timed iterations after ``--warmup`` untimed ones (the first BitNet call on CPU compiles
its fused quantization helpers). Saved-for-backward bytes count what autograd keeps between forward and
backward, not counting the parameters themselves (they are alive anyway).

    python benchmarks/bench_linear.py                      # CPU, the three Llama-like shapes, the hardware's dtype
    python benchmarks/bench_linear.py --dtype float32      # FP32 baseline whatever the hardware
    python benchmarks/bench_linear.py --device cuda --shapes 8192,4096,14336
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
from collections.abc import Callable
from pathlib import Path

if not __package__:  # run as `python benchmarks/bench_linear.py`: make the `benchmarks` package importable,
    # after site-packages so that the checkout's `kernels/` folder never shadows the Hub `kernels` package
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn
from torchao.quantization import quantize_

from benchmarks import hardware
from benchmarks.timing import measure, synchronize
from bitnet_ao import bitnet_training
from bitnet_ao.warmup import QuantizationWarmup

DEFAULT_SHAPES = ["4096,2048,5632", "4096,5632,2048", "4096,2048,2048"]


def time_fwd_bwd(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, warmup: int, iters: int) -> float:
    """Median seconds of one forward + backward; the gradients are dropped after each, as ``zero_grad`` does."""

    def drop_grads() -> None:
        layer.weight.grad = None
        x.grad = None

    (seconds,) = measure(
        lambda: layer(x).backward(grad),
        warmup=warmup,
        iters=iters,
        sync=functools.partial(synchronize, x.device),
        after=drop_grads,
    )
    return seconds


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one forward, parameters excluded, each storage counted once."""
    param_storages = {_storage(p).data_ptr() for p in layer.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = _storage(t)
        if storage.data_ptr() not in param_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(storages.values())


def _storage(t: torch.Tensor) -> torch.UntypedStorage:
    """The storage behind ``t``; for a weight subclass, the storage of the plain tensor it wraps."""
    while hasattr(t, "_data"):
        t = t._data
    return t.untyped_storage()


def torchao_prototype(layer: nn.Module) -> nn.Module | None:
    """torchao's prototype BitNet (INT8 forward only), or None where this torchao has none."""
    try:
        from torchao.prototype.quantized_training import bitnet_training as prototype_bitnet
    except ImportError:
        return None
    quantize_(layer, prototype_bitnet())
    return layer


def during_warmup(layer: nn.Module) -> nn.Module:
    """The BitNet linear halfway through quantization warmup (lambda = 0.5): the cost of fine-tuning's first
    phase, full-precision matmuls plus the fake quantization of the input and the weight."""
    quantize_(layer, bitnet_training())
    QuantizationWarmup(layer, warmup_steps=2, last_step=1)
    return layer


def main(argv: list[str] | None = None) -> list[dict]:
    """Print the table; return its rows: ``{"shape", "variant", "seconds", "saved_bytes"}`` per shape and variant
    (``seconds`` and ``saved_bytes`` None for a variant this torchao lacks)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="M,K,N triples")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=[*hardware.DTYPE_CHOICES, "float16"],
                        help="dtype of the inputs and of the dense baseline; auto: bfloat16 on CUDA or a CPU with "
                        "native BF16, float32 otherwise")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args(argv)
    dtype = hardware.resolve_dtype(args.dtype, args.device)
    dense = hardware.short_name(dtype)

    variants: dict[str, Callable[[nn.Module], nn.Module | None]] = {
        f"{dense} nn.Linear": lambda m: m,
        "torchao prototype bitnet": torchao_prototype,
        "bitnet_ao (defaults)": lambda m: quantize_(m, bitnet_training()) or m,
        "bitnet_ao (high-precision backward)": lambda m: (
            quantize_(m, bitnet_training(int8_grad_input=False, int8_grad_weight=False)) or m
        ),
        "bitnet_ao during quantization warmup": during_warmup,
    }
    print(hardware.summary(args.device))
    print(f"device={args.device} dtype={dtype} torch={torch.__version__}")
    ratio = f"x {dense.upper()}"
    header = f"{'M,K,N':>16} {'variant':<36} {'ms':>9} {ratio:>7} {'saved MiB':>10} {ratio:>7}"
    print(header)
    print("-" * len(header))
    rows = []
    for shape in args.shapes:
        m, k, n = (int(v) for v in shape.split(","))
        torch.manual_seed(0)
        base = nn.Linear(k, n, bias=False, device=args.device, dtype=dtype)
        x = torch.randn(m, k, device=args.device, dtype=dtype, requires_grad=True)
        grad = torch.randn(m, n, device=args.device, dtype=dtype)
        baseline_t = baseline_b = None
        for name, make in variants.items():
            layer = make(copy.deepcopy(base))
            if layer is None:
                print(f"{shape:>16} {name:<36} {'n/a':>9}")
                rows.append({"shape": shape, "variant": name, "seconds": None, "saved_bytes": None})
                continue
            t = time_fwd_bwd(layer, x, grad, args.warmup, args.iters)
            b = saved_bytes(layer, x)
            baseline_t, baseline_b = baseline_t or t, baseline_b or b
            print(
                f"{shape:>16} {name:<36} {t * 1e3:9.1f} {baseline_t / t:7.2f} {b / 2**20:10.2f} {b / baseline_b:7.3f}"
            )
            rows.append({"shape": shape, "variant": name, "seconds": t, "saved_bytes": b})
    return rows


if __name__ == "__main__":
    main()
