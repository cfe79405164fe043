// The exact median of the n^2 squared distances of n particles (numpy.median's: diagonal zeros included,
// off-diagonal pairs twice) from any path's tiles of dot products, without n x n memory beyond one tile:
// by selection over all n(n-1)/2 distances for few particles, by a sampled window around the two middle
// ranks for more, and by radix passes over recomputed tiles where the window misses. A path's Tiles type
// (paths.h: GemmTiles; fused.cpp, amx.cpp, chunked.cpp their own) gives its tiles; collect_between has an
// overload for a path that collects without tiles (fused.cpp).
#pragma once

#include <array>
#include <atomic>
#include <cstdlib>
#include <utility>

#include "paths.h"

namespace bmt_fast::cpu {

// Exact numpy.median of all n*n squared distances (diagonal zeros included) by radix selection on the
// bit patterns of the distances: 16 bits per pass, each pass recomputing the distance tiles, so memory
// stays O(tile). Off-diagonal pairs count twice (D is symmetric), the diagonal adds n exact zeros.
template <typename T, typename Tiles>
double median_sq_dist_tiled(const at::Tensor& xc, const at::Tensor& norms, const Tiles& tiles) {
  using Key = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr int kKeyBits = 8 * sizeof(Key) - 1;  // the sign bit of a distance is always 0
  constexpr int kWidth = 16;
  const int64_t n = xc.size(0);
  const int64_t total = n * n;
  const std::array<int64_t, 2> ranks0{(total - 1) / 2, total / 2};  // equal when total is odd
  std::array<int64_t, 2> rank = ranks0;
  std::array<uint64_t, 2> prefix{0, 0};
  const T* nr = norms.data_ptr<T>();
  const int threads = at::get_num_threads();

  for (int fixed = 0; fixed < kKeyBits;) {
    RadixPass pass{};
    pass.width = std::min(kWidth, kKeyBits - fixed);
    pass.shift = kKeyBits - fixed - pass.width;
    pass.num_targets = prefix[0] == prefix[1] ? 1 : 2;
    pass.prefix[0] = prefix[0];
    pass.prefix[1] = prefix[1];
    const int64_t bins = int64_t(1) << pass.width;
    std::vector<std::vector<int64_t>> per_thread(threads, std::vector<int64_t>(pass.num_targets * bins, 0));
    tiles([&](const at::Tensor& tile, int64_t i0, int64_t j0, int64_t begin, int64_t end) {
      const int64_t cols = tile.size(1);
      radix_histogram(tile.data_ptr<T>(), cols, begin, end, cols, nr + i0, nr + j0, i0 == j0, 2, pass,
                      per_thread[at::get_thread_num()].data());
    });
    std::vector<int64_t> hist(pass.num_targets * bins, 0);
    for (const auto& h : per_thread)
      for (size_t b = 0; b < hist.size(); ++b) hist[b] += h[b];
    for (int t = 0; t < pass.num_targets; ++t)
      if (prefix[t] == 0) hist[t * bins] += n;  // the diagonal: key 0

    for (int target = 0; target < 2; ++target) {
      const int64_t* h = hist.data() + (pass.num_targets == 1 ? 0 : target) * bins;
      int64_t below = 0, bin = 0, last_nonempty = 0;
      for (; bin < bins; ++bin) {
        if (h[bin]) last_nonempty = bin;
        if (below + h[bin] > rank[target]) break;
        below += h[bin];
      }
      if (bin == bins) {  // cannot happen with deterministic GEMMs; stay within the data regardless
        bin = last_nonempty;
        below -= h[bin];
      }
      rank[target] -= below;
      prefix[target] = (prefix[target] << pass.width) | uint64_t(bin);
    }
    fixed += pass.width;
  }
  std::array<double, 2> value{};
  for (int t = 0; t < 2; ++t) {
    const Key key = static_cast<Key>(prefix[t]);
    T v;
    std::memcpy(&v, &key, sizeof(v));
    value[t] = static_cast<double>(v);
  }
  return 0.5 * (value[0] + value[1]);
}

// The k-th smallest (0-based) of non-negative values by radix selection on their bit patterns (which
// order like the values): 11-bit digits from the top, each pass keeping only the keys of the selected
// digit. Branch-free counting: std::nth_element was 5x slower on 32,640 distances on a 2-core VM. The
// distances share their top bits, so most keys of a pass fall in a few bins: kCopies histograms (key i
// counts in copy i % kCopies) keep each increment off the previous one's store, and the keys of the digit
// are kept without a branch (about half of them are, early on). fp32 median_bandwidth by the selection over
// all distances, one thread, alternating, 2 rounds (us): 512 x 8 (130,816 distances) 355-378 -> 293-303,
// 256 x 16 110-111 -> 94-96, 100 x 50 level. Up to kSelectByPartitionMax values a partition of the same
// keys instead (std::nth_element until a fourth 2026-12-05 session, select_key since): each radix pass
// clears and merges its 4 x 2048 bins, ~5 us of fixed cost a selection.
// Alone, on the distances of n random particles (2-core AMD EPYC, Zen 4, fp32, best of 5, us), radix /
// nth_element: n = 16 (120 values) 5.1 / 0.2, 32 5.9 / 0.6, 64 7.3 / 3.0, 96 10.3 / 8.8, 128 15.8 / 11.5,
// 192 28.6 / 40.6; in fp32 median_bandwidth (tiled), previous build / this one, 2 rounds: 64 x 16 16.0-16.2
// -> 12.1-12.3, 90 x 16 24.7-24.8 -> 21.5-22.2, 100 x 16 27.2-27.4 -> 24.4-24.5, 120 x 16 32.4-33.0 ->
// 31.4-31.5, but 128 x 16 35.3-35.4 -> 39.2 (the op's own order of the distances), hence the bound (n <=
// 111). The keys compare without the sign bit, as the radix passes read them: the same value, NaN included
// (whose comparisons as floats would break nth_element's ordering). (Those nth_element timings were best of 5
// on the same distances, which branch predictors learn. On fresh distances for every call, fp32
// median_bandwidth, 2 threads, PASSIVE, Zen 5 VM, nth_element -> select_key (us): 32 x 2 8.8-9.3 -> 6.5-6.8,
// 48 x 8 12.0-12.8 -> 6.9-7.3, 64 x 16 18.4-19.8 -> 9.5-10.0, 100 x 16 40-43 -> 18, 111 x 16 45-49 -> 18, 256 x
// 16 (its window's sample) 67-75 -> 42-44; fp64 alike. select_key for all sizes (no radix) was level or
// slower from 128 x 16 (8128 values: 23 against 23-25 us) to 512 x 300, hence the bound stays.)
constexpr size_t kSelectByPartitionMax = 6144;

// The k-th smallest of the keys (their bits without the sign bit: keys is overwritten) by quickselect whose
// three-way partitions write each key to both ends of a second buffer and advance the end it belongs to, so
// that no branch depends on a key (std::nth_element's comparisons were mispredicted about half of the time
// on distances: in perf of a Gram step of 32 x 2 particles by the median rule, one thread, 2-core AMD EPYC
// Zen 5, it took 24 % of the step). The pivot is the median of three keys; after kMaxRounds rounds (or
// below kSmall keys) std::nth_element finishes.
template <typename Key>
Key select_key(std::vector<Key>& keys, int64_t k_in) {
  constexpr Key kMagnitude = std::numeric_limits<Key>::max() >> 1;
  constexpr size_t kSmall = 32;
  constexpr int kMaxRounds = 48;
  for (Key& key : keys) key &= kMagnitude;
  std::vector<Key> other(keys.size());
  Key* buffers[2] = {keys.data(), other.data()};
  int at = 0;          // the buffer holding the live keys, from `offset`
  size_t offset = 0, m = keys.size(), k = static_cast<size_t>(k_in);
  for (int round = 0; m > kSmall && round < kMaxRounds; ++round) {
    const Key* src = buffers[at] + offset;
    Key* dst = buffers[1 - at];
    const Key a = src[m / 4], b = src[m / 2], c = src[3 * m / 4];
    const Key pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));
    size_t below = 0, above = 0;  // keys < pivot go to dst's front, keys > pivot to its back
    for (size_t i = 0; i < m; ++i) {
      const Key v = src[i];
      dst[below] = v;
      dst[m - 1 - above] = v;
      below += v < pivot;
      above += v > pivot;
    }
    at = 1 - at;
    if (k < below) {
      offset = 0;
      m = below;
    } else if (k >= m - above) {
      k -= m - above;
      offset = m - above;
      m = above;
    } else {
      return pivot;
    }
  }
  Key* live = buffers[at] + offset;
  std::nth_element(live, live + k, live + m);
  return live[k];
}

