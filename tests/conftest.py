"""Test-session setup and the helpers several test modules share."""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import json
import os
import socket
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]

# pytest imports the tests with --import-mode=importlib (pyproject.toml), which adds nothing to sys.path: bitnet_ao
# comes from the installed package. The checkout's root is appended after site-packages, for the `benchmarks`
# package only, so that its `kernels/` folder never shadows the Hub `kernels` package that transformers imports.
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

# The packages whose releases this suite meets first, with the version each resolved to (in pytest's header).
DEPENDENCIES = (
    "torch", "torchao", "triton", "transformers", "kernels", "peft", "torchtitan", "gguf", "llama-cpp-python",
)  # fmt: skip


def pytest_sessionstart(session: pytest.Session) -> None:
    """Print the version each dependency resolved to, first thing, also under ``-q`` (which hides pytest's header):
    CI installs into a new venv each run, so a failure can be read against the releases it met."""

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("dependencies: " + ", ".join(f"{name} {version(name)}" for name in DEPENDENCIES))


# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when bitnet_ao.kernels is first imported, so it
# must be set here, before any test module imports bitnet_ao: without a GPU the Triton kernels then run in
# Triton's interpreter on CPU tensors (tests/test_triton_kernels.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    """A freshly initialized, seeded 2-layer Hugging Face ``LlamaForCausalLM``, small enough for a test step in
    milliseconds (no download); ``overrides`` change its ``LlamaConfig``."""
    import transformers

    config = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config, **overrides}))


def not_lm_head(module: nn.Module, fqn: str) -> bool:
    """``quantize_`` filter of the BitNet recipe for HF models: every linear but the output head."""
    return isinstance(module, nn.Linear) and "lm_head" not in fqn


def master_tensor(t: Tensor) -> Tensor:
    """The plain master weight behind a ``BitNetTrainingLinearWeight``; any other tensor as it is."""
    from bitnet_ao import BitNetTrainingLinearWeight

    return t._data if isinstance(t, BitNetTrainingLinearWeight) else t


def save_load_roundtrip(obj: Any) -> Any:
    """``obj`` through ``torch.save`` into memory and back with ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def fit(loss_of: Callable[[Any], Tensor], optimizer: torch.optim.Optimizer, batches: Iterable) -> list[float]:
    """One optimizer step per batch on ``loss_of(batch)``; the losses, one per step."""
    losses = []
    for batch in batches:
        loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def random_int8(
    *shape: int,
    low: int = -128,
    high: int = 128,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A tensor of uniformly random int8 values in ``[low, high)`` (the whole int8 range by default)."""
    return torch.randint(low, high, shape, dtype=torch.int8, device=device, generator=generator)


def free_port() -> int:
    """A TCP port nobody listens on, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exact_route_pairs() -> list[tuple[str, str]]:
    """``(ternary, full)`` pairs of CPU int8 matmul routes that cover every route this machine can run, one pair per
    ternary route (the full-range matmul takes the same route where it is exact for it, else a full-range route
    not yet covered, else FP32): what :func:`cpu_route` runs a test under, so that an AVX-512 machine also runs
    the routes an AVX2 machine chooses, and the other way round."""
    from bitnet_ao.kernels import cpu_matmul

    full = [r for r in cpu_matmul.available_routes("full") if r != "reference"]
    ternary = [r for r in cpu_matmul.available_routes("ternary") if r != "reference"]
    uncovered = [r for r in full if r not in ternary]
    return [(t, t if t in full else (uncovered.pop(0) if uncovered else "fp32")) for t in ternary]


@pytest.fixture(params=exact_route_pairs(), ids=lambda pair: f"{pair[0]}+{pair[1]}")
def cpu_route(request, force_routes) -> tuple[str, str]:
    """Runs the test once per route pair of :func:`exact_route_pairs`, forced for the whole test."""
    force_routes(*request.param)
    return request.param


@pytest.fixture
def force_routes(monkeypatch):
    """``force_routes(ternary, full)``: make the CPU int8 matmuls take the given routes (``cpu_matmul.ROUTES``)
    for the rest of the test, whatever this CPU would choose."""
    from bitnet_ao.kernels import cpu_matmul

    def force(ternary: str, full: str) -> None:
        monkeypatch.setattr(cpu_matmul, "routes", lambda: {"ternary": ternary, "full": full})

    return force


def run_distributed(module: str, world: int, out_dir: str) -> None:
    """Spawn ``world`` gloo processes that run the scenarios of test module ``module`` (its
    ``scenarios(world, out_dir)``: name -> function returning a JSON-able dict) in order. Rank 0 writes each result,
    or the traceback of the one that raised (the launch stops there), to ``out_dir/<name>.json``."""
    import torch.multiprocessing as mp

    with contextlib.suppress(mp.ProcessRaisedException):  # the failing scenario's JSON says why
        mp.start_processes(
            _distributed_worker, (world, free_port(), out_dir, module), nprocs=world, start_method="spawn"
        )


def _distributed_worker(rank: int, world: int, port: int, out_dir: str, module: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name, scenario in importlib.import_module(module).scenarios(world, out_dir).items():
            try:
                result = scenario()
            except Exception:
                result = {"error": traceback.format_exc()}
                raise
            finally:
                if rank == 0:
                    Path(out_dir, f"{name}.json").write_text(json.dumps(result))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def read_results(out_dir: str) -> dict[str, dict]:
    """The scenario results :func:`run_distributed` wrote, by name."""
    return {p.stem: json.loads(p.read_text()) for p in Path(out_dir).glob("*.json")}


def scenario_result(results: dict[str, dict], name: str) -> dict:
    """One scenario's result, failing the test with the scenario's traceback if it raised or did not run."""
    if name not in results:
        pytest.fail(f"scenario {name} did not run (an earlier scenario failed: {sorted(results)})")
    if results[name].get("error"):
        pytest.fail(f"scenario {name} raised:\n{results[name]['error']}")
    return results[name]
