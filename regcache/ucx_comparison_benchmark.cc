// sanreg's RegistrationCache side by side with UCX's ucs_rcache (Debian's libucx-dev), in one
// process, on the same workloads and the same register callbacks (zero-cost, or sanreg's mlock
// PinRegistrar called from UCX's mem_reg/mem_dereg):
//   BM_Memory<Cache>:                 bytes per cached region at 100,000 regions: the growth of
//                                     resident memory (and of malloc'd bytes, mallinfo2), measured
//                                     in a forked child so that neither cache reuses the other's
//                                     freed memory;
//   BM_Hit<Cache>/regions/cpu/threads:
//                                     acquire + release of cached regions (each thread its own
//                                     share, in random order), at 100, 10,000 and 1,000,000
//                                     regions, in steady state; the counter first_pass_ns is the
//                                     first pass over all regions right after populating (see Get);
//                                     thread i runs on CPU cpu + i for both caches (HitCpu): one
//                                     thread on each of the first two CPUs, two threads on both
//                                     (see OneThreadNs for how the two 1-thread runs are used);
//   BM_Scaling<Cache>/regions:        the hits/s of two threads against one, the 1- and 2-thread
//                                     turns taken milliseconds apart in one benchmark (see
//                                     Scaling): the scaling target is read on it;
//   BM_Miss<Cache>:                   a miss on a fresh address (zero-cost registrar), with the
//                                     region dropped again outside the timing;
//   BM_MissMlock<Cache>:              the same with the mlock registrar (registrar cost included);
//   BM_Invalidate<Cache>/4096:        a range covering 4,096 cached regions is unmapped: the time
//                                     until no lookup returns them;
//   BM_InvalidateDereg<Cache>/4096:   ... and until all are deregistered.
// Invalidation is told to both caches the way a program with its own memory hooks tells them:
// sanreg's Invalidate(addr, len); UCX's ucm_vm_munmap(addr, len), with VM_UNMAPPED declared an
// external event (ucm_set_external_event), so UCX installs no hooks of its own. UCX invalidates in
// that call (its rcache lock is free) and puts the regions on its garbage list, which its next
// miss deregisters; sanreg's reclaimer thread deregisters them, Flush() waits for it. Otherwise
// neither cache gets memory events (UCX: ucm_events = 0; sanreg: memory_monitor = none).
// At the end the pairs are printed as a markdown table of ratios (sanreg / UCX time), also written
// to --ratios_md=FILE when given.
// Run: bazel run -c opt //regcache:ucx_comparison_benchmark

#include <benchmark/benchmark.h>
#include <malloc.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

extern "C" {
#include <ucm/api/ucm.h>
#include <ucs/memory/rcache.h>
}

#include "regcache/bench_cpu.h"
#include "regcache/cache.h"
#include "regcache/null_registrar.h"
#include "regcache/pin_registrar.h"

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

// The mlock callbacks: sanreg's PinRegistrar, called from UCX's hooks (context = the registrar).
struct UcxPinnedRegion {
  ucs_rcache_region_t super;
  Registration reg;
};
ucs_status_t UcxPinReg(void* context, ucs_rcache_t*, void*, ucs_rcache_region_t* r, uint16_t) {
  auto* pr = reinterpret_cast<UcxPinnedRegion*>(r);
  auto reg = static_cast<PinRegistrar*>(context)->Register(
      r->super.start, r->super.end - r->super.start, kAccessLocalRead);
  if (!reg.ok()) return UCS_ERR_NO_MEMORY;
  pr->reg = *reg;
  return UCS_OK;
}
void UcxPinDereg(void* context, ucs_rcache_t*, ucs_rcache_region_t* r) {
  (void)static_cast<PinRegistrar*>(context)->Deregister(reinterpret_cast<UcxPinnedRegion*>(r)->reg);
}
const ucs_rcache_ops_t kUcxPinOps = {UcxPinReg, UcxPinDereg, UcxDump};

// Count registrations and deregistrations (the invalidation benchmark checks them).
std::atomic<uint64_t> ucx_regs{0};
std::atomic<uint64_t> ucx_deregs{0};
ucs_status_t UcxCountingReg(void*, ucs_rcache_t*, void*, ucs_rcache_region_t*, uint16_t) {
  ucx_regs.fetch_add(1, std::memory_order_relaxed);
  return UCS_OK;
}
void UcxCountingDereg(void*, ucs_rcache_t*, ucs_rcache_region_t*) {
  ucx_deregs.fetch_add(1, std::memory_order_relaxed);
}
const ucs_rcache_ops_t kUcxCountingOps = {UcxCountingReg, UcxCountingDereg, UcxDump};

