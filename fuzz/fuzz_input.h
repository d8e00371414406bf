// fuzz_input.h: what every sanreg fuzzer shares: FuzzInput, a reader of the fuzzer's bytes as
// little-endian integers, and FUZZ_CHECK, the check that turns a broken property into a crash
// libFuzzer records.
//
// FuzzInput never fails: once the bytes run out it reads zeros, so every input, however short,
// decodes to some operation sequence (and a short one decodes to a short sequence: callers stop
// at empty()).
//
// Thread-safety: plain value type.

#ifndef SANREG_FUZZ_FUZZ_INPUT_H_
#define SANREG_FUZZ_FUZZ_INPUT_H_

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

// Aborts with the condition, the place and a printf-style message when `cond` is false.
#define FUZZ_CHECK(cond, ...)                                                                \
  do {                                                                                       \
    if (!(cond)) {                                                                           \
      std::fprintf(stderr, "FUZZ_CHECK failed at %s:%d: %s\n  ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                                     \
      std::fputc('\n', stderr);                                                              \
      std::abort();                                                                          \
    }                                                                                        \
  } while (0)

namespace sanreg::fuzz {

class FuzzInput {
 public:
  FuzzInput(const uint8_t* data, size_t size) : p_(data), left_(size) {}

  bool empty() const { return left_ == 0; }

  uint8_t U8() { return static_cast<uint8_t>(Read(1)); }
  uint16_t U16() { return static_cast<uint16_t>(Read(2)); }
  uint32_t U32() { return static_cast<uint32_t>(Read(4)); }
  uint64_t U64() { return Read(8); }

 private:
  // Reads up to n <= 8 bytes, little-endian; missing bytes read as zero.
  uint64_t Read(size_t n) {
    uint64_t v = 0;
    for (size_t i = 0; i < n && left_ > 0; ++i, --left_) v |= uint64_t{*p_++} << (8 * i);
    return v;
  }

  const uint8_t* p_;
  size_t left_;
};

}  // namespace sanreg::fuzz

#endif  // SANREG_FUZZ_FUZZ_INPUT_H_
