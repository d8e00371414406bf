// setup.cc: opening and closing the verbs backend: device selection, the protection domain,
// rdmacm connection setup, exposing and revoking regions, failing a connection. The hot path is in
// data_path.cc.

#include <arpa/inet.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "datapath/internal/socket.h"
#include "datapath/verbs/verbs_backend.h"

namespace sanreg::internal {
namespace {

constexpr absl::Duration kSetupTimeout = absl::Seconds(10);
constexpr int kResolveTimeoutMs = 5000;
constexpr uint32_t kConnMagic = 0x31565253;  // "SRV1"

// The private data of a connection request, accept or reject.
struct ConnData {
  uint32_t magic;
  uint16_t version;  // RemoteRegion::kWireVersion of the sender
  uint16_t reserved;
  uint64_t connection_id;  // the accept's; 0 otherwise
};
static_assert(sizeof(ConnData) == 16);

// One rdmacm event, copied out and acked.
struct CmEvent {
  rdma_cm_event_type type;
  int status;
  rdma_cm_id* id;
  std::string data;
};

// Makes a channel's fd non-blocking, so that rdma_get_cm_event answers EAGAIN when empty.
absl::Status SetNonBlocking(rdma_event_channel* ch) {
  const int flags = fcntl(ch->fd, F_GETFL);
  if (flags < 0 || fcntl(ch->fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    return VerbsError("fcntl(event channel)", errno);
  }
  return absl::OkStatus();
}

// Waits for the next event on `ch` until `deadline`, or until `wake_fd` (when >= 0) is readable:
// then kCancelled.
absl::StatusOr<CmEvent> NextEvent(const VerbsApi* api, rdma_event_channel* ch, absl::Time deadline,
                                  int wake_fd = -1) {
  for (;;) {
    rdma_cm_event* e = nullptr;
    if (api->get_cm_event(ch, &e) == 0) {
      CmEvent out{e->event, e->status, e->id, {}};
      if (e->param.conn.private_data != nullptr) {
        out.data.assign(static_cast<const char*>(e->param.conn.private_data),
                        e->param.conn.private_data_len);
      }
      api->ack_cm_event(e);
      return out;
    }
    if (errno != EAGAIN && errno != EINTR) return VerbsError("rdma_get_cm_event", errno);
    const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (ms <= 0) return absl::UnavailableError("connection setup timed out");
    pollfd p[2] = {{ch->fd, POLLIN, 0}, {wake_fd, POLLIN, 0}};
    int n = poll(p, wake_fd >= 0 ? 2 : 1, static_cast<int>(std::min<int64_t>(ms, 1000)));
    if (n > 0 && wake_fd >= 0 && p[1].revents != 0) return absl::CancelledError("listener closed");
  }
}

// Waits for an event of type `want`; another one is kUnavailable naming it.
absl::Status Expect(const VerbsApi* api, rdma_event_channel* ch, rdma_cm_event_type want,
                    const char* step) {
  absl::StatusOr<CmEvent> e = NextEvent(api, ch, absl::Now() + kSetupTimeout);
  if (!e.ok()) return e.status();
  if (e->type != want) {
    return absl::UnavailableError(absl::StrCat(step, ": rdmacm event ", e->type, " (status ",
                                               e->status, ")"));
  }
  return absl::OkStatus();
}

ConnData MakeConnData(uint64_t connection_id) {
  return ConnData{kConnMagic, RemoteRegion::kWireVersion, 0, connection_id};
}

// Parses a peer's private data. Returns kFailedPrecondition for another descriptor version.
absl::StatusOr<ConnData> ParseConnData(const std::string& data) {
  ConnData d;
  // rdmacm may pad private data with zeros up to the transport's size.
  if (data.size() < sizeof d) return absl::UnavailableError("peer sent no sanreg private data");
  memcpy(&d, data.data(), sizeof d);
  if (d.magic != kConnMagic) return absl::UnavailableError("peer is not sanreg (bad magic)");
  if (d.version != RemoteRegion::kWireVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("peer uses descriptor format version ", d.version, ", this side ",
                     RemoteRegion::kWireVersion));
  }
  return d;
}

// Deregisters, destroys and frees what a half-made connection holds.
void DestroyId(const VerbsApi* api, rdma_cm_id* id, rdma_event_channel* ch) {
  if (id != nullptr) {
    if (id->qp != nullptr) api->destroy_qp(id);
    api->destroy_id(id);
  }
  if (ch != nullptr) api->destroy_event_channel(ch);
}

}  // namespace

absl::StatusOr<std::unique_ptr<FabricBackend>> OpenVerbs(const FabricOptions& options) {
  auto f = std::make_unique<VerbsFabric>();
  absl::Status s = f->Open(options);
  if (!s.ok()) return s;
  s = f->StartProgress();
  if (!s.ok()) return s;
  return std::unique_ptr<FabricBackend>(std::move(f));
}

absl::Status VerbsFabric::Open(const FabricOptions& options) {
  options_ = options;
  api_ = options.verbs_api != nullptr ? options.verbs_api : RdmaCoreApi();
  if (options_.max_in_flight == 0) return absl::InvalidArgumentError("max_in_flight must be positive");
  const std::string want =
      options_.provider.size() > 6 ? options_.provider.substr(6) : std::string();  // "verbs:"
  int n = 0;
  devices_ = api_->get_devices(&n);
  if (devices_ == nullptr || n <= 0) return absl::UnavailableError("no RDMA device found");
  for (int i = 0; i < n && ctx_ == nullptr; ++i) {
    ibv_context* c = devices_[i];
    const std::string name = api_->get_device_name(c->device);
    if (!want.empty() && name != want) continue;
    ibv_device_attr attr = {};
    if (api_->query_device(c, &attr) != 0) continue;
    bool active = false;
    for (uint8_t port = 1; port <= attr.phys_port_cnt && !active; ++port) {
      ibv_port_attr pa = {};
      active = api_->query_port(c, port, &pa) == 0 && pa.state == IBV_PORT_ACTIVE;
    }
    if (!active) {
      if (!want.empty()) {
        return absl::UnavailableError(absl::StrCat("RDMA device ", want, " has no active port"));
      }
      continue;
    }
    ctx_ = c;
    device_name_ = name;
    memory_windows_ =
        (attr.device_cap_flags & (IBV_DEVICE_MEM_WINDOW_TYPE_2A | IBV_DEVICE_MEM_WINDOW_TYPE_2B)) != 0;
    max_sge_ = static_cast<uint32_t>(
        std::max(1, std::min<int>(attr.max_sge, static_cast<int>(Completion::kMaxSge))));
    const size_t depth = attr.max_qp_wr > static_cast<int>(kControlSlots) + 1
                             ? static_cast<size_t>(attr.max_qp_wr) - kControlSlots - 1
                             : 1;
    max_in_flight_ = std::min(options_.max_in_flight, depth);
    responder_resources_ = static_cast<uint8_t>(std::clamp(attr.max_qp_rd_atom, 1, 16));
    initiator_depth_ = static_cast<uint8_t>(std::clamp(attr.max_qp_init_rd_atom, 1, 16));
  }
  if (ctx_ == nullptr) {
    if (!want.empty()) return absl::NotFoundError(absl::StrCat("RDMA device ", want, " not found"));
    return absl::UnavailableError("no RDMA device found with an active port");
  }
  provider_name_ = absl::StrCat("verbs:", device_name_);
  pd_ = api_->alloc_pd(ctx_);
  if (pd_ == nullptr) return VerbsError("ibv_alloc_pd", errno);
  wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake_fd_ < 0) return VerbsError("eventfd", errno);
  return absl::OkStatus();
}