// `pin`: register through it (the mlock callbacks); `unmap_events`: subscribe to VM_UNMAPPED,
// declared external, so that ucm_vm_munmap reaches the cache and no hook is installed.
ucs_rcache_t* MakeUcx(PinRegistrar* pin = nullptr, bool unmap_events = false) {
  ucs_rcache_params_t p = {};
  p.region_struct_size = pin ? sizeof(UcxPinnedRegion) : sizeof(ucs_rcache_region_t);
  p.alignment = UCS_RCACHE_MIN_ALIGNMENT;
  p.max_alignment = kPage;
  p.ucm_events = 0;
  if (unmap_events) {
    ucm_set_external_event(UCM_EVENT_VM_UNMAPPED);
    p.ucm_events = UCM_EVENT_VM_UNMAPPED;
  }
  p.ucm_event_priority = 1000;
  p.ops = pin ? &kUcxPinOps : unmap_events ? &kUcxCountingOps : &kUcxOps;
  p.context = pin;
  p.flags = UCS_RCACHE_FLAG_NO_PFN_CHECK;
  p.max_regions = static_cast<unsigned long>(-1);
  p.max_size = static_cast<size_t>(-1);
  p.max_unreleased = static_cast<size_t>(-1);
  ucs_rcache_t* rc = nullptr;
  if (ucs_rcache_create(&p, "bench", nullptr, &rc) != UCS_OK) std::abort();
  return rc;
}

std::unique_ptr<RegistrationCache> MakeSanreg(Registrar* registrar, bool publish_stats = true) {
  RegistrationCache::Options o;
  o.memory_monitor = MemoryMonitorMode::kNone;
  o.publish_stats = publish_stats;
  // SANREG_CACHE_* overrides, for A/B runs of one binary (SANREG_CACHE_HAZARDS=0).
  if (!o.ApplyEnvironment().ok()) std::abort();
  auto c = RegistrationCache::Create(registrar, o);
  if (!c.ok()) std::abort();
  return std::move(*c);
}

NullRegistrar null_registrar;

// ---- memory per cached region ----
constexpr int kMemoryRegions = 100000;

struct MemoryUse {
  double rss = 0;   // resident bytes (/proc/self/statm)
  double heap = 0;  // bytes malloc hands out (mallinfo2: arena in use + mmapped chunks)
};

MemoryUse MemoryNow() {
  MemoryUse m;
  long pages_total = 0, pages_resident = 0;
  if (FILE* f = std::fopen("/proc/self/statm", "r")) {
    if (std::fscanf(f, "%ld %ld", &pages_total, &pages_resident) != 2) pages_resident = 0;
    std::fclose(f);
  }
  m.rss = static_cast<double>(pages_resident) * kPage;
  struct mallinfo2 mi = mallinfo2();
  m.heap = static_cast<double>(mi.uordblks + mi.hblkhd);
  return m;
}

// Runs `populate` (which caches kMemoryRegions regions and keeps them) in a forked child and
// returns the growth of its memory per region. Both caches start from the same parent state, so
// neither lands in memory the other freed. The arena is mapped (never touched) before measuring.
// The child first gives the heap's free pages back (malloc_trim), so that what populate reuses of
// the parent's freed memory shows as resident growth too, whatever ran before (with
// --benchmark_enable_random_interleaving, any benchmark may have); the heap figure counts bytes
// handed out, reused or not.
MemoryUse MemoryPerRegion(void (*populate)(char* arena)) {
  char* arena = Arena(2 * kMemoryRegions);
  int fds[2];
  if (pipe(fds) != 0) std::abort();
  pid_t pid = fork();
  if (pid < 0) std::abort();
  if (pid == 0) {
    close(fds[0]);
    malloc_trim(0);
    MemoryUse before = MemoryNow();
    populate(arena);
    MemoryUse after = MemoryNow();
    MemoryUse per;
    per.rss = (after.rss - before.rss) / kMemoryRegions;
    per.heap = (after.heap - before.heap) / kMemoryRegions;
    ssize_t n = write(fds[1], &per, sizeof per);
    _exit(n == sizeof per ? 0 : 1);
  }
  close(fds[1]);
  MemoryUse per;
  ssize_t n = read(fds[0], &per, sizeof per);
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  munmap(arena, 2 * kMemoryRegions * kPage);
  if (n != sizeof per || !WIFEXITED(status) || WEXITSTATUS(status) != 0) std::abort();
  return per;
}

void PopulateSanreg(char* arena) {
  // Kept: the child exits right after. Not published: _exit would leave the segment behind.
  auto cache = MakeSanreg(&null_registrar, false).release();
  for (int i = 0; i < kMemoryRegions; ++i) {
    if (!cache->Acquire(arena + 2 * i * kPage, kPage, kAccessLocalRead).ok()) std::abort();
  }
}

void PopulateUcx(char* arena) {
  ucs_rcache_t* rc = MakeUcx();
  for (int i = 0; i < kMemoryRegions; ++i) {
    ucs_rcache_region_t* r;
    if (ucs_rcache_get(rc, arena + 2 * i * kPage, kPage, PROT_READ, nullptr, &r) != UCS_OK) {
      std::abort();
    }
    ucs_rcache_region_put(rc, r);
  }
}

void Memory(benchmark::State& state, void (*populate)(char*)) {
  MemoryUse per;
  for (auto _ : state) per = MemoryPerRegion(populate);
  state.counters["rss_per_region"] = per.rss;
  state.counters["heap_per_region"] = per.heap;
  state.counters["regions"] = kMemoryRegions;
}
void BM_MemorySanreg(benchmark::State& state) { Memory(state, PopulateSanreg); }
void BM_MemoryUcx(benchmark::State& state) { Memory(state, PopulateUcx); }
// First, while the heap holds little freed memory a child could reuse unseen.
BENCHMARK(BM_MemorySanreg)->Iterations(1);
BENCHMARK(BM_MemoryUcx)->Iterations(1);

