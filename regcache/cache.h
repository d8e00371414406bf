// cache.h: RegistrationCache, the pin-down cache of memory registrations.
//
// A user asks for [addr, addr + len) with some Access rights and gets a RegionRef: a reference to a
// registered region that covers the range. Dropping the last reference leaves the region registered
// and idle (lazy deregistration); a later Acquire of a covered range is a hit and costs no
// registration. Idle regions leave when a limit needs room (eviction) or when the memory behind
// them changes (Invalidate). Deregistration happens off the caller's thread, on a reclaimer thread,
// in batches (within about 1.2 ms of the region's death; see ReclaimerLoop); Flush() drains it.
//
// Thread-safety: every method may be called from any thread, concurrently. A RegionRef may be
// dropped on any thread.
//
// The hit path (no lock, no locked instruction, no shared write):
//   A lookup table of buckets, each of 4 slots {page key, Region*} in one cache line, maps the
//   page of a looked-up address to the region last found for it; it keeps at least two buckets
//   per live region (cache.cc, kBucketsPerRegion: lines shared by two threads' keys slow both).
//   Acquire hashes the page, and for each slot whose key matches: prefetches the region's first
//   line for writing; publishes the region in a free hazard slot of its thread
//   (internal/hazard.h: a plain store); loads region->state (acquire); skips it if dead; checks
//   the region's [start, end) covers the request and its rights cover the asked ones. The region
//   is then held by the hazard: the reclaimer, before it deregisters dead regions, passes a
//   process-wide memory barrier (membarrier) and reads the hazard slots, so either a hit saw the
//   region dead or the reclaimer sees its hazard. The RegionRef names the
//   slot; dropping it is a store of null (and of the LRU stamp into the region's line).
//   When the thread has no free hazard slot (it holds 6 references already) or hazards are off
//   (Options::hazard_references, or no membarrier), the hit takes a counted reference instead: a
//   CAS on state that succeeds only if state is unchanged, which validates everything read before
//   it (an incarnation's range and rights never change, and any kill or recycle changes state).
//   Slots are hints only; a torn {key, Region*} pair, a slot naming a dead or recycled region, or
//   a zeroed slot of a retired table costs a slow path, never a wrong answer. Everything else
//   (table fills, tree changes, kills, evictions) happens under the cache lock.
//
// Invariants:
//   1. A region is in the interval tree iff its state is alive. Only the lock holder kills a region
//      (Invalidate, eviction, merge), and it removes it from the tree in the same critical section.
//   2. No Acquire that starts after Invalidate(a, n) returns can return a region overlapping
//      [a, a + n): every such region is dead before Invalidate returns, and a dead region cannot be
//      referenced again (a hit that reads its state sees it dead; a CAS racing the kill fails).
//   3. A dead region is deregistered exactly once, when no reference holds it. Counted references:
//      whoever sees it dead with 0 of them queues it for the reclaimer, the killer if it had none,
//      else the RegionRef that drops the last one (both decide on the value of one atomic
//      read-modify-write, so exactly one of them does). Hazard references: the reclaimer passes the
//      memory barrier and reads the hazard slots before it deregisters, and defers a region a slot
//      still names (looking again when a RegionRef drops a hazard on a dead region, at every Flush,
//      and at least every 100 ms).
//   3a. Eviction takes only regions no reference holds: none counted, none in a hazard slot the
//      lock holder can see, and it kills the region with a CAS that fails if a counted reference
//      came meanwhile. It passes no barrier (one costs microseconds, every eviction would pay it),
//      so a hit racing the eviction of the very region it hits can still take it, as a hit racing
//      an Invalidate can: the region is then out of the index, and deregistered when that hit
//      drops it (invariant 3), and the cache holds one region more than its limits meanwhile.
//   4. Region objects live in a type-stable pool until the cache is destroyed; recycling starts a
//      new incarnation (state's high 32 bits), so no CAS can succeed on a stale reading (ABA).
//   5. pinned_bytes counts what the registrar holds registered for this cache, including regions
//      waiting for the reclaimer; the limits count regions in the tree (those a lookup can find).
//
// Limits: max_regions and max_pinned_bytes bound the regions in the index. A miss that would exceed
// one evicts idle regions (Options::eviction picks which); a registrar kResourceExhausted evicts
// idle regions, drains the reclaimer and retries once; when nothing idle is left the miss fails
// with kResourceExhausted. Nothing blocks waiting for a reference to be dropped.
//
// Merging (Options::merge): a miss replaces the regions overlapping the request whose rights the
// request covers by one region spanning all of them, registered with the requested rights.
//
// Registration happens under the cache lock (misses are serialised; hits never wait for them).

