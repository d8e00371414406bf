// op_list.h: the intrusive doubly linked lists a backend keeps its operations in (posted, queued),
// threaded through the Completion the caller owns, so that tracking an operation allocates
// nothing. Shared by the libfabric and verbs backends.
//
// Thread-safety: none; the backend holds the lock that guards the list.

#ifndef SANREG_DATAPATH_INTERNAL_OP_LIST_H_
#define SANREG_DATAPATH_INTERNAL_OP_LIST_H_

#include "datapath/completion.h"

namespace sanreg::internal {

struct OpList {
  // Appends `c` to the list [*head, *tail].
  static void Link(Completion** head, Completion** tail, Completion* c) {
    c->next_ = nullptr;
    c->prev_ = *tail;
    if (*tail != nullptr) {
      (*tail)->next_ = c;
    } else {
      *head = c;
    }
    *tail = c;
  }
  // Removes `c`, which is on the list [*head, *tail].
  static void Unlink(Completion** head, Completion** tail, Completion* c) {
    if (c->prev_ != nullptr) {
      c->prev_->next_ = c->next_;
    } else {
      *head = c->next_;
    }
    if (c->next_ != nullptr) {
      c->next_->prev_ = c->prev_;
    } else {
      *tail = c->prev_;
    }
    c->prev_ = c->next_ = nullptr;
  }
};

}  // namespace sanreg::internal

#endif  // SANREG_DATAPATH_INTERNAL_OP_LIST_H_
