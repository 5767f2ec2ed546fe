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
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <unistd.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DDVAE_HAVE_AVX512_PATH 1
#endif

namespace py = pybind11;

// The math templates are instantiated with AVX-512 lanes inside the AVX-512
// tile functions; forcing them inline compiles them with that target there
// (a separate default-target instantiation would pass __m512 by value through
// a non-AVX-512 ABI).
#define DDVAE_INLINE inline __attribute__((always_inline))

namespace {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kRounds = 10;
constexpr int64_t kTileBlocks = 4096;  // Philox blocks per tile: 8192 rejection candidates, 32 KiB
constexpr int64_t kMinBlocksPerThread = 65536;  // ~100 us of work: less does not pay for waking a thread
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

inline void philox_rounds(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, const Keys& keys) {
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
    uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32), c2 = 0, c3 = 0;
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
DDVAE_INLINE F sym(U w) {
    const auto t = sll(srl_int(w, 9), 1) + 1 - (1 << 23);
    return to_float(t) * F(0x1p-23f);
}

template <class F, class U>
DDVAE_INLINE F unit(U w) {
    return to_float(srl_int(w, 8)) * F(0x1p-24f);
}

enum class Shape { Uniform, Triangular, Epanechnikov, Quartic, Triweight, Tricube, Cosine };

// g(u) = K(u) / K(0) on (-1, 1).
template <Shape S, class F>
DDVAE_INLINE F shape_g(F u) {
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
DDVAE_INLINE F asin_over_half_pi(F x) {
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
DDVAE_INLINE F log_positive(F x) {
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
DDVAE_INLINE void sincos_two_pi(F t, F& sin_out, F& cos_out) {
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
DDVAE_INLINE void box_muller(U a, U b, F& z0, F& z1) {
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
DDVAE_INLINE void transform_draws(U w0, U w1, U w2, U w3, F d[4]) {
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

// ------------------------------------------------------------ tile functions
// A tile function generates n_blocks Philox blocks starting at first_block and
// writes the kept draws, in stream order, to dst; it returns how many. dst
// holds at least n_blocks * kMaxDrawsPerBlock + kSimdSlack floats.
using TileFn = int64_t (*)(uint64_t first_block, int64_t n_blocks, const Keys& keys, float* dst);

template <Shape S>
int64_t rejection_tile_scalar(uint64_t first_block, int64_t n_blocks, const Keys& keys, float* dst) {
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
int64_t transform_tile_scalar(uint64_t first_block, int64_t n_blocks, const Keys& keys, float* dst) {
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

#ifdef DDVAE_HAVE_AVX512_PATH
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,popcnt")
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on _mm512_undefined_*.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// 16 lanes of float / int32 / uint32 and a lane mask, with the operations the
// templates above use.
struct VM {
    __mmask16 m;
};
struct VI {
    __m512i v;
};
struct VU {
    __m512i v;
};
struct VF {
    __m512 v;
    VF() = default;
    explicit VF(__m512 x) : v(x) {}
    explicit VF(float c) : v(_mm512_set1_ps(c)) {}
};
inline VF operator+(VF a, VF b) { return VF(_mm512_add_ps(a.v, b.v)); }
inline VF operator-(VF a, VF b) { return VF(_mm512_sub_ps(a.v, b.v)); }
inline VF operator*(VF a, VF b) { return VF(_mm512_mul_ps(a.v, b.v)); }
inline VM operator>(VF a, VF b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ)}; }
inline VM operator>=(VF a, VF b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_GE_OQ)}; }
inline VM operator<(VF a, VF b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ)}; }
inline VF vabs(VF x) { return VF(_mm512_abs_ps(x.v)); }
inline VF vsqrt(VF x) { return VF(_mm512_sqrt_ps(x.v)); }
inline VF vneg(VF x) { return VF(_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x.v), _mm512_set1_epi32(INT32_MIN)))); }
inline VF vselect(VM m, VF a, VF b) { return VF(_mm512_mask_blend_ps(m.m, b.v, a.v)); }
inline VM mask_and(VM a, VM b) { return {static_cast<__mmask16>(a.m & b.m)}; }
inline VI operator+(VI a, int32_t c) { return {_mm512_add_epi32(a.v, _mm512_set1_epi32(c))}; }
inline VI operator-(VI a, int32_t c) { return {_mm512_sub_epi32(a.v, _mm512_set1_epi32(c))}; }
inline VI operator-(VI a, VI b) { return {_mm512_sub_epi32(a.v, b.v)}; }
inline VF to_float(VI i) { return VF(_mm512_cvtepi32_ps(i.v)); }
inline VI trunc_int(VF x) { return {_mm512_cvttps_epi32(x.v)}; }
inline VI float_bits(VF x) { return {_mm512_castps_si512(x.v)}; }
inline VF bits_float(VI i) { return VF(_mm512_castsi512_ps(i.v)); }
inline VI srl_int(VU w, int s) { return {_mm512_srli_epi32(w.v, s)}; }
inline VI sra(VI i, int s) { return {_mm512_srai_epi32(i.v, s)}; }
inline VI sll(VI i, int s) { return {_mm512_slli_epi32(i.v, s)}; }
inline VI and_int(VI i, int32_t m) { return {_mm512_and_si512(i.v, _mm512_set1_epi32(m))}; }
inline VM eq_int(VI i, int32_t c) { return {_mm512_cmpeq_epi32_mask(i.v, _mm512_set1_epi32(c))}; }

