// What the C++ modules (csrc/relaxed_argmax.cpp, csrc/sampler.cpp) share: the
// macro prefix (DDF_), instruction-set detection and dispatch, the
// floating-point mode of a kernel, and the one threading model (WorkerPool).
// The SIMD lane types live in csrc/simd.h, which is included once per
// instruction set.
//
// Threading model: persistent helper threads, no OpenMP. A call cuts its work
// into many small chunks (or the sampler's tiles) that threads claim from an
// atomic counter; the calling thread works too and never waits for a helper
// that has not started. Why (measured on the 2-core development box while ~6
// other engineers' jobs ran on it, load average 8-15, so only ratios and
// orders of magnitude mean anything):
// - There was one OpenMP runtime in the process, not two: torch's
//   libgomp.so.1 satisfies the extension's DT_NEEDED by soname
//   (/proc/self/maps), so linking torch's runtime would change nothing.
// - The OpenMP build of the loss at (65536, 64) fp32 took a median 157 ms
//   alone, 65 ms after an eager GRU step, 131 ms after a torch.compile'd step
//   with the default wait policy; 119 / 94 / 173 ms with OMP_WAIT_POLICY=ACTIVE,
//   25 / 19 / 27 ms with PASSIVE, 47 / 47 / 51 ms with GOMP_SPINCOUNT=0: a
//   parallel region ends in a barrier every team thread must reach, and on a
//   busy box a spinning or sleeping team member waits for a scheduler slot.
// - With this pool a helper that is not scheduled claims nothing and the
//   caller finishes alone, so a call never costs more than one thread's work
//   plus one chunk. Kernel alone, interleaved, load 15: OpenMP 41.9 ms alone /
//   33.3 after an eager step / 41.4 on one thread; pool 37.8 / 38.1 / 39.1.
//   In-loop figures: benchmarks/results/cpu_loss_in_loop.json.
// Both modules use this one pool implementation (one instance per module).

#pragma once

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
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

// Work shared by the calling thread and up to n helpers. work() claims and
// finishes pieces until none is left to claim; complete() is true once every
// piece is finished (a helper does not start its next job before its previous
// one is complete: the sampler's parked tiles live in the helper's storage).
class Job {
 public:
  virtual ~Job() = default;
  virtual void work() = 0;
  virtual bool complete() const = 0;
};

// Persistent helper threads. offer() hands a job to up to n idle helpers and
// returns at once; the caller works on the job itself.
class WorkerPool {
 public:
  static WorkerPool& instance() {
    static std::mutex creation;
    static WorkerPool* pool = nullptr;
    std::lock_guard<std::mutex> lock(creation);
    // After fork() the child has none of the parent's threads (and maybe a
    // locked mutex): start over with a new pool; the old one is left behind.
    if (pool == nullptr || pool->pid_ != getpid()) pool = new WorkerPool();  // never destroyed
    return *pool;
  }

  void offer(const std::shared_ptr<Job>& job, int helpers) {
    std::lock_guard<std::mutex> lock(mutex_);
    while (static_cast<int>(threads_started_) < helpers) {
      std::thread(&WorkerPool::loop, this).detach();
      ++threads_started_;
    }
    job_ = job;
    wanted_ = helpers;
    ++generation_;
    wake_.notify_all();
  }

 private:
  WorkerPool() : pid_(getpid()) {}

  void loop() {
    uint64_t seen = 0;
    std::shared_ptr<Job> previous;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen && wanted_ > 0; });
        seen = generation_;
        --wanted_;
        job = job_;
      }
      while (previous && !previous->complete()) std::this_thread::yield();
      job->work();
      previous = std::move(job);
    }
  }

  const pid_t pid_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::shared_ptr<Job> job_;
  uint64_t generation_ = 0;
  int wanted_ = 0;
  size_t threads_started_ = 0;
};

// fn(chunk, slot) for chunk in [0, n_chunks), on up to `threads` threads; slot
// in [0, threads) is unique among the threads running at once (per-thread
// scratch). A helper that is not scheduled never claims a chunk, so the caller
// then does the work alone; it waits only for chunks already claimed, which
// are kept small for that reason.
template <class Fn>
class ChunkJob final : public Job {
 public:
  ChunkJob(int64_t n_chunks, const Fn& fn) : n_chunks_(n_chunks), fn_(fn) {}

  void work() override {
    const int slot = next_slot_.fetch_add(1, std::memory_order_relaxed);
    for (int64_t c = next_.fetch_add(1); c < n_chunks_; c = next_.fetch_add(1)) {
      fn_(c, slot);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  bool complete() const override { return done_.load(std::memory_order_acquire) == n_chunks_; }

 private:
  const int64_t n_chunks_;
  const Fn& fn_;  // used only while chunks are left, i.e. before run_chunks returns
  std::atomic<int64_t> next_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> next_slot_{0};
};

template <class Fn>
void run_chunks(int64_t n_chunks, int threads, const Fn& fn) {
  threads = int(std::max<int64_t>(1, std::min<int64_t>(threads, n_chunks)));
  if (threads == 1) {
    for (int64_t c = 0; c < n_chunks; ++c) fn(c, 0);
    return;
  }
  auto job = std::make_shared<ChunkJob<Fn>>(n_chunks, fn);
  WorkerPool::instance().offer(job, threads - 1);
  job->work();
  // Only chunks already claimed by a helper remain: spin briefly, then yield
  // (a helper descheduled mid-chunk needs the CPU back).
  for (int spin = 0; !job->complete(); ++spin) {
    if (spin < 4000)
      cpu_pause();
    else
      std::this_thread::yield();
  }
}

}  // namespace ddf
