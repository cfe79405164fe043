// The CPU ops of torch.ops.bmt_fast (svgd_step and its batched form, median_bandwidth, rbf_kernel,
// rbf_kernel_median, rbf_kernel's gradients) and the choice among their paths, each in a file of its own
// (paths.h) around the SIMD loops of kernels.h. The paths, none with any n x n buffer beyond one tile but
// the tiny K of few particles:
//
//   tiled (many particles; tiled.cpp): for each tile (I, J) of the upper triangle, S = xc_I xc_J^T by GEMM,
//     turned into K in place; acc_I += K W_J and acc_J += K^T W_I with W = [score - (2/H) xc | 1]. Then
//     phi = (acc[:, :d] + (2/H) acc[:, d] * xc) / n. Folding both terms into one W halves the GEMM work
//     of K @ [score | x]; symmetry halves the distance GEMMs: 3 n^2 d FLOPs instead of 6 n^2 d.
//   fused (many particles, d up to 256; fused.cpp): the same sums without the tiles: a register block of 4
//     rows x 64 columns (AVX-512) of dot products by FMAs, K's entries there, then K W added into the rows'
//     sums (kernels.h: fused_step_rows); from 2048 particles by pairs of row blocks, K once per pair added
//     into both sides' sums (fused_step_pair).
//   feature chunks (few particles with many features; chunked.cpp): the Gram pass by GEMMs on chunks of
//     features, then K W a chunk at a time.
//   gram (few particles, huge d; gram.cpp): split-K Gram over column chunks (each chunk centred on the fly),
//     a tiny n x n K, then one memory-bound pass phi = (K/n) W + c * xc over the same chunks.
//   bf16 on AMX (many bf16 particles, d >= 32, a CPU with AMX tiles; fp32 ones too where torch's fp32
//     matmul precision is bf16; amx.cpp): the tiled step, the median, rbf_kernel and its gradient through
//     oneDNN's brgemm on bf16-rounded operands (the CUDA tensor-core precision).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "../bmt_fast.h"
#include "median_select.h"
#include "paths.h"

