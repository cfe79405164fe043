// Many particles: K from tiles of dot products; the median's window and radix passes.
// One part of the CPU kernels of an ISA build: kernels_impl.h includes it (outside any namespace) after
// the parts it names before it, once per build (kernels_{base,v3,v4}.cpp); not a header of its own.

namespace bmt_fast::cpu::BMT_FAST_ISA {
namespace {

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

}  // namespace
}  // namespace bmt_fast::cpu::BMT_FAST_ISA
