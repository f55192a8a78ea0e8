// adafactor.cu: a fused, multi-tensor Adafactor step (torch.optim.Adafactor's update: factored
// second moments for tensors of two or more dimensions, a full one for the others) in five
// precision modes, as four launches with host arithmetic between them.
//
// A tensor of shape (..., R, C) is factored: B = prod(...) batches of an R x C matrix, with row
// statistics rv[b, r] and column statistics cv[b, c] (torch's row_var of shape (..., R, 1) and
// col_var of shape (..., 1, C), contiguous: entry b * R + r and b * C + c). A tensor of 0 or 1
// dimensions keeps a full second moment vv (torch's variance, its shape). What one step computes,
// with g = grad * grad_scale in FP32 (grad_scale negated on the host for maximize), x the weight
// as read (the FP32 master in fp32-master), t the step, w = t ** beta2_decay (FP32):
//
//  launch 1 (af_rows, one unit per row of a tensor: a row of C elements of a factored tensor, or
//  AF_CHUNK consecutive elements of an unfactored one, the last row shorter): the FP64 sums of
//  x^2 and of g^2 over the row, each square of an FP32 value widened to FP64, in the row order
//  below (a NaN sum stored as the canonical FP64 NaN). Row order: element k of a row (k from 0)
//  goes to lane k % 8, each lane adds its elements in order from 0, and the row sum is
//  ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), as kernels/norm.cu adds its 8 lanes (eight
//  independent chains: the adds pipeline, and on the CPU they are one vector).
//  launch 1b (af_cols, factored tensors, one unit per (b, c)): the FP64 sum of g^2 over r = 0..R-1.
//  host: alpha = max(eps2, sqrt(sum x^2 / n)) * min(lr, 1 / sqrt(t)) (sums added left to right in
//  FP64), and the FP32 targets row_mean = (sum_r / C), col_mean = (sum_c / R) (FP64, rounded).
//  launch 2 (af_stats, one unit per statistic): s' = lerp(s, target, w), torch's lerp in FP32
//  (w < 0.5: s + w * (target - s); else target - (target - s) * (1 - w)), target = row_mean or
//  col_mean, or g * g for vv; stored as its rounding (BF16 statistics written with SR in bf16-sr
//  and bf16-kahan, streams ROW_VAR, COL_VAR and EXP_AVG_SQ, the indices below).
//  host: mean[b] = sum_r rv'[b, r] / R (FP64 of the stored values, rounded), then at least eps1.
//  launch 3 (af_usq, the rows of launch 1): the FP64 sum of u0^2 over the row (row order), where
//      vhat = (rv'[b, r] * cv'[b, c]) / mean[b]       (factored; vv'[j] otherwise)
//      u0   = (1 / sqrtf(vhat < eps1sq ? eps1sq : vhat)) * g
//  torch's rsqrt of var_estimate.clamp_(min=eps1 ** 2), then .mul_(grad): the same two FP32
//  roundings (and a NaN vhat stays NaN, as through clamp_).
//  host: scale = alpha / max(1, sqrt(sum u0^2 / n) / d), rounded to FP32 once.
//  launch 4 (af_apply, one unit per (tensor, Philox block) pair): u = scale * u0 and the weight
//  write of srk_modes.h (p' = p * decay - u, decay = 1 - lr * weight_decay: torch's
//  param.mul_(1 - lr * wd) then param.add_(update, alpha=-scale) with one rounding less in the
//  BF16 modes; the mode's stores, Kahan and master copy as in every srkern optimizer).
//
// The per-tensor numbers (R, C, a vector, scale and eps1 ** 2 as FP32) come in an auxiliary table
// of AF_AUX_COLS u64 per tensor, row t beside the tensor table's row t. The vector is launch 2's
// FP32 targets of a factored tensor (its B * R row means, then its B * C column means) and
// launches 3 and 4's mean[b].
//
// Random bits (contract v1): a BF16 statistic draws the 16-bit draw of (seed, step, S, i) with
// S = ROW_VAR, i = offset + b * R + r; S = COL_VAR, i = offset + b * C + c; S = EXP_AVG_SQ,
// i = offset + j (offset: the tensor's logical index; B * R and B * C are at most n, so no two
// tensors share an index of a stream). The weight draws as every optimizer's (PARAM or
// COMPENSATION, i = offset + j). Grouping, threads and backend never change a bit: every sum is in
// a fixed order of element indices, and the host adds the FP64 partial sums left to right.
//
// References: Shazeer & Stern 2018 ("Adafactor: Adaptive Learning Rates with Sublinear Memory
// Cost"); torch/optim/_adafactor.py (_single_tensor_adafactor: the order above).
#include "srk_platform.h"
#include "srk_modes.h"

