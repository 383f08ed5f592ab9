"""Quantization warmup: convert a pretrained model to BitNet gradually (docs/finetuning.md).

Switching a pretrained model's linears to ternary weights and int8 activations all at once destroys much of what
it knew. Hugging Face's "Fine-tuning LLMs to 1.58bit" recovers most of it by blending: each linear computes
``F.linear(x + lambda (fq(x) - x), W + lambda (fq(W) - W))`` with straight-through gradients, and ``lambda``
rises linearly from 0 (the pretrained model) to 1 (BitNet) over ``warmup_steps`` optimizer steps::

    quantize_(model, bitnet_training(), filter_fn=quantize_filter)
    warmup = QuantizationWarmup(model, warmup_steps=500)
    for batch in loader:
        loss(model(batch)).backward()
        optimizer.step()
        optimizer.zero_grad()
        warmup.step()          # like an LR scheduler, after the optimizer

From ``lambda = 1`` on, every linear runs the INT8 BitNet path, bit for bit. Resume with ``state_dict`` /
``load_state_dict`` (as for an LR scheduler); the Hugging Face ``Trainer`` callback
(``bitnet_ao.integrations.trainer.QuantizationWarmupCallback``) derives ``lambda`` from the Trainer's own step.

Where ``lambda`` lives: one 0-d float32 tensor per device, owned by the warmup and updated in place, which every
master weight of the model references while ``lambda < 1`` (``weight.quantization_strength``; ``None`` at 1).
The warmup keeps the model, not its weights: each update finds the weights again, so parameters replaced in
between are driven too, and a weight copied, cast or moved (``module.to``, ``.half()``, ``load_state_dict(assign=
True)``) keeps the reference in the meantime. Under ``torch.compile`` the tensor is a graph input: a compiled
model follows every new ``lambda`` without recompiling, and recompiles at most once when the blend ends at 1.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from .private_api import dtensor_local
from .tensor import BitNetTrainingLinearWeight


def _master_weights(models: tuple[nn.Module, ...]) -> list[BitNetTrainingLinearWeight]:
    """Every BitNet master weight of ``models`` now (the local shard of a distributed one), once each."""
    found: dict[int, BitNetTrainingLinearWeight] = {}
    for param in (p for model in models for p in model.parameters()):
        local = dtensor_local(param) if isinstance(param, DTensor) else param
        if isinstance(local, BitNetTrainingLinearWeight):
            found[id(local)] = local
    return list(found.values())


def _check_not_sharded(models: tuple[nn.Module, ...], strength: float) -> None:
    """FSDP2 all-gathers a BitNet weight already packed ternary: nothing high-precision is left to blend, so
    ``lambda < 1`` is refused there (``lambda = 1``, e.g. a run resumed past its warmup, is plain BitNet)."""
    modules = ((name, m) for model in models for name, m in model.named_modules())
    sharded = next((name or type(m).__name__ for name, m in modules if isinstance(m, FSDPModule)), None)
    if sharded is not None:
        raise NotImplementedError(
            f"QuantizationWarmup: {sharded} is sharded with FSDP2, whose all-gather delivers BitNet weights "
            f"already packed ternary: nothing high-precision is left to blend at strength {strength}. Warm up on "
            "one device (or with tensor parallelism only), then shard"
        )


class QuantizationWarmup:
    """Drives ``lambda = min(step / warmup_steps, 1)`` of every BitNet master weight of ``model``.

    Args:
        model: a model quantized with ``bitnet_training()`` (a module, a peft model around one, or several
            modules such as pipeline stages).
        warmup_steps: optimizer steps from full precision to BitNet; 0 means BitNet from the start.
        last_step: the number of optimizer steps already taken (resuming without a state dict).

    Under FSDP2 the all-gathered weight is already packed ternary, so no high-precision weight exists to blend:
    ``lambda < 1`` raises there, ``lambda = 1`` (a run resumed past its warmup) does not (docs/finetuning.md).
    """

    def __init__(self, model: nn.Module | Iterable[nn.Module], warmup_steps: int, last_step: int = 0) -> None:
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"QuantizationWarmup: warmup_steps must be a non-negative int, got {warmup_steps!r}")
        self.models = (model,) if isinstance(model, nn.Module) else tuple(model)
        if not _master_weights(self.models):
            raise ValueError(
                f"QuantizationWarmup: {', '.join(type(m).__name__ for m in self.models)} has no BitNet training "
                "weight; call quantize_(model, bitnet_training()) first"
            )
        self.warmup_steps = warmup_steps
        self.last_step = last_step
        #: ``lambda`` as the weights read it, one tensor per device, updated in place.
        self._strengths: dict[torch.device, Tensor] = {}
        self._apply()

    @property
    def strength(self) -> float:
        """``lambda``: 0 is full precision, 1 is BitNet."""
        return 1.0 if self.last_step >= self.warmup_steps else self.last_step / self.warmup_steps

    def step(self) -> None:
        """Call once after each optimizer step."""
        self.last_step += 1
        self._apply()

    def _apply(self) -> None:
        """Point every master weight the model holds now at ``lambda`` (``None`` from 1 on: the INT8 path)."""
        strength = self.strength
        weights = _master_weights(self.models)
        if strength == 1.0:
            for weight in weights:
                weight.quantization_strength = None
            return
        _check_not_sharded(self.models, strength)
        for device in {weight.device for weight in weights}:
            self._strength_on(device).fill_(strength)
        for weight in weights:
            weight.quantization_strength = self._strengths[weight.device]

    def _strength_on(self, device: torch.device) -> Tensor:
        """The one ``lambda`` tensor of ``device``: every weight there reads it, so an update is one fill."""
        if device not in self._strengths:
            self._strengths[device] = torch.empty((), dtype=torch.float32, device=device)
        return self._strengths[device]

    def state_dict(self) -> dict[str, int]:
        return {"warmup_steps": self.warmup_steps, "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.warmup_steps = state_dict["warmup_steps"]
        self.last_step = state_dict["last_step"]
        self._apply()
