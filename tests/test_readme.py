"""The README's code stays true: its CPU snippets run, and its NumPy contract snippet equals srkern."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import srkern

README = Path(__file__).resolve().parent.parent / "README.md"


def _snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("i", range(len(_snippets())), ids=lambda i: f"snippet={i}")
def test_readme_snippet_runs(i: int) -> None:
    code = _snippets()[i]
    if "cupy" in code:
        cupy = pytest.importorskip("cupy")
        try:
            if cupy.cuda.runtime.getDeviceCount() == 0:
                pytest.skip("CuPy snippet needs a CUDA device")
        except Exception:
            pytest.skip("CuPy snippet needs a CUDA device")
    if "jax" in code:
        pytest.importorskip("jax")
    exec(compile(code, f"README snippet {i}", "exec"), {})


def test_readme_contract_snippet_matches_kernel() -> None:
    # The prose contract's NumPy version must give the kernel's bits for finite inputs.
    code = next(s for s in _snippets() if "def sr_bf16" in s)
    ns: dict = {}
    exec(code, ns)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(4099) * np.exp2(rng.integers(-30, 30, 4099))).astype(np.float32)
    expect = ns["sr_bf16"](x, seed=99, offset=13, step=4, stream=2)
    got = srkern.cast(x, "bfloat16", seed=99, offset=13, step=4, stream=2).view(np.uint16)
    bad = np.nonzero(expect != got)[0]
    assert bad.size == 0, f"first mismatches at {bad[:5]}: {expect[bad[:5]]} vs {got[bad[:5]]}"
