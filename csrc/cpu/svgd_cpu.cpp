// CPU kernels of torch.ops.bmt_fast: threading, tiling and the BLAS calls around the SIMD loops of
// kernels.cpp. Two algorithms, both without any n x n buffer beyond one tile:
//
//   tiled (many particles): for each tile (I, J) of the upper triangle, S = xc_I xc_J^T by GEMM, turned
//     into K in place; acc_I += K W_J and acc_J += K^T W_I with W = [score - (2/H) xc | 1]. Then
//     phi = (acc[:, :d] + (2/H) acc[:, d] * xc) / n. Folding both terms into one W halves the GEMM work
//     of K @ [score | x]; symmetry halves the distance GEMMs: 3 n^2 d FLOPs instead of 6 n^2 d.
//   fused (many particles, d up to 256): the same sums without the tiles: a register block of 4 rows x 64
//     columns (AVX-512) of dot products by FMAs, K's entries there, then K W added into the rows' sums
//     (kernels.h: fused_step_rows); from 2048 particles by pairs of row blocks, K once per pair added into
//     both sides' sums (fused_step_pair).
//   gram (few particles, huge d): split-K Gram over column chunks (each chunk centred on the fly), a tiny
//     n x n K, then one memory-bound pass phi = (K/n) W + c * xc over the same chunks.
//   bf16 on AMX (many bf16 particles, d >= 32, a CPU with AMX tiles; fp32 ones too where torch's fp32
//     matmul precision is bf16): the tiled step, the median, rbf_kernel and its gradient through oneDNN's
//     brgemm on bf16-rounded operands (the CUDA tensor-core precision).

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <omp.h>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../bmt_fast.h"
#include "huge_pages.h"
#include "kernels.h"
#include "team.h"

namespace bmt_fast::cpu {
namespace {

// ---- shared helpers ----------------------------------------------------------------------------

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

// For its lifetime, the calling thread's OpenMP regions (ATen's parallel loops with the OpenMP backend, and
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
      : previous_(rows * cols * (features + 32) <= serial_max_work() ? initialised_max_threads() : 1) {
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
at::Tensor centring_shift(const at::Tensor& x_acc) {
  const at::Tensor first = x_acc.narrow(0, 0, 1);
  at::Tensor differences = empty_large(x_acc.sizes(), x_acc.options());
  at::sub_out(differences, x_acc, first);
  return first + differences.mean(0, /*keepdim=*/true);
}

// x - shift in the compute type acc (x of any floating dtype, widened in the subtraction), on huge pages
// when large: a call's centred copy, not paged in again by every call.
at::Tensor centred_by(const at::Tensor& x, const at::Tensor& shift, at::ScalarType acc) {
  at::Tensor xc = empty_large(x.sizes(), x.options().dtype(acc));
  return at::sub_out(xc, x, shift);
}

at::Tensor centred(const at::Tensor& x, at::ScalarType acc) {
  const at::Tensor xa = x.to(acc);
  return centred_by(xa, centring_shift(xa), acc);
}

// The rows' squared norms of centred particles (n), their squares through a huge-page temporary.
at::Tensor row_sq_norms(const at::Tensor& xc) {
  at::Tensor squares = empty_large(xc.sizes(), xc.options());
  return at::mul_out(squares, xc, xc).sum(1);
}

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

bool finite_norms(const at::Tensor& norms) {
  const at::Tensor c = norms.contiguous();
  return c.scalar_type() == at::kDouble ? all_finite(c.const_data_ptr<double>(), c.numel())
                                        : all_finite(c.const_data_ptr<float>(), c.numel());
}

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
bool keeps_dots(int64_t n, int64_t d, int64_t element_bytes, int64_t min_features) {
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

// The distance tiles of the medians below: tiles(visit) calls visit(tile, i0, j0, begin, end) for rows
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

// The same tiles from AMX (bf16 particles, svgd_cpu's AMX section): defined there.
struct AmxOperands;
struct AmxTiles {
  static constexpr int64_t kSelectMaxParticles = kMedianSelectMaxParticles;
  const AmxOperands& operands;
  float* kept = nullptr;  // or all n x n dot products, written as the tiles go by (row stride n)
  template <typename Visit>
  void operator()(Visit&& visit) const;
};

// Which op asks whether "auto" takes the few-particle Gram path: each has its own measured crossover.
enum class GramUse {
  kStep,          // svgd_step with H given
  kMedian,        // median_bandwidth, and svgd_step with the median rule (the same path gives both the same H)
  kKernel,        // rbf_kernel(x) (x on both sides); rbf_kernel_median takes one Gram pass where both
                  // kMedian and kKernel take the Gram path
};

// Whether the Gram path runs (defined with the AMX feature-chunk path, which takes some of its shapes).
bool use_gram(const at::Tensor& x, Algorithm algorithm, GramUse use);
bool prefers_gram(const at::Tensor& x, GramUse use);

// ---- tiled path ----------------------------------------------------------------------------------

// Exact numpy.median of all n*n squared distances (diagonal zeros included) by radix selection on the
// bit patterns of the distances: 16 bits per pass, each pass recomputing the distance tiles, so memory
// stays O(tile). Off-diagonal pairs count twice (D is symmetric), the diagonal adds n exact zeros.
template <typename T, typename Tiles>
double median_sq_dist_tiled(const at::Tensor& xc, const at::Tensor& norms, const Tiles& tiles) {
  using Key = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr int kKeyBits = 8 * sizeof(Key) - 1;  // the sign bit of a distance is always 0
  constexpr int kWidth = 16;
  const int64_t n = xc.size(0);
  const int64_t total = n * n;
  const std::array<int64_t, 2> ranks0{(total - 1) / 2, total / 2};  // equal when total is odd
  std::array<int64_t, 2> rank = ranks0;
  std::array<uint64_t, 2> prefix{0, 0};
  const T* nr = norms.data_ptr<T>();
  const int threads = at::get_num_threads();

  for (int fixed = 0; fixed < kKeyBits;) {
    RadixPass pass{};
    pass.width = std::min(kWidth, kKeyBits - fixed);
    pass.shift = kKeyBits - fixed - pass.width;
    pass.num_targets = prefix[0] == prefix[1] ? 1 : 2;
    pass.prefix[0] = prefix[0];
    pass.prefix[1] = prefix[1];
    const int64_t bins = int64_t(1) << pass.width;
    std::vector<std::vector<int64_t>> per_thread(threads, std::vector<int64_t>(pass.num_targets * bins, 0));
    tiles([&](const at::Tensor& tile, int64_t i0, int64_t j0, int64_t begin, int64_t end) {
      const int64_t cols = tile.size(1);
      radix_histogram(tile.data_ptr<T>(), cols, begin, end, cols, nr + i0, nr + j0, i0 == j0, 2, pass,
                      per_thread[at::get_thread_num()].data());
    });
    std::vector<int64_t> hist(pass.num_targets * bins, 0);
    for (const auto& h : per_thread)
      for (size_t b = 0; b < hist.size(); ++b) hist[b] += h[b];
    for (int t = 0; t < pass.num_targets; ++t)
      if (prefix[t] == 0) hist[t * bins] += n;  // the diagonal: key 0

    for (int target = 0; target < 2; ++target) {
      const int64_t* h = hist.data() + (pass.num_targets == 1 ? 0 : target) * bins;
      int64_t below = 0, bin = 0, last_nonempty = 0;
      for (; bin < bins; ++bin) {
        if (h[bin]) last_nonempty = bin;
        if (below + h[bin] > rank[target]) break;
        below += h[bin];
      }
      if (bin == bins) {  // cannot happen with deterministic GEMMs; stay within the data regardless
        bin = last_nonempty;
        below -= h[bin];
      }
      rank[target] -= below;
      prefix[target] = (prefix[target] << pass.width) | uint64_t(bin);
    }
    fixed += pass.width;
  }
  std::array<double, 2> value{};
  for (int t = 0; t < 2; ++t) {
    const Key key = static_cast<Key>(prefix[t]);
    T v;
    std::memcpy(&v, &key, sizeof(v));
    value[t] = static_cast<double>(v);
  }
  return 0.5 * (value[0] + value[1]);
}

// The k-th smallest (0-based) of non-negative values by radix selection on their bit patterns (which
// order like the values): 11-bit digits from the top, each pass keeping only the keys of the selected
// digit. Branch-free counting: std::nth_element was 5x slower on 32,640 distances on a 2-core VM. The
// distances share their top bits, so most keys of a pass fall in a few bins: kCopies histograms (key i
// counts in copy i % kCopies) keep each increment off the previous one's store, and the keys of the digit
// are kept without a branch (about half of them are, early on). fp32 median_bandwidth by the selection over
// all distances, one thread, alternating, 2 rounds (us): 512 x 8 (130,816 distances) 355-378 -> 293-303,
// 256 x 16 110-111 -> 94-96, 100 x 50 level. Up to kSelectByPartitionMax values a partition of the same
// keys instead (std::nth_element until a fourth 2026-12-05 session, select_key since): each radix pass
// clears and merges its 4 x 2048 bins, ~5 us of fixed cost a selection.
// Alone, on the distances of n random particles (2-core AMD EPYC, Zen 4, fp32, best of 5, us), radix /
// nth_element: n = 16 (120 values) 5.1 / 0.2, 32 5.9 / 0.6, 64 7.3 / 3.0, 96 10.3 / 8.8, 128 15.8 / 11.5,
// 192 28.6 / 40.6; in fp32 median_bandwidth (tiled), previous build / this one, 2 rounds: 64 x 16 16.0-16.2
// -> 12.1-12.3, 90 x 16 24.7-24.8 -> 21.5-22.2, 100 x 16 27.2-27.4 -> 24.4-24.5, 120 x 16 32.4-33.0 ->
// 31.4-31.5, but 128 x 16 35.3-35.4 -> 39.2 (the op's own order of the distances), hence the bound (n <=
// 111). The keys compare without the sign bit, as the radix passes read them: the same value, NaN included
// (whose comparisons as floats would break nth_element's ordering). (Those nth_element timings were best of 5
// on the same distances, which branch predictors learn. On fresh distances for every call, fp32
// median_bandwidth, 2 threads, PASSIVE, Zen 5 VM, nth_element -> select_key (us): 32 x 2 8.8-9.3 -> 6.5-6.8,
// 48 x 8 12.0-12.8 -> 6.9-7.3, 64 x 16 18.4-19.8 -> 9.5-10.0, 100 x 16 40-43 -> 18, 111 x 16 45-49 -> 18, 256 x
// 16 (its window's sample) 67-75 -> 42-44; fp64 alike. select_key for all sizes (no radix) was level or
// slower from 128 x 16 (8128 values: 23 against 23-25 us) to 512 x 300, hence the bound stays.)
constexpr size_t kSelectByPartitionMax = 6144;

// The k-th smallest of the keys (their bits without the sign bit: keys is overwritten) by quickselect whose
// three-way partitions write each key to both ends of a second buffer and advance the end it belongs to, so
// that no branch depends on a key (std::nth_element's comparisons were mispredicted about half of the time
// on distances: in perf of a Gram step of 32 x 2 particles by the median rule, one thread, 2-core AMD EPYC
// Zen 5, it took 24 % of the step). The pivot is the median of three keys; after kMaxRounds rounds (or
// below kSmall keys) std::nth_element finishes.
template <typename Key>
Key select_key(std::vector<Key>& keys, int64_t k_in) {
  constexpr Key kMagnitude = std::numeric_limits<Key>::max() >> 1;
  constexpr size_t kSmall = 32;
  constexpr int kMaxRounds = 48;
  for (Key& key : keys) key &= kMagnitude;
  std::vector<Key> other(keys.size());
  Key* buffers[2] = {keys.data(), other.data()};
  int at = 0;          // the buffer holding the live keys, from `offset`
  size_t offset = 0, m = keys.size(), k = static_cast<size_t>(k_in);
  for (int round = 0; m > kSmall && round < kMaxRounds; ++round) {
    const Key* src = buffers[at] + offset;
    Key* dst = buffers[1 - at];
    const Key a = src[m / 4], b = src[m / 2], c = src[3 * m / 4];
    const Key pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));
    size_t below = 0, above = 0;  // keys < pivot go to dst's front, keys > pivot to its back
    for (size_t i = 0; i < m; ++i) {
      const Key v = src[i];
      dst[below] = v;
      dst[m - 1 - above] = v;
      below += v < pivot;
      above += v > pivot;
    }
    at = 1 - at;
    if (k < below) {
      offset = 0;
      m = below;
    } else if (k >= m - above) {
      k -= m - above;
      offset = m - above;
      m = above;
    } else {
      return pivot;
    }
  }
  Key* live = buffers[at] + offset;
  std::nth_element(live, live + k, live + m);
  return live[k];
}

template <typename T>
T select_nonnegative(const std::vector<T>& values, int64_t k) {
  using Key = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr int kDigit = 11, kCopies = 4;
  constexpr int64_t kBins = int64_t{1} << kDigit;
  std::vector<Key> keys(values.size());
  std::memcpy(keys.data(), values.data(), values.size() * sizeof(T));
  if (keys.size() <= kSelectByPartitionMax) {
    const Key key = select_key(keys, k);
    T value;
    std::memcpy(&value, &key, sizeof(T));
    return value;
  }
  std::vector<int64_t> hist(kCopies * kBins);
  int low_bits = 8 * sizeof(Key) - 1;  // bits below the selected prefix (the sign bit is 0)
  size_t count = keys.size();
  while (true) {
    const int width = std::min(kDigit, low_bits);
    const int shift = low_bits - width;
    const Key mask = (Key{1} << width) - 1;
    std::fill(hist.begin(), hist.end(), 0);
    size_t i = 0;
    for (; i + kCopies <= count; i += kCopies)
      for (int c = 0; c < kCopies; ++c) ++hist[c * kBins + ((keys[i + c] >> shift) & mask)];
    for (; i < count; ++i) ++hist[(keys[i] >> shift) & mask];
    for (int c = 1; c < kCopies; ++c)
      for (int64_t b = 0; b <= static_cast<int64_t>(mask); ++b) hist[b] += hist[c * kBins + b];
    Key digit = 0;
    while (k >= hist[digit]) k -= hist[digit++];
    size_t kept = 0;  // the keys of that digit (their higher bits all match the prefix already)
    for (size_t j = 0; j < count; ++j) {
      const Key key = keys[j];
      keys[kept] = key;
      kept += ((key >> shift) & mask) == digit;
    }
    count = kept;
    low_bits = shift;
    if (low_bits == 0 || count == 1) break;  // every key left is the answer
  }
  T value;
  std::memcpy(&value, &keys[0], sizeof(T));
  return value;
}

// The two middle ranks of numpy.median over the n^2 squared distances, as ranks among the n(n-1)/2 upper
// values: the n diagonal zeros come first (no distance is below 0), then each upper value twice, so rank
// r >= n is the ((r - n) / 2)-th smallest upper value; -1 for a diagonal zero (only n = 2).
std::pair<int64_t, int64_t> middle_ranks(int64_t n) {
  const int64_t total = n * n, r0 = (total - 1) / 2, r1 = total / 2;
  return {r0 < n ? -1 : (r0 - n) / 2, (r1 - n) / 2};
}

// The mean of the k0-th and k1-th smallest values (k1 - k0 <= 1; k0 < 0 stands for a diagonal zero below
// all of them): the numpy.median of the n^2 distances from the ranks among the stored ones.
template <typename T>
double middle_of(const std::vector<T>& values, int64_t k0, int64_t k1) {
  if (k0 < 0) return 0.5 * static_cast<double>(select_nonnegative(values, k1));
  const T low = select_nonnegative(values, k0);
  T high = low;
  if (k1 != k0) {  // k1 = k0 + 1: low again if more than k1 values are <= low, else the next value up
    // One branch-free pass (four independent chains) instead of a second selection: about half the values
    // exceed low, so a branch on that is mispredicted half of the time.
    constexpr int kChains = 4;
    const T inf = std::numeric_limits<T>::infinity();
    int64_t at_most[kChains] = {};
    T above[kChains] = {inf, inf, inf, inf};
    const size_t m = values.size();
    size_t i = 0;
    for (; i + kChains <= m; i += kChains)
      for (int c = 0; c < kChains; ++c) {
        const T v = values[i + c];
        at_most[c] += v <= low;
        above[c] = std::min(above[c], v > low ? v : inf);
      }
    for (; i < m; ++i) {
      at_most[0] += values[i] <= low;
      above[0] = std::min(above[0], values[i] > low ? values[i] : inf);
    }
    const int64_t count = at_most[0] + at_most[1] + at_most[2] + at_most[3];
    high = count > k1 ? low : std::min({above[0], above[1], above[2], above[3]});
  }
  return 0.5 * (static_cast<double>(low) + static_cast<double>(high));
}

// numpy.median of the n x n squared distances `dist` (row-major, zeros on the diagonal, symmetric: the Gram
// path's), NaN if any is not finite: selected among the n(n-1)/2 upper values by their ranks (middle_ranks),
// not among all n^2 (an nth_element over a copy of all of them was ~7 of the ~17 us of a step of 32 x 2
// particles by the median rule, one thread, 2-core AMD EPYC Zen 5; the same value: order statistics).
double median_of_gram_dists(const std::vector<double>& dist, int64_t n) {
  if (n < 2) return 0.0;
  std::vector<double> upper;
  upper.reserve(static_cast<size_t>(n * (n - 1) / 2));
  for (int64_t i = 0; i < n; ++i) upper.insert(upper.end(), dist.begin() + i * n + i + 1, dist.begin() + (i + 1) * n);
  if (!all_finite(upper.data(), static_cast<int64_t>(upper.size()))) return kNaN;
  const auto [k0, k1] = middle_ranks(n);
  return middle_of(upper, k0, k1);
}

// The window's values as the threads collect them: each adds what its scratch holds (got values, under of
// them below the window) at the next free place, or marks an overflow past `capacity`.
template <typename T>
class WindowSink {
 public:
  explicit WindowSink(int64_t capacity) : capacity_(capacity), window_(static_cast<size_t>(capacity)) {}
  void add(const T* scratch, int64_t got, int64_t under) {
    below_ += under;
    const int64_t at = filled_.fetch_add(got);
    if (at + got > capacity_) {
      overflow_ = true;
    } else if (got > 0) {
      std::memcpy(window_.data() + at, scratch, static_cast<size_t>(got) * sizeof(T));
    }
  }
  // The values and the count below them; std::nullopt after an overflow. *count: how many were in the window.
  std::optional<std::pair<std::vector<T>, int64_t>> finish(int64_t* count) {
    if (count) *count = filled_.load();
    if (overflow_.load()) return std::nullopt;
    window_.resize(static_cast<size_t>(filled_.load()));
    return std::make_pair(std::move(window_), below_.load());
  }

 private:
  int64_t capacity_;
  std::vector<T> window_;
  std::atomic<int64_t> filled_{0}, below_{0};
  std::atomic<bool> overflow_{false};
};

// The distances of the tiles' upper triangle (as the radix passes compute them) that lie in [lo, hi], and
// how many lie below lo, in one pass (each thread's rows through its own scratch first); std::nullopt when
// more than `capacity` lie in [lo, hi]. How many do is written to *count unless it is null.
template <typename T, typename Tiles>
std::optional<std::pair<std::vector<T>, int64_t>> collect_between(const at::Tensor& norms, const Tiles& tiles, T lo,
                                                                  T hi, int64_t capacity, int64_t* count = nullptr) {
  WindowSink<T> sink(capacity);
  const T* nr = norms.data_ptr<T>();
  tiles([&](const at::Tensor& tile, int64_t i0, int64_t j0, int64_t begin, int64_t end) {
    const int64_t cols = tile.size(1);
    thread_local std::vector<T> scratch;  // grown once per thread, not zeroed per chunk
    if (scratch.size() < static_cast<size_t>((end - begin) * cols)) scratch.resize((end - begin) * cols);
    int64_t under = 0;
    const int64_t got = window_collect(tile.data_ptr<T>(), cols, begin, end, cols, nr + i0, nr + j0, i0 == j0, lo,
                                       hi, &under, scratch.data());
    sink.add(scratch.data(), got, under);
  });
  return sink.finish(count);
}

// ---- the fused step's operands and distances -------------------------------------------------------

// Whether the many-particle step may take the fused kernel and its median the fused distances (both below),
// unless BMT_FAST_CPU_FUSED=0 (read once).
bool fused_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("BMT_FAST_CPU_FUSED");
    return env == nullptr || std::string_view(env) != "0";
  }();
  return enabled;
}

// The features up to which the step and the median take the fused kernels (use_fused, use_fused_median).
constexpr int64_t kFusedMaxFeatures = 256;

// The fused kernels' operands of x (kernels.h: fused_step_shift, fused_step_pack): xc, norms (n_pad entries,
// +inf past n) and the packed columns xt, in T; W too once pack_w has run.
template <typename T>
struct FusedOperands {
  int64_t n, d, n_pad;
  at::Tensor xs, shift, xc, norms, xt, w;

  explicit FusedOperands(const at::Tensor& x)
      : n(x.size(0)), d(x.size(1)), n_pad((n + kFusedPack - 1) / kFusedPack * kFusedPack),
        xs(x.to(c10::CppTypeToScalarType<T>::value).contiguous()) {
    const auto options = xs.options();
    shift = at::empty({d}, options);
    xc = at::empty({n, d}, options);
    norms = at::empty({n_pad}, options);
    xt = at::empty({n_pad * d}, options);
    std::vector<double> sums(d);
    fused_step_shift(xs.data_ptr<T>(), n, d, sums.data(), shift.data_ptr<T>());
    pack(nullptr, 0.0);
  }
  // W = score - a xc (score in T, contiguous) as fused_step_rows reads it, from the xc already packed.
  void pack_w(const at::Tensor& score, double a) {
    const int64_t width = d <= kFusedLaneMaxFeatures ? d : (d + kFusedWidth - 1) / kFusedWidth * kFusedWidth;
    w = at::empty({n_pad * width}, xs.options());
    pack(score.data_ptr<T>(), a);
  }
  at::Tensor real_norms() const { return norms.narrow(0, 0, n); }

 private:
  void pack(const T* score, double a) {
    parallel_for(0, n_pad / kFusedPack, 1, [&](int64_t begin, int64_t end) {
      fused_step_pack(xs.data_ptr<T>(), score, n, d, shift.data_ptr<T>(), static_cast<T>(a), begin, end,
                      xc.data_ptr<T>(), norms.data_ptr<T>(), xt.data_ptr<T>(), score ? w.data_ptr<T>() : nullptr);
    });
  }
};

// The fused distances (FusedTiles) take the selection over all distances up to kFusedSelectMaxParticles
// particles, the window beyond (its pass compares and keeps them in registers, so the selection over a few
// of them costs less than over all). fp32 median_bandwidth, one thread, alternating, 3 rounds, selection ->
// window (us): 80 x 10 26-27 -> 32-34, 100 x 50 36-37 -> 42-43, 128 x 16 36-38 -> 39, 128 x 128 level, 150 x
// 150 101-108 -> 99-102, 180 x 30 64-67 -> 57-58, 256 x 3 87-88 -> 53-54; 512 x 8 (2 rounds, the window's
// sample then sized for d + 32 features per draw) 297-300 -> 195-197.
constexpr int64_t kFusedSelectMaxParticles = 128;

// The median's tiles from the fused operands: each tile's dot products by the fused kernel's register
// blocks (fused_dot_rows), so that the radix passes and the selection see a pair's distance as the fused
// window pass (collect_between below) computes it. One tile at a time, its rows split across the threads.
template <typename T>
struct FusedTiles {
  static constexpr int64_t kSelectMaxParticles = kFusedSelectMaxParticles;
  const FusedOperands<T>& ops;
  template <typename Visit>
  void operator()(Visit&& visit) const {
    const int64_t n = ops.n, block = std::min(n, kTileSize);
    at::Tensor buffer = at::empty({block * block}, ops.xc.options());
    for (int64_t i0 = 0; i0 < n; i0 += block) {
      const int64_t rows = std::min(block, n - i0);
      for (int64_t j0 = i0; j0 < n; j0 += block) {
        const int64_t cols = std::min(block, n - j0);
        at::Tensor tile = buffer.narrow(0, 0, rows * cols).view({rows, cols});
        parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
          fused_dot_rows(ops.xc.template data_ptr<T>(), ops.xt.template data_ptr<T>(), ops.d, i0 + begin, i0 + end,
                         j0, cols, tile.data_ptr<T>() + begin * cols, cols);
          visit(tile, i0, j0, begin, end);
        });
      }
    }
  }
};

// collect_between without tiles: the fused window pass (fused_window_rows) over groups of 16 rows, one parallel
// region for all of them (the GEMM tiles took two per tile, each waking the threads). The groups go to the
// threads alternately from both ends of the triangle, so that their shares of its pairs are even. Each thread
// takes its groups through one block of columns at a time, whose packed xt (at most kFusedWindowBlockBytes)
// stays in L2 meanwhile: a group streaming all columns read them from memory once per 16 rows where xt
// outgrew L2. fp32 median_bandwidth, 2 threads, PASSIVE, alternating, 2 rounds, the previous build (all
// columns, no team) -> blocks (ms): 4096 x 64 6.66-6.77 -> 6.50-6.52, 8192 x 64 25.4-26.9 -> 21.1-21.7,
// 16,384 x 64 134 -> 76, 16,384 x 3 33.2-33.8 -> 32.8, 8192 x 16 level; all columns -> blocks 4096 x 128
// 12.2-12.7 -> 9.9-10.1.
constexpr int64_t kFusedWindowBlockBytes = int64_t{512} << 10;

template <typename T>
std::optional<std::pair<std::vector<T>, int64_t>> collect_between(const at::Tensor&, const FusedTiles<T>& tiles,
                                                                  T lo, T hi, int64_t capacity,
                                                                  int64_t* count = nullptr) {
  constexpr int64_t kGroup = 16;
  const FusedOperands<T>& ops = tiles.ops;
  const int64_t groups = (ops.n + kGroup - 1) / kGroup;
  const int64_t fit = kFusedWindowBlockBytes / (ops.d * int64_t{sizeof(T)}) / kFusedPack * kFusedPack;
  const int64_t block_cols = std::min(ops.n_pad, std::max<int64_t>(kFusedPack, fit));
  WindowSink<T> sink(capacity);
  parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<T> scratch;  // room for a group's values and a whole vector past them
    const size_t room = static_cast<size_t>(kGroup * block_cols + 64);
    if (scratch.size() < room) scratch.resize(room);
    for (int64_t c0 = 0; c0 < ops.n_pad; c0 += block_cols) {
      const int64_t c1 = std::min(ops.n_pad, c0 + block_cols);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t g = t % 2 == 0 ? t / 2 : groups - 1 - t / 2;
        const int64_t r0 = g * kGroup, r1 = std::min(ops.n, r0 + kGroup);
        if (r0 >= c1) continue;  // (no column j > i in the block)
        int64_t under = 0;
        const int64_t got = fused_window_rows(ops.xc.template data_ptr<T>(), ops.xt.template data_ptr<T>(),
                                              ops.norms.template data_ptr<T>(), ops.n, ops.d, lo, hi, r0, r1, c0, c1,
                                              &under, scratch.data());
        sink.add(scratch.data(), got, under);
      }
    }
  });
  return sink.finish(count);
}

