// stats_segment.cc: see stats_segment.h.

#include "regcache/stats_segment.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>
#include <mutex>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace sanreg {
namespace {

constexpr auto kPublishInterval = std::chrono::milliseconds(100);

// The seqlock's fences. ThreadSanitizer refuses atomic_thread_fence (-Wtsan); the writer and a
// reader are always different mappings (another process, or a separate read-only mapping), which
// it does not relate anyway, so a compiler barrier stands in for it there.
inline void Fence(std::memory_order order) {
#if defined(__SANITIZE_THREAD__)
  std::atomic_signal_fence(order);
#else
  std::atomic_thread_fence(order);
#endif
}

size_t SegmentBytes() {
  return sizeof(StatsSegmentHeader) + StatsSegmentHeader::kSlots * sizeof(StatsSlot);
}

StatsSlot* Slots(void* base) {
  return reinterpret_cast<StatsSlot*>(static_cast<char*>(base) + sizeof(StatsSegmentHeader));
}

uint64_t RealtimeNs() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000u + static_cast<uint64_t>(ts.tv_nsec);
}

std::string ShmName(pid_t pid) { return absl::StrCat("/sanreg.", pid); }

// The process's publisher: the segment, the sources and the thread. Never destroyed (the exit
// handler stops the thread and unlinks the segment).
class Publisher {
 public:
  static Publisher& Get() {
    static Publisher* p = new Publisher;
    return *p;
  }

  int Add(uint64_t cache_id, std::function<CacheStats()> source, RegionSource regions) {
    std::unique_lock<std::mutex> lock(mu_);
    if (exiting_ || !MapLocked()) return -1;
    for (int i = 0; i < static_cast<int>(StatsSegmentHeader::kSlots); ++i) {
      if (sources_[i]) continue;
      sources_[i] = std::move(source);
      region_sources_[i] = std::move(regions);
      ids_[i] = cache_id;
      // A table left by the slot's previous cache answers no request of this one.
      Slots(base_)[i].regions.served.store(0, std::memory_order_relaxed);
      PublishLocked(i);
      Slots(base_)[i].in_use.store(1, std::memory_order_release);
      if (thread_ == nullptr) thread_ = std::make_unique<std::thread>([this] { Loop(); });
      return i;
    }
    return -1;
  }

  void Remove(int id) {
    if (id < 0) return;
    std::unique_lock<std::mutex> lock(mu_);
    if (pid_ != getpid()) return;  // published by the parent of this forked child
    sources_[id] = nullptr;
    region_sources_[id] = nullptr;
    if (base_ != nullptr) Slots(base_)[id].in_use.store(0, std::memory_order_release);
  }

  void PublishAll() {
    std::unique_lock<std::mutex> lock(mu_);
    if (pid_ != getpid()) return;
    PublishAllLocked();
  }

 private:
  Publisher() {
    std::atexit([] { Get().Exit(); });
    // A fork while the publishing thread holds mu_ would leave mu_ locked for ever in the child,
    // where that thread does not exist (a child that then makes a cache hangs in Add). The forking
    // thread holds mu_ across the fork instead, and both sides let go of it.
    pthread_atfork([] { Get().mu_.lock(); }, [] { Get().mu_.unlock(); },
                   [] { Get().mu_.unlock(); });
  }

  // REQUIRES: mu_ held.
  bool MapLocked() {
    if (base_ != nullptr && pid_ != getpid()) {
      // A forked child: the mapping and the sources are the parent's, the thread did not follow.
      munmap(base_, SegmentBytes());
      base_ = nullptr;
      for (auto& s : sources_) s = nullptr;
      for (auto& r : region_sources_) r = nullptr;
      (void)thread_.release();  // the object names a thread of the parent: leak it
    }
    if (base_ != nullptr) return true;
    std::string name = ShmName(getpid());
    int fd = shm_open(name.c_str(), O_CREAT | O_RDWR | O_TRUNC, 0600);
    if (fd < 0) return false;
    if (ftruncate(fd, static_cast<off_t>(SegmentBytes())) != 0) {
      close(fd);
      shm_unlink(name.c_str());
      return false;
    }
    void* p = mmap(nullptr, SegmentBytes(), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
      shm_unlink(name.c_str());
      return false;
    }
    auto* h = static_cast<StatsSegmentHeader*>(p);
    h->version = StatsSegmentHeader::kVersion;
    h->slots = StatsSegmentHeader::kSlots;
    h->pid = getpid();
    h->published_ns.store(RealtimeNs());
    h->region_requests.store(0);
    Fence(std::memory_order_release);
    h->magic = StatsSegmentHeader::kMagic;
    base_ = p;
    pid_ = getpid();
    return true;
  }

