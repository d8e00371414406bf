// Unit tests for RegistrationCache, one per rule in cache.h, against the fake registrar.

#include "regcache/cache.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "regcache/fake_registrar.h"

namespace sanreg {
namespace {

const uintptr_t kPage = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
// The fake registrar touches no memory, so tests use made-up addresses.
const uintptr_t kBase = uintptr_t{1} << 32;

constexpr uint32_t kRead = kAccessLocalRead;
constexpr uint32_t kWrite = kAccessLocalRead | kAccessLocalWrite;

class RegistrationCacheTest : public ::testing::Test {
 protected:
  void Make(RegistrationCache::Options options = {}) {
    cache_.reset();
    auto c = RegistrationCache::Create(&fake_, options);
    ASSERT_TRUE(c.ok()) << c.status();
    cache_ = std::move(*c);
  }
  void SetUp() override { Make(); }

  RegionRef Get(uintptr_t addr, size_t len, uint32_t access = kRead) {
    auto r = cache_->Acquire(addr, len, access);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? std::move(*r) : RegionRef();
  }

  // Waits (bounded) until the fake holds `n` registrations: the reclaimer's work, on its thread.
  void WaitForLiveRegistrations(size_t n) {
    for (int i = 0; i < 10000000 && fake_.live_registrations() != n; ++i) {
      std::this_thread::yield();
    }
    EXPECT_EQ(fake_.live_registrations(), n);
  }

