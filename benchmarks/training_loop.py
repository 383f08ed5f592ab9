"""The one training loop of the benchmarks (``pretrain.py``'s runs, ``finetune.py``'s pretraining, conversions and
LoRA runs), with what it measures.

In: a model, its training batches and fixed validation batches, a loss function, the step count and peak learning
rate (AdamW with betas 0.9/0.95 and weight decay 0.1 on matrices, linear warmup then cosine decay, gradients
clipped to norm 1), the activation dtype, and optionally a hook run after every optimizer step. Out: the model,
trained in place, and its figures (:func:`train`). Saving or exporting the model is the caller's business.

Throughput counts the steps after the first ``TIMING_WARMUP`` (which include compilation: the BitNet CPU path
compiles its elementwise helpers once per process) and excludes evaluation.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from tqdm import tqdm

from benchmarks import step_profile
from benchmarks.memory import peak_memory_mb, reset_peak_memory
from benchmarks.timing import synchronize

#: Steps left out of the throughput figure: compilation and allocator warm-up happen here.
TIMING_WARMUP = 7
#: Steps run under torch.profiler for the step profile (benchmarks/step_profile.py): warm, and not timed. Three of
#: them after four: on a 2-core VM a profile of two steps moved by +-4 points of the passes / int8 ratio between runs.
PROFILED_STEPS = range(4, 7)
#: The reported final training loss is the mean over this many last steps (one batch is noisy).
FINAL_LOSS_WINDOW = 10

Batch = tuple[Tensor, Tensor]
#: ``loss_fn(model, x, y)`` -> (what is minimized, the language-model loss that is logged).
LossFn = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]
#: Run after every optimizer step; returns what the progress bar shows of it (``{}`` for nothing).
AfterStep = Callable[[], dict[str, str]]


def lm_loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The plain language-model loss; returned twice: (what is minimized, the LM loss that is logged)."""
    loss = model(x, y)
    return loss, loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linears, embeddings), none on norm gains and biases; frozen parameters left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warmup over the first 20% of the steps, then cosine decay to 10% of ``lr``."""
    warmup = max(1, steps // 5)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """The precision of a run, in training and evaluation alike: float32 master weights under ``dtype`` autocast,
    or no autocast at all for float32 (a disabled autocast rather than a nullcontext: one code path)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch], device: torch.device, dtype: torch.dtype) -> float:
    """Mean loss over fixed held-out batches, under the same autocast as training, so runs compare directly."""
    model.eval()
    losses = []
    for x, y in batches:
        with autocast(device, dtype):
            losses.append(model(x.to(device), y.to(device)).item())
    model.train()
    return sum(losses) / len(losses)


def train(
    model: nn.Module,
    batches: Iterator[Batch],
    val_batches: list[Batch],
    *,
    steps: int,
    lr: float,
    eval_every: int,
    device: torch.device,
    dtype: torch.dtype,
    loss_fn: LossFn = lm_loss,
    after_step: AfterStep | None = None,
    compile: bool = False,
    eval_at_start: bool = False,
    profile: bool = False,
    name: str = "",
) -> dict:
    """Train ``model`` in place for ``steps`` batches of ``batches``, evaluating every ``eval_every`` steps and at
    the end (and before the first step with ``eval_at_start``); returns its figures, in the order a report shows
    them: ``final_train_loss``, ``final_val_loss``, ``tokens_per_s``, ``peak_memory_mb`` (since the loop started),
    ``time_s``, the curves ``train_losses`` and ``val_losses`` ([step, loss] pairs), and with ``profile`` (and at
    least ``PROFILED_STEPS.stop`` steps) the ``step_profile`` of ``PROFILED_STEPS``, its int8 GEMMs, BitNet passes
    and step time those of the timed steps on an eager CPU run (``step_profile.combine``).

    ``compile`` runs the training forward through ``torch.compile``; evaluation runs the model as it is."""
    reset_peak_memory(device)
    start = time.perf_counter()
    forward = torch.compile(model) if compile else model
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95), fused=True)
    params = [p for p in model.parameters() if p.requires_grad]
    timing_warmup = min(TIMING_WARMUP, steps - 1)
    profiled = profile and steps >= PROFILED_STEPS.stop  # a shorter run is not profiled

    val_losses = [[0, evaluate(model, val_batches, device, dtype)]] if eval_at_start else []
    train_losses: list[float] = []
    timed_tokens, eval_time, timed_start = 0, 0.0, time.perf_counter()
    profiler, profiled_figures = step_profile.StepProfiler(), None
    # The timed steps' BitNet ranges, with no profiler (benchmarks/step_profile.py): eager CPU runs.
    timer = step_profile.StepTimer() if profiled and device.type == "cpu" and not compile else None
    bar = tqdm(range(steps), desc=name, dynamic_ncols=True)
    for step in bar:
        if step == timing_warmup:
            synchronize(device)
            timed_tokens, eval_time, timed_start = 0, 0.0, time.perf_counter()
        if profiled and step == PROFILED_STEPS.start:
            profiler.start()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        x, y = (t.to(device) for t in next(batches))
        step_start = time.perf_counter()
        with timer.step() if timer is not None and step >= timing_warmup else contextlib.nullcontext():
            with autocast(device, dtype):
                loss, logged = loss_fn(forward, x, y)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        shown = after_step() if after_step is not None else {}
        train_losses.append(logged.item())
        timed_tokens += x.numel()
        if profiled and step == PROFILED_STEPS.stop - 1:
            profiled_figures = profiler.stop(len(PROFILED_STEPS))
        tok_s = f"{x.numel() / (time.perf_counter() - step_start):.0f}"
        bar.set_postfix({"loss": f"{train_losses[-1]:.3f}", **shown, "tok_s": tok_s})
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            eval_start = time.perf_counter()
            val_losses.append([step + 1, evaluate(model, val_batches, device, dtype)])
            eval_time += time.perf_counter() - eval_start
    synchronize(device)
    timed = time.perf_counter() - timed_start - eval_time
    figures = profiled_figures
    if profiled_figures is not None and timer is not None:
        figures = step_profile.combine(profiled_figures, timer.split())
    window = train_losses[-FINAL_LOSS_WINDOW:]
    return {
        "final_train_loss": sum(window) / len(window),
        "final_val_loss": val_losses[-1][1],
        "tokens_per_s": timed_tokens / timed,
        "peak_memory_mb": peak_memory_mb(device),
        "time_s": time.perf_counter() - start,
        "train_losses": train_losses,
        "val_losses": val_losses,
        **({"step_profile": figures} if figures is not None else {}),
    }
