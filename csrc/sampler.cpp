// ddvae_fast._sampler: the 'cpp' backend of ddvae_fast.RejectionSampler.
//
// Counter-based random stream (shared with the Triton backend, see
// kernels/rejection_sampler.py): Philox4x32-10 with key (seed_lo, seed_hi) and
// counter (j_lo, j_hi, 0, 0) for block j gives four 32-bit words w0..w3. A
// refill consumes a whole number of blocks starting at the sampler's block
// offset, so (seed, block offset) is the whole RNG state.
//
//   rejection, candidate i: block i >> 1, words (w0, w1) if i is even, else
//       (w2, w3); u = sym(first), v = unit(second); keep u iff g(u) > v, with
//       g = K / K(0) the kernel's shape. That is the paper's test
//       K(u) > K(0) v with the constant divided out; the K(0) that sizes the
//       refills comes from smoothing_kernels.py on the Python side.
//   transform: uniform sym(w) (4 per block); triangular (sym(a) + sym(b)) / 2
//       (2 per block); epanechnikov median-of-three on (w0, w1, w2) (1 per
//       block); cosine (2/pi) asin(sym(w)) (4 per block).
//   gaussian: Box-Muller on (w0, w1) and on (w2, w3) (4 per block).
//
//   sym(w)  = (2 (w >> 9) + 1 - 2^23) * 2^-23: odd-symmetric grid inside (-1, 1), exact
//   unit(w) = (w >> 8) * 2^-24 in [0, 1), exact
//
// The math is written once, as templates over a lane type: `float` for the
// scalar path and `VF` (16 floats, AVX-512) for the vector path. With
// floating-point contraction switched off in this file both paths execute the
// same IEEE operations in the same order, so they agree bit for bit (tested),
// and the Triton kernels repeat the same sequence.
//
// Draws come out in candidate order whatever the thread count or timing: the
// blocks are cut into fixed tiles; a thread compacts a tile's kept draws into a
// small local array, and tiles get their output positions strictly in tile
// order (a prefix sum over tiles, see TileJob). One pass over the candidates,
// no regeneration, no atomics deciding order.
#pragma GCC optimize("fp-contract=off")

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#if DDF_X86
#include <immintrin.h>
#endif

#pragma GCC diagnostic ignored "-Wpsabi"

namespace py = pybind11;

// The math templates are instantiated with AVX-512 lanes inside the AVX-512
// tile functions; DDF_INLINE (forced inlining) compiles them with that target
// there (a separate default-target instantiation would pass 64-byte vectors
// by value through a non-AVX-512 ABI).

namespace {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kRounds = 10;
constexpr int64_t kTileBlocks = 4096;  // Philox blocks per tile: 8192 rejection candidates, 32 KiB
constexpr int64_t kMinBlocksPerThread =
    65536;  // ~100 us of work: less does not pay for waking a thread
constexpr int64_t kMaxDrawsPerBlock = 4;
constexpr int64_t kSimdSlack = 16;  // a 16-lane store may run past the last kept draw

struct Keys {
  uint32_t k0[kRounds];
  uint32_t k1[kRounds];
};

Keys make_keys(uint32_t key0, uint32_t key1) {
  Keys keys;
  for (int r = 0; r < kRounds; ++r) {
    keys.k0[r] = key0;
    keys.k1[r] = key1;
    key0 += kPhiloxW0;
    key1 += kPhiloxW1;
  }
  return keys;
}

inline void philox_rounds(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                          const Keys& keys) {
  for (int r = 0; r < kRounds; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ keys.k0[r];
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ keys.k1[r];
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
  }
}

inline void philox_block(uint64_t block, const Keys& keys, uint32_t w[4]) {
  uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32), c2 = 0,
           c3 = 0;
  philox_rounds(c0, c1, c2, c3, keys);
  w[0] = c0;
  w[1] = c1;
  w[2] = c2;
  w[3] = c3;
}

// Taylor coefficients of sin(pi/2 x) = sum_k s_k x^(2k+1) and cos(pi/2 x) =
// sum_k c_k x^(2k), k = 0..6, by the same double recurrences as
// kernels/rejection_sampler.py (so the rounded float constants agree).
// Truncation error < 7e-10 on [-1, 1].
struct Taylor {
  float s[7];
  float c[7];
};

constexpr Taylor make_taylor() {
  Taylor t{};
  const double h = 1.5707963267948966;  // pi / 2
  double st = h, ct = 1.0;
  for (int k = 0; k < 7; ++k) {
    t.s[k] = static_cast<float>(st);
    t.c[k] = static_cast<float>(ct);
    st = st * (-(h * h)) / static_cast<double>((2 * k + 2) * (2 * k + 3));
    ct = ct * (-(h * h)) / static_cast<double>((2 * k + 1) * (2 * k + 2));
  }
  return t;
}
constexpr Taylor kTaylor = make_taylor();

// ------------------------------------------------------------------ scalar lanes
inline float vabs(float x) { return std::fabs(x); }
inline float vsqrt(float x) { return std::sqrt(x); }
inline float vselect(bool m, float a, float b) { return m ? a : b; }
inline float vneg(float x) { return -x; }
inline float to_float(int32_t i) { return static_cast<float>(i); }
inline int32_t trunc_int(float x) { return static_cast<int32_t>(x); }
inline int32_t float_bits(float x) {
  int32_t i;
  std::memcpy(&i, &x, sizeof i);
  return i;
}
inline float bits_float(int32_t i) {
  float x;
  std::memcpy(&x, &i, sizeof x);
  return x;
}
inline int32_t srl_int(uint32_t w, int s) { return static_cast<int32_t>(w >> s); }  // w >> s < 2^31
inline int32_t sra(int32_t i, int s) { return i >> s; }
inline int32_t sll(int32_t i, int s) { return static_cast<int32_t>(static_cast<uint32_t>(i) << s); }
inline int32_t and_int(int32_t i, int32_t m) { return i & m; }
inline bool eq_int(int32_t i, int32_t j) { return i == j; }
inline bool mask_and(bool a, bool b) { return a && b; }

// -------------------------------------------------- the math, once, for any lane
// F: float lanes, I: int32 lanes, U: uint32 lanes (words). Operation order is
// part of the stream's definition: change it here and in the Triton kernels.
template <class F, class U>
DDF_INLINE F sym(U w) {
  const auto t = sll(srl_int(w, 9), 1) + 1 - (1 << 23);
  return to_float(t) * F(0x1p-23f);
}

template <class F, class U>
DDF_INLINE F unit(U w) {
  return to_float(srl_int(w, 8)) * F(0x1p-24f);
}

enum class Shape { Uniform, Triangular, Epanechnikov, Quartic, Triweight, Tricube, Cosine };