template <typename T>
T select_nonnegative(const std::vector<T>& values, int64_t k) {
  using Key = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr int kDigit = 11, kCopies = 4;
  constexpr int64_t kBins = int64_t{1} << kDigit;
  std::vector<Key> keys(values.size());
  std::memcpy(keys.data(), values.data(), values.size() * sizeof(T));
  if (keys.size() <= kSelectByPartitionMax) {
    const Key key = select_key(keys, k);
    T value;
    std::memcpy(&value, &key, sizeof(T));
    return value;
  }
  std::vector<int64_t> hist(kCopies * kBins);
  int low_bits = 8 * sizeof(Key) - 1;  // bits below the selected prefix (the sign bit is 0)
  size_t count = keys.size();
  while (true) {
    const int width = std::min(kDigit, low_bits);
    const int shift = low_bits - width;
    const Key mask = (Key{1} << width) - 1;
    std::fill(hist.begin(), hist.end(), 0);
    size_t i = 0;
    for (; i + kCopies <= count; i += kCopies)
      for (int c = 0; c < kCopies; ++c) ++hist[c * kBins + ((keys[i + c] >> shift) & mask)];
    for (; i < count; ++i) ++hist[(keys[i] >> shift) & mask];
    for (int c = 1; c < kCopies; ++c)
      for (int64_t b = 0; b <= static_cast<int64_t>(mask); ++b) hist[b] += hist[c * kBins + b];
    Key digit = 0;
    while (k >= hist[digit]) k -= hist[digit++];
    size_t kept = 0;  // the keys of that digit (their higher bits all match the prefix already)
    for (size_t j = 0; j < count; ++j) {
      const Key key = keys[j];
      keys[kept] = key;
      kept += ((key >> shift) & mask) == digit;
    }
    count = kept;
    low_bits = shift;
    if (low_bits == 0 || count == 1) break;  // every key left is the answer
  }
  T value;
  std::memcpy(&value, &keys[0], sizeof(T));
  return value;
}