// ---- shared fixtures: one populated cache of each kind per region count ----
struct Populated {
  char* arena = nullptr;
  std::unique_ptr<RegistrationCache> sanreg;
  ucs_rcache_t* ucx = nullptr;
  // The first pass of hits over every region, in random order, right after populating: ns per hit.
  double sanreg_first_pass_ns = 0;
  double ucx_first_pass_ns = 0;
};

std::vector<char*> Shuffled(char* arena, int regions, int threads, int thread_index) {
  std::vector<char*> addrs;
  for (int i = 0; i < regions; ++i) {
    if (i % threads == thread_index) addrs.push_back(arena + 2 * i * kPage);
  }
  std::mt19937_64 rng(thread_index + 1);
  std::shuffle(addrs.begin(), addrs.end(), rng);
  return addrs;
}

double NsPerItem(std::chrono::steady_clock::time_point t0, size_t n) {
  return std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() /
         static_cast<double>(n);
}

// Populates both caches, then makes one timed pass of hits over every region (the first pass:
// each region's first hit after populating, its lines cold in the caches; sanreg's lookup table
// grew while populating and carries its slots over when it grows). The timed benchmarks after it
// measure hits in steady state.
Populated& Get(int regions) {
  static std::mutex mu;
  static std::map<int, Populated> all;
  std::lock_guard<std::mutex> lock(mu);
  Populated& p = all[regions];
  if (p.arena == nullptr) {
    p.arena = Arena(2 * regions);
    p.sanreg = MakeSanreg(&null_registrar);
    p.ucx = MakeUcx();
    for (int i = 0; i < regions; ++i) {
      char* a = p.arena + 2 * i * kPage;
      if (!p.sanreg->Acquire(a, kPage, kAccessLocalRead).ok()) std::abort();
      ucs_rcache_region_t* r;
      if (ucs_rcache_get(p.ucx, a, kPage, PROT_READ, nullptr, &r) != UCS_OK) std::abort();
      ucs_rcache_region_put(p.ucx, r);
    }
    const std::vector<char*> addrs = Shuffled(p.arena, regions, 1, 0);
    auto t0 = std::chrono::steady_clock::now();
    for (char* a : addrs) {
      auto r = p.sanreg->Acquire(a, 64, kAccessLocalRead);
      benchmark::DoNotOptimize(r);
    }
    p.sanreg_first_pass_ns = NsPerItem(t0, addrs.size());
    t0 = std::chrono::steady_clock::now();
    for (char* a : addrs) {
      ucs_rcache_region_t* r;
      if (ucs_rcache_get(p.ucx, a, 64, PROT_READ, nullptr, &r) != UCS_OK) std::abort();
      benchmark::DoNotOptimize(r);
      ucs_rcache_region_put(p.ucx, r);
    }
    p.ucx_first_pass_ns = NsPerItem(t0, addrs.size());
  }
  return p;
}

// The CPUs this process may run on, as it started (main() reads them before any benchmark runs).
std::vector<int>& StartCpus() {
  static std::vector<int> cpus;
  return cpus;
}

// Thread `index` of a hit benchmark runs on the index-th CPU of StartCpus() (modulo their number)
// while the returned pin lives. Why: this guest's two vCPUs can differ twofold in memory latency
// for minutes at a time (a hit at 1,000,000 regions took 139-140 ns on one and 301-369 ns on the
// other, same binary, minutes apart; docs/PERFORMANCE.md). Left to the scheduler, one cache's
// 1-thread benchmark could run on one vCPU and the other cache's on the other, and that would
// decide their ratio. Pinned, thread i of both caches runs on the same CPU. The caches Get()
// creates are created pinned: sanreg's reclaimer thread keeps thread 0's CPU (it sleeps through
// the hit benchmarks).
int HitCpu(int index) {
  const std::vector<int>& cpus = StartCpus();
  return cpus.empty() ? -1 : cpus[static_cast<size_t>(index) % cpus.size()];
}

std::vector<char*> MyShare(benchmark::State& state, char* arena, int regions) {
  return Shuffled(arena, regions, state.threads(), state.thread_index());
}

void BM_HitSanreg(benchmark::State& state) {
  bench::ScopedPin pin(HitCpu(static_cast<int>(state.range(1)) + state.thread_index()));
  const int regions = static_cast<int>(state.range(0));
  Populated& p = Get(regions);
  auto addrs = MyShare(state, p.arena, regions);
  const uint64_t locked_before = p.sanreg->Stats().locked_hits;
  size_t i = 0;
  for (auto _ : state) {
    auto r = p.sanreg->Acquire(addrs[i], 64, kAccessLocalRead);
    benchmark::DoNotOptimize(r);
    if (++i == addrs.size()) i = 0;
  }
  state.SetItemsProcessed(state.iterations());
  state.counters["first_pass_ns"] = p.sanreg_first_pass_ns;
  // Hits that took the cache lock (the lookup table had no slot for them), per million.
  state.counters["locked_per_M"] =
      benchmark::Counter(static_cast<double>(p.sanreg->Stats().locked_hits - locked_before) * 1e6 /
                         static_cast<double>(state.iterations()) / state.threads());
}

