// cast.cu: FP32 -> BF16 / FP16 / FP8 (e4m3fn, e5m2) casts, stochastic or round-to-nearest-even,
// and the exact upcasts back to FP32.
//
// Numeric contract: srkern bit contract v1.1 (README, "The bit contract"); per-element rounding
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
#include "srk_blocks.h"

// ---- per-format lane math --------------------------------------------------------------------

// BF16: 8 lanes per Philox block, 16-bit draws.
struct CastBf16 {
  typedef u16 out_t;
  static const int G = 8;
  SRK_HD static u16 sr(float x, const srk_u32x4& b, int lane, int sat) { return srk_bf16_sr(x, srk_draw16(b, lane), sat); }
  SRK_HD static u16 rn(float x, int sat) { return srk_bf16_rn(x, sat); }
#ifndef SRK_GPU
  template <bool SAT> static u16 cpu_sr(float x, u32 r) { return srk_bf16_sr(x, r, SAT); }
  template <bool SAT> static u16 cpu_rn(float x) { return srk_bf16_rn(x, SAT); }
  static u32 tile_draw(const u32* w, int j) { return srk_tile_draw16(w, j); }
#endif
};

#ifndef SRK_GPU
// CPU: SrkSmallFloat::encode rewritten on 32-bit lanes, so that g++ vectorises it 8 lanes wide
// (the u64 original needs 4-lane 64-bit shifts: ~30 instructions per element, measured with
// callgrind, against ~4 here). Same bits: every quantity of the original fits 32 bits.
//   units = |x| truncated, in target quanta: sig >> s, which is 0 once s >= 24 (sig < 2^24).
//   d32   = floor(D * 2^32): rem << (32 - s) < 2^32 for s <= 32; rem >> (s - 32), 0 for s >= 56.
//   SR rounds up iff d32 + r >= 2^32, i.e. r > ~d32; RN iff d32 > 1/2, ties to even units.
// Checked against SrkSmallFloat::encode at every exponent and both sides of every SR threshold
// (see the bit-exact tests), and by the whole-range RN tests.
template <class F> struct SmallParams;
template <int MANT_, int BIAS_, int SIGN_, u32 MAXFIN_, bool HAS_INF_, u32 INF_ENC_, u32 NAN_ENC_>
struct SmallParams<SrkSmallFloat<MANT_, BIAS_, SIGN_, MAXFIN_, HAS_INF_, INF_ENC_, NAN_ENC_> > {
  static const int MANT = MANT_, EMIN = 1 - BIAS_, SIGN = SIGN_;
  static const u32 MAXFIN = MAXFIN_, INF_ENC = INF_ENC_, NAN_ENC = NAN_ENC_;
  static const bool HAS_INF = HAS_INF_;
};

template <class F, bool STOCHASTIC, bool SAT>
inline u32 small_encode_u32(float x, u32 r) {
  typedef SmallParams<F> P;
  u32 u = srk_f2u(x);
  u32 a = u & 0x7fffffffu;
  int e = (int)(a >> 23);
  u32 sig = e ? ((a & 0x7fffffu) | 0x800000u) : a;
  int et = e - 127 > P::EMIN ? e - 127 : P::EMIN;
  int s = et - P::MANT + 150 - (e > 1 ? e : 1);  // >= 23 - MANT > 0
  // sig < 2^24, so clamping the shift counts changes nothing and keeps every shift defined.
  int sc = s < 31 ? s : 31;
  u32 units = sig >> sc;
  u32 rem = sig - (units << sc);
  int sl = 32 - s > 0 ? 32 - s : 0, sr = s - 32 > 0 ? (s - 32 < 31 ? s - 32 : 31) : 0;
  u32 d32 = (rem << sl) >> sr;
  // Round up iff d32 + t >= 2^32: t = the draw (SR); t = 2^31 - 1 + (units odd) is
  // round-half-to-even (RN).
  u32 t = STOCHASTIC ? r : 0x7fffffffu + (units & 1u);
  u32 enc = ((u32)(et - P::EMIN) << P::MANT) + units + (u32)(t > ~d32);
  u32 overflow = SAT ? P::MAXFIN : (P::HAS_INF ? P::INF_ENC : P::NAN_ENC);
  u32 out = enc > P::MAXFIN ? overflow : enc;
  out = a == 0x7f800000u ? (P::HAS_INF ? P::INF_ENC : overflow) : out;
  out = a > 0x7f800000u ? P::NAN_ENC : out;
  return ((u >> 31) << P::SIGN) | out;
}
#endif

