"""The per-step BitNet hooks torchtitan runs around each optimizer step (``ModelSpec.post_optimizer_build_fn``)."""

from __future__ import annotations

from torch import nn
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.distributed import ParallelDims

import bitnet_ao
from bitnet_ao.warmup import QuantizationWarmup

from .converter import BitNetLinear


def _optimizer_steps(optimizers: OptimizersContainer) -> int:
    """Optimizer steps taken so far, read from the optimizer state (a checkpoint load restores it, so a resumed run
    continues its warmup): Adam-family optimizers keep a ``step`` per parameter."""
    for optimizer in optimizers.optimizers:
        for state in optimizer.state.values():
            if "step" in state:
                return int(state["step"])
    return 0


def _register_warmup(optimizers: OptimizersContainer, model_parts: list[nn.Module]) -> None:
    """Quantization warmup over ``BitNetLinear.Config.quantization_warmup_steps`` (the converter's option):
    lambda follows the optimizer's step count, set before each forward until it reaches 1.

    The warmup is built at the first forward, not here: torchtitan restores a checkpoint (the step count) in
    between, and a job resumed past its warmup is plain BitNet, also under FSDP2, which refuses ``lambda < 1``."""
    steps = {m.quantization_warmup_steps for part in model_parts for m in part.modules() if isinstance(m, BitNetLinear)}
    steps.discard(0)
    if not steps:
        return
    (warmup_steps,) = steps  # one converter sets every linear's
    warmup: QuantizationWarmup | None = None
    handles = []

    def _set_strength(*args: object) -> None:
        nonlocal warmup
        last_step = _optimizer_steps(optimizers)
        if warmup is None:
            warmup = QuantizationWarmup(model_parts, warmup_steps, last_step=last_step)
        else:
            warmup.load_state_dict({"warmup_steps": warmup_steps, "last_step": last_step})
        if warmup.strength == 1.0:
            for handle in handles:
                handle.remove()

    handles.extend(part.register_forward_pre_hook(_set_strength) for part in model_parts)


def register_bitnet_scale_hook(
    optimizers: OptimizersContainer, model_parts: list[nn.Module], parallel_dims: ParallelDims
) -> None:
    """Recompute the BitNet weight scales of all ``model_parts`` after every optimizer step, and drive
    quantization warmup when the converter asks for it (``quantization_warmup_steps``).

    Under FSDP2 a weight's scale is the abs-mean of the *whole* weight, which no rank holds. Computing it
    once per step, right after the weights change, takes one all-reduce for every BitNet weight of every
    model part (``bitnet_ao.precompute_bitnet_scale_for_fsdp``), instead of one per weight inside each
    all-gather. The signature is torchtitan's ``post_optimizer_build_fn``; set it on the ``ModelSpec``.
    ``parallel_dims`` is not needed: each weight all-reduces over its own FSDP shard mesh.
    """

    def _precompute_scales(*args: object, **kwargs: object) -> None:
        bitnet_ao.precompute_bitnet_scale_for_fsdp(model_parts)

    optimizers.register_step_post_hook(_precompute_scales)
    _register_warmup(optimizers, model_parts)
