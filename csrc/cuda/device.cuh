// The device facilities the kernels use, behind one small interface: compiled by nvcc they are the
// CUDA intrinsics and inline PTX; compiled by a host compiler with -DBMT_FAST_EMULATE they come from the
// CPU emulator (emulation/emulator.h), so CI runs the same kernel source without a GPU.
#pragma once

#include <cstdint>
#include <cstring>

#ifdef BMT_FAST_EMULATE
#include <c10/util/Half.h>

#include <cmath>

#include "emulation/emulator.h"
#define BMT_DEVICE inline
#define BMT_GLOBAL inline
#define BMT_LAUNCH_BOUNDS(threads, blocks)
#else
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#define BMT_DEVICE __device__ __forceinline__
#define BMT_GLOBAL __global__
#define BMT_LAUNCH_BOUNDS(threads, blocks) __launch_bounds__(threads, blocks)
#endif

namespace bmt_fast::cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

// 16-bit storage types: the bits of a bfloat16 / IEEE half. Kernels convert to fp32 on load.
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

// ---- conversions ---------------------------------------------------------------------------------

BMT_DEVICE float float_from_bits(uint32_t bits) {
#ifdef BMT_FAST_EMULATE
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#else
  return __uint_as_float(bits);
#endif
}

BMT_DEVICE uint32_t bits_of(float f) {
#ifdef BMT_FAST_EMULATE
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
#else
  return __float_as_uint(f);
#endif
}

BMT_DEVICE uint64_t bits_of(double f) {
#ifdef BMT_FAST_EMULATE
  uint64_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
#else
  return static_cast<uint64_t>(__double_as_longlong(f));
#endif
}

BMT_DEVICE double double_from_bits(uint64_t bits) {
#ifdef BMT_FAST_EMULATE
  double f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#else
  return __longlong_as_double(static_cast<long long>(bits));
#endif
}

