"""Build a C source of this folder for this CPU on first use, and load it: the one place that knows the flags, the
compiler and the cache.

Each kernel module (``cpu_gemv.py``, ``cpu_sign_gemm.py``) hands :func:`load` its ``.c`` file and gets a
``ctypes.CDLL`` back, or ``None`` (after a one-time warning) when no compiler works, so the caller takes its torch
path instead. Built with the C compiler inductor uses (``CC``, else ``cc``/``gcc``/``clang``), ``-O3 -march=native
-ffp-contract=off -fopenmp``; cached per machine in ``BITNET_AO_CACHE_DIR`` (default ``~/.cache/bitnet_ao``). When
torch is told to stay at AVX2 (``ATEN_CPU_CAPABILITY=avx2``) the kernels are built for ``x86-64-v3`` (AVX2 + FMA)
instead, so an AVX-512 machine runs the AVX2 code (the instruction set, not the datapath width of an AVX2 CPU).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path


def march() -> str:
    """The ``-march`` the kernels are built with (see the module docstring)."""
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if platform.machine().lower() in ("x86_64", "amd64") and capability in ("avx2", "default"):
        return "-march=x86-64-v3" if capability == "avx2" else "-march=x86-64"
    return "-march=native"


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("BITNET_AO_CACHE_DIR", Path.home() / ".cache" / "bitnet_ao"))


def cpuinfo() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (``model name``, ``cpu family``, ``model``, ``flags``...);
    empty where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in lines:
        if not line.strip():
            break  # the end of the first processor
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_signature() -> str:
    """What a ``-march=native`` build depends on: the architecture, the CPU model and its feature flags."""
    fields = cpuinfo()
    return f"{platform.machine()} {fields.get('model name', platform.processor())} {fields.get('flags', '')}"


def c_flags() -> list[str]:
    """The flags every kernel source is compiled with. -ffp-contract=off: no fused multiply-adds, every float
    operation rounds where torch's does; -march: :func:`march`."""
    return ["-O3", march(), "-ffp-contract=off", "-fopenmp", "-fPIC"]


@functools.cache
def load(source: Path) -> ctypes.CDLL | None:
    """``source`` compiled for this machine (cached) and loaded, or ``None`` after a warning that says why."""
    cc = compiler()
    if cc is None:
        warnings.warn(
            f"bitnet_ao: no C compiler found for {source.name}; its torch fallback runs instead", stacklevel=3
        )
        return None
    flags = [*c_flags(), "-shared"]
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]  # what the sources #include
    path = _cached_build(
        source,
        [source.read_bytes(), *headers, cc.encode(), " ".join(flags).encode()],
        lambda tmp, built: [[cc, *flags, str(source), "-o", str(built)]],
        f"{cc} {' '.join(flags)}",
        "its torch fallback runs instead",
    )
    return ctypes.CDLL(str(path)) if path is not None else None


def cxx_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def load_torch_library(source: Path, c_sources: tuple[Path, ...], defines: dict[str, str]) -> Path | None:
    """The C++ operator library ``source`` (``TORCH_LIBRARY`` registrations) built against this torch with the C
    files ``c_sources`` linked in, cached like :func:`load` and loaded with ``torch.ops.load_library``; its path, or
    ``None`` after a warning that says why (no compiler, a failed build: the Python ops serve instead).

    The C files are compiled as C (``cpu_rows.h`` uses C's ``_Float16``) with :func:`c_flags`, the C++ file with
    them, torch's headers, its C++ ABI and ``defines`` (``-DNAME=VALUE``), and both linked against ``libtorch``."""
    import torch
    from torch.utils import cpp_extension

    cc, cxx = compiler(), cxx_compiler()
    if cc is None or cxx is None:
        warnings.warn(f"bitnet_ao: no C/C++ compiler for {source.name}; the Python ops serve instead", stacklevel=3)
        return None
    abi = int(torch.compiled_with_cxx11_abi())
    cxx_flags = [
        *c_flags(), "-shared", "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-D{k}={v}" for k, v in sorted(defines.items())), *(f"-I{p}" for p in cpp_extension.include_paths()),
    ]  # fmt: skip
    libs = [*(f"-L{p}" for p in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu", "-ltorch"]
    libs += [f"-Wl,-rpath,{p}" for p in cpp_extension.library_paths()]

    def commands(tmp: Path, built: Path) -> list[list[str]]:
        objects = [str(tmp / f"{c.stem}.o") for c in c_sources]
        compile_c = [[cc, *c_flags(), "-c", str(c), "-o", o] for c, o in zip(c_sources, objects, strict=True)]
        return [*compile_c, [cxx, *cxx_flags, str(source), *objects, "-o", str(built), *libs]]

    sources = [source, *c_sources, *sorted(source.parent.glob("*.h"))]
    flags = " ".join([*c_flags(), *cxx_flags, *libs])
    path = _cached_build(
        source,
        [*(s.read_bytes() for s in sources), cc.encode(), cxx.encode(), flags.encode(), torch.__version__.encode()],
        commands,
        f"{cc} and {cxx}, against torch {torch.__version__}",
        "the Python ops serve instead",
    )
    if path is not None:
        torch.ops.load_library(str(path))
    return path


def _cached_build(
    source: Path,
    key_parts: list[bytes],
    commands: Callable[[Path, Path], list[list[str]]],
    how: str,
    fallback: str,
) -> Path | None:
    """The library built from ``source`` in the cache, keyed by ``key_parts`` and this machine (a -march=native
    build is for the machine that compiles); built when missing by ``commands(tmp, built)``, run in order in a
    temporary folder of the cache, the last writing ``built``. ``None`` after a warning that names ``how`` it was
    built, says what runs instead (``fallback``) and quotes the error."""
    key = hashlib.sha256(b"\0".join([*key_parts, cpu_signature().encode()])).hexdigest()[:16]
    path = cache_dir() / f"{source.stem}-{key}.so"
    if path.exists():
        return path
    try:
        error = _build(commands, path)
    except OSError as e:  # an unwritable cache directory, a compiler that cannot start
        error = str(e)
    if error is None:
        return path
    warnings.warn(f"bitnet_ao: building {source.name} failed ({how}); {fallback}:\n{error[-2000:]}", stacklevel=4)
    return None


def _build(commands: Callable[[Path, Path], list[list[str]]], path: Path) -> str | None:
    """Run the build ``commands`` into ``path``; the failing command's error output, else ``None``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = Path(tmp) / path.name
        for command in commands(Path(tmp), built):
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                return result.stderr or f"exit status {result.returncode}"
        os.replace(built, path)  # atomic: concurrent ranks never load a half-written library
    return None