// The same median for up to kMedianSelectMaxParticles particles, by selection over all n(n-1)/2 distances
// of the upper triangle, collected from the tiles in one pass: there the radix passes' histograms over
// recomputed tiles (2^16 bins per target and thread, zeroed and summed per pass) cost more than all the
// distances. (On the AMX path the tiles' dot products come from AMX, not from an fp32 GEMM of an fp32
// copy of the rounded particles: 256 x 76,800 was a 10 GFLOP fp32 GEMM.)
template <typename T, typename Tiles>
double median_sq_dist_select(int64_t n, const at::Tensor& norms, const Tiles& tiles) {
  if (n < 2) return 0.0;
  const int64_t m = n * (n - 1) / 2;
  // (every distance is in [0, inf]: clamped at 0 as computed, NaN included)
  auto [upper, below] = *collect_between<T>(norms, tiles, T(0), std::numeric_limits<T>::infinity(), m);
  TORCH_INTERNAL_ASSERT(static_cast<int64_t>(upper.size()) == m && below == 0);
  const auto [k0, k1] = middle_ranks(n);
  return middle_of(upper, k0, k1);
}

// How many pairs the median's window samples among m pairs of d features (distances of sizeof_t bytes). A
// sample's distance reads two rows (time ~ d + 200 features: its draw and the random rows' start-up), and the
// window then holds about 4 m / sqrt(samples) distances, each compared, kept and selected over (~11 ns on a
// 2-core Xeon against ~0.1 ns per feature of a sample): the sum of the two is least near (2 * 11 / 0.1 * m /
// (d + 200))^(2/3) samples. (d + 32 until the fused window pass and selection got cheaper per value: fp32,
// 2 threads, PASSIVE, alternating, d + 32 -> d + 200 (us): 256 x 16 81-83 -> 63-66, 512 x 8 199-209 ->
// 138-144, 1024 x 3 451-452 -> 352-365, 4096 x 3 3980-4040 -> 2870, 16,384 x 3 31,600-33,400 ->
// 27,900-28,100, 512 x 64 280-285 -> 251-257; 4096 x 64, 4096 x 256, 1024 x 128 level.) 2-core Xeon
// (Emerald Rapids), median_bandwidth, samples -> ms: bf16 1024 x 8192 256 -> 18.6, 1024 -> 20.4, 4096 ->
// 26.3, 16384 -> 34.4 (16 sqrt(m), the rule before: 11.6k); 4096 x 768 1024 -> 25.3, 4096 -> 20.9, 16384 ->
// 17.5, 65536 -> 20.4; 8192 x 128 4096 -> 42.1, 16384 -> 26.4, 65536 -> 21.7; fp32 1024 x 8192 256 -> 65.9,
// 16384 -> 81.8. At least enough that the window fits in kMedianWindowMaxBytes (with a margin), and at most
// kMedianWindowMaxSamples (beyond, the radix passes).
inline int64_t median_window_samples(int64_t m, int64_t d, size_t sizeof_t) {
  const double pairs = static_cast<double>(m);
  const double balanced = std::pow(220.0 * pairs / static_cast<double>(d + 200), 2.0 / 3.0);
  const double fits =
      std::pow(8.0 * pairs * static_cast<double>(sizeof_t) / static_cast<double>(kMedianWindowMaxBytes), 2.0);
  const double samples =
      std::clamp(std::max(fits, balanced), 256.0, static_cast<double>(kMedianWindowMaxSamples));
  return std::min<int64_t>(m, static_cast<int64_t>(samples));
}

// The same median by one pass over the tiles for more particles: a sample of pairs brackets the two middle
// ranks with [lo, hi] (their sample quantiles widened by 4 standard deviations of a sample quantile), one
// pass counts the distances below lo and keeps those in [lo, hi], and the selection finishes in that
// window. The values selected are the tiles' own distances (window_collect computes them as the radix
// passes do), so the result is exact whatever the sample; the sample only decides the window's width.
// std::nullopt when the window missed a middle rank or would hold more than kMedianWindowMaxBytes: the
// caller then takes the radix passes. BMT_FAST_MEDIAN_WINDOW=0 skips this (A/B and tests); =require makes
// a miss an error instead (tests: that the window, not the fallback, gave the result).
template <typename T, typename Tiles>
std::optional<double> median_sq_dist_window(const at::Tensor& xc, const at::Tensor& norms, const Tiles& tiles) {
  if (const char* env = std::getenv("BMT_FAST_MEDIAN_WINDOW"); env != nullptr && std::string_view(env) == "0")
    return std::nullopt;
  const int64_t n = xc.size(0), d = xc.size(1);
  const int64_t m = n * (n - 1) / 2;
  const auto [k0, k1] = middle_ranks(n);
  if (k0 < 0) return std::nullopt;

  // The sample: pairs i < j from a fixed-seed generator (the result does not depend on it).
  const int64_t samples = median_window_samples(m, d, sizeof(T));
  std::vector<int64_t> first(samples), second(samples);
  uint64_t state = 0x9E3779B97F4A7C15ull;
  auto next = [&state] {  // splitmix64
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  };
  // (A draw's top bits scaled to [0, count) by a multiply: a 64-bit division per draw, as `%` took, was an
  // eighth of median_bandwidth at 4096 x 3.)
  auto draw_below = [&next](int64_t count) {
    return static_cast<int64_t>((static_cast<unsigned __int128>(next()) * static_cast<uint64_t>(count)) >> 64);
  };
  for (int64_t t = 0; t < samples; ++t) {
    int64_t i = draw_below(n);
    int64_t j = draw_below(n - 1);
    j += j >= i;  // j != i, uniform over the other rows
    first[t] = std::min(i, j);
    second[t] = std::max(i, j);
  }
  std::vector<T> sample(samples);
  const int64_t block = 4096;
  parallel_for(0, (samples + block - 1) / block, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t t0 = c * block, count = std::min(block, samples - t0);
      if constexpr (std::is_same_v<T, float>) {
        if (xc.scalar_type() == at::kBFloat16) {  // (the AMX path's rounded particles)
          pair_sq_dists(xc.const_data_ptr<at::BFloat16>(), d, norms.const_data_ptr<float>(), first.data() + t0,
                        second.data() + t0, count, sample.data() + t0);
          continue;
        }
      }
      pair_sq_dists(xc.data_ptr<T>(), d, norms.data_ptr<T>(), first.data() + t0, second.data() + t0, count,
                    sample.data() + t0);
    }
  });
  const double spread = 4.0 * 0.5 / std::sqrt(static_cast<double>(samples));  // 4 sd of a quantile near 1/2
  const double lo_at = (static_cast<double>(k0) / m - spread) * samples;
  const double hi_at = (static_cast<double>(k1 + 1) / m + spread) * samples;
  const T lo = lo_at < 0 ? T(0) : select_nonnegative(sample, static_cast<int64_t>(lo_at));
  const T hi = hi_at >= samples - 1 ? std::numeric_limits<T>::infinity()
                                    : select_nonnegative(sample, static_cast<int64_t>(std::ceil(hi_at)));
  const double expected = std::min(1.0, (hi_at - lo_at) / samples) * static_cast<double>(m);
  const int64_t capacity = static_cast<int64_t>(1.5 * expected) + 4096;  // the count varies by ~20 % (4 sd)
  if (capacity * static_cast<int64_t>(sizeof(T)) > kMedianWindowMaxBytes) return std::nullopt;

  // With ties the bracket can hold more than the room made for it (a value repeated at the median): then a
  // second pass with room for all of them, where that stays within kMedianWindowMaxBytes.
  int64_t inside = 0;
  auto collected = collect_between<T>(norms, tiles, lo, hi, capacity, &inside);
  if (!collected && inside * static_cast<int64_t>(sizeof(T)) <= kMedianWindowMaxBytes)
    collected = collect_between<T>(norms, tiles, lo, hi, inside);
  if (!collected) return std::nullopt;
  const auto& [window, under] = *collected;
  const int64_t count = static_cast<int64_t>(window.size());
  if (under > k0 || k1 >= under + count) return std::nullopt;
  return middle_of(window, k0 - under, k1 - under);
}

// The exact median of the n^2 squared distances of the tiled path (the rows of xc with these norms; the
// tiles, from GEMMs on xc unless given, compute the same dot products): by selection over all distances up
// to the tiles' kSelectMaxParticles, by the window beyond, the radix passes where it misses.
template <typename T, typename Tiles>
double median_sq_dist(const at::Tensor& xc, const at::Tensor& norms, const Tiles& tiles) {
  if (!finite_norms(norms)) return kNaN;
  if (xc.size(0) <= Tiles::kSelectMaxParticles) return median_sq_dist_select<T>(xc.size(0), norms, tiles);
  if (const std::optional<double> median = median_sq_dist_window<T>(xc, norms, tiles)) return *median;
  const char* env = std::getenv("BMT_FAST_MEDIAN_WINDOW");
  TORCH_CHECK(env == nullptr || std::string_view(env) != "require",
              "bmt_fast: the median's window missed (BMT_FAST_MEDIAN_WINDOW=require)");
  return median_sq_dist_tiled<T>(xc, norms, tiles);
}

// Whether the GEMM path's median (median_bandwidth, and the step and rbf_kernel by the median rule) takes the
// fused distances: up to kFusedMaxFeatures features (beyond, the GEMM tiles of centred(x)). fp32, 2 threads,
// 2-core Xeon VM (CPUID model 167), PASSIVE, median_bandwidth, alternating, GEMM tiles -> fused (ms): 600 x 32
// 0.70-0.72 -> 0.42, 1024 x 3 0.99-1.01 -> 0.63-0.64, 4096 x 3 8.3-8.7 -> 4.4-4.5, 16,384 x 3 108-109 -> 36-37,
// 2048 x 100 4.3-4.4 -> 2.6, 4096 x 64 11.5-12.0 -> 6.3-6.4, 4096 x 127 15.4-15.7 -> 11.9. From 128 features
// (where a step had kept the median pass's GEMM tiles for K) once the passes took one team (team.h) and the
// window pass blocks of columns (2-3 rounds; feature chunks up to 512 particles): 256 x 128 0.64-0.72 ->
// 0.25, 256 x 256 0.89-1.08 -> 0.43-0.45, 1024 x 128 2.11-2.20 -> 1.17-1.20, 1024 x 256 2.69-3.45 ->
// 1.87-1.89, 2048 x 192 5.99-6.05 -> 4.25-4.42, 4096 x 192 18.5-18.8 -> 13.2-13.4, 4096 x 256 22.3-28.2 ->
// 17.1-17.2, 8192 x 128 51.8 -> 34.1, 8192 x 256 79.1-80.5 -> 61.6-61.9, 16,384 x 128 194-195 -> 125; the
// step by the median rule (its K then by the fused step, no kept tiles) 1024 x 256 6.8-8.5 -> 5.1, 4096 x 192
// 59-61 -> 46, 8192 x 128 138 -> 121-126, 8192 x 256 252-255 -> 232-244, 16,384 x 128 527-543 -> 462-463.
bool use_fused_median(int64_t d) { return fused_enabled() && d <= kFusedMaxFeatures; }

// The exact median of the n^2 squared distances of x's rows on the GEMM path (fp32 / fp64 x, computed in T): by
// the fused distances (use_fused_median), else by GEMM tiles of centred(x).
template <typename T>
double gemm_path_median(const at::Tensor& x) {
  if (use_fused_median(x.size(1))) {
    double median = 0.0;
    run_team([&] {  // (team.h: the passes' loops wake the threads once)
      const FusedOperands<T> ops(x);
      median = median_sq_dist<T>(ops.xc, ops.real_norms(), FusedTiles<T>{ops});
    });
    return median;
  }
  const at::Tensor xc = centred(x, c10::CppTypeToScalarType<T>::value);
  return median_sq_dist<T>(xc, row_sq_norms(xc), GemmTiles{xc});
}

// Whether rbf_kernel(x) on the GEMM path (and rbf_kernel_median, which must give its bits) takes
// rbf_kernel_self_tiles rather than one n x n GEMM: where the products saved (a quarter of them at n = 1024,
// 3/8 at 2048, 7/16 at 4096) outweigh the tiles' copies. 2-core Xeon, fp32, alternating (ms, full GEMM ->
// tiles): 4096 x 128 14-16 -> 19-20, 1024 x 128 1.1 -> 2.0, 2048 x 256 6.5-7.3 -> 7.9-8.5, 1024 x 512 3.5 ->
// 4.4, 512 x 1024 2.2 -> 2.7, 600 x 8192 21-25 -> 21-29, 1024 x 2048 13-15 -> 13-17, 2048 x 512 level,
// 4096 x 512 52-58 -> 42-47, 2048 x 2048 49-51 -> 38-44, 4096 x 768 78-81 -> 58-63, 1024 x 8192 74-77 ->
// 67-70. With the median (rbf_kernel_median, the median's tiles kept): 1024 x 8192 139-146 -> 68-72.
bool self_kernel_by_tiles(int64_t n, int64_t d) { return (n > 1536 && d >= 512) || (n >= 1024 && d >= 4096); }

// A self kernel on the GEMM path from the tiles of the upper triangle of xc xc^T (for_each_upper_tile, or
// the median pass's kept ones): each tile turned into K in place and written with its transpose below it
// (about half of a full GEMM's products), the diagonal blocks' lower halves the transposes of their upper ones;
// K exactly symmetric, its diagonal 1. In xc's dtype.
template <typename T>
at::Tensor rbf_kernel_self_tiles(const at::Tensor& xc, const at::Tensor& norms, double h, at::Tensor* kept) {
  const int64_t n = xc.size(0);
  at::Tensor k = empty_large({n, n}, xc.options());
  const T* nr = norms.const_data_ptr<T>();
  const T inv_h = static_cast<T>(1.0 / h);
  for_each_upper_tile(xc, [&](at::Tensor& tile, int64_t i0, int64_t j0) {
    const int64_t rows = tile.size(0), cols = tile.size(1);
    parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      rbf_from_dots(tile.mutable_data_ptr<T>(), cols, begin, end, cols, nr + i0, nr + j0, inv_h);
    });
    if (i0 == j0) {
      k.narrow(0, i0, rows).narrow(1, j0, cols).copy_(at::triu(tile) + at::triu(tile, 1).t());
    } else {
      k.narrow(0, i0, rows).narrow(1, j0, cols).copy_(tile);
      k.narrow(0, j0, cols).narrow(1, i0, rows).copy_(tile.t());
    }
  }, kept ? Kept::kRead : Kept::kNone, kept);
  return k.fill_diagonal_(1.0);
}

// ---- few particles with many features: the Gram pass by feature chunks --------------------------

// All n x n dot products in one tile, for the median's selection.
struct DotsTiles {
  const at::Tensor& dots;
  template <typename Visit>
  void operator()(Visit&& visit) const {
    parallel_for(0, dots.size(0), 16, [&](int64_t begin, int64_t end) { visit(dots, 0, 0, begin, end); });
  }
};

// A Gram pass by feature chunks: the shift (d: each chunk's column means), the squared norms of the centred
// rows (n) and all their dot products (n x n), in the pass's compute type (AMX: fp32, of the rounded
// particles; the GEMM path: x's accumulation type).
struct ChunkedGram {
  at::Tensor shift, norms, dots;
};

// The median of the n^2 squared distances from a chunked Gram pass (n <= 512: by selection).
double median_sq_dist_chunked(const ChunkedGram& gram) {
  if (!finite_norms(gram.norms)) return kNaN;
  const int64_t n = gram.norms.size(0);
  if (gram.dots.scalar_type() == at::kDouble) return median_sq_dist_select<double>(n, gram.norms, DotsTiles{gram.dots});
  return median_sq_dist_select<float>(n, gram.norms, DotsTiles{gram.dots});
}

// (A chunked Gram pass's parts take at most this much memory: parts = threads up to it, so that a many-core
// CPU's partial sums stay small next to the particles.)
constexpr int64_t kGramPartsMaxBytes = int64_t{16} << 20;

int64_t amx_chunked_min_features(int64_t n_pad);  // (the AMX chunks' rule: with them below)

// (The gradient's rule, use_gemm_chunked: with rbf_kernel_backward_gemm_chunked.)
constexpr int64_t kGemmChunkedMaxRows = 512;
constexpr int64_t kGemmChunkedMinFeatures = 4096;
constexpr int64_t kGemmChunkFeatures = 512;

// The forward passes' chunk width: kGemmChunkFeatures, or less (a multiple of 64 features, at least 256)
// where that gives every thread an equal share. (Narrower chunks made the partial sums cost more than the
// balance gained: 512 x 128 in two chunks of 64, 0.29 -> 0.42 ms; one chunk lets the GEMM thread itself.)
int64_t gemm_chunk_features(int64_t d) {
  const int64_t threads = at::get_num_threads();
  const int64_t share = ((d + threads - 1) / threads + 63) / 64 * 64;
  return share < 256 ? kGemmChunkFeatures : std::min(share, kGemmChunkFeatures);
}

bool use_gemm_chunked(int64_t rows, int64_t d) {
  const int64_t rows_pad = (rows + 31) / 32 * 32;
  return rows <= kGemmChunkedMaxRows && d >= std::max(kGemmChunkedMinFeatures, amx_chunked_min_features(rows_pad));
}

// Where a self kernel's forward passes on the GEMM path (svgd_step, rbf_kernel(x), the median) go by feature
// chunks: up to kChunkedMaxParticles particles (their n x n sums per thread stay in L2), from
// kChunkedMinFeatures features (below, level with one GEMM). 2-core Xeon (Emerald Rapids), fp32, fixed H,
// alternating, 3 rounds, the tiled path (the step: and its scan of phi) -> chunks (ms): rbf_kernel(x)
// 128 x 76,800 22.5-22.8 -> 12.1-12.3, 256 x 76,800 62.0-63.1 -> 39.0-39.9, 512 x 20,000 45.7-47.8 ->
// 36.7-37.6, 300 x 4096 3.55-3.57 -> 3.02-3.14, 256 x 768 0.49-0.51 -> 0.44-0.46, 128 x 128 0.061 ->
// 0.057-0.059, 512 x 128 0.32-0.33 -> 0.34; the step 128 x 76,800 72-77 -> 34-35, 256 x 76,800 192-193 ->
// 102-105, 512 x 20,000 121-129 -> 86-88, 300 x 4096 9.8 -> 6.8-7.2, 256 x 768 1.34-1.37 -> 1.01-1.08,
// 128 x 128 0.156-0.162 -> 0.112-0.114, 512 x 128 0.78-0.91 -> 0.70-0.71. Up to 1024 particles with 4 or
// more features per particle too (kChunkedWide*; the sums leave L2 there, and the median selects over all
// n(n-1)/2 distances). Same machine, against the previous build, 3 rounds, kernel / step with H given /
// step by the median rule / median_bandwidth (ms): 1000 x 16,000 128-130 -> 74-88 / 258-262 -> 194-204 /
// 250-266 -> 195-214 / 101-114 -> 76-84; 768 x 3072 14.0-16.9 -> 9.0-9.9 / 29.4-31.5 -> 22.1-24.3 /
// 31.4-32.2 -> 25.5-26.9; 1024 x 4096 28.0-31.1 -> 22.3-25.4 / 60.7-65.4 -> 54.6-57.1 / 64.2-67.3 ->
// 60.2-64.0 / level; 600 x 2400 7.4-7.8 -> 5.5-6.5 / 16.0-16.7 -> 14.4-15.7 / 16.8-17.4 -> 14.7-16.5 /
// level. With fewer features per particle the tiles were as fast or faster (chunks forced: 1024 x 768
// kernel 6.1-6.2 -> 7.8-8.3 ms, 1024 x 2048 step by the median 33.5-35.4 -> 34.7-36.6, 1024 x 128 kernel
// 1.3 -> 3.4). While the fused kernels are on (unless BMT_FAST_CPU_FUSED=0) only beyond kFusedMaxFeatures:
// below, the fused step, median and kernel, each in one team (team.h), were faster. fp32, 2 threads, 2-core
// Xeon VM (CPUID model 167), PASSIVE, alternating, 3 rounds, chunks -> fused (us): the step by the median rule
// 128 x 64 89-97 -> 82-83, 256 x 64 780-905 -> 253-264, 256 x 128 963-1020 -> 368-371, 256 x 256 1340-1570
// -> 607-624, 512 x 64 1700-1810 -> 808-833, 512 x 128 2130-2250 -> 1200-1260, 512 x 256 2570-2730 ->
// 1980-2630; with H given 256 x 64 596-685 -> 140-219, 512 x 128 1520-1630 -> 543-569; rbf_kernel(x) by the
// median rule 256 x 64 661-685 -> 237-248, 512 x 256 2010-2160 -> 1620-1650; 128 x 128 (one thread) by the
// median rule 116-124 -> 131-132.
bool use_gemm_gram_chunked(int64_t n, int64_t d) {
  return d >= kChunkedMinFeatures && (!fused_enabled() || d > kFusedMaxFeatures) &&
         (n <= kChunkedMaxParticles || (n <= kChunkedWideMaxParticles && d >= kChunkedWideFeaturesPerParticle * n));
}

// The GEMM path (fp32 arithmetic, fp64 for fp64; IEEE) by feature chunks for a self kernel of few particles
// with many features (use_gemm_gram_chunked: up to 512, or 1024 with 4 features per particle), as the AMX
// chunks and the gradient's GEMM chunks: the threads take parts of the chunks of gemm_chunk_features(d)
// features; each chunk is centred by its column means into a buffer of its size (any nearby centre cancels
// exactly in the distances) and its dot products added into the part's n x n sums, their upper triangle
// by blocks of kGemmChunkedRowBlock rows (a GEMM each: 3/4 of the products at 256 particles, 5/8 at 512,
// 9/16 at 1024); the parts' sums are then added in part order and the lower triangle written as the upper's
// transpose (K exactly symmetric). The norms are the sums' diagonal (so each particle's distance to itself
// is exactly 0). The whole-x path wrote a centred copy of x and its squares (each as large as x) and read
// them back for one deep GEMM. (The triangle
// against all n x n products, rbf_kernel(x), alternating, 3 rounds: 256 x 76,800 38.4-39.9 -> 32.2-33.2 ms,
// 512 x 20,000 37.4-38.1 -> 27.1-28.7 ms, 300 x 4096 2.97-3.07 -> 2.43-2.52 ms, 128 x 76,800 level.)
//
// The callers run the pass (and the median, K and the step's passes after it) in one team (team.h): each
// GEMM is a thread's own, in its share (the BLAS runs it on that thread). With fewer chunks than threads
// (one chunk up to 512 features on two threads) the threads share each chunk instead: its columns for the
// centring, then its upper triangle's blocks of rows; the step shares the chunk's rows. Before, such a call
// ran the BLAS's threaded GEMMs and ATen's threaded ops, each an OpenMP region of its own, ~75 us apiece
// where the threads sleep between regions. fp32, 2 threads, 2-core Xeon VM (CPUID model 167), alternating, 3
// rounds, separate regions -> one team, PASSIVE (us unless ms): rbf_kernel(x) 128 x 384 699-773 -> 265-301,
// 256 x 300 839-880 -> 376-449, 512 x 384 1.70-1.79 -> 0.95-1.45 ms, 256 x 768 1.10-1.12 -> 0.56-0.64 ms,
// 300 x 4096 2.73-2.98 -> 2.42-2.56 ms; the step with H given 128 x 384 897-952 -> 257-352, 256 x 300
// 1.30-1.57 -> 0.57-1.01 ms, 512 x 384 2.52-2.92 -> 1.65-1.71 ms, 512 x 768 3.38-3.44 -> 2.59-2.98 ms;
// median_bandwidth 256 x 300 818-922 -> 429-441; libgomp's default policy (threads spinning between the
// regions) level or faster: 256 x 768 kernel 585-595 -> 384-410, the step by the median rule 256 x 300
// 569-1140 -> 533-1030, 512 x 384 1.93-2.35 -> 2.03-2.78 ms (noisy), 300 x 4096 level. The lower triangle
// is the upper's transpose (mirror_upper_triangle).
constexpr int64_t kGemmChunkedRowBlock = 128;

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

// A chunk's columns [c0, c0 + width) of x into xc (n x width, row-major), centred by their means (written to
// shift), for the columns [begin, end) of the chunk (a thread's share: ATen ops on one thread).
void centre_chunk_columns(const at::Tensor& x, int64_t c0, int64_t width, int64_t begin, int64_t end,
                          at::Tensor& xc, const at::Tensor& shift) {
  const int64_t n = x.size(0);
  at::Tensor cols = xc.view({n, width}).narrow(1, begin, end - begin);
  cols.copy_(x.narrow(1, c0 + begin, end - begin));
  at::Tensor mean = shift.narrow(0, c0 + begin, end - begin).view({1, end - begin});
  at::mean_out(mean, cols, {0}, /*keepdim=*/true);
  cols.sub_(mean);
}

