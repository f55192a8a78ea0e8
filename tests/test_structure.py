"""The layout the README's architecture section describes, checked so that it stays true.

What is checked: the package's modules import only modules of their own or a lower layer (so
the import graph has no cycle, and ``import srkern`` can never come back to itself half-built);
no module imports names from the package root; no package module is over 500 lines; every
kernel family is mirrored (kernel file, Python module, tests, benchmark); every CPU-speed
variant under ``kernels/cpu/`` names the shared body it must equal bit for bit.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "srkern"

# The layers, lowest first: a module may import modules of its own layer or below.
LAYERS = {
    "facts": ("_files", "_cache", "formats", "precisions", "testing"),
    "build": ("_build", "_nvrtc", "_contract", "layout", "_tensor"),
    "launch": ("_backend", "_table"),
    "families": ("cast", "accum", "adamw", "sgd", "lion", "adafactor", "norm", "reference", "reference_adafactor",
                 "comm", "_collective"),
    "composites": ("checkpoint", "sharded", "dist"),
    "frameworks": ("_torch_ops", "_plan", "_torch_state", "_torch_comm", "_torch_sharded", "_torch_accum", "_torch_fused", "_torch_optim", "torch"),
    "entry": ("__init__", "__main__"),
}
LAYER_OF = {m: i for i, mods in enumerate(LAYERS.values()) for m in mods}
# Kernel files that are not a user-facing family: philox.cu exposes the raw draws to the tests.
NOT_FAMILIES = {"philox": "the raw Philox draws, for tests/test_philox.py against the NumPy oracle"}


def package_imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports (relative imports anywhere in the file)."""
    graph = {}
    for f in sorted(PACKAGE.glob("*.py")):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(a.name for a in node.names)
        graph[f.stem] = deps - {f.stem}
    return graph


def test_every_module_has_a_layer():
    # A new module must be placed in LAYERS (and in the README's table) before it can be used.
    missing = sorted(set(package_imports()) - set(LAYER_OF))
    assert not missing, f"modules without a layer in tests/test_structure.py LAYERS: {missing}"


def test_imports_go_down_the_layers():
    modules = set(package_imports())
    bad = []
    for mod, deps in package_imports().items():
        for dep in sorted(deps):
            if dep not in modules:
                if mod not in ("__init__", "__main__"):
                    bad.append(f"{mod} imports {dep!r} from the package root (import it from its module)")
            elif LAYER_OF.get(dep, 99) > LAYER_OF.get(mod, -1):
                bad.append(f"{mod} (layer {LAYER_OF.get(mod)}) imports {dep} (layer {LAYER_OF.get(dep)})")
    assert not bad, "\n".join(bad)


def test_import_graph_has_no_cycle():
    graph = {m: {d for d in deps if d in LAYER_OF} for m, deps in package_imports().items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 1:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_no_package_module_is_over_500_lines():
    long = {f.name: n for f in PACKAGE.glob("*.py") if (n := len(f.read_text().splitlines())) > 500}
    assert not long, f"split these by job: {long}"


def test_import_srkern_loads_neither_torch_nor_mpi():
    # The core must import on a machine with NumPy alone; torch and mpi4py load on first use.
    code = "import sys, srkern, srkern.dist; print(sorted(m for m in ('torch', 'mpi4py', 'cupy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("family", sorted(p.stem for p in (ROOT / "kernels").glob("*.cu")))
def test_kernel_families_are_mirrored(family):
    if family in NOT_FAMILIES:
        assert (ROOT / "tests" / f"test_{family}.py").is_file()
        return
    want = [PACKAGE / f"{family}.py", ROOT / "tests" / f"test_{family}.py",
            ROOT / "benchmarks" / f"bench_{family}.py"]
    missing = [str(p.relative_to(ROOT)) for p in want if not p.is_file()]
    assert not missing, f"kernels/{family}.cu has no {missing}"


@pytest.mark.parametrize("header", sorted(p.name for p in (ROOT / "kernels" / "cpu").glob("*.h")))
def test_cpu_variants_name_their_shared_body(header):
    # The first comment of a CPU-speed variant says which shared body it equals bit for bit.
    text = (ROOT / "kernels" / "cpu" / header).read_text()
    head = text.split("#pragma once")[0]
    assert re.search(r"bit for bit", head), f"kernels/cpu/{header}: the header comment must say " \
                                             "which shared body it equals bit for bit"


def test_every_kernel_file_ships_in_the_wheel():
    # pip install . copies kernels/ by the package-data globs of pyproject.toml; a header they
    # miss would build from a checkout and fail from an installed wheel.
    import fnmatch
    import tomllib
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["srkern.kernels"]
    kernel_dir = ROOT / "kernels"
    files = [p.relative_to(kernel_dir).as_posix() for p in kernel_dir.rglob("*") if p.is_file()]
    shipped = [f for f in files if any(fnmatch.fnmatchcase(f, g) and f.count("/") == g.count("/") for g in globs)]
    assert sorted(files) == sorted(shipped), f"not shipped: {sorted(set(files) - set(shipped))}"


def test_readme_import_table_is_the_import_graph():
    # The README's "who imports whom" table is read by people deciding where code goes: it must
    # be the graph the code has, not the graph it once had.
    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| ((?:`\w+`(?:, )?)+|—) \|$", text, re.M)
    documented = {m: set(re.findall(r"`(\w+)`", deps)) for m, deps in rows}
    actual = {m: d for m, d in package_imports().items() if m != "__main__"}
    assert documented == actual, {m: (sorted(documented.get(m, ())), sorted(actual.get(m, ())))
                                  for m in set(documented) | set(actual) if documented.get(m) != actual.get(m)}
