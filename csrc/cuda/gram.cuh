// Few particles, huge d (soft prompts: n <= ~256, d = 10^4 .. 10^6+), in up to five small launches:
//   1. split-K Gram G = V V^T over column ranges, V = rows shifted by particle 0 (exact zeros for
//      identical particles; no copy of V is made): fp32 (fp64 for fp64) partial sums per thread, added
//      into a float64 G with atomics; then (1d) direct distances for the pairs whose expansion cancels;
//   2. the bandwidth: the exact median of the n*n distances of G (ranking the distinct pair distances
//      for n <= 32, radix selection beyond) in one CTA, or H;
//   3. K = exp(-D / H) as K/n and c = (2/H) rowsum(K) / n (one warp per row), or the rbf_kernel output;
//   4. one memory-bound pass phi = (K/n) W + c V with W = score - (2/H) V formed on the fly.
// For n <= 16 (soft prompts) steps 2 and 3 run inside step 4, so a step is a memset and three kernels, and
// so is a batch of such steps (svgd_step_batched_into): blockIdx.z picks the set (GramParams / ApplyParams:
// set strides), each set's CTAs as its single step's.
// Rows 0..n-1 come from x and rows n..n+m-1 from y (rbf_kernel of two sets): R = n + m rows in all.
#pragma once

#include "device.cuh"
#include "radix.cuh"
#include "tiled_ffma.cuh"

