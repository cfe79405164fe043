// Few particles with many features on the GEMM path (fp32 arithmetic, fp64 for fp64): the Gram pass by
// feature chunks (each centred and multiplied while in cache, a part of the chunks per thread), the median and
// K from its n x n dot products, the step's apply pass and rbf_kernel's gradient by the same chunks.

#include <ATen/core/grad_mode.h>

#include <atomic>

#include "median_select.h"
#include "paths.h"

namespace bmt_fast::cpu {

namespace {

// All n x n dot products in one tile, for the median's selection.
struct DotsTiles {
  const at::Tensor& dots;
  template <typename Visit>
  void operator()(Visit&& visit) const {
    parallel_for(0, dots.size(0), 16, [&](int64_t begin, int64_t end) { visit(dots, 0, 0, begin, end); });
  }
};

// (The gradient's rule, use_gemm_chunked: with rbf_kernel_backward_gemm_chunked.)
constexpr int64_t kGemmChunkedMaxRows = 512;
constexpr int64_t kGemmChunkedMinFeatures = 4096;
constexpr int64_t kGemmChunkFeatures = 512;

// The forward passes' chunk width: kGemmChunkFeatures, or less (a multiple of 64 features, at least 256)
// where that gives every thread an equal share. (Narrower chunks made the partial sums cost more than the
// balance gained: 512 x 128 in two chunks of 64, 0.29 -> 0.42 ms; one chunk lets the GEMM thread itself.)
int64_t gemm_chunk_features(int64_t d) {
  const int64_t threads = at::get_num_threads();
  const int64_t share = ((d + threads - 1) / threads + 63) / 64 * 64;
  return share < 256 ? kGemmChunkFeatures : std::min(share, kGemmChunkFeatures);
}

// The GEMM path (fp32 arithmetic, fp64 for fp64; IEEE) by feature chunks for a self kernel of few particles
// with many features (use_gemm_gram_chunked: up to 512, or 1024 with 4 features per particle), as the AMX
// chunks and the gradient's GEMM chunks: the threads take parts of the chunks of gemm_chunk_features(d)
// features; each chunk is centred by its column means into a buffer of its size (any nearby centre cancels
// exactly in the distances) and its dot products added into the part's n x n sums, their upper triangle
// by blocks of kGemmChunkedRowBlock rows (a GEMM each: 3/4 of the products at 256 particles, 5/8 at 512,
// 9/16 at 1024); the parts' sums are then added in part order and the lower triangle written as the upper's
// transpose (K exactly symmetric). The norms are the sums' diagonal (so each particle's distance to itself
// is exactly 0). The whole-x path wrote a centred copy of x and its squares (each as large as x) and read
// them back for one deep GEMM. (The triangle
// against all n x n products, rbf_kernel(x), alternating, 3 rounds: 256 x 76,800 38.4-39.9 -> 32.2-33.2 ms,
// 512 x 20,000 37.4-38.1 -> 27.1-28.7 ms, 300 x 4096 2.97-3.07 -> 2.43-2.52 ms, 128 x 76,800 level.)
//
// The callers run the pass (and the median, K and the step's passes after it) in one team (team.h): each
// GEMM is a thread's own, in its share (the BLAS runs it on that thread). With fewer chunks than threads
// (one chunk up to 512 features on two threads) the threads share each chunk instead: its columns for the
// centring, then its upper triangle's blocks of rows; the step shares the chunk's rows. Before, such a call
// ran the BLAS's threaded GEMMs and ATen's threaded ops, each an OpenMP region of its own, ~75 us apiece
// where the threads sleep between regions. fp32, 2 threads, 2-core Xeon VM (CPUID model 167), alternating, 3
// rounds, separate regions -> one team, PASSIVE (us unless ms): rbf_kernel(x) 128 x 384 699-773 -> 265-301,
// 256 x 300 839-880 -> 376-449, 512 x 384 1.70-1.79 -> 0.95-1.45 ms, 256 x 768 1.10-1.12 -> 0.56-0.64 ms,
// 300 x 4096 2.73-2.98 -> 2.42-2.56 ms; the step with H given 128 x 384 897-952 -> 257-352, 256 x 300
// 1.30-1.57 -> 0.57-1.01 ms, 512 x 384 2.52-2.92 -> 1.65-1.71 ms, 512 x 768 3.38-3.44 -> 2.59-2.98 ms;
// median_bandwidth 256 x 300 818-922 -> 429-441; libgomp's default policy (threads spinning between the
// regions) level or faster: 256 x 768 kernel 585-595 -> 384-410, the step by the median rule 256 x 300
// 569-1140 -> 533-1030, 512 x 384 1.93-2.35 -> 2.03-2.78 ms (noisy), 300 x 4096 level. The lower triangle
// is the upper's transpose (mirror_upper_triangle).
constexpr int64_t kGemmChunkedRowBlock = 128;

// The centre of columns `cols` (n rows) into `shift` (1 x columns) and cols centred by it: x_0 + mean(x - x_0),
// the mean of the differences to row 0 (exact where the particles are close, as the Gram and fused paths
// shift): identical particles centre to exact zeros. (The plain fp32 mean of n copies of v is not v: the
// chunks of 150 identical particles of 300 features had centred to a constant that the median rule's 2/H,
// 2e12 at its floor, made phi 14x too large.)
void centre_columns(at::Tensor& cols, at::Tensor& shift) {
  const at::Tensor first = cols.narrow(0, 0, 1).clone();
  cols.sub_(first);
  at::mean_out(shift, cols, {0}, /*keepdim=*/true);
  cols.sub_(shift);
  shift.add_(first);
}

// A chunk's columns [c0, c0 + width) of x into xc (n x width, row-major), centred (centre_columns; the centre
// written to shift), for the columns [begin, end) of the chunk (a thread's share: ATen ops on one thread).
void centre_chunk_columns(const at::Tensor& x, int64_t c0, int64_t width, int64_t begin, int64_t end,
                          at::Tensor& xc, const at::Tensor& shift) {
  const int64_t n = x.size(0);
  at::Tensor cols = xc.view({n, width}).narrow(1, begin, end - begin);
  cols.copy_(x.narrow(1, c0 + begin, end - begin));
  at::Tensor mean = shift.narrow(0, c0 + begin, end - begin).view({1, end - begin});
  centre_columns(cols, mean);
}

template <typename T>
ChunkedGram gemm_gram_chunked(const at::Tensor& x) {
  const at::NoGradGuard no_grad;  // (grad mode is per thread: a worker's is on, and x may require grad)
  const int64_t n = x.size(0), d = x.size(1), threads = at::get_num_threads();
  const int64_t chunk = gemm_chunk_features(d), chunks = (d + chunk - 1) / chunk;
  const int64_t parts = std::clamp<int64_t>(
      std::min<int64_t>(threads, kGramPartsMaxBytes / (n * n * int64_t{sizeof(T)})), 1, chunks);
  const auto options = x.options().dtype(c10::CppTypeToScalarType<T>::value);
  ChunkedGram out{at::empty({d}, options), at::empty({n}, options), empty_large({n, n}, options)};
  T* dots_p = out.dots.mutable_data_ptr<T>();
  if (parts == 1 && threads > 1) {
    // One part for all the threads (fewer chunks than threads): each chunk centred by the threads' shares of
    // its columns, then its upper triangle's blocks of rows shared, block b paired with block (blocks - 1 - b)
    // for equal shares. (Two GEMMs of a single chunk each threaded by the BLAS had cost a region each, ~75 us
    // apiece where the threads sleep between regions.)
    const int64_t block = std::clamp<int64_t>((n + 2 * threads - 1) / (2 * threads), 16, kGemmChunkedRowBlock);
    const int64_t blocks = (n + block - 1) / block;
    at::Tensor xc = at::empty({n * chunk}, options);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t c0 = c * chunk, width = std::min(chunk, d - c0);
      at::Tensor chunk_xc = xc.narrow(0, 0, n * width);
      parallel_for(0, width, 16, [&](int64_t begin, int64_t end) {
        const at::NoGradGuard no_grad;
        centre_chunk_columns(x, c0, width, begin, end, chunk_xc, out.shift);
      });
      const at::Tensor rows_of = chunk_xc.view({n, width});
      parallel_for_block_pairs(blocks, [&] {
        return [&](int64_t b) {
          const at::NoGradGuard no_grad;
          const int64_t i0 = b * block, rows = std::min(block, n - i0);
          at::Tensor dots = out.dots.narrow(0, i0, rows).narrow(1, i0, n - i0);
          const at::Tensor lhs = rows_of.narrow(0, i0, rows), rhs = rows_of.narrow(0, i0, n - i0).t();
          if (c == 0) {
            at::mm_out(dots, lhs, rhs);
          } else {
            dots.addmm_(lhs, rhs);
          }
        };
      });
    }
  } else {
    // The threads take parts of the chunks, each adding into its own n x n sums; the parts' sums are then
    // added in part order.
    const at::Tensor sums = parts == 1 ? out.dots.unsqueeze(0) : at::empty({parts, n, n}, options);
    const int64_t block = kGemmChunkedRowBlock;
    parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
      const at::NoGradGuard no_grad;
      at::Tensor buffer = at::empty({n * chunk}, options);
      for (int64_t t = part_begin; t < part_end; ++t) {
        at::Tensor part = sums.select(0, t);
        const int64_t begin = t * chunks / parts, end = (t + 1) * chunks / parts;
        for (int64_t c = begin; c < end; ++c) {
          const int64_t c0 = c * chunk, width = std::min(chunk, d - c0);
          // (the chunk copied first: rows a multiple of 4 KiB apart share cache sets, so a second pass over
          // them went to memory again; and a 16-bit chunk is widened as x.float()'s would be)
          at::Tensor chunk_xc = buffer.narrow(0, 0, n * width);
          centre_chunk_columns(x, c0, width, 0, width, chunk_xc, out.shift);
          const at::Tensor xc = chunk_xc.view({n, width});
          for (int64_t i0 = 0; i0 < n; i0 += block) {  // the upper triangle by blocks of rows
            const int64_t rows = std::min(block, n - i0);
            at::Tensor dots = part.narrow(0, i0, rows).narrow(1, i0, n - i0);
            const at::Tensor lhs = xc.narrow(0, i0, rows), rhs = xc.narrow(0, i0, n - i0).t();
            if (c == begin) {
              at::mm_out(dots, lhs, rhs);
            } else {
              dots.addmm_(lhs, rhs);
            }
          }
        }
      }
    });
    if (parts > 1) {  // (the upper triangles)
      const T* sums_p = sums.const_data_ptr<T>();
      parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          T* row = dots_p + i * n;
          std::copy(sums_p + i * n + i, sums_p + (i + 1) * n, row + i);
          for (int64_t t = 1; t < parts; ++t)
            for (int64_t j = i; j < n; ++j) row[j] += sums_p[(t * n + i) * n + j];
        }
      });
    }
  }
  mirror_upper_triangle(dots_p, n);
  T* norms_p = out.norms.mutable_data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) norms_p[i] = dots_p[i * n + i];
  return out;
}

