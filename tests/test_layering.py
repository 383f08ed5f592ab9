"""The package imports one way: every module of bitnet_ao/ and kernels/ imports only modules listed before it in
:data:`ORDER` (docs/design.md draws the same order). Imports inside functions count too: a lazy import that
reaches back up is still a cycle, only a hidden one.

Run it alone with ``pytest tests/test_layering.py``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Every module, lowest first. A new module must be placed here, where its imports allow.
ORDER = [
    # leaves: the private torch APIs of bitnet_ao/, the recipe, the module helpers of the quantize_ handlers
    "bitnet_ao.private_api",
    "bitnet_ao.config",
    "bitnet_ao.layouts",
    "bitnet_ao.module_helpers",
    # kernels (self-contained: nothing from bitnet_ao outside them): their private torch/Triton APIs, the numerics
    # contract as code, the backends, the custom ops
    "bitnet_ao.kernels.private_api",
    "bitnet_ao.kernels.ranges",
    "bitnet_ao.kernels.reference",
    "bitnet_ao.kernels.cpu_build",
    "bitnet_ao.kernels.scratch",
    "bitnet_ao.kernels.cpu_sign_gemm",
    "bitnet_ao.kernels.cpu_passes",
    "bitnet_ao.kernels.cpu_vnni_gemm",
    "bitnet_ao.kernels.cpu_matmul",
    "bitnet_ao.kernels.cpu_gemv",
    "bitnet_ao.kernels.torch_backend",
    "bitnet_ao.kernels.cpu_ops",
    "bitnet_ao.kernels.triton_common",
    "bitnet_ao.kernels.triton_quant",
    "bitnet_ao.kernels.triton_mm",
    "bitnet_ao.kernels.triton_backend",
    "bitnet_ao.kernels.triton_aot_check",
    "bitnet_ao.kernels.ops",
    "bitnet_ao.kernels",
    # weight math and other leaves over the kernels
    "bitnet_ao.weight_quant",
    "bitnet_ao.packing",
    "bitnet_ao.norm",
    "bitnet_ao.group_scales",
    # the autograd function and the weight interface it talks to
    "bitnet_ao.linear",
    # weight kinds: what they share, then each kind (the master weight's FSDP2 all-gather math and merge watcher
    # below it), then their checkpoint hooks
    "bitnet_ao.weight_base",
    "bitnet_ao.packed",
    "bitnet_ao.fsdp_gather",
    "bitnet_ao.merge_watch",
    "bitnet_ao.tensor",
    "bitnet_ao.checkpoint_hooks",
    # fine-tuning: quantization warmup of master weights
    "bitnet_ao.warmup",
    # the quantize_ handlers: the body both recipes share, training, deployment (freezing into packed weights)
    "bitnet_ao.conversion",
    "bitnet_ao.training",
    "bitnet_ao.inference",
    # integrations
    "bitnet_ao.fsdp",
    "bitnet_ao.surgery",
    "bitnet_ao.distill",
    "bitnet_ao.tensor_parallel",
    "bitnet_ao",
    "bitnet_ao.integrations",
    "bitnet_ao.integrations.export_checks",
    "bitnet_ao.integrations.transformers",
    "bitnet_ao.integrations.gguf.quants",
    "bitnet_ao.integrations.gguf.plan",
    "bitnet_ao.integrations.gguf.vocab",
    "bitnet_ao.integrations.gguf.writer",
    "bitnet_ao.integrations.gguf",
    "bitnet_ao.integrations.trainer",
    "bitnet_ao.integrations.torchtitan.converter",
    "bitnet_ao.integrations.torchtitan.hooks",
    "bitnet_ao.integrations.torchtitan.config_registry",
    "bitnet_ao.integrations.torchtitan",
]


#: The benchmarks, lowest first: shared modules, then the scripts. A script may import a shared module or a script
#: listed before it, never one after it (no circles: bench_gguf -> bench_inference -> pretrain -> bench_gguf was one).
BENCHMARK_ORDER = [
    "benchmarks.hardware",
    "benchmarks.timing",
    "benchmarks.memory",
    "benchmarks.data",
    "benchmarks.model",
    "benchmarks.presets",
    "benchmarks.step_profile",
    "benchmarks.training_loop",
    "benchmarks.report",
    "benchmarks.bench_inference",
    "benchmarks.llama_cpp_runs",
    "benchmarks.pretrain",
    "benchmarks.finetune",
    "benchmarks.bench_gguf",
    "benchmarks.bench_cpu_routes",
    "benchmarks.bench_fsdp",
    "benchmarks.bench_kernels",
    "benchmarks.bench_linear",
    "benchmarks",
]


def _benchmark_files() -> dict[str, Path]:
    files = {f"benchmarks.{p.stem}": p for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__"}
    return {**files, "benchmarks": ROOT / "benchmarks" / "__init__.py"}


def test_benchmarks_import_one_way():
    files = _benchmark_files()
    assert sorted(files) == sorted(BENCHMARK_ORDER), "add new benchmark modules to BENCHMARK_ORDER"
    upward = _upward_imports(files, BENCHMARK_ORDER)
    assert not upward, "benchmark modules importing upward (or in a circle):\n" + "\n".join(upward)


def _module_files() -> dict[str, Path]:
    """Module name -> file, for the installed layout (``kernels/`` is ``bitnet_ao.kernels``)."""
    files = {}
    for folder, package in ((ROOT / "bitnet_ao", "bitnet_ao"), (ROOT / "kernels", "bitnet_ao.kernels")):
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def _imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``name`` imports anywhere in its file (module level or inside functions), relative imports
    resolved; ``from package import x`` counts as importing ``package.x`` when that is one of the ``known`` modules."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from package import submodule` imports the submodule; `from module import name` the module.
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        found.update(targets)
    found.discard(name)
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (module level or inside functions)."""
    return _imported_modules(name, path, known) & known


