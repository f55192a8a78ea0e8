// adamw.cu: one fused, multi-tensor AdamW step in five precision modes, and the squared gradient
// norm used for clipping.
//
// What one launch computes. A table (one row of ADAMW_COLS u64 per tensor, see AdamwRow) lists
// the tensors; element j of tensor t has logical index offset[t] + j in the flat vector of all
// parameters. For every element, in FP32, in this order (no contraction: every * and + below is
// one IEEE operation; sqrtf and / are correctly rounded on both backends):
//
//   g  = grad * grad_scale
//   m  = b1 * m + omb1 * g                         (omb1 = 1 - beta1, rounded once on the host)
//   v  = b2 * v + omb2 * (g * g)                   (omb2 = 1 - beta2)
//   d  = sqrtf(v) * inv_sqrt_bc2 + eps             (inv_sqrt_bc2 = 1 / sqrt(1 - beta2^step))
//   u  = (step_size * m) / d                       (step_size = lr / (1 - beta1^step))
//   p' = p * decay - u                             (decay = 1 - lr * weight_decay; decoupled)
//
// The update uses the FP32 m and v; what is stored is their rounding (BF16 moments). The
// step-dependent scalars are computed once on the host in float64 and rounded to FP32
// (srkern/adamw.py, _scalars), so lr and step change every step without recompiling.
// The modes differ only in what is stored and how it is rounded:
//   bf16-sr       BF16 p; m, v BF16 (or FP32); every BF16 write stochastically rounded
//   bf16-nearest  the same buffers, every BF16 write round-to-nearest-even (the baseline)
//   bf16-kahan    BF16 p with a BF16 compensation c (lrwd = lr * weight_decay):
//                 y = (-lrwd * p - u) + c, p' = rn(p + y), c' = y - (p' - p) (exact difference),
//                 c' written with SR (stream COMPENSATION); m, v as in bf16-sr
//   fp32-master   FP32 master weight w (p above is w), FP32 m, v; the BF16 model copy = rn(w')
//   fp32          FP32 p, m, v
// A set found_inf flag (*found_inf != 0) makes the launch write nothing.
//
// NaN and subnormals (contract v1.1): every stored value that is NaN (weights, moments, master
// weights, compensation; FP32 and BF16) is the canonical quiet NaN, FP32 0x7fc00000 / BF16
// 0x7fc0, whatever NaN the inputs held (adamw_bf16 / adamw_f32 below form every stored value, on
// the CPU and GPU paths alike). Subnormals are never flushed: host builds run under SrkFpEnv
// (srk_platform.h) on the calling thread from kernel entry and on every OpenMP thread, whatever
// FTZ/DAZ the caller set.
//
// Random bits (contract v1): the draw for element index i of stream S is
// srk_draw16(srk_draw_block(seed, step, S, i / 8), i % 8), with S = SRK_STREAM_PARAM,
// _EXP_AVG, _EXP_AVG_SQ or _COMPENSATION. The unit of work is one Philox block of 8 logical
// indices *of one tensor* (a (tensor, block) pair): how tensors are grouped into launches,
// which thread runs a block, CPU or GPU, never changes a bit.
//
// CPU: OpenMP threads take chunks of 2048 consecutive (tensor, block) pairs; runs of 8 full
// blocks (64 elements) draw their Philox words with srk_draw_tile (srk_philox.h: AVX2, one
// lane per block) and update the 64 elements in `omp simd` loops, with the
// square roots taken 8 at a time by vsqrtps (the same IEEE operation as sqrtf); partial blocks
// at tensor ends take the per-lane scalar path. Measured on a 2-core EPYC (Zen 3), CPU time per
// element and thread, bf16-sr with BF16 moments: ~2.3 ns, of which ~1 ns is the three Philox
// streams (16 vector ops per round per 8 blocks, near the core's issue width) and ~0.3 ns the
// correctly rounded sqrt and division; the step is compute-bound on such a CPU.
// GPU: one thread per (tensor, block) pair, found by binary search of the table's block
// prefix sums, with 16-byte loads and stores where aligned.
//
// References: Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (AdamW);
// Ozkara, Yu, Park, AISTATS 2025 (BF16 + SR AdamW); Zamirai et al. 2020 (Kahan-summed BF16);
// llm.c's llmc/adamw.cuh (layout of a fused AdamW kernel).
#include "srk_platform.h"
#include "srk_philox.h"
#include "srk_round.h"

#ifndef SRK_GPU
#include <omp.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#endif

// ---- the tensor table -------------------------------------------------------------------------

