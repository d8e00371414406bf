#include "regcache/pin_registrar.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace sanreg {
namespace {

// mlock and munlock through the system call: AddressSanitizer's and ThreadSanitizer's interceptors
// turn the libc functions into no-ops that return 0, which would make pinning a silent lie.
int SysMlock(uintptr_t addr, size_t len) { return static_cast<int>(syscall(SYS_mlock, addr, len)); }
int SysMunlock(uintptr_t addr, size_t len) {
  return static_cast<int>(syscall(SYS_munlock, addr, len));
}

// True when every page of [s, e) is mapped: mincore fails with ENOMEM on an unmapped page.
bool RangeMapped(uintptr_t s, uintptr_t e, size_t page) {
  unsigned char vec[4096];
  const size_t chunk = sizeof(vec) * page;
  for (uintptr_t a = s; a < e; a += chunk) {
    size_t len = std::min<size_t>(chunk, e - a);
    if (mincore(reinterpret_cast<void*>(a), len, vec) != 0) return false;
  }
  return true;
}

}  // namespace

PinRegistrar::PinRegistrar(const Options& options)
    : options_(options), page_size_(static_cast<size_t>(sysconf(_SC_PAGESIZE))) {}

absl::StatusOr<std::vector<uint64_t>> PinRegistrar::PageFrames(uintptr_t addr, size_t len) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t s = addr & ~(page - 1);
  const size_t n = (addr + len - s + page - 1) / page;
  int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::UnavailableError("pagemap: cannot open /proc/self/pagemap");
  std::vector<uint64_t> out(n);
  ssize_t want = static_cast<ssize_t>(n * sizeof(uint64_t));
  ssize_t got = pread(fd, out.data(), want, static_cast<off_t>((s / page) * sizeof(uint64_t)));
  close(fd);
  if (got != want) return absl::UnavailableError("pagemap: short read");
  bool any_frame = false, any_present = false;
  for (uint64_t& e : out) {
    const bool present = (e >> 63) & 1;
    e = present ? (e & ((uint64_t{1} << 55) - 1)) : 0;
    any_present |= present;
    any_frame |= e != 0;
  }
  if (any_present && !any_frame) {
    return absl::PermissionDeniedError("pagemap: frame numbers hidden (needs CAP_SYS_ADMIN)");
  }
  return out;
}

bool PinRegistrar::PageFramesReadable() {
  static const bool readable = [] {
    volatile uint64_t probe = 1;  // a present stack page
    auto f = PageFrames(reinterpret_cast<uintptr_t>(&probe), sizeof(probe));
    return f.ok() && (*f)[0] != 0;
  }();
  return readable;
}

absl::Status PinRegistrar::VerifyPages(const Registration& reg) {
  if (!options_.record_pages) return absl::OkStatus();
  std::vector<uint64_t> recorded;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = frames_.find(reg.handle);
    if (it == frames_.end()) return absl::NotFoundError("verification: no frames recorded");
    recorded = it->second;
  }
  auto now = PageFrames(reg.addr, reg.length);
  if (!now.ok()) return now.status();
  for (size_t i = 0; i < recorded.size(); ++i) {
    if ((*now)[i] != recorded[i]) {
      return absl::DataLossError(absl::StrCat("page 0x", absl::Hex(reg.addr + i * page_size_),
                                              " was frame ", recorded[i], ", is now frame ",
                                              (*now)[i]));
    }
  }
  return absl::OkStatus();
}

PinRegistrar::~PinRegistrar() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = counts_.begin(); it != counts_.end(); ++it) {
    auto next = std::next(it);
    if (it->second != 0 && next != counts_.end()) {
      SysMunlock(it->first, next->first - it->first);
    }
  }
}

void PinRegistrar::Split(uintptr_t at) {
  auto it = counts_.upper_bound(at);
  if (it == counts_.begin()) {
    counts_.emplace(at, 0);
    return;
  }
  --it;
  if (it->first != at) counts_.emplace(at, it->second);
}

std::vector<std::pair<uintptr_t, uintptr_t>> PinRegistrar::RangesWithCount(uintptr_t s, uintptr_t e,
                                                                           uint32_t count) {
  std::vector<std::pair<uintptr_t, uintptr_t>> out;
  for (auto it = counts_.find(s); it != counts_.end() && it->first < e; ++it) {
    if (it->second != count) continue;
    uintptr_t seg_end = std::next(it)->first;  // Split(e) guarantees a key at e
    if (!out.empty() && out.back().second == it->first) {
      out.back().second = seg_end;
    } else {
      out.emplace_back(it->first, seg_end);
    }
  }
  return out;
}

