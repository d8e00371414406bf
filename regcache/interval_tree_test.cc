// Tests for IntervalTree: unit cases and a model test against a brute-force list.

#include "regcache/interval_tree.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "regcache/test_seed.h"

namespace sanreg {
namespace {

using Tree = IntervalTree<int>;

std::vector<int> Overlapping(const Tree& t, uintptr_t a, uintptr_t b) {
  std::vector<int> out;
  t.VisitOverlapping(a, b, [&](Tree::Handle h) { out.push_back(Tree::Value(h)); });
  std::sort(out.begin(), out.end());
  return out;
}

TEST(IntervalTreeTest, EmptyTreeFindsNothing) {
  Tree t;
  EXPECT_EQ(t.FindCovering(0, 1, [](int, uintptr_t, uintptr_t) { return true; }), nullptr);
  EXPECT_TRUE(Overlapping(t, 0, ~uintptr_t{0}).empty());
  EXPECT_TRUE(t.CheckInvariants());
}

TEST(IntervalTreeTest, FindsCoveringIntervalOnly) {
  Tree t;
  t.Insert(100, 200, 1);
  t.Insert(150, 400, 2);
  t.Insert(50, 120, 3);
  auto any = [](int, uintptr_t, uintptr_t) { return true; };
  auto h = t.FindCovering(160, 300, any);
  ASSERT_NE(h, nullptr);
  EXPECT_EQ(Tree::Value(h), 2);
  EXPECT_EQ(t.FindCovering(40, 60, any), nullptr);  // starts before every interval
  EXPECT_EQ(t.FindCovering(100, 401, any), nullptr);
  h = t.FindCovering(100, 200, any);
  ASSERT_NE(h, nullptr);
  EXPECT_EQ(Tree::Value(h), 1);
}

TEST(IntervalTreeTest, PredicateSkipsIntervals) {
  Tree t;
  t.Insert(0, 1000, 1);
  t.Insert(0, 1000, 2);
  auto h = t.FindCovering(10, 20, [](int v, uintptr_t, uintptr_t) { return v == 2; });
  ASSERT_NE(h, nullptr);
  EXPECT_EQ(Tree::Value(h), 2);
  EXPECT_EQ(t.FindCovering(10, 20, [](int v, uintptr_t, uintptr_t) { return v == 3; }), nullptr);
}

TEST(IntervalTreeTest, HalfOpenBoundsDoNotOverlap) {
  Tree t;
  t.Insert(100, 200, 1);
  EXPECT_TRUE(Overlapping(t, 200, 300).empty());
  EXPECT_TRUE(Overlapping(t, 0, 100).empty());
  EXPECT_EQ(Overlapping(t, 199, 200), std::vector<int>{1});
}

TEST(IntervalTreeTest, EraseRemovesOnlyThatInterval) {
  Tree t;
  auto a = t.Insert(100, 200, 1);
  t.Insert(100, 200, 2);
  t.Erase(a);
  EXPECT_EQ(Overlapping(t, 0, 1000), std::vector<int>{2});
  EXPECT_EQ(t.size(), 1u);
  EXPECT_TRUE(t.CheckInvariants());
}

TEST(IntervalTreeTest, StaysBalancedUnderSortedInserts) {
  Tree t;
  std::vector<Tree::Handle> hs;
  for (int i = 0; i < 100000; ++i) hs.push_back(t.Insert(i * 10, i * 10 + 5, i));
  EXPECT_TRUE(t.CheckInvariants());
  for (int i = 0; i < 100000; i += 2) t.Erase(hs[i]);
  EXPECT_TRUE(t.CheckInvariants());
  EXPECT_EQ(t.size(), 50000u);
  EXPECT_EQ(Overlapping(t, 10, 25), std::vector<int>{1});
}

// Insert rebalances with early exits: the invariants must hold after every single insert, in
// ascending, descending and random order, with duplicate starts.
TEST(IntervalTreeTest, InvariantsHoldAfterEveryInsert) {
  std::mt19937_64 rng(TestSeed());
  for (int order = 0; order < 3; ++order) {
    Tree t;
    for (int i = 0; i < 1500; ++i) {
      uintptr_t start = order == 0 ? i : order == 1 ? 3000 - i : rng() % 500;
      t.Insert(start, start + 1 + rng() % 700, i);
      ASSERT_TRUE(t.CheckInvariants()) << "order " << order << " insert " << i;
    }
  }
}

// Model test: random inserts, erases and queries checked against a brute-force list.
TEST(IntervalTreeTest, MatchesBruteForceModel) {
  const uint64_t seed = TestSeed();
  std::printf("IntervalTreeTest.MatchesBruteForceModel seed=%llu (SANREG_SEED to replay)\n",
              static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  struct Item {
    uintptr_t start, end;
    int id;
    Tree::Handle h;
  };
  Tree t;
  std::vector<Item> model;
  int next_id = 0;
  const uintptr_t kSpace = 4096;
  auto rand_range = [&](uintptr_t* a, uintptr_t* b) {
    *a = rng() % kSpace;
    *b = *a + 1 + rng() % 300;
  };
  constexpr int kSteps = 200000;
  for (int step = 0; step < kSteps; ++step) {
    int op = rng() % 10;
    uintptr_t a, b;
    rand_range(&a, &b);
    if (op < 3 || model.empty()) {
      int id = next_id++;
      model.push_back({a, b, id, t.Insert(a, b, id)});
    } else if (op < 5) {
      size_t i = rng() % model.size();
      t.Erase(model[i].h);
      model[i] = model.back();
      model.pop_back();
    } else if (op < 8) {
      // Covering query with a predicate that accepts ids of one parity.
      int parity = rng() % 2;
      auto pred = [&](int id, uintptr_t, uintptr_t) { return id % 2 == parity; };
      auto h = t.FindCovering(a, b, pred);
      bool exists = std::any_of(model.begin(), model.end(), [&](const Item& it) {
        return it.start <= a && it.end >= b && it.id % 2 == parity;
      });
      ASSERT_EQ(h != nullptr, exists) << "step " << step << " seed " << seed;
      if (h != nullptr) {
        ASSERT_LE(Tree::Start(h), a);
        ASSERT_GE(Tree::End(h), b);
        ASSERT_EQ(Tree::Value(h) % 2, parity);
      }
    } else {
      std::vector<int> want;
      for (const Item& it : model) {
        if (it.start < b && it.end > a) want.push_back(it.id);
      }
      std::sort(want.begin(), want.end());
      ASSERT_EQ(Overlapping(t, a, b), want) << "step " << step << " seed " << seed;
    }
    ASSERT_EQ(t.size(), model.size());
    if (step % 10000 == 0) {
      ASSERT_TRUE(t.CheckInvariants()) << "step " << step;
    }
  }
  EXPECT_TRUE(t.CheckInvariants());
}

}  // namespace
}  // namespace sanreg