// The layout's numbers (srkern/adafactor.py reads them from here).
#define AF_CHUNK 2048   // elements per row unit of an unfactored tensor
#define AF_AUX_COLS 4   // R (0: unfactored), C, the vector's address, FP32 bits of scale | eps1sq << 32

struct AfHyper {
  float grad_scale, w, decay, lrwd;
  u64 seed, step;
};

struct AfAux {
  i64 R, C;
  const float* vec;  // launch 2: the targets; launches 3 and 4: mean[b]
  float scale, eps1sq;
};

SRK_HD AfAux af_aux(const u64* aux, i64 t) {
  const u64* a = aux + t * AF_AUX_COLS;
  AfAux x;
  x.R = (i64)a[0];
  x.C = (i64)a[1];
  x.vec = (const float*)(uptr)a[2];
  x.scale = srk_u2f((u32)a[3]);
  x.eps1sq = srk_u2f((u32)(a[3] >> 32));
  return x;
}

// ---- per-element arithmetic, the one place it is written ---------------------------------------

SRK_HD double af_sq(float x) {
  double d = (double)x;
  return d * d;
}

// The row order's final sum of the 8 lane sums (canonical NaN).
SRK_HD double af_tree8(const double* a) {
  return srk_canon_f64(((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])));
}

// torch's lerp(s, target, w) in FP32.
SRK_HD float af_lerp(float s, float target, float w) {
  return w < 0.5f ? s + w * (target - s) : target - (target - s) * (1.0f - w);
}

// Where element j of a tensor sits: batch b, row r, column c (factored tensors). Computed once
// per row or block and then advanced (three 64-bit divisions per element cost ~4x the step).
struct AfPos {
  i64 b, r, c;
};
SRK_HD AfPos af_pos(const AfAux& a, i64 j) {
  AfPos p;
  p.c = j % a.C;
  p.r = (j / a.C) % a.R;
  p.b = j / (a.R * a.C);
  return p;
}
SRK_HD void af_next(const AfAux& a, AfPos* p) {
  if (++p->c == a.C) {
    p->c = 0;
    if (++p->r == a.R) { p->r = 0; ++p->b; }
  }
}

// The second-moment estimate of element j at position pos (stored statistics, after launch 2).
template <class S>
SRK_HD float af_vhat(const SrkRow& row, const AfAux& a, i64 j, const AfPos& pos) {
  if (a.R == 0) return srk_elem_f32(((const S*)row.m)[j]);
  const float rv = srk_elem_f32(((const S*)row.m)[pos.b * a.R + pos.r]);
  const float cv = srk_elem_f32(((const S*)row.v)[pos.b * a.C + pos.c]);
  return (rv * cv) / a.vec[pos.b];
}

// The unscaled update of one element from its gradient g (already times grad_scale).
SRK_HD float af_u0(float g, float vhat, float eps1sq) {
  const float v = vhat < eps1sq ? eps1sq : vhat;
  return (1.0f / sqrtf(v)) * g;
}

// The elements [j0, j1) of local row unit k of a tensor.
SRK_HD void af_row_span(const SrkRow& row, const AfAux& a, i64 k, i64* j0, i64* j1) {
  const i64 len = a.R == 0 ? (i64)AF_CHUNK : a.C;
  *j0 = k * len;
  *j1 = srk_min64(row.n, *j0 + len);
}

// ---- launch 1: row sums of x^2 and g^2 ----------------------------------------------------------

