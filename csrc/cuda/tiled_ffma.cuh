// Many-particle kernels with IEEE fp32 (or fp64) CUDA-core arithmetic: the default for fp32 and fp64
// inputs. A CTA owns 64 rows of particles and streams 64-column blocks of the others past them:
// S = A_I B_J^T by a register-tiled dot over depth slices in shared memory, then one of three
// epilogues (TileMode). Nothing of size n x n is stored anywhere.
#pragma once

#include "device.cuh"
#include "radix.cuh"

namespace bmt_fast::cuda {

// What a tiled kernel does with each tile of K = exp(-D / H).
enum class TileMode {
  kSvgd,    // out[I, F] = sum_J K[I, J] W[J, F] and rowsum[I] = sum_J K[I, J]
  kRbf,     // write K (the rbf_kernel op)
  kMedian,  // histogram the distances of pairs i < j (a pass of the radix-select median)
};

// 256 threads as a 16 x 16 grid; thread (ty, tx) holds rows 4 ty + [0, 4) and columns 4 tx + [0, 4) of
// the 64 x 64 tile. Depth slices of 16 are stored transposed ([k][row]) so each thread reads its four
// rows (columns) with one vector load; rows are padded by 16 bytes to spread the banks of the stores.
// The slices are double-buffered (see ffma_dot_tile).
template <typename T>
struct FfmaGeometry {
  static constexpr int kRows = 64, kCols = 64, kDepth = 16, kThreads = 256;
  static constexpr int kPad = 16 / static_cast<int>(sizeof(T));
  static constexpr int kLd = kRows + kPad;
  static constexpr int kFeatures = sizeof(T) == 4 ? 128 : 64;  // svgd output features per CTA
  static constexpr int kFeatureGroups = kFeatures / 64;       // 4-wide feature groups per thread
  static constexpr int kLdW = kFeatures + kPad;
  static constexpr int kSlice = kDepth * kLd;  // one depth slice of one operand
  static constexpr size_t kDotBytes = 2 * 2 * kSlice * sizeof(T);  // two operands, double-buffered
  static constexpr size_t kSvgdBytes = kDotBytes + (static_cast<size_t>(kCols) * kLd + kCols * kLdW) * sizeof(T);
  static constexpr size_t kMedianBytes = kDotBytes + 2 * kRadixBins * sizeof(unsigned);
  static constexpr size_t shared_bytes(TileMode mode) {
    return mode == TileMode::kSvgd ? kSvgdBytes : mode == TileMode::kMedian ? kMedianBytes : kDotBytes;
  }
};

template <typename T>
BMT_DEVICE void load4(const T* p, T (&v)[4]) {
#ifdef BMT_FAST_EMULATE
  for (int i = 0; i < 4; ++i) v[i] = p[i];
#else
  if constexpr (sizeof(T) == 4) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
    const double2 q0 = reinterpret_cast<const double2*>(p)[0], q1 = reinterpret_cast<const double2*>(p)[1];
    v[0] = q0.x, v[1] = q0.y, v[2] = q1.x, v[3] = q1.y;
  }
#endif
}

template <typename T>
BMT_DEVICE void store4(T* p, const T (&v)[4]) {
#ifdef BMT_FAST_EMULATE
  for (int i = 0; i < 4; ++i) p[i] = v[i];
#else
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    reinterpret_cast<double2*>(p)[0] = make_double2(v[0], v[1]);
    reinterpret_cast<double2*>(p)[1] = make_double2(v[2], v[3]);
  }
#endif
}

