"""How much of a pretrained model survives conversion to BitNet b1.58, and what recovers it (docs/finetuning.md).

    python benchmarks/finetune.py                                   # ~4-5 minutes on a 2-core CPU
    python benchmarks/finetune.py --save-teacher results/teacher.pt # keep the pretrained model ...
    python benchmarks/finetune.py --teacher results/teacher.pt      # ... and skip pretraining on reruns
    python benchmarks/finetune.py --preset cpu-default --steps 200  # the main job's 1024-wide model (slow on CPU)

The same small Llama as ``benchmarks/pretrain.py`` (its presets, corpus and models), trained in the same loop
(``benchmarks/training_loop.py``: optimizer, LR schedule, evaluation, measurements), is first pretrained in the
hardware's baseline precision (``--dtype auto``: FP32 on an AVX2-only CPU, BF16 autocast where BF16 is native).
Then a conversion budget of ``--budget`` (20%) of its pretraining tokens is spent four ways, each from a deep copy
of the same pretrained weights:

a. ``naive``: ``quantize_`` then train with the plain LM loss;
b. ``warmup``: ``quantize_`` + ``QuantizationWarmup`` over the first ``--warmup-fraction`` (50%) of the budget;
c. ``warmup-distill``: as b, with loss = LM + ``--distill-weight`` x logits distillation (T = ``--temperature``)
   from the frozen pretrained model;
d. ``scratch``: BitNet from random weights for the same total tokens (pretraining + budget): the fair baseline.

Every BitNet model gets the main job's BitNet model changes (``bitnet_ao.surgery``, ``--placement faq``) before
``quantize_``, as pretrain.py's BitNet run does. For the converted models the surgery is made as close to
function-preserving as it can be (:func:`convert`): the new per-linear norms of q/k/v and gate/up take the
gains of the pre-norms they replace, and the new norms in front of the output projections (``wo``, ``w2``, which
had none) start at the mean RMS of their input, so that a typical token passes through unchanged.

Last, LoRA on a packed base: model c is frozen into 2-bit weights (``quantize_(model, bitnet_inference())``) and
``peft`` trains rank-``--lora-rank`` adapters on its block linears, against the same LoRA on the same model with
dense weights in the baseline precision (``unquantize_``: its master weights); same steps, same batches.

Writes ``finetune.json`` and ``finetune_curves.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

if not __package__:  # run as `python benchmarks/finetune.py`: make the `benchmarks` package importable,
    # after site-packages so that the checkout's `kernels/` folder never shadows the Hub `kernels` package
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchao.quantization import quantize_

from benchmarks import hardware, pretrain, report, training_loop
from benchmarks.bench_inference import block_linears, block_weight_bytes
from benchmarks.data import DEFAULT_MAX_BYTES, VOCAB_SIZE, ByteDataset, load_corpus
from benchmarks.memory import rss_mb
from benchmarks.model import ModelConfig
from benchmarks.presets import TRAINING_PRESETS
from benchmarks.timing import measure, synchronize
from benchmarks.training_loop import lm_loss
from bitnet_ao import BitNetPackedLinearWeight, bitnet_inference, bitnet_training, unquantize_
from bitnet_ao.distill import logits_distillation_loss
from bitnet_ao.layouts import META
from bitnet_ao.surgery import apply_bitnet_norms, calibrate_bitnet_norms, quantize_filter
from bitnet_ao.warmup import QuantizationWarmup

#: Settings that replace the pretrain.py preset's for this benchmark (flags still win). The ``tiny`` preset's
#: 64-wide model is the one whose pretraining, four conversions and two LoRA runs fit in a few minutes on a
#: 2-core CPU (FP32 ~35k tokens/s, BitNet ~14k on Zen 3); ``cpu-default`` trains at ~400 (FP32) and ~200 tokens/s
#: (BitNet) there, too slow to pretrain anything worth converting in minutes.
FINETUNE_SETTINGS: dict[str, dict] = {
    "tiny": dict(steps=600, batch_size=16, seq_len=128, eval_every=30, eval_batches=8),
}
#: The runs, in table order, with the words the table and the plot use for them.
LABELS = {
    "naive": "a. naive: quantize_ + LM loss",
    "warmup": "b. quantization warmup + LM loss",
    "warmup-distill": "c. warmup + LM + logits distillation",
    "scratch": "d. BitNet from scratch (same total tokens)",
}
#: The linears LoRA adapts (peft ``target_modules``): every block linear, by its leaf name in the Meta layout
#: (benchmarks/model.py). After the surgery they are ``NormedLinear``s, linears at the same names.
LORA_TARGETS = [META.path(role).rpartition(".")[2] for role in META.block_linears]


# --- the command line ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags; training settings not given come from ``FINETUNE_SETTINGS`` over pretrain.py's preset."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(TRAINING_PRESETS), default="tiny", help="pretrain.py's model preset")
    p.add_argument("--dtype", choices=hardware.DTYPE_CHOICES, default="auto", help="as in pretrain.py")
    p.add_argument("--steps", type=int, help="pretraining steps of the full-precision model")
    p.add_argument("--batch-size", type=int, help="sequences per step, every run")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate of pretraining and of BitNet from scratch")
    p.add_argument("--eval-every", type=int, help="steps between validation losses")
    p.add_argument("--eval-batches", type=int, help="validation batches per evaluation")
    p.add_argument("--budget", type=float, default=0.2, help="conversion tokens, as a fraction of pretraining's")
    p.add_argument("--convert-lr", type=float, help="peak learning rate of the conversions (default: --lr)")
    p.add_argument("--warmup-fraction", type=float, default=0.5,
                   help="fraction of the budget over which QuantizationWarmup's lambda goes 0 -> 1")  # fmt: skip
    p.add_argument("--temperature", type=float, default=1.0, help="logits distillation temperature T")
    p.add_argument("--distill-weight", type=float, default=1.0, help="weight of the distillation loss (LM loss: 1)")
    p.add_argument("--surgery", action=argparse.BooleanOptionalAction, default=True,
                   help="BitNet norms (bitnet_ao.surgery), as pretrain.py's BitNet run")  # fmt: skip
    p.add_argument("--placement", choices=("faq", "subln"), default="faq")
    p.add_argument("--lora-steps", type=int, default=40, help="adapter training steps, each LoRA run")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--lora-timing-iters", type=int, default=10, help="interleaved timed steps of each LoRA run")
    p.add_argument("--teacher", type=Path, help="load the pretrained model from this file instead of pretraining")
    p.add_argument("--save-teacher", type=Path, help="save the pretrained model here (for --teacher)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", nargs="+", help="as in pretrain.py (default: the Python standard library's source)")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    p.add_argument("--out", type=Path, default=Path("results/finetune"), help="folder for the JSON and the plot")
    args = p.parse_args(argv)
    args.dtype = str(hardware.resolve_dtype(args.dtype, args.device)).removeprefix("torch.")
    settings = {**pretrain.preset_settings(args.preset, args.dtype), **FINETUNE_SETTINGS.get(args.preset, {})}
    for key, value in settings.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.convert_lr is None:
        args.convert_lr = args.lr  # 3x lower converted 0.3-0.7 points of gap worse (docs/finetuning.md)
    for key in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "lora_steps"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if args.budget <= 0 or not 0 <= args.warmup_fraction <= 1:
        p.error("--budget must be positive and --warmup-fraction within [0, 1]")
    return args


def budget_steps(args: argparse.Namespace) -> int:
    """Conversion steps: ``--budget`` of the pretraining steps (same batch, so the same fraction of tokens)."""
    return max(1, round(args.steps * args.budget))


# --- training -------------------------------------------------------------------------------------------------


def train(
    name: str,
    model: nn.Module,
    args: argparse.Namespace,
    data: ByteDataset,
    *,
    steps: int,
    lr: float,
    segments: list[tuple[int, int]],
    loss_fn: training_loop.LossFn = lm_loss,
    after_step: training_loop.AfterStep | None = None,
    eval_at_start: bool = False,
) -> dict:
    """Train ``model`` in place in the benchmarks' one loop, on the batches of ``segments``
    (``ByteDataset.train_batches``); returns its figures with the run's name, steps, tokens, peak LR and validation
    loss before training (``start_val_loss``, with ``eval_at_start``)."""
    figures = training_loop.train(
        model,
        data.train_batches(args.batch_size, segments),
        data.val_batches(args.batch_size, args.eval_batches),
        steps=steps,
        lr=lr,
        eval_every=args.eval_every,
        device=torch.device(args.device),
        dtype=getattr(torch, args.dtype),
        loss_fn=loss_fn,
        after_step=after_step,
        eval_at_start=eval_at_start,
        name=name,
    )
    return {
        "name": name,
        "steps": steps,
        "tokens": steps * args.batch_size * args.seq_len,
        "lr": lr,
        "start_val_loss": figures["val_losses"][0][1] if eval_at_start else None,
        **figures,
    }


def distill_loss(teacher: nn.Module, weight: float, temperature: float) -> training_loop.LossFn:
    """LM loss + ``weight`` x ``T^2 KL(teacher || student)`` per token, the teacher frozen and run without grad."""

    def loss_fn(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            teacher_logits = teacher(x)
        logits = model(x)
        lm = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())  # the model's own loss (model.py)
        return lm + weight * logits_distillation_loss(logits, teacher_logits, temperature), lm

    return loss_fn


def warmup_hook(warmup: QuantizationWarmup) -> training_loop.AfterStep:
    """The after-step hook of a warmup run: lambda's next step after each optimizer step, shown on the progress
    bar."""

    def after_step() -> dict[str, str]:
        warmup.step()
        return {"lambda": f"{warmup.strength:.2f}"}

    return after_step


# --- the pretrained model -------------------------------------------------------------------------------------


def teacher_spec(args: argparse.Namespace) -> pretrain.RunSpec:
    """pretrain.py's dense baseline run, in the baseline dtype."""
    return pretrain.RunSpec(hardware.short_name(args.dtype), quantize=False, dtype=args.dtype)


