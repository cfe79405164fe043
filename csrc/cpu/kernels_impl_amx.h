// The AMX paths: passes over the particles, the epilogues and rbf_kernel_backward.
// One part of the CPU kernels of an ISA build: kernels_impl.h includes it (outside any namespace) after
// the parts it names before it, once per build (kernels_{base,v3,v4}.cpp); not a header of its own.

namespace bmt_fast::cpu::BMT_FAST_ISA {
namespace {

// ---- the AMX paths' passes over the particles: column sums, centring and rounding, W in pairs -------

// The column sums of bf16 or fp32 rows (d columns, rows [0, rows)) for columns [col_begin, col_end), in
// double (every bf16 value and its running sum exact to 53 bits): the AMX path's centring shift. A group of
// 4 vectors of columns at a time, summed down all rows in 8 registers of doubles. (Row by row into the sums
// in memory, 1024 x 8192 bf16 took ~1.7 ms; x.sum(0, dtype=float64) made a float64 copy of x first: at
// 256 x 76,800, 157 MB of fresh pages every step.)
template <bool kRange, typename In>
BMT_FAST_INLINE void amx_column_sums_body(const In* x, int64_t d, int64_t rows, int64_t col_begin, int64_t col_end,
                                          double* sums, float* lo, float* hi) {
  constexpr int L = kLanes<float>, kGroup = 4;
  constexpr int64_t kSumsAhead = 48;
  const vec_t<float> inf = broadcast(std::numeric_limits<float>::infinity());
  int64_t k = col_begin;
  for (; k + kGroup * L <= col_end; k += kGroup * L) {
    vec_t<double> acc[2 * kGroup] = {};
    vec_t<float> low[kGroup], high[kGroup];
    for (int g = 0; g < kGroup; ++g) low[g] = inf, high[g] = -inf;
    for (int64_t r = 0; r < rows; ++r) {
      const In* row = x + r * d + k;
      if (r + kSumsAhead < rows)  // (rows a stride apart: beyond the hardware prefetchers' reach)
        prefetch_lines<3>(row + kSumsAhead * d, kGroup * L);
#pragma GCC unroll 4
      for (int g = 0; g < kGroup; ++g) {
        const vec_t<float> v = load_as<float>(row + g * L);
        add_as_doubles(acc + 2 * g, v);
        if constexpr (kRange) {
          low[g] = v < low[g] ? v : low[g];
          high[g] = v > high[g] ? v : high[g];
        }
      }
    }
    std::memcpy(sums + k, acc, sizeof(acc));
    if constexpr (kRange) {
      std::memcpy(lo + k, low, sizeof(low));
      std::memcpy(hi + k, high, sizeof(high));
    }
  }
  for (; k < col_end; k += L) {  // the last columns, a vector (or less) at a time
    const int64_t count = min64(L, col_end - k);
    vec_t<double> acc[2] = {};
    vec_t<float> low = inf, high = -inf;  // (lanes beyond count hold zeros: not copied out)
    for (int64_t r = 0; r < rows; ++r) {
      const vec_t<float> v = load_part_as<float>(x + r * d + k, count);
      add_as_doubles(acc, v);
      if constexpr (kRange) {
        low = v < low ? v : low;
        high = v > high ? v : high;
      }
    }
    double total[L];
    std::memcpy(total, acc, sizeof(total));
    for (int64_t q = 0; q < count; ++q) sums[k + q] = total[q];
    if constexpr (kRange) {
      for (int64_t q = 0; q < count; ++q) lo[k + q] = low[q], hi[k + q] = high[q];
    }
  }
}

template <typename In>
BMT_FAST_INLINE void amx_column_sums_impl(const In* x, int64_t d, int64_t rows, int64_t col_begin, int64_t col_end,
                                          double* sums, float* lo, float* hi) {
  if (lo != nullptr)
    amx_column_sums_body<true>(x, d, rows, col_begin, col_end, sums, lo, hi);
  else
    amx_column_sums_body<false>(x, d, rows, col_begin, col_end, sums, lo, hi);
}

// The operands of the AMX path, one pass each (they were a dozen ATen ops with n x d fp32 temporaries
// and their page faults: a third of a step at 4096 x 768). Rows a of x (cols columns, row stride ld, bf16 or
// fp32) centred by shift (cols fp32 values) and rounded to bf16 into xb (row stride ld_xb, columns [cols,
// ld_xb) zeroed); the squares of the rounded values (each exact in fp32) summed 8 to a lane in fp32 (nearly
// always exact: a square has at most 16 significant bits) and those sums in double, added into sq_sums[a]
// (the caller rounds the norms to fp32).
// (Summed in fp32 the norms came out low: a square's last bits are rarely those of a half, so rounding
// them off into a large running sum rounds down more often than up. At 70 x 20,001 the distances were
// 0.09 (16 lanes) to 0.18 (4 lanes) below the exact ones of the rounded particles on average, for
// distances near 40,000, K 1e-5 high.)
template <typename In>
BMT_FAST_INLINE void amx_centre_rows_impl(const In* x, int64_t ld, int64_t cols, const float* shift,
                                          int64_t row_begin, int64_t row_end, c10::BFloat16* xb, int64_t ld_xb,
                                          double* sq_sums, int64_t ahead) {
  constexpr int L = kLanes<float>;
  for (int64_t a = row_begin; a < row_end; ++a) {
    const In* row = x + a * ld;
    if (ahead != 0) prefetch_lines<1>(row + ahead, cols);
    c10::BFloat16* out = xb + a * ld_xb;
    vec_t<double> sum[2] = {};
    vec_t<float> part{};  // the squares of up to 8 vectors (small: their bits kept), then into sum
    int parts = 0;
    for_each_vector<L>(cols, [&](int64_t k, auto count) BMT_FAST_INLINE_LAMBDA {  // the tail zero-padded
      const u32_vec bits = bf16_bits(load_part_as<float>(row + k, count) - load_part_as<float>(shift + k, count));
      const vec_t<float> rounded = float_of_bf16_bits(bits);
      part += rounded * rounded;
      if (++parts == 8) {
        add_as_doubles(sum, part);
        part = vec_t<float>{};
        parts = 0;
      }
      store_bf16_bits(out + k, bits, count);
    });
    add_as_doubles(sum, part);
    std::memset(out + cols, 0, (ld_xb - cols) * sizeof(c10::BFloat16));  // +0.0 (stored one by one before)
    sq_sums[a] += horizontal_sum<double>(sum[0] + sum[1]);
  }
}

// AMX's B operand of the step's second product, pairs [pair_begin, pair_end) of rows, with Xs_i = x_i - shift:
// split (x_off > 0), S_i = score_i and Xs_i rounded to bf16 (for bf16 particles and amx_shift's shift both
// exact) for K [S | Xs]; folded (x_off == 0), W_i = score_i - a Xs_i rounded to bf16 for K W. Rows 2p and
// 2p + 1 interleaved feature by feature (the bf16 pair of feature k is one 32-bit word: row 2p in its low
// half), rows at or beyond n zero; pair row p at bw + p ld_bw, its S (or W) words from there and its Xs
// words from x_off on. cols features of rows ld apart.
template <typename In>
BMT_FAST_INLINE void amx_step_pairs_impl(const In* score, const In* x, int64_t ld, int64_t cols, const float* shift,
                                         float a, int64_t n, int64_t pair_begin, int64_t pair_end, uint32_t* bw,
                                         int64_t ld_bw, int64_t x_off, int64_t ahead) {
  constexpr int L = kLanes<float>;
  const vec_t<float> av = broadcast(a);
  for (int64_t p = pair_begin; p < pair_end; ++p) {
    const int64_t i = 2 * p;
    uint32_t* out = bw + p * ld_bw;
    if (ahead != 0) {
      for (int64_t row = i; row < std::min(i + 2, n); ++row) {
        prefetch_lines<1>(x + row * ld + ahead, cols);
        prefetch_lines<1>(score + row * ld + ahead, cols);
      }
    }
    for_each_vector<L>(cols, [&](int64_t k, auto count) BMT_FAST_INLINE_LAMBDA {
      const vec_t<float> sv = load_part_as<float>(shift + k, count);
      const auto pair = [&](auto&& value) BMT_FAST_INLINE_LAMBDA {
        const u32_vec low = i < n ? bf16_bits(value(i)) : u32_vec{};
        const u32_vec high = i + 1 < n ? bf16_bits(value(i + 1)) : u32_vec{};
        return low | (high << 16);
      };
      const auto score_at = [&](int64_t row) { return load_part_as<float>(score + row * ld + k, count); };
      const auto xs_at = [&](int64_t row) { return load_part_as<float>(x + row * ld + k, count) - sv; };
      if (x_off > 0) {
        const u32_vec s_pair = pair(score_at), x_pair = pair(xs_at);
        std::memcpy(out + k, &s_pair, static_cast<size_t>(count) * sizeof(uint32_t));
        std::memcpy(out + x_off + k, &x_pair, static_cast<size_t>(count) * sizeof(uint32_t));
      } else {
        const u32_vec w_pair = pair([&](int64_t row) { return score_at(row) - xs_at(row) * av; });
        std::memcpy(out + k, &w_pair, static_cast<size_t>(count) * sizeof(uint32_t));
      }
    });
  }
}

// ---- the AMX epilogues: K from tiles of dot products, phi from K W ----------------------------------

// rbf_from_dots for the tensor-core path (many particles; here, after the load, store and stream helpers):
// K of rows [0, rows) x columns [0, cols) of an fp32 dot tile (row stride ld), with entry (a, a + diag) (a
// particle's own term) exactly 1 if own_one (rbf_kernel's diagonal) else 0 (svgd_step's), added into
// rowsum[a] in fp32 unless rowsum is null (rounded_sums: a bf16 K's rounded values, as the split step's
// K Xs takes them: amx_step_splits), and stored as Out (bf16: the step's operand or a bf16 result;
// fp32: the result for fp32 particles) in k_out (row stride ld_out); columns [cols, cols_padded) of k_out
// are zeroed. Native: whole vectors rounded to bf16 by AVX512-BF16's
// vcvtneps2bf16 (the same round to nearest even; kernels.cpp decides whether the CPU has it), one
// instruction for the seven of store_as, which took about half of this function's time (2-core Xeon, perf).
// Without rowsum (rbf_kernel: K is the result, written once and far larger than the caches) the native
// build streams whole aligned 64-byte lines around the caches, which saves the read for ownership of each
// line: the stores were half of this function's samples at 4096 x 128 (perf). An fp32 result is streamed
// a vector (one line) at a time where it is aligned.
template <bool Native, typename Out>
BMT_FAST_INLINE void amx_rbf_from_dots_impl(float* tile, int64_t ld, int64_t rows, int64_t cols, int64_t cols_padded,
                                            const float* nr, const float* nc, float inv_h, int64_t diag, bool own_one,
                                            Out* k_out, int64_t ld_out, float* rowsum, bool rounded_sums) {
  constexpr bool kBf16 = std::is_same_v<Out, c10::BFloat16>;
  constexpr int L = kLanes<float>;
  const vec_t<float> neg_inv_h = broadcast(-inv_h);
  // the own term: a dot product of -inf gives the distance +inf, so K = exp(-inf) = 0 exactly (NaN for an
  // invalid H); one of +inf gives -inf, clamped to 0, so K = exp(0) = 1 exactly; no test per vector
  const float own_dot = own_one ? std::numeric_limits<float>::infinity() : -std::numeric_limits<float>::infinity();
  for (int64_t a = 0; a < rows; ++a) {
    float* row = tile + a * ld;
    Out* out = k_out + a * ld_out;
    const vec_t<float> na = broadcast(nr[a]);
    const int64_t own = a + diag;
    if (own >= 0 && own < cols) row[own] = own_dot;
    // k = K at columns [b, b + count), the lanes beyond count zero (exp(0) = 1 there otherwise)
    const auto k_at = [&](int64_t b, auto count, vec_t<float>& k) BMT_FAST_INLINE_LAMBDA {
      const vec_t<float> dist = clamp_distance<float>(na + load_part_as<float>(nc + b, count) -
                                                      2.f * load_part_as<float>(row + b, count));
      k = exp_nonpositive<float>(dist * neg_inv_h);
      if constexpr (!std::is_same_v<decltype(count), std::integral_constant<int64_t, L>>)
        for (int64_t q = count; q < L; ++q) k[q] = 0.f;
    };
    vec_t<float> sum{};
    int64_t done = 0;
#ifdef BMT_FAST_32_VECTOR_REGISTERS
    // (inline assembly for AVX512-BF16: the intrinsics need the avx512bf16 target everywhere up)
    if constexpr (Native && kBf16) {
      if (!rowsum) {
        constexpr std::integral_constant<int64_t, L> whole{};
        for (; done + 2 * L <= cols; done += 2 * L) {
          vec_t<float> k0, k1;
          k_at(done, whole, k0);
          k_at(done + L, whole, k1);
          __m512i line;  // vcvtne2ps2bf16: k0 rounded into the low half, k1 into the high half
          asm("vcvtne2ps2bf16 %2, %1, %0" : "=v"(line) : "v"(k1), "v"(k0));
          c10::BFloat16* p = out + done;
          if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) _mm512_stream_si512(reinterpret_cast<__m512i*>(p), line);
          else _mm512_storeu_si512(p, line);
        }
      }
    }
#endif
    for_each_vector<L>(cols - done, [&](int64_t b, auto count) BMT_FAST_INLINE_LAMBDA {
      b += done;
      vec_t<float> k;
      k_at(b, count, k);
      constexpr bool whole = std::is_same_v<decltype(count), std::integral_constant<int64_t, L>>;
      if constexpr (!kBf16) {
        sum += k;
        if constexpr (whole) {
          if (!rowsum) {
            stream_as<float, float>(out + b, k);
            return;
          }
        }
        store_as<Out, float>(out + b, k, count);
      } else {
#ifdef BMT_FAST_32_VECTOR_REGISTERS
        if constexpr (Native && whole) {
          __m256i narrow;
          asm("vcvtneps2bf16 %1, %0" : "=v"(narrow) : "v"(k));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + b), narrow);
          if (!rounded_sums) {
            sum += k;
          } else {  // (the rounded values, widened back: vpmovzxwd)
            typedef uint16_t u16_vec __attribute__((vector_size(kVectorBytes / 2)));
            u16_vec bits;
            std::memcpy(&bits, &narrow, sizeof(bits));
            sum += float_of_bf16_bits(__builtin_convertvector(bits, u32_vec));
          }
          return;
        }
#endif
        const u32_vec bits = bf16_bits(k);
        store_bf16_bits(out + b, bits, count);
        sum += rounded_sums ? float_of_bf16_bits(bits) : k;
      }
    });
    for (int64_t q = cols; q < cols_padded; ++q) out[q] = Out(0.f);
    if (rowsum) rowsum[a] += horizontal_sum<float>(sum);
  }
  if (!rowsum) stream_fence();  // the streamed lines ordered before what the caller does next
}

