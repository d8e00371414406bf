// memory_events.h: how changes to the address space reach every live RegistrationCache.
//
// Sources (memory_hooks.cc: interposed munmap, mremap, madvise, brk, sbrk, shmdt, mmap(MAP_FIXED);
// uffd_monitor.cc: a userfaultfd reader) call PublishMemoryEvent(addr, len, kind): the hooks both
// before the change (no lookup that starts after it begins finds the old region) and after it
// returns (a region registered while the change was under way is dropped too); userfaultfd as soon
// as the kernel reports it. Each
// subscribed cache owns an InvalidationQueue; a publish pushes the range into every queue and
// raises the queue's pending count, which the cache's hit path reads: while anything is pending,
// lookups take the slow path, which drains the queue (invalidating the ranges) first. So no lookup
// returns a region overlapping a pending invalidation.
//
// Hook rules (a hook may run on any thread, inside malloc, or in the cache's own registrar):
//   1. Publishing never allocates, never blocks on a lock the cache holds while allocating or
//      registering, and never deregisters. The queue's lock is a spinlock held only to copy a few
//      words (by a publisher, or by the drainer copying the queue out), never across a call.
//   2. The queue is bounded (kCapacity ranges). An incoming range merges with an overlapping or
//      adjacent one; when the queue is full it widens the first entry to cover it. Widening only
//      invalidates more, never less.
//   3. Unsubscribe waits until no publisher still uses the queue (a per-slot user count), so a
//      cache can be destroyed while hooks fire on other threads.
//
// Thread-safety: every function may be called from any thread.

#ifndef SANREG_REGCACHE_MEMORY_EVENTS_H_
#define SANREG_REGCACHE_MEMORY_EVENTS_H_

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>

namespace sanreg {

enum class MemoryEventKind : int {
  kUnmap = 0,     // munmap, or the old range of an mremap that moved or shrank
  kRemap,         // mremap
  kAdviseRemove,  // madvise DONTNEED / FREE / REMOVE
  kBrk,           // the heap shrank (brk, sbrk)
  kShmDetach,     // shmdt
  kMapFixed,      // mmap(MAP_FIXED) over a range
  kCount,
};

// Where a change was seen, for the statistics.
enum class MemoryEventSource : int { kHooks = 0, kUffd, kCount };

// A bounded queue of address ranges waiting to be invalidated in one cache.
class InvalidationQueue {
 public:
  static constexpr int kCapacity = 64;

  struct Range {
    uintptr_t start;
    uintptr_t end;
  };

  // Adds [start, end). Never allocates; see rule 2.
  void Push(uintptr_t start, uintptr_t end);

  // Moves every queued range into out[0..n) and returns n (<= kCapacity); *taken is the number of
  // pushes they stand for. The caller invalidates them, then calls Complete(*taken).
  int Drain(Range* out, uint32_t* taken);
  void Complete(uint32_t taken) { pending_.fetch_sub(taken, std::memory_order_acq_rel); }

  // Pushes not yet drained and invalidated: nonzero from the start of a Push to the end of the
  // Complete that covers it. Read on the hit path.
  uint32_t pending() const { return pending_.load(std::memory_order_acquire); }

  // Pushes that had to widen an entry because the queue was full.
  uint64_t overflows() const { return overflows_.load(std::memory_order_relaxed); }

 private:
  void Lock();
  void Unlock() { lock_.clear(std::memory_order_release); }

  std::atomic_flag lock_ = ATOMIC_FLAG_INIT;
  std::atomic<uint32_t> pending_{0};
  int size_ = 0;                           // guarded by lock_
  uint32_t undrained_ = 0;                 // pushes since the last Drain, guarded by lock_
  std::array<Range, kCapacity> ranges_{};  // guarded by lock_
  std::atomic<uint64_t> overflows_{0};
};

// Subscribes `q` to the memory events of the sources in `sources` (a mask of
// 1 << MemoryEventSource) until Unsubscribe. Returns false when all kMaxSubscribers slots are
// taken.
inline constexpr int kMaxSubscribers = 64;
inline constexpr uint32_t kAllMemoryEventSources =
    (1u << static_cast<int>(MemoryEventSource::kCount)) - 1;
bool SubscribeMemoryEvents(InvalidationQueue* q, uint32_t sources = kAllMemoryEventSources);
// REQUIRES: q was subscribed. Returns once no publisher can touch q any more.
void UnsubscribeMemoryEvents(InvalidationQueue* q);

// Pushes [addr, addr + len) into every subscribed queue. Safe inside hooks (rules 1-3).
void PublishMemoryEvent(uintptr_t addr, size_t len, MemoryEventKind kind, MemoryEventSource source);

// True while at least one queue is subscribed: hooks skip all work otherwise.
bool MemoryEventsWanted();

// Self-tests: a source under test publishes an event for a scratch page; Arm names that page and
// ProbeSeen says whether an event from `source` covering it arrived since.
void ArmMemoryEventProbe(uintptr_t page);
bool MemoryEventProbeSeen(MemoryEventSource source);

// Events published, by source and kind.
uint64_t MemoryEventCount(MemoryEventSource source, MemoryEventKind kind);

}  // namespace sanreg

#endif  // SANREG_REGCACHE_MEMORY_EVENTS_H_
