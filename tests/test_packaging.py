"""The checkout's ``kernels/`` folder never shadows the Hub ``kernels`` package, however the project is started.

transformers requires the Hugging Face Hub ``kernels`` package and imports it. This project's ``kernels/`` folder is
installed as ``bitnet_ao.kernels``, but it is also importable as a top-level ``kernels`` wherever the checkout's root
stands on sys.path ahead of site-packages (``python -c`` / ``python -m`` / a notebook started in the checkout). These
tests start Python exactly as the README, the docs and each benchmark do, with the Hub package installed (transformers
needs it), and check that transformers gets the Hub package and that ``torch.ops.bitnet_ao`` runs bitnet_ao's own
implementations.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The benchmark scripts (the others in benchmarks/ are their modules).
BENCHMARKS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if 'if __name__ == "__main__":' in p.read_text())

# torch.ops.bitnet_ao must call bitnet_ao.kernels' implementations: a backend registered through bitnet_ao.kernels
# has to see the call (a second copy of the ops, registered from another import of the folder, would not).
_OPS_RUN_BITNET_AO = """
calls = []
def probe(x, eps):
    calls.append(eps)
    return bitnet_ao.kernels.reference.quantize_rowwise(x, eps)

bitnet_ao.kernels.register_backend("probe", types.SimpleNamespace(quantize_rowwise=probe))
with bitnet_ao.kernels.use_backend("probe"):
    torch.ops.bitnet_ao.quantize_rowwise(torch.ones(2, 3), 0.5)
assert calls == [0.5], "torch.ops.bitnet_ao does not run bitnet_ao.kernels' implementation"
"""

# Runs after the launch's own start-up: transformers and a Llama forward, bitnet_ao on it, then where each name
# came from. The Hub package's distribution says where it lives; transformers must have imported that one.
_CHECK = (
    """
import importlib.metadata, importlib.util, sys, types
from pathlib import Path

import torch
import transformers
from torchao.quantization import quantize_

import bitnet_ao
import bitnet_ao.kernels

config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2)
model = transformers.LlamaForCausalLM(config)
quantize_(model, bitnet_ao.bitnet_training(),
          filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn)
logits = model(torch.tensor([[1, 2, 3]])).logits
assert logits.shape == (1, 3, 64) and logits.isfinite().all()

hub = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py").resolve()
assert Path(sys.modules["kernels"].__file__).resolve() == hub, sys.modules["kernels"].__file__
assert transformers.utils.import_utils.is_kernels_available()
checkout = Path(sys.argv[1]).resolve()
assert Path(bitnet_ao.kernels.__file__).resolve() == checkout / "kernels" / "__init__.py", bitnet_ao.kernels.__file__

"""
    + _OPS_RUN_BITNET_AO
    + """
