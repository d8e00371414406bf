// data_path.cc: the verbs backend's hot path: posting Write/Read, reaping completions, the
// progress thread. Nothing here allocates or formats strings on success.

#include <poll.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "absl/strings/str_cat.h"
#include "datapath/completion.h"
#include "datapath/internal/op_list.h"
#include "datapath/verbs/verbs_backend.h"

namespace sanreg::internal {



void VerbsEndpoint::FinishChain(Completion* chain) {
  while (chain != nullptr) {
    Completion* next = chain->next_;
    FinishOperation(chain, std::move(chain->status_));
    chain = next;
  }
}

int VerbsEndpoint::PostOne(Completion* c) {
  ibv_sge sge[Completion::kMaxSge];
  for (uint8_t i = 0; i < c->iov_count_; ++i) {
    sge[i].addr = reinterpret_cast<uint64_t>(c->iov_[i].iov_base);
    sge[i].length = static_cast<uint32_t>(c->iov_[i].iov_len);
    sge[i].lkey = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(c->desc_[i]));
  }
  ibv_send_wr wr = {};
  wr.wr_id = reinterpret_cast<uint64_t>(c);
  wr.sg_list = sge;
  wr.num_sge = c->iov_count_;
  wr.opcode = c->is_write_ ? IBV_WR_RDMA_WRITE : IBV_WR_RDMA_READ;
  wr.wr.rdma.remote_addr = c->remote_addr_;
  wr.wr.rdma.rkey = static_cast<uint32_t>(c->remote_key_);
  // Inline: the device copies the bytes at post time (no DMA read of the buffer later).
  if (c->is_write_ && c->total_ <= max_inline_) wr.send_flags |= IBV_SEND_INLINE;
  const bool signal = unsignalled_ + 1 >= kSignalEvery;
  if (signal) wr.send_flags |= IBV_SEND_SIGNALED;
  ibv_send_wr* bad = nullptr;
  const int rc = api_->post_send(id_->qp, &wr, &bad);
  if (rc == 0) {
    unsignalled_ = signal ? 0 : unsignalled_ + 1;
    ++posts_;
  }
  return rc;
}

void VerbsEndpoint::PostQueued() {
  const size_t max = fabric_->max_in_flight_;
  while (queued_head_ != nullptr && posted_count_ < max) {
    Completion* c = queued_head_;
    if (PostOne(c) != 0) return;  // the send queue is full: retried on the next progress
    OpList::Unlink(&queued_head_, &queued_tail_, c);
    --queued_count_;
    c->posted_ = true;
    OpList::Link(&posted_head_, &posted_tail_, c);
    ++posted_count_;
  }
}

absl::Status VerbsEndpoint::Post(bool write, std::span<const Sge> sg, const RemoteRegion& r,
                                 uint64_t offset, Completion* c) {
  if (c == nullptr) return absl::InvalidArgumentError("no completion");
  absl::Status prepared = OpList::Prepare(
      write, sg, r, offset, connection_id_, fabric_->max_sge_, UINT32_MAX, c,
      [](const Registration& reg, void** desc) {
        if (reg.handle == 0) return false;
        // The current lkey (a re-registration without memory windows changes it).
        const auto* rec = reinterpret_cast<const VerbsMr*>(reg.handle);
        *desc = reinterpret_cast<void*>(uintptr_t{rec->lkey.load(std::memory_order_relaxed)});
        return true;
      });
  if (!prepared.ok()) return prepared;
  c->owner_.reset();  // Wait does not drive a verbs endpoint: the progress thread does
  {
    std::lock_guard<std::mutex> l(mu_);
    if (state_ != State::kOpen) return health_;
    c->core_ = this;
    int rc = ENOMEM;
    if (queued_head_ == nullptr && posted_count_ < fabric_->max_in_flight_) rc = PostOne(c);
    if (rc == 0) {
      c->posted_ = true;
      OpList::Link(&posted_head_, &posted_tail_, c);
      ++posted_count_;
    } else if (rc == ENOMEM) {
      c->posted_ = false;
      OpList::Link(&queued_head_, &queued_tail_, c);
      ++queued_count_;
    } else {
      c->core_ = nullptr;
      return VerbsError(write ? "ibv_post_send(RDMA write)" : "ibv_post_send(RDMA read)", rc);
    }
    pending_atomic_.store(posted_count_ + queued_count_, std::memory_order_relaxed);
  }
  fabric_->Wake();
  return absl::OkStatus();
}