def pretrained_model(args: argparse.Namespace, model_config: ModelConfig, data: ByteDataset) -> tuple[nn.Module, dict]:
    """The full-precision model and its run: loaded from ``--teacher``, or pretrained (and saved with
    ``--save-teacher``). A saved model is only reused for the same model shape and batch settings, since the
    conversion budget is a fraction of its pretraining tokens."""
    device = torch.device(args.device)
    spec = teacher_spec(args)
    model = pretrain.build_model(spec, model_config, args.seed, device)
    identity = {
        "model": dataclasses.asdict(model_config),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "dtype": args.dtype,
        "seed": args.seed,
    }
    if args.teacher is not None:
        saved = torch.load(args.teacher, map_location=device, weights_only=True)
        if saved["identity"] != identity:
            raise SystemExit(f"--teacher {args.teacher}: saved for {saved['identity']}, this run is {identity}")
        model.load_state_dict(saved["state_dict"])
        print(f"loaded the pretrained model from {args.teacher}")
        return model, saved["run"]
    run = train(spec.name, model, args, data, steps=args.steps, lr=args.lr, segments=[(args.steps, args.seed)])
    if args.save_teacher is not None:
        args.save_teacher.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"identity": identity, "state_dict": model.state_dict(), "run": run}, args.save_teacher)
        print(f"wrote {args.save_teacher}")
    return model, run


