"""Tensor parallelism with group scales on 2 gloo processes: ``parallelize_module`` with the BitNet styles equals
the single-device model with the same ``scale_groups`` (5 AdamW steps, float32), issues the collectives the stock
plan issues for plain linears, and the stock styles on a BitNet weight raise instead of training in full precision.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.distributed as dist
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


def _bitnet_mlp(weights: str = "ternary", normed: str | None = None) -> MLP:
    """``normed``: the linear (``w1`` or ``w2``) that gets a BitNet norm (``NormedLinear``, a trained gain)."""
    from bitnet_ao import bitnet_training
    from bitnet_ao.surgery import NormedLinear

    torch.manual_seed(0)
    model = MLP()
    if normed is not None:
        norm = NormedLinear.from_linear(getattr(model, normed), eps=1e-5).norm
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
    quantize_(model.w1, bitnet_training(weights=weights, scale_groups=TP, group_dim=0))
    quantize_(model.w2, bitnet_training(weights=weights, scale_groups=TP, group_dim=1))
    return model


def _losses(model: nn.Module, steps: int = 5, sequence_parallel: bool = False, dp_mesh=None) -> list[float]:
    """Training losses of 5 AdamW steps. ``sequence_parallel``: each rank feeds its part of the sequence and the
    output, sharded the same way, is gathered for the loss. ``dp_mesh``: each data-parallel rank feeds its half of
    the batch (FSDP2 averages the gradients), and the reported loss is the average over them."""
    from torch.distributed.tensor import DTensor, Shard

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        x = torch.randn(4, 6, DIM, generator=torch.Generator().manual_seed(step))
        if dp_mesh is not None:
            x = x.chunk(dp_mesh.size(), dim=0)[dp_mesh.get_local_rank()]
        if sequence_parallel:
            mesh = model.w1.weight.device_mesh
            y = model(x.chunk(TP, dim=1)[mesh.get_local_rank()])
            y = DTensor.from_local(y, mesh, [Shard(1)], run_check=False).full_tensor()
        else:
            y = model(x)
        loss = y.square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if dp_mesh is not None:
            loss = loss.detach().clone()
            dist.all_reduce(loss, group=dp_mesh.get_group())
            loss /= dp_mesh.size()
        losses.append(loss.item())
    return losses


def _plan(sequence_parallel: bool, bitnet: bool = True) -> dict:
    """Colwise w1 + rowwise w2, with sequence parallelism (activations sharded on dim 1 outside the pair) or not."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from bitnet_ao.tensor_parallel import BitNetColwiseParallel, BitNetRowwiseParallel

    colwise, rowwise = (BitNetColwiseParallel, BitNetRowwiseParallel) if bitnet else (ColwiseParallel, RowwiseParallel)
    if sequence_parallel:
        return {"w1": colwise(input_layouts=Shard(1)), "w2": rowwise(output_layouts=Shard(1))}
    return {"w1": colwise(), "w2": rowwise()}


def _matches_single_device(weights: str, sequence_parallel: bool = False, normed: str | None = None) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    reference = _losses(_bitnet_mlp(weights, normed))
    model = _bitnet_mlp(weights, normed)
    mesh = init_device_mesh("cpu", (TP,))
    parallelize_module(model, mesh, _plan(sequence_parallel))
    local = model.w1.weight.to_local()
    return {
        "reference": reference,
        "tp": _losses(model, sequence_parallel=sequence_parallel),
        "local_groups": local.config.scale_groups,
        "local_shape": list(local.shape),
    }


def _data_parallel_reference(model: nn.Module, dp: int, steps: int = 5) -> list[float]:
    """Single-device training as ``dp`` data-parallel ranks do it: each rank's part of the batch in turn, the
    gradients summed in rank order and averaged (as FSDP2 reduces them), the loss averaged."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        x = torch.randn(4, 6, DIM, generator=torch.Generator().manual_seed(step))
        grads, step_losses = [], []
        for part in x.chunk(dp, dim=0):
            loss = model(part).square().mean()
            loss.backward()
            step_losses.append(loss.item())
            grads.append([p.grad for p in model.parameters()])
            model.zero_grad(set_to_none=True)
        for p, gs in zip(model.parameters(), zip(*grads, strict=True), strict=True):
            p.grad = sum(gs[1:], gs[0]) / dp
        optimizer.step()
        optimizer.zero_grad()
        losses.append(sum(step_losses) / dp)
    return losses


def _fsdp_tp(weights: str) -> dict:
    """A (2, 2) mesh: FSDP2 over "dp", the BitNet styles over "tp"; the same G as the single-device model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    reference = _data_parallel_reference(_bitnet_mlp(weights), 2)
    model = _bitnet_mlp(weights)
    mesh = init_device_mesh("cpu", (2, TP), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], _plan(False))
    for module in (model.w1, model.w2, model):
        fully_shard(module, mesh=mesh["dp"])
    return {"reference": reference, "tp": _losses(model, dp_mesh=mesh["dp"])}


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