// svgd_step on the GEMM path by feature chunks (use_gemm_gram_chunked shapes), as the AMX chunks: the Gram
// pass above (so K is rbf_kernel's, bit for bit), K with its own terms 0 and its row sums once, then per
// chunk of features W = score - a xc in a buffer, K W by one GEMM and phi = (K W + a rowsum xc + score) / n
// (fp32: times 1/n) into out's columns while the chunk is in cache, checked for NaN/Inf there (returns
// whether phi, as stored, is all finite). A chunk per share; with fewer chunks than threads, each chunk's
// rows shared (W's, then K's times W). Called in a team (gemm_gram_chunked's comment). The tiled step wrote a
// centred copy of x, W and an n x (d + 1) accumulator, then phi, copied into out and scanned.
template <typename T>
bool svgd_step_gemm_chunked(const at::Tensor& x, const at::Tensor& score, const std::optional<double>& bandwidth,
                            at::Tensor& out) {
  const int64_t n = x.size(0), d = x.size(1);
  const ChunkedGram gram = gemm_gram_chunked<T>(x);
  const double h = bandwidth ? *bandwidth : bandwidth_from_median(median_sq_dist_chunked(gram), n);
  const double a = 2.0 / h;
  const at::Tensor& k = chunked_gram_to_kernel(gram, h, 0.0);  // (score_i is added exactly below)
  const at::Tensor rowsum = at::empty({n, 1}, k.options());
  parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    at::Tensor sums = rowsum.narrow(0, begin, end - begin);
    at::sum_out(sums, k.narrow(0, begin, end - begin), {1}, /*keepdim=*/true);
  });
  const auto options = k.options();
  const int64_t chunk = gemm_chunk_features(d), chunks = (d + chunk - 1) / chunk;
  const bool fp32 = std::is_same_v<T, float> && x.scalar_type() == at::kFloat;
  std::atomic<bool> finite{true};
  struct Buffers {
    at::Tensor x, w, product, score;
  };
  const auto make_buffers = [&] {
    return Buffers{at::empty({n * chunk}, options), at::empty({n * chunk}, options), at::empty({n * chunk}, options),
                   fp32 ? at::Tensor() : at::empty({n * chunk}, options)};
  };
  const auto view = [](const at::Tensor& buffer, int64_t rows, int64_t width) {
    return buffer.narrow(0, 0, rows * width).view({rows, width});
  };
  // Chunk c's centred rows [r0, r1) and their W = score - a xc (and, 16-bit, the scores as T) into buf.
  const auto chunk_rows = [&](const Buffers& buf, int64_t c, int64_t r0, int64_t r1) {
    const int64_t c0 = c * chunk, width = std::min(chunk, d - c0);
    at::Tensor xc = view(buf.x, n, width).narrow(0, r0, r1 - r0), w = view(buf.w, n, width).narrow(0, r0, r1 - r0);
    const at::Tensor x_rows = x.narrow(0, r0, r1 - r0).narrow(1, c0, width);
    const at::Tensor shift = gram.shift.narrow(0, c0, width).view({1, width});
    if (fp32) {
      at::sub_out(xc, x_rows, shift);
      at::add_out(w, score.narrow(0, r0, r1 - r0).narrow(1, c0, width), xc, -a);
      return;
    }
    // (the chunk's rows copied once, as in the Gram pass: the scores are read twice)
    at::Tensor scores = view(buf.score, n, width).narrow(0, r0, r1 - r0);
    scores.copy_(score.narrow(0, r0, r1 - r0).narrow(1, c0, width));
    xc.copy_(x_rows).sub_(shift);
    at::add_out(w, scores, xc, -a);
  };
  // phi's rows [r0, r1) of chunk c from K's rows times the chunk's W (all its rows in buf).
  const auto phi_rows = [&](const Buffers& buf, int64_t c, int64_t r0, int64_t r1) {
    const int64_t c0 = c * chunk, width = std::min(chunk, d - c0);
    at::Tensor product = view(buf.product, n, width).narrow(0, r0, r1 - r0);
    at::mm_out(product, k.narrow(0, r0, r1 - r0), view(buf.w, n, width));
    // fp32: phi by one pass (amx_finish_rows, which the AMX steps use: x and score read as they are, phi
    // streamed, its finiteness noted) where five ATen ops made five passes (2-core Xeon, alternating, 3
    // rounds: 128 x 76,800 34.3-35.3 -> 27.1-28.1 ms, 512 x 20,000 90.3-91.1 -> 84.0-84.7 ms, 256 x 768
    // 1.04-1.15 -> 0.90-0.91 ms, 128 x 128 0.114-0.116 -> 0.095-0.098 ms)
    if (fp32) {
      if (!amx_finish_rows(product.const_data_ptr<float>(), width, /*x_off=*/0, rowsum.const_data_ptr<float>(),
                           x.const_data_ptr<float>(), score.const_data_ptr<float>(), gram.shift.const_data_ptr<float>(),
                           static_cast<float>(a), static_cast<float>(n), d, r0, r1, c0, c0 + width,
                           out.mutable_data_ptr<float>()))
        finite.store(false, std::memory_order_relaxed);
      return;
    }
    product.addcmul_(rowsum.narrow(0, r0, r1 - r0), view(buf.x, n, width).narrow(0, r0, r1 - r0), a)
        .add_(view(buf.score, n, width).narrow(0, r0, r1 - r0));
    at::Tensor phi = out.narrow(0, r0, r1 - r0).narrow(1, c0, width);
    if (out.scalar_type() == product.scalar_type()) {
      at::div_out(phi, product, n);
    } else {  // (16-bit particles on this path: rounded once, as stored)
      phi.copy_(product.div_(n));
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "svgd_step_finite", [&] {
      const scalar_t* stored = out.const_data_ptr<scalar_t>() + c0;
      for (int64_t i = r0; i < r1; ++i)
        if (!all_finite(stored + i * d, width)) finite.store(false, std::memory_order_relaxed);
    });
  };
  const int64_t threads = at::get_num_threads();
  if (chunks >= threads || threads == 1) {  // a chunk per share at a time
    parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      const at::NoGradGuard no_grad;
      const Buffers buf = make_buffers();
      for (int64_t c = begin; c < end; ++c) {
        chunk_rows(buf, c, 0, n);
        phi_rows(buf, c, 0, n);
      }
    });
  } else {  // fewer chunks than threads: each chunk's rows shared, its W first
    const Buffers buf = make_buffers();
    for (int64_t c = 0; c < chunks; ++c) {
      parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
        const at::NoGradGuard no_grad;
        chunk_rows(buf, c, begin, end);
      });
      parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
        const at::NoGradGuard no_grad;
        phi_rows(buf, c, begin, end);
      });
    }
  }
  return finite.load();
}

}  // namespace

