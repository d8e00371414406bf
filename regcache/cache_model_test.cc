// Model test: random Acquire / release / Invalidate sequences checked step by step against a
// brute-force model of the cache's rules (hit iff a live region covers with the rights; a miss
// merges the overlapping regions whose rights the request covers; exact LRU eviction of idle
// regions under max_regions; Invalidate kills every overlapping region; a dead region is
// deregistered once its last reference goes).

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>

#include "regcache/cache.h"
#include "regcache/fake_registrar.h"
#include "regcache/test_seed.h"

namespace sanreg {
namespace {

const uintptr_t kPage = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
const uintptr_t kBase = uintptr_t{1} << 36;

struct ModelRegion {
  uintptr_t start, end;
  uint32_t access;
  uint64_t handle;
  int refs = 0;
  bool alive = true;
  uint64_t last_use = 0;  // logical clock of creation or last release
};

struct Held {
  RegionRef ref;
  size_t model_index;
};

struct Config {
  bool merge;
  size_t max_regions;
};

class CacheModelTest : public ::testing::TestWithParam<Config> {};

TEST_P(CacheModelTest, MatchesBruteForceModel) {
  const Config cfg = GetParam();
  const uint64_t seed = TestSeed();
  std::printf("CacheModelTest merge=%d max_regions=%zu seed=%llu (SANREG_SEED to replay)\n",
              cfg.merge, cfg.max_regions, static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);

  FakeRegistrar fake;
  RegistrationCache::Options o;
  o.merge = cfg.merge;
  o.max_regions = cfg.max_regions;
  o.reclaimer_thread = false;  // deterministic: deregistration happens in Flush
  ASSERT_TRUE(o.ApplyEnvironment().ok());
  auto created = RegistrationCache::Create(&fake, o);
  ASSERT_TRUE(created.ok());
  std::unique_ptr<RegistrationCache> cache = std::move(*created);

  std::vector<ModelRegion> model;
  std::vector<Held> held;
  uint64_t clock = 0;
  const uint32_t kAccesses[] = {kAccessLocalRead, kAccessLocalRead | kAccessLocalWrite,
                                kAccessLocalRead | kAccessRemoteRead,
                                kAccessLocalRead | kAccessLocalWrite | kAccessRemoteWrite};
  const int kSpacePages = 64;

  auto live_covering = [&](uintptr_t a, uintptr_t b, uint32_t access) {
    std::vector<size_t> out;
    for (size_t i = 0; i < model.size(); ++i) {
      const ModelRegion& m = model[i];
      if (m.alive && m.start <= a && m.end >= b && AccessCovers(m.access, access)) {
        out.push_back(i);
      }
    }
    return out;
  };
  auto alive_count = [&] {
    return std::count_if(model.begin(), model.end(), [](const ModelRegion& m) { return m.alive; });
  };

  constexpr int kSteps = 100000;
  for (int step = 0; step < kSteps; ++step) {
    SCOPED_TRACE(testing::Message() << "step " << step << " seed " << seed);
    int op = rng() % 10;
    if (op < 5) {
      uintptr_t a = kBase + (rng() % kSpacePages) * kPage + rng() % kPage;
      size_t len = 1 + rng() % (4 * kPage);
      uint32_t access = kAccesses[rng() % 4];
      auto hits = live_covering(a, a + len, access);
      auto got = cache->Acquire(a, len, access);
      if (!hits.empty()) {
        ASSERT_TRUE(got.ok()) << got.status();
        auto it = std::find_if(hits.begin(), hits.end(), [&](size_t i) {
          return model[i].handle == got->registration().handle;
        });
        ASSERT_NE(it, hits.end()) << "a hit must return a live covering region";
        model[*it].refs++;
        held.push_back({std::move(*got), *it});
        continue;
      }
      // A miss, as the model sees it.
      uintptr_t s = a & ~(kPage - 1);
      uintptr_t e = (a + len + kPage - 1) & ~(kPage - 1);
      if (cfg.merge) {
        uintptr_t s0 = s, e0 = e;
        for (ModelRegion& m : model) {
          if (m.alive && m.start < e0 && m.end > s0 && AccessCovers(access, m.access)) {
            s = std::min(s, m.start);
            e = std::max(e, m.end);
            m.alive = false;
          }
        }
      }
      bool expect_full = false;
      while (cfg.max_regions != 0 && static_cast<size_t>(alive_count()) + 1 > cfg.max_regions) {
        ModelRegion* lru = nullptr;
        for (ModelRegion& m : model) {
          if (m.alive && m.refs == 0 && (lru == nullptr || m.last_use < lru->last_use)) lru = &m;
        }
        if (lru == nullptr) {
          expect_full = true;
          break;
        }
        lru->alive = false;
      }
      if (expect_full) {
        ASSERT_EQ(got.status().code(), absl::StatusCode::kResourceExhausted) << got.status();
        continue;
      }
      ASSERT_TRUE(got.ok()) << got.status();
      ASSERT_EQ(got->start(), s);
      ASSERT_EQ(got->start() + got->length(), e);
      ASSERT_EQ(got->access(), access);
      for (const ModelRegion& m : model) {
        ASSERT_NE(m.handle, got->registration().handle) << "a miss must register anew";
      }
      model.push_back({s, e, access, got->registration().handle, 1, true, ++clock});
      held.push_back({std::move(*got), model.size() - 1});
    } else if (op < 8) {
      if (held.empty()) continue;
      size_t i = rng() % held.size();
      ModelRegion& m = model[held[i].model_index];
      held[i].ref.Reset();
      m.refs--;
      m.last_use = ++clock;
      held[i] = std::move(held.back());
      held.pop_back();
    } else {
      uintptr_t a = kBase + (rng() % kSpacePages) * kPage + rng() % kPage;
      size_t len = 1 + rng() % (8 * kPage);
      size_t want = 0;
      for (ModelRegion& m : model) {
        if (m.alive && m.start < a + len && m.end > a) {
          m.alive = false;
          ++want;
        }
      }
      auto n = cache->Invalidate(a, len);
      ASSERT_TRUE(n.ok());
      ASSERT_EQ(*n, want);
    }
    if (step % 1000 == 0) {
      cache->Flush();
      size_t registered = std::count_if(model.begin(), model.end(),
                                        [](const ModelRegion& m) { return m.alive || m.refs > 0; });
      ASSERT_EQ(fake.live_registrations(), registered);
      ASSERT_EQ(cache->Stats().regions, static_cast<uint64_t>(alive_count()));
      ASSERT_EQ(fake.bad_deregistrations(), 0u);
      // Forget regions that are gone for good, keeping indices of held ones valid.
      std::vector<size_t> remap(model.size(), ~size_t{0});
      std::vector<ModelRegion> kept;
      for (size_t i = 0; i < model.size(); ++i) {
        if (model[i].alive || model[i].refs > 0) {
          remap[i] = kept.size();
          kept.push_back(model[i]);
        }
      }
      for (Held& h : held) h.model_index = remap[h.model_index];
      model.swap(kept);
    }
  }
  if (cfg.max_regions != 0) {
    EXPECT_GT(cache->Stats().evictions, 0u) << "the limit was never exercised";
  }
  held.clear();
  cache->Flush();
  ASSERT_EQ(fake.live_registrations(), static_cast<size_t>(alive_count()));
  cache.reset();
  EXPECT_EQ(fake.live_registrations(), 0u);
  EXPECT_EQ(fake.bad_deregistrations(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Configs, CacheModelTest,
                         ::testing::Values(Config{false, 0}, Config{true, 0}, Config{false, 8},
                                           Config{true, 8}),
                         [](const testing::TestParamInfo<Config>& info) {
                           return std::string(info.param.merge ? "Merge" : "NoMerge") +
                                  (info.param.max_regions ? "Limit" : "NoLimit");
                         });

}  // namespace
}  // namespace sanreg
