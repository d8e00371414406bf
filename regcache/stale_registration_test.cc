// No stale registration: for each memory-event source and each way memory can change, register
// a range (cached), change the memory behind it, map new memory at the same address, and check that
// the next Acquire registers the new pages. The cache runs in verification mode: every hit compares
// the region's recorded physical frames with the frames mapped now (kDataLoss on a stale hit), so
// the tests prove it by page identity, not by counters. They skip, saying so, where frame numbers
// are not readable (not root).

#include <gtest/gtest.h>
#include <malloc.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "regcache/cache.h"
#include "regcache/memory_events.h"
#include "regcache/pin_registrar.h"
#include "regcache/test_seed.h"

namespace sanreg {
namespace {

const size_t kPage = static_cast<size_t>(sysconf(_SC_PAGESIZE));
constexpr uint32_t kRw = kAccessLocalRead | kAccessLocalWrite;

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kSanitizerAllocator = true;
#else
constexpr bool kSanitizerAllocator = false;
#endif

// Fails the test with a message if `done` is not set within the limit: for tests that could hang.
class Watchdog {
 public:
  Watchdog(const char* what, std::chrono::seconds limit) : what_(what) {
    thread_ = std::thread([this, limit] {
      std::unique_lock<std::mutex> lock(mu_);
      if (!cv_.wait_for(lock, limit, [this] { return done_; })) {
        std::fprintf(stderr, "WATCHDOG: %s stalled for %lld s (deadlock?)\n", what_,
                     static_cast<long long>(limit.count()));
        std::abort();
      }
    });
  }
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  const char* what_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

const char* ModeName(MemoryMonitorMode m) {
  switch (m) {
    case MemoryMonitorMode::kAuto:
      return "Auto";
    case MemoryMonitorMode::kHooks:
      return "Hooks";
    case MemoryMonitorMode::kUffd:
      return "Uffd";
    case MemoryMonitorMode::kNone:
      return "None";
  }
  return "?";
}

class StaleRegistrationTest : public ::testing::TestWithParam<MemoryMonitorMode> {
 protected:
  void SetUp() override {
    if (!PinRegistrar::PageFramesReadable()) {
      GTEST_SKIP() << "physical frame numbers are not readable (needs root): the page-identity "
                      "checks cannot run";
    }
    PinRegistrar::Options po;
    po.record_pages = true;
    pin_ = std::make_unique<PinRegistrar>(po);
    RegistrationCache::Options o;
    o.memory_monitor = GetParam();
    o.verify_pages = true;
    auto c = RegistrationCache::Create(pin_.get(), o);
    ASSERT_TRUE(c.ok()) << c.status();
    cache_ = std::move(*c);
    CacheStats s = cache_->Stats();
    if (GetParam() == MemoryMonitorMode::kUffd && !s.monitor_uffd) {
      GTEST_SKIP() << "userfaultfd unavailable here: " << s.monitor_notes;
    }
    if (GetParam() != MemoryMonitorMode::kUffd) {
      ASSERT_TRUE(s.monitor_hooks)
          << "the hooks must be linked into this test: " << s.monitor_notes;
    }
  }

  void TearDown() override {
    if (cache_) EXPECT_EQ(cache_->Stats().stale_hits, 0u);
  }

  bool uffd_only() const { return GetParam() == MemoryMonitorMode::kUffd; }

  // userfaultfd reports a change just after it returns; the other sources before. With uffd
  // alone, make the change visible before the next lookup (what Flush promises).
  void AfterChange() {
    if (uffd_only()) cache_->Flush();
  }

  // Acquires [p, p + len) and returns the registration handle (0 on error).
  uint64_t Handle(const void* p, size_t len) {
    auto r = cache_->Acquire(p, len, kRw);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? r->registration().handle : 0;
  }

  static char* MapAnon(size_t len) {
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    EXPECT_NE(p, MAP_FAILED) << std::strerror(errno);
    return p == MAP_FAILED ? nullptr : static_cast<char*>(p);
  }

