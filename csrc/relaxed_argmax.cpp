// Fused relaxed arg-max loss, forward + gradient, CPU (the 'cpp' backend).
//
// Contract: docs/loss_backend_contract.md. Per row n, target t, logits row l (length V),
// tau in (0, 1), c = log(1/tau - 1):
//   logit mode: z_s = (l_s - l_t)/tau + c, argmax_row = sum_{s != t} softplus(z_s),
//               d/dl_s = sigmoid(z_s)/tau (s != t), d/dl_t = -(sum of the others).
//   prob mode:  p = softmax(l), z_s = (p_s - p_t)/tau + c, same sum; with
//               g_s = sigmoid(z_s)/tau, g_t = -sum_{s != t} g_s the logits gradient
//               is p_s (g_s - sum_j p_j g_j).
//   nll_row = logsumexp(l) - l_t, d/dl = softmax(l) - onehot(t).
//   correct_row = 1 iff l_t > l_s for every s != t (so never with a NaN logit,
//   nor with a tie; as ddvae_fast/loss/reference.py correct_rows).
//
// Design
// - No torch headers: Python hands over data_ptr()s, sizes and the row stride
//   (all int64, so N*V >= 2^31 is fine). The GIL is released around the compute.
// - Threads: rows are cut into chunks of ~64K elements that the threads of
//   torch's OpenMP team claim (ddf::run_chunks; csrc/common.h says why).
// - dtypes: float32, float64, and bfloat16 / float16 read as they are (no
//   upcast copy) into fp32 lanes; sums in fp32 lanes flushed to fp64 as for
//   float32; the gradient is written in the logits dtype, rows in fp32 (fp64
//   for float64 logits).
// - Every inner loop works on one register of W lanes (GCC vector extensions),
//   so it is SIMD whatever the auto-vectoriser decides; exp and log1p are our
//   own branch-free polynomials (below). The kernels are compiled three times,
//   for AVX-512 (W = 16 floats / 8 doubles), AVX2+FMA (8 / 4) and the SSE2
//   baseline (4 / 2), and the best copy the CPU supports is picked at run time
//   (setup.py builds without -march=native, so the baseline alone would be
//   4-wide SSE2 without FMA).
// - Template parameters (dtype, mode, need_grad, need_nll, nll gradient) are
//   compile-time, so the hot loops carry no mode branches.
// - Subnormals are flushed to zero (FTZ/DAZ) while a kernel runs (and the
//   caller's floating-point mode restored after): exp(-|z|) is tiny for most
//   rivals, and subnormal intermediates made logit mode 2.2x slower.
// - Summation accuracy: per-lane fp32 partial sums are flushed into fp64 lanes
//   every FLUSH_CHUNKS chunks (<= 8 fp32 additions per lane before a flush),
//   so a row sum has relative error ~ (8 + log2 W) eps_fp32 whatever V is;
//   fp64 inputs accumulate in fp64 throughout.
//
// Passes over a row (the row comes from memory once; later passes hit L1/L2
// for realistic V: a 32000-wide fp32 row is 128 KB):
//   logit, no nll ................. 1 pass: read l, write grad
//   logit, nll value .............. 2 passes: row max (loads and max only), then
//                                    the main loop also sums exp(l - max)
//   logit, nll with gradient ...... 3 passes: row max, sum of exp(l - max), then
//                                    the main loop writes grad incl. the softmax
//                                    term (one rounding, also for 16-bit grads)
//   prob ........................... 3 passes without, 4 with gradient
//                                    (max | exp + sum | z, sums | softmax-backward
//                                    rescale), using a per-thread scratch row.
// An online (running max) logsumexp inside the main loop was measured slower
// (3.8 vs 2.2 ns/element at V = 64, AVX-512): its rescaling selects and fp64
// lanes cost more than one extra pass of loads over a cached row.
// The target's gradient is computed after the row, in fp64, and written once.
//
// Polynomial accuracy: see ACCURACY below (measured by
// tests/test_cpp_relaxed_argmax.py).

#ifndef DDF_KERNEL_BODY

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"

#pragma GCC diagnostic ignored "-Wpsabi"

namespace py = pybind11;

// The logits dtype, as the Python wrapper (ddvae_fast/loss/cpp.py) encodes it.
enum Dtype { DTYPE_FLOAT32 = 0, DTYPE_FLOAT64 = 1, DTYPE_BFLOAT16 = 2, DTYPE_FLOAT16 = 3 };

// One kernel launch: pointers (from tensor.data_ptr()), sizes and options.
struct Call {
  uintptr_t logits, target, grad_scale, loss_out, nll_out, correct_out, grad_out;
  int64_t N, V, row_stride, ignore_index;
  int dtype;
  bool prob, grad, nll, nll_grad;
  double tau, aw, nw;
  uintptr_t scratch;  // prob mode: one scratch row of scratch_stride elements per thread
  int64_t scratch_stride;
};

// The kernel code below the #else is compiled three times, once per
// instruction set: this file includes itself inside a namespace under a
// `#pragma GCC target` (with csrc/simd.h, which says why).
// DDF_VBYTES is the vector width of each copy: one register (wider vectors
// run out of registers on AVX2 and spill).
#define DDF_KERNEL_BODY

