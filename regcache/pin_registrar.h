// pin_registrar.h: a Registrar that pins memory with mlock, as a NIC driver's registration does.
//
// mlock faults every page in (breaking copy-on-write for private writable mappings, as the kernel's
// populate path does for VM_WRITE) and keeps it resident. Locks do not nest in the kernel: one
// munlock undoes any number of mlocks of a page. Registrations may overlap, so the registrar keeps
// its own per-page reference count (as ranges: a map of breakpoints) and only mlocks pages going
// from 0 to 1 and munlocks pages going from 1 to 0.
//
// Errors from Register:
//   kResourceExhausted: RLIMIT_MEMLOCK (or the system) refuses to lock more (ENOMEM/EAGAIN/EPERM on
//                       mapped memory). Root has CAP_IPC_LOCK and is not limited.
//   kOutOfRange:        part of the range is not mapped.
// Nothing stays locked after a failed Register.
//
// mlock and munlock are called through syscall(2): the sanitizers intercept the libc functions as
// no-ops.
//
// Fork (Options::dont_fork, on by default): pinned ranges are marked MADV_DONTFORK (and
// MADV_DOFORK again when their last registration goes), as ibv_fork_init does. Without it, a fork
// makes the pinned pages copy-on-write, and the parent's next write moves its virtual page to a new
// physical page that the NIC does not know: data written by the parent would never reach the wire.
// The cost: a child process does not have the registered ranges at all (touching them faults), so
// register buffers the child never touches (not the malloc heap the child will use), or fork
// before registering.
//
// Verification (Options::record_pages): Register records the physical frame of every page from
// /proc/self/pagemap (frames are readable by root only) and VerifyPages compares them with the
// frames mapped now; tests use it to prove by page identity that no hit returns stale pages.
//
// Thread-safety: every method may be called from any thread (one internal mutex).

#ifndef SANREG_REGCACHE_PIN_REGISTRAR_H_
#define SANREG_REGCACHE_PIN_REGISTRAR_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "regcache/registrar.h"

namespace sanreg {

class PinRegistrar : public Registrar {
 public:
  struct Options {
    bool dont_fork = true;
    bool record_pages = false;
  };

  PinRegistrar() : PinRegistrar(Options()) {}
  explicit PinRegistrar(const Options& options);
  ~PinRegistrar() override;  // munlocks whatever is still locked

  // Pins the pages covering [addr, addr + length). Keys are 0 (pinning has no keys); the handle
  // is a sequence number.
  absl::StatusOr<Registration> Register(uintptr_t addr, size_t length, uint32_t access) override;
  absl::Status Deregister(const Registration& reg) override;

  // Verification: kDataLoss when a page of `reg` is now backed by another frame (or unmapped).
  // OK when record_pages is off.
  absl::Status VerifyPages(const Registration& reg) override;

  // Bytes this registrar holds locked (each page once, however many registrations cover it).
  size_t locked_bytes() const;

  // The physical frame of each page of [addr, addr + len), 0 where not present.
  // Returns kPermissionDenied when pagemap hides frames (not root), kUnavailable without pagemap.
  static absl::StatusOr<std::vector<uint64_t>> PageFrames(uintptr_t addr, size_t len);
  // True when this process can read frame numbers (verification works).
  static bool PageFramesReadable();

 private:
  // Returns the [start, end) sub-ranges of [s, e) whose count is `count`, merged.
  std::vector<std::pair<uintptr_t, uintptr_t>> RangesWithCount(uintptr_t s, uintptr_t e,
                                                               uint32_t count);
  void Split(uintptr_t at);
  void AddCount(uintptr_t s, uintptr_t e, int delta);
  void Coalesce(uintptr_t s, uintptr_t e);

  const Options options_;
  const size_t page_size_;
  mutable std::mutex mu_;
  // counts_[k] is the reference count of every page in [k, next key); pages before the first key
  // or after the last are 0. Guarded by mu_.
  std::map<uintptr_t, uint32_t> counts_;
  size_t locked_bytes_ = 0;                                     // guarded by mu_
  uint64_t next_handle_ = 1;                                    // guarded by mu_
  std::unordered_map<uint64_t, std::vector<uint64_t>> frames_;  // by handle, guarded by mu_
};

}  // namespace sanreg

#endif  // SANREG_REGCACHE_PIN_REGISTRAR_H_
