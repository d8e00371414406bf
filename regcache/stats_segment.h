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
// Thread-safety: every function may be called from any thread.
// Invariants:
//   1. A slot's stats are read only when its sequence is even and unchanged across the copy.
//   2. A source is never called after Unpublish(id) returns.

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

struct StatsSegmentHeader {
  static constexpr uint64_t kMagic = 0x5354415447455253ull;  // "SREGTATS"
  static constexpr uint32_t kVersion = 1;
  static constexpr uint32_t kSlots = 32;
  uint64_t magic;
  uint32_t version;
  uint32_t slots;
  int64_t pid;
  std::atomic<uint64_t> published_ns;  // CLOCK_REALTIME of the last publication
};

struct StatsSlot {
  std::atomic<uint64_t> seq;     // odd while being written
  std::atomic<uint64_t> in_use;  // 1 while a cache publishes here
  PublishedStats stats;
};

// The counters' names, in PublishedStats::counters order.
const char* const* PublishedCounterNames();

// Converts between CacheStats and the published form.
PublishedStats ToPublished(uint64_t cache_id, const CacheStats& s);
CacheStats FromPublished(const PublishedStats& p);

// Starts publishing `source()` (called on the publisher thread) as cache `cache_id`. Returns an id
// for Unpublish, or -1 when the segment cannot be made or every slot is taken (publishing is best
// effort: the cache works without it).
int Publish(uint64_t cache_id, std::function<CacheStats()> source);
// Stops publishing `id` and frees its slot; waits for a publication in progress.
void Unpublish(int id);
// Publishes every source now, on the calling thread (tests, and before a process reports ready).
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

}  // namespace sanreg

#endif  // SANREG_REGCACHE_STATS_SEGMENT_H_