#ifndef SANREG_REGCACHE_CACHE_H_
#define SANREG_REGCACHE_CACHE_H_

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "regcache/internal/hazard.h"
#include "regcache/internal/mapped_array.h"
#include "regcache/internal/region.h"
#include "regcache/interval_tree.h"
#include "regcache/memory_events.h"
#include "regcache/memory_monitor.h"
#include "regcache/registrar.h"

namespace sanreg {

class RegistrationCache;

enum class EvictionPolicy {
  kLru,        // the idle region released longest ago
  kCostAware,  // LRU, with each region's registration cost (scaled by cost_weight) added to its
               // last-use time: a region that was expensive to register is kept longer
};

struct CacheStats {
  static constexpr int kLatencyBuckets = 32;

  uint64_t hits = 0;
  uint64_t locked_hits = 0;  // of hits: served under the cache lock (the lookup table had no slot)
  uint64_t misses_absent = 0;       // no region covered the range
  uint64_t misses_rights = 0;       // a region covered it, without the rights asked for
  uint64_t misses_invalidated = 0;  // the region found for it had been invalidated
  uint64_t registrations = 0;
  uint64_t registration_failures = 0;
  uint64_t deregistrations = 0;
  uint64_t deregistration_failures = 0;
  uint64_t evictions = 0;
  uint64_t invalidations = 0;           // regions dropped by Invalidate
  uint64_t merges = 0;                  // regions absorbed into a merged one
  uint64_t memory_events = 0;           // ranges from memory events drained (each may drop regions)
  uint64_t memory_event_overflows = 0;  // events that widened a range of a full queue
  uint64_t stale_hits = 0;              // verification mode: hits whose pages had changed (a bug)
  uint64_t uncached_registrations = 0;  // handed out uncached: no source could watch the range
  bool monitor_hooks = false;           // memory-event sources in use
  bool monitor_uffd = false;
  std::string monitor_notes;  // why a requested source is not in use
  uint64_t regions = 0;       // regions in the index now
  uint64_t pinned_bytes = 0;  // registered bytes now (including regions awaiting the reclaimer)
  uint64_t pinned_bytes_high_water = 0;
  // registration_latency[i]: registrations that took [2^i, 2^(i+1)) ns (bucket 0 also takes 0).
  std::array<uint64_t, kLatencyBuckets> registration_latency{};

  uint64_t misses() const { return misses_absent + misses_rights + misses_invalidated; }
};

// One registered region, as RegistrationCache::Regions lists it (a snapshot: references change
// with every hit).
struct RegionInfo {
  enum class State : uint32_t {
    kActive = 0,       // in the index, referenced
    kIdle = 1,         // in the index, unreferenced: kept registered, evictable
    kInvalidated = 2,  // dropped by Invalidate or a memory event while referenced; deregistered
                       // on its last release
    kRetired = 3,      // dropped otherwise while referenced (absorbed by a merge, or handed out
                       // uncached); deregistered on its last release
  };
  uintptr_t start = 0;  // page-aligned
  size_t length = 0;
  uint32_t access = 0;  // Access bits
  uint32_t references = 0;
  State state = State::kIdle;
  uint64_t age_ns = 0;   // since it was registered
  uint64_t idle_ns = 0;  // since its last release; 0 while referenced
};

// A counted reference to a cached region. Move-only; dropping it releases the reference.
class RegionRef {
 public:
  RegionRef() = default;
  RegionRef(RegionRef&& other) noexcept
      : cache_(other.cache_), region_(other.region_), hazard_(other.hazard_) {
    other.cache_ = nullptr;
    other.region_ = nullptr;
    other.hazard_ = nullptr;
  }
  RegionRef& operator=(RegionRef&& other) noexcept {
    if (this != &other) {
      Reset();
      cache_ = other.cache_;
      region_ = other.region_;
      hazard_ = other.hazard_;
      other.cache_ = nullptr;
      other.region_ = nullptr;
      other.hazard_ = nullptr;
    }
    return *this;
  }
  RegionRef(const RegionRef&) = delete;
  RegionRef& operator=(const RegionRef&) = delete;
  ~RegionRef() { Reset(); }

