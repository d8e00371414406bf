// internal/mapped_array.h: arrays the cache's hit path reads, in their own mappings. Not API.
//
// A hit reads one lookup-table bucket and one Region, both at random among megabytes (64 MiB of
// table and 128 MiB of regions at 1,000,000 regions). On 4 KiB pages each of those reads also
// misses the TLB. An array of 2 MiB or more is mapped on its own, 2 MiB-aligned, and advised as
// transparent huge pages (MADV_HUGEPAGE; the kernel's "madvise" mode honours it, "never" ignores
// it and the array works the same on small pages). Smaller arrays are mapped too (whole pages).
//
// Thread-safety: none needed; an array is created and freed by its owner.

#ifndef SANREG_REGCACHE_INTERNAL_MAPPED_ARRAY_H_
#define SANREG_REGCACHE_INTERNAL_MAPPED_ARRAY_H_

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>

namespace sanreg::internal {

inline constexpr size_t kHugePage = size_t{2} << 20;

template <typename T>
struct MappedArrayDeleter {
  size_t n = 0;
  size_t bytes = 0;
  void operator()(T* p) const {
    for (size_t i = 0; i < n; ++i) p[i].~T();
    munmap(p, bytes);
  }
};

template <typename T>
using MappedArray = std::unique_ptr<T[], MappedArrayDeleter<T>>;

// Gives the array's pages back to the kernel and keeps the mapping: every element reads as zero
// bytes from then on (a read racing the call reads the old value or zero, never faults).
// REQUIRES: all-zero bytes are a T that readers accept, and nothing writes the array again.
template <typename T>
void DiscardPages(const MappedArray<T>& a) {
  madvise(a.get(), a.get_deleter().bytes, MADV_DONTNEED);
}

// Returns n value-initialized T in a mapping of their own. Throws std::bad_alloc, as new would,
// when the mapping fails.
template <typename T>
MappedArray<T> NewMappedArray(size_t n) {
  static_assert(alignof(T) <= 4096, "a mapping is page-aligned, no more");
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  size_t bytes = (n * sizeof(T) + page - 1) & ~(page - 1);
  void* p;
  if (bytes >= kHugePage) {
    bytes = (bytes + kHugePage - 1) & ~(kHugePage - 1);
    // Map 2 MiB more and trim to a 2 MiB boundary: a huge page needs an aligned range.
    char* raw = static_cast<char*>(mmap(nullptr, bytes + kHugePage, PROT_READ | PROT_WRITE,
                                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (raw == MAP_FAILED) throw std::bad_alloc();
    char* aligned = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(raw) + kHugePage - 1) &
                                            ~(kHugePage - 1));
    if (aligned > raw) munmap(raw, aligned - raw);
    if (raw + kHugePage > aligned) munmap(aligned + bytes, raw + kHugePage - aligned);
    madvise(aligned, bytes, MADV_HUGEPAGE);  // advice only: small pages work the same
    p = aligned;
  } else {
    p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
  }
  T* a = static_cast<T*>(p);
  for (size_t i = 0; i < n; ++i) new (&a[i]) T();
  return MappedArray<T>(a, MappedArrayDeleter<T>{n, bytes});
}

}  // namespace sanreg::internal

#endif  // SANREG_REGCACHE_INTERNAL_MAPPED_ARRAY_H_
