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

#include "../radix_key.h"
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

}  // namespace
}  // namespace bmt_fast::cpu::BMT_FAST_ISA

// The parts, in this order (each uses what the ones before it define):
#include "kernels_impl_tiles.h"
#include "kernels_impl_io.h"
#include "kernels_impl_amx.h"
#include "kernels_impl_gram.h"
#include "kernels_impl_fused.h"

namespace bmt_fast::cpu::BMT_FAST_ISA {

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
                         float* rowsum, bool rounded_sums, bool native_rounding) {                                    \
    if (BMT_FAST_NATIVE_BF16_ROUNDING(native_rounding))                                                               \
      amx_rbf_from_dots_impl<true>(tile, ld, rows, cols, cols_padded, nr, nc, inv_h, diag, own_one, k_out, ld_out,    \
                                   rowsum, rounded_sums);                                                             \
    else                                                                                                              \
      amx_rbf_from_dots_impl<false>(tile, ld, rows, cols, cols_padded, nr, nc, inv_h, diag, own_one, k_out, ld_out,   \
                                    rowsum, rounded_sums);                                                            \
  }                                                                                                                   \
  void amx_column_sums(const In* x, int64_t d, int64_t rows, int64_t col_begin, int64_t col_end, double* sums,        \
                       float* lo, float* hi) {                                                                        \
    amx_column_sums_impl(x, d, rows, col_begin, col_end, sums, lo, hi);                                               \
  }                                                                                                                   \
  void amx_centre_rows(const In* x, int64_t ld, int64_t cols, const float* shift, int64_t row_begin,                  \
                       int64_t row_end, c10::BFloat16* xb, int64_t ld_xb, double* sq_sums, int64_t ahead) {           \
    amx_centre_rows_impl(x, ld, cols, shift, row_begin, row_end, xb, ld_xb, sq_sums, ahead);                          \
  }                                                                                                                   \
  void amx_step_pairs(const In* score, const In* x, int64_t ld, int64_t cols, const float* shift, float a, int64_t n, \
                      int64_t pair_begin, int64_t pair_end, uint32_t* bw, int64_t ld_bw, int64_t x_off,               \
                      int64_t ahead) {                                                                                \
    amx_step_pairs_impl(score, x, ld, cols, shift, a, n, pair_begin, pair_end, bw, ld_bw, x_off, ahead);              \
  }                                                                                                                   \
  bool amx_finish_rows(const float* acc, int64_t ld_acc, int64_t x_off, const float* rowsum, const In* x,             \
                       const In* score, const float* shift, float a, float n, int64_t d, int64_t row_begin,           \
                       int64_t row_end, int64_t col_begin, int64_t col_end, In* phi) {                                \
    return x_off > 0 ? finish_rows_impl<true>(acc, ld_acc, x_off, rowsum, x, score, shift, a, n, d, row_begin,        \
                                              row_end, col_begin, col_end, phi)                                       \
                     : finish_rows_impl<false>(acc, ld_acc, 0, rowsum, x, score, shift, a, n, d, row_begin, row_end,  \
                                               col_begin, col_end, phi);                                              \
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

void row_sq_norms(const float* x, int64_t rows, int64_t d, float* out) {
  constexpr int L = kLanes<float>, kGroup = 4;  // 4 vectors a step, in 8 double sums (latency hidden)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * d;
    vec_t<double> acc[2 * kGroup] = {};
    int64_t k = 0;
    for (; k + kGroup * L <= d; k += kGroup * L) {
#pragma GCC unroll 4
      for (int g = 0; g < kGroup; ++g) add_squares_as_doubles(acc + 2 * g, load(row + k + g * L));
    }
    for (; k < d; k += L) add_squares_as_doubles(acc, load_part_as<float>(row + k, min64(L, d - k)));
    for (int g = 1; g < 2 * kGroup; ++g) acc[0] += acc[g];
    out[r] = static_cast<float>(horizontal_sum<double>(acc[0]));
  }
}

void row_sq_norms(const double* x, int64_t rows, int64_t d, double* out) {
  constexpr int L = kLanes<double>, kGroup = 4;
  for (int64_t r = 0; r < rows; ++r) {
    const double* row = x + r * d;
    vec_t<double> acc[kGroup] = {};
    int64_t k = 0;
    for (; k + kGroup * L <= d; k += kGroup * L) {
#pragma GCC unroll 4
      for (int g = 0; g < kGroup; ++g) {
        const vec_t<double> v = load(row + k + g * L);
        acc[g] += v * v;
      }
    }
    for (; k < d; k += L) {
      const vec_t<double> v = load_part_as<double>(row + k, min64(L, d - k));
      acc[0] += v * v;
    }
    for (int g = 1; g < kGroup; ++g) acc[0] += acc[g];
    out[r] = horizontal_sum<double>(acc[0]);
  }
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
