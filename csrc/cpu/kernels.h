// Pointer-level CPU kernels (no ATen inside): vectorised and cache-blocked. kernels_impl.h (with its parts
// kernels_impl_{tiles,io,amx,gram,fused}.h) is compiled once per x86 ISA level (baseline, x86-64-v3 =
// AVX2+FMA, x86-64-v4 = AVX-512); kernels.cpp picks the best build for the running CPU once (override:
// BMT_FAST_CPU_ISA=base|v3|v4) and provides the entry points below. The ATen-level ops (svgd_cpu.cpp and
// its paths, paths.h) split work across threads and call these.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <vector>

namespace bmt_fast::cpu {

// ---- scratch -----------------------------------------------------------------------------------------

// Uninitialised scratch that the vector kernels load and store whole 64-byte vectors in: 64-byte aligned.
// new[] gets glibc malloc's 16 bytes, which split every such access across two cache lines (the Gram path's
// chunk buffer, its partial sums and the apply pass's centring shift: a standalone copy of the Gram pass, one
// thread, 16 x 409,600 fp32, took 1.5-1.9 ms per call on such buffers against 0.89 ms on aligned ones,
// 2-core Zen 5 VM). Taken from malloc with 64 bytes more and the first aligned address in them (the block's
// own address kept just before it): std::aligned_alloc cost tiny particle sets ~15 % of a step (256 sets
// of 8 x 2 through the batched op: 0.73 -> 0.85 us a set).
inline void* malloc_aligned64(size_t bytes) {
  void* raw = std::malloc(bytes + 64);
  if (raw == nullptr) throw std::bad_alloc();
  void* p = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(raw) + 64) & ~uintptr_t{63});
  static_cast<void**>(p)[-1] = raw;  // (malloc's alignment leaves at least 16 bytes before p)
  return p;
}
inline void free_aligned64(void* p) noexcept {
  if (p != nullptr) std::free(static_cast<void**>(p)[-1]);
}

struct AlignedFree {
  void operator()(void* p) const noexcept { free_aligned64(p); }
};
template <typename T>
using AlignedBuffer = std::unique_ptr<T[], AlignedFree>;

template <typename T>
AlignedBuffer<T> aligned_uninitialised(int64_t count) {
  return AlignedBuffer<T>(static_cast<T*>(malloc_aligned64(static_cast<size_t>(count > 0 ? count : 1) * sizeof(T))));
}

// The same alignment for std::vector scratch (tiles, windows): AlignedVector<T>.
template <typename T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) noexcept {}
  T* allocate(size_t count) { return static_cast<T*>(malloc_aligned64((count > 0 ? count : 1) * sizeof(T))); }
  void deallocate(T* p, size_t) noexcept { free_aligned64(p); }
  template <typename U>
  bool operator==(const AlignedAllocator<U>&) const noexcept { return true; }
};
template <typename T>
using AlignedVector = std::vector<T, AlignedAllocator<T>>;

// ---- many-particle regime: distance tiles --------------------------------------------------------

// In place on rows [row_begin, row_end) of a tile holding dot products S[a][b] = xc_a . yc_b (row stride
// ld, cols columns): K[a][b] = exp(-max(nr[a] + nc[b] - 2 S[a][b], 0) * inv_h).
void rbf_from_dots(float* tile, int64_t ld, int64_t row_begin, int64_t row_end, int64_t cols,
                   const float* nr, const float* nc, float inv_h);
void rbf_from_dots(double* tile, int64_t ld, int64_t row_begin, int64_t row_end, int64_t cols,
                   const double* nr, const double* nc, double inv_h);

// In place: values[i] = exp(values[i] * scale), for products that are <= 0 or NaN (the Gram paths' kernel
// entries from their squared distances, scale = -1/H): vectorised, as rbf_from_dots's exp (0 below
// exp(-708), where std::exp gives subnormals).
void exp_scaled(double* values, int64_t count, double scale);

// out[r] = the squared norm of row r of x (rows x d, row-major), summed in double and rounded once (fp32:
// each square exact there): the GEMM tiles' norms, which enter every distance of their row alike.
void row_sq_norms(const float* x, int64_t rows, int64_t d, float* out);
void row_sq_norms(const double* x, int64_t rows, int64_t d, double* out);

