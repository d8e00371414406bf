// completion.h: a caller-owned record of one Write or Read, and the scatter-gather entry type.
//
// A Completion plays the part of an OVERLAPPED: the caller owns it, hands it to Endpoint::Write or
// Endpoint::Read, and it holds everything the operation needs while in flight (so posting allocates
// nothing). When the operation ends, the completing thread (the fabric's progress thread, or a
// thread in Endpoint::Poll) stores the result, marks it done, then runs the callback if one is set.
//
// Thread-safety: Done/status/bytes/Wait may be called from any thread. Reset only while not in
// flight.
// Invariants:
//   1. A Completion is in flight from a successful Write/Read until Done() turns true; it must not be
//      moved, reused or destroyed meanwhile.
//   2. Once Done() is true the library never touches the Completion again, except to run the
//      callback, whose pointer and argument it read before marking it done. With a callback set, the
//      callback (not Wait) decides when the Completion may be freed.

#ifndef SANREG_DATAPATH_COMPLETION_H_
#define SANREG_DATAPATH_COMPLETION_H_

#include <sys/uio.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "regcache/registrar.h"

namespace sanreg {

namespace internal {
struct OpList;
class EndpointBackend;
class EndpointCore;
class VerbsEndpoint;
}  // namespace internal

// One local buffer of a scatter-gather list: [addr, addr + length) inside `reg`.
struct Sge {
  void* addr = nullptr;
  size_t length = 0;
  const Registration* reg = nullptr;  // from the fabric's registrar; must cover the buffer
};

class Completion {
 public:
  // Runs on the completing thread, after Done() is true. May free the Completion.
  using Callback = void (*)(Completion* c, void* arg);

  static constexpr size_t kMaxSge = 4;  // the most entries one operation takes

  Completion() = default;
  Completion(Callback cb, void* arg) : callback_(cb), arg_(arg) {}
  Completion(const Completion&) = delete;
  Completion& operator=(const Completion&) = delete;

  // Prepares a finished (or never started) Completion for another operation.
  // REQUIRES: not in flight.
  void Reset() {
    done_.store(false, std::memory_order_relaxed);
    status_ = absl::OkStatus();
    bytes_ = 0;
  }
  void set_callback(Callback cb, void* arg) {
    callback_ = cb;
    arg_ = arg;
  }

  // True once the operation ended; status() and bytes() are then final.
  bool Done() const { return done_.load(std::memory_order_acquire); }

  // Blocks until Done(). First drives the operation's endpoint from the calling thread (as
  // Endpoint::Poll does) for up to 1 ms, then sleeps while the fabric's progress thread drives it.
  // REQUIRES: the Fabric is not destroyed before Wait returns.
  void Wait();

  // OK, or why the operation failed (see endpoint.h for the codes). REQUIRES: Done().
  const absl::Status& status() const { return status_; }
  // Bytes moved: the whole length on success, 0 on failure. REQUIRES: Done().
  size_t bytes() const { return bytes_; }

 private:
  friend class internal::EndpointCore;
  friend class internal::VerbsEndpoint;
  friend struct internal::OpList;

  Callback callback_ = nullptr;
  void* arg_ = nullptr;
  std::atomic<bool> done_{false};
  absl::Status status_;
  size_t bytes_ = 0;

  // Operation state while in flight, owned by the endpoint (no libfabric or verbs types here).
  internal::EndpointBackend* core_ = nullptr;
  // libfabric: the endpoint of the last operation, for Wait to drive; a weak reference, so that a
  // Wait that races the endpoint's destruction finds it gone instead of freed. Empty on verbs
  // (its progress thread drives the endpoint).
  std::weak_ptr<internal::EndpointCore> owner_;
  Completion* prev_ = nullptr;  // the endpoint's in-flight or queued list
  Completion* next_ = nullptr;
  bool is_write_ = false;
  bool posted_ = false;  // handed to the provider (else queued)
  uint8_t iov_count_ = 0;
  int64_t posted_ns_ = 0;  // monotonic time it was accepted, for the operation deadline
  size_t total_ = 0;
  uint64_t remote_addr_ = 0;
  uint64_t remote_key_ = 0;
  struct iovec iov_[kMaxSge] = {};
  void* desc_[kMaxSge] = {};
};

}  // namespace sanreg

#endif  // SANREG_DATAPATH_COMPLETION_H_
