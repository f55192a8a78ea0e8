// adamw.cu: one fused, multi-tensor AdamW step in six precision modes.
//
// What one launch computes. A table (one row per tensor, srk_table.h) lists the tensors; element
// j of tensor t has logical index offset[t] + j in the flat vector of all parameters. For every
// element, in FP32, in this order (no contraction: every * and + below is
// one IEEE operation; sqrtf and / are correctly rounded on both backends):
//
//   g  = grad * grad_scale
//   m  = b1 * m + omb1 * g                         (omb1 = 1 - beta1, rounded once on the host)
//   v  = b2 * v + omb2 * (g * g)                   (omb2 = 1 - beta2)
//   d  = sqrtf(v) * inv_sqrt_bc2 + eps             (inv_sqrt_bc2 = 1 / sqrt(1 - beta2^step))
//   u  = (step_size * m) / d                       (step_size = lr / (1 - beta1^step))
//   p' = p * decay - u                             (decay = 1 - lr * weight_decay; decoupled)
//
// The update uses the FP32 m and v; what is stored is their rounding (BF16 moments). The
// step-dependent scalars are computed once on the host in float64 and rounded to FP32
// (srkern/adamw.py, _scalars), so lr and step change every step without recompiling.
// The modes differ only in what is stored and how it is rounded (srk_modes.h, where SGD and Lion
// take the same weight side):
//   bf16-sr       BF16 p; m, v BF16 (or FP32); every BF16 write stochastically rounded
//   bf16-nearest  the same buffers, every BF16 write round-to-nearest-even (the baseline)
//   bf16-kahan    BF16 p with a BF16 compensation c (lrwd = lr * weight_decay):
//                 y = (-lrwd * p - u) + c, p' = rn(p + y), c' = y - (p' - p) (exact difference),
//                 c' written with SR (stream COMPENSATION); m, v as in bf16-sr
//   fp32-master   FP32 master weight w (p above is w), FP32 m, v; the BF16 model copy = rn(w')
//   fp32          FP32 p, m, v
//   fp16-sr       FP16 p written with SR (the FP16 rule of srk_round.h, SrkF16::encode without
//                 saturation, exactly as srkern.cast(x, float16, rounding="stochastic") rounds x
//                 with the same draw: subnormals kept, finite overflow to +-Inf); m, v FP32 by
//                 default, or BF16 written with SR as in bf16-sr. Gradients FP16, BF16 or FP32.
// A set found_inf flag (*found_inf != 0) makes the launch write nothing.
//
// NaN and subnormals (contract v1.1): every stored value that is NaN (weights, moments, master
// weights, compensation; FP32, BF16 and FP16) is the canonical quiet NaN, FP32 0x7fc00000 / BF16
// 0x7fc0 / FP16 0x7e00, whatever NaN the inputs held (srk_store_bf16 / _f32 / _f16 of srk_modes.h
// form every stored value, on every path). Subnormals are never flushed: host builds run under
// SrkFpEnv (srk_platform.h) on the calling thread from kernel entry and on every OpenMP thread, whatever
// FTZ/DAZ the caller set.
//
// Random bits (contract v1): the draw for element index i of stream S is, for a BF16 write,
// the 16-bit draw srk_draw16(srk_draw_block(seed, step, S, i / 8), i % 8), and for the FP16
// weight of fp16-sr the 32-bit draw srk_draw_block(seed, step, PARAM_FP16, i / 4).w[i % 4]:
// the contract's draw for an FP16 target, the very draw srkern.cast(..., offset=i,
// stream=PARAM_FP16) would give index i. PARAM_FP16 is its own stream because 32-bit draws of
// stream PARAM would be the words whose halves BF16 weights at indices 2i and 2i+1 draw (one
// optimizer may hold both). Which streams a mode draws, and for which buffer, is AdamwMode below
// (its weight side SrkWeights of srk_modes.h, shared with sgd.cu and lion.cu): the one list every
// path draws by. The unit of work is 8 logical indices *of one tensor* (a
// (tensor, block) pair, block q = i / 8): one Philox block per 16-bit stream, Philox blocks 2q
// and 2q + 1 for the FP16 weight's stream. How tensors are grouped into launches, which thread
// runs a block, CPU or GPU, never changes a bit.
//
// One body: adamw_block updates the 8 lanes of one (tensor, block) pair, the mode's logic written
// once per lane (AdamwMode::moments, ::weights). The GPU runs it in one thread per pair, found by
// binary search of the table's first-unit column, with 16-byte loads and stores (SrkPacked) for a
// full block and lane-by-lane accesses for the partial blocks at tensor ends. The CPU backends run
// kernels/cpu/adamw_tile.h: the same per-lane functions on runs of 64 elements with SIMD Philox,
// and adamw_block itself for every block outside such a run. fp16-sr takes that same tile with
// the same per-lane functions (FP16 in and out through SrkF16's decode and encode, which g++
// does not vectorise: correctness first, no separate SIMD FP16 path).
//
// References: Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (AdamW);
// Ozkara, Yu, Park, AISTATS 2025 (BF16 + SR AdamW); Zamirai et al. 2020 (Kahan-summed BF16);
// llm.c's llmc/adamw.cuh (layout of a fused AdamW kernel).
#include "srk_platform.h"
#include "srk_philox.h"
#include "srk_round.h"
#include "srk_table.h"
#include "srk_modes.h"

