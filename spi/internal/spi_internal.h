// spi_internal.h: what sanreg's own tests may see of the SPI's state (not API).
//
// Thread-safety: every function may be called from any thread.

#ifndef SANREG_SPI_INTERNAL_SPI_INTERNAL_H_
#define SANREG_SPI_INTERNAL_SPI_INTERNAL_H_

#include <cstdint>
#include <string>

#include "regcache/cache.h"

namespace sanreg::spi::internal {

// The options of the SPI (STYLE.md rule 11). Environment overrides, read by WSPStartupEx:
//   SANREG_FABRIC   libfabric provider: "tcp" (default), "shm", "auto". Without it, a
//                   WSAPROTOCOL_INFOW given to WSPStartupEx whose szProtocol is one of these names
//                   chooses the provider.
struct SpiOptions {
  std::string provider = "tcp";
  // The largest transfer (bytes) one WSPRdmaWrite/WSPRdmaRead takes; reported by SO_MAX_RDMA_SIZE.
  uint32_t max_rdma_size = 16u << 20;
  // Default SO_RDMA_THRESHOLD_SIZE of a new socket.
  uint32_t rdma_threshold = 64u << 10;
};

// Stats of the process-wide registration cache; all zero before WSPStartupEx.
CacheStats CacheStatsForTest();

// Deregisters what the cache queued for its reclaimer (RegistrationCache::Flush).
void FlushCacheForTest();

// The libfabric provider in use ("tcp", "shm"); empty before WSPStartupEx.
std::string ProviderForTest();

// RDMA registrations (descriptors) alive now.
size_t RdmaRegistrationsForTest();

}  // namespace sanreg::spi::internal

#endif  // SANREG_SPI_INTERNAL_SPI_INTERNAL_H_
