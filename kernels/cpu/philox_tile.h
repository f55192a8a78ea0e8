// cpu/philox_tile.h: Philox4x32-10 for T consecutive blocks at once, across SIMD lanes (host builds).
//
// Must equal, bit for bit, srk_draw_block of srk_philox.h (the shared body, what the GPU runs)
// for every block: tile word w[4 * t + k] is srk_draw_block(seed, step, stream, q0 + t).w[k],
// the same ten rounds on the same counter, only T blocks side by side, one per SIMD lane (why
// that is faster: below). Three versions, chosen by the compiler's target (the one #if below,
// which also names the version srk_simd_path() reports): AVX-512 (the cpu backend on an
// AVX-512 CPU), AVX2 (the cpu backend on an AVX2 CPU, or SRKERN_CPU_ISA=avx2), the portable loop
// (cpu-portable). tests/test_simd.py checks every version directly against the NumPy oracle's
// blocks, on counters whose low word and whole 64 bits wrap, and runs the bit-exact cast, AdamW and Philox tests with
// SRKERN_CPU_ISA=avx2 on an AVX-512 machine; tests/test_adamw.py::test_cpu_runs_and_shared_blocks
// puts tiles on block counters whose low word wraps.
#pragma once
#include "srk_platform.h"
#include "srk_philox.h"

// srk_draw_tile<T>(seed, step, stream, q0, w) writes the words of the T consecutive blocks
// q0, q0 + 1, ..., q0 + T - 1 (T a multiple of 4) block after block:
// w[4 * t + k] = srk_draw_block(seed, step, stream, q0 + t).w[k]. On a little-endian CPU that
// buffer is the contract's draw sequence: srk_tile_draw16(w, j) is the 16-bit draw of element
// 8 * q0 + j, and w[j] the 32-bit draw of element 4 * q0 + j.
// srk_draw_tiles<T, S>(seed, step, streams, q0, w) does the same for S streams at once (tile s,
// of stream streams[s], at w + 4 * T * s): the AdamW step draws three 8-block tiles per run, and
// one tile of 8 blocks alone is too short to hide the multiply latency.
//
// Why not a loop of srk_draw_block: a scalar Philox call costs ~80 instructions per 8 BF16
// elements, more than the whole memory-bound cast. Here one SIMD lane runs one block.
#if defined(__AVX512F__)
#define SRK_SIMD_PATH "avx512"
// g++ 12's AVX-512 intrinsics start from _mm512_undefined_epi32(), a self-initialised variable
// that -Wall reports as uninitialised at every inlined use (GCC bug 105593, fixed in g++ 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// AVX-512: eight blocks per __m512i, one per 64-bit lane, the counter word in its low half (as
// in the AVX2 version below: vpmuludq gives the full 32x32->64 product in place). A round is
// 2 vpmuludq, 2 shifts and 2 vpternlogd (the two 3-way XORs) per 8 blocks: 0.75 vector ops per
// block and round, against 2.5 for AVX2 (4 blocks per 2 multiplies, 2 shifts and 4 XORs).
// Up to four vectors run interleaved: a round's dependency chain is multiply (5 cycles) + shift
// + vpternlogd, 7 cycles, and one vector's round issues in 3 cycles on the two 512-bit ports.
// The round keys are computed once per call, in scalar code, and broadcast once per round for
// all the vectors in flight.
// Measured (2-core Xeon with AVX-512, one thread, in L1, a microbenchmark of this header built
// with the cpu backend's flags; TSC at 2.1 GHz; ranges over runs on the shared machine):
// 1.8-2.9 ns (3.8-6.1 TSC cycles) per block for srk_draw_tile<32> (the cast's tile), 1.8-2.6 ns
// for srk_draw_tiles<8, 3> (AdamW), 3.4-3.9 ns for one 8-block tile alone; the AVX2 version on
// the same machine (SRKERN_CPU_ISA=avx2): 4.0-5.4 ns (8.3-11.4 cycles) for 32 blocks, 5.2-7.9 ns
// for 8; the portable loop 11.5-12.4 ns.

