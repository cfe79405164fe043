// What the files of the CPU ops share. svgd_cpu.cpp holds the ops and chooses among their paths, each in a
// file of its own:
//
//   common.cpp        the centring and finiteness helpers below
//   median_select.h   the exact median of the n^2 squared distances from any path's tiles of dot products
//   fused.cpp         many particles, d <= 256: the fused register-block kernels (step, median, rbf_kernel(x))
//   tiled.cpp         many particles beyond: GEMM tiles of the upper triangle
//   chunked.cpp       few particles with many features: the GEMM Gram pass by feature chunks (and its gradient)
//   gram.cpp          few particles, huge d: the split-K Gram pass and the apply pass; its rules; direct
//                     differences of two sets
//   amx.cpp           bf16 (and fp32 under bf16 matmuls) on AMX tiles: every op, the gradient too
//   rbf_backward.cpp  rbf_kernel's gradients
//
// The SIMD loops they call are in kernels.h; team.h runs a call's parallel loops in one OpenMP region.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <omp.h>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../bmt_fast.h"
#include "huge_pages.h"
#include "kernels.h"
#include "team.h"

namespace bmt_fast::cpu {

// Calls with little work run on the calling thread alone: their ATen ops, BLAS calls and parallel loops
// each woke the other threads. Where those sleep between regions (OMP_WAIT_POLICY=PASSIVE, as the
// benchmarks run, or after a pause longer than libgomp's spin) a region cost ~75 us on a 2-core Xeon VM
// (CPUID model 167).
// Work ~ pairs x (features + 32): a thread's time, ~0.03 ns per product and ~1 ns per pair (its exp). Up
// to kSerialMaxWork, fp32 step, H given, 2-core Xeon, two threads -> one (us), with libgomp's default
// (spinning threads, back-to-back calls): 100 x 50 68-74 -> 60, 128 x 128 123-132 -> 115-141, 150 x 150
// 216-220 -> 208-212; with PASSIVE: 100 x 50 320-359 -> 68-82, 128 x 128 400-504 -> 106-134, 150 x 150
// 565-654 -> 199-207. Beyond it two spinning threads won: 256 x 48 125-151 against 202-213 us on one,
// 100 x 1000 321-384 against 610-645. BMT_FAST_CPU_SERIAL_MAX_WORK sets the bound (0: never), read once.
constexpr int64_t kSerialMaxWork = int64_t{1} << 22;

// First the CPU switches are checked (check_cpu_settings: a bad value fails every op call). Then, for its
// lifetime, the calling thread's OpenMP regions (ATen's parallel loops with the OpenMP backend, and
// MKL's) take one thread where the work, rows x cols pairs x (features + 32), is at most serial_max_work();
// the thread count is restored after, also when the op throws. (The count is the calling thread's own
// OpenMP setting: other threads keep theirs.)
// ATen sets a thread's OpenMP thread count to torch's the first time the thread enters at::parallel_for
// (at::internal::lazy_init_num_threads, whose once-per-thread flag libtorch and this extension each hold a
// copy of): both are done here first, or the first call of an op on a thread had its count put back to
// torch's by its first parallel loop and ran threaded (results an ulp apart from the same call's later ones
// where the split follows the thread count: the feature chunks of 80 x 300 fp32 particles).
inline int initialised_max_threads() {
  at::internal::lazy_init_num_threads();  // this extension's copy
  return at::get_num_threads();           // libtorch's (its lazy init, then omp_get_max_threads())
}

class SerialIfSmall {
 public:
  SerialIfSmall(int64_t rows, int64_t cols, int64_t features)
      : previous_((check_cpu_settings(), rows * cols * (features + 32) <= serial_max_work())
                      ? initialised_max_threads()
                      : 1) {
    if (previous_ > 1) omp_set_num_threads(1);
  }
  ~SerialIfSmall() {
    if (previous_ > 1) omp_set_num_threads(previous_);
  }
  SerialIfSmall(const SerialIfSmall&) = delete;
  SerialIfSmall& operator=(const SerialIfSmall&) = delete;

