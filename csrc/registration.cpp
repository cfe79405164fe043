// The torch.ops.bmt_fast library: one schema per op, and Meta kernels (shape rules only) that give
// torch.compile and FakeTensor the output shapes. The CPU and CUDA kernels register in their own files.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/variable.h>  // bump_version
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "bmt_fast.h"

namespace bmt_fast {
namespace {

// The registered op `name` (its schema looked up once by each caller's static handle), of signature Sig.
template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using SvgdStepSig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                               c10::string_view);
using SvgdStepIntoSig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                   c10::string_view, at::Tensor&);
using MedianSig = at::Tensor(const at::Tensor&, c10::string_view);
using RbfBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, std::array<bool, 3>);
using RbfSelfBackwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                              const at::Tensor&, std::array<bool, 2>);

at::Tensor svgd_step_meta(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& bandwidth,
                          c10::string_view algorithm) {
  check_svgd_step_args(x, score, bandwidth);
  parse_algorithm(std::string_view(algorithm.data(), algorithm.size()));
  return at::empty_like(x, at::MemoryFormat::Contiguous);
}

at::Tensor svgd_step_into_meta(const at::Tensor& x, const at::Tensor& score,
                               const std::optional<at::Tensor>& bandwidth, c10::string_view algorithm,
                               at::Tensor& out) {
  svgd_step_meta(x, score, bandwidth, algorithm);  // the same argument checks
  check_svgd_step_out(x, score, out);
  return at::empty({}, x.options().dtype(at::kBool));
}

at::Tensor svgd_step_batched_into_meta(const at::Tensor& x, const at::Tensor& score,
                                       const std::optional<at::Tensor>& bandwidth, c10::string_view algorithm,
                                       at::Tensor& out) {
  check_svgd_step_batched_args(x, score, bandwidth, std::string_view(algorithm.data(), algorithm.size()), out);
  return at::empty_symint({x.sym_size(0)}, x.options().dtype(at::kBool));
}

// Any device without its own kernel: svgd_step, copied into out, then a scan of it.
at::Tensor svgd_step_into_composite(const at::Tensor& x, const at::Tensor& score,
                                    const std::optional<at::Tensor>& bandwidth, c10::string_view algorithm,
                                    at::Tensor& out) {
  check_svgd_step_args(x, score, bandwidth);
  check_svgd_step_out(x, score, out);
  static const auto op = op_handle<SvgdStepSig>("bmt_fast::svgd_step");
  return copy_and_check_finite(out, op.call(x, score, bandwidth, algorithm));
}

// Any device without its own kernel: svgd_step_into on each set, one after another.
at::Tensor svgd_step_batched_into_composite(const at::Tensor& x, const at::Tensor& score,
                                            const std::optional<at::Tensor>& bandwidth, c10::string_view algorithm,
                                            at::Tensor& out) {
  check_svgd_step_batched_args(x, score, bandwidth, std::string_view(algorithm.data(), algorithm.size()), out);
  static const auto op = op_handle<SvgdStepIntoSig>("bmt_fast::svgd_step_into");
  return step_each_set(x, score, bandwidth, out, [&](const at::Tensor& xs, const at::Tensor& ss,
                                                     const std::optional<at::Tensor>& hs, at::Tensor& phi) {
    return op.call(xs, ss, hs, algorithm, phi);
  });
}

// Any device without its own kernel: the median rule, then the kernel with that bandwidth.
std::tuple<at::Tensor, at::Tensor> rbf_kernel_median_composite(const at::Tensor& x) {
  check_particles(x, "x");
  static const auto median = op_handle<MedianSig>("bmt_fast::median_bandwidth");
  static const auto kernel = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("bmt_fast::rbf_kernel");
  at::Tensor h = median.call(x, "auto");
  return {kernel.call(x, x, h), h};
}

at::Tensor median_bandwidth_meta(const at::Tensor& x, c10::string_view algorithm) {
  check_particles(x, "x");
  parse_algorithm(std::string_view(algorithm.data(), algorithm.size()));
  return at::empty({}, x.options().dtype(accumulation_type(x.scalar_type())));
}

at::Tensor rbf_kernel_meta(const at::Tensor& x, const at::Tensor& y, const at::Tensor& bandwidth) {
  check_rbf_kernel_args(x, y, bandwidth);
  return at::empty_symint({x.sym_size(0), y.sym_size(0)}, x.options());
}

