// srk_round.h: per-element rounding from FP32 to BF16, FP16, FP8 e4m3fn and FP8 e5m2, and the
// exact upcasts back to FP32. Integer arithmetic only, so NVRTC and g++ agree bit for bit.
//
// Stochastic rounding (contract v1): with T = |x| truncated onto the target grid and U the next
// grid value above, D = (|x| - T) / (U - T), round away from zero iff
// floor(D * 2^bits) + r >= 2^bits for a `bits`-wide draw r (16 for BF16, 32 otherwise).
// Round-to-nearest-even is the same machinery with a fixed threshold of one half.
//
// Specials: NaN -> quiet NaN with its sign; +-Inf -> +-Inf where the format has one (e4m3fn has
// none: NaN, or +-max finite with saturate); finite overflow -> +-Inf (e4m3fn: NaN), or +-max
// finite with saturate; -0 stays -0.
#pragma once
#include "srk_platform.h"

// Random-stream ids of contract v1: one purpose each, so no two roundings share a draw.
// srkern/_contract.py reads this list; add new purposes at the end.
#define SRK_STREAM_CAST 0u
#define SRK_STREAM_PARAM 1u
#define SRK_STREAM_EXP_AVG 2u
#define SRK_STREAM_EXP_AVG_SQ 3u
#define SRK_STREAM_COMPENSATION 4u
#define SRK_STREAM_COLLECTIVE 5u
#define SRK_STREAM_WIRE 6u  // FP32 gradients SR-rounded to BF16 before they travel (reduce-scatter)
#define SRK_STREAM_PARAM_FP16 7u  // fp16-sr's FP16 weights (32-bit draws: a stream of their own, so
                                  // that no BF16 weight at index 2i or 2i+1 shares their words)
#define SRK_STREAM_ACCUM 8u  // srkern.add_: acc += alpha * x written back with SR (kernels/accum.cu;
                             // BF16 acc 16-bit draws, FP16 acc 32-bit draws of this one stream)
#define SRK_STREAM_ROW_VAR 9u   // Adafactor's BF16 row statistics (kernels/adafactor.cu)
#define SRK_STREAM_COL_VAR 10u  // Adafactor's BF16 column statistics

// ---- BF16: the hot path, written directly on the bit pattern --------------------------------

// SR: adding a 16-bit draw below the cut carries into the kept bits with probability
// (u & 0xffff) / 65536, which is contract v1's rule for 16-bit draws.
SRK_HD u16 srk_bf16_sr(float x, u32 r16, int saturate) {
  u32 u = srk_f2u(x);
  u32 a = u & 0x7fffffffu;
  u32 rounded = (u + r16) >> 16;
  u32 nan = (u >> 16) | 0x0040u;
  // A finite input that carried into the all-ones exponent overflowed.
  u32 sat = (u >> 16 & 0x8000u) | 0x7f7fu;
  u32 out = (a > 0x7f800000u) ? nan : rounded;
  out = (saturate && a < 0x7f800000u && (out & 0x7f80u) == 0x7f80u) ? sat : out;
  return (u16)out;
}

SRK_HD u16 srk_bf16_rn(float x, int saturate) {
  u32 u = srk_f2u(x);
  u32 a = u & 0x7fffffffu;
  u32 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  u32 nan = (u >> 16) | 0x0040u;
  u32 sat = (u >> 16 & 0x8000u) | 0x7f7fu;
  u32 out = (a > 0x7f800000u) ? nan : rounded;
  out = (saturate && a < 0x7f800000u && (out & 0x7f80u) == 0x7f80u) ? sat : out;
  return (u16)out;
}

SRK_HD float srk_bf16_to_f32(u16 h) { return srk_u2f((u32)h << 16); }

// ---- FP16 and FP8: one template over the format's parameters -------------------------------

