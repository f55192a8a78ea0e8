// cpu/pair_chunks.h: how the CPU backends hand out the (tensor, Philox block) pairs of a fused
// optimizer launch (AdamW, SGD, Lion, Adafactor's weights), written once.
//
// Must equal, bit for bit, the shared bodies' GPU loop (one pair per thread, SRK_LOOP over the
// pairs) in what it runs: every pair of the launch exactly once, each through its family's body. The pairs go out in chunks of ADAMW_CPU_CHUNK (srk_launch.h), dynamically; a thread walks
// its chunk's tensors in order and hands `range(row, t, lb0, lb1)` the local blocks [lb0, lb1)
// of tensor t (row = its table row). Which thread takes a chunk never changes a bit: every pair's
// result is a function of its own elements and draws only.
#pragma once
#include "srk_platform.h"
#include "srk_launch.h"
#include "srk_table.h"

template <class F>
static void srk_cpu_pair_chunks(const u64* table, i64 ntensors, i64 npairs, F&& range) {
  if (npairs <= 0) return;
  const i64 nchunks = (npairs + ADAMW_CPU_CHUNK - 1) / ADAMW_CPU_CHUNK;
  // One chunk (under 16K elements) runs on the calling thread: no fork, no wake-up of workers.
  // SRK_PARALLEL: every thread of the team runs its chunks in the default FP environment.
  SRK_PARALLEL(nchunks > 1) SRK_PRAGMA(omp for schedule(dynamic, 1) nowait)
  for (i64 chunk = 0; chunk < nchunks; ++chunk) {
    i64 b = chunk * ADAMW_CPU_CHUNK;
    const i64 b_end = srk_min64(npairs, b + ADAMW_CPU_CHUNK);
    i64 t = srk_row_find(table, ntensors, b);
    while (b < b_end) {
      const SrkRow row = srk_row(table, t);
      const i64 stop = srk_min64(b_end, row.b0 + srk_row_units(table, ntensors, npairs, t));
      if (stop > b) range(row, t, b - row.b0, stop - row.b0);
      b = srk_max64(b, stop);
      ++t;
    }
  }
}