namespace bmt_fast::cuda {

template <typename In>
struct GramParams {
  const In* x;  // (n x d)
  const In* y;  // (m x d), or null when m == 0
  long long n, m, d;
  double* gram;  // (R x R), zeroed; the upper triangle i <= j is accumulated
  long long cols_per_block;  // column range of one CTA (multiple of 16)
  // svgd_step_into's flag, or null: set true here (this launch precedes the apply kernel, which clears
  // it on a non-finite phi value), so the flag needs no launch of its own.
  bool* finite = nullptr;
  // A batch of sets (the register and streamed kernels only; y null): set s = blockIdx.z reads x + s * set_x,
  // adds into gram + s * set_gram and sets finite[s]. 0 for one set.
  long long set_x = 0, set_gram = 0;
};

// A batch's pointer for the set of this CTA (blockIdx.z): `stride` elements on per set; null stays null.
template <typename T>
BMT_DEVICE T* at_set(T* base, long long stride) {
  return base ? base + static_cast<long long>(blockIdx.z) * stride : base;
}

// p for the set of this CTA (set 0 of a launch of one set: p itself).
template <typename In>
BMT_DEVICE GramParams<In> for_set(GramParams<In> p) {
  p.x = at_set(p.x, p.set_x);
  p.gram = at_set(p.gram, p.set_gram);
  p.finite = at_set(p.finite, 1);
  return p;
}

template <typename In>
BMT_DEVICE const In* gram_row(const GramParams<In>& p, long long r) {
  return r < p.n ? p.x + r * p.d : p.y + (r - p.n) * p.d;
}

// The rows are shifted by particle 0, so |v_i|^2 + |v_j|^2 - 2 v_i.v_j loses a pair's distance to
// cancellation when x_0 lies far from both rows compared with their distance (x_0 an outlier beside a tight
// group: fp32 K wrong by 0.95, phi by 0.3 to 8x its size, where another row order gave 1e-3). A pair whose
// expanded distance is below kGramCancelledShare of |v_i|^2 + |v_j|^2 takes its distance by direct
// differences instead, which gram_repair_kernel (1d) writes into G's lower triangle (the accumulation
// leaves it 0); it computes them below twice that share, so every pair the readers below take from there
// has one, whatever the rounding of the test in either place. Beyond the share an fp32 distance keeps
// about 1e-4 of relative error. NaN tests false: a NaN particle's distances stay NaN.
constexpr double kGramCancelledShare = 1e-3;

// The expanded distance |v_lo|^2 + |v_hi|^2 - 2 v_lo.v_hi of rows lo < hi, and whether it cancelled below
// `share` of the two squared norms: one computation for the readers and the repair alike.
struct ExpandedDistance {
  double dist;
  bool cancelled;
};

BMT_DEVICE ExpandedDistance gram_expanded(const double* gram, long long rows, long long lo, long long hi,
                                          double share) {
  const double norms = gram[lo * rows + lo] + gram[hi * rows + hi];
  const double dist = norms - 2.0 * gram[lo * rows + hi];
  return {dist, dist < share * norms};
}

// Squared distance between rows i and j from G (above), clamped at 0 with a NaN kept (a NaN particle's
// entries of K are NaN, as the reference's, not 1); exact 0 for i == j.
BMT_DEVICE double gram_distance(const double* gram, long long rows, long long i, long long j) {
  if (i == j) return 0.0;
  const long long lo = i < j ? i : j, hi = i < j ? j : i;
  const ExpandedDistance e = gram_expanded(gram, rows, lo, hi, kGramCancelledShare);
  if (e.cancelled) return gram[hi * rows + lo];
  return e.dist < 0.0 ? 0.0 : e.dist;
}

// The same for the median's selection, a NaN as 0 (ranks and keys need numbers; the median is then NaN by
// gram_diagonal_finite).
BMT_DEVICE double gram_median_distance(const double* gram, long long rows, long long i, long long j) {
  const double dist = gram_distance(gram, rows, i, j);
  return dist > 0.0 ? dist : 0.0;
}

// ---- 1a. Gram for R <= kMax (<= 16): each thread keeps the sums of its columns for its row pairs in --
// registers: all kMax(kMax+1)/2 of them (136 for kMax = 16: one 256-thread CTA per SM then, which keeps
// 2 x 16 loads per thread in flight), or, where those do not fit (float64 from kMax = 8), one of two
// parts of the pairs: the warps of a CTA go in twos over the same columns, the first warp of two summing
// the pairs within each half of the rows, the second those across the halves (72 and 64 float64 sums for
// kMax = 16, where all 136 had needed 272 registers and spilled 1,780 bytes).

template <typename In, int kMax>
constexpr int kGramSmallParts = std::is_same_v<compute_t<In>, double> && kMax > 4 ? 2 : 1;

// CTAs per SM that the register budget of the launch bounds allows; the host launches one wave of them
// (each CTA pays a fixed reduction of its sums and as many float64 atomics: more CTAs, which could not
// run at the same time anyway, would only add those).
template <int kMax>
constexpr int kGramSmallCtasPerSm = kMax > 8 ? 1 : 2;

// Whether the row pair i <= j belongs to part `part` of kParts (see above).
template <int kMax, int kParts>
constexpr bool gram_pair_in_part(int i, int j, int part) {
  if (kParts == 1) return true;
  return ((i < kMax / 2) == (j < kMax / 2)) == (part == 0);
}

// The number of row pairs of part `part`.
template <int kMax, int kParts>
constexpr int gram_part_pairs(int part) {
  int count = 0;
  for (int i = 0; i < kMax; ++i)
    for (int j = i; j < kMax; ++j) count += gram_pair_in_part<kMax, kParts>(i, j, part);
  return count;
}

template <int kMax, int kParts>
constexpr int kGramMostPartPairs = gram_part_pairs<kMax, kParts>(0) > gram_part_pairs<kMax, kParts>(kParts - 1)
                                       ? gram_part_pairs<kMax, kParts>(0)
                                       : gram_part_pairs<kMax, kParts>(kParts - 1);

// Columns one CTA covers per pass of the register Gram kernel (the host sizes its grid by it).
template <typename In, int kMax>
constexpr int kGramSmallColumns = 256 / kGramSmallParts<In, kMax>;

// acc[q] += v_i v_j over the row pairs i <= j of part kPart, in the order of gram_pair_in_part.
template <int kPart, int kMax, int kParts, typename C>
BMT_DEVICE void gram_accumulate(C* acc, const C (&v)[kMax]) {
  int q = 0;
#pragma unroll
  for (int i = 0; i < kMax; ++i)
#pragma unroll
    for (int j = i; j < kMax; ++j)
      if (gram_pair_in_part<kMax, kParts>(i, j, kPart)) acc[q++] += v[i] * v[j];
}

// A warp's sums of its kPairs register accumulators into partial[0 .. kPairs).
template <int kPairs, typename C>
BMT_DEVICE void gram_reduce_warp(const C* acc, C* partial) {
#pragma unroll
  for (int q = 0; q < kPairs; ++q) {
    C sum = acc[q];
    for (int m = 16; m >= 1; m /= 2) sum += shfl_xor(sum, m);
    if (lane_id() == 0) partial[q] = sum;
  }
}

// After a barrier: the CTA's sums of every pair (warps w of part w % kParts), added into G as float64.
template <int kMax, int kParts, int kPairs, int kWarps, typename In, typename C>
BMT_DEVICE void gram_add_partials(const GramParams<In>& p, long long rows, const C (&partial)[kWarps][kPairs]) {
  for (int q = threadIdx.x; q < kParts * kPairs; q += blockDim.x) {
    const int pt = q / kPairs, ql = q % kPairs;
    int i = 0, j = 0;  // the pair (i, j) of index ql in part pt, in the order of the accumulation loop
    for (int seen = -1;;) {
      if (gram_pair_in_part<kMax, kParts>(i, j, pt) && ++seen == ql) break;
      if (++j == kMax) j = ++i;
      if (i == kMax) break;
    }
    if (i < rows && j < rows) {
      double sum = 0.0;
      for (int w = pt; w < kWarps; w += kParts) sum += static_cast<double>(partial[w][ql]);
      atomicAdd(&p.gram[i * rows + j], sum);
    }
  }
}

// The register sums of one thread of part kPart over its columns (k, then k + stride, ...), reduced
// over its warp into partial[warp].
template <int kPart, int kMax, int kParts, typename In, typename C>
BMT_DEVICE void gram_small_part(const GramParams<In>& p, long long rows, long long k, long long stride,
                                C* partial) {
  constexpr int kPairs = gram_part_pairs<kMax, kParts>(kPart);
  C acc[kPairs];
#pragma unroll
  for (int q = 0; q < kPairs; ++q) acc[q] = C(0);
  // Two columns per step (k and k + stride): twice the loads in flight before the FMAs.
  for (; k < p.d; k += 2 * stride) {
    C v[2][kMax];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const long long col = k + h * stride;
      const bool inside = col < p.d;
      const C first = inside ? to_float(p.x[col]) : C(0);
#pragma unroll
      for (int r = 0; r < kMax; ++r) v[h][r] = inside && r < rows ? to_float(gram_row(p, r)[col]) - first : C(0);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) gram_accumulate<kPart, kMax, kParts>(acc, v[h]);
  }
  gram_reduce_warp<kPairs>(acc, partial);
}

