// A CPU emulator for the small subset of CUDA that the bmt_fast kernels use, so that the very kernel
// source of csrc/cuda runs (slowly) on machines without a GPU: CI compiles it with the host compiler
// (-DBMT_FAST_EMULATE) and tests every op against the float64 reference.
//
// Model: the blocks of a grid run one after another; the threads of a block are cooperative fibers
// (ucontext) on one OS thread that switch only at barriers. What it checks beyond the arithmetic:
//   * __syncthreads reached by only part of a block, or warp collectives (shuffles, mma) reached by only
//     part of a warp, or threads waiting at different barriers: an error instead of a hang;
//   * races: the order in which fibers run between two barriers is a setting (forward, reverse,
//     shuffled): a thread that reads shared memory another thread writes in the same phase sees a
//     different value under another order, and the test comparing with the reference fails;
//   * cp.async: copies land either at issue (immediate) or only when waited for (deferred), so reading
//     a buffer before cp.async.wait_group, or overwriting one another warp still reads, shows up;
//   * uninitialised shared memory reads: dynamic shared memory starts as 0xFF bytes (NaN for floats).
// Settings come from the environment at each launch: BMT_FAST_EMULATE_ORDER=forward|reverse|shuffle,
// BMT_FAST_EMULATE_CP_ASYNC=deferred|immediate.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3() = default;
  constexpr dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The built-in variables; the scheduler sets threadIdx before resuming each fiber.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

struct Copy {
  void* dst;
  const void* src;
  int bytes;
};

enum class State { kRunnable, kBlockBarrier, kWarpBarrier, kDone };

struct Fiber {
  ucontext_t context{};
  dim3 tid;
  int warp = 0;
  State state = State::kRunnable;
  std::vector<Copy> open_copies;               // cp.async issued since the last commit
  std::vector<std::vector<Copy>> copy_groups;  // committed, not yet waited for (oldest first)
};

constexpr int kWarpSize = 32;
constexpr size_t kSlotBytes = 64;  // one lane's contribution to a warp collective

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler{};
  int current = -1;
  std::vector<unsigned char, std::allocator<unsigned char>> shared;  // dynamic shared memory
  std::vector<unsigned char> warp_slots;                            // kSlotBytes per thread
  std::string error;
  bool immediate_copies = false;
  std::function<void()> body;
};

inline Block*& current_block() {
  static Block* block = nullptr;
  return block;
}

inline Fiber& self() { return current_block()->fibers[current_block()->current]; }

inline void fail(const std::string& message) {
  Block* b = current_block();
  if (b->error.empty()) b->error = message;
  self().state = State::kDone;
  swapcontext(&self().context, &b->scheduler);  // never resumed
}

inline void wait_at(State barrier) {
  Block* b = current_block();
  self().state = barrier;
  swapcontext(&self().context, &b->scheduler);
}

inline void perform(const std::vector<Copy>& copies) {
  for (const Copy& c : copies) std::memcpy(c.dst, c.src, c.bytes);
}

inline void trampoline() {
  Block* b = current_block();
  b->body();
  Fiber& f = self();
  for (const auto& group : f.copy_groups) perform(group);  // what the hardware would complete anyway
  perform(f.open_copies);
  f.state = State::kDone;
  // returning switches to uc_link, the scheduler
}

inline std::string env_or(const char* name, const char* fallback) {
  const char* value = std::getenv(name);
  return value ? std::string(value) : std::string(fallback);
}

// Runs every fiber of the block until all are done; releases barriers when every thread (block) or
// every lane of a warp (warp collectives) waits at it.
inline void schedule(Block& b, const std::string& order, std::mt19937& rng) {
  const int count = static_cast<int>(b.fibers.size());
  std::vector<int> sequence(count);
  for (int i = 0; i < count; ++i) sequence[i] = order == "reverse" ? count - 1 - i : i;
  for (;;) {
    if (order == "shuffle") std::shuffle(sequence.begin(), sequence.end(), rng);
    bool ran = false;
    for (int index : sequence) {
      Fiber& f = b.fibers[index];
      if (f.state != State::kRunnable) continue;
      b.current = index;
      threadIdx = f.tid;
      swapcontext(&b.scheduler, &f.context);
      ran = true;
      if (!b.error.empty()) return;
    }
    int done = 0, at_block = 0;
    for (const Fiber& f : b.fibers) {
      done += f.state == State::kDone;
      at_block += f.state == State::kBlockBarrier;
    }
    if (done == count) return;
    bool released = false;
    if (at_block > 0 && at_block + done == count) {
      if (done > 0) {
        b.error = "__syncthreads reached while " + std::to_string(done) + " thread(s) of the block had exited";
        return;
      }
      for (Fiber& f : b.fibers) f.state = State::kRunnable;
      released = true;
    }
    for (int w = 0; w * kWarpSize < count; ++w) {
      const int begin = w * kWarpSize, end = std::min(count, begin + kWarpSize);
      int waiting = 0, exited = 0;
      for (int i = begin; i < end; ++i) {
        waiting += b.fibers[i].state == State::kWarpBarrier;
        exited += b.fibers[i].state == State::kDone;
      }
      if (waiting == 0) continue;
      if (waiting == end - begin) {
        for (int i = begin; i < end; ++i) b.fibers[i].state = State::kRunnable;
        released = true;
      } else if (waiting + exited == end - begin) {
        b.error = "a warp collective was reached by only part of warp " + std::to_string(w);
        return;
      }
    }
    if (!ran && !released) {
      b.error = "deadlock: threads wait at different barriers (divergent __syncthreads or warp collective)";
      return;
    }
  }
}