VerbsFabric::~VerbsFabric() {
  if (progress_.joinable()) {
    stop_.store(true);
    sleeping_.store(true);
    Wake();
    progress_.join();
  }
  endpoints_.Clear();
  if (pd_ != nullptr) api_->dealloc_pd(pd_);
  if (devices_ != nullptr) api_->free_devices(devices_);
  if (wake_fd_ >= 0) close(wake_fd_);
}

absl::Status VerbsFabric::StartProgress() {
  progress_ = std::thread([this] { ProgressLoop(); });
  return ConfigureProgressThread(progress_, options_.progress_cpu);  // the destructor stops it
}

std::unique_ptr<Registrar> VerbsFabric::NewRegistrar(Registrar* pinner) {
  return std::make_unique<VerbsRegistrar>(api_, pd_, memory_windows_, pinner);
}

void VerbsFabric::AddEndpoint(std::shared_ptr<VerbsEndpoint> ep) {
  endpoints_.Add(std::move(ep));
  Wake();
}

absl::StatusOr<std::shared_ptr<VerbsEndpoint>> VerbsFabric::NewEndpoint(
    rdma_cm_id* id, rdma_event_channel* channel) {
  if (id->verbs != ctx_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the address resolves to RDMA device ",
        id->verbs != nullptr ? api_->get_device_name(id->verbs->device) : "(none)",
        ", this fabric runs ", device_name_));
  }
  absl::Status s = SetNonBlocking(channel);
  if (!s.ok()) return s;
  const int depth = static_cast<int>(max_in_flight_ + kControlSlots + 1);
  ibv_cq* cq = api_->create_cq(ctx_, depth, nullptr, nullptr, 0);
  if (cq == nullptr) return VerbsError("ibv_create_cq", errno);
  ibv_qp_init_attr attr = {};
  attr.send_cq = cq;
  attr.recv_cq = cq;
  attr.qp_type = IBV_QPT_RC;
  attr.sq_sig_all = 0;  // selective signalling
  attr.cap.max_send_wr = static_cast<uint32_t>(depth);
  attr.cap.max_recv_wr = 1;
  attr.cap.max_send_sge = max_sge_;
  attr.cap.max_recv_sge = 1;
  attr.cap.max_inline_data = kWantInline;
  if (api_->create_qp(id, pd_, &attr) != 0) {
    // Some devices offer no inline data: ask again without.
    attr.cap.max_inline_data = 0;
    if (api_->create_qp(id, pd_, &attr) != 0) {
      const int err = errno;
      api_->destroy_cq(cq);
      return VerbsError("rdma_create_qp", err);
    }
  }
  // From here the endpoint owns the id, the channel, the QP and the CQ.
  auto ep = std::make_shared<VerbsEndpoint>(this, id, channel);
  ep->cq_ = cq;
  ep->max_inline_ = attr.cap.max_inline_data;
  return ep;
}