  // Maps `len` bytes at `at` again, after the test unmapped it. Another thread (a sanitizer's
  // allocator, Flush's marker page) may have taken the hole meanwhile: then returns nullptr.
  static char* MapAgain(size_t len, void* at) {
    void* p = mmap(at, len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    if (p != at) {  // a kernel without MAP_FIXED_NOREPLACE placed it elsewhere
      munmap(p, len);
      return nullptr;
    }
    return static_cast<char*>(p);
  }

  // Runs `scenario` until it could map its address again (it returns false when MapAgain lost the
  // address to another mapping), at most 5 times.
  template <typename Scenario>
  void WithRetries(Scenario scenario) {
    for (int attempt = 0; attempt < 5; ++attempt) {
      if (scenario()) return;
    }
    FAIL() << "another mapping took the unmapped address 5 times in a row";
  }

  std::unique_ptr<PinRegistrar> pin_;
  std::unique_ptr<RegistrationCache> cache_;
};

TEST_P(StaleRegistrationTest, CachedHitCostsNoRegistration) {
  char* p = MapAnon(4 * kPage);
  std::memset(p, 'A', 4 * kPage);
  uint64_t h1 = Handle(p, 4 * kPage);
  EXPECT_EQ(Handle(p, 4 * kPage), h1);
  EXPECT_EQ(cache_->Stats().registrations, 1u);
  munmap(p, 4 * kPage);
}

TEST_P(StaleRegistrationTest, MunmapThenMapAgainRegistersNewPages) {
  WithRetries([&] {
    const size_t len = 8 * kPage;
    char* p = MapAnon(len);
    std::memset(p, 'A', len);
    uint64_t h1 = Handle(p, len);
    EXPECT_EQ(munmap(p, len), 0);
    AfterChange();
    char* q = MapAgain(len, p);
    if (q == nullptr) return false;
    std::memset(q, 'B', len);
    uint64_t h2 = Handle(q, len);
    EXPECT_NE(h2, h1) << "a hit on the unmapped registration";
    EXPECT_GE(cache_->Stats().invalidations, 1u);
    munmap(q, len);
    return true;
  });
}

TEST_P(StaleRegistrationTest, MapFixedOverRegisteredRangeRegistersNewPages) {
  const size_t len = 4 * kPage;
  char* p = MapAnon(len);
  std::memset(p, 'A', len);
  uint64_t h1 = Handle(p, len);
  void* q = mmap(p, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
  ASSERT_EQ(q, p);
  AfterChange();
  std::memset(p, 'B', len);
  EXPECT_NE(Handle(p, len), h1);
  munmap(p, len);
}

TEST_P(StaleRegistrationTest, MremapMoveRegistersNewPagesAtBothAddresses) {
  WithRetries([&] {
    const size_t len = 4 * kPage;
    char* p = MapAnon(len);
    char* target = MapAnon(len);  // a place to move to
    std::memset(p, 'A', len);
    uint64_t h1 = Handle(p, len);
    void* moved = mremap(p, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, target);
    EXPECT_EQ(moved, target) << std::strerror(errno);
    AfterChange();
    uint64_t h3 = Handle(target, len);
    EXPECT_NE(h3, h1);
    EXPECT_EQ(target[0], 'A') << "mremap moved the data";
    char* again = MapAgain(len, p);
    if (again == nullptr) {
      munmap(target, len);
      return false;
    }
    std::memset(again, 'B', len);
    EXPECT_NE(Handle(again, len), h1);
    munmap(again, len);
    munmap(target, len);
    return true;
  });
}

TEST_P(StaleRegistrationTest, MremapGrowRegistersTheGrownRange) {
  const size_t len = 4 * kPage;
  char* p = MapAnon(len);
  std::memset(p, 'A', len);
  uint64_t h1 = Handle(p, len);
  void* q = mremap(p, len, 64 * len, MREMAP_MAYMOVE);
  ASSERT_NE(q, MAP_FAILED);
  AfterChange();
  std::memset(q, 'B', 64 * len);
  EXPECT_NE(Handle(q, 64 * len), h1);
  if (q != p) {
    if (char* again = MapAgain(len, p)) {  // else another mapping took it: nothing to check
      EXPECT_NE(Handle(again, len), h1);
      munmap(again, len);
    }
  }
  munmap(q, 64 * len);
}

TEST_P(StaleRegistrationTest, MadviseDontneedRegistersNewPages) {
  const size_t len = 4 * kPage;
  char* p = MapAnon(len);
  std::memset(p, 'A', len);
  uint64_t h1 = Handle(p, len);
  // The pages are pinned (mlocked): plain MADV_DONTNEED refuses locked pages; the _LOCKED variant
  // (Linux 5.18) drops them.
#ifndef MADV_DONTNEED_LOCKED
  constexpr int MADV_DONTNEED_LOCKED = 24;
#endif
  if (madvise(p, len, MADV_DONTNEED_LOCKED) != 0) {
    munmap(p, len);
    GTEST_SKIP() << "MADV_DONTNEED_LOCKED unsupported: " << std::strerror(errno);
  }
  AfterChange();
  EXPECT_EQ(p[0], 0) << "the dropped pages come back as zero pages";
  std::memset(p, 'B', len);
  EXPECT_NE(Handle(p, len), h1);
  munmap(p, len);
}

TEST_P(StaleRegistrationTest, ShmdtThenMapAgainRegistersNewPages) {
  WithRetries([&] {
    const size_t len = 4 * kPage;
    int id = shmget(IPC_PRIVATE, len, IPC_CREAT | 0600);
    char* p = id < 0 ? reinterpret_cast<char*>(-1) : static_cast<char*>(shmat(id, nullptr, 0));
    if (id < 0 || p == reinterpret_cast<char*>(-1)) {
      ADD_FAILURE() << "shmget/shmat: " << std::strerror(errno);
      return true;
    }
    shmctl(id, IPC_RMID, nullptr);  // destroyed at detach
    std::memset(p, 'A', len);
    uint64_t h1 = Handle(p, len);
    EXPECT_EQ(shmdt(p), 0);
    AfterChange();
    char* q = MapAgain(len, p);
    if (q == nullptr) return false;
    std::memset(q, 'B', len);
    EXPECT_NE(Handle(q, len), h1);
    munmap(q, len);
    return true;
  });
}

// The brk scenario; returns 0 or the failed step (77: malloc moved the break meanwhile).
int BrkScenario(MemoryMonitorMode mode) {
  PinRegistrar::Options po;
  po.record_pages = true;
  po.dont_fork = false;
  PinRegistrar pin(po);
  RegistrationCache::Options o;
  o.memory_monitor = mode;
  o.verify_pages = true;
  auto c = RegistrationCache::Create(&pin, o);
  if (!c.ok()) return 10;
  auto& cache = *c;
  const intptr_t len = static_cast<intptr_t>(16 * kPage);
  {  // Warm up the cache's own allocations so malloc does not move the break below.
    char* w = static_cast<char*>(
        mmap(nullptr, kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    w[0] = 1;
    auto r = cache->Acquire(w, kPage, kRw);
    if (!r.ok()) return 11;
  }
  char* top = static_cast<char*>(sbrk(0));
  char* top_aligned =
      reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(top) + kPage - 1) & ~(kPage - 1));
  if (sbrk(top_aligned - top + len) == reinterpret_cast<void*>(-1)) return 12;
  std::memset(top_aligned, 'A', len);
  uint64_t h1;
  {
    auto r = cache->Acquire(top_aligned, len, kRw);
    if (!r.ok()) return 13;
    h1 = r->registration().handle;
  }
  if (sbrk(0) != top_aligned + len) return 77;
  if (sbrk(-len) == reinterpret_cast<void*>(-1)) return 14;
  if (mode == MemoryMonitorMode::kUffd) cache->Flush();
  if (sbrk(len) == reinterpret_cast<void*>(-1)) return 15;
  if (top_aligned[0] != 0) return 16;  // fresh heap pages are zero
  std::memset(top_aligned, 'B', len);
  auto r = cache->Acquire(top_aligned, len, kRw);
  if (!r.ok()) return r.status().code() == absl::StatusCode::kDataLoss ? 17 : 18;
  if (r->registration().handle == h1) return 19;
  r->Reset();
  cache.reset();
  sbrk(-(top_aligned - top + len));  // give the heap back as it was
  return 0;
}

// brk moves the heap's end, which glibc's malloc also moves: run the scenario in a child that does
// nothing else. Under the sanitizers malloc never uses brk, and ThreadSanitizer cannot start
// threads in the child of a threaded process, so the scenario runs in this process there.
TEST_P(StaleRegistrationTest, HeapShrinkThroughBrkRegistersNewPages) {
  int code;
  if (kSanitizerAllocator) {
    code = BrkScenario(GetParam());
  } else {
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) _exit(BrkScenario(GetParam()));
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status)) << "child died, signal " << WTERMSIG(status);
    code = WEXITSTATUS(status);
  }
  if (code == 77) GTEST_SKIP() << "malloc moved the break during the test";
  EXPECT_EQ(code, 0) << "step failed (the code names the step in BrkScenario)";
}

// malloc/free of blocks above the mmap threshold, again and again: freed blocks come back at the
// same addresses. Every hit is checked by page identity.
TEST_P(StaleRegistrationTest, MallocFreeChurnNeverHitsStalePages) {
  if (GetParam() == MemoryMonitorMode::kHooks && kSanitizerAllocator) {
    GTEST_SKIP() << "the sanitizer's allocator unmaps with raw system calls, which no "
                    "interposition sees; only the userfaultfd source covers it";
  }
  Watchdog dog("malloc/free churn", std::chrono::seconds(120));
  const size_t len = 1 << 20;  // above glibc's default 128 KiB mmap threshold
  for (int i = 0; i < 200; ++i) {
    char* p = static_cast<char*>(malloc(len));
    ASSERT_NE(p, nullptr);
    std::memset(p, i, len);
    if (GetParam() != MemoryMonitorMode::kHooks && kSanitizerAllocator) cache_->Flush();
    auto r = cache_->Acquire(p, len, kRw);
    ASSERT_TRUE(r.ok()) << "round " << i << ": " << r.status();
    r->Reset();
    free(p);
    AfterChange();
  }
  EXPECT_EQ(cache_->Stats().stale_hits, 0u);
}

TEST_P(StaleRegistrationTest, ReallocThatMovesRegistersTheNewBlock) {
  if (GetParam() == MemoryMonitorMode::kHooks && kSanitizerAllocator) {
    GTEST_SKIP() << "the sanitizer's allocator unmaps with raw system calls (see above)";
  }
  const size_t len = 1 << 20;
  char* p = static_cast<char*>(malloc(len));
  ASSERT_NE(p, nullptr);
  std::memset(p, 'A', len);
  uint64_t h1 = Handle(p, len);
  char* q = static_cast<char*>(realloc(p, 16 * len));
  ASSERT_NE(q, nullptr);
  AfterChange();
  if (kSanitizerAllocator) cache_->Flush();
  std::memset(q, 'B', 16 * len);
  EXPECT_NE(Handle(q, 16 * len), h1);
  free(q);
}

// Threads unmap and map their own chunks while others acquire ranges in every chunk. Bounded;
// the watchdog fails the test if anything stalls. During the storm a hit may race a change on
// another thread (linearizable either way, and the verification, done after the hit, may see the
// pages change under it), so the test checks what must hold once the storm is over: no error from
// the mappers, and, after Flush, every chunk's region is the chunk's current pages.
TEST_P(StaleRegistrationTest, UnmapStormWhileOtherThreadsAcquire) {
  const uint64_t seed = TestSeed();
  std::printf("UnmapStorm seed=%llu\n", static_cast<unsigned long long>(seed));
  Watchdog dog("unmap storm", std::chrono::seconds(120));
  RegistrationCache::Options o;
  o.memory_monitor = GetParam();
  o.verify_pages = true;
  auto created = RegistrationCache::Create(pin_.get(), o);
  ASSERT_TRUE(created.ok());
  RegistrationCache& cache = **created;
  constexpr int kChunks = 8;
  const size_t len = 4 * kPage;
  char* arena = MapAnon(kChunks * len);  // reserve the addresses; chunks are remapped in place
  std::memset(arena, 1, kChunks * len);
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> errors{0}, acquires{0};
  std::atomic<bool> owned[kChunks];  // whether the chunk's address is still this test's mapping
  for (auto& o : owned) o.store(true);
  std::vector<std::thread> threads;
  // Mappers: each owns two chunks and replaces them, by munmap + mmap or by MAP_FIXED.
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      // After an munmap another thread's mapping (a thread stack, the sanitizer's allocator) may
      // take the hole, so the chunk is mapped again with MAP_FIXED_NOREPLACE, never clobbering;
      // a chunk that lost its address stays unmapped until a later round gets it back.
      std::mt19937_64 rng(seed + t);
      bool mapped[2] = {true, true};
      for (int i = 0; i < 300; ++i) {
        const int k = rng() % 2;
        char* c = arena + (t * 2 + k) * len;
        const int prot = PROT_READ | PROT_WRITE;
        if (!mapped[k]) {
          mapped[k] =
              mmap(c, len, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0) == c;
        } else if (rng() % 2) {
          if (munmap(c, len) != 0) errors.fetch_add(1);
          void* q = mmap(c, len, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
          mapped[k] = q == c;
          if (q != MAP_FAILED && q != c) munmap(q, len);
        } else if (mmap(c, len, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != c) {
          errors.fetch_add(1);  // replacing our own mapping in place cannot fail
        }
        if (mapped[k]) std::memset(c, i, len);
      }
      for (int k = 0; k < 2; ++k) {  // leave every chunk mapped for the final check
        char* c = arena + (t * 2 + k) * len;
        for (int tries = 0; !mapped[k] && tries < 100; ++tries) {
          mapped[k] = mmap(c, len, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0) == c;
        }
        owned[t * 2 + k].store(mapped[k]);
      }
    });
  }
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(seed + 100 + t);
      while (!stop.load()) {
        auto r = cache.Acquire(arena + (rng() % kChunks) * len, len, kRw);
        if (r.ok()) acquires.fetch_add(1);
      }
    });
  }
  threads[0].join();
  threads[1].join();
  stop.store(true);
  threads[2].join();
  threads[3].join();
  EXPECT_EQ(errors.load(), 0u);
  EXPECT_GT(acquires.load(), 0u);
  cache.Flush();
  const uint64_t stale_during_storm = cache.Stats().stale_hits;
  for (int c = 0; c < kChunks; ++c) {
    if (!owned[c].load()) continue;  // another mapping holds the address now
    auto r = cache.Acquire(arena + c * len, len, kRw);
    EXPECT_TRUE(r.ok()) << "chunk " << c << ": a stale region survived the storm: " << r.status();
  }
  EXPECT_EQ(cache.Stats().stale_hits, stale_during_storm);
  std::printf("storm: %llu acquires, %llu verification races during the storm\n",
              static_cast<unsigned long long>(acquires.load()),
              static_cast<unsigned long long>(stale_during_storm));
  for (int c = 0; c < kChunks; ++c) {
    if (owned[c].load()) munmap(arena + c * len, len);  // never another thread's mapping
  }
}