template <int MODE, class P, class G>
SRK_HD void af_rows_unit(const u64* table, const u64* aux, i64 ntensors, const AfHyper& h,
                         double* xsq, double* gsq, i64 b) {
  typedef SrkWeights<MODE, P> W;
  typedef typename W::X X;
  const i64 t = srk_row_find(table, ntensors, b);
  const SrkRow row = srk_row(table, t);
  const AfAux a = af_aux(aux, t);
  i64 j0, j1;
  af_row_span(row, a, b - row.b0, &j0, &j1);
  const X* x = W::xbuf(row);
  const G* g = (const G*)row.g;
  double sx[8], sg[8];
  #pragma unroll
  for (int e = 0; e < 8; ++e) sx[e] = sg[e] = 0.0;
  for (i64 j = j0; j < j1; j += 8) {
    #pragma unroll
    for (int e = 0; e < 8; ++e) {
      if (j + e < j1) {  // (a missing element would add +0: leaving it out is the same sum)
        sx[e] += af_sq(srk_elem_f32(x[j + e]));
        sg[e] += af_sq(srk_elem_f32(g[j + e]) * h.grad_scale);
      }
    }
  }
  xsq[b] = af_tree8(sx);
  gsq[b] = af_tree8(sg);
}

// ---- launch 1b: column sums of g^2 (factored tensors) --------------------------------------------

template <class G>
SRK_HD void af_cols_unit(const u64* table, const u64* aux, i64 ntensors, const AfHyper& h,
                         double* csq, i64 b) {
  const i64 t = srk_row_find(table, ntensors, b);
  const SrkRow row = srk_row(table, t);
  const AfAux a = af_aux(aux, t);
  const i64 k = b - row.b0, bb = k / a.C, c = k % a.C;
  const G* g = (const G*)row.g + bb * a.R * a.C + c;
  double s = 0.0;
  for (i64 r = 0; r < a.R; ++r) s += af_sq(srk_elem_f32(g[r * a.C]) * h.grad_scale);
  csq[b] = srk_canon_f64(s);
}

// ---- launch 2: the statistics ---------------------------------------------------------------------

// Units of a factored tensor: its B * R row statistics, then its B * C column statistics; of an
// unfactored one, its n elements (the target of a factored tensor's unit k is a.vec[k]).
template <int MODE, class P, class G, class S>
SRK_HD void af_stats_unit(const u64* table, const u64* aux, i64 ntensors, const AfHyper& h,
                          i64 b) {
  typedef SrkWeights<MODE, P> W;
  const bool sr = W::X_SR && sizeof(S) == 2;
  const i64 t = srk_row_find(table, ntensors, b);
  const SrkRow row = srk_row(table, t);
  const AfAux a = af_aux(aux, t);
  const i64 k = b - row.b0;
  S* s;
  float tg;
  u32 stream;
  i64 e;  // the statistic's entry in its buffer
  if (a.R == 0) {
    const float g = srk_elem_f32(((const G*)row.g)[k]) * h.grad_scale;
    s = (S*)row.m;
    e = k;
    tg = g * g;
    stream = SRK_STREAM_EXP_AVG_SQ;
  } else {
    const i64 nrow = row.n / a.C;  // B * R
    const bool is_row = k < nrow;
    s = is_row ? (S*)row.m : (S*)row.v;
    e = is_row ? k : k - nrow;
    tg = a.vec[k];
    stream = is_row ? SRK_STREAM_ROW_VAR : SRK_STREAM_COL_VAR;
  }
  const u64 i = row.off + (u64)e;
  const u32 r = sr ? srk_draw16(srk_draw_block(h.seed, h.step, stream, i / 8), (int)(i % 8)) : 0u;
  srk_store(af_lerp(srk_elem_f32(s[e]), tg, h.w), r, sr, s + e);
}

// ---- launch 3: row sums of u0^2 --------------------------------------------------------------------

// The lane sums s[8] of u0^2 over elements [j, j1) of a row, j at lane 0 of the row order
// (j - row start a multiple of 8), pos at j; the CPU tile runs this for the tail of a row.
template <class G, class S>
SRK_HD void af_usq_lanes(const SrkRow& row, const AfAux& a, const AfHyper& h, i64 j, i64 j1, AfPos pos,
                         double* s) {
  const G* g = (const G*)row.g;
  for (; j < j1; j += 8) {
    #pragma unroll
    for (int e = 0; e < 8; ++e) {
      if (j + e < j1) {
        const float u0 = af_u0(srk_elem_f32(g[j + e]) * h.grad_scale, af_vhat<S>(row, a, j + e, pos), a.eps1sq);
        s[e] += af_sq(u0);
        if (a.R != 0) af_next(a, &pos);
      }
    }
  }
}

