"""bitnet_ao.surgery on the three model families it knows: the module tree it leaves (spec §5), and training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

from benchmarks.model import ModelConfig, Transformer
from bitnet_ao import BitNetTrainingLinearWeight, bitnet_training
from bitnet_ao.norm import RMSNorm
from bitnet_ao.surgery import (
    AppliedPlacement,
    NormedLinear,
    apply_bitnet_norms,
    base_linear,
    calibrate_bitnet_norms,
    detect_placement,
    find_blocks,
    quantize_filter,
)
from tests.conftest import fit, tiny_llama

ATTN, MLP = ("wq", "wk", "wv", "wo"), ("w1", "w2", "w3")


def own_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=16))


def hf_model() -> nn.Module:
    pytest.importorskip("transformers")
    return tiny_llama(vocab_size=256, max_position_embeddings=16)


def torchtitan_model() -> nn.Module:
    """torchtitan's Llama 3 debug model, cut to 2 layers, with SDPA attention: its default FlexAttention has no
    CPU backward."""
    llama3 = pytest.importorskip("torchtitan.models.llama3", reason="torchtitan is not importable")
    from torchtitan.models.common.attention import ScaledDotProductAttention

    config = llama3.llama3_configs["debugmodel"](attn_backend="flex")
    config.layers = config.layers[:2]
    for layer in config.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    torch.manual_seed(0)
    model = config.build()
    model.init_states()
    return model


def loss_fn(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens[:, :-1])
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def train_losses(model: nn.Module, vocab: int, steps: int = 8) -> list[float]:
    """Fit one small batch with AdamW: a model whose gradients flow drives the loss down."""
    tokens = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return fit(lambda batch: loss_fn(model, batch), optimizer, [tokens] * steps)


# (model factory, block prefix, pre-attention norm, pre-MLP norm, quantizable linears in forward order, untouched)
FAMILIES = {
    "own": (
        own_model, "layers.{}.", "attention_norm", "ffn_norm",
        [f"attention.{n}" for n in ATTN] + ["feed_forward.w1", "feed_forward.w3", "feed_forward.w2"],
        ["tok_embeddings", "output", "norm"],
    ),
    "hf": (
        hf_model, "model.layers.{}.", "input_layernorm", "post_attention_layernorm",
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj"],
        ["model.embed_tokens", "lm_head", "model.norm"],
    ),
    "torchtitan": (
        torchtitan_model, "layers.{}.", "attention_norm", "ffn_norm",
        ["attention.qkv_linear.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2"],
        ["tok_embeddings", "lm_head", "norm"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_faq_placement_tree_and_training(family: str) -> None:
    factory, prefix, attn_norm, mlp_norm, linears, untouched = FAMILIES[family]
    model = factory()
    modules = dict(model.named_modules())
    before = {name: modules[name] for name in untouched}
    originals = {prefix.format(i) + p: modules[prefix.format(i) + p] for i in range(2) for p in linears}

    report = apply_bitnet_norms(model)

    modules = dict(model.named_modules())
    assert report.inserted == list(originals)
    assert report.removed == [prefix.format(i) + n for i in range(2) for n in (attn_norm, mlp_norm)]
    for name in report.removed:
        assert isinstance(modules[name], nn.Identity), name
    for name, linear in originals.items():
        wrapped = modules[name]
        assert isinstance(wrapped, NormedLinear) and isinstance(wrapped, nn.Linear), name
        assert wrapped is linear, f"{name}: the original linear must be kept in place, not copied"
        assert isinstance(wrapped.norm, nn.RMSNorm) and wrapped.norm.normalized_shape == (linear.in_features,)
        assert torch.equal(wrapped.norm.weight, torch.ones(linear.in_features)), "unit gain at insertion"
    for name, module in before.items():
        assert modules[name] is module, f"{name} must be left untouched"
    assert sum(isinstance(m, NormedLinear) for m in model.modules()) == len(originals)

    quantize_(model, bitnet_training(), filter_fn=quantize_filter)
    for name, linear in originals.items():
        assert isinstance(linear.weight, BitNetTrainingLinearWeight), name
    head = modules["output" if family == "own" else "lm_head"]
    assert not isinstance(head.weight, BitNetTrainingLinearWeight), "the output head stays in high precision"

    vocab = head.out_features
    losses = train_losses(model, vocab)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses
    norm = modules[next(iter(originals))].norm
    assert not torch.equal(norm.weight, torch.ones_like(norm.weight)), "the inserted norms must be trained"


def test_subln_placement_keeps_prenorms() -> None:
    model = hf_model()
    pre = {name: m for name, m in model.named_modules() if name.endswith("layernorm")}
    report = apply_bitnet_norms(model, placement="subln")
    assert report.removed == []
    assert report.inserted == [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.o_proj", "mlp.down_proj")]
    modules = dict(model.named_modules())
    assert all(modules[name] is m for name, m in pre.items()), "subln keeps the pre-norms"
    assert isinstance(modules["model.layers.0.self_attn.q_proj"], nn.Linear)
    assert modules["model.layers.0.mlp.down_proj"].norm.normalized_shape == (64,)  # the MLP's hidden size
    tokens = torch.randint(0, 256, (2, 8))
    assert torch.isfinite(model(tokens).logits).all()


def test_subln_own_model_trains_quantized() -> None:
    model = own_model()
    apply_bitnet_norms(model, placement="subln")
    block = model.layers[0]
    assert isinstance(block.attention_norm, nn.RMSNorm) and isinstance(block.ffn_norm, nn.RMSNorm)
    assert isinstance(block.attention.wo, NormedLinear) and isinstance(block.feed_forward.w2, NormedLinear)
    assert type(block.attention.wq) is nn.Linear and type(block.feed_forward.w1) is nn.Linear
    quantize_(model, bitnet_training(), filter_fn=quantize_filter)
    losses = train_losses(model, 256)
    assert losses[-1] < 0.7 * losses[0], losses


def test_report_text() -> None:
    report = apply_bitnet_norms(own_model())
    text = str(report).splitlines()
    assert "14 RMSNorm inserted, 4 norm removed" in text[0]
    assert "  inserted RMSNorm before layers.0.attention.wq" in text
    assert "  removed layers.1.ffn_norm" in text


def test_quantize_filter_skips_head_and_embeddings() -> None:
    model = own_model()
    selected = [name for name, m in model.named_modules() if quantize_filter(m, name)]
    assert len(selected) == 2 * 7
    assert "output" not in selected and "tok_embeddings" not in selected


def test_errors() -> None:
    with pytest.raises(ValueError, match="no transformer block of Sequential matches a known layout"):
        apply_bitnet_norms(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
    model = own_model()
    with pytest.raises(ValueError, match="placement must be 'faq' or 'subln', got 'pre'"):
        apply_bitnet_norms(model, placement="pre")
    apply_bitnet_norms(model)
    with pytest.raises(ValueError, match=r"already has BitNet norms \(at layers.0.attention.wq\)"):
        apply_bitnet_norms(model)


@pytest.mark.parametrize("shape", [(2, 8, 32), (64, 1024)], ids=["eager", "compiled"])
def test_rms_norm_matches_torch(shape: tuple[int, ...]) -> None:
    """The CPU-fused RMSNorm computes what torch.nn.RMSNorm computes, values and gradients, on both of its paths
    (tensors below the bitnet_ao.kernels compile threshold run eagerly)."""
    torch.manual_seed(0)
    ref, new = nn.RMSNorm(shape[-1], eps=1e-5), RMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    new.load_state_dict(ref.state_dict())
    x = (torch.randn(shape) * 3).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    grad = torch.randn(shape)
    y, y_ref = new(x), ref(x_ref)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(new.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)


# --- pretrained models: the surgery keeps their function where it can (docs/finetuning.md) -------------------


def pretrained(family: str) -> nn.Module:
    """A tiny HF Llama or Qwen2 (biases on q/k/v) with non-unit pre-norm gains, as a pretrained model has."""
    transformers = pytest.importorskip("transformers")
    if family == "llama":
        model = tiny_llama(vocab_size=64, rms_norm_eps=1e-6)
    else:
        torch.manual_seed(0)
        config = transformers.Qwen2Config(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
        )  # fmt: skip
        model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 2.0)
    return model


def logits(model: nn.Module, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_faq_on_a_pretrained_model_keeps_its_function(family: str) -> None:
    """FAQ without the block norms: the q/k/v and gate/up norms take the removed pre-norm's gain and eps and are
    that pre-norm; the o/down norms are not (unit gain), so only with those bypassed is the model the same."""
    original = pretrained(family)
    model = copy.deepcopy(original)
    report = apply_bitnet_norms(model)
    assert report.model == type(original).__name__ and report.summary.startswith(
        f"apply_bitnet_norms(placement='faq') on {type(original).__name__} "
    ), "the report names the model it changed, not only the naming scheme (a Qwen2 is no Llama)"
    block = model.model.layers[0]
    assert block.self_attn.q_proj.norm.eps == original.model.layers[0].input_layernorm.variance_epsilon
    assert torch.equal(block.mlp.up_proj.norm.weight, original.model.layers[0].post_attention_layernorm.weight)
    for layer in model.model.layers:  # the unpreservable norms out of the way: what is left must be exact
        layer.self_attn.o_proj.norm = layer.mlp.down_proj.norm = nn.Identity()
    torch.testing.assert_close(logits(model), logits(original), rtol=1e-5, atol=1e-5)


def test_keep_block_norms_moves_the_gain() -> None:
    original = pretrained("llama")
    model = copy.deepcopy(original)
    apply_bitnet_norms(model, keep_block_norms=True)
    block, before = model.model.layers[1], original.model.layers[1]
    assert torch.equal(block.input_layernorm.weight, torch.ones(32)), "the kept pre-norm gets unit gain"
    assert torch.equal(block.self_attn.v_proj.norm.weight, before.input_layernorm.weight)
    for layer in model.model.layers:
        layer.self_attn.o_proj.norm = layer.mlp.down_proj.norm = nn.Identity()
    # Up to eps: the kept pre-norm's output has RMS sqrt(ms / (ms + eps)), 1 - O(eps / ms), not 1.
    new, ref = logits(model), logits(original)
    assert (new - ref).abs().max() < 1e-2 * ref.abs().max()


def test_calibration_sets_the_mean_rms_of_the_inputs() -> None:
    """Layer 0's o_proj reads the input it read in the original model (the norms before it reproduce the pretrained
    ones, to float32 rounding: bitnet_ao's RMSNorm sums its squares in float64), so its calibrated gain is the mean
    RMS of the original o_proj input, taken here with a hook on transformers' model; exactly that of the input the
    modified model's o_proj reads."""
    original = pretrained("llama")
    model = copy.deepcopy(original)
    apply_bitnet_norms(model)
    batches = [torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def mean_rms_of_o_proj_inputs(m: nn.Module) -> float:
        seen = []
        hook = m.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda _, a: seen.append(a[0]))
        for batch in batches:
            with torch.no_grad():
                m(batch)
        hook.remove()
        x = torch.cat([s.flatten(0, 1) for s in seen]).double()
        return (x.square().mean(-1) + 1e-6).sqrt().mean().item()

    original_rms, own_rms = mean_rms_of_o_proj_inputs(original), mean_rms_of_o_proj_inputs(model)
    gains = calibrate_bitnet_norms(model, batches)
    assert set(gains) == {f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.o_proj", "mlp.down_proj")}
    assert gains["model.layers.0.self_attn.o_proj"] == pytest.approx(original_rms, rel=1e-6)
    assert torch.all(model.model.layers[0].self_attn.o_proj.norm.weight == torch.tensor(own_rms, dtype=torch.float32))
    assert torch.equal(
        model.model.layers[0].self_attn.q_proj.norm.weight, original.model.layers[0].input_layernorm.weight
    )


def test_qwen2_biases_train() -> None:
    model = pretrained("qwen2")
    apply_bitnet_norms(model)
    quantize_(model, bitnet_training(), filter_fn=quantize_filter)
    q = model.model.layers[0].self_attn.q_proj
    assert q.bias is not None and isinstance(q.weight, BitNetTrainingLinearWeight)
    before = q.bias.detach().clone()
    train_losses(model, 64, steps=2)
    assert not torch.equal(q.bias.detach(), before), "the q_proj bias gets gradients and is updated"


def test_find_blocks_through_normed_and_peft_layers() -> None:
    peft = pytest.importorskip("peft")
    model = hf_model()
    apply_bitnet_norms(model, placement="subln")
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "o_proj"]))
    layout, blocks = find_blocks(adapted)
    assert [name for name, _ in blocks] == [f"base_model.model.model.layers.{i}" for i in range(2)]
    block = blocks[0][1]
    assert base_linear(block.self_attn.q_proj) is block.self_attn.q_proj.base_layer  # peft around a linear
    assert isinstance(block.self_attn.o_proj.base_layer, NormedLinear)
    assert base_linear(block.self_attn.o_proj) is block.self_attn.o_proj.base_layer  # peft around a NormedLinear
    assert base_linear(block.mlp.down_proj) is block.mlp.down_proj
    assert base_linear(block.mlp) is None