// s[r][c] = sum over k in [k_begin, k_end) of load_a(4 ty + r, k) * load_b(4 tx + c, k), block-wide.
// load_a(row, k) / load_b(row, k) give element k of row `row` (0..63) of each operand tile, 0 outside it.
// sa and sb hold two slices each: the next slice is fetched into registers while the current one is
// multiplied, then stored into the other half (one barrier per slice). Starts and ends with all threads
// past a barrier, so sa / sb may be reused right after.
template <typename T, typename LoadA, typename LoadB>
BMT_DEVICE void ffma_dot_tile(T (&s)[4][4], long long k_begin, long long k_end, T* sa, T* sb, const LoadA& load_a,
                              const LoadB& load_b) {
  using G = FfmaGeometry<T>;
  constexpr int kPerThread = G::kRows * G::kDepth / G::kThreads;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 4; ++c) s[r][c] = T(0);
  if (k_begin >= k_end) return;
  T next_a[kPerThread], next_b[kPerThread];
  auto fetch = [&](long long k0) {
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      const int idx = tid + e * G::kThreads;
      const int row = idx / G::kDepth, kk = idx % G::kDepth;  // consecutive threads: consecutive k
      const long long k = k0 + kk;
      next_a[e] = k < k_end ? load_a(row, k) : T(0);
      next_b[e] = k < k_end ? load_b(row, k) : T(0);
    }
  };
  auto stash = [&](int half) {
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      const int idx = tid + e * G::kThreads;
      const int row = idx / G::kDepth, kk = idx % G::kDepth;
      sa[half * G::kSlice + kk * G::kLd + row] = next_a[e];
      sb[half * G::kSlice + kk * G::kLd + row] = next_b[e];
    }
  };
  fetch(k_begin);
  stash(0);
  __syncthreads();
  int half = 0;
  for (long long k0 = k_begin; k0 < k_end; k0 += G::kDepth) {
    const bool more = k0 + G::kDepth < k_end;
    if (more) fetch(k0 + G::kDepth);  // global loads in flight during the FMAs below
    const T* a_slice = sa + half * G::kSlice;
    const T* b_slice = sb + half * G::kSlice;
#pragma unroll
    for (int kk = 0; kk < G::kDepth; ++kk) {
      T a[4], b[4];
      load4(a_slice + kk * G::kLd + 4 * ty, a);
      load4(b_slice + kk * G::kLd + 4 * tx, b);
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) s[r][c] += a[r] * b[c];
    }
    if (more) stash(half ^ 1);  // the other half was last read before the previous barrier
    __syncthreads();
    half ^= 1;
  }
}

// Rows of a row-major (rows x d) operand as a tile loader: row r of the tile is row `first + r`.
template <typename T>
struct RowLoader {
  const T* data;
  long long rows, d, first;
  BMT_DEVICE T operator()(int r, long long k) const {
    const long long row = first + r;
    return row < rows ? data[row * d + k] : T(0);
  }
};

template <typename T, typename Out>
struct FfmaParams {
  const T* a;        // (a_rows x d) centred particles: the rows of the result
  const T* b;        // (b_rows x d) centred particles: the columns (== a for svgd_step and the median)
  const T* a_norms;  // |a_i|^2, |b_j|^2
  const T* b_norms;
  long long a_rows, b_rows, d;
  const T* bandwidth;  // H, a device scalar
  bool self;           // a and b are the same particles: K_ii = 1 exactly
  // kSvgd: w = score - (2/H) xc (b_rows x d); out (a_rows x d) and rowsum (a_rows)
  const T* w;
  T* out;
  T* rowsum;
  // kRbf: kernel (a_rows x b_rows)
  Out* kernel;
  // kMedian
  RadixPass pass;
  const RadixState* state;
  unsigned long long* hist;  // 2 x kRadixBins
};

