// The fused kernels' paths (many particles, up to kFusedMaxFeatures features): the step, its median and
// rbf_kernel(x) from register blocks of dot products (kernels.h: fused_step_rows, fused_step_pair,
// fused_dot_rows, fused_window_rows), K never in memory for the step; and the GEMM path's median, by those
// distances or by GEMM tiles beyond.

#include <atomic>

#include "median_select.h"
#include "paths.h"

namespace bmt_fast::cpu {

// Whether the many-particle step may take the fused kernel and its median the fused distances (both below),
// unless BMT_FAST_CPU_FUSED=0 (read once).
bool fused_enabled() {
  static const bool enabled = env_switch("BMT_FAST_CPU_FUSED", true);
  return enabled;
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

namespace {

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
    thread_local AlignedVector<T> scratch;  // room for a group's values and a whole vector past them
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
                        ops.w.template data_ptr<T>(), ops.norms.template data_ptr<T>(), n, d, inverse_bandwidth<T>(h),
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
                            score_t.data_ptr<T>(), n, d, inverse_bandwidth<T>(h), static_cast<T>(a), r0, r1,
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
                                               c10::CppTypeToScalarType<T>::value)),
                         x.scalar_type());
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
      return [&, tile = AlignedVector<T>(rows * tile_cols), transposed = AlignedVector<T>(tile_cols * rows)](
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

}  // namespace

double median_by_gemm_path(const at::Tensor& x) {
  return AT_DISPATCH_FLOATING_TYPES(accumulation_type(x.scalar_type()), "gemm_path_median",
                                    [&] { return gemm_path_median<scalar_t>(x); });
}

std::optional<bool> svgd_step_by_fused(const at::Tensor& x, const at::Tensor& score,
                                       const std::optional<double>& bandwidth, at::Tensor& out) {
  return AT_DISPATCH_FLOATING_TYPES(accumulation_type(x.scalar_type()), "svgd_step_fused",
                                    [&] { return svgd_step_fused<scalar_t>(x, score, bandwidth, out); });
}

at::Tensor rbf_kernel_by_fused(const at::Tensor& x, std::optional<double> h, double* median) {
  return AT_DISPATCH_FLOATING_TYPES(accumulation_type(x.scalar_type()), "rbf_kernel_fused",
                                    [&] { return rbf_kernel_fused<scalar_t>(x, h, median); });
}

}  // namespace bmt_fast::cpu
