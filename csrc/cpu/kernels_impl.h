// The CPU kernels, compiled once per ISA level: kernels_{base,v3,v4}.cpp set the target, name the
// namespace BMT_FAST_ISA and include this file. No standard-library templates in here (their weak
// instantiations would be shared across the ISA builds); scratch memory comes from the caller.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <limits>
#include <type_traits>

#if BMT_FAST_VECTOR_BYTES >= 32  // the x86-64-v3 / v4 builds: streaming stores and the fence
#include <immintrin.h>
#endif

#include "kernels.h"
#include "simd.h"

namespace bmt_fast::cpu::BMT_FAST_ISA {
namespace {

BMT_FAST_INLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
BMT_FAST_INLINE int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

template <typename T>
BMT_FAST_INLINE void fill(T* p, int64_t count, T value) {
  for (int64_t i = 0; i < count; ++i) p[i] = value;
}

// Distances for the median's selection: negative rounding and NaN to +0 (the selection reads the bits as keys;
// a NaN is told from the norms there).
template <typename T>
BMT_FAST_INLINE vec_t<T> clamp_nonnegative(vec_t<T> v) {
  return v > T(0) ? v : vec_t<T>{};
}

// Distances for K: negative rounding to +0, a NaN kept, so that a NaN particle's entries of K are NaN (as the
// reference's) where the clamp above made them 1 (check_inputs=False). The same one instruction.
template <typename T>
BMT_FAST_INLINE vec_t<T> clamp_distance(vec_t<T> v) {
  return v < T(0) ? vec_t<T>{} : v;
}

// ---- many particles: K from tiles of dot products; the median's window and radix passes -------------

template <typename T>
BMT_FAST_INLINE void rbf_from_dots_impl(T* tile, int64_t ld, int64_t row_begin, int64_t row_end,
                                        int64_t cols, const T* nr, const T* nc, T inv_h) {
  constexpr int L = kLanes<T>;
  const vec_t<T> neg_inv_h = broadcast(T(-inv_h));
  for (int64_t a = row_begin; a < row_end; ++a) {
    T* row = tile + a * ld;
    const vec_t<T> na = broadcast(T(nr[a]));
    int64_t b = 0;
    for (; b + L <= cols; b += L) {
      const vec_t<T> dist = clamp_distance<T>(na + load(nc + b) - T(2) * load(row + b));
      store(row + b, exp_nonpositive<T>(dist * neg_inv_h));
    }
    if (b < cols) {  // ragged tail through a zero-padded vector
      T s[L] = {}, n[L] = {};
      for (int64_t k = b; k < cols; ++k) {
        s[k - b] = row[k];
        n[k - b] = nc[k];
      }
      const vec_t<T> dist = clamp_distance<T>(na + load(n) - T(2) * load(s));
      store(s, exp_nonpositive<T>(dist * neg_inv_h));
      for (int64_t k = b; k < cols; ++k) row[k] = s[k - b];
    }
  }
}

template <typename T>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
};
template <>
struct KeyOf<double> {
  using type = uint64_t;
};

// The squared distance from a dot product and the two norms, clamped at +0: one expression for the radix
// histogram and the selection over stored distances, so both see the same value for a pair.
template <typename T>
BMT_FAST_INLINE T sq_dist_from_dot(T na, T nb, T dot) {
  const T dist = na + nb - T(2) * dot;
  return dist > T(0) ? dist : T(0);
}

// Whether any lane of a comparison result (lanes of -1 or 0) is set.
template <typename M>
BMT_FAST_INLINE bool any_lane(M mask) {
  static_assert(sizeof(M) == kVectorBytes);
#if BMT_FAST_VECTOR_BYTES == 64
  __m512i v;
  std::memcpy(&v, &mask, sizeof(v));
  return _mm512_test_epi32_mask(v, v) != 0;
#elif BMT_FAST_VECTOR_BYTES == 32
  __m256i v;
  std::memcpy(&v, &mask, sizeof(v));
  return !_mm256_testz_si256(v, v);
#else
  uint64_t words[sizeof(M) / 8];
  std::memcpy(words, &mask, sizeof(M));
  uint64_t any = 0;
  for (uint64_t w : words) any |= w;
  return any != 0;
#endif
}

#ifdef BMT_FAST_32_VECTOR_REGISTERS
// The lanes of a comparison result as a bit mask (lane q -> bit q), how many are set, and v's lanes where it
// is set packed to the front (vcompressps / vcompresspd; the rest zero).
template <typename M>
BMT_FAST_INLINE uint32_t lane_bits(M mask) {
  __m512i v;
  std::memcpy(&v, &mask, sizeof(v));
  if constexpr (sizeof(mask[0]) == 4) return _mm512_movepi32_mask(v);
  else return _mm512_movepi64_mask(v);
}
template <typename M>
BMT_FAST_INLINE int count_lanes(M mask) {
  return __builtin_popcount(lane_bits(mask));
}
template <typename T, typename M>
BMT_FAST_INLINE vec_t<T> compress_lanes(M mask, vec_t<T> v) {
  vec_t<T> packed;
  if constexpr (std::is_same_v<T, float>) {
    const __m512 r = _mm512_maskz_compress_ps(static_cast<__mmask16>(lane_bits(mask)), reinterpret_cast<__m512&>(v));
    std::memcpy(&packed, &r, sizeof(packed));
  } else {
    const __m512d r = _mm512_maskz_compress_pd(static_cast<__mmask8>(lane_bits(mask)), reinterpret_cast<__m512d&>(v));
    std::memcpy(&packed, &r, sizeof(packed));
  }
  return packed;
}
#endif

// One vector of squared distances in the median's window pass: its lanes set in `valid` below lo counted into
// under (lanes of -1 per count), those in [lo, hi] appended to out at `written`. The window holds a few
// percent of the values around the median: most vectors have none of them. Those that do: the AVX-512 build
// packs them to the front of a register and stores all of it (out has room for every value of the rows and
// a vector past them, so the whole vector fits past what is written); elsewhere one by one, the store
// unconditional and the count moving past it.
template <typename T, typename Mask>
BMT_FAST_INLINE void window_vector(vec_t<T> dist, vec_t<T> lo, vec_t<T> hi, Mask valid, Mask& under, T* out,
                                   int64_t& written) {
  under -= (dist < lo) & valid;
  const Mask inside = (dist >= lo) & (dist <= hi) & valid;
  if (!any_lane(inside)) return;
#ifdef BMT_FAST_32_VECTOR_REGISTERS
  store(out + written, compress_lanes<T>(inside, dist));
  written += count_lanes(inside);
#else
  for (int q = 0; q < kLanes<T>; ++q) {
    out[written] = dist[q];
    written += inside[q] != 0;
  }
#endif
}

template <typename T>
BMT_FAST_INLINE int64_t window_collect_impl(const T* tile, int64_t ld, int64_t row_begin, int64_t row_end,
                                            int64_t cols, const T* nr, const T* nc, bool upper_only, T lo, T hi,
                                            int64_t* below, T* out) {
  constexpr int L = kLanes<T>;
  using Mask = decltype(vec_t<T>{} < vec_t<T>{});  // lanes of -1 (true) and 0, as wide as T
  const vec_t<T> lo_v = broadcast(lo), hi_v = broadcast(hi);
  int64_t written = 0, under = 0;
  for (int64_t a = row_begin; a < row_end; ++a) {
    const T* row = tile + a * ld;
    const T na = nr[a];
    const vec_t<T> na_v = broadcast(na);
    int64_t b = upper_only ? a + 1 : 0;
    // (na + nb) - 2 dot as sq_dist_from_dot computes it: 2 dot is exact, so a fused multiply-add gives the
    // same value as the separate operations, in the vector loop and in the scalar code alike.
    Mask under_v{};
    for (; b + L <= cols; b += L) {
      const vec_t<T> dist = clamp_nonnegative<T>(na_v + load(nc + b) - T(2) * load(row + b));
      window_vector<T>(dist, lo_v, hi_v, ~Mask{}, under_v, out, written);
    }
    for (int q = 0; q < L; ++q) under += under_v[q];
    for (; b < cols; ++b) {  // the ragged end of the row
      const T dist = sq_dist_from_dot(na, nc[b], row[b]);
      // Branch-free: lo sits at the median, so a branch on dist < lo is a coin toss (mispredicted half of
      // the time, which made this pass 2x slower than both radix passes). The store is unconditional; the
      // count moves past it only inside the window (out has room for every value of the rows).
      under += dist < lo;
      out[written] = dist;
      written += static_cast<int64_t>(dist >= lo) & static_cast<int64_t>(dist <= hi);
    }
  }
  *below += under;
  return written;
}

template <typename T>
BMT_FAST_INLINE void radix_histogram_impl(const T* tile, int64_t ld, int64_t row_begin, int64_t row_end,
                                          int64_t cols, const T* nr, const T* nc, bool upper_only,
                                          int64_t weight, const RadixPass& pass, int64_t* hist) {
  using Key = typename KeyOf<T>::type;
  const int top_shift = pass.shift + pass.width;
  const bool has_top = top_shift < int(8 * sizeof(Key));
  const uint64_t mask = (uint64_t(1) << pass.width) - 1;
  for (int64_t a = row_begin; a < row_end; ++a) {
    const T* row = tile + a * ld;
    for (int64_t b = upper_only ? a + 1 : 0; b < cols; ++b) {
      const T dist = sq_dist_from_dot(nr[a], nc[b], row[b]);
      Key key;
      std::memcpy(&key, &dist, sizeof(key));
      const uint64_t top = has_top ? uint64_t(key >> top_shift) : 0;
      const uint64_t bin = (uint64_t(key) >> pass.shift) & mask;
      for (int t = 0; t < pass.num_targets; ++t) {
        if (top == pass.prefix[t]) hist[(uint64_t(t) << pass.width) | bin] += weight;
      }
    }
  }
}

// ---- loads, stores and conversions of every input dtype ---------------------------------------------

#if BMT_FAST_VECTOR_BYTES == 64
// Every lane, for the zero-masking forms of AVX-512 instructions: GCC 12 warns that the plain forms'
// undefined pass-through operand "may be used uninitialized" (its own header; the same instructions).
constexpr __mmask16 kAllLanes = 0xFFFF;
constexpr __mmask8 kAllPairs = 0xFF;
#endif

#if BMT_FAST_VECTOR_BYTES >= 32
// fp16 <-> fp32 a vector at a time by F16C (every AVX2 and AVX-512 CPU has it; the baseline build converts
// element by element, as c10::Half does): exact widening, and narrowing rounded to nearest even with
// overflow to inf, as c10::Half's conversion (a NaN keeps its sign and the top of its payload, where c10
// writes 0x7E00). Element by element they had made fp16 particles 4-10x slower than fp32 on the Gram path.
BMT_FAST_INLINE vec_t<float> half_to_float(const c10::Half* p) {
#if BMT_FAST_VECTOR_BYTES == 64
  const __m512 wide = _mm512_maskz_cvtph_ps(kAllLanes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  const __m256 wide = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
  vec_t<float> v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
}

// The first count (<= lanes) values of v stored as fp16.
BMT_FAST_INLINE void store_float_as_half(c10::Half* p, vec_t<float> v, int64_t count) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
#if BMT_FAST_VECTOR_BYTES == 64
  __m512 wide;
  std::memcpy(&wide, &v, sizeof(wide));
  const __m256i narrow = _mm512_maskz_cvtps_ph(kAllLanes, wide, kRound);
#else
  __m256 wide;
  std::memcpy(&wide, &v, sizeof(wide));
  const __m128i narrow = _mm256_cvtps_ph(wide, kRound);
#endif
  std::memcpy(p, &narrow, static_cast<size_t>(count) * sizeof(c10::Half));
}
#endif

// Converting loads and stores between the input type and the compute type.
template <typename T, typename In>
BMT_FAST_INLINE vec_t<T> load_as(const In* p) {
  if constexpr (std::is_same_v<In, T>) {
    return load(p);
  } else if constexpr (std::is_same_v<In, c10::BFloat16>) {
    typedef uint16_t half_vec __attribute__((vector_size(kVectorBytes / 2)));
    half_vec raw;
    std::memcpy(&raw, p, sizeof(raw));
    const vec_t<int32_t> bits = __builtin_convertvector(raw, vec_t<int32_t>) << 16;  // bf16 = top half of fp32
    vec_t<T> v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
#if BMT_FAST_VECTOR_BYTES >= 32
  } else if constexpr (std::is_same_v<In, c10::Half> && std::is_same_v<T, float>) {
    return half_to_float(p);
#endif
  } else {
    vec_t<T> v;
    for (int i = 0; i < kLanes<T>; ++i) v[i] = static_cast<T>(p[i]);
    return v;
  }
}

// Load of the first count (<= lanes) elements, zero-filled past them: the ragged last vector of a row.
template <typename T, typename In>
BMT_FAST_INLINE vec_t<T> load_part_as(const In* p, int64_t count) {
  if (count == kLanes<T>) return load_as<T>(p);
  In tmp[kLanes<T>] = {};
  for (int64_t i = 0; i < count; ++i) tmp[i] = p[i];
  return load_as<T>(tmp);
}

// The median's sample (pair_sq_dists): fp32/fp64 rows, or the AMX path's bf16 ones in fp32.
template <typename In, typename T>
BMT_FAST_INLINE void pair_sq_dists_impl(const In* xc, int64_t d, const T* norms, const int64_t* first,
                                        const int64_t* second, int64_t count, T* out) {
  constexpr int L = kLanes<T>;
  for (int64_t t = 0; t < count; ++t) {
    const In* a = xc + first[t] * d;
    const In* b = xc + second[t] * d;
    vec_t<T> acc{};
    int64_t k = 0;
    for (; k + L <= d; k += L) acc += load_as<T>(a + k) * load_as<T>(b + k);
    T dot = horizontal_sum<T>(acc);
    for (; k < d; ++k) dot += static_cast<T>(a[k]) * static_cast<T>(b[k]);
    out[t] = sq_dist_from_dot(norms[first[t]], norms[second[t]], dot);
  }
}

typedef uint32_t u32_vec __attribute__((vector_size(kVectorBytes)));

// c10::BFloat16's conversion, vectorised: round to nearest even on the bit pattern, NaN -> 0x7FC0. The
// bf16 bits in the low half of each lane (the high half zero).
BMT_FAST_INLINE u32_vec bf16_bits(vec_t<float> v) {
  u32_vec bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const u32_vec rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return v != v ? u32_vec{} + 0x7FC0u : rounded;
}

// The value of such bits as fp32 (exact).
BMT_FAST_INLINE vec_t<float> float_of_bf16_bits(u32_vec bits) {
  const u32_vec shifted = bits << 16;
  vec_t<float> v;
  std::memcpy(&v, &shifted, sizeof(v));
  return v;
}

// The first count (<= lanes) of such bits stored as bf16.
BMT_FAST_INLINE void store_bf16_bits(c10::BFloat16* p, u32_vec bits, int64_t count) {
  typedef uint16_t u16_vec __attribute__((vector_size(kVectorBytes / 2)));
  const u16_vec narrow = __builtin_convertvector(bits, u16_vec);
  std::memcpy(p, &narrow, static_cast<size_t>(count) * sizeof(c10::BFloat16));
}

template <typename In, typename T>
BMT_FAST_INLINE void store_as(In* p, vec_t<T> v, int64_t count) {
  if constexpr (std::is_same_v<In, T>) {
    if (count == kLanes<T>) {
      store(p, v);
      return;
    }
  } else if constexpr (std::is_same_v<In, c10::BFloat16> && std::is_same_v<T, float>) {
    store_bf16_bits(p, bf16_bits(v), count);  // (a compile-time count: one vector store)
    return;
#if BMT_FAST_VECTOR_BYTES >= 32
  } else if constexpr (std::is_same_v<In, c10::Half> && std::is_same_v<T, float>) {
    store_float_as_half(p, v, count);
    return;
#endif
  }
  for (int64_t i = 0; i < count; ++i) p[i] = static_cast<In>(v[i]);
}

// f(k, count) for the vectors of [0, len): whole ones with count a compile-time L (so that the loads and
// stores of f take their one-instruction forms), then the ragged tail, if any, with its run-time count.
template <int L, typename F>
BMT_FAST_INLINE void for_each_vector(int64_t len, F&& f) {
  int64_t k = 0;
  for (; k + L <= len; k += L) f(k, std::integral_constant<int64_t, L>{});
  if (k < len) f(k, len - k);
}

// acc[0], acc[1] += the two halves of v in double.
BMT_FAST_INLINE void add_as_doubles(vec_t<double>* acc, const vec_t<float>& v) {
#if BMT_FAST_VECTOR_BYTES == 64  // two whole-register conversions (GCC compiled the generic form below to
                                 // four half-width ones and the shuffles to join them)
  const __m512d wide = reinterpret_cast<__m512d>(v);  // (halves by zero-masking extracts: kAllLanes' comment)
  const __m256 low = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, wide, 0));
  const __m256 high = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, wide, 1));
  acc[0] += reinterpret_cast<vec_t<double>>(_mm512_maskz_cvtps_pd(kAllPairs, low));
  acc[1] += reinterpret_cast<vec_t<double>>(_mm512_maskz_cvtps_pd(kAllPairs, high));
