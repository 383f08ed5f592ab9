"""benchmarks/bench_kernels.py at a tiny size: every table is there, its pass table covers every elementwise pass a
BitNet linear runs (recorded from the backend while one trains a step), and each pass is counted at the bytes it
really reads and writes, against a copy of as many bytes."""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn
from torchao.quantization import quantize_

from bitnet_ao import bitnet_training
from bitnet_ao.kernels import torch_backend
from bitnet_ao.surgery import NormedLinear


def _import_bench_kernels():
    """The script drops ``TRITON_INTERPRET`` on import (it times compiled Triton kernels); put it back for the rest
    of the session (tests/conftest.py sets it for the Triton tests; bitnet_ao.kernels is already imported above, so
    the kernels were decorated under it)."""
    saved = os.environ.get("TRITON_INTERPRET")
    try:
        return importlib.import_module("benchmarks.bench_kernels")
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


bench_kernels = _import_bench_kernels()

M, K, N = 64, 128, 96
TINY = ["--device", "cpu", "--m", str(M), "--kn", f"{K},{N}", "--warmup", "0", "--iters", "1"]


@pytest.fixture(autouse=True)
def _keep_inductor_threads() -> Iterator[None]:
    """``main`` sets ``compile_threads = 1`` for its own process; restore it after the test (inductor's config
    module is not one ``monkeypatch`` can restore)."""
    threads = torch._inductor.config.compile_threads
    yield
    torch._inductor.config.compile_threads = threads


def _tensors(obj: object) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)


def _pass_names_of_a_training_step(monkeypatch: pytest.MonkeyPatch, layer: nn.Module) -> set[str]:
    """The backend passes one forward + backward of ``layer`` runs, named as the benchmark's pass table names them:
    the function name, with the variant in parentheses where the table has two rows for one function."""
    seen: set[str] = set()

    def recorder(name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def record(*args, **kwargs):
            if name == "ternarize":
                seen.add("ternarize (K, N)" if args[2] else "ternarize (N, K)")
            elif name == "scale_output":  # the grad_weight epilogue is the one whose output has the weight's shape
                acc = args[0]
                weight_shaped = tuple(acc.shape) == tuple(layer.weight.shape)
                seen.add("scale_output (grad_weight)" if weight_shaped else "scale_output (forward epilogue)")
            else:
                seen.add(name)
            return fn(*args, **kwargs)

        return record

    with monkeypatch.context() as patch:
        for name in dir(torch_backend):
            fn = getattr(torch_backend, name)
            own = callable(fn) and getattr(fn, "__module__", None) == torch_backend.__name__
            # Not the layout queries, nor run_fused: the compile helper the fused passes go through, not a pass.
            if own and not name.startswith(("_", "right_operand_", "prepacks_")) and name != "run_fused":
                patch.setattr(torch_backend, name, recorder(name, fn))
        torch.manual_seed(0)
        x = torch.randn(M, K, requires_grad=True)
        layer(x).backward(torch.randn(M, N))
    assert x.grad is not None and layer.weight.grad is not None
    return seen


def test_tables_at_a_tiny_size(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``main`` prints and returns the three tables: the matmul in each of the BitNet linear's three layouts, every
    elementwise pass of a BitNet linear (the plain one and the one with its RMSNorm fused), the linear itself."""
    plain = nn.Linear(K, N)
    quantize_(plain, bitnet_training())
    normed = NormedLinear.from_linear(nn.Linear(K, N), eps=1e-6)
    quantize_(normed, bitnet_training())
    runs = _pass_names_of_a_training_step(monkeypatch, plain) | _pass_names_of_a_training_step(monkeypatch, normed)
    matmuls = {"scaled_int8_mm", "scaled_int8_mm_prepacked"}  # the second where the route takes packed operands
    assert {"quantize_grad_output", "rms_norm_quantize_rowwise", "rms_norm_backward"} <= runs and runs & matmuls

    tables = bench_kernels.main([*TINY, "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert set(tables) == {"matmul", "passes", "linear"}
    for rows in tables.values():
        for row in rows:
            assert "| " + " | ".join(row) + " |" in out, row

    shape = f"{M}x{K}x{N}"
    assert [row[:2] for row in tables["matmul"]] == [["NT", shape], ["NN", shape], ["TN", shape]]
    for row in tables["matmul"]:  # bitnet_ao, _int_mm (n/a where it refuses a layout), dense: TOPS / TFLOPS
        assert float(row[2]) > 0 and float(row[4]) > 0 and (row[3] == "n/a" or float(row[3]) > 0), row

    passes = {row[0]: row for row in tables["passes"]}
    assert len(passes) == len(tables["passes"]), "one row per pass at one (K, N)"
    missing = runs - matmuls - set(passes)
    assert not missing, f"passes a BitNet linear runs without a row in the table: {sorted(missing)}"
    weight_passes = (
        "weight_stats",
        "ternarize (K, N)",
        "ternarize (N, K)",
        "ternarize_packed",
        "scale_output (grad_weight)",
    )
    for name, row in passes.items():
        assert row[1] == (f"{N}x{K}" if name in weight_passes else f"{M}x{N if 'output' in name else K}"), row
        assert float(row[2]) > 0 and float(row[4]) > 0, row  # the pass's time, the copy's bandwidth
        assert row[6] == "n/a", "no bandwidth peak on CPU unless given"

    ((linear_shape, bitnet_ms, dense_ms, speedup),) = tables["linear"]
    assert linear_shape == shape and float(bitnet_ms) > 0 and float(dense_ms) > 0 and speedup.endswith("x")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pass_bytes_are_what_the_passes_move(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each pass's GB/s counts the bytes its call reads and writes: every matrix it is given and every matrix it
    returns, in their dtypes, plus at most its vectors (scales, gains) counted in the same call; the copy it is
    compared with moves as many bytes. With every call "taking" 1 ns, GB/s is the byte count the script used."""
    calls: list[tuple[Callable, ...]] = []

    def one_ns_each(
        *fns: Callable, warmup: int, iters: int, sync: Callable | None = None, after: Callable | None = None
    ) -> list[float]:
        assert after is not None, "each call starts from memory: the caches are emptied after every call"
        calls.append(tuple((fn, fn()) for fn in fns))
        return [1e-9] * len(fns)

    monkeypatch.setattr(bench_kernels, "measure", one_ns_each)
    rows = bench_kernels.bench_quantization(M, [(K, N)], "cpu", dtype, None, 0, 1)
    assert len(rows) == len(calls)
    for row, ((fn, outputs), (copy, _)) in zip(rows, calls, strict=True):
        assert isinstance(fn, functools.partial) and copy.__name__ == "clone", row
        tensors = [*_tensors(fn.args), *_tensors(outputs)]
        matrices = sum(t.nbytes for t in tensors if t.dim() == 2 and min(t.shape) > 1)
        vectors = sum(t.nbytes for t in tensors) - matrices
        counted = float(row[3])  # bytes / 1 ns / 1e9
        assert matrices <= counted <= matrices + vectors, (row[0], matrices, vectors, counted)
        assert float(row[4]) == pytest.approx(counted, abs=1), "the copy moves the pass's bytes"
        assert row[5] == "100%"