absl::StatusOr<std::unique_ptr<Listener>> VerbsFabric::Listen(absl::string_view host_port) {
  absl::StatusOr<sockaddr_in> addr = ParseHostPort(host_port);
  if (!addr.ok()) return addr.status();
  auto l = std::make_unique<VerbsListener>();
  l->fabric_ = this;
  l->channel_ = api_->create_event_channel();
  if (l->channel_ == nullptr) return VerbsError("rdma_create_event_channel", errno);
  absl::Status s = SetNonBlocking(l->channel_);
  if (s.ok()) s = CallStatus("rdma_create_id", api_->create_id(l->channel_, &l->id_, nullptr,
                                                              RDMA_PS_TCP));
  if (s.ok()) {
    s = CallStatus("rdma_bind_addr", api_->bind_addr(l->id_, reinterpret_cast<sockaddr*>(&*addr)));
  }
  if (s.ok()) s = CallStatus("rdma_listen", api_->listen(l->id_, 64));
  if (s.ok()) {
    l->wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (l->wake_fd_ < 0) s = VerbsError("eventfd", errno);
  }
  if (!s.ok()) {
    if (s.code() == absl::StatusCode::kInvalidArgument) return s;
    return absl::UnavailableError(s.message());
  }
  return WrapListener(std::move(l));
}