template <typename In, int kMax>
BMT_GLOBAL void BMT_LAUNCH_BOUNDS(256, kGramSmallCtasPerSm<kMax>) gram_small_kernel(const GramParams<In> params) {
  using C = compute_t<In>;
  const GramParams<In> p = for_set(params);
  constexpr int kParts = kGramSmallParts<In, kMax>;
  constexpr int kPairs = kGramMostPartPairs<kMax, kParts>;
  constexpr int kWarps = 256 / kWarp;
  __shared__ C partial[kWarps][kPairs];
  const long long rows = p.n + p.m;
  if (p.finite && blockIdx.x == 0 && threadIdx.x == 0) *p.finite = true;

  // Warp w is of part w % kParts and covers the 32 columns of warp group w / kParts.
  const int warp = threadIdx.x / kWarp, part = warp % kParts;
  const long long stride = static_cast<long long>(gridDim.x) * kGramSmallColumns<In, kMax>;
  const long long k = static_cast<long long>(blockIdx.x) * kGramSmallColumns<In, kMax> + (warp / kParts) * kWarp +
                      lane_id();
  if (part == 0) gram_small_part<0, kMax, kParts>(p, rows, k, stride, partial[warp]);
  else gram_small_part<kParts - 1, kMax, kParts>(p, rows, k, stride, partial[warp]);  // warp-uniform
  __syncthreads();
  gram_add_partials<kMax, kParts>(p, rows, partial);
}

// ---- 1c. The streamed register Gram (BMT_FAST_CUDA_GRAM=streamed) --------------------------------------
// The same sums as 1a, but the columns reach the registers through shared memory: each CTA takes an equal
// share of the columns (whole 16-byte pieces) and copies them with cp.async, kGramStreamStages chunks of all
// rows in flight (~160 KB per SM, against ~35 KB of loads per SM in 1a, whose in-flight bytes are bounded by
// its registers), each row's chunk one contiguous run of memory. One CTA per SM (192 KB of shared memory:
// H100 / H200; devices with less keep 1a). fp32 compute types only (all pairs in one part).

constexpr int kStreamThreads = 256;
constexpr int kStreamSharedBytes = 192 * 1024;
constexpr int kGramStreamStages = 6;
constexpr int kApplyStreamStages = 3;

template <typename In>
constexpr int kStreamPiece = static_cast<int>(16 / sizeof(In));  // elements per 16-byte copy

// Columns per chunk: the stages of `rows` rows fill the shared memory.
template <typename In, int kRows, int kStages>
constexpr int kStreamWidth = static_cast<int>(kStreamSharedBytes / (kStages * kRows * sizeof(In)));

struct ColumnRange {
  long long begin, end;
};

// This CTA's columns: an equal share of the d / piece 16-byte pieces of a row (d is a multiple of a piece).
template <typename In>
BMT_DEVICE ColumnRange stream_range(long long d) {
  const long long pieces = d / kStreamPiece<In>, cta = blockIdx.x, ctas = gridDim.x;
  return {pieces * cta / ctas * kStreamPiece<In>, pieces * (cta + 1) / ctas * kStreamPiece<In>};
}

// Issues the cp.async copies of columns [begin, begin + width) of rows 0 .. count-1 of `rows` (row r to
// slot rows.slot(r) of the stage, kWidth elements a slot) and commits them as one group. width: a multiple of
// a piece; the rows start 16-byte aligned.
template <typename In, int kWidth, typename Rows>
BMT_DEVICE void stream_stage(In* stage, const Rows& rows, int count, long long begin, int width) {
  constexpr int kPiece = kStreamPiece<In>;
  const int pieces = width / kPiece;
  for (int q = threadIdx.x; q < count * pieces; q += blockDim.x) {
    const int r = q / pieces, piece = q % pieces;
    cp_async_16(stage + rows.slot(r) * kWidth + piece * kPiece, rows.row(r) + begin + piece * kPiece);
  }
  cp_async_commit();
}

// The chunks 0 .. chunks-1 through kStages shared stages: load(stage, chunk) issues and commits a chunk's
// copies, compute(stage, chunk) reads it; kStages - 1 chunks are in flight while one is computed on.
template <int kStages, typename Load, typename Compute>
BMT_DEVICE void stream_pipeline(long long chunks, const Load& load, const Compute& compute) {
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < chunks) load(s, s);
    else cp_async_commit();  // an empty group: every thread waits on the same group count
  }
  for (long long t = 0; t < chunks; ++t) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // chunk t landed for every thread; every thread is done with chunk t - 1's stage
    compute(static_cast<int>(t % kStages), t);
    const long long next = t + kStages - 1;  // into chunk t - 1's stage
    if (next < chunks) load(static_cast<int>(next % kStages), next);
    else cp_async_commit();
  }
}

// The rows of G: x rows 0 .. n-1, then y rows (by value: no address of a kernel parameter is taken).
template <typename In>
struct GramRows {
  const In* x;
  const In* y;
  long long n, d;
  BMT_DEVICE const In* row(int r) const { return r < n ? x + r * d : y + (r - n) * d; }
  BMT_DEVICE int slot(int r) const { return r; }
};

template <typename In, int kMax>
constexpr int kGramStreamWidth = kStreamWidth<In, kMax, kGramStreamStages>;