# --- conversion -----------------------------------------------------------------------------------------------


def convert(teacher: nn.Module, args: argparse.Namespace, calibration: Tensor) -> tuple[nn.Module, dict]:
    """A BitNet training copy of the pretrained model: the main job's surgery, as close to the pretrained function
    as it goes, then ``quantize_`` on the block linears; returns it and the calibrated norm gains by linear.

    ``apply_bitnet_norms`` gives the new norms before q/k/v and gate/up the gains of the pre-norms they replace
    (the function is unchanged there); the norms before ``wo`` and ``w2`` had no counterpart, and
    ``calibrate_bitnet_norms`` starts them at the mean RMS of their input on ``calibration`` (a batch of token
    ids), so that a typical token keeps its scale. The teacher is left as it is."""
    model = copy.deepcopy(teacher).requires_grad_(True)  # the teacher is frozen, its copy trains
    norms = {}
    if args.surgery:
        apply_bitnet_norms(model, args.placement)
        norms = calibrate_bitnet_norms(model, [calibration])
    quantize_(model, bitnet_training(), filter_fn=quantize_filter)
    return model, norms


def conversion_runs(
    teacher: nn.Module, args: argparse.Namespace, data: ByteDataset, model_config: ModelConfig
) -> tuple[list[dict], nn.Module]:
    """Runs a to d (module doc); returns them and model c (for LoRA)."""
    steps = budget_steps(args)
    warmup_steps = round(steps * args.warmup_fraction)
    segment = [(steps, args.seed + 1)]
    calibration = data.val_batches(args.batch_size, 1)[0][0].to(args.device)
    teacher.eval().requires_grad_(False)
    runs, distilled = [], None
    for name in ("naive", "warmup", "warmup-distill"):
        model, norms = convert(teacher, args, calibration)
        warmup = warmup_hook(QuantizationWarmup(model, warmup_steps)) if name != "naive" else None
        loss_fn = distill_loss(teacher, args.distill_weight, args.temperature) if name == "warmup-distill" else lm_loss
        run = train(name, model, args, data, steps=steps, lr=args.convert_lr, segments=segment, loss_fn=loss_fn,
                    after_step=warmup, eval_at_start=True)  # fmt: skip
        runs.append({**run, "label": LABELS[name], "start_step": args.steps, "calibrated_norm_gains": norms})
        distilled = model
    surgery = args.placement if args.surgery else None
    spec = pretrain.RunSpec("scratch", True, bitnet_training(), surgery, args.dtype)
    model = pretrain.build_model(spec, model_config, args.seed, torch.device(args.device))
    segments = [(args.steps, args.seed), *segment]
    run = train("scratch", model, args, data, steps=args.steps + steps, lr=args.lr, segments=segments)
    runs.append({**run, "label": LABELS["scratch"], "start_step": 0})
    return runs, distilled


