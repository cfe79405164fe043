// Many particles with few features: the fused step.
// One part of the CPU kernels of an ISA build: kernels_impl.h includes it (outside any namespace) after
// the parts it names before it, once per build (kernels_{base,v3,v4}.cpp); not a header of its own.

namespace bmt_fast::cpu::BMT_FAST_ISA {
namespace {

// ---- many-particle regime with few features: the fused step -----------------------------------------
//
// For a block of kFusedRows rows and kFusedVectors vectors of columns at a time: the dot products by FMAs
// in registers (xc's rows broadcast, the packed transposed columns loaded), K's entries from them in the
// same registers, and K times W added into the rows' sums, without a tile of dot products in memory. Up to
// kFusedLaneMaxFeatures features W is packed as xc's columns are (transposed) and each row keeps one sum
// vector per feature, whose lanes are added at the end (K never leaves the registers); with more, K's block
// goes through L1 and W's rows (row-major, dw columns) are added into the rows' sums a vector of features
// at a time.
constexpr int kFusedVectors = kVectorBytes == 64 ? 4 : 2;  // 16 of the 32 zmm; 8 of the 16 ymm / xmm
constexpr int64_t kFusedGroupRows = 16;  // rows that take each block of columns in turn (from L1)

// s[r][v] = xc_{r0 + r} . xc_{j} for the kFusedVectors vectors of columns j from j0 (xt: packed blocks).
template <typename T>
BMT_FAST_INLINE void fused_dots(const T* const* rows, const T* xt_block, int64_t d,
                                vec_t<T> (&s)[kFusedRows][kFusedVectors]) {
  constexpr int L = kLanes<T>;
  for (int r = 0; r < kFusedRows; ++r)
    for (int v = 0; v < kFusedVectors; ++v) s[r][v] = vec_t<T>{};
  for (int64_t k = 0; k < d; ++k) {
    const T* col = xt_block + k * kFusedPack;
    vec_t<T> b[kFusedVectors];
    for (int v = 0; v < kFusedVectors; ++v) b[v] = in_register(load(col + v * L));
    for (int r = 0; r < kFusedRows; ++r) {
      const vec_t<T> a = broadcast(rows[r][k]);
      for (int v = 0; v < kFusedVectors; ++v) s[r][v] += a * b[v];
    }
  }
}

// In place: s[r][v] -> K's entry (0 for a row's own column, and for padded rows and columns, whose norms
// are +inf); each row's entries added into its row-sum vector rs[r].
template <typename T>
BMT_FAST_INLINE void fused_kernel_entries(vec_t<T> (&s)[kFusedRows][kFusedVectors], const T* nr, const T* nc,
                                          T neg_inv_h, int64_t own_begin, T* const* rs) {
  constexpr int L = kLanes<T>;
  for (int r = 0; r < kFusedRows; ++r) {
    const vec_t<T> na = broadcast(nr[r]);
    vec_t<T> sum = load(rs[r]);
    for (int v = 0; v < kFusedVectors; ++v) {
      const vec_t<T> dist = clamp_distance<T>(na + load(nc + v * L) - T(2) * s[r][v]);
      s[r][v] = exp_nonpositive<T>(dist * neg_inv_h);
    }
    const int64_t own = own_begin + r;  // the row's own column, relative to the block's first
    if (own >= 0 && own < kFusedVectors * L) s[r][own / L][own % L] = T(0);
    for (int v = 0; v < kFusedVectors; ++v) sum += s[r][v];
    store(rs[r], sum);
  }
}

// acc[o][k..] += sum_q kv(o, q) w[q][k..] for kFusedRows outputs o, q over [0, count), and DV vectors of
// features from k, with kv(o, q) = kmat[o out_stride + q in_stride]: the row side (o a row of the K block
// kb, q its columns) and the symmetric form's column side (o a column, q the rows). Each load of W feeds
// kFusedRows outputs.
template <int DV, typename T>
BMT_FAST_INLINE void fused_add_kw(const T* kmat, int64_t out_stride, int64_t in_stride, int64_t count, const T* w,
                                  int64_t dw, int64_t k, T* const* acc) {
  constexpr int L = kLanes<T>;
  vec_t<T> o[kFusedRows][DV];
  for (int r = 0; r < kFusedRows; ++r)
    for (int v = 0; v < DV; ++v) o[r][v] = load(acc[r] + k + v * L);
  for (int64_t q = 0; q < count; ++q) {
    vec_t<T> wv[DV];
    for (int v = 0; v < DV; ++v) wv[v] = in_register(load(w + q * dw + k + v * L));
    for (int r = 0; r < kFusedRows; ++r) {
      const vec_t<T> kv = broadcast(kmat[r * out_stride + q * in_stride]);
      for (int v = 0; v < DV; ++v) o[r][v] += kv * wv[v];
    }
  }
  for (int r = 0; r < kFusedRows; ++r)
    for (int v = 0; v < DV; ++v) store(acc[r] + k + v * L, o[r][v]);
}

// Rows [r0, r0 + kFusedRows) (those past row_end: padding) against the C columns from j0: their K block and
// K times W added into their sums in scratch (rows from row_begin, `stride` values each: the row-sum vector,
// then per-lane sums of each feature up to kFusedLaneMaxFeatures features, else dw sums; kb: room for the
// K block).
template <typename T>
BMT_FAST_INLINE void fused_block(const T* xc, const T* xt, const T* w, const T* norms, int64_t d, int64_t dw,
                                 T neg_inv_h, int64_t row_begin, int64_t row_end, int64_t r0, int64_t j0, T* scratch,
                                 int64_t stride, T* kb, T* colacc = nullptr, int64_t col_base = 0) {
  constexpr int L = kLanes<T>, C = kFusedVectors * L;
  const T* xr[kFusedRows];
  T nr[kFusedRows];
  T* rs[kFusedRows];
  T* acc[kFusedRows];
  for (int r = 0; r < kFusedRows; ++r) {
    const bool real = r0 + r < row_end;
    xr[r] = xc + (real ? r0 + r : row_begin) * d;
    nr[r] = real ? norms[r0 + r] : std::numeric_limits<T>::infinity();
    T* row = scratch + (r0 - row_begin + r) * stride;
    rs[r] = row;
    acc[r] = row + L;
  }
  const int64_t block = j0 / kFusedPack * kFusedPack;
  const T* xt_block = xt + block * d + (j0 - block);
  vec_t<T> s[kFusedRows][kFusedVectors];
  fused_dots<T>(xr, xt_block, d, s);
  fused_kernel_entries<T>(s, nr, norms + j0, neg_inv_h, r0 - j0, rs);
  if (d <= kFusedLaneMaxFeatures) {  // W packed as xt: each row's sum vector of feature k += its K vector times W's
    const T* w_block = w + block * d + (j0 - block);
    for (int64_t k = 0; k < d; ++k) {
      vec_t<T> wv[kFusedVectors];
      for (int v = 0; v < kFusedVectors; ++v) wv[v] = load(w_block + k * kFusedPack + v * L);
      for (int r = 0; r < kFusedRows; ++r) {
        vec_t<T> t = load(acc[r] + k * L);
        for (int v = 0; v < kFusedVectors; ++v) t += s[r][v] * wv[v];
        store(acc[r] + k * L, t);
      }
    }
    if (colacc) {  // the symmetric form's column side: the columns' sums += K^T W of these rows
      T* cb = colacc + (block - col_base) * (d + 1) + (j0 - block);  // (colacc's blocks from column col_base)
      const T* wr = w + r0 / kFusedPack * kFusedPack * d + r0 % kFusedPack;  // W of row r0 + r, feature k: wr[k 64 + r]
      for (int64_t k = 0; k < d; ++k) {
        vec_t<T> wk[kFusedRows];
        for (int r = 0; r < kFusedRows; ++r) wk[r] = broadcast(wr[k * kFusedPack + r]);
        for (int v = 0; v < kFusedVectors; ++v) {
          vec_t<T> t = load(cb + k * kFusedPack + v * L);
          for (int r = 0; r < kFusedRows; ++r) t += s[r][v] * wk[r];
          store(cb + k * kFusedPack + v * L, t);
        }
      }
      for (int v = 0; v < kFusedVectors; ++v) {
        vec_t<T> t = load(cb + d * kFusedPack + v * L);
        for (int r = 0; r < kFusedRows; ++r) t += s[r][v];
        store(cb + d * kFusedPack + v * L, t);
      }
    }
  } else {
    for (int r = 0; r < kFusedRows; ++r)
      for (int v = 0; v < kFusedVectors; ++v) store(kb + r * C + v * L, s[r][v]);
    const T* wj = w + j0 * dw;
    int64_t k = 0;
    for (; k + 4 * L <= dw; k += 4 * L) fused_add_kw<4, T>(kb, C, 1, C, wj, dw, k, acc);
    for (; k < dw; k += L) fused_add_kw<1, T>(kb, C, 1, C, wj, dw, k, acc);
  }
}

// The centre (kernels.h: fused_step_shift): row 0 plus the mean of the differences from it, summed in double.
template <typename T>
BMT_FAST_INLINE void fused_step_shift_impl(const T* x, int64_t n, int64_t d, double* sums, T* shift) {
  fill(sums, d, 0.0);
  for (int64_t i = 1; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) sums[k] += static_cast<double>(x[i * d + k] - x[k]);
  for (int64_t k = 0; k < d; ++k) shift[k] = x[k] + static_cast<T>(sums[k] / static_cast<double>(n));
}

// The operands of blocks [block_begin, block_end) of kFusedPack rows (kernels.h: fused_step_pack).
template <typename T>
BMT_FAST_INLINE void fused_step_pack_impl(const T* x, const T* score, int64_t n, int64_t d, const T* shift, T a,
                                          int64_t block_begin, int64_t block_end, T* xc, T* norms, T* xt, T* w) {
  const bool lanes = d <= kFusedLaneMaxFeatures;
  const int64_t dw = round_up(d, kFusedWidth);
  for (int64_t b = block_begin; b < block_end; ++b) {
    T* xt_block = xt + b * d * kFusedPack;
    T* w_block = score ? w + b * d * kFusedPack : nullptr;
    for (int64_t c = 0; c < kFusedPack; ++c) {
      const int64_t i = b * kFusedPack + c;
      if (i >= n) {  // padding: columns that give K = 0 and add nothing
        if (!score) {
          norms[i] = std::numeric_limits<T>::infinity();
          for (int64_t k = 0; k < d; ++k) xt_block[k * kFusedPack + c] = T(0);
        } else if (lanes) {
          for (int64_t k = 0; k < d; ++k) w_block[k * kFusedPack + c] = T(0);
        } else {
          fill(w + i * dw, dw, T(0));
        }
        continue;
      }
      if (!score) {
        // The norm summed in double (fp32 products exact there) and rounded once. It enters every distance of
        // row i alike, so its error does not average out over the row as the dot products' do: summed in fp32
        // one term after another it had moved phi by norm_error / H of itself (two clusters 0.05 wide, centres
        // N(0, 10^2) per feature, 1000 x 128, H from the distances within a cluster: 3.6-5.1e-3 of max |phi|,
        // the GEMM tiles' 0.9-1.6e-3 with torch's sum of the norms; now 0.8-1.1e-3). (fp64: as before.)
        double norm = 0;
        for (int64_t k = 0; k < d; ++k) {
          const T v = x[i * d + k] - shift[k];
          xc[i * d + k] = v;
          norm += static_cast<double>(v) * static_cast<double>(v);
          xt_block[k * kFusedPack + c] = v;
        }
        norms[i] = static_cast<T>(norm);
        continue;
      }
      for (int64_t k = 0; k < d; ++k) {
        const T wv = score[i * d + k] - a * xc[i * d + k];
        if (lanes) w_block[k * kFusedPack + c] = wv;
        else w[i * dw + k] = wv;
      }
      if (!lanes) fill(w + i * dw + d, dw - d, T(0));
    }
  }
}

// The rows r0.. (kFusedRows of them; those from row_end on read row_begin's values) of xc, for fused_dots.
template <typename T>
BMT_FAST_INLINE void fused_row_pointers(const T* xc, int64_t d, int64_t r0, int64_t row_begin, int64_t row_end,
                                        const T* (&rows)[kFusedRows]) {
  for (int r = 0; r < kFusedRows; ++r) rows[r] = xc + (r0 + r < row_end ? r0 + r : row_begin) * d;
}

// out[(i - row_begin) ld + (j - col_begin)] = xc_i . xc_j for rows [row_begin, row_end) and columns [col_begin,
// col_begin + cols) (col_begin a multiple of kFusedPack), by fused_dots: the same value for a pair as the fused
// window pass computes (kernels.h: fused_dot_rows).
template <typename T>
BMT_FAST_INLINE void fused_dot_rows_impl(const T* xc, const T* xt, int64_t d, int64_t row_begin, int64_t row_end,
                                         int64_t col_begin, int64_t cols, T* out, int64_t ld) {
  constexpr int L = kLanes<T>, C = kFusedVectors * L;
  alignas(64) T block_out[kFusedRows][C];
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kFusedRows) {
    const T* rows[kFusedRows];
    fused_row_pointers(xc, d, r0, row_begin, row_end, rows);
    for (int64_t j0 = col_begin; j0 < col_begin + cols; j0 += C) {
      const int64_t block = j0 / kFusedPack * kFusedPack;
      vec_t<T> s[kFusedRows][kFusedVectors];
      fused_dots<T>(rows, xt + block * d + (j0 - block), d, s);
      for (int r = 0; r < kFusedRows; ++r)
        for (int v = 0; v < kFusedVectors; ++v) store(block_out[r] + v * L, s[r][v]);
      const int64_t width = min64(C, col_begin + cols - j0);
      for (int r = 0; r < kFusedRows && r0 + r < row_end; ++r)
        std::memcpy(out + (r0 + r - row_begin) * ld + (j0 - col_begin), block_out[r],
                    static_cast<size_t>(width) * sizeof(T));
    }
  }
}

// The median's window pass without tiles (kernels.h: fused_window_rows): for rows [row_begin, row_end) and
// the columns j > i of [col_begin, col_end) below n, the squared distances as window_collect computes them
// from fused_dots' dot products; those below lo counted into *below, those in [lo, hi] written to out.
// Returns how many it wrote.
template <typename T>
BMT_FAST_INLINE int64_t fused_window_rows_impl(const T* xc, const T* xt, const T* norms, int64_t n, int64_t d, T lo,
                                               T hi, int64_t row_begin, int64_t row_end, int64_t col_begin,
                                               int64_t col_end, int64_t* below, T* out) {
  constexpr int L = kLanes<T>, C = kFusedVectors * L;
  using Mask = decltype(vec_t<T>{} < vec_t<T>{});
  using Lane = typename std::remove_reference<decltype(Mask{}[0])>::type;
  const vec_t<T> lo_v = broadcast(lo), hi_v = broadcast(hi);
  const int64_t last = min64(col_end, round_up(n, kFusedPack));
  Mask lane_index;  // 0, 1, ..., L - 1
  for (int q = 0; q < L; ++q) lane_index[q] = static_cast<Lane>(q);
  int64_t written = 0;
  Mask under_v{};
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kFusedRows) {
    const T* rows[kFusedRows];
    fused_row_pointers(xc, d, r0, row_begin, row_end, rows);
    // from the block holding column r0 + 1 or before (col_begin is a multiple of C: kFusedPack is)
    for (int64_t j0 = std::max(col_begin, r0 / C * C); j0 < last; j0 += C) {
      const int64_t block = j0 / kFusedPack * kFusedPack;
      vec_t<T> s[kFusedRows][kFusedVectors];
      fused_dots<T>(rows, xt + block * d + (j0 - block), d, s);
      // Columns j with i < j < n count: all of the block's but near the diagonal and past n.
      const bool edge = j0 <= r0 + kFusedRows - 1 || j0 + C > n;
      for (int r = 0; r < kFusedRows; ++r) {
        const int64_t i = r0 + r;
        if (i >= row_end) break;
        const vec_t<T> na = broadcast(norms[i]);
        for (int v = 0; v < kFusedVectors; ++v) {
          const vec_t<T> dist = clamp_nonnegative<T>(na + load(norms + j0 + v * L) - T(2) * s[r][v]);
          Mask valid = ~Mask{};
          if (edge) {  // lane q is column j0 + v L + q
            const int64_t first = j0 + v * L;
            valid = (lane_index > static_cast<Lane>(i - first)) & (lane_index < static_cast<Lane>(n - first));
          }
          window_vector<T>(dist, lo_v, hi_v, valid, under_v, out, written);
        }
      }
    }
  }
  int64_t under = 0;
  for (int q = 0; q < L; ++q) under += under_v[q];
  *below += under;
  return written;
}

