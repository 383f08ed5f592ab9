"""benchmarks/pretrain.py end to end on the tiny preset, and its command-line plumbing.

The baseline's dtype depends on the CPU (``benchmarks/hardware.py``: BF16 with native BF16 matmuls, FP32 on
AVX2-only CPUs), so the expectations below are computed from ``hardware.baseline_dtype`` rather than written as
"bf16": the tests pass on either kind of CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from benchmarks import hardware, pretrain, report, step_profile, training_loop
from benchmarks.data import ByteDataset, load_corpus
from bitnet_ao import BitNetTrainingConfig, BitNetTrainingLinearWeight
from bitnet_ao.surgery import NormedLinear

CPU = torch.device("cpu")
#: The baseline run's name on this CPU ("bf16" or "fp32").
BASELINE = hardware.short_name(hardware.baseline_dtype(CPU))


def _check_report_names_baseline(tmp_path: Path, out: str, dtype: str) -> dict:
    """The printed hardware line and table header, the JSON and the plot's title all name the baseline dtype
    ``dtype`` (a torch dtype name); returns the JSON."""
    label = hardware.short_name(dtype).upper()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["baseline_dtype"] == results["args"]["dtype"] == dtype
    assert results["hardware"] == hardware.describe(CPU) and results["machine"] == hardware.summary(CPU)
    assert results["runs"][0]["label"] == label and results["runs"][0]["spec"]["dtype"] == dtype
    lines = out.splitlines()
    assert hardware.summary(CPU) in lines[0], "the output starts with the hardware"
    header = next(line for line in lines if line.startswith("run "))  # the results table; the step profiles follow
    assert f" vs {label} " in header
    title = Image.open(tmp_path / "loss_curves.png").text["Title"]
    first, *hardware_lines = title.splitlines()
    assert f"vs {label} baseline" in first and " ".join(hardware_lines) == hardware.summary(CPU)
    return results


def test_comparison_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = pretrain.main(["--preset", "tiny", "--out", str(tmp_path)])
    out = capsys.readouterr().out

    assert [r["name"] for r in runs] == [BASELINE, "bitnet"], "no arguments must mean the comparison"
    for r in runs:
        first = sum(r["train_losses"][:3]) / 3
        assert r["final_train_loss"] < first - 1.0, f"{r['name']}: loss did not fall ({first} -> ...)"
        assert r["final_val_loss"] < math.log(256) - 1.0, f"{r['name']}: validation loss near chance"
        assert r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0

    results = _check_report_names_baseline(tmp_path, out, str(hardware.baseline_dtype(CPU)).removeprefix("torch."))
    assert results["runs"] == runs
    # Every row the two tables printed (results, then the step profiles) is in the output, built from the JSON.
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in ([BASELINE], ["bitnet"])]
    table, profiles = rows[:2], rows[2:]
    assert [tuple(row) for row in table] == report.table_rows(results["runs"])
    assert [tuple(row) for row in profiles] == step_profile.profile_rows(results["runs"])[1:]
    base, bitnet = results["runs"]
    assert table[1][2] == f"{bitnet['final_val_loss']:.4f}"
    assert table[1][4] == f"{bitnet['tokens_per_s'] / base['tokens_per_s']:.2f}x"

    for r in runs:  # the profiled steps' time, split: nothing counted twice, the baseline has no int8 matmul
        p = r["step_profile"]
        assert sum(p[c] for c in step_profile.CATEGORIES) == pytest.approx(p["step_s"], rel=1e-6), r["name"]
        assert (p["int8_matmul"] > 0) == r["spec"]["quantize"] and (p["bitnet_passes"] > 0) == r["spec"]["quantize"]
        # An eager CPU run: the GEMMs, passes and step time are the timed steps' (a subset of the wall time its
        # tokens/s divides by), the profile's own split beside them.
        assert set(p["profiled"]) == {*step_profile.CATEGORIES, "step_s", "passes_vs_int8"}
        tokens = results["args"]["batch_size"] * results["args"]["seq_len"]
        assert 0 < p["step_s"] <= tokens / r["tokens_per_s"]
        ranges = p["ranges"]  # each timed range per step: the int8 GEMMs are the GEMM ranges, in BitNet's run only
        gemm_ranges = sum(t for name, t in ranges.items() if name.startswith("bitnet_ao.gemm:"))
        assert gemm_ranges == pytest.approx(p["int8_matmul"], rel=1e-9, abs=1e-12)
        assert ("bitnet_ao.linear" in ranges) == r["spec"]["quantize"]
    png = (tmp_path / "loss_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    # The evaluation-time sample: generated through the training weights (no gradient: the prepared packed
    # forward), the same tokens as a bitnet_inference copy, and printed as the JSON holds it.
    assert bitnet["sample"]["same_tokens_as_packed"] is True and "same_tokens_as_packed" not in base["sample"]
    assert all(r["sample"]["tokens_per_s"] > 0 and r["sample"]["new_tokens"] == pretrain.SAMPLE_TOKENS for r in runs)
    assert all(line in out.splitlines() for line in report.sample_lines(results["runs"]))


@pytest.mark.slow  # 1 s after the test above, 6 to 17 s first in a process (the BitNet run compiles its helpers)
@pytest.mark.parametrize(("dtype", "autocast"), [("float32", False), ("bfloat16", True)])
def test_dtype_flag_sets_the_precision(
    dtype: str, autocast: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--dtype float32`` trains and evaluates both runs without autocast (float32 logits); ``bfloat16`` under
    autocast. Seen from inside: a hook on the output head records every forward, training and evaluation."""
    seen: list[tuple[torch.dtype, bool]] = []
    build_model = pretrain.build_model

    def build_and_watch(*args: object, **kwargs: object) -> nn.Module:
        model = build_model(*args, **kwargs)
        model.output.register_forward_hook(lambda m, i, out: seen.append((out.dtype, torch.is_autocast_enabled("cpu"))))
        return model

    monkeypatch.setattr(pretrain, "build_model", build_and_watch)
    argv = ["--preset", "tiny", "--steps", "4", "--eval-every", "2", "--dtype", dtype, "--out", str(tmp_path)]
    runs = pretrain.main(argv)

    evals = 2 * pretrain.PRESETS["tiny"]["eval_batches"]  # two evaluations per run
    # The sample: a 2-token warm-up and one forward per new token, again on BitNet's packed copy (it keeps the hook).
    samples = sum(2 + r["sample"]["new_tokens"] * (2 if r["spec"]["quantize"] else 1) for r in runs)
    assert len(seen) == len(runs) * (4 + evals) + samples, "one head forward per step, validation batch, sample token"
    assert set(seen) == {(getattr(torch, dtype), autocast)}, "training, evaluation and the sample in one precision"
    short = hardware.short_name(dtype)
    assert [r["name"] for r in runs] == [short, "bitnet"]
    assert all(math.isfinite(loss) for r in runs for loss in r["train_losses"])
    _check_report_names_baseline(tmp_path, capsys.readouterr().out, dtype)