#else
  typedef float half_vec __attribute__((vector_size(kVectorBytes / 2)));
  half_vec h[2];
  std::memcpy(h, &v, sizeof(v));
  acc[0] += __builtin_convertvector(h[0], vec_t<double>);
  acc[1] += __builtin_convertvector(h[1], vec_t<double>);
#endif
}

// The lines of count values from p on (none if count <= 0), prefetched with __builtin_prefetch's locality
// (3: into L1; 1: into L2).
template <int Locality, typename In>
BMT_FAST_INLINE void prefetch_lines(const In* p, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < count * static_cast<int64_t>(sizeof(In)); b += 64) __builtin_prefetch(bytes + b, 0, Locality);
}

// ---- the AMX paths' passes over the particles: column sums, centring and rounding, W in pairs -------

// The column sums of bf16 or fp32 rows (d columns, rows [0, rows)) for columns [col_begin, col_end), in
// double (every bf16 value and its running sum exact to 53 bits): the AMX path's centring shift. A group of
// 4 vectors of columns at a time, summed down all rows in 8 registers of doubles. (Row by row into the sums
// in memory, 1024 x 8192 bf16 took ~1.7 ms; x.sum(0, dtype=float64) made a float64 copy of x first: at
// 256 x 76,800, 157 MB of fresh pages every step.)
template <typename In>
BMT_FAST_INLINE void amx_column_sums_impl(const In* x, int64_t d, int64_t rows, int64_t col_begin, int64_t col_end,
                                          double* sums) {
  constexpr int L = kLanes<float>, kGroup = 4;
  constexpr int64_t kSumsAhead = 48;
  int64_t k = col_begin;
  for (; k + kGroup * L <= col_end; k += kGroup * L) {
    vec_t<double> acc[2 * kGroup] = {};
    for (int64_t r = 0; r < rows; ++r) {
      const In* row = x + r * d + k;
      if (r + kSumsAhead < rows)  // (rows a stride apart: beyond the hardware prefetchers' reach)
        prefetch_lines<3>(row + kSumsAhead * d, kGroup * L);
#pragma GCC unroll 4
      for (int g = 0; g < kGroup; ++g) add_as_doubles(acc + 2 * g, load_as<float>(row + g * L));
    }
    std::memcpy(sums + k, acc, sizeof(acc));
  }
  for (; k < col_end; k += L) {  // the last columns, a vector (or less) at a time
    const int64_t count = min64(L, col_end - k);
    vec_t<double> acc[2] = {};
    for (int64_t r = 0; r < rows; ++r) add_as_doubles(acc, load_part_as<float>(x + r * d + k, count));
    double total[L];
    std::memcpy(total, acc, sizeof(total));
    for (int64_t q = 0; q < count; ++q) sums[k + q] = total[q];
  }
}

// The operands of the AMX path, one pass each (they were a dozen ATen ops with n x d fp32 temporaries
// and their page faults: a third of a step at 4096 x 768). Rows a of x (cols columns, row stride ld, bf16 or
// fp32) centred by shift (cols fp32 values) and rounded to bf16 into xb (row stride ld_xb, columns [cols,
// ld_xb) zeroed); the squares of the rounded values (each exact in fp32) summed 8 to a lane in fp32 (nearly
// always exact: a square has at most 16 significant bits) and those sums in double, added into sq_sums[a]
// (the caller rounds the norms to fp32).
// (Summed in fp32 the norms came out low: a square's last bits are rarely those of a half, so rounding
// them off into a large running sum rounds down more often than up. At 70 x 20,001 the distances were
// 0.09 (16 lanes) to 0.18 (4 lanes) below the exact ones of the rounded particles on average, for
// distances near 40,000, K 1e-5 high.)
template <typename In>
BMT_FAST_INLINE void amx_centre_rows_impl(const In* x, int64_t ld, int64_t cols, const float* shift,
                                          int64_t row_begin, int64_t row_end, c10::BFloat16* xb, int64_t ld_xb,
                                          double* sq_sums, int64_t ahead) {
  constexpr int L = kLanes<float>;
  for (int64_t a = row_begin; a < row_end; ++a) {
    const In* row = x + a * ld;
    if (ahead != 0) prefetch_lines<1>(row + ahead, cols);
    c10::BFloat16* out = xb + a * ld_xb;
    vec_t<double> sum[2] = {};
    vec_t<float> part{};  // the squares of up to 8 vectors (small: their bits kept), then into sum
    int parts = 0;
    for_each_vector<L>(cols, [&](int64_t k, auto count) BMT_FAST_INLINE_LAMBDA {  // the tail zero-padded
      const u32_vec bits = bf16_bits(load_part_as<float>(row + k, count) - load_part_as<float>(shift + k, count));
      const vec_t<float> rounded = float_of_bf16_bits(bits);
      part += rounded * rounded;
      if (++parts == 8) {
        add_as_doubles(sum, part);
        part = vec_t<float>{};
        parts = 0;
      }
      store_bf16_bits(out + k, bits, count);
    });
    add_as_doubles(sum, part);
    std::memset(out + cols, 0, (ld_xb - cols) * sizeof(c10::BFloat16));  // +0.0 (stored one by one before)
    sq_sums[a] += horizontal_sum<double>(sum[0] + sum[1]);
  }
}

// AMX's B operand for K W, pairs [pair_begin, pair_end) of rows: W_i = score_i - a (x_i - shift) rounded
// to bf16, rows 2p and 2p + 1 interleaved feature by feature (the bf16 pair of feature k is one 32-bit
// word: row 2p in its low half), rows at or beyond n zero; pair row p at bw + p ld_bw. cols features of
// rows ld apart.
template <typename In>
BMT_FAST_INLINE void amx_w_pairs_impl(const In* score, const In* x, int64_t ld, int64_t cols, const float* shift,
                                      float a, int64_t n, int64_t pair_begin, int64_t pair_end, uint32_t* bw,
                                      int64_t ld_bw, int64_t ahead) {
  constexpr int L = kLanes<float>;
  const vec_t<float> av = broadcast(a);
  for (int64_t p = pair_begin; p < pair_end; ++p) {
    const int64_t i = 2 * p;
    uint32_t* out = bw + p * ld_bw;
    if (ahead != 0) {
      for (int64_t row = i; row < std::min(i + 2, n); ++row) {
        prefetch_lines<1>(x + row * ld + ahead, cols);
        prefetch_lines<1>(score + row * ld + ahead, cols);
      }
    }
    for_each_vector<L>(cols, [&](int64_t k, auto count) BMT_FAST_INLINE_LAMBDA {
      const vec_t<float> sv = load_part_as<float>(shift + k, count);
      const auto w = [&](int64_t row) BMT_FAST_INLINE_LAMBDA {
        if (row >= n) return u32_vec{};
        return bf16_bits(load_part_as<float>(score + row * ld + k, count) -
                         (load_part_as<float>(x + row * ld + k, count) - sv) * av);
      };
      const u32_vec pair = w(i) | (w(i + 1) << 16);
      std::memcpy(out + k, &pair, static_cast<size_t>(count) * sizeof(uint32_t));
    });
  }
}

// ---- transposes of 32- and 64-bit words -------------------------------------------------------------

#ifdef BMT_FAST_32_VECTOR_REGISTERS
// dst rows 0..15 (row stride ld_dst) <- the transpose of the 16 x 16 block of src rows 0..15 (row stride
// ld_src), 32-bit words: unpacks of 32- and 64-bit halves within 128-bit lanes, then two rounds of lane
// shuffles (after the unpacks u[4 b + q] holds, in lane L, column 4 L + q of rows 4 b .. 4 b + 3).
BMT_FAST_INLINE void transpose_16x16_words(const uint32_t* src, int64_t ld_src, uint32_t* dst, int64_t ld_dst) {
  __m512i r[16], t[16], u[16], v[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * ld_src);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_maskz_unpacklo_epi32(kAllLanes, r[i], r[i + 1]);
    t[i + 1] = _mm512_maskz_unpackhi_epi32(kAllLanes, r[i], r[i + 1]);
  }
  for (int b = 0; b < 4; ++b) {
    const __m512i *tb = t + 4 * b;
    u[4 * b + 0] = _mm512_maskz_unpacklo_epi64(kAllPairs, tb[0], tb[2]);
    u[4 * b + 1] = _mm512_maskz_unpackhi_epi64(kAllPairs, tb[0], tb[2]);
    u[4 * b + 2] = _mm512_maskz_unpacklo_epi64(kAllPairs, tb[1], tb[3]);
    u[4 * b + 3] = _mm512_maskz_unpackhi_epi64(kAllPairs, tb[1], tb[3]);
  }
  for (int q = 0; q < 4; ++q) {  // v[q], v[4 + q]: rows 0..7, lanes (0, 2) and (1, 3); v[8 + q], v[12 + q]: rows 8..15
    v[q] = _mm512_maskz_shuffle_i32x4(kAllLanes, u[q], u[4 + q], 0x88);
    v[4 + q] = _mm512_maskz_shuffle_i32x4(kAllLanes, u[q], u[4 + q], 0xdd);
    v[8 + q] = _mm512_maskz_shuffle_i32x4(kAllLanes, u[8 + q], u[12 + q], 0x88);
    v[12 + q] = _mm512_maskz_shuffle_i32x4(kAllLanes, u[8 + q], u[12 + q], 0xdd);
  }
  for (int q = 0; q < 4; ++q) {
    _mm512_storeu_si512(dst + q * ld_dst, _mm512_maskz_shuffle_i32x4(kAllLanes, v[q], v[8 + q], 0x88));
    _mm512_storeu_si512(dst + (8 + q) * ld_dst, _mm512_maskz_shuffle_i32x4(kAllLanes, v[q], v[8 + q], 0xdd));
    _mm512_storeu_si512(dst + (4 + q) * ld_dst, _mm512_maskz_shuffle_i32x4(kAllLanes, v[4 + q], v[12 + q], 0x88));
    _mm512_storeu_si512(dst + (12 + q) * ld_dst, _mm512_maskz_shuffle_i32x4(kAllLanes, v[4 + q], v[12 + q], 0xdd));
  }
}

// The same for 64-bit words, 8 x 8: unpacks of row pairs, then two rounds of two-source permutes (after the
// unpacks t[r] holds the even (r even) or odd columns of rows r & ~1 and (r & ~1) + 1, interleaved).
BMT_FAST_INLINE void transpose_8x8_words(const uint64_t* src, int64_t ld_src, uint64_t* dst, int64_t ld_dst) {
  __m512i r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm512_loadu_si512(src + i * ld_src);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm512_maskz_unpacklo_epi64(kAllPairs, r[i], r[i + 1]);
    t[i + 1] = _mm512_maskz_unpackhi_epi64(kAllPairs, r[i], r[i + 1]);
  }
  // u[4 h + q]: rows 4 h .. 4 h + 3 of columns (c, c + 4), c = 0, 2, 1, 3 for q = 0..3
  const __m512i pairs_a = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0);
  const __m512i pairs_b = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
  for (int h = 0; h < 2; ++h) {
    const __m512i* th = t + 4 * h;
    u[4 * h + 0] = _mm512_maskz_permutex2var_epi64(kAllPairs, th[0], pairs_a, th[2]);
    u[4 * h + 1] = _mm512_maskz_permutex2var_epi64(kAllPairs, th[0], pairs_b, th[2]);
    u[4 * h + 2] = _mm512_maskz_permutex2var_epi64(kAllPairs, th[1], pairs_a, th[3]);
    u[4 * h + 3] = _mm512_maskz_permutex2var_epi64(kAllPairs, th[1], pairs_b, th[3]);
  }
  const __m512i low = _mm512_set_epi64(11, 10, 9, 8, 3, 2, 1, 0), high = _mm512_set_epi64(15, 14, 13, 12, 7, 6, 5, 4);
  constexpr int kColumn[4] = {0, 2, 1, 3};
  for (int q = 0; q < 4; ++q) {
    _mm512_storeu_si512(dst + kColumn[q] * ld_dst, _mm512_maskz_permutex2var_epi64(kAllPairs, u[q], low, u[4 + q]));
    _mm512_storeu_si512(dst + (kColumn[q] + 4) * ld_dst,
                        _mm512_maskz_permutex2var_epi64(kAllPairs, u[q], high, u[4 + q]));
  }
}
#endif

// dst[k * ld_dst + i] = src[i * ld_src + k] for 32- or 64-bit words k in [k_begin, k_end) of rows i in [0,
// rows): AMX's B operand from the rounded particles (their bf16 feature pairs), the A operand P^T of
// rbf_kernel_backward, and rbf_kernel's lower triangle. Blocks of one cache line of each source row (16 or 8
// words) by 64 rows (a 256- or 512-byte run of each destination row), so that both sides move whole lines;
// in the AVX-512 build whole 16 x 16 (8 x 8) blocks are transposed in registers. (ATen's transposing copy
// took 15.7 ms at 256 x 76,800, a quarter of the step.)
template <typename W>
BMT_FAST_INLINE void transpose_words_impl(const W* src, int64_t ld_src, int64_t rows, int64_t k_begin, int64_t k_end,
                                          W* dst, int64_t ld_dst) {
  constexpr int64_t kLine = 64 / sizeof(W);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kLine) {
    const int64_t k1 = min64(k0 + kLine, k_end);
    for (int64_t i0 = 0; i0 < rows; i0 += 64) {
      const int64_t i1 = min64(i0 + 64, rows);
      int64_t i_scalar = i0;
#ifdef BMT_FAST_32_VECTOR_REGISTERS
      if (k1 - k0 == kLine) {
        for (; i_scalar + kLine <= i1; i_scalar += kLine) {
          if constexpr (sizeof(W) == 4)
            transpose_16x16_words(src + i_scalar * ld_src + k0, ld_src, dst + k0 * ld_dst + i_scalar, ld_dst);
          else
            transpose_8x8_words(src + i_scalar * ld_src + k0, ld_src, dst + k0 * ld_dst + i_scalar, ld_dst);
        }
      }
#endif
      for (int64_t k = k0; k < k1; ++k) {
        W* out = dst + k * ld_dst;
        for (int64_t i = i_scalar; i < i1; ++i) out[i] = src[i * ld_src + k];
      }
    }
  }
}

// ---- streamed stores, and whether what is stored is finite ------------------------------------------

// A full vector of the output, written around the caches when it is a whole aligned cache line (the
// AVX-512 build): phi is written once and not read again, so this saves the read-for-ownership of each
// line. Half lines (AVX2) are not streamed one at a time: written a vector at a time across many rows,
// partial lines left the write-combining buffers half full (twice as slow as plain stores on a Zen 3);
// the AVX2 build streams whole lines (stream_line).
template <typename In, typename T>
BMT_FAST_INLINE void stream_as(In* p, vec_t<T> v) {
#ifdef BMT_FAST_32_VECTOR_REGISTERS
  static_assert(kVectorBytes == 64, "the AVX-512 build streams whole 64-byte lines");
  if constexpr (std::is_same_v<In, float> && std::is_same_v<T, float>) {
    if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) {
      _mm512_stream_ps(p, reinterpret_cast<__m512&>(v));
      return;
    }
  } else if constexpr (std::is_same_v<In, double> && std::is_same_v<T, double>) {
    if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) {
      _mm512_stream_pd(p, reinterpret_cast<__m512d&>(v));
      return;
    }
  }
#endif
  store_as<In, T>(p, v, kLanes<T>);
}

// The AVX2 build's whole lines: V vectors that make one aligned 64-byte line of the output, streamed back
// to back so that each write-combining buffer fills at once (fp32 / fp64 output only); in the AVX-512 build
// V whole lines, each streamed as stream_as does. Returns false, and stores nothing, where that does not
// apply.
template <typename In, typename T, int V>
BMT_FAST_INLINE bool stream_line(In* p, const vec_t<T> (&v)[V]) {
#ifdef BMT_FAST_32_VECTOR_REGISTERS
  if constexpr (std::is_same_v<In, T>) {  // (AVX-512: each vector a whole line, as stream_as streams them)
    for (int i = 0; i < V; ++i) stream_as<In, T>(p + i * kLanes<T>, v[i]);
    return true;
  }
#endif
#if BMT_FAST_VECTOR_BYTES == 32 && !defined(BMT_FAST_32_VECTOR_REGISTERS)
  if constexpr (std::is_same_v<In, T> && V * kVectorBytes == 64) {
    if ((reinterpret_cast<uintptr_t>(p) & 63) != 0) return false;
    for (int i = 0; i < V; ++i) {
      if constexpr (std::is_same_v<T, float>) _mm256_stream_ps(p + i * kLanes<T>, reinterpret_cast<const __m256&>(v[i]));
      else _mm256_stream_pd(p + i * kLanes<T>, reinterpret_cast<const __m256d&>(v[i]));
    }
    return true;
  }
#endif
  (void)p;
  (void)v;
  return false;
}

