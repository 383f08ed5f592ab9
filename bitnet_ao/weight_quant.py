"""The weight side of the numerics (docs/numerics.md#forward): abs-mean scales and ternary or binary values.

A leaf of the package: every weight kind quantizes through these functions, and the FSDP2 all-gather calls them
with statistics all-reduced over the shards, so a sharded weight gets exactly the single-device values.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from . import kernels
from .config import BitNetTrainingConfig
from .kernels.reference import weight_scales_from_stats


class WeightQuantization(NamedTuple):
    """How a weight was quantized: what the backward needs to rebuild the same int8 weight without a copy."""

    #: ``s_w = mean |W|``, float32 scalar: the int8 matmul's output is multiplied by it.
    scale: Tensor
    #: Binary weights only: ``mean(W)``, the value subtracted before ``sign``; ``None`` for ternary weights.
    center: Tensor | None


def quantization_from_stats(stats: Tensor, numel: int, config: BitNetTrainingConfig) -> WeightQuantization:
    """The quantization of a weight of ``numel`` elements from its float64 ``(sum |W|, sum W)``."""
    scale, mean = weight_scales_from_stats(stats, numel)
    return WeightQuantization(scale, mean if config.weights == "binary" else None)


def weight_quantization(w: Tensor, config: BitNetTrainingConfig) -> WeightQuantization:
    """The quantization of the whole weight ``w``."""
    return quantization_from_stats(kernels.weight_stats(w), w.numel(), config)


def quantize_weight(w: Tensor, q: WeightQuantization, transpose: bool) -> Tensor:
    """The int8 ternary (``q.center is None``) or binary weight, ``(K, N)`` when ``transpose`` else ``(N, K)``."""
    if q.center is None:
        return kernels.ternarize(w, q.scale, transpose)
    return kernels.binarize(w, q.center, transpose)