// g(u) = K(u) / K(0) on (-1, 1).
template <Shape S, class F>
DDF_INLINE F shape_g(F u) {
  const F one(1.0f);
  if constexpr (S == Shape::Uniform) {
    return one;
  } else if constexpr (S == Shape::Triangular) {
    return one - vabs(u);
  } else if constexpr (S == Shape::Epanechnikov) {
    return one - u * u;
  } else if constexpr (S == Shape::Quartic) {
    const F s = one - u * u;
    return s * s;
  } else if constexpr (S == Shape::Triweight) {
    const F s = one - u * u;
    return (s * s) * s;
  } else if constexpr (S == Shape::Tricube) {
    const F a = vabs(u);
    const F t = one - (a * a) * a;
    return (t * t) * t;
  } else {  // cos(pi u / 2) = sin(pi/2 (1 - |u|)); 1 - |u| is exact on the grid
    const F y = one - vabs(u);
    const F y2 = y * y;
    F p(kTaylor.s[6]);
    for (int k = 5; k >= 0; --k) p = p * y2 + F(kTaylor.s[k]);
    return y * p;
  }
}

// (2/pi) asin(x) on (-1, 1): the Cephes asinf polynomial.
template <class F>
DDF_INLINE F asin_over_half_pi(F x) {
  const F a = vabs(x);
  const auto big = a > F(0.5f);
  const F z = vselect(big, F(0.5f) * (F(1.0f) - a), a * a);
  const F s = vselect(big, vsqrt(z), a);
  F p(4.2163199048e-2f);
  p = p * z + F(2.4181311049e-2f);
  p = p * z + F(4.5470025998e-2f);
  p = p * z + F(7.4953002686e-2f);
  p = p * z + F(1.6666752422e-1f);
  p = (p * z) * s + s;  // asin(min(|x|, sqrt((1 - |x|) / 2)))
  const F r = vselect(big, F(1.0f) - F(1.2732395447351628f) * p, F(0.6366197723675814f) * p);
  return vselect(x < F(0.0f), vneg(r), r);
}

// log(x) for normal x > 0: the Cephes logf polynomial without branches.
template <class F>
DDF_INLINE F log_positive(F x) {
  const auto bits = float_bits(x);
  const auto e = sra(bits - 0x3f3504f3, 23);  // x = m 2^e with m in [sqrt(1/2), sqrt(2))
  const F m = bits_float(bits - sll(e, 23));
  const F f = m - F(1.0f);  // exact (Sterbenz)
  const F ef = to_float(e);
  const F z = f * f;
  F y(7.0376836292e-2f);
  y = y * f + F(-1.1514610310e-1f);
  y = y * f + F(1.1676998740e-1f);
  y = y * f + F(-1.2420140846e-1f);
  y = y * f + F(1.4249322787e-1f);
  y = y * f + F(-1.6668057665e-1f);
  y = y * f + F(2.0000714765e-1f);
  y = y * f + F(-2.4999993993e-1f);
  y = y * f + F(3.3333331174e-1f);
  y = (y * f) * z;
  y = y + F(-2.12194440e-4f) * ef;
  y = y + F(-0.5f) * z;
  F r = f + y;
  r = r + F(0.693359375f) * ef;
  return r;
}

// sin and cos of 2 pi t for t in [0, 1) on the 2^-24 grid: the quadrant is
// exact (4t - round(4t) is exact), the rest is a Taylor polynomial in [-pi/4, pi/4].
template <class F>
DDF_INLINE void sincos_two_pi(F t, F& sin_out, F& cos_out) {
  const F q = t * F(4.0f);
  const auto k = trunc_int(q + F(0.5f));
  const F f = q - to_float(k);
  const F f2 = f * f;
  F sp(kTaylor.s[6]), cp(kTaylor.c[6]);
  for (int i = 5; i >= 0; --i) {
    sp = sp * f2 + F(kTaylor.s[i]);
    cp = cp * f2 + F(kTaylor.c[i]);
  }
  sp = f * sp;
  const auto quadrant = and_int(k, 3);
  const auto q1 = eq_int(quadrant, 1), q2 = eq_int(quadrant, 2), q3 = eq_int(quadrant, 3);
  sin_out = vselect(q1, cp, vselect(q2, vneg(sp), vselect(q3, vneg(cp), sp)));
  cos_out = vselect(q1, vneg(sp), vselect(q2, vneg(cp), vselect(q3, sp, cp)));
}

template <class F, class U>
DDF_INLINE void box_muller(U a, U b, F& z0, F& z1) {
  const F u1 = to_float(srl_int(a, 8) + 1) * F(0x1p-24f);  // (0, 1]: the log stays finite
  const F r = vsqrt(F(-2.0f) * log_positive(u1));
  F s, c;
  sincos_two_pi(unit<F>(b), s, c);
  z0 = r * c;
  z1 = r * s;
}

enum class Transform { Uniform, Triangular, Epanechnikov, Cosine, Gaussian };

template <Transform T>
constexpr int transform_draws_per_block() {
  if constexpr (T == Transform::Triangular) return 2;
  if constexpr (T == Transform::Epanechnikov) return 1;
  return 4;
}

// The draws of one block (or of 16 blocks, lane-wise), in stream order.
template <Transform T, class F, class U>
DDF_INLINE void transform_draws(U w0, U w1, U w2, U w3, F d[4]) {
  if constexpr (T == Transform::Uniform) {
    d[0] = sym<F>(w0);
    d[1] = sym<F>(w1);
    d[2] = sym<F>(w2);
    d[3] = sym<F>(w3);
  } else if constexpr (T == Transform::Triangular) {
    d[0] = (sym<F>(w0) + sym<F>(w1)) * F(0.5f);
    d[1] = (sym<F>(w2) + sym<F>(w3)) * F(0.5f);
  } else if constexpr (T == Transform::Epanechnikov) {
    // Devroye: of three U(-1, 1), the second if the third has the largest modulus, else the third.
    const F x1 = sym<F>(w0), x2 = sym<F>(w1), x3 = sym<F>(w2);
    const F a3 = vabs(x3);
    d[0] = vselect(mask_and(a3 >= vabs(x2), a3 >= vabs(x1)), x2, x3);
  } else if constexpr (T == Transform::Cosine) {
    d[0] = asin_over_half_pi(sym<F>(w0));
    d[1] = asin_over_half_pi(sym<F>(w1));
    d[2] = asin_over_half_pi(sym<F>(w2));
    d[3] = asin_over_half_pi(sym<F>(w3));
  } else {
    box_muller(w0, w1, d[0], d[1]);
    box_muller(w2, w3, d[2], d[3]);
  }
}

