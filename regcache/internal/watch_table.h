// internal/watch_table.h: reference counts of watched address ranges, for UffdMonitor. Not API.
//
// Every cached region whose range the userfaultfd monitor watches holds one count on each page of
// that range; regions overlap (several caches, no merging, merges in progress), so a page may hold
// several. Add counts a range once; Remove uncounts it and returns the parts whose count fell to
// zero: those no region needs watched any more, and only those may be unregistered.
//
// Representation: disjoint intervals [start, end) with a count >= 1, adjacent intervals of equal
// count coalesced, so the table holds O(live regions) intervals.
//
// Thread-safety: none; UffdMonitor guards it with its lock.
//
// Invariants:
//   1. Intervals are disjoint, non-empty, and each has a count >= 1.
//   2. No two intervals that touch have the same count.

#ifndef SANREG_REGCACHE_INTERNAL_WATCH_TABLE_H_
#define SANREG_REGCACHE_INTERNAL_WATCH_TABLE_H_

#include <cstddef>
#include <cstdint>
#include <iterator>
#include <map>
#include <vector>

namespace sanreg::internal {

class WatchTable {
 public:
  struct Range {
    uintptr_t start;
    uintptr_t end;
    bool operator==(const Range&) const = default;
  };

  // Counts [start, end) once more. REQUIRES: start < end.
  void Add(uintptr_t start, uintptr_t end) {
    SplitAt(start);
    SplitAt(end);
    uintptr_t cur = start;
    auto it = map_.lower_bound(start);
    while (cur < end) {
      if (it != map_.end() && it->first == cur) {
        ++it->second.count;
        cur = it->second.end;
        ++it;
      } else {
        const uintptr_t next = (it != map_.end() && it->first < end) ? it->first : end;
        map_.emplace_hint(it, cur, Entry{next, 1});
        cur = next;
      }
    }
    Coalesce(start, end);
  }

  // Uncounts [start, end), which an Add counted before. Returns the maximal ranges within it whose
  // count fell to zero, in address order. Pages of the range that hold no count (a Remove without
  // its Add: a caller's bug) are left alone.
  std::vector<Range> Remove(uintptr_t start, uintptr_t end) {
    std::vector<Range> zero;
    SplitAt(start);
    SplitAt(end);
    auto it = map_.lower_bound(start);
    while (it != map_.end() && it->first < end) {
      if (--it->second.count > 0) {
        ++it;
        continue;
      }
      if (!zero.empty() && zero.back().end == it->first) {
        zero.back().end = it->second.end;
      } else {
        zero.push_back({it->first, it->second.end});
      }
      it = map_.erase(it);
    }
    Coalesce(start, end);
    return zero;
  }

  // The count of the page holding addr (0 when none).
  uint32_t CountAt(uintptr_t addr) const {
    auto it = map_.upper_bound(addr);
    if (it == map_.begin()) return 0;
    --it;
    return addr < it->second.end ? it->second.count : 0;
  }

  // Intervals held (for tests: coalescing keeps it small).
  size_t intervals() const { return map_.size(); }

 private:
  struct Entry {
    uintptr_t end;
    uint32_t count;
  };

  // Splits the interval that straddles x, if any, so that none does.
  void SplitAt(uintptr_t x) {
    auto it = map_.upper_bound(x);
    if (it == map_.begin()) return;
    --it;
    if (it->first < x && x < it->second.end) {
      map_.emplace_hint(std::next(it), x, Entry{it->second.end, it->second.count});
      it->second.end = x;
    }
  }

  // Restores invariant 2 around [start, end).
  void Coalesce(uintptr_t start, uintptr_t end) {
    auto it = map_.lower_bound(start);
    if (it != map_.begin()) --it;
    while (it != map_.end() && it->first <= end) {
      auto next = std::next(it);
      if (next != map_.end() && it->second.end == next->first &&
          it->second.count == next->second.count) {
        it->second.end = next->second.end;
        map_.erase(next);
      } else {
        it = next;
      }
    }
  }

  std::map<uintptr_t, Entry> map_;  // start -> {end, count}
};

}  // namespace sanreg::internal

#endif  // SANREG_REGCACHE_INTERNAL_WATCH_TABLE_H_