inline __m512i mulhi_epu32(__m512i a, __m512i m) {
    const __m512i even = _mm512_mul_epu32(a, m);                         // 64-bit products of lanes 0,2,..
    const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);  // of lanes 1,3,..
    return _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// Philox for the 16 consecutive blocks first_block .. first_block + 15.
inline void philox16(uint64_t first_block, const Keys& keys, VU w[4]) {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i lo = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(first_block)));
    const __m512i hi = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(first_block >> 32)));
    __m512i c0 = _mm512_add_epi32(lo, iota);
    const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, lo);  // the low word wrapped
    __m512i c1 = _mm512_mask_add_epi32(hi, carry, hi, _mm512_set1_epi32(1));
    __m512i c2 = _mm512_setzero_si512();
    __m512i c3 = _mm512_setzero_si512();
    const __m512i m0 = _mm512_set1_epi32(static_cast<int32_t>(kPhiloxM0));
    const __m512i m1 = _mm512_set1_epi32(static_cast<int32_t>(kPhiloxM1));
    for (int r = 0; r < kRounds; ++r) {
        const __m512i hi0 = mulhi_epu32(c0, m0);
        const __m512i lo0 = _mm512_mullo_epi32(c0, m0);
        const __m512i hi1 = mulhi_epu32(c2, m1);
        const __m512i lo1 = _mm512_mullo_epi32(c2, m1);
        const __m512i k0 = _mm512_set1_epi32(static_cast<int32_t>(keys.k0[r]));
        const __m512i k1 = _mm512_set1_epi32(static_cast<int32_t>(keys.k1[r]));
        c0 = _mm512_ternarylogic_epi32(hi1, c1, k0, 0x96);  // three-way xor
        c2 = _mm512_ternarylogic_epi32(hi0, c3, k1, 0x96);
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
    const __m512i idx_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i idx_hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    lo = VF(_mm512_permutex2var_ps(a.v, idx_lo, b.v));
    hi = VF(_mm512_permutex2var_ps(a.v, idx_hi, b.v));
}

template <Shape S>
int64_t rejection_tile_avx512(uint64_t first_block, int64_t n_blocks, const Keys& keys, float* dst) {
    int64_t count = 0;
    int64_t j = 0;
    for (; j + 16 <= n_blocks; j += 16) {
        VU w[4];
        philox16(first_block + static_cast<uint64_t>(j), keys, w);
        // Candidates 2j (words 0, 1) and 2j+1 (words 2, 3) back in candidate order.
        VF ua, ub, va, vb;
        interleave(sym<VF>(w[0]), sym<VF>(w[2]), ua, ub);
        interleave(unit<VF>(w[1]), unit<VF>(w[3]), va, vb);
        const __mmask16 keep_a = (shape_g<S>(ua) > va).m;
        const __mmask16 keep_b = (shape_g<S>(ub) > vb).m;
        // Register-form compress then a plain store: the memory form is microcoded on AMD.
        _mm512_storeu_ps(dst + count, _mm512_maskz_compress_ps(keep_a, ua.v));
        count += __builtin_popcount(static_cast<unsigned>(keep_a));
        _mm512_storeu_ps(dst + count, _mm512_maskz_compress_ps(keep_b, ub.v));
        count += __builtin_popcount(static_cast<unsigned>(keep_b));
    }
    return count + rejection_tile_scalar<S>(first_block + static_cast<uint64_t>(j), n_blocks - j, keys,
                                             dst + count);
}

