// liveness.h: learning that a peer process on this host died by reading one word, no system call.
//
// Why: on shm (libfabric 1.17), a post to a peer that died while holding its region's spinlock
// spins forever inside the provider, so every post first asks whether the peer is gone. A poll(2)
// of the out-of-band socket answers, but costs a system call per post (2-3 us on a paravirtualized
// VM, more than half of a 4 KiB shm write). This answers from shared memory instead.
//
// How: a fabric's progress thread holds a process-shared robust mutex in a one-page /dev/shm
// segment (a beacon) for the fabric's life. When that thread dies, SIGKILL included, the kernel
// marks the mutex's futex word FUTEX_OWNER_DIED while tearing down the process's memory, before it
// closes the process's sockets; when the fabric closes, the thread unlocks it (word 0). A peer maps
// the segment read-only and reads the word: owner bits set and no OWNER_DIED means alive.
//
// Thread-safety: LivenessBeacon::Hold and Release on the one thread that keeps it; Gone() from any
// thread.

#ifndef SANREG_DATAPATH_LIBFABRIC_LIVENESS_H_
#define SANREG_DATAPATH_LIBFABRIC_LIVENESS_H_

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace sanreg::internal {

class LivenessBeacon {
 public:
  // Creates the segment /dev/shm/<name> (which must not exist) with an unlocked robust mutex.
  static absl::StatusOr<std::unique_ptr<LivenessBeacon>> Create(const std::string& name);
  ~LivenessBeacon();  // unmaps; the creating process also removes the segment
  LivenessBeacon(const LivenessBeacon&) = delete;
  LivenessBeacon& operator=(const LivenessBeacon&) = delete;

  void Hold();     // locks the mutex on the calling thread, which then keeps it
  void Release();  // unlocks it (the same thread)

 private:
  LivenessBeacon(std::string name, void* page) : name_(std::move(name)), page_(page) {}
  std::string name_;
  void* page_;
  pid_t creator_ = 0;
};

class LivenessWatch {
 public:
  // Maps a peer's beacon read-only. Null when there is none by that name (a peer that does not
  // publish one: callers fall back to the socket).
  static std::unique_ptr<LivenessWatch> Open(const std::string& name);
  ~LivenessWatch();
  LivenessWatch(const LivenessWatch&) = delete;
  LivenessWatch& operator=(const LivenessWatch&) = delete;

  // True once the holder died or released the beacon.
  bool Gone() const;

 private:
  explicit LivenessWatch(const void* page) : page_(page) {}
  const void* page_;
};

// The beacon's name for a fabric whose shm endpoint names are "<prefix>-<n>": "<prefix>-alive".
// Empty when `endpoint_name` is not of that form.
std::string BeaconNameFor(const std::string& endpoint_name);

}  // namespace sanreg::internal

#endif  // SANREG_DATAPATH_LIBFABRIC_LIVENESS_H_
