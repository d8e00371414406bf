// soak_test.cc: a bounded soak of the whole stack on two emulated hosts (tests/two_hosts.h), over
// libfabric's tcp provider.
//
// A target in one namespace exposes an 8 MiB region: its first half holds a fixed pattern (read
// only, by convention), its second half takes the initiator's writes. An initiator in the other
// namespace runs, until the time is up, a seeded random mix of:
//   transfers:     batches of 1-4 writes and reads of 1 byte to 256 KiB from buffers acquired
//                  through a RegistrationCache (over a fault-injecting wrapper, the fabric's
//                  registrar and a PinRegistrar). Reads are checked against the target's pattern;
//                  each write is read back and checked, and every 16th is also checked by the target
//                  in its own memory;
//   invalidations: munmap + mmap of a buffer (new pages, usually at the same address), mremap of
//                  one (grown, shrunk or moved), madvise(MADV_DONTNEED) of part of one; the cache
//                  learns of each through its memory-event sources (hooks and userfaultfd);
//   reconnects:    the endpoint is closed and a new connection made (the target accepts it and
//                  exposes its region on it); registrations stay;
//   memory churn:  malloc/free and mmap/munmap of unrelated memory, and acquisitions of scratch
//                  ranges that push the cache past its region limit (evictions);
//   faults:        -FI_EAGAIN storms on posts and on fi_cq_read, an error completion (the
//                  connection fails: the batch's operations fail with kUnavailable, and the
//                  initiator reconnects and redoes it), and a failed registrar call (Register:
//                  the acquisition is retried; Deregister: counted by the cache).
// The cache runs in verification mode: every hit compares the physical frames recorded at
// registration with those mapped now, so a stale registration fails the acquisition (kDataLoss)
// even where the data could not show it (tcp moves data through virtual addresses: a stale
// registration's pages are not what it reads or writes). At the end: no stale hit, every operation
// completed exactly once, the target's pattern half unchanged, nothing pinned or registered after
// the cache is gone, and (under AddressSanitizer) no leak in the initiator.
//
// Duration: 30 s, or SANREG_SOAK_SECONDS (e.g. bazel test --test_env=SANREG_SOAK_SECONDS=600
// --test_timeout=900 //tests:soak_test). Seed: printed; SANREG_SEED replays it. The figures are
// printed at the end. No sleeps: every wait is for an event (a completion, a pipe, a child).
// Needs root (namespaces, page frames): skipped with a message otherwise.

#include <malloc.h>
#include <rdma/fi_errno.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "datapath/endpoint.h"
#include "datapath/fabric.h"
#include "datapath/internal/test_util.h"
#include "datapath/libfabric/fault_hook.h"
#include "regcache/cache.h"
#include "regcache/pin_registrar.h"
#include "regcache/test_seed.h"
#include "tests/failing_registrar.h"
#include "tests/process_util.h"
#include "tests/two_hosts.h"

