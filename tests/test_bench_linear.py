"""benchmarks/bench_linear.py at a tiny size: every variant is timed on every shape, and the saved-for-backward
bytes are what each layer keeps: the dense layer its input, a BitNet linear the int8 activation and one float32
scale per token (docs/numerics.md#saved-for-backward), about half of a BF16 input."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from benchmarks import bench_linear, hardware
from bitnet_ao import kernels

SHAPES = [(64, 128, 96), (32, 96, 64)]  # (M, K, N)
BITNET = ["bitnet_ao (defaults)", "bitnet_ao (high-precision backward)", "bitnet_ao during quantization warmup"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_variant_and_the_saved_bytes(dtype: torch.dtype, capsys: pytest.CaptureFixture[str]) -> None:
    shapes = [",".join(map(str, s)) for s in SHAPES]
    argv = ["--device", "cpu", "--dtype", str(dtype).removeprefix("torch."), "--warmup", "0", "--iters", "1"]
    rows = bench_linear.main([*argv, "--shapes", *shapes])
    out = capsys.readouterr().out

    dense = f"{hardware.short_name(dtype)} nn.Linear"
    variants = [dense, "torchao prototype bitnet", *BITNET]
    assert [(r["shape"], r["variant"]) for r in rows] == [(s, v) for s in shapes for v in variants]
    has_prototype = importlib.util.find_spec("torchao.prototype.quantized_training") is not None
    for r in rows:
        measured = has_prototype or r["variant"] != "torchao prototype bitnet"
        if measured:
            assert r["seconds"] > 0 and r["saved_bytes"] > 0, r
        else:
            assert r["seconds"] is None and r["saved_bytes"] is None, r
        line = next(line for line in out.splitlines() if line.split()[:1] == [r["shape"]] and r["variant"] in line)
        assert ("n/a" in line) != measured, line

    for (m, k, _), shape in zip(SHAPES, shapes, strict=True):
        saved = {r["variant"]: r["saved_bytes"] for r in rows if r["shape"] == shape}
        assert saved[dense] == m * k * dtype.itemsize, "the dense layer (no bias) keeps its input only"
        # x_q (int8, M x K) and s_x (float32, one per token); the weight's scalar scale may be its own 4 bytes. Where
        # grad_weight's matmul takes its operand packed (AVX-512 VNNI), x_q is saved packed: whole groups of 4 tokens
        # and panels of 64 columns.
        x_q = -(-m // 4) * 4 * -(-k // 64) * 64 if kernels.prepacks_operand(torch.empty(0), b_ternary=False) else m * k
        bitnet = x_q + 4 * m
        assert bitnet <= saved["bitnet_ao (defaults)"] <= bitnet + 4
        assert saved["bitnet_ao (defaults)"] / saved[dense] == pytest.approx((x_q / (m * k) + 4 / k) / dtype.itemsize,
                                                                            abs=4 / 1e3)  # fmt: skip
