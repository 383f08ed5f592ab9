"""Train the same small Llama as the hardware's dense baseline and as a BitNet b1.58 model, and compare.

    python benchmarks/pretrain.py                      # the comparison, 3-5 minutes on a 2-core CPU
    python benchmarks/pretrain.py --quantize bitnet --no-int8-grad-weight --steps 200
    python benchmarks/pretrain.py --dtype float32      # FP32 baseline whatever the hardware
    python benchmarks/pretrain.py --preset llama2-1b   # GPU

The baseline trains as a user of this hardware would (``benchmarks/hardware.py``, ``--dtype auto``): float32
master weights under bfloat16 autocast on CUDA and on CPUs that multiply BF16 natively (AVX-512 BF16, AMX), plain
float32 without autocast on other CPUs (AVX2 only: a BF16 matmul there is scalar code, and beating it would mean
nothing). Both runs use the same data, seed, initial weights and precision; BitNet linears run their INT8 matmuls
and return the activation dtype. The BitNet run first applies the BitNet model changes (``bitnet_ao.surgery``,
``--no-surgery`` to skip), then ``quantize_`` on every block linear; embeddings and the output head stay in high
precision. ``--save-hf`` / ``--save-gguf`` write the trained BitNet model for transformers / llama.cpp.

In float32 the ``cpu-default`` preset trains less (its ``fp32`` settings: 24 steps of 8 sequences instead of 50
of 16) so that the comparison still ends within 5 minutes on the slowest AVX2 CPU it meets (AMD Zen 1: FP32
matmuls at 52-70 GFLOPS, 128-bit datapaths), the same step count on every AVX2 CPU; ``--steps``,
``--batch-size`` and ``--eval-every`` still win.

Every run trains in ``benchmarks/training_loop.py`` (AdamW, warmup + cosine LR, evaluation, and how throughput,
memory and the step profile are measured); this script decides the runs, builds their models, exports the trained
BitNet models asked for and writes ``results.json`` and ``loss_curves.png`` to ``--out`` (``benchmarks/report.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

if not __package__:  # run as `python benchmarks/pretrain.py`: make the `benchmarks` package importable,
    # after site-packages so that the checkout's `kernels/` folder never shadows the Hub `kernels` package
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn
from torchao.quantization import quantize_

from benchmarks import hardware, report, training_loop
from benchmarks.data import DEFAULT_MAX_BYTES, VOCAB_SIZE, ByteDataset, load_corpus
from benchmarks.memory import peak_memory_note
from benchmarks.model import ModelConfig, Transformer, generate, to_hf_llama
from benchmarks.presets import TRAINING_PRESETS as PRESETS
from bitnet_ao import BitNetTrainingConfig, bitnet_inference, bitnet_training
from bitnet_ao.surgery import apply_bitnet_norms, quantize_filter
from bitnet_ao.tensor_parallel import quantize_for_tensor_parallel

# --- config: the command line and the runs it asks for -------------------------------------------------------


def preset_settings(name: str, dtype: str) -> dict:
    """The training settings of preset ``name`` for runs in ``dtype`` (a torch dtype name): the preset's dict for
    that dtype, if any, over its defaults. The model shape and the per-dtype dicts themselves are left out."""
    preset = PRESETS[name]
    merged = {**preset, **preset.get(hardware.short_name(dtype), {})}
    return {key: value for key, value in merged.items() if not isinstance(value, dict)}


#: ``BitNetTrainingConfig`` fields that are no flag: each linear's scale groups lie along its tensor-parallel dimension.
PER_LINEAR_FIELDS = ("group_dim",)


def recipe_fields() -> list[dataclasses.Field]:
    """The ``BitNetTrainingConfig`` fields a run sets: one flag each, one ``RunSpec.recipe`` field each."""
    return [f for f in dataclasses.fields(BitNetTrainingConfig) if f.name not in PER_LINEAR_FIELDS]


def add_recipe_flags(p: argparse.ArgumentParser) -> None:
    """A flag per recipe field, with the field's type, default and help (``bitnet_ao/config.py``), so that a new
    recipe option is a flag without a change here."""
    group = p.add_argument_group(
        "BitNet recipe (bitnet_training)",
        "Each linear's scale groups lie along its tensor-parallel dimension: --scale-groups G is the\n"
        "single-device twin of a tensor-parallel run of any degree dividing G (docs/tensor_parallel.md).",
    )
    hints = typing.get_type_hints(BitNetTrainingConfig)
    for f in recipe_fields():
        flag, kind, help_text = f"--{f.name.replace('_', '-')}", hints[f.name], f.metadata["help"]
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif typing.get_origin(kind) is typing.Literal:
            group.add_argument(flag, choices=typing.get_args(kind), default=f.default, help=help_text)
        else:
            group.add_argument(flag, type=kind, default=f.default, help=help_text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with ``--dtype auto`` resolved for ``--device`` and the training settings not given filled in
    from ``--preset`` for that dtype (flags win over presets)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-default", help="model size and training length")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quantize", choices=("none", "bitnet"), help="train one model (default: the comparison)")
    mode.add_argument("--compare", action="store_true", help="baseline vs BitNet (the default)")
    mode.add_argument("--ablate", action="store_true", help="the comparison plus BitNet without surgery, "
                      "with the subln placement, and with a high-precision backward")  # fmt: skip
    p.add_argument("--dtype", choices=hardware.DTYPE_CHOICES, default="auto",
                   help="activations of every run: bfloat16 autocast, or float32 without autocast; auto: "
                   "bfloat16 on CUDA or a CPU with native BF16, float32 otherwise; in float32 cpu-default trains "
                   "less (see above)")  # fmt: skip
    add_recipe_flags(p)
    bool_flag = argparse.BooleanOptionalAction
    p.add_argument("--surgery", action=bool_flag, default=True, help="BitNet norms (bitnet_ao.surgery)")
    p.add_argument("--placement", choices=("faq", "subln"), default="faq", help="where the surgery puts norms")
    p.add_argument("--compile", action=bool_flag, default=None, help="torch.compile the model (preset default)")
    p.add_argument("--steps", type=int, help="training steps (default: the preset's, for the dtype)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default: the preset's, for the dtype)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate (AdamW, warmup + cosine)")
    p.add_argument("--eval-every", type=int, help="steps between validation losses")
    p.add_argument("--eval-batches", type=int, help="validation batches per evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", nargs="+", help="text files or globs, or a Hugging Face dataset name "
                   "(default: the Python standard library's source)")  # fmt: skip
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="cap on the corpus size")
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for results.json and loss_curves.png")
    p.add_argument(
        "--save-hf",
        action="store_true",
        help="also write each trained BitNet model to OUT/hf-RUN as a "
        "Hugging Face BitNet checkpoint (transformers' AutoModelForCausalLM loads it; docs/huggingface.md)",
    )
    p.add_argument("--save-gguf", type=Path, metavar="PATH", help="also write the BitNet run's model to PATH as a "
                   "GGUF file llama.cpp runs (checked before training: --no-surgery, dims multiples of 256; "
                   "docs/gguf.md)")  # fmt: skip
    p.add_argument("--gguf-type", choices=("TQ2_0", "TQ1_0"), default="TQ2_0",
                   help="--save-gguf's ternary type: TQ2_0 2.06 bits per weight, TQ1_0 1.69")  # fmt: skip
    args = p.parse_args(argv)
    # Stored by name, as the flag spells it: the arguments go to results.json as they are.
    args.dtype = str(hardware.resolve_dtype(args.dtype, args.device)).removeprefix("torch.")
    for key, value in preset_settings(args.preset, args.dtype).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if args.save_gguf is not None:
        check_gguf_export(p, args)
    return args


def preset_model_config(args: argparse.Namespace) -> ModelConfig:
    """The model every run trains: the preset's shape, the byte vocabulary, ``--seq-len`` positions."""
    return ModelConfig(vocab_size=VOCAB_SIZE, max_seq_len=args.seq_len, **PRESETS[args.preset]["model"])


