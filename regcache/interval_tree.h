// interval_tree.h: an augmented AVL tree of half-open intervals [start, end), overlaps allowed.
//
// The registration cache's index: "find one interval covering [a, b) that satisfies a predicate"
// and "visit every interval overlapping [a, b)".
//
// Balancing: AVL. The cache's index is read far more often than it is changed (every miss and every
// invalidation searches it; only misses insert), and AVL keeps the height at most 1.44 log2(n),
// lower than a red-black tree's 2 log2(n), for a few more rotations on update. Insert (on every
// miss) is iterative: it raises max_end on the way down and stops rebalancing on the way up as soon
// as nothing above can change. Erase is recursive, which keeps its augmentation simple: every node
// on the path is recomputed on the way back up.
//
// Ordering: nodes are ordered by (start, seq), where seq is a per-tree counter stamped at insert,
// so equal starts are allowed and every node has a unique key (erase finds it by key, in O(log n)).
//
// Invariants:
//   1. For every node n: n.max_end = max(n.end, n.left.max_end, n.right.max_end).
//   2. For every node n: |height(n.left) - height(n.right)| <= 1, n.height = 1 + max of both.
//   3. In-order traversal yields strictly increasing (start, seq).
//
// Costs: Insert and Erase O(log n). FindCovering O(log n + k), k being the intervals that contain
// `a` but fail the end or predicate test. VisitOverlapping O(log n + k), k the intervals visited.
//
// Thread-safety: none; the owner serialises all calls (the cache holds its lock).
//
// Memory: nodes come from a free list owned by the tree and are reused; a Handle stays valid until
// it is erased.

#ifndef SANREG_REGCACHE_INTERVAL_TREE_H_
#define SANREG_REGCACHE_INTERVAL_TREE_H_

#include <algorithm>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

namespace sanreg {

template <typename V>
class IntervalTree {
  struct Node;

 public:
  // Names one inserted interval until it is erased.
  using Handle = Node*;

  IntervalTree() = default;
  IntervalTree(const IntervalTree&) = delete;
  IntervalTree& operator=(const IntervalTree&) = delete;
  ~IntervalTree() = default;  // nodes live in chunks_

  // Inserts [start, end) with `value`.
  // REQUIRES: start < end.
  Handle Insert(uintptr_t start, uintptr_t end, V value) {
    assert(start < end);
    Node* n = AllocNode();
    n->start = start;
    n->end = end;
    n->max_end = end;
    n->seq = next_seq_++;
    n->height = 1;
    n->left = n->right = nullptr;
    n->value = std::move(value);
    // Iterative, with early exits (the insert is most of a cache miss's own cost): max_end is
    // raised on the way down (an insert only raises it, and a rotation keeps a subtree's max_end);
    // on the way back up, heights are recomputed until one is unchanged or one rotation restores
    // the subtree's height as it was before the insert; above that point nothing changes.
    Node** path[kMaxHeight];
    int depth = 0;
    Node** link = &root_;
    while (*link != nullptr) {
      Node* t = *link;
      path[depth++] = link;
      if (t->max_end < end) t->max_end = end;
      link = Less(start, n->seq, t->start, t->seq) ? &t->left : &t->right;
    }
    *link = n;
    while (depth > 0) {
      Node** up = path[--depth];
      Node* t = *up;
      const int hl = Height(t->left);
      const int hr = Height(t->right);
      if (hl - hr > 1 || hr - hl > 1) {
        *up = Balance(t);
        break;
      }
      const int h = 1 + std::max(hl, hr);
      if (h == t->height) break;
      t->height = h;
    }
    ++size_;
    return n;
  }

  // Removes the interval named by `h`.
  // REQUIRES: `h` came from Insert on this tree and was not erased.
  void Erase(Handle h) {
    root_ = EraseAt(root_, h->start, h->seq);
    --size_;
    h->left = free_;
    free_ = h;
  }

  // Returns some interval with start <= a, end >= b and pred(value, start, end) true, or nullptr.
  template <typename Pred>
  Handle FindCovering(uintptr_t a, uintptr_t b, Pred&& pred) const {
    return FindAt(root_, a, b, pred);
  }

  // Calls fn(handle) for every interval that overlaps [a, b) (start < b and end > a), in order of
  // start. `fn` must not change the tree.
  template <typename Fn>
  void VisitOverlapping(uintptr_t a, uintptr_t b, Fn&& fn) const {
    VisitAt(root_, a, b, fn);
  }

  static uintptr_t Start(Handle h) { return h->start; }
  static uintptr_t End(Handle h) { return h->end; }
  static V& Value(Handle h) { return h->value; }

  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }

  // Checks invariants 1-3; returns false on the first violation. For tests.
  bool CheckInvariants() const {
    const Node* prev = nullptr;
    bool ok = true;
    CheckAt(root_, &prev, &ok);
    return ok;
  }

