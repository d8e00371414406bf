// fabric.cc: Fabric, Endpoint and Listener as handles over a backend (datapath/internal/backend.h).

#include "datapath/fabric.h"

#include <pthread.h>
#include <sched.h>

#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "datapath/endpoint.h"
#include "datapath/internal/backend.h"

namespace sanreg {

namespace internal {

absl::Status ConfigureProgressThread(std::thread& t, int cpu) {
  pthread_setname_np(t.native_handle(), "sanreg-progress");
  if (cpu < 0) return absl::OkStatus();
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(cpu, &one);  // Fabric::Open checked 0 <= cpu < CPU_SETSIZE
  // The kernel is the judge of where this process may run (online CPUs, its cpuset); a later
  // change of the cpuset leaves the thread where the scheduler puts it.
  const int err = pthread_setaffinity_np(t.native_handle(), sizeof one, &one);
  if (err != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "progress_cpu ", cpu, " is not a CPU this process may run on: ", strerror(err)));
  }
  return absl::OkStatus();
}

}  // namespace internal

absl::StatusOr<std::unique_ptr<Fabric>> Fabric::Open(FabricOptions options) {
  if (options.apply_env) {
    absl::Status s = internal::ApplyEnvOverrides(&options);
    if (!s.ok()) return s;
  }
  if (options.progress_cpu < -1 || options.progress_cpu >= CPU_SETSIZE) {
    return absl::InvalidArgumentError(absl::StrCat("progress_cpu ", options.progress_cpu,
                                                   " is not a CPU number (-1: no pinning)"));
  }
  absl::StatusOr<std::unique_ptr<internal::FabricBackend>> core =
      options.provider == "verbs" || absl::StartsWith(options.provider, "verbs:")
          ? internal::OpenVerbs(options)
          : internal::OpenLibfabric(options);
  if (!core.ok()) return core.status();
  return std::unique_ptr<Fabric>(new Fabric(*std::move(core)));
}

Fabric::Fabric(std::unique_ptr<internal::FabricBackend> core) : core_(std::move(core)) {}
Fabric::~Fabric() = default;
const std::string& Fabric::provider_name() const { return core_->provider_name(); }
const FabricOptions& Fabric::options() const { return core_->options(); }
std::unique_ptr<Registrar> Fabric::NewRegistrar(Registrar* pinner) {
  return core_->NewRegistrar(pinner);
}
absl::StatusOr<std::unique_ptr<Listener>> Fabric::Listen(absl::string_view host_port) {
  return core_->Listen(host_port);
}
absl::StatusOr<std::unique_ptr<Endpoint>> Fabric::Connect(absl::string_view host_port) {
  return core_->Connect(host_port);
}

Endpoint::Endpoint(std::shared_ptr<internal::EndpointBackend> core) : core_(std::move(core)) {}
Endpoint::~Endpoint() { Close(); }

absl::Status Endpoint::Write(std::span<const Sge> sg, const RemoteRegion& dst, uint64_t offset,
                             Completion* c) {
  return core_->Post(true, sg, dst, offset, c);
}
absl::Status Endpoint::Read(std::span<const Sge> sg, const RemoteRegion& src, uint64_t offset,
                            Completion* c) {
  return core_->Post(false, sg, src, offset, c);
}
size_t Endpoint::Poll() { return core_->Poll(); }
absl::StatusOr<RemoteRegion> Endpoint::Expose(const Registration& reg, const void* addr,
                                              size_t length, uint32_t rights,
                                              uint64_t generation) const {
  return core_->Expose(reg, addr, length, rights, generation);
}
absl::Status Endpoint::Revoke(const RemoteRegion& region) { return core_->Revoke(region); }
void Endpoint::Close() { core_->Close(); }
bool Endpoint::connected() const { return core_->connected(); }
absl::Status Endpoint::health() const { return core_->health(); }
uint64_t Endpoint::connection_id() const { return core_->connection_id(); }
const std::string& Endpoint::provider_name() const { return core_->provider_name(); }
size_t Endpoint::max_in_flight() const { return core_->max_in_flight(); }
size_t Endpoint::pending() const { return core_->pending(); }

Listener::Listener(std::unique_ptr<internal::ListenerBackend> core) : core_(std::move(core)) {}
Listener::~Listener() = default;
absl::StatusOr<std::unique_ptr<Endpoint>> Listener::Accept() { return core_->Accept(); }
std::string Listener::address() const { return core_->address(); }
uint16_t Listener::port() const { return core_->port(); }
void Listener::Close() { core_->Close(); }

namespace internal {

std::unique_ptr<Endpoint> WrapEndpoint(std::shared_ptr<EndpointBackend> core) {
  return std::unique_ptr<Endpoint>(new Endpoint(std::move(core)));
}
std::unique_ptr<Listener> WrapListener(std::unique_ptr<ListenerBackend> core) {
  return std::unique_ptr<Listener>(new Listener(std::move(core)));
}

}  // namespace internal
}  // namespace sanreg