#: apply_bitnet_norms' arguments, and what detect_placement must read back from the model they leave.
CALLS = {
    "faq": (dict(placement="faq", eps=3e-6), AppliedPlacement("faq", 3e-6, keep_block_norms=False)),
    "faq, block norms kept": (
        dict(placement="faq", eps=1e-5, keep_block_norms=True),
        AppliedPlacement("faq", 1e-5, keep_block_norms=True),
    ),
    "subln": (dict(placement="subln", eps=2e-6), AppliedPlacement("subln", 2e-6, keep_block_norms=True)),
}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_detect_placement_reads_back_the_surgery(family: str, call: str) -> None:
    model = FAMILIES[family][0]()
    assert detect_placement(model) is None, "a stock model has no BitNet norms"
    kwargs, expected = CALLS[call]
    apply_bitnet_norms(model, **kwargs)
    assert detect_placement(model) == expected
    quantize_(model, bitnet_training(), filter_fn=quantize_filter)
    assert detect_placement(model) == expected


def test_detect_placement_through_peft_and_with_the_pre_norms_eps() -> None:
    peft = pytest.importorskip("peft")
    model = hf_model()
    apply_bitnet_norms(model, placement="subln")  # eps=None: the pre-norms'
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "o_proj"]))
    assert detect_placement(adapted) == AppliedPlacement("subln", model.config.rms_norm_eps, keep_block_norms=True)


