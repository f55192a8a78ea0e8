// srk_philox.h: Philox4x32-10 and the draw layout of srkern's bit contract v1.1 (unchanged since v1).
//
// Philox4x32-10 exactly as in Random123 (Salmon et al., SC'11): 10 rounds, multipliers
// 0xD2511F53 / 0xCD9E8D57, Weyl key increments 0x9E3779B9 / 0xBB67AE85. The known-answer
// vectors of Random123's kat_vectors file are checked in tests/test_philox.py.
//
// Contract v1: key = (seed lo, seed hi); counter = (q lo, q hi, step lo, stream lo), where
// q = index / 8 for 16-bit draws (BF16 targets) and q = index / 4 for 32-bit draws.
// Every random bit is a function of (seed, step, stream, index) only.
#pragma once
#include "srk_platform.h"

struct srk_u32x4 { u32 w[4]; };

SRK_HD void srk_mulhilo(u32 a, u32 b, u32* hi, u32* lo) {
  u64 p = (u64)a * (u64)b;
  *hi = (u32)(p >> 32);
  *lo = (u32)p;
}

SRK_HD srk_u32x4 srk_philox4x32_10(u32 c0, u32 c1, u32 c2, u32 c3, u32 k0, u32 k1) {
  #pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
    u32 hi0, lo0, hi1, lo1;
    srk_mulhilo(0xD2511F53u, c0, &hi0, &lo0);
    srk_mulhilo(0xCD9E8D57u, c2, &hi1, &lo1);
    u32 n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
  }
  srk_u32x4 r;
  r.w[0] = c0; r.w[1] = c1; r.w[2] = c2; r.w[3] = c3;
  return r;
}

// The four words for block q of (seed, step, stream).
SRK_HD srk_u32x4 srk_draw_block(u64 seed, u64 step, u32 stream, u64 q) {
  return srk_philox4x32_10((u32)q, (u32)(q >> 32), (u32)step, stream, (u32)seed, (u32)(seed >> 32));
}

// 16-bit draw for lane 0..7 of a block: low half of w[lane/2] for even lanes, high half for odd.
SRK_HD u32 srk_draw16(const srk_u32x4& b, int lane) {
  return (b.w[lane >> 1] >> (16 * (lane & 1))) & 0xffffu;
}

// The CPU variants draw many blocks at once with srk_draw_tile (kernels/cpu/philox_tile.h),
// which must give these blocks' words.
