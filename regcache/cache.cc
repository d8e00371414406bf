#include "regcache/cache.h"

#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <string>
#include <utility>

#include "absl/base/attributes.h"
#include "absl/base/optimization.h"
#include "absl/container/inlined_vector.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "regcache/stats_segment.h"
#include "regcache/uffd_monitor.h"

namespace sanreg {

using internal::HazardSlot;
using internal::kDeadBit;
using internal::kIncarnationShift;
using internal::kInvalidatedBit;
using internal::kRefMask;
using internal::NowTicks;

double internal::NsPerTick() {
  static const double ns_per_tick = [] {
    auto t0 = std::chrono::steady_clock::now();
    uint64_t k0 = NowTicks();
    std::chrono::steady_clock::time_point t1;
    do {
      t1 = std::chrono::steady_clock::now();
    } while (t1 - t0 < std::chrono::microseconds(100));
    uint64_t k1 = NowTicks();
    double ns = std::chrono::duration<double, std::nano>(t1 - t0).count();
    return k1 > k0 ? ns / static_cast<double>(k1 - k0) : 1.0;
  }();
  return ns_per_tick;
}

namespace {

constexpr int kMaxTableBits = 20;  // 2^20 buckets of 4 slots: 64 MiB, 4 million slots
// The table doubles whenever it has fewer than this many buckets per live region. Why two, not
// one: a bucket is one cache line, and a line that holds keys of two threads slows both threads'
// hits (measured, not understood further: the lines are only read on a hit). At 10,000 regions,
// each of two threads hitting every other one, one bucket per region put keys of both threads in
// 30% of each thread's bucket lines (the Fibonacci hash of evenly spaced buffers; 26% for keys
// placed at random), and two threads took 8.1-8.4 ns per hit; with two buckets per region, no line
// shared and 5.2-5.7 ns; with half a bucket per region, 60% shared and 10.5-10.9 ns. One thread
// took 14-16 ns in all three (docs/PERFORMANCE.md, target 2). The cost: the table is 128-256 bytes
// per live region instead of 64-128, until the cap.
constexpr size_t kBucketsPerRegion = 2;

uint32_t Incarnation(uint64_t state) { return static_cast<uint32_t>(state >> kIncarnationShift); }

size_t BucketIndex(uint64_t page, int bits) {
  return static_cast<size_t>((page * 0x9E3779B97F4A7C15ull) >> (64 - bits));
}

// A hit-counter slot this thread owns alone while it lives, or the shared last slot.
class ThreadSlot {
 public:
  static constexpr int kShared = 63;
  ThreadSlot() {
    std::lock_guard<std::mutex> lock(Mu());
    for (int i = 0; i < kShared; ++i) {
      if (!Used()[i]) {
        Used()[i] = true;
        index_ = i;
        return;
      }
    }
  }
  ~ThreadSlot() {
    if (index_ == kShared) return;
    std::lock_guard<std::mutex> lock(Mu());
    Used()[index_] = false;
  }
  int index() const { return index_; }

 private:
  static std::mutex& Mu() {
    static auto* mu = new std::mutex;
    return *mu;
  }
  static bool* Used() {
    static auto* used = new bool[kShared]();
    return used;
  }
  int index_ = kShared;
};

int ThreadSlotIndex() {
  thread_local ThreadSlot slot;
  return slot.index();
}

// ThreadSlotIndex() of this thread once known, else -1. A constant-initialized thread_local: read
// with no guard and no call on the hit path (the ThreadSlot above needs both).
thread_local int hit_slot = -1;

int LatencyBucket(uint64_t ns) {
  int b = ns == 0 ? 0 : 63 - std::countl_zero(ns);
  return std::min(b, CacheStats::kLatencyBuckets - 1);
}

// The environment overrides of RegistrationCache::Options, in one table.
struct EnvOverride {
  const char* name;
  const char* help;
  std::function<bool(const std::string&, RegistrationCache::Options*)> apply;
};

bool ParseSize(const std::string& v, size_t* out) {
  uint64_t x;
  if (!absl::SimpleAtoi(v, &x)) return false;
  *out = static_cast<size_t>(x);
  return true;
}

const std::vector<EnvOverride>& EnvOverrides() {
  static const auto* table = new std::vector<EnvOverride>{
      {"SANREG_CACHE_MAX_REGIONS", "max regions in the cache, 0 for no limit",
       [](const std::string& v, RegistrationCache::Options* o) {
         return ParseSize(v, &o->max_regions);
       }},
      {"SANREG_CACHE_MAX_BYTES", "max pinned bytes in the cache, 0 for no limit",
       [](const std::string& v, RegistrationCache::Options* o) {
         return ParseSize(v, &o->max_pinned_bytes);
       }},
      {"SANREG_CACHE_MERGE", "0 or 1: merge overlapping regions",
       [](const std::string& v, RegistrationCache::Options* o) {
         if (v != "0" && v != "1") return false;
         o->merge = v == "1";
         return true;
       }},
      {"SANREG_MEMORY_MONITOR", "auto, hooks, uffd or none",
       [](const std::string& v, RegistrationCache::Options* o) {
         auto m = ParseMemoryMonitorMode(v);
         if (m.ok()) o->memory_monitor = *m;
         return m.ok();
       }},
      {"SANREG_CACHE_STATS", "0 or 1 (publish for sanreg_stat)",
       [](const std::string& v, RegistrationCache::Options* o) {
         if (v != "0" && v != "1") return false;
         o->publish_stats = v == "1";
         return true;
       }},
      {"SANREG_CACHE_HAZARDS", "0 or 1: hits hold regions by hazard slots",
       [](const std::string& v, RegistrationCache::Options* o) {
         if (v != "0" && v != "1") return false;
         o->hazard_references = v == "1";
         return true;
       }},
      {"SANREG_CACHE_EVICTION", "lru or cost",
       [](const std::string& v, RegistrationCache::Options* o) {
         if (v == "lru") {
           o->eviction = EvictionPolicy::kLru;
         } else if (v == "cost") {
           o->eviction = EvictionPolicy::kCostAware;
         } else {
           return false;
         }
         return true;
       }},
  };
  return *table;
}

}  // namespace

absl::Status RegistrationCache::Options::ApplyEnvironment() {
  for (const EnvOverride& e : EnvOverrides()) {
    const char* v = std::getenv(e.name);
    if (v == nullptr) continue;
    if (!e.apply(v, this)) {
      return absl::InvalidArgumentError(
          absl::StrCat(e.name, "=\"", v, "\" does not parse: expected ", e.help));
    }
  }
  return absl::OkStatus();
}

RegistrationCache::Table::Table(int b)
    : bits(b), buckets(internal::NewMappedArray<Bucket>(size_t{1} << b)) {}

absl::StatusOr<std::unique_ptr<RegistrationCache>> RegistrationCache::Create(
    Registrar* registrar, const Options& options) {
  if (registrar == nullptr) return absl::InvalidArgumentError("registrar is null");
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  if (options.alignment != 0 &&
      (!std::has_single_bit(options.alignment) || options.alignment < page)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "alignment ", options.alignment, " is not a power of two >= the page size ", page));
  }
  if (options.lookup_buckets == 0) return absl::InvalidArgumentError("lookup_buckets is 0");
  return std::unique_ptr<RegistrationCache>(new RegistrationCache(registrar, options));
}