// sigma in (0, inf), NaN excluded, on its bits: read as signed integers of the
// same width, floats >= +0 order like their values and everything else (sign
// bit set, NaN, inf) falls outside [1, largest finite] (as _positive_finite in
// sampling/sampler.py), whatever the denormals-are-zero mode.
inline bool sigma_ok(float s) {
  int32_t bits;
  std::memcpy(&bits, &s, sizeof bits);
  return bits >= 1 && bits <= 0x7F7FFFFF;
}
inline bool sigma_ok(double s) {
  int64_t bits;
  std::memcpy(&bits, &s, sizeof bits);
  return bits >= 1 && bits <= 0x7FEFFFFFFFFFFFFF;
}

// Position i of the reparametrised draw (see Affine): z = fma(sigma, eps, mu), one rounding.
template <class T>
inline bool affine_one(float e, float* eps_out, const T* mu, const T* sigma, T* z, int64_t i) {
  if (eps_out != nullptr) eps_out[i] = e;
  z[i] = std::fma(sigma[i], static_cast<T>(e), mu[i]);
  return sigma_ok(sigma[i]);
}

template <class T>
bool affine_scalar(const float* eps, float* eps_out, const T* mu, const T* sigma, T* z, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= affine_one(eps[i], eps_out, mu, sigma, z, i);
  return ok;
}

// ------------------------------------------------------------ tile functions
// A tile function generates n_blocks Philox blocks starting at first_block and
// writes the kept draws, in stream order, to dst; it returns how many. dst
// holds at least n_blocks * kMaxDrawsPerBlock + kSimdSlack floats.
using TileFn = int64_t (*)(uint64_t first_block, int64_t n_blocks, const Keys& keys, float* dst);

template <Shape S>
int64_t rejection_tile_scalar(uint64_t first_block, int64_t n_blocks, const Keys& keys,
                              float* dst) {
  int64_t count = 0;
  for (int64_t j = 0; j < n_blocks; ++j) {
    uint32_t w[4];
    philox_block(first_block + static_cast<uint64_t>(j), keys, w);
    const float u0 = sym<float>(w[0]);
    dst[count] = u0;
    count += shape_g<S>(u0) > unit<float>(w[1]);
    const float u1 = sym<float>(w[2]);
    dst[count] = u1;
    count += shape_g<S>(u1) > unit<float>(w[3]);
  }
  return count;
}

template <Transform T>
int64_t transform_tile_scalar(uint64_t first_block, int64_t n_blocks, const Keys& keys,
                              float* dst) {
  constexpr int per = transform_draws_per_block<T>();
  for (int64_t j = 0; j < n_blocks; ++j) {
    uint32_t w[4];
    philox_block(first_block + static_cast<uint64_t>(j), keys, w);
    float d[4];
    transform_draws<T, float, uint32_t>(w[0], w[1], w[2], w[3], d);
    for (int k = 0; k < per; ++k) dst[per * j + k] = d[k];
  }
  return per * n_blocks;
}

#if DDF_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,popcnt")
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on _mm512_undefined_*.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define DDF_VBYTES 64
namespace avx512 {
#include "simd.h"
}  // namespace avx512
#undef DDF_VBYTES

// 16 lanes of float / int32 / uint32 and a lane mask (csrc/simd.h's vector
// types), with the operations the templates above use. The wrappers keep the
// scalar overloads (float, int32_t, bool) and these apart.
typedef avx512::Lanes<float> L16;
struct VM {
  L16::mask m;  // -1 / 0 per lane
};
struct VI {
  L16::mask v;
};
struct VU {
  L16::bits v;
};
struct VF {
  L16::vec v;
  VF() = default;
  explicit VF(L16::vec x) : v(x) {}
  explicit VF(float c) : v(avx512::splat<L16::vec>(c)) {}
};
inline VF operator+(VF a, VF b) { return VF(a.v + b.v); }
inline VF operator-(VF a, VF b) { return VF(a.v - b.v); }
inline VF operator*(VF a, VF b) { return VF(a.v * b.v); }
inline VM operator>(VF a, VF b) { return {a.v > b.v}; }
inline VM operator>=(VF a, VF b) { return {a.v >= b.v}; }
inline VM operator<(VF a, VF b) { return {a.v < b.v}; }
inline VF vabs(VF x) { return VF(avx512::vabs<float>(x.v)); }
// no vector-extension form of the square root
inline VF vsqrt(VF x) { return VF(_mm512_sqrt_ps(x.v)); }
inline VF vneg(VF x) { return VF((L16::vec)((L16::bits)x.v ^ 0x80000000u)); }
inline VF vselect(VM m, VF a, VF b) { return VF(m.m ? a.v : b.v); }
inline VM mask_and(VM a, VM b) { return {a.m & b.m}; }
inline VI operator+(VI a, int32_t c) { return {a.v + c}; }
inline VI operator-(VI a, int32_t c) { return {a.v - c}; }
inline VI operator-(VI a, VI b) { return {a.v - b.v}; }
inline VF to_float(VI i) { return VF(__builtin_convertvector(i.v, L16::vec)); }
inline VI trunc_int(VF x) { return {__builtin_convertvector(x.v, L16::mask)}; }
inline VI float_bits(VF x) { return {(L16::mask)x.v}; }
inline VF bits_float(VI i) { return VF((L16::vec)i.v); }
inline VI srl_int(VU w, int s) { return {(L16::mask)(w.v >> s)}; }
inline VI sra(VI i, int s) { return {i.v >> s}; }
inline VI sll(VI i, int s) { return {(L16::mask)((L16::bits)i.v << s)}; }
inline VI and_int(VI i, int32_t m) { return {i.v & m}; }
inline VM eq_int(VI i, int32_t c) { return {i.v == c}; }

inline uint16_t lane_bits(VM m) {  // bit j = lane j
  return static_cast<uint16_t>(_mm512_movepi32_mask((__m512i)m.m));
}

// High 32 bits of the 64-bit products a * m, lane by lane: the even and the
// odd lanes as 64-bit lanes, then the high words back in place. The 32 x 32
// -> 64-bit multiply is an intrinsic (vpmuludq): GCC 12 turns the vector
// extension form into the much slower 64 x 64-bit vpmullq.
inline L16::bits mulhi(L16::bits a, uint32_t m) {
  typedef uint64_t u64x8 __attribute__((vector_size(64)));
  const __m512i mv = (__m512i)avx512::splat<L16::bits>(m);
  const u64x8 even = (u64x8)_mm512_mul_epu32((__m512i)a, mv);
  const u64x8 odd = (u64x8)_mm512_mul_epu32((__m512i)((u64x8)a >> 32), mv);
  return (L16::bits)((even >> 32) | (odd & 0xffffffff00000000u));
}

