#include "regcache/internal/hazard.h"

#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <mutex>

namespace sanreg::internal {
namespace {

long Membarrier(int cmd) { return syscall(__NR_membarrier, cmd, 0, 0); }

std::atomic<HazardRecord*> g_records{nullptr};

// What a thread gets when hazards are off or it is exiting: every slot taken (by a value nothing
// else uses), so that FreeHazardSlot finds none. Not in the list: HazardCollect never reads it.
HazardRecord* FullRecord() {
  static HazardRecord* full = [] {
    auto* r = new HazardRecord;
    for (HazardSlot& s : r->slots) s.store(r, std::memory_order_relaxed);
    return r;
  }();
  return full;
}

// Gives the record back when its thread exits (invariant 1 of hazard.h).
struct RecordOwner {
  HazardRecord* record = nullptr;
  ~RecordOwner() {
    tls_hazard_record = FullRecord();  // a hit in a later thread_local destructor counts instead
    if (record != nullptr) record->owned.store(false, std::memory_order_release);
  }
};
thread_local RecordOwner owner;
thread_local bool owner_made = false;

}  // namespace

bool HazardsEnabled() {
  static const bool enabled = [] {
    const long cmds = Membarrier(MEMBARRIER_CMD_QUERY);
    if (cmds < 0 || (cmds & MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0) return false;
    return Membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0;
  }();
  return enabled;
}

HazardRecord* AdoptHazardRecord() {
  if (!HazardsEnabled() || owner_made) {
    // Off, or this thread's RecordOwner is already destroyed (a hit from a thread_local
    // destructor that runs after it).
    tls_hazard_record = FullRecord();
    return tls_hazard_record;
  }
  HazardRecord* mine = nullptr;
  for (HazardRecord* r = g_records.load(std::memory_order_acquire); r != nullptr; r = r->next) {
    bool expected = false;
    if (!r->owned.load(std::memory_order_relaxed) &&
        r->owned.compare_exchange_strong(expected, true, std::memory_order_acquire)) {
      mine = r;
      break;
    }
  }
  if (mine == nullptr) {
    mine = new HazardRecord;  // never freed (invariant 1)
    mine->owned.store(true, std::memory_order_relaxed);
    HazardRecord* head = g_records.load(std::memory_order_relaxed);
    do {
      mine->next = head;
    } while (!g_records.compare_exchange_weak(head, mine, std::memory_order_release,
                                              std::memory_order_relaxed));
  }
  owner_made = true;
  owner.record = mine;  // constructs the thread's RecordOwner: its destructor runs at thread exit
  tls_hazard_record = mine;
  return mine;
}

void HazardBarrier() {
  if (Membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0) return;
  // A forked child's process is not registered (registration belongs to the address space).
  if (errno == EPERM && Membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0 &&
      Membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0) {
    return;
  }
  // The system-wide barrier: slow (it waits for a grace period), but as strong.
  if (Membarrier(MEMBARRIER_CMD_GLOBAL) == 0) return;
  std::fprintf(stderr, "sanreg: membarrier failed after it worked (errno %d); aborting\n", errno);
  std::abort();
}

namespace {

// Calls f(value) for every non-null slot of every record, until f returns true.
template <typename F>
bool AnySlot(F f) {
  for (HazardRecord* r = g_records.load(std::memory_order_acquire); r != nullptr; r = r->next) {
    for (const HazardSlot& s : r->slots) {
      if (const void* p = s.load(std::memory_order_acquire); p != nullptr && f(p)) return true;
    }
  }
  return false;
}

}  // namespace

void HazardCollect(std::vector<const void*>* out) {
  AnySlot([out](const void* p) {
    out->push_back(p);
    return false;
  });
}

bool HazardNamed(const void* p) {
  return AnySlot([p](const void* q) { return q == p; });
}

}  // namespace sanreg::internal
