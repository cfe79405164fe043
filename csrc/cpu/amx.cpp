// bf16 on tensor cores (AMX): every op on bf16 particles with a CPU that has AMX tiles.
//
// With bf16 particles on a CPU with AMX (Sapphire Rapids and later: oneDNN's batch-reduce GEMM through
// ATen's cpublas::brgemm), the tiled step and the median take the GPU kernels' precision: the centred
// particles rounded to bf16 for S = A B^T, fp32 accumulation, K in fp32 (its row sums too), then K
// rounded to bf16 times W = score - (2/H) xc rounded to bf16 (or times score and xc apart: amx_step_splits),
// accumulated in fp32. The median is that of
// the distances of the rounded particles (median_bandwidth gives the same value). Row blocks go to the
// threads; each streams column blocks of all particles (full rows: no symmetry, as the tiles need no
// write to another thread's rows). BMT_FAST_CPU_AMX=0 keeps bf16 on the fp32 path.
//
// fp32 particles take this path too where torch's fp32 matmul precision for oneDNN is bf16
// (torch.set_float32_matmul_precision("medium"), or torch.backends.mkldnn.matmul.fp32_precision = "bf16"):
// that setting lets ATen's fp32 GEMMs, the fp32 path's among them, multiply bf16-rounded operands on this
// CPU, so the results are of that precision either way, and this path is the faster (fp32 results, the
// inputs read as they are; the operands are the same bf16 ones).

#include <ATen/native/CPUBlas.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "median_select.h"
#include "paths.h"

