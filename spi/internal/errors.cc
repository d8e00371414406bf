#include "spi/internal/errors.h"

#include "spi/ws2san.h"

namespace sanreg::spi::internal {
namespace {

struct Entry {
  absl::StatusCode code;
  int wsa;
};

constexpr Entry kTable[] = {
    {absl::StatusCode::kOk, 0},
    {absl::StatusCode::kInvalidArgument, WSAEINVAL},
    {absl::StatusCode::kFailedPrecondition, WSAEINVAL},
    {absl::StatusCode::kOutOfRange, WSAEFAULT},
    {absl::StatusCode::kPermissionDenied, WSAEFAULT},
    {absl::StatusCode::kResourceExhausted, WSAENOBUFS},
    {absl::StatusCode::kUnavailable, WSAECONNRESET},
    {absl::StatusCode::kCancelled, WSA_OPERATION_ABORTED},
    {absl::StatusCode::kDeadlineExceeded, WSAECONNABORTED},
    {absl::StatusCode::kAborted, WSAECONNABORTED},
    {absl::StatusCode::kNotFound, WSASYSNOTREADY},
    {absl::StatusCode::kAlreadyExists, WSAEADDRINUSE},
    {absl::StatusCode::kUnimplemented, WSAEOPNOTSUPP},
};

}  // namespace

int WsaErrorFromStatus(const absl::Status& status) {
  for (const Entry& e : kTable) {
    if (e.code == status.code()) return e.wsa;
  }
  return WSAENETDOWN;
}

}  // namespace sanreg::spi::internal