// An empty tensor like t where an output mask asks for it, else undefined (None).
at::Tensor empty_like_if(bool wanted, const at::Tensor& t) {
  return wanted ? at::empty_like(t, at::MemoryFormat::Contiguous) : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rbf_kernel_backward_meta(const at::Tensor& grad, const at::Tensor& x,
                                                                        const at::Tensor& y, const at::Tensor& kernel,
                                                                        const at::Tensor& bandwidth,
                                                                        std::array<bool, 3> output_mask) {
  check_rbf_kernel_backward_args(grad, x, y, kernel, bandwidth);
  return {empty_like_if(output_mask[0], x), empty_like_if(output_mask[1], y), empty_like_if(output_mask[2], bandwidth)};
}

std::tuple<at::Tensor, at::Tensor> rbf_kernel_self_backward_meta(const at::Tensor& grad, const at::Tensor& x,
                                                                 const at::Tensor& kernel, const at::Tensor& bandwidth,
                                                                 std::array<bool, 2> output_mask) {
  check_rbf_kernel_backward_args(grad, x, x, kernel, bandwidth);
  return {empty_like_if(output_mask[0], x), empty_like_if(output_mask[1], bandwidth)};
}

// ---- autograd: svgd_step, svgd_step_into, median_bandwidth and the two backward ops are not differentiable
// (rbf_kernel and rbf_kernel_median get their formulas in Python: bmt_fast/ops.py). Without a kernel for
// the Autograd key, torch's fallback gave their results requires_grad=True and a backward that left the
// gradients None with a warning, and svgd_step_into's writes to out did not bump out's version counter,
// so autograd could use the overwritten values of a tensor it had saved without noticing. These kernels
// run the op below autograd (results without history, as for torch.argmax) and bump out's version.

// The op of signature Sig named `name`, called below autograd: not differentiable.
template <typename Sig, const char* kName>
struct NoGrad;
template <typename R, typename... Args, const char* kName>
struct NoGrad<R(Args...), kName> {
  static R call(Args... args) {
    static const auto op = op_handle<R(Args...)>(kName);
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(std::forward<Args>(args)...);
  }
};
constexpr char kSvgdStep[] = "bmt_fast::svgd_step";
constexpr char kMedianBandwidth[] = "bmt_fast::median_bandwidth";
constexpr char kRbfKernelBackward[] = "bmt_fast::rbf_kernel_backward";
constexpr char kRbfKernelSelfBackward[] = "bmt_fast::rbf_kernel_self_backward";

constexpr char kSvgdStepInto[] = "bmt_fast::svgd_step_into";
constexpr char kSvgdStepBatchedInto[] = "bmt_fast::svgd_step_batched_into";

// svgd_step_into (and svgd_step_batched_into) for the Autograd and ADInplaceOrView keys: an out that
// autograd tracks is refused (as torch's out= functions do), and out's version counter is bumped after the
// write (inference mode on a normal tensor reaches the ADInplaceOrView kernel alone; below the Autograd one
// it is skipped).
template <const char* kName>
at::Tensor into_tracked(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& bandwidth,
                        c10::string_view algorithm, at::Tensor& out) {
  BMT_CHECK(!(at::GradMode::is_enabled() && out.requires_grad()), kName + std::strlen("bmt_fast::"),
            ": out must not require grad (the op is not differentiable; write into it under "
            "torch.no_grad(), or pass an out that autograd does not track)");
  static const auto op = op_handle<SvgdStepIntoSig>(kName);
  at::Tensor finite;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    finite = op.call(x, score, bandwidth, algorithm, out);
  }
  torch::autograd::impl::bump_version(out);
  return finite;
}

}  // namespace

// The self kernel's backward symmetrises its weights up to kSelfSymmetrisedMaxParticles particles, and beyond
// them where the features outnumber the particles kSelfSymmetrisedMinFeaturesPerParticle times: x's two
// gradients' sum in one pass with grad + grad^T (K is symmetric) instead of two n x d results and their sum
// (2-core Xeon, 16 x 409,600 fp32: 6.1-11.5 -> 3.8-5.8 ms). Elsewhere the n x n weights are large beside
// the passes over the features, and their transposed add in memory cost more than it saved (2-core Xeon:
// 2048 x 16 fp32 17-22 -> 41-49 ms, bf16 4096 x 512 on AMX 29-32 -> 128-130 ms); with d >= 4 n it gains
// (alternating, AMX for bf16): bf16 256 x 76,800 50-56 -> 29-33 ms, 1024 x 8192 46-47 -> 27 ms, 512 x 2048
// 3.5-4.4 -> 2.2-2.3 ms; fp32 256 x 76,800 102-104 -> 52-55 ms, 512 x 2048 7.3-7.6 -> 3.9-4.0 ms. (Measured on
// the CPU, where this rule ran before; not yet on a GPU. The CPU's general path now forms grad + grad^T a
// block at a time instead: rbf_kernel_backward_blocked in csrc/cpu/rbf_backward.cpp.)
constexpr int64_t kSelfSymmetrisedMaxParticles = 64;
constexpr int64_t kSelfSymmetrisedMinFeaturesPerParticle = 4;