#ifdef BMT_FAST_32_VECTOR_REGISTERS
// One aligned 64-byte line of bf16 (the bits of two vectors of fp32 lanes) written around the caches.
BMT_FAST_INLINE void stream_bf16_line(c10::BFloat16* p, u32_vec low, u32_vec high) {
  typedef uint16_t u16_vec __attribute__((vector_size(kVectorBytes / 2)));
  const u16_vec a = __builtin_convertvector(low, u16_vec), b = __builtin_convertvector(high, u16_vec);
  const auto line = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19,
                                            20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31);
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), reinterpret_cast<const __m512i&>(line));
}
#endif

// out[k] = value(k, count) (fp32 vectors of count lanes) for k in [0, len), as In: a result written once,
// streamed around the caches where its vectors are whole lines (fp32 ones, and bf16 ones two vectors a line
// where out starts on a line), stored elsewhere; seen(v, count) sees each vector. The caller fences
// (stream_fence) before the lines are read.
template <typename In, typename Value, typename Seen>
BMT_FAST_INLINE void write_row_streamed(In* out, int64_t len, Value&& value, Seen&& seen) {
  constexpr int L = kLanes<float>;
  int64_t done = 0;
#ifdef BMT_FAST_32_VECTOR_REGISTERS
  if constexpr (std::is_same_v<In, c10::BFloat16>) {
    if ((reinterpret_cast<uintptr_t>(out) & 63) == 0) {
      constexpr auto whole = std::integral_constant<int64_t, L>{};
      for (; done + 2 * L <= len; done += 2 * L) {
        const vec_t<float> v0 = value(done, whole), v1 = value(done + L, whole);
        seen(v0, whole);
        seen(v1, whole);
        stream_bf16_line(out + done, bf16_bits(v0), bf16_bits(v1));
      }
    }
  }
#endif
  for_each_vector<L>(len - done, [&](int64_t k0, auto count) BMT_FAST_INLINE_LAMBDA {
    const int64_t k = done + k0;
    const vec_t<float> v = value(k, count);
    seen(v, count);
    if constexpr (std::is_same_v<decltype(count), std::integral_constant<int64_t, L>> && std::is_same_v<In, float>)
      stream_as<In, float>(out + k, v);
    else
      store_as<In, float>(out + k, v, count);
  });
}