 private:
  int previous_;
};

// x in the compute type, shifted by row 0 plus the mean of the differences (see reference.centre).
// (The n x d temporaries on huge pages when large: reused, not paged in again by every call.)
at::Tensor centring_shift(const at::Tensor& x_acc);

// x - shift in the compute type acc (x of any floating dtype, widened in the subtraction), on huge pages
// when large: a call's centred copy, not paged in again by every call.
at::Tensor centred_by(const at::Tensor& x, const at::Tensor& shift, at::ScalarType acc);

// centred_by(x, centring_shift(x)) in the compute type acc.
at::Tensor centred(const at::Tensor& x, at::ScalarType acc);

// 1/H in T for the kernels' exponent -|x_i - x_j|^2 / H: at least T's least positive value. A valid H past
// 1 / that (fp32: 7.1e44, e.g. a float64 1e300) had made it 0, and the padded rows' and columns' +inf norms
// times 0 NaN: svgd_step's fused and AMX paths returned phi all NaN, where K is 1 to fp32's rounding.
template <typename T>
inline T inverse_bandwidth(double h) {
  return std::max(static_cast<T>(1.0 / h), std::numeric_limits<T>::denorm_min());
}

// The rows' squared norms of centred particles (n), their squares through a huge-page temporary.
at::Tensor row_sq_norms(const at::Tensor& xc);

// Whether the count values at p are all finite: fp32 / fp64 by their exponent bits (a loop the compiler
// vectorises), 16-bit types as stored (a value that overflowed the 16-bit type is not).
template <typename T>
bool all_finite(const T* p, int64_t count) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
    constexpr Bits exponent = static_cast<Bits>(sizeof(T) == 4 ? 0x7f800000ull : 0x7ff0000000000000ull);
    Bits bad = 0;
    for (int64_t i = 0; i < count; ++i) {
      Bits bits;
      std::memcpy(&bits, p + i, sizeof(bits));
      bad |= static_cast<Bits>((bits & exponent) == exponent);
    }
    return bad == 0;
  } else {
    bool ok = true;
    for (int64_t i = 0; i < count; ++i) ok &= std::isfinite(static_cast<float>(p[i]));
    return ok;
  }
}

// Where the particles hold a NaN or an infinity (or their squared distances overflow), the median and so H are
// NaN on every path, as the reference's (torch.median's) are: the checked API raises before; with
// check_inputs=False a clamp or a selection over NaN keys had given a finite, floored H. The Gram path's
// distances then hold NaN or Inf; the other paths' centring spreads such a value down its column, so every
// squared norm of the centred rows is NaN or Inf (checked there: n values, not n^2).
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Whether all the (fp32 / fp64) norms are finite.
bool finite_norms(const at::Tensor& norms);

// Whether the median's pass keeps all n x n dot products (element_bytes each) for K after it (svgd_step
// and, on AMX, rbf_kernel with the median rule): with enough features K then costs one pass over them
// instead of n^2 d products again, where they take at most kKeptDotsMaxBytes. From 128 features on the
// GEMM path, 512 on AMX (whose products cost less against the copies). 2-core Xeon, alternating (ms):
// fp32 step 2048 x 32 5.4-5.6 -> 6.0-6.4, 4096 x 64 level, 1024 x 128 3.9-4.1 -> 3.2-3.8, 4096 x 128
// 37-41 -> 34-36, 4096 x 256 68-69 -> 59-60, 2048 x 2048 141-149 -> 114-117, 1024 x 8192 194-197 ->
// 157-164, fp64 1024 x 1024 43-49 -> 37-39; AMX bf16 1024 x 8192 41.6-45.1 -> 29.8-32.2, 2048 x 2048
// 37.1-40.0 -> 28.1-30.0, 4096 x 768 47.8-49.1 -> 45.0-47.4, 512 x 4096 6.1-6.2 -> 4.8-5.1, 4096 x 512
// level; fp32 under "medium" 1024 x 8192 43.5-44.0 -> 32.3-33.4.
constexpr int64_t kKeptDotsMinFeatures = 128;
constexpr int64_t kAmxKeptDotsMinFeatures = 512;
constexpr int64_t kKeptDotsMaxBytes = int64_t{64} << 20;
inline bool keeps_dots(int64_t n, int64_t d, int64_t element_bytes, int64_t min_features) {
  return d >= min_features && n * n * element_bytes <= kKeptDotsMaxBytes;
}

// What for_each_upper_tile does with an n x n tensor of kept dot products: nothing, write each tile's
// GEMM into it too, or read the tiles from it instead of a GEMM (a later pass over the same tiles).
enum class Kept { kNone, kWrite, kRead };