// Philox for the 16 consecutive blocks first_block .. first_block + 15.
inline void philox16(uint64_t first_block, const Keys& keys, VU w[4]) {
  const L16::bits lo = avx512::splat<L16::bits>(static_cast<uint32_t>(first_block));
  const L16::bits hi = avx512::splat<L16::bits>(static_cast<uint32_t>(first_block >> 32));
  L16::bits c0 = lo + (L16::bits)avx512::iota<float>();
  L16::bits c1 = hi - (L16::bits)(c0 < lo);  // + 1 where the low word wrapped
  L16::bits c2{}, c3{};
  for (int r = 0; r < kRounds; ++r) {
    const L16::bits hi0 = mulhi(c0, kPhiloxM0);
    const L16::bits lo0 = c0 * kPhiloxM0;
    const L16::bits hi1 = mulhi(c2, kPhiloxM1);
    const L16::bits lo1 = c2 * kPhiloxM1;
    c0 = hi1 ^ c1 ^ keys.k0[r];
    c2 = hi0 ^ c3 ^ keys.k1[r];
    c1 = lo1;
    c3 = lo0;
  }
  w[0] = {c0};
  w[1] = {c1};
  w[2] = {c2};
  w[3] = {c3};
}

// Lanes of a and b interleaved: (a0, b0, a1, b1, ...), as two vectors.
inline void interleave(VF a, VF b, VF& lo, VF& hi) {
  const L16::mask idx_lo{0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
  const L16::mask idx_hi{8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  lo = VF(__builtin_shuffle(a.v, b.v, idx_lo));
  hi = VF(__builtin_shuffle(a.v, b.v, idx_hi));
}

// The lanes of v where keep is set, packed to the front of dst (16 floats are
// written); returns how many. No vector-extension form of compress: the
// register-form intrinsic then a plain store (the memory form is microcoded on AMD).
inline int64_t compress_store(float* dst, VM keep, VF v) {
  const uint16_t bits = lane_bits(keep);
  avx512::store(dst, (L16::vec)_mm512_maskz_compress_ps(bits, v.v));
  return __builtin_popcount(bits);
}

template <Shape S>
int64_t rejection_tile_avx512(uint64_t first_block, int64_t n_blocks, const Keys& keys,
                              float* dst) {
  int64_t count = 0;
  int64_t j = 0;
  for (; j + 16 <= n_blocks; j += 16) {
    VU w[4];
    philox16(first_block + static_cast<uint64_t>(j), keys, w);
    // Candidates 2j (words 0, 1) and 2j+1 (words 2, 3) back in candidate order.
    VF ua, ub, va, vb;
    interleave(sym<VF>(w[0]), sym<VF>(w[2]), ua, ub);
    interleave(unit<VF>(w[1]), unit<VF>(w[3]), va, vb);
    count += compress_store(dst + count, shape_g<S>(ua) > va, ua);
    count += compress_store(dst + count, shape_g<S>(ub) > vb, ub);
  }
  return count + rejection_tile_scalar<S>(first_block + static_cast<uint64_t>(j), n_blocks - j,
                                          keys, dst + count);
}

template <Transform T>
int64_t transform_tile_avx512(uint64_t first_block, int64_t n_blocks, const Keys& keys,
                              float* dst) {
  constexpr int per = transform_draws_per_block<T>();
  int64_t j = 0;
  for (; j + 16 <= n_blocks; j += 16) {
    VU w[4];
    philox16(first_block + static_cast<uint64_t>(j), keys, w);
    VF d[4];
    transform_draws<T, VF, VU>(w[0], w[1], w[2], w[3], d);
    float* o = dst + per * j;
    if constexpr (per == 1) {
      avx512::store(o, d[0].v);
    } else if constexpr (per == 2) {
      VF lo, hi;
      interleave(d[0], d[1], lo, hi);
      avx512::store(o, lo.v);
      avx512::store(o + 16, hi.v);
    } else {  // (d0, d1, d2, d3) per block = interleave(interleave(d0, d2), interleave(d1, d3))
      VF a_lo, a_hi, b_lo, b_hi, x, y;
      interleave(d[0], d[2], a_lo, a_hi);
      interleave(d[1], d[3], b_lo, b_hi);
      interleave(a_lo, b_lo, x, y);
      avx512::store(o, x.v);
      avx512::store(o + 16, y.v);
      interleave(a_hi, b_hi, x, y);
      avx512::store(o + 32, x.v);
      avx512::store(o + 48, y.v);
    }
  }
  transform_tile_scalar<T>(first_block + static_cast<uint64_t>(j), n_blocks - j, keys,
                           dst + per * j);
  return per * n_blocks;
}

// The reparametrised draw over n positions (see Affine): z = fma(sigma, eps, mu),
// eps copied to eps_out if given; returns whether every sigma lies in (0, inf),
// tested on its bits as sigma_ok does. Stream: non-temporal stores for z (and
// for eps_out when it is aligned like z), for outputs too large to stay in cache.
template <bool Stream>
bool affine_avx512(const float* eps, float* eps_out, const float* mu, const float* sigma, float* z,
                   int64_t n) {
  bool ok = true;
  int64_t i = 0;
  if constexpr (Stream)
    for (; i < n && (reinterpret_cast<uintptr_t>(z + i) & 63); ++i)
      ok &= affine_one(eps[i], eps_out, mu, sigma, z, i);
  const bool eps_stream = Stream && eps_out && !(reinterpret_cast<uintptr_t>(eps_out + i) & 63);
  const __m512i low = _mm512_set1_epi32(1), high = _mm512_set1_epi32(0x7F7FFFFF);
  __mmask16 bad = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 e = _mm512_loadu_ps(eps + i);
    const __m512 s = _mm512_loadu_ps(sigma + i);
    const __m512i bits = _mm512_castps_si512(s);
    bad |= _mm512_cmplt_epi32_mask(bits, low) | _mm512_cmpgt_epi32_mask(bits, high);
    const __m512 r = _mm512_fmadd_ps(s, e, _mm512_loadu_ps(mu + i));
    if constexpr (Stream) {
      _mm512_stream_ps(z + i, r);
    } else {
      _mm512_storeu_ps(z + i, r);
    }
    if (eps_stream) {
      _mm512_stream_ps(eps_out + i, e);
    } else if (eps_out) {
      _mm512_storeu_ps(eps_out + i, e);
    }
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 e = _mm512_maskz_loadu_ps(m, eps + i);
    const __m512 s = _mm512_maskz_loadu_ps(m, sigma + i);
    const __m512i bits = _mm512_castps_si512(s);
    bad |= m & (_mm512_cmplt_epi32_mask(bits, low) | _mm512_cmpgt_epi32_mask(bits, high));
    _mm512_mask_storeu_ps(z + i, m, _mm512_fmadd_ps(s, e, _mm512_maskz_loadu_ps(m, mu + i)));
    if (eps_out) _mm512_mask_storeu_ps(eps_out + i, m, e);
  }
  if constexpr (Stream) _mm_sfence();  // order the non-temporal stores before the job completes
  return ok && bad == 0;
}

template <bool Stream>
bool affine_avx512(const float* eps, float* eps_out, const double* mu, const double* sigma,
                   double* z, int64_t n) {
  bool ok = true;
  int64_t i = 0;
  if constexpr (Stream)
    for (; i < n && (reinterpret_cast<uintptr_t>(z + i) & 63); ++i)
      ok &= affine_one(eps[i], eps_out, mu, sigma, z, i);
  const bool eps_stream = Stream && eps_out && !(reinterpret_cast<uintptr_t>(eps_out + i) & 31);
  const __m512i low = _mm512_set1_epi64(1), high = _mm512_set1_epi64(0x7FEFFFFFFFFFFFFF);
  __mmask8 bad = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = _mm256_loadu_ps(eps + i);
    const __m512d s = _mm512_loadu_pd(sigma + i);
    const __m512i bits = _mm512_castpd_si512(s);
    bad |= _mm512_cmplt_epi64_mask(bits, low) | _mm512_cmpgt_epi64_mask(bits, high);
    const __m512d r = _mm512_fmadd_pd(s, _mm512_cvtps_pd(e), _mm512_loadu_pd(mu + i));  // exact cvt
    if constexpr (Stream) {
      _mm512_stream_pd(z + i, r);
    } else {
      _mm512_storeu_pd(z + i, r);
    }
    if (eps_stream) {
      _mm256_stream_ps(eps_out + i, e);
    } else if (eps_out) {
      _mm256_storeu_ps(eps_out + i, e);
    }
  }
  if (i < n) {
    const __mmask8 m = static_cast<__mmask8>((1u << (n - i)) - 1);
    const __m256 e = _mm256_maskz_loadu_ps(m, eps + i);
    const __m512d s = _mm512_maskz_loadu_pd(m, sigma + i);
    const __m512i bits = _mm512_castpd_si512(s);
    bad |= m & (_mm512_cmplt_epi64_mask(bits, low) | _mm512_cmpgt_epi64_mask(bits, high));
    _mm512_mask_storeu_pd(z + i, m,
                          _mm512_fmadd_pd(s, _mm512_cvtps_pd(e), _mm512_maskz_loadu_pd(m, mu + i)));
    if (eps_out) _mm256_mask_storeu_ps(eps_out + i, m, e);
  }
  if constexpr (Stream) _mm_sfence();
  return ok && bad == 0;
}

