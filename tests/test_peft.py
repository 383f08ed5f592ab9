"""LoRA on ternary bases with stock peft (docs/finetuning.md): adapters train on a BitNet training base (frozen
master weights) and on a packed inference base, merging is honest, adapters round-trip through peft's own
save/load, and torchao's low-bit optimizers step BitNet master weights. Every check is against peft itself (its
adapter weights, its saved files) or against the model before the change."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

from bitnet_ao import BitNetPackedLinearWeight, BitNetTrainingLinearWeight, bitnet_inference, bitnet_training
from bitnet_ao.surgery import NormedLinear, apply_bitnet_norms, find_blocks, quantize_filter
from tests.conftest import fit, tiny_llama

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

VOCAB = 128
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base(kind: str, placement: str | None = None) -> nn.Module:
    """A tiny HF Llama (hidden 64, 2 layers, vocab 128), with the BitNet norms of ``placement`` (or none), quantized
    for training (master weights frozen) or packed."""
    model = tiny_llama(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4)
    if placement is not None:
        apply_bitnet_norms(model, placement)
    quantize_(model, bitnet_training(), filter_fn=quantize_filter)
    if kind == "packed":
        quantize_(model, bitnet_inference(), filter_fn=quantize_filter)
    model.requires_grad_(False)
    return model


def lora(model: nn.Module, targets: list[str] | str = TARGETS) -> nn.Module:
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    return peft.get_peft_model(model, config)


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(seed))


def loss_of(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base linears' weights (master weights, or packed bytes) as plain copies, by module name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and ".lora_" not in name and "lm_head" not in name:
            w = m.weight
            out[name] = (w.packed if isinstance(w, BitNetPackedLinearWeight) else w._data).clone()
    return out


@pytest.mark.parametrize("kind", ["training", "packed"])
def test_lora_trains_on_a_frozen_ternary_base(kind: str) -> None:
    model = lora(base(kind))
    before = base_weights(model)
    assert len(before) == 14
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable), "peft trains the adapters only"
    first_a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight

    loss = loss_of(model, tokens())
    loss.backward()
    # Layer 0's adapter gets a gradient only through every base linear after it: o_proj of layer 0, then layer 1.
    assert first_a.grad is not None and first_a.grad.abs().sum() > 0
    model.zero_grad()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = fit(lambda b: loss_of(model, b), optimizer, [tokens()] * 4)
    assert losses[-1] < losses[0] - 0.1, losses  # the adapters alone fit the batch
    after = base_weights(model)
    for name, w in before.items():
        assert torch.equal(after[name], w), f"{name}: the base weight must not change"
    weight_type = BitNetPackedLinearWeight if kind == "packed" else BitNetTrainingLinearWeight
    for name, m in model.named_modules():
        if name in before:
            assert isinstance(m.weight, weight_type), name


def test_lora_losses_are_the_same_on_training_and_packed_bases() -> None:
    """A packed base computes exactly what its training base computes (the same ternary values and scales), so
    the adapters see the same losses and gradients: bit for bit."""
    runs = []
    for kind in ("training", "packed"):
        model = lora(base(kind))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        runs.append(fit(lambda b, m=model: loss_of(m, b), optimizer, [tokens(i) for i in range(2)]))
    assert runs[0] == runs[1]


def test_packed_base_is_an_eighth_of_bf16_bytes() -> None:
    model = base("packed")
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]
    packed = sum(m.weight.packed.numel() for m in linears)
    assert packed * 8 == sum(m.weight.numel() * 2 for m in linears)  # int8 bytes vs 2 bytes per BF16 value


def test_merge_into_training_base_warns_with_the_change() -> None:
    model = lora(base("training"))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = q.base_layer.weight._data + (q.lora_B["default"].weight @ q.lora_A["default"].weight) * 2.0
    with pytest.warns(UserWarning, match=r"re-ternarized.*ternary\(W \+ dW\).*lossy.*ternary values changed") as rec:
        merged = model.merge_and_unload()
    assert len(rec) == 14, "one warning per merged linear"
    weight = merged.model.layers[0].self_attn.q_proj.weight
    assert isinstance(weight, BitNetTrainingLinearWeight)
    torch.testing.assert_close(weight._data, expected), "the master weight holds W + scaling * B @ A"


def test_safe_merge_and_unmerge_warn_too() -> None:
    model = lora(base("training"), ["q_proj"])
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    original = q.base_layer.weight._data.clone()
    with pytest.warns(UserWarning, match="lossy"):
        q.merge(safe_merge=True)
    assert isinstance(q.base_layer.weight, BitNetTrainingLinearWeight)
    assert not torch.equal(q.base_layer.weight._data, original)
    with pytest.warns(UserWarning, match="lossy"):
        q.unmerge()
    torch.testing.assert_close(q.base_layer.weight._data, original)


def test_merge_into_packed_base_is_refused() -> None:
    model = lora(base("packed"))
    with pytest.raises(
        NotImplementedError, match=r"packed ternary BitNet weight.*cannot add to it in place.*merge_and_unload"
    ):
        model.merge_and_unload()


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.AdamW(p, lr=1e-2),
        lambda p: torch.optim.SGD(p, lr=1e-2),
        lambda p: torch.optim.SGD(p, lr=1e-2, foreach=True),
    ],
    ids=["adamw", "sgd", "sgd_foreach"],
)
def test_optimizer_steps_and_loads_do_not_warn(make_optimizer) -> None:
    model = tiny_llama(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4)
    quantize_(model, bitnet_training(), filter_fn=quantize_filter)
    state = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(lambda b: loss_of(model, b), make_optimizer(model.parameters()), [tokens()] * 2)
        model.load_state_dict(state)
        for p in model.parameters():  # old-style optimizers update through .data, never assigning it back
            p.data.add_(torch.zeros_like(p.data))


@pytest.mark.parametrize("name", ["AdamW8bit", "AdamW4bit"])
def test_torchao_low_bit_optimizers_step_bitnet_master_weights(name: str) -> None:
    """torchao's 8-bit and 4-bit AdamW (quantized optimizer states, a compiled step per weight shape) train a BitNet
    linear: the loss falls and the weight stays a BitNet master weight. One linear, one shape: one compile."""
    import torchao.optim

    torch.manual_seed(0)
    model = nn.Linear(256, 256, bias=False)
    quantize_(model, bitnet_training())
    x, target = torch.randn(64, 256), torch.randn(64, 256)
    before = model.weight._data.clone()
    optimizer = getattr(torchao.optim, name)(model.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="bitnet_ao")
        losses = fit(lambda b: F.mse_loss(model(b), target), optimizer, [x] * 5)
    assert losses[-1] < 0.9 * losses[0], losses
    assert isinstance(model.weight, BitNetTrainingLinearWeight) and not torch.equal(model.weight._data, before)
    assert type(optimizer.state[model.weight]["exp_avg"]).__name__.startswith("OptimState"), "quantized state"


def test_adapters_round_trip_through_peft_save_and_load(tmp_path) -> None:
    model = lora(base("training"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    fit(lambda b: loss_of(model, b), optimizer, [tokens()] * 2)
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(base("training"), tmp_path)
    with torch.no_grad():
        expected = model(input_ids=tokens(5)).logits
        assert torch.equal(reloaded(input_ids=tokens(5)).logits, expected)
        packed = peft.PeftModel.from_pretrained(base("packed"), tmp_path)
        assert torch.equal(packed(input_ids=tokens(5)).logits, expected), "the adapters on a packed base too"


@pytest.mark.parametrize("placement", ["faq", "subln"])
@pytest.mark.parametrize("kind", ["training", "packed"])
def test_stock_target_names_work_after_the_surgery(tmp_path, kind: str, placement: str) -> None:
    """After apply_bitnet_norms the normed linears are still linears at their stock names: peft adapts
    ``q_proj`` there like on any Llama. The adapter reads what peft's adapters read, the module's input (here
    before the norm); the base computes the normed ternary linear; adapters train and round-trip through peft."""
    model = lora(base(kind, placement))
    layer = model.base_model.model.model.layers[0]
    adapted = [layer.get_submodule(p) for p in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")]
    assert all(isinstance(m, peft.tuners.lora.LoraLayer) for m in adapted)
    normed = [m for m in adapted if isinstance(m.base_layer, NormedLinear)]
    assert len(normed) == (3 if placement == "faq" else 2)
    layout, blocks = find_blocks(model)
    assert layout.name == "Hugging Face Llama/Qwen2" and len(blocks) == 2
    for m in normed:
        x = torch.randn(2, 5, m.in_features)
        a, b = m.lora_A["default"], m.lora_B["default"]
        with torch.no_grad():
            base_out = F.linear(m.base_layer.norm(x), m.base_layer.weight)
            torch.testing.assert_close(m(x), base_out + b(a(x)) * m.scaling["default"])

    before = base_weights(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = fit(lambda b: loss_of(model, b), optimizer, [tokens()] * 4)
    assert losses[-1] < losses[0] - 0.1, losses
    after = base_weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before), "the base stays frozen"
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(base(kind, placement), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=tokens(5)).logits, model(input_ids=tokens(5)).logits)


def test_all_linear_adapts_each_normed_linear_once() -> None:
    """``"all-linear"`` on a surgery model finds every block linear once, at its stock name (the norm inside is no
    linear), and leaves the head alone."""
    model = lora(base("training", "faq"), "all-linear")
    adapted = {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    count = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())
    assert adapted == set(TARGETS) and count == 2 * len(TARGETS)