// phi_i = (sum_j k_ij W_j + a rowsum_i xc_i + score_i) / n for rows [row_begin, row_end) (the own term k_ii = 1 as
// score_i = W_i + a xc_i) from `parts` sets of sums: part p's row i at rowacc + p part_elems + (i - row_base)
// stride (as fused_block keeps them) and, where colacc is not null (the symmetric form's per-lane sums), its
// column side at colacc + p n_pad (d + 1) (as fused_block adds it). Returns whether phi is all finite.
template <typename T>
BMT_FAST_INLINE bool fused_finish_rows(const T* rowacc, int64_t part_elems, int64_t row_base, const T* colacc,
                                       int64_t parts, const T* xc, const T* score, int64_t n, int64_t d, T a,
                                       int64_t row_begin, int64_t row_end, T* phi) {
  constexpr int L = kLanes<T>;
  const bool lanes = d <= kFusedLaneMaxFeatures;
  const int64_t stride = L + (lanes ? d * L : round_up(d, kFusedWidth));
  const int64_t n_pad = round_up(n, kFusedPack);
  T bad = 0;
  for (int64_t i = row_begin; i < row_end; ++i) {
    const T* col = colacc ? colacc + i / kFusedPack * (d + 1) * kFusedPack + i % kFusedPack : nullptr;
    T rowsum = 0;
    for (int64_t p = 0; p < parts; ++p) {
      rowsum += horizontal_sum<T>(load(rowacc + p * part_elems + (i - row_base) * stride));
      if (col) rowsum += col[p * n_pad * (d + 1) + d * kFusedPack];
    }
    const T ar = a * rowsum;
    const T* xi = xc + i * d;
    const T* si = score + i * d;
    T* out = phi + i * d;
    for (int64_t k = 0; k < d; ++k) {
      T kw = 0;
      for (int64_t p = 0; p < parts; ++p) {
        const T* row = rowacc + p * part_elems + (i - row_base) * stride;
        kw += lanes ? horizontal_sum<T>(load(row + L + k * L)) : row[L + k];
        if (col) kw += col[p * n_pad * (d + 1) + k * kFusedPack];
      }
      const T v = (kw + ar * xi[k] + si[k]) / static_cast<T>(n);
      out[k] = v;
      bad += v - v;  // NaN for a NaN or an infinity
    }
  }
  return bad == T(0);
}

