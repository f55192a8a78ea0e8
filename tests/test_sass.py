"""The machine code of the GPU kernels, read without a GPU: the cubin srkern loads on an H200
(sm_90, the NVRTC compile of ``srkern._nvrtc.gpu_binary``, srkern's flags and no ``-ftz``)
disassembled by ``cuobjdump -sass``.

What is checked, per kernel of kernels/cast.cu, dist.cu and adamw.cu (the memory-bound ones):
* the hot loop moves memory 16 bytes at a time: an LDG.E.128 and an STG.E.128 (global, 128-bit)
  inside a loop of the kernel (the span of a backward branch: SRK_LOOP is a grid-stride loop),
  where the kernel's unit of work has 16 bytes to store (the FP16 and FP8 down-casts store one
  Philox block of 4 outputs per unit: 8 and 4 bytes, checked as such);
* no local-memory access (LDL / STL: a spill or a dynamically indexed array) in that loop;
* registers per thread (``cuobjdump -res-usage``) within the limit stated below for each kernel.
Timing is not checked here: benchmarks/gpu_check.py measures the kernels on a GPU.

Skipped, with the reason, where NVRTC (``cuda.bindings.nvrtc``) or cuobjdump (with the nvdisasm
it runs) is missing: PyPI's nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm wheels, or a CUDA
toolkit on PATH.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from srkern import _nvrtc

ARCH = "sm_90"  # H200 (and H100)
FILES = ("cast", "dist", "adamw", "accum", "sgd", "lion")


def _tool(name: str) -> str | None:
    """``name`` from an NVIDIA wheel's bin folder (nvidia/cu13/bin, ...; the version the test extra
    pins), else from PATH (a CUDA toolkit)."""
    try:
        import nvidia  # namespace package of NVIDIA's wheels
        roots = list(nvidia.__path__)
    except ImportError:
        roots = []
    for root in roots:
        for sub in ("cu13/bin", "cu12/bin", "cuda_cuobjdump/bin", "cuda_nvdisasm/bin"):
            p = Path(root, sub, name)
            if p.is_file() and os.access(p, os.X_OK):
                return str(p)
    return shutil.which(name)


def _unavailable() -> str | None:
    try:
        from cuda.bindings import nvrtc  # noqa: F401
    except ImportError as e:
        return f"cuda.bindings.nvrtc cannot be imported ({e}); pip install 'srkern[cuda13]'"
    for name, wheel in (("cuobjdump", "nvidia-cuda-cuobjdump"), ("nvdisasm", "nvidia-cuda-nvdisasm")):
        if _tool(name) is None:
            return f"{name} not found in NVIDIA's wheels or on PATH; pip install {wheel}"
    return None


_WHY = _unavailable()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")


# ---- reading the SASS ------------------------------------------------------------------------------

_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


@dataclass
class Function:
    name: str
    insns: list[tuple[int, str, str]] = field(default_factory=list)  # (address, opcode, operands)
    regs: int = -1

    def loops(self) -> list[tuple[int, int]]:
        """[start, end] address spans of the loops: each backward branch and its target."""
        spans = []
        for addr, op, args in self.insns:
            m = re.search(r"0x([0-9a-f]+)", args)
            if op.startswith("BRA") and m and int(m.group(1), 16) <= addr:
                spans.append((int(m.group(1), 16), addr))
        return spans

    def in_any_loop(self) -> list[str]:
        """The opcodes of the instructions inside any loop."""
        spans = self.loops()
        return [op for addr, op, _ in self.insns if any(a <= addr <= b for a, b in spans)]

    def hot_loops(self) -> list[str]:
        """The opcodes inside the hot loops: the loops with a 128-bit global load in them (the
        full-unit path of the grid-stride loop; not the loops over partial blocks or tails)."""
        def inside(span):
            return [op for addr, op, _ in self.insns if span[0] <= addr <= span[1]]
        hot = [span for span in self.loops() if any(op.startswith("LDG.") and access_bytes(op) == 16
                                                    for op in inside(span))]
        return [op for span in hot for op in inside(span)]


def access_bytes(op: str) -> int:
    """Bytes moved by one global load or store opcode (LDG.E.128 -> 16, STG.E.U16 -> 2, STG.E -> 4)."""
    parts = op.split(".")
    for tag, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if tag in parts:
            return size
    return 4


def disassemble(cubin: bytes, tmp: Path) -> dict[str, Function]:
    """Every function of ``cubin``: its instructions (``cuobjdump -sass``) and registers (``-res-usage``)."""
    path = tmp / "k.cubin"
    path.write_bytes(cubin)
    tool = _tool("cuobjdump")
    env = dict(os.environ)
    env.setdefault("NVDISASM_PATH", str(Path(_tool("nvdisasm")).parent))
    run = lambda flag: subprocess.run([tool, flag, str(path)], capture_output=True, text=True,  # noqa: E731
                                      check=True, env=env, timeout=300).stdout
    funcs: dict[str, Function] = {}
    parts = re.split(r"\n\s*Function : (\w+)\n", run("-sass"))
    for name, body in zip(parts[1::2], parts[2::2]):
        funcs[name] = Function(name, [(int(a, 16), op, args) for a, op, args in _INSN.findall(body)])
    for name, regs in re.findall(r"Function (\w+):\s*\n\s*REG:(\d+)", run("-res-usage")):
        funcs[name].regs = int(regs)
    assert funcs and all(f.insns and f.regs >= 0 for f in funcs.values()), "cuobjdump output not understood"
    return funcs


@pytest.fixture(scope="module")
def sass(tmp_path_factory) -> dict[str, Function]:
    """Every function of cast.cu, dist.cu, adamw.cu, accum.cu, sgd.cu and lion.cu as srkern loads them for sm_90."""
    tmp = tmp_path_factory.mktemp("sass")
    funcs: dict[str, Function] = {}
    for name in FILES:
        funcs.update(disassemble(_nvrtc.gpu_binary(name, ARCH).cubin, tmp))
    return funcs


# ---- what each kernel must show ------------------------------------------------------------------

# Bytes per global store of a full unit of work, where it is not 16: the FP16 / FP8 down-casts
# write one Philox block of 4 lanes per unit (STG.E.64 / STG.E). Every kernel here loads 16 bytes.
STORE_BYTES = {f"cast_f32_{fmt}_{r}": size for fmt, size in (("f16", 8), ("e4m3", 4), ("e5m2", 4))
               for r in ("sr", "rn")}

# Registers per thread on sm_90 (NVRTC 13.0), the limit and, in the comment, the count measured
# when the limit was set. sm_90 allocates registers 8 per thread at a time (256 a warp), so a
# limit is the measured count rounded up to a multiple of 8: a kernel fails when its allocation
# grows, which is when its occupancy can drop. Occupancy at 256 threads a block: 32 registers
# allow 8 blocks per SM (2048 threads), 40: 6, 48: 5, 64: 4, 80: 3, 96: 2.
REG_LIMITS = {
    # kernels/dist.cu, bounded by SRK_GPU_BOUNDS (srk_launch.h): BF16 output to 48 (5 blocks per SM),
    # bf16 -> f32 to 40 (6), f32 -> f32 to 32 (8). Before issue 13, with scalar 2- and 4-byte
    # accesses only: 96 (_sr), 56 (_rn), 32 (_f32, one element per thread).
    "dist_reduce_f32_bf16_sr": 48,   # 48
    "dist_reduce_bf16_bf16_sr": 48,  # 48
    "dist_reduce_f32_bf16_rn": 48,   # 46
    "dist_reduce_bf16_bf16_rn": 48,  # 48
    "dist_reduce_bf16_f32": 40,      # 40
    "dist_reduce_f32_f32": 32,       # 32
    # kernels/cast.cu upcasts, bounded by SRK_GPU_BOUNDS(SRK_STREAM_MIN_BLOCKS = 8) to 32 (full
    # occupancy). Before issue 13: 22-28, one element per thread, scalar accesses.
    "cast_bf16_f32": 32,  # 27
    "cast_f16_f32": 32,   # 27
    "cast_e4m3_f32": 32,  # 30
    "cast_e5m2_f32": 32,  # 31
    # kernels/cast.cu down-casts (unbounded; one Philox block per thread).
    "cast_f32_bf16_sr": 56,  # 56
    "cast_f32_bf16_rn": 40,  # 40
    "cast_f32_f16_sr": 64,   # 60
    "cast_f32_f16_rn": 40,   # 36
    "cast_f32_e4m3_sr": 64,  # 60
    "cast_f32_e4m3_rn": 40,  # 38
    "cast_f32_e5m2_sr": 64,  # 60
    "cast_f32_e5m2_rn": 40,  # 38
    # kernels/adamw.cu (unbounded; one (tensor, block) pair of 8 lanes per thread).
    "adamw_bf16_sr_gbf16_sbf16": 80,       # 78
    "adamw_bf16_sr_gf32_sbf16": 80,        # 76
    "adamw_bf16_sr_gbf16_sf32": 64,        # 64
    "adamw_bf16_sr_gf32_sf32": 64,         # 64
    "adamw_bf16_nearest_gbf16_sbf16": 64,  # 64
    "adamw_bf16_nearest_gf32_sbf16": 64,   # 64
    "adamw_bf16_nearest_gbf16_sf32": 64,   # 64
    "adamw_bf16_nearest_gf32_sf32": 64,    # 64
    "adamw_bf16_kahan_gbf16_sbf16": 88,    # 82
    "adamw_bf16_kahan_gf32_sbf16": 96,     # 90
    "adamw_bf16_kahan_gbf16_sf32": 72,     # 72
    "adamw_bf16_kahan_gf32_sf32": 72,      # 72
    "adamw_fp32_master_gbf16_sf32": 64,    # 64
    "adamw_fp32_master_gf32_sf32": 64,     # 64
    "adamw_fp32_gbf16_sf32": 64,           # 64
    "adamw_fp32_gf32_sf32": 64,            # 64
    "adamw_fp16_sr_gf16_sf32": 80,         # 75
    "adamw_fp16_sr_gbf16_sf32": 80,        # 75
    "adamw_fp16_sr_gf32_sf32": 80,         # 74
    "adamw_fp16_sr_gf16_sbf16": 88,        # 86
    "adamw_fp16_sr_gbf16_sbf16": 88,       # 86
    "adamw_fp16_sr_gf32_sbf16": 88,        # 84
    # kernels/accum.cu (unbounded; one unit of 8 elements per thread, 16-byte accesses).
    "accum_bf16_bf16_rn": 48,  # 47
    "accum_bf16_bf16_sr": 64,  # 62
    "accum_bf16_f16_rn": 40,   # 39
    "accum_bf16_f16_sr": 64,   # 64
    "accum_bf16_f32_rn": 40,   # 40
    "accum_bf16_f32_sr": 64,   # 62
    "accum_f16_bf16_rn": 40,   # 38
    "accum_f16_bf16_sr": 80,   # 77
    "accum_f16_f16_rn": 40,    # 38
    "accum_f16_f16_sr": 80,    # 77
    "accum_f16_f32_rn": 40,    # 36
    "accum_f16_f32_sr": 80,    # 78
    # kernels/sgd.cu and kernels/lion.cu (unbounded; one (tensor, block) pair of 8 lanes per thread,
    # srk_opt1.h). kernels/adafactor.cu is not listed: its row and column sums are scalar loops.
    "sgd_bf16_kahan_gbf16_sbf16": 64,     # 63
    "sgd_bf16_kahan_gbf16_sf32": 56,      # 56
    "sgd_bf16_kahan_gbf16_snone": 48,     # 48
    "sgd_bf16_kahan_gf32_sbf16": 64,      # 63
    "sgd_bf16_kahan_gf32_sf32": 56,       # 56
    "sgd_bf16_kahan_gf32_snone": 48,      # 45
    "sgd_bf16_nearest_gbf16_sbf16": 48,   # 46
    "sgd_bf16_nearest_gbf16_sf32": 48,    # 44
    "sgd_bf16_nearest_gbf16_snone": 32,   # 32
    "sgd_bf16_nearest_gf32_sbf16": 48,    # 44
    "sgd_bf16_nearest_gf32_sf32": 48,     # 42
    "sgd_bf16_nearest_gf32_snone": 32,    # 32
    "sgd_bf16_sr_gbf16_sbf16": 56,        # 51
    "sgd_bf16_sr_gbf16_sf32": 48,         # 47
    "sgd_bf16_sr_gbf16_snone": 32,        # 32
    "sgd_bf16_sr_gf32_sbf16": 56,         # 51
    "sgd_bf16_sr_gf32_sf32": 48,          # 46
    "sgd_bf16_sr_gf32_snone": 32,         # 32
    "sgd_fp32_gbf16_sf32": 40,            # 40
    "sgd_fp32_gbf16_snone": 32,           # 32
    "sgd_fp32_gf32_sf32": 48,             # 42
    "sgd_fp32_gf32_snone": 32,            # 32
    "sgd_fp32_master_gbf16_sf32": 48,     # 48
    "sgd_fp32_master_gbf16_snone": 40,    # 40
    "sgd_fp32_master_gf32_sf32": 48,      # 48
    "sgd_fp32_master_gf32_snone": 40,     # 40
    "lion_bf16_kahan_gbf16_sbf16": 48,    # 48
    "lion_bf16_kahan_gbf16_sf32": 64,     # 61
    "lion_bf16_kahan_gf32_sbf16": 56,     # 54
    "lion_bf16_kahan_gf32_sf32": 64,      # 60
    "lion_bf16_nearest_gbf16_sbf16": 56,  # 53
    "lion_bf16_nearest_gbf16_sf32": 56,   # 53
    "lion_bf16_nearest_gf32_sbf16": 56,   # 56
    "lion_bf16_nearest_gf32_sf32": 56,    # 53
    "lion_bf16_sr_gbf16_sbf16": 40,       # 38
    "lion_bf16_sr_gbf16_sf32": 48,        # 44
    "lion_bf16_sr_gf32_sbf16": 48,        # 45
    "lion_bf16_sr_gf32_sf32": 48,         # 44
    "lion_fp32_gbf16_sf32": 48,           # 48
    "lion_fp32_gf32_sf32": 48,            # 46
    "lion_fp32_master_gbf16_sf32": 64,    # 58
    "lion_fp32_master_gf32_sf32": 64,     # 57
}
KERNELS = sorted(REG_LIMITS)


def test_every_kernel_has_a_limit(sass):
    # A kernel added to one of the files gets a line above; a line whose kernel is gone goes.
    assert sorted(sass) == KERNELS, (sorted(set(sass) - set(KERNELS)), sorted(set(KERNELS) - set(sass)))


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"kernel={k}")
def test_hot_loop_moves_16_bytes_per_access(sass, kernel):
    f = sass[kernel]
    assert f.loops(), f"{kernel}: no backward branch found: is the grid-stride loop gone?"
    ops = f.hot_loops()
    loads = sorted({access_bytes(op) for op in f.in_any_loop() if op.startswith("LDG.")})
    assert ops, f"{kernel}: no 128-bit global load (LDG.E.128) in its loops; load widths {loads}"
    stores = sorted({access_bytes(op) for op in ops if op.startswith("STG.")})
    want_store = STORE_BYTES.get(kernel, 16)
    assert want_store in stores, (f"{kernel}: no {want_store}-byte global store in its hot loop "
                                  f"({'STG.E.128' if want_store == 16 else 'STG.E'}); store widths {stores}")
    generic = sorted({op for op in ops if op.startswith(("LD.", "ST.")) and access_bytes(op) == 16})
    assert not generic, f"{kernel}: 128-bit accesses through generic addressing {generic} (see SRK_GLOBAL, srk_vec.h)"


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"kernel={k}")
def test_no_local_memory_in_the_hot_loop(sass, kernel):
    # LDL / STL there are register spills or a dynamically indexed array, paid on every unit.
    local = sorted({op for op in sass[kernel].hot_loops() if op.startswith(("LDL", "STL"))})
    assert not local, f"{kernel}: local-memory accesses {local} inside its hot loop"


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"kernel={k}")
def test_registers_within_limit(sass, kernel):
    regs, limit = sass[kernel].regs, REG_LIMITS[kernel]
    assert regs <= limit, f"{kernel}: {regs} registers per thread on {ARCH}, limit {limit}"