// The median of the n^2 squared distances from a chunked Gram pass (n <= 512: by selection).
double median_sq_dist_chunked(const ChunkedGram& gram) {
  if (!finite_norms(gram.norms)) return kNaN;
  const int64_t n = gram.norms.size(0);
  if (gram.dots.scalar_type() == at::kDouble) return median_sq_dist_select<double>(n, gram.norms, DotsTiles{gram.dots});
  return median_sq_dist_select<float>(n, gram.norms, DotsTiles{gram.dots});
}

bool use_gemm_chunked(int64_t rows, int64_t d) {
  const int64_t rows_pad = (rows + 31) / 32 * 32;
  return rows <= kGemmChunkedMaxRows && d >= std::max(kGemmChunkedMinFeatures, amx_chunked_min_features(rows_pad));
}

// Where a self kernel's forward passes on the GEMM path (svgd_step, rbf_kernel(x), the median) go by feature
// chunks: up to kChunkedMaxParticles particles (their n x n sums per thread stay in L2), from
// kChunkedMinFeatures features (below, level with one GEMM). 2-core Xeon (Emerald Rapids), fp32, fixed H,
// alternating, 3 rounds, the tiled path (the step: and its scan of phi) -> chunks (ms): rbf_kernel(x)
// 128 x 76,800 22.5-22.8 -> 12.1-12.3, 256 x 76,800 62.0-63.1 -> 39.0-39.9, 512 x 20,000 45.7-47.8 ->
// 36.7-37.6, 300 x 4096 3.55-3.57 -> 3.02-3.14, 256 x 768 0.49-0.51 -> 0.44-0.46, 128 x 128 0.061 ->
// 0.057-0.059, 512 x 128 0.32-0.33 -> 0.34; the step 128 x 76,800 72-77 -> 34-35, 256 x 76,800 192-193 ->
// 102-105, 512 x 20,000 121-129 -> 86-88, 300 x 4096 9.8 -> 6.8-7.2, 256 x 768 1.34-1.37 -> 1.01-1.08,
// 128 x 128 0.156-0.162 -> 0.112-0.114, 512 x 128 0.78-0.91 -> 0.70-0.71. Up to 1024 particles with 4 or
// more features per particle too (kChunkedWide*; the sums leave L2 there, and the median selects over all
// n(n-1)/2 distances). Same machine, against the previous build, 3 rounds, kernel / step with H given /
// step by the median rule / median_bandwidth (ms): 1000 x 16,000 128-130 -> 74-88 / 258-262 -> 194-204 /
// 250-266 -> 195-214 / 101-114 -> 76-84; 768 x 3072 14.0-16.9 -> 9.0-9.9 / 29.4-31.5 -> 22.1-24.3 /
// 31.4-32.2 -> 25.5-26.9; 1024 x 4096 28.0-31.1 -> 22.3-25.4 / 60.7-65.4 -> 54.6-57.1 / 64.2-67.3 ->
// 60.2-64.0 / level; 600 x 2400 7.4-7.8 -> 5.5-6.5 / 16.0-16.7 -> 14.4-15.7 / 16.8-17.4 -> 14.7-16.5 /
// level. With fewer features per particle the tiles were as fast or faster (chunks forced: 1024 x 768
// kernel 6.1-6.2 -> 7.8-8.3 ms, 1024 x 2048 step by the median 33.5-35.4 -> 34.7-36.6, 1024 x 128 kernel
// 1.3 -> 3.4). While the fused kernels are on (unless BMT_FAST_CPU_FUSED=0) only beyond kFusedMaxFeatures:
// below, the fused step, median and kernel, each in one team (team.h), were faster. fp32, 2 threads, 2-core
// Xeon VM (CPUID model 167), PASSIVE, alternating, 3 rounds, chunks -> fused (us): the step by the median rule
// 128 x 64 89-97 -> 82-83, 256 x 64 780-905 -> 253-264, 256 x 128 963-1020 -> 368-371, 256 x 256 1340-1570
// -> 607-624, 512 x 64 1700-1810 -> 808-833, 512 x 128 2130-2250 -> 1200-1260, 512 x 256 2570-2730 ->
// 1980-2630; with H given 256 x 64 596-685 -> 140-219, 512 x 128 1520-1630 -> 543-569; rbf_kernel(x) by the
// median rule 256 x 64 661-685 -> 237-248, 512 x 256 2010-2160 -> 1620-1650; 128 x 128 (one thread) by the
// median rule 116-124 -> 131-132.
bool use_gemm_gram_chunked(int64_t n, int64_t d) {
  return d >= kChunkedMinFeatures && (!fused_enabled() || d > kFusedMaxFeatures) &&
         (n <= kChunkedMaxParticles || (n <= kChunkedWideMaxParticles && d >= kChunkedWideFeaturesPerParticle * n));
}