def _outside_kernels(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of bitnet_ao outside ``bitnet_ao.kernels`` that the kernel module ``name`` imports."""
    return {
        target
        for target in _imported_modules(name, path, known)
        if (target == "bitnet_ao" or target.startswith("bitnet_ao."))
        and not (target == "bitnet_ao.kernels" or target.startswith("bitnet_ao.kernels."))
    }


def test_every_module_is_placed_in_the_order():
    assert sorted(_module_files()) == sorted(ORDER), "add new modules to ORDER (and to docs/design.md)"


def _upward_imports(files: dict[str, Path], order: list[str]) -> list[str]:
    """ "A imports B" for every module of ``files`` that imports one placed after it in ``order``."""
    rank = {name: i for i, name in enumerate(order)}
    return [
        f"{name} imports {target}"
        for name, path in files.items()
        for target in sorted(_imports(name, path, set(files)))
        if rank[target] > rank[name]
    ]


def test_imports_flow_one_way():
    upward = _upward_imports(_module_files(), ORDER)
    assert not upward, "modules importing upward:\n" + "\n".join(upward)


def test_kernels_import_nothing_from_bitnet_ao_outside_them():
    """``kernels/`` is self-contained: a relative import reaching above it (``from ..private_api import ...``)
    resolves only under its installed name, and an import of the rest of bitnet_ao would tie the kernels to the layers
    built on them. Their private torch/Triton wrappers live in ``kernels/private_api.py``."""
    files = _module_files()
    kernels = {name: path for name, path in files.items() if name.split(".")[:2] == ["bitnet_ao", "kernels"]}
    assert "bitnet_ao.kernels.ops" in kernels
    outside = [
        f"{name} imports {target}"
        for name, path in sorted(kernels.items())
        for target in sorted(_outside_kernels(name, path, set(files)))
    ]
    assert not outside, "kernel modules importing bitnet_ao outside bitnet_ao.kernels:\n" + "\n".join(outside)


def test_the_checker_sees_relative_lazy_and_absolute_imports(tmp_path):
    """The checker itself: it must resolve the import forms the package uses, or the test above proves nothing."""
    source = "from . import kernels\nfrom ..private_api import int_mm\ndef f():\n    import bitnet_ao.fsdp\n"
    path = tmp_path / "mod.py"
    path.write_text(source)
    known = {"bitnet_ao.kernels", "bitnet_ao.private_api", "bitnet_ao.fsdp", "bitnet_ao"}
    # Inside bitnet_ao.kernels, `from . import kernels` names no submodule: it imports the package itself.
    expected = {"bitnet_ao.kernels", "bitnet_ao.private_api", "bitnet_ao.fsdp"}
    assert _imports("bitnet_ao.kernels.mod", path, known) == expected
    assert _imports("bitnet_ao.mod", path, known) == {"bitnet_ao.kernels", "bitnet_ao.fsdp"}
    # The kernels' own rule: `..` from a kernel module and a lazy absolute import leave bitnet_ao.kernels; `.` not.
    path.write_text(source + "from . import ops\ndef g():\n    from .. import config\n")
    known |= {"bitnet_ao.kernels.ops", "bitnet_ao.config"}
    outside = {"bitnet_ao.private_api", "bitnet_ao.fsdp", "bitnet_ao.config"}
    assert _outside_kernels("bitnet_ao.kernels.mod", path, known) == outside


def _drawn(path: str, text: str) -> bool:
    """Whether ``path`` appears in ``text`` as a path of its own, not as the start or the end of a longer one
    (``bitnet_ao/integrations/gguf/`` is not drawn by ``bitnet_ao/integrations/gguf/plan.py``)."""
    return re.search(rf"(?<![\w/.]){re.escape(path)}(?![\w/])", text) is not None


def _all_module_files() -> dict[str, Path]:
    return {**_module_files(), **_benchmark_files()}


def test_design_doc_draws_every_module():
    """docs/design.md is the map of the code: every module of ORDER appears in it by its file (a package by its
    folder), so a new module cannot land without its line."""
    design = (ROOT / "docs" / "design.md").read_text()
    files = _module_files()
    missing = []
    for name in ORDER:
        path = files[name]
        names = [path.relative_to(ROOT).as_posix()]
        if path.name == "__init__.py":
            names.append(path.parent.relative_to(ROOT).as_posix() + "/")
        if not any(_drawn(n, design) for n in names):
            missing.append(names[0])
    assert not missing, f"docs/design.md does not draw: {missing}"


def _test_rows() -> dict[str, list[str]]:
    """docs/design.md's "Where the tests are" table: module file -> the test files named in its row. A cell may
    name several files of one folder, the first with its folder and the rest by their names."""
    design = (ROOT / "docs" / "design.md").read_text()
    section = design.split("## Where the tests are", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        cells = line.split("|")
        if len(cells) < 4 or not cells[1].strip().startswith("`"):
            continue
        modules, tests = re.findall(r"`([^`]+)`", cells[1]), re.findall(r"`(tests/[\w/]+\.py)`", cells[2])
        folder = modules[0].rpartition("/")[0]
        for module in modules:
            rows["/".join((folder, module)) if "/" not in module else module] = tests
    return rows


def test_every_module_has_tests_a_newcomer_finds():
    """Each module of the package and of benchmarks/ has ``tests/test_<module>.py`` (``test_<package>.py`` for a
    package's ``__init__.py``) or a row in docs/design.md's "Where the tests are" naming test files that exist."""
    rows = _test_rows()
    assert rows, "docs/design.md has no 'Where the tests are' table"
    lost = []
    for path in _all_module_files().values():
        relative = path.relative_to(ROOT).as_posix()
        stem = path.parent.name if path.name == "__init__.py" else path.stem
        if not (ROOT / "tests" / f"test_{stem}.py").exists() and relative not in rows:
            lost.append(relative)
    assert not lost, f"modules with neither tests/test_<module>.py nor a row in docs/design.md: {lost}"
    dangling = {module: tests for module, tests in rows.items() if not (ROOT / module).exists()}
    missing = {module: t for module, tests in rows.items() for t in tests if not (ROOT / t).exists()}
    assert not dangling and not missing, f"rows naming no module {dangling} or missing test files {missing}"


def test_the_design_doc_checks_see_paths_of_their_own():
    """The checkers themselves: a folder is not drawn by a file inside it, and a table row names its modules."""
    assert _drawn("bitnet_ao/integrations/gguf/", "`bitnet_ao/integrations/gguf/` the package")
    assert not _drawn("bitnet_ao/integrations/gguf/", "`bitnet_ao/integrations/gguf/plan.py`")
    assert not _drawn("ops.py", "`kernels/ops.py`")
    rows = _test_rows()
    assert rows["bitnet_ao/integrations/gguf/plan.py"] == ["tests/test_gguf.py"]
