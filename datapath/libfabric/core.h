// core.h: the libfabric backend's private state behind Fabric, Endpoint and Listener.
//
// setup.cc opens and closes things (fi_getinfo, domain, endpoints, the address exchange and, on
// tcp, the provider connection); data_path.cc holds the hot path (posting, completions, the
// progress thread).
//
// Locking: EndpointCore::cq_mu_ is taken before EndpointCore::mu_ where both are held.
//   cq_mu_ serializes fi_cq_read/readerr with closing the provider endpoint;
//   mu_ guards the state, the operation lists and posting (fi_writemsg/fi_readmsg).
// FabricCore::mu_ guards the endpoint list; it is never held while taking an endpoint's locks.
//
// Invariants:
//   1. A Completion is on exactly one of posted_/queued_ from acceptance until it is unlinked under
//      mu_; whoever unlinks it completes it, once.
//   2. posted_count_ <= max_in_flight_; queued_ is non-empty only while posted_count_ ==
//      max_in_flight_ or the provider last answered -FI_EAGAIN.
//   3. ep_ is closed (state_ != kOpen) before the operations still listed are completed.

#ifndef SANREG_DATAPATH_LIBFABRIC_CORE_H_
#define SANREG_DATAPATH_LIBFABRIC_CORE_H_

#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_eq.h>
#include <netinet/in.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "datapath/completion.h"
#include "datapath/fabric.h"
#include "datapath/internal/backend.h"
#include "datapath/internal/endpoint_registry.h"
#include "datapath/internal/poll_lock.h"
#include "datapath/libfabric/liveness.h"
#include "datapath/remote_region.h"

namespace sanreg::internal {

class EndpointCore;

// Monotonic nanoseconds (coarse clock: cheap, a few ms of resolution, enough for deadlines).
int64_t NowCoarseNs();
// How long the progress thread sleeps when it has left its busy endpoints to their callers,
// before it looks again: the coarse clock's tick (clock_getres), kept within 1-10 ms. A caller
// that stops polling without handing the endpoint back (an Endpoint::Poll user; Completion::Wait
// hands back) is taken over within this plus a tick. Driven() changes only once per tick, so
// waking more often finds nothing new, and each wake-up takes a core from a polling thread on a
// small machine.
long DriverRecheckNs();

// Maps a libfabric error number (positive) to a status code.
absl::Status FiError(const char* what, int err);

// What Registration::handle points to for the libfabric registrar: the provider registration,
// the one in the "auto" fabric's shm domain (null when it has none), and the pin under both.
struct MrRecord {
  fid_mr* mr;
  fid_mr* local_mr;
  Registration pin;
};

class FabricCore final : public FabricBackend {
 public:
  FabricCore() = default;
  ~FabricCore() override;  // stops the progress thread, closes the domain

  // FabricBackend (setup.cc, registrar.cc).
  const std::string& provider_name() const override { return provider_name_; }
  const FabricOptions& options() const override { return options_; }
  std::unique_ptr<Registrar> NewRegistrar(Registrar* pinner) override;
  absl::StatusOr<std::unique_ptr<Listener>> Listen(absl::string_view host_port) override;
  absl::StatusOr<std::unique_ptr<Endpoint>> Connect(absl::string_view host_port) override;

  absl::Status Open(const FabricOptions& options);  // setup.cc
  // Starts the progress thread, and local_'s; fails as ConfigureProgressThread (backend.h).
  absl::Status StartProgress();

  // Creates an endpoint for the out-of-band connection `sock`: its queues and, on shm, its
  // provider endpoint. On tcp the provider endpoint comes with the provider connection
  // (EndpointCore::ConnectProvider / AcceptProvider).
  absl::StatusOr<std::shared_ptr<EndpointCore>> NewEndpoint(int sock, uint64_t connection_id);
  void AddEndpoint(std::shared_ptr<EndpointCore> ep);
  void RemoveEndpoint(EndpointCore* ep) { endpoints_.Remove(ep); }

  // Wakes the progress thread if it sleeps; with `even_short` false, only from a long sleep (one
  // that may outlast DriverRecheckNs). Cheap when it does not sleep.
  void Wake(bool even_short = true);

