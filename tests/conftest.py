"""Test-session setup and the helpers several test modules share."""

from __future__ import annotations

import os
import socket

import torch
from torch import nn

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when bitnet_ao.kernels is first imported, so it
# must be set here, before any test module imports bitnet_ao: without a GPU the Triton kernels then run in
# Triton's interpreter on CPU tensors (tests/test_triton_kernels.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_llama_config(**overrides):
    """A 2-layer Hugging Face ``LlamaConfig`` small enough for a test step in milliseconds (no download)."""
    import transformers

    config = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaConfig(**{**config, **overrides})


def tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    """A freshly initialized ``LlamaForCausalLM`` of :func:`tiny_llama_config`, seeded."""
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_llama_config(**overrides))


def not_lm_head(module: nn.Module, fqn: str) -> bool:
    """``quantize_`` filter of the BitNet recipe for HF models: every linear but the output head."""
    return isinstance(module, nn.Linear) and "lm_head" not in fqn


def free_port() -> int:
    """A TCP port nobody listens on, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
