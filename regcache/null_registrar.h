// null_registrar.h: a Registrar that registers nothing and costs nothing (testonly), so that
// benchmarks measure the cache's own work.

#ifndef SANREG_REGCACHE_NULL_REGISTRAR_H_
#define SANREG_REGCACHE_NULL_REGISTRAR_H_

#include "regcache/registrar.h"

namespace sanreg {

class NullRegistrar : public Registrar {
 public:
  absl::StatusOr<Registration> Register(uintptr_t addr, size_t len, uint32_t access) override {
    Registration r;
    r.addr = addr;
    r.length = len;
    r.access = access;
    r.handle = addr;
    return r;
  }
  absl::Status Deregister(const Registration&) override { return absl::OkStatus(); }
};

}  // namespace sanreg

#endif  // SANREG_REGCACHE_NULL_REGISTRAR_H_
