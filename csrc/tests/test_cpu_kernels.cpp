// C++ test of the CPU kernels against a naive double-precision implementation, run by ctest.
// It calls the ops through the dispatcher (checking the TORCH_LIBRARY registration) and directly.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <stdexcept>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

#include "../bmt_fast.h"
#include "../cpu/huge_pages.h"
#include "../cpu/kernels.h"
#include "../cpu/team.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

double max_relative_error(const at::Tensor& actual, const at::Tensor& expected) {
  const at::Tensor a = actual.to(at::kDouble), e = expected.to(at::kDouble);
  return ((a - e).abs().max() / e.abs().max().clamp_min(1e-300)).item<double>();
}

// Naive O(n^2 d) loops in double: the textbook formulas, nothing shared with the kernels.
double sq_dist(const at::Tensor& x, int64_t i, int64_t j) {
  const double* p = x.data_ptr<double>();
  const int64_t d = x.size(1);
  double s = 0;
  for (int64_t k = 0; k < d; ++k) s += (p[i * d + k] - p[j * d + k]) * (p[i * d + k] - p[j * d + k]);
  return s;
}

double naive_median_bandwidth(const at::Tensor& x) {
  const int64_t n = x.size(0);
  std::vector<double> all;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) all.push_back(i == j ? 0.0 : sq_dist(x, i, j));
  std::sort(all.begin(), all.end());
  const size_t m = all.size();
  const double median = m % 2 ? all[m / 2] : 0.5 * (all[m / 2 - 1] + all[m / 2]);
  return std::max(median / std::log(n + 1.0), bmt_fast::kBandwidthFloor);
}

at::Tensor naive_svgd_step(const at::Tensor& x, const at::Tensor& g, double h) {
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor phi = at::zeros_like(x);
  const double *xp = x.data_ptr<double>(), *gp = g.data_ptr<double>();
  double* out = phi.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const double k = std::exp(-sq_dist(x, i, j) / h);
      for (int64_t c = 0; c < d; ++c)
        out[i * d + c] += (k * gp[j * d + c] + 2.0 / h * k * (xp[i * d + c] - xp[j * d + c])) / n;
    }
  return phi;
}

void test_svgd_step() {
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("bmt_fast::svgd_step", "").typed<
      at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view)>();
  for (auto [n, d] : std::vector<std::pair<int64_t, int64_t>>{{1, 3}, {5, 7}, {70, 33}, {600, 5}, {16, 5000}}) {
    const at::Tensor x = at::randn({n, d}, at::kDouble) + 3.0, g = at::randn({n, d}, at::kDouble);
    const double h = naive_median_bandwidth(x);
    const at::Tensor expected = naive_svgd_step(x, g, h);
    for (const char* algorithm : {"tiled", "gram"}) {
      const std::string label = " n=" + std::to_string(n) + " d=" + std::to_string(d) + " " + algorithm;
      const at::Tensor fp64 = op.call(x, g, std::nullopt, algorithm);
      expect(max_relative_error(fp64, expected) < 1e-11, "svgd_step fp64 median" + label);
      const at::Tensor fp32 = bmt_fast::cpu::svgd_step(x.to(at::kFloat), g.to(at::kFloat),
                                                       at::scalar_tensor(h, at::kDouble), algorithm);
      expect(fp32.scalar_type() == at::kFloat && max_relative_error(fp32, expected) < 2e-5, "svgd_step fp32" + label);
      // svgd_step_into: the same phi, written into out, and a flag that catches a NaN in the last score
      at::Tensor out = at::empty_like(x);
      const at::Tensor finite = bmt_fast::cpu::svgd_step_into(x, g, std::nullopt, algorithm, out);
      expect(at::equal(out, fp64) && finite.item<bool>(), "svgd_step_into finite" + label);
      at::Tensor bad = g.clone();
      bad.view({-1})[n * d - 1] = std::nan("");
      expect(!bmt_fast::cpu::svgd_step_into(x, bad, std::nullopt, algorithm, out).item<bool>(),
             "svgd_step_into NaN" + label);
    }
  }
}