// A registrar that itself allocates, maps and unmaps (re-entrancy): the hooks fire inside the
// cache's registration, while it holds its lock. Must not deadlock (watchdog) and must work.
class AllocatingRegistrar : public Registrar {
 public:
  absl::StatusOr<Registration> Register(uintptr_t addr, size_t len, uint32_t access) override {
    Churn();
    return pin_.Register(addr, len, access);
  }
  absl::Status Deregister(const Registration& reg) override {
    Churn();
    return pin_.Deregister(reg);
  }

 private:
  void Churn() {
    std::vector<char> v(1 << 16, 1);  // malloc and free
    void* p = mmap(nullptr, 3 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    static_cast<char*>(p)[0] = v[0];
    madvise(p, 4096, MADV_DONTNEED);
    munmap(p, 3 * 4096);
  }
  PinRegistrar pin_;
};

TEST_P(StaleRegistrationTest, RegistrarThatUnmapsDoesNotDeadlock) {
  Watchdog dog("re-entrant registrar", std::chrono::seconds(60));
  AllocatingRegistrar reg;
  RegistrationCache::Options o;
  o.memory_monitor = GetParam();
  auto c = RegistrationCache::Create(&reg, o);
  ASSERT_TRUE(c.ok());
  const size_t len = 16 * kPage;
  char* p = MapAnon(len);
  for (int i = 0; i < 200; ++i) {
    auto r = (*c)->Acquire(p + (i % 8) * kPage, kPage, kRw);
    ASSERT_TRUE(r.ok()) << r.status();
    if (i % 10 == 0) ASSERT_TRUE((*c)->Invalidate(p, len).ok());
  }
  (*c)->Flush();
  munmap(p, len);
  c->reset();
}

// fork with registered memory: the pinned range is MADV_DONTFORK, so the child's writes and the
// parent's writes after the fork never move the parent's pages.
TEST_P(StaleRegistrationTest, ForkDoesNotMoveRegisteredPages) {
  const size_t len = 4 * kPage;
  char* p = MapAnon(len);
  std::memset(p, 'A', len);
  auto r = cache_->Acquire(p, len, kRw);
  ASSERT_TRUE(r.ok());
  char* other = MapAnon(kPage);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    other[0] = 'C';  // the child works on its own memory; the registered range is not there
    _exit(0);
  }
  std::memset(p, 'P', len);  // the parent writes while the child lives
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  EXPECT_TRUE(pin_->VerifyPages(r->registration()).ok()) << "the parent's pages moved";
  auto again = cache_->Acquire(p, len, kRw);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->registration().handle, r->registration().handle);
  munmap(other, kPage);
  r->Reset();
  again->Reset();
  munmap(p, len);
}