// The two middle ranks of numpy.median over the n^2 squared distances, as ranks among the n(n-1)/2 upper
// values: the n diagonal zeros come first (no distance is below 0), then each upper value twice, so rank
// r >= n is the ((r - n) / 2)-th smallest upper value; -1 for a diagonal zero (only n = 2).
inline std::pair<int64_t, int64_t> middle_ranks(int64_t n) {
  const int64_t total = n * n, r0 = (total - 1) / 2, r1 = total / 2;
  return {r0 < n ? -1 : (r0 - n) / 2, (r1 - n) / 2};
}

// The mean of the k0-th and k1-th smallest values (k1 - k0 <= 1; k0 < 0 stands for a diagonal zero below
// all of them): the numpy.median of the n^2 distances from the ranks among the stored ones.
template <typename T>
double middle_of(const std::vector<T>& values, int64_t k0, int64_t k1) {
  if (k0 < 0) return 0.5 * static_cast<double>(select_nonnegative(values, k1));
  const T low = select_nonnegative(values, k0);
  T high = low;
  if (k1 != k0) {  // k1 = k0 + 1: low again if more than k1 values are <= low, else the next value up
    // One branch-free pass (four independent chains) instead of a second selection: about half the values
    // exceed low, so a branch on that is mispredicted half of the time.
    constexpr int kChains = 4;
    const T inf = std::numeric_limits<T>::infinity();
    int64_t at_most[kChains] = {};
    T above[kChains] = {inf, inf, inf, inf};
    const size_t m = values.size();
    size_t i = 0;
    for (; i + kChains <= m; i += kChains)
      for (int c = 0; c < kChains; ++c) {
        const T v = values[i + c];
        at_most[c] += v <= low;
        above[c] = std::min(above[c], v > low ? v : inf);
      }
    for (; i < m; ++i) {
      at_most[0] += values[i] <= low;
      above[0] = std::min(above[0], values[i] > low ? values[i] : inf);
    }
    const int64_t count = at_most[0] + at_most[1] + at_most[2] + at_most[3];
    high = count > k1 ? low : std::min({above[0], above[1], above[2], above[3]});
  }
  return 0.5 * (static_cast<double>(low) + static_cast<double>(high));
}

