// srk_table.h: the tensor table of the multi-tensor kernels (adamw.cu, norm.cu), and how they
// read and write the table's BF16 / FP32 elements.
//
// One launch covers a list of tensors. The host (srkern/_table.py, table) writes one row of
// SRK_TABLE_COLS u64 per tensor: six buffer pointers, the element count, the logical index of
// element 0 and the first work unit of the tensor in the launch (work units: (tensor, Philox
// block) pairs for AdamW, partial sums for the norm). A thread finds its tensor by binary search
// of that last column, so how tensors are grouped into launches never changes which unit is what.
#pragma once
#include "srk_platform.h"
#include "srk_round.h"
#include "srk_vec.h"

// Columns of one row (u64 each); srkern reads this #define.
#define SRK_TABLE_COLS 9
#define SRK_TABLE_UNIT0 8  // the column of the first work unit

struct SrkRow {
  void* p;         // AdamW: weights (in fp32-master the BF16 copy, write only)
  const void* g;   // gradient, BF16 or FP32
  void* m;         // AdamW: first moment
  void* v;         // AdamW: second moment
  float* w;        // AdamW fp32-master: FP32 master weights; else null
  u16* c;          // AdamW bf16-kahan: BF16 compensation; else null
  i64 n;           // elements
  u64 off;         // logical index of element 0
  i64 b0;          // first work unit of this tensor in the launch
};

SRK_HD SrkRow srk_row(const u64* table, i64 t) {
  const u64* r = table + t * SRK_TABLE_COLS;
  SrkRow row;
  row.p = (void*)(uptr)r[0];
  row.g = (const void*)(uptr)r[1];
  row.m = (void*)(uptr)r[2];
  row.v = (void*)(uptr)r[3];
  row.w = (float*)(uptr)r[4];
  row.c = (u16*)(uptr)r[5];
  row.n = (i64)r[6];
  row.off = r[7];
  row.b0 = (i64)r[SRK_TABLE_UNIT0];
  return row;
}

// The tensor that work unit b belongs to: the largest t with b0[t] <= b.
SRK_HD i64 srk_row_find(const u64* table, i64 ntensors, i64 b) {
  i64 lo = 0, hi = ntensors - 1;
  while (lo < hi) {
    i64 mid = (lo + hi + 1) / 2;
    if ((i64)table[mid * SRK_TABLE_COLS + SRK_TABLE_UNIT0] <= b) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Units of tensor t: up to the next tensor's first unit, or to the launch's total for the last.
SRK_HD i64 srk_row_units(const u64* table, i64 ntensors, i64 nunits, i64 t) {
  i64 next = t + 1 < ntensors ? (i64)table[(t + 1) * SRK_TABLE_COLS + SRK_TABLE_UNIT0] : nunits;
  return next - (i64)table[t * SRK_TABLE_COLS + SRK_TABLE_UNIT0];
}

// ---- elements: BF16 as u16 bit patterns, FP32 as float ----------------------------------------

SRK_HD float srk_elem_f32(u16 x) { return srk_bf16_to_f32(x); }
SRK_HD float srk_elem_f32(float x) { return x; }

// 8 consecutive elements a[0..7], with 16-byte accesses (SrkPacked) where the address allows:
// one BF16 vector or two FP32 vectors.
template <class T>
SRK_HD void srk_get8(const T* a, T* x) {
  const int N = 16 / sizeof(T);
  #pragma unroll
  for (int h = 0; h < 8; h += N) {
    SrkPacked<T, N> t = srk_load<N>(a + h);
    #pragma unroll
    for (int k = 0; k < N; ++k) x[h + k] = t[k];
  }
}
template <class T>
SRK_HD void srk_put8(T* a, const T* x) {
  const int N = 16 / sizeof(T);
  #pragma unroll
  for (int h = 0; h < 8; h += N) {
    SrkPacked<T, N> t;
    #pragma unroll
    for (int k = 0; k < N; ++k) t[k] = x[h + k];
    srk_store<N>(a + h, t);
  }
}

// Elements a[j + k] for the lanes k = 0..7 with 0 <= j + k < n; the other lanes read 0 and are
// not written. Everything relative to a and j, so no pointer outside the tensor is formed.
template <class T>
SRK_HD void srk_get_lanes(const T* a, i64 j, i64 n, T* x) {
  #pragma unroll
  for (int k = 0; k < 8; ++k) x[k] = j + k >= 0 && j + k < n ? a[j + k] : (T)0;
}
template <class T>
SRK_HD void srk_put_lanes(T* a, i64 j, i64 n, const T* x) {
  #pragma unroll
  for (int k = 0; k < 8; ++k) if (j + k >= 0 && j + k < n) a[j + k] = x[k];
}
