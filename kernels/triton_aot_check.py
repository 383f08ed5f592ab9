"""Compile every Triton kernel for CUDA architectures on a machine without a GPU, and say what came out.

The tests without a GPU run the kernels in Triton's interpreter, which checks the math but not the GPU lowering:
the int8 tensor-core instructions, the join/reshape that unpacks 2-bit weights, float64 reductions, shared memory.
This compiles each kernel to a cubin (Triton ships ``ptxas``) with the specializations a real launch gets (16-byte
aligned pointers, strides of 1 as constants, multiples of 16 marked divisible) and reports per kernel the shared
memory, the MMA instruction and whether global loads are pipelined (``cp.async``).

    python -m bitnet_ao.kernels.triton_aot_check                 # sm_80 and sm_90, two configs per layout
    python -m bitnet_ao.kernels.triton_aot_check --arch 89 --all-configs

It uses Triton's compiler entry points (``ASTSource``, ``GPUTarget``), which are not a stable API (see
``bitnet_ao.kernels.private_api``).
``TRITON_INTERPRET`` must be unset: interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import triton

from . import triton_mm, triton_quant
from .private_api import triton_compiler
from .triton_common import INTERPRET

ASTSource, GPUTarget = triton_compiler()

#: Problem size the launch specializations are taken from (every stride a multiple of 16, or 1).
SIZE = 4096
#: name -> (B mode, strides of A and B) as the BitNet linear passes the operands.
MM_LAYOUTS: dict[str, tuple[int, dict[str, int]]] = {
    "NT": (triton_mm.B_INT8, {"stride_am": SIZE, "stride_ak": 1, "stride_b0": 1, "stride_b1": SIZE}),
    "NN": (triton_mm.B_INT8, {"stride_am": SIZE, "stride_ak": 1, "stride_b0": SIZE, "stride_b1": 1}),
    "TN": (triton_mm.B_INT8, {"stride_am": 1, "stride_ak": SIZE, "stride_b0": SIZE, "stride_b1": 1}),
    "packed NT": (triton_mm.B_PACKED_T, {"stride_am": SIZE, "stride_ak": 1, "stride_b0": SIZE // 4, "stride_b1": 1}),
    "packed NN": (triton_mm.B_PACKED, {"stride_am": SIZE, "stride_ak": 1, "stride_b0": SIZE // 4, "stride_b1": 1}),
}

Case = tuple[str, Any, dict[str, Any], dict[str, Any], int, int]  # label, kernel, args, constexprs, warps, stages


def _mm_cases(configs: list[triton.Config]) -> Iterator[Case]:
    pointers = {
        "a_ptr": "*i8", "b_ptr": "*i8", "c_ptr": "*bf16", "row_ptr": "*fp32", "col_ptr": "*fp32",
        "scale_ptr": "*fp32", "bias_ptr": "*bf16",
    }  # fmt: skip
    sizes = {name: SIZE for name in ("M", "N", "K", "M_BUCKET", "N_BUCKET", "K_BUCKET")}
    for layout, (mode, strides) in MM_LAYOUTS.items():
        for config in configs:
            flags = {
                "B_MODE": mode, "A_K_CONTIGUOUS": strides["stride_ak"] == 1, "HAS_ROW": True, "HAS_COL": False,
                "HAS_SCALE": True, "HAS_BIAS": True, "GROUP_M": triton_mm.GROUP_M, **config.kwargs,
            }  # fmt: skip
            tile = "x".join(str(config.kwargs[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            yield (
                f"scaled_mm {layout} {tile}", triton_mm._scaled_mm_kernel, {**pointers, **sizes, **strides}, flags,
                config.num_warps, config.num_stages,
            )  # fmt: skip


def _quant_cases() -> Iterator[Case]:
    q = triton_quant
    row = {"M": SIZE, "K": SIZE, "stride_xm": SIZE, "stride_xk": 1, "eps": 1e-5}
    col = {"M": SIZE, "N": SIZE, "stride_gm": SIZE, "stride_gn": 1}
    weight = {"R": SIZE, "C": SIZE, "stride_wr": SIZE, "stride_wc": 1}
    for one_pass in (True, False):
        yield (
            f"quantize_rowwise one_pass={one_pass}", q._quantize_rowwise_kernel,
            {"x_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32", **row},
            {"BLOCK_M": 1, "BLOCK_K": SIZE, "ONE_PASS": one_pass}, 8, 1,
        )  # fmt: skip
    yield (
        "colwise absmax", q._colwise_absmax_kernel,
        {"g_ptr": "*bf16", "rs_ptr": "*fp32", "part_ptr": "*fp32", **col, "rows_per_split": SIZE},
        {"BLOCK_M": 64, "BLOCK_N": 64}, 8, 1,
    )  # fmt: skip
    yield (
        "colwise quantize", q._colwise_quantize_kernel,
        {"g_ptr": "*bf16", "rs_ptr": "*fp32", "part_ptr": "*fp32", "q_ptr": "*i8", "s_ptr": "*fp32", **col,
         "eps": 1e-30, "num_splits": 8},
        {"SPLIT_POW2": 8, "BLOCK_M": 64, "BLOCK_N": 64}, 8, 1,
    )  # fmt: skip
    yield (
        "weight_stats partial", q._weight_stats_partial_kernel,
        {"w_ptr": "*bf16", "part_ptr": "*fp64", "R": SIZE, "C": SIZE, "stride_r": SIZE, "stride_c": 1,
         "num_parts": SIZE},
        {"BLOCK_R": 4, "BLOCK_C": 1024}, 8, 1,
    )  # fmt: skip
    yield (
        "weight_stats final", q._weight_stats_final_kernel,
        {"part_ptr": "*fp64", "out_ptr": "*fp64", "num_parts": SIZE}, {"CHUNK": q.STATS_CHUNK}, 4, 1,
    )  # fmt: skip
    for binary, transpose in ((False, True), (True, False)):
        out_strides = {"stride_or": 1, "stride_oc": SIZE} if transpose else {"stride_or": SIZE, "stride_oc": 1}
        yield (
            f"{'binarize' if binary else 'ternarize'} transpose={transpose}", q._weight_to_int8_kernel,
            {"w_ptr": "*bf16", "p_ptr": "*fp32", "out_ptr": "*i8", **weight, **out_strides},
            {"BINARY": binary, "BLOCK_R": 32, "BLOCK_C": 128}, 8, 1,
        )  # fmt: skip


def compile_case(case: Case, arch: int) -> Any:
    """Compile one kernel as a launch with these arguments would specialize it; returns Triton's compiled kernel."""
    _, kernel, args, constexprs, num_warps, num_stages = case
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    constants = dict(constexprs)
    for index, name in enumerate(kernel.arg_names):
        value = args.get(name)
        if name in constants:
            signature[name] = "constexpr"
        elif isinstance(value, str):  # pointer: torch allocations are 16-byte aligned (the scalar scale aside)
            signature[name] = value
            if name != "scale_ptr" and name != "p_ptr":
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:  # what Triton does with an int argument equal to 1
            signature[name] = "constexpr"
            constants[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def describe(compiled: Any) -> str:
    ptx = compiled.asm["ptx"]
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "-"
    loads = "cp.async" if "cp.async" in ptx else "registers"
    return f"shared {compiled.metadata.shared:>6} B  mma {mma:<8}  global loads via {loads}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 89 90")
    parser.add_argument("--all-configs", action="store_true", help="every autotune config, not two per layout")
    args = parser.parse_args()
    if INTERPRET:
        raise SystemExit("triton_aot_check: unset TRITON_INTERPRET; interpreted kernels cannot be compiled")
    configs = triton_mm.AUTOTUNE_CONFIGS if args.all_configs else triton_mm.AUTOTUNE_CONFIGS[2::6]
    for arch in args.arch:
        for case in [*_mm_cases(configs), *_quant_cases()]:
            print(f"sm_{arch}  {case[0]:<36} {describe(compile_case(case, arch))}", flush=True)


if __name__ == "__main__":
    main()
