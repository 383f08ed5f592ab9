"""Tensor parallelism for BitNet linears: ``BitNetColwiseParallel`` and ``BitNetRowwiseParallel`` for
``torch.distributed.tensor.parallel.parallelize_module`` (docs/tensor_parallel.md).

With group scales (``bitnet_training(scale_groups=G, group_dim=...)``, docs/numerics.md#group-scales-for-tensor-
parallelism) every rank holds whole groups, so its shard computes its scales locally and a TP run computes what a
single device with the same ``G`` computes. The styles keep the parameter a ``DTensor`` (checkpoints, optimizers
and gradient clipping see the usual sharded parameter), but the module's forward runs the BitNet linear on the
local shard: a ``BitNetTrainingLinearWeight`` holding ``G / T`` groups. The collectives are the stock plan's:

- column-parallel (``group_dim=0``): input replicated, output sharded on the last dimension; no collective in
  the forward, one all-reduce of the input gradient in the backward;
- row-parallel (``group_dim=1``): input sharded on the last dimension, output replicated by one all-reduce of
  the partial sums; none in the backward.

The stock ``ColwiseParallel`` / ``RowwiseParallel`` on a BitNet weight would decompose ``F.linear`` on the
``DTensor`` into a plain matmul of the master weight: full precision, silently. The weight refuses that matmul
with an error naming these styles (``BitNetTrainingLinearWeight.__torch_dispatch__``).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle
from torchao.quantization import quantize_

from .config import BitNetTrainingConfig
from .surgery import LAYOUTS, quantize_filter
from .tensor import BitNetTrainingLinearWeight


class _BitNetLinearParallel(ParallelStyle):
    #: The weight dimension the style shards: 0 (output rows, column-parallel) or 1 (input columns, row-parallel).
    shard_dim: int

    def __init__(self, *, use_local_output: bool = True) -> None:
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        style = type(self).__name__
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or not isinstance(weight, BitNetTrainingLinearWeight):
            raise TypeError(
                f"{style}: {module!r} is not an nn.Linear with a BitNet training weight; quantize_ it with "
                "bitnet_training(scale_groups=..., group_dim=...) first, or use the stock styles for plain linears"
            )
        if device_mesh.ndim != 1:
            raise ValueError(f"{style}: expected a 1-D tensor-parallel mesh, got {device_mesh}")
        config, tp = weight.config, device_mesh.size()
        if config.group_dim != self.shard_dim or config.scale_groups % tp:
            raise ValueError(
                f"{style} on {module!r}: each of the {tp} ranks must hold whole scale groups of the sharded "
                f"dimension, so the weight needs bitnet_training(group_dim={self.shard_dim}, scale_groups=a multiple "
                f"of {tp}); it has group_dim={config.group_dim}, scale_groups={config.scale_groups}"
            )
        local_config = dataclasses.replace(config, scale_groups=config.scale_groups // tp)
        module.weight = nn.Parameter(
            _shard(weight._data, device_mesh, Shard(self.shard_dim), local_config), requires_grad=weight.requires_grad
        )
        if module.bias is not None:
            placement = Shard(0) if self.shard_dim == 0 else Replicate()
            module.bias = nn.Parameter(_shard(module.bias.detach(), device_mesh, placement, None))
        module.forward = types.MethodType(self._forward, module)
        module._bitnet_tp_mesh = device_mesh
        return module

    def _forward(self, module: nn.Linear, x: Tensor) -> Tensor:
        raise NotImplementedError


class BitNetColwiseParallel(_BitNetLinearParallel):
    """Column-parallel BitNet linear: weight rows sharded (``group_dim=0`` groups), input replicated, output
    sharded on the last dimension (a local tensor, or a ``DTensor`` with ``use_local_output=False``), as
    ``ColwiseParallel()``."""

    shard_dim = 0

    def _forward(self, module: nn.Linear, x: Tensor) -> Tensor:
        mesh = module._bitnet_tp_mesh
        x = (
            x.redistribute(mesh, [Replicate()])
            if isinstance(x, DTensor)
            else DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        )
        # The input gradient of this rank's rows is a partial sum: marking it Partial makes the backward all-reduce it.
        x = x.to_local(grad_placements=[Partial()])
        bias = module.bias.to_local() if module.bias is not None else None
        y = F.linear(x, module.weight.to_local(), bias)
        return y if self.use_local_output else DTensor.from_local(y, mesh, [Shard(-1)], run_check=False)


class BitNetRowwiseParallel(_BitNetLinearParallel):
    """Row-parallel BitNet linear: weight columns sharded (``group_dim=1`` groups), input sharded on the last
    dimension, output replicated by one all-reduce (a local tensor, or a ``DTensor`` with ``use_local_output=False``),
    as ``RowwiseParallel()``."""

    shard_dim = 1

    def _forward(self, module: nn.Linear, x: Tensor) -> Tensor:
        mesh = module._bitnet_tp_mesh
        if isinstance(x, DTensor):
            x = x.redistribute(mesh, [Shard(-1)]).to_local()
        partial = F.linear(x, module.weight.to_local())
        y = DTensor.from_local(partial, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()])
        if module.bias is not None:
            y = y + module.bias
        return y.to_local() if self.use_local_output else y


def _shard(t: Tensor, mesh: DeviceMesh, placement, config) -> DTensor:
    """``t`` distributed from rank 0 (as the stock styles do), the local shard a BitNet weight when ``config``."""
    dt = distribute_tensor(t, mesh, [placement])
    if config is None:
        return dt
    local = BitNetTrainingLinearWeight(dt.to_local().contiguous(), config)
    return DTensor.from_local(local, mesh, [placement], run_check=False, shape=dt.shape, stride=dt.stride())


#: Paths (relative to a transformer block) of the linears tensor parallelism shards by input column: the
#: attention output and the MLP's down projection, for every block layout bitnet_ao.surgery knows.
ROW_PARALLEL_PATHS = tuple(sorted({p for layout in LAYOUTS for p in (layout.attention_output, layout.mlp_output)}))


def tensor_parallel_group_dim(fqn: str) -> int:
    """1 for a row-parallel linear (``ROW_PARALLEL_PATHS``, also as ``<path>.linear`` inside a ``NormedLinear``),
    0 for every other (column-parallel) one: the ``group_dim`` its group scales need."""
    return 1 if fqn.removesuffix(".linear").endswith(ROW_PARALLEL_PATHS) else 0


def quantize_for_tensor_parallel(
    model: nn.Module,
    config: BitNetTrainingConfig,
    scale_groups: int,
    filter_fn: Callable[[nn.Module, str], bool] = quantize_filter,
) -> nn.Module:
    """``quantize_(model, config)`` with ``scale_groups`` group scales along each linear's tensor-parallel
    dimension (``tensor_parallel_group_dim``): the single-device model that a TP run of any degree dividing
    ``scale_groups`` equals."""
    for group_dim in (0, 1):
        recipe = dataclasses.replace(config, scale_groups=scale_groups, group_dim=group_dim)

        def selected(module: nn.Module, fqn: str, group_dim: int = group_dim) -> bool:
            return filter_fn(module, fqn) and tensor_parallel_group_dim(fqn) == group_dim

        quantize_(model, recipe, filter_fn=selected)
    return model