template <typename T>
ChunkedGram gemm_gram_chunked(const at::Tensor& x) {
  const at::NoGradGuard no_grad;  // (grad mode is per thread: a worker's is on, and x may require grad)
  const int64_t n = x.size(0), d = x.size(1), threads = at::get_num_threads();
  const int64_t chunk = gemm_chunk_features(d), chunks = (d + chunk - 1) / chunk;
  const int64_t parts = std::clamp<int64_t>(
      std::min<int64_t>(threads, kGramPartsMaxBytes / (n * n * int64_t{sizeof(T)})), 1, chunks);
  const auto options = x.options().dtype(c10::CppTypeToScalarType<T>::value);
  ChunkedGram out{at::empty({d}, options), at::empty({n}, options), empty_large({n, n}, options)};
  T* dots_p = out.dots.mutable_data_ptr<T>();
  if (parts == 1 && threads > 1) {
    // One part for all the threads (fewer chunks than threads): each chunk centred by the threads' shares of
    // its columns, then its upper triangle's blocks of rows shared, block b paired with block (blocks - 1 - b)
    // for equal shares. (Two GEMMs of a single chunk each threaded by the BLAS had cost a region each, ~75 us
    // apiece where the threads sleep between regions.)
    const int64_t block = std::clamp<int64_t>((n + 2 * threads - 1) / (2 * threads), 16, kGemmChunkedRowBlock);
    const int64_t blocks = (n + block - 1) / block;
    at::Tensor xc = at::empty({n * chunk}, options);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t c0 = c * chunk, width = std::min(chunk, d - c0);
      at::Tensor chunk_xc = xc.narrow(0, 0, n * width);
      parallel_for(0, width, 16, [&](int64_t begin, int64_t end) {
        const at::NoGradGuard no_grad;
        centre_chunk_columns(x, c0, width, begin, end, chunk_xc, out.shift);
      });
      const at::Tensor rows_of = chunk_xc.view({n, width});
      parallel_for_block_pairs(blocks, [&] {
        return [&](int64_t b) {
          const at::NoGradGuard no_grad;
          const int64_t i0 = b * block, rows = std::min(block, n - i0);
          at::Tensor dots = out.dots.narrow(0, i0, rows).narrow(1, i0, n - i0);
          const at::Tensor lhs = rows_of.narrow(0, i0, rows), rhs = rows_of.narrow(0, i0, n - i0).t();
          if (c == 0) {
            at::mm_out(dots, lhs, rhs);
          } else {
            dots.addmm_(lhs, rhs);
          }
        };
      });
    }
  } else {
    // The threads take parts of the chunks, each adding into its own n x n sums; the parts' sums are then
    // added in part order.
    const at::Tensor sums = parts == 1 ? out.dots.unsqueeze(0) : at::empty({parts, n, n}, options);
    const int64_t block = kGemmChunkedRowBlock;
    parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
      const at::NoGradGuard no_grad;
      at::Tensor buffer = at::empty({n * chunk}, options);
      for (int64_t t = part_begin; t < part_end; ++t) {
        at::Tensor part = sums.select(0, t);
        const int64_t begin = t * chunks / parts, end = (t + 1) * chunks / parts;
        for (int64_t c = begin; c < end; ++c) {
          const int64_t c0 = c * chunk, width = std::min(chunk, d - c0);
          // (the chunk copied first: rows a multiple of 4 KiB apart share cache sets, so a second pass over
          // them went to memory again; and a 16-bit chunk is widened as x.float()'s would be)
          at::Tensor chunk_xc = buffer.narrow(0, 0, n * width);
          centre_chunk_columns(x, c0, width, 0, width, chunk_xc, out.shift);
          const at::Tensor xc = chunk_xc.view({n, width});
          for (int64_t i0 = 0; i0 < n; i0 += block) {  // the upper triangle by blocks of rows
            const int64_t rows = std::min(block, n - i0);
            at::Tensor dots = part.narrow(0, i0, rows).narrow(1, i0, n - i0);
            const at::Tensor lhs = xc.narrow(0, i0, rows), rhs = xc.narrow(0, i0, n - i0).t();
            if (c == begin) {
              at::mm_out(dots, lhs, rhs);
            } else {
              dots.addmm_(lhs, rhs);
            }
          }
        }
      }
    });
    if (parts > 1) {  // (the upper triangles)
      const T* sums_p = sums.const_data_ptr<T>();
      parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          T* row = dots_p + i * n;
          std::copy(sums_p + i * n + i, sums_p + (i + 1) * n, row + i);
          for (int64_t t = 1; t < parts; ++t)
            for (int64_t j = i; j < n; ++j) row[j] += sums_p[(t * n + i) * n + j];
        }
      });
    }
  }
  mirror_upper_triangle(dots_p, n);
  T* norms_p = out.norms.mutable_data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) norms_p[i] = dots_p[i * n + i];
  return out;
}

ChunkedGram gemm_gram_chunked(const at::Tensor& x) {
  return accumulation_type(x.scalar_type()) == at::kDouble ? gemm_gram_chunked<double>(x)
                                                           : gemm_gram_chunked<float>(x);
}

// A GEMM-path chunked Gram pass's dots turned into the self kernel K in place (as rbf_kernel's GEMM output),
// each particle's own term `own` (1 for the kernel, 0 for the step, which adds it exactly itself).
const at::Tensor& chunked_gram_to_kernel(const ChunkedGram& gram, double h, double own) {
  const at::Tensor& k = gram.dots;
  const int64_t n = k.size(0);
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "chunked_gram_to_kernel", [&] {
    parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      rbf_from_dots(k.mutable_data_ptr<scalar_t>(), n, begin, end, n, gram.norms.const_data_ptr<scalar_t>(),
                    gram.norms.const_data_ptr<scalar_t>(), static_cast<scalar_t>(1.0 / h));
    });
  });
  k.fill_diagonal_(own);
  return k;
}


// svgd_step on the GEMM path by feature chunks (use_gemm_gram_chunked shapes), as the AMX chunks: the Gram
// pass above (so K is rbf_kernel's, bit for bit), K with its own terms 0 and its row sums once, then per
// chunk of features W = score - a xc in a buffer, K W by one GEMM and phi = (K W + a rowsum xc + score) / n
// (fp32: times 1/n) into out's columns while the chunk is in cache, checked for NaN/Inf there (returns
// whether phi, as stored, is all finite). A chunk per share; with fewer chunks than threads, each chunk's
// rows shared (W's, then K's times W). Called in a team (gemm_gram_chunked's comment). The tiled step wrote a
// centred copy of x, W and an n x (d + 1) accumulator, then phi, copied into out and scanned.
template <typename T>
bool svgd_step_gemm_chunked(const at::Tensor& x, const at::Tensor& score, const std::optional<double>& bandwidth,
                            at::Tensor& out) {
  const int64_t n = x.size(0), d = x.size(1);
  const ChunkedGram gram = gemm_gram_chunked<T>(x);
  const double h = bandwidth ? *bandwidth : bandwidth_from_median(median_sq_dist_chunked(gram), n);
  const double a = 2.0 / h;
  const at::Tensor& k = chunked_gram_to_kernel(gram, h, 0.0);  // (score_i is added exactly below)
  const at::Tensor rowsum = at::empty({n, 1}, k.options());
  parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    at::Tensor sums = rowsum.narrow(0, begin, end - begin);
    at::sum_out(sums, k.narrow(0, begin, end - begin), {1}, /*keepdim=*/true);
  });
  const auto options = k.options();
  const int64_t chunk = gemm_chunk_features(d), chunks = (d + chunk - 1) / chunk;
  const bool fp32 = std::is_same_v<T, float> && x.scalar_type() == at::kFloat;
  std::atomic<bool> finite{true};
  struct Buffers {
    at::Tensor x, w, product, score;
  };
  const auto make_buffers = [&] {
    return Buffers{at::empty({n * chunk}, options), at::empty({n * chunk}, options), at::empty({n * chunk}, options),
                   fp32 ? at::Tensor() : at::empty({n * chunk}, options)};
  };
  const auto view = [](const at::Tensor& buffer, int64_t rows, int64_t width) {
    return buffer.narrow(0, 0, rows * width).view({rows, width});
  };
  // Chunk c's centred rows [r0, r1) and their W = score - a xc (and, 16-bit, the scores as T) into buf.
  const auto chunk_rows = [&](const Buffers& buf, int64_t c, int64_t r0, int64_t r1) {
    const int64_t c0 = c * chunk, width = std::min(chunk, d - c0);
    at::Tensor xc = view(buf.x, n, width).narrow(0, r0, r1 - r0), w = view(buf.w, n, width).narrow(0, r0, r1 - r0);
    const at::Tensor x_rows = x.narrow(0, r0, r1 - r0).narrow(1, c0, width);
    const at::Tensor shift = gram.shift.narrow(0, c0, width).view({1, width});
    if (fp32) {
      at::sub_out(xc, x_rows, shift);
      at::add_out(w, score.narrow(0, r0, r1 - r0).narrow(1, c0, width), xc, -a);
      return;
    }
    // (the chunk's rows copied once, as in the Gram pass: the scores are read twice)
    at::Tensor scores = view(buf.score, n, width).narrow(0, r0, r1 - r0);
    scores.copy_(score.narrow(0, r0, r1 - r0).narrow(1, c0, width));
    xc.copy_(x_rows).sub_(shift);
    at::add_out(w, scores, xc, -a);
  };
  // phi's rows [r0, r1) of chunk c from K's rows times the chunk's W (all its rows in buf).
  const auto phi_rows = [&](const Buffers& buf, int64_t c, int64_t r0, int64_t r1) {
    const int64_t c0 = c * chunk, width = std::min(chunk, d - c0);
    at::Tensor product = view(buf.product, n, width).narrow(0, r0, r1 - r0);
    at::mm_out(product, k.narrow(0, r0, r1 - r0), view(buf.w, n, width));
    // fp32: phi by one pass (amx_finish_rows, which the AMX steps use: x and score read as they are, phi
    // streamed, its finiteness noted) where five ATen ops made five passes (2-core Xeon, alternating, 3
    // rounds: 128 x 76,800 34.3-35.3 -> 27.1-28.1 ms, 512 x 20,000 90.3-91.1 -> 84.0-84.7 ms, 256 x 768
    // 1.04-1.15 -> 0.90-0.91 ms, 128 x 128 0.114-0.116 -> 0.095-0.098 ms)
    if (fp32) {
      if (!amx_finish_rows(product.const_data_ptr<float>(), width, rowsum.const_data_ptr<float>(),
                           x.const_data_ptr<float>(), score.const_data_ptr<float>(), gram.shift.const_data_ptr<float>(),
                           static_cast<float>(a), static_cast<float>(n), d, r0, r1, c0, c0 + width,
                           out.mutable_data_ptr<float>()))
        finite.store(false, std::memory_order_relaxed);
      return;
    }
    product.addcmul_(rowsum.narrow(0, r0, r1 - r0), view(buf.x, n, width).narrow(0, r0, r1 - r0), a)
        .add_(view(buf.score, n, width).narrow(0, r0, r1 - r0));
    at::Tensor phi = out.narrow(0, r0, r1 - r0).narrow(1, c0, width);
    if (out.scalar_type() == product.scalar_type()) {
      at::div_out(phi, product, n);
    } else {  // (16-bit particles on this path: rounded once, as stored)
      phi.copy_(product.div_(n));
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "svgd_step_finite", [&] {
      const scalar_t* stored = out.const_data_ptr<scalar_t>() + c0;
      for (int64_t i = r0; i < r1; ++i)
        if (!all_finite(stored + i * d, width)) finite.store(false, std::memory_order_relaxed);
    });
  };
  const int64_t threads = at::get_num_threads();
  if (chunks >= threads || threads == 1) {  // a chunk per share at a time
    parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      const at::NoGradGuard no_grad;
      const Buffers buf = make_buffers();
      for (int64_t c = begin; c < end; ++c) {
        chunk_rows(buf, c, 0, n);
        phi_rows(buf, c, 0, n);
      }
    });
  } else {  // fewer chunks than threads: each chunk's rows shared, its W first
    const Buffers buf = make_buffers();
    for (int64_t c = 0; c < chunks; ++c) {
      parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
        const at::NoGradGuard no_grad;
        chunk_rows(buf, c, begin, end);
      });
      parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
        const at::NoGradGuard no_grad;
        phi_rows(buf, c, begin, end);
      });
    }
  }
  return finite.load();
}

// phi into `out` (contiguous, x's shape and dtype). fp32 particles: phi by one pass over the rows (amx_finish_rows,
// as the feature chunks take it), its finiteness noted as it is written (returned); otherwise nullopt. The
// n x d temporaries come from the huge-page allocator (huge_pages.h) from 1 MiB. 2-core Xeon VM (CPUID model
// 167), PASSIVE, alternating, 3 rounds, five ATen passes into a fresh phi copied into the result, fresh
// temporaries -> one pass into the result, reused temporaries (ms): with glibc's defaults (page faults: ~3,000
// per call at 1024 x 768, none after) H given 1024 x 768 11.3-14.9 -> 10.5-11.4, 1024 x 512 9.6-11.3 ->
// 8.2-8.5, 2048 x 768 38-42 -> 35-37; median rule 1024 x 768 16.2-18.0 -> 12.6-12.7, 512 x 1024 3.8-5.4 ->
// 3.6-3.9; fp64 H given 1024 x 768 22.7-26.2 -> 20.8-21.2; with MALLOC_MMAP_MAX_=0 (no faults either way) H
// given 1024 x 768 11.4-11.7 -> 10.5-10.9, 2048 x 768 36.6-37.1 -> 34.8-35.2, 512 x 1024 level.
template <typename T>
std::optional<bool> svgd_step_tiled(const at::Tensor& x, const at::Tensor& score,
                                    const std::optional<double>& bandwidth, at::Tensor& out) {
  const int64_t n = x.size(0), d = x.size(1);
  const auto acc = c10::CppTypeToScalarType<T>::value;
  const at::Tensor xa = x.to(acc);
  const at::Tensor shift = centring_shift(xa).contiguous();
  const at::Tensor xc = centred_by(xa, shift, acc);  // (centred(x, acc), with its shift)
  const at::Tensor norms = row_sq_norms(xc);
  // With the median rule and many features the median's pass keeps its tiles for K (as the AMX path).
  const bool keep = !bandwidth && keeps_dots(n, d, sizeof(T), kKeptDotsMinFeatures);
  at::Tensor kept = keep ? empty_large({n, n}, xc.options()) : at::Tensor();
  // (the median as median_bandwidth takes it beyond the fused kernels: use_fused_median)
  const double h = bandwidth ? *bandwidth
                             : bandwidth_from_median(
                                   median_sq_dist<T>(xc, norms, GemmTiles{xc, keep ? &kept : nullptr}), n);
  const double a = 2.0 / h;

  // W = [score - a * xc | 1]: one GEMM with K gives the score term, the repulsion term and row sums. The
  // diagonal k_ii = 1 is left out of the GEMM (0 in the tiles) and its term, score_i, added at the end: in
  // W it would be (score_i - a xc_i) + a xc_i, whose two large terms cancel when the other k_ij are small.
  at::Tensor w = empty_large({n, d + 1}, xc.options());
  at::Tensor w_left = w.narrow(1, 0, d);
  at::add_out(w_left, score.to(acc), xc, -a);
  w.narrow(1, d, 1).fill_(1);
  at::Tensor accum = empty_large({n, d + 1}, xc.options()).zero_();
  const T* nr = norms.data_ptr<T>();
  for_each_upper_tile(xc, [&](at::Tensor& tile, int64_t i0, int64_t j0) {
    const int64_t rows = tile.size(0), cols = tile.size(1);
    parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      rbf_from_dots(tile.data_ptr<T>(), cols, begin, end, cols, nr + i0, nr + j0, static_cast<T>(1.0 / h));
    });
    if (i0 == j0) tile.diagonal().fill_(0);  // k(x_i, x_i) = 1: added below, exactly
    accum.narrow(0, i0, rows).addmm_(tile, w.narrow(0, j0, cols));
    if (i0 != j0) accum.narrow(0, j0, cols).addmm_(tile.t(), w.narrow(0, i0, rows));
  }, keep ? Kept::kRead : Kept::kNone, &kept);
  if constexpr (std::is_same_v<T, float>) {
    if (x.scalar_type() == at::kFloat) {
      const at::Tensor rowsum = accum.narrow(1, d, 1).contiguous();
      std::atomic<bool> finite{true};
      parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
        if (!amx_finish_rows(accum.const_data_ptr<float>() + begin * (d + 1), d + 1, rowsum.const_data_ptr<float>(),
                             x.const_data_ptr<float>(), score.const_data_ptr<float>(), shift.const_data_ptr<float>(),
                             static_cast<float>(a), static_cast<float>(n), d, begin, end, 0, d,
                             out.mutable_data_ptr<float>()))
          finite.store(false, std::memory_order_relaxed);
      });
      return finite.load();
    }
  }
  at::Tensor sums = accum.narrow(1, 0, d).addcmul_(accum.narrow(1, d, 1), xc, a).add_(score);
  if (out.scalar_type() == acc) {
    at::div_out(out, sums, n);
  } else {  // (16-bit particles without AMX: rounded once, as stored)
    out.copy_(sums.div_(n));
  }
  return std::nullopt;
}

// Whether the tiled step takes the fused kernel (kernels.h: fused_step_rows) instead of GEMM tiles: up to
// kFusedMaxFeatures features, by the median rule too (its median then by the fused distances as well:
// use_fused_median), unless BMT_FAST_CPU_FUSED=0 (read once). fp32 step, 2 threads, 2-core Xeon VM (CPUID
// model 167), PASSIVE, alternating, GEMM tiles -> fused (ms): H given 1024 x 3 1.00-1.03 -> 0.26-0.28, 4096
// x 3 11.5-12.8 -> 2.8, 4096 x 16 16.1-16.6 -> 6.8-7.3, 2048 x 32 5.4-5.9 -> 3.4, 4096 x 64 25.6-28.2 ->
// 17.2-18.6, 8192 x 128 129-132 -> 107-109, 4096 x 192 43.7-46.5 -> 41.3-41.4, 4096 x 256 54.7-57.6 ->
// 53.7-55.6. (By the median rule from 128 features it had stopped at 160, where the median's GEMM tiles
// were kept for K: 4096 x 192 60.7-63.8 -> 62.6-66.1, 4096 x 256 73.8-74.7 -> 82.0-83.5; with the fused
// median since, see use_fused_median.)
bool use_fused(int64_t d) { return fused_enabled() && d <= kFusedMaxFeatures; }

// Whether the fused step takes its symmetric form (kernels.h: fused_step_pair): K once per pair, added into
// both rows' sums (half the dot products and exps), from 2048 particles (1024 with more than
// kFusedLaneMaxFeatures features), where each thread's sums for all rows take at most kFusedPairsMaxBytes.
// fp32 step, H given, 2 threads, PASSIVE, rows -> pairs (ms): 600 x 3 0.15-0.24 -> 0.35-0.36, 1024 x 3
// 0.30-0.32 -> 0.45, 1024 x 16 0.48-0.55 -> 0.71-0.73, 1024 x 64 level, 2048 x 3 0.73-0.83 -> 0.80-0.81, 2048
// x 64 3.4-3.8 -> 3.2-3.3; with each block pair's sums added up apart first (fp32 error at 4096 x 3: 1.1e-5
// -> 1.6e-6 of max |phi|, the GEMM tiles' 1.7e-6): 4096 x 3 2.5-2.7 -> 2.1-2.2, 16,384 x 3 36-37 -> 26.2-26.5,
// 4096 x 32 9.0-9.4 -> 7.8-7.9, 4096 x 64 level, 8192 x 128 104-105 -> 90-91, 4096 x 256 52-56 -> 47.5-50.6.
constexpr int64_t kFusedPairsMaxBytes = int64_t{256} << 20;
constexpr int64_t kFusedPairBlock = 256;  // rows per block of a pair (a multiple of kFusedPack; 512: level)

bool fused_symmetric(int64_t n, int64_t d, int64_t element_bytes) {
  if (n < (d > kFusedLaneMaxFeatures ? 1024 : 2048)) return false;
  const int64_t n_pad = (n + kFusedPack - 1) / kFusedPack * kFusedPack;
  const int64_t per_part = fused_step_scratch(n_pad, d) + (d <= kFusedLaneMaxFeatures ? n_pad * (d + 1) : 0);
  return at::get_num_threads() * per_part * element_bytes <= kFusedPairsMaxBytes;
}

// The symmetric form: the pairs (I, J >= I) of blocks of kFusedPairBlock rows go to `parts` (the thread count)
// equal shares, each adding into its own sums for all rows (zeroed), which the last pass adds up in part order
// into phi. Returns whether phi is all finite.
template <typename T>
bool fused_step_symmetric(const FusedOperands<T>& ops, const at::Tensor& score, double h, at::Tensor& phi) {
  const int64_t n = ops.n, d = ops.d, n_pad = ops.n_pad, parts = at::get_num_threads();
  const int64_t blocks = (n_pad + kFusedPairBlock - 1) / kFusedPairBlock;
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t i = 0; i < blocks; ++i)
    for (int64_t j = i; j < blocks; ++j) pairs.emplace_back(i * kFusedPairBlock, j * kFusedPairBlock);
  const bool lanes = d <= kFusedLaneMaxFeatures;
  const int64_t part_elems = fused_step_scratch(n_pad, d), col_elems = lanes ? n_pad * (d + 1) : 0;
  // (each part's sums zeroed by its own thread: in a team, at::zeros would run on the calling thread alone)
  const at::Tensor rowacc = at::empty({parts * part_elems}, ops.xc.options());
  const at::Tensor colacc = at::empty({parts * col_elems}, ops.xc.options());
  const int64_t count = static_cast<int64_t>(pairs.size());
  parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    at::Tensor scratch = at::empty({fused_pair_scratch(kFusedPairBlock, d)}, ops.xc.options());
    for (int64_t part = part_begin; part < part_end; ++part) {
      std::fill_n(rowacc.data_ptr<T>() + part * part_elems, part_elems, T(0));
      std::fill_n(colacc.data_ptr<T>() + part * col_elems, col_elems, T(0));
      for (int64_t p = part * count / parts; p < (part + 1) * count / parts; ++p) {
        const auto [i0, j0] = pairs[p];
        fused_step_pair(ops.xc.template data_ptr<T>(), ops.xt.template data_ptr<T>(),
                        ops.w.template data_ptr<T>(), ops.norms.template data_ptr<T>(), n, d, static_cast<T>(1.0 / h),
                        i0, std::min(n_pad, i0 + kFusedPairBlock), j0, std::min(n_pad, j0 + kFusedPairBlock),
                        rowacc.data_ptr<T>() + part * part_elems,
                        lanes ? colacc.data_ptr<T>() + part * col_elems : nullptr, scratch.data_ptr<T>());
      }
    }
  });
  std::atomic<bool> finite{true};
  parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    if (!fused_step_finish(rowacc.data_ptr<T>(), part_elems, lanes ? colacc.data_ptr<T>() : nullptr, parts,
                           ops.xc.template data_ptr<T>(), score.data_ptr<T>(), n, d, static_cast<T>(2.0 / h), begin,
                           end, phi.data_ptr<T>()))
      finite = false;
  });
  return finite.load();
}

// The tiled step by the fused kernel: xc's columns and W packed for it (kernels.h), blocks of rows to the
// threads, each block's rows streaming every column once per chunk of columns. Writes phi into out where out
// has the compute type (returning whether it is all finite), else into a buffer copied into out (nullopt).
template <typename T>
std::optional<bool> svgd_step_fused_team(const at::Tensor& x, const at::Tensor& score,
                                         const std::optional<double>& bandwidth, at::Tensor& out) {
  const int64_t n = x.size(0), d = x.size(1);
  const auto acc = c10::CppTypeToScalarType<T>::value;
  FusedOperands<T> ops(x);
  // (the median as median_bandwidth takes it: from these operands, use_fused_median)
  const double h = bandwidth ? *bandwidth
                             : bandwidth_from_median(
                                   median_sq_dist<T>(ops.xc, ops.real_norms(), FusedTiles<T>{ops}), n);
  const double a = 2.0 / h;
  const at::Tensor score_t = score.to(acc).contiguous();
  ops.pack_w(score_t, a);
  const at::Tensor &xc = ops.xc, &xt = ops.xt, &w = ops.w, &norms = ops.norms;
  const bool direct = out.scalar_type() == acc;
  at::Tensor phi = direct ? out : at::empty({n, d}, xc.options());
  if (fused_symmetric(n, d, xc.element_size())) {
    const bool finite = fused_step_symmetric<T>(ops, score_t, h, phi);
    if (direct) return finite;
    out.copy_(phi);
    return std::nullopt;
  }
  // Blocks of rows whose sums (scratch) take about 256 KiB, at least one per thread and a multiple of the
  // thread count.
  const int64_t threads = at::get_num_threads();
  const int64_t row_bytes = fused_step_scratch(kFusedRows, d) / kFusedRows * static_cast<int64_t>(sizeof(T));
  int64_t blocks = std::max<int64_t>(1, (n * row_bytes + (256 << 10) - 1) / (256 << 10));
  blocks = (blocks + threads - 1) / threads * threads;
  const int64_t block_rows =
      std::max<int64_t>(kFusedRows, ((n + blocks - 1) / blocks + kFusedRows - 1) / kFusedRows * kFusedRows);
  const int64_t num_blocks = (n + block_rows - 1) / block_rows;
  std::atomic<bool> finite{true};
  parallel_for(0, num_blocks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({fused_step_scratch(block_rows, d)}, xc.options());
    bool ok = true;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = b * block_rows, r1 = std::min(n, r0 + block_rows);
      ok &= fused_step_rows(xc.data_ptr<T>(), xt.data_ptr<T>(), w.data_ptr<T>(), norms.data_ptr<T>(),
                            score_t.data_ptr<T>(), n, d, static_cast<T>(1.0 / h), static_cast<T>(a), r0, r1,
                            scratch.data_ptr<T>(), phi.data_ptr<T>());
    }
    if (!ok) finite = false;
  });
  if (direct) return finite.load();
  out.copy_(phi);
  return std::nullopt;
}

// The fused step in one team (team.h: its loops, the median's among them, wake the threads once).
template <typename T>
std::optional<bool> svgd_step_fused(const at::Tensor& x, const at::Tensor& score,
                                    const std::optional<double>& bandwidth, at::Tensor& out) {
  std::optional<bool> finite;
  run_team([&] { finite = svgd_step_fused_team<T>(x, score, bandwidth, out); });
  return finite;
}

// Whether rbf_kernel(x) (a self kernel, fp32 / fp64 arithmetic) takes rbf_kernel_fused instead of one GEMM
// (or the feature chunks): up to kFusedMaxFeatures features. fp32, H given, 2 threads, 2-core Xeon VM (CPUID
// model 167), PASSIVE, alternating, 2-3 rounds, the previous paths -> fused (ms): 128 x 16 0.030 ->
// 0.022-0.024, 256 x 48 0.24-0.27 -> 0.10-0.18, 256 x 64 0.47-0.49 -> 0.11-0.20 (chunks before), 200 x 200
// 0.76-1.80 -> 0.26-0.29, 512 x 128 1.03-1.30 -> 0.43-0.53, 1024 x 3 0.52-0.53 -> 0.30-0.32, 1024 x 256
// 2.36-2.46 -> 2.08-2.12, 2048 x 128 4.43-4.53 -> 3.73-3.75, 4096 x 64 8.8-8.9 -> 8.1-8.2, 4096 x 128
// 14.4-14.6 -> 14.1, 8192 x 16 30.0-32.5 -> 18.5-19.0, 8192 x 64 68.2-68.5 -> 32.0-32.3; 64 x 64 level (the
// Gram path). Beyond 1024 particles at more than 128 features it took both triangles and stayed on one GEMM
// (2048 x 256 6.78-6.80 -> 7.24-7.44); with the upper triangle alone (fused_kernel_symmetric), one GEMM ->
// fused: 2048 x 200 5.4-5.8 -> 3.9, 2048 x 256 6.8-7.9 -> 5.1-6.0, 4096 x 256 25.4-30.3 -> 18.7-20.5,
// 8192 x 160 (chunks) 90-94 -> 49-50; fp64 2048 x 256 13.6-16.5 -> 10.5-11.7, 4096 x 200 54-59 -> 32-35,
// 1100 x 160 3.39-3.44 -> 2.79-3.00.
bool use_fused_kernel(int64_t d) { return fused_enabled() && d <= kFusedMaxFeatures; }