absl::StatusOr<std::unique_ptr<Endpoint>> VerbsFabric::Connect(absl::string_view host_port) {
  absl::StatusOr<sockaddr_in> addr = ParseHostPort(host_port);
  if (!addr.ok()) return addr.status();
  rdma_event_channel* ch = api_->create_event_channel();
  if (ch == nullptr) return VerbsError("rdma_create_event_channel", errno);
  rdma_cm_id* id = nullptr;
  absl::Status s = SetNonBlocking(ch);
  if (s.ok()) s = CallStatus("rdma_create_id", api_->create_id(ch, &id, nullptr, RDMA_PS_TCP));
  if (s.ok()) {
    s = CallStatus("rdma_resolve_addr",
                   api_->resolve_addr(id, nullptr, reinterpret_cast<sockaddr*>(&*addr),
                                      kResolveTimeoutMs));
  }
  if (s.ok()) s = Expect(api_, ch, RDMA_CM_EVENT_ADDR_RESOLVED, "address resolution");
  if (s.ok()) s = CallStatus("rdma_resolve_route", api_->resolve_route(id, kResolveTimeoutMs));
  if (s.ok()) s = Expect(api_, ch, RDMA_CM_EVENT_ROUTE_RESOLVED, "route resolution");
  if (!s.ok()) {
    DestroyId(api_, id, ch);
    return s;
  }
  absl::StatusOr<std::shared_ptr<VerbsEndpoint>> ep = NewEndpoint(id, ch);
  if (!ep.ok()) {
    DestroyId(api_, id, ch);
    return ep.status();
  }
  ConnData mine = MakeConnData(0);
  rdma_conn_param param = {};
  param.private_data = &mine;
  param.private_data_len = sizeof mine;
  param.responder_resources = responder_resources_;
  param.initiator_depth = initiator_depth_;
  param.retry_count = 7;
  param.rnr_retry_count = 7;
  s = CallStatus("rdma_connect", api_->connect(id, &param));
  absl::StatusOr<CmEvent> e;
  if (s.ok()) {
    e = NextEvent(api_, ch, absl::Now() + kSetupTimeout);
    s = e.status();
  }
  if (s.ok() && e->type == RDMA_CM_EVENT_REJECTED) {
    // A listener that refuses our descriptor version says which one it speaks.
    absl::StatusOr<ConnData> theirs = ParseConnData(e->data);
    s = !theirs.ok() && theirs.status().code() == absl::StatusCode::kFailedPrecondition
            ? theirs.status()
            : absl::UnavailableError(absl::StrCat("connection rejected (status ", e->status, ")"));
  } else if (s.ok() && e->type != RDMA_CM_EVENT_ESTABLISHED) {
    s = absl::UnavailableError(absl::StrCat("connect: rdmacm event ", e->type));
  }
  absl::StatusOr<ConnData> theirs;
  if (s.ok()) {
    theirs = ParseConnData(e->data);
    s = theirs.status();
  }
  if (!s.ok()) return s;  // ~VerbsEndpoint frees the QP, CQ, id and channel
  (*ep)->connection_id_ = theirs->connection_id;
  (*ep)->open_.store(true);
  AddEndpoint(*ep);
  return WrapEndpoint(*std::move(ep));
}

