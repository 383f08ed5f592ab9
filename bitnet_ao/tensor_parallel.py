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
  the partial sums; none in the backward;
- with sequence parallelism (``BitNetColwiseParallel(input_layouts=Shard(1))``,
  ``BitNetRowwiseParallel(output_layouts=Shard(1))``): the column-parallel input is quantized on its sequence
  shard and all-gathered as int8 + scales (one collective), the input gradient reduce-scattered; the row-parallel
  output reduce-scattered.

Under FSDP2 x TP (``fully_shard`` over the data-parallel mesh afterwards), the master weight's FSDP2 hooks
(``fsdp_gather.py``) all-gather the local shards packed with their group scales.

The stock ``ColwiseParallel`` / ``RowwiseParallel`` on a BitNet weight would decompose ``F.linear`` on the
``DTensor`` into a plain matmul of the master weight: full precision, silently. The weight refuses that matmul
with an error naming these styles (``BitNetTrainingLinearWeight.__torch_dispatch__``).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle
from torchao.quantization import quantize_

from .config import BitNetTrainingConfig
from .layouts import LAYOUTS, quantize_filter
from .linear import bitnet_linear
from .surgery import NormedLinear
from .tensor import BitNetTrainingLinearWeight


class _BitNetLinearParallel(ParallelStyle):
    #: The weight dimension the style shards: 0 (output rows, column-parallel) or 1 (input columns, row-parallel).
    shard_dim: int

    def __init__(
        self,
        *,
        input_layouts: Placement | None = None,
        output_layouts: Placement | None = None,
        use_local_output: bool = True,
    ) -> None:
        # Sequence parallelism: the column-parallel input or the row-parallel output sharded along the sequence
        # (Shard(1) of a (batch, sequence, features) activation), as the stock styles take it.
        default_input, default_output = (Replicate(), Shard(-1)) if self.shard_dim == 0 else (Shard(-1), Replicate())
        self.input_layout = input_layouts or default_input
        self.output_layout = output_layouts or default_output
        if self.shard_dim == 0 and (
            self.input_layout not in (Replicate(), Shard(1)) or self.output_layout != Shard(-1)
        ):
            raise ValueError(
                f"{type(self).__name__}: input_layouts must be Replicate() or Shard(1) (sequence parallel) and the "
                f"output is Shard(-1); got {input_layouts}, {output_layouts}"
            )
        if self.shard_dim == 1 and (
            self.input_layout != Shard(-1) or self.output_layout not in (Replicate(), Shard(1))
        ):
            raise ValueError(
                f"{type(self).__name__}: the input is Shard(-1) and output_layouts must be Replicate() or Shard(1) "
                f"(sequence parallel); got {input_layouts}, {output_layouts}"
            )
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if isinstance(module, NormedLinear) and (self.shard_dim == 1 or self.input_layout != Replicate()):
            why = (
                "normalizes the input features that row parallelism shards across ranks"
                if self.shard_dim == 1
                else "has a gain whose gradient sums over every token, and sequence parallelism gives each rank "
                "only its own tokens"
            )
            raise ValueError(
                f"{type(self).__name__} on {module!r}: its BitNet norm (apply_bitnet_norms) {why}, and a "
                "distributed RMSNorm is not implemented: tensor parallelism supports BitNet norms in front of "
                "column-parallel linears with a replicated input only (the FAQ placement's q/k/v and gate/up norms, "
                "without sequence parallelism; not its o/down norms, nor subln's sub-norms)"
            )
        shard_bitnet_linear(
            module,
            device_mesh,
            self.shard_dim,
            who=type(self).__name__,
            remedy=f"quantize_ it with bitnet_training(group_dim={self.shard_dim}, scale_groups=a multiple of the "
            "tensor-parallel degree), or use the stock styles for plain linears",
        )
        if module.bias is not None:
            placement = Shard(0) if self.shard_dim == 0 else Replicate()
            module.bias = nn.Parameter(_shard(module.bias.detach(), device_mesh, placement, None))
        forward = types.MethodType(self._forward, module)
        if isinstance(module, NormedLinear):  # replicated input: each rank normalizes whole tokens
            module.forward = lambda x: forward(module.norm(x))
        else:
            module.forward = forward
        return module

    def _forward(self, module: nn.Linear, x: Tensor) -> Tensor:
        raise NotImplementedError


