"""``precompute_bitnet_scale_for_fsdp``: the global scales of every FSDP2-sharded BitNet weight of a model in ONE
all-reduce, ahead of the next forward's all-gathers.

The all-gather itself, a 2-bit packed all-gather with exact global scales, is the master weight's FSDP2 extension
(``BitNetTrainingLinearWeight.fsdp_pre_all_gather`` / ``fsdp_post_all_gather``, ``bitnet_ao/tensor.py``) with its
math and its scale state in ``bitnet_ao/fsdp_gather.py``, which also says when an all-gather uses a precomputed
state and when it all-reduces itself (docs/fsdp2.md, docs/numerics.md#weight-scales-under-fsdp2). This module adds
only the precompute: the float64 sums of every weight of one shard group stacked into one tensor, all-reduced once,
and handed to ``fsdp_gather.remember_precomputed`` with the parameter's version.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from .fsdp_gather import ScaleState, remember_precomputed, shard_stats
from .private_api import dtensor_local
from .tensor import BitNetTrainingLinearWeight


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
        stats = torch.stack([shard_stats(dtensor_local(param)) for param in params])
        dist.all_reduce(stats, group=group)
        for param, sums in zip(params, stats, strict=True):
            precomputed_for = (weakref.ref(param), param._version)
            remember_precomputed(param, ScaleState(sums[:2], param.shape[0], group, precomputed_for))