// numpy.median of the n x n squared distances `dist` (row-major, zeros on the diagonal, symmetric: the Gram
// path's), NaN if any is not finite: selected among the n(n-1)/2 upper values by their ranks (middle_ranks),
// not among all n^2 (an nth_element over a copy of all of them was ~7 of the ~17 us of a step of 32 x 2
// particles by the median rule, one thread, 2-core AMD EPYC Zen 5; the same value: order statistics).
inline double median_of_gram_dists(const std::vector<double>& dist, int64_t n) {
  if (n < 2) return 0.0;
  std::vector<double> upper;
  upper.reserve(static_cast<size_t>(n * (n - 1) / 2));
  for (int64_t i = 0; i < n; ++i) upper.insert(upper.end(), dist.begin() + i * n + i + 1, dist.begin() + (i + 1) * n);
  if (!all_finite(upper.data(), static_cast<int64_t>(upper.size()))) return kNaN;
  const auto [k0, k1] = middle_ranks(n);
  return middle_of(upper, k0, k1);
}

// The window's values as the threads collect them: each adds what its scratch holds (got values, under of
// them below the window) at the next free place, or marks an overflow past `capacity`.
template <typename T>
class WindowSink {
 public:
  explicit WindowSink(int64_t capacity) : capacity_(capacity), window_(static_cast<size_t>(capacity)) {}
  void add(const T* scratch, int64_t got, int64_t under) {
    below_ += under;
    const int64_t at = filled_.fetch_add(got);
    if (at + got > capacity_) {
      overflow_ = true;
    } else if (got > 0) {
      std::memcpy(window_.data() + at, scratch, static_cast<size_t>(got) * sizeof(T));
    }
  }
  // The values and the count below them; std::nullopt after an overflow. *count: how many were in the window.
  std::optional<std::pair<std::vector<T>, int64_t>> finish(int64_t* count) {
    if (count) *count = filled_.load();
    if (overflow_.load()) return std::nullopt;
    window_.resize(static_cast<size_t>(filled_.load()));
    return std::make_pair(std::move(window_), below_.load());
  }

 private:
  int64_t capacity_;
  std::vector<T> window_;
  std::atomic<int64_t> filled_{0}, below_{0};
  std::atomic<bool> overflow_{false};
};

// The distances of the tiles' upper triangle (as the radix passes compute them) that lie in [lo, hi], and
// how many lie below lo, in one pass (each thread's rows through its own scratch first); std::nullopt when
// more than `capacity` lie in [lo, hi]. How many do is written to *count unless it is null.
template <typename T, typename Tiles>
std::optional<std::pair<std::vector<T>, int64_t>> collect_between(const at::Tensor& norms, const Tiles& tiles, T lo,
                                                                  T hi, int64_t capacity, int64_t* count = nullptr) {
  WindowSink<T> sink(capacity);
  const T* nr = norms.data_ptr<T>();
  tiles([&](const at::Tensor& tile, int64_t i0, int64_t j0, int64_t begin, int64_t end) {
    const int64_t cols = tile.size(1);
    thread_local AlignedVector<T> scratch;  // grown once per thread, not zeroed per chunk
    if (scratch.size() < static_cast<size_t>((end - begin) * cols)) scratch.resize((end - begin) * cols);
    int64_t under = 0;
    const int64_t got = window_collect(tile.data_ptr<T>(), cols, begin, end, cols, nr + i0, nr + j0, i0 == j0, lo,
                                       hi, &under, scratch.data());
    sink.add(scratch.data(), got, under);
  });
  return sink.finish(count);
}


// The same median for up to kMedianSelectMaxParticles particles, by selection over all n(n-1)/2 distances
// of the upper triangle, collected from the tiles in one pass: there the radix passes' histograms over
// recomputed tiles (2^16 bins per target and thread, zeroed and summed per pass) cost more than all the
// distances. (On the AMX path the tiles' dot products come from AMX, not from an fp32 GEMM of an fp32
// copy of the rounded particles: 256 x 76,800 was a 10 GFLOP fp32 GEMM.)
template <typename T, typename Tiles>
double median_sq_dist_select(int64_t n, const at::Tensor& norms, const Tiles& tiles) {
  if (n < 2) return 0.0;
  const int64_t m = n * (n - 1) / 2;
  // (every distance is in [0, inf]: clamped at 0 as computed, NaN included)
  auto [upper, below] = *collect_between<T>(norms, tiles, T(0), std::numeric_limits<T>::infinity(), m);
  TORCH_INTERNAL_ASSERT(static_cast<int64_t>(upper.size()) == m && below == 0);
  const auto [k0, k1] = middle_ranks(n);
  return middle_of(upper, k0, k1);
}

