// socket.h: the plain TCP sockets of the out-of-band channel (address exchange, liveness, wake-up).
//
// Thread-safety: free functions on caller-owned descriptors.

#ifndef SANREG_DATAPATH_INTERNAL_SOCKET_H_
#define SANREG_DATAPATH_INTERNAL_SOCKET_H_

#include <netinet/in.h>
#include <sys/socket.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace sanreg::internal {

// Parses "a.b.c.d:port" (IPv4; a name is resolved). Returns kInvalidArgument when it cannot.
absl::StatusOr<sockaddr_in> ParseHostPort(absl::string_view host_port);
std::string FormatHostPort(const sockaddr_in& a);

// True when `addr` is this host: 0.0.0.0, 127.0.0.0/8, or an IPv4 address of one of its
// interfaces (in this network namespace).
bool IsLocalAddress(const sockaddr_in& addr);

// A listening socket bound to `addr`. Returns the descriptor.
absl::StatusOr<int> ListenOn(const sockaddr_in& addr);
// A socket connected to `addr` within `timeout`.
absl::StatusOr<int> ConnectTo(const sockaddr_in& addr, absl::Duration timeout);

// Sends / receives exactly `len` bytes before `deadline`. kUnavailable on EOF, error or timeout.
absl::Status SendAll(int fd, const void* buf, size_t len, absl::Time deadline);
absl::Status RecvAll(int fd, void* buf, size_t len, absl::Time deadline);

// 64 random bits from getrandom.
uint64_t RandomU64();

}  // namespace sanreg::internal

#endif  // SANREG_DATAPATH_INTERNAL_SOCKET_H_