// Columns of one table row (u64 each). The Python side (srkern/adamw.py, _TABLE_COLS) must match.
#define ADAMW_COLS 9

struct AdamwRow {
  void* p;         // weights: BF16 (FP32 in mode fp32); in fp32-master the BF16 copy, write only
  const void* g;   // gradient, BF16 or FP32
  void* m;         // first moment
  void* v;         // second moment
  float* w;        // fp32-master: FP32 master weights; else null
  u16* c;          // bf16-kahan: BF16 compensation; else null
  i64 n;           // elements
  u64 off;         // logical index of element 0
  i64 b0;          // first (tensor, block) pair of this tensor in the launch
};

SRK_HD AdamwRow adamw_row(const u64* table, i64 t) {
  const u64* r = table + t * ADAMW_COLS;
  AdamwRow row;
  row.p = (void*)(uptr)r[0];
  row.g = (const void*)(uptr)r[1];
  row.m = (void*)(uptr)r[2];
  row.v = (void*)(uptr)r[3];
  row.w = (float*)(uptr)r[4];
  row.c = (u16*)(uptr)r[5];
  row.n = (i64)r[6];
  row.off = r[7];
  row.b0 = (i64)r[8];
  return row;
}

// The tensor that (tensor, block) pair b belongs to: the largest t with b0[t] <= b.
SRK_HD i64 adamw_find(const u64* table, i64 ntensors, i64 b) {
  i64 lo = 0, hi = ntensors - 1;
  while (lo < hi) {
    i64 mid = (lo + hi + 1) / 2;
    if ((i64)table[mid * ADAMW_COLS + 8] <= b) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// ---- hyper-parameters (FP32, from the host) ---------------------------------------------------

struct AdamwHyper {
  float b1, omb1, b2, omb2, step_size, inv_sqrt_bc2, eps, decay, lrwd, grad_scale;
  u64 seed, step;
};

// ---- element storage: BF16 as u16 bit patterns, FP32 as float ---------------------------------

SRK_HD float adamw_ld(const u16* a, i64 j) { return srk_bf16_to_f32(a[j]); }
SRK_HD float adamw_ld(const float* a, i64 j) { return a[j]; }

// The stored form of an FP32 result x, for every buffer (contract v1.1: a NaN is stored as the
// canonical FP32 0x7fc00000 or BF16 0x7fc0, whatever NaN x is): every store of the CPU path and of
// the GPU path goes through these two, so x86 (NaN payloads and signs kept) and GPUs (a NaN of their
// own) store the same bits. BF16: SR with draw r, or to nearest when !sr. A rounding maps NaN to
// NaN and nothing else to NaN, so testing the 16-bit result equals canonicalising x first, and it
// is cheaper on 16-bit SIMD lanes (one thread of an AVX-512 Xeon, bf16-sr step: within the noise,
// 0-5%, of no test at all, against about +15% for an FP32 test before each of the three roundings).
SRK_HD u16 adamw_bf16(float x, u32 r, bool sr) {
  u16 t = sr ? srk_bf16_sr(x, r, 0) : srk_bf16_rn(x, 0);
  return (t & 0x7fffu) > 0x7f80u ? (u16)SRK_NAN_BF16 : t;
}
SRK_HD float adamw_f32(float x) { return srk_canon_f32(x); }

// Store x (stored form above); a BF16 target is rounded by SR with draw r, or to nearest when !sr.
SRK_HD void adamw_st(u16* a, i64 j, float x, u32 r, bool sr) { a[j] = adamw_bf16(x, r, sr); }
SRK_HD void adamw_st(float* a, i64 j, float x, u32, bool) { a[j] = adamw_f32(x); }

// ---- the arithmetic: pure FP32 functions, the one place the update is written ----------------

// m, v <- new moments from the raw gradient.
SRK_HD void adamw_moments_math(const AdamwHyper& h, float graw, float* m, float* v) {
  float g = graw * h.grad_scale;
  *m = h.b1 * *m + h.omb1 * g;
  *v = h.b2 * *v + h.omb2 * (g * g);
}

// The step u from the FP32 first moment m and sv = sqrtf(v).
SRK_HD float adamw_u_math(const AdamwHyper& h, float m, float sv) {
  float d = sv * h.inv_sqrt_bc2 + h.eps;
  return (h.step_size * m) / d;
}

// Plain weights: p' = p * decay - u.
SRK_HD float adamw_p_math(const AdamwHyper& h, float p, float u) { return p * h.decay - u; }

// Kahan-summed BF16 weight: returns the new compensation (FP32), *pn the new BF16 weight (stored
// form: a NaN weight is 0x7fc0, and then the compensation is NaN too).
SRK_HD float adamw_kahan_math(const AdamwHyper& h, float p, float c, float u, u16* pn) {
  float y = (-h.lrwd * p - u) + c;
  *pn = adamw_bf16(p + y, 0u, false);
  return y - (srk_bf16_to_f32(*pn) - p);  // exact difference of two nearby BF16 values
}

// ---- the per-element update -------------------------------------------------------------------

enum { MODE_SR = 0, MODE_NEAREST = 1, MODE_KAHAN = 2, MODE_MASTER = 3, MODE_FP32 = 4 };

// MODE: one of the above; P: stored weight type; G: gradient type; S: moment type.
// The update is split around the square root so that the CPU path can take it 8 lanes at a time
// with an explicit vsqrtps (g++ will not vectorise sqrtf while it may set errno); both halves
// and the square root are the same IEEE operations on either backend. Draws rp, rm, rv, rc are
// the 16-bit draws of the element's index in the four streams (unused ones are ignored).
template <int MODE, class P, class G, class S>
struct AdamwElem {
  static const bool SR_STATE = MODE == MODE_SR || MODE == MODE_KAHAN;  // BF16 moment writes use SR

  // New moments, stored (rounded as the mode says); returns the FP32 values for the update.
  SRK_HD static void moments(const AdamwHyper& h, const AdamwRow& row, i64 j, u32 rm, u32 rv, float* m_out, float* v_out) {
    float m = adamw_ld((const S*)row.m, j), v = adamw_ld((const S*)row.v, j);
    adamw_moments_math(h, adamw_ld((const G*)row.g, j), &m, &v);
    adamw_st((S*)row.m, j, m, rm, SR_STATE);
    adamw_st((S*)row.v, j, v, rv, SR_STATE);
    *m_out = m;
    *v_out = v;
  }

  // The weight update from the FP32 moment m and sv = sqrtf(v).
  SRK_HD static void weights(const AdamwHyper& h, const AdamwRow& row, i64 j, float m, float sv, u32 rp, u32 rc) {
    float u = adamw_u_math(h, m, sv);
    if (MODE == MODE_MASTER) {
      float w = adamw_p_math(h, row.w[j], u);
      row.w[j] = adamw_f32(w);
      ((u16*)row.p)[j] = adamw_bf16(w, 0u, false);
    } else if (MODE == MODE_KAHAN) {
      u16 pn;
      float c = adamw_kahan_math(h, adamw_ld((const u16*)row.p, j), srk_bf16_to_f32(row.c[j]), u, &pn);
      ((u16*)row.p)[j] = pn;
      row.c[j] = adamw_bf16(c, rc, true);
    } else {
      adamw_st((P*)row.p, j, adamw_p_math(h, adamw_ld((const P*)row.p, j), u), rp, MODE == MODE_SR);
    }
  }

  SRK_HD static void run(const AdamwHyper& h, const AdamwRow& row, i64 j, u32 rp, u32 rm, u32 rv, u32 rc) {
    float m, v;
    moments(h, row, j, rm, rv, &m, &v);
    weights(h, row, j, m, sqrtf(v), rp, rc);
  }
};

// Logical block range of a tensor: blocks q_first .. q_first + nblocks - 1 hold its elements.
SRK_HD u64 adamw_q_first(const AdamwRow& row) { return row.off / 8; }

// One (tensor, block) pair, any block (full or partial): per-lane, scalar Philox.
template <class E>
SRK_HD void adamw_block_scalar(const AdamwHyper& h, const AdamwRow& row, u64 q) {
  srk_u32x4 bp = srk_draw_block(h.seed, h.step, SRK_STREAM_PARAM, q);
  srk_u32x4 bm = srk_draw_block(h.seed, h.step, SRK_STREAM_EXP_AVG, q);
  srk_u32x4 bv = srk_draw_block(h.seed, h.step, SRK_STREAM_EXP_AVG_SQ, q);
  srk_u32x4 bc = srk_draw_block(h.seed, h.step, SRK_STREAM_COMPENSATION, q);
  for (int k = 0; k < 8; ++k) {
    i64 j = (i64)(q * 8 + (u64)k - row.off);
    if (j < 0 || j >= row.n) continue;
    E::run(h, row, j, srk_draw16(bp, k), srk_draw16(bm, k), srk_draw16(bv, k), srk_draw16(bc, k));
  }
}

#ifndef SRK_GPU
// ---- CPU: runs of (tensor, block) pairs, 8 full blocks at a time ------------------------------

// The streams a mode draws from, so that no unused Philox call is made.
template <int MODE, class S> struct AdamwStreams;
template <class S> struct AdamwStreams<MODE_SR, S> { static const int N = sizeof(S) == 2 ? 3 : 1; };
template <class S> struct AdamwStreams<MODE_KAHAN, S> { static const int N = sizeof(S) == 2 ? 3 : 1; };
template <class S> struct AdamwStreams<MODE_NEAREST, S> { static const int N = 0; };
template <class S> struct AdamwStreams<MODE_MASTER, S> { static const int N = 0; };
template <class S> struct AdamwStreams<MODE_FP32, S> { static const int N = 0; };

// 64 elements = 8 full blocks starting at block q0, element j0 = q0 * 8 - off of the tensor.
template <int MODE, class P, class G, class S>
static inline void adamw_run64(const AdamwHyper& h, const AdamwRow& row, u64 q0) {
  typedef AdamwElem<MODE, P, G, S> E;
  const int NS = AdamwStreams<MODE, S>::N;
  alignas(32) u32 words[3][32];
  // Kahan writes the weight to nearest and the compensation with SR: its first stream is
  // COMPENSATION where bf16-sr's is PARAM. With FP32 moments only that one stream is drawn.
  const u32 first = MODE == MODE_KAHAN ? SRK_STREAM_COMPENSATION : SRK_STREAM_PARAM;
  if (NS >= 1) srk_draw_tile<8>(h.seed, h.step, first, q0, words[0]);
  if (NS == 3) {
    srk_draw_tile<8>(h.seed, h.step, SRK_STREAM_EXP_AVG, q0, words[1]);
    srk_draw_tile<8>(h.seed, h.step, SRK_STREAM_EXP_AVG_SQ, q0, words[2]);
  }
  const u16* r0 = (const u16*)words[0];
  const u16* r1 = (const u16*)words[1];
  const u16* r2 = (const u16*)words[2];
  const i64 j0 = (i64)(q0 * 8 - row.off);
  alignas(32) float m[64], v[64];
  // Only the draws of used streams are read (NS is a compile-time constant per mode).
  #pragma omp simd
  for (int k = 0; k < 64; ++k) {
    u32 b = NS == 3 ? r1[k] : 0u, c = NS == 3 ? r2[k] : 0u;
    E::moments(h, row, j0 + k, b, c, &m[k], &v[k]);
  }
#if defined(__AVX__)
  for (int k = 0; k < 64; k += 8) _mm256_store_ps(v + k, _mm256_sqrt_ps(_mm256_load_ps(v + k)));
#else
  for (int k = 0; k < 64; ++k) v[k] = sqrtf(v[k]);
#endif
  #pragma omp simd
  for (int k = 0; k < 64; ++k) {
    u32 a = NS >= 1 ? r0[k] : 0u;
    E::weights(h, row, j0 + k, m[k], v[k], a, a);
  }
}

// Local blocks [lb0, lb1) of one tensor.
template <int MODE, class P, class G, class S>
static void adamw_cpu_range(const AdamwHyper& h, const AdamwRow& row, i64 lb0, i64 lb1) {
  typedef AdamwElem<MODE, P, G, S> E;
  const u64 qf = adamw_q_first(row);
  const u64 end = row.off + (u64)row.n;
  // Full blocks of the tensor: [qa, qb).
  const u64 qa = (row.off + 7) / 8, qb = end / 8;
  u64 q = qf + (u64)lb0, q1 = qf + (u64)lb1;
  while (q < q1) {
    if (q >= qa && q + 8 <= qb && q + 8 <= q1) {
      adamw_run64<MODE, P, G, S>(h, row, q);
      q += 8;
    } else {
      adamw_block_scalar<E>(h, row, q);
      q += 1;
    }
  }
}

// Pairs are handed out in chunks of ADAMW_CPU_CHUNK (a multiple of 8, so 64-element runs stay
// whole), dynamically: on a shared machine a descheduled thread then delays one chunk, not half
// the step. Which thread takes a chunk never changes a bit. 2048 pairs = 16K elements, ~20 us of
// work: scheduling costs well under 1%.
#define ADAMW_CPU_CHUNK 2048

template <int MODE, class P, class G, class S>
static void adamw_body(const u64* table, i64 ntensors, i64 npairs, const AdamwHyper& h) {
  if (npairs <= 0) return;
  const i64 nchunks = (npairs + ADAMW_CPU_CHUNK - 1) / ADAMW_CPU_CHUNK;
  // One chunk (under 16K elements) runs on the calling thread: no fork, no wake-up of workers.
  // SRK_PARALLEL: every thread of the team runs its chunks in the default FP environment.
  SRK_PARALLEL(nchunks > 1) SRK_PRAGMA(omp for schedule(dynamic, 1) nowait)
  for (i64 chunk = 0; chunk < nchunks; ++chunk) {
    i64 b = chunk * ADAMW_CPU_CHUNK, b_end = srk_min64(npairs, b + ADAMW_CPU_CHUNK);
    i64 t = adamw_find(table, ntensors, b);
    while (b < b_end) {
      AdamwRow row = adamw_row(table, t);
      i64 nblk = t + 1 < ntensors ? (i64)table[(t + 1) * ADAMW_COLS + 8] - row.b0 : npairs - row.b0;
      i64 stop = srk_min64(b_end, row.b0 + nblk);
      if (stop > b) adamw_cpu_range<MODE, P, G, S>(h, row, b - row.b0, stop - row.b0);
      b = srk_max64(b, stop);
      ++t;
    }
  }
}

#else
// ---- GPU: one thread per (tensor, block) pair -------------------------------------------------

// 8 consecutive BF16 or FP32 values, with 16-byte accesses when the address allows.
SRK_HD void adamw_ld8(const u16* a, float* x) {
  u16 t[8];
  if (((uptr)a & 15u) == 0) { uint4 q = *(const uint4*)a; memcpy(t, &q, 16); }
  else { for (int k = 0; k < 8; ++k) t[k] = a[k]; }
  for (int k = 0; k < 8; ++k) x[k] = srk_bf16_to_f32(t[k]);
}
SRK_HD void adamw_ld8(const float* a, float* x) {
  if (((uptr)a & 15u) == 0) {
    float4 q0 = *(const float4*)a, q1 = *(const float4*)(a + 4);
    x[0] = q0.x; x[1] = q0.y; x[2] = q0.z; x[3] = q0.w; x[4] = q1.x; x[5] = q1.y; x[6] = q1.z; x[7] = q1.w;
  } else {
    for (int k = 0; k < 8; ++k) x[k] = a[k];
  }
}
SRK_HD void adamw_st8(u16* a, const float* x, const srk_u32x4& b, bool sr) {
  u16 t[8];
  for (int k = 0; k < 8; ++k) t[k] = adamw_bf16(x[k], srk_draw16(b, k), sr);
  if (((uptr)a & 15u) == 0) { uint4 q; memcpy(&q, t, 16); *(uint4*)a = q; }
  else { for (int k = 0; k < 8; ++k) a[k] = t[k]; }
}
SRK_HD void adamw_st8(float* a, const float* xin, const srk_u32x4&, bool) {
  float x[8];
  for (int k = 0; k < 8; ++k) x[k] = adamw_f32(xin[k]);
  if (((uptr)a & 15u) == 0) {
    *(float4*)a = make_float4(x[0], x[1], x[2], x[3]);
    *(float4*)(a + 4) = make_float4(x[4], x[5], x[6], x[7]);
  } else {
    for (int k = 0; k < 8; ++k) a[k] = x[k];
  }
}

// One full block: the same arithmetic as AdamwElem::run, on 8 registers at a time.
template <int MODE, class P, class G, class S>
SRK_HD void adamw_block_full(const AdamwHyper& h, const AdamwRow& row, u64 q) {
  const bool SR_STATE = MODE == MODE_SR || MODE == MODE_KAHAN;
  i64 j = (i64)(q * 8 - row.off);
  float g[8], m[8], v[8], u[8], p[8];
  adamw_ld8((const G*)row.g + j, g);
  adamw_ld8((const S*)row.m + j, m);
  adamw_ld8((const S*)row.v + j, v);
  #pragma unroll
  for (int k = 0; k < 8; ++k) {
    adamw_moments_math(h, g[k], &m[k], &v[k]);
    u[k] = adamw_u_math(h, m[k], sqrtf(v[k]));
  }
  srk_u32x4 none = {{0u, 0u, 0u, 0u}};
  const bool sr_state = SR_STATE && sizeof(S) == 2;
  adamw_st8((S*)row.m + j, m, sr_state ? srk_draw_block(h.seed, h.step, SRK_STREAM_EXP_AVG, q) : none, SR_STATE);
  adamw_st8((S*)row.v + j, v, sr_state ? srk_draw_block(h.seed, h.step, SRK_STREAM_EXP_AVG_SQ, q) : none, SR_STATE);
  if (MODE == MODE_MASTER) {
    adamw_ld8(row.w + j, p);
    #pragma unroll
    for (int k = 0; k < 8; ++k) p[k] = adamw_p_math(h, p[k], u[k]);
    adamw_st8(row.w + j, p, none, false);
    adamw_st8((u16*)row.p + j, p, none, false);
  } else if (MODE == MODE_KAHAN) {
    float c[8], pn[8];
    adamw_ld8((const u16*)row.p + j, p);
    adamw_ld8((const u16*)row.c + j, c);
    #pragma unroll
    for (int k = 0; k < 8; ++k) {
      u16 b;
      c[k] = adamw_kahan_math(h, p[k], c[k], u[k], &b);
      pn[k] = srk_bf16_to_f32(b);  // exact: re-rounding it to nearest below gives b back
    }
    adamw_st8((u16*)row.p + j, pn, none, false);
    adamw_st8(row.c + j, c, srk_draw_block(h.seed, h.step, SRK_STREAM_COMPENSATION, q), true);
  } else {
    adamw_ld8((const P*)row.p + j, p);
    #pragma unroll
    for (int k = 0; k < 8; ++k) p[k] = adamw_p_math(h, p[k], u[k]);
    adamw_st8((P*)row.p + j, p, MODE == MODE_SR ? srk_draw_block(h.seed, h.step, SRK_STREAM_PARAM, q) : none, MODE == MODE_SR);
  }
}

template <int MODE, class P, class G, class S>
SRK_HD void adamw_body(const u64* table, i64 ntensors, i64 npairs, const AdamwHyper& h) {
  typedef AdamwElem<MODE, P, G, S> E;
  SRK_LOOP(b, npairs) {
    i64 t = adamw_find(table, ntensors, b);
    AdamwRow row = adamw_row(table, t);
    u64 q = adamw_q_first(row) + (u64)(b - row.b0);
    // The tensor element at lane 0 of block q, in [-7, n): exact modulo 2^64, so nothing here
    // wraps for a tensor that ends in the last block of the index space (q * 8 + 8 would).
    i64 j = (i64)(q * 8 - row.off);
    if (j >= 0 && j + 8 <= row.n) adamw_block_full<MODE, P, G, S>(h, row, q);
    else adamw_block_scalar<E>(h, row, q);
  }
}
#endif

// ---- kernels: adamw_<mode>_g<grad>_s<state> -----------------------------------------------------

#define SRK_ADAMW_KERNEL(name, MODE, P, G, S)                                                          \
  SRK_KERNEL void name(const u64* table, i64 ntensors, i64 npairs, u64 seed, u64 step, float b1,       \
                       float omb1, float b2, float omb2, float step_size, float inv_sqrt_bc2,          \
                       float eps, float decay, float lrwd, float grad_scale, const float* found_inf) { \
    SRK_FP_GUARD; /* host builds: a subnormal found_inf is non-zero also under the caller's DAZ */     \
    if (found_inf != 0 && *found_inf != 0.0f) return;                                                  \
    AdamwHyper h;                                                                                      \
    h.b1 = b1; h.omb1 = omb1; h.b2 = b2; h.omb2 = omb2; h.step_size = step_size;                       \
    h.inv_sqrt_bc2 = inv_sqrt_bc2; h.eps = eps; h.decay = decay; h.lrwd = lrwd;                        \
    h.grad_scale = grad_scale; h.seed = seed; h.step = step;                                           \
    adamw_body<MODE, P, G, S>(table, ntensors, npairs, h);                                             \
  }

SRK_ADAMW_KERNEL(adamw_bf16_sr_gbf16_sbf16, MODE_SR, u16, u16, u16)
SRK_ADAMW_KERNEL(adamw_bf16_sr_gf32_sbf16, MODE_SR, u16, float, u16)
SRK_ADAMW_KERNEL(adamw_bf16_sr_gbf16_sf32, MODE_SR, u16, u16, float)
SRK_ADAMW_KERNEL(adamw_bf16_sr_gf32_sf32, MODE_SR, u16, float, float)
SRK_ADAMW_KERNEL(adamw_bf16_nearest_gbf16_sbf16, MODE_NEAREST, u16, u16, u16)
SRK_ADAMW_KERNEL(adamw_bf16_nearest_gf32_sbf16, MODE_NEAREST, u16, float, u16)
SRK_ADAMW_KERNEL(adamw_bf16_nearest_gbf16_sf32, MODE_NEAREST, u16, u16, float)
SRK_ADAMW_KERNEL(adamw_bf16_nearest_gf32_sf32, MODE_NEAREST, u16, float, float)
SRK_ADAMW_KERNEL(adamw_bf16_kahan_gbf16_sbf16, MODE_KAHAN, u16, u16, u16)
SRK_ADAMW_KERNEL(adamw_bf16_kahan_gf32_sbf16, MODE_KAHAN, u16, float, u16)
SRK_ADAMW_KERNEL(adamw_bf16_kahan_gbf16_sf32, MODE_KAHAN, u16, u16, float)
SRK_ADAMW_KERNEL(adamw_bf16_kahan_gf32_sf32, MODE_KAHAN, u16, float, float)
SRK_ADAMW_KERNEL(adamw_fp32_master_gbf16_sf32, MODE_MASTER, u16, u16, float)
SRK_ADAMW_KERNEL(adamw_fp32_master_gf32_sf32, MODE_MASTER, u16, float, float)
SRK_ADAMW_KERNEL(adamw_fp32_gbf16_sf32, MODE_FP32, float, u16, float)
SRK_ADAMW_KERNEL(adamw_fp32_gf32_sf32, MODE_FP32, float, float, float)

// ---- squared gradient norm ----------------------------------------------------------------------
//
// The partial sums, each a pure function of element indices (so the result does not depend on
// thread count, launch shape or backend). Each tensor is cut, from its element 0, into spans of
// ADAMW_NORM_SPAN = 32 x 2048 = 65536 elements, and every span has ADAMW_NORM_THREADS = 32
// partials: partial[b0 + 32 * s + l] (l = 0..31) for span s of the tensor whose first partial is
// b0 (the table's column 8 counts partials here, 32 per span, the last span of a tensor padded).
// Partial l of a span holds the elements span_start + 256 * k + 8 * l + e, k = 0..255 the row and
// e = 0..7 the lane (elements past the tensor's end are left out), summed as
//   acc[e] = (...((x(0,e)^2 + x(1,e)^2) + x(2,e)^2) + ...) + x(255,e)^2     (rows in order)
//   partial = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
// with x = (double)(g * grad_scale): the product rounded in FP32 (it can overflow to Inf), the
// square and the sums in FP64 (squares of finite FP32 values cannot overflow FP64), each + and *
// one IEEE operation. A NaN partial is stored as the canonical 0x7ff8000000000000 (v1.1). The
// host adds the partials left to right in index order (srkern/adamw.py, grad_norm), so the sum
// is finite iff every element, multiplied by grad_scale in FP32, is finite (not Inf or NaN).
//
// GPU: one thread per partial, so the 32 threads of a span are one warp (b0 is a multiple of 32
// and so are the block size and the grid stride): at row k they read 32 consecutive groups of 8
// elements (1 KB of FP32, 512 B of BF16; 16-byte loads), each thread into its 8 accumulators,
// registers indexed by unrolled constants. CPU: one span per loop unit; partial l's accumulator e
// is acc[p % 256] for the span's element p (p % 256 = 8 l + e), so each row is one vectorised
// loop of 256 independent additions, rows in order.
#define ADAMW_NORM_LANES 8     // elements per group: FP64 accumulators per partial
#define ADAMW_NORM_THREADS 32  // partials per span (GPU: the threads of one warp)
#define ADAMW_NORM_CHUNK 2048  // elements per partial: ADAMW_NORM_ROWS rows of one group each
#define ADAMW_NORM_ROW (ADAMW_NORM_THREADS * ADAMW_NORM_LANES)   // 256 elements: one row of a span
#define ADAMW_NORM_ROWS (ADAMW_NORM_CHUNK / ADAMW_NORM_LANES)    // 256 rows per span
#define ADAMW_NORM_SPAN (ADAMW_NORM_THREADS * ADAMW_NORM_CHUNK)  // 65536 elements

// x^2 in FP64 of one element multiplied by grad_scale in FP32.
SRK_HD double adamw_sq(float g, float grad_scale) {
  double x = (double)(g * grad_scale);
  return x * x;
}

// The fixed tree over one partial's 8 accumulators, canonical NaN.
SRK_HD double adamw_tree8(const double* a) {
  return srk_canon_f64(((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])));
}

#ifdef SRK_GPU
// Partial b: one thread, rows k = 0..255 of its span, 8 register accumulators.
template <class G>
SRK_HD void adamw_sumsq_partial(const u64* table, i64 ntensors, float grad_scale, double* partial, i64 b) {
  AdamwRow row = adamw_row(table, adamw_find(table, ntensors, b));
  const u64 u = (u64)(b - row.b0);
  const i64 span0 = (i64)(u / ADAMW_NORM_THREADS) * ADAMW_NORM_SPAN;
  const i64 end = srk_min64(row.n, span0 + ADAMW_NORM_SPAN);  // a group never crosses a span end
  const G* g = (const G*)row.g;
  double acc[ADAMW_NORM_LANES];
  #pragma unroll
  for (int e = 0; e < ADAMW_NORM_LANES; ++e) acc[e] = 0.0;
  for (i64 j = span0 + (i64)(u % ADAMW_NORM_THREADS) * ADAMW_NORM_LANES; j < end; j += ADAMW_NORM_ROW) {
    float x[ADAMW_NORM_LANES];
    if (j + ADAMW_NORM_LANES <= end) {
      adamw_ld8(g + j, x);
    } else {  // the tensor's last group: a missing element adds +0, which leaves acc as it is
      #pragma unroll
      for (int e = 0; e < ADAMW_NORM_LANES; ++e) x[e] = j + e < end ? adamw_ld(g, j + e) : 0.0f;
    }
    #pragma unroll
    for (int e = 0; e < ADAMW_NORM_LANES; ++e) acc[e] += adamw_sq(x[e], grad_scale);
  }
  partial[b] = adamw_tree8(acc);
}

template <class G>
SRK_HD void adamw_sumsq_body(const u64* table, i64 ntensors, i64 nparts, float grad_scale, double* partial) {
  SRK_LOOP(b, nparts) { adamw_sumsq_partial<G>(table, ntensors, grad_scale, partial, b); }
}
#else
// Span sp (partials 32 sp .. 32 sp + 31): the 256 accumulators of its 32 partials, row by row.
template <class G>
static void adamw_sumsq_span(const u64* table, i64 ntensors, float grad_scale, double* partial, i64 sp) {
  const i64 b = sp * ADAMW_NORM_THREADS;
  AdamwRow row = adamw_row(table, adamw_find(table, ntensors, b));
  const i64 span0 = (b - row.b0) / ADAMW_NORM_THREADS * ADAMW_NORM_SPAN;
  const i64 len = srk_min64(ADAMW_NORM_SPAN, row.n - span0);
  const G* g = (const G*)row.g + span0;
  alignas(64) double acc[ADAMW_NORM_ROW];
  for (int p = 0; p < ADAMW_NORM_ROW; ++p) acc[p] = 0.0;
  const i64 full = len / ADAMW_NORM_ROW;
  for (i64 k = 0; k < full; ++k) {
    const G* r = g + k * ADAMW_NORM_ROW;
    #pragma omp simd
    for (int p = 0; p < ADAMW_NORM_ROW; ++p) acc[p] += adamw_sq(adamw_ld(r, p), grad_scale);
  }
  const int rest = (int)(len - full * ADAMW_NORM_ROW);  // the tensor's last, short row
  const G* r = g + full * ADAMW_NORM_ROW;
  for (int p = 0; p < rest; ++p) acc[p] += adamw_sq(adamw_ld(r, p), grad_scale);
  for (int l = 0; l < ADAMW_NORM_THREADS; ++l) partial[b + l] = adamw_tree8(acc + ADAMW_NORM_LANES * l);
}

template <class G>
static void adamw_sumsq_body(const u64* table, i64 ntensors, i64 nparts, float grad_scale, double* partial) {
  const i64 nspans = nparts / ADAMW_NORM_THREADS;
  // A single span (at most 64K elements) runs on the calling thread. Not SRK_LOOP: its `simd`
  // would vectorise across spans; the rows inside a span are what vectorises.
  SRK_PARALLEL(nspans > 1) SRK_PRAGMA(omp for schedule(dynamic, 1) nowait)
  for (i64 sp = 0; sp < nspans; ++sp) adamw_sumsq_span<G>(table, ntensors, grad_scale, partial, sp);
}
#endif

SRK_KERNEL void adamw_sumsq_gbf16(const u64* table, i64 ntensors, i64 nparts, float grad_scale, double* partial) {
  SRK_FP_GUARD;
  adamw_sumsq_body<u16>(table, ntensors, nparts, grad_scale, partial);
}
SRK_KERNEL void adamw_sumsq_gf32(const u64* table, i64 ntensors, i64 nparts, float grad_scale, double* partial) {
  SRK_FP_GUARD;
  adamw_sumsq_body<float>(table, ntensors, nparts, grad_scale, partial);
}