def test_detect_placement_refuses_what_apply_bitnet_norms_does_not_give() -> None:
    one_linear = own_model()
    NormedLinear.from_linear(one_linear.layers[0].attention.wq, 1e-5)
    with pytest.raises(
        ValueError, match=r"^save_gguf: layers\.0 has RMSNorms before \['attention\.wq'\] and no pre-norm"
    ):
        detect_placement(one_linear, "save_gguf")
    half_removed = own_model()
    apply_bitnet_norms(half_removed)
    half_removed.layers[1].ffn_norm = RMSNorm(32)
    with pytest.raises(ValueError, match=r"layers\.1 has RMSNorms before .* and \['attention_norm'\] removed"):
        detect_placement(half_removed)
    mixed = own_model()
    apply_bitnet_norms(mixed, "subln")
    mixed.layers[1] = own_model().layers[1]
    with pytest.raises(ValueError, match=r"mix norm placements \(layers\.0: subln, layers\.1: no BitNet norms\)"):
        detect_placement(mixed)
    two_eps = own_model()
    apply_bitnet_norms(two_eps, eps=1e-5)
    two_eps.layers[1].feed_forward.w2.norm.eps = 1e-6
    with pytest.raises(ValueError, match=r"different eps \[1e-06, 1e-05\]"):
        detect_placement(two_eps)


