// fd_io.h: whole reads and writes on a blocking descriptor (pipes between a test or tool and the
// process it forked).
//
// Thread-safety: free functions on caller-owned descriptors.

#ifndef SANREG_DATAPATH_FD_IO_H_
#define SANREG_DATAPATH_FD_IO_H_

#include <unistd.h>

#include <cstddef>

namespace sanreg {

// Writes exactly n bytes. Returns false on an error or a closed reader.
inline bool WriteFull(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    ssize_t w = write(fd, c, n);
    if (w <= 0) return false;
    c += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

// Reads exactly n bytes. Returns false on an error or end of file first.
inline bool ReadFull(int fd, void* p, size_t n) {
  char* c = static_cast<char*>(p);
  while (n > 0) {
    ssize_t r = read(fd, c, n);
    if (r <= 0) return false;
    c += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

}  // namespace sanreg

#endif  // SANREG_DATAPATH_FD_IO_H_
