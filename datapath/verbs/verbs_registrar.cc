// verbs_registrar.cc: pinning, then ibv_reg_mr; memory windows are bound by the endpoint.

#include "datapath/verbs/verbs_registrar.h"

#include <cerrno>

namespace sanreg::internal {

int VerbsRegistrar::AccessFlags(uint32_t access, bool memory_windows) {
  int flags = 0;
  // Remote write needs local write (ibv_reg_mr refuses it otherwise), and so does a window that
  // grants remote write.
  if (access & (kAccessLocalWrite | kAccessRemoteWrite)) flags |= IBV_ACCESS_LOCAL_WRITE;
  const bool remote = (access & (kAccessRemoteRead | kAccessRemoteWrite)) != 0;
  if (remote && memory_windows) {
    flags |= IBV_ACCESS_MW_BIND;
  } else {
    if (access & kAccessRemoteRead) flags |= IBV_ACCESS_REMOTE_READ;
    if (access & kAccessRemoteWrite) flags |= IBV_ACCESS_REMOTE_WRITE;
  }
  return flags;
}

absl::StatusOr<Registration> VerbsRegistrar::Register(uintptr_t addr, size_t length,
                                                      uint32_t access) {
  if (length == 0 || !AccessValid(access)) {
    return absl::InvalidArgumentError("empty range or invalid access bits");
  }
  absl::StatusOr<Registration> pin = pinner_->Register(addr, length, access);
  if (!pin.ok()) return pin.status();
  const int flags = AccessFlags(access, memory_windows_);
  ibv_mr* mr = api_->reg_mr(pd_, reinterpret_cast<void*>(addr), length, flags);
  if (mr == nullptr) {
    const int err = errno;
    (void)pinner_->Deregister(*pin);
    return VerbsError("ibv_reg_mr", err);
  }
  auto* rec = new VerbsMr();
  rec->pin = *pin;
  rec->access = flags;
  rec->lkey.store(mr->lkey, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> l(rec->mu);
    rec->mr = mr;
  }
  Registration out;
  out.addr = addr;
  out.length = length;
  out.access = access;
  out.handle = reinterpret_cast<uintptr_t>(rec);
  out.local_key = mr->lkey;
  out.remote_key = (access & (kAccessRemoteRead | kAccessRemoteWrite)) != 0 ? mr->rkey : 0;
  return out;
}

absl::Status VerbsRegistrar::Deregister(const Registration& reg) {
  auto* rec = reinterpret_cast<VerbsMr*>(reg.handle);
  if (rec == nullptr) return absl::InvalidArgumentError("not a verbs registration");
  absl::Status s;
  {
    std::lock_guard<std::mutex> l(rec->mu);
    // Deallocating a bound type 2 window invalidates it; a region with bound windows cannot be
    // deregistered (EBUSY).
    for (ibv_mw* mw : rec->windows) {
      absl::Status w = CallStatus("ibv_dealloc_mw", api_->dealloc_mw(mw));
      if (s.ok()) s = w;
    }
    rec->windows.clear();
    if (rec->mr != nullptr) {
      absl::Status d = CallStatus("ibv_dereg_mr", api_->dereg_mr(rec->mr));
      if (s.ok()) s = d;
    }
    rec->mr = nullptr;
  }
  absl::Status u = pinner_->Deregister(rec->pin);
  VerbsMr::Unref(rec);  // endpoints that exposed it may still hold it
  return s.ok() ? u : s;
}

bool VerbsMr::DropWindow(const VerbsApi* api, ibv_mw* mw, absl::Status* status) {
  for (size_t i = 0; i < windows.size(); ++i) {
    if (windows[i] != mw) continue;
    windows.erase(windows.begin() + static_cast<ptrdiff_t>(i));
    absl::Status d = CallStatus("ibv_dealloc_mw", api->dealloc_mw(mw));
    if (status->ok()) *status = d;
    return true;
  }
  return false;
}

absl::Status VerbsRegistrar::Reregister(const VerbsApi* api, ibv_pd* pd, VerbsMr* rec) {
  std::lock_guard<std::mutex> l(rec->mu);
  if (rec->mr == nullptr) return absl::FailedPreconditionError("registration is gone");
  void* addr = rec->mr->addr;
  const size_t length = rec->mr->length;
  absl::Status s = CallStatus("ibv_dereg_mr", api->dereg_mr(rec->mr));
  if (!s.ok()) return s;
  rec->mr = nullptr;
  ibv_mr* mr = api->reg_mr(pd, addr, length, rec->access);
  if (mr == nullptr) return VerbsError("ibv_reg_mr", errno);
  rec->mr = mr;
  rec->lkey.store(mr->lkey, std::memory_order_relaxed);
  return absl::OkStatus();
}

}  // namespace sanreg::internal
