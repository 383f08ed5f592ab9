"""bitnet_ao.integrations.gguf: the GGUF files read back with gguf-py's own reader and dequantizer, the ternary
values checked against the reference math (tests/spec_reference.py), and, where llama-cpp-python is installed,
the files run by llama.cpp against bitnet_ao's packed model."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torchao.quantization import quantize_

from benchmarks import pretrain
from benchmarks.model import KVCache, ModelConfig, Transformer
from bitnet_ao import bitnet_inference, bitnet_training
from bitnet_ao.integrations.gguf import gguf_architecture, save_gguf
from bitnet_ao.kernels import torch_backend
from bitnet_ao.surgery import apply_bitnet_norms, quantize_filter
from tests.conftest import master_tensor, tiny_llama
from tests.spec_reference import ternary_weight

#: llama.cpp's tensor names of a block's linears, and of the Meta / Hugging Face modules they come from.
LINEARS = {
    "attn_q": ("attention.wq", "self_attn.q_proj"),
    "attn_k": ("attention.wk", "self_attn.k_proj"),
    "attn_v": ("attention.wv", "self_attn.v_proj"),
    "attn_output": ("attention.wo", "self_attn.o_proj"),
    "ffn_gate": ("feed_forward.w1", "mlp.gate_proj"),
    "ffn_up": ("feed_forward.w3", "mlp.up_proj"),
    "ffn_down": ("feed_forward.w2", "mlp.down_proj"),
}
PROMPT = list(b"def fibonacci(n):\n    return n if n < 2 else")


@pytest.fixture(autouse=True)
def _eager_quantization() -> Iterator[None]:
    """The weight quantization of these 256-wide weights would be compiled (seconds per shape); the eager path
    gives the same values."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch_backend, "COMPILE_MIN_NUMEL", 1 << 40)
        yield


# --- models --------------------------------------------------------------------------------------------------


def bench_model(seed: int = 0, sharp: bool = False, recipe=None, filter_fn=quantize_filter, **config) -> Transformer:
    """The benchmark model at the smallest block-256 shape, embeddings of scale 1 (and, ``sharp``, q/k projections
    that make the attention position-dependent, so that a wrong rope layout shows), BitNet block linears."""
    torch.manual_seed(seed)
    shape = dict(dim=256, n_layers=2, n_heads=4, hidden_dim=768, max_seq_len=128)
    model = Transformer(ModelConfig(**{**shape, **config}))
    with torch.no_grad():
        model.tok_embeddings.weight.normal_(0, 1.0)
        model.output.weight.normal_(0, 0.3)
        for layer in model.layers if sharp else []:
            layer.attention.wq.weight.normal_(0, 0.3)
            layer.attention.wk.weight.normal_(0, 0.3)
            layer.attention.wo.weight.normal_(0, 0.1)
    quantize_(model, recipe or bitnet_training(), filter_fn=filter_fn)
    return model


def subln_llama(seed: int = 0, **overrides) -> nn.Module:
    """A Hugging Face Llama with the subln placement and a tied head: llama.cpp's bitnet architecture; GQA (4 query
    heads, 2 KV heads)."""
    config = dict(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    )
    model = tiny_llama(seed, **{**config, **overrides})
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.normal_(0, 0.3)
            layer.self_attn.k_proj.weight.normal_(0, 0.3)
    apply_bitnet_norms(model, "subln")
    quantize_(model, bitnet_training(), filter_fn=quantize_filter)
    return model


# --- reading a file back -------------------------------------------------------------------------------------


def read(path: Path) -> tuple[dict[str, object], dict[str, gguf.ReaderTensor]]:
    reader = gguf.GGUFReader(path)
    return {f.name: f.contents() for f in reader.fields.values()}, {t.name: t for t in reader.tensors}


def dequantized(tensor: gguf.ReaderTensor) -> Tensor:
    """gguf-py's own dequantization, as a float64 ``(rows, columns)`` tensor."""
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float64))


def reference(weight: Tensor) -> tuple[Tensor, Tensor]:
    """The ternary values and the scale of a master weight by the reference math, the scale rounded to fp16."""
    values, scale = ternary_weight(master_tensor(weight).detach())
    return values.double(), scale.to(torch.float16).double()