def check_gguf_export(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--save-gguf``: refuse now, not after training, a BitNet run whose model llama.cpp cannot run: the run's
    model is built on the meta device (no memory, no values) and given ``save_gguf``'s structural checks."""
    from bitnet_ao.integrations.gguf import gguf_architecture

    spec = next((s for s in run_specs(args) if s.name == "bitnet"), None)
    if spec is None:
        p.error("--save-gguf writes the BitNet run, and --quantize none trains none")
    with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):  # its surgery report comes with the run
        model = build_model(spec, preset_model_config(args), args.seed, torch.device("meta"))
    try:
        gguf_architecture(model)
    except ValueError as e:
        reason = str(e).removeprefix("save_gguf: ")
        p.error(
            f"--save-gguf: {reason}. The benchmark model (untied head, SwiGLU) exports without norm surgery "
            "(--no-surgery) and with dims that are multiples of 256 (--preset cpu-default)"
        )


@dataclass(frozen=True)
class RunSpec:
    """One training run: the dense baseline (``quantize=False``) or BitNet with its ``recipe`` (with scale groups,
    each linear's along its tensor-parallel dimension), with activations in ``dtype`` (a torch dtype name)."""

    name: str
    quantize: bool
    recipe: BitNetTrainingConfig = field(default_factory=bitnet_training)
    surgery: str | None = None  # a bitnet_ao.surgery placement, or None for no surgery
    dtype: str = "bfloat16"

    @property
    def label(self) -> str:
        """The run in words, for the plot's legend; the baseline is named after its dtype ("FP32"), as is a
        backward that is not INT8, so that a reader sees which precision BitNet is compared against."""
        dense = hardware.short_name(self.dtype).upper()
        if not self.quantize:
            return dense
        recipe = self.recipe
        backward = {(True, True): "INT8 bwd", (False, False): f"{dense} bwd"}.get(
            (recipe.int8_grad_input, recipe.int8_grad_weight),
            f"INT8 bwd ({'grad_input' if recipe.int8_grad_input else 'grad_weight'} only)",
        )
        norms = {"faq": "FAQ norms", "subln": "subln norms", None: "no surgery"}[self.surgery]
        weights = "b1.58" if recipe.weights == "ternary" else "binary"
        return f"BitNet {weights}, {backward}, {norms}"


