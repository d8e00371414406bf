#include "regcache/internal/watch_table.h"

#include <gtest/gtest.h>

#include <random>
#include <utility>
#include <vector>

#include "regcache/test_seed.h"

namespace sanreg::internal {
namespace {

using Range = WatchTable::Range;

TEST(WatchTableTest, RemovingTheOnlyRangeReturnsIt) {
  WatchTable t;
  t.Add(10, 20);
  EXPECT_EQ(t.CountAt(10), 1u);
  EXPECT_EQ(t.CountAt(19), 1u);
  EXPECT_EQ(t.CountAt(20), 0u);
  EXPECT_EQ(t.Remove(10, 20), (std::vector<Range>{{10, 20}}));
  EXPECT_EQ(t.intervals(), 0u);
}

TEST(WatchTableTest, OverlapStaysUntilItsLastRangeGoes) {
  WatchTable t;
  t.Add(0, 8);
  t.Add(4, 12);
  EXPECT_EQ(t.CountAt(5), 2u);
  // Dropping the first frees only what the second does not cover.
  EXPECT_EQ(t.Remove(0, 8), (std::vector<Range>{{0, 4}}));
  EXPECT_EQ(t.CountAt(5), 1u);
  EXPECT_EQ(t.Remove(4, 12), (std::vector<Range>{{4, 12}}));
  EXPECT_EQ(t.intervals(), 0u);
}

TEST(WatchTableTest, SameRangeTwiceNeedsTwoRemoves) {
  WatchTable t;
  t.Add(0, 8);
  t.Add(0, 8);
  EXPECT_TRUE(t.Remove(0, 8).empty());
  EXPECT_EQ(t.Remove(0, 8), (std::vector<Range>{{0, 8}}));
}

TEST(WatchTableTest, InnerRangeLeavesTheOuterWatched) {
  WatchTable t;
  t.Add(0, 100);
  t.Add(40, 60);
  EXPECT_TRUE(t.Remove(40, 60).empty());
  EXPECT_EQ(t.intervals(), 1u);  // coalesced back into one
  EXPECT_EQ(t.Remove(0, 100), (std::vector<Range>{{0, 100}}));
}

TEST(WatchTableTest, ZeroRangesAroundAHeldMiddleComeBackSeparately) {
  WatchTable t;
  t.Add(0, 100);
  t.Add(40, 60);
  EXPECT_EQ(t.Remove(0, 100), (std::vector<Range>{{0, 40}, {60, 100}}));
  EXPECT_EQ(t.Remove(40, 60), (std::vector<Range>{{40, 60}}));
}

TEST(WatchTableTest, AdjacentRangesFreeTogether) {
  WatchTable t;
  t.Add(0, 10);
  t.Add(10, 20);
  EXPECT_EQ(t.intervals(), 1u);
  t.Add(5, 15);
  EXPECT_EQ(t.Remove(5, 15), std::vector<Range>{});
  EXPECT_EQ(t.Remove(0, 10), (std::vector<Range>{{0, 10}}));
  EXPECT_EQ(t.Remove(10, 20), (std::vector<Range>{{10, 20}}));
}

TEST(WatchTableTest, RemoveWithoutAddLeavesOthersAlone) {
  WatchTable t;
  t.Add(0, 10);
  EXPECT_EQ(t.Remove(20, 30), std::vector<Range>{});
  EXPECT_EQ(t.CountAt(5), 1u);
}

// Against a model: a count per unit, random overlapping adds and removes of added ranges.
TEST(WatchTableTest, MatchesAPerUnitModel) {
  const uint64_t seed = TestSeed();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  constexpr uintptr_t kUnits = 200;
  WatchTable t;
  std::vector<uint32_t> model(kUnits, 0);
  std::vector<std::pair<uintptr_t, uintptr_t>> live;
  for (int step = 0; step < 20000; ++step) {
    if (live.empty() || rng() % 2 == 0) {
      uintptr_t a = rng() % kUnits;
      uintptr_t b = a + 1 + rng() % (kUnits - a);
      t.Add(a, b);
      for (uintptr_t u = a; u < b; ++u) ++model[u];
      live.push_back({a, b});
    } else {
      size_t i = rng() % live.size();
      auto [a, b] = live[i];
      live[i] = live.back();
      live.pop_back();
      std::vector<Range> zero = t.Remove(a, b);
      // Expected: the maximal runs within [a, b) whose count falls to zero.
      std::vector<Range> want;
      for (uintptr_t u = a; u < b; ++u) {
        if (--model[u] != 0) continue;
        if (!want.empty() && want.back().end == u) {
          ++want.back().end;
        } else {
          want.push_back({u, u + 1});
        }
      }
      ASSERT_EQ(zero, want) << "step " << step << " seed " << seed;
    }
    for (uintptr_t u = 0; u < kUnits; u += 7) {
      ASSERT_EQ(t.CountAt(u), model[u]) << "unit " << u << " step " << step << " seed " << seed;
    }
  }
  for (auto [a, b] : live) t.Remove(a, b);
  EXPECT_EQ(t.intervals(), 0u);
}

}  // namespace
}  // namespace sanreg::internal