// dst[0, n) = src[0, n) with non-temporal stores once dst is 64-byte aligned.
inline void stream_copy_avx512(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 63); ++i) dst[i] = src[i];
  for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
  _mm_sfence();
}

#pragma GCC diagnostic pop
#pragma GCC pop_options

#endif  // DDF_X86

Shape shape_from_name(const std::string& name) {
  if (name == "uniform") return Shape::Uniform;
  if (name == "triangular") return Shape::Triangular;
  if (name == "epanechnikov") return Shape::Epanechnikov;
  if (name == "quartic") return Shape::Quartic;
  if (name == "triweight") return Shape::Triweight;
  if (name == "tricube") return Shape::Tricube;
  if (name == "cosine") return Shape::Cosine;
  throw std::invalid_argument("rejection sampling has no kernel named '" + name + "'");
}

template <Shape S>
TileFn rejection_for(bool simd) {
#if DDF_X86
  if (simd) return &rejection_tile_avx512<S>;
#endif
  (void)simd;
  return &rejection_tile_scalar<S>;
}

template <Transform T>
TileFn transform_for(bool simd) {
#if DDF_X86
  if (simd) return &transform_tile_avx512<T>;
#endif
  (void)simd;
  return &transform_tile_scalar<T>;
}

struct Plan {
  TileFn fn;
  int64_t draws_per_block;
};

Plan make_plan(const std::string& method, const std::string& kernel, bool simd) {
  if (method == "rejection") {
    switch (shape_from_name(kernel)) {
      case Shape::Uniform:
        return {rejection_for<Shape::Uniform>(simd), 2};
      case Shape::Triangular:
        return {rejection_for<Shape::Triangular>(simd), 2};
      case Shape::Epanechnikov:
        return {rejection_for<Shape::Epanechnikov>(simd), 2};
      case Shape::Quartic:
        return {rejection_for<Shape::Quartic>(simd), 2};
      case Shape::Triweight:
        return {rejection_for<Shape::Triweight>(simd), 2};
      case Shape::Tricube:
        return {rejection_for<Shape::Tricube>(simd), 2};
      case Shape::Cosine:
        return {rejection_for<Shape::Cosine>(simd), 2};
    }
  }
  if (method == "transform") {
    if (kernel == "uniform") return {transform_for<Transform::Uniform>(simd), 4};
    if (kernel == "triangular") return {transform_for<Transform::Triangular>(simd), 2};
    if (kernel == "epanechnikov") return {transform_for<Transform::Epanechnikov>(simd), 1};
    if (kernel == "cosine") return {transform_for<Transform::Cosine>(simd), 4};
    throw std::invalid_argument("no closed-form transform sampler for kernel '" + kernel + "'");
  }
  if (method == "gaussian") return {transform_for<Transform::Gaussian>(simd), 4};
  throw std::invalid_argument("unknown method '" + method +
                              "'; expected rejection, transform or gaussian");
}

// The copies of the tile functions, best first: "sse2" is the scalar code
// compiled for the baseline instruction set.
#if DDF_X86
const std::vector<std::string> kIsas{"avx512", "sse2"};
#else
const std::vector<std::string> kIsas{"sse2"};
#endif

// The reparametrised draw z = mu + sigma * eps, fused into the placement of the
// draws (rsample): the draws bound for the output are turned into z while they
// are in cache, so eps is never written out and read back. One rounding,
// z = fma(sigma, eps, mu) in mu's dtype (float32 or float64; the float32 eps is
// exact in both): the correctly rounded value, the same on every ISA, and what
// torch.addcmul computes on a CPU with FMA. mu, sigma and z are contiguous and
// indexed by output position; eps itself is written too only if the caller
// keeps it (the gradient with respect to sigma). The same pass checks
// 0 < sigma < inf (the refill then raises, and the caller rewinds its state):
// sigma is read once.
struct Affine {
  const void* mu = nullptr;  // null: plain draws
  const void* sigma = nullptr;
  void* z = nullptr;
  bool is_double = false;
  bool simd = false;
  bool stream = false;  // non-temporal stores (outputs much larger than a cache), z and eps
                        // or, for plain draws, out

  bool active() const { return mu != nullptr; }

  // z at output positions [position, position + n) from the draws eps[0, n),
  // eps copied to eps_out[position, ...) if eps_out is given; false if some
  // sigma there is not in (0, inf).
  bool apply(const float* eps, float* eps_out, int64_t position, int64_t n) const {
    if (eps_out != nullptr) eps_out += position;
    if (is_double)
      return run(eps, eps_out, static_cast<const double*>(mu) + position,
                 static_cast<const double*>(sigma) + position, static_cast<double*>(z) + position,
                 n);
    return run(eps, eps_out, static_cast<const float*>(mu) + position,
               static_cast<const float*>(sigma) + position, static_cast<float*>(z) + position, n);
  }

