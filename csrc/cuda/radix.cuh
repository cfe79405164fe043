// Exact median of squared distances by radix selection on their bit patterns (a non-negative float
// orders like its bits), as the CPU kernel does: each pass histograms the next `width` bits of the keys
// whose higher bits equal the prefix found so far, for the two middle ranks of the numpy.median rule at
// once. Nothing of size n x n is stored: each pass recomputes the distances.
#pragma once

#include "device.cuh"

namespace bmt_fast::cuda {

constexpr int kRadixWidth = 11;
constexpr int kRadixBins = 1 << kRadixWidth;

template <typename T>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
};
template <>
struct KeyOf<double> {
  using type = uint64_t;
};

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

// One thread: picks the bin of each target's rank, narrows rank and prefix. `zeros` keys equal to 0
// (the diagonal of the distance matrix) were left out of the histogram and are added to bin 0 here.
template <typename Count>
BMT_DEVICE void radix_select_step(const Count* hist, RadixPass pass, unsigned long long zeros, RadixState& state) {
  const bool same = state.prefix[0] == state.prefix[1];
  const int bins = 1 << pass.width;
  for (int t = 0; t < 2; ++t) {
    const Count* h = hist + (same ? 0 : t) * kRadixBins;
    unsigned long long below = 0;
    int bin = 0, last_nonempty = 0;
    for (; bin < bins; ++bin) {
      const unsigned long long count =
          static_cast<unsigned long long>(h[bin]) + (bin == 0 && state.prefix[t] == 0 ? zeros : 0);
      if (count) last_nonempty = bin;
      if (below + count > state.rank[t]) break;
      below += count;
    }
    if (bin == bins) {  // only if distances changed between passes; stay within the data regardless
      bin = last_nonempty;
      const unsigned long long count =
          static_cast<unsigned long long>(h[bin]) + (bin == 0 && state.prefix[t] == 0 ? zeros : 0);
      below -= count;
    }
    state.rank[t] -= below;
    state.prefix[t] = (state.prefix[t] << pass.width) | static_cast<unsigned long long>(bin);
  }
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

// The select step between the histogram passes of the tiled median (one thread). The first pass starts
// from the two middle ranks of all n*n distances; the last writes the bandwidth.
template <typename T>
struct RadixSelectParams {
  const unsigned long long* hist;  // 2 x kRadixBins, this pass
  RadixState* state;
  RadixPass pass;
  bool first, last;
  long long n;
  double floor;
  T* bandwidth;  // written by the last pass
};

template <typename T>
BMT_GLOBAL void radix_select_kernel(const RadixSelectParams<T> p) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  RadixState state = *p.state;
  if (p.first) {
    const unsigned long long total = static_cast<unsigned long long>(p.n) * static_cast<unsigned long long>(p.n);
    state.prefix[0] = state.prefix[1] = 0;
    state.rank[0] = (total - 1) / 2;
    state.rank[1] = total / 2;
  }
  radix_select_step(p.hist, p.pass, static_cast<unsigned long long>(p.n), state);
  *p.state = state;
  if (p.last) *p.bandwidth = bandwidth_from_keys<T>(state, p.n, p.floor);
}

}  // namespace bmt_fast::cuda
