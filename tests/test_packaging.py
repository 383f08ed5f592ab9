"""``kernels/`` is the ``bitnet_ao.kernels`` package, never a second top-level ``kernels`` copy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_kernels_name_is_the_one_real_package():
    # With a checkout's root first on sys.path, `import kernels` (as transformers' probe for the Hub `kernels`
    # package does) must not execute the folder again: that would register every torch.library op twice.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import kernels, bitnet_ao.kernels;"
        "assert kernels is bitnet_ao.kernels, kernels;"
        "assert not any(name.startswith('kernels.') for name in sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code, str(ROOT)], check=True, timeout=120)
