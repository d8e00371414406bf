// spi.cc: the SAN SPI (ws2san.h) over sanreg's data path and registration cache.
//
// State: one process-wide State, created by the first WSPStartupEx and dropped by the matching
// last WSPCleanup. It owns one Fabric (provider from SANREG_FABRIC), one PinRegistrar, the
// fabric's registrar over it and one RegistrationCache over that. Sockets, memory handles and RDMA
// registrations live in handle tables with generations (internal/handle_table.h), so a forged,
// stale or foreign handle is WSAEINVAL (WSAENOTSOCK for sockets), never a crash.
//
// Sockets: a socket is a plain TCP connection (the SPI's own control channel: address exchange,
// WSPSend/WSPRecv messages) plus a datapath Endpoint for RDMA. WSPListen listens on the bound
// address and opens a fabric Listener on the same host, port 0; WSPAccept sends the fabric port to
// the client over TCP, accepts its fabric connection and checks, with the connection id the client
// sends back, that the two belong together (accepts on one listener are serialised).
//
// Memory:
//   WSPRegisterMemory      acquires a RegionRef from the cache (local rights); the handle holds it.
//   WSPRegisterRdmaMemory  acquires a RegionRef (keeps the pages pinned and cached) and registers a
//                          dedicated fabric registration with the remote rights, exposed to the
//                          peer; the descriptor is the 64-byte RemoteRegion wire form whose
//                          generation field is the RDMA handle. The same (socket, range, flags)
//                          registered again returns the same descriptor and counts a reference.
//                          The last deregistration deregisters the dedicated registration (the
//                          provider revokes the key before it returns) and releases the RegionRef
//                          (the cache keeps the pinning).
//   WSPMemoryRegistrationCacheCallback  invalidates the range in the cache, flushes the
//                          reclaimer, and revokes the keys of RDMA registrations overlapping it.
//
// Lock order: State::rdma_mu, then State::mu. Nothing blocking (accept, connect, registration,
// endpoint close) runs under State::mu. Completion callbacks take State::mu briefly.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "datapath/endpoint.h"
#include "datapath/fabric.h"
#include "datapath/remote_region.h"
#include "regcache/cache.h"
#include "regcache/pin_registrar.h"
#include "spi/internal/errors.h"
#include "spi/internal/handle_table.h"
#include "spi/internal/spi_internal.h"
#include "spi/ws2san.h"

namespace sanreg::spi {
namespace {

using internal::HandleTable;
using internal::SpiOptions;
using internal::WsaErrorFromStatus;

constexpr size_t kDescSize = RemoteRegion::kWireSize;
constexpr uint32_t kHelloMagic = 0x53504931;  // "SPI1"

struct Socket {
  std::mutex mu;  // guards the fields below that change after creation
  int fd = -1;    // bound/listening TCP socket, or the connection's control channel
  bool bound = false;
  bool listening = false;
  std::unique_ptr<Listener> listener;  // fabric listener of a listening socket
  std::unique_ptr<Endpoint> ep;        // connected sockets
  std::atomic<uint32_t> rdma_threshold{0};
  std::mutex accept_mu;  // serialises WSPAccept
  std::mutex send_mu;    // one message at a time on the control channel
  std::mutex recv_mu;

  ~Socket() {
    if (listener != nullptr) listener->Close();
    if (ep != nullptr) ep->Close();
    if (fd >= 0) close(fd);
  }
};

struct MemEntry {
  uint64_t socket = 0;
  uintptr_t addr = 0;
  size_t len = 0;
  uint32_t access = 0;
  int in_flight = 0;  // transfers using it; guarded by State::mu
  RegionRef ref;
};

struct RdmaEntry {
  uint64_t socket = 0;
  uintptr_t addr = 0;
  size_t len = 0;
  DWORD flags = 0;
  int refs = 0;
  bool revoked = false;  // the cache callback revoked it (mapping changed)
  RegionRef pin;
  Registration key_reg;
  uint8_t desc[kDescSize] = {};
};

struct State {
  SpiOptions options;
  WSPUPCALLTABLEEX upcalls{};
  int startups = 0;
  std::unique_ptr<PinRegistrar> pin;
  std::unique_ptr<Fabric> fabric;
  std::unique_ptr<Registrar> registrar;
  std::unique_ptr<RegistrationCache> cache;

  std::mutex rdma_mu;  // serialises RDMA (de)registration and the cache callback
  std::mutex mu;       // guards the tables and rdma_index
  HandleTable<Socket> sockets;
  HandleTable<MemEntry> mems;
  HandleTable<RdmaEntry> rdmas;
  std::map<std::tuple<uint64_t, uintptr_t, size_t, DWORD>, uint64_t> rdma_index;

  // Transfers in flight, process-wide; WSPCleanup waits for 0.
  std::mutex ops_mu;
  std::condition_variable ops_cv;
  int ops = 0;

