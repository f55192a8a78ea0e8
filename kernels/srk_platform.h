// srk_platform.h: the portability layer that lets one kernel source build for GPU and CPU.
//
// GPU (NVRTC; or g++ after srk_cuda_shim.h, the gpu-emu backend): kernels are ordinary
// __global__ functions and SRK_LOOP is a grid-stride loop. CPU (g++ -O3 -fopenmp -ffp-contract=off): __global__/__device__ vanish,
// kernels become extern "C" functions called through ctypes, and SRK_LOOP is an OpenMP
// parallel loop over the same index space. A kernel body therefore must not depend on which
// thread runs an index, which the bit contract (random bits are a function of the element's
// logical index only) already demands.
//
// Nothing here includes a system header on the GPU side: NVRTC compiles the file as is.
#pragma once

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
// Grid-stride loop over [0, n) with 64-bit indices.
#define SRK_LOOP(i, n) \
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (i64)(n); i += (i64)gridDim.x * blockDim.x)
// The outer loop of tiled kernels: on GPU the same grid-stride loop (one unit per thread).
#define SRK_LOOP_TILES(i, n) SRK_LOOP(i, n)
SRK_HD u32 srk_f2u(float f) { return __float_as_uint(f); }
SRK_HD float srk_u2f(u32 u) { return __uint_as_float(u); }
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
// One OpenMP loop over the same index space; `simd` lets g++ vectorise across indices, which
// is how the Philox rounds of 8 consecutive groups run in one AVX2 register.
#define SRK_LOOP(i, n) \
  _Pragma("omp parallel for simd schedule(static)") for (i64 i = 0; i < (i64)(n); ++i)
// The outer loop of tiled kernels, whose body vectorises itself (inner `omp simd` loops): plain
// static OpenMP scheduling, one contiguous run of tiles per thread. Below SRK_CPU_PAR_TILES
// tiles the loop runs on the calling thread: waking the OpenMP team costs more than the work
// (and on a loaded machine a descheduled team member stalls the call for a whole time slice).
#define SRK_CPU_PAR_TILES 64
#define SRK_PRAGMA(x) _Pragma(#x)
#define SRK_LOOP_TILES(i, n) \
  SRK_PRAGMA(omp parallel for schedule(static) if ((i64)(n) >= SRK_CPU_PAR_TILES)) \
  for (i64 i = 0; i < (i64)(n); ++i)
SRK_HD u32 srk_f2u(float f) { u32 u; memcpy(&u, &f, 4); return u; }
SRK_HD float srk_u2f(u32 u) { float f; memcpy(&f, &u, 4); return f; }
#endif

// Minimum / maximum without pulling in <algorithm> (NVRTC has no standard library).
SRK_HD i64 srk_min64(i64 a, i64 b) { return a < b ? a : b; }
SRK_HD i64 srk_max64(i64 a, i64 b) { return a > b ? a : b; }
