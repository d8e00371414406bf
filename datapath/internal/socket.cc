#include "datapath/internal/socket.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <netdb.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/random.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace sanreg::internal {
namespace {

int MillisUntil(absl::Time deadline) {
  absl::Duration left = deadline - absl::Now();
  if (left <= absl::ZeroDuration()) return 0;
  return static_cast<int>(absl::ToInt64Milliseconds(left)) + 1;
}

absl::Status WaitFor(int fd, short events, absl::Time deadline) {
  for (;;) {
    pollfd p = {fd, events, 0};
    int n = poll(&p, 1, MillisUntil(deadline));
    if (n > 0) return absl::OkStatus();
    if (n == 0) return absl::UnavailableError("out-of-band socket timed out");
    if (errno != EINTR) return absl::UnavailableError(absl::StrCat("poll: ", strerror(errno)));
  }
}

}  // namespace

bool IsLocalAddress(const sockaddr_in& addr) {
  const uint32_t a = ntohl(addr.sin_addr.s_addr);
  if (a == INADDR_ANY || (a >> 24) == 127) return true;
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) return false;
  bool found = false;
  for (ifaddrs* i = list; i != nullptr && !found; i = i->ifa_next) {
    if (i->ifa_addr == nullptr || i->ifa_addr->sa_family != AF_INET) continue;
    found = reinterpret_cast<const sockaddr_in*>(i->ifa_addr)->sin_addr.s_addr ==
            addr.sin_addr.s_addr;
  }
  freeifaddrs(list);
  return found;
}

absl::StatusOr<sockaddr_in> ParseHostPort(absl::string_view host_port) {
  size_t colon = host_port.rfind(':');
  if (colon == absl::string_view::npos || colon == 0) {
    return absl::InvalidArgumentError(absl::StrCat("not host:port: ", host_port));
  }
  std::string host(host_port.substr(0, colon));
  uint32_t port = 0;
  if (!absl::SimpleAtoi(host_port.substr(colon + 1), &port) || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("bad port in ", host_port));
  }
  sockaddr_in a = {};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  if (inet_pton(AF_INET, host.c_str(), &a.sin_addr) == 1) return a;
  addrinfo hints = {};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), nullptr, &hints, &res) != 0 || res == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("cannot resolve ", host));
  }
  a.sin_addr = reinterpret_cast<sockaddr_in*>(res->ai_addr)->sin_addr;
  freeaddrinfo(res);
  return a;
}

std::string FormatHostPort(const sockaddr_in& a) {
  char buf[INET_ADDRSTRLEN] = {};
  inet_ntop(AF_INET, &a.sin_addr, buf, sizeof buf);
  return absl::StrCat(buf, ":", ntohs(a.sin_port));
}

absl::StatusOr<int> ListenOn(const sockaddr_in& addr) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::UnavailableError(absl::StrCat("socket: ", strerror(errno)));
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0 || listen(fd, 64) != 0) {
    absl::Status s = absl::UnavailableError(
        absl::StrCat("bind/listen ", FormatHostPort(addr), ": ", strerror(errno)));
    close(fd);
    return s;
  }
  return fd;
}

absl::StatusOr<int> ConnectTo(const sockaddr_in& addr, absl::Duration timeout) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return absl::UnavailableError(absl::StrCat("socket: ", strerror(errno)));
  int rc = connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
  if (rc != 0 && errno == EINPROGRESS) {
    absl::Status s = WaitFor(fd, POLLOUT, absl::Now() + timeout);
    int err = 0;
    socklen_t len = sizeof err;
    if (s.ok()) getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (!s.ok() || err != 0) {
      close(fd);
      return absl::UnavailableError(
          absl::StrCat("connect ", FormatHostPort(addr), ": ", s.ok() ? strerror(err) : "timeout"));
    }
  } else if (rc != 0) {
    absl::Status s = absl::UnavailableError(
        absl::StrCat("connect ", FormatHostPort(addr), ": ", strerror(errno)));
    close(fd);
    return s;
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}

absl::Status SendAll(int fd, const void* buf, size_t len, absl::Time deadline) {
  const char* p = static_cast<const char*>(buf);
  while (len > 0) {
    ssize_t n = send(fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      p += n;
      len -= static_cast<size_t>(n);
    } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
      absl::Status s = WaitFor(fd, POLLOUT, deadline);
      if (!s.ok()) return s;
    } else {
      return absl::UnavailableError(absl::StrCat("send: ", strerror(errno)));
    }
  }
  return absl::OkStatus();
}

absl::Status RecvAll(int fd, void* buf, size_t len, absl::Time deadline) {
  char* p = static_cast<char*>(buf);
  while (len > 0) {
    ssize_t n = recv(fd, p, len, MSG_DONTWAIT);
    if (n > 0) {
      p += n;
      len -= static_cast<size_t>(n);
    } else if (n == 0) {
      return absl::UnavailableError("peer closed the out-of-band socket");
    } else if (errno == EAGAIN || errno == EINTR) {
      absl::Status s = WaitFor(fd, POLLIN, deadline);
      if (!s.ok()) return s;
    } else {
      return absl::UnavailableError(absl::StrCat("recv: ", strerror(errno)));
    }
  }
  return absl::OkStatus();
}

uint64_t RandomU64() {
  uint64_t v = 0;
  size_t got = 0;
  while (got < sizeof v) {
    ssize_t n = getrandom(reinterpret_cast<char*>(&v) + got, sizeof v - got, 0);
    if (n > 0) got += static_cast<size_t>(n);
  }
  return v;
}

}  // namespace sanreg::internal
