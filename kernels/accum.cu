// accum.cu: acc += alpha * x in place, acc BF16 or FP16, x FP32, BF16 or FP16, the sum computed
// in FP32 and written back with stochastic rounding (or round-to-nearest-even): srkern.add_,
// and through it SR gradient accumulation over micro-batches (srkern.torch.sr_grad_accumulation).
//
// What one element computes, in FP32, in this order (no contraction: two IEEE operations, the
// host and NVRTC both compile with contraction off):
//
//   s   = a + alpha * xv          a = acc widened exactly, xv = x widened exactly (or x itself)
//   acc = round(s)                SR with the element's draw of stream ACCUM, or RN
//
// Why two roundings and not fmaf(alpha, xv, a): with alpha == 1 (gradient accumulation) the
// product is exact and both give the same bits; in general the extra rounding is at most half an
// FP32 ulp of alpha * xv, 2^-16 of a BF16 ulp, invisible next to the 16-bit draw's resolution;
// and two plain FP32 operations are what any framework writes (acc.float() + alpha * x.float()
// in torch, the NumPy oracle in float32), while cpu-portable, built without FMA hardware, would
// run fmaf as a libm call. alpha is rounded to FP32 on the host (srkern/accum.py).
//
// round(s) is exactly srkern.cast(s, acc's dtype, rounding=..., offset=offset + p,
// stream=ACCUM) of the FP32 sum: srk_bf16_sr / srk_bf16_rn for BF16 and SrkF16::encode without
// saturation for FP16 (srk_round.h; finite overflow goes to +-Inf, subnormals are kept), except
// that a NaN sum is stored as the canonical NaN of contract v1.1 (BF16 0x7fc0, FP16 0x7e00),
// whatever NaNs went in: it is arithmetic, not a cast. A rounding maps NaN to NaN and nothing
// else to NaN, so testing the rounded 16-bit value is the same as canonicalising s first.
//
// Random bits (contract v1.1): element p has logical index i = offset + p. A BF16 acc takes the
// 16-bit draw of i (Philox block i / 8, lane i % 8), an FP16 acc the 32-bit draw of i (block
// i / 4, word i % 4), both of stream SRK_STREAM_ACCUM, which nothing else draws. The unit of work
// is 8 consecutive logical indices, q = i / 8: one Philox block for BF16, blocks 2q and 2q + 1
// for FP16, so either format loads and stores its 8 acc values as 16 bytes. Full units take the
// branch-free path (wide accesses when aligned, srk_vec.h), the at most two partial units at the
// ends a per-lane path (srk_blocks.h). Which thread runs a unit never matters.
//
// acc and x never overlap (srkern.add_ refuses partial overlap and copies x when it is acc
// itself), so both pointers are restrict.
//
// Host builds run the full units as tiles (accum_full_units_cpu below): Philox for ACCUM_TILE
// units across SIMD lanes (srk_draw_tile, cpu/philox_tile.h), the tile's acc (and 16-bit x)
// widened exactly to FP32 (F16C for FP16 where the CPU has it), then one SIMD loop over the
// tile's elements with the same sum and rounding, FP16 encoded by the 32-bit variant of
// cpu/round_small.h; it equals, bit for bit, accum_full_unit run for each unit, and
// tests/test_accum.py checks both paths against the NumPy oracle on every backend.
//
// References: Random123 (Philox); Ozkara, Yu, Park, AISTATS 2025 (SR for BF16 training);
// Gupta et al., ICML 2015 (SR keeps the small addends of low-precision accumulation).
#include "srk_platform.h"
#include "srk_philox.h"
#include "srk_round.h"
#include "srk_blocks.h"
#include "srk_vec.h"

// The canonical FP16 NaN of contract v1.1 (adamw.cu defines the same value for its FP16 weights).
#ifndef SRK_NAN_F16
#define SRK_NAN_F16 0x7e00u
#endif

// ---- per-format element math ------------------------------------------------------------------

// The FP32 sum, the one place it is written.
SRK_HD float accum_math(float a, float alpha, float xv) { return a + alpha * xv; }

