// uffd_monitor.h: the userfaultfd source of memory events.
//
// One userfaultfd per process, with the UNMAP, REMOVE and REMAP events, and a reader thread. The
// cache asks it to Watch the range of every region it registers (UFFDIO_REGISTER), and to Unwatch
// it when it deregisters the region. A range must be registered in some mode to get the events:
// write-protect mode where the kernel has it (Linux 5.7 for anonymous memory, 5.19 for shared
// memory), in which no fault ever reaches the reader since nothing is write-protected; missing
// mode otherwise, in which the pages are pinned and present, so faults are rare (see Faults). The
// kernel then reports, whoever makes the call (the application, glibc's malloc calling __munmap
// directly, a sanitizer's allocator): munmap (UNMAP), madvise DONTNEED/REMOVE (REMOVE), mremap
// (REMAP). The reader publishes each range (memory_events.h).
//
// Timing: for these events the kernel blocks the thread making the change until the reader has
// read the message, and lets it go on as soon as it has; the reader publishes right after. So
// there is a window of microseconds after munmap returns in which a lookup may still find the
// region (measured in the cache benchmark); the hooks source has no such window. Sync() closes it
// on demand (RegistrationCache::Flush calls it).
//
// Unwatching: a userfaultfd registration changes the mapping's flags, so registering part of a
// mapping splits it (VMAs), and mremap can grow or move only one VMA (EFAULT otherwise). The
// monitor therefore unregisters what no region needs any more: a table (internal/watch_table.h)
// counts, per page, the Watch calls not yet undone, across every cache of the process; Unwatch
// uncounts its range and unregisters exactly the parts whose count fell to zero, and the kernel
// merges the VMAs again. Watch and Unwatch run under one lock (watch_mu_), ioctl included, so
// that they are ordered: an Unwatch of a region of an old mapping cannot unregister pages of a
// new mapping at the same address that a cache has just watched (their count is above zero), and
// a Watch registers its whole range even where the table already counts it (the mapping there
// may be new and unregistered). Only the cache's miss and deregistration paths take watch_mu_;
// the reader never does, nor do the memory hooks, so a holder that faults or unmaps (the table
// allocates) cannot deadlock with them: the reader serves it without the lock.
//
// Faults: a watched page that was dropped (madvise DONTNEED) and is touched again raises a
// missing-page fault that the reader resolves with the zero page, as the kernel would have. The
// reader never unregisters a range on its own (a new mapping at the same address may have just
// been watched by a cache), except a page whose memory type has no zero page (the table may still
// count that page: the Unwatch that uncounts it unregisters it again, which does no harm).
//
// Unavailable (Start fails, with the reason) when the kernel lacks userfaultfd, when an
// unprivileged process cannot use it (vm.unprivileged_userfaultfd = 0 and no UFFD_USER_MODE_ONLY),
// or when the events are not supported.
//
// Fork: the child does not inherit the registrations (no UFFD_FEATURE_EVENT_FORK); the child's
// first cache starts a monitor of its own. The parent's monitor is disowned in the child: its
// descriptor still names the parent's address space, so there Watch fails and Unwatch does
// nothing.
//
// Thread-safety: every method may be called from any thread.

#ifndef SANREG_REGCACHE_UFFD_MONITOR_H_
#define SANREG_REGCACHE_UFFD_MONITOR_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>

#include "absl/status/statusor.h"

namespace sanreg {
namespace internal {
class WatchTable;
}  // namespace internal

class UffdMonitor {
 public:
  // The process's monitor, started (and self-tested: a scratch page is unmapped and its event
  // must arrive) on the first call. Later calls return the same monitor or the same error.
  static absl::StatusOr<UffdMonitor*> Get();

  // Watches [addr, addr + len) (page-aligned) and counts it in the table. Returns false when the
  // kernel refuses: the range holds a mapping type userfaultfd does not support (private file
  // mappings), or another userfaultfd already watches it; such a range is left to the other
  // sources, and nothing is counted. Miss path only: takes watch_mu_ and makes a system call.
  bool Watch(uintptr_t addr, size_t len);

  // Undoes one Watch(addr, len) that returned true: uncounts the range and unregisters the parts
  // of it that no other Watch still counts. REQUIRES: exactly one such Watch not yet undone.
  // Deregistration path only: takes watch_mu_; never call it from a memory hook or with a lock
  // the reader may need.
  void Unwatch(uintptr_t addr, size_t len);

  // Returns once every event the kernel delivered before the call has been published: unmaps a
  // watched marker page and waits for its own event (the reader handles events in order).
  // Costs an mmap, a registration, an munmap and a wake-up: tens of microseconds.
  // Returns false if the marker cannot be set up or its event does not come within 5 s.
  bool Sync();

  bool write_protect_mode() const { return write_protect_mode_; }

  // For the fork handler only, in the child: Watch and Unwatch do nothing from now on.
  void DisownInChild();

 private:
  UffdMonitor() = default;
  absl::Status Start();
  void ReaderLoop();
  // UFFDIO_REGISTER of the range, uncounted (Watch, and Sync's and the self-test's marker pages,
  // which go with their unmap). Returns false when the kernel refuses.
  bool Register(uintptr_t addr, size_t len);
  // UFFDIO_UNREGISTER of [start, end) (see Unregister in the .cc for a range the kernel refuses).
  // REQUIRES: watch_mu_ held.
  void Unregister(uintptr_t start, uintptr_t end);

  static constexpr int kMarkers = 16;
  int fd_ = -1;
  bool write_protect_mode_ = false;
  std::atomic<uintptr_t> markers_[kMarkers] = {};  // marker pages of Syncs in progress
  std::atomic<bool> marker_seen_[kMarkers] = {};
  std::mutex watch_mu_;
  internal::WatchTable* watched_ = nullptr;  // guarded by watch_mu_; set by Start
  bool disowned_ = false;                    // guarded by watch_mu_
};

}  // namespace sanreg

#endif  // SANREG_REGCACHE_UFFD_MONITOR_H_
