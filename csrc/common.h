// What the C++ modules (csrc/relaxed_argmax.cpp, csrc/sampler.cpp) share: the
// macro prefix (DDF_), instruction-set detection and dispatch, the
// floating-point mode of a kernel, and the one threading model (on_team).
// The SIMD lane types live in csrc/simd.h, which is included once per
// instruction set.
//
// Threading model: torch's own OpenMP team. The modules are built with
// -fopenmp, and their DT_NEEDED libgomp.so.1 is satisfied by the copy torch
// has already loaded (torch/lib/libgomp.so.1, same soname; ddvae_fast.backends
// imports torch first), so a parallel region here runs on the same threads as
// torch's own ops. Why: after a torch op those threads spin-wait for the
// next region, holding the cores, and the helper thread of a separate pool
// (the design before this one) got no core: a 2-thread call ran at about
// 1-thread speed. The loss at (65536, 64) fp32 after an eager GRU step on the
// 2-core VM: 7.6 ms on the own pool with torch.empty gradients (benchmarks/
// results/cpu_loss_in_loop_own_pool.json), 4.1 ms on torch's team with the
// gradient cache of ddvae_fast/_memory.py (cpu_loss_in_loop.json).
// Work is cut into many small chunks (or the sampler's tiles) claimed from an
// atomic counter, so a team thread that starts late only claims less. The
// cost: a region ends in a barrier, so on an oversubscribed machine the caller
// waits for a descheduled team thread, as torch's own ops do.
// Without OpenMP (a compiler without it) the work runs on the calling thread.

#pragma once

#include <pthread.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define DDF_X86 1
#else
#define DDF_X86 0
#endif

#define DDF_INLINE inline __attribute__((always_inline))

namespace ddf {

// ------------------------------------------------------------ instruction sets
// Each module is compiled in several copies, one per instruction set, best
// first; "sse2" is the baseline copy (setup.py builds without -march=native).

inline bool cpu_supports(const std::string& isa) {
#if DDF_X86
  __builtin_cpu_init();
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == "sse2";
}

// The copies of `copies` this CPU runs, best first (the modules' supported_isas()).
inline std::vector<std::string> supported_isas(const std::vector<std::string>& copies) {
  std::vector<std::string> out;
  for (const std::string& isa : copies)
    if (cpu_supports(isa)) out.push_back(isa);
  return out;
}

// The copy to run for the `isa` argument: "auto" is the best one this CPU runs.
// Raises std::invalid_argument (ValueError in Python) for an unknown or
// unsupported name.
inline size_t resolve_isa(const std::string& name, const std::vector<std::string>& copies) {
  std::string known;
  for (size_t i = 0; i < copies.size(); ++i) {
    if (name == "auto" && cpu_supports(copies[i])) return i;
    if (name == copies[i]) {
      if (!cpu_supports(name))
        throw std::invalid_argument("isa '" + name + "' is not supported by this CPU");
      return i;
    }
    known += ", '" + copies[i] + "'";
  }
  throw std::invalid_argument("unknown isa '" + name + "'; expected 'auto'" + known);
}

// Flush-to-zero and denormals-are-zero in this thread while a kernel runs,
// restoring the caller's mode after (kernels run on the caller's thread too).
// Subnormal arithmetic is many times slower, and results change only below
// 2^-126 (fp32) / 2^-1022 (fp64).
struct DenormalsAreZero {
#if DDF_X86
  unsigned saved = _mm_getcsr();
  DenormalsAreZero() { _mm_setcsr(saved | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
  ~DenormalsAreZero() { _mm_setcsr(saved); }
#endif
};

// ------------------------------------------------------- 16-bit float storage
// Element types of bfloat16 and float16 tensors (their bits); kernels compute
// in fp32 lanes (csrc/simd.h). The scalar conversions here use the same
// operations as the lane ones there (round to nearest even, NaN stays NaN).
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

inline float to_float(bf16 h) { return bits_float(uint32_t(h.bits) << 16); }

inline float to_float(f16 h) {
  const uint32_t exp_mask = uint32_t(0x7c00) << 13;
  uint32_t o = (h.bits & 0x7fffu) << 13;
  const uint32_t e = o & exp_mask;
  o += uint32_t(127 - 15) << 23;
  if (e == exp_mask) o += uint32_t(128 - 16) << 23;  // inf, NaN
  if (e == 0) o = float_bits(bits_float(o + (1u << 23)) - bits_float(113u << 23));
  return bits_float(o | ((h.bits & 0x8000u) << 16));
}

inline bf16 to_storage(float x, bf16*) {
  const uint32_t u = float_bits(x);
  if (x != x) return {uint16_t((u >> 16) | 0x40u)};
  return {uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

inline f16 to_storage(float x, f16*) {
  uint32_t u = float_bits(x);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t o;
  if (u >= ((127u + 16) << 23)) {
    o = u > (255u << 23) ? 0x7e00u : 0x7c00u;
  } else if (u < (113u << 23)) {
    o = float_bits(bits_float(u) + bits_float(126u << 23)) - (126u << 23);
  } else {
    o = (u + ((uint32_t(15 - 127) << 23) + 0xfffu) + ((u >> 13) & 1u)) >> 13;
  }
  return {uint16_t(o | (sign >> 16))};
}

inline float to_float(float x) { return x; }
inline double to_float(double x) { return x; }
inline float to_storage(float x, float*) { return x; }
inline double to_storage(double x, double*) { return x; }

// A compute-type value (fp64 allowed) rounded to storage type S.
template <typename S>
S to_storage_as(double x) {
  if constexpr (std::is_same<S, double>::value)
    return x;
  else
    return to_storage(float(x), static_cast<S*>(nullptr));
}

inline void cpu_pause() {
#if DDF_X86
  __builtin_ia32_pause();
#endif
}

// ------------------------------------------------------------------ threading

// libgomp cannot start a parallel region in a child forked from a process
// whose OpenMP threads already ran (the child waits for threads that do not
// exist; torch's own ops hang there too). Each module registers, when it is
// loaded, a fork handler that sends all later work of the child to the
// calling thread.
inline std::atomic<bool> forked{false};
struct ForkWatch {
  ForkWatch() { pthread_atfork(nullptr, nullptr, [] { forked.store(true); }); }
};
inline ForkWatch fork_watch;

// fn(slot) on up to `threads` threads of the caller's OpenMP team (the
// calling thread included); slot in [0, threads) is unique per thread. fn
// must not throw (an exception cannot leave a parallel region).
template <class Fn>
void on_team(int threads, const Fn& fn) {
#ifdef _OPENMP
  if (threads > 1 && !forked.load(std::memory_order_relaxed)) {
#pragma omp parallel num_threads(threads)
    fn(omp_get_thread_num());
    return;
  }
#endif
  (void)threads;
  fn(0);
}

// fn(chunk, slot) for chunk in [0, n_chunks), on up to `threads` threads;
// slot is unique among the threads running at once (per-thread scratch).
template <class Fn>
void run_chunks(int64_t n_chunks, int threads, const Fn& fn) {
  threads = int(std::max<int64_t>(1, std::min<int64_t>(threads, n_chunks)));
  std::atomic<int64_t> next{0};
  on_team(threads, [&](int slot) {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < n_chunks;
         c = next.fetch_add(1, std::memory_order_relaxed))
      fn(c, slot);
  });
}

}  // namespace ddf