// MANT: stored mantissa bits; BIAS: exponent bias; SIGN: bit index of the sign;
// MAXFIN: encoding of the largest finite magnitude; HAS_INF: the format has infinities;
// INF_ENC / NAN_ENC: encodings (without sign) of infinity and of the canonical quiet NaN.
template <int MANT, int BIAS, int SIGN, u32 MAXFIN, bool HAS_INF, u32 INF_ENC, u32 NAN_ENC>
struct SrkSmallFloat {
  static const int EMIN = 1 - BIAS;

  // Encode x: with `stochastic`, round up iff floor(D * 2^32) + r >= 2^32 for the 32-bit draw r;
  // without, to nearest with ties to even (r is ignored). Host builds cast through the 32-bit
  // variant of cpu/round_small.h, which must return the same bits: change both together.
  SRK_HD static u32 encode(float x, u32 r, bool stochastic, int saturate) {
    u32 u = srk_f2u(x);
    u32 sign = (u >> 31) << SIGN;
    u32 a = u & 0x7fffffffu;
    u32 overflow = saturate ? MAXFIN : (HAS_INF ? INF_ENC : NAN_ENC);
    if (a > 0x7f800000u) return sign | NAN_ENC;
    if (a == 0x7f800000u) return sign | (HAS_INF ? INF_ENC : overflow);
    int e = (int)(a >> 23);
    u32 sig = e ? ((a & 0x7fffffu) | 0x800000u) : a;      // |x| = sig * 2^(max(e,1) - 150)
    int exp2 = (e ? e : 1) - 150;
    int et = e - 127 > EMIN ? e - 127 : EMIN;              // binade of x on the target grid
    int s = (et - MANT) - exp2;                            // bits below the target quantum, > 0
    u64 units = s < 64 ? ((u64)sig >> s) : 0;              // T in quanta of 2^(et - MANT)
    u64 rem = s < 64 ? (u64)sig - (units << s) : (u64)sig;
    // floor(D * 2^32); exact whenever s <= 32, and below one half otherwise (sig < 2^24).
    u64 d32 = s <= 32 ? (rem << (32 - s)) : (s < 96 ? (rem >> (s - 32)) : 0);
    u64 up;
    if (stochastic) {
      up = (d32 + (u64)r) >> 32;
    } else {
      up = (d32 > 0x80000000ull) || (d32 == 0x80000000ull && (units & 1));
    }
    // For the lowest two binades (subnormals and et == EMIN) the encoding is the unit count;
    // above, each binade adds 2^MANT. A carry out of the mantissa moves to the next binade.
    u64 enc = ((u64)(et - EMIN) << MANT) + units + up;
    if (enc > MAXFIN) return sign | overflow;
    return sign | (u32)enc;
  }

  SRK_HD static float decode(u32 h) {
    u32 sign = ((h >> SIGN) & 1u) << 31;
    u32 mag = h & ((1u << SIGN) - 1u);
    u32 e = mag >> MANT, m = mag & ((1u << MANT) - 1u);
    u32 emax = (1u << (SIGN - MANT)) - 1u;
    if (HAS_INF && e == emax) return srk_u2f(sign | 0x7f800000u | (m ? (0x400000u | (m << (23 - MANT))) : 0u));
    if (!HAS_INF && mag == NAN_ENC) return srk_u2f(sign | 0x7fc00000u);
    if (e == 0) {  // subnormal: m * 2^(EMIN - MANT), exact in FP32
      float scale = srk_u2f((u32)(127 + EMIN - MANT) << 23);
      return srk_u2f(sign | srk_f2u((float)m * scale));
    }
    return srk_u2f(sign | ((e - BIAS + 127) << 23) | (m << (23 - MANT)));
  }
};

typedef SrkSmallFloat<10, 15, 15, 0x7bffu, true, 0x7c00u, 0x7e00u> SrkF16;
typedef SrkSmallFloat<3, 7, 7, 0x7eu, false, 0x7fu, 0x7fu> SrkE4M3;
typedef SrkSmallFloat<2, 15, 7, 0x7bu, true, 0x7cu, 0x7eu> SrkE5M2;
