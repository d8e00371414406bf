// cache_fuzzer: RegistrationCache (regcache/cache.h) under Acquire / release / Invalidate / Flush
// sequences the input chooses, checked after every step against a brute-force model of the
// cache's rules, with a FakeRegistrar behind it.
//
// The model (the rules of regcache/cache_model_test.cc, plus byte limits, alignment and registrar
// failures):
//   - Acquire of [a, a + n) with rights R: refused (kInvalidArgument, nothing changes) when n is 0,
//     R is not a valid Access mask or the aligned range wraps. A hit when a live region covers
//     [a, a + n) with rights covering R: the cache may return any such region. Else a miss:
//     [s, e) is the range aligned outwards; with merging, every live region overlapping [s, e)
//     whose rights R covers is dropped and [s, e) grows to span it; a region larger than
//     max_pinned_bytes fails (kResourceExhausted); then idle regions are evicted, least recently
//     released first, while the region or byte limit is exceeded, and the miss fails
//     (kResourceExhausted) when none is left; then the registrar is called; when it answers
//     kResourceExhausted, idle regions are evicted until the new region's bytes are freed, the
//     deregistration queue is drained, and the registrar is called once more.
//   - Releasing the last reference of a dropped region queues it for deregistration; Invalidate
//     drops every live region overlapping the range and returns how many; Flush deregisters the
//     queue (there is no reclaimer thread, so nothing else does).
//   - The FakeRegistrar fails every k-th Register call with the input's code, and refuses a
//     registration past its byte budget (which counts registrations awaiting deregistration).
//
// Checked after every step: every answer (hit, miss range, error code, invalidation count); every
// held reference still names its region, with its range and rights, and is still registered (no
// stale or early-deregistered registration); the registrar's live registrations and bytes; the
// cache's Regions() list (range, rights, reference counts, state) and Stats() counters; the
// limits. At the end: everything released, flushed, and deregistered once the cache is gone.
//
// Input: two configuration bytes, then operations (an opcode byte and its arguments):
//   0-2 Acquire   3-4 release one reference   5 Invalidate   6 Flush   7 release every reference
// Bit 3 of an Acquire or Invalidate opcode puts the range at the top of the address space (to
// reach the wrap-around checks); bit 4 lets its length be 0.

#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "fuzz/fuzz_input.h"
#include "regcache/cache.h"
#include "regcache/fake_registrar.h"
#include "regcache/registrar.h"

namespace sanreg::fuzz {
namespace {

const uintptr_t kPage = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
const uintptr_t kBase = uintptr_t{1} << 36;
constexpr int kSpacePages = 72;

struct Config {
  bool merge;
  size_t max_regions;
  size_t max_pinned_bytes;
  uintptr_t align;
  size_t byte_budget;
  uint64_t fail_every;
  absl::StatusCode fail_code;
  size_t lookup_buckets;
};

Config DecodeConfig(FuzzInput& in) {
  static constexpr size_t kMaxRegions[] = {0, 0, 1, 2, 3, 4, 8, 16};
  static constexpr size_t kMaxPages[] = {0, 0, 1, 2, 4, 8, 16, 64};
  static constexpr size_t kBudgetPages[] = {0, 0, 0, 4, 8, 16, 32, 64};
  static constexpr uint64_t kFailEvery[] = {0, 0, 0, 2, 3, 4, 7, 16};
  const uint8_t b0 = in.U8(), b1 = in.U8();
  Config c;
  c.merge = b0 & 1;
  c.max_regions = kMaxRegions[(b0 >> 1) & 7];
  c.max_pinned_bytes = kMaxPages[(b0 >> 4) & 7] * kPage;
  c.align = (b0 & 0x80) ? 4 * kPage : kPage;
  c.byte_budget = kBudgetPages[b1 & 7] * kPage;
  c.fail_every = kFailEvery[(b1 >> 3) & 7];
  c.fail_code = (b1 & 0x40) ? absl::StatusCode::kInternal : absl::StatusCode::kResourceExhausted;
  c.lookup_buckets = (b1 & 0x80) ? 1024 : 16;
  return c;
}

struct ModelRegion {
  uintptr_t start, end;
  uint32_t access;
  int refs = 1;
  bool alive = true;
  bool invalidated = false;  // dropped by Invalidate (else by merge or eviction)
  uint64_t last_use;         // logical clock of creation or last release
};

// The cache and the registrar as the rules say they should be. Regions by registration handle;
// a region leaves the map when it is deregistered.
class Model {
 public:
  explicit Model(const Config& c) : c_(c) {}

