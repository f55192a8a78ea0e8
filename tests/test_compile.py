"""Every kernels/*.cu compiles through NVRTC for sm_80 and sm_90 with no error and no warning.

This is the GPU path's compile check on machines without a GPU (CI included): NVRTC needs no
device. Skipped only when ``cuda.bindings.nvrtc`` cannot be imported.
"""
from __future__ import annotations

import re
import sys
import types

import pytest

from srkern import _build, _nvrtc

try:
    from cuda.bindings import nvrtc  # noqa: F401
    _NVRTC_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the environment
    _NVRTC_ERROR = f"cuda.bindings.nvrtc cannot be imported ({e}); pip install 'srkern[cuda13]'"


@pytest.mark.skipif(_NVRTC_ERROR is not None, reason=_NVRTC_ERROR or "")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"], ids=lambda a: f"arch={a}")
@pytest.mark.parametrize("name", _build.kernel_names(), ids=lambda n: f"kernel={n}")
def test_nvrtc_compiles_without_warnings(name, arch):
    ok, log = _nvrtc.nvrtc_compile(name, arch)
    assert ok, f"kernels/{name}.cu does not compile for {arch}:\n{log}"
    warnings = [line for line in log.splitlines() if "warning" in line.lower()]
    assert not warnings, f"kernels/{name}.cu has NVRTC warnings for {arch}:\n" + "\n".join(warnings)
    # ptxas ran (the log names every entry function it compiled), so the check is not vacuous
    assert "Compiling entry function" in log, log


# ---- the program that runs is the program that is checked ----------------------------------------
#
# CuPy's RawModule(code=...) appends -ftz=true to every NVRTC compile (cupy/cuda/compiler.py,
# _compile_with_cache_cuda), so srkern compiles with NVRTC itself (_nvrtc.nvrtc_program) and loads
# that cubin. The checks below read the PTX of that very compile, as the CUDA backend caches it.

needs_nvrtc = pytest.mark.skipif(_NVRTC_ERROR is not None, reason=_NVRTC_ERROR or "")

# FP32 arithmetic whose rounding the bit contract fixes: every one must be correctly rounded
# (.rn), never approximate, never flushing subnormals.
_F32_MATH = re.compile(r"^\s*((?:add|sub|mul|fma|div|sqrt|rcp|rsqrt|ex2|lg2|sin|cos|tanh)(?:\.\w+)*\.f32)\b",
                       re.M)
# Kernel files without floating-point math (Philox is integer only).
_INTEGER_ONLY = {"philox"}


def _float_findings(ptx: str) -> tuple[list[str], list[str]]:
    """(f32 arithmetic opcodes, those of them that are not plain correctly rounded .rn)."""
    ops = _F32_MATH.findall(ptx)
    bad = [op for op in ops
           if "rn" not in op.split(".") or any(m in op.split(".") for m in ("ftz", "approx", "full"))]
    return ops, bad


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty private cache folder for this test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("SRKERN_CACHE_DIR", str(folder))
    return folder


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"], ids=lambda a: f"arch={a}")
@pytest.mark.parametrize("name", _build.kernel_names(), ids=lambda n: f"kernel={n}")
def test_loaded_ptx_has_no_ftz(name, arch):
    binary = _nvrtc.gpu_binary(name, arch)  # what the CUDA backend loads (cubin) and shows (PTX)
    ptx = binary.ptx.decode()
    assert f".target {arch}" in ptx, ptx[:400]
    assert binary.cubin[:4] == b"\x7fELF", "the cubin is not an ELF image"
    assert ".ftz" not in ptx, f"kernels/{name}.cu: the PTX flushes subnormals:\n" + "\n".join(
        [line for line in ptx.splitlines() if ".ftz" in line][:10])
    ops, bad = _float_findings(ptx)
    assert not bad, f"kernels/{name}.cu: FP32 arithmetic that is not correctly rounded: {sorted(set(bad))}"
    if name in _INTEGER_ONLY:
        assert not ops, f"kernels/{name}.cu now has FP32 math {sorted(set(ops))}: drop it from _INTEGER_ONLY"
    else:  # the check is not vacuous: this file's float math is there, and correctly rounded
        assert ".rn.f32" in ptx and ops, f"kernels/{name}.cu: no .rn.f32 arithmetic found in its PTX"


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"], ids=lambda a: f"arch={a}")
def test_every_adamw_kernel_is_compiled(arch):
    # srkern.adamw_step launches adamw_<mode>_g<grad>_s<state> for every mode, gradient and moment
    # dtype of the precision table (fp16-sr's FP16 kernels included): each is an entry of the
    # loaded PTX, no entry is one that no mode launches, and each entry's own code is free of
    # .ftz and has correctly rounded FP32 math (the file-wide check above, per kernel).
    from srkern.formats import KERNEL_SUFFIX
    from srkern.precisions import PRECISIONS
    names = {f"adamw_{p.kernel}_g{KERNEL_SUFFIX[g]}_s{KERNEL_SUFFIX[s]}"
             for p in PRECISIONS.values() for g in p.grad_dtypes for s in p.state_dtypes}
    assert {"adamw_fp16_sr_gf16_sf32", "adamw_fp16_sr_gf32_sbf16"} <= names
    ptx = _nvrtc.gpu_binary("adamw", arch).ptx.decode()
    bodies = dict(re.findall(r"\.entry\s+(\w+)(.*?)(?=\.entry|\Z)", ptx, re.S))
    assert set(bodies) == names, (sorted(names - set(bodies)), sorted(set(bodies) - names))
    for name in sorted(names):
        ops, bad = _float_findings(bodies[name])
        assert ".ftz" not in bodies[name] and ops and not bad, (name, sorted(set(bad)))


