"""``kernels/`` is the ``bitnet_ao.kernels`` package; imported under its folder's name it is an empty module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run with the checkout's root first on sys.path, where `kernels` names this folder. Once bitnet_ao is imported,
# transformers' probe for the Hub `kernels` package imports it (no package metadata: its last resort). Executing the
# folder under that name must define and register nothing: torch.library would silently replace each op's
# implementation with the second copy's, whose backends the real package's register_backend / use_backend miss.
_IMPORT_AND_PROBE = """
import sys
import types

sys.path.insert(0, sys.argv[1])
import torch
from transformers.utils.import_utils import is_kernels_available

import bitnet_ao.kernels

assert not is_kernels_available(), "this folder was taken for the Hub kernels package"
import kernels  # what the probe imported

assert kernels is not bitnet_ao.kernels and kernels.__file__.startswith(sys.argv[1]), kernels.__file__
assert not [name for name in vars(kernels) if not name.startswith("__")], sorted(vars(kernels))
assert not [name for name in sys.modules if name.startswith("kernels.")], sorted(sys.modules)
calls = []


def probe(x, eps):
    calls.append(eps)
    return bitnet_ao.kernels.reference.quantize_rowwise(x, eps)


bitnet_ao.kernels.register_backend("probe", types.SimpleNamespace(quantize_rowwise=probe))
with bitnet_ao.kernels.use_backend("probe"):
    torch.ops.bitnet_ao.quantize_rowwise(torch.ones(2, 3), 0.5)
assert calls == [0.5], "torch.ops.bitnet_ao no longer runs bitnet_ao.kernels' implementation"
print("registered once")
"""


def test_top_level_kernels_name_registers_nothing():
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_AND_PROBE, str(ROOT)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "registered once" in out.stdout, out.stderr[-3000:]