BMT_FAST_INLINE void stream_fence() {
#if BMT_FAST_VECTOR_BYTES >= 32
  _mm_sfence();
#endif
}

// The largest compute-type value that stays finite when stored as In (round to nearest even).
template <typename In, typename T>
constexpr T largest_storable() {
  if constexpr (std::is_same_v<In, c10::Half>) return T(0x1.ffdffep+15f);  // below 65520 (rounds to Inf)
  else if constexpr (std::is_same_v<In, c10::BFloat16>) return T(0x1.fefffep+127f);  // below bits 0x7F7F8000
  else return std::numeric_limits<T>::max();
}

// The apply pass tracks whether phi is finite while its values are in registers, so the API need not
// scan phi again (a whole pass over it). `bad` gets 0 in a lane for a value that is finite once stored as
// In, NaN otherwise (a NaN stays NaN), over the first count lanes: 0 * v is NaN exactly for NaN/Inf v.
template <typename In, bool Full, typename T>
BMT_FAST_INLINE void track_finite(vec_t<T>& bad, vec_t<T> v, int64_t count) {
  if constexpr (!Full) {
    for (int64_t i = count; i < kLanes<T>; ++i) v[i] = T(0);
  }
  if constexpr (std::is_same_v<In, T>) {
    bad += v * T(0);
  } else {  // a narrower output: finite values past its range round to Inf
    const T top = largest_storable<In, T>();
    bad += (v <= top) & (v >= -top) ? vec_t<T>{} : broadcast(std::numeric_limits<T>::quiet_NaN());
  }
}

// track_finite for a register block's vectors, into four independent parts that reach bad by one addition
// (into). bad is carried from one vector of columns to the next, and with every vector register taken by the
// block GCC keeps it on the stack: one dependent addition per row (a store forwarded to the next row's load)
// had made a chain of ~11 cycles a row, 176 a vector of 16 rows, longer than the block's 288 FMAs take (perf
// of the apply pass, cache-resident, 2-core Zen 5 VM).
template <typename T>
struct FiniteParts {
  vec_t<T> part[4] = {};
  template <typename In, bool Full>
  BMT_FAST_INLINE void add(int i, vec_t<T> v, int64_t count) {
    track_finite<In, Full, T>(part[i & 3], v, count);
  }
  BMT_FAST_INLINE void into(vec_t<T>& bad) const { bad += (part[0] + part[1]) + (part[2] + part[3]); }
};

// The first `rows` of a block's R vectors.
template <typename In, bool Full, typename T, int R>
BMT_FAST_INLINE void track_finite_block(vec_t<T>& bad, const vec_t<T> (&v)[R], int rows, int64_t count) {
  FiniteParts<T> seen;
  for (int r = 0; r < R && r < rows; ++r) seen.template add<In, Full>(r, v[r], count);
  seen.into(bad);
}

// ---- the AMX epilogues: K from tiles of dot products, phi from K W ----------------------------------

// rbf_from_dots for the tensor-core path (many particles; here, after the load, store and stream helpers):
// K of rows [0, rows) x columns [0, cols) of an fp32 dot tile (row stride ld), with entry (a, a + diag) (a
// particle's own term) exactly 1 if own_one (rbf_kernel's diagonal) else 0 (svgd_step's), added into
// rowsum[a] in fp32 unless rowsum is null, and stored as Out (bf16: the step's operand or a bf16 result;
// fp32: the result for fp32 particles) in k_out (row stride ld_out); columns [cols, cols_padded) of k_out
// are zeroed. Native: whole vectors rounded to bf16 by AVX512-BF16's
// vcvtneps2bf16 (the same round to nearest even; kernels.cpp decides whether the CPU has it), one
// instruction for the seven of store_as, which took about half of this function's time (2-core Xeon, perf).
// Without rowsum (rbf_kernel: K is the result, written once and far larger than the caches) the native
// build streams whole aligned 64-byte lines around the caches, which saves the read for ownership of each
// line: the stores were half of this function's samples at 4096 x 128 (perf). An fp32 result is streamed
// a vector (one line) at a time where it is aligned.
template <bool Native, typename Out>
BMT_FAST_INLINE void amx_rbf_from_dots_impl(float* tile, int64_t ld, int64_t rows, int64_t cols, int64_t cols_padded,
                                            const float* nr, const float* nc, float inv_h, int64_t diag, bool own_one,
                                            Out* k_out, int64_t ld_out, float* rowsum) {
  constexpr bool kBf16 = std::is_same_v<Out, c10::BFloat16>;
  constexpr int L = kLanes<float>;
  const vec_t<float> neg_inv_h = broadcast(-inv_h);
  // the own term: a dot product of -inf gives the distance +inf, so K = exp(-inf) = 0 exactly (NaN for an
  // invalid H); one of +inf gives -inf, clamped to 0, so K = exp(0) = 1 exactly; no test per vector
  const float own_dot = own_one ? std::numeric_limits<float>::infinity() : -std::numeric_limits<float>::infinity();
  for (int64_t a = 0; a < rows; ++a) {
    float* row = tile + a * ld;
    Out* out = k_out + a * ld_out;
    const vec_t<float> na = broadcast(nr[a]);
    const int64_t own = a + diag;
    if (own >= 0 && own < cols) row[own] = own_dot;
    // k = K at columns [b, b + count), the lanes beyond count zero (exp(0) = 1 there otherwise)
    const auto k_at = [&](int64_t b, auto count, vec_t<float>& k) BMT_FAST_INLINE_LAMBDA {
      const vec_t<float> dist = clamp_distance<float>(na + load_part_as<float>(nc + b, count) -
                                                      2.f * load_part_as<float>(row + b, count));
      k = exp_nonpositive<float>(dist * neg_inv_h);
      if constexpr (!std::is_same_v<decltype(count), std::integral_constant<int64_t, L>>)
        for (int64_t q = count; q < L; ++q) k[q] = 0.f;
    };
    vec_t<float> sum{};
    int64_t done = 0;
#ifdef BMT_FAST_32_VECTOR_REGISTERS
    // (inline assembly for AVX512-BF16: the intrinsics need the avx512bf16 target everywhere up)
    if constexpr (Native && kBf16) {
      if (!rowsum) {
        constexpr std::integral_constant<int64_t, L> whole{};
        for (; done + 2 * L <= cols; done += 2 * L) {
          vec_t<float> k0, k1;
          k_at(done, whole, k0);
          k_at(done + L, whole, k1);
          __m512i line;  // vcvtne2ps2bf16: k0 rounded into the low half, k1 into the high half
          asm("vcvtne2ps2bf16 %2, %1, %0" : "=v"(line) : "v"(k1), "v"(k0));
          c10::BFloat16* p = out + done;
          if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) _mm512_stream_si512(reinterpret_cast<__m512i*>(p), line);
          else _mm512_storeu_si512(p, line);
        }
      }
    }
#endif
    for_each_vector<L>(cols - done, [&](int64_t b, auto count) BMT_FAST_INLINE_LAMBDA {
      b += done;
      vec_t<float> k;
      k_at(b, count, k);
      sum += k;
      constexpr bool whole = std::is_same_v<decltype(count), std::integral_constant<int64_t, L>>;
      if constexpr (!kBf16 && whole) {
        if (!rowsum) {
          stream_as<float, float>(out + b, k);
          return;
        }
      }
#ifdef BMT_FAST_32_VECTOR_REGISTERS
      if constexpr (Native && kBf16 && whole) {
        __m256i narrow;
        asm("vcvtneps2bf16 %1, %0" : "=v"(narrow) : "v"(k));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + b), narrow);
        return;
      }
#endif
      store_as<Out, float>(out + b, k, count);
    });
    for (int64_t q = cols; q < cols_padded; ++q) out[q] = Out(0.f);
    if (rowsum) rowsum[a] += horizontal_sum<float>(sum);
  }
  if (!rowsum) stream_fence();  // the streamed lines ordered before what the caller does next
}

#ifdef BMT_FAST_32_VECTOR_REGISTERS
// One aligned 64-byte line of bf16 (the bits of two vectors of fp32 lanes) written around the caches.
BMT_FAST_INLINE void stream_bf16_line(c10::BFloat16* p, u32_vec low, u32_vec high) {
  typedef uint16_t u16_vec __attribute__((vector_size(kVectorBytes / 2)));
  const u16_vec a = __builtin_convertvector(low, u16_vec), b = __builtin_convertvector(high, u16_vec);
  const auto line = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19,
                                            20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31);
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), reinterpret_cast<const __m512i&>(line));
}
#endif

// out[k] = value(k, count) (fp32 vectors of count lanes) for k in [0, len), as In: a result written once,
// streamed around the caches where its vectors are whole lines (fp32 ones, and bf16 ones two vectors a line
// where out starts on a line), stored elsewhere; seen(v, count) sees each vector. The caller fences
// (stream_fence) before the lines are read.
template <typename In, typename Value, typename Seen>
BMT_FAST_INLINE void write_row_streamed(In* out, int64_t len, Value&& value, Seen&& seen) {
  constexpr int L = kLanes<float>;
  int64_t done = 0;
#ifdef BMT_FAST_32_VECTOR_REGISTERS
  if constexpr (std::is_same_v<In, c10::BFloat16>) {
    if ((reinterpret_cast<uintptr_t>(out) & 63) == 0) {
      constexpr auto whole = std::integral_constant<int64_t, L>{};
      for (; done + 2 * L <= len; done += 2 * L) {
        const vec_t<float> v0 = value(done, whole), v1 = value(done + L, whole);
        seen(v0, whole);
        seen(v1, whole);
        stream_bf16_line(out + done, bf16_bits(v0), bf16_bits(v1));
      }
    }
  }
#endif
  for_each_vector<L>(len - done, [&](int64_t k0, auto count) BMT_FAST_INLINE_LAMBDA {
    const int64_t k = done + k0;
    const vec_t<float> v = value(k, count);
    seen(v, count);
    if constexpr (std::is_same_v<decltype(count), std::integral_constant<int64_t, L>> && std::is_same_v<In, float>)
      stream_as<In, float>(out + k, v);
    else
      store_as<In, float>(out + k, v, count);
  });
}

// phi_a = ((acc_a + (a rowsum_a) (x_a - shift)) + score_a) (1/n) in In: the own term k_aa = 1 and the
// repulsion's row-sum term added to K W, as the AMX path's last pass, for rows [row_begin, row_end) and
// columns [col_begin, col_end) (x, score, phi: row stride d; acc holds those rows and columns from its
// first entry on, row stride ld_acc). Returns whether all of these phi values are finite in In (tracked
// in registers: the API then need not scan phi). The division by n is a product with the fp32 1/n (one
// vdivps per vector took ~5% of a few-particle step, 256 x 76,800 bf16). phi is streamed (written once:
// write_row_streamed).
template <typename In>
BMT_FAST_INLINE bool amx_finish_rows_impl(const float* acc, int64_t ld_acc, const float* rowsum, const In* x,
                                          const In* score, const float* shift, float a, float n, int64_t d,
                                          int64_t row_begin, int64_t row_end, int64_t col_begin, int64_t col_end,
                                          In* phi) {
  constexpr int L = kLanes<float>;
  const vec_t<float> inv_n = broadcast(1.0f / n);
  vec_t<float> bad{};
  for (int64_t r = row_begin; r < row_end; ++r) {
    const vec_t<float> coef = broadcast(a * rowsum[r]);
    const int64_t at = r * d + col_begin;
    const float* acc_row = acc + (r - row_begin) * ld_acc;
    const float* shift_c = shift + col_begin;
    const auto value = [&](int64_t k, auto count) BMT_FAST_INLINE_LAMBDA {
      const vec_t<float> xc = load_part_as<float>(x + at + k, count) - load_part_as<float>(shift_c + k, count);
      return (load_part_as<float>(acc_row + k, count) + coef * xc + load_part_as<float>(score + at + k, count)) * inv_n;
    };
    write_row_streamed(phi + at, col_end - col_begin, value, [&](vec_t<float> v, auto count) BMT_FAST_INLINE_LAMBDA {
      constexpr bool whole = std::is_same_v<decltype(count), std::integral_constant<int64_t, L>>;
      track_finite<In, whole, float>(bad, v, count);
    });
  }
  stream_fence();
  return horizontal_sum<float>(bad) == 0.f;
}

// ---- rbf_kernel_backward on AMX ---------------------------------------------------------------------

// log(max(v, smallest normal float)), vectorised: v = 2^e m with m in [sqrt(1/2), sqrt(2)), and
// log m = 2 atanh(s) = 2 (s + s^3/3 + ... + s^9/9) with s = (m - 1)/(m + 1), |s| <= 0.172 (truncation
// below 1e-9). The clamp is the fp32 path's (K's entries that underflowed to 0 have P = 0).
BMT_FAST_INLINE vec_t<float> log_clamped(vec_t<float> v) {
  const float tiny = std::numeric_limits<float>::min();
  v = v < tiny ? broadcast(tiny) : v;
  vec_t<int32_t> bits;
  std::memcpy(&bits, &v, sizeof(bits));
  vec_t<int32_t> e = (bits >> 23) - 127;
  bits = (bits & 0x7FFFFF) | 0x3F800000;  // the mantissa as a value in [1, 2)
  vec_t<float> m;
  std::memcpy(&m, &bits, sizeof(m));
  const vec_t<int32_t> big = m > 1.41421356f;  // lanes of -1 where m is halved
  m = big ? m * 0.5f : m;
  e = e - big;
  const vec_t<float> s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  const vec_t<float> series = s * (2.0f + s2 * (2.0f / 3 + s2 * (2.0f / 5 + s2 * (2.0f / 7 + s2 * (2.0f / 9)))));
  return __builtin_convertvector(e, vec_t<float>) * 0.693147180559945f + series;
}

// The tile passes read short segments of rows a page apart, which the hardware prefetchers do not follow:
// each asks for row r + kPrefetchRows of grad and K while it forms row r (4096 x 4096 x 128, y's gradient:
// 14.6-15.4 -> 9.0-9.3 ms).
constexpr int64_t kPrefetchRows = 8;

template <typename In>
BMT_FAST_INLINE void prefetch_p_row(const In* g, const In* k, int64_t ld, int64_t r, int64_t cols) {
  for (int64_t c = 0; c < cols; c += 64 / sizeof(In)) {
    __builtin_prefetch(g + r * ld + c);
    __builtin_prefetch(k + r * ld + c);
  }
}

// P = grad * K (bf16 or fp32 n x m matrices, row stride ld; exact in fp32 for bf16) at row r, columns [c, c + count) of a
// tile, with entry (r, r + diag) left out (a self kernel's own term: P_ii (xc_i - xc_i) = 0 exactly; in the
// sums, next to P_ii ~ 1, the other terms of a row with tiny K were lost, and its gradient with them); P log K
// added into logs unless p_log_k is null (zero-filled tail lanes: 0 * finite).
template <typename In, typename Count>
BMT_FAST_INLINE vec_t<float> p_at(const In* g, const In* k, int64_t ld, int64_t r, int64_t c, Count count,
                                  int64_t diag, const double* p_log_k, vec_t<float>& logs) {
  const vec_t<float> kv = load_part_as<float>(k + r * ld + c, count);
  vec_t<float> p = load_part_as<float>(g + r * ld + c, count) * kv;
  if (r + diag >= c && r + diag < c + count) p[r + diag - c] = 0.f;
  if (p_log_k != nullptr) logs += p * log_clamped(kv);
  return p;
}

// P of rows [0, rows) x columns [0, cols) of a tile (p_at), rounded to bf16 as AMX's A operand: rows of p16
// (row stride ld16, columns [cols, cols_padded) zeroed). rowsum[r] += the fp32 sum of row r's rounded values;
// unless p_log_k is null, *p_log_k += sum P log K.
template <typename In>
BMT_FAST_INLINE void amx_p_rows_impl(const In* g, const In* k, int64_t ld, int64_t rows, int64_t cols,
                                     int64_t cols_padded, int64_t diag, c10::BFloat16* p16, int64_t ld16, float* rowsum,
                                     double* p_log_k) {
  constexpr int L = kLanes<float>;
  double plk = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    if (r + kPrefetchRows < rows) prefetch_p_row(g, k, ld, r + kPrefetchRows, cols);
    vec_t<float> sum{}, logs{};
    c10::BFloat16* out = p16 + r * ld16;
    for_each_vector<L>(cols, [&](int64_t c, auto count) BMT_FAST_INLINE_LAMBDA {
      const u32_vec bits = bf16_bits(p_at(g, k, ld, r, c, count, diag, p_log_k, logs));
      sum += float_of_bf16_bits(bits);
      store_bf16_bits(out + c, bits, count);
    });
    for (int64_t c = cols; c < cols_padded; ++c) out[c] = c10::BFloat16(0.f);
    rowsum[r] += horizontal_sum<float>(sum);
    plk += horizontal_sum<float>(logs);
  }
  if (p_log_k != nullptr) *p_log_k += plk;
}