namespace bmt_fast::cpu {

namespace {

// The path svgd_step_to takes for particles x (n x d) with a given bandwidth or by the median rule.
enum class StepPath { kGram, kAmx, kGemmChunked, kFused, kTiled };

StepPath step_path(const at::Tensor& x, Algorithm algorithm, bool bandwidth_given) {
  if (use_gram(x, algorithm, bandwidth_given ? GramUse::kStep : GramUse::kMedian)) return StepPath::kGram;
  if (use_amx(x)) return StepPath::kAmx;
  if (use_gemm_gram_chunked(x.size(0), x.size(1))) return StepPath::kGemmChunked;
  return use_fused(x.size(1)) ? StepPath::kFused : StepPath::kTiled;
}

// phi into `out` (contiguous, x's shape and dtype; checked by the callers). Returns whether phi is all
// finite where the last pass that writes phi tracks it (the Gram, AMX, feature-chunk and fused paths, fp32
// GEMM tiles), nullopt elsewhere (svgd_step_into then scans phi).
std::optional<bool> svgd_step_to(const at::Tensor& x_in, const at::Tensor& score_in, const std::optional<double>& h,
                                 std::string_view algorithm, at::Tensor& out) {
  const at::Tensor x = x_in.contiguous(), score = score_in.contiguous();
  const StepPath path = step_path(x, parse_algorithm(algorithm), h.has_value());
  bool finite = true;
  switch (path) {
    case StepPath::kGram:
      // its two passes in one team (team.h): fp32, PASSIVE, alternating, 3 rounds, two regions -> one team
      // (us): 4 x 409,600 828-872 -> 771-780, 16 x 76,800 875-925 -> 795-798, 16 x 409,600 and 64 x 76,800 level
      run_team([&] { finite = svgd_step_by_gram(x, score, h, out); });
      return finite;
    case StepPath::kAmx:
      return svgd_step_by_amx(x, score, h, out);
    case StepPath::kGemmChunked:
      run_team([&] { finite = svgd_step_by_gemm_chunks(x, score, h, out); });
      return finite;
    case StepPath::kFused:
      return svgd_step_by_fused(x, score, h, out);
    case StepPath::kTiled:
      break;
  }
  return svgd_step_by_tiles(x, score, h, out);
}

// A given bandwidth's value, checked (read_bandwidth); none for the median rule.
std::optional<double> bandwidth_value(const std::optional<at::Tensor>& bandwidth, const at::Tensor& x) {
  return bandwidth ? std::optional<double>(read_bandwidth(*bandwidth, x.scalar_type())) : std::nullopt;
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
  return at::scalar_tensor(step_into_checked(x, score, bandwidth_value(bandwidth, x), algorithm, out),
                           x.options().dtype(at::kBool));
}

at::Tensor svgd_step(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& bandwidth,
                     std::string_view algorithm) {
  check_svgd_step_args(x, score, bandwidth);
  const SerialIfSmall serial(x.size(0), x.size(0), x.size(1));
  at::Tensor phi = empty_large(x.sizes(), x.options());
  svgd_step_to(x, score, bandwidth_value(bandwidth, x), algorithm, phi);
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
  check_cpu_settings();  // (before any set is written: the sets' own checks run in the threads' shares)
  const at::Tensor x = x_in.contiguous(), score = score_in.contiguous();
  const int64_t sets = x.size(0), n = x.size(1), d = x.size(2);
  // Every set's bandwidth read and checked before any set is stepped (a bad one leaves out as it was)
  std::vector<double> h;
  if (bandwidth) {
    const at::Tensor values = bandwidth->to(at::kDouble).contiguous();
    h.assign(values.const_data_ptr<double>(), values.const_data_ptr<double>() + sets);
    for (const double value : h) checked_bandwidth(value, x.scalar_type());
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

at::Tensor median_bandwidth(const at::Tensor& x_in, std::string_view algorithm) {
  check_particles(x_in, "x");
  const Algorithm algo = parse_algorithm(algorithm);
  const SerialIfSmall serial(x_in.size(0), x_in.size(0), x_in.size(1));
  const at::Tensor x = x_in.contiguous();
  double median;
  if (use_gram(x, algo, GramUse::kMedian)) {
    median = median_of_gram_dists(gram_sq_dists(x), x.size(0));
  } else if (use_amx(x)) {
    median = median_by_amx(x);
  } else if (use_gemm_gram_chunked(x.size(0), x.size(1))) {
    run_team([&] { median = median_sq_dist_chunked(gemm_gram_chunked(x)); });
  } else {
    median = median_by_gemm_path(x);
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
  const double h = read_bandwidth(bandwidth, x.scalar_type());
  const auto acc = accumulation_type(x.scalar_type());
  const bool self = x.is_same(y);
  const int64_t n = x.size(0), m = y.size(0), gram_rows = self ? n : n + m;
  if (!self && direct_cross_kernel(n, m, x.size(1), use_amx(x))) {
    // Two sets, few pairs (the trainer's prior: one prompt against M particles): the n x m distances by
    // direct differences, 2nm operations per column where the Gram pass needs (n + m)(n + m + 1) / 2.
    const at::Tensor xs = x.contiguous(), ys = y.contiguous();
    const std::vector<double> dist = direct_sq_dists(xs, ys);
    at::Tensor k = at::empty({n, m}, x.options().dtype(at::kDouble));
    std::memcpy(k.data_ptr<double>(), dist.data(), static_cast<size_t>(n * m) * sizeof(double));
    exp_scaled(k.data_ptr<double>(), n * m, -1.0 / h);
    return k.to(x.scalar_type());
  }
  if (self ? prefers_gram(x, GramUse::kKernel) : gram_rows <= kGramMaxParticles) {
    // Few particles (often huge d): the distances from one split-K Gram pass over the rows, without the
    // centred copies and GEMM below (4 x 409,600 on a 2-core Xeon: 5.4 ms that way, 2.5 ms naive torch).
    const at::Tensor xs = x.contiguous(), ys = self ? xs : y.contiguous();
    const std::vector<double> dist = gram_sq_dists(xs, self ? nullptr : &ys);
    return kernel_from_gram_dists(dist, n, m, self, h, x.options());
  }
  // bf16 particles (or fp32 under bf16 matmuls) on AMX tiles (d >= 32): as the step's K
  if (use_amx(x)) return rbf_kernel_by_amx(x, y, h);
  if (self && use_fused_kernel(x.size(1))) return rbf_kernel_by_fused(x.contiguous(), h, nullptr).to(x.scalar_type());
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
    return rbf_kernel_self_by_tiles(xc, nx, h).to(x.scalar_type());
  }
  at::Tensor k = empty_large({n, m}, xc.options());
  at::mm_out(k, xc, yc.t());
  const int64_t rows = k.size(0), cols = k.size(1);
  AT_DISPATCH_FLOATING_TYPES(acc, "rbf_kernel", [&] {
    parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      rbf_from_dots(k.data_ptr<scalar_t>(), cols, begin, end, cols, nx.data_ptr<scalar_t>(),
                    ny.data_ptr<scalar_t>(), inverse_bandwidth<scalar_t>(h));
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
    if (use_amx(x_in)) return rbf_kernel_median_by_amx(x_in);  // (the AMX operands are kept, and dot products)
    if (use_fused_median(x_in.size(1)) && use_fused_kernel(x_in.size(1))) {  // one team for both
      const at::Tensor x = x_in.contiguous();
      double median = 0.0;
      const at::Tensor k = rbf_kernel_by_fused(x, std::nullopt, &median);
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
    // the median's GEMM tiles kept for K where keeps_dots
    if (self_kernel_by_tiles(n, x_in.size(1))) return rbf_kernel_median_by_tiles(x_in.contiguous());
    at::Tensor h = median_bandwidth(x_in, "auto");
    return {median_kernel(h, x_in, [&](double) { return rbf_kernel(x_in, x_in, h); }), h};
  }
  // Few particles (often huge d): one Gram pass gives the median and the kernel; the two ops make two.
  const at::Tensor x = x_in.contiguous();
  const std::vector<double> dist = gram_sq_dists(x);
  const at::Tensor h = bandwidth_result(median_of_gram_dists(dist, n), x);  // as median_bandwidth returns it
  return {median_kernel(h, x, [&](double v) { return kernel_from_gram_dists(dist, n, n, true, v, x.options()); }), h};
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