 private:
  template <class T>
  bool run(const float* eps, float* eps_out, const T* m, const T* s, T* out, int64_t n) const {
#if DDF_X86
    if (simd)
      return stream ? affine_avx512<true>(eps, eps_out, m, s, out, n)
                    : affine_avx512<false>(eps, eps_out, m, s, out, n);
#endif
    return affine_scalar(eps, eps_out, m, s, out, n);
  }
};

// Outputs (eps, or z and eps) of at least this many bytes are written with
// non-temporal stores: they cannot stay in a core's caches for the consumer
// anyway, and such stores skip reading each line before writing it.
constexpr int64_t kStreamBytes = int64_t{8} << 20;

const char* const kBadSigma = "sigma must be finite and > 0 everywhere";

inline void stream_copy(float* dst, const float* src, int64_t n) {
#if DDF_X86
  stream_copy_avx512(dst, src, n);
#else
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
#endif
}

// Place the tile's draws, which occupy stream positions [start, start + count):
// out[0, need) (as eps, and/or as z through `affine`) and then buffer[0, ...).
// Returns false if `affine` found a sigma outside (0, inf).
inline bool place(const float* src, int64_t start, int64_t count, float* out, int64_t need,
                  float* buffer, const Affine& affine) {
  const int64_t end = start + count;
  bool ok = true;
  if (start < need) {
    const int64_t stop = std::min(end, need);
    if (affine.active()) {
      ok = affine.apply(src, out, start, stop - start);
    } else if (affine.stream && affine.simd) {
      stream_copy(out + start, src, stop - start);
    } else {
      std::memcpy(out + start, src, static_cast<size_t>(stop - start) * sizeof(float));
    }
  }
  if (end > need) {
    const int64_t from = std::max(start, need);
    std::memcpy(buffer + (from - need), src + (from - start),
                static_cast<size_t>(end - from) * sizeof(float));
  }
  return ok;
}

// ---------------------------------------------------------------- scheduling
// A refill is a job of fixed tiles. Threads claim tiles dynamically, but tiles
// get their output positions strictly in tile order, under a mutex (a prefix
// sum over tiles), so the output depends neither on timing nor on the thread
// count.
//
// After computing a tile into its local array, a thread places it straight into
// the output if every earlier tile is placed (it first waits a moment for the
// tile just before it, which another thread is usually finishing). Otherwise it
// parks a copy in its arena and claims the next tile; whoever places the tile
// before a parked one also places the parked ones that follow. With its arena
// full, a thread does not wait for a slow owner of the blocking tile: it
// recomputes that tile itself (Philox is counter-based, so the result is the
// same) and places it; the owner later finds its tile placed and drops its copy.
//
// The threads are the caller's OpenMP team (ddf::on_team, csrc/common.h says
// why). A team thread that starts late finds no tile left and leaves; after
// the region the calling thread places the tiles still parked, recomputing
// any not yet placed, and waits only for copies already under way. The parked
// tiles stay valid until then: a team thread's arena is reused only by its
// next region, which starts after this refill returns.
constexpr int64_t kTileCapacity = kTileBlocks * kMaxDrawsPerBlock + kSimdSlack;
constexpr int64_t kParkSlots = 16;

// Per-thread storage: the working tile, a tile recomputed for another thread, and
// the parked tiles. Allocated once per OS thread and reused by every job
// (mapping and unmapping megabytes per call costs page faults and TLB shootdowns).
struct ThreadArena {
  std::unique_ptr<float[]> memory{new float[static_cast<size_t>((kParkSlots + 2) * kTileCapacity)]};
  float* local() { return memory.get(); }
  float* stolen() { return memory.get() + kTileCapacity; }
  float* slot(int64_t i) { return memory.get() + (i + 2) * kTileCapacity; }
};

ThreadArena& thread_arena() {
  static thread_local ThreadArena arena;
  return arena;
}

class TileJob final {
 public:
  // park_all (a test hook, DDF_TEST_HOOKS builds only) parks every tile it can
  // and never waits: the parking and recomputing paths then run deterministically.
  TileJob(TileFn fn, uint64_t block_offset, int64_t n_blocks, const Keys& keys, float* out,
          int64_t need, float* buffer, const Affine& affine, bool park_all)
      : n_tiles_((n_blocks + kTileBlocks - 1) / kTileBlocks),
        counts_(static_cast<size_t>(n_tiles_), 0),
        parked_(static_cast<size_t>(n_tiles_), nullptr),
#ifdef DDF_TEST_HOOKS
        park_all_(park_all),
#endif
        fn_(fn),
        block_offset_(block_offset),
        n_blocks_(n_blocks),
        keys_(keys),
        out_(out),
        need_(need),
        buffer_(buffer),
        affine_(affine) {
  }

  // Claim and finish tiles until none is left to claim. The arena's parked
  // tiles must stay untouched until this job is complete().
  void work() {
    ThreadArena& arena = thread_arena();
    int64_t slots_used = 0;
    for (int64_t tile = next_claim_.fetch_add(1); tile < n_tiles_;
         tile = next_claim_.fetch_add(1)) {
      const int64_t kept = compute(tile, arena.local());
      finish(tile, arena.local(), kept, arena, slots_used);
    }
  }

  // The calling thread, after work(): place whatever other threads still hold.
  void complete_from_caller() {
    ThreadArena& arena = thread_arena();
    for (int spin = 0; spin < kSpins && !all_placed(); ++spin) ddf::cpu_pause();
    place_up_to(n_tiles_, arena);
    // Only copies already under way remain: a few microseconds. Spin rather than
    // yield: on a loaded machine a yield hands the CPU away for a time slice.
    while (copies_in_flight_.load(std::memory_order_acquire) != 0) ddf::cpu_pause();
  }

  int64_t placed() const { return end_; }
  bool bad_sigma() const { return bad_sigma_.load(std::memory_order_relaxed); }
  int64_t n_tiles() const { return n_tiles_; }

 private:
  static constexpr int kSpins = 2000;  // tens of microseconds: about one tile's work
  using Chain =
      std::vector<std::tuple<const float*, int64_t, int64_t>>;  // (draws, count, position)

  bool all_placed() const { return next_.load(std::memory_order_acquire) >= n_tiles_; }

  int64_t compute(int64_t tile, float* dst) const {
    const int64_t first = tile * kTileBlocks, blocks = std::min(kTileBlocks, n_blocks_ - first);
    return fn_(block_offset_ + static_cast<uint64_t>(first), blocks, keys_, dst);
  }

