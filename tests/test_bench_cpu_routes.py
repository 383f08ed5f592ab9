"""benchmarks/bench_cpu_routes.py at a tiny size: each of a BitNet linear's three matmuls is timed on every route
this CPU can run for its kind (``cpu_matmul.available_routes`` less the float64 reference, and less ``int_mm``
without int8 dot-product instructions), the one training uses among them, and every timed call computes the exact
product of the matmul it is reported for."""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks import bench_cpu_routes, timing
from bitnet_ao.kernels import cpu_matmul
from bitnet_ao.kernels.private_api import cpu_has_int8_dot_product

M, K, N = 64, 128, 96


def test_every_route_timed_on_the_right_product(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    products: list[list[torch.Tensor]] = []  # per measure() call: what each timed function returns

    def recording_measure(*fns, **kwargs) -> list[float]:
        products.append([fn() for fn in fns])
        return timing.measure(*fns, **kwargs)

    monkeypatch.setattr(bench_cpu_routes, "measure", recording_measure)
    results = bench_cpu_routes.main(["--shape", f"{M},{K},{N}", "--warmup", "0", "--iters", "1"])
    out = capsys.readouterr().out

    # The three matmuls of a linear with an (N, K) weight on M tokens, and the kind of each: the forward and
    # grad_input multiply by the ternary weight, grad_weight multiplies two full-range int8 operands.
    shapes = {"forward": ((M, K), (K, N)), "grad_input": ((M, N), (N, K)), "grad_weight": ((N, M), (M, K))}
    kinds = {"forward": "ternary", "grad_input": "ternary", "grad_weight": "full"}
    assert list(results) == list(shapes)
    operands = bench_cpu_routes.matmuls(M, K, N)
    slow = {"reference"} | (set() if cpu_has_int8_dot_product() else {"int_mm"})
    chosen = cpu_matmul.routes() if cpu_matmul.ENV_VAR not in os.environ else None
    for (name, seconds), timed in zip(results.items(), products, strict=True):
        kind = kinds[name]
        routes = [r for r in cpu_matmul.available_routes(kind) if r not in slow]
        assert list(seconds) == ["FP32 GEMM", *routes], name
        assert all(s > 0 for s in seconds.values()), seconds
        if chosen is not None:
            assert chosen[kind] in routes, f"{name}: the route training uses ({chosen[kind]}) is not timed"

        a, b, ternary = operands[name]
        assert (tuple(a.shape), tuple(b.shape)) == shapes[name] and ternary == (kind == "ternary")
        assert ternary == bool(b.abs().le(1).all()), "a ternary matmul's right operand holds only -1, 0, 1"
        exact = a.long() @ b.long()
        for label, product in zip(seconds, timed, strict=True):  # the FP32 GEMM too: exact at these sizes
            assert product.shape == exact.shape and torch.equal(product.long(), exact), (name, label)

        ops = 2 * M * K * N
        lines = [line.split() for line in out.splitlines() if line.startswith(f"{name} ")]
        assert [line[1] for line in lines] == [label.split()[0] for label in seconds], "one printed row per route"
        for line, s in zip(lines, seconds.values(), strict=True):
            assert line[-3] == f"{ops / s / 1e9:.0f}", f"{name}: GOPS of 2 M K N operations"
            assert line[-2] == f"{seconds['FP32 GEMM'] / s:.2f}"