// The many-particle step with few features, fused (no tile of dot products in memory): for rows [row_begin,
// row_end) of the n centred particles xc (row-major, n x d), phi_i = (sum_{j != i} k_ij W_j + a rowsum_i xc_i +
// score_i) / n with k_ij = exp(-max(norms_i + norms_j - 2 xc_i . xc_j, 0) inv_h) and rowsum_i = sum_{j != i}
// k_ij, written to phi's rows (row stride d); returns whether all of them are finite. The column operands are
// packed over n_pad = n rounded up to kFusedPack columns: xt holds xc's columns in blocks of kFusedPack (block
// b, feature k, column c at (b d + k) kFusedPack + c; padded columns 0), norms has n_pad entries (+inf
// past n), and W = score - a xc (0 past n) is packed as xt up to kFusedLaneMaxFeatures features, else
// row-major with kFusedWidth-rounded rows (n_pad x round_up(d, kFusedWidth), zero-padded). scratch: at least
// fused_step_scratch(row_end - row_begin, d) elements, 64-byte aligned.
constexpr int kFusedRows = 4;          // rows per register block
constexpr int64_t kFusedPack = 64;     // columns per packed block
constexpr int64_t kFusedWidth = 16;    // W's row-major rows padded to a multiple of this (any ISA's fp32 lanes)
// (fp32, 4096 particles, 2 threads, lanes -> W's rows (ms): d = 8 3.9 -> 4.0-4.3, 24 7.8-8.4 -> 8.8-9.1, 32
// 10.0-10.6 -> 9.6-9.8.)
constexpr int64_t kFusedLaneMaxFeatures = 24;
constexpr int64_t kFusedChunkBytes = 256 * 1024;  // columns of packed xt and W per pass over the rows
inline int64_t fused_step_scratch(int64_t rows, int64_t d) {
  const int64_t per_row = d <= kFusedLaneMaxFeatures ? (d + 1) * kFusedWidth
                                                     : (d + kFusedWidth - 1) / kFusedWidth * kFusedWidth + kFusedWidth;
  return (rows + kFusedRows - 1) / kFusedRows * kFusedRows * per_row;
}
// Its operands from x and score (n x d, row-major): fused_step_shift writes the centre shift (d values: row 0
// plus the mean of the other rows' differences from it, summed in double in sums, d of them); fused_step_pack
// writes, for blocks [block_begin, block_end) of kFusedPack rows, with score null xc = x - shift (rows < n),
// the norms (+inf past n) and xt, else W = score - a xc from that xc, as fused_step_rows reads them (padding
// included).
void fused_step_shift(const float* x, int64_t n, int64_t d, double* sums, float* shift);
void fused_step_shift(const double* x, int64_t n, int64_t d, double* sums, double* shift);
void fused_step_pack(const float* x, const float* score, int64_t n, int64_t d, const float* shift, float a,
                     int64_t block_begin, int64_t block_end, float* xc, float* norms, float* xt, float* w);
void fused_step_pack(const double* x, const double* score, int64_t n, int64_t d, const double* shift, double a,
                     int64_t block_begin, int64_t block_end, double* xc, double* norms, double* xt, double* w);
// The median's distances from the same operands (score null in fused_step_pack: xc, norms and xt alone), so
// that every pass computes a pair's dot product alike: fused_dot_rows writes xc_i . xc_j to out[(i -
// row_begin) ld + j - col_begin] for rows [row_begin, row_end) and columns [col_begin, col_begin + cols)
// (col_begin a multiple of kFusedPack); fused_window_rows takes, for rows [row_begin, row_end) and their
// columns j > i in [col_begin, col_end) (multiples of kFusedPack, col_end up to n_pad), the squared distances
// max(norms_i + norms_j - 2 xc_i . xc_j, 0) below lo into *below and writes those in [lo, hi] to out (room
// for (row_end - row_begin) (col_end - col_begin) values), returning how many.
#define BMT_FAST_DECLARE_FUSED_DISTANCES(T)                                                                       \
  void fused_dot_rows(const T* xc, const T* xt, int64_t d, int64_t row_begin, int64_t row_end, int64_t col_begin, \
                      int64_t cols, T* out, int64_t ld);                                                         \
  int64_t fused_window_rows(const T* xc, const T* xt, const T* norms, int64_t n, int64_t d, T lo, T hi,          \
                            int64_t row_begin, int64_t row_end, int64_t col_begin, int64_t col_end,            \
                            int64_t* below, T* out);