  // Drops the reference (if any).
  inline void Reset();

  explicit operator bool() const { return region_ != nullptr; }

  // REQUIRES: *this holds a reference.
  // The registered range (page-aligned; with merging it may be larger than what was asked).
  uintptr_t start() const { return region_->reg.addr; }
  size_t length() const { return region_->reg.length; }
  uint32_t access() const { return region_->reg.access; }
  uint64_t local_key() const { return region_->reg.local_key; }
  uint64_t remote_key() const { return region_->reg.remote_key; }
  const Registration& registration() const { return region_->reg; }

 private:
  friend class RegistrationCache;
  // A counted reference (hazard null), or one held by a hazard slot.
  RegionRef(RegistrationCache* cache, internal::Region* region,
            internal::HazardSlot* hazard = nullptr)
      : cache_(cache), region_(region), hazard_(hazard) {}

  RegistrationCache* cache_ = nullptr;
  internal::Region* region_ = nullptr;
  internal::HazardSlot* hazard_ = nullptr;
};

class RegistrationCache {
 public:
  struct Options {
    size_t max_regions = 0;       // 0: unlimited
    size_t max_pinned_bytes = 0;  // 0: unlimited
    size_t alignment = 0;         // 0: the page size; else a power of two >= the page size
    bool merge = true;
    EvictionPolicy eviction = EvictionPolicy::kLru;
    uint32_t cost_weight = 16;     // kCostAware: ticks of life per tick of registration cost
    size_t lookup_buckets = 1024;  // initial lookup-table buckets; grows with the regions
    bool reclaimer_thread = true;  // false: deregister only in Flush (tests)
    // Where memory events come from (memory_monitor.h).
    MemoryMonitorMode memory_monitor = MemoryMonitorMode::kAuto;
    // Verification mode: every hit asks the registrar to check the region's pages (slow; tests).
    bool verify_pages = false;
    // Publish Stats() in this process's shared-memory segment for sanreg_stat (stats_segment.h).
    bool publish_stats = true;
    // Hits hold regions by hazard slots, with no locked instruction (see "The hit path"); false:
    // every reference is counted. Off by itself where membarrier(2) is not available.
    bool hazard_references = true;

    // Applies the SANREG_CACHE_* environment overrides (see cache.cc for the table).
    // Returns kInvalidArgument naming the variable when one does not parse.
    absl::Status ApplyEnvironment();
  };

  // Creates a cache registering through `registrar`.
  // REQUIRES: registrar outlives the cache.
  // Returns kInvalidArgument for bad options.
  static absl::StatusOr<std::unique_ptr<RegistrationCache>> Create(Registrar* registrar,
                                                                   const Options& options);

  // REQUIRES: no RegionRef of this cache is still held. Deregisters every region.
  ~RegistrationCache();

  RegistrationCache(const RegistrationCache&) = delete;
  RegistrationCache& operator=(const RegistrationCache&) = delete;

  // Returns a reference to a registered region covering [addr, addr + len) with at least `access`.
  // Errors: kInvalidArgument (len 0, the range wraps, unknown or no access bits; nothing is
  // registered); kResourceExhausted (a limit is reached and nothing idle can be evicted, or the
  // registrar is out of resources after one eviction and retry); the registrar's other errors.
  absl::StatusOr<RegionRef> Acquire(const void* addr, size_t len, uint32_t access) {
    return Acquire(reinterpret_cast<uintptr_t>(addr), len, access);
  }
  absl::StatusOr<RegionRef> Acquire(uintptr_t addr, size_t len, uint32_t access);

  // Drops every region overlapping [addr, addr + len) from the index before returning: idle ones
  // are queued for deregistration, in-use ones are deregistered when their last RegionRef goes.
  // Returns the number of regions dropped, or kInvalidArgument (len 0 or wrapping).
  absl::StatusOr<size_t> Invalidate(const void* addr, size_t len) {
    return Invalidate(reinterpret_cast<uintptr_t>(addr), len);
  }
  absl::StatusOr<size_t> Invalidate(uintptr_t addr, size_t len);

