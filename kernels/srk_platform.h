// srk_platform.h: the portability layer that lets one kernel source build for GPU and CPU.
//
// GPU (NVRTC; or g++ after srk_cuda_shim.h, the gpu-emu backend): kernels are ordinary
// __global__ functions and SRK_LOOP is a grid-stride loop. CPU (g++ -O3 -fopenmp -ffp-contract=off): __global__/__device__ vanish,
// kernels become extern "C" functions called through ctypes, and SRK_LOOP is an OpenMP
// parallel loop over the same index space. A kernel body therefore must not depend on which
// thread runs an index, which the bit contract (random bits are a function of the element's
// logical index only) already demands.
//
// Also here, for every backend: the canonical NaNs of contract v1.1 (srk_canon_f32/_f64), and,
// for host-compiled code, the floating-point environment guard (SrkFpEnv, SRK_FP_GUARD).
//
// Nothing here includes a system header on the GPU side: NVRTC compiles the file as is.
#pragma once
// SRK_LOOP_TILES below reads SRK_CPU_PAR_TILES from the launch geometry.
#include "srk_launch.h"

#if defined(__CUDACC__) || defined(__CUDACC_RTC__) || defined(SRK_EMU)
#define SRK_GPU 1
#define SRK_HD __host__ __device__ __forceinline__
#define SRK_KERNEL extern "C" __global__
#define SRK_RESTRICT __restrict__
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;
typedef unsigned long long uptr;
// Grid-stride loop over [0, n) with 64-bit indices. Under gpu-emu (host code, run by OpenMP
// threads that may carry the caller's flush-to-zero state) each thread's loop runs under
// SRK_FP_REGION, see below; on a real GPU there is no such state (NVRTC compiles without -ftz).
#if defined(SRK_EMU)
#define SRK_LOOP(i, n) \
  SRK_FP_REGION                                                                     \
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (i64)(n); i += (i64)gridDim.x * blockDim.x)
#else
#define SRK_LOOP(i, n) \
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (i64)(n); i += (i64)gridDim.x * blockDim.x)
#endif
// The outer loop of tiled kernels: on GPU the same grid-stride loop (one unit per thread).
#define SRK_LOOP_TILES(i, n) SRK_LOOP(i, n)
SRK_HD u32 srk_f2u(float f) { return __float_as_uint(f); }
SRK_HD float srk_u2f(u32 u) { return __uint_as_float(u); }
// memcpy is an NVRTC builtin (and <string.h> under gpu-emu): an 8-byte register move.
SRK_HD u64 srk_d2u(double d) { u64 u; memcpy(&u, &d, 8); return u; }
SRK_HD double srk_u2d(u64 u) { double d; memcpy(&d, &u, 8); return d; }
#else
#include <stdint.h>
#include <string.h>
#include <math.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // CPU-only SIMD helpers (AVX2 Philox, F16C upcast) where the CPU has them
#endif
#define SRK_HD inline __attribute__((always_inline))
#define SRK_KERNEL extern "C"
#define SRK_RESTRICT __restrict__
#define __global__
#define __device__
#define __host__
typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t i64;
typedef uintptr_t uptr;
#define SRK_PRAGMA(x) _Pragma(#x)
// Every OpenMP parallel region of srkern opens with SRK_PARALLEL(cond) and puts its work-sharing
// loop inside: `SRK_PARALLEL(cond) SRK_PRAGMA(omp for ... nowait) for (...) body`. The region
// is `omp parallel if (cond)` (cond false: the calling thread alone, no fork), and each thread of
// the team, the calling thread included, runs the loop inside one SrkFpEnv scope (SRK_FP_REGION):
// worker threads keep whatever MXCSR / FPCR they were created with or last ran under, so a guard
// on the calling thread alone would not do. `nowait` drops the loop's barrier; the region's
// closing barrier remains. Cost: one read of the control register per thread and region.
#define SRK_PARALLEL(cond) SRK_PRAGMA(omp parallel if (cond)) SRK_FP_REGION
// One OpenMP loop over the same index space; `simd` lets g++ vectorise across indices, which
// is how the Philox rounds of 8 consecutive groups run in one AVX2 register.
#define SRK_LOOP(i, n) \
  SRK_PARALLEL(1) SRK_PRAGMA(omp for simd schedule(static) nowait) for (i64 i = 0; i < (i64)(n); ++i)
// The outer loop of tiled kernels, whose body vectorises itself (inner `omp simd` loops): plain
// static OpenMP scheduling, one contiguous run of tiles per thread; below SRK_CPU_PAR_TILES
// (srk_launch.h) tiles it runs on the calling thread.
#define SRK_LOOP_TILES(i, n) \
  SRK_PARALLEL((i64)(n) >= SRK_CPU_PAR_TILES) SRK_PRAGMA(omp for schedule(static) nowait) \
  for (i64 i = 0; i < (i64)(n); ++i)
SRK_HD u32 srk_f2u(float f) { u32 u; memcpy(&u, &f, 4); return u; }
SRK_HD float srk_u2f(u32 u) { float f; memcpy(&f, &u, 4); return f; }
SRK_HD u64 srk_d2u(double d) { u64 u; memcpy(&u, &d, 8); return u; }
SRK_HD double srk_u2d(u64 u) { double d; memcpy(&d, &u, 8); return d; }
#endif

