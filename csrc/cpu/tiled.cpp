// The tiled path (many particles, beyond the fused kernels' features): GEMM tiles of the upper triangle of
// the centred particles' dot products, each turned into K in place; the step adds K W and K^T W into both
// sides' rows (3 n^2 d FLOPs where the naive step takes 6 n^2 d), rbf_kernel(x) writes each tile and its
// transpose.

#include <atomic>

#include "median_select.h"
#include "paths.h"

namespace bmt_fast::cpu {

// Whether rbf_kernel(x) on the GEMM path (and rbf_kernel_median, which must give its bits) takes
// rbf_kernel_self_tiles rather than one n x n GEMM: where the products saved (a quarter of them at n = 1024,
// 3/8 at 2048, 7/16 at 4096) outweigh the tiles' copies. 2-core Xeon, fp32, alternating (ms, full GEMM ->
// tiles): 4096 x 128 14-16 -> 19-20, 1024 x 128 1.1 -> 2.0, 2048 x 256 6.5-7.3 -> 7.9-8.5, 1024 x 512 3.5 ->
// 4.4, 512 x 1024 2.2 -> 2.7, 600 x 8192 21-25 -> 21-29, 1024 x 2048 13-15 -> 13-17, 2048 x 512 level,
// 4096 x 512 52-58 -> 42-47, 2048 x 2048 49-51 -> 38-44, 4096 x 768 78-81 -> 58-63, 1024 x 8192 74-77 ->
// 67-70. With the median (rbf_kernel_median, the median's tiles kept): 1024 x 8192 139-146 -> 68-72.
bool self_kernel_by_tiles(int64_t n, int64_t d) { return (n > 1536 && d >= 512) || (n >= 1024 && d >= 4096); }

namespace {

// A self kernel on the GEMM path from the tiles of the upper triangle of xc xc^T (for_each_upper_tile, or
// the median pass's kept ones): each tile turned into K in place and written with its transpose below it
// (about half of a full GEMM's products), the diagonal blocks' lower halves the transposes of their upper ones;
// K exactly symmetric, its diagonal 1. In xc's dtype.
template <typename T>
at::Tensor rbf_kernel_self_tiles(const at::Tensor& xc, const at::Tensor& norms, double h, at::Tensor* kept) {
  const int64_t n = xc.size(0);
  at::Tensor k = empty_large({n, n}, xc.options());
  const T* nr = norms.const_data_ptr<T>();
  const T inv_h = inverse_bandwidth<T>(h);
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
      rbf_from_dots(tile.data_ptr<T>(), cols, begin, end, cols, nr + i0, nr + j0, inverse_bandwidth<T>(h));
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
        if (!amx_finish_rows(accum.const_data_ptr<float>() + begin * (d + 1), d + 1, /*x_off=*/0,
                             rowsum.const_data_ptr<float>(), x.const_data_ptr<float>(), score.const_data_ptr<float>(),
                             shift.const_data_ptr<float>(), static_cast<float>(a), static_cast<float>(n), d, begin,
                             end, 0, d, out.mutable_data_ptr<float>()))
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

}  // namespace

at::Tensor rbf_kernel_self_by_tiles(const at::Tensor& xc, const at::Tensor& norms, double h) {
  return AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "rbf_kernel_self", [&] {
    return rbf_kernel_self_tiles<scalar_t>(xc, norms, h, nullptr);
  });
}

std::tuple<at::Tensor, at::Tensor> rbf_kernel_median_by_tiles(const at::Tensor& x) {
  const int64_t n = x.size(0);
  const auto acc = accumulation_type(x.scalar_type());
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

std::optional<bool> svgd_step_by_tiles(const at::Tensor& x, const at::Tensor& score,
                                       const std::optional<double>& bandwidth, at::Tensor& out) {
  return AT_DISPATCH_FLOATING_TYPES(accumulation_type(x.scalar_type()), "svgd_step_tiled",
                                    [&] { return svgd_step_tiled<scalar_t>(x, score, bandwidth, out); });
}

}  // namespace bmt_fast::cpu