def convert_hf_permute(w: Tensor, n_head: int) -> Tensor:
    """convert_hf_to_gguf.py's ``LlamaModel.permute``, as written there."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_neox(x: Tensor, pos: int, base: float) -> Tensor:
    """Rotation of the two halves of each head (what the models here and llama.cpp's NEOX rope do)."""
    d = x.shape[-1]
    angle = pos * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    x0, x1 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x0 * angle.cos() - x1 * angle.sin(), x1 * angle.cos() + x0 * angle.sin()], dim=-1)


def rope_normal(x: Tensor, pos: int, base: float) -> Tensor:
    """ggml's NORMAL rope (``rope_norm``): adjacent pairs ``(2i, 2i + 1)`` rotate by ``pos * base^(-2i/d)``."""
    d = x.shape[-1]
    angle = pos * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * angle.cos() - x1 * angle.sin(), x0 * angle.sin() + x1 * angle.cos()], -1).flatten(-2)


def attention_scores(wq: Tensor, wk: Tensor, n_heads: int, n_kv: int, rope, base: float = 10000.0) -> Tensor:
    """q.k of every query head against its KV head for two random inputs at positions 5 and 2, after ``rope``."""
    torch.manual_seed(1)
    x, y = torch.randn(2, wq.shape[1], dtype=torch.float64)
    q = rope((wq @ x).reshape(n_heads, -1), 5, base)
    k = rope((wk @ y).reshape(n_kv, -1), 2, base)
    return (q * k.repeat_interleave(n_heads // n_kv, dim=0)).sum(-1)


# --- the ternary tensors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ternary_type", ["TQ2_0", "TQ1_0"])
def test_llama_export_holds_the_exact_ternary_values(tmp_path: Path, ternary_type: str) -> None:
    model = bench_model()
    fields, tensors = read(save_gguf(model, tmp_path / "m.gguf", ternary_type))
    assert fields["general.architecture"] == "llama"
    for i, layer in enumerate(model.layers):
        for name, (meta, _) in LINEARS.items():
            tensor = tensors[f"blk.{i}.{name}.weight"]
            assert tensor.tensor_type == gguf.GGMLQuantizationType[ternary_type]
            values, scale = reference(layer.get_submodule(meta).weight)
            assert list(tensor.shape) == [values.shape[1], values.shape[0]]  # GGUF lists ne0 (in_features) first
            if name in ("attn_q", "attn_k"):  # llama.cpp's llama rope rotates adjacent pairs
                values = convert_hf_permute(values, 4)
            assert torch.equal(dequantized(tensor), values * scale), f"blk.{i}.{name}"
    norms = {f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_norm", "ffn_norm")}
    linears = {f"blk.{i}.{n}.weight" for i in range(2) for n in LINEARS}
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight"} | norms | linears
    assert all(tensors[n].tensor_type == gguf.GGMLQuantizationType.F32 for n in norms | {"output_norm.weight"})


def test_the_scale_is_the_fp16_rounding_of_the_weight_scale(tmp_path: Path) -> None:
    """Every block of a weight carries ``d = fp16(s_w)`` (the last 2 bytes of a 66-byte TQ2_0 block): a relative
    error of at most 2^-11."""
    model = bench_model()
    _, tensors = read(save_gguf(model, tmp_path / "m.gguf"))
    for i, layer in enumerate(model.layers):
        weight = layer.attention.wv.weight
        _, scale = ternary_weight(master_tensor(weight).detach())
        d = tensors[f"blk.{i}.attn_v.weight"].data.reshape(-1, 66)[:, 64:].copy().view(np.float16)
        assert np.all(d == np.float16(scale.item()))
        assert abs(float(d[0, 0]) - scale.item()) <= 2**-11 * scale.item()


def test_q_and_k_rows_give_llama_cpp_rope_the_same_attention(tmp_path: Path) -> None:
    """The permuted rows under llama.cpp's rope on adjacent pairs give the attention scores the model's rope on
    the halves gives (GQA: 4 query heads, 2 KV heads); the bitnet arch keeps the rows and the halves rope."""
    model = subln_llama()
    attn = model.model.layers[0].self_attn
    wq, wk = (torch.mul(*reference(p.weight)) for p in (attn.q_proj, attn.k_proj))
    expected = attention_scores(wq, wk, 4, 2, rope_neox)
    _, tensors = read(save_gguf(model, tmp_path / "bitnet.gguf"))
    q, k = (dequantized(tensors[f"blk.0.{n}.weight"]) for n in ("attn_q", "attn_k"))
    torch.testing.assert_close(attention_scores(q, k, 4, 2, rope_neox), expected)

    plain = tiny_llama(0, vocab_size=256, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    quantize_(plain, bitnet_training(), filter_fn=quantize_filter)
    attn = plain.model.layers[0].self_attn
    wq, wk = (torch.mul(*reference(p.weight)) for p in (attn.q_proj, attn.k_proj))
    _, tensors = read(save_gguf(plain, tmp_path / "llama.gguf"))
    q, k = (dequantized(tensors[f"blk.0.{n}.weight"]) for n in ("attn_q", "attn_k"))
    torch.testing.assert_close(attention_scores(q, k, 4, 2, rope_normal), attention_scores(wq, wk, 4, 2, rope_neox))
    assert not torch.allclose(attention_scores(q, k, 4, 2, rope_neox), attention_scores(wq, wk, 4, 2, rope_neox))


def test_tq1_0_and_tq2_0_hold_the_same_values(tmp_path: Path) -> None:
    model = bench_model()
    _, tq2 = read(save_gguf(model, tmp_path / "tq2.gguf", "TQ2_0"))
    _, tq1 = read(save_gguf(model, tmp_path / "tq1.gguf", "TQ1_0"))
    ternary = [n for n, t in tq2.items() if t.tensor_type == gguf.GGMLQuantizationType.TQ2_0]
    assert len(ternary) == 14
    for name in ternary:
        assert tq1[name].tensor_type == gguf.GGMLQuantizationType.TQ1_0
        assert torch.equal(dequantized(tq1[name]), dequantized(tq2[name])), name
    assert (tmp_path / "tq1.gguf").stat().st_size < (tmp_path / "tq2.gguf").stat().st_size


def test_a_packed_model_exports_the_bytes_of_the_model_it_was_packed_from(tmp_path: Path) -> None:
    model = bench_model()
    packed = copy.deepcopy(model)
    quantize_(packed, bitnet_inference(), filter_fn=quantize_filter)
    assert type(packed.layers[0].attention.wq.weight).__name__ == "BitNetPackedLinearWeight"
    for ternary_type in ("TQ2_0", "TQ1_0"):
        a = save_gguf(model, tmp_path / f"trained-{ternary_type}.gguf", ternary_type).read_bytes()
        b = save_gguf(packed, tmp_path / f"packed-{ternary_type}.gguf", ternary_type).read_bytes()
        assert a == b


# --- the rest of the file ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("embedding_type", "tolerance"), [("F16", 1e-3), ("Q8_0", 1e-2), ("Q6_K", 3e-2)])
def test_embedding_and_head_types(tmp_path: Path, embedding_type: str, tolerance: float) -> None:
    model = bench_model()
    _, tensors = read(save_gguf(model, tmp_path / "m.gguf", embedding_type=embedding_type))
    for name, source in (("token_embd.weight", model.tok_embeddings.weight), ("output.weight", model.output.weight)):
        tensor = tensors[name]
        assert tensor.tensor_type == gguf.GGMLQuantizationType[embedding_type]
        values = dequantized(tensor)
        exact = source.detach().double()
        assert values.shape == exact.shape
        assert ((values - exact).norm() / exact.norm()).item() < tolerance, name


def test_norms_are_the_model_gains(tmp_path: Path) -> None:
    model = subln_llama()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    _, tensors = read(save_gguf(model, tmp_path / "m.gguf"))
    layer = model.model.layers[1]
    gains = {
        "blk.1.attn_norm.weight": layer.input_layernorm.weight,
        "blk.1.ffn_norm.weight": layer.post_attention_layernorm.weight,
        "blk.1.attn_sub_norm.weight": layer.self_attn.o_proj.norm.weight,
        "blk.1.ffn_sub_norm.weight": layer.mlp.down_proj.norm.weight,
        "output_norm.weight": model.model.norm.weight,
    }
    for name, gain in gains.items():
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(tensors[name].data, gain.detach().numpy()), name


def test_llama_metadata(tmp_path: Path) -> None:
    fields, _ = read(save_gguf(bench_model(), tmp_path / "m.gguf", "TQ1_0", name="bench"))
    expected = {
        "general.architecture": "llama",
        "general.name": "bench",
        "general.file_type": 36,  # LLAMA_FTYPE_MOSTLY_TQ1_0
        "llama.context_length": 128,
        "llama.embedding_length": 256,
        "llama.block_count": 2,
        "llama.feed_forward_length": 768,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 4,
        "llama.rope.dimension_count": 64,
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": np.float32(1e-5),
        "llama.vocab_size": 256,
    }
    assert {key: fields[key] for key in expected} == expected


def test_bitnet_architecture(tmp_path: Path) -> None:
    model = subln_llama()
    assert gguf_architecture(model) == "bitnet"
    fields, tensors = read(save_gguf(model, tmp_path / "m.gguf"))
    expected = {
        "general.architecture": "bitnet",
        "general.file_type": 37,  # LLAMA_FTYPE_MOSTLY_TQ2_0
        "bitnet.context_length": 128,
        "bitnet.feed_forward_length": 512,
        "bitnet.attention.head_count": 4,
        "bitnet.attention.head_count_kv": 2,
        "bitnet.rope.dimension_count": 64,
        "bitnet.attention.layer_norm_rms_epsilon": np.float32(1e-6),
    }
    assert {key: fields[key] for key in expected} == expected
    assert "output.weight" not in tensors, "llama.cpp's bitnet graph multiplies by token_embd"
    assert list(tensors["blk.0.attn_sub_norm.weight"].shape) == [256]
    assert list(tensors["blk.0.ffn_sub_norm.weight"].shape) == [512]
    layer = model.model.layers[0]
    for name, (_, hf) in LINEARS.items():  # rows as they are: the bitnet graph rotates the halves, as trained
        values, scale = reference(layer.get_submodule(hf).weight)
        assert torch.equal(dequantized(tensors[f"blk.0.{name}.weight"]), values * scale), name


def test_byte_vocabulary(tmp_path: Path) -> None:
    fields, _ = read(save_gguf(bench_model(), tmp_path / "m.gguf"))
    tokens = fields["tokenizer.ggml.tokens"]
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(tokens) == len(set(tokens)) == 256
    assert all(len(t) == 1 for t in tokens)
    assert all(tokens[b] == chr(b) for b in b"!az~") and tokens[ord(" ")] == "\u0120" and tokens[10] == "\u010a"
    assert list(fields["tokenizer.ggml.token_type"]) == [gguf.TokenType.NORMAL] * 256
    # llama.cpp needs a merges key; the one written can never apply: only merges make multi-character symbols.
    assert all(len(part) > 1 for merge in fields["tokenizer.ggml.merges"] for part in merge.split(" "))
    assert fields["tokenizer.ggml.add_bos_token"] is False


def byte_level_bpe() -> object:
    """A small byte-level BPE fast tokenizer (trained here, no download), with one special token."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tokenizer.train_from_iterator([Path(__file__).read_text()], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def test_hugging_face_tokenizer(tmp_path: Path) -> None:
    hf = byte_level_bpe()
    model = tiny_llama(0, vocab_size=320, hidden_size=256, intermediate_size=512, num_attention_heads=4)
    quantize_(model, bitnet_training(), filter_fn=quantize_filter)
    fields, _ = read(save_gguf(model, tmp_path / "m.gguf", tokenizer=hf))
    tokens, types = fields["tokenizer.ggml.tokens"], list(fields["tokenizer.ggml.token_type"])
    vocab = hf.get_vocab()
    assert len(tokens) == 320 and all(tokens[i] == t for t, i in vocab.items())
    assert tokens[300:] == [f"[PAD{i}]" for i in range(300, 320)] and set(types[300:]) == {gguf.TokenType.UNUSED}
    assert types[hf.eos_token_id] == gguf.TokenType.CONTROL and fields["tokenizer.ggml.eos_token_id"] == 0
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    merges = json.loads(hf.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]


# --- what is refused -----------------------------------------------------------------------------------------


def _faq() -> nn.Module:
    model = Transformer(ModelConfig(dim=256, n_layers=1, n_heads=4, hidden_dim=512))
    apply_bitnet_norms(model)
    quantize_(model, bitnet_training(), filter_fn=quantize_filter)
    return model


def _untied_subln() -> nn.Module:
    return subln_llama(tie_word_embeddings=False)


def _relu2() -> nn.Module:
    return subln_llama(hidden_act="relu2")


def _plain_wo() -> nn.Module:
    return bench_model(n_layers=1, filter_fn=lambda m, fqn: quantize_filter(m, fqn) and not fqn.endswith("wo"))


def _other_config() -> nn.Module:
    model = bench_model(n_layers=1)
    model.config = SimpleNamespace(n_heads=4, max_seq_len=128, rope_theta=10000.0)
    return model


def _bias() -> nn.Module:
    model = tiny_llama(0, vocab_size=256, hidden_size=256, intermediate_size=512, attention_bias=True)
    quantize_(model, bitnet_training(), filter_fn=quantize_filter)
    return model


REFUSALS = {
    "faq": (_faq, r"Transformer has the FAQ placement .*no llama\.cpp architecture.*no norm surgery.*'subln'"),
    "untied head": (_untied_subln, r"bitnet graph has no output tensor.*lm_head is not tied to model\.embed_tokens"),
    "relu2": (_relu2, r"mlp\.gate_proj\) uses 'relu2'; llama\.cpp's llama and bitnet graphs both compute silu"),
    "binary": (lambda: bench_model(n_layers=1, recipe=bitnet_training(weights="binary")),
               r"layers\.0\.attention\.wq \(in_features=256, out_features=256\) has binary weights"),
    "groups": (lambda: bench_model(n_layers=1, recipe=bitnet_training(scale_groups=2)),
               r"layers\.0\.attention\.wq \(in_features=256, out_features=256\) has 2 group scales"),
    "bias": (_bias, r"model\.layers\.0\.self_attn\.q_proj \(in_features=256, out_features=256\) has a bias"),
    "in_features": (lambda: bench_model(n_layers=1, dim=128, hidden_dim=256),
                    r"layers\.0\.attention\.wq \(in_features=128, out_features=128\).*multiple of 256"),
    "plain linear": (_plain_wo, r"layers\.0\.attention\.wo \(in_features=256.*plain high-precision linear"),
    "layout": (lambda: nn.Sequential(nn.Linear(256, 256)), r"Sequential is no transformer bitnet_ao knows"),
    "config": (_other_config, r"by Hugging Face LlamaConfig's names .*Transformer\.config has model_type None"),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_name_the_module_and_the_reason(tmp_path: Path, case: str) -> None:
    build, message = REFUSALS[case]
    model = build()
    with pytest.raises(ValueError, match=message):
        gguf_architecture(model)
    with pytest.raises(ValueError, match=message):
        save_gguf(model, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_refused_types(tmp_path: Path) -> None:
    model = bench_model(n_layers=1)
    with pytest.raises(ValueError, match="ternary_type must be 'TQ2_0' or 'TQ1_0', got 'Q4_0'"):
        save_gguf(model, tmp_path / "m.gguf", "Q4_0")
    with pytest.raises(ValueError, match="embedding_type must be 'F16', 'Q8_0' or 'Q6_K', got 'Q4_K'"):
        save_gguf(model, tmp_path / "m.gguf", embedding_type="Q4_K")


# --- benchmarks/pretrain.py --save-gguf ----------------------------------------------------------------------


def test_pretrain_refuses_an_unexportable_run_before_training(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--preset", "tiny", "--save-gguf", "m.gguf"])
    assert "--save-gguf: Transformer has the FAQ placement" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--preset", "tiny", "--no-surgery", "--save-gguf", "m.gguf"])
    assert "in_features=64" in capsys.readouterr().err
    assert pretrain.parse_args(["--no-surgery", "--save-gguf", "m.gguf"]).gguf_type == "TQ2_0"


def test_pretrain_writes_the_bitnet_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = {**pretrain.PRESETS["tiny"], "model": dict(dim=256, n_layers=1, n_heads=4, hidden_dim=512)}
    monkeypatch.setitem(pretrain.PRESETS, "tiny", tiny)
    args = ["--preset", "tiny", "--quantize", "bitnet", "--no-surgery", "--steps", "2", "--batch-size", "2"]
    args += ["--seq-len", "32", "--max-bytes", "100000", "--out", str(tmp_path), "--gguf-type", "TQ1_0"]
    pretrain.main([*args, "--save-gguf", str(tmp_path / "bitnet.gguf")])
    fields, tensors = read(tmp_path / "bitnet.gguf")
    assert fields["general.architecture"] == "llama" and fields["llama.context_length"] == 32
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.TQ1_0


# --- llama.cpp itself ----------------------------------------------------------------------------------------


@pytest.fixture
def one_thread() -> Iterator[None]:
    """bitnet_ao's side of the comparison on one thread: its results do not depend on the thread count, and on a
    busy 2-core machine OpenMP's waiting threads made a 256-wide decode step 50x slower (11 ms per linear)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _compare_with_llama_cpp(llama_cpp, path: Path, generate, logits_of, label: str) -> tuple[float, float]:
    """Greedy generation of 64 tokens by bitnet_ao (``generate``: prompt -> the 64 tokens, with a KV cache;
    ``logits_of``: token ids -> logits per position), replayed token by token through llama.cpp's decode: the
    relative error of llama.cpp's logits over every position and the share of the 64 steps where llama.cpp's
    greedy choice is bitnet_ao's."""
    with torch.inference_mode():
        tokens = PROMPT + generate(PROMPT)
        ours = logits_of(tokens[:-1]).double()
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, n_threads=2, verbose=False)
    try:
        llm.eval(PROMPT)
        agree = 0
        for token in tokens[len(PROMPT) :]:
            agree += int(np.argmax(llm.scores[llm.n_tokens - 1])) == token
            llm.eval([token])
        theirs = torch.from_numpy(np.array(llm.scores[: len(tokens) - 1], dtype=np.float64))
        llm.reset()
        llm.eval(PROMPT)  # llama.cpp generating on its own, for the record
        free = []
        for _ in range(64):
            free.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([free[-1]])
    finally:
        llm.close()
    error = ((theirs - ours).norm() / ours.norm()).item()
    free_agree = float(np.mean(np.array(free) == np.array(tokens[len(PROMPT) :])))
    print(f"\n{label}: logits rel. error {error:.2e}, greedy agreement {agree / 64:.3f} (teacher-forced), "
          f"{free_agree:.3f} (free-running)")  # fmt: skip
    return error, agree / 64


@pytest.mark.parametrize("ternary_type", ["TQ2_0", "TQ1_0"])
def test_llama_cpp_runs_the_llama_export(tmp_path: Path, ternary_type: str, one_thread: None) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    model = bench_model(sharp=True)
    quantize_(model, bitnet_inference(), filter_fn=quantize_filter)
    model.eval()
    path = save_gguf(model, tmp_path / "m.gguf", ternary_type)

    def generate(prompt: list[int]) -> list[int]:
        cache, out = KVCache(model.config, 1, torch.float32, "cpu"), []
        logits = model(torch.tensor([prompt]), cache=cache)
        for _ in range(64):
            out.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([out[-1:]]), cache=cache)
        return out

    logits_of = lambda t: model(torch.tensor([t]))[0]  # noqa: E731
    error, agreement = _compare_with_llama_cpp(llama_cpp, path, generate, logits_of, f"llama {ternary_type}")
    assert error <= 2e-2 and agreement >= 0.95


def test_llama_cpp_runs_the_bitnet_export(tmp_path: Path, one_thread: None) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    model = subln_llama()
    quantize_(model, bitnet_inference(), filter_fn=quantize_filter)
    model.eval()
    path = save_gguf(model, tmp_path / "m.gguf")

    def generate(prompt: list[int]) -> list[int]:
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=64, min_new_tokens=64)
        return out[0, len(prompt) :].tolist()

    logits_of = lambda t: model(torch.tensor([t])).logits[0]  # noqa: E731
    error, agreement = _compare_with_llama_cpp(llama_cpp, path, generate, logits_of, "bitnet TQ2_0")
    assert error <= 2e-2 and agreement >= 0.95


def test_llama_cpp_tokenizes_the_vocabularies(tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    text = "def f(x):\n\treturn x  # é, ü\r\n".encode()
    llm = llama_cpp.Llama(model_path=str(save_gguf(bench_model(n_layers=1), tmp_path / "bytes.gguf")),
                          vocab_only=True, verbose=False)  # fmt: skip
    try:
        assert llm.tokenize(text, add_bos=False) == list(text)
        assert llm.detokenize(list(range(256))) == bytes(range(256))
    finally:
        llm.close()
    hf = byte_level_bpe()
    model = tiny_llama(0, vocab_size=320, hidden_size=256, intermediate_size=512, num_attention_heads=4)
    quantize_(model, bitnet_training(), filter_fn=quantize_filter)
    llm = llama_cpp.Llama(model_path=str(save_gguf(model, tmp_path / "hf.gguf", tokenizer=hf)), vocab_only=True,
                          verbose=False)  # fmt: skip
    try:
        assert llm.tokenize(text, add_bos=False) == hf.encode(text.decode())
        assert llm.detokenize(hf.encode(text.decode())) == text
    finally:
        llm.close()