// How many pairs the median's window samples among m pairs of d features (distances of sizeof_t bytes). A
// sample's distance reads two rows (time ~ d + 200 features: its draw and the random rows' start-up), and the
// window then holds about 4 m / sqrt(samples) distances, each compared, kept and selected over (~11 ns on a
// 2-core Xeon against ~0.1 ns per feature of a sample): the sum of the two is least near (2 * 11 / 0.1 * m /
// (d + 200))^(2/3) samples. (d + 32 until the fused window pass and selection got cheaper per value: fp32,
// 2 threads, PASSIVE, alternating, d + 32 -> d + 200 (us): 256 x 16 81-83 -> 63-66, 512 x 8 199-209 ->
// 138-144, 1024 x 3 451-452 -> 352-365, 4096 x 3 3980-4040 -> 2870, 16,384 x 3 31,600-33,400 ->
// 27,900-28,100, 512 x 64 280-285 -> 251-257; 4096 x 64, 4096 x 256, 1024 x 128 level.) 2-core Xeon
// (Emerald Rapids), median_bandwidth, samples -> ms: bf16 1024 x 8192 256 -> 18.6, 1024 -> 20.4, 4096 ->
// 26.3, 16384 -> 34.4 (16 sqrt(m), the rule before: 11.6k); 4096 x 768 1024 -> 25.3, 4096 -> 20.9, 16384 ->
// 17.5, 65536 -> 20.4; 8192 x 128 4096 -> 42.1, 16384 -> 26.4, 65536 -> 21.7; fp32 1024 x 8192 256 -> 65.9,
// 16384 -> 81.8. At least enough that the window fits in kMedianWindowMaxBytes (with a margin), and at most
// kMedianWindowMaxSamples (beyond, the radix passes).
inline int64_t median_window_samples(int64_t m, int64_t d, size_t sizeof_t) {
  const double pairs = static_cast<double>(m);
  const double balanced = std::pow(220.0 * pairs / static_cast<double>(d + 200), 2.0 / 3.0);
  const double fits =
      std::pow(8.0 * pairs * static_cast<double>(sizeof_t) / static_cast<double>(kMedianWindowMaxBytes), 2.0);
  const double samples =
      std::clamp(std::max(fits, balanced), 256.0, static_cast<double>(kMedianWindowMaxSamples));
  return std::min<int64_t>(m, static_cast<int64_t>(samples));
}