// rbf_kernel_fused computes only K's upper triangle, by blocks of kFusedKernelBlockRows rows (a multiple of kFusedPack:
// a block's diagonal column is where its packed columns start), from kFusedKernelSymmetricMinParticles particles at 64
// features or more and from twice as many below; its tiles (the block's rows by columns taking at most
// kFusedKernelTileBytes) go through a buffer. fp32, H given, 2 threads, the same VM, PASSIVE, alternating, 2-3 rounds,
// both triangles -> the upper one (us unless ms): 256 x 16 42-43 -> 53-55, 256 x 128 152-169 -> 171-184, 512 x 16
// 123-132 -> 141-147, 512 x 64 217-256 -> 208-235, 512 x 128 458-511 -> 389-449, 768 x 64 578-704 -> 447-497, 1024 x 16
// 392-395 -> 346-364, 1024 x 64 771-823 -> 661-677, 1024 x 128 1.18-1.33 -> 0.97, 2048 x 128 3.83-3.87 -> 2.80-2.83 ms,
// 4096 x 64 8.2-8.4 -> 6.7-6.9 ms, 8192 x 16 19.6-20.4 -> 16.7-16.9 ms, 8192 x 64 32.4-33.7 -> 27.0-27.3 ms. Blocks of
// 128 rows or tiles of 256 or 512 KiB: level to 1-3 ms slower at 8192. fp64 (whose tiles are transposed by 8 x 8
// register blocks; by a plain loop it had been slower, 4096 x 32 12.4-13.1 -> 17.1-17.6 ms): 512 x 64 474-522 ->
// 378-1260 (noisy), 1024 x 16 747-838 -> 682-703, 1024 x 64 1.45-1.61 -> 1.24-1.34 ms, 2048 x 128 7.9-9.0 -> 6.2-6.7
// ms, 4096 x 32 13.8-14.6 -> 11.6-12.0 ms, 4096 x 128 32.1-35.2 -> 25.0-26.1 ms.
// 16-bit particles (fp16; bf16 off AMX) take the buffered form at any n, K rounded to their dtype from the
// fp32 tiles (stream_rows_as) where an fp32 K had been converted by a second pass into a fresh tensor. fp16,
// H given, the same VM, PASSIVE, alternating, 3 rounds: 256 x 64 163-175 -> 109-201 us, 1024 x 64 1.02-1.47
// -> 0.76-1.13 ms, 4096 x 128 20.7-22.1 -> 11.1-12.7 ms, 8192 x 64 66.9-79.5 -> 33.2-33.7 ms; 128 x 16 (one
// thread, one pair of blocks) 25 -> 28 us.
constexpr int64_t kFusedKernelBlockRows = 64;
constexpr int64_t kFusedKernelTileBytes = int64_t{128} << 10;
constexpr int64_t kFusedKernelSymmetricMinParticles = 512;

bool fused_kernel_symmetric(int64_t n, int64_t d) {
  return n >= (d >= 64 ? kFusedKernelSymmetricMinParticles : 2 * kFusedKernelSymmetricMinParticles);
}

// The self kernel rbf_kernel(x) by the fused distances (use_fused_kernel): x's fused operands, then blocks
// of rows' dot products with the columns by the fused kernel's register blocks (fused_dot_rows, the median's
// FusedTiles values) turned into K, its diagonal 1; one team. Below fused_kernel_symmetric's size, blocks of
// kFusedRows rows go to the threads and compute all their columns, in place in K (a block of columns at a
// time); beyond it, only the upper triangle (below). K is exactly symmetric either way (a pair's dot product
// takes the same operations either way round). With the median rule (median != nullptr) H comes from the same
// operands' median, as median_bandwidth takes it (use_fused_median), written to *median. In T; the caller
// converts to x's dtype.
template <typename T>
at::Tensor rbf_kernel_fused(const at::Tensor& x, std::optional<double> h, double* median) {
  const int64_t n = x.size(0);
  // (16-bit particles: K written in their dtype from the fp32 tiles, by the buffered form below)
  const bool narrow = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  at::Tensor k =
      empty_large({n, n}, x.options().dtype(narrow ? x.scalar_type() : c10::CppTypeToScalarType<T>::value));
  run_team([&] {
    const FusedOperands<T> ops(x);
    if (!h) {
      *median = median_sq_dist<T>(ops.xc, ops.real_norms(), FusedTiles<T>{ops});
      if (!std::isfinite(*median)) return;  // (K: all NaN, below; finite_norms)
      // (as rbf_kernel reads median_bandwidth's H: a 0-dim tensor in T)
      h = read_bandwidth(at::scalar_tensor(bandwidth_from_median(*median, n), x.options().dtype(
                                               c10::CppTypeToScalarType<T>::value)));
    }
    const T inv_h = static_cast<T>(1.0 / *h);
    T* kp = narrow ? nullptr : k.data_ptr<T>();
    const T* norms = ops.norms.template data_ptr<T>();
    const T* xc = ops.xc.template data_ptr<T>();
    const T* xt = ops.xt.template data_ptr<T>();
    // K's entries for rows [r0, r1) and columns [j0, j0 + cols) into out (row stride ld), by the register
    // blocks (each block's entries made while in L1).
    const auto entries = [&](int64_t r0, int64_t r1, int64_t j0, int64_t cols, T* out, int64_t ld) {
      for (int64_t i0 = r0; i0 < r1; i0 += kFusedRows) {
        const int64_t i1 = std::min(r1, i0 + kFusedRows);
        fused_dot_rows(xc, xt, ops.d, i0, i1, j0, cols, out + (i0 - r0) * ld, ld);
        rbf_from_dots(out, ld, i0 - r0, i1 - r0, cols, norms + r0, norms + j0, inv_h);
      }
    };
    if (!narrow && !fused_kernel_symmetric(n, ops.d)) {
      // (a block of columns whose packed xt takes at most 512 KiB: it stays in L2 while the share's rows pass)
      const int64_t block_cols = std::max<int64_t>(
          kFusedPack, (int64_t{512} << 10) / (ops.d * int64_t{sizeof(T)}) / kFusedPack * kFusedPack);
      parallel_for(0, (n + kFusedRows - 1) / kFusedRows, 1, [&](int64_t begin, int64_t end) {
        const int64_t r0 = begin * kFusedRows, r1 = std::min(n, end * kFusedRows);
        for (int64_t j0 = 0; j0 < n; j0 += block_cols)
          for (int64_t i0 = r0; i0 < r1; i0 += kFusedRows)
            entries(i0, std::min(r1, i0 + kFusedRows), j0, std::min(block_cols, n - j0), kp + i0 * n + j0, n);
        for (int64_t i = r0; i < r1; ++i) kp[i * n + i] = T(1);
      });
      return;
    }
    // The upper triangle by blocks of kFusedKernelBlockRows rows, block b paired with block (blocks - 1 - b)
    // for equal shares: each block's tiles from its diagonal on go to a buffer, and from there into K twice,
    // as they are and (right of the diagonal block) transposed below it, in whole streamed lines (16-bit K:
    // rounded on the way, at any n). (Transposing within K itself thrashed the caches where a row is a power
    // of two bytes: 8192 x 16 21 -> 34-50 ms.)
    const auto store = [&](const T* src, int64_t ld_src, int64_t rows, int64_t cols, int64_t i0, int64_t j0) {
      if constexpr (std::is_same_v<T, float>) {
        if (k.scalar_type() == at::kBFloat16)
          return stream_rows_as(src, ld_src, rows, cols, k.mutable_data_ptr<at::BFloat16>() + i0 * n + j0, n);
        if (k.scalar_type() == at::kHalf)
          return stream_rows_as(src, ld_src, rows, cols, k.mutable_data_ptr<at::Half>() + i0 * n + j0, n);
      }
      stream_rows(src, ld_src * int64_t{sizeof(T)}, rows, cols * int64_t{sizeof(T)}, kp + i0 * n + j0,
                  n * int64_t{sizeof(T)});
    };
    constexpr int64_t rows = kFusedKernelBlockRows;
    const int64_t tile_cols =
        std::max<int64_t>(kFusedPack, kFusedKernelTileBytes / (rows * int64_t{sizeof(T)}) / kFusedPack * kFusedPack);
    const int64_t blocks = (n + rows - 1) / rows;
    parallel_for_block_pairs(blocks, [&] {
      return [&, tile = std::vector<T>(rows * tile_cols), transposed = std::vector<T>(tile_cols * rows)](
                 int64_t block) mutable {
        const int64_t r0 = block * rows, r1 = std::min(n, r0 + rows), m = r1 - r0;
        for (int64_t j0 = r0; j0 < n; j0 += tile_cols) {
          const int64_t cols = std::min(tile_cols, n - j0);
          entries(r0, r1, j0, cols, tile.data(), tile_cols);
          if (j0 == r0)
            for (int64_t r = 0; r < m; ++r) tile[r * tile_cols + r] = T(1);
          store(tile.data(), tile_cols, m, cols, r0, j0);
          const int64_t first = std::max(j0, r1) - j0;  // the tile's first column right of the diagonal block
          if (first >= cols) continue;
          transpose_values(tile.data() + first, tile_cols, m, 0, cols - first, transposed.data(), rows);
          store(transposed.data(), rows, cols - first, m, j0 + first, r0);
        }
      };
    });
  });
  if (!h) k.fill_(kNaN);
  return k;
}

// ---- bf16 on tensor cores (AMX) ----------------------------------------------------------------
//
// With bf16 particles on a CPU with AMX (Sapphire Rapids and later: oneDNN's batch-reduce GEMM through
// ATen's cpublas::brgemm), the tiled step and the median take the GPU kernels' precision: the centred
// particles rounded to bf16 for S = A B^T, fp32 accumulation, K in fp32 (its row sums too), then K
// rounded to bf16 times W = score - (2/H) xc rounded to bf16, accumulated in fp32. The median is that of
// the distances of the rounded particles (median_bandwidth gives the same value). Row blocks go to the
// threads; each streams column blocks of all particles (full rows: no symmetry, as the tiles need no
// write to another thread's rows). BMT_FAST_CPU_AMX=0 keeps bf16 on the fp32 path.
//
// fp32 particles take this path too where torch's fp32 matmul precision for oneDNN is bf16
// (torch.set_float32_matmul_precision("medium"), or torch.backends.mkldnn.matmul.fp32_precision = "bf16"):
// that setting lets ATen's fp32 GEMMs, the fp32 path's among them, multiply bf16-rounded operands on this
// CPU, so the results are of that precision either way, and this path is the faster (fp32 results, the
// inputs read as they are; the operands are the same bf16 ones).
constexpr int64_t kAmxRows = 128;   // rows per block: its (rows x d) fp32 accumulator stays in L2 to d ~ 1024
constexpr int64_t kAmxCols = 512;   // columns per block (a multiple of 32: AMX's bf16 depth)
constexpr int64_t kAmxFinishCols = 1024;  // the step's K W by feature chunks (d >= 2048): a 512 KiB accumulator
constexpr int64_t kAmxKeptColumns = 1024;  // ... when a block's K rows (<= 256 KiB of bf16) are kept for it
constexpr int64_t kAmxFusedTransposeFeatures = 16384;  // AmxOperands: B transposed by blocks of 16 rows up to here

// Whether the AMX step and median run in one team (team.h): up to kAmxTeamMaxParticles particles. bf16, 2
// threads, PASSIVE, alternating, 3 rounds, separate regions -> one team (us unless ms): the step with H given
// 256 x 64 320-325 -> 121-123, 512 x 128 498-593 -> 265-342, 1024 x 64 699-753 -> 482-497, 130 x 2001
// 566-633 -> 380-392, 256 x 8192 2.61-2.82 -> 2.26-2.33 ms; by the median rule 512 x 128 1.21-1.27 ->
// 0.65-0.67 ms; median_bandwidth 1024 x 64 975-986 -> 625-705, 2048 x 256 2.96-2.97 -> 2.56-2.64 ms. Beyond,
// in a team the second thread ran its share of the step's AMX blocks slower (8192 x 64 with H given: 22.4
// against 17.5 ms for the first thread's; 17.4 and 17.3 in separate regions; not understood; the step
// 18.3-18.7 -> 23.0-23.7 ms, 4096 x 128 6.5-6.6 -> 7.0-7.2 ms), where the threads' wake-ups are a small
// share anyway.
constexpr int64_t kAmxTeamMaxParticles = 2048;
bool amx_in_team(int64_t n) { return n <= kAmxTeamMaxParticles; }

bool use_amx(const at::Tensor& x) {  // (float32_matmul_in_bf16: kernels.h)
  const auto type = x.scalar_type();
  return x.size(1) >= kAmxMinFeatures && bf16_amx_enabled() &&
         (type == at::kBFloat16 || (type == at::kFloat && float32_matmul_in_bf16()));
}

// f(Typed<In>{}) with In the AMX path's particle type for x's dtype (fp32, else bf16).
template <typename T>
struct Typed {
  using type = T;
};
template <typename F>
decltype(auto) amx_dispatch(const at::Tensor& x, F&& f) {
  if (x.scalar_type() == at::kFloat) return f(Typed<float>{});
  return f(Typed<at::BFloat16>{});
}

// The row stride (32-bit words) of an AMX B operand of `words` words a row: whole cache lines and one more.
// A tile load reads 16 rows; a stride that is a multiple of 4 KiB (n_pad or d a multiple of 1024) put all
// of them in one 12-way L1 set, each B tile evicting itself (2-core Xeon, alternating: bf16 rbf_kernel
// 1024 x 8192 ~10 -> ~8.9 ms, 2048 x 2048 ~10.2 -> ~8.5 ms).
int64_t amx_b_stride(int64_t words) {
  return (words + 15) / 16 * 16 + 16;
}

// The same for an A operand of `cols` bf16 columns (a multiple of 32: its tiles also load 16 rows).
int64_t amx_a_stride(int64_t cols) {
  return 2 * amx_b_stride(cols / 2);
}

// bf16 pairs as one 32-bit word (AMX's B operand interleaves rows in pairs: the pair of row k and k + 1
// of column j is word j of pair-row k / 2).
const at::BFloat16* as_bf16(const at::Tensor& words) {
  return reinterpret_cast<const at::BFloat16*>(words.const_data_ptr<int32_t>());
}

// The AMX path's centring shift: the mean of the rows of x, and of y's too when given (bf16 or fp32,
// contiguous, the same columns and dtype), from float64 sums, rounded to fp32 (d values).
at::Tensor amx_shift(const at::Tensor& x, const at::Tensor* y = nullptr) {
  const int64_t d = x.size(1);
  std::vector<double> total(d, 0.0), sums(d);
  int64_t rows = 0;
  for (const at::Tensor* t : {&x, y}) {
    if (t == nullptr) continue;
    const int64_t n = t->size(0);
    amx_dispatch(*t, [&](auto typed) {
      const auto* p = t->const_data_ptr<typename decltype(typed)::type>();
      parallel_for(0, (d + 255) / 256, 1, [&](int64_t begin, int64_t end) {
        amx_column_sums(p, d, n, begin * 256, std::min(end * 256, d), sums.data());
      });
    });
    for (int64_t k = 0; k < d; ++k) total[k] += sums[k];
    rows += n;
  }
  at::Tensor shift = at::empty({d}, x.options().dtype(at::kFloat));
  float* shift_out = shift.mutable_data_ptr<float>();
  for (int64_t k = 0; k < d; ++k) shift_out[k] = static_cast<float>(total[k] / static_cast<double>(rows));
  return shift;
}

// The particles centred (by shift, amx_shift(x) unless given) and rounded to bf16 (n_pad x d_pad, zero
// padding; row stride ld_x), their norms in fp32, and unless as_b is false xb^T as AMX's B operand (d_pad/2
// x n_pad words, row stride ld_s: each the bf16 pair of features 2k, 2k + 1 of one particle, i.e. the 32-bit
// transpose of xb). x: bf16 or fp32 (dtype: the results' type), contiguous.
struct AmxOperands {
  int64_t n, n_pad, d, d_pad;
  int64_t ld_x;      // xb's row stride in bf16 (columns [d, ld_x) zero; AMX's products take d_pad of them)
  int64_t ld_s = 0;  // b_s's row stride in words (amx_b_stride)
  at::ScalarType dtype;
  at::Tensor shift, xb, norms, b_s;

  explicit AmxOperands(const at::Tensor& x) : AmxOperands(x, amx_shift(x)) {}
  AmxOperands(const at::Tensor& x, at::Tensor shift_, bool as_b = true)
      : n(x.size(0)), d(x.size(1)), dtype(x.scalar_type()), shift(std::move(shift_)) {
    n_pad = (n + 31) / 32 * 32;
    d_pad = (d + 31) / 32 * 32;
    ld_x = amx_a_stride(d_pad);
    // (the operands from the huge-page allocator, as the accumulator and phi)
    xb = empty_large({n_pad, ld_x}, x.options().dtype(at::kBFloat16));
    xb.narrow(0, n, n_pad - n).zero_();
    norms = at::empty({n}, x.options().dtype(at::kFloat));
    const float* shift_p = shift.const_data_ptr<float>();
    auto* xb_p = xb.mutable_data_ptr<at::BFloat16>();
    float* norms_p = norms.mutable_data_ptr<float>();
    const auto* words = reinterpret_cast<const uint32_t*>(xb.const_data_ptr<at::BFloat16>());
    uint32_t* b_s_words = nullptr;
    if (as_b) {
      ld_s = amx_b_stride(n_pad);
      b_s = empty_large({d_pad / 2, ld_s}, x.options().dtype(at::kInt));
      b_s_words = reinterpret_cast<uint32_t*>(b_s.mutable_data_ptr<int32_t>());
    }
    // Up to kAmxFusedTransposeFeatures by blocks of 16 rows: centred, rounded, and (as_b) transposed into
    // b_s's columns while still in L2 (a transpose of all of xb afterwards read it 16 KB apart at d = 8192,
    // beyond the prefetchers). Beyond, a block of rows overflows L2 and each word row of b_s would be
    // written a line at a time by 16 row blocks: the transpose takes whole word rows after the centring.
    // 2-core Xeon, rbf_kernel bf16, alternating (ms): 1024 x 8192 12.5-13.5 -> 11.1-12.0, 2048 x 2048
    // 10.1-11.2 -> 9.7-10.1, 256 x 76,800 25.4-29.4 -> 28.7-29.7 (so not there).
    amx_dispatch(x, [&](auto typed) {
      const auto* x_p = x.const_data_ptr<typename decltype(typed)::type>();
      const bool fused = as_b && d_pad <= kAmxFusedTransposeFeatures;
      parallel_for(0, n_pad / 16, 4, [&](int64_t begin, int64_t end) {
        for (int64_t block = begin; block < end; ++block) {
          const int64_t i0 = block * 16, i1 = std::min(i0 + 16, n);
          double sq[16] = {};
          if (i0 < n) amx_centre_rows(x_p + i0 * d, d, d, shift_p, 0, i1 - i0, xb_p + i0 * ld_x, ld_x, sq, 0);
          for (int64_t a = i0; a < i1; ++a) norms_p[a] = static_cast<float>(sq[a - i0]);
          if (fused) transpose_words(words + i0 * (ld_x / 2), ld_x / 2, 16, 0, d_pad / 2, b_s_words + i0, ld_s);
        }
      });
      if (!as_b || fused) return;
      parallel_for(0, (d_pad / 2 + 15) / 16, 1, [&](int64_t begin, int64_t end) {
        transpose_words(words, ld_x / 2, n_pad, begin * 16, std::min(end * 16, d_pad / 2), b_s_words, ld_s);
      });
    });
  }
};

// S = the dot products of rows [i0, i0 + rows) of a with rows [j0, j0 + cols) of b (their xb and b_s) in
// fp32 (row stride ldc) by brgemm. With d_pad >= 1024 in depth chunks of 512 accumulated in S:
// whole, a 128 x 512 block's operands (512 KiB + 2 MiB at d = 2048) overflow a 2 MiB L2 (2-core Xeon,
// rbf_kernel 2048 x 2048: 24.6 -> 18.7 ms; 1024 x 8192: 35 -> 23 ms; at d = 768 one call was faster).
void amx_dots(const AmxOperands& a, const AmxOperands& b, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
              float* s, int64_t ldc) {
  const int64_t d_pad = a.d_pad, chunk = d_pad >= 1024 ? 512 : d_pad;
  const auto* xb_p = a.xb.const_data_ptr<at::BFloat16>() + i0 * a.ld_x;
  const auto* bs_p = as_bf16(b.b_s) + j0 * 2;  // (pair row k/2 of b_s: k/2 * ld_s words, 2 bf16 each)
  for (int64_t k0 = 0; k0 < d_pad; k0 += chunk)
    at::native::cpublas::brgemm(rows, cols, std::min(chunk, d_pad - k0), a.ld_x, b.ld_s, ldc, /*add_C=*/k0 > 0,
                                xb_p + k0, bs_p + k0 * b.ld_s, s);
}

// The dot products of the particles of op with each other on AMX, the upper triangle by tiles: blocks of
// kAmxRows rows, each with its tiles of kAmxCols columns from the block's diagonal on, every thread computing
// and visiting its own tiles. A block's share of the upper triangle shrinks with its index, so the blocks go
// out in pairs b and last - b, every pair about the same work. make_visit() gives a thread's visitor (with
// its own buffers); visit(s, i0, rows, j0, cols) gets a tile's fp32 dots (rows x cols, row stride cols) in
// the thread's buffer s, which it may overwrite.
template <typename MakeVisit>
void for_each_upper_amx_tile(const AmxOperands& op, MakeVisit&& make_visit) {
  const int64_t blocks = (op.n + kAmxRows - 1) / kAmxRows;
  parallel_for(0, (blocks + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(kAmxRows * kAmxCols);
    auto visit = make_visit();
    const auto rows_of = [&](int64_t block) {
      const int64_t i0 = block * kAmxRows, rows = std::min(kAmxRows, op.n - i0);
      for (int64_t j0 = i0; j0 < op.n; j0 += kAmxCols) {
        const int64_t cols = std::min(kAmxCols, op.n - j0);
        amx_dots(op, op, i0, rows, j0, cols, s.data(), cols);
        visit(s.data(), i0, rows, j0, cols);
      }
    };
    for (int64_t pair = begin; pair < end; ++pair) {
      rows_of(pair);
      if (blocks - 1 - pair != pair) rows_of(blocks - 1 - pair);
    }
    at::native::cpublas::brgemm_release();
  });
}

// The median's tiles on AMX (for_each_upper_amx_tile). (One shared tile at a time, its rows split across
// the threads, left them waiting at two barriers per tile.)
template <typename Visit>
void AmxTiles::operator()(Visit&& visit) const {
  const at::TensorOptions options = operands.norms.options();
  const int64_t n = operands.n;
  for_each_upper_amx_tile(operands, [&] {
    return [&](float* s, int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
      if (kept != nullptr) {  // the tile, and its transpose below it (a diagonal block: the same values)
        for (int64_t r = 0; r < rows; ++r) std::memcpy(kept + (i0 + r) * n + j0, s + r * cols, cols * sizeof(float));
        transpose_words(reinterpret_cast<const uint32_t*>(s), cols, rows, 0, cols,
                        reinterpret_cast<uint32_t*>(kept + j0 * n + i0), n);
      }
      visit(at::from_blob(s, {rows, cols}, options), i0, j0, 0, rows);
    };
  });
}

// kept: as AmxTiles::kept.
double median_sq_dist_amx(const AmxOperands& operands, float* kept = nullptr) {
  const AmxTiles tiles{operands, kept};
  // (the window's sample reads the rounded particles as they are: bf16; an fp32 copy of them cost more than
  // the sample at 1024 x 8192)
  return median_sq_dist<float>(operands.xb.narrow(0, 0, operands.n), operands.norms, tiles);
}

// rbf_kernel on AMX: K (a.n x b.n, the particles' dtype) between the particles of a and those of b
// (centred by the same shift; one object for a self kernel, whose own terms are exactly 1), computed as the
// step's K (bf16: rounded as the step's): blocks of 128 rows stream 512-column blocks of b, each tile's
// epilogue writing its values straight into K.
template <typename In>
at::Tensor rbf_kernel_amx(const AmxOperands& a, const AmxOperands& b, double h) {
  const bool self = &a == &b;
  const int64_t n = a.n, m = b.n;
  at::Tensor k = empty_large({n, m}, a.xb.options().dtype(a.dtype));
  const float* na_p = a.norms.const_data_ptr<float>();
  const float* nb_p = b.norms.const_data_ptr<float>();
  auto* k_p = k.mutable_data_ptr<In>();
  const float inv_h = static_cast<float>(1.0 / h);
  parallel_for(0, (n + kAmxRows - 1) / kAmxRows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(kAmxRows * kAmxCols);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i0 = block * kAmxRows, rows = std::min(kAmxRows, n - i0);
      for (int64_t j0 = 0; j0 < m; j0 += kAmxCols) {
        const int64_t cols = std::min(kAmxCols, m - j0);
        amx_dots(a, b, i0, rows, j0, cols, s.data(), kAmxCols);
        // (two sets: a diagonal offset of m puts no own term in any tile)
        amx_rbf_from_dots(s.data(), kAmxCols, rows, cols, cols, na_p + i0, nb_p + j0, inv_h, self ? i0 - j0 : m,
                          /*own_one=*/true, k_p + i0 * m + j0, m, /*rowsum=*/nullptr);
      }
    }
    at::native::cpublas::brgemm_release();
  });
  return k;
}