template <typename T, typename Out, TileMode kMode>
BMT_GLOBAL void BMT_LAUNCH_BOUNDS(256, 1) ffma_tile_kernel(const FfmaParams<T, Out> p) {
  using G = FfmaGeometry<T>;
  BMT_DYNAMIC_SHARED(smem);
  T* sa = reinterpret_cast<T*>(smem);
  T* sb = sa + 2 * G::kSlice;
  T* sk = sb + 2 * G::kSlice;       // kSvgd: K tile, transposed [j][i]
  T* sw = sk + G::kCols * G::kLd;   // kSvgd: W tile [j][feature]
  unsigned* hist = reinterpret_cast<unsigned*>(sk);  // kMedian

  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const long long i0 = static_cast<long long>(blockIdx.x) * G::kRows;
  const long long f0 = static_cast<long long>(blockIdx.y) * G::kFeatures;
  const T inv_h = kMode == TileMode::kMedian ? T(0) : inverse_bandwidth(*p.bandwidth);

  T norm_i[4];
  for (int r = 0; r < 4; ++r) {
    const long long i = i0 + 4 * ty + r;
    norm_i[r] = i < p.a_rows ? p.a_norms[i] : T(0);
  }
  T o[4][4 * G::kFeatureGroups] = {};
  T rs[4] = {};
  unsigned long long prefix[2] = {0, 0};
  bool same_prefix = true;
  if constexpr (kMode == TileMode::kMedian) {
    prefix[0] = p.state->prefix[0];
    prefix[1] = p.state->prefix[1];
    same_prefix = prefix[0] == prefix[1];
    zero_histogram(hist);  // visible to all after the first barrier of ffma_dot_tile
  }

  const RowLoader<T> rows_i{p.a, p.a_rows, p.d, i0};
  // The median counts each pair i < j once (weight 2): column blocks left of the diagonal are skipped.
  const long long j_begin = kMode == TileMode::kMedian ? i0 / G::kCols * G::kCols : 0;
  for (long long j0 = j_begin; j0 < p.b_rows; j0 += G::kCols) {
    T s[4][4];
    ffma_dot_tile(s, 0, p.d, sa, sb, rows_i, RowLoader<T>{p.b, p.b_rows, p.d, j0});

    T kv[4][4];
    for (int c = 0; c < 4; ++c) {
      const long long j = j0 + 4 * tx + c;
      const T norm_j = j < p.b_rows ? p.b_norms[j] : T(0);
      for (int r = 0; r < 4; ++r) {
        const long long i = i0 + 4 * ty + r;
        const T dot = norm_i[r] + norm_j - T(2) * s[r][c];
        const T dist = dot < T(0) ? T(0) : dot;  // a NaN kept for K (NaN as a key: 0; H is NaN then)
        if constexpr (kMode == TileMode::kMedian) {
          if (i < p.a_rows && j < p.b_rows && j > i)
            radix_count(hist, key_of(dist > T(0) ? dist : T(0)), p.pass, prefix, same_prefix, 2u);
        } else {
          T k = exp_of(-dist * inv_h);
          // K_ii = 1 exactly (NaN for an invalid H, as the reference's exp(-0 / H)); svgd_step leaves it out
          // (0, or NaN): finish_phi adds score_i
          if (p.self && i == j) k = exp_of(T(0) * inv_h) - (kMode == TileMode::kSvgd ? T(1) : T(0));
          kv[r][c] = j < p.b_rows ? k : T(0);
        }
      }
    }
    if constexpr (kMode == TileMode::kRbf) {
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) {
          const long long i = i0 + 4 * ty + r, j = j0 + 4 * tx + c;
          if (i < p.a_rows && j < p.b_rows) p.kernel[i * p.b_rows + j] = Store<Out>::from(kv[r][c]);
        }
    }
    if constexpr (kMode == TileMode::kSvgd) {
      for (int c = 0; c < 4; ++c) {
        T column[4];
        for (int r = 0; r < 4; ++r) {
          rs[r] += kv[r][c];
          column[r] = kv[r][c];
        }
        store4(sk + (4 * tx + c) * G::kLd + 4 * ty, column);
      }
      // W rows j0 .. j0 + 63, features f0 .. f0 + kFeatures - 1 (zero outside)
      for (int idx = tid; idx < G::kCols * G::kFeatures; idx += G::kThreads) {
        const int jl = idx / G::kFeatures, fl = idx % G::kFeatures;
        const long long j = j0 + jl, f = f0 + fl;
        sw[jl * G::kLdW + fl] = j < p.b_rows && f < p.d ? p.w[j * p.d + f] : T(0);
      }
      __syncthreads();
#pragma unroll 4
      for (int jl = 0; jl < G::kCols; ++jl) {
        T a[4];
        load4(sk + jl * G::kLd + 4 * ty, a);
#pragma unroll
        for (int q = 0; q < G::kFeatureGroups; ++q) {
          T b[4];
          load4(sw + jl * G::kLdW + 64 * q + 4 * tx, b);
#pragma unroll
          for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int c = 0; c < 4; ++c) o[r][4 * q + c] += a[r] * b[c];
        }
      }
      __syncthreads();  // sk / sw are rewritten by the next column block
    }
  }

  if constexpr (kMode == TileMode::kSvgd) {
    for (int r = 0; r < 4; ++r) {
      const long long i = i0 + 4 * ty + r;
      for (int q = 0; q < G::kFeatureGroups; ++q)
        for (int c = 0; c < 4; ++c) {
          const long long f = f0 + 64 * q + 4 * tx + c;
          if (i < p.a_rows && f < p.d) p.out[i * p.d + f] = o[r][4 * q + c];
        }
    }
    if (blockIdx.y == 0) {
      for (int r = 0; r < 4; ++r) {
        T sum = rs[r];
        for (int m = 8; m >= 1; m /= 2) sum += shfl_xor(sum, m);  // the 16 lanes of one ty
        const long long i = i0 + 4 * ty + r;
        if (tx == 0 && i < p.a_rows) p.rowsum[i] = sum;
      }
    }
  }
  if constexpr (kMode == TileMode::kMedian) {
    __syncthreads();
    flush_histogram(hist, p.hist);
  }
}


