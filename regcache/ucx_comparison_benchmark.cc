// sanreg's RegistrationCache side by side with UCX's ucs_rcache (Debian's libucx-dev), in one
// process, on the same workloads and the same zero-cost register callbacks:
//   BM_Hit<Cache>/regions/threads:  acquire + release of cached regions (each thread its own share);
//   BM_Miss<Cache>:                 a miss on a fresh address, with the region dropped again
//                                   outside the timing.
// Compare the pairs as ratios (sanreg time / UCX time). Neither cache gets memory events here
// (UCX: ucm_events = 0; sanreg: memory_monitor = none), so both measure the cache alone.
// Run: bazel run -c opt //regcache:ucx_comparison_benchmark

#include <benchmark/benchmark.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <vector>

extern "C" {
#include <ucs/memory/rcache.h>
}

#include "regcache/cache.h"
#include "regcache/null_registrar.h"

namespace sanreg {
namespace {

const size_t kPage = static_cast<size_t>(sysconf(_SC_PAGESIZE));

// Address space for the regions: real (UCX may look at the mapping), never touched.
char* Arena(size_t pages) {
  void* p = mmap(nullptr, pages * kPage, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) std::abort();
  return static_cast<char*>(p);
}

// ---- UCX ----
ucs_status_t UcxMemReg(void*, ucs_rcache_t*, void*, ucs_rcache_region_t*, uint16_t) {
  return UCS_OK;
}
void UcxMemDereg(void*, ucs_rcache_t*, ucs_rcache_region_t*) {}
void UcxDump(void*, ucs_rcache_t*, ucs_rcache_region_t*, char* buf, size_t max) {
  if (max > 0) buf[0] = '\0';
}
const ucs_rcache_ops_t kUcxOps = {UcxMemReg, UcxMemDereg, UcxDump};

ucs_rcache_t* MakeUcx() {
  ucs_rcache_params_t p = {};
  p.region_struct_size = sizeof(ucs_rcache_region_t);
  p.alignment = UCS_RCACHE_MIN_ALIGNMENT;
  p.max_alignment = kPage;
  p.ucm_events = 0;
  p.ucm_event_priority = 1000;
  p.ops = &kUcxOps;
  p.context = nullptr;
  p.flags = UCS_RCACHE_FLAG_NO_PFN_CHECK;
  p.max_regions = static_cast<unsigned long>(-1);
  p.max_size = static_cast<size_t>(-1);
  p.max_unreleased = static_cast<size_t>(-1);
  ucs_rcache_t* rc = nullptr;
  if (ucs_rcache_create(&p, "bench", nullptr, &rc) != UCS_OK) std::abort();
  return rc;
}

// ---- shared fixtures: one populated cache of each kind per region count ----
struct Populated {
  char* arena = nullptr;
  std::unique_ptr<RegistrationCache> sanreg;
  ucs_rcache_t* ucx = nullptr;
};

NullRegistrar null_registrar;

Populated& Get(int regions) {
  static std::mutex mu;
  static std::map<int, Populated> all;
  std::lock_guard<std::mutex> lock(mu);
  Populated& p = all[regions];
  if (p.arena == nullptr) {
    p.arena = Arena(2 * regions);
    RegistrationCache::Options o;
    o.memory_monitor = MemoryMonitorMode::kNone;
    auto c = RegistrationCache::Create(&null_registrar, o);
    if (!c.ok()) std::abort();
    p.sanreg = std::move(*c);
    p.ucx = MakeUcx();
    for (int i = 0; i < regions; ++i) {
      char* a = p.arena + 2 * i * kPage;
      if (!p.sanreg->Acquire(a, kPage, kAccessLocalRead).ok()) std::abort();
      ucs_rcache_region_t* r;
      if (ucs_rcache_get(p.ucx, a, kPage, PROT_READ, nullptr, &r) != UCS_OK) std::abort();
      ucs_rcache_region_put(p.ucx, r);
    }
  }
  return p;
}

std::vector<char*> MyShare(benchmark::State& state, char* arena, int regions) {
  std::vector<char*> addrs;
  for (int i = 0; i < regions; ++i) {
    if (i % state.threads() == state.thread_index()) addrs.push_back(arena + 2 * i * kPage);
  }
  std::mt19937_64 rng(state.thread_index() + 1);
  std::shuffle(addrs.begin(), addrs.end(), rng);
  return addrs;
}

void BM_HitSanreg(benchmark::State& state) {
  const int regions = static_cast<int>(state.range(0));
  Populated& p = Get(regions);
  auto addrs = MyShare(state, p.arena, regions);
  size_t i = 0;
  for (auto _ : state) {
    auto r = p.sanreg->Acquire(addrs[i], 64, kAccessLocalRead);
    benchmark::DoNotOptimize(r);
    if (++i == addrs.size()) i = 0;
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_HitUcx(benchmark::State& state) {
  const int regions = static_cast<int>(state.range(0));
  Populated& p = Get(regions);
  auto addrs = MyShare(state, p.arena, regions);
  size_t i = 0;
  for (auto _ : state) {
    ucs_rcache_region_t* r;
    if (ucs_rcache_get(p.ucx, addrs[i], 64, PROT_READ, nullptr, &r) != UCS_OK) std::abort();
    benchmark::DoNotOptimize(r);
    ucs_rcache_region_put(p.ucx, r);
    if (++i == addrs.size()) i = 0;
  }
  state.SetItemsProcessed(state.iterations());
}

BENCHMARK(BM_HitSanreg)->Arg(100)->Arg(10000)->Threads(1)->Threads(2)->UseRealTime();
BENCHMARK(BM_HitUcx)->Arg(100)->Arg(10000)->Threads(1)->Threads(2)->UseRealTime();

// Misses: a fresh address each time; every 4,096 misses the regions are dropped, untimed.
constexpr size_t kMissBatch = 4096;

void BM_MissSanreg(benchmark::State& state) {
  char* arena = Arena(2 * kMissBatch);
  RegistrationCache::Options o;
  o.memory_monitor = MemoryMonitorMode::kNone;
  auto c = RegistrationCache::Create(&null_registrar, o);
  if (!c.ok()) std::abort();
  auto& cache = *c;
  size_t n = 0;
  for (auto _ : state) {
    auto r = cache->Acquire(arena + 2 * n * kPage, 64, kAccessLocalRead);
    benchmark::DoNotOptimize(r);
    if (++n == kMissBatch) {
      state.PauseTiming();
      r->Reset();
      (void)cache->Invalidate(arena, 2 * kMissBatch * kPage);
      cache->Flush();
      n = 0;
      state.ResumeTiming();
    }
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_MissUcx(benchmark::State& state) {
  char* arena = Arena(2 * kMissBatch);
  ucs_rcache_t* rc = MakeUcx();
  std::vector<ucs_rcache_region_t*> held;
  held.reserve(kMissBatch);
  size_t n = 0;
  for (auto _ : state) {
    ucs_rcache_region_t* r;
    if (ucs_rcache_get(rc, arena + 2 * n * kPage, 64, PROT_READ, nullptr, &r) != UCS_OK) {
      std::abort();
    }
    ucs_rcache_region_put(rc, r);  // released at once, as sanreg's RegionRef is
    held.push_back(r);               // still in UCX's page table: the pointer stays valid
    if (++n == kMissBatch) {
      state.PauseTiming();
      // Drop them: hold, invalidate, release.
      for (ucs_rcache_region_t* h : held) {
        ucs_rcache_region_hold(rc, h);
        ucs_rcache_region_invalidate(rc, h, [](void*) {}, nullptr);
        ucs_rcache_region_put(rc, h);
      }
      held.clear();
      n = 0;
      state.ResumeTiming();
    }
  }
  ucs_rcache_destroy(rc);
  state.SetItemsProcessed(state.iterations());
}

BENCHMARK(BM_MissSanreg);
BENCHMARK(BM_MissUcx);

}  // namespace
}  // namespace sanreg

BENCHMARK_MAIN();