// The symmetric form (kernels.h: fused_step_pair): rows [i_begin, i_end) against columns [j_begin, j_end), K
// once per pair and both sides added into this thread's sums.
template <typename T>
BMT_FAST_INLINE void fused_step_pair_impl(const T* xc, const T* xt, const T* w, const T* norms, int64_t n, int64_t d,
                                          T inv_h, int64_t i_begin, int64_t i_end, int64_t j_begin, int64_t j_end,
                                          T* rowacc, T* colacc, T* scratch) {
  constexpr int L = kLanes<T>, C = kFusedVectors * L;
  const bool lanes = d <= kFusedLaneMaxFeatures, diagonal = i_begin == j_begin;
  const int64_t dw = round_up(d, kFusedWidth), stride = L + (lanes ? d * L : dw);
  const int64_t row_end = min64(i_end, n);
  // The pair's sums first in scratch (its rows', then its columns'), added into the thread's once at the end:
  // each of those then takes one addition per block pair instead of one per row block of 4 (fp32: the
  // symmetric form's error at 4096 x 3 was 6x the GEMM tiles').
  T* rows_sums = scratch;
  T* cols_sums = scratch + (i_end - i_begin) * stride;
  const int64_t cols_size = lanes ? (j_end - j_begin) * (d + 1) : (j_end - j_begin) * stride;
  std::memset(rows_sums, 0, static_cast<size_t>((i_end - i_begin) * stride) * sizeof(T));
  if (!diagonal) std::memset(cols_sums, 0, static_cast<size_t>(cols_size) * sizeof(T));
  alignas(64) T kb[kFusedGroupRows * C];
  for (int64_t g0 = i_begin; g0 < row_end; g0 += kFusedGroupRows) {
    const int64_t g1 = min64(row_end, g0 + kFusedGroupRows), rows = round_up(g1 - g0, kFusedRows);
    for (int64_t j0 = j_begin; j0 < j_end; j0 += C) {
      for (int64_t r0 = g0; r0 < g1; r0 += kFusedRows)
        fused_block<T>(xc, xt, w, norms, d, dw, -inv_h, i_begin, row_end, r0, j0, rows_sums, stride,
                       kb + (r0 - g0) * C, !diagonal && lanes ? cols_sums : nullptr, j_begin);
      if (diagonal || lanes) continue;
      // The columns' sums += K^T W of the group's rows (kb: their K rows), kFusedRows columns at a time.
      const T* wg = w + g0 * dw;
      for (int c0 = 0; c0 < C; c0 += kFusedRows) {
        T* acc[kFusedRows];
        for (int c = 0; c < kFusedRows; ++c) {
          T* row = cols_sums + (j0 - j_begin + c0 + c) * stride;
          T sum = 0;
          for (int64_t r = 0; r < rows; ++r) sum += kb[r * C + c0 + c];
          row[0] += sum;
          acc[c] = row + L;
        }
        int64_t k = 0;
        for (; k + 4 * L <= dw; k += 4 * L) fused_add_kw<4, T>(kb + c0, 1, C, rows, wg, dw, k, acc);
        for (; k < dw; k += L) fused_add_kw<1, T>(kb + c0, 1, C, rows, wg, dw, k, acc);
      }
    }
  }
  auto add = [](T* to, const T* from, int64_t count) BMT_FAST_INLINE_LAMBDA {  // (count: whole vectors)
    for (int64_t e = 0; e < count; e += L) store(to + e, load(to + e) + load(from + e));
  };
  add(rowacc + i_begin * stride, rows_sums, (i_end - i_begin) * stride);
  if (!diagonal) add(lanes ? colacc + j_begin * (d + 1) : rowacc + j_begin * stride, cols_sums, cols_size);
}

