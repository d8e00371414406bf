// stat_probe: a process that holds known registrations, for sanreg_stat_test.
//
// Creates one cache over a fake registrar, acquires three disjoint regions of 1, 2 and 4 pages
// (7 pages pinned, 3 registrations, 3 misses) and one hit, publishes its statistics, prints
// "ready <pid>" and holds everything until its stdin closes; then exits normally.

#include <sys/mman.h>
#include <unistd.h>

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
  std::vector<sanreg::RegionRef> refs;
  for (auto [first, pages] : {std::pair{0, 1}, std::pair{8, 2}, std::pair{16, 4}}) {
    auto r = (*cache)->Acquire(arena + first * page, pages * page, sanreg::kAccessLocalRead);
    if (!r.ok()) return 1;
    refs.push_back(*std::move(r));
  }
  auto hit = (*cache)->Acquire(arena, page, sanreg::kAccessLocalRead);
  if (!hit.ok()) return 1;
  sanreg::PublishStatsNow();
  std::printf("ready %d\n", static_cast<int>(getpid()));
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