# --- LoRA on a packed base ------------------------------------------------------------------------------------


def lora_runs(converted: nn.Module, args: argparse.Namespace, data: ByteDataset) -> list[dict]:
    """LoRA adapters on model c, packed, and on the same model dense in the baseline precision; same steps and
    batches. Memory: the peak resident set during adapter training minus the resident set just before (Linux
    VmHWM, reset first, minus VmRSS), so that the models built before do not count.

    Speed: after both trainings, one adapter step of each in turn, round by round (``timing.measure``, median),
    so that what else the machine runs slows both alike; run one after the other, the two training loops' own
    tokens/s (``loop_tokens_per_s``) differed by up to 10x on a shared 2-core machine."""
    import peft

    device = torch.device(args.device)
    dense_name = f"lora-{hardware.short_name(args.dtype)}"
    runs, steps = [], []
    for name in ("lora-packed", dense_name):
        base = copy.deepcopy(converted)
        if name == "lora-packed":
            quantize_(base, bitnet_inference(), filter_fn=quantize_filter)
        else:
            unquantize_(base)
        config = peft.LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                                 target_modules=LORA_TARGETS)  # fmt: skip
        model = peft.get_peft_model(base, config)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        base_bytes = block_weight_bytes(model)  # the adapted linears' base weights: find_blocks sees through peft
        bf16_bytes = 2 * sum(m.weight.numel() for m in block_linears(model))
        rss_before = rss_mb()
        run = train(name, model, args, data, steps=args.lora_steps, lr=args.lora_lr,
                    segments=[(args.lora_steps, args.seed + 2)], eval_at_start=True)  # fmt: skip
        packed = all(isinstance(m.weight, BitNetPackedLinearWeight) for m in block_linears(model))
        peak = run["peak_memory_mb"]
        runs.append({
            **run,
            "label": "LoRA, packed 2-bit base" if name == "lora-packed" else f"LoRA, {dense_name[5:].upper()} base",
            "target_modules": LORA_TARGETS,
            "trainable_params": trainable,
            "total_params": total,
            "base_weight_bytes": base_bytes,
            "base_weight_bf16_bytes": bf16_bytes,
            "base_vs_bf16": base_bytes / bf16_bytes,
            "base_packed": packed,
            "peak_memory_delta_mb": peak - rss_before if device.type == "cpu" else peak,
        })  # fmt: skip
        steps.append(adapter_step(model, args, data))
    seconds = measure(*steps, warmup=2, iters=args.lora_timing_iters, sync=functools.partial(synchronize, device))
    for run, step_s in zip(runs, seconds, strict=True):
        run["loop_tokens_per_s"], run["tokens_per_s"] = run["tokens_per_s"], args.batch_size * args.seq_len / step_s
    return runs