  // What a miss must do, applied to the model.
  struct Miss {
    absl::StatusCode code;
    uintptr_t start, end;
  };

  std::vector<uint64_t> Covering(uintptr_t a, uintptr_t b, uint32_t access, bool* without) const {
    std::vector<uint64_t> out;
    *without = false;
    for (const auto& [h, m] : regions_) {
      if (!m.alive || m.start > a || m.end < b) continue;
      if (AccessCovers(m.access, access)) {
        out.push_back(h);
      } else {
        *without = true;
      }
    }
    return out;
  }

  void Hit(uint64_t h) {
    ++regions_.at(h).refs;
    ++hits;
  }

  Miss DoMiss(uintptr_t a, uintptr_t b, uint32_t access, bool covered_without_rights) {
    ++(covered_without_rights ? misses_rights : misses_other);
    uintptr_t s = a & ~(c_.align - 1);
    uintptr_t e = (b + c_.align - 1) & ~(c_.align - 1);
    if (c_.merge) {
      const uintptr_t s0 = s, e0 = e;
      for (auto& [h, m] : regions_) {
        if (m.alive && m.start < e0 && m.end > s0 && AccessCovers(access, m.access)) {
          s = std::min(s, m.start);
          e = std::max(e, m.end);
          m.alive = false;
          ++merges;
        }
      }
    }
    const size_t len = e - s;
    if (c_.max_pinned_bytes != 0 && len > c_.max_pinned_bytes) {
      ++registration_failures;
      return {absl::StatusCode::kResourceExhausted, s, e};
    }
    while ((c_.max_regions != 0 && AliveCount() + 1 > c_.max_regions) ||
           (c_.max_pinned_bytes != 0 && AliveBytes() + len > c_.max_pinned_bytes)) {
      if (EvictLru() == 0) {
        ++registration_failures;
        return {absl::StatusCode::kResourceExhausted, s, e};
      }
    }
    absl::StatusCode code = Register(len);
    if (code == absl::StatusCode::kResourceExhausted) {
      size_t freed = 0;
      while (freed < len) {
        const size_t n = EvictLru();
        if (n == 0) break;
        freed += n;
      }
      Flush();
      code = Register(len);
    }
    if (code != absl::StatusCode::kOk) ++registration_failures;
    return {code, s, e};
  }

  // Records the region a successful miss registered.
  void Registered(uint64_t handle, uintptr_t s, uintptr_t e, uint32_t access) {
    FUZZ_CHECK(regions_.count(handle) == 0, "handle %lu registered twice", handle);
    regions_[handle] = ModelRegion{s, e, access, 1, true, false, ++clock_};
    ++registrations;
    high_water = std::max(high_water, RegisteredBytes());
  }

  void Release(uint64_t h) {
    ModelRegion& m = regions_.at(h);
    --m.refs;
    m.last_use = ++clock_;
  }

  size_t Invalidate(uintptr_t a, uintptr_t b) {
    size_t n = 0;
    for (auto& [h, m] : regions_) {
      if (m.alive && m.start < b && m.end > a) {
        m.alive = false;
        m.invalidated = true;
        ++n;
      }
    }
    invalidations += n;
    return n;
  }

  // Deregisters every dropped region without references.
  void Flush() {
    std::erase_if(regions_, [&](const auto& kv) {
      const bool gone = !kv.second.alive && kv.second.refs == 0;
      deregistrations += gone;
      return gone;
    });
  }

  size_t AliveCount() const {
    return std::count_if(regions_.begin(), regions_.end(),
                         [](const auto& kv) { return kv.second.alive; });
  }
  size_t AliveBytes() const {
    size_t n = 0;
    for (const auto& [h, m] : regions_) n += m.alive ? m.end - m.start : 0;
    return n;
  }
  size_t RegisteredBytes() const {
    size_t n = 0;
    for (const auto& [h, m] : regions_) n += m.end - m.start;
    return n;
  }
  const std::map<uint64_t, ModelRegion>& regions() const { return regions_; }
  uint64_t register_calls() const { return register_calls_; }