@needs_nvrtc
def test_ftz_check_catches_ftz():
    # Negative control: the same compile with CuPy's extra flag has .ftz, which the test above sees.
    flags = _nvrtc.nvrtc_flags("sm_90") + ("-ftz=true",)
    prog = _nvrtc._nvrtc_run(_build.expand_source("cast"), "cast.cu", flags)
    assert prog.ok, prog.log
    assert ".ftz" in prog.ptx.decode()
    assert _float_findings(prog.ptx.decode())[1]


def test_nvrtc_flags_are_srkerns_only():
    flags = _nvrtc.nvrtc_flags("sm_90")
    assert flags[:len(_nvrtc.NVRTC_FLAGS)] == _nvrtc.NVRTC_FLAGS
    rest = [f for f in flags[len(_nvrtc.NVRTC_FLAGS):] if not f.startswith("-I")]
    assert rest == ["--gpu-architecture=sm_90", "--ptxas-options=-v"]
    assert "--ftz=false" in flags and not any(f.endswith("ftz=true") for f in flags)
    with pytest.raises(_build.BuildError, match="sm_90"):
        _nvrtc.nvrtc_flags("90; rm -rf /")


@pytest.fixture
def spy(monkeypatch):
    """Record every call of _nvrtc.nvrtc_program (the one NVRTC compile)."""
    calls = []
    real = _nvrtc.nvrtc_program

    def recording(name, arch, source=None):
        prog = real(name, arch, source)
        calls.append((name, arch, prog.flags))
        return prog

    monkeypatch.setattr(_nvrtc, "nvrtc_program", recording)
    return calls


@needs_nvrtc
def test_regs_ptx_backend_and_compile_test_share_one_compile(spy, fresh_cache, capsys):
    from srkern import __main__ as cli
    flags = _nvrtc.nvrtc_flags("sm_80")
    assert _nvrtc.nvrtc_compile("philox", "sm_80")[0]  # what test_nvrtc_compiles_without_warnings runs
    assert cli.main(["regs", "--arch", "sm_80", "philox"]) == 0
    assert cli.main(["ptx", "philox", "--arch", "sm_80"]) == 0  # empty cache: compiles
    printed = capsys.readouterr().out
    assert spy == [("philox", "sm_80", flags)] * 3
    # The backend's binary is that compile's, cached: ptx printed the PTX that sits beside the cubin.
    binary = _nvrtc.gpu_binary("philox", "sm_80")
    assert len(spy) == 3, "gpu_binary recompiled although the cache holds the entry"
    assert binary.ptx.decode() in printed
    direct = _nvrtc.nvrtc_program("philox", "sm_80")
    assert (direct.ptx, direct.cubin) == (binary.ptx, binary.cubin)


@needs_nvrtc
def test_gpu_cache_rules(spy, fresh_cache):
    first = _nvrtc.gpu_binary("philox", "sm_90")
    assert len(spy) == 1
    entry = {p.suffix: p for p in fresh_cache.glob(f"philox-sm_90-{first.key}.*")}
    assert set(entry) == {".cubin", ".ptx", ".sha256"}
    assert entry[".cubin"].read_bytes() == first.cubin and entry[".ptx"].read_bytes() == first.ptx
    for p in entry.values():
        assert p.stat().st_mode & 0o077 == 0
    assert _nvrtc.gpu_binary("philox", "sm_90") == first and len(spy) == 1  # a cache hit
    # A changed byte, a file others may write, a missing digest: rebuilt, never loaded.
    entry[".cubin"].write_bytes(first.cubin[:-1] + bytes([first.cubin[-1] ^ 1]))
    with pytest.warns(RuntimeWarning, match="does not match the cubin and PTX"):
        assert _nvrtc.gpu_binary("philox", "sm_90").cubin == first.cubin and len(spy) == 2
    entry[".ptx"].chmod(0o666)
    with pytest.warns(RuntimeWarning, match="is writable by group or others"):
        assert _nvrtc.gpu_binary("philox", "sm_90") == first and len(spy) == 3
    entry[".sha256"].unlink()
    assert _nvrtc.gpu_binary("philox", "sm_90") == first and len(spy) == 4
    assert _nvrtc.gpu_binary("philox", "sm_90") == first and len(spy) == 4
    # Another architecture is another key.
    assert _nvrtc.gpu_binary("philox", "sm_80").key != first.key and len(spy) == 5


