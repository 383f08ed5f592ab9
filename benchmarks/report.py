"""The report of benchmarks/pretrain.py: the results table, ``loss_curves.png`` and ``results.json``.

Kept apart from the training script so that pretrain.py reads as a training script. Everything shown is built
from the run dicts that ``pretrain.main`` collects, the same dicts that go to the JSON, so the printed table, the
plot and the file cannot disagree (tests/test_pretrain.py checks it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import textwrap
from pathlib import Path

import torch

from benchmarks import hardware, step_profile
from benchmarks.model import ModelConfig


def baseline(runs: list[dict]) -> dict | None:
    """The run the speed column divides by: the first one not quantized (``pretrain.run_specs`` puts the dense
    baseline there).

    None when every run is quantized (``--quantize bitnet``): the column then shows "-"."""
    return next((r for r in runs if not r["spec"]["quantize"]), None)


def table_columns(runs: list[dict]) -> tuple[str, ...]:
    """The table's header; the speed column names the baseline it divides by ("vs FP32"), which depends on the
    hardware (``hardware.baseline_dtype``) or ``--dtype``."""
    base = baseline(runs)
    speed = f"vs {base['label']}" if base else "vs baseline"
    return ("run", "train loss", "val loss", "tokens/s", speed, "peak mem (MB)", "time (s)")


def headline(args: argparse.Namespace) -> str:
    """The hardware and the precision of the runs in one line: printed before training and above the table, since
    a speed ratio means nothing without them."""
    precision = (
        "FP32, no autocast" if args.dtype == "float32" else f"{hardware.short_name(args.dtype).upper()} autocast"
    )
    return f"{hardware.summary(args.device)}; runs in {precision}"


def table_rows(runs: list[dict]) -> list[tuple[str, ...]]:
    """The table's cells, from the same figures that go to the JSON."""
    base = baseline(runs)
    return [
        (
            r["name"],
            f"{r['final_train_loss']:.4f}",
            f"{r['final_val_loss']:.4f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-",
            f"{r['peak_memory_mb']:.0f}",
            f"{r['time_s']:.1f}",
        )
        for r in runs
    ]


def format_table(runs: list[dict]) -> str:
    """A plain-text table that splits into the cells of ``table_rows`` on whitespace (the run names have none)."""
    return format_cells([table_columns(runs), *table_rows(runs)])


def format_cells(rows: list[tuple[str, ...]]) -> str:
    """Rows of cells (the header first) as a plain-text table: the first column left-aligned, the rest right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    # The run name left-aligned, the figures right-aligned.
    lines = ["  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)])
             for row in rows]  # fmt: skip
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def smoothed(losses: list[float]) -> tuple[int, list[float]]:
    """The training-loss curve the plots draw: a trailing mean over a 25th of the run (one batch is noisy; short
    runs are drawn as they are); returns the window and the curve, one point per step."""
    window = max(1, len(losses) // 25)
    return window, [sum(losses[max(0, i + 1 - window) : i + 1]) / min(window, i + 1) for i in range(len(losses))]


def plot(runs: list[dict], path: Path, title: str) -> None:
    """Loss curves (smoothed training loss, validation points) beside a bar chart of the throughput, under
    ``title`` (at most two lines); the title also goes to the PNG's metadata, where a script can read it."""
    import matplotlib  # imported here: only the report needs it, and "Agg" must be chosen before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for i, r in enumerate(runs):
        color = f"C{i}"
        window, smooth = smoothed(r["train_losses"])
        train_label = f"train (mean of {window} steps)" if window > 1 else "train"
        ax_loss.plot(range(1, len(smooth) + 1), smooth, color=color, label=f"{r['label']}: {train_label}")
        steps, vals = zip(*r["val_losses"], strict=True)
        ax_loss.plot(steps, vals, "o--", color=color, label=f"{r['label']}: validation")
    fig.suptitle(title, fontsize=10)
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/byte)", title="loss")
    ax_loss.legend(fontsize=7)
    ax_loss.grid(alpha=0.3)
    names = [r["name"] for r in runs]
    speeds = [r["tokens_per_s"] for r in runs]
    bars = ax_speed.bar(names, speeds, color=[f"C{i}" for i in range(len(runs))])
    ax_speed.bar_label(bars, labels=[cells[4] for cells in table_rows(runs)])
    ax_speed.set(ylabel="tokens/s (after warm-up)", title="training throughput")
    ax_speed.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Title": title})
    plt.close(fig)


