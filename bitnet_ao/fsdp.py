"""FSDP2 for BitNet weights: a 2-bit packed all-gather with exact global scales (docs/numerics.md, "Weight scales
under FSDP2").

``fully_shard`` shards each ``BitNetTrainingLinearWeight`` (the high-precision master weight) along dim 0. Before
each all-gather, every rank ternarizes (or binarizes) its shard with the scale of the WHOLE weight and packs it
four values per byte (eight for binary weights; :mod:`bitnet_ao.packing` layout), so the wire carries ``ceil(K / 4)``
bytes per row instead of ``2 K`` (BF16): 1/8 of the bytes (1/16 for binary weights). The scale itself is not
gathered: every rank derives it from the same all-reduced sums. After the all-gather, a
:class:`BitNetPackedLinearWeight` stands in for the weight; ``F.linear`` on it runs the BitNet autograd function of
``linear.py`` on the packed values directly (no BF16 weight is ever rebuilt), and its ``grad_weight`` is a plain
tensor in the parameter dtype that FSDP2 reduce-scatters as usual.

Scales: ``s_w = sum|W| / numel(W)`` (and ``mean(W)`` for binary weights) from float64 sums all-reduced with the
element counts over the FSDP shard group only (HSDP replicas hold identical shards and are left out), so a sharded
run gets the single-device scale for any shape, uneven shards included.

When the scale is computed: the all-reduced sums are kept on the shard (``_fsdp_scale_state``). An all-gather in
the forward pass uses the state left by :func:`precompute_bitnet_scale_for_fsdp` (one all-reduce for every
BitNet weight of the model, called after ``optimizer.step()``) while it is fresh, i.e. while the version counter
of the sharded parameter is unchanged since (an update after the precompute, such as a misplaced call, a second
optimizer step or loading a checkpoint, is never quantized with the stale scale); otherwise it all-reduces this
weight's three float64 values itself. An all-gather inside the backward pass (the re-gather of
``reshard_after_forward=True``, activation-checkpointing recomputes) always reuses the state of the forward, so
the backward quantizes with exactly the forward's scale and runs no collective.

Every rank must take the same decision, or the all-reduces no longer match. FSDP2 replaces the local shard
object of an unevenly sharded weight on the short ranks only (re-padding in its lazy init, after
``load_state_dict``, in ``module._apply``), which drops the state kept on it there; so precomputed states are
also registered by sharded parameter, the object FSDP2 keeps, and a new shard adopts its parameter's state.

This module installs the extension on :class:`~bitnet_ao.BitNetTrainingLinearWeight` when it is imported
(``import bitnet_ao`` does): FSDP2 looks the two hooks up as methods of the sharded local tensor, and keeping them
here keeps every FSDP2 rule in one module, above the weight kinds it uses.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.utils.weak import WeakIdKeyDictionary

from . import kernels
from .kernels import reference
from .packed import BitNetPackedLinearWeight, bits_per_value
from .private_api import dtensor_local, in_backward
from .tensor import BitNetTrainingLinearWeight
from .weight_quant import WeightQuantization, column_group_stats, quantization_from_stats, quantize_weight


class ScaleState(NamedTuple):
    """The all-reduced statistics of a whole weight, kept on its FSDP shard (``_fsdp_scale_state``)."""

    #: float64 ``(sum |W|, sum W)`` over the whole weight.
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


#: Precomputed states by sharded parameter (see the module docstring), for shards FSDP2 replaced since.
_PRECOMPUTED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _adopt_precomputed(weight: BitNetTrainingLinearWeight) -> ScaleState | None:
    for param, state in list(_PRECOMPUTED.items()):
        if dtensor_local(param) is weight:
            weight._fsdp_scale_state = state
            return state
    return None


def _local_stats(weight: BitNetTrainingLinearWeight) -> Tensor:
    """float64 ``(sum |w|, sum w, rows)`` of a shard: the all-reducible form of the scale and element count."""
    w = weight._data
    rows = torch.full((1,), w.shape[0], dtype=torch.float64, device=w.device)
    return torch.cat([kernels.weight_stats(w), rows])


def _group_stats(weight: BitNetTrainingLinearWeight, rows: int, mesh: DeviceMesh) -> Tensor:
    """float64 ``(sum |w|, sum w)`` of each scale group over this shard, ``(G, 2)``: all-reducible. Groups of
    columns lie whole in every shard; groups of rows are found from the shard's first row (FSDP2 puts rank ``r``'s
    rows at ``r ceil(N / world)``)."""
    w, config = weight._data, weight.config
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


def _scale_state(weight: BitNetTrainingLinearWeight, mesh: DeviceMesh) -> ScaleState:
    """The state this all-gather quantizes with (see the module docstring); all-reduces only when needed."""
    group = mesh.get_group()
    state: ScaleState | None = getattr(weight, "_fsdp_scale_state", None) or _adopt_precomputed(weight)
    if state is not None and state.group is not group:
        state = None
    if state is not None and (in_backward() or state.fresh()):
        return state
    if weight.config.grouped:
        # Group scales (FSDP2 x tensor parallelism): the row count first (once), then the groups' sums.
        if state is not None:
            rows = state.rows
        else:
            count = torch.full((1,), weight.shape[0], dtype=torch.float64, device=weight.device)
            dist.all_reduce(count, group=group)
            rows = int(count.item())
        stats = _group_stats(weight, rows, mesh)
        dist.all_reduce(stats, group=group)
        weight._fsdp_scale_state = ScaleState(stats, rows, group)
        return weight._fsdp_scale_state
    stats = _local_stats(weight)
    dist.all_reduce(stats, group=group)
    # The global row count never changes: read it (a device sync) only the first time.
    rows = state.rows if state is not None else int(stats[2].item())
    weight._fsdp_scale_state = ScaleState(stats[:2], rows, group)
    return weight._fsdp_scale_state


def pre_all_gather(weight: BitNetTrainingLinearWeight, mesh: DeviceMesh) -> tuple[tuple[Tensor], tuple[Tensor, int]]:
    """All-gather input: the shard quantized with the global scale and packed, ``(P, ceil(K / 4))`` int8 (binary
    weights: 1 bit per value, ``(P, ceil(K / 8))``).

    ``P = ceil(N / world)`` is FSDP2's padded shard height: every rank must contribute the same number of bytes,
    so a short (or empty) last shard is padded with zero bytes. FSDP2 keeps real rows first (rank ``r`` holds rows
    ``r P ..``), so the gathered ``(world P, bytes per row)`` tensor is the packed weight followed by padding.
    Metadata: the float32 scale and ``N``.
    """
    state = _scale_state(weight, mesh)
    config = weight.config
    n, k = state.rows, weight.shape[1]
    padded_rows = -(-n // mesh.size())
    # Grouped: one value per row (column) of the whole weight, the gathered weight's scale.
    q = quantization_from_stats(state.sums, (n, k), config)
    local = q
    if config.grouped and config.group_dim == 0:  # this shard's rows of it
        first = mesh.get_local_rank() * padded_rows
        local = WeightQuantization(*(None if t is None else t[first : first + weight.shape[0]] for t in q))
    packed = reference.pack_weight(quantize_weight(weight._data, local, transpose=False), bits_per_value(config))
    if packed.shape[0] != padded_rows:
        packed = F.pad(packed, (0, 0, 0, padded_rows - packed.shape[0]))
    return (packed,), (q.scale, n)


def post_all_gather(
    weight: BitNetTrainingLinearWeight,
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
    return BitNetPackedLinearWeight(packed, scale, weight.shape[1], param_dtype, weight.config), all_gather_outputs


# --- precomputing every scale with one collective -------------------------------------------------------


def _shard_group(param: DTensor) -> dist.ProcessGroup:
    """The process group of the FSDP shard dimension: the one mesh dimension the weight is split along (HSDP
    replicates along the other)."""
    (shard_dim,) = [i for i, placement in enumerate(param.placements) if placement.is_shard()]
    return param.device_mesh.get_group(shard_dim)


@torch.no_grad()
def precompute_bitnet_scale_for_fsdp(model: nn.Module | Iterable[nn.Module]) -> None:
    """Compute the global scale of every FSDP2-sharded BitNet weight of ``model`` with ONE all-reduce.

    Call it after ``optimizer.step()``: the next forward all-gathers (and the backward re-gathers of
    ``reshard_after_forward=True``) then run no collective of their own, also over several forwards (gradient
    accumulation). The result is tied to the current weight values: any in-place update of a weight since the
    call makes its all-gather fall back to its own all-reduce, so a stale scale is never used.
    Weights on different shard groups get one all-reduce per group. Weights that tensor parallelism shards too
    (FSDP2 x TP) are skipped: each all-gather computes their (group) scales over its data-parallel mesh.
    ``model`` may be a module or several (e.g. pipeline stages); BitNet weights that are not FSDP2-sharded are
    skipped.
    """
    modules = [model] if isinstance(model, nn.Module) else list(model)
    groups: dict[dist.ProcessGroup, list[DTensor]] = {}
    seen: set[int] = set()
    for module in modules:
        for param in module.parameters():
            if id(param) in seen or not isinstance(param, DTensor):
                continue
            seen.add(id(param))
            local = dtensor_local(param)
            # Weights sharded by tensor parallelism too (two sharded mesh dims, or group scales) compute their
            # scales in their own all-gathers, over the data-parallel mesh FSDP2 hands them.
            sharded_dims = sum(placement.is_shard() for placement in param.placements)
            if isinstance(local, BitNetTrainingLinearWeight) and not local.config.grouped and sharded_dims == 1:
                groups.setdefault(_shard_group(param), []).append(param)
    for group, params in groups.items():
        stats = torch.stack([_local_stats(dtensor_local(param)) for param in params])
        dist.all_reduce(stats, group=group)
        for param, sums in zip(params, stats, strict=True):
            state = ScaleState(sums[:2], param.shape[0], group, (weakref.ref(param), param._version))
            dtensor_local(param)._fsdp_scale_state = _PRECOMPUTED[param] = state


# FSDP2 finds its all-gather extension as methods of the sharded local tensor. The mesh-only form of the pre-hook
# is deliberate: for the five-argument form, FSDP2 (torch 2.13) requires every all-gather input of an unevenly
# sharded weight to have the padded shard's (rows, K) shape, which no packed input can have.
BitNetTrainingLinearWeight.fsdp_pre_all_gather = pre_all_gather
BitNetTrainingLinearWeight.fsdp_post_all_gather = post_all_gather
