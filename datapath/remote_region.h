// remote_region.h: the descriptor that names a peer's registered memory, and its wire form.
//
// A target exposes part of a registration to the peer of one connection (Endpoint::Expose); the
// RemoteRegion it gets back travels to the initiator (in the SPI, inside the opaque RDMA buffer
// descriptor) and names the bytes the initiator may Write to or Read from.
//
// Wire form (version 1), kWireSize bytes, little-endian, fixed:
//   off  size  field
//     0     4  magic "SRD1" (0x31445253)
//     4     2  version (1)
//     6     2  flags (must be 0)
//     8     4  rights (kAccessRemoteRead | kAccessRemoteWrite, non-empty, nothing else)
//    12     4  reserved (must be 0)
//    16     8  addr        the address the provider names byte 0 of the region by
//    24     8  length      bytes, > 0, addr + length does not overflow
//    32     8  key         the provider's remote key
//    40     8  connection  the id of the connection the region was exposed on
//    48     8  generation  the exposer's generation of the registration (opaque here)
//    56     4  checksum    FNV-1a of bytes [0, 56): catches corruption, not forgery
//    60     4  reserved (must be 0)
// Parse refuses anything else with kInvalidArgument. The descriptor is not a capability by itself:
// the key is unguessable where the provider takes requested keys, and the target's provider checks
// key, bounds and rights on every access (see endpoint.h for what each provider enforces).
//
// Thread-safety: plain value type.

#ifndef SANREG_DATAPATH_REMOTE_REGION_H_
#define SANREG_DATAPATH_REMOTE_REGION_H_

#include <cstddef>
#include <cstdint>
#include <span>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace sanreg {

struct RemoteRegion {
  static constexpr size_t kWireSize = 64;
  static constexpr uint16_t kWireVersion = 1;

  uint64_t addr = 0;        // provider address of byte 0 (virtual address or offset in the MR)
  uint64_t length = 0;      // bytes the peer may reach, from addr
  uint64_t key = 0;         // provider remote key
  uint32_t rights = 0;      // kAccessRemoteRead / kAccessRemoteWrite
  uint64_t connection = 0;  // Endpoint::connection_id() of the connection it was exposed on
  uint64_t generation = 0;  // the exposer's generation, carried opaquely

  // Writes the wire form into `out`.
  // REQUIRES: out.size() >= kWireSize. Returns kInvalidArgument when it is smaller.
  absl::Status Serialize(std::span<uint8_t> out) const;

  // Reads a wire form. Returns kInvalidArgument for a wrong size, magic, version, checksum, flags,
  // reserved bits, rights or an empty or overflowing range.
  static absl::StatusOr<RemoteRegion> Parse(std::span<const uint8_t> in);

  friend bool operator==(const RemoteRegion&, const RemoteRegion&) = default;
};

}  // namespace sanreg

#endif  // SANREG_DATAPATH_REMOTE_REGION_H_