namespace bmt_fast::cpu {

bool use_amx(const at::Tensor& x) {  // (float32_matmul_in_bf16: kernels.h)
  const auto type = x.scalar_type();
  return x.size(1) >= kAmxMinFeatures && bf16_amx_enabled() &&
         (type == at::kBFloat16 || (type == at::kFloat && float32_matmul_in_bf16()));
}

// Few particles on AMX, by feature chunks.
//
// With few particles and many features the tiled step's operands (xb, its transpose b_s and W, each as
// large as x) go to memory and come back: about a dozen passes over n x d values where the step needs four
// (x twice, score once, phi written). Here the threads take chunks of features instead, as on the Gram
// path: the Gram pass takes each chunk's column means (the same shift as amx_shift's), centres, rounds and
// transposes the chunk in L2 and adds its dot products into the thread's own n x n sums (their upper
// triangle by blocks of kAmxRows rows: 3/4 of the products at 256 particles, 5/8 at 512); the apply pass
// forms a chunk of W, multiplies it by K and finishes phi while the chunk's x and score are still in L2.
// Each pass prefetches the next chunk's rows into L2 while the current one is multiplied. The arithmetic
// is the tiled AMX step's (the same bf16 operands, fp32 sums), the dot products summed in another order
// (a part of the chunks per thread, then the parts' sums in order: the same bits whichever thread ran which).
//
// Where: from kAmxChunkedMinFeatures(n_pad) features, up to 512 particles (the n x n sums per thread and K
// stay in L2). With fewer features there are too few chunks for the threads, and with more particles the
// tiled path's symmetry and its tiles' reuse win. 2-core Xeon (Emerald Rapids), bf16 step, alternating,
// tiled -> chunked (ms): 128 x 512 0.145 -> 0.103, 128 x 1024 0.27 -> 0.17, 128 x 4096 1.04 -> 0.56,
// 128 x 76,800 27.4 -> 9.4; 256 x 512 0.30 -> 0.33, 256 x 2048 level, 256 x 4096 1.8 -> 1.65, 256 x
// 76,800 42 -> 27; 384 x 8192 7.2 -> 6.8; 512 x 4096 4.5 -> 6.0, 512 x 8192 9.5 -> 11, 512 x 12,288
// level, 512 x 20,000 27.8 -> 23, 512 x 32,768 52 -> 41. Chunks of 128 features (the same at 64, slower
// from 256: 256 x 76,800 27 -> 29 ms at 256, 33 ms at 512).
constexpr int64_t kAmxChunkedMaxParticles = 512;
constexpr int64_t kAmxFeatureChunk = 128;  // a multiple of 32 (AMX's bf16 depth) and of 16 (transpose_words)

int64_t amx_chunked_min_features(int64_t n_pad) {
  return n_pad <= 128 ? 512 : n_pad * n_pad / 16;
}

bool use_amx_chunked(int64_t n, int64_t d) {
  const int64_t n_pad = (n + 31) / 32 * 32;
  return n_pad <= kAmxChunkedMaxParticles && d >= amx_chunked_min_features(n_pad);
}

// Up to how many particles "auto" takes the Gram path where the AMX path would take the same particles
// (bf16, or fp32 under bf16 matmuls; from 32 features): 32 where the AMX path would take 33 by feature
// chunks (from 512 features), which is faster there. 2-core Xeon, bf16 step, alternating, Gram -> chunked
// AMX (ms): 64 x 76,800 8.1-8.3 -> 4.4-4.7, 64 x 409,600 45-49 -> 24-27, 64 x 8192 0.77-0.85 -> 0.48-0.58,
// 48 x 76,800 4.6 -> 3.4, 48 x 2048 0.14 -> 0.10-0.13; 32 x 76,800 and 32 x 8192 level, 16 x 409,600
// 3.3-3.4 -> 6.1-6.3.
constexpr int64_t kAmxGramMaxParticles = 32;

// Otherwise, on AMX shapes, up to kGramMaxParticles and up to kGramWideMaxParticles where n^2 <= 8 d: there the
// Gram pass and the packed apply pass beat the GEMMs by feature chunks. 2-core Xeon (Emerald Rapids), fp32,
// best of 2 alternating rounds, the step with H given, Gram / chunks (ms): 65 x 1024 0.17 / 0.27, 96 x 2048
// 0.48 / 0.67, 128 x 2048 0.84 / 0.97, 128 x 4096 1.43 / 1.89, 160 x 12,288 6.2 / 7.5, 192 x 12,288 8.4 /
// 9.4; past the rule 128 x 1024 0.57 / 0.54, 192 x 2048 1.89 / 1.75, 192 x 4096 3.4 / 3.4 (by the median
// rule 3.8 / 3.4), 96 x 512 0.24 / 0.22, 256 x 12,288 and 256 x 32,768 level; fp64 gained more (128 x 2048
// 1.46 / 2.24, 65 x 8192 1.6 / 3.5). Against the previous build, 3 rounds, fp32, the step with H given:
// 128 x 76,800 27-36 -> 23-25, 160 x 76,800 49-50 -> 35-40, 192 x 76,800 54-66 -> 48-56, 96 x 409,600
// 118-126 -> 72-75; rbf_kernel(x) 128 x 76,800 12.4-15.5 -> 8.2-11.2, 96 x 409,600 55-57 -> 25-26, 192 x
// 76,800 level, 192 x 20,000 6.5-6.9 -> 7.1-7.3. (That rule, n <= 64 at any d, was every shape's until
// 2026-12-05; it is kept where AMX would take the particles, which no later session could measure.)
int64_t amx_gram_max_particles(const at::Tensor& x) {
  if (use_amx_chunked(kAmxGramMaxParticles + 1, x.size(1))) return kAmxGramMaxParticles;
  // (floor(sqrt(8 d)): exact for the d below 192^2 / 8 that the clamp leaves, as sqrt is correctly rounded)
  const auto wide = static_cast<int64_t>(std::sqrt(8.0 * static_cast<double>(x.size(1))));
  return std::clamp(wide, kGramMaxParticles, kGramWideMaxParticles);
}

namespace {

constexpr int64_t kAmxRows = 128;   // rows per block: its (rows x d) fp32 accumulator stays in L2 to d ~ 1024
constexpr int64_t kAmxCols = 512;   // columns per block (a multiple of 32: AMX's bf16 depth)
constexpr int64_t kAmxFinishCols = 1024;  // the step's K W by feature chunks (d >= 2048): a 512 KiB accumulator
constexpr int64_t kAmxKeptColumns = 1024;  // ... when a block's K rows (<= 256 KiB of bf16) are kept for it
constexpr int64_t kAmxFusedTransposeFeatures = 16384;  // AmxOperands: B transposed by blocks of 16 rows up to here

// Whether the AMX step and median run in one team (team.h): up to kAmxTeamMaxParticles particles. bf16, 2
// threads, PASSIVE, alternating, 3 rounds, separate regions -> one team (us unless ms): the step with H given
// 256 x 64 320-325 -> 121-123, 512 x 128 498-593 -> 265-342, 1024 x 64 699-753 -> 482-497, 130 x 2001
// 566-633 -> 380-392, 256 x 8192 2.61-2.82 -> 2.26-2.33 ms; by the median rule 512 x 128 1.21-1.27 ->
// 0.65-0.67 ms; median_bandwidth 1024 x 64 975-986 -> 625-705, 2048 x 256 2.96-2.97 -> 2.56-2.64 ms. Beyond,
// in a team the second thread ran its share of the step's AMX blocks slower (8192 x 64 with H given: 22.4
// against 17.5 ms for the first thread's; 17.4 and 17.3 in separate regions; not understood; the step
// 18.3-18.7 -> 23.0-23.7 ms, 4096 x 128 6.5-6.6 -> 7.0-7.2 ms), where the threads' wake-ups are a small
// share anyway.
constexpr int64_t kAmxTeamMaxParticles = 2048;
bool amx_in_team(int64_t n) { return n <= kAmxTeamMaxParticles; }

// f(Typed<In>{}) with In the AMX path's particle type for x's dtype (fp32, else bf16).
template <typename T>
struct Typed {
  using type = T;
};
template <typename F>
decltype(auto) amx_dispatch(const at::Tensor& x, F&& f) {
  if (x.scalar_type() == at::kFloat) return f(Typed<float>{});
  return f(Typed<at::BFloat16>{});
}

// The row stride (32-bit words) of an AMX B operand of `words` words a row: whole cache lines and one more.
// A tile load reads 16 rows; a stride that is a multiple of 4 KiB (n_pad or d a multiple of 1024) put all
// of them in one 12-way L1 set, each B tile evicting itself (2-core Xeon, alternating: bf16 rbf_kernel
// 1024 x 8192 ~10 -> ~8.9 ms, 2048 x 2048 ~10.2 -> ~8.5 ms).
int64_t amx_b_stride(int64_t words) {
  return (words + 15) / 16 * 16 + 16;
}

// The same for an A operand of `cols` bf16 columns (a multiple of 32: its tiles also load 16 rows).
int64_t amx_a_stride(int64_t cols) {
  return 2 * amx_b_stride(cols / 2);
}

// bf16 pairs as one 32-bit word (AMX's B operand interleaves rows in pairs: the pair of row k and k + 1
// of column j is word j of pair-row k / 2).
const at::BFloat16* as_bf16(const at::Tensor& words) {
  return reinterpret_cast<const at::BFloat16*>(words.const_data_ptr<int32_t>());
}

// The shift of a column of bf16 particles whose values lie in [lo, hi], from their mean and variance (the mean
// square deviation), d the number of columns (the rule of the Triton kernels, kernels/centring.py:
// exact_bf16_shift): the mean on the grid of the column's coarsest bf16 ulp where every x - shift is then exact
// in bf16 (all x of one sign and beyond shift / 2: |x - shift| < |x|, a multiple of x's ulp), else 0 (x itself,
// exact); taken where it lies within sqrt(15) standard deviations of the mean (the values' rms about it at most
// 4 times that about the mean) and keeps every |x - shift|^2 d within 2^120 (fp32's range); else the fp32 mean.
// Centring by the fp32 mean and rounding x - mean to bf16 had thrown away the particles' own low bits wherever
// the centred values were no smaller than x: two clusters 0.05 wide whose centres differ by ~10 per feature
// gave K 4e-2 and x's gradient 0.2 off. Taking 0 wherever no exact shift existed had put a tight cloud far from
// 0 with one particle below half its mean uncentred into the expansion |a|^2 + |b|^2 - 2 a.b (K 0.1 off), and
// values {L, 3L} at L = 1e18 past fp32's range (NaN).
// A mean that is not finite (a NaN or Inf particle) is kept: the centred column is flagged as before.
float exact_bf16_shift(double mean, double var, float lo, float hi, int64_t d) {
  if (!std::isfinite(mean)) return static_cast<float>(mean);
  double shift = 0.0;  // (x itself)
  const bool one_sign = lo > 0.0f || hi < 0.0f;
  const float big = std::max(std::fabs(lo), std::fabs(hi));
  if (one_sign && std::isfinite(big) && big >= std::numeric_limits<float>::min() * 256.0f) {
    // bf16's ulp at big (8 significant bits: 2^(e - 7) for big in [2^e, 2^(e + 1))), from big's exponent bits;
    // mean / ulp rounded to the nearest integer, ties to even (|mean / ulp| < 2^9: the 1.5 * 2^52 shifter)
    uint32_t bits = 0;
    std::memcpy(&bits, &big, sizeof(bits));
    const uint32_t ulp_bits = (bits & 0x7f800000u) - (7u << 23);
    float ulp = 0.0f;
    std::memcpy(&ulp, &ulp_bits, sizeof(ulp));
    constexpr double kShifter = 6755399441055744.0;
    const double rounded = ((mean / ulp + kShifter) - kShifter) * ulp;
    if (lo > 0.0f ? lo > rounded / 2 : hi < rounded / 2) shift = rounded;
  }
  const double moved = mean - shift;
  const double reach = std::max(std::fabs(lo - shift), std::fabs(hi - shift));
  const bool keep = moved * moved <= 15.0 * var && reach * reach * static_cast<double>(d) <= std::ldexp(1.0, 120);
  return static_cast<float>(keep ? shift : mean);
}

// Adds each column's squared deviations from means[k] over rows [0, rows) of x (row stride d, columns [0, width))
// into sq[k], in double (exact_bf16_shift's variance).
template <typename In>
void add_sq_deviations(const In* x, int64_t d, int64_t rows, int64_t width, const double* means, double* sq) {
  for (int64_t r = 0; r < rows; ++r) {
    const In* row = x + r * d;
    for (int64_t k = 0; k < width; ++k) {
      const double v = static_cast<double>(static_cast<float>(row[k])) - means[k];
      sq[k] += v * v;
    }
  }
}

// A column's shift for the distances from its mean, variance and range: exact_bf16_shift for bf16 particles,
// the mean rounded to fp32 for fp32 ones (whose operands are rounded anyway; var, lo and hi unread).
template <typename In>
float amx_column_shift(double mean, double var, float lo, float hi, int64_t d) {
  if constexpr (std::is_same_v<In, at::BFloat16>) {
    return exact_bf16_shift(mean, var, lo, hi, d);
  } else {
    return static_cast<float>(mean);
  }
}

// The largest |x - shift| of a column whose values lie in [lo, hi].
double column_spread(float lo, float hi, float shift) {
  return std::max(std::fabs(static_cast<double>(lo) - shift), std::fabs(static_cast<double>(hi) - shift));
}

// The AMX path's shift of x's rows, and of y's too when given (bf16 or fp32, contiguous, the same columns
// and dtype), from float64 sums, d fp32 values: amx_column_shift of each column (its range from the same
// pass as the sums), for the distances and the step's Xs alike; and the largest |x - shift| of all.
struct AmxShift {
  at::Tensor shift;
  double spread;
};

AmxShift amx_shift_and_spread(const at::Tensor& x, const at::Tensor* y = nullptr) {
  const int64_t d = x.size(1);
  std::vector<double> total(d, 0.0), sums(d);
  std::vector<float> lo(d, std::numeric_limits<float>::infinity()), part_lo(d);
  std::vector<float> hi(d, -std::numeric_limits<float>::infinity()), part_hi(d);
  int64_t rows = 0;
  for (const at::Tensor* t : {&x, y}) {
    if (t == nullptr) continue;
    const int64_t n = t->size(0);
    amx_dispatch(*t, [&](auto typed) {
      const auto* p = t->const_data_ptr<typename decltype(typed)::type>();
      parallel_for(0, (d + 255) / 256, 1, [&](int64_t begin, int64_t end) {
        amx_column_sums(p, d, n, begin * 256, std::min(end * 256, d), sums.data(), part_lo.data(), part_hi.data());
      });
    });
    for (int64_t k = 0; k < d; ++k) {
      total[k] += sums[k];
      lo[k] = std::min(lo[k], part_lo[k]), hi[k] = std::max(hi[k], part_hi[k]);
    }
    rows += n;
  }
  AmxShift out{at::empty({d}, x.options().dtype(at::kFloat)), 0.0};
  float* shift_p = out.shift.mutable_data_ptr<float>();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  std::vector<double> means(d), var(d, 0.0);
  for (int64_t k = 0; k < d; ++k) means[k] = total[k] / static_cast<double>(rows);
  if (bf16) {  // (a second pass: the variances about the means, for exact_bf16_shift)
    for (const at::Tensor* t : {&x, y}) {
      if (t == nullptr) continue;
      const auto* p = t->const_data_ptr<at::BFloat16>();
      parallel_for(0, (d + 255) / 256, 1, [&](int64_t begin, int64_t end) {
        const int64_t c0 = begin * 256;
        add_sq_deviations(p + c0, d, t->size(0), std::min(end * 256, d) - c0, means.data() + c0, var.data() + c0);
      });
    }
  }
  for (int64_t k = 0; k < d; ++k) {
    const double mean = means[k], variance = var[k] / static_cast<double>(rows);
    shift_p[k] = bf16 ? amx_column_shift<at::BFloat16>(mean, variance, lo[k], hi[k], d)
                      : amx_column_shift<float>(mean, variance, lo[k], hi[k], d);
    out.spread = std::max(out.spread, column_spread(lo[k], hi[k], shift_p[k]));
  }
  return out;
}

at::Tensor amx_shift(const at::Tensor& x, const at::Tensor* y = nullptr) {
  return amx_shift_and_spread(x, y).shift;
}

// The particles centred (by shift, amx_shift(x) unless given) and rounded to bf16 (n_pad x d_pad, zero
// padding; row stride ld_x), their norms in fp32, and unless as_b is false xb^T as AMX's B operand (d_pad/2
// x n_pad words, row stride ld_s: each the bf16 pair of features 2k, 2k + 1 of one particle, i.e. the 32-bit
// transpose of xb). x: bf16 or fp32 (dtype: the results' type), contiguous.
struct AmxOperands {
  int64_t n, n_pad, d, d_pad;
  int64_t ld_x;      // xb's row stride in bf16 (columns [d, ld_x) zero; AMX's products take d_pad of them)
  int64_t ld_s = 0;  // b_s's row stride in words (amx_b_stride)
  at::ScalarType dtype;
  at::Tensor shift, xb, norms, b_s;
  double spread = 0.0;  // the largest |x - shift| (the self operands' constructor only)