def adapter_step(model: nn.Module, args: argparse.Namespace, data: ByteDataset) -> Callable[[], None]:
    """One LoRA training step on a fixed batch, for timing (the adapters keep training; their figures are taken)."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lora_lr, fused=True)
    x, y = (t.to(device) for t in data.train_batch(args.batch_size, torch.Generator().manual_seed(args.seed + 3)))

    def step() -> None:
        with training_loop.autocast(device, dtype):
            loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# --- the report -----------------------------------------------------------------------------------------------


def gap(loss: float, reference: float) -> float:
    """The validation loss above the full-precision model's, in percent of it."""
    return 100 * (loss - reference) / reference


def conversion_table(teacher: dict, runs: list[dict]) -> str:
    """Validation losses of the teacher and runs a-d, each with its gap to the teacher's."""
    ref = teacher["final_val_loss"]
    rows = [("run", "tokens", "val loss at start", "val loss", "gap vs FP", "tokens/s", "time (s)")]
    rows.append((teacher["name"], f"{teacher['tokens']:,}", "-", f"{ref:.4f}", "0.0%",
                 f"{teacher['tokens_per_s']:.0f}", f"{teacher['time_s']:.1f}"))  # fmt: skip
    for r in runs:
        start = "-" if r["start_val_loss"] is None else f"{r['start_val_loss']:.4f}"
        loss, to_ref = f"{r['final_val_loss']:.4f}", f"{gap(r['final_val_loss'], ref):+.1f}%"
        rows.append(
            (r["name"], f"{r['tokens']:,}", start, loss, to_ref, f"{r['tokens_per_s']:.0f}", f"{r['time_s']:.1f}")
        )
    return report.format_cells(rows)


def lora_table(runs: list[dict]) -> str:
    """Trainable parameters, base weight bytes, speed and memory of the two LoRA runs."""
    base = runs[-1]
    rows = [("run", "trainable", "base bytes", "vs BF16", "tokens/s", f"vs {base['name']}", "peak mem delta (MB)",
             "val before", "val after")]  # fmt: skip
    for r in runs:
        rows.append((
            r["name"], f"{r['trainable_params']:,}", f"{r['base_weight_bytes']:,}", f"{r['base_vs_bf16']:.3f}x",
            f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x",
            f"{r['peak_memory_delta_mb']:.1f}", f"{r['start_val_loss']:.4f}", f"{r['final_val_loss']:.4f}",
        ))  # fmt: skip
    return report.format_cells(rows)


def plot(teacher: dict, runs: list[dict], args: argparse.Namespace, path: Path, title: str) -> None:
    """Loss against training tokens: the whole training on the left (pretraining, then the conversions from its
    end; BitNet from scratch from 0), the conversion budget on the right, with the teacher's validation loss as a
    line. Training loss smoothed as in report.plot (report.smoothed), validation losses as points."""
    import matplotlib  # as in report.plot: only the report needs it, and "Agg" must be chosen before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens_per_step = args.batch_size * args.seq_len
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    curves = [({**teacher, "label": f"{teacher['name'].upper()} pretraining (teacher)", "start_step": 0}, "k")]
    curves += [(r, f"C{i}") for i, r in enumerate(runs)]
    for ax, zoom in zip(axes, (False, True), strict=True):
        for r, color in curves:
            if zoom and r["name"] == teacher["name"]:
                continue
            offset = r["start_step"]
            _, smooth = report.smoothed(r["train_losses"])
            x = [(offset + i + 1) * tokens_per_step / 1e6 for i in range(len(smooth))]
            ax.plot(x, smooth, color=color, alpha=0.45, linewidth=1)
            steps, vals = zip(*r["val_losses"], strict=True)
            ax.plot([(offset + s) * tokens_per_step / 1e6 for s in steps], vals, "o--", color=color, markersize=3,
                    label=f"{r['label']}: validation")  # fmt: skip
        ax.axhline(teacher["final_val_loss"], color="k", linestyle=":", linewidth=1, label="teacher's final validation")
        ax.set(xlabel="training tokens (M)", ylabel="cross-entropy (nats/byte)")
        ax.grid(alpha=0.3)
    start = args.steps * tokens_per_step / 1e6
    axes[0].set_title("whole training (faint: training loss)")
    axes[1].set_xlim(start - 0.02 * start, (args.steps + budget_steps(args)) * tokens_per_step / 1e6 * 1.01)
    # The validation losses within the budget (BitNet from scratch's earlier ones are far above) and the teacher's.
    zoomed = [v for r in runs for step, v in r["val_losses"] if r["start_step"] + step >= args.steps]
    zoomed.append(teacher["final_val_loss"])
    axes[1].set_ylim(min(zoomed) - 0.1, max(zoomed) + 0.1)
    axes[1].set_title(f"conversion budget ({args.budget:.0%} of pretraining tokens)")
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Title": title})
    plt.close(fig)


