"""benchmarks/pretrain.py end to end on the tiny preset, and its command-line plumbing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import pretrain, report
from benchmarks.data import ByteDataset, load_corpus
from bitnet_ao import BitNetTrainingLinearWeight
from bitnet_ao.surgery import NormedLinear


def test_comparison_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = pretrain.main(["--preset", "tiny", "--out", str(tmp_path)])
    out = capsys.readouterr().out

    assert [r["name"] for r in runs] == ["bf16", "bitnet"], "no arguments must mean the comparison"
    for r in runs:
        first = sum(r["train_losses"][:3]) / 3
        assert r["final_train_loss"] < first - 1.0, f"{r['name']}: loss did not fall ({first} -> ...)"
        assert r["final_val_loss"] < math.log(256) - 1.0, f"{r['name']}: validation loss near chance"
        assert r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["runs"] == runs
    # Every row the table printed is in the output, built from the JSON's figures.
    table = [line.split() for line in out.splitlines() if line.split()[:1] in (["bf16"], ["bitnet"])]
    assert [tuple(row) for row in table] == report.table_rows(results["runs"])
    bf16, bitnet = results["runs"]
    assert table[1][2] == f"{bitnet['final_val_loss']:.4f}"
    assert table[1][4] == f"{bitnet['tokens_per_s'] / bf16['tokens_per_s']:.2f}x"

    png = (tmp_path / "loss_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_run_specs_follow_flags() -> None:
    (spec,) = pretrain.run_specs(
        pretrain.parse_args(
            ["--quantize", "bitnet", "--no-int8-grad-weight", "--weights", "binary", "--placement", "subln"]
        )
    )
    assert spec == pretrain.RunSpec("bitnet", True, True, False, "binary", "subln")
    (spec,) = pretrain.run_specs(pretrain.parse_args(["--quantize", "bitnet", "--no-surgery"]))
    assert spec.surgery is None
    assert [s.name for s in pretrain.run_specs(pretrain.parse_args(["--quantize", "none"]))] == ["bf16"]
    names = [s.name for s in pretrain.run_specs(pretrain.parse_args(["--ablate"]))]
    assert names == ["bf16", "bitnet", "bitnet-no-surgery", "bitnet-subln", "bitnet-bf16-backward"]
    args = pretrain.parse_args(["--preset", "tiny", "--steps", "7"])
    assert args.steps == 7 and args.seq_len == pretrain.PRESETS["tiny"]["seq_len"]
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--steps", "0"])


def test_build_model_applies_the_spec() -> None:
    config = pretrain.ModelConfig(dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=16)
    spec = pretrain.RunSpec("bitnet", True, False, True, "binary", "faq")
    model = pretrain.build_model(spec, config, seed=0, device=torch.device("cpu"))
    wq = model.layers[0].attention.wq
    assert isinstance(wq, NormedLinear) and isinstance(wq.linear.weight, BitNetTrainingLinearWeight)
    assert wq.linear.weight.config == pretrain.bitnet_training(int8_grad_input=False, weights="binary")
    assert not isinstance(model.output.weight, BitNetTrainingLinearWeight)
    plain = pretrain.build_model(pretrain.RunSpec("bf16", False), config, seed=0, device=torch.device("cpu"))
    assert torch.equal(plain.layers[0].attention.wq.weight, wq.linear.weight._data), "same seed, same init"


def test_lr_schedule() -> None:
    lrs = [pretrain.lr_at(step, 100, 1.0) for step in range(100)]
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
