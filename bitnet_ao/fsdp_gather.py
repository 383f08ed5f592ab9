"""FSDP2's all-gather of a master-weight shard: the math behind ``BitNetTrainingLinearWeight.fsdp_pre_all_gather``
and ``fsdp_post_all_gather`` (docs/numerics.md#weight-scales-under-fsdp2, docs/fsdp2.md).

``fully_shard`` shards each ``BitNetTrainingLinearWeight`` (the high-precision master weight) along dim 0. Before
each all-gather, every rank ternarizes (or binarizes) its shard with the scale of the WHOLE weight and packs it
four values per byte (eight for binary weights; :mod:`bitnet_ao.packing` layout), so the wire carries
``ceil(K / 4)`` bytes per row instead of ``2 K`` (BF16): 1/8 of the bytes (1/16 for binary weights)
(:func:`pre_all_gather`). The scale itself is not gathered: every rank derives it from the same all-reduced sums.
After the all-gather, the gathered bytes become a :class:`~bitnet_ao.packed.BitNetPackedLinearWeight` without a
copy (:func:`post_all_gather`); ``F.linear`` on it runs the BitNet autograd function on the packed values directly
(no BF16 weight is ever rebuilt), and its ``grad_weight`` is a plain tensor in the parameter dtype that FSDP2
reduce-scatters as usual.

Scales: ``s_w = sum|W| / numel(W)`` (and ``mean(W)`` for binary weights) from float64 sums all-reduced with the
element counts over the FSDP shard group only (HSDP replicas hold identical shards and are left out), so a sharded
run gets the single-device scale for any shape, uneven shards included.

The scale state, in one place: each shard keeps the all-reduced sums it was last quantized with in its
``_fsdp_scale_state`` (a :class:`ScaleState`, declared on the master-weight class), written here only, by the
all-gather and by :func:`remember_precomputed` (for ``precompute_bitnet_scale_for_fsdp``, ``bitnet_ao/fsdp.py``).
When it is reused (:func:`_scale_state`): an all-gather in the forward pass uses the state left by the precompute
(one all-reduce for every BitNet weight of the model, called after ``optimizer.step()``) while it is fresh, i.e.
while the version counter of the sharded parameter is unchanged since (an update after the precompute, such as a
misplaced call, a second optimizer step or loading a checkpoint, is never quantized with the stale scale);
otherwise it all-reduces this weight's three float64 values itself. An all-gather inside the backward pass (the
re-gather of ``reshard_after_forward=True``, activation-checkpointing recomputes) always reuses the state of the
forward, so the backward quantizes with exactly the forward's scale and runs no collective. Precomputed states
are also registered by sharded parameter, for the shards FSDP2 replaces (see :func:`remember_precomputed`).

The master-weight class (``bitnet_ao/tensor.py``) imports this module for its hooks, so it cannot be imported
here: the shard is described by what the all-gather uses of it (:class:`MasterWeightShard`).
"""

from __future__ import annotations

import weakref
from typing import NamedTuple, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.utils.weak import WeakIdKeyDictionary

from . import kernels
from .config import BitNetTrainingConfig
from .kernels import reference
from .packed import BitNetPackedLinearWeight, bits_per_value
from .private_api import dtensor_local, in_backward
from .weight_quant import column_group_stats, quantization_from_stats, quantize_weight


class ScaleState(NamedTuple):
    """The all-reduced statistics of a whole weight, kept on its FSDP shard (``_fsdp_scale_state``)."""

    #: float64 ``(sum |W|, sum W)`` over the whole weight (``(G, 2)``, one pair per group, with group scales).
    sums: Tensor
    #: ``out_features`` of the whole weight (the FSDP-sharded dimension).
    rows: int
    #: The process group the sums were all-reduced over. An all-gather uses only a state of its own group: under
    #: FSDP2 x TP the DTensor's shard dimension can be the tensor-parallel one, which precomputing cannot tell.
    group: dist.ProcessGroup
    #: Precomputed states only: the sharded parameter (its in-place updates bump the DTensor's version counter,
    #: not the local shard's) and its version when the sums were taken.
    precomputed_for: tuple[weakref.ref[DTensor], int] | None = None

    def fresh(self) -> bool:
        """Precomputed, and the parameter unchanged since: valid for any forward."""
        if self.precomputed_for is None:
            return False
        param_ref, version = self.precomputed_for
        param = param_ref()
        return param is not None and param._version == version


