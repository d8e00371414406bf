// op_list.h: what the libfabric and verbs backends both do with an operation's Completion: check
// the operation on the initiator and fill the Completion (Prepare), and keep it in the intrusive
// doubly linked lists of posted and queued operations, threaded through the Completion the caller
// owns, so that tracking an operation allocates nothing.
//
// Thread-safety: none; Prepare runs before the operation is published, and the backend holds the
// lock that guards a list.

#ifndef SANREG_DATAPATH_INTERNAL_OP_LIST_H_
#define SANREG_DATAPATH_INTERNAL_OP_LIST_H_

#include <cstddef>
#include <cstdint>
#include <span>

#include "absl/status/status.h"
#include "datapath/completion.h"
#include "datapath/remote_region.h"
#include "regcache/registrar.h"

namespace sanreg::internal {

struct OpList {
  // Checks a Write (`write`) or Read of `sg` against `r` at `offset` before anything is posted,
  // as endpoint.h lists (kInvalidArgument, kPermissionDenied, kOutOfRange), and on success fills
  // `c`'s scatter-gather entries, length, remote address and key, and resets its result.
  // `max_sge` and `max_length` (of one entry and of the whole) are the backend's limits;
  // `desc_of(reg, &desc)` gives an entry's local descriptor, false when `reg` was not made by the
  // backend's registrar. REQUIRES: `c` is not null.
  template <typename DescOf>
  static absl::Status Prepare(bool write, std::span<const Sge> sg, const RemoteRegion& r,
                              uint64_t offset, uint64_t connection_id, size_t max_sge,
                              size_t max_length, Completion* c, DescOf desc_of) {
    if (sg.empty() || sg.size() > max_sge) {
      return absl::InvalidArgumentError("scatter-gather list empty or too long");
    }
    if (c->core_ != nullptr) return absl::InvalidArgumentError("completion still in flight");
    size_t total = 0;
    for (size_t i = 0; i < sg.size(); ++i) {
      const Sge& e = sg[i];
      const uintptr_t a = reinterpret_cast<uintptr_t>(e.addr);
      if (e.reg == nullptr || e.addr == nullptr || e.length == 0 || a + e.length < a ||
          a < e.reg->addr || a + e.length > e.reg->addr + e.reg->length ||
          !desc_of(*e.reg, &c->desc_[i])) {
        return absl::InvalidArgumentError("buffer empty or not covered by its registration");
      }
      if (!write && (e.reg->access & kAccessLocalWrite) == 0) {
        return absl::PermissionDeniedError("read target not registered for local write");
      }
      if (total + e.length < total || e.length > max_length) {
        return absl::InvalidArgumentError("length overflows");
      }
      total += e.length;
      c->iov_[i].iov_base = e.addr;
      c->iov_[i].iov_len = e.length;
    }
    if (r.connection != connection_id) {
      return absl::PermissionDeniedError("descriptor was exposed on another connection");
    }
    if ((r.rights & (write ? kAccessRemoteWrite : kAccessRemoteRead)) == 0) {
      return absl::PermissionDeniedError(write ? "region is not remotely writable"
                                               : "region is not remotely readable");
    }
    if (offset > r.length || total > r.length - offset) {
      return absl::OutOfRangeError("transfer runs past the end of the remote region");
    }
    if (total > max_length) {
      return absl::InvalidArgumentError("transfer longer than the backend takes");
    }
    c->iov_count_ = static_cast<uint8_t>(sg.size());
    c->total_ = total;
    c->remote_addr_ = r.addr + offset;
    c->remote_key_ = r.key;
    c->is_write_ = write;
    c->bytes_ = 0;
    c->status_ = absl::OkStatus();
    c->done_.store(false, std::memory_order_relaxed);
    return absl::OkStatus();
  }

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
