// srk_vec.h: the one vector type for wide memory accesses, as llm.c's Packed128 (llmc/cuda_utils.cuh)
// with load128/store128: N elements of T in an aligned struct of 4, 8 or 16 bytes.
//
// srk_load / srk_store make one access of the struct's size when the address is aligned to it
// (a GPU then issues a single 16-byte ld/st.global.v4 instead of eight 2-byte ones), and fall
// back to N plain element accesses otherwise: tensors handed over by a framework are only
// element-aligned (a view at offset 1 of a BF16 buffer), and a misaligned vector access is a
// fault on a GPU and undefined behaviour in C++. The bits loaded or stored are the same either
// way, so only speed depends on alignment. Host builds use the same code; g++ vectorises the
// loops of their callers by itself.
//
// On a GPU every pointer srkern hands a kernel is global memory (device, managed or mapped host
// allocations), which SRK_GLOBAL tells the compiler: where a pointer is not a kernel parameter
// (AdamW reads its buffers' addresses from the tensor table) it could not know, and emitted
// generic LD.E.128 / ST.E.128 (sm_90), which check the address space at run time; with it the
// full-block accesses are LDG.E.128 / STG.E.128, and ptxas needs up to 8 fewer registers
// (adamw_bf16_kahan_gbf16_sbf16: 90 -> 82). Only the instruction changes, never the bytes.
#pragma once
#include "srk_platform.h"

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define SRK_GLOBAL(p) __builtin_assume(__isGlobal(p))
#else
#define SRK_GLOBAL(p) (void)0
#endif

template <class T, int N>
struct alignas(N * sizeof(T)) SrkPacked {
  static_assert(N * sizeof(T) == 4 || N * sizeof(T) == 8 || N * sizeof(T) == 16, "4, 8 or 16 bytes");
  T v[N];
  SRK_HD T& operator[](int k) { return v[k]; }
  SRK_HD const T& operator[](int k) const { return v[k]; }
};

// N elements from p, with one access when p is aligned to the struct's size.
template <int N, class T>
SRK_HD SrkPacked<T, N> srk_load(const T* p) {
  SRK_GLOBAL(p);
  SrkPacked<T, N> r;
  if (((uptr)p & (sizeof(r) - 1)) == 0) {
    r = *(const SrkPacked<T, N>*)p;
  } else {
    #pragma unroll
    for (int k = 0; k < N; ++k) r.v[k] = p[k];
  }
  return r;
}

// N elements to p, with one access when p is aligned to the struct's size.
template <int N, class T>
SRK_HD void srk_store(T* p, const SrkPacked<T, N>& x) {
  SRK_GLOBAL(p);
  if (((uptr)p & (sizeof(x) - 1)) == 0) {
    *(SrkPacked<T, N>*)p = x;
  } else {
    #pragma unroll
    for (int k = 0; k < N; ++k) p[k] = x.v[k];
  }
}
