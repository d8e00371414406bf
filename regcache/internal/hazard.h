// internal/hazard.h: per-thread hazard slots, how a cache hit holds a region without a locked
// instruction. Not API.
//
// Why: a hit that takes its reference with a compare-and-swap serialises the CPU on the region's
// line. At 1,000,000 regions, where a hit's two reads (lookup bucket, region) come from DRAM, the
// locked instruction keeps the next hit's reads from starting until this one's have arrived: on
// this project's machine a loop of such hits took 150 ns each with a CAS and a decrement and
// 86 ns with plain loads and stores (docs/PERFORMANCE.md, item 1).
//
// The protocol (an asymmetric form of "store, then load the other's store"):
//   - A hit stores the region's address in a free slot of its thread's record (a plain store),
//     then, with only a compiler barrier between, loads the region's state, and takes the region
//     if it is alive.
//   - The reclaimer, before it deregisters regions that were marked dead (state) before it took
//     them, calls HazardBarrier(), then reads every slot (HazardCollect), and defers the regions
//     a slot names.
//   - HazardBarrier is membarrier(2) (MEMBARRIER_CMD_PRIVATE_EXPEDITED): every thread of the
//     process passes a full memory barrier before it returns. So for a hit racing the region's
//     death, either the hit's slot store was made before its thread's barrier, and the
//     reclaimer's reads see it, or its state load came after that barrier, and sees the region
//     dead. At least one of them
//     sees the other: a region a hit holds is never deregistered.
// Eviction reads the slots without the barrier (cache.h, invariant 3a): it skips the regions held
// for longer than a store takes to become visible, and a hit racing it keeps what it took.
// Dropping a hazard is a plain store of null. A region dropped while dead is found unnamed by the
// reclaimer's next look (RegistrationCache re-examines the regions it had to defer).
//
// Thread-safety: every function may be called from any thread. A record belongs to one thread at a
// time (the one that stores non-null values into its null slots); any thread holding the reference
// a slot names may clear that slot (a RegionRef moved to, and dropped on, another thread).
// Invariants:
//   1. Records are never freed; a thread that exits leaves its record for the next thread that
//      needs one, with whatever slots are still set (their RegionRefs may live on elsewhere).
//   2. Only the owning thread turns a null slot non-null; only the holder of the reference a slot
//      names turns it null.
//   3. When membarrier(2) is not available (an old kernel, a seccomp filter that forbids it),
//      hazards are off: ThisThreadHazards() returns a record with no free slot, so every hit takes
//      a counted reference instead.

#ifndef SANREG_REGCACHE_INTERNAL_HAZARD_H_
#define SANREG_REGCACHE_INTERNAL_HAZARD_H_

#include <atomic>
#include <cstddef>
#include <vector>

#include "absl/base/optimization.h"

namespace sanreg::internal {

using HazardSlot = std::atomic<const void*>;

struct alignas(64) HazardRecord {
  static constexpr int kSlots = 6;
  HazardSlot slots[kSlots] = {};
  std::atomic<bool> owned{false};
  HazardRecord* next = nullptr;  // the global list; fixed once the record is published
};

// Whether hazards are in use in this process (membarrier works). Decided once, at first call.
bool HazardsEnabled();

// The calling thread's record, made or adopted at its first call; a record without free slots when
// hazards are off or the thread is exiting.
HazardRecord* AdoptHazardRecord();
inline thread_local constinit HazardRecord* tls_hazard_record = nullptr;
inline HazardRecord* ThisThreadHazards() {
  HazardRecord* r = tls_hazard_record;
  if (ABSL_PREDICT_FALSE(r == nullptr)) r = AdoptHazardRecord();
  return r;
}

// A null slot of the calling thread's record, or nullptr when all are in use.
inline HazardSlot* FreeHazardSlot() {
  HazardRecord* r = ThisThreadHazards();
  for (HazardSlot& s : r->slots) {
    if (s.load(std::memory_order_relaxed) == nullptr) return &s;
  }
  return nullptr;
}

// Publishes p in *slot, ahead of the loads that follow (their order is the CPU's; HazardBarrier
// on the other side makes up for it).
inline void HazardSet(HazardSlot* slot, const void* p) {
  slot->store(p, std::memory_order_relaxed);
  std::atomic_signal_fence(std::memory_order_seq_cst);
}
inline void HazardClear(HazardSlot* slot) { slot->store(nullptr, std::memory_order_release); }

// Every thread of the process passes a full memory barrier before this returns.
// REQUIRES: HazardsEnabled().
void HazardBarrier();

// Appends the value of every non-null slot to *out (unsorted, with repeats). Call HazardBarrier()
// first, after the stores whose readers must be seen.
void HazardCollect(std::vector<const void*>* out);

// Whether any slot names p. Call HazardBarrier() first.
bool HazardNamed(const void* p);

}  // namespace sanreg::internal

#endif  // SANREG_REGCACHE_INTERNAL_HAZARD_H_
