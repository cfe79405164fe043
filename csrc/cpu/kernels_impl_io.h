// Loads, stores and conversions of every input dtype; transposes; streamed stores and the finiteness flags.
// One part of the CPU kernels of an ISA build: kernels_impl.h includes it (outside any namespace) after
// the parts it names before it, once per build (kernels_{base,v3,v4}.cpp); not a header of its own.

namespace bmt_fast::cpu::BMT_FAST_ISA {
namespace {

// ---- loads, stores and conversions of every input dtype ---------------------------------------------

#if BMT_FAST_VECTOR_BYTES == 64
// Every lane, for the zero-masking forms of AVX-512 instructions: GCC 12 warns that the plain forms'
// undefined pass-through operand "may be used uninitialized" (its own header; the same instructions).
constexpr __mmask16 kAllLanes = 0xFFFF;
constexpr __mmask8 kAllPairs = 0xFF;
#endif

#if BMT_FAST_VECTOR_BYTES >= 32
// fp16 <-> fp32 a vector at a time by F16C (every AVX2 and AVX-512 CPU has it; the baseline build converts
// element by element, as c10::Half does): exact widening, and narrowing rounded to nearest even with
// overflow to inf, as c10::Half's conversion (a NaN keeps its sign and the top of its payload, where c10
// writes 0x7E00). Element by element they had made fp16 particles 4-10x slower than fp32 on the Gram path.
BMT_FAST_INLINE vec_t<float> half_to_float(const c10::Half* p) {
#if BMT_FAST_VECTOR_BYTES == 64
  const __m512 wide = _mm512_maskz_cvtph_ps(kAllLanes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  const __m256 wide = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
  vec_t<float> v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
}

// The first count (<= lanes) values of v stored as fp16.
BMT_FAST_INLINE void store_float_as_half(c10::Half* p, vec_t<float> v, int64_t count) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
#if BMT_FAST_VECTOR_BYTES == 64
  __m512 wide;
  std::memcpy(&wide, &v, sizeof(wide));
  const __m256i narrow = _mm512_maskz_cvtps_ph(kAllLanes, wide, kRound);
#else
  __m256 wide;
  std::memcpy(&wide, &v, sizeof(wide));
  const __m128i narrow = _mm256_cvtps_ph(wide, kRound);
#endif
  std::memcpy(p, &narrow, static_cast<size_t>(count) * sizeof(c10::Half));
}
#endif

// Converting loads and stores between the input type and the compute type.
template <typename T, typename In>
BMT_FAST_INLINE vec_t<T> load_as(const In* p) {
  if constexpr (std::is_same_v<In, T>) {
    return load(p);
  } else if constexpr (std::is_same_v<In, c10::BFloat16>) {
    typedef uint16_t half_vec __attribute__((vector_size(kVectorBytes / 2)));
    half_vec raw;
    std::memcpy(&raw, p, sizeof(raw));
    const vec_t<int32_t> bits = __builtin_convertvector(raw, vec_t<int32_t>) << 16;  // bf16 = top half of fp32
    vec_t<T> v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
#if BMT_FAST_VECTOR_BYTES >= 32
  } else if constexpr (std::is_same_v<In, c10::Half> && std::is_same_v<T, float>) {
    return half_to_float(p);
#endif
  } else {
    vec_t<T> v{};  // (every lane is set below; {} keeps GCC's -Wmaybe-uninitialized quiet on aarch64)
    for (int i = 0; i < kLanes<T>; ++i) v[i] = static_cast<T>(p[i]);
    return v;
  }
}

// Load of the first count (<= lanes) elements, zero-filled past them: the ragged last vector of a row.
template <typename T, typename In>
BMT_FAST_INLINE vec_t<T> load_part_as(const In* p, int64_t count) {
  if (count == kLanes<T>) return load_as<T>(p);
  In tmp[kLanes<T>] = {};
  for (int64_t i = 0; i < count; ++i) tmp[i] = p[i];
  return load_as<T>(tmp);
}

// The median's sample (pair_sq_dists): fp32/fp64 rows, or the AMX path's bf16 ones in fp32.
template <typename In, typename T>
BMT_FAST_INLINE void pair_sq_dists_impl(const In* xc, int64_t d, const T* norms, const int64_t* first,
                                        const int64_t* second, int64_t count, T* out) {
  constexpr int L = kLanes<T>;
  for (int64_t t = 0; t < count; ++t) {
    const In* a = xc + first[t] * d;
    const In* b = xc + second[t] * d;
    vec_t<T> acc{};
    int64_t k = 0;
    for (; k + L <= d; k += L) acc += load_as<T>(a + k) * load_as<T>(b + k);
    T dot = horizontal_sum<T>(acc);
    for (; k < d; ++k) dot += static_cast<T>(a[k]) * static_cast<T>(b[k]);
    out[t] = sq_dist_from_dot(norms[first[t]], norms[second[t]], dot);
  }
}

typedef uint32_t u32_vec __attribute__((vector_size(kVectorBytes)));

// c10::BFloat16's conversion, vectorised: round to nearest even on the bit pattern, NaN -> 0x7FC0. The
// bf16 bits in the low half of each lane (the high half zero).
BMT_FAST_INLINE u32_vec bf16_bits(vec_t<float> v) {
  u32_vec bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const u32_vec rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return v != v ? u32_vec{} + 0x7FC0u : rounded;
}

// The value of such bits as fp32 (exact).
BMT_FAST_INLINE vec_t<float> float_of_bf16_bits(u32_vec bits) {
  const u32_vec shifted = bits << 16;
  vec_t<float> v;
  std::memcpy(&v, &shifted, sizeof(v));
  return v;
}

// The first count (<= lanes) of such bits stored as bf16.
BMT_FAST_INLINE void store_bf16_bits(c10::BFloat16* p, u32_vec bits, int64_t count) {
  typedef uint16_t u16_vec __attribute__((vector_size(kVectorBytes / 2)));
  const u16_vec narrow = __builtin_convertvector(bits, u16_vec);
  std::memcpy(p, &narrow, static_cast<size_t>(count) * sizeof(c10::BFloat16));
}

template <typename In, typename T>
BMT_FAST_INLINE void store_as(In* p, vec_t<T> v, int64_t count) {
  if constexpr (std::is_same_v<In, T>) {
    if (count == kLanes<T>) {
      store(p, v);
      return;
    }
  } else if constexpr (std::is_same_v<In, c10::BFloat16> && std::is_same_v<T, float>) {
    store_bf16_bits(p, bf16_bits(v), count);  // (a compile-time count: one vector store)
    return;
#if BMT_FAST_VECTOR_BYTES >= 32
  } else if constexpr (std::is_same_v<In, c10::Half> && std::is_same_v<T, float>) {
    store_float_as_half(p, v, count);
    return;
#endif
  }
  for (int64_t i = 0; i < count; ++i) p[i] = static_cast<In>(v[i]);
}

// f(k, count) for the vectors of [0, len): whole ones with count a compile-time L (so that the loads and
// stores of f take their one-instruction forms), then the ragged tail, if any, with its run-time count.
template <int L, typename F>
BMT_FAST_INLINE void for_each_vector(int64_t len, F&& f) {
  int64_t k = 0;
  for (; k + L <= len; k += L) f(k, std::integral_constant<int64_t, L>{});
  if (k < len) f(k, len - k);
}

// lo, hi = the two halves of v in double.
BMT_FAST_INLINE void as_doubles(const vec_t<float>& v, vec_t<double>& lo, vec_t<double>& hi) {
#if BMT_FAST_VECTOR_BYTES == 64  // two whole-register conversions (GCC compiled the generic form below to
                                 // four half-width ones and the shuffles to join them)
  const __m512d wide = reinterpret_cast<__m512d>(v);  // (halves by zero-masking extracts: kAllLanes' comment)
  const __m256 low = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, wide, 0));
  const __m256 high = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, wide, 1));
  lo = reinterpret_cast<vec_t<double>>(_mm512_maskz_cvtps_pd(kAllPairs, low));
  hi = reinterpret_cast<vec_t<double>>(_mm512_maskz_cvtps_pd(kAllPairs, high));