#if DDF_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
#define DDF_VBYTES 64
namespace ddf_avx512 {
#include "relaxed_argmax.cpp"
}  // namespace ddf_avx512
#undef DDF_VBYTES
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define DDF_VBYTES 32
namespace ddf_avx2 {
#include "relaxed_argmax.cpp"
}  // namespace ddf_avx2
#undef DDF_VBYTES
#pragma GCC pop_options
#endif  // DDF_X86

// The baseline copy (SSE2 on x86-64; the target's 128-bit SIMD elsewhere).
#define DDF_VBYTES 16
namespace ddf_sse2 {
#include "relaxed_argmax.cpp"
}  // namespace ddf_sse2
#undef DDF_VBYTES

#undef DDF_KERNEL_BODY

namespace {

typedef void (*RowsFn)(const Call&, int64_t, int64_t, int);

#ifdef DDF_TEST_HOOKS
typedef void (*MathFn)(int, bool, uintptr_t, uintptr_t, int64_t);
#define DDF_COPY(ns) \
  { ns::rows, ns::math }
#else
#define DDF_COPY(ns) \
  { ns::rows }
#endif

struct Copy {
  RowsFn rows;
#ifdef DDF_TEST_HOOKS
  MathFn math;
#endif
};

#if DDF_X86
const std::vector<std::string> kIsas{"avx512", "avx2", "sse2"};
const Copy kCopies[] = {DDF_COPY(ddf_avx512), DDF_COPY(ddf_avx2), DDF_COPY(ddf_sse2)};
#else
const std::vector<std::string> kIsas{"sse2"};
const Copy kCopies[] = {DDF_COPY(ddf_sse2)};
#endif

std::vector<std::string> supported_isas() { return ddf::supported_isas(kIsas); }

// Rows per chunk: ~64K elements (256 KB of fp32 logits, ~20-50 us of work), so
// that the caller never waits long for a chunk a helper has claimed.
constexpr int64_t kChunkElements = int64_t(1) << 16;
// Below this many elements one thread does it all: waking a helper costs more.
constexpr int64_t kMinParallelElements = int64_t(1) << 15;

void forward(uintptr_t logits, uintptr_t target, uintptr_t grad_scale, uintptr_t loss_out,
             uintptr_t nll_out, uintptr_t correct_out, uintptr_t grad_out, int64_t N, int64_t V,
             int64_t row_stride, int dtype, double tau, bool prob_mode, int64_t ignore_index,
             double argmax_weight, double nll_weight, bool need_grad, bool need_nll,
             int num_threads, const std::string& isa_name) {
  if (N < 0 || V < 1) throw std::invalid_argument("need N >= 0 and V >= 1");
  if (row_stride < 0) throw std::invalid_argument("row_stride must be >= 0");
  if (dtype < DTYPE_FLOAT32 || dtype > DTYPE_FLOAT16)
    throw std::invalid_argument(
        "dtype must be 0 (float32), 1 (float64), 2 (bfloat16) or 3 (float16)");
  if (!(tau > 0.0 && tau < 1.0)) throw std::invalid_argument("tau must lie in (0, 1)");
  if (num_threads < 1) throw std::invalid_argument("num_threads must be >= 1");
  const Copy& copy = kCopies[ddf::resolve_isa(isa_name, kIsas)];
  if (N == 0) return;
  if (!logits || !target || !loss_out || !nll_out || !correct_out ||
      (need_grad && (!grad_out || !grad_scale)))
    throw std::invalid_argument("null data pointer");

  Call a;
  a.logits = logits;
  a.target = target;
  a.grad_scale = grad_scale;
  a.loss_out = loss_out;
  a.nll_out = nll_out;
  a.correct_out = correct_out;
  a.grad_out = grad_out;
  a.N = N;
  a.V = V;
  a.row_stride = row_stride;
  a.ignore_index = ignore_index;
  a.dtype = dtype;
  a.prob = prob_mode;
  a.grad = need_grad;
  a.nll = need_nll;
  // as in the reference: the nll term enters the gradient iff nll_weight != 0
  // (its logsumexp is then computed even if need_nll is False)
  a.nll_grad = need_grad && nll_weight != 0.0;
  a.tau = tau;
  a.aw = argmax_weight;
  a.nw = nll_weight;

  const int64_t chunk_rows = std::max<int64_t>(1, kChunkElements / V);
  const int64_t n_chunks = (N + chunk_rows - 1) / chunk_rows;
  int64_t nt = std::min<int64_t>(num_threads, n_chunks);
  if (N * V < kMinParallelElements) nt = 1;

  // Prob-mode scratch, allocated here (outside the threads, so an allocation
  // failure is an ordinary exception).
  const int64_t w = 16;  // >= the widest W of any copy (16 floats)
  const int64_t vpad = (V + w - 1) / w * w;
  std::vector<double> scratch;  // doubles: large enough for either compute type
  if (prob_mode) scratch.resize(size_t(nt * 2 * vpad));
  a.scratch = reinterpret_cast<uintptr_t>(scratch.data());
  a.scratch_stride = 2 * vpad;

  // A large gradient is usually a fresh allocation whose pages are first
  // touched here, by both threads (chunks are claimed alternately); the OS
  // zeroing those pages costs about one more write pass (bench_in_loop.py in
  // benchmarks/: kernel_fresh_grad vs kernel_reused_grad). MADV_HUGEPAGE on
  // the buffer was tried and dropped: a fill of a fresh 262 MB buffer took
  // 818 ms with it, 864 ms without, 406 ms for a touched one (load ~15); it
  // saves faults, not the zeroing.
  const RowsFn rows = copy.rows;
  py::gil_scoped_release nogil;
  ddf::run_chunks(n_chunks, int(nt), [&](int64_t chunk, int slot) {
    ddf::DenormalsAreZero ftz;
    const int64_t lo = chunk * chunk_rows;
    rows(a, lo, std::min(N, lo + chunk_rows), slot);
  });
}

#ifdef DDF_TEST_HOOKS
// Test hook: the kernels' polynomial exp / log1p, elementwise.
void math(const std::string& op, uintptr_t in, uintptr_t out, int64_t n, bool is_double,
          const std::string& isa_name) {
  int code;
  if (op == "exp")
    code = 0;
  else if (op == "log1p")
    code = 1;
  else
    throw std::invalid_argument("op must be 'exp' or 'log1p'");
  if (n < 0) throw std::invalid_argument("n must be >= 0");
  const Copy& copy = kCopies[ddf::resolve_isa(isa_name, kIsas)];
  py::gil_scoped_release nogil;
  copy.math(code, is_double, in, out, n);
}
#endif

}  // namespace

