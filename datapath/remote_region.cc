#include "datapath/remote_region.h"

#include <cstring>

#include "regcache/registrar.h"

namespace sanreg {
namespace {

constexpr uint32_t kMagic = 0x31445253;  // "SRD1" little-endian
constexpr size_t kChecksumOffset = 56;

void Put16(uint8_t* p, uint16_t v) {
  for (int i = 0; i < 2; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
void Put32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
void Put64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint16_t Get16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t Get32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
uint64_t Get64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

uint32_t Fnv1a(const uint8_t* p, size_t n) {
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 16777619u;
  }
  return h;
}

constexpr uint32_t kRemoteRights = kAccessRemoteRead | kAccessRemoteWrite;

}  // namespace

absl::Status RemoteRegion::Serialize(std::span<uint8_t> out) const {
  if (out.size() < kWireSize) return absl::InvalidArgumentError("descriptor buffer too small");
  uint8_t* p = out.data();
  std::memset(p, 0, kWireSize);
  Put32(p + 0, kMagic);
  Put16(p + 4, kWireVersion);
  Put16(p + 6, 0);
  Put32(p + 8, rights);
  Put64(p + 16, addr);
  Put64(p + 24, length);
  Put64(p + 32, key);
  Put64(p + 40, connection);
  Put64(p + 48, generation);
  Put32(p + kChecksumOffset, Fnv1a(p, kChecksumOffset));
  return absl::OkStatus();
}

absl::StatusOr<RemoteRegion> RemoteRegion::Parse(std::span<const uint8_t> in) {
  if (in.size() != kWireSize) return absl::InvalidArgumentError("descriptor has the wrong size");
  const uint8_t* p = in.data();
  if (Get32(p) != kMagic) return absl::InvalidArgumentError("not a sanreg descriptor");
  if (Get16(p + 4) != kWireVersion) {
    return absl::InvalidArgumentError("unsupported descriptor version");
  }
  if (Get32(p + kChecksumOffset) != Fnv1a(p, kChecksumOffset)) {
    return absl::InvalidArgumentError("descriptor checksum mismatch");
  }
  if (Get16(p + 6) != 0 || Get32(p + 12) != 0 || Get32(p + 60) != 0) {
    return absl::InvalidArgumentError("descriptor has unknown flags or reserved bits set");
  }
  RemoteRegion r;
  r.rights = Get32(p + 8);
  r.addr = Get64(p + 16);
  r.length = Get64(p + 24);
  r.key = Get64(p + 32);
  r.connection = Get64(p + 40);
  r.generation = Get64(p + 48);
  if (r.rights == 0 || (r.rights & ~kRemoteRights) != 0) {
    return absl::InvalidArgumentError("descriptor rights invalid");
  }
  if (r.length == 0 || r.addr + r.length < r.addr) {
    return absl::InvalidArgumentError("descriptor range empty or overflowing");
  }
  return r;
}

}  // namespace sanreg
