// registrar.cc: the libfabric registrar: pinning through an injected Registrar, then fi_mr_reg.

#include <rdma/fi_domain.h>
#include <rdma/fi_errno.h>

#include "absl/strings/str_cat.h"
#include "datapath/fabric.h"
#include "datapath/internal/socket.h"
#include "datapath/libfabric/core.h"

namespace sanreg {
namespace internal {
namespace {

// Requested keys collide rarely (64 random bits); a provider answers -FI_ENOKEY, and we draw again.
constexpr int kKeyAttempts = 8;

class LibfabricRegistrar : public Registrar {
 public:
  LibfabricRegistrar(FabricCore* fabric, Registrar* pinner) : fabric_(fabric), pinner_(pinner) {}

  absl::StatusOr<Registration> Register(uintptr_t addr, size_t length, uint32_t access) override {
    if (length == 0 || !AccessValid(access)) {
      return absl::InvalidArgumentError("empty range or invalid access bits");
    }
    absl::StatusOr<Registration> pin = pinner_->Register(addr, length, access);
    if (!pin.ok()) return pin.status();
    // Local read is always implied (Registrar contract). Remote bits only when asked.
    uint64_t fi_access = FI_SEND | FI_WRITE;
    if (access & kAccessLocalWrite) fi_access |= FI_RECV | FI_READ;
    if (access & kAccessRemoteRead) fi_access |= FI_REMOTE_READ;
    if (access & kAccessRemoteWrite) fi_access |= FI_REMOTE_WRITE;
    const bool remote = (access & (kAccessRemoteRead | kAccessRemoteWrite)) != 0;
    fid_mr* mr = nullptr;
    int rc = RegisterIn(fabric_, addr, length, fi_access, &mr);
    fid_mr* local_mr = nullptr;
    if (rc == 0 && fabric_->local_ != nullptr) {
      rc = RegisterIn(fabric_->local_.get(), addr, length, fi_access, &local_mr);
      if (rc != 0) fi_close(&mr->fid);
    }
    if (rc != 0) {
      (void)pinner_->Deregister(*pin);
      if (rc == -FI_ENOKEY) return absl::ResourceExhaustedError("fi_mr_reg: no free key");
      return FiError("fi_mr_reg", -rc);
    }
    auto* rec = new MrRecord{mr, local_mr, *pin};
    Registration out;
    out.addr = addr;
    out.length = length;
    out.access = access;
    out.handle = reinterpret_cast<uintptr_t>(rec);
    out.local_key = reinterpret_cast<uint64_t>(fi_mr_desc(mr));
    out.remote_key = remote ? fi_mr_key(mr) : 0;
    return out;
  }

  absl::Status Deregister(const Registration& reg) override {
    auto* rec = reinterpret_cast<MrRecord*>(reg.handle);
    if (rec == nullptr) return absl::InvalidArgumentError("not a libfabric registration");
    // Closing the provider registration revokes the key: accesses that arrive afterwards are
    // refused by the target's provider.
    int rc = fi_close(&rec->mr->fid);
    if (rec->local_mr != nullptr) {
      int lrc = fi_close(&rec->local_mr->fid);
      if (rc == 0) rc = lrc;
    }
    absl::Status s = pinner_->Deregister(rec->pin);
    delete rec;
    if (rc != 0) return FiError("fi_close(mr)", -rc);
    return s;
  }

 private:
  // Registers the range in `core`'s domain. Returns 0 or a negative fi error.
  static int RegisterIn(FabricCore* core, uintptr_t addr, size_t length, uint64_t fi_access,
                        fid_mr** mr) {
    int rc = -FI_ENOKEY;
    for (int attempt = 0; attempt < kKeyAttempts && rc == -FI_ENOKEY; ++attempt) {
      // Where the provider takes requested keys, the key is the only secret a peer needs to reach
      // the region: draw it at random so it cannot be guessed.
      uint64_t key = core->prov_key_ ? 0 : RandomU64();
      rc = fi_mr_reg(core->domain_, reinterpret_cast<void*>(addr), length, fi_access, 0, key, 0,
                     mr, nullptr);
    }
    return rc;
  }

  FabricCore* const fabric_;
  Registrar* const pinner_;
};

}  // namespace

std::unique_ptr<Registrar> FabricCore::NewRegistrar(Registrar* pinner) {
  return std::make_unique<LibfabricRegistrar>(this, pinner);
}

}  // namespace internal
}  // namespace sanreg
