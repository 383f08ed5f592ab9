"""The model changes BitNet recommends, as an explicit step before ``quantize_`` (docs/numerics.md#model-changes).

A quantized linear sees its input through a per-token int8 absmax: a few large activations squeeze every
other value of the token into a handful of levels. The BitNet FAQ therefore normalizes the input of every
quantized linear with its own RMSNorm (inside its ``BitLinear``) and drops the block's pre-attention and
pre-MLP norms, which those per-linear norms make redundant. Embeddings and the output head are untouched.

    from bitnet_ao.surgery import apply_bitnet_norms, quantize_filter
    report = apply_bitnet_norms(model)                 # placement="faq"
    print(report)                                      # what was inserted and removed
    quantize_(model, bitnet_training(), filter_fn=quantize_filter)

Each normalized linear becomes a :class:`NormedLinear`: the same module (its parameters and hooks unchanged) at
the same name, an ``nn.Linear`` still, with its norm as the child ``.norm``. ``quantize_``, peft's
``target_modules`` and the state dict see the linear where they saw it before; the state dict gains the norms'
gains (``attention.wq.norm.weight``), so pretrained weights load before or after the surgery (``strict=False``
after it, or the norms' keys are missing).

Placements:

- ``"faq"``: an RMSNorm before every linear of the attention and the MLP, one per linear as in the FAQ's
  ``BitLinear`` (q, k and v each get their own, and so do the MLP's gate and up projections: they normalize
  the same input but learn separate gains); the block's two pre-norms become ``nn.Identity``.
- ``"subln"``: Microsoft's BitNet b1.58 2B4T: the pre-norms stay, and one extra RMSNorm sits inside the
  attention before the output projection and inside the MLP before the down projection. Every quantized
  linear still reads a normalized input, but q, k and v (and gate and up) share one norm, the pre-norm:
  4 norms per block instead of 7, which matters on CPU where an eager RMSNorm forward and backward costs
  about as much as a 1024-wide INT8 matmul.

Models are recognized by the module names of their transformer blocks, from the table of layouts in
``bitnet_ao.layouts`` (:data:`LAYOUTS`): a Llama with Meta's reference names, torchtitan's Llama 3 and Hugging
Face's ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``. The roles there say which linears get a norm and which norms
go away. :func:`detect_placement` reads the placement back from a model, for the exporters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .layouts import BlockLayout, Placement, base_linear, find_blocks, module_at, quantize_filter
from .linear import InputNorm, bitnet_linear, is_bitnet_weight
from .norm import RMSNorm, effective_eps

logger = logging.getLogger(__name__)


def normed_linears(layout: BlockLayout, placement: Placement) -> tuple[str, ...]:
    """The paths of a block's linears that get a norm in front of them, in forward order
    (:meth:`BlockLayout.normed_roles`)."""
    return tuple(layout.path(r) for r in layout.normed_roles(placement))


class NormedLinear(nn.Linear):
    """``linear(norm(x))``: an ``nn.Linear`` with its own RMSNorm (no bias) in front, the FAQ's ``BitLinear``.

    It *is* the linear, at the linear's name, with the norm as its child ``.norm``: the state dict keeps the
    linear's keys (``attention.wq.weight``) and adds ``attention.wq.norm.weight``, ``quantize_`` and its filters
    see the ``nn.Linear`` where they saw it before, and stock peft (``target_modules=["q_proj"]``) adapts it
    like any linear. :meth:`from_linear` turns a linear into one in place by swapping its class, as FSDP2's
    ``fully_shard`` does: its parameters (and any optimizer state on them) and hooks stay; a subclass of
    ``nn.Linear`` gets a ``Normed<Class>`` subclass that keeps its own forward after the norm. Hooks on the module
    see its input before the norm.

    Once the weight is a BitNet weight, the norm runs fused into the linear's activation quantization
    (``bitnet_linear(..., input_norm=...)``): one pass over the activation that normalizes, takes the per-token
    absmax and writes int8, instead of writing the normalized activation and reading it twice. The int8 values
    are the same as norm-then-linear. A subclass whose own forward does more than ``F.linear`` runs unfused.

    Checkpoints of the earlier wrapper layout (``attention.wq.linear.weight``) load into it unchanged.
    """

    norm: RMSNorm
    #: Whether the forward after the norm is ``nn.Linear``'s (``F.linear``), which the fused path replaces.
    _fuses: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        after = mro[mro.index(NormedLinear) + 1 :]
        cls._fuses = next(k.__dict__["forward"] for k in after if "forward" in k.__dict__) is nn.Linear.forward

    @staticmethod
    def from_linear(linear: nn.Linear, eps: float) -> NormedLinear:
        """``linear`` with an RMSNorm over its input features in front (unit gain, ``eps``), in place."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NormedLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear, NormedLinear):
            raise ValueError(f"NormedLinear.from_linear: {linear!r} already has its input norm")
        norm = RMSNorm(linear.in_features, eps=eps, device=linear.weight.device, dtype=linear.weight.dtype)
        linear.__class__ = _normed_class(type(linear))
        linear.norm = norm
        return linear

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        fusable = (
            type(self)._fuses
            and is_bitnet_weight(weight)
            and not (weight.config.grouped and weight.config.group_dim == 1)
            and self.norm.weight is not None
        )
        if not fusable:
            return super().forward(self.norm(x))
        return bitnet_linear(x, weight, self.bias, InputNorm(self.norm.weight, effective_eps(self.norm.eps, x.dtype)))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        for leaf in ("weight", "bias"):  # the earlier NormedLinear(norm, linear) wrapper's keys
            old = f"{prefix}linear.{leaf}"
            if old in state_dict and f"{prefix}{leaf}" not in state_dict:
                state_dict[f"{prefix}{leaf}"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


_NORMED_CLASSES: dict[type, type] = {nn.Linear: NormedLinear}


def _normed_class(cls: type) -> type:
    """The ``NormedLinear`` class of a linear of class ``cls``: ``NormedLinear`` itself for ``nn.Linear``, one
    ``Normed<Class>`` per other subclass (made once, so that modules of one class share it)."""
    if cls not in _NORMED_CLASSES:
        _NORMED_CLASSES[cls] = type(f"Normed{cls.__name__}", (NormedLinear, cls), {"__module__": cls.__module__})
    return _NORMED_CLASSES[cls]


@dataclass
class SurgeryReport:
    """What :func:`apply_bitnet_norms` changed, as fully qualified module names."""

    layout: str  # the naming scheme the blocks were recognized by (bitnet_ao.layouts), not the model's family
    placement: Placement
    model: str  # the model's class
    inserted: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        return (
            f"apply_bitnet_norms(placement={self.placement!r}) on {self.model} ({self.layout} names): "
            f"{len(self.inserted)} RMSNorm inserted, {len(self.removed)} norm removed"
        )

    def __str__(self) -> str:
        lines = [self.summary]
        lines += [f"  inserted RMSNorm before {name}" for name in self.inserted]
        lines += [f"  removed {name}" for name in self.removed]
        return "\n".join(lines)


def _replace(block: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = module_at(block, parent_path) if parent_path else block
    setattr(parent, name, new)


def rms_norm_eps(norm: nn.Module) -> float | None:
    """The eps of an RMS norm: torch's ``nn.RMSNorm`` and bitnet_ao's (``.eps``; ``None``: the machine eps of the
    input's dtype), Hugging Face's ``LlamaRMSNorm`` / ``Qwen2RMSNorm`` (``.variance_epsilon``). ``TypeError`` for
    any other module (a LayerNorm subtracts the mean: no RMSNorm reproduces it)."""
    if isinstance(norm, nn.RMSNorm):
        return norm.eps
    if hasattr(norm, "variance_epsilon") and "RMSNorm" in type(norm).__name__:
        return float(norm.variance_epsilon)
    raise TypeError(f"{type(norm).__name__} is not an RMS norm")


def _rms_norm_gain_and_eps(norm: nn.Module, features: int) -> tuple[Tensor | None, float | None] | None:
    """The gain (``None``: no affine gain) and eps (:func:`rms_norm_eps`) of an RMS norm over ``features``, or
    ``None`` for anything else."""
    try:
        eps = rms_norm_eps(norm)
    except TypeError:
        return None
    gain = getattr(norm, "weight", None)
    if gain is not None and tuple(gain.shape) != (features,):
        return None
    return gain, eps


def apply_bitnet_norms(
    model: nn.Module, placement: Placement = "faq", eps: float | None = None, keep_block_norms: bool = False
) -> SurgeryReport:
    """Insert the BitNet RMSNorms into every transformer block of ``model``, in place; see the module doc.

    Call it before ``quantize_`` (and before building the optimizer: the new norms have parameters).
    ``keep_block_norms``: with the FAQ placement, keep the block's pre-norms too (a model trained that way, e.g.
    in transformers with ``use_rms_norm``, has learned gains there). Returns a :class:`SurgeryReport`, also
    logged at INFO level.

    The norms are created on the device and in the dtype of the linear they precede. So that a pretrained model
    computes what it computed before (docs/finetuning.md), a norm in front of an attention or MLP input (FAQ: q,
    k, v, gate, up) takes the gain and eps of the block's pre-norm it stands in for: with that pre-norm removed,
    it *is* the pre-norm, and the function is unchanged; with ``keep_block_norms`` the gain moves into the new
    norms and the kept pre-norm gets unit gain (unchanged up to eps: the second norm sees a row of RMS ~1). The
    norms in front of the attention output and the MLP's down projection (FAQ, and subln's sub-norms) divide by
    a per-token RMS that was not there: they start with unit gain, which :func:`calibrate_bitnet_norms` can
    replace with the mean RMS of their inputs. A fresh model (unit gains) gets unit gains everywhere, as before.
    ``eps``: of every inserted norm; ``None`` takes the pre-norm's (1e-5 where a block has no RMS pre-norm).
    """
    if placement not in ("faq", "subln"):
        raise ValueError(f"apply_bitnet_norms: placement must be 'faq' or 'subln', got {placement!r}")
    done = next((name for name, m in model.named_modules() if isinstance(m, NormedLinear)), None)
    if done is not None:
        raise ValueError(f"apply_bitnet_norms: the model already has BitNet norms (at {done}); apply it once")
    layout, blocks = find_blocks(model, "apply_bitnet_norms")
    report = SurgeryReport(layout.name, placement, type(model).__name__)
    roles = {layout.path(r): r for r in layout.block_linears}
    for block_name, block in blocks:
        prefix = f"{block_name}." if block_name else ""
        # The pre-norm of each part (attention, MLP), read before anything changes.
        pre = {
            role.norm: _rms_norm_gain_and_eps(
                module_at(block, layout.path(role.norm)), module_at(block, path).in_features
            )
            for path, role in roles.items()
            if role.kind == "input" and role.norm in layout.modules
        }
        default_eps = next((ge[1] for ge in pre.values() if ge is not None), 1e-5)
        moved = set()
        for path in normed_linears(layout, placement):
            role = roles[path]
            source = pre.get(role.norm) if role.kind == "input" else None
            norm_eps = eps if eps is not None else source[1] if source is not None else default_eps
            normed = NormedLinear.from_linear(module_at(block, path), norm_eps)
            if source is not None and source[0] is not None:
                with torch.no_grad():
                    normed.norm.weight.copy_(source[0])
                moved.add(role.norm)
            report.inserted.append(prefix + path)
        if placement == "faq" and not keep_block_norms:
            for path in layout.pre_norms:
                _replace(block, path, nn.Identity())
                report.removed.append(prefix + path)
        elif placement == "faq":
            for role in moved:  # the gain now sits in the new norms
                with torch.no_grad():
                    module_at(block, layout.path(role)).weight.fill_(1.0)
    logger.info("%s", report)
    return report


@dataclass(frozen=True)
class AppliedPlacement:
    """The BitNet norms a model has, as the arguments of the :func:`apply_bitnet_norms` call that gives them."""

    placement: Placement
    #: The eps of every inserted norm (``None``: the machine eps of the input's dtype).
    eps: float | None
    #: Whether the blocks' pre-norms are still there: FAQ with ``keep_block_norms``, and always with subln.
    keep_block_norms: bool


def detect_placement(model: nn.Module, caller: str = "detect_placement") -> AppliedPlacement | None:
    """Which BitNet norms ``model`` has, read back from its blocks (:func:`find_blocks`, through peft layers):
    the inverse of :func:`apply_bitnet_norms`, ``None`` for a model without them. The exporters map the placement
    to their target's graph from it, and ``benchmarks/model.py`` repeats the surgery on the Hugging Face copy.

    Raises ``ValueError`` starting with ``caller`` for norms no call of :func:`apply_bitnet_norms` gives: other
    linears normed, some pre-norms removed and not others, blocks that differ, inserted norms of different eps."""
    layout, blocks = find_blocks(model, caller)
    pre_norms = tuple(r for r in layout.block_roles if r.kind == "norm")
    found: dict[tuple[Placement | None, bool], str] = {}
    eps = set()
    for name, block in blocks:
        linears = {r: base_linear(module_at(block, layout.path(r))) for r in layout.block_linears}
        normed = tuple(r for r, m in linears.items() if isinstance(m, NormedLinear))
        removed = tuple(r for r in pre_norms if isinstance(module_at(block, layout.path(r)), nn.Identity))
        eps.update(linears[r].norm.eps for r in normed)
        if not normed and not removed:
            found.setdefault((None, True), name)
        elif normed == layout.normed_roles("faq") and removed in ((), pre_norms):
            found.setdefault(("faq", not removed), name)
        elif normed == layout.normed_roles("subln") and not removed:
            found.setdefault(("subln", True), name)
        else:
            raise ValueError(
                f"{caller}: {name or 'the model'} has RMSNorms before "
                f"{[layout.path(r) for r in normed] or 'no linear'} and "
                f"{[layout.path(r) for r in removed] or 'no pre-norm'} removed, which apply_bitnet_norms does not "
                f"give: the FAQ placement normalizes {list(normed_linears(layout, 'faq'))} (the pre-norms removed, or "
                f"kept with keep_block_norms), subln {list(normed_linears(layout, 'subln'))} (the pre-norms kept)"
            )
    if len(found) > 1:
        kinds = {(None, True): "no BitNet norms", ("faq", True): "FAQ, pre-norms kept", ("faq", False): "FAQ"}
        mixed = ", ".join(f"{name or 'the model'}: {kinds.get(key, key[0])}" for key, name in found.items())
        raise ValueError(f"{caller}: the blocks mix norm placements ({mixed}); apply_bitnet_norms gives all the same")
    if len(eps) > 1:
        values = sorted(eps, key=lambda e: -1.0 if e is None else e)  # None: the dtype's machine eps
        raise ValueError(
            f"{caller}: the inserted norms have different eps {values}; apply_bitnet_norms(eps=...) gives them one"
        )
    (placement, keep), _ = found.popitem()
    return AppliedPlacement(placement, eps.pop(), keep) if placement is not None else None


def _unpreserved_norms(model: nn.Module) -> dict[str, NormedLinear]:
    """The inserted norms that cannot reproduce the pretrained function: those before the attention output and
    the MLP's down projection (both placements), by the linear's fully qualified name."""
    layout, blocks = find_blocks(model, "calibrate_bitnet_norms")
    found = {}
    for block_name, block in blocks:
        prefix = f"{block_name}." if block_name else ""
        for role in layout.normed_roles("subln"):
            module = base_linear(module_at(block, layout.path(role)))
            if isinstance(module, NormedLinear):
                found[prefix + layout.path(role)] = module
    return found


@torch.no_grad()
def calibrate_bitnet_norms(model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
    """Set the gain of every inserted norm before an attention output or an MLP down projection to the mean RMS
    of its input over ``batches``, so that on average its output has the scale the linear read before the
    surgery (a unit gain would feed it rows of RMS 1 instead). The other inserted norms reproduce the pretrained
    function already (:func:`apply_bitnet_norms`) and are left alone.

    Call it after :func:`apply_bitnet_norms`, before training; ``quantize_`` may come before or after (the
    inputs are the same up to the quantization of the layers before). ``batches``: what the model is called with,
    one at a time: a tensor of token ids (``model(batch)``), a tuple (``model(*batch)``) or a dict
    (``model(**batch)``). One pass: every norm's statistics are taken with the gains as they were (all unit after
    the surgery), and all gains are set at the end. Returns the new gain by linear name.
    """
    norms = _unpreserved_norms(model)
    if not norms:
        raise ValueError(
            f"calibrate_bitnet_norms: {type(model).__name__} has no BitNet norm before an attention output or MLP "
            "down projection; call apply_bitnet_norms(model) first"
        )
    sums = dict.fromkeys(norms, 0.0)
    counts = dict.fromkeys(norms, 0)

    def hook(name: str, eps: float) -> Callable:
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().double()
            rms = (x.square().mean(-1) + eps).sqrt()
            sums[name] += rms.sum().item()
            counts[name] += rms.numel()

        return record

    handles = [
        m.register_forward_pre_hook(hook(name, m.norm.eps if m.norm.eps is not None else 0.0))
        for name, m in norms.items()
    ]
    was_training = model.training
    try:
        model.eval()
        for batch in batches:
            if isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not all(counts.values()):
        missing = [name for name, count in counts.items() if not count]
        raise ValueError(f"calibrate_bitnet_norms: the batches never reached {missing[:3]}; pass at least one batch")
    gains = {name: sums[name] / counts[name] for name in norms}
    for name, m in norms.items():
        if m.norm.weight is None:
            raise ValueError(f"calibrate_bitnet_norms: the norm before {name} has no gain (elementwise_affine=False)")
        m.norm.weight.fill_(gains[name])
    logger.info(
        "calibrate_bitnet_norms: %d norm gains set, from %.3g to %.3g",
        len(gains),
        min(gains.values()),
        max(gains.values()),
    )
    return gains


__all__ = [
    "AppliedPlacement",
    "BlockLayout",
    "NormedLinear",
    "SurgeryReport",
    "apply_bitnet_norms",
    "base_linear",
    "calibrate_bitnet_norms",
    "detect_placement",
    "find_blocks",
    "normed_linears",
    "quantize_filter",
]