ChunkedGram gemm_gram_chunked(const at::Tensor& x) {
  return AT_DISPATCH_FLOATING_TYPES(accumulation_type(x.scalar_type()), "gemm_gram_chunked",
                                    [&] { return gemm_gram_chunked<scalar_t>(x); });
}

// A GEMM-path chunked Gram pass's dots turned into the self kernel K in place (as rbf_kernel's GEMM output),
// each particle's own term `own` (1 for the kernel, 0 for the step, which adds it exactly itself).
const at::Tensor& chunked_gram_to_kernel(const ChunkedGram& gram, double h, double own) {
  const at::Tensor& k = gram.dots;
  const int64_t n = k.size(0);
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "chunked_gram_to_kernel", [&] {
    parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      rbf_from_dots(k.mutable_data_ptr<scalar_t>(), n, begin, end, n, gram.norms.const_data_ptr<scalar_t>(),
                    gram.norms.const_data_ptr<scalar_t>(), inverse_bandwidth<scalar_t>(h));
    });
  });
  k.fill_diagonal_(own);
  return k;
}

bool svgd_step_by_gemm_chunks(const at::Tensor& x, const at::Tensor& score, const std::optional<double>& bandwidth,
                              at::Tensor& out) {
  return AT_DISPATCH_FLOATING_TYPES(accumulation_type(x.scalar_type()), "svgd_step_gemm_chunked",
                                    [&] { return svgd_step_gemm_chunked<scalar_t>(x, score, bandwidth, out); });
}