// The same P as AMX's B operand: rows 2q and 2q + 1 interleaved column by column (the bf16 pair of column c
// is word c of pair row q: row 2q in its low half; row stride ldw words), rows [rows, rows_padded) zero.
// colsum[c] += the fp32 sum of column c's rounded values; unless p_log_k is null, *p_log_k += sum P log K.
template <typename In>
BMT_FAST_INLINE void amx_p_pairs_impl(const In* g, const In* k, int64_t ld, int64_t rows, int64_t rows_padded,
                                      int64_t cols, int64_t diag, uint32_t* pw, int64_t ldw, float* colsum,
                                      double* p_log_k) {
  constexpr int L = kLanes<float>;
  vec_t<float> logs{};
  for (int64_t q = 0; q < rows_padded / 2; ++q) {
    for (int64_t r = 2 * q + kPrefetchRows; r < min64(2 * q + kPrefetchRows + 2, rows); ++r)
      prefetch_p_row(g, k, ld, r, cols);
    uint32_t* out = pw + q * ldw;
    for_each_vector<L>(cols, [&](int64_t c, auto count) BMT_FAST_INLINE_LAMBDA {
      const auto rounded = [&](int64_t r) BMT_FAST_INLINE_LAMBDA {
        return r < rows ? bf16_bits(p_at(g, k, ld, r, c, count, diag, p_log_k, logs)) : u32_vec{};
      };
      const u32_vec low = rounded(2 * q), high = rounded(2 * q + 1);
      const vec_t<float> sums =
          load_part_as<float>(colsum + c, count) + float_of_bf16_bits(low) + float_of_bf16_bits(high);
      store_as<float, float>(colsum + c, sums, count);
      const u32_vec pair = low | (high << 16);
      std::memcpy(out + c, &pair, static_cast<size_t>(count) * sizeof(uint32_t));
    });
  }
  if (p_log_k != nullptr) *p_log_k += horizontal_sum<float>(logs);
}

// Columns [0, cols) of rows 2q and 2q + 1 of src (bf16, row stride ld) interleaved column by column into pair
// row q of out (row stride ld_out words), for q in [pair_begin, pair_end): a B operand from rows of A operands.
BMT_FAST_INLINE void bf16_row_pairs_impl(const c10::BFloat16* src, int64_t ld, int64_t pair_begin, int64_t pair_end,
                                         int64_t cols, uint32_t* out, int64_t ld_out) {
  const auto* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t q = pair_begin; q < pair_end; ++q) {
    const uint16_t *low = bits + 2 * q * ld, *high = low + ld;
    uint32_t* dst = out + q * ld_out;
    for (int64_t c = 0; c < cols; ++c) dst[c] = uint32_t{low[c]} | (uint32_t{high[c]} << 16);
  }
}

// rbf_kernel_backward's rows on AMX: out_r = scale (sums_r xc_r - acc_r) in In (the particles' type), xc
// (bf16, the rounded centred particles) with row stride ld, acc (fp32) and out with row stride d, for rows
// [row_begin, row_end); out streamed (write_row_streamed).
template <typename In>
BMT_FAST_INLINE void amx_grad_rows_impl(const float* acc, int64_t ld_acc, const float* sums, const c10::BFloat16* xc,
                                        int64_t ld, float scale, int64_t d, int64_t row_begin, int64_t row_end,
                                        int64_t col_begin, int64_t col_end, In* out) {
  const vec_t<float> sv = broadcast(scale);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const vec_t<float> coef = broadcast(sums[r]);
    const float* acc_row = acc + (r - row_begin) * ld_acc;
    const c10::BFloat16* xc_row = xc + r * ld + col_begin;
    const auto value = [&](int64_t k, auto count) BMT_FAST_INLINE_LAMBDA {
      return sv * (coef * load_part_as<float>(xc_row + k, count) - load_part_as<float>(acc_row + k, count));
    };
    write_row_streamed(out + r * d + col_begin, col_end - col_begin, value, [](vec_t<float>, auto) {});
  }
  stream_fence();
}

// ---- few particles, huge d: the Gram pass (gram_columns) and the apply pass (apply_columns) ---------
//
// Columns are shifted by particle 0 (x_j - x_0) on the fly: SVGD is translation invariant, identical
// particles give exact zeros, and a cloud far from the origin loses nothing (the difference of two
// nearby floats is exact). No shifted copy of x is ever stored beyond one L1-sized chunk. The Gram pass
// also writes each column's mean (d numbers), the centre the apply pass shifts by.

// dst[0, len) = src - first for one row chunk, zero up to the next full vector.
template <typename In, typename T>
BMT_FAST_INLINE void shifted_row(const In* src, const In* first, int64_t len, T* dst) {
  constexpr int L = kLanes<T>;
  int64_t k = 0;
  for (; k + L <= len; k += L) store(dst + k, load_as<T>(src + k) - load_as<T>(first + k));
  if (k < len) store(dst + k, load_part_as<T>(src + k, len - k) - load_part_as<T>(first + k, len - k));
}

// Asks for the next chunk of a row while this one is processed: rows are read in short segments, too
// short for the hardware prefetcher to ramp up on its own.
template <typename In>
BMT_FAST_INLINE void prefetch_next_chunk(const In* src, int64_t chunk, int64_t remaining) {
  prefetch_lines<3>(src + chunk, min64(chunk, remaining));
}

// Row i of the Gram pass's inputs: rows i < nx are rows of x, the others rows i - nx of y (a second set, for
// rbf_kernel(x, y)).
template <typename In>
BMT_FAST_INLINE const In* gram_row(const In* x, const In* y, int64_t nx, int64_t d, int64_t i) {
  return i < nx ? x + i * d : y + (i - nx) * d;
}

// buf (n - 1 rows, row stride ld) <- columns [k0, k0 + len) of rows 1 .. n-1 shifted by particle 0 (x_0):
// exact zeros for identical particles, nothing lost far from the origin (row 0 itself would be all zeros).
template <typename In, typename T>
BMT_FAST_INLINE void shifted_chunk(const In* x, const In* y, int64_t nx, int64_t n, int64_t d, int64_t k0,
                                   int64_t len, int64_t ld, T* buf) {
  for (int64_t i = 1; i < n; ++i) shifted_row(gram_row(x, y, nx, d, i) + k0, x + k0, len, buf + (i - 1) * ld);
}

// The Gram pass's prefetch of a later chunk (columns [k0, k0 + len) of every row) into L2, a line per
// step(): the FMA loops over the current chunk call it as they go, two chunks ahead. Asked for all at once
// into L1 (n rows x len / 16 lines, one chunk ahead), the prefetches filled the line-fill buffers and held
// the core until memory had answered, with no work to overlap, and the copy into buf still stalled on its
// loads (~45 % of the pass at 16 x 409,600). 2-core Xeon, alternating, fp32 rbf_kernel 16 x 409,600
// ~1.05 -> ~0.84 ms, 16 x 76,800 0.215 -> 0.166 ms.
template <typename In>
struct GramPrefetch {
  static constexpr int64_t kLine = 64 / sizeof(In);
  const In *x, *y;
  int64_t nx, n, d, k0 = 0, lines = 0, row = 0, line = 0;
  const In* row_p = nullptr;

  void start(int64_t k_begin, int64_t len) {
    k0 = k_begin;
    lines = (len + kLine - 1) / kLine;
    line = 0;
    row = len > 0 ? 0 : n;
    if (row < n) row_p = gram_row(x, y, nx, d, 0) + k0;
  }
  BMT_FAST_INLINE void step() {
    if (row >= n) return;
    __builtin_prefetch(row_p + line * kLine, 0, 1);
    if (++line == lines) {
      line = 0;
      if (++row < n) row_p = gram_row(x, y, nx, d, row) + k0;
    }
  }
  void finish() {
    while (row < n) step();
  }
};

// Buffer rows are chunk + kRowPad elements apart so that consecutive rows do not share their low 12
// address bits with each other or with the rows of x (whose stride is often a multiple of 4 KiB): such
// "4K aliasing" makes loads wait for unrelated stores.
template <typename T>
constexpr int64_t kRowPad = 64 / sizeof(T) * 3;

// Flush the fp32 vector partial sums of the Gram into double this often (in chunks): each lane then adds
// at most kGramFlush * chunk / lanes products in fp32 before the double accumulation.
constexpr int64_t kGramFlush = 8;

#ifdef BMT_FAST_32_VECTOR_REGISTERS
constexpr int kGramCols = 4;
#else
constexpr int kGramCols = 2;
#endif

// v, held in a register from here on: GCC otherwise folds the load of a value that several FMAs use into
// each of them (a load per FMA, where the loads then bound the loop).
template <typename V>
BMT_FAST_INLINE V in_register(V v) {
#if defined(__x86_64__) && defined(__GNUC__)
  __asm__("" : "+v"(v));
#endif
  return v;
}

// The Gram pass's register blocks: B x B dot products (8 loads feed 16 FMAs); a last block of fewer rows
// where n - 1 is not a multiple of B. Rows: those of the buffer (row b holds x_{b+1} - x_0).
constexpr int kGramBlock = 4;

// f(std::integral_constant<int, r>) for a block of r = 1 .. kGramBlock rows.
template <typename F>
BMT_FAST_INLINE void with_block_rows(int r, F&& f) {
  static_assert(kGramBlock == 4);
  if (r == 4) f(std::integral_constant<int, 4>{});
  else if (r == 3) f(std::integral_constant<int, 3>{});
  else if (r == 2) f(std::integral_constant<int, 2>{});
  else f(std::integral_constant<int, 1>{});
}

// Row 0, the shift, is exactly zero once shifted (x_0 - x_0): its products are all 0 and are not computed.
// The buffer holds rows 1 .. n-1 (row b + 1 in buffer row b), in blocks of kGramBlock and one last block of
// what is left: 120 products per column at n = 16 instead of the 136 with row 0, and one row less to copy.
// Each product and each column sum takes its terms in the same order as with row 0 (whose terms were +0 for
// finite x; with a NaN or Inf in x_0 every other row is non-finite too, and so are the results):
// the same bits. 2-core AMD EPYC VM (Zen 4), fp32: the pass alone, one thread, x in L3 (ms) 4 x 76,800
// 0.045 -> 0.038, 16 x 76,800 0.304 -> 0.275, 64 x 76,800 4.1 -> 3.9; median_bandwidth, two threads,
// alternating rounds: 16 x 76,800 0.31-0.36 -> 0.29-0.30, 16 x 409,600 1.35-1.43 -> 1.18-1.33,
// 64 x 76,800 2.28-2.33 -> 2.13-2.18.
template <typename In, typename T>
BMT_FAST_INLINE void gram_columns_impl(const In* x, const In* y, int64_t nx, int64_t n, int64_t d,
                                       int64_t col_begin, int64_t col_end, int64_t chunk, double* gram, T* shift,
                                       T* scratch) {
  constexpr int L = kLanes<T>;
  constexpr int B = kGramBlock;
  const int64_t m = n > 0 ? n - 1 : 0;  // buffer rows: x_1 .. x_{n-1} shifted by x_0
  const int64_t blocks = round_up(m, B) / B;
  const int64_t ld = chunk + kRowPad<T>;
  T* buf = scratch;                                   // round_up(m, B) x ld, shifted columns
  T* partial = buf + blocks * B * ld;                 // blocks^2 x B x B vectors
  T* colsum = partial + blocks * blocks * B * B * L;  // chunk: sum_i (x_i - x_0) of the chunk's columns
  for (int64_t ib = 0; ib < blocks; ++ib)  // the blocks jb >= ib that the passes below use
    fill(partial + (ib * blocks + ib) * B * B * L, (blocks - ib) * B * B * L, T(0));
  auto flush = [&] {
    for (int64_t ib = 0; ib < blocks; ++ib)
      for (int64_t jb = ib; jb < blocks; ++jb)
        for (int r = 0; r < B; ++r)
          for (int c = 0; c < B; ++c) {
            T* v = partial + (((ib * blocks + jb) * B + r) * B + c) * L;
            const int64_t i = ib * B + r + 1, j = jb * B + c + 1;
            if (j < n && i <= j) gram[i * n + j] += static_cast<double>(horizontal_sum<T>(load(v)));
            store(v, vec_t<T>{});
          }
  };
  const auto rows_of = [&](int64_t b) BMT_FAST_INLINE_LAMBDA { return static_cast<int>(min64(B, m - b * B)); };
  int64_t since_flush = 0;
  GramPrefetch<In> next{x, y, nx, n, d};
  next.start(col_begin, min64(2 * chunk, col_end - col_begin));
  next.finish();  // (the first chunks: nothing to overlap them with)
  for (int64_t k0 = col_begin; k0 < col_end; k0 += chunk) {
    const int64_t len = min64(chunk, col_end - k0);
    shifted_chunk(x, y, nx, n, d, k0, len, ld, buf);
    next.start(k0 + 2 * chunk, min64(chunk, col_end - k0 - 2 * chunk));
    const int64_t len_vec = round_up(len, L);
    for (int64_t ib = 0; ib < blocks; ++ib) {
      for (int64_t jb = ib; jb < blocks; ++jb) {
        T* out = partial + (ib * blocks + jb) * B * B * L;
        auto acc_at = [&](int r, int c) { return out + (r * B + c) * L; };
        const T* xi = buf + ib * B * ld;
        const T* xj = buf + jb * B * ld;
        if (ib == jb) {  // a diagonal block: the products r <= c only (10 FMAs from 4 loads, not 16 from 8)
          with_block_rows(rows_of(ib), [&](auto rows) BMT_FAST_INLINE_LAMBDA {
            constexpr int R = decltype(rows)::value;
            auto diagonal = [&](auto with_sums) BMT_FAST_INLINE_LAMBDA {
              vec_t<T> acc[R][R];
              for (int r = 0; r < R; ++r)
                for (int c = r; c < R; ++c) acc[r][c] = load(acc_at(r, c));
              for (int64_t k = 0; k < len_vec; k += L) {
                next.step();
                next.step();
                vec_t<T> vi[R];
                for (int r = 0; r < R; ++r) vi[r] = in_register(load(xi + r * ld + k));
                for (int r = 0; r < R; ++r)
                  for (int c = r; c < R; ++c) acc[r][c] += vi[r] * vi[c];
                if constexpr (decltype(with_sums)::value) {  // the column sums, rows in order, while loaded
                  vec_t<T> sum = ib == 0 ? vec_t<T>{} : load(colsum + k);
                  for (int r = 0; r < R; ++r) sum += vi[r];
                  store(colsum + k, sum);
                }
              }
              for (int r = 0; r < R; ++r)
                for (int c = r; c < R; ++c) store(acc_at(r, c), acc[r][c]);
            };
            if (shift) diagonal(std::true_type{});
            else diagonal(std::false_type{});
          });
        } else {
          // Up to kGramCols columns of the block at a time: all four with 32 vector registers; two with 16,
          // where 16 accumulators and 8 operands had spilled (operands reloaded for each FMA: two loads per
          // FMA), and 8 + 4 + 2 fit. Only the last block (jb) can have fewer than B rows.
          with_block_rows(rows_of(jb), [&](auto rows) BMT_FAST_INLINE_LAMBDA {
            constexpr int R = decltype(rows)::value;          // the block's columns
            constexpr int W = R < kGramCols ? R : kGramCols;  // at a time
            auto columns = [&](auto width, int c0) BMT_FAST_INLINE_LAMBDA {
              constexpr int C = decltype(width)::value;
              vec_t<T> acc[B][C];
              for (int r = 0; r < B; ++r)
                for (int c = 0; c < C; ++c) acc[r][c] = load(acc_at(r, c0 + c));
              for (int64_t k = 0; k < len_vec; k += L) {
                next.step();
                next.step();
                vec_t<T> vi[B], vj[C];
                for (int r = 0; r < B; ++r) vi[r] = in_register(load(xi + r * ld + k));
                for (int c = 0; c < C; ++c) vj[c] = in_register(load(xj + (c0 + c) * ld + k));
                for (int r = 0; r < B; ++r)
                  for (int c = 0; c < C; ++c) acc[r][c] += vi[r] * vj[c];
              }
              for (int r = 0; r < B; ++r)
                for (int c = 0; c < C; ++c) store(acc_at(r, c0 + c), acc[r][c]);
            };
            constexpr int kLast = R % W == 0 ? W : R % W;  // (3 columns two at a time: 2, then 1)
            for (int c0 = 0; c0 < R; c0 += W) {
              if (c0 + W <= R) columns(std::integral_constant<int, W>{}, c0);
              else columns(std::integral_constant<int, kLast>{}, c0);
            }
          });
        }
      }
    }
    if (shift) {  // shift[k0 + k] <- x_0 + mean_i (x_i - x_0): the centre of each column (exact nearby)
      const vec_t<T> inv_n = broadcast(T(T(1) / T(n)));
      for (int64_t k = 0; k < len; k += L) {
        const int64_t count = min64(L, len - k);
        const vec_t<T> sum = blocks > 0 ? load(colsum + k) : vec_t<T>{};  // (one particle: x_0 itself)
        store_as<T, T>(shift + k0 + k, load_part_as<T>(x + k0 + k, count) + sum * inv_n, count);
      }
    }
    next.finish();
    if (++since_flush == kGramFlush) {
      flush();
      since_flush = 0;
    }
  }
  flush();
}