def test_run_specs_follow_flags() -> None:
    args = pretrain.parse_args(
        ["--quantize", "bitnet", "--no-int8-grad-weight", "--weights", "binary", "--placement", "subln"]
    )
    (spec,) = pretrain.run_specs(args)
    recipe = pretrain.bitnet_training(int8_grad_weight=False, weights="binary")
    assert spec == pretrain.RunSpec("bitnet", True, recipe, "subln", args.dtype)
    (spec,) = pretrain.run_specs(pretrain.parse_args(["--quantize", "bitnet", "--scale-groups", "4"]))
    assert spec.recipe == pretrain.bitnet_training(scale_groups=4)
    (spec,) = pretrain.run_specs(pretrain.parse_args(["--quantize", "bitnet", "--no-surgery"]))
    assert spec.surgery is None
    assert [s.name for s in pretrain.run_specs(pretrain.parse_args(["--quantize", "none"]))] == [BASELINE]
    for dtype, short in (("bfloat16", "bf16"), ("float32", "fp32")):
        specs = pretrain.run_specs(pretrain.parse_args(["--ablate", "--dtype", dtype]))
        assert [s.name for s in specs] == [
            short,
            "bitnet",
            "bitnet-no-surgery",
            "bitnet-subln",
            f"bitnet-{short}-backward",
        ]
        assert {s.dtype for s in specs} == {dtype}
        assert specs[0].label == short.upper() and f"{short.upper()} bwd" in specs[-1].label
    args = pretrain.parse_args(["--preset", "tiny", "--steps", "7"])
    assert args.steps == 7 and args.seq_len == pretrain.PRESETS["tiny"]["seq_len"]
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--steps", "0"])