RegistrationCache::RegistrationCache(Registrar* registrar, const Options& options)
    : registrar_(registrar),
      options_(options),
      page_shift_(std::countr_zero(static_cast<size_t>(sysconf(_SC_PAGESIZE)))),
      align_mask_((options.alignment ? options.alignment : size_t{1} << page_shift_) - 1),
      hazards_(options.hazard_references && internal::HazardsEnabled()) {
  int bits =
      std::clamp(static_cast<int>(std::bit_width(options.lookup_buckets - 1)), 4, kMaxTableBits);
  tables_.push_back(std::make_unique<Table>(bits));
  table_.store(tables_.back().get(), std::memory_order_release);
  monitor_ = StartMemoryMonitor(options_.memory_monitor);
  if (monitor_.hooks || monitor_.uffd != nullptr) {
    uint32_t sources = 0;
    if (monitor_.hooks) sources |= 1u << static_cast<int>(MemoryEventSource::kHooks);
    if (monitor_.uffd != nullptr) sources |= 1u << static_cast<int>(MemoryEventSource::kUffd);
    subscribed_ = SubscribeMemoryEvents(&events_, sources);
    if (!subscribed_) {
      monitor_.notes += "too many caches subscribed to memory events; ";
      monitor_.hooks = false;
      monitor_.uffd = nullptr;
    }
  }
  if (options_.reclaimer_thread) reclaimer_ = std::thread([this] { ReclaimerLoop(); });
  // sanreg_stat: publish this cache's statistics, and its regions when asked (best effort; -1 when
  // the segment is unavailable).
  if (options_.publish_stats) {
    static std::atomic<uint64_t> next_id{1};
    stats_slot_ = Publish(
        next_id.fetch_add(1), [this] { return Stats(); },
        [this](size_t max, std::vector<RegionInfo>* out) { return Regions(max, out); });
  }
}

RegistrationCache::~RegistrationCache() {
  Unpublish(stats_slot_);  // no Stats() call on this cache after it returns
  if (subscribed_) UnsubscribeMemoryEvents(&events_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<Region*> all;
    tree_.VisitOverlapping(0, ~uintptr_t{0},
                           [&](Tree::Handle h) { all.push_back(Tree::Value(h)); });
    for (Region* r : all) {
      if (Kill(r, /*invalidated=*/false)) Retire(r);
    }
  }
  {
    std::lock_guard<std::mutex> lock(reclaim_mu_);
    stop_ = true;
  }
  reclaim_cv_.notify_all();
  if (reclaimer_.joinable()) reclaimer_.join();
  Flush();
}

static_assert(ThreadSlot::kShared == 63, "one hit counter per thread slot");

