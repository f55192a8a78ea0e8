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

// Large casts (at least SRK_CAST_STREAM_MIN elements) write each full tile into an L1 buffer and
// stream it to memory with non-temporal stores, when the first full tile's destination is 64-byte
// aligned (a tile's output is whole cache lines, so then every full tile's is; torch allocations
// are), and prefetch the input SRK_CAST_PREFETCH tiles ahead. Why: an ordinary store that misses
// the caches first reads its line, so the cast moved 4 + 2 + 2 bytes per BF16 element instead of 4
// + 2; the prefetch keeps reads in flight while the core runs Philox (streaming alone: 22.9-24.5 ms
// at 2 threads, 44-46 ms at 1; with the prefetch 21.7-22.2 and 36-40 in the same session). Measured
// (2-core AVX-512 Xeon, srkern.cast(x, "bfloat16", seed=1, out=y) of 64M elements against torch
// copy_ of the same 384 MB, both minima of 10-15 runs in one process, old and new builds alternated
// twice): 2 threads SR 28.2-33.9 -> 22.5-22.8 ms (copy 19.2-23.8; 0.64-0.70x -> 0.95-1.02x), round-
// to-nearest 21.0-25.1 -> 18.5-18.7 ms; 1 thread SR 60.6-77.7 -> 33.0-42.3 ms (copy 35-44). At
// 4M-16M elements (output in L3) streaming and prefetch together are still 5-15% faster than
// neither; prefetch distances of 2-16 tiles measured alike within the noise. Under 4M elements (8
// MB of BF16 output, both cores' L2 together) the output is left in the cache for whoever reads it
// next.
#define SRK_CAST_STREAM_MIN ((i64)4 << 20)
#define SRK_CAST_PREFETCH 8

// The nfull full blocks from q_full0 (element p of x has logical index offset + p).
template <class C, bool SR>
inline void cast_full_blocks_cpu(const float* SRK_RESTRICT x, typename C::out_t* SRK_RESTRICT y,
                                 u64 offset, u64 seed, u64 step, u32 stream, int sat,
                                 u64 q_full0, i64 nfull) {
  typedef typename C::out_t O;
  i64 ntiles = (nfull + CAST_TILE - 1) / CAST_TILE;
#if defined(__AVX__)
  static_assert(CAST_TILE * C::G * sizeof(O) % 64 == 0, "a tile's output is whole cache lines");
  const bool nt = nfull * C::G >= SRK_CAST_STREAM_MIN &&
                  (uintptr_t)(y + (i64)(q_full0 * C::G - offset)) % 64 == 0;
#else
  const bool nt = false;
#endif
  SRK_PARALLEL(ntiles >= SRK_CPU_PAR_TILES) {
    SRK_PRAGMA(omp for schedule(static) nowait)
    for (i64 i = 0; i < ntiles; ++i) {
      u64 q0 = q_full0 + (u64)i * CAST_TILE;
      int count = (int)srk_min64(CAST_TILE, nfull - i * CAST_TILE);
      i64 p = (i64)(q0 * C::G - offset);
#if defined(__AVX__)
      if (nt && count == CAST_TILE) {
        alignas(64) O buf[CAST_TILE * C::G];
        // A hint only: past the input's end it fetches nothing and faults nothing (the address is
        // formed as an integer, so no out-of-range pointer either).
        const uintptr_t ahead = (uintptr_t)(x + p) + 4 * SRK_CAST_PREFETCH * CAST_TILE * C::G;
        for (int k = 0; k < 4 * CAST_TILE * C::G; k += 64)
          _mm_prefetch((const char*)(ahead + k), _MM_HINT_T0);
        if (sat) cast_tile_cpu<C, SR, true, CAST_TILE>(x + p, buf, seed, step, stream, q0, count);
        else cast_tile_cpu<C, SR, false, CAST_TILE>(x + p, buf, seed, step, stream, q0, count);
        for (int k = 0; k < (int)sizeof(buf); k += 32)
          _mm256_stream_si256((__m256i*)((char*)(y + p) + k),
                              _mm256_load_si256((const __m256i*)((char*)buf + k)));
        continue;
      }
#endif
      if (sat) cast_tile_cpu<C, SR, true, CAST_TILE>(x + p, y + p, seed, step, stream, q0, count);
      else cast_tile_cpu<C, SR, false, CAST_TILE>(x + p, y + p, seed, step, stream, q0, count);
    }
#if defined(__AVX__)
    // Streaming stores are weakly ordered: drain them before the region's barrier.
    if (nt) _mm_sfence();
#endif
  }
}
#endif  // !SRK_GPU