// A self kernel on AMX: K is symmetric, so a block of kAmxRows rows computes only its tiles from its own
// diagonal on (for_each_upper_amx_tile: about half the dot products and exps) and writes the columns right of
// its diagonal block a second time, transposed, below it. Every entry is written once (the entries left of a
// block's diagonal block are earlier blocks' transposes) and K[j][i] == K[i][j] exactly. A tile's K goes to
// the thread's own buffers first, as it is and transposed (bf16 as 32-bit words that hold a pair of rows:
// bf16_row_pairs, then transpose_words, which puts whole words into K's rows only with an even n: an odd n
// computes both triangles), and from there into K in whole streamed lines.
template <typename In>
at::Tensor rbf_kernel_amx_self(const AmxOperands& a, double h) {
  constexpr bool kBf16 = std::is_same_v<In, at::BFloat16>;
  constexpr int64_t kWordsPerRow = kBf16 ? kAmxRows / 2 : kAmxRows;  // a transposed tile's row, in words
  const int64_t n = a.n;
  at::Tensor k = empty_large({n, n}, a.xb.options().dtype(a.dtype));
  const float* norms_p = a.norms.const_data_ptr<float>();
  In* k_p = k.mutable_data_ptr<In>();
  const float inv_h = static_cast<float>(1.0 / h);
  const int64_t row_bytes = n * static_cast<int64_t>(sizeof(In));
  for_each_upper_amx_tile(a, [&] {
    return [&, rowsum = std::vector<float>(kAmxRows), tile = std::vector<In>(kAmxRows * kAmxCols),
            pairs = std::vector<uint32_t>(kBf16 ? kAmxRows / 2 * kAmxCols : 0),
            transposed = std::vector<uint32_t>(kAmxCols * kWordsPerRow)](
               float* s, int64_t i0, int64_t rows, int64_t j0, int64_t cols) mutable {
      // (with a row-sum buffer the epilogue stores the tile into the caches: it is read again below)
      amx_rbf_from_dots(s, cols, rows, cols, cols, norms_p + i0, norms_p + j0, inv_h, i0 - j0, /*own_one=*/true,
                        tile.data(), kAmxCols, rowsum.data());
      stream_rows(tile.data(), kAmxCols * sizeof(In), rows, cols * sizeof(In), k_p + i0 * n + j0, row_bytes);
      const int64_t first = std::max(j0, i0 + rows) - j0;  // the tile's first column right of the diagonal block
      if (first >= cols) return;
      const auto* right = reinterpret_cast<const uint32_t*>(tile.data() + first);
      if constexpr (kBf16) {  // (rows is even: n is, and i0 a multiple of kAmxRows)
        bf16_row_pairs(tile.data() + first, kAmxCols, 0, rows / 2, cols - first, pairs.data(), kAmxCols);
        right = pairs.data();
      }
      const int64_t words = kBf16 ? rows / 2 : rows;
      transpose_words(right, kAmxCols, words, 0, cols - first, transposed.data(), kWordsPerRow);
      stream_rows(transposed.data(), kWordsPerRow * 4, cols - first, words * 4, k_p + (j0 + first) * n + i0,
                  row_bytes);
    };
  });
  return k;
}

// From how many features a self kernel takes rbf_kernel_amx_self: there the dot products it saves outweigh
// its copies and transposes. 2-core Xeon, alternating with both triangles (ms): bf16 8192 x 64 13.0 -> 14.6,
// 8192 x 128 level, 8192 x 192 21.3 -> 20.0, 4096 x 256 6.6 -> 5.4, 4096 x 768 19.2 -> 13.8, 2048 x 2048
// 14.6 -> 11.6; fp32 4096 x 128 4.3 -> 5.4, 4096 x 256 9.1 -> 7.6, 2048 x 2048 14.7 -> 10.9.
constexpr int64_t kAmxSymmetricMinFeatures = 256;

at::Tensor rbf_kernel_amx(const AmxOperands& a, const AmxOperands& b, double h) {
  const bool symmetric = &a == &b && a.d >= kAmxSymmetricMinFeatures;
  if (a.dtype == at::kFloat) return symmetric ? rbf_kernel_amx_self<float>(a, h) : rbf_kernel_amx<float>(a, b, h);
  if (symmetric && a.n % 2 == 0) return rbf_kernel_amx_self<at::BFloat16>(a, h);
  return rbf_kernel_amx<at::BFloat16>(a, b, h);
}

// A self kernel on AMX (dtype: the particles') from all n x n dot products of its particles and their norms
// (kept by the median's pass, or the chunked Gram pass's: dots, which this overwrites), by blocks of
// kAmxRows rows: the same values as rbf_kernel_amx's from the same tiles.
at::Tensor rbf_kernel_from_dots(const at::Tensor& norms, const at::Tensor& dots, double h, at::ScalarType dtype) {
  const int64_t n = norms.size(0);
  at::Tensor k = empty_large({n, n}, norms.options().dtype(dtype));
  const float* norms_p = norms.const_data_ptr<float>();
  float* dots_p = dots.mutable_data_ptr<float>();
  const float inv_h = static_cast<float>(1.0 / h);
  amx_dispatch(k, [&](auto typed) {
    auto* k_p = k.mutable_data_ptr<typename decltype(typed)::type>();
    parallel_for(0, (n + kAmxRows - 1) / kAmxRows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i0 = begin * kAmxRows; i0 < std::min(end * kAmxRows, n); i0 += kAmxRows) {
        const int64_t rows = std::min(kAmxRows, n - i0);
        amx_rbf_from_dots(dots_p + i0 * n, n, rows, n, n, norms_p + i0, norms_p, inv_h, i0, /*own_one=*/true,
                          k_p + i0 * n, n, /*rowsum=*/nullptr);
      }
    });
  });
  return k;
}

// phi of bf16 or fp32 particles (contiguous) into out (n x d, their dtype, contiguous); returns whether phi
// is all finite (tracked by the last pass). Any NaN/Inf input makes phi non-finite here: a bad x value makes
// its column's mean, and so every particle's centred value there, non-finite; a bad score value makes W's
// row, and AMX multiplies every K entry into it (0 * NaN = NaN: no product is skipped).
template <typename In>
bool svgd_step_amx(const at::Tensor& x, const at::Tensor& score, const std::optional<double>& bandwidth,
                   at::Tensor& out) {
  using at::native::cpublas::brgemm;
  const int64_t n = x.size(0), d = x.size(1);
  const AmxOperands operands(x);
  const int64_t n_pad = operands.n_pad;
  // With the median rule the median's pass may keep the dot products for K (keeps_dots).
  const bool keep = !bandwidth && keeps_dots(n, d, sizeof(float), kAmxKeptDotsMinFeatures);
  const at::Tensor kept = keep ? empty_large({n, n}, x.options().dtype(at::kFloat)) : at::Tensor();
  float* kept_p = keep ? kept.mutable_data_ptr<float>() : nullptr;
  const double h = bandwidth ? *bandwidth : bandwidth_from_median(median_sq_dist_amx(operands, kept_p), n);
  const float a = static_cast<float>(2.0 / h);
  const auto* x_p = x.const_data_ptr<In>();
  const auto* score_p = score.const_data_ptr<In>();
  const float* shift_p = operands.shift.const_data_ptr<float>();
  // W = score - a xc for K W in AMX's pair-interleaved layout (n_pad/2 x d words, row stride ld_w), zero
  // rows beyond n
  const int64_t ld_w = amx_b_stride(d);
  const at::Tensor b_w = empty_large({n_pad / 2, ld_w}, x.options().dtype(at::kInt));
  auto* b_w_words = reinterpret_cast<uint32_t*>(b_w.mutable_data_ptr<int32_t>());
  parallel_for(0, n_pad / 2, 32, [&](int64_t begin, int64_t end) {
    amx_w_pairs(score_p, x_p, d, d, shift_p, a, n, begin, end, b_w_words, ld_w, 0);
  });

  const at::Tensor rowsum = at::zeros({n}, x.options().dtype(at::kFloat));
  const auto* bw_p = as_bf16(b_w);
  const float* norms_p = operands.norms.const_data_ptr<float>();
  float* rowsum_p = rowsum.mutable_data_ptr<float>();
  const float inv_h = static_cast<float>(1.0 / h);
  auto* out_p = out.mutable_data_ptr<In>();
  std::atomic<bool> finite{true};
  // phi = (K W + (2/H) rowsum(K) xc + score) / n: the own term k_ii = 1 is left out of K and added here
  const auto finish = [&](const float* acc, int64_t ld_acc, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    if (!amx_finish_rows(acc, ld_acc, rowsum_p, x_p, score_p, shift_p, a, static_cast<float>(n), d, r0, r1, c0, c1,
                         out_p))
      finite.store(false, std::memory_order_relaxed);
  };
  // With many features a block's rows x d fp32 accumulator leaves the caches: then, with a block's K rows
  // small enough to keep (n_pad bf16 each), K W goes a chunk of kAmxFinishCols features at a time, each
  // finished while in L2 (no n x d accumulator written and read back). 2-core Xeon, alternating: 512 x 4096
  // 6.5 -> 5.45 ms, 1024 x 8192 49-53 -> 47 ms, 256 x 76,800 50-53 -> 46-50 ms; at 2048 x 2048 (K rows of
  // 2048 kept) 36 -> 41 ms, so not beyond 1024 particles.
  const bool by_chunks = d >= 2 * kAmxFinishCols && n_pad <= kAmxKeptColumns;
  const at::Tensor acc = by_chunks ? at::Tensor() : empty_large({n, d}, rowsum.options());
  parallel_for(0, (n + kAmxRows - 1) / kAmxRows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(kAmxRows * kAmxCols);
    const int64_t ld_k = by_chunks ? amx_a_stride(n_pad) : kAmxCols;
    std::vector<at::BFloat16> k16(kAmxRows * ld_k);
    std::vector<float> chunk(by_chunks ? kAmxRows * kAmxFinishCols : 0);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i0 = block * kAmxRows, rows = std::min(kAmxRows, n - i0);
      for (int64_t j0 = 0; j0 < n; j0 += kAmxCols) {
        const int64_t cols = std::min(kAmxCols, n - j0), depth = (cols + 31) / 32 * 32;
        float* dots = keep ? kept_p + i0 * n + j0 : s.data();
        if (!keep) amx_dots(operands, operands, i0, rows, j0, cols, s.data(), kAmxCols);
        at::BFloat16* k_tile = k16.data() + (by_chunks ? j0 : 0);
        amx_rbf_from_dots(dots, keep ? n : kAmxCols, rows, cols, depth, norms_p + i0, norms_p + j0, inv_h, i0 - j0,
                          /*own_one=*/false, k_tile, ld_k, rowsum_p + i0);
        if (!by_chunks)
          brgemm(rows, d, depth, kAmxCols, ld_w, d, /*add_C=*/j0 > 0, k_tile, bw_p + j0 * ld_w,
                 acc.mutable_data_ptr<float>() + i0 * d);
      }
      if (by_chunks) {
        for (int64_t c0 = 0; c0 < d; c0 += kAmxFinishCols) {
          const int64_t width = std::min(kAmxFinishCols, d - c0);
          brgemm(rows, width, n_pad, ld_k, ld_w, kAmxFinishCols, /*add_C=*/false, k16.data(), bw_p + 2 * c0,
                 chunk.data());
          finish(chunk.data(), kAmxFinishCols, i0, i0 + rows, c0, c0 + width);
        }
      }
    }
    at::native::cpublas::brgemm_release();
  });
  if (!by_chunks) {
    parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      finish(acc.const_data_ptr<float>() + begin * d, d, begin, end, 0, d);
    });
  }
  return finite.load();
}

// ---- few particles on AMX, by feature chunks ----------------------------------------------------
//
// With few particles and many features the tiled step's operands (xb, its transpose b_s and W, each as
// large as x) go to memory and come back: about a dozen passes over n x d values where the step needs four
// (x twice, score once, phi written). Here the threads take chunks of features instead, as on the Gram
// path: the Gram pass takes each chunk's column means (the same shift as amx_shift's), centres, rounds and
// transposes the chunk in L2 and adds its dot products into the thread's own n x n sums (their upper
// triangle by blocks of kAmxRows rows: 3/4 of the products at 256 particles, 5/8 at 512); the apply pass
// forms a chunk of W, multiplies it by K and finishes phi while the chunk's x and score are still in L2.
// Each pass prefetches the next chunk's rows into L2 while the current one is multiplied. The arithmetic
// is the tiled AMX step's (the same bf16 operands, fp32 sums), the dot products summed in another order
// (a part of the chunks per thread, then the parts' sums in order: the same bits whichever thread ran which).
//
// Where: from kAmxChunkedMinFeatures(n_pad) features, up to 512 particles (the n x n sums per thread and K
// stay in L2). With fewer features there are too few chunks for the threads, and with more particles the
// tiled path's symmetry and its tiles' reuse win. 2-core Xeon (Emerald Rapids), bf16 step, alternating,
// tiled -> chunked (ms): 128 x 512 0.145 -> 0.103, 128 x 1024 0.27 -> 0.17, 128 x 4096 1.04 -> 0.56,
// 128 x 76,800 27.4 -> 9.4; 256 x 512 0.30 -> 0.33, 256 x 2048 level, 256 x 4096 1.8 -> 1.65, 256 x
// 76,800 42 -> 27; 384 x 8192 7.2 -> 6.8; 512 x 4096 4.5 -> 6.0, 512 x 8192 9.5 -> 11, 512 x 12,288
// level, 512 x 20,000 27.8 -> 23, 512 x 32,768 52 -> 41. Chunks of 128 features (the same at 64, slower
// from 256: 256 x 76,800 27 -> 29 ms at 256, 33 ms at 512).
constexpr int64_t kAmxChunkedMaxParticles = 512;
constexpr int64_t kAmxFeatureChunk = 128;  // a multiple of 32 (AMX's bf16 depth) and of 16 (transpose_words)

int64_t amx_chunked_min_features(int64_t n_pad) {
  return n_pad <= 128 ? 512 : n_pad * n_pad / 16;
}

bool use_amx_chunked(int64_t n, int64_t d) {
  const int64_t n_pad = (n + 31) / 32 * 32;
  return n_pad <= kAmxChunkedMaxParticles && d >= amx_chunked_min_features(n_pad);
}

template <typename In>
ChunkedGram amx_gram_chunked(const at::Tensor& x) {
  const int64_t n = x.size(0), d = x.size(1), n_pad = (n + 31) / 32 * 32;
  const int64_t chunk = kAmxFeatureChunk, chunks = (d + chunk - 1) / chunk;
  const int64_t ld_a = amx_a_stride(chunk), ld_b = amx_b_stride(n_pad);
  // The chunks go to `parts` contiguous ranges, each summed into its own n x n dots (only their upper
  // triangle by row blocks is written and read) and squares; the parts' sums are then added in part order,
  // so the result does not depend on which thread ran which part.
  const int64_t parts = std::clamp<int64_t>(
      std::min<int64_t>(at::get_num_threads(), kGramPartsMaxBytes / (n * n * int64_t{sizeof(float)})), 1, chunks);
  const auto options = x.options().dtype(at::kFloat);
  ChunkedGram out{at::empty({d}, options), at::empty({n}, options), at::empty({n, n}, options)};
  const In* x_p = x.const_data_ptr<In>();
  float* shift_p = out.shift.mutable_data_ptr<float>();
  const std::unique_ptr<float[]> dots(new float[parts * n * n]);  // (each part's first products initialise)
  std::vector<double> sq(parts * n, 0.0);
  parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    std::vector<at::BFloat16> a(n_pad * ld_a, at::BFloat16(0.f));  // rows [n, n_pad) stay zero
    std::vector<uint32_t> b(chunk / 2 * ld_b);
    std::vector<double> sums(chunk);
    const auto* words = reinterpret_cast<const uint32_t*>(a.data());
    for (int64_t t = part_begin; t < part_end; ++t) {
      const int64_t begin = t * chunks / parts, end = (t + 1) * chunks / parts;
      for (int64_t c = begin; c < end; ++c) {
        const int64_t c0 = c * chunk, width = std::min(chunk, d - c0), depth = (width + 31) / 32 * 32;
        amx_column_sums(x_p + c0, d, n, 0, width, sums.data());
        for (int64_t k = 0; k < width; ++k) shift_p[c0 + k] = static_cast<float>(sums[k] / static_cast<double>(n));
        const int64_t ahead = c + 1 < end ? chunk : 0;  // (the next chunk's x into L2 during the products)
        amx_centre_rows(x_p + c0, d, width, shift_p + c0, 0, n, a.data(), ld_a, sq.data() + t * n, ahead);
        transpose_words(words, ld_a / 2, n_pad, 0, depth / 2, b.data(), ld_b);
        for (int64_t i0 = 0; i0 < n; i0 += kAmxRows) {  // the upper triangle by blocks of rows
          at::native::cpublas::brgemm(std::min(kAmxRows, n - i0), n - i0, depth, ld_a, ld_b, n, /*add_C=*/c > begin,
                                      a.data() + i0 * ld_a, reinterpret_cast<const at::BFloat16*>(b.data()) + 2 * i0,
                                      dots.get() + t * n * n + i0 * n + i0);
        }
      }
    }
    at::native::cpublas::brgemm_release();
  });
  float* dots_p = out.dots.mutable_data_ptr<float>();
  float* norms_p = out.norms.mutable_data_ptr<float>();
  parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {  // the upper triangle: the parts' sums
    for (int64_t i = begin; i < end; ++i) {
      float* row = dots_p + i * n;
      std::copy(dots.get() + i * n + i, dots.get() + (i + 1) * n, row + i);
      for (int64_t t = 1; t < parts; ++t)
        for (int64_t j = i; j < n; ++j) row[j] += dots[t * n * n + i * n + j];
      double total = 0.0;
      for (int64_t t = 0; t < parts; ++t) total += sq[t * n + i];
      norms_p[i] = static_cast<float>(total);
    }
  });
  mirror_upper_triangle(dots_p, n);
  return out;
}

// Up to how many particles "auto" takes the Gram path where the AMX path would take the same particles
// (bf16, or fp32 under bf16 matmuls; from 32 features): 32 where the AMX path would take 33 by feature
// chunks (from 512 features), which is faster there. 2-core Xeon, bf16 step, alternating, Gram -> chunked
// AMX (ms): 64 x 76,800 8.1-8.3 -> 4.4-4.7, 64 x 409,600 45-49 -> 24-27, 64 x 8192 0.77-0.85 -> 0.48-0.58,
// 48 x 76,800 4.6 -> 3.4, 48 x 2048 0.14 -> 0.10-0.13; 32 x 76,800 and 32 x 8192 level, 16 x 409,600
// 3.3-3.4 -> 6.1-6.3.
constexpr int64_t kAmxGramMaxParticles = 32;

// Otherwise, on AMX shapes, up to kGramMaxParticles and up to kGramWideMaxParticles where n^2 <= 8 d: there the
// Gram pass and the packed apply pass beat the GEMMs by feature chunks. 2-core Xeon (Emerald Rapids), fp32,
// best of 2 alternating rounds, the step with H given, Gram / chunks (ms): 65 x 1024 0.17 / 0.27, 96 x 2048
// 0.48 / 0.67, 128 x 2048 0.84 / 0.97, 128 x 4096 1.43 / 1.89, 160 x 12,288 6.2 / 7.5, 192 x 12,288 8.4 /
// 9.4; past the rule 128 x 1024 0.57 / 0.54, 192 x 2048 1.89 / 1.75, 192 x 4096 3.4 / 3.4 (by the median
// rule 3.8 / 3.4), 96 x 512 0.24 / 0.22, 256 x 12,288 and 256 x 32,768 level; fp64 gained more (128 x 2048
// 1.46 / 2.24, 65 x 8192 1.6 / 3.5). Against the previous build, 3 rounds, fp32, the step with H given:
// 128 x 76,800 27-36 -> 23-25, 160 x 76,800 49-50 -> 35-40, 192 x 76,800 54-66 -> 48-56, 96 x 409,600
// 118-126 -> 72-75; rbf_kernel(x) 128 x 76,800 12.4-15.5 -> 8.2-11.2, 96 x 409,600 55-57 -> 25-26, 192 x
// 76,800 level, 192 x 20,000 6.5-6.9 -> 7.1-7.3. (That rule, n <= 64 at any d, was every shape's until
// 2026-12-05; it is kept where AMX would take the particles, which no later session could measure.)
int64_t amx_gram_max_particles(const at::Tensor& x) {
  if (use_amx_chunked(kAmxGramMaxParticles + 1, x.size(1))) return kAmxGramMaxParticles;
  // (floor(sqrt(8 d)): exact for the d below 192^2 / 8 that the clamp leaves, as sqrt is correctly rounded)
  const auto wide = static_cast<int64_t>(std::sqrt(8.0 * static_cast<double>(x.size(1))));
  return std::clamp(wide, kGramMaxParticles, kGramWideMaxParticles);
}

// The Gram path for n <= always particles, and beyond (up to kGramRuleMaxParticles) where n^power <=
// per_feature * d: its Gram pass goes over the features a column at a time and its costs per pair (a double
// exp, the median's selection over all n^2 distances in double) are several times the fused kernels', so
// the more particles, the more features it needs. Measured on the 2-core AMD EPYC (Zen 4), ops called with
// "gram" against "tiled" (or, where the op has no algorithm argument, a build that forces either),
// interleaved, median of 5, n in {16, 24, 32, 40, 48, 64, 96, 128, 192}, d from 1 to 16,384; each rule
// sits at the crossover (both paths within ~10 %) and misses the better path by at most ~1.5x near it
// (n = 96 and 128, where the timings jumped between neighbouring d). Gram / tiled, fp32 (us): the step
// with H given 64 x 8 37 / 11, 64 x 256 65 / 76, 192 x 4096 2830 / 3479; median_bandwidth 64 x 8 24 / 15,
// 48 x 64 14 / 18 (the step with the median, which takes the median's rule, 64 x 8 44 / 22, 64 x 128 59 /
// 61, 64 x 1024 148 / 257); rbf_kernel(x) 64 x 16 39 / 11, 64 x 512 65 / 82. 16-bit particles (bf16 off
// AMX measured) follow fp32's crossovers; fp64 takes the Gram path from fewer features (its fused kernels
// have half the lanes). The rules hold up to 512 particles (since a later 2026-12-05 session; 192 before),
// beyond the 192 of the first sweep: Gram / tiled with many features (ms), fp32 the step with H given 256 x
// 4096 5.0 / 5.7, 256 x 16,384 18.6 / 22.9, 384 x 16,384 40.9 / 46.5, 512 x 32,768 145 / 157 (512 x 4096
// level); median_bandwidth 256 x 16,384 8.2 / 9.7, 384 x 16,384 17.2 / 18.8 (384 x 4096 5.8 / 4.9: the
// rule keeps the tiled path there); rbf_kernel(x) 256 x 16,384 7.1 / 9.1, 384 x 32,768 31 / 36, 512 x 32,768
// 58 / 59; fp64 the step 256 x 2048 4.5 / 7.1, 512 x 16,384 139 / 184, rbf_kernel(x) 256 x 4096 3.3 / 4.9,
// 512 x 16,384 54 / 62. Not beyond: in fp32 the Gram path was at most ~8 % ahead at 512 particles.
struct GramRule {
  int64_t always;
  int power;
  int64_t per_feature;
};

GramRule gram_rule(GramUse use, bool fp64) {
  switch (use) {
    case GramUse::kStep:
      return fp64 ? GramRule{16, 2, 48} : GramRule{16, 2, 16};
    case GramUse::kMedian:
      return fp64 ? GramRule{48, 3, 8192} : GramRule{32, 3, 4096};
    case GramUse::kKernel:
      return fp64 ? GramRule{0, 2, 24} : GramRule{0, 2, 8};
  }
  return {0, 2, 0};
}

bool prefers_gram(const at::Tensor& x, GramUse use) {
  const int64_t n = x.size(0), d = x.size(1);
  if (use_amx(x)) return n <= amx_gram_max_particles(x);
  if (n > kGramRuleMaxParticles) return false;
  const GramRule rule = gram_rule(use, x.scalar_type() == at::kDouble);
  const int64_t n_power = rule.power == 3 ? n * n * n : n * n;  // (n <= kGramRuleMaxParticles: no overflow)
  return n <= rule.always || n_power <= rule.per_feature * d;
}

bool use_gram(const at::Tensor& x, Algorithm algorithm, GramUse use) {
  if (algorithm == Algorithm::kAuto) return prefers_gram(x, use);
  return algorithm == Algorithm::kGram;
}

ChunkedGram amx_gram_chunked(const at::Tensor& x) {
  return amx_dispatch(x, [&](auto typed) { return amx_gram_chunked<typename decltype(typed)::type>(x); });
}

// svgd_step_amx's phi (its contract) for use_amx_chunked shapes.
template <typename In>
bool svgd_step_amx_chunked(const at::Tensor& x, const at::Tensor& score, const std::optional<double>& bandwidth,
                           at::Tensor& out) {
  using at::native::cpublas::brgemm;
  const int64_t n = x.size(0), d = x.size(1), n_pad = (n + 31) / 32 * 32;
  const ChunkedGram gram = amx_gram_chunked<In>(x);
  const double h = bandwidth ? *bandwidth : bandwidth_from_median(median_sq_dist_chunked(gram), n);
  const float a = static_cast<float>(2.0 / h), inv_h = static_cast<float>(1.0 / h);
  // K without its own terms (bf16, an A operand: columns [n, n_pad) zero) and its fp32 row sums
  const int64_t ld_k = amx_a_stride(n_pad);
  std::vector<at::BFloat16> k16(n * ld_k);
  std::vector<float> rowsum(n, 0.f);
  const float* norms_p = gram.norms.const_data_ptr<float>();
  float* dots_p = gram.dots.mutable_data_ptr<float>();
  parallel_for(0, (n + 15) / 16, 1, [&](int64_t begin, int64_t end) {
    const int64_t i0 = begin * 16, rows = std::min(end * 16, n) - i0;
    amx_rbf_from_dots(dots_p + i0 * n, n, rows, n, n_pad, norms_p + i0, norms_p, inv_h, i0, /*own_one=*/false,
                      k16.data() + i0 * ld_k, ld_k, rowsum.data() + i0);
  });

  const int64_t chunk = kAmxFeatureChunk, chunks = (d + chunk - 1) / chunk, ld_w = amx_b_stride(chunk);
  const auto* x_p = x.const_data_ptr<In>();
  const auto* score_p = score.const_data_ptr<In>();
  const float* shift_p = gram.shift.const_data_ptr<float>();
  auto* out_p = out.mutable_data_ptr<In>();
  std::atomic<bool> finite{true};
  parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> w(n_pad / 2 * ld_w);
    std::vector<float> acc(n * chunk);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t c0 = c * chunk, width = std::min(chunk, d - c0);
      const int64_t ahead = c + 1 < end ? chunk : 0;
      amx_w_pairs(score_p + c0, x_p + c0, d, width, shift_p + c0, a, n, 0, n_pad / 2, w.data(), ld_w, ahead);
      brgemm(n, width, n_pad, ld_k, ld_w, chunk, /*add_C=*/false, k16.data(),
             reinterpret_cast<const at::BFloat16*>(w.data()), acc.data());
      if (!amx_finish_rows(acc.data(), chunk, rowsum.data(), x_p, score_p, shift_p, a, static_cast<float>(n), d, 0, n,
                           c0, c0 + width, out_p))
        finite.store(false, std::memory_order_relaxed);
    }
    at::native::cpublas::brgemm_release();
  });
  return finite.load();
}

