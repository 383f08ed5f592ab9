"""FSDP2 for BitNet weights: a 2-bit packed all-gather with exact global scales (docs/numerics.md, "Weight scales
under FSDP2"), and :func:`precompute_bitnet_scale_for_fsdp`.

``fully_shard`` shards each ``BitNetTrainingLinearWeight`` (the high-precision master weight) along dim 0. Before
each all-gather, every rank ternarizes (or binarizes) its shard with the scale of the WHOLE weight and packs it
four values per byte (eight for binary weights; :mod:`bitnet_ao.packing` layout), so the wire carries ``ceil(K / 4)``
bytes per row instead of ``2 K`` (BF16): 1/8 of the bytes (1/16 for binary weights). The scale itself is not
gathered: every rank derives it from the same all-reduced sums. After the all-gather, a
:class:`BitNetPackedLinearWeight` stands in for the weight; ``F.linear`` on it runs the BitNet autograd function of
``linear.py`` on the packed values directly (no BF16 weight is ever rebuilt), and its ``grad_weight`` is a plain
tensor in the parameter dtype that FSDP2 reduce-scatters as usual. FSDP2 finds the two hooks as methods of the
sharded local tensor, ``BitNetTrainingLinearWeight.fsdp_pre_all_gather`` / ``fsdp_post_all_gather``
(``bitnet_ao/tensor.py``); their math is ``bitnet_ao/fsdp_gather.py``, below the class.

Scales: ``s_w = sum|W| / numel(W)`` (and ``mean(W)`` for binary weights) from float64 sums all-reduced with the
element counts over the FSDP shard group only (HSDP replicas hold identical shards and are left out), so a sharded
run gets the single-device scale for any shape, uneven shards included.

When the scale is computed: the all-reduced sums are kept on the shard (its ``_fsdp_scale_state``, a
``fsdp_gather.ScaleState``). An all-gather in the forward pass uses the state left by
:func:`precompute_bitnet_scale_for_fsdp` (one all-reduce for every BitNet weight of the model, called after
``optimizer.step()``) while it is fresh, i.e. while the version counter of the sharded parameter is unchanged since
(an update after the precompute, such as a misplaced call, a second optimizer step or loading a checkpoint, is never
quantized with the stale scale); otherwise it all-reduces this weight's three float64 values itself. An all-gather
inside the backward pass (the re-gather of ``reshard_after_forward=True``, activation-checkpointing recomputes)
always reuses the state of the forward, so the backward quantizes with exactly the forward's scale and runs no
collective.

Every rank must take the same decision, or the all-reduces no longer match. FSDP2 replaces the local shard
object of an unevenly sharded weight on the short ranks only (re-padding in its lazy init, after
``load_state_dict``, in ``module._apply``), which drops the state kept on it there; so precomputed states are
also registered by sharded parameter, the object FSDP2 keeps, and a new shard adopts its parameter's state
(``fsdp_gather.remember_precomputed``).
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
