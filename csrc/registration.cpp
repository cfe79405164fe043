// The torch.ops.bmt_fast library: one schema per op, and Meta kernels (shape rules only) that give
// torch.compile and FakeTensor the output shapes. The CPU and CUDA kernels register in their own files.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "bmt_fast.h"

namespace bmt_fast {
namespace {

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

// Any device without its own kernel: svgd_step, copied into out, then a scan of it.
at::Tensor svgd_step_into_composite(const at::Tensor& x, const at::Tensor& score,
                                    const std::optional<at::Tensor>& bandwidth, c10::string_view algorithm,
                                    at::Tensor& out) {
  check_svgd_step_args(x, score, bandwidth);
  check_svgd_step_out(x, score, out);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bmt_fast::svgd_step", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               c10::string_view)>();
  return copy_and_check_finite(out, op.call(x, score, bandwidth, algorithm));
}

// Any device without its own kernel: the median rule, then the kernel with that bandwidth.
std::tuple<at::Tensor, at::Tensor> rbf_kernel_median_composite(const at::Tensor& x) {
  check_particles(x, "x");
  static const auto median = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("bmt_fast::median_bandwidth", "")
                                 .typed<at::Tensor(const at::Tensor&, c10::string_view)>();
  static const auto kernel = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("bmt_fast::rbf_kernel", "")
                                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> rbf_kernel_backward_meta(const at::Tensor& grad, const at::Tensor& x,
                                                                        const at::Tensor& y, const at::Tensor& kernel,
                                                                        const at::Tensor& bandwidth,
                                                                        std::array<bool, 3> output_mask) {
  check_rbf_kernel_backward_args(grad, x, y, kernel, bandwidth);
  const auto like = [](bool wanted, const at::Tensor& t) {
    return wanted ? at::empty_like(t, at::MemoryFormat::Contiguous) : at::Tensor();
  };
  return {like(output_mask[0], x), like(output_mask[1], y), like(output_mask[2], bandwidth)};
}

}  // namespace
}  // namespace bmt_fast

TORCH_LIBRARY(bmt_fast, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("svgd_step(Tensor x, Tensor score, Tensor? bandwidth=None, str algorithm=\"auto\") -> Tensor", tags);
  m.def("svgd_step_into(Tensor x, Tensor score, Tensor? bandwidth=None, str algorithm=\"auto\", *,"
        " Tensor(a!) out) -> Tensor",
        tags);
  m.def("median_bandwidth(Tensor x, str algorithm=\"auto\") -> Tensor", tags);
  m.def("rbf_kernel(Tensor x, Tensor y, Tensor bandwidth) -> Tensor", tags);
  // rbf_kernel(x, x, median_bandwidth(x)) and that bandwidth; on the CPU from one pass over x.
  m.def("rbf_kernel_median(Tensor x) -> (Tensor, Tensor)", tags);
  m.def("rbf_kernel_backward(Tensor grad, Tensor x, Tensor y, Tensor kernel, Tensor bandwidth, bool[3] output_mask)"
        " -> (Tensor, Tensor, Tensor)",
        tags);
}

TORCH_LIBRARY_IMPL(bmt_fast, Meta, m) {
  m.impl("svgd_step", &bmt_fast::svgd_step_meta);
  m.impl("svgd_step_into", &bmt_fast::svgd_step_into_meta);
  m.impl("median_bandwidth", &bmt_fast::median_bandwidth_meta);
  m.impl("rbf_kernel", &bmt_fast::rbf_kernel_meta);
  m.impl("rbf_kernel_backward", &bmt_fast::rbf_kernel_backward_meta);
}

TORCH_LIBRARY_IMPL(bmt_fast, CompositeExplicitAutograd, m) {
  m.impl("svgd_step_into", &bmt_fast::svgd_step_into_composite);
  m.impl("rbf_kernel_median", &bmt_fast::rbf_kernel_median_composite);
}
