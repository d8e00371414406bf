#include "datapath/libfabric/liveness.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace sanreg::internal {
namespace {

constexpr size_t kPage = 4096;

// glibc keeps the futex word (owner tid | FUTEX_WAITERS | FUTEX_OWNER_DIED for a robust mutex)
// first in pthread_mutex_t.
static_assert(offsetof(pthread_mutex_t, __data.__lock) == 0);
static_assert(sizeof(pthread_mutex_t) <= kPage);

pthread_mutex_t* MutexAt(void* page) { return static_cast<pthread_mutex_t*>(page); }

}  // namespace

absl::StatusOr<std::unique_ptr<LivenessBeacon>> LivenessBeacon::Create(const std::string& name) {
  int fd = shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    return absl::UnavailableError(absl::StrCat("shm_open ", name, ": ", strerror(errno)));
  }
  void* page = MAP_FAILED;
  if (ftruncate(fd, kPage) == 0) {
    page = mmap(nullptr, kPage, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  }
  const int err = errno;
  close(fd);
  if (page == MAP_FAILED) {
    shm_unlink(name.c_str());
    return absl::UnavailableError(absl::StrCat("liveness segment ", name, ": ", strerror(err)));
  }
  pthread_mutexattr_t a;
  pthread_mutexattr_init(&a);
  pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
  pthread_mutex_init(MutexAt(page), &a);
  pthread_mutexattr_destroy(&a);
  auto b = std::unique_ptr<LivenessBeacon>(new LivenessBeacon(name, page));
  b->creator_ = getpid();
  return b;
}

LivenessBeacon::~LivenessBeacon() {
  munmap(page_, kPage);
  // A forked child that inherited the mapping must not remove its parent's beacon.
  if (getpid() == creator_) shm_unlink(name_.c_str());
}

void LivenessBeacon::Hold() { pthread_mutex_lock(MutexAt(page_)); }

void LivenessBeacon::Release() { pthread_mutex_unlock(MutexAt(page_)); }

std::unique_ptr<LivenessWatch> LivenessWatch::Open(const std::string& name) {
  if (name.empty()) return nullptr;
  int fd = shm_open(name.c_str(), O_RDONLY | O_CLOEXEC, 0);
  if (fd < 0) return nullptr;
  struct stat st = {};
  void* page = MAP_FAILED;
  if (fstat(fd, &st) == 0 && static_cast<size_t>(st.st_size) >= kPage) {
    page = mmap(nullptr, kPage, PROT_READ, MAP_SHARED, fd, 0);
  }
  close(fd);
  if (page == MAP_FAILED) return nullptr;
  return std::unique_ptr<LivenessWatch>(new LivenessWatch(page));
}

LivenessWatch::~LivenessWatch() { munmap(const_cast<void*>(page_), kPage); }

bool LivenessWatch::Gone() const {
  const auto* word = static_cast<const std::atomic<uint32_t>*>(page_);
  const uint32_t w = word->load(std::memory_order_acquire);
  return (w & FUTEX_OWNER_DIED) != 0 || (w & FUTEX_TID_MASK) == 0;
}

std::string BeaconNameFor(const std::string& endpoint_name) {
  std::string name(endpoint_name.c_str());  // up to the terminating NUL, if any
  if (!absl::StartsWith(name, "sanreg-")) return "";
  for (char c : name) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '-') return "";
  }
  const size_t dash = name.rfind('-');
  return absl::StrCat(name.substr(0, dash), "-alive");
}

}  // namespace sanreg::internal
