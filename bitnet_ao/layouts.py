"""The module names of the transformer models bitnet_ao works on, in one table (:data:`LAYOUTS`).

Every part of the package that needs to know what a module of a model *is* reads it here: the norm surgery (which
linears get an RMSNorm, which norms go away), tensor parallelism (which linears are row-parallel), the Hugging Face
checkpoints (where transformers' BitNet model keeps its sub-norms), the torchtitan converter (each linear's scale
groups) and the benchmarks (the Meta-named model written out as a Hugging Face one). A model with other names is one
more :class:`BlockLayout` in :data:`LAYOUTS`.

A layout maps each :class:`Role` (the query projection, the MLP's down projection, the pre-attention norm, ...) to
the module that plays it, so two layouts translate into each other role by role (:meth:`BlockLayout.rename`). The
roles are named after llama.cpp's GGUF tensors (``blk.N.attn_q``), and :data:`GGUF` is the layout of those names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Literal

from torch import nn

Part = Literal["model", "attention", "mlp"]
#: Where ``bitnet_ao.surgery.apply_bitnet_norms`` puts BitNet's RMSNorms (:meth:`BlockLayout.normed_roles`).
Placement = Literal["faq", "subln"]
#: ``norm``: a norm whose output the part's input linears read (the final norm for the head); ``sub_norm``: BitNet's
#: norm inside the attention or MLP, before its output linear; ``input`` / ``output``: the linears that read the
#: part's input (column-parallel under tensor parallelism) / write its result into the residual stream
#: (row-parallel).
Kind = Literal["embedding", "norm", "input", "sub_norm", "output", "head"]


class Role(Enum):
    """What a module of a decoder-only transformer does. Members are in forward order; each one's value is its
    llama.cpp GGUF tensor name (``blk.{i}.<gguf>.weight`` inside block ``i``, ``<gguf>.weight`` outside the blocks),
    its part of the model and its kind.

    ``ATTN_QKV`` is one fused projection whose row order is the model's own: torchtitan's ``FusedQKVLinear`` groups
    its rows per KV head (and saves them split into ``wq``/``wk``/``wv``), llama.cpp's ``attn_qkv`` concatenates q,
    k and v.
    """

    TOKEN_EMBD = ("token_embd", "model", "embedding")
    ATTN_NORM = ("attn_norm", "attention", "norm")
    ATTN_Q = ("attn_q", "attention", "input")
    ATTN_K = ("attn_k", "attention", "input")
    ATTN_V = ("attn_v", "attention", "input")
    ATTN_QKV = ("attn_qkv", "attention", "input")
    ATTN_SUB_NORM = ("attn_sub_norm", "attention", "sub_norm")
    ATTN_OUTPUT = ("attn_output", "attention", "output")
    FFN_NORM = ("ffn_norm", "mlp", "norm")
    FFN_GATE = ("ffn_gate", "mlp", "input")
    FFN_UP = ("ffn_up", "mlp", "input")
    FFN_SUB_NORM = ("ffn_sub_norm", "mlp", "sub_norm")
    FFN_DOWN = ("ffn_down", "mlp", "output")
    OUTPUT_NORM = ("output_norm", "model", "norm")
    OUTPUT = ("output", "model", "head")

    def __init__(self, gguf: str, part: Part, kind: Kind) -> None:
        self.gguf = gguf
        self.part = part
        self.kind = kind

    @property
    def in_block(self) -> bool:
        """Whether the module sits in every transformer block (its path is relative to the block)."""
        return self.part != "model"

    @property
    def is_block_linear(self) -> bool:
        """A linear of the attention or the MLP: what BitNet quantizes (the head stays in high precision)."""
        return self.kind in ("input", "output")

    @property
    def row_parallel(self) -> bool:
        """Whether tensor parallelism shards this linear by input column (its partial sums all-reduced into the
        residual stream); the other block linears are column-parallel."""
        return self.kind == "output"

    @property
    def norm(self) -> Role | None:
        """For a linear, the norm that normalizes its input in the layouts that have one: the part's pre-norm for
        the attention and MLP inputs, BitNet's sub-norm for their outputs, the final norm for the head."""
        kind = {"input": "norm", "output": "sub_norm", "head": "norm"}.get(self.kind)
        return next((r for r in Role if r.part == self.part and r.kind == kind), None)


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """One naming scheme: block ``i`` is the module ``f"{blocks}.{i}"``, and ``modules`` maps each role the scheme
    has to its module's name, relative to the block for the roles in a block and to the model for the others."""

    name: str
    blocks: str
    modules: Mapping[Role, str]

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", MappingProxyType(dict(self.modules)))  # the table is read-only

    def path(self, role: Role) -> str:
        """The module of ``role``; ``KeyError`` naming the layout when it has none."""
        if role not in self.modules:
            raise KeyError(f"{self.name} has no module for {role.name}")
        return self.modules[role]

    @property
    def block_roles(self) -> tuple[Role, ...]:
        """The roles of a block's modules, in forward order."""
        return tuple(r for r in Role if r.in_block and r in self.modules)

    @property
    def block_linears(self) -> tuple[Role, ...]:
        """The roles of a block's linears, in forward order."""
        return tuple(r for r in self.block_roles if r.is_block_linear)

    def normed_roles(self, placement: Placement) -> tuple[Role, ...]:
        """The block linears ``placement`` puts an RMSNorm in front of, in forward order: every one (``"faq"``), or
        those whose norm is a sub-norm, the attention output and the MLP's down projection (``"subln"``)."""
        return tuple(r for r in self.block_linears if placement == "faq" or r.norm.kind == "sub_norm")

    @property
    def pre_norms(self) -> tuple[str, ...]:
        """The block's pre-attention and pre-MLP norms, whose outputs the attention and MLP inputs read."""
        return tuple(self.modules[r] for r in self.block_roles if r.kind == "norm")

    def paths(self) -> tuple[str, ...]:
        """Every module a block of this layout holds, in forward order: how a block is recognized."""
        return tuple(self.modules[r] for r in self.block_roles)

    def rename(self, name: str, to: BlockLayout) -> str:
        """``name``, a module or parameter of a model with this layout (``layers.3.attention.wq.weight``), as
        ``to`` names it (``model.layers.3.self_attn.q_proj.weight``): the module of the same role, with the same
        block index and the same tail. ``KeyError`` for a name no role of this layout holds, or a role ``to``
        lacks."""
        block, rest = None, name
        if name.startswith(f"{self.blocks}."):
            block, _, rest = name[len(self.blocks) + 1 :].partition(".")
        candidates = [
            (path, role)
            for role, path in self.modules.items()
            if role.in_block == (block is not None) and (rest == path or rest.startswith(f"{path}."))
        ]
        if not candidates:
            raise KeyError(f"{name!r} is no module of a {self.name} model (bitnet_ao.layouts)")
        path, role = max(candidates, key=lambda c: len(c[0]))
        renamed = to.path(role) + rest[len(path) :]
        return f"{to.blocks}.{block}.{renamed}" if block is not None else renamed