// phi_a = ((K S)_a + a (rowsum_a Xs_a - (K Xs)_a) + score_a) (1/n) in In, Xs_a = x_a - shift rounded to
// bf16 as in K's operand (Split: the AMX steps) or phi_a = ((K W)_a + a rowsum_a (x_a - shift) + score_a)
// (1/n) with W = score - a (x - shift) (not Split: the folded AMX step, the fp32 GEMM paths): the own term
// k_aa = 1 and the repulsion sum_b k_ab (x_a - x_b), as the last pass, for rows [row_begin, row_end) and
// columns [col_begin, col_end) (x, score, phi: row stride d; acc holds K S or K W of those rows and columns
// from its first entry on and, Split, K Xs from x_off on, row stride ld_acc; rowsum: K's row sums, Split
// those of its rounded values). Returns whether all of these phi values are finite in In (tracked
// in registers: the API then need not scan phi). The division by n is a product with the fp32 1/n (one
// vdivps per vector took ~5% of a few-particle step, 256 x 76,800 bf16). phi is streamed (written once:
// write_row_streamed).
template <bool Split, typename In>
BMT_FAST_INLINE bool finish_rows_impl(const float* acc, int64_t ld_acc, int64_t x_off, const float* rowsum,
                                      const In* x, const In* score, const float* shift, float a, float n, int64_t d,
                                      int64_t row_begin, int64_t row_end, int64_t col_begin, int64_t col_end,
                                      In* phi) {
  constexpr int L = kLanes<float>;
  const vec_t<float> inv_n = broadcast(1.0f / n), av = broadcast(a);
  vec_t<float> bad{};
  for (int64_t r = row_begin; r < row_end; ++r) {
    const vec_t<float> sum_r = broadcast(rowsum[r]), coef = broadcast(a * rowsum[r]);
    const int64_t at = r * d + col_begin;
    const float* acc_row = acc + (r - row_begin) * ld_acc;
    const float* shift_c = shift + col_begin;
    const auto value = [&](int64_t k, auto count) BMT_FAST_INLINE_LAMBDA {
      const vec_t<float> xc = load_part_as<float>(x + at + k, count) - load_part_as<float>(shift_c + k, count);
      const vec_t<float> ks = load_part_as<float>(acc_row + k, count), s = load_part_as<float>(score + at + k, count);
      if constexpr (Split) {  // (Xs_a as K [S | Xs] took it: rounded to bf16)
        const vec_t<float> kx = load_part_as<float>(acc_row + x_off + k, count);
        return (ks + av * (sum_r * float_of_bf16_bits(bf16_bits(xc)) - kx) + s) * inv_n;
      } else {
        return (ks + coef * xc + s) * inv_n;
      }
    };
    write_row_streamed(phi + at, col_end - col_begin, value, [&](vec_t<float> v, auto count) BMT_FAST_INLINE_LAMBDA {
      constexpr bool whole = std::is_same_v<decltype(count), std::integral_constant<int64_t, L>>;
      track_finite<In, whole, float>(bad, v, count);
    });
  }
  stream_fence();
  return horizontal_sum<float>(bad) == 0.f;
}

