// failing_registrar.h: a Registrar wrapper for fault injection tests: it passes every call through
// to another registrar, except the ones it is told to fail, and checks how its callers use it.
//
// Calls are numbered from 1, Register and Deregister together, in the order they arrive. A failed
// Register returns the injected code without calling through (nothing is registered). A failed
// Deregister calls through first and then reports the failure: that is what a backend whose
// release step fails does (LibfabricRegistrar unpins and frees its record even when fi_close of
// the provider registration fails), so the caller must count it and never deregister again.
//
// It tracks the live registrations by handle: a Deregister of one that is not live (double or
// forged) is counted in bad_deregistrations() and not passed on.
//
// Thread-safety: every method may be called from any thread (one mutex).

#ifndef SANREG_TESTS_FAILING_REGISTRAR_H_
#define SANREG_TESTS_FAILING_REGISTRAR_H_

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "regcache/registrar.h"

namespace sanreg::testing {

class FailingRegistrar : public Registrar {
 public:
  // REQUIRES: `inner` outlives this registrar.
  explicit FailingRegistrar(Registrar* inner) : inner_(inner) {}

  // The k-th call from now on (counting from 1) fails with `code`; 0 fails none.
  void FailCall(uint64_t k, absl::StatusCode code) {
    std::lock_guard<std::mutex> l(mu_);
    fail_at_ = k == 0 ? 0 : calls_ + k;
    code_ = code;
  }
  // Every n-th call from now on fails with `code` (n = 0: none). Independent of FailCall.
  void FailEvery(uint64_t n, absl::StatusCode code) {
    std::lock_guard<std::mutex> l(mu_);
    every_ = n;
    every_base_ = calls_;
    every_code_ = code;
  }

  absl::StatusOr<Registration> Register(uintptr_t addr, size_t length, uint32_t access) override {
    absl::StatusCode code;
    {
      std::lock_guard<std::mutex> l(mu_);
      code = NextLocked();
      ++register_calls_;
      if (code != absl::StatusCode::kOk) ++injected_register_;
    }
    if (code != absl::StatusCode::kOk) return absl::Status(code, "injected Register failure");
    absl::StatusOr<Registration> r = inner_->Register(addr, length, access);
    if (r.ok()) {
      std::lock_guard<std::mutex> l(mu_);
      live_.insert({r->handle, r->addr});
      live_bytes_ += r->length;
    }
    return r;
  }

  absl::Status Deregister(const Registration& reg) override {
    absl::StatusCode code;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (live_.erase({reg.handle, reg.addr}) == 0) {
        ++bad_deregistrations_;
        return absl::FailedPreconditionError("not a live registration");
      }
      live_bytes_ -= reg.length;
      code = NextLocked();
      ++deregister_calls_;
      if (code != absl::StatusCode::kOk) ++injected_deregister_;
    }
    absl::Status s = inner_->Deregister(reg);
    if (code != absl::StatusCode::kOk) return absl::Status(code, "injected Deregister failure");
    return s;
  }

  absl::Status VerifyPages(const Registration& reg) override { return inner_->VerifyPages(reg); }

  uint64_t calls() const { return Get(calls_); }
  uint64_t register_calls() const { return Get(register_calls_); }
  uint64_t deregister_calls() const { return Get(deregister_calls_); }
  uint64_t injected_register() const { return Get(injected_register_); }
  uint64_t injected_deregister() const { return Get(injected_deregister_); }
  uint64_t injected() const { return injected_register() + injected_deregister(); }
  uint64_t bad_deregistrations() const { return Get(bad_deregistrations_); }
  size_t live_registrations() const {
    std::lock_guard<std::mutex> l(mu_);
    return live_.size();
  }
  size_t live_bytes() const { return Get(live_bytes_); }

 private:
  // Numbers the next call; returns the code it must fail with (kOk: none).
  absl::StatusCode NextLocked() {
    const uint64_t n = ++calls_;
    if (n == fail_at_) return code_;
    if (every_ != 0 && (n - every_base_) % every_ == 0) return every_code_;
    return absl::StatusCode::kOk;
  }
  template <typename T>
  T Get(const T& v) const {
    std::lock_guard<std::mutex> l(mu_);
    return v;
  }

  Registrar* const inner_;
  mutable std::mutex mu_;
  uint64_t calls_ = 0;  // everything below guarded by mu_
  uint64_t fail_at_ = 0;
  absl::StatusCode code_ = absl::StatusCode::kInternal;
  uint64_t every_ = 0;
  uint64_t every_base_ = 0;
  absl::StatusCode every_code_ = absl::StatusCode::kInternal;
  uint64_t register_calls_ = 0;
  uint64_t deregister_calls_ = 0;
  uint64_t injected_register_ = 0;
  uint64_t injected_deregister_ = 0;
  uint64_t bad_deregistrations_ = 0;
  size_t live_bytes_ = 0;
  std::set<std::pair<uintptr_t, uintptr_t>> live_;  // {handle, addr}
};

}  // namespace sanreg::testing

#endif  // SANREG_TESTS_FAILING_REGISTRAR_H_
