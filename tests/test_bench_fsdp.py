"""benchmarks/bench_fsdp.py with one timed step: the all-gather bytes it records are those of the model it shards,
counted here from the parameter shapes (BF16 FSDP2: every parameter's padded shard in BF16; BitNet: the block
linears 2-bit packed, K / 4 bytes per row, everything else as in BF16), so the block linears travel at 1/8 of
BF16's bytes; and the analytic Llama2-7B figures add up to Llama 2 7B's published parameter count."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from benchmarks import bench_fsdp
from benchmarks.model import Transformer

# One launch of 2 gloo processes training the benchmark's small model (about 20 s on 2 CPU cores).
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD = 2
#: Llama 2 7B's parameter count as Meta publishes it (6.74B): the analytic BF16 figure is 2 bytes for each.
LLAMA2_7B_PARAMETERS = 6_738_415_616


def shard_bytes(module: nn.Module, world: int, packed: bool) -> tuple[int, int]:
    """Bytes one rank contributes to the all-gather of ``module``'s parameters (FSDP2 shards dim 0, padded to a
    multiple of ``world`` rows), as ``(nn.Linear weights, everything else)``; ``packed``: the linear weights at
    2 bits per value, ``ceil(K / 4)`` bytes per row, everything else in BF16."""
    linears = others = 0
    for name, p in module.named_parameters():
        rows = math.ceil(p.shape[0] / world)
        owner = module.get_submodule(name.rpartition(".")[0])
        if isinstance(owner, nn.Linear) and name.endswith("weight"):
            linears += rows * math.ceil(p.shape[1] / 4) if packed else rows * p.shape[1] * 2
        else:
            others += rows * math.prod(p.shape[1:]) * 2
    return linears, others


def test_all_gather_bytes_of_the_sharded_model(capsys: pytest.CaptureFixture[str]) -> None:
    results = bench_fsdp.main(["--world", str(WORLD), "--steps", "1"])
    out = capsys.readouterr().out
    measured = results["measured"]
    assert set(measured) == {"bf16", "bitnet"}
    assert all(run["step_s_median"] > 0 for run in measured.values())

    with torch.device("meta"):
        model = Transformer(bench_fsdp.SMALL)
    root = model.tok_embeddings, model.norm, model.output  # the root's own parameters: the head stays high precision
    root_bytes = sum(sum(shard_bytes(m, WORLD, packed=False)) for m in root)
    # One training step: each block is gathered in the forward and again in the backward (reshard_after_forward);
    # FSDP2 keeps the root's parameters from the forward to the backward: gathered once.
    gathers = 2
    for name, packed in (("bf16", False), ("bitnet", True)):
        per_block = [shard_bytes(block, WORLD, packed) for block in model.layers]
        expected = root_bytes + gathers * sum(linears + others for linears, others in per_block)
        assert measured[name]["all_gather_bytes_per_rank_step"] == expected, name

    # What differs between the two runs is the block linears only: 1/8 of the bytes (2 bits instead of 16).
    same = root_bytes + gathers * sum(shard_bytes(block, WORLD, False)[1] for block in model.layers)
    bf16, bitnet = (measured[name]["all_gather_bytes_per_rank_step"] - same for name in ("bf16", "bitnet"))
    assert bitnet * 8 == bf16
    ratio = measured["bitnet"]["all_gather_bytes_per_rank_step"] / measured["bf16"]["all_gather_bytes_per_rank_step"]
    assert f"all-gather bytes BitNet / BF16: {ratio:.4f}" in out

    analytic = results["llama2_7b"]
    assert analytic == bench_fsdp.llama2_7b_bytes(WORLD)
    assert analytic["model_bf16_GB"] * 1e9 == pytest.approx(2 * LLAMA2_7B_PARAMETERS, abs=1)
    assert analytic["linear_ratio"] == 1 / 8, "every Llama2-7B linear has K % 4 == 0 and rows divisible by 2"
    others = (analytic["model_bf16_GB"] - analytic["linear_bf16_GB"]) * 1e9
    assert (analytic["model_bitnet_GB"] - analytic["linear_bitnet_GB"]) * 1e9 == pytest.approx(others, abs=1)