// BF16 accumulator: one Philox block per unit of 8, lane k's 16-bit draw.
struct AccBf16 {
  SRK_HD static float load(u16 h) { return srk_bf16_to_f32(h); }
  SRK_HD static void draws(u64 seed, u64 step, u64 q, srk_u32x4* d) {
    d[0] = srk_draw_block(seed, step, SRK_STREAM_ACCUM, q);
  }
  SRK_HD static u32 draw(const srk_u32x4* d, int k) { return srk_draw16(d[0], k); }
  SRK_HD static u16 store(float s, u32 r, bool sr) {
    u16 t = sr ? srk_bf16_sr(s, r, 0) : srk_bf16_rn(s, 0);
    return (t & 0x7fffu) > 0x7f80u ? (u16)SRK_NAN_BF16 : t;
  }
};

// FP16 accumulator: Philox blocks 2q and 2q + 1 per unit q, lane k's 32-bit draw is word k % 4 of
// block 2q + k / 4 (= the draw of index 8q + k). encode's NaN is the sign plus 0x7e00 and it
// makes nothing else NaN, so clearing the sign of a NaN result canonicalises.
struct AccF16 {
  SRK_HD static float load(u16 h) { return SrkF16::decode(h); }
  SRK_HD static void draws(u64 seed, u64 step, u64 q, srk_u32x4* d) {
    d[0] = srk_draw_block(seed, step, SRK_STREAM_ACCUM, 2 * q);
    d[1] = srk_draw_block(seed, step, SRK_STREAM_ACCUM, 2 * q + 1);
  }
  SRK_HD static u32 draw(const srk_u32x4* d, int k) { return d[k >> 2].w[k & 3]; }
  SRK_HD static u16 store(float s, u32 r, bool sr) {
    u32 t = SrkF16::encode(s, r, sr, 0);
    return (u16)((t & 0x7fffu) > 0x7c00u ? SRK_NAN_F16 : t);
  }
};

// The addend x: its element type and exact widening to FP32.
struct XF32 {
  typedef float T;
  SRK_HD static float load(float v) { return v; }
};
struct XBf16 {
  typedef u16 T;
  SRK_HD static float load(u16 h) { return srk_bf16_to_f32(h); }
};
struct XF16 {
  typedef u16 T;
  SRK_HD static float load(u16 h) { return SrkF16::decode(h); }
};

// ---- the shared bodies --------------------------------------------------------------------------

// One full unit q: 8 acc values in one 16-byte load and store, 8 x values in one (16-bit x) or
// two (FP32 x) 16-byte loads, when aligned (srk_vec.h).
template <class A, class X, bool SR>
SRK_HD void accum_full_unit(u16* SRK_RESTRICT acc, const typename X::T* SRK_RESTRICT x, u64 offset,
                            float alpha, u64 seed, u64 step, u64 q) {
  typedef typename X::T XT;
  const int N = 16 / (int)sizeof(XT);  // x elements per 16-byte load: 4 or 8
  i64 p = (i64)(q * 8 - offset);
  SrkPacked<u16, 8> a = srk_load<8>(acc + p);
  SrkPacked<XT, N> xv[8 / N];
  #pragma unroll
  for (int k = 0; k < 8 / N; ++k) xv[k] = srk_load<N>(x + p + N * k);
  srk_u32x4 d[2];
  if (SR) A::draws(seed, step, q, d);
  SrkPacked<u16, 8> o;
  #pragma unroll
  for (int k = 0; k < 8; ++k) {
    float s = accum_math(A::load(a[k]), alpha, X::load(xv[k / N][k % N]));
    o[k] = A::store(s, SR ? A::draw(d, k) : 0u, SR);
  }
  srk_store<8>(acc + p, o);
}

// One unit that [offset, offset + n) covers only in part: lane by lane.
template <class A, class X, bool SR>
SRK_HD void accum_partial_unit(u16* acc, const typename X::T* x, i64 n, u64 offset, float alpha,
                               u64 seed, u64 step, u64 q) {
  srk_u32x4 d[2];
  if (SR) A::draws(seed, step, q, d);
  for (int k = 0; k < 8; ++k) {
    i64 p = (i64)(q * 8 + k - offset);
    if (p < 0 || p >= n) continue;
    acc[p] = A::store(accum_math(A::load(acc[p]), alpha, X::load(x[p])), SR ? A::draw(d, k) : 0u, SR);
  }
}

// ---- host builds: the full units as SIMD tiles -------------------------------------------------

#ifndef SRK_GPU
#include "cpu/philox_tile.h"
#include "cpu/round_small.h"

