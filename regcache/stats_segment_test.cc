// stats_segment_test.cc: a cache publishes its statistics in /dev/shm/sanreg.<pid>, a reader sees
// exactly them, and on request exactly its regions (the first kMaxRegions, with a count of the
// rest); unpublishing frees the slot, and a dead process's segment is removed by the lister.

#include "regcache/stats_segment.h"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <memory>

#include "regcache/cache.h"
#include "regcache/fake_registrar.h"

namespace sanreg {
namespace {

constexpr size_t kPage = 4096;

TEST(StatsSegmentTest, ReaderSeesExactlyTheCachesRegistrations) {
  FakeRegistrar fake;
  RegistrationCache::Options o;
  o.memory_monitor = MemoryMonitorMode::kNone;
  auto cache = RegistrationCache::Create(&fake, o);
  ASSERT_TRUE(cache.ok()) << cache.status();
  alignas(4096) static char arena[64 * kPage];
  std::vector<RegionRef> refs;
  // Three disjoint regions of 1, 2 and 4 pages (gaps between them: no merging).
  for (auto [page, pages] : {std::pair{0, 1}, std::pair{8, 2}, std::pair{16, 4}}) {
    auto r = (*cache)->Acquire(arena + page * kPage, pages * kPage, kAccessLocalRead);
    ASSERT_TRUE(r.ok()) << r.status();
    refs.push_back(*std::move(r));
  }
  auto hit = (*cache)->Acquire(arena, kPage, kAccessLocalRead);
  ASSERT_TRUE(hit.ok());
  PublishStatsNow();

  auto ps = ReadStatsSegment(getpid());
  ASSERT_TRUE(ps.ok()) << ps.status();
  EXPECT_EQ(ps->pid, getpid());
  EXPECT_GT(ps->published_ns, 0u);
  ASSERT_EQ(ps->caches.size(), 1u);
  const CacheStats& s = ps->caches[0].second;
  EXPECT_EQ(s.registrations, 3u);
  EXPECT_EQ(s.regions, 3u);
  EXPECT_EQ(s.pinned_bytes, 7 * kPage);
  EXPECT_EQ(s.pinned_bytes_high_water, 7 * kPage);
  EXPECT_EQ(s.hits, 1u);
  EXPECT_EQ(s.misses_absent, 3u);
  uint64_t in_histogram = 0;
  for (uint64_t b : s.registration_latency) in_histogram += b;
  EXPECT_EQ(in_histogram, 3u);
  std::vector<pid_t> pids = ListStatsSegments();
  EXPECT_EQ(std::count(pids.begin(), pids.end(), getpid()), 1);

  hit->Reset();
  refs.clear();
  cache->reset();
  ps = ReadStatsSegment(getpid());
  ASSERT_TRUE(ps.ok()) << ps.status();
  EXPECT_TRUE(ps->caches.empty()) << "a destroyed cache is still listed";
}

TEST(StatsSegmentTest, RegionTablesArePublishedOnRequest) {
  FakeRegistrar fake;
  RegistrationCache::Options o;
  o.memory_monitor = MemoryMonitorMode::kNone;
  auto cache = RegistrationCache::Create(&fake, o);
  ASSERT_TRUE(cache.ok()) << cache.status();
  alignas(4096) static char arena[64 * kPage];
  std::vector<RegionRef> refs;
  for (auto [page, pages] : {std::pair{0, 1}, std::pair{8, 2}}) {
    auto r = (*cache)->Acquire(arena + page * kPage, pages * kPage, kAccessLocalRead);
    ASSERT_TRUE(r.ok()) << r.status();
    refs.push_back(*std::move(r));
  }
  refs[1].Reset();

  // The publisher thread answers within a round or two.
  auto pr = ReadRegions(getpid(), std::chrono::seconds(5));
  ASSERT_TRUE(pr.ok()) << pr.status();
  EXPECT_EQ(pr->pid, getpid());
  EXPECT_GT(pr->published_ns, 0u);
  ASSERT_EQ(pr->caches.size(), 1u);
  const CacheRegions& c = pr->caches[0];
  EXPECT_EQ(c.total, 2u);
  ASSERT_EQ(c.regions.size(), 2u);
  EXPECT_EQ(c.regions[0].start, reinterpret_cast<uintptr_t>(arena));
  EXPECT_EQ(c.regions[0].length, kPage);
  EXPECT_EQ(c.regions[0].references, 1u);
  EXPECT_EQ(c.regions[0].state, RegionInfo::State::kActive);
  EXPECT_EQ(c.regions[1].start, reinterpret_cast<uintptr_t>(arena + 8 * kPage));
  EXPECT_EQ(c.regions[1].length, 2 * kPage);
  EXPECT_EQ(c.regions[1].access, kAccessLocalRead);
  EXPECT_EQ(c.regions[1].references, 0u);
  EXPECT_EQ(c.regions[1].state, RegionInfo::State::kIdle);

  // A later request sees later changes.
  refs.clear();
  ASSERT_EQ(*(*cache)->Invalidate(arena, sizeof arena), 2u);
  pr = ReadRegions(getpid(), std::chrono::seconds(5));
  ASSERT_TRUE(pr.ok()) << pr.status();
  ASSERT_EQ(pr->caches.size(), 1u);
  EXPECT_EQ(pr->caches[0].total, 0u);
  EXPECT_TRUE(pr->caches[0].regions.empty());
}

TEST(StatsSegmentTest, RegionTableListsTheFirstRegionsAndCountsTheRest) {
  FakeRegistrar fake;
  RegistrationCache::Options o;
  o.memory_monitor = MemoryMonitorMode::kNone;
  auto cache = RegistrationCache::Create(&fake, o);
  ASSERT_TRUE(cache.ok()) << cache.status();
  // The fake registrar touches no memory: made-up, disjoint one-page ranges.
  const uintptr_t base = uintptr_t{1} << 40;
  const size_t n = StatsSegmentHeader::kMaxRegions + 100;
  for (size_t i = 0; i < n; ++i) {
    auto r = (*cache)->Acquire(base + 2 * i * kPage, kPage, kAccessLocalRead);
    ASSERT_TRUE(r.ok()) << r.status();
  }
  auto pr = ReadRegions(getpid(), std::chrono::seconds(5));
  ASSERT_TRUE(pr.ok()) << pr.status();
  ASSERT_EQ(pr->caches.size(), 1u);
  EXPECT_EQ(pr->caches[0].total, n);
  ASSERT_EQ(pr->caches[0].regions.size(), StatsSegmentHeader::kMaxRegions);
  for (size_t i = 0; i < StatsSegmentHeader::kMaxRegions; ++i) {
    ASSERT_EQ(pr->caches[0].regions[i].start, base + 2 * i * kPage) << i;
    ASSERT_EQ(pr->caches[0].regions[i].state, RegionInfo::State::kIdle) << i;
  }
}

TEST(StatsSegmentTest, CacheWithPublishingOffIsNotListed) {
  FakeRegistrar fake;
  RegistrationCache::Options o;
  o.memory_monitor = MemoryMonitorMode::kNone;
  o.publish_stats = false;
  auto cache = RegistrationCache::Create(&fake, o);
  ASSERT_TRUE(cache.ok());
  PublishStatsNow();
  auto ps = ReadStatsSegment(getpid());
  if (ps.ok()) EXPECT_TRUE(ps->caches.empty());
}

TEST(StatsSegmentTest, DeadProcessSegmentIsSkippedAndRemoved) {
  // A child publishes, then dies without running its exit handlers.
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    FakeRegistrar fake;
    RegistrationCache::Options o;
    o.memory_monitor = MemoryMonitorMode::kNone;
    o.reclaimer_thread = false;
    auto cache = RegistrationCache::Create(&fake, o);
    char c = cache.ok() && ReadStatsSegment(getpid()).ok() ? 'y' : 'n';
    if (write(ready[1], &c, 1) != 1) _exit(1);
    _exit(0);  // no atexit: the segment stays behind
  }
  close(ready[1]);
  char c = 0;
  ASSERT_EQ(read(ready[0], &c, 1), 1);
  EXPECT_EQ(c, 'y');
  int st;
  ASSERT_EQ(waitpid(child, &st, 0), child);
  ASSERT_EQ(access(StatsSegmentPath(child).c_str(), F_OK), 0) << "the child left no segment";
  std::vector<pid_t> pids = ListStatsSegments();
  EXPECT_EQ(std::count(pids.begin(), pids.end(), child), 0);
  EXPECT_NE(access(StatsSegmentPath(child).c_str(), F_OK), 0) << "the dead segment remains";
}

}  // namespace
}  // namespace sanreg
