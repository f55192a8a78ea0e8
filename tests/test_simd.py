"""Every SIMD path of kernels/cpu/ runs and is checked on this machine, not only the host's best.

The cpu backend builds the AVX-512 paths on an AVX-512 CPU, so the AVX2 ones would go untested
there (and the portable loop runs only on cpu-portable). Here: the Philox tile of each path
(AVX-512, AVX2 through ``SRKERN_CPU_ISA=avx2``, portable) is compiled on its own and compared with
the NumPy oracle word for word, on counters whose low word and whole 64 bits wrap;
``srkern._backend.simd_path`` names the path each build runs; and on an AVX-512 machine the
bit-exact cast, AdamW and Philox tests run once more in a child process with
``SRKERN_CPU_ISA=avx2``.
"""
from __future__ import annotations

import ctypes
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import srkern
from srkern import _backend, _build, reference
from srkern.testing import assert_same_bits

from conftest import child_env

TESTS = Path(__file__).resolve().parent


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


CPU = _cpu_flags()
X86 = platform.machine() in ("x86_64", "AMD64", "i686")
HAS_AVX2 = X86 and "avx2" in CPU
HAS_AVX512 = X86 and "avx512f" in CPU


def native_path() -> str:
    return "avx512" if HAS_AVX512 else "avx2" if HAS_AVX2 else "portable"


# (backend, SRKERN_CPU_ISA, the path that build must run)
BUILDS = [
    pytest.param("cpu", "native", native_path(), id="cpu-native"),
    pytest.param("cpu", "avx2", "avx2" if HAS_AVX2 else "portable", id="cpu-avx2"),
    pytest.param("cpu-portable", "native", "portable", id="cpu-portable"),
]

# Tile shapes (T blocks, S streams) the kernels use (8x1, 16x1, 32x1, 8x2, 8x3) and the odd ones
# the AVX-512 code handles separately (T % 8 == 4: half a vector; S * T / 8 not a multiple of 4).
SHAPES = [(4, 1), (8, 1), (12, 1), (16, 1), (32, 1), (64, 1), (8, 2), (8, 3), (16, 3), (4, 3)]

SHIM = "\n".join([
    '#include "cpu/philox_tile.h"',
    "extern \"C\" int tile_words(int T, int S, u64 seed, u64 step, const u32* streams, u64 q0, u32* out) {",
    # S == 1 goes through srk_draw_tile, the single-stream entry the cast uses.
    *[f"  if (T == {t} && S == {s}) {{ "
      + (f"srk_draw_tile<{t}>(seed, step, streams[0], q0, out);" if s == 1
         else f"srk_draw_tiles<{t}, {s}>(seed, step, streams, q0, out);")
      + " return 0; }" for t, s in SHAPES],
    "  return -1;",
    "}",
])


def _tile_library(backend: str, isa: str, monkeypatch, folder: Path) -> ctypes.CDLL:
    """The Philox tile header alone, built with the flags of ``backend`` under ``isa``."""
    monkeypatch.setenv("SRKERN_CPU_ISA", isa)
    flags = [f for f in _build.compile_flags(backend)]
    cxx, _ = _build.cxx_compiler()
    out = folder / f"tile-{backend}-{isa}.so"
    res = subprocess.run([cxx, *flags, "-I", str(_build.KERNEL_DIR), "-x", "c++", "-", "-o", str(out)],
                         input=SHIM, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lib = ctypes.CDLL(str(out))
    lib.tile_words.restype = ctypes.c_int
    lib.tile_words.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64,
                               ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p]
    lib.srk_simd_path.restype = ctypes.c_char_p
    return lib


@pytest.mark.parametrize("backend,isa,path", BUILDS)
def test_each_tile_path_equals_the_oracle(backend, isa, path, monkeypatch):
    # Word 4 t + k of stream s's tile must be word k of Philox block q0 + t of stream s
    # (cpu/philox_tile.h), for every shape, including counters that carry into q's high word
    # (2**32 - 13 + t) and wrap at 2**64.
    if isa == "avx2" and not HAS_AVX2:
        pytest.skip("the host has no AVX2: SRKERN_CPU_ISA=avx2 would build the portable loop")
    if backend == "cpu" and not X86 and isa != "native":
        pytest.skip("SRKERN_CPU_ISA=avx2 is an x86 target")
    with tempfile.TemporaryDirectory() as tmp:
        lib = _tile_library(backend, isa, monkeypatch, Path(tmp))
        assert lib.srk_simd_path().decode() == path
        streams = np.array([1, 2, 0xFFFFFFFF], dtype=np.uint32)
        cases = [(0, 0, 0), (2 ** 32 - 13, 0x0123456789ABCDEF, 0xFEDCBA98), (2 ** 64 - 20, 2 ** 64 - 1, 2 ** 64 - 1),
                 (12345678901, 7, 3)]
        for t, s in SHAPES:
            for q0, seed, step in cases:
                out = np.full(4 * t * s, 0xDEADBEEF, dtype=np.uint32)
                assert lib.tile_words(t, s, seed, step, streams.ctypes.data, q0, out.ctypes.data) == 0
                q = np.uint64(q0) + np.arange(t, dtype=np.uint64)  # wraps modulo 2**64
                want = np.concatenate([reference.blocks(q, seed, step, int(streams[k])).reshape(-1)
                                       for k in range(s)])
                assert_same_bits(out, want, what=f"{path} tile T={t} S={s} q0={q0:#x}")