  explicit AmxOperands(const at::Tensor& x) : AmxOperands(x, amx_shift_and_spread(x)) {}
  AmxOperands(const at::Tensor& x, const AmxShift& shifted) : AmxOperands(x, shifted.shift) {
    spread = shifted.spread;
  }
  AmxOperands(const at::Tensor& x, at::Tensor shift_, bool as_b = true)
      : n(x.size(0)), d(x.size(1)), dtype(x.scalar_type()), shift(std::move(shift_)) {
    n_pad = (n + 31) / 32 * 32;
    d_pad = (d + 31) / 32 * 32;
    ld_x = amx_a_stride(d_pad);
    // (the operands from the huge-page allocator, as the accumulator and phi)
    xb = empty_large({n_pad, ld_x}, x.options().dtype(at::kBFloat16));
    xb.narrow(0, n, n_pad - n).zero_();
    norms = at::empty({n}, x.options().dtype(at::kFloat));
    const float* shift_p = shift.const_data_ptr<float>();
    auto* xb_p = xb.mutable_data_ptr<at::BFloat16>();
    float* norms_p = norms.mutable_data_ptr<float>();
    const auto* words = reinterpret_cast<const uint32_t*>(xb.const_data_ptr<at::BFloat16>());
    uint32_t* b_s_words = nullptr;
    if (as_b) {
      ld_s = amx_b_stride(n_pad);
      b_s = empty_large({d_pad / 2, ld_s}, x.options().dtype(at::kInt));
      b_s_words = reinterpret_cast<uint32_t*>(b_s.mutable_data_ptr<int32_t>());
    }
    // Up to kAmxFusedTransposeFeatures by blocks of 16 rows: centred, rounded, and (as_b) transposed into
    // b_s's columns while still in L2 (a transpose of all of xb afterwards read it 16 KB apart at d = 8192,
    // beyond the prefetchers). Beyond, a block of rows overflows L2 and each word row of b_s would be
    // written a line at a time by 16 row blocks: the transpose takes whole word rows after the centring.
    // 2-core Xeon, rbf_kernel bf16, alternating (ms): 1024 x 8192 12.5-13.5 -> 11.1-12.0, 2048 x 2048
    // 10.1-11.2 -> 9.7-10.1, 256 x 76,800 25.4-29.4 -> 28.7-29.7 (so not there).
    amx_dispatch(x, [&](auto typed) {
      const auto* x_p = x.const_data_ptr<typename decltype(typed)::type>();
      const bool fused = as_b && d_pad <= kAmxFusedTransposeFeatures;
      parallel_for(0, n_pad / 16, 4, [&](int64_t begin, int64_t end) {
        for (int64_t block = begin; block < end; ++block) {
          const int64_t i0 = block * 16, i1 = std::min(i0 + 16, n);
          double sq[16] = {};
          if (i0 < n) amx_centre_rows(x_p + i0 * d, d, d, shift_p, 0, i1 - i0, xb_p + i0 * ld_x, ld_x, sq, 0);
          for (int64_t a = i0; a < i1; ++a) norms_p[a] = static_cast<float>(sq[a - i0]);
          if (fused) transpose_words(words + i0 * (ld_x / 2), ld_x / 2, 16, 0, d_pad / 2, b_s_words + i0, ld_s);
        }
      });
      if (!as_b || fused) return;
      parallel_for(0, (d_pad / 2 + 15) / 16, 1, [&](int64_t begin, int64_t end) {
        transpose_words(words, ld_x / 2, n_pad, begin * 16, std::min(end * 16, d_pad / 2), b_s_words, ld_s);
      });
    });
  }
};

// S = the dot products of rows [i0, i0 + rows) of a with rows [j0, j0 + cols) of b (their xb and b_s) in
// fp32 (row stride ldc) by brgemm. With d_pad >= 1024 in depth chunks of 512 accumulated in S:
// whole, a 128 x 512 block's operands (512 KiB + 2 MiB at d = 2048) overflow a 2 MiB L2 (2-core Xeon,
// rbf_kernel 2048 x 2048: 24.6 -> 18.7 ms; 1024 x 8192: 35 -> 23 ms; at d = 768 one call was faster).
void amx_dots(const AmxOperands& a, const AmxOperands& b, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
              float* s, int64_t ldc) {
  const int64_t d_pad = a.d_pad, chunk = d_pad >= 1024 ? 512 : d_pad;
  const auto* xb_p = a.xb.const_data_ptr<at::BFloat16>() + i0 * a.ld_x;
  const auto* bs_p = as_bf16(b.b_s) + j0 * 2;  // (pair row k/2 of b_s: k/2 * ld_s words, 2 bf16 each)
  for (int64_t k0 = 0; k0 < d_pad; k0 += chunk)
    at::native::cpublas::brgemm(rows, cols, std::min(chunk, d_pad - k0), a.ld_x, b.ld_s, ldc, /*add_C=*/k0 > 0,
                                xb_p + k0, bs_p + k0 * b.ld_s, s);
}

// The dot products of the particles of op with each other on AMX, the upper triangle by tiles: blocks of
// kAmxRows rows, each with its tiles of kAmxCols columns from the block's diagonal on, every thread computing
// and visiting its own tiles. A block's share of the upper triangle shrinks with its index, so the blocks go
// out in pairs b and last - b, every pair about the same work. make_visit() gives a thread's visitor (with
// its own buffers); visit(s, i0, rows, j0, cols) gets a tile's fp32 dots (rows x cols, row stride cols) in
// the thread's buffer s, which it may overwrite.
template <typename MakeVisit>
void for_each_upper_amx_tile(const AmxOperands& op, MakeVisit&& make_visit) {
  const int64_t blocks = (op.n + kAmxRows - 1) / kAmxRows;
  parallel_for(0, (blocks + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(kAmxRows * kAmxCols);
    auto visit = make_visit();
    const auto rows_of = [&](int64_t block) {
      const int64_t i0 = block * kAmxRows, rows = std::min(kAmxRows, op.n - i0);
      for (int64_t j0 = i0; j0 < op.n; j0 += kAmxCols) {
        const int64_t cols = std::min(kAmxCols, op.n - j0);
        amx_dots(op, op, i0, rows, j0, cols, s.data(), cols);
        visit(s.data(), i0, rows, j0, cols);
      }
    };
    for (int64_t pair = begin; pair < end; ++pair) {
      rows_of(pair);
      if (blocks - 1 - pair != pair) rows_of(blocks - 1 - pair);
    }
    at::native::cpublas::brgemm_release();
  });
}

// The median's tiles (median_select.h) on AMX: for_each_upper_amx_tile's. (One shared tile at a time, its
// rows split across the threads, left them waiting at two barriers per tile.)
struct AmxTiles {
  static constexpr int64_t kSelectMaxParticles = kMedianSelectMaxParticles;
  const AmxOperands& operands;
  float* kept = nullptr;  // or all n x n dot products, written as the tiles go by (row stride n)

  template <typename Visit>
  void operator()(Visit&& visit) const {
    const at::TensorOptions options = operands.norms.options();
    const int64_t n = operands.n;
    for_each_upper_amx_tile(operands, [&] {
      return [&](float* s, int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
        if (kept != nullptr) {  // the tile, and its transpose below it (a diagonal block: the same values)
          for (int64_t r = 0; r < rows; ++r)
            std::memcpy(kept + (i0 + r) * n + j0, s + r * cols, cols * sizeof(float));
          transpose_words(reinterpret_cast<const uint32_t*>(s), cols, rows, 0, cols,
                          reinterpret_cast<uint32_t*>(kept + j0 * n + i0), n);
        }
        visit(at::from_blob(s, {rows, cols}, options), i0, j0, 0, rows);
      };
    });
  }
};

// kept: as AmxTiles::kept.
double median_sq_dist_amx(const AmxOperands& operands, float* kept = nullptr) {
  const AmxTiles tiles{operands, kept};
  // (the window's sample reads the rounded particles as they are: bf16; an fp32 copy of them cost more than
  // the sample at 1024 x 8192)
  return median_sq_dist<float>(operands.xb.narrow(0, 0, operands.n), operands.norms, tiles);
}

// rbf_kernel on AMX: K (a.n x b.n, the particles' dtype) between the particles of a and those of b
// (centred by the same shift; one object for a self kernel, whose own terms are exactly 1), computed as the
// step's K (bf16: rounded as the step's): blocks of 128 rows stream 512-column blocks of b, each tile's
// epilogue writing its values straight into K.
template <typename In>
at::Tensor rbf_kernel_amx(const AmxOperands& a, const AmxOperands& b, double h) {
  const bool self = &a == &b;
  const int64_t n = a.n, m = b.n;
  at::Tensor k = empty_large({n, m}, a.xb.options().dtype(a.dtype));
  const float* na_p = a.norms.const_data_ptr<float>();
  const float* nb_p = b.norms.const_data_ptr<float>();
  auto* k_p = k.mutable_data_ptr<In>();
  const float inv_h = inverse_bandwidth<float>(h);
  parallel_for(0, (n + kAmxRows - 1) / kAmxRows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(kAmxRows * kAmxCols);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i0 = block * kAmxRows, rows = std::min(kAmxRows, n - i0);
      for (int64_t j0 = 0; j0 < m; j0 += kAmxCols) {
        const int64_t cols = std::min(kAmxCols, m - j0);
        amx_dots(a, b, i0, rows, j0, cols, s.data(), kAmxCols);
        // (two sets: a diagonal offset of m puts no own term in any tile)
        amx_rbf_from_dots(s.data(), kAmxCols, rows, cols, cols, na_p + i0, nb_p + j0, inv_h, self ? i0 - j0 : m,
                          /*own_one=*/true, k_p + i0 * m + j0, m, /*rowsum=*/nullptr);
      }
    }
    at::native::cpublas::brgemm_release();
  });
  return k;
}

