// poll_lock_test.cc: PollLock: mutual exclusion under contention (try_lock and lock), try_lock on
// a held lock, and lock() waiting out a holder.

#include "datapath/internal/poll_lock.h"

#include <atomic>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace sanreg::internal {
namespace {

constexpr int kThreads = 4;
constexpr int kRounds = 200'000;

// Threads add to a plain counter under the lock; two holders at once show as a short total, and
// each holder checks that nobody else is inside. `blocking`: lock(), else try_lock() until it
// succeeds (as the progress passes do, one try per pass).
void CountUnderContention(bool blocking) {
  PollLock lock;
  uint64_t counter = 0;
  std::atomic<int> inside{0};
  std::atomic<int> overlaps{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kRounds; ++i) {
        if (blocking) {
          lock.lock();
        } else {
          while (!lock.try_lock()) {
          }
        }
        if (inside.fetch_add(1, std::memory_order_relaxed) != 0) overlaps.fetch_add(1);
        ++counter;
        inside.fetch_sub(1, std::memory_order_relaxed);
        lock.unlock();
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(counter, uint64_t{kThreads} * kRounds);
  EXPECT_EQ(overlaps.load(), 0);
}

TEST(PollLockTest, LockExcludesUnderContention) { CountUnderContention(true); }

TEST(PollLockTest, TryLockExcludesUnderContention) { CountUnderContention(false); }

TEST(PollLockTest, TryLockFailsWhileHeldAndSucceedsAfter) {
  PollLock lock;
  ASSERT_TRUE(lock.try_lock());
  bool other = true;
  std::thread([&] { other = lock.try_lock(); }).join();
  EXPECT_FALSE(other);
  lock.unlock();
  std::thread([&] {
    other = lock.try_lock();
    if (other) lock.unlock();
  }).join();
  EXPECT_TRUE(other);
}

// lock() returns only once the holder has let go: the holder's write, made just before its
// unlock, is what the waiter reads after its lock.
TEST(PollLockTest, LockWaitsForTheHolder) {
  for (int round = 0; round < 100; ++round) {
    PollLock lock;
    lock.lock();
    int value = 0;  // written under the lock only
    std::atomic<bool> started{false};
    int seen = -1;
    std::thread waiter([&] {
      started.store(true);
      std::lock_guard<PollLock> l(lock);
      seen = value;
    });
    while (!started.load()) std::this_thread::yield();
    value = round + 1;
    lock.unlock();
    waiter.join();
    EXPECT_EQ(seen, round + 1);
  }
}

}  // namespace
}  // namespace sanreg::internal