// ---- the floating-point environment of host-compiled code (cpu, cpu-portable, gpu-emu) -------
//
// Contract v1.1: subnormals are never flushed, and CPU results never depend on the caller's
// floating-point control state (torch.set_flush_denormal(True) sets MXCSR.FTZ and .DAZ on x86;
// a caller may also have changed the rounding mode or unmasked exceptions). An SrkFpEnv object
// puts the thread it is constructed on into IEEE default mode (round to nearest, no FTZ/DAZ,
// exceptions masked) and gives the thread its previous state back, exactly, when it goes out of
// scope; where the state already is the default it costs one read of the control register.
// Kernels declare one on entry (SRK_FP_GUARD: code before the first loop, such as the found_inf
// test, runs on the calling thread), and every parallel region declares one per thread
// (SRK_PARALLEL / SRK_FP_REGION above). Compilers do not move loads or stores across the
// control-register writes (volatile operations), and all kernel arithmetic reads its operands
// from memory or kernel arguments inside the scope.
#if !defined(__CUDACC__) && !defined(__CUDACC_RTC__)
#if defined(__x86_64__) || (defined(__i386__) && defined(__SSE__))
#include <xmmintrin.h>
struct SrkFpEnv {
  // MXCSR: bits 0-5 exception flags (kept), 6 DAZ, 7-12 exception masks, 13-14 rounding mode,
  // 15 FTZ. 0x1f80 = every exception masked, round to nearest, FTZ and DAZ clear.
  unsigned saved;
  bool changed, done;
  SrkFpEnv() : done(false) {
    saved = _mm_getcsr();
    unsigned want = (saved & 0x3fu) | 0x1f80u;
    changed = want != saved;
    if (changed) _mm_setcsr(want);
  }
  ~SrkFpEnv() { if (changed) _mm_setcsr(saved); }
  bool once() { bool first = !done; done = true; return first; }
};
#elif defined(__aarch64__)
struct SrkFpEnv {
  // FPCR bits cleared: FIZ (0) and AH (1) of FEAT_AFP, trap enables IOE..IXE (8-12) and IDE (15),
  // FZ16 (19), RMode (22-23: round to nearest), FZ (24), DN (25). Other bits are left as found.
  typedef unsigned long long reg;
  static reg read() { reg v; __asm__ __volatile__("mrs %0, fpcr" : "=r"(v)); return v; }
  static void write(reg v) { __asm__ __volatile__("msr fpcr, %0" : : "r"(v) : "memory"); }
  reg saved;
  bool changed, done;
  SrkFpEnv() : done(false) {
    const reg clear = 0x3ull | (0x1full << 8) | (1ull << 15) | (1ull << 19) | (3ull << 22) |
                      (1ull << 24) | (1ull << 25);
    saved = read();
    changed = (saved & clear) != 0;
    if (changed) write(saved & ~clear);
  }
  ~SrkFpEnv() { if (changed) write(saved); }
  bool once() { bool first = !done; done = true; return first; }
};
#else
// Other hosts: no flush-to-zero control is known here; the guard does nothing. (A port to such a
// host must add its control register above, or the FTZ test will say so.)
struct SrkFpEnv {
  bool done;
  SrkFpEnv() : done(false) {}
  bool once() { bool first = !done; done = true; return first; }
};
#endif
// A statement: the rest of the enclosing scope runs in the default FP environment.
#define SRK_FP_GUARD SrkFpEnv srk_fp_guard_
// A statement prefix: the statement after it runs in the default FP environment (once).
#define SRK_FP_REGION for (SrkFpEnv srk_fp_region_; srk_fp_region_.once();)
#else
#define SRK_FP_GUARD (void)0
#define SRK_FP_REGION
#endif

// ---- canonical NaNs (contract v1.1) -----------------------------------------------------------
//
// Every NaN that arithmetic produces (optimizer updates, reductions, norms) is stored as one
// canonical quiet NaN per format: FP32 0x7fc00000, BF16 0x7fc0 (what the BF16 roundings of
// srk_round.h make of 0x7fc00000), FP64 0x7ff8000000000000, all positive. NVIDIA GPUs return a
// canonical NaN of their own from arithmetic, x86 keeps payloads and signs: kernels apply these
// in the per-element code shared by their CPU and GPU paths (for BF16 stores adamw.cu tests the
// rounded 16-bit value instead, which is equivalent). Casts keep their
// integer-defined NaN rule (sign and payload kept) and do not use them.
#define SRK_NAN_F32 0x7fc00000u
#define SRK_NAN_BF16 0x7fc0u
#define SRK_NAN_F64 0x7ff8000000000000ull
SRK_HD float srk_canon_f32(float x) {
  return (srk_f2u(x) & 0x7fffffffu) > 0x7f800000u ? srk_u2f(SRK_NAN_F32) : x;
}
SRK_HD double srk_canon_f64(double x) {
  return (srk_d2u(x) & 0x7fffffffffffffffull) > 0x7ff0000000000000ull ? srk_u2d(SRK_NAN_F64) : x;
}

// Minimum / maximum without pulling in <algorithm> (NVRTC has no standard library).
SRK_HD i64 srk_min64(i64 a, i64 b) { return a < b ? a : b; }
SRK_HD i64 srk_max64(i64 a, i64 b) { return a > b ? a : b; }
