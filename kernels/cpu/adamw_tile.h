// cpu/adamw_tile.h: the CPU backends' AdamW body (included by adamw.cu on host builds).
//
// Must equal adamw.cu's shared body, adamw_block, bit for bit for every (tensor, block) pair:
// each element goes through the same per-lane functions (AdamwMode::moments and ::weights, so
// the same FP32 operations in the same order, the same stored forms) with the same draws (the
// streams AdamwMode lists; cpu/philox_tile.h gives srk_draw_block's words), and every block
// outside a 64-element run is adamw_block itself. Checked against the NumPy oracle on every
// backend, run boundaries included (tests/test_adamw.py::test_cpu_runs_and_shared_blocks).
//
// Why it is faster than one adamw_block per block: runs of 8 full blocks (64 elements) draw the
// Philox words of each stream for all 8 blocks at once with srk_draw_tile (one SIMD lane per
// block) and update the 64 elements in `omp simd` loops, with the square roots taken 8 at a time
// by vsqrtps (the same IEEE operation as sqrtf; g++ will not vectorise sqrtf itself while it may
// set errno). Measured on a 2-core EPYC (Zen 3), CPU time per element and thread, bf16-sr with
// BF16 moments: ~2.3 ns, of which ~1 ns is the three Philox streams (16 vector ops per round per
// 8 blocks, near the core's issue width) and ~0.3 ns the correctly rounded sqrt and division;
// the step is compute-bound on such a CPU. On a 2-core AVX-512 Xeon (one thread, thread CPU
// time, kernel only, 64K elements in L2 / 16M out of it): ~0.9-1.2 ns for bf16-nearest (no
// Philox; the correctly rounded vdivps and vsqrtps alone take ~1.4 cycles per element), bf16-sr
// 2.5 / 2.6-3.0 ns with the AVX2 tiles and 1.8 / 1.8-2.1 ns with the AVX-512 ones drawn three
// streams at once (srk_draw_tiles<8, 3>). What bf16-sr adds to bf16-nearest is the Philox of
// its three streams and nothing more, in L2 as out of it (so no memory stall): with AVX2 it was
// 3/8 of a block per element at ~5-6 ns per block, because an 8-block tile keeps only two ymm
// vectors in flight (latency-bound; 32-block tiles take 4.8 ns); with AVX-512 it is three zmm
// vectors per call at ~2 ns per block.
//
// fp16-sr runs the same tiles: its weight's 32-bit draws are the words of the 16 Philox blocks
// 2 q0 .. 2 q0 + 15 (one srk_draw_tile<16>: word k is the draw of element 8 q0 + k), and the FP16
// weight goes through the shared per-lane functions, so SrkF16's decode and encode (64-bit,
// branching code that g++ leaves scalar; no SIMD FP16 path here, correctness first). Measured
// on a 2-core Xeon VM, one thread, 2^22 elements, FP16 gradients, FP32 moments: ~10.5 ns per
// element, against ~1.7 ns for bf16-sr with BF16 gradients. Swapping in cpu/round_small.h's
// 32-bit encoder alone gained nothing (the FP16 decodes keep the loops scalar as well): an F16C
// decode plus that encoder is the next step, if the CPU fp16-sr step ever matters.
#pragma once
#include "srk_platform.h"
#include "srk_launch.h"
#include "cpu/philox_tile.h"
#include "cpu/pair_chunks.h"

