// extension_table.h: every SAN extension function of a provider, fetched in one call (C++).
//
// WSPIoctl(SIO_GET_EXTENSION_FUNCTION_POINTER) hands out one extension function per GUID
// (SPI.md); a caller that drives all of them (a switch, sanreg_bench --via=spi, the SPI's tests
// and fuzzer) wants the whole table. LoadExtensionTable asks for each in turn on one socket.
// Header-only, over the public C ABI: it needs nothing but spi/ws2san.h.

#ifndef SANREG_SPI_EXTENSION_TABLE_H_
#define SANREG_SPI_EXTENSION_TABLE_H_

#include "spi/ws2san.h"

namespace sanreg {

struct ExtensionTable {
  LPFN_WSPREGISTERMEMORY reg = nullptr;
  LPFN_WSPDEREGISTERMEMORY dereg = nullptr;
  LPFN_WSPREGISTERRDMAMEMORY reg_rdma = nullptr;
  LPFN_WSPDEREGISTERRDMAMEMORY dereg_rdma = nullptr;
  LPFN_WSPRDMAWRITE write = nullptr;
  LPFN_WSPRDMAREAD read = nullptr;
  LPFN_WSPMEMORYREGISTRATIONCACHECALLBACK cache_cb = nullptr;
};

// Fills *table through procs.lpWSPIoctl on `s`. Returns 0, or SOCKET_ERROR with *err set by the
// first request the provider refused (the entries before it are filled, the rest stay null).
inline int LoadExtensionTable(const WSPPROC_TABLE& procs, SOCKET s, ExtensionTable* table,
                              int* err) {
  struct Want {
    GUID guid;
    void* fn;
    DWORD size;
  };
  const Want wants[] = {
      {WSAID_REGISTERMEMORY, &table->reg, sizeof table->reg},
      {WSAID_DEREGISTERMEMORY, &table->dereg, sizeof table->dereg},
      {WSAID_REGISTERRDMAMEMORY, &table->reg_rdma, sizeof table->reg_rdma},
      {WSAID_DEREGISTERRDMAMEMORY, &table->dereg_rdma, sizeof table->dereg_rdma},
      {WSAID_RDMAWRITE, &table->write, sizeof table->write},
      {WSAID_RDMAREAD, &table->read, sizeof table->read},
      {WSAID_MEMORYREGISTRATIONCACHECALLBACK, &table->cache_cb, sizeof table->cache_cb},
  };
  for (const Want& w : wants) {
    GUID g = w.guid;
    DWORD got = 0;
    if (procs.lpWSPIoctl(s, SIO_GET_EXTENSION_FUNCTION_POINTER, &g, sizeof g, w.fn, w.size, &got,
                         nullptr, nullptr, nullptr, err) != 0) {
      return SOCKET_ERROR;
    }
  }
  return 0;
}

}  // namespace sanreg

#endif  // SANREG_SPI_EXTENSION_TABLE_H_
