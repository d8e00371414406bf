// fabric.h: a libfabric provider opened for sanreg, the root object of the data path.
//
// A Fabric owns one provider domain (every registration and endpoint lives in it) and one progress
// thread that serves all of its endpoints: it reaps completions, retries operations the provider
// refused with -FI_EAGAIN, watches each connection's out-of-band socket for a lost peer and enforces
// the operation deadline. The provider's data progress is manual on tcp and shm, so a passive target
// only makes progress because of this thread. While no operation is in flight the thread sleeps
// between polls (up to FabricOptions::idle_poll), so an idle fabric burns no core.
//
// Providers: "tcp" (libfabric's native tcp provider, FI_EP_MSG), "shm" (same host only, FI_EP_RDM),
// "auto": per connection, shm when the peer is on this host (Connect to 0.0.0.0, 127.0.0.0/8 or an
// address of one of this host's interfaces) and shm opens here, else tcp. An "auto" fabric holds
// both domains: its registrar registers every range in each (the keys differ per domain; Expose
// hands out the one of the connection's domain), its listener accepts peers of either provider, and
// each domain has its own progress thread. Connect over shm falls back to tcp when the listener
// answers that it does not run shm. provider_name() is the tcp one; Endpoint::provider_name() says
// which one a connection uses.
// Every connection has its own completion queue and a plain TCP socket for the handshake, which
// then serves as the liveness channel of the connection. On shm its provider endpoint is FI_EP_RDM
// with its own address vector (the handshake exchanges the endpoints' names); on tcp it is a
// connected FI_EP_MSG endpoint with its own event queue: the listening side opens a passive
// endpoint for the connection, names it in the handshake and accepts the one connection request
// that carries the token the connecting side sent. (tcp's FI_EP_RDM, tcp;ofi_rxm in libfabric
// 1.17, makes every registration remotely readable; the native endpoints enforce both rights.)
//
// Verbs ("verbs", "verbs:<device>"): rdma-core RC queue pairs connected through rdmacm; see
// datapath/verbs/verbs_backend.h. Listen and Connect then take addresses of the RDMA device's IP
// interface (IPoIB, RoCE).
//
// Thread-safety: all methods are thread-safe. Destroy the Fabric after every Endpoint, Listener and
// registrar made from it.

#ifndef SANREG_DATAPATH_FABRIC_H_
#define SANREG_DATAPATH_FABRIC_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "regcache/registrar.h"

namespace sanreg {

namespace internal {
class FabricBackend;
struct VerbsApi;
}  // namespace internal

class Endpoint;
class Listener;

// The data path's options (STYLE.md rule 11). Environment overrides, applied by Open when
// `apply_env` is set, are declared in one table in libfabric/setup.cc:
//   SANREG_PROVIDER, SANREG_MAX_IN_FLIGHT, SANREG_OP_TIMEOUT_MS, SANREG_IDLE_POLL_US,
//   SANREG_PROGRESS_CPU.
struct FabricOptions {
  // "tcp", "shm" or "auto" (libfabric); "verbs" (rdma-core: the first device with an active
  // port) or "verbs:<device>" (that device, by its ibv name).
  std::string provider = "auto";
  // Operations handed to the provider at once, per endpoint (clamped to the provider's tx size);
  // more are queued in order and posted as completions free room.
  size_t max_in_flight = 256;
  // An operation not completed within this time fails the connection: every pending operation then
  // completes with kUnavailable. libfabric only: on verbs the QP's retry counters bound it. Bounds
  // the wait when a provider drops an access it refuses without telling the initiator (shm does;
  // see endpoint.h).
  absl::Duration op_timeout = absl::Seconds(30);
  // The longest the progress thread sleeps between polls when nothing is in flight.
  absl::Duration idle_poll = absl::Milliseconds(1);
  // The CPU the fabric's progress threads run on, or -1 to leave them to the scheduler. Pinning
  // keeps a spinning progress thread off the CPU of a thread that posts and polls, and on one CPU
  // where CPUs differ (the vCPUs of a virtual machine may differ in memory latency). Fabric::Open
  // refuses, with kInvalidArgument, a number outside [-1, CPU_SETSIZE) and a CPU the kernel will
  // not run this process's threads on. The threads are named "sanreg-progress".
  int progress_cpu = -1;
  bool apply_env = true;
  // Test hook, verbs only: the function table to run the backend on instead of rdma-core's, e.g.
  // the in-process fake device (datapath/verbs/fake_device.h). Null: rdma-core.
  const internal::VerbsApi* verbs_api = nullptr;
};

class Fabric {
 public:
  // Opens the provider. Returns kNotFound when the installed libfabric has no such provider with
  // one-sided RMA (tcp on FI_EP_MSG, shm on FI_EP_RDM), kInvalidArgument for an unknown name or
  // bad options. Verbs: kUnavailable with "no RDMA device found" when there is no device (or
  // none with an active port), kNotFound when the named device does not exist.
  static absl::StatusOr<std::unique_ptr<Fabric>> Open(FabricOptions options);

  ~Fabric();
  Fabric(const Fabric&) = delete;
  Fabric& operator=(const Fabric&) = delete;

  // The provider in use: "tcp" or "shm" (libfabric), "verbs:<device>".
  const std::string& provider_name() const;
  const FabricOptions& options() const;

  // A registrar that pins through `pinner` (which must outlive it) and then registers the range
  // with the provider (fi_mr_reg). Remote rights are granted only when asked for; where the
  // provider takes requested keys they are drawn from getrandom (unguessable); Deregister closes
  // the provider registration first (the key is revoked when it returns), then unpins.
  // Registration::handle is private to this registrar; Registration::local_key is the provider's
  // local descriptor, Registration::remote_key the remote key (0 without remote rights).
  std::unique_ptr<Registrar> NewRegistrar(Registrar* pinner);

  // Listens on "host:port" (port 0 picks one). Returns kInvalidArgument for a bad address,
  // kUnavailable when it cannot bind.
  absl::StatusOr<std::unique_ptr<Listener>> Listen(absl::string_view host_port);

  // Connects to a Listener at "host:port" and exchanges provider addresses. Returns kUnavailable
  // when nobody answers, kFailedPrecondition when the peer runs another provider.
  absl::StatusOr<std::unique_ptr<Endpoint>> Connect(absl::string_view host_port);

 private:
  explicit Fabric(std::unique_ptr<internal::FabricBackend> core);
  std::unique_ptr<internal::FabricBackend> core_;
};

}  // namespace sanreg

#endif  // SANREG_DATAPATH_FABRIC_H_
