// test_seed.h: the seed randomized tests use: SANREG_SEED if set (to replay a failure), else a
// fresh one. Tests print it.

#ifndef SANREG_REGCACHE_TEST_SEED_H_
#define SANREG_REGCACHE_TEST_SEED_H_

#include <cstdint>
#include <cstdlib>
#include <random>

namespace sanreg {

inline uint64_t TestSeed() {
  if (const char* s = std::getenv("SANREG_SEED")) return std::strtoull(s, nullptr, 10);
  std::random_device rd;
  return (uint64_t{rd()} << 32) | rd();
}

}  // namespace sanreg

#endif  // SANREG_REGCACHE_TEST_SEED_H_