// ---- rbf_kernel_backward on AMX ---------------------------------------------------------------------

// log(max(v, smallest normal float)), vectorised: v = 2^e m with m in [sqrt(1/2), sqrt(2)), and
// log m = 2 atanh(s) = 2 (s + s^3/3 + ... + s^9/9) with s = (m - 1)/(m + 1), |s| <= 0.172 (truncation
// below 1e-9). The clamp is the fp32 path's (K's entries that underflowed to 0 have P = 0).
BMT_FAST_INLINE vec_t<float> log_clamped(vec_t<float> v) {
  const float tiny = std::numeric_limits<float>::min();
  v = v < tiny ? broadcast(tiny) : v;
  vec_t<int32_t> bits;
  std::memcpy(&bits, &v, sizeof(bits));
  vec_t<int32_t> e = (bits >> 23) - 127;
  bits = (bits & 0x7FFFFF) | 0x3F800000;  // the mantissa as a value in [1, 2)
  vec_t<float> m;
  std::memcpy(&m, &bits, sizeof(m));
  const vec_t<int32_t> big = m > 1.41421356f;  // lanes of -1 where m is halved
  m = big ? m * 0.5f : m;
  e = e - big;
  const vec_t<float> s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  const vec_t<float> series = s * (2.0f + s2 * (2.0f / 3 + s2 * (2.0f / 5 + s2 * (2.0f / 7 + s2 * (2.0f / 9)))));
  return __builtin_convertvector(e, vec_t<float>) * 0.693147180559945f + series;
}