// Row j of x and g at the vector of columns at k (count of them; all lanes when Full) into R sums: xc_j = x_j -
// s, w_j = g_j - a xc_j, acc[r] += kt[j R + r] w_j. Returns xc_j, and g_j in *gj when asked (a row's own terms,
// add_own_terms). The direct pass and its two halves take the same terms in the same order through these.
template <int R, bool Full, typename In, typename T>
BMT_FAST_INLINE vec_t<T> add_row(vec_t<T> (&acc)[R], const In* x, const In* g, int64_t d, int64_t k, int64_t count,
                                 int64_t j, const T* kt, vec_t<T> va, vec_t<T> s, vec_t<T>* gj) {
  const auto load_in = [&](const In* p) BMT_FAST_INLINE_LAMBDA {
    return Full ? load_as<T>(p) : load_part_as<T>(p, count);
  };
  const vec_t<T> xc = load_in(x + j * d + k) - s;
  const vec_t<T> gv = load_in(g + j * d + k);
  const vec_t<T> w = gv - va * xc;
  for (int r = 0; r < R; ++r) acc[r] += broadcast(T(kt[j * R + r])) * w;
  if (gj) *gj = gv;
  return xc;
}

// Row i's own terms c_i xc_i + g_i / n (own = 1/n) into its sum.
template <typename T>
BMT_FAST_INLINE void add_own_terms(vec_t<T>& acc, T c_i, vec_t<T> xc, vec_t<T> own, vec_t<T> gi) {
  acc += broadcast(c_i) * xc;
  acc += own * gi;
}

// One vector of columns (count of them; all lanes when Full) of R output rows ib..ib+R-1 (rows past n
// are computed from kt's zero padding and not stored):
//   phi_i = c_i xc_i + g_i / n + sum_{j != i} kn_ij (g_j - a xc_j),   xc = x - s,
// with R accumulators in registers, each x_j and g_j loaded straight from the input and w_j formed in
// a register: no centred copy is written. kt holds this block's K/n transposed (kt[j * R + r]), so the
// R broadcasts of one j come from one cache line; its diagonal is 0 and c_i = a sum_{j != i} kn_ij: a
// row's own term k_ii = 1 is g_i / n exactly. (Folded into w_i it was (g_i - a xc_i) / n + a xc_i / n,
// whose two large terms cancel when the other k_ij are small: an error of eps a |xc_i| / n.) own = 1/n.
template <int R, bool Full, typename In, typename T>
BMT_FAST_INLINE void apply_vector(const In* x, const In* g, In* phi, int64_t n, int64_t d, int64_t ib, int64_t k,
                                  int64_t count, const T* kt, const T* c, vec_t<T> va, vec_t<T> s, vec_t<T> own,
                                  vec_t<T>& bad) {
  auto load_in = [&](const In* p) { return Full ? load_as<T>(p) : load_part_as<T>(p, count); };
  vec_t<T> acc[R];
  auto step = [&](int64_t j, vec_t<T>* gj) BMT_FAST_INLINE_LAMBDA {
    return add_row<R, Full>(acc, x, g, d, k, count, j, kt, va, s, gj);
  };
  if (ib + R <= n) {
    // The block's own rows add c_i xc_i + g_i / n where their x and g are loaded anyway: each line of x
    // and of g is read once per block. Rows whose lines share a cache set (a row stride that is a multiple
    // of 4 KiB, the usual case: d = prompt length x hidden size) would otherwise evict each other between
    // two reads.
    for (int r = 0; r < R; ++r) acc[r] = vec_t<T>{};
    for (int64_t j = 0; j < ib; ++j) step(j, nullptr);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {  // unrolled: acc stays in registers
      vec_t<T> gr;
      const vec_t<T> xc = step(ib + r, &gr);
      add_own_terms(acc[r], T(c[ib + r]), xc, own, gr);
    }
    for (int64_t j = ib + R; j < n; ++j) step(j, nullptr);
  } else {  // the last, partial block: padding rows (c = 0) are computed, not stored
    for (int r = 0; r < R; ++r) {
      const int64_t i = ib + r < n ? ib + r : n - 1;
      acc[r] = broadcast(T(c[ib + r])) * (load_in(x + i * d + k) - s) + own * load_in(g + i * d + k);
    }
    for (int64_t j = 0; j < n; ++j) step(j, nullptr);
  }
  if (Full && std::is_same_v<In, T> && ib + R <= n) {  // phi is not read again: store past the caches
    track_finite_block<In, Full, T>(bad, acc, R, count);
    for (int r = 0; r < R; ++r) stream_as<In, T>(phi + (ib + r) * d + k, acc[r]);
    return;
  }
  const int rows = static_cast<int>(min64(R, n - ib));
  track_finite_block<In, Full, T>(bad, acc, rows, count);
  for (int r = 0; r < rows; ++r) store_as<In, T>(phi + (ib + r) * d + k, acc[r], Full ? kLanes<T> : count);
}

// Row blocks of apply_columns: up to kApplyMaxRows accumulators (one vector register each) plus the
// operands (x_j - s, w_j, s, a and a broadcast) fit in the register file: 16 with AVX-512's 32
// registers; with the 16 of AVX2 or SSE the packed pass below keeps kApplyRows rows of two vectors each
// (8 accumulators). (kernels_v4.cpp defines BMT_FAST_32_VECTOR_REGISTERS: #pragma
// GCC target does not define __AVX512F__.) A block covers min(kApplyMaxRows, the rows left rounded up to
// kApplyRows).
#ifdef BMT_FAST_32_VECTOR_REGISTERS
constexpr int kApplyMaxRows = 16;
#else
constexpr int kApplyMaxRows = kApplyRows;
#endif

// Rows of the register block at row ib: min(max_rows, the rows left rounded up to kApplyRows).
BMT_FAST_INLINE int block_rows(int64_t n, int64_t ib, int max_rows) {
  const int64_t left = round_up(n - ib, kApplyRows);
  return static_cast<int>(left < max_rows ? left : max_rows);
}

// Loads ahead of the apply pass: each vector of columns touches 2n rows at a stride of d, too many
// streams for the hardware prefetcher. Into L2, 16 vectors ahead: into L1, 4 ahead, they held line-fill
// buffers, which bounded what was in flight (2-core Xeon, alternating, fp32 svgd_step 16 x 409,600
// ~3.6 -> ~3.4 ms against ~2.8 ms for a torch copy of the bytes it moves).
constexpr int64_t kApplyPrefetchVectors = 16;

template <bool Full, typename In, typename T>
BMT_FAST_INLINE void apply_columns_vector(const In* x, const In* g, In* phi, int64_t n, int64_t d, int64_t k,
                                          int64_t count, int64_t col_end, const T* shift, const T* kt,
                                          const T* c, vec_t<T> va, vec_t<T> own, vec_t<T>& bad) {
  constexpr int L = kLanes<T>;
  const int64_t ahead = k + kApplyPrefetchVectors * L;
  if (Full && ahead < col_end) {
    for (int64_t j = 0; j < n; ++j) {
      __builtin_prefetch(x + j * d + ahead, 0, 1);
      __builtin_prefetch(g + j * d + ahead, 0, 1);
    }
  }
  const vec_t<T> s = load_part_as<T>(shift + k, count);
  for (int64_t ib = 0; ib < n;) {
    const int R = block_rows(n, ib, kApplyMaxRows);
    const T* kb = kt + ib * n;
    if constexpr (kApplyMaxRows >= 16) {
      if (R == 16) apply_vector<16, Full>(x, g, phi, n, d, ib, k, count, kb, c, va, s, own, bad);
      if (R == 12) apply_vector<12, Full>(x, g, phi, n, d, ib, k, count, kb, c, va, s, own, bad);
    }
    if constexpr (kApplyMaxRows >= 8) {
      if (R == 8) apply_vector<8, Full>(x, g, phi, n, d, ib, k, count, kb, c, va, s, own, bad);
    }
    if (R == 4) apply_vector<4, Full>(x, g, phi, n, d, ib, k, count, kb, c, va, s, own, bad);
    ib += R;
  }
}

// The apply pass in two halves of the rows, for kApplyHalvesParticles (16) particles (one register block of
// R = 16 rows) whose rows are a multiple of 4 KiB apart, as a soft prompt's usually are (d = prompt length x
// hidden size). There the 32 rows of x and g have their lines at one column offset in one set of L1 (whose
// set index repeats every 4 KiB) and, at multiples of 64 KiB, of L2 (16 ways): the direct pass, which needs
// all 32 at once and prefetches them ahead, lost prefetched lines before their use. Here a chunk of
// kApplyHalvesChunkVectors vectors of columns goes twice: rows 0-7 add into the 16 sums of each vector, which
// wait in the scratch (part, in L1), then rows 8-15 finish them into phi; each half prefetches the other's
// lines a half-pass ahead (the first half the second's lines of this chunk, the second the first's of the
// next chunk), so that about half the rows' lines of an offset are held at a time. Each sum takes its terms
// in the direct pass's order (j = 0 .. 15, a row's own terms at j = i), so phi is the same bit for bit.
// 2-core AMD EPYC VM (Zen 5), fp32 H given, 2 threads, PASSIVE, six alternating rounds, direct -> halves
// (ms): 16 x 409,600 2.39-2.87 -> 2.18-2.72 (medians 2.53 -> 2.29); one thread 5.07-5.21 -> 4.07-4.26; 16 x
// 410,624 (a multiple of 4 KiB, not of 64 KiB) 2.45-2.68 -> 2.26-2.38; fp64 16 x 204,800 2.20-2.39 ->
// 2.02-2.10; 16 x 76,800 and 16 x 102,400 (in L3) level. With rows 64 bytes further apart (16 x 409,616,
// the direct pass) the step took 2.04-2.45 ms in the same rounds.

// Rows J0 .. J1-1 (all of them rows of the block, which starts at row 0) into the R sums of one whole vector
// of columns at k: First starts them at 0 and leaves them in part, the second half takes them from part and
// writes phi.
template <int R, int J0, int J1, bool First, typename In, typename T>
BMT_FAST_INLINE void apply_half(const In* x, const In* g, In* phi, T* part, int64_t d, int64_t k, const T* kt,
                                const T* c, vec_t<T> va, vec_t<T> s, vec_t<T> own, vec_t<T>& bad) {
  constexpr int L = kLanes<T>;
  vec_t<T> acc[R];
  for (int r = 0; r < R; ++r) acc[r] = First ? vec_t<T>{} : load(part + r * L);
#pragma GCC unroll 16
  for (int j = J0; j < J1; ++j) {
    vec_t<T> gv;
    const vec_t<T> xc = add_row<R, true>(acc, x, g, d, k, L, j, kt, va, s, &gv);
    add_own_terms(acc[j], T(c[j]), xc, own, gv);
  }
  if constexpr (First) {
    for (int r = 0; r < R; ++r) store(part + r * L, acc[r]);
  } else {
    track_finite_block<In, true, T>(bad, acc, R, L);
    for (int r = 0; r < R; ++r) stream_as<In, T>(phi + r * d + k, acc[r]);
  }
}

// The whole vectors of [col_begin, col_end) by halves; returns where the whole vectors end (the caller takes
// the ragged rest). part: kApplyHalvesChunkVectors * R vectors (apply_scratch_size).
template <int R, typename In, typename T>
BMT_FAST_INLINE int64_t apply_columns_halves(const In* x, const In* g, In* phi, int64_t d, int64_t col_begin,
                                             int64_t col_end, const T* shift, const T* kt, const T* c,
                                             vec_t<T> va, vec_t<T> own, T* part, vec_t<T>& bad) {
  constexpr int L = kLanes<T>, H = R / 2;
  constexpr int64_t kChunk = kApplyHalvesChunkVectors * L;
  const int64_t end = col_begin + (col_end - col_begin) / L * L;
  const auto prefetch_rows = [&](int j0, int j1, int64_t at) BMT_FAST_INLINE_LAMBDA {
    if (at >= end) return;
    for (int j = j0; j < j1; ++j) {
      __builtin_prefetch(x + j * d + at, 0, 1);
      __builtin_prefetch(g + j * d + at, 0, 1);
    }
  };
  for (int64_t k0 = col_begin; k0 < end; k0 += kChunk) {
    const int64_t k1 = min64(end, k0 + kChunk);
    for (int64_t k = k0; k < k1; k += L) {
      prefetch_rows(H, R, k);
      apply_half<R, 0, H, true, In, T>(x, g, phi, part + (k - k0) / L * R * L, d, k, kt, c, va,
                                       load_as<T>(shift + k), own, bad);
    }
    for (int64_t k = k0; k < k1; k += L) {
      prefetch_rows(0, H, k + kChunk);
      apply_half<R, H, R, false, In, T>(x, g, phi, part + (k - k0) / L * R * L, d, k, kt, c, va,
                                        load_as<T>(shift + k), own, bad);
    }
  }
  return end;
}

// The packed apply pass, for the ISA builds with 16 vector registers (AVX2, SSE), and for the AVX-512 build
// from kPackedMinParticles particles (8 rows x 2 vectors there: 16 accumulators). Their CPUs often have a
// 32 KiB 8-way L1 (and an 8-way L2): the 2n rows of x and g, at a stride that is usually a multiple of
// 4 KiB, share one set there, and the direct pass above, which reads them a vector at a time and n/R
// times over, lost each line before its next use (an AVX2 Zen 3: 3-4 GB/s). Here a block of columns is
// first copied row by row (sequential reads, the next block prefetched) into two L1 buffers: each row's
// own terms c_j xc_j + g_j / n and w_j = g_j - a xc_j (xc centred); the register blocks then read only
// those. A register block is
// kApplyRows rows x kPackedVectors vectors of columns (8 accumulators): one broadcast of K feeds two
// FMAs, and each output row gets a whole 64-byte line at once (AVX2, fp32 / fp64), streamed past the
// caches.
constexpr int kPackedVectors = 2;
#ifdef BMT_FAST_32_VECTOR_REGISTERS
constexpr int kPackedMaxRows = 8;
#else
constexpr int kPackedMaxRows = kApplyRows;
#endif
// The AVX-512 build packs too from this many particles: its direct pass reloads x_j and g_j and forms w_j
// once per block of 16 rows, and the rows' 4 KiB-aliased lines leave L1 between two blocks. 2-core Xeon
// (Emerald Rapids), fp32, Gram path, H given, 3 alternating rounds against the direct pass (ms): 32 x 76,800
// 2.5-2.7 -> 1.8-2.2, 48 x 76,800 4.6-4.8 -> 3.8-4.2, 64 x 76,800 7.8-9.4 -> 5.6-7.3, 64 x 409,600 54-56 ->
// 41-44. Below 32 it was not faster (24 x 76,800 level; 8 x 76,800 0.24-0.30 -> 0.35-0.39): x and g are
// read once per block there, and packing adds a pass. Not faster either: the next chunks prefetched into
// L2 two ahead, a line at a time, as the Gram pass does; 128-column chunks.
constexpr int64_t kPackedMinParticles = 32;

// phi as in apply_vector. The first buffer holds each row's own terms, c_i xc_i + g_i / n (kt's diagonal
// is 0: g_i / n from the input g, not from w_i, where it would cancel against c_i xc_i).
template <int R, int V, typename In, typename T>
BMT_FAST_INLINE void apply_packed_line(const T* ownb, const T* wb, int64_t ld, In* phi, int64_t n, int64_t d,
                                       int64_t ib, int64_t kb, int64_t k, int64_t count, const T* kt,
                                       vec_t<T>& bad) {
  constexpr int L = kLanes<T>;
  vec_t<T> acc[R][V];
  for (int r = 0; r < R; ++r) {  // padding rows read the last real row and are not stored
    const int64_t i = ib + r < n ? ib + r : n - 1;
    for (int v = 0; v < V; ++v) acc[r][v] = load(ownb + i * ld + kb + v * L);
  }
  for (int64_t j = 0; j < n; ++j) {
    vec_t<T> w[V];
    for (int v = 0; v < V; ++v) w[v] = load(wb + j * ld + kb + v * L);
    for (int r = 0; r < R; ++r) {
      const vec_t<T> kr = broadcast(T(kt[j * R + r]));
      for (int v = 0; v < V; ++v) acc[r][v] += kr * w[v];
    }
  }
  FiniteParts<T> seen;
  for (int r = 0; r < R; ++r) {
    if (ib + r >= n) break;
    In* out = phi + (ib + r) * d + k;
    if (count == V * L) {
      for (int v = 0; v < V; ++v) seen.template add<In, true>(r * V + v, acc[r][v], L);
      if (!stream_line<In, T, V>(out, acc[r]))
        for (int v = 0; v < V; ++v) store_as<In, T>(out + v * L, acc[r][v], L);
    } else {
      for (int v = 0; v < V && v * L < count; ++v) {
        const int64_t part = min64(L, count - v * L);
        seen.template add<In, false>(r * V + v, acc[r][v], part);
        store_as<In, T>(out + v * L, acc[r][v], part);
      }
    }
  }
  seen.into(bad);
}

