// srk_emu_run.h: the grid runner of the gpu-emu backend (host compiler only; see srk_cuda_shim.h).
//
// srk_emu_<kernel>(grid, block, argv) runs `kernel` once for every (block, thread) of a 1-D grid
// of `grid` blocks of `block` threads, with blockIdx / threadIdx / blockDim / gridDim set as the
// GPU would set them. argv holds one 64-bit slot per kernel parameter, the parameter's bytes in
// the slot's low bytes (little-endian), exactly as srkern/_backend.py converted them for CuPy.
// Blocks run on OpenMP threads, threads of a block one after another: valid because srkern's
// kernels never synchronise or share memory between threads (the shim refuses what would).
#include <tuple>
#include <utility>

template <class T>
static T srk_emu_arg(const unsigned long long* slot) {
  static_assert(sizeof(T) <= 8, "kernel parameters are at most 8 bytes");
  T v;
  memcpy(&v, slot, sizeof(T));
  return v;
}

template <class... A, size_t... I>
static std::tuple<A...> srk_emu_args(const unsigned long long* argv, std::index_sequence<I...>) {
  return std::tuple<A...>(srk_emu_arg<A>(argv + I)...);
}

template <class... A>
static void srk_emu_run(void (*kernel)(A...), unsigned grid, unsigned block, const unsigned long long* argv) {
  const std::tuple<A...> args = srk_emu_args<A...>(argv, std::index_sequence_for<A...>{});
  #pragma omp parallel for schedule(dynamic, 1)
  for (long long b = 0; b < (long long)grid; ++b) {
    gridDim = {grid, 1u, 1u};
    blockDim = {block, 1u, 1u};
    blockIdx = {(unsigned)b, 0u, 0u};
    for (unsigned t = 0; t < block; ++t) {
      threadIdx = {t, 0u, 0u};
      std::apply(kernel, args);
    }
  }
}

// The kernel's parameter list as srkern/_backend.py checks it before a launch: out[0] = count,
// out[1 + i] = sizeof(parameter i). CuPy packs each argument by its NumPy scalar's size, so a
// launch whose argument codes disagree with the C signature is wrong on a GPU; the slots above
// would hide it, this check does not.
template <class... A>
static void srk_emu_sig(void (*)(A...), unsigned* out) {
  const unsigned sizes[] = {(unsigned)sizeof(A)..., 0u};
  out[0] = (unsigned)sizeof...(A);
  for (unsigned i = 0; i < (unsigned)sizeof...(A); ++i) out[1 + i] = sizes[i];
}

#define SRK_EMU_ENTRY(name)                                                                   \
  extern "C" void srk_emu_##name(unsigned grid, unsigned block, const unsigned long long* argv) { \
    srk_emu_run(&name, grid, block, argv);                                                    \
  }                                                                                           \
  extern "C" void srk_emu_sig_##name(unsigned* out) { srk_emu_sig(&name, out); }