namespace sanreg {
namespace {

using internal::FaultSite;
using testing::Buffer;
using testing::FailingRegistrar;
using testing::ReadWithin;
using testing::WriteAll;

constexpr uint32_t kRw = kAccessLocalRead | kAccessLocalWrite;
constexpr uint32_t kRemoteRw = kAccessRemoteRead | kAccessRemoteWrite;
constexpr size_t kHalf = 4 << 20;
constexpr size_t kRegion = 2 * kHalf;
constexpr size_t kLanes = 4;  // the write half, one lane per operation of a batch
constexpr size_t kLane = kHalf / kLanes;
constexpr size_t kMaxOp = 256 << 10;
constexpr size_t kBuffers = 12;
constexpr uint32_t kTargetSeed = 7;
constexpr absl::Duration kStep = absl::Seconds(60);  // a hang guard for one pipe exchange
const size_t kPage = static_cast<size_t>(sysconf(_SC_PAGESIZE));

// What the initiator measured, sent up to the test at the end.
struct Figures {
  uint64_t seconds = 0;
  uint64_t operations = 0;  // completed OK and checked
  uint64_t writes = 0;
  uint64_t reads = 0;
  uint64_t bytes_verified = 0;
  uint64_t target_checks = 0;
  uint64_t unmaps = 0;
  uint64_t remaps = 0;
  uint64_t remaps_dropped_first = 0;  // of them, after dropping the buffer's regions (see Remap)
  uint64_t remaps_shrunk = 0;         // of those, shrunk in place as growing still failed
  uint64_t dontneeds = 0;
  uint64_t cache_invalidations = 0;  // regions the cache dropped for memory events
  uint64_t memory_events = 0;
  uint64_t reconnects = 0;
  uint64_t churn = 0;
  uint64_t evictions = 0;
  uint64_t faults_post = 0;
  uint64_t faults_cq = 0;
  uint64_t faults_completion = 0;
  uint64_t faults_registrar = 0;
  uint64_t failed_operations = 0;  // by an injected error completion (redone)
  uint64_t acquire_retries = 0;
  uint64_t stale_hits = 0;
  uint64_t hits = 0;
  uint64_t misses = 0;
};

// ---- the initiator's fault hook ----

struct Faults {
  std::atomic<uint64_t> posts{0}, cq_reads{0}, completions{0};
  std::atomic<uint64_t> post_storm_until{0}, post_storm_period{0};
  std::atomic<uint64_t> cq_storm_until{0};
  std::atomic<uint64_t> completion_error_at{0};
  std::atomic<uint64_t> injected_post{0}, injected_cq{0}, injected_completion{0};
};
Faults g_faults;

int Hook(FaultSite site) {
  Faults& f = g_faults;
  switch (site) {
    case FaultSite::kPost: {
      const uint64_t n = f.posts.fetch_add(1) + 1;
      const uint64_t period = f.post_storm_period.load();
      if (n <= f.post_storm_until.load() && period != 0 && n % period != 0) {
        f.injected_post.fetch_add(1);
        return -FI_EAGAIN;
      }
      return 0;
    }
    case FaultSite::kCqRead:
      if (f.cq_reads.fetch_add(1) + 1 <= f.cq_storm_until.load()) {
        f.injected_cq.fetch_add(1);
        return -FI_EAGAIN;
      }
      return 0;
    case FaultSite::kCompletion:
      if (f.completions.fetch_add(1) + 1 == f.completion_error_at.load()) {
        f.injected_completion.fetch_add(1);
        return FI_EIO;
      }
      return 0;
  }
  return 0;
}

// ---- the target ----

struct VerifyRequest {
  uint64_t offset;
  uint64_t length;
  uint32_t seed;
};

[[noreturn]] void RunTarget(const std::string& ns, int in, int out) {
  const char* role = "target";
  testing::EnterNamespace(ns);
  FabricOptions o;
  o.provider = "tcp";
  o.apply_env = false;
  auto fabric = Fabric::Open(o);
  CHILD_CHECK(fabric.ok(), 20, "Fabric::Open: %s", fabric.status().ToString().c_str());
  PinRegistrar pin;
  auto reg = (*fabric)->NewRegistrar(&pin);
  auto buf = Buffer::Make(reg.get(), kRegion, kRw | kRemoteRw);
  CHILD_CHECK(buf.ok(), 21, "Buffer::Make: %s", buf.status().ToString().c_str());
  (*buf)->Fill(kTargetSeed);
  auto listener = (*fabric)->Listen(absl::StrCat(testing::kHostAddrA, ":0"));
  CHILD_CHECK(listener.ok(), 22, "Listen: %s", listener.status().ToString().c_str());
  const uint16_t port = (*listener)->port();
  CHILD_CHECK(WriteAll(out, &port, sizeof port), 23, "sending the port");
  std::unique_ptr<Endpoint> ep;
  uint64_t accepted = 0;
  for (;;) {
    // Accept (the first connection, or after 'R'), expose, send the descriptor.
    auto next = (*listener)->Accept();
    CHILD_CHECK(next.ok(), 24, "Accept %llu: %s", static_cast<unsigned long long>(accepted),
                next.status().ToString().c_str());
    ep = *std::move(next);
    ++accepted;
    auto region = ep->Expose((*buf)->reg(), (*buf)->data(), kRegion, kRemoteRw);
    CHILD_CHECK(region.ok(), 25, "Expose: %s", region.status().ToString().c_str());
    std::array<uint8_t, RemoteRegion::kWireSize> wire;
    CHILD_CHECK(region->Serialize(wire).ok() && WriteAll(out, wire.data(), wire.size()), 26,
                "sending the descriptor");
    for (bool reconnect = false; !reconnect;) {
      char cmd = 0;
      CHILD_CHECK(ReadWithin(in, &cmd, 1, absl::Hours(24)), 27, "the initiator went away");
      if (cmd == 'R') {
        ep.reset();  // the initiator closed its end; it connects again
        reconnect = true;
      } else if (cmd == 'V') {
        VerifyRequest v;
        CHILD_CHECK(ReadWithin(in, &v, sizeof v, kStep), 28, "verify request");
        bool ok = v.offset >= kHalf && v.offset + v.length <= kRegion;
        for (size_t j = 0; ok && j < v.length; ++j) {
          ok = (*buf)->data()[v.offset + j] == Buffer::Pattern(v.seed, j);
        }
        const char answer = ok ? 'Y' : 'N';
        CHILD_CHECK(WriteAll(out, &answer, 1), 29, "verify answer");
      } else if (cmd == 'D') {
        bool ok = true;
        for (size_t j = 0; ok && j < kHalf; ++j) {
          ok = (*buf)->data()[j] == Buffer::Pattern(kTargetSeed, j);
        }
        const char answer = ok ? 'Y' : 'N';
        CHILD_CHECK(WriteAll(out, &answer, 1), 30, "done answer");
        ep.reset();
        listener->reset();
        _exit(0);
      } else {
        CHILD_CHECK(false, 31, "unknown command %d", cmd);
      }
    }
  }
}

// ---- the initiator ----

class Initiator {
 public:
  Initiator(uint64_t seed, absl::Duration duration, int in, int out)
      : rng_(seed), duration_(duration), in_(in), out_(out) {}

