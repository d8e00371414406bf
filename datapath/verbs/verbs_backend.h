// verbs_backend.h: the rdma-core verbs backend behind Fabric, Endpoint and Listener.
//
// Opening ("verbs" or "verbs:<device>", fabric.h): the device by name, or else the first device
// with an active port, from rdmacm's device list (rdma_get_devices: the contexts an rdma_cm_id
// resolves to). No device, or none with an active port: kUnavailable "no RDMA device found". One
// protection domain serves the fabric's registrar and endpoints.
//
// Connections go through rdmacm: the connecting side resolves the address and the route, makes its
// RC queue pair and connects with private data {magic "SRV1", descriptor format version
// (RemoteRegion::kWireVersion), 0}; the listener checks the version (a mismatch is rejected with
// its own version in the reject's private data: the connecting side gets kFailedPrecondition) and
// accepts with {magic, version, connection id}. Each connection has its own event channel, send
// CQ and QP (no receive work: the data path is one-sided).
//
// Posting (data_path.cc): one work request per Write/Read with the scatter-gather list (up to the
// device's max_sge, at most Completion::kMaxSge); writes of at most max_inline_data bytes go
// inline (the source buffer is not read again after Write returns, and its lkey is not used);
// only every kSignalEvery-th work request is signalled. RC completes a send queue in order, so a
// signalled completion also completes every unsignalled request posted before it. When the newest
// request is unsignalled and nothing was posted for a whole progress pass, the progress thread
// posts a signalled zero-length RDMA write (which checks no key) behind it so that it completes.
// At most max_in_flight requests are on the QP; more wait in order, as on libfabric.
//
// Errors: an error completion fails the connection. Requests before it completed OK (RC order);
// the failed one completes with WcStatusToStatus(status) (IBV_WC_REM_ACCESS_ERR:
// kPermissionDenied); then the QP is moved to error (rdma_disconnect) and destroyed, and every
// other pending operation completes once with kUnavailable ("connection failed after an operation
// error: ..."). A peer that disconnects or dies (rdmacm's DISCONNECTED: its kernel sends a DREQ)
// fails the connection with kUnavailable; a peer whose host vanishes is seen when a request to it
// completes with IBV_WC_RETRY_EXC_ERR. No operation deadline: the QP's retry counters bound it.
//
// Exposing (setup.cc): with type 2 memory windows (see verbs_registrar.h), Expose binds a window
// over the range on the connection's QP and waits for the bind to complete; the descriptor's key is
// the window's rkey, valid only on this connection (the device enforces the QP), and Revoke
// invalidates it (IBV_WR_LOCAL_INV) before returning. Without windows the key is the region's rkey.
//
// Thread-safety: as endpoint.h. Locking: VerbsEndpoint::cq_mu_ before mu_ where both are held
// (cq_mu_ serializes polling with destroying the QP); a VerbsMr's mu before an endpoint's mu_; the
// fabric's endpoint registry (internal/endpoint_registry.h) locks only itself.
// Invariants:
//   1. A Completion is on exactly one of posted_/queued_ from acceptance until it is unlinked under
//      mu_; whoever unlinks it completes it, once.
//   2. posted_ is in posting order, which is the QP's completion order.
//   3. The QP is destroyed (state_ != kOpen) before the operations still listed are completed.

#ifndef SANREG_DATAPATH_VERBS_VERBS_BACKEND_H_
#define SANREG_DATAPATH_VERBS_VERBS_BACKEND_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "datapath/internal/backend.h"
#include "datapath/internal/endpoint_registry.h"
#include "datapath/internal/poll_lock.h"
#include "datapath/verbs/verbs_api.h"
#include "datapath/verbs/verbs_registrar.h"

namespace sanreg::internal {

class VerbsEndpoint;

// Every kSignalEvery-th work request asks for a completion.
inline constexpr uint32_t kSignalEvery = 16;
// Send queue entries beyond max_in_flight: the zero-length completion request, and binds and
// invalidations of memory windows.
inline constexpr uint32_t kControlSlots = 8;
// Writes up to this many bytes are asked to go inline (the QP may grant less).
inline constexpr uint32_t kWantInline = 64;

class VerbsFabric final : public FabricBackend {
 public:
  VerbsFabric() = default;
  ~VerbsFabric() override;

  absl::Status Open(const FabricOptions& options);  // setup.cc
  absl::Status StartProgress();  // fails as ConfigureProgressThread (backend.h)

  const std::string& provider_name() const override { return provider_name_; }
  const FabricOptions& options() const override { return options_; }
  std::unique_ptr<Registrar> NewRegistrar(Registrar* pinner) override;
  absl::StatusOr<std::unique_ptr<Listener>> Listen(absl::string_view host_port) override;
  absl::StatusOr<std::unique_ptr<Endpoint>> Connect(absl::string_view host_port) override;

  // An endpoint for `id` (resolved to this fabric's device): its CQ and QP.
  absl::StatusOr<std::shared_ptr<VerbsEndpoint>> NewEndpoint(rdma_cm_id* id,
                                                            rdma_event_channel* channel);
  void AddEndpoint(std::shared_ptr<VerbsEndpoint> ep);
  void RemoveEndpoint(VerbsEndpoint* ep) { endpoints_.Remove(ep); }
  void Wake();  // data_path.cc