// The tile passes read short segments of rows a page apart, which the hardware prefetchers do not follow:
// each asks for row r + kPrefetchRows of grad and K while it forms row r (4096 x 4096 x 128, y's gradient:
// 14.6-15.4 -> 9.0-9.3 ms).
constexpr int64_t kPrefetchRows = 8;

template <typename In>
BMT_FAST_INLINE void prefetch_p_row(const In* g, const In* k, int64_t ld, int64_t r, int64_t cols) {
  for (int64_t c = 0; c < cols; c += 64 / sizeof(In)) {
    __builtin_prefetch(g + r * ld + c);
    __builtin_prefetch(k + r * ld + c);
  }
}

// P = grad * K (bf16 or fp32 n x m matrices, row stride ld; exact in fp32 for bf16) at row r, columns [c, c + count) of a
// tile, with entry (r, r + diag) left out (a self kernel's own term: P_ii (xc_i - xc_i) = 0 exactly; in the
// sums, next to P_ii ~ 1, the other terms of a row with tiny K were lost, and its gradient with them); P log K
// added into logs unless p_log_k is null (zero-filled tail lanes: 0 * finite).
template <typename In, typename Count>
BMT_FAST_INLINE vec_t<float> p_at(const In* g, const In* k, int64_t ld, int64_t r, int64_t c, Count count,
                                  int64_t diag, const double* p_log_k, vec_t<float>& logs) {
  const vec_t<float> kv = load_part_as<float>(k + r * ld + c, count);
  vec_t<float> p = load_part_as<float>(g + r * ld + c, count) * kv;
  if (r + diag >= c && r + diag < c + count) p[r + diag - c] = 0.f;
  if (p_log_k != nullptr) logs += p * log_clamped(kv);
  return p;
}