template <class G, class S>
SRK_HD void af_usq_unit(const u64* table, const u64* aux, i64 ntensors, const AfHyper& h,
                        double* usq, i64 b) {
  const i64 t = srk_row_find(table, ntensors, b);
  const SrkRow row = srk_row(table, t);
  const AfAux a = af_aux(aux, t);
  i64 j0, j1;
  af_row_span(row, a, b - row.b0, &j0, &j1);
  double s[8];
  #pragma unroll
  for (int e = 0; e < 8; ++e) s[e] = 0.0;
  af_usq_lanes<G, S>(row, a, h, j0, j1, a.R == 0 ? AfPos() : af_pos(a, j0), s);
  usq[b] = af_tree8(s);
}

// ---- launch 4: the weights --------------------------------------------------------------------------

// The 8 lanes of block q of one tensor, as srk_opt1_block (srk_modes.h) runs them: lanes inside
// the tensor only.
template <int MODE, class P, class G, class S>
SRK_HD void af_apply_block(const AfHyper& h, const SrkRow& row, const AfAux& a, u64 q) {
  typedef SrkWeights<MODE, P> W;
  typedef typename W::X X;
  const i64 j = (i64)(q * 8 - row.off);  // the element at lane 0, in [-7, n)
  X* xb = W::xbuf(row);
  const srk_u32x4 none = {{0u, 0u, 0u, 0u}};
  srk_u32x4 dx[2] = {none, none};
  if (W::X_SR) W::xdraws(h, q, dx);
  const int k0 = j < 0 ? (int)-j : 0;  // the first lane inside the tensor
  AfPos pos = a.R == 0 ? AfPos() : af_pos(a, j + k0);
  for (int k = k0; k < 8; ++k) {
    const i64 jk = j + k;
    if (jk >= row.n) break;
    if (k > k0 && a.R != 0) af_next(a, &pos);
    const float g = srk_elem_f32(((const G*)row.g)[jk]) * h.grad_scale;
    const float u = a.scale * af_u0(g, af_vhat<S>(row, a, jk, pos), a.eps1sq);
    u16* yp = W::Y_WRITE ? W::ybuf(row) + jk : (u16*)0;
    u16 y = W::Y_READ ? *yp : (u16)0;
    X xv = xb[jk];
    W::store(h, u, srk_elem_f32(xv), srk_bf16_to_f32(y), W::xdraw(dx, k), xb + jk, &y);
    if (W::Y_WRITE) *yp = y;
  }
}

// Pair b of the launch (GPU: one thread each, its tensor found by binary search).
template <int MODE, class P, class G, class S>
SRK_HD void af_apply_pair(const u64* table, const u64* aux, i64 ntensors, const AfHyper& h, i64 b) {
  const i64 t = srk_row_find(table, ntensors, b);
  const SrkRow row = srk_row(table, t);
  af_apply_block<MODE, P, G, S>(h, row, af_aux(aux, t), row.off / 8 + (u64)(b - row.b0));
}

// The bodies of launches 3 and 4: one unit per thread on the GPU (and gpu-emu); on the CPU
// backends kernels/cpu/adafactor_tile.h, runs of 64 elements through SIMD loops and Philox tiles.
#ifdef SRK_GPU
template <class G, class S>
SRK_HD void af_usq_body(const u64* table, const u64* aux, i64 ntensors, i64 nunits, const AfHyper& h,
                        double* usq) {
  SRK_LOOP(b, nunits) { af_usq_unit<G, S>(table, aux, ntensors, h, usq, b); }
}
template <int MODE, class P, class G, class S>
SRK_HD void af_apply_body(const u64* table, const u64* aux, i64 ntensors, i64 nunits, const AfHyper& h) {
  SRK_LOOP(b, nunits) { af_apply_pair<MODE, P, G, S>(table, aux, ntensors, h, b); }
}
#else
#include "cpu/adafactor_tile.h"
#endif

// ---- kernels: af_<launch>_<mode>_g<grad>_s<stats> ------------------------------------------------
// Every launch: (table, aux, ntensors, nunits, seed, step, grad_scale, w, decay, lrwd, out pointers).