template <typename In, int kMax>
BMT_GLOBAL void BMT_LAUNCH_BOUNDS(kStreamThreads, 1) gram_stream_kernel(const GramParams<In> params) {
  static_assert(kGramSmallParts<In, kMax> == 1, "float64 keeps the register kernel");
  const GramParams<In> p = for_set(params);
  using C = compute_t<In>;
  constexpr int kPairs = kMax * (kMax + 1) / 2;
  constexpr int kWidth = kGramStreamWidth<In, kMax>;
  __shared__ C partial[kStreamThreads / kWarp][kPairs];
  BMT_DYNAMIC_SHARED(smem);
  In* stages = reinterpret_cast<In*>(smem);
  const int rows = static_cast<int>(p.n + p.m);
  if (p.finite && blockIdx.x == 0 && threadIdx.x == 0) *p.finite = true;
  const ColumnRange range = stream_range<In>(p.d);
  const GramRows<In> source{p.x, p.y, p.n, p.d};
  auto width_of = [&](long long t) {
    const long long left = range.end - range.begin - t * kWidth;
    return static_cast<int>(left < kWidth ? left : kWidth);
  };
  C acc[kPairs];
#pragma unroll
  for (int q = 0; q < kPairs; ++q) acc[q] = C(0);
  stream_pipeline<kGramStreamStages>(
      (range.end - range.begin + kWidth - 1) / kWidth,
      [&](int stage, long long t) {
        stream_stage<In, kWidth>(stages + stage * kMax * kWidth, source, rows, range.begin + t * kWidth, width_of(t));
      },
      [&](int stage, long long t) {
        const In* s = stages + stage * kMax * kWidth;
        const int width = width_of(t);
        for (int j = threadIdx.x; j < width; j += kStreamThreads) {
          C v[kMax];
          const C first = to_float(s[j]);  // x row 0: the shift
#pragma unroll
          for (int r = 0; r < kMax; ++r) v[r] = r < rows ? to_float(s[r * kWidth + j]) - first : C(0);
          gram_accumulate<0, kMax, 1>(acc, v);
        }
      });
  gram_reduce_warp<kPairs>(acc, partial[threadIdx.x / kWarp]);
  __syncthreads();
  gram_add_partials<kMax, 1>(p, rows, partial);
}

// ---- 1b. Gram for larger R: 64 x 64 blocks of G on the FFMA dot tile, blockIdx.y = block pair I <= J --

template <typename In>
struct ShiftedRowLoader {
  GramParams<In> p;  // by value: no address of a kernel parameter is taken
  long long first_row, rows;
  BMT_DEVICE compute_t<In> operator()(int r, long long k) const {
    const long long row = first_row + r;
    if (row >= rows) return compute_t<In>(0);
    return to_float(gram_row(p, row)[k]) - to_float(p.x[k]);
  }
};

template <typename In>
BMT_GLOBAL void BMT_LAUNCH_BOUNDS(256, 1) gram_tile_kernel(const GramParams<In> p) {
  using C = compute_t<In>;
  using G = FfmaGeometry<C>;
  BMT_DYNAMIC_SHARED(smem);
  C* sa = reinterpret_cast<C*>(smem);
  C* sb = sa + 2 * G::kSlice;
  const long long rows = p.n + p.m;
  const long long blocks = (rows + G::kRows - 1) / G::kRows;
  long long pair = blockIdx.y, bi = 0;
  while (pair >= blocks - bi) {
    pair -= blocks - bi;
    ++bi;
  }
  const long long bj = bi + pair;
  const long long k_begin = static_cast<long long>(blockIdx.x) * p.cols_per_block;
  const long long k_end = k_begin + p.cols_per_block < p.d ? k_begin + p.cols_per_block : p.d;
  C s[4][4];
  ffma_dot_tile(s, k_begin, k_end, sa, sb, ShiftedRowLoader<In>{p, bi * G::kRows, rows},
                ShiftedRowLoader<In>{p, bj * G::kCols, rows});
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 4; ++c) {
      const long long i = bi * G::kRows + 4 * ty + r, j = bj * G::kCols + 4 * tx + c;
      if (i < rows && j < rows && i <= j) atomicAdd(&p.gram[i * rows + j], static_cast<double>(s[r][c]));
    }
}

// ---- 1d. The direct distances of the pairs that cancelled (see gram_distance) -----------------------
// After 1a/1b/1c. CTA (x, i, set) takes row i's pairs (i, j > i), and of those that cancelled (at twice the
// readers' share) sums (x_i - x_j)^2 over its share of the columns (blockIdx.x of gridDim.x), added into the
// lower triangle G[j][i] as float64. Without such pairs (the usual case) a CTA reads G's row i and leaves.

constexpr int kRepairThreads = 256;

