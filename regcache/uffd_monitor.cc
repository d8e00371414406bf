#include "regcache/uffd_monitor.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "regcache/internal/watch_table.h"
#include "regcache/memory_events.h"

namespace sanreg {
namespace {

constexpr uint64_t kFeatures =
    UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_REMAP;
constexpr uint64_t kWpFeatures = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;

// The process's monitor. A forked child gets a fresh one (see ResetInChild).
std::mutex g_mu;
UffdMonitor* g_monitor = nullptr;  // guarded by g_mu
absl::Status* g_error = nullptr;   // guarded by g_mu
bool g_atfork_installed = false;   // guarded by g_mu

void ResetInChild() {
  // The reader thread does not exist in the child, and the child's mappings are not registered
  // with the parent's userfaultfd. Forget both (the objects leak in the child; the fd closes).
  // g_mu may have been held by another parent thread at fork: reinitialise it.
  new (&g_mu) std::mutex();
  // The parent's monitor must not change registrations from the child: its descriptor still
  // names the parent's address space.
  if (g_monitor != nullptr) g_monitor->DisownInChild();
  g_monitor = nullptr;
  g_error = nullptr;
}

}  // namespace

absl::StatusOr<UffdMonitor*> UffdMonitor::Get() {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_atfork_installed) {
    pthread_atfork(nullptr, nullptr, ResetInChild);
    g_atfork_installed = true;
  }
  if (g_monitor != nullptr) return g_monitor;
  if (g_error != nullptr) return *g_error;
  auto* m = new UffdMonitor();
  absl::Status st = m->Start();
  if (!st.ok()) {
    g_error = new absl::Status(st);
    // m may own a reader thread blocked on its fd: keep it alive (it is tiny).
    return st;
  }
  g_monitor = m;
  return m;
}