def test_dtype_auto_and_the_fp32_preset() -> None:
    """``--dtype auto`` is the hardware's baseline; in float32 cpu-default trains less (its ``fp32`` dict), and the
    flags still win over it."""
    assert pretrain.parse_args([]).dtype == str(hardware.baseline_dtype(CPU)).removeprefix("torch.")
    assert hardware.baseline_dtype(CPU) == (torch.bfloat16 if hardware.describe(CPU)["native_bf16"] else torch.float32)
    bf16 = pretrain.parse_args(["--dtype", "bfloat16"])
    assert (bf16.steps, bf16.batch_size, bf16.eval_every) == (50, 16, 25)
    fp32 = pretrain.parse_args(["--dtype", "float32"])
    assert (fp32.steps, fp32.batch_size, fp32.eval_every, fp32.seq_len) == (24, 8, 12, 128)
    given = pretrain.parse_args(["--dtype", "float32", "--steps", "40", "--batch-size", "12"])
    assert (given.steps, given.batch_size) == (40, 12)
    tiny = pretrain.parse_args(["--preset", "tiny", "--dtype", "float32"])
    assert tiny.steps == pretrain.PRESETS["tiny"]["steps"], "a preset without an fp32 dict trains as it is"


def test_build_model_applies_the_spec() -> None:
    config = pretrain.ModelConfig(dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=16)
    spec = pretrain.RunSpec("bitnet", True, pretrain.bitnet_training(int8_grad_input=False, weights="binary"), "faq")
    model = pretrain.build_model(spec, config, seed=0, device=torch.device("cpu"))
    wq = model.layers[0].attention.wq
    assert isinstance(wq, NormedLinear) and isinstance(wq.weight, BitNetTrainingLinearWeight)
    assert wq.weight.config == pretrain.bitnet_training(int8_grad_input=False, weights="binary")
    assert not isinstance(model.output.weight, BitNetTrainingLinearWeight)
    wo = model.layers[0].attention.wo.weight
    assert wo.config == wq.weight.config, "one device without groups: plain quantize_, one recipe everywhere"
    plain = pretrain.build_model(pretrain.RunSpec("bf16", False), config, seed=0, device=torch.device("cpu"))
    assert torch.equal(plain.layers[0].attention.wq.weight, wq.weight._data), "same seed, same init"
    grouped = dataclasses.replace(spec, recipe=pretrain.bitnet_training(scale_groups=2))
    block = pretrain.build_model(grouped, config, seed=0, device=torch.device("cpu")).layers[0]
    dims = [block.get_submodule(p).weight.config.group_dim for p in ("attention.wq", "attention.wo")]
    assert dims == [0, 1], "with groups, the twin of a tensor-parallel run: each linear along its TP dimension"