ABSL_ATTRIBUTE_ALWAYS_INLINE inline void RegistrationCache::CountHit() const {
  int slot = hit_slot;
  if (ABSL_PREDICT_FALSE(slot < 0)) slot = hit_slot = ThreadSlotIndex();
  std::atomic<uint64_t>& c = hits_[slot].value;
  if (slot == ThreadSlot::kShared) {
    c.fetch_add(1, std::memory_order_relaxed);
  } else {
    c.store(c.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  }
}

ABSL_ATTRIBUTE_ALWAYS_INLINE inline RegistrationCache::Region* RegistrationCache::TryAcquireFast(
    uintptr_t a, uintptr_t b, uint32_t access, MissHint* hint, HazardSlot** hazard) const {
  const Table* t = table_.load(std::memory_order_acquire);
  const uint64_t page = a >> page_shift_;
  const Bucket& bucket = t->buckets[BucketIndex(page, t->bits)];
  for (const Slot& slot : bucket.slots) {
    if (slot.key.load(std::memory_order_relaxed) != page) continue;
    Region* r = slot.region.load(std::memory_order_acquire);
    if (r == nullptr) continue;
#if defined(__x86_64__)
    // The hit writes this line (the LRU stamp on release, and the CAS of a counted reference):
    // fetch it for writing now, in one coherence transaction, rather than shared by the load and
    // then again for ownership by the write. It matters when another core holds a copy, as a
    // neighbouring region's user's prefetcher may (docs/PERFORMANCE.md, target 2). A no-op where
    // the CPU lacks PREFETCHW.
    asm volatile("prefetchw %0" : : "m"(*reinterpret_cast<const char*>(r)));
#endif
    // Held by a hazard slot when one is free (internal/hazard.h): published before state is read.
    HazardSlot* h = hazards_ ? internal::FreeHazardSlot() : nullptr;
    if (h != nullptr) internal::HazardSet(h, r);
    uint64_t s = r->state.load(std::memory_order_acquire);
    if ((s & kDeadBit) != 0 || r->start.load(std::memory_order_relaxed) > a ||
        r->end.load(std::memory_order_relaxed) < b ||
        !AccessCovers(r->access.load(std::memory_order_relaxed), access)) {
      if (h != nullptr) internal::HazardClear(h);
      if ((s & kDeadBit) && (s & kInvalidatedBit)) *hint = MissHint::kInvalidated;
      continue;
    }
    if (h != nullptr) {
      // Alive after the hazard was published: it is not deregistered, so not recycled, while the
      // slot names it, and its range and rights, read above, are those of this incarnation.
      *hazard = h;
      return r;
    }
    const uint32_t inc = Incarnation(s);
    // The CAS validates the reads above: it succeeds only if state did not change since.
    while ((s & kDeadBit) == 0 && (s & kRefMask) != kRefMask && Incarnation(s) == inc) {
      if (r->state.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel,
                                         std::memory_order_acquire)) {
        *hazard = nullptr;
        return r;
      }
    }
  }
  return nullptr;
}

absl::StatusOr<RegionRef> RegistrationCache::Acquire(uintptr_t addr, size_t len, uint32_t access) {
  if (len == 0) return absl::InvalidArgumentError("Acquire: length is 0");
  if (!AccessValid(access)) {
    return absl::InvalidArgumentError(
        absl::StrCat("Acquire: bad access bits 0x", absl::Hex(access)));
  }
  const uintptr_t end = addr + len;
  if (end < addr || end + align_mask_ < end) {
    return absl::InvalidArgumentError("Acquire: range wraps around the address space");
  }
  MissHint hint = MissHint::kNone;
  // While a memory event is pending, every lookup takes the slow path, which drains it first.
  if (events_.pending() == 0) {
    HazardSlot* hazard = nullptr;
    if (Region* r = TryAcquireFast(addr, end, access, &hint, &hazard)) {
      if (options_.verify_pages) return VerifiedHit(r, hazard);
      CountHit();
      return RegionRef(this, r, hazard);
    }
  }
  return AcquireSlow(addr, end, access, hint);
}