absl::Status UffdMonitor::Start() {
  int flags = O_CLOEXEC | O_NONBLOCK;
  int fd = static_cast<int>(syscall(SYS_userfaultfd, flags));
  if (fd < 0 && (errno == EPERM || errno == EACCES)) {
    // Unprivileged with vm.unprivileged_userfaultfd = 0: user-mode faults only (Linux 5.11+).
    flags |= UFFD_USER_MODE_ONLY;
    fd = static_cast<int>(syscall(SYS_userfaultfd, flags));
  }
  if (fd < 0) {
    return absl::UnavailableError(
        absl::StrCat("userfaultfd: ", std::strerror(errno),
                     errno == ENOSYS ? " (kernel without userfaultfd)" : ""));
  }
  // Write-protect mode where the kernel has it: then no fault ever reaches the reader (nothing is
  // write-protected), only the events. Missing mode otherwise.
  struct uffdio_api api = {};
  api.api = UFFD_API;
  api.features = kFeatures | kWpFeatures;
  if (ioctl(fd, UFFDIO_API, &api) == 0 &&
      (api.features & (kFeatures | kWpFeatures)) == (kFeatures | kWpFeatures)) {
    write_protect_mode_ = true;
  } else {
    // UFFDIO_API may be called once per descriptor: start again without the WP features.
    close(fd);
    fd = static_cast<int>(syscall(SYS_userfaultfd, flags));
    api = {};
    api.api = UFFD_API;
    api.features = kFeatures;
    if (fd < 0 || ioctl(fd, UFFDIO_API, &api) != 0 || (api.features & kFeatures) != kFeatures) {
      int err = errno;
      if (fd >= 0) close(fd);
      return absl::UnavailableError(
          absl::StrCat("userfaultfd: UNMAP/REMOVE/REMAP events unsupported: ", std::strerror(err)));
    }
  }
  fd_ = fd;
  watched_ = new internal::WatchTable();
  std::thread([this] { ReaderLoop(); }).detach();

  // Self-test: watch a scratch page, unmap it, and see the event published.
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* p = mmap(nullptr, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return absl::UnavailableError("userfaultfd self-test: mmap failed");
  static_cast<char*>(p)[0] = 1;
  if (!Register(reinterpret_cast<uintptr_t>(p), page)) {
    munmap(p, page);
    return absl::UnavailableError(
        absl::StrCat("userfaultfd self-test: UFFDIO_REGISTER failed: ", std::strerror(errno)));
  }
  ArmMemoryEventProbe(reinterpret_cast<uintptr_t>(p));
  munmap(p, page);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (!MemoryEventProbeSeen(MemoryEventSource::kUffd)) {
    if (std::chrono::steady_clock::now() > deadline) {
      ArmMemoryEventProbe(0);
      return absl::UnavailableError("userfaultfd self-test: the UNMAP event did not arrive in 5 s");
    }
    std::this_thread::yield();
  }
  ArmMemoryEventProbe(0);
  return absl::OkStatus();
}

bool UffdMonitor::Sync() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* p = mmap(nullptr, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return false;
  static_cast<volatile char*>(p)[0] = 1;
  if (!Register(reinterpret_cast<uintptr_t>(p), page)) {
    munmap(p, page);
    return false;
  }
  int slot = -1;
  while (slot < 0) {
    for (int k = 0; k < kMarkers && slot < 0; ++k) {
      uintptr_t expected = 0;
      if (markers_[k].compare_exchange_strong(expected, reinterpret_cast<uintptr_t>(p),
                                              std::memory_order_acq_rel)) {
        slot = k;
      }
    }
    if (slot < 0) std::this_thread::yield();  // 16 Syncs at once: wait for a slot
  }
  marker_seen_[slot].store(false, std::memory_order_release);
  munmap(p, page);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  bool ok = true;
  while (!marker_seen_[slot].load(std::memory_order_acquire)) {
    if (std::chrono::steady_clock::now() > deadline) {
      ok = false;
      break;
    }
    std::this_thread::yield();
  }
  markers_[slot].store(0, std::memory_order_release);
  return ok;
}

bool UffdMonitor::Register(uintptr_t addr, size_t len) {
  struct uffdio_register reg = {};
  reg.range.start = addr;
  reg.range.len = len;
  reg.mode = write_protect_mode_ ? UFFDIO_REGISTER_MODE_WP : UFFDIO_REGISTER_MODE_MISSING;
  return ioctl(fd_, UFFDIO_REGISTER, &reg) == 0;
}

void UffdMonitor::Unregister(uintptr_t start, uintptr_t end) {
  struct uffdio_range r = {start, end - start};
  if (ioctl(fd_, UFFDIO_UNREGISTER, &r) == 0 || errno != EINVAL) return;
  // EINVAL: nothing is mapped in the range any more (the usual case: it was unmapped, and the
  // kernel dropped the registration with the mapping), or a mapping userfaultfd cannot handle
  // (a private file mapping) now lies in it, and the kernel refuses the whole range. In the
  // second case, when the range is wholly mapped (msync says so), unregister it in halves, down to
  // pages, so that the parts still registered are. A range with both a hole and such a mapping is
  // left as it is (its registered parts stay registered, as before Unwatch existed).
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  if (end - start <= page || msync(reinterpret_cast<void*>(start), end - start, MS_ASYNC) != 0) {
    return;
  }
  const uintptr_t mid = start + ((end - start) / 2 & ~(page - 1));
  Unregister(start, mid);
  Unregister(mid, end);
}

bool UffdMonitor::Watch(uintptr_t addr, size_t len) {
  std::lock_guard<std::mutex> lock(watch_mu_);
  if (disowned_) return false;
  // Register even where the table counts the range already: its pages may belong to a new
  // mapping at the same address (the old one went, and its regions are not deregistered yet).
  if (!Register(addr, len)) return false;
  watched_->Add(addr, addr + len);
  return true;
}

void UffdMonitor::Unwatch(uintptr_t addr, size_t len) {
  std::lock_guard<std::mutex> lock(watch_mu_);
  if (disowned_) return;
  for (const internal::WatchTable::Range& r : watched_->Remove(addr, addr + len)) {
    Unregister(r.start, r.end);
  }
}

void UffdMonitor::DisownInChild() {
  // The child is single-threaded here; watch_mu_ may have been held by a parent thread at fork.
  // The table's nodes are left as they are (leaked): a parent thread may have been changing it.
  new (&watch_mu_) std::mutex();
  watched_ = new internal::WatchTable();
  disowned_ = true;
}

void UffdMonitor::ReaderLoop() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  struct uffd_msg msgs[32];
  uintptr_t last_fault = 0;
  int repeats = 0;
  while (true) {
    struct pollfd pfd = {fd_, POLLIN, 0};
    if (poll(&pfd, 1, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    ssize_t n = read(fd_, msgs, sizeof(msgs));
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) continue;
      return;
    }
    for (size_t i = 0; i < static_cast<size_t>(n) / sizeof(msgs[0]); ++i) {
      const struct uffd_msg& m = msgs[i];
      switch (m.event) {
        case UFFD_EVENT_UNMAP:
          PublishMemoryEvent(m.arg.remove.start, m.arg.remove.end - m.arg.remove.start,
                             MemoryEventKind::kUnmap, MemoryEventSource::kUffd);
          for (int k = 0; k < kMarkers; ++k) {
            uintptr_t mk = markers_[k].load(std::memory_order_acquire);
            if (mk != 0 && mk >= m.arg.remove.start && mk < m.arg.remove.end) {
              marker_seen_[k].store(true, std::memory_order_release);
            }
          }
          break;
        case UFFD_EVENT_REMOVE: {
          // The range stays watched: unregistering it here could race with a new mapping at the
          // same address that a cache has just watched, and silence its unmap. Later faults on
          // the dropped pages come to the reader, which serves zero pages as the kernel would.
          PublishMemoryEvent(m.arg.remove.start, m.arg.remove.end - m.arg.remove.start,
                             MemoryEventKind::kAdviseRemove, MemoryEventSource::kUffd);
          break;
        }
        case UFFD_EVENT_REMAP:
          PublishMemoryEvent(m.arg.remap.from, m.arg.remap.len, MemoryEventKind::kRemap,
                             MemoryEventSource::kUffd);
          break;
        case UFFD_EVENT_PAGEFAULT: {
          // Missing mode only. Livelock breaker: a fault that keeps failing with EAGAIN (the
          // kernel populating a locked mapping that mremap is moving, which holds the descriptor's
          // "mapping changing" count until the populate ends) gets its page unwatched.
          uintptr_t a = m.arg.pagefault.address & ~(page - 1);
          struct uffdio_zeropage z = {};
          z.range.start = a;
          z.range.len = page;
          int rc = ioctl(fd_, UFFDIO_ZEROPAGE, &z);
          int err = rc != 0 ? errno : 0;
          repeats = (err == EAGAIN && a == last_fault) ? repeats + 1 : 0;
          last_fault = a;
          if (err == EINVAL || repeats > 1000) {
            // A memory type without zero pages (hugetlbfs), or the livelock above: stop watching
            // the page and let the kernel handle the fault. Other errors are transient (EAGAIN
            // while an unmap is under way, EEXIST when the page appeared, ENOENT when the mapping
            // went): the faulting thread is woken and retries. Unregistering on those could
            // silence the unmap of a new mapping at the same address.
            struct uffdio_range r = {a, page};
            ioctl(fd_, UFFDIO_UNREGISTER, &r);
          }
          struct uffdio_range w = {a, page};
          ioctl(fd_, UFFDIO_WAKE, &w);
          break;
        }
        default:
          break;
      }
    }
  }
}

}  // namespace sanreg
