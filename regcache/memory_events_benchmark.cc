// What the memory-event sources cost (Google Benchmark), side by side with the bare system call:
//   BM_MunmapBare:             munmap through the raw system call (no hook), the baseline;
//   BM_MunmapHooked/0:         munmap through the hook, overlapping no cached region;
//   BM_MunmapHooked/4096:      munmap through the hook of a range holding 4,096 cached regions;
//   BM_MunmapThenAcquire/4096: the same munmap plus the next lookup, which drains the event and
//                              invalidates the 4,096 regions;
//   BM_UffdUnmapToPublished:   userfaultfd: from munmap's start until the event is queued, i.e.
//                              until no lookup can return the region (for the hooks that delay is
//                              nil: they queue the range before the call).
// Run: bazel run -c opt //regcache:memory_events_benchmark

#include <benchmark/benchmark.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <memory>

#include "regcache/cache.h"
#include "regcache/null_registrar.h"
#include "regcache/memory_events.h"

namespace sanreg {
namespace {

const size_t kPage = static_cast<size_t>(sysconf(_SC_PAGESIZE));

std::unique_ptr<RegistrationCache> MakeCache(Registrar* reg, MemoryMonitorMode mode) {
  RegistrationCache::Options o;
  o.memory_monitor = mode;
  auto c = RegistrationCache::Create(reg, o);
  if (!c.ok()) std::abort();
  return std::move(*c);
}

char* Map(size_t len) {
  void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) std::abort();
  return static_cast<char*>(p);
}

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

void BM_MunmapBare(benchmark::State& state) {
  NullRegistrar reg;
  auto cache = MakeCache(&reg, MemoryMonitorMode::kHooks);  // subscribed, as in the others
  for (auto _ : state) {
    char* p = Map(kPage);
    auto t0 = Clock::now();
    syscall(SYS_munmap, p, kPage);
    state.SetIterationTime(Seconds(t0, Clock::now()));
  }
}
BENCHMARK(BM_MunmapBare)->UseManualTime();

// Regions are cached in a 4,096-page arena; the munmap is of one page of it (0) or all of it.
void BM_MunmapHooked(benchmark::State& state) {
  const int regions = static_cast<int>(state.range(0));
  NullRegistrar reg;
  auto cache = MakeCache(&reg, MemoryMonitorMode::kHooks);
  for (auto _ : state) {
    const size_t len = regions == 0 ? kPage : regions * kPage;
    char* p = Map(len);
    for (int i = 0; i < regions; ++i) {
      if (!cache->Acquire(p + i * kPage, kPage, kAccessLocalRead).ok()) std::abort();
    }
    auto t0 = Clock::now();
    munmap(p, len);
    state.SetIterationTime(Seconds(t0, Clock::now()));
    cache->Flush();
  }
  state.counters["regions"] = regions;
}
BENCHMARK(BM_MunmapHooked)->Arg(0)->Arg(4096)->UseManualTime();

void BM_MunmapThenAcquire(benchmark::State& state) {
  const int regions = static_cast<int>(state.range(0));
  NullRegistrar reg;
  auto cache = MakeCache(&reg, MemoryMonitorMode::kHooks);
  char* other = Map(kPage);
  if (!cache->Acquire(other, kPage, kAccessLocalRead).ok()) std::abort();
  for (auto _ : state) {
    char* p = Map(regions * kPage);
    for (int i = 0; i < regions; ++i) {
      if (!cache->Acquire(p + i * kPage, kPage, kAccessLocalRead).ok()) std::abort();
    }
    auto t0 = Clock::now();
    munmap(p, regions * kPage);
    auto r = cache->Acquire(other, kPage, kAccessLocalRead);  // drains: 4,096 invalidations
    state.SetIterationTime(Seconds(t0, Clock::now()));
    if (!r.ok()) std::abort();
    r->Reset();
    cache->Flush();
  }
  state.counters["regions"] = regions;
}
BENCHMARK(BM_MunmapThenAcquire)->Arg(4096)->UseManualTime();

void BM_UffdUnmapToPublished(benchmark::State& state) {
  NullRegistrar reg;
  auto cache = MakeCache(&reg, MemoryMonitorMode::kUffd);
  if (!cache->Stats().monitor_uffd) {
    state.SkipWithError("userfaultfd unavailable");
    return;
  }
  double returns_s = 0;
  for (auto _ : state) {
    char* p = Map(kPage);
    p[0] = 1;
    if (!cache->Acquire(p, kPage, kAccessLocalRead).ok()) std::abort();  // watched
    uint64_t before = MemoryEventCount(MemoryEventSource::kUffd, MemoryEventKind::kUnmap);
    auto t0 = Clock::now();
    syscall(SYS_munmap, p, kPage);  // not through the hook: userfaultfd alone
    auto t1 = Clock::now();
    while (MemoryEventCount(MemoryEventSource::kUffd, MemoryEventKind::kUnmap) == before) {
    }
    auto t2 = Clock::now();
    state.SetIterationTime(Seconds(t0, t2));
    returns_s += Seconds(t0, t1);
    cache->Flush();
  }
  // How long munmap itself took (it blocks until the reader has read the event).
  state.counters["munmap_returns_ns"] =
      benchmark::Counter(returns_s * 1e9, benchmark::Counter::kAvgIterations);
}
BENCHMARK(BM_UffdUnmapToPublished)->UseManualTime();

}  // namespace
}  // namespace sanreg

BENCHMARK_MAIN();