// For every tile of the upper triangle of xc xc^T (by GEMM, in xc's dtype): visit(tile, i0, j0) reads it
// (or turns it into K in place).
template <typename Visit>
void for_each_upper_tile(const at::Tensor& xc, Visit&& visit, Kept use = Kept::kNone, at::Tensor* kept = nullptr) {
  const int64_t n = xc.size(0), block = std::min(n, kTileSize);
  at::Tensor buffer = empty_large({block * block}, xc.options());
  for (int64_t i0 = 0; i0 < n; i0 += block) {
    const int64_t rows = std::min(block, n - i0);
    for (int64_t j0 = i0; j0 < n; j0 += block) {
      const int64_t cols = std::min(block, n - j0);
      at::Tensor tile = buffer.narrow(0, 0, rows * cols).view({rows, cols});
      if (use == Kept::kRead) {
        tile.copy_(kept->narrow(0, i0, rows).narrow(1, j0, cols));
      } else {
        at::mm_out(tile, xc.narrow(0, i0, rows), xc.narrow(0, j0, cols).t());
        if (use == Kept::kWrite) kept->narrow(0, i0, rows).narrow(1, j0, cols).copy_(tile);
      }
      visit(tile, i0, j0);
    }
  }
}

// The distance tiles of the medians (median_select.h): tiles(visit) calls visit(tile, i0, j0, begin, end) for rows
// [begin, end) of each (rows x cols, contiguous) tile of dot products of rows i0.. with rows j0.. covering
// the upper triangle (a tile with i0 == j0 holds the diagonal at its local (a, a); the visitor counts its
// columns b > a only), from several threads at once. By GEMM on the rows of xc (fp32 / fp64): one tile
// at a time (the GEMM threads itself), its rows split across the threads.
struct GemmTiles {
  static constexpr int64_t kSelectMaxParticles = kMedianSelectMaxParticles;  // (median_sq_dist: selection)
  const at::Tensor& xc;
  at::Tensor* kept = nullptr;  // or an n x n tensor into which the upper-triangle tiles are written as well
  template <typename Visit>
  void operator()(Visit&& visit) const {
    for_each_upper_tile(xc, [&](const at::Tensor& tile, int64_t i0, int64_t j0) {
      parallel_for(0, tile.size(0), 16, [&](int64_t begin, int64_t end) { visit(tile, i0, j0, begin, end); });
    }, kept ? Kept::kWrite : Kept::kNone, kept);
  }
};

// Which op asks whether "auto" takes the few-particle Gram path: each has its own measured crossover.
enum class GramUse {
  kStep,          // svgd_step with H given
  kMedian,        // median_bandwidth, and svgd_step with the median rule (the same path gives both the same H)
  kKernel,        // rbf_kernel(x) (x on both sides); rbf_kernel_median takes one Gram pass where both
                  // kMedian and kKernel take the Gram path
};

// Whether the Gram path runs for x in `use` (gram.cpp): algorithm "gram", or "auto" where it prefers it.
bool use_gram(const at::Tensor& x, Algorithm algorithm, GramUse use);
bool prefers_gram(const at::Tensor& x, GramUse use);

// Blocks [0, blocks) of a triangle's rows to the threads in pairs (b, blocks - 1 - b), so that shares are
// equal where a block's work grows or shrinks linearly with b: each share calls make_share() once for its
// state (buffers) and the callable it returns for each of its blocks.
template <typename MakeShare>
void parallel_for_block_pairs(int64_t blocks, const MakeShare& make_share) {
  parallel_for(0, (blocks + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    auto visit = make_share();
    for (int64_t pair = begin; pair < end; ++pair) {
      visit(pair);
      if (blocks - 1 - pair != pair) visit(blocks - 1 - pair);
    }
  });
}

// transpose_words for fp32 / fp64 values (their bits as 32- or 64-bit words).
template <typename T>
void transpose_values(const T* src, int64_t ld_src, int64_t rows, int64_t k_begin, int64_t k_end, T* dst,
                      int64_t ld_dst) {
  using Word = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  transpose_words(reinterpret_cast<const Word*>(src), ld_src, rows, k_begin, k_end, reinterpret_cast<Word*>(dst),
                  ld_dst);
}

