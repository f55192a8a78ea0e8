// srk_blocks.h: how a range of logical indices [offset, offset + n) splits into Philox blocks of
// G consecutive indices (G = 8 for 16-bit draws, 4 for 32-bit draws; contract v1).
//
// Full blocks take a kernel's branch-free path; the at most two partial blocks at the ends take
// its per-lane path. Nothing here computes offset + n, which wraps when a range ends at 2^64:
// everything is relative to the head block q_head = offset / G and the lane r = offset % G.
#pragma once
#include "srk_platform.h"

struct SrkBlocks {
  u64 q_full0;   // first full block
  i64 nfull;     // number of full blocks
  u64 q_edge[2]; // partial blocks, head first
  i64 nedge;     // 0, 1 or 2
};

SRK_HD SrkBlocks srk_split_blocks(u64 offset, i64 n, u64 G) {
  SrkBlocks s;
  s.q_full0 = 0; s.nfull = 0; s.nedge = 0; s.q_edge[0] = 0; s.q_edge[1] = 0;
  if (n <= 0) return s;
  u64 q_head = offset / G, r = offset % G;
  u64 span = r + (u64)n;                      // indices from the head block's start: no overflow
  u64 q_tail = q_head + (span - 1) / G;       // block of the last element
  s.q_full0 = q_head + (r != 0);
  u64 q_end = q_head + span / G;              // one past the last full block
  s.nfull = q_end > s.q_full0 ? (i64)(q_end - s.q_full0) : 0;
  if (r != 0 || s.nfull == 0) s.q_edge[s.nedge++] = q_head;
  if (span % G != 0 && q_tail != q_head) s.q_edge[s.nedge++] = q_tail;
  return s;
}