absl::Status VerbsEndpoint::RunControl(ibv_send_wr* wr, Completion* c) {
  wr->wr_id = reinterpret_cast<uint64_t>(c);
  c->iov_count_ = 0;  // no data: a memory-window request
  c->total_ = 0;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (state_ != State::kOpen) return health_;
    ibv_send_wr* bad = nullptr;
    const int rc = api_->post_send(id_->qp, wr, &bad);
    if (rc != 0) return VerbsError("ibv_post_send(memory window)", rc);
    // Signalled: it completes every unsignalled request before it too.
    unsignalled_ = 0;
    ++posts_;
    c->core_ = this;
    c->posted_ = true;
    OpList::Link(&posted_head_, &posted_tail_, c);
    ++posted_count_;
    pending_atomic_.store(posted_count_ + queued_count_, std::memory_order_relaxed);
  }
  fabric_->Wake();
  c->Wait();
  return c->status();
}

void VerbsEndpoint::Consume(const ibv_wc& wc, Completion*** done, absl::Status* fail) {
  Completion* target = nullptr;
  if (wc.wr_id == reinterpret_cast<uint64_t>(&fence_)) {
    fence_posted_ = false;
    target = fence_through_;
    fence_through_ = nullptr;
    if (target == nullptr) return;  // what it covered completed already (flushed in order)
  } else {
    target = reinterpret_cast<Completion*>(wc.wr_id);
  }
  // RC completes the send queue in order: everything posted before `target` completed OK.
  while (posted_head_ != nullptr) {
    Completion* c = posted_head_;
    OpList::Unlink(&posted_head_, &posted_tail_, c);
    --posted_count_;
    if (c == fence_through_) fence_through_ = nullptr;
    const bool last = c == target;
    if (!last || wc.status == IBV_WC_SUCCESS) {
      c->status_ = absl::OkStatus();
    } else if (state_ == State::kOpen && fail->ok()) {
      // The request that failed: its own error. The connection fails after it.
      c->status_ = WcStatusToStatus(wc.status);
      *fail = absl::UnavailableError(absl::StrCat(
          "connection failed after an operation error: ", c->status_.message()));
    } else {
      c->status_ = state_ == State::kOpen ? *fail : health_;
    }
    **done = c;
    *done = &c->next_;
    if (last) break;
  }
  if (wc.status != IBV_WC_SUCCESS && fail->ok() && state_ == State::kOpen) {
    *fail = absl::UnavailableError(absl::StrCat("connection failed after an operation error: ",
                                                WcStatusToStatus(wc.status).message()));
  }
}

