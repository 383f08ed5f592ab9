"""bitnet_ao's packed inference against llama.cpp on the same CPU: same model, same threads, same tokens (issue #21).

Why: ``bench_inference.py`` compares the packed model with the dense one a user of the hardware would deploy; a
user who only wants to *run* a ternary model on a CPU would pick llama.cpp, whose TQ2_0 / TQ1_0 types store
ternary weights too. This script measures bitnet_ao where that choice is made.

One model, a plain Llama block (``benchmarks/model.py``: RMSNorm pre-norms, rotary embeddings, SwiGLU, no BitNet
surgery, so that llama.cpp's ``llama`` architecture runs exactly the same network), random weights (speed does not
depend on their values), ternarized by ``quantize_``:

- ``bitnet_ao packed``: ``quantize_(model, bitnet_inference())`` as ``bench_inference.py`` builds it (2-bit block
  linears, per-token int8 activations), in the hardware's baseline dtype (``--dtype auto``: FP32 on AVX2 CPUs);
- ``llama.cpp TQ2_0`` / ``TQ1_0``: the same model exported by ``bitnet_ao.integrations.gguf.save_gguf`` (block
  linears in llama.cpp's ternary types, 2.06 / 1.69 bits per weight, the embedding and output head in F16);
- ``llama.cpp F16``: that file with the ternary tensors rewritten as F16 (the dense format llama.cpp users run).

Run through llama-cpp-python (``Llama(path, n_threads=T, n_threads_batch=T, n_batch=512)``), in this process,
the variants timed in turn round by round (``timing.measure``). Both sides use ``--threads`` T threads (default:
every core): ``torch.set_num_threads(T)`` and llama.cpp's ``n_threads``.

- Prefill: ``--prompt`` tokens (512) in one forward into an empty KV cache, the last position's logits read back
  (bitnet_ao: ``model(prompt, cache=...)``, the cache allocated once; llama.cpp: ``llm.reset(); llm.eval(...)``).
- Decode: ``--new-tokens`` (128) greedy steps from an empty cache, one token per forward, argmax of the logits
  fed back (bitnet_ao: ``model.generate`` with the decode step exported and compiled ahead of time,
  ``model.PackagedDecodeStep``; the ``torch.compile`` step and the eager one are printed below the table;
  llama.cpp: ``llm.eval([token])`` in a loop).
- Tokens/s are medians over ``--iters`` runs after one warmup; the ratio columns are bitnet_ao's tokens/s over
  each row's (above 1: bitnet_ao is faster). llama.cpp's own timer (``llama_perf_context``: the time inside
  ``llama_decode``, without the Python binding) is shown beside the wall clock.
- Checks: the packed model decodes the training model's greedy tokens (bit-exact packed inference), and each
  llama.cpp file's last-position logits after the prompt are close to bitnet_ao's (relative L2 error; llama.cpp
  quantizes activations per block of 256 values to Q8_K, bitnet_ao per token to int8, so they are not equal).

    python benchmarks/bench_gguf.py                        # 103M parameters, ~3 minutes on 2 cores
    python benchmarks/bench_gguf.py --threads 1 --iters 3
    python benchmarks/bench_gguf.py --quick                # a smoke run in seconds (tests/test_bench_gguf.py)

Needs ``pip install llama-cpp-python gguf``. Writes ``bench_gguf.json`` (``report.run_metadata`` first) to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if not __package__:  # run as `python benchmarks/bench_gguf.py`: make the `benchmarks` package importable,
    # after site-packages so that the checkout's `kernels/` folder never shadows the Hub `kernels` package
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import hardware, report
from benchmarks.bench_inference import block_linears, block_weight_bytes, build_variants
from benchmarks.data import VOCAB_SIZE
from benchmarks.llama_cpp_runs import llama_generate, llama_prefill, llama_timer, load_llama, logits_error
from benchmarks.model import CompiledDecodeStep, KVCache, ModelConfig, PackagedDecodeStep, generate
from benchmarks.presets import GGUF_PRESETS as PRESETS
from benchmarks.timing import measure

#: The run's size when no flag says otherwise, and what ``--quick`` makes of it (explicit flags still win).
DEFAULTS = dict(preset="default", prompt=512, new_tokens=128, iters=5)
QUICK = dict(preset="quick", prompt=64, new_tokens=16, iters=1)

#: The llama.cpp files compared: the two ternary types of the exporter, and F16 (rewritten from TQ2_0).
GGUF_TYPES = ("TQ2_0", "TQ1_0", "F16")


#: Untimed pause after each timed call: OpenMP workers (torch's and llama.cpp's runtimes are two) spin for a few ms
#: after a parallel region; the next variant should not start on cores they are still spinning on.
SETTLE_S = 0.05

BITNET = "bitnet_ao packed"


# --- the model --------------------------------------------------------------------------------------------------


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """All parameters of ``model`` and those of its block linears' weights (``bench_inference.block_linears``: what
    is ternary on both sides), counted as logical shapes: packed, master or dense weights count alike."""
    return sum(p.numel() for p in model.parameters()), sum(m.weight.numel() for m in block_linears(model))


def model_config(args: argparse.Namespace) -> ModelConfig:
    from bitnet_ao.integrations.gguf import BLOCK  # the exporter's block, llama.cpp's QK_K (needs the gguf package)

    shape = {**PRESETS[args.preset]}
    for flag, field in (("dim", "dim"), ("layers", "n_layers"), ("heads", "n_heads"), ("hidden", "hidden_dim")):
        if getattr(args, flag) is not None:
            shape[field] = getattr(args, flag)
    if shape["dim"] % BLOCK or shape["hidden_dim"] % BLOCK:
        raise SystemExit(
            f"bench_gguf: --dim and --hidden must be multiples of {BLOCK} (llama.cpp's TQ blocks): {shape}"
        )
    # Rounded up to llama.cpp's context padding (256), which otherwise warns that n_ctx exceeds the trained length.
    max_seq_len = -(-(args.prompt + args.new_tokens) // 256) * 256
    return ModelConfig(vocab_size=VOCAB_SIZE, max_seq_len=max_seq_len, **shape)


def build_bitnet(config: ModelConfig, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """The BitNet training model (master weights, INT8 forward) and its packed twin, without the surgery."""
    variants = build_variants(config, dtype, "cpu", surgery=False)
    return variants["bitnet training weights"], variants["bitnet packed"]


class _PackedLinearCalls(TorchDispatchMode):
    """Records the arguments of every call of the op bitnet_ao::packed_linear that runs under it (on a decode step:
    its C++ kernel, one C call per block linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.bitnet_ao.packed_linear.default:
            self.calls.append(tuple(a.clone() if isinstance(a, Tensor) else a for a in args))
        return func(*args, **(kwargs or {}))


@torch.inference_mode()
def decode_breakdown(model: nn.Module, step: Callable, dtype: torch.dtype, tokens: int) -> dict[str, float]:
    """Milliseconds per decoded token, wall clock and no profiler (whose own cost per operator call would land in the
    share outside the matmuls), split three ways:

    - ``packed_linears``: the packed linear (norm, quantization, matmul, epilogue: its C++ kernel) of every block
      linear: one token's calls replayed back to back, with the arguments an eager step passed them;
    - ``other_ops``: the rest of ``step`` (attention, RoPE, residual adds, cache writes, the head, the runner);
    - ``python``: the generation loop around the step (argmax, the cache bookkeeping).

    Each token times its step, its loop and a replay of its linears in turn, and each figure is the median over the
    tokens, so that a slower moment of the machine hurts all three alike. Replayed back to back, the linears find
    their inputs in cache at least as often as in the step: the share outside them is, if anything, overstated."""
    cache = KVCache(model.config, 1, dtype, "cpu")
    token = model(torch.zeros(1, 1, dtype=torch.long), cache=cache)[:, -1:].argmax(-1)
    with _PackedLinearCalls() as recorded:
        model(token, cache=cache)  # one eager decode step, for its linears' arguments
    token = step(token, cache)[:, -1:].argmax(-1)  # warm
    linear = torch.ops.bitnet_ao.packed_linear
    seconds: dict[str, list[float]] = {"step": [], "loop": [], "packed_linears": []}
    for _ in range(tokens):
        t0 = time.perf_counter()
        logits = step(token, cache)
        t1 = time.perf_counter()
        token = logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
        for args in recorded.calls:
            linear(*args)
        t3 = time.perf_counter()
        seconds["step"].append(t1 - t0), seconds["loop"].append(t2 - t0), seconds["packed_linears"].append(t3 - t2)
    ms = {name: float(np.median(values)) * 1e3 for name, values in seconds.items()}
    return {
        "packed_linears": ms["packed_linears"],
        "other_ops": ms["step"] - ms["packed_linears"],
        "python": ms["loop"] - ms["step"],
    }


@torch.inference_mode()
def prefill(model: nn.Module, prompt: Tensor, cache: KVCache) -> Tensor:
    """The prompt into an emptied KV cache; the last position's logits (what generation reads next)."""
    cache.length = 0
    return model(prompt, cache=cache)[0, -1]


# --- llama.cpp --------------------------------------------------------------------------------------------------


def export_ggufs(packed: nn.Module, folder: Path) -> dict[str, Path]:
    """The packed model as one GGUF file per ``GGUF_TYPES`` entry."""
    from bitnet_ao.integrations.gguf import save_gguf

    files = {}
    for kind in ("TQ2_0", "TQ1_0"):
        files[kind] = folder / f"model-{kind}.gguf"
        save_gguf(packed, files[kind], ternary_type=kind, embedding_type="F16")
    files["F16"] = folder / "model-F16.gguf"
    write_f16_copy(files["TQ2_0"], files["F16"])
    return files


def write_f16_copy(src: Path, dst: Path) -> None:
    """``src`` with its TQ1_0 / TQ2_0 tensors dequantized to F16 (exact: ternary values times an F16 block scale);
    metadata and other tensors copied as they are."""
    import gguf

    ternary = (gguf.GGMLQuantizationType.TQ1_0, gguf.GGMLQuantizationType.TQ2_0)
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = gguf.LlamaFileType.MOSTLY_F16
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    for t in reader.tensors:
        if t.tensor_type in ternary:
            writer.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float16))
        else:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_block_bytes(path: Path) -> int:
    """Bytes of the block linears' weights in a GGUF file (``blk.N.*.weight`` matrices; the norms are vectors)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if t.name.startswith("blk.") and len(t.shape) == 2)


# --- the script -------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="model shape (default: default, quick with --quick)")
    p.add_argument("--dim", type=int, help="override the preset's width (a multiple of 256)")
    p.add_argument("--layers", type=int, help="override the preset's number of blocks")
    p.add_argument("--heads", type=int, help="override the preset's attention heads")
    p.add_argument("--hidden", type=int, help="override the preset's SwiGLU width (a multiple of 256)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads on both sides (default: all cores)")
    p.add_argument("--prompt", type=int, help="prefill tokens (default 512)")
    p.add_argument("--new-tokens", type=int, help="decode steps (default 128)")
    p.add_argument("--iters", type=int, help="timed runs per variant, median reported (default 5)")
    p.add_argument("--dtype", default="auto", choices=hardware.DTYPE_CHOICES, help="bitnet_ao's activation dtype")
    p.add_argument("--quick", action="store_true", help=f"smoke size, seconds: {QUICK}")
    p.add_argument("--out", type=Path, default=Path("results/gguf"), help="folder for bench_gguf.json")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.device = "cpu"  # llama.cpp's CPU backend: the comparison is on the CPU
    args.dtype = str(hardware.resolve_dtype(args.dtype, args.device)).removeprefix("torch.")
    return args


#: bitnet_ao's decode steps as the report names them.
DECODE_STEPS = {
    "packaged": "AOTInductor package (model.PackagedDecodeStep, the table's row)",
    "compiled": "torch.compile (model.CompiledDecodeStep)",
    "eager": "eager",
}


def time_variants(
    packed: nn.Module, steps: dict, llms: dict, prompt: Tensor, cache: KVCache, args: argparse.Namespace
) -> tuple[list[float], list[float], list[float], dict[str, dict[str, list[float]]]]:
    """Median wall seconds of a prefill and of a decode run of bitnet_ao packed (its decode through the first of
    ``steps``), then of each llama.cpp file, the variants in turn; the decode seconds of every one of ``steps``; and
    llama.cpp's own tokens/s of the timed calls, by file and kind."""
    tokens = prompt[0].tolist()
    dtype = getattr(torch, args.dtype)
    perf: dict[str, dict[str, list[float]]] = {kind: {"prefill": [], "decode": []} for kind in llms}
    prefills: list[Callable[[], object]] = [functools.partial(prefill, packed, prompt, cache)]
    decodes: list[Callable[[], object]] = [
        functools.partial(generate, packed, prompt[:, :1], args.new_tokens, dtype, step) for step in steps.values()
    ]
    for kind, llm in llms.items():
        run_prefill = functools.partial(llama_prefill, llm, tokens)
        run_decode = functools.partial(llama_generate, llm, tokens[:1], args.new_tokens)
        prefills.append(llama_timer(llm, run_prefill, "prefill", perf[kind]["prefill"]))
        decodes.append(llama_timer(llm, run_decode, "decode", perf[kind]["decode"]))
    settle = functools.partial(time.sleep, SETTLE_S)
    t_prefill = measure(*prefills, warmup=1, iters=args.iters, after=settle)
    t_decode = measure(*decodes, warmup=1, iters=args.iters, after=settle)
    for figures in perf.values():  # drop the warmup call's figure, as measure does
        figures["prefill"], figures["decode"] = figures["prefill"][1:], figures["decode"][1:]
    ours = len(steps)
    return t_prefill, [t_decode[0], *t_decode[ours:]], t_decode[:ours], perf