void test_median_and_kernel() {
  for (int64_t n : {1, 2, 9, 64, 513}) {
    const at::Tensor x = at::randn({n, 6}, at::kDouble);
    const double expected = naive_median_bandwidth(x);
    for (const char* algorithm : {"tiled", "gram"}) {
      const double h = bmt_fast::cpu::median_bandwidth(x, algorithm).item<double>();
      expect(std::abs(h - expected) <= 1e-12 * expected,
             "median_bandwidth n=" + std::to_string(n) + " " + algorithm);
    }
  }
  const at::Tensor x = at::randn({13, 4}, at::kDouble), y = at::randn({7, 4}, at::kDouble);
  const at::Tensor k = bmt_fast::cpu::rbf_kernel(x, y, at::scalar_tensor(2.5, at::kDouble));
  double worst = 0;
  for (int64_t i = 0; i < 13; ++i)
    for (int64_t j = 0; j < 7; ++j) {
      const at::Tensor both = at::cat({x.narrow(0, i, 1), y.narrow(0, j, 1)});
      worst = std::max(worst, std::abs(k[i][j].item<double>() - std::exp(-sq_dist(both, 0, 1) / 2.5)));
    }
  expect(worst < 1e-14, "rbf_kernel fp64");
}

void test_bad_input() {
  bool threw = false;
  try {
    bmt_fast::cpu::svgd_step(at::randn({4, 3}), at::randn({4, 2}), std::nullopt, "auto");
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("score must have the shape of x") != std::string::npos;
  }
  expect(threw, "shape mismatch raises a readable error");
}

// fork() while another thread allocates and frees large results through the huge-page cache: each child
// must be able to allocate from it (before the cache's mutex was held across fork, a child forked while
// the other thread was inside the cache deadlocked on its first large allocation).
void test_fork_while_allocating() {
#ifdef __linux__
  const int64_t values = int64_t{1} << 21;  // 8 MiB of fp32: over the huge-page threshold
  std::atomic<bool> stop{false};
  std::thread churn([&] {
    while (!stop.load()) at::Tensor t = bmt_fast::cpu::empty_large({values}, at::TensorOptions(at::kFloat));
  });
  int hung = 0, failed = 0;
  const int forks = 200;
  for (int i = 0; i < forks; ++i) {
    const pid_t pid = fork();
    if (pid == 0) {
      const at::Tensor t = bmt_fast::cpu::empty_large({values}, at::TensorOptions(at::kFloat));
      _exit(reinterpret_cast<std::uintptr_t>(t.data_ptr()) % (std::uintptr_t{2} << 20) == 0 ? 0 : 1);
    }
    int status = 0;
    bool done = false;
    for (int ms = 0; ms < 5000 && !done; ++ms) {
      done = waitpid(pid, &status, WNOHANG) == pid;
      if (!done) usleep(1000);
    }
    if (!done) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      ++hung;
    } else if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      ++failed;
    }
  }
  stop = true;
  churn.join();
  expect(hung == 0 && failed == 0, "fork while another thread allocates: " + std::to_string(hung) + " of " +
                                       std::to_string(forks) + " children hung, " + std::to_string(failed) +
                                       " failed");
#endif
}

// transpose_words (AMX's operands, rbf_kernel's lower triangle) against the definition, 32- and 64-bit
// words: whole 16 x 16 (8 x 8) register blocks (AVX-512 build) and the scalar edges, a word range that
// starts mid-block, padded row strides; nothing outside the range written.
template <typename W>
void test_transpose_words() {
  const int64_t shapes[][4] = {{1, 1, 0, 1},      {15, 17, 0, 17}, {16, 16, 0, 16},  {64, 32, 0, 32},
                               {70, 37, 3, 37},   {130, 48, 16, 40}, {33, 300, 5, 299}, {8, 8, 0, 8},
                               {72, 24, 8, 23}};
  const W fill = static_cast<W>(0xDEADBEEFCAFEF00Dull);
  for (const auto& shape : shapes) {
    const int64_t rows = shape[0], words = shape[1], k_begin = shape[2], k_end = shape[3];
    const int64_t ld_src = words + 3, ld_dst = rows + 5;
    std::vector<W> src(rows * ld_src), dst(words * ld_dst, fill);
    for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<W>((i + 1) * 0x9E3779B97F4A7C15ull);
    bmt_fast::cpu::transpose_words(src.data(), ld_src, rows, k_begin, k_end, dst.data(), ld_dst);
    bool ok = true;
    for (int64_t k = 0; k < words; ++k)
      for (int64_t i = 0; i < ld_dst; ++i) {
        const bool inside = k >= k_begin && k < k_end && i < rows;
        ok = ok && dst[k * ld_dst + i] == (inside ? src[i * ld_src + k] : fill);
      }
    expect(ok, "transpose_words (" + std::to_string(8 * sizeof(W)) + "-bit) " + std::to_string(rows) +
                   " rows x words [" + std::to_string(k_begin) + ", " + std::to_string(k_end) + ") (" +
                   bmt_fast::cpu::active_isa() + ")");
  }
}

