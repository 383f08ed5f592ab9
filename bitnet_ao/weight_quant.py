"""The weight side of the numerics (docs/numerics.md#forward): abs-mean scales and ternary or binary values.

A leaf of the package: every weight kind quantizes through these functions, and the FSDP2 all-gather calls them
with statistics all-reduced over the shards, so a sharded weight gets exactly the single-device values.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import kernels
from .config import BitNetTrainingConfig, WeightKind
from .kernels.reference import WEIGHT_EPS, weight_scales_from_stats


class WeightQuantization(NamedTuple):
    """How a weight was quantized: what the backward needs to rebuild the same int8 weight without a copy.

    With group scales (``config.scale_groups = G > 1``) ``scale`` and ``center`` hold one value per row
    (``group_dim=0``, shape ``(N, 1)``) or per column (``group_dim=1``, ``(1, K)``): each group's value repeated
    over its rows or columns, so that they broadcast against the weight in ``ternarize`` / ``binarize`` as they are.
    """

    #: ``s_w = mean |W|``, float32 scalar (or per group, see above): the int8 matmul's output is multiplied by it.
    scale: Tensor
    #: The value subtracted before ``sign`` when binary values are computed from a high-precision weight:
    #: ``mean(W)``. ``None`` when there is nothing to subtract: ternary weights, and weights that exist only as
    #: their int8 values (a packed weight's centre was spent when it was packed).
    center: Tensor | None = None


def quantization_from_stats(stats: Tensor, shape: tuple[int, int], config: BitNetTrainingConfig) -> WeightQuantization:
    """The quantization of a weight of ``shape`` from its float64 ``(sum |W|, sum W)``, or ``(G, 2)`` of them for
    group scales, which come back repeated over each group's rows or columns (see :class:`WeightQuantization`)."""
    n, k = shape
    scale, mean = weight_scales_from_stats(stats, n * k // config.scale_groups)
    q = WeightQuantization(scale=scale, center=mean if config.weights == "binary" else None)
    if not config.grouped:
        return q
    size = shape[config.group_dim] // config.scale_groups

    def spread(per_group: Tensor) -> Tensor:  # (G,) -> (N, 1) or (1, K)
        repeated = per_group.repeat_interleave(size)
        return repeated[:, None] if config.group_dim == 0 else repeated[None, :]

    return q._replace(scale=spread(q.scale), center=None if q.center is None else spread(q.center))


def column_group_stats(w: Tensor, groups: int) -> Tensor:
    """float64 ``(sum |W|, sum W)`` of each of ``groups`` equal blocks of columns of ``w``, ``(groups, 2)``."""
    return torch.stack([kernels.weight_stats(block.contiguous()) for block in w.chunk(groups, dim=1)])


def weight_quantization(w: Tensor, config: BitNetTrainingConfig) -> WeightQuantization:
    """The quantization of the whole weight ``w``: one scale, or one per group of rows or columns."""
    if not config.grouped:
        stats = kernels.weight_stats(w)
    elif config.group_dim == 1:
        stats = column_group_stats(w, config.scale_groups)
    else:
        stats = torch.stack([kernels.weight_stats(rows) for rows in w.chunk(config.scale_groups, dim=0)])
    return quantization_from_stats(stats, tuple(w.shape), config)


def quantize_weight(w: Tensor, q: WeightQuantization, *, weights: WeightKind, transpose: bool) -> Tensor:
    """The int8 values of the high-precision weight ``w`` under ``q``, ``weights`` (the recipe's) saying which:
    ternary {-1, 0, 1} or binary {-1, 1}; ``(K, N)`` when ``transpose`` else ``(N, K)``. The kind is an argument
    rather than a field of ``q``, which torch.compile traces out of a weight subclass and must hold tensors only."""
    if weights == "ternary":
        return kernels.ternarize(w, q.scale, transpose)
    if q.center is None:
        raise ValueError(
            "quantize_weight: binary values need the centre mean(W) to subtract; this quantization has none (it "
            "belongs to weights that exist only as their int8 values, a packed weight)"
        )
    return kernels.binarize(w, q.center, transpose)


def master_weight_for(values: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """A high-precision weight whose ternary BitNet quantization is exactly ``values`` (int8 in {-1, 0, 1}) with the
    float32 scale ``scale``: the start for training from an already quantized checkpoint (a packed Hugging Face
    BitNet weight), so that exporting it again before any step gives back the same values and scale.

    ``W_q * scale`` would not do: its abs-mean is ``scale`` times the fraction of nonzero values, so the scale
    would shrink. Instead every nonzero value gets the magnitude ``scale * numel / nnz`` (rounded down to
    ``dtype``, some one step up), and the remainder of ``sum |W| = scale * numel`` goes to a few zero positions
    as values far below ``scale / 2``, which still quantize to 0. The result is checked by quantizing it.
    """
    if values.dtype != torch.int8 or values.dim() != 2:
        raise TypeError(
            f"master_weight_for: values must be a 2-D int8 tensor, got {values.dtype} {tuple(values.shape)}"
        )
    target_scale = float(scale)
    nonzero = values != 0
    nnz, numel = int(nonzero.sum()), values.numel()
    if target_scale < WEIGHT_EPS or nnz == 0:
        raise ValueError(
            f"master_weight_for: a scale of {target_scale:g} with {nnz} nonzero values cannot be the abs-mean "
            f"of a weight that quantizes back to them (the abs-mean is clamped at {WEIGHT_EPS:g} before dividing)"
        )
    total = target_scale * numel  # exact in float64: a float32 times an integer below 2**29
    low = _round_down(total / nnz, dtype)
    high = torch.nextafter(low, torch.tensor(float("inf"), dtype=dtype))
    step = float(high) - float(low)
    n_high = min(int((total - nnz * float(low)) // step), nnz - 1)
    magnitudes = torch.full((nnz,), float(low), dtype=torch.float64)
    magnitudes[:n_high] = float(high)
    weight = torch.zeros(numel, dtype=torch.float64)
    weight[nonzero.flatten()] = magnitudes * values[nonzero].double()
    # What is left of the abs-sum goes to zero positions, each below scale / 4, greedily in shrinking pieces.
    remainder = total - float(magnitudes.sum())
    zeros = (~nonzero).flatten().nonzero().flatten().tolist()
    for index in zeros[:64]:
        if remainder <= total * 2.0**-45:
            break
        piece = float(_round_down(min(remainder, target_scale / 4), dtype))
        weight[index] = piece
        remainder -= piece
    weight = weight.reshape(values.shape).to(dtype)
    q = weight_quantization(weight, _TERNARY)
    if q.scale.item() != target_scale or not torch.equal(
        quantize_weight(weight, q, weights="ternary", transpose=False), values
    ):
        raise ValueError(
            f"master_weight_for: no {dtype} weight of shape {tuple(values.shape)} reproduces these values with "
            f"scale {target_scale:g} exactly (too few zero values to carry the rounding); use float32"
        )
    return weight


def _round_down(x: float, dtype: torch.dtype) -> Tensor:
    """The largest ``dtype`` value not above the positive float ``x``."""
    t = torch.tensor(x, dtype=torch.float64).to(dtype)
    if float(t) > x:
        t = torch.nextafter(t, torch.tensor(0.0, dtype=dtype))
    return t


_TERNARY = BitNetTrainingConfig(weights="ternary")
