// The userfaultfd monitor stops watching a range once no cached region needs it: a buffer part of
// which a cache registered can be grown or moved with mremap once the cache dropped its regions
// (Invalidate + Flush, eviction, cache destruction), as with the other monitors; while a region
// still needs part of a range, that part stays watched and its munmap is still reported.
//
// Needs userfaultfd (root here): skipped with a message otherwise.

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>

#include "regcache/cache.h"
#include "regcache/pin_registrar.h"

namespace sanreg {
namespace {

const size_t kPage = static_cast<size_t>(sysconf(_SC_PAGESIZE));
constexpr uint32_t kRw = kAccessLocalRead | kAccessLocalWrite;
constexpr size_t kPages = 16;

// Fails the next Register it is told to (after the cache has watched the range).
class FailOnceRegistrar : public Registrar {
 public:
  explicit FailOnceRegistrar(Registrar* inner) : inner_(inner) {}
  void FailNext() { fail_next_ = true; }
  absl::StatusOr<Registration> Register(uintptr_t addr, size_t len, uint32_t access) override {
    if (fail_next_) {
      fail_next_ = false;
      return absl::InternalError("injected Register failure");
    }
    return inner_->Register(addr, len, access);
  }
  absl::Status Deregister(const Registration& reg) override { return inner_->Deregister(reg); }

 private:
  Registrar* inner_;
  bool fail_next_ = false;
};

class UffdUnwatchTest : public ::testing::TestWithParam<MemoryMonitorMode> {
 protected:
  void SetUp() override {
    cache_ = NewCache();
    ASSERT_NE(cache_, nullptr);
    const CacheStats s = cache_->Stats();
    if (!s.monitor_uffd) GTEST_SKIP() << "userfaultfd unavailable here: " << s.monitor_notes;
  }

  void TearDown() override {
    cache_.reset();
    if (buf_ != nullptr) munmap(buf_, buf_len_);
  }

  std::unique_ptr<RegistrationCache> NewCache(size_t max_regions = 0, bool merge = true,
                                              bool reclaimer_thread = true) {
    RegistrationCache::Options o;
    o.reclaimer_thread = reclaimer_thread;
    o.memory_monitor = GetParam();
    o.max_regions = max_regions;
    o.merge = merge;
    o.publish_stats = false;
    auto c = RegistrationCache::Create(&registrar_, o);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? std::move(*c) : nullptr;
  }

