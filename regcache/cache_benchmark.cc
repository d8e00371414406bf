// Benchmarks of RegistrationCache (Google Benchmark): hit (acquire + release) on 1 and 2 threads at
// 100, 10,000 and 1,000,000 regions; miss with a zero-cost registrar; invalidation of 1 and 4,096
// regions. Run: bazel run -c opt //regcache:cache_benchmark
// The side-by-side comparison with UCX's ucs_rcache lives in its own benchmark (issue 8).

#include <benchmark/benchmark.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <vector>

#include "regcache/cache.h"
#include "regcache/null_registrar.h"

namespace sanreg {
namespace {

const uintptr_t kPage = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
// Made-up addresses: the zero-cost registrar touches no memory.
const uintptr_t kBase = uintptr_t{1} << 40;

NullRegistrar null_registrar;

// The cache's own cost: no memory-event source (their cost is in memory_events_benchmark), unless
// SANREG_MEMORY_MONITOR says otherwise.
std::unique_ptr<RegistrationCache> MakeCache(RegistrationCache::Options o = {}) {
  o.memory_monitor = MemoryMonitorMode::kNone;
  if (!o.ApplyEnvironment().ok()) std::abort();
  auto c = RegistrationCache::Create(&null_registrar, o);
  if (!c.ok()) std::abort();
  return std::move(*c);
}

// One populated cache per region count, shared by the threads of a run.
RegistrationCache* PopulatedCache(int regions) {
  static std::mutex mu;
  static std::map<int, std::unique_ptr<RegistrationCache>> caches;
  std::lock_guard<std::mutex> lock(mu);
  auto& c = caches[regions];
  if (!c) {
    c = MakeCache();
    for (int i = 0; i < regions; ++i) {
      auto r = c->Acquire(kBase + 2 * i * kPage, kPage, kAccessLocalRead);
      if (!r.ok()) std::abort();
    }
  }
  return c.get();
}

// Hits on `regions` cached regions. Each thread visits its own share of them (index % threads ==
// thread), in its own random order: threads working on their own buffers, as RDMA threads do.
// BM_HitSharedRegions has every thread visit all of them: then each hit moves the region's cache
// line (its reference count) between cores, which any reference-counting cache pays.
void Hit(benchmark::State& state, bool shared) {
  const int regions = static_cast<int>(state.range(0));
  RegistrationCache* cache = PopulatedCache(regions);
  std::vector<uintptr_t> addrs;
  for (int i = 0; i < regions; ++i) {
    if (shared || i % state.threads() == state.thread_index()) {
      addrs.push_back(kBase + 2 * i * kPage);
    }
  }
  std::mt19937_64 rng(state.thread_index() + 1);
  std::shuffle(addrs.begin(), addrs.end(), rng);
  const CacheStats before = cache->Stats();
  size_t i = 0;
  for (auto _ : state) {
    auto r = cache->Acquire(addrs[i], 64, kAccessLocalRead);
    benchmark::DoNotOptimize(r);
    if (++i == addrs.size()) i = 0;
  }
  state.SetItemsProcessed(state.iterations());
  if (state.thread_index() == 0) {
    CacheStats s = cache->Stats();
    const double hits = static_cast<double>(s.hits - before.hits);
    state.counters["hit_rate"] = hits / (hits + static_cast<double>(s.misses() - before.misses()));
  }
}
void BM_Hit(benchmark::State& state) { Hit(state, /*shared=*/false); }
void BM_HitSharedRegions(benchmark::State& state) { Hit(state, /*shared=*/true); }
BENCHMARK(BM_Hit)->Arg(100)->Arg(10000)->Arg(1000000)->Threads(1)->Threads(2)->UseRealTime();
BENCHMARK(BM_HitSharedRegions)->Arg(10000)->Threads(1)->Threads(2)->UseRealTime();

// A miss with a zero-cost registrar, in steady state: at the 4,096-region limit every miss also
// evicts the least recently used region, and the reclaimer deregisters it on its own thread.
void BM_MissWithEviction(benchmark::State& state) {
  RegistrationCache::Options o;
  o.max_regions = 4096;
  auto cache = MakeCache(o);
  uintptr_t next = 0;
  for (auto _ : state) {
    auto r = cache->Acquire(kBase + (next++ % (1u << 24)) * 2 * kPage, 64, kAccessLocalRead);
    benchmark::DoNotOptimize(r);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_MissWithEviction);

// A miss with no limit: a fresh address each time, invalidated in batches outside the timing.
void BM_Miss(benchmark::State& state) {
  auto cache = MakeCache();
  uintptr_t next = 0;
  for (auto _ : state) {
    auto r = cache->Acquire(kBase + (next++) * 2 * kPage, 64, kAccessLocalRead);
    benchmark::DoNotOptimize(r);
    if ((next & 0xFFFF) == 0) {
      state.PauseTiming();
      r->Reset();
      (void)cache->Invalidate(kBase, (next + 1) * 2 * kPage);
      cache->Flush();
      state.ResumeTiming();
    }
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Miss);

// Invalidate(range) covering N cached regions: the time until no lookup can return them (the call
// itself), and separately until they are deregistered (call + Flush).
void Invalidation(benchmark::State& state, bool wait_deregistered) {
  const int n = static_cast<int>(state.range(0));
  auto cache = MakeCache();
  for (auto _ : state) {
    for (int i = 0; i < n; ++i) {
      auto r = cache->Acquire(kBase + 2 * i * kPage, kPage, kAccessLocalRead);
      if (!r.ok()) std::abort();
    }
    auto t0 = std::chrono::steady_clock::now();
    auto k = cache->Invalidate(kBase, 2 * n * kPage);
    if (wait_deregistered) cache->Flush();
    auto t1 = std::chrono::steady_clock::now();
    if (!k.ok() || *k != static_cast<size_t>(n)) std::abort();
    state.SetIterationTime(std::chrono::duration<double>(t1 - t0).count());
    cache->Flush();
  }
  state.counters["regions"] = n;
}
void BM_Invalidate(benchmark::State& state) { Invalidation(state, false); }
void BM_InvalidateAndDeregister(benchmark::State& state) { Invalidation(state, true); }
BENCHMARK(BM_Invalidate)->Arg(1)->Arg(4096)->UseManualTime();
BENCHMARK(BM_InvalidateAndDeregister)->Arg(1)->Arg(4096)->UseManualTime();

}  // namespace
}  // namespace sanreg

BENCHMARK_MAIN();
