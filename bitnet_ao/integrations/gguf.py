"""A BitNet model as one GGUF file that stock llama.cpp runs (docs/gguf.md).

llama.cpp multiplies ternary weights natively: ``TQ2_0`` (2 bits per value) and ``TQ1_0`` (five values per byte),
blocks of 256 values along the input dimension, each block with one fp16 scale ``d``. Its converter starts from
high-precision weights and ternarizes them again; a bitnet_ao model already holds the exact ternary values and the
scale its forward multiplies by, so :func:`save_gguf` builds every block linear's bytes from those int8 values
itself: the file's weight is exactly ``W_q * fp16(s_w)``, for a trained (master-weight) model and for a packed
(``bitnet_inference``) one alike.

Which llama.cpp graph a model maps to (``src/models/llama.cpp``, ``src/models/bitnet.cpp``):

- no norm surgery: arch ``llama``. Its rope rotates adjacent pairs, bitnet_ao's models (the benchmark model,
  transformers' Llama) rotate the two halves of each head, so the q and k rows are permuted as
  ``convert_hf_to_gguf.py`` does (a row permutation keeps the ternary values exact);
- the subln placement (``apply_bitnet_norms(model, "subln")``): arch ``bitnet``: the sub-norms before the
  attention output and the down projection, rope on the halves (NEOX) as trained, and no output tensor: the head
  *is* the token embedding, so the model's head must be tied to it;
- the FAQ placement (a norm in front of every linear) has no llama.cpp graph and is refused.

Both graphs run a SiLU-gated MLP (``silu(gate x) * up x``); llama.cpp's ``bitnet`` arch is the SwiGLU BitNet
b1.58 3B, not Microsoft's squared-ReLU 2B4T, so a squared-ReLU model is refused too. Whatever cannot be written
exactly raises ``ValueError`` naming the module and the reason, before the file is opened.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import torch
from torch import Tensor, nn

from ..layouts import GGUF, HF_LLAMA, META, BlockLayout, Role, find_blocks
from ..linear import is_bitnet_weight
from ..norm import effective_eps
from ..surgery import NormedLinear, rms_norm_eps

TernaryType = Literal["TQ2_0", "TQ1_0"]
EmbeddingType = Literal["F16", "Q8_0", "Q6_K"]
Architecture = Literal["llama", "bitnet"]

#: Values per TQ1_0 / TQ2_0 / Q6_K block (llama.cpp's ``QK_K``): in_features must be a multiple of it.
BLOCK = gguf.QK_K
#: The file type llama.cpp reports for each ternary type (``general.file_type``).
_FILE_TYPES = {"TQ2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "TQ1_0": gguf.LlamaFileType.MOSTLY_TQ1_0}
#: The layouts whose models' hyperparameters save_gguf knows where to read (their configs).
_EXPORTABLE_LAYOUTS = (META, HF_LLAMA)
#: The linears the subln placement puts a norm in front of; llama.cpp's bitnet arch names those norms sub-norms.
_SUBLN = (Role.ATTN_OUTPUT, Role.FFN_DOWN)
#: BPE merges llama.cpp requires with a gpt2 vocabulary; gguf-py cannot write an empty array, so the byte
#: vocabulary gets one merge that can never apply (its parts are multi-byte strings, which only merges form).
_NO_MERGES = ["<none> <none>"]


def _fail(message: str) -> ValueError:
    return ValueError(f"save_gguf: {message}")


# --- what the model is: layout, placement, hyperparameters -----------------------------------------------------


@dataclass(frozen=True)
class _Linear:
    """A block linear: its fully qualified name, its role, the ``nn.Linear`` and the norm in front of it."""

    name: str
    role: Role
    linear: nn.Linear
    norm: nn.Module | None


@dataclass(frozen=True)
class _Block:
    """A transformer block: its fully qualified name, its pre-norms by role and its linears in forward order."""

    name: str
    norms: dict[Role, nn.Module]
    linears: list[_Linear]


@dataclass(frozen=True)
class _Plan:
    """Everything :func:`save_gguf` writes, checked: the graph, the hyperparameters and the modules."""

    arch: Architecture
    layout: BlockLayout
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    context_length: int
    rope_theta: float
    eps: float
    blocks: list[_Block]
    embedding: nn.Embedding
    head: nn.Linear
    #: Whether the head is the embedding (:func:`_same`): then no output tensor is written.
    tied: bool
    final_norm: nn.Module


def gguf_architecture(model: nn.Module) -> Architecture:
    """The llama.cpp architecture :func:`save_gguf` writes ``model`` as, ``"llama"`` or ``"bitnet"``; raises
    ``ValueError`` naming the module and the reason when the model cannot be exported. It runs every check of
    ``save_gguf`` that needs no weight value (a model on the meta device works, and an untied head counts as
    different from the embedding there), so a training script can call it before training."""
    return _plan(model).arch


def _plan(model: nn.Module) -> _Plan:
    """What :func:`save_gguf` writes for ``model``, every structural check passed."""
    try:
        layout, found = find_blocks(model)
    except ValueError as e:
        raise _fail(f"{type(model).__name__} is no transformer bitnet_ao knows ({e})") from None
    if layout not in _EXPORTABLE_LAYOUTS:
        known = " and ".join(exported.name for exported in _EXPORTABLE_LAYOUTS)
        raise _fail(f"{type(model).__name__} has the module names of {layout.name}; the exported layouts are {known}")
    blocks = [
        _Block(
            name,
            {r: block.get_submodule(layout.path(r)) for r in layout.block_roles if r.kind == "norm"},
            [
                _block_linear(f"{name}.{layout.path(r)}", r, block.get_submodule(layout.path(r)))
                for r in layout.block_linears
            ],
        )
        for name, block in found
    ]
    arch = _architecture(blocks)
    for block in blocks:
        for lin in block.linears:
            _check_ternary(lin)
    config = _Config.of(model, layout)
    _check_activation(config.activation, layout)
    embedding = model.get_submodule(layout.path(Role.TOKEN_EMBD))
    head = model.get_submodule(layout.path(Role.OUTPUT))
    final_norm = model.get_submodule(layout.path(Role.OUTPUT_NORM))
    dim = embedding.embedding_dim
    head_dim = dim // config.n_heads
    if head_dim * config.n_heads != dim or config.head_dim not in (None, head_dim):
        raise _fail(f"llama.cpp needs n_heads ({config.n_heads}) heads of size dim / n_heads; dim is {dim}")
    by_role = {lin.role: lin.linear for lin in blocks[0].linears}
    _check_head(layout, embedding, head)
    tied = _same(head.weight, embedding.weight)
    if arch == "bitnet" and not tied:
        raise _fail(
            f"llama.cpp's bitnet graph has no output tensor: it multiplies by token_embd, but "
            f"{layout.path(Role.OUTPUT)} is not tied to {layout.path(Role.TOKEN_EMBD)}. Train with a tied head "
            "(tie_word_embeddings=True) or without norm surgery (arch llama, which writes the head)"
        )
    eps = _common_eps(layout, blocks, final_norm)
    return _Plan(
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


def _block_linear(name: str, role: Role, module: nn.Module) -> _Linear:
    """The block linear at ``name`` and the norm in front of it, if any (a ``NormedLinear``'s)."""
    if not isinstance(module, nn.Linear):
        raise _fail(f"{name} is a {type(module).__name__} around a linear (an adapter?); merge it first")
    return _Linear(name, role, module, module.norm if isinstance(module, NormedLinear) else None)


def _check_ternary(lin: _Linear) -> None:
    """A BitNet linear that TQ1_0 / TQ2_0 hold exactly, or ``ValueError`` naming it and what is in the way."""
    name, linear = lin.name, lin.linear
    weight = linear.weight
    shape = f"(in_features={linear.in_features}, out_features={linear.out_features})"
    if not is_bitnet_weight(weight):
        raise _fail(
            f"{name} {shape} is a plain high-precision linear: every block linear is written as ternary, so "
            "quantize_ it with bitnet_training() or bitnet_inference() first (filter_fn=quantize_filter)"
        )
    if weight.config.weights != "ternary":
        raise _fail(f"{name} has binary weights; GGUF's TQ1_0 / TQ2_0 hold ternary values")
    if weight.config.grouped:
        raise _fail(
            f"{name} has {weight.config.scale_groups} group scales; TQ1_0 / TQ2_0 blocks run along in_features "
            "with one scale each, which only one scale per weight fills exactly"
        )
    if linear.bias is not None:
        raise _fail(f"{name} has a bias; llama.cpp's llama and bitnet graphs add none to this linear")
    if linear.in_features % BLOCK:
        raise _fail(
            f"{name} {shape}: TQ1_0 / TQ2_0 pack blocks of {BLOCK} values along in_features, which must be a "
            f"multiple of {BLOCK}"
        )


def _architecture(blocks: list[_Block]) -> Architecture:
    """``llama`` without norm surgery, ``bitnet`` for the subln placement; anything else has no llama.cpp graph."""
    archs = set()
    for block in blocks:
        normed = {lin.role for lin in block.linears if lin.norm is not None}
        removed = [r.gguf for r, m in block.norms.items() if isinstance(m, nn.Identity)]
        where = block.name or "the model"
        if normed == {lin.role for lin in block.linears}:
            raise _fail(
                f"{where} has the FAQ placement (an RMSNorm in front of every linear), which no llama.cpp "
                "architecture computes. Exported: no norm surgery (arch llama) and apply_bitnet_norms(model, "
                "'subln') (arch bitnet, with a tied head), both with a SiLU-gated MLP"
            )
        if removed or normed not in (set(), set(_SUBLN)):
            raise _fail(
                f"{where} has RMSNorms in front of {sorted(r.gguf for r in normed) or 'no linear'}"
                f"{' and its ' + ', '.join(removed) + ' removed' if removed else ''}: neither no surgery (arch "
                "llama) nor the subln placement (arch bitnet)"
            )
        archs.add("bitnet" if normed else "llama")
    if len(archs) > 1:
        raise _fail("the blocks mix the subln placement and no surgery; llama.cpp runs one graph for all")
    return archs.pop()


@dataclass(frozen=True)
class _Config:
    """The hyperparameters the weights do not show, from the model's config."""

    n_heads: int
    head_dim: int | None
    context_length: int
    rope_theta: float
    activation: str

    @staticmethod
    def of(model: nn.Module, layout: BlockLayout) -> _Config:
        config = getattr(model, "config", None)
        if layout is META:
            needed = ("n_heads", "max_seq_len", "rope_theta")
            if config is None or not all(hasattr(config, key) for key in needed):
                raise _fail(
                    f"a {META.name} model needs a `config` with {', '.join(needed)} (benchmarks/model.py's "
                    f"ModelConfig); {type(model).__name__}.config is {config!r}"
                )
            activation = getattr(config, "activation", "silu")
            return _Config(config.n_heads, None, config.max_seq_len, float(config.rope_theta), activation)
        if getattr(config, "model_type", None) != "llama":
            raise _fail(
                f"Hugging Face models export with model_type 'llama', got {getattr(config, 'model_type', None)!r}"
            )
        rope = dict(getattr(config, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise _fail(f"rope_type {rope['rope_type']!r}: only the default rope is written (no rope scaling)")
        theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        head_dim = getattr(config, "head_dim", None)
        return _Config(config.num_attention_heads, head_dim, config.max_position_embeddings, theta, config.hidden_act)


def _check_activation(activation: str, layout: BlockLayout) -> None:
    if activation != "silu":
        raise _fail(
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
        raise _fail(f"{names[Role.TOKEN_EMBD]} is a {type(embedding).__name__}, not an nn.Embedding")
    if not isinstance(head, nn.Linear) or head.bias is not None or is_bitnet_weight(head.weight):
        raise _fail(
            f"{names[Role.OUTPUT]} must be a plain nn.Linear without bias: llama.cpp's head is a high-precision "
            "matmul (quantize_ with filter_fn=quantize_filter leaves it so)"
        )


def _rms_eps(norm: nn.Module, name: str) -> float:
    try:
        eps = rms_norm_eps(norm)
    except TypeError:
        raise _fail(f"{name} is a {type(norm).__name__}; llama.cpp's norms here are RMSNorms") from None
    weight = getattr(norm, "weight", None)
    return effective_eps(eps, weight.dtype if weight is not None else torch.float32)


def _common_eps(layout: BlockLayout, blocks: list[_Block], final_norm: nn.Module) -> float:
    """The one rms eps llama.cpp applies to every norm: the model's norms must agree on it."""
    norms = {layout.path(Role.OUTPUT_NORM): final_norm}
    for block in blocks:
        norms.update({f"{block.name}.{layout.path(role)}": norm for role, norm in block.norms.items()})
        norms.update({f"{lin.name}.norm": lin.norm for lin in block.linears if lin.norm is not None})
    eps = {name: _rms_eps(norm, name) for name, norm in norms.items()}
    if len(set(eps.values())) > 1:
        first = next(iter(eps.items()))
        other = next((n, e) for n, e in eps.items() if e != first[1])
        raise _fail(
            f"llama.cpp applies one rms eps to every norm, but {first[0]} has {first[1]} and {other[0]} {other[1]}"
        )
    return next(iter(eps.values()))


# --- the tensors ---------------------------------------------------------------------------------------------


def _base3(codes: np.ndarray, weights: tuple[int, ...]) -> np.ndarray:
    """TQ1_0's trits: ``codes`` ``(..., len(weights) * n)`` in {0, 1, 2} -> ``(..., n)`` bytes, value
    ``i * n + l`` in trit ``i`` of byte ``l`` (most significant first), scaled to a byte by ceiling division
    (ggml's ``quantize_row_tq1_0_ref``)."""
    digits = codes.reshape(*codes.shape[:-1], len(weights), -1).astype(np.uint16)
    packed = (digits * np.array(weights, dtype=np.uint16)[:, None]).sum(axis=-2, dtype=np.uint16)
    return ((packed * 256 + 242) // 243).astype(np.uint8)


def ternary_blocks(values: Tensor, scale: Tensor, ternary_type: TernaryType) -> np.ndarray:
    """The GGUF bytes of a ternary weight: ``values`` int8 ``(N, K)`` in {-1, 0, 1}, ``K`` a multiple of 256,
    and its scale ``s_w`` -> uint8 ``(N, K / 256 * block bytes)``, every block's ``d`` = ``s_w`` in fp16.

    ``TQ2_0`` (66 bytes per block): value ``128 c + 32 j + l`` of a block in bits ``2j`` of byte ``32 c + l``,
    stored ``+ 1``; ``TQ1_0`` (54 bytes): five trits per byte for values 0-239, four for 240-255
    (``ggml-quants.c``); then ``d``."""
    n, k = values.shape
    codes = (values.to(torch.int16) + 1).numpy().astype(np.uint8).reshape(n, k // BLOCK, BLOCK)
    if ternary_type == "TQ2_0":
        c = codes.reshape(n, k // BLOCK, 2, 4, 32)  # (row, block, half, j, l)
        qs = [(c[..., 0, :] | c[..., 1, :] << 2 | c[..., 2, :] << 4 | c[..., 3, :] << 6).reshape(n, k // BLOCK, 64)]
    else:
        five, four = (81, 27, 9, 3, 1), (81, 27, 9, 3)
        qs = [_base3(codes[..., :160], five), _base3(codes[..., 160:240], five), _base3(codes[..., 240:], four)]
    d = np.full((n, k // BLOCK, 1), scale.item(), dtype=np.float16).view(np.uint8)
    return np.concatenate([*qs, d], axis=-1).reshape(n, -1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K blocks of float32 ``x`` ``(rows, K)``, ``K`` a multiple of 256 (gguf-py 0.19 has no Q6_K quantizer):
    ggml's ``quantize_row_q6_K_ref``: per 16 values a scale by ``make_qx_quants`` (the weighted least-squares
    scale over 19 trial steps), the 16 scales int8 under one fp16 ``d``, then 6-bit values."""
    rows, k = x.shape
    sub = x.reshape(-1, 16).astype(np.float32)  # every 16-value sub-block
    big = np.take_along_axis(sub, np.abs(sub).argmax(axis=1)[:, None], axis=1)  # signed value of largest |x|
    safe = np.where(big == 0, 1, big)
    w = sub * sub
    best_score, scales = np.full(len(sub), -np.inf, dtype=np.float32), np.zeros(len(sub), dtype=np.float32)
    for step in (0, *range(-9, 0), *range(1, 10)):  # ggml's candidates: -(32 + 0.1 step) / max
        levels = np.clip(np.rint(-(32 + 0.1 * step) / safe * sub), -32, 31)
        sumlx, suml2 = (w * sub * levels).sum(1), (w * levels * levels).sum(1)
        score = np.where(suml2 > 0, sumlx * sumlx / np.where(suml2 > 0, suml2, 1), -np.inf)
        better = score > best_score
        best_score = np.where(better, score, best_score)
        scales = np.where(better, sumlx / np.where(suml2 > 0, suml2, 1), scales)
    scales = np.where(big == 0, 0, scales[:, None])[:, 0].reshape(-1, 16)  # 16 sub-blocks per block
    big_scale = np.take_along_axis(scales, np.abs(scales).argmax(axis=1)[:, None], axis=1)
    iscale = np.where(big_scale == 0, 0, -128 / np.where(big_scale == 0, 1, big_scale))
    d = np.where(big_scale == 0, 0, 1 / np.where(iscale == 0, 1, iscale)).astype(np.float16)
    sc = np.minimum(127, np.rint(iscale * scales)).astype(np.int8)
    step = (d.astype(np.float32) * sc).reshape(-1, 1)
    levels = np.clip(np.rint(sub / np.where(step == 0, 1, step)), -32, 31)
    levels = (np.where(step == 0, 0, levels) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # (block, half, quarter, l)
    ql = np.concatenate(
        [levels[:, :, 0] & 0xF | (levels[:, :, 2] & 0xF) << 4, levels[:, :, 1] & 0xF | (levels[:, :, 3] & 0xF) << 4],
        axis=-1,
    ).reshape(-1, 128)
    high = levels >> 4
    qh = (high[:, :, 0] | high[:, :, 1] << 2 | high[:, :, 2] << 4 | high[:, :, 3] << 6).reshape(-1, 64)
    blocks = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8)], axis=-1)
    return blocks.reshape(rows, -1)


def _high_precision(weight: Tensor, kind: EmbeddingType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """An embedding or head ``(rows, dim)`` as ``kind``: F16, or gguf-py's Q8_0, or Q6_K."""
    x = weight.detach().float().cpu().numpy()
    qtype = gguf.GGMLQuantizationType[kind]
    if kind == "F16":
        return x.astype(np.float16), qtype
    if kind == "Q6_K":
        return _q6_k(x), qtype
    return gguf.quants.quantize(x, qtype), qtype


def _check_embedding_type(kind: EmbeddingType, plan: _Plan) -> None:
    if kind not in ("F16", "Q8_0", "Q6_K"):
        raise _fail(f"embedding_type must be 'F16', 'Q8_0' or 'Q6_K', got {kind!r}")
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0]
    if plan.embedding.embedding_dim % block:
        raise _fail(
            f"{plan.layout.path(Role.TOKEN_EMBD)} has dim {plan.embedding.embedding_dim}, not a multiple of "
            f"{kind}'s block of {block}; use embedding_type='F16'"
        )


def _norm_gain(norm: nn.Module | None, features: int) -> np.ndarray:
    """An RMSNorm's gain as F32 (ones for a norm without one)."""
    weight = getattr(norm, "weight", None)
    if weight is None:
        return np.ones(features, dtype=np.float32)
    return weight.detach().float().cpu().numpy()


def _rope_rows_interleaved(values: Tensor, n_heads: int) -> Tensor:
    """Rows of a q or k projection for llama.cpp's NORMAL rope (adjacent pairs) from the half-split layout
    bitnet_ao's models rotate: in each head, row ``2 i + j`` takes row ``j * head_dim / 2 + i``
    (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``)."""
    rows, k = values.shape
    return values.reshape(n_heads, 2, rows // n_heads // 2, k).transpose(1, 2).reshape(rows, k)


def _ternary(lin: _Linear, plan: _Plan, ternary_type: TernaryType) -> np.ndarray:
    weight = lin.linear.weight
    with torch.no_grad():
        q = weight.bitnet_quantization()
        values = weight.bitnet_int8(q).to(torch.int8).cpu()
    scale = q.scale.detach().float().cpu()
    fp16 = scale.to(torch.float16).float()
    if not (torch.isfinite(fp16) and fp16 >= 2**-14):
        raise _fail(
            f"{lin.name}'s scale {scale.item():.4g} is outside fp16's normal range [2^-14, 65504], where a "
            "GGUF block scale would lose more than 2^-11 of it"
        )
    if plan.arch == "llama" and lin.role in (Role.ATTN_Q, Role.ATTN_K):
        values = _rope_rows_interleaved(values, plan.n_heads if lin.role == Role.ATTN_Q else plan.n_kv_heads)
    return ternary_blocks(values, scale, ternary_type)


# --- the vocabulary ------------------------------------------------------------------------------------------


def _byte_to_unicode() -> list[str]:
    """GPT-2's printable stand-in for each byte (what llama.cpp's gpt2 vocabularies spell bytes with)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _write_byte_vocab(writer: gguf.GGUFWriter, vocab_size: int) -> None:
    """The benchmark model's vocabulary (token ``b`` is byte ``b``) as a gpt2 BPE vocabulary without merges:
    llama.cpp tokenizes text into its bytes and prints every token as its byte."""
    if vocab_size != 256:
        raise _fail(f"without a tokenizer the vocabulary is the 256 bytes, but the model has {vocab_size} tokens")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(_byte_to_unicode())
    writer.add_token_types([gguf.TokenType.NORMAL] * 256)
    writer.add_token_merges(_NO_MERGES)
    # No special tokens: nothing is prepended, and the end of text is byte 0, which text does not contain.
    writer.add_add_bos_token(False)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)


def _write_hf_vocab(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int, pre: str) -> None:
    """A Hugging Face byte-level BPE tokenizer, as ``convert_hf_to_gguf.py`` writes one (``_set_vocab_gpt2``):
    its tokens padded to the model's vocabulary, added tokens as CONTROL (special) or USER_DEFINED, merges and
    special token ids by gguf-py's ``SpecialVocab``."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        spec_file = Path(folder) / "tokenizer.json"
        spec = json.loads(spec_file.read_text()) if spec_file.exists() else {}
        model = spec.get("model", {})
        if model.get("type") != "BPE" or model.get("byte_fallback"):
            raise _fail(
                f"tokenizer {type(tokenizer).__name__} is not a byte-level BPE fast tokenizer (tokenizer.json "
                f"model {model.get('type')!r}, byte_fallback {model.get('byte_fallback')}); convert it with "
                "llama.cpp's convert_hf_to_gguf.py"
            )
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise _fail(f"the tokenizer has token ids up to {max(by_id)}, the model's vocabulary {vocab_size}")
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.add_to_gguf(writer, quiet=True)


# --- the file ------------------------------------------------------------------------------------------------


def save_gguf(
    model: nn.Module,
    path: str | Path,
    ternary_type: TernaryType = "TQ2_0",
    *,
    embedding_type: EmbeddingType = "F16",
    tokenizer: Any = None,
    tokenizer_pre: str = "gpt-2",
    name: str | None = None,
) -> Path:
    """Write ``model`` (bitnet_ao's benchmark model or a transformers ``LlamaForCausalLM``, its block linears
    BitNet weights, trained or packed) to ``path`` as one GGUF file that stock llama.cpp loads; returns the path.

    ``ternary_type``: ``"TQ2_0"`` (2.0625 bits per weight) or ``"TQ1_0"``
    (1.6875); both hold the same values. ``embedding_type``: the token embedding and the output head as
    ``"F16"``, ``"Q8_0"`` or ``"Q6_K"``; norms are F32. ``tokenizer``: a Hugging Face byte-level BPE fast
    tokenizer, its pre-tokenizer named for llama.cpp by ``tokenizer_pre``; without one the vocabulary is the 256
    bytes of the benchmark model. ``name``: ``general.name`` (default: the model's class name).

    Raises ``ValueError`` naming the module and the reason for what llama.cpp cannot compute exactly
    (docs/gguf.md): the FAQ norm placement, a squared-ReLU MLP, an untied head with the subln placement, binary
    weights, group scales, biases, in_features not a multiple of 256, block linears left in high precision, other
    layouts. Nothing is written then.
    """
    if ternary_type not in _FILE_TYPES:
        raise _fail(f"ternary_type must be 'TQ2_0' or 'TQ1_0', got {ternary_type!r}")
    plan = _plan(model)
    _check_embedding_type(embedding_type, plan)
    vocab_size, dim = plan.embedding.weight.shape
    qtype = gguf.GGMLQuantizationType[ternary_type]

    def weight(role: Role, block: int | None = None) -> str:  # llama.cpp's name, from the table of layouts
        return f"{GGUF.blocks}.{block}.{GGUF.path(role)}.weight" if block is not None else f"{GGUF.path(role)}.weight"

    tensors: list[tuple[str, np.ndarray, gguf.GGMLQuantizationType | None]] = []
    tensors.append((weight(Role.TOKEN_EMBD), *_high_precision(plan.embedding.weight, embedding_type)))
    for i, block in enumerate(plan.blocks):
        for role, norm in block.norms.items():
            tensors.append((weight(role, i), _norm_gain(norm, dim), None))
        for lin in block.linears:
            tensors.append((weight(lin.role, i), _ternary(lin, plan, ternary_type), qtype))
            if lin.norm is not None:  # subln: the sub-norm in front of the attention output / down projection
                tensors.append((weight(lin.role.norm, i), _norm_gain(lin.norm, lin.linear.in_features), None))
    tensors.append((weight(Role.OUTPUT_NORM), _norm_gain(plan.final_norm, dim), None))
    if not plan.tied:  # llama only: without it llama.cpp ties the head
        tensors.append((weight(Role.OUTPUT), *_high_precision(plan.head.weight, embedding_type)))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, plan.arch)
    writer.add_name(name or type(model).__name__)
    writer.add_file_type(_FILE_TYPES[ternary_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(plan.context_length)
    writer.add_embedding_length(dim)
    writer.add_block_count(len(plan.blocks))
    writer.add_feed_forward_length(plan.hidden_dim)
    writer.add_head_count(plan.n_heads)
    writer.add_head_count_kv(plan.n_kv_heads)
    writer.add_rope_dimension_count(plan.head_dim)
    writer.add_rope_freq_base(plan.rope_theta)
    writer.add_layer_norm_rms_eps(plan.eps)
    writer.add_vocab_size(vocab_size)
    if tokenizer is None:
        _write_byte_vocab(writer, vocab_size)
    else:
        _write_hf_vocab(writer, tokenizer, vocab_size, tokenizer_pre)
    for tensor_name, data, raw in tensors:
        writer.add_tensor(tensor_name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


__all__ = ["BLOCK", "Architecture", "EmbeddingType", "TernaryType", "gguf_architecture", "save_gguf", "ternary_blocks"]