#else
  typedef float half_vec __attribute__((vector_size(kVectorBytes / 2)));
  half_vec h[2];
  std::memcpy(h, &v, sizeof(v));
  lo = __builtin_convertvector(h[0], vec_t<double>);
  hi = __builtin_convertvector(h[1], vec_t<double>);
#endif
}

// acc[0], acc[1] += the two halves of v in double.
BMT_FAST_INLINE void add_as_doubles(vec_t<double>* acc, const vec_t<float>& v) {
  vec_t<double> lo, hi;
  as_doubles(v, lo, hi);
  acc[0] += lo;
  acc[1] += hi;
}

// acc[0], acc[1] += the squares of the two halves of v in double (each exact: 48 of its 53 bits).
BMT_FAST_INLINE void add_squares_as_doubles(vec_t<double>* acc, const vec_t<float>& v) {
  vec_t<double> lo, hi;
  as_doubles(v, lo, hi);
  acc[0] += lo * lo;
  acc[1] += hi * hi;
}

// The lines of count values from p on (none if count <= 0), prefetched with __builtin_prefetch's locality
// (3: into L1; 1: into L2).
template <int Locality, typename In>
BMT_FAST_INLINE void prefetch_lines(const In* p, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < count * static_cast<int64_t>(sizeof(In)); b += 64) __builtin_prefetch(bytes + b, 0, Locality);
}

