// sgd.cu: one fused, multi-tensor SGD step (momentum, dampening, Nesterov, coupled weight decay,
// as torch.optim.SGD defines them) in five precision modes.
//
// What one launch computes. The tensor table (srk_table.h) lists the tensors; element j of
// tensor t has logical index offset[t] + j. For every element, in FP32, in this order (no
// contraction: every * and + below is one IEEE operation):
//
//   g  = grad * grad_scale                 (grad_scale negated on the host for maximize=True:
//                                           -(grad * s) and grad * (-s) are the same FP32 value)
//   g  = g + wd * p                        only if wd != 0 (torch adds nothing then: no -0 + 0,
//                                           no 0 * Inf); p is X's value (fp32-master: the master)
//   with momentum (kernels sgd_*_s<state>; the buffer b in the table's m column):
//     b = g                                on the first step (first != 0: torch's fresh buffer,
//                                           a copy of g, no dampening)
//     b = momentum * b + omd * g           otherwise (omd = 1 - dampening, rounded once on the host)
//     g = nesterov ? g + momentum * b : b
//   u  = lr * g
//   p' = p * decay - u                     with decay = 1 and lrwd = 0 (weight decay is coupled,
//                                           above): p * 1 is p exactly, so p' = p - lr * g,
//                                           torch's param.add_(grad, alpha=-lr) without an FMA
//
// The update uses the FP32 buffer b; what is stored is its rounding (a BF16 buffer is written
// with SR from stream EXP_AVG in bf16-sr and bf16-kahan, to nearest in bf16-nearest). Without
// momentum (kernels sgd_*_snone) there is no buffer: the m column is never read or written.
// The weight side of every mode (which buffer is the weight, the PARAM / COMPENSATION streams,
// the Kahan update, the BF16 copy of fp32-master, canonical NaNs) is srk_modes.h's SrkWeights,
// the same code AdamW runs; in bf16-kahan y = (-0 * p - u) + c, so as in AdamW's bf16-kahan
// with no weight decay a non-finite weight becomes NaN. fp16-sr is not offered (AdamW only).
// A set found_inf flag (*found_inf != 0) makes the launch write nothing.
//
// Random bits (contract v1): the 16-bit draw of element index i in stream S is
// srk_draw16(srk_draw_block(seed, step, S, i / 8), i % 8), S = PARAM (the bf16-sr weight),
// COMPENSATION (the bf16-kahan compensation) or EXP_AVG (a BF16 momentum buffer). The unit of
// work is one (tensor, Philox block) pair, srk_opt1.h's srk_opt1_lanes, on GPU and CPU alike:
// grouping, threads and backend never change a bit.
//
// References: torch/optim/sgd.py (_single_tensor_sgd: the order above); Sutskever et al. 2013
// (Nesterov momentum as torch writes it).
#include "srk_platform.h"
#include "srk_modes.h"
#include "srk_opt1.h"

struct SgdHyper {
  float lr, momentum, omd, wd, grad_scale;
  float decay, lrwd;  // the weight side's (srk_modes.h): 1 and 0, weight decay being coupled
  int nesterov, first;
  u64 seed, step;
};

// MOM: the launch has momentum buffers (S their type); without, S is unused.
template <int MODE, class P, class G_, class S_, bool MOM>
struct SgdOpt {
  typedef SrkWeights<MODE, P> W;
  typedef G_ G;
  typedef S_ S;
  typedef SgdHyper H;
  enum { HAS_STATE = MOM, S_SR = MOM && W::X_SR && sizeof(S_) == 2 };

  // The step u from the raw gradient and the weight x; *b the FP32 momentum buffer in and out.
  SRK_HD static float lane(const SgdHyper& h, float graw, float x, float* b) {
    float g = graw * h.grad_scale;
    if (h.wd != 0.0f) g = g + h.wd * x;
    if (MOM) {
      // Both sides formed, then one picked: a select, which the CPU's 64-element loops vectorise
      // (a conditional read of *b did not); the same value either way.
      const float later = h.momentum * *b + h.omd * g;
      *b = h.first ? g : later;
      const float nest = g + h.momentum * *b;
      g = h.nesterov ? nest : *b;
    }
    return h.lr * g;
  }
};

// ---- kernels: sgd_<mode>_g<grad>_s<state> (s: bf16, f32 or none) --------------------------------

#define SRK_SGD_KERNEL(name, MODE, P, G, S, MOM)                                                       \
  SRK_KERNEL void name(const u64* table, i64 ntensors, i64 npairs, u64 seed, u64 step, float lr,       \
                       float momentum, float omd, float wd, float grad_scale, int nesterov, int first, \
                       const float* found_inf) {                                                       \
    SRK_FP_GUARD; /* host builds: a subnormal found_inf is non-zero also under the caller's DAZ */     \
    if (found_inf != 0 && *found_inf != 0.0f) return;                                                  \
    SgdHyper h;                                                                                        \
    h.lr = lr; h.momentum = momentum; h.omd = omd; h.wd = wd; h.grad_scale = grad_scale;               \
    h.decay = 1.0f; h.lrwd = 0.0f; h.nesterov = nesterov; h.first = first;                             \
    h.seed = seed; h.step = step;                                                                      \
    srk_opt1_body<SgdOpt<MODE, P, G, S, MOM> >(table, ntensors, npairs, h);                            \
  }

// Every gradient dtype (BF16, FP32) with every buffer dtype a mode allows (srkern/precisions.py).
#define SRK_SGD_GRADS(stem, MODE, P, S, sname, MOM)                           \
  SRK_SGD_KERNEL(sgd_##stem##_gbf16_s##sname, MODE, P, u16, S, MOM)           \
  SRK_SGD_KERNEL(sgd_##stem##_gf32_s##sname, MODE, P, float, S, MOM)
#define SRK_SGD_BF16_MODE(stem, MODE)                                         \
  SRK_SGD_GRADS(stem, MODE, u16, u16, bf16, true)                             \
  SRK_SGD_GRADS(stem, MODE, u16, float, f32, true)                            \
  SRK_SGD_GRADS(stem, MODE, u16, float, none, false)

SRK_SGD_BF16_MODE(bf16_sr, MODE_SR)
SRK_SGD_BF16_MODE(bf16_nearest, MODE_NEAREST)
SRK_SGD_BF16_MODE(bf16_kahan, MODE_KAHAN)
SRK_SGD_GRADS(fp32_master, MODE_MASTER, u16, float, f32, true)
SRK_SGD_GRADS(fp32_master, MODE_MASTER, u16, float, none, false)
SRK_SGD_GRADS(fp32, MODE_FP32, float, float, f32, true)
SRK_SGD_GRADS(fp32, MODE_FP32, float, float, none, false)