std::tuple<at::Tensor, at::Tensor> rbf_kernel_self_backward_composite(const at::Tensor& grad, const at::Tensor& x,
                                                                      const at::Tensor& kernel,
                                                                      const at::Tensor& bandwidth,
                                                                      std::array<bool, 2> output_mask) {
  check_rbf_kernel_backward_args(grad, x, x, kernel, bandwidth);
  static const auto backward = op_handle<RbfBackwardSig>(kRbfKernelBackward);
  const auto [want_x, want_h] = output_mask;
  const int64_t n = x.size(0), d = x.size(1);
  if (want_x && (n <= kSelfSymmetrisedMaxParticles || n * kSelfSymmetrisedMinFeaturesPerParticle <= d)) {
    // The symmetrised weights double H's gradient (sum P log K over a symmetric K): halved, exactly.
    auto [grad_x, unused, grad_h] = backward.call(grad + grad.mT(), x, x, kernel, bandwidth, {true, false, want_h});
    return {grad_x, want_h ? grad_h.div_(2) : grad_h};
  }
  auto [grad_x, grad_y, grad_h] = backward.call(grad, x, x, kernel, bandwidth, {want_x, want_x, want_h});
  return {want_x ? grad_x.add_(grad_y) : grad_x, grad_h};
}

}  // namespace bmt_fast

TORCH_LIBRARY(bmt_fast, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("svgd_step(Tensor x, Tensor score, Tensor? bandwidth=None, str algorithm=\"auto\") -> Tensor", tags);
  m.def("svgd_step_into(Tensor x, Tensor score, Tensor? bandwidth=None, str algorithm=\"auto\", *,"
        " Tensor(a!) out) -> Tensor",
        tags);
  // svgd_step_into of B particle sets at once (x, score, out: (B, n, d); bandwidth None or (B,)): a (B,) bool.
  m.def("svgd_step_batched_into(Tensor x, Tensor score, Tensor? bandwidth=None, str algorithm=\"auto\", *,"
        " Tensor(a!) out) -> Tensor",
        tags);
  m.def("median_bandwidth(Tensor x, str algorithm=\"auto\") -> Tensor", tags);
  m.def("rbf_kernel(Tensor x, Tensor y, Tensor bandwidth) -> Tensor", tags);
  // rbf_kernel(x, x, median_bandwidth(x)) and that bandwidth; on the CPU from one pass over x.
  m.def("rbf_kernel_median(Tensor x) -> (Tensor, Tensor)", tags);
  m.def("rbf_kernel_backward(Tensor grad, Tensor x, Tensor y, Tensor kernel, Tensor bandwidth, bool[3] output_mask)"
        " -> (Tensor, Tensor, Tensor)",
        tags);
  // rbf_kernel_backward of K = rbf_kernel(x, x, H) for x on both sides: x's gradient is the sum of the two.
  m.def("rbf_kernel_self_backward(Tensor grad, Tensor x, Tensor kernel, Tensor bandwidth, bool[2] output_mask)"
        " -> (Tensor, Tensor)",
        tags);
}

TORCH_LIBRARY_IMPL(bmt_fast, Meta, m) {
  m.impl("svgd_step", &bmt_fast::svgd_step_meta);
  m.impl("svgd_step_into", &bmt_fast::svgd_step_into_meta);
  m.impl("svgd_step_batched_into", &bmt_fast::svgd_step_batched_into_meta);
  m.impl("median_bandwidth", &bmt_fast::median_bandwidth_meta);
  m.impl("rbf_kernel", &bmt_fast::rbf_kernel_meta);
  m.impl("rbf_kernel_backward", &bmt_fast::rbf_kernel_backward_meta);
  m.impl("rbf_kernel_self_backward", &bmt_fast::rbf_kernel_self_backward_meta);
}

TORCH_LIBRARY_IMPL(bmt_fast, CompositeExplicitAutograd, m) {
  m.impl("svgd_step_into", &bmt_fast::svgd_step_into_composite);
  m.impl("svgd_step_batched_into", &bmt_fast::svgd_step_batched_into_composite);
  m.impl("rbf_kernel_median", &bmt_fast::rbf_kernel_median_composite);
  m.impl("rbf_kernel_self_backward", &bmt_fast::rbf_kernel_self_backward_composite);
}

TORCH_LIBRARY_IMPL(bmt_fast, Autograd, m) {
  m.impl("svgd_step", &bmt_fast::NoGrad<bmt_fast::SvgdStepSig, bmt_fast::kSvgdStep>::call);
  m.impl("svgd_step_into", &bmt_fast::into_tracked<bmt_fast::kSvgdStepInto>);
  m.impl("svgd_step_batched_into", &bmt_fast::into_tracked<bmt_fast::kSvgdStepBatchedInto>);
  m.impl("median_bandwidth", &bmt_fast::NoGrad<bmt_fast::MedianSig, bmt_fast::kMedianBandwidth>::call);
  m.impl("rbf_kernel_backward", &bmt_fast::NoGrad<bmt_fast::RbfBackwardSig, bmt_fast::kRbfKernelBackward>::call);
  m.impl("rbf_kernel_self_backward",
         &bmt_fast::NoGrad<bmt_fast::RbfSelfBackwardSig, bmt_fast::kRbfKernelSelfBackward>::call);
}

TORCH_LIBRARY_IMPL(bmt_fast, ADInplaceOrView, m) {
  m.impl("svgd_step_into", &bmt_fast::into_tracked<bmt_fast::kSvgdStepInto>);
  m.impl("svgd_step_batched_into", &bmt_fast::into_tracked<bmt_fast::kSvgdStepBatchedInto>);
}