// Vectors v = 0 .. NV - 1: blocks qb[v] + 0 .. 7 of stream st[v]; their 32 words go to o[v],
// block-major, all of them, or the first 16 (blocks 0 .. 3) where half[v].
template <int NV>
inline void srk_philox512(const u32* k0, const u32* k1, u32 step, const u64* qb, const u32* st,
                          u32* const* o, const bool* half) {
  const __m512i m0 = _mm512_set1_epi64(0xD2511F53u), m1 = _mm512_set1_epi64(0xCD9E8D57u);
  const __m512i lanes = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  __m512i c0[NV], c1[NV], c2[NV], c3[NV];
  #pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    __m512i q = _mm512_add_epi64(_mm512_set1_epi64((long long)qb[v]), lanes);  // wraps mod 2^64
    c0[v] = q;                         // low half: q lo (the high half is ignored)
    c1[v] = _mm512_srli_epi64(q, 32);  // q hi: the 64-bit add carried into it
    c2[v] = _mm512_set1_epi64(step);
    c3[v] = _mm512_set1_epi64(st[v]);
  }
  #pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const __m512i key0 = _mm512_set1_epi32((int)k0[round]), key1 = _mm512_set1_epi32((int)k1[round]);
    #pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      __m512i p0 = _mm512_mul_epu32(c0[v], m0), p1 = _mm512_mul_epu32(c2[v], m1);
      // 0x96: a ^ b ^ c. The upper halves collect garbage that vpmuludq ignores.
      c0[v] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p1, 32), c1[v], key0, 0x96);
      c2[v] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p0, 32), c3[v], key1, 0x96);
      c1[v] = p1;
      c3[v] = p0;
    }
  }
  // To block-major: a = (w0 | w1 << 32), b = (w2 | w3 << 32) per block (vpshufd with a merge
  // mask puts w1 / w3 into the odd 32-bit lanes); per 128-bit lane, unpack gives block 2L
  // (lo) and block 2L + 1 (hi); vpermt2q puts blocks 0..3 and 4..7 in order.
  const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
  const __m512i second = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  #pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    __m512i a = _mm512_mask_shuffle_epi32(c0[v], (__mmask16)0xAAAA, c1[v], _MM_PERM_CDAB);
    __m512i b = _mm512_mask_shuffle_epi32(c2[v], (__mmask16)0xAAAA, c3[v], _MM_PERM_CDAB);
    __m512i lo = _mm512_unpacklo_epi64(a, b), hi = _mm512_unpackhi_epi64(a, b);
    _mm512_storeu_si512((void*)o[v], _mm512_permutex2var_epi64(lo, first, hi));
    if (!half[v]) _mm512_storeu_si512((void*)(o[v] + 16), _mm512_permutex2var_epi64(lo, second, hi));
  }
}

template <int T, int S>
inline void srk_draw_tiles(u64 seed, u64 step, const u32* streams, u64 q0, u32* SRK_RESTRICT w) {
  static_assert(T % 4 == 0, "tiles are whole groups of 4 blocks");
  const int VT = (T + 7) / 8, N = VT * S;  // vectors per tile, in all
  u32 k0[10], k1[10];
  k0[0] = (u32)seed; k1[0] = (u32)(seed >> 32);
  for (int round = 1; round < 10; ++round) {
    k0[round] = k0[round - 1] + 0x9E3779B9u;
    k1[round] = k1[round - 1] + 0xBB67AE85u;
  }
  u64 qb[N];
  u32 st[N];
  u32* o[N];
  bool half[N];
  for (int i = 0; i < N; ++i) {
    const int s = i / VT, v = i % VT;
    qb[i] = q0 + (u64)(8 * v);
    st[i] = streams[s];
    o[i] = w + 4 * T * s + 32 * v;
    half[i] = 8 * v + 8 > T;
  }
  int i = 0;
  for (; i + 4 <= N; i += 4) srk_philox512<4>(k0, k1, (u32)step, qb + i, st + i, o + i, half + i);
  if constexpr (N % 4 == 3) srk_philox512<3>(k0, k1, (u32)step, qb + i, st + i, o + i, half + i);
  if constexpr (N % 4 == 2) srk_philox512<2>(k0, k1, (u32)step, qb + i, st + i, o + i, half + i);
  if constexpr (N % 4 == 1) srk_philox512<1>(k0, k1, (u32)step, qb + i, st + i, o + i, half + i);
}

