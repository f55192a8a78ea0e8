// cast.cu: FP32 -> BF16 / FP16 / FP8 (e4m3fn, e5m2) casts, stochastic or round-to-nearest-even,
// and the exact upcasts back to FP32.
//
// Numeric contract: srkern bit contract v1.1 (README, "The bit contract"); per-element rounding
// in srk_round.h, random bits in srk_philox.h. Element `p` of the input has logical index
// `offset + p`; its draw comes from Philox block q = index / 8 (BF16, 16-bit draws) or
// index / 4 (32-bit draws). One Philox call therefore serves a whole block, and a "block" of
// G consecutive logical indices is the unit of work: full blocks take a branch-free path
// (wide loads and stores when aligned, srk_vec.h), the at most two partial blocks at the ends
// take a per-lane path. Which thread runs a block never matters.
//
// This file holds the shared bodies, what the GPU (and gpu-emu) runs. Host builds take the full
// blocks and the upcasts through the CPU variants in kernels/cpu/ (SIMD Philox tiles, a 32-bit
// FP16/FP8 encoder, F16C and FP8 tables), included below inside #ifndef SRK_GPU; each states the
// shared body it equals bit for bit, and tests/test_cast.py checks both against the oracle.
//
// References: Random123 (Philox); Ozkara, Yu, Park, AISTATS 2025 (SR for BF16 training).
#include "srk_platform.h"
#include "srk_philox.h"
#include "srk_round.h"
#include "srk_blocks.h"
#include "srk_vec.h"

// ---- per-format lane math --------------------------------------------------------------------

// BF16: 8 lanes per Philox block, 16-bit draws.
struct CastBf16 {
  typedef u16 out_t;
  static const int G = 8;
  SRK_HD static u16 sr(float x, const srk_u32x4& b, int lane, int sat) { return srk_bf16_sr(x, srk_draw16(b, lane), sat); }
  SRK_HD static u16 rn(float x, int sat) { return srk_bf16_rn(x, sat); }
};

// FP16 / FP8: 4 lanes per Philox block, 32-bit draws.
template <class F, class OUT>
struct CastSmall {
  typedef OUT out_t;
  static const int G = 4;
  SRK_HD static OUT sr(float x, const srk_u32x4& b, int lane, int sat) { return (OUT)F::encode(x, b.w[lane], true, sat); }
  SRK_HD static OUT rn(float x, int sat) { return (OUT)F::encode(x, 0u, false, sat); }
};
typedef CastSmall<SrkF16, u16> CastF16;
typedef CastSmall<SrkE4M3, u8> CastE4M3;
typedef CastSmall<SrkE5M2, u8> CastE5M2;

// ---- the kernel bodies, shared by every down-cast ----------------------------------------------

// One full block: its G inputs in one or two 16-byte loads and its G outputs in one 16-, 8- or
// 4-byte store when the pointers are aligned to them (srk_vec.h), one Philox call for SR.
template <class C, bool SR>
SRK_HD void cast_full_block(const float* SRK_RESTRICT x, typename C::out_t* SRK_RESTRICT y, u64 offset,
                            u64 seed, u64 step, u32 stream, int sat, u64 q) {
  const int G = C::G;
  i64 p = (i64)(q * G - offset);
  SrkPacked<float, 4> v[G / 4];
  #pragma unroll
  for (int k = 0; k < G / 4; ++k) v[k] = srk_load<4>(x + p + 4 * k);
  SrkPacked<typename C::out_t, G> o;
  if (SR) {
    srk_u32x4 b = srk_draw_block(seed, step, stream, q);
    #pragma unroll
    for (int k = 0; k < G; ++k) o[k] = C::sr(v[k / 4][k % 4], b, k, sat);
  } else {
    #pragma unroll
    for (int k = 0; k < G; ++k) o[k] = C::rn(v[k / 4][k % 4], sat);
  }
  srk_store<G>(y + p, o);
}

// One block that the range [offset, offset + n) covers only in part: lane by lane.
template <class C, bool SR>
SRK_HD void cast_partial_block(const float* x, typename C::out_t* y, i64 n, u64 offset,
                               u64 seed, u64 step, u32 stream, int sat, u64 q) {
  srk_u32x4 b = srk_draw_block(seed, step, stream, q);
  for (int k = 0; k < C::G; ++k) {
    i64 p = (i64)(q * C::G + k - offset);
    if (p < 0 || p >= n) continue;
    y[p] = SR ? C::sr(x[p], b, k, sat) : C::rn(x[p], sat);
  }
}

#ifndef SRK_GPU
#include "cpu/cast_tile.h"
#endif

