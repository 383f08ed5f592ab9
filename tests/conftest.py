"""Test-session setup shared by every test module."""

import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when bitnet_ao.kernels is first imported, so it
# must be set here, before any test module imports bitnet_ao: without a GPU the Triton kernels then run in
# Triton's interpreter on CPU tensors (tests/test_triton_kernels.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