// ---- hyper-parameters (FP32, from the host) ---------------------------------------------------

struct AdamwHyper {
  float b1, omb1, b2, omb2, step_size, inv_sqrt_bc2, eps, decay, lrwd, grad_scale;
  u64 seed, step;
};

// ---- the arithmetic: pure FP32 functions, the one place the update is written ----------------

// m, v <- new moments from the raw gradient.
SRK_HD void adamw_moments_math(const AdamwHyper& h, float graw, float* m, float* v) {
  float g = graw * h.grad_scale;
  *m = h.b1 * *m + h.omb1 * g;
  *v = h.b2 * *v + h.omb2 * (g * g);
}

// The step u from the FP32 first moment m and sv = sqrtf(v).
SRK_HD float adamw_u_math(const AdamwHyper& h, float m, float sv) {
  float d = sv * h.inv_sqrt_bc2 + h.eps;
  return (h.step_size * m) / d;
}

// ---- the modes: the weight side from srk_modes.h, the moments here -----------------------------

// MODE: one of srk_modes.h's modes; P: stored weight type; S: moment type. Every path (the GPU's
// full and partial blocks, the CPU's 64-element runs) reads these members and calls these two
// functions. The weight side (X, Y, xbuf, ybuf, X_SR, X_DRAW32, X_STREAM, xdraws, xdraw and the
// write itself) is SrkWeights, shared with sgd.cu and lion.cu. The update is split around the
// square root so that the CPU path can take it 8 lanes at a time with an explicit vsqrtps (g++
// will not vectorise sqrtf while it may set errno); both halves and the square root are the
// same IEEE operations on either backend.
template <int MODE, class P, class S>
struct AdamwMode : SrkWeights<MODE, P> {
  typedef SrkWeights<MODE, P> W;
  // The moments' streams: EXP_AVG and EXP_AVG_SQ, in bf16-sr, bf16-kahan and fp16-sr with BF16
  // moments (wherever the weight side draws, for BF16 moments).
  enum { MV_SR = W::X_SR && sizeof(S) == 2 };

  // New moments from the gradient g: *m, *v in FP32 for the update, *ms, *vs their stored
  // forms; rm, rv the lane's draws of EXP_AVG and EXP_AVG_SQ (ignored unless MV_SR).
  SRK_HD static void moments(const AdamwHyper& h, float g, float* m, float* v, S* ms, S* vs,
                             u32 rm, u32 rv) {
    adamw_moments_math(h, g, m, v);
    srk_store(*m, rm, MV_SR, ms);
    srk_store(*v, rv, MV_SR, vs);
  }