// fp32 -> bf16, round to nearest even (as torch rounds), NaN stays NaN.
BMT_DEVICE uint16_t bf16_bits(float f) {
  const uint32_t u = bits_of(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

BMT_DEVICE uint16_t f16_bits(float f) {
#ifdef BMT_FAST_EMULATE
  return c10::Half(f).x;
#else
  return __half_as_ushort(__float2half_rn(f));
#endif
}

BMT_DEVICE float to_float(float v) { return v; }
BMT_DEVICE double to_float(double v) { return v; }
BMT_DEVICE float to_float(bf16 v) { return float_from_bits(static_cast<uint32_t>(v.bits) << 16); }
BMT_DEVICE float to_float(f16 v) {
#ifdef BMT_FAST_EMULATE
  return static_cast<float>(c10::Half(v.bits, c10::Half::from_bits()));
#else
  return __half2float(__ushort_as_half(v.bits));
#endif
}

template <typename T>
struct Store;
template <>
struct Store<float> {
  BMT_DEVICE static float from(float v) { return v; }
};
template <>
struct Store<double> {
  BMT_DEVICE static double from(double v) { return v; }
};
template <>
struct Store<bf16> {
  BMT_DEVICE static bf16 from(float v) { return bf16{bf16_bits(v)}; }
};
template <>
struct Store<f16> {
  BMT_DEVICE static f16 from(float v) { return f16{f16_bits(v)}; }
};

// The compute type of a storage type: fp64 for fp64, fp32 otherwise.
template <typename T>
struct ComputeOf {
  using type = float;
};
template <>
struct ComputeOf<double> {
  using type = double;
};
template <typename T>
using compute_t = typename ComputeOf<T>::type;

// ---- math ----------------------------------------------------------------------------------------

BMT_DEVICE float exp_of(float v) { return expf(v); }
BMT_DEVICE double exp_of(double v) { return exp(v); }
// 2^v (the MMA path folds log2(e) into the bandwidth): exp2f, at most 2 ulp off (CUDA math API).
BMT_DEVICE float exp2_of(float v) { return exp2f(v); }

BMT_DEVICE bool is_finite(double v) {
#ifdef BMT_FAST_EMULATE
  return std::isfinite(v);
#else
  return isfinite(v);
#endif
}
BMT_DEVICE bool is_finite(float v) {
#ifdef BMT_FAST_EMULATE
  return std::isfinite(v);
#else
  return isfinite(v);
#endif
}

BMT_DEVICE float quiet_nan_f() { return float_from_bits(0x7fc00000u); }
BMT_DEVICE double quiet_nan_d() { return double_from_bits(0x7ff8000000000000ull); }

// 1 / H, or NaN when H is not a positive finite number: the kernels do not read the bandwidth back to
// the host (no synchronisation), so an invalid bandwidth turns the whole result into NaN instead.
template <typename T>
BMT_DEVICE T inverse_bandwidth(T h) {
  if (h > T(0) && is_finite(static_cast<double>(h))) return T(1) / h;
  return sizeof(T) == 4 ? static_cast<T>(quiet_nan_f()) : static_cast<T>(quiet_nan_d());
}

// ---- warp collectives ----------------------------------------------------------------------------

template <typename T>
BMT_DEVICE T shfl_xor(T v, int lane_mask) {
  return __shfl_xor_sync(kFullMask, v, lane_mask);
}

BMT_DEVICE int lane_id() { return static_cast<int>(threadIdx.x) % kWarp; }

// ---- dynamic shared memory -----------------------------------------------------------------------

#ifdef BMT_FAST_EMULATE
#define BMT_DYNAMIC_SHARED(name) unsigned char* name = ::emu::dynamic_shared()
#else
#define BMT_DYNAMIC_SHARED(name)                         \
  extern __shared__ __align__(16) unsigned char name##_[]; \
  unsigned char* name = name##_
#endif

// ---- cp.async (sm_80+): 16-byte global -> shared copies that bypass registers --------------------

BMT_DEVICE void cp_async_16(void* shared_dst, const void* global_src) {
#ifdef BMT_FAST_EMULATE
  emu::cp_async(shared_dst, global_src, 16);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(global_src));
#else
  *static_cast<uint4*>(shared_dst) = *static_cast<const uint4*>(global_src);
#endif
}

BMT_DEVICE void cp_async_commit() {
#ifdef BMT_FAST_EMULATE
  emu::cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
BMT_DEVICE void cp_async_wait() {
#ifdef BMT_FAST_EMULATE
  emu::cp_async_wait(kPending);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

// ---- tensor cores: mma.sync m16n8k16, fp32 accumulate (sm_80+) -----------------------------------

// d += A (16x16, row) * B (16x8, col); fragments as documented in emulation/emulator.h.
template <bool kHalf>  // false: bf16 operands, true: fp16 operands
BMT_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef BMT_FAST_EMULATE
  if constexpr (kHalf) {
    emu::mma_m16n8k16(d, a, b, [](uint16_t bits) { return to_float(f16{bits}); });
  } else {
    emu::mma_m16n8k16(d, a, b, [](uint16_t bits) { return to_float(bf16{bits}); });
  }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kHalf) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  __trap();  // the op layer never launches tensor-core kernels below sm_80
#endif
}

// ldmatrix.x4: four 8 x 8 matrices of 16-bit values from shared memory in one warp-wide load. Lanes
// 8i..8i+7 give the addresses of the eight rows (16 bytes each, 16-byte aligned) of matrix i; lane l gets
// row l / 4, values 2 (l % 4) and 2 (l % 4) + 1 of matrix i in r[i]: the mma.m16n8k16 A / B fragments.
// kTrans (ldmatrix.x4.trans): each matrix transposed: lane l gets column l / 4, rows 2 (l % 4) and
// 2 (l % 4) + 1. A row-major (k x n) tile in shared memory gives the mma B fragments (as FlashAttention's V):
// matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15) are b[0], b[1] of the n8 tile
// n 0-7 and b[0], b[1] of n 8-15 when lane l addresses row k = l % 16 at column n = 8 (l / 16).
template <bool kTrans = false>
BMT_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* shared_row) {
#ifdef BMT_FAST_EMULATE
  emu::ldmatrix_x4<kTrans>(r, shared_row);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared_row));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
  }
#else
  __trap();  // the op layer never launches tensor-core kernels below sm_80
#endif
}

// Two 16-bit values in one register, the first in the lower half (the fragment convention).
BMT_DEVICE uint32_t pack_pair(uint16_t low, uint16_t high) {
  return static_cast<uint32_t>(low) | (static_cast<uint32_t>(high) << 16);
}

}  // namespace bmt_fast::cuda