def run_specs(args: argparse.Namespace) -> list[RunSpec]:
    """The runs asked for: the comparison unless ``--quantize`` names a single one.

    The one place that decides the runs and their order; the first run that is not quantized is the baseline the
    report's "vs <baseline>" column divides by (``report.baseline``). Every run uses ``args.dtype``; the baseline
    and the high-precision backward are named after it ("fp32", "bitnet-fp32-backward")."""
    dense = hardware.short_name(args.dtype)
    baseline = RunSpec(dense, quantize=False, dtype=args.dtype)
    surgery = args.placement if args.surgery else None
    recipe = bitnet_training(**{f.name: getattr(args, f.name) for f in recipe_fields()})
    bitnet = RunSpec("bitnet", True, recipe, surgery, args.dtype)
    if args.ablate:
        return [
            baseline,
            bitnet,
            dataclasses.replace(bitnet, name="bitnet-no-surgery", surgery=None),
            dataclasses.replace(bitnet, name="bitnet-subln", surgery="subln"),
            dataclasses.replace(
                bitnet,
                name=f"bitnet-{dense}-backward",
                recipe=dataclasses.replace(recipe, int8_grad_input=False, int8_grad_weight=False),
            ),
        ]
    if args.quantize is None or args.compare:
        return [baseline, bitnet]
    return [bitnet] if args.quantize == "bitnet" else [baseline]


# --- the model -------------------------------------------------------------------------------------------------


def build_model(spec: RunSpec, model_config: ModelConfig, seed: int, device: torch.device) -> nn.Module:
    """The model of one run, from the same seeded initial weights, with the BitNet changes ``spec`` asks for."""
    torch.manual_seed(seed)  # the same initial weights for every run
    model = Transformer(model_config).to(device)
    if spec.quantize:
        if spec.surgery:
            print(apply_bitnet_norms(model, spec.surgery).summary)
        if spec.recipe.grouped:  # the single-device twin of a TP run: each linear grouped along its TP dimension
            quantize_for_tensor_parallel(model, spec.recipe, spec.recipe.scale_groups, filter_fn=quantize_filter)
        else:
            quantize_(model, spec.recipe, filter_fn=quantize_filter)
    return model


def measurement_notes(device: torch.device, compile: bool) -> dict[str, str]:
    """How each figure of a run is measured, keyed like the figures: printed under the table, saved in the JSON.

    Built from the constants of the code that measures (``training_loop``, ``memory``), so that a change to a
    measurement changes its description."""
    profiled = training_loop.PROFILED_STEPS
    profile = f"torch.profiler over steps {profiled.start + 1}-{profiled.stop} (warm, not timed)"
    if device.type == "cpu" and not compile:
        profile = (
            f"int8 GEMMs, BitNet's passes and the step timed around BitNet's ranges over the timed steps, with no "
            f"profiler; float GEMMs from {profile}"
        )
    return {
        "final_train_loss": f"mean of the last {training_loop.FINAL_LOSS_WINDOW} steps",
        "tokens_per_s": f"steps after the first {training_loop.TIMING_WARMUP}, evaluation excluded",
        "peak_memory_mb": peak_memory_note(device),
        "step_profile": f"{profile}: int8 GEMMs / BitNet's own passes (quantization, ternarization, fused norms, "
        "output scaling, prepacks, conversions) / float GEMMs outside BitNet ops / the rest",
    }


# --- exports of a trained BitNet run --------------------------------------------------------------------------


#: The evaluation-time sample after each run: greedy tokens after a validation prompt of this many bytes (each at
#: most half the model's context).
SAMPLE_PROMPT, SAMPLE_TOKENS = 32, 32