template <typename In, typename T>
BMT_FAST_INLINE void apply_columns_packed(const In* x, const In* g, In* phi, int64_t n, int64_t d,
                                          int64_t col_begin, int64_t col_end, const T* shift, const T* kt,
                                          const T* c, T a, vec_t<T> own, T* buf, vec_t<T>& bad) {
  constexpr int L = kLanes<T>, V = kPackedVectors;
  const int64_t chunk = apply_pack_chunk(n);  // a multiple of V * L: whole register blocks
  const int64_t ld = chunk + kRowPad<T>;
  T* ownb = buf;
  T* wb = buf + n * ld;
  const vec_t<T> va = broadcast(T(a));
  for (int64_t k0 = col_begin; k0 < col_end; k0 += chunk) {
    const int64_t len = min64(chunk, col_end - k0);
    const int64_t padded = round_up(len, V * L);
    for (int64_t j = 0; j < n; ++j) {
      const In* xj = x + j * d + k0;
      const In* gj = g + j * d + k0;
      prefetch_next_chunk(xj, chunk, col_end - k0 - chunk);
      prefetch_next_chunk(gj, chunk, col_end - k0 - chunk);
      const vec_t<T> cj = broadcast(T(c[j]));
      for (int64_t k = 0; k < padded; k += L) {  // past len: zeros (the ragged last block)
        const int64_t count = len - k < L ? (len - k > 0 ? len - k : 0) : L;
        const vec_t<T> xc = load_part_as<T>(xj + k, count) - load_part_as<T>(shift + k0 + k, count);
        const vec_t<T> gv = load_part_as<T>(gj + k, count);
        store(ownb + j * ld + k, cj * xc + own * gv);
        store(wb + j * ld + k, gv - va * xc);
      }
    }
    for (int64_t k = 0; k < len; k += V * L) {
      const int64_t count = min64(V * L, len - k);
      for (int64_t ib = 0; ib < n;) {
        const int R = block_rows(n, ib, kPackedMaxRows);
#ifdef BMT_FAST_32_VECTOR_REGISTERS
        if (R == 8) apply_packed_line<8, V>(ownb, wb, ld, phi, n, d, ib, k, k0 + k, count, kt + ib * n, bad);
#endif
        if (R == 4) apply_packed_line<4, V>(ownb, wb, ld, phi, n, d, ib, k, k0 + k, count, kt + ib * n, bad);
        ib += R;
      }
    }
  }
}

// scratch: apply_scratch_size<T>(n) elements (kernels.h): round_up(n, kApplyRows) * n, then the packed pass's 2n
// rows of apply_pack_chunk(n) + kRowPad, or the halves' sums.
// Returns whether every phi value it wrote is finite.
template <typename In, typename T>
BMT_FAST_INLINE bool apply_columns_impl(const In* x, const In* g, In* phi, int64_t n, int64_t d,
                                        int64_t col_begin, int64_t col_end, const T* shift, const T* kn,
                                        const T* c, T a, T* scratch) {
  constexpr int L = kLanes<T>;
  const int64_t rows = round_up(n, kApplyRows);
  // kn (rows x n, padding rows zero) re-laid per row block: block ib of R rows at kt + ib * n, j-major.
  T* kt = scratch;
#ifdef BMT_FAST_32_VECTOR_REGISTERS
  const bool packed = n >= kPackedMinParticles;
#else
  const bool packed = true;
#endif
  for (int64_t ib = 0; ib < rows;) {
    const int R = block_rows(n, ib, packed ? kPackedMaxRows : kApplyMaxRows);
    for (int64_t j = 0; j < n; ++j)
      for (int r = 0; r < R; ++r) kt[ib * n + j * R + r] = kn[(ib + r) * n + j];
    ib += R;
  }
  vec_t<T> bad{};
  const vec_t<T> own = broadcast(static_cast<T>(1.0 / static_cast<double>(n)));  // k_ii / n
#ifdef BMT_FAST_32_VECTOR_REGISTERS
  if (packed) {
    apply_columns_packed(x, g, phi, n, d, col_begin, col_end, shift, kt, c, a, own, scratch + rows * n, bad);
    stream_fence();
    return horizontal_sum<T>(bad) == T(0);
  }
  const vec_t<T> va = broadcast(T(a));
  int64_t k = col_begin;
  if constexpr (std::is_same_v<In, T>) {  // (fp32 / fp64: a vector is a whole line)
    if (n == kApplyHalvesParticles && d * int64_t{sizeof(In)} % 4096 == 0)
      k = apply_columns_halves<kApplyHalvesParticles>(x, g, phi, d, col_begin, col_end, shift, kt, c, va, own,
                                                       scratch + rows * n, bad);
  }
  for (; k + L <= col_end; k += L)
    apply_columns_vector<true>(x, g, phi, n, d, k, L, col_end, shift, kt, c, va, own, bad);
  if (k < col_end)
    apply_columns_vector<false>(x, g, phi, n, d, k, col_end - k, col_end, shift, kt, c, va, own, bad);
#else
  (void)L;
  apply_columns_packed(x, g, phi, n, d, col_begin, col_end, shift, kt, c, a, own, scratch + rows * n, bad);
#endif
  stream_fence();
  return horizontal_sum<T>(bad) == T(0);
}

// ---- many-particle regime with few features: the fused step -----------------------------------------
//
// For a block of kFusedRows rows and kFusedVectors vectors of columns at a time: the dot products by FMAs
// in registers (xc's rows broadcast, the packed transposed columns loaded), K's entries from them in the
// same registers, and K times W added into the rows' sums, without a tile of dot products in memory. Up to
// kFusedLaneMaxFeatures features W is packed as xc's columns are (transposed) and each row keeps one sum
// vector per feature, whose lanes are added at the end (K never leaves the registers); with more, K's block
// goes through L1 and W's rows (row-major, dw columns) are added into the rows' sums a vector of features
// at a time.
constexpr int kFusedVectors = kVectorBytes == 64 ? 4 : 2;  // 16 of the 32 zmm; 8 of the 16 ymm / xmm
constexpr int64_t kFusedGroupRows = 16;  // rows that take each block of columns in turn (from L1)

// s[r][v] = xc_{r0 + r} . xc_{j} for the kFusedVectors vectors of columns j from j0 (xt: packed blocks).
template <typename T>
BMT_FAST_INLINE void fused_dots(const T* const* rows, const T* xt_block, int64_t d,
                                vec_t<T> (&s)[kFusedRows][kFusedVectors]) {
  constexpr int L = kLanes<T>;
  for (int r = 0; r < kFusedRows; ++r)
    for (int v = 0; v < kFusedVectors; ++v) s[r][v] = vec_t<T>{};
  for (int64_t k = 0; k < d; ++k) {
    const T* col = xt_block + k * kFusedPack;
    vec_t<T> b[kFusedVectors];
    for (int v = 0; v < kFusedVectors; ++v) b[v] = in_register(load(col + v * L));
    for (int r = 0; r < kFusedRows; ++r) {
      const vec_t<T> a = broadcast(rows[r][k]);
      for (int v = 0; v < kFusedVectors; ++v) s[r][v] += a * b[v];
    }
  }
}

// In place: s[r][v] -> K's entry (0 for a row's own column, and for padded rows and columns, whose norms
// are +inf); each row's entries added into its row-sum vector rs[r].
template <typename T>
BMT_FAST_INLINE void fused_kernel_entries(vec_t<T> (&s)[kFusedRows][kFusedVectors], const T* nr, const T* nc,
                                          T neg_inv_h, int64_t own_begin, T* const* rs) {
  constexpr int L = kLanes<T>;
  for (int r = 0; r < kFusedRows; ++r) {
    const vec_t<T> na = broadcast(nr[r]);
    vec_t<T> sum = load(rs[r]);
    for (int v = 0; v < kFusedVectors; ++v) {
      const vec_t<T> dist = clamp_distance<T>(na + load(nc + v * L) - T(2) * s[r][v]);
      s[r][v] = exp_nonpositive<T>(dist * neg_inv_h);
    }
    const int64_t own = own_begin + r;  // the row's own column, relative to the block's first
    if (own >= 0 && own < kFusedVectors * L) s[r][own / L][own % L] = T(0);
    for (int v = 0; v < kFusedVectors; ++v) sum += s[r][v];
    store(rs[r], sum);
  }
}

// acc[o][k..] += sum_q kv(o, q) w[q][k..] for kFusedRows outputs o, q over [0, count), and DV vectors of
// features from k, with kv(o, q) = kmat[o out_stride + q in_stride]: the row side (o a row of the K block
// kb, q its columns) and the symmetric form's column side (o a column, q the rows). Each load of W feeds
// kFusedRows outputs.
template <int DV, typename T>
BMT_FAST_INLINE void fused_add_kw(const T* kmat, int64_t out_stride, int64_t in_stride, int64_t count, const T* w,
                                  int64_t dw, int64_t k, T* const* acc) {
  constexpr int L = kLanes<T>;
  vec_t<T> o[kFusedRows][DV];
  for (int r = 0; r < kFusedRows; ++r)
    for (int v = 0; v < DV; ++v) o[r][v] = load(acc[r] + k + v * L);
  for (int64_t q = 0; q < count; ++q) {
    vec_t<T> wv[DV];
    for (int v = 0; v < DV; ++v) wv[v] = in_register(load(w + q * dw + k + v * L));
    for (int r = 0; r < kFusedRows; ++r) {
      const vec_t<T> kv = broadcast(kmat[r * out_stride + q * in_stride]);
      for (int v = 0; v < DV; ++v) o[r][v] += kv * wv[v];
    }
  }
  for (int r = 0; r < kFusedRows; ++r)
    for (int v = 0; v < DV; ++v) store(acc[r] + k + v * L, o[r][v]);
}

// Rows [r0, r0 + kFusedRows) (those past row_end: padding) against the C columns from j0: their K block and
// K times W added into their sums in scratch (rows from row_begin, `stride` values each: the row-sum vector,
// then per-lane sums of each feature up to kFusedLaneMaxFeatures features, else dw sums; kb: room for the
// K block).
template <typename T>
BMT_FAST_INLINE void fused_block(const T* xc, const T* xt, const T* w, const T* norms, int64_t d, int64_t dw,
                                 T neg_inv_h, int64_t row_begin, int64_t row_end, int64_t r0, int64_t j0, T* scratch,
                                 int64_t stride, T* kb, T* colacc = nullptr, int64_t col_base = 0) {
  constexpr int L = kLanes<T>, C = kFusedVectors * L;
  const T* xr[kFusedRows];
  T nr[kFusedRows];
  T* rs[kFusedRows];
  T* acc[kFusedRows];
  for (int r = 0; r < kFusedRows; ++r) {
    const bool real = r0 + r < row_end;
    xr[r] = xc + (real ? r0 + r : row_begin) * d;
    nr[r] = real ? norms[r0 + r] : std::numeric_limits<T>::infinity();
    T* row = scratch + (r0 - row_begin + r) * stride;
    rs[r] = row;
    acc[r] = row + L;
  }
  const int64_t block = j0 / kFusedPack * kFusedPack;
  const T* xt_block = xt + block * d + (j0 - block);
  vec_t<T> s[kFusedRows][kFusedVectors];
  fused_dots<T>(xr, xt_block, d, s);
  fused_kernel_entries<T>(s, nr, norms + j0, neg_inv_h, r0 - j0, rs);
  if (d <= kFusedLaneMaxFeatures) {  // W packed as xt: each row's sum vector of feature k += its K vector times W's
    const T* w_block = w + block * d + (j0 - block);
    for (int64_t k = 0; k < d; ++k) {
      vec_t<T> wv[kFusedVectors];
      for (int v = 0; v < kFusedVectors; ++v) wv[v] = load(w_block + k * kFusedPack + v * L);
      for (int r = 0; r < kFusedRows; ++r) {
        vec_t<T> t = load(acc[r] + k * L);
        for (int v = 0; v < kFusedVectors; ++v) t += s[r][v] * wv[v];
        store(acc[r] + k * L, t);
      }
    }
    if (colacc) {  // the symmetric form's column side: the columns' sums += K^T W of these rows
      T* cb = colacc + (block - col_base) * (d + 1) + (j0 - block);  // (colacc's blocks from column col_base)
      const T* wr = w + r0 / kFusedPack * kFusedPack * d + r0 % kFusedPack;  // W of row r0 + r, feature k: wr[k 64 + r]
      for (int64_t k = 0; k < d; ++k) {
        vec_t<T> wk[kFusedRows];
        for (int r = 0; r < kFusedRows; ++r) wk[r] = broadcast(wr[k * kFusedPack + r]);
        for (int v = 0; v < kFusedVectors; ++v) {
          vec_t<T> t = load(cb + k * kFusedPack + v * L);
          for (int r = 0; r < kFusedRows; ++r) t += s[r][v] * wk[r];
          store(cb + k * kFusedPack + v * L, t);
        }
      }
      for (int v = 0; v < kFusedVectors; ++v) {
        vec_t<T> t = load(cb + d * kFusedPack + v * L);
        for (int r = 0; r < kFusedRows; ++r) t += s[r][v];
        store(cb + d * kFusedPack + v * L, t);
      }
    }
  } else {
    for (int r = 0; r < kFusedRows; ++r)
      for (int v = 0; v < kFusedVectors; ++v) store(kb + r * C + v * L, s[r][v]);
    const T* wj = w + j0 * dw;
    int64_t k = 0;
    for (; k + 4 * L <= dw; k += 4 * L) fused_add_kw<4, T>(kb, C, 1, C, wj, dw, k, acc);
    for (; k < dw; k += L) fused_add_kw<1, T>(kb, C, 1, C, wj, dw, k, acc);
  }
}

// The centre (kernels.h: fused_step_shift): row 0 plus the mean of the differences from it, summed in double.
template <typename T>
BMT_FAST_INLINE void fused_step_shift_impl(const T* x, int64_t n, int64_t d, double* sums, T* shift) {
  fill(sums, d, 0.0);
  for (int64_t i = 1; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) sums[k] += static_cast<double>(x[i * d + k] - x[k]);
  for (int64_t k = 0; k < d; ++k) shift[k] = x[k] + static_cast<T>(sums[k] / static_cast<double>(n));
}

// The operands of blocks [block_begin, block_end) of kFusedPack rows (kernels.h: fused_step_pack).
template <typename T>
BMT_FAST_INLINE void fused_step_pack_impl(const T* x, const T* score, int64_t n, int64_t d, const T* shift, T a,
                                          int64_t block_begin, int64_t block_end, T* xc, T* norms, T* xt, T* w) {
  const bool lanes = d <= kFusedLaneMaxFeatures;
  const int64_t dw = round_up(d, kFusedWidth);
  for (int64_t b = block_begin; b < block_end; ++b) {
    T* xt_block = xt + b * d * kFusedPack;
    T* w_block = score ? w + b * d * kFusedPack : nullptr;
    for (int64_t c = 0; c < kFusedPack; ++c) {
      const int64_t i = b * kFusedPack + c;
      if (i >= n) {  // padding: columns that give K = 0 and add nothing
        if (!score) {
          norms[i] = std::numeric_limits<T>::infinity();
          for (int64_t k = 0; k < d; ++k) xt_block[k * kFusedPack + c] = T(0);
        } else if (lanes) {
          for (int64_t k = 0; k < d; ++k) w_block[k * kFusedPack + c] = T(0);
        } else {
          fill(w + i * dw, dw, T(0));
        }
        continue;
      }
      if (!score) {
        T norm = 0;
        for (int64_t k = 0; k < d; ++k) {
          const T v = x[i * d + k] - shift[k];
          xc[i * d + k] = v;
          norm += v * v;
          xt_block[k * kFusedPack + c] = v;
        }
        norms[i] = norm;
        continue;
      }
      for (int64_t k = 0; k < d; ++k) {
        const T wv = score[i * d + k] - a * xc[i * d + k];
        if (lanes) w_block[k * kFusedPack + c] = wv;
        else w[i * dw + k] = wv;
      }
      if (!lanes) fill(w + i * dw + d, dw - d, T(0));
    }
  }
}

// The rows r0.. (kFusedRows of them; those from row_end on read row_begin's values) of xc, for fused_dots.
template <typename T>
BMT_FAST_INLINE void fused_row_pointers(const T* xc, int64_t d, int64_t r0, int64_t row_begin, int64_t row_end,
                                        const T* (&rows)[kFusedRows]) {
  for (int r = 0; r < kFusedRows; ++r) rows[r] = xc + (r0 + r < row_end ? r0 + r : row_begin) * d;
}