template <typename In>
BMT_GLOBAL void BMT_LAUNCH_BOUNDS(kRepairThreads, 4) gram_repair_kernel(const GramParams<In> params) {
  using C = compute_t<In>;
  const GramParams<In> p = for_set(params);
  __shared__ int flagged;
  __shared__ int listed[kRepairThreads];
  __shared__ C partial[kRepairThreads / kWarp];
  const long long rows = p.n + p.m, i = blockIdx.y;
  const long long begin = p.d * blockIdx.x / gridDim.x, end = p.d * (blockIdx.x + 1) / gridDim.x;
  const In* a = gram_row(p, i);
  for (long long first = i + 1; first < rows; first += kRepairThreads) {
    if (threadIdx.x == 0) flagged = 0;
    __syncthreads();
    const long long j = first + threadIdx.x;
    if (j < rows && gram_expanded(p.gram, rows, i, j, 2.0 * kGramCancelledShare).cancelled)
      listed[atomicAdd(&flagged, 1)] = static_cast<int>(j);
    __syncthreads();
    const int count = flagged;
    for (int t = 0; t < count; ++t) {  // the order of the list does not matter: each pair's sum is its own
      const In* b = gram_row(p, listed[t]);
      C sum = C(0);
      for (long long k = begin + threadIdx.x; k < end; k += kRepairThreads) {
        const C diff = to_float(a[k]) - to_float(b[k]);
        sum += diff * diff;
      }
      for (int m = 16; m >= 1; m /= 2) sum += shfl_xor(sum, m);
      if (lane_id() == 0) partial[threadIdx.x / kWarp] = sum;
      __syncthreads();
      if (threadIdx.x == 0) {
        double total = 0.0;
        for (int w = 0; w < kRepairThreads / kWarp; ++w) total += static_cast<double>(partial[w]);
        atomicAdd(&p.gram[listed[t] * rows + i], total);
      }
      __syncthreads();  // partial and (next round) listed are reused
    }
  }
}

// ---- 2. the bandwidth of the first n rows: median rule, or H given ---------------------------------

// Up to this many particles the median comes from ranking the n(n-1)/2 distinct pair distances against
// each other (O(n^4 / 4) comparisons in one CTA, a few microseconds); beyond, by radix selection.
constexpr long long kRankCountingMaxRows = 32;
constexpr int kMaxPairsRanked = kRankCountingMaxRows * (kRankCountingMaxRows - 1) / 2;

// The pair (i < j) of index q in the order (0,1), (0,2), .., (0,n-1), (1,2), ..
BMT_DEVICE void pair_of(long long q, long long n, long long& i, long long& j) {
  i = 0;
  while (q >= n - 1 - i) {
    q -= n - 1 - i;
    ++i;
  }
  j = i + 1 + q;
}

// Block-wide: the numpy median of all n*n distances of the first n rows of G (diagonal zeros included),
// n <= kRankCountingMaxRows. Of the n*n values, n are the zeros of the diagonal and the rest come in
// equal pairs: overall rank r >= n is the distinct pair distance of rank (r - n) / 2, found by counting
// for each pair how many are smaller (ties broken by index). values: kMaxPairsRanked shared slots.
BMT_DEVICE double gram_median_by_ranks(const double* gram, long long rows, long long n, double* values,
                                       double* middle) {
  const long long pairs = n * (n - 1) / 2, total = n * n;
  const long long rank[2] = {(total - 1) / 2, total / 2};
  for (long long q = threadIdx.x; q < pairs; q += blockDim.x) {
    long long i, j;
    pair_of(q, n, i, j);
    values[q] = gram_median_distance(gram, rows, i, j);
  }
  if (threadIdx.x == 0)
    for (int t = 0; t < 2; ++t)
      if (rank[t] < n) middle[t] = 0.0;
  __syncthreads();
  for (long long q = threadIdx.x; q < pairs; q += blockDim.x) {
    const double v = values[q];
    long long smaller = 0;
    for (long long b = 0; b < pairs; ++b) smaller += values[b] < v || (values[b] == v && b < q);
    for (int t = 0; t < 2; ++t)
      if (rank[t] >= n && (rank[t] - n) / 2 == smaller) middle[t] = v;
  }
  __syncthreads();
  return 0.5 * (middle[0] + middle[1]);
}

BMT_DEVICE double median_rule(double median, long long n, double floor) {
  const double h = median / log(static_cast<double>(n) + 1.0);
  return h > floor ? h : floor;
}

// Whether G's diagonal entries for rows 0 .. n-1 (the squared norms of the rows shifted by x[0]) are finite: a NaN
// or an infinity in the particles makes one NaN or Inf, and the median rule's H is then NaN, as the reference's
// and the CPU's (a clamp of NaN distances at 0 and the keys' order had given a finite H).
BMT_DEVICE bool gram_diagonal_finite(const double* gram, long long rows, long long n) {
  for (long long i = 0; i < n; ++i)
    if (!is_finite(gram[i * rows + i])) return false;
  return true;
}

struct GramBandwidthParams {
  const double* gram;  // (rows x rows) upper triangle
  long long rows, n;   // the median is over rows 0 .. n-1
  const double* given;  // H, or null for the median rule
  double floor;
  double* bandwidth;  // out: H
};

