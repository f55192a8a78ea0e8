// cpu/adafactor_tile.h: the CPU backends' bodies of Adafactor's launches 3 and 4 (included by
// adafactor.cu on host builds).
//
// Must equal adafactor.cu's shared bodies, af_usq_unit and af_apply_block, bit for bit: every
// element goes through the same FP32 operations in the same order (vhat, the clamp, sqrtf, the
// reciprocal, the products; the weight side's SrkWeights::store) with the same draws, and each
// row's FP64 lane sums take the same elements in the same order (runs start at a multiple of 64
// from the row's start, so element k of a run is in lane k % 8 as in the shared body). Where 64
// elements of one row are left (a factored tensor's row holds columns c .. c + 63, or 64
// elements of an unfactored tensor), they run as one block of SIMD loops, with the square roots
// taken 8 at a time by vsqrtps (the same IEEE operation as sqrtf; g++ does not vectorise sqrtf
// while it may set errno) and the weight's Philox words of 8 blocks drawn at once
// (cpu/philox_tile.h); every other element goes through the shared body. Checked against the
// NumPy oracle on every backend, rows wider and narrower than 64 included (tests/test_adafactor.py).
// Why: the shared body computes one element at a time with scalar divisions and square roots
// and one scalar Philox block per 8 elements: 7-14 ns per element at 4M parameters on the 2-core
// Xeon, against torch's foreach Adafactor at ~4 (benchmarks/bench_adafactor.py).
#pragma once
#include "srk_platform.h"
#include "srk_launch.h"
#include "cpu/philox_tile.h"
#include "cpu/pair_chunks.h"

// u0 of the 64 elements j0 .. j0 + 63 of one row (factored: columns pos.c .. pos.c + 63 of row
// (pos.b, pos.r)) or of an unfactored tensor.
template <class G, class S>
inline void af_u0_run64(const SrkRow& row, const AfAux& a, const AfHyper& h, i64 j0, const AfPos& pos,
                        float* u0) {
  alignas(32) float v[64];
  const G* g = (const G*)row.g + j0;
  if (a.R == 0) {
    const S* vv = (const S*)row.m + j0;
    #pragma omp simd
    for (int k = 0; k < 64; ++k) {
      const float x = srk_elem_f32(vv[k]);
      v[k] = x < a.eps1sq ? a.eps1sq : x;
    }
  } else {
    const float rv = srk_elem_f32(((const S*)row.m)[pos.b * a.R + pos.r]);
    const float mean = a.vec[pos.b];
    const S* cv = (const S*)row.v + pos.b * a.C + pos.c;
    #pragma omp simd
    for (int k = 0; k < 64; ++k) {
      const float x = (rv * srk_elem_f32(cv[k])) / mean;
      v[k] = x < a.eps1sq ? a.eps1sq : x;
    }
  }
#if defined(__AVX__)
  for (int k = 0; k < 64; k += 8) _mm256_store_ps(v + k, _mm256_sqrt_ps(_mm256_load_ps(v + k)));
#else
  for (int k = 0; k < 64; ++k) v[k] = sqrtf(v[k]);
#endif
  #pragma omp simd
  for (int k = 0; k < 64; ++k) u0[k] = (1.0f / v[k]) * (srk_elem_f32(g[k]) * h.grad_scale);
}

// ---- launch 3 ---------------------------------------------------------------------------------------

template <class G, class S>
inline void af_usq_unit_cpu(const u64* table, const u64* aux, i64 ntensors, const AfHyper& h,
                            double* usq, i64 b) {
  const i64 t = srk_row_find(table, ntensors, b);
  const SrkRow row = srk_row(table, t);
  const AfAux a = af_aux(aux, t);
  i64 j0, j1;
  af_row_span(row, a, b - row.b0, &j0, &j1);
  double s[8];
  for (int e = 0; e < 8; ++e) s[e] = 0.0;
  AfPos pos = a.R == 0 ? AfPos() : af_pos(a, j0);
  alignas(64) float u0[64];
  i64 j = j0;
  for (; j + 64 <= j1; j += 64) {
    af_u0_run64<G, S>(row, a, h, j, pos, u0);
    for (int k = 0; k < 64; k += 8) {
      #pragma omp simd
      for (int e = 0; e < 8; ++e) s[e] += af_sq(u0[k + e]);
    }
    if (a.R != 0) pos.c += 64;  // (the run stays in the row: the row is the unit)
  }
  af_usq_lanes<G, S>(row, a, h, j, j1, pos, s);  // the row's tail, as the shared body
  usq[b] = af_tree8(s);
}

