"""Every kernels/*.cu compiles through NVRTC for sm_80 and sm_90 with no error and no warning.

This is the GPU path's compile check on machines without a GPU (CI included): NVRTC needs no
device. Skipped only when ``cuda.bindings.nvrtc`` cannot be imported.
"""
from __future__ import annotations

import pytest

from srkern import _build

try:
    from cuda.bindings import nvrtc  # noqa: F401
    _NVRTC_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the environment
    _NVRTC_ERROR = f"cuda.bindings.nvrtc cannot be imported ({e}); pip install 'srkern[cuda13]'"


@pytest.mark.skipif(_NVRTC_ERROR is not None, reason=_NVRTC_ERROR or "")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"], ids=lambda a: f"arch={a}")
@pytest.mark.parametrize("name", _build.kernel_names(), ids=lambda n: f"kernel={n}")
def test_nvrtc_compiles_without_warnings(name, arch):
    ok, log = _build.nvrtc_compile(name, arch)
    assert ok, f"kernels/{name}.cu does not compile for {arch}:\n{log}"
    warnings = [line for line in log.splitlines() if "warning" in line.lower()]
    assert not warnings, f"kernels/{name}.cu has NVRTC warnings for {arch}:\n" + "\n".join(warnings)
    # ptxas ran (the log names every entry function it compiled), so the check is not vacuous
    assert "Compiling entry function" in log, log