absl::StatusOr<RegionRef> RegistrationCache::AcquireSlow(uintptr_t a, uintptr_t b, uint32_t access,
                                                         MissHint hint) {
  std::unique_lock<std::mutex> lock(mu_);
  DrainMemoryEventsLocked();
  // A covering region with the rights: a hit the lookup table did not know of.
  bool covered_without_rights = false;
  Tree::Handle h = tree_.FindCovering(a, b, [&](Region* r, uintptr_t, uintptr_t) {
    if (AccessCovers(r->access.load(std::memory_order_relaxed), access)) return true;
    covered_without_rights = true;
    return false;
  });
  if (h != nullptr) {
    Region* r = Tree::Value(h);
    // In the tree means alive (invariant 1), and only the lock holder kills: a plain add is safe.
    uint64_t s = r->state.load(std::memory_order_relaxed);
    if ((s & kRefMask) == kRefMask) {
      return absl::ResourceExhaustedError("Acquire: region reference count is saturated");
    }
    r->state.fetch_add(1, std::memory_order_acq_rel);
    ++slow_stats_.locked_hits;
    FillSlot(a >> page_shift_, r);
    lock.unlock();
    if (options_.verify_pages) return VerifiedHit(r, nullptr);
    CountHit();
    return RegionRef(this, r);
  }

  // A miss: say why.
  if (covered_without_rights) {
    ++slow_stats_.misses_rights;
  } else if (hint == MissHint::kInvalidated) {
    ++slow_stats_.misses_invalidated;
  } else {
    ++slow_stats_.misses_absent;
  }

  uintptr_t start = a & ~align_mask_;
  uintptr_t end = (b + align_mask_) & ~align_mask_;
  if (options_.merge) {
    absl::InlinedVector<Region*, 8> absorb;
    tree_.VisitOverlapping(start, end, [&](Tree::Handle n) {
      Region* r = Tree::Value(n);
      if (AccessCovers(access, r->access.load(std::memory_order_relaxed))) absorb.push_back(r);
    });
    for (Region* r : absorb) {
      start = std::min(start, r->start.load(std::memory_order_relaxed));
      end = std::max(end, r->end.load(std::memory_order_relaxed));
      if (Kill(r, /*invalidated=*/false)) Retire(r);
      ++slow_stats_.merges;
    }
  }
  const size_t len = end - start;

  if (absl::Status room = MakeRoom(len); !room.ok()) {
    ++slow_stats_.registration_failures;
    return room;
  }

  // With userfaultfd as the only source, a range it cannot watch must not be cached: nothing would
  // report its unmapping. Such a registration is handed out uncached (dead from birth).
  const bool watched = monitor_.uffd != nullptr && WatchBeforePinning(start, len);
  const bool cacheable = monitor_.hooks || monitor_.uffd == nullptr || watched;
  uint64_t t0 = NowTicks();
  absl::StatusOr<Registration> reg = registrar_->Register(start, len, access);
  if (!reg.ok() && reg.status().code() == absl::StatusCode::kResourceExhausted) {
    // The registrar ran out (memlock limit, NIC resources): free idle registrations for real,
    // then retry once.
    size_t freed = 0;
    while (freed < len) {
      size_t before = live_bytes_;
      if (!EvictOne()) break;
      freed += before - live_bytes_;
    }
    FlushReclaimer();
    reg = registrar_->Register(start, len, access);
  }
  uint64_t cost = NowTicks() - t0;
  ++slow_stats_.registration_latency[LatencyBucket(
      static_cast<uint64_t>(static_cast<double>(cost) * ns_per_tick_))];
  if (!reg.ok()) {
    if (watched) monitor_.uffd->Unwatch(start, len);
    ++slow_stats_.registration_failures;
    return absl::Status(reg.status().code(),
                        absl::StrCat("registering [0x", absl::Hex(start), ", +", len,
                                     "): ", reg.status().message()));
  }

  Region* r = AllocRegion();
  r->reg = *reg;
  r->cost_ticks = cost;
  r->watched = watched;
  r->start.store(start, std::memory_order_relaxed);
  r->end.store(end, std::memory_order_relaxed);
  r->access.store(access, std::memory_order_relaxed);
  const uint64_t created = NowTicks();
  // This thread's later releases are stamped after the region's birth (internal/region.h).
  internal::AdvanceLruClock(created + 1);
  r->created_ticks = created;
  r->last_use.store(created, std::memory_order_relaxed);
  uint64_t inc = Incarnation(r->state.load(std::memory_order_relaxed)) + 1;
  ++slow_stats_.registrations;
  uint64_t pinned = pinned_bytes_.fetch_add(len, std::memory_order_relaxed) + len;
  slow_stats_.pinned_bytes_high_water = std::max(slow_stats_.pinned_bytes_high_water, pinned);
  if (!cacheable) {
    // Dead from birth: never in the index; deregistered when its one reference goes.
    r->state.store((inc << kIncarnationShift) | kDeadBit | 1, std::memory_order_release);
    r->node = nullptr;
    ++slow_stats_.uncached_registrations;
    return RegionRef(this, r);
  }
  r->state.store((inc << kIncarnationShift) | 1, std::memory_order_release);
  r->node = tree_.Insert(start, end, r);
  ++live_regions_;
  live_bytes_ += len;
  PushHeap(r, Priority(r, created));
  MaybeGrowTable();
  FillSlot(a >> page_shift_, r);
  return RegionRef(this, r);
}

bool RegistrationCache::WatchBeforePinning(uintptr_t start, size_t len) {
  // Watch before the registrar pins: an unmap between pinning and watching would go unreported
  // and leave a stale region. In missing mode, populate first, so that pinning faults no page
  // through the monitor (a watched missing page is served by its reader thread). Both may fail on
  // memory that is not plain anonymous or shared memory; that range is then left to the other
  // sources.
#ifndef MADV_POPULATE_READ
  constexpr int MADV_POPULATE_READ = 22;
  constexpr int MADV_POPULATE_WRITE = 23;
#endif
  if (!monitor_.uffd->write_protect_mode() &&
      syscall(SYS_madvise, start, len, MADV_POPULATE_WRITE) != 0) {
    syscall(SYS_madvise, start, len, MADV_POPULATE_READ);
  }
  return monitor_.uffd->Watch(start, len);
}

absl::Status RegistrationCache::MakeRoom(size_t bytes) {
  const size_t max_r = options_.max_regions;
  const size_t max_b = options_.max_pinned_bytes;
  if (max_b != 0 && bytes > max_b) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "a region of ", bytes, " bytes exceeds the cache's limit of ", max_b, " pinned bytes"));
  }
  while ((max_r != 0 && live_regions_ + 1 > max_r) || (max_b != 0 && live_bytes_ + bytes > max_b)) {
    if (!EvictOne()) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "cache limit reached (", live_regions_, " regions, ", live_bytes_, " bytes; limits ",
          max_r, " regions, ", max_b, " bytes) and every region is in use"));
    }
  }
  return absl::OkStatus();
}