template <int T>
inline void srk_draw_tile(u64 seed, u64 step, u32 stream, u64 q0, u32* SRK_RESTRICT w) {
  srk_draw_tiles<T, 1>(seed, step, &stream, q0, w);
}
#pragma GCC diagnostic pop
#elif defined(__AVX2__)
#define SRK_SIMD_PATH "avx2"
// With AVX2 each 64-bit lane holds one block's counter word in its low half: vpmuludq then
// gives the full 32x32->64 product in place (hi = product >> 32, lo = its low half), and the
// garbage that XOR leaves in the upper halves is ignored by the next vpmuludq, so a round is
// 2 multiplies, 2 shifts and 4 XORs per 4 blocks with no shuffles. (g++'s auto-vectorisation of
// the portable loop below needs ~6 shuffles per widening multiply, measured with objdump.)
// Sixteen blocks (four vectors per word) run interleaved to hide the multiply latency; the round
// keys are broadcast once per tile. Measured: ~9 cycles per block (3.1 GHz Zen 3), against
// ~80 instructions for one scalar srk_draw_block call.
template <int T>
inline void srk_draw_tile(u64 seed, u64 step, u32 stream, u64 q0, u32* SRK_RESTRICT w) {
  // Vectors in flight: 4 (16 blocks) beat 1, 2 and 8 by 5-30% in cycles per block (single
  // thread, in cache; more spills past 4). Smaller tiles (T = 8 in cpu/adamw_tile.h) use fewer.
  const int V = T % 16 == 0 ? 4 : (T % 8 == 0 ? 2 : 1);
  static_assert(T % 4 == 0, "tiles are whole groups of 4 blocks");
  const __m256i m0 = _mm256_set1_epi64x(0xD2511F53u), m1 = _mm256_set1_epi64x(0xCD9E8D57u);
  // The ten round keys, broadcast once per tile (per round they cost ~40% of the rounds' work).
  __m256i rk0[10], rk1[10];
  u32 k0 = (u32)seed, k1 = (u32)(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    rk0[round] = _mm256_set1_epi32((int)k0);
    rk1[round] = _mm256_set1_epi32((int)k1);
    k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
  }
  for (int g = 0; g < T; g += 4 * V) {
    // Lane l of vector v holds block q0 + g + 4 v + l; the counter is (q lo, q hi, step, stream).
    __m256i c0[V], c1[V], c2[V], c3[V];
    for (int v = 0; v < V; ++v) {
      u64 qb = q0 + (u64)(g + 4 * v);
      __m256i q = _mm256_add_epi64(_mm256_set1_epi64x((long long)qb), _mm256_setr_epi64x(0, 1, 2, 3));
      c0[v] = q;                         // low half: q lo (the high half is ignored)
      c1[v] = _mm256_srli_epi64(q, 32);  // q hi: the 64-bit add carried into it
      c2[v] = _mm256_set1_epi64x((u32)step);
      c3[v] = _mm256_set1_epi64x(stream);
    }
    #pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      #pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        __m256i p0 = _mm256_mul_epu32(c0[v], m0), p1 = _mm256_mul_epu32(c2[v], m1);
        __m256i n0 = _mm256_xor_si256(_mm256_srli_epi64(p1, 32), _mm256_xor_si256(c1[v], rk0[round]));
        __m256i n2 = _mm256_xor_si256(_mm256_srli_epi64(p0, 32), _mm256_xor_si256(c3[v], rk1[round]));
        c0[v] = n0; c1[v] = p1; c2[v] = n2; c3[v] = p0;
      }
    }
    // To block-major: (w0 | w1 << 32) and (w2 | w3 << 32) per block, then 16 bytes per block.
    for (int v = 0; v < V; ++v) {
      __m256i a = _mm256_blend_epi32(c0[v], _mm256_slli_epi64(c1[v], 32), 0xAA);
      __m256i b = _mm256_blend_epi32(c2[v], _mm256_slli_epi64(c3[v], 32), 0xAA);
      __m256i lo = _mm256_unpacklo_epi64(a, b), hi = _mm256_unpackhi_epi64(a, b);  // blocks 0|2, 1|3
      __m256i* o = (__m256i*)(w + 4 * (g + 4 * v));
      _mm256_storeu_si256(o, _mm256_permute2x128_si256(lo, hi, 0x20));
      _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(lo, hi, 0x31));
    }
  }
}
#else
#define SRK_SIMD_PATH "portable"
// Portable version: the same rounds word-major (one array element per block) for the
// compiler's auto-vectoriser.
template <int T>
inline void srk_draw_tile(u64 seed, u64 step, u32 stream, u64 q0, u32* SRK_RESTRICT w) {
  u32 c0[T], c1[T], c2[T], c3[T];
  #pragma omp simd
  for (int t = 0; t < T; ++t) {
    u64 q = q0 + (u64)t;  // wraps modulo 2^64 like the counter (q lo, q hi)
    c0[t] = (u32)q; c1[t] = (u32)(q >> 32); c2[t] = (u32)step; c3[t] = stream;
  }
  u32 k0 = (u32)seed, k1 = (u32)(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    if (round > 0) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
    #pragma omp simd
    for (int t = 0; t < T; ++t) {
      u64 p0 = (u64)0xD2511F53u * c0[t], p1 = (u64)0xCD9E8D57u * c2[t];
      u32 n0 = (u32)(p1 >> 32) ^ c1[t] ^ k0, n2 = (u32)(p0 >> 32) ^ c3[t] ^ k1;
      c1[t] = (u32)p1; c3[t] = (u32)p0; c0[t] = n0; c2[t] = n2;
    }
  }
  #pragma omp simd
  for (int t = 0; t < T; ++t) {
    w[4 * t] = c0[t]; w[4 * t + 1] = c1[t]; w[4 * t + 2] = c2[t]; w[4 * t + 3] = c3[t];
  }
}
#endif