  // Maps the kPages-page buffer, written.
  char* MapBuffer() {
    void* p =
        mmap(nullptr, kPages * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    EXPECT_NE(p, MAP_FAILED) << std::strerror(errno);
    if (p == MAP_FAILED) return nullptr;
    buf_ = static_cast<char*>(p);
    buf_len_ = kPages * kPage;
    std::memset(buf_, 'A', buf_len_);
    return buf_;
  }

  // Registers pages [first, first + n) of the buffer through `cache` and releases them (the region
  // stays cached, idle).
  static void RegisterPages(RegistrationCache* cache, char* buf, size_t first, size_t n) {
    auto r = cache->Acquire(buf + first * kPage, n * kPage, kRw);
    ASSERT_TRUE(r.ok()) << r.status();
  }

  // Grows the buffer to 4 times its size (moving it if need be). Returns errno, 0 on success.
  int GrowBuffer() {
    void* q = mremap(buf_, buf_len_, 4 * buf_len_, MREMAP_MAYMOVE);
    if (q == MAP_FAILED) return errno;
    buf_ = static_cast<char*>(q);
    buf_len_ *= 4;
    return 0;
  }

  // Moves the buffer to another address (same size). Returns errno, 0 on success.
  int MoveBuffer() {
    void* target = mmap(nullptr, buf_len_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (target == MAP_FAILED) return errno;
    void* q = mremap(buf_, buf_len_, buf_len_, MREMAP_MAYMOVE | MREMAP_FIXED, target);
    if (q == MAP_FAILED) {
      int err = errno;
      munmap(target, buf_len_);
      return err;
    }
    buf_ = static_cast<char*>(q);
    return 0;
  }

  PinRegistrar pin_;
  FailOnceRegistrar registrar_{&pin_};
  std::unique_ptr<RegistrationCache> cache_;
  char* buf_ = nullptr;
  size_t buf_len_ = 0;
};

TEST_P(UffdUnwatchTest, MremapGrowsBufferAfterInvalidateAndFlush) {
  char* p = MapBuffer();
  ASSERT_NE(p, nullptr);
  RegisterPages(cache_.get(), p, 4, 4);
  ASSERT_TRUE(cache_->Invalidate(p, kPages * kPage).ok());
  cache_->Flush();
  ASSERT_EQ(cache_->Stats().pinned_bytes, 0u);
  int err = GrowBuffer();
  EXPECT_EQ(err, 0) << std::strerror(err);
  if (err == 0) EXPECT_EQ(buf_[5 * kPage], 'A');
}

TEST_P(UffdUnwatchTest, MremapMovesBufferAfterInvalidateAndFlush) {
  char* p = MapBuffer();
  ASSERT_NE(p, nullptr);
  RegisterPages(cache_.get(), p, 4, 4);
  ASSERT_TRUE(cache_->Invalidate(p, kPages * kPage).ok());
  cache_->Flush();
  int err = MoveBuffer();
  EXPECT_EQ(err, 0) << std::strerror(err);
  if (err == 0) EXPECT_EQ(buf_[5 * kPage], 'A');
}

TEST_P(UffdUnwatchTest, MremapGrowsBufferAfterEviction) {
  auto cache = NewCache(/*max_regions=*/1);
  char* p = MapBuffer();
  ASSERT_NE(p, nullptr);
  RegisterPages(cache.get(), p, 4, 4);
  void* other = mmap(nullptr, kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(other, MAP_FAILED);
  RegisterPages(cache.get(), static_cast<char*>(other), 0, 1);  // evicts the buffer's region
  EXPECT_EQ(cache->Stats().evictions, 1u);
  cache->Flush();
  int err = GrowBuffer();
  EXPECT_EQ(err, 0) << std::strerror(err);
  cache.reset();
  munmap(other, kPage);
}

TEST_P(UffdUnwatchTest, MremapGrowsBufferAfterCacheDestroyed) {
  auto cache = NewCache();
  char* p = MapBuffer();
  ASSERT_NE(p, nullptr);
  RegisterPages(cache.get(), p, 2, 3);
  RegisterPages(cache.get(), p, 9, 2);
  cache.reset();
  int err = GrowBuffer();
  EXPECT_EQ(err, 0) << std::strerror(err);
}

TEST_P(UffdUnwatchTest, MremapGrowsBufferAfterMergedRegionDropped) {
  char* p = MapBuffer();
  ASSERT_NE(p, nullptr);
  RegisterPages(cache_.get(), p, 2, 3);
  RegisterPages(cache_.get(), p, 4, 4);  // merges with the first: one region, pages 2-7
  ASSERT_EQ(cache_->Stats().merges, 1u);
  ASSERT_TRUE(cache_->Invalidate(p, kPages * kPage).ok());
  cache_->Flush();
  int err = GrowBuffer();
  EXPECT_EQ(err, 0) << std::strerror(err);
}

TEST_P(UffdUnwatchTest, FailedRegistrationLeavesNothingWatched) {
  char* p = MapBuffer();
  ASSERT_NE(p, nullptr);
  registrar_.FailNext();
  EXPECT_FALSE(cache_->Acquire(p + 4 * kPage, 4 * kPage, kRw).ok());
  int err = GrowBuffer();
  EXPECT_EQ(err, 0) << std::strerror(err);
}

// The limit of pinning by mlock: a buffer part of which is still registered spans several
// mappings, and mremap cannot grow it (docs/RELIABILITY.md).
TEST_P(UffdUnwatchTest, MremapCannotGrowBufferStillRegistered) {
  char* p = MapBuffer();
  ASSERT_NE(p, nullptr);
  RegisterPages(cache_.get(), p, 4, 4);
  EXPECT_EQ(GrowBuffer(), EFAULT);
}

INSTANTIATE_TEST_SUITE_P(Monitors, UffdUnwatchTest,
                         ::testing::Values(MemoryMonitorMode::kUffd, MemoryMonitorMode::kAuto),
                         [](const testing::TestParamInfo<MemoryMonitorMode>& info) {
                           return info.param == MemoryMonitorMode::kUffd ? "Uffd" : "Auto";
                         });

// userfaultfd alone, so that only it can report the munmaps below.
class UffdOverlapTest : public UffdUnwatchTest {};

TEST_P(UffdOverlapTest, DroppingOneRegionKeepsTheOverlapWatched) {
  auto cache = NewCache(/*max_regions=*/0, /*merge=*/false);
  char* p = MapBuffer();
  ASSERT_NE(p, nullptr);
  RegisterPages(cache.get(), p, 0, 8);
  RegisterPages(cache.get(), p, 4, 8);  // pages 4-11: overlaps the first on 4-7
  ASSERT_EQ(cache->Stats().regions, 2u);
  ASSERT_EQ(*cache->Invalidate(p, kPage), 1u);  // only the first covers page 0
  cache->Flush();
  ASSERT_EQ(cache->Stats().regions, 1u);
  // Unmap only pages the two shared: the second region must still learn of it.
  ASSERT_EQ(munmap(p + 4 * kPage, 4 * kPage), 0);
  cache->Flush();
  EXPECT_EQ(cache->Stats().regions, 0u) << "the munmap of a region's pages went unreported";
}

TEST_P(UffdOverlapTest, DroppingBothOverlappingRegionsUnwatches) {
  auto cache = NewCache(/*max_regions=*/0, /*merge=*/false);
  char* p = MapBuffer();
  ASSERT_NE(p, nullptr);
  RegisterPages(cache.get(), p, 0, 8);
  RegisterPages(cache.get(), p, 4, 8);
  ASSERT_EQ(*cache->Invalidate(p, kPage), 1u);
  cache->Flush();
  int err = GrowBuffer();
  EXPECT_EQ(err, EFAULT) << "the second region is still registered";
  ASSERT_EQ(*cache->Invalidate(p, kPages * kPage), 1u);
  cache->Flush();
  err = GrowBuffer();
  EXPECT_EQ(err, 0) << std::strerror(err);
}

TEST_P(UffdOverlapTest, DestroyingOneCacheKeepsTheOtherCachesRangeWatched) {
  auto a = NewCache();
  auto b = NewCache();
  char* p = MapBuffer();
  ASSERT_NE(p, nullptr);
  RegisterPages(a.get(), p, 0, 8);
  RegisterPages(b.get(), p, 0, 8);
  a.reset();
  ASSERT_EQ(munmap(p + 2 * kPage, 2 * kPage), 0);
  b->Flush();
  EXPECT_EQ(b->Stats().regions, 0u) << "the munmap of a region's pages went unreported";
}

// The race Unwatch must not lose: a region of an old mapping is deregistered after a new mapping
// took its address and another cache watched it. Its Unwatch must leave the new one watched.
TEST_P(UffdOverlapTest, UnwatchOfAnOldMappingKeepsANewMappingWatched) {
  auto old_cache = NewCache(0, true, /*reclaimer_thread=*/false);  // deregisters only in Flush
  auto new_cache = NewCache();
  char* p = MapBuffer();
  ASSERT_NE(p, nullptr);
  RegisterPages(old_cache.get(), p, 0, 8);
  ASSERT_EQ(munmap(p, kPages * kPage), 0);
  void* q = mmap(p, kPages * kPage, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
  if (q == MAP_FAILED) {
    buf_ = nullptr;
    GTEST_SKIP() << "another mapping took the address: " << std::strerror(errno);
  }
  std::memset(p, 'B', kPages * kPage);
  RegisterPages(new_cache.get(), p, 0, 8);
  old_cache->Flush();  // drops and deregisters the old region: Unwatch of [0, 8)
  ASSERT_EQ(old_cache->Stats().pinned_bytes, 0u);
  ASSERT_EQ(munmap(p + 2 * kPage, 2 * kPage), 0);
  new_cache->Flush();
  EXPECT_EQ(new_cache->Stats().regions, 0u) << "the munmap of a region's pages went unreported";
}

INSTANTIATE_TEST_SUITE_P(UffdOnly, UffdOverlapTest, ::testing::Values(MemoryMonitorMode::kUffd),
                         [](const testing::TestParamInfo<MemoryMonitorMode>&) { return "Uffd"; });

}  // namespace
}  // namespace sanreg