uint64_t RegistrationCache::Priority(const Region* r, uint64_t last_use) const {
  if (options_.eviction == EvictionPolicy::kCostAware) {
    return last_use + r->cost_ticks * options_.cost_weight;
  }
  return last_use;
}

void RegistrationCache::PushHeap(Region* r, uint64_t key) {
  heap_.push_back({key, r, Incarnation(r->state.load(std::memory_order_relaxed))});
  std::push_heap(heap_.begin(), heap_.end(),
                 [](const HeapEntry& x, const HeapEntry& y) { return x.key > y.key; });
  MaybeCompactHeap();
}

void RegistrationCache::MaybeCompactHeap() {
  if (heap_.size() < 2 * live_regions_ + 64) return;
  // Drop entries of regions that died or were recycled since they were pushed.
  std::erase_if(heap_, [](const HeapEntry& e) {
    uint64_t s = e.region->state.load(std::memory_order_relaxed);
    return (s & kDeadBit) || Incarnation(s) != e.incarnation;
  });
  std::make_heap(heap_.begin(), heap_.end(),
                 [](const HeapEntry& x, const HeapEntry& y) { return x.key > y.key; });
}

bool RegistrationCache::EvictOne() {
  auto later = [](const HeapEntry& x, const HeapEntry& y) { return x.key > y.key; };
  // Keys are lower bounds of the regions' priorities (a release only raises last_use), so the
  // first entry popped whose key is current is the minimum: exact LRU without touching the heap
  // on the hit path. Regions in use are set aside, and go back into the heap when this returns.
  // "Now" for their keys is the LRU clock, which no later release stamps below (a precise time
  // could be above the stamp of a release made after it: internal/region.h).
  const uint64_t now = internal::g_lru_clock.load(std::memory_order_relaxed);
  absl::InlinedVector<HeapEntry, 8> aside;
  auto restore = [&] {
    for (const HeapEntry& e : aside) {
      heap_.push_back(e);
      std::push_heap(heap_.begin(), heap_.end(), later);
    }
  };
  size_t budget = 2 * heap_.size() + 16;
  while (!heap_.empty() && budget-- > 0) {
    std::pop_heap(heap_.begin(), heap_.end(), later);
    HeapEntry e = heap_.back();
    heap_.pop_back();
    Region* r = e.region;
    uint64_t s = r->state.load(std::memory_order_acquire);
    if ((s & kDeadBit) || Incarnation(s) != e.incarnation) continue;  // stale entry
    const uint64_t p = Priority(r, r->last_use.load(std::memory_order_relaxed));
    if (p > e.key) {
      heap_.push_back({p, r, e.incarnation});
      std::push_heap(heap_.begin(), heap_.end(), later);
      continue;
    }
    // Held by a counted reference, or by a hazard slot that is visible now (invariant 3a), or
    // taken by a hit since state was read: not evictable.
    const bool in_use =
        (s & kRefMask) != 0 || (hazards_ && internal::HazardNamed(r)) ||
        !r->state.compare_exchange_strong(s, s | kDeadBit, std::memory_order_acq_rel);
    if (in_use) {
      // Not evictable now; it counts as used now.
      aside.push_back({std::max(e.key, Priority(r, now)), r, e.incarnation});
      continue;
    }
    tree_.Erase(r->node);
    r->node = nullptr;
    --live_regions_;
    live_bytes_ -= r->reg.length;
    ++slow_stats_.evictions;
    Retire(r);
    restore();
    return true;
  }
  restore();
  return false;
}

bool RegistrationCache::Kill(Region* r, bool invalidated) {
  uint64_t old =
      r->state.fetch_or(kDeadBit | (invalidated ? kInvalidatedBit : 0), std::memory_order_acq_rel);
  tree_.Erase(r->node);
  r->node = nullptr;
  --live_regions_;
  live_bytes_ -= r->reg.length;
  return (old & kRefMask) == 0;
}

absl::StatusOr<RegionRef> RegistrationCache::VerifiedHit(Region* r, HazardSlot* hazard) {
  RegionRef ref(this, r, hazard);
  absl::Status st = registrar_->VerifyPages(r->reg);
  if (st.ok()) {
    CountHit();
    return ref;
  }
  stale_hits_.fetch_add(1, std::memory_order_relaxed);
  return absl::DataLossError(
      absl::StrCat("verification: a hit returned a stale registration: ", st.message()));
}

void RegistrationCache::DrainMemoryEventsLocked() {
  if (events_.pending() == 0) return;
  InvalidationQueue::Range ranges[InvalidationQueue::kCapacity];
  uint32_t taken = 0;
  int n = events_.Drain(ranges, &taken);
  for (int i = 0; i < n; ++i) InvalidateLocked(ranges[i].start, ranges[i].end);
  slow_stats_.memory_events += n;
  // Only now may lookups take the fast path again (memory_events.h).
  events_.Complete(taken);
}

