"""The GGUF block formats save_gguf writes, as numpy bytes: the ternary ``TQ2_0`` / ``TQ1_0`` of the block linears
and the ``F16`` / ``Q8_0`` / ``Q6_K`` of the embedding and the head (ggml's ``ggml-quants.c``, byte for byte).

llama.cpp multiplies ternary weights natively: ``TQ2_0`` (2 bits per value) and ``TQ1_0`` (five values per byte),
blocks of 256 values along the input dimension, each block with one fp16 scale ``d``. Its converter starts from
high-precision weights and ternarizes them again; a bitnet_ao model already holds the exact ternary values and the
scale its forward multiplies by, so :func:`ternary_blocks` builds the bytes from those int8 values: the file's
weight is exactly ``W_q * fp16(s_w)``.
"""

from __future__ import annotations

from typing import Literal

import gguf
import numpy as np
import torch
from torch import Tensor

TernaryType = Literal["TQ2_0", "TQ1_0"]
EmbeddingType = Literal["F16", "Q8_0", "Q6_K"]

#: Values per TQ1_0 / TQ2_0 / Q6_K block (llama.cpp's ``QK_K``): in_features must be a multiple of it.
BLOCK = gguf.QK_K


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


def high_precision(weight: Tensor, kind: EmbeddingType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """An embedding or head ``(rows, dim)`` as ``kind``: F16, or gguf-py's Q8_0, or Q6_K."""
    x = weight.detach().float().cpu().numpy()
    qtype = gguf.GGMLQuantizationType[kind]
    if kind == "F16":
        return x.astype(np.float16), qtype
    if kind == "Q6_K":
        return _q6_k(x), qtype
    return gguf.quants.quantize(x, qtype), qtype


__all__ = ["BLOCK", "EmbeddingType", "TernaryType", "high_precision", "ternary_blocks"]