BMT_FAST_DECLARE_FUSED_DISTANCES(float)
BMT_FAST_DECLARE_FUSED_DISTANCES(double)
// The symmetric form of the fused step: fused_step_pair takes rows [i_begin, i_end) against columns [j_begin,
// j_end) (multiples of kFusedPack up to n_pad; the same range for a diagonal pair, whose rows take the row
// side only; else i_end <= j_begin and each pair's K adds into both the row's and the column's sums), into
// one thread's sums: rowacc, n_pad rows laid out as fused_step_rows' scratch (fused_step_scratch(n_pad, d)
// elements, zeroed first), and up to kFusedLaneMaxFeatures features colacc, the column side (n_pad (d + 1)
// elements, zeroed first). fused_step_finish writes phi's rows [row_begin, row_end) from `parts` such sets
// (part p at rowacc + p part_elems and colacc + p n_pad (d + 1); colacc null beyond kFusedLaneMaxFeatures)
// and returns whether they are all finite. fused_step_pair's scratch: fused_pair_scratch(block, d) elements
// (block: the larger of the two ranges), 64-byte aligned.
inline int64_t fused_pair_scratch(int64_t block, int64_t d) {
  return fused_step_scratch(2 * block, d) + block * (d + 1);
}
#define BMT_FAST_DECLARE_FUSED_PAIRS(T)                                                                          \
  void fused_step_pair(const T* xc, const T* xt, const T* w, const T* norms, int64_t n, int64_t d, T inv_h,      \
                       int64_t i_begin, int64_t i_end, int64_t j_begin, int64_t j_end, T* rowacc, T* colacc,     \
                       T* scratch);                                                                              \
  bool fused_step_finish(const T* rowacc, int64_t part_elems, const T* colacc, int64_t parts, const T* xc,      \
                         const T* score, int64_t n, int64_t d, T a, int64_t row_begin, int64_t row_end, T* phi);
BMT_FAST_DECLARE_FUSED_PAIRS(float)
BMT_FAST_DECLARE_FUSED_PAIRS(double)
bool fused_step_rows(const float* xc, const float* xt, const float* w, const float* norms, const float* score,
                     int64_t n, int64_t d, float inv_h, float a, int64_t row_begin, int64_t row_end, float* scratch,
                     float* phi);
bool fused_step_rows(const double* xc, const double* xt, const double* w, const double* norms, const double* score,
                     int64_t n, int64_t d, double inv_h, double a, int64_t row_begin, int64_t row_end,
                     double* scratch, double* phi);

