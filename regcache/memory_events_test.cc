// Unit tests of the memory-event registry and the bounded invalidation queue.

#include "regcache/memory_events.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

namespace sanreg {
namespace {

std::vector<InvalidationQueue::Range> DrainAll(InvalidationQueue& q) {
  InvalidationQueue::Range r[InvalidationQueue::kCapacity];
  uint32_t taken = 0;
  int n = q.Drain(r, &taken);
  q.Complete(taken);
  return std::vector<InvalidationQueue::Range>(r, r + n);
}

TEST(InvalidationQueueTest, OverlappingAndAdjacentRangesMerge) {
  InvalidationQueue q;
  q.Push(100, 200);
  q.Push(150, 300);  // overlaps
  q.Push(300, 400);  // adjacent
  q.Push(1000, 1100);
  auto r = DrainAll(q);
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0].start, 100u);
  EXPECT_EQ(r[0].end, 400u);
  EXPECT_EQ(r[1].start, 1000u);
  EXPECT_EQ(q.pending(), 0u);
}

TEST(InvalidationQueueTest, FullQueueWidensInsteadOfDropping) {
  InvalidationQueue q;
  for (int i = 0; i < InvalidationQueue::kCapacity + 10; ++i) q.Push(i * 100, i * 100 + 10);
  auto r = DrainAll(q);
  ASSERT_EQ(r.size(), static_cast<size_t>(InvalidationQueue::kCapacity));
  EXPECT_EQ(q.overflows(), 10u);
  // Every pushed range is covered by some drained range.
  for (int i = 0; i < InvalidationQueue::kCapacity + 10; ++i) {
    uintptr_t s = i * 100, e = s + 10;
    bool covered = false;
    for (auto& x : r) covered |= x.start <= s && x.end >= e;
    EXPECT_TRUE(covered) << "range " << i << " was lost";
  }
}

TEST(InvalidationQueueTest, PendingStaysUntilComplete) {
  InvalidationQueue q;
  q.Push(0, 10);
  EXPECT_NE(q.pending(), 0u);
  InvalidationQueue::Range r[InvalidationQueue::kCapacity];
  uint32_t taken = 0;
  ASSERT_EQ(q.Drain(r, &taken), 1);
  EXPECT_NE(q.pending(), 0u) << "drained but not yet invalidated: lookups must still wait";
  q.Push(20, 30);  // arrives meanwhile
  q.Complete(taken);
  EXPECT_NE(q.pending(), 0u) << "the later push is still pending";
  EXPECT_EQ(DrainAll(q).size(), 1u);
  EXPECT_EQ(q.pending(), 0u);
}

TEST(InvalidationQueueTest, EmptyRangeIsIgnored) {
  InvalidationQueue q;
  q.Push(10, 10);
  EXPECT_EQ(q.pending(), 0u);
}

TEST(MemoryEventsTest, PublishReachesEverySubscriberUntilUnsubscribed) {
  InvalidationQueue a, b;
  ASSERT_TRUE(SubscribeMemoryEvents(&a));
  ASSERT_TRUE(SubscribeMemoryEvents(&b));
  EXPECT_TRUE(MemoryEventsWanted());
  uint64_t before = MemoryEventCount(MemoryEventSource::kHooks, MemoryEventKind::kBrk);
  PublishMemoryEvent(4096, 8192, MemoryEventKind::kBrk, MemoryEventSource::kHooks);
  EXPECT_EQ(MemoryEventCount(MemoryEventSource::kHooks, MemoryEventKind::kBrk), before + 1);
  EXPECT_EQ(DrainAll(a).size(), 1u);
  EXPECT_EQ(DrainAll(b).size(), 1u);
  UnsubscribeMemoryEvents(&a);
  PublishMemoryEvent(4096, 8192, MemoryEventKind::kBrk, MemoryEventSource::kHooks);
  EXPECT_EQ(a.pending(), 0u);
  EXPECT_EQ(DrainAll(b).size(), 1u);
  UnsubscribeMemoryEvents(&b);
}

TEST(MemoryEventsTest, TooManySubscribersIsRefused) {
  // Nothing else in this test binary subscribes.
  std::vector<InvalidationQueue> qs(kMaxSubscribers + 1);
  for (int i = 0; i < kMaxSubscribers; ++i) ASSERT_TRUE(SubscribeMemoryEvents(&qs[i])) << i;
  EXPECT_FALSE(SubscribeMemoryEvents(&qs.back()));
  for (int i = 0; i < kMaxSubscribers; ++i) UnsubscribeMemoryEvents(&qs[i]);
  EXPECT_FALSE(MemoryEventsWanted());
}

// Unsubscribing while other threads publish: no publish touches a queue after Unsubscribe
// returns (checked by poisoning the queue's storage right after).
TEST(MemoryEventsTest, UnsubscribeWaitsForPublishersInFlight) {
  std::atomic<bool> stop{false};
  std::vector<std::thread> publishers;
  for (int t = 0; t < 2; ++t) {
    publishers.emplace_back([&] {
      while (!stop.load()) {
        PublishMemoryEvent(1 << 20, 4096, MemoryEventKind::kUnmap, MemoryEventSource::kHooks);
      }
    });
  }
  for (int round = 0; round < 2000; ++round) {
    auto* q = new InvalidationQueue;
    ASSERT_TRUE(SubscribeMemoryEvents(q));
    UnsubscribeMemoryEvents(q);
    delete q;  // ASan reports a use after free if a publisher still used it
  }
  stop.store(true);
  for (auto& t : publishers) t.join();
}

}  // namespace
}  // namespace sanreg
