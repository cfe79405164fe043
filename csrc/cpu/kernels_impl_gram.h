// Few particles, huge d: the Gram pass and the apply pass.
// One part of the CPU kernels of an ISA build: kernels_impl.h includes it (outside any namespace) after
// the parts it names before it, once per build (kernels_{base,v3,v4}.cpp); not a header of its own.

namespace bmt_fast::cpu::BMT_FAST_ISA {
namespace {

// ---- few particles, huge d: the Gram pass (gram_columns) and the apply pass (apply_columns) ---------
//
// Columns are shifted by particle 0 (x_j - x_0) on the fly: SVGD is translation invariant, identical
// particles give exact zeros, and a cloud far from the origin loses nothing (the difference of two
// nearby floats is exact). No shifted copy of x is ever stored beyond one L1-sized chunk. The Gram pass
// also writes each column's mean (d numbers), the centre the apply pass shifts by.

// dst[0, len) = src - first for one row chunk, zero up to the next full vector.
template <typename In, typename T>
BMT_FAST_INLINE void shifted_row(const In* src, const In* first, int64_t len, T* dst) {
  constexpr int L = kLanes<T>;
  int64_t k = 0;
  for (; k + L <= len; k += L) store(dst + k, load_as<T>(src + k) - load_as<T>(first + k));
  if (k < len) store(dst + k, load_part_as<T>(src + k, len - k) - load_part_as<T>(first + k, len - k));
}

// Asks for the next chunk of a row while this one is processed: rows are read in short segments, too
// short for the hardware prefetcher to ramp up on its own.
template <typename In>
BMT_FAST_INLINE void prefetch_next_chunk(const In* src, int64_t chunk, int64_t remaining) {
  prefetch_lines<3>(src + chunk, min64(chunk, remaining));
}

// Row i of the Gram pass's inputs: rows i < nx are rows of x, the others rows i - nx of y (a second set, for
// rbf_kernel(x, y)).
template <typename In>
BMT_FAST_INLINE const In* gram_row(const In* x, const In* y, int64_t nx, int64_t d, int64_t i) {
  return i < nx ? x + i * d : y + (i - nx) * d;
}

// buf (n - 1 rows, row stride ld) <- columns [k0, k0 + len) of rows 1 .. n-1 shifted by particle 0 (x_0):
// exact zeros for identical particles, nothing lost far from the origin (row 0 itself would be all zeros).
template <typename In, typename T>
BMT_FAST_INLINE void shifted_chunk(const In* x, const In* y, int64_t nx, int64_t n, int64_t d, int64_t k0,
                                   int64_t len, int64_t ld, T* buf) {
  for (int64_t i = 1; i < n; ++i) shifted_row(gram_row(x, y, nx, d, i) + k0, x + k0, len, buf + (i - 1) * ld);
}

// The Gram pass's prefetch of a later chunk (columns [k0, k0 + len) of every row) into L2, a line per
// step(): the FMA loops over the current chunk call it as they go, two chunks ahead. Asked for all at once
// into L1 (n rows x len / 16 lines, one chunk ahead), the prefetches filled the line-fill buffers and held
// the core until memory had answered, with no work to overlap, and the copy into buf still stalled on its
// loads (~45 % of the pass at 16 x 409,600). 2-core Xeon, alternating, fp32 rbf_kernel 16 x 409,600
// ~1.05 -> ~0.84 ms, 16 x 76,800 0.215 -> 0.166 ms.
template <typename In>
struct GramPrefetch {
  static constexpr int64_t kLine = 64 / sizeof(In);
  const In *x, *y;
  int64_t nx, n, d, k0 = 0, lines = 0, row = 0, line = 0;
  const In* row_p = nullptr;