void BM_HitUcx(benchmark::State& state) {
  bench::ScopedPin pin(HitCpu(static_cast<int>(state.range(1)) + state.thread_index()));
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
  state.counters["first_pass_ns"] = p.ucx_first_pass_ns;
}

// Args {regions, cpu}: one thread on the first CPU and one on the second, then two threads, on
// both. Names: BM_HitSanreg/10000/cpu:1/real_time/threads:1.
void OneThread(benchmark::internal::Benchmark* b) {
  b->ArgNames({"", "cpu"})->ArgsProduct({{100, 10000, 1000000}, {0, 1}});
}
void TwoThreads(benchmark::internal::Benchmark* b) {
  b->ArgNames({"", "cpu"})->ArgsProduct({{100, 10000, 1000000}, {0}});
}
BENCHMARK(BM_HitSanreg)->Apply(OneThread)->Threads(1)->UseRealTime();
BENCHMARK(BM_HitUcx)->Apply(OneThread)->Threads(1)->UseRealTime();
BENCHMARK(BM_HitSanreg)->Apply(TwoThreads)->Threads(2)->UseRealTime();
BENCHMARK(BM_HitUcx)->Apply(TwoThreads)->Threads(2)->UseRealTime();

// ---- 2 threads against 1, taking turns ----
// BM_Scaling<Cache>/regions: the hits/s of one thread and of two, measured in turns milliseconds
// apart inside one benchmark. The BM_Hit runs the scaling rows were first read on ran seconds to
// minutes apart (their repetitions interleaved at random), and this guest changes speed for
// seconds to minutes at a time: with the cache's code unchanged, report runs read the 100-region
// scaling at 1.45-2.18x and the 1,000,000-region one at 1.44-2.23x (docs/PERFORMANCE.md, item 2).
// Taking turns, the 1- and 2-thread figures of a round meet the same spell, as the data path's
// modes do in datapath_benchmark's BM_Alternated.
// A round has three turns: one thread on CPU 0, one on CPU 1 (each hitting every region, as
// BM_Hit's 1-thread runs do), and both at once (each its half, as BM_Hit's 2-thread runs); every
// other round runs them in reverse order. A turn is kTurnWarm of untimed hits, then kTurnTimed of
// counted ones; a thread's rate is its hits over its own timed span. A round's scaling is the
// 2-thread rate (both threads' rates summed) over the mean of the two 1-thread rates (the mean:
// see OneThreadNs). Counters: each figure's median over the rounds, and the median of the rounds'
// scalings. A thread between its turns blocks (a futex wait): nothing spins beside a 1-thread turn.
constexpr int kScalingRounds = 15;
constexpr auto kTurnWarm = std::chrono::milliseconds(5);
constexpr auto kTurnTimed = std::chrono::milliseconds(20);