def test_recipe_flags_are_the_recipe_fields(capsys: pytest.CaptureFixture[str]) -> None:
    """One flag per BitNetTrainingConfig field (but the per-linear group_dim), with the field's default and help."""
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(BitNetTrainingConfig):
        flag = f"--{f.name.replace('_', '-')}"
        if f.name in pretrain.PER_LINEAR_FIELDS:
            assert flag not in out
        else:
            assert flag in out and " ".join(f.metadata["help"].split()[:5]) in out, f.name
    args = pretrain.parse_args([])
    assert pretrain.bitnet_training(**{f.name: getattr(args, f.name) for f in pretrain.recipe_fields()}) == (
        pretrain.bitnet_training()
    ), "the flags' defaults are the recipe's"


def test_lr_schedule() -> None:
    lrs = [training_loop.lr_at(step, 100, 1.0) for step in range(100)]
    assert lrs[0] == pytest.approx(0.05) and lrs[19] == pytest.approx(1.0)  # 20 warmup steps
    assert all(a < b for a, b in zip(lrs[:19], lrs[1:20], strict=True))
    assert all(a >= b for a, b in zip(lrs[19:], lrs[20:], strict=False))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_data_from_files_and_errors(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"a" * 300)
    (tmp_path / "b.txt").write_bytes(b"b" * 300)
    corpus, source = load_corpus([str(tmp_path / "*.txt")])
    assert corpus == b"a" * 300 + b"\n" + b"b" * 300 and source.startswith("2 file(s)")
    data = ByteDataset(corpus, seq_len=16, val_fraction=0.1)
    x, y = data.train_batch(3, torch.Generator().manual_seed(0))
    assert x.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1])
    (vx, _), *_ = data.val_batches(2, 1)
    assert (vx == ord("b")).all(), "the held-out split is the end of the corpus"
    with pytest.raises(ValueError, match="validation split has 3 bytes"):
        ByteDataset(b"x" * 60, seq_len=16)
    with pytest.raises(SystemExit, match="none of"):
        load_corpus([str(tmp_path / "missing-*.txt"), str(tmp_path / "also-missing.txt")])


def test_the_report_says_why_when_bitnet_is_not_faster():
    """Below 1.1x the baseline the report explains with the route measurements of this CPU; above, it says nothing."""
    runs = [
        {"spec": {"quantize": False}, "tokens_per_s": 100.0, "label": "FP32"},
        {"spec": {"quantize": True}, "tokens_per_s": 104.0, "label": "BitNet"},
    ]
    note = report.speed_note(runs, "cpu")
    assert note.startswith("BitNet is 1.04x the baseline here") and "grad_weight" in note
    runs[1]["tokens_per_s"] = 130.0
    assert report.speed_note(runs, "cpu") is None


def test_step_profile_splits_a_step_by_who_does_the_work():
    """A synthetic profile (times in microseconds): the GEMM inside a bitnet_ao op is int8, the rest of the op and a
    BitNet autograd node's own time are BitNet's passes; the autograd engine's adding of input gradients around a
    BitNet node is not (every model pays it where its graph branches), nor is a shared op outside a BitNet linear."""
    from torch.autograd.profiler_util import FunctionEvent

    def event(name: str, start: int, end: int, *children: FunctionEvent) -> FunctionEvent:
        e = FunctionEvent(id=start, name=name, thread=0, start_us=start, end_us=end)
        for child in children:
            e.append_cpu_child(child)
            child.cpu_parent = e
        return e

    int8 = event("aten::_int_mm", 10, 40)
    op = event("bitnet_ao::scaled_int8_mm", 5, 50, int8)  # 15 of its own
    node = event("_BitNetLinearFunctionBackward", 0, 60, op)  # 15 of its own
    accumulate = event("aten::add_", 60, 67)
    engine = event("autograd::engine::evaluate_function: _BitNetLinearFunctionBackward", 0, 70, node, accumulate)
    dense = event("aten::mm", 70, 90)
    shared = event("bitnet_ao::rms_norm_backward", 90, 95)
    totals = step_profile.split_events([engine, int8, op, node, accumulate, dense, shared])
    assert totals == pytest.approx({"int8_matmul": 30e-6, "bitnet_passes": 30e-6, "dense_matmul": 20e-6})
