// One OpenMP region for all the parallel loops of a call.
//
// Each at::parallel_for is an OpenMP region of its own. Where the threads sleep between regions
// (OMP_WAIT_POLICY=PASSIVE, or after a pause longer than libgomp's spin) every region wakes them again: on a
// 2-core Xeon VM (CPUID model 167) ~40 us for an empty region after a pause, ~75 us in a call, where the
// caller's serial work between two loops let the other vCPU halt. A call of a few hundred microseconds with
// five loops spent most of its time there (fp32 step by the median rule, 256 x 48: 480 us on two threads,
// 262 us on one).
//
// run_team(body) runs body on the calling thread inside one region; the region's other threads wait for
// the loops it hands them through parallel_for below, spinning (a pause per poll, yielding the CPU after a
// while) rather than sleeping, until body returns. The threads are woken once per call; between calls they
// keep the process's wait policy. parallel_for splits a range as at::parallel_for does (the same shares
// for the same thread count, and at::get_thread_num() is the share's index), so code gives the same
// results in a team or not. Outside a team it is at::parallel_for. Inside body, ATen ops and BLAS calls run
// on the calling thread alone (they see a parallel region): a team is for code whose parallel work goes
// through parallel_for.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/ParallelGuard.h>
#include <omp.h>

#include <atomic>
#include <cstdint>
#include <exception>
#include <thread>

namespace bmt_fast::cpu {
namespace team_detail {

// The region's shared state: the loop on offer (a type-erased body and its range's split), its epoch (a
// new loop, or the end of the team, bumps it) and how many of the other threads have yet to finish it.
struct State {
  int size = 1;
  std::atomic<uint64_t> epoch{0};
  std::atomic<int> pending{0};
  std::atomic<bool> stop{false};
  void (*invoke)(const void* body, int64_t begin, int64_t end) = nullptr;
  const void* body = nullptr;
  int64_t begin = 0, end = 0, chunk = 0;
  std::atomic_flag failed = ATOMIC_FLAG_INIT;
  std::exception_ptr error;
};

// The team of the calling thread (null outside one), and whether it is inside a share of a loop (a nested
// parallel_for then runs inline, keeping the share's thread index).
inline thread_local State* current = nullptr;
inline thread_local bool in_share = false;

inline void pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Polls ready() until it holds: a pause per poll, then yielding the CPU (another thread of the process or
// the machine may need the core, e.g. with more threads than cores).
template <typename Ready>
void spin_until(const Ready& ready) {
  for (int polls = 0; !ready(); ++polls) {
    if (polls < 8192) {
      pause();
    } else {
      std::this_thread::yield();
    }
  }
}

// Thread `tid`'s share of the loop on offer (at::parallel_for's split), errors kept for the caller.
inline void run_share(State& state, int tid) {
  const int64_t begin = state.begin + tid * state.chunk;
  if (begin >= state.end) return;
  in_share = true;
  try {
    at::internal::ThreadIdGuard tid_guard(tid);
    c10::ParallelGuard guard(true);
    state.invoke(state.body, begin, std::min(state.end, begin + state.chunk));
  } catch (...) {
    if (!state.failed.test_and_set()) state.error = std::current_exception();
  }
  in_share = false;
}

// The other threads' part of a team: each loop's share until the team ends.
inline void serve(State& state, int tid) {
  uint64_t seen = 0;
  while (true) {
    uint64_t epoch = seen;
    spin_until([&] { return (epoch = state.epoch.load(std::memory_order_acquire)) != seen; });
    seen = epoch;
    if (state.stop.load(std::memory_order_relaxed)) return;
    run_share(state, tid);
    state.pending.fetch_sub(1, std::memory_order_release);
  }
}

}  // namespace team_detail

// at::parallel_for, or in a team (run_team) a loop handed to its threads: the same split, at most one share
// per thread, the caller taking share 0. Errors are rethrown on the caller (the first one).
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  using team_detail::State;
  State* state = team_detail::current;
  if (state == nullptr) {
    at::parallel_for(begin, end, grain, f);
    return;
  }
  if (begin >= end) return;
  const int64_t count = end - begin;
  if (team_detail::in_share || state->size == 1 || count <= grain || count <= 1) {
    f(begin, end);  // (inline, as at::parallel_for in a parallel region, keeping the share's thread index)
    return;
  }
  int64_t tasks = state->size;
  if (grain > 0) tasks = std::min(tasks, (count + grain - 1) / grain);
  state->invoke = [](const void* body, int64_t b, int64_t e) { (*static_cast<const F*>(body))(b, e); };
  state->body = &f;
  state->begin = begin;
  state->end = end;
  state->chunk = (count + tasks - 1) / tasks;
  state->pending.store(state->size - 1, std::memory_order_relaxed);
  state->epoch.fetch_add(1, std::memory_order_release);
  team_detail::run_share(*state, 0);
  team_detail::spin_until([&] { return state->pending.load(std::memory_order_acquire) == 0; });
  if (state->error) {
    std::exception_ptr error = state->error;
    state->error = nullptr;
    state->failed.clear();
    std::rethrow_exception(error);
  }
}

// Runs body() on the calling thread with the other OpenMP threads as its team (see above); directly where
// there is one thread, or already a parallel region or a team. Rethrows body's exception after the region.
template <typename Body>
void run_team(const Body& body) {
  if (team_detail::current != nullptr || at::in_parallel_region() || at::get_num_threads() <= 1) {
    body();
    return;
  }
  team_detail::State state;
  std::exception_ptr error;
#pragma omp parallel
  {
    const int tid = omp_get_thread_num();
    team_detail::current = &state;
    if (tid == 0) {
      state.size = omp_get_num_threads();
      try {
        body();
      } catch (...) {
        error = std::current_exception();
      }
      state.stop.store(true, std::memory_order_relaxed);
      state.epoch.fetch_add(1, std::memory_order_release);
    } else {
      team_detail::serve(state, tid);
    }
    team_detail::current = nullptr;
  }
  if (error) std::rethrow_exception(error);
}

// run_team(body) where `team` holds, else body() with its loops as separate regions.
template <typename Body>
void run_team_if(bool team, const Body& body) {
  if (team) {
    run_team(body);
  } else {
    body();
  }
}

}  // namespace bmt_fast::cpu