absl::StatusOr<std::unique_ptr<Endpoint>> VerbsListener::Accept() {
  const VerbsApi* api = fabric_->api_;
  for (;;) {
    if (closed_.load()) return absl::CancelledError("listener closed");
    absl::StatusOr<CmEvent> e =
        NextEvent(api, channel_, absl::InfiniteFuture(), wake_fd_);
    if (!e.ok()) {
      if (closed_.load()) return absl::CancelledError("listener closed");
      return e.status();
    }
    if (e->type != RDMA_CM_EVENT_CONNECT_REQUEST) continue;
    rdma_cm_id* id = e->id;
    absl::StatusOr<ConnData> theirs = ParseConnData(e->data);
    if (!theirs.ok()) {
      ConnData mine = MakeConnData(0);
      api->reject(id, &mine, sizeof mine);
      api->destroy_id(id);
      return theirs.status();
    }
    rdma_event_channel* ch = api->create_event_channel();
    absl::Status s = ch != nullptr ? absl::OkStatus()
                                   : VerbsError("rdma_create_event_channel", errno);
    if (s.ok()) s = CallStatus("rdma_migrate_id", api->migrate_id(id, ch));
    absl::StatusOr<std::shared_ptr<VerbsEndpoint>> ep =
        s.ok() ? fabric_->NewEndpoint(id, ch) : s;
    if (!ep.ok()) {
      api->reject(id, nullptr, 0);
      DestroyId(api, id, ch);
      return ep.status();
    }
    const uint64_t connection_id = RandomU64();
    ConnData mine = MakeConnData(connection_id);
    rdma_conn_param param = {};
    param.private_data = &mine;
    param.private_data_len = sizeof mine;
    param.responder_resources = fabric_->responder_resources_;
    param.initiator_depth = fabric_->initiator_depth_;
    param.rnr_retry_count = 7;
    s = CallStatus("rdma_accept", api->accept(id, &param));
    if (s.ok()) s = Expect(api, ch, RDMA_CM_EVENT_ESTABLISHED, "accept");
    if (!s.ok()) return absl::UnavailableError(s.message());
    (*ep)->connection_id_ = connection_id;
    (*ep)->open_.store(true);
    fabric_->AddEndpoint(*ep);
    return WrapEndpoint(*std::move(ep));
  }
}

std::string VerbsListener::address() const {
  sockaddr_in a;
  memcpy(&a, &id_->route.addr.src_addr, sizeof a);
  return FormatHostPort(a);
}

uint16_t VerbsListener::port() const {
  sockaddr_in a;
  memcpy(&a, &id_->route.addr.src_addr, sizeof a);
  return ntohs(a.sin_port);
}

void VerbsListener::Close() {
  if (closed_.exchange(true)) return;
  uint64_t one = 1;
  [[maybe_unused]] ssize_t w = write(wake_fd_, &one, sizeof one);
}

VerbsListener::~VerbsListener() {
  Close();
  const VerbsApi* api = fabric_->api_;
  if (id_ != nullptr) api->destroy_id(id_);
  if (channel_ != nullptr) api->destroy_event_channel(channel_);
  if (wake_fd_ >= 0) close(wake_fd_);
}

VerbsEndpoint::~VerbsEndpoint() {
  Fail(absl::CancelledError("endpoint closed"));
  if (id_->qp != nullptr) api_->destroy_qp(id_);
  api_->destroy_id(id_);
  if (cq_ != nullptr) api_->destroy_cq(cq_);
  api_->destroy_event_channel(channel_);
}

void VerbsEndpoint::Close() { Fail(absl::CancelledError("endpoint closed")); }

