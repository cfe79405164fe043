// The helpers of paths.h that every path shares, and the CPU's settings read once (kernels.h).

#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>

#include <cstdlib>

#include "paths.h"

namespace bmt_fast::cpu {

at::Tensor centring_shift(const at::Tensor& x_acc) {
  const at::Tensor first = x_acc.narrow(0, 0, 1);
  at::Tensor differences = empty_large(x_acc.sizes(), x_acc.options());
  at::sub_out(differences, x_acc, first);
  return first + differences.mean(0, /*keepdim=*/true);
}

at::Tensor centred_by(const at::Tensor& x, const at::Tensor& shift, at::ScalarType acc) {
  at::Tensor xc = empty_large(x.sizes(), x.options().dtype(acc));
  return at::sub_out(xc, x, shift);
}

at::Tensor centred(const at::Tensor& x, at::ScalarType acc) {
  const at::Tensor xa = x.to(acc);
  return centred_by(xa, centring_shift(xa), acc);
}

at::Tensor row_sq_norms(const at::Tensor& xc) {
  at::Tensor squares = empty_large(xc.sizes(), xc.options());
  return at::mul_out(squares, xc, xc).sum(1);
}

bool finite_norms(const at::Tensor& norms) {
  const at::Tensor c = norms.contiguous();
  return c.scalar_type() == at::kDouble ? all_finite(c.const_data_ptr<double>(), c.numel())
                                        : all_finite(c.const_data_ptr<float>(), c.numel());
}

int64_t serial_max_work() {
  static const int64_t bound = [] {
    const char* env = std::getenv("BMT_FAST_CPU_SERIAL_MAX_WORK");
    return env != nullptr ? std::max<int64_t>(0, std::atoll(env)) : kSerialMaxWork;
  }();
  return bound;
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

}  // namespace bmt_fast::cpu
