// cpu/cast_tile.h: the CPU variant of cast.cu's loop over full Philox blocks.
// cast_full_blocks_cpu<C, SR> must equal, bit for bit, the shared body cast_full_block<C, SR>
// (cast.cu, one block per GPU thread) run for each block q_full0 .. q_full0 + nfull - 1.
//
// Why a variant: a scalar Philox call costs ~80 instructions per block, more than the whole
// memory-bound cast of the block's 8 (BF16) or 4 (FP16, FP8) elements. Here blocks go CAST_TILE
// at a time: Philox for the whole tile across SIMD lanes (srk_draw_tile, cpu/philox_tile.h),
// then one SIMD loop over the tile's elements, each reading its draw from the tile buffer at the
// place the contract's draw layout puts it (srk_tile_draw16(w, j) is srk_draw16 of tile block
// j / 8, lane j % 8; w[j] is word j % 4 of tile block j / 4). The per-element rounding is the
// shared one for BF16 (srk_bf16_sr / srk_bf16_rn are branch-free 32-bit code already) and the
// 32-bit encoder of cpu/round_small.h for FP16 and FP8.
//
// Included by cast.cu after its lane structs (CastBf16, CastSmall), host builds only.
#pragma once
#include "srk_platform.h"
#include "srk_philox.h"
#include "srk_round.h"
#include "cpu/philox_tile.h"
#include "cpu/round_small.h"

#ifndef SRK_GPU

// The CPU lane math of a cast lane struct C: rounding with SAT fixed at compile time (the
// common saturate=0 loop carries no clamp), and the draw of element j of a tile buffer.
template <class C> struct CastCpuLanes;

template <> struct CastCpuLanes<CastBf16> {
  template <bool SAT> static u16 sr(float x, u32 r) { return srk_bf16_sr(x, r, SAT); }
  template <bool SAT> static u16 rn(float x) { return srk_bf16_rn(x, SAT); }
  static u32 draw(const u32* w, int j) { return srk_tile_draw16(w, j); }
};

template <class F, class OUT> struct CastCpuLanes<CastSmall<F, OUT> > {
  template <bool SAT> static OUT sr(float x, u32 r) { return (OUT)srk_small_encode_u32<F, true, SAT>(x, r); }
  template <bool SAT> static OUT rn(float x) { return (OUT)srk_small_encode_u32<F, false, SAT>(x, 0u); }
  static u32 draw(const u32* w, int j) { return w[j]; }
};

// `count` (<= T) full blocks from q0 as one tile; x and y point at the tile's first element.
template <class C, bool SR, bool SAT, int T>
inline void cast_tile_cpu(const float* SRK_RESTRICT x, typename C::out_t* SRK_RESTRICT y,
                          u64 seed, u64 step, u32 stream, u64 q0, int count) {
  typedef CastCpuLanes<C> L;
  const int m = count * C::G;
  if (SR) {
    alignas(64) u32 w[4 * T];
    srk_draw_tile<T>(seed, step, stream, q0, w);
    #pragma omp simd
    for (int j = 0; j < m; ++j) y[j] = L::template sr<SAT>(x[j], L::draw(w, j));
  } else {
    #pragma omp simd
    for (int j = 0; j < m; ++j) y[j] = L::template rn<SAT>(x[j]);
  }
}

// The nfull full blocks from q_full0 (element p of x has logical index offset + p).
template <class C, bool SR>
inline void cast_full_blocks_cpu(const float* SRK_RESTRICT x, typename C::out_t* SRK_RESTRICT y,
                                 u64 offset, u64 seed, u64 step, u32 stream, int sat,
                                 u64 q_full0, i64 nfull) {
  i64 ntiles = (nfull + CAST_TILE - 1) / CAST_TILE;
  SRK_LOOP_TILES(i, ntiles) {
    u64 q0 = q_full0 + (u64)i * CAST_TILE;
    int count = (int)srk_min64(CAST_TILE, nfull - i * CAST_TILE);
    i64 p = (i64)(q0 * C::G - offset);
    if (sat) cast_tile_cpu<C, SR, true, CAST_TILE>(x + p, y + p, seed, step, stream, q0, count);
    else cast_tile_cpu<C, SR, false, CAST_TILE>(x + p, y + p, seed, step, stream, q0, count);
  }
}
#endif  // !SRK_GPU
