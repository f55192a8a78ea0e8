// srk_opt1.h: the body of the single-state optimizers (sgd.cu: the momentum buffer, or none
// without momentum; lion.cu: exp_avg) over the modes of srk_modes.h, and its GPU and CPU
// dispatch. One (tensor, Philox block) pair of 8 lanes, as adamw.cu's adamw_block runs AdamW:
// the optimizer file supplies only the per-lane state math (OPT::lane).
#pragma once
#include "srk_platform.h"
#include "srk_modes.h"

// OPT describes one optimizer in one mode: typedefs W (SrkWeights<MODE, P>), G (gradient type),
// S (state type, in the table's m column), H (hyper-parameters: FP32 decay and lrwd for the
// weight side, u64 seed and step); enumerators HAS_STATE (the m column is read and written) and
// S_SR (the state is written with SR from stream EXP_AVG: BF16 states where W::X_SR); and
//   static float lane(const H& h, float g, float x, float* m)
// returning the step u of one element from its raw gradient g and weight x (X's value: the
// master weight in fp32-master), with *m the FP32 state in and out (unused without HAS_STATE).
// The state is stored as the rounding of the FP32 value lane() leaves; the weight goes through
// W::store. 16-byte accesses for a full block, lane by lane at tensor ends, as adamw_block.