// `hit(addr)` is one acquire + release of the region at addr, callable from two threads at once.
template <class Hit>
void Scaling(benchmark::State& state, Hit hit) {
  const int regions = static_cast<int>(state.range(0));
  Populated& p = Get(regions);
  const std::vector<char*> all = Shuffled(p.arena, regions, 1, 0);
  const std::vector<char*> half[2] = {Shuffled(p.arena, regions, 2, 0),
                                      Shuffled(p.arena, regions, 2, 1)};
  enum Phase : int { kWarm, kTimed, kStop };
  std::atomic<uint32_t> turn{0};  // bumped to start a turn; the threads futex-wait on it
  std::atomic<int> phase{kStop};
  std::atomic<int> finished{0};  // threads done with the turn
  bool active[2] = {false, false};
  bool both = false;
  bool quit = false;
  double rate[2] = {0, 0};  // hits/s of each thread in the last turn; 0: it timed nothing
  using Clock = std::chrono::steady_clock;
  auto worker = [&](int i) {
    bench::ScopedPin pin(HitCpu(i));
    for (uint32_t seen = 0;;) {
      turn.wait(seen, std::memory_order_acquire);
      seen = turn.load(std::memory_order_acquire);
      if (quit) return;
      if (active[i]) {
        const std::vector<char*>& addrs = both ? half[i] : all;
        size_t k = 0;
        auto hits = [&] {  // 64 hits between looks at the phase
          for (int j = 0; j < 64; ++j) {
            hit(addrs[k]);
            if (++k == addrs.size()) k = 0;
          }
        };
        while (phase.load(std::memory_order_relaxed) == kWarm) hits();
        uint64_t n = 0;
        const auto t0 = Clock::now();
        while (phase.load(std::memory_order_relaxed) == kTimed) {
          hits();
          n += 64;
        }
        const double s = std::chrono::duration<double>(Clock::now() - t0).count();
        rate[i] = n > 0 && s > 0 ? static_cast<double>(n) / s : 0;
      }
      finished.fetch_add(1, std::memory_order_release);
      finished.notify_one();
    }
  };
  std::thread threads[2] = {std::thread(worker, 0), std::thread(worker, 1)};
  // One turn with the given threads; returns their summed hits/s (0: one of them timed nothing).
  auto run_turn = [&](bool t0, bool t1) {
    active[0] = t0;
    active[1] = t1;
    both = t0 && t1;
    rate[0] = rate[1] = 0;
    finished.store(0, std::memory_order_relaxed);
    phase.store(kWarm, std::memory_order_relaxed);
    turn.fetch_add(1, std::memory_order_release);
    turn.notify_all();
    std::this_thread::sleep_for(kTurnWarm);
    phase.store(kTimed, std::memory_order_relaxed);
    std::this_thread::sleep_for(kTurnTimed);
    phase.store(kStop, std::memory_order_relaxed);
    for (int f; (f = finished.load(std::memory_order_acquire)) < 2;) finished.wait(f);
    if ((t0 && rate[0] == 0) || (t1 && rate[1] == 0)) return 0.0;
    return rate[0] + rate[1];
  };
  std::vector<double> one[2], two, scaling;
  for (auto _ : state) {
    const auto start = Clock::now();
    for (int r = 0; r < kScalingRounds; ++r) {
      double on0 = 0, on1 = 0, on_both = 0;
      if (r % 2 == 0) {
        on0 = run_turn(true, false);
        on1 = run_turn(false, true);
        on_both = run_turn(true, true);
      } else {
        on_both = run_turn(true, true);
        on1 = run_turn(false, true);
        on0 = run_turn(true, false);
      }
      if (on0 == 0 || on1 == 0 || on_both == 0) continue;  // a thread missed its turn's window
      one[0].push_back(on0);
      one[1].push_back(on1);
      two.push_back(on_both);
      scaling.push_back(on_both / ((on0 + on1) / 2));
    }
    state.SetIterationTime(std::chrono::duration<double>(Clock::now() - start).count());
  }
  quit = true;
  turn.fetch_add(1, std::memory_order_release);
  turn.notify_all();
  for (std::thread& t : threads) t.join();
  if (scaling.empty()) {
    state.SkipWithError("no round timed both threads");
    return;
  }
  state.counters["hits_per_s_cpu0"] = bench::Median(one[0]);
  state.counters["hits_per_s_cpu1"] = bench::Median(one[1]);
  state.counters["hits_per_s_2threads"] = bench::Median(two);
  state.counters["scaling"] = bench::Median(scaling);
  state.counters["rounds"] = static_cast<double>(scaling.size());
}

void BM_ScalingSanreg(benchmark::State& state) {
  RegistrationCache* cache = Get(static_cast<int>(state.range(0))).sanreg.get();
  Scaling(state, [cache](char* a) {
    auto r = cache->Acquire(a, 64, kAccessLocalRead);
    benchmark::DoNotOptimize(r);
  });
}

void BM_ScalingUcx(benchmark::State& state) {
  ucs_rcache_t* rc = Get(static_cast<int>(state.range(0))).ucx;
  Scaling(state, [rc](char* a) {
    ucs_rcache_region_t* r;
    if (ucs_rcache_get(rc, a, 64, PROT_READ, nullptr, &r) != UCS_OK) std::abort();
    benchmark::DoNotOptimize(r);
    ucs_rcache_region_put(rc, r);
  });
}
BENCHMARK(BM_ScalingSanreg)->Arg(100)->Arg(10000)->Arg(1000000)->Iterations(1)->UseManualTime();
BENCHMARK(BM_ScalingUcx)->Arg(100)->Arg(10000)->Arg(1000000)->Iterations(1)->UseManualTime();

// Misses: a fresh address each time; every 4,096 misses the regions are dropped, untimed.
constexpr size_t kMissBatch = 4096;

// `pin`: register through sanreg's mlock registrar; else the zero-cost one.
void MissSanreg(benchmark::State& state, bool pin) {
  char* arena = Arena(2 * kMissBatch);
  PinRegistrar pin_registrar;
  auto cache = MakeSanreg(pin ? static_cast<Registrar*>(&pin_registrar) : &null_registrar);
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
  cache.reset();
  munmap(arena, 2 * kMissBatch * kPage);
  state.SetItemsProcessed(state.iterations());
}

void MissUcx(benchmark::State& state, bool pin) {
  char* arena = Arena(2 * kMissBatch);
  PinRegistrar pin_registrar;
  ucs_rcache_t* rc = MakeUcx(pin ? &pin_registrar : nullptr);
  std::vector<ucs_rcache_region_t*> held;
  held.reserve(kMissBatch);
  size_t n = 0;
  for (auto _ : state) {
    ucs_rcache_region_t* r;
    if (ucs_rcache_get(rc, arena + 2 * n * kPage, 64, PROT_READ, nullptr, &r) != UCS_OK) {
      std::abort();
    }
    ucs_rcache_region_put(rc, r);  // released at once, as sanreg's RegionRef is
    held.push_back(r);             // still in UCX's page table: the pointer stays valid
    if (++n == kMissBatch) {
      state.PauseTiming();
      // Drop them: hold, invalidate, release.
      for (ucs_rcache_region_t* h : held) {
        ucs_rcache_region_hold(rc, h);
        ucs_rcache_region_invalidate(
            rc, h, [](void*) {}, nullptr);
        ucs_rcache_region_put(rc, h);
      }
      held.clear();
      n = 0;
      state.ResumeTiming();
    }
  }
  ucs_rcache_destroy(rc);
  munmap(arena, 2 * kMissBatch * kPage);
  state.SetItemsProcessed(state.iterations());
}

