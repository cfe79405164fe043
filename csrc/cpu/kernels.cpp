// Runtime choice of the kernel build for this CPU, scratch allocation, and the public entry points.
#include "kernels.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

// The AMX kernels of one ISA build for particles of type In (kernels.h), with the rounding choice.
#define BMT_FAST_DECLARE_AMX_ISA(In)                                                                                \
  void amx_rbf_from_dots(float*, int64_t, int64_t, int64_t, int64_t, const float*, const float*, float, int64_t,    \
                         bool, In*, int64_t, float*, bool, bool);                                                   \
  void amx_column_sums(const In*, int64_t, int64_t, int64_t, int64_t, double*, float*, float*);                     \
  void amx_centre_rows(const In*, int64_t, int64_t, const float*, int64_t, int64_t, c10::BFloat16*, int64_t,       \
                       double*, int64_t);                                                                            \
  void amx_step_pairs(const In*, const In*, int64_t, int64_t, const float*, float, int64_t, int64_t, int64_t,      \
                      uint32_t*, int64_t, int64_t, int64_t);                                                        \
  bool amx_finish_rows(const float*, int64_t, int64_t, const float*, const In*, const In*, const float*, float,     \
                       float, int64_t, int64_t, int64_t, int64_t, int64_t, In*);                                    \
  void amx_p_rows(const In*, const In*, int64_t, int64_t, int64_t, int64_t, int64_t, c10::BFloat16*, int64_t,       \
                  float*, double*);                                                                                 \
  void amx_p_pairs(const In*, const In*, int64_t, int64_t, int64_t, int64_t, int64_t, uint32_t*, int64_t, float*,   \
                   double*);                                                                                        \
  void amx_grad_rows(const float*, int64_t, const float*, const c10::BFloat16*, int64_t, float, int64_t, int64_t,   \
                     int64_t, int64_t, int64_t, In*);

