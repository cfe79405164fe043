// Shared declarations of the torch.ops.bmt_fast library: argument rules (one set for the CPU, CUDA and
// Meta kernels), the bandwidth rule and the CPU entry points (also called by the C++ test binary).
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/stack.h>
#include <c10/util/Exception.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace bmt_fast {

// H never goes below this (squared-distance units): it only matters when more than half of all pairs
// coincide (median zero). Must equal bmt_fast.reference.BANDWIDTH_FLOOR (a test checks it).
constexpr double kBandwidthFloor = 1e-12;

// The SVGD authors' median rule: H = median / log(n + 1), floored.
inline double bandwidth_from_median(double median, int64_t n) {
  return std::max(median / std::log(static_cast<double>(n) + 1.0), kBandwidthFloor);
}

// fp64 computes in fp64; fp32, bf16 and fp16 compute in fp32.
inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Readable argument checks: `name` must have shape (...) etc. Work on symbolic sizes, so the Meta
// kernels (torch.compile, opcheck) share them with the real kernels.
#define BMT_CHECK(cond, ...) TORCH_CHECK(cond, "bmt_fast: ", __VA_ARGS__)

// Numbers in error messages are formatted here, never streamed into c10::str's std::ostringstream: on a GPU
// machine (torch 2.11, extension built with GCC 13) any check whose message streamed an integer crashed
// the process (segmentation fault) instead of raising, while messages made only of strings raised.
inline std::string num(int64_t v) { return std::to_string(v); }

inline std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

inline std::string size_str(const c10::SymInt& s) {
  const auto v = s.maybe_as_int();
  return v ? num(*v) : std::string("symbolic");
}

// Shapes are compared and printed one dimension at a time, not through c10::ArrayRef's operator== and
// operator<< (the first crash above was `score.sym_sizes() == x.sym_sizes()` and its message).
inline std::string shape_str(const at::Tensor& t) {
  std::string out = "[";
  for (int64_t i = 0; i < t.dim(); ++i) out += (i ? ", " : "") + size_str(t.sym_size(i));
  return out + "]";
}

inline bool same_shape(const at::Tensor& a, const at::Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t i = 0; i < a.dim(); ++i) {
    if (a.sym_size(i) != b.sym_size(i)) return false;
  }
  return true;
}

inline void check_floating(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  BMT_CHECK(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf, name,
            " must be float32, float64, bfloat16 or float16, got ", s);
}

inline void check_particles(const at::Tensor& t, const char* name) {
  BMT_CHECK(t.dim() == 2, name, " must be 2-D (n, d), got ", num(t.dim()), " dims");
  BMT_CHECK(t.sym_numel() > 0, name, " must not be empty, got shape ", shape_str(t));
  check_floating(t, name);
}

inline void check_like(const at::Tensor& ref, const char* ref_name, const at::Tensor& t, const char* name) {
  BMT_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
            ref.scalar_type(), "), got ", t.scalar_type());
  BMT_CHECK(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (", ref.device(),
            "), got ", t.device());
}

inline void check_bandwidth(const at::Tensor& h, const at::Tensor& x) {
  BMT_CHECK(h.sym_numel() == 1, "bandwidth must hold one value, got shape ", shape_str(h));
  BMT_CHECK(h.is_floating_point(), "bandwidth must be floating point, got ", h.scalar_type());
  BMT_CHECK(h.device() == x.device(), "bandwidth must be on the device of x (", x.device(), "), got ",
            h.device());
}

inline void check_svgd_step_args(const at::Tensor& x, const at::Tensor& score,
                                 const std::optional<at::Tensor>& bandwidth) {
  check_particles(x, "x");
  check_like(x, "x", score, "score");
  BMT_CHECK(same_shape(score, x), "score must have the shape of x ", shape_str(x), ", got ", shape_str(score));
  if (bandwidth.has_value()) check_bandwidth(*bandwidth, x);
}

// The out tensor of svgd_step_into (and svgd_step_batched_into): where phi goes, written in place.
inline void check_svgd_step_out(const at::Tensor& x, const at::Tensor& score, const at::Tensor& out) {
  check_like(x, "x", out, "out");
  BMT_CHECK(same_shape(out, x), "out must have the shape of x ", shape_str(x), ", got ", shape_str(out));
  BMT_CHECK(out.is_contiguous(), "out must be contiguous");
  for (const auto& [t, name] : {std::pair{&x, "x"}, std::pair{&score, "score"}})
    BMT_CHECK(!out.storage().is_alias_of(t->storage()) || at::get_overlap_status(out, *t) == at::MemOverlapStatus::No,
              "out must not overlap ", name);
}

// svgd_step_batched_into by one svgd_step_into per set, one after another: step(x_s, score_s, bandwidth_s,
// out_s) -> that set's 0-dim flag; the (sets,) flags on x's device.
template <typename Step>
at::Tensor step_each_set(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& bandwidth,
                         at::Tensor& out, Step&& step) {
  std::vector<at::Tensor> flags;
  flags.reserve(x.size(0));
  for (int64_t set = 0; set < x.size(0); ++set) {
    at::Tensor phi = out.select(0, set);
    flags.push_back(step(x.select(0, set), score.select(0, set),
                         bandwidth ? std::optional<at::Tensor>(bandwidth->select(0, set)) : std::nullopt, phi));
  }
  return at::stack(flags);
}

