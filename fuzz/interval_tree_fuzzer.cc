// interval_tree_fuzzer: IntervalTree (regcache/interval_tree.h) under operation sequences the
// input chooses, every answer compared with a brute-force list of the intervals inserted.
//
// Input: a sequence of operations, each an opcode byte and its arguments (FuzzInput reads zeros
// past the end). Bit 3 of the opcode picks "wide" coordinates (any 64-bit value, to reach the
// ends of the address space) instead of small ones (a 300-unit space, so that intervals overlap).
//   0, 1  Insert [a, b)            (a == b: skipped, Insert requires a < b)
//   2     Erase one live interval  (by index in the list)
//   3     FindCovering(a, b, pred) with a predicate the input picks: any, none, one parity, one id
//   4     VisitOverlapping(a, b)   the same ids as the list, in order of start
//   5     every handle still names its interval and value
//   6, 7  Insert, as 0 and 1 (inserts outnumber erases, so the tree grows)
// After every operation: size() equals the list's, and CheckInvariants() holds (ordering, AVL
// balance, max_end augmentation).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "fuzz/fuzz_input.h"
#include "regcache/interval_tree.h"

namespace sanreg::fuzz {
namespace {

using Tree = IntervalTree<uint32_t>;

struct Item {
  uintptr_t start, end;
  uint32_t id;
  Tree::Handle h;
};

void Coordinates(FuzzInput& in, bool wide, uintptr_t* a, uintptr_t* b) {
  if (wide) {
    *a = in.U64();
    *b = in.U64();
  } else {
    *a = in.U8() + (in.U8() & 0x3f);  // 0..318, denser in the middle
    *b = *a + in.U8() % 64;
  }
}

void Run(FuzzInput in) {
  Tree tree;
  std::vector<Item> model;
  uint32_t next_id = 0;
  for (int step = 0; !in.empty(); ++step) {
    const uint8_t op = in.U8();
    const bool wide = op & 8;
    uintptr_t a, b;
    switch (op & 7) {
      case 0:
      case 1:
      case 6:
      case 7: {
        Coordinates(in, wide, &a, &b);
        if (a > b) std::swap(a, b);
        if (a == b) break;
        const uint32_t id = next_id++;
        model.push_back({a, b, id, tree.Insert(a, b, id)});
        break;
      }
      case 2: {
        const uint16_t pick = in.U16();
        if (model.empty()) break;
        const size_t i = pick % model.size();
        tree.Erase(model[i].h);
        model[i] = model.back();
        model.pop_back();
        break;
      }
      case 3: {
        Coordinates(in, wide, &a, &b);
        const uint8_t mode = in.U8();
        const uint32_t want_id = in.U16();
        auto pred = [&](uint32_t id) {
          switch (mode & 3) {
            case 0:
              return true;
            case 1:
              return false;
            case 2:
              return id % 2 == ((mode >> 2) & 1);
            default:
              return id == want_id;
          }
        };
        Tree::Handle h = tree.FindCovering(a, b, [&](uint32_t id, uintptr_t s, uintptr_t e) {
          FUZZ_CHECK(s <= a && e >= b, "step %d: predicate asked about [%lu, %lu), not covering",
                     step, s, e);
          return pred(id);
        });
        const bool exists = std::any_of(model.begin(), model.end(), [&](const Item& it) {
          return it.start <= a && it.end >= b && pred(it.id);
        });
        FUZZ_CHECK((h != nullptr) == exists, "step %d: FindCovering(%lu, %lu) found=%d, model %d",
                   step, a, b, h != nullptr, exists);
        if (h != nullptr) {
          FUZZ_CHECK(Tree::Start(h) <= a && Tree::End(h) >= b && pred(Tree::Value(h)),
                     "step %d: FindCovering returned [%lu, %lu) id %u", step, Tree::Start(h),
                     Tree::End(h), Tree::Value(h));
          auto it =
              std::find_if(model.begin(), model.end(), [&](const Item& m) { return m.h == h; });
          FUZZ_CHECK(it != model.end() && it->id == Tree::Value(h),
                     "step %d: FindCovering returned a handle not live", step);
        }
        break;
      }
      case 4: {
        Coordinates(in, wide, &a, &b);
        std::vector<uint32_t> got;
        uintptr_t last_start = 0;
        tree.VisitOverlapping(a, b, [&](Tree::Handle h) {
          FUZZ_CHECK(got.empty() || Tree::Start(h) >= last_start,
                     "step %d: VisitOverlapping out of order of start", step);
          last_start = Tree::Start(h);
          got.push_back(Tree::Value(h));
        });
        std::vector<uint32_t> want;
        for (const Item& it : model) {
          if (it.start < b && it.end > a) want.push_back(it.id);
        }
        std::sort(got.begin(), got.end());
        std::sort(want.begin(), want.end());
        FUZZ_CHECK(got == want, "step %d: VisitOverlapping(%lu, %lu) visited %zu, model %zu", step,
                   a, b, got.size(), want.size());
        break;
      }
      case 5:
        for (const Item& it : model) {
          FUZZ_CHECK(Tree::Start(it.h) == it.start && Tree::End(it.h) == it.end &&
                         Tree::Value(it.h) == it.id,
                     "step %d: handle of id %u changed", step, it.id);
        }
        break;
    }
    FUZZ_CHECK(tree.size() == model.size(), "step %d: size %zu, model %zu", step, tree.size(),
               model.size());
    FUZZ_CHECK(tree.empty() == model.empty(), "step %d: empty()", step);
    FUZZ_CHECK(tree.CheckInvariants(), "step %d: invariants broken", step);
  }
}

}  // namespace
}  // namespace sanreg::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  sanreg::fuzz::Run(sanreg::fuzz::FuzzInput(data, size));
  return 0;
}