// P of rows [0, rows) x columns [0, cols) of a tile (p_at), rounded to bf16 as AMX's A operand: rows of p16
// (row stride ld16, columns [cols, cols_padded) zeroed). rowsum[r] += the fp32 sum of row r's rounded values;
// unless p_log_k is null, *p_log_k += sum P log K.
template <typename In>
BMT_FAST_INLINE void amx_p_rows_impl(const In* g, const In* k, int64_t ld, int64_t rows, int64_t cols,
                                     int64_t cols_padded, int64_t diag, c10::BFloat16* p16, int64_t ld16, float* rowsum,
                                     double* p_log_k) {
  constexpr int L = kLanes<float>;
  double plk = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    if (r + kPrefetchRows < rows) prefetch_p_row(g, k, ld, r + kPrefetchRows, cols);
    vec_t<float> sum{}, logs{};
    c10::BFloat16* out = p16 + r * ld16;
    for_each_vector<L>(cols, [&](int64_t c, auto count) BMT_FAST_INLINE_LAMBDA {
      const u32_vec bits = bf16_bits(p_at(g, k, ld, r, c, count, diag, p_log_k, logs));
      sum += float_of_bf16_bits(bits);
      store_bf16_bits(out + c, bits, count);
    });
    for (int64_t c = cols; c < cols_padded; ++c) out[c] = c10::BFloat16(0.f);
    rowsum[r] += horizontal_sum<float>(sum);
    plk += horizontal_sum<float>(logs);
  }
  if (p_log_k != nullptr) *p_log_k += plk;
}

