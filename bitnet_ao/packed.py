"""``BitNetPackedLinearWeight``: a BitNet weight that arrives already quantized, 2-bit packed with its scale.

The FSDP2 all-gather produces it (``bitnet_ao/fsdp.py``): every rank contributes its shard ternarized with the
global scale and packed four values per byte, and the gathered bytes are wrapped, without a copy, as this
weight. ``F.linear`` on it runs the BitNet autograd function straight on the packed values; nothing else is
allowed on it, since no high-precision weight exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels
from .config import BitNetTrainingConfig
from .kernels import reference
from .linear import bitnet_linear
from .private_api import disable_torch_function_subclass, make_wrapper_subclass
from .weight_quant import WeightQuantization

aten = torch.ops.aten


class BitNetPackedLinearWeight(Tensor):
    """An ``(N, K)`` BitNet weight already quantized: values 2-bit packed in ``packed`` ``(N, ceil(K / 4))`` int8
    (the layout of docs/numerics.md#2-bit-packing) and the float32 weight scale ``scale``.

    Its ``dtype`` is the parameter dtype FSDP2 asked for: the dtype of ``grad_weight``, which is a plain tensor.
    """

    packed: Tensor
    scale: Tensor
    config: BitNetTrainingConfig

    @staticmethod
    def __new__(
        cls,
        packed: Tensor,
        scale: Tensor,
        in_features: int,
        dtype: torch.dtype,
        config: BitNetTrainingConfig,
        requires_grad: bool = False,
    ) -> BitNetPackedLinearWeight:
        return make_wrapper_subclass(
            cls, (packed.shape[0], in_features), dtype=dtype, device=packed.device, requires_grad=requires_grad
        )

    def __init__(
        self,
        packed: Tensor,
        scale: Tensor,
        in_features: int,
        dtype: torch.dtype,
        config: BitNetTrainingConfig,
        requires_grad: bool = False,
    ) -> None:
        if packed.dtype != torch.int8 or packed.dim() != 2 or packed.shape[1] != (in_features + 3) // 4:
            raise ValueError(
                f"BitNetPackedLinearWeight: packed must be int8 of shape (N, ceil({in_features} / 4)), got "
                f"{packed.dtype} {tuple(packed.shape)}"
            )
        self.packed = packed
        self.scale = scale
        self.config = config

    def __repr__(self) -> str:
        shape = tuple(self.shape)
        return f"{type(self).__name__}(shape={shape}, dtype={self.dtype}, scale={self.scale}, config={self.config})"

    def __tensor_flatten__(self) -> tuple[list[str], tuple[torch.dtype, BitNetTrainingConfig]]:
        return ["packed", "scale"], (self.dtype, self.config)

    @classmethod
    def __tensor_unflatten__(cls, inner: dict[str, Tensor], meta: tuple, outer_size, outer_stride):
        dtype, config = meta
        return cls(inner["packed"], inner["scale"], outer_size[1], dtype, config)

    # --- the BitNetWeight interface of the autograd function (bitnet_ao/linear.py) ---------------------------

    def bitnet_quantization(self) -> WeightQuantization:
        # Quantized with the global scale before the all-gather; a binary weight's centre is already spent.
        return WeightQuantization(self.scale, None)

    def bitnet_int8(self, q: WeightQuantization) -> Tensor:
        return reference.unpack_i2_in_i8(self.packed, self.shape[1])

    def bitnet_mm(
        self,
        a: Tensor,
        q: WeightQuantization,
        transpose: bool,
        row_scale: Tensor,
        bias: Tensor | None,
        out_dtype: torch.dtype,
    ) -> Tensor:
        return kernels.scaled_int8_mm_packed(
            a, self.packed, self.shape[1], transpose, row_scale, None, q.scale, bias, out_dtype
        )

    # --- everything else ------------------------------------------------------------------------------------

    def _same(self, requires_grad: bool = False) -> BitNetPackedLinearWeight:
        return type(self)(self.packed, self.scale, self.shape[1], self.dtype, self.config, requires_grad)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return bitnet_linear(*args, **kwargs)
        with disable_torch_function_subclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        weight = args[0]
        # detach/alias: nn.Parameter and autograd bookkeeping. as_strided: FSDP2 views the all-gather output as
        # the unsharded parameter with the original (contiguous) size and stride, i.e. the tensor itself.
        if func in (aten.detach.default, aten.alias.default):
            return weight._same()
        if func is aten.as_strided.default and _is_identity_view(weight, *args[1:], **(kwargs or {})):
            return weight._same()
        raise NotImplementedError(
            f"BitNetPackedLinearWeight (the FSDP2-gathered BitNet weight, shape {tuple(weight.shape)}) only "
            f"supports F.linear, not {func}; use the sharded master weight for anything else"
        )


def _is_identity_view(weight: Tensor, size, stride, storage_offset: int | None = 0) -> bool:
    n, k = weight.shape
    return list(size) == [n, k] and list(stride) == [k, 1] and not storage_offset
