"""``RMSNorm``: ``torch.nn.RMSNorm`` with a fused forward and backward, and the contract's float64-summed rstd.

Why it exists: torch runs RMSNorm's backward on CPU as a chain of eager elementwise ops. At (2048, 1536) in
bfloat16 that took 24 ms, against 4.7 ms for ``kernels.reference.rms_norm*`` compiled by inductor (less in C), and
the INT8 matmul the norm feeds takes about as long; the BitNet FAQ placement puts 7 of them in every block
(``bitnet_ao.surgery``). Models that compare BF16 and BitNet training should use this norm on both sides, so a
comparison does not measure two norm implementations. Where a norm feeds a BitNet linear directly, the surgery's
``NormedLinear`` goes one step further and fuses the norm into the activation quantization.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import kernels


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            y, rstd = kernels.rms_norm(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, Tensor, None]:
        x2, weight, rstd = ctx.saved_tensors
        dx, dweight = kernels.rms_norm_backward(dy.reshape(x2.shape), x2, weight, rstd)
        return dx.view(dy.shape), dweight, None


def effective_eps(eps: float | None, dtype: torch.dtype) -> float:
    """The eps an RMS norm adds: its own, or for ``None`` (``torch.nn.RMSNorm``'s default) the machine eps of the
    dtype it computes in."""
    return eps if eps is not None else torch.finfo(dtype).eps


class RMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm`` (same parameters, same state dict) with a fused forward and backward.

    Forward and backward go through ``bitnet_ao.kernels`` (``kernels.rms_norm``, ``kernels.rms_norm_backward``) to
    the backend of the input's device: on CPU, one C pass per row each; on CUDA (and without a C compiler) the
    reference bodies compiled by inductor, those of the fused norm + quantization. Other devices (meta) and
    whole-model ``torch.compile`` run the same definition as plain torch ops (``kernels.reference.rms_norm``). The
    rstd sums its squares in float64 (docs/numerics.md#rmsnorm). A norm without a gain, or over several trailing
    dimensions, is ``torch.nn.RMSNorm``'s.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.weight is None or self.weight.dim() != 1:  # no gain, or several trailing dimensions: torch's own
            return super().forward(x)
        eps = effective_eps(self.eps, x.dtype)
        if torch.compiler.is_compiling() or x.device.type not in ("cpu", "cuda"):
            # The same numbers as plain torch ops, which autograd, inductor and the meta device see through:
            # torch.nn.RMSNorm's float32 sum would give another rstd in some rows, and a compiled decode step other
            # tokens than eager.
            return kernels.reference.rms_norm(x, self.weight, eps)[0]
        return _RMSNormFunction.apply(x, self.weight, eps)