  // Runs the soak; returns the figures. Exits the process on a mismatch.
  Figures Run(uint16_t port);

 private:
  struct Buf {
    uint8_t* p = nullptr;
    size_t size = 0;
  };
  struct Op {
    Completion c;
    RegionRef ref;
    bool write = false;
    uint8_t* p = nullptr;
    size_t len = 0;
    uint64_t remote = 0;
    uint32_t seed = 0;
  };

  size_t RandomSize() { return (1 + rng_() % (1024 * 1024 / kPage)) * kPage; }
  void Connect();
  void Reconnect();
  RegionRef Acquire(uint8_t* p, size_t len);
  bool TransferBatch();  // false: an injected error completion failed the connection
  bool WriteBack(Op& op);  // false: as TransferBatch
  void Unmap();
  void Remap();
  void DontNeed();
  void Churn();
  void Fault();

  const char* role = "initiator";
  std::mt19937_64 rng_;
  absl::Duration duration_;
  int in_, out_;
  uint16_t port_ = 0;
  Figures fig_;
  std::unique_ptr<Fabric> fabric_;
  std::unique_ptr<Endpoint> ep_;
  RemoteRegion remote_;
  std::unique_ptr<FailingRegistrar> failing_;
  std::unique_ptr<RegistrationCache> cache_;
  std::vector<Buf> bufs_;
};

void Initiator::Connect() {
  auto ep = fabric_->Connect(absl::StrCat(testing::kHostAddrA, ":", port_));
  CHILD_CHECK(ep.ok(), 40, "Connect: %s", ep.status().ToString().c_str());
  ep_ = *std::move(ep);
  CHILD_CHECK(ep_->provider_name().find("tcp") != std::string::npos, 41, "not tcp: %s",
              ep_->provider_name().c_str());
  std::array<uint8_t, RemoteRegion::kWireSize> wire;
  CHILD_CHECK(ReadWithin(in_, wire.data(), wire.size(), kStep), 42, "no descriptor");
  auto region = RemoteRegion::Parse(wire);
  CHILD_CHECK(region.ok(), 43, "Parse: %s", region.status().ToString().c_str());
  CHILD_CHECK(region->connection == ep_->connection_id(), 44, "descriptor of another connection");
  remote_ = *region;
}

void Initiator::Reconnect() {
  ep_.reset();
  const char cmd = 'R';
  CHILD_CHECK(WriteAll(out_, &cmd, 1), 45, "sending 'R'");
  Connect();
  ++fig_.reconnects;
}

RegionRef Initiator::Acquire(uint8_t* p, size_t len) {
  for (int attempt = 0;; ++attempt) {
    auto ref = cache_->Acquire(p, len, kRw);
    if (ref.ok()) return *std::move(ref);
    // An injected registrar failure (kInternal) is retried; anything else is a mismatch (a stale
    // hit is kDataLoss).
    CHILD_CHECK(ref.status().code() == absl::StatusCode::kInternal && attempt < 8, 46,
                "Acquire(%p, %zu): %s", static_cast<void*>(p), len,
                ref.status().ToString().c_str());
    ++fig_.acquire_retries;
  }
}

bool Initiator::TransferBatch() {
  const size_t n = 1 + rng_() % kLanes;
  std::array<Op, kLanes> ops;
  std::vector<size_t> order(bufs_.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng_);
  for (size_t j = 0; j < n; ++j) {
    Op& op = ops[j];
    Buf& b = bufs_[order[j]];
    op.write = rng_() % 2 == 0;
    op.len = 1 + rng_() % std::min(b.size, kMaxOp);
    op.p = b.p + rng_() % (b.size - op.len + 1);
    op.seed = static_cast<uint32_t>(rng_());
    op.remote = op.write ? kHalf + j * kLane + rng_() % (kLane - op.len + 1)
                         : rng_() % (kHalf - op.len + 1);
    if (op.write) {
      for (size_t k = 0; k < op.len; ++k) op.p[k] = Buffer::Pattern(op.seed, k);
    } else {
      std::memset(op.p, 0, op.len);
    }
    op.ref = Acquire(op.p, op.len);
  }
  size_t posted = 0;
  for (size_t j = 0; j < n; ++j) {
    Op& op = ops[j];
    Sge s{op.p, op.len, &op.ref.registration()};
    absl::Status st = op.write ? ep_->Write({&s, 1}, remote_, op.remote, &op.c)
                               : ep_->Read({&s, 1}, remote_, op.remote, &op.c);
    if (!st.ok()) {
      // Only after an injected error completion failed the connection.
      CHILD_CHECK(st.code() == absl::StatusCode::kUnavailable && g_faults.injected_completion > 0,
                  47, "posting: %s", st.ToString().c_str());
      break;
    }
    ++posted;
  }
  bool all_ok = posted == n;
  for (size_t j = 0; j < posted; ++j) {
    ops[j].c.Wait();
    if (!ops[j].c.status().ok()) {
      CHILD_CHECK(ops[j].c.status().code() == absl::StatusCode::kUnavailable &&
                      g_faults.injected_completion > 0,
                  48, "%s of %zu bytes: %s", ops[j].write ? "write" : "read", ops[j].len,
                  ops[j].c.status().ToString().c_str());
      ++fig_.failed_operations;
      all_ok = false;
    }
  }
  if (!all_ok) return false;
  for (size_t j = 0; j < n; ++j) {
    Op& op = ops[j];
    ++fig_.operations;
    if (op.write) {
      ++fig_.writes;
      if (!WriteBack(op)) return false;
    } else {
      ++fig_.reads;
      for (size_t k = 0; k < op.len; ++k) {
        CHILD_CHECK(op.p[k] == Buffer::Pattern(kTargetSeed, op.remote + k), 49,
                    "read of %zu bytes at %llu: byte %zu wrong", op.len,
                    static_cast<unsigned long long>(op.remote), k);
      }
      fig_.bytes_verified += op.len;
    }
  }
  return true;
}

// Reads a completed write back into its own buffer and checks it; every 16th write, the target
// checks it in its memory too.
bool Initiator::WriteBack(Op& op) {
  std::memset(op.p, 0, op.len);
  Sge s{op.p, op.len, &op.ref.registration()};
  Completion c;
  absl::Status st = ep_->Read({&s, 1}, remote_, op.remote, &c);
  CHILD_CHECK(
      st.ok() || (st.code() == absl::StatusCode::kUnavailable && g_faults.injected_completion > 0),
      50, "read-back: %s", st.ToString().c_str());
  if (!st.ok()) return false;
  c.Wait();
  if (!c.status().ok()) {
    CHILD_CHECK(
        c.status().code() == absl::StatusCode::kUnavailable && g_faults.injected_completion > 0, 51,
        "read-back: %s", c.status().ToString().c_str());
    ++fig_.failed_operations;
    return false;
  }
  ++fig_.operations;
  for (size_t k = 0; k < op.len; ++k) {
    CHILD_CHECK(op.p[k] == Buffer::Pattern(op.seed, k), 52,
                "read-back of %zu bytes: byte %zu wrong", op.len, k);
  }
  fig_.bytes_verified += op.len;
  if (fig_.writes % 16 != 0) return true;
  const char cmd = 'V';
  VerifyRequest v{op.remote, op.len, op.seed};
  char answer = 0;
  CHILD_CHECK(
      WriteAll(out_, &cmd, 1) && WriteAll(out_, &v, sizeof v) && ReadWithin(in_, &answer, 1, kStep),
      53, "target check exchange");
  CHILD_CHECK(answer == 'Y', 54, "the target found a write of %zu bytes wrong", op.len);
  ++fig_.target_checks;
  fig_.bytes_verified += op.len;
  return true;
}

void Initiator::Unmap() {
  Buf& b = bufs_[rng_() % bufs_.size()];
  CHILD_CHECK(munmap(b.p, b.size) == 0, 55, "munmap");
  b.size = RandomSize();
  void* p = mmap(nullptr, b.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHILD_CHECK(p != MAP_FAILED, 56, "mmap");
  b.p = static_cast<uint8_t*>(p);
  ++fig_.unmaps;
}

void Initiator::Remap() {
  Buf& b = bufs_[rng_() % bufs_.size()];
  size_t size = RandomSize();
  void* p = mremap(b.p, b.size, size, MREMAP_MAYMOVE);
  if (p == MAP_FAILED && errno == EFAULT) {
    // mremap grows or moves one mapping (VMA) only, and a registration of part of the buffer
    // (mlock, MADV_DONTFORK, the userfaultfd monitor's watch) splits its VMA: a buffer the cache
    // still holds registered cannot grow or move. What an application does then: drop the cache's
    // regions of it and flush; every split is undone on deregistration, the kernel merges the VMAs
    // again, and the mremap succeeds (docs/RELIABILITY.md), unless the case below.
    ++fig_.remaps_dropped_first;
    CHILD_CHECK(cache_->Invalidate(b.p, b.size).ok(), 83, "Invalidate");
    cache_->Flush();
    p = mremap(b.p, b.size, size, MREMAP_MAYMOVE);
    if (p == MAP_FAILED && errno == EFAULT) {
      // Still split: an earlier mremap grew or moved this buffer while one region covered all of
      // it, and the kernel carried that region's mlock, MADV_DONTFORK and userfaultfd watch over
      // to the grown or moved pages, where no deregistration undoes them (docs/RELIABILITY.md).
      // Shrinking in place works across VMAs: do that instead (the cache must drop the tail).
      ++fig_.remaps_shrunk;
      size = std::max(kPage, (b.size / kPage / 2) * kPage);
      p = mremap(b.p, b.size, size, 0);
    }
  }
  CHILD_CHECK(p != MAP_FAILED, 57, "mremap: %s", strerror(errno));
  b.p = static_cast<uint8_t*>(p);
  b.size = size;
  ++fig_.remaps;
}

void Initiator::DontNeed() {
  Buf& b = bufs_[rng_() % bufs_.size()];
  const size_t pages = b.size / kPage;
  const size_t first = rng_() % pages;
  const size_t count = 1 + rng_() % (pages - first);
  // The kernel refuses (EINVAL) when the range holds locked pages: a cached registration pins
  // them (mlock). It drops the pages of ranges the cache has not pinned, or no longer pins.
  if (madvise(b.p + first * kPage, count * kPage, MADV_DONTNEED) == 0) {
    ++fig_.dontneeds;
  } else {
    CHILD_CHECK(errno == EINVAL, 58, "madvise: %s", strerror(errno));
  }
}

void Initiator::Churn() {
  ++fig_.churn;
  switch (rng_() % 3) {
    case 0: {  // the heap
      std::vector<void*> blocks(1 + rng_() % 8);
      for (void*& p : blocks) {
        const size_t n = 1024 + rng_() % (2 << 20);
        p = malloc(n);
        CHILD_CHECK(p != nullptr, 59, "malloc");
        std::memset(p, 1, n);
      }
      for (void* p : blocks) free(p);
      break;
    }
    case 1: {  // unrelated mappings
      const size_t n = RandomSize();
      void* p = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      CHILD_CHECK(p != MAP_FAILED, 60, "mmap");
      std::memset(p, 2, n);
      munmap(p, n);
      break;
    }
    default: {  // cached ranges of a scratch mapping, past the region limit, then unmapped
      const size_t n = 64 * kPage;
      void* p = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      CHILD_CHECK(p != MAP_FAILED, 61, "mmap");
      for (size_t i = 0; i < 40; ++i) {
        RegionRef r = Acquire(static_cast<uint8_t*>(p) + (rng_() % 62) * kPage,
                              (1 + rng_() % 2) * kPage);
      }
      munmap(p, n);
      break;
    }
  }
}

void Initiator::Fault() {
  switch (rng_() % 4) {
    case 0:  // an -FI_EAGAIN storm on the next posts
      g_faults.post_storm_period = 2 + rng_() % 8;
      g_faults.post_storm_until = g_faults.posts.load() + 20 + rng_() % 500;
      break;
    case 1:  // an -FI_EAGAIN storm on the next fi_cq_read calls
      g_faults.cq_storm_until = g_faults.cq_reads.load() + 100 + rng_() % 5000;
      break;
    case 2:  // one of the next registrar calls fails
      failing_->FailCall(1 + rng_() % 4, absl::StatusCode::kInternal);
      break;
    default:  // one of the next completions is reported in error
      g_faults.completion_error_at = g_faults.completions.load() + 1 + rng_() % 16;
      break;
  }
}

Figures Initiator::Run(uint16_t port) {
  port_ = port;
  CHILD_CHECK(PinRegistrar::PageFramesReadable(), 62, "page frames are not readable");
  PinRegistrar pin(PinRegistrar::Options{.dont_fork = true, .record_pages = true});
  {
    FabricOptions o;
    o.provider = "tcp";
    o.apply_env = false;
    o.max_in_flight = 8;  // small: queueing is exercised
    auto fabric = Fabric::Open(o);
    CHILD_CHECK(fabric.ok(), 63, "Fabric::Open: %s", fabric.status().ToString().c_str());
    fabric_ = *std::move(fabric);
    std::unique_ptr<Registrar> reg = fabric_->NewRegistrar(&pin);
    failing_ = std::make_unique<FailingRegistrar>(reg.get());
    RegistrationCache::Options co;
    co.max_regions = 32;
    co.verify_pages = true;
    co.publish_stats = false;
    auto cache = RegistrationCache::Create(failing_.get(), co);
    CHILD_CHECK(cache.ok(), 64, "cache: %s", cache.status().ToString().c_str());
    cache_ = *std::move(cache);
    const CacheStats st0 = cache_->Stats();
    CHILD_CHECK(st0.monitor_hooks || st0.monitor_uffd, 65, "no memory-event source: %s",
                st0.monitor_notes.c_str());
    for (size_t i = 0; i < kBuffers; ++i) {
      Buf b;
      b.size = RandomSize();
      void* p = mmap(nullptr, b.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      CHILD_CHECK(p != MAP_FAILED, 66, "mmap");
      b.p = static_cast<uint8_t*>(p);
      bufs_.push_back(b);
    }
    internal::fault_hook.store(&Hook);
    Connect();
    const absl::Time start = absl::Now();
    const absl::Time end = start + duration_;
    while (absl::Now() < end) {
      const uint64_t r = rng_() % 100;
      if (r < 60) {
        if (!TransferBatch()) {
          // An injected error completion failed the connection: reconnect; the next batch
          // moves data again.
          g_faults.completion_error_at = 0;
          Reconnect();
        }
      } else if (r < 67) {
        Unmap();
      } else if (r < 71) {
        Remap();
      } else if (r < 75) {
        DontNeed();
      } else if (r < 77) {
        Reconnect();
      } else if (r < 88) {
        Churn();
      } else {
        Fault();
      }
    }
    // The end: no fault armed; one clean batch; the target checks its pattern half.
    g_faults.post_storm_until = 0;
    g_faults.cq_storm_until = 0;
    g_faults.completion_error_at = 0;
    failing_->FailCall(0, absl::StatusCode::kInternal);
    for (int i = 0; i < 4; ++i) {
      CHILD_CHECK(TransferBatch(), 67, "a clean batch failed");
    }
    const char cmd = 'D';
    char answer = 0;
    CHILD_CHECK(WriteAll(out_, &cmd, 1) && ReadWithin(in_, &answer, 1, kStep), 68, "'D' exchange");
    CHILD_CHECK(answer == 'Y', 69, "the target's pattern half changed");
    fig_.seconds = static_cast<uint64_t>(absl::ToInt64Seconds(absl::Now() - start));
    ep_.reset();
    internal::fault_hook.store(nullptr);
    for (Buf& b : bufs_) munmap(b.p, b.size);
    cache_->Flush();
    const CacheStats st = cache_->Stats();
    fig_.cache_invalidations = st.invalidations;
    fig_.memory_events = st.memory_events;
    fig_.evictions = st.evictions;
    fig_.stale_hits = st.stale_hits;
    fig_.hits = st.hits;
    fig_.misses = st.misses();
    fig_.faults_post = g_faults.injected_post;
    fig_.faults_cq = g_faults.injected_cq;
    fig_.faults_completion = g_faults.injected_completion;
    fig_.faults_registrar = failing_->injected();
    CHILD_CHECK(st.stale_hits == 0, 70, "%llu stale hits",
                static_cast<unsigned long long>(st.stale_hits));
    CHILD_CHECK(st.deregistration_failures == failing_->injected_deregister(), 71,
                "deregistration failures %llu, injected %llu",
                static_cast<unsigned long long>(st.deregistration_failures),
                static_cast<unsigned long long>(failing_->injected_deregister()));
    cache_.reset();
    CHILD_CHECK(failing_->live_registrations() == 0, 72, "%zu registrations left",
                failing_->live_registrations());
    CHILD_CHECK(failing_->bad_deregistrations() == 0, 73, "a double deregistration");
    failing_.reset();
    reg.reset();
    fabric_.reset();
  }
  CHILD_CHECK(pin.locked_bytes() == 0, 74, "%zu bytes still pinned", pin.locked_bytes());
  return fig_;
}

[[noreturn]] void RunInitiator(const std::string& ns, uint64_t seed, absl::Duration duration,
                               int in, int out, int figures) {
  const char* role = "initiator";
  testing::EnterNamespace(ns);
  uint16_t port = 0;
  CHILD_CHECK(ReadWithin(in, &port, sizeof port, kStep), 80, "no port from the target");
  Figures fig;
  {
    Initiator init(seed, duration, in, out);
    fig = init.Run(port);
  }
  CHILD_CHECK(!testing::LeaksFound(), 81, "LeakSanitizer found leaks");
  CHILD_CHECK(WriteAll(figures, &fig, sizeof fig), 82, "sending the figures");
  _exit(0);
}

absl::Duration SoakDuration() {
  const char* s = std::getenv("SANREG_SOAK_SECONDS");
  const long v = s != nullptr ? std::strtol(s, nullptr, 10) : 0;
  return absl::Seconds(v > 0 ? v : 30);
}

TEST(SoakTest, TransfersInvalidationsReconnectsChurnAndFaultsOnTwoHosts) {
  testing::TwoHosts hosts;
  absl::Status s = hosts.Create("sk");
  if (absl::IsFailedPrecondition(s)) GTEST_SKIP() << s.message();
  ASSERT_TRUE(s.ok()) << s;
  if (!PinRegistrar::PageFramesReadable()) GTEST_SKIP() << "page frames are not readable";
  std::string why;
  ASSERT_TRUE(testing::SingleThreaded(&why)) << why;
  const uint64_t seed = TestSeed();
  const absl::Duration duration = SoakDuration();
  printf("SoakTest: %lld s, seed %llu (SANREG_SEED=%llu replays it)\n",
         static_cast<long long>(absl::ToInt64Seconds(duration)),
         static_cast<unsigned long long>(seed), static_cast<unsigned long long>(seed));
  const uint64_t rx_before = hosts.RxBytes();
  int t2i[2], i2t[2], fig[2];
  ASSERT_EQ(pipe2(t2i, O_CLOEXEC), 0);
  ASSERT_EQ(pipe2(i2t, O_CLOEXEC), 0);
  ASSERT_EQ(pipe2(fig, O_CLOEXEC), 0);
  fflush(nullptr);
  pid_t target = fork();
  ASSERT_GE(target, 0);
  if (target == 0) {
    close(t2i[0]);
    close(i2t[1]);
    close(fig[0]);
    close(fig[1]);
    RunTarget(hosts.ns_a(), i2t[0], t2i[1]);
  }
  pid_t initiator = fork();
  if (initiator == 0) {
    close(t2i[1]);
    close(i2t[0]);
    close(fig[0]);
    RunInitiator(hosts.ns_b(), seed, duration, t2i[0], i2t[1], fig[1]);
  }
  for (int fd : {t2i[0], t2i[1], i2t[0], i2t[1], fig[1]}) close(fd);
  ASSERT_GE(initiator, 0);
  Figures f;
  const bool got = ReadWithin(fig[0], &f, sizeof f, duration + absl::Minutes(3));
  close(fig[0]);
  const absl::Time deadline = absl::Now() + absl::Minutes(1);
  const int ist = testing::ReapBy(initiator, deadline);
  const int tst = testing::ReapBy(target, deadline);
  EXPECT_TRUE(ist != -1 && WIFEXITED(ist) && WEXITSTATUS(ist) == 0)
      << "initiator: " << testing::DescribeStatus(ist) << " (its stderr says where)";
  EXPECT_TRUE(tst != -1 && WIFEXITED(tst) && WEXITSTATUS(tst) == 0)
      << "target: " << testing::DescribeStatus(tst) << " (its stderr says where)";
  ASSERT_TRUE(got) << "no figures from the initiator";
  const uint64_t rx = hosts.RxBytes() - rx_before;
  const uint64_t faults = f.faults_post + f.faults_cq + f.faults_completion + f.faults_registrar;
  printf("[figures] soak: %llu s, seed %llu\n"
         "  operations %llu (writes %llu, reads %llu, read-backs %llu), bytes verified %llu, "
         "target-side checks %llu\n"
         "  invalidations: munmap %llu, mremap %llu (%llu after Invalidate + Flush, %llu of "
         "them shrunk in place), madvise "
         "%llu; regions dropped %llu, memory events %llu\n"
         "  reconnects %llu, churn steps %llu, evictions %llu, hits %llu, misses %llu, stale "
         "hits %llu\n"
         "  faults injected %llu: post -FI_EAGAIN %llu, fi_cq_read -FI_EAGAIN %llu, error "
         "completions %llu (%llu operations failed and redone), registrar %llu (acquisitions "
         "retried %llu)\n"
         "  veth bytes received %llu\n",
         (unsigned long long)f.seconds, (unsigned long long)seed, (unsigned long long)f.operations,
         (unsigned long long)f.writes, (unsigned long long)f.reads,
         (unsigned long long)(f.operations - f.writes - f.reads),
         (unsigned long long)f.bytes_verified, (unsigned long long)f.target_checks,
         (unsigned long long)f.unmaps, (unsigned long long)f.remaps,
         (unsigned long long)f.remaps_dropped_first, (unsigned long long)f.remaps_shrunk,
         (unsigned long long)f.dontneeds, (unsigned long long)f.cache_invalidations,
         (unsigned long long)f.memory_events, (unsigned long long)f.reconnects,
         (unsigned long long)f.churn, (unsigned long long)f.evictions,
         (unsigned long long)f.hits, (unsigned long long)f.misses,
         (unsigned long long)f.stale_hits, (unsigned long long)faults,
         (unsigned long long)f.faults_post, (unsigned long long)f.faults_cq,
         (unsigned long long)f.faults_completion, (unsigned long long)f.failed_operations,
         (unsigned long long)f.faults_registrar, (unsigned long long)f.acquire_retries,
         (unsigned long long)rx);
  EXPECT_EQ(f.stale_hits, 0u);
  EXPECT_GT(f.operations, 0u);
  EXPECT_GT(f.bytes_verified, 0u);
  EXPECT_GT(f.cache_invalidations, 0u) << "no invalidation reached the cache";
  EXPECT_GT(f.reconnects, 0u);
  EXPECT_GT(faults, 0u);
  EXPECT_GE(rx, f.bytes_verified / 2) << "the data did not cross the veth pair";
}

}  // namespace
}  // namespace sanreg