template <class G, class S>
static void af_usq_body(const u64* table, const u64* aux, i64 ntensors, i64 nunits, const AfHyper& h,
                        double* usq) {
  SRK_PARALLEL(nunits > 1) SRK_PRAGMA(omp for schedule(dynamic, 16) nowait)
  for (i64 b = 0; b < nunits; ++b) af_usq_unit_cpu<G, S>(table, aux, ntensors, h, usq, b);
}

// ---- launch 4 ---------------------------------------------------------------------------------------

// 64 elements = 8 full blocks from block q0, all in one row of a factored tensor or in an
// unfactored one.
template <int MODE, class P, class G, class S>
inline void af_apply_run64(const AfHyper& h, const SrkRow& row, const AfAux& a, u64 q0) {
  typedef SrkWeights<MODE, P> W;
  typedef typename W::X X;
  const i64 j0 = (i64)(q0 * 8 - row.off);
  alignas(64) float u[64];
  af_u0_run64<G, S>(row, a, h, j0, a.R == 0 ? AfPos() : af_pos(a, j0), u);
  alignas(64) u32 wx[32];
  if (W::X_SR) srk_draw_tile<8>(h.seed, h.step, W::X_STREAM, q0, wx);  // (no FP16 weights here)
  // The 16-bit draw of element 8 * q0 + k is halfword k of the tile, read as srk_draw16_t (which
  // may alias the words: with a plain u16 pointer g++ moved the portable tile's stores after the
  // reads, and cpu-portable drew other bits).
  const srk_draw16_t* rx = (const srk_draw16_t*)wx;
  X* xs = W::xbuf(row) + j0;
  u16* ys = W::Y_WRITE ? W::ybuf(row) + j0 : (u16*)0;
  #pragma omp simd
  for (int k = 0; k < 64; ++k) {
    u16 y = W::Y_READ ? ys[k] : (u16)0;
    W::store(h, a.scale * u[k], srk_elem_f32(xs[k]), srk_bf16_to_f32(y), W::X_SR ? (u32)rx[k] : 0u, xs + k, &y);
    if (W::Y_WRITE) ys[k] = y;
  }
}

// Local blocks [lb0, lb1) of one tensor: runs where 8 full blocks of one row are left, the shared
// body for every other block.
template <int MODE, class P, class G, class S>
static void af_apply_range(const AfHyper& h, const SrkRow& row, const AfAux& a, i64 lb0, i64 lb1) {
  const u64 q1 = row.off / 8 + (u64)lb1;
  for (u64 q = row.off / 8 + (u64)lb0; q < q1;) {
    const i64 j = (i64)(q * 8 - row.off);
    if (j >= 0 && j + 64 <= row.n && q + 8 <= q1 && (a.R == 0 || j % a.C + 64 <= a.C)) {
      af_apply_run64<MODE, P, G, S>(h, row, a, q);
      q += 8;
    } else {
      af_apply_block<MODE, P, G, S>(h, row, a, q);
      q += 1;
    }
  }
}

// Pairs in chunks (cpu/pair_chunks.h): which thread takes a chunk never changes a bit.
template <int MODE, class P, class G, class S>
static void af_apply_body(const u64* table, const u64* aux, i64 ntensors, i64 npairs, const AfHyper& h) {
  srk_cpu_pair_chunks(table, ntensors, npairs, [&](const SrkRow& row, i64 t, i64 lb0, i64 lb1) {
    af_apply_range<MODE, P, G, S>(h, row, af_aux(aux, t), lb0, lb1);
  });
}