// stream_rows (rbf_kernel's K from the thread's buffers) against memcpy: destinations at every offset from
// a 64-byte line (heads and tails stored, whole lines streamed), short and long rows; nothing outside the
// rows' bytes written.
void test_stream_rows() {
  const int64_t shapes[][3] = {{1, 1, 0}, {3, 63, 1}, {5, 64, 0}, {4, 65, 17}, {7, 256, 62}, {2, 1000, 33}};
  for (const auto& shape : shapes) {
    const int64_t rows = shape[0], bytes = shape[1], offset = shape[2];
    const int64_t ld_src = bytes + 7, ld_dst = bytes + 70;
    std::vector<unsigned char> src(rows * ld_src);
    alignas(64) static unsigned char dst[8 * 1200 + 128];
    std::memset(dst, 0xAB, sizeof(dst));
    for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<unsigned char>(i * 131 + 7);
    bmt_fast::cpu::stream_rows(src.data(), ld_src, rows, bytes, dst + offset, ld_dst);
    bool ok = true;
    for (int64_t at = 0; at < static_cast<int64_t>(sizeof(dst)); ++at) {
      const int64_t rel = at - offset, r = rel / ld_dst, c = rel % ld_dst;
      const bool inside = rel >= 0 && r < rows && c < bytes;
      ok = ok && dst[at] == (inside ? src[r * ld_src + c] : 0xAB);
    }
    expect(ok, "stream_rows " + std::to_string(rows) + " x " + std::to_string(bytes) + " bytes at offset " +
                   std::to_string(offset) + " (" + bmt_fast::cpu::active_isa() + ")");
  }
}

// stream_rows_as (the fused self kernel's 16-bit K) against c10's conversions (round to nearest even):
// destinations at several offsets from a 64-byte line (bf16's whole lines streamed, heads and tails stored),
// values around rounding ties, and nothing outside the rows written.
template <typename Out>
void test_stream_rows_as() {
  const int64_t shapes[][3] = {{1, 1, 0}, {3, 31, 1}, {5, 32, 0}, {4, 65, 17}, {7, 256, 30}, {2, 1000, 9}};
  for (const auto& shape : shapes) {
    const int64_t rows = shape[0], cols = shape[1], offset = shape[2];
    const int64_t ld_src = cols + 3, ld_dst = cols + 40;
    std::vector<float> src(rows * ld_src);
    for (size_t i = 0; i < src.size(); ++i) {  // (odd multiples of 2^-9 .. : halfway cases of both formats too)
      const float base = std::ldexp(static_cast<float>(static_cast<int64_t>(i * 2654435761u % 4096) - 2048), -9);
      src[i] = i % 3 == 0 ? base : std::nextafter(base + 1.0f / 3.0f, i % 2 ? 10.0f : -10.0f);
    }
    alignas(64) static Out dst[8 * 1100 + 64];
    const Out fill = Out(7.0f);
    std::fill(std::begin(dst), std::end(dst), fill);
    bmt_fast::cpu::stream_rows_as(src.data(), ld_src, rows, cols, dst + offset, ld_dst);
    bool ok = true;
    for (int64_t at = 0; at < static_cast<int64_t>(std::size(dst)); ++at) {
      const int64_t rel = at - offset, r = rel / ld_dst, c = rel % ld_dst;
      const bool inside = rel >= 0 && r < rows && c < cols;
      const Out want = inside ? Out(src[r * ld_src + c]) : fill;
      ok = ok && std::memcmp(&dst[at], &want, sizeof(Out)) == 0;
    }
    expect(ok, std::string("stream_rows_as ") + (std::is_same_v<Out, c10::Half> ? "fp16 " : "bf16 ") +
                   std::to_string(rows) + " x " + std::to_string(cols) + " at offset " + std::to_string(offset) +
                   " (" + bmt_fast::cpu::active_isa() + ")");
  }
}

