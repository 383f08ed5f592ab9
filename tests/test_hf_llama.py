"""A Hugging Face ``LlamaForCausalLM`` (small config, no download) trains under ``quantize_`` and round-trips."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torchao.quantization import quantize_

from bitnet_ao import BitNetTrainingLinearWeight, bitnet_training

transformers = pytest.importorskip("transformers", reason="transformers is not installed")


def _tiny_llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _not_lm_head(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and "lm_head" not in fqn


def test_llama_trains_and_state_dict_roundtrips():
    model = _tiny_llama()
    quantize_(model, bitnet_training(), filter_fn=_not_lm_head)
    quantized = [n for n, p in model.named_parameters() if isinstance(p, BitNetTrainingLinearWeight)]
    assert len(quantized) == 2 * 7 and not any("lm_head" in n for n in quantized)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.randint(0, 64, (4, 16))
    losses = []
    for _ in range(8):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    restored = _tiny_llama()
    quantize_(restored, bitnet_training(), filter_fn=_not_lm_head)
    restored.load_state_dict(sd)
    for (name, a), (_, b) in zip(model.state_dict().items(), restored.state_dict().items(), strict=True):
        a = a._data if isinstance(a, BitNetTrainingLinearWeight) else a
        b = b._data if isinstance(b, BitNetTrainingLinearWeight) else b
        assert torch.equal(a, b), name
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=batch).logits, model(input_ids=batch).logits, rtol=0, atol=0)
