"""save_gguf: a BitNet model as one GGUF file that stock llama.cpp runs: the planned modules (``plan.py``) as
tensors in llama.cpp's names (``bitnet_ao.layouts.GGUF``) and block formats (``quants.py``), the hyperparameters
and the vocabulary (``vocab.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import Tensor, nn

from ...layouts import GGUF, Role
from .plan import ExportPlan, PlannedLinear, export_plan, fail
from .quants import EmbeddingType, TernaryType, high_precision, ternary_blocks
from .vocab import write_byte_vocab, write_hf_vocab

#: The file type llama.cpp reports for each ternary type (``general.file_type``).
_FILE_TYPES = {"TQ2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "TQ1_0": gguf.LlamaFileType.MOSTLY_TQ1_0}


def _check_embedding_type(kind: EmbeddingType, plan: ExportPlan) -> None:
    if kind not in ("F16", "Q8_0", "Q6_K"):
        raise fail(f"embedding_type must be 'F16', 'Q8_0' or 'Q6_K', got {kind!r}")
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0]
    if plan.embedding.embedding_dim % block:
        raise fail(
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


def _ternary(lin: PlannedLinear, plan: ExportPlan, ternary_type: TernaryType) -> np.ndarray:
    weight = lin.linear.weight
    with torch.no_grad():
        q = weight.bitnet_quantization()
        values = weight.bitnet_int8(q).to(torch.int8).cpu()
    scale = q.scale.detach().float().cpu()
    fp16 = scale.to(torch.float16).float()
    if not (torch.isfinite(fp16) and fp16 >= 2**-14):
        raise fail(
            f"{lin.name}'s scale {scale.item():.4g} is outside fp16's normal range [2^-14, 65504], where a "
            "GGUF block scale would lose more than 2^-11 of it"
        )
    if plan.arch == "llama" and lin.role in (Role.ATTN_Q, Role.ATTN_K):
        values = _rope_rows_interleaved(values, plan.n_heads if lin.role == Role.ATTN_Q else plan.n_kv_heads)
    return ternary_blocks(values, scale, ternary_type)


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
        raise fail(f"ternary_type must be 'TQ2_0' or 'TQ1_0', got {ternary_type!r}")
    plan = export_plan(model)
    _check_embedding_type(embedding_type, plan)
    vocab_size, dim = plan.embedding.weight.shape
    qtype = gguf.GGMLQuantizationType[ternary_type]

    def weight(role: Role, block: int | None = None) -> str:  # llama.cpp's name, from the table of layouts
        return f"{GGUF.blocks}.{block}.{GGUF.path(role)}.weight" if block is not None else f"{GGUF.path(role)}.weight"

    tensors: list[tuple[str, np.ndarray, gguf.GGMLQuantizationType | None]] = []
    tensors.append((weight(Role.TOKEN_EMBD), *high_precision(plan.embedding.weight, embedding_type)))
    for i, block in enumerate(plan.blocks):
        for role, norm in block.norms.items():
            tensors.append((weight(role, i), _norm_gain(norm, dim), None))
        for lin in block.linears:
            tensors.append((weight(lin.role, i), _ternary(lin, plan, ternary_type), qtype))
            if lin.norm is not None:  # subln: the sub-norm in front of the attention output / down projection
                tensors.append((weight(lin.role.norm, i), _norm_gain(lin.norm, lin.linear.in_features), None))
    tensors.append((weight(Role.OUTPUT_NORM), _norm_gain(plan.final_norm, dim), None))
    if not plan.tied:  # llama only: without it llama.cpp ties the head
        tensors.append((weight(Role.OUTPUT), *high_precision(plan.head.weight, embedding_type)))

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
        write_byte_vocab(writer, vocab_size)
    else:
        write_hf_vocab(writer, tokenizer, vocab_size, tokenizer_pre)
    for tensor_name, data, raw in tensors:
        writer.add_tensor(tensor_name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


__all__ = ["save_gguf"]
