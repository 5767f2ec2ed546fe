// SIMD lanes for the C++ modules: GCC vector extensions, one register of
// DDF_VBYTES bytes per vector. No include guard: a module includes this once
// per instruction set, inside a namespace under a `#pragma GCC target`, with
// DDF_VBYTES defined (see csrc/relaxed_argmax.cpp). Helpers defined outside
// such a region would be lowered for the baseline target before inlining
// (16 element inserts for one broadcast), hence the per-copy include.
// Intrinsics are used only where vector extensions have no form or GCC 12
// picks a much slower instruction: the sampler's compress, square root, mask
// extraction and 32 x 32 -> 64-bit multiply (csrc/sampler.cpp).
//
// Also here: reading and writing 16-bit floats (bfloat16, float16) as fp32
// lanes, by integer operations (the same in every copy; the baseline has no
// conversion instructions): the same operations as the scalar conversions in
// csrc/common.h.

#ifndef DDF_VBYTES
#error "define DDF_VBYTES (the vector width in bytes) before including simd.h"
#endif

template <typename T>
struct Lanes;

// W lanes of one DDF_VBYTES-byte register: 16/8/4 floats or 8/4/2 doubles.
template <>
struct Lanes<float> {
  static constexpr int W = DDF_VBYTES / 4;
  typedef float vec __attribute__((vector_size(DDF_VBYTES)));
  typedef int32_t lane_int;
  typedef int32_t mask __attribute__((vector_size(DDF_VBYTES)));
  typedef uint32_t bits __attribute__((vector_size(DDF_VBYTES)));
  typedef double wide __attribute__((vector_size(2 * DDF_VBYTES)));  // fp64 accumulators
  typedef int64_t wide_mask __attribute__((vector_size(2 * DDF_VBYTES)));
};

template <>
struct Lanes<double> {
  static constexpr int W = DDF_VBYTES / 8;
  typedef double vec __attribute__((vector_size(DDF_VBYTES)));
  typedef int64_t lane_int;
  typedef int64_t mask __attribute__((vector_size(DDF_VBYTES)));
  typedef uint64_t bits __attribute__((vector_size(DDF_VBYTES)));
  typedef double wide __attribute__((vector_size(DDF_VBYTES)));
  typedef int64_t wide_mask __attribute__((vector_size(DDF_VBYTES)));
};

// Broadcast. x - 0 (not x + 0, which turns -0.0 into +0.0) is exact for every
// x, so this is a plain broadcast instruction.
template <typename V, typename S>
DDF_INLINE V splat(S x) {
  return x - V{};
}

