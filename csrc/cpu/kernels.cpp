#include "kernels.h"

#include <algorithm>
#include <vector>

#include "simd.h"

namespace bmt_fast::cpu {
namespace {

template <typename T>
BMT_FAST_INLINE vec_t<T> clamp_nonnegative(vec_t<T> v) {
  return v > T(0) ? v : vec_t<T>{};
}

// ---- many-particle regime ----------------------------------------------------------------------

template <typename T>
BMT_FAST_INLINE void rbf_from_dots_impl(T* tile, int64_t ld, int64_t row_begin, int64_t row_end,
                                        int64_t cols, const T* nr, const T* nc, T inv_h) {
  constexpr int L = kLanes<T>;
  const vec_t<T> neg_inv_h = broadcast<T>(-inv_h);
  for (int64_t a = row_begin; a < row_end; ++a) {
    T* row = tile + a * ld;
    const vec_t<T> na = broadcast<T>(nr[a]);
    int64_t b = 0;
    for (; b + L <= cols; b += L) {
      const vec_t<T> dist = clamp_nonnegative<T>(na + load(nc + b) - T(2) * load(row + b));
      store(row + b, exp_nonpositive<T>(dist * neg_inv_h));
    }
    if (b < cols) {  // ragged tail through a zero-padded vector
      T s[L] = {}, n[L] = {};
      std::copy(row + b, row + cols, s);
      std::copy(nc + b, nc + cols, n);
      const vec_t<T> dist = clamp_nonnegative<T>(na + load(n) - T(2) * load(s));
      store(s, exp_nonpositive<T>(dist * neg_inv_h));
      std::copy(s, s + (cols - b), row + b);
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
      T dist = nr[a] + nc[b] - T(2) * row[b];
      dist = dist > T(0) ? dist : T(0);
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

// ---- few-particle, huge-d regime ---------------------------------------------------------------

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// buf (rows_padded x chunk) <- columns [k0, k0 + len) of x, each centred over the n particles.
// Rows >= n and columns >= len are zero. The shift is row 0 plus the mean of the differences, so
// identical particles give exact zeros.
template <typename In, typename T>
BMT_FAST_INLINE void load_centred(const In* x, int64_t n, int64_t d, int64_t k0, int64_t len,
                                  int64_t chunk, T* buf, T* mean) {
  const In* first = x + k0;
  std::fill(mean, mean + chunk, T(0));
  for (int64_t i = 0; i < n; ++i) {
    const In* src = x + i * d + k0;
    T* dst = buf + i * chunk;
    for (int64_t k = 0; k < len; ++k) {
      dst[k] = static_cast<T>(src[k]) - static_cast<T>(first[k]);
      mean[k] += dst[k];
    }
  }
  const T inv_n = T(1) / T(n);
  for (int64_t k = 0; k < len; ++k) mean[k] *= inv_n;
  for (int64_t i = 0; i < n; ++i) {
    T* dst = buf + i * chunk;
    for (int64_t k = 0; k < len; ++k) dst[k] -= mean[k];
  }
}

template <typename In, typename T>
BMT_FAST_INLINE void gram_columns_impl(const In* x, int64_t n, int64_t d, int64_t col_begin,
                                       int64_t col_end, int64_t chunk, double* gram) {
  constexpr int L = kLanes<T>;
  constexpr int B = 4;  // 4 x 4 dot products per register block: 8 loads feed 16 FMAs
  const int64_t rows = round_up(n, B);
  std::vector<T> buf(rows * chunk, T(0)), mean(chunk);
  for (int64_t k0 = col_begin; k0 < col_end; k0 += chunk) {
    const int64_t len = std::min(chunk, col_end - k0);
    const int64_t len_vec = round_up(len, L);
    if (len < chunk) std::fill(buf.begin(), buf.end(), T(0));
    load_centred(x, n, d, k0, len, chunk, buf.data(), mean.data());
    for (int64_t ib = 0; ib < rows; ib += B) {
      for (int64_t jb = ib; jb < rows; jb += B) {
        vec_t<T> acc[B][B] = {};
        const T* xi = buf.data() + ib * chunk;
        const T* xj = buf.data() + jb * chunk;
        for (int64_t k = 0; k < len_vec; k += L) {
          vec_t<T> vi[B], vj[B];
#pragma GCC unroll 4
          for (int r = 0; r < B; ++r) {
            vi[r] = load(xi + r * chunk + k);
            vj[r] = load(xj + r * chunk + k);
          }
#pragma GCC unroll 4
          for (int r = 0; r < B; ++r) {
#pragma GCC unroll 4
            for (int s = 0; s < B; ++s) acc[r][s] += vi[r] * vj[s];
          }
        }
        for (int r = 0; r < B; ++r) {
          for (int s = 0; s < B; ++s) {
            const int64_t i = ib + r, j = jb + s;
            if (i < n && j < n && i <= j) gram[i * n + j] += static_cast<double>(horizontal_sum<T>(acc[r][s]));
          }
        }
      }
    }
  }
}

template <typename In, typename T>
BMT_FAST_INLINE void store_row(In* dst, const T* src, int64_t count) {
  for (int64_t k = 0; k < count; ++k) dst[k] = static_cast<In>(src[k]);
}

template <typename In, typename T>
BMT_FAST_INLINE void apply_columns_impl(const In* x, const In* g, In* phi, int64_t n, int64_t d,
                                        int64_t col_begin, int64_t col_end, int64_t chunk, const T* kn,
                                        const T* c, T a) {
  constexpr int L = kLanes<T>;
  constexpr int R = kApplyRows;  // rows per register block; 2 vectors per row: 8 accumulators
  const int64_t rows = round_up(n, R);
  std::vector<T> xc(rows * chunk, T(0)), w(n * chunk, T(0)), mean(chunk);
  for (int64_t k0 = col_begin; k0 < col_end; k0 += chunk) {
    const int64_t len = std::min(chunk, col_end - k0);
    if (len < chunk) {
      std::fill(xc.begin(), xc.end(), T(0));
      std::fill(w.begin(), w.end(), T(0));
    }
    load_centred(x, n, d, k0, len, chunk, xc.data(), mean.data());
    for (int64_t j = 0; j < n; ++j) {
      const In* gj = g + j * d + k0;
      const T* xj = xc.data() + j * chunk;
      T* wj = w.data() + j * chunk;
      for (int64_t k = 0; k < len; ++k) wj[k] = static_cast<T>(gj[k]) - a * xj[k];
    }
    for (int64_t kk = 0; kk < len; kk += 2 * L) {
      for (int64_t ib = 0; ib < rows; ib += R) {
        vec_t<T> acc[R][2] = {};
        const T* krow = kn + ib * n;
        for (int64_t j = 0; j < n; ++j) {
          const vec_t<T> w0 = load(w.data() + j * chunk + kk);
          const vec_t<T> w1 = load(w.data() + j * chunk + kk + L);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            const vec_t<T> kr = broadcast<T>(krow[r * n + j]);
            acc[r][0] += kr * w0;
            acc[r][1] += kr * w1;
          }
        }
        const int64_t count = std::min<int64_t>(2 * L, len - kk);
        for (int r = 0; r < R && ib + r < n; ++r) {
          const T* xr = xc.data() + (ib + r) * chunk + kk;
          const vec_t<T> cr = broadcast<T>(c[ib + r]);
          T out[2 * L];
          store(out, acc[r][0] + cr * load(xr));
          store(out + L, acc[r][1] + cr * load(xr + L));
          store_row(phi + (ib + r) * d + k0 + kk, out, count);
        }
      }
    }
  }
}

}  // namespace

// ---- exported entry points: one clone per ISA level each -----------------------------------------

#define BMT_FAST_DEFINE_TILE_KERNELS(T)                                                                \
  BMT_FAST_TARGET_CLONES void rbf_from_dots(T* tile, int64_t ld, int64_t row_begin, int64_t row_end,  \
                                            int64_t cols, const T* nr, const T* nc, T inv_h) {        \
    rbf_from_dots_impl<T>(tile, ld, row_begin, row_end, cols, nr, nc, inv_h);                          \
  }                                                                                                    \
  BMT_FAST_TARGET_CLONES void radix_histogram(const T* tile, int64_t ld, int64_t row_begin,            \
                                              int64_t row_end, int64_t cols, const T* nr, const T* nc, \
                                              bool upper_only, int64_t weight, const RadixPass& pass,  \
                                              int64_t* hist) {                                         \
    radix_histogram_impl<T>(tile, ld, row_begin, row_end, cols, nr, nc, upper_only, weight, pass,     \
                            hist);                                                                     \
  }
BMT_FAST_DEFINE_TILE_KERNELS(float)
BMT_FAST_DEFINE_TILE_KERNELS(double)

#define BMT_FAST_DEFINE_COLUMN_KERNELS(In, T)                                                          \
  BMT_FAST_TARGET_CLONES void gram_columns(const In* x, int64_t n, int64_t d, int64_t col_begin,      \
                                           int64_t col_end, int64_t chunk, double* gram) {            \
    gram_columns_impl<In, T>(x, n, d, col_begin, col_end, chunk, gram);                               \
  }                                                                                                    \
  BMT_FAST_TARGET_CLONES void apply_columns(const In* x, const In* g, In* phi, int64_t n, int64_t d,  \
                                            int64_t col_begin, int64_t col_end, int64_t chunk,        \
                                            const T* kn, const T* c, T a) {                            \
    apply_columns_impl<In, T>(x, g, phi, n, d, col_begin, col_end, chunk, kn, c, a);                  \
  }
BMT_FAST_DEFINE_COLUMN_KERNELS(float, float)
BMT_FAST_DEFINE_COLUMN_KERNELS(double, double)
BMT_FAST_DEFINE_COLUMN_KERNELS(c10::BFloat16, float)
BMT_FAST_DEFINE_COLUMN_KERNELS(c10::Half, float)

}  // namespace bmt_fast::cpu
