// handle_table.h: maps opaque 64-bit handles to objects, with generations.
//
// A handle is (generation << 32 | slot + 1) XORed with a per-table random salt, so that handles of
// another table or process, forged values and handles whose object was removed (the slot's
// generation moved on) all miss. A handle is never 0.
//
// Thread-safety: none; the SPI guards each table with its state mutex.
// Invariants:
//   1. A slot holds at most one object; its generation increases every time the object leaves.
//   2. Find/Remove return the object only for the handle Insert returned for it.

#ifndef SANREG_SPI_INTERNAL_HANDLE_TABLE_H_
#define SANREG_SPI_INTERNAL_HANDLE_TABLE_H_

#include <sys/random.h>

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

namespace sanreg::spi::internal {

template <typename T>
class HandleTable {
 public:
  HandleTable() {
    if (getrandom(&salt_, sizeof salt_, 0) != sizeof salt_) salt_ = 0x5a17c3d2e4f60718ull;
  }

  // Stores `obj`; returns its handle (never 0).
  uint64_t Insert(std::shared_ptr<T> obj) {
    uint32_t index;
    if (!free_.empty()) {
      index = free_.back();
      free_.pop_back();
    } else {
      index = static_cast<uint32_t>(slots_.size());
      slots_.emplace_back();
    }
    Slot& slot = slots_[index];
    slot.obj = std::move(obj);
    uint64_t h = Encode(index, slot.generation);
    while (h == 0) {  // the salt made it 0: move the generation on
      ++slot.generation;
      h = Encode(index, slot.generation);
    }
    return h;
  }

  // The object of `h`, or null.
  std::shared_ptr<T> Find(uint64_t h) const {
    const Slot* slot = Lookup(h);
    return slot == nullptr ? nullptr : slot->obj;
  }

  // Takes the object of `h` out (its handle turns stale); null when `h` names nothing.
  std::shared_ptr<T> Remove(uint64_t h) {
    Slot* slot = const_cast<Slot*>(Lookup(h));
    if (slot == nullptr) return nullptr;
    std::shared_ptr<T> obj = std::move(slot->obj);
    slot->obj = nullptr;
    ++slot->generation;
    free_.push_back(static_cast<uint32_t>(slot - slots_.data()));
    return obj;
  }

  // Calls f(handle, obj) for every object.
  template <typename F>
  void ForEach(F f) const {
    for (size_t i = 0; i < slots_.size(); ++i) {
      if (slots_[i].obj != nullptr) {
        f(Encode(static_cast<uint32_t>(i), slots_[i].generation), slots_[i].obj);
      }
    }
  }

 private:
  struct Slot {
    uint32_t generation = 1;
    std::shared_ptr<T> obj;
  };

  uint64_t Encode(uint32_t index, uint32_t generation) const {
    return ((uint64_t{generation} << 32) | (uint64_t{index} + 1)) ^ salt_;
  }
  const Slot* Lookup(uint64_t h) const {
    uint64_t v = h ^ salt_;
    uint64_t index = (v & 0xffffffffu);
    if (index == 0 || index > slots_.size()) return nullptr;
    const Slot& slot = slots_[index - 1];
    if (slot.obj == nullptr || slot.generation != static_cast<uint32_t>(v >> 32)) return nullptr;
    return &slot;
  }

  uint64_t salt_ = 0;
  std::vector<Slot> slots_;
  std::vector<uint32_t> free_;
};

}  // namespace sanreg::spi::internal

#endif  // SANREG_SPI_INTERNAL_HANDLE_TABLE_H_