// A self kernel on AMX: K is symmetric, so a block of kAmxRows rows computes only its tiles from its own
// diagonal on (for_each_upper_amx_tile: about half the dot products and exps) and writes the columns right of
// its diagonal block a second time, transposed, below it. Every entry is written once (the entries left of a
// block's diagonal block are earlier blocks' transposes) and K[j][i] == K[i][j] exactly. A tile's K goes to
// the thread's own buffers first, as it is and transposed (bf16 as 32-bit words that hold a pair of rows:
// bf16_row_pairs, then transpose_words, which puts whole words into K's rows only with an even n: an odd n
// computes both triangles), and from there into K in whole streamed lines.
template <typename In>
at::Tensor rbf_kernel_amx_self(const AmxOperands& a, double h) {
  constexpr bool kBf16 = std::is_same_v<In, at::BFloat16>;
  constexpr int64_t kWordsPerRow = kBf16 ? kAmxRows / 2 : kAmxRows;  // a transposed tile's row, in words
  const int64_t n = a.n;
  at::Tensor k = empty_large({n, n}, a.xb.options().dtype(a.dtype));
  const float* norms_p = a.norms.const_data_ptr<float>();
  In* k_p = k.mutable_data_ptr<In>();
  const float inv_h = inverse_bandwidth<float>(h);
  const int64_t row_bytes = n * static_cast<int64_t>(sizeof(In));
  for_each_upper_amx_tile(a, [&] {
    return [&, rowsum = std::vector<float>(kAmxRows), tile = std::vector<In>(kAmxRows * kAmxCols),
            pairs = std::vector<uint32_t>(kBf16 ? kAmxRows / 2 * kAmxCols : 0),
            transposed = std::vector<uint32_t>(kAmxCols * kWordsPerRow)](
               float* s, int64_t i0, int64_t rows, int64_t j0, int64_t cols) mutable {
      // (with a row-sum buffer the epilogue stores the tile into the caches: it is read again below)
      amx_rbf_from_dots(s, cols, rows, cols, cols, norms_p + i0, norms_p + j0, inv_h, i0 - j0, /*own_one=*/true,
                        tile.data(), kAmxCols, rowsum.data());
      stream_rows(tile.data(), kAmxCols * sizeof(In), rows, cols * sizeof(In), k_p + i0 * n + j0, row_bytes);
      const int64_t first = std::max(j0, i0 + rows) - j0;  // the tile's first column right of the diagonal block
      if (first >= cols) return;
      const auto* right = reinterpret_cast<const uint32_t*>(tile.data() + first);
      if constexpr (kBf16) {  // (rows is even: n is, and i0 a multiple of kAmxRows)
        bf16_row_pairs(tile.data() + first, kAmxCols, 0, rows / 2, cols - first, pairs.data(), kAmxCols);
        right = pairs.data();
      }
      const int64_t words = kBf16 ? rows / 2 : rows;
      transpose_words(right, kAmxCols, words, 0, cols - first, transposed.data(), kWordsPerRow);
      stream_rows(transposed.data(), kWordsPerRow * 4, cols - first, words * 4, k_p + (j0 + first) * n + i0,
                  row_bytes);
    };
  });
  return k;
}

// From how many features a self kernel takes rbf_kernel_amx_self: there the dot products it saves outweigh
// its copies and transposes. 2-core Xeon, alternating with both triangles (ms): bf16 8192 x 64 13.0 -> 14.6,
// 8192 x 128 level, 8192 x 192 21.3 -> 20.0, 4096 x 256 6.6 -> 5.4, 4096 x 768 19.2 -> 13.8, 2048 x 2048
// 14.6 -> 11.6; fp32 4096 x 128 4.3 -> 5.4, 4096 x 256 9.1 -> 7.6, 2048 x 2048 14.7 -> 10.9.
constexpr int64_t kAmxSymmetricMinFeatures = 256;

at::Tensor rbf_kernel_amx(const AmxOperands& a, const AmxOperands& b, double h) {
  const bool symmetric = &a == &b && a.d >= kAmxSymmetricMinFeatures;
  if (a.dtype == at::kFloat) return symmetric ? rbf_kernel_amx_self<float>(a, h) : rbf_kernel_amx<float>(a, b, h);
  if (symmetric && a.n % 2 == 0) return rbf_kernel_amx_self<at::BFloat16>(a, h);
  return rbf_kernel_amx<at::BFloat16>(a, b, h);
}

// A self kernel on AMX (dtype: the particles') from all n x n dot products of its particles and their norms
// (kept by the median's pass, or the chunked Gram pass's: dots, which this overwrites), by blocks of
// kAmxRows rows: the same values as rbf_kernel_amx's from the same tiles.
at::Tensor rbf_kernel_from_dots(const at::Tensor& norms, const at::Tensor& dots, double h, at::ScalarType dtype) {
  const int64_t n = norms.size(0);
  at::Tensor k = empty_large({n, n}, norms.options().dtype(dtype));
  const float* norms_p = norms.const_data_ptr<float>();
  float* dots_p = dots.mutable_data_ptr<float>();
  const float inv_h = inverse_bandwidth<float>(h);
  amx_dispatch(k, [&](auto typed) {
    auto* k_p = k.mutable_data_ptr<typename decltype(typed)::type>();
    parallel_for(0, (n + kAmxRows - 1) / kAmxRows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i0 = begin * kAmxRows; i0 < std::min(end * kAmxRows, n); i0 += kAmxRows) {
        const int64_t rows = std::min(kAmxRows, n - i0);
        amx_rbf_from_dots(dots_p + i0 * n, n, rows, n, n, norms_p + i0, norms_p, inv_h, i0, /*own_one=*/true,
                          k_p + i0 * n, n, /*rowsum=*/nullptr);
      }
    });
  });
  return k;
}

// The AMX steps' second product: K W with W = score - (2/H) Xs folded into one bf16 operand (one product of d
// columns), or K [S | Xs] (score and Xs, the particles shifted as for the distances, exact for bf16 ones: a
// product of 2d columns) where the particles lie far apart next to the kernel's width: then W's rounding
// of (2/H) Xs, large next to the differences sum_j k_ij (x_i - x_j) between near particles, is most of
// phi's error. Split where some |x - shift| > 8 sqrt(H). Float64 emulation, 512 particles, median rule,
// clusters of 0.05-1 whose centres are drawn with standard deviations 0-10 at d = 32-768, error against
// float64 of the largest entry: folded 1e-4-3e-3 wherever that spread was below 7 sqrt(H) (Gaussian
// clouds: 1-3 sqrt(H)), 3e-3-0.11 from 13 sqrt(H) on, split 1e-4-2.5e-3 everywhere. The split product
// costs the step a third to two thirds again (2-core Xeon of CPUID model 167, bf16, H given, folded ->
// split on the same clusters, interleaved: 8192 x 128 35-37 -> 47-50 ms, 4096 x 768 39-41 -> 64-76 ms; by
// feature chunks 256 x 76,800 level, memory-bound), so it is not taken where folding is as accurate. Split, K's row sums are those of its rounded
// values (rowsum(K) Xs_i and K Xs then cancel exactly but for fp32 sums); folded, of the fp32 values, as
// before (the rounded ones' sums cost the exp epilogue 5-10%, for no gain there).
constexpr double kAmxFoldedMaxSpread = 8.0;

bool amx_step_splits(double spread, double h) {
  return spread > kAmxFoldedMaxSpread * std::sqrt(h);
}

