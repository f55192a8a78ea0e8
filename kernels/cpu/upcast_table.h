// cpu/upcast_table.h: the CPU variant of cast.cu's upcast body. upcast_cpu<D>(x, y, n) must equal,
// bit for bit, y[i] = D::decode(x[i]) for every i < n: the shared per-element decode (cast.cu's
// DecBf16 / DecF16 / Dec8, one element per GPU thread). How each format gets there:
//   BF16: the shared decode itself (a 16-bit shift), in a SIMD loop.
//   FP16: F16C's vcvtph2ps where the CPU has it. It is exact and keeps NaN payloads, quieted
//         exactly as SrkF16::decode quiets them; without F16C, the shared decode.
//   FP8:  a 256-entry table filled by the format's own SrkSmallFloat::decode, so a lookup
//         returns decode()'s bits by construction.
// Why: the shared FP16 / FP8 decodes branch per element (specials, subnormals); one conversion
// instruction per 8 elements, or one table load per element, vectorises.
//
// Included by cast.cu after its decode structs, host builds only.
#pragma once
#include "srk_platform.h"
#include "srk_round.h"

#ifndef SRK_GPU

template <class D> struct UpcastCpu;

template <> struct UpcastCpu<DecBf16> {
  static void run(const u16* SRK_RESTRICT x, float* SRK_RESTRICT y, int m) {
    #pragma omp simd
    for (int k = 0; k < m; ++k) y[k] = srk_bf16_to_f32(x[k]);
  }
};

template <> struct UpcastCpu<DecF16> {
  static void run(const u16* SRK_RESTRICT x, float* SRK_RESTRICT y, int m) {
    int k = 0;
#if defined(__F16C__)
    for (; k + 8 <= m; k += 8)
      _mm256_storeu_ps(y + k, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(x + k))));
#endif
    for (; k < m; ++k) y[k] = SrkF16::decode(x[k]);
  }
};

template <class F> struct UpcastCpu<Dec8<F> > {
  struct Table {
    float v[256];
    Table() { for (int c = 0; c < 256; ++c) v[c] = F::decode((u32)c); }
  };
  static void run(const u8* SRK_RESTRICT x, float* SRK_RESTRICT y, int m) {
    static const Table table;  // built once (thread-safe static initialisation)
    #pragma omp simd
    for (int k = 0; k < m; ++k) y[k] = table.v[x[k]];
  }
};

template <class D>
inline void upcast_cpu(const typename D::in_t* SRK_RESTRICT x, float* SRK_RESTRICT y, i64 n) {
  i64 nchunks = (n + UPCAST_CHUNK - 1) / UPCAST_CHUNK;
  SRK_LOOP_TILES(c, nchunks) {
    i64 a = c * UPCAST_CHUNK;
    UpcastCpu<D>::run(x + a, y + a, (int)srk_min64(UPCAST_CHUNK, n - a));
  }
}
#endif  // !SRK_GPU