  // The weight side from the FP32 moment m and sv = sqrtf(v): x is X's value, y Y's (read only
  // in bf16-kahan), r the lane's draw of X_STREAM (ignored unless X_SR); *xs, *ys the stored
  // forms (*ys set only where Y_WRITE).
  SRK_HD static void weights(const AdamwHyper& h, float m, float sv, float x, float y, u32 r,
                             typename W::X* xs, u16* ys) {
    W::store(h, adamw_u_math(h, m, sv), x, y, r, xs, ys);
  }
};

// ---- the shared body: one (tensor, block) pair ------------------------------------------------

template <int MODE, class P, class G, class S, bool FULL>
SRK_HD void adamw_block(const AdamwHyper& h, const SrkRow& row, u64 q) {
  typedef AdamwMode<MODE, P, S> M;
  typedef typename M::X X;
  // The tensor element at lane 0, in [-7, n): exact modulo 2^64, so nothing here wraps for a
  // tensor that ends in the last block of the index space (q * 8 + 8 would).
  const i64 j = (i64)(q * 8 - row.off), n = row.n;
  X* xb = M::xbuf(row);
  G g[8];
  S m[8], v[8];
  X x[8];
  u16 y[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  srk_get_block<FULL>((const G*)row.g, j, n, g);
  srk_get_block<FULL>((const S*)row.m, j, n, m);
  srk_get_block<FULL>((const S*)row.v, j, n, v);
  srk_get_block<FULL>((const X*)xb, j, n, x);
  if (M::Y_READ) srk_get_block<FULL>((const u16*)M::ybuf(row), j, n, y);
  const srk_u32x4 none = {{0u, 0u, 0u, 0u}};
  srk_u32x4 dx[2] = {none, none};
  if (M::X_SR) M::xdraws(h, q, dx);
  const srk_u32x4 dm = M::MV_SR ? srk_draw_block(h.seed, h.step, SRK_STREAM_EXP_AVG, q) : none;
  const srk_u32x4 dv = M::MV_SR ? srk_draw_block(h.seed, h.step, SRK_STREAM_EXP_AVG_SQ, q) : none;
  #pragma unroll
  for (int k = 0; k < 8; ++k) {
    float mk = srk_elem_f32(m[k]), vk = srk_elem_f32(v[k]);
    M::moments(h, srk_elem_f32(g[k]), &mk, &vk, &m[k], &v[k], srk_draw16(dm, k), srk_draw16(dv, k));
    M::weights(h, mk, sqrtf(vk), srk_elem_f32(x[k]), srk_bf16_to_f32(y[k]), M::xdraw(dx, k), &x[k],
               &y[k]);
  }
  srk_put_block<FULL>((S*)row.m, j, n, m);
  srk_put_block<FULL>((S*)row.v, j, n, v);
  srk_put_block<FULL>(xb, j, n, x);
  if (M::Y_WRITE) srk_put_block<FULL>(M::ybuf(row), j, n, y);
}

#ifdef SRK_GPU
// ---- GPU: one thread per (tensor, block) pair -------------------------------------------------

template <int MODE, class P, class G, class S>
SRK_HD void adamw_body(const u64* table, i64 ntensors, i64 npairs, const AdamwHyper& h) {
  SRK_LOOP(b, npairs) {
    SrkRow row = srk_row(table, srk_row_find(table, ntensors, b));
    u64 q = row.off / 8 + (u64)(b - row.b0);
    i64 j = (i64)(q * 8 - row.off);
    if (j >= 0 && j + 8 <= row.n) adamw_block<MODE, P, G, S, true>(h, row, q);
    else adamw_block<MODE, P, G, S, false>(h, row, q);
  }
}
#else
#include "cpu/adamw_tile.h"
#endif

// ---- kernels: adamw_<mode>_g<grad>_s<state> -----------------------------------------------------

#define SRK_ADAMW_KERNEL(name, MODE, P, G, S)                                                          \
  SRK_KERNEL void name(const u64* table, i64 ntensors, i64 npairs, u64 seed, u64 step, float b1,       \
                       float omb1, float b2, float omb2, float step_size, float inv_sqrt_bc2,          \
                       float eps, float decay, float lrwd, float grad_scale, const float* found_inf) { \
    SRK_FP_GUARD; /* host builds: a subnormal found_inf is non-zero also under the caller's DAZ */     \
    if (found_inf != 0 && *found_inf != 0.0f) return;                                                  \
    AdamwHyper h;                                                                                      \
    h.b1 = b1; h.omb1 = omb1; h.b2 = b2; h.omb2 = omb2; h.step_size = step_size;                       \
    h.inv_sqrt_bc2 = inv_sqrt_bc2; h.eps = eps; h.decay = decay; h.lrwd = lrwd;                        \
    h.grad_scale = grad_scale; h.seed = seed; h.step = step;                                           \
    adamw_body<MODE, P, G, S>(table, ntensors, npairs, h);                                             \
  }

SRK_ADAMW_KERNEL(adamw_bf16_sr_gbf16_sbf16, MODE_SR, u16, u16, u16)
SRK_ADAMW_KERNEL(adamw_bf16_sr_gf32_sbf16, MODE_SR, u16, float, u16)
SRK_ADAMW_KERNEL(adamw_bf16_sr_gbf16_sf32, MODE_SR, u16, u16, float)
SRK_ADAMW_KERNEL(adamw_bf16_sr_gf32_sf32, MODE_SR, u16, float, float)
SRK_ADAMW_KERNEL(adamw_bf16_nearest_gbf16_sbf16, MODE_NEAREST, u16, u16, u16)
SRK_ADAMW_KERNEL(adamw_bf16_nearest_gf32_sbf16, MODE_NEAREST, u16, float, u16)
SRK_ADAMW_KERNEL(adamw_bf16_nearest_gbf16_sf32, MODE_NEAREST, u16, u16, float)
SRK_ADAMW_KERNEL(adamw_bf16_nearest_gf32_sf32, MODE_NEAREST, u16, float, float)
SRK_ADAMW_KERNEL(adamw_bf16_kahan_gbf16_sbf16, MODE_KAHAN, u16, u16, u16)
SRK_ADAMW_KERNEL(adamw_bf16_kahan_gf32_sbf16, MODE_KAHAN, u16, float, u16)
SRK_ADAMW_KERNEL(adamw_bf16_kahan_gbf16_sf32, MODE_KAHAN, u16, u16, float)
SRK_ADAMW_KERNEL(adamw_bf16_kahan_gf32_sf32, MODE_KAHAN, u16, float, float)
SRK_ADAMW_KERNEL(adamw_fp32_master_gbf16_sf32, MODE_MASTER, u16, u16, float)
SRK_ADAMW_KERNEL(adamw_fp32_master_gf32_sf32, MODE_MASTER, u16, float, float)
SRK_ADAMW_KERNEL(adamw_fp32_gbf16_sf32, MODE_FP32, float, u16, float)
SRK_ADAMW_KERNEL(adamw_fp32_gf32_sf32, MODE_FP32, float, float, float)
SRK_ADAMW_KERNEL(adamw_fp16_sr_gf16_sf32, MODE_F16_SR, SrkHalf, SrkHalf, float)
SRK_ADAMW_KERNEL(adamw_fp16_sr_gbf16_sf32, MODE_F16_SR, SrkHalf, u16, float)
SRK_ADAMW_KERNEL(adamw_fp16_sr_gf32_sf32, MODE_F16_SR, SrkHalf, float, float)
SRK_ADAMW_KERNEL(adamw_fp16_sr_gf16_sbf16, MODE_F16_SR, SrkHalf, SrkHalf, u16)
SRK_ADAMW_KERNEL(adamw_fp16_sr_gbf16_sbf16, MODE_F16_SR, SrkHalf, u16, u16)
SRK_ADAMW_KERNEL(adamw_fp16_sr_gf32_sbf16, MODE_F16_SR, SrkHalf, float, u16)
