"""What the Triton kernel modules share: whether Triton interprets, and the device check every launcher runs.

Triton decides between compiling and interpreting when a kernel is decorated (``TRITON_INTERPRET=1`` read at
import time), so :data:`INTERPRET` is read once here, at the same moment, and the launchers use it to bypass
autotuning (the interpreter would time every config on the CPU).
"""

from __future__ import annotations

from torch import Tensor

from .private_api import triton_interpreting

#: True when the kernels in this package run in Triton's interpreter (CPU tensors allowed, no autotuning).
INTERPRET: bool = triton_interpreting()


def check_tensors(op: str, *tensors: Tensor | None) -> None:
    """Raise a clear error unless all tensors share one device that the kernels can run on.

    Without this a CPU tensor reaches the compiled kernel and fails deep inside Triton's launcher.
    """
    present = [t for t in tensors if t is not None]
    devices = {t.device for t in present}
    if len(devices) > 1:
        raise ValueError(f"bitnet_ao.{op} (triton): tensors on different devices: {sorted(map(str, devices))}")
    device = present[0].device
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"bitnet_ao.{op} (triton): got {device} tensors; the Triton backend needs CUDA tensors, or "
            "TRITON_INTERPRET=1 set before bitnet_ao.kernels is first imported"
        )