// phi of bf16 or fp32 particles (contiguous) into out (n x d, their dtype, contiguous); returns whether phi
// is all finite (tracked by the last pass). Any NaN/Inf input makes phi non-finite here: a bad x value makes
// its column's mean, and so every particle's centred value there, non-finite; a bad score value makes S's
// row, and AMX multiplies every K entry into it (0 * NaN = NaN: no product is skipped).
template <typename In>
bool svgd_step_amx(const at::Tensor& x, const at::Tensor& score, const std::optional<double>& bandwidth,
                   at::Tensor& out) {
  using at::native::cpublas::brgemm;
  const int64_t n = x.size(0), d = x.size(1);
  const AmxOperands operands(x);
  const int64_t n_pad = operands.n_pad;
  // With the median rule the median's pass may keep the dot products for K (keeps_dots).
  const bool keep = !bandwidth && keeps_dots(n, d, sizeof(float), kAmxKeptDotsMinFeatures);
  const at::Tensor kept = keep ? empty_large({n, n}, x.options().dtype(at::kFloat)) : at::Tensor();
  float* kept_p = keep ? kept.mutable_data_ptr<float>() : nullptr;
  const double h = bandwidth ? *bandwidth : bandwidth_from_median(median_sq_dist_amx(operands, kept_p), n);
  const float a = static_cast<float>(2.0 / h);
  const auto* x_p = x.const_data_ptr<In>();
  const auto* score_p = score.const_data_ptr<In>();
  const float* shift_p = operands.shift.const_data_ptr<float>();
  // W = score - a Xs (folded), or S and Xs (split: amx_step_splits), in AMX's pair-interleaved layout (n_pad/2
  // x width words, row stride ld_w), zero rows beyond n; K W or K [S | Xs] has `width` columns
  const bool split = amx_step_splits(operands.spread, h);
  const int64_t width = split ? 2 * d : d, ld_w = amx_b_stride(width);
  const at::Tensor b_w = empty_large({n_pad / 2, ld_w}, x.options().dtype(at::kInt));
  auto* b_w_words = reinterpret_cast<uint32_t*>(b_w.mutable_data_ptr<int32_t>());
  parallel_for(0, n_pad / 2, 32, [&](int64_t begin, int64_t end) {
    amx_step_pairs(score_p, x_p, d, d, shift_p, a, n, begin, end, b_w_words, ld_w, /*x_off=*/split ? d : 0, 0);
  });

  const at::Tensor rowsum = at::zeros({n}, x.options().dtype(at::kFloat));
  const auto* bw_p = as_bf16(b_w);
  const float* norms_p = operands.norms.const_data_ptr<float>();
  float* rowsum_p = rowsum.mutable_data_ptr<float>();
  const float inv_h = inverse_bandwidth<float>(h);
  auto* out_p = out.mutable_data_ptr<In>();
  std::atomic<bool> finite{true};
  // phi = (K W + (2/H) rowsum(K) Xs + score) / n, or (K S + (2/H) (rowsum(K) Xs - K Xs) + score) / n: the
  // own term k_ii = 1 is left out of K and added here
  const auto finish = [&](const float* acc, int64_t ld_acc, int64_t x_off, int64_t r0, int64_t r1, int64_t c0,
                          int64_t c1) {
    if (!amx_finish_rows(acc, ld_acc, x_off, rowsum_p, x_p, score_p, shift_p, a, static_cast<float>(n), d, r0, r1,
                         c0, c1, out_p))
      finite.store(false, std::memory_order_relaxed);
  };
  // With many features a block's rows x d fp32 accumulator leaves the caches: then, with a block's K rows
  // small enough to keep (n_pad bf16 each), K W goes a chunk of kAmxFinishCols features at a time, each
  // finished while in L2 (no n x d accumulator written and read back). 2-core Xeon, alternating: 512 x 4096
  // 6.5 -> 5.45 ms, 1024 x 8192 49-53 -> 47 ms, 256 x 76,800 50-53 -> 46-50 ms; at 2048 x 2048 (K rows of
  // 2048 kept) 36 -> 41 ms, so not beyond 1024 particles.
  const bool by_chunks = d >= 2 * kAmxFinishCols && n_pad <= kAmxKeptColumns;
  const at::Tensor acc = by_chunks ? at::Tensor() : empty_large({n, width}, rowsum.options());
  parallel_for(0, (n + kAmxRows - 1) / kAmxRows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(kAmxRows * kAmxCols);
    const int64_t ld_k = by_chunks ? amx_a_stride(n_pad) : kAmxCols;
    std::vector<at::BFloat16> k16(kAmxRows * ld_k);
    const int64_t ld_chunk = (split ? 2 : 1) * kAmxFinishCols;  // (K W, or K S | K Xs)
    std::vector<float> chunk(by_chunks ? kAmxRows * ld_chunk : 0);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i0 = block * kAmxRows, rows = std::min(kAmxRows, n - i0);
      for (int64_t j0 = 0; j0 < n; j0 += kAmxCols) {
        const int64_t cols = std::min(kAmxCols, n - j0), depth = (cols + 31) / 32 * 32;
        float* dots = keep ? kept_p + i0 * n + j0 : s.data();
        if (!keep) amx_dots(operands, operands, i0, rows, j0, cols, s.data(), kAmxCols);
        at::BFloat16* k_tile = k16.data() + (by_chunks ? j0 : 0);
        amx_rbf_from_dots(dots, keep ? n : kAmxCols, rows, cols, depth, norms_p + i0, norms_p + j0, inv_h, i0 - j0,
                          /*own_one=*/false, k_tile, ld_k, rowsum_p + i0, /*rounded_sums=*/split);
        if (!by_chunks)
          brgemm(rows, width, depth, kAmxCols, ld_w, width, /*add_C=*/j0 > 0, k_tile, bw_p + j0 * ld_w,
                 acc.mutable_data_ptr<float>() + i0 * width);
      }
      if (by_chunks) {
        for (int64_t c0 = 0; c0 < d; c0 += kAmxFinishCols) {
          const int64_t cols = std::min(kAmxFinishCols, d - c0);
          for (int64_t part = 0; part < (split ? 2 : 1); ++part)  // (K W; or K S, then K Xs)
            brgemm(rows, cols, n_pad, ld_k, ld_w, ld_chunk, /*add_C=*/false, k16.data(),
                   bw_p + 2 * (part * d + c0), chunk.data() + part * kAmxFinishCols);
          finish(chunk.data(), ld_chunk, split ? kAmxFinishCols : 0, i0, i0 + rows, c0, c0 + cols);
        }
      }
    }
    at::native::cpublas::brgemm_release();
  });
  if (!by_chunks) {
    parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      finish(acc.const_data_ptr<float>() + begin * width, width, split ? d : 0, begin, end, 0, d);
    });
  }
  return finite.load();
}

template <typename In>
ChunkedGram amx_gram_chunked(const at::Tensor& x) {
  const int64_t n = x.size(0), d = x.size(1), n_pad = (n + 31) / 32 * 32;
  const int64_t chunk = kAmxFeatureChunk, chunks = (d + chunk - 1) / chunk;
  const int64_t ld_a = amx_a_stride(chunk), ld_b = amx_b_stride(n_pad);
  // The chunks go to `parts` contiguous ranges, each summed into its own n x n dots (only their upper
  // triangle by row blocks is written and read) and squares; the parts' sums are then added in part order,
  // so the result does not depend on which thread ran which part.
  const int64_t parts = std::clamp<int64_t>(
      std::min<int64_t>(at::get_num_threads(), kGramPartsMaxBytes / (n * n * int64_t{sizeof(float)})), 1, chunks);
  const auto options = x.options().dtype(at::kFloat);
  ChunkedGram out{at::empty({d}, options), at::empty({n}, options), at::empty({n, n}, options)};
  const In* x_p = x.const_data_ptr<In>();
  float* shift_p = out.shift.mutable_data_ptr<float>();
  const std::unique_ptr<float[]> dots(new float[parts * n * n]);  // (each part's first products initialise)
  std::vector<double> sq(parts * n, 0.0), spread(parts, 0.0);
  parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    std::vector<at::BFloat16> a(n_pad * ld_a, at::BFloat16(0.f));  // rows [n, n_pad) stay zero
    std::vector<uint32_t> b(chunk / 2 * ld_b);
    std::vector<double> sums(chunk), var(chunk);
    std::vector<float> lo(chunk), hi(chunk);  // (the columns' ranges)
    const auto* words = reinterpret_cast<const uint32_t*>(a.data());
    for (int64_t t = part_begin; t < part_end; ++t) {
      const int64_t begin = t * chunks / parts, end = (t + 1) * chunks / parts;
      for (int64_t c = begin; c < end; ++c) {
        const int64_t c0 = c * chunk, width = std::min(chunk, d - c0), depth = (width + 31) / 32 * 32;
        amx_column_sums(x_p + c0, d, n, 0, width, sums.data(), lo.data(), hi.data());
        for (int64_t k = 0; k < width; ++k) sums[k] /= static_cast<double>(n);  // (the means)
        std::fill(var.begin(), var.end(), 0.0);
        if constexpr (std::is_same_v<In, at::BFloat16>) add_sq_deviations(x_p + c0, d, n, width, sums.data(), var.data());
        for (int64_t k = 0; k < width; ++k) {
          shift_p[c0 + k] = amx_column_shift<In>(sums[k], var[k] / static_cast<double>(n), lo[k], hi[k], d);
          spread[t] = std::max(spread[t], column_spread(lo[k], hi[k], shift_p[c0 + k]));
        }
        const int64_t ahead = c + 1 < end ? chunk : 0;  // (the next chunk's x into L2 during the products)
        amx_centre_rows(x_p + c0, d, width, shift_p + c0, 0, n, a.data(), ld_a, sq.data() + t * n, ahead);
        transpose_words(words, ld_a / 2, n_pad, 0, depth / 2, b.data(), ld_b);
        for (int64_t i0 = 0; i0 < n; i0 += kAmxRows) {  // the upper triangle by blocks of rows
          at::native::cpublas::brgemm(std::min(kAmxRows, n - i0), n - i0, depth, ld_a, ld_b, n, /*add_C=*/c > begin,
                                      a.data() + i0 * ld_a, reinterpret_cast<const at::BFloat16*>(b.data()) + 2 * i0,
                                      dots.get() + t * n * n + i0 * n + i0);
        }
      }
    }
    at::native::cpublas::brgemm_release();
  });
  float* dots_p = out.dots.mutable_data_ptr<float>();
  float* norms_p = out.norms.mutable_data_ptr<float>();
  parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {  // the upper triangle: the parts' sums
    for (int64_t i = begin; i < end; ++i) {
      float* row = dots_p + i * n;
      std::copy(dots.get() + i * n + i, dots.get() + (i + 1) * n, row + i);
      for (int64_t t = 1; t < parts; ++t)
        for (int64_t j = i; j < n; ++j) row[j] += dots[t * n * n + i * n + j];
      double total = 0.0;
      for (int64_t t = 0; t < parts; ++t) total += sq[t * n + i];
      norms_p[i] = static_cast<float>(total);
    }
  });
  mirror_upper_triangle(dots_p, n);
  out.spread = *std::max_element(spread.begin(), spread.end());
  return out;
}