  void start(int64_t k_begin, int64_t len) {
    k0 = k_begin;
    lines = (len + kLine - 1) / kLine;
    line = 0;
    row = len > 0 ? 0 : n;
    if (row < n) row_p = gram_row(x, y, nx, d, 0) + k0;
  }
  BMT_FAST_INLINE void step() {
    if (row >= n) return;
    __builtin_prefetch(row_p + line * kLine, 0, 1);
    if (++line == lines) {
      line = 0;
      if (++row < n) row_p = gram_row(x, y, nx, d, row) + k0;
    }
  }
  void finish() {
    while (row < n) step();
  }
};

// Buffer rows are chunk + kRowPad elements apart so that consecutive rows do not share their low 12
// address bits with each other or with the rows of x (whose stride is often a multiple of 4 KiB): such
// "4K aliasing" makes loads wait for unrelated stores.
template <typename T>
constexpr int64_t kRowPad = 64 / sizeof(T) * 3;

// Flush the fp32 vector partial sums of the Gram into double this often (in chunks): each lane then adds
// at most kGramFlush * chunk / lanes products in fp32 before the double accumulation.
constexpr int64_t kGramFlush = 8;

#ifdef BMT_FAST_32_VECTOR_REGISTERS
constexpr int kGramCols = 4;
#else
constexpr int kGramCols = 2;
#endif

// v, held in a register from here on: GCC otherwise folds the load of a value that several FMAs use into
// each of them (a load per FMA, where the loads then bound the loop).
template <typename V>
BMT_FAST_INLINE V in_register(V v) {
#if defined(__x86_64__) && defined(__GNUC__)
  __asm__("" : "+v"(v));
#endif
  return v;
}

// The Gram pass's register blocks: B x B dot products (8 loads feed 16 FMAs); a last block of fewer rows
// where n - 1 is not a multiple of B. Rows: those of the buffer (row b holds x_{b+1} - x_0).
constexpr int kGramBlock = 4;

// f(std::integral_constant<int, r>) for a block of r = 1 .. kGramBlock rows.
template <typename F>
BMT_FAST_INLINE void with_block_rows(int r, F&& f) {
  static_assert(kGramBlock == 4);
  if (r == 4) f(std::integral_constant<int, 4>{});
  else if (r == 3) f(std::integral_constant<int, 3>{});
  else if (r == 2) f(std::integral_constant<int, 2>{});
  else f(std::integral_constant<int, 1>{});
}

// Row 0, the shift, is exactly zero once shifted (x_0 - x_0): its products are all 0 and are not computed.
// The buffer holds rows 1 .. n-1 (row b + 1 in buffer row b), in blocks of kGramBlock and one last block of
// what is left: 120 products per column at n = 16 instead of the 136 with row 0, and one row less to copy.
// Each product and each column sum takes its terms in the same order as with row 0 (whose terms were +0 for
// finite x; with a NaN or Inf in x_0 every other row is non-finite too, and so are the results):
// the same bits. 2-core AMD EPYC VM (Zen 4), fp32: the pass alone, one thread, x in L3 (ms) 4 x 76,800
// 0.045 -> 0.038, 16 x 76,800 0.304 -> 0.275, 64 x 76,800 4.1 -> 3.9; median_bandwidth, two threads,
// alternating rounds: 16 x 76,800 0.31-0.36 -> 0.29-0.30, 16 x 409,600 1.35-1.43 -> 1.18-1.33,
// 64 x 76,800 2.28-2.33 -> 2.13-2.18.
template <typename In, typename T>
BMT_FAST_INLINE void gram_columns_impl(const In* x, const In* y, int64_t nx, int64_t n, int64_t d,
                                       int64_t col_begin, int64_t col_end, int64_t chunk, double* gram, T* shift,
                                       T* scratch) {
  constexpr int L = kLanes<T>;
  constexpr int B = kGramBlock;
  const int64_t m = n > 0 ? n - 1 : 0;  // buffer rows: x_1 .. x_{n-1} shifted by x_0
  const int64_t blocks = round_up(m, B) / B;
  const int64_t ld = chunk + kRowPad<T>;
  T* buf = scratch;                                   // round_up(m, B) x ld, shifted columns
  T* partial = buf + blocks * B * ld;                 // blocks^2 x B x B vectors
  T* colsum = partial + blocks * blocks * B * B * L;  // chunk: sum_i (x_i - x_0) of the chunk's columns
  for (int64_t ib = 0; ib < blocks; ++ib)  // the blocks jb >= ib that the passes below use
    fill(partial + (ib * blocks + ib) * B * B * L, (blocks - ib) * B * B * L, T(0));
  auto flush = [&] {
    for (int64_t ib = 0; ib < blocks; ++ib)
      for (int64_t jb = ib; jb < blocks; ++jb)
        for (int r = 0; r < B; ++r)
          for (int c = 0; c < B; ++c) {
            T* v = partial + (((ib * blocks + jb) * B + r) * B + c) * L;
            const int64_t i = ib * B + r + 1, j = jb * B + c + 1;
            if (j < n && i <= j) gram[i * n + j] += static_cast<double>(horizontal_sum<T>(load(v)));
            store(v, vec_t<T>{});
          }
  };
  const auto rows_of = [&](int64_t b) BMT_FAST_INLINE_LAMBDA { return static_cast<int>(min64(B, m - b * B)); };
  int64_t since_flush = 0;
  GramPrefetch<In> next{x, y, nx, n, d};
  next.start(col_begin, min64(2 * chunk, col_end - col_begin));
  next.finish();  // (the first chunks: nothing to overlap them with)
  for (int64_t k0 = col_begin; k0 < col_end; k0 += chunk) {
    const int64_t len = min64(chunk, col_end - k0);
    shifted_chunk(x, y, nx, n, d, k0, len, ld, buf);
    next.start(k0 + 2 * chunk, min64(chunk, col_end - k0 - 2 * chunk));
    const int64_t len_vec = round_up(len, L);
    for (int64_t ib = 0; ib < blocks; ++ib) {
      for (int64_t jb = ib; jb < blocks; ++jb) {
        T* out = partial + (ib * blocks + jb) * B * B * L;
        auto acc_at = [&](int r, int c) { return out + (r * B + c) * L; };
        const T* xi = buf + ib * B * ld;
        const T* xj = buf + jb * B * ld;
        if (ib == jb) {  // a diagonal block: the products r <= c only (10 FMAs from 4 loads, not 16 from 8)
          with_block_rows(rows_of(ib), [&](auto rows) BMT_FAST_INLINE_LAMBDA {
            constexpr int R = decltype(rows)::value;
            auto diagonal = [&](auto with_sums) BMT_FAST_INLINE_LAMBDA {
              vec_t<T> acc[R][R];
              for (int r = 0; r < R; ++r)
                for (int c = r; c < R; ++c) acc[r][c] = load(acc_at(r, c));
              for (int64_t k = 0; k < len_vec; k += L) {
                next.step();
                next.step();
                vec_t<T> vi[R];
                for (int r = 0; r < R; ++r) vi[r] = in_register(load(xi + r * ld + k));
                for (int r = 0; r < R; ++r)
                  for (int c = r; c < R; ++c) acc[r][c] += vi[r] * vi[c];
                if constexpr (decltype(with_sums)::value) {  // the column sums, rows in order, while loaded
                  vec_t<T> sum = ib == 0 ? vec_t<T>{} : load(colsum + k);
                  for (int r = 0; r < R; ++r) sum += vi[r];
                  store(colsum + k, sum);
                }
              }
              for (int r = 0; r < R; ++r)
                for (int c = r; c < R; ++c) store(acc_at(r, c), acc[r][c]);
            };
            if (shift) diagonal(std::true_type{});
            else diagonal(std::false_type{});
          });
        } else {
          // Up to kGramCols columns of the block at a time: all four with 32 vector registers; two with 16,
          // where 16 accumulators and 8 operands had spilled (operands reloaded for each FMA: two loads per
          // FMA), and 8 + 4 + 2 fit. Only the last block (jb) can have fewer than B rows.
          with_block_rows(rows_of(jb), [&](auto rows) BMT_FAST_INLINE_LAMBDA {
            constexpr int R = decltype(rows)::value;          // the block's columns
            constexpr int W = R < kGramCols ? R : kGramCols;  // at a time
            auto columns = [&](auto width, int c0) BMT_FAST_INLINE_LAMBDA {
              constexpr int C = decltype(width)::value;
              vec_t<T> acc[B][C];
              for (int r = 0; r < B; ++r)
                for (int c = 0; c < C; ++c) acc[r][c] = load(acc_at(r, c0 + c));
              for (int64_t k = 0; k < len_vec; k += L) {
                next.step();
                next.step();
                vec_t<T> vi[B], vj[C];
                for (int r = 0; r < B; ++r) vi[r] = in_register(load(xi + r * ld + k));
                for (int c = 0; c < C; ++c) vj[c] = in_register(load(xj + (c0 + c) * ld + k));
                for (int r = 0; r < B; ++r)
                  for (int c = 0; c < C; ++c) acc[r][c] += vi[r] * vj[c];
              }
              for (int r = 0; r < B; ++r)
                for (int c = 0; c < C; ++c) store(acc_at(r, c0 + c), acc[r][c]);
            };
            constexpr int kLast = R % W == 0 ? W : R % W;  // (3 columns two at a time: 2, then 1)
            for (int c0 = 0; c0 < R; c0 += W) {
              if (c0 + W <= R) columns(std::integral_constant<int, W>{}, c0);
              else columns(std::integral_constant<int, kLast>{}, c0);
            }
          });
        }
      }
    }
    if (shift) {  // shift[k0 + k] <- x_0 + mean_i (x_i - x_0): the centre of each column (exact nearby)
      const vec_t<T> inv_n = broadcast(T(T(1) / T(n)));
      for (int64_t k = 0; k < len; k += L) {
        const int64_t count = min64(L, len - k);
        const vec_t<T> sum = blocks > 0 ? load(colsum + k) : vec_t<T>{};  // (one particle: x_0 itself)
        store_as<T, T>(shift + k0 + k, load_part_as<T>(x + k0 + k, count) + sum * inv_n, count);
      }
    }
    next.finish();
    if (++since_flush == kGramFlush) {
      flush();
      since_flush = 0;
    }
  }
  flush();
}

// Row j of x and g at the vector of columns at k (count of them; all lanes when Full) into R sums: xc_j = x_j -
// s, w_j = g_j - a xc_j, acc[r] += kt[j R + r] w_j. Returns xc_j, and g_j in *gj when asked (a row's own terms,
// add_own_terms). The direct pass and its two halves take the same terms in the same order through these.
template <int R, bool Full, typename In, typename T>
BMT_FAST_INLINE vec_t<T> add_row(vec_t<T> (&acc)[R], const In* x, const In* g, int64_t d, int64_t k, int64_t count,
                                 int64_t j, const T* kt, vec_t<T> va, vec_t<T> s, vec_t<T>* gj) {
  const auto load_in = [&](const In* p) BMT_FAST_INLINE_LAMBDA {
    return Full ? load_as<T>(p) : load_part_as<T>(p, count);
  };
  const vec_t<T> xc = load_in(x + j * d + k) - s;
  const vec_t<T> gv = load_in(g + j * d + k);
  const vec_t<T> w = gv - va * xc;
  for (int r = 0; r < R; ++r) acc[r] += broadcast(T(kt[j * R + r])) * w;
  if (gj) *gj = gv;
  return xc;
}

// Row i's own terms c_i xc_i + g_i / n (own = 1/n) into its sum.
template <typename T>
BMT_FAST_INLINE void add_own_terms(vec_t<T>& acc, T c_i, vec_t<T> xc, vec_t<T> own, vec_t<T> gi) {
  acc += broadcast(c_i) * xc;
  acc += own * gi;
}

// One vector of columns (count of them; all lanes when Full) of R output rows ib..ib+R-1 (rows past n
// are computed from kt's zero padding and not stored):
//   phi_i = c_i xc_i + g_i / n + sum_{j != i} kn_ij (g_j - a xc_j),   xc = x - s,
// with R accumulators in registers, each x_j and g_j loaded straight from the input and w_j formed in
// a register: no centred copy is written. kt holds this block's K/n transposed (kt[j * R + r]), so the
// R broadcasts of one j come from one cache line; its diagonal is 0 and c_i = a sum_{j != i} kn_ij: a
// row's own term k_ii = 1 is g_i / n exactly. (Folded into w_i it was (g_i - a xc_i) / n + a xc_i / n,
// whose two large terms cancel when the other k_ij are small: an error of eps a |xc_i| / n.) own = 1/n.
template <int R, bool Full, typename In, typename T>
BMT_FAST_INLINE void apply_vector(const In* x, const In* g, In* phi, int64_t n, int64_t d, int64_t ib, int64_t k,
                                  int64_t count, const T* kt, const T* c, vec_t<T> va, vec_t<T> s, vec_t<T> own,
                                  vec_t<T>& bad) {
  auto load_in = [&](const In* p) { return Full ? load_as<T>(p) : load_part_as<T>(p, count); };
  vec_t<T> acc[R];
  auto step = [&](int64_t j, vec_t<T>* gj) BMT_FAST_INLINE_LAMBDA {
    return add_row<R, Full>(acc, x, g, d, k, count, j, kt, va, s, gj);
  };
  if (ib + R <= n) {
    // The block's own rows add c_i xc_i + g_i / n where their x and g are loaded anyway: each line of x
    // and of g is read once per block. Rows whose lines share a cache set (a row stride that is a multiple
    // of 4 KiB, the usual case: d = prompt length x hidden size) would otherwise evict each other between
    // two reads.
    for (int r = 0; r < R; ++r) acc[r] = vec_t<T>{};
    for (int64_t j = 0; j < ib; ++j) step(j, nullptr);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {  // unrolled: acc stays in registers
      vec_t<T> gr;
      const vec_t<T> xc = step(ib + r, &gr);
      add_own_terms(acc[r], T(c[ib + r]), xc, own, gr);
    }
    for (int64_t j = ib + R; j < n; ++j) step(j, nullptr);
  } else {  // the last, partial block: padding rows (c = 0) are computed, not stored
    for (int r = 0; r < R; ++r) {
      const int64_t i = ib + r < n ? ib + r : n - 1;
      acc[r] = broadcast(T(c[ib + r])) * (load_in(x + i * d + k) - s) + own * load_in(g + i * d + k);
    }
    for (int64_t j = 0; j < n; ++j) step(j, nullptr);
  }
  if (Full && std::is_same_v<In, T> && ib + R <= n) {  // phi is not read again: store past the caches
    track_finite_block<In, Full, T>(bad, acc, R, count);
    for (int r = 0; r < R; ++r) stream_as<In, T>(phi + (ib + r) * d + k, acc[r]);
    return;
  }
  const int rows = static_cast<int>(min64(R, n - ib));
  track_finite_block<In, Full, T>(bad, acc, rows, count);
  for (int r = 0; r < rows; ++r) store_as<In, T>(phi + (ib + r) * d + k, acc[r], Full ? kLanes<T> : count);
}

// Row blocks of apply_columns: up to kApplyMaxRows accumulators (one vector register each) plus the
// operands (x_j - s, w_j, s, a and a broadcast) fit in the register file: 16 with AVX-512's 32
// registers; with the 16 of AVX2 or SSE the packed pass below keeps kApplyRows rows of two vectors each
// (8 accumulators). (kernels_v4.cpp defines BMT_FAST_32_VECTOR_REGISTERS: #pragma
// GCC target does not define __AVX512F__.) A block covers min(kApplyMaxRows, the rows left rounded up to
// kApplyRows).
#ifdef BMT_FAST_32_VECTOR_REGISTERS
constexpr int kApplyMaxRows = 16;
#else
constexpr int kApplyMaxRows = kApplyRows;
#endif

// Rows of the register block at row ib: min(max_rows, the rows left rounded up to kApplyRows).
BMT_FAST_INLINE int block_rows(int64_t n, int64_t ib, int max_rows) {
  const int64_t left = round_up(n - ib, kApplyRows);
  return static_cast<int>(left < max_rows ? left : max_rows);
}

// Loads ahead of the apply pass: each vector of columns touches 2n rows at a stride of d, too many
// streams for the hardware prefetcher. Into L2, 16 vectors ahead: into L1, 4 ahead, they held line-fill
// buffers, which bounded what was in flight (2-core Xeon, alternating, fp32 svgd_step 16 x 409,600
// ~3.6 -> ~3.4 ms against ~2.8 ms for a torch copy of the bytes it moves).
constexpr int64_t kApplyPrefetchVectors = 16;

template <bool Full, typename In, typename T>
BMT_FAST_INLINE void apply_columns_vector(const In* x, const In* g, In* phi, int64_t n, int64_t d, int64_t k,
                                          int64_t count, int64_t col_end, const T* shift, const T* kt,
                                          const T* c, vec_t<T> va, vec_t<T> own, vec_t<T>& bad) {
  constexpr int L = kLanes<T>;
  const int64_t ahead = k + kApplyPrefetchVectors * L;
  if (Full && ahead < col_end) {
    for (int64_t j = 0; j < n; ++j) {
      __builtin_prefetch(x + j * d + ahead, 0, 1);
      __builtin_prefetch(g + j * d + ahead, 0, 1);
    }
  }
  const vec_t<T> s = load_part_as<T>(shift + k, count);
  for (int64_t ib = 0; ib < n;) {
    const int R = block_rows(n, ib, kApplyMaxRows);
    const T* kb = kt + ib * n;
    if constexpr (kApplyMaxRows >= 16) {
      if (R == 16) apply_vector<16, Full>(x, g, phi, n, d, ib, k, count, kb, c, va, s, own, bad);
      if (R == 12) apply_vector<12, Full>(x, g, phi, n, d, ib, k, count, kb, c, va, s, own, bad);
    }
    if constexpr (kApplyMaxRows >= 8) {
      if (R == 8) apply_vector<8, Full>(x, g, phi, n, d, ib, k, count, kb, c, va, s, own, bad);
    }
    if (R == 4) apply_vector<4, Full>(x, g, phi, n, d, ib, k, count, kb, c, va, s, own, bad);
    ib += R;
  }
}

// The apply pass in two halves of the rows, for kApplyHalvesParticles (16) particles (one register block of
// R = 16 rows) whose rows are a multiple of 4 KiB apart, as a soft prompt's usually are (d = prompt length x
// hidden size). There the 32 rows of x and g have their lines at one column offset in one set of L1 (whose
// set index repeats every 4 KiB) and, at multiples of 64 KiB, of L2 (16 ways): the direct pass, which needs
// all 32 at once and prefetches them ahead, lost prefetched lines before their use. Here a chunk of
// kApplyHalvesChunkVectors vectors of columns goes twice: rows 0-7 add into the 16 sums of each vector, which
// wait in the scratch (part, in L1), then rows 8-15 finish them into phi; each half prefetches the other's
// lines a half-pass ahead (the first half the second's lines of this chunk, the second the first's of the
// next chunk), so that about half the rows' lines of an offset are held at a time. Each sum takes its terms
// in the direct pass's order (j = 0 .. 15, a row's own terms at j = i), so phi is the same bit for bit.
// 2-core AMD EPYC VM (Zen 5), fp32 H given, 2 threads, PASSIVE, six alternating rounds, direct -> halves
// (ms): 16 x 409,600 2.39-2.87 -> 2.18-2.72 (medians 2.53 -> 2.29); one thread 5.07-5.21 -> 4.07-4.26; 16 x
// 410,624 (a multiple of 4 KiB, not of 64 KiB) 2.45-2.68 -> 2.26-2.38; fp64 16 x 204,800 2.20-2.39 ->
// 2.02-2.10; 16 x 76,800 and 16 x 102,400 (in L3) level. With rows 64 bytes further apart (16 x 409,616,
// the direct pass) the step took 2.04-2.45 ms in the same rounds.

// Rows J0 .. J1-1 (all of them rows of the block, which starts at row 0) into the R sums of one whole vector
// of columns at k: First starts them at 0 and leaves them in part, the second half takes them from part and
// writes phi.
template <int R, int J0, int J1, bool First, typename In, typename T>
BMT_FAST_INLINE void apply_half(const In* x, const In* g, In* phi, T* part, int64_t d, int64_t k, const T* kt,
                                const T* c, vec_t<T> va, vec_t<T> s, vec_t<T> own, vec_t<T>& bad) {
  constexpr int L = kLanes<T>;
  vec_t<T> acc[R];
  for (int r = 0; r < R; ++r) acc[r] = First ? vec_t<T>{} : load(part + r * L);
#pragma GCC unroll 16
  for (int j = J0; j < J1; ++j) {
    vec_t<T> gv;
    const vec_t<T> xc = add_row<R, true>(acc, x, g, d, k, L, j, kt, va, s, &gv);
    add_own_terms(acc[j], T(c[j]), xc, own, gv);
  }
  if constexpr (First) {
    for (int r = 0; r < R; ++r) store(part + r * L, acc[r]);
  } else {
    track_finite_block<In, true, T>(bad, acc, R, L);
    for (int r = 0; r < R; ++r) stream_as<In, T>(phi + r * d + k, acc[r]);
  }
}

// The whole vectors of [col_begin, col_end) by halves; returns where the whole vectors end (the caller takes
// the ragged rest). part: kApplyHalvesChunkVectors * R vectors (apply_scratch_size).
template <int R, typename In, typename T>
BMT_FAST_INLINE int64_t apply_columns_halves(const In* x, const In* g, In* phi, int64_t d, int64_t col_begin,
                                             int64_t col_end, const T* shift, const T* kt, const T* c,
                                             vec_t<T> va, vec_t<T> own, T* part, vec_t<T>& bad) {
  constexpr int L = kLanes<T>, H = R / 2;
  constexpr int64_t kChunk = kApplyHalvesChunkVectors * L;
  const int64_t end = col_begin + (col_end - col_begin) / L * L;
  const auto prefetch_rows = [&](int j0, int j1, int64_t at) BMT_FAST_INLINE_LAMBDA {
    if (at >= end) return;
    for (int j = j0; j < j1; ++j) {
      __builtin_prefetch(x + j * d + at, 0, 1);
      __builtin_prefetch(g + j * d + at, 0, 1);
    }
  };
  for (int64_t k0 = col_begin; k0 < end; k0 += kChunk) {
    const int64_t k1 = min64(end, k0 + kChunk);
    for (int64_t k = k0; k < k1; k += L) {
      prefetch_rows(H, R, k);
      apply_half<R, 0, H, true, In, T>(x, g, phi, part + (k - k0) / L * R * L, d, k, kt, c, va,
                                       load_as<T>(shift + k), own, bad);
    }
    for (int64_t k = k0; k < k1; k += L) {
      prefetch_rows(0, H, k + kChunk);
      apply_half<R, H, R, false, In, T>(x, g, phi, part + (k - k0) / L * R * L, d, k, kt, c, va,
                                        load_as<T>(shift + k), own, bad);
    }
  }
  return end;
}

// The packed apply pass, for the ISA builds with 16 vector registers (AVX2, SSE), and for the AVX-512 build
// from kPackedMinParticles particles (8 rows x 2 vectors there: 16 accumulators). Their CPUs often have a
// 32 KiB 8-way L1 (and an 8-way L2): the 2n rows of x and g, at a stride that is usually a multiple of
// 4 KiB, share one set there, and the direct pass above, which reads them a vector at a time and n/R
// times over, lost each line before its next use (an AVX2 Zen 3: 3-4 GB/s). Here a block of columns is
// first copied row by row (sequential reads, the next block prefetched) into two L1 buffers: each row's
// own terms c_j xc_j + g_j / n and w_j = g_j - a xc_j (xc centred); the register blocks then read only
// those. A register block is
// kApplyRows rows x kPackedVectors vectors of columns (8 accumulators): one broadcast of K feeds two
// FMAs, and each output row gets a whole 64-byte line at once (AVX2, fp32 / fp64), streamed past the
// caches.
constexpr int kPackedVectors = 2;
#ifdef BMT_FAST_32_VECTOR_REGISTERS
constexpr int kPackedMaxRows = 8;
#else
constexpr int kPackedMaxRows = kApplyRows;
#endif
// The AVX-512 build packs too from this many particles: its direct pass reloads x_j and g_j and forms w_j
// once per block of 16 rows, and the rows' 4 KiB-aliased lines leave L1 between two blocks. 2-core Xeon
// (Emerald Rapids), fp32, Gram path, H given, 3 alternating rounds against the direct pass (ms): 32 x 76,800
// 2.5-2.7 -> 1.8-2.2, 48 x 76,800 4.6-4.8 -> 3.8-4.2, 64 x 76,800 7.8-9.4 -> 5.6-7.3, 64 x 409,600 54-56 ->
// 41-44. Below 32 it was not faster (24 x 76,800 level; 8 x 76,800 0.24-0.30 -> 0.35-0.39): x and g are
// read once per block there, and packing adds a pass. Not faster either: the next chunks prefetched into
// L2 two ahead, a line at a time, as the Gram pass does; 128-column chunks.
constexpr int64_t kPackedMinParticles = 32;

// phi as in apply_vector. The first buffer holds each row's own terms, c_i xc_i + g_i / n (kt's diagonal
// is 0: g_i / n from the input g, not from w_i, where it would cancel against c_i xc_i).
template <int R, int V, typename In, typename T>
BMT_FAST_INLINE void apply_packed_line(const T* ownb, const T* wb, int64_t ld, In* phi, int64_t n, int64_t d,
                                       int64_t ib, int64_t kb, int64_t k, int64_t count, const T* kt,
                                       vec_t<T>& bad) {
  constexpr int L = kLanes<T>;
  vec_t<T> acc[R][V];
  for (int r = 0; r < R; ++r) {  // padding rows read the last real row and are not stored
    const int64_t i = ib + r < n ? ib + r : n - 1;
    for (int v = 0; v < V; ++v) acc[r][v] = load(ownb + i * ld + kb + v * L);
  }
  for (int64_t j = 0; j < n; ++j) {
    vec_t<T> w[V];
    for (int v = 0; v < V; ++v) w[v] = load(wb + j * ld + kb + v * L);
    for (int r = 0; r < R; ++r) {
      const vec_t<T> kr = broadcast(T(kt[j * R + r]));
      for (int v = 0; v < V; ++v) acc[r][v] += kr * w[v];
    }
  }
  FiniteParts<T> seen;
  for (int r = 0; r < R; ++r) {
    if (ib + r >= n) break;
    In* out = phi + (ib + r) * d + k;
    if (count == V * L) {
      for (int v = 0; v < V; ++v) seen.template add<In, true>(r * V + v, acc[r][v], L);
      if (!stream_line<In, T, V>(out, acc[r]))
        for (int v = 0; v < V; ++v) store_as<In, T>(out + v * L, acc[r][v], L);
    } else {
      for (int v = 0; v < V && v * L < count; ++v) {
        const int64_t part = min64(L, count - v * L);
        seen.template add<In, false>(r * V + v, acc[r][v], part);
        store_as<In, T>(out + v * L, acc[r][v], part);
      }
    }
  }
  seen.into(bad);
}

template <typename In, typename T>
BMT_FAST_INLINE void apply_columns_packed(const In* x, const In* g, In* phi, int64_t n, int64_t d,
                                          int64_t col_begin, int64_t col_end, const T* shift, const T* kt,
                                          const T* c, T a, vec_t<T> own, T* buf, vec_t<T>& bad) {
  constexpr int L = kLanes<T>, V = kPackedVectors;
  const int64_t chunk = apply_pack_chunk(n);  // a multiple of V * L: whole register blocks
  const int64_t ld = chunk + kRowPad<T>;
  T* ownb = buf;
  T* wb = buf + n * ld;
  const vec_t<T> va = broadcast(T(a));
  for (int64_t k0 = col_begin; k0 < col_end; k0 += chunk) {
    const int64_t len = min64(chunk, col_end - k0);
    const int64_t padded = round_up(len, V * L);
    for (int64_t j = 0; j < n; ++j) {
      const In* xj = x + j * d + k0;
      const In* gj = g + j * d + k0;
      prefetch_next_chunk(xj, chunk, col_end - k0 - chunk);
      prefetch_next_chunk(gj, chunk, col_end - k0 - chunk);
      const vec_t<T> cj = broadcast(T(c[j]));
      for (int64_t k = 0; k < padded; k += L) {  // past len: zeros (the ragged last block)
        const int64_t count = len - k < L ? (len - k > 0 ? len - k : 0) : L;
        const vec_t<T> xc = load_part_as<T>(xj + k, count) - load_part_as<T>(shift + k0 + k, count);
        const vec_t<T> gv = load_part_as<T>(gj + k, count);
        store(ownb + j * ld + k, cj * xc + own * gv);
        store(wb + j * ld + k, gv - va * xc);
      }
    }
    for (int64_t k = 0; k < len; k += V * L) {
      const int64_t count = min64(V * L, len - k);
      for (int64_t ib = 0; ib < n;) {
        const int R = block_rows(n, ib, kPackedMaxRows);
#ifdef BMT_FAST_32_VECTOR_REGISTERS
        if (R == 8) apply_packed_line<8, V>(ownb, wb, ld, phi, n, d, ib, k, k0 + k, count, kt + ib * n, bad);
#endif
        if (R == 4) apply_packed_line<4, V>(ownb, wb, ld, phi, n, d, ib, k, k0 + k, count, kt + ib * n, bad);
        ib += R;
      }
    }
  }
}

// scratch: apply_scratch_size<T>(n) elements (kernels.h): round_up(n, kApplyRows) * n, then the packed pass's 2n
// rows of apply_pack_chunk(n) + kRowPad, or the halves' sums.
// Returns whether every phi value it wrote is finite.
template <typename In, typename T>
BMT_FAST_INLINE bool apply_columns_impl(const In* x, const In* g, In* phi, int64_t n, int64_t d,
                                        int64_t col_begin, int64_t col_end, const T* shift, const T* kn,
                                        const T* c, T a, T* scratch) {
  constexpr int L = kLanes<T>;
  const int64_t rows = round_up(n, kApplyRows);
  // kn (rows x n, padding rows zero) re-laid per row block: block ib of R rows at kt + ib * n, j-major.
  T* kt = scratch;
#ifdef BMT_FAST_32_VECTOR_REGISTERS
  const bool packed = n >= kPackedMinParticles;
#else
  const bool packed = true;
#endif
  for (int64_t ib = 0; ib < rows;) {
    const int R = block_rows(n, ib, packed ? kPackedMaxRows : kApplyMaxRows);
    for (int64_t j = 0; j < n; ++j)
      for (int r = 0; r < R; ++r) kt[ib * n + j * R + r] = kn[(ib + r) * n + j];
    ib += R;
  }
  vec_t<T> bad{};
  const vec_t<T> own = broadcast(static_cast<T>(1.0 / static_cast<double>(n)));  // k_ii / n
#ifdef BMT_FAST_32_VECTOR_REGISTERS
  if (packed) {
    apply_columns_packed(x, g, phi, n, d, col_begin, col_end, shift, kt, c, a, own, scratch + rows * n, bad);
    stream_fence();
    return horizontal_sum<T>(bad) == T(0);
  }
  const vec_t<T> va = broadcast(T(a));
  int64_t k = col_begin;
  if constexpr (std::is_same_v<In, T>) {  // (fp32 / fp64: a vector is a whole line)
    if (n == kApplyHalvesParticles && d * int64_t{sizeof(In)} % 4096 == 0)
      k = apply_columns_halves<kApplyHalvesParticles>(x, g, phi, d, col_begin, col_end, shift, kt, c, va, own,
                                                       scratch + rows * n, bad);
  }
  for (; k + L <= col_end; k += L)
    apply_columns_vector<true>(x, g, phi, n, d, k, L, col_end, shift, kt, c, va, own, bad);
  if (k < col_end)
    apply_columns_vector<false>(x, g, phi, n, d, k, col_end - k, col_end, shift, kt, c, va, own, bad);
#else
  (void)L;
  apply_columns_packed(x, g, phi, n, d, col_begin, col_end, shift, kt, c, a, own, scratch + rows * n, bad);
#endif
  stream_fence();
  return horizontal_sum<T>(bad) == T(0);
}

}  // namespace
}  // namespace bmt_fast::cpu::BMT_FAST_ISA
