"""Checkpoints of BitNet models hold plain master weights, and every tool a user saves with round-trips exactly.

The flow under test is the one most users start from: a Hugging Face ``LlamaForCausalLM`` turned into BitNet by
``quantize_``, saved with safetensors / ``save_pretrained`` / the stock ``Trainer`` / ``torch.save`` / DCP, and
loaded back into a BitNet model (the recipe re-applied by ``quantize_``) or into a plain model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torchao.quantization import quantize_

from bitnet_ao import BitNetTrainingLinearWeight, bitnet_training
from tests.conftest import master_tensor, not_lm_head, save_load_roundtrip, tiny_llama

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")


def _bitnet_llama(seed: int = 0, **config) -> nn.Module:
    model = tiny_llama(seed)
    quantize_(model, bitnet_training(**config), filter_fn=not_lm_head)
    return model


def _trained_bitnet_llama() -> nn.Module:
    """A BitNet Llama after a few optimizer steps, so its master weights are no longer the initial ones."""
    model = _bitnet_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def _bitnet_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if isinstance(p, BitNetTrainingLinearWeight)]


def _assert_same_weights(model: nn.Module, expected: dict[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    assert params.keys() == expected.keys()
    for name, value in expected.items():
        got = master_tensor(params[name])
        assert got.dtype == value.dtype and torch.equal(got, value), name


def _logits(model: nn.Module) -> Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(40).reshape(2, 20) % 64).logits


@pytest.fixture
def trained() -> tuple[nn.Module, dict[str, Tensor]]:
    model = _trained_bitnet_llama()
    return model, {name: master_tensor(p).detach().clone() for name, p in model.named_parameters()}


def test_state_dict_holds_plain_master_weights_with_the_plain_models_keys(trained):
    model, masters = trained
    sd = model.state_dict()
    plain_sd = tiny_llama().state_dict()
    assert len(_bitnet_names(model)) == 14
    assert sd.keys() == plain_sd.keys()
    for key, value in sd.items():
        assert type(value) is Tensor, f"{key}: a checkpoint must hold plain tensors, got {type(value).__name__}"
        assert value.dtype == plain_sd[key].dtype and value.shape == plain_sd[key].shape, key
    for name in _bitnet_names(model):
        assert torch.equal(sd[name], masters[name]), name
    # state_dict(keep_vars=True) still hands out the live parameters (tools that want the objects).
    name = _bitnet_names(model)[0]
    assert model.state_dict(keep_vars=True)[name] is dict(model.named_parameters())[name]


@pytest.mark.parametrize("into", ["bitnet", "plain"])
def test_safetensors_save_file_load_file_roundtrip(trained, tmp_path, into):
    model, masters = trained
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(model.state_dict(), str(path))
    target = _bitnet_llama(seed=1) if into == "bitnet" else tiny_llama(seed=1)
    target.load_state_dict(safetensors_torch.load_file(str(path)), strict=True)
    _assert_same_weights(target, masters)
    assert len(_bitnet_names(target)) == (14 if into == "bitnet" else 0), "loading must keep (or not add) the recipe"
    torch.testing.assert_close(_logits(target), _logits(model) if into == "bitnet" else _logits(target))
    if into == "bitnet":
        assert torch.equal(_logits(target), _logits(model))


def test_save_pretrained_from_pretrained_then_quantize_gives_identical_logits(trained, tmp_path):
    model, masters = trained
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert not _bitnet_names(reloaded)
    quantize_(reloaded, bitnet_training(), filter_fn=not_lm_head)
    _assert_same_weights(reloaded, masters)
    assert torch.equal(_logits(reloaded), _logits(model))


@pytest.mark.parametrize("into", ["bitnet", "plain"])
def test_torch_save_load_weights_only_roundtrip(trained, into):
    model, masters = trained
    sd = save_load_roundtrip(model.state_dict())
    target = _bitnet_llama(seed=1) if into == "bitnet" else tiny_llama(seed=1)
    target.load_state_dict(sd, strict=True)
    _assert_same_weights(target, masters)
    assert len(_bitnet_names(target)) == (14 if into == "bitnet" else 0)


def test_load_state_dict_assign_keeps_the_recipe(trained):
    model, masters = trained
    target = _bitnet_llama(seed=1, int8_grad_weight=False)
    target.load_state_dict(model.state_dict(), strict=True, assign=True)
    _assert_same_weights(target, masters)
    for name in _bitnet_names(model):
        weight = dict(target.named_parameters())[name]
        assert isinstance(weight, BitNetTrainingLinearWeight), f"{name} lost the BitNet recipe on assign"
        assert weight.config == bitnet_training(int8_grad_weight=False), "the target's recipe, not a default one"
    assert torch.equal(_logits(target), _logits(model))


def test_deepcopy_and_to_keep_weights_and_recipe(trained):
    model, masters = trained
    copied = copy.deepcopy(model)
    assert _bitnet_names(copied) == _bitnet_names(model)
    _assert_same_weights(copied, masters)
    assert torch.equal(_logits(copied), _logits(model))
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert _bitnet_names(bf16) == _bitnet_names(model)
    for key, value in bf16.state_dict().items():
        assert type(value) is Tensor and value.dtype == torch.bfloat16, key
        assert torch.equal(value, masters.get(key, value).to(torch.bfloat16)), key


def test_dcp_checkpoint_holds_plain_tensors_and_loads_into_a_plain_model(trained, tmp_path):
    import torch.distributed.checkpoint as dcp

    model, masters = trained
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path), no_dist=True)
    for target in (tiny_llama(seed=1), _bitnet_llama(seed=1)):
        sd = target.state_dict()
        dcp.load(sd, checkpoint_id=str(tmp_path), no_dist=True)
        target.load_state_dict(sd, strict=True)
        _assert_same_weights(target, masters)


class _TokenDataset(torch.utils.data.Dataset):
    """Fixed random token sequences, built in the test (no download)."""

    def __init__(self, n: int = 48, seq: int = 16) -> None:
        self.tokens = torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def _trainer(model: nn.Module, output_dir, max_steps: int = 6) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        save_steps=3,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        bf16=True,
        use_cpu=True,
        report_to=[],
        seed=0,
        disable_tqdm=True,
        logging_steps=1,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=_TokenDataset())


def test_stock_trainer_checkpoints_save_model_and_resume(tmp_path):
    """The HF flow that used to die at the first checkpoint: periodic checkpoints, ``save_model``, and a resumed
    run that ends on the uninterrupted run's weights, exactly."""
    model = _bitnet_llama()
    trainer = _trainer(model, tmp_path / "run")
    trainer.train()
    assert (tmp_path / "run" / "checkpoint-3" / "model.safetensors").exists()
    assert (tmp_path / "run" / "checkpoint-6" / "model.safetensors").exists()
    final = {name: master_tensor(p).detach().clone() for name, p in model.named_parameters()}
    assert len(_bitnet_names(model)) == 14
    trainer.save_model(str(tmp_path / "final"))

    resumed_model = _bitnet_llama(seed=1)
    _trainer(resumed_model, tmp_path / "run").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert _bitnet_names(resumed_model) == _bitnet_names(model), "resuming must keep the BitNet weights"
    _assert_same_weights(resumed_model, final)

    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "final")
    quantize_(reloaded, bitnet_training(), filter_fn=not_lm_head)
    _assert_same_weights(reloaded, final)
    # The trained model's forward stays wrapped in the Trainer's bf16 autocast (accelerate patches it), so the
    # logits to match are those of a fresh BitNet model holding the trained weights.
    expected = _bitnet_llama(seed=2)
    expected.load_state_dict(model.state_dict())
    assert torch.equal(_logits(reloaded), _logits(expected))