ChunkedGram amx_gram_chunked(const at::Tensor& x) {
  return amx_dispatch(x, [&](auto typed) { return amx_gram_chunked<typename decltype(typed)::type>(x); });
}

// svgd_step_amx's phi (its contract) for use_amx_chunked shapes.
template <typename In>
bool svgd_step_amx_chunked(const at::Tensor& x, const at::Tensor& score, const std::optional<double>& bandwidth,
                           at::Tensor& out) {
  using at::native::cpublas::brgemm;
  const int64_t n = x.size(0), d = x.size(1), n_pad = (n + 31) / 32 * 32;
  const ChunkedGram gram = amx_gram_chunked<In>(x);
  const double h = bandwidth ? *bandwidth : bandwidth_from_median(median_sq_dist_chunked(gram), n);
  const float a = static_cast<float>(2.0 / h), inv_h = inverse_bandwidth<float>(h);
  const bool split = amx_step_splits(gram.spread, h);  // (W folded, or S and Xs apart)
  // K without its own terms (bf16, an A operand: columns [n, n_pad) zero) and its row sums (split: of the
  // rounded values)
  const int64_t ld_k = amx_a_stride(n_pad);
  std::vector<at::BFloat16> k16(n * ld_k);
  std::vector<float> rowsum(n, 0.f);
  const float* norms_p = gram.norms.const_data_ptr<float>();
  float* dots_p = gram.dots.mutable_data_ptr<float>();
  parallel_for(0, (n + 15) / 16, 1, [&](int64_t begin, int64_t end) {
    const int64_t i0 = begin * 16, rows = std::min(end * 16, n) - i0;
    amx_rbf_from_dots(dots_p + i0 * n, n, rows, n, n_pad, norms_p + i0, norms_p, inv_h, i0, /*own_one=*/false,
                      k16.data() + i0 * ld_k, ld_k, rowsum.data() + i0, /*rounded_sums=*/split);
  });

  const int64_t chunk = kAmxFeatureChunk, chunks = (d + chunk - 1) / chunk;
  const int64_t ld_w = amx_b_stride(split ? 2 * chunk : chunk);
  const auto* x_p = x.const_data_ptr<In>();
  const auto* score_p = score.const_data_ptr<In>();
  const float* shift_p = gram.shift.const_data_ptr<float>();
  auto* out_p = out.mutable_data_ptr<In>();
  std::atomic<bool> finite{true};
  parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> w(n_pad / 2 * ld_w);
    const int64_t ld_acc = (split ? 2 : 1) * chunk;  // (K W, or K S | K Xs)
    std::vector<float> acc(n * ld_acc);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t c0 = c * chunk, width = std::min(chunk, d - c0), x_off = split ? width : 0;
      const int64_t ahead = c + 1 < end ? chunk : 0;
      amx_step_pairs(score_p + c0, x_p + c0, d, width, shift_p + c0, a, n, 0, n_pad / 2, w.data(), ld_w, x_off, ahead);
      brgemm(n, width + x_off, n_pad, ld_k, ld_w, ld_acc, /*add_C=*/false, k16.data(),
             reinterpret_cast<const at::BFloat16*>(w.data()), acc.data());
      if (!amx_finish_rows(acc.data(), ld_acc, x_off, rowsum.data(), x_p, score_p, shift_p, a, static_cast<float>(n),
                           d, 0, n, c0, c0 + width, out_p))
        finite.store(false, std::memory_order_relaxed);
    }
    at::native::cpublas::brgemm_release();
  });
  return finite.load();
}

// rbf_kernel_backward of bf16 particles (fp32 ones under bf16 matmuls: results in fp32) with many pairs on
// AMX, at the forward's precision: the particles centred by the mean of all rows and rounded to bf16
// (AmxOperands), P = grad * K rounded to bf16, fp32 accumulation. With xc, yc centred, grad_x = -(2/H)
// (rowsum(P) xc - P yc) and grad_y = -(2/H) (colsum(P) yc - P^T xc); the sums are of the rounded P and xc,
// yc the rounded particles too: the gradient at the rounded particles, whose terms cancel as they should
// (with the inputs' unrounded xc_i, a self kernel's own term P_ii (xc_i - xc_i) was the largest error,
// 1.5e-2 of the largest gradient at 300 x 40). That own term is left out of P: it is 0, and next to
// P_ii ~ 1 the fp32 sums lost a row's terms of tiny K.
// Each gradient is one pass (amx_grad_pass) over grad and K: blocks of kAmxRows rows of the result go to the
// threads, each streaming kAmxCols-deep tiles of P (or P^T), formed from grad and K and used while in cache,
// times the other set's rows in pairs (B operand), as the step's K W. grad_h = -(1/H) sum P log K is summed
// in fp32 per tile row while P is formed, then in double per block.
//
// One gradient: out (rows x d, the particles' dtype In) = scale (sums (own's rounded rows) - A B), where
// tile(r0, rows, c0, cols, depth, a, ld_a, sums, p_log_k, scratch) writes the A tile of result rows [r0, r0 +
// rows) and depth [c0, c0 + cols) at a (row stride ld_a, zero up to depth) and adds its sums (scratch:
// kAmxRows * kAmxCols / 2 words of the thread's own); B = other_pairs, the other set's rounded rows in pairs
// (row_pairs). p_log_k: one entry per block, or empty. With many features and a short depth (d >= 2048,
// at most kAmxKeptColumns: the step's rule) a block keeps all its A tiles and goes through the features a
// chunk of kAmxFinishCols at a time, each finished while in L2 (no rows x d fp32 accumulator written and
// read back).
template <typename In, typename Tile>
at::Tensor amx_grad_pass(const AmxOperands& own, int64_t depth_total, const at::Tensor& other_pairs, float scale,
                         std::vector<double>& p_log_k, Tile&& tile) {
  using at::native::cpublas::brgemm;
  const int64_t rows_total = own.n, d = own.d, ld_b = other_pairs.size(1);
  const int64_t depth_padded = (depth_total + 31) / 32 * 32;
  const bool by_chunks = d >= 2 * kAmxFinishCols && depth_padded <= kAmxKeptColumns;
  const int64_t ld_a = by_chunks ? amx_a_stride(depth_padded) : kAmxCols;
  const at::Tensor acc = by_chunks ? at::Tensor() : empty_large({rows_total, d}, own.norms.options());
  const at::Tensor sums = at::zeros({rows_total}, own.norms.options());
  float* sums_p = sums.mutable_data_ptr<float>();
  at::Tensor out = empty_large({rows_total, d}, own.xb.options().dtype(own.dtype));
  In* out_p = out.mutable_data_ptr<In>();
  const auto* xb_p = own.xb.const_data_ptr<at::BFloat16>();
  const auto* b_p = as_bf16(other_pairs);
  parallel_for(0, (rows_total + kAmxRows - 1) / kAmxRows, 1, [&](int64_t begin, int64_t end) {
    std::vector<at::BFloat16> a(kAmxRows * ld_a);
    std::vector<uint32_t> scratch(kAmxRows * kAmxCols / 2);
    std::vector<float> chunk(by_chunks ? kAmxRows * kAmxFinishCols : 0);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = block * kAmxRows, rows = std::min(kAmxRows, rows_total - r0);
      for (int64_t c0 = 0; c0 < depth_total; c0 += kAmxCols) {
        const int64_t cols = std::min(kAmxCols, depth_total - c0), depth = (cols + 31) / 32 * 32;
        at::BFloat16* a_tile = a.data() + (by_chunks ? c0 : 0);
        tile(r0, rows, c0, cols, depth, a_tile, ld_a, sums_p + r0,
             p_log_k.empty() ? nullptr : &p_log_k[block], scratch.data());
        if (!by_chunks)
          brgemm(rows, d, depth, ld_a, ld_b, d, /*add_C=*/c0 > 0, a_tile, b_p + c0 * ld_b,
                 acc.mutable_data_ptr<float>() + r0 * d);
      }
      if (by_chunks) {  // (B's word f of a pair row: feature pair f, so a chunk starts at bf16 2 f0)
        for (int64_t f0 = 0; f0 < d; f0 += kAmxFinishCols) {
          const int64_t width = std::min(kAmxFinishCols, d - f0);
          brgemm(rows, width, depth_padded, ld_a, ld_b, kAmxFinishCols, /*add_C=*/false, a.data(), b_p + 2 * f0,
                 chunk.data());
          amx_grad_rows(chunk.data(), kAmxFinishCols, sums_p, xb_p, own.ld_x, scale, d, r0, r0 + rows, f0,
                        f0 + width, out_p);
        }
      }
    }
    at::native::cpublas::brgemm_release();
  });
  if (!by_chunks) {
    parallel_for(0, rows_total, 64, [&](int64_t begin, int64_t end) {
      amx_grad_rows(acc.const_data_ptr<float>() + begin * d, d, sums_p, xb_p, own.ld_x, scale, d, begin, end, 0, d,
                    out_p);
    });
  }
  return out;
}