def test_state_dict_keeps_the_stock_keys_and_loads_the_wrapper_layout() -> None:
    """The linears keep their keys (pretrained weights load after the surgery, only the norms' gains are new), and
    a checkpoint of the earlier ``NormedLinear(norm, linear)`` wrapper (``wq.linear.weight``) loads exactly."""
    plain = own_model()
    model = copy.deepcopy(plain)
    apply_bitnet_norms(model)
    keys, stock = set(model.state_dict()), set(plain.state_dict())
    removed = {k for k in stock if k.endswith(("attention_norm.weight", "ffn_norm.weight"))}
    linears = [f"attention.{n}" for n in ATTN] + [f"feed_forward.{n}" for n in MLP]
    assert keys - stock == {f"layers.{i}.{p}.norm.weight" for i in range(2) for p in linears}
    assert stock - keys == removed
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert set(unexpected) == removed and all(k.endswith(".norm.weight") for k in missing)

    quantize_(model, bitnet_training(), filter_fn=quantize_filter)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NormedLinear):
                m.norm.weight.uniform_(0.5, 1.5)
    old = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        wrapped = isinstance(model.get_submodule(module), NormedLinear) and leaf in ("weight", "bias")
        old[f"{module}.linear.{leaf}" if wrapped else key] = value
    assert any(".linear.weight" in k for k in old)
    fresh = own_model()
    apply_bitnet_norms(fresh)
    quantize_(fresh, bitnet_training(), filter_fn=quantize_filter)
    fresh.load_state_dict(old)  # strict
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