void BM_MissSanreg(benchmark::State& state) { MissSanreg(state, false); }
void BM_MissUcx(benchmark::State& state) { MissUcx(state, false); }
void BM_MissMlockSanreg(benchmark::State& state) { MissSanreg(state, true); }
void BM_MissMlockUcx(benchmark::State& state) { MissUcx(state, true); }
BENCHMARK(BM_MissSanreg);
BENCHMARK(BM_MissUcx);
BENCHMARK(BM_MissMlockSanreg);
BENCHMARK(BM_MissMlockUcx);

// ---- invalidation: a range covering `regions` cached regions is unmapped ----
// Timed: from the notification until no lookup returns them (`dereg` false), or until every one
// is deregistered (`dereg` true). The regions are cached again, untimed, before each iteration.
using Clock = std::chrono::steady_clock;

void InvalidateSanreg(benchmark::State& state, bool dereg) {
  const int regions = static_cast<int>(state.range(0));
  char* arena = Arena(2 * regions);
  auto cache = MakeSanreg(&null_registrar);
  for (auto _ : state) {
    for (int i = 0; i < regions; ++i) {
      if (!cache->Acquire(arena + 2 * i * kPage, kPage, kAccessLocalRead).ok()) std::abort();
    }
    const auto t0 = Clock::now();
    auto k = cache->Invalidate(arena, 2 * regions * kPage);
    if (dereg) cache->Flush();
    const auto t1 = Clock::now();
    if (!k.ok() || *k != static_cast<size_t>(regions)) std::abort();
    state.SetIterationTime(std::chrono::duration<double>(t1 - t0).count());
    cache->Flush();
  }
  cache.reset();
  munmap(arena, 2 * regions * kPage);
}

void InvalidateUcx(benchmark::State& state, bool dereg) {
  const int regions = static_cast<int>(state.range(0));
  char* arena = Arena(2 * regions + 2);
  char* outside = arena + 2 * regions * kPage;  // never cached: a lookup there misses
  ucs_rcache_t* rc = MakeUcx(nullptr, true);
  for (auto _ : state) {
    for (int i = 0; i < regions; ++i) {
      ucs_rcache_region_t* r;
      if (ucs_rcache_get(rc, arena + 2 * i * kPage, kPage, PROT_READ, nullptr, &r) != UCS_OK) {
        std::abort();
      }
      ucs_rcache_region_put(rc, r);
    }
    const uint64_t deregs = ucx_deregs.load();
    ucs_rcache_region_t* miss = nullptr;
    const auto t0 = Clock::now();
    ucm_vm_munmap(arena, 2 * regions * kPage);
    if (dereg) {
      // The next miss deregisters what the event put on the garbage list.
      if (ucs_rcache_get(rc, outside, kPage, PROT_READ, nullptr, &miss) != UCS_OK) std::abort();
    }
    const auto t1 = Clock::now();
    state.SetIterationTime(std::chrono::duration<double>(t1 - t0).count());
    // Checked, untimed: a lookup in the range is a miss (registers anew) and not the old region;
    // every region of the range was deregistered (by the timed miss, or by this one).
    const uint64_t regs = ucx_regs.load();
    ucs_rcache_region_t* again;
    if (ucs_rcache_get(rc, arena, kPage, PROT_READ, nullptr, &again) != UCS_OK) std::abort();
    ucs_rcache_region_put(rc, again);
    if (ucx_regs.load() != regs + 1) {
      std::fprintf(stderr, "UCX returned an unmapped region after ucm_vm_munmap\n");
      std::abort();
    }
    if (miss == nullptr &&
        ucs_rcache_get(rc, outside, kPage, PROT_READ, nullptr, &miss) != UCS_OK) {
      std::abort();
    }
    if (ucx_deregs.load() - deregs != static_cast<uint64_t>(regions)) {
      std::fprintf(stderr, "UCX deregistered %llu of %d regions\n",
                   static_cast<unsigned long long>(ucx_deregs.load() - deregs), regions);
      std::abort();
    }
    ucs_rcache_region_put(rc, miss);
    ucm_vm_munmap(outside, kPage);  // dropped; the next miss deregisters it
  }
  ucs_rcache_destroy(rc);
  munmap(arena, (2 * regions + 2) * kPage);
}

void BM_InvalidateSanreg(benchmark::State& state) { InvalidateSanreg(state, false); }
void BM_InvalidateUcx(benchmark::State& state) { InvalidateUcx(state, false); }
void BM_InvalidateDeregSanreg(benchmark::State& state) { InvalidateSanreg(state, true); }
void BM_InvalidateDeregUcx(benchmark::State& state) { InvalidateUcx(state, true); }
BENCHMARK(BM_InvalidateSanreg)->Arg(4096)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_InvalidateUcx)->Arg(4096)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_InvalidateDeregSanreg)->Arg(4096)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_InvalidateDeregUcx)->Arg(4096)->UseManualTime()->Unit(benchmark::kMicrosecond);

