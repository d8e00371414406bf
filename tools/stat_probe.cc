// stat_probe: a process that holds known registrations, for sanreg_stat_test.
//
// Creates one cache over a fake registrar and, in a 32-page arena, registers four disjoint regions
// (4 misses, 4 registrations) and takes one more reference with a hit:
//   pages  0     1 page,  local_read,              2 references (the hit): active
//   pages  8-9   2 pages, local_read,              released:               idle
//   pages 16-19  4 pages, local_read+local_write,  1 reference:            active
//   pages 24     1 page,  local_read,              1 reference, then Invalidate: invalidated
// (8 pages pinned; 3 regions in the index; 1 invalidation). Publishes its statistics, prints
// "ready <pid> <arena address>" and holds everything until its stdin closes; then exits normally.

#include <sys/mman.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <utility>
#include <vector>

#include "regcache/cache.h"
#include "regcache/fake_registrar.h"
#include "regcache/stats_segment.h"

int main() {
  sanreg::FakeRegistrar fake;
  sanreg::RegistrationCache::Options o;
  o.memory_monitor = sanreg::MemoryMonitorMode::kNone;
  auto cache = sanreg::RegistrationCache::Create(&fake, o);
  if (!cache.ok()) return 1;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* p = mmap(nullptr, 32 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return 1;
  char* arena = static_cast<char*>(p);
  constexpr uint32_t kRead = sanreg::kAccessLocalRead;
  constexpr uint32_t kReadWrite = sanreg::kAccessLocalRead | sanreg::kAccessLocalWrite;
  struct Want {
    int first, pages;
    uint32_t access;
  };
  std::vector<sanreg::RegionRef> refs;
  for (Want w :
       {Want{0, 1, kRead}, Want{8, 2, kRead}, Want{16, 4, kReadWrite}, Want{24, 1, kRead}}) {
    auto r = (*cache)->Acquire(arena + w.first * page, w.pages * page, w.access);
    if (!r.ok()) return 1;
    refs.push_back(*std::move(r));
  }
  auto hit = (*cache)->Acquire(arena, page, kRead);
  if (!hit.ok()) return 1;
  refs[1].Reset();  // idle
  auto dropped = (*cache)->Invalidate(arena + 24 * page, page);
  if (!dropped.ok() || *dropped != 1) return 1;
  sanreg::PublishStatsNow();
  std::printf("ready %d %" PRIuPTR "\n", static_cast<int>(getpid()),
              reinterpret_cast<uintptr_t>(arena));
  std::fflush(stdout);
  char c;
  while (read(STDIN_FILENO, &c, 1) > 0) {
  }
  hit->Reset();
  refs.clear();
  cache->reset();
  munmap(p, 32 * page);
  return 0;
}
