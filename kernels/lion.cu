// lion.cu: one fused, multi-tensor Lion step (Chen et al. 2023, "Symbolic Discovery of
// Optimization Algorithms", Algorithm 2: decoupled weight decay) in five precision modes.
//
// What one launch computes. The tensor table (srk_table.h) lists the tensors; element j of
// tensor t has logical index offset[t] + j. For every element, in FP32, in this order (no
// contraction: every * and + below is one IEEE operation; m is the exp_avg buffer, read once):
//
//   g  = grad * grad_scale                 (grad_scale negated on the host for maximize=True)
//   c  = b1 * m + omb1 * g                 (omb1 = 1 - beta1, rounded once on the host)
//   s  = sign(c)                           +1 if c > 0, -1 if c < 0, +0 if c is +-0, NaN if NaN
//   u  = lr * s                            (exactly lr, -lr, +0 or NaN)
//   p' = p * decay - u                     (decay = 1 - lr * weight_decay, rounded once; lrwd =
//                                           lr * weight_decay for bf16-kahan: srk_modes.h)
//   m' = b2 * m + omb2 * g                 (from the old m; omb2 = 1 - beta2)
//
// sign(NaN) is NaN, so a NaN gradient or state makes the weight NaN (stored as the canonical NaN)
// instead of silently freezing it (torch.sign(nan) is 0 on torch 2.13's CPU): skipping such a
// step is found_inf's job. What is stored for m' is its rounding: a BF16 exp_avg is written
// with SR from stream EXP_AVG in bf16-sr and bf16-kahan, to nearest in bf16-nearest; FP32
// otherwise. The weight side of every mode (which buffer is the weight, the PARAM /
// COMPENSATION streams, the Kahan update, the BF16 copy of fp32-master, canonical NaNs) is
// srk_modes.h's SrkWeights, the code AdamW runs. fp16-sr is not offered (AdamW only).
// A set found_inf flag (*found_inf != 0) makes the launch write nothing.
//
// Random bits (contract v1): the 16-bit draw of element index i in stream S is
// srk_draw16(srk_draw_block(seed, step, S, i / 8), i % 8), S = PARAM (the bf16-sr weight),
// COMPENSATION (bf16-kahan) or EXP_AVG (a BF16 exp_avg). The unit of work is one (tensor,
// Philox block) pair, srk_opt1.h's srk_opt1_lanes, on GPU and CPU alike: grouping, threads and
// backend never change a bit.
#include "srk_platform.h"
#include "srk_modes.h"
#include "srk_opt1.h"

struct LionHyper {
  float b1, omb1, b2, omb2, lr, decay, lrwd, grad_scale;
  u64 seed, step;
};

// sign(c) as above: two comparisons and a select, the same on every backend (c == c is false
// only for NaN, which is passed through).
SRK_HD float lion_sign(float c) {
  return c > 0.0f ? 1.0f : c < 0.0f ? -1.0f : c == c ? 0.0f : c;
}

template <int MODE, class P, class G_, class S_>
struct LionOpt {
  typedef SrkWeights<MODE, P> W;
  typedef G_ G;
  typedef S_ S;
  typedef LionHyper H;
  enum { HAS_STATE = 1, S_SR = W::X_SR && sizeof(S_) == 2 };

  // The step u from the raw gradient; *m the FP32 exp_avg in and out. x is not read (the weight
  // decay is decoupled: decay in the weight side).
  SRK_HD static float lane(const LionHyper& h, float graw, float, float* m) {
    float g = graw * h.grad_scale;
    float m0 = *m;
    float c = h.b1 * m0 + h.omb1 * g;
    *m = h.b2 * m0 + h.omb2 * g;
    return h.lr * lion_sign(c);
  }
};

// ---- kernels: lion_<mode>_g<grad>_s<state> ----------------------------------------------------

#define SRK_LION_KERNEL(name, MODE, P, G, S)                                                           \
  SRK_KERNEL void name(const u64* table, i64 ntensors, i64 npairs, u64 seed, u64 step, float b1,       \
                       float omb1, float b2, float omb2, float lr, float decay, float lrwd,            \
                       float grad_scale, const float* found_inf) {                                     \
    SRK_FP_GUARD; /* host builds: a subnormal found_inf is non-zero also under the caller's DAZ */     \
    if (found_inf != 0 && *found_inf != 0.0f) return;                                                  \
    LionHyper h;                                                                                       \
    h.b1 = b1; h.omb1 = omb1; h.b2 = b2; h.omb2 = omb2; h.lr = lr; h.decay = decay; h.lrwd = lrwd;     \
    h.grad_scale = grad_scale; h.seed = seed; h.step = step;                                           \
    srk_opt1_body<LionOpt<MODE, P, G, S> >(table, ntensors, npairs, h);                                \
  }

// Every gradient dtype (BF16, FP32) with every state dtype a mode allows (srkern/precisions.py).
#define SRK_LION_GRADS(stem, MODE, P, S, sname)                               \
  SRK_LION_KERNEL(lion_##stem##_gbf16_s##sname, MODE, P, u16, S)              \
  SRK_LION_KERNEL(lion_##stem##_gf32_s##sname, MODE, P, float, S)
#define SRK_LION_BF16_MODE(stem, MODE)                                        \
  SRK_LION_GRADS(stem, MODE, u16, u16, bf16)                                  \
  SRK_LION_GRADS(stem, MODE, u16, float, f32)

SRK_LION_BF16_MODE(bf16_sr, MODE_SR)
SRK_LION_BF16_MODE(bf16_nearest, MODE_NEAREST)
SRK_LION_BF16_MODE(bf16_kahan, MODE_KAHAN)
SRK_LION_GRADS(fp32_master, MODE_MASTER, u16, float, f32)
SRK_LION_GRADS(fp32, MODE_FP32, float, float, f32)