// Full blocks first (GPU: one per thread; CPU: tiles, cpu/cast_tile.h), then the (at most two)
// partial blocks at either end of [offset, offset + n).
template <class C, bool SR>
SRK_HD void cast_body(const float* SRK_RESTRICT x, typename C::out_t* SRK_RESTRICT y, i64 n, u64 offset,
                      u64 seed, u64 step, u32 stream, int sat) {
  SrkBlocks bl = srk_split_blocks(offset, n, C::G);
#ifdef SRK_GPU
  SRK_LOOP(i, bl.nfull) {
    cast_full_block<C, SR>(x, y, offset, seed, step, stream, sat, bl.q_full0 + (u64)i);
  }
#else
  cast_full_blocks_cpu<C, SR>(x, y, offset, seed, step, stream, sat, bl.q_full0, bl.nfull);
#endif
  SRK_LOOP_TILES(i, bl.nedge) {  // at most two: on CPU the calling thread runs them
    cast_partial_block<C, SR>(x, y, n, offset, seed, step, stream, sat, bl.q_edge[i]);
  }
}

// ---- down-cast kernels -------------------------------------------------------------------------

#define SRK_CAST_KERNEL(name, C, SR)                                                        \
  SRK_KERNEL void name(const float* x, typename C::out_t* y, i64 n, u64 offset, u64 seed,  \
                       u64 step, u32 stream, int saturate) {                                \
    cast_body<C, SR>(x, y, n, offset, seed, step, stream, saturate);                        \
  }

SRK_CAST_KERNEL(cast_f32_bf16_sr, CastBf16, true)
SRK_CAST_KERNEL(cast_f32_bf16_rn, CastBf16, false)
SRK_CAST_KERNEL(cast_f32_f16_sr, CastF16, true)
SRK_CAST_KERNEL(cast_f32_f16_rn, CastF16, false)
SRK_CAST_KERNEL(cast_f32_e4m3_sr, CastE4M3, true)
SRK_CAST_KERNEL(cast_f32_e4m3_rn, CastE4M3, false)
SRK_CAST_KERNEL(cast_f32_e5m2_sr, CastE5M2, true)
SRK_CAST_KERNEL(cast_f32_e5m2_rn, CastE5M2, false)

// ---- exact upcasts -----------------------------------------------------------------------------
//
// The per-element decode of each format. The GPU takes 16 bytes of input per thread (8 BF16 /
// FP16 or 16 FP8 elements: one 16-byte load, two or four 16-byte stores where the pointers are
// aligned, srk_vec.h), then the last n % 8 (n % 16) elements one by one. Host builds run the
// chunked SIMD variants of cpu/upcast_table.h (F16C, an FP8 table filled by the decode below),
// which return the same bits.

struct DecBf16 {
  typedef u16 in_t;
  SRK_HD static float decode(u16 h) { return srk_bf16_to_f32(h); }
};

struct DecF16 {
  typedef u16 in_t;
  SRK_HD static float decode(u16 h) { return SrkF16::decode(h); }
};

template <class F>
struct Dec8 {
  typedef u8 in_t;
  SRK_HD static float decode(u8 h) { return F::decode(h); }
};

#ifndef SRK_GPU
#include "cpu/upcast_table.h"
#endif

// x and y never overlap (srkern.cast refuses an out= that shares memory with x), so both are
// restrict: the compiler need not assume that a store to y changes x.
template <class D>
SRK_HD void upcast_body(const typename D::in_t* SRK_RESTRICT x, float* SRK_RESTRICT y, i64 n) {
#ifdef SRK_GPU
  typedef typename D::in_t T;
  const int N = 16 / (int)sizeof(T);
  SRK_LOOP(i, n / N) {
    const SrkPacked<T, N> h = srk_load<N>(x + N * i);
    #pragma unroll
    for (int k = 0; k < N; k += 4) {
      SrkPacked<float, 4> f;
      #pragma unroll
      for (int j = 0; j < 4; ++j) f[j] = D::decode(h[k + j]);
      srk_store<4>(y + N * i + k, f);
    }
  }
  SRK_LOOP_TILES(k, n % N) {  // at most 15 elements
    const i64 p = n - n % N + k;
    y[p] = D::decode(x[p]);
  }
#else
  upcast_cpu<D>(x, y, n);
#endif
}

// The GPU grid needs ceil(n / N) units (N above); a launch sized for n units is correct too, with
// threads to spare.
#define SRK_UPCAST_KERNEL(name, D)                                                                  \
  SRK_KERNEL void SRK_GPU_BOUNDS(SRK_STREAM_MIN_BLOCKS)                                            \
  name(const typename D::in_t* x, float* y, i64 n) { upcast_body<D>(x, y, n); }

SRK_UPCAST_KERNEL(cast_bf16_f32, DecBf16)
SRK_UPCAST_KERNEL(cast_f16_f32, DecF16)
SRK_UPCAST_KERNEL(cast_e4m3_f32, Dec8<SrkE4M3>)
SRK_UPCAST_KERNEL(cast_e5m2_f32, Dec8<SrkE5M2>)