  // Makes every memory change made before the call take effect (waits for userfaultfd events to
  // arrive, drains the event queue), then deregisters everything waiting for the reclaimer, on this
  // thread, and waits for the reclaimer's batch in progress. After it returns, every region dead
  // before the call is deregistered.
  void Flush();

  CacheStats Stats() const;

  // Lists the cache's regions into *out (cleared first), at most `max` of them: those in the index
  // by address, then those dropped from it but still referenced. Returns how many there are in
  // all (more than out->size() when some were left out). Regions awaiting deregistration are not
  // listed. Holds the cache lock while it walks the index and the region pool, so misses wait:
  // for diagnostics (sanreg_stat --regions), not for a hot path.
  size_t Regions(size_t max, std::vector<RegionInfo>* out) const;

  const Options& options() const { return options_; }

 private:
  friend class RegionRef;
  using Region = internal::Region;
  using Tree = IntervalTree<Region*>;

  struct Slot {
    std::atomic<uint64_t> key{~uint64_t{0}};
    std::atomic<Region*> region{nullptr};
  };
  struct alignas(64) Bucket {
    Slot slots[4];
  };
  // Grows by doubling (MaybeGrowTable) and carries the old table's slots over. A retired table
  // stays mapped, since lookups may still be in it, with its pages discarded (it reads as zeros).
  struct Table {
    explicit Table(int bits);
    int bits;
    internal::MappedArray<Bucket> buckets;  // huge pages when large (mapped_array.h)
  };
  struct HeapEntry {
    uint64_t key;
    Region* region;
    uint32_t incarnation;
  };
  struct alignas(64) Counter {
    std::atomic<uint64_t> value{0};
  };
  // Hit counters: one per thread slot; a thread owns its slot while it lives and counts with a
  // plain load and store (no locked instruction on the hit path). The last slot is shared by the
  // threads that found none free, with an atomic add.
  static constexpr int kCounterShards = 64;

  enum class MissHint { kNone, kInvalidated };

  RegistrationCache(Registrar* registrar, const Options& options);

  absl::StatusOr<RegionRef> VerifiedHit(Region* r, internal::HazardSlot* hazard);
  // On a hit, returns the region and sets *hazard to the slot that holds it (null: counted).
  Region* TryAcquireFast(uintptr_t a, uintptr_t b, uint32_t access, MissHint* hint,
                         internal::HazardSlot** hazard) const;
  absl::StatusOr<RegionRef> AcquireSlow(uintptr_t a, uintptr_t b, uint32_t access, MissHint hint);
  // Called by RegionRef when it dropped the last reference of a dead region.
  void Retire(Region* r);
  // Called by RegionRef when it dropped a hazard on a region it saw dead: the reclaimer looks at
  // the regions it deferred again.
  void HazardDropped();

  // All below: REQUIRES mu_ held.
  // Invalidates the ranges memory events queued. Returns the regions dropped.
  void DrainMemoryEventsLocked();
  // Returns whether userfaultfd now watches the range.
  bool WatchBeforePinning(uintptr_t start, size_t len);
  size_t InvalidateLocked(uintptr_t start, uintptr_t end);
  void FillSlot(uintptr_t page, Region* r);
  // Marks r dead and removes it from the index. Returns true when it had no reference, so the
  // caller must Retire it (else its last RegionRef will).
  [[nodiscard]] bool Kill(Region* r, bool invalidated);
  bool EvictOne();
  absl::Status MakeRoom(size_t bytes);
  uint64_t Priority(const Region* r, uint64_t last_use) const;
  void PushHeap(Region* r, uint64_t key);
  void MaybeCompactHeap();
  void MaybeGrowTable();
  Region* AllocRegion();
  // Regions in pool_[i]: a power of two.
  static size_t PoolChunkSize(size_t i);

  // Queues dead, unreferenced regions for deregistration; wakes the reclaimer if it sleeps.
  template <typename Range>
  void RetireAll(const Range& regions);
  void ReclaimerLoop();
  // Flush without draining memory events: callable with mu_ held.
  void FlushReclaimer();
  void DeregisterBatch(std::vector<Region*>& batch);
  // Moves the regions of *batch that a hazard slot names to deferred_ (passes the barrier first).
  // REQUIRES: reclaim_mu_ not held.
  void DeferHazarded(std::vector<Region*>* batch);
  // Takes everything queued for deregistration and deregisters it with reclaim_mu_ released.
  // REQUIRES: `lock` holds reclaim_mu_; it holds it again on return.
  void DeregisterQueued(std::unique_lock<std::mutex>& lock, std::vector<Region*>& batch);
  void CountHit() const;