// Units per tile: 32 units = 256 elements, the tile of the BF16 cast (CAST_TILE, cpu/cast_tile.h:
// 32 Philox blocks per srk_draw_tile call keep four 512-bit vectors of blocks in flight).
#define ACCUM_TILE 32

template <class A> struct AccCpu;
template <> struct AccCpu<AccBf16> {
  static const int BLOCKS = 1;  // Philox blocks per unit
  static u32 draw(const u32* w, int j) { return srk_tile_draw16(w, j); }
  template <bool SR> static u16 store(float s, u32 r) {
    u16 t = SR ? srk_bf16_sr(s, r, 0) : srk_bf16_rn(s, 0);
    return (t & 0x7fffu) > 0x7f80u ? (u16)SRK_NAN_BF16 : t;
  }
};
template <> struct AccCpu<AccF16> {
  static const int BLOCKS = 2;
  static u32 draw(const u32* w, int j) { return w[j]; }
  template <bool SR> static u16 store(float s, u32 r) {
    u32 t = srk_small_encode_u32<SrkF16, SR, false>(s, r);  // = SrkF16::encode(s, r, SR, 0)
    return (u16)((t & 0x7fffu) > 0x7c00u ? SRK_NAN_F16 : t);
  }
};

// Exact widening of a tile's 16-bit values to FP32, before the arithmetic loop: the shared FP16
// decode branches per element (specials, subnormals), and in the same loop as the sum it kept g++
// from vectorising the tile (FP16 acc, 16M elements, 2 threads: 83-108 ms, against 6-10 ms for
// BF16; widened first, 13-25 ms, BF16 unchanged, same session). F16C's vcvtph2ps is exact, quiets a NaN as SrkF16::decode does, and is not subject to
// DAZ (nor is the code: SRK_FP_REGION); a NaN's payload cannot reach acc anyway (a NaN sum is
// stored as the canonical NaN). Without F16C (cpu-portable), the shared decode.
struct WidenBf16 {
  static void run(const u16* SRK_RESTRICT h, float* SRK_RESTRICT f, int m) {
    #pragma omp simd
    for (int j = 0; j < m; ++j) f[j] = srk_bf16_to_f32(h[j]);
  }
};
struct WidenF16 {
  static void run(const u16* SRK_RESTRICT h, float* SRK_RESTRICT f, int m) {
    int j = 0;
#if defined(__F16C__)
    for (; j + 8 <= m; j += 8)
      _mm256_storeu_ps(f + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + j))));
#endif
    for (; j < m; ++j) f[j] = SrkF16::decode(h[j]);
  }
};
template <class A> struct WidenOf;
template <> struct WidenOf<AccBf16> { typedef WidenBf16 W; };
template <> struct WidenOf<AccF16> { typedef WidenF16 W; };
template <> struct WidenOf<XBf16> { typedef WidenBf16 W; };
template <> struct WidenOf<XF16> { typedef WidenF16 W; };

// x of the tile as FP32: the input itself for FP32 x, else widened into buf.
template <class X>
inline const float* accum_x_f32_of(const typename X::T* x, float* buf, int m) {
  WidenOf<X>::W::run(x, buf, m);
  return buf;
}
template <> inline const float* accum_x_f32_of<XF32>(const float* x, float*, int) { return x; }

// `count` (<= ACCUM_TILE) full units from q0; acc and x point at the tile's first element.
// Element j of the tile has logical index 8 q0 + j: the tile's draws (blocks q0 .. for BF16,
// 2 q0 .. for FP16) hold its draw at j, as srk_draw_tile lays them out.
template <class A, class X, bool SR>
inline void accum_tile_cpu(u16* SRK_RESTRICT acc, const typename X::T* SRK_RESTRICT x, float alpha,
                           u64 seed, u64 step, u64 q0, int count) {
  typedef AccCpu<A> C;
  const int m = 8 * count;
  alignas(64) float af[8 * ACCUM_TILE], xbuf[8 * ACCUM_TILE];
  WidenOf<A>::W::run(acc, af, m);
  const float* SRK_RESTRICT xf = accum_x_f32_of<X>(x, xbuf, m);
  if (SR) {
    alignas(64) u32 w[4 * ACCUM_TILE * C::BLOCKS];
    srk_draw_tile<ACCUM_TILE * C::BLOCKS>(seed, step, SRK_STREAM_ACCUM, q0 * C::BLOCKS, w);
    #pragma omp simd
    for (int j = 0; j < m; ++j) acc[j] = C::template store<true>(accum_math(af[j], alpha, xf[j]), C::draw(w, j));
  } else {
    #pragma omp simd
    for (int j = 0; j < m; ++j) acc[j] = C::template store<false>(accum_math(af[j], alpha, xf[j]), 0u);
  }
}

