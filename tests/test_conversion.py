"""No silent wrong training: what ``quantize_`` does with tied weights, modules that are not linears, packed
models, meta tensors and non-finite inputs, checked against stock transformers / torch behaviour."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchao.quantization import quantize_

from bitnet_ao import BitNetTrainingLinearWeight, bitnet_inference, bitnet_training, unquantize_
from tests.conftest import master_tensor, tiny_llama

LR = 1e-3


def _tied() -> nn.Module:
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # stock transformers ties them
    return model


def test_tied_head_stays_one_parameter_updated_once():
    """quantize_ without a filter (the head included) on a tied model: still one parameter, used by both modules,
    stepped once per step (AdamW's first step moves every element by at most lr)."""
    plain = _tied()
    model = _tied()
    optimizer_before = torch.optim.AdamW(model.parameters(), lr=LR)  # built before quantize_: must still step it
    quantize_(model, bitnet_training())
    assert isinstance(model.lm_head.weight, BitNetTrainingLinearWeight)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert len(list(model.parameters())) == len(list(plain.parameters()))
    before = master_tensor(model.model.embed_tokens.weight).clone()
    x = torch.randint(0, 64, (2, 12))
    model(x, labels=x).loss.backward()
    optimizer_before.step()
    change = (master_tensor(model.model.embed_tokens.weight) - before).abs().max().item()
    assert 0 < change <= LR * 1.001


def test_tied_model_checkpoints_through_save_pretrained(tmp_path):
    """Both state-dict keys of the tied weight are plain tensors; transformers' save_pretrained / from_pretrained
    round-trips the master weights exactly and the reloaded model is tied again."""
    import transformers

    model = _tied()
    quantize_(model, bitnet_training())
    state = model.state_dict()
    assert type(state["lm_head.weight"]) is torch.Tensor and type(state["model.embed_tokens.weight"]) is torch.Tensor
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.model.embed_tokens.weight, master_tensor(model.model.embed_tokens.weight))


def test_unquantize_restores_the_tied_parameter():
    model = _tied()
    quantize_(model, bitnet_training())
    unquantize_(model)
    assert type(model.lm_head.weight) is nn.Parameter and model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("config", [bitnet_training(), bitnet_inference()], ids=["training", "inference"])
def test_a_filter_selecting_an_embedding_is_refused_before_anything_changes(config):
    model = tiny_llama()
    weight = model.model.embed_tokens.weight
    with pytest.raises(TypeError, match=r"Embedding with a weight of shape \(64, 32\) is not an nn.Linear"):
        quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
    assert model.model.embed_tokens.weight is weight and type(weight) is nn.Parameter


def test_a_filter_selecting_the_root_names_it_in_a_few_words():
    model = tiny_llama()
    with pytest.raises(TypeError, match="LlamaForCausalLM is not an nn.Linear") as error:
        quantize_(model, bitnet_training(), filter_fn=lambda *_: True)
    assert len(str(error.value)) < 600  # not the repr of the whole model


def test_training_a_packed_model_and_unquantizing_it_are_refused():
    model = nn.Sequential(nn.Linear(16, 8))
    quantize_(model, bitnet_inference())
    with pytest.raises(TypeError, match=r"packed inference weight.*cannot be trained"):
        quantize_(model, bitnet_training())
    with pytest.raises(TypeError, match="unquantize_: Linear.*packed inference weight"):
        unquantize_(model)


@pytest.mark.parametrize("packed", [False, True])
def test_meta_tensors_give_shapes_like_a_plain_linear(packed):
    """Shape inference and model sizing run on the meta device; BitNet linears must too (forward and backward)."""
    with torch.device("meta"):
        layer = nn.Linear(16, 8)
        plain = nn.Linear(16, 8)
    quantize_(layer, bitnet_training())
    if packed:
        quantize_(layer, bitnet_inference())
    x = torch.randn(3, 5, 16, device="meta", requires_grad=True)
    y = layer(x)
    assert y.shape == plain(x).shape and y.device.type == "meta"
    y.sum().backward()
    assert x.grad.shape == x.shape and x.grad.device.type == "meta"


def test_a_non_finite_input_value_makes_the_whole_int8_weight_gradient_non_finite():
    """Documented behaviour (docs/usage.md): a NaN in one input element reaches that token's output row only, but
    the INT8 grad_weight's per-column scales span all tokens, so every entry of the weight gradient is NaN, where
    a plain linear's is NaN in that input column only. Either way the step is lost (the loss is NaN too)."""
    torch.manual_seed(0)
    plain = nn.Linear(16, 8)
    layer = nn.Linear(16, 8)
    layer.load_state_dict(plain.state_dict())
    quantize_(layer, bitnet_training())
    x = torch.randn(6, 16)
    x[2, 5] = float("nan")
    for module in (plain, layer):
        y = module(x)
        assert y[2].isnan().all() and not y[[0, 1, 3, 4, 5]].isnan().any()
        y[[0, 1, 3, 4, 5]].sum().backward()  # even a loss that leaves the NaN token out
    assert plain.weight.grad.isnan().sum() == 8  # column 5: one NaN input feature
    assert master_tensor(layer.weight.grad).isnan().all()


def test_torchao_config_in_from_pretrained_loads_trainable_bitnet_weights(tmp_path):
    """transformers' TorchAoConfig loads the weights it quantizes with requires_grad=False; BitNet training weights
    come out trainable (with a warning) and a step updates them. Saving: the checkpoint holds plain master weights,
    so the documented path drops the torchao entry and reloads them exactly (docs/huggingface.md)."""
    import transformers

    tiny_llama().save_pretrained(tmp_path / "plain")
    with pytest.warns(UserWarning, match="requires_grad=False"):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "plain", quantization_config=transformers.TorchAoConfig(bitnet_training())
        )
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert isinstance(weight, BitNetTrainingLinearWeight) and weight.requires_grad
    before = master_tensor(weight).clone()
    x = torch.randint(0, 64, (2, 12))
    model(x, labels=x).loss.backward()
    torch.optim.AdamW(model.parameters(), lr=LR).step()
    assert not torch.equal(master_tensor(weight), before)

    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(tmp_path / "trained")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "trained")
    assert torch.equal(reloaded.model.layers[0].self_attn.q_proj.weight, master_tensor(weight))


def test_a_weight_held_by_a_live_graph_is_replaced_on_its_module_with_a_warning():
    layer = nn.Linear(8, 4)
    alive = layer.weight.square().sum()  # a graph that references the parameter
    with pytest.warns(UserWarning, match="could not be replaced in place"):
        quantize_(layer, bitnet_training())
    assert isinstance(layer.weight, BitNetTrainingLinearWeight)
    alive.backward()


def test_packing_a_tied_head_keeps_the_tie_and_the_embedding_says_how_to_untie():
    model = _tied()
    quantize_(model, bitnet_inference())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    x = torch.randint(0, 64, (1, 8))
    with pytest.raises(NotImplementedError, match=r"tied to the input embedding.*untie it before packing"):
        model(x)
    untied = _tied()
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone())
    quantize_(untied, bitnet_inference())
    assert type(untied.model.embed_tokens.weight) is nn.Parameter and untied(x).logits.shape == (1, 8, 64)
