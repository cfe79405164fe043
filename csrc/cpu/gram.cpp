// Few particles, huge d (soft prompts): the Gram path. A split-K Gram pass over column chunks (each centred
// on the fly) gives the n x n squared distances, K is tiny, and one memory-bound apply pass writes
// phi = (K/n) W + c * xc over the same chunks (kernels.h: gram_columns, apply_columns). Also where "auto"
// takes it (the rules, per op), and two small sets by direct differences of their rows (rbf_kernel's
// forward; its gradient in rbf_backward.cpp).

#include <atomic>
#include <memory>

#include "median_select.h"
#include "paths.h"

namespace bmt_fast::cpu {

namespace {

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

}  // namespace

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

bool takes_gram_path(const at::Tensor& x, std::string_view op) {
  BMT_CHECK(x.dim() == 2, "takes_gram_path: x must be 2-D (n, d), got ", x.dim(), "-D");
  if (op == "svgd_step") return prefers_gram(x, GramUse::kStep);
  if (op == "median_bandwidth") return prefers_gram(x, GramUse::kMedian);
  if (op == "rbf_kernel") return prefers_gram(x, GramUse::kKernel);
  BMT_CHECK(false, "takes_gram_path: op must be \"svgd_step\", \"median_bandwidth\" or \"rbf_kernel\", got \"",
            std::string(op), "\"");
  return false;
}

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

namespace {

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

// Whether the Gram pass's expansion |a|^2 + |b|^2 - 2 a.b (of rows shifted by x_0) lost too much of a pair's
// distance to cancellation: a distance below kMinShare of |x_i - x_0|^2 + |x_j - x_0|^2 (fp32: beyond that
// its relative error can pass ~1e-3, a few 1e-4 of K at most). x_0 far from a tight group of the others (an outlier in row 0) made fp32 K wrong by
// 0.95 and the median 20 % off, where row 15 instead gave 3e-5 (rows are particles: their order must not
// matter). Distances of 0 count (identical rows give exact zeros either way, but so can cancellation).
template <typename T>
bool gram_cancelled(const std::vector<double>& gram, const std::vector<double>& dist, int64_t n) {
  constexpr double kMinShare = std::is_same_v<T, double> ? 1e-5 : 1e-3;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j)
      if (dist[i * n + j] < kMinShare * (gram[i * n + i] + gram[j * n + j])) return true;
  return false;
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
  if (gram_cancelled<gram_compute_t<In>>(gram, dist, n)) {
    // Again by direct differences (no cancellation; about twice the Gram pass's products, in such cases
    // only). The shift the pass wrote (the column centres) stands: it does not depend on the rows' order.
    const at::Tensor rows = y ? at::cat({x, *y}) : x;
    dist = cross_sq_dists_threaded<In>(rows, rows);
  }
  return dist;
}

// Writes phi into `phi` (contiguous, x's shape and dtype) and returns whether all of it is finite
// (tracked by the apply pass in registers: no pass over phi).
template <typename In>
bool svgd_step_gram(const at::Tensor& x, const at::Tensor& score, const std::optional<double>& bandwidth,
                    const at::Tensor& phi) {
  using T = gram_compute_t<In>;
  const int64_t n = x.size(0), d = x.size(1);
  const AlignedBuffer<T> shift = aligned_uninitialised<T>(d);  // written by the Gram pass: not zeroed first
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

std::vector<double> gram_sq_dists(const at::Tensor& x, const at::Tensor* y) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gram_sq_dists",
                                         [&] { return sq_dists_gram<scalar_t>(x, nullptr, y); });
}

std::vector<double> direct_sq_dists(const at::Tensor& x, const at::Tensor& y) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "direct_sq_dists",
                                         [&] { return cross_sq_dists_threaded<scalar_t>(x, y); });
}

bool svgd_step_by_gram(const at::Tensor& x, const at::Tensor& score, const std::optional<double>& bandwidth,
                       at::Tensor& out) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "svgd_step_gram",
                                         [&] { return svgd_step_gram<scalar_t>(x, score, bandwidth, out); });
}

}  // namespace bmt_fast::cpu