void VerbsEndpoint::Fail(absl::Status why) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (state_ != State::kOpen) return;
    state_ = State::kFailing;
    health_ = why;
  }
  open_.store(false, std::memory_order_release);
  Completion* chain = nullptr;
  std::map<uint32_t, Exposure> exposures;
  {
    std::lock_guard<PollLock> cl(cq_mu_);
    // The QP goes to error: what it still holds completes in flush errors (reaped below, so that
    // requests that completed before it finish OK); once destroyed it touches no buffer of ours.
    api_->disconnect(id_);
    Completion** tail = &chain;
    ibv_wc wc[32];
    int n;
    while (cq_ != nullptr && (n = api_->poll_cq(cq_, 32, wc)) > 0) {
      std::lock_guard<std::mutex> l(mu_);
      absl::Status ignored;
      for (int i = 0; i < n; ++i) Consume(wc[i], &tail, &ignored);
    }
    if (id_->qp != nullptr) api_->destroy_qp(id_);
    std::lock_guard<std::mutex> l(mu_);
    state_ = State::kClosed;
    for (Completion* c = posted_head_; c != nullptr; c = c->next_) {
      c->status_ = why;
      *tail = c;
      tail = &c->next_;
    }
    for (Completion* c = queued_head_; c != nullptr; c = c->next_) {
      c->status_ = why;
      *tail = c;
      tail = &c->next_;
    }
    *tail = nullptr;
    posted_head_ = posted_tail_ = queued_head_ = queued_tail_ = nullptr;
    posted_count_ = queued_count_ = 0;
    fence_through_ = nullptr;
    pending_atomic_.store(0, std::memory_order_relaxed);
    exposures.swap(exposures_);
  }
  fabric_->RemoveEndpoint(this);
  // Completed first: a Revoke waiting for its invalidation holds the region's mu until it returns.
  FinishChain(chain);
  // The connection's descriptors die with it: its windows (bound on the destroyed QP) go back to
  // the device, and the regions' records are released.
  for (auto& [rkey, x] : exposures) {
    if (x.mw != nullptr) {
      std::lock_guard<std::mutex> rl(x.rec->mu);
      absl::Status ignored;  // nothing to tell: the connection is gone either way
      x.rec->DropWindow(api_, x.mw, &ignored);
    }
    VerbsMr::Unref(x.rec);
  }
}

absl::StatusOr<RemoteRegion> VerbsEndpoint::Expose(const Registration& reg, const void* addr,
                                                   size_t length, uint32_t rights,
                                                   uint64_t generation) {
  const uint32_t kRemote = kAccessRemoteRead | kAccessRemoteWrite;
  const uintptr_t a = reinterpret_cast<uintptr_t>(addr);
  if (length == 0 || a < reg.addr || a + length < a || a + length > reg.addr + reg.length) {
    return absl::InvalidArgumentError("exposed range empty or not inside the registration");
  }
  if (rights == 0 || (rights & ~kRemote) != 0) {
    return absl::InvalidArgumentError("rights must be kAccessRemoteRead and/or kAccessRemoteWrite");
  }
  if (!AccessCovers(reg.access, rights) || reg.remote_key == 0) {
    return absl::PermissionDeniedError("registration lacks the remote rights asked for");
  }
  auto* rec = reinterpret_cast<VerbsMr*>(reg.handle);
  if (rec == nullptr) return absl::InvalidArgumentError("not a verbs registration");
  if (!connected()) return health();
  RemoteRegion r;
  r.addr = a;
  r.length = length;
  r.rights = rights;
  r.connection = connection_id_;
  r.generation = generation;
  if (!fabric_->memory_windows_) {
    std::lock_guard<std::mutex> rl(rec->mu);
    if (rec->mr == nullptr) return absl::FailedPreconditionError("registration is gone");
    r.key = rec->mr->rkey;
    std::lock_guard<std::mutex> l(mu_);
    if (state_ != State::kOpen) return health_;
    Exposure& x = exposures_[rec->mr->rkey];
    if (x.rec != rec) {  // new, or the key of a record since deregistered (keys are reused)
      VerbsMr::Ref(rec);
      if (x.rec != nullptr) VerbsMr::Unref(x.rec);
      x = Exposure{nullptr, rec};
    }
    return r;
  }
  ibv_mw* mw = api_->alloc_mw(fabric_->pd_, IBV_MW_TYPE_2);
  if (mw == nullptr) return VerbsError("ibv_alloc_mw", errno);
  // A fresh key for the bind: the window's index (bits 8-31) with the next 8-bit key
  // (ibv_inc_rkey).
  const uint32_t rkey = (mw->rkey & 0xffffff00u) | ((mw->rkey + 1) & 0xffu);
  ibv_send_wr wr = {};
  wr.opcode = IBV_WR_BIND_MW;
  wr.send_flags = IBV_SEND_SIGNALED;
  wr.bind_mw.mw = mw;
  wr.bind_mw.rkey = rkey;
  {
    std::lock_guard<std::mutex> rl(rec->mu);
    if (rec->mr == nullptr) {
      api_->dealloc_mw(mw);
      return absl::FailedPreconditionError("registration is gone");
    }
    wr.bind_mw.bind_info.mr = rec->mr;
  }
  wr.bind_mw.bind_info.addr = a;
  wr.bind_mw.bind_info.length = length;
  wr.bind_mw.bind_info.mw_access_flags =
      ((rights & kAccessRemoteRead) ? IBV_ACCESS_REMOTE_READ : 0) |
      ((rights & kAccessRemoteWrite) ? IBV_ACCESS_REMOTE_WRITE : 0);
  Completion c;
  absl::Status s = RunControl(&wr, &c);
  if (!s.ok()) {
    api_->dealloc_mw(mw);
    return s;
  }
  {
    std::lock_guard<std::mutex> rl(rec->mu);
    if (rec->mr == nullptr) {  // deregistered meanwhile
      api_->dealloc_mw(mw);
      return absl::FailedPreconditionError("registration is gone");
    }
    std::lock_guard<std::mutex> l(mu_);
    if (state_ != State::kOpen) {  // Fail has already released this connection's windows
      api_->dealloc_mw(mw);
      return health_;
    }
    rec->windows.push_back(mw);
    VerbsMr::Ref(rec);
    exposures_[rkey] = Exposure{mw, rec};
  }
  r.key = rkey;
  return r;
}

