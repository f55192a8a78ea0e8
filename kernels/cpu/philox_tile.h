// cpu/philox_tile.h: Philox4x32-10 for T consecutive blocks at once, across SIMD lanes (host builds).
//
// Must equal, bit for bit, srk_draw_block of srk_philox.h (the shared body, what the GPU runs)
// for every block: tile word w[4 * t + k] is srk_draw_block(seed, step, stream, q0 + t).w[k],
// the same ten rounds on the same counter, only T blocks side by side, one per SIMD lane (why
// that is faster: below). Tested through every bit-exact test of cast and AdamW on the cpu
// (AVX2 version) and cpu-portable (portable loop) backends, whose oracle draws with a scalar
// Philox; tests/test_adamw.py::test_cpu_runs_and_shared_blocks puts tiles on block counters
// whose low word wraps.
#pragma once
#include "srk_platform.h"
#include "srk_philox.h"

// srk_draw_tile<T>(seed, step, stream, q0, w) writes the words of the T consecutive blocks
// q0, q0 + 1, ..., q0 + T - 1 (T a multiple of 4) block after block:
// w[4 * t + k] = srk_draw_block(seed, step, stream, q0 + t).w[k]. On a little-endian CPU that
// buffer is the contract's draw sequence: srk_tile_draw16(w, j) is the 16-bit draw of element
// 8 * q0 + j, and w[j] the 32-bit draw of element 4 * q0 + j.
//
// Why not a loop of srk_draw_block: a scalar Philox call costs ~80 instructions per 8 BF16
// elements, more than the whole memory-bound cast. Here one SIMD lane runs one block.
// With AVX2 each 64-bit lane holds one block's counter word in its low half: vpmuludq then
// gives the full 32x32->64 product in place (hi = product >> 32, lo = its low half), and the
// garbage that XOR leaves in the upper halves is ignored by the next vpmuludq, so a round is
// 2 multiplies, 2 shifts and 4 XORs per 4 blocks with no shuffles. (g++'s auto-vectorisation of
// the portable loop below needs ~6 shuffles per widening multiply, measured with objdump.)
// Sixteen blocks (four vectors per word) run interleaved to hide the multiply latency; the round
// keys are broadcast once per tile. Measured: ~9 cycles per block (3.1 GHz Zen 3), against
// ~80 instructions for one scalar srk_draw_block call.
#if defined(__AVX2__)
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

// 16-bit draw j of a tile written by srk_draw_tile (the little-endian halves of its words).
inline u32 srk_tile_draw16(const u32* w, int j) {
  u16 r;
  memcpy(&r, (const char*)w + 2 * j, 2);
  return r;
}
