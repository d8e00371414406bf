// endpoint.h: one connection of a Fabric, and the listener that accepts them.
//
// An Endpoint moves bytes between registered local buffers and a peer's exposed region with
// one-sided RDMA: Write (local -> remote) and Read (remote -> local). Both post and return at once;
// the result arrives in a caller-owned Completion (callback, Done() or Wait()).
//
// Errors. Write/Read return non-OK without starting anything when:
//   kInvalidArgument   the scatter-gather list is empty, longer than Completion::kMaxSge, has an
//                      empty or null entry or one its registration does not cover; or the
//                      Completion is in flight;
//   kPermissionDenied  the descriptor was exposed on another connection, lacks the right (Write
//                      needs kAccessRemoteWrite, Read kAccessRemoteRead), or a local registration
//                      lacks kAccessLocalWrite for Read;
//   kOutOfRange        offset + total length runs past the descriptor's length;
//   kUnavailable       the connection is lost or closed.
// A posted operation completes with OK, or with:
//   kPermissionDenied  the target's provider refused the access (wrong or revoked key, bounds,
//                      rights); nothing was transferred. As with an RC queue pair, the connection is
//                      failed afterwards;
//   kUnavailable       the peer closed, died or stopped answering (operation deadline), or the
//                      connection failed on an earlier error: every pending operation completes so;
//   kCancelled         this side closed the endpoint.
//
// What the providers enforce (libfabric 1.17, checked by datapath/security_test.cc):
//   tcp (native FI_EP_MSG endpoints): the target checks key, bounds and both rights (a read of a
//       write-only region, a write of a read-only one) on each access. A refused access moves
//       nothing, and the target's provider drops the connection; the initiator's provider then
//       completes the operation as for a lost peer. The target, seeing its provider drop the
//       connection while none of its own operations failed, says so on the out-of-band socket
//       before it closes, and the operation completes kPermissionDenied (kUnavailable when the
//       target sent no such word: it died, or had operations of its own in flight). With several
//       operations in flight, the first one the provider reports failed is taken for the refused
//       one. A refused write is only reported when the write asks for delivery completion, so
//       every Write here uses FI_DELIVERY_COMPLETE: a completed Write is in the target's memory.
//   shm: the target checks key, bounds and rights and moves nothing, but never tells the
//       initiator, whose operation would wait forever. The operation deadline (FabricOptions::
//       op_timeout) bounds that: the connection fails and the operation completes kUnavailable.
//   shm, peer death: a peer SIGKILLed while it holds its shared region's spinlock leaves it held;
//       libfabric 1.17 then spins forever in fi_writemsg/fi_readmsg to that peer (seen about 1 run
//       in 10 when operations were still queued at the kill). So on shm every post, by the caller
//       or by the progress thread for queued operations, first polls the connection's out-of-band
//       socket (one poll(2)): a dead process's sockets are closed, and its FIN is on ours, before
//       waitpid() reports its death, so a post after that fails the connection (kUnavailable)
//       instead of reaching the provider (datapath/peer_death_test.cc posts right after the kill).
//       What remains (NOT handled): a post that races the death. A poster already waiting for
//       the peer's lock when the peer dies holding it, or one whose check ran just before the
//       peer's exit closed its sockets, spins forever inside libfabric, holding this endpoint's
//       locks (Close and the progress thread then block too). Seen about 1 run in 30 when the
//       kill lands while the progress thread posts queued operations; libfabric 1.17 offers no
//       bounded way out of that spin (the lock is a plain spinlock in the dead peer's region).
//   Both: registrations are domain-wide (no FI_MR_ENDPOINT), so a key works from any connection of
//       the target's fabric; the connection check on descriptors is done here, on the initiator,
//       and the unguessable keys are what stop a peer that forges one.
//   verbs (datapath/verbs/verbs_backend.h): the target's device checks key, bounds and rights and
//       the initiator's operation completes kPermissionDenied (IBV_WC_REM_ACCESS_ERR); the
//       connection then fails. With type 2 memory windows a descriptor's key answers only on the
//       connection it was exposed on, and Revoke withdraws it at once.
//
// Thread-safety: Write, Read, Poll and Close may be called from any thread, concurrently. Expose
// and Revoke wait for the device on verbs: not from a completion callback.
// Invariants:
//   1. At most max_in_flight() operations are with the provider; the rest wait in a FIFO queue and
//      are posted, in order, as completions free room or -FI_EAGAIN clears. Posting never spins.
//      A queued operation's post that fails otherwise fails the connection; one still queued after
//      FabricOptions::op_timeout (an -FI_EAGAIN storm) fails it too.
//   2. When the connection fails or closes, the provider endpoint is closed first (the provider no
//      longer touches any buffer), then every pending operation completes, once.