  void PublishLocked(int i) {
    CacheStats s = sources_[i]();
    StatsSlot& slot = Slots(base_)[i];
    uint64_t seq = slot.seq.load(std::memory_order_relaxed);
    slot.seq.store(seq + 1, std::memory_order_relaxed);
    Fence(std::memory_order_release);
    slot.stats = ToPublished(ids_[i], s);
    slot.seq.store(seq + 2, std::memory_order_release);
  }

  void PublishAllLocked() {
    if (base_ == nullptr) return;
    for (int i = 0; i < static_cast<int>(StatsSegmentHeader::kSlots); ++i) {
      if (sources_[i]) PublishLocked(i);
    }
    auto* h = static_cast<StatsSegmentHeader*>(base_);
    h->published_ns.store(RealtimeNs());
    const uint64_t want = h->region_requests.load(std::memory_order_acquire);
    for (int i = 0; i < static_cast<int>(StatsSegmentHeader::kSlots); ++i) {
      if (!sources_[i]) continue;
      RegionTable& t = Slots(base_)[i].regions;
      if (t.served.load(std::memory_order_relaxed) != want) PublishRegionsLocked(i, want);
    }
  }

  // Lists slot i's regions (none without a region source) and marks request `want` answered.
  void PublishRegionsLocked(int i, uint64_t want) {
    size_t total = 0;
    region_buffer_.clear();
    if (region_sources_[i]) {
      total = region_sources_[i](StatsSegmentHeader::kMaxRegions, &region_buffer_);
    }
    RegionTable& t = Slots(base_)[i].regions;
    uint64_t seq = t.seq.load(std::memory_order_relaxed);
    t.seq.store(seq + 1, std::memory_order_relaxed);
    Fence(std::memory_order_release);
    t.cache_id = ids_[i];
    t.published_ns = RealtimeNs();
    t.total = total;
    t.count = std::min<size_t>(region_buffer_.size(), StatsSegmentHeader::kMaxRegions);
    for (size_t k = 0; k < t.count; ++k) {
      const RegionInfo& r = region_buffer_[k];
      t.regions[k] =
          PublishedRegion{r.start, r.length, r.access, r.references, static_cast<uint32_t>(r.state),
                          0,       r.age_ns, r.idle_ns};
    }
    t.seq.store(seq + 2, std::memory_order_release);
    t.served.store(want, std::memory_order_release);
  }

  void Loop() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!exiting_) {
      cv_.wait_for(lock, kPublishInterval);
      if (exiting_) break;
      // A forked child inherits no thread, so this runs in the creating process only.
      PublishAllLocked();
    }
  }

  void Exit() {
    {
      std::unique_lock<std::mutex> lock(mu_);
      exiting_ = true;
    }
    cv_.notify_all();
    if (pid_ != getpid()) return;  // a forked child that never published: nothing of its own
    if (thread_ != nullptr) thread_->join();
    if (base_ != nullptr) shm_unlink(ShmName(pid_).c_str());
  }

  std::mutex mu_;
  std::condition_variable cv_;
  void* base_ = nullptr;  // guarded by mu_
  pid_t pid_ = 0;
  bool exiting_ = false;
  std::function<CacheStats()> sources_[StatsSegmentHeader::kSlots];  // guarded by mu_
  RegionSource region_sources_[StatsSegmentHeader::kSlots];          // guarded by mu_
  std::vector<RegionInfo> region_buffer_;                            // guarded by mu_
  uint64_t ids_[StatsSegmentHeader::kSlots] = {};                      // guarded by mu_
  std::unique_ptr<std::thread> thread_;  // guarded by mu_
};

}  // namespace

const char* const* PublishedCounterNames() {
  static const char* const kNames[PublishedStats::kCounters] = {
      "hits",          "misses_absent",           "misses_rights",
      "misses_invalidated", "registrations",      "registration_failures",
      "deregistrations", "deregistration_failures", "evictions",
      "invalidations", "merges",                  "memory_events",
      "memory_event_overflows", "stale_hits",     "uncached_registrations",
      "regions",       "pinned_bytes",            "pinned_bytes_high_water"};
  return kNames;
}