  FabricOptions options_;
  int64_t op_timeout_ns_ = 0;  // options_.op_timeout, for the hot path
  const int64_t driver_recheck_ns_ = DriverRecheckNs();  // for the hot path
  fi_info* info_ = nullptr;
  fid_fabric* fabric_ = nullptr;
  fid_domain* domain_ = nullptr;
  std::string provider_name_;
  bool is_tcp_ = false;
  bool is_shm_ = false;
  // shm: the prefix of this fabric's endpoint names, and the beacon its progress thread holds.
  std::string shm_prefix_;
  std::atomic<uint64_t> shm_endpoints_{0};
  std::unique_ptr<LivenessBeacon> beacon_;
  // FI_EP_MSG (tcp): one connected provider endpoint per connection, with an event queue, no
  // address vector. Otherwise FI_EP_RDM (shm).
  bool msg_ = false;
  bool virt_addr_ = false;     // FI_MR_VIRT_ADDR: remote addresses are virtual addresses
  bool prov_key_ = false;      // FI_MR_PROV_KEY: the provider picks keys
  // shm: look at the peer's liveness socket before each post (see EndpointCore::PeerGone).
  bool check_peer_before_post_ = false;
  size_t iov_limit_ = 1;
  size_t max_in_flight_ = 1;
  // "auto": the shm core that serves peers on this host (null when shm does not open). It shares
  // the registrar (each registration is made in both domains) but has its own domain, endpoints
  // and progress thread. `is_local_` marks that core: its endpoints find their local descriptors
  // and remote keys in MrRecord::local_mr.
  std::unique_ptr<FabricCore> local_;
  bool is_local_ = false;

 private:
  void ProgressLoop();  // data_path.cc

  EndpointRegistry<EndpointCore> endpoints_;
  std::atomic<bool> stop_{false};
  // What the progress thread is doing: kAwake, or sleeping in ppoll for at most DriverRecheckNs
  // (kShortSleep), or for longer (kLongSleep). The first waker of a sleep takes it (kAwake) and
  // writes the eventfd; the others make no system call.
  enum SleepState : int { kAwake = 0, kShortSleep = 1, kLongSleep = 2 };
  std::atomic<int> sleeping_{kAwake};
  int wake_fd_ = -1;  // eventfd
  std::thread progress_;
};

class EndpointCore final : public EndpointBackend {
 public:
  EndpointCore(FabricCore* fabric, uint64_t connection_id) : fabric_(fabric), id_(connection_id) {}
  EndpointCore(const EndpointCore&) = delete;
  EndpointCore& operator=(const EndpointCore&) = delete;
  ~EndpointCore() override;

  // EndpointBackend: Post, Poll (data_path.cc), Expose, Revoke, Close and the accessors (setup.cc).
  size_t Poll() override;
  absl::Status Revoke(const RemoteRegion& r) override;
  void Close() override;
  uint64_t connection_id() const override { return id_; }
  const std::string& provider_name() const override { return fabric_->provider_name_; }
  size_t max_in_flight() const override { return fabric_->max_in_flight_; }

  // setup.cc
  absl::Status OpenQueues();                 // the CQ, and the EQ (tcp) or the AV (shm)
  absl::Status OpenProvider(fi_info* info);  // the provider endpoint, bound and enabled
  // tcp: connects the provider endpoint to the listener's passive endpoint `pep_name` (from its
  // hello), with `token` as connection data. Returns kUnavailable when it cannot.
  absl::Status ConnectProvider(const std::string& pep_name, const std::string& token);
  // tcp, the listening side: opens a passive endpoint, sends the hello that names it, and accepts
  // the provider connection that carries `token`. `*hello_sent` says whether the hello went out.
  absl::Status AcceptProvider(const std::string& token, bool* hello_sent);
  absl::Status PostDropWatch();  // tcp, once connected: see drop_watch_
  absl::StatusOr<RemoteRegion> Expose(const Registration& reg, const void* addr, size_t length,
                                      uint32_t rights, uint64_t generation) override;
  // Fails the connection with `why` (kUnavailable, kCancelled, ...): closes the provider endpoint,
  // completes every pending operation with `why`, shuts the out-of-band socket. Unless
  // `peer_gone`, first waits (bounded) for the peer to close its side, noting in peer_refused_
  // whether it said that it refused an access. On tcp, when our provider dropped the connection
  // while no operation of ours had failed, instead tells the peer so (kRefusedByte) and closes at
  // once (the provider connection is gone: the peer can post nothing more to us). Idempotent.
  void Fail(absl::Status why, bool peer_gone = false);