  Registrar* const registrar_;
  const Options options_;
  const int page_shift_;
  const uintptr_t align_mask_;
  const double ns_per_tick_ = internal::NsPerTick();
  const bool hazards_;  // options_.hazard_references && internal::HazardsEnabled()

  std::atomic<Table*> table_;
  InvalidationQueue events_;  // memory events for this cache (memory_events.h)
  MemoryMonitorStatus monitor_;
  bool subscribed_ = false;

  mutable std::mutex mu_;
  Tree tree_;                                   // guarded by mu_
  std::vector<HeapEntry> heap_;                 // min-heap on key, guarded by mu_
  std::vector<std::unique_ptr<Table>> tables_;  // current and retired, guarded by mu_
  uint32_t fill_clock_ = 0;                     // guarded by mu_
  size_t live_regions_ = 0;                     // guarded by mu_
  size_t live_bytes_ = 0;                       // guarded by mu_
  CacheStats slow_stats_;  // misses, registrations, evictions...; guarded by mu_

  mutable std::array<Counter, kCounterShards> hits_;
  std::atomic<uint64_t> pinned_bytes_{0};
  std::atomic<uint64_t> deregistrations_{0};
  std::atomic<uint64_t> deregistration_failures_{0};
  std::atomic<uint64_t> stale_hits_{0};

  mutable std::mutex pool_mu_;  // taken after mu_ where both are held
  // Guarded by pool_mu_; PoolChunkSize(i) each, huge pages when large (mapped_array.h).
  std::vector<internal::MappedArray<Region>> pool_;
  Region* free_ = nullptr;        // guarded by pool_mu_
  Region* local_free_ = nullptr;  // free regions taken from free_ by AllocRegion; guarded by mu_

  std::mutex reclaim_mu_;
  std::condition_variable reclaim_cv_;
  std::vector<Region*> reclaim_;  // dead, unreferenced, awaiting deregistration; reclaim_mu_
  // Dead, no counted reference, but a hazard slot named them at the reclaimer's last look; moved
  // back to reclaim_ at the next one. Guarded by reclaim_mu_.
  std::vector<Region*> deferred_;
  bool deferred_recheck_ = false;  // a hazard on a dead region was dropped; reclaim_mu_
  // When the reclaimer looks at deferred_ again, and the wait after that (doubles while regions
  // stay held, from kRecheck to kMaxRecheck). Guarded by reclaim_mu_.
  static constexpr std::chrono::microseconds kRecheck{1000};
  static constexpr std::chrono::microseconds kMaxRecheck{100'000};
  std::chrono::microseconds recheck_ = kRecheck;
  std::chrono::steady_clock::time_point recheck_at_;
  int reclaim_busy_ = 0;  // batches being deregistered; guarded by reclaim_mu_
  enum class ReclaimerState { kAwake, kLingering, kSleeping };
  static constexpr size_t kReclaimBatch = 1024;
  ReclaimerState reclaimer_state_ = ReclaimerState::kAwake;  // guarded by reclaim_mu_
  int flush_waiters_ = 0;                                    // guarded by reclaim_mu_
  bool stop_ = false;                                        // guarded by reclaim_mu_
  std::thread reclaimer_;
  int stats_slot_ = -1;  // Publish()'s id, -1 when not published
};

inline void RegionRef::Reset() {
  if (region_ == nullptr) return;
  internal::Region* r = region_;
  region_ = nullptr;
  r->last_use.store(internal::LruNow(), std::memory_order_relaxed);
  if (hazard_ != nullptr) {
    // Read while the hazard still holds the region (after it, r may be recycled).
    const bool dead = (r->state.load(std::memory_order_relaxed) & internal::kDeadBit) != 0;
    internal::HazardClear(hazard_);
    hazard_ = nullptr;
    if (dead) cache_->HazardDropped();
  } else {
    uint64_t s = r->state.fetch_sub(1, std::memory_order_acq_rel) - 1;
    if ((s & internal::kRefMask) == 0 && (s & internal::kDeadBit)) cache_->Retire(r);
  }
  cache_ = nullptr;
}

}  // namespace sanreg

#endif  // SANREG_REGCACHE_CACHE_H_
