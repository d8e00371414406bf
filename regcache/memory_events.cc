#include "regcache/memory_events.h"

#include <sched.h>

#include <algorithm>

namespace sanreg {
namespace {

struct Slot {
  std::atomic<InvalidationQueue*> queue{nullptr};
  std::atomic<uint32_t> sources{0};
  std::atomic<int> users{0};
};

// Zero-initialised statics (no constructor runs): usable from hooks that fire before main.
Slot g_slots[kMaxSubscribers];
std::atomic<int> g_subscribers{0};
std::atomic<int> g_slot_limit{0};  // one past the highest slot ever used
std::atomic<uint64_t> g_counts[static_cast<int>(MemoryEventSource::kCount)]
                              [static_cast<int>(MemoryEventKind::kCount)];
std::atomic<uintptr_t> g_probe_page{0};
std::atomic<bool> g_probe_seen[static_cast<int>(MemoryEventSource::kCount)];

}  // namespace

void InvalidationQueue::Lock() {
  while (lock_.test_and_set(std::memory_order_acquire)) {
    // Held for a few instructions by someone else; on one core, let them run.
    sched_yield();
  }
}

void InvalidationQueue::Push(uintptr_t start, uintptr_t end) {
  if (end <= start) return;
  pending_.fetch_add(1, std::memory_order_acq_rel);
  Lock();
  ++undrained_;
  bool merged = false;
  for (int i = 0; i < size_; ++i) {
    Range& r = ranges_[i];
    if (start <= r.end && end >= r.start) {  // overlapping or adjacent
      r.start = std::min(r.start, start);
      r.end = std::max(r.end, end);
      merged = true;
      break;
    }
  }
  if (!merged) {
    if (size_ < kCapacity) {
      ranges_[size_++] = {start, end};
    } else {
      ranges_[0].start = std::min(ranges_[0].start, start);
      ranges_[0].end = std::max(ranges_[0].end, end);
      overflows_.fetch_add(1, std::memory_order_relaxed);
    }
  }
  Unlock();
}

int InvalidationQueue::Drain(Range* out, uint32_t* taken) {
  Lock();
  int n = size_;
  std::copy(ranges_.begin(), ranges_.begin() + n, out);
  size_ = 0;
  *taken = undrained_;
  undrained_ = 0;
  Unlock();
  return n;
}

bool SubscribeMemoryEvents(InvalidationQueue* q, uint32_t sources) {
  for (int i = 0; i < kMaxSubscribers; ++i) {
    InvalidationQueue* expected = nullptr;
    // The mask is written before the queue is published; a stale mask from the slot's previous
    // owner can only make a publisher push to q an event it did not ask for (more invalidation).
    if (g_slots[i].queue.load(std::memory_order_acquire) != nullptr) continue;
    g_slots[i].sources.store(sources, std::memory_order_release);
    if (g_slots[i].queue.compare_exchange_strong(expected, q, std::memory_order_acq_rel)) {
      int limit = g_slot_limit.load(std::memory_order_relaxed);
      while (limit < i + 1 &&
             !g_slot_limit.compare_exchange_weak(limit, i + 1, std::memory_order_acq_rel)) {
      }
      g_subscribers.fetch_add(1, std::memory_order_acq_rel);
      return true;
    }
  }
  return false;
}

void UnsubscribeMemoryEvents(InvalidationQueue* q) {
  for (int i = 0; i < kMaxSubscribers; ++i) {
    if (g_slots[i].queue.load(std::memory_order_acquire) != q) continue;
    g_slots[i].queue.store(nullptr, std::memory_order_seq_cst);
    g_subscribers.fetch_sub(1, std::memory_order_acq_rel);
    // Grace period: a publisher that loaded q before the store above finishes with it.
    while (g_slots[i].users.load(std::memory_order_seq_cst) != 0) sched_yield();
    return;
  }
}

bool MemoryEventsWanted() { return g_subscribers.load(std::memory_order_acquire) != 0; }

void PublishMemoryEvent(uintptr_t addr, size_t len, MemoryEventKind kind,
                        MemoryEventSource source) {
  if (len == 0) return;
  const uintptr_t end = addr + len < addr ? ~uintptr_t{0} : addr + len;
  if (MemoryEventsWanted()) {
    const int limit = g_slot_limit.load(std::memory_order_acquire);
    for (int i = 0; i < limit; ++i) {
      Slot& slot = g_slots[i];
      if (slot.queue.load(std::memory_order_relaxed) == nullptr) continue;
      if ((slot.sources.load(std::memory_order_acquire) & (1u << static_cast<int>(source))) == 0) {
        continue;
      }
      slot.users.fetch_add(1, std::memory_order_seq_cst);
      if (InvalidationQueue* q = slot.queue.load(std::memory_order_seq_cst)) q->Push(addr, end);
      slot.users.fetch_sub(1, std::memory_order_seq_cst);
    }
  }
  // Counted and probed after the queues have it: a count that moved means the range is queued.
  g_counts[static_cast<int>(source)][static_cast<int>(kind)].fetch_add(1,
                                                                       std::memory_order_acq_rel);
  uintptr_t probe = g_probe_page.load(std::memory_order_acquire);
  if (probe != 0 && probe >= addr && probe < end) {
    g_probe_seen[static_cast<int>(source)].store(true, std::memory_order_release);
  }
}

void ArmMemoryEventProbe(uintptr_t page) {
  for (auto& seen : g_probe_seen) seen.store(false, std::memory_order_relaxed);
  g_probe_page.store(page, std::memory_order_release);
}

bool MemoryEventProbeSeen(MemoryEventSource source) {
  return g_probe_seen[static_cast<int>(source)].load(std::memory_order_acquire);
}

uint64_t MemoryEventCount(MemoryEventSource source, MemoryEventKind kind) {
  return g_counts[static_cast<int>(source)][static_cast<int>(kind)].load(std::memory_order_acquire);
}

}  // namespace sanreg