// The tensor-core path (svgd_step, rbf_kernel and its gradient on AMX) for bf16 particles, and for fp32 ones
// where torch's fp32 matmul precision allows bf16 (In: the particles' type; the operands are bf16 either way).
//
// amx_rbf_from_dots: K of rows [0, rows) x columns [0, cols) of an fp32 dot tile as rbf_from_dots computes
// it, except entry (a, a + diag) (the particle's own term), which is exactly 1 if own_one, else 0 (its dot
// product is overwritten with +inf or -inf; a diag that puts it outside the tile leaves every entry as
// computed); each row's fp32 sum (rounded_sums: of the values as stored) added into rowsum[a] unless rowsum
// is null; K stored as In (bf16 rounded
// to nearest even) in k_out (row stride ld_out), whose columns [cols, cols_padded) are zeroed. Whole
// vectors are rounded by vcvtneps2bf16 where the CPU has AVX512-BF16 (BMT_FAST_CPU_AVX512BF16=0: by the
// portable bit arithmetic; the same bits).
// amx_column_sums: sums[k] = the sum over rows [0, rows) of x[r][k] (d columns), in double, for k in
// [col_begin, col_end); with lo and hi (else nullptr) also the columns' least and greatest values.
// The operands and the step's last pass (x, score: rows of `cols` features, row stride ld, or d; shift: a
// fp32 value per feature):
// amx_centre_rows: rows of x - shift rounded to bf16 into xb (row stride ld_xb, columns [cols, ld_xb)
// zero), and the sum of the squares of row a's rounded values added into sq_sums[a] (in double);
// amx_step_pairs: for the row pairs [pair_begin, pair_end), score_i and x_i - shift in bf16 (x_off > 0: its
// x words from x_off on) or W_i = score_i - a (x_i - shift) in bf16 (x_off == 0), rows 2p and 2p + 1
// interleaved per feature (one 32-bit word each, row 2p in the low half; rows >= n zero), pair row p at
// bw + p ld_bw;
// both: unless ahead is 0, the same features `ahead` further on in the rows they read (a caller's next chunk)
// are prefetched into L2 as the rows go;
// amx_finish_rows: phi_r = (acc_r + a (rowsum_r Xs_r - acc_r[x_off:]) + score_r) (1/n) in In, Xs_r = x_r -
// shift rounded to bf16 (x_off > 0: acc holds K S, and K Xs x_off further), or phi_r = (acc_r + (a rowsum_r)
// (x_r - shift) + score_r) (1/n) (x_off == 0: acc holds K W with W = score - a (x - shift), as the fp32 GEMM
// paths give it too), for rows [row_begin, row_end) and columns [col_begin, col_end) (acc holds just those,
// row stride ld_acc); returns whether all of those values are finite in In.
// rbf_kernel_backward (grad, k: n x m, row stride ld; P = grad * K in fp32, rounded to bf16 for AMX):
// amx_p_rows writes rows [0, rows) x columns [0, cols) of P as an A operand (rows of p16, row stride ld16,
// columns [cols, cols_padded) zeroed) and adds each row's sum of the rounded values into rowsum;
// amx_p_pairs writes them as a B operand (rows 2q and 2q + 1 interleaved column by column, one 32-bit word
// per column of pair row q, row stride ldw words; rows [rows, rows_padded) zero) and adds each column's sum
// into colsum. Entry (r, r + diag), a self kernel's own term, is left out (0; a diag that puts it outside
// the tile leaves every entry). Both add sum P log max(K, FLT_MIN) into *p_log_k unless it is null.
// amx_grad_rows: out_r = scale (sums_r xc_r - acc_r) in In for rows [row_begin, row_end) and columns
// [col_begin, col_end): xc (bf16) with row stride ld, out with row stride d, acc (fp32) holding just those
// rows and columns (row stride ld_acc); out is streamed where its vectors are whole lines.
#define BMT_FAST_DECLARE_AMX(In)                                                                                      \
  void amx_rbf_from_dots(float* tile, int64_t ld, int64_t rows, int64_t cols, int64_t cols_padded, const float* nr,   \
                         const float* nc, float inv_h, int64_t diag, bool own_one, In* k_out, int64_t ld_out,         \
                         float* rowsum, bool rounded_sums = false);                                                   \
  void amx_column_sums(const In* x, int64_t d, int64_t rows, int64_t col_begin, int64_t col_end, double* sums,        \
                       float* lo = nullptr, float* hi = nullptr);                                                     \
  void amx_centre_rows(const In* x, int64_t ld, int64_t cols, const float* shift, int64_t row_begin,                  \
                       int64_t row_end, c10::BFloat16* xb, int64_t ld_xb, double* sq_sums, int64_t ahead);            \
  void amx_step_pairs(const In* score, const In* x, int64_t ld, int64_t cols, const float* shift, float a, int64_t n, \
                      int64_t pair_begin, int64_t pair_end, uint32_t* bw, int64_t ld_bw, int64_t x_off,               \
                      int64_t ahead);                                                                                 \
  bool amx_finish_rows(const float* acc, int64_t ld_acc, int64_t x_off, const float* rowsum, const In* x,             \
                       const In* score, const float* shift, float a, float n, int64_t d, int64_t row_begin,           \
                       int64_t row_end, int64_t col_begin, int64_t col_end, In* phi);                                 \
  void amx_p_rows(const In* g, const In* k, int64_t ld, int64_t rows, int64_t cols, int64_t cols_padded,              \
                  int64_t diag, c10::BFloat16* p16, int64_t ld16, float* rowsum, double* p_log_k);                    \
  void amx_p_pairs(const In* g, const In* k, int64_t ld, int64_t rows, int64_t rows_padded, int64_t cols,             \
                   int64_t diag, uint32_t* pw, int64_t ldw, float* colsum, double* p_log_k);                          \
  void amx_grad_rows(const float* acc, int64_t ld_acc, const float* sums, const c10::BFloat16* xc, int64_t ld,       \
                     float scale, int64_t d, int64_t row_begin, int64_t row_end, int64_t col_begin, int64_t col_end,  \
                     In* out);
BMT_FAST_DECLARE_AMX(c10::BFloat16)
BMT_FAST_DECLARE_AMX(float)