PublishedStats ToPublished(uint64_t cache_id, const CacheStats& s) {
  PublishedStats p{};
  p.cache_id = cache_id;
  const uint64_t c[PublishedStats::kCounters] = {
      s.hits,          s.misses_absent,   s.misses_rights,          s.misses_invalidated,
      s.registrations, s.registration_failures, s.deregistrations, s.deregistration_failures,
      s.evictions,     s.invalidations,   s.merges,                 s.memory_events,
      s.memory_event_overflows, s.stale_hits, s.uncached_registrations, s.regions,
      s.pinned_bytes,  s.pinned_bytes_high_water};
  std::memcpy(p.counters, c, sizeof c);
  for (int i = 0; i < CacheStats::kLatencyBuckets; ++i) {
    p.registration_latency[i] = s.registration_latency[i];
  }
  p.monitor_hooks = s.monitor_hooks;
  p.monitor_uffd = s.monitor_uffd;
  std::strncpy(p.monitor_notes, s.monitor_notes.c_str(), sizeof p.monitor_notes - 1);
  return p;
}

CacheStats FromPublished(const PublishedStats& p) {
  CacheStats s;
  uint64_t* f[PublishedStats::kCounters] = {
      &s.hits,          &s.misses_absent,   &s.misses_rights,          &s.misses_invalidated,
      &s.registrations, &s.registration_failures, &s.deregistrations, &s.deregistration_failures,
      &s.evictions,     &s.invalidations,   &s.merges,                 &s.memory_events,
      &s.memory_event_overflows, &s.stale_hits, &s.uncached_registrations, &s.regions,
      &s.pinned_bytes,  &s.pinned_bytes_high_water};
  for (int i = 0; i < PublishedStats::kCounters; ++i) *f[i] = p.counters[i];
  for (int i = 0; i < CacheStats::kLatencyBuckets; ++i) {
    s.registration_latency[i] = p.registration_latency[i];
  }
  s.monitor_hooks = p.monitor_hooks != 0;
  s.monitor_uffd = p.monitor_uffd != 0;
  s.monitor_notes.assign(p.monitor_notes, strnlen(p.monitor_notes, sizeof p.monitor_notes));
  return s;
}

int Publish(uint64_t cache_id, std::function<CacheStats()> source, RegionSource regions) {
  return Publisher::Get().Add(cache_id, std::move(source), std::move(regions));
}

void Unpublish(int id) { Publisher::Get().Remove(id); }

void PublishStatsNow() { Publisher::Get().PublishAll(); }

std::string StatsSegmentPath(pid_t pid) { return absl::StrCat("/dev/shm/sanreg.", pid); }

namespace {

// Maps process pid's segment (read-only, or read-write to ask for region tables) and checks its
// header. Returns the mapping (SegmentBytes() long; the caller unmaps it).
absl::StatusOr<void*> MapSegment(pid_t pid, bool writable) {
  std::string name = ShmName(pid);
  int fd = shm_open(name.c_str(), writable ? O_RDWR : O_RDONLY, 0);
  if (fd < 0) {
    if (errno == EACCES) return absl::PermissionDeniedError(StatsSegmentPath(pid));
    return absl::NotFoundError(absl::StrCat("no sanreg statistics for pid ", pid));
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) < sizeof(StatsSegmentHeader)) {
    close(fd);
    return absl::DataLossError(absl::StrCat(StatsSegmentPath(pid), " is not a sanreg segment"));
  }
  if (static_cast<size_t>(st.st_size) != SegmentBytes()) {
    close(fd);
    return absl::DataLossError(absl::StrCat(StatsSegmentPath(pid), " has another version"));
  }
  void* p = mmap(nullptr, SegmentBytes(), writable ? PROT_READ | PROT_WRITE : PROT_READ, MAP_SHARED,
                 fd, 0);
  close(fd);
  if (p == MAP_FAILED) return absl::PermissionDeniedError(StatsSegmentPath(pid));
  auto* h = static_cast<const StatsSegmentHeader*>(p);
  if (h->magic != StatsSegmentHeader::kMagic || h->version != StatsSegmentHeader::kVersion ||
      h->slots != StatsSegmentHeader::kSlots) {
    munmap(p, SegmentBytes());
    return absl::DataLossError(absl::StrCat(StatsSegmentPath(pid), " has another version"));
  }
  return p;
}

}  // namespace