template <class A, class X, bool SR>
inline void accum_full_units_cpu(u16* SRK_RESTRICT acc, const typename X::T* SRK_RESTRICT x, u64 offset,
                                 float alpha, u64 seed, u64 step, u64 q_full0, i64 nfull) {
  i64 ntiles = (nfull + ACCUM_TILE - 1) / ACCUM_TILE;
  SRK_PARALLEL(ntiles >= SRK_CPU_PAR_TILES) {
    SRK_PRAGMA(omp for schedule(static) nowait)
    for (i64 i = 0; i < ntiles; ++i) {
      u64 q0 = q_full0 + (u64)i * ACCUM_TILE;
      int count = (int)srk_min64(ACCUM_TILE, nfull - i * ACCUM_TILE);
      i64 p = (i64)(q0 * 8 - offset);
      accum_tile_cpu<A, X, SR>(acc + p, x + p, alpha, seed, step, q0, count);
    }
  }
}
#endif  // !SRK_GPU

// Full units first (GPU: one per thread; CPU: tiles), then the (at most two) partial units at
// either end of [offset, offset + n).
template <class A, class X, bool SR>
SRK_HD void accum_body(u16* SRK_RESTRICT acc, const typename X::T* SRK_RESTRICT x, i64 n, u64 offset,
                       u64 seed, u64 step, float alpha) {
  SrkBlocks bl = srk_split_blocks(offset, n, 8);
#ifdef SRK_GPU
  SRK_LOOP(i, bl.nfull) {
    accum_full_unit<A, X, SR>(acc, x, offset, alpha, seed, step, bl.q_full0 + (u64)i);
  }
#else
  accum_full_units_cpu<A, X, SR>(acc, x, offset, alpha, seed, step, bl.q_full0, bl.nfull);
#endif
  SRK_LOOP_TILES(i, bl.nedge) {  // at most two: on CPU the calling thread runs them
    accum_partial_unit<A, X, SR>(acc, x, n, offset, alpha, seed, step, bl.q_edge[i]);
  }
}

// ---- kernels: accum_<acc>_<x>_<sr|rn> ------------------------------------------------------------
// The grid needs ceil(n / 8) + 2 units (full units and the two partial ones); srkern/accum.py
// sizes it so.

#define SRK_ACCUM_KERNEL(name, A, X, SR)                                                         \
  SRK_KERNEL void name(u16* acc, const X::T* x, i64 n, u64 offset, u64 seed, u64 step,         \
                       float alpha) {                                                           \
    accum_body<A, X, SR>(acc, x, n, offset, seed, step, alpha);                                 \
  }

SRK_ACCUM_KERNEL(accum_bf16_f32_sr, AccBf16, XF32, true)
SRK_ACCUM_KERNEL(accum_bf16_f32_rn, AccBf16, XF32, false)
SRK_ACCUM_KERNEL(accum_bf16_bf16_sr, AccBf16, XBf16, true)
SRK_ACCUM_KERNEL(accum_bf16_bf16_rn, AccBf16, XBf16, false)
SRK_ACCUM_KERNEL(accum_bf16_f16_sr, AccBf16, XF16, true)
SRK_ACCUM_KERNEL(accum_bf16_f16_rn, AccBf16, XF16, false)
SRK_ACCUM_KERNEL(accum_f16_f32_sr, AccF16, XF32, true)
SRK_ACCUM_KERNEL(accum_f16_f32_rn, AccF16, XF32, false)
SRK_ACCUM_KERNEL(accum_f16_bf16_sr, AccF16, XBf16, true)
SRK_ACCUM_KERNEL(accum_f16_bf16_rn, AccF16, XBf16, false)
SRK_ACCUM_KERNEL(accum_f16_f16_sr, AccF16, XF16, true)
SRK_ACCUM_KERNEL(accum_f16_f16_rn, AccF16, XF16, false)