#if !defined(__AVX512F__)
// AVX2 and portable: one tile after another (a tile of 8 blocks already fills two ymm vectors).
template <int T, int S>
inline void srk_draw_tiles(u64 seed, u64 step, const u32* streams, u64 q0, u32* SRK_RESTRICT w) {
  for (int s = 0; s < S; ++s) srk_draw_tile<T>(seed, step, streams[s], q0, w + 4 * T * s);
}
#endif

// Which of the versions above this build runs ("avx512", "avx2" or "portable"), read by
// srkern._backend.simd_path from the cast library (benchmarks record it, `python -m srkern info`
// prints it). Defined here, once per library: cast.cu and adamw.cu include this header on host
// builds, each into its own library.
SRK_KERNEL const char* srk_simd_path() { return SRK_SIMD_PATH; }

// The halves of a tile's words as an array: a u16 that may alias the u32 words (a plain u16
// pointer into them breaks strict aliasing, and g++ may then move the portable tile's stores after
// the reads; it did in cpu/adafactor_tile.h). Halfword j is the 16-bit draw of element 8 * q0 + j.
typedef u16 __attribute__((may_alias)) srk_draw16_t;

// 16-bit draw j of a tile written by srk_draw_tile (the little-endian halves of its words).
inline u32 srk_tile_draw16(const u32* w, int j) {
  u16 r;
  memcpy(&r, (const char*)w + 2 * j, 2);
  return r;
}