absl::StatusOr<size_t> RegistrationCache::Invalidate(uintptr_t addr, size_t len) {
  if (len == 0) return absl::InvalidArgumentError("Invalidate: length is 0");
  if (addr + len < addr) return absl::InvalidArgumentError("Invalidate: range wraps around");
  std::lock_guard<std::mutex> lock(mu_);
  return InvalidateLocked(addr, addr + len);
}

size_t RegistrationCache::InvalidateLocked(uintptr_t start, uintptr_t end) {
  std::vector<Region*> hit;
  tree_.VisitOverlapping(start, end, [&](Tree::Handle h) { hit.push_back(Tree::Value(h)); });
  size_t idle = 0;
  for (Region* r : hit) {
    if (Kill(r, /*invalidated=*/true)) hit[idle++] = r;  // in-use ones retire on last release
  }
  slow_stats_.invalidations += hit.size();
  const size_t n = hit.size();
  hit.resize(idle);
  RetireAll(hit);
  return n;
}

void RegistrationCache::FillSlot(uintptr_t page, Region* r) {
  Table* t = table_.load(std::memory_order_relaxed);
  Bucket& bucket = t->buckets[BucketIndex(page, t->bits)];
  Slot* victim = nullptr;
  for (Slot& slot : bucket.slots) {
    if (slot.key.load(std::memory_order_relaxed) == page) {
      victim = &slot;
      break;
    }
    Region* old = slot.region.load(std::memory_order_relaxed);
    if (victim == nullptr &&
        (old == nullptr || (old->state.load(std::memory_order_relaxed) & kDeadBit))) {
      victim = &slot;
    }
  }
  if (victim == nullptr) victim = &bucket.slots[fill_clock_++ & 3];
  victim->key.store(page, std::memory_order_relaxed);
  victim->region.store(r, std::memory_order_release);
}

void RegistrationCache::MaybeGrowTable() {
  Table* t = table_.load(std::memory_order_relaxed);
  if (kBucketsPerRegion * live_regions_ <= (size_t{1} << t->bits) ||
      t->bits >= kMaxTableBits) {
    return;
  }
  // The live slots move into the new table before it is published, so that no hit known to the
  // old table takes the slow path once after the growth. With the hash's top bits as the index,
  // old bucket i splits into new buckets 2i and 2i + 1: a streaming copy that never overflows a
  // bucket. Slots naming dead or recycled regions are copied as they are: slots are hints, and
  // FillSlot reuses those first. Readers may still be in the old table: it stays mapped, but its
  // pages go back to the kernel; a lookup that reads it afterwards reads zeros (a slot without a
  // region, skipped: the slow path).
  auto grown = std::make_unique<Table>(t->bits + 1);
  const size_t n = size_t{1} << t->bits;
  for (size_t i = 0; i < n; ++i) {
    int used[2] = {0, 0};
    for (const Slot& slot : t->buckets[i].slots) {
      Region* r = slot.region.load(std::memory_order_relaxed);
      if (r == nullptr) continue;
      const uint64_t page = slot.key.load(std::memory_order_relaxed);
      const size_t j = BucketIndex(page, grown->bits);
      Slot& to = grown->buckets[j].slots[used[j & 1]++];
      to.key.store(page, std::memory_order_relaxed);
      to.region.store(r, std::memory_order_relaxed);
    }
  }
  tables_.push_back(std::move(grown));
  table_.store(tables_.back().get(), std::memory_order_release);
  internal::DiscardPages(t->buckets);
}

size_t RegistrationCache::PoolChunkSize(size_t i) {
  return i == 0 ? 64 : std::min<size_t>(size_t{64} << std::min<size_t>(i, 16), 65536);
}

RegistrationCache::Region* RegistrationCache::AllocRegion() {
  // A miss takes from the lock holder's own list and takes pool_mu_ only to refill it, with
  // everything the reclaimer has freed (or a new chunk) at once.
  if (local_free_ == nullptr) {
    std::lock_guard<std::mutex> lock(pool_mu_);
    if (free_ == nullptr) {
      const size_t n = PoolChunkSize(pool_.size());
      const int bits = std::countr_zero(n);
      pool_.push_back(internal::NewMappedArray<Region>(n));
      // The j-th region taken from a new chunk is its ScatterIndex(j)-th (internal/region.h).
      for (size_t j = n; j-- > 0;) {
        Region* r = &pool_.back()[internal::ScatterIndex(j, bits)];
        r->next_free = free_;
        free_ = r;
      }
    }
    local_free_ = std::exchange(free_, nullptr);
  }
  Region* r = local_free_;
  local_free_ = r->next_free;
  return r;
}

void RegistrationCache::Retire(Region* r) {
  Region* one[1] = {r};
  RetireAll(one);
}

template <typename Range>
void RegistrationCache::RetireAll(const Range& regions) {
  bool wake;
  {
    std::lock_guard<std::mutex> lock(reclaim_mu_);
    reclaim_.insert(reclaim_.end(), std::begin(regions), std::end(regions));
    // A futex wake costs a system call: only when the reclaimer sleeps for good, or lingers and
    // a full batch is ready, or a Flush waits.
    wake = reclaimer_state_ == ReclaimerState::kSleeping ||
           (reclaimer_state_ == ReclaimerState::kLingering && reclaim_.size() >= kReclaimBatch) ||
           flush_waiters_ > 0;
  }
  if (wake) reclaim_cv_.notify_all();
}