def main(argv: list[str] | None = None) -> dict:
    """Build, export, time, check, print the table and write the JSON; returns the JSON's content."""
    import llama_cpp

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = model_config(args)
    dtype = getattr(torch, args.dtype)
    training, packed = build_bitnet(config, dtype)
    n_params, n_block = parameter_counts(training)
    torch.manual_seed(1)
    prompt = torch.randint(0, VOCAB_SIZE, (1, args.prompt))
    tokens = prompt[0].tolist()
    cache = KVCache(config, 1, dtype, "cpu")
    print(hardware.summary(args.device))
    print(
        f"model: dim {config.dim}, {config.n_layers} layers, {config.n_heads} heads, hidden {config.hidden_dim}, "
        f"vocab {config.vocab_size}: {n_params / 1e6:.1f}M parameters ({n_block / 1e6:.1f}M "
        f"in block linears); threads {args.threads}; prompt {args.prompt}; new tokens {args.new_tokens}; "
        f"bitnet_ao in {args.dtype}"
    )

    with tempfile.TemporaryDirectory(prefix="bench_gguf_") as folder:
        files = export_ggufs(packed, Path(folder))
        llms = {kind: load_llama(path, args.threads, config.max_seq_len) for kind, path in files.items()}
        # bitnet_ao's decode steps, the fastest first: it is the table's row (model.py).
        steps = {
            "packaged": PackagedDecodeStep.package(packed, Path(folder) / "decode.pt2", dtype=dtype),
            "compiled": CompiledDecodeStep(packed),
            "eager": None,
        }
        t_prefill, t_decode, t_steps, perf = time_variants(packed, steps, llms, prompt, cache, args)
        # Checks: packed = training (bit-exact), every decode step = eager; llama.cpp's logits close to bitnet_ao's.
        eager_tokens = generate(packed, prompt[:, :1], args.new_tokens, dtype)
        same_tokens = torch.equal(eager_tokens, generate(training, prompt[:, :1], args.new_tokens, dtype))
        reference = prefill(packed, prompt, cache)
        runs = [
            {
                "name": BITNET,
                "block_weight_bytes": block_weight_bytes(packed),
                "same_tokens_as_training": same_tokens,
                "decode_steps": {
                    name: {
                        "tokens_per_s": args.new_tokens / seconds,
                        "same_tokens_as_eager": torch.equal(
                            generate(packed, prompt[:, :1], args.new_tokens, dtype, step), eager_tokens
                        ),
                    }
                    for (name, step), seconds in zip(steps.items(), t_steps, strict=True)
                },
                "decode_breakdown_ms": decode_breakdown(packed, steps["packaged"], dtype, args.new_tokens),
            }
        ]
        for kind, llm in llms.items():
            err, top1 = logits_error(reference, llama_prefill(llm, tokens))
            runs.append(
                {
                    "name": f"llama.cpp {kind}",
                    "gguf_type": kind,
                    "block_weight_bytes": gguf_block_bytes(files[kind]),
                    "file_bytes": files[kind].stat().st_size,
                    "llama_perf_prefill_tokens_per_s": float(np.median(perf[kind]["prefill"])),
                    "llama_perf_decode_tokens_per_s": float(np.median(perf[kind]["decode"])),
                    "logits_rel_error": err,
                    "logits_argmax_agrees": top1,
                }
            )
        del llms  # closes the files before the folder goes
    for run, tp, td in zip(runs, t_prefill, t_decode, strict=True):
        run.update(
            prefill_s=tp,
            decode_s=td,
            prefill_tokens_per_s=args.prompt / tp,
            decode_tokens_per_s=args.new_tokens / td,
            bitnet_ao_speedup_prefill=tp / t_prefill[0],
            bitnet_ao_speedup_decode=td / t_decode[0],
        )

    print(format_table(runs))
    print(
        "ao x: bitnet_ao packed's tokens/s over the row's (wall clock); llama timer: llama.cpp's own tokens/s of the "
        "same calls (llama_perf_context); logits err: relative L2 error against bitnet_ao's last-position logits"
    )
    print(f"packed and training weights generate the same tokens: {'yes' if same_tokens else 'NO'}")
    for name, step in runs[0]["decode_steps"].items():
        same = "yes" if step["same_tokens_as_eager"] else "NO"
        print(f"bitnet_ao decode, {DECODE_STEPS[name]}: {step['tokens_per_s']:.1f} tokens/s, the eager tokens: {same}")
    split = runs[0]["decode_breakdown_ms"]
    print(
        "bitnet_ao packaged decode, ms per token (the linears replayed alone, the rest by difference): "
        + ", ".join(f"{name.replace('_', ' ')} {ms:.2f}" for name, ms in split.items())
        + f" (outside the packed linears: {1 - split['packed_linears'] / sum(split.values()):.0%})"
    )
    notes = {
        "bitnet_ao_speedup": "bitnet_ao packed tokens/s over this row's (above 1: bitnet_ao faster), wall clock",
        "tokens_per_s": f"median of {args.iters} runs after 1 warmup, variants in turn (timing.measure), wall clock "
        "including the Python binding; llama_perf_*: llama.cpp's own timer of the same calls (llama_perf_context)",
        "block_weight_bytes": "block linears only: packed values + scales (bitnet_ao), tensor bytes (GGUF)",
        "logits_rel_error": "relative L2 error of llama.cpp's last-position logits after the prompt against "
        "bitnet_ao packed's",
        "kv_cache": "bitnet_ao: the model dtype, allocated once for prefill and by each decode run "
        "(model.generate, under 1% of it); llama.cpp: F16 (its default), no flash attention",
    }
    settings = {
        "threads": args.threads,
        "parameters": n_params,
        "block_parameters": n_block,
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip(),
    }
    results = {**report.run_metadata(args, config, "random tokens"), "settings": settings, "notes": notes, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_gguf.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out / 'bench_gguf.json'}")
    return results


def format_table(runs: list[dict]) -> str:
    header = (
        f"{'variant':<18} {'prefill tok/s':>13} {'ao x':>6} {'(llama timer)':>13} {'decode tok/s':>12} {'ao x':>6} "
        f"{'(llama timer)':>13} {'block MiB':>9} {'logits err':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in runs:
        timer_p = f"{r['llama_perf_prefill_tokens_per_s']:.0f}" if "llama_perf_prefill_tokens_per_s" in r else "-"
        timer_d = f"{r['llama_perf_decode_tokens_per_s']:.1f}" if "llama_perf_decode_tokens_per_s" in r else "-"
        err = f"{r['logits_rel_error']:.3f}" if "logits_rel_error" in r else "-"
        lines.append(
            f"{r['name']:<18} {r['prefill_tokens_per_s']:13.0f} {r['bitnet_ao_speedup_prefill']:6.2f} {timer_p:>13} "
            f"{r['decode_tokens_per_s']:12.1f} {r['bitnet_ao_speedup_decode']:6.2f} {timer_d:>13} "
            f"{r['block_weight_bytes'] / 2**20:9.2f} {err:>10}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