template <Transform T>
int64_t transform_tile_avx512(uint64_t first_block, int64_t n_blocks, const Keys& keys, float* dst) {
    constexpr int per = transform_draws_per_block<T>();
    int64_t j = 0;
    for (; j + 16 <= n_blocks; j += 16) {
        VU w[4];
        philox16(first_block + static_cast<uint64_t>(j), keys, w);
        VF d[4];
        transform_draws<T, VF, VU>(w[0], w[1], w[2], w[3], d);
        float* o = dst + per * j;
        if constexpr (per == 1) {
            _mm512_storeu_ps(o, d[0].v);
        } else if constexpr (per == 2) {
            VF lo, hi;
            interleave(d[0], d[1], lo, hi);
            _mm512_storeu_ps(o, lo.v);
            _mm512_storeu_ps(o + 16, hi.v);
        } else {  // (d0, d1, d2, d3) per block = interleave(interleave(d0, d2), interleave(d1, d3))
            VF a_lo, a_hi, b_lo, b_hi, x, y;
            interleave(d[0], d[2], a_lo, a_hi);
            interleave(d[1], d[3], b_lo, b_hi);
            interleave(a_lo, b_lo, x, y);
            _mm512_storeu_ps(o, x.v);
            _mm512_storeu_ps(o + 16, y.v);
            interleave(a_hi, b_hi, x, y);
            _mm512_storeu_ps(o + 32, x.v);
            _mm512_storeu_ps(o + 48, y.v);
        }
    }
    transform_tile_scalar<T>(first_block + static_cast<uint64_t>(j), n_blocks - j, keys, dst + per * j);
    return per * n_blocks;
}

#pragma GCC diagnostic pop
#pragma GCC pop_options

bool cpu_has_avx512() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}
#else
bool cpu_has_avx512() { return false; }
#endif

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
#ifdef DDVAE_HAVE_AVX512_PATH
    if (simd) return &rejection_tile_avx512<S>;
#endif
    (void)simd;
    return &rejection_tile_scalar<S>;
}

template <Transform T>
TileFn transform_for(bool simd) {
#ifdef DDVAE_HAVE_AVX512_PATH
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
            case Shape::Uniform: return {rejection_for<Shape::Uniform>(simd), 2};
            case Shape::Triangular: return {rejection_for<Shape::Triangular>(simd), 2};
            case Shape::Epanechnikov: return {rejection_for<Shape::Epanechnikov>(simd), 2};
            case Shape::Quartic: return {rejection_for<Shape::Quartic>(simd), 2};
            case Shape::Triweight: return {rejection_for<Shape::Triweight>(simd), 2};
            case Shape::Tricube: return {rejection_for<Shape::Tricube>(simd), 2};
            case Shape::Cosine: return {rejection_for<Shape::Cosine>(simd), 2};
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
    throw std::invalid_argument("unknown method '" + method + "'; expected rejection, transform or gaussian");
}

bool resolve_simd(const std::string& simd) {
    if (simd == "scalar") return false;
    if (simd == "avx512") {
        if (!cpu_has_avx512()) throw std::invalid_argument("this CPU has no AVX-512 (avx512f/dq/bw/vl)");
        return true;
    }
    if (simd == "auto") return cpu_has_avx512();
    throw std::invalid_argument("simd must be 'auto', 'scalar' or 'avx512', got '" + simd + "'");
}