#define SRK_AF_HYPER                                                                               \
  SRK_FP_GUARD;                                                                                    \
  AfHyper h;                                                                                       \
  h.grad_scale = grad_scale; h.w = w; h.decay = decay; h.lrwd = lrwd; h.seed = seed; h.step = step;
#define SRK_AF_ARGS                                                                                \
  const u64 *table, const u64 *aux, i64 ntensors, i64 nunits, u64 seed, u64 step, float grad_scale, \
      float w, float decay, float lrwd

// Row sums: per mode (its weight type X) and gradient type.
#define SRK_AF_ROWS(stem, MODE, P, G, gname)                                                         \
  SRK_KERNEL void af_rows_##stem##_g##gname(SRK_AF_ARGS, double* xsq, double* gsq) {                \
    SRK_AF_HYPER                                                                                     \
    SRK_LOOP(b, nunits) { af_rows_unit<MODE, P, G>(table, aux, ntensors, h, xsq, gsq, b); }          \
  }
// The statistics, u0^2 sums and weights: per mode, gradient type and statistics type.
#define SRK_AF_STATE(stem, MODE, P, G, gname, S, sname)                                              \
  SRK_KERNEL void af_stats_##stem##_g##gname##_s##sname(SRK_AF_ARGS) {                              \
    SRK_AF_HYPER                                                                                     \
    SRK_LOOP(b, nunits) { af_stats_unit<MODE, P, G, S>(table, aux, ntensors, h, b); }                \
  }                                                                                                  \
  SRK_KERNEL void af_usq_##stem##_g##gname##_s##sname(SRK_AF_ARGS, double* usq) {                   \
    SRK_AF_HYPER                                                                                     \
    af_usq_body<G, S>(table, aux, ntensors, nunits, h, usq);                                         \
  }                                                                                                  \
  SRK_KERNEL void af_apply_##stem##_g##gname##_s##sname(SRK_AF_ARGS) {                              \
    SRK_AF_HYPER                                                                                     \
    af_apply_body<MODE, P, G, S>(table, aux, ntensors, nunits, h);                                   \
  }

#define SRK_AF_GRADS(stem, MODE, P, S, sname)                                                       \
  SRK_AF_STATE(stem, MODE, P, u16, bf16, S, sname)                                                 \
  SRK_AF_STATE(stem, MODE, P, float, f32, S, sname)
#define SRK_AF_MODE(stem, MODE, P)                                                                  \
  SRK_AF_ROWS(stem, MODE, P, u16, bf16)                                                            \
  SRK_AF_ROWS(stem, MODE, P, float, f32)

// The modes' statistics dtypes as srkern/precisions.py allows them: BF16 or FP32 in the BF16
// modes, FP32 in fp32-master and fp32.
SRK_AF_MODE(bf16_sr, MODE_SR, u16)
SRK_AF_GRADS(bf16_sr, MODE_SR, u16, u16, bf16)
SRK_AF_GRADS(bf16_sr, MODE_SR, u16, float, f32)
SRK_AF_MODE(bf16_nearest, MODE_NEAREST, u16)
SRK_AF_GRADS(bf16_nearest, MODE_NEAREST, u16, u16, bf16)
SRK_AF_GRADS(bf16_nearest, MODE_NEAREST, u16, float, f32)
SRK_AF_MODE(bf16_kahan, MODE_KAHAN, u16)
SRK_AF_GRADS(bf16_kahan, MODE_KAHAN, u16, u16, bf16)
SRK_AF_GRADS(bf16_kahan, MODE_KAHAN, u16, float, f32)
SRK_AF_MODE(fp32_master, MODE_MASTER, u16)
SRK_AF_GRADS(fp32_master, MODE_MASTER, u16, float, f32)
SRK_AF_MODE(fp32, MODE_FP32, float)
SRK_AF_GRADS(fp32, MODE_FP32, float, float, f32)

// Column sums depend on the gradient type only.
SRK_KERNEL void af_cols_gbf16(SRK_AF_ARGS, double* csq) {
  SRK_AF_HYPER
  SRK_LOOP(b, nunits) { af_cols_unit<u16>(table, aux, ntensors, h, csq, b); }
}
SRK_KERNEL void af_cols_gf32(SRK_AF_ARGS, double* csq) {
  SRK_AF_HYPER
  SRK_LOOP(b, nunits) { af_cols_unit<float>(table, aux, ntensors, h, csq, b); }
}
