"""What save_gguf writes for a model, every check passed before a file is opened: the llama.cpp graph, the
hyperparameters and the modules.

Which llama.cpp graph a model maps to (``src/models/llama.cpp``, ``src/models/bitnet.cpp``), from its BitNet norms
(``bitnet_ao.surgery.detect_placement``):

- no norm surgery: arch ``llama``. Its rope rotates adjacent pairs, bitnet_ao's models (the benchmark model,
  transformers' Llama) rotate the two halves of each head, so the q and k rows are permuted as
  ``convert_hf_to_gguf.py`` does (a row permutation keeps the ternary values exact);
- the subln placement (``apply_bitnet_norms(model, "subln")``): arch ``bitnet``: the sub-norms before the
  attention output and the down projection, rope on the halves (NEOX) as trained, and no output tensor: the head
  *is* the token embedding, so the model's head must be tied to it;
- the FAQ placement (a norm in front of every linear) has no llama.cpp graph and is refused.

Both graphs run a SiLU-gated MLP (``silu(gate x) * up x``); llama.cpp's ``bitnet`` arch is the SwiGLU BitNet
b1.58 3B, not Microsoft's squared-ReLU 2B4T, so a squared-ReLU model is refused too. The hyperparameters the
weights do not show come from ``model.config`` by Hugging Face ``LlamaConfig``'s field names (the benchmark
model's config answers to them too). Whatever cannot be written exactly raises ``ValueError`` naming the module
and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ...layouts import HF_LLAMA, META, BlockLayout, Role, find_blocks
from ...linear import is_bitnet_weight
from ...norm import effective_eps
from ...surgery import NormedLinear, detect_placement, rms_norm_eps
from ..export_checks import check_per_tensor_ternary
from .quants import BLOCK

Architecture = Literal["llama", "bitnet"]

#: The layouts whose models save_gguf writes (llama.cpp's Llama: separate q, k and v).
_EXPORTABLE_LAYOUTS = (META, HF_LLAMA)


def fail(message: str) -> ValueError:
    """The ``ValueError`` of every refusal of save_gguf."""
    return ValueError(f"save_gguf: {message}")


@dataclass(frozen=True)
class PlannedLinear:
    """A block linear: its fully qualified name, its role, the ``nn.Linear`` and the norm in front of it."""

    name: str
    role: Role
    linear: nn.Linear
    norm: nn.Module | None


@dataclass(frozen=True)
class PlannedBlock:
    """A transformer block: its fully qualified name, its pre-norms by role and its linears in forward order."""

    name: str
    norms: dict[Role, nn.Module]
    linears: list[PlannedLinear]


@dataclass(frozen=True)
class ExportPlan:
    """Everything save_gguf writes, checked: the graph, the hyperparameters and the modules."""

    arch: Architecture
    layout: BlockLayout
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    context_length: int
    rope_theta: float
    eps: float
    blocks: list[PlannedBlock]
    embedding: nn.Embedding
    head: nn.Linear
    #: Whether the head is the embedding (:func:`_same`): then no output tensor is written.
    tied: bool
    final_norm: nn.Module


def gguf_architecture(model: nn.Module) -> Architecture:
    """The llama.cpp architecture save_gguf writes ``model`` as, ``"llama"`` or ``"bitnet"``; raises
    ``ValueError`` naming the module and the reason when the model cannot be exported. It runs every check of
    save_gguf that needs no weight value (a model on the meta device works, and an untied head counts as
    different from the embedding there), so a training script can call it before training."""
    return export_plan(model).arch


def export_plan(model: nn.Module) -> ExportPlan:
    """What save_gguf writes for ``model``, every structural check passed."""
    try:
        layout, found = find_blocks(model)
    except ValueError as e:
        raise fail(f"{type(model).__name__} is no transformer bitnet_ao knows ({e})") from None
    if layout not in _EXPORTABLE_LAYOUTS:
        known = " and ".join(exported.name for exported in _EXPORTABLE_LAYOUTS)
        raise fail(f"{type(model).__name__} has the module names of {layout.name}; the exported layouts are {known}")
    blocks = [
        PlannedBlock(
            name,
            {r: block.get_submodule(layout.path(r)) for r in layout.block_roles if r.kind == "norm"},
            [
                _block_linear(f"{name}.{layout.path(r)}", r, block.get_submodule(layout.path(r)))
                for r in layout.block_linears
            ],
        )
        for name, block in found
    ]
    arch = _architecture(model)
    for block in blocks:
        for lin in block.linears:
            _check_ternary(lin)
    config = _Config.of(model)
    _check_activation(config.activation, layout)
    embedding = model.get_submodule(layout.path(Role.TOKEN_EMBD))
    head = model.get_submodule(layout.path(Role.OUTPUT))
    final_norm = model.get_submodule(layout.path(Role.OUTPUT_NORM))
    dim = embedding.embedding_dim
    head_dim = dim // config.n_heads
    if head_dim * config.n_heads != dim or config.head_dim not in (None, head_dim):
        raise fail(f"llama.cpp needs n_heads ({config.n_heads}) heads of size dim / n_heads; dim is {dim}")
    by_role = {lin.role: lin.linear for lin in blocks[0].linears}
    _check_head(layout, embedding, head)
    tied = _same(head.weight, embedding.weight)
    if arch == "bitnet" and not tied:
        raise fail(
            f"llama.cpp's bitnet graph has no output tensor: it multiplies by token_embd, but "
            f"{layout.path(Role.OUTPUT)} is not tied to {layout.path(Role.TOKEN_EMBD)}. Train with a tied head "
            "(tie_word_embeddings=True) or without norm surgery (arch llama, which writes the head)"
        )
    eps = _common_eps(layout, blocks, final_norm)
    return ExportPlan(
        arch=arch,
        layout=layout,
        n_heads=config.n_heads,
        n_kv_heads=by_role[Role.ATTN_K].out_features // head_dim,
        head_dim=head_dim,
        hidden_dim=by_role[Role.FFN_GATE].out_features,
        context_length=config.context_length,
        rope_theta=config.rope_theta,
        eps=eps,
        blocks=blocks,
        embedding=embedding,
        head=head,
        tied=tied,
        final_norm=final_norm,
    )


def _block_linear(name: str, role: Role, module: nn.Module) -> PlannedLinear:
    """The block linear at ``name`` and the norm in front of it, if any (a ``NormedLinear``'s)."""
    if not isinstance(module, nn.Linear):
        raise fail(f"{name} is a {type(module).__name__} around a linear (an adapter?); merge it first")
    return PlannedLinear(name, role, module, module.norm if isinstance(module, NormedLinear) else None)


def _check_ternary(lin: PlannedLinear) -> None:
    """A BitNet linear that TQ1_0 / TQ2_0 hold exactly, or ``ValueError`` naming it and what is in the way."""
    linear = lin.linear
    check_per_tensor_ternary(linear, lin.name, caller="save_gguf", target="llama.cpp's TQ1_0 / TQ2_0 tensors")
    if linear.in_features % BLOCK:
        raise fail(
            f"{lin.name} (in_features={linear.in_features}, out_features={linear.out_features}): TQ1_0 / TQ2_0 "
            f"pack blocks of {BLOCK} values along in_features, which must be a multiple of {BLOCK}"
        )


def _architecture(model: nn.Module) -> Architecture:
    """``llama`` without norm surgery, ``bitnet`` for the subln placement; the FAQ placement has no llama.cpp
    graph."""
    applied = detect_placement(model, "save_gguf")
    if applied is None:
        return "llama"
    if applied.placement == "subln":
        return "bitnet"
    raise fail(
        f"{type(model).__name__} has the FAQ placement (an RMSNorm in front of every linear), which no llama.cpp "
        "architecture computes. Exported: no norm surgery (arch llama) and apply_bitnet_norms(model, 'subln') "
        "(arch bitnet, with a tied head), both with a SiLU-gated MLP"
    )


@dataclass(frozen=True)
class _Config:
    """The hyperparameters the weights do not show, from the model's config by ``LlamaConfig``'s names."""

    n_heads: int
    head_dim: int | None
    context_length: int
    rope_theta: float
    activation: str

    @staticmethod
    def of(model: nn.Module) -> _Config:
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) != "llama":
            raise fail(
                "the hyperparameters are read from the model's config by Hugging Face LlamaConfig's names "
                "(model_type 'llama', num_attention_heads, max_position_embeddings, rope_parameters, hidden_act); "
                f"{type(model).__name__}.config has model_type {getattr(config, 'model_type', None)!r}"
            )
        rope = dict(getattr(config, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise fail(f"rope_type {rope['rope_type']!r}: only the default rope is written (no rope scaling)")
        theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        head_dim = getattr(config, "head_dim", None)
        return _Config(config.num_attention_heads, head_dim, config.max_position_embeddings, theta, config.hidden_act)


def _check_activation(activation: str, layout: BlockLayout) -> None:
    if activation != "silu":
        raise fail(
            f"the MLP ({layout.path(Role.FFN_GATE)}) uses {activation!r}; llama.cpp's llama and bitnet graphs "
            "both compute silu(gate x) * up x (its bitnet arch is the SwiGLU BitNet b1.58 3B: squared-ReLU "
            "models such as BitNet b1.58 2B4T need Microsoft's bitnet.cpp)"
        )


def _same(a: Tensor, b: Tensor) -> bool:
    """Whether two weights are one: the same parameter, or equal values (never on the meta device)."""
    if a is b:
        return True
    return not (a.is_meta or b.is_meta) and a.shape == b.shape and bool(torch.equal(a, b))


def _check_head(layout: BlockLayout, embedding: nn.Module, head: nn.Module) -> None:
    names = {r: layout.path(r) for r in (Role.TOKEN_EMBD, Role.OUTPUT)}
    if not isinstance(embedding, nn.Embedding):
        raise fail(f"{names[Role.TOKEN_EMBD]} is a {type(embedding).__name__}, not an nn.Embedding")
    if not isinstance(head, nn.Linear) or head.bias is not None or is_bitnet_weight(head.weight):
        raise fail(
            f"{names[Role.OUTPUT]} must be a plain nn.Linear without bias: llama.cpp's head is a high-precision "
            "matmul (quantize_ with filter_fn=quantize_filter leaves it so)"
        )


def _rms_eps(norm: nn.Module, name: str) -> float:
    try:
        eps = rms_norm_eps(norm)
    except TypeError:
        raise fail(f"{name} is a {type(norm).__name__}; llama.cpp's norms here are RMSNorms") from None
    weight = getattr(norm, "weight", None)
    return effective_eps(eps, weight.dtype if weight is not None else torch.float32)


def _common_eps(layout: BlockLayout, blocks: list[PlannedBlock], final_norm: nn.Module) -> float:
    """The one rms eps llama.cpp applies to every norm: the model's norms must agree on it."""
    norms = {layout.path(Role.OUTPUT_NORM): final_norm}
    for block in blocks:
        norms.update({f"{block.name}.{layout.path(role)}": norm for role, norm in block.norms.items()})
        norms.update({f"{lin.name}.norm": lin.norm for lin in block.linears if lin.norm is not None})
    eps = {name: _rms_eps(norm, name) for name, norm in norms.items()}
    if len(set(eps.values())) > 1:
        first = next(iter(eps.items()))
        other = next((n, e) for n, e in eps.items() if e != first[1])
        raise fail(
            f"llama.cpp applies one rms eps to every norm, but {first[0]} has {first[1]} and {other[0]} {other[1]}"
        )
    return next(iter(eps.values()))


__all__ = ["Architecture", "ExportPlan", "PlannedBlock", "PlannedLinear", "export_plan", "fail", "gguf_architecture"]