PYBIND11_MODULE(_relaxed_argmax, m) {
  m.doc() =
      "Fused relaxed arg-max loss (forward + gradient) on CPU; raw-pointer kernels. "
      "Use ddvae_fast.loss.cpp.forward, which allocates the outputs.";
  m.def("forward", &forward, py::arg("logits"), py::arg("target"), py::arg("grad_scale"),
        py::arg("loss_out"), py::arg("nll_out"), py::arg("correct_out"), py::arg("grad_out"),
        py::arg("N"), py::arg("V"), py::arg("row_stride"), py::arg("dtype"), py::arg("tau"),
        py::arg("prob_mode"), py::arg("ignore_index"), py::arg("argmax_weight"),
        py::arg("nll_weight"), py::arg("need_grad"), py::arg("need_nll"), py::arg("num_threads"),
        py::arg("isa") = "auto");
#ifdef DDF_TEST_HOOKS
  m.def("math", &math, py::arg("op"), py::arg("x"), py::arg("out"), py::arg("n"),
        py::arg("is_double"), py::arg("isa") = "auto",
        "Test hook: elementwise vectorised exp (the kernels use x <= 0) or log1p (domain [0, 1]).");
#endif
  m.def("supported_isas", &supported_isas, "Instruction sets this CPU runs, best first.");
}

#else  // DDF_KERNEL_BODY: the kernels, included once per instruction set

#include "simd.h"

// fp32 lanes take at most this many additions before being added to fp64 lanes.
constexpr int64_t FLUSH_CHUNKS = 8;

// Lane j of the chunk starting at `base` is the target iff j == target_lane(t - base).
template <typename T>
DDF_INLINE typename Lanes<T>::mask target_lane(int64_t offset) {
  constexpr int64_t W = Lanes<T>::W;
  const int64_t d = offset < -1 ? -1 : (offset > W ? W : offset);
  return splat<typename Lanes<T>::mask>(typename Lanes<T>::lane_int(d));
}

// ------------------------------------------------------------------ exp, log1p
//
// vexp: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, a polynomial
// for exp(r), and 2^n built in the exponent bits. Round-to-nearest n comes from
// the "add 1.5 * 2^mant" trick, which also leaves n in the low bits, so there is
// no float->int conversion. Inputs below LO give exactly 0 (the true value is
// < 2^-125 (fp32) / 2^-1021 (fp64)); NaN propagates; inputs are clamped above
// at HI (the kernels only call it with x <= 0).
//
// ACCURACY, measured by tests/test_cpp_relaxed_argmax.py on every ISA copy
// against x87 long-double references (2M points each): exp on [LO, 0] is
// within 0.99 ulp (fp32) / 0.98 ulp (fp64); log1p on [0, 1], subnormal
// arguments included, within 1.9 ulp (fp32) / 2.1 ulp (fp64). The tests assert
// 1.5 and 2.5 ulp.