class MasterWeightShard(Protocol):
    """The FSDP2 shard of a master weight, as the all-gather uses it (a ``BitNetTrainingLinearWeight``)."""

    shape: torch.Size
    config: BitNetTrainingConfig
    #: The high-precision rows of this shard.
    _data: Tensor
    #: The state its all-gathers quantize with; ``None`` until the first all-gather or precompute.
    _fsdp_scale_state: ScaleState | None
    #: ``lambda`` of quantization warmup, ``None`` at 1 (``bitnet_ao.warmup``).
    quantization_strength: Tensor | None


#: Precomputed states by sharded parameter, the object FSDP2 keeps (see :func:`remember_precomputed`).
_PRECOMPUTED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def remember_precomputed(param: DTensor, state: ScaleState) -> None:
    """Keep a precomputed ``state`` on the local shard of ``param`` and under ``param`` itself.

    Every rank must take the same decision (precomputed or all-reduce), or the all-reduces no longer match.
    FSDP2 replaces the local shard object of an unevenly sharded weight on the short ranks only (re-padding in its
    lazy init, after ``load_state_dict``, in ``module._apply``), which drops the state kept on it there; a new
    shard without a state adopts its parameter's."""
    dtensor_local(param)._fsdp_scale_state = _PRECOMPUTED[param] = state


def _adopt_precomputed(shard: MasterWeightShard) -> ScaleState | None:
    for param, state in list(_PRECOMPUTED.items()):
        if dtensor_local(param) is shard:
            shard._fsdp_scale_state = state
            return state
    return None


def shard_stats(shard: MasterWeightShard) -> Tensor:
    """float64 ``(sum |w|, sum w, rows)`` of a shard: the all-reducible form of the scale and element count."""
    w = shard._data
    rows = torch.full((1,), w.shape[0], dtype=torch.float64, device=w.device)
    return torch.cat([kernels.weight_stats(w), rows])


