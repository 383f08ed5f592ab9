"""The per-step BitNet hook torchtitan runs after each optimizer step (``ModelSpec.post_optimizer_build_fn``)."""

from __future__ import annotations

from torch import nn
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.distributed import ParallelDims

import bitnet_ao


def register_bitnet_scale_hook(
    optimizers: OptimizersContainer, model_parts: list[nn.Module], parallel_dims: ParallelDims
) -> None:
    """Recompute the BitNet weight scales of all ``model_parts`` after every optimizer step.

    Under FSDP2 a weight's scale is the abs-mean of the *whole* weight, which no rank holds. Computing it
    once per step, right after the weights change, takes one all-reduce for every BitNet weight of every
    model part (``bitnet_ao.precompute_bitnet_scale_for_fsdp``), instead of one per weight inside each
    all-gather. The signature is torchtitan's ``post_optimizer_build_fn``; set it on the ``ModelSpec``.
    ``parallel_dims`` is not needed: each weight all-reduces over its own FSDP shard mesh.
    """

    def _precompute_scales(*args: object, **kwargs: object) -> None:
        bitnet_ao.precompute_bitnet_scale_for_fsdp(model_parts)

    optimizers.register_step_post_hook(_precompute_scales)
