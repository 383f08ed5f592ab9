"""Tensor parallelism with group scales on 2 gloo processes: ``parallelize_module`` with the BitNet styles equals
the single-device model with the same ``scale_groups`` (5 AdamW steps, float32), issues the collectives the stock
plan issues for plain linears, and the stock styles on a BitNet weight raise instead of training in full precision.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn
from torchao.quantization import quantize_

from tests.conftest import read_results, run_distributed, scenario_result

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

DIM, HIDDEN, TP = 30, 42, 2  # not multiples of 8; G = 2 divides both


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(DIM, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, DIM, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(torch.relu(self.w1(x)))


def _bitnet_mlp(weights: str = "ternary") -> MLP:
    from bitnet_ao import bitnet_training

    torch.manual_seed(0)
    model = MLP()
    quantize_(model.w1, bitnet_training(weights=weights, scale_groups=TP, group_dim=0))
    quantize_(model.w2, bitnet_training(weights=weights, scale_groups=TP, group_dim=1))
    return model


def _losses(model: nn.Module, steps: int = 5) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        x = torch.randn(4, 6, DIM, generator=torch.Generator().manual_seed(step))
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _matches_single_device(weights: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from bitnet_ao.tensor_parallel import BitNetColwiseParallel, BitNetRowwiseParallel

    reference = _losses(_bitnet_mlp(weights))
    model = _bitnet_mlp(weights)
    mesh = init_device_mesh("cpu", (TP,))
    parallelize_module(model, mesh, {"w1": BitNetColwiseParallel(), "w2": BitNetRowwiseParallel()})
    local = model.w1.weight.to_local()
    return {
        "reference": reference,
        "tp": _losses(model),
        "local_groups": local.config.scale_groups,
        "local_shape": list(local.shape),
    }


def _stock_styles_raise() -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = _bitnet_mlp()
    mesh = init_device_mesh("cpu", (TP,))
    parallelize_module(model, mesh, {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
    try:
        model(torch.randn(2, DIM))
    except RuntimeError as e:
        return {"message": str(e)}
    return {"message": "no error: the stock styles ran the BitNet weights"}


def _collectives() -> dict:
    """Collectives of one forward + backward: the BitNet plan against the stock plan on plain linears."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from bitnet_ao.tensor_parallel import BitNetColwiseParallel, BitNetRowwiseParallel

    mesh = init_device_mesh("cpu", (TP,))
    counts = {}
    for name, model, plan in (
        ("bitnet", _bitnet_mlp(), {"w1": BitNetColwiseParallel(), "w2": BitNetRowwiseParallel()}),
        ("plain", MLP(), {"w1": ColwiseParallel(), "w2": RowwiseParallel()}),
    ):
        parallelize_module(model, mesh, plan)
        mode = CommDebugMode()
        with mode:
            model(torch.randn(3, DIM, requires_grad=True)).sum().backward()
        counts[name] = {str(op): n for op, n in mode.get_comm_counts().items()}
    return counts


def scenarios(world: int, out_dir: str) -> dict[str, Callable[[], dict]]:
    """The scenarios of the 2-process launch (``tests/conftest.py`` ``run_distributed``)."""
    return {
        "ternary": lambda: _matches_single_device("ternary"),
        "binary": lambda: _matches_single_device("binary"),
        "stock": _stock_styles_raise,
        "collectives": _collectives,
    }


@pytest.fixture(scope="module")
def results() -> Iterator[dict[str, dict]]:
    with tempfile.TemporaryDirectory() as out_dir:
        run_distributed(__name__, TP, out_dir)
        yield read_results(out_dir)


@pytest.mark.parametrize("weights", ["ternary", "binary"])
def test_tp2_equals_single_device_with_the_same_groups(results, weights):
    r = scenario_result(results, weights)
    assert r["local_groups"] == 1 and r["local_shape"] == [HIDDEN // TP, DIM]
    ref, tp = torch.tensor(r["reference"]), torch.tensor(r["tp"])
    assert ((tp - ref).abs() / ref.abs()).max() < 1e-5, (r["reference"], r["tp"])
    assert ref[-1] < ref[0]


def test_stock_styles_on_bitnet_weights_raise_naming_the_bitnet_styles(results):
    message = scenario_result(results, "stock")["message"]
    assert "BitNetColwiseParallel" in message and "full-precision" in message, message


def test_no_collective_beyond_the_stock_plan(results):
    counts = scenario_result(results, "collectives")
    assert counts["bitnet"] == counts["plain"], counts
    assert sum(counts["bitnet"].values()) >= 2  # forward all-reduce (w2) and backward all-reduce (w1's input)
