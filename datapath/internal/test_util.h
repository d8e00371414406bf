// test_util.h: helpers for the datapath tests: a connected pair of endpoints and registered buffers.
//
// Thread-safety: test code, one thread per helper object.

#ifndef SANREG_DATAPATH_INTERNAL_TEST_UTIL_H_
#define SANREG_DATAPATH_INTERNAL_TEST_UTIL_H_

#include <sys/mman.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "datapath/endpoint.h"
#include "datapath/fabric.h"
#include "regcache/registrar.h"

namespace sanreg::testing {

// Page-aligned anonymous memory registered through `registrar` (deregistered on destruction).
class Buffer {
 public:
  static absl::StatusOr<std::unique_ptr<Buffer>> Make(Registrar* registrar, size_t size,
                                                      uint32_t access) {
    size_t mapped = (size + 4095) & ~size_t{4095};
    void* p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return absl::ResourceExhaustedError("mmap");
    auto b = std::unique_ptr<Buffer>(new Buffer(registrar, static_cast<uint8_t*>(p), size, mapped));
    absl::StatusOr<Registration> reg =
        registrar->Register(reinterpret_cast<uintptr_t>(p), size, access);
    if (!reg.ok()) return reg.status();
    b->reg_ = *reg;
    b->registered_ = true;
    return b;
  }
  ~Buffer() {
    Deregister();
    munmap(data_, mapped_);
  }
  void Deregister() {
    if (registered_) (void)registrar_->Deregister(reg_);
    registered_ = false;
  }
  uint8_t* data() { return data_; }
  size_t size() const { return size_; }
  const Registration& reg() const { return reg_; }
  Sge sge(size_t offset, size_t length) { return Sge{data_ + offset, length, &reg_}; }
  Sge sge() { return sge(0, size_); }
  // Fills with a pattern that depends on `seed` and the position.
  void Fill(uint32_t seed) {
    for (size_t i = 0; i < size_; ++i) data_[i] = Pattern(seed, i);
  }
  static uint8_t Pattern(uint32_t seed, size_t i) {
    return static_cast<uint8_t>((i * 2654435761u + seed * 40503u + (i >> 8)) >> 3);
  }

 private:
  Buffer(Registrar* r, uint8_t* p, size_t size, size_t mapped)
      : registrar_(r), data_(p), size_(size), mapped_(mapped) {}
  Registrar* registrar_;
  uint8_t* data_;
  size_t size_;
  size_t mapped_;
  Registration reg_;
  bool registered_ = false;
};

// Two fabrics in this process, connected over loopback: `initiator` connects to `target`.
struct ConnectedPair {
  std::unique_ptr<Fabric> initiator_fabric;
  std::unique_ptr<Fabric> target_fabric;
  std::unique_ptr<Endpoint> initiator;
  std::unique_ptr<Endpoint> target;

  static absl::StatusOr<ConnectedPair> Make(const FabricOptions& options) {
    return Make(options, options);
  }
  // The initiator's fabric opened with `initiator`, the target's with `target`.
  static absl::StatusOr<ConnectedPair> Make(const FabricOptions& initiator,
                                            const FabricOptions& target) {
    ConnectedPair p;
    absl::StatusOr<std::unique_ptr<Fabric>> f = Fabric::Open(initiator);
    if (!f.ok()) return f.status();
    p.initiator_fabric = *std::move(f);
    f = Fabric::Open(target);
    if (!f.ok()) return f.status();
    p.target_fabric = *std::move(f);
    absl::Status s = p.Connect();
    if (!s.ok()) return s;
    return p;
  }

  // Another connection between the same two fabrics.
  absl::Status Connect() {
    absl::StatusOr<std::unique_ptr<Listener>> l = target_fabric->Listen("127.0.0.1:0");
    if (!l.ok()) return l.status();
    absl::StatusOr<std::unique_ptr<Endpoint>> accepted;
    std::thread t([&] { accepted = (*l)->Accept(); });
    absl::StatusOr<std::unique_ptr<Endpoint>> connected =
        initiator_fabric->Connect((*l)->address());
    t.join();
    if (!connected.ok()) return connected.status();
    if (!accepted.ok()) return accepted.status();
    initiator = *std::move(connected);
    target = *std::move(accepted);
    return absl::OkStatus();
  }

  ~ConnectedPair() {
    initiator.reset();
    target.reset();
  }
  ConnectedPair() = default;
  ConnectedPair(ConnectedPair&&) = default;
  ConnectedPair& operator=(ConnectedPair&&) = default;
};

}  // namespace sanreg::testing

#endif  // SANREG_DATAPATH_INTERNAL_TEST_UTIL_H_
