// norm.cu: the squared L2 norm of a list of gradients, as FP64 partial sums in a fixed order
// (srkern.grad_norm adds them on the host and takes the square root; used for clipping).
//
// The partial sums, each a pure function of element indices (so the result does not depend on
// thread count, launch shape or backend). A table (one row per tensor, srk_table.h; only its
// gradient pointer, size and first-unit columns are used, the unit being one partial) lists the
// tensors. Each tensor is cut, from its element 0, into spans of NORM_SPAN = NORM_THREADS x
// NORM_CHUNK = 32 x 2048 = 65536 elements, and every span has NORM_THREADS = 32 partials:
// partial[b0 + 32 * s + l] (l = 0..31) for span s of the tensor whose first partial is b0 (the
// last span of a tensor is padded). Partial l of a span holds the elements
// span_start + 256 * k + 8 * l + e, k = 0..255 the row and e = 0..7 the lane (elements past the
// tensor's end are left out), summed as
//   acc[e] = (...((x(0,e)^2 + x(1,e)^2) + x(2,e)^2) + ...) + x(255,e)^2     (rows in order)
//   partial = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
// with x = (double)(g * grad_scale): the product rounded in FP32 (it can overflow to Inf), the
// square and the sums in FP64 (squares of finite FP32 values cannot overflow FP64), each + and *
// one IEEE operation. A NaN partial is stored as the canonical 0x7ff8000000000000 (v1.1). The
// host adds the partials left to right in index order (srkern/norm.py, grad_norm), so the sum
// is finite iff every element, multiplied by grad_scale in FP32, is finite (not Inf or NaN).
//
// One body: norm_partial computes one partial. The GPU runs it in one thread per partial, so the
// 32 threads of a span are one warp (b0 is a multiple of 32 and so are the block size and the
// grid stride): at row k they read 32 consecutive groups of 8 elements (1 KB of FP32, 512 B of
// BF16; 16-byte loads), each thread into its 8 accumulators, registers indexed by unrolled
// constants. The CPU backends run kernels/cpu/norm_span.h: all 32 partials of a span at once,
// the same additions in the same order.
//
// References: llm.c's llmc/global_norm.cuh (a norm kernel apart from the optimizer).
#include "srk_platform.h"
#include "srk_table.h"

// The layout's numbers (srkern/norm.py reads them from here).
#define NORM_LANES 8     // elements per group: FP64 accumulators per partial
#define NORM_THREADS 32  // partials per span (GPU: the threads of one warp)
#define NORM_CHUNK 2048  // elements per partial: NORM_ROWS rows of one group each
#define NORM_ROW (NORM_THREADS * NORM_LANES)   // 256 elements: one row of a span
#define NORM_ROWS (NORM_CHUNK / NORM_LANES)    // 256 rows per span
#define NORM_SPAN (NORM_THREADS * NORM_CHUNK)  // 65536 elements

// x^2 in FP64 of one element multiplied by grad_scale in FP32.
SRK_HD double norm_sq(float g, float grad_scale) {
  double x = (double)(g * grad_scale);
  return x * x;
}

// The fixed tree over one partial's 8 accumulators, canonical NaN.
SRK_HD double norm_tree8(const double* a) {
  return srk_canon_f64(((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])));
}

// Partial b: rows k = 0..255 of its span, 8 accumulators.
template <class G>
SRK_HD void norm_partial(const u64* table, i64 ntensors, float grad_scale, double* partial, i64 b) {
  SrkRow row = srk_row(table, srk_row_find(table, ntensors, b));
  const u64 u = (u64)(b - row.b0);
  const i64 span0 = (i64)(u / NORM_THREADS) * NORM_SPAN;
  const i64 end = srk_min64(row.n, span0 + NORM_SPAN);  // a group never crosses a span end
  const G* g = (const G*)row.g;
  double acc[NORM_LANES];
  #pragma unroll
  for (int e = 0; e < NORM_LANES; ++e) acc[e] = 0.0;
  for (i64 j = span0 + (i64)(u % NORM_THREADS) * NORM_LANES; j < end; j += NORM_ROW) {
    G x[NORM_LANES];
    // The tensor's last group may be short: a missing element reads 0 and adds +0, which leaves
    // acc as it is.
    if (j + NORM_LANES <= end) srk_get8(g + j, x); else srk_get_lanes(g, j, end, x);
    #pragma unroll
    for (int e = 0; e < NORM_LANES; ++e) acc[e] += norm_sq(srk_elem_f32(x[e]), grad_scale);
  }
  partial[b] = norm_tree8(acc);
}

#ifdef SRK_GPU
template <class G>
SRK_HD void norm_sumsq_body(const u64* table, i64 ntensors, i64 nparts, float grad_scale, double* partial) {
  SRK_LOOP(b, nparts) { norm_partial<G>(table, ntensors, grad_scale, partial, b); }
}
#else
#include "cpu/norm_span.h"
#endif

// ---- kernels: norm_sumsq_g<grad> ----------------------------------------------------------------

SRK_KERNEL void norm_sumsq_gbf16(const u64* table, i64 ntensors, i64 nparts, float grad_scale, double* partial) {
  SRK_FP_GUARD;
  norm_sumsq_body<u16>(table, ntensors, nparts, grad_scale, partial);
}
SRK_KERNEL void norm_sumsq_gf32(const u64* table, i64 ntensors, i64 nparts, float grad_scale, double* partial) {
  SRK_FP_GUARD;
  norm_sumsq_body<float>(table, ntensors, nparts, grad_scale, partial);
}
