#include "regcache/memory_monitor.h"

#include <malloc.h>
#include <sys/mman.h>
#include <unistd.h>

#include <climits>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "regcache/memory_events.h"
#include "regcache/uffd_monitor.h"

namespace sanreg {
namespace {

// The hooks' self-test, once per process: true when an munmap through the PLT reaches a hook.
bool HooksWork() {
  static const bool works = [] {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return false;
    ArmMemoryEventProbe(reinterpret_cast<uintptr_t>(p));
    munmap(p, page);
    bool seen = MemoryEventProbeSeen(MemoryEventSource::kHooks);
    ArmMemoryEventProbe(0);
    return seen;
  }();
  return works;
}

void KeepMallocMemory() {
  static std::once_flag once;
  std::call_once(once, [] {
    mallopt(M_MMAP_MAX, 0);
    mallopt(M_TRIM_THRESHOLD, INT_MAX);
  });
}

}  // namespace

MemoryMonitorStatus StartMemoryMonitor(MemoryMonitorMode mode) {
  MemoryMonitorStatus st;
  if (mode == MemoryMonitorMode::kNone) return st;
  if (mode == MemoryMonitorMode::kAuto || mode == MemoryMonitorMode::kHooks) {
    st.hooks = HooksWork();
    if (!st.hooks) {
      absl::StrAppend(&st.notes,
                      "hooks: self-test saw no event (link //regcache:memory_hooks or "
                      "LD_PRELOAD libsanreg_hooks.so); ");
    }
  }
  if (mode == MemoryMonitorMode::kAuto || mode == MemoryMonitorMode::kUffd) {
    absl::StatusOr<UffdMonitor*> m = UffdMonitor::Get();
    if (m.ok()) {
      st.uffd = *m;
    } else {
      absl::StrAppend(&st.notes, "uffd: ", m.status().message(), "; ");
    }
  }
  if (st.hooks) KeepMallocMemory();
  return st;
}

absl::StatusOr<MemoryMonitorMode> ParseMemoryMonitorMode(absl::string_view s) {
  if (s == "auto") return MemoryMonitorMode::kAuto;
  if (s == "hooks") return MemoryMonitorMode::kHooks;
  if (s == "uffd") return MemoryMonitorMode::kUffd;
  if (s == "none") return MemoryMonitorMode::kNone;
  return absl::InvalidArgumentError(
      absl::StrCat("memory monitor \"", s, "\": expected auto, hooks, uffd or none"));
}

}  // namespace sanreg
