// internal/region.h: one cached registration, as RegistrationCache and RegionRef see it. Not API.
//
// A Region lives in the cache's type-stable pool: its memory is never freed while the cache lives,
// only recycled, so a lock-free reader may dereference a stale pointer to it and must then validate
// what it reads through `state` (see cache.h, "The hit path").

#ifndef SANREG_REGCACHE_INTERNAL_REGION_H_
#define SANREG_REGCACHE_INTERNAL_REGION_H_

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>

#if defined(__x86_64__)
#include <x86intrin.h>
#endif

#include "regcache/interval_tree.h"
#include "regcache/registrar.h"

namespace sanreg::internal {

// The LRU clock: the TSC where there is one (invariant and synchronised across cores on the
// machines sanreg targets; about 20 cycles), else the steady clock. Only its order matters.
inline uint64_t NowTicks() {
#if defined(__x86_64__)
  return __rdtsc();
#else
  return std::chrono::steady_clock::now().time_since_epoch().count();
#endif
}

// Nanoseconds per NowTicks() tick, measured once per process (a 100 us calibration).
double NsPerTick();

// The LRU clock of releases: NowTicks() order without reading the TSC on every release. Reading
// it (RDTSC) keeps later loads from starting until earlier ones have finished on this project's
// machine: a loop of hits at 1,000,000 regions took 42 ns each without it and 117 ns with it
// (docs/PERFORMANCE.md, item 1). So a release stamps the latest time any thread read (g_lru_clock,
// advanced by every miss and by each thread's every kLruRefresh-th release), plus one tick past
// its thread's previous stamp:
//   - one thread's releases are stamped in the order they happen (each stamp is above the last),
//     and after every miss it made (a miss advances the clock to its own time);
//   - between threads, a release is stamped no earlier than the latest refresh it could know of,
//     so two releases of different threads can come out in the wrong order only within the time
//     one thread takes for kLruRefresh releases (or when no thread refreshed since: then nothing
//     else was released meanwhile either, by a thread that releases often).
inline std::atomic<uint64_t> g_lru_clock{0};
inline thread_local constinit uint64_t tl_lru_last = 0;
inline thread_local constinit uint32_t tl_lru_releases = 0;
inline constexpr uint32_t kLruRefresh = 4096;

// Raises g_lru_clock to t (never lowers it).
inline void AdvanceLruClock(uint64_t t) {
  uint64_t cur = g_lru_clock.load(std::memory_order_relaxed);
  while (cur < t && !g_lru_clock.compare_exchange_weak(cur, t, std::memory_order_relaxed)) {
  }
}

// The stamp of a release now.
inline uint64_t LruNow() {
  uint64_t t;
  if (++tl_lru_releases % kLruRefresh == 0) {
    t = NowTicks();
    AdvanceLruClock(t);
  } else {
    t = g_lru_clock.load(std::memory_order_relaxed);
  }
  t = t > tl_lru_last ? t : tl_lru_last + 1;
  tl_lru_last = t;
  return t;
}

// A bijection of [0, 2^bits) that scatters consecutive j: a new pool chunk hands out its regions
// in this order rather than by address. Why: a hit's hot line is the first of its region's two,
// and regions made one after another and then used in a pattern (every other one by each of two
// threads, in the comparison benchmark) would otherwise put one thread's hot lines every 256
// bytes, on a quarter of a set-associative cache's sets instead of half: at 10,000 regions one
// thread's 5,000 every-other regions took 13 ns a hit against 9.5 for 5,000 contiguous ones.
// Two rounds of multiply (by an odd constant: a bijection modulo 2^bits) and xor-shift (a
// bijection on bits-bit values), so that every bit of j reaches the low bits of the result.
inline size_t ScatterIndex(size_t j, int bits) {
  const size_t mask = (size_t{1} << bits) - 1;
  const int shift = (bits + 1) / 2;
  j = (j * 0x9E3779B97F4A7C15ull) & mask;
  j ^= j >> shift;
  j = (j * 0xBF58476D1CE4E5B9ull) & mask;
  j ^= j >> shift;
  return j;
}

// state: bits 63..32 incarnation, bit 31 dead, bit 30 invalidated, bits 29..0 counted references
// (references held by hazard slots are not counted here: internal/hazard.h).
inline constexpr uint64_t kRefMask = (uint64_t{1} << 30) - 1;
inline constexpr uint64_t kInvalidatedBit = uint64_t{1} << 30;
inline constexpr uint64_t kDeadBit = uint64_t{1} << 31;
inline constexpr int kIncarnationShift = 32;

struct alignas(64) Region {
  // Changed by atomic read-modify-write only, except at birth. An incarnation is born alive with 1
  // reference; once dead it never comes back (a recycled Region starts a new incarnation).
  std::atomic<uint64_t> state{0};
  // Fixed for an incarnation; stored (relaxed) before the release store that publishes it.
  std::atomic<uintptr_t> start{0};
  std::atomic<uintptr_t> end{0};
  std::atomic<uint32_t> access{0};
  // Time of the last release (LruNow(), in NowTicks() units); relaxed.
  std::atomic<uint64_t> last_use{0};
  // Written before publication; read only by holders of a reference or by the owner of a dead
  // region (the reclaimer).
  Registration reg;
  uint64_t cost_ticks = 0;     // what registering it cost, for the cost-aware policy
  uint64_t created_ticks = 0;  // when it was registered, for RegistrationCache::Regions
  bool watched = false;        // userfaultfd watches its range: Unwatch it on deregistration
  // Guarded by the cache lock.
  IntervalTree<Region*>::Handle node = nullptr;
  // Guarded by the pool lock (by the cache lock while on the lock holder's own free list).
  Region* next_free = nullptr;
};

}  // namespace sanreg::internal

#endif  // SANREG_REGCACHE_INTERNAL_REGION_H_