// ---- transposes of 32- and 64-bit words -------------------------------------------------------------

#ifdef BMT_FAST_32_VECTOR_REGISTERS
// dst rows 0..15 (row stride ld_dst) <- the transpose of the 16 x 16 block of src rows 0..15 (row stride
// ld_src), 32-bit words: unpacks of 32- and 64-bit halves within 128-bit lanes, then two rounds of lane
// shuffles (after the unpacks u[4 b + q] holds, in lane L, column 4 L + q of rows 4 b .. 4 b + 3).
BMT_FAST_INLINE void transpose_16x16_words(const uint32_t* src, int64_t ld_src, uint32_t* dst, int64_t ld_dst) {
  __m512i r[16], t[16], u[16], v[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * ld_src);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_maskz_unpacklo_epi32(kAllLanes, r[i], r[i + 1]);
    t[i + 1] = _mm512_maskz_unpackhi_epi32(kAllLanes, r[i], r[i + 1]);
  }
  for (int b = 0; b < 4; ++b) {
    const __m512i *tb = t + 4 * b;
    u[4 * b + 0] = _mm512_maskz_unpacklo_epi64(kAllPairs, tb[0], tb[2]);
    u[4 * b + 1] = _mm512_maskz_unpackhi_epi64(kAllPairs, tb[0], tb[2]);
    u[4 * b + 2] = _mm512_maskz_unpacklo_epi64(kAllPairs, tb[1], tb[3]);
    u[4 * b + 3] = _mm512_maskz_unpackhi_epi64(kAllPairs, tb[1], tb[3]);
  }
  for (int q = 0; q < 4; ++q) {  // v[q], v[4 + q]: rows 0..7, lanes (0, 2) and (1, 3); v[8 + q], v[12 + q]: rows 8..15
    v[q] = _mm512_maskz_shuffle_i32x4(kAllLanes, u[q], u[4 + q], 0x88);
    v[4 + q] = _mm512_maskz_shuffle_i32x4(kAllLanes, u[q], u[4 + q], 0xdd);
    v[8 + q] = _mm512_maskz_shuffle_i32x4(kAllLanes, u[8 + q], u[12 + q], 0x88);
    v[12 + q] = _mm512_maskz_shuffle_i32x4(kAllLanes, u[8 + q], u[12 + q], 0xdd);
  }
  for (int q = 0; q < 4; ++q) {
    _mm512_storeu_si512(dst + q * ld_dst, _mm512_maskz_shuffle_i32x4(kAllLanes, v[q], v[8 + q], 0x88));
    _mm512_storeu_si512(dst + (8 + q) * ld_dst, _mm512_maskz_shuffle_i32x4(kAllLanes, v[q], v[8 + q], 0xdd));
    _mm512_storeu_si512(dst + (4 + q) * ld_dst, _mm512_maskz_shuffle_i32x4(kAllLanes, v[4 + q], v[12 + q], 0x88));
    _mm512_storeu_si512(dst + (12 + q) * ld_dst, _mm512_maskz_shuffle_i32x4(kAllLanes, v[4 + q], v[12 + q], 0xdd));
  }
}

