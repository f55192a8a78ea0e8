// srk_cuda_shim.h: just enough CUDA for g++ to compile the GPU side of srkern's kernels (the
// gpu-emu backend). Never seen by NVRTC.
//
// With this header first, srk_platform.h takes its SRK_GPU branch, so g++ compiles exactly the
// text NVRTC compiles: the grid-stride loops, the 16-byte vector accesses, the GPU-only bodies.
// srkern/_build.py appends one srk_emu_<kernel> entry per kernel, which runs the kernel once
// for every (block, thread) of the grid srkern/_backend.py computes for a CUDA launch.
//
// What is here: the built-in index variables (per host thread, so blocks can run on OpenMP
// threads) and the intrinsics the kernels use. Wide accesses go through srk_vec.h's SrkPacked,
// which carries its own alignment, so a misaligned 16-byte access is undefined behaviour that
// UBSan's alignment check reports here as it would fault on a GPU.
// What is deliberately missing: __syncthreads, __shared__, atomics, warp functions. A kernel that
// starts to use one fails to build here until this header gives it its semantics (for example
// by running the threads of a block as coroutines), because running threads one after another
// is only equivalent for kernels whose threads never communicate.
#pragma once
#define SRK_EMU 1

#include <math.h>
#include <stdint.h>
#include <string.h>

#define __host__
#define __device__
#ifndef __global__  // srkern/_build.py keeps the marker while it lists the kernels (g++ -E)
#define __global__
#endif
#define __forceinline__ inline __attribute__((always_inline))

struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x, y, z; };
static thread_local uint3 threadIdx, blockIdx;
static thread_local dim3 blockDim, gridDim;


static inline unsigned int __float_as_uint(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