template <typename V, typename T>
DDF_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
DDF_INLINE void store(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename T>
DDF_INLINE typename Lanes<T>::mask iota() {
  typename Lanes<T>::mask m;
  for (int j = 0; j < Lanes<T>::W; ++j) m[j] = j;
  return m;
}

template <typename T>
DDF_INLINE typename Lanes<T>::mask lanes_below(int n) {
  return iota<T>() < splat<typename Lanes<T>::mask>(typename Lanes<T>::lane_int(n));
}

template <typename T>
DDF_INLINE typename Lanes<T>::vec vabs(typename Lanes<T>::vec x) {
  typedef typename Lanes<T>::bits bits;
  typedef typename Lanes<T>::vec vec;
  return (vec)((bits)x & (splat<bits>(-1) >> 1));  // clear the sign bit
}

// Horizontal reductions by halving: log2(W) vector operations on the two
// halves instead of W - 1 dependent scalar ones (this is per-row work, which
// matters for small V).
template <typename E, int BYTES>
struct VecOf {
  typedef E type __attribute__((vector_size(BYTES)));
};

template <typename E, int BYTES, typename Op>
DDF_INLINE E reduce_tree(typename VecOf<E, BYTES>::type v, Op op) {
  if constexpr (BYTES == 2 * int(sizeof(E))) {
    return op(v[0], v[1]);
  } else {
    typedef typename VecOf<E, BYTES / 2>::type Half;
    Half lo, hi;
    std::memcpy(&lo, &v, BYTES / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + BYTES / 2, BYTES / 2);
    return reduce_tree<E, BYTES / 2>(op(lo, hi), op);
  }
}

struct AddOp {
  template <typename X>
  DDF_INLINE X operator()(X a, X b) const {
    return a + b;
  }
};

struct MaxOp {  // NaN lanes lose (as in a > b ? a : b)
  template <typename X>
  DDF_INLINE X operator()(X a, X b) const {
    return a > b ? a : b;
  }
};

template <typename T>
DDF_INLINE double hsum_wide(typename Lanes<T>::wide v) {
  return reduce_tree<double, int(sizeof(v))>(v, AddOp());
}

template <typename T>
DDF_INLINE typename Lanes<T>::wide widen(typename Lanes<T>::vec v) {
  return __builtin_convertvector(v, typename Lanes<T>::wide);
}

template <typename T>
DDF_INLINE T hmax(typename Lanes<T>::vec v) {
  return reduce_tree<T, int(sizeof(v))>(v, MaxOp());
}

template <typename T>
DDF_INLINE int64_t hsum_int(typename Lanes<T>::mask v) {
  const typename Lanes<T>::wide_mask w = __builtin_convertvector(v, typename Lanes<T>::wide_mask);
  return reduce_tree<int64_t, int(sizeof(w))>(w, AddOp());
}

// ------------------------------------------------- 16-bit floats as fp32 lanes

template <typename S>
struct StorageLanes {  // W lanes of the 16-bit storage type
  typedef uint16_t type __attribute__((vector_size(DDF_VBYTES / 2)));
};

DDF_INLINE Lanes<float>::vec widen_bits(Lanes<float>::bits u, ddf::bf16*) {
  return (Lanes<float>::vec)(u << 16);
}

DDF_INLINE Lanes<float>::vec widen_bits(Lanes<float>::bits u, ddf::f16*) {
  typedef Lanes<float>::bits bits;
  typedef Lanes<float>::vec vec;
  const bits exp_mask = splat<bits>(uint32_t(0x7c00) << 13);
  bits o = (u & 0x7fffu) << 13;
  const bits e = o & exp_mask;
  o += uint32_t(127 - 15) << 23;
  o = e == exp_mask ? o + (uint32_t(128 - 16) << 23) : o;  // inf, NaN
  // zero and subnormal: exact as (m + 2^10) 2^-24 - 2^-14, a normal fp32
  const vec sub = (vec)(o + (1u << 23)) - (vec)splat<bits>(113u << 23);
  o = e == bits{} ? (bits)sub : o;
  return (vec)(o | ((u & 0x8000u) << 16));
}

DDF_INLINE Lanes<float>::bits narrow_bits(Lanes<float>::vec x, ddf::bf16*) {
  typedef Lanes<float>::bits bits;
  const bits u = (bits)x;
  const bits rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // to nearest, ties to even
  return x != x ? (u >> 16) | 0x40u : rounded;                  // NaN stays a quiet NaN
}

DDF_INLINE Lanes<float>::bits narrow_bits(Lanes<float>::vec x, ddf::f16*) {
  typedef Lanes<float>::bits bits;
  typedef Lanes<float>::vec vec;
  bits u = (bits)x;
  const bits sign = u & 0x80000000u;
  u ^= sign;
  // >= 65520 rounds to inf; NaN to a quiet NaN
  const bits big = u > (255u << 23) ? splat<bits>(0x7e00u) : splat<bits>(0x7c00u);
  // below 2^-14: fp16 subnormal; the fp32 addition rounds to nearest even
  const bits denorm_magic = splat<bits>(126u << 23);
  const bits sub = (bits)((vec)u + (vec)denorm_magic) - denorm_magic;
  const bits normal = (u + ((uint32_t(15 - 127) << 23) + 0xfffu) + ((u >> 13) & 1u)) >> 13;
  bits o = u >= ((127u + 16) << 23) ? big : (u < (113u << 23) ? sub : normal);
  return o | (sign >> 16);
}

// W values of storage type S as compute lanes (fp32 for 16-bit floats).
template <typename T, typename S>
DDF_INLINE typename Lanes<T>::vec load_as(const S* p) {
  if constexpr (std::is_same<S, T>::value) {
    return load<typename Lanes<T>::vec>(p);
  } else {
    const typename StorageLanes<S>::type h = load<typename StorageLanes<S>::type>(p);
    return widen_bits(__builtin_convertvector(h, Lanes<float>::bits), static_cast<S*>(nullptr));
  }
}

template <typename T, typename S>
DDF_INLINE void store_as(S* p, typename Lanes<T>::vec v) {
  if constexpr (std::is_same<S, T>::value) {
    store(p, v);
  } else {
    const Lanes<float>::bits b = narrow_bits(v, static_cast<S*>(nullptr));
    store(p, __builtin_convertvector(b, typename StorageLanes<S>::type));
  }
}