#define BMT_FAST_DECLARE_ISA(NS)                                                                                                                \
  namespace bmt_fast::cpu::NS {                                                                                                                 \
  void rbf_from_dots(float*, int64_t, int64_t, int64_t, int64_t, const float*, const float*, float);                                            \
  void rbf_from_dots(double*, int64_t, int64_t, int64_t, int64_t, const double*, const double*, double);                                        \
  BMT_FAST_DECLARE_FUSED_PAIRS(float)                                                                                                         \
  BMT_FAST_DECLARE_FUSED_PAIRS(double)                                                                                                        \
  BMT_FAST_DECLARE_FUSED_DISTANCES(float)                                                                                                     \
  BMT_FAST_DECLARE_FUSED_DISTANCES(double)                                                                                                    \
  void fused_step_shift(const float*, int64_t, int64_t, double*, float*);                                                                     \
  void fused_step_shift(const double*, int64_t, int64_t, double*, double*);                                                                   \
  void fused_step_pack(const float*, const float*, int64_t, int64_t, const float*, float, int64_t, int64_t, float*, float*, float*, float*);  \
  void fused_step_pack(const double*, const double*, int64_t, int64_t, const double*, double, int64_t, int64_t, double*, double*, double*,    \
                       double*);                                                                                                              \
  bool fused_step_rows(const float*, const float*, const float*, const float*, const float*, int64_t, int64_t, float, float, int64_t,        \
                       int64_t, float*, float*);                                                                                                \
  bool fused_step_rows(const double*, const double*, const double*, const double*, const double*, int64_t, int64_t, double, double,         \
                       int64_t, int64_t, double*, double*);                                                                                     \
  BMT_FAST_DECLARE_AMX_ISA(c10::BFloat16)                                                                                                       \
  BMT_FAST_DECLARE_AMX_ISA(float)                                                                                                               \
  void transpose_words(const uint32_t*, int64_t, int64_t, int64_t, int64_t, uint32_t*, int64_t);                                              \
  void transpose_words(const uint64_t*, int64_t, int64_t, int64_t, int64_t, uint64_t*, int64_t);                                              \
  void exp_scaled(double*, int64_t, double);                                                                                                  \
  void row_sq_norms(const float*, int64_t, int64_t, float*);                                                                                  \
  void row_sq_norms(const double*, int64_t, int64_t, double*);                                                                                \
  void stream_rows(const void*, int64_t, int64_t, int64_t, void*, int64_t);                                                                   \
  void stream_rows_as(const float*, int64_t, int64_t, int64_t, c10::BFloat16*, int64_t);                                                     \
  void stream_rows_as(const float*, int64_t, int64_t, int64_t, c10::Half*, int64_t);                                                          \
  void bf16_row_pairs(const c10::BFloat16*, int64_t, int64_t, int64_t, int64_t, uint32_t*, int64_t);                                        \
  void radix_histogram(const float*, int64_t, int64_t, int64_t, int64_t, const float*, const float*, bool,                                      \
                       int64_t, const RadixPass&, int64_t*);                                                                                    \
  void radix_histogram(const double*, int64_t, int64_t, int64_t, int64_t, const double*, const double*,                                         \
                       bool, int64_t, const RadixPass&, int64_t*);                                                                              \
  int64_t window_collect(const float*, int64_t, int64_t, int64_t, int64_t, const float*, const float*, bool,                                    \
                         float, float, int64_t*, float*);                                                                                       \
  int64_t window_collect(const double*, int64_t, int64_t, int64_t, int64_t, const double*, const double*, bool,                                 \
                         double, double, int64_t*, double*);                                                                                    \
  void pair_sq_dists(const float*, int64_t, const float*, const int64_t*, const int64_t*, int64_t, float*);                                     \
  void pair_sq_dists(const double*, int64_t, const double*, const int64_t*, const int64_t*, int64_t, double*);                                  \
  void pair_sq_dists(const c10::BFloat16*, int64_t, const float*, const int64_t*, const int64_t*, int64_t, float*);                          \
  void gram_columns(const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double*, float*, float*);                 \
  void gram_columns(const double*, const double*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double*, double*, double*);             \
  void gram_columns(const c10::BFloat16*, const c10::BFloat16*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double*, float*, float*); \
  void gram_columns(const c10::Half*, const c10::Half*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double*, float*, float*);         \
  bool apply_columns(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t,                                                    \
                     const float*, const float*, const float*, float, float*);                                                                  \
  bool apply_columns(const double*, const double*, double*, int64_t, int64_t, int64_t, int64_t,                                                 \
                     const double*, const double*, const double*, double, double*);                                                             \
  bool apply_columns(const c10::BFloat16*, const c10::BFloat16*, c10::BFloat16*, int64_t, int64_t,                                              \
                     int64_t, int64_t, const float*, const float*, const float*, float, float*);                                                \
  bool apply_columns(const c10::Half*, const c10::Half*, c10::Half*, int64_t, int64_t, int64_t, int64_t,                                        \
                     const float*, const float*, const float*, float, float*);                                                                  \
  void rbf_grad_columns(const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, const float*,                                  \
                        float*, float*);                                                                                                        \
  void rbf_grad_columns(const double*, const double*, int64_t, int64_t, int64_t, int64_t, int64_t,                                              \
                        const double*, double*, double*);                                                                                       \
  void rbf_grad_columns(const c10::BFloat16*, const c10::BFloat16*, int64_t, int64_t, int64_t, int64_t, int64_t,                                \
                        const float*, c10::BFloat16*, c10::BFloat16*);                                                                          \
  void rbf_grad_columns(const c10::Half*, const c10::Half*, int64_t, int64_t, int64_t, int64_t, int64_t,                                        \
                        const float*, c10::Half*, c10::Half*);                                                                                  \
  void cross_sq_dists(const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, double*);                                        \
  void cross_sq_dists(const double*, const double*, int64_t, int64_t, int64_t, int64_t, int64_t, double*);                                      \
  void cross_sq_dists(const c10::BFloat16*, const c10::BFloat16*, int64_t, int64_t, int64_t, int64_t, int64_t,                                  \
                      double*);                                                                                                                 \
  void cross_sq_dists(const c10::Half*, const c10::Half*, int64_t, int64_t, int64_t, int64_t, int64_t, double*);                                \
  }