@pytest.mark.parametrize("backend,isa,path", BUILDS)
def test_simd_path_names_the_build(backend, isa, path, monkeypatch):
    # What benchmarks record and `python -m srkern info` prints: read from the cast library that
    # the kernels run, so SRKERN_CPU_ISA (part of the flags, hence of the cache key) shows.
    if isa == "avx2" and not X86:
        pytest.skip("SRKERN_CPU_ISA=avx2 is an x86 target")
    monkeypatch.setenv("SRKERN_CPU_ISA", isa)
    assert _backend.simd_path(backend) == path
    monkeypatch.setenv("SRKERN_BACKEND", backend)
    assert _backend.simd_path() == path


def test_simd_path_of_the_gpu_side_and_bad_names(monkeypatch):
    assert _backend.simd_path("gpu-emu") == "gpu-emu"
    with pytest.raises(_build.BuildError, match="not one of"):
        _backend.simd_path("avx9")
    monkeypatch.setenv("SRKERN_CPU_ISA", "sse9")
    with pytest.raises(_build.BuildError, match="SRKERN_CPU_ISA='sse9'"):
        _build.compile_flags("cpu")


@pytest.mark.skipif(not HAS_AVX512, reason="the cpu backend already builds the AVX2 paths here")
def test_bit_exact_suites_on_the_avx2_build():
    # The cpu backend's bit-exact tests once more with the AVX2 paths (Philox tile, 256-bit
    # loops), which this AVX-512 machine would otherwise never run: the cast at every format and
    # rounding, tile seams and offsets near 2**64, AdamW in every mode against the oracle, at run
    # boundaries and at the top of the index space. 30-45 s on 2 cores, the build of the AVX2
    # libraries included.
    env = child_env()
    env.update(SRKERN_CPU_ISA="avx2", SRKERN_TEST_BACKENDS="cpu")
    code = "from srkern import _backend; assert _backend.simd_path('cpu') == 'avx2', _backend.simd_path('cpu')"
    check = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr[-2000:]
    # Not the n=2**20+3 casts ("not 20": over half of the child's time); the 1023-element cases,
    # offsets near 2**64 and the tile-seam test cover every tile boundary.
    select = ("(bit_exact or cpu_tiles or cpu_runs or counter_wrap or top_of_the_index or kernel_matches"
              " or kernel_known) and not 20")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", select,
           str(TESTS / "test_philox.py"), str(TESTS / "test_cast.py"), str(TESTS / "test_adamw.py")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=TESTS.parent)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and " failed" not in res.stdout, res.stdout[-2000:]


@pytest.mark.parametrize("dtype,rounding,saturate", [("bfloat16", "stochastic", False), ("bfloat16", "nearest", True),
                                                      ("float16", "stochastic", True), ("float8_e4m3fn", "stochastic", False)])
def test_streaming_stores_of_large_casts_equal_pieces_below_the_threshold(dtype, rounding, saturate):
    # Casts of 4M elements or more write whole aligned tiles with non-temporal stores
    # (kernels/cpu/cast_tile.h); 1M pieces with their offsets stay below that threshold. Both
    # must give the same bits, into an aligned and a misaligned out= (the old path), with
    # NaN, infinities, near-overflow and subnormal values among the inputs.
    import torch
    n = (4 << 20) + 13
    x = torch.randn(n, generator=torch.Generator().manual_seed(3)) * 3
    x[::97], x[1::101], x[2::103] = float("nan"), float("inf"), -float("inf")
    x[3::89], x[5::79], x[6::73] = 3.3e38, 65519.0, 1e-40
    # offset 8: the first full Philox block starts at element 0, so the aligned output streams
    kw = dict(rounding=rounding, saturate=saturate, seed=0x1234567, step=3, stream=2, offset=8)
    whole = srkern.cast(x, dtype, **kw)
    assert whole.data_ptr() % 64 == 0, "the aligned case needs torch's 64-byte aligned allocation"
    shifted = torch.empty(n + 1, dtype=whole.dtype)
    srkern.cast(x, dtype, **kw, out=shifted[1:])
    c = 1 << 20
    pieces = torch.cat([srkern.cast(x[a:a + c], dtype, **dict(kw, offset=8 + a)) for a in range(0, n, c)])
    bits = (lambda t: t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int16))
    assert_same_bits(bits(whole).numpy(), bits(pieces).numpy(), what=f"{dtype} {rounding} streamed")
    assert_same_bits(bits(shifted[1:]).numpy(), bits(pieces).numpy(), what=f"{dtype} {rounding} misaligned out=")