  ~State() {
    // Order: endpoints and registrations first, then the cache, the registrar, the fabric, the pin.
    rdma_index.clear();
    rdmas.ForEach([this](uint64_t, const std::shared_ptr<RdmaEntry>& e) {
      if (!e->revoked) (void)registrar->Deregister(e->key_reg);
      e->pin.Reset();
    });
    rdmas = HandleTable<RdmaEntry>();
    mems = HandleTable<MemEntry>();
    sockets = HandleTable<Socket>();
    cache.reset();
    registrar.reset();
    fabric.reset();
    pin.reset();
  }
};

std::mutex g_mu;           // guards g_state
State* g_state = nullptr;  // owned; created by the first WSPStartupEx

// Waiters of WSPGetOverlappedResult(wait = TRUE): every completion stores ov->Internal under
// g_done_mu and notifies.
std::mutex g_done_mu;
std::condition_variable g_done_cv;

State* GetState(LPINT err) {
  std::lock_guard<std::mutex> l(g_mu);
  if (g_state == nullptr && err != nullptr) *err = WSANOTINITIALISED;
  return g_state;
}

int Fail(LPINT err, int code) {
  if (err != nullptr) *err = code;
  return SOCKET_ERROR;
}

std::shared_ptr<Socket> FindSocket(State* st, SOCKET s) {
  std::lock_guard<std::mutex> l(st->mu);
  return st->sockets.Find(static_cast<uint64_t>(s));
}

bool WriteFull(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    ssize_t k = send(fd, c, n, MSG_NOSIGNAL);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return false;
    c += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

bool ReadFull(int fd, void* p, size_t n) {
  char* c = static_cast<char*>(p);
  while (n > 0) {
    ssize_t k = recv(fd, c, n, 0);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return false;
    c += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

int WsaFromErrno(int e) {
  switch (e) {
    case EADDRINUSE:
      return WSAEADDRINUSE;
    case ECONNREFUSED:
      return WSAECONNREFUSED;
    case ECONNRESET:
    case EPIPE:
      return WSAECONNRESET;
    case EFAULT:
      return WSAEFAULT;
    case ENOBUFS:
    case ENOMEM:
      return WSAENOBUFS;
    case EINVAL:
      return WSAEINVAL;
    default:
      return WSAENETDOWN;
  }
}

std::string HostOf(const sockaddr_in& a) {
  char buf[INET_ADDRSTRLEN] = {};
  inet_ntop(AF_INET, &a.sin_addr, buf, sizeof buf);
  return buf;
}

SOCKET AddSocket(State* st, std::shared_ptr<Socket> sock) {
  sock->rdma_threshold.store(st->options.rdma_threshold);
  std::lock_guard<std::mutex> l(st->mu);
  return static_cast<SOCKET>(st->sockets.Insert(std::move(sock)));
}

// ---- Stubs for the table members sanreg does not support. ----

int NotSupported(LPINT err) { return Fail(err, WSAEOPNOTSUPP); }

int WSPAddressToString(struct sockaddr*, DWORD, LPWSAPROTOCOL_INFOW, WCHAR*, LPDWORD, LPINT err) {
  return NotSupported(err);
}
int WSPAsyncSelect(SOCKET, void*, unsigned int, long, LPINT err) { return NotSupported(err); }
int WSPCancelBlockingCall(LPINT err) { return NotSupported(err); }
int WSPDuplicateSocket(SOCKET, DWORD, LPWSAPROTOCOL_INFOW, LPINT err) { return NotSupported(err); }
int WSPEnumNetworkEvents(SOCKET, HANDLE, void*, LPINT err) { return NotSupported(err); }
int WSPEventSelect(SOCKET, HANDLE, long, LPINT err) { return NotSupported(err); }
BOOL WSPGetQOSByName(SOCKET, LPWSABUF, LPQOS, LPINT err) {
  NotSupported(err);
  return FALSE;
}
SOCKET WSPJoinLeaf(SOCKET, const struct sockaddr*, int, LPWSABUF, LPWSABUF, LPQOS, LPQOS, DWORD,
                   LPINT err) {
  NotSupported(err);
  return INVALID_SOCKET;
}
int WSPRecvDisconnect(SOCKET, LPWSABUF, LPINT err) { return NotSupported(err); }
int WSPRecvFrom(SOCKET, LPWSABUF, DWORD, LPDWORD, LPDWORD, struct sockaddr*, LPINT, LPWSAOVERLAPPED,
                LPWSAOVERLAPPED_COMPLETION_ROUTINE, LPWSATHREADID, LPINT err) {
  return NotSupported(err);
}
int WSPSelect(int, void*, void*, void*, const void*, LPINT err) { return NotSupported(err); }
int WSPSendDisconnect(SOCKET, LPWSABUF, LPINT err) { return NotSupported(err); }
int WSPSendTo(SOCKET, LPWSABUF, DWORD, LPDWORD, DWORD, const struct sockaddr*, int, LPWSAOVERLAPPED,
              LPWSAOVERLAPPED_COMPLETION_ROUTINE, LPWSATHREADID, LPINT err) {
  return NotSupported(err);
}
int WSPShutdown(SOCKET, int, LPINT err) { return NotSupported(err); }
int WSPStringToAddress(WCHAR*, int, LPWSAPROTOCOL_INFOW, struct sockaddr*, LPINT, LPINT err) {
  return NotSupported(err);
}

// ---- Sockets. ----

SOCKET WSPSocket(int af, int type, int protocol, LPWSAPROTOCOL_INFOW info, GROUP g, DWORD flags,
                 LPINT err) {
  State* st = GetState(err);
  if (st == nullptr) return INVALID_SOCKET;
  if (err == nullptr) return INVALID_SOCKET;
  if (af != AF_INET || type != SOCK_STREAM) {
    *err = WSAEOPNOTSUPP;
    return INVALID_SOCKET;
  }
  return AddSocket(st, std::make_shared<Socket>());
}

int WSPBind(SOCKET s, const struct sockaddr* name, int namelen, LPINT err) {
  State* st = GetState(err);
  if (st == nullptr || err == nullptr) return SOCKET_ERROR;
  std::shared_ptr<Socket> sock = FindSocket(st, s);
  if (sock == nullptr) return Fail(err, WSAENOTSOCK);
  if (name == nullptr || namelen < static_cast<int>(sizeof(sockaddr_in))) {
    return Fail(err, WSAEFAULT);
  }
  if (name->sa_family != AF_INET) return Fail(err, WSAEINVAL);
  std::lock_guard<std::mutex> l(sock->mu);
  if (sock->bound || sock->ep != nullptr) return Fail(err, WSAEINVAL);
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Fail(err, WSAENOBUFS);
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(fd, name, sizeof(sockaddr_in)) != 0) {
    int e = errno;
    close(fd);
    return Fail(err, WsaFromErrno(e));
  }
  sock->fd = fd;
  sock->bound = true;
  return 0;
}

int WSPListen(SOCKET s, int backlog, LPINT err) {
  State* st = GetState(err);
  if (st == nullptr || err == nullptr) return SOCKET_ERROR;
  std::shared_ptr<Socket> sock = FindSocket(st, s);
  if (sock == nullptr) return Fail(err, WSAENOTSOCK);
  std::lock_guard<std::mutex> l(sock->mu);
  if (!sock->bound || sock->ep != nullptr) return Fail(err, WSAEINVAL);
  if (sock->listening) return 0;
  if (listen(sock->fd, backlog > 0 ? backlog : 16) != 0) return Fail(err, WsaFromErrno(errno));
  sockaddr_in a{};
  socklen_t alen = sizeof a;
  getsockname(sock->fd, reinterpret_cast<sockaddr*>(&a), &alen);
  absl::StatusOr<std::unique_ptr<Listener>> l2 = st->fabric->Listen(HostOf(a) + ":0");
  if (!l2.ok()) return Fail(err, WsaErrorFromStatus(l2.status()));
  sock->listener = *std::move(l2);
  sock->listening = true;
  return 0;
}

SOCKET WSPAccept(SOCKET s, struct sockaddr* addr, LPINT addrlen, LPCONDITIONPROC cond,
                 DWORD_PTR data, LPINT err) {
  State* st = GetState(err);
  if (st == nullptr || err == nullptr) return INVALID_SOCKET;
  std::shared_ptr<Socket> sock = FindSocket(st, s);
  if (sock == nullptr) {
    *err = WSAENOTSOCK;
    return INVALID_SOCKET;
  }
  if (addr != nullptr && (addrlen == nullptr || *addrlen < static_cast<int>(sizeof(sockaddr_in)))) {
    *err = WSAEFAULT;
    return INVALID_SOCKET;
  }
  int lfd;
  Listener* listener;
  {
    std::lock_guard<std::mutex> l(sock->mu);
    if (!sock->listening) {
      *err = WSAEINVAL;
      return INVALID_SOCKET;
    }
    lfd = sock->fd;
    listener = sock->listener.get();
  }
  std::lock_guard<std::mutex> accept_lock(sock->accept_mu);
  sockaddr_in peer{};
  socklen_t plen = sizeof peer;
  int cfd;
  do {
    cfd = accept4(lfd, reinterpret_cast<sockaddr*>(&peer), &plen, SOCK_CLOEXEC);
  } while (cfd < 0 && errno == EINTR);
  if (cfd < 0) {
    *err = WsaFromErrno(errno);
    return INVALID_SOCKET;
  }
  int one = 1;
  setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  uint32_t hello[2] = {kHelloMagic, listener->port()};
  uint64_t client_id = 0;
  absl::StatusOr<std::unique_ptr<Endpoint>> ep = absl::UnavailableError("hello");
  if (WriteFull(cfd, hello, sizeof hello)) ep = listener->Accept();
  if (!ep.ok() || !ReadFull(cfd, &client_id, sizeof client_id) ||
      client_id != (*ep)->connection_id()) {
    close(cfd);
    *err = ep.ok() ? WSAECONNABORTED : WsaErrorFromStatus(ep.status());
    return INVALID_SOCKET;
  }
  if (addr != nullptr) {
    std::memcpy(addr, &peer, sizeof peer);
    *addrlen = sizeof peer;
  }
  auto conn = std::make_shared<Socket>();
  conn->fd = cfd;
  conn->ep = *std::move(ep);
  return AddSocket(st, std::move(conn));
}

int WSPConnect(SOCKET s, const struct sockaddr* name, int namelen, LPWSABUF caller_data,
               LPWSABUF callee_data, LPQOS sqos, LPQOS gqos, LPINT err) {
  State* st = GetState(err);
  if (st == nullptr || err == nullptr) return SOCKET_ERROR;
  std::shared_ptr<Socket> sock = FindSocket(st, s);
  if (sock == nullptr) return Fail(err, WSAENOTSOCK);
  if (name == nullptr || namelen < static_cast<int>(sizeof(sockaddr_in))) {
    return Fail(err, WSAEFAULT);
  }
  if (name->sa_family != AF_INET) return Fail(err, WSAEINVAL);
  std::lock_guard<std::mutex> l(sock->mu);
  if (sock->ep != nullptr || sock->listening) return Fail(err, WSAEINVAL);
  int fd = sock->fd;
  if (fd < 0) fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Fail(err, WSAENOBUFS);
  sock->fd = fd;
  int rc;
  do {
    rc = connect(fd, name, sizeof(sockaddr_in));
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) {
    int e = errno;
    close(fd);
    sock->fd = -1;
    sock->bound = false;
    return Fail(err, WsaFromErrno(e));
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  uint32_t hello[2] = {};
  if (!ReadFull(fd, hello, sizeof hello) || hello[0] != kHelloMagic) {
    return Fail(err, WSAECONNABORTED);
  }
  sockaddr_in to;
  std::memcpy(&to, name, sizeof to);
  absl::StatusOr<std::unique_ptr<Endpoint>> ep =
      st->fabric->Connect(absl::StrCat(HostOf(to), ":", hello[1]));
  if (!ep.ok()) return Fail(err, WsaErrorFromStatus(ep.status()));
  uint64_t id = (*ep)->connection_id();
  if (!WriteFull(fd, &id, sizeof id)) return Fail(err, WSAECONNRESET);
  sock->ep = *std::move(ep);
  return 0;
}

// getsockname or getpeername on the socket's control connection. A peer name needs a connection.
int SocketName(SOCKET s, struct sockaddr* name, LPINT namelen, LPINT err, bool peer) {
  State* st = GetState(err);
  if (st == nullptr || err == nullptr) return SOCKET_ERROR;
  std::shared_ptr<Socket> sock = FindSocket(st, s);
  if (sock == nullptr) return Fail(err, WSAENOTSOCK);
  if (name == nullptr || namelen == nullptr || *namelen < static_cast<int>(sizeof(sockaddr_in))) {
    return Fail(err, WSAEFAULT);
  }
  std::lock_guard<std::mutex> l(sock->mu);
  if (peer ? sock->ep == nullptr : sock->fd < 0) return Fail(err, peer ? WSAENOTCONN : WSAEINVAL);
  socklen_t len = static_cast<socklen_t>(*namelen);
  int rc = peer ? getpeername(sock->fd, name, &len) : getsockname(sock->fd, name, &len);
  if (rc != 0) return Fail(err, WsaFromErrno(errno));
  *namelen = static_cast<int>(len);
  return 0;
}

int WSPGetSockName(SOCKET s, struct sockaddr* name, LPINT namelen, LPINT err) {
  return SocketName(s, name, namelen, err, /*peer=*/false);
}

int WSPGetPeerName(SOCKET s, struct sockaddr* name, LPINT namelen, LPINT err) {
  return SocketName(s, name, namelen, err, /*peer=*/true);
}

int WSPCloseSocket(SOCKET s, LPINT err) {
  State* st = GetState(err);
  if (st == nullptr || err == nullptr) return SOCKET_ERROR;
  std::shared_ptr<Socket> sock;
  {
    std::lock_guard<std::mutex> l(st->mu);
    sock = st->sockets.Remove(static_cast<uint64_t>(s));
  }
  if (sock == nullptr) return Fail(err, WSAENOTSOCK);
  // Transfers in flight complete first (WSA_OPERATION_ABORTED), then their memory is released.
  {
    std::lock_guard<std::mutex> l(sock->mu);
    if (sock->listener != nullptr) sock->listener->Close();
    if (sock->ep != nullptr) sock->ep->Close();
    if (sock->fd >= 0) shutdown(sock->fd, SHUT_RDWR);
  }
  std::vector<std::shared_ptr<MemEntry>> mems;
  std::vector<std::shared_ptr<RdmaEntry>> rdmas;
  {
    std::lock_guard<std::mutex> rl(st->rdma_mu);
    std::lock_guard<std::mutex> l(st->mu);
    std::vector<uint64_t> hs;
    st->mems.ForEach([&](uint64_t h, const std::shared_ptr<MemEntry>& e) {
      if (e->socket == static_cast<uint64_t>(s)) hs.push_back(h);
    });
    for (uint64_t h : hs) mems.push_back(st->mems.Remove(h));
    hs.clear();
    st->rdmas.ForEach([&](uint64_t h, const std::shared_ptr<RdmaEntry>& e) {
      if (e->socket == static_cast<uint64_t>(s)) hs.push_back(h);
    });
    for (uint64_t h : hs) {
      std::shared_ptr<RdmaEntry> e = st->rdmas.Remove(h);
      auto it = st->rdma_index.find({e->socket, e->addr, e->len, e->flags});
      if (it != st->rdma_index.end() && it->second == h) st->rdma_index.erase(it);
      rdmas.push_back(std::move(e));
    }
  }
  for (auto& e : rdmas) {
    if (!e->revoked) (void)st->registrar->Deregister(e->key_reg);
    e->pin.Reset();
  }
  return 0;
}

// ---- Socket options. ----

int WSPGetSockOpt(SOCKET s, int level, int name, char* val, LPINT len, LPINT err) {
  State* st = GetState(err);
  if (st == nullptr || err == nullptr) return SOCKET_ERROR;
  std::shared_ptr<Socket> sock = FindSocket(st, s);
  if (sock == nullptr) return Fail(err, WSAENOTSOCK);
  if (level != SOL_SOCKET || (name != SO_MAX_RDMA_SIZE && name != SO_RDMA_THRESHOLD_SIZE)) {
    return Fail(err, WSAEINVAL);
  }
  if (val == nullptr || len == nullptr || *len < static_cast<int>(sizeof(DWORD))) {
    return Fail(err, WSAEFAULT);
  }
  DWORD v = name == SO_MAX_RDMA_SIZE ? st->options.max_rdma_size : sock->rdma_threshold.load();
  std::memcpy(val, &v, sizeof v);
  *len = sizeof v;
  return 0;
}

int WSPSetSockOpt(SOCKET s, int level, int name, const char* val, int len, LPINT err) {
  State* st = GetState(err);
  if (st == nullptr || err == nullptr) return SOCKET_ERROR;
  std::shared_ptr<Socket> sock = FindSocket(st, s);
  if (sock == nullptr) return Fail(err, WSAENOTSOCK);
  if (level != SOL_SOCKET || name != SO_RDMA_THRESHOLD_SIZE) return Fail(err, WSAEINVAL);
  if (val == nullptr || len < static_cast<int>(sizeof(DWORD))) return Fail(err, WSAEFAULT);
  DWORD v;
  std::memcpy(&v, val, sizeof v);
  sock->rdma_threshold.store(v);
  return 0;
}

// ---- Memory registration. ----

bool FlagsValid(DWORD flags) { return flags != 0 && (flags & ~DWORD{MEM_READWRITE}) == 0; }

uint32_t LocalAccess(DWORD flags) {
  return kAccessLocalRead | ((flags & MEM_WRITE) ? uint32_t{kAccessLocalWrite} : 0u);
}

// Returns the connected socket or sets *err.
std::shared_ptr<Socket> ConnectedSocket(State* st, SOCKET s, LPINT err) {
  std::shared_ptr<Socket> sock = FindSocket(st, s);
  if (sock == nullptr) {
    *err = WSAENOTSOCK;
    return nullptr;
  }
  std::lock_guard<std::mutex> l(sock->mu);
  if (sock->ep == nullptr || !sock->ep->connected()) {
    *err = WSAENOTCONN;
    return nullptr;
  }
  return sock;
}

HANDLE WSPRegisterMemory(SOCKET s, PVOID buf, DWORD len, DWORD flags, LPINT err) {
  State* st = GetState(err);
  if (st == nullptr || err == nullptr) return nullptr;
  if (!FlagsValid(flags)) {
    *err = WSAEINVAL;
    return nullptr;
  }
  std::shared_ptr<Socket> sock = ConnectedSocket(st, s, err);
  if (sock == nullptr) return nullptr;
  if (buf == nullptr || len == 0) {
    *err = WSAEFAULT;
    return nullptr;
  }
  absl::StatusOr<RegionRef> ref = st->cache->Acquire(buf, len, LocalAccess(flags));
  if (!ref.ok()) {
    *err = ref.status().code() == absl::StatusCode::kInvalidArgument
               ? WSAEFAULT
               : WsaErrorFromStatus(ref.status());
    return nullptr;
  }
  auto e = std::make_shared<MemEntry>();
  e->socket = static_cast<uint64_t>(s);
  e->addr = reinterpret_cast<uintptr_t>(buf);
  e->len = len;
  e->access = LocalAccess(flags);
  e->ref = *std::move(ref);
  std::lock_guard<std::mutex> l(st->mu);
  return reinterpret_cast<HANDLE>(static_cast<uintptr_t>(st->mems.Insert(std::move(e))));
}

int WSPDeregisterMemory(SOCKET s, HANDLE h, LPINT err) {
  State* st = GetState(err);
  if (st == nullptr || err == nullptr) return SOCKET_ERROR;
  std::shared_ptr<MemEntry> e;
  {
    std::lock_guard<std::mutex> l(st->mu);
    if (st->sockets.Find(static_cast<uint64_t>(s)) == nullptr) return Fail(err, WSAENOTSOCK);
    uint64_t id = reinterpret_cast<uintptr_t>(h);
    std::shared_ptr<MemEntry> found = st->mems.Find(id);
    if (found == nullptr || found->socket != static_cast<uint64_t>(s) || found->in_flight > 0) {
      return Fail(err, WSAEINVAL);
    }
    e = st->mems.Remove(id);
  }
  return 0;  // e's RegionRef goes here: the cache keeps the region registered, idle
}

int WSPRegisterRdmaMemory(SOCKET s, PVOID buf, DWORD len, DWORD flags, LPVOID desc,
                          LPDWORD desc_len, LPINT err) {
  State* st = GetState(err);
  if (st == nullptr || err == nullptr) return SOCKET_ERROR;
  if (!FlagsValid(flags)) return Fail(err, WSAEINVAL);
  std::shared_ptr<Socket> sock = ConnectedSocket(st, s, err);
  if (sock == nullptr) return SOCKET_ERROR;
  if (desc_len == nullptr) return Fail(err, WSAEFAULT);
  if (*desc_len < kDescSize) {
    *desc_len = kDescSize;
    return Fail(err, WSAEFAULT);
  }
  if (desc == nullptr || buf == nullptr || len == 0) return Fail(err, WSAEFAULT);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(buf);
  const auto key = std::make_tuple(static_cast<uint64_t>(s), addr, size_t{len}, flags);

  std::lock_guard<std::mutex> rl(st->rdma_mu);
  {
    std::lock_guard<std::mutex> l(st->mu);
    auto it = st->rdma_index.find(key);
    if (it != st->rdma_index.end()) {
      std::shared_ptr<RdmaEntry> e = st->rdmas.Find(it->second);
      ++e->refs;
      std::memcpy(desc, e->desc, kDescSize);
      *desc_len = kDescSize;
      return 0;
    }
  }
  const uint32_t rights = ((flags & MEM_READ) ? uint32_t{kAccessRemoteRead} : 0u) |
                          ((flags & MEM_WRITE) ? uint32_t{kAccessRemoteWrite} : 0u);
  absl::StatusOr<RegionRef> pin = st->cache->Acquire(buf, len, LocalAccess(flags));
  if (!pin.ok()) {
    return Fail(err, pin.status().code() == absl::StatusCode::kInvalidArgument
                         ? WSAEFAULT
                         : WsaErrorFromStatus(pin.status()));
  }
  absl::StatusOr<Registration> reg =
      st->registrar->Register(addr, len, LocalAccess(flags) | rights);
  if (!reg.ok()) return Fail(err, WsaErrorFromStatus(reg.status()));
  auto e = std::make_shared<RdmaEntry>();
  e->socket = static_cast<uint64_t>(s);
  e->addr = addr;
  e->len = len;
  e->flags = flags;
  e->refs = 1;
  e->pin = *std::move(pin);
  e->key_reg = *reg;
  uint64_t id;
  {
    std::lock_guard<std::mutex> l(st->mu);
    id = st->rdmas.Insert(e);
  }
  absl::StatusOr<RemoteRegion> region;
  {
    std::lock_guard<std::mutex> l(sock->mu);
    region = sock->ep == nullptr ? absl::UnavailableError("closed")
                                 : sock->ep->Expose(*reg, buf, len, rights, id);
  }
  absl::Status ser = region.ok() ? region->Serialize(e->desc) : region.status();
  if (!ser.ok()) {
    {
      std::lock_guard<std::mutex> l(st->mu);
      st->rdmas.Remove(id);
    }
    (void)st->registrar->Deregister(*reg);
    return Fail(err, ser.code() == absl::StatusCode::kFailedPrecondition ? WSAEOPNOTSUPP
                                                                         : WsaErrorFromStatus(ser));
  }
  {
    std::lock_guard<std::mutex> l(st->mu);
    st->rdma_index[key] = id;
  }
  std::memcpy(desc, e->desc, kDescSize);
  *desc_len = kDescSize;
  return 0;
}

// Finds the RDMA entry a descriptor names on socket s. REQUIRES: st->mu held.
std::shared_ptr<RdmaEntry> FindRdmaLocked(State* st, SOCKET s, const void* desc) {
  absl::StatusOr<RemoteRegion> r =
      RemoteRegion::Parse({static_cast<const uint8_t*>(desc), kDescSize});
  if (!r.ok()) return nullptr;
  std::shared_ptr<RdmaEntry> e = st->rdmas.Find(r->generation);
  if (e == nullptr || e->socket != static_cast<uint64_t>(s) ||
      std::memcmp(e->desc, desc, kDescSize) != 0) {
    return nullptr;
  }
  return e;
}

int WSPDeregisterRdmaMemory(SOCKET s, LPVOID desc, DWORD desc_len, LPINT err) {
  State* st = GetState(err);
  if (st == nullptr || err == nullptr) return SOCKET_ERROR;
  if (desc == nullptr) return Fail(err, WSAEFAULT);
  if (desc_len < kDescSize) return Fail(err, WSAEINVAL);
  std::lock_guard<std::mutex> rl(st->rdma_mu);
  std::shared_ptr<RdmaEntry> e;
  {
    std::lock_guard<std::mutex> l(st->mu);
    if (st->sockets.Find(static_cast<uint64_t>(s)) == nullptr) return Fail(err, WSAENOTSOCK);
    e = FindRdmaLocked(st, s, desc);
    if (e == nullptr) return Fail(err, WSAEINVAL);
    if (--e->refs > 0) return 0;
    absl::StatusOr<RemoteRegion> r =
        RemoteRegion::Parse({static_cast<const uint8_t*>(desc), kDescSize});
    st->rdmas.Remove(r->generation);
    auto it = st->rdma_index.find({e->socket, e->addr, e->len, e->flags});
    if (it != st->rdma_index.end() && it->second == r->generation) st->rdma_index.erase(it);
  }
  // The peer loses access now: the provider revokes the key before Deregister returns. The pages
  // stay pinned and cached (the RegionRef goes back to the cache idle).
  if (!e->revoked) (void)st->registrar->Deregister(e->key_reg);
  e->pin.Reset();
  return 0;
}

int WSPMemoryRegistrationCacheCallback(LPVOID addr, SIZE_T size, LPINT err) {
  State* st = GetState(err);
  if (st == nullptr || err == nullptr) return SOCKET_ERROR;
  if (size == 0) return Fail(err, WSAEINVAL);
  const uintptr_t a = reinterpret_cast<uintptr_t>(addr);
  if (a + size < a) return Fail(err, WSAEFAULT);
  std::lock_guard<std::mutex> rl(st->rdma_mu);
  size_t dropped = 0;
  // Every cache of the process: the SPI has one.
  for (RegistrationCache* cache : {st->cache.get()}) {
    absl::StatusOr<size_t> n = cache->Invalidate(addr, size);
    if (!n.ok()) return Fail(err, WSAEFAULT);
    dropped += *n;
    cache->Flush();
  }
  // RDMA registrations on the range's pages: their keys name the old pages; revoke them now
  // (their descriptors stay registered until deregistered, and name nothing). Pages, not bytes:
  // a mapping changes a page at a time, so one sharing a page with the range loses it too (as
  // the cache's regions do).
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t lo = a & ~(page - 1);
  const uintptr_t hi = a + size > UINTPTR_MAX - page ? UINTPTR_MAX : (a + size + page - 1) & ~(page - 1);
  std::vector<std::shared_ptr<RdmaEntry>> revoke;
  {
    std::lock_guard<std::mutex> l(st->mu);
    st->rdmas.ForEach([&](uint64_t, const std::shared_ptr<RdmaEntry>& e) {
      if (!e->revoked && e->addr < hi && lo < e->addr + e->len) {
        e->revoked = true;
        revoke.push_back(e);
      }
    });
    // A later registration of the range gets a new descriptor, not the revoked one.
    for (const auto& e : revoke) st->rdma_index.erase({e->socket, e->addr, e->len, e->flags});
  }
  for (auto& e : revoke) {
    if (!st->registrar->Deregister(e->key_reg).ok()) return Fail(err, WSAEFAULT);
    ++dropped;
  }
  if (dropped == 0) return Fail(err, WSAEINVAL);
  return 0;
}

// ---- Transfers. ----

struct Op {
  Completion c;
  State* st = nullptr;
  SOCKET s = 0;
  LPWSAOVERLAPPED ov = nullptr;
  LPWPUCOMPLETEOVERLAPPEDREQUEST upcall = nullptr;
  std::shared_ptr<Socket> sock;  // keeps the endpoint alive while in flight
  uint64_t handles[Completion::kMaxSge] = {};
  std::shared_ptr<MemEntry> mems[Completion::kMaxSge];
  DWORD count = 0;
};

void OpDone(Completion* c, void* arg) {
  Op* op = static_cast<Op*>(arg);
  State* st = op->st;
  const DWORD error = static_cast<DWORD>(WsaErrorFromStatus(c->status()));
  const DWORD bytes = static_cast<DWORD>(c->bytes());
  // The registrations are let go before the completion is reported: a caller that deregisters
  // and drops the memory as soon as it sees it finds no reference left behind.
  std::shared_ptr<MemEntry> mems[Completion::kMaxSge];
  {
    std::lock_guard<std::mutex> l(st->mu);
    for (DWORD i = 0; i < op->count; ++i) {
      --op->mems[i]->in_flight;
      mems[i] = std::move(op->mems[i]);
    }
  }
  for (auto& m : mems) m.reset();
  LPWSAOVERLAPPED ov = op->ov;
  const bool polled = (reinterpret_cast<uintptr_t>(ov->hEvent) & 1) != 0;
  ov->InternalHigh = bytes;
  {
    std::lock_guard<std::mutex> l(g_done_mu);
    std::atomic_ref<ULONG_PTR>(ov->Internal).store(error, std::memory_order_release);
  }
  g_done_cv.notify_all();
  // From here on, a polling caller may free ov: only the upcall case reads it again.
  if (!polled && op->upcall != nullptr) {
    int e = 0;
    op->upcall(op->s, ov, error, bytes, &e);
  }
  delete op;
  {
    std::lock_guard<std::mutex> l(st->ops_mu);
    --st->ops;
  }
  st->ops_cv.notify_all();
}

int Rdma(bool write, SOCKET s, LPWSABUFEX bufs, DWORD count, LPVOID desc, DWORD desc_len,
         DWORD offset, LPDWORD bytes, DWORD flags, LPWSAOVERLAPPED ov,
         LPWSAOVERLAPPED_COMPLETION_ROUTINE routine, LPINT err) {
  State* st = GetState(err);
  if (st == nullptr || err == nullptr) return SOCKET_ERROR;
  if (routine != nullptr) return Fail(err, WSAEOPNOTSUPP);
  if (ov == nullptr || bufs == nullptr || desc == nullptr) return Fail(err, WSAEFAULT);
  if (count == 0 || count > Completion::kMaxSge || desc_len < kDescSize) {
    return Fail(err, WSAEINVAL);
  }
  absl::StatusOr<RemoteRegion> region =
      RemoteRegion::Parse({static_cast<const uint8_t*>(desc), kDescSize});
  if (!region.ok()) return Fail(err, WSAEINVAL);

  auto op = std::make_unique<Op>();
  Sge sg[Completion::kMaxSge];
  uint64_t total = 0;
  {
    std::lock_guard<std::mutex> l(st->mu);
    op->sock = st->sockets.Find(static_cast<uint64_t>(s));
    if (op->sock == nullptr) return Fail(err, WSAENOTSOCK);
    for (DWORD i = 0; i < count; ++i) {
      std::shared_ptr<MemEntry> m = st->mems.Find(reinterpret_cast<uintptr_t>(bufs[i].handle));
      if (m == nullptr || m->socket != static_cast<uint64_t>(s)) return Fail(err, WSAEINVAL);
      const uintptr_t b = reinterpret_cast<uintptr_t>(bufs[i].buf);
      if (bufs[i].len == 0 || b < m->addr || b + bufs[i].len < b ||
          b + bufs[i].len > m->addr + m->len) {
        return Fail(err, WSAEFAULT);
      }
      if (!write && (m->access & kAccessLocalWrite) == 0) return Fail(err, WSAEINVAL);
      sg[i] = Sge{bufs[i].buf, bufs[i].len, &m->ref.registration()};
      total += bufs[i].len;
      op->mems[i] = std::move(m);
    }
    if (total > st->options.max_rdma_size) return Fail(err, WSAEMSGSIZE);
    for (DWORD i = 0; i < count; ++i) ++op->mems[i]->in_flight;
    op->count = count;
  }
  op->st = st;
  op->s = s;
  op->ov = ov;
  op->upcall = st->upcalls.lpWPUCompleteOverlappedRequest;
  op->c.set_callback(&OpDone, op.get());
  ov->InternalHigh = 0;
  std::atomic_ref<ULONG_PTR>(ov->Internal).store(WSS_OPERATION_IN_PROGRESS);
  {
    std::lock_guard<std::mutex> l(st->ops_mu);
    ++st->ops;
  }
  Endpoint* ep;
  {
    std::lock_guard<std::mutex> l(op->sock->mu);
    ep = op->sock->ep.get();
  }
  absl::Status posted = ep == nullptr ? absl::FailedPreconditionError("not connected")
                        : write       ? ep->Write({sg, count}, *region, offset, &op->c)
                                      : ep->Read({sg, count}, *region, offset, &op->c);
  if (!posted.ok()) {
    {
      std::lock_guard<std::mutex> l(st->mu);
      for (DWORD i = 0; i < count; ++i) --op->mems[i]->in_flight;
    }
    {
      std::lock_guard<std::mutex> l(st->ops_mu);
      --st->ops;
    }
    st->ops_cv.notify_all();
    const int code = ep == nullptr ? WSAENOTCONN : WsaErrorFromStatus(posted);
    ov->Internal = static_cast<ULONG_PTR>(code);
    return Fail(err, code);
  }
  (void)op.release();  // OpDone owns it now
  if (bytes != nullptr) *bytes = 0;
  return Fail(err, WSA_IO_PENDING);
}

int WSPRdmaWrite(SOCKET s, LPWSABUFEX bufs, DWORD count, LPVOID desc, DWORD desc_len, DWORD offset,
                 LPDWORD bytes, DWORD flags, LPWSAOVERLAPPED ov,
                 LPWSAOVERLAPPED_COMPLETION_ROUTINE routine, LPWSATHREADID thread, LPINT err) {
  return Rdma(true, s, bufs, count, desc, desc_len, offset, bytes, flags, ov, routine, err);
}

int WSPRdmaRead(SOCKET s, LPWSABUFEX bufs, DWORD count, LPVOID desc, DWORD desc_len, DWORD offset,
                LPDWORD bytes, DWORD flags, LPWSAOVERLAPPED ov,
                LPWSAOVERLAPPED_COMPLETION_ROUTINE routine, LPWSATHREADID thread, LPINT err) {
  return Rdma(false, s, bufs, count, desc, desc_len, offset, bytes, flags, ov, routine, err);
}

BOOL WSPGetOverlappedResult(SOCKET s, LPWSAOVERLAPPED ov, LPDWORD bytes, BOOL wait, LPDWORD flags,
                            LPINT err) {
  State* st = GetState(err);
  if (st == nullptr || err == nullptr) return FALSE;
  if (ov == nullptr || bytes == nullptr || flags == nullptr) {
    *err = WSAEFAULT;
    return FALSE;
  }
  if (FindSocket(st, s) == nullptr) {
    *err = WSAENOTSOCK;
    return FALSE;
  }
  std::atomic_ref<ULONG_PTR> internal(ov->Internal);
  if (internal.load(std::memory_order_acquire) == WSS_OPERATION_IN_PROGRESS) {
    if (!wait) {
      *err = WSA_IO_INCOMPLETE;
      return FALSE;
    }
    std::unique_lock<std::mutex> l(g_done_mu);
    g_done_cv.wait(
        l, [&] { return internal.load(std::memory_order_acquire) != WSS_OPERATION_IN_PROGRESS; });
  }
  *bytes = static_cast<DWORD>(ov->InternalHigh);
  *flags = 0;
  const ULONG_PTR result = internal.load(std::memory_order_acquire);
  if (result != 0) {
    *err = static_cast<int>(result);
    return FALSE;
  }
  return TRUE;
}

// ---- Send / Recv over the control channel, from registered buffers. ----

// Checks every buffer lies inside a registration of socket s with `access`. REQUIRES: st->mu.
bool CoveredLocked(State* st, SOCKET s, LPWSABUF bufs, DWORD count, uint32_t access) {
  for (DWORD i = 0; i < count; ++i) {
    const uintptr_t b = reinterpret_cast<uintptr_t>(bufs[i].buf);
    const uintptr_t e = b + bufs[i].len;
    if (bufs[i].buf == nullptr || e < b) return false;
    bool found = false;
    st->mems.ForEach([&](uint64_t, const std::shared_ptr<MemEntry>& m) {
      if (!found && m->socket == static_cast<uint64_t>(s) && (m->access & access) == access &&
          m->addr <= b && e <= m->addr + m->len) {
        found = true;
      }
    });
    if (!found) return false;
  }
  return true;
}

void CompleteNow(LPWSAOVERLAPPED ov, DWORD bytes) {
  if (ov == nullptr) return;
  ov->InternalHigh = bytes;
  std::atomic_ref<ULONG_PTR>(ov->Internal).store(0, std::memory_order_release);
}

// The checks WSPSend and WSPRecv share: a started provider, no completion routine, buffers and a
// byte count to fill, a connected socket, and buffers that registrations of `s` cover with
// `access`. Returns the socket, or nullptr with *err set.
std::shared_ptr<Socket> MessageSocket(SOCKET s, LPWSABUF bufs, DWORD count, LPDWORD bytes,
                                      LPWSAOVERLAPPED_COMPLETION_ROUTINE routine, uint32_t access,
                                      LPINT err) {
  State* st = GetState(err);
  if (st == nullptr || err == nullptr) return nullptr;
  if (routine != nullptr) {
    Fail(err, WSAEOPNOTSUPP);
    return nullptr;
  }
  if (bufs == nullptr || bytes == nullptr) {
    Fail(err, WSAEFAULT);
    return nullptr;
  }
  if (count == 0) {
    Fail(err, WSAEINVAL);
    return nullptr;
  }
  std::shared_ptr<Socket> sock = ConnectedSocket(st, s, err);
  if (sock == nullptr) return nullptr;
  std::lock_guard<std::mutex> l(st->mu);
  if (!CoveredLocked(st, s, bufs, count, access)) {
    Fail(err, WSAEFAULT);
    return nullptr;
  }
  return sock;
}

int WSPSend(SOCKET s, LPWSABUF bufs, DWORD count, LPDWORD bytes_sent, DWORD flags,
            LPWSAOVERLAPPED ov, LPWSAOVERLAPPED_COMPLETION_ROUTINE routine, LPWSATHREADID thread,
            LPINT err) {
  std::shared_ptr<Socket> sock =
      MessageSocket(s, bufs, count, bytes_sent, routine, kAccessLocalRead, err);
  if (sock == nullptr) return SOCKET_ERROR;
  uint64_t total = 0;
  for (DWORD i = 0; i < count; ++i) total += bufs[i].len;
  if (total > UINT32_MAX) return Fail(err, WSAEMSGSIZE);
  std::lock_guard<std::mutex> l(sock->send_mu);
  uint32_t header = static_cast<uint32_t>(total);
  bool ok = WriteFull(sock->fd, &header, sizeof header);
  for (DWORD i = 0; ok && i < count; ++i) ok = WriteFull(sock->fd, bufs[i].buf, bufs[i].len);
  if (!ok) return Fail(err, WSAECONNRESET);
  *bytes_sent = static_cast<DWORD>(total);
  CompleteNow(ov, static_cast<DWORD>(total));
  return 0;
}

int WSPRecv(SOCKET s, LPWSABUF bufs, DWORD count, LPDWORD bytes_recvd, LPDWORD flags,
            LPWSAOVERLAPPED ov, LPWSAOVERLAPPED_COMPLETION_ROUTINE routine, LPWSATHREADID thread,
            LPINT err) {
  std::shared_ptr<Socket> sock = MessageSocket(s, bufs, count, bytes_recvd, routine,
                                               kAccessLocalRead | kAccessLocalWrite, err);
  if (sock == nullptr) return SOCKET_ERROR;
  std::lock_guard<std::mutex> l(sock->recv_mu);
  uint32_t header = 0;
  if (!ReadFull(sock->fd, &header, sizeof header)) return Fail(err, WSAECONNRESET);
  uint32_t left = header;
  uint32_t got = 0;
  for (DWORD i = 0; i < count && left > 0; ++i) {
    uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(left, bufs[i].len));
    if (!ReadFull(sock->fd, bufs[i].buf, n)) return Fail(err, WSAECONNRESET);
    left -= n;
    got += n;
  }
  char sink[4096];
  bool truncated = left > 0;
  while (left > 0) {  // the rest of a message too large for the buffers is dropped
    uint32_t n = std::min<uint32_t>(left, sizeof sink);
    if (!ReadFull(sock->fd, sink, n)) return Fail(err, WSAECONNRESET);
    left -= n;
  }
  *bytes_recvd = got;
  if (flags != nullptr) *flags = 0;
  if (truncated) return Fail(err, WSAEMSGSIZE);
  CompleteNow(ov, got);
  return 0;
}

// ---- Ioctl: the extension functions by GUID. ----

struct Extension {
  GUID guid;
  void* fn;
};

const Extension kExtensions[] = {
    {WSAID_REGISTERMEMORY, reinterpret_cast<void*>(&WSPRegisterMemory)},
    {WSAID_DEREGISTERMEMORY, reinterpret_cast<void*>(&WSPDeregisterMemory)},
    {WSAID_REGISTERRDMAMEMORY, reinterpret_cast<void*>(&WSPRegisterRdmaMemory)},
    {WSAID_DEREGISTERRDMAMEMORY, reinterpret_cast<void*>(&WSPDeregisterRdmaMemory)},
    {WSAID_RDMAWRITE, reinterpret_cast<void*>(&WSPRdmaWrite)},
    {WSAID_RDMAREAD, reinterpret_cast<void*>(&WSPRdmaRead)},
    {WSAID_MEMORYREGISTRATIONCACHECALLBACK,
     reinterpret_cast<void*>(&WSPMemoryRegistrationCacheCallback)},
};

int WSPIoctl(SOCKET s, DWORD code, LPVOID in, DWORD in_len, LPVOID out, DWORD out_len,
             LPDWORD bytes_returned, LPWSAOVERLAPPED ov, LPWSAOVERLAPPED_COMPLETION_ROUTINE routine,
             LPWSATHREADID thread, LPINT err) {
  State* st = GetState(err);
  if (st == nullptr || err == nullptr) return SOCKET_ERROR;
  if (FindSocket(st, s) == nullptr) return Fail(err, WSAENOTSOCK);
  if (code != SIO_GET_EXTENSION_FUNCTION_POINTER) return Fail(err, WSAEOPNOTSUPP);
  if (in == nullptr || in_len < sizeof(GUID) || out == nullptr || out_len < sizeof(void*)) {
    return Fail(err, WSAEFAULT);
  }
  GUID g;
  std::memcpy(&g, in, sizeof g);
  for (const Extension& e : kExtensions) {
    if (std::memcmp(&e.guid, &g, sizeof g) == 0) {
      std::memcpy(out, &e.fn, sizeof(void*));
      if (bytes_returned != nullptr) *bytes_returned = sizeof(void*);
      return 0;
    }
  }
  return Fail(err, WSAEINVAL);
}

int WSPCleanup(LPINT err);

}  // namespace

// ---- Startup and cleanup. ----

namespace {

absl::Status ApplyEnvironment(SpiOptions* o) {
  // The SPI's environment overrides, in one table (STYLE.md rule 11).
  struct Var {
    const char* name;
    std::string* value;
  };
  const Var kVars[] = {{"SANREG_FABRIC", &o->provider}};
  for (const Var& v : kVars) {
    const char* e = std::getenv(v.name);
    if (e != nullptr && *e != '\0') *v.value = e;
  }
  return absl::OkStatus();
}

int WSPCleanup(LPINT err) {
  std::unique_ptr<State> dead;
  {
    std::lock_guard<std::mutex> l(g_mu);
    if (g_state == nullptr) return Fail(err, WSANOTINITIALISED);
    if (--g_state->startups > 0) return 0;
    dead.reset(g_state);
    g_state = nullptr;
  }
  // Close every socket (transfers in flight complete with WSA_OPERATION_ABORTED), wait for the
  // completions to run, then tear down.
  std::vector<std::shared_ptr<Socket>> socks;
  {
    std::lock_guard<std::mutex> l(dead->mu);
    dead->sockets.ForEach([&](uint64_t, const std::shared_ptr<Socket>& s) { socks.push_back(s); });
  }
  for (auto& s : socks) {
    std::lock_guard<std::mutex> l(s->mu);
    if (s->listener != nullptr) s->listener->Close();
    if (s->ep != nullptr) s->ep->Close();
  }
  socks.clear();
  {
    std::unique_lock<std::mutex> l(dead->ops_mu);
    dead->ops_cv.wait(l, [&] { return dead->ops == 0; });
  }
  dead.reset();
  return 0;
}

}  // namespace

namespace internal {

CacheStats CacheStatsForTest() {
  std::lock_guard<std::mutex> l(g_mu);
  return g_state == nullptr ? CacheStats() : g_state->cache->Stats();
}

void FlushCacheForTest() {
  std::lock_guard<std::mutex> l(g_mu);
  if (g_state != nullptr) g_state->cache->Flush();
}

std::string ProviderForTest() {
  std::lock_guard<std::mutex> l(g_mu);
  return g_state == nullptr ? std::string() : g_state->fabric->provider_name();
}

size_t RdmaRegistrationsForTest() {
  std::lock_guard<std::mutex> l(g_mu);
  if (g_state == nullptr) return 0;
  std::lock_guard<std::mutex> l2(g_state->mu);
  return g_state->rdma_index.size();
}

}  // namespace internal
}  // namespace sanreg::spi

extern "C" SANREG_SPI_API int WSPStartupEx(WORD version, LPWSPDATA data, LPWSAPROTOCOL_INFOW info,
                                           LPWSPUPCALLTABLEEX upcalls, LPWSPPROC_TABLE procs) {
  using namespace sanreg;
  using namespace sanreg::spi;
  if (version != SANREG_WSP_VERSION) return WSAVERNOTSUPPORTED;
  if (procs == nullptr || upcalls == nullptr) return WSAEFAULT;
  std::lock_guard<std::mutex> l(g_mu);
  if (g_state == nullptr) {
    auto st = std::make_unique<State>();
    // The protocol info may name the provider ("tcp", "shm", "auto" in szProtocol); SANREG_FABRIC,
    // when set, overrides it.
    if (info != nullptr) {
      std::string name;
      for (size_t i = 0; i < 8 && info->szProtocol[i] != 0; ++i) {
        name.push_back(info->szProtocol[i] < 128 ? static_cast<char>(info->szProtocol[i]) : '?');
      }
      if (name == "tcp" || name == "shm" || name == "auto") st->options.provider = name;
    }
    if (!ApplyEnvironment(&st->options).ok()) return WSASYSNOTREADY;
    FabricOptions fo;
    fo.provider = st->options.provider;
    fo.apply_env = true;
    absl::StatusOr<std::unique_ptr<Fabric>> fabric = Fabric::Open(fo);
    if (!fabric.ok()) return WSASYSNOTREADY;
    st->fabric = *std::move(fabric);
    st->pin = std::make_unique<PinRegistrar>();
    st->registrar = st->fabric->NewRegistrar(st->pin.get());
    RegistrationCache::Options co;
    if (!co.ApplyEnvironment().ok()) return WSASYSNOTREADY;
    absl::StatusOr<std::unique_ptr<RegistrationCache>> cache =
        RegistrationCache::Create(st->registrar.get(), co);
    if (!cache.ok()) return WSASYSNOTREADY;
    st->cache = *std::move(cache);
    st->upcalls = *upcalls;
    g_state = st.release();
  }
  ++g_state->startups;
  if (data != nullptr) {
    std::memset(data, 0, sizeof *data);
    data->wVersion = SANREG_WSP_VERSION;
    data->wHighVersion = SANREG_WSP_VERSION;
    const char kDesc[] = "sanreg SAN provider";
    for (size_t i = 0; i + 1 < sizeof kDesc; ++i) data->szDescription[i] = kDesc[i];
  }
  *procs = WSPPROC_TABLE{
      &WSPAccept,
      &WSPAddressToString,
      &WSPAsyncSelect,
      &WSPBind,
      &WSPCancelBlockingCall,
      &WSPCleanup,
      &WSPCloseSocket,
      &WSPConnect,
      &WSPDuplicateSocket,
      &WSPEnumNetworkEvents,
      &WSPEventSelect,
      &WSPGetOverlappedResult,
      &WSPGetPeerName,
      &WSPGetSockName,
      &WSPGetSockOpt,
      &WSPGetQOSByName,
      &WSPIoctl,
      &WSPJoinLeaf,
      &WSPListen,
      &WSPRecv,
      &WSPRecvDisconnect,
      &WSPRecvFrom,
      &WSPSelect,
      &WSPSend,
      &WSPSendDisconnect,
      &WSPSendTo,
      &WSPSetSockOpt,
      &WSPShutdown,
      &WSPSocket,
      &WSPStringToAddress,
  };
  return 0;
}
