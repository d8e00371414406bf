// remote_region_fuzzer: the RDMA descriptor's wire form (datapath/remote_region.h) against the
// layout its header documents.
//
// Three views of one input:
//   1. the bytes as a descriptor from a peer: RemoteRegion::Parse must accept exactly what the
//      documented layout allows (a reference check written here from the header's table), refuse
//      everything else with kInvalidArgument, and what it accepts must carry the documented
//      field values, satisfy the invariants (rights a non-empty subset of remote read / write,
//      length > 0, addr + length does not overflow), serialize back to the same 64 bytes, and be
//      refused again after any one byte of it changes;
//   2. the first 64 bytes with the checksum made right, so that mutations reach the field checks
//      behind the checksum;
//   3. the bytes as field values: Serialize must succeed into 64 bytes or more (writing only 64),
//      refuse a smaller buffer, and Parse must give the same fields back exactly when they are
//      valid.

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

#include "absl/status/status.h"
#include "datapath/remote_region.h"
#include "fuzz/fuzz_input.h"
#include "regcache/registrar.h"

namespace sanreg::fuzz {
namespace {

constexpr size_t kWire = RemoteRegion::kWireSize;
constexpr uint32_t kRemoteRights = kAccessRemoteRead | kAccessRemoteWrite;

uint64_t Le(const uint8_t* p, int n) {
  uint64_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

uint32_t Fnv1a(const uint8_t* p, size_t n) {
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 16777619u;
  return h;
}

bool RightsValid(uint32_t rights) { return rights != 0 && (rights & ~kRemoteRights) == 0; }
bool RangeValid(uint64_t addr, uint64_t length) { return length != 0 && addr + length >= addr; }

// The header's table, read independently of remote_region.cc.
bool ReferenceValid(std::span<const uint8_t> in) {
  if (in.size() != kWire) return false;
  const uint8_t* p = in.data();
  return Le(p, 4) == 0x31445253 && Le(p + 4, 2) == 1 && Le(p + 6, 2) == 0 &&
         RightsValid(static_cast<uint32_t>(Le(p + 8, 4))) && Le(p + 12, 4) == 0 &&
         RangeValid(Le(p + 16, 8), Le(p + 24, 8)) && Le(p + 56, 4) == Fnv1a(p, 56) &&
         Le(p + 60, 4) == 0;
}

void CheckWire(std::span<const uint8_t> in) {
  absl::StatusOr<RemoteRegion> r = RemoteRegion::Parse(in);
  const bool valid = ReferenceValid(in);
  if (!r.ok()) {
    FUZZ_CHECK(r.status().code() == absl::StatusCode::kInvalidArgument, "refused with %s",
               r.status().ToString().c_str());
    FUZZ_CHECK(!valid, "a valid %zu-byte descriptor refused: %s", in.size(),
               r.status().ToString().c_str());
    return;
  }
  FUZZ_CHECK(valid, "an invalid %zu-byte descriptor accepted", in.size());
  const uint8_t* p = in.data();
  FUZZ_CHECK(r->rights == Le(p + 8, 4) && r->addr == Le(p + 16, 8) && r->length == Le(p + 24, 8) &&
                 r->key == Le(p + 32, 8) && r->connection == Le(p + 40, 8) &&
                 r->generation == Le(p + 48, 8),
             "fields differ from the documented offsets");
  FUZZ_CHECK(RightsValid(r->rights), "rights 0x%x", r->rights);
  FUZZ_CHECK(RangeValid(r->addr, r->length), "range 0x%llx + 0x%llx",
             static_cast<unsigned long long>(r->addr), static_cast<unsigned long long>(r->length));

  // Round trip: the same bytes again.
  std::array<uint8_t, kWire> out;
  FUZZ_CHECK(r->Serialize(out).ok(), "a parsed descriptor does not serialize");
  FUZZ_CHECK(std::memcmp(out.data(), p, kWire) == 0, "round trip changed the bytes");

  // Corruption of any one byte is refused (the checksum or a field check catches it).
  std::array<uint8_t, kWire> bad;
  const uint8_t flip = static_cast<uint8_t>(p[32] | 1);  // some non-zero mask the input chooses
  for (size_t i = 0; i < kWire; ++i) {
    bad = out;
    bad[i] ^= flip;
    FUZZ_CHECK(!RemoteRegion::Parse(bad).ok(), "byte %zu changed by 0x%02x was accepted", i, flip);
  }
}

void CheckFields(FuzzInput in) {
  RemoteRegion r;
  r.addr = in.U64();
  r.length = in.U64();
  r.key = in.U64();
  r.connection = in.U64();
  r.generation = in.U64();
  r.rights = in.U32();

  std::array<uint8_t, kWire - 1> small;
  FUZZ_CHECK(r.Serialize(small).code() == absl::StatusCode::kInvalidArgument,
             "Serialize into %zu bytes did not refuse", small.size());

  std::array<uint8_t, kWire + 16> wide;
  wide.fill(0xa5);
  FUZZ_CHECK(r.Serialize(wide).ok(), "Serialize into %zu bytes failed", wide.size());
  for (size_t i = kWire; i < wide.size(); ++i) {
    FUZZ_CHECK(wide[i] == 0xa5, "Serialize wrote byte %zu, past the wire form", i);
  }
  std::span<const uint8_t> wire(wide.data(), kWire);
  CheckWire(wire);
  absl::StatusOr<RemoteRegion> back = RemoteRegion::Parse(wire);
  const bool valid = RightsValid(r.rights) && RangeValid(r.addr, r.length);
  FUZZ_CHECK(back.ok() == valid, "fields valid=%d but Parse says %s", valid,
             back.status().ToString().c_str());
  if (valid) FUZZ_CHECK(*back == r, "Parse(Serialize(r)) != r");
}

}  // namespace
}  // namespace sanreg::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace sanreg::fuzz;
  CheckWire(std::span<const uint8_t>(data, size));
  if (size >= kWire) {
    std::array<uint8_t, kWire> fixed;
    std::memcpy(fixed.data(), data, kWire);
    const uint32_t sum = Fnv1a(fixed.data(), 56);
    for (int i = 0; i < 4; ++i) fixed[56 + i] = static_cast<uint8_t>(sum >> (8 * i));
    CheckWire(fixed);
  }
  CheckFields(FuzzInput(data, size));
  return 0;
}
