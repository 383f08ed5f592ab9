"""Inference with packed BitNet weights against the dense model a user of this hardware would deploy.

The model is the training comparison's (``benchmarks/pretrain.py --preset``, randomly initialized: speed does not
depend on the weights). Three variants, all in one process on the same tokens:

- the dense baseline in the hardware's dtype (``--dtype auto``: BF16 on CUDA and on CPUs with native BF16
  matmuls, FP32 on other CPUs), weights in that dtype;
- the BitNet training model (FAQ norms + ``bitnet_training``; master weights, INT8 forward): the prefill target;
- the same model frozen with ``bitnet_inference()``: 2-bit packed block linears.

Prefill: one forward over ``--prompt`` tokens (M = batch x prompt rows per linear). Decode: ``--new-tokens`` greedy
steps through a KV cache, one token per step (M = batch rows). Weight MiB counts the block linears only (the
embedding and the output head stay in the model dtype). Times are medians over ``--iters`` runs after one warmup.

    python benchmarks/bench_inference.py                         # cpu-default preset, about a minute on 2 cores
    python benchmarks/bench_inference.py --dtype float32          # FP32 baseline whatever the hardware
    python benchmarks/bench_inference.py --preset llama2-1b --device cuda
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
from pathlib import Path

if not __package__:  # run as `python benchmarks/bench_inference.py`: make the `benchmarks` package importable,
    # after site-packages so that the checkout's `kernels/` folder never shadows the Hub `kernels` package
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn
from torchao.quantization import quantize_

from benchmarks import hardware
from benchmarks.data import VOCAB_SIZE
from benchmarks.model import ModelConfig, Transformer, generate
from benchmarks.presets import TRAINING_PRESETS as PRESETS
from benchmarks.timing import measure, synchronize
from bitnet_ao import BitNetPackedLinearWeight, bitnet_inference, bitnet_training
from bitnet_ao.layouts import base_linear, find_blocks, module_at
from bitnet_ao.surgery import apply_bitnet_norms, quantize_filter


def build_variants(config: ModelConfig, dtype: torch.dtype, device: str, surgery: bool = True) -> dict[str, nn.Module]:
    """The dense model, its BitNet training twin and the packed one, from the same seed. ``surgery=False`` keeps
    the plain Llama block (no FAQ norms), the architecture llama.cpp's ``llama`` runs (``bench_gguf.py``)."""
    torch.manual_seed(0)
    dense = Transformer(config).to(device=device, dtype=dtype).eval()
    training = copy.deepcopy(dense)
    if surgery:
        apply_bitnet_norms(training)
        training.to(dtype)  # the inserted norms start in float32
    quantize_(training, bitnet_training(), filter_fn=quantize_filter)
    packed = copy.deepcopy(training)
    quantize_(packed, bitnet_inference(), filter_fn=quantize_filter)
    name = hardware.short_name(dtype)
    return {f"{name} dense": dense, "bitnet training weights": training, "bitnet packed": packed}


def block_linears(model: nn.Module) -> list[nn.Linear]:
    """The linears of the model's transformer blocks (``bitnet_ao.layouts.find_blocks``), the ones ``quantize_``
    makes BitNet: the embedding and the output head are not among them. Under a peft adapter, the adapted linear
    itself (``layouts.base_linear``), not the adapter's own small linears."""
    layout, blocks = find_blocks(model)
    return [base_linear(module_at(block, layout.path(role))) for _, block in blocks for role in layout.block_linears]


def block_weight_bytes(model: nn.Module) -> int:
    """Bytes of the block linears' weights as stored: packed values + scale, or the dense tensor."""
    total = 0
    for module in block_linears(model):
        w = module.weight
        if isinstance(w, BitNetPackedLinearWeight):
            total += w.packed.nbytes + w.scale.nbytes
        else:
            total += w.numel() * w.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=hardware.DTYPE_CHOICES)
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (decode M)")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens per sequence (prefill M / batch)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    dtype = hardware.resolve_dtype(args.dtype, args.device)
    config = ModelConfig(
        vocab_size=VOCAB_SIZE, max_seq_len=args.prompt + args.new_tokens, **PRESETS[args.preset]["model"]
    )
    variants = build_variants(config, dtype, args.device)
    prompt = torch.randint(0, VOCAB_SIZE, (args.batch, args.prompt), device=args.device)
    sync = functools.partial(synchronize, args.device)

    print(hardware.summary(args.device))
    print(f"preset={args.preset} dtype={dtype} batch={args.batch} prompt={args.prompt} new_tokens={args.new_tokens}")
    with torch.inference_mode():
        prefill = measure(
            *(functools.partial(model, prompt) for model in variants.values()), warmup=1, iters=args.iters, sync=sync
        )
    decode = measure(
        *(functools.partial(generate, model, prompt[:, :1], args.new_tokens, dtype) for model in variants.values()),
        warmup=1,
        iters=args.iters,
        sync=sync,
    )
    tokens = {name: generate(model, prompt, args.new_tokens, dtype) for name, model in variants.items()}

    base = next(iter(variants))
    ratio = f"x {hardware.short_name(dtype).upper()}"
    header = (
        f"{'variant':<26} {'prefill tok/s':>14} {ratio:>7} {'decode tok/s':>13} {ratio:>7} {'weight MiB':>11} "
        f"{ratio:>7}"
    )
    print(header)
    print("-" * len(header))
    sizes = {name: block_weight_bytes(model) for name, model in variants.items()}
    for name, t_prefill, t_decode in zip(variants, prefill, decode, strict=True):
        p = args.batch * args.prompt / t_prefill
        d = args.batch * args.new_tokens / t_decode
        p0 = args.batch * args.prompt / prefill[0]
        d0 = args.batch * args.new_tokens / decode[0]
        mib = sizes[name] / 2**20
        print(
            f"{name:<26} {p:14.0f} {p / p0:7.2f} {d:13.1f} {d / d0:7.2f} {mib:11.2f} {sizes[name] / sizes[base]:7.3f}"
        )
    same = torch.equal(tokens["bitnet packed"], tokens["bitnet training weights"])
    print(f"packed and training weights generate the same tokens: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
