// poll_lock.h: PollLock, the lock around an endpoint's completion queue: the spinning progress
// thread and a caller that drives its endpoint try to take it on every pass, and whoever finds it
// taken leaves the queue to the holder; only closing the endpoint waits for it.
//
// Why not std::mutex: an empty pass of a spinning thread is a completion queue read (on shm
// about 160 instructions), and glibc's try_lock and unlock added about 85 more, with two locked
// instructions (callgrind). Here a try takes one exchange (none when the lock is seen taken) and
// the release is a plain store on x86: 6 ns a pair against 15 in a loop on this project's
// machine, where a locked instruction costs about 6 ns. A pass's cost is how late the spinning
// thread sees what arrived.
//
// Thread-safety: any thread. Not recursive, not fair. lock() yields the core between tries, so it
// is for holders that keep the lock briefly (a queue read), as here; an endpoint's Fail holds it
// across fi_close, while the other threads only try it.

#ifndef SANREG_DATAPATH_INTERNAL_POLL_LOCK_H_
#define SANREG_DATAPATH_INTERNAL_POLL_LOCK_H_

#include <sched.h>

#include <atomic>

#include "absl/base/thread_annotations.h"

namespace sanreg::internal {

class ABSL_LOCKABLE PollLock {
 public:
  PollLock() = default;
  PollLock(const PollLock&) = delete;
  PollLock& operator=(const PollLock&) = delete;

  // Takes the lock if it is free. Returns whether it did.
  bool try_lock() ABSL_EXCLUSIVE_TRYLOCK_FUNCTION(true) {
    // Read first: a thread that finds it taken writes nothing, so it does not pull the line away
    // from the holder.
    return !held_.load(std::memory_order_relaxed) &&
           !held_.exchange(true, std::memory_order_acquire);
  }
  // Takes the lock, yielding the core while another thread holds it.
  void lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() {
    while (!try_lock()) sched_yield();
  }
  // REQUIRES: held by the calling thread.
  void unlock() ABSL_UNLOCK_FUNCTION() { held_.store(false, std::memory_order_release); }

 private:
  std::atomic<bool> held_{false};
};

}  // namespace sanreg::internal

#endif  // SANREG_DATAPATH_INTERNAL_POLL_LOCK_H_