def _unshardable_raise() -> dict:
    """``shard_bitnet_linear``, the check every BitNet tensor-parallel path shares: a column-parallel style on a
    weight grouped by columns, and on a plain linear; BitNet norms in front of a row-parallel linear and of a
    sequence-parallel one."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import parallelize_module

    from bitnet_ao.tensor_parallel import BitNetColwiseParallel, BitNetRowwiseParallel

    mesh = init_device_mesh("cpu", (TP,))
    messages = []
    cases = ((_bitnet_mlp(), "w2", BitNetColwiseParallel), (MLP(), "w1", BitNetColwiseParallel),
             (_bitnet_mlp(normed="w2"), "w2", BitNetRowwiseParallel),
             (_bitnet_mlp(normed="w1"), "w1", lambda: BitNetColwiseParallel(input_layouts=Shard(1))))  # fmt: skip
    for model, name, style in cases:
        try:
            parallelize_module(model, mesh, {name: style()})
        except (TypeError, ValueError) as e:
            messages.append(str(e))
    return {"messages": messages}


def _collectives(sequence_parallel: bool) -> dict:
    """Collectives of one forward + backward: the BitNet plan against the stock plan on plain linears."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (TP,))
    counts = {}
    for name, model in (("bitnet", _bitnet_mlp()), ("plain", MLP())):
        parallelize_module(model, mesh, _plan(sequence_parallel, bitnet=name == "bitnet"))
        mode = CommDebugMode()
        with mode:
            model(torch.randn(3, 4, DIM, requires_grad=True)).sum().backward()
        counts[name] = {str(op): n for op, n in mode.get_comm_counts().items()}
    return counts


def scenarios(world: int, out_dir: str) -> dict[str, Callable[[], dict]]:
    """The scenarios of the 2- and 4-process launches (``tests/conftest.py`` ``run_distributed``)."""
    if world == 4:
        return {"fsdp_tp_ternary": lambda: _fsdp_tp("ternary"), "fsdp_tp_binary": lambda: _fsdp_tp("binary")}
    return {
        "ternary": lambda: _matches_single_device("ternary"),
        "binary": lambda: _matches_single_device("binary"),
        "ternary_sp": lambda: _matches_single_device("ternary", sequence_parallel=True),
        "binary_sp": lambda: _matches_single_device("binary", sequence_parallel=True),
        "ternary_normed": lambda: _matches_single_device("ternary", normed="w1"),
        "stock": _stock_styles_raise,
        "unshardable": _unshardable_raise,
        "collectives": lambda: _collectives(sequence_parallel=False),
        "collectives_sp": lambda: _collectives(sequence_parallel=True),
    }


@pytest.fixture(scope="module")
def results() -> Iterator[dict[str, dict]]:
    with tempfile.TemporaryDirectory() as out_dir:
        for world in (TP, 2 * TP):
            run_distributed(__name__, world, out_dir)
        yield read_results(out_dir)


@pytest.mark.parametrize("weights", ["ternary", "binary", "ternary_sp", "binary_sp", "ternary_normed"])
def test_tp2_equals_single_device_with_the_same_groups(results, weights):
    """With and without sequence parallelism (then the int8 activation and its scales are all-gathered), and with
    a BitNet norm in front of the column-parallel linear (``NormedLinear``: each rank normalizes whole tokens)."""
    r = scenario_result(results, weights)
    assert r["local_groups"] == 1 and r["local_shape"] == [HIDDEN // TP, DIM]
    ref, tp = torch.tensor(r["reference"]), torch.tensor(r["tp"])
    assert ((tp - ref).abs() / ref.abs()).max() < 1e-5, (r["reference"], r["tp"])
    assert ref[-1] < ref[0]


@pytest.mark.parametrize("weights", ["ternary", "binary"])
def test_fsdp2_x_tp_on_a_2x2_mesh_equals_single_device(results, weights):
    r = scenario_result(results, f"fsdp_tp_{weights}")
    ref, tp = torch.tensor(r["reference"]), torch.tensor(r["tp"])
    assert ((tp - ref).abs() / ref.abs()).max() < 1e-5, (r["reference"], r["tp"])


def test_stock_styles_on_bitnet_weights_raise_naming_the_bitnet_styles(results):
    message = scenario_result(results, "stock")["message"]
    assert "BitNetColwiseParallel" in message and "full-precision" in message, message


def test_weights_that_cannot_be_sharded_raise_saying_why(results):
    wrong_groups, plain, normed_row, normed_sp = scenario_result(results, "unshardable")["messages"]
    assert "the input features that row parallelism shards" in normed_row, normed_row
    assert "sequence parallelism gives each rank only its own tokens" in normed_sp, normed_sp
    assert "needs group_dim=0 and scale_groups a multiple of 2; it has group_dim=1" in wrong_groups, wrong_groups
    assert "bitnet_training(group_dim=0" in wrong_groups
    assert "not an nn.Linear with a BitNet training weight" in plain, plain


@pytest.mark.parametrize("name", ["collectives", "collectives_sp"])
def test_no_collective_beyond_the_stock_plan(results, name):
    counts = scenario_result(results, name)
    assert counts["bitnet"] == counts["plain"], counts
    # Without SP: the forward all-reduce (w2) and the backward all-reduce (w1's input gradient); with SP the
    # all-gather (w1's input) and reduce-scatter (w2's output) and their backward counterparts.
    assert sum(counts["bitnet"].values()) >= 2
