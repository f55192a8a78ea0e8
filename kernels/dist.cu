// dist.cu: the local half of srkern's reduce-scatter. After the all-to-all, a rank holds `world`
// chunks of its shard, one from each rank, `stride` elements apart in rank order. These kernels
// sum them in FP32 in that fixed order (acc = c[0]; acc += c[1]; ...; then acc / div, with div 1
// for op="sum" and world for op="avg"), and write the shard once:
//   dist_reduce_<in>_bf16_sr  BF16 with stochastic rounding (contract v1),
//   dist_reduce_<in>_bf16_rn  BF16 round-to-nearest-even,
//   dist_reduce_<in>_f32      the FP32 result, unrounded,
// for <in> = f32 or bf16 wire chunks. Reading every chunk once and writing the shard once is the
// whole cost: the sum never goes through memory in between.
//
// Numeric contract: bit contract v1.1. Element p of the shard has logical index `offset + p`
// (its position in the full vector being reduced); its draw is lane index % 8 of Philox block
// index / 8 under (seed, step, stream). All ranks share the seed, so the result is a function of
// the inputs and (seed, step, stream) alone, never of which rank or thread computed it. The FP32
// sum is rounded once per addition in rank order and divided with correctly rounded division, so
// g++ (-ffp-contract=off) and NVRTC (--fmad=false --prec-div=true) agree bit for bit.
// Contract v1.1: a NaN sum is stored as the canonical NaN (FP32 0x7fc00000, BF16 0x7fc0) on
// every backend, and subnormal inputs and sums are never flushed (host builds run under
// SrkFpEnv, srk_platform.h, whatever FTZ/DAZ state the caller's threads carry).
//
// References: Random123 (Philox); Ozkara, Yu, Park, AISTATS 2025 (SR for BF16 training).
#include "srk_platform.h"
#include "srk_philox.h"
#include "srk_round.h"
#include "srk_blocks.h"

// ---- loading one wire element as FP32 ------------------------------------------------------------

SRK_HD float dist_to_f32(float x) { return x; }
SRK_HD float dist_to_f32(u16 x) { return srk_bf16_to_f32(x); }

// Sum of element p over the `world` chunks, in rank order, then divided by div.
// A NaN result is the canonical 0x7fc00000 (contract v1.1), so the BF16 shard holds 0x7fc0.
template <class In>
SRK_HD float dist_sum(const In* SRK_RESTRICT chunks, i64 stride, int world, float div, i64 p) {
  float acc = dist_to_f32(chunks[p]);
  for (int r = 1; r < world; ++r) acc = acc + dist_to_f32(chunks[(i64)r * stride + p]);
  return srk_canon_f32(acc / div);
}

// ---- BF16 output: whole Philox blocks of 8 logical indices are the unit of work ----------------

template <class In, bool SR>
SRK_HD void dist_bf16_block(const In* chunks, i64 stride, int world, float div, u16* out, i64 n,
                            u64 offset, u64 seed, u64 step, u32 stream, u64 q, bool full) {
  srk_u32x4 b = {{0u, 0u, 0u, 0u}};
  if (SR) b = srk_draw_block(seed, step, stream, q);
  if (full) {  // branch-free: all 8 lanes lie inside the shard
    i64 p0 = (i64)(q * 8 - offset);
    #pragma unroll
    for (int k = 0; k < 8; ++k) {
      float s = dist_sum<In>(chunks, stride, world, div, p0 + k);
      out[p0 + k] = SR ? srk_bf16_sr(s, srk_draw16(b, k), 0) : srk_bf16_rn(s, 0);
    }
    return;
  }
  for (int k = 0; k < 8; ++k) {
    i64 p = (i64)(q * 8 + (u64)k - offset);
    if (p < 0 || p >= n) continue;
    float s = dist_sum<In>(chunks, stride, world, div, p);
    out[p] = SR ? srk_bf16_sr(s, srk_draw16(b, k), 0) : srk_bf16_rn(s, 0);
  }
}

// Full blocks first, then the (at most two) partial blocks at either end of [offset, offset+n),
// exactly as in cast.cu, so a shard boundary inside a Philox block costs one extra call only.
template <class In, bool SR>
SRK_HD void dist_bf16_body(const In* SRK_RESTRICT chunks, i64 stride, int world, float div,
                           u16* SRK_RESTRICT out, i64 n, u64 offset, u64 seed, u64 step, u32 stream) {
  SrkBlocks bl = srk_split_blocks(offset, n, 8);
  SRK_LOOP(i, bl.nfull) {
    dist_bf16_block<In, SR>(chunks, stride, world, div, out, n, offset, seed, step, stream,
                            bl.q_full0 + (u64)i, true);
  }
  SRK_LOOP_TILES(i, bl.nedge) {  // at most two: on CPU the calling thread runs them
    dist_bf16_block<In, SR>(chunks, stride, world, div, out, n, offset, seed, step, stream,
                            bl.q_edge[i], false);
  }
}

// ---- kernels ---------------------------------------------------------------------------------------

#define SRK_DIST_BF16_KERNEL(name, In, SR)                                                           \
  SRK_KERNEL void name(const In* chunks, i64 stride, int world, float div, u16* out, i64 n,         \
                       u64 offset, u64 seed, u64 step, u32 stream) {                                 \
    SRK_FP_GUARD;                                                                                    \
    dist_bf16_body<In, SR>(chunks, stride, world, div, out, n, offset, seed, step, stream);          \
  }

SRK_DIST_BF16_KERNEL(dist_reduce_f32_bf16_sr, float, true)
SRK_DIST_BF16_KERNEL(dist_reduce_f32_bf16_rn, float, false)
SRK_DIST_BF16_KERNEL(dist_reduce_bf16_bf16_sr, u16, true)
SRK_DIST_BF16_KERNEL(dist_reduce_bf16_bf16_rn, u16, false)

// FP32 output: no rounding beyond the FP32 additions, so no draws and no blocks.
#define SRK_DIST_F32_KERNEL(name, In)                                                                \
  SRK_KERNEL void name(const In* chunks, i64 stride, int world, float div, float* out, i64 n) {     \
    SRK_FP_GUARD;                                                                                    \
    SRK_LOOP(p, n) { out[p] = dist_sum<In>(chunks, stride, world, div, p); }                         \
  }

SRK_DIST_F32_KERNEL(dist_reduce_f32_f32, float)
SRK_DIST_F32_KERNEL(dist_reduce_bf16_f32, u16)