void PinRegistrar::AddCount(uintptr_t s, uintptr_t e, int delta) {
  for (auto it = counts_.find(s); it != counts_.end() && it->first < e; ++it) {
    it->second += delta;
  }
}

void PinRegistrar::Coalesce(uintptr_t s, uintptr_t e) {
  // Drop breakpoints in [s, e] whose count equals their predecessor's (or 0 at the front).
  auto it = counts_.lower_bound(s);
  if (it != counts_.begin()) --it;
  while (it != counts_.end() && it->first <= e) {
    uint32_t prev = it == counts_.begin() ? 0 : std::prev(it)->second;
    if (it->second == prev) {
      it = counts_.erase(it);
    } else {
      ++it;
    }
  }
}

absl::StatusOr<Registration> PinRegistrar::Register(uintptr_t addr, size_t length,
                                                    uint32_t access) {
  if (length == 0 || addr + length < addr || !AccessValid(access)) {
    return absl::InvalidArgumentError("pin registrar: empty, wrapping or bad-access range");
  }
  const uintptr_t s = addr & ~(page_size_ - 1);
  const uintptr_t e = (addr + length + page_size_ - 1) & ~(page_size_ - 1);
  std::lock_guard<std::mutex> lock(mu_);
  Split(s);
  Split(e);
  // Lock the whole range, not only pages this registrar has not locked yet: the mapping behind a
  // locked address may have been replaced (an unmap the cache has not processed yet), and the new
  // pages must be faulted in and locked too. mlock of locked pages is cheap and harmless.
  // Only pages no registration held before are unlocked on failure.
  auto fresh = RangesWithCount(s, e, 0);
  if (SysMlock(s, e - s) != 0) {
    int err = errno;
    // mlock stops at the first failure having locked the pages before it: undo fresh pages.
    for (auto [fs, fe] : fresh) SysMunlock(fs, fe - fs);
    Coalesce(s, e);
    if (!RangeMapped(s, e, page_size_)) {
      return absl::OutOfRangeError(absl::StrCat("pin registrar: [0x", absl::Hex(s), ", 0x",
                                                absl::Hex(e), ") is not wholly mapped"));
    }
    if (err == ENOMEM || err == EAGAIN || err == EPERM) {
      return absl::ResourceExhaustedError(
          absl::StrCat("pin registrar: mlock of ", e - s, " bytes refused (", std::strerror(err),
                       "); locked ", locked_bytes_, " bytes; RLIMIT_MEMLOCK reached?"));
    }
    return absl::InternalError(absl::StrCat("pin registrar: mlock: ", std::strerror(err)));
  }
  for (auto [ls, le] : fresh) locked_bytes_ += le - ls;
  if (options_.dont_fork) syscall(SYS_madvise, s, e - s, MADV_DONTFORK);
  AddCount(s, e, +1);
  Coalesce(s, e);
  Registration reg;
  reg.addr = s;
  reg.length = e - s;
  reg.access = access;
  reg.handle = next_handle_++;
  if (options_.record_pages) {
    auto frames = PageFrames(s, e - s);
    if (frames.ok()) frames_.emplace(reg.handle, std::move(*frames));
  }
  return reg;
}

absl::Status PinRegistrar::Deregister(const Registration& reg) {
  const uintptr_t s = reg.addr;
  const uintptr_t e = reg.addr + reg.length;
  std::lock_guard<std::mutex> lock(mu_);
  Split(s);
  Split(e);
  if (!RangesWithCount(s, e, 0).empty()) {
    Coalesce(s, e);
    return absl::FailedPreconditionError("pin registrar: deregistering pages that are not pinned");
  }
  auto to_unlock = RangesWithCount(s, e, 1);
  AddCount(s, e, -1);
  frames_.erase(reg.handle);
  Coalesce(s, e);
  for (auto [us, ue] : to_unlock) {
    // munlock fails only if the range is no longer mapped, in which case the kernel dropped the
    // lock with the mapping.
    SysMunlock(us, ue - us);
    if (options_.dont_fork) syscall(SYS_madvise, us, ue - us, MADV_DOFORK);
    locked_bytes_ -= ue - us;
  }
  return absl::OkStatus();
}

size_t PinRegistrar::locked_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return locked_bytes_;
}

}  // namespace sanreg