def write(
    teacher: dict, runs: list[dict], lora: list[dict], args: argparse.Namespace, model_config: ModelConfig, source: str
) -> dict:
    """Print the tables, write the plot and the JSON; returns the JSON's content."""
    head = report.headline(args)
    print(head)
    print(conversion_table(teacher, runs))
    print(f"lambda warmup over the first {args.warmup_fraction:.0%} of the budget; distillation: T = "
          f"{args.temperature}, weight {args.distill_weight}; conversion peak LR {args.convert_lr:g}")  # fmt: skip
    print(lora_table(lora))
    notes = {
        "gap": "100 x (val loss - the teacher's val loss) / the teacher's val loss",
        "val_loss_at_start": "after quantize_ (and the surgery), before any conversion step; with warmup lambda = 0",
        "tokens_per_s": f"steps after the first {training_loop.TIMING_WARMUP}, evaluation excluded; LoRA: median of "
        f"{args.lora_timing_iters} steps of each run taken in turn, after 2 untimed (timing.measure)",
        "peak_memory_delta_mb": "peak resident set during adapter training (Linux VmHWM, reset first) minus the "
        "resident set just before it",
        "base_weight_bytes": "block linears only: packed int8 values + float32 scales, or the dense weights",
        "lora_dense_base": "the same model c with its master weights as plain dense weights (unquantize_)",
    }
    print(f"peak mem delta: {notes['peak_memory_delta_mb']}")
    args.out.mkdir(parents=True, exist_ok=True)
    dense = hardware.short_name(args.dtype).upper()
    title = (f"{args.preset}: {model_config.dim}-dim x {model_config.n_layers} layers, {dense} teacher of "
             f"{teacher['tokens']:,} tokens, converted to BitNet b1.58 with {args.budget:.0%} more\n"
             f"{hardware.summary(args.device)}")  # fmt: skip
    plot(teacher, runs, args, args.out / "finetune_curves.png", title[:400])
    results = {
        **report.run_metadata(args, model_config, source),
        "settings": {
            "budget_steps": budget_steps(args),
            "warmup_steps": round(budget_steps(args) * args.warmup_fraction),
            "surgery": args.placement if args.surgery else None,
        },
        "notes": notes,
        "teacher": teacher,
        "runs": runs,
        "lora": lora,
    }
    (args.out / "finetune.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out / 'finetune.json'} and {args.out / 'finetune_curves.png'}")
    return results


# --- the script -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    """Pretrain (or load), convert four ways, LoRA on the packed result, report; returns the JSON's content."""
    args = parse_args(argv)
    model_config = ModelConfig(
        vocab_size=VOCAB_SIZE, max_seq_len=args.seq_len, **TRAINING_PRESETS[args.preset]["model"]
    )
    corpus, source = load_corpus(args.data, args.max_bytes)
    data = ByteDataset(corpus, args.seq_len)
    print(report.headline(args))
    print(f"data: {source}, {len(data.train):,} training and {len(data.val):,} validation bytes")
    print(f"model: {model_config}; pretraining {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, "
          f"conversions {budget_steps(args)} steps")  # fmt: skip
    teacher_model, teacher = pretrained_model(args, model_config, data)
    teacher = {**teacher, "label": teacher_spec(args).label}
    runs, distilled = conversion_runs(teacher_model, args, data, model_config)
    lora = lora_runs(distilled, args, data)
    return write(teacher, runs, lora, args, model_config, source)


if __name__ == "__main__":
    main()
