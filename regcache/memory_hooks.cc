// memory_hooks.cc: interposed munmap, mremap, madvise, brk, sbrk, shmat, shmdt and mmap.
//
// Linked into a program (the //regcache:memory_hooks target, alwayslink) or preloaded
// (LD_PRELOAD=libsanreg_hooks.so), these definitions come before libc's in symbol lookup, so every
// call through the PLT lands here. Each publishes the range about to change (memory_events.h) and
// then calls the next definition (libc's, or a sanitizer's interceptor, found with
// dlsym(RTLD_NEXT) at load time).
//
// What they do not see: calls glibc makes to itself without the PLT. malloc's free of a block it
// mmapped (above M_MMAP_THRESHOLD) calls __munmap directly, realloc of such a block __mremap, heap
// trimming __madvise / __sbrk, and thread-arena heaps are unmapped directly. Those are seen by the
// userfaultfd source, and, where it is unavailable, prevented by tuning malloc (see
// memory_monitor.cc). docs/MEMORY_EVENTS.md has the full table.
//
// Rules: no allocation, no lock but the queues' spinlocks, no deregistration (memory_events.h).

#include <dlfcn.h>
#include <stdarg.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "regcache/memory_events.h"

namespace sanreg {
namespace {

using MunmapFn = int (*)(void*, size_t);
using MremapFn = void* (*)(void*, size_t, size_t, int, ...);
using MadviseFn = int (*)(void*, size_t, int);
using BrkFn = int (*)(void*);
using SbrkFn = void* (*)(intptr_t);
using ShmatFn = void* (*)(int, const void*, int);
using ShmdtFn = int (*)(const void*);
using MmapFn = void* (*)(void*, size_t, int, int, int, off_t);

struct RealFns {
  std::atomic<MunmapFn> munmap{nullptr};
  std::atomic<MremapFn> mremap{nullptr};
  std::atomic<MadviseFn> madvise{nullptr};
  std::atomic<BrkFn> brk{nullptr};
  std::atomic<SbrkFn> sbrk{nullptr};
  std::atomic<ShmatFn> shmat{nullptr};
  std::atomic<ShmdtFn> shmdt{nullptr};
  std::atomic<MmapFn> mmap{nullptr};
};
RealFns g_real;

template <typename Fn>
Fn Resolve(std::atomic<Fn>& slot, const char* name) {
  Fn f = slot.load(std::memory_order_acquire);
  if (f == nullptr) {
    f = reinterpret_cast<Fn>(dlsym(RTLD_NEXT, name));
    slot.store(f, std::memory_order_release);
  }
  return f;
}

__attribute__((constructor(101))) void ResolveAll() {
  Resolve(g_real.munmap, "munmap");
  Resolve(g_real.mremap, "mremap");
  Resolve(g_real.madvise, "madvise");
  Resolve(g_real.brk, "brk");
  Resolve(g_real.sbrk, "sbrk");
  Resolve(g_real.shmat, "shmat");
  Resolve(g_real.shmdt, "shmdt");
  Resolve(g_real.mmap, "mmap");
}

const size_t kPageMask = 4095;

size_t PageRound(size_t len) { return (len + kPageMask) & ~kPageMask; }

// Segments attached with shmat, for shmdt to know their size. Lock-free, fixed size.
constexpr int kShmSlots = 256;
struct ShmSlot {
  std::atomic<uintptr_t> addr{0};
  std::atomic<size_t> size{0};
};
ShmSlot g_shm[kShmSlots];

void RememberShm(uintptr_t addr, size_t size) {
  for (ShmSlot& s : g_shm) {
    uintptr_t expected = 0;
    if (s.addr.compare_exchange_strong(expected, addr, std::memory_order_acq_rel)) {
      s.size.store(size, std::memory_order_release);
      return;
    }
  }
}

// The size of the segment attached at addr: from the shmat record, else the extent of mapped pages
// from addr (mincore; may take in a following mapping too, which only invalidates more).
size_t ShmSize(uintptr_t addr, bool forget) {
  for (ShmSlot& s : g_shm) {
    if (s.addr.load(std::memory_order_acquire) == addr) {
      size_t size = s.size.load(std::memory_order_acquire);
      if (forget) s.addr.store(0, std::memory_order_release);
      return size;
    }
  }
  unsigned char vec[256];
  size_t len = 0;
  const size_t kCap = size_t{1} << 30;
  while (len < kCap) {
    if (syscall(SYS_mincore, addr + len, sizeof(vec) * 4096, vec) != 0) {
      // Part of this chunk is unmapped: find the end page by page.
      while (len < kCap && syscall(SYS_mincore, addr + len, 4096, vec) == 0) len += 4096;
      break;
    }
    len += sizeof(vec) * 4096;
  }
  return len;
}

// Publishes a range before a change and again after it (memory_events.h). len 0: nothing.
class Around {
 public:
  Around(const void* addr, size_t len, MemoryEventKind kind)
      : addr_(reinterpret_cast<uintptr_t>(addr)), len_(PageRound(len)), kind_(kind) {
    PublishMemoryEvent(addr_, len_, kind_, MemoryEventSource::kHooks);
  }
  ~Around() { PublishMemoryEvent(addr_, len_, kind_, MemoryEventSource::kHooks); }
  Around(const Around&) = delete;
  Around& operator=(const Around&) = delete;

 private:
  const uintptr_t addr_;
  const size_t len_;
  const MemoryEventKind kind_;
};

}  // namespace
}  // namespace sanreg