// The same P as AMX's B operand: rows 2q and 2q + 1 interleaved column by column (the bf16 pair of column c
// is word c of pair row q: row 2q in its low half; row stride ldw words), rows [rows, rows_padded) zero.
// colsum[c] += the fp32 sum of column c's rounded values; unless p_log_k is null, *p_log_k += sum P log K.
template <typename In>
BMT_FAST_INLINE void amx_p_pairs_impl(const In* g, const In* k, int64_t ld, int64_t rows, int64_t rows_padded,
                                      int64_t cols, int64_t diag, uint32_t* pw, int64_t ldw, float* colsum,
                                      double* p_log_k) {
  constexpr int L = kLanes<float>;
  vec_t<float> logs{};
  for (int64_t q = 0; q < rows_padded / 2; ++q) {
    for (int64_t r = 2 * q + kPrefetchRows; r < min64(2 * q + kPrefetchRows + 2, rows); ++r)
      prefetch_p_row(g, k, ld, r, cols);
    uint32_t* out = pw + q * ldw;
    for_each_vector<L>(cols, [&](int64_t c, auto count) BMT_FAST_INLINE_LAMBDA {
      const auto rounded = [&](int64_t r) BMT_FAST_INLINE_LAMBDA {
        return r < rows ? bf16_bits(p_at(g, k, ld, r, c, count, diag, p_log_k, logs)) : u32_vec{};
      };
      const u32_vec low = rounded(2 * q), high = rounded(2 * q + 1);
      const vec_t<float> sums =
          load_part_as<float>(colsum + c, count) + float_of_bf16_bits(low) + float_of_bf16_bits(high);
      store_as<float, float>(colsum + c, sums, count);
      const u32_vec pair = low | (high << 16);
      std::memcpy(out + c, &pair, static_cast<size_t>(count) * sizeof(uint32_t));
    });
  }
  if (p_log_k != nullptr) *p_log_k += horizontal_sum<float>(logs);
}

// Columns [0, cols) of rows 2q and 2q + 1 of src (bf16, row stride ld) interleaved column by column into pair
// row q of out (row stride ld_out words), for q in [pair_begin, pair_end): a B operand from rows of A operands.
BMT_FAST_INLINE void bf16_row_pairs_impl(const c10::BFloat16* src, int64_t ld, int64_t pair_begin, int64_t pair_end,
                                         int64_t cols, uint32_t* out, int64_t ld_out) {
  const auto* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t q = pair_begin; q < pair_end; ++q) {
    const uint16_t *low = bits + 2 * q * ld, *high = low + ld;
    uint32_t* dst = out + q * ld_out;
    for (int64_t c = 0; c < cols; ++c) dst[c] = uint32_t{low[c]} | (uint32_t{high[c]} << 16);
  }
}

// rbf_kernel_backward's rows on AMX: out_r = scale (sums_r xc_r - acc_r) in In (the particles' type), xc
// (bf16, the rounded centred particles) with row stride ld, acc (fp32) and out with row stride d, for rows
// [row_begin, row_end); out streamed (write_row_streamed).
template <typename In>
BMT_FAST_INLINE void amx_grad_rows_impl(const float* acc, int64_t ld_acc, const float* sums, const c10::BFloat16* xc,
                                        int64_t ld, float scale, int64_t d, int64_t row_begin, int64_t row_end,
                                        int64_t col_begin, int64_t col_end, In* out) {
  const vec_t<float> sv = broadcast(scale);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const vec_t<float> coef = broadcast(sums[r]);
    const float* acc_row = acc + (r - row_begin) * ld_acc;
    const c10::BFloat16* xc_row = xc + r * ld + col_begin;
    const auto value = [&](int64_t k, auto count) BMT_FAST_INLINE_LAMBDA {
      return sv * (coef * load_part_as<float>(xc_row + k, count) - load_part_as<float>(acc_row + k, count));
    };
    write_row_streamed(out + r * d + col_begin, col_end - col_begin, value, [](vec_t<float>, auto) {});
  }
  stream_fence();
}

}  // namespace
}  // namespace bmt_fast::cpu::BMT_FAST_ISA