// The gradient's GEMM path (fp32 arithmetic, fp64 for fp64) for few particles with many features, by
// feature chunks as on AMX: P (n x m) and its sums are formed once, then the threads take chunks of
// kGemmChunkFeatures features, each centred by its column means (any nearby centre cancels exactly) into
// a buffer of the chunk's size, multiplied by P (P^T) and finished into the gradients' columns while in
// cache. The blocked path (rbf_backward.cpp) writes centred copies of x and y and an n x d accumulator and
// reads them back, passes that cost as much as its GEMMs at these shapes. Where: up to 512 rows on each side, from 4096
// features and from rows_pad^2 / 16 (the AMX chunks' rule; rows_pad: the larger side rounded up to 32).
// 2-core Xeon, fp32, x's gradient, alternating, 3 rounds, whole-x path -> chunks (ms): 256 x 76,800
// 57.0-58.5 -> 45.7-47.9, 128 x 76,800 16.6-17.5 -> 13.7-14.4, 512 x 20,000 46.3-48.1 -> 42.4-42.7, two sets
// 100 x 300 x 76,800 (both gradients) 70-73 -> 52-56; level at 128 x 5000, 256 x 4096 and 512 x 16,384;
// slower at 512 x 4096 (7.7-7.9 -> 8.3-8.5), 384 x 8192 (8.8-9.2 -> 9.6) and 400 x 10,000 (11.4-11.6 ->
// 11.7-12.5), hence the rule.
std::tuple<at::Tensor, at::Tensor, double> rbf_kernel_backward_gemm_chunked(const at::Tensor& grad,
                                                                            const at::Tensor& x, const at::Tensor& y,
                                                                            const at::Tensor& kernel, double h,
                                                                            bool want_x, bool want_y, bool want_h,
                                                                            at::ScalarType acc, double tiny) {
  const bool self = y.is_same(x);
  const int64_t n = x.size(0), m = y.size(0), d = x.size(1);
  const at::Tensor k = kernel.to(acc);
  const at::Tensor p = grad.to(acc) * k;
  if (self) p.diagonal().zero_();  // own terms: 0 (as on every path)
  // (ATen's cascaded sum, as torch's own formula sums: a BLAS dot's running fp32 sums had left H's gradient
  // ~1e-5 off at 600 x 600, ~30x torch's fp32 error)
  const double p_log_k = want_h ? k.clamp_min(tiny).log_().mul_(p).sum().item<double>() : 0.0;
  const at::Tensor rowsum = want_x ? p.sum(1, true) : at::Tensor();
  const at::Tensor colsum = want_y ? p.sum(0).unsqueeze(1) : at::Tensor();
  const at::Tensor pt = want_y ? p.t().contiguous() : at::Tensor();
  at::Tensor grad_x = want_x ? empty_large(x.sizes(), x.options()) : at::Tensor();
  at::Tensor grad_y = want_y ? empty_large(y.sizes(), y.options()) : at::Tensor();
  const double minus_scale = 2.0 / h;
  const int64_t chunk = kGemmChunkFeatures, chunks = (d + chunk - 1) / chunk;
  const auto options = x.options().dtype(acc);
  parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    const at::NoGradGuard no_grad;  // (grad mode is per thread: a worker's is on, and x may require grad)
    // the thread's buffers, reused: the chunk's centred rows of x and y, the product, the column means
    const at::Tensor x_buffer = at::empty({n * chunk}, options);
    const at::Tensor y_buffer = self ? x_buffer : at::empty({m * chunk}, options);
    const at::Tensor product_buffer = at::empty({std::max(n, m) * chunk}, options);
    const at::Tensor shift_buffer = at::empty({chunk}, options);
    const auto view = [](const at::Tensor& buffer, int64_t rows, int64_t cols) {
      return buffer.narrow(0, 0, rows * cols).view({rows, cols});
    };
    for (int64_t c = begin; c < end; ++c) {
      const int64_t c0 = c * chunk, width = std::min(chunk, d - c0);
      at::Tensor shift = view(shift_buffer, 1, width);
      at::Tensor xc = view(x_buffer, n, width);
      xc.copy_(x.narrow(1, c0, width));
      centre_columns(xc, shift);
      at::Tensor yc = xc;
      if (!self) {
        yc = view(y_buffer, m, width);
        at::sub_out(yc, y.narrow(1, c0, width).to(acc), shift);
      }
      // scale (sums * own - P other) = (P other - sums * own) * (2/H), into the result's columns
      const auto finish = [&](const at::Tensor& weights, const at::Tensor& other, const at::Tensor& own,
                              const at::Tensor& sums, at::Tensor& result) {
        at::Tensor product = view(product_buffer, own.size(0), width);
        at::mm_out(product, weights, other);
        product.addcmul_(own, sums, -1.0).mul_(minus_scale);
        result.narrow(1, c0, width).copy_(product);
      };
      if (want_x) finish(p, yc, xc, rowsum, grad_x);
      if (want_y) finish(pt, xc, yc, colsum, grad_y);
    }
  });
  return {grad_x, grad_y, -p_log_k / h};
}

}  // namespace bmt_fast::cpu
