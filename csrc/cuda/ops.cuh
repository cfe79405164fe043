// The CUDA implementations of the torch.ops.bmt_fast ops: argument checks (shared with the CPU and Meta
// kernels), the choice of algorithm, the small ATen preparations (centring, padding, 16-bit copies) and
// the kernel launches. Included by svgd_cuda.cu for the GPU and by emulation/emulated_ops.cpp for the
// CPU emulator, so both run exactly this code.
//
// No host synchronisation: the bandwidth stays on the device (a given H is read by the kernels; the
// median rule's H is computed on the device), so an invalid H shows up as NaN in the result rather than
// as an exception (the public Python API checks the value first).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "../bmt_fast.h"
#include "config.h"
#include "device.cuh"
#include "gram.cuh"
#include "radix.cuh"
#include "tiled_ffma.cuh"
#include "tiled_mma.cuh"

#ifndef BMT_FAST_EMULATE
// Only c10's CUDA headers: ATen/cuda/CUDAContext.h would also need the cuBLAS / cuSPARSE headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace bmt_fast::cuda {

// ---- launching -------------------------------------------------------------------------------------

struct Device {
#ifdef BMT_FAST_EMULATE
  int stream = 0;
#else
  cudaStream_t stream = nullptr;
#endif
  int sms = 1;    // multiprocessors: sizes the split-K and grid-stride grids
  int major = 0;  // compute capability
  // BMT_FAST_CUDA_GRAM=streamed and the device has their shared memory (H100 / H200: 227 KB a block; A100 163 KB
  // and smaller GPUs keep the register kernels): the prompt regime's streamed kernels (gram_streams)
  bool stream_gram = false;
  // Dynamic shared memory a block may opt in to: 227 KB on H100 / H200, 163 KB on A100, 99 KB on compute
  // capability 8.6 / 8.9 (RTX 30 / 40, A10, A40, L4, L40), where some tensor-core kernels do not fit and the
  // FFMA kernels take their place (use_tensor_cores).
  int64_t max_shared_bytes = 227 * 1024;
  int64_t workspace_bytes = kBlockedWorkspaceBytes;  // the row-block path's (rows x n) buffer, at most
  int64_t max_sets_per_launch = kMaxSetsPerLaunch;    // svgd_step_batched_into's sets in one launch, at most
  // the tensor-core step's feature chunks (its grid's y extent, CUDA's limit 65,535), at most: step_by_gram
  int64_t max_feature_chunks = 65535;
};

// The prompt-regime kernels (n + m <= kGramRegisterRows): "registers" (gram_small_kernel / apply_small_kernel,
// measured, the default) or "streamed" (gram_stream_kernel / apply_stream_kernel: columns through shared
// memory by cp.async; not yet measured on a GPU). BMT_FAST_CUDA_GRAM, read at each call.
inline bool streamed_gram_asked() {
  const char* env = std::getenv("BMT_FAST_CUDA_GRAM");
  if (env == nullptr || *env == '\0' || std::string_view(env) == "registers") return false;
  BMT_CHECK(std::string_view(env) == "streamed", "BMT_FAST_CUDA_GRAM must be \"registers\" or \"streamed\", got \"",
            env, "\"");
  return true;
}

inline Device launch_device(const at::Tensor& x) {
  Device dev;
  dev.stream_gram = streamed_gram_asked();
#ifdef BMT_FAST_EMULATE
  (void)x;
  const char* sms = std::getenv("BMT_FAST_EMULATE_SMS");
  dev.sms = sms ? std::max(1, std::atoi(sms)) : 2;
  dev.major = 9;
  if (const char* bytes = std::getenv("BMT_FAST_EMULATE_WORKSPACE_BYTES")) dev.workspace_bytes = std::atoll(bytes);
  if (const char* sets = std::getenv("BMT_FAST_EMULATE_MAX_SETS")) dev.max_sets_per_launch = std::max(1, std::atoi(sets));
  if (const char* bytes = std::getenv("BMT_FAST_EMULATE_MAX_SHARED_BYTES")) dev.max_shared_bytes = std::atoll(bytes);
  if (const char* chunks = std::getenv("BMT_FAST_EMULATE_MAX_FEATURE_CHUNKS")) dev.max_feature_chunks = std::max(1, std::atoi(chunks));
#else
  const int index = x.get_device();
  int minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&dev.sms, cudaDevAttrMultiProcessorCount, index));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&dev.major, cudaDevAttrComputeCapabilityMajor, index));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, index));
  BMT_CHECK(dev.major >= 8, "the CUDA kernels need compute capability 8.0 or newer, device ", num(int64_t{index}),
            " has ", num(int64_t{dev.major}), ".", num(int64_t{minor}));
  dev.stream = c10::cuda::getCurrentCUDAStream(index).stream();
  int shared = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, index));
  dev.max_shared_bytes = shared;
  // the streamed kernels' static shared memory: under 8 KB
  dev.stream_gram = dev.stream_gram && shared >= kStreamSharedBytes + 8 * 1024;
#endif  // the emulator stands for an sm_90 device: room for them
  return dev;
}

template <typename Params>
void launch(void (*kernel)(Params), dim3 grid, dim3 block, size_t shared_bytes, const Device& dev, const Params& p) {
  BMT_CHECK(grid.y <= 65535 && grid.z <= 65535, "too many feature chunks for one launch (grid ",
            num(int64_t{grid.x}), " x ", num(int64_t{grid.y}), "); use algorithm=\"gram\" for this many features");
#ifdef BMT_FAST_EMULATE
  (void)dev;
  emu::launch(kernel, grid, block, shared_bytes, p);
#else
  if (shared_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_bytes)));
  }
  kernel<<<grid, block, shared_bytes, dev.stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

#ifdef BMT_FAST_EMULATE
#define BMT_FAST_DEVICE_GUARD(tensor)
#else
#define BMT_FAST_DEVICE_GUARD(tensor) const c10::cuda::CUDAGuard device_guard_((tensor).device())
#endif

inline unsigned grid_size(int64_t blocks) {
  return static_cast<unsigned>(std::max<int64_t>(1, blocks));
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ---- storage types ---------------------------------------------------------------------------------

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<S>{}) with the storage type S of dtype.
template <typename F>
decltype(auto) with_storage_type(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(Tag<float>{});
    case at::kDouble:
      return f(Tag<double>{});
    case at::kBFloat16:
      return f(Tag<bf16>{});
    case at::kHalf:
      return f(Tag<f16>{});
    default:
      BMT_CHECK(false, "unsupported dtype ", dtype);
  }
  return f(Tag<float>{});  // not reached
}

