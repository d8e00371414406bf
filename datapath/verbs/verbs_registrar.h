// verbs_registrar.h: the verbs backend's Registrar: pinning through an injected Registrar, then
// ibv_reg_mr in the fabric's protection domain.
//
// Access flags follow the requested rights: IBV_ACCESS_LOCAL_WRITE for kAccessLocalWrite (and for
// kAccessRemoteWrite, which the verbs specification requires it for). Remote rights are given in
// one of two ways, chosen once per fabric:
//   - memory windows (the device has type 2 windows): the region is registered with
//     IBV_ACCESS_MW_BIND and no remote right, so its own rkey reaches nothing; each
//     Endpoint::Expose binds a type 2 window over the exposed range on that connection's QP, and
//     Endpoint::Revoke invalidates it: the peer's next access fails while the region stays
//     registered and pinned;
//   - no windows: the region is registered with IBV_ACCESS_REMOTE_READ / REMOTE_WRITE and its
//     rkey is what Expose hands out; revoking deregisters and registers the range again (new
//     keys, the pin kept), which revokes every descriptor of the registration at once.
// Registration::handle points to a VerbsMr; Registration::local_key and remote_key are the lkey and
// rkey of the first ibv_mr (the data path reads the current lkey from the VerbsMr, since a
// re-registration changes it). Deregister deallocates the windows still bound over the region
// (which invalidates them), deregisters the region (its keys are revoked when that returns), then
// unpins. A window is also deallocated when its connection closes (VerbsEndpoint::Fail), so a
// long-lived registration exposed on many short connections holds no window per dead connection.
//
// Thread-safety: Register and Deregister from any thread; VerbsMr's fields as marked.

#ifndef SANREG_DATAPATH_VERBS_VERBS_REGISTRAR_H_
#define SANREG_DATAPATH_VERBS_VERBS_REGISTRAR_H_

#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "datapath/verbs/verbs_api.h"
#include "regcache/registrar.h"

namespace sanreg::internal {

// What Registration::handle points to. Reference counted: the registrar holds one reference until
// Deregister, and each endpoint holds one per exposure of it until the exposure is revoked or its
// connection closes, so an endpoint never touches a freed record after a deregistration (it finds
// `mr` null and its window gone instead).
struct VerbsMr {
  Registration pin;  // from the pinner
  int access = 0;    // the ibv access flags it is registered with
  std::atomic<uint32_t> lkey{0};
  std::atomic<uint32_t> refs{1};
  std::mutex mu;
  ibv_mr* mr ABSL_GUARDED_BY(mu) = nullptr;  // null once deregistered
  std::vector<ibv_mw*> windows ABSL_GUARDED_BY(mu);  // bound over it, until revoked

  static void Ref(VerbsMr* rec) { rec->refs.fetch_add(1, std::memory_order_relaxed); }
  static void Unref(VerbsMr* rec) {
    if (rec->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) delete rec;
  }
  // Whether `mw` is still one of this region's windows (neither revoked nor deallocated by
  // Deregister).
  bool HasWindow(const ibv_mw* mw) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    return std::find(windows.begin(), windows.end(), mw) != windows.end();
  }
  // Deallocates `mw` (which invalidates it) if it is still one of this region's windows: neither
  // revoked nor deallocated by Deregister. Returns whether it was.
  bool DropWindow(const VerbsApi* api, ibv_mw* mw, absl::Status* status)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
};

class VerbsRegistrar : public Registrar {
 public:
  // REQUIRES: `api`, `pd` and `pinner` outlive the registrar.
  VerbsRegistrar(const VerbsApi* api, ibv_pd* pd, bool memory_windows, Registrar* pinner)
      : api_(api), pd_(pd), memory_windows_(memory_windows), pinner_(pinner) {}

  // Errors as Registrar says; a failed ibv_reg_mr carries its errno text (ENOMEM:
  // kResourceExhausted) and leaves nothing pinned.
  absl::StatusOr<Registration> Register(uintptr_t addr, size_t length, uint32_t access) override;
  absl::Status Deregister(const Registration& reg) override;

  // The ibv access flags Register uses for `access`.
  static int AccessFlags(uint32_t access, bool memory_windows);

  // Without memory windows: deregisters and registers `rec`'s range again in `pd`, so that every
  // rkey handed out for it stops working; the pages stay pinned.
  // REQUIRES: no local operation uses the registration meanwhile (its lkey changes too).
  static absl::Status Reregister(const VerbsApi* api, ibv_pd* pd, VerbsMr* rec);

 private:
  const VerbsApi* const api_;
  ibv_pd* const pd_;
  const bool memory_windows_;
  Registrar* const pinner_;
};

}  // namespace sanreg::internal

#endif  // SANREG_DATAPATH_VERBS_VERBS_REGISTRAR_H_