BMT_GLOBAL void BMT_LAUNCH_BOUNDS(256, 1) gram_bandwidth_kernel(const GramBandwidthParams p) {
  __shared__ double storage[kRadixBins];  // the histogram (2 x kRadixBins counts), or the ranked pairs
  __shared__ RadixState state;
  __shared__ unsigned long long scratch[kWarp + 4];
  __shared__ double middle[2];
  unsigned* hist = reinterpret_cast<unsigned*>(storage);
  if (p.given) {
    if (threadIdx.x == 0) *p.bandwidth = *p.given;
    return;
  }
  if (p.n <= kRankCountingMaxRows) {
    static_assert(kMaxPairsRanked <= kRadixBins, "the ranked pairs share the histogram's storage");
    const double median = gram_median_by_ranks(p.gram, p.rows, p.n, storage, middle);
    if (threadIdx.x == 0)
      *p.bandwidth = gram_diagonal_finite(p.gram, p.rows, p.n) ? median_rule(median, p.n, p.floor) : quiet_nan_d();
    return;
  }
  if (threadIdx.x == 0) {
    const unsigned long long total = static_cast<unsigned long long>(p.n) * static_cast<unsigned long long>(p.n);
    state.prefix[0] = state.prefix[1] = 0;
    state.rank[0] = (total - 1) / 2;
    state.rank[1] = total / 2;
  }
  for (int index = 0; index < radix_pass_count<double>(); ++index) {
    const RadixPass pass = radix_pass<double>(index);
    zero_histogram(hist);
    __syncthreads();
    const unsigned long long prefix[2] = {state.prefix[0], state.prefix[1]};
    const bool same = prefix[0] == prefix[1];
    for (long long idx = threadIdx.x; idx < p.n * p.n; idx += blockDim.x) {
      const long long i = idx / p.n, j = idx % p.n;
      if (i != j) radix_count(hist, key_of(gram_median_distance(p.gram, p.rows, i, j)), pass, prefix, same, 1u);
    }
    __syncthreads();
    radix_select_block(hist, pass, static_cast<unsigned long long>(p.n), &state, scratch);
  }
  if (threadIdx.x == 0)
    *p.bandwidth = gram_diagonal_finite(p.gram, p.rows, p.n) ? bandwidth_from_keys<double>(state, p.n, p.floor)
                                                             : quiet_nan_d();
}

// ---- 3a. svgd_step: kn = K / n, c = (2/H) rowsum(K) / n, a = 2/H (one warp per row) ---------------

template <typename C>
struct GramWeightsParams {
  const double* gram;
  long long n;
  const double* bandwidth;
  C* kn;  // (n x n)
  C* c;   // (n)
  C* a;   // scalar
};

template <typename C>
BMT_GLOBAL void BMT_LAUNCH_BOUNDS(256, 1) gram_weights_kernel(const GramWeightsParams<C> p) {
  const double inv_h = inverse_bandwidth(*p.bandwidth);
  const long long i = static_cast<long long>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (blockIdx.x == 0 && threadIdx.x == 0) *p.a = static_cast<C>(2.0 * inv_h);
  if (i >= p.n) return;  // whole warps leave together: no barrier or collective is skipped by part of one
  double rowsum = 0.0;
  for (long long j = lane_id(); j < p.n; j += kWarp) {
    // the own term k_ii = 1 is left out (0; NaN for an invalid H): the caller adds score_i itself
    const double k = exp(-gram_distance(p.gram, p.n, i, j) * inv_h) - (j == i ? 1.0 : 0.0);
    p.kn[i * p.n + j] = static_cast<C>(k / static_cast<double>(p.n));
    rowsum += k;
  }
  for (int m = 16; m >= 1; m /= 2) rowsum += shfl_xor(rowsum, m);
  if (lane_id() == 0) p.c[i] = static_cast<C>(2.0 * inv_h * rowsum / static_cast<double>(p.n));
}

// ---- 3b. rbf_kernel: K[i, j] = exp(-D(x_i, y_j) / H) from G ---------------------------------------

template <typename Out>
struct GramRbfParams {
  const double* gram;
  long long n, m;  // y rows are rows n .. n+m-1 of G, or (self) the x rows themselves
  bool self;
  const double* bandwidth;
  Out* kernel;  // (n x m)
};

template <typename Out>
BMT_GLOBAL void BMT_LAUNCH_BOUNDS(256, 4) gram_rbf_kernel(const GramRbfParams<Out> p) {
  const double inv_h = inverse_bandwidth(*p.bandwidth);
  const long long rows = p.self ? p.n : p.n + p.m;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; idx < p.n * p.m; idx += stride) {
    const long long i = idx / p.m, j = idx % p.m;
    const double dist = gram_distance(p.gram, rows, i, p.self ? j : p.n + j);
    p.kernel[idx] = Store<Out>::from(static_cast<compute_t<Out>>(exp(-dist * inv_h)));
  }
}

// ---- 4. phi = kn W + c V, W = score - a V, V = x - x_0, for n <= kMax (<= 16) -----------------------
// Each CTA first derives H (given, or the median of G by ranks), K / n, c = a rowsum(K) / n and a = 2/H
// from the tiny G itself: redundant work of a few microseconds that saves two launches per step.

template <typename In>
struct ApplyParams {
  const In* x;
  const In* score;
  In* phi;
  long long n, d;
  const double* gram;   // (n x n) upper triangle, from gram_small_kernel
  const double* given;  // H, or null for the median rule
  double floor;
  bool* finite;  // null, or cleared when a stored phi value is NaN/Inf (set true by gram_small_kernel)
  // A batch of sets, as GramParams: set s = blockIdx.z reads x and score and writes phi at + s * set_rows, reads
  // gram + s * set_gram and given + s * set_given (0: one H for all), clears finite[s]. 0 for one set.
  long long set_rows = 0, set_gram = 0, set_given = 0;
};

// p for the set of this CTA, as for_set of GramParams.
template <typename In>
BMT_DEVICE ApplyParams<In> for_set(ApplyParams<In> p) {
  p.x = at_set(p.x, p.set_rows);
  p.score = at_set(p.score, p.set_rows);
  p.phi = at_set(p.phi, p.set_rows);
  p.gram = at_set(p.gram, p.set_gram);
  p.given = at_set(p.given, p.set_given);
  p.finite = at_set(p.finite, 1);
  return p;
}

// Two CTAs per SM (at most 128 registers) except for fp64 with 16 rows, which needs more. The host launches
// one wave of them: each CTA first derives H and K from G (a fixed cost), then loops over its columns.
template <typename In, int kMax>
constexpr int kApplySmallCtasPerSm = sizeof(compute_t<In>) == 8 && kMax > 8 ? 1 : 2;