// The rounded rows of a set in pairs (n_pad / 2 x d_pad words, row stride amx_b_stride): AMX's B operand for
// the other set's gradient.
at::Tensor row_pairs(const AmxOperands& set) {
  const int64_t ld = amx_b_stride(set.d_pad);
  const at::Tensor pairs = empty_large({set.n_pad / 2, ld}, set.norms.options().dtype(at::kInt));
  const auto* xb_p = set.xb.const_data_ptr<at::BFloat16>();
  auto* words = reinterpret_cast<uint32_t*>(pairs.mutable_data_ptr<int32_t>());
  parallel_for(0, set.n_pad / 2, 64, [&](int64_t begin, int64_t end) {
    bf16_row_pairs(xb_p, set.ld_x, begin, end, set.d_pad, words, ld);
  });
  return pairs;
}

template <typename In>
std::tuple<at::Tensor, at::Tensor, double> rbf_kernel_backward_amx(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& y, const at::Tensor& kernel,
                                                                   double h, bool want_x, bool want_y, bool want_h) {
  const bool self = y.is_same(x);
  const at::Tensor xs = x.contiguous(), ys = self ? xs : y.contiguous();
  const at::Tensor g = grad.contiguous(), k = kernel.contiguous();
  const at::Tensor shift = self ? amx_shift(xs) : amx_shift(xs, &ys);
  const AmxOperands ox(xs, shift, /*as_b=*/false);
  std::optional<AmxOperands> oy;
  if (!self) oy.emplace(ys, shift, /*as_b=*/false);
  const AmxOperands& yo = self ? ox : *oy;
  const int64_t n = ox.n, m = yo.n;
  const auto* g_p = g.const_data_ptr<In>();
  const auto* k_p = k.const_data_ptr<In>();
  const float scale = static_cast<float>(-2.0 / h);
  at::Tensor grad_x, grad_y;
  std::vector<double> p_log_k;  // per block, summed in block order at the end (the same value every run)
  const auto blocks = [](int64_t rows) { return (rows + kAmxRows - 1) / kAmxRows; };
  // the tile of P at rows i0, columns j0: where a self kernel's own terms are (two sets: outside every tile)
  const auto own = [&](int64_t i0, int64_t j0) { return self ? i0 - j0 : m; };
  // the B operands: y's rows for x's gradient, x's for y's (one for both in a self kernel)
  const at::Tensor x_pairs = want_y || (self && want_x) ? row_pairs(ox) : at::Tensor();
  const at::Tensor y_pairs = !want_x ? at::Tensor() : self ? x_pairs : row_pairs(yo);
  if (want_x) {  // A = rows of P
    if (want_h) p_log_k.assign(blocks(n), 0.0);
    grad_x = amx_grad_pass<In>(ox, m, y_pairs, scale, p_log_k, [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                                                       int64_t depth, at::BFloat16* a, int64_t ld_a, float* rowsum,
                                                       double* plk, uint32_t*) {
      amx_p_rows(g_p + i0 * m + j0, k_p + i0 * m + j0, m, rows, cols, depth, own(i0, j0), a, ld_a, rowsum, plk);
    });
  }
  if (want_y) {  // A = rows of P^T: P's row pairs (AMX's B layout) transposed as 32-bit words
    const bool logs_here = want_h && !want_x;
    if (logs_here) p_log_k.assign(blocks(m), 0.0);
    std::vector<double> none;
    grad_y = amx_grad_pass<In>(yo, n, x_pairs, scale, logs_here ? p_log_k : none,
                           [&](int64_t j0, int64_t cols, int64_t i0, int64_t rows, int64_t depth, at::BFloat16* a,
                               int64_t ld_a, float* colsum, double* plk, uint32_t* pairs) {  // (depth/2 x kAmxRows words)
                             amx_p_pairs(g_p + i0 * m + j0, k_p + i0 * m + j0, m, rows, depth, cols, own(i0, j0),
                                         pairs, kAmxRows, colsum, plk);
                             transpose_words(pairs, kAmxRows, depth / 2, 0, cols, reinterpret_cast<uint32_t*>(a),
                                             ld_a / 2);
                           });
  }
  if (want_h && !want_x && !want_y) {  // P log K alone: rows of P, no product
    p_log_k.assign(blocks(n), 0.0);
    parallel_for(0, blocks(n), 1, [&](int64_t begin, int64_t end) {
      std::vector<at::BFloat16> a(kAmxRows * kAmxCols);
      std::vector<float> rowsum(kAmxRows);
      for (int64_t block = begin; block < end; ++block) {
        const int64_t i0 = block * kAmxRows, rows = std::min(kAmxRows, n - i0);
        for (int64_t j0 = 0; j0 < m; j0 += kAmxCols) {
          const int64_t cols = std::min(kAmxCols, m - j0);
          amx_p_rows(g_p + i0 * m + j0, k_p + i0 * m + j0, m, rows, cols, cols, own(i0, j0), a.data(), kAmxCols,
                     rowsum.data(), &p_log_k[block]);
        }
      }
    });
  }
  double total = 0.0;
  for (const double part : p_log_k) total += part;
  return {grad_x, grad_y, -total / h};
}