class BitNetColwiseParallel(_BitNetLinearParallel):
    """Column-parallel BitNet linear: weight rows sharded (``group_dim=0`` groups), input replicated, output
    sharded on the last dimension (a local tensor, or a ``DTensor`` with ``use_local_output=False``), as
    ``ColwiseParallel()``."""

    shard_dim = 0

    def _forward(self, module: nn.Linear, x: Tensor) -> Tensor:
        mesh = module.weight.device_mesh  # the tensor-parallel mesh (also of FSDP2's unsharded parameter)
        bias = module.bias.to_local() if module.bias is not None else None
        if self.input_layout == Shard(1):
            # Sequence parallel: quantize this rank's tokens, all-gather int8 + scales (one collective), and
            # reduce-scatter the input gradient back in the backward (bitnet_linear's SequenceGather).
            if isinstance(x, DTensor):
                x = x.redistribute(mesh, [Shard(1)]).to_local()
            y = bitnet_linear(x, module.weight.to_local(), bias, sequence_gather=_SequenceGather(mesh, x.shape[:-1]))
            return y if self.use_local_output else DTensor.from_local(y, mesh, [Shard(-1)], run_check=False)
        y = local_shard_linear(x, module.weight, self.shard_dim, bias)
        return y.to_local() if self.use_local_output else y


class BitNetRowwiseParallel(_BitNetLinearParallel):
    """Row-parallel BitNet linear: weight columns sharded (``group_dim=1`` groups), input sharded on the last
    dimension, output replicated by one all-reduce (a local tensor, or a ``DTensor`` with ``use_local_output=False``),
    as ``RowwiseParallel()``."""

    shard_dim = 1

    def _forward(self, module: nn.Linear, x: Tensor) -> Tensor:
        mesh = module.weight.device_mesh
        # All-reduce, or reduce-scatter along the sequence under sequence parallelism.
        y = local_shard_linear(x, module.weight, self.shard_dim).redistribute(mesh, [self.output_layout])
        if module.bias is not None:
            y = y + module.bias
        return y.to_local() if self.use_local_output else y


def shard_bitnet_linear(module: nn.Module, mesh: DeviceMesh, shard_dim: int, who: str, remedy: str) -> None:
    """Shard the BitNet weight of ``module`` over the 1-D tensor-parallel ``mesh`` along ``shard_dim`` (0: output
    rows, column-parallel; 1: input columns, row-parallel), in place: the one check and sharding of both the styles
    above and the torchtitan converter. Each rank must hold whole scale groups of the sharded dimension, so that it
    computes its scales locally; ``who`` and ``remedy`` (how its user sets the groups) make the error's words."""
    weight = getattr(module, "weight", None)
    if not isinstance(module, nn.Linear) or not isinstance(weight, BitNetTrainingLinearWeight):
        raise TypeError(f"{who}: {module!r} is not an nn.Linear with a BitNet training weight; {remedy}")
    if mesh.ndim != 1:
        raise ValueError(f"{who}: expected a 1-D tensor-parallel mesh, got {mesh}")
    config, tp = weight.config, mesh.size()
    if config.group_dim != shard_dim or config.scale_groups % tp:
        raise ValueError(
            f"{who} on {module!r}: tensor parallelism of degree {tp} shards the weight along dim {shard_dim}, and "
            f"each rank must hold whole scale groups of it, so the weight needs group_dim={shard_dim} and "
            f"scale_groups a multiple of {tp}; it has group_dim={config.group_dim}, "
            f"scale_groups={config.scale_groups}: {remedy}"
        )
    module.weight = nn.Parameter(shard_bitnet_weight(weight, mesh, shard_dim), requires_grad=weight.requires_grad)


def local_shard_linear(x: Tensor, weight: DTensor, shard_dim: int, bias: Tensor | None = None) -> DTensor:
    """The BitNet linear of a tensor-parallel module on this rank's shard of ``weight`` (sharded along
    ``shard_dim`` by :func:`shard_bitnet_linear`), the forward of both the styles above and the torchtitan
    converter's ``BitNetLinear``: ``F.linear`` on the ``DTensor`` would be taken apart into a plain matmul of the
    master weight, so the BitNet linear runs on the local shard and the result goes back into a ``DTensor``.

    Column-parallel (0): ``x`` replicated, the output sharded on its last dimension, plus ``bias`` (this rank's
    slice). Row-parallel (1): ``x`` sharded on its last dimension, the output ``Partial`` (the sum over the ranks
    pending); a row-parallel bias is added after that reduction, by the caller."""
    if shard_dim == 0:
        y = column_parallel_linear(x, weight, bias)
        return DTensor.from_local(y, weight.device_mesh, [Shard(y.dim() - 1)], run_check=False)
    if bias is not None:
        raise ValueError("local_shard_linear: a row-parallel bias is added once, after the reduction")
    return row_parallel_partial(x, weight)


