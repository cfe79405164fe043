// rbf_kernel's gradients (rbf_kernel_backward, rbf_kernel_self_backward): with P = grad * K, x's gradient
// -(2/H) (rowsum(P) x - P y), y's -(2/H) (colsum(P) y - P^T x), H's -(1/H) sum P log K. Few pairs by direct
// differences of the rows; many by blocks of P used while in cache; the feature chunks (chunked.cpp) and AMX
// (amx.cpp) where their forward passes run.

#include "paths.h"

namespace bmt_fast::cpu {

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
    AlignedVector<T> buffer(kTile * kPitch);
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
  // x_0 + mean(x - x_0), as the forward's (centring_shift): identical particles centre to exact zeros. The mean
  // of n equal values is not always that value in floating point, and the folded sums rowsum(P) xc_i - (P xc)_i
  // had left eps |x| sum |P| times 2/H of it: fp32, 2048 equal rows of 1000.1 at the median rule's floor H,
  // a gradient of 6.9e4 where it is 0.
  const at::Tensor shift = centring_shift(xa);
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
      p_log_k += log_k.mul_(p).sum().item<double>();  // (cascaded, as in rbf_kernel_backward_gemm_chunked)
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
  const double h = read_bandwidth(bandwidth, x.scalar_type());
  const auto acc = accumulation_type(x.scalar_type());
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
      std::tie(grad_x, grad_y, h_grad) = rbf_kernel_backward_by_amx(grad, x, y, kernel, h, want_x, want_y, want_h);
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
  const double h = read_bandwidth(bandwidth, x.scalar_type());
  const auto acc = accumulation_type(x.scalar_type());
  auto [grad_x, unused, h_grad] = rbf_kernel_backward_blocked(grad, x, x, kernel, h, /*want_x=*/true,
                                                             /*want_y=*/false, want_h, acc, log_clamp(acc),
                                                             /*symmetrised=*/true);
  return {grad_x, want_h ? bandwidth_grad(h_grad, bandwidth) : at::Tensor()};
}

}  // namespace bmt_fast::cpu
