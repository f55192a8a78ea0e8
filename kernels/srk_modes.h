// srk_modes.h: the precision modes of the fused optimizers (adamw.cu, sgd.cu, lion.cu), written
// once: which buffer a mode updates, which random streams it draws for which buffer, the stored
// form of every result, and the weight write p' = p * decay - u from an optimizer's step u.
// Each optimizer file adds only its own state math (AdamW's moments, SGD's momentum, Lion's
// interpolation and sign) and calls the weight side here, so a mode means the same buffers,
// streams and roundings in every optimizer.
//
// The modes (srkern/precisions.py holds the table Python checks buffers against):
//   bf16-sr       BF16 p written with SR (stream PARAM); BF16 states written with SR
//   bf16-nearest  the same buffers, every BF16 write round-to-nearest-even (the baseline)
//   bf16-kahan    BF16 p with a BF16 compensation c: y = (-lrwd * p - u) + c, p' = rn(p + y),
//                 c' = y - (p' - p) (exact difference) written with SR (stream COMPENSATION);
//                 BF16 states as in bf16-sr
//   fp32-master   FP32 master weight w (p above is w), FP32 states; the BF16 model copy = rn(w')
//   fp32          FP32 p and states
//   fp16-sr       FP16 p written with the FP16 SR rule and 32-bit draws (stream PARAM_FP16)
// States (moments, momentum buffers) stored in BF16 are written with SR exactly where the
// weight side draws (X_SR below; AdamW's MV_SR, the single-state optimizers' S_SR).
//
// The body of the single-state optimizers (SGD, Lion) over these is srk_opt1.h.
#pragma once
#include "srk_platform.h"
#include "srk_philox.h"
#include "srk_round.h"
#include "srk_table.h"

// ---- FP16 elements ----------------------------------------------------------------------------

// An FP16 value as its bit pattern, a type of its own so that overloads (srk_elem_f32,
// srk_store) tell it from a BF16 u16. Trivially copyable, 2 bytes: srk_table.h's 16-byte
// accesses (SrkPacked) and lane accesses take it as they take u16; (SrkHalf)0 is +0.
struct SrkHalf {
  u16 bits;
  SrkHalf() = default;
  SRK_HD explicit SrkHalf(int zero) : bits((u16)zero) {}
};
SRK_HD float srk_elem_f32(SrkHalf x) { return SrkF16::decode(x.bits); }  // exact

// ---- the stored form of a result --------------------------------------------------------------

// The stored form of an FP32 result x, for every buffer (contract v1.1: a NaN is stored as the
// canonical FP32 0x7fc00000 or BF16 0x7fc0, whatever NaN x is): every store goes through these
// two, so x86 (NaN payloads and signs kept) and GPUs (a NaN of their own) store the same bits.
// BF16: SR with draw r, or to nearest when !sr. A rounding maps NaN to NaN and nothing else to
// NaN, so testing the 16-bit result equals canonicalising x first, and it is cheaper on 16-bit
// SIMD lanes (one thread of an AVX-512 Xeon, bf16-sr AdamW step: within the noise, 0-5%, of no
// test at all, against about +15% for an FP32 test before each of the three roundings).
SRK_HD u16 srk_store_bf16(float x, u32 r, bool sr) {
  u16 t = sr ? srk_bf16_sr(x, r, 0) : srk_bf16_rn(x, 0);
  return (t & 0x7fffu) > 0x7f80u ? (u16)SRK_NAN_BF16 : t;
}
SRK_HD float srk_store_f32(float x) { return srk_canon_f32(x); }
// FP16: SrkF16::encode with a 32-bit draw r (SR; to nearest when !sr), no saturation: the bits
// srkern.cast(x, "float16", rounding=...) gives x with that draw. encode's NaN is the sign plus
// 0x7e00, and it makes nothing else NaN, so clearing the sign of a NaN result canonicalises.
#define SRK_NAN_F16 0x7e00u
SRK_HD SrkHalf srk_store_f16(float x, u32 r, bool sr) {
  u32 t = SrkF16::encode(x, r, sr, 0);
  SrkHalf h;
  h.bits = (u16)((t & 0x7fffu) > 0x7c00u ? SRK_NAN_F16 : t);
  return h;
}

// The stored form in a buffer of the type *out points to (the draw is ignored for FP32; it is a
// 16-bit draw for BF16, a 32-bit one for FP16).
SRK_HD void srk_store(float x, u32 r, bool sr, u16* out) { *out = srk_store_bf16(x, r, sr); }
SRK_HD void srk_store(float x, u32, bool, float* out) { *out = srk_store_f32(x); }
SRK_HD void srk_store(float x, u32 r, bool sr, SrkHalf* out) { *out = srk_store_f16(x, r, sr); }

// ---- the weight write: pure FP32 functions of the step u --------------------------------------
// H is an optimizer's hyper-parameter struct with FP32 members decay (1 - lr * weight_decay,
// rounded once on the host; 1 where weight decay is not decoupled) and lrwd (lr * weight_decay;
// 0 where not decoupled).

// Plain weights: p' = p * decay - u.
template <class H>
SRK_HD float srk_p_math(const H& h, float p, float u) { return p * h.decay - u; }