// Collects every run, then prints the pairs as a markdown table of ratios against the targets.
class RatioReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& r : runs) {
      // With --benchmark_repetitions, the median (reported after the repetitions) wins.
      if (r.error_occurred) continue;
      if (r.run_type == Run::RT_Aggregate && r.aggregate_name != "median") continue;
      Result& x = results_[r.run_name.str()];
      x.ns = r.GetAdjustedRealTime() * 1e9 / benchmark::GetTimeUnitMultiplier(r.time_unit);
      for (const auto& [k, c] : r.counters) x.counters[k] = c.value;
    }
    ConsoleReporter::ReportRuns(runs);
  }

  std::string Markdown() const {
    std::string out =
        "| workload | sanreg | UCX | sanreg / UCX | target |\n|---|---:|---:|---:|---|\n";
    for (const char* regions : {"100", "10000", "1000000"}) {
      const std::string n = Count(regions);
      const std::string base = std::string("/") + regions + "/cpu:";
      const std::string cpu0 = base + "0/real_time/threads:1";
      const std::string cpu1 = base + "1/real_time/threads:1";
      const std::string two = base + "0/real_time/threads:2";
      Row(&out, "hit, " + n + " regions, 1 thread on CPU 0", "BM_HitSanreg" + cpu0,
          "BM_HitUcx" + cpu0, "ns", "");
      Row(&out, "hit, " + n + " regions, 1 thread on CPU 1", "BM_HitSanreg" + cpu1,
          "BM_HitUcx" + cpu1, "ns", "");
      const double s1 = OneThreadNs("BM_HitSanreg" + cpu0, "BM_HitSanreg" + cpu1);
      const double u1 = OneThreadNs("BM_HitUcx" + cpu0, "BM_HitUcx" + cpu1);
      RowOf(&out, "hit, " + n + " regions, 1 thread (mean of CPU 0 and CPU 1)", s1, u1, "ns",
            "<= 0.5");
      Row(&out, "hit, " + n + " regions, 2 threads on CPUs 0 and 1 (time per hit, all threads)",
          "BM_HitSanreg" + two, "BM_HitUcx" + two, "ns", "<= 0.5");
      const double s2 = Ns("BM_HitSanreg" + two), u2 = Ns("BM_HitUcx" + two);
      char line[256];
      // The target is read on the turns taken in one benchmark (BM_Scaling); the BM_Hit runs'
      // scaling, whose 1- and 2-thread runs were seconds to minutes apart, is shown for reference.
      const std::string turns = std::string("/") + regions + "/iterations:1/manual_time";
      std::snprintf(line, sizeof line,
                    "| hits/s of 2 threads / 1 thread, %s regions, taking turns (BM_Scaling) | %s "
                    "| %s | | sanreg >= 1.8 |\n",
                    n.c_str(), Fmt(Counter("BM_ScalingSanreg" + turns, "scaling"), "x").c_str(),
                    Fmt(Counter("BM_ScalingUcx" + turns, "scaling"), "x").c_str());
      out += line;
      std::snprintf(
          line, sizeof line,
          "| the same from the separate runs above, %s regions | %s | %s | | reference |\n",
          n.c_str(), Fmt(Ratio(s1, s2), "x").c_str(), Fmt(Ratio(u1, u2), "x").c_str());
      out += line;
      std::snprintf(line, sizeof line,
                    "| the same against CPU 0's 1-thread time alone, %s regions | %s | %s | | |\n",
                    n.c_str(), Fmt(Ratio(Ns("BM_HitSanreg" + cpu0), s2), "x").c_str(),
                    Fmt(Ratio(Ns("BM_HitUcx" + cpu0), u2), "x").c_str());
      out += line;
      const double fs = Counter("BM_HitSanreg" + cpu0, "first_pass_ns");
      const double fu = Counter("BM_HitUcx" + cpu0, "first_pass_ns");
      std::snprintf(line, sizeof line,
                    "| first pass of hits right after populating %s regions | %s | %s | %s | |\n",
                    n.c_str(), Fmt(fs, "ns").c_str(), Fmt(fu, "ns").c_str(),
                    fs > 0 && fu > 0 ? Fmt(fs / fu, "x").c_str() : "-");
      out += line;
    }
    Row(&out, "miss, zero-cost registrar (the cache's own overhead)", "BM_MissSanreg", "BM_MissUcx",
        "ns", "<= 0.5");
    Row(&out, "miss, mlock registrar (PinRegistrar on both)", "BM_MissMlockSanreg",
        "BM_MissMlockUcx", "ns", "");
    Row(&out, "unmap of 4,096 cached regions: until no lookup returns them",
        "BM_InvalidateSanreg/4096/manual_time", "BM_InvalidateUcx/4096/manual_time", "us", "");
    Row(&out, "unmap of 4,096 cached regions: until all are deregistered",
        "BM_InvalidateDeregSanreg/4096/manual_time", "BM_InvalidateDeregUcx/4096/manual_time", "us",
        "");
    MemoryRow(&out, "rss_per_region", "memory per cached region (resident), 100,000 regions");
    MemoryRow(&out, "heap_per_region", "memory per cached region (malloc'd), 100,000 regions");
    return out;
  }

 private:
  struct Result {
    double ns = 0;
    std::map<std::string, double> counters;
  };

  // "1000000" -> "1,000,000".
  static std::string Count(const char* n) {
    const size_t len = std::strlen(n);
    std::string s;
    for (size_t i = 0; i < len; ++i) {
      if (i > 0 && (len - i) % 3 == 0) s.push_back(',');
      s.push_back(n[i]);
    }
    return s;
  }
  static std::string Fmt(double v, const char* unit) {
    if (v <= 0) return "-";
    char s[64];
    if (std::string(unit) == "x") {
      std::snprintf(s, sizeof s, "%.2fx", v);
    } else if (std::string(unit) == "us") {
      std::snprintf(s, sizeof s, "%.1f us", v / 1000);
    } else if (std::string(unit) == "B") {
      std::snprintf(s, sizeof s, "%.0f B", v);
    } else {
      std::snprintf(s, sizeof s, v < 100 ? "%.1f ns" : "%.0f ns", v);
    }
    return s;
  }
  double Ns(const std::string& name) const {
    auto it = results_.find(name);
    return it == results_.end() ? 0 : it->second.ns;
  }
  static double Ratio(double a, double b) { return a > 0 && b > 0 ? a / b : 0; }
  // The 1-thread time a 2-thread run is compared with: the mean of one thread's time per hit on
  // CPU 0 and on CPU 1 (0 when either is missing). Why both: the two threads of the 2-thread run
  // run on both CPUs, each doing the same number of hits, so the time Google Benchmark reports for
  // it (the threads' mean time over their total hits) is (t0 + t1) / 4 for hits that cost t0 on
  // CPU 0 and t1 on CPU 1 and do not slow each other: half the mean of t0 and t1, a scaling of
  // exactly 2. Against one CPU's time alone the scaling reads t0's share of it instead: this
  // guest's two vCPUs often differ by 1.3-1.9x in memory latency for minutes at a time, and which
  // is faster changes, so that the same binary read 2.50-2.56x at 10,000 regions while vCPU 0 was
  // the slow one and 1.77x minutes later, with the vCPUs alike (docs/PERFORMANCE.md, target 2).
  // The sanreg / UCX ratio of one thread uses the same mean: both caches are timed on both CPUs.
  double OneThreadNs(const std::string& cpu0, const std::string& cpu1) const {
    return Ns(cpu0) > 0 && Ns(cpu1) > 0 ? (Ns(cpu0) + Ns(cpu1)) / 2 : 0;
  }
  void Row(std::string* out, const std::string& what, const std::string& sanreg,
           const std::string& ucx, const char* unit, const char* target) const {
    RowOf(out, what, Ns(sanreg), Ns(ucx), unit, target);
  }
  void RowOf(std::string* out, const std::string& what, double a, double b, const char* unit,
             const char* target) const {
    char line[512];
    std::snprintf(line, sizeof line, "| %s | %s | %s | %s | %s |\n", what.c_str(),
                  Fmt(a, unit).c_str(), Fmt(b, unit).c_str(),
                  a > 0 && b > 0 ? Fmt(a / b, "x").c_str() : "-", target);
    *out += line;
  }
  double Counter(const std::string& name, const char* counter) const {
    auto it = results_.find(name);
    if (it == results_.end()) return 0;
    auto c = it->second.counters.find(counter);
    return c == it->second.counters.end() ? 0 : c->second;
  }
  void MemoryRow(std::string* out, const char* counter, const char* what) const {
    const double a = Counter("BM_MemorySanreg/iterations:1", counter);
    const double b = Counter("BM_MemoryUcx/iterations:1", counter);
    char line[512];
    std::snprintf(line, sizeof line, "| %s | %s | %s | %s | |\n", what, Fmt(a, "B").c_str(),
                  Fmt(b, "B").c_str(), a > 0 && b > 0 ? Fmt(a / b, "x").c_str() : "-");
    *out += line;
  }

  std::map<std::string, Result> results_;
};

}  // namespace
}  // namespace sanreg

int main(int argc, char** argv) {
  // --ratios_md=FILE: also write the markdown table there (the flag is ours, not the library's).
  std::string ratios_md;
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--ratios_md=", 0) == 0) {
      ratios_md = a.substr(12);
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  sanreg::StartCpus() = sanreg::bench::ThreadCpus();  // empty: no pinning (HitCpu)
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  sanreg::RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  const std::string md = reporter.Markdown();
  std::printf("\nsanreg / UCX (time ratios; memory as bytes per region)\n\n%s", md.c_str());
  if (!ratios_md.empty()) {
    FILE* f = std::fopen(ratios_md.c_str(), "w");
    if (f == nullptr || std::fputs(md.c_str(), f) < 0 || std::fclose(f) != 0) {
      std::fprintf(stderr, "ucx_comparison_benchmark: cannot write %s\n", ratios_md.c_str());
      return 1;
    }
  }
  return 0;
}
