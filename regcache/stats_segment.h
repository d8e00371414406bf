// stats_segment.h: publishing each cache's statistics in a per-process shared-memory segment, so
// that `sanreg_stat` can read a live process from outside.
//
// The segment is the file /dev/shm/sanreg.<pid> (shm_open("/sanreg.<pid>"), mode 0600: only the
// owner, or root, reads it). It holds a header and kSlots slots, one per live cache; a publisher
// thread copies each registered cache's CacheStats into its slot every kPublishInterval, under a
// seqlock (odd sequence while writing). The segment is created with the first cache that publishes
// and unlinked at process exit (atexit) and when the last cache goes; a reader skips and removes
// the segments of processes that no longer exist (RemoveDeadSegments).
//
// Region tables (sanreg_stat --regions) are published on request only, so that a process nobody
// asks pays nothing for them: a reader bumps the header's region_requests and waits; on its next
// round the publisher lists each cache's regions (RegistrationCache::Regions, the first
// kMaxRegions of them and how many there are in all) into the slot's RegionTable, under the
// table's own seqlock, and stores the request count it answered in the table's `served`.
//
// Thread-safety: every function may be called from any thread.
// Invariants:
//   1. A slot's stats are read only when its sequence is even and unchanged across the copy; the
//      same for its region table.
//   2. A source is never called after Unpublish(id) returns.
//   3. A table whose `served` is n lists the regions as they were after request n was made.

#ifndef SANREG_REGCACHE_STATS_SEGMENT_H_
#define SANREG_REGCACHE_STATS_SEGMENT_H_

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "regcache/cache.h"

namespace sanreg {

// The wire layout of the segment (shared by writer and reader; version-checked).
struct PublishedStats {
  static constexpr int kCounters = 18;
  uint64_t cache_id;  // unique in the process
  uint64_t counters[kCounters];
  uint64_t registration_latency[CacheStats::kLatencyBuckets];
  uint64_t monitor_hooks;
  uint64_t monitor_uffd;
  char monitor_notes[128];  // NUL-terminated, truncated
};

// One region of a published table: RegionInfo's wire form.
struct PublishedRegion {
  uint64_t start;
  uint64_t length;
  uint32_t access;
  uint32_t references;
  uint32_t state;  // RegionInfo::State
  uint32_t reserved;
  uint64_t age_ns;
  uint64_t idle_ns;
};

struct StatsSegmentHeader {
  static constexpr uint64_t kMagic = 0x5354415447455253ull;  // "SREGTATS"
  static constexpr uint32_t kVersion = 2;
  static constexpr uint32_t kSlots = 32;
  static constexpr uint32_t kMaxRegions = 4096;  // regions listed per cache
  uint64_t magic;
  uint32_t version;
  uint32_t slots;
  int64_t pid;
  std::atomic<uint64_t> published_ns;     // CLOCK_REALTIME of the last publication
  std::atomic<uint64_t> region_requests;  // bumped by each reader that wants region tables
};

struct RegionTable {
  std::atomic<uint64_t> seq;     // odd while being written
  std::atomic<uint64_t> served;  // the region_requests value this table answers
  uint64_t cache_id;
  uint64_t published_ns;  // CLOCK_REALTIME when listed
  uint64_t total;         // regions the cache had; total - count were left out
  uint64_t count;         // entries in regions[]
  PublishedRegion regions[StatsSegmentHeader::kMaxRegions];
};

struct StatsSlot {
  std::atomic<uint64_t> seq;     // odd while being written
  std::atomic<uint64_t> in_use;  // 1 while a cache publishes here
  PublishedStats stats;
  RegionTable regions;
};

// The counters' names, in PublishedStats::counters order.
const char* const* PublishedCounterNames();

// Converts between CacheStats and the published form.
PublishedStats ToPublished(uint64_t cache_id, const CacheStats& s);
CacheStats FromPublished(const PublishedStats& p);

// What the publisher calls for a region table: fills *out with at most `max` regions and returns
// how many there are in all (RegistrationCache::Regions).
using RegionSource = std::function<size_t(size_t max, std::vector<RegionInfo>* out)>;

// Starts publishing `source()` (called on the publisher thread) as cache `cache_id`, and on request
// `regions` (none when empty: its table then lists nothing). Returns an id for Unpublish, or -1
// when the segment cannot be made or every slot is taken (publishing is best effort: the cache
// works without it).
int Publish(uint64_t cache_id, std::function<CacheStats()> source, RegionSource regions = nullptr);
// Stops publishing `id` and frees its slot; waits for a publication in progress.
void Unpublish(int id);
// Publishes every source now, on the calling thread (tests, and before a process reports ready),
// and answers a pending region request.
void PublishStatsNow();

// The segment path for `pid`.
std::string StatsSegmentPath(pid_t pid);

// A reader's view of one process's segment.
struct ProcessStats {
  pid_t pid = 0;
  uint64_t published_ns = 0;
  std::vector<std::pair<uint64_t, CacheStats>> caches;  // cache_id, stats
};

// Reads /dev/shm/sanreg.<pid>. kNotFound when there is none, kPermissionDenied when it may not
// be read, kDataLoss when it is not a segment of this version.
absl::StatusOr<ProcessStats> ReadStatsSegment(pid_t pid);

// The pids with a segment whose process is alive; removes the segments of dead processes.
std::vector<pid_t> ListStatsSegments();

// A reader's view of one process's region tables.
struct CacheRegions {
  uint64_t cache_id = 0;
  uint64_t total = 0;               // regions the cache had when it listed them
  std::vector<RegionInfo> regions;  // the first StatsSegmentHeader::kMaxRegions of them
};
struct ProcessRegions {
  pid_t pid = 0;
  uint64_t published_ns = 0;  // CLOCK_REALTIME of the oldest table
  std::vector<CacheRegions> caches;
};

// Asks process `pid` to list the regions of its caches and waits up to `timeout` for every cache
// that publishes to answer. Asking writes to the segment: kPermissionDenied unless the caller may
// (its owner, or root). kNotFound and kDataLoss as ReadStatsSegment; kDeadlineExceeded when the
// process did not answer in time (stopped, or busy exiting).
absl::StatusOr<ProcessRegions> ReadRegions(pid_t pid, std::chrono::milliseconds timeout);

}  // namespace sanreg

#endif  // SANREG_REGCACHE_STATS_SEGMENT_H_