  FabricOptions options_;
  const VerbsApi* api_ = nullptr;
  ibv_context** devices_ = nullptr;
  ibv_context* ctx_ = nullptr;
  ibv_pd* pd_ = nullptr;
  std::string device_name_;
  std::string provider_name_;
  bool memory_windows_ = false;
  uint32_t max_sge_ = 1;
  size_t max_in_flight_ = 1;
  // RDMA reads outstanding per QP, each way (the device's max_qp_rd_atom / max_qp_init_rd_atom,
  // at most 16): rdmacm's responder_resources and initiator_depth.
  uint8_t responder_resources_ = 1;
  uint8_t initiator_depth_ = 1;

 private:
  void ProgressLoop();  // data_path.cc

  EndpointRegistry<VerbsEndpoint> endpoints_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> sleeping_{false};
  int wake_fd_ = -1;
  std::thread progress_;
};

class VerbsEndpoint final : public EndpointBackend {
 public:
  VerbsEndpoint(VerbsFabric* fabric, rdma_cm_id* id, rdma_event_channel* channel)
      : fabric_(fabric), api_(fabric->api_), id_(id), channel_(channel) {}
  ~VerbsEndpoint() override;  // setup.cc: destroys the QP, CQ, id and channel

  // data_path.cc
  absl::Status Post(bool write, std::span<const Sge> sg, const RemoteRegion& r, uint64_t offset,
                    Completion* c) override;
  size_t Poll() override { return Progress(); }
  // Reaps completions, posts queued operations, asks for the completion of an unsignalled tail.
  // Returns how many operations it completed.
  size_t Progress();
  // Handles the event channel (non-blocking): a disconnect fails the connection.
  void OnCmEvent();

  // setup.cc
  absl::StatusOr<RemoteRegion> Expose(const Registration& reg, const void* addr, size_t length,
                                      uint32_t rights, uint64_t generation) override;
  absl::Status Revoke(const RemoteRegion& r) override;
  void Close() override;
  // Fails the connection: QP to error, completions reaped, QP destroyed, every pending operation
  // completed with `why`. Idempotent.
  void Fail(absl::Status why);

  bool connected() const override {
    std::lock_guard<std::mutex> l(mu_);
    return state_ == State::kOpen;
  }
  absl::Status health() const override {
    std::lock_guard<std::mutex> l(mu_);
    return health_;
  }
  uint64_t connection_id() const override { return connection_id_; }
  const std::string& provider_name() const override { return fabric_->provider_name_; }
  size_t max_in_flight() const override { return fabric_->max_in_flight_; }
  size_t pending() const override { return pending_atomic_.load(std::memory_order_relaxed); }
  int channel_fd() const { return channel_->fd; }

  VerbsFabric* const fabric_;
  const VerbsApi* const api_;
  rdma_cm_id* const id_;
  rdma_event_channel* const channel_;
  ibv_cq* cq_ = nullptr;
  uint32_t max_inline_ = 0;
  uint64_t connection_id_ = 0;  // set once, before the endpoint is published
  std::atomic<bool> open_{false};

 private:
  enum class State { kOpen, kFailing, kClosed };
  // A window bound on this connection, by its rkey (or, without windows, the region exposed).
  struct Exposure {
    ibv_mw* mw;
    VerbsMr* rec;
  };

  // Posts `c` (a Write or Read). Returns 0 or an errno value (ENOMEM: the send queue is full).
  int PostOne(Completion* c) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void PostQueued() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Posts a memory-window work request with `c` as its context, then waits for it to complete.
  absl::Status RunControl(ibv_send_wr* wr, Completion* c);
  // Handles one work completion: completes, in order, every posted operation up to the one it
  // names, linking them on `*done` with their status set. An error while open sets *fail.
  void Consume(const ibv_wc& wc, Completion*** done, absl::Status* fail)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static void FinishChain(Completion* chain);

  PollLock cq_mu_;         // see poll_lock.h
  mutable std::mutex mu_;  // acquired after cq_mu_ when both are held
  State state_ ABSL_GUARDED_BY(mu_) = State::kOpen;
  absl::Status health_ ABSL_GUARDED_BY(mu_);
  Completion* posted_head_ ABSL_GUARDED_BY(mu_) = nullptr;
  Completion* posted_tail_ ABSL_GUARDED_BY(mu_) = nullptr;
  Completion* queued_head_ ABSL_GUARDED_BY(mu_) = nullptr;
  Completion* queued_tail_ ABSL_GUARDED_BY(mu_) = nullptr;
  size_t posted_count_ ABSL_GUARDED_BY(mu_) = 0;
  size_t queued_count_ ABSL_GUARDED_BY(mu_) = 0;
  std::atomic<size_t> pending_atomic_{0};
  uint32_t unsignalled_ ABSL_GUARDED_BY(mu_) = 0;  // posted since the last signalled request
  uint64_t posts_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t posts_seen_ ABSL_GUARDED_BY(mu_) = 0;  // posts_ at the previous progress pass
  // The zero-length signalled request (its wr_id is &fence_) and the operation it completes.
  char fence_ = 0;
  bool fence_posted_ ABSL_GUARDED_BY(mu_) = false;
  Completion* fence_through_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::map<uint32_t, Exposure> exposures_ ABSL_GUARDED_BY(mu_);
};

class VerbsListener final : public ListenerBackend {
 public:
  ~VerbsListener() override;
  absl::StatusOr<std::unique_ptr<Endpoint>> Accept() override;
  std::string address() const override;
  uint16_t port() const override;
  void Close() override;

  VerbsFabric* fabric_ = nullptr;
  rdma_event_channel* channel_ = nullptr;
  rdma_cm_id* id_ = nullptr;
  int wake_fd_ = -1;
  std::atomic<bool> closed_{false};
};

}  // namespace sanreg::internal

#endif  // SANREG_DATAPATH_VERBS_VERBS_BACKEND_H_
