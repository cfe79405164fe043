// Portable SIMD for the CPU kernels: GCC/Clang vector extensions, one native register wide.
//
// Included once per ISA translation unit (kernels_base.cpp, kernels_v3.cpp, kernels_v4.cpp), each of
// which sets its target with `#pragma GCC target` and names its own namespace BMT_FAST_ISA. A separate
// namespace per ISA keeps the linker from merging an AVX-512 copy of an inline helper into the baseline
// build (an ODR trap), and whole-TU targets keep GCC from lowering the vector helpers for the default ISA
// before they are inlined.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#ifdef BMT_FAST_32_VECTOR_REGISTERS  // the AVX-512 build: exp_nonpositive's scaling
#include <immintrin.h>
#endif

#ifndef BMT_FAST_ISA
#error "define BMT_FAST_ISA (the ISA namespace) before including simd.h"
#endif

#define BMT_FAST_INLINE inline __attribute__((always_inline))
#define BMT_FAST_INLINE_LAMBDA __attribute__((always_inline))

namespace bmt_fast::cpu::BMT_FAST_ISA {

// One vector is one register of the ISA build: 64 bytes (zmm) for x86-64-v4, 32 (ymm) for v3, 16 (xmm)
// otherwise; kernels_{base,v3,v4}.cpp set BMT_FAST_VECTOR_BYTES. (A 64-byte vector on AVX2 is two ymm
// to GCC, and its register blocks then spill: the huge-d kernels ran 10-20x slower on an AVX2 CPU.)
#ifndef BMT_FAST_VECTOR_BYTES
#define BMT_FAST_VECTOR_BYTES 16
#endif
constexpr int kVectorBytes = BMT_FAST_VECTOR_BYTES;

// (Spelled out per type: GCC drops vector_size on a dependent alias template.)
template <typename T>
struct VecType;
template <>
struct VecType<float> {
  typedef float type __attribute__((vector_size(kVectorBytes)));
};
template <>
struct VecType<double> {
  typedef double type __attribute__((vector_size(kVectorBytes)));
};
template <>
struct VecType<int32_t> {
  typedef int32_t type __attribute__((vector_size(kVectorBytes)));
};
template <>
struct VecType<int64_t> {
  typedef int64_t type __attribute__((vector_size(kVectorBytes)));
};
template <typename T>
using vec_t = typename VecType<T>::type;

template <typename T>
constexpr int kLanes = kVectorBytes / sizeof(T);

template <typename T>
BMT_FAST_INLINE vec_t<T> load(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
BMT_FAST_INLINE void store(T* p, vec_t<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

// Splat by shuffling lane 0 everywhere: GCC emits one vbroadcastss/sd from memory. (`vec{} + s` costs
// a scalar add first, and an initialiser list inside unrolled loops can turn into masked inserts.)
#if defined(__clang__)
BMT_FAST_INLINE vec_t<float> broadcast(float s) { return vec_t<float>{} + s; }
BMT_FAST_INLINE vec_t<double> broadcast(double s) { return vec_t<double>{} + s; }
#else
BMT_FAST_INLINE vec_t<float> broadcast(float s) {
  const vec_t<float> v = {s};
  return __builtin_shuffle(v, vec_t<int32_t>{});
}
BMT_FAST_INLINE vec_t<double> broadcast(double s) {
  const vec_t<double> v = {s};
  return __builtin_shuffle(v, vec_t<int64_t>{});
}
#endif

template <typename T>
BMT_FAST_INLINE T horizontal_sum(vec_t<T> v) {
  T s = 0;
  for (int i = 0; i < kLanes<T>; ++i) s += v[i];
  return s;
}

template <typename T>
struct ExpConstants;

template <>
struct ExpConstants<float> {
  using Int = int32_t;
  static constexpr int kMantissaBits = 23;
  static constexpr int kBias = 127;
  static constexpr float kMin = -87.0f;      // below this exp() is subnormal or zero: we return 0
  static constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  static constexpr float kLn2Hi = 0.693145751953125f;
  static constexpr float kLn2Lo = 1.428606765330187045e-06f;
  static constexpr int kDegree = 7;
};

template <>
struct ExpConstants<double> {
  using Int = int64_t;
  static constexpr int kMantissaBits = 52;
  static constexpr int kBias = 1023;
  static constexpr double kMin = -708.0;
  static constexpr double kShifter = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double kLn2Hi = 0.6931471803691238164901733398437500;
  static constexpr double kLn2Lo = 1.9082149292705877000220045092e-10;
  static constexpr int kDegree = 13;
};

// exp(x) for x <= 0, vectorised. Cody-Waite reduction x = m*ln2 + r with |r| <= ln2/2, then a Taylor
// polynomial of degree 7 (float, truncation error < 5e-9) or 13 (double, < 2e-17) in Horner form, and
// 2^m built in the exponent bits. Inputs below kMin give exactly 0 (the kernel entry underflows).
//
// The AVX-512 build scales by 2^m with vscalefps/pd under a mask that zeroes the underflowing lanes (the
// lanes below kMin go through the reduction unclamped, -inf included, and are discarded): two
// instructions instead of a clamp, a blend and three to build 2^m in the exponent bits, with the same
// bits (p * 2^m is exact for the normal results that remain). The epilogues of the tiled paths are
// mostly this function.
template <typename T>
BMT_FAST_INLINE vec_t<T> exp_nonpositive(vec_t<T> x) {
  using C = ExpConstants<T>;
#ifndef BMT_FAST_32_VECTOR_REGISTERS
  const auto underflow = x < C::kMin;
  x = underflow ? broadcast(T(C::kMin)) : x;
#endif
  vec_t<T> m = x * T(1.4426950408889634) + C::kShifter;
  m = m - C::kShifter;
  vec_t<T> r = x - m * C::kLn2Hi;
  r = r - m * C::kLn2Lo;
  // Horner evaluation of sum_{k<=deg} r^k / k!
  T inv_fact[C::kDegree + 1];
  inv_fact[0] = 1;
  for (int k = 1; k <= C::kDegree; ++k) inv_fact[k] = inv_fact[k - 1] / T(k);
  vec_t<T> p = broadcast(T(inv_fact[C::kDegree]));
  for (int k = C::kDegree - 1; k >= 0; --k) p = p * r + inv_fact[k];
#ifdef BMT_FAST_32_VECTOR_REGISTERS
  static_assert(kVectorBytes == 64, "the AVX-512 build has 64-byte vectors");
  vec_t<T> result;
  if constexpr (std::is_same_v<T, float>) {
    // lanes with x >= kMin, or NaN (not less than: a NaN x stays NaN)
    const __mmask16 keep = _mm512_cmp_ps_mask(reinterpret_cast<__m512&>(x), _mm512_set1_ps(C::kMin), _CMP_NLT_UQ);
    const __m512 scaled = _mm512_maskz_scalef_ps(keep, reinterpret_cast<__m512&>(p), reinterpret_cast<__m512&>(m));
    std::memcpy(&result, &scaled, sizeof(result));
  } else {
    const __mmask8 keep = _mm512_cmp_pd_mask(reinterpret_cast<__m512d&>(x), _mm512_set1_pd(C::kMin), _CMP_NLT_UQ);
    const __m512d scaled = _mm512_maskz_scalef_pd(keep, reinterpret_cast<__m512d&>(p), reinterpret_cast<__m512d&>(m));
    std::memcpy(&result, &scaled, sizeof(result));
  }
  return result;
#else
  using IntVec = vec_t<typename C::Int>;
  IntVec bits = (__builtin_convertvector(m, IntVec) + C::kBias) << C::kMantissaBits;
  vec_t<T> scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  vec_t<T> result = p * scale;
  return underflow ? vec_t<T>{} : result;
#endif
}

}  // namespace bmt_fast::cpu::BMT_FAST_ISA
