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
#include "srk_vec.h"

// ---- loading wire elements as FP32 --------------------------------------------------------------

SRK_HD float dist_to_f32(float x) { return x; }
SRK_HD float dist_to_f32(u16 x) { return srk_bf16_to_f32(x); }

// Sum of element p over the `world` chunks, in rank order, then divided by div.
// A NaN result is the canonical 0x7fc00000 (contract v1.1), so the BF16 shard holds 0x7fc0.
// The per-element path: partial Philox blocks and the last elements of an FP32 shard.
template <class In>
SRK_HD float dist_sum(const In* SRK_RESTRICT chunks, i64 stride, int world, float div, i64 p) {
  float acc = dist_to_f32(chunks[p]);
  for (int r = 1; r < world; ++r) acc = acc + dist_to_f32(chunks[(i64)r * stride + p]);
  return srk_canon_f32(acc / div);
}

// GPU: the sums of elements p0 .. p0 + N - 1, each exactly as dist_sum forms it (the same
// additions in the same rank order, the same division), each chunk's elements read 16 bytes at
// a time (8 BF16 or 4 FP32 per load) where the address allows (srk_vec.h; element accesses on a
// misaligned view or a short last shard, same bits). A pointer that steps by `stride` keeps the
// loop's index math to one 64-bit add per rank; it is advanced only to chunks that exist.
template <class In, int N>
SRK_HD void dist_load(const In* c, float* x) {
  const int V = 16 / (int)sizeof(In);
  static_assert(N % V == 0, "whole 16-byte loads");
  #pragma unroll
  for (int h = 0; h < N; h += V) {
    const SrkPacked<In, V> t = srk_load<V>(c + h);
    #pragma unroll
    for (int k = 0; k < V; ++k) x[h + k] = dist_to_f32(t[k]);
  }
}

template <class In, int N>
SRK_HD void dist_sum_n(const In* SRK_RESTRICT chunks, i64 stride, int world, float div, i64 p0,
                       float* s) {
  const In* c = chunks + p0;
  dist_load<In, N>(c, s);
  for (int r = 1; r < world; ++r) {
    c += stride;
    float t[N];
    dist_load<In, N>(c, t);
    #pragma unroll
    for (int k = 0; k < N; ++k) s[k] = s[k] + t[k];
  }
  #pragma unroll
  for (int k = 0; k < N; ++k) s[k] = srk_canon_f32(s[k] / div);
}

// ---- BF16 output: whole Philox blocks of 8 logical indices are the unit of work ----------------

// A block whose 8 lanes all lie inside the shard: branch-free. GPU: 16-byte loads and one
// 16-byte store where aligned, the draw made after the sums, so that the Philox state is not
// live across the rank loop (registers: srk_launch.h, SRK_REDUCE_MIN_BLOCKS; tests/test_sass.py).
template <class In, bool SR>
SRK_HD void dist_bf16_full(const In* SRK_RESTRICT chunks, i64 stride, int world, float div,
                           u16* SRK_RESTRICT out, u64 offset, u64 seed, u64 step, u32 stream, u64 q) {
  const i64 p0 = (i64)(q * 8 - offset);
#ifdef SRK_GPU
  float s[8];
  dist_sum_n<In, 8>(chunks, stride, world, div, p0, s);
  SrkPacked<u16, 8> o;
  if (SR) {
    const srk_u32x4 b = srk_draw_block(seed, step, stream, q);
    #pragma unroll
    for (int k = 0; k < 8; ++k) o[k] = srk_bf16_sr(s[k], srk_draw16(b, k), 0);
  } else {
    #pragma unroll
    for (int k = 0; k < 8; ++k) o[k] = srk_bf16_rn(s[k], 0);
  }
  srk_store<8>(out + p0, o);
#else
  // Host builds: lane by lane, each sum stored as it is made, which g++ vectorises across the
  // blocks of the loop (the cpu backend's f32 -> bf16_rn reduce took 1.3-1.7x the time through
  // dist_sum_n). Same additions in the same order: the same bits.
  srk_u32x4 b = {{0u, 0u, 0u, 0u}};
  if (SR) b = srk_draw_block(seed, step, stream, q);
  #pragma unroll
  for (int k = 0; k < 8; ++k) {
    float s = dist_sum<In>(chunks, stride, world, div, p0 + k);
    out[p0 + k] = SR ? srk_bf16_sr(s, srk_draw16(b, k), 0) : srk_bf16_rn(s, 0);
  }
#endif
}

// A block that the shard [offset, offset + n) covers only in part: lane by lane.
template <class In, bool SR>
SRK_HD void dist_bf16_partial(const In* chunks, i64 stride, int world, float div, u16* out, i64 n,
                              u64 offset, u64 seed, u64 step, u32 stream, u64 q) {
  srk_u32x4 b = {{0u, 0u, 0u, 0u}};
  if (SR) b = srk_draw_block(seed, step, stream, q);
  for (int k = 0; k < 8; ++k) {
    i64 p = (i64)(q * 8 + (u64)k - offset);
    if (p < 0 || p >= n) continue;
    float s = dist_sum<In>(chunks, stride, world, div, p);
    out[p] = SR ? srk_bf16_sr(s, srk_draw16(b, k), 0) : srk_bf16_rn(s, 0);
  }
}

