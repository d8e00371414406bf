// registrar_fault_test.cc: fault injection at every registrar call, and the memlock limit.
//
// Every registrar call: a fixed workload of acquisitions (misses, rights misses, merges, hits),
// transfers from the acquired buffers (loopback tcp, data verified), explicit invalidations,
// evictions past a region limit, flushes and the cache's destruction runs once with no fault to
// count its registrar calls (N), then N more times with call k failed, for each k in 1..N, under
// three registrar stacks:
//   kCache:           cache -> FailingRegistrar -> PinRegistrar
//   kPinUnderFabric:  cache -> libfabric registrar -> FailingRegistrar -> PinRegistrar
//   kFabricUnderCache: cache -> FailingRegistrar -> libfabric registrar -> PinRegistrar
// and with two codes: kInternal (the Acquire that met it fails with it) and kResourceExhausted (the
// cache evicts, flushes and retries once: every Acquire succeeds). Checked after each run: every
// Acquire returned OK or the injected code; a buffer acquired transfers correct data; every
// transfer completed exactly once; the cache's pinned bytes equal the registrar's live bytes and
// its failure counts equal the faults injected; after the cache is destroyed no registration is
// live, no page is locked, and nothing was deregistered twice.
//
// The memlock limit: a forked child drops CAP_IPC_LOCK, lowers RLIMIT_MEMLOCK to 1 MiB, and checks
// that pinning past it fails with kResourceExhausted, that the cache evicts idle regions and
// retries (the acquisition then succeeds), that a request larger than the limit fails cleanly, and
// that nothing stays locked (the registrar's count and the kernel's VmLck) once the cache is gone.
// Under AddressSanitizer the child runs LeakSanitizer before it exits.

#include <linux/capability.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "datapath/endpoint.h"
#include "datapath/fabric.h"
#include "datapath/internal/test_util.h"
#include "regcache/cache.h"
#include "regcache/pin_registrar.h"
#include "tests/failing_registrar.h"
#include "tests/process_util.h"