@needs_nvrtc
def test_gpu_compile_error_is_a_build_error(fresh_cache):
    with pytest.raises(_build.BuildError, match="does not compile for sm_10"):
        _nvrtc.gpu_binary("philox", "sm_10")


# ---- loading and launching, with a stand-in for CuPy (no GPU here) -------------------------------------

class _FakeCuPy:
    """Just enough of CuPy's API, as srkern uses it, to record what is called on which device."""

    def __init__(self, compute_capability="90"):
        self.current = 0
        self.events = []
        fake = self

        class Device:
            def __init__(self, device_id=0):
                self.id = device_id
                self.compute_capability = compute_capability

            def __enter__(self):
                self.prev, fake.current = fake.current, self.id
                return self

            def __exit__(self, *exc):
                fake.current = self.prev

        class Function:
            def __init__(self, module, name):
                self.module, self.name = module, name

            def __call__(self, grid, block, args, shared_mem=0, stream=None):
                fake.events.append(("launch", self.name, fake.current, grid, block, args, shared_mem,
                                    stream.ptr))

        class Module:
            def load(self, cubin):
                assert type(cubin) is bytes  # CuPy's Module.load takes bytes (cpdef load(self, bytes cubin))
                fake.events.append(("load", fake.current, cubin))

            def get_function(self, name):
                fake.events.append(("get_function", fake.current, name))
                return Function(self, name)

        class Stream:
            @classmethod
            def from_external(cls, obj):
                s = cls()
                s.ptr = obj.__cuda_stream__()[1]
                s.device_id = fake.current
                fake.events.append(("stream", s.ptr, fake.current))
                return s

        runtime = types.SimpleNamespace(getDeviceProperties=lambda i: {"multiProcessorCount": 132})
        self.module = types.ModuleType("cupy")
        self.module.cuda = types.SimpleNamespace(Device=Device, Stream=Stream, runtime=runtime,
                                                 function=types.SimpleNamespace(Module=Module))


@pytest.fixture
def fake_cupy(monkeypatch):
    from srkern import _backend
    fake = _FakeCuPy()
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    caches = (_nvrtc.gpu_module, _backend._gpu_function, _backend._sm_count)
    for c in caches:
        c.cache_clear()
    _backend._STREAMS.clear()
    yield fake
    for c in caches:
        c.cache_clear()
    _backend._STREAMS.clear()


@needs_nvrtc
def test_gpu_module_loads_the_checked_cubin_on_its_device(fake_cupy, fresh_cache, spy):
    mod = _nvrtc.gpu_module("philox", 1)
    binary = _nvrtc.gpu_binary("philox", "sm_90")  # the device's architecture ("90")
    assert len(spy) == 1
    entry = fresh_cache / f"philox-sm_90-{binary.key}.cubin"
    assert fake_cupy.events == [("load", 1, entry.read_bytes())]
    mod.get_function("philox_blocks")
    assert fake_cupy.events[-1] == ("get_function", 1, "philox_blocks") and fake_cupy.current == 0
    assert _nvrtc.gpu_module("philox", 1) is mod


@needs_nvrtc
def test_cuda_launch_passes_the_stream_and_makes_the_device_current(fake_cupy, fresh_cache, recwarn):
    import warnings
    from srkern import _backend
    args = [("p", 4096), ("q", 10)]
    filters = list(warnings.filters)
    for _ in range(2):
        _backend.launch("philox", "philox_blocks", args, device="cuda", device_id=1, units=1000,
                        stream=0xABC0)
    launches = [e for e in fake_cupy.events if e[0] == "launch"]
    assert launches == [("launch", "philox_blocks", 1, (4,), (_backend.GPU_BLOCK,),
                         _backend.convert_args(args), 0, 0xABC0)] * 2
    assert [e for e in fake_cupy.events if e[0] == "stream"] == [("stream", 0xABC0, 1)]  # wrapped once
    assert [e for e in fake_cupy.events if e[0] == "get_function"] == [("get_function", 1, "philox_blocks")]
    assert _backend.cupy_stream(0xABC0, 1) is _backend.cupy_stream(0xABC0, 1)
    assert warnings.filters == filters and not recwarn.list