// What the apply kernels derive from the tiny G before their columns: kn = K / n and c = a rowsum(K) / n in
// shared memory (with the median's scratch), a = 2/H, own = 1/n and n in registers.
template <typename C, int kMax>
struct ApplyShared {
  C kn[kMax][kMax];
  C c[kMax];
  double pair_values[kMax * (kMax - 1) / 2 + 1];
  double middle[2];
};

template <typename C>
struct ApplyScalars {
  C a, own;
  int n;
};

// H (given, or the median of G by ranks), then kn, c, a (above). Ends with a barrier. K / n and its row sums
// leave out the own term k_ii = 1 (0 there; NaN for an invalid H), which is score_i / n, added from the input:
// folded into w_i it is (score_i - a v_i) + a v_i, whose two large terms cancel when H lies far below the
// squared distances.
template <typename In, int kMax, typename C>
BMT_DEVICE ApplyScalars<C> apply_weights(const ApplyParams<In>& p, ApplyShared<C, kMax>& shared) {
  static_assert(kMax <= kRankCountingMaxRows, "the median by ranks needs few rows");
  const double median = p.given ? 0.0 : gram_median_by_ranks(p.gram, p.n, p.n, shared.pair_values, shared.middle);
  const double h = p.given                                   ? *p.given
                   : gram_diagonal_finite(p.gram, p.n, p.n) ? median_rule(median, p.n, p.floor)
                                                            : quiet_nan_d();
  const double inv_h = inverse_bandwidth(h);
  auto weight = [&](int i, int j) { return exp(-gram_distance(p.gram, p.n, i, j) * inv_h) - (i == j ? 1.0 : 0.0); };
  for (int idx = threadIdx.x; idx < kMax * kMax; idx += blockDim.x) {
    const int i = idx / kMax, j = idx % kMax;
    const bool inside = i < p.n && j < p.n;
    shared.kn[i][j] = inside ? static_cast<C>(weight(i, j) / static_cast<double>(p.n)) : C(0);
  }
  for (int i = threadIdx.x; i < kMax; i += blockDim.x) {
    double rowsum = 0.0;
    for (int j = 0; j < p.n && i < p.n; ++j) rowsum += weight(i, j);
    shared.c[i] = i < p.n ? static_cast<C>(2.0 * inv_h * rowsum / static_cast<double>(p.n)) : C(0);
  }
  __syncthreads();
  return {static_cast<C>(2.0 * inv_h), static_cast<C>(1.0 / static_cast<double>(p.n)), static_cast<int>(p.n)};
}

// phi = kn W + c V + score / n at kColumns columns of one thread (column q where inside[q]): x(q, r) and
// score(q, r) read row r there, store(i, q, value) writes phi row i. kn / c: apply_weights's, read through
// volatile (every lane reads the same entry, a broadcast, and the compiler must not hoist all kMax^2 entries
// out of the caller's column loop into registers: it spills when it does). Returns whether every value
// stored is finite (16-bit: after rounding).
template <int kColumns, typename In, int kMax, typename C, typename X, typename S, typename Out>
BMT_DEVICE bool apply_columns(const ApplyShared<C, kMax>& shared, const ApplyScalars<C>& k, const bool (&inside)[kColumns],
                              const X& x, const S& score, const Out& store) {
  const volatile C* kn = &shared.kn[0][0];
  const volatile C* c = shared.c;
  const C a = k.a, own = k.own;
  const int n = k.n;
  C v[kColumns][kMax], w[kColumns][kMax];
  // v: the column about its centre x_0 + mean(x - x_0) (mean_shift's), x - centre rounded once. A shift by row 0
  // had left a v of the group's distance to an outlying row 0, its repulsion a v cancelling in the compute type:
  // phi depended on the order of the rows (fp32, 15 rows within 1e-3 and one 300 away: 4e-2 in row 0, 4e-7 last).
#pragma unroll
  for (int q = 0; q < kColumns; ++q) {
    const C first = inside[q] ? x(q, 0) : C(0);
    C sum = C(0);
#pragma unroll
    for (int r = 0; r < kMax; ++r) {
      v[q][r] = inside[q] && r < n ? x(q, r) : C(0);
      sum += r < n ? v[q][r] - first : C(0);
    }
    const C centre = first + sum * own;
#pragma unroll
    for (int r = 0; r < kMax; ++r) {
      const bool present = inside[q] && r < n;
      v[q][r] = present ? v[q][r] - centre : C(0);
      w[q][r] = present ? score(q, r) - a * v[q][r] : C(0);
    }
  }
  bool finite = true;
#pragma unroll
  for (int i = 0; i < kMax; ++i) {
    if (i >= n) break;
    C out[kColumns];
    const C ci = c[i];
#pragma unroll
    for (int q = 0; q < kColumns; ++q) out[q] = ci * v[q][i] + (inside[q] ? own * score(q, i) : C(0));
#pragma unroll
    for (int j = 0; j < kMax; ++j) {
      const C kij = kn[i * kMax + j];
#pragma unroll
      for (int q = 0; q < kColumns; ++q) out[q] += kij * w[q][j];
    }
#pragma unroll
    for (int q = 0; q < kColumns; ++q) {
      if (inside[q]) {
        const In stored = Store<In>::from(out[q]);
        store(i, q, stored);
        finite = finite && is_finite(to_float(stored));
      }
    }
  }
  return finite;
}