// ---- Gram path -----------------------------------------------------------------------------------

int64_t gram_chunk(int64_t n) {
  // The (rows x chunk) fp32 buffer of gram_columns stays within 16 KiB of L1 up to 16 rows; a multiple of
  // 64 columns (whole cache lines in every dtype: the unit in which the threads share the columns of both
  // passes). At least 256 columns: each register block reloads its accumulators once per chunk, and with
  // 64 rows a 64-column chunk spent as many loads and stores on them as on its own FMAs (2-core Xeon,
  // A/B: rbf_kernel 64 x 76,800 5.4-6.0 -> 3.6-4.0 ms; 64 rows x 256 columns are 64 KiB, served by L2).
  const int64_t rows = (n + 3) / 4 * 4;
  return std::clamp<int64_t>(4096 / rows / 64 * 64, 256, 1 << 20);
}

// The n x n squared distances (row-major, exact zeros on the diagonal) of the Gram path, and with shift
// (d entries) the column means for the apply pass. Everything after the pass over x is plain loops on n^2
// numbers: as tensor ops it was a dozen tiny calls, a noticeable share of a step at d ~ 10^4..10^5.
// The Gram path's compute type: fp64 for fp64 inputs, else fp32.
template <typename In>
using gram_compute_t = std::conditional_t<std::is_same_v<In, double>, double, float>;

// `size` doubles summed over blocks [0, blocks) of columns: the threads of at::parallel_for (grain
// blocks at least) each add fn(begin, end, sums) into zeroed sums of their own, then those are added up.
template <typename F>
std::vector<double> column_block_sums(int64_t size, int64_t blocks, int64_t grain, const F& fn) {
  const int64_t threads = at::get_num_threads();
  std::vector<double> partial(threads * size, 0.0);
  parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    fn(begin, end, partial.data() + at::get_thread_num() * size);
  });
  for (int64_t t = 1; t < threads; ++t)
    for (int64_t q = 0; q < size; ++q) partial[q] += partial[t * size + q];
  partial.resize(size);
  return partial;
}

// Over the rows of x, then those of y when given (contiguous, x's dtype and columns; not copied together).
template <typename In>
std::vector<double> sq_dists_gram(const at::Tensor& x, gram_compute_t<In>* shift = nullptr,
                                  const at::Tensor* y = nullptr) {
  const int64_t nx = x.size(0), n = nx + (y ? y->size(0) : 0), d = x.size(1);
  const int64_t chunk = gram_chunk(n);
  const In* xp = x.data_ptr<In>();
  const In* yp = y ? y->data_ptr<In>() : nullptr;
  const std::vector<double> gram =  // the upper triangle i <= j
      column_block_sums(n * n, (d + chunk - 1) / chunk, 1, [&](int64_t begin, int64_t end, double* sums) {
        gram_columns(xp, yp, nx, n, d, begin * chunk, std::min(end * chunk, d), chunk, sums, shift);
      });
  std::vector<double> dist(n * n, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j)
      dist[i * n + j] = dist[j * n + i] =
          std::max(gram[i * n + i] + gram[j * n + j] - 2.0 * gram[i * n + j], 0.0);
  return dist;
}

// Up to this many pairs (n * m) rbf_kernel of two sets and its gradient go by direct differences of
// the rows (no centred copies, no GEMM). With one prompt against 16 particles at d = 76,800 (the trainer's
// kernel-density prior) the GEMM-form gradient made centred copies of both sets, zeroed and wrote the
// particles' gradient that nobody asked for, and took longer than naive torch autograd. On a 2-core Xeon
// (AVX-512) the direct gradient was faster up to 64 x 64 pairs at d = 76,800 (both gradients 14.8 against
// 22.0 ms) and slower from 128 x 128 (11.7 against 10.8 ms at d = 20,000).
constexpr int64_t kRbfDirectMaxPairs = 4096;

// Beyond kRbfDirectMaxPairs, the direct differences of two sets (forward and gradients) where the smaller set
// has few rows against the features: d >= max(64, kRbfDirectWideFeaturesPerRow * min(n, m)). Their register
// blocks read the larger set once per block of rows, where the GEMM path writes centred copies of both sets
// and goes through torch's GEMM, which on AMD (torch's MKL) ran at a fraction of the direct kernels' rate on
// skinny shapes. Up to kRbfDirectWideMaxPairs pairs (the direct paths hold n x m doubles).
constexpr int64_t kRbfDirectWideFeaturesPerRow = 32;
constexpr int64_t kRbfDirectWideMaxPairs = int64_t{1} << 20;
bool wide_direct(int64_t n, int64_t m, int64_t d) {
  return n * m <= kRbfDirectWideMaxPairs && d >= std::max<int64_t>(64, kRbfDirectWideFeaturesPerRow * std::min(n, m));
}

// Whether rbf_kernel of two sets takes the direct differences: up to kRbfDirectMaxPairs / 4 pairs always
// (the trainer's prior, one prompt against M particles: 1 x 64 fp32 2-4x faster than the GEMM path at any
// d), up to kRbfDirectMaxPairs with at least 8 features per row of the smaller set, beyond by wide_direct.
// Each pair's distance takes a horizontal sum and a double exp, ~20-50 ns a pair with few features, where the
// GEMM path's vectorised exp over the tile costs a few ns: 2-core AMD EPYC (Zen 4), fp32, median of 5 (us),
// direct / GEMM: 64 x 64 d = 2 85 / 26, d = 128 56 / 42, d = 512 90 / 98, d = 1024 147 / 646; 16 x 256 d =
// 2 85 / 27, d = 128 58 / 51, d = 256 68 / 76; 4 x 1024 d = 2 203 / 32, d = 16 46 / 37, d = 64 53 / 61; 32
// x 32 d = 2 26 / 25, d = 16 16 / 24. Beyond 4096 pairs, 2-core AMD EPYC (Zen 5), fp32, libgomp's default
// wait policy, best of 3 (us; the GEMM path with its centred copies on huge pages): 4 x 4096 d = 64 114 /
// 122, d = 128 131 / 229, d = 4096 4014 / 28,235 (before those copies); 16 x 1024 d = 256 154 / 129, d = 512
// 205 / 246; 128 x 128 d = 1024 213 / 240, d = 4096 768 / 1003; 2 x 20,000 d = 32 254 / 280, d = 64 288 /
// 463; 4 x 32,768 d = 64 967 / 911; 16 x 8192 d = 256 1313 / 1191; 32 x 4096 d = 512 1681 / 1553; 64 x 1024
// d = 2048 1477 / 2033; 256 x 256 d = 8192 5531 / 6574; 512 x 512 d = 8192 22,833 / 24,913; 1 x 100,000 d =
// 16 658 / 610, d = 64 1047 / 4170 (with OMP_WAIT_POLICY=PASSIVE direct gained more). Not beyond
// kRbfDirectMaxPairs where AMX takes the particles (amx: unmeasured against its tiles). (Until 2026-12-05
// every shape up to kRbfDirectMaxPairs, and none beyond.)
bool direct_cross_kernel(int64_t n, int64_t m, int64_t d, bool amx) {
  const int64_t pairs = n * m;
  if (pairs <= kRbfDirectMaxPairs / 4) return true;
  if (pairs <= kRbfDirectMaxPairs) return d >= 8 * std::min(n, m);
  return !amx && wide_direct(n, m, d);
}

// The n x m squared distances between the rows of x and y (contiguous, same dtype and columns) by direct
// differences, column blocks split across threads.
template <typename In>
std::vector<double> cross_sq_dists_threaded(const at::Tensor& x, const at::Tensor& y) {
  const int64_t n = x.size(0), m = y.size(0), d = x.size(1);
  const In* xp = x.data_ptr<In>();
  const In* yp = y.data_ptr<In>();
  constexpr int64_t kBlock = 512;  // columns: whole 2 KiB chunks of the kernel for float, two for double
  const int64_t grain = std::max<int64_t>(1, ((int64_t{1} << 16) / (n + m)) / kBlock);
  return column_block_sums(n * m, (d + kBlock - 1) / kBlock, grain, [&](int64_t begin, int64_t end, double* sums) {
    cross_sq_dists(xp, yp, n, m, d, begin * kBlock, std::min(end * kBlock, d), sums);
  });
}

// Writes phi into `phi` (contiguous, x's shape and dtype) and returns whether all of it is finite
// (tracked by the apply pass in registers: no pass over phi).
template <typename In>
bool svgd_step_gram(const at::Tensor& x, const at::Tensor& score, const std::optional<double>& bandwidth,
                    const at::Tensor& phi) {
  using T = gram_compute_t<In>;
  const int64_t n = x.size(0), d = x.size(1);
  const std::unique_ptr<T[]> shift(new T[d]);  // every entry written by the Gram pass: not zeroed first
  std::vector<double> k = sq_dists_gram<In>(x, shift.get());  // the distances, then (below) K in place
  const double h = bandwidth ? *bandwidth : bandwidth_from_median(median_of_gram_dists(k, n), n);
  const double a = 2.0 / h;
  // kn = K / n off the diagonal (0 on it: the apply pass adds a row's own term g_i / n itself) and
  // c = a (rowsum(K) - 1) / n, rows padded to the apply kernel's register block with zeros.
  const int64_t rows = (n + kApplyRows - 1) / kApplyRows * kApplyRows;
  std::vector<T> kn(rows * n, T(0)), c(rows, T(0));
  // K in place, vectorised over all n^2 entries (symmetric as the distances; the diagonal's 1 is not read):
  // one scalar double exp per pair cost more than the rest of a step of 64 x 8 particles outside its two
  // passes (perf, one thread, 2-core AMD EPYC Zen 5)
  exp_scaled(k.data(), n * n, -1.0 / h);
  for (int64_t i = 0; i < n; ++i) {
    double rowsum = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      if (j == i) continue;
      kn[i * n + j] = static_cast<T>(k[i * n + j] / static_cast<double>(n));
      rowsum += k[i * n + j];
    }
    c[i] = static_cast<T>(rowsum * (a / static_cast<double>(n)));
  }

  const int64_t chunk = gram_chunk(n);
  const int64_t num_chunks = (d + chunk - 1) / chunk;
  std::atomic<bool> finite{true};
  parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    if (!apply_columns(x.data_ptr<In>(), score.data_ptr<In>(), phi.data_ptr<In>(), n, d, begin * chunk,
                       std::min(end * chunk, d), shift.get(), kn.data(), c.data(), static_cast<T>(a)))
      finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

}  // namespace

int64_t serial_max_work() {
  static const int64_t bound = [] {
    const char* env = std::getenv("BMT_FAST_CPU_SERIAL_MAX_WORK");
    return env != nullptr ? std::max<int64_t>(0, std::atoll(env)) : kSerialMaxWork;
  }();
  return bound;
}

bool takes_gram_path(const at::Tensor& x, std::string_view op) {
  BMT_CHECK(x.dim() == 2, "takes_gram_path: x must be 2-D (n, d), got ", x.dim(), "-D");
  if (op == "svgd_step") return prefers_gram(x, GramUse::kStep);
  if (op == "median_bandwidth") return prefers_gram(x, GramUse::kMedian);
  if (op == "rbf_kernel") return prefers_gram(x, GramUse::kKernel);
  BMT_CHECK(false, "takes_gram_path: op must be \"svgd_step\", \"median_bandwidth\" or \"rbf_kernel\", got \"",
            std::string(op), "\"");
  return false;
}

bool float32_matmul_in_bf16() {
  return at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL) ==
         at::Float32Precision::BF16;
}

bool bf16_amx_enabled() {
  // (read once: the Python layer reads it once too, through build_info, to know which path flags phi)
  static const bool enabled = [] {
    const char* env = std::getenv("BMT_FAST_CPU_AMX");
    return at::native::cpublas::could_pack(at::kBFloat16) && (env == nullptr || std::string_view(env) != "0");
  }();
  return enabled;
}

// ---- ops -----------------------------------------------------------------------------------------

namespace {

// phi into `out` (contiguous, x's shape and dtype; checked by the callers). Returns whether phi is all
// finite where the last pass that writes phi tracks it (the Gram, AMX, feature-chunk and fused paths, fp32
// GEMM tiles), nullopt elsewhere (svgd_step_into then scans phi).
// The path svgd_step_to takes for particles x (n x d) with a given bandwidth or by the median rule.
enum class StepPath { kGram, kAmx, kGemmChunked, kFused, kTiled };

StepPath step_path(const at::Tensor& x, Algorithm algorithm, bool bandwidth_given) {
  if (use_gram(x, algorithm, bandwidth_given ? GramUse::kStep : GramUse::kMedian)) return StepPath::kGram;
  if (use_amx(x)) return StepPath::kAmx;
  if (use_gemm_gram_chunked(x.size(0), x.size(1))) return StepPath::kGemmChunked;
  return use_fused(x.size(1)) ? StepPath::kFused : StepPath::kTiled;
}

std::optional<bool> svgd_step_to(const at::Tensor& x_in, const at::Tensor& score_in, const std::optional<double>& h,
                                 std::string_view algorithm, at::Tensor& out) {
  const at::Tensor x = x_in.contiguous(), score = score_in.contiguous();
  const StepPath path = step_path(x, parse_algorithm(algorithm), h.has_value());
  // The Gram path's two passes in one team (team.h): fp32, PASSIVE, alternating, 3 rounds, two regions ->
  // one team (us): 4 x 409,600 828-872 -> 771-780, 16 x 76,800 875-925 -> 795-798, 16 x 409,600 and 64 x
  // 76,800 level.
  if (path == StepPath::kGram) {
    bool finite = true;
    run_team([&] {
      finite = AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "svgd_step_gram",
                                               [&] { return svgd_step_gram<scalar_t>(x, score, h, out); });
    });
    return finite;
  }
  if (path == StepPath::kAmx) {
    bool finite = true;
    run_team_if(amx_in_team(x.size(0)), [&] {
      finite = amx_dispatch(x, [&](auto typed) {
        using In = typename decltype(typed)::type;
        return use_amx_chunked(x.size(0), x.size(1)) ? svgd_step_amx_chunked<In>(x, score, h, out)
                                                      : svgd_step_amx<In>(x, score, h, out);
      });
    });
    return finite;
  }
  if (path == StepPath::kGemmChunked) {
    bool finite = true;
    run_team([&] {
      finite = x.scalar_type() == at::kDouble ? svgd_step_gemm_chunked<double>(x, score, h, out)
                                              : svgd_step_gemm_chunked<float>(x, score, h, out);
    });
    return finite;
  }
  if (path == StepPath::kFused) {
    return x.scalar_type() == at::kDouble ? svgd_step_fused<double>(x, score, h, out)
                                          : svgd_step_fused<float>(x, score, h, out);
  }
  return x.scalar_type() == at::kDouble ? svgd_step_tiled<double>(x, score, h, out)
                                        : svgd_step_tiled<float>(x, score, h, out);
}

}  // namespace

namespace {

// A given bandwidth's value, checked (read_bandwidth); none for the median rule.
std::optional<double> bandwidth_value(const std::optional<at::Tensor>& bandwidth) {
  return bandwidth ? std::optional<double>(read_bandwidth(*bandwidth)) : std::nullopt;
}

// A view of one set of a contiguous batch (sets, ...), moved from set to set by its storage offset: one tensor
// for a run of sets, where a select per set made a tensor each (~75 ns; four a set of the batched op, a fifth of
// its time for a set of 8 x 2 particles, perf).
class SetView {
 public:
  explicit SetView(const at::Tensor& batch)
      : view_(batch.select(0, 0)), first_(batch.storage_offset()), stride_(batch.stride(0)) {}
  at::Tensor& operator[](int64_t set) {
    view_.unsafeGetTensorImpl()->set_storage_offset(first_ + set * stride_);
    return view_;
  }

 private:
  at::Tensor view_;
  int64_t first_, stride_;
};

// svgd_step_into past its argument checks: phi into out, and whether it is all finite (the kernel's flag, or
// a scan of phi where the path does not track it).
bool step_into_checked(const at::Tensor& x, const at::Tensor& score, const std::optional<double>& h,
                       std::string_view algorithm, at::Tensor& out) {
  const SerialIfSmall serial(x.size(0), x.size(0), x.size(1));  // (the scan of phi too)
  const std::optional<bool> tracked = svgd_step_to(x, score, h, algorithm, out);
  return tracked ? *tracked : at::isfinite(out).all().item<bool>();
}

}  // namespace

at::Tensor svgd_step_into(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& bandwidth,
                          std::string_view algorithm, at::Tensor& out) {
  check_svgd_step_args(x, score, bandwidth);
  check_svgd_step_out(x, score, out);
  return at::scalar_tensor(step_into_checked(x, score, bandwidth_value(bandwidth), algorithm, out),
                           x.options().dtype(at::kBool));
}

at::Tensor svgd_step(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& bandwidth,
                     std::string_view algorithm) {
  check_svgd_step_args(x, score, bandwidth);
  const SerialIfSmall serial(x.size(0), x.size(0), x.size(1));
  at::Tensor phi = empty_large(x.sizes(), x.options());
  svgd_step_to(x, score, bandwidth_value(bandwidth), algorithm, phi);
  return phi;
}


// A set's fixed cost in the batched op, in units of the work formula n^2 (d + 32) (~0.025 ns a unit on one
// thread for larger sets): the thread setup, the Gram path's buffers and its kernels' setup, ~1-1.5 us a set
// of 8 x 2 to 32 x 8 fp32 particles on one thread (2-core AMD EPYC, Zen 5, median rule; 8 x 2: 1.66 us when
// it was set, 1.11 since the sets' views are moved (SetView) and their bandwidths read once; 32 x 2: 8.0 ->
// 7.3 us, 128 x 8: 28.6 -> 28.0 us, 256 x 16: 80 us).
constexpr int64_t kBatchedSetWork = int64_t{1} << 16;

// Many small sets (torch.func.vmap of svgd_step): one op for all of them, not one per set from Python (~20 us
// each on a 2-core VM where the step of 32 x 2 particles takes a few). A set within serial_max_work() runs on
// one thread in the single op (SerialIfSmall); here such sets are shared among the threads, each run by one
// (SerialIfSmall again: its ATen loops and teams take that one thread, as in the single op), a share of them
// holding about serial_max_work() of work, where the path runs on this library's own kernels alone (below).
// Other sets run one after another, each as the single op (with all threads where it takes them). Either way
// each set's phi and flag are the single op's, bit for bit.
at::Tensor svgd_step_batched_into(const at::Tensor& x_in, const at::Tensor& score_in,
                                  const std::optional<at::Tensor>& bandwidth, std::string_view algorithm,
                                  at::Tensor& out) {
  check_svgd_step_batched_args(x_in, score_in, bandwidth, algorithm, out);
  const at::Tensor x = x_in.contiguous(), score = score_in.contiguous();
  const int64_t sets = x.size(0), n = x.size(1), d = x.size(2);
  // Every set's bandwidth read and checked before any set is stepped (a bad one leaves out as it was)
  std::vector<double> h;
  if (bandwidth) {
    const at::Tensor values = bandwidth->to(at::kDouble).contiguous();
    h.assign(values.const_data_ptr<double>(), values.const_data_ptr<double>() + sets);
    for (const double value : h) checked_bandwidth(value);
  }
  at::Tensor finite = at::empty({sets}, x.options().dtype(at::kBool));
  bool* flags = finite.data_ptr<bool>();
  const auto steps = [&](int64_t begin, int64_t end) {
    SetView xs(x), ss(score), phis(out);
    for (int64_t set = begin; set < end; ++set) {
      const std::optional<double> h_set = bandwidth ? std::optional<double>(h[set]) : std::nullopt;
      flags[set] = step_into_checked(xs[set], ss[set], h_set, algorithm, phis[set]);
    }
  };
  // Spread only sets on this library's own kernels (the Gram and fused paths, the median included), not through
  // torch's GEMMs (the feature chunks, the GEMM tiles) or AMX's brgemm: MKL's dgemm called inside a parallel
  // region gave results an ulp apart from the same call outside one for some shapes (fp64, 31 x 200 and 31 x
  // 65 by the feature chunks, 31 x 8 by the GEMM tiles, under BMT_FAST_CPU_FUSED=0).
  const StepPath path = step_path(x.select(0, 0), parse_algorithm(algorithm), bandwidth.has_value());
  const int64_t work = n * n * (d + 32);
  if (work > serial_max_work() || (path != StepPath::kGram && path != StepPath::kFused)) {
    steps(0, sets);
  } else {
    // A share's work counts each set's fixed cost too (kBatchedSetWork): the work formula alone put all 256
    // sets of 8 x 2 particles (~1.7 us each, nearly all of it that cost) into one share, on one thread.
    const int64_t per_set = work + kBatchedSetWork;
    at::parallel_for(0, sets, std::max<int64_t>(1, serial_max_work() / per_set), steps);
  }
  return finite;
}

namespace {

// H = the median rule's bandwidth for the median of x's squared distances, as the ops return it: a 0-dim
// tensor in x's accumulation dtype (the value rbf_kernel then reads).
at::Tensor bandwidth_result(double median, const at::Tensor& x) {
  const double h = std::isfinite(median) ? bandwidth_from_median(median, x.size(0)) : kNaN;  // (finite_norms)
  return at::scalar_tensor(h, x.options().dtype(accumulation_type(x.scalar_type())));
}

// rbf_kernel_median's K for its H (bandwidth_result): make_k(H's value), or all NaN where H is NaN (the
// particles held NaN or Inf: finite_norms), as the reference's exp(-d2 / NaN).
template <typename MakeK>
at::Tensor median_kernel(const at::Tensor& h, const at::Tensor& x, MakeK&& make_k) {
  if (std::isnan(h.item<double>())) return at::full({x.size(0), x.size(0)}, kNaN, x.options());
  return make_k(read_bandwidth(h));
}

}  // namespace

at::Tensor median_bandwidth(const at::Tensor& x_in, std::string_view algorithm) {
  check_particles(x_in, "x");
  const Algorithm algo = parse_algorithm(algorithm);
  const SerialIfSmall serial(x_in.size(0), x_in.size(0), x_in.size(1));
  const at::Tensor x = x_in.contiguous();
  const auto acc = accumulation_type(x.scalar_type());
  double median;
  if (use_gram(x, algo, GramUse::kMedian)) {
    median = AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "median_gram",
                                             [&] { return median_of_gram_dists(sq_dists_gram<scalar_t>(x), x.size(0)); });
  } else if (use_amx(x)) {
    run_team_if(amx_in_team(x.size(0)), [&] {
      median = use_amx_chunked(x.size(0), x.size(1)) ? median_sq_dist_chunked(amx_gram_chunked(x))
                                                     : median_sq_dist_amx(AmxOperands(x));
    });
  } else if (use_gemm_gram_chunked(x.size(0), x.size(1))) {
    run_team([&] { median = median_sq_dist_chunked(gemm_gram_chunked(x)); });
  } else {
    median = acc == at::kDouble ? gemm_path_median<double>(x) : gemm_path_median<float>(x);
  }
  return bandwidth_result(median, x);
}

namespace {

// K[i, j] = exp(-dist[i, j] / h) for the rows i < n of the distances of the Gram path (gram_rows x
// gram_rows) and their columns j (self: the first m; else rows n .. n + m - 1), in x's dtype.
at::Tensor kernel_from_gram_dists(const std::vector<double>& dist, int64_t n, int64_t m, bool self, double h,
                                  const at::TensorOptions& options) {
  const int64_t gram_rows = self ? n : n + m;
  at::Tensor k = at::empty({n, m}, options.dtype(at::kDouble));
  double* kp = k.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i)
    std::memcpy(kp + i * m, dist.data() + i * gram_rows + (self ? 0 : n), static_cast<size_t>(m) * sizeof(double));
  exp_scaled(kp, n * m, -1.0 / h);
  return k.to(options.dtype());
}

}  // namespace