// dst[k * ld_dst + i] = src[i * ld_src + k] for 32- or 64-bit words k in [k_begin, k_end) of rows i in [0,
// rows) (AMX's B operand: xb's bf16 feature pairs transposed; rbf_kernel's lower triangle, fp32 or fp64).
void transpose_words(const uint32_t* src, int64_t ld_src, int64_t rows, int64_t k_begin, int64_t k_end, uint32_t* dst,
                     int64_t ld_dst);
void transpose_words(const uint64_t* src, int64_t ld_src, int64_t rows, int64_t k_begin, int64_t k_end, uint64_t* dst,
                     int64_t ld_dst);
// Rows of bytes: dst row r (byte stride ld_dst) <- src row r (byte stride ld_src), `bytes` each, r in
// [0, rows); the whole aligned 64-byte lines of dst are streamed around the caches in the AVX-512 build (a
// result written once, e.g. rbf_kernel's K), plain copies elsewhere.
void stream_rows(const void* src, int64_t ld_src, int64_t rows, int64_t bytes, void* dst, int64_t ld_dst);
// The same for fp32 rows written as bf16 or fp16 (rounded to nearest even, as ATen's conversion): dst row r
// (row stride ld_dst elements) <- src row r (ld_src), `cols` values each; bf16's whole aligned lines streamed
// in the AVX-512 build (the fused self kernel's K of 16-bit particles).
void stream_rows_as(const float* src, int64_t ld_src, int64_t rows, int64_t cols, c10::BFloat16* dst, int64_t ld_dst);
void stream_rows_as(const float* src, int64_t ld_src, int64_t rows, int64_t cols, c10::Half* dst, int64_t ld_dst);
// Columns [0, cols) of rows 2q and 2q + 1 of src (bf16, row stride ld) interleaved into pair row q of out
// (row stride ld_out words), q in [pair_begin, pair_end): AMX's B operand from rows of A operands (and,
// transposed as words, a bf16 matrix's transpose).
void bf16_row_pairs(const c10::BFloat16* src, int64_t ld, int64_t pair_begin, int64_t pair_end, int64_t cols,
                    uint32_t* out, int64_t ld_out);

// Radix-select histogram over squared distances D = max(nr[a] + nc[b] - 2 S[a][b], 0) of a dot tile.
// The bit pattern of a non-negative float orders like its value, so the key of D is its bits. For each
// of `num_targets` prefixes, keys whose bits above `shift + width` equal the prefix add `weight` to
// hist[t * 2^width + ((key >> shift) & (2^width - 1))]. With upper_only, only b > a + diag_offset counts
// (the strict upper triangle of a diagonal tile).
struct RadixPass {
  int shift;
  int width;
  int num_targets;
  uint64_t prefix[2];
};
void radix_histogram(const float* tile, int64_t ld, int64_t row_begin, int64_t row_end, int64_t cols,
                     const float* nr, const float* nc, bool upper_only, int64_t weight,
                     const RadixPass& pass, int64_t* hist);
void radix_histogram(const double* tile, int64_t ld, int64_t row_begin, int64_t row_end, int64_t cols,
                     const double* nr, const double* nc, bool upper_only, int64_t weight,
                     const RadixPass& pass, int64_t* hist);

// Over the squared distances of rows [row_begin, row_end) of a dot tile (computed as radix_histogram
// computes them; upper_only as there): adds the number below lo to *below and writes those in [lo, hi] to
// out, row by row (room for every value of those rows); returns how many it wrote.
int64_t window_collect(const float* tile, int64_t ld, int64_t row_begin, int64_t row_end, int64_t cols,
                       const float* nr, const float* nc, bool upper_only, float lo, float hi, int64_t* below,
                       float* out);
int64_t window_collect(const double* tile, int64_t ld, int64_t row_begin, int64_t row_end, int64_t cols,
                       const double* nr, const double* nc, bool upper_only, double lo, double hi, int64_t* below,
                       double* out);

// out[t] = squared distance of the rows first[t] and second[t] of xc (n x d, row-major) with norms, from
// their dot product, clamped at 0 (a sample of pairs). bf16 rows (the AMX path's rounded particles) in fp32.
void pair_sq_dists(const float* xc, int64_t d, const float* norms, const int64_t* first, const int64_t* second,
                   int64_t count, float* out);
void pair_sq_dists(const double* xc, int64_t d, const double* norms, const int64_t* first, const int64_t* second,
                   int64_t count, double* out);
