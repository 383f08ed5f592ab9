"""A Hugging Face ``LlamaForCausalLM`` (small config, no download) trains under ``quantize_`` and round-trips."""

from __future__ import annotations

import pytest
import torch
from torchao.quantization import quantize_

from bitnet_ao import BitNetTrainingLinearWeight, bitnet_training
from tests.conftest import fit, master_tensor, not_lm_head, save_load_roundtrip, tiny_llama

pytest.importorskip("transformers", reason="transformers is not installed")


def test_llama_trains_and_state_dict_roundtrips():
    model = tiny_llama()
    quantize_(model, bitnet_training(), filter_fn=not_lm_head)
    quantized = [n for n, p in model.named_parameters() if isinstance(p, BitNetTrainingLinearWeight)]
    assert len(quantized) == 2 * 7 and not any("lm_head" in n for n in quantized)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.randint(0, 64, (4, 16))
    losses = fit(lambda b: model(input_ids=b, labels=b).loss, opt, [batch] * 8)
    assert losses[-1] < losses[0] - 0.5, losses

    sd = save_load_roundtrip(model.state_dict())
    restored = tiny_llama()
    quantize_(restored, bitnet_training(), filter_fn=not_lm_head)
    restored.load_state_dict(sd)
    for (name, a), (_, b) in zip(model.state_dict().items(), restored.state_dict().items(), strict=True):
        assert torch.equal(master_tensor(a), master_tensor(b)), name
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=batch).logits, model(input_ids=batch).logits, rtol=0, atol=0)