// The 8 lanes of block q with its draws given: dx the weight side's X_STREAM words (dx[1] only
// where X_DRAW32), dm the state's EXP_AVG words (read only where S_SR).
template <class OPT, bool FULL>
SRK_HD void srk_opt1_lanes(const typename OPT::H& h, const SrkRow& row, u64 q, const srk_u32x4* dx,
                           const srk_u32x4& dm) {
  typedef typename OPT::W W;
  typedef typename W::X X;
  typedef typename OPT::G G;
  typedef typename OPT::S S;
  // The tensor element at lane 0, in [-7, n): exact modulo 2^64 (see adamw_block).
  const i64 j = (i64)(q * 8 - row.off), n = row.n;
  X* xb = W::xbuf(row);
  G g[8];
  S m[8];
  X x[8];
  u16 y[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  srk_get_block<FULL>((const G*)row.g, j, n, g);
  if constexpr (OPT::HAS_STATE) srk_get_block<FULL>((const S*)row.m, j, n, m);
  srk_get_block<FULL>((const X*)xb, j, n, x);
  if (W::Y_READ) srk_get_block<FULL>((const u16*)W::ybuf(row), j, n, y);
  #pragma unroll
  for (int k = 0; k < 8; ++k) {
    float mk = 0.0f;
    if constexpr (OPT::HAS_STATE) mk = srk_elem_f32(m[k]);
    float u = OPT::lane(h, srk_elem_f32(g[k]), srk_elem_f32(x[k]), &mk);
    if constexpr (OPT::HAS_STATE) srk_store(mk, srk_draw16(dm, k), OPT::S_SR, &m[k]);
    W::store(h, u, srk_elem_f32(x[k]), srk_bf16_to_f32(y[k]), W::xdraw(dx, k), &x[k], &y[k]);
  }
  if constexpr (OPT::HAS_STATE) srk_put_block<FULL>((S*)row.m, j, n, m);
  srk_put_block<FULL>(xb, j, n, x);
  if (W::Y_WRITE) srk_put_block<FULL>(W::ybuf(row), j, n, y);
}

// One pair, drawing its own Philox blocks (the streams SrkWeights and S_SR list, no other):
// the full-block body where all 8 lanes are in the tensor, else the lane-masked one.
template <class OPT>
SRK_HD void srk_opt1_pair(const typename OPT::H& h, const SrkRow& row, u64 q) {
  typedef typename OPT::W W;
  const srk_u32x4 none = {{0u, 0u, 0u, 0u}};
  srk_u32x4 dx[2] = {none, none};
  if (W::X_SR) W::xdraws(h, q, dx);
  const srk_u32x4 dm = OPT::S_SR ? srk_draw_block(h.seed, h.step, SRK_STREAM_EXP_AVG, q) : none;
  const i64 j = (i64)(q * 8 - row.off);
  if (j >= 0 && j + 8 <= row.n) srk_opt1_lanes<OPT, true>(h, row, q, dx, dm);
  else srk_opt1_lanes<OPT, false>(h, row, q, dx, dm);
}

#ifdef SRK_GPU
// GPU: one thread per (tensor, block) pair, its tensor found by binary search of the table.
template <class OPT>
SRK_HD void srk_opt1_body(const u64* table, i64 ntensors, i64 npairs, const typename OPT::H& h) {
  SRK_LOOP(b, npairs) {
    SrkRow row = srk_row(table, srk_row_find(table, ntensors, b));
    srk_opt1_pair<OPT>(h, row, row.off / 8 + (u64)(b - row.b0));
  }
}
#else
#include "cpu/philox_tile.h"
#include "cpu/pair_chunks.h"

// CPU: runs of 8 full blocks (64 elements) from block q0. Their Philox words are drawn at once by
// srk_draw_tile(s) (cpu/philox_tile.h: bit for bit srk_draw_block's words, one SIMD lane per
// block), and the 64 elements go through the same per-element functions as srk_opt1_lanes
// (OPT::lane, srk_store, W::store: the same FP32 operations in the same order, the same stored
// forms) in one `omp simd` loop, as cpu/adamw_tile.h runs AdamW; element k of the run draws
// halfword k of a stream's tile, which is srk_draw16 of its block's words for lane k % 8. Modes
// that draw nothing (bf16-nearest, fp32-master, fp32) take the same loop with no tile; 32-bit
// weight draws (fp16-sr, not offered by sgd.cu / lion.cu) take srk_opt1_pair per block.
template <class OPT>
static void srk_opt1_run8(const typename OPT::H& h, const SrkRow& row, u64 q0) {
  typedef typename OPT::W W;
  typedef typename W::X X;
  typedef typename OPT::G G;
  typedef typename OPT::S S;
  if constexpr (W::X_DRAW32) {
    for (int b = 0; b < 8; ++b) srk_opt1_pair<OPT>(h, row, q0 + (u64)b);
  } else {
    // w: X_STREAM's 8 blocks, then (where S_SR) EXP_AVG's, 32 words each; only words a tile
    // wrote are read (the conditions are compile-time constants).
    alignas(64) u32 w[64];
    const u32 streams[2] = {(u32)W::X_STREAM, SRK_STREAM_EXP_AVG};
    if constexpr (OPT::S_SR) srk_draw_tiles<8, 2>(h.seed, h.step, streams, q0, w);
    else if constexpr (W::X_SR) srk_draw_tile<8>(h.seed, h.step, streams[0], q0, w);
    const srk_draw16_t* rx = (const srk_draw16_t*)w;
    const srk_draw16_t* rm = (const srk_draw16_t*)(w + 32);
    const i64 j0 = (i64)(q0 * 8 - row.off);
    const G* gs = (const G*)row.g + j0;
    X* xs = W::xbuf(row) + j0;
    #pragma omp simd
    for (int k = 0; k < 64; ++k) {
      const float x = srk_elem_f32(xs[k]);
      float m = 0.0f;
      if constexpr (OPT::HAS_STATE) m = srk_elem_f32(((S*)row.m)[j0 + k]);
      const float u = OPT::lane(h, srk_elem_f32(gs[k]), x, &m);
      if constexpr (OPT::HAS_STATE) srk_store(m, OPT::S_SR ? (u32)rm[k] : 0u, OPT::S_SR, (S*)row.m + j0 + k);
      u16 y = 0;
      W::store(h, u, x, W::Y_READ ? srk_bf16_to_f32(W::ybuf(row)[j0 + k]) : 0.0f, W::X_SR ? (u32)rx[k] : 0u,
               xs + k, &y);
      if (W::Y_WRITE) W::ybuf(row)[j0 + k] = y;
    }
  }
}

// Pairs in chunks (cpu/pair_chunks.h, as AdamW's); each thread walks its chunk's tensors in
// order: runs of 8 full
// blocks inside the chunk through srk_opt1_run8, every other block through srk_opt1_pair.
// Which thread takes a chunk, and where runs start, never changes a bit.
template <class OPT>
static void srk_opt1_body(const u64* table, i64 ntensors, i64 npairs, const typename OPT::H& h) {
  srk_cpu_pair_chunks(table, ntensors, npairs, [&](const SrkRow& row, i64, i64 lb0, i64 lb1) {
    for (i64 lb = lb0; lb < lb1;) {
      const u64 q = row.off / 8 + (u64)lb;
      const i64 j = (i64)(q * 8 - row.off);  // the element at lane 0, in [-7, n)
      if (j >= 0 && j + 64 <= row.n && lb + 8 <= lb1) {
        srk_opt1_run8<OPT>(h, row, q);
        lb += 8;
      } else {
        srk_opt1_pair<OPT>(h, row, q);
        lb += 1;
      }
    }
  });
}
#endif