void pair_sq_dists(const c10::BFloat16* xc, int64_t d, const float* norms, const int64_t* first,
                   const int64_t* second, int64_t count, float* out);

// ---- few-particle, huge-d regime: split-K Gram, then one pass ------------------------------------

// Columns are processed in chunks of `chunk` (a multiple of 32), shifted by particle 0 inside the chunk,
// so no centred copy of x is ever made.

// gram[i * n + j] += sum over columns [col_begin, col_end) of (x_i - x_0)[k] (x_j - x_0)[k], for i <= j
// (the caller mirrors the lower triangle), over n rows: rows 0..nx-1 of x, then rows 0..n-nx-1 of y (null
// when nx == n; a second set without a copy of both). Accumulates each chunk in the compute type T, then in
// double. Unless shift is null, also shift[k] = mean_i x_i[k] over all n rows for those columns (T: fp32,
// or fp64 for fp64 x).
#define BMT_FAST_DECLARE_GRAM(In, T)                                                                      \
  void gram_columns(const In* x, const In* y, int64_t nx, int64_t n, int64_t d, int64_t col_begin,        \
                    int64_t col_end, int64_t chunk, double* gram, T* shift);
BMT_FAST_DECLARE_GRAM(float, float)
BMT_FAST_DECLARE_GRAM(double, double)
BMT_FAST_DECLARE_GRAM(c10::BFloat16, float)
BMT_FAST_DECLARE_GRAM(c10::Half, float)

// phi[i][k] = sum_j kn[i][j] * (g[j][k] - a * xc[j][k]) + c[i] * xc[i][k] for columns
// [col_begin, col_end), xc = x - shift (any shift gives the same phi in exact arithmetic; the column
// means keep the cancelling terms small); kn is (n_padded x n) and c has n_padded entries (n_padded = n
// rounded up to 4, padding rows zero). With kn = K/n, a = 2/H and c = (2/H) rowsum(K)/n this is the SVGD
// direction. Returns whether every value it wrote is finite (checked in registers, as stored in In).
#define BMT_FAST_DECLARE_APPLY(In, T)                                                                \
  bool apply_columns(const In* x, const In* g, In* phi, int64_t n, int64_t d, int64_t col_begin,     \
                     int64_t col_end, const T* shift, const T* kn, const T* c, T a);
BMT_FAST_DECLARE_APPLY(float, float)
BMT_FAST_DECLARE_APPLY(double, double)
BMT_FAST_DECLARE_APPLY(c10::BFloat16, float)
BMT_FAST_DECLARE_APPLY(c10::Half, float)

// rbf_kernel's gradient for few pairs, over columns [col_begin, col_end): with s = -(2/H) grad * K
// (n x m, row-major, in T),
//   gx[i][k] = sum_j s[i][j] (x_i[k] - y_j[k]),   gy[j][k] = sum_i s[i][j] (y_j[k] - x_i[k]),
// each written unless null; the differences are taken in T from the inputs as they are (no centring).
// cross_sq_dists: dist[i * m + j] (n x m, double) += sum over those columns of (x_i[k] - y_j[k])^2, by
// direct differences (summed in T per 2 KiB chunk of a row, then in double).
#define BMT_FAST_DECLARE_RBF_GRAD(In, T)                                                                  \
  void rbf_grad_columns(const In* x, const In* y, int64_t n, int64_t m, int64_t d, int64_t col_begin,    \
                        int64_t col_end, const T* s, In* gx, In* gy);                                     \
  void cross_sq_dists(const In* x, const In* y, int64_t n, int64_t m, int64_t d, int64_t col_begin,      \
                      int64_t col_end, double* dist);
BMT_FAST_DECLARE_RBF_GRAD(float, float)
BMT_FAST_DECLARE_RBF_GRAD(double, double)
BMT_FAST_DECLARE_RBF_GRAD(c10::BFloat16, float)
BMT_FAST_DECLARE_RBF_GRAD(c10::Half, float)

constexpr int64_t kApplyRows = 4;  // output rows per register block in apply_columns

// Columns per block of the packed apply pass (the ISA builds without AVX-512, kernels_impl_gram.h): its
// centred x and w rows, 2 n x chunk elements, stay within about 16 KiB of L1. A multiple of 64.
inline int64_t apply_pack_chunk(int64_t n) {
  const int64_t chunk = 2048 / (n > 0 ? n : 1) / 64 * 64;
  return chunk < 64 ? 64 : chunk > 512 ? 512 : chunk;
}