// The hazard MADV_DONTFORK prevents, shown: without it the parent's write after fork moves its
// page.
TEST(ForkHazardTest, WithoutDontForkTheParentsWriteMovesItsPage) {
  if (!PinRegistrar::PageFramesReadable()) GTEST_SKIP() << "frame numbers not readable";
  PinRegistrar::Options po;
  po.dont_fork = false;
  po.record_pages = true;
  PinRegistrar pin(po);
  char* p = static_cast<char*>(
      mmap(nullptr, kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  p[0] = 'A';
  auto reg = pin.Register(reinterpret_cast<uintptr_t>(p), kPage, kRw);
  ASSERT_TRUE(reg.ok());
  int to_child[2];
  ASSERT_EQ(pipe(to_child), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    char b;
    // Keeps the page shared until the parent wrote.
    if (read(to_child[0], &b, 1) != 1) _exit(2);
    _exit(p[0] == 'A' ? 0 : 1);
  }
  p[0] = 'P';  // copy-on-write: the parent gets a new page
  ASSERT_EQ(write(to_child[1], "x", 1), 1);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_EQ(pin.VerifyPages(*reg).code(), absl::StatusCode::kDataLoss);
  ASSERT_TRUE(pin.Deregister(*reg).ok());
  close(to_child[0]);
  close(to_child[1]);
  munmap(p, kPage);
}

INSTANTIATE_TEST_SUITE_P(Sources, StaleRegistrationTest,
                         ::testing::Values(MemoryMonitorMode::kHooks, MemoryMonitorMode::kUffd,
                                           MemoryMonitorMode::kAuto),
                         [](const testing::TestParamInfo<MemoryMonitorMode>& info) {
                           return ModeName(info.param);
                         });

}  // namespace
}  // namespace sanreg