BMT_FAST_DECLARE_ISA(isa_base)
#if defined(__x86_64__) && defined(__GNUC__)
#define BMT_FAST_HAS_X86_BUILDS 1
BMT_FAST_DECLARE_ISA(isa_v3)
BMT_FAST_DECLARE_ISA(isa_v4)
#endif

namespace bmt_fast::cpu {
namespace {

enum class Isa { kBase, kV3, kV4 };

Isa detect_isa() {
  Isa best = Isa::kBase;
#ifdef BMT_FAST_HAS_X86_BUILDS
  __builtin_cpu_init();
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vl");
  best = v4 ? Isa::kV4 : v3 ? Isa::kV3 : Isa::kBase;
#endif
  // Checked on every architecture: on aarch64 (no x86 builds) v3 and v4 are refused, not ignored. Empty is
  // unset, as for the other switches (env_switch, env_count).
  if (const char* forced = std::getenv("BMT_FAST_CPU_ISA"); forced != nullptr && *forced != '\0') {
    const std::string want(forced);
    const Isa asked = want == "v4" ? Isa::kV4 : want == "v3" ? Isa::kV3 : Isa::kBase;
    TORCH_CHECK(want == "base" || want == "v3" || want == "v4", "bmt_fast: BMT_FAST_CPU_ISA must be base, v3 or v4, got \"",
                want, "\"");
    TORCH_CHECK(static_cast<int>(asked) <= static_cast<int>(best), "bmt_fast: BMT_FAST_CPU_ISA=", want,
                " but this CPU lacks the instructions (v3 and v4 are x86-64 builds)");
    best = asked;
  }
  return best;
}

Isa isa() {
  static const Isa chosen = detect_isa();
  return chosen;
}

// AVX512-BF16's vcvtneps2bf16 for the AMX epilogue's bf16 K (every AMX CPU has it), unless
// BMT_FAST_CPU_AVX512BF16=0 asks for the portable rounding (tests: the two give the same bits).
bool native_bf16_rounding() {
  static const bool native = [] {
    const bool wanted = env_switch("BMT_FAST_CPU_AVX512BF16", true);  // (checked on every architecture)
#ifdef BMT_FAST_HAS_X86_BUILDS
    __builtin_cpu_init();
    return wanted && __builtin_cpu_supports("avx512bf16");
#else
    (void)wanted;
    return false;
#endif
  }();
  return native;
}

}  // namespace

#ifdef BMT_FAST_HAS_X86_BUILDS
#define BMT_FAST_DISPATCH(fn, ...)              \
  switch (isa()) {                              \
    case Isa::kV4:                              \
      return isa_v4::fn(__VA_ARGS__);           \
    case Isa::kV3:                              \
      return isa_v3::fn(__VA_ARGS__);           \
    default:                                    \
      return isa_base::fn(__VA_ARGS__);         \
  }
#else
#define BMT_FAST_DISPATCH(fn, ...) return isa_base::fn(__VA_ARGS__);
#endif

void check_isa_settings() {
  isa();
  native_bf16_rounding();
}

const char* active_isa() {
  switch (isa()) {
    case Isa::kV4:
      return "v4";
    case Isa::kV3:
      return "v3";
    default:
      return "base";
  }
}

const char* compiled_isas() {
#ifdef BMT_FAST_HAS_X86_BUILDS
  return "base, v3 (AVX2+FMA), v4 (AVX-512)";
#else
  return "base";
#endif
}

#define BMT_FAST_DEFINE_FUSED_ENTRY(T)                                                                              \
  bool fused_step_rows(const T* xc, const T* xt, const T* w, const T* norms, const T* score, int64_t n, int64_t d,    \
                       T inv_h, T a, int64_t row_begin, int64_t row_end, T* scratch, T* phi) {                       \
    BMT_FAST_DISPATCH(fused_step_rows, xc, xt, w, norms, score, n, d, inv_h, a, row_begin, row_end, scratch, phi)   \
  }
#define BMT_FAST_DEFINE_FUSED_PACK_ENTRY(T)                                                                          \
  void fused_step_shift(const T* x, int64_t n, int64_t d, double* sums, T* shift) {                                  \
    BMT_FAST_DISPATCH(fused_step_shift, x, n, d, sums, shift)                                                        \
  }                                                                                                                  \
  void fused_step_pack(const T* x, const T* score, int64_t n, int64_t d, const T* shift, T a, int64_t block_begin,   \
                       int64_t block_end, T* xc, T* norms, T* xt, T* w) {                                            \
    BMT_FAST_DISPATCH(fused_step_pack, x, score, n, d, shift, a, block_begin, block_end, xc, norms, xt, w)          \
  }
#define BMT_FAST_DEFINE_FUSED_DISTANCE_ENTRY(T)                                                                      \
  void fused_dot_rows(const T* xc, const T* xt, int64_t d, int64_t row_begin, int64_t row_end, int64_t col_begin,    \
                      int64_t cols, T* out, int64_t ld) {                                                            \
    BMT_FAST_DISPATCH(fused_dot_rows, xc, xt, d, row_begin, row_end, col_begin, cols, out, ld)                       \
  }                                                                                                                  \
  int64_t fused_window_rows(const T* xc, const T* xt, const T* norms, int64_t n, int64_t d, T lo, T hi,             \
                            int64_t row_begin, int64_t row_end, int64_t col_begin, int64_t col_end, int64_t* below,  \
                            T* out) {                                                                                \
    BMT_FAST_DISPATCH(fused_window_rows, xc, xt, norms, n, d, lo, hi, row_begin, row_end, col_begin, col_end, below,  \
                      out)                                                                                           \
  }
BMT_FAST_DEFINE_FUSED_DISTANCE_ENTRY(float)
BMT_FAST_DEFINE_FUSED_DISTANCE_ENTRY(double)
#define BMT_FAST_DEFINE_FUSED_PAIR_ENTRY(T)                                                                          \
  void fused_step_pair(const T* xc, const T* xt, const T* w, const T* norms, int64_t n, int64_t d, T inv_h,         \
                       int64_t i_begin, int64_t i_end, int64_t j_begin, int64_t j_end, T* rowacc, T* colacc,        \
                       T* scratch) {                                                                                 \
    BMT_FAST_DISPATCH(fused_step_pair, xc, xt, w, norms, n, d, inv_h, i_begin, i_end, j_begin, j_end, rowacc, colacc, \
                      scratch)                                                                                       \
  }                                                                                                                  \
  bool fused_step_finish(const T* rowacc, int64_t part_elems, const T* colacc, int64_t parts, const T* xc,         \
                         const T* score, int64_t n, int64_t d, T a, int64_t row_begin, int64_t row_end, T* phi) {    \
    BMT_FAST_DISPATCH(fused_step_finish, rowacc, part_elems, colacc, parts, xc, score, n, d, a, row_begin, row_end,  \
                      phi)                                                                                           \
  }
BMT_FAST_DEFINE_FUSED_PAIR_ENTRY(float)
BMT_FAST_DEFINE_FUSED_PAIR_ENTRY(double)
BMT_FAST_DEFINE_FUSED_PACK_ENTRY(float)
BMT_FAST_DEFINE_FUSED_PACK_ENTRY(double)
BMT_FAST_DEFINE_FUSED_ENTRY(float)
BMT_FAST_DEFINE_FUSED_ENTRY(double)

#define BMT_FAST_DEFINE_TILE_ENTRY(T)                                                                        \
  void rbf_from_dots(T* tile, int64_t ld, int64_t row_begin, int64_t row_end, int64_t cols, const T* nr,     \
                     const T* nc, T inv_h) {                                                                 \
    BMT_FAST_DISPATCH(rbf_from_dots, tile, ld, row_begin, row_end, cols, nr, nc, inv_h)                      \
  }                                                                                                          \
  void radix_histogram(const T* tile, int64_t ld, int64_t row_begin, int64_t row_end, int64_t cols,          \
                       const T* nr, const T* nc, bool upper_only, int64_t weight, const RadixPass& pass,     \
                       int64_t* hist) {                                                                      \
    BMT_FAST_DISPATCH(radix_histogram, tile, ld, row_begin, row_end, cols, nr, nc, upper_only, weight, pass, \
                      hist)                                                                                  \
  }                                                                                                          \
  int64_t window_collect(const T* tile, int64_t ld, int64_t row_begin, int64_t row_end, int64_t cols,        \
                         const T* nr, const T* nc, bool upper_only, T lo, T hi, int64_t* below, T* out) {    \
    BMT_FAST_DISPATCH(window_collect, tile, ld, row_begin, row_end, cols, nr, nc, upper_only, lo, hi, below, \
                      out)                                                                                   \
  }                                                                                                          \
  void pair_sq_dists(const T* xc, int64_t d, const T* norms, const int64_t* first, const int64_t* second,      \
                     int64_t count, T* out) {                                                                \
    BMT_FAST_DISPATCH(pair_sq_dists, xc, d, norms, first, second, count, out)                                \
  }
BMT_FAST_DEFINE_TILE_ENTRY(float)
BMT_FAST_DEFINE_TILE_ENTRY(double)
void pair_sq_dists(const c10::BFloat16* xc, int64_t d, const float* norms, const int64_t* first, const int64_t* second,
                   int64_t count, float* out) {
  BMT_FAST_DISPATCH(pair_sq_dists, xc, d, norms, first, second, count, out)
}

#define BMT_FAST_DEFINE_AMX_ENTRY(In)                                                                                \
  void amx_rbf_from_dots(float* tile, int64_t ld, int64_t rows, int64_t cols, int64_t cols_padded, const float* nr,   \
                         const float* nc, float inv_h, int64_t diag, bool own_one, In* k_out, int64_t ld_out,         \
                         float* rowsum, bool rounded_sums) {                                                          \
    BMT_FAST_DISPATCH(amx_rbf_from_dots, tile, ld, rows, cols, cols_padded, nr, nc, inv_h, diag, own_one, k_out,      \
                      ld_out, rowsum, rounded_sums, native_bf16_rounding())                                           \
  }                                                                                                                   \
  void amx_column_sums(const In* x, int64_t d, int64_t rows, int64_t col_begin, int64_t col_end, double* sums,        \
                       float* lo, float* hi) {                                                                        \
    BMT_FAST_DISPATCH(amx_column_sums, x, d, rows, col_begin, col_end, sums, lo, hi)                                  \
  }                                                                                                                   \
  void amx_centre_rows(const In* x, int64_t ld, int64_t cols, const float* shift, int64_t row_begin,                  \
                       int64_t row_end, c10::BFloat16* xb, int64_t ld_xb, double* sq_sums, int64_t ahead) {           \
    BMT_FAST_DISPATCH(amx_centre_rows, x, ld, cols, shift, row_begin, row_end, xb, ld_xb, sq_sums, ahead)             \
  }                                                                                                                   \
  void amx_step_pairs(const In* score, const In* x, int64_t ld, int64_t cols, const float* shift, float a, int64_t n, \
                      int64_t pair_begin, int64_t pair_end, uint32_t* bw, int64_t ld_bw, int64_t x_off,               \
                      int64_t ahead) {                                                                                \
    BMT_FAST_DISPATCH(amx_step_pairs, score, x, ld, cols, shift, a, n, pair_begin, pair_end, bw, ld_bw, x_off, ahead) \
  }                                                                                                                   \
  bool amx_finish_rows(const float* acc, int64_t ld_acc, int64_t x_off, const float* rowsum, const In* x,             \
                       const In* score, const float* shift, float a, float n, int64_t d, int64_t row_begin,           \
                       int64_t row_end, int64_t col_begin, int64_t col_end, In* phi) {                                \
    BMT_FAST_DISPATCH(amx_finish_rows, acc, ld_acc, x_off, rowsum, x, score, shift, a, n, d, row_begin, row_end,      \
                      col_begin, col_end, phi)                                                                        \
  }                                                                                                                   \
  void amx_p_rows(const In* g, const In* k, int64_t ld, int64_t rows, int64_t cols, int64_t cols_padded,              \
                  int64_t diag, c10::BFloat16* p16, int64_t ld16, float* rowsum, double* p_log_k) {                   \
    BMT_FAST_DISPATCH(amx_p_rows, g, k, ld, rows, cols, cols_padded, diag, p16, ld16, rowsum, p_log_k)                \
  }                                                                                                                   \
  void amx_p_pairs(const In* g, const In* k, int64_t ld, int64_t rows, int64_t rows_padded, int64_t cols,             \
                   int64_t diag, uint32_t* pw, int64_t ldw, float* colsum, double* p_log_k) {                         \
    BMT_FAST_DISPATCH(amx_p_pairs, g, k, ld, rows, rows_padded, cols, diag, pw, ldw, colsum, p_log_k)                 \
  }                                                                                                                   \
  void amx_grad_rows(const float* acc, int64_t ld_acc, const float* sums, const c10::BFloat16* xc, int64_t ld,       \
                     float scale, int64_t d, int64_t row_begin, int64_t row_end, int64_t col_begin, int64_t col_end,  \
                     In* out) {                                                                                       \
    BMT_FAST_DISPATCH(amx_grad_rows, acc, ld_acc, sums, xc, ld, scale, d, row_begin, row_end, col_begin, col_end,     \
                      out)                                                                                            \
  }
BMT_FAST_DEFINE_AMX_ENTRY(c10::BFloat16)
BMT_FAST_DEFINE_AMX_ENTRY(float)

void transpose_words(const uint32_t* src, int64_t ld_src, int64_t rows, int64_t k_begin, int64_t k_end, uint32_t* dst,
                     int64_t ld_dst) {
  BMT_FAST_DISPATCH(transpose_words, src, ld_src, rows, k_begin, k_end, dst, ld_dst)
}
void transpose_words(const uint64_t* src, int64_t ld_src, int64_t rows, int64_t k_begin, int64_t k_end, uint64_t* dst,
                     int64_t ld_dst) {
  BMT_FAST_DISPATCH(transpose_words, src, ld_src, rows, k_begin, k_end, dst, ld_dst)
}

void exp_scaled(double* values, int64_t count, double scale) { BMT_FAST_DISPATCH(exp_scaled, values, count, scale) }
void row_sq_norms(const float* x, int64_t rows, int64_t d, float* out) { BMT_FAST_DISPATCH(row_sq_norms, x, rows, d, out) }
void row_sq_norms(const double* x, int64_t rows, int64_t d, double* out) { BMT_FAST_DISPATCH(row_sq_norms, x, rows, d, out) }

void stream_rows(const void* src, int64_t ld_src, int64_t rows, int64_t bytes, void* dst, int64_t ld_dst) {
  BMT_FAST_DISPATCH(stream_rows, src, ld_src, rows, bytes, dst, ld_dst)
}

void stream_rows_as(const float* src, int64_t ld_src, int64_t rows, int64_t cols, c10::BFloat16* dst, int64_t ld_dst) {
  BMT_FAST_DISPATCH(stream_rows_as, src, ld_src, rows, cols, dst, ld_dst)
}

void stream_rows_as(const float* src, int64_t ld_src, int64_t rows, int64_t cols, c10::Half* dst, int64_t ld_dst) {
  BMT_FAST_DISPATCH(stream_rows_as, src, ld_src, rows, cols, dst, ld_dst)
}

void bf16_row_pairs(const c10::BFloat16* src, int64_t ld, int64_t pair_begin, int64_t pair_end, int64_t cols,
                    uint32_t* out, int64_t ld_out) {
  BMT_FAST_DISPATCH(bf16_row_pairs, src, ld, pair_begin, pair_end, cols, out, ld_out)
}

// The passes' scratch (aligned_uninitialised, kernels.h: 64-byte aligned) is written before it is read and
// not zero-filled: sized for many features (~230 KiB for the Gram pass and ~400 KiB for the apply pass at 50
// particles), filling it took a sixth of a step with few (perf, 50 x 50 fp32; now 41-46 -> 30-33 us a step
// with the narrower Gram buffer below).

// Scratch sizes follow kernels_impl_*.h, with ld = chunk + kScratchPad (>= kRowPad of kernels_impl_gram.h):
// gram needs rows x ld (rows: n - 1 rounded up to 4; row 0 is the shift) plus (rows/4)^2 x 16 vectors of
// partial sums plus one row of column sums (ld);
// apply needs rows x n (K/n re-laid per register block) plus, packed, 2n rows of apply_pack_chunk(n) + pad.
#define BMT_FAST_DEFINE_COLUMN_ENTRY(In, T)                                                                \
  void gram_columns(const In* x, const In* y, int64_t nx, int64_t n, int64_t d, int64_t col_begin,         \
                    int64_t col_end, int64_t chunk, double* gram, T* shift) {                              \
    const int64_t rows = (std::max<int64_t>(n - 1, 0) + 3) / 4 * 4;                                        \
    /* fewer columns than a chunk: one chunk of them, its buffer no wider (the same sums, in that order) */ \
    chunk = std::min(chunk, (col_end - col_begin + 63) / 64 * 64);                                         \
    const auto scratch = aligned_uninitialised<T>((rows + 1) * (chunk + kScratchPad) + rows * rows * (64 / sizeof(T))); \
    BMT_FAST_DISPATCH(gram_columns, x, y, nx, n, d, col_begin, col_end, chunk, gram, shift, scratch.get())  \
  }                                                                                                        \
  bool apply_columns(const In* x, const In* g, In* phi, int64_t n, int64_t d, int64_t col_begin,           \
                     int64_t col_end, const T* shift, const T* kn, const T* c, T a) {                      \
    const auto scratch = aligned_uninitialised<T>(apply_scratch_size<T>(n));                              \
    BMT_FAST_DISPATCH(apply_columns, x, g, phi, n, d, col_begin, col_end, shift, kn, c, a, scratch.get())  \
  }                                                                                                        \
  void rbf_grad_columns(const In* x, const In* y, int64_t n, int64_t m, int64_t d, int64_t col_begin,       \
                        int64_t col_end, const T* s, In* gx, In* gy) {                                     \
    BMT_FAST_DISPATCH(rbf_grad_columns, x, y, n, m, d, col_begin, col_end, s, gx, gy)                      \
  }                                                                                                        \
  void cross_sq_dists(const In* x, const In* y, int64_t n, int64_t m, int64_t d, int64_t col_begin,         \
                      int64_t col_end, double* dist) {                                                     \
    BMT_FAST_DISPATCH(cross_sq_dists, x, y, n, m, d, col_begin, col_end, dist)                             \
  }
BMT_FAST_DEFINE_COLUMN_ENTRY(float, float)
BMT_FAST_DEFINE_COLUMN_ENTRY(double, double)
BMT_FAST_DEFINE_COLUMN_ENTRY(c10::BFloat16, float)
BMT_FAST_DEFINE_COLUMN_ENTRY(c10::Half, float)

}  // namespace bmt_fast::cpu