// Copy the tile's draws, which occupy stream positions [start, start + count), to
// out[0, need) and then buffer[0, ...).
inline void place(const float* src, int64_t start, int64_t count, float* out, int64_t need, float* buffer) {
    const int64_t end = start + count;
    if (start < need) {
        const int64_t stop = std::min(end, need);
        std::memcpy(out + start, src, static_cast<size_t>(stop - start) * sizeof(float));
    }
    if (end > need) {
        const int64_t from = std::max(start, need);
        std::memcpy(buffer + (from - need), src + (from - start), static_cast<size_t>(end - from) * sizeof(float));
    }
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
// The calling thread works on the job and never waits for a helper thread that
// has not started or is descheduled: when no tile is left to claim it
// recomputes any tile still unplaced, and waits only for copies already under
// way. Helpers are persistent threads (WorkerPool) rather than an OpenMP team,
// because a parallel region ends with a barrier that every thread must reach:
// on a loaded machine that made calls wait 4-8 ms for a helper to be scheduled.
constexpr int64_t kTileCapacity = kTileBlocks * kMaxDrawsPerBlock + kSimdSlack;
constexpr int64_t kParkSlots = 16;

inline void cpu_pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

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

class TileJob {
   public:
    // park_all (a test hook) parks every tile it can and never waits: the parking
    // and recomputing paths then run deterministically.
    TileJob(TileFn fn, uint64_t block_offset, int64_t n_blocks, const Keys& keys, float* out, int64_t need,
            float* buffer, bool park_all)
        : n_tiles_((n_blocks + kTileBlocks - 1) / kTileBlocks),
          counts_(static_cast<size_t>(n_tiles_), 0),
          parked_(static_cast<size_t>(n_tiles_), nullptr),
          park_all_(park_all),
          fn_(fn),
          block_offset_(block_offset),
          n_blocks_(n_blocks),
          keys_(keys),
          out_(out),
          need_(need),
          buffer_(buffer) {}

    // Claim and finish tiles until none is left to claim. The arena's parked
    // tiles must stay untouched until this job is complete().
    void work() {
        ThreadArena& arena = thread_arena();
        int64_t slots_used = 0;
        for (int64_t tile = next_claim_.fetch_add(1); tile < n_tiles_; tile = next_claim_.fetch_add(1)) {
            const int64_t kept = compute(tile, arena.local());
            finish(tile, arena.local(), kept, arena, slots_used);
        }
    }

    // The calling thread, after work(): place whatever other threads still hold.
    void complete_from_caller() {
        ThreadArena& arena = thread_arena();
        for (int spin = 0; spin < kSpins && !all_placed(); ++spin) cpu_pause();
        place_up_to(n_tiles_, arena);
        // Only copies already under way remain: a few microseconds. Spin rather than
        // yield: on a loaded machine a yield hands the CPU away for a time slice.
        while (copies_in_flight_.load(std::memory_order_acquire) != 0) cpu_pause();
    }

    bool complete() const { return all_placed() && copies_in_flight_.load(std::memory_order_acquire) == 0; }
    int64_t placed() const { return end_; }
    int64_t n_tiles() const { return n_tiles_; }

   private:
    static constexpr int kSpins = 2000;  // tens of microseconds: about one tile's work
    using Chain = std::vector<std::tuple<const float*, int64_t, int64_t>>;  // (draws, count, position)

    bool all_placed() const { return next_.load(std::memory_order_acquire) >= n_tiles_; }

    int64_t compute(int64_t tile, float* dst) const {
        const int64_t first = tile * kTileBlocks, blocks = std::min(kTileBlocks, n_blocks_ - first);
        return fn_(block_offset_ + static_cast<uint64_t>(first), blocks, keys_, dst);
    }

    void finish(int64_t tile, const float* local, int64_t count, ThreadArena& arena, int64_t& slots_used) {
        if (!park_all_) {
            for (int spin = 0; spin < kSpins && next_.load(std::memory_order_acquire) < tile; ++spin) cpu_pause();
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
                std::memcpy(slot, local, static_cast<size_t>(count) * sizeof(float));  // short, under the lock
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
            chain.emplace_back(parked_[static_cast<size_t>(next)], counts_[static_cast<size_t>(next)], end_);
            end_ += counts_[static_cast<size_t>(next)];
            ++next;
        }
        if (!chain.empty()) copies_in_flight_.fetch_add(1, std::memory_order_relaxed);
        next_.store(next, std::memory_order_release);
    }

    void copy(const Chain& chain) {
        if (chain.empty()) return;
        for (const auto& [draws, count, position] : chain) place(draws, position, count, out_, need_, buffer_);
        copies_in_flight_.fetch_sub(1, std::memory_order_release);
    }

    const int64_t n_tiles_;
    std::mutex mutex_;
    std::atomic<int64_t> next_claim_{0};       // next tile to hand out
    std::atomic<int64_t> next_{0};             // tiles [0, next_) have positions
    std::atomic<int64_t> copies_in_flight_{0};  // chains positioned but not yet copied
    int64_t end_ = 0;                          // draws positioned so far
    std::vector<int64_t> counts_;
    std::vector<const float*> parked_;  // parked tiles' draws, in their threads' arenas
    bool park_all_;
    TileFn fn_;
    uint64_t block_offset_;
    int64_t n_blocks_;
    Keys keys_;
    float* out_;
    int64_t need_;
    float* buffer_;
};

// Persistent helper threads. offer() hands a job to up to n idle helpers and
// returns at once; the caller works on the job itself and never waits for them.
// A helper does not start a new job before its previous one is complete(),
// because other threads may still be copying tiles parked in its arena.
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

    void offer(const std::shared_ptr<TileJob>& job, int helpers) {
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
        std::shared_ptr<TileJob> previous;
        for (;;) {
            std::shared_ptr<TileJob> job;
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
    std::shared_ptr<TileJob> job_;
    uint64_t generation_ = 0;
    int wanted_ = 0;
    size_t threads_started_ = 0;
};

int64_t refill(const std::string& method, const std::string& kernel, uint64_t seed, uint64_t block_offset,
               int64_t n_blocks, uintptr_t out_ptr, int64_t need, uintptr_t buffer_ptr, int64_t buffer_capacity,
               int num_threads, const std::string& simd, bool park_all) {
    if (n_blocks < 0 || need < 0 || buffer_capacity < 0) throw std::invalid_argument("negative size");
    const Plan plan = make_plan(method, kernel, resolve_simd(simd));
    const int64_t most = n_blocks * plan.draws_per_block;
    if (buffer_capacity < most - need)
        throw std::invalid_argument("buffer capacity " + std::to_string(buffer_capacity) + " < " +
                                    std::to_string(most - need) + " possible surplus draws");
    if (block_offset + static_cast<uint64_t>(n_blocks) < block_offset)
        throw std::overflow_error("Philox block counter would wrap around 2^64");
    const Keys keys = make_keys(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    auto job = std::make_shared<TileJob>(plan.fn, block_offset, n_blocks, keys, reinterpret_cast<float*>(out_ptr),
                                         need, reinterpret_cast<float*>(buffer_ptr), park_all);
    // Small refills stay on the calling thread: waking a helper costs more than it saves.
    const int64_t useful = n_blocks / kMinBlocksPerThread;
    const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({num_threads, useful, job->n_tiles()})));
    py::gil_scoped_release release;
    if (threads > 1) WorkerPool::instance().offer(job, threads - 1);
    job->work();
    job->complete_from_caller();
    return job->placed();
}

int64_t draws_per_block(const std::string& method, const std::string& kernel) {
    return make_plan(method, kernel, false).draws_per_block;
}

// Test hooks -------------------------------------------------------------------
py::tuple philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
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
        case Shape::Uniform: return shape_loop<Shape::Uniform>(u, g, n);
        case Shape::Triangular: return shape_loop<Shape::Triangular>(u, g, n);
        case Shape::Epanechnikov: return shape_loop<Shape::Epanechnikov>(u, g, n);
        case Shape::Quartic: return shape_loop<Shape::Quartic>(u, g, n);
        case Shape::Triweight: return shape_loop<Shape::Triweight>(u, g, n);
        case Shape::Tricube: return shape_loop<Shape::Tricube>(u, g, n);
        case Shape::Cosine: return shape_loop<Shape::Cosine>(u, g, n);
    }
}