// ---- many features (fp32 / fp64): row blocks through cuBLAS ----------------------------------------
// The svgd kernel above keeps 64 rows x kFeatures outputs per CTA, so with d features it recomputes each
// distance tile ceil(d / kFeatures) times: its distance work grows as n^2 d^2 / kFeatures. Beyond a few
// feature chunks the step instead takes a block of rows I at a time: S = xc_I xc^T by cuBLAS into a
// (rows x n) workspace, this kernel turns S into K in place (and its row sums), and cuBLAS applies K to W.

template <typename C>
struct RbfBlockParams {
  C* s;               // (rows x n), row-major: the dots xc_I xc^T on entry, K on exit
  C* rowsum;          // (rows): sum_j K[i, j]
  const C* norms;     // (n) squared norms of the centred rows
  long long rows, n;  // this block's rows, and all n columns
  long long row0;     // the block's first row: K[i, row0 + i] is a self pair, distance exactly 0
  const C* bandwidth;
};

// One CTA per row: K = exp(-max(D, 0) / H) with D = |xc_i|^2 + |xc_j|^2 - 2 S, then the row's sum.
template <typename C>
BMT_GLOBAL void BMT_LAUNCH_BOUNDS(256, 4) rbf_block_kernel(const RbfBlockParams<C> p) {
  __shared__ C warp_sums[256 / kWarp];
  const C inv_h = inverse_bandwidth(*p.bandwidth);
  const long long i = blockIdx.x;  // row within the block
  const C norm_i = p.norms[p.row0 + i];
  C* row = p.s + i * p.n;
  C sum = C(0);
  for (long long j = threadIdx.x; j < p.n; j += blockDim.x) {
    const C dist = norm_i + p.norms[j] - C(2) * row[j];
    // exp(-0 * inv_h) is exactly 1 for the self pair, and NaN for an invalid H as everywhere else; the own
    // term is left out (0 or NaN): finish_phi adds score_i
    const C k = exp_of(-(p.row0 + i == j || dist < C(0) ? C(0) : dist) * inv_h) - (p.row0 + i == j ? C(1) : C(0));
    row[j] = k;
    sum += k;
  }
  for (int m = 16; m >= 1; m /= 2) sum += shfl_xor(sum, m);
  if (lane_id() == 0) warp_sums[threadIdx.x / kWarp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    C total = C(0);
    for (int w = 0; w < static_cast<int>(blockDim.x) / kWarp; ++w) total += warp_sums[w];
    p.rowsum[i] = total;
  }
}

}  // namespace bmt_fast::cuda