#: Characters per line of the plot's title: the hardware summary with its route measurements is longer.
TITLE_WIDTH = 130


def plot_title(args: argparse.Namespace, model_config: ModelConfig) -> str:
    """The preset, model and baseline dtype on the first line; then the hardware with its int8 routes
    (``hardware.summary``), wrapped at spaces to fit the figure."""
    dense = hardware.short_name(args.dtype).upper()
    hardware_lines = textwrap.wrap(
        hardware.summary(args.device), TITLE_WIDTH, break_long_words=False, break_on_hyphens=False
    )
    head = f"{args.preset}: {model_config.dim}-dim x {model_config.n_layers} layers, BitNet vs {dense} baseline"
    return "\n".join([head, *hardware_lines])


#: Below this speed-up over the baseline the report says why BitNet is not faster here.
NOT_FASTER = 1.1


def speed_note(runs: list[dict], device: str) -> str | None:
    """Why BitNet is not (meaningfully) faster than the baseline on this CPU, from what its int8 matmul routes
    measured against an FP32 GEMM (``cpu_matmul.route_report``); ``None`` when it is faster, or off CPU."""
    base = baseline(runs)
    bitnet = next((r for r in runs if r["spec"]["quantize"]), None)
    if base is None or bitnet is None or torch.device(device).type != "cpu":
        return None
    ratio = bitnet["tokens_per_s"] / base["tokens_per_s"]
    if ratio >= NOT_FASTER:
        return None
    measured = hardware.describe(device)["int8_route_measurements"]

    def vs_fp32(kind: str) -> str:
        entry = measured[kind]
        gops, fp32 = entry["gops"].get(entry["route"]), entry["gops"].get("fp32")
        if not gops or not fp32:
            return f"{kind}: {entry['route']} ({entry['how']})"
        return f"{kind} route {entry['route']} {gops / fp32:.2f}x an FP32 GEMM"

    return (
        f"BitNet is {ratio:.2f}x the baseline here: this CPU's int8 matmuls measured {vs_fp32('ternary')} "
        f"(forward, grad_input) and {vs_fp32('full')} (grad_weight); the quantization, ternarization and norm "
        "passes around them take the rest (docs/benchmarks.md, training comparison)"
    )


def sample_lines(runs: list[dict]) -> list[str]:
    """Each run's evaluation-time sample (``pretrain.sample``): its speed, whether the packed copy agrees, the text."""
    lines = []
    for run in runs:
        if "sample" not in run:
            continue
        s = run["sample"]
        agree = {True: ", the same tokens as its packed copy", False: ", NOT the tokens of its packed copy"}
        lines.append(
            f"sample of {run['name']} ({s['new_tokens']} tokens greedy after a validation prompt, "
            f"{s['tokens_per_s']:.0f} tokens/s{agree.get(s.get('same_tokens_as_packed'), '')}): {s['text']!r}"
        )
    return lines


def run_metadata(args: argparse.Namespace, model_config: ModelConfig, source: str) -> dict:
    """What every benchmark JSON opens with: when, on what hardware and software, with which data, flags and model."""
    return {
        "date": datetime.date.today().isoformat(),
        "machine": hardware.summary(args.device),  # the hardware in words, as before hardware.describe existed
        "hardware": hardware.describe(args.device),
        "baseline_dtype": args.dtype,
        "torch": torch.__version__,
        "data": source,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": dataclasses.asdict(model_config),
    }


def write(
    runs: list[dict], notes: dict[str, str], args: argparse.Namespace, model_config: ModelConfig, source: str
) -> None:
    """Print the table and how its figures were measured (``notes``), then write the plot and the JSON to
    ``args.out``. ``notes`` is keyed like the run figures it explains and goes to the JSON as it is."""
    print(headline(args))
    print(format_table(runs))
    print(f"train loss: {notes['final_train_loss']}; tokens/s: {notes['tokens_per_s']}; "
          f"peak mem: {notes['peak_memory_mb']}")  # fmt: skip
    if all("step_profile" in r for r in runs):
        print(f"where a step's time goes (ms per step, {notes['step_profile']}):")
        print(format_cells(step_profile.profile_rows(runs)))
    for line in sample_lines(runs):
        print(line)
    why = speed_note(runs, args.device)
    if why is not None:
        notes = {**notes, "speed": why}
        print(why)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(runs, args.out / "loss_curves.png", plot_title(args, model_config))
    results = {**run_metadata(args, model_config, source), "notes": notes, "runs": runs}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'loss_curves.png'}")