_META_BLOCK = {
    Role.ATTN_NORM: "attention_norm",
    Role.ATTN_Q: "attention.wq",
    Role.ATTN_K: "attention.wk",
    Role.ATTN_V: "attention.wv",
    Role.ATTN_OUTPUT: "attention.wo",
    Role.FFN_NORM: "ffn_norm",
    Role.FFN_GATE: "feed_forward.w1",
    Role.FFN_UP: "feed_forward.w3",
    Role.FFN_DOWN: "feed_forward.w2",
}
_TORCHTITAN_OUTSIDE = {Role.TOKEN_EMBD: "tok_embeddings", Role.OUTPUT_NORM: "norm", Role.OUTPUT: "lm_head"}

#: Meta's Llama reference names (``benchmarks/model.py``).
META = BlockLayout(
    "Llama (Meta reference names)",
    blocks="layers",
    modules={Role.TOKEN_EMBD: "tok_embeddings", **_META_BLOCK, Role.OUTPUT_NORM: "norm", Role.OUTPUT: "output"},
)
#: torchtitan 0.3.0's Llama 3 with its default fused QKV projection.
TORCHTITAN_FUSED_QKV = BlockLayout(
    "torchtitan Llama 3 (fused QKV)",
    blocks="layers",
    modules={
        **{r: p for r, p in _META_BLOCK.items() if r not in (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V)},
        Role.ATTN_QKV: "attention.qkv_linear.wqkv",
        **_TORCHTITAN_OUTSIDE,
    },
)
#: torchtitan 0.3.0's Llama 3 with separate projections (``fuse_qkv=False``), and the state-dict keys of both.
TORCHTITAN = BlockLayout(
    "torchtitan Llama 3 (separate QKV)",
    blocks="layers",
    modules={
        **_META_BLOCK,
        Role.ATTN_Q: "attention.qkv_linear.wq",
        Role.ATTN_K: "attention.qkv_linear.wk",
        Role.ATTN_V: "attention.qkv_linear.wv",
        **_TORCHTITAN_OUTSIDE,
    },
)
#: Hugging Face transformers' ``LlamaForCausalLM`` and ``Qwen2ForCausalLM`` (the same names).
HF_LLAMA = BlockLayout(
    "Hugging Face Llama/Qwen2",
    blocks="model.layers",
    modules={
        Role.TOKEN_EMBD: "model.embed_tokens",
        Role.ATTN_NORM: "input_layernorm",
        Role.ATTN_Q: "self_attn.q_proj",
        Role.ATTN_K: "self_attn.k_proj",
        Role.ATTN_V: "self_attn.v_proj",
        Role.ATTN_OUTPUT: "self_attn.o_proj",
        Role.FFN_NORM: "post_attention_layernorm",
        Role.FFN_GATE: "mlp.gate_proj",
        Role.FFN_UP: "mlp.up_proj",
        Role.FFN_DOWN: "mlp.down_proj",
        Role.OUTPUT_NORM: "model.norm",
        Role.OUTPUT: "lm_head",
    },
)
#: Hugging Face transformers' ``BitNetForCausalLM``: the Llama names plus the two sub-norms of the subln placement.
HF_BITNET = BlockLayout(
    "Hugging Face BitNet",
    blocks="model.layers",
    modules={**HF_LLAMA.modules, Role.ATTN_SUB_NORM: "self_attn.attn_sub_norm", Role.FFN_SUB_NORM: "mlp.ffn_sub_norm"},
)
#: llama.cpp's GGUF tensor names (without the ``.weight`` suffix): the target of a GGUF export.
GGUF = BlockLayout("llama.cpp GGUF", blocks="blk", modules={role: role.gguf for role in Role})