#ifndef SANREG_DATAPATH_ENDPOINT_H_
#define SANREG_DATAPATH_ENDPOINT_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "datapath/completion.h"
#include "datapath/remote_region.h"
#include "regcache/registrar.h"

namespace sanreg {

class Endpoint;
class Listener;

namespace internal {
class EndpointBackend;
class ListenerBackend;
std::unique_ptr<Endpoint> WrapEndpoint(std::shared_ptr<EndpointBackend> core);
std::unique_ptr<Listener> WrapListener(std::unique_ptr<ListenerBackend> core);
}  // namespace internal

class Endpoint {
 public:
  ~Endpoint();  // Close()s
  Endpoint(const Endpoint&) = delete;
  Endpoint& operator=(const Endpoint&) = delete;

  // Exposes [addr, addr + length) of `reg` to this connection's peer with `rights` (remote bits).
  // Returns kInvalidArgument when the range is empty or outside `reg`, kPermissionDenied when `reg`
  // lacks a requested right, kUnavailable when the connection is lost. The target's provider
  // enforces `rights` on tcp and shm (see the file comment).
  absl::StatusOr<RemoteRegion> Expose(const Registration& reg, const void* addr, size_t length,
                                      uint32_t rights, uint64_t generation = 0) const;

  // Revokes a descriptor Expose returned: afterwards the peer's accesses through it fail, and the
  // registration stays registered and pinned. Verbs: invalidates the descriptor's memory window
  // (or, on a device without type 2 windows, registers the range again, which revokes every
  // descriptor of that registration). Returns kUnimplemented on libfabric (Deregister revokes
  // there), kNotFound for a descriptor this endpoint did not expose or that is already revoked: by
  // Revoke, by deregistering its registration, or by the connection closing or failing (a
  // connection's descriptors die with it, and so do their memory windows).
  // REQUIRES (verbs without windows): no local operation uses the registration meanwhile.
  absl::Status Revoke(const RemoteRegion& region);

  // Writes `sg`, in order, to `dst` starting at byte `offset`. See the file comment for errors.
  // REQUIRES: the buffers stay registered and unchanged until `c` is Done().
  absl::Status Write(std::span<const Sge> sg, const RemoteRegion& dst, uint64_t offset,
                     Completion* c);

  // Reads into `sg`, in order, from `src` starting at byte `offset`.
  absl::Status Read(std::span<const Sge> sg, const RemoteRegion& src, uint64_t offset,
                    Completion* c);

  // Reaps completions on the calling thread (the progress thread does so anyway). Returns how
  // many operations it completed. libfabric: while a caller polls an endpoint, its fabric's
  // progress thread leaves it to that caller, and takes it back within about two ticks of the
  // coarse clock (clock_getres(CLOCK_MONOTONIC_COARSE), 4 ms here) after the caller stops, so an
  // operation nobody polls any more still completes.
  size_t Poll();

  // Fails every pending operation with kCancelled and closes the connection. Idempotent.
  void Close();

  // False once the connection is lost or closed.
  bool connected() const;
  // Why the connection is not usable (OK while connected).
  absl::Status health() const;
  // Shared by both ends of the connection; stamped into the descriptors it exposes.
  uint64_t connection_id() const;
  // The provider this connection runs on ("tcp", "shm", "verbs:<device>"): with "auto" it
  // depends on where the peer is (see fabric.h).
  const std::string& provider_name() const;
  size_t max_in_flight() const;
  // Operations posted to the provider or queued, not yet completed.
  size_t pending() const;

 private:
  friend std::unique_ptr<Endpoint> internal::WrapEndpoint(
      std::shared_ptr<internal::EndpointBackend> core);
  explicit Endpoint(std::shared_ptr<internal::EndpointBackend> core);
  std::shared_ptr<internal::EndpointBackend> core_;
};

class Listener {
 public:
  ~Listener();
  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;

  // Blocks for the next connection and completes the address exchange. Returns kCancelled after
  // Close, kUnavailable when the handshake fails, kFailedPrecondition on a provider mismatch.
  absl::StatusOr<std::unique_ptr<Endpoint>> Accept();

  // "host:port" it listens on, with the port bound.
  std::string address() const;
  uint16_t port() const;

  // Stops listening; a blocked Accept returns kCancelled. Idempotent.
  void Close();

 private:
  friend std::unique_ptr<Listener> internal::WrapListener(
      std::unique_ptr<internal::ListenerBackend> core);
  explicit Listener(std::unique_ptr<internal::ListenerBackend> core);
  std::unique_ptr<internal::ListenerBackend> core_;
};

}  // namespace sanreg

#endif  // SANREG_DATAPATH_ENDPOINT_H_