def sample(model: nn.Module, spec: RunSpec, data: ByteDataset, device: torch.device) -> dict:
    """What evaluation during training generates, timed: ``SAMPLE_TOKENS`` greedy tokens after a validation
    prompt, through the model as it trains (a BitNet model without a gradient runs its packed forward, prepared
    once per weight version), and for BitNet whether a ``bitnet_inference`` copy gives the same tokens."""
    half = model.config.max_seq_len // 2
    prompt = data.val[: min(SAMPLE_PROMPT, half)].long().unsqueeze(0).to(device)
    new_tokens = min(SAMPLE_TOKENS, half)
    dtype = getattr(torch, spec.dtype)
    model.eval()
    with training_loop.autocast(device, dtype):
        generate(model, prompt, 2, dtype)  # warm-up: the packed weights are prepared here
        start = time.perf_counter()
        tokens = generate(model, prompt, new_tokens, dtype)
        seconds = time.perf_counter() - start
        text = bytes(tokens[0].tolist()).decode("utf-8", "replace")
        result = {"new_tokens": new_tokens, "tokens_per_s": new_tokens / seconds, "text": text}
        if spec.quantize and not spec.recipe.grouped:
            packed = copy.deepcopy(model)
            quantize_(packed, bitnet_inference(), filter_fn=quantize_filter)
            result["same_tokens_as_packed"] = torch.equal(generate(packed, prompt, new_tokens, dtype), tokens)
    model.train()
    return result


def export(model: nn.Module, spec: RunSpec, args: argparse.Namespace, data: ByteDataset) -> None:
    """``--save-hf`` (every BitNet run) and ``--save-gguf`` (the ``bitnet`` run, then run by llama.cpp)."""
    if args.save_hf and spec.quantize:
        from bitnet_ao.integrations.transformers import save_pretrained_bitnet

        print(f"wrote {save_pretrained_bitnet(to_hf_llama(model), args.out / f'hf-{spec.name}')}")
    if args.save_gguf is not None and spec.name == "bitnet":
        from bitnet_ao.integrations.gguf import save_gguf

        print(f"wrote {save_gguf(model, args.save_gguf, args.gguf_type)}")
        check_with_llama_cpp(model, args.save_gguf, data)


def check_with_llama_cpp(model: nn.Module, path: Path, data: ByteDataset) -> None:
    """``--save-gguf``'s proof: stock llama.cpp (llama-cpp-python, when installed) runs the file and generates
    what the trained model generates: 64 tokens after the first 64 bytes of the validation text (fewer when
    ``--seq-len`` is under 128; docs/gguf.md)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed (pip install llama-cpp-python): the GGUF file was not run")
        return
    from benchmarks.llama_cpp_runs import llama_cpp_agreement

    half = min(64, model.config.max_seq_len // 2)  # prompt and generated tokens within the trained positions
    r = llama_cpp_agreement(model.eval(), path, data.val[:half].tolist(), new_tokens=half)
    print(
        f"llama.cpp on {path.name}: greedy agreement with bitnet_ao over {r['new_tokens']} tokens "
        f"{r['free_agreement']:.1%} generating alone, {r['forced_agreement']:.1%} fed bitnet_ao's tokens; "
        f"logits rel. error {r['logits_rel_error']:.2e} (worst step)"
    )


# --- the script ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[dict]:
    """Train every run asked for on the same data (the same batches: one seed), export the BitNet runs asked for,
    then report; returns the runs (for tests)."""
    args = parse_args(argv)
    model_config = preset_model_config(args)
    corpus, source = load_corpus(args.data, args.max_bytes)
    data = ByteDataset(corpus, args.seq_len)
    device = torch.device(args.device)
    print(report.headline(args))
    print(f"data: {source}, {len(data.train):,} training and {len(data.val):,} validation bytes")
    print(f"model: {model_config}; {args.steps} steps of {args.batch_size} x {args.seq_len} tokens on {device}")

    runs = []
    for spec in run_specs(args):
        model = build_model(spec, model_config, args.seed, device)
        figures = training_loop.train(
            model,
            data.train_batches(args.batch_size, [(args.steps, args.seed)]),
            data.val_batches(args.batch_size, args.eval_batches),
            steps=args.steps,
            lr=args.lr,
            eval_every=args.eval_every,
            device=device,
            dtype=getattr(torch, spec.dtype),
            compile=args.compile,
            profile=True,
            name=spec.name,
        )
        figures["sample"] = sample(model, spec, data, device)
        runs.append({"name": spec.name, "label": spec.label, "spec": dataclasses.asdict(spec), **figures})
        export(model, spec, args, data)
        del model  # before the next run's model is built: each run's peak memory is its own

    report.write(runs, measurement_notes(device, args.compile), args, model_config, source)
    return runs


if __name__ == "__main__":
    main()