  void finish(int64_t tile, const float* local, int64_t count, ThreadArena& arena,
              int64_t& slots_used) {
    if (!park_all_) {
      for (int spin = 0; spin < kSpins && next_.load(std::memory_order_acquire) < tile; ++spin)
        ddf::cpu_pause();
    }
    Chain chain;
    bool done = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const int64_t next = next_.load(std::memory_order_relaxed);
      if (tile < next) return;  // recomputed and placed by another thread
      if (tile == next && !park_all_) {
        chain.emplace_back(local, count, end_);
        end_ += count;
        advance_locked(tile + 1, chain);
        done = true;
      } else if (slots_used < kParkSlots) {
        float* slot = arena.slot(slots_used++);
        std::memcpy(slot, local,
                    static_cast<size_t>(count) * sizeof(float));  // short, under the lock
        counts_[static_cast<size_t>(tile)] = count;
        parked_[static_cast<size_t>(tile)] = slot;
        advance_locked(next, chain);  // places it at once if it is next
        done = true;
      }
    }
    copy(chain);
    if (done) return;
    // Arena full: place the tiles before this one ourselves, then this one.
    place_up_to(tile, arena);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (next_.load(std::memory_order_relaxed) == tile) {  // else another thread recomputed it
        chain.emplace_back(local, count, end_);
        end_ += count;
        advance_locked(tile + 1, chain);
      }
    }
    copy(chain);
  }

  // Recompute and place tiles until every tile before `limit` is placed.
  void place_up_to(int64_t limit, ThreadArena& arena) {
    for (;;) {
      const int64_t blocking = next_.load(std::memory_order_acquire);
      if (blocking >= limit) return;
      const int64_t count = compute(blocking, arena.stolen());
      Chain chain;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (next_.load(std::memory_order_relaxed) == blocking) {
          chain.emplace_back(arena.stolen(), count, end_);
          end_ += count;
          advance_locked(blocking + 1, chain);
        }
      }
      copy(chain);
    }
  }

  // Under the mutex: tiles before `next` have positions (the chain's last
  // entries included); give positions to the parked tiles that follow, and
  // count the chain as a copy in flight before publishing the new next_.
  void advance_locked(int64_t next, Chain& chain) {
    while (next < n_tiles_ && parked_[static_cast<size_t>(next)] != nullptr) {
      chain.emplace_back(parked_[static_cast<size_t>(next)], counts_[static_cast<size_t>(next)],
                         end_);
      end_ += counts_[static_cast<size_t>(next)];
      ++next;
    }
    if (!chain.empty()) copies_in_flight_.fetch_add(1, std::memory_order_relaxed);
    next_.store(next, std::memory_order_release);
  }

  void copy(const Chain& chain) {
    if (chain.empty()) return;
    for (const auto& [draws, count, position] : chain)
      if (!place(draws, position, count, out_, need_, buffer_, affine_))
        bad_sigma_.store(true, std::memory_order_relaxed);
    copies_in_flight_.fetch_sub(1, std::memory_order_release);
  }

  const int64_t n_tiles_;
  std::mutex mutex_;
  std::atomic<int64_t> next_claim_{0};        // next tile to hand out
  std::atomic<int64_t> next_{0};              // tiles [0, next_) have positions
  std::atomic<int64_t> copies_in_flight_{0};  // chains positioned but not yet copied
  std::atomic<bool> bad_sigma_{false};        // affine: some sigma outside (0, inf)
  int64_t end_ = 0;                           // draws positioned so far
  std::vector<int64_t> counts_;
  std::vector<const float*> parked_;  // parked tiles' draws, in their threads' arenas
#ifdef DDF_TEST_HOOKS
  bool park_all_;
#else
  static constexpr bool park_all_ = false;
#endif
  TileFn fn_;
  uint64_t block_offset_;
  int64_t n_blocks_;
  Keys keys_;
  float* out_;
  int64_t need_;
  float* buffer_;
  Affine affine_;
};

Affine make_affine(uintptr_t mu_ptr, uintptr_t sigma_ptr, uintptr_t z_ptr, bool affine_double,
                   bool simd) {
  if ((mu_ptr == 0) != (sigma_ptr == 0) || (mu_ptr == 0) != (z_ptr == 0))
    throw std::invalid_argument("mu_ptr, sigma_ptr and z_ptr are given together or not at all");
  Affine affine;
  affine.mu = reinterpret_cast<const void*>(mu_ptr);
  affine.sigma = reinterpret_cast<const void*>(sigma_ptr);
  affine.z = reinterpret_cast<void*>(z_ptr);
  affine.is_double = affine_double;
  affine.simd = simd;
  return affine;
}

int64_t refill(const std::string& method, const std::string& kernel, uint64_t seed,
               uint64_t block_offset, int64_t n_blocks, uintptr_t out_ptr, int64_t need,
               uintptr_t buffer_ptr, int64_t buffer_capacity, int num_threads,
               const std::string& isa, bool park_all, uintptr_t mu_ptr, uintptr_t sigma_ptr,
               uintptr_t z_ptr, bool affine_double) {
  if (n_blocks < 0 || need < 0 || buffer_capacity < 0) throw std::invalid_argument("negative size");
  const bool simd = kIsas[ddf::resolve_isa(isa, kIsas)] == "avx512";
  const Plan plan = make_plan(method, kernel, simd);
  Affine affine = make_affine(mu_ptr, sigma_ptr, z_ptr, affine_double, simd);
  // Plain draws (sample) stream too: the same rule for out, or for z and eps.
  const int64_t out_bytes = (affine.active() ? (affine_double ? 8 : 4) : 0) + (out_ptr ? 4 : 0);
  affine.stream = need * out_bytes >= kStreamBytes;
  if (out_ptr == 0 && !affine.active())
    throw std::invalid_argument("out_ptr is required unless z is written (mu_ptr, ...)");
  const int64_t most = n_blocks * plan.draws_per_block;
  if (buffer_capacity < most - need)
    throw std::invalid_argument("buffer capacity " + std::to_string(buffer_capacity) + " < " +
                                std::to_string(most - need) + " possible surplus draws");
  if (block_offset + static_cast<uint64_t>(n_blocks) < block_offset)
    throw std::overflow_error("Philox block counter would wrap around 2^64");
  const Keys keys = make_keys(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  TileJob job(plan.fn, block_offset, n_blocks, keys, reinterpret_cast<float*>(out_ptr), need,
              reinterpret_cast<float*>(buffer_ptr), affine, park_all);
  // Small refills stay on the calling thread: waking a helper costs more than it saves.
  const int64_t useful = n_blocks / kMinBlocksPerThread;
  const int threads = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>({num_threads, useful, job.n_tiles()})));
  py::gil_scoped_release release;
  ddf::on_team(threads, [&](int) { job.work(); });
  job.complete_from_caller();
  if (job.bad_sigma()) throw std::invalid_argument(kBadSigma);
  return job.placed();
}