template <typename T>
BMT_FAST_INLINE bool fused_step_rows_impl(const T* xc, const T* xt, const T* w, const T* norms, const T* score,
                                          int64_t n, int64_t d, T inv_h, T a, int64_t row_begin, int64_t row_end,
                                          T* scratch, T* phi) {
  constexpr int L = kLanes<T>, C = kFusedVectors * L;
  static_assert(kFusedPack % C == 0, "a packed block holds whole column blocks");
  const bool lanes = d <= kFusedLaneMaxFeatures;
  const int64_t n_pad = round_up(n, kFusedPack), dw = round_up(d, kFusedWidth);
  // Per row: its row-sum vector, then its sums (lanes: one vector per feature; else dw values).
  const int64_t stride = L + (lanes ? d * L : dw);
  const int64_t rows = round_up(row_end - row_begin, kFusedRows);
  fill(scratch, rows * stride, T(0));
  alignas(64) T kb[kFusedRows * C];
  const T neg_inv_h = -inv_h;
  // Column chunks whose packed xc and W (2 d values per column) take about kFusedChunkBytes, from L2 for
  // every group of kFusedGroupRows rows, and each block of C columns from L1 for the group's rows.
  const int64_t chunk =
      round_up(kFusedChunkBytes / static_cast<int64_t>(2 * sizeof(T)) / (d > 0 ? d : 1), kFusedPack);
  for (int64_t c0 = 0; c0 < n_pad; c0 += chunk) {
    const int64_t c1 = min64(n_pad, c0 + chunk);
    for (int64_t g0 = row_begin; g0 < row_end; g0 += kFusedGroupRows) {
      const int64_t g1 = min64(row_end, g0 + kFusedGroupRows);
      for (int64_t j0 = c0; j0 < c1; j0 += C)
        for (int64_t r0 = g0; r0 < g1; r0 += kFusedRows)
          fused_block<T>(xc, xt, w, norms, d, dw, neg_inv_h, row_begin, row_end, r0, j0, scratch, stride, kb);
    }
  }
  return fused_finish_rows<T>(scratch, 0, row_begin, nullptr, 1, xc, score, n, d, a, row_begin, row_end, phi);
}

}  // namespace
}  // namespace bmt_fast::cpu::BMT_FAST_ISA
