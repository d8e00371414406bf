// errors.h: the one table mapping absl::StatusCode to Winsock error values (STYLE.md rule 5).
//
// Thread-safety: pure functions.

#ifndef SANREG_SPI_INTERNAL_ERRORS_H_
#define SANREG_SPI_INTERNAL_ERRORS_H_

#include "absl/status/status.h"

namespace sanreg::spi::internal {

// The Winsock error for `status`; 0 for OK.
//   kInvalidArgument, kFailedPrecondition -> WSAEINVAL   (bad input, misuse)
//   kOutOfRange, kPermissionDenied        -> WSAEFAULT   (memory not wholly valid / accessible)
//   kResourceExhausted                    -> WSAENOBUFS
//   kUnavailable                          -> WSAECONNRESET (the peer or the connection is gone)
//   kCancelled                            -> WSA_OPERATION_ABORTED (this side closed)
//   kDeadlineExceeded, kAborted           -> WSAECONNABORTED
//   kNotFound                             -> WSASYSNOTREADY (no such fabric provider)
//   kAlreadyExists                        -> WSAEADDRINUSE
//   kUnimplemented                        -> WSAEOPNOTSUPP
//   anything else                         -> WSAENETDOWN
int WsaErrorFromStatus(const absl::Status& status);

}  // namespace sanreg::spi::internal

#endif  // SANREG_SPI_INTERNAL_ERRORS_H_
