// The helpers of paths.h that every path shares, and the CPU's settings read once (kernels.h).

#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>

#include <charconv>
#include <cstdlib>
#include <limits>
#include <string_view>

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
  // One pass in double per row (kernels.h), without the n x d squares torch's mul and sum had made: fp32
  // norms rounded once (torch's fp32 sum had put phi 1.4e-3 of its size off on two tight clusters far apart,
  // 1000 x 128; the fused kernel, which sums as here, 0.6-1.1e-3).
  const at::Tensor x = xc.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor norms = at::empty({n}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "row_sq_norms", [&] {
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    scalar_t* out = norms.data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, 65536 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
      row_sq_norms(p + begin * d, end - begin, d, out + begin);
    });
  });
  return norms;
}

bool finite_norms(const at::Tensor& norms) {
  const at::Tensor c = norms.contiguous();
  return c.scalar_type() == at::kDouble ? all_finite(c.const_data_ptr<double>(), c.numel())
                                        : all_finite(c.const_data_ptr<float>(), c.numel());
}

bool env_switch(const char* name, bool fallback) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  const std::string_view value(env);
  TORCH_CHECK(value == "0" || value == "1", "bmt_fast: ", name, " must be 0 or 1, got \"", value, "\"");
  return value == "1";
}

int64_t env_count(const char* name, int64_t fallback) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  const std::string_view value(env);
  int64_t count = 0;
  const auto [end, error] = std::from_chars(value.data(), value.data() + value.size(), count);
  TORCH_CHECK(error == std::errc() && end == value.data() + value.size() && count >= 0 && value.front() != '-',
              "bmt_fast: ", name, " must be a non-negative whole number (decimal digits, at most ",
              std::numeric_limits<int64_t>::max(), "), got \"", value, "\"");
  return count;
}

int64_t serial_max_work() {
  static const int64_t bound = env_count("BMT_FAST_CPU_SERIAL_MAX_WORK", kSerialMaxWork);
  return bound;
}

MedianWindow median_window_mode() {
  const char* env = std::getenv("BMT_FAST_MEDIAN_WINDOW");
  if (env == nullptr || *env == '\0') return MedianWindow::kOn;
  const std::string_view value(env);
  if (value == "1") return MedianWindow::kOn;
  if (value == "0") return MedianWindow::kOff;
  TORCH_CHECK(value == "require", "bmt_fast: BMT_FAST_MEDIAN_WINDOW must be 0, 1 or require, got \"", value, "\"");
  return MedianWindow::kRequire;
}

void check_cpu_settings() {
  static const bool read_once = [] {
    check_isa_settings();
    bf16_amx_enabled();
    fused_enabled();
    serial_max_work();
    return true;
  }();
  (void)read_once;
  median_window_mode();
}

bool float32_matmul_in_bf16() {
  return at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL) ==
         at::Float32Precision::BF16;
}

bool bf16_amx_enabled() {
  // (read once: the Python layer reads it once too, through build_info, to know which path flags phi)
  static const bool enabled =
      env_switch("BMT_FAST_CPU_AMX", true) && at::native::cpublas::could_pack(at::kBFloat16);
  return enabled;
}

}  // namespace bmt_fast::cpu
