"""Generation without per-op Python (issue [decode]): the benchmark model's decode step through ``torch.compile``
(``CompiledDecodeStep``) and exported into an AOTInductor package (``PackagedDecodeStep``) decodes the eager model's
greedy tokens, for the packed BitNet model and the dense one, from prompts of one and several tokens (the first step
at length 1 is a graph of its own); the package runs in a fresh process that never built the model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.bench_inference import build_variants
from benchmarks.data import VOCAB_SIZE
from benchmarks.model import CompiledDecodeStep, ModelConfig, PackagedDecodeStep, generate
from bitnet_ao.kernels import cpu_ops

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ModelConfig(vocab_size=VOCAB_SIZE, max_seq_len=64, dim=64, n_layers=2, n_heads=4, hidden_dim=128)


@pytest.fixture(scope="module")
def variants():
    if not cpu_ops.available():
        pytest.skip("no C++ compiler: the decode linear is not registered in C++")
    return build_variants(CONFIG, torch.bfloat16, "cpu", surgery=False)


@pytest.fixture(autouse=True)
def _own_inductor_cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "inductor"))


@pytest.mark.parametrize("name", ["bf16 dense", "bitnet packed"])
def test_the_compiled_step_decodes_the_eager_tokens(variants, name):
    model = variants[name]
    step = CompiledDecodeStep(model)
    for length in (1, 5, 1):  # the third call reuses the graphs, its guards skipped
        prompt = torch.randint(0, VOCAB_SIZE, (1, length), generator=torch.Generator().manual_seed(length))
        eager = generate(model, prompt, 24, torch.bfloat16)
        assert torch.equal(generate(model, prompt, 24, torch.bfloat16, step), eager), (name, length)


def test_the_packaged_step_decodes_the_eager_tokens_in_a_fresh_process(variants, tmp_path):
    model = variants["bitnet packed"]
    path = tmp_path / "decode.pt2"
    step = PackagedDecodeStep.package(model, path)
    prompts = [torch.randint(0, VOCAB_SIZE, (1, n), generator=torch.Generator().manual_seed(n)) for n in (1, 6)]
    eager = [generate(model, p, 24, torch.bfloat16) for p in prompts]
    for prompt, tokens in zip(prompts, eager, strict=True):
        assert torch.equal(generate(model, prompt, 24, torch.bfloat16, step), tokens)

    # Another process loads the package next to a model used only for its prompt forward: the step is the package's.
    torch.save({"prompts": prompts, "eager": eager, "state": model.state_dict()}, tmp_path / "case.pt")
    script = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
from benchmarks.bench_inference import build_variants
from benchmarks.model import PackagedDecodeStep, generate
from tests.test_decode import CONFIG
case = torch.load({str(tmp_path / "case.pt")!r}, weights_only=False)
model = build_variants(CONFIG, torch.bfloat16, "cpu", surgery=False)["bitnet packed"]
model.load_state_dict(case["state"])
step = PackagedDecodeStep({str(path)!r})
for prompt, tokens in zip(case["prompts"], case["eager"], strict=True):
    assert torch.equal(generate(model, prompt, 24, torch.bfloat16, step), tokens)
print("same tokens")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0 and "same tokens" in run.stdout, run.stderr[-3000:]


def test_a_hugging_face_model_with_packed_weights_decodes_through_stock_generate_compiled():
    """transformers' recipe for fast decoding (``cache_implementation="static"`` and ``model.forward`` through
    ``torch.compile``) on a Llama with BitNet norms and packed weights: the eager greedy tokens, and the compiled
    steps run bitnet_ao's C++ decode linear."""
    transformers = pytest.importorskip("transformers")
    from torchao.quantization import quantize_

    from benchmarks.model import DECODE_COMPILE_OPTIONS
    from bitnet_ao import bitnet_inference, bitnet_training
    from bitnet_ao.surgery import apply_bitnet_norms, quantize_filter

    if not cpu_ops.available():
        pytest.skip("no C++ compiler: the decode linear is not registered in C++")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    apply_bitnet_norms(model)
    model.to(torch.bfloat16)
    quantize_(model, bitnet_training(), filter_fn=quantize_filter)
    quantize_(model, bitnet_inference(), filter_fn=quantize_filter)
    ids = torch.randint(0, VOCAB_SIZE, (1, 6), generator=torch.Generator().manual_seed(0))
    kwargs = {"max_new_tokens": 16, "do_sample": False, "cache_implementation": "static"}
    with torch.inference_mode():
        eager = model.generate(ids, **kwargs)
        model.forward = torch.compile(model.forward, fullgraph=True, options=DECODE_COMPILE_OPTIONS)
        model.generate(ids, **kwargs)  # compiles
        with torch.profiler.profile() as prof:
            compiled = model.generate(ids, **kwargs)
    assert torch.equal(compiled, eager)
    assert any(e.name == "bitnet_ao::packed_linear" for e in prof.events())


def test_generation_during_training_runs_compiled_on_the_packed_weights():
    """``bitnet_ao.packed_weights``: a compiled decode step of the model being trained, traced and run on its packed
    weights, decodes the eager training model's tokens; after an optimizer step the same compiled step, in the next
    evaluation's block, decodes the new weights' tokens (never stale), and the training weights are back after each
    block."""
    from torchao.quantization import quantize_

    from benchmarks.model import Transformer
    from bitnet_ao import BitNetTrainingLinearWeight, bitnet_training, packed_weights
    from bitnet_ao.surgery import quantize_filter

    if not cpu_ops.available():
        pytest.skip("no C++ compiler: the decode linear is not registered in C++")
    torch.manual_seed(0)
    model = Transformer(CONFIG).to(torch.bfloat16)
    quantize_(model, bitnet_training(), filter_fn=quantize_filter)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2, fused=True)
    step = CompiledDecodeStep(model)
    prompt = torch.randint(0, VOCAB_SIZE, (1, 5), generator=torch.Generator().manual_seed(0))
    seen = []
    for _ in range(2):
        eager = generate(model, prompt, 16, torch.bfloat16)
        with packed_weights(model):
            assert type(model.layers[0].attention.wq.weight).__name__ == "BitNetPackedLinearWeight"
            compiled = generate(model, prompt, 16, torch.bfloat16, step)
        assert torch.equal(compiled, eager)
        assert isinstance(model.layers[0].attention.wq.weight, BitNetTrainingLinearWeight)
        seen.append(eager)
        x = torch.randint(0, VOCAB_SIZE, (4, 16))
        model(x, targets=x).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(seen[0], seen[1]), "the step changed the weights enough to change the tokens"
