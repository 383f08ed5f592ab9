"""The model changes BitNet recommends, as an explicit step before ``quantize_`` (docs/numerics.md#model-changes).

A quantized linear sees its input through a per-token int8 absmax: a few large activations squeeze every
other value of the token into a handful of levels. The BitNet FAQ therefore normalizes the input of every
quantized linear with its own RMSNorm (inside its ``BitLinear``) and drops the block's pre-attention and
pre-MLP norms, which those per-linear norms make redundant. Embeddings and the output head are untouched.

    from bitnet_ao.surgery import apply_bitnet_norms, quantize_filter
    report = apply_bitnet_norms(model)                 # placement="faq"
    print(report)                                      # what was inserted and removed
    quantize_(model, bitnet_training(), filter_fn=quantize_filter)

Each normalized linear becomes a :class:`NormedLinear` holding ``.norm`` and the original ``.linear``
(its class, parameters and hooks unchanged), so ``quantize_`` still finds the ``nn.Linear``. The linear's
state-dict keys gain a ``.linear`` component (``attention.wq.weight`` -> ``attention.wq.linear.weight``):
load pretrained weights before the surgery.

Placements:

- ``"faq"``: an RMSNorm before every linear of the attention and the MLP, one per linear as in the FAQ's
  ``BitLinear`` (q, k and v each get their own, and so do the MLP's gate and up projections: they normalize
  the same input but learn separate gains); the block's two pre-norms become ``nn.Identity``.
- ``"subln"``: Microsoft's BitNet b1.58 2B4T: the pre-norms stay, and one extra RMSNorm sits inside the
  attention before the output projection and inside the MLP before the down projection. Every quantized
  linear still reads a normalized input, but q, k and v (and gate and up) share one norm, the pre-norm:
  4 norms per block instead of 7, which matters on CPU where an eager RMSNorm forward and backward costs
  about as much as a 1024-wide INT8 matmul.

Models are recognized by the module names of their transformer blocks (:data:`LAYOUTS`): a Llama with Meta's
reference names, torchtitan's Llama 3 and Hugging Face's ``LlamaForCausalLM``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from .linear import InputNorm, bitnet_linear, is_bitnet_weight
from .norm import RMSNorm

logger = logging.getLogger(__name__)

Placement = Literal["faq", "subln"]

#: Names of output heads, which stay in high precision (:func:`quantize_filter`).
HEAD_NAMES = ("output", "lm_head")


@dataclass(frozen=True)
class BlockLayout:
    """Where a transformer block keeps its norms and linears, as paths relative to the block."""

    name: str
    attention_norm: str
    mlp_norm: str
    attention_inputs: tuple[str, ...]
    attention_output: str
    mlp_inputs: tuple[str, ...]
    mlp_output: str

    def linears(self, placement: Placement) -> tuple[str, ...]:
        """The linears that get a norm in front of them, in forward order."""
        if placement == "subln":
            return (self.attention_output, self.mlp_output)
        return (*self.attention_inputs, self.attention_output, *self.mlp_inputs, self.mlp_output)

    def paths(self) -> tuple[str, ...]:
        return (self.attention_norm, self.mlp_norm, *self.linears("faq"))


_META_MLP = dict(mlp_norm="ffn_norm", mlp_inputs=("feed_forward.w1", "feed_forward.w3"), mlp_output="feed_forward.w2")

LAYOUTS: tuple[BlockLayout, ...] = (
    BlockLayout(
        "Llama (Meta reference names)",
        attention_norm="attention_norm",
        attention_inputs=("attention.wq", "attention.wk", "attention.wv"),
        attention_output="attention.wo",
        **_META_MLP,
    ),
    BlockLayout(
        "torchtitan Llama 3 (fused QKV)",
        attention_norm="attention_norm",
        attention_inputs=("attention.qkv_linear.wqkv",),
        attention_output="attention.wo",
        **_META_MLP,
    ),
    BlockLayout(
        "torchtitan Llama 3 (separate QKV)",
        attention_norm="attention_norm",
        attention_inputs=("attention.qkv_linear.wq", "attention.qkv_linear.wk", "attention.qkv_linear.wv"),
        attention_output="attention.wo",
        **_META_MLP,
    ),
    BlockLayout(
        "Hugging Face Llama",
        attention_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
        attention_inputs=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        attention_output="self_attn.o_proj",
        mlp_inputs=("mlp.gate_proj", "mlp.up_proj"),
        mlp_output="mlp.down_proj",
    ),
)


class NormedLinear(nn.Module):
    """``linear(norm(x))``: a linear with its own RMSNorm (no bias) in front, the FAQ's ``BitLinear`` layout.

    ``linear`` is kept as it is, so ``quantize_`` turns it into a BitNet linear like any other. Once it is one, the
    norm runs fused into the linear's activation quantization (``bitnet_linear(..., input_norm=...)``): one pass
    over the activation that normalizes, takes the per-token absmax and writes int8, instead of writing the
    normalized activation and reading it twice. The int8 values are the same as norm-then-linear. The linear is
    called as a module (unfused) whenever that could skip something: hooks on it, or a subclass (FSDP2's
    per-module wrapping).
    """

    def __init__(self, linear: nn.Linear, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(linear.in_features, eps=eps, device=linear.weight.device, dtype=linear.weight.dtype)
        self.linear = linear

    def forward(self, x: Tensor) -> Tensor:
        linear = self.linear
        fusable = (
            is_bitnet_weight(linear.weight)
            and not (linear.weight.config.grouped and linear.weight.config.group_dim == 1)
            and type(linear) is nn.Linear
            and not (linear._forward_hooks or linear._forward_pre_hooks)
            and self.norm.weight is not None
        )
        if not fusable:
            return linear(self.norm(x))
        eps = self.norm.eps if self.norm.eps is not None else torch.finfo(x.dtype).eps
        return bitnet_linear(x, linear.weight, linear.bias, InputNorm(self.norm.weight, eps))


@dataclass
class SurgeryReport:
    """What :func:`apply_bitnet_norms` changed, as fully qualified module names."""

    layout: str
    placement: Placement
    inserted: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        return (
            f"apply_bitnet_norms(placement={self.placement!r}) on {self.layout}: "
            f"{len(self.inserted)} RMSNorm inserted, {len(self.removed)} norm removed"
        )

    def __str__(self) -> str:
        lines = [self.summary]
        lines += [f"  inserted RMSNorm before {name}" for name in self.inserted]
        lines += [f"  removed {name}" for name in self.removed]
        return "\n".join(lines)


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        module = module._modules.get(name) if module is not None else None
    return module


def _matches(block: nn.Module, layout: BlockLayout) -> bool:
    linears = layout.linears("faq")
    return all(_get(block, p) is not None for p in layout.paths()) and all(
        isinstance(_get(block, p), nn.Linear) for p in linears
    )


def find_blocks(model: nn.Module) -> tuple[BlockLayout, list[tuple[str, nn.Module]]]:
    """The transformer blocks of ``model`` (fully qualified name, module) and the layout they follow."""
    for layout in LAYOUTS:
        blocks = [(name, m) for name, m in model.named_modules() if _matches(m, layout)]
        if blocks:
            return layout, blocks
    known = "\n".join(f"  {layout.name}: {', '.join(layout.paths())}" for layout in LAYOUTS)
    children = ", ".join(f"{n} ({type(m).__name__})" for n, m in model.named_children())
    raise ValueError(
        f"apply_bitnet_norms: no transformer block of {type(model).__name__} matches a known layout. "
        f"A block must hold these submodules (the linears as nn.Linear):\n{known}\n"
        f"The model's top-level modules: {children}. Add a BlockLayout to bitnet_ao.surgery.LAYOUTS for it."
    )


def _replace(block: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = _get(block, parent_path) if parent_path else block
    setattr(parent, name, new)


def apply_bitnet_norms(
    model: nn.Module, placement: Placement = "faq", eps: float = 1e-5, keep_block_norms: bool = False
) -> SurgeryReport:
    """Insert the BitNet RMSNorms into every transformer block of ``model``, in place; see the module doc.

    Call it before ``quantize_`` (and before building the optimizer: the new norms have parameters). The
    norms are created on the device and in the dtype of the linear they precede, with unit gain.
    ``keep_block_norms``: with the FAQ placement, keep the block's pre-norms too (a model trained that way, e.g.
    in transformers with ``use_rms_norm``, has learned gains there). Returns a :class:`SurgeryReport`, also
    logged at INFO level.
    """
    if placement not in ("faq", "subln"):
        raise ValueError(f"apply_bitnet_norms: placement must be 'faq' or 'subln', got {placement!r}")
    done = next((name for name, m in model.named_modules() if isinstance(m, NormedLinear)), None)
    if done is not None:
        raise ValueError(f"apply_bitnet_norms: the model already has BitNet norms (at {done}); apply it once")
    layout, blocks = find_blocks(model)
    report = SurgeryReport(layout.name, placement)
    for block_name, block in blocks:
        prefix = f"{block_name}." if block_name else ""
        for path in layout.linears(placement):
            _replace(block, path, NormedLinear(_get(block, path), eps))
            report.inserted.append(prefix + path)
        if placement == "faq" and not keep_block_norms:
            for path in (layout.attention_norm, layout.mlp_norm):
                _replace(block, path, nn.Identity())
                report.removed.append(prefix + path)
    logger.info("%s", report)
    return report


def quantize_filter(module: nn.Module, fqn: str) -> bool:
    """``filter_fn`` for ``quantize_``: every ``nn.Linear`` except the output head, which stays in high
    precision (embeddings are not linears, so they are skipped too)."""
    return isinstance(module, nn.Linear) and fqn.rpartition(".")[2] not in HEAD_NAMES


__all__ = [
    "LAYOUTS",
    "BlockLayout",
    "NormedLinear",
    "SurgeryReport",
    "apply_bitnet_norms",
    "find_blocks",
    "quantize_filter",
]