template <typename In, int kMax>
BMT_GLOBAL void BMT_LAUNCH_BOUNDS(256, (kApplySmallCtasPerSm<In, kMax>)) apply_small_kernel(const ApplyParams<In> p) {
  using C = compute_t<In>;
  constexpr int kColumns = 2;  // columns per thread and step: each shared K entry feeds two FMAs
  __shared__ ApplyShared<C, kMax> shared;
  const ApplyScalars<C> scalars = apply_weights(for_set(p), shared);
  // The set's rows (a batch: blockIdx.z) by its offset in the column index, which runs over [offset,
  // offset + d): x, score and phi stay kernel parameters, which the loads and stores read without registers
  // (shifted pointers, or the offset added to each index, took 16 rows past the 128 registers of two CTAs
  // an SM: spills; this way fp32 takes 115, against 112 before batches).
  const long long offset = static_cast<long long>(blockIdx.z) * p.set_rows;
  bool finite = true;  // every phi value this thread stored, as stored
  const long long span = static_cast<long long>(blockDim.x) * kColumns;
  const long long end = offset + p.d;
  for (long long base = offset + static_cast<long long>(blockIdx.x) * span; base < end; base += gridDim.x * span) {
    long long k[kColumns];  // coalesced across the block
    bool inside[kColumns];
#pragma unroll
    for (int q = 0; q < kColumns; ++q) {
      k[q] = base + q * blockDim.x + threadIdx.x;
      inside[q] = k[q] < end;
    }
    const bool stored_finite = apply_columns<kColumns, In>(
        shared, scalars, inside, [&](int q, int r) { return to_float(p.x[r * p.d + k[q]]); },
        // score_i again for the own term: from L1, just loaded (not kept: registers)
        [&](int q, int r) { return to_float(p.score[r * p.d + k[q]]); },
        [&](int i, int q, In value) { p.phi[i * p.d + k[q]] = value; });
    finite = finite && stored_finite;
  }
  if (!finite && p.finite) *at_set(p.finite, 1) = false;  // every writer stores the same value
}

// ---- 4b. The streamed apply (BMT_FAST_CUDA_GRAM=streamed): 4's arithmetic, x and score through shared
// memory as in 1c (kApplyStreamStages chunks of the 2n rows, 192 KB), phi stored from registers. --------

// x rows to slots 0 .. n-1, score rows to slots kMax .. kMax+n-1.
template <typename In, int kMax>
struct ApplyRows {
  const In* x;
  const In* score;
  long long n, d;
  BMT_DEVICE const In* row(int r) const { return r < n ? x + r * d : score + (r - n) * d; }
  BMT_DEVICE int slot(int r) const { return r < n ? r : kMax + (r - static_cast<int>(n)); }
};

template <typename In, int kMax>
constexpr int kApplyStreamWidth = kStreamWidth<In, 2 * kMax, kApplyStreamStages>;

template <typename In, int kMax>
BMT_GLOBAL void BMT_LAUNCH_BOUNDS(kStreamThreads, 1) apply_stream_kernel(const ApplyParams<In> params) {
  using C = compute_t<In>;
  const ApplyParams<In> p = for_set(params);
  static_assert(sizeof(C) == 4, "float64 keeps the register kernel");
  constexpr int kWidth = kApplyStreamWidth<In, kMax>;
  constexpr int kColumns = kWidth >= 2 * kStreamThreads ? 2 : 1;
  __shared__ ApplyShared<C, kMax> shared;
  const ApplyScalars<C> scalars = apply_weights(p, shared);
  BMT_DYNAMIC_SHARED(smem);
  In* stages = reinterpret_cast<In*>(smem);
  const ColumnRange range = stream_range<In>(p.d);
  const ApplyRows<In, kMax> source{p.x, p.score, p.n, p.d};
  auto width_of = [&](long long t) {
    const long long left = range.end - range.begin - t * kWidth;
    return static_cast<int>(left < kWidth ? left : kWidth);
  };
  bool finite = true;
  stream_pipeline<kApplyStreamStages>(
      (range.end - range.begin + kWidth - 1) / kWidth,
      [&](int stage, long long t) {
        stream_stage<In, kWidth>(stages + stage * 2 * kMax * kWidth, source, 2 * scalars.n, range.begin + t * kWidth,
                                 width_of(t));
      },
      [&](int stage, long long t) {
        const In* xs = stages + stage * 2 * kMax * kWidth;
        const In* ss = xs + kMax * kWidth;
        const long long c0 = range.begin + t * kWidth;
        const int width = width_of(t);
        for (int j0 = threadIdx.x; j0 < width; j0 += kColumns * kStreamThreads) {
          bool inside[kColumns];
#pragma unroll
          for (int q = 0; q < kColumns; ++q) inside[q] = j0 + q * kStreamThreads < width;
          const bool stored_finite = apply_columns<kColumns, In>(
              shared, scalars, inside,
              [&](int q, int r) { return to_float(xs[r * kWidth + j0 + q * kStreamThreads]); },
              [&](int q, int r) { return to_float(ss[r * kWidth + j0 + q * kStreamThreads]); },
              [&](int i, int q, In value) { p.phi[i * p.d + c0 + j0 + q * kStreamThreads] = value; });
          finite = finite && stored_finite;
        }
      });
  if (!finite && p.finite) *p.finite = false;  // every writer stores the same value
}

}  // namespace bmt_fast::cuda
