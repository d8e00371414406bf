// backend.h: the seam between the public data path (Fabric, Endpoint, Listener) and its backends.
//
// Fabric, Endpoint and Listener are thin handles over a FabricBackend, EndpointBackend and
// ListenerBackend. Two backends implement them: libfabric (datapath/libfabric/, providers tcp and
// shm) and rdma-core verbs (datapath/verbs/). Fabric::Open picks one by FabricOptions::provider:
// "verbs" or "verbs:<device>" opens the verbs backend, anything else libfabric. Write and Read cost
// one virtual call each (Endpoint -> EndpointBackend::Post); a backend's own classes are final, so
// calls inside a backend are direct.
//
// Completions: a backend stores an operation's state in the caller's Completion (it is a friend of
// Completion) and ends it with FinishOperation, which keeps invariant 2 of completion.h the same
// for every backend.
//
// Thread-safety: as endpoint.h and fabric.h say for the public classes.

#ifndef SANREG_DATAPATH_INTERNAL_BACKEND_H_
#define SANREG_DATAPATH_INTERNAL_BACKEND_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "datapath/completion.h"
#include "datapath/endpoint.h"
#include "datapath/fabric.h"
#include "datapath/remote_region.h"
#include "regcache/registrar.h"

namespace sanreg::internal {

class EndpointBackend {
 public:
  virtual ~EndpointBackend() = default;
  // Endpoint::Write (write) and Endpoint::Read (!write).
  virtual absl::Status Post(bool write, std::span<const Sge> sg, const RemoteRegion& r,
                            uint64_t offset, Completion* c) = 0;
  virtual size_t Poll() = 0;
  virtual absl::StatusOr<RemoteRegion> Expose(const Registration& reg, const void* addr,
                                              size_t length, uint32_t rights,
                                              uint64_t generation) = 0;
  virtual absl::Status Revoke(const RemoteRegion& r) = 0;
  virtual void Close() = 0;
  virtual bool connected() const = 0;
  virtual absl::Status health() const = 0;
  virtual uint64_t connection_id() const = 0;
  virtual const std::string& provider_name() const = 0;
  virtual size_t max_in_flight() const = 0;
  virtual size_t pending() const = 0;
};

class ListenerBackend {
 public:
  virtual ~ListenerBackend() = default;
  virtual absl::StatusOr<std::unique_ptr<Endpoint>> Accept() = 0;
  virtual std::string address() const = 0;
  virtual uint16_t port() const = 0;
  virtual void Close() = 0;
};

class FabricBackend {
 public:
  virtual ~FabricBackend() = default;
  virtual const std::string& provider_name() const = 0;
  virtual const FabricOptions& options() const = 0;
  virtual std::unique_ptr<Registrar> NewRegistrar(Registrar* pinner) = 0;
  virtual absl::StatusOr<std::unique_ptr<Listener>> Listen(absl::string_view host_port) = 0;
  virtual absl::StatusOr<std::unique_ptr<Endpoint>> Connect(absl::string_view host_port) = 0;
};

// The public handles over a backend's objects (their constructors are private).
std::unique_ptr<Endpoint> WrapEndpoint(std::shared_ptr<EndpointBackend> core);
std::unique_ptr<Listener> WrapListener(std::unique_ptr<ListenerBackend> core);

// Ends `c` with `s`: stores the result, marks it done, wakes Wait()ers, then runs the callback.
// The library never touches `c` afterwards (completion.h, invariant 2). data_path.cc.
void FinishOperation(Completion* c, absl::Status s);

// Applies the SANREG_* environment overrides to `o` (one table, libfabric/setup.cc).
absl::Status ApplyEnvOverrides(FabricOptions* o);

// Called by a backend right after it starts a progress thread `t`: names it "sanreg-progress"
// and, when `cpu` >= 0, pins it there. Returns kInvalidArgument when the kernel will not run the
// thread on `cpu` (not online, or outside the process's cpuset); the backend's Open then fails
// with it. fabric.cc.
absl::Status ConfigureProgressThread(std::thread& t, int cpu);

// Opens a backend. REQUIRES: environment overrides already applied.
absl::StatusOr<std::unique_ptr<FabricBackend>> OpenLibfabric(const FabricOptions& options);
absl::StatusOr<std::unique_ptr<FabricBackend>> OpenVerbs(const FabricOptions& options);

}  // namespace sanreg::internal

#endif  // SANREG_DATAPATH_INTERNAL_BACKEND_H_
