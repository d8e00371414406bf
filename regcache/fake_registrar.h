// fake_registrar.h: a counting, fault-injecting Registrar for tests (testonly).
//
// It touches no memory: Register records the range and hands out fresh keys. Faults: every k-th
// Register call fails, a byte budget past which Register fails with kResourceExhausted, and a
// busy-wait latency per call (to model a NIC's registration cost without sleeping).
//
// Thread-safety: every method may be called from any thread.

#ifndef SANREG_REGCACHE_FAKE_REGISTRAR_H_
#define SANREG_REGCACHE_FAKE_REGISTRAR_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <unordered_map>

#include "absl/status/status.h"
#include "regcache/registrar.h"

namespace sanreg {

class FakeRegistrar : public Registrar {
 public:
  struct Options {
    uint64_t fail_every = 0;  // 0: never; k: the k-th, 2k-th, ... Register calls fail
    absl::StatusCode fail_code = absl::StatusCode::kResourceExhausted;
    size_t byte_budget = 0;   // 0: unlimited; else live bytes may not exceed it
    uint64_t latency_ns = 0;  // busy-wait per Register and Deregister
  };

  FakeRegistrar() : FakeRegistrar(Options()) {}
  explicit FakeRegistrar(const Options& options) : options_(options) {}

  absl::StatusOr<Registration> Register(uintptr_t addr, size_t length, uint32_t access) override;
  absl::Status Deregister(const Registration& reg) override;

  // Changes the faults; takes effect on the next call.
  void set_fail_every(uint64_t k) { fail_every_.store(k, std::memory_order_relaxed); }
  void set_byte_budget(size_t b) { byte_budget_.store(b, std::memory_order_relaxed); }

  uint64_t register_calls() const { return register_calls_.load(); }
  uint64_t registrations() const { return registrations_.load(); }
  uint64_t deregistrations() const { return deregistrations_.load(); }
  uint64_t failures() const { return failures_.load(); }
  size_t live_bytes() const;
  size_t live_registrations() const;
  // Deregister calls naming a registration that was not live (double or forged deregistration).
  uint64_t bad_deregistrations() const { return bad_deregistrations_.load(); }
  // True when some live registration overlaps [addr, addr + length).
  bool IsRegistered(uintptr_t addr, size_t length) const;

 private:
  void Spin() const;

  const Options options_;
  std::atomic<uint64_t> fail_every_{options_.fail_every};
  std::atomic<size_t> byte_budget_{options_.byte_budget};
  std::atomic<uint64_t> register_calls_{0};
  std::atomic<uint64_t> registrations_{0};
  std::atomic<uint64_t> deregistrations_{0};
  std::atomic<uint64_t> failures_{0};
  std::atomic<uint64_t> bad_deregistrations_{0};
  mutable std::mutex mu_;
  uint64_t next_handle_ = 1;                          // guarded by mu_
  size_t live_bytes_ = 0;                             // guarded by mu_
  std::unordered_map<uintptr_t, Registration> live_;  // by handle, guarded by mu_
};

}  // namespace sanreg

#endif  // SANREG_REGCACHE_FAKE_REGISTRAR_H_