  uint64_t hits = 0, misses_rights = 0, misses_other = 0, registrations = 0,
           registration_failures = 0, merges = 0, evictions = 0, invalidations = 0,
           deregistrations = 0, high_water = 0;

 private:
  // The FakeRegistrar's answer to one Register call.
  absl::StatusCode Register(size_t len) {
    ++register_calls_;
    if (c_.fail_every != 0 && register_calls_ % c_.fail_every == 0) return c_.fail_code;
    if (c_.byte_budget != 0 && RegisteredBytes() + len > c_.byte_budget) {
      return absl::StatusCode::kResourceExhausted;
    }
    return absl::StatusCode::kOk;
  }

  // Evicts the idle region released longest ago. Returns its bytes, 0 when none is idle.
  size_t EvictLru() {
    ModelRegion* lru = nullptr;
    for (auto& [h, m] : regions_) {
      if (m.alive && m.refs == 0 && (lru == nullptr || m.last_use < lru->last_use)) lru = &m;
    }
    if (lru == nullptr) return 0;
    lru->alive = false;
    ++evictions;
    return lru->end - lru->start;
  }

  const Config c_;
  std::map<uint64_t, ModelRegion> regions_;
  uint64_t clock_ = 0;
  uint64_t register_calls_ = 0;
};

struct Held {
  RegionRef ref;
  uint64_t handle;
};

using RegionKey = std::tuple<uintptr_t, size_t, uint32_t, uint32_t, RegionInfo::State>;

void Verify(int step, const Config& c, const Model& model, const std::vector<Held>& held,
            RegistrationCache& cache, const FakeRegistrar& fake) {
  for (const Held& h : held) {
    auto it = model.regions().find(h.handle);
    FUZZ_CHECK(it != model.regions().end(), "step %d: a held region is not registered", step);
    const ModelRegion& m = it->second;
    FUZZ_CHECK(h.ref.start() == m.start && h.ref.length() == m.end - m.start &&
                   h.ref.access() == m.access && h.ref.registration().handle == h.handle,
               "step %d: a held reference changed", step);
  }
  FUZZ_CHECK(fake.live_registrations() == model.regions().size(),
             "step %d: registrar holds %zu registrations, model %zu", step,
             fake.live_registrations(), model.regions().size());
  FUZZ_CHECK(fake.live_bytes() == model.RegisteredBytes(),
             "step %d: registrar holds %zu bytes, model %zu", step, fake.live_bytes(),
             model.RegisteredBytes());
  FUZZ_CHECK(fake.bad_deregistrations() == 0, "step %d: a double or forged deregistration", step);
  FUZZ_CHECK(fake.register_calls() == model.register_calls(),
             "step %d: %lu Register calls, model %lu", step, fake.register_calls(),
             model.register_calls());

  const CacheStats st = cache.Stats();
  FUZZ_CHECK(st.regions == model.AliveCount(), "step %d: %lu regions, model %zu", step, st.regions,
             model.AliveCount());
  FUZZ_CHECK(st.pinned_bytes == model.RegisteredBytes(), "step %d: pinned %lu, model %zu", step,
             st.pinned_bytes, model.RegisteredBytes());
  FUZZ_CHECK(st.pinned_bytes_high_water == model.high_water, "step %d: high water %lu, model %lu",
             step, st.pinned_bytes_high_water, model.high_water);
  FUZZ_CHECK(st.hits == model.hits, "step %d: hits %lu, model %lu", step, st.hits, model.hits);
  FUZZ_CHECK(st.misses_rights == model.misses_rights, "step %d: rights misses %lu, model %lu", step,
             st.misses_rights, model.misses_rights);
  FUZZ_CHECK(st.misses_absent + st.misses_invalidated == model.misses_other,
             "step %d: other misses %lu, model %lu", step, st.misses_absent + st.misses_invalidated,
             model.misses_other);
  FUZZ_CHECK(st.registrations == model.registrations && st.merges == model.merges &&
                 st.evictions == model.evictions && st.invalidations == model.invalidations &&
                 st.deregistrations == model.deregistrations &&
                 st.registration_failures == model.registration_failures,
             "step %d: counters: registrations %lu/%lu merges %lu/%lu evictions %lu/%lu "
             "invalidations %lu/%lu deregistrations %lu/%lu failures %lu/%lu (cache/model)",
             step, st.registrations, model.registrations, st.merges, model.merges, st.evictions,
             model.evictions, st.invalidations, model.invalidations, st.deregistrations,
             model.deregistrations, st.registration_failures, model.registration_failures);
  FUZZ_CHECK(st.deregistration_failures == 0 && st.uncached_registrations == 0 &&
                 st.stale_hits == 0 && st.memory_events == 0,
             "step %d: unexpected deregistration failures, uncached registrations, stale hits "
             "or memory events",
             step);
  if (c.max_regions != 0) {
    FUZZ_CHECK(st.regions <= c.max_regions, "step %d: %lu regions over the limit", step,
               st.regions);
  }
  if (c.max_pinned_bytes != 0) {
    FUZZ_CHECK(model.AliveBytes() <= c.max_pinned_bytes, "step %d: bytes over the limit", step);
  }

  // Regions(): every live region, and every dropped one still referenced, as the model has them.
  std::vector<RegionInfo> infos;
  const size_t total = cache.Regions(1 << 20, &infos);
  FUZZ_CHECK(total == infos.size(), "step %d: Regions() total %zu, listed %zu", step, total,
             infos.size());
  std::vector<RegionKey> got, want;
  for (const RegionInfo& r : infos) {
    got.emplace_back(r.start, r.length, r.access, r.references, r.state);
  }
  for (const auto& [h, m] : model.regions()) {
    RegionInfo::State s;
    if (m.alive) {
      s = m.refs > 0 ? RegionInfo::State::kActive : RegionInfo::State::kIdle;
    } else if (m.refs > 0) {
      s = m.invalidated ? RegionInfo::State::kInvalidated : RegionInfo::State::kRetired;
    } else {
      continue;  // awaiting deregistration: not listed
    }
    want.emplace_back(m.start, m.end - m.start, m.access, static_cast<uint32_t>(m.refs), s);
  }
  std::sort(got.begin(), got.end());
  std::sort(want.begin(), want.end());
  FUZZ_CHECK(got == want, "step %d: Regions() lists %zu regions, model %zu (or they differ)", step,
             got.size(), want.size());
}

// A range from the input: in the small space at kBase, or (bit 3) at the top of the address space.
void Range(FuzzInput& in, uint8_t op, uintptr_t* a, size_t* len) {
  const uint16_t where = in.U16(), off = in.U16(), n = in.U16();
  if (op & 8) {
    *a = ~uintptr_t{0} - (where % (16 * kPage));
  } else {
    *a = kBase + (where % kSpacePages) * kPage + off % kPage;
  }
  *len = n % (8 * kPage) + ((op & 0x10) ? 0 : 1);
}

void Run(FuzzInput in) {
  const Config c = DecodeConfig(in);
  FakeRegistrar::Options fo;
  fo.fail_every = c.fail_every;
  fo.fail_code = c.fail_code;
  fo.byte_budget = c.byte_budget;
  FakeRegistrar fake(fo);
  RegistrationCache::Options o;
  o.merge = c.merge;
  o.max_regions = c.max_regions;
  o.max_pinned_bytes = c.max_pinned_bytes;
  o.alignment = c.align == kPage ? 0 : c.align;
  o.lookup_buckets = c.lookup_buckets;
  o.reclaimer_thread = false;  // deterministic: deregistration happens in Flush
  o.memory_monitor = MemoryMonitorMode::kNone;
  o.publish_stats = false;
  auto created = RegistrationCache::Create(&fake, o);
  FUZZ_CHECK(created.ok(), "Create: %s", created.status().ToString().c_str());
  std::unique_ptr<RegistrationCache> cache = std::move(*created);

  Model model(c);
  std::vector<Held> held;
  auto release = [&](size_t i) {
    held[i].ref.Reset();
    model.Release(held[i].handle);
    held[i] = std::move(held.back());
    held.pop_back();
  };

  for (int step = 0; !in.empty(); ++step) {
    const uint8_t op = in.U8();
    switch (op & 7) {
      case 0:
      case 1:
      case 2: {
        uintptr_t a;
        size_t len;
        Range(in, op, &a, &len);
        const uint8_t ab = in.U8();
        const uint32_t access = (ab & 0xf) | ((ab & 0x80) ? 0x10 : 0);
        const uintptr_t b = a + len;
        const bool refused = len == 0 || !AccessValid(access) || b < a || b + (c.align - 1) < b;
        bool without = false;
        const std::vector<uint64_t> hits =
            refused ? std::vector<uint64_t>() : model.Covering(a, b, access, &without);
        absl::StatusOr<RegionRef> got = cache->Acquire(a, len, access);
        if (refused) {
          FUZZ_CHECK(got.status().code() == absl::StatusCode::kInvalidArgument,
                     "step %d: Acquire(0x%lx, %zu, 0x%x) not refused: %s", step, a, len, access,
                     got.status().ToString().c_str());
          break;
        }
        if (!hits.empty()) {
          FUZZ_CHECK(got.ok(), "step %d: a hit failed: %s", step, got.status().ToString().c_str());
          const uint64_t h = got->registration().handle;
          FUZZ_CHECK(std::find(hits.begin(), hits.end(), h) != hits.end(),
                     "step %d: a hit returned [0x%lx, +%zu) access 0x%x, not a live covering "
                     "region with the rights",
                     step, got->start(), got->length(), got->access());
          model.Hit(h);
          held.push_back({std::move(*got), h});
          break;
        }
        const Model::Miss miss = model.DoMiss(a, b, access, without);
        FUZZ_CHECK(got.status().code() == miss.code, "step %d: a miss answered %s, model %d", step,
                   got.status().ToString().c_str(), static_cast<int>(miss.code));
        if (!got.ok()) break;
        FUZZ_CHECK(got->start() == miss.start && got->start() + got->length() == miss.end &&
                       got->access() == access,
                   "step %d: a miss registered [0x%lx, +%zu) 0x%x, model [0x%lx, 0x%lx) 0x%x", step,
                   got->start(), got->length(), got->access(), miss.start, miss.end, access);
        const uint64_t h = got->registration().handle;
        model.Registered(h, miss.start, miss.end, access);
        held.push_back({std::move(*got), h});
        break;
      }
      case 3:
      case 4: {
        const uint8_t pick = in.U8();
        if (!held.empty()) release(pick % held.size());
        break;
      }
      case 5: {
        uintptr_t a;
        size_t len;
        Range(in, op, &a, &len);
        absl::StatusOr<size_t> n = cache->Invalidate(a, len);
        if (len == 0 || a + len < a) {
          FUZZ_CHECK(n.status().code() == absl::StatusCode::kInvalidArgument,
                     "step %d: Invalidate(0x%lx, %zu) not refused", step, a, len);
          break;
        }
        const size_t want = model.Invalidate(a, a + len);
        FUZZ_CHECK(n.ok() && *n == want, "step %d: Invalidate dropped %s, model %zu", step,
                   n.ok() ? std::to_string(*n).c_str() : n.status().ToString().c_str(), want);
        break;
      }
      case 6:
        cache->Flush();
        model.Flush();
        break;
      case 7:
        while (!held.empty()) release(held.size() - 1);
        break;
    }
    Verify(step, c, model, held, *cache, fake);
  }

  while (!held.empty()) release(held.size() - 1);
  cache->Flush();
  model.Flush();
  Verify(-1, c, model, held, *cache, fake);
  cache.reset();
  FUZZ_CHECK(fake.live_registrations() == 0 && fake.live_bytes() == 0,
             "%zu registrations left after the cache was destroyed", fake.live_registrations());
  FUZZ_CHECK(fake.bad_deregistrations() == 0, "a double or forged deregistration at destruction");
}

}  // namespace
}  // namespace sanreg::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  sanreg::fuzz::Run(sanreg::fuzz::FuzzInput(data, size));
  return 0;
}