  FakeRegistrar fake_;
  std::unique_ptr<RegistrationCache> cache_;
};

TEST_F(RegistrationCacheTest, MissRegistersPageAlignedRange) {
  RegionRef r = Get(kBase + 100, 2 * kPage);
  ASSERT_TRUE(r);
  EXPECT_EQ(r.start(), kBase);
  EXPECT_EQ(r.length(), 3 * kPage);
  EXPECT_EQ(r.access(), kRead);
  EXPECT_EQ(fake_.registrations(), 1u);
  EXPECT_EQ(cache_->Stats().misses_absent, 1u);
}

TEST_F(RegistrationCacheTest, HitAfterReleaseCostsNoRegistration) {
  uint64_t handle;
  {
    RegionRef r = Get(kBase, kPage);
    handle = r.registration().handle;
  }
  cache_->Flush();
  EXPECT_EQ(fake_.live_registrations(), 1u) << "the last release must not deregister";
  RegionRef again = Get(kBase, kPage);
  EXPECT_EQ(again.registration().handle, handle);
  EXPECT_EQ(fake_.registrations(), 1u);
  EXPECT_EQ(cache_->Stats().hits, 1u);
}

TEST_F(RegistrationCacheTest, SubrangeOfCachedRegionIsHit) {
  RegionRef big = Get(kBase, 16 * kPage);
  RegionRef small = Get(kBase + 3 * kPage + 7, 100);
  EXPECT_EQ(small.registration().handle, big.registration().handle);
  EXPECT_EQ(fake_.registrations(), 1u);
}

TEST_F(RegistrationCacheTest, ManyReferencesToOneRegion) {
  std::vector<RegionRef> refs;
  for (int i = 0; i < 100; ++i) refs.push_back(Get(kBase, kPage));
  EXPECT_EQ(fake_.registrations(), 1u);
  ASSERT_TRUE(cache_->Invalidate(kBase, kPage).ok());
  refs.resize(1);
  cache_->Flush();
  EXPECT_EQ(fake_.live_registrations(), 1u) << "one reference is still held";
  refs.clear();
  cache_->Flush();
  EXPECT_EQ(fake_.live_registrations(), 0u);
}

TEST_F(RegistrationCacheTest, BadInputIsInvalidArgumentAndRegistersNothing) {
  EXPECT_EQ(cache_->Acquire(kBase, 0, kRead).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cache_->Acquire(~uintptr_t{0} - 10, 100, kRead).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cache_->Acquire(~uintptr_t{0} - 100, 50, kRead).status().code(),
            absl::StatusCode::kInvalidArgument)
      << "the page-aligned end wraps";
  EXPECT_EQ(cache_->Acquire(kBase, kPage, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cache_->Acquire(kBase, kPage, 1u << 7).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cache_->Invalidate(kBase, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cache_->Invalidate(~uintptr_t{0}, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(fake_.register_calls(), 0u);
  EXPECT_EQ(cache_->Stats().regions, 0u);
}

TEST_F(RegistrationCacheTest, BadOptionsAreRefused) {
  RegistrationCache::Options o;
  o.alignment = 3 * kPage;
  EXPECT_EQ(RegistrationCache::Create(&fake_, o).status().code(),
            absl::StatusCode::kInvalidArgument);
  o.alignment = kPage / 2;
  EXPECT_EQ(RegistrationCache::Create(&fake_, o).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RegistrationCache::Create(nullptr, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(RegistrationCacheTest, AlignmentOptionWidensRegions) {
  RegistrationCache::Options o;
  o.alignment = 16 * kPage;
  Make(o);
  RegionRef r = Get(kBase + 17 * kPage, 10);
  EXPECT_EQ(r.start(), kBase + 16 * kPage);
  EXPECT_EQ(r.length(), 16 * kPage);
}

TEST_F(RegistrationCacheTest, RequestNeedingMoreRightsMissesForRights) {
  RegistrationCache::Options o;
  o.merge = false;
  Make(o);
  RegionRef ro = Get(kBase, kPage, kRead);
  RegionRef rw = Get(kBase, kPage, kWrite);
  EXPECT_NE(ro.registration().handle, rw.registration().handle);
  EXPECT_EQ(rw.access(), kWrite);
  EXPECT_EQ(cache_->Stats().misses_rights, 1u);
  EXPECT_EQ(cache_->Stats().regions, 2u);
  // A read-only request is served by either region.
  RegionRef again = Get(kBase, kPage, kRead);
  EXPECT_EQ(fake_.registrations(), 2u);
}

TEST_F(RegistrationCacheTest, MergeAbsorbsOverlappingRegionsWithFewerRights) {
  RegionRef a = Get(kBase, 2 * kPage, kRead);
  RegionRef b = Get(kBase + 4 * kPage, 2 * kPage, kRead);
  // Overlaps both: one region spanning all three, with the requested rights.
  RegionRef m = Get(kBase + kPage, 4 * kPage, kWrite);
  EXPECT_EQ(m.start(), kBase);
  EXPECT_EQ(m.length(), 6 * kPage);
  EXPECT_EQ(m.access(), kWrite);
  CacheStats s = cache_->Stats();
  EXPECT_EQ(s.merges, 2u);
  EXPECT_EQ(s.regions, 1u);
  // The absorbed regions stay registered while referenced, then go.
  a = RegionRef();
  b = RegionRef();
  cache_->Flush();
  EXPECT_EQ(fake_.live_registrations(), 1u);
  RegionRef hit = Get(kBase + 5 * kPage, kPage, kRead);
  EXPECT_EQ(hit.registration().handle, m.registration().handle);
}

TEST_F(RegistrationCacheTest, MergeKeepsRegionsWithRightsTheRequestLacks) {
  RegionRef rw = Get(kBase, 2 * kPage, kWrite);
  RegionRef ro = Get(kBase + kPage, 4 * kPage, kRead);
  // The writable region has a right the request lacks: merging it would drop that right.
  EXPECT_EQ(ro.start(), kBase + kPage);
  EXPECT_EQ(ro.length(), 4 * kPage);
  EXPECT_NE(ro.registration().handle, rw.registration().handle);
  EXPECT_EQ(cache_->Stats().regions, 2u);
  EXPECT_EQ(cache_->Stats().merges, 0u);
  // A read-only request inside the writable region is still a hit on it.
  RegionRef inside = Get(kBase, kPage, kRead);
  EXPECT_EQ(inside.registration().handle, rw.registration().handle);
}

TEST_F(RegistrationCacheTest, InvalidateDropsIdleRegionsAndDeregisters) {
  { RegionRef r = Get(kBase, kPage); }
  { RegionRef r = Get(kBase + 2 * kPage, kPage); }
  { RegionRef r = Get(kBase + 10 * kPage, kPage); }
  auto n = cache_->Invalidate(kBase, 3 * kPage);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 2u);
  cache_->Flush();
  EXPECT_EQ(fake_.live_registrations(), 1u);
  EXPECT_FALSE(fake_.IsRegistered(kBase, 3 * kPage));
  EXPECT_EQ(cache_->Stats().invalidations, 2u);
}

TEST_F(RegistrationCacheTest, InvalidateCountsByteOverlapNotPageOverlap) {
  { RegionRef r = Get(kBase, kPage); }
  EXPECT_EQ(*cache_->Invalidate(kBase + kPage, 1), 0u);
  EXPECT_EQ(*cache_->Invalidate(kBase + kPage - 1, 1), 1u);
}

TEST_F(RegistrationCacheTest, PinnedRegionSurvivesInvalidateUntilLastRelease) {
  RegionRef r = Get(kBase, kPage);
  const Registration before = r.registration();
  ASSERT_EQ(*cache_->Invalidate(kBase, kPage), 1u);
  cache_->Flush();
  // Still registered and usable by its holder.
  EXPECT_TRUE(fake_.IsRegistered(kBase, kPage));
  EXPECT_EQ(r.registration().handle, before.handle);
  // But no new Acquire returns it.
  RegionRef fresh = Get(kBase, kPage);
  EXPECT_NE(fresh.registration().handle, before.handle);
  EXPECT_EQ(cache_->Stats().misses_invalidated, 1u);
  r.Reset();
  cache_->Flush();
  EXPECT_EQ(fake_.live_registrations(), 1u) << "only the fresh registration remains";
  EXPECT_EQ(fake_.bad_deregistrations(), 0u);
}

TEST_F(RegistrationCacheTest, EvictsLeastRecentlyUsedUnderMaxRegions) {
  RegistrationCache::Options o;
  o.max_regions = 3;
  Make(o);
  uint64_t h[4];
  for (int i = 0; i < 3; ++i) h[i] = Get(kBase + 2 * i * kPage, kPage).registration().handle;
  // Touch region 0: region 1 becomes the least recently used.
  { RegionRef r = Get(kBase, kPage); }
  h[3] = Get(kBase + 6 * kPage, kPage).registration().handle;
  cache_->Flush();
  EXPECT_EQ(cache_->Stats().evictions, 1u);
  EXPECT_EQ(cache_->Stats().regions, 3u);
  EXPECT_FALSE(fake_.IsRegistered(kBase + 2 * kPage, kPage)) << "region 1 was the LRU";
  EXPECT_TRUE(fake_.IsRegistered(kBase, kPage));
  EXPECT_TRUE(fake_.IsRegistered(kBase + 4 * kPage, kPage));
  EXPECT_TRUE(fake_.IsRegistered(kBase + 6 * kPage, kPage));
  (void)h;
}

TEST_F(RegistrationCacheTest, EvictsUnderMaxPinnedBytes) {
  RegistrationCache::Options o;
  o.max_pinned_bytes = 4 * kPage;
  Make(o);
  { RegionRef r = Get(kBase, 2 * kPage); }
  { RegionRef r = Get(kBase + 4 * kPage, 2 * kPage); }
  { RegionRef r = Get(kBase + 8 * kPage, 3 * kPage); }  // needs both gone
  cache_->Flush();
  CacheStats s = cache_->Stats();
  EXPECT_EQ(s.evictions, 2u);
  EXPECT_EQ(s.pinned_bytes, 3 * kPage);
  EXPECT_LE(s.pinned_bytes_high_water, 7 * kPage);
  EXPECT_EQ(fake_.live_bytes(), 3 * kPage);
}

TEST_F(RegistrationCacheTest, InUseRegionsAreNeverEvicted) {
  RegistrationCache::Options o;
  o.max_regions = 2;
  Make(o);
  RegionRef a = Get(kBase, kPage);
  RegionRef b = Get(kBase + 2 * kPage, kPage);
  auto c = cache_->Acquire(kBase + 4 * kPage, kPage, kRead);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted) << c.status();
  EXPECT_EQ(fake_.registrations(), 2u);
  b.Reset();
  auto d = cache_->Acquire(kBase + 4 * kPage, kPage, kRead);
  ASSERT_TRUE(d.ok()) << d.status();
  cache_->Flush();
  EXPECT_TRUE(fake_.IsRegistered(kBase, kPage)) << "the in-use region stays";
  EXPECT_FALSE(fake_.IsRegistered(kBase + 2 * kPage, kPage));
}

TEST_F(RegistrationCacheTest, RegionLargerThanByteLimitIsResourceExhausted) {
  RegistrationCache::Options o;
  o.max_pinned_bytes = 4 * kPage;
  Make(o);
  { RegionRef r = Get(kBase, kPage); }
  EXPECT_EQ(cache_->Acquire(kBase + 8 * kPage, 5 * kPage, kRead).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(cache_->Stats().regions, 1u) << "nothing was evicted for a request that cannot fit";
}

TEST_F(RegistrationCacheTest, CostAwareEvictsCheapBeforeOlderExpensive) {
  RegistrationCache::Options o;
  o.max_regions = 2;
  o.eviction = EvictionPolicy::kCostAware;
  o.cost_weight = 1000;
  // One registrar whose latency we switch: expensive first, cheap second.
  struct Switchable : Registrar {
    FakeRegistrar slow{FakeRegistrar::Options{0, absl::StatusCode::kResourceExhausted, 0, 300000}};
    FakeRegistrar fast;
    bool use_slow = true;
    absl::StatusOr<Registration> Register(uintptr_t a, size_t n, uint32_t acc) override {
      auto r = (use_slow ? slow : fast).Register(a, n, acc);
      if (r.ok()) r->handle |= use_slow ? (uint64_t{1} << 40) : 0;
      return r;
    }
    absl::Status Deregister(const Registration& reg) override {
      Registration copy = reg;
      bool was_slow = reg.handle & (uint64_t{1} << 40);
      copy.handle &= ~(uint64_t{1} << 40);
      return (was_slow ? slow : fast).Deregister(copy);
    }
  } reg;
  auto c = RegistrationCache::Create(&reg, o);
  ASSERT_TRUE(c.ok());
  {
    auto r = (*c)->Acquire(kBase, kPage, kRead);
    ASSERT_TRUE(r.ok());
  }  // costly, older
  reg.use_slow = false;
  {
    auto r = (*c)->Acquire(kBase + 2 * kPage, kPage, kRead);
    ASSERT_TRUE(r.ok());
  }  // cheap
  {
    auto r = (*c)->Acquire(kBase + 4 * kPage, kPage, kRead);
    ASSERT_TRUE(r.ok());
  }
  (*c)->Flush();
  EXPECT_TRUE(reg.slow.IsRegistered(kBase, kPage)) << "cost-aware keeps the costly region";
  EXPECT_FALSE(reg.fast.IsRegistered(kBase + 2 * kPage, kPage));

  // The same sequence under LRU evicts the older, costly region.
  o.eviction = EvictionPolicy::kLru;
  Switchable reg2;
  auto c2 = RegistrationCache::Create(&reg2, o);
  ASSERT_TRUE(c2.ok());
  {
    auto r = (*c2)->Acquire(kBase, kPage, kRead);
    ASSERT_TRUE(r.ok());
  }
  reg2.use_slow = false;
  {
    auto r = (*c2)->Acquire(kBase + 2 * kPage, kPage, kRead);
    ASSERT_TRUE(r.ok());
  }
  {
    auto r = (*c2)->Acquire(kBase + 4 * kPage, kPage, kRead);
    ASSERT_TRUE(r.ok());
  }
  (*c2)->Flush();
  EXPECT_FALSE(reg2.slow.IsRegistered(kBase, kPage));
}

TEST_F(RegistrationCacheTest, RegistrarExhaustionEvictsAndRetriesOnce) {
  fake_.set_byte_budget(4 * kPage);
  { RegionRef r = Get(kBase, 2 * kPage); }
  { RegionRef r = Get(kBase + 4 * kPage, 2 * kPage); }
  // The registrar is full; the cache must free idle registrations and retry.
  RegionRef r = Get(kBase + 8 * kPage, 2 * kPage);
  ASSERT_TRUE(r);
  EXPECT_EQ(fake_.failures(), 1u);
  EXPECT_EQ(fake_.register_calls(), 4u) << "exactly one retry";
  EXPECT_GE(cache_->Stats().evictions, 1u);
  EXPECT_LE(fake_.live_bytes(), 4 * kPage);
}

TEST_F(RegistrationCacheTest, RegistrarExhaustionWithNothingIdleFails) {
  fake_.set_byte_budget(2 * kPage);
  RegionRef held = Get(kBase, 2 * kPage);
  auto r = cache_->Acquire(kBase + 4 * kPage, kPage, kRead);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  EXPECT_EQ(fake_.register_calls(), 3u) << "one try and one retry, no more";
  EXPECT_EQ(cache_->Stats().registration_failures, 1u);
  EXPECT_EQ(cache_->Stats().regions, 1u);
}

TEST_F(RegistrationCacheTest, RegistrarErrorIsReturnedAndNothingCached) {
  FakeRegistrar::Options fo;
  fo.fail_every = 1;
  fo.fail_code = absl::StatusCode::kPermissionDenied;
  FakeRegistrar failing(fo);
  auto c = RegistrationCache::Create(&failing, {});
  ASSERT_TRUE(c.ok());
  auto r = (*c)->Acquire(kBase, kPage, kRead);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(failing.register_calls(), 1u) << "only kResourceExhausted is retried";
  EXPECT_EQ((*c)->Stats().regions, 0u);
}

// A registrar whose Register blocks, holding the cache lock, until Open().
class GatedRegistrar : public FakeRegistrar {
 public:
  absl::StatusOr<Registration> Register(uintptr_t addr, size_t length, uint32_t access) override {
    std::unique_lock<std::mutex> lock(mu_);
    if (gated_) {
      waiting_ = true;
      cv_.notify_all();
      cv_.wait(lock, [this] { return !gated_; });
    }
    return FakeRegistrar::Register(addr, length, access);
  }
  void Close() {
    std::lock_guard<std::mutex> lock(mu_);
    gated_ = true;
  }
  void WaitUntilBlocked() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return waiting_; });
  }
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    gated_ = false;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool gated_ = false;
  bool waiting_ = false;
};

TEST(RegistrationCacheGrowthTest, HitsStayLockFreeAfterTheLookupTableGrows) {
  GatedRegistrar gated;
  RegistrationCache::Options o;
  o.lookup_buckets = 16;  // grows 16 -> 512 buckets (two per region) while 200 are cached
  auto c = RegistrationCache::Create(&gated, o);
  ASSERT_TRUE(c.ok()) << c.status();
  RegistrationCache& cache = **c;
  constexpr int kRegions = 200;
  for (int i = 0; i < kRegions; ++i) {
    ASSERT_TRUE(cache.Acquire(kBase + 2 * i * kPage, kPage, kRead).ok());
  }
  // A miss now holds the cache lock inside Register: only lock-free hits can complete.
  gated.Close();
  std::thread miss([&] { EXPECT_TRUE(cache.Acquire(kBase - 2 * kPage, kPage, kRead).ok()); });
  gated.WaitUntilBlocked();
  std::mutex mu;
  std::condition_variable cv;
  int hits = 0;
  std::thread hitter([&] {
    for (int i = 0; i < kRegions; ++i) {
      auto r = cache.Acquire(kBase + 2 * i * kPage + 64, 64, kRead);
      EXPECT_TRUE(r.ok());
      std::lock_guard<std::mutex> lock(mu);
      ++hits;
      cv.notify_all();
    }
  });
  {
    // Bounded: a hit that took the slow path waits for the lock until Open().
    std::unique_lock<std::mutex> lock(mu);
    cv.wait_for(lock, std::chrono::seconds(30), [&] { return hits == kRegions; });
    EXPECT_EQ(hits, kRegions) << "hits after the table grew waited for the cache lock";
  }
  gated.Open();
  miss.join();
  hitter.join();
  EXPECT_EQ(cache.Stats().hits, static_cast<uint64_t>(kRegions));
}

TEST_F(RegistrationCacheTest, DestructionDeregistersEverything) {
  { RegionRef r = Get(kBase, kPage); }
  { RegionRef r = Get(kBase + 4 * kPage, kPage); }
  EXPECT_EQ(fake_.live_registrations(), 2u);
  cache_.reset();
  EXPECT_EQ(fake_.live_registrations(), 0u);
  EXPECT_EQ(fake_.bad_deregistrations(), 0u);
}

TEST_F(RegistrationCacheTest, ReclaimerDeregistersWithoutFlush) {
  { RegionRef r = Get(kBase, kPage); }
  ASSERT_EQ(*cache_->Invalidate(kBase, kPage), 1u);
  WaitForLiveRegistrations(0);
}

TEST_F(RegistrationCacheTest, WithoutReclaimerThreadFlushDeregisters) {
  RegistrationCache::Options o;
  o.reclaimer_thread = false;
  Make(o);
  { RegionRef r = Get(kBase, kPage); }
  ASSERT_EQ(*cache_->Invalidate(kBase, kPage), 1u);
  EXPECT_EQ(fake_.live_registrations(), 1u) << "no reclaimer: nothing deregisters by itself";
  cache_->Flush();
  EXPECT_EQ(fake_.live_registrations(), 0u);
  EXPECT_EQ(cache_->Stats().deregistrations, 1u);
}

TEST_F(RegistrationCacheTest, StatsCountEveryEvent) {
  { RegionRef r = Get(kBase, kPage); }
  { RegionRef r = Get(kBase, kPage); }
  { RegionRef r = Get(kBase, kPage); }
  ASSERT_EQ(*cache_->Invalidate(kBase, 1), 1u);
  cache_->Flush();
  CacheStats s = cache_->Stats();
  EXPECT_EQ(s.hits, 2u);
  EXPECT_EQ(s.misses(), 1u);
  EXPECT_EQ(s.registrations, 1u);
  EXPECT_EQ(s.deregistrations, 1u);
  EXPECT_EQ(s.invalidations, 1u);
  EXPECT_EQ(s.pinned_bytes, 0u);
  EXPECT_EQ(s.pinned_bytes_high_water, kPage);
  uint64_t latency_samples = 0;
  for (uint64_t b : s.registration_latency) latency_samples += b;
  EXPECT_EQ(latency_samples, 1u);
}

TEST_F(RegistrationCacheTest, RegionsListsTheIndexByAddressThenDroppedRegionsStillReferenced) {
  RegionRef merged_away = Get(kBase, kPage);                 // absorbed by the merge below
  RegionRef merged = Get(kBase, 2 * kPage);                  // [kBase, +2 pages)
  { RegionRef idle = Get(kBase + 8 * kPage, kPage); }        // released: idle
  RegionRef rw = Get(kBase + 4 * kPage, 2 * kPage, kWrite);  // between them by address
  RegionRef invalidated = Get(kBase + 16 * kPage, kPage);
  ASSERT_EQ(*cache_->Invalidate(kBase + 16 * kPage, 1), 1u);  // still referenced
  { RegionRef gone = Get(kBase + 20 * kPage, kPage); }
  ASSERT_EQ(*cache_->Invalidate(kBase + 20 * kPage, 1), 1u);  // dropped, unreferenced: not listed
  cache_->Flush();

  std::vector<RegionInfo> out;
  ASSERT_EQ(cache_->Regions(100, &out), 5u);
  ASSERT_EQ(out.size(), 5u);
  using State = RegionInfo::State;
  struct Want {
    uintptr_t start;
    size_t length;
    uint32_t access;
    uint32_t references;
    State state;
  };
  const Want wants[] = {
      {kBase, 2 * kPage, kRead, 1, State::kActive},
      {kBase + 4 * kPage, 2 * kPage, kWrite, 1, State::kActive},
      {kBase + 8 * kPage, kPage, kRead, 0, State::kIdle},
      // Out of the index, in pool order (either may come first).
      {kBase, kPage, kRead, 1, State::kRetired},
      {kBase + 16 * kPage, kPage, kRead, 1, State::kInvalidated},
  };
  if (out[3].state != State::kRetired) std::swap(out[3], out[4]);
  for (size_t i = 0; i < out.size(); ++i) {
    SCOPED_TRACE(i);
    EXPECT_EQ(out[i].start, wants[i].start);
    EXPECT_EQ(out[i].length, wants[i].length);
    EXPECT_EQ(out[i].access, wants[i].access);
    EXPECT_EQ(out[i].references, wants[i].references);
    EXPECT_EQ(out[i].state, wants[i].state);
    EXPECT_GT(out[i].age_ns, 0u);
    if (wants[i].references == 0) {
      EXPECT_GT(out[i].idle_ns, 0u);
    } else {
      EXPECT_EQ(out[i].idle_ns, 0u);
    }
  }

  // A bound lists the first ones and still counts them all.
  EXPECT_EQ(cache_->Regions(2, &out), 5u);
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[1].start, kBase + 4 * kPage);
  EXPECT_EQ(cache_->Regions(0, &out), 5u);
  EXPECT_TRUE(out.empty());

  merged_away.Reset();
  invalidated.Reset();
  cache_->Flush();
  EXPECT_EQ(cache_->Regions(100, &out), 3u);
}

TEST_F(RegistrationCacheTest, RegionRefMoveTransfersTheReference) {
  RegionRef a = Get(kBase, kPage);
  RegionRef b = std::move(a);
  EXPECT_FALSE(a);  // NOLINT(bugprone-use-after-move): moved-from is empty by contract
  EXPECT_TRUE(b);
  ASSERT_EQ(*cache_->Invalidate(kBase, kPage), 1u);
  cache_->Flush();
  EXPECT_EQ(fake_.live_registrations(), 1u);
  RegionRef c;
  c = std::move(b);
  cache_->Flush();
  EXPECT_EQ(fake_.live_registrations(), 1u);
  c.Reset();
  cache_->Flush();
  EXPECT_EQ(fake_.live_registrations(), 0u);
}

TEST_F(RegistrationCacheTest, EnvironmentOverridesOptions) {
  setenv("SANREG_CACHE_MAX_REGIONS", "7", 1);
  setenv("SANREG_CACHE_EVICTION", "cost", 1);
  setenv("SANREG_CACHE_HAZARDS", "0", 1);
  RegistrationCache::Options o;
  ASSERT_TRUE(o.ApplyEnvironment().ok());
  EXPECT_EQ(o.max_regions, 7u);
  EXPECT_EQ(o.eviction, EvictionPolicy::kCostAware);
  EXPECT_FALSE(o.hazard_references);
  setenv("SANREG_CACHE_MERGE", "maybe", 1);
  absl::Status st = o.ApplyEnvironment();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("SANREG_CACHE_MERGE"), absl::string_view::npos) << st;
  unsetenv("SANREG_CACHE_MAX_REGIONS");
  unsetenv("SANREG_CACHE_EVICTION");
  unsetenv("SANREG_CACHE_MERGE");
  unsetenv("SANREG_CACHE_HAZARDS");
}

TEST(ScatterIndexTest, IsABijectionThatMixesNeighbours) {
  for (int bits = 6; bits <= 16; ++bits) {
    SCOPED_TRACE(bits);
    const size_t n = size_t{1} << bits;
    std::vector<bool> seen(n, false);
    size_t same_parity = 0;  // consecutive j landing on slots of the same parity
    size_t adjacent = 0;     // consecutive j landing on neighbouring slots
    for (size_t j = 0; j < n; ++j) {
      const size_t x = internal::ScatterIndex(j, bits);
      ASSERT_LT(x, n);
      ASSERT_FALSE(seen[x]) << "slot " << x << " handed out twice";
      seen[x] = true;
      if (j > 0) {
        const size_t prev = internal::ScatterIndex(j - 1, bits);
        same_parity += (x & 1) == (prev & 1);
        adjacent += x + 1 == prev || prev + 1 == x;
      }
    }
    // Sequential order would give 0 and n - 1; a scatter about half and next to none.
    EXPECT_GT(same_parity, n / 4);
    EXPECT_LT(same_parity, 3 * n / 4);
    EXPECT_LT(adjacent, n / 8);
  }
}

// ---- hazard references (cache.h, "The hit path"; internal/hazard.h) ----

// Non-null hazard slots of every thread.
size_t HazardsInUse() {
  std::vector<const void*> named;
  internal::HazardCollect(&named);
  return named.size();
}

TEST_F(RegistrationCacheTest, HitsHoldRegionsInHazardSlots) {
  if (!internal::HazardsEnabled()) GTEST_SKIP() << "no membarrier here: every reference counts";
  { RegionRef r = Get(kBase, kPage); }  // the miss: a counted reference
  const size_t before = HazardsInUse();
  RegionRef hit = Get(kBase, kPage);
  EXPECT_EQ(HazardsInUse(), before + 1);
  std::vector<RegionInfo> out;
  ASSERT_EQ(cache_->Regions(10, &out), 1u);
  EXPECT_EQ(out[0].references, 1u);
  EXPECT_EQ(out[0].state, RegionInfo::State::kActive);
  hit.Reset();
  EXPECT_EQ(HazardsInUse(), before);
  ASSERT_EQ(cache_->Regions(10, &out), 1u);
  EXPECT_EQ(out[0].references, 0u);
  EXPECT_EQ(out[0].state, RegionInfo::State::kIdle);

  // Off: the same hit is counted.
  RegistrationCache::Options o;
  o.hazard_references = false;
  Make(o);
  { RegionRef r = Get(kBase, kPage); }
  RegionRef counted = Get(kBase, kPage);
  EXPECT_EQ(HazardsInUse(), before);
  ASSERT_EQ(cache_->Regions(10, &out), 1u);
  EXPECT_EQ(out[0].references, 1u);
}

TEST_F(RegistrationCacheTest, RegionsHeldByHitsAreNeverEvicted) {
  RegistrationCache::Options o;
  o.max_regions = 2;
  Make(o);
  { RegionRef r = Get(kBase, kPage); }
  { RegionRef r = Get(kBase + 2 * kPage, kPage); }
  RegionRef a = Get(kBase, kPage);  // hits: hazard slots where hazards are on
  RegionRef b = Get(kBase + 2 * kPage, kPage);
  EXPECT_EQ(cache_->Stats().hits, 2u);
  auto c = cache_->Acquire(kBase + 4 * kPage, kPage, kRead);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted) << c.status();
  EXPECT_EQ(cache_->Stats().evictions, 0u);
  b.Reset();
  auto d = cache_->Acquire(kBase + 4 * kPage, kPage, kRead);
  ASSERT_TRUE(d.ok()) << d.status();
  cache_->Flush();
  EXPECT_TRUE(fake_.IsRegistered(kBase, kPage)) << "the region a hit holds stays";
  EXPECT_FALSE(fake_.IsRegistered(kBase + 2 * kPage, kPage));
  // The held region is still found, and still evictable once dropped.
  EXPECT_EQ(Get(kBase, kPage).registration().handle, a.registration().handle);
}

TEST_F(RegistrationCacheTest, RegionHeldByAHitSurvivesInvalidateUntilReleased) {
  { RegionRef r = Get(kBase, kPage); }
  RegionRef hit = Get(kBase, kPage);
  const uint64_t handle = hit.registration().handle;
  ASSERT_EQ(*cache_->Invalidate(kBase, kPage), 1u);
  cache_->Flush();
  EXPECT_TRUE(fake_.IsRegistered(kBase, kPage)) << "held: not deregistered";
  EXPECT_EQ(fake_.deregistrations(), 0u);
  {
    RegionRef again = Get(kBase, kPage);  // invalidated: a miss, a new registration
    EXPECT_NE(again.registration().handle, handle);
  }
  EXPECT_EQ(fake_.live_registrations(), 2u);
  hit.Reset();
  WaitForLiveRegistrations(1);  // the reclaimer deregisters it by itself
  EXPECT_EQ(fake_.bad_deregistrations(), 0u);
}

TEST_F(RegistrationCacheTest, FlushDeregistersARegionOnceItsHitIsDropped) {
  RegistrationCache::Options o;
  o.reclaimer_thread = false;
  Make(o);
  { RegionRef r = Get(kBase, kPage); }
  RegionRef hit = Get(kBase, kPage);
  ASSERT_EQ(*cache_->Invalidate(kBase, kPage), 1u);
  cache_->Flush();
  EXPECT_EQ(fake_.live_registrations(), 1u);
  hit.Reset();
  cache_->Flush();
  EXPECT_EQ(fake_.live_registrations(), 0u);
  EXPECT_EQ(cache_->Stats().deregistrations, 1u);
}

TEST_F(RegistrationCacheTest, MoreHeldHitsThanHazardSlotsAreCounted) {
  constexpr int kRegions = 3 * internal::HazardRecord::kSlots;
  RegistrationCache::Options o;
  o.max_regions = kRegions;
  Make(o);
  for (int i = 0; i < kRegions; ++i) RegionRef r = Get(kBase + 2 * i * kPage, kPage);
  std::vector<RegionRef> held;
  for (int i = 0; i < kRegions; ++i) held.push_back(Get(kBase + 2 * i * kPage, kPage));
  EXPECT_EQ(cache_->Stats().hits, static_cast<uint64_t>(kRegions));
  std::vector<RegionInfo> out;
  ASSERT_EQ(cache_->Regions(100, &out), static_cast<size_t>(kRegions));
  for (const RegionInfo& info : out) EXPECT_EQ(info.references, 1u);
  auto full = cache_->Acquire(kBase + 2 * kRegions * kPage, kPage, kRead);
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted) << full.status();
  // Dropped in any order, each becomes evictable: the last one held goes first here.
  held.pop_back();
  auto room = cache_->Acquire(kBase + 2 * kRegions * kPage, kPage, kRead);
  ASSERT_TRUE(room.ok()) << room.status();
  cache_->Flush();
  EXPECT_FALSE(fake_.IsRegistered(kBase + 2 * (kRegions - 1) * kPage, kPage));
  held.clear();
  room->Reset();
  cache_.reset();
  EXPECT_EQ(fake_.live_registrations(), 0u);
  EXPECT_EQ(fake_.bad_deregistrations(), 0u);
}

TEST_F(RegistrationCacheTest, AHitDroppedOnAnotherThreadFreesTheRegion) {
  RegistrationCache::Options o;
  o.max_regions = 1;
  Make(o);
  { RegionRef r = Get(kBase, kPage); }
  const size_t before = HazardsInUse();
  RegionRef hit = Get(kBase, kPage);
  std::thread([ref = std::move(hit)]() mutable { ref.Reset(); }).join();
  EXPECT_EQ(HazardsInUse(), before);
  auto next = cache_->Acquire(kBase + 2 * kPage, kPage, kRead);  // evicts the dropped one
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_EQ(cache_->Stats().evictions, 1u);
}

TEST_F(RegistrationCacheTest, AHitOutlivesTheThreadThatTookIt) {
  RegistrationCache::Options o;
  o.max_regions = 1;
  Make(o);
  { RegionRef r = Get(kBase, kPage); }
  RegionRef hit;
  std::thread([&] { hit = Get(kBase, kPage); }).join();
  ASSERT_TRUE(hit);
  auto full = cache_->Acquire(kBase + 2 * kPage, kPage, kRead);
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted) << full.status();
  hit.Reset();
  auto next = cache_->Acquire(kBase + 2 * kPage, kPage, kRead);
  ASSERT_TRUE(next.ok()) << next.status();
  next->Reset();
  // Threads that come later take over the exited thread's record and hit as before.
  for (int t = 0; t < 3; ++t) {
    std::thread([&] {
      RegionRef r = Get(kBase + 2 * kPage, kPage);
      EXPECT_TRUE(r);
    }).join();
  }
  EXPECT_EQ(cache_->Stats().hits, 4u);
}

}  // namespace
}  // namespace sanreg