at::Tensor rbf_kernel(const at::Tensor& x, const at::Tensor& y, const at::Tensor& bandwidth) {
  check_rbf_kernel_args(x, y, bandwidth);
  const SerialIfSmall serial(x.size(0), y.size(0), x.size(1));
  const double h = read_bandwidth(bandwidth);
  const auto acc = accumulation_type(x.scalar_type());
  const bool self = x.is_same(y);
  const int64_t n = x.size(0), m = y.size(0), gram_rows = self ? n : n + m;
  if (!self && direct_cross_kernel(n, m, x.size(1), use_amx(x))) {
    // Two sets, few pairs (the trainer's prior: one prompt against M particles): the n x m distances by
    // direct differences, 2nm operations per column where the Gram pass needs (n + m)(n + m + 1) / 2.
    const at::Tensor xs = x.contiguous(), ys = y.contiguous();
    const std::vector<double> dist =
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xs.scalar_type(), "rbf_kernel_cross", [&] {
          return cross_sq_dists_threaded<scalar_t>(xs, ys);
        });
    at::Tensor k = at::empty({n, m}, x.options().dtype(at::kDouble));
    std::memcpy(k.data_ptr<double>(), dist.data(), static_cast<size_t>(n * m) * sizeof(double));
    exp_scaled(k.data_ptr<double>(), n * m, -1.0 / h);
    return k.to(x.scalar_type());
  }
  if (self ? prefers_gram(x, GramUse::kKernel) : gram_rows <= kGramMaxParticles) {
    // Few particles (often huge d): the distances from one split-K Gram pass over the rows, without the
    // centred copies and GEMM below (4 x 409,600 on a 2-core Xeon: 5.4 ms that way, 2.5 ms naive torch).
    const at::Tensor xs = x.contiguous(), ys = self ? xs : y.contiguous();
    const std::vector<double> dist =
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xs.scalar_type(), "rbf_kernel_gram", [&] {
          return sq_dists_gram<scalar_t>(xs, nullptr, self ? nullptr : &ys);
        });
    return kernel_from_gram_dists(dist, n, m, self, h, x.options());
  }
  if (use_amx(x)) {  // bf16 particles (or fp32 under bf16 matmuls) on AMX tiles (d >= 32): as the step's K
    const at::Tensor xs = x.contiguous();
    if (self && use_amx_chunked(n, x.size(1))) {
      const ChunkedGram gram = amx_gram_chunked(xs);
      return rbf_kernel_from_dots(gram.norms, gram.dots, h, x.scalar_type());
    }
    if (self) {
      const AmxOperands operands(xs);
      return rbf_kernel_amx(operands, operands, h);
    }
    const at::Tensor ys = y.contiguous();
    const at::Tensor shift = amx_shift(xs, &ys);
    return rbf_kernel_amx(AmxOperands(xs, shift, /*as_b=*/false), AmxOperands(ys, shift), h);
  }
  if (self && use_fused_kernel(x.size(1))) {
    const at::Tensor xs = x.contiguous();
    return (acc == at::kDouble ? rbf_kernel_fused<double>(xs, h, nullptr) : rbf_kernel_fused<float>(xs, h, nullptr))
        .to(x.scalar_type());
  }
  if (self && use_gemm_gram_chunked(n, x.size(1))) {  // (fp32 / fp64 by feature chunks, as svgd_step there)
    const at::Tensor xs = x.contiguous();
    at::Tensor k;
    run_team([&] { k = chunked_gram_to_kernel(gemm_gram_chunked(xs), h, 1.0); });
    return k.to(x.scalar_type());
  }
  // The centred copies on huge pages (centred_by), y's widened in the subtraction: fresh pages for a large y
  // cost more than the GEMM (2-core AMD EPYC, Zen 5, fp32, H given, previous build -> this one, 2 rounds, ms:
  // 2 x 20,000 x 512 18.4-20.1 -> 8.8-10.1; larger shapes within the run's noise).
  const at::Tensor xa = x.to(acc);
  const at::Tensor shift = centring_shift(xa);
  const at::Tensor xc = centred_by(xa, shift, acc);
  const at::Tensor yc = self ? xc : centred_by(y, shift, acc);  // a self kernel: one centred copy
  const at::Tensor nx = row_sq_norms(xc), ny = self ? nx : row_sq_norms(yc);
  if (self && self_kernel_by_tiles(n, x.size(1))) {  // one triangle of GEMM tiles (as rbf_kernel_median's)
    return AT_DISPATCH_FLOATING_TYPES(acc, "rbf_kernel_self", [&] {
             return rbf_kernel_self_tiles<scalar_t>(xc, nx, h, nullptr);
           }).to(x.scalar_type());
  }
  at::Tensor k = empty_large({n, m}, xc.options());
  at::mm_out(k, xc, yc.t());
  const int64_t rows = k.size(0), cols = k.size(1);
  AT_DISPATCH_FLOATING_TYPES(acc, "rbf_kernel", [&] {
    parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      rbf_from_dots(k.data_ptr<scalar_t>(), cols, begin, end, cols, nx.data_ptr<scalar_t>(),
                    ny.data_ptr<scalar_t>(), static_cast<scalar_t>(1.0 / h));
    });
    // A self kernel exactly symmetric, as on the other paths: a BLAS's GEMM need not give xc_i . xc_j and
    // xc_j . xc_i the same rounding (OpenBLAS's / MKL's fp64 kernels on an AMD EPYC did not: 1e-16 apart).
    if (self) mirror_upper_triangle(k.data_ptr<scalar_t>(), n);
  });
  if (self) k.fill_diagonal_(1.0);
  return k.to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> rbf_kernel_median(const at::Tensor& x_in) {
  check_particles(x_in, "x");
  const int64_t n = x_in.size(0);
  const SerialIfSmall serial(n, n, x_in.size(1));
  // K and H bit for bit as rbf_kernel(x, x, H) and median_bandwidth(x) give them: one Gram pass for both where
  // both take the Gram path, the two ops where only one does.
  const bool gram_for_median = prefers_gram(x_in, GramUse::kMedian);
  if (gram_for_median != prefers_gram(x_in, GramUse::kKernel)) {
    const at::Tensor h = median_bandwidth(x_in, "auto");
    return {median_kernel(h, x_in, [&](double) { return rbf_kernel(x_in, x_in, h); }), h};
  }
  if (!gram_for_median) {  // many particles: the distances are not kept between the two
    if (use_amx(x_in) && use_amx_chunked(n, x_in.size(1))) {  // the chunked Gram pass's dot products
      const ChunkedGram gram = amx_gram_chunked(x_in.contiguous());
      const at::Tensor h = bandwidth_result(median_sq_dist_chunked(gram), x_in);
      return {median_kernel(h, x_in,
                            [&](double v) { return rbf_kernel_from_dots(gram.norms, gram.dots, v, x_in.scalar_type()); }),
              h};
    }
    if (use_amx(x_in)) {  // (but the AMX operands are, and the dot products where keeps_dots)
      const AmxOperands operands(x_in.contiguous());
      // (kept only where rbf_kernel_amx takes the one triangle, whose K is symmetric as the kept dots are)
      const bool keep = keeps_dots(n, operands.d, sizeof(float), kAmxKeptDotsMinFeatures) &&
                        operands.d >= kAmxSymmetricMinFeatures && (operands.dtype == at::kFloat || n % 2 == 0);
      const at::Tensor kept = keep ? empty_large({n, n}, operands.norms.options()) : at::Tensor();
      const at::Tensor h =
          bandwidth_result(median_sq_dist_amx(operands, keep ? kept.mutable_data_ptr<float>() : nullptr), x_in);
      return {median_kernel(h, x_in,
                            [&](double v) {
                              return keep ? rbf_kernel_from_dots(operands.norms, kept, v, operands.dtype)
                                          : rbf_kernel_amx(operands, operands, v);
                            }),
              h};
    }
    if (use_fused_median(x_in.size(1)) && use_fused_kernel(x_in.size(1))) {  // one team for both
      const at::Tensor x = x_in.contiguous();
      double median = 0.0;
      const at::Tensor k = accumulation_type(x.scalar_type()) == at::kDouble
                               ? rbf_kernel_fused<double>(x, std::nullopt, &median)
                               : rbf_kernel_fused<float>(x, std::nullopt, &median);
      return {k.to(x.scalar_type()), bandwidth_result(median, x)};
    }
    if (use_gemm_gram_chunked(n, x_in.size(1))) {  // one chunked Gram pass for the median and K, one team
      const at::Tensor x = x_in.contiguous();
      at::Tensor k, h;
      run_team([&] {
        const ChunkedGram gram = gemm_gram_chunked(x);
        h = bandwidth_result(median_sq_dist_chunked(gram), x_in);
        k = median_kernel(h, x_in, [&](double v) { return chunked_gram_to_kernel(gram, v, 1.0); });
      });
      return {k.to(x_in.scalar_type()), h};
    }
    const auto acc = accumulation_type(x_in.scalar_type());
    if (self_kernel_by_tiles(n, x_in.size(1))) {  // the median's GEMM tiles kept for K where keeps_dots
      const at::Tensor x = x_in.contiguous();
      const at::Tensor xc = centred(x, acc);  // (as median_bandwidth and rbf_kernel centre)
      const at::Tensor norms = row_sq_norms(xc);
      const bool keep = keeps_dots(n, x.size(1), at::elementSize(acc), kKeptDotsMinFeatures);
      at::Tensor kept = keep ? empty_large({n, n}, xc.options()) : at::Tensor();
      return AT_DISPATCH_FLOATING_TYPES(acc, "rbf_kernel_median", [&] {
        const at::Tensor h =
            bandwidth_result(median_sq_dist<scalar_t>(xc, norms, GemmTiles{xc, keep ? &kept : nullptr}), x);
        at::Tensor k = median_kernel(
            h, x, [&](double v) { return rbf_kernel_self_tiles<scalar_t>(xc, norms, v, keep ? &kept : nullptr); });
        return std::make_tuple(k.to(x.scalar_type()), h);
      });
    }
    at::Tensor h = median_bandwidth(x_in, "auto");
    return {median_kernel(h, x_in, [&](double) { return rbf_kernel(x_in, x_in, h); }), h};
  }
  // Few particles (often huge d): one Gram pass gives the median and the kernel; the two ops make two.
  const at::Tensor x = x_in.contiguous();
  const std::vector<double> dist = AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "rbf_kernel_median", [&] { return sq_dists_gram<scalar_t>(x); });
  const at::Tensor h = bandwidth_result(median_of_gram_dists(dist, n), x);  // as median_bandwidth returns it
  return {median_kernel(h, x, [&](double v) { return kernel_from_gram_dists(dist, n, n, true, v, x.options()); }), h};
}

namespace {

// Few pairs (direct_gradient): the row gradients by direct differences (rbf_grad_columns),
// one pass over x and y.
template <typename In>
void rbf_grad_direct(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scaled, at::Tensor* grad_x,
                     at::Tensor* grad_y) {
  using T = std::conditional_t<std::is_same_v<In, double>, double, float>;
  const int64_t n = x.size(0), m = y.size(0), d = x.size(1);
  const In* xp = x.data_ptr<In>();
  const In* yp = y.data_ptr<In>();
  const T* sp = scaled.data_ptr<T>();
  In* gx = grad_x ? grad_x->data_ptr<In>() : nullptr;
  In* gy = grad_y ? grad_y->data_ptr<In>() : nullptr;
  // Column blocks of whole cache lines; each thread's block is a few (n + m) x 4 KiB of the inputs.
  const int64_t grain = std::max<int64_t>(1024, (int64_t{1} << 16) / (n + m)) / 64 * 64;
  parallel_for(0, (d + 63) / 64, grain / 64, [&](int64_t begin, int64_t end) {
    rbf_grad_columns(xp, yp, n, m, d, begin * 64, std::min(end * 64, d), sp, gx, gy);
  });
}

// rbf_kernel_backward of bf16 particles (fp32 ones under bf16 matmuls: results in fp32) with many pairs on
// AMX, at the forward's precision: the particles centred by the mean of all rows and rounded to bf16
// (AmxOperands), P = grad * K rounded to bf16, fp32 accumulation. With xc, yc centred, grad_x = -(2/H)
// (rowsum(P) xc - P yc) and grad_y = -(2/H) (colsum(P) yc - P^T xc); the sums are of the rounded P and xc,
// yc the rounded particles too: the gradient at the rounded particles, whose terms cancel as they should
// (with the inputs' unrounded xc_i, a self kernel's own term P_ii (xc_i - xc_i) was the largest error,
// 1.5e-2 of the largest gradient at 300 x 40). That own term is left out of P: it is 0, and next to
// P_ii ~ 1 the fp32 sums lost a row's terms of tiny K.
// Each gradient is one pass (amx_grad_pass) over grad and K: blocks of kAmxRows rows of the result go to the
// threads, each streaming kAmxCols-deep tiles of P (or P^T), formed from grad and K and used while in cache,
// times the other set's rows in pairs (B operand), as the step's K W. grad_h = -(1/H) sum P log K is summed
// in fp32 per tile row while P is formed, then in double per block.
//
// One gradient: out (rows x d, the particles' dtype In) = scale (sums (own's rounded rows) - A B), where
// tile(r0, rows, c0, cols, depth, a, ld_a, sums, p_log_k, scratch) writes the A tile of result rows [r0, r0 +
// rows) and depth [c0, c0 + cols) at a (row stride ld_a, zero up to depth) and adds its sums (scratch:
// kAmxRows * kAmxCols / 2 words of the thread's own); B = other_pairs, the other set's rounded rows in pairs
// (row_pairs). p_log_k: one entry per block, or empty. With many features and a short depth (d >= 2048,
// at most kAmxKeptColumns: the step's rule) a block keeps all its A tiles and goes through the features a
// chunk of kAmxFinishCols at a time, each finished while in L2 (no rows x d fp32 accumulator written and
// read back).
template <typename In, typename Tile>
at::Tensor amx_grad_pass(const AmxOperands& own, int64_t depth_total, const at::Tensor& other_pairs, float scale,
                         std::vector<double>& p_log_k, Tile&& tile) {
  using at::native::cpublas::brgemm;
  const int64_t rows_total = own.n, d = own.d, ld_b = other_pairs.size(1);
  const int64_t depth_padded = (depth_total + 31) / 32 * 32;
  const bool by_chunks = d >= 2 * kAmxFinishCols && depth_padded <= kAmxKeptColumns;
  const int64_t ld_a = by_chunks ? amx_a_stride(depth_padded) : kAmxCols;
  const at::Tensor acc = by_chunks ? at::Tensor() : empty_large({rows_total, d}, own.norms.options());
  const at::Tensor sums = at::zeros({rows_total}, own.norms.options());
  float* sums_p = sums.mutable_data_ptr<float>();
  at::Tensor out = empty_large({rows_total, d}, own.xb.options().dtype(own.dtype));
  In* out_p = out.mutable_data_ptr<In>();
  const auto* xb_p = own.xb.const_data_ptr<at::BFloat16>();
  const auto* b_p = as_bf16(other_pairs);
  parallel_for(0, (rows_total + kAmxRows - 1) / kAmxRows, 1, [&](int64_t begin, int64_t end) {
    std::vector<at::BFloat16> a(kAmxRows * ld_a);
    std::vector<uint32_t> scratch(kAmxRows * kAmxCols / 2);
    std::vector<float> chunk(by_chunks ? kAmxRows * kAmxFinishCols : 0);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = block * kAmxRows, rows = std::min(kAmxRows, rows_total - r0);
      for (int64_t c0 = 0; c0 < depth_total; c0 += kAmxCols) {
        const int64_t cols = std::min(kAmxCols, depth_total - c0), depth = (cols + 31) / 32 * 32;
        at::BFloat16* a_tile = a.data() + (by_chunks ? c0 : 0);
        tile(r0, rows, c0, cols, depth, a_tile, ld_a, sums_p + r0,
             p_log_k.empty() ? nullptr : &p_log_k[block], scratch.data());
        if (!by_chunks)
          brgemm(rows, d, depth, ld_a, ld_b, d, /*add_C=*/c0 > 0, a_tile, b_p + c0 * ld_b,
                 acc.mutable_data_ptr<float>() + r0 * d);
      }
      if (by_chunks) {  // (B's word f of a pair row: feature pair f, so a chunk starts at bf16 2 f0)
        for (int64_t f0 = 0; f0 < d; f0 += kAmxFinishCols) {
          const int64_t width = std::min(kAmxFinishCols, d - f0);
          brgemm(rows, width, depth_padded, ld_a, ld_b, kAmxFinishCols, /*add_C=*/false, a.data(), b_p + 2 * f0,
                 chunk.data());
          amx_grad_rows(chunk.data(), kAmxFinishCols, sums_p, xb_p, own.ld_x, scale, d, r0, r0 + rows, f0,
                        f0 + width, out_p);
        }
      }
    }
    at::native::cpublas::brgemm_release();
  });
  if (!by_chunks) {
    parallel_for(0, rows_total, 64, [&](int64_t begin, int64_t end) {
      amx_grad_rows(acc.const_data_ptr<float>() + begin * d, d, sums_p, xb_p, own.ld_x, scale, d, begin, end, 0, d,
                    out_p);
    });
  }
  return out;
}

// The rounded rows of a set in pairs (n_pad / 2 x d_pad words, row stride amx_b_stride): AMX's B operand for
// the other set's gradient.
at::Tensor row_pairs(const AmxOperands& set) {
  const int64_t ld = amx_b_stride(set.d_pad);
  const at::Tensor pairs = empty_large({set.n_pad / 2, ld}, set.norms.options().dtype(at::kInt));
  const auto* xb_p = set.xb.const_data_ptr<at::BFloat16>();
  auto* words = reinterpret_cast<uint32_t*>(pairs.mutable_data_ptr<int32_t>());
  parallel_for(0, set.n_pad / 2, 64, [&](int64_t begin, int64_t end) {
    bf16_row_pairs(xb_p, set.ld_x, begin, end, set.d_pad, words, ld);
  });
  return pairs;
}

template <typename In>
std::tuple<at::Tensor, at::Tensor, double> rbf_kernel_backward_amx(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& y, const at::Tensor& kernel,
                                                                   double h, bool want_x, bool want_y, bool want_h) {
  const bool self = y.is_same(x);
  const at::Tensor xs = x.contiguous(), ys = self ? xs : y.contiguous();
  const at::Tensor g = grad.contiguous(), k = kernel.contiguous();
  const at::Tensor shift = self ? amx_shift(xs) : amx_shift(xs, &ys);
  const AmxOperands ox(xs, shift, /*as_b=*/false);
  std::optional<AmxOperands> oy;
  if (!self) oy.emplace(ys, shift, /*as_b=*/false);
  const AmxOperands& yo = self ? ox : *oy;
  const int64_t n = ox.n, m = yo.n;
  const auto* g_p = g.const_data_ptr<In>();
  const auto* k_p = k.const_data_ptr<In>();
  const float scale = static_cast<float>(-2.0 / h);
  at::Tensor grad_x, grad_y;
  std::vector<double> p_log_k;  // per block, summed in block order at the end (the same value every run)
  const auto blocks = [](int64_t rows) { return (rows + kAmxRows - 1) / kAmxRows; };
  // the tile of P at rows i0, columns j0: where a self kernel's own terms are (two sets: outside every tile)
  const auto own = [&](int64_t i0, int64_t j0) { return self ? i0 - j0 : m; };
  // the B operands: y's rows for x's gradient, x's for y's (one for both in a self kernel)
  const at::Tensor x_pairs = want_y || (self && want_x) ? row_pairs(ox) : at::Tensor();
  const at::Tensor y_pairs = !want_x ? at::Tensor() : self ? x_pairs : row_pairs(yo);
  if (want_x) {  // A = rows of P
    if (want_h) p_log_k.assign(blocks(n), 0.0);
    grad_x = amx_grad_pass<In>(ox, m, y_pairs, scale, p_log_k, [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                                                       int64_t depth, at::BFloat16* a, int64_t ld_a, float* rowsum,
                                                       double* plk, uint32_t*) {
      amx_p_rows(g_p + i0 * m + j0, k_p + i0 * m + j0, m, rows, cols, depth, own(i0, j0), a, ld_a, rowsum, plk);
    });
  }
  if (want_y) {  // A = rows of P^T: P's row pairs (AMX's B layout) transposed as 32-bit words
    const bool logs_here = want_h && !want_x;
    if (logs_here) p_log_k.assign(blocks(m), 0.0);
    std::vector<double> none;
    grad_y = amx_grad_pass<In>(yo, n, x_pairs, scale, logs_here ? p_log_k : none,
                           [&](int64_t j0, int64_t cols, int64_t i0, int64_t rows, int64_t depth, at::BFloat16* a,
                               int64_t ld_a, float* colsum, double* plk, uint32_t* pairs) {  // (depth/2 x kAmxRows words)
                             amx_p_pairs(g_p + i0 * m + j0, k_p + i0 * m + j0, m, rows, depth, cols, own(i0, j0),
                                         pairs, kAmxRows, colsum, plk);
                             transpose_words(pairs, kAmxRows, depth / 2, 0, cols, reinterpret_cast<uint32_t*>(a),
                                             ld_a / 2);
                           });
  }
  if (want_h && !want_x && !want_y) {  // P log K alone: rows of P, no product
    p_log_k.assign(blocks(n), 0.0);
    parallel_for(0, blocks(n), 1, [&](int64_t begin, int64_t end) {
      std::vector<at::BFloat16> a(kAmxRows * kAmxCols);
      std::vector<float> rowsum(kAmxRows);
      for (int64_t block = begin; block < end; ++block) {
        const int64_t i0 = block * kAmxRows, rows = std::min(kAmxRows, n - i0);
        for (int64_t j0 = 0; j0 < m; j0 += kAmxCols) {
          const int64_t cols = std::min(kAmxCols, m - j0);
          amx_p_rows(g_p + i0 * m + j0, k_p + i0 * m + j0, m, rows, cols, cols, own(i0, j0), a.data(), kAmxCols,
                     rowsum.data(), &p_log_k[block]);
        }
      }
    });
  }
  double total = 0.0;
  for (const double part : p_log_k) total += part;
  return {grad_x, grad_y, -total / h};
}

// rbf_kernel_backward_amx's gradients (its arithmetic: the same rounded particles and P, fp32 sums) for
// use_amx_chunked shapes, by feature chunks as the step there: without the operands as large as x that the
// tiled passes write and read back (the rounded particles and their pairs). P (n x m, bf16, own terms left
// out) and, for y's gradient, P^T are formed once as A operands; then the threads take chunks of
// kAmxFeatureChunk features, each centred (the chunk's column means over both sets: amx_shift's), rounded
// and paired as a B operand in L2, multiplied by P (P^T) and finished into the gradients' columns while
// there. The products have the same depth (all m, or n, rows at once) as the tiled pass: the same sums
// (up to 512 rows on the other side, one tile of P there). grad_h's sum P log K: in blocks of kAmxRows
// rows, as there. 2-core Xeon, bf16, x's gradient with symmetrised weights, alternating, tiled -> chunks
// (ms): 256 x 76,800 21-22 -> 15.0-15.3, 128 x 76,800 11.5-12.4 -> 5.8-6.1, 256 x 4096 0.94-1.06 ->
// 0.78-0.85, 128 x 1024 0.15-0.16 -> 0.10-0.12; 512 x 20,000, 512 x 32,768 and 384 x 8192 level; two sets
// 100 x 300 x 76,800 30-31 -> 17-19. At 256 x 76,800 about half is the AMX products.
template <typename In>
std::tuple<at::Tensor, at::Tensor, double> rbf_kernel_backward_amx_chunked(const at::Tensor& grad, const at::Tensor& x,
                                                                           const at::Tensor& y,
                                                                           const at::Tensor& kernel, double h,
                                                                           bool want_x, bool want_y, bool want_h) {
  using at::native::cpublas::brgemm;
  const bool self = y.is_same(x);
  const at::Tensor xs = x.contiguous(), ys = self ? xs : y.contiguous();
  const at::Tensor g = grad.contiguous(), k = kernel.contiguous();
  const int64_t n = xs.size(0), m = ys.size(0), d = xs.size(1);
  const int64_t n_pad = (n + 31) / 32 * 32, m_pad = (m + 31) / 32 * 32;
  const float scale = static_cast<float>(-2.0 / h);
  const auto* g_p = g.const_data_ptr<In>();
  const auto* k_p = k.const_data_ptr<In>();
  // P's rows (rows [n, n_pad) zero: the pairs of P^T below), their sums, and P log K by blocks of rows
  const int64_t ld_p = amx_a_stride(m_pad), blocks = (n + kAmxRows - 1) / kAmxRows;
  std::vector<at::BFloat16> p16(n_pad * ld_p, at::BFloat16(0.f));
  std::vector<float> rowsum(n, 0.f);
  std::vector<double> p_log_k(want_h ? blocks : 0, 0.0);
  parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i0 = block * kAmxRows, rows = std::min(kAmxRows, n - i0);
      amx_p_rows(g_p + i0 * m, k_p + i0 * m, m, rows, m, m_pad, self ? i0 : m, p16.data() + i0 * ld_p, ld_p,
                 rowsum.data() + i0, want_h ? &p_log_k[block] : nullptr);
    }
  });
  // P^T's rows (the words of P's row pairs, transposed) and P's column sums, in row order
  const int64_t ld_pt = amx_a_stride(n_pad);
  std::vector<at::BFloat16> pt16(want_y ? m * ld_pt : 0);
  std::vector<float> colsum(want_y ? m : 0, 0.f);
  if (want_y) {
    const int64_t ld_w = amx_b_stride(m_pad);
    std::vector<uint32_t> pairs(n_pad / 2 * ld_w);
    bf16_row_pairs(p16.data(), ld_p, 0, n_pad / 2, m_pad, pairs.data(), ld_w);
    transpose_words(pairs.data(), ld_w, n_pad / 2, 0, m, reinterpret_cast<uint32_t*>(pt16.data()), ld_pt / 2);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) colsum[j] += static_cast<float>(p16[i * ld_p + j]);
  }

  at::Tensor grad_x = want_x ? empty_large({n, d}, xs.options()) : at::Tensor();
  at::Tensor grad_y = want_y ? empty_large({m, d}, ys.options()) : at::Tensor();
  In* gx_p = want_x ? grad_x.mutable_data_ptr<In>() : nullptr;
  In* gy_p = want_y ? grad_y.mutable_data_ptr<In>() : nullptr;
  const auto* x_p = xs.const_data_ptr<In>();
  const auto* y_p = ys.const_data_ptr<In>();
  const int64_t chunk = kAmxFeatureChunk, chunks = (d + chunk - 1) / chunk;
  const int64_t ld_a = amx_a_stride(chunk), ld_b = amx_b_stride(chunk);
  const double rows_total = static_cast<double>(self ? n : n + m);
  parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    // the chunk's rounded rows of x and y (rows beyond n, m zero: the pairs' padding) and their pairs
    std::vector<at::BFloat16> xa(n_pad * ld_a, at::BFloat16(0.f)), ya(self ? 0 : m_pad * ld_a, at::BFloat16(0.f));
    std::vector<uint32_t> x_pairs(want_y ? n_pad / 2 * ld_b : 0), y_pairs(want_x ? m_pad / 2 * ld_b : 0);
    std::vector<float> acc(std::max(n, m) * chunk), shift(chunk);
    std::vector<double> sums(chunk), other_sums(chunk), squares(n + m);  // (the centring's squares: unused)
    const at::BFloat16* yb = self ? xa.data() : ya.data();
    for (int64_t c = begin; c < end; ++c) {
      const int64_t c0 = c * chunk, width = std::min(chunk, d - c0);
      const int64_t ahead = c + 1 < end ? chunk : 0;  // (the next chunk's rows into L2 as these are centred)
      amx_column_sums(x_p + c0, d, n, 0, width, sums.data());
      if (!self) amx_column_sums(y_p + c0, d, m, 0, width, other_sums.data());
      for (int64_t f = 0; f < width; ++f)
        shift[f] = static_cast<float>((sums[f] + (self ? 0.0 : other_sums[f])) / rows_total);
      amx_centre_rows(x_p + c0, d, width, shift.data(), 0, n, xa.data(), ld_a, squares.data(), ahead);
      if (!self) amx_centre_rows(y_p + c0, d, width, shift.data(), 0, m, ya.data(), ld_a, squares.data() + n, ahead);
      if (want_x) {  // scale (rowsum(P) xc - P yc)
        bf16_row_pairs(yb, ld_a, 0, m_pad / 2, width, y_pairs.data(), ld_b);
        brgemm(n, width, m_pad, ld_p, ld_b, chunk, /*add_C=*/false, p16.data(),
               reinterpret_cast<const at::BFloat16*>(y_pairs.data()), acc.data());
        amx_grad_rows(acc.data(), chunk, rowsum.data(), xa.data(), ld_a, scale, d, 0, n, 0, width, gx_p + c0);
      }
      if (want_y) {  // scale (colsum(P) yc - P^T xc)
        bf16_row_pairs(xa.data(), ld_a, 0, n_pad / 2, width, x_pairs.data(), ld_b);
        brgemm(m, width, n_pad, ld_pt, ld_b, chunk, /*add_C=*/false, pt16.data(),
               reinterpret_cast<const at::BFloat16*>(x_pairs.data()), acc.data());
        amx_grad_rows(acc.data(), chunk, colsum.data(), yb, ld_a, scale, d, 0, m, 0, width, gy_p + c0);
      }
    }
    at::native::cpublas::brgemm_release();
  });
  double total = 0.0;
  for (const double part : p_log_k) total += part;
  return {grad_x, grad_y, -total / h};
}

