"""Hugging Face BitNet checkpoints: ``save_pretrained_bitnet`` -> stock ``AutoModelForCausalLM.from_pretrained``
gives our logits; ``from_pretrained_bitnet`` brings a checkpoint back, exactly; what transformers cannot load is
refused with a clear error. Tiny models built from configs, no download."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torchao.quantization import quantize_

from bitnet_ao import BitNetTrainingLinearWeight, bitnet_inference, bitnet_training
from bitnet_ao.integrations.transformers import (
    from_pretrained_bitnet,
    pack_hf_ternary,
    save_pretrained_bitnet,
    unpack_hf_ternary,
)
from bitnet_ao.surgery import apply_bitnet_norms
from tests.conftest import not_lm_head, tiny_llama

pytest.importorskip("accelerate")  # transformers needs it to load any BitNet checkpoint

VOCAB = 64


def _bitnet_llama(placement: str | None = "faq", dtype: torch.dtype = torch.float32, **overrides):
    if placement == "subln":
        overrides.setdefault("hidden_act", "relu2")
        overrides.setdefault("rms_norm_eps", 1e-5)
    model = tiny_llama(**overrides)
    # A trained model's residual stream has a mean square far above the norms' eps; at the 0.02 init scale the
    # FAQ export's redundant block norms would differ by eps / (2 ms) ~ 1% (docs/huggingface.md).
    torch.nn.init.normal_(model.model.embed_tokens.weight)
    # And its logits are spread (a 0.02-init head gives logits within ~0.1 of each other, where bf16 rounding alone
    # flips argmaxes): the bf16 argmax comparison then measures the checkpoint, not ties.
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    if placement is not None:
        apply_bitnet_norms(model, placement, eps=model.config.rms_norm_eps if placement == "subln" else 1e-5)
    quantize_(model, bitnet_training(), filter_fn=not_lm_head)
    return model.to(dtype)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


def test_hf_packing_layout_is_row_blocks_of_value_plus_one():
    # N = 8: byte row r holds rows r, r + 2, r + 4, r + 6 at bits 0, 2, 4, 6, each as value + 1.
    values = torch.tensor([[1], [0], [-1], [1], [0], [0], [1], [-1]], dtype=torch.int8)
    packed = pack_hf_ternary(values)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 1)
    assert packed[:, 0].tolist() == [2 | 0 << 2 | 1 << 4 | 2 << 6, 1 | 2 << 2 | 1 << 4 | 0 << 6]
    assert torch.equal(unpack_hf_ternary(packed), values)
    # transformers' own unpacking reads the same values
    from transformers.integrations.bitnet import unpack_weights

    assert torch.equal(unpack_weights(packed, dtype=torch.float32).to(torch.int8), values)


@pytest.mark.parametrize(
    ("linear_class", "mode"), [("autobitlinear", "offline"), ("bitlinear", "offline"), ("autobitlinear", "online")]
)
@pytest.mark.parametrize("placement", ["faq", "subln"])
def test_stock_from_pretrained_matches_our_forward_fp32(tmp_path, linear_class, mode, placement):
    model = _bitnet_llama(placement)
    save_pretrained_bitnet(model, tmp_path, linear_class=linear_class, quantization_mode=mode)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    expected_class = transformers.BitNetForCausalLM if placement == "subln" else transformers.LlamaForCausalLM
    assert type(loaded) is expected_class
    layer = loaded.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == ("BitLinear" if linear_class == "bitlinear" else "AutoBitLinear")
    assert type(loaded.lm_head) is torch.nn.Linear
    ours, theirs = _logits(model, _ids()), _logits(loaded, _ids())
    rel = (theirs - ours).norm() / ours.norm()
    assert rel <= 1e-4, f"relative error {rel:.2e}"


@pytest.mark.parametrize(
    ("linear_class", "mode"), [("autobitlinear", "offline"), ("bitlinear", "offline"), ("autobitlinear", "online")]
)
def test_without_surgery_the_init_scale_changes_nothing(tmp_path, linear_class, mode):
    """No norm surgery, stock 0.02-scale embeddings and head (a fresh model, the case [guard] #7 reported at 2e-3):
    transformers' logits equal ours to float32 rounding. Only the FAQ placement's redundant block norms depend on
    the residual stream's scale (eps / (2 ms), docs/huggingface.md)."""
    model = tiny_llama()
    quantize_(model, bitnet_training(), filter_fn=not_lm_head)
    save_pretrained_bitnet(model, tmp_path, linear_class=linear_class, quantization_mode=mode)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    ours, theirs = _logits(model, _ids()), _logits(loaded, _ids())
    rel = (theirs - ours).norm() / ours.norm()
    assert rel <= 1e-5, f"relative error {rel:.2e}"


@pytest.mark.parametrize(
    ("linear_class", "mode"), [("autobitlinear", "offline"), ("bitlinear", "offline"), ("autobitlinear", "online")]
)
@pytest.mark.parametrize("placement", ["faq", "subln"])
def test_stock_from_pretrained_bf16_agrees_on_argmax(tmp_path, linear_class, mode, placement):
    model = _bitnet_llama(placement, torch.bfloat16)
    save_pretrained_bitnet(model, tmp_path, linear_class=linear_class, quantization_mode=mode)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (16, 64), generator=torch.Generator().manual_seed(1))
    agree = (_logits(model, ids).argmax(-1) == _logits(loaded, ids).argmax(-1)).float().mean()
    assert agree >= 0.99, f"argmax agreement {agree:.3f}"