inline void run_block(dim3 block, size_t shared_bytes, const std::function<void()>& body, const std::string& order,
                      bool immediate_copies, std::mt19937& rng) {
  constexpr size_t kStackBytes = 256 * 1024;
  const int count = static_cast<int>(block.x * block.y * block.z);
  Block b;
  b.body = body;
  b.immediate_copies = immediate_copies;
  b.shared.assign(std::max<size_t>(shared_bytes, 16), 0xFF);
  b.warp_slots.assign(static_cast<size_t>(count) * kSlotBytes, 0);
  b.fibers.resize(count);
  std::vector<std::unique_ptr<char[]>> stacks(count);
  Block* previous = current_block();
  current_block() = &b;
  for (int i = 0; i < count; ++i) {
    Fiber& f = b.fibers[i];
    f.tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    f.warp = i / kWarpSize;
    stacks[i].reset(new char[kStackBytes]);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = stacks[i].get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, trampoline, 0);
  }
  schedule(b, order, rng);
  current_block() = previous;
  if (!b.error.empty()) throw std::runtime_error("CUDA emulator: " + b.error);
}

// The dynamic shared memory of every launch, in order (the tests tell the kernels apart by it).
inline std::vector<long long>& launch_record() {
  static std::vector<long long> record;
  return record;
}

// kernel<<<grid, block, shared_bytes>>>(args...) on the CPU.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t shared_bytes, const Args&... args) {
  launch_record().push_back(static_cast<long long>(shared_bytes));
  const std::string order = env_or("BMT_FAST_EMULATE_ORDER", "forward");
  const std::string copies = env_or("BMT_FAST_EMULATE_CP_ASYNC", "deferred");
  if (order != "forward" && order != "reverse" && order != "shuffle")
    throw std::runtime_error("BMT_FAST_EMULATE_ORDER must be forward, reverse or shuffle, got " + order);
  if (copies != "deferred" && copies != "immediate")
    throw std::runtime_error("BMT_FAST_EMULATE_CP_ASYNC must be deferred or immediate, got " + copies);
  if (block.x * block.y * block.z > 1024) throw std::runtime_error("CUDA emulator: more than 1024 threads per block");
  std::mt19937 rng(12345);
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        run_block(block, shared_bytes, [&] { kernel(args...); }, order, copies == "immediate", rng);
      }
}

inline unsigned char* dynamic_shared() { return current_block()->shared.data(); }

// ---- barriers and warp collectives --------------------------------------------------------------

inline int lane() { return static_cast<int>(current_block()->current % kWarpSize); }

inline void warp_barrier() { wait_at(State::kWarpBarrier); }

inline unsigned char* slot(int thread) { return current_block()->warp_slots.data() + thread * kSlotBytes; }

// Every lane publishes `mine`; returns what lane `source(lane)` published.
template <typename T, typename Source>
T exchange(T mine, Source source) {
  static_assert(sizeof(T) <= kSlotBytes, "value too large for a warp slot");
  const int me = current_block()->current;
  const int base = me - me % kWarpSize;
  std::memcpy(slot(me), &mine, sizeof(T));
  warp_barrier();
  T theirs;
  std::memcpy(&theirs, slot(base + source(me - base)), sizeof(T));
  warp_barrier();
  return theirs;
}

inline void check_full_mask(unsigned mask) {
  if (mask != 0xffffffffu) fail("warp collectives must use the full mask in these kernels");
}

// ---- cp.async ------------------------------------------------------------------------------------

inline void cp_async(void* dst, const void* src, int bytes) {
  if (reinterpret_cast<std::uintptr_t>(dst) % bytes != 0 || reinterpret_cast<std::uintptr_t>(src) % bytes != 0)
    fail("cp.async of " + std::to_string(bytes) + " bytes needs addresses aligned to them");
  if (current_block()->immediate_copies) {
    std::memcpy(dst, src, bytes);
  } else {
    self().open_copies.push_back({dst, src, bytes});
  }
}

inline void cp_async_commit() {
  Fiber& f = self();
  f.copy_groups.push_back(std::move(f.open_copies));
  f.open_copies.clear();
}

inline void cp_async_wait(int pending_allowed) {
  Fiber& f = self();
  while (static_cast<int>(f.copy_groups.size()) > pending_allowed) {
    perform(f.copy_groups.front());
    f.copy_groups.erase(f.copy_groups.begin());
  }
}