// The gradient's GEMM path (fp32 arithmetic, fp64 for fp64) for few particles with many features, by
// feature chunks as on AMX: P (n x m) and its sums are formed once, then the threads take chunks of
// kGemmChunkFeatures features, each centred by its column means (any nearby centre cancels exactly) into
// a buffer of the chunk's size, multiplied by P (P^T) and finished into the gradients' columns while in
// cache. The path below writes centred copies of x and y and an n x d accumulator and reads them back,
// passes that cost as much as its GEMMs at these shapes. Where: up to 512 rows on each side, from 4096
// features and from rows_pad^2 / 16 (the AMX chunks' rule; rows_pad: the larger side rounded up to 32).
// 2-core Xeon, fp32, x's gradient, alternating, 3 rounds, whole-x path -> chunks (ms): 256 x 76,800
// 57.0-58.5 -> 45.7-47.9, 128 x 76,800 16.6-17.5 -> 13.7-14.4, 512 x 20,000 46.3-48.1 -> 42.4-42.7, two sets
// 100 x 300 x 76,800 (both gradients) 70-73 -> 52-56; level at 128 x 5000, 256 x 4096 and 512 x 16,384;
// slower at 512 x 4096 (7.7-7.9 -> 8.3-8.5), 384 x 8192 (8.8-9.2 -> 9.6) and 400 x 10,000 (11.4-11.6 ->
// 11.7-12.5), hence the rule.
std::tuple<at::Tensor, at::Tensor, double> rbf_kernel_backward_gemm_chunked(const at::Tensor& grad,
                                                                            const at::Tensor& x, const at::Tensor& y,
                                                                            const at::Tensor& kernel, double h,
                                                                            bool want_x, bool want_y, bool want_h,
                                                                            at::ScalarType acc, double tiny) {
  const bool self = y.is_same(x);
  const int64_t n = x.size(0), m = y.size(0), d = x.size(1);
  const at::Tensor k = kernel.to(acc);
  const at::Tensor p = grad.to(acc) * k;
  if (self) p.diagonal().zero_();  // own terms: 0 (as on every path)
  const double p_log_k = want_h ? at::dot(p.reshape(-1), k.clamp_min(tiny).log().reshape(-1)).item<double>() : 0.0;
  const at::Tensor rowsum = want_x ? p.sum(1, true) : at::Tensor();
  const at::Tensor colsum = want_y ? p.sum(0).unsqueeze(1) : at::Tensor();
  const at::Tensor pt = want_y ? p.t().contiguous() : at::Tensor();
  at::Tensor grad_x = want_x ? empty_large(x.sizes(), x.options()) : at::Tensor();
  at::Tensor grad_y = want_y ? empty_large(y.sizes(), y.options()) : at::Tensor();
  const double minus_scale = 2.0 / h;
  const int64_t chunk = kGemmChunkFeatures, chunks = (d + chunk - 1) / chunk;
  const auto options = x.options().dtype(acc);
  parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    const at::NoGradGuard no_grad;  // (grad mode is per thread: a worker's is on, and x may require grad)
    // the thread's buffers, reused: the chunk's centred rows of x and y, the product, the column means
    const at::Tensor x_buffer = at::empty({n * chunk}, options);
    const at::Tensor y_buffer = self ? x_buffer : at::empty({m * chunk}, options);
    const at::Tensor product_buffer = at::empty({std::max(n, m) * chunk}, options);
    const at::Tensor shift_buffer = at::empty({chunk}, options);
    const auto view = [](const at::Tensor& buffer, int64_t rows, int64_t cols) {
      return buffer.narrow(0, 0, rows * cols).view({rows, cols});
    };
    for (int64_t c = begin; c < end; ++c) {
      const int64_t c0 = c * chunk, width = std::min(chunk, d - c0);
      const at::Tensor xs = x.narrow(1, c0, width).to(acc);
      at::Tensor shift = view(shift_buffer, 1, width);
      at::mean_out(shift, xs, {0}, /*keepdim=*/true);
      at::Tensor xc = view(x_buffer, n, width);
      at::sub_out(xc, xs, shift);
      at::Tensor yc = xc;
      if (!self) {
        yc = view(y_buffer, m, width);
        at::sub_out(yc, y.narrow(1, c0, width).to(acc), shift);
      }
      // scale (sums * own - P other) = (P other - sums * own) * (2/H), into the result's columns
      const auto finish = [&](const at::Tensor& weights, const at::Tensor& other, const at::Tensor& own,
                              const at::Tensor& sums, at::Tensor& result) {
        at::Tensor product = view(product_buffer, own.size(0), width);
        at::mm_out(product, weights, other);
        product.addcmul_(own, sums, -1.0).mul_(minus_scale);
        result.narrow(1, c0, width).copy_(product);
      };
      if (want_x) finish(p, yc, xc, rowsum, grad_x);
      if (want_y) finish(pt, xc, yc, colsum, grad_y);
    }
  });
  return {grad_x, grad_y, -p_log_k / h};
}

// p (rows x n, contiguous) = (a + b^T) * k for a and k of rows x n and b of n x rows, any strides (autograd's
// expanded ones of K.sum() have strides 0): by 64 x 64 tiles, b's tile transposed into a small buffer first
// (b read by its rows; the buffer's rows padded so that its columns do not share cache sets, as p's rows
// at a stride of a multiple of 4 KiB would), then a, the buffer and k combined by rows of p. (ATen's add of
// the transposed view read b a column at a time: at n = 4096 it took longer than the GEMM.)
template <typename T>
void symmetrised_weights(const at::Tensor& a, const at::Tensor& b, const at::Tensor& k, at::Tensor& p) {
  const int64_t rows = p.size(0), n = p.size(1);
  const T* ap = a.const_data_ptr<T>();
  const T* bp = b.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  T* out = p.data_ptr<T>();
  const int64_t as0 = a.stride(0), as1 = a.stride(1), bs0 = b.stride(0), bs1 = b.stride(1);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1);
  const bool unit = as1 == 1 && ks1 == 1;
  constexpr int64_t kTile = 64, kPitch = kTile + 64 / sizeof(T);  // a cache line of padding per buffer row
  // Their short runs in rows far apart are not seen coming by the prefetchers: each asked for kAhead rows
  // ahead (2-core EPYC, 4096 x 1, dense grad: 46 -> 26 ms a call).
  constexpr int64_t kAhead = 8;
  const auto prefetch_run = [](const T* run, int64_t count) {
    for (int64_t byte = 0; byte < count * static_cast<int64_t>(sizeof(T)); byte += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(run) + byte);
  };
  at::parallel_for(0, (n + kTile - 1) / kTile, 4, [&](int64_t begin, int64_t end) {
    std::vector<T> buffer(kTile * kPitch);
    for (int64_t j0 = begin * kTile; j0 < std::min(n, end * kTile); j0 += kTile) {
      const int64_t cols = std::min(n - j0, kTile);
      for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
        const int64_t tile_rows = std::min(rows - i0, kTile);
        for (int64_t j = 0; j < cols; ++j) {  // buffer[i][j] = b[j0 + j][i0 + i]
          const T* bj = bp + (j0 + j) * bs0 + i0 * bs1;
          if (bs1 == 1 && j + kAhead < cols) prefetch_run(bj + kAhead * bs0, tile_rows);
          for (int64_t i = 0; i < tile_rows; ++i) buffer[i * kPitch + j] = bj[i * bs1];
        }
        for (int64_t i = 0; i < tile_rows; ++i) {
          T* o = out + (i0 + i) * n + j0;
          const T* bt = buffer.data() + i * kPitch;
          const T* ai = ap + (i0 + i) * as0 + j0 * as1;
          const T* ki = kp + (i0 + i) * ks0 + j0 * ks1;
          if (unit && i + kAhead < tile_rows) {
            prefetch_run(ai + kAhead * as0, cols);
            prefetch_run(ki + kAhead * ks0, cols);
          }
          if (unit) {
            for (int64_t j = 0; j < cols; ++j) o[j] = (ai[j] + bt[j]) * ki[j];
          } else {
            for (int64_t j = 0; j < cols; ++j) o[j] = (ai[j * as1] + bt[j]) * ki[j * ks1];
          }
        }
      }
    }
  });
}

// grad is one value everywhere as laid out (autograd's expanded ones of K.sum(): strides 0): its own transpose.
bool constant_grad(const at::Tensor& grad) { return grad.stride(0) == 0 && grad.stride(1) == 0; }

// H's gradient as bandwidth has it (its dtype and shape), from the float64 sum.
at::Tensor bandwidth_grad(double value, const at::Tensor& bandwidth) {
  return at::scalar_tensor(value, bandwidth.options().dtype(at::kDouble))
      .to(bandwidth.scalar_type())
      .reshape(bandwidth.sizes());
}

// rbf_kernel_backward's general path (many pairs, no AMX, not the feature chunks). P is formed a block of
// rows at a time and used while it is in cache: no n x m temporary at all (at n ~ 10^3..10^4 the five it
// made, paged in fresh and streamed through memory, set the time: n = m = 4096, d = 64 on a 2-core Xeon VM
// 193-217 -> 54-55 ms). The n x d temporaries: one centred copy per input (one for a self kernel); those and
// the results come from the huge-page allocator when large (huge_pages.h; 16 x 409,600 self kernel 30-45 ->
// 14-16 ms).
// symmetrised (rbf_kernel_self_backward; y is x, want_y false): the sum of x's two gradients in one pass,
// with the weights (grad + grad^T) * K of a symmetric K, a block of rows of grad^T read where the block is
// formed (no n x n sum in memory); H's gradient is then half the sum P log K. A constant grad (autograd's
// expanded ones of K.sum(): strides 0) is its own transpose: P = grad * K, and x's gradient doubled.
std::tuple<at::Tensor, at::Tensor, double> rbf_kernel_backward_blocked(const at::Tensor& grad, const at::Tensor& x,
                                                                       const at::Tensor& y, const at::Tensor& kernel,
                                                                       double h, bool want_x, bool want_y, bool want_h,
                                                                       at::ScalarType acc, double tiny,
                                                                       bool symmetrised) {
  const bool self = y.is_same(x);
  TORCH_INTERNAL_ASSERT(!symmetrised || (self && !want_y));
  const bool doubled = symmetrised && constant_grad(grad);
  // grad + grad^T is grad^T + grad: grad's rows are read where they run along its memory
  const at::Tensor g = symmetrised && grad.stride(0) < grad.stride(1) ? grad.t() : grad;
  const int64_t n = x.size(0), m = y.size(0);
  const at::Tensor xa = x.to(acc);
  const at::Tensor shift = xa.mean(0, /*keepdim=*/true);  // any nearby centre: it cancels exactly
  const at::Tensor xc = centred_by(xa, shift, acc);
  const at::Tensor yc = self ? xc : centred_by(y, shift, acc);
  at::Tensor grad_x = want_x ? empty_large(xc.sizes(), xc.options()) : at::Tensor();
  // -P^T xc, then + colsum_j(P) yc_j
  at::Tensor grad_y = want_y ? empty_large(yc.sizes(), yc.options()).zero_() : at::Tensor();
  at::Tensor colsum = want_y ? at::zeros({m, 1}, xc.options()) : at::Tensor();
  double p_log_k = 0.0;
  const int64_t block = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(m, 1));  // ~2^20 values
  // reused across the blocks, and (the huge-page allocator's: up to 2^20 values) across calls: no fresh pages
  at::Tensor p_buffer = empty_large({std::min(block, n), m}, xc.options());
  at::Tensor log_buffer = want_h ? empty_large(p_buffer.sizes(), xc.options()) : at::Tensor();
  for (int64_t r0 = 0; r0 < n; r0 += block) {
    const int64_t rows = std::min(block, n - r0);
    const at::Tensor k = kernel.narrow(0, r0, rows).to(acc);  // 16-bit values widened first (no copy otherwise)
    at::Tensor p = p_buffer.narrow(0, 0, rows);
    if (symmetrised && !doubled) {
      const at::Tensor a = g.narrow(0, r0, rows).to(acc), b = g.narrow(1, r0, rows).to(acc);
      AT_DISPATCH_FLOATING_TYPES(acc, "symmetrised_weights", [&] { symmetrised_weights<scalar_t>(a, b, k, p); });
    } else {
      at::mul_out(p, grad.narrow(0, r0, rows).to(acc), k);
    }
    if (self) p.narrow(1, r0, rows).diagonal().zero_();  // own terms (as the AMX path's: 0, and they hid the rest)
    const at::Tensor xc_rows = xc.narrow(0, r0, rows);
    if (want_x) {
      at::Tensor gx = grad_x.narrow(0, r0, rows);
      at::mul_out(gx, xc_rows, p.sum(1, true));
      gx.addmm_(p, yc, 1.0, -1.0);  // rowsum_i(P) xc_i - (P yc)_i
    }
    if (want_y) {
      grad_y.addmm_(p.t(), xc_rows, 1.0, -1.0);
      colsum.add_(p.sum(0).unsqueeze(1));
    }
    if (want_h) {
      at::Tensor log_k = log_buffer.narrow(0, 0, rows);
      at::clamp_min_out(log_k, k, tiny).log_();
      p_log_k += at::dot(p.reshape(-1), log_k.reshape(-1)).item<double>();
    }
  }
  if (want_x) grad_x = grad_x.mul_((doubled ? -4.0 : -2.0) / h).to(x.scalar_type());
  if (want_y) grad_y = grad_y.addcmul_(yc, colsum).mul_(-2.0 / h).to(y.scalar_type());
  return {grad_x, grad_y, -(symmetrised && !doubled ? p_log_k / 2 : p_log_k) / h};
}

// The smallest normal number of the accumulation type: K is clamped there for its log (H's gradient).
// Where K underflowed to 0, P is 0 too, and 0 * log(tiny) adds nothing (0 * log 0 would be NaN).
double log_clamp(at::ScalarType acc) {
  return acc == at::kDouble ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
}

enum class BackwardPath { kDirect, kAmx, kGemmChunked, kBlocked };

// Whether rbf_kernel_backward's gradients go by direct differences: up to kRbfDirectMaxPairs pairs; two sets up to
// kRbfGradDirectMaxPairs with 64 or more features, and beyond by wide_direct; a self kernel up to
// kRbfGradDirectMaxPairs with 2048 or more features (its other path, the blocks of symmetrised weights, takes one
// product where two sets take two). 2-core AMD EPYC (Zen 5), libgomp's default wait policy, best of 3, direct / blocked
// or feature chunks (us), two sets, all three gradients (x's alone): fp32 96 x 96 d = 16 36 / 36 (11 / 16), d = 64 45 /
// 54 (16 / 25), d = 512 132 / 152 (65 / 79); 128 x 128 d = 64 74 / 81 (24 / 35), d = 512 229 / 229 (109 / 117), d =
// 4096 1086 / 1465 (534 / 769); 16 x 1024 d = 64 78 / 97 (26 / 44); 4 x 4096 d = 64 103 / 163 (36 / 73); fp64 and bf16
// 96 x 96 to 128 x 128, d = 64: 0.45-0.94x; beyond 16,384 pairs 2 x 20,000 d = 64 318 / 620 (120 / 228), d = 512 8567 /
// 8574; 4 x 32,768 d = 128 2850 / 3131; 8 x 16,384 d = 256 3305 / 3731; 16 x 8192 d = 512 5766 / 4414 (3013 / 2968);
// 256 x 256 d = 4096 5114 / 6025; but 192 x 192 d = 512 505 / 444. Self kernel, x's and H's gradients: 128 x 128 d =
// 512 148 / 131, d = 2048 337 / 411, d = 20,000 2017 / 4070; 96 x 96 d = 2048 200 / 261. (With OMP_WAIT_POLICY=PASSIVE
// direct gained more, 0.3-0.8x.) Until 2026-12-05 up to kRbfDirectMaxPairs only, as AMX shapes still are
// (backward_path).
constexpr int64_t kRbfGradDirectMaxPairs = 16384;
bool direct_gradient(int64_t n, int64_t m, int64_t d, bool self) {
  const int64_t pairs = n * m;
  if (pairs <= kRbfDirectMaxPairs) return true;
  if (self) return pairs <= kRbfGradDirectMaxPairs && d >= 2048;
  return (pairs <= kRbfGradDirectMaxPairs && d >= 64) || wide_direct(n, m, d);
}

// Whether the gradients of K(x, y) (y the same tensor as x: a self kernel) go by direct differences; amx: the
// inputs, the incoming gradient and K are all of a dtype that AMX takes.
bool gradient_by_direct_differences(const at::Tensor& x, const at::Tensor& y, bool amx) {
  const int64_t n = x.size(0), m = y.size(0);
  const bool self = y.is_same(x);
  return amx ? n * m <= kRbfDirectMaxPairs && !(self && !prefers_gram(x, GramUse::kKernel))
             : direct_gradient(n, m, x.size(1), self);
}

// Which of rbf_kernel_backward's paths takes these inputs (want_xy: a particle gradient is asked for).
// Few pairs go by direct differences, except a self kernel of more particles than the forward's Gram path
// takes where the AMX feature chunks are faster (33 or more particles with 512 or more features:
// amx_gram_max_particles): the gradient at the forward's precision, by those chunks. 2-core Xeon, bf16,
// symmetrised weights, alternating, direct -> AMX chunks (ms): 64 x 76,800 5.4-5.6 -> 2.8, 48 x 76,800
// 3.1-3.3 -> 2.0-2.1, 64 x 409,600 35-36 -> 13.5-14, 48 x 409,600 17-19 -> 10-12, 64 x 2048 0.15-0.16 ->
// 0.08-0.09, 48 x 1024 0.10 -> 0.04; 33 x 76,800 level.
BackwardPath backward_path(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                           const at::Tensor& kernel, bool want_xy) {
  const int64_t n = kernel.size(0), m = kernel.size(1);
  const bool amx = use_amx(x) && y.scalar_type() == x.scalar_type() && grad.scalar_type() == x.scalar_type() &&
                   kernel.scalar_type() == x.scalar_type();
  if (gradient_by_direct_differences(x, y, amx)) return BackwardPath::kDirect;
  if (amx) return BackwardPath::kAmx;
  if (want_xy && use_gemm_chunked(std::max(n, m), x.size(1))) return BackwardPath::kGemmChunked;
  return BackwardPath::kBlocked;
}

}  // namespace

bool takes_direct_path(const at::Tensor& x, const at::Tensor& y, std::string_view op) {
  BMT_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(1) == y.size(1),
            "takes_direct_path: x and y must be 2-D with the same number of columns, got ", x.sizes(), " and ",
            y.sizes());
  const bool amx = use_amx(x) && y.scalar_type() == x.scalar_type();
  if (op == "rbf_kernel") return !y.is_same(x) && direct_cross_kernel(x.size(0), y.size(0), x.size(1), use_amx(x));
  if (op == "rbf_kernel_backward") return gradient_by_direct_differences(x, y, amx);
  BMT_CHECK(false, "takes_direct_path: op must be \"rbf_kernel\" or \"rbf_kernel_backward\", got \"", std::string(op),
            "\"");
  return false;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rbf_kernel_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& y, const at::Tensor& kernel,
                                                                   const at::Tensor& bandwidth,
                                                                   std::array<bool, 3> output_mask) {
  check_rbf_kernel_backward_args(grad, x, y, kernel, bandwidth);
  const SerialIfSmall serial(kernel.size(0), kernel.size(1), x.size(1));
  const auto [want_x, want_y, want_h] = output_mask;
  const double h = read_bandwidth(bandwidth);
  const auto acc = accumulation_type(x.scalar_type());
  const int64_t n = kernel.size(0), m = kernel.size(1);
  // With P = grad * K: dL/dD = -P / H (D = squared distance), dD_ij/dx_i = 2 (x_i - y_j) = -dD_ij/dy_j, and
  // dK/dH = K D / H^2 with D = -H log K. Outputs that output_mask leaves out are not computed (undefined).
  const double tiny = log_clamp(acc);
  at::Tensor grad_x, grad_y, grad_h;
  const bool self = y.is_same(x);
  const auto path = backward_path(grad, x, y, kernel, want_x || want_y);
  if (path == BackwardPath::kDirect) {
    const at::Tensor k = kernel.to(at::kDouble).contiguous();
    const at::Tensor p = grad.to(at::kDouble) * k;
    if (want_h) grad_h = bandwidth_grad(-(p * k.clamp_min(tiny).log()).sum().item<double>() / h, bandwidth);
    if (want_x || want_y) {
      const at::Tensor xs = x.contiguous(), ys = self ? xs : y.contiguous();
      const at::Tensor scaled = (p * (-2.0 / h)).to(acc).contiguous();
      if (want_x) grad_x = empty_large(xs.sizes(), xs.options());
      if (want_y) grad_y = empty_large(ys.sizes(), ys.options());
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xs.scalar_type(), "rbf_grad_direct", [&] {
        rbf_grad_direct<scalar_t>(xs, ys, scaled, want_x ? &grad_x : nullptr, want_y ? &grad_y : nullptr);
      });
    }
  } else {
    double h_grad = 0.0;
    if (path == BackwardPath::kAmx) {
      std::tie(grad_x, grad_y, h_grad) = amx_dispatch(x, [&](auto typed) {
        using In = typename decltype(typed)::type;
        if ((want_x || want_y) && use_amx_chunked(std::max(n, m), x.size(1)))
          return rbf_kernel_backward_amx_chunked<In>(grad, x, y, kernel, h, want_x, want_y, want_h);
        return rbf_kernel_backward_amx<In>(grad, x, y, kernel, h, want_x, want_y, want_h);
      });
    } else if (path == BackwardPath::kGemmChunked) {
      std::tie(grad_x, grad_y, h_grad) =
          rbf_kernel_backward_gemm_chunked(grad, x, y, kernel, h, want_x, want_y, want_h, acc, tiny);
    } else {
      std::tie(grad_x, grad_y, h_grad) =
          rbf_kernel_backward_blocked(grad, x, y, kernel, h, want_x, want_y, want_h, acc, tiny, /*symmetrised=*/false);
    }
    if (want_h) grad_h = bandwidth_grad(h_grad, bandwidth);
  }
  return {grad_x, grad_y, grad_h};
}

constexpr int64_t kSymmetrisedDenseMinFeatures = 2;

std::tuple<at::Tensor, at::Tensor> rbf_kernel_self_backward(const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& kernel, const at::Tensor& bandwidth,
                                                            std::array<bool, 2> output_mask) {
  check_rbf_kernel_backward_args(grad, x, x, kernel, bandwidth);
  const auto [want_x, want_h] = output_mask;
  // The general path takes the weights (grad + grad^T) * K a block at a time (rbf_kernel_backward_blocked):
  // one product with the particles where two gave x's two gradients. grad^T costs a second read of grad,
  // except for a constant grad (K.sum()'s: strides 0). 2-core EPYC (Zen 4), fp32, x's gradient, two
  // outputs -> symmetrised (ms): K.sum()'s grad 4096 x 128 62-81 -> 36-39, 4096 x 16 24-35 -> 11-12; a
  // dense grad 4096 x 128 64-94 -> 61, 4096 x 3 46-51 -> 30-37, 2048 x 3 12-13 -> 7-8, 1024 x 16
  // 1.4-1.7 -> 1.0-1.4, 4096 x 16 23-26 -> 23-28, but 4096 x 1 11-13 -> 18-23 (with one feature the two
  // products are matrix-vector products, at memory speed), so a dense grad there keeps the two outputs.
  // The other paths' n x n weights are small beside their passes over the features: the rule of the
  // devices without their own kernel.
  if (!want_x || backward_path(grad, x, x, kernel, true) != BackwardPath::kBlocked ||
      (!constant_grad(grad) && x.size(1) < kSymmetrisedDenseMinFeatures))
    return rbf_kernel_self_backward_composite(grad, x, kernel, bandwidth, output_mask);
  const SerialIfSmall serial(kernel.size(0), kernel.size(1), x.size(1));
  const double h = read_bandwidth(bandwidth);
  const auto acc = accumulation_type(x.scalar_type());
  auto [grad_x, unused, h_grad] = rbf_kernel_backward_blocked(grad, x, x, kernel, h, /*want_x=*/true,
                                                             /*want_y=*/false, want_h, acc, log_clamp(acc),
                                                             /*symmetrised=*/true);
  return {grad_x, want_h ? bandwidth_grad(h_grad, bandwidth) : at::Tensor()};
}

}  // namespace bmt_fast::cpu

TORCH_LIBRARY_IMPL(bmt_fast, CPU, m) {
  m.impl("svgd_step", [](const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& bandwidth,
                         c10::string_view algorithm) {
    return bmt_fast::cpu::svgd_step(x, score, bandwidth, std::string_view(algorithm.data(), algorithm.size()));
  });
  m.impl("svgd_step_into", [](const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& bandwidth,
                              c10::string_view algorithm, at::Tensor& out) {
    return bmt_fast::cpu::svgd_step_into(x, score, bandwidth, std::string_view(algorithm.data(), algorithm.size()),
                                         out);
  });
  m.impl("svgd_step_batched_into", [](const at::Tensor& x, const at::Tensor& score,
                                      const std::optional<at::Tensor>& bandwidth, c10::string_view algorithm,
                                      at::Tensor& out) {
    return bmt_fast::cpu::svgd_step_batched_into(x, score, bandwidth,
                                                 std::string_view(algorithm.data(), algorithm.size()), out);
  });
  m.impl("median_bandwidth", [](const at::Tensor& x, c10::string_view algorithm) {
    return bmt_fast::cpu::median_bandwidth(x, std::string_view(algorithm.data(), algorithm.size()));
  });
  m.impl("rbf_kernel", &bmt_fast::cpu::rbf_kernel);
  m.impl("rbf_kernel_median", &bmt_fast::cpu::rbf_kernel_median);
  m.impl("rbf_kernel_backward", &bmt_fast::cpu::rbf_kernel_backward);
  m.impl("rbf_kernel_self_backward", &bmt_fast::cpu::rbf_kernel_self_backward);
}
