// internal/region.h: one cached registration, as RegistrationCache and RegionRef see it. Not API.
//
// A Region lives in the cache's type-stable pool: its memory is never freed while the cache lives,
// only recycled, so a lock-free reader may dereference a stale pointer to it and must then validate
// what it reads through `state` (see cache.h, "The hit path").

#ifndef SANREG_REGCACHE_INTERNAL_REGION_H_
#define SANREG_REGCACHE_INTERNAL_REGION_H_

#include <atomic>
#include <chrono>
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

// state: bits 63..32 incarnation, bit 31 dead, bit 30 invalidated, bits 29..0 references.
inline constexpr uint64_t kRefMask = (uint64_t{1} << 30) - 1;
inline constexpr uint64_t kInvalidatedBit = uint64_t{1} << 30;
inline constexpr uint64_t kDeadBit = uint64_t{1} << 31;
inline constexpr int kIncarnationShift = 32;

struct alignas(64) Region {
  // Changed by atomic read-modify-write only. An incarnation is born alive with 1 reference; once
  // dead it never comes back (a recycled Region starts a new incarnation).
  std::atomic<uint64_t> state{0};
  // Fixed for an incarnation; stored (relaxed) before the release store that publishes it.
  std::atomic<uintptr_t> start{0};
  std::atomic<uintptr_t> end{0};
  std::atomic<uint32_t> access{0};
  // Time of the last release (the LRU clock); relaxed.
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
