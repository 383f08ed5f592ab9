"""Spec §1 written out again, independently of ``bitnet_ao``, in the style of the BitNet FAQ's fake-quant code.

Tests compare the library against these functions, never against the library's own reference module.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def act_quant(x: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Per-token absmax int8: returns (integer values as float32, scale per row)."""
    x = x.float()
    s = x.abs().max(dim=-1).values.clamp(min=eps) / 127
    return torch.clamp(torch.round(x / s.unsqueeze(-1)), -128, 127), s


def ternary_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """BitNet b1.58: abs-mean scale (accumulated in float64, stored float32) and values in {-1, 0, 1}."""
    s = w.double().abs().mean().float()
    return torch.clamp(torch.round(w.float() / s.clamp(min=1e-5)), -1, 1), s


def binary_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """Original BitNet: sign(w - mean(w)) with 0 -> +1, scale mean(|w|)."""
    alpha = w.double().mean().float()
    q = torch.sign(w.float() - alpha)
    q[q == 0] = 1
    return q, w.double().abs().mean().float()


def rms_norm_rstd(x: Tensor, eps: float) -> Tensor:
    """The RMSNorm's ``1 / rms`` per row, shape ``(M, 1)`` float32: the exact sum of squares (``math.fsum``, no
    summation order at all), its mean rounded to float32, ``1 / sqrt(mean + eps)`` in float32 arithmetic (numpy)."""
    k = x.shape[-1]
    mean = np.array([math.fsum(v * v for v in row) / k for row in x.double().tolist()]).astype(np.float32)
    return torch.from_numpy(np.float32(1) / np.sqrt(mean + np.float32(eps)))[:, None]


class FakeQuantBitLinear(nn.Linear):
    """The FAQ's BitLinear without its built-in RMSNorm (placement is the surgery's job): straight-through
    fake quantization, ``y = x_fq @ W_fq.T + b`` computed in the activation dtype."""

    def __init__(self, *args, weights: str = "ternary", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weights = weights

    def forward(self, x: Tensor) -> Tensor:
        q, s = act_quant(x)
        x_fq = (q * s.unsqueeze(-1)).to(x.dtype)
        wq, sw = (ternary_weight if self.weights == "ternary" else binary_weight)(self.weight)
        w_fq = (wq * sw).to(self.weight.dtype)
        x_ste = x + (x_fq - x).detach()
        w_ste = self.weight + (w_fq - self.weight).detach()
        return F.linear(x_ste, w_ste, self.bias)


def snr_db(approx: Tensor, exact: Tensor) -> float:
    """Signal-to-noise ratio of ``approx`` against ``exact`` in decibels."""
    exact = exact.double()
    noise = (approx.double() - exact).pow(2).sum()
    return float(10 * torch.log10(exact.pow(2).sum() / noise))


def grouped(fn, w: Tensor, groups: int, dim: int) -> tuple[Tensor, Tensor]:
    """``fn`` (ternary_weight or binary_weight) applied per group of rows (dim 0) or columns (dim 1): the
    quantized weight and the scale of each element's group (the BitNet paper's group quantization)."""
    parts = [fn(block) for block in w.chunk(groups, dim=dim)]
    values = torch.cat([q for q, _ in parts], dim=dim)
    scales = torch.cat(
        [s.expand(block.shape) for (_, s), block in zip(parts, w.chunk(groups, dim=dim), strict=True)], dim=dim
    )
    return values, scales


def act_quant_groups(x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Per-token absmax int8 over each of ``groups`` blocks of the last dimension: values and per-element scales."""
    parts = [act_quant(block) for block in x.chunk(groups, dim=-1)]
    values = torch.cat([q for q, _ in parts], dim=-1)
    scales = torch.cat([s.unsqueeze(-1).expand(q.shape) for q, s in parts], dim=-1)
    return values, scales


class FakeQuantGroupBitLinear(nn.Linear):
    """:class:`FakeQuantBitLinear` with group scales: weight scales per group of rows (``group_dim=0``) or of
    columns (``group_dim=1``, where the activation scale is per token and group too)."""

    def __init__(self, *args, groups: int, group_dim: int, weights: str = "ternary", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.groups, self.group_dim, self.weights = groups, group_dim, weights

    def forward(self, x: Tensor) -> Tensor:
        q, s = act_quant_groups(x, self.groups if self.group_dim == 1 else 1)
        x_fq = (q * s).to(x.dtype)
        fn = ternary_weight if self.weights == "ternary" else binary_weight
        wq, sw = grouped(fn, self.weight, self.groups, self.group_dim)
        w_fq = (wq * sw).to(self.weight.dtype)
        x_ste = x + (x_fq - x).detach()
        w_ste = self.weight + (w_fq - self.weight).detach()
        return F.linear(x_ste, w_ste, self.bias)