// The AVX-512 build's apply pass for 16 particles at a row stride that is a multiple of 4 KiB goes in two
// halves of the rows (kernels_impl_gram.h: apply_columns_halves), a chunk of this many vectors of columns at a
// time, its 16 sums per vector waiting in the scratch; apply_scratch_size counts them.
constexpr int64_t kApplyHalvesParticles = 16;
constexpr int64_t kApplyHalvesChunkVectors = 16;
// Padding (elements) of each scratch row of the Gram and apply passes; covers kRowPad<T> of kernels_impl_gram.h for
// float and double.
constexpr int64_t kScratchPad = 64;
// Elements of T that apply_columns needs for n particles: K's row blocks (rows x n), then the packed pass's
// buffers or the halves' sums (16 rows x a chunk of 64-byte vectors), whichever is larger.
template <typename T>
inline int64_t apply_scratch_size(int64_t n) {
  const int64_t rows = (n + kApplyRows - 1) / kApplyRows * kApplyRows;
  const int64_t packed = 2 * n * (apply_pack_chunk(n) + kScratchPad);
  const int64_t halves = n == kApplyHalvesParticles ? kApplyHalvesChunkVectors * n * (64 / int64_t{sizeof(T)}) : 0;
  return rows * n + (packed > halves ? packed : halves);
}

// bf16 svgd_step with many particles (the tiled algorithm, d >= kAmxMinFeatures) runs on AMX tiles
// (oneDNN's brgemm through ATen) when this CPU has them, unless BMT_FAST_CPU_AMX=0 (amx.cpp). With
// fewer features, the fp32 path: there the bf16 rounding of K and W is not averaged out (relative errors
// of 1e-2 at d = 1..3; the CUDA kernels draw the same line). (Up to 2026-12-02 also d <= 1024, on the
// guess that larger rows' fp32 accumulators leaving L2 would cost more than AMX gains; measured, AMX was
// 1.2-2.4x faster than the fp32 path from d = 2048 to 409,600.)
constexpr int64_t kAmxMinFeatures = 32;
bool bf16_amx_enabled();
// Whether torch's fp32 matmul precision for oneDNN is bf16 (torch.set_float32_matmul_precision("medium"),
// or torch.backends.mkldnn.matmul.fp32_precision = "bf16"): fp32 particles then take the AMX path as well,
// at the precision ATen's own fp32 GEMMs take on such a CPU (read at every call, as ATen reads it).
bool float32_matmul_in_bf16();

// Up to how much work (pairs x (features + 32)) an op runs on the calling thread alone (paths.h:
// kSerialMaxWork, or BMT_FAST_CPU_SERIAL_MAX_WORK, read once).
int64_t serial_max_work();

// The CPU switches read from the environment. Unset or empty gives the default; any other value than the
// ones listed is an error naming the variable and what it takes (a typo, "false" or "off" must not run
// another path than the one asked for, nor "1e6" a bound of 1). env_switch: "0" or "1"; env_count: a
// non-negative decimal integer.
bool env_switch(const char* name, bool fallback);
int64_t env_count(const char* name, int64_t fallback);
// Every switch of the CPU ops (BMT_FAST_CPU_ISA, _AMX, _AVX512BF16, _FUSED, _SERIAL_MAX_WORK: read once per
// process; BMT_FAST_MEDIAN_WINDOW: read at each call), checked at each CPU op's start (SerialIfSmall), so that
// a bad value fails every call, not only those that reach the path it steers.
void check_cpu_settings();
// Whether the fused kernels are on (BMT_FAST_CPU_FUSED, fused.cpp).
bool fused_enabled();
// BMT_FAST_MEDIAN_WINDOW (read at each call, for A/B runs and tests): unset, empty or "1" the median's window
// pass (median_select.h), "0" the radix passes instead, "require" the window pass with a miss an error.
enum class MedianWindow { kOn, kOff, kRequire };
MedianWindow median_window_mode();

// Reads BMT_FAST_CPU_ISA and BMT_FAST_CPU_AVX512BF16 (once; a bad value throws at every call).
void check_isa_settings();

// The ISA build in use ("base", "v3" or "v4") and the ones this library contains.
const char* active_isa();
const char* compiled_isas();

}  // namespace bmt_fast::cpu