using sanreg::MemoryEventKind;
using sanreg::MemoryEventSource;
using sanreg::PublishMemoryEvent;

extern "C" {

int munmap(void* addr, size_t len) noexcept {
  sanreg::Around event(addr, len, MemoryEventKind::kUnmap);
  if (auto f = sanreg::Resolve(sanreg::g_real.munmap, "munmap")) return f(addr, len);
  return static_cast<int>(syscall(SYS_munmap, addr, len));
}

void* mremap(void* old_addr, size_t old_len, size_t new_len, int flags, ...) noexcept {
  void* new_addr = nullptr;
  if (flags & MREMAP_FIXED) {
    va_list ap;
    va_start(ap, flags);
    new_addr = va_arg(ap, void*);
    va_end(ap);
  }
  // The range a fixed move replaces.
  sanreg::Around target(new_addr, (flags & MREMAP_FIXED) ? new_len : 0, MemoryEventKind::kRemap);
  // Whether it moves, shrinks or grows in place is known only after the call; invalidating the
  // old range in every case is conservative.
  sanreg::Around old(old_addr, old_len, MemoryEventKind::kRemap);
  if (auto f = sanreg::Resolve(sanreg::g_real.mremap, "mremap")) {
    return f(old_addr, old_len, new_len, flags, new_addr);
  }
  return reinterpret_cast<void*>(syscall(SYS_mremap, old_addr, old_len, new_len, flags, new_addr));
}

int madvise(void* addr, size_t len, int advice) noexcept {
  if (advice == MADV_DONTNEED || advice == MADV_FREE || advice == MADV_REMOVE
#ifdef MADV_DONTNEED_LOCKED
      || advice == MADV_DONTNEED_LOCKED
#endif
  ) {
    sanreg::Around event(addr, len, MemoryEventKind::kAdviseRemove);
    if (auto f = sanreg::Resolve(sanreg::g_real.madvise, "madvise")) return f(addr, len, advice);
    return static_cast<int>(syscall(SYS_madvise, addr, len, advice));
  }
  if (auto f = sanreg::Resolve(sanreg::g_real.madvise, "madvise")) return f(addr, len, advice);
  return static_cast<int>(syscall(SYS_madvise, addr, len, advice));
}

int brk(void* addr) noexcept {
  auto real_sbrk = sanreg::Resolve(sanreg::g_real.sbrk, "sbrk");
  if (real_sbrk != nullptr) {
    uintptr_t cur = reinterpret_cast<uintptr_t>(real_sbrk(0));
    uintptr_t want = reinterpret_cast<uintptr_t>(addr);
    if (want < cur) {
      sanreg::Around event(addr, cur - want, MemoryEventKind::kBrk);
      auto f = sanreg::Resolve(sanreg::g_real.brk, "brk");
      return f != nullptr ? f(addr) : -1;
    }
  }
  auto f = sanreg::Resolve(sanreg::g_real.brk, "brk");
  return f != nullptr ? f(addr) : -1;
}

void* sbrk(intptr_t delta) noexcept {
  auto f = sanreg::Resolve(sanreg::g_real.sbrk, "sbrk");
  if (f == nullptr) return reinterpret_cast<void*>(-1);
  if (delta < 0) {
    uintptr_t cur = reinterpret_cast<uintptr_t>(f(0));
    sanreg::Around event(reinterpret_cast<void*>(cur - static_cast<uintptr_t>(-delta)),
                         static_cast<size_t>(-delta), MemoryEventKind::kBrk);
    return f(delta);
  }
  return f(delta);
}

void* shmat(int id, const void* addr, int flags) noexcept {
  auto f = sanreg::Resolve(sanreg::g_real.shmat, "shmat");
  void* p = f != nullptr ? f(id, addr, flags)
                         : reinterpret_cast<void*>(syscall(SYS_shmat, id, addr, flags));
  if (p != reinterpret_cast<void*>(-1)) {
    struct shmid_ds ds;
    if (shmctl(id, IPC_STAT, &ds) == 0) {
      sanreg::RememberShm(reinterpret_cast<uintptr_t>(p), sanreg::PageRound(ds.shm_segsz));
    }
  }
  return p;
}

int shmdt(const void* addr) noexcept {
  uintptr_t a = reinterpret_cast<uintptr_t>(addr);
  sanreg::Around event(addr, sanreg::ShmSize(a, /*forget=*/true), MemoryEventKind::kShmDetach);
  if (auto f = sanreg::Resolve(sanreg::g_real.shmdt, "shmdt")) return f(addr);
  return static_cast<int>(syscall(SYS_shmdt, addr));
}

void* mmap(void* addr, size_t len, int prot, int flags, int fd, off_t off) noexcept {
  const bool fixed = (flags & MAP_FIXED) != 0 && (flags & MAP_FIXED_NOREPLACE) == 0;
  sanreg::Around event(addr, fixed ? len : 0, MemoryEventKind::kMapFixed);
  if (auto f = sanreg::Resolve(sanreg::g_real.mmap, "mmap")) {
    return f(addr, len, prot, flags, fd, off);
  }
  return reinterpret_cast<void*>(syscall(SYS_mmap, addr, len, prot, flags, fd, off));
}

void* mmap64(void* addr, size_t len, int prot, int flags, int fd, off_t off) noexcept {
  return mmap(addr, len, prot, flags, fd, off);
}

}  // extern "C"