  // data_path.cc
  absl::Status Post(bool write, std::span<const Sge> sg, const RemoteRegion& r, uint64_t offset,
                    Completion* c) override;
  // Reaps completions, posts queued operations, checks the deadline. Returns operations completed.
  size_t Progress(int64_t now_ns);
  // Handles readable data on the out-of-band socket: wake-up bytes, or EOF (peer lost).
  // Returns true when the peer asked the fabric to stay hot.
  bool OnSocketReadable();
  size_t pending() const override { return pending_atomic_.load(std::memory_order_relaxed); }
  // Endpoint::Poll and Completion::Wait mark their caller as driving this endpoint (MarkDriven);
  // so does a Post from a caller that RecentlyPolled (MarkPosting: it posts between its polls).
  // While either mark is younger than kDriverGraceNs on the coarse clock (so up to one clock tick,
  // 4 ms), the progress thread leaves the endpoint to its caller instead of spinning on it too.
  // Only polls make a caller one whose posts mark: a caller that stops polling and goes on
  // posting (callbacks only) stops marking within two ticks, and is taken over as one that stops
  // polling is (DriverRecheckNs).
  void MarkDriven(int64_t now_ns) { driven_ns_.store(now_ns, std::memory_order_relaxed); }
  void MarkPosting(int64_t now_ns) { posting_ns_.store(now_ns, std::memory_order_relaxed); }
  // Completion::Wait, going to sleep: the progress thread takes the endpoint back at once.
  void ReleaseDriven() {
    driven_ns_.store(INT64_MIN / 2, std::memory_order_relaxed);
    posting_ns_.store(INT64_MIN / 2, std::memory_order_relaxed);
  }
  bool Driven(int64_t now_ns) const { return now_ns - LastMark() < kDriverGraceNs; }
  static constexpr int64_t kDriverGraceNs = 200'000;
  // Polled in this coarse tick or the one before. A post from such a caller marks the endpoint
  // and does not wake the progress thread from a short sleep: its poster most likely drives it
  // again at once (a Wait right after its posts finds a mark one tick old at every tick
  // boundary), and the progress thread, which sleeps short while any endpoint is recently
  // driven, looks within a tick anyway.
  bool RecentlyPolled(int64_t now_ns) const {
    return now_ns - driven_ns_.load(std::memory_order_relaxed) <
           fabric_->driver_recheck_ns_ + kDriverGraceNs;
  }
  // Either mark in this coarse tick or the one before (ProgressLoop: sleep short, and look again).
  bool RecentlyDriven(int64_t now_ns) const {
    return now_ns - LastMark() < fabric_->driver_recheck_ns_ + kDriverGraceNs;
  }

  // The CPU the last Post ran on, or -1 before the first. A progress thread on that CPU that
  // spins on this endpoint's operations without reaping any takes the CPU from the poster, which
  // is most likely still posting there (ProgressLoop).
  int post_cpu() const { return post_cpu_.load(std::memory_order_relaxed); }

  FabricCore* const fabric_;
  uint64_t id_;  // set once, before the endpoint is published
  int sock_ = -1;  // out-of-band socket (non-blocking after the handshake)
  fid_ep* ep_ = nullptr;
  fid_cq* cq_ = nullptr;
  fid_av* av_ = nullptr;             // shm
  fid_eq* eq_ = nullptr;             // tcp: connection events
  fi_addr_t peer_ = FI_ADDR_UNSPEC;  // shm; tcp endpoints are connected
  // The peer said that its provider refused one of our accesses (kRefusedByte).
  std::atomic<bool> peer_refused_{false};
  // tcp: a one-word receive stays posted on the provider endpoint, with its own address as
  // context, for the life of the connection. Nothing is ever sent to it (the data path is RMA
  // only); the provider completes it in error when it drops the connection, which is how this
  // side learns, in the completion queue it polls anyway, that its provider refused the peer's
  // access. A peer that sends it a message is a protocol error.
  uint64_t drop_watch_ = 0;
  std::string local_name_;  // fi_getname
  std::atomic<bool> open_{false};
  // This endpoint, weakly (for Completion::Wait): set once, by NewEndpoint, which owns it.
  std::weak_ptr<EndpointCore> self_;
  std::unique_ptr<LivenessWatch> peer_alive_;  // shm: the peer fabric's beacon, when it has one

