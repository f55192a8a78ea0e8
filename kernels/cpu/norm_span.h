// cpu/norm_span.h: the CPU backends' body of the gradient norm (included by norm.cu on host builds).
//
// Must equal norm.cu's shared body, norm_partial, bit for bit for every partial: partial l of a
// span is accumulator group l here (acc[8 l + e] is its accumulator e), fed the same elements
// (the span's element p goes to acc[p % 256], p % 256 = 8 l + e) in the same row order, through
// the same norm_sq, and closed by the same norm_tree8. Checked against the NumPy oracle's model of
// the layout on every backend (tests/test_numerics.py, tests/test_norm.py).
//
// Why it is faster than 32 norm_partial calls: one span (32 partials) is one loop unit, and each
// row of it is one `omp simd` loop of 256 independent FP64 additions over 256 consecutive
// elements, where norm_partial's 8-element groups with a 256-element stride would give the
// vectoriser 8 lanes and a strided walk through memory.
#pragma once
#include "srk_platform.h"

// Span sp (partials 32 sp .. 32 sp + 31): the 256 accumulators of its 32 partials, row by row.
template <class G>
static void norm_span(const u64* table, i64 ntensors, float grad_scale, double* partial, i64 sp) {
  const i64 b = sp * NORM_THREADS;
  SrkRow row = srk_row(table, srk_row_find(table, ntensors, b));
  const i64 span0 = (b - row.b0) / NORM_THREADS * NORM_SPAN;
  const i64 len = srk_min64(NORM_SPAN, row.n - span0);
  const G* g = (const G*)row.g + span0;
  alignas(64) double acc[NORM_ROW];
  for (int p = 0; p < NORM_ROW; ++p) acc[p] = 0.0;
  const i64 full = len / NORM_ROW;
  for (i64 k = 0; k < full; ++k) {
    const G* r = g + k * NORM_ROW;
    #pragma omp simd
    for (int p = 0; p < NORM_ROW; ++p) acc[p] += norm_sq(srk_elem_f32(r[p]), grad_scale);
  }
  const int rest = (int)(len - full * NORM_ROW);  // the tensor's last, short row
  const G* r = g + full * NORM_ROW;
  for (int p = 0; p < rest; ++p) acc[p] += norm_sq(srk_elem_f32(r[p]), grad_scale);
  for (int l = 0; l < NORM_THREADS; ++l) partial[b + l] = norm_tree8(acc + NORM_LANES * l);
}

template <class G>
static void norm_sumsq_body(const u64* table, i64 ntensors, i64 nparts, float grad_scale, double* partial) {
  const i64 nspans = nparts / NORM_THREADS;
  // A single span (at most 64K elements) runs on the calling thread. Not SRK_LOOP: its `simd`
  // would vectorise across spans; the rows inside a span are what vectorises.
  SRK_PARALLEL(nspans > 1) SRK_PRAGMA(omp for schedule(dynamic, 1) nowait)
  for (i64 sp = 0; sp < nspans; ++sp) norm_span<G>(table, ntensors, grad_scale, partial, sp);
}