absl::StatusOr<ProcessStats> ReadStatsSegment(pid_t pid) {
  absl::StatusOr<void*> p = MapSegment(pid, /*writable=*/false);
  if (!p.ok()) return p.status();
  auto* h = static_cast<const StatsSegmentHeader*>(*p);
  ProcessStats ps;
  ps.pid = pid;
  ps.published_ns = h->published_ns.load(std::memory_order_acquire);
  StatsSlot* slots = Slots(*p);
  for (uint32_t i = 0; i < StatsSegmentHeader::kSlots; ++i) {
    for (int attempt = 0; attempt < 1000; ++attempt) {
      uint64_t s0 = slots[i].seq.load(std::memory_order_acquire);
      if (s0 & 1) continue;
      if (slots[i].in_use.load(std::memory_order_acquire) == 0) break;
      PublishedStats copy;
      std::memcpy(&copy, &slots[i].stats, sizeof copy);
      Fence(std::memory_order_acquire);
      if (slots[i].seq.load(std::memory_order_relaxed) != s0) continue;
      ps.caches.emplace_back(copy.cache_id, FromPublished(copy));
      break;
    }
  }
  munmap(*p, SegmentBytes());
  return ps;
}

absl::StatusOr<ProcessRegions> ReadRegions(pid_t pid, std::chrono::milliseconds timeout) {
  absl::StatusOr<void*> p = MapSegment(pid, /*writable=*/true);
  if (!p.ok()) return p.status();
  auto* h = static_cast<StatsSegmentHeader*>(*p);
  StatsSlot* slots = Slots(*p);
  const uint64_t ticket = h->region_requests.fetch_add(1, std::memory_order_acq_rel) + 1;
  // Every slot in use must answer this request (or a later one); the publisher looks every
  // kPublishInterval.
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  auto answered = [&] {
    for (uint32_t i = 0; i < StatsSegmentHeader::kSlots; ++i) {
      if (slots[i].in_use.load(std::memory_order_acquire) != 0 &&
          slots[i].regions.served.load(std::memory_order_acquire) < ticket) {
        return false;
      }
    }
    return true;
  };
  while (!answered()) {
    if (std::chrono::steady_clock::now() >= deadline) {
      munmap(*p, SegmentBytes());
      return absl::DeadlineExceededError(
          absl::StrCat("pid ", pid, " did not list its regions within ", timeout.count(), " ms"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ProcessRegions out;
  out.pid = pid;
  auto table = std::make_unique<RegionTable>();  // 192 KiB: not on the stack
  for (uint32_t i = 0; i < StatsSegmentHeader::kSlots; ++i) {
    const RegionTable& t = slots[i].regions;
    for (int attempt = 0; attempt < 1000; ++attempt) {
      if (slots[i].in_use.load(std::memory_order_acquire) == 0) break;
      uint64_t s0 = t.seq.load(std::memory_order_acquire);
      if (s0 & 1) continue;
      table->cache_id = t.cache_id;
      table->published_ns = t.published_ns;
      table->total = t.total;
      table->count = std::min<uint64_t>(t.count, StatsSegmentHeader::kMaxRegions);
      std::memcpy(table->regions, t.regions, table->count * sizeof(PublishedRegion));
      Fence(std::memory_order_acquire);
      if (t.seq.load(std::memory_order_relaxed) != s0) continue;
      CacheRegions c;
      c.cache_id = table->cache_id;
      c.total = table->total;
      for (uint64_t k = 0; k < table->count; ++k) {
        const PublishedRegion& r = table->regions[k];
        RegionInfo info;
        info.start = r.start;
        info.length = r.length;
        info.access = r.access;
        info.references = r.references;
        info.state = static_cast<RegionInfo::State>(r.state);
        info.age_ns = r.age_ns;
        info.idle_ns = r.idle_ns;
        c.regions.push_back(info);
      }
      if (out.published_ns == 0 || table->published_ns < out.published_ns) {
        out.published_ns = table->published_ns;
      }
      out.caches.push_back(std::move(c));
      break;
    }
  }
  munmap(*p, SegmentBytes());
  return out;
}

std::vector<pid_t> ListStatsSegments() {
  std::vector<pid_t> pids;
  DIR* d = opendir("/dev/shm");
  if (d == nullptr) return pids;
  while (dirent* e = readdir(d)) {
    absl::string_view n = e->d_name;
    if (n.rfind("sanreg.", 0) != 0) continue;
    int pid;
    if (!absl::SimpleAtoi(n.substr(7), &pid) || pid <= 0) continue;
    if (kill(pid, 0) != 0 && errno == ESRCH) {
      shm_unlink(ShmName(pid).c_str());  // a dead process's segment
      continue;
    }
    pids.push_back(pid);
  }
  closedir(d);
  std::sort(pids.begin(), pids.end());
  return pids;
}

}  // namespace sanreg
