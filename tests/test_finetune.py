"""benchmarks/finetune.py end to end on a tiny configuration, in process: the four conversions and LoRA on a
packed base run, and the JSON says what the report needs (the real figures are in docs/finetuning.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from benchmarks import finetune

#: A few steps of the tiny preset on short sequences: seconds, not a measurement.
TINY = ["--preset", "tiny", "--steps", "10", "--batch-size", "2", "--seq-len", "16", "--eval-every", "5",
        "--eval-batches", "1", "--lora-steps", "4", "--lora-timing-iters", "2", "--max-bytes", "200000"]  # fmt: skip


def test_finetune_smoke(tmp_path: Path) -> None:
    teacher_file = tmp_path / "teacher.pt"
    returned = finetune.main([*TINY, "--out", str(tmp_path), "--save-teacher", str(teacher_file)])

    results = json.loads((tmp_path / "finetune.json").read_text())
    assert results["runs"] == returned["runs"]
    assert [r["name"] for r in results["runs"]] == ["naive", "warmup", "warmup-distill", "scratch"]
    for r in [results["teacher"], *results["runs"]]:
        assert math.isfinite(r["final_val_loss"]) and r["final_val_loss"] < math.log(256) + 1, r["name"]
    budget = results["settings"]["budget_steps"]
    assert budget == 2 and [r["steps"] for r in results["runs"]] == [budget] * 3 + [10 + budget]
    # The conversions start from the pretrained model: the warmup runs at lambda = 0 evaluate close to it.
    assert all(math.isfinite(r["start_val_loss"]) for r in results["runs"][:3])

    packed, dense = results["lora"]
    assert packed["name"] == "lora-packed" and packed["base_packed"], "the LoRA base weights must stay packed"
    assert not dense["base_packed"] and packed["trainable_params"] == dense["trainable_params"] > 0
    assert 0.12 < packed["base_vs_bf16"] < 0.14, "2-bit values plus a scale per linear: ~1/8 of BF16"
    assert packed["target_modules"] == ["wq", "wk", "wv", "wo", "w1", "w3", "w2"], "stock names on a surgery model"
    assert all(math.isfinite(r["final_val_loss"]) and r["tokens_per_s"] > 0 for r in results["lora"])

    assert (tmp_path / "finetune_curves.png").read_bytes().startswith(b"\x89PNG")
    saved = torch.load(teacher_file, weights_only=True)
    assert saved["run"]["final_val_loss"] == results["teacher"]["final_val_loss"]