// ---- mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 ----------------------------
// The fragment layout of the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type"),
// groupID g = lane / 4, threadID_in_group t = lane % 4, two 16-bit values per register, the lower
// column (A) or row (B) in the lower half:
//   A (16x16): reg0 = A[g][2t..2t+1], reg1 = A[g+8][2t..], reg2 = A[g][2t+8..], reg3 = A[g+8][2t+8..]
//   B (16x8):  reg0 = B[2t..2t+1][g], reg1 = B[2t+8..2t+9][g]
//   C/D (16x8 fp32): c0, c1 = C[g][2t], C[g][2t+1]; c2, c3 = C[g+8][2t], C[g+8][2t+1]
struct MmaFragments {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};

template <typename Decode>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], Decode decode) {
  const int me = current_block()->current;
  const int base = me - me % kWarpSize;
  MmaFragments mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  std::memcpy(mine.c, d, sizeof(mine.c));
  std::memcpy(slot(me), &mine, sizeof(mine));
  warp_barrier();
  float A[16][16], B[16][8];
  for (int l = 0; l < kWarpSize; ++l) {
    MmaFragments f;
    std::memcpy(&f, slot(base + l), sizeof(f));
    const int g = l / 4, t = l % 4;
    const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
    for (int r = 0; r < 4; ++r) {
      A[rows[r]][cols[r]] = decode(static_cast<uint16_t>(f.a[r] & 0xFFFF));
      A[rows[r]][cols[r] + 1] = decode(static_cast<uint16_t>(f.a[r] >> 16));
    }
    for (int r = 0; r < 2; ++r) {
      B[2 * t + 8 * r][g] = decode(static_cast<uint16_t>(f.b[r] & 0xFFFF));
      B[2 * t + 8 * r + 1][g] = decode(static_cast<uint16_t>(f.b[r] >> 16));
    }
  }
  const int g = (me - base) / 4, t = (me - base) % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * t + (e % 2);
    double dot = 0.0;  // products of 16-bit values are exact; the sum is rounded once into fp32
    for (int k = 0; k < 16; ++k) dot += static_cast<double>(A[row][k]) * B[k][col];
    d[e] = static_cast<float>(static_cast<double>(mine.c[e]) + dot);
  }
  warp_barrier();
}

// ---- ldmatrix.sync.aligned.m8n8.x4.shared.b16 ----------------------------------------------------
// Lanes 8i..8i+7 address the rows of matrix i (16 bytes each, 16-byte aligned, in shared memory); lane l
// receives row l / 4, 16-bit values 2 (l % 4) and 2 (l % 4) + 1 of every matrix.
// kTrans: each matrix transposed (ldmatrix...trans): lane l receives column l / 4 of rows 2 (l % 4) and
// 2 (l % 4) + 1.
template <bool kTrans = false>
inline void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* row) {
  Block* b = current_block();
  const auto* bytes = reinterpret_cast<const unsigned char*>(row);
  const unsigned char* begin = b->shared.data();
  if (bytes < begin || bytes + 16 > begin + b->shared.size())
    fail("ldmatrix: a row address outside the block's dynamic shared memory");
  if ((bytes - begin) % 16 != 0) fail("ldmatrix: a row address that is not 16-byte aligned");
  const int me = b->current;
  const int base = me - me % kWarpSize, l = me - base;
  std::memcpy(slot(me), &row, sizeof(row));
  warp_barrier();
  for (int i = 0; i < 4; ++i) {
    if constexpr (kTrans) {
      uint16_t half[2];
      for (int h = 0; h < 2; ++h) {
        const uint16_t* source;
        std::memcpy(&source, slot(base + 8 * i + 2 * (l % 4) + h), sizeof(source));
        half[h] = source[l / 4];
      }
      r[i] = static_cast<uint32_t>(half[0]) | (static_cast<uint32_t>(half[1]) << 16);
    } else {
      const uint16_t* source;
      std::memcpy(&source, slot(base + 8 * i + l / 4), sizeof(source));
      uint32_t value;
      std::memcpy(&value, source + 2 * (l % 4), sizeof(value));
      r[i] = value;
    }
  }
  warp_barrier();
}

}  // namespace emu

// ---- the CUDA built-ins the kernels call ---------------------------------------------------------

// Blocks run one at a time, so a function-local static is exactly one per block while it runs.
#define __shared__ static

inline void __syncthreads() { emu::wait_at(emu::State::kBlockBarrier); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  emu::check_full_mask(mask);
  emu::warp_barrier();
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  emu::check_full_mask(mask);
  return emu::exchange(value, [lane_mask](int lane) { return lane ^ lane_mask; });
}

template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta) {
  emu::check_full_mask(mask);
  return emu::exchange(value, [delta](int lane) { return lane >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane; });
}

template <typename T>
T __shfl_sync(unsigned mask, T value, int source_lane) {
  emu::check_full_mask(mask);
  return emu::exchange(value, [source_lane](int) { return source_lane; });
}

// Fibers never run at the same time, so plain read-modify-write is atomic here.
template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