// The lower triangle of an n x n row-major matrix from its upper one (m[i][j] = m[j][i], j < i), by blocks of
// 64 rows: the part left of a block's diagonal block is a transpose of the rows above it (transpose_words),
// block b paired with block (blocks - 1 - b) for equal shares. (A plain loop, each row's columns read a row
// apart, had been 5% of rbf_kernel(x)'s samples at 512 x 384 on the chunks.)
template <typename T>
void mirror_upper_triangle(T* m, int64_t n) {
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  parallel_for_block_pairs(blocks, [&] {
    return [&](int64_t b) {
      const int64_t i0 = b * kBlock, i1 = std::min(n, i0 + kBlock);
      transpose_values(m, n, i0, i0, i1, m, n);
      for (int64_t i = i0 + 1; i < i1; ++i)
        for (int64_t j = i0; j < i; ++j) m[i * n + j] = m[j * n + i];
    };
  });
}

// A Gram pass by feature chunks (chunked.cpp, amx.cpp): the shift (d: each chunk's column means; AMX's of
// bf16 particles the exact shifts, amx.cpp), the squared norms of the shifted rows (n) and all their dot
// products (n x n), in the pass's compute type (AMX: fp32, of the rounded particles; the GEMM path: x's
// accumulation type); spread: the largest |x - shift| (AMX only, for its step's choice: amx_step_splits).
struct ChunkedGram {
  at::Tensor shift, norms, dots;
  double spread = 0.0;
};

// The median of the n^2 squared distances from a chunked Gram pass (n <= 512: by selection).
double median_sq_dist_chunked(const ChunkedGram& gram);

// (A chunked Gram pass's parts take at most this much memory: parts = threads up to it, so that a many-core
// CPU's partial sums stay small next to the particles.)
constexpr int64_t kGramPartsMaxBytes = int64_t{16} << 20;

// H = the median rule's bandwidth for the median of x's squared distances, as the ops return it: a 0-dim
// tensor in x's accumulation dtype (the value rbf_kernel then reads).
inline at::Tensor bandwidth_result(double median, const at::Tensor& x) {
  const double h = std::isfinite(median) ? bandwidth_from_median(median, x.size(0)) : kNaN;  // (finite_norms)
  return at::scalar_tensor(h, x.options().dtype(accumulation_type(x.scalar_type())));
}

// rbf_kernel_median's K for its H (bandwidth_result): make_k(H's value), or all NaN where H is NaN (the
// particles held NaN or Inf: finite_norms), as the reference's exp(-d2 / NaN).
template <typename MakeK>
at::Tensor median_kernel(const at::Tensor& h, const at::Tensor& x, MakeK&& make_k) {
  if (std::isnan(h.item<double>())) return at::full({x.size(0), x.size(0)}, kNaN, x.options());
  return make_k(read_bandwidth(h, x.scalar_type()));
}


// Up to this many pairs (n * m) rbf_kernel of two sets and its gradient go by direct differences of
// the rows (no centred copies, no GEMM). With one prompt against 16 particles at d = 76,800 (the trainer's
// kernel-density prior) the GEMM-form gradient made centred copies of both sets, zeroed and wrote the
// particles' gradient that nobody asked for, and took longer than naive torch autograd. On a 2-core Xeon
// (AVX-512) the direct gradient was faster up to 64 x 64 pairs at d = 76,800 (both gradients 14.8 against
// 22.0 ms) and slower from 128 x 128 (11.7 against 10.8 ms at d = 20,000).
constexpr int64_t kRbfDirectMaxPairs = 4096;

// ---- the paths' entry points -------------------------------------------------------------------
//
// x and score: contiguous (n, d) particles of one floating dtype; out: contiguous, x's shape and dtype;
// bandwidth: H, checked (none: the median rule). A step writes phi into out and returns whether phi is all
// finite where its last pass tracks that (std::optional: none where it does not; svgd_step_into then scans).

// fused.cpp: whether the step (use_fused), the GEMM path's median (use_fused_median) and rbf_kernel(x)
// (use_fused_kernel) take the fused kernels: up to kFusedMaxFeatures features, unless BMT_FAST_CPU_FUSED=0
// (fused_enabled, kernels.h).
constexpr int64_t kFusedMaxFeatures = 256;

bool use_fused(int64_t d);
bool use_fused_median(int64_t d);
bool use_fused_kernel(int64_t d);
std::optional<bool> svgd_step_by_fused(const at::Tensor& x, const at::Tensor& score,
                                       const std::optional<double>& bandwidth, at::Tensor& out);
