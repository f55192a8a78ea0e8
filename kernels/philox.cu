// philox.cu: raw Philox4x32-10 blocks of contract v1, for tests and diagnostics.
//
// philox_blocks writes the four output words of blocks q0, q0 + 1, ..., q0 + n - 1 of
// (seed, step, stream), exactly as the cast and optimizer kernels draw them through
// srk_draw_block. tests/test_philox.py checks them against Random123's known-answer vectors and
// against srkern.reference, so a kernel-side Philox bug cannot hide behind the rounding logic.
//
// References: Random123 (Salmon, Moraes, Dror, Shaw, SC'11), kat_vectors.
#include "srk_platform.h"
#include "srk_philox.h"

// out holds 4 * n words; block q0 + i goes to out[4 i .. 4 i + 3]. The block index wraps
// modulo 2^64 like the contract's counter (q lo, q hi).
SRK_KERNEL void philox_blocks(u64 seed, u64 step, u32 stream, u64 q0, i64 n, u32* out) {
  SRK_LOOP(i, n) {
    srk_u32x4 b = srk_draw_block(seed, step, stream, q0 + (u64)i);
    out[4 * i] = b.w[0];
    out[4 * i + 1] = b.w[1];
    out[4 * i + 2] = b.w[2];
    out[4 * i + 3] = b.w[3];
  }
}