// Kahan-summed BF16 weight: returns the new compensation (FP32), *pn the new BF16 weight (stored
// form: a NaN weight is 0x7fc0, and then the compensation is NaN too).
template <class H>
SRK_HD float srk_kahan_math(const H& h, float p, float c, float u, u16* pn) {
  float y = (-h.lrwd * p - u) + c;
  *pn = srk_store_bf16(p + y, 0u, false);
  return y - (srk_bf16_to_f32(*pn) - p);  // exact difference of two nearby BF16 values
}

// ---- the modes: the weight side's buffers, random streams and per-lane write ------------------

enum { MODE_SR = 0, MODE_NEAREST = 1, MODE_KAHAN = 2, MODE_MASTER = 3, MODE_FP32 = 4,
       MODE_F16_SR = 5 };

template <bool C, class A, class B> struct SrkPick { typedef A T; };
template <class A, class B> struct SrkPick<false, A, B> { typedef B T; };

// MODE: one of the above; P: stored weight type. Every path of every optimizer (GPU full and
// partial blocks, the CPU's runs) reads these members and calls store().
template <int MODE, class P>
struct SrkWeights {
  // X is read and written (the weights; in fp32-master the FP32 master), Y is a second BF16
  // buffer (fp32-master: the model copy, written only; bf16-kahan: the compensation, read and
  // written).
  typedef typename SrkPick<MODE == MODE_MASTER, float, P>::T X;
  enum { Y_READ = MODE == MODE_KAHAN, Y_WRITE = MODE == MODE_KAHAN || MODE == MODE_MASTER };
  SRK_HD static X* xbuf(const SrkRow& r) { return MODE == MODE_MASTER ? (X*)r.w : (X*)r.p; }
  SRK_HD static u16* ybuf(const SrkRow& r) { return MODE == MODE_MASTER ? (u16*)r.p : r.c; }

  // The random streams of the weight side, one per buffer written with SR; a stream not listed
  // is never drawn: bf16-sr and fp16-sr the weight (PARAM, PARAM_FP16), bf16-kahan the
  // compensation (COMPENSATION; its weight is written to nearest). An optimizer's BF16 states
  // draw where X_SR (their streams are the optimizer's: EXP_AVG, EXP_AVG_SQ).
  // X_DRAW32: X's draws are 32 bits wide (the FP16 weight of fp16-sr: element i draws word i % 4
  // of Philox block i / 4, so the 8 lanes of block q take blocks 2q and 2q + 1); else 16 bits.
  // (Enumerators, not static members: those would be emitted as device globals.)
  enum { X_SR = MODE == MODE_SR || MODE == MODE_KAHAN || MODE == MODE_F16_SR,
         X_DRAW32 = MODE == MODE_F16_SR };
  enum : u32 { X_STREAM = MODE == MODE_KAHAN ? SRK_STREAM_COMPENSATION
                         : MODE == MODE_F16_SR ? SRK_STREAM_PARAM_FP16 : SRK_STREAM_PARAM };

  // The X_STREAM words of block q's 8 lanes (d[1] used only where X_DRAW32), and lane k's draw.
  template <class H>
  SRK_HD static void xdraws(const H& h, u64 q, srk_u32x4* d) {
    if (X_DRAW32) {
      d[0] = srk_draw_block(h.seed, h.step, X_STREAM, 2 * q);
      d[1] = srk_draw_block(h.seed, h.step, X_STREAM, 2 * q + 1);
    } else {
      d[0] = srk_draw_block(h.seed, h.step, X_STREAM, q);
    }
  }
  SRK_HD static u32 xdraw(const srk_u32x4* d, int k) {
    return X_DRAW32 ? d[k >> 2].w[k & 3] : srk_draw16(d[0], k);
  }

  // The weight write from the step u (p' = p * decay - u): x is X's value, y Y's (read only in
  // bf16-kahan), r the lane's draw of X_STREAM (ignored unless X_SR); *xs, *ys the stored forms
  // (*ys set only where Y_WRITE).
  template <class H>
  SRK_HD static void store(const H& h, float u, float x, float y, u32 r, X* xs, u16* ys) {
    if constexpr (MODE == MODE_MASTER) {
      float w = srk_p_math(h, x, u);
      *xs = srk_store_f32(w);
      *ys = srk_store_bf16(w, 0u, false);
    } else if constexpr (MODE == MODE_KAHAN) {
      float c = srk_kahan_math(h, x, y, u, xs);
      *ys = srk_store_bf16(c, r, true);
    } else {
      srk_store(srk_p_math(h, x, u), r, X_SR, xs);
    }
  }
};

// ---- lanes of one (tensor, block) pair --------------------------------------------------------

// The 8 lanes of block q (elements j .. j + 7 of the tensor, j = q * 8 - off): all of them when
// FULL (16-byte accesses where aligned), else only those inside the tensor (the head and tail
// blocks of a tensor; the other lanes compute on zeros and are not stored).
template <bool FULL, class T>
SRK_HD void srk_get_block(const T* a, i64 j, i64 n, T* x) {
  if constexpr (FULL) srk_get8(a + j, x); else srk_get_lanes(a, j, n, x);
}
template <bool FULL, class T>
SRK_HD void srk_put_block(T* a, i64 j, i64 n, const T* x) {
  if constexpr (FULL) srk_put8(a + j, x); else srk_put_lanes(a, j, n, x);
}
