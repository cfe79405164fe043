// Exact median of squared distances by radix selection on their bit patterns (a non-negative float
// orders like its bits), as the CPU kernel does: each pass histograms the next `width` bits of the keys
// whose higher bits equal the prefix found so far, for the two middle ranks of the numpy.median rule at
// once. Nothing of size n x n is stored: each pass recomputes the distances.
#pragma once

#include "../radix_key.h"
#include "device.cuh"

namespace bmt_fast::cuda {

constexpr int kRadixWidth = 11;
constexpr int kRadixBins = 1 << kRadixWidth;

// Bits of a non-negative value below the (always zero) sign bit: 31 for float, 63 for double.
template <typename T>
constexpr int key_bits() {
  return 8 * static_cast<int>(sizeof(T)) - 1;
}

// One pass: the bins are bits [shift, shift + width) of the key.
struct RadixPass {
  int shift;
  int width;
};

// Pass `index` of the fixed schedule: widths of kRadixWidth from the top bit down, the last narrower.
template <typename T>
constexpr RadixPass radix_pass(int index) {
  const int fixed = index * kRadixWidth;
  const int width = key_bits<T>() - fixed < kRadixWidth ? key_bits<T>() - fixed : kRadixWidth;
  return RadixPass{key_bits<T>() - fixed - width, width};
}

template <typename T>
constexpr int radix_pass_count() {
  return (key_bits<T>() + kRadixWidth - 1) / kRadixWidth;
}

// The selection so far, for the two middle ranks (equal when the count is odd): the bits found and the
// rank still to skip among the keys that carry them. Lives in device memory between passes.
struct RadixState {
  unsigned long long prefix[2];
  unsigned long long rank[2];
};

template <typename T>
BMT_DEVICE typename KeyOf<T>::type key_of(T dist) {
  return bits_of(dist);
}

// Adds `weight` to the bin of `key` in the histogram of each target whose prefix the key carries.
// hist holds kRadixBins counts per target; with `same` prefixes only target 0 is counted.
template <typename Count, typename Key>
BMT_DEVICE void radix_count(Count* hist, Key key, RadixPass pass, const unsigned long long (&prefix)[2], bool same,
                            Count weight) {
  const unsigned long long wide = static_cast<unsigned long long>(key);
  const unsigned long long top = wide >> (pass.shift + pass.width);  // shift + width <= 63: defined
  const unsigned bin = static_cast<unsigned>(wide >> pass.shift) & ((1u << pass.width) - 1u);
  if (top == prefix[0]) atomicAdd(&hist[bin], weight);
  if (!same && top == prefix[1]) atomicAdd(&hist[kRadixBins + bin], weight);
}

// Block-wide inclusive prefix sum of one value per thread (blockDim.x a multiple of 32); scratch: 32
// shared slots. Ends with all threads past a barrier, so scratch may be reused right after.
BMT_DEVICE unsigned long long block_inclusive_sum(unsigned long long value, unsigned long long* scratch) {
  const int lane = lane_id(), warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  for (int offset = 1; offset < kWarp; offset *= 2) {
    const unsigned long long up = __shfl_up_sync(kFullMask, value, offset);
    if (lane >= offset) value += up;
  }
  if (lane == kWarp - 1) scratch[warp] = value;
  __syncthreads();
  if (warp == 0) {
    unsigned long long total = lane < warps ? scratch[lane] : 0;
    for (int offset = 1; offset < kWarp; offset *= 2) {
      const unsigned long long up = __shfl_up_sync(kFullMask, total, offset);
      if (lane >= offset) total += up;
    }
    scratch[lane] = total;  // inclusive sums of the warp totals
  }
  __syncthreads();
  if (warp > 0) value += scratch[warp - 1];
  __syncthreads();
  return value;
}

// Block-wide select step: picks the bin of each target's rank and narrows rank and prefix in `state`
// (shared memory). Each thread sums a run of consecutive bins, a block scan finds the run holding the
// rank, and that run's thread walks it. `zeros` keys equal to 0 (the diagonal of the distance matrix)
// were left out of the histogram and count in bin 0 here. scratch: 36 shared slots.
template <typename Count>
BMT_DEVICE void radix_select_block(const Count* hist, RadixPass pass, unsigned long long zeros, RadixState* state,
                                   unsigned long long* scratch) {
  const bool same = state->prefix[0] == state->prefix[1];
  const int bins = 1 << pass.width;
  const int per_thread = (bins + blockDim.x - 1) / blockDim.x;
  const int first = threadIdx.x * per_thread;
  const int last = first + per_thread < bins ? first + per_thread : bins;
  unsigned long long* chosen = scratch + kWarp;  // bin and count below it, per target
  if (threadIdx.x == 0) {
    // Defaults that only survive if the histogram held fewer keys than the rank, which the deterministic
    // recomputation of the distances in every pass rules out.
    for (int t = 0; t < 2; ++t) chosen[2 * t] = bins - 1, chosen[2 * t + 1] = 0;
  }
  for (int t = 0; t < 2; ++t) {
    const Count* h = hist + (same ? 0 : t) * kRadixBins;
    const bool with_zeros = state->prefix[t] == 0;
    auto count_of = [&](int b) {
      return static_cast<unsigned long long>(h[b]) + (b == 0 && with_zeros ? zeros : 0ull);
    };
    unsigned long long local = 0;
    for (int b = first; b < last; ++b) local += count_of(b);
    const unsigned long long inclusive = block_inclusive_sum(local, scratch);
    const unsigned long long rank = state->rank[t];
    unsigned long long below = inclusive - local;
    if (below <= rank && rank < inclusive) {  // exactly one thread holds the rank
      int b = first;
      for (; b < last; ++b) {
        const unsigned long long count = count_of(b);
        if (below + count > rank) break;
        below += count;
      }
      chosen[2 * t] = static_cast<unsigned long long>(b);
      chosen[2 * t + 1] = below;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int t = 0; t < 2; ++t) {
      state->rank[t] -= chosen[2 * t + 1];
      state->prefix[t] = (state->prefix[t] << pass.width) | chosen[2 * t];
    }
  }
  __syncthreads();
}

// The median rule H = max(median / log(n + 1), floor) from the two selected keys.
template <typename T>
BMT_DEVICE T bandwidth_from_keys(const RadixState& state, long long n, double floor) {
  double value[2];
  for (int t = 0; t < 2; ++t) {
    if constexpr (sizeof(T) == 4) {
      value[t] = static_cast<double>(float_from_bits(static_cast<uint32_t>(state.prefix[t])));
    } else {
      value[t] = double_from_bits(static_cast<uint64_t>(state.prefix[t]));
    }
  }
  const double median = 0.5 * (value[0] + value[1]);
  const double h = median / log(static_cast<double>(n) + 1.0);
  return static_cast<T>(h > floor ? h : floor);
}

// Block-wide: zero a shared histogram of two targets.
template <typename Count>
BMT_DEVICE void zero_histogram(Count* hist) {
  for (int b = threadIdx.x; b < 2 * kRadixBins; b += blockDim.x) hist[b] = 0;
}

// Block-wide: add a shared histogram into the global one (after a barrier).
BMT_DEVICE void flush_histogram(const unsigned* hist, unsigned long long* global) {
  for (int b = threadIdx.x; b < 2 * kRadixBins; b += blockDim.x)
    if (hist[b]) atomicAdd(&global[b], static_cast<unsigned long long>(hist[b]));
}

// The select step between the histogram passes of the tiled median (one CTA). The first pass starts
// from the two middle ranks of all n*n distances; the last writes the bandwidth, NaN where a squared norm of
// the centred rows is not finite: a NaN or an infinity in the particles spreads down its column in the
// centring, and the median rule's H is then NaN, as the reference's and the CPU's (the keys take NaN
// distances as 0). Told here, in the one CTA's last step: no launch of its own.
template <typename T>
struct RadixSelectParams {
  const unsigned long long* hist;  // 2 x kRadixBins, this pass
  RadixState* state;
  RadixPass pass;
  bool first, last;
  long long n;
  double floor;
  T* bandwidth;    // written by the last pass
  const T* norms;  // the n squared norms of the centred rows, read by the last pass
};

constexpr int kSelectThreads = 256;

template <typename T>
BMT_GLOBAL void BMT_LAUNCH_BOUNDS(kSelectThreads, 1) radix_select_kernel(const RadixSelectParams<T> p) {
  __shared__ RadixState state;
  __shared__ unsigned long long scratch[kWarp + 4];
  __shared__ int all_finite;
  if (threadIdx.x == 0) {
    state = *p.state;
    if (p.first) {
      const unsigned long long total = static_cast<unsigned long long>(p.n) * static_cast<unsigned long long>(p.n);
      state.prefix[0] = state.prefix[1] = 0;
      state.rank[0] = (total - 1) / 2;
      state.rank[1] = total / 2;
    }
  }
  __syncthreads();
  radix_select_block(p.hist, p.pass, static_cast<unsigned long long>(p.n), &state, scratch);
  if (p.last) {  // (the same for every thread: the barriers are reached by all)
    if (threadIdx.x == 0) all_finite = 1;
    __syncthreads();
    for (long long r = threadIdx.x; r < p.n; r += blockDim.x)
      if (!is_finite(p.norms[r])) all_finite = 0;  // (threads that write, write the same)
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    *p.state = state;
    if (p.last) *p.bandwidth = all_finite ? bandwidth_from_keys<T>(state, p.n, p.floor) : static_cast<T>(quiet_nan_d());
  }
}

}  // namespace bmt_fast::cuda