// z = fma(sigma, eps, mu) for n draws already made (those an rsample takes from
// the buffer), by the same code as the fused refill.
void affine(uintptr_t eps_ptr, int64_t n, uintptr_t mu_ptr, uintptr_t sigma_ptr, uintptr_t z_ptr,
            bool affine_double, const std::string& isa) {
  if (n < 0) throw std::invalid_argument("negative size");
  if (eps_ptr == 0 || mu_ptr == 0) throw std::invalid_argument("null pointer");
  const Affine a = make_affine(mu_ptr, sigma_ptr, z_ptr, affine_double,
                               kIsas[ddf::resolve_isa(isa, kIsas)] == "avx512");
  bool ok;
  {
    py::gil_scoped_release release;
    ok = a.apply(reinterpret_cast<const float*>(eps_ptr), nullptr, 0, n);
  }
  if (!ok) throw std::invalid_argument(kBadSigma);
}

int64_t draws_per_block(const std::string& method, const std::string& kernel) {
  return make_plan(method, kernel, false).draws_per_block;
}

#ifdef DDF_TEST_HOOKS
// Test hooks (DDF_TEST_HOOKS builds only) ---------------------------------------
py::tuple philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                        uint32_t k1) {
  philox_rounds(c0, c1, c2, c3, make_keys(k0, k1));
  return py::make_tuple(c0, c1, c2, c3);
}

template <Shape S>
void shape_loop(const float* u, float* g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] = shape_g<S>(u[i]);
}

void shape_values(const std::string& kernel, uintptr_t u_ptr, uintptr_t g_ptr, int64_t n) {
  const float* u = reinterpret_cast<const float*>(u_ptr);
  float* g = reinterpret_cast<float*>(g_ptr);
  switch (shape_from_name(kernel)) {
    case Shape::Uniform:
      return shape_loop<Shape::Uniform>(u, g, n);
    case Shape::Triangular:
      return shape_loop<Shape::Triangular>(u, g, n);
    case Shape::Epanechnikov:
      return shape_loop<Shape::Epanechnikov>(u, g, n);
    case Shape::Quartic:
      return shape_loop<Shape::Quartic>(u, g, n);
    case Shape::Triweight:
      return shape_loop<Shape::Triweight>(u, g, n);
    case Shape::Tricube:
      return shape_loop<Shape::Tricube>(u, g, n);
    case Shape::Cosine:
      return shape_loop<Shape::Cosine>(u, g, n);
  }
}

// Elementwise math helpers on float32 arrays (test hooks for the polynomials).
void math_values(const std::string& fn, uintptr_t x_ptr, uintptr_t y_ptr, uintptr_t y2_ptr,
                 int64_t n) {
  const float* x = reinterpret_cast<const float*>(x_ptr);
  float* y = reinterpret_cast<float*>(y_ptr);
  float* y2 = reinterpret_cast<float*>(y2_ptr);
  if (fn == "log") {
    for (int64_t i = 0; i < n; ++i) y[i] = log_positive(x[i]);
  } else if (fn == "asin_over_half_pi") {
    for (int64_t i = 0; i < n; ++i) y[i] = asin_over_half_pi(x[i]);
  } else if (fn == "sincos_two_pi") {
    for (int64_t i = 0; i < n; ++i) sincos_two_pi(x[i], y[i], y2[i]);
  } else {
    throw std::invalid_argument("unknown function '" + fn + "'");
  }
}

#endif  // DDF_TEST_HOOKS

std::vector<std::string> supported_isas() { return ddf::supported_isas(kIsas); }

}  // namespace

PYBIND11_MODULE(_sampler, m) {
  m.doc() =
      "Philox4x32-10 rejection / transform / Box-Muller sampling for ddvae_fast.RejectionSampler";
  // park_all is a test hook: with DDF_TEST_HOOKS unset it is refused.
  m.def(
      "refill",
      [](const std::string& method, const std::string& kernel, uint64_t seed, uint64_t block_offset,
         int64_t n_blocks, uintptr_t out_ptr, int64_t need, uintptr_t buffer_ptr,
         int64_t buffer_capacity, int num_threads, const std::string& isa, bool park_all,
         uintptr_t mu_ptr, uintptr_t sigma_ptr, uintptr_t z_ptr, bool affine_double) {
#ifndef DDF_TEST_HOOKS
        if (park_all) throw std::invalid_argument("park_all needs a DDVAE_FAST_TEST_HOOKS=1 build");
#endif
        return refill(method, kernel, seed, block_offset, n_blocks, out_ptr, need, buffer_ptr,
                      buffer_capacity, num_threads, isa, park_all, mu_ptr, sigma_ptr, z_ptr,
                      affine_double);
      },
      py::arg("method"), py::arg("kernel"), py::arg("seed"), py::arg("block_offset"),
      py::arg("n_blocks"), py::arg("out_ptr"), py::arg("need"), py::arg("buffer_ptr"),
      py::arg("buffer_capacity"), py::arg("num_threads"), py::arg("isa") = "auto",
      py::arg("park_all") = false, py::arg("mu_ptr") = 0, py::arg("sigma_ptr") = 0,
      py::arg("z_ptr") = 0, py::arg("affine_double") = false,
      "Generate n_blocks Philox blocks from block_offset; write the first `need` kept draws "
      "(float32) to out_ptr and the rest to buffer_ptr. Returns the number of kept draws. "
      "With mu_ptr, sigma_ptr and z_ptr (contiguous, float64 if affine_double else float32) "
      "the first `need` draws eps also give z = fma(sigma, eps, mu) (out_ptr may then be 0); "
      "ValueError, after the work, if some sigma is not in (0, inf). "
      "park_all (test hook) routes every tile through the out-of-order parking path.");
  m.def("affine", &affine, py::arg("eps_ptr"), py::arg("n"), py::arg("mu_ptr"),
        py::arg("sigma_ptr"), py::arg("z_ptr"), py::arg("affine_double") = false,
        py::arg("isa") = "auto",
        "z = fma(sigma, eps, mu) for n float32 draws eps; ValueError if some sigma is not in "
        "(0, inf).");
  m.def("draws_per_block", &draws_per_block, py::arg("method"), py::arg("kernel"),
        "Candidates (rejection) or draws (transform, gaussian) per Philox block.");
#ifdef DDF_TEST_HOOKS
  m.def("philox4x32_10", &philox4x32_10, "One Philox4x32-10 block (test hook).");
  m.def("shape_values", &shape_values, py::arg("kernel"), py::arg("u_ptr"), py::arg("g_ptr"),
        py::arg("n"), "g(u) = K(u)/K(0) as evaluated by the accept test (test hook).");
  m.def("math_values", &math_values, py::arg("fn"), py::arg("x_ptr"), py::arg("y_ptr"),
        py::arg("y2_ptr"), py::arg("n"),
        "log / asin_over_half_pi / sincos_two_pi on float32 arrays (test hook).");
#endif
  m.def("supported_isas", &supported_isas, "Instruction sets this CPU runs, best first.");
}
