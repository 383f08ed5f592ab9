"""The hardware a benchmark runs on, and the dense baseline that is fair to compare BitNet against there.

CPUs differ (issue "[cpu]"): with AVX-512 BF16 or AMX a BF16 matmul runs natively and users train under BF16
autocast, as on CUDA; on an AVX2-only CPU (AMD Zen 3: no VNNI, no native BF16) it falls back to scalar code
(1-12 GFLOPS against ~75 GFLOPS in FP32), so users there train in FP32, and beating a scalar-fallback BF16 run
would be a meaningless win. Every benchmark therefore takes its dense baseline from :func:`baseline_dtype` and
prints :func:`summary`, so that a figure always comes with the hardware and the int8 route that produced it.
"""

from __future__ import annotations

import os
import platform

import torch

from bitnet_ao.kernels import cpu_build, cpu_matmul
from bitnet_ao.kernels.private_api import cpu_has_int8_dot_product, cpu_has_native_bf16

#: The ``--dtype`` choices of the benchmarks: ``auto`` is :func:`baseline_dtype`.
DTYPE_CHOICES = ("auto", "bfloat16", "float32")

#: How run names ("fp32") and column headers (upper-cased: "FP32") spell a dtype.
SHORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def baseline_dtype(device: torch.device | str) -> torch.dtype:
    """The activation dtype a user of this hardware trains with: bfloat16 on CUDA and on CPUs that multiply BF16
    natively, float32 elsewhere (there a BF16 matmul is scalar code, slower than FP32)."""
    if torch.device(device).type == "cuda" or cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """A ``--dtype`` value as a dtype: ``auto`` becomes :func:`baseline_dtype`, any other name is a torch dtype."""
    return baseline_dtype(device) if name == "auto" else getattr(torch, name)


def short_name(dtype: torch.dtype | str) -> str:
    """``fp32``/``bf16``/``fp16`` for a dtype or its torch name (``"float32"``, as the JSON stores it)."""
    return SHORT_NAMES[getattr(torch, dtype) if isinstance(dtype, str) else dtype]


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), or what ``platform`` knows where there is no /proc."""
    return cpu_build.cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_family_model() -> str:
    """``family F model M`` as lscpu prints them: two EPYCs of one marketing name can be Zen 1 (family 23) or
    Zen 3 (family 25), whose int8 speeds differ by 2x."""
    info = cpu_build.cpuinfo()
    return f"family {info.get('cpu family', '?')} model {info.get('model', '?')}"


def describe(device: torch.device | str) -> dict:
    """The hardware as data, for the JSON: speed figures mean nothing without it."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"device": "cuda", "gpu": torch.cuda.get_device_name(device)}
    return {
        "device": "cpu",
        "cpu": cpu_model(),
        "family_model": cpu_family_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
        "int8_dot_product": cpu_has_int8_dot_product(),
        "int8_routes": cpu_matmul.routes(),
        # How each route was chosen and the GOPS every candidate measured (cpu_matmul.route_report).
        "int8_route_measurements": cpu_matmul.route_report(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


def summary(device: torch.device | str) -> str:
    """:func:`describe` in one line, printed first by every benchmark."""
    info = describe(device)
    if info["device"] == "cuda":
        return f"CUDA: {info['gpu']}"
    bf16 = "native BF16" if info["native_bf16"] else "no native BF16"
    routes = "; ".join(
        f"{kind}={entry['route']} ({_speeds(entry)})" for kind, entry in info["int8_route_measurements"].items()
    )
    return (
        f"CPU: {info['cpu']}, {info['family_model']} ({info['capability']}, {bf16}), {info['threads']} threads; "
        f"int8 routes: {routes}"
    )


def _speeds(entry: dict) -> str:
    """A route choice in words: forced, or every candidate's measured GOPS."""
    if entry["how"] == "forced":
        return "forced"
    gops = ", ".join(f"{route} {value:.0f}" for route, value in sorted(entry["gops"].items(), key=lambda kv: -kv[1]))
    return f"GOPS {gops}; {entry['how']}"