def column_parallel_linear(x: Tensor, weight: DTensor, bias: Tensor | None) -> Tensor:
    """The column-parallel BitNet linear on this rank's rows of ``weight`` (a ``DTensor`` over the TP mesh): ``x``
    replicated (a ``DTensor``, or a local tensor that every rank holds whole), the local output columns returned.
    This rank's rows give a partial input gradient: marking it ``Partial`` makes the backward all-reduce it."""
    mesh = weight.device_mesh
    if isinstance(x, DTensor):
        x = x.redistribute(mesh, [Replicate()])
    else:
        x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
    return F.linear(x.to_local(grad_placements=[Partial()]), weight.to_local(), bias)


def row_parallel_partial(x: Tensor, weight: DTensor) -> DTensor:
    """The row-parallel BitNet linear on this rank's columns of ``weight``: ``x`` sharded on its last dimension (a
    ``DTensor``, or this rank's local shard), the output a ``Partial`` ``DTensor`` (sum over the ranks pending)."""
    mesh = weight.device_mesh
    if isinstance(x, DTensor):
        x = x.redistribute(mesh, [Shard(x.dim() - 1)]).to_local()
    return DTensor.from_local(F.linear(x, weight.to_local()), mesh, [Partial()], run_check=False)


class _SequenceGather:
    """``bitnet_linear``'s ``SequenceGather`` over the tensor-parallel mesh, for an input of leading shape
    ``(batch, local sequence)``: the float32 scales travel as 4 int8 bytes appended to each token's values, so the
    forward issues one all-gather (of ``K + 4`` bytes per token instead of ``2 K`` in BF16)."""

    def __init__(self, mesh: DeviceMesh, lead: tuple[int, ...]) -> None:
        self.mesh, self.lead = mesh, tuple(lead)

    def gather(self, x_q: Tensor, s_x: Tensor) -> tuple[Tensor, Tensor]:
        k = x_q.shape[1]
        scale_bytes = s_x.float().contiguous().view(torch.int8).reshape(x_q.shape[0], -1)
        local = torch.cat([x_q, scale_bytes], dim=1).view(*self.lead, -1)
        full = DTensor.from_local(local, self.mesh, [Shard(local.dim() - 2)], run_check=False).full_tensor()
        full = full.reshape(-1, full.shape[-1])
        return full[:, :k].contiguous(), full[:, k:].contiguous().view(torch.float32).reshape(full.shape[0])

    def scatter(self, grad_x: Tensor) -> Tensor:
        full = grad_x.reshape(*self.lead[:-1], -1, grad_x.shape[-1])
        dim = full.dim() - 2
        local = DTensor.from_local(full, self.mesh, [Partial()], run_check=False).redistribute(self.mesh, [Shard(dim)])
        return local.to_local().reshape(-1, grad_x.shape[-1])


def shard_bitnet_weight(weight: BitNetTrainingLinearWeight, mesh: DeviceMesh, dim: int) -> DTensor:
    """``weight`` distributed over the 1-D tensor-parallel ``mesh`` along ``dim``, each rank's shard a BitNet weight
    with its ``scale_groups / T`` groups (the caller checked that they divide)."""
    local = dataclasses.replace(weight.config, scale_groups=weight.config.scale_groups // mesh.size())
    return _shard(weight._data, mesh, Shard(dim), local)


def _shard(t: Tensor, mesh: DeviceMesh, placement, config) -> DTensor:
    """``t`` distributed from rank 0 (as the stock styles do), the local shard a BitNet weight when ``config``."""
    dt = distribute_tensor(t, mesh, [placement])
    if config is None:
        return dt
    local = BitNetTrainingLinearWeight(dt.to_local().contiguous(), config)
    return DTensor.from_local(local, mesh, [placement], run_check=False, shape=dt.shape, stride=dt.stride())


#: Paths (relative to a transformer block) of the linears tensor parallelism shards by input column: the
#: row-parallel roles (the attention output and the MLP's down projection) of every layout in bitnet_ao.layouts.
ROW_PARALLEL_PATHS = tuple(
    sorted({layout.path(r) for layout in LAYOUTS for r in layout.block_linears if r.row_parallel})
)


def tensor_parallel_group_dim(fqn: str) -> int:
    """1 for a row-parallel linear (``ROW_PARALLEL_PATHS``), 0 for every other (column-parallel) one: the
    ``group_dim`` its group scales need."""
    return 1 if fqn.endswith(ROW_PARALLEL_PATHS) else 0


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
