"""``RMSNorm``: ``torch.nn.RMSNorm`` with a fused forward and backward on CPU.

Why it exists: torch runs RMSNorm's backward on CPU as a chain of eager elementwise ops. At (2048, 1536) in
bfloat16 that took 24 ms, against 4.7 ms for the bodies below compiled by inductor, and the INT8 matmul the norm
feeds takes about as long; the BitNet FAQ placement puts 7 of them in every block (``bitnet_ao.surgery``).
Models that compare BF16 and BitNet training should use this norm on both sides, so a comparison does not
measure two norm implementations.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .kernels import cpu as cpu_kernels


def _rms_norm_forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``x / rms(x) * weight`` over the last dimension of a 2-D ``x``, in float32, cast back to ``x.dtype``;
    also returns ``1 / rms(x)`` per row for the backward."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype), rstd


def _rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    xhat = x.float() * rstd
    dxhat = dy.float() * weight.float()
    dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), (dy.float() * xhat).sum(0).to(weight.dtype)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        with torch.autocast("cpu", enabled=False):
            y, rstd = cpu_kernels.run_fused(_rms_norm_forward, x2.numel(), x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, Tensor, None]:
        x2, weight, rstd = ctx.saved_tensors
        dx, dweight = cpu_kernels.run_fused(_rms_norm_backward, x2.numel(), dy.reshape(x2.shape), x2, weight, rstd)
        return dx.view(dy.shape), dweight, None


class RMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm`` (same parameters, same state dict) with a fused forward and backward on CPU.

    Large tensors run compiled and small ones eagerly, by the same rule as the ``bitnet_ao.kernels`` CPU backend.
    Other devices, and whole-model ``torch.compile``, use ``torch.nn.RMSNorm`` itself.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or self.weight is None or torch.compiler.is_compiling():
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return _RMSNormFunction.apply(x, self.weight, eps)