// svgd_step_into where phi comes whole from svgd_step: copied into out, then scanned for NaN/Inf (a 0-dim
// bool on out's device).
inline at::Tensor copy_and_check_finite(at::Tensor& out, const at::Tensor& phi) {
  out.copy_(phi);
  return out.isfinite().all();
}

inline void check_rbf_kernel_args(const at::Tensor& x, const at::Tensor& y, const at::Tensor& bandwidth) {
  check_particles(x, "x");
  check_particles(y, "y");
  check_like(x, "x", y, "y");
  BMT_CHECK(y.sym_size(1) == x.sym_size(1), "y must have d = ", size_str(x.sym_size(1)), " columns like x, got ",
            size_str(y.sym_size(1)));
  check_bandwidth(bandwidth, x);
}

inline void check_rbf_kernel_backward_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                                           const at::Tensor& kernel, const at::Tensor& bandwidth) {
  check_rbf_kernel_args(x, y, bandwidth);
  for (const auto& [t, name] : {std::pair{&grad, "grad"}, std::pair{&kernel, "kernel"}}) {
    BMT_CHECK(t->dim() == 2 && t->sym_size(0) == x.sym_size(0) && t->sym_size(1) == y.sym_size(0), name,
              " must have shape (", size_str(x.sym_size(0)), ", ", size_str(y.sym_size(0)), "), got ", shape_str(*t));
    BMT_CHECK(t->device() == x.device(), name, " must be on the device of x");
    check_floating(*t, name);
  }
}

// Which algorithm a kernel uses for svgd_step / median_bandwidth.
enum class Algorithm { kAuto, kTiled, kGram };

inline Algorithm parse_algorithm(std::string_view name) {
  if (name == "auto") return Algorithm::kAuto;
  if (name == "tiled") return Algorithm::kTiled;
  if (name == "gram") return Algorithm::kGram;
  BMT_CHECK(false, "algorithm must be \"auto\", \"tiled\" or \"gram\", got \"", std::string(name), "\"");
  return Algorithm::kAuto;
}

// svgd_step_batched_into's arguments (its Meta, CPU and composite kernels): x and score (B, n, d), B
// independent particle sets of one shape; the bandwidth None (the median rule, each set its own) or (B,):
// one H per set; the algorithm; out as svgd_step_into's.
inline void check_svgd_step_batched_args(const at::Tensor& x, const at::Tensor& score,
                                         const std::optional<at::Tensor>& bandwidth, std::string_view algorithm,
                                         const at::Tensor& out) {
  BMT_CHECK(x.dim() == 3, "x must be 3-D (sets, n, d), got ", num(x.dim()), " dims");
  BMT_CHECK(x.sym_numel() > 0, "x must not be empty, got shape ", shape_str(x));
  check_floating(x, "x");
  check_like(x, "x", score, "score");
  BMT_CHECK(same_shape(score, x), "score must have the shape of x ", shape_str(x), ", got ", shape_str(score));
  if (bandwidth.has_value()) {
    const at::Tensor& h = *bandwidth;
    BMT_CHECK(h.dim() == 1 && h.sym_size(0) == x.sym_size(0), "bandwidth must have shape (",
              size_str(x.sym_size(0)), ",): one value per set, got shape ", shape_str(h));
    BMT_CHECK(h.is_floating_point(), "bandwidth must be floating point, got ", h.scalar_type());
    BMT_CHECK(h.device() == x.device(), "bandwidth must be on the device of x (", x.device(), "), got ",
              h.device());
  }
  check_svgd_step_out(x, score, out);
  parse_algorithm(algorithm);
}

// A given H: positive, finite, and at least the smallest normal number of the kernels' arithmetic for these
// particles (float32; float64 for float64 ones), where 1/H stays finite (below it phi and K came out NaN).
inline double checked_bandwidth(double value, at::ScalarType particles) {
  BMT_CHECK(std::isfinite(value) && value > 0.0, "bandwidth must be positive and finite, got ", num(value));
  const bool wide = particles == at::kDouble;
  const double tiny = wide ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
  BMT_CHECK(value >= tiny, "bandwidth ", num(value), " is below the smallest normal ", wide ? "float64" : "float32",
            " number (", num(tiny), "), the arithmetic of ", c10::toString(particles), " particles: 1/H would overflow");
  return value;
}

inline double read_bandwidth(const at::Tensor& h, at::ScalarType particles) {
  return checked_bandwidth(h.item<double>(), particles);
}

