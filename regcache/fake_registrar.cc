#include "regcache/fake_registrar.h"

#include <chrono>

#include "absl/strings/str_cat.h"

namespace sanreg {

void FakeRegistrar::Spin() const {
  if (options_.latency_ns == 0) return;
  auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(options_.latency_ns);
  while (std::chrono::steady_clock::now() < until) {
  }
}

absl::StatusOr<Registration> FakeRegistrar::Register(uintptr_t addr, size_t length,
                                                     uint32_t access) {
  Spin();
  uint64_t call = register_calls_.fetch_add(1) + 1;
  uint64_t k = fail_every_.load(std::memory_order_relaxed);
  if (k != 0 && call % k == 0) {
    failures_.fetch_add(1);
    return absl::Status(options_.fail_code,
                        absl::StrCat("fake registrar: injected failure on call ", call));
  }
  std::lock_guard<std::mutex> lock(mu_);
  size_t budget = byte_budget_.load(std::memory_order_relaxed);
  if (budget != 0 && live_bytes_ + length > budget) {
    failures_.fetch_add(1);
    return absl::ResourceExhaustedError(
        absl::StrCat("fake registrar: byte budget ", budget, " exceeded"));
  }
  Registration reg;
  reg.addr = addr;
  reg.length = length;
  reg.access = access;
  reg.handle = next_handle_++;
  reg.local_key = reg.handle * 2;
  reg.remote_key = (access & (kAccessRemoteRead | kAccessRemoteWrite)) ? reg.handle * 2 + 1 : 0;
  live_.emplace(reg.handle, reg);
  live_bytes_ += length;
  registrations_.fetch_add(1);
  return reg;
}

absl::Status FakeRegistrar::Deregister(const Registration& reg) {
  Spin();
  std::lock_guard<std::mutex> lock(mu_);
  auto it = live_.find(reg.handle);
  if (it == live_.end() || it->second.addr != reg.addr || it->second.length != reg.length) {
    bad_deregistrations_.fetch_add(1);
    return absl::InvalidArgumentError("fake registrar: deregistering an unknown registration");
  }
  live_bytes_ -= it->second.length;
  live_.erase(it);
  deregistrations_.fetch_add(1);
  return absl::OkStatus();
}

size_t FakeRegistrar::live_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return live_bytes_;
}

size_t FakeRegistrar::live_registrations() const {
  std::lock_guard<std::mutex> lock(mu_);
  return live_.size();
}

bool FakeRegistrar::IsRegistered(uintptr_t addr, size_t length) const {
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [h, r] : live_) {
    if (r.addr < addr + length && r.addr + r.length > addr) return true;
  }
  return false;
}

}  // namespace sanreg