// FP16 / FP8: 4 lanes per Philox block, 32-bit draws.
template <class F, class OUT>
struct CastSmall {
  typedef OUT out_t;
  static const int G = 4;
  SRK_HD static OUT sr(float x, const srk_u32x4& b, int lane, int sat) { return (OUT)F::encode(x, b.w[lane], true, sat); }
  SRK_HD static OUT rn(float x, int sat) { return (OUT)F::encode(x, 0u, false, sat); }
#ifndef SRK_GPU
  template <bool SAT> static OUT cpu_sr(float x, u32 r) { return (OUT)small_encode_u32<F, true, SAT>(x, r); }
  template <bool SAT> static OUT cpu_rn(float x) { return (OUT)small_encode_u32<F, false, SAT>(x, 0u); }
  static u32 tile_draw(const u32* w, int j) { return w[j]; }
#endif
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

#ifndef SRK_GPU
// CPU: `count` (<= T) full blocks from q0 as one tile: Philox for T blocks across SIMD lanes,
// then one SIMD loop over the tile's elements, each reading its draw from the tile buffer.
// SAT is a template argument so that the common saturate=0 loop carries no clamp.
template <class C, bool SR, bool SAT, int T>
inline void cast_tile_cpu(const float* SRK_RESTRICT x, typename C::out_t* SRK_RESTRICT y,
                          u64 seed, u64 step, u32 stream, u64 q0, int count) {
  const int m = count * C::G;
  if (SR) {
    alignas(64) u32 w[4 * T];
    srk_draw_tile<T>(seed, step, stream, q0, w);
    #pragma omp simd
    for (int j = 0; j < m; ++j) y[j] = C::template cpu_sr<SAT>(x[j], C::tile_draw(w, j));
  } else {
    #pragma omp simd
    for (int j = 0; j < m; ++j) y[j] = C::template cpu_rn<SAT>(x[j]);
  }
}
#endif

// Blocks per unit of the outer loop. GPU: one (a thread makes one Philox call and one 16-byte
// load/store pair). CPU: a tile of CAST_TILE blocks, so that Philox runs across SIMD lanes.
#ifdef SRK_GPU
#define CAST_TILE 1
#else
#define CAST_TILE 32
#endif

// Full blocks first, then the (at most two) partial blocks at either end of [offset, offset+n).
template <class C, bool SR>
SRK_HD void cast_body(const float* SRK_RESTRICT x, typename C::out_t* SRK_RESTRICT y, i64 n, u64 offset,
                      u64 seed, u64 step, u32 stream, int sat) {
  SrkBlocks bl = srk_split_blocks(offset, n, C::G);
  const u64 q_full0 = bl.q_full0;
  const i64 nfull = bl.nfull;
  i64 ntiles = (nfull + CAST_TILE - 1) / CAST_TILE;
  SRK_LOOP_TILES(i, ntiles) {
    u64 q0 = q_full0 + (u64)i * CAST_TILE;
#ifdef SRK_GPU
    cast_full_block<C, SR>(x, y, offset, seed, step, stream, sat, q0);
#else
    int count = (int)srk_min64(CAST_TILE, nfull - i * CAST_TILE);
    i64 p = (i64)(q0 * C::G - offset);
    if (sat) cast_tile_cpu<C, SR, true, CAST_TILE>(x + p, y + p, seed, step, stream, q0, count);
    else cast_tile_cpu<C, SR, false, CAST_TILE>(x + p, y + p, seed, step, stream, q0, count);
#endif
  }
  SRK_LOOP_TILES(i, bl.nedge) {  // at most two: on CPU the calling thread runs them
    cast_partial_block<C, SR>(x, y, n, offset, seed, step, stream, sat, bl.q_edge[i]);
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
//
// GPU: one element per thread. CPU: chunks of UPCAST_CHUNK elements per loop unit, each decoded
// by a vectorisable loop: BF16 is a shift; FP16 uses the F16C conversion where the CPU has it
// (exact, NaN payloads kept and quieted exactly like SrkF16::decode); FP8 reads a 256-entry
// table filled by the format's own decode, so every path returns decode()'s bits.

struct DecBf16 {
  typedef u16 in_t;
  SRK_HD static float decode(u16 h) { return srk_bf16_to_f32(h); }
#ifndef SRK_GPU
  static void run(const u16* SRK_RESTRICT x, float* SRK_RESTRICT y, int m) {
    #pragma omp simd
    for (int k = 0; k < m; ++k) y[k] = srk_bf16_to_f32(x[k]);
  }
#endif
};

struct DecF16 {
  typedef u16 in_t;
  SRK_HD static float decode(u16 h) { return SrkF16::decode(h); }
#ifndef SRK_GPU
  static void run(const u16* SRK_RESTRICT x, float* SRK_RESTRICT y, int m) {
    int k = 0;
#if defined(__F16C__)
    for (; k + 8 <= m; k += 8)
      _mm256_storeu_ps(y + k, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(x + k))));
#endif
    for (; k < m; ++k) y[k] = SrkF16::decode(x[k]);
  }
#endif
};

template <class F>
struct Dec8 {
  typedef u8 in_t;
  SRK_HD static float decode(u8 h) { return F::decode(h); }
#ifndef SRK_GPU
  struct Table {
    float v[256];
    Table() { for (int c = 0; c < 256; ++c) v[c] = F::decode((u32)c); }
  };
  static void run(const u8* SRK_RESTRICT x, float* SRK_RESTRICT y, int m) {
    static const Table table;  // built once (thread-safe static initialisation)
    #pragma omp simd
    for (int k = 0; k < m; ++k) y[k] = table.v[x[k]];
  }
#endif
};

#ifndef SRK_GPU
#define UPCAST_CHUNK 4096
#endif

template <class D>
SRK_HD void upcast_body(const typename D::in_t* x, float* y, i64 n) {
#ifdef SRK_GPU
  SRK_LOOP(i, n) { y[i] = D::decode(x[i]); }
#else
  i64 nchunks = (n + UPCAST_CHUNK - 1) / UPCAST_CHUNK;
  SRK_LOOP_TILES(c, nchunks) {
    i64 a = c * UPCAST_CHUNK;
    D::run(x + a, y + a, (int)srk_min64(UPCAST_CHUNK, n - a));
  }
#endif
}

SRK_KERNEL void cast_bf16_f32(const u16* x, float* y, i64 n) { upcast_body<DecBf16>(x, y, n); }
SRK_KERNEL void cast_f16_f32(const u16* x, float* y, i64 n) { upcast_body<DecF16>(x, y, n); }
SRK_KERNEL void cast_e4m3_f32(const u8* x, float* y, i64 n) { upcast_body<Dec8<SrkE4M3> >(x, y, n); }
SRK_KERNEL void cast_e5m2_f32(const u8* x, float* y, i64 n) { upcast_body<Dec8<SrkE5M2> >(x, y, n); }