// rbf_kernel_self_backward on any device without its own kernel (registration.cpp), and the CPU's outside
// its general path: through rbf_kernel_backward, with grad + grad^T or with both of its gradients.
std::tuple<at::Tensor, at::Tensor> rbf_kernel_self_backward_composite(const at::Tensor& grad, const at::Tensor& x,
                                                                      const at::Tensor& kernel,
                                                                      const at::Tensor& bandwidth,
                                                                      std::array<bool, 2> output_mask);

namespace cpu {
// The most particles "auto" takes the Gram path with on CPU (few particles, huge d), where there are enough
// features for each op (cpu/gram.cpp, prefers_gram): kGramRuleMaxParticles; on the shapes AMX would take
// kGramMaxParticles, and up to kGramWideMaxParticles where n^2 <= 8 d; kGramMaxParticles also bounds the
// rows of two sets, n + m.
constexpr int64_t kGramMaxParticles = 64;
constexpr int64_t kGramWideMaxParticles = 192;
constexpr int64_t kGramRuleMaxParticles = 512;
// Whether "auto" takes the few-particle Gram path for the particles x (n x d) in `op`: "svgd_step" (H
// given), "median_bandwidth" (also svgd_step with the median rule) or "rbf_kernel" (x with itself);
// cpu/gram.cpp, prefers_gram. For tests and benchmarks that name the path.
bool takes_gram_path(const at::Tensor& x, std::string_view op);
// Whether the CPU's rbf_kernel of x and y ("rbf_kernel": two sets only) or its gradients
// ("rbf_kernel_backward"; y the same tensor as x for a self kernel) go by direct differences of the rows
// (cpu/gram.cpp: direct_cross_kernel; cpu/rbf_backward.cpp: direct_gradient), for the tests of those rules.
bool takes_direct_path(const at::Tensor& x, const at::Tensor& y, std::string_view op);

// Up to how many particles, and from how many features, the tiled path's self-kernel passes (svgd_step,
// rbf_kernel(x), the median) go by feature chunks in fp32/fp64 (cpu/chunked.cpp), flagging a non-finite phi;
// and beyond that up to kChunkedWideMaxParticles where there are at least kChunkedWideFeaturesPerParticle
// features per particle.
constexpr int64_t kChunkedMaxParticles = 512;
constexpr int64_t kChunkedMinFeatures = 64;
constexpr int64_t kChunkedWideMaxParticles = 1024;
constexpr int64_t kChunkedWideFeaturesPerParticle = 4;
// Rows and columns of one distance tile in the tiled path.
constexpr int64_t kTileSize = 512;
// Largest n whose exact median bandwidth (tiled path) selects over stored distances instead of radix
// passes over recomputed tiles: n(n-1)/2 values, at most 1 MiB of fp32 at 512.
constexpr int64_t kMedianSelectMaxParticles = 512;
// Beyond it: at most this many pairs sampled to bracket the median, and the most memory the bracketed
// distances may take before the radix passes are used instead.
constexpr int64_t kMedianWindowMaxSamples = int64_t{1} << 20;
constexpr int64_t kMedianWindowMaxBytes = int64_t{128} << 20;

at::Tensor svgd_step(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& bandwidth,
                     std::string_view algorithm);
// svgd_step written into out (x's shape and dtype, contiguous, no overlap with x or score); returns a
// 0-dim bool: whether phi is all finite (on the Gram path tracked while phi is written, else a scan).
at::Tensor svgd_step_into(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& bandwidth,
                          std::string_view algorithm, at::Tensor& out);
// svgd_step_into of each of B particle sets (x, score, out: (B, n, d); bandwidth None or (B,)); returns a
// (B,) bool: whether each set's phi is all finite. Each set's phi is the single op's on it, bit for bit:
// sets small enough for the single op to run on one thread, on this library's own kernels, are spread over
// the threads, each on one; the others run one after another, each as the single op.
at::Tensor svgd_step_batched_into(const at::Tensor& x, const at::Tensor& score,
                                  const std::optional<at::Tensor>& bandwidth, std::string_view algorithm,
                                  at::Tensor& out);
at::Tensor rbf_kernel(const at::Tensor& x, const at::Tensor& y, const at::Tensor& bandwidth);
// (grad_x, grad_y, grad_bandwidth); an output that output_mask leaves out is undefined (None in Python).
std::tuple<at::Tensor, at::Tensor, at::Tensor> rbf_kernel_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& y, const at::Tensor& kernel,
                                                                   const at::Tensor& bandwidth,
                                                                   std::array<bool, 3> output_mask);
// rbf_kernel_self_backward: (grad_x, grad_bandwidth) of K = rbf_kernel(x, x, H), x on both sides.
std::tuple<at::Tensor, at::Tensor> rbf_kernel_self_backward(const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& kernel, const at::Tensor& bandwidth,
                                                            std::array<bool, 2> output_mask);
at::Tensor median_bandwidth(const at::Tensor& x, std::string_view algorithm);
// (rbf_kernel(x, x, H), H) with H = median_bandwidth(x, "auto"), the same values; few particles: one pass.
std::tuple<at::Tensor, at::Tensor> rbf_kernel_median(const at::Tensor& x);
}  // namespace cpu

}  // namespace bmt_fast