// The same for 64-bit words, 8 x 8: unpacks of row pairs, then two rounds of two-source permutes (after the
// unpacks t[r] holds the even (r even) or odd columns of rows r & ~1 and (r & ~1) + 1, interleaved).
BMT_FAST_INLINE void transpose_8x8_words(const uint64_t* src, int64_t ld_src, uint64_t* dst, int64_t ld_dst) {
  __m512i r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm512_loadu_si512(src + i * ld_src);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm512_maskz_unpacklo_epi64(kAllPairs, r[i], r[i + 1]);
    t[i + 1] = _mm512_maskz_unpackhi_epi64(kAllPairs, r[i], r[i + 1]);
  }
  // u[4 h + q]: rows 4 h .. 4 h + 3 of columns (c, c + 4), c = 0, 2, 1, 3 for q = 0..3
  const __m512i pairs_a = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0);
  const __m512i pairs_b = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
  for (int h = 0; h < 2; ++h) {
    const __m512i* th = t + 4 * h;
    u[4 * h + 0] = _mm512_maskz_permutex2var_epi64(kAllPairs, th[0], pairs_a, th[2]);
    u[4 * h + 1] = _mm512_maskz_permutex2var_epi64(kAllPairs, th[0], pairs_b, th[2]);
    u[4 * h + 2] = _mm512_maskz_permutex2var_epi64(kAllPairs, th[1], pairs_a, th[3]);
    u[4 * h + 3] = _mm512_maskz_permutex2var_epi64(kAllPairs, th[1], pairs_b, th[3]);
  }
  const __m512i low = _mm512_set_epi64(11, 10, 9, 8, 3, 2, 1, 0), high = _mm512_set_epi64(15, 14, 13, 12, 7, 6, 5, 4);
  constexpr int kColumn[4] = {0, 2, 1, 3};
  for (int q = 0; q < 4; ++q) {
    _mm512_storeu_si512(dst + kColumn[q] * ld_dst, _mm512_maskz_permutex2var_epi64(kAllPairs, u[q], low, u[4 + q]));
    _mm512_storeu_si512(dst + (kColumn[q] + 4) * ld_dst,
                        _mm512_maskz_permutex2var_epi64(kAllPairs, u[q], high, u[4 + q]));
  }
}
#endif

// dst[k * ld_dst + i] = src[i * ld_src + k] for 32- or 64-bit words k in [k_begin, k_end) of rows i in [0,
// rows): AMX's B operand from the rounded particles (their bf16 feature pairs), the A operand P^T of
// rbf_kernel_backward, and rbf_kernel's lower triangle. Blocks of one cache line of each source row (16 or 8
// words) by 64 rows (a 256- or 512-byte run of each destination row), so that both sides move whole lines;
// in the AVX-512 build whole 16 x 16 (8 x 8) blocks are transposed in registers. (ATen's transposing copy
// took 15.7 ms at 256 x 76,800, a quarter of the step.)
template <typename W>
BMT_FAST_INLINE void transpose_words_impl(const W* src, int64_t ld_src, int64_t rows, int64_t k_begin, int64_t k_end,
                                          W* dst, int64_t ld_dst) {
  constexpr int64_t kLine = 64 / sizeof(W);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kLine) {
    const int64_t k1 = min64(k0 + kLine, k_end);
    for (int64_t i0 = 0; i0 < rows; i0 += 64) {
      const int64_t i1 = min64(i0 + 64, rows);
      int64_t i_scalar = i0;
#ifdef BMT_FAST_32_VECTOR_REGISTERS
      if (k1 - k0 == kLine) {
        for (; i_scalar + kLine <= i1; i_scalar += kLine) {
          if constexpr (sizeof(W) == 4)
            transpose_16x16_words(src + i_scalar * ld_src + k0, ld_src, dst + k0 * ld_dst + i_scalar, ld_dst);
          else
            transpose_8x8_words(src + i_scalar * ld_src + k0, ld_src, dst + k0 * ld_dst + i_scalar, ld_dst);
        }
      }
#endif
      for (int64_t k = k0; k < k1; ++k) {
        W* out = dst + k * ld_dst;
        for (int64_t i = i_scalar; i < i1; ++i) out[i] = src[i * ld_src + k];
      }
    }
  }
}

// ---- streamed stores, and whether what is stored is finite ------------------------------------------

// A full vector of the output, written around the caches when it is a whole aligned cache line (the
// AVX-512 build): phi is written once and not read again, so this saves the read-for-ownership of each
// line. Half lines (AVX2) are not streamed one at a time: written a vector at a time across many rows,
// partial lines left the write-combining buffers half full (twice as slow as plain stores on a Zen 3);
// the AVX2 build streams whole lines (stream_line).
template <typename In, typename T>
BMT_FAST_INLINE void stream_as(In* p, vec_t<T> v) {
#ifdef BMT_FAST_32_VECTOR_REGISTERS
  static_assert(kVectorBytes == 64, "the AVX-512 build streams whole 64-byte lines");
  if constexpr (std::is_same_v<In, float> && std::is_same_v<T, float>) {
    if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) {
      _mm512_stream_ps(p, reinterpret_cast<__m512&>(v));
      return;
    }
  } else if constexpr (std::is_same_v<In, double> && std::is_same_v<T, double>) {
    if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) {
      _mm512_stream_pd(p, reinterpret_cast<__m512d&>(v));
      return;
    }
  }