void RegistrationCache::DeregisterBatch(std::vector<Region*>& batch) {
  for (Region* r : batch) {
    absl::Status st = registrar_->Deregister(r->reg);
    if (st.ok()) {
      deregistrations_.fetch_add(1, std::memory_order_relaxed);
    } else {
      deregistration_failures_.fetch_add(1, std::memory_order_relaxed);
    }
    pinned_bytes_.fetch_sub(r->reg.length, std::memory_order_relaxed);
    // Unwatch after unpinning: with both undone, the kernel merges the VMAs that watching and
    // pinning split, and the application can mremap the buffer again.
    if (r->watched) {
      const uintptr_t start = r->start.load(std::memory_order_relaxed);
      monitor_.uffd->Unwatch(start, r->end.load(std::memory_order_relaxed) - start);
    }
  }
  std::lock_guard<std::mutex> lock(pool_mu_);
  for (Region* r : batch) {
    r->next_free = free_;
    free_ = r;
  }
}

void RegistrationCache::HazardDropped() {
  {
    std::lock_guard<std::mutex> lock(reclaim_mu_);
    if (deferred_.empty()) return;
    deferred_recheck_ = true;
  }
  reclaim_cv_.notify_all();
}

void RegistrationCache::ReclaimerLoop() {
  // Batching: a producer pays a futex wake only when the reclaimer sleeps for good. After work the
  // reclaimer lingers (a timed wait of kLinger) so that a stream of retirements costs one wake-up,
  // and it lets a short queue fill up to kBatch for up to kGather before draining it. A retired
  // region is deregistered within about kLinger + kGather, or at once by Flush.
  // Regions deferred for a hazard (invariant 3) are looked at again when a RegionRef drops a
  // hazard on a dead region, and otherwise after kRecheck, doubling up to kMaxRecheck while some
  // stay held (a hazard dropped just as the region died may not report itself: hazard.h).
  constexpr auto kLinger = std::chrono::milliseconds(1);
  constexpr auto kGather = std::chrono::microseconds(200);
  std::vector<Region*> batch;
  std::unique_lock<std::mutex> lock(reclaim_mu_);
  auto has_work = [this] { return stop_ || !reclaim_.empty(); };
  while (true) {
    if (events_.pending() != 0) {
      lock.unlock();
      if (mu_.try_lock()) {
        DrainMemoryEventsLocked();
        mu_.unlock();
      }
      lock.lock();
    }
    if (reclaim_.empty() && !deferred_.empty() && !stop_) {
      reclaimer_state_ = ReclaimerState::kSleeping;  // any retirement wakes it
      reclaim_cv_.wait_until(lock, recheck_at_, [&] { return has_work() || deferred_recheck_; });
      reclaimer_state_ = ReclaimerState::kAwake;
      const bool dropped = deferred_recheck_;
      if (dropped || std::chrono::steady_clock::now() >= recheck_at_) {
        recheck_ =
            dropped ? kRecheck : std::min<std::chrono::microseconds>(2 * recheck_, kMaxRecheck);
        deferred_recheck_ = false;
        reclaim_.insert(reclaim_.end(), deferred_.begin(), deferred_.end());
        deferred_.clear();
      }
      continue;
    }
    if (reclaim_.empty()) {
      if (stop_) return;
      recheck_ = kRecheck;  // nothing deferred
      reclaimer_state_ = ReclaimerState::kLingering;
      if (!reclaim_cv_.wait_for(lock, kLinger, has_work)) {
        reclaimer_state_ = ReclaimerState::kSleeping;
        reclaim_cv_.wait(lock, [&] { return has_work() || !deferred_.empty(); });
      }
      reclaimer_state_ = ReclaimerState::kAwake;
      continue;
    }
    if (reclaim_.size() < kReclaimBatch && !stop_ && flush_waiters_ == 0) {
      reclaimer_state_ = ReclaimerState::kLingering;
      reclaim_cv_.wait_for(lock, kGather, [this] {
        return stop_ || reclaim_.size() >= kReclaimBatch || flush_waiters_ > 0;
      });
      reclaimer_state_ = ReclaimerState::kAwake;
    }
    DeregisterQueued(lock, batch);
  }
}

void RegistrationCache::DeferHazarded(std::vector<Region*>* batch) {
  // The regions were marked dead before they were queued; the barrier orders those stores before
  // every hit's later loads, and every earlier hit's hazard store before the reads below.
  internal::HazardBarrier();
  std::vector<const void*> named;
  internal::HazardCollect(&named);
  if (named.empty()) return;
  std::sort(named.begin(), named.end());
  auto held = std::stable_partition(batch->begin(), batch->end(), [&](Region* r) {
    return !std::binary_search(named.begin(), named.end(), static_cast<const void*>(r));
  });
  {
    std::lock_guard<std::mutex> lock(reclaim_mu_);
    if (deferred_.empty()) recheck_at_ = std::chrono::steady_clock::now() + recheck_;
    deferred_.insert(deferred_.end(), held, batch->end());
  }
  batch->erase(held, batch->end());
  reclaim_cv_.notify_all();  // a reclaimer asleep for good looks at them again later
}