// Elementwise math helpers on float32 arrays (test hooks for the polynomials).
void math_values(const std::string& fn, uintptr_t x_ptr, uintptr_t y_ptr, uintptr_t y2_ptr, int64_t n) {
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

std::vector<std::string> simd_levels() {
    std::vector<std::string> levels{"scalar"};
    if (cpu_has_avx512()) levels.push_back("avx512");
    return levels;
}

}  // namespace

PYBIND11_MODULE(_sampler, m) {
    m.doc() = "Philox4x32-10 rejection / transform / Box-Muller sampling for ddvae_fast.RejectionSampler";
    m.def("refill", &refill, py::arg("method"), py::arg("kernel"), py::arg("seed"), py::arg("block_offset"),
          py::arg("n_blocks"), py::arg("out_ptr"), py::arg("need"), py::arg("buffer_ptr"),
          py::arg("buffer_capacity"), py::arg("num_threads"), py::arg("simd") = "auto",
          py::arg("park_all") = false,
          "Generate n_blocks Philox blocks from block_offset; write the first `need` kept draws "
          "(float32) to out_ptr and the rest to buffer_ptr. Returns the number of kept draws. "
          "park_all (test hook) routes every tile through the out-of-order parking path.");
    m.def("draws_per_block", &draws_per_block, py::arg("method"), py::arg("kernel"),
          "Candidates (rejection) or draws (transform, gaussian) per Philox block.");
    m.def("philox4x32_10", &philox4x32_10, "One Philox4x32-10 block (test hook).");
    m.def("shape_values", &shape_values, py::arg("kernel"), py::arg("u_ptr"), py::arg("g_ptr"), py::arg("n"),
          "g(u) = K(u)/K(0) as evaluated by the accept test (test hook).");
    m.def("math_values", &math_values, py::arg("fn"), py::arg("x_ptr"), py::arg("y_ptr"), py::arg("y2_ptr"),
          py::arg("n"), "log / asin_over_half_pi / sincos_two_pi on float32 arrays (test hook).");
    m.def("simd_levels", &simd_levels, "Code paths this CPU can run.");
}