def _group_stats(shard: MasterWeightShard, rows: int, mesh: DeviceMesh) -> Tensor:
    """float64 ``(sum |w|, sum w)`` of each scale group over this shard, ``(G, 2)``: all-reducible. Groups of
    columns lie whole in every shard; groups of rows are found from the shard's first row (FSDP2 puts rank ``r``'s
    rows at ``r ceil(N / world)``)."""
    w, config = shard._data, shard.config
    if config.group_dim == 1:
        return column_group_stats(w, config.scale_groups)
    first_row = mesh.get_local_rank() * -(-rows // mesh.size())
    group_of_row = torch.div(
        first_row + torch.arange(w.shape[0], device=w.device), rows // config.scale_groups, rounding_mode="floor"
    )
    row_stats = torch.stack([w.abs().sum(1, dtype=torch.float64), w.sum(1, dtype=torch.float64)], dim=1)
    return torch.zeros(config.scale_groups, 2, dtype=torch.float64, device=w.device).index_add_(
        0, group_of_row, row_stats
    )


def _scale_state(shard: MasterWeightShard, mesh: DeviceMesh) -> ScaleState:
    """The state this all-gather quantizes with (rules: the module docstring); all-reduces only when needed."""
    group = mesh.get_group()
    state = shard._fsdp_scale_state or _adopt_precomputed(shard)
    if state is not None and state.group is not group:
        state = None
    if state is not None and (in_backward() or state.fresh()):
        return state
    if shard.config.grouped:
        # Group scales (FSDP2 x tensor parallelism): the row count first (once), then the groups' sums.
        if state is not None:
            rows = state.rows
        else:
            count = torch.full((1,), shard.shape[0], dtype=torch.float64, device=shard._data.device)
            dist.all_reduce(count, group=group)
            rows = int(count.item())
        stats = _group_stats(shard, rows, mesh)
        dist.all_reduce(stats, group=group)
        shard._fsdp_scale_state = ScaleState(stats, rows, group)
        return shard._fsdp_scale_state
    stats = shard_stats(shard)
    dist.all_reduce(stats, group=group)
    # The global row count never changes: read it (a device sync) only the first time.
    rows = state.rows if state is not None else int(stats[2].item())
    shard._fsdp_scale_state = ScaleState(stats[:2], rows, group)
    return shard._fsdp_scale_state


def pre_all_gather(shard: MasterWeightShard, mesh: DeviceMesh) -> tuple[tuple[Tensor], tuple[Tensor, int]]:
    """All-gather input: the shard quantized with the global scale and packed, ``(P, ceil(K / 4))`` int8 (binary
    weights: 1 bit per value, ``(P, ceil(K / 8))``).

    ``P = ceil(N / world)`` is FSDP2's padded shard height: every rank must contribute the same number of bytes,
    so a short (or empty) last shard is padded with zero bytes. FSDP2 keeps real rows first (rank ``r`` holds rows
    ``r P ..``), so the gathered ``(world P, bytes per row)`` tensor is the packed weight followed by padding.
    Metadata: the float32 scale and ``N``.

    A shard in quantization warmup (``lambda < 1``, set before ``fully_shard``) is refused: the packed weight has
    nothing high-precision left to blend, and gathering it anyway would train at ``lambda = 1`` without a word.
    """
    if shard.quantization_strength is not None:
        raise NotImplementedError(
            f"BitNet FSDP2 all-gather: a weight shard of shape {tuple(shard.shape)} is in quantization warmup "
            "(lambda < 1), but the all-gather delivers it packed ternary, with nothing high-precision left to "
            "blend. Finish the warmup on one device (or with tensor parallelism only), then shard "
            "(docs/finetuning.md)"
        )
    state = _scale_state(shard, mesh)
    config = shard.config
    n, k = state.rows, shard.shape[1]
    padded_rows = -(-n // mesh.size())
    # Grouped: one value per row (column) of the whole weight, the gathered weight's scale.
    q = quantization_from_stats(state.sums, (n, k), config)
    local = q
    if config.grouped and config.group_dim == 0:  # this shard's rows of it
        first = mesh.get_local_rank() * padded_rows
        rows = slice(first, first + shard.shape[0])
        local = q._replace(scale=q.scale[rows], center=None if q.center is None else q.center[rows])
    packed = reference.pack_weight(
        quantize_weight(shard._data, local, weights=config.weights, transpose=False), bits_per_value(config)
    )
    if packed.shape[0] != padded_rows:
        packed = F.pad(packed, (0, 0, 0, padded_rows - packed.shape[0]))
    return (packed,), (q.scale, n)


def post_all_gather(
    shard: MasterWeightShard,
    all_gather_outputs: tuple[Tensor, ...],
    metadata: tuple[Tensor, int],
    param_dtype: torch.dtype,
    *,
    out: Tensor | None = None,
) -> tuple[BitNetPackedLinearWeight, tuple[Tensor, ...]] | None:
    """Wrap the gathered bytes (a view, no copy) as a :class:`BitNetPackedLinearWeight` of dtype ``param_dtype``.

    With ``out`` (FSDP2 reuses the unsharded parameter after the first all-gather) the packed bytes land in the
    same storage again; only the scale is new, and it is set as a new tensor rather than written in place
    because the autograd graph of a previous forward may have saved the old one.
    """
    (gathered,) = all_gather_outputs
    scale, rows = metadata
    packed = gathered[:rows]
    if out is not None:
        if isinstance(out, DTensor):  # FSDP2 x tensor parallelism: the unsharded parameter is a TP DTensor
            out = dtensor_local(out)
        if not isinstance(out, BitNetPackedLinearWeight):
            raise TypeError(f"BitNet FSDP2 all-gather: expected to refill a BitNetPackedLinearWeight, got {type(out)}")
        out.packed, out.scale = packed, scale
        return None
    return BitNetPackedLinearWeight(packed, scale, shard.shape[1], param_dtype, shard.config), all_gather_outputs