void RegistrationCache::DeregisterQueued(std::unique_lock<std::mutex>& lock,
                                         std::vector<Region*>& batch) {
  batch.swap(reclaim_);
  ++reclaim_busy_;
  lock.unlock();
  if (hazards_) DeferHazarded(&batch);
  DeregisterBatch(batch);
  batch.clear();
  lock.lock();
  --reclaim_busy_;
  if (flush_waiters_ > 0) reclaim_cv_.notify_all();
}

void RegistrationCache::Flush() {
  // userfaultfd events reach the queue just after the change returns: wait for those first.
  if (monitor_.uffd != nullptr) monitor_.uffd->Sync();
  if (events_.pending() != 0) {
    std::lock_guard<std::mutex> lock(mu_);
    DrainMemoryEventsLocked();
  }
  FlushReclaimer();
}

void RegistrationCache::FlushReclaimer() {
  std::vector<Region*> batch;
  std::unique_lock<std::mutex> lock(reclaim_mu_);
  // Deferred regions are looked at again: those whose hazards were dropped go now.
  reclaim_.insert(reclaim_.end(), deferred_.begin(), deferred_.end());
  deferred_.clear();
  while (true) {
    if (!reclaim_.empty()) {
      DeregisterQueued(lock, batch);
      continue;
    }
    if (reclaim_busy_ == 0) return;
    ++flush_waiters_;
    reclaim_cv_.wait(lock);
    --flush_waiters_;
  }
}

size_t RegistrationCache::Regions(size_t max, std::vector<RegionInfo>* out) const {
  out->clear();
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t now = NowTicks();
  auto ns = [this, now](uint64_t then) {
    return now > then ? static_cast<uint64_t>(static_cast<double>(now - then) * ns_per_tick_) : 0;
  };
  // Only the lock holder creates, kills or recycles a region (invariant 1; recycling happens in
  // AcquireSlow): under mu_, start, end, access and created_ticks of every region read below are
  // stable. References and last_use change with hits and releases: read as they are (counted
  // ones, and the hazard slots that name the region, read without the barrier).
  std::vector<const void*> hazards;
  if (hazards_) internal::HazardCollect(&hazards);
  std::sort(hazards.begin(), hazards.end());
  auto references = [&](const Region* r, uint64_t state) {
    auto [lo, hi] = std::equal_range(hazards.begin(), hazards.end(), static_cast<const void*>(r));
    return static_cast<uint32_t>((state & kRefMask) + static_cast<uint64_t>(hi - lo));
  };
  auto add = [&](const Region* r, uint64_t state, RegionInfo::State kind) {
    RegionInfo info;
    info.start = r->start.load(std::memory_order_relaxed);
    info.length = r->end.load(std::memory_order_relaxed) - info.start;
    info.access = r->access.load(std::memory_order_relaxed);
    info.references = references(r, state);
    info.state = kind;
    info.age_ns = ns(r->created_ticks);
    if (info.references == 0) info.idle_ns = ns(r->last_use.load(std::memory_order_relaxed));
    out->push_back(info);
  };
  size_t total = 0;
  tree_.VisitOverlapping(0, ~uintptr_t{0}, [&](Tree::Handle h) {
    ++total;
    if (out->size() >= max) return;
    const Region* r = Tree::Value(h);
    const uint64_t s = r->state.load(std::memory_order_acquire);
    add(r, s, references(r, s) ? RegionInfo::State::kActive : RegionInfo::State::kIdle);
  });
  // Dead but referenced: out of the index, found in the pool (never-used and recycled regions
  // hold no reference; dead ones without references await the reclaimer and are not listed).
  std::lock_guard<std::mutex> pool_lock(pool_mu_);
  for (size_t i = 0; i < pool_.size(); ++i) {
    for (size_t k = 0; k < PoolChunkSize(i); ++k) {
      const Region* r = &pool_[i][k];
      const uint64_t s = r->state.load(std::memory_order_acquire);
      if ((s & kDeadBit) == 0 || references(r, s) == 0) continue;
      ++total;
      if (out->size() >= max) continue;
      add(r, s,
          (s & kInvalidatedBit) ? RegionInfo::State::kInvalidated : RegionInfo::State::kRetired);
    }
  }
  return total;
}

CacheStats RegistrationCache::Stats() const {
  CacheStats out;
  {
    std::lock_guard<std::mutex> lock(mu_);
    out = slow_stats_;
    out.regions = live_regions_;
    out.monitor_hooks = monitor_.hooks;
    out.monitor_uffd = monitor_.uffd != nullptr;
    out.monitor_notes = monitor_.notes;
  }
  for (const Counter& c : hits_) out.hits += c.value.load(std::memory_order_relaxed);
  out.deregistrations = deregistrations_.load(std::memory_order_relaxed);
  out.deregistration_failures = deregistration_failures_.load(std::memory_order_relaxed);
  out.pinned_bytes = pinned_bytes_.load(std::memory_order_relaxed);
  out.memory_event_overflows = events_.overflows();
  out.stale_hits = stale_hits_.load(std::memory_order_relaxed);
  out.pinned_bytes_high_water = std::max(out.pinned_bytes_high_water, out.pinned_bytes);
  return out;
}

}  // namespace sanreg