// The same median by one pass over the tiles for more particles: a sample of pairs brackets the two middle
// ranks with [lo, hi] (their sample quantiles widened by 4 standard deviations of a sample quantile), one
// pass counts the distances below lo and keeps those in [lo, hi], and the selection finishes in that
// window. The values selected are the tiles' own distances (window_collect computes them as the radix
// passes do), so the result is exact whatever the sample; the sample only decides the window's width.
// std::nullopt when the window missed a middle rank or would hold more than kMedianWindowMaxBytes: the
// caller then takes the radix passes. BMT_FAST_MEDIAN_WINDOW=0 skips this (A/B and tests); =require makes
// a miss an error instead (tests: that the window, not the fallback, gave the result).
template <typename T, typename Tiles>
std::optional<double> median_sq_dist_window(const at::Tensor& xc, const at::Tensor& norms, const Tiles& tiles) {
  if (median_window_mode() == MedianWindow::kOff) return std::nullopt;
  const int64_t n = xc.size(0), d = xc.size(1);
  const int64_t m = n * (n - 1) / 2;
  const auto [k0, k1] = middle_ranks(n);
  if (k0 < 0) return std::nullopt;

  // The sample: pairs i < j from a fixed-seed generator (the result does not depend on it).
  const int64_t samples = median_window_samples(m, d, sizeof(T));
  std::vector<int64_t> first(samples), second(samples);
  uint64_t state = 0x9E3779B97F4A7C15ull;
  auto next = [&state] {  // splitmix64
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  };
  // (A draw's top bits scaled to [0, count) by a multiply: a 64-bit division per draw, as `%` took, was an
  // eighth of median_bandwidth at 4096 x 3.)
  auto draw_below = [&next](int64_t count) {
    return static_cast<int64_t>((static_cast<unsigned __int128>(next()) * static_cast<uint64_t>(count)) >> 64);
  };
  for (int64_t t = 0; t < samples; ++t) {
    int64_t i = draw_below(n);
    int64_t j = draw_below(n - 1);
    j += j >= i;  // j != i, uniform over the other rows
    first[t] = std::min(i, j);
    second[t] = std::max(i, j);
  }
  std::vector<T> sample(samples);
  const int64_t block = 4096;
  parallel_for(0, (samples + block - 1) / block, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t t0 = c * block, count = std::min(block, samples - t0);
      if constexpr (std::is_same_v<T, float>) {
        if (xc.scalar_type() == at::kBFloat16) {  // (the AMX path's rounded particles)
          pair_sq_dists(xc.const_data_ptr<at::BFloat16>(), d, norms.const_data_ptr<float>(), first.data() + t0,
                        second.data() + t0, count, sample.data() + t0);
          continue;
        }
      }
      pair_sq_dists(xc.data_ptr<T>(), d, norms.data_ptr<T>(), first.data() + t0, second.data() + t0, count,
                    sample.data() + t0);
    }
  });
  const double spread = 4.0 * 0.5 / std::sqrt(static_cast<double>(samples));  // 4 sd of a quantile near 1/2
  const double lo_at = (static_cast<double>(k0) / m - spread) * samples;
  const double hi_at = (static_cast<double>(k1 + 1) / m + spread) * samples;
  const T lo = lo_at < 0 ? T(0) : select_nonnegative(sample, static_cast<int64_t>(lo_at));
  const T hi = hi_at >= samples - 1 ? std::numeric_limits<T>::infinity()
                                    : select_nonnegative(sample, static_cast<int64_t>(std::ceil(hi_at)));
  const double expected = std::min(1.0, (hi_at - lo_at) / samples) * static_cast<double>(m);
  const int64_t capacity = static_cast<int64_t>(1.5 * expected) + 4096;  // the count varies by ~20 % (4 sd)
  if (capacity * static_cast<int64_t>(sizeof(T)) > kMedianWindowMaxBytes) return std::nullopt;

  // With ties the bracket can hold more than the room made for it (a value repeated at the median): then a
  // second pass with room for all of them, where that stays within kMedianWindowMaxBytes.
  int64_t inside = 0;
  auto collected = collect_between<T>(norms, tiles, lo, hi, capacity, &inside);
  if (!collected && inside * static_cast<int64_t>(sizeof(T)) <= kMedianWindowMaxBytes)
    collected = collect_between<T>(norms, tiles, lo, hi, inside);
  if (!collected) return std::nullopt;
  const auto& [window, under] = *collected;
  const int64_t count = static_cast<int64_t>(window.size());
  if (under > k0 || k1 >= under + count) return std::nullopt;
  return middle_of(window, k0 - under, k1 - under);
}

// The exact median of the n^2 squared distances of the tiled path (the rows of xc with these norms; the
// tiles, from GEMMs on xc unless given, compute the same dot products): by selection over all distances up
// to the tiles' kSelectMaxParticles, by the window beyond, the radix passes where it misses.
template <typename T, typename Tiles>
double median_sq_dist(const at::Tensor& xc, const at::Tensor& norms, const Tiles& tiles) {
  if (!finite_norms(norms)) return kNaN;
  if (xc.size(0) <= Tiles::kSelectMaxParticles) return median_sq_dist_select<T>(xc.size(0), norms, tiles);
  if (const std::optional<double> median = median_sq_dist_window<T>(xc, norms, tiles)) return *median;
  TORCH_CHECK(median_window_mode() != MedianWindow::kRequire,
              "bmt_fast: the median's window missed (BMT_FAST_MEDIAN_WINDOW=require)");
  return median_sq_dist_tiled<T>(xc, norms, tiles);
}

}  // namespace bmt_fast::cpu