// team.h: a team's loops split ranges as at::parallel_for does (each index once, the same thread index for
// it), nested loops run inline on the share's thread, errors of a share or of the body reach the caller and
// leave the team (or the next one) usable, and a team inside a team runs its body directly.
void test_team() {
  using bmt_fast::cpu::parallel_for;
  using bmt_fast::cpu::run_team;
  const int threads_before = at::get_num_threads();
  at::set_num_threads(std::max(2, threads_before));
  constexpr int64_t kCount = 1000;
  std::vector<int> expected_owner(kCount, -1);
  at::parallel_for(0, kCount, 7, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) expected_owner[i] = at::get_thread_num();
  });
  std::vector<std::atomic<int>> seen(kCount);
  std::vector<int> owner(kCount, -1);
  std::atomic<bool> nested_ok{true};
  std::atomic<int> distinct{0};
  run_team([&] {
    for (int rep = 0; rep < 50; ++rep) {
      parallel_for(0, kCount, 7, [&](int64_t b, int64_t e) {
        if (rep == 0 && b == 0) distinct += 1;
        if (rep == 0 && b > 0) distinct += 2;
        for (int64_t i = b; i < e; ++i) {
          seen[i] += 1;
          owner[i] = at::get_thread_num();
        }
        parallel_for(b, e, 1, [&](int64_t b2, int64_t e2) {  // inline, on this share's thread
          if (b2 != b || e2 != e || at::get_thread_num() != owner[b]) nested_ok = false;
        });
      });
    }
  });
  bool each_once = true;
  for (int64_t i = 0; i < kCount; ++i) each_once &= seen[i].load() == 50 && owner[i] == expected_owner[i];
  const int team_size = std::max(2, threads_before);
  expect(each_once && nested_ok.load() && distinct.load() == 1 + 2 * (team_size - 1),
         "team: 50 loops in one region, each index once per loop, at::parallel_for's split and thread indices");

  bool share_error = false;
  std::atomic<int64_t> after{0};
  run_team([&] {
    try {
      parallel_for(0, 100, 1, [&](int64_t b, int64_t) {
        if (b > 0) throw std::runtime_error("a share failed");
      });
    } catch (const std::runtime_error& e) {
      share_error = std::string(e.what()) == "a share failed";
    }
    parallel_for(0, 100, 1, [&](int64_t b, int64_t e) { after += e - b; });
  });
  expect(share_error && after.load() == 100, "team: a share's error reaches the caller, the team goes on");

  bool body_error = false;
  try {
    run_team([&] {
      parallel_for(0, 100, 1, [&](int64_t, int64_t) {});
      throw std::runtime_error("the body failed");
    });
  } catch (const std::runtime_error& e) {
    body_error = std::string(e.what()) == "the body failed";
  }
  std::atomic<int64_t> next{0};
  run_team([&] { parallel_for(0, 64, 1, [&](int64_t b, int64_t e) { next += e - b; }); });
  expect(body_error && next.load() == 64, "team: the body's error reaches the caller after the region");

  std::atomic<int> inner_threads{0};
  run_team([&] {
    run_team([&] {  // (already a team: directly)
      parallel_for(0, 100, 1, [&](int64_t, int64_t) { inner_threads += 1; });
    });
  });
  expect(inner_threads.load() == team_size, "team: a team inside a team runs directly");
  at::set_num_threads(threads_before);
}

}  // namespace

int main() {
  at::manual_seed(0);
  test_svgd_step();
  test_median_and_kernel();
  test_bad_input();
  test_fork_while_allocating();
  test_transpose_words<uint32_t>();
  test_transpose_words<uint64_t>();
  test_stream_rows_as<c10::BFloat16>();
  test_stream_rows_as<c10::Half>();
  test_stream_rows();
  test_team();
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