// Full blocks first, then the (at most two) partial blocks at either end of [offset, offset+n),
// exactly as in cast.cu, so a shard boundary inside a Philox block costs one extra call only.
// The edge block is picked with a select, not q_edge[i]: a run-time index into the struct is a
// local-memory load on a GPU (sm_90 stack 80 -> 40 bytes; the other 40 are srk_split_blocks').
template <class In, bool SR>
SRK_HD void dist_bf16_body(const In* SRK_RESTRICT chunks, i64 stride, int world, float div,
                           u16* SRK_RESTRICT out, i64 n, u64 offset, u64 seed, u64 step, u32 stream) {
  const SrkBlocks bl = srk_split_blocks(offset, n, 8);
  SRK_LOOP(i, bl.nfull) {
    dist_bf16_full<In, SR>(chunks, stride, world, div, out, offset, seed, step, stream,
                           bl.q_full0 + (u64)i);
  }
  SRK_LOOP_TILES(i, bl.nedge) {  // at most two: on CPU the calling thread runs them
    dist_bf16_partial<In, SR>(chunks, stride, world, div, out, n, offset, seed, step, stream,
                              i == 0 ? bl.q_edge[0] : bl.q_edge[1]);
  }
}

// ---- FP32 output: no rounding beyond the FP32 additions, so no draws and no blocks ---------------

// Groups of 16 bytes of input from the shard's start (4 FP32 or 8 BF16 elements: one 16-byte
// load per chunk and one or two 16-byte stores where aligned), then the last n % 4 (n % 8)
// elements one by one. The grid covers ceil(n / 4) (ceil(n / 8)) units (srkern/_collective.py).
template <class In>
SRK_HD void dist_f32_body(const In* SRK_RESTRICT chunks, i64 stride, int world, float div,
                          float* SRK_RESTRICT out, i64 n) {
#ifndef SRK_GPU
  // Host builds: one element per SIMD lane, stride-1 loads across p, as g++ vectorises best (the
  // cpu backend's f32 -> f32 reduce took 1.1-1.5x the time in the GPU's 16-byte groups).
  SRK_LOOP(p, n) { out[p] = dist_sum<In>(chunks, stride, world, div, p); }
#else
  const int N = 16 / (int)sizeof(In);
  SRK_LOOP(i, n / N) {
    float s[N];
    dist_sum_n<In, N>(chunks, stride, world, div, N * i, s);
    #pragma unroll
    for (int h = 0; h < N; h += 4) {
      SrkPacked<float, 4> o;
      #pragma unroll
      for (int k = 0; k < 4; ++k) o[k] = s[h + k];
      srk_store<4>(out + N * i + h, o);
    }
  }
  SRK_LOOP_TILES(k, n % N) {  // at most 7 elements
    const i64 p = n - n % N + k;
    out[p] = dist_sum<In>(chunks, stride, world, div, p);
  }
#endif
}

// ---- kernels ---------------------------------------------------------------------------------------

#define SRK_DIST_BF16_KERNEL(name, In, SR)                                                           \
  SRK_KERNEL void SRK_GPU_BOUNDS(SRK_REDUCE_MIN_BLOCKS)                                              \
  name(const In* chunks, i64 stride, int world, float div, u16* out, i64 n, u64 offset, u64 seed,    \
       u64 step, u32 stream) {                                                                       \
    SRK_FP_GUARD;                                                                                    \
    dist_bf16_body<In, SR>(chunks, stride, world, div, out, n, offset, seed, step, stream);          \
  }

SRK_DIST_BF16_KERNEL(dist_reduce_f32_bf16_sr, float, true)
SRK_DIST_BF16_KERNEL(dist_reduce_f32_bf16_rn, float, false)
SRK_DIST_BF16_KERNEL(dist_reduce_bf16_bf16_sr, u16, true)
SRK_DIST_BF16_KERNEL(dist_reduce_bf16_bf16_rn, u16, false)

#define SRK_DIST_F32_KERNEL(name, In, blocks)                                                        \
  SRK_KERNEL void SRK_GPU_BOUNDS(blocks)                                                             \
  name(const In* chunks, i64 stride, int world, float div, float* out, i64 n) {                     \
    SRK_FP_GUARD;                                                                                    \
    dist_f32_body<In>(chunks, stride, world, div, out, n);                                           \
  }

SRK_DIST_F32_KERNEL(dist_reduce_f32_f32, float, SRK_STREAM_MIN_BLOCKS)
SRK_DIST_F32_KERNEL(dist_reduce_bf16_f32, u16, SRK_REDUCE_F32_MIN_BLOCKS)