template <typename T>
const T* pointer(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mutable_pointer(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

inline bool is_half(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// Tensor cores for 16-bit inputs with enough features, where the device has the shared memory of the
// tensor-core kernel for `mode` (see Device::max_shared_bytes); IEEE fp32 CUDA cores otherwise.
inline bool use_tensor_cores(const at::Tensor& x, TileMode mode, const Device& dev) {
  const int64_t d_pad = round_up(x.size(1), 16);
  return is_half(x.scalar_type()) && x.size(1) >= kTensorCoreMinFeatures &&
         static_cast<int64_t>(MmaGeometry::shared_bytes(mode, d_pad <= MmaGeometry::kChunk)) <= dev.max_shared_bytes;
}

// ---- shared preparation ----------------------------------------------------------------------------

struct BandwidthCastParams {
  const double* h;
  float* out;
};

// One thread: H as fp32, a finite H beyond fp32's range (either sign) as +-FLT_MAX.
BMT_GLOBAL void bandwidth_to_float_kernel(const BandwidthCastParams p) {
  constexpr double kTop = 3.4028234663852886e38;  // FLT_MAX
  const double h = *p.h;
  *p.out = static_cast<float>(!is_finite(h) ? h : h > kTop ? kTop : h < -kTop ? -kTop : h);
}

// A given H (any floating type, one element) in the compute type `type` of the kernels, 0-dim. For fp32, a
// float64 H past fp32's range (1e39: valid, K = 1 to fp32's precision) becomes FLT_MAX: a cast made it +inf,
// which the kernels take for an invalid H (all of phi NaN). One launch, as the cast it replaces.
inline at::Tensor bandwidth_as(const at::Tensor& h, at::ScalarType type, const Device& dev) {
  const at::Tensor h0 = h.reshape({});
  if (type != at::kFloat || h0.scalar_type() != at::kDouble) return h0.to(type).contiguous();
  const at::Tensor h64 = h0.contiguous();
  at::Tensor out = at::empty({}, h64.options().dtype(at::kFloat));
  launch(&bandwidth_to_float_kernel, 1, 1, 0, dev, BandwidthCastParams{pointer<double>(h64), mutable_pointer<float>(out)});
  return out;
}

// A given H that shares memory with `out` is read from a copy: the kernels read H while other thread blocks
// write phi there (svgd_step_into with H a view of out had phi NaN or wrong beyond the first block).
inline std::optional<at::Tensor> bandwidth_apart_from(const std::optional<at::Tensor>& h, const at::Tensor& out) {
  if (h && h->storage().is_alias_of(out.storage()) && at::get_overlap_status(*h, out) != at::MemOverlapStatus::No)
    return h->clone();
  return h;
}

// The distances' shift of bf16 particles on the tensor cores (1 x d, fp32), the rule of the Triton kernels
// (kernels/centring.py: exact_bf16_shift, which says why): per column, the mean rounded to a multiple of bf16's
// spacing at the largest |value| of x and y where every value minus it is then a bf16 value (one sign, and
// lo > shift / 2 or hi < shift / 2), else 0; taken where it lies within sqrt(15) standard deviations of x's
// mean and keeps every |value - shift|^2 d within 2^120; else the mean, as before. A mean that is not finite is
// kept. Rounding x - mean to bf16 had lost the particles' own low bits wherever |x - mean| was no smaller than
// |x|: two clusters 0.05 wide whose centres are drawn N(0, 10^2) per feature gave K 4.5e-2 off (the emulator).
inline at::Tensor exact_bf16_shift(const at::Tensor& xa, const std::optional<at::Tensor>& ya, const at::Tensor& mean) {
  at::Tensor lo = xa.amin(0, /*keepdim=*/true), hi = xa.amax(0, /*keepdim=*/true);
  if (ya) {
    lo = at::minimum(lo, ya->amin(0, /*keepdim=*/true));
    hi = at::maximum(hi, ya->amax(0, /*keepdim=*/true));
  }
  const at::Tensor var = (xa - mean).square_().mean(0, /*keepdim=*/true);
  const at::Tensor big = at::maximum(lo.abs(), hi.abs());
  const at::Tensor usable = ((lo > 0) | (hi < 0)) & at::isfinite(big) & (big >= std::ldexp(1.0, -118));
  // bf16's spacing at big: 2^(e - 8) for big in [2^(e - 1), 2^e), e frexp's exponent
  const at::Tensor spacing = at::ldexp(at::ones_like(big), std::get<1>(at::frexp(big)) - 8);
  const at::Tensor rounded = at::round(mean / spacing) * spacing;
  const at::Tensor exact = usable & at::where(lo > 0, lo > rounded / 2, hi < rounded / 2);
  const at::Tensor shift = at::where(exact, rounded, at::zeros_like(rounded));
  const at::Tensor reach = at::maximum((lo - shift).abs(), (hi - shift).abs());
  const at::Tensor keep = ((mean - shift).square() <= var * 15.0) &
                          (reach.square() * static_cast<double>(xa.size(1)) <= std::ldexp(1.0, 120));
  return at::where(at::isfinite(mean), at::where(keep, shift, mean), mean);
}

// x[0] + mean(x - x[0]) of the rows xa (compute type): 1 x d (reference.centre's shift).
inline at::Tensor mean_shift(const at::Tensor& xa) {
  const at::Tensor first = xa.narrow(0, 0, 1);
  return first + (xa - first).mean(0, /*keepdim=*/true);
}

// x (and y by the same vector) shifted by mean_shift(x), in the compute type (reference.centre); for the distances
// of bf16 particles on the tensor cores (exact_bf16 and x bf16) by exact_bf16_shift instead.
inline std::pair<at::Tensor, at::Tensor> centred(const at::Tensor& x, const std::optional<at::Tensor>& y,
                                                 bool exact_bf16 = false) {
  const auto acc = accumulation_type(x.scalar_type());
  const at::Tensor xa = x.to(acc);
  at::Tensor shift = mean_shift(xa);
  std::optional<at::Tensor> ya;
  if (y) ya = y->to(acc);
  if (exact_bf16 && x.scalar_type() == at::kBFloat16) shift = exact_bf16_shift(xa, ya, shift);
  at::Tensor xc = (xa - shift).contiguous();
  at::Tensor yc = ya ? (*ya - shift).contiguous() : xc;
  return {xc, yc};
}

// The tensor-core step's two views of bf16 particles from one conversion and one mean: {x centred by the mean (W
// and phi), x shifted by exact_bf16_shift (the distances)}.
inline std::pair<at::Tensor, at::Tensor> centred_and_exactly_shifted(const at::Tensor& x) {
  const at::Tensor xa = x.to(at::kFloat);
  const at::Tensor mean = mean_shift(xa);
  return {(xa - mean).contiguous(), (xa - exact_bf16_shift(xa, std::nullopt, mean)).contiguous()};
}

// fp16 operands: the power of two s <= 1 (0-dim fp32) that keeps the centred values of xc (and yc) below
// 2^15 in magnitude. Centred fp16 particles can pass fp16's 65504 (x_0 at -35000, the others at +35000: all
// finite, but their centred values rounded to Inf, and H and phi came out NaN); s is 1/2 or 1/4 then, and 1
// for any particles spanning less than 2^15.
inline at::Tensor fp16_operand_scale(const at::Tensor& xc, const at::Tensor& yc) {
  at::Tensor top = xc.abs().max();
  if (!yc.is_same(xc)) top = at::maximum(top, yc.abs().max());
  return at::ceil(at::log2(top.clamp_min(1.0))).neg_().add_(15.0).clamp_max_(0.0).exp2_();
}

// The 16-bit operand of the tensor-core kernels: rows padded to 128, columns to 16, zeros outside.
struct Operand16 {
  at::Tensor values;  // (rows_padded x d_pad), the input's 16-bit type: xc * scale
  at::Tensor norms;   // (rows_padded), fp32 squared norms of the 16-bit values; +inf for padding rows
};

// scale: fp16_operand_scale's s (fp16), or undefined (bf16: no scale)
inline Operand16 operand16(const at::Tensor& xc, at::ScalarType half_type, const at::Tensor& scale = {}) {
  const int64_t rows = xc.size(0), d = xc.size(1);
  Operand16 op;
  op.values = at::zeros({round_up(rows, MmaGeometry::kRows), round_up(d, 16)}, xc.options().dtype(half_type));
  op.values.narrow(0, 0, rows).narrow(1, 0, d).copy_(scale.defined() ? xc * scale : xc);
  op.norms = op.values.to(at::kFloat).square().sum(1);
  // a padding row is infinitely far away: its kernel values come out 0 without a bounds test per entry
  op.norms.narrow(0, rows, op.norms.size(0) - rows).fill_(std::numeric_limits<float>::infinity());
  return op;
}

// ---- Gram path ----------------------------------------------------------------------------------------

// Whether the streamed kernels take rows of d features at these base addresses: asked for on a device with the
// shared memory (Device::stream_gram), every row 16-byte aligned (cp.async copies 16 bytes). fp32 compute types
// only: the callers ask under `if constexpr` (the kernels are not instantiated for float64).
template <typename In>
bool gram_streams(std::initializer_list<const void*> bases, int64_t d, const Device& dev) {
  static_assert(sizeof(compute_t<In>) == 4, "float64 keeps the register kernels");
  if (!dev.stream_gram || (d * static_cast<int64_t>(sizeof(In))) % 16 != 0) return false;
  for (const void* base : bases)
    if (reinterpret_cast<std::uintptr_t>(base) % 16 != 0) return false;
  return true;
}

// One CTA per SM, at most one per 16-byte piece of a row (each takes an equal share of the pieces).
template <typename In>
unsigned stream_grid(int64_t d, const Device& dev) {
  return grid_size(std::min<int64_t>(d / kStreamPiece<In>, dev.sms));
}

// Step 1d after any of the Gram kernels: the direct distances of the pairs that cancelled (gram_repair_kernel).
// A CTA per row and set, times slices of the columns of at least 8 a thread (a set's up to 4 CTAs per SM): a
// launch whose CTAs read a row of G and leave where no pair cancelled. The slices do not depend on the number
// of sets: a batch's sums are each set's single call's.
template <typename In>
void repair_gram(const GramParams<In>& p, int64_t sets, const Device& dev) {
  const int64_t rows = p.n + p.m, per_slice = int64_t{8} * kRepairThreads;
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(4 * dev.sms / rows, (p.d + per_slice - 1) / per_slice));
  launch(&gram_repair_kernel<In>, dim3(grid_size(slices), grid_size(rows), static_cast<unsigned>(sets)),
         kRepairThreads, 0, dev, p);
}

// G (R x R float64: the upper triangle, and in the lower one the direct distances of pairs that cancelled,
// 1d) of the rows of x and y (if given), shifted by x[0].
// finite: svgd_step_into's flag, set true by the register kernels (rows <= kGramRegisterRows only).
// x of 3 dims (sets, n, d), y null, n <= kGramRegisterRows: the G of each set (sets, n, n) in one launch, each
// set's CTAs (blockIdx.z) as its single call's; finite then one flag per set.
template <typename In>
at::Tensor gram_matrix(const at::Tensor& x, const std::optional<at::Tensor>& y, const Device& dev,
                       bool* finite = nullptr) {
  const bool batched = x.dim() == 3;
  const int64_t sets = batched ? x.size(0) : 1, n = x.size(-2), m = y ? y->size(0) : 0, d = x.size(-1);
  const int64_t rows = n + m;
  BMT_CHECK(rows <= kGramMaxRows, "the Gram algorithm handles at most ", num(kGramMaxRows),
            " particles on CUDA, got ", num(rows), " (use algorithm=\"tiled\")");
  BMT_CHECK(!batched || (!y && rows <= kGramRegisterRows && sets <= dev.max_sets_per_launch),
            "gram_matrix: a batch takes sets of at most ", num(kGramRegisterRows), " rows, ",
            num(dev.max_sets_per_launch), " sets a launch");
  at::Tensor gram = batched ? at::zeros({sets, rows, rows}, x.options().dtype(at::kDouble))
                            : at::zeros({rows, rows}, x.options().dtype(at::kDouble));
  GramParams<In> p{pointer<In>(x), y ? pointer<In>(*y) : nullptr, n, m, d, mutable_pointer<double>(gram), 0, finite};
  p.set_x = n * d;
  p.set_gram = rows * rows;
  const auto per_set = [&](unsigned blocks) { return dim3(blocks, 1, static_cast<unsigned>(sets)); };
  if (rows <= kGramRegisterRows) {
    if constexpr (sizeof(compute_t<In>) == 4) {
      if (gram_streams<In>({p.x, y ? p.y : p.x}, d, dev)) {
        auto run = [&](auto kernel) {
          launch(kernel, per_set(stream_grid<In>(d, dev)), kStreamThreads, kStreamSharedBytes, dev, p);
        };
        if (rows <= 4) run(&gram_stream_kernel<In, 4>);
        else if (rows <= 8) run(&gram_stream_kernel<In, 8>);
        else run(&gram_stream_kernel<In, 16>);
        repair_gram(p, sets, dev);
        return gram;
      }
    }
    // one wave: a slice of columns per thread block and pass, at most as many blocks as fit at once
    auto run = [&](auto kernel, int columns, int ctas_per_sm) {
      launch(kernel, per_set(grid_size(std::min<int64_t>((d + columns - 1) / columns, int64_t{ctas_per_sm} * dev.sms))),
             256, 0, dev, p);
    };
    if (rows <= 4) {
      run(&gram_small_kernel<In, 4>, kGramSmallColumns<In, 4>, kGramSmallCtasPerSm<4>);
    } else if (rows <= 8) {
      run(&gram_small_kernel<In, 8>, kGramSmallColumns<In, 8>, kGramSmallCtasPerSm<8>);
    } else {
      run(&gram_small_kernel<In, 16>, kGramSmallColumns<In, 16>, kGramSmallCtasPerSm<16>);
    }
  } else {
    using G = FfmaGeometry<compute_t<In>>;
    const int64_t row_blocks = (rows + G::kRows - 1) / G::kRows;
    const int64_t pairs = row_blocks * (row_blocks + 1) / 2;
    const int64_t splits = std::clamp<int64_t>(2 * dev.sms / pairs, 1, (d + 15) / 16);
    p.cols_per_block = round_up((d + splits - 1) / splits, 16);
    const int64_t blocks = (d + p.cols_per_block - 1) / p.cols_per_block;
    launch(&gram_tile_kernel<In>, dim3(grid_size(blocks), grid_size(pairs)), 256, G::kDotBytes, dev, p);
  }
  repair_gram(p, sets, dev);
  return gram;
}

// H (0-dim float64) for the first n rows of G: the median rule, or `given` copied.
inline at::Tensor gram_bandwidth(const at::Tensor& gram, int64_t n, const std::optional<at::Tensor>& given,
                                 const Device& dev) {
  at::Tensor h = at::empty({}, gram.options());
  const GramBandwidthParams p{pointer<double>(gram), gram.size(0), n, given ? pointer<double>(*given) : nullptr,
                              kBandwidthFloor, mutable_pointer<double>(h)};
  launch(&gram_bandwidth_kernel, 1, 256, 0, dev, p);
  return h;
}

// Step 4 for n <= kGramRegisterRows: phi = K W / n + c V into phi (contiguous), H and K derived from G in
// the kernel; `finite` (or null) is cleared on a non-finite phi value. A batch (x, score, phi (sets, n, d),
// gram_matrix's G of each set, h_given none or one per set, a flag per set): one launch, each set's CTAs as its
// single call's.
template <typename In>
void apply_small(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& h_given,
                 const at::Tensor& gram, at::Tensor& phi, bool* finite, const Device& dev) {
  const int64_t sets = x.dim() == 3 ? x.size(0) : 1, n = x.size(-2), d = x.size(-1);
  ApplyParams<In> ap{pointer<In>(x), pointer<In>(score), mutable_pointer<In>(phi), n, d, pointer<double>(gram),
                     h_given ? pointer<double>(*h_given) : nullptr, kBandwidthFloor, finite};
  ap.set_rows = n * d;
  ap.set_gram = n * n;
  ap.set_given = h_given && h_given->dim() == 1 ? 1 : 0;
  const auto per_set = [&](unsigned blocks) { return dim3(blocks, 1, static_cast<unsigned>(sets)); };
  if constexpr (sizeof(compute_t<In>) == 4) {
    if (gram_streams<In>({ap.x, ap.score}, d, dev)) {
      auto run = [&](auto kernel) {
        launch(kernel, per_set(stream_grid<In>(d, dev)), kStreamThreads, kStreamSharedBytes, dev, ap);
      };
      if (n <= 4) run(&apply_stream_kernel<In, 4>);
      else if (n <= 8) run(&apply_stream_kernel<In, 8>);
      else run(&apply_stream_kernel<In, 16>);
      return;
    }
  }
  // one wave: 512 columns per thread block and pass, at most as many blocks as fit at once
  auto run = [&](auto kernel, int ctas_per_sm) {
    launch(kernel, per_set(grid_size(std::min<int64_t>((d + 511) / 512, int64_t{ctas_per_sm} * dev.sms))), 256, 0,
           dev, ap);
  };
  if (n <= 4) {
    run(&apply_small_kernel<In, 4>, kApplySmallCtasPerSm<In, 4>);
  } else if (n <= 8) {
    run(&apply_small_kernel<In, 8>, kApplySmallCtasPerSm<In, 8>);
  } else {
    run(&apply_small_kernel<In, 16>, kApplySmallCtasPerSm<In, 16>);
  }
}

// The step for n <= kGramRegisterRows by the register (or streamed) kernels: G, then phi into out (contiguous)
// and the flag(s), the repair (1d) between them. x, score, out of one set (n, d), h a 0-dim H or none, one flag; or
// a batch (sets, n, d), h one H per set or none, a flag per set (gram_matrix, apply_small).
inline void step_by_register_kernels(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& h,
                                     at::Tensor& out, bool* finite, const Device& dev) {
  with_storage_type(x.scalar_type(), [&](auto tag) {
    using In = typename decltype(tag)::type;
    const at::Tensor gram = gram_matrix<In>(x, std::nullopt, dev, finite);
    apply_small<In>(x, score, h, gram, out, finite, dev);
    return 0;
  });
}

template <typename In>
at::Tensor svgd_step_gram(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& h_given,
                          const Device& dev) {
  using C = compute_t<In>;
  const int64_t n = x.size(0);
  if (n <= kGramRegisterRows) {  // the apply kernel derives H and K itself: no bandwidth or weights launch
    at::Tensor phi = at::empty_like(x, at::MemoryFormat::Contiguous);
    step_by_register_kernels(x, score, h_given, phi, nullptr, dev);
    return phi;
  }
  const at::Tensor gram = gram_matrix<In>(x, std::nullopt, dev);
  const at::Tensor h = gram_bandwidth(gram, n, h_given, dev);
  const auto acc = accumulation_type(x.scalar_type());
  at::Tensor kn = at::empty({n, n}, x.options().dtype(acc));
  at::Tensor c = at::empty({n}, x.options().dtype(acc));
  at::Tensor a = at::empty({}, x.options().dtype(acc));
  const GramWeightsParams<C> wp{pointer<double>(gram), n, pointer<double>(h), mutable_pointer<C>(kn),
                                mutable_pointer<C>(c), mutable_pointer<C>(a)};
  launch(&gram_weights_kernel<C>, grid_size((n + 7) / 8), 256, 0, dev, wp);
  // More particles: the apply is a small GEMM (n x n) @ (n x d); cuBLAS does it at full speed.
  const at::Tensor xa = x.to(acc);
  // v: the rows about their centre (mean_shift; a shift by row 0 had left (2/H) v huge for a group far from that
  // row, its repulsion cancelling in the compute type: phi depended on the order of the rows)
  const at::Tensor v = xa - mean_shift(xa);
  const at::Tensor w = score.to(acc) - a * v;
  // kn and c leave out the own term k_ii = 1 (gram_weights_kernel): score_i / n is added here
  return at::addmm((c.unsqueeze(1) * v).add_(score.to(acc), 1.0 / static_cast<double>(n)), kn, w).to(x.scalar_type());
}

// ---- tiled path ------------------------------------------------------------------------------------

// The median rule on the FFMA distance tiles (fp32 / fp64): 0-dim tensor of the compute type.
template <typename C>
at::Tensor median_tiled_ffma(const at::Tensor& xc, const at::Tensor& norms, const Device& dev) {
  using G = FfmaGeometry<C>;
  const int64_t n = xc.size(0);
  constexpr int passes = radix_pass_count<C>();
  at::Tensor hist = at::zeros({passes, 2 * kRadixBins}, xc.options().dtype(at::kLong));
  at::Tensor state = at::zeros({4}, xc.options().dtype(at::kLong));
  at::Tensor h = at::empty({}, xc.options());
  auto* state_ptr = reinterpret_cast<RadixState*>(state.mutable_data_ptr());
  for (int index = 0; index < passes; ++index) {
    auto* pass_hist = reinterpret_cast<unsigned long long*>(hist[index].mutable_data_ptr());
    FfmaParams<C, C> p{};
    p.a = p.b = pointer<C>(xc);
    p.a_norms = p.b_norms = pointer<C>(norms);
    p.a_rows = p.b_rows = n;
    p.d = xc.size(1);
    p.self = true;
    p.pass = radix_pass<C>(index);
    p.state = state_ptr;
    p.hist = pass_hist;
    launch(&ffma_tile_kernel<C, C, TileMode::kMedian>, grid_size((n + G::kRows - 1) / G::kRows), 256,
           G::shared_bytes(TileMode::kMedian), dev, p);
    const RadixSelectParams<C> sp{pass_hist, state_ptr, radix_pass<C>(index), index == 0, index == passes - 1,
                                  n, kBandwidthFloor, mutable_pointer<C>(h), pointer<C>(norms)};
    launch(&radix_select_kernel<C>, 1, kSelectThreads, 0, dev, sp);
  }
  return h;
}

// The median rule on the tensor-core distance tiles (the 16-bit centred values): 0-dim fp32 tensor. scale:
// the operand's (fp16_operand_scale), whose square scales the distances: the selection runs on them without the
// floor, which applies to the unscaled H.
template <bool kHalf>
at::Tensor median_tiled_mma(const Operand16& xb, int64_t n, const Device& dev, const at::Tensor& scale = {}) {
  constexpr int passes = radix_pass_count<float>();
  at::Tensor hist = at::zeros({passes, 2 * kRadixBins}, xb.norms.options().dtype(at::kLong));
  at::Tensor state = at::zeros({4}, xb.norms.options().dtype(at::kLong));
  at::Tensor h = at::empty({}, xb.norms.options());
  auto* state_ptr = reinterpret_cast<RadixState*>(state.mutable_data_ptr());
  const int64_t d_pad = xb.values.size(1);
  for (int index = 0; index < passes; ++index) {
    auto* pass_hist = reinterpret_cast<unsigned long long*>(hist[index].mutable_data_ptr());
    MmaParams<float> p{};
    p.a = p.b = pointer<uint16_t>(xb.values);
    p.a_norms = p.b_norms = pointer<float>(xb.norms);
    p.a_rows = p.b_rows = n;
    p.d_pad = d_pad;
    p.self = true;
    p.pass = radix_pass<float>(index);
    p.state = state_ptr;
    p.hist = pass_hist;
    launch(&mma_tile_kernel<kHalf, float, TileMode::kMedian>, grid_size(xb.values.size(0) / MmaGeometry::kRows),
           MmaGeometry::kThreads, MmaGeometry::shared_bytes(TileMode::kMedian, d_pad <= MmaGeometry::kChunk), dev,
           p);
    // (the first n norms: padding rows' are +inf)
    const RadixSelectParams<float> sp{pass_hist, state_ptr, radix_pass<float>(index), index == 0,
                                      index == passes - 1, n, scale.defined() ? 0.0 : kBandwidthFloor,
                                      mutable_pointer<float>(h), pointer<float>(xb.norms)};
    launch(&radix_select_kernel<float>, 1, kSelectThreads, 0, dev, sp);
  }
  return scale.defined() ? h.div_(scale * scale).clamp_min_(kBandwidthFloor) : h;  // (NaN stays NaN)
}

// phi = (O + (2/H) rowsum * xc + score) / n from the tiled kernels' O = K W and rowsum = K 1 (K without its
// diagonal: the own term k_ii = 1 is score_i, added here; folded into W it would be (score_i - a xc_i) +
// a xc_i, whose two large terms cancel when H lies far below the squared distances). The tensor-core
// kernel finishes phi itself (mma_tile_kernel).
inline at::Tensor finish_phi(const at::Tensor& out, const at::Tensor& rowsum, const at::Tensor& a, const at::Tensor& xc,
                             const at::Tensor& score, at::ScalarType dtype) {
  const int64_t n = xc.size(0);
  return out.add_((a * rowsum).unsqueeze(1) * xc).add_(score).div_(static_cast<double>(n)).to(dtype);
}

template <typename C>
at::Tensor svgd_step_tiled_ffma(const at::Tensor& xc, const at::Tensor& score, const std::optional<at::Tensor>& h_given,
                                at::ScalarType dtype, const Device& dev) {
  using G = FfmaGeometry<C>;
  const int64_t n = xc.size(0), d = xc.size(1);
  const at::Tensor norms = xc.square().sum(1);
  const at::Tensor h = h_given ? bandwidth_as(*h_given, xc.scalar_type(), dev) : median_tiled_ffma<C>(xc, norms, dev);
  const at::Tensor a = 2.0 / h;
  const at::Tensor w = (score.to(xc.scalar_type()) - a * xc).contiguous();
  at::Tensor out = at::empty({n, d}, xc.options());
  at::Tensor rowsum = at::empty({n}, xc.options());
  FfmaParams<C, C> p{};
  p.a = p.b = pointer<C>(xc);
  p.a_norms = p.b_norms = pointer<C>(norms);
  p.a_rows = p.b_rows = n;
  p.d = d;
  p.bandwidth = pointer<C>(h);
  p.self = true;
  p.w = pointer<C>(w);
  p.out = mutable_pointer<C>(out);
  p.rowsum = mutable_pointer<C>(rowsum);
  const dim3 grid(grid_size((n + G::kRows - 1) / G::kRows), grid_size((d + G::kFeatures - 1) / G::kFeatures));
  launch(&ffma_tile_kernel<C, C, TileMode::kSvgd>, grid, 256, G::shared_bytes(TileMode::kSvgd), dev, p);
  return finish_phi(out, rowsum, a, xc, score, dtype);
}

// Many features (d > kFusedMaxFeatures): blocks of rows through cuBLAS (see rbf_block_kernel). Workspace:
// one (rows x n) buffer within dev.workspace_bytes (at least one row), beside W and the output (n x d each,
// as for the fused kernel).
template <typename C>
at::Tensor svgd_step_blocked(const at::Tensor& xc, const at::Tensor& score, const std::optional<at::Tensor>& h_given,
                             at::ScalarType dtype, const Device& dev) {
  const int64_t n = xc.size(0), d = xc.size(1);
  const at::Tensor norms = xc.square().sum(1);
  const at::Tensor h = h_given ? bandwidth_as(*h_given, xc.scalar_type(), dev) : median_tiled_ffma<C>(xc, norms, dev);
  const at::Tensor a = 2.0 / h;
  const at::Tensor w = score.to(xc.scalar_type()) - a * xc;
  at::Tensor out = at::empty({n, d}, xc.options());
  at::Tensor rowsum = at::empty({n}, xc.options());
  int64_t block = std::clamp<int64_t>(dev.workspace_bytes / (n * static_cast<int64_t>(sizeof(C))), 1, n);
  if (block < n && block > 64) block = block / 64 * 64;  // several blocks: whole GEMM tiles each
  at::Tensor s = at::empty({block, n}, xc.options());
  for (int64_t r0 = 0; r0 < n; r0 += block) {
    const int64_t rows = std::min(block, n - r0);
    at::Tensor sb = s.narrow(0, 0, rows);
    at::mm_out(sb, xc.narrow(0, r0, rows), xc.t());
    const RbfBlockParams<C> p{mutable_pointer<C>(sb), mutable_pointer<C>(rowsum) + r0, pointer<C>(norms), rows, n, r0,
                              pointer<C>(h)};
    launch(&rbf_block_kernel<C>, grid_size(rows), 256, 0, dev, p);
    at::Tensor ob = out.narrow(0, r0, rows);
    at::mm_out(ob, sb, w);
  }
  return finish_phi(out, rowsum, a, xc, score, dtype);
}

// xd: the particles shifted for the distances (centred_and_exactly_shifted); W and phi take xc, centred by the mean
// (the smaller |xc|, the smaller W's rounding).
//
// bf16 particles whose largest |xc| exceeds kSplitSpread sqrt(H) (a flag on the device, decided there: no
// synchronisation) take the split form of the Triton kernels (splits_w): W = score, and the kernel adds K' B,
// K' = -(2/H) K rounded to bf16, B the distances' operand (xd in bf16: the exactly shifted particles), its row
// sums those of K' (each CTA sums the K' it multiplies); phi = (O - rowsum' b_i + score_i) / n. The folded W =
// score - (2/H) xc rounds (2/H) xc to bf16, an error of up to 2^-9 (2/H) |xc| in every term that the row sum's
// exact (2/H) xc_i does not cancel: two clusters 0.05 wide whose centres are drawn N(0, 10^2) per feature had
// phi 5.6e-2 off (the emulator), where their own repulsion is small. The split form costs one more product
// per column block (as the Triton kernels'; not yet timed on a GPU).
template <bool kHalf>
at::Tensor svgd_step_tiled_mma(const at::Tensor& xc, const at::Tensor& xd, const at::Tensor& score,
                               const std::optional<at::Tensor>& h_given, at::ScalarType dtype, const Device& dev) {
  using G = MmaGeometry;
  const int64_t n = xc.size(0), d = xc.size(1);
  BMT_CHECK((d + G::kFeatures - 1) / G::kFeatures <= dev.max_feature_chunks, "the tensor-core step takes at most ",
            num(dev.max_feature_chunks * G::kFeatures), " features, got ", num(d), "; use algorithm=\"gram\" (auto does "
            "for up to ", num(kGramMaxRows), " particles)");
  const at::Tensor scale = kHalf ? fp16_operand_scale(xd, xd) : at::Tensor();
  const Operand16 xb = operand16(xd, dtype, scale);
  const int64_t rows_padded = xb.values.size(0), d_pad = xb.values.size(1);
  const at::Tensor h = h_given ? bandwidth_as(*h_given, at::kFloat, dev) : median_tiled_mma<kHalf>(xb, n, dev, scale);
  const at::Tensor h_scaled = kHalf ? h * (scale * scale) : h;  // the kernel's distances are the scaled values'
  const at::Tensor a = 2.0 / h;
  std::optional<at::Tensor> split;  // (bf16) a 0-dim bool on the device
  if (!kHalf) split = xc.abs().amax().square_() > h * (kSplitSpread * kSplitSpread);  // (a NaN spread or H: folded)
  // W = score - a_w xc with a_w = a (folded) or 0 (split: W = score), a 0-dim choice: no pass over W to select
  at::Tensor w = score.to(at::kFloat) - (split ? at::where(*split, at::zeros_like(a), a) : a) * xc;
  std::optional<at::Tensor> w_scale;
  if constexpr (kHalf) {  // a power of two that brings max |W| to 2^14 (fp16 overflows at 65504)
    // of the finite entries: a NaN / Inf score stays in its column (as the reference's), not in all of phi
    const at::Tensor top = at::ceil(at::log2(at::nan_to_num(w.abs(), 0.0, 0.0, 0.0).max().clamp_min(1e-30)));
    w_scale = top.neg().add_(14.0).exp2_();
    w = w * *w_scale;
  }
  // W^T in the 16-bit type: features padded to the CTA's 128, particles to the padded rows.
  at::Tensor wt = at::zeros({round_up(d, G::kFeatures), rows_padded}, xc.options().dtype(dtype));
  wt.narrow(0, 0, d).narrow(1, 0, n).copy_(w.t());
  at::Tensor phi = at::empty({n, d}, xc.options().dtype(dtype));
  MmaParams<float> p{};
  p.a = p.b = pointer<uint16_t>(xb.values);
  p.a_norms = p.b_norms = pointer<float>(xb.norms);
  p.a_rows = p.b_rows = n;
  p.d_pad = d_pad;
  p.bandwidth = pointer<float>(h_scaled);
  p.self = true;
  p.wt = pointer<uint16_t>(wt);
  p.wt_ld = rows_padded;
  p.d = d;
  p.phi = mutable_pointer<uint16_t>(phi);
  p.xc = pointer<float>(xc);
  p.score = pointer<uint16_t>(score);  // (contiguous, x's dtype: svgd_step)
  p.repulsion = pointer<float>(a);
  if (w_scale) p.w_scale = pointer<float>(*w_scale);
  if (split) p.split = pointer<bool>(*split);
  const dim3 grid(grid_size(rows_padded / G::kRows), grid_size(wt.size(0) / G::kFeatures));
  launch(&mma_tile_kernel<kHalf, float, TileMode::kSvgd>, grid, G::kThreads,
         G::shared_bytes(TileMode::kSvgd, d_pad <= G::kChunk), dev, p);
  return phi;
}

// ---- ops -------------------------------------------------------------------------------------------

inline bool use_gram(int64_t n, Algorithm algorithm) {
  if (algorithm == Algorithm::kAuto) return n <= kGramMaxParticles;
  return algorithm == Algorithm::kGram;
}

// svgd_step's choice: use_gram's, and with "auto" also the Gram path where the tensor-core step's grid (a CTA row per
// MmaGeometry::kFeatures features) would pass the device's y extent (bf16 / fp16 beyond 8,388,480 features): it
// had refused them, naming an algorithm the public op cannot pass. More particles at that many features (n > the
// Gram path's kGramMaxRows) need over 200 GB for x, score and phi.
inline bool step_by_gram(const at::Tensor& x, Algorithm algorithm, const Device& dev) {
  const int64_t n = x.size(0);
  if (use_gram(n, algorithm)) return true;
  return algorithm == Algorithm::kAuto && n <= kGramMaxRows && use_tensor_cores(x, TileMode::kSvgd, dev) &&
         (x.size(1) + MmaGeometry::kFeatures - 1) / MmaGeometry::kFeatures > dev.max_feature_chunks;
}

// The Gram kernels read a given H as a float64 scalar (a 0-dim tensor), or, for a batch, one per set (sets,).
inline std::optional<at::Tensor> gram_bandwidth_arg(const std::optional<at::Tensor>& bandwidth, bool batch = false) {
  if (!bandwidth) return std::nullopt;
  const at::Tensor h = bandwidth->detach().to(at::kDouble);
  return (batch ? h : h.reshape({})).contiguous();
}

inline at::Tensor svgd_step(const at::Tensor& x_in, const at::Tensor& score_in,
                            const std::optional<at::Tensor>& bandwidth, std::string_view algorithm) {
  check_svgd_step_args(x_in, score_in, bandwidth);
  const Algorithm algo = parse_algorithm(algorithm);
  BMT_FAST_DEVICE_GUARD(x_in);
  const Device dev = launch_device(x_in);
  const at::Tensor x = x_in.contiguous(), score = score_in.contiguous();
  const auto dtype = x.scalar_type();
  if (step_by_gram(x, algo, dev)) {
    const std::optional<at::Tensor> h = gram_bandwidth_arg(bandwidth);
    return with_storage_type(dtype, [&](auto tag) {
      return svgd_step_gram<typename decltype(tag)::type>(x, score, h, dev);
    });
  }
  std::optional<at::Tensor> h;
  if (bandwidth) h = bandwidth->detach().reshape({});
  if (use_tensor_cores(x, TileMode::kSvgd, dev)) {
    if (dtype == at::kBFloat16) {
      const auto [xc, xd] = centred_and_exactly_shifted(x);
      return svgd_step_tiled_mma<false>(xc, xd, score, h, dtype, dev);
    }
    const at::Tensor xc = centred(x, std::nullopt).first;
    return svgd_step_tiled_mma<true>(xc, xc, score, h, dtype, dev);
  }
  const at::Tensor xc = centred(x, std::nullopt).first;
  if (x.size(1) > kFusedMaxFeatures) {
    return dtype == at::kDouble ? svgd_step_blocked<double>(xc, score, h, dtype, dev)
                                : svgd_step_blocked<float>(xc, score, h, dtype, dev);
  }
  if (dtype == at::kDouble) return svgd_step_tiled_ffma<double>(xc, score, h, dtype, dev);
  return svgd_step_tiled_ffma<float>(xc, score, h, dtype, dev);
}

// svgd_step written into out; returns a 0-dim bool on x's device: whether every phi value is finite. For
// n <= kGramRegisterRows on the Gram path the kernels write phi into out and the flag as they go (no pass
// over phi, no host synchronisation); elsewhere phi (from cuBLAS or the tiled kernels) is copied in and
// scanned.
inline at::Tensor svgd_step_into(const at::Tensor& x_in, const at::Tensor& score_in,
                                 const std::optional<at::Tensor>& bandwidth, std::string_view algorithm,
                                 at::Tensor& out) {
  check_svgd_step_args(x_in, score_in, bandwidth);
  check_svgd_step_out(x_in, score_in, out);
  const int64_t n = x_in.size(0);
  if (!use_gram(n, parse_algorithm(algorithm)) || n > kGramRegisterRows) {
    return copy_and_check_finite(out, svgd_step(x_in, score_in, bandwidth, algorithm));
  }
  BMT_FAST_DEVICE_GUARD(x_in);
  const Device dev = launch_device(x_in);
  const at::Tensor x = x_in.contiguous(), score = score_in.contiguous();
  const std::optional<at::Tensor> h = bandwidth_apart_from(gram_bandwidth_arg(bandwidth), out);
  at::Tensor finite = at::empty({}, x.options().dtype(at::kBool));
  step_by_register_kernels(x, score, h, out, finite.mutable_data_ptr<bool>(), dev);
  return finite;
}

// svgd_step_batched_into: sets (x, score, out (sets, n, d)) of n <= kGramRegisterRows particles on the Gram path
// in three launches for up to kMaxSetsPerLaunch sets (and G's memset), not three per set: each set's phi and flag
// as its svgd_step_into's (its CTAs are the single call's: bit for bit in the emulator; on a GPU the split-K
// sums are float64 atomics in either, whose order may differ). Other sets one after another as svgd_step_into.
inline at::Tensor svgd_step_batched_into(const at::Tensor& x_in, const at::Tensor& score_in,
                                         const std::optional<at::Tensor>& bandwidth, std::string_view algorithm,
                                         at::Tensor& out) {
  check_svgd_step_batched_args(x_in, score_in, bandwidth, algorithm, out);
  const int64_t sets = x_in.size(0), n = x_in.size(1);
  if (!use_gram(n, parse_algorithm(algorithm)) || n > kGramRegisterRows) {
    // (set by set: a set's H may lie in an earlier set's out)
    return step_each_set(x_in, score_in, bandwidth_apart_from(bandwidth, out), out, [&](const at::Tensor& xs, const at::Tensor& ss,
                                                             const std::optional<at::Tensor>& hs, at::Tensor& phi) {
      return svgd_step_into(xs, ss, hs, algorithm, phi);
    });
  }
  BMT_FAST_DEVICE_GUARD(x_in);
  const Device dev = launch_device(x_in);
  const at::Tensor x = x_in.contiguous(), score = score_in.contiguous();
  const std::optional<at::Tensor> h = bandwidth_apart_from(gram_bandwidth_arg(bandwidth, /*batch=*/true), out);
  at::Tensor finite = at::empty({sets}, x.options().dtype(at::kBool));
  for (int64_t first = 0; first < sets; first += dev.max_sets_per_launch) {
    const int64_t count = std::min(dev.max_sets_per_launch, sets - first);
    const at::Tensor xs = x.narrow(0, first, count), ss = score.narrow(0, first, count);
    const std::optional<at::Tensor> hs = h ? std::optional<at::Tensor>(h->narrow(0, first, count)) : std::nullopt;
    at::Tensor phi = out.narrow(0, first, count);
    step_by_register_kernels(xs, ss, hs, phi, finite.mutable_data_ptr<bool>() + first, dev);
  }
  return finite;
}

inline at::Tensor median_bandwidth(const at::Tensor& x_in, std::string_view algorithm) {
  check_particles(x_in, "x");
  const Algorithm algo = parse_algorithm(algorithm);
  BMT_FAST_DEVICE_GUARD(x_in);
  const Device dev = launch_device(x_in);
  const at::Tensor x = x_in.contiguous();
  const auto dtype = x.scalar_type(), acc = accumulation_type(dtype);
  const int64_t n = x.size(0);
  if (use_gram(n, algo)) {
    const at::Tensor gram = with_storage_type(
        dtype, [&](auto tag) { return gram_matrix<typename decltype(tag)::type>(x, std::nullopt, dev); });
    return gram_bandwidth(gram, n, std::nullopt, dev).to(acc);
  }
  const bool tensor_cores = use_tensor_cores(x, TileMode::kMedian, dev);
  const at::Tensor xc = centred(x, std::nullopt, /*exact_bf16=*/tensor_cores).first;
  if (tensor_cores) {
    if (dtype == at::kHalf) {
      const at::Tensor scale = fp16_operand_scale(xc, xc);
      return median_tiled_mma<true>(operand16(xc, dtype, scale), n, dev, scale);
    }
    return median_tiled_mma<false>(operand16(xc, dtype), n, dev);
  }
  const at::Tensor norms = xc.square().sum(1);
  if (dtype == at::kDouble) return median_tiled_ffma<double>(xc, norms, dev);
  return median_tiled_ffma<float>(xc, norms, dev);
}

template <typename Out>
at::Tensor rbf_kernel_tiled(const at::Tensor& x, const at::Tensor& y, bool self, const at::Tensor& bandwidth,
                            const Device& dev) {
  const int64_t n = x.size(0), m = y.size(0);
  const auto dtype = x.scalar_type();
  const bool tensor_cores = use_tensor_cores(x, TileMode::kRbf, dev);  // (bf16: shifted exactly for the distances)
  auto [xc, yc] = centred(x, self ? std::nullopt : std::optional<at::Tensor>(y), /*exact_bf16=*/tensor_cores);
  at::Tensor out = at::empty({n, m}, x.options());
  if constexpr (std::is_same_v<Out, bf16> || std::is_same_v<Out, f16>) {
    if (tensor_cores) {
      using G = MmaGeometry;
      constexpr bool kHalf = std::is_same_v<Out, f16>;
      const at::Tensor scale = kHalf ? fp16_operand_scale(xc, yc) : at::Tensor();
      const Operand16 xb = operand16(xc, dtype, scale);
      const Operand16 yb = self ? xb : operand16(yc, dtype, scale);
      const at::Tensor h_given = bandwidth_as(bandwidth, at::kFloat, dev);
      const at::Tensor h = kHalf ? h_given * (scale * scale) : h_given;  // the scaled values' distances
      MmaParams<Out> p{};
      p.a = pointer<uint16_t>(xb.values);
      p.b = pointer<uint16_t>(yb.values);
      p.a_norms = pointer<float>(xb.norms);
      p.b_norms = pointer<float>(yb.norms);
      p.a_rows = n;
      p.b_rows = m;
      p.d_pad = xb.values.size(1);
      p.bandwidth = pointer<float>(h);
      p.self = self;
      p.kernel = mutable_pointer<Out>(out);
      launch(&mma_tile_kernel<std::is_same_v<Out, f16>, Out, TileMode::kRbf>, grid_size(xb.values.size(0) / G::kRows),
             G::kThreads, G::shared_bytes(TileMode::kRbf, p.d_pad <= G::kChunk), dev, p);
      return out;
    }
  }
  using C = compute_t<Out>;
  using G = FfmaGeometry<C>;
  const at::Tensor nx = xc.square().sum(1), ny = self ? nx : yc.square().sum(1);
  const at::Tensor h = bandwidth_as(bandwidth, xc.scalar_type(), dev);
  FfmaParams<C, Out> p{};
  p.a = pointer<C>(xc);
  p.b = pointer<C>(yc);
  p.a_norms = pointer<C>(nx);
  p.b_norms = pointer<C>(ny);
  p.a_rows = n;
  p.b_rows = m;
  p.d = x.size(1);
  p.bandwidth = pointer<C>(h);
  p.self = self;
  p.kernel = mutable_pointer<Out>(out);
  launch(&ffma_tile_kernel<C, Out, TileMode::kRbf>, grid_size((n + G::kRows - 1) / G::kRows), 256,
         G::shared_bytes(TileMode::kRbf), dev, p);
  return out;
}

inline at::Tensor rbf_kernel(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& bandwidth) {
  check_rbf_kernel_args(x_in, y_in, bandwidth);
  BMT_FAST_DEVICE_GUARD(x_in);
  const Device dev = launch_device(x_in);
  const bool self = x_in.is_same(y_in);  // rbf_kernel(x) of the public API: exact unit diagonal
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = self ? x : y_in.contiguous();
  const int64_t n = x.size(0), m = y.size(0);
  return with_storage_type(x.scalar_type(), [&](auto tag) {
    using In = typename decltype(tag)::type;
    if ((self ? n : n + m) <= kRbfGramMaxRows) {
      const at::Tensor gram = gram_matrix<In>(x, self ? std::nullopt : std::optional<at::Tensor>(y), dev);
      const at::Tensor h = bandwidth.detach().to(at::kDouble).reshape({}).contiguous();
      at::Tensor out = at::empty({n, m}, x.options());
      const GramRbfParams<In> p{pointer<double>(gram), n, m, self, pointer<double>(h), mutable_pointer<In>(out)};
      launch(&gram_rbf_kernel<In>, grid_size(std::min<int64_t>((n * m + 255) / 256, 4 * int64_t(dev.sms))), 256, 0,
             dev, p);
      return out;
    }
    return rbf_kernel_tiled<In>(x, y, self, bandwidth.detach(), dev);
  });
}

// The gradient of rbf_kernel, in ATen (cuBLAS for the two products), as for the CPU: with P = grad * K,
//   dL/dx_i = -(2/H) (rowsum_i(P) x_i - (P y)_i), dL/dy_j = -(2/H) (colsum_j(P) y_j - (P^T x)_j),
//   dL/dH = -(1/H) sum P log K   (D = -H log K).
// An output that output_mask leaves out is not computed (undefined).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> rbf_kernel_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                          const at::Tensor& y, const at::Tensor& kernel,
                                                                          const at::Tensor& bandwidth,
                                                                          std::array<bool, 3> output_mask) {
  check_rbf_kernel_backward_args(grad, x, y, kernel, bandwidth);
  BMT_FAST_DEVICE_GUARD(x);
  const auto [want_x, want_y, want_h] = output_mask;
  const auto acc = accumulation_type(x.scalar_type());
  const at::Tensor h = bandwidth.to(acc).reshape({});
  const at::Tensor k = kernel.to(acc);
  const at::Tensor p = grad.to(acc) * k;
  // A self kernel's own terms P_ii (x_i - x_i) are 0: left out, as on the CPU (next to P_ii ~ 1 the sums
  // lost a row's terms of tiny K, and its gradient with them).
  if (y.is_same(x)) p.diagonal().zero_();
  at::Tensor grad_x, grad_y, grad_h;
  if (want_x || want_y) {
    auto [xc, yc] = centred(x, std::optional<at::Tensor>(y));
    const at::Tensor scale = -2.0 / h;
    if (want_x) grad_x = ((p.sum(1, true) * xc - at::mm(p, yc)) * scale).to(x.scalar_type());
    if (want_y) grad_y = ((p.sum(0).unsqueeze(1) * yc - at::mm(p.t(), xc)) * scale).to(y.scalar_type());
  }
  if (want_h) {
    const at::Tensor log_k = at::where(k > 0, k.log(), at::zeros_like(k));
    grad_h = ((p * log_k).sum() * (-1.0 / h)).to(bandwidth.scalar_type()).reshape(bandwidth.sizes());
  }
  return {grad_x, grad_y, grad_h};
}

// Registers the five kernels on the library `m` (the CUDA dispatch key of bmt_fast, or the emulator's
// own library on CPU).
inline void register_kernels(torch::Library& m) {
  m.impl("svgd_step", [](const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& bandwidth,
                         c10::string_view algorithm) {
    return svgd_step(x, score, bandwidth, std::string_view(algorithm.data(), algorithm.size()));
  });
  m.impl("svgd_step_into", [](const at::Tensor& x, const at::Tensor& score,
                              const std::optional<at::Tensor>& bandwidth, c10::string_view algorithm,
                              at::Tensor& out) {
    return svgd_step_into(x, score, bandwidth, std::string_view(algorithm.data(), algorithm.size()), out);
  });
  m.impl("svgd_step_batched_into", [](const at::Tensor& x, const at::Tensor& score,
                                      const std::optional<at::Tensor>& bandwidth, c10::string_view algorithm,
                                      at::Tensor& out) {
    return svgd_step_batched_into(x, score, bandwidth, std::string_view(algorithm.data(), algorithm.size()), out);
  });
  m.impl("median_bandwidth", [](const at::Tensor& x, c10::string_view algorithm) {
    return median_bandwidth(x, std::string_view(algorithm.data(), algorithm.size()));
  });
  m.impl("rbf_kernel", &rbf_kernel);
  m.impl("rbf_kernel_backward", &rbf_kernel_backward);
}

}  // namespace bmt_fast::cuda
