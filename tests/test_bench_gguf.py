"""benchmarks/bench_gguf.py at its smoke size: the bitnet_ao side measures the model it claims to (parameter count,
bit-exact packed decoding, a prefill that really empties its cache), and, where llama-cpp-python and the GGUF
exporter are installed, the whole head-to-head runs and llama.cpp computes the same network (the real figures are
in docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import bench_gguf
from benchmarks.model import KVCache, ModelConfig, Transformer, generate
from bitnet_ao.integrations.gguf import BLOCK


@pytest.mark.parametrize(
    "shape",
    [*bench_gguf.PRESETS.values(), dict(dim=512, n_layers=3, n_heads=4, hidden_dim=1280)],
    ids=[*bench_gguf.PRESETS, "other"],
)
def test_parameter_counts(shape: dict[str, int]) -> None:
    """The counts the benchmark reports are Llama's arithmetic: per block four dim x dim attention projections and
    three dim x hidden SwiGLU projections (the block linears: ternary on both sides) and two norm gains; an untied
    embedding and head of vocab x dim; a final norm."""
    config = ModelConfig(vocab_size=256, **shape)
    with torch.device("meta"):  # shapes only: the 103M-parameter preset allocates nothing
        model = Transformer(config)
    d, h, n, v = config.dim, config.hidden_dim, config.n_layers, config.vocab_size
    block = n * (4 * d * d + 3 * d * h)
    assert bench_gguf.parameter_counts(model) == (block + 2 * v * d + (2 * n + 1) * d, block)
    assert all(m.in_features % BLOCK == 0 for m in bench_gguf.block_linears(model)), "llama.cpp's TQ blocks: 256"


def test_default_preset_is_realistic() -> None:
    args = bench_gguf.parse_args([])
    assert (args.prompt, args.new_tokens, args.preset) == (512, 128, "default")
    with torch.device("meta"):
        model = Transformer(bench_gguf.model_config(args))
    assert bench_gguf.parameter_counts(model)[0] >= 100_000_000
    quick = bench_gguf.parse_args(["--quick", "--iters", "2"])
    assert (quick.preset, quick.prompt, quick.iters) == ("quick", bench_gguf.QUICK["prompt"], 2), "flags win"
    with pytest.raises(SystemExit, match="multiples of 256"):
        bench_gguf.model_config(bench_gguf.parse_args(["--quick", "--dim", "320"]))


def test_bitnet_side() -> None:
    """The packed model decodes the training model's greedy tokens, and the timed prefill is a full prefill every
    call (the cache is emptied: a second call on the same cache gives the same logits, equal to a cacheless
    forward's)."""
    args = bench_gguf.parse_args(["--quick", "--new-tokens", "8"])
    config = bench_gguf.model_config(args)
    training, packed = bench_gguf.build_bitnet(config, torch.float32)
    assert all(
        type(m.weight).__name__ == "BitNetPackedLinearWeight"
        for name, m in packed.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "output"
    )
    with torch.device("meta"):
        dense = Transformer(config)
    counts = bench_gguf.parameter_counts(dense)
    assert bench_gguf.parameter_counts(training) == bench_gguf.parameter_counts(packed) == counts, "logical shapes"
    torch.manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt))
    packed_tokens = generate(packed, prompt[:, :1], args.new_tokens, torch.float32)
    assert packed_tokens.shape == (1, args.new_tokens)
    assert torch.equal(packed_tokens, generate(training, prompt[:, :1], args.new_tokens, torch.float32))

    cache = KVCache(config, 1, torch.float32, "cpu")
    first = bench_gguf.prefill(packed, prompt, cache)
    assert cache.length == args.prompt
    assert torch.equal(bench_gguf.prefill(packed, prompt, cache), first)
    with torch.inference_mode():
        torch.testing.assert_close(first, packed(prompt)[0, -1], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_head_to_head_quick(tmp_path: Path) -> None:
    """The whole benchmark at --quick: every variant timed, llama.cpp's logits close to bitnet_ao's (a wrong
    export, a transposed or unpermuted weight, gives errors near 1), the sizes those of the formats."""
    llama_cpp = pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    results = bench_gguf.main(["--quick", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "bench_gguf.json").read_text()) == results
    assert results["settings"]["llama_cpp_python"] == llama_cpp.__version__
    runs = {r["name"]: r for r in results["runs"]}
    assert list(runs) == ["bitnet_ao packed", "llama.cpp TQ2_0", "llama.cpp TQ1_0", "llama.cpp F16"]
    assert runs["bitnet_ao packed"]["same_tokens_as_training"]
    ours = runs["bitnet_ao packed"]
    # Every decode step (the packaged one is the row) decodes the eager tokens; the row is the packaged step's time.
    assert list(ours["decode_steps"]) == ["packaged", "compiled", "eager"]
    assert all(step["same_tokens_as_eager"] for step in ours["decode_steps"].values())
    assert ours["decode_tokens_per_s"] == ours["decode_steps"]["packaged"]["tokens_per_s"]
    assert set(ours["decode_breakdown_ms"]) == {"packed_linears", "other_ops", "python"}
    assert ours["decode_breakdown_ms"]["packed_linears"] > 0 and ours["decode_breakdown_ms"]["other_ops"] > 0
    for r in runs.values():
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0, r["name"]
        assert r["bitnet_ao_speedup_decode"] == pytest.approx(r["decode_s"] / runs["bitnet_ao packed"]["decode_s"])
    n = results["settings"]["block_parameters"]
    bytes_per_weight = {"TQ2_0": 66 / 256, "TQ1_0": 54 / 256, "F16": 2}  # ggml's block sizes
    for kind, per in bytes_per_weight.items():
        r = runs[f"llama.cpp {kind}"]
        assert r["block_weight_bytes"] == n * per, kind
        assert r["logits_rel_error"] < 0.05 and r["logits_argmax_agrees"], (kind, r["logits_rel_error"])
        assert r["llama_perf_prefill_tokens_per_s"] > 0 and r["llama_perf_decode_tokens_per_s"] > 0
    linears = 7 * results["model"]["n_layers"]
    assert runs["bitnet_ao packed"]["block_weight_bytes"] == n // 4 + 4 * linears  # 2 bits + a float32 scale


#: Top-2 logit margin below which llama.cpp's one-token decode and its batched prefill may order the two differently
#: (other kernels, other summation orders; on one thread they agree bit for bit).
NEAR_TIE = 1e-3


@pytest.mark.slow
def test_llama_decode_loop_continues_its_prompt(tmp_path: Path) -> None:
    """The timed llama.cpp decode loop feeds each token back at the next position: every token it generated is the
    argmax after a prefill of the sequence before it. Checked where the top two logits are not a near-tie, and
    most positions must be so, or the check would say nothing."""
    pytest.importorskip("llama_cpp")
    from bitnet_ao.integrations.gguf import save_gguf

    args = bench_gguf.parse_args(["--quick"])
    config = bench_gguf.model_config(args)
    _, packed = bench_gguf.build_bitnet(config, torch.float32)
    save_gguf(packed, tmp_path / "model.gguf", ternary_type="TQ2_0", embedding_type="F16")
    llm = bench_gguf.load_llama(tmp_path / "model.gguf", 1, args.prompt + args.new_tokens)
    tokens = bench_gguf.llama_generate(llm, [7], args.new_tokens)
    assert len(tokens) == args.new_tokens
    clear = []  # (position, whether the prefill's argmax is the generated token) where the margin is clear
    for i, token in enumerate(tokens):
        logits = bench_gguf.llama_prefill(llm, [7, *tokens[:i]])
        top2 = np.sort(logits)[-2:]
        if top2[1] - top2[0] > NEAR_TIE:
            clear.append((i, int(np.argmax(logits)) == token))
    assert len(clear) >= 0.75 * len(tokens), f"near-ties at {len(tokens) - len(clear)} of {len(tokens)} positions"
    assert all(agrees for _, agrees in clear), [i for i, agrees in clear if not agrees]
    assert bench_gguf.llama_generate(llm, [7], args.new_tokens) == tokens, "reset() empties the cache"


class _LinearOutputs(TorchDispatchMode):
    """The outputs of every C++ decode linear called under it, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.bitnet_ao.packed_linear.default:
            self.outputs.append(out.clone())
        return out


def test_the_decode_breakdown_replays_every_block_linear_of_a_token() -> None:
    """The linears' share is timed on what one decode step calls: the C++ decode linear once per block linear, with
    the step's own arguments (the replay gives the step's outputs), and nothing else."""
    from bitnet_ao.kernels import cpu_ops

    if not cpu_ops.available():
        pytest.skip("no C++ compiler: the decode linear is not registered")
    config = ModelConfig(vocab_size=256, **bench_gguf.PRESETS["quick"])
    _, packed = bench_gguf.build_bitnet(config, torch.float32)
    cache = KVCache(config, 1, torch.float32, "cpu")
    with torch.inference_mode():
        packed(torch.zeros(1, 3, dtype=torch.long), cache=cache)
        with bench_gguf._PackedLinearCalls() as recorded, _LinearOutputs() as seen:
            packed(torch.ones(1, 1, dtype=torch.long), cache=cache)
        replayed = [torch.ops.bitnet_ao.packed_linear(*args) for args in recorded.calls]
    assert len(recorded.calls) == len(bench_gguf.block_linears(packed)) == len(seen.outputs)
    assert all(torch.equal(r, o) for r, o in zip(replayed, seen.outputs, strict=True))