// rbf_kernel_backward_amx's gradients (its arithmetic: the same rounded particles and P, fp32 sums) for
// use_amx_chunked shapes, by feature chunks as the step there: without the operands as large as x that the
// tiled passes write and read back (the rounded particles and their pairs). P (n x m, bf16, own terms left
// out) and, for y's gradient, P^T are formed once as A operands; then the threads take chunks of
// kAmxFeatureChunk features, each centred (the chunk's column means over both sets: amx_shift's), rounded
// and paired as a B operand in L2, multiplied by P (P^T) and finished into the gradients' columns while
// there. The products have the same depth (all m, or n, rows at once) as the tiled pass: the same sums
// (up to 512 rows on the other side, one tile of P there). grad_h's sum P log K: in blocks of kAmxRows
// rows, as there. 2-core Xeon, bf16, x's gradient with symmetrised weights, alternating, tiled -> chunks
// (ms): 256 x 76,800 21-22 -> 15.0-15.3, 128 x 76,800 11.5-12.4 -> 5.8-6.1, 256 x 4096 0.94-1.06 ->
// 0.78-0.85, 128 x 1024 0.15-0.16 -> 0.10-0.12; 512 x 20,000, 512 x 32,768 and 384 x 8192 level; two sets
// 100 x 300 x 76,800 30-31 -> 17-19. At 256 x 76,800 about half is the AMX products.
template <typename In>
std::tuple<at::Tensor, at::Tensor, double> rbf_kernel_backward_amx_chunked(const at::Tensor& grad, const at::Tensor& x,
                                                                           const at::Tensor& y,
                                                                           const at::Tensor& kernel, double h,
                                                                           bool want_x, bool want_y, bool want_h) {
  using at::native::cpublas::brgemm;
  const bool self = y.is_same(x);
  const at::Tensor xs = x.contiguous(), ys = self ? xs : y.contiguous();
  const at::Tensor g = grad.contiguous(), k = kernel.contiguous();
  const int64_t n = xs.size(0), m = ys.size(0), d = xs.size(1);
  const int64_t n_pad = (n + 31) / 32 * 32, m_pad = (m + 31) / 32 * 32;
  const float scale = static_cast<float>(-2.0 / h);
  const auto* g_p = g.const_data_ptr<In>();
  const auto* k_p = k.const_data_ptr<In>();
  // P's rows (rows [n, n_pad) zero: the pairs of P^T below), their sums, and P log K by blocks of rows
  const int64_t ld_p = amx_a_stride(m_pad), blocks = (n + kAmxRows - 1) / kAmxRows;
  std::vector<at::BFloat16> p16(n_pad * ld_p, at::BFloat16(0.f));
  std::vector<float> rowsum(n, 0.f);
  std::vector<double> p_log_k(want_h ? blocks : 0, 0.0);
  parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i0 = block * kAmxRows, rows = std::min(kAmxRows, n - i0);
      amx_p_rows(g_p + i0 * m, k_p + i0 * m, m, rows, m, m_pad, self ? i0 : m, p16.data() + i0 * ld_p, ld_p,
                 rowsum.data() + i0, want_h ? &p_log_k[block] : nullptr);
    }
  });
  // P^T's rows (the words of P's row pairs, transposed) and P's column sums, in row order
  const int64_t ld_pt = amx_a_stride(n_pad);
  std::vector<at::BFloat16> pt16(want_y ? m * ld_pt : 0);
  std::vector<float> colsum(want_y ? m : 0, 0.f);
  if (want_y) {
    const int64_t ld_w = amx_b_stride(m_pad);
    std::vector<uint32_t> pairs(n_pad / 2 * ld_w);
    bf16_row_pairs(p16.data(), ld_p, 0, n_pad / 2, m_pad, pairs.data(), ld_w);
    transpose_words(pairs.data(), ld_w, n_pad / 2, 0, m, reinterpret_cast<uint32_t*>(pt16.data()), ld_pt / 2);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) colsum[j] += static_cast<float>(p16[i * ld_p + j]);
  }

  at::Tensor grad_x = want_x ? empty_large({n, d}, xs.options()) : at::Tensor();
  at::Tensor grad_y = want_y ? empty_large({m, d}, ys.options()) : at::Tensor();
  In* gx_p = want_x ? grad_x.mutable_data_ptr<In>() : nullptr;
  In* gy_p = want_y ? grad_y.mutable_data_ptr<In>() : nullptr;
  const auto* x_p = xs.const_data_ptr<In>();
  const auto* y_p = ys.const_data_ptr<In>();
  const int64_t chunk = kAmxFeatureChunk, chunks = (d + chunk - 1) / chunk;
  const int64_t ld_a = amx_a_stride(chunk), ld_b = amx_b_stride(chunk);
  const double rows_total = static_cast<double>(self ? n : n + m);
  parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    // the chunk's rounded rows of x and y (rows beyond n, m zero: the pairs' padding) and their pairs
    std::vector<at::BFloat16> xa(n_pad * ld_a, at::BFloat16(0.f)), ya(self ? 0 : m_pad * ld_a, at::BFloat16(0.f));
    std::vector<uint32_t> x_pairs(want_y ? n_pad / 2 * ld_b : 0), y_pairs(want_x ? m_pad / 2 * ld_b : 0);
    std::vector<float> acc(std::max(n, m) * chunk), shift(chunk);
    std::vector<double> sums(chunk), other_sums(chunk), var(chunk), squares(n + m);  // (squares: unused)
    constexpr bool bf16 = std::is_same_v<In, at::BFloat16>;  // (bf16: the columns' ranges for exact shifts)
    std::vector<float> lo(bf16 ? chunk : 0), hi(bf16 ? chunk : 0), other_lo(bf16 ? chunk : 0), other_hi(bf16 ? chunk : 0);
    const at::BFloat16* yb = self ? xa.data() : ya.data();
    for (int64_t c = begin; c < end; ++c) {
      const int64_t c0 = c * chunk, width = std::min(chunk, d - c0);
      const int64_t ahead = c + 1 < end ? chunk : 0;  // (the next chunk's rows into L2 as these are centred)
      amx_column_sums(x_p + c0, d, n, 0, width, sums.data(), bf16 ? lo.data() : nullptr, bf16 ? hi.data() : nullptr);
      if (!self)
        amx_column_sums(y_p + c0, d, m, 0, width, other_sums.data(), bf16 ? other_lo.data() : nullptr,
                        bf16 ? other_hi.data() : nullptr);
      for (int64_t f = 0; f < width; ++f) sums[f] = (sums[f] + (self ? 0.0 : other_sums[f])) / rows_total;  // means
      std::fill(var.begin(), var.end(), 0.0);
      if constexpr (bf16) {  // (the variances about the means, for exact_bf16_shift)
        add_sq_deviations(x_p + c0, d, n, width, sums.data(), var.data());
        if (!self) add_sq_deviations(y_p + c0, d, m, width, sums.data(), var.data());
      }
      for (int64_t f = 0; f < width; ++f) {
        float low = 0.0f, high = 0.0f;
        if constexpr (bf16) {
          low = self ? lo[f] : std::min(lo[f], other_lo[f]);
          high = self ? hi[f] : std::max(hi[f], other_hi[f]);
        }
        shift[f] = amx_column_shift<In>(sums[f], var[f] / rows_total, low, high, d);
      }
      amx_centre_rows(x_p + c0, d, width, shift.data(), 0, n, xa.data(), ld_a, squares.data(), ahead);
      if (!self) amx_centre_rows(y_p + c0, d, width, shift.data(), 0, m, ya.data(), ld_a, squares.data() + n, ahead);
      if (want_x) {  // scale (rowsum(P) xc - P yc)
        bf16_row_pairs(yb, ld_a, 0, m_pad / 2, width, y_pairs.data(), ld_b);
        brgemm(n, width, m_pad, ld_p, ld_b, chunk, /*add_C=*/false, p16.data(),
               reinterpret_cast<const at::BFloat16*>(y_pairs.data()), acc.data());
        amx_grad_rows(acc.data(), chunk, rowsum.data(), xa.data(), ld_a, scale, d, 0, n, 0, width, gx_p + c0);
      }
      if (want_y) {  // scale (colsum(P) yc - P^T xc)
        bf16_row_pairs(xa.data(), ld_a, 0, n_pad / 2, width, x_pairs.data(), ld_b);
        brgemm(m, width, n_pad, ld_pt, ld_b, chunk, /*add_C=*/false, pt16.data(),
               reinterpret_cast<const at::BFloat16*>(x_pairs.data()), acc.data());
        amx_grad_rows(acc.data(), chunk, colsum.data(), yb, ld_a, scale, d, 0, m, 0, width, gy_p + c0);
      }
    }
    at::native::cpublas::brgemm_release();
  });
  double total = 0.0;
  for (const double part : p_log_k) total += part;
  return {grad_x, grad_y, -total / h};
}

}  // namespace

bool svgd_step_by_amx(const at::Tensor& x, const at::Tensor& score, const std::optional<double>& bandwidth,
                      at::Tensor& out) {
  bool finite = true;
  run_team_if(amx_in_team(x.size(0)), [&] {
    finite = amx_dispatch(x, [&](auto typed) {
      using In = typename decltype(typed)::type;
      return use_amx_chunked(x.size(0), x.size(1)) ? svgd_step_amx_chunked<In>(x, score, bandwidth, out)
                                                    : svgd_step_amx<In>(x, score, bandwidth, out);
    });
  });
  return finite;
}

double median_by_amx(const at::Tensor& x) {
  double median = 0.0;
  run_team_if(amx_in_team(x.size(0)), [&] {
    median = use_amx_chunked(x.size(0), x.size(1)) ? median_sq_dist_chunked(amx_gram_chunked(x))
                                                   : median_sq_dist_amx(AmxOperands(x));
  });
  return median;
}

at::Tensor rbf_kernel_by_amx(const at::Tensor& x, const at::Tensor& y, double h) {
  const at::Tensor xs = x.contiguous();
  const bool self = x.is_same(y);
  if (self && use_amx_chunked(x.size(0), x.size(1))) {
    const ChunkedGram gram = amx_gram_chunked(xs);
    return rbf_kernel_from_dots(gram.norms, gram.dots, h, x.scalar_type());
  }
  if (self) {
    const AmxOperands operands(xs);
    return rbf_kernel_amx(operands, operands, h);
  }
  const at::Tensor ys = y.contiguous();
  const at::Tensor shift = amx_shift(xs, &ys);
  return rbf_kernel_amx(AmxOperands(xs, shift, /*as_b=*/false), AmxOperands(ys, shift), h);
}

std::tuple<at::Tensor, at::Tensor> rbf_kernel_median_by_amx(const at::Tensor& x_in) {
  const int64_t n = x_in.size(0);
  if (use_amx_chunked(n, x_in.size(1))) {  // the chunked Gram pass's dot products
    const ChunkedGram gram = amx_gram_chunked(x_in.contiguous());
    const at::Tensor h = bandwidth_result(median_sq_dist_chunked(gram), x_in);
    return {median_kernel(h, x_in,
                          [&](double v) { return rbf_kernel_from_dots(gram.norms, gram.dots, v, x_in.scalar_type()); }),
            h};
  }
  // (the AMX operands kept between the two, and the dot products where keeps_dots)
  const AmxOperands operands(x_in.contiguous());
  // (kept only where rbf_kernel_amx takes the one triangle, whose K is symmetric as the kept dots are)
  const bool keep = keeps_dots(n, operands.d, sizeof(float), kAmxKeptDotsMinFeatures) &&
                    operands.d >= kAmxSymmetricMinFeatures && (operands.dtype == at::kFloat || n % 2 == 0);
  const at::Tensor kept = keep ? empty_large({n, n}, operands.norms.options()) : at::Tensor();
  const at::Tensor h =
      bandwidth_result(median_sq_dist_amx(operands, keep ? kept.mutable_data_ptr<float>() : nullptr), x_in);
  return {median_kernel(h, x_in,
                        [&](double v) {
                          return keep ? rbf_kernel_from_dots(operands.norms, kept, v, operands.dtype)
                                      : rbf_kernel_amx(operands, operands, v);
                        }),
          h};
}

std::tuple<at::Tensor, at::Tensor, double> rbf_kernel_backward_by_amx(const at::Tensor& grad, const at::Tensor& x,
                                                                      const at::Tensor& y, const at::Tensor& kernel,
                                                                      double h, bool want_x, bool want_y,
                                                                      bool want_h) {
  const int64_t n = kernel.size(0), m = kernel.size(1);
  return amx_dispatch(x, [&](auto typed) {
    using In = typename decltype(typed)::type;
    if ((want_x || want_y) && use_amx_chunked(std::max(n, m), x.size(1)))
      return rbf_kernel_backward_amx_chunked<In>(grad, x, y, kernel, h, want_x, want_y, want_h);
    return rbf_kernel_backward_amx<In>(grad, x, y, kernel, h, want_x, want_y, want_h);
  });
}

}  // namespace bmt_fast::cpu
