// cast.cu: FP32 -> BF16 / FP16 / FP8 (e4m3fn, e5m2) casts, stochastic or round-to-nearest-even,
// and the exact upcasts back to FP32.
//
// Numeric contract: srkern bit contract v1 (README, "The bit contract"); per-element rounding
// in srk_round.h, random bits in srk_philox.h. Element `p` of the input has logical index
// `offset + p`; its draw comes from Philox block q = index / 8 (BF16, 16-bit draws) or
// index / 4 (32-bit draws). One Philox call therefore serves a whole block, and a "block" of
// G consecutive logical indices is the unit of work: full blocks take a branch-free path
// (16-byte loads and stores on GPU when aligned; vectorised across blocks on CPU), the at most
// two partial blocks at the ends take a per-lane path. Which thread runs a block never matters.
//
// References: Random123 (Philox); Ozkara, Yu, Park, AISTATS 2025 (SR for BF16 training).
#include "srk_platform.h"
#include "srk_philox.h"
#include "srk_round.h"

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

// ---- vector loads and stores (GPU only; the CPU path leaves vectorisation to g++) -----------

template <int G>
SRK_HD void load_f32(const float* p, float* v) {
#ifdef SRK_GPU
  if (((uptr)p & 15u) == 0) {
    #pragma unroll
    for (int k = 0; k < G; k += 4) {
      float4 t = *(const float4*)(p + k);
      v[k] = t.x; v[k + 1] = t.y; v[k + 2] = t.z; v[k + 3] = t.w;
    }
    return;
  }
#endif
  #pragma unroll
  for (int k = 0; k < G; ++k) v[k] = p[k];
}

template <int G, class T>
SRK_HD void store_out(T* p, const T* v) {
#ifdef SRK_GPU
  const int bytes = G * (int)sizeof(T);  // 16 (8 x BF16), 8 (4 x FP16) or 4 (4 x FP8)
  if (((uptr)p & (bytes - 1)) == 0) {
    if (bytes == 16) { uint4 t; memcpy(&t, v, 16); *(uint4*)p = t; return; }
    if (bytes == 8) { uint2 t; memcpy(&t, v, 8); *(uint2*)p = t; return; }
    if (bytes == 4) { u32 t; memcpy(&t, v, 4); *(u32*)p = t; return; }
  }
#endif
  #pragma unroll
  for (int k = 0; k < G; ++k) p[k] = v[k];
}

// ---- the kernel body, shared by every down-cast ----------------------------------------------

template <class C, bool SR>
SRK_HD void cast_full_block(const float* SRK_RESTRICT x, typename C::out_t* SRK_RESTRICT y, u64 offset,
                            u64 seed, u64 step, u32 stream, int sat, u64 q) {
  const int G = C::G;
  i64 p = (i64)(q * G - offset);
  float v[G];
  typename C::out_t o[G];
  load_f32<G>(x + p, v);
  if (SR) {
    srk_u32x4 b = srk_draw_block(seed, step, stream, q);
    #pragma unroll
    for (int k = 0; k < G; ++k) o[k] = C::sr(v[k], b, k, sat);
  } else {
    #pragma unroll
    for (int k = 0; k < G; ++k) o[k] = C::rn(v[k], sat);
  }
  store_out<G>(y + p, o);
}

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

// Full blocks first, then the (at most two) partial blocks at either end of [offset, offset+n).
template <class C, bool SR>
SRK_HD void cast_body(const float* SRK_RESTRICT x, typename C::out_t* SRK_RESTRICT y, i64 n, u64 offset,
                      u64 seed, u64 step, u32 stream, int sat) {
  const u64 G = C::G;
  if (n <= 0) return;
  u64 end = offset + (u64)n;
  u64 q_head = offset / G, q_tail = (end - 1) / G;        // blocks holding the first/last element
  u64 q_full0 = (offset + G - 1) / G, q_full1 = end / G;  // full blocks: [q_full0, q_full1)
  i64 nfull = q_full1 > q_full0 ? (i64)(q_full1 - q_full0) : 0;
  SRK_LOOP(i, nfull) {
    cast_full_block<C, SR>(x, y, offset, seed, step, stream, sat, q_full0 + (u64)i);
  }
  bool head_partial = offset % G != 0 || (nfull == 0);
  bool tail_partial = end % G != 0 && q_tail != q_head;
  i64 nedge = (i64)head_partial + (i64)tail_partial;
  SRK_LOOP(i, nedge) {
    u64 q = (i == 0 && head_partial) ? q_head : q_tail;
    cast_partial_block<C, SR>(x, y, n, offset, seed, step, stream, sat, q);
  }
}

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

SRK_KERNEL void cast_bf16_f32(const u16* x, float* y, i64 n) {
  SRK_LOOP(i, n) { y[i] = srk_bf16_to_f32(x[i]); }
}
SRK_KERNEL void cast_f16_f32(const u16* x, float* y, i64 n) {
  SRK_LOOP(i, n) { y[i] = SrkF16::decode(x[i]); }
}
SRK_KERNEL void cast_e4m3_f32(const u8* x, float* y, i64 n) {
  SRK_LOOP(i, n) { y[i] = SrkE4M3::decode(x[i]); }
}
SRK_KERNEL void cast_e5m2_f32(const u8* x, float* y, i64 n) {
  SRK_LOOP(i, n) { y[i] = SrkE5M2::decode(x[i]); }
}