// out[(i - row_begin) ld + (j - col_begin)] = xc_i . xc_j for rows [row_begin, row_end) and columns [col_begin,
// col_begin + cols) (col_begin a multiple of kFusedPack), by fused_dots: the same value for a pair as the fused
// window pass computes (kernels.h: fused_dot_rows).
template <typename T>
BMT_FAST_INLINE void fused_dot_rows_impl(const T* xc, const T* xt, int64_t d, int64_t row_begin, int64_t row_end,
                                         int64_t col_begin, int64_t cols, T* out, int64_t ld) {
  constexpr int L = kLanes<T>, C = kFusedVectors * L;
  alignas(64) T block_out[kFusedRows][C];
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kFusedRows) {
    const T* rows[kFusedRows];
    fused_row_pointers(xc, d, r0, row_begin, row_end, rows);
    for (int64_t j0 = col_begin; j0 < col_begin + cols; j0 += C) {
      const int64_t block = j0 / kFusedPack * kFusedPack;
      vec_t<T> s[kFusedRows][kFusedVectors];
      fused_dots<T>(rows, xt + block * d + (j0 - block), d, s);
      for (int r = 0; r < kFusedRows; ++r)
        for (int v = 0; v < kFusedVectors; ++v) store(block_out[r] + v * L, s[r][v]);
      const int64_t width = min64(C, col_begin + cols - j0);
      for (int r = 0; r < kFusedRows && r0 + r < row_end; ++r)
        std::memcpy(out + (r0 + r - row_begin) * ld + (j0 - col_begin), block_out[r],
                    static_cast<size_t>(width) * sizeof(T));
    }
  }
}

// The median's window pass without tiles (kernels.h: fused_window_rows): for rows [row_begin, row_end) and
// the columns j > i of [col_begin, col_end) below n, the squared distances as window_collect computes them
// from fused_dots' dot products; those below lo counted into *below, those in [lo, hi] written to out.
// Returns how many it wrote.
template <typename T>
BMT_FAST_INLINE int64_t fused_window_rows_impl(const T* xc, const T* xt, const T* norms, int64_t n, int64_t d, T lo,
                                               T hi, int64_t row_begin, int64_t row_end, int64_t col_begin,
                                               int64_t col_end, int64_t* below, T* out) {
  constexpr int L = kLanes<T>, C = kFusedVectors * L;
  using Mask = decltype(vec_t<T>{} < vec_t<T>{});
  using Lane = typename std::remove_reference<decltype(Mask{}[0])>::type;
  const vec_t<T> lo_v = broadcast(lo), hi_v = broadcast(hi);
  const int64_t last = min64(col_end, round_up(n, kFusedPack));
  Mask lane_index;  // 0, 1, ..., L - 1
  for (int q = 0; q < L; ++q) lane_index[q] = static_cast<Lane>(q);
  int64_t written = 0;
  Mask under_v{};
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kFusedRows) {
    const T* rows[kFusedRows];
    fused_row_pointers(xc, d, r0, row_begin, row_end, rows);
    // from the block holding column r0 + 1 or before (col_begin is a multiple of C: kFusedPack is)
    for (int64_t j0 = std::max(col_begin, r0 / C * C); j0 < last; j0 += C) {
      const int64_t block = j0 / kFusedPack * kFusedPack;
      vec_t<T> s[kFusedRows][kFusedVectors];
      fused_dots<T>(rows, xt + block * d + (j0 - block), d, s);
      // Columns j with i < j < n count: all of the block's but near the diagonal and past n.
      const bool edge = j0 <= r0 + kFusedRows - 1 || j0 + C > n;
      for (int r = 0; r < kFusedRows; ++r) {
        const int64_t i = r0 + r;
        if (i >= row_end) break;
        const vec_t<T> na = broadcast(norms[i]);
        for (int v = 0; v < kFusedVectors; ++v) {
          const vec_t<T> dist = clamp_nonnegative<T>(na + load(norms + j0 + v * L) - T(2) * s[r][v]);
          Mask valid = ~Mask{};
          if (edge) {  // lane q is column j0 + v L + q
            const int64_t first = j0 + v * L;
            valid = (lane_index > static_cast<Lane>(i - first)) & (lane_index < static_cast<Lane>(n - first));
          }
          window_vector<T>(dist, lo_v, hi_v, valid, under_v, out, written);
        }
      }
    }
  }
  int64_t under = 0;
  for (int q = 0; q < L; ++q) under += under_v[q];
  *below += under;
  return written;
}

// phi_i = (sum_j k_ij W_j + a rowsum_i xc_i + score_i) / n for rows [row_begin, row_end) (the own term k_ii = 1 as
// score_i = W_i + a xc_i) from `parts` sets of sums: part p's row i at rowacc + p part_elems + (i - row_base)
// stride (as fused_block keeps them) and, where colacc is not null (the symmetric form's per-lane sums), its
// column side at colacc + p n_pad (d + 1) (as fused_block adds it). Returns whether phi is all finite.
template <typename T>
BMT_FAST_INLINE bool fused_finish_rows(const T* rowacc, int64_t part_elems, int64_t row_base, const T* colacc,
                                       int64_t parts, const T* xc, const T* score, int64_t n, int64_t d, T a,
                                       int64_t row_begin, int64_t row_end, T* phi) {
  constexpr int L = kLanes<T>;
  const bool lanes = d <= kFusedLaneMaxFeatures;
  const int64_t stride = L + (lanes ? d * L : round_up(d, kFusedWidth));
  const int64_t n_pad = round_up(n, kFusedPack);
  T bad = 0;
  for (int64_t i = row_begin; i < row_end; ++i) {
    const T* col = colacc ? colacc + i / kFusedPack * (d + 1) * kFusedPack + i % kFusedPack : nullptr;
    T rowsum = 0;
    for (int64_t p = 0; p < parts; ++p) {
      rowsum += horizontal_sum<T>(load(rowacc + p * part_elems + (i - row_base) * stride));
      if (col) rowsum += col[p * n_pad * (d + 1) + d * kFusedPack];
    }
    const T ar = a * rowsum;
    const T* xi = xc + i * d;
    const T* si = score + i * d;
    T* out = phi + i * d;
    for (int64_t k = 0; k < d; ++k) {
      T kw = 0;
      for (int64_t p = 0; p < parts; ++p) {
        const T* row = rowacc + p * part_elems + (i - row_base) * stride;
        kw += lanes ? horizontal_sum<T>(load(row + L + k * L)) : row[L + k];
        if (col) kw += col[p * n_pad * (d + 1) + k * kFusedPack];
      }
      const T v = (kw + ar * xi[k] + si[k]) / static_cast<T>(n);
      out[k] = v;
      bad += v - v;  // NaN for a NaN or an infinity
    }
  }
  return bad == T(0);
}

// The symmetric form (kernels.h: fused_step_pair): rows [i_begin, i_end) against columns [j_begin, j_end), K
// once per pair and both sides added into this thread's sums.
template <typename T>
BMT_FAST_INLINE void fused_step_pair_impl(const T* xc, const T* xt, const T* w, const T* norms, int64_t n, int64_t d,
                                          T inv_h, int64_t i_begin, int64_t i_end, int64_t j_begin, int64_t j_end,
                                          T* rowacc, T* colacc, T* scratch) {
  constexpr int L = kLanes<T>, C = kFusedVectors * L;
  const bool lanes = d <= kFusedLaneMaxFeatures, diagonal = i_begin == j_begin;
  const int64_t dw = round_up(d, kFusedWidth), stride = L + (lanes ? d * L : dw);
  const int64_t row_end = min64(i_end, n);
  // The pair's sums first in scratch (its rows', then its columns'), added into the thread's once at the end:
  // each of those then takes one addition per block pair instead of one per row block of 4 (fp32: the
  // symmetric form's error at 4096 x 3 was 6x the GEMM tiles').
  T* rows_sums = scratch;
  T* cols_sums = scratch + (i_end - i_begin) * stride;
  const int64_t cols_size = lanes ? (j_end - j_begin) * (d + 1) : (j_end - j_begin) * stride;
  std::memset(rows_sums, 0, static_cast<size_t>((i_end - i_begin) * stride) * sizeof(T));
  if (!diagonal) std::memset(cols_sums, 0, static_cast<size_t>(cols_size) * sizeof(T));
  alignas(64) T kb[kFusedGroupRows * C];
  for (int64_t g0 = i_begin; g0 < row_end; g0 += kFusedGroupRows) {
    const int64_t g1 = min64(row_end, g0 + kFusedGroupRows), rows = round_up(g1 - g0, kFusedRows);
    for (int64_t j0 = j_begin; j0 < j_end; j0 += C) {
      for (int64_t r0 = g0; r0 < g1; r0 += kFusedRows)
        fused_block<T>(xc, xt, w, norms, d, dw, -inv_h, i_begin, row_end, r0, j0, rows_sums, stride,
                       kb + (r0 - g0) * C, !diagonal && lanes ? cols_sums : nullptr, j_begin);
      if (diagonal || lanes) continue;
      // The columns' sums += K^T W of the group's rows (kb: their K rows), kFusedRows columns at a time.
      const T* wg = w + g0 * dw;
      for (int c0 = 0; c0 < C; c0 += kFusedRows) {
        T* acc[kFusedRows];
        for (int c = 0; c < kFusedRows; ++c) {
          T* row = cols_sums + (j0 - j_begin + c0 + c) * stride;
          T sum = 0;
          for (int64_t r = 0; r < rows; ++r) sum += kb[r * C + c0 + c];
          row[0] += sum;
          acc[c] = row + L;
        }
        int64_t k = 0;
        for (; k + 4 * L <= dw; k += 4 * L) fused_add_kw<4, T>(kb + c0, 1, C, rows, wg, dw, k, acc);
        for (; k < dw; k += L) fused_add_kw<1, T>(kb + c0, 1, C, rows, wg, dw, k, acc);
      }
    }
  }
  auto add = [](T* to, const T* from, int64_t count) BMT_FAST_INLINE_LAMBDA {  // (count: whole vectors)
    for (int64_t e = 0; e < count; e += L) store(to + e, load(to + e) + load(from + e));
  };
  add(rowacc + i_begin * stride, rows_sums, (i_end - i_begin) * stride);
  if (!diagonal) add(lanes ? colacc + j_begin * (d + 1) : rowacc + j_begin * stride, cols_sums, cols_size);
}

template <typename T>
BMT_FAST_INLINE bool fused_step_rows_impl(const T* xc, const T* xt, const T* w, const T* norms, const T* score,
                                          int64_t n, int64_t d, T inv_h, T a, int64_t row_begin, int64_t row_end,
                                          T* scratch, T* phi) {
  constexpr int L = kLanes<T>, C = kFusedVectors * L;
  static_assert(kFusedPack % C == 0, "a packed block holds whole column blocks");
  const bool lanes = d <= kFusedLaneMaxFeatures;
  const int64_t n_pad = round_up(n, kFusedPack), dw = round_up(d, kFusedWidth);
  // Per row: its row-sum vector, then its sums (lanes: one vector per feature; else dw values).
  const int64_t stride = L + (lanes ? d * L : dw);
  const int64_t rows = round_up(row_end - row_begin, kFusedRows);
  fill(scratch, rows * stride, T(0));
  alignas(64) T kb[kFusedRows * C];
  const T neg_inv_h = -inv_h;
  // Column chunks whose packed xc and W (2 d values per column) take about kFusedChunkBytes, from L2 for
  // every group of kFusedGroupRows rows, and each block of C columns from L1 for the group's rows.
  const int64_t chunk =
      round_up(kFusedChunkBytes / static_cast<int64_t>(2 * sizeof(T)) / (d > 0 ? d : 1), kFusedPack);
  for (int64_t c0 = 0; c0 < n_pad; c0 += chunk) {
    const int64_t c1 = min64(n_pad, c0 + chunk);
    for (int64_t g0 = row_begin; g0 < row_end; g0 += kFusedGroupRows) {
      const int64_t g1 = min64(row_end, g0 + kFusedGroupRows);
      for (int64_t j0 = c0; j0 < c1; j0 += C)
        for (int64_t r0 = g0; r0 < g1; r0 += kFusedRows)
          fused_block<T>(xc, xt, w, norms, d, dw, neg_inv_h, row_begin, row_end, r0, j0, scratch, stride, kb);
    }
  }
  return fused_finish_rows<T>(scratch, 0, row_begin, nullptr, 1, xc, score, n, d, a, row_begin, row_end, phi);
}

}  // namespace

// ---- entry points of this ISA build (declared in kernels.h through BMT_FAST_ISA_KERNELS) ------------

// ---- rbf_kernel of two sets with few pairs, forward and backward: direct differences ----------------

// Rows of the output per register block of rbf_grad_rows: R rows of `a` and R accumulators stay in
// registers while the rows of `b` stream past (one load of b_q feeds R differences).
#ifdef BMT_FAST_32_VECTOR_REGISTERS
constexpr int kRbfGradRows = 8;
#else
constexpr int kRbfGradRows = 4;
#endif

// f(R, p) over rows [0, n) in blocks of R = kRbfGradRows, then at most one block each of R / 2, R / 4, ..., 1:
// with fewer rows than a block (one prompt, or 4 rows against 1024) each load of the other set still feeds
// as many rows as there are, where single rows read the other set once a row. 2-core AMD EPYC (Zen 5), fp32,
// x's gradient, median, 2 rounds, single rows -> these blocks (us): 4 x 1024 d = 4096 1786-2021 -> 654-1095,
// d = 2 35 -> 16; 2 x 2048 d = 512 319-324 -> 149-164; 6 x 600 d = 700 189-192 -> 84-95 (its distances
// 201-202 -> 132-133); 7 x 500 d = 64 21-22 -> 14.
template <int R = kRbfGradRows, typename F>
BMT_FAST_INLINE void for_row_blocks(int64_t p, int64_t n, F&& f) {
  for (; p + R <= n; p += R) f(std::integral_constant<int, R>{}, p);
  if constexpr (R > 1) for_row_blocks<R / 2>(p, n, f);
}

// dist[i * m + j] += sum over columns [col_begin, col_end) of (x_i - y_j)^2, the differences taken
// directly (no Gram, no centring: exact zeros for equal rows, no cancellation). Blocks of R rows of x
// and a chunk of 2 KiB per row stay in L1 while each y_j streams past; each lane sums a chunk in T, the
// chunk's total is added in double.
template <int R, typename In, typename T>
BMT_FAST_INLINE void cross_sq_dists_block(const In* x, const In* y, int64_t m, int64_t d, int64_t p0, int64_t k0,
                                          int64_t len, double* dist) {
  constexpr int L = kLanes<T>;
  for (int64_t j = 0; j < m; ++j) {
    const In* yj = y + j * d + k0;
    vec_t<T> acc[R];
    for (int r = 0; r < R; ++r) acc[r] = vec_t<T>{};
    int64_t k = 0;
    for (; k + L <= len; k += L) {
      const vec_t<T> yv = load_as<T>(yj + k);
      for (int r = 0; r < R; ++r) {
        const vec_t<T> diff = load_as<T>(x + (p0 + r) * d + k0 + k) - yv;
        acc[r] += diff * diff;
      }
    }
    if (k < len) {  // the ragged last vector: zeros past it on both sides
      const vec_t<T> yv = load_part_as<T>(yj + k, len - k);
      for (int r = 0; r < R; ++r) {
        const vec_t<T> diff = load_part_as<T>(x + (p0 + r) * d + k0 + k, len - k) - yv;
        acc[r] += diff * diff;
      }
    }
    for (int r = 0; r < R; ++r) dist[(p0 + r) * m + j] += static_cast<double>(horizontal_sum<T>(acc[r]));
  }
}

template <typename In, typename T>
BMT_FAST_INLINE void cross_sq_dists_impl(const In* x, const In* y, int64_t n, int64_t m, int64_t d,
                                         int64_t col_begin, int64_t col_end, double* dist) {
  constexpr int64_t kChunk = 2048 / sizeof(T);
  for (int64_t k0 = col_begin; k0 < col_end; k0 += kChunk) {
    const int64_t len = min64(kChunk, col_end - k0);
    for_row_blocks(0, n, [&](auto rows, int64_t p) BMT_FAST_INLINE_LAMBDA {
      cross_sq_dists_block<decltype(rows)::value, In, T>(x, y, m, d, p, k0, len, dist);
    });
  }
}

// One vector of columns k (count of them; all lanes when Full) of R output rows p0..p0+R-1:
//   out_p = sum_q c(p, q) (a_p - b_q),   c(p, q) = s[p * ps + q * qs],
// each difference formed in a register from the inputs as they are: no centred copies, and no
// cancellation between a coefficient sum times a_p and a product with b.
template <int R, bool Full, typename In, typename T>
BMT_FAST_INLINE void rbf_grad_block(const In* a, const In* b, int64_t nb, int64_t d, int64_t p0, int64_t k,
                                    int64_t count, const T* s, int64_t ps, int64_t qs, In* out) {
  auto load_in = [&](const In* ptr) { return Full ? load_as<T>(ptr) : load_part_as<T>(ptr, count); };
  vec_t<T> ap[R], acc[R];
  for (int r = 0; r < R; ++r) {
    ap[r] = load_in(a + (p0 + r) * d + k);
    acc[r] = vec_t<T>{};
  }
  for (int64_t q = 0; q < nb; ++q) {
    const vec_t<T> bq = load_in(b + q * d + k);
    const T* cq = s + p0 * ps + q * qs;
    for (int r = 0; r < R; ++r) acc[r] += broadcast(T(cq[r * ps])) * (ap[r] - bq);
  }
  for (int r = 0; r < R; ++r) store_as<In, T>(out + (p0 + r) * d + k, acc[r], Full ? kLanes<T> : count);
}