def test_packed_inference_model_exports_the_same_checkpoint(tmp_path):
    model = _bitnet_llama("faq")
    packed = copy.deepcopy(model)
    quantize_(packed, bitnet_inference(), filter_fn=not_lm_head)
    save_pretrained_bitnet(model, tmp_path / "trained")
    save_pretrained_bitnet(packed, tmp_path / "packed")
    a, b = load_file(tmp_path / "trained" / "model.safetensors"), load_file(tmp_path / "packed" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("linear_class", ["autobitlinear", "bitlinear"])
@pytest.mark.parametrize("placement", ["faq", "subln", None])
def test_round_trip_keeps_ternary_values_and_scales_exactly(tmp_path, linear_class, placement):
    model = _bitnet_llama(placement)
    save_pretrained_bitnet(model, tmp_path / "first", linear_class=linear_class)
    back = from_pretrained_bitnet(tmp_path / "first")
    assert isinstance(back.model.layers[0].mlp.up_proj.weight, BitNetTrainingLinearWeight)
    save_pretrained_bitnet(back, tmp_path / "second", linear_class=linear_class)
    first, second = (load_file(tmp_path / d / "model.safetensors") for d in ("first", "second"))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    # The loaded model computes what the exported one does.
    torch.testing.assert_close(_logits(back, _ids()), _logits(model, _ids()), rtol=1e-4, atol=1e-4)


def test_online_round_trip_keeps_master_weights(tmp_path):
    model = _bitnet_llama("faq")
    save_pretrained_bitnet(model, tmp_path, quantization_mode="online")
    back = from_pretrained_bitnet(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_checkpoint_trained_and_saved_by_transformers_loads_back(tmp_path):
    """Online (trainable) in transformers: a step of its own QAT there, its stock save_pretrained, then ours. Its
    block norms were trained, so they stay (keep_block_norms) and the logits match."""
    save_pretrained_bitnet(_bitnet_llama("faq"), tmp_path / "ours", quantization_mode="online")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-2)
    hf(_ids(), labels=_ids()).loss.backward()
    optimizer.step()
    hf.save_pretrained(tmp_path / "theirs")
    back = from_pretrained_bitnet(tmp_path / "theirs")
    assert not isinstance(back.model.layers[0].input_layernorm, torch.nn.Identity)
    ours, theirs = _logits(back, _ids()), _logits(hf, _ids())
    assert (ours - theirs).norm() / theirs.norm() <= 1e-4


def test_loaded_checkpoint_trains_with_int8_matmuls(tmp_path):
    save_pretrained_bitnet(_bitnet_llama("faq"), tmp_path)
    model = from_pretrained_bitnet(tmp_path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = _ids(2)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_what_transformers_cannot_load_is_refused(tmp_path):
    binary = tiny_llama()
    quantize_(binary, bitnet_training(weights="binary"), filter_fn=not_lm_head)
    with pytest.raises(ValueError, match="q_proj .*binary weights"):
        save_pretrained_bitnet(binary, tmp_path)
    with pytest.raises(ValueError, match="has a bias"):
        save_pretrained_bitnet(_bitnet_llama(None, attention_bias=True), tmp_path)
    grouped = tiny_llama()
    quantize_(grouped, bitnet_training(scale_groups=2), filter_fn=not_lm_head)
    with pytest.raises(ValueError, match=r"q_proj \(in_features=32, out_features=32\) has 2 group scales"):
        save_pretrained_bitnet(grouped, tmp_path)
    odd = _bitnet_llama(None, hidden_size=36, num_attention_heads=6, num_key_value_heads=1)  # k_proj: 6 rows
    with pytest.raises(ValueError, match=r"k_proj \(in_features=36, out_features=6\).*multiple of 4"):
        save_pretrained_bitnet(odd, tmp_path)
    save_pretrained_bitnet(odd, tmp_path / "online", quantization_mode="online")  # online has no such limit
    with pytest.raises(ValueError, match="only load packed"):
        save_pretrained_bitnet(_bitnet_llama(), tmp_path, linear_class="bitlinear", quantization_mode="online")
    silu = tiny_llama()
    apply_bitnet_norms(silu, "subln", eps=silu.config.rms_norm_eps)
    quantize_(silu, bitnet_training(), filter_fn=not_lm_head)
    with pytest.raises(ValueError, match="'hidden_act': 'silu'"):
        save_pretrained_bitnet(silu, tmp_path)
    with pytest.raises(ValueError, match="no BitNet linear"):
        save_pretrained_bitnet(tiny_llama(), tmp_path)


def test_a_packed_weight_without_its_scale_is_an_error(tmp_path):
    """transformers loads a missing weight_scale as 0.0 (all-zero outputs, a 'MISSING' line); we refuse."""
    from safetensors.torch import save_file

    save_pretrained_bitnet(_bitnet_llama("faq"), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is packed but has no weight_scale"):
        from_pretrained_bitnet(tmp_path)


@pytest.mark.parametrize("placement", ["faq", "faq, block norms kept", "subln"])
def test_benchmark_model_exports_through_its_hf_llama_twin(tmp_path, placement):
    """benchmarks/model.py (Meta names) -> to_hf_llama -> save_pretrained_bitnet -> stock from_pretrained."""
    from benchmarks.model import ModelConfig, Transformer, to_hf_llama
    from bitnet_ao.surgery import quantize_filter

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=32))
    torch.nn.init.normal_(model.tok_embeddings.weight)
    apply_bitnet_norms(model, placement.partition(",")[0], keep_block_norms=placement.endswith("kept"))
    quantize_(model, bitnet_training(), filter_fn=quantize_filter)
    twin = to_hf_llama(model)
    with torch.no_grad():
        ours = model(_ids())
        # To float32 rounding: transformers' RMSNorm sums its squares in float32, bitnet_ao's in float64
        # (docs/numerics.md#rmsnorm); a weight in the wrong place would move the logits by their own size.
        assert (twin(_ids()).logits - ours).norm() / ours.norm() <= 1e-6
    if placement == "subln":  # SwiGLU: transformers' BitNet model has a relu² MLP, the export says so
        with pytest.raises(ValueError, match="'hidden_act': 'silu'"):
            save_pretrained_bitnet(twin, tmp_path)
        return
    save_pretrained_bitnet(twin, tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (_logits(loaded, _ids()) - ours).norm() / ours.norm() <= 1e-4


def test_pretrain_save_hf_writes_a_loadable_checkpoint(tmp_path):
    from benchmarks import pretrain

    pretrain.main(["--preset", "tiny", "--quantize", "bitnet", "--steps", "2", "--save-hf", "--out", str(tmp_path)])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-bitnet")
    assert loaded.config.quantization_config.use_rms_norm
    assert loaded(torch.randint(0, 256, (1, 8))).logits.isfinite().all()