DDF_INLINE Lanes<float>::vec exp_poly(Lanes<float>::vec r) {
  // Cephes expf minimax polynomial on [-ln2/2, ln2/2].
  Lanes<float>::vec p = splat<Lanes<float>::vec>(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  return (p * (r * r) + r) + 1.0f;
}

DDF_INLINE Lanes<double>::vec exp_poly(Lanes<double>::vec r) {
  // Taylor series to r^13/13!: truncation < 0.35^14/14! = 4e-18 relative.
  Lanes<double>::vec p = splat<Lanes<double>::vec>(1.0 / 6227020800.0);
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  return (p * (r * r) + r) + 1.0;
}

template <typename T>
struct ExpConst;
template <>
struct ExpConst<float> {
  static constexpr float LO = -87.0f, HI = 88.0f;
  static constexpr float LOG2E = 1.44269504088896341f, MAGIC = 12582912.0f;  // 1.5 * 2^23
  static constexpr float LN2_HI = 0.693359375f, LN2_LO = -2.12194440e-4f;
  static constexpr uint32_t BIAS = 127, MANT = 23;
};
template <>
struct ExpConst<double> {
  static constexpr double LO = -708.0, HI = 709.0;
  static constexpr double LOG2E = 1.4426950408889634074, MAGIC = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double LN2_HI = 6.93145751953125E-1, LN2_LO = 1.42860682030941723212E-6;
  static constexpr uint64_t BIAS = 1023, MANT = 52;
};

template <typename T>
DDF_INLINE typename Lanes<T>::vec vexp(typename Lanes<T>::vec x) {
  typedef typename Lanes<T>::vec vec;
  typedef typename Lanes<T>::bits bits;
  typedef ExpConst<T> C;
  const vec lo = splat<vec>(C::LO), hi = splat<vec>(C::HI), magic = splat<vec>(C::MAGIC);
  vec xc = x < lo ? lo : x;  // NaN stays NaN
  xc = xc > hi ? hi : xc;
  const vec t = xc * C::LOG2E + magic;  // round(x log2 e) in the low mantissa bits
  const vec n = t - magic;
  vec r = xc - n * C::LN2_HI;
  r = r - n * C::LN2_LO;
  const vec p = exp_poly(r);
  const bits k = (bits)t - (bits)magic;  // n as an integer (two's complement)
  const vec scale = (vec)((k + C::BIAS) << C::MANT);
  const vec y = p * scale;
  return x < lo ? vec{} : y;
}

// log1p(e) for e in [0, 1], relative accuracy for tiny e. With k = [e > sqrt2 - 1]:
//   log1p(e) = k ln2 + 2 atanh(s),  s = e/(2 + e) (k = 0) or (e - 1)/(e + 3) (k = 1),
// so |s| <= 3 - 2 sqrt2 = 0.1716 and s^2 <= 0.0295; the odd series of atanh
// converges by that factor per term.
DDF_INLINE Lanes<float>::vec atanh_series(Lanes<float>::vec s2) {
  // terms to s^9/9: truncation s^10/11 < 2e-9 relative.
  Lanes<float>::vec q = splat<Lanes<float>::vec>(1.0f / 9.0f);
  q = q * s2 + 1.0f / 7.0f;
  q = q * s2 + 1.0f / 5.0f;
  q = q * s2 + 1.0f / 3.0f;
  return q;
}

DDF_INLINE Lanes<double>::vec atanh_series(Lanes<double>::vec s2) {
  // terms to s^21/21: truncation s^22/23 < 7e-19 relative.
  Lanes<double>::vec q = splat<Lanes<double>::vec>(1.0 / 21.0);
  q = q * s2 + 1.0 / 19.0;
  q = q * s2 + 1.0 / 17.0;
  q = q * s2 + 1.0 / 15.0;
  q = q * s2 + 1.0 / 13.0;
  q = q * s2 + 1.0 / 11.0;
  q = q * s2 + 1.0 / 9.0;
  q = q * s2 + 1.0 / 7.0;
  q = q * s2 + 1.0 / 5.0;
  q = q * s2 + 1.0 / 3.0;
  return q;
}

template <typename T>
DDF_INLINE typename Lanes<T>::vec vlog1p_unit(typename Lanes<T>::vec e) {
  typedef typename Lanes<T>::vec vec;
  typedef typename Lanes<T>::mask mask;
  const mask big = e > splat<vec>(T(0.41421356237309504880));
  const vec num = big ? e - T(1) : e;
  const vec den = big ? e + T(3) : e + T(2);
  const vec s = num / den;
  const vec s2 = s * s;
  const vec two_s = s + s;
  const vec r = two_s + (two_s * s2) * atanh_series(s2);
  return big ? r + T(0.69314718055994530942) : r;
}

// Row-independent constants, in fp64 (cast to T where a hot loop uses them).
struct Consts {
  double inv_tau, c, scale, aw, nw;
  bool write_nll;  // need_nll: otherwise nll_rows are 0 even if the lse was computed
};

// --------------------------------------------------------------- logit mode

// S: the storage type of logits and gradient; T: the compute type.
template <typename S>
struct ComputeOf {
  typedef float type;
};
template <>
struct ComputeOf<double> {
  typedef double type;
};

// The sum of exp(l - row_max) over a row, in fp32 lanes flushed to fp64 every
// FLUSH_CHUNKS chunks (the same order as LogitAcc's own sum).
template <typename S>
DDF_INLINE double sum_exp(const S* row, int64_t V, typename ComputeOf<S>::type row_max) {
  typedef typename ComputeOf<S>::type T;
  typedef typename Lanes<T>::vec vec;
  typedef typename Lanes<T>::wide wide;
  constexpr int W = Lanes<T>::W;
  const int64_t nfull = V / W;
  const int rem = int(V % W);
  const vec mv = splat<vec>(row_max);
  vec s_lane{};
  wide s_acc{};
  for (int64_t b = 0; b < nfull; b += FLUSH_CHUNKS) {
    const int64_t bend = std::min(nfull, b + FLUSH_CHUNKS);
    for (int64_t ci = b; ci < bend; ++ci) s_lane += vexp<T>(load_as<T>(row + ci * W) - mv);
    s_acc += widen<T>(s_lane);
    s_lane = vec{};
  }
  if (rem) {
    S buf[W];
    for (int j = 0; j < W; ++j) buf[j] = row[0];  // finite or not, masked out
    std::memcpy(buf, row + nfull * W, sizeof(S) * rem);
    const vec u = vexp<T>(load_as<T>(buf) - mv);
    s_lane += lanes_below<T>(rem) ? u : vec{};
    s_acc += widen<T>(s_lane);
  }
  return hsum_wide<T>(s_acc);
}

// SUM: the main loop also sums exp(l - row_max) (the nll value without its
// gradient); SOFTMAX: the gradient includes scale nw softmax (lse known).
template <typename T, bool GRAD, bool SUM, bool SOFTMAX>
struct LogitAcc {
  typedef Lanes<T> L;
  typedef typename L::vec vec;
  typedef typename L::mask mask;
  typedef typename L::wide wide;

  vec lt, inv_tau, c, a_sig;
  vec sp_lane{}, sig_lane{};
  wide sp_acc{}, sig_acc{};
  mask not_below{};  // counts s with !(l_t > l_s) (the target itself included)
  vec row_max;       // logsumexp = max + log(sum exp(l - max)), the sum as above
  vec s_lane{};
  wide s_acc{};
  vec knll, lse;

  DDF_INLINE LogitAcc(T lt_, T row_max_, double lse_, const Consts& k)
      : lt(splat<vec>(lt_)),
        inv_tau(splat<vec>(T(k.inv_tau))),
        c(splat<vec>(T(k.c))),
        a_sig(splat<vec>(T(k.scale * k.aw * k.inv_tau))),
        row_max(splat<vec>(row_max_)),
        knll(splat<vec>(T(k.scale * k.nw))),
        lse(splat<vec>(T(lse_))) {}

  // One W-lane chunk. keep: lanes that enter the sums (not the target, not
  // padding); valid: lanes that are real logits (only differs on the tail).
  template <bool TAIL, typename S>
  DDF_INLINE void step(vec l, mask keep, mask valid, S* grad_out) {
    const vec z = (l - lt) * inv_tau + c;
    const vec e = vexp<T>(-vabs<T>(z));
    const vec sp = (z > vec{} ? z : vec{}) + vlog1p_unit<T>(e);
    const vec r = T(1) / (T(1) + e);
    const vec sig = z >= vec{} ? r : e * r;
    sp_lane += keep ? sp : vec{};
    sig_lane += keep ? sig : vec{};
    const mask nb = ~(lt > l);
    not_below -= TAIL ? (nb & valid) : nb;
    if (GRAD) {
      if (SOFTMAX)
        store_as<T>(grad_out, sig * a_sig + knll * vexp<T>(l - lse));
      else
        store_as<T>(grad_out, sig * a_sig);
    }
    if (SUM) {
      const vec u = vexp<T>(l - row_max);
      s_lane += TAIL ? (valid ? u : vec{}) : u;
    }
  }

  DDF_INLINE void flush() {
    sp_acc += widen<T>(sp_lane);
    sig_acc += widen<T>(sig_lane);
    sp_lane = vec{};
    sig_lane = vec{};
    if (SUM) {
      s_acc += widen<T>(s_lane);
      s_lane = vec{};
    }
  }
};

template <typename S, bool GRAD, bool NLL, bool NLLGRAD>
DDF_INLINE void logit_row(const S* row, S* grad_row, int64_t V, int64_t t, const Consts& k,
                          typename ComputeOf<S>::type* loss_out,
                          typename ComputeOf<S>::type* nll_out, uint8_t* correct_out) {
  typedef typename ComputeOf<S>::type T;
  typedef Lanes<T> L;
  typedef typename L::vec vec;
  typedef typename L::mask mask;
  constexpr int W = L::W;
  constexpr bool SUM = NLL && !NLLGRAD;
  const T lt = ddf::to_float(row[t]);
  const mask lane = iota<T>();
  const mask all = splat<mask>(-1);
  const int64_t nfull = V / W;
  const int rem = int(V % W);
  // nll: the row max first (a cheap pass of loads and max)
  // (and whether the row holds a NaN, which the max skips: logsumexp is NaN then)
  T row_max = 0;
  bool has_nan = false;
  if (NLL) {
    vec m_lane = splat<vec>(-std::numeric_limits<T>::infinity());
    mask nan_count{};
    for (int64_t ci = 0; ci < nfull; ++ci) {
      const vec l = load_as<T>(row + ci * W);
      m_lane = l > m_lane ? l : m_lane;
      nan_count -= l != l;
    }
    row_max = hmax<T>(m_lane);
    has_nan = hsum_int<T>(nan_count) != 0;
    for (int64_t i = nfull * W; i < V; ++i) {
      const T x = ddf::to_float(row[i]);
      row_max = x > row_max ? x : row_max;
      has_nan |= x != x;
    }
  }
  // +-inf max: shift by 0 (those sums are unused: logsumexp is the max then)
  const T shift = std::isfinite(row_max) ? row_max : T(0);
  // with the nll gradient the logsumexp comes first (a second pass of loads),
  // so that the main loop writes each gradient entry once
  double lse = 0;
  if (NLLGRAD)
    lse = std::isfinite(row_max) ? double(row_max) + std::log(sum_exp(row, V, shift))
                                 : double(row_max);
  LogitAcc<T, GRAD, SUM, NLLGRAD> acc(lt, shift, lse, k);

  for (int64_t b = 0; b < nfull; b += FLUSH_CHUNKS) {
    const int64_t bend = std::min(nfull, b + FLUSH_CHUNKS);
    for (int64_t ci = b; ci < bend; ++ci) {
      const int64_t base = ci * W;
      acc.template step<false>(load_as<T>(row + base), lane != target_lane<T>(t - base), all,
                               grad_row + base);
    }
    acc.flush();
  }
  if (rem) {
    const int64_t base = nfull * W;
    S buf[W], gbuf[W];
    for (int j = 0; j < W; ++j) buf[j] = row[t];  // padding, masked out
    std::memcpy(buf, row + base, sizeof(S) * rem);
    const mask valid = lanes_below<T>(rem);
    acc.template step<true>(load_as<T>(buf), valid & (lane != target_lane<T>(t - base)), valid,
                            gbuf);
    acc.flush();
    if (GRAD) std::memcpy(grad_row + base, gbuf, sizeof(S) * rem);
  }

  if (SUM) {
    lse = std::isfinite(row_max) ? double(row_max) + std::log(hsum_wide<T>(acc.s_acc))
                                 : double(row_max);
  }
  if (GRAD) {
    double gt = -(k.scale * k.aw * k.inv_tau) * hsum_wide<T>(acc.sig_acc);
    // softmax_t - 1 = expm1(l_t - lse), accurate also when softmax_t ~ 1
    if (NLLGRAD) gt += k.scale * k.nw * std::expm1(double(lt) - lse);
    grad_row[t] = ddf::to_storage_as<S>(gt);
    // As in the reference, a NaN logit (it makes gt NaN) or, with the nll
    // gradient, a +inf one (softmax(l) is then NaN: inf - inf) makes every
    // entry of the row's gradient NaN; the loop above wrote finite values for
    // the other entries. Checked once per row, after it.
    if (std::isnan(gt) || (NLLGRAD && row_max == std::numeric_limits<T>::infinity()))
      std::fill(grad_row, grad_row + V,
                ddf::to_storage_as<S>(std::numeric_limits<double>::quiet_NaN()));
  }
  *loss_out = T(hsum_wide<T>(acc.sp_acc));
  *nll_out = NLL && k.write_nll ? (has_nan ? T(NAN) : T(lse - double(lt))) : T(0);
  *correct_out = hsum_int<T>(acc.not_below) == 1;
}

// ---------------------------------------------------------------- prob mode

// scratch: 2 * Vpad elements (Vpad = V rounded up to W): the softmax, then
// sigmoid(z) (only with GRAD).
template <typename S, bool GRAD, bool NLL, bool NLLGRAD>
DDF_INLINE void prob_row(const S* row, S* grad_row, int64_t V, int64_t t, const Consts& k,
                         typename ComputeOf<S>::type* scratch,
                         typename ComputeOf<S>::type* loss_out,
                         typename ComputeOf<S>::type* nll_out, uint8_t* correct_out) {
  typedef typename ComputeOf<S>::type T;
  typedef Lanes<T> L;
  typedef typename L::vec vec;
  typedef typename L::mask mask;
  typedef typename L::wide wide;
  constexpr int W = L::W;
  const T lt = ddf::to_float(row[t]);
  const mask lane = iota<T>();
  const int64_t nfull = V / W;
  const int rem = int(V % W);
  const int64_t nchunks = nfull + (rem ? 1 : 0);
  const int64_t vpad = nchunks * W;
  T* prob = scratch;
  T* sigs = scratch + vpad;

  // pass 1: max (for the softmax) and the strict-max count. The tail chunk is
  // staged in the scratch, padded with -inf, which neither raises the max nor
  // adds to the softmax sum.
  if (rem) {
    S buf[W];
    for (int j = 0; j < W; ++j) buf[j] = row[t];
    std::memcpy(buf, row + nfull * W, sizeof(S) * rem);
    const vec l = load_as<T>(buf);
    store(prob + nfull * W,
          lanes_below<T>(rem) ? l : splat<vec>(-std::numeric_limits<T>::infinity()));
  }
  const vec ltv = splat<vec>(lt);
  vec m_lane = splat<vec>(-std::numeric_limits<T>::infinity());
  mask not_below{}, nan_count{};
  for (int64_t ci = 0; ci < nchunks; ++ci) {
    const vec l = ci < nfull ? load_as<T>(row + ci * W) : load<vec>(prob + ci * W);
    m_lane = l > m_lane ? l : m_lane;
    nan_count -= l != l;  // the max skips NaNs; logsumexp is NaN with one
    mask nb = ~(ltv > l);
    if (ci == nfull) nb &= lanes_below<T>(rem);
    not_below -= nb;
  }
  const T m = hmax<T>(m_lane);
  const bool has_nan = hsum_int<T>(nan_count) != 0;

  // pass 2: u = exp(l - m) into the scratch, S = sum u
  const vec mv = splat<vec>(m);
  vec s_lane{};
  wide s_acc{};
  for (int64_t b = 0; b < nchunks; b += FLUSH_CHUNKS) {
    const int64_t bend = std::min(nchunks, b + FLUSH_CHUNKS);
    for (int64_t ci = b; ci < bend; ++ci) {
      const vec l = ci < nfull ? load_as<T>(row + ci * W) : load<vec>(prob + ci * W);
      const vec u = vexp<T>(l - mv);
      store(prob + ci * W, u);
      s_lane += u;
    }
    s_acc += widen<T>(s_lane);
    s_lane = vec{};
  }
  const double s_sum = hsum_wide<T>(s_acc);
  const double u_t = double(prob[t]);
  const T inv_s = T(1.0 / s_sum);
  const T pt = prob[t] * inv_s;  // the same rounding as the lanes below
  const vec inv_s_v = splat<vec>(inv_s), ptv = splat<vec>(pt);

  // pass 3: p, z, and the sums of softplus, sigmoid and p * sigmoid
  const vec inv_tau = splat<vec>(T(k.inv_tau)), c = splat<vec>(T(k.c));
  vec sp_lane{}, g_lane{}, pg_lane{};
  wide sp_acc{}, g_acc{}, pg_acc{};
  for (int64_t b = 0; b < nchunks; b += FLUSH_CHUNKS) {
    const int64_t bend = std::min(nchunks, b + FLUSH_CHUNKS);
    for (int64_t ci = b; ci < bend; ++ci) {
      const int64_t base = ci * W;
      const vec p = load<vec>(prob + base) * inv_s_v;
      if (GRAD) store(prob + base, p);
      const vec z = (p - ptv) * inv_tau + c;
      const vec e = vexp<T>(-vabs<T>(z));
      const vec sp = (z > vec{} ? z : vec{}) + vlog1p_unit<T>(e);
      const vec r = T(1) / (T(1) + e);
      const vec sig = z >= vec{} ? r : e * r;
      mask keep = lane != target_lane<T>(t - base);
      if (ci == nfull) keep &= lanes_below<T>(rem);
      sp_lane += keep ? sp : vec{};
      g_lane += keep ? sig : vec{};
      pg_lane += keep ? p * sig : vec{};
      if (GRAD) store(sigs + base, sig);
    }
    sp_acc += widen<T>(sp_lane);
    g_acc += widen<T>(g_lane);
    pg_acc += widen<T>(pg_lane);
    sp_lane = g_lane = pg_lane = vec{};
  }

  if (GRAD) {
    // pass 4: grad_s = scale (aw p_s (g_s - dot) + nw p_s), g_s = sig_s / tau
    const double g_t = -k.inv_tau * hsum_wide<T>(g_acc);
    const double dot = k.inv_tau * hsum_wide<T>(pg_acc) + double(pt) * g_t;
    const double nw = NLLGRAD ? k.nw : 0.0;
    const vec a1 = splat<vec>(T(k.scale * k.aw * k.inv_tau));
    const vec a0 = splat<vec>(T(k.scale * (k.aw * dot - nw)));
    for (int64_t ci = 0; ci < nfull; ++ci) {
      const int64_t base = ci * W;
      store_as<T>(grad_row + base, load<vec>(prob + base) * (load<vec>(sigs + base) * a1 - a0));
    }
    if (rem) {
      const int64_t base = nfull * W;
      S gbuf[W];
      store_as<T>(gbuf, load<vec>(prob + base) * (load<vec>(sigs + base) * a1 - a0));
      std::memcpy(grad_row + base, gbuf, sizeof(S) * rem);
    }
    // p_t - 1 = -(S - u_t)/S, without the cancellation of 1 - p_t
    const double pt_minus_one = -(s_sum - u_t) / s_sum;
    grad_row[t] =
        ddf::to_storage_as<S>(k.scale * (k.aw * double(pt) * (g_t - dot) + nw * pt_minus_one));
  }
  *loss_out = T(hsum_wide<T>(sp_acc));
  // logsumexp(l) is the max when that is infinite (s_sum is NaN then), as torch.logsumexp
  const double lse = std::isfinite(m) ? double(m) + std::log(s_sum) : double(m);
  *nll_out = NLL && k.write_nll ? (has_nan ? T(NAN) : T(lse - double(lt))) : T(0);
  *correct_out = hsum_int<T>(not_below) == 1;
}

template <typename S, bool PROB, bool GRAD, bool NLL, bool NLLGRAD>
DDF_INLINE void rows_impl(const Call& a, int64_t lo, int64_t hi, int thread) {
  typedef typename ComputeOf<S>::type T;
  const S* logits = reinterpret_cast<const S*>(a.logits);
  const int64_t* target = reinterpret_cast<const int64_t*>(a.target);
  T* loss = reinterpret_cast<T*>(a.loss_out);
  T* nll = reinterpret_cast<T*>(a.nll_out);
  uint8_t* correct = reinterpret_cast<uint8_t*>(a.correct_out);
  S* grad = reinterpret_cast<S*>(a.grad_out);
  T* scratch = reinterpret_cast<T*>(a.scratch) + int64_t(thread) * a.scratch_stride;
  const int64_t V = a.V;
  Consts k;
  k.inv_tau = 1.0 / a.tau;
  k.c = std::log1p(-a.tau) - std::log(a.tau);
  k.scale = GRAD ? double(*reinterpret_cast<const float*>(a.grad_scale)) : 0.0;
  k.aw = a.aw;
  k.nw = a.nw;
  k.write_nll = a.nll;
  for (int64_t n = lo; n < hi; ++n) {
    const S* row = logits + n * a.row_stride;
    S* grad_row = GRAD ? grad + n * V : nullptr;
    const int64_t t = target[n];
    if (t == a.ignore_index) {
      loss[n] = 0;
      nll[n] = 0;
      correct[n] = 1;
      if (GRAD) std::memset(grad_row, 0, sizeof(S) * V);
      continue;
    }
    if (V == 1 && t == 0) {
      // The only class is the unique max unless it is NaN. Every term is 0 for a
      // finite logit; x - x carries a NaN or infinite one through as NaN where
      // the reference's formulas do (logsumexp(l) - l_t, and softmax in prob mode).
      const double x = ddf::to_float(row[0]);
      const double d = x - x;
      loss[n] = 0;
      nll[n] = NLL ? T(d) : T(0);
      correct[n] = !std::isnan(x);
      if (GRAD) grad_row[0] = ddf::to_storage_as<S>((PROB || NLLGRAD) ? d : 0.0);
      continue;
    }
    if (t < 0 || t >= V) {
      // callers reject these before the kernel; never read out of bounds
      loss[n] = nll[n] = std::numeric_limits<T>::quiet_NaN();
      correct[n] = 0;
      if (GRAD)
        std::fill(grad_row, grad_row + V,
                  ddf::to_storage_as<S>(std::numeric_limits<double>::quiet_NaN()));
      continue;
    }
    if (PROB)
      prob_row<S, GRAD, NLL, NLLGRAD>(row, grad_row, V, t, k, scratch, loss + n, nll + n,
                                      correct + n);
    else
      logit_row<S, GRAD, NLL, NLLGRAD>(row, grad_row, V, t, k, loss + n, nll + n, correct + n);
  }
}

template <typename S, bool PROB>
DDF_INLINE void rows_flags(const Call& a, int64_t lo, int64_t hi, int thread) {
  if (a.nll_grad)
    rows_impl<S, PROB, true, true, true>(a, lo, hi, thread);
  else if (a.grad && a.nll)
    rows_impl<S, PROB, true, true, false>(a, lo, hi, thread);
  else if (a.grad)
    rows_impl<S, PROB, true, false, false>(a, lo, hi, thread);
  else if (a.nll)
    rows_impl<S, PROB, false, true, false>(a, lo, hi, thread);
  else
    rows_impl<S, PROB, false, false, false>(a, lo, hi, thread);
}

template <typename S>
DDF_INLINE void rows_mode(const Call& a, int64_t lo, int64_t hi, int thread) {
  if (a.prob)
    rows_flags<S, true>(a, lo, hi, thread);
  else
    rows_flags<S, false>(a, lo, hi, thread);
}

// Entry point of this instruction set's copy.
void rows(const Call& a, int64_t lo, int64_t hi, int thread) {
  switch (a.dtype) {
    case DTYPE_FLOAT64:
      return rows_mode<double>(a, lo, hi, thread);
    case DTYPE_BFLOAT16:
      return rows_mode<ddf::bf16>(a, lo, hi, thread);
    case DTYPE_FLOAT16:
      return rows_mode<ddf::f16>(a, lo, hi, thread);
    default:
      return rows_mode<float>(a, lo, hi, thread);
  }
}

#ifdef DDF_TEST_HOOKS
// Elementwise exp / log1p over a buffer, for the accuracy tests.
template <typename T>
DDF_INLINE void math_impl(int op, uintptr_t in, uintptr_t out, int64_t n) {
  typedef typename Lanes<T>::vec vec;
  constexpr int W = Lanes<T>::W;
  const T* x = reinterpret_cast<const T*>(in);
  T* y = reinterpret_cast<T*>(out);
  for (int64_t i = 0; i < n; i += W) {
    T buf[W];
    const int64_t m = std::min<int64_t>(W, n - i);
    for (int j = 0; j < W; ++j) buf[j] = 0;
    std::memcpy(buf, x + i, sizeof(T) * m);
    const vec v = load<vec>(buf);
    store(buf, op == 0 ? vexp<T>(v) : vlog1p_unit<T>(v));
    std::memcpy(y + i, buf, sizeof(T) * m);
  }
}

void math(int op, bool is_double, uintptr_t in, uintptr_t out, int64_t n) {
  if (is_double)
    math_impl<double>(op, in, out, n);
  else
    math_impl<float>(op, in, out, n);
}
#endif  // DDF_TEST_HOOKS

#endif  // DDF_KERNEL_BODY
