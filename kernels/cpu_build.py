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


@functools.cache
def load(source: Path) -> ctypes.CDLL | None:
    """``source`` compiled for this machine (cached) and loaded, or ``None`` after a warning that says why."""
    cc = compiler()
    if cc is None:
        warnings.warn(
            f"bitnet_ao: no C compiler found for {source.name}; its torch fallback runs instead", stacklevel=3
        )
        return None
    # -ffp-contract=off: no fused multiply-adds, every float operation rounds where torch's does.
    flags = ["-O3", march(), "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
    # -march=native builds for the machine that compiles: the key names the machine too.
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]  # what the sources #include
    key = hashlib.sha256(
        b"\0".join([source.read_bytes(), *headers, cc.encode(), " ".join(flags).encode(), cpu_signature().encode()])
    ).hexdigest()[:16]
    path = cache_dir() / f"{source.stem}-{key}.so"
    if not path.exists():
        try:
            error = _build(cc, flags, source, path)
        except OSError as e:  # an unwritable cache directory, a compiler that cannot start
            error = str(e)
        if error is not None:
            warnings.warn(
                f"bitnet_ao: building {source.name} failed ({cc} {' '.join(flags)}); its torch fallback runs "
                f"instead:\n{error[-2000:]}",
                stacklevel=3,
            )
            return None
    return ctypes.CDLL(str(path))


def cxx_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def load_torch_library(source: Path, c_sources: tuple[Path, ...], defines: dict[str, str]) -> Path | None:
    """The C++ operator library ``source`` (``TORCH_LIBRARY`` registrations) built against this torch with the C
    files ``c_sources`` linked in, cached like :func:`load` and loaded with ``torch.ops.load_library``; its path, or
    ``None`` after a warning that says why (no compiler, a failed build: the Python ops serve instead).

    The C files are compiled as C (``cpu_rows.h`` uses C's ``_Float16``) with :func:`load`'s flags, the C++ file
    with torch's headers, its C++ ABI and ``defines`` (``-DNAME=VALUE``), and both linked against ``libtorch``."""
    import torch
    from torch.utils import cpp_extension

    cc, cxx = compiler(), cxx_compiler()
    if cc is None or cxx is None:
        warnings.warn(f"bitnet_ao: no C/C++ compiler for {source.name}; the Python ops serve instead", stacklevel=3)
        return None
    c_flags = ["-O3", march(), "-ffp-contract=off", "-fopenmp", "-fPIC"]
    abi = int(torch.compiled_with_cxx11_abi())
    cxx_flags = [
        "-O3", march(), "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", "-std=c++20",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-D{k}={v}" for k, v in sorted(defines.items())),
        *(f"-I{p}" for p in cpp_extension.include_paths()),
    ]  # fmt: skip
    libs = [*(f"-L{p}" for p in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu", "-ltorch"]
    libs += [f"-Wl,-rpath,{p}" for p in cpp_extension.library_paths()]
    sources = [source, *c_sources, *sorted(source.parent.glob("*.h"))]
    key = hashlib.sha256(
        b"\0".join([*(s.read_bytes() for s in sources), cc.encode(), cxx.encode(), " ".join(c_flags + cxx_flags + libs)
                    .encode(), torch.__version__.encode(), cpu_signature().encode()])
    ).hexdigest()[:16]  # fmt: skip
    path = cache_dir() / f"{source.stem}-{key}.so"
    if not path.exists():
        try:
            error = _build_torch_library(cc, cxx, c_flags, cxx_flags, libs, source, c_sources, path)
        except OSError as e:
            error = str(e)
        if error is not None:
            warnings.warn(
                f"bitnet_ao: building {source.name} failed; the Python ops serve instead:\n{error[-2000:]}",
                stacklevel=3,
            )
            return None
    torch.ops.load_library(str(path))
    return path


def _build_torch_library(
    cc: str,
    cxx: str,
    c_flags: list[str],
    cxx_flags: list[str],
    libs: list[str],
    source: Path,
    c_sources: tuple[Path, ...],
    path: Path,
) -> str | None:
    """Compile the C files to objects and link them with the C++ file into ``path``; the error output, or ``None``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        objects = []
        for c_source in c_sources:
            obj = Path(tmp) / f"{c_source.stem}.o"
            result = subprocess.run([cc, *c_flags, "-c", str(c_source), "-o", str(obj)], capture_output=True, text=True)
            if result.returncode != 0:
                return result.stderr or f"exit status {result.returncode}"
            objects.append(str(obj))
        built = Path(tmp) / path.name
        result = subprocess.run(
            [cxx, *cxx_flags, str(source), *objects, "-o", str(built), *libs], capture_output=True, text=True
        )
        if result.returncode != 0:
            return result.stderr or f"exit status {result.returncode}"
        os.replace(built, path)
    return None


def _build(cc: str, flags: list[str], source: Path, path: Path) -> str | None:
    """Compile ``source`` to ``path``; the compiler's error output on failure, else ``None``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = Path(tmp) / path.name
        result = subprocess.run(
            [cc, *flags, str(source), "-o", str(built)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            return result.stderr or f"exit status {result.returncode}"
        os.replace(built, path)  # atomic: concurrent ranks never load a half-written library
    return None