size_t VerbsEndpoint::Progress() {
  if (!open_.load(std::memory_order_acquire)) return 0;
  Completion* chain = nullptr;
  Completion** tail = &chain;
  absl::Status fail;
  size_t completed = 0;
  {
    if (!cq_mu_.try_lock()) return 0;
    ibv_wc wc[32];
    const int n = api_->poll_cq(cq_, 32, wc);
    std::lock_guard<std::mutex> l(mu_);
    if (state_ == State::kOpen) {
      if (n < 0) fail = absl::UnavailableError("ibv_poll_cq failed");
      for (int i = 0; i < n && fail.ok(); ++i) Consume(wc[i], &tail, &fail);
      if (fail.ok()) {
        PostQueued();
        // The newest request is unsignalled and nothing was posted since the last pass: ask for
        // a completion behind it (a zero-length RDMA write checks no key).
        if (unsignalled_ > 0 && posted_tail_ != nullptr && posts_ == posts_seen_ &&
            !fence_posted_) {
          ibv_send_wr wr = {};
          wr.wr_id = reinterpret_cast<uint64_t>(&fence_);
          wr.opcode = IBV_WR_RDMA_WRITE;
          wr.send_flags = IBV_SEND_SIGNALED;
          wr.wr.rdma.remote_addr = posted_tail_->remote_addr_;
          wr.wr.rdma.rkey = static_cast<uint32_t>(posted_tail_->remote_key_);
          ibv_send_wr* bad = nullptr;
          if (api_->post_send(id_->qp, &wr, &bad) == 0) {
            fence_posted_ = true;
            fence_through_ = posted_tail_;
            unsignalled_ = 0;
          }
        }
        posts_seen_ = posts_;
      }
      pending_atomic_.store(posted_count_ + queued_count_, std::memory_order_relaxed);
    }
    cq_mu_.unlock();
  }
  *tail = nullptr;
  // Fail first, so that whoever sees the failed operation finds the connection failed too.
  if (!fail.ok()) Fail(fail);
  for (Completion* c = chain; c != nullptr; c = c->next_) ++completed;
  FinishChain(chain);
  return completed;
}

void VerbsEndpoint::OnCmEvent() {
  for (;;) {
    rdma_cm_event* e = nullptr;
    if (api_->get_cm_event(channel_, &e) != 0) return;  // EAGAIN: nothing more
    const rdma_cm_event_type type = e->event;
    api_->ack_cm_event(e);
    if (type == RDMA_CM_EVENT_DISCONNECTED || type == RDMA_CM_EVENT_DEVICE_REMOVAL ||
        type == RDMA_CM_EVENT_TIMEWAIT_EXIT) {
      // Reap what completed before the peer left, then fail the rest.
      Progress();
      Fail(absl::UnavailableError("the peer closed the connection or died"));
      return;
    }
  }
}

void VerbsFabric::Wake() {
  if (!sleeping_.load(std::memory_order_seq_cst)) return;
  uint64_t one = 1;
  [[maybe_unused]] ssize_t w = write(wake_fd_, &one, sizeof one);
}

void VerbsFabric::ProgressLoop() {
  std::vector<std::shared_ptr<VerbsEndpoint>> snap;
  std::vector<pollfd> fds;
  uint64_t seen = EndpointRegistry<VerbsEndpoint>::kNever;
  const int idle_ms =
      std::max<int>(1, static_cast<int>(absl::ToInt64Milliseconds(options_.idle_poll)));
  while (!stop_.load(std::memory_order_relaxed)) {
    if (endpoints_.Snapshot(&seen, &snap)) {
      fds.clear();
      fds.push_back({wake_fd_, POLLIN, 0});
      for (const auto& ep : snap) fds.push_back({ep->channel_fd(), POLLIN, 0});
    }
    size_t work = 0;
    bool busy = false;
    for (const auto& ep : snap) {
      work += ep->Progress();
      busy = busy || ep->pending() > 0;
    }
    if (busy) {
      // Completions arrive without a system call; give the core away when none came.
      if (work == 0) sched_yield();
      // Disconnects are still noticed while busy.
      if (poll(fds.data() + 1, fds.size() - 1, 0) > 0) {
        for (size_t i = 1; i < fds.size(); ++i) {
          if (fds[i].revents != 0) snap[i - 1]->OnCmEvent();
        }
      }
      continue;
    }
    sleeping_.store(true, std::memory_order_seq_cst);
    bool again = false;
    for (const auto& ep : snap) again = again || ep->pending() > 0;
    const int timeout = again ? 0 : idle_ms;
    int n = poll(fds.data(), fds.size(), timeout);
    sleeping_.store(false, std::memory_order_relaxed);
    if (n <= 0) continue;
    if (fds[0].revents != 0) {
      uint64_t v;
      [[maybe_unused]] ssize_t r = read(wake_fd_, &v, sizeof v);
    }
    for (size_t i = 1; i < fds.size(); ++i) {
      if (fds[i].revents != 0) snap[i - 1]->OnCmEvent();
    }
  }
}

}  // namespace sanreg::internal
