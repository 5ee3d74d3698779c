// Shared helpers for the InferFlux CPU FFI kernels: thread-pool parallel loops and ISA detection.
//
// Every handler of the library runs inside an XLA:CPU program and gets XLA's intra-op thread pool through
// `ffi::Ctx<ffi::ThreadPool>`. `ParallelFor` spreads chunks of work over it without ever blocking on a latch
// that a busy (or one-thread) pool might not release: see docs/runtime.md, "CPU kernels".
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace inferflux {

// The instruction sets the kernels have paths for, best last. `kAuto` asks for the best this CPU supports.
enum Isa : int64_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvxVnni = 3, kAvx512Vnni = 4 };

// The best ISA this CPU supports (checked once with __builtin_cpu_supports).
Isa BestIsa();
// `requested` if this CPU supports it (kAuto: the best), else kScalar - 1 (= 0, "unsupported").
Isa ResolveIsa(int64_t requested);

// Runs fn(chunk) for chunk in [0, num_chunks) on XLA's intra-op pool plus the calling thread.
//
// num_threads - 1 tasks are scheduled; the caller works too; everyone claims chunks from one atomic
// counter. The caller returns once every chunk is done; it waits only for chunks that a running thread has
// already claimed, so a pool that never runs our tasks (busy, or one thread) cannot deadlock it: the caller
// then simply does all the work. Tasks that start late find nothing to claim and return without touching
// `fn` (which lives on the caller's stack); the counters they read are kept alive by a shared_ptr.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t num_chunks, Fn&& fn) {
  if (num_chunks <= 0) return;
  int64_t workers = pool.num_threads();
  if (workers > num_chunks) workers = num_chunks;
  if (workers <= 1) {
    for (int64_t i = 0; i < num_chunks; ++i) fn(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t total = 0;
    void* fn = nullptr;
    void (*call)(void*, int64_t) = nullptr;
  };
  auto state = std::make_shared<State>();
  state->total = num_chunks;
  state->fn = static_cast<void*>(&fn);
  state->call = [](void* f, int64_t i) { (*static_cast<std::remove_reference_t<Fn>*>(f))(i); };
  auto work = [](State& s) {
    for (;;) {
      int64_t i = s.next.fetch_add(1, std::memory_order_relaxed);
      if (i >= s.total) return;
      s.call(s.fn, i);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 0; t < workers - 1; ++t) {
    pool.Schedule([state, work]() { work(*state); });
  }
  work(*state);
  // Every chunk is claimed now; the ones still running belong to threads that are running them.
  while (state->done.load(std::memory_order_acquire) < num_chunks) std::this_thread::yield();
}

}  // namespace inferflux