// The exact median of x's squared distances on the GEMM path (fp32 / fp64 arithmetic): by the fused
// distances (use_fused_median), else by GEMM tiles.
double median_by_gemm_path(const at::Tensor& x);
// rbf_kernel(x) by the fused distances, in x's accumulation type (16-bit x: in x's dtype); h none: the
// median rule, whose median is written to *median.
at::Tensor rbf_kernel_by_fused(const at::Tensor& x, std::optional<double> h, double* median);

// tiled.cpp: the GEMM tiles.
std::optional<bool> svgd_step_by_tiles(const at::Tensor& x, const at::Tensor& score,
                                       const std::optional<double>& bandwidth, at::Tensor& out);
// Whether rbf_kernel(x) (and rbf_kernel_median) take one triangle of tiles rather than one n x n GEMM.
bool self_kernel_by_tiles(int64_t n, int64_t d);
// rbf_kernel(x) from the tiles of centred particles xc (their squared norms given), in xc's dtype.
at::Tensor rbf_kernel_self_by_tiles(const at::Tensor& xc, const at::Tensor& norms, double h);
// rbf_kernel_median of contiguous x by the tiles: the median's tiles kept for K where keeps_dots.
std::tuple<at::Tensor, at::Tensor> rbf_kernel_median_by_tiles(const at::Tensor& x);

// chunked.cpp: the GEMM path by feature chunks for few particles with many features.
bool use_gemm_gram_chunked(int64_t n, int64_t d);  // a self kernel's forward passes
bool use_gemm_chunked(int64_t rows, int64_t d);    // rbf_kernel's gradient (rows: the larger side)
ChunkedGram gemm_gram_chunked(const at::Tensor& x);
// The pass's dots turned into K in place, each particle's own term `own`.
const at::Tensor& chunked_gram_to_kernel(const ChunkedGram& gram, double h, double own);
bool svgd_step_by_gemm_chunks(const at::Tensor& x, const at::Tensor& score, const std::optional<double>& bandwidth,
                              at::Tensor& out);
std::tuple<at::Tensor, at::Tensor, double> rbf_kernel_backward_gemm_chunked(const at::Tensor& grad,
                                                                            const at::Tensor& x, const at::Tensor& y,
                                                                            const at::Tensor& kernel, double h,
                                                                            bool want_x, bool want_y, bool want_h,
                                                                            at::ScalarType acc, double tiny);

// gram.cpp: the Gram path (its rules: use_gram and prefers_gram above).
bool svgd_step_by_gram(const at::Tensor& x, const at::Tensor& score, const std::optional<double>& bandwidth,
                       at::Tensor& out);
// The n x n squared distances of the rows of x, then y's when given (row-major, exact zeros on the diagonal).
std::vector<double> gram_sq_dists(const at::Tensor& x, const at::Tensor* y = nullptr);
// Two sets by direct differences of their rows: whether rbf_kernel takes them (amx: AMX would take x), the
// rule beyond kRbfDirectMaxPairs that the gradient shares, and the n x m squared distances.
bool direct_cross_kernel(int64_t n, int64_t m, int64_t d, bool amx);
bool wide_direct(int64_t n, int64_t m, int64_t d);
std::vector<double> direct_sq_dists(const at::Tensor& x, const at::Tensor& y);

// amx.cpp: bf16 particles (fp32 ones under bf16 matmuls) on AMX tiles, from kAmxMinFeatures features.
bool use_amx(const at::Tensor& x);
bool use_amx_chunked(int64_t n, int64_t d);          // few particles there: by feature chunks
int64_t amx_chunked_min_features(int64_t n_pad);     // ... from this many features
int64_t amx_gram_max_particles(const at::Tensor& x); // the Gram path's rule on AMX shapes
bool svgd_step_by_amx(const at::Tensor& x, const at::Tensor& score, const std::optional<double>& bandwidth,
                      at::Tensor& out);
double median_by_amx(const at::Tensor& x);
at::Tensor rbf_kernel_by_amx(const at::Tensor& x, const at::Tensor& y, double h);  // y the same tensor: self
std::tuple<at::Tensor, at::Tensor> rbf_kernel_median_by_amx(const at::Tensor& x);
std::tuple<at::Tensor, at::Tensor, double> rbf_kernel_backward_by_amx(const at::Tensor& grad, const at::Tensor& x,
                                                                      const at::Tensor& y, const at::Tensor& kernel,
                                                                      double h, bool want_x, bool want_y,
                                                                      bool want_h);

}  // namespace bmt_fast::cpu