 private:
  friend class sanreg::Completion;
  friend void FinishOperation(Completion* c, absl::Status s);
  enum class State { kOpen, kFailing, kClosed };
  // Hands `c` to the provider. Returns 0, -FI_EAGAIN, or another negative fi error.
  ssize_t PostOne(Completion* c) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Posts queued operations while there is room. Returns false, posting nothing, when PeerGone().
  // Stops at the first post that fails; stores its error in *post_error unless it is -FI_EAGAIN.
  bool PostQueued(ssize_t* post_error) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // True when the out-of-band socket says the peer closed or died (hang-up, error, or its FIN
  // read). One poll(2), no blocking. Quirk (libfabric 1.17, shm): a post to a peer that died while
  // holding its region's spinlock spins forever inside fi_writemsg/fi_readmsg, so on shm every
  // post first asks this; a dead process's sockets are closed (FIN sent) before waitpid returns.
  bool PeerGone() const;
  void MaybeWakePeer(int64_t now_ns) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static void Finish(Completion* c, absl::Status s);

  PollLock cq_mu_;         // see poll_lock.h
  mutable std::mutex mu_;  // acquired after cq_mu_ when both are held
  std::condition_variable closed_cv_;  // state_ became kClosed (with mu_)
  State state_ ABSL_GUARDED_BY(mu_) = State::kOpen;
  absl::Status health_ ABSL_GUARDED_BY(mu_);
  bool op_failed_ ABSL_GUARDED_BY(mu_) = false;  // the provider completed an operation in error
  bool provider_dropped_ ABSL_GUARDED_BY(mu_) = false;  // tcp: drop_watch_ completed in error
  Completion* posted_head_ ABSL_GUARDED_BY(mu_) = nullptr;
  Completion* posted_tail_ ABSL_GUARDED_BY(mu_) = nullptr;
  Completion* queued_head_ ABSL_GUARDED_BY(mu_) = nullptr;
  Completion* queued_tail_ ABSL_GUARDED_BY(mu_) = nullptr;
  size_t posted_count_ ABSL_GUARDED_BY(mu_) = 0;
  size_t queued_count_ ABSL_GUARDED_BY(mu_) = 0;
  std::atomic<size_t> pending_atomic_{0};  // posted_count_ + queued_count_
  std::atomic<bool> has_queued_{false};    // queued_count_ > 0
  // The coarse time of the last pass that found nothing completed and did the periodic work
  // (deadline check, wake-up of the peer); a pass in the same tick with nothing queued skips it.
  int64_t idle_checked_ns_ ABSL_GUARDED_BY(cq_mu_) = INT64_MIN;
  int64_t last_wake_sent_ns_ ABSL_GUARDED_BY(mu_) = 0;
  // The last MarkDriven (Poll, Wait) and MarkPosting (Post), on the coarse clock.
  std::atomic<int64_t> driven_ns_{INT64_MIN / 2};
  std::atomic<int64_t> posting_ns_{INT64_MIN / 2};
  int64_t LastMark() const {
    return std::max(driven_ns_.load(std::memory_order_relaxed),
                    posting_ns_.load(std::memory_order_relaxed));
  }
  std::atomic<int> post_cpu_{-1};  // the CPU of the last Post (see post_cpu)

 public:
  absl::Status health() const override {
    std::lock_guard<std::mutex> l(mu_);
    return health_;
  }
  bool connected() const override {
    std::lock_guard<std::mutex> l(mu_);
    return state_ == State::kOpen;
  }
};

class ListenerCore final : public ListenerBackend {
 public:
  ~ListenerCore() override;
  absl::StatusOr<std::unique_ptr<Endpoint>> Accept() override;
  void Close() override;
  std::string address() const override;
  uint16_t port() const override;

  FabricCore* fabric_ = nullptr;
  int fd_ = -1;
  sockaddr_in addr_ = {};
  std::atomic<bool> closed_{false};
};

// The wake-up byte an initiator sends on the out-of-band socket so that a passive target's
// progress thread polls hot while operations arrive (the providers' data progress is manual).
inline constexpr char kWakeByte = 'W';
// The byte a tcp endpoint sends on the out-of-band socket, before it closes, when its provider
// dropped the connection while none of its own operations had failed: what the native tcp
// provider does when it refuses a peer's access (key, bounds, rights). The initiator's provider
// then only sees the connection end, and completes the refused operation as it would for a lost
// peer (FI_ECANCELED, with whatever errno was last set); this byte tells the two apart.
inline constexpr char kRefusedByte = 'R';
// How long a wake-up keeps the target hot, and how often an initiator repeats it while busy; also
// how long a progress thread stays hot after its last operation.
inline constexpr int64_t kHotWindowNs = 20'000'000;
inline constexpr int64_t kWakeRepeatNs = 5'000'000;

}  // namespace sanreg::internal

#endif  // SANREG_DATAPATH_LIBFABRIC_CORE_H_