// 64 elements = 8 full blocks starting at block q0, element j0 = q0 * 8 - off of the tensor.
template <int MODE, class P, class G, class S>
SRK_HD void adamw_run64(const AdamwHyper& h, const SrkRow& row, u64 q0) {
  typedef AdamwMode<MODE, P, S> M;
  typedef typename M::X X;
  // wx: X_STREAM's words (64 for X_DRAW32, else 32), then EXP_AVG's and EXP_AVG_SQ's (32 each).
  // Where all three are 8-block tiles of block q0 they are drawn in one srk_draw_tiles call: on
  // AVX-512 that runs their three vectors interleaved (one 8-block vector alone waits on its
  // multiply latency).
  alignas(64) u32 wx[64 + 64];
  u32* const wm = wx + (M::X_DRAW32 ? 64 : 32);
  u32* const wv = wm + 32;
  const u32 streams[3] = {(u32)M::X_STREAM, SRK_STREAM_EXP_AVG, SRK_STREAM_EXP_AVG_SQ};
  if (M::X_SR && M::MV_SR && !M::X_DRAW32) {
    srk_draw_tiles<8, 3>(h.seed, h.step, streams, q0, wx);
  } else {
    if (M::X_SR) {
      if (M::X_DRAW32) srk_draw_tile<16>(h.seed, h.step, M::X_STREAM, 2 * q0, wx);
      else srk_draw_tile<8>(h.seed, h.step, M::X_STREAM, q0, wx);
    }
    if (M::MV_SR) srk_draw_tiles<8, 2>(h.seed, h.step, streams + 1, q0, wm);
  }
  // The 16-bit draw of element 8 * q0 + k is halfword k of a tile (little-endian words; read as
  // srk_draw16_t, which may alias them); its 32-bit draw (X_DRAW32) is word k of wx.
  const srk_draw16_t* rx = (const srk_draw16_t*)wx;
  const srk_draw16_t* rm = (const srk_draw16_t*)wm;
  const srk_draw16_t* rv = (const srk_draw16_t*)wv;
  const i64 j0 = (i64)(q0 * 8 - row.off);
  alignas(32) float m[64], v[64];
  // Only the draws of listed streams are read (the conditions are compile-time constants).
  #pragma omp simd
  for (int k = 0; k < 64; ++k) {
    const i64 j = j0 + k;
    S* ms = (S*)row.m + j;
    S* vs = (S*)row.v + j;
    m[k] = srk_elem_f32(*ms);
    v[k] = srk_elem_f32(*vs);
    M::moments(h, srk_elem_f32(((const G*)row.g)[j]), &m[k], &v[k], ms, vs, M::MV_SR ? rm[k] : 0u,
               M::MV_SR ? rv[k] : 0u);
  }
#if defined(__AVX__)
  for (int k = 0; k < 64; k += 8) _mm256_store_ps(v + k, _mm256_sqrt_ps(_mm256_load_ps(v + k)));
#else
  for (int k = 0; k < 64; ++k) v[k] = sqrtf(v[k]);
#endif
  #pragma omp simd
  for (int k = 0; k < 64; ++k) {
    const i64 j = j0 + k;
    X* xs = M::xbuf(row) + j;
    u16 ys = 0;
    M::weights(h, m[k], v[k], srk_elem_f32(*xs), M::Y_READ ? srk_bf16_to_f32(M::ybuf(row)[j]) : 0.0f,
               M::X_SR ? (M::X_DRAW32 ? wx[k] : (u32)rx[k]) : 0u, xs, &ys);
    if (M::Y_WRITE) M::ybuf(row)[j] = ys;
  }
}

// One block outside a run (tensor edges, chunk ends, tensors under 64 elements): the shared body
// itself, out of line so that its two instantiations do not sit in the loop around the runs.
template <int MODE, class P, class G, class S>
__attribute__((noinline)) static void adamw_cpu_block(const AdamwHyper& h, const SrkRow& row, u64 q) {
  const i64 j = (i64)(q * 8 - row.off);
  if (j >= 0 && j + 8 <= row.n) adamw_block<MODE, P, G, S, true>(h, row, q);
  else adamw_block<MODE, P, G, S, false>(h, row, q);
}

// Local blocks [lb0, lb1) of one tensor: 64-element runs where 8 full blocks are left in the
// range, the shared body for every other block.
template <int MODE, class P, class G, class S>
static void adamw_cpu_range(const AdamwHyper& h, const SrkRow& row, i64 lb0, i64 lb1) {
  const u64 q1 = row.off / 8 + (u64)lb1;
  for (u64 q = row.off / 8 + (u64)lb0; q < q1;) {
    const i64 j = (i64)(q * 8 - row.off);  // the element at lane 0, in [-7, n), as in adamw_block
    if (j >= 0 && j + 64 <= row.n && q + 8 <= q1) {
      adamw_run64<MODE, P, G, S>(h, row, q);
      q += 8;
    } else {
      adamw_cpu_block<MODE, P, G, S>(h, row, q);
      q += 1;
    }
  }
}

// Pairs in chunks (cpu/pair_chunks.h): which thread takes a chunk never changes a bit.
template <int MODE, class P, class G, class S>
static void adamw_body(const u64* table, i64 ntensors, i64 npairs, const AdamwHyper& h) {
  srk_cpu_pair_chunks(table, ntensors, npairs, [&](const SrkRow& row, i64, i64 lb0, i64 lb1) {
    adamw_cpu_range<MODE, P, G, S>(h, row, lb0, lb1);
  });
}
