"""The README's code stays true: every ```python / ```py block runs, every ```cuda / ```cpp block
compiles, and its NumPy contract snippet equals srkern.

A block whose first line is a ``# mpirun ...`` comment is a distributed program: it runs as a
script under ``mpirun -n 2`` (the cheapest world that exercises the collectives); every other
Python block runs in this process. CUDA blocks are compiled as the gpu-emu backend compiles the
GPU side of ``kernels/`` (g++ after ``srk_cuda_shim.h``), C++ blocks as plain C++17, both with
``kernels/`` on the include path. A failing block fails its test with its README line number.
"""
from __future__ import annotations

import re
import subprocess
import sys
import traceback
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

import srkern
from srkern import _build
from srkern.testing import assert_same_bits, find_mpirun

from conftest import child_env

README = Path(__file__).resolve().parent.parent / "README.md"
RUN = {"python", "py"}
COMPILE = {"cuda", "cu", "cpp", "c++"}
_FENCE = re.compile(r"^```([\w+-]+)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


class Block(NamedTuple):
    line: int  # README line of the block's first code line
    lang: str
    code: str

    @property
    def padded(self) -> str:
        """The code preceded by blank lines, so that tracebacks and compilers name README lines."""
        return "\n" * (self.line - 1) + self.code

    @property
    def distributed(self) -> bool:
        return self.code.lstrip().startswith("# mpirun")

    @property
    def torchrun(self) -> bool:
        return self.code.lstrip().startswith("# python -m torch.distributed.run")


def blocks(text: str, langs: set[str]) -> list[Block]:
    """The fenced blocks of ``text`` whose language is in ``langs``, with their line numbers."""
    return [Block(text.count("\n", 0, m.start(2)) + 1, m.group(1).lower(), m.group(2))
            for m in _FENCE.finditer(text) if m.group(1).lower() in langs]


def _ids(bs: list[Block]) -> list[str]:
    return [f"line={b.line}-{b.lang}" for b in bs]


PY_BLOCKS = blocks(README.read_text(), RUN)
CXX_BLOCKS = blocks(README.read_text(), COMPILE)


def _skip_unless_importable(code: str) -> None:
    """Skip blocks for optional frameworks this machine lacks (CuPy needs a CUDA device too)."""
    if re.search(r"^\s*import cupy|^\s*from cupy", code, re.M):
        cupy = pytest.importorskip("cupy")
        try:
            if cupy.cuda.runtime.getDeviceCount() == 0:
                pytest.skip("the CuPy block needs a CUDA device")
        except Exception:
            pytest.skip("the CuPy block needs a CUDA device")
    if re.search(r"^\s*import jax|^\s*from jax", code, re.M):
        pytest.importorskip("jax")


def run_python_block(b: Block, folder: Path) -> None:
    """Run one block; fail naming its README line if it raises (or its mpirun job fails)."""
    if b.distributed:
        mpirun = find_mpirun()
        if mpirun is None:
            pytest.skip("mpirun not found (pip install mpich)")
        pytest.importorskip("mpi4py")
        script = folder / f"readme_line{b.line}.py"
        script.write_text(b.padded)
        env = dict(child_env(), MPIEXEC_TIMEOUT="240", OMP_NUM_THREADS="1")
        res = subprocess.run([mpirun, "-n", "2", sys.executable, str(script)], cwd=folder, env=env,
                             capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            pytest.fail(f"README.md line {b.line}: the {b.lang} block failed under mpirun -n 2 "
                        f"(exit {res.returncode}):\n{res.stdout[-1500:]}\n{res.stderr[-3000:]}", pytrace=False)
        return
    if b.torchrun:
        pytest.importorskip("torch.distributed")
        script = folder / f"readme_line{b.line}.py"
        script.write_text(b.padded)
        env = dict(child_env(), OMP_NUM_THREADS="1")
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              str(script)], cwd=folder, env=env, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            pytest.fail(f"README.md line {b.line}: the {b.lang} block failed under torchrun with 2 processes "
                        f"(exit {res.returncode}):\n{res.stdout[-1500:]}\n{res.stderr[-3000:]}", pytrace=False)
        return
    try:
        exec(compile(b.padded, str(README), "exec"), {"__name__": "__readme__"})
    except Exception as e:
        pytest.fail(f"README.md line {b.line}: the {b.lang} block raised {type(e).__name__}: {e}\n"
                    + "".join(traceback.format_exception(e)[-6:]), pytrace=False)


def compile_block(b: Block) -> subprocess.CompletedProcess:
    """Syntax-check a CUDA block as gpu-emu builds the GPU side, a C++ block as C++17."""
    cxx = _build.cxx_compiler()[0]
    prelude = '#include "srk_cuda_shim.h"\n' if b.lang in ("cuda", "cu") else ""
    # '#line' makes the compiler's messages name README.md and its line numbers.
    src = f'{prelude}#line {b.line} "{README}"\n{b.code}'
    return subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-x", "c++", f"-I{_build.KERNEL_DIR}", "-"],
                          input=src, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("block", PY_BLOCKS, ids=_ids(PY_BLOCKS))
def test_readme_python_block_runs(block: Block, tmp_path: Path, monkeypatch) -> None:
    _skip_unless_importable(block.code)
    monkeypatch.chdir(tmp_path)  # a block that writes files (checkpoints) writes them here
    run_python_block(block, tmp_path)


@pytest.mark.parametrize("block", CXX_BLOCKS, ids=_ids(CXX_BLOCKS))
def test_readme_cuda_cpp_block_compiles(block: Block) -> None:
    res = compile_block(block)
    assert res.returncode == 0, (f"README.md line {block.line}: the {block.lang} block does not compile:\n"
                                 f"{res.stderr[-3000:]}")


def test_block_runner_names_the_failing_line(tmp_path: Path) -> None:
    # The machinery above can fail, and says where: a parsed block's line number is its README
    # line, a raising Python block fails with it, and a CUDA block with an error does not compile.
    text = ("intro\n\n```python\nx = 1\n```\n\n```py\nraise ValueError('boom')\n```\n\n"
            "```cuda\nint f() { return; }\n```\n")
    good, bad = blocks(text, RUN)
    assert (good.line, bad.line) == (4, 8) and bad.lang == "py"
    run_python_block(good, tmp_path)
    with pytest.raises(pytest.fail.Exception, match="README.md line 8: the py block raised ValueError: boom"):
        run_python_block(bad, tmp_path)
    (cuda,) = blocks(text, COMPILE)
    res = compile_block(cuda)
    assert res.returncode != 0 and f"{README}:12" in res.stderr, res.stderr
    kernel = "__global__ void k(float* p) { p[threadIdx.x] = 0.f; }\n"
    assert compile_block(cuda._replace(code=kernel)).returncode == 0


def test_readme_contract_snippet_matches_kernel() -> None:
    # The prose contract's NumPy version must give the kernel's bits for finite inputs.
    code = next(b.code for b in PY_BLOCKS if "def sr_bf16" in b.code)
    ns: dict = {}
    exec(code, ns)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(4099) * np.exp2(rng.integers(-30, 30, 4099))).astype(np.float32)
    expect = ns["sr_bf16"](x, seed=99, offset=13, step=4, stream=2)
    got = srkern.cast(x, "bfloat16", seed=99, offset=13, step=4, stream=2)
    assert_same_bits(got, expect, x, "README sr_bf16 vs srkern.cast")