#endif
  store_as<In, T>(p, v, kLanes<T>);
}

// The AVX2 build's whole lines: V vectors that make one aligned 64-byte line of the output, streamed back
// to back so that each write-combining buffer fills at once (fp32 / fp64 output only); in the AVX-512 build
// V whole lines, each streamed as stream_as does. Returns false, and stores nothing, where that does not
// apply.
template <typename In, typename T, int V>
BMT_FAST_INLINE bool stream_line(In* p, const vec_t<T> (&v)[V]) {
#ifdef BMT_FAST_32_VECTOR_REGISTERS
  if constexpr (std::is_same_v<In, T>) {  // (AVX-512: each vector a whole line, as stream_as streams them)
    for (int i = 0; i < V; ++i) stream_as<In, T>(p + i * kLanes<T>, v[i]);
    return true;
  }
#endif
#if BMT_FAST_VECTOR_BYTES == 32 && !defined(BMT_FAST_32_VECTOR_REGISTERS)
  if constexpr (std::is_same_v<In, T> && V * kVectorBytes == 64) {
    if ((reinterpret_cast<uintptr_t>(p) & 63) != 0) return false;
    for (int i = 0; i < V; ++i) {
      if constexpr (std::is_same_v<T, float>) _mm256_stream_ps(p + i * kLanes<T>, reinterpret_cast<const __m256&>(v[i]));
      else _mm256_stream_pd(p + i * kLanes<T>, reinterpret_cast<const __m256d&>(v[i]));
    }
    return true;
  }
#endif
  (void)p;
  (void)v;
  return false;
}

BMT_FAST_INLINE void stream_fence() {
#if BMT_FAST_VECTOR_BYTES >= 32
  _mm_sfence();
#endif
}

// The largest compute-type value that stays finite when stored as In (round to nearest even).
template <typename In, typename T>
constexpr T largest_storable() {
  if constexpr (std::is_same_v<In, c10::Half>) return T(0x1.ffdffep+15f);  // below 65520 (rounds to Inf)
  else if constexpr (std::is_same_v<In, c10::BFloat16>) return T(0x1.fefffep+127f);  // below bits 0x7F7F8000
  else return std::numeric_limits<T>::max();
}

// The apply pass tracks whether phi is finite while its values are in registers, so the API need not
// scan phi again (a whole pass over it). `bad` gets 0 in a lane for a value that is finite once stored as
// In, NaN otherwise (a NaN stays NaN), over the first count lanes: 0 * v is NaN exactly for NaN/Inf v.
template <typename In, bool Full, typename T>
BMT_FAST_INLINE void track_finite(vec_t<T>& bad, vec_t<T> v, int64_t count) {
  if constexpr (!Full) {
    for (int64_t i = count; i < kLanes<T>; ++i) v[i] = T(0);
  }
  if constexpr (std::is_same_v<In, T>) {
    bad += v * T(0);
  } else {  // a narrower output: finite values past its range round to Inf
    const T top = largest_storable<In, T>();
    bad += (v <= top) & (v >= -top) ? vec_t<T>{} : broadcast(std::numeric_limits<T>::quiet_NaN());
  }
}

// track_finite for a register block's vectors, into four independent parts that reach bad by one addition
// (into). bad is carried from one vector of columns to the next, and with every vector register taken by the
// block GCC keeps it on the stack: one dependent addition per row (a store forwarded to the next row's load)
// had made a chain of ~11 cycles a row, 176 a vector of 16 rows, longer than the block's 288 FMAs take (perf
// of the apply pass, cache-resident, 2-core Zen 5 VM).
template <typename T>
struct FiniteParts {
  vec_t<T> part[4] = {};
  template <typename In, bool Full>
  BMT_FAST_INLINE void add(int i, vec_t<T> v, int64_t count) {
    track_finite<In, Full, T>(part[i & 3], v, count);
  }
  BMT_FAST_INLINE void into(vec_t<T>& bad) const { bad += (part[0] + part[1]) + (part[2] + part[3]); }
};

// The first `rows` of a block's R vectors.
template <typename In, bool Full, typename T, int R>
BMT_FAST_INLINE void track_finite_block(vec_t<T>& bad, const vec_t<T> (&v)[R], int rows, int64_t count) {
  FiniteParts<T> seen;
  for (int r = 0; r < R && r < rows; ++r) seen.template add<In, Full>(r, v[r], count);
  seen.into(bad);
}

}  // namespace
}  // namespace bmt_fast::cpu::BMT_FAST_ISA
