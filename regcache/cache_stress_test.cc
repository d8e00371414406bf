// Concurrency stress: threads acquire, release and invalidate overlapping ranges at once. Checked
// on every step: a returned region covers the request with the rights; no Acquire returns a region
// registered before an Invalidate of an overlapping range that completed before the Acquire began
// (no stale registration); no region a thread holds is deregistered while it holds it (whether a
// hazard slot or a counted reference holds it); at the end everything is deregistered exactly once.
// Run under --config=tsan too.

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "regcache/cache.h"
#include "regcache/fake_registrar.h"
#include "regcache/test_seed.h"

namespace sanreg {
namespace {

const uintptr_t kPage = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
const uintptr_t kBase = uintptr_t{1} << 40;
constexpr int kPages = 48;
constexpr size_t kMaxHandles = 1 << 22;

// Stamps each registration with a global sequence number taken under the cache lock.
class StampingRegistrar : public Registrar {
 public:
  explicit StampingRegistrar(std::atomic<uint64_t>* seq)
      : seq_(seq), births_(kMaxHandles), gone_(kMaxHandles) {}
  absl::StatusOr<Registration> Register(uintptr_t a, size_t n, uint32_t access) override {
    auto r = fake_.Register(a, n, access);
    if (r.ok() && r->handle < kMaxHandles) births_[r->handle].store(seq_->fetch_add(1) + 1);
    return r;
  }
  absl::Status Deregister(const Registration& reg) override {
    if (reg.handle < kMaxHandles) gone_[reg.handle].store(true);
    return fake_.Deregister(reg);
  }
  uint64_t Birth(uint64_t handle) const { return births_[handle].load(); }
  bool Gone(uint64_t handle) const { return handle < kMaxHandles && gone_[handle].load(); }
  FakeRegistrar fake_;

 private:
  std::atomic<uint64_t>* seq_;
  std::vector<std::atomic<uint64_t>> births_;
  std::vector<std::atomic<bool>> gone_;
};

struct StressConfig {
  bool merge;
  size_t max_regions;
  bool hazards = true;  // Options::hazard_references
};

class CacheStressTest : public ::testing::TestWithParam<StressConfig> {};

TEST_P(CacheStressTest, ConcurrentAcquireReleaseInvalidateKeepInvariants) {
  const StressConfig cfg = GetParam();
  const uint64_t seed = TestSeed();
  std::printf("CacheStressTest merge=%d max_regions=%zu hazards=%d seed=%llu\n", cfg.merge,
              cfg.max_regions, cfg.hazards, static_cast<unsigned long long>(seed));
  std::atomic<uint64_t> seq{0};
  StampingRegistrar reg(&seq);
  RegistrationCache::Options o;
  o.merge = cfg.merge;
  o.max_regions = cfg.max_regions;
  o.hazard_references = cfg.hazards;
  auto created = RegistrationCache::Create(&reg, o);
  ASSERT_TRUE(created.ok());
  std::unique_ptr<RegistrationCache> cache = std::move(*created);

  // invalidated[p]: the start stamp of the latest Invalidate covering page p that has returned.
  std::vector<std::atomic<uint64_t>> invalidated(kPages);
  std::atomic<uint64_t> failures{0}, stale{0}, uncovering{0}, acquires{0}, lost{0};

  const int kThreads = 4;
  const int kOps = 40000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(seed + t);
      std::vector<RegionRef> held;
      // Drops held[i], having checked that its registration is still there.
      auto drop = [&](size_t i) {
        if (reg.Gone(held[i].registration().handle)) lost.fetch_add(1);
        held.erase(held.begin() + static_cast<std::ptrdiff_t>(i));
      };
      const uint32_t kAcc[] = {kAccessLocalRead, kAccessLocalRead | kAccessLocalWrite,
                               kAccessLocalRead | kAccessRemoteRead};
      for (int i = 0; i < kOps; ++i) {
        int op = rng() % 16;
        if (op < 10) {
          int p = rng() % (kPages - 4);
          uintptr_t a = kBase + p * kPage + rng() % kPage;
          size_t len = 1 + rng() % (3 * kPage);
          uint32_t access = kAcc[rng() % 3];
          uint64_t first = (a - kBase) / kPage, last = (a + len - 1 - kBase) / kPage;
          uint64_t before = 0;
          for (uint64_t q = first; q <= last; ++q) {
            before = std::max(before, invalidated[q].load());
          }
          auto r = cache->Acquire(a, len, access);
          if (!r.ok()) {
            // Only a full cache may refuse.
            if (r.status().code() != absl::StatusCode::kResourceExhausted || cfg.max_regions == 0) {
              failures.fetch_add(1);
            }
            continue;
          }
          acquires.fetch_add(1);
          if (r->start() > a || r->start() + r->length() < a + len ||
              !AccessCovers(r->access(), access)) {
            uncovering.fetch_add(1);
          }
          if (reg.Birth(r->registration().handle) < before) stale.fetch_add(1);
          held.push_back(std::move(*r));
          // Up to 8 held: more than a thread's hazard slots, so counted references mix in.
          if (held.size() > 8) drop(rng() % held.size());
        } else if (op < 15) {
          if (!held.empty()) drop(rng() % held.size());
        } else {
          int p = rng() % kPages;
          int n = 1 + rng() % 4;
          if (p + n > kPages) n = kPages - p;
          uint64_t stamp = seq.fetch_add(1) + 1;
          auto k = cache->Invalidate(kBase + p * kPage, n * kPage);
          if (!k.ok()) failures.fetch_add(1);
          for (int q = p; q < p + n; ++q) {
            uint64_t cur = invalidated[q].load();
            while (cur < stamp && !invalidated[q].compare_exchange_weak(cur, stamp)) {
            }
          }
        }
      }
      while (!held.empty()) drop(held.size() - 1);
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0u);
  EXPECT_EQ(uncovering.load(), 0u);
  EXPECT_EQ(stale.load(), 0u) << "an Acquire returned a region invalidated before it began";
  EXPECT_EQ(lost.load(), 0u) << "a held region was deregistered";
  EXPECT_GT(acquires.load(), 0u);
  CacheStats s = cache->Stats();
  EXPECT_GT(s.hits, 0u);
  EXPECT_GT(s.invalidations, 0u);
  std::printf("acquires=%llu hits=%llu registrations=%llu invalidations=%llu evictions=%llu\n",
              static_cast<unsigned long long>(acquires.load()),
              static_cast<unsigned long long>(s.hits),
              static_cast<unsigned long long>(s.registrations),
              static_cast<unsigned long long>(s.invalidations),
              static_cast<unsigned long long>(s.evictions));
  cache->Flush();
  EXPECT_EQ(reg.fake_.live_registrations(), s.regions);
  cache.reset();
  EXPECT_EQ(reg.fake_.live_registrations(), 0u);
  EXPECT_EQ(reg.fake_.bad_deregistrations(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Configs, CacheStressTest,
                         ::testing::Values(StressConfig{false, 0}, StressConfig{true, 0},
                                           StressConfig{true, 16}, StressConfig{false, 16},
                                           StressConfig{true, 16, false}),
                         [](const testing::TestParamInfo<StressConfig>& info) {
                           return std::string(info.param.merge ? "Merge" : "NoMerge") +
                                  (info.param.max_regions ? "Limit" : "NoLimit") +
                                  (info.param.hazards ? "" : "Counted");
                         });

}  // namespace
}  // namespace sanreg