absl::Status VerbsEndpoint::Revoke(const RemoteRegion& r) {
  Exposure x;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = r.connection == connection_id_ ? exposures_.find(static_cast<uint32_t>(r.key))
                                             : exposures_.end();
    if (it == exposures_.end()) {
      return absl::NotFoundError("descriptor not exposed on this connection, or revoked");
    }
    x = it->second;
    exposures_.erase(it);
  }
  absl::Status s;
  if (x.mw == nullptr) {
    // No windows: new keys for the whole registration (kFailedPrecondition once deregistered).
    s = VerbsRegistrar::Reregister(api_, fabric_->pd_, x.rec);
    if (s.code() == absl::StatusCode::kFailedPrecondition) {
      s = absl::NotFoundError("descriptor already revoked: its registration was deregistered");
    }
  } else {
    // rec->mu is held throughout, so that Deregister cannot deallocate the window between the
    // check and the invalidation (invalidating an rkey the device no longer knows is an error
    // completion, which would fail the connection).
    std::lock_guard<std::mutex> rl(x.rec->mu);
    if (!x.rec->HasWindow(x.mw)) {
      s = absl::NotFoundError("descriptor already revoked: its registration was deregistered");
    } else {
      ibv_send_wr wr = {};
      wr.opcode = IBV_WR_LOCAL_INV;
      wr.send_flags = IBV_SEND_SIGNALED;
      wr.invalidate_rkey = static_cast<uint32_t>(r.key);
      Completion c;
      s = RunControl(&wr, &c);
      // Invalidated, or the QP is gone (a type 2 window answers only on its QP): either way no
      // access reaches it. Deallocating it invalidates it too.
      if (s.code() == absl::StatusCode::kUnavailable || s.code() == absl::StatusCode::kCancelled) {
        s = absl::OkStatus();
      }
      x.rec->DropWindow(api_, x.mw, &s);
    }
  }
  VerbsMr::Unref(x.rec);
  return s;
}

}  // namespace sanreg::internal