namespace sanreg {
namespace {

using testing::Buffer;
using testing::ConnectedPair;
using testing::FailingRegistrar;

const size_t kPage = static_cast<size_t>(sysconf(_SC_PAGESIZE));
constexpr uint32_t kRw = kAccessLocalRead | kAccessLocalWrite;
constexpr size_t kRemoteSize = 1 << 20;

enum class Stack { kCache, kPinUnderFabric, kFabricUnderCache };

const char* Name(Stack s) {
  switch (s) {
    case Stack::kCache:
      return "Cache";
    case Stack::kPinUnderFabric:
      return "PinUnderFabric";
    case Stack::kFabricUnderCache:
      return "FabricUnderCache";
  }
  return "?";
}

// What one run of the workload saw.
struct RunResult {
  uint64_t acquisitions = 0;
  uint64_t failed_acquisitions = 0;
  uint64_t transfers = 0;
  uint64_t bytes_verified = 0;
};

class RegistrarFaultTest : public ::testing::TestWithParam<std::tuple<Stack, absl::StatusCode>> {
 protected:
  void SetUp() override {
    stack_ = std::get<0>(GetParam());
    code_ = std::get<1>(GetParam());
    mem_size_ = 64 * kPage;
    void* p = mmap(nullptr, mem_size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ASSERT_NE(p, MAP_FAILED);
    mem_ = static_cast<uint8_t*>(p);
    if (stack_ == Stack::kCache) return;
    FabricOptions o;
    o.provider = "tcp";
    o.apply_env = false;
    auto pair = ConnectedPair::Make(o);
    ASSERT_TRUE(pair.ok()) << pair.status();
    pair_ = std::make_unique<ConnectedPair>(*std::move(pair));
    target_reg_ = pair_->target_fabric->NewRegistrar(&target_pin_);
    auto remote = Buffer::Make(target_reg_.get(), kRemoteSize,
                               kRw | kAccessRemoteRead | kAccessRemoteWrite);
    ASSERT_TRUE(remote.ok()) << remote.status();
    remote_buf_ = *std::move(remote);
    auto region = pair_->target->Expose(remote_buf_->reg(), remote_buf_->data(), kRemoteSize,
                                        kAccessRemoteRead | kAccessRemoteWrite);
    ASSERT_TRUE(region.ok()) << region.status();
    remote_ = *region;
  }

  void TearDown() override {
    remote_buf_.reset();
    target_reg_.reset();
    pair_.reset();
    if (mem_ != nullptr) munmap(mem_, mem_size_);
  }

  // Writes a pattern from `ref`'s part [p, p + n) to the target and reads it back into the same
  // bytes. Each operation must complete exactly once, with OK.
  void Transfer(const RegionRef& ref, uint8_t* p, size_t n, uint32_t seed, RunResult* out) {
    for (size_t i = 0; i < n; ++i) p[i] = Buffer::Pattern(seed, i);
    Sge s{p, n, &ref.registration()};
    std::atomic<int> calls{0};
    auto count = [](Completion*, void* arg) { static_cast<std::atomic<int>*>(arg)->fetch_add(1); };
    Completion w(count, &calls);
    ASSERT_TRUE(pair_->initiator->Write({&s, 1}, remote_, 0, &w).ok());
    w.Wait();
    ASSERT_TRUE(w.status().ok()) << w.status();
    std::memset(p, 0, n);
    Completion r(count, &calls);
    ASSERT_TRUE(pair_->initiator->Read({&s, 1}, remote_, 0, &r).ok());
    r.Wait();
    ASSERT_TRUE(r.status().ok()) << r.status();
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(p[i], Buffer::Pattern(seed, i)) << i;
    // A callback runs after Done(): the count settles once both have returned from it.
    while (calls.load() != 2) pair_->initiator->Poll();
    out->transfers += 2;
    out->bytes_verified += n;
  }

  // Acquires [mem_ + first page, + pages) with `access`: OK, or (under an injected kInternal) the
  // injected code. Transfers from it when it succeeded and a fabric is in the stack.
  RegionRef Acquire(RegistrationCache* cache, size_t first, size_t pages, uint32_t access,
                    uint32_t seed, RunResult* out) {
    ++out->acquisitions;
    auto ref = cache->Acquire(mem_ + first * kPage, pages * kPage, access);
    if (!ref.ok()) {
      ++out->failed_acquisitions;
      EXPECT_EQ(code_, absl::StatusCode::kInternal) << "a retried kResourceExhausted failed";
      EXPECT_EQ(ref.status().code(), code_) << ref.status();
      return RegionRef();
    }
    if (pair_ != nullptr) Transfer(*ref, mem_ + first * kPage, pages * kPage, seed, out);
    return *std::move(ref);
  }

  // Runs the workload once with call `k` failing (0: none). Returns the registrar calls it made.
  uint64_t RunOnce(uint64_t k, RunResult* out) {
    PinRegistrar pin;
    std::unique_ptr<FailingRegistrar> failing;
    std::unique_ptr<Registrar> fabric_reg;
    Registrar* top = nullptr;
    switch (stack_) {
      case Stack::kCache:
        failing = std::make_unique<FailingRegistrar>(&pin);
        top = failing.get();
        break;
      case Stack::kPinUnderFabric:
        failing = std::make_unique<FailingRegistrar>(&pin);
        fabric_reg = pair_->initiator_fabric->NewRegistrar(failing.get());
        top = fabric_reg.get();
        break;
      case Stack::kFabricUnderCache:
        fabric_reg = pair_->initiator_fabric->NewRegistrar(&pin);
        failing = std::make_unique<FailingRegistrar>(fabric_reg.get());
        top = failing.get();
        break;
    }
    failing->FailCall(k, code_);
    RegistrationCache::Options o;
    o.max_regions = 6;
    o.memory_monitor = MemoryMonitorMode::kNone;  // explicit invalidations only: deterministic
    o.reclaimer_thread = false;                   // deregistration in Flush: deterministic
    o.publish_stats = false;
    auto created = RegistrationCache::Create(top, o);
    EXPECT_TRUE(created.ok()) << created.status();
    if (!created.ok()) return 0;
    std::unique_ptr<RegistrationCache> cache = *std::move(created);
    {
      std::vector<RegionRef> held;
      // Misses, within the region limit.
      for (size_t i = 0; i < 4; ++i) held.push_back(Acquire(cache.get(), i * 4, i + 1, kRw, i, out));
      // Hits.
      for (size_t i = 0; i < 4; ++i) held.push_back(Acquire(cache.get(), i * 4, 1, kRw, 10 + i, out));
      // A rights miss over three of them: merged into one region with more rights.
      held.push_back(Acquire(cache.get(), 1, 8, kRw | kAccessRemoteRead, 20, out));
      held.clear();
      // An explicit invalidation (the SPI's cache callback), then more misses past the limit:
      // idle regions are evicted.
      EXPECT_TRUE(cache->Invalidate(mem_ + 4 * kPage, 4 * kPage).ok());
      for (size_t i = 0; i < 6; ++i) {
        held.push_back(Acquire(cache.get(), 20 + 3 * i, 2, kRw, 30 + i, out));
        if (i % 2 == 1) held.erase(held.begin());
      }
      cache->Flush();
      held.clear();
      // Misses again for what was evicted, and hits for the rest.
      for (size_t i = 0; i < 6; ++i) held.push_back(Acquire(cache.get(), 20 + 3 * i, 2, kRw, 40 + i, out));
      held.clear();
      EXPECT_TRUE(cache->Invalidate(mem_, mem_size_).ok());
      for (size_t i = 0; i < 2; ++i) held.push_back(Acquire(cache.get(), 50 + i, 1, kRw, 50 + i, out));
      held.clear();
      cache->Flush();
    }
    CacheStats st = cache->Stats();
    EXPECT_EQ(st.pinned_bytes, failing->live_bytes());
    EXPECT_EQ(st.deregistration_failures, failing->injected_deregister());
    if (code_ == absl::StatusCode::kInternal) {
      EXPECT_EQ(st.registration_failures, failing->injected_register());
    }
    cache.reset();  // deregisters the rest (call k may be one of these)
    EXPECT_EQ(failing->live_registrations(), 0u);
    EXPECT_EQ(failing->bad_deregistrations(), 0u);
    EXPECT_EQ(pin.locked_bytes(), 0u);
    EXPECT_EQ(failing->injected(), k != 0 && k <= failing->calls() ? 1u : 0u);
    return failing->calls();
  }

  Stack stack_;
  absl::StatusCode code_;
  uint8_t* mem_ = nullptr;
  size_t mem_size_ = 0;
  std::unique_ptr<ConnectedPair> pair_;
  PinRegistrar target_pin_;
  std::unique_ptr<Registrar> target_reg_;
  std::unique_ptr<Buffer> remote_buf_;
  RemoteRegion remote_;
};

TEST_P(RegistrarFaultTest, EveryCallFailedInTurnLeavesNothingPinned) {
  RunResult clean;
  const uint64_t n = RunOnce(0, &clean);
  ASSERT_GT(n, 10u);
  EXPECT_EQ(clean.failed_acquisitions, 0u);
  RunResult faulty;
  for (uint64_t k = 1; k <= n; ++k) {
    SCOPED_TRACE(absl::StrCat("call ", k, " of ", n, " failed"));
    RunOnce(k, &faulty);
    if (HasFailure()) break;
  }
  printf("[figures] %s/%s: %llu registrar calls, %llu faults injected (one per run), "
         "%llu acquisitions (%llu failed), %llu transfers, %llu bytes verified\n",
         Name(stack_), absl::StatusCodeToString(code_).c_str(), static_cast<unsigned long long>(n),
         static_cast<unsigned long long>(n), static_cast<unsigned long long>(faulty.acquisitions),
         static_cast<unsigned long long>(faulty.failed_acquisitions),
         static_cast<unsigned long long>(faulty.transfers),
         static_cast<unsigned long long>(faulty.bytes_verified));
}

INSTANTIATE_TEST_SUITE_P(
    Stacks, RegistrarFaultTest,
    ::testing::Combine(::testing::Values(Stack::kCache, Stack::kPinUnderFabric,
                                         Stack::kFabricUnderCache),
                       ::testing::Values(absl::StatusCode::kInternal,
                                         absl::StatusCode::kResourceExhausted)),
    [](const auto& info) {
      return absl::StrCat(Name(std::get<0>(info.param)),
                          std::get<1>(info.param) == absl::StatusCode::kInternal ? "Internal"
                                                                                 : "Exhausted");
    });

// ---- the memlock limit ----

constexpr size_t kLimit = 1 << 20;
constexpr size_t kChunk = 128 << 10;

// Bytes the kernel counts as locked for this process (VmLck), or -1.
long LockedKb() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmLck:", 0) == 0) return std::strtol(line.c_str() + 6, nullptr, 10);
  }
  return -1;
}

// Drops CAP_IPC_LOCK (root is not limited by RLIMIT_MEMLOCK otherwise). True on success.
bool DropIpcLock() {
  __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct d[2] = {};
  if (syscall(SYS_capget, &h, d) != 0) return false;
  d[CAP_IPC_LOCK / 32].effective &= ~(1u << (CAP_IPC_LOCK % 32));
  d[CAP_IPC_LOCK / 32].permitted &= ~(1u << (CAP_IPC_LOCK % 32));
  d[CAP_IPC_LOCK / 32].inheritable &= ~(1u << (CAP_IPC_LOCK % 32));
  return syscall(SYS_capset, &h, d) == 0;
}

#define CHILD_EXPECT(cond, code, ...)           \
  do {                                          \
    if (!(cond)) {                              \
      fprintf(stderr, "child: " __VA_ARGS__);   \
      fprintf(stderr, " (exit %d)\n", code);    \
      return code;                              \
    }                                           \
  } while (0)

// In the child, with the limit set: the checks of the memlock test on `top` (over `pin`).
int MemlockChecks(Registrar* top, PinRegistrar* pin, uint8_t* mem, long locked0_kb) {
  RegistrationCache::Options o;
  o.memory_monitor = MemoryMonitorMode::kNone;
  o.publish_stats = false;
  auto created = RegistrationCache::Create(top, o);
  CHILD_EXPECT(created.ok(), 20, "Create: %s", created.status().ToString().c_str());
  std::unique_ptr<RegistrationCache> cache = *std::move(created);
  const size_t fits = (kLimit - static_cast<size_t>(locked0_kb) * 1024) / kChunk;
  {
    // Held references: the first `fits` chunks pin; the rest fail, as nothing idle can go.
    std::vector<RegionRef> held;
    size_t ok = 0;
    for (size_t i = 0; i < 16; ++i) {
      auto r = cache->Acquire(mem + i * kChunk, kChunk, kRw);
      if (r.ok()) {
        ++ok;
        held.push_back(*std::move(r));
        continue;
      }
      CHILD_EXPECT(r.status().code() == absl::StatusCode::kResourceExhausted, 21,
                   "Acquire %zu past the limit: %s", i, r.status().ToString().c_str());
    }
    CHILD_EXPECT(ok == fits, 22, "%zu chunks pinned, expected %zu", ok, fits);
    CHILD_EXPECT(pin->locked_bytes() == fits * kChunk, 23, "locked %zu", pin->locked_bytes());
    CHILD_EXPECT(cache->Stats().pinned_bytes == fits * kChunk, 24, "pinned_bytes wrong");
    // Released (idle): new chunks evict them and retry.
    held.clear();
    const uint64_t evictions = cache->Stats().evictions;
    for (size_t i = 16; i < 16 + fits; ++i) {
      auto r = cache->Acquire(mem + i * kChunk, kChunk, kRw);
      CHILD_EXPECT(r.ok(), 25, "Acquire %zu after release: %s", i, r.status().ToString().c_str());
      held.push_back(*std::move(r));
    }
    CHILD_EXPECT(cache->Stats().evictions - evictions == fits, 26, "evictions %llu",
                 static_cast<unsigned long long>(cache->Stats().evictions - evictions));
    // More than the limit at once: fails with everything held, and with everything idle.
    auto big = cache->Acquire(mem, kLimit + kChunk, kRw);
    CHILD_EXPECT(big.status().code() == absl::StatusCode::kResourceExhausted, 27, "big: %s",
                 big.status().ToString().c_str());
    held.clear();
    big = cache->Acquire(mem, kLimit + kChunk, kRw);
    CHILD_EXPECT(big.status().code() == absl::StatusCode::kResourceExhausted, 28, "big idle: %s",
                 big.status().ToString().c_str());
    cache->Flush();
    CHILD_EXPECT(pin->locked_bytes() == 0, 29, "locked %zu after evicting all",
                 pin->locked_bytes());
    CHILD_EXPECT(cache->Stats().pinned_bytes == 0, 30, "pinned_bytes not 0");
    // And it recovers.
    auto again = cache->Acquire(mem, kChunk, kRw);
    CHILD_EXPECT(again.ok(), 31, "Acquire after: %s", again.status().ToString().c_str());
  }
  cache.reset();
  CHILD_EXPECT(pin->locked_bytes() == 0, 32, "locked %zu after the cache", pin->locked_bytes());
  CHILD_EXPECT(LockedKb() == locked0_kb, 33, "VmLck %ld kB, was %ld", LockedKb(), locked0_kb);
  return 0;
}

int MemlockChild(bool through_fabric) {
  CHILD_EXPECT(geteuid() != 0 || DropIpcLock(), 10, "capset: %s", strerror(errno));
  rlimit lim = {kLimit, kLimit};
  CHILD_EXPECT(setrlimit(RLIMIT_MEMLOCK, &lim) == 0, 11, "setrlimit: %s", strerror(errno));
  const long locked0 = LockedKb();
  CHILD_EXPECT(locked0 >= 0 && static_cast<size_t>(locked0) * 1024 < kLimit / 2, 12,
               "VmLck %ld kB at the start", locked0);
  const size_t size = 32 * kChunk;
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHILD_EXPECT(p != MAP_FAILED, 13, "mmap");
  int rc;
  {
    PinRegistrar pin;
    if (!through_fabric) {
      rc = MemlockChecks(&pin, &pin, static_cast<uint8_t*>(p), locked0);
    } else {
      FabricOptions o;
      o.provider = "tcp";
      o.apply_env = false;
      auto fabric = Fabric::Open(o);
      CHILD_EXPECT(fabric.ok(), 14, "Fabric::Open: %s", fabric.status().ToString().c_str());
      std::unique_ptr<Registrar> reg = (*fabric)->NewRegistrar(&pin);
      rc = MemlockChecks(reg.get(), &pin, static_cast<uint8_t*>(p), locked0);
    }
  }
  munmap(p, size);
  if (rc == 0 && testing::LeaksFound()) rc = 40;
  return rc;
}

class MemlockTest : public ::testing::TestWithParam<bool> {};

TEST_P(MemlockTest, PinningPastTheLimitFailsCleanlyAndEvictsIdleRegions) {
  std::string why;
  ASSERT_TRUE(testing::SingleThreaded(&why)) << why;
  int status = testing::RunInChild([&] { return MemlockChild(GetParam()); });
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << testing::DescribeStatus(status) << " (the child's stderr says where)";
}

INSTANTIATE_TEST_SUITE_P(Stacks, MemlockTest, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "Fabric" : "Pin"; });

}  // namespace
}  // namespace sanreg
