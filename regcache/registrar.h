// registrar.h: the interface a RegistrationCache registers memory through.
//
// The cache knows nothing of fabrics: each backend (pinning only, libfabric, rdma-core verbs, a
// test fake) implements Registrar. A Registration is the backend's record of one registered range:
// the range, the rights it was registered with, an opaque handle and the keys a NIC uses.
//
// Thread-safety: implementations must allow Register and Deregister from any thread, concurrently.
// The cache calls Register while holding its own lock and Deregister from its reclaimer thread (or
// from Flush), never from inside a memory hook.

#ifndef SANREG_REGCACHE_REGISTRAR_H_
#define SANREG_REGCACHE_REGISTRAR_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace sanreg {

// Access rights, a bit mask. Local read is always implied (the NIC may read any registered buffer
// it sends from); each bit adds a right.
enum Access : uint32_t {
  kAccessLocalRead = 1u << 0,    // source of a send or an RDMA write
  kAccessLocalWrite = 1u << 1,   // target of a receive or an RDMA read
  kAccessRemoteRead = 1u << 2,   // the peer may RDMA-read it
  kAccessRemoteWrite = 1u << 3,  // the peer may RDMA-write it
};
inline constexpr uint32_t kAccessAll =
    kAccessLocalRead | kAccessLocalWrite | kAccessRemoteRead | kAccessRemoteWrite;

// True when `have` grants every right in `want`.
constexpr bool AccessCovers(uint32_t have, uint32_t want) { return (want & ~have) == 0; }

// True when `access` is a non-empty combination of known bits.
constexpr bool AccessValid(uint32_t access) { return access != 0 && (access & ~kAccessAll) == 0; }

// A backend's record of one registered range. Plain value; the backend owns what `handle` names.
struct Registration {
  uintptr_t addr = 0;    // start of the registered range
  size_t length = 0;     // bytes registered
  uint32_t access = 0;   // Access bits it was registered with
  uintptr_t handle = 0;  // backend-private (an fid_mr*, an ibv_mr*, a fake's id)
  uint64_t local_key = 0;
  uint64_t remote_key = 0;  // 0 when no remote right was asked for
};

class Registrar {
 public:
  virtual ~Registrar() = default;

  // Registers [addr, addr + length) with `access`.
  // REQUIRES: length > 0, AccessValid(access); the cache passes page-aligned ranges.
  // Returns the registration, or:
  //   kResourceExhausted: out of pinnable memory or keys (the cache evicts and retries once);
  //   kOutOfRange: the range is not wholly mapped user memory;
  //   kPermissionDenied: the mapping does not allow the requested rights;
  //   another code for backend failures.
  virtual absl::StatusOr<Registration> Register(uintptr_t addr, size_t length, uint32_t access) = 0;

  // Releases a registration returned by Register. After it returns the keys are revoked.
  // REQUIRES: `reg` came from this registrar's Register and was not deregistered yet.
  virtual absl::Status Deregister(const Registration& reg) = 0;

  // Verification mode: checks that `reg` still covers the pages it registered (by physical page
  // identity, where the backend records it). Returns kDataLoss when they changed; the default,
  // for backends that record nothing, is OK.
  virtual absl::Status VerifyPages(const Registration& reg) { return absl::OkStatus(); }
};

}  // namespace sanreg

#endif  // SANREG_REGCACHE_REGISTRAR_H_
