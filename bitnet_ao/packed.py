"""``BitNetPackedLinearWeight``: a BitNet weight that exists only quantized, packed with its scale.

Two producers: the FSDP2 all-gather (``bitnet_ao/fsdp_gather.py``: every rank packs its shard with the global
scale and the gathered bytes are wrapped, without a copy) and ``quantize_(model, bitnet_inference())``
(``bitnet_ao/inference.py``: the frozen deployment weight). ``F.linear`` on it runs the BitNet autograd function
straight on the packed values. Besides that it supports what a frozen parameter meets: views and ``detach``,
``.to(device / dtype)``, ``clone``/``deepcopy``, ``copy_`` from another packed weight (``load_state_dict``) and
pickling. Nothing else: no high-precision weight exists to run it on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .config import BitNetTrainingConfig
from .group_scales import scaled_mm_groups
from .kernels import reference
from .linear import InputNorm
from .private_api import make_wrapper_subclass
from .weight_base import BitNetWeightTensor
from .weight_quant import WeightQuantization, quantize_weight, weight_quantization

aten = torch.ops.aten


def bits_per_value(config: BitNetTrainingConfig) -> int:
    """2 for ternary weights (four per byte), 1 for binary weights (eight per byte)."""
    return 1 if config.weights == "binary" else 2


class BitNetPackedLinearWeight(BitNetWeightTensor):
    """An ``(N, K)`` BitNet weight already quantized: its values packed along ``K`` in ``packed`` int8 (ternary:
    2 bits each, ``(N, ceil(K / 4))``; binary: 1 bit each, ``(N, ceil(K / 8))``; docs/numerics.md#2-bit-packing)
    and the float32 weight scale ``scale``.

    Its ``dtype`` is the dtype of the weight it stands for (under FSDP2, the parameter dtype FSDP2 asked for, which
    is the dtype of ``grad_weight``); the linear's output has the input's dtype, as for any BitNet weight.
    """

    packed: Tensor
    scale: Tensor

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
        bits = bits_per_value(config)
        if (
            packed.dtype != torch.int8
            or packed.dim() != 2
            or packed.shape[1] != reference.packed_columns(in_features, bits)
        ):
            raise ValueError(
                f"BitNetPackedLinearWeight: a {config.weights} weight with in_features={in_features} needs int8 "
                f"packed values of shape (N, {reference.packed_columns(in_features, bits)}) ({bits} bits per "
                f"value), got {packed.dtype} {tuple(packed.shape)}"
            )
        n = packed.shape[0]
        scale_shape = () if not config.grouped else (n, 1) if config.group_dim == 0 else (1, in_features)
        if scale.dtype != torch.float32 or tuple(scale.shape) != scale_shape:
            raise ValueError(
                f"BitNetPackedLinearWeight: scale must be float32 of shape {scale_shape} (scale_groups="
                f"{config.scale_groups}, group_dim={config.group_dim}), got {scale.dtype} {tuple(scale.shape)}"
            )
        self.packed = packed
        self.scale = scale
        self.config = config

    @property
    def bits(self) -> int:
        return bits_per_value(self.config)

    def __repr__(self) -> str:
        # The scale's value only from a plain tensor with data: torch.compile formats the fake weights it traces
        # (dynamo's debug logs), and .item() on a fake scale would leave a pending unbacked symbol behind that
        # fails the compile (PendingUnbackedSymbolNotFound).
        readable = type(self.scale) is Tensor and self.scale.device.type != "meta"
        scale = self.scale.flatten()[0].item() if readable else "?"
        return (
            f"{type(self).__name__}(shape={tuple(self.shape)}, {self.config.weights}, {self.bits}-bit values, "
            f"dtype={self.dtype}, scale={scale}{', ...' if self.config.grouped else ''})"
        )

    def __tensor_flatten__(self) -> tuple[list[str], tuple[torch.dtype, BitNetTrainingConfig]]:
        return ["packed", "scale"], (self.dtype, self.config)

    @classmethod
    def __tensor_unflatten__(cls, inner: dict[str, Tensor], meta: tuple, outer_size, outer_stride):
        dtype, config = meta
        return cls(inner["packed"], inner["scale"], outer_size[1], dtype, config)

    def _rebuild_args(self) -> tuple[Tensor, Tensor, int, torch.dtype, BitNetTrainingConfig, bool]:
        # Pickled as a call of the class itself: the packed bytes, the scale and the constructor's metadata.
        return (self.packed, self.scale, self.shape[1], self.dtype, self.config, self.requires_grad)

    # --- the BitNetWeight interface of the autograd function (bitnet_ao/linear.py) ---------------------------

    def bitnet_quantization(self) -> WeightQuantization:
        # Quantized before it was packed: the values exist only as int8, a binary weight's centre is spent.
        return WeightQuantization(scale=self.scale, center=None)

    def bitnet_int8(self, q: WeightQuantization) -> Tensor:
        return reference.unpack_weight(self.packed, self.shape[1], self.bits)

    def bitnet_mm(
        self,
        a: Tensor,
        q: WeightQuantization,
        *,
        transpose: bool,
        row_scale: Tensor,
        bias: Tensor | None,
        out_dtype: torch.dtype,
    ) -> Tensor:
        if self.config.grouped:  # group scales: the matmul per group runs on the unpacked values
            w_q = self.bitnet_int8(q)
            return scaled_mm_groups(
                a,
                w_q.t() if transpose else w_q,
                row_scale=row_scale,
                q=q,
                config=self.config,
                transpose=transpose,
                bias=bias,
                out_dtype=out_dtype,
            )
        return kernels.scaled_int8_mm_packed(
            a,
            self.packed,
            k=self.shape[1],
            transpose_b=transpose,
            row_scale=row_scale,
            col_scale=None,
            scale=q.scale,
            bias=bias,
            out_dtype=out_dtype,
            bits=self.bits,
        )

    def bitnet_forward(
        self, x2: Tensor, *, norm: InputNorm | None, bias: Tensor | None, out_dtype: torch.dtype
    ) -> Tensor | None:
        """The whole no-grad forward in one op (``kernels.packed_linear``; one C call per linear when decoding on
        CPU). ``None`` for group scales, which take the general path."""
        if self.config.grouped:
            return None
        norm_weight, norm_eps = norm if norm is not None else (None, 0.0)
        return kernels.run_packed_linear(
            x2,
            norm_weight=norm_weight,
            norm_eps=norm_eps,
            b_packed=self.packed,
            k=self.shape[1],
            bits=self.bits,
            scale=self.scale,
            bias=bias,
            out_dtype=out_dtype,
        )

    # --- everything else ------------------------------------------------------------------------------------

    def _with(
        self, packed: Tensor, scale: Tensor, dtype: torch.dtype | None = None, requires_grad: bool = False
    ) -> BitNetPackedLinearWeight:
        return type(self)(packed, scale, self.shape[1], dtype or self.dtype, self.config, requires_grad)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        weight = args[0]
        # detach/alias: nn.Parameter and autograd bookkeeping. as_strided: FSDP2 views the all-gather output as
        # the unsharded parameter with the original (contiguous) size and stride, i.e. the tensor itself.
        if func in (aten.detach.default, aten.alias.default) or (
            func is aten.as_strided.default and _is_identity_view(weight, *args[1:], **kwargs)
        ):
            return weight._with(weight.packed, weight.scale)
        if func is aten.view.default and list(args[1]) == list(weight.shape):
            return weight._with(weight.packed, weight.scale)  # DTensor.to_local's view_as
        if func is aten.clone.default:
            return weight._with(weight.packed.clone(), weight.scale.clone())
        if func is aten._to_copy.default and set(kwargs) <= {"dtype", "device", "layout", "non_blocking"}:
            # .to(device) moves the packed bytes; .to(dtype) changes the dtype the weight stands for.
            device, non_blocking = kwargs.get("device"), kwargs.get("non_blocking", False)
            packed = weight.packed.to(device=device, non_blocking=non_blocking)
            scale = weight.scale.to(device=device, non_blocking=non_blocking)
            return weight._with(packed, scale, kwargs.get("dtype"))
        if func is aten.copy_.default and isinstance(args[1], cls) and _same_layout(weight, args[1]):
            weight.packed.copy_(args[1].packed)
            weight.scale.copy_(args[1].scale)
            return weight
        if func in (aten.add_.Tensor, aten.sub_.Tensor):  # in place: a merge (the rest falls to the error below)
            raise NotImplementedError(
                f"BitNetPackedLinearWeight (a packed {weight.config.weights} BitNet weight, shape "
                f"{tuple(weight.shape)}): cannot add to it in place ({func}), e.g. merging a LoRA adapter "
                "into it (peft's merge_and_unload): its values are frozen at 2 bits and its high-precision "
                "values are gone. Keep the adapter unmerged, or merge it into the training model (master weights, "
                "bitnet_training) and pack that with bitnet_inference afterwards"
            )
        if func is aten.embedding.default:
            raise NotImplementedError(
                f"BitNetPackedLinearWeight (shape {tuple(weight.shape)}) is used by an embedding lookup: an output "
                "head tied to the input embedding was packed with bitnet_inference, which frees the high-precision "
                "values the embedding needs. Keep the head out of the filter (filter_fn=bitnet_ao.surgery."
                "quantize_filter), or untie it before packing: model.lm_head.weight = "
                "torch.nn.Parameter(model.lm_head.weight.detach().clone())"
            )
        raise NotImplementedError(
            f"BitNetPackedLinearWeight (a packed {weight.config.weights} BitNet weight, shape "
            f"{tuple(weight.shape)}) supports F.linear, .to(), clone and copy_ from another packed weight, not "
            f"{func}; no high-precision weight exists (train the master weight, or unpack with "
            "bitnet_ao.unpack_i2_in_i8 / unpack_i1_in_i8)"
        )


def _is_identity_view(weight: Tensor, size, stride, storage_offset: int | None = 0) -> bool:
    n, k = weight.shape
    return list(size) == [n, k] and list(stride) == [k, 1] and not storage_offset


def _same_layout(a: BitNetPackedLinearWeight, b: BitNetPackedLinearWeight) -> bool:
    return a.shape == b.shape and a.packed.shape == b.packed.shape


def pack_linear_weight(
    weight: Tensor, config: BitNetTrainingConfig, requires_grad: bool = False
) -> BitNetPackedLinearWeight:
    """Quantize the high-precision ``(N, K)`` ``weight`` with ``config``'s rule and pack it."""
    q = weight_quantization(weight, config)
    packed = reference.pack_weight(
        quantize_weight(weight, q, weights=config.weights, transpose=False), bits_per_value(config)
    )
    scale = q.scale if config.grouped else q.scale.reshape(())
    return BitNetPackedLinearWeight(packed, scale, weight.shape[1], weight.dtype, config, requires_grad)
