// uffd_monitor.h: the userfaultfd source of memory events.
//
// One userfaultfd per process, with the UNMAP, REMOVE and REMAP events, and a reader thread. The
// cache asks it to Watch the range of every region it registers (UFFDIO_REGISTER). A range must be
// registered in some mode to get the events: write-protect mode where the kernel has it (Linux
// 5.7 for anonymous memory, 5.19 for shared memory), in which no fault ever reaches the reader
// since nothing is write-protected; missing mode otherwise, in which the pages are pinned and
// present, so faults are rare (see Faults). The kernel then reports, whoever makes the call (the
// application, glibc's malloc calling __munmap directly, a sanitizer's allocator): munmap (UNMAP),
// madvise DONTNEED/REMOVE (REMOVE), mremap (REMAP). The reader publishes each range
// (memory_events.h).
//
// Timing: for these events the kernel blocks the thread making the change until the reader has
// read the message, and lets it go on as soon as it has; the reader publishes right after. So
// there is a window of microseconds after munmap returns in which a lookup may still find the
// region (measured in the cache benchmark); the hooks source has no such window. Sync() closes it
// on demand (RegistrationCache::Flush calls it).
//
// Faults: a watched page that was dropped (madvise DONTNEED) and is touched again raises a
// missing-page fault that the reader resolves with the zero page, as the kernel would have. The
// reader never unregisters a range on its own (a new mapping at the same address may have just
// been watched by a cache), except a page whose memory type has no zero page.
//
// Unavailable (Start fails, with the reason) when the kernel lacks userfaultfd, when an
// unprivileged process cannot use it (vm.unprivileged_userfaultfd = 0 and no UFFD_USER_MODE_ONLY),
// or when the events are not supported.
//
// Fork: the child does not inherit the registrations (no UFFD_FEATURE_EVENT_FORK); the child's
// first cache starts a monitor of its own.
//
// Thread-safety: every method may be called from any thread.

#ifndef SANREG_REGCACHE_UFFD_MONITOR_H_
#define SANREG_REGCACHE_UFFD_MONITOR_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace sanreg {

class UffdMonitor {
 public:
  // The process's monitor, started (and self-tested: a scratch page is unmapped and its event
  // must arrive) on the first call. Later calls return the same monitor or the same error.
  static absl::StatusOr<UffdMonitor*> Get();

  // Watches [addr, addr + len) (page-aligned). Returns false when the kernel refuses: the range
  // holds a mapping type userfaultfd does not support (private file mappings), or another
  // userfaultfd already watches it; such a range is left to the other sources.
  bool Watch(uintptr_t addr, size_t len);

  // Returns once every event the kernel delivered before the call has been published: unmaps a
  // watched marker page and waits for its own event (the reader handles events in order).
  // Costs an mmap, a registration, an munmap and a wake-up: tens of microseconds.
  // Returns false if the marker cannot be set up or its event does not come within 5 s.
  bool Sync();

  bool write_protect_mode() const { return write_protect_mode_; }

 private:
  UffdMonitor() = default;
  absl::Status Start();
  void ReaderLoop();

  static constexpr int kMarkers = 16;
  int fd_ = -1;
  bool write_protect_mode_ = false;
  std::atomic<uintptr_t> markers_[kMarkers] = {};  // marker pages of Syncs in progress
  std::atomic<bool> marker_seen_[kMarkers] = {};
};

}  // namespace sanreg

#endif  // SANREG_REGCACHE_UFFD_MONITOR_H_