#: The layouts models are recognized by (:func:`find_blocks` takes the first that matches).
LAYOUTS: tuple[BlockLayout, ...] = (META, TORCHTITAN_FUSED_QKV, TORCHTITAN, HF_LLAMA, HF_BITNET)

# --- finding a model's blocks ------------------------------------------------------------------------------------


def module_at(module: nn.Module | None, path: str) -> nn.Module | None:
    """The submodule of ``module`` at the dotted ``path``, or ``None`` where there is none."""
    for name in path.split("."):
        module = module._modules.get(name) if module is not None else None
    return module


def base_linear(module: nn.Module | None) -> nn.Linear | None:
    """The ``nn.Linear`` (a ``bitnet_ao.surgery.NormedLinear`` too) that does a block linear's matmul, through
    peft's tuner layers (LoRA & co., duck-typed by their public ``get_base_layer()``, so that bitnet_ao does not
    import peft) around it, in any nesting; ``None`` for anything else. Code that needs a layer's q/k/v projections
    on an adapted model goes through this."""
    for _ in range(8):  # a handful of nested wrappers at most; no cycle can hang it
        if isinstance(module, nn.Linear):
            return module
        if callable(getattr(module, "get_base_layer", None)) and module.get_base_layer() is not module:
            module = module.get_base_layer()
        else:
            return None
    return None


def _matches(block: nn.Module, layout: BlockLayout) -> bool:
    return all(module_at(block, p) is not None for p in layout.paths()) and all(
        base_linear(module_at(block, layout.path(r))) is not None for r in layout.block_linears
    )


def find_blocks(model: nn.Module, caller: str = "find_blocks") -> tuple[BlockLayout, list[tuple[str, nn.Module]]]:
    """The transformer blocks of ``model`` (fully qualified name, module) and the layout they follow.

    A block's linears may be ``nn.Linear`` (a ``NormedLinear`` after ``bitnet_ao.surgery.apply_bitnet_norms``) or a peft
    tuner layer around one (:func:`base_linear`), so the blocks of a normed and/or adapted model are found too.
    ``caller``: the public function whose name the ``ValueError`` for an unknown model starts with."""
    for layout in LAYOUTS:
        blocks = [(name, m) for name, m in model.named_modules() if _matches(m, layout)]
        if blocks:
            return layout, blocks
    known = "\n".join(f"  {layout.name}: {', '.join(layout.paths())}" for layout in LAYOUTS)
    children = ", ".join(f"{n} ({type(m).__name__})" for n, m in model.named_children())
    raise ValueError(
        f"{caller}: no transformer block of {type(model).__name__} matches a known layout. "
        "A block must hold these submodules (the linears as nn.Linear, or a peft layer around one):"
        f"\n{known}\n"
        f"The model's top-level modules: {children}. Add a BlockLayout to bitnet_ao.layouts.LAYOUTS for it."
    )


#: Names of output heads, which stay in high precision (:func:`quantize_filter`).
HEAD_NAMES = tuple(dict.fromkeys(layout.path(Role.OUTPUT) for layout in LAYOUTS))


def quantize_filter(module: nn.Module, fqn: str) -> bool:
    """``filter_fn`` for ``quantize_``: every ``nn.Linear`` except the output head, which stays in high
    precision (embeddings are not linears, so they are skipped too)."""
    return isinstance(module, nn.Linear) and fqn.rpartition(".")[2] not in HEAD_NAMES


__all__ = [
    "base_linear",
    "find_blocks",
    "module_at",
    "GGUF",
    "HEAD_NAMES",
    "HF_BITNET",
    "HF_LLAMA",
    "LAYOUTS",
    "META",
    "TORCHTITAN",
    "Placement",
    "TORCHTITAN_FUSED_QKV",
    "BlockLayout",
    "Role",
    "quantize_filter",
]
