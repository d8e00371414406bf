// endpoint_registry.h: the endpoints a fabric's progress thread serves, for both backends.
//
// A connection's endpoint is added when it opens and removed when it fails or closes (Fail). The
// progress thread works on a snapshot, refreshed only when the set has changed: an unchanged set
// costs it one atomic load per pass and no lock, so a spinning progress thread never contends
// with a connecting or closing thread on every pass.
//
// Thread-safety: every member from any thread. Snapshot's output belongs to its caller (the
// progress thread); the shared_ptrs in it keep the endpoints alive until it is refreshed.

#ifndef SANREG_DATAPATH_INTERNAL_ENDPOINT_REGISTRY_H_
#define SANREG_DATAPATH_INTERNAL_ENDPOINT_REGISTRY_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"

namespace sanreg::internal {

template <typename Ep>
class EndpointRegistry {
 public:
  void Add(std::shared_ptr<Ep> ep) {
    std::lock_guard<std::mutex> l(mu_);
    endpoints_.push_back(std::move(ep));
    version_.fetch_add(1, std::memory_order_release);
  }

  // Removes `ep` if it is there (Fail may run more than once on the way to closing).
  void Remove(const Ep* ep) {
    std::lock_guard<std::mutex> l(mu_);
    auto it = std::find_if(endpoints_.begin(), endpoints_.end(),
                           [ep](const std::shared_ptr<Ep>& e) { return e.get() == ep; });
    if (it == endpoints_.end()) return;
    endpoints_.erase(it);
    version_.fetch_add(1, std::memory_order_release);
  }

  // Drops every endpoint (the fabric's destructor, after its progress thread has stopped). They
  // are released outside the lock: a last reference runs the endpoint's destructor, which removes
  // it from here.
  void Clear() {
    std::vector<std::shared_ptr<Ep>> gone;
    {
      std::lock_guard<std::mutex> l(mu_);
      gone.swap(endpoints_);
      version_.fetch_add(1, std::memory_order_release);
    }
  }

  // Copies the set into `*snap` when it has changed since the version in `*seen` (start with
  // kNever), and updates `*seen`. Returns whether it copied.
  bool Snapshot(uint64_t* seen, std::vector<std::shared_ptr<Ep>>* snap) {
    if (version_.load(std::memory_order_acquire) == *seen) return false;
    std::lock_guard<std::mutex> l(mu_);
    *seen = version_.load(std::memory_order_relaxed);
    *snap = endpoints_;
    return true;
  }

  static constexpr uint64_t kNever = ~uint64_t{0};

 private:
  std::mutex mu_;
  std::vector<std::shared_ptr<Ep>> endpoints_ ABSL_GUARDED_BY(mu_);
  std::atomic<uint64_t> version_{0};  // changed under mu_
};

}  // namespace sanreg::internal

#endif  // SANREG_DATAPATH_INTERNAL_ENDPOINT_REGISTRY_H_
