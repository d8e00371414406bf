// memory_monitor.h: choosing and starting the sources of memory events for a cache.
//
// Modes (Options::memory_monitor, or SANREG_MEMORY_MONITOR=auto|hooks|uffd|none):
//   kAuto:  every source that passes its self-test (hooks and userfaultfd);
//   kHooks: the interposed functions only (memory_hooks.cc);
//   kUffd:  userfaultfd only (uffd_monitor.h);
//   kNone:  none: only explicit Invalidate calls (the SPI's cache callback) drop registrations.
// Each source is started and self-tested once per process. A source that fails is not used, and
// the reason is kept (CacheStats::memory_monitor_notes).
//
// Hooks self-test: unmap a scratch page through the PLT and see the event arrive; it fails when
// the program neither links //regcache:memory_hooks nor preloads libsanreg_hooks.so.
//
// glibc's own releases (free of mmapped blocks, heap trimming) bypass the hooks, and userfaultfd
// reports them only just after they happen. So whenever the hooks are in use, malloc is told never
// to give memory back: M_MMAP_MAX = 0 (no mmapped blocks) and M_TRIM_THRESHOLD = the largest value
// (no trimming); freed memory stays mapped with the same pages, and a cached registration of it
// stays valid. Blocks malloc had mmapped before the first cache started are released unseen by
// the hooks (userfaultfd sees them): see docs/MEMORY_EVENTS.md.
//
// Thread-safety: any thread.

#ifndef SANREG_REGCACHE_MEMORY_MONITOR_H_
#define SANREG_REGCACHE_MEMORY_MONITOR_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace sanreg {

class UffdMonitor;

enum class MemoryMonitorMode { kAuto, kHooks, kUffd, kNone };

struct MemoryMonitorStatus {
  bool hooks = false;
  UffdMonitor* uffd = nullptr;  // non-null when the userfaultfd source is in use
  std::string notes;            // why a requested source is not in use
};

// Starts the sources `mode` asks for (once per process) and returns those in use.
MemoryMonitorStatus StartMemoryMonitor(MemoryMonitorMode mode);

// "auto", "hooks", "uffd" or "none".
absl::StatusOr<MemoryMonitorMode> ParseMemoryMonitorMode(absl::string_view s);

}  // namespace sanreg

#endif  // SANREG_REGCACHE_MEMORY_MONITOR_H_
