"""FSDP2 with BitNet weights vs BF16 FSDP2: all-gather bytes per step and training step time.

    python benchmarks/bench_fsdp.py [--world 2] [--steps 10]

1. All-gather bytes, Llama2-7B shapes, computed analytically: the block linears travel 2-bit packed
   (``ceil(K / 4)`` bytes per row, rows padded to the FSDP shard height), everything else in BF16.
2. The same, measured on a small Llama-style model (benchmarks/model.py) by recording the inputs of FSDP2's
   all-gathers over one training step, with ``reshard_after_forward=True`` (the backward re-gathers).
3. Step time (forward, backward, AdamW, precompute of the scales) of that model on ``--world`` CPU ranks with
   gloo, BitNet vs BF16 FSDP2, both with ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torchao.quantization import quantize_

if not __package__:  # run as `python benchmarks/bench_fsdp.py`: make the `benchmarks` package importable,
    # after site-packages so that the checkout's `kernels/` folder never shadows the Hub `kernels` package
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.model import ModelConfig, Transformer  # noqa: E402
from benchmarks.timing import measure  # noqa: E402
from bitnet_ao import bitnet_training, precompute_bitnet_scale_for_fsdp  # noqa: E402
from bitnet_ao.surgery import quantize_filter  # noqa: E402

LLAMA2_7B = {"dim": 4096, "hidden": 11008, "n_layers": 32, "vocab": 32000}
SMALL = ModelConfig(vocab_size=256, dim=256, n_layers=2, n_heads=4, hidden_dim=704, max_seq_len=128)
BATCH, SEQ = 4, 128


def llama2_7b_bytes(world: int) -> dict[str, float]:
    """Bytes all-gathered for one pass over the Llama2-7B parameters, BF16 FSDP2 vs BitNet."""
    d, h, n_layers, vocab = LLAMA2_7B["dim"], LLAMA2_7B["hidden"], LLAMA2_7B["n_layers"], LLAMA2_7B["vocab"]
    linears = [(d, d)] * 4 + [(h, d), (h, d), (d, h)]  # wq wk wv wo, w1 w3 (out, in), w2

    def padded_rows(n: int) -> int:
        return -(-n // world) * world

    linear_bf16 = n_layers * sum(2 * padded_rows(n) * k for n, k in linears)
    linear_bitnet = n_layers * sum(padded_rows(n) * -(-k // 4) for n, k in linears)
    other_bf16 = 2 * (2 * vocab * d) + 2 * d * (2 * n_layers + 1)  # embedding, head, RMSNorm weights
    return {
        "linear_bf16_GB": linear_bf16 / 1e9,
        "linear_bitnet_GB": linear_bitnet / 1e9,
        "linear_ratio": linear_bitnet / linear_bf16,
        "model_bf16_GB": (linear_bf16 + other_bf16) / 1e9,
        "model_bitnet_GB": (linear_bitnet + other_bf16) / 1e9,
        "model_ratio": (linear_bitnet + other_bf16) / (linear_bf16 + other_bf16),
    }


def _model(bitnet: bool) -> nn.Module:
    torch.manual_seed(0)
    model = Transformer(SMALL)
    if bitnet:
        quantize_(model, bitnet_training(), filter_fn=quantize_filter)  # the block linears; the head stays
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for layer in model.layers:
        fully_shard(layer, mp_policy=mp_policy)
    return fully_shard(model, mp_policy=mp_policy)


def _step(model: nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor, bitnet: bool) -> None:
    model(tokens, tokens.roll(-1, 1)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if bitnet:
        precompute_bitnet_scale_for_fsdp(model)


def _worker(rank: int, world: int, port: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or world) // world))
    tokens = torch.randint(0, SMALL.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(rank))
    results = {}
    for name, bitnet in (("bf16", False), ("bitnet", True)):
        model = _model(bitnet)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(3):  # warm-up: FSDP lazy init, inductor compiles of the bitnet_ao ops
            _step(model, opt, tokens, bitnet)

        sent: list[int] = []
        original = dist.all_gather_single

        def recording(output_tensor, input_tensor, *args, _original=original, _sent=sent, **kwargs):
            _sent.append(input_tensor.numel() * input_tensor.element_size())
            return _original(output_tensor, input_tensor, *args, **kwargs)

        dist.all_gather_single = recording
        try:
            _step(model, opt, tokens, bitnet)
        finally:
            dist.all_gather_single = original

        # The barriers time the ranks together: a step ends when the slowest rank's does. Warmed up above.
        step = functools.partial(_step, model, opt, tokens, bitnet)
        (step_s,) = measure(step, warmup=0, iters=steps, sync=dist.barrier)
        results[name] = {"all_gather_bytes_per_rank_step": sum(sent), "step_s_median": step_s}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Print the figures; return them: ``{"llama2_7b": analytic bytes, "measured": {"bf16": ..., "bitnet": ...}}``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)

    print("Llama2-7B, all-gather bytes per pass over the weights (analytic, world", args.world, "):")
    analytic = llama2_7b_bytes(args.world)
    print(json.dumps(analytic, indent=2))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(f"/tmp/bench_fsdp_{os.getpid()}.json")
    mp.start_processes(_worker, (args.world, port, args.steps, str(out)), nprocs=args.world, start_method="spawn")
    measured = json.loads(out.read_text())
    out.unlink()
    bf16, bitnet = measured["bf16"], measured["bitnet"]
    print(f"Small model {SMALL}, batch {BATCH}x{SEQ} per rank, {args.world} ranks (gloo):")
    print(json.dumps(measured, indent=2))
    ratio = bitnet["all_gather_bytes_per_rank_step"] / bf16["all_gather_bytes_per_rank_step"]
    print(f"all-gather bytes BitNet / BF16: {ratio:.4f}")
    print(f"step time BitNet / BF16: {bitnet['step_s_median'] / bf16['step_s_median']:.3f}")
    return {"llama2_7b": analytic, "measured": measured}


if __name__ == "__main__":
    main()