 private:
  struct Node {
    uintptr_t start;
    uintptr_t end;
    uintptr_t max_end;
    uint64_t seq;
    Node* left;  // also the free-list link
    Node* right;
    int height;
    V value;
  };

  static int Height(const Node* n) { return n ? n->height : 0; }
  static uintptr_t MaxEnd(const Node* n) { return n ? n->max_end : 0; }
  static bool Less(uintptr_t s1, uint64_t q1, uintptr_t s2, uint64_t q2) {
    return s1 < s2 || (s1 == s2 && q1 < q2);
  }

  // AVL height is below 1.45 log2(n + 2): 96 levels cover any tree that fits in memory.
  static constexpr int kMaxHeight = 96;

  static void Update(Node* n) {
    n->height = 1 + std::max(Height(n->left), Height(n->right));
    n->max_end = std::max({n->end, MaxEnd(n->left), MaxEnd(n->right)});
  }

  static Node* RotateRight(Node* n) {
    Node* l = n->left;
    n->left = l->right;
    l->right = n;
    Update(n);
    Update(l);
    return l;
  }

  static Node* RotateLeft(Node* n) {
    Node* r = n->right;
    n->right = r->left;
    r->left = n;
    Update(n);
    Update(r);
    return r;
  }

  static Node* Balance(Node* n) {
    Update(n);
    int bf = Height(n->left) - Height(n->right);
    if (bf > 1) {
      if (Height(n->left->left) < Height(n->left->right)) n->left = RotateLeft(n->left);
      return RotateRight(n);
    }
    if (bf < -1) {
      if (Height(n->right->right) < Height(n->right->left)) n->right = RotateRight(n->right);
      return RotateLeft(n);
    }
    return n;
  }

  // Detaches the minimum of subtree t into *min; returns the new subtree.
  static Node* TakeMin(Node* t, Node** min) {
    if (t->left == nullptr) {
      *min = t;
      return t->right;
    }
    t->left = TakeMin(t->left, min);
    return Balance(t);
  }

  static Node* EraseAt(Node* t, uintptr_t start, uint64_t seq) {
    assert(t != nullptr);
    if (Less(start, seq, t->start, t->seq)) {
      t->left = EraseAt(t->left, start, seq);
    } else if (Less(t->start, t->seq, start, seq)) {
      t->right = EraseAt(t->right, start, seq);
    } else {
      if (t->left == nullptr) return t->right;
      if (t->right == nullptr) return t->left;
      Node* succ = nullptr;
      Node* right = TakeMin(t->right, &succ);
      succ->left = t->left;
      succ->right = right;
      return Balance(succ);
    }
    return Balance(t);
  }

  template <typename Pred>
  static Node* FindAt(Node* t, uintptr_t a, uintptr_t b, Pred& pred) {
    // Only subtrees whose max_end reaches b can hold a covering interval.
    while (t != nullptr && t->max_end >= b) {
      if (Node* l = FindAt(t->left, a, b, pred)) return l;
      if (t->start > a) return nullptr;  // t and everything right of it start after a
      if (t->end >= b && pred(t->value, t->start, t->end)) return t;
      t = t->right;
    }
    return nullptr;
  }

  template <typename Fn>
  static void VisitAt(Node* t, uintptr_t a, uintptr_t b, Fn& fn) {
    while (t != nullptr && t->max_end > a) {
      VisitAt(t->left, a, b, fn);
      if (t->start >= b) return;
      if (t->end > a) fn(t);
      t = t->right;
    }
  }

  static void CheckAt(const Node* t, const Node** prev, bool* ok) {
    if (t == nullptr || !*ok) return;
    CheckAt(t->left, prev, ok);
    if (*prev != nullptr && !Less((*prev)->start, (*prev)->seq, t->start, t->seq)) *ok = false;
    *prev = t;
    int hl = Height(t->left), hr = Height(t->right);
    if (t->height != 1 + std::max(hl, hr) || hl - hr > 1 || hr - hl > 1) *ok = false;
    if (t->max_end != std::max({t->end, MaxEnd(t->left), MaxEnd(t->right)})) *ok = false;
    CheckAt(t->right, prev, ok);
  }

  Node* AllocNode() {
    if (free_ == nullptr) {
      size_t n = chunks_.empty() ? 64 : std::min<size_t>(chunks_.size() * 256, 65536);
      chunks_.push_back(std::make_unique<Node[]>(n));
      Node* chunk = chunks_.back().get();
      for (size_t i = 0; i < n; ++i) {
        chunk[i].left = free_;
        free_ = &chunk[i];
      }
    }
    Node* n = free_;
    free_ = n->left;
    return n;
  }

  Node* root_ = nullptr;
  Node* free_ = nullptr;
  size_t size_ = 0;
  uint64_t next_seq_ = 0;
  std::vector<std::unique_ptr<Node[]>> chunks_;
};

}  // namespace sanreg

#endif  // SANREG_REGCACHE_INTERVAL_TREE_H_