// rbf_grad_block over all na output rows, for one vector of columns.
template <bool Full, typename In, typename T>
BMT_FAST_INLINE void rbf_grad_rows(const In* a, int64_t na, const In* b, int64_t nb, int64_t d, int64_t k,
                                   int64_t count, const T* s, int64_t ps, int64_t qs, In* out) {
  for_row_blocks(0, na, [&](auto rows, int64_t p) BMT_FAST_INLINE_LAMBDA {
    rbf_grad_block<decltype(rows)::value, Full>(a, b, nb, d, p, k, count, s, ps, qs, out);
  });
}

// gx_i = sum_j s_ij (x_i - y_j) and gy_j = sum_i s_ij (y_j - x_i) (s: n x m, row-major) over columns
// [col_begin, col_end), each unless its output is null. Both read the same lines of x and y per vector
// of columns, the second time from L1.
template <typename In, typename T>
BMT_FAST_INLINE void rbf_grad_columns_impl(const In* x, const In* y, int64_t n, int64_t m, int64_t d,
                                           int64_t col_begin, int64_t col_end, const T* s, In* gx, In* gy) {
  constexpr int L = kLanes<T>;
  auto both = [&](auto full, int64_t k, int64_t count) BMT_FAST_INLINE_LAMBDA {
    constexpr bool Full = decltype(full)::value;
    if (gx) rbf_grad_rows<Full>(x, n, y, m, d, k, count, s, m, 1, gx);
    if (gy) rbf_grad_rows<Full>(y, m, x, n, d, k, count, s, 1, m, gy);
  };
  int64_t k = col_begin;
  for (; k + L <= col_end; k += L) {
    const int64_t ahead = k + kApplyPrefetchVectors * L;  // n + m row streams: too many for the prefetcher
    if (ahead < col_end) {
      for (int64_t i = 0; i < n; ++i) __builtin_prefetch(x + i * d + ahead, 0, 1);
      for (int64_t j = 0; j < m; ++j) __builtin_prefetch(y + j * d + ahead, 0, 1);
    }
    both(std::true_type{}, k, L);
  }
  if (k < col_end) both(std::false_type{}, k, col_end - k);
}

#define BMT_FAST_DEFINE_TILE_KERNELS(T)                                                                   \
  void rbf_from_dots(T* tile, int64_t ld, int64_t row_begin, int64_t row_end, int64_t cols, const T* nr,  \
                     const T* nc, T inv_h) {                                                              \
    rbf_from_dots_impl<T>(tile, ld, row_begin, row_end, cols, nr, nc, inv_h);                             \
  }                                                                                                       \
  void radix_histogram(const T* tile, int64_t ld, int64_t row_begin, int64_t row_end, int64_t cols,       \
                       const T* nr, const T* nc, bool upper_only, int64_t weight, const RadixPass& pass,  \
                       int64_t* hist) {                                                                   \
    radix_histogram_impl<T>(tile, ld, row_begin, row_end, cols, nr, nc, upper_only, weight, pass, hist);  \
  }                                                                                                       \
  int64_t window_collect(const T* tile, int64_t ld, int64_t row_begin, int64_t row_end, int64_t cols,     \
                         const T* nr, const T* nc, bool upper_only, T lo, T hi, int64_t* below, T* out) { \
    return window_collect_impl<T>(tile, ld, row_begin, row_end, cols, nr, nc, upper_only, lo, hi, below,  \
                                  out);                                                                   \
  }                                                                                                       \
  void pair_sq_dists(const T* xc, int64_t d, const T* norms, const int64_t* first, const int64_t* second, \
                     int64_t count, T* out) {                                                             \
    pair_sq_dists_impl<T>(xc, d, norms, first, second, count, out);                                       \
  }
BMT_FAST_DEFINE_TILE_KERNELS(float)
BMT_FAST_DEFINE_TILE_KERNELS(double)

#define BMT_FAST_DEFINE_FUSED_KERNELS(T)                                                                          \
  void fused_step_shift(const T* x, int64_t n, int64_t d, double* sums, T* shift) {                               \
    fused_step_shift_impl<T>(x, n, d, sums, shift);                                                               \
  }                                                                                                               \
  void fused_step_pack(const T* x, const T* score, int64_t n, int64_t d, const T* shift, T a, int64_t block_begin, \
                       int64_t block_end, T* xc, T* norms, T* xt, T* w) {                                         \
    fused_step_pack_impl<T>(x, score, n, d, shift, a, block_begin, block_end, xc, norms, xt, w);                  \
  }                                                                                                               \
  void fused_dot_rows(const T* xc, const T* xt, int64_t d, int64_t row_begin, int64_t row_end, int64_t col_begin,  \
                      int64_t cols, T* out, int64_t ld) {                                                         \
    fused_dot_rows_impl<T>(xc, xt, d, row_begin, row_end, col_begin, cols, out, ld);                              \
  }                                                                                                               \
  int64_t fused_window_rows(const T* xc, const T* xt, const T* norms, int64_t n, int64_t d, T lo, T hi,           \
                            int64_t row_begin, int64_t row_end, int64_t col_begin, int64_t col_end, int64_t* below,\
                            T* out) {                                                                             \
    return fused_window_rows_impl<T>(xc, xt, norms, n, d, lo, hi, row_begin, row_end, col_begin, col_end, below,  \
                                     out);                                                                        \
  }                                                                                                               \
  void fused_step_pair(const T* xc, const T* xt, const T* w, const T* norms, int64_t n, int64_t d, T inv_h,       \
                       int64_t i_begin, int64_t i_end, int64_t j_begin, int64_t j_end, T* rowacc, T* colacc,      \
                       T* scratch) {                                                                              \
    fused_step_pair_impl<T>(xc, xt, w, norms, n, d, inv_h, i_begin, i_end, j_begin, j_end, rowacc, colacc,        \
                            scratch);                                                                             \
  }                                                                                                               \
  bool fused_step_finish(const T* rowacc, int64_t part_elems, const T* colacc, int64_t parts, const T* xc,       \
                         const T* score, int64_t n, int64_t d, T a, int64_t row_begin, int64_t row_end, T* phi) { \
    return fused_finish_rows<T>(rowacc, part_elems, 0, colacc, parts, xc, score, n, d, a, row_begin, row_end,     \
                                phi);                                                                             \
  }                                                                                                               \
  bool fused_step_rows(const T* xc, const T* xt, const T* w, const T* norms, const T* score, int64_t n, int64_t d, \
                       T inv_h, T a, int64_t row_begin, int64_t row_end, T* scratch, T* phi) {                    \
    return fused_step_rows_impl<T>(xc, xt, w, norms, score, n, d, inv_h, a, row_begin, row_end, scratch, phi);    \
  }
BMT_FAST_DEFINE_FUSED_KERNELS(float)
BMT_FAST_DEFINE_FUSED_KERNELS(double)
void pair_sq_dists(const c10::BFloat16* xc, int64_t d, const float* norms, const int64_t* first, const int64_t* second,
                   int64_t count, float* out) {
  pair_sq_dists_impl(xc, d, norms, first, second, count, out);
}

// The AMX path's kernels for bf16 particles and for fp32 ones (where torch's fp32 matmul precision is bf16).
// (vcvtneps2bf16 is an AVX-512 instruction: the other builds round portably.)
#ifdef BMT_FAST_32_VECTOR_REGISTERS
#define BMT_FAST_NATIVE_BF16_ROUNDING(native) native
#else
#define BMT_FAST_NATIVE_BF16_ROUNDING(native) ((void)(native), false)
#endif
#define BMT_FAST_DEFINE_AMX_KERNELS(In)                                                                              \
  void amx_rbf_from_dots(float* tile, int64_t ld, int64_t rows, int64_t cols, int64_t cols_padded, const float* nr,   \
                         const float* nc, float inv_h, int64_t diag, bool own_one, In* k_out, int64_t ld_out,         \
                         float* rowsum, bool native_rounding) {                                                       \
    if (BMT_FAST_NATIVE_BF16_ROUNDING(native_rounding))                                                               \
      amx_rbf_from_dots_impl<true>(tile, ld, rows, cols, cols_padded, nr, nc, inv_h, diag, own_one, k_out, ld_out,    \
                                   rowsum);                                                                           \
    else                                                                                                              \
      amx_rbf_from_dots_impl<false>(tile, ld, rows, cols, cols_padded, nr, nc, inv_h, diag, own_one, k_out, ld_out,   \
                                    rowsum);                                                                          \
  }                                                                                                                   \
  void amx_column_sums(const In* x, int64_t d, int64_t rows, int64_t col_begin, int64_t col_end, double* sums) {      \
    amx_column_sums_impl(x, d, rows, col_begin, col_end, sums);                                                       \
  }                                                                                                                   \
  void amx_centre_rows(const In* x, int64_t ld, int64_t cols, const float* shift, int64_t row_begin,                  \
                       int64_t row_end, c10::BFloat16* xb, int64_t ld_xb, double* sq_sums, int64_t ahead) {           \
    amx_centre_rows_impl(x, ld, cols, shift, row_begin, row_end, xb, ld_xb, sq_sums, ahead);                          \
  }                                                                                                                   \
  void amx_w_pairs(const In* score, const In* x, int64_t ld, int64_t cols, const float* shift, float a, int64_t n,    \
                   int64_t pair_begin, int64_t pair_end, uint32_t* bw, int64_t ld_bw, int64_t ahead) {                \
    amx_w_pairs_impl(score, x, ld, cols, shift, a, n, pair_begin, pair_end, bw, ld_bw, ahead);                        \
  }                                                                                                                   \
  bool amx_finish_rows(const float* acc, int64_t ld_acc, const float* rowsum, const In* x, const In* score,           \
                       const float* shift, float a, float n, int64_t d, int64_t row_begin, int64_t row_end,           \
                       int64_t col_begin, int64_t col_end, In* phi) {                                                 \
    return amx_finish_rows_impl(acc, ld_acc, rowsum, x, score, shift, a, n, d, row_begin, row_end, col_begin,         \
                                col_end, phi);                                                                        \
  }                                                                                                                   \
  void amx_p_rows(const In* g, const In* k, int64_t ld, int64_t rows, int64_t cols, int64_t cols_padded,              \
                  int64_t diag, c10::BFloat16* p16, int64_t ld16, float* rowsum, double* p_log_k) {                   \
    amx_p_rows_impl(g, k, ld, rows, cols, cols_padded, diag, p16, ld16, rowsum, p_log_k);                             \
  }                                                                                                                   \
  void amx_p_pairs(const In* g, const In* k, int64_t ld, int64_t rows, int64_t rows_padded, int64_t cols,             \
                   int64_t diag, uint32_t* pw, int64_t ldw, float* colsum, double* p_log_k) {                         \
    amx_p_pairs_impl(g, k, ld, rows, rows_padded, cols, diag, pw, ldw, colsum, p_log_k);                              \
  }                                                                                                                   \
  void amx_grad_rows(const float* acc, int64_t ld_acc, const float* sums, const c10::BFloat16* xc, int64_t ld,       \
                     float scale, int64_t d, int64_t row_begin, int64_t row_end, int64_t col_begin, int64_t col_end,  \
                     In* out) {                                                                                       \
    amx_grad_rows_impl(acc, ld_acc, sums, xc, ld, scale, d, row_begin, row_end, col_begin, col_end, out);             \
  }
BMT_FAST_DEFINE_AMX_KERNELS(c10::BFloat16)
BMT_FAST_DEFINE_AMX_KERNELS(float)

void transpose_words(const uint32_t* src, int64_t ld_src, int64_t rows, int64_t k_begin, int64_t k_end, uint32_t* dst,
                     int64_t ld_dst) {
  transpose_words_impl(src, ld_src, rows, k_begin, k_end, dst, ld_dst);
}
void transpose_words(const uint64_t* src, int64_t ld_src, int64_t rows, int64_t k_begin, int64_t k_end, uint64_t* dst,
                     int64_t ld_dst) {
  transpose_words_impl(src, ld_src, rows, k_begin, k_end, dst, ld_dst);
}

void exp_scaled(double* values, int64_t count, double scale) {
  constexpr int L = kLanes<double>;
  const vec_t<double> s = broadcast(scale);
  int64_t i = 0;
  for (; i + L <= count; i += L) store(values + i, exp_nonpositive<double>(load(values + i) * s));
  if (i < count) {  // ragged tail through a zero-padded vector
    double tail[L] = {};
    std::memcpy(tail, values + i, static_cast<size_t>(count - i) * sizeof(double));
    store(tail, exp_nonpositive<double>(load(tail) * s));
    std::memcpy(values + i, tail, static_cast<size_t>(count - i) * sizeof(double));
  }
}

void stream_rows(const void* src, int64_t ld_src, int64_t rows, int64_t bytes, void* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const char* from = static_cast<const char*>(src) + r * ld_src;
    char* to = static_cast<char*>(dst) + r * ld_dst;
    int64_t done = 0;
#ifdef BMT_FAST_32_VECTOR_REGISTERS
    done = min64(bytes, static_cast<int64_t>((64 - (reinterpret_cast<uintptr_t>(to) & 63)) & 63));
    std::memcpy(to, from, static_cast<size_t>(done));  // (up to the first whole line)
    for (; done + 64 <= bytes; done += 64)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(to + done), _mm512_loadu_si512(from + done));
#endif
    std::memcpy(to + done, from + done, static_cast<size_t>(bytes - done));
  }
  stream_fence();
}

#define BMT_FAST_DEFINE_STREAM_ROWS_AS(Out)                                                                  \
  void stream_rows_as(const float* src, int64_t ld_src, int64_t rows, int64_t cols, Out* dst, int64_t ld_dst) { \
    for (int64_t r = 0; r < rows; ++r) {                                                                      \
      const float* row = src + r * ld_src;                                                                    \
      write_row_streamed(                                                                                     \
          dst + r * ld_dst, cols,                                                                             \
          [&](int64_t k, auto count) BMT_FAST_INLINE_LAMBDA { return load_part_as<float>(row + k, count); },  \
          [](vec_t<float>, auto) BMT_FAST_INLINE_LAMBDA {});                                                  \
    }                                                                                                         \
    stream_fence();                                                                                           \
  }
BMT_FAST_DEFINE_STREAM_ROWS_AS(c10::BFloat16)
BMT_FAST_DEFINE_STREAM_ROWS_AS(c10::Half)

void bf16_row_pairs(const c10::BFloat16* src, int64_t ld, int64_t pair_begin, int64_t pair_end, int64_t cols,
                    uint32_t* out, int64_t ld_out) {
  bf16_row_pairs_impl(src, ld, pair_begin, pair_end, cols, out, ld_out);
}

#define BMT_FAST_DEFINE_COLUMN_KERNELS(In, T)                                                         \
  void gram_columns(const In* x, const In* y, int64_t nx, int64_t n, int64_t d, int64_t col_begin,    \
                    int64_t col_end, int64_t chunk, double* gram, T* shift, T* scratch) {             \
    gram_columns_impl<In, T>(x, y, nx, n, d, col_begin, col_end, chunk, gram, shift, scratch);        \
  }                                                                                                   \
  bool apply_columns(const In* x, const In* g, In* phi, int64_t n, int64_t d, int64_t col_begin,      \
                     int64_t col_end, const T* shift, const T* kn, const T* c, T a, T* scratch) {     \
    return apply_columns_impl<In, T>(x, g, phi, n, d, col_begin, col_end, shift, kn, c, a, scratch);  \
  }                                                                                                   \
  void rbf_grad_columns(const In* x, const In* y, int64_t n, int64_t m, int64_t d, int64_t col_begin, \
                        int64_t col_end, const T* s, In* gx, In* gy) {                                \
    rbf_grad_columns_impl<In, T>(x, y, n, m, d, col_begin, col_end, s, gx, gy);                       \
  }                                                                                                   \
  void cross_sq_dists(const In* x, const In* y, int64_t n, int64_t m, int64_t d, int64_t col_begin,   \
                      int64_t col_end, double* dist) {                                                \
    cross_sq_dists_impl<In, T>(x, y, n, m, d, col_begin, col_end, dist);                              \
  }
BMT_FAST_DEFINE_COLUMN_KERNELS(float, float)
BMT_FAST_DEFINE_COLUMN_KERNELS(double, double)
BMT_FAST_DEFINE_COLUMN_KERNELS(c10::BFloat16, float)
BMT_FAST_DEFINE_COLUMN_KERNELS(c10::Half, float)

}  // namespace bmt_fast::cpu::BMT_FAST_ISA
