// setup.cc: opening and closing the libfabric backend: provider selection, the domain, endpoints,
// the out-of-band address exchange, exposing regions, and failing a connection. The hot path is in
// data_path.cc.

#include <arpa/inet.h>
#include <netinet/tcp.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>
#include <poll.h>
#include <dirent.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cinttypes>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/match.h"
#include "absl/synchronization/notification.h"
#include "absl/strings/str_cat.h"
#include "datapath/endpoint.h"
#include "datapath/fabric.h"
#include "datapath/internal/socket.h"
#include "datapath/libfabric/core.h"
#include "datapath/libfabric/liveness.h"

namespace sanreg {
namespace internal {
namespace {

constexpr absl::Duration kHandshakeTimeout = absl::Seconds(10);
constexpr uint32_t kHelloMagic = 0x31485253;  // "SRH1"
constexpr uint16_t kHelloVersion = 1;
constexpr size_t kMaxName = 512;
// tcp (FI_EP_MSG): the connecting side sends this many random bytes in its hello and again as the
// data of its provider connection request; the listener accepts on its passive endpoint only the
// request that carries them, so no third party can take the connection by racing to that port.
constexpr size_t kTokenSize = 16;
// How long a closing endpoint waits for its peer to close first.
constexpr absl::Duration kCloseLinger = absl::Seconds(2);

// Environment overrides of FabricOptions, all in one table (STYLE.md rule 11).
struct EnvOverride {
  const char* name;
  bool (*apply)(FabricOptions& o, const char* value);
};
constexpr EnvOverride kEnvOverrides[] = {
    {"SANREG_PROVIDER",
     [](FabricOptions& o, const char* v) {
       o.provider = v;
       return true;
     }},
    {"SANREG_MAX_IN_FLIGHT",
     [](FabricOptions& o, const char* v) { return absl::SimpleAtoi(v, &o.max_in_flight); }},
    {"SANREG_OP_TIMEOUT_MS",
     [](FabricOptions& o, const char* v) {
       int64_t ms = 0;
       if (!absl::SimpleAtoi(v, &ms)) return false;
       o.op_timeout = absl::Milliseconds(ms);
       return true;
     }},
    {"SANREG_IDLE_POLL_US",
     [](FabricOptions& o, const char* v) {
       int64_t us = 0;
       if (!absl::SimpleAtoi(v, &us)) return false;
       o.idle_poll = absl::Microseconds(us);
       return true;
     }},
    {"SANREG_PROGRESS_CPU",
     [](FabricOptions& o, const char* v) { return absl::SimpleAtoi(v, &o.progress_cpu); }},
};

// The hello each side sends on the out-of-band socket: who it is and where its provider endpoint
// listens. Fixed header, then the provider name, then the provider address (shm: the endpoint's
// name; tcp: the connecting side sends its token, the listener the address of the passive endpoint
// that waits for the provider connection). A listener that
// cannot take the connection answers with a refusal instead: `refusal` holds the absl::StatusCode
// and the name field the reason, so the connecting side reports the real cause.
struct HelloHeader {
  uint32_t magic;
  uint16_t version;
  uint16_t provider_len;
  uint16_t name_len;
  uint16_t refusal;  // 0: accepted
  uint32_t reserved;
  uint64_t connection_id;
};
static_assert(sizeof(HelloHeader) == 24);

absl::Status SendHello(int fd, const std::string& provider, const std::string& name,
                       uint64_t connection_id, uint16_t refusal = 0) {
  HelloHeader h = {kHelloMagic, kHelloVersion, static_cast<uint16_t>(provider.size()),
                   static_cast<uint16_t>(name.size()), refusal, 0, connection_id};
  std::string buf(reinterpret_cast<const char*>(&h), sizeof h);
  buf += provider;
  buf += name;
  return SendAll(fd, buf.data(), buf.size(), absl::Now() + kHandshakeTimeout);
}

// Tells the connecting peer why this side cannot take its connection (best effort: the socket is
// closed right after).
void SendRefusal(int fd, const std::string& provider, const absl::Status& why) {
  std::string reason(why.message().substr(0, kMaxName));
  if (reason.empty()) reason = "refused";
  (void)SendHello(fd, provider, reason, 0, static_cast<uint16_t>(why.code()));
}

struct Hello {
  std::string provider;
  std::string name;
  uint64_t connection_id = 0;
};

absl::StatusOr<Hello> RecvHello(int fd) {
  absl::Time deadline = absl::Now() + kHandshakeTimeout;
  HelloHeader h;
  absl::Status s = RecvAll(fd, &h, sizeof h, deadline);
  if (!s.ok()) return s;
  if (h.magic != kHelloMagic || h.version != kHelloVersion || h.provider_len > 64 ||
      h.name_len == 0 || h.name_len > kMaxName) {
    return absl::UnavailableError("bad hello from peer");
  }
  Hello out;
  out.connection_id = h.connection_id;
  out.provider.resize(h.provider_len);
  out.name.resize(h.name_len);
  s = RecvAll(fd, out.provider.data(), out.provider.size(), deadline);
  if (s.ok()) s = RecvAll(fd, out.name.data(), out.name.size(), deadline);
  if (!s.ok()) return s;
  if (h.refusal != 0) {
    absl::StatusCode code = static_cast<absl::StatusCode>(h.refusal);
    // Unavailable when the code is one this side does not know, or one a caller would read as
    // its own mistake.
    if (h.refusal > static_cast<uint16_t>(absl::StatusCode::kUnauthenticated) ||
        code == absl::StatusCode::kInvalidArgument) {
      code = absl::StatusCode::kUnavailable;
    }
    return absl::Status(code, absl::StrCat("the listener refused the connection: ", out.name));
  }
  return out;
}

// shm (libfabric 1.17) names an endpoint's shared-memory region "<pid>:<uid>:<index>" in /dev/shm
// and creates it with O_EXCL. A process that dies before closing its endpoints (SIGKILL, _exit)
// leaves its regions there, 16 MiB of tmpfs each, and a later process that gets the same pid then
// fails fi_enable with EBUSY. So every shm endpoint here gets a name of its own,
// "sanreg-<pid namespace>-<pid>-<64 random bits>-<fabric>-<endpoint>", and opening a shm fabric
// removes the regions of processes of this pid namespace that are gone. The same prefix names the
// fabric's liveness beacon ("...-<fabric>-alive", liveness.h).
constexpr char kShmNamePrefix[] = "sanreg-";

// The inode of this process's pid namespace: pids are only comparable within one.
uint64_t PidNamespace() {
  struct stat st = {};
  if (stat("/proc/self/ns/pid", &st) != 0) return 0;
  return st.st_ino;
}

// "sanreg-<pid namespace>-<pid>-<random>-<fabric>": the prefix of one fabric's shm names.
std::string NewShmPrefix() {
  static const uint64_t process_salt = RandomU64();
  static std::atomic<uint64_t> fabrics{0};
  return absl::StrCat(kShmNamePrefix, PidNamespace(), "-", getpid(), "-",
                      absl::Hex(process_salt ^ static_cast<uint64_t>(getpid()), absl::kZeroPad16),
                      "-", fabrics.fetch_add(1));
}

// Removes the shm regions left by processes of this pid namespace that no longer exist.
void SweepDeadShmRegions() {
  DIR* dir = opendir("/dev/shm");
  if (dir == nullptr) return;
  const std::string ours = absl::StrCat(kShmNamePrefix, PidNamespace(), "-");
  while (dirent* e = readdir(dir)) {
    absl::string_view name = e->d_name;
    if (!absl::StartsWith(name, ours)) continue;
    absl::string_view rest = name.substr(ours.size());
    int64_t pid = 0;
    if (!absl::SimpleAtoi(rest.substr(0, rest.find('-')), &pid) || pid <= 0) continue;
    if (kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;
    shm_unlink(e->d_name);
  }
  closedir(dir);
}

fi_info* MakeHints(const std::string& provider, uint64_t mr_mode) {
  fi_info* h = fi_allocinfo();
  h->caps = FI_RMA | FI_READ | FI_WRITE | FI_REMOTE_READ | FI_REMOTE_WRITE;
  h->fabric_attr->prov_name = strdup(provider.c_str());
  h->domain_attr->threading = FI_THREAD_SAFE;
  h->domain_attr->mr_mode = static_cast<int>(mr_mode);
  if (provider == "tcp") {
    // The native tcp provider's connected endpoints: its target checks key, bounds and both remote
    // rights of each access (FI_EP_RDM on tcp is tcp;ofi_rxm, which makes every registration
    // remotely readable). Manual progress: the fabric's progress thread drives it, as on shm.
    h->ep_attr->type = FI_EP_MSG;
    h->caps |= FI_MSG | FI_RECV;  // for EndpointCore::drop_watch_
    h->addr_format = FI_SOCKADDR_IN;
    h->domain_attr->data_progress = FI_PROGRESS_MANUAL;
    h->domain_attr->control_progress = FI_PROGRESS_MANUAL;
  } else {
    h->ep_attr->type = FI_EP_RDM;
  }
  return h;
}

}  // namespace

absl::Status FiError(const char* what, int err) {
  std::string msg = absl::StrCat(what, ": ", fi_strerror(err));
  switch (err) {
    case FI_ENOMEM:
    case FI_ENOSPC:
      return absl::ResourceExhaustedError(msg);
    case FI_EINVAL:
      return absl::InvalidArgumentError(msg);
    case FI_ENODATA:
    case FI_ENOSYS:
      return absl::NotFoundError(msg);
    case FI_EACCES:
    case FI_EPERM:
      return absl::PermissionDeniedError(msg);
    default:
      return absl::UnavailableError(msg);
  }
}

int64_t NowCoarseNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

long DriverRecheckNs() {
  static const long recheck = [] {
    timespec res = {0, 0};
    long ns = clock_getres(CLOCK_MONOTONIC_COARSE, &res) == 0 && res.tv_sec == 0 ? res.tv_nsec : 0;
    return std::clamp<long>(ns, 1'000'000, 10'000'000);
  }();
  return recheck;
}

absl::Status ApplyEnvOverrides(FabricOptions* o) {
  for (const EnvOverride& e : kEnvOverrides) {
    const char* v = getenv(e.name);
    if (v != nullptr && !e.apply(*o, v)) {
      return absl::InvalidArgumentError(absl::StrCat("bad value for ", e.name, ": ", v));
    }
  }
  return absl::OkStatus();
}

absl::Status FabricCore::Open(const FabricOptions& options) {
  options_ = options;  // Fabric::Open applied the environment overrides
  std::string prov = options_.provider;
  if (prov == "auto") prov = "tcp";
  if (prov != "tcp" && prov != "shm") {
    return absl::InvalidArgumentError(absl::StrCat("unknown provider ", options_.provider));
  }
  if (options_.max_in_flight == 0 || options_.op_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("max_in_flight and op_timeout must be positive");
  }
  op_timeout_ns_ = absl::ToInt64Nanoseconds(options_.op_timeout);
  // Ask first for requested keys (so we can make them unguessable) and offset addressing; let a
  // provider that needs them have provider keys and virtual addresses. FI_MR_ENDPOINT is not
  // offered: registrations would have to be bound to every endpoint.
  const uint64_t kModes[] = {
      FI_MR_LOCAL | FI_MR_ALLOCATED,
      FI_MR_LOCAL | FI_MR_ALLOCATED | FI_MR_VIRT_ADDR | FI_MR_PROV_KEY,
  };
  int rc = -FI_ENODATA;
  for (uint64_t mode : kModes) {
    fi_info* hints = MakeHints(prov, mode);
    rc = fi_getinfo(FI_VERSION(1, 17), nullptr, nullptr, 0, hints, &info_);
    fi_freeinfo(hints);
    if (rc == 0) break;
  }
  if (rc != 0) {
    return absl::NotFoundError(absl::StrCat("provider ", prov, " with RMA on ",
                                            prov == "tcp" ? "FI_EP_MSG" : "FI_EP_RDM", ": ",
                                            fi_strerror(-rc)));
  }
  // Keep only the first match.
  fi_freeinfo(info_->next);
  info_->next = nullptr;
  provider_name_ = info_->fabric_attr->prov_name;
  is_tcp_ = prov == "tcp";
  is_shm_ = provider_name_ == "shm";
  msg_ = info_->ep_attr->type == FI_EP_MSG;
  if (is_shm_) {
    SweepDeadShmRegions();
    shm_prefix_ = NewShmPrefix();
    // Without a beacon peers fall back to polling this side's out-of-band socket.
    absl::StatusOr<std::unique_ptr<LivenessBeacon>> b =
        LivenessBeacon::Create(absl::StrCat(shm_prefix_, "-alive"));
    if (b.ok()) beacon_ = *std::move(b);
  }
  // tcp (FI_EP_MSG, libfabric 1.17) answers with no mr_mode bit whatever the hints ask: requested
  // keys and offsets into the registration, as its target checks them (ofi_mr_verify adds the
  // registration's base to the address it receives).
  virt_addr_ = (info_->domain_attr->mr_mode & FI_MR_VIRT_ADDR) != 0;
  prov_key_ = (info_->domain_attr->mr_mode & FI_MR_PROV_KEY) != 0;
  check_peer_before_post_ = is_shm_;
  iov_limit_ = std::min<size_t>(info_->tx_attr->iov_limit, Completion::kMaxSge);
  max_in_flight_ = std::min<size_t>(options_.max_in_flight, info_->tx_attr->size);
  if ((rc = fi_fabric(info_->fabric_attr, &fabric_, nullptr)) != 0) return FiError("fi_fabric", -rc);
  if ((rc = fi_domain(fabric_, info_, &domain_, nullptr)) != 0) return FiError("fi_domain", -rc);
  wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake_fd_ < 0) return absl::InternalError(absl::StrCat("eventfd: ", strerror(errno)));
  if (options_.provider == "auto") {
    // Peers on this host go over shm when it opens here; the rest over tcp (this core).
    FabricOptions local_options = options_;
    local_options.provider = "shm";
    local_options.apply_env = false;
    local_ = std::make_unique<FabricCore>();
    if (local_->Open(local_options).ok()) {
      local_->is_local_ = true;
      local_->options_.provider = "auto";
    } else {
      local_.reset();
    }
  }
  return absl::OkStatus();
}

absl::Status FabricCore::StartProgress() {
  absl::Notification holding;
  progress_ = std::thread([this, &holding] {
    // The beacon is held before any endpoint exists, by the thread that lives as long as them.
    if (beacon_ != nullptr) beacon_->Hold();
    holding.Notify();
    ProgressLoop();
    if (beacon_ != nullptr) beacon_->Release();
  });
  absl::Status pinned = ConfigureProgressThread(progress_, options_.progress_cpu);
  holding.WaitForNotification();
  if (!pinned.ok()) return pinned;  // the destructor stops the thread
  return local_ != nullptr ? local_->StartProgress() : absl::OkStatus();
}

FabricCore::~FabricCore() {
  if (progress_.joinable()) {
    stop_.store(true);
    Wake();
    progress_.join();
  }
  endpoints_.Clear();
  if (domain_ != nullptr) fi_close(&domain_->fid);
  if (fabric_ != nullptr) fi_close(&fabric_->fid);
  if (info_ != nullptr) fi_freeinfo(info_);
  if (wake_fd_ >= 0) close(wake_fd_);
}

void FabricCore::AddEndpoint(std::shared_ptr<EndpointCore> ep) {
  endpoints_.Add(std::move(ep));
  Wake();
}

absl::StatusOr<std::shared_ptr<EndpointCore>> FabricCore::NewEndpoint(int sock,
                                                                      uint64_t connection_id) {
  auto ep = std::make_shared<EndpointCore>(this, connection_id);
  ep->self_ = ep;
  ep->sock_ = sock;
  absl::Status s = ep->OpenQueues();
  if (s.ok() && is_shm_) {
    fi_info* info = fi_dupinfo(info_);
    if (info == nullptr) {
      s = absl::ResourceExhaustedError("fi_dupinfo");
    } else {
      std::string name = absl::StrCat(shm_prefix_, "-", shm_endpoints_.fetch_add(1));
      free(info->src_addr);
      info->src_addr = strdup(name.c_str());
      info->src_addrlen = name.size() + 1;
      s = ep->OpenProvider(info);
      fi_freeinfo(info);
    }
  }
  // tcp: the provider endpoint comes with the connection (ConnectProvider, AcceptProvider).
  if (!s.ok()) {
    ep->sock_ = -1;  // the caller still owns it
    return s;
  }
  return ep;
}

namespace {

// A copy of `core`'s info whose source address is the interface `sock` is bound to (port 0), so
// that the address a peer receives is one it can reach.
absl::StatusOr<fi_info*> InfoBoundTo(FabricCore* core, int sock) {
  sockaddr_in local = {};
  socklen_t len = sizeof local;
  if (getsockname(sock, reinterpret_cast<sockaddr*>(&local), &len) != 0) {
    return absl::UnavailableError(absl::StrCat("getsockname: ", strerror(errno)));
  }
  local.sin_port = 0;
  fi_info* info = fi_dupinfo(core->info_);
  if (info == nullptr) return absl::ResourceExhaustedError("fi_dupinfo");
  free(info->src_addr);
  info->src_addr = malloc(sizeof local);
  memcpy(info->src_addr, &local, sizeof local);
  info->src_addrlen = sizeof local;
  info->addr_format = FI_SOCKADDR_IN;
  return info;
}

// A connection-management event, with room for the connection data tcp carries.
struct CmEvent {
  fi_eq_cm_entry& entry() { return *reinterpret_cast<fi_eq_cm_entry*>(buf); }
  const uint8_t* data() const { return buf + offsetof(fi_eq_cm_entry, data); }
  alignas(fi_eq_cm_entry) uint8_t buf[offsetof(fi_eq_cm_entry, data) + kTokenSize + 64];
};

// Waits on `eq` for the next connection-management event before `deadline`. Returns the event
// (the entry and the length of its data in `*out`, `*data_len`); kUnavailable on a timeout or an
// error event (a refused or failed connection).
absl::StatusOr<uint32_t> WaitCm(fid_eq* eq, CmEvent* out, size_t* data_len, absl::Time deadline) {
  for (;;) {
    const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (ms <= 0) return absl::UnavailableError("provider connection timed out");
    uint32_t event = 0;
    ssize_t n = fi_eq_sread(eq, &event, out->buf, sizeof out->buf,
                            static_cast<int>(std::min<int64_t>(ms, 100)), 0);
    if (n == -FI_EAGAIN || n == -FI_ETIMEDOUT || n == -FI_EINTR) continue;
    if (n == -FI_EAVAIL) {
      fi_eq_err_entry err = {};
      fi_eq_readerr(eq, &err, 0);
      return absl::UnavailableError(
          absl::StrCat("provider connection failed: ", fi_strerror(err.err)));
    }
    if (n < 0) return FiError("fi_eq_sread", static_cast<int>(-n));
    if (static_cast<size_t>(n) < offsetof(fi_eq_cm_entry, data)) {
      return absl::UnavailableError("short connection event");
    }
    *data_len = static_cast<size_t>(n) - offsetof(fi_eq_cm_entry, data);
    return event;
  }
}

}  // namespace

absl::Status EndpointCore::OpenQueues() {
  FabricCore* f = fabric_;
  fi_cq_attr cq_attr = {};
  cq_attr.format = FI_CQ_FORMAT_CONTEXT;
  cq_attr.size = std::max<size_t>(2 * f->max_in_flight_, 64);
  cq_attr.wait_obj = FI_WAIT_NONE;
  int rc = fi_cq_open(f->domain_, &cq_attr, &cq_, nullptr);
  if (rc != 0) return FiError("fi_cq_open", -rc);
  if (f->msg_) {
    // Connection events, waited for during the handshake only (afterwards a dropped connection
    // shows in the completion queue: see drop_watch_).
    fi_eq_attr eq_attr = {};
    eq_attr.wait_obj = FI_WAIT_UNSPEC;
    rc = fi_eq_open(f->fabric_, &eq_attr, &eq_, nullptr);
    if (rc != 0) return FiError("fi_eq_open", -rc);
  } else {
    fi_av_attr av_attr = {};
    av_attr.type = FI_AV_TABLE;
    av_attr.count = 2;
    rc = fi_av_open(f->domain_, &av_attr, &av_, nullptr);
    if (rc != 0) return FiError("fi_av_open", -rc);
  }
  return absl::OkStatus();
}

absl::Status EndpointCore::OpenProvider(fi_info* info) {
  int rc = fi_endpoint(fabric_->domain_, info, &ep_, nullptr);
  if (rc != 0) return FiError("fi_endpoint", -rc);
  if ((rc = fi_ep_bind(ep_, &cq_->fid, FI_TRANSMIT | FI_RECV)) != 0) {
    return FiError("fi_ep_bind(cq)", -rc);
  }
  fid* queue = fabric_->msg_ ? &eq_->fid : &av_->fid;
  if ((rc = fi_ep_bind(ep_, queue, 0)) != 0) return FiError("fi_ep_bind(eq/av)", -rc);
  if ((rc = fi_enable(ep_)) != 0) return FiError("fi_enable", -rc);
  if (fabric_->msg_) return absl::OkStatus();
  char name[kMaxName];
  size_t len = sizeof name;
  if ((rc = fi_getname(&ep_->fid, name, &len)) != 0) return FiError("fi_getname", -rc);
  local_name_.assign(name, len);
  return absl::OkStatus();
}

absl::Status EndpointCore::ConnectProvider(const std::string& pep_name, const std::string& token) {
  // The listener's passive endpoint: an IPv4 address, the one this side's out-of-band socket
  // reached (a listener names no third host).
  sockaddr_in pep = {};
  sockaddr_in oob = {};
  socklen_t len = sizeof oob;
  if (pep_name.size() == sizeof pep) memcpy(&pep, pep_name.data(), sizeof pep);
  if (pep_name.size() != sizeof pep || pep.sin_family != AF_INET || pep.sin_port == 0 ||
      getpeername(sock_, reinterpret_cast<sockaddr*>(&oob), &len) != 0 ||
      pep.sin_addr.s_addr != oob.sin_addr.s_addr) {
    return absl::UnavailableError(
        absl::StrCat("the peer sent an unusable provider address (", pep_name.size(), " bytes)"));
  }
  absl::StatusOr<fi_info*> info = InfoBoundTo(fabric_, sock_);
  if (!info.ok()) return info.status();
  absl::Status s = OpenProvider(*info);
  fi_freeinfo(*info);
  if (!s.ok()) return s;
  int rc = fi_connect(ep_, &pep, token.data(), token.size());
  if (rc != 0) return FiError("fi_connect", -rc);
  CmEvent ev;
  size_t data_len = 0;
  absl::StatusOr<uint32_t> got = WaitCm(eq_, &ev, &data_len, absl::Now() + kHandshakeTimeout);
  if (!got.ok()) return got.status();
  if (*got != FI_CONNECTED) return absl::UnavailableError("unexpected connection event");
  return PostDropWatch();
}

absl::Status EndpointCore::PostDropWatch() {
  // No descriptor: tcp's domain has no FI_MR_LOCAL.
  ssize_t rc =
      fi_recv(ep_, &drop_watch_, sizeof drop_watch_, nullptr, FI_ADDR_UNSPEC, &drop_watch_);
  if (rc != 0) return FiError("fi_recv", static_cast<int>(-rc));
  return absl::OkStatus();
}

absl::Status EndpointCore::AcceptProvider(const std::string& token, bool* hello_sent) {
  *hello_sent = false;
  absl::StatusOr<fi_info*> info = InfoBoundTo(fabric_, sock_);
  if (!info.ok()) return info.status();
  fid_pep* pep = nullptr;
  int rc = fi_passive_ep(fabric_->fabric_, *info, &pep, nullptr);
  fi_freeinfo(*info);
  if (rc != 0) return FiError("fi_passive_ep", -rc);
  absl::Status s;
  char name[kMaxName];
  size_t len = sizeof name;
  if ((rc = fi_pep_bind(pep, &eq_->fid, 0)) != 0) s = FiError("fi_pep_bind", -rc);
  if (s.ok() && (rc = fi_listen(pep)) != 0) s = FiError("fi_listen", -rc);
  if (s.ok() && (rc = fi_getname(&pep->fid, name, &len)) != 0) s = FiError("fi_getname", -rc);
  if (s.ok()) s = SendHello(sock_, fabric_->provider_name_, std::string(name, len), id_);
  *hello_sent = s.ok();
  const absl::Time deadline = absl::Now() + kHandshakeTimeout;
  while (s.ok() && ep_ == nullptr) {
    CmEvent ev;
    size_t data_len = 0;
    absl::StatusOr<uint32_t> got = WaitCm(eq_, &ev, &data_len, deadline);
    if (!got.ok()) {
      s = got.status();
      break;
    }
    if (*got != FI_CONNREQ) continue;
    if (data_len != token.size() || memcmp(ev.data(), token.data(), token.size()) != 0) {
      // Not the peer of this handshake.
      fi_reject(pep, ev.entry().info->handle, nullptr, 0);
      fi_freeinfo(ev.entry().info);
      continue;
    }
    s = OpenProvider(ev.entry().info);
    if (s.ok() && (rc = fi_accept(ep_, nullptr, 0)) != 0) s = FiError("fi_accept", -rc);
    if (!s.ok() && ep_ == nullptr) fi_reject(pep, ev.entry().info->handle, nullptr, 0);
    fi_freeinfo(ev.entry().info);
  }
  while (s.ok()) {
    CmEvent ev;
    size_t data_len = 0;
    absl::StatusOr<uint32_t> got = WaitCm(eq_, &ev, &data_len, deadline);
    if (!got.ok()) {
      s = got.status();
    } else if (*got == FI_CONNECTED) {
      break;
    } else if (*got == FI_CONNREQ) {
      fi_reject(pep, ev.entry().info->handle, nullptr, 0);
      fi_freeinfo(ev.entry().info);
    } else {
      s = absl::UnavailableError("unexpected connection event");
    }
  }
  fi_close(&pep->fid);
  if (s.ok()) s = PostDropWatch();
  return s;
}

absl::Status InsertPeer(EndpointCore* ep, const std::string& name) {
  // The provider reads an address of its own format's length: a peer's must be one terminated
  // string (shm).
  const bool well_formed = name.size() >= 2 && name.find('\0') == name.size() - 1;
  if (!well_formed) {
    return absl::UnavailableError(absl::StrCat("the peer sent a malformed provider address (",
                                               name.size(), " bytes)"));
  }
  int n = fi_av_insert(ep->av_, name.data(), 1, &ep->peer_, 0, nullptr);
  if (n != 1) return absl::UnavailableError("fi_av_insert of the peer's address failed");
  if (ep->fabric_->is_shm_) ep->peer_alive_ = LivenessWatch::Open(BeaconNameFor(name));
  return absl::OkStatus();
}

EndpointCore::~EndpointCore() {
  if (ep_ != nullptr) fi_close(&ep_->fid);
  if (av_ != nullptr) fi_close(&av_->fid);
  if (eq_ != nullptr) fi_close(&eq_->fid);
  if (cq_ != nullptr) fi_close(&cq_->fid);
  if (sock_ >= 0) close(sock_);
}

void EndpointCore::Fail(absl::Status why, bool peer_gone) {
  bool tell_refused = false;
  {
    std::unique_lock<std::mutex> l(mu_);
    if (state_ != State::kOpen) {
      // Another thread is failing the connection: return once it is done. Until then it may be
      // reading the peer's last word, which decides how the caller's own failed operation
      // completes (kRefusedByte: kPermissionDenied). Bounded by kCloseLinger.
      closed_cv_.wait(l, [this] { return state_ == State::kClosed; });
      return;
    }
    state_ = State::kFailing;
    health_ = why;
    // tcp: our provider dropped the connection, and no operation of ours failed: it refused the
    // peer's access (or lost the connection; see kRefusedByte).
    tell_refused = provider_dropped_ && !op_failed_;
  }
  open_.store(false, std::memory_order_release);
  // Wait out a Progress already inside the provider (it holds cq_mu_; later ones see open_ false
  // under it and leave the provider alone) before the peer learns below that we are going: a shm
  // peer in this process then unmaps its region, which that Progress may still be reading.
  { std::lock_guard<PollLock> barrier(cq_mu_); }
  if (tell_refused && sock_ >= 0) {
    (void)send(sock_, &kRefusedByte, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
  }
  if (!peer_gone && !tell_refused && sock_ >= 0) {
    // Close in order: tell the peer (EOF on its liveness socket), and keep our provider endpoint
    // open until it has closed its own (EOF back), so the peer never posts to an endpoint that is
    // gone. shm in one process dereferences a closed peer's region and crashes otherwise. What
    // the peer sends until then may say that it refused our access (kRefusedByte).
    shutdown(sock_, SHUT_WR);
    const absl::Time deadline = absl::Now() + kCloseLinger;
    for (;;) {
      const int ms = static_cast<int>(absl::ToInt64Milliseconds(deadline - absl::Now()));
      if (ms <= 0) break;
      pollfd p = {sock_, POLLIN, 0};
      if (poll(&p, 1, ms) <= 0) break;
      char buf[64];
      ssize_t n = recv(sock_, buf, sizeof buf, MSG_DONTWAIT);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) break;
      if (n > 0 && memchr(buf, kRefusedByte, static_cast<size_t>(n)) != nullptr) {
        peer_refused_.store(true, std::memory_order_relaxed);
      }
    }
  }
  Completion* chain = nullptr;
  bool refused_first = false;
  {
    std::lock_guard<PollLock> cl(cq_mu_);
    // Closing the provider endpoint first: afterwards it touches no buffer of ours, so the
    // operations below may complete and their memory be reused.
    if (ep_ != nullptr) fi_close(&ep_->fid);
    ep_ = nullptr;
    if (av_ != nullptr) fi_close(&av_->fid);
    av_ = nullptr;
    if (eq_ != nullptr) fi_close(&eq_->fid);
    eq_ = nullptr;
    if (cq_ != nullptr) fi_close(&cq_->fid);
    cq_ = nullptr;
    std::lock_guard<std::mutex> l(mu_);
    state_ = State::kClosed;
    closed_cv_.notify_all();
    // The peer said that its provider refused one of our accesses, and our provider has not
    // reported any operation failed (the connection went first): as in Progress, the oldest
    // posted operation is taken for the refused one.
    refused_first =
        peer_refused_.load(std::memory_order_relaxed) && !op_failed_ && posted_head_ != nullptr;
    Completion** tail = &chain;
    for (Completion* c = posted_head_; c != nullptr; c = c->next_) {
      *tail = c;
      tail = &c->next_;
    }
    for (Completion* c = queued_head_; c != nullptr; c = c->next_) {
      *tail = c;
      tail = &c->next_;
    }
    *tail = nullptr;
    posted_head_ = posted_tail_ = queued_head_ = queued_tail_ = nullptr;
    posted_count_ = queued_count_ = 0;
    pending_atomic_.store(0, std::memory_order_relaxed);
    has_queued_.store(false, std::memory_order_relaxed);
  }
  // The peer learns at once: its liveness socket reads EOF.
  if (sock_ >= 0) shutdown(sock_, SHUT_RDWR);
  fabric_->RemoveEndpoint(this);
  for (bool first = true; chain != nullptr; first = false) {
    Completion* next = chain->next_;
    Finish(chain,
           first && refused_first ? absl::PermissionDeniedError("the target refused the access") : why);
    chain = next;
  }
}

absl::StatusOr<RemoteRegion> EndpointCore::Expose(const Registration& reg, const void* addr,
                                                  size_t length, uint32_t rights,
                                                  uint64_t generation) {
  const uint32_t kRemote = kAccessRemoteRead | kAccessRemoteWrite;
  uintptr_t a = reinterpret_cast<uintptr_t>(addr);
  if (length == 0 || a < reg.addr || a + length < a || a + length > reg.addr + reg.length) {
    return absl::InvalidArgumentError("exposed range empty or not inside the registration");
  }
  if (rights == 0 || (rights & ~kRemote) != 0) {
    return absl::InvalidArgumentError("rights must be kAccessRemoteRead and/or kAccessRemoteWrite");
  }
  if (!AccessCovers(reg.access, rights) || reg.remote_key == 0) {
    return absl::PermissionDeniedError("registration lacks the remote rights asked for");
  }
  if (!connected()) return health();
  RemoteRegion r;
  r.addr = fabric_->virt_addr_ ? a : a - reg.addr;
  r.length = length;
  if (fabric_->is_local_) {
    // "auto", shm side: the registration's key in the shm domain.
    const auto* rec = reinterpret_cast<const MrRecord*>(reg.handle);
    if (rec == nullptr || rec->local_mr == nullptr) {
      return absl::InvalidArgumentError("registration not made by this fabric's registrar");
    }
    r.key = fi_mr_key(rec->local_mr);
  } else {
    r.key = reg.remote_key;
  }
  r.rights = rights;
  r.connection = id_;
  r.generation = generation;
  return r;
}

absl::StatusOr<std::unique_ptr<Endpoint>> ListenerCore::Accept() {
  for (;;) {
    int fd = accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR) continue;
      if (closed_.load()) return absl::CancelledError("listener closed");
      return absl::UnavailableError(absl::StrCat("accept: ", strerror(errno)));
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    absl::StatusOr<Hello> hello = RecvHello(fd);
    if (!hello.ok()) {
      close(fd);
      return hello.status();
    }
    // An "auto" fabric serves a peer that speaks shm on its shm core.
    FabricCore* core = fabric_;
    if (hello->provider != core->provider_name_ && core->local_ != nullptr &&
        hello->provider == core->local_->provider_name_) {
      core = core->local_.get();
    }
    if (hello->provider != core->provider_name_) {
      // Tell the peer what we run (an "auto" peer then retries over tcp), then refuse.
      (void)SendHello(fd, core->provider_name_, "-", 0);
      close(fd);
      return absl::FailedPreconditionError(absl::StrCat(
          "peer runs provider ", hello->provider, ", this side ", core->provider_name_));
    }
    uint64_t id = RandomU64();
    absl::StatusOr<std::shared_ptr<EndpointCore>> ep = core->NewEndpoint(fd, id);
    absl::Status s = ep.status();
    bool hello_sent = false;
    if (s.ok() && core->msg_) {
      // tcp: the peer sent its token; our hello names the passive endpoint it connects to.
      if (hello->name.size() != kTokenSize) {
        s = absl::UnavailableError(absl::StrCat("the peer sent a malformed connection token (",
                                                hello->name.size(), " bytes)"));
      } else {
        s = (*ep)->AcceptProvider(hello->name, &hello_sent);
      }
    } else if (s.ok()) {
      s = InsertPeer(ep->get(), hello->name);
      if (s.ok()) s = SendHello(fd, core->provider_name_, (*ep)->local_name_, id);
      hello_sent = s.ok();
    }
    if (!s.ok()) {
      if (ep.ok()) (*ep)->sock_ = -1;
      if (!hello_sent) SendRefusal(fd, core->provider_name_, s);
      close(fd);
      return s;
    }
    (*ep)->open_.store(true);
    core->AddEndpoint(*ep);
    return WrapEndpoint(*std::move(ep));
  }
}

void ListenerCore::Close() {
  if (closed_.exchange(true)) return;
  shutdown(fd_, SHUT_RDWR);  // wakes a blocked accept
}

ListenerCore::~ListenerCore() {
  Close();
  if (fd_ >= 0) close(fd_);
}

absl::StatusOr<std::unique_ptr<FabricBackend>> OpenLibfabric(const FabricOptions& options) {
  auto core = std::make_unique<FabricCore>();
  absl::Status s = core->Open(options);
  if (!s.ok()) return s;
  s = core->StartProgress();
  if (!s.ok()) return s;
  return std::unique_ptr<FabricBackend>(std::move(core));
}

absl::StatusOr<std::unique_ptr<Listener>> FabricCore::Listen(absl::string_view host_port) {
  absl::StatusOr<sockaddr_in> addr = ParseHostPort(host_port);
  if (!addr.ok()) return addr.status();
  absl::StatusOr<int> fd = ListenOn(*addr);
  if (!fd.ok()) return fd.status();
  auto core = std::make_unique<ListenerCore>();
  core->fabric_ = this;
  core->fd_ = *fd;
  socklen_t len = sizeof core->addr_;
  getsockname(*fd, reinterpret_cast<sockaddr*>(&core->addr_), &len);
  return WrapListener(std::move(core));
}

// Connects `core`'s provider to the listener at `addr`.
absl::StatusOr<std::shared_ptr<EndpointCore>> ConnectOn(FabricCore* core, const sockaddr_in& addr) {
  absl::StatusOr<int> fd = ConnectTo(addr, kHandshakeTimeout);
  if (!fd.ok()) return fd.status();
  absl::StatusOr<std::shared_ptr<EndpointCore>> ep = core->NewEndpoint(*fd, 0);
  absl::Status s = ep.status();
  // tcp: our hello carries the token our provider connection request will carry too.
  std::string token;
  for (size_t i = 0; core->msg_ && i < kTokenSize; i += sizeof(uint64_t)) {
    const uint64_t r = RandomU64();
    token.append(reinterpret_cast<const char*>(&r), sizeof r);
  }
  if (s.ok()) s = SendHello(*fd, core->provider_name_, core->msg_ ? token : (*ep)->local_name_, 0);
  absl::StatusOr<Hello> hello;
  if (s.ok()) {
    hello = RecvHello(*fd);
    s = hello.status();
  }
  if (s.ok() && hello->provider != core->provider_name_) {
    s = absl::FailedPreconditionError(absl::StrCat("peer runs provider ", hello->provider,
                                                   ", this side ", core->provider_name_));
  }
  if (s.ok()) {
    s = core->msg_ ? (*ep)->ConnectProvider(hello->name, token)
                   : InsertPeer(ep->get(), hello->name);
  }
  if (!s.ok()) {
    if (ep.ok()) (*ep)->sock_ = -1;
    close(*fd);
    return s;
  }
  (*ep)->id_ = hello->connection_id;
  (*ep)->open_.store(true);
  core->AddEndpoint(*ep);
  return ep;
}

absl::StatusOr<std::unique_ptr<Endpoint>> FabricCore::Connect(absl::string_view host_port) {
  absl::StatusOr<sockaddr_in> addr = ParseHostPort(host_port);
  if (!addr.ok()) return addr.status();
  absl::StatusOr<std::shared_ptr<EndpointCore>> ep;
  if (local_ != nullptr && IsLocalAddress(*addr)) {
    // "auto", a peer on this host: shm, unless the listener does not run it.
    ep = ConnectOn(local_.get(), *addr);
    if (ep.ok()) return WrapEndpoint(*std::move(ep));
    if (ep.status().code() != absl::StatusCode::kFailedPrecondition) return ep.status();
  }
  ep = ConnectOn(this, *addr);
  if (!ep.ok()) return ep.status();
  return WrapEndpoint(*std::move(ep));
}

std::string ListenerCore::address() const { return FormatHostPort(addr_); }
uint16_t ListenerCore::port() const { return ntohs(addr_.sin_port); }

void EndpointCore::Close() { Fail(absl::CancelledError("endpoint closed")); }

absl::Status EndpointCore::Revoke(const RemoteRegion& r) {
  return absl::UnimplementedError(
      "libfabric: revoking a descriptor means deregistering its registration");
}

}  // namespace internal
}  // namespace sanreg