print("hub kernels ok")
"""
)


def _launch_as_script(script: Path) -> list[str]:
    """``python benchmarks/NAME.py``: sys.path[0] is the script's folder, then the script's own top level runs
    (its sys.path set-up and imports; ``main`` does not, the run name is not ``__main__``)."""
    rel = script.relative_to(ROOT)
    start = f"import runpy, sys; sys.path[0] = {str(script.parent)!r}; runpy.run_path({str(rel)!r}, run_name='probe')"
    return [sys.executable, "-c", start + "\n" + _CHECK]


def _launch_as_module(script: Path) -> list[str]:
    """``python -m benchmarks.NAME`` from the checkout: sys.path[0] is the checkout."""
    run = f"runpy.run_module('benchmarks.{script.stem}', run_name='probe', alter_sys=True)"
    start = f"import os, runpy, sys; sys.path[0] = os.getcwd(); {run}"
    return [sys.executable, "-c", start + "\n" + _CHECK]


LAUNCHES = {
    "python -c (a notebook, a shell in the checkout)": [sys.executable, "-c", _CHECK],
    **{f"python benchmarks/{s.name}": _launch_as_script(s) for s in BENCHMARKS},
    "python -m benchmarks.pretrain": _launch_as_module(ROOT / "benchmarks" / "pretrain.py"),
}


@pytest.mark.slow
def test_every_launch_gets_the_hub_kernels_package():
    """Every way the README, the docs and the benchmarks start Python, run from the checkout (in parallel)."""
    procs = {
        name: subprocess.Popen([*argv, str(ROOT)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, argv in LAUNCHES.items()
    }
    failed = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0 or "hub kernels ok" not in out:
            failed[name] = err[-2000:]
    assert not failed, "\n\n".join(f"{name}:\n{err}" for name, err in failed.items())


def test_this_test_process_imports_the_installed_packages():
    """The README's test command (and `python -m pytest`, which puts the checkout first): transformers' probe finds
    the Hub package, bitnet_ao is the installed one."""
    import transformers.utils.import_utils

    import bitnet_ao

    assert transformers.utils.import_utils.is_kernels_available()
    import kernels

    assert (
        Path(kernels.__file__).resolve()
        == importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py").resolve()
    )
    assert Path(bitnet_ao.__file__).parent.resolve() == ROOT / "bitnet_ao"  # the editable install's files


# The folder imported under its own name, with no Hub package to hand over to (find_spec hides it): it must define
# and register nothing. torch.library would silently replace each op's implementation with a second copy's, whose
# backends the real package's register_backend / use_backend miss.
_FOLDER_ALONE = (
    """
import importlib.machinery, sys, types

sys.path.insert(0, sys.argv[1])
find_spec = importlib.machinery.PathFinder.find_spec
importlib.machinery.PathFinder.find_spec = classmethod(
    lambda cls, name, path=None, target=None: None if name == "kernels" and path is not None
    else find_spec(name, path, target)
)
import torch

import bitnet_ao.kernels
import kernels

assert kernels is not bitnet_ao.kernels and kernels.__file__.startswith(sys.argv[1]), kernels.__file__
assert not [name for name in vars(kernels) if not name.startswith("__")], sorted(vars(kernels))
assert not [name for name in sys.modules if name.startswith("kernels.")], sorted(sys.modules)
"""
    + _OPS_RUN_BITNET_AO
    + """
print("registered once")
"""
)


def test_top_level_kernels_name_registers_nothing():
    out = subprocess.run([sys.executable, "-c", _FOLDER_ALONE, str(ROOT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "registered once" in out.stdout, out.stderr[-3000:]


def test_benchmarks_never_put_the_checkout_ahead_of_site_packages():
    """A benchmark that inserted the checkout's root at the front of sys.path would shadow the Hub package again."""
    for script in BENCHMARKS:
        source = script.read_text()
        assert "sys.path.insert" not in source and "sys.path[0]" not in source, script.name


def test_no_benchmark_module_shadows_an_installed_package():
    """``python benchmarks/<script>.py`` puts benchmarks/ first on sys.path, so a module there named like an installed
    package (``llama_cpp``, ``gguf``, ``transformers``) replaces it for every script: ``pretrain.py --save-gguf``
    once got ``benchmarks/llama_cpp.py`` for llama-cpp-python."""
    installed = {
        Path(file.parts[0]).stem
        for dist in importlib.metadata.distributions()
        for file in dist.files or ()
        if not file.parts[0].endswith((".dist-info", ".egg-info", ".data", ".pth"))
    }
    installed |= set(sys.stdlib_module_names)
    ours = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"__init__"}
    assert not ours & installed, f"benchmarks/ modules named like installed packages: {sorted(ours & installed)}"


def test_every_kernel_source_ships_in_the_package():
    """The C/C++ sources and headers compiled on first use are package data: a file in ``kernels/`` that no pattern
    of ``[tool.setuptools.package-data]`` matches would be missing from an installed wheel, and its kernels would
    silently fall back to torch there."""
    import fnmatch

    import tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = patterns["bitnet_ao.kernels"]
    sources = [p.name for p in (ROOT / "kernels").iterdir() if p.is_file() and p.suffix not in (".py", ".pyc")]
    assert sources and all(any(fnmatch.fnmatch(name, pat) for pat in shipped) for name in sources), (sources, shipped)
