// data_path.cc: the libfabric backend's hot path: posting Write/Read, reaping completions, the
// progress thread. Nothing here allocates or formats strings on success.

#include <poll.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>
#include <sched.h>
#include <time.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <mutex>

#include "datapath/completion.h"
#include "datapath/endpoint.h"
#include "datapath/internal/op_list.h"
#include "datapath/libfabric/core.h"
#include "datapath/libfabric/fault_hook.h"

namespace sanreg {
namespace {

// Completion::Wait blocks on one of these, chosen by address, so that marking a Completion done
// never touches it after the waiter may have freed it (invariant 2 of completion.h). `sleepers`
// counts the threads between registering under `mu` and leaving the wait, so that a completion
// nobody sleeps on takes no lock: the finisher stores done then reads sleepers, a sleeper counts
// itself then reads done, all sequentially consistent, so at least one of them sees the other.
struct WaitShard {
  std::mutex mu;
  std::condition_variable cv;
  std::atomic<int> sleepers{0};
};
constexpr size_t kWaitShards = 64;
// How long Completion::Wait drives its endpoint before it sleeps.
constexpr int64_t kWaitDriveNs = 1'000'000;
WaitShard& ShardFor(const void* p) {
  static WaitShard shards[kWaitShards];
  return shards[(reinterpret_cast<uintptr_t>(p) >> 6) % kWaitShards];
}

}  // namespace

void Completion::Wait() {
  if (Done()) return;
  // Drive the endpoint from this thread for a while (as Endpoint::Poll does): most operations
  // complete within that time, and a hand-off from the progress thread costs a sleep and a
  // wake-up, tens of microseconds. Then sleep, handing the endpoint back to the progress thread.
  if (std::shared_ptr<internal::EndpointCore> core = owner_.lock()) {
    // The drive's clock starts at its 64th pass: most waits end before, without reading it.
    timespec start = {0, 0};
    for (uint32_t n = 1; !Done(); ++n) {
      const int64_t now = internal::NowCoarseNs();
      core->MarkDriven(now);
      core->Progress(now);
      if (n % 64 != 0) continue;
      timespec t;
      clock_gettime(CLOCK_MONOTONIC, &t);
      if (n == 64) {
        start = t;
        continue;
      }
      if ((t.tv_sec - start.tv_sec) * 1'000'000'000 + (t.tv_nsec - start.tv_nsec) > kWaitDriveNs) {
        core->ReleaseDriven();  // the progress thread takes the endpoint back at once
        core->fabric_->Wake();
        break;
      }
    }
  }
  if (Done()) return;
  WaitShard& s = ShardFor(this);
  std::unique_lock<std::mutex> l(s.mu);
  s.sleepers.fetch_add(1, std::memory_order_seq_cst);
  s.cv.wait(l, [this] { return done_.load(std::memory_order_seq_cst); });
  s.sleepers.fetch_sub(1, std::memory_order_relaxed);
}

namespace internal {

void EndpointCore::Finish(Completion* c, absl::Status s) {
  Completion::Callback cb = c->callback_;
  void* arg = c->arg_;
  c->bytes_ = s.ok() ? c->total_ : 0;
  c->status_ = std::move(s);
  c->core_ = nullptr;
  c->posted_ = false;
  WaitShard& sh = ShardFor(c);
  c->done_.store(true, std::memory_order_seq_cst);
  // From here on `c` may be freed (invariant 2 of completion.h): only the shard is touched.
  if (sh.sleepers.load(std::memory_order_seq_cst) != 0) {
    // Under the lock, so that a sleeper between its check of done and its sleep is not missed.
    std::lock_guard<std::mutex> l(sh.mu);
    sh.cv.notify_all();
  }
  if (cb != nullptr) cb(c, arg);
}

void FinishOperation(Completion* c, absl::Status s) { EndpointCore::Finish(c, std::move(s)); }

ssize_t EndpointCore::PostOne(Completion* c) {
  if (int fault = InjectedFault(FaultSite::kPost); fault != 0) return fault;  // tests only
  fi_rma_iov rma = {c->remote_addr_, c->total_, c->remote_key_};
  fi_msg_rma msg = {};
  msg.msg_iov = c->iov_;
  msg.desc = c->desc_;
  msg.iov_count = c->iov_count_;
  msg.addr = peer_;
  msg.rma_iov = &rma;
  msg.rma_iov_count = 1;
  msg.context = c;
  // Delivery completion: the write completes once it is in the target's memory, and a write the
  // target refuses completes with an error instead of silently (tcp reports it only so).
  return c->is_write_ ? fi_writemsg(ep_, &msg, FI_COMPLETION | FI_DELIVERY_COMPLETE)
                      : fi_readmsg(ep_, &msg, FI_COMPLETION);
}

bool EndpointCore::PeerGone() const {
  if (peer_alive_ != nullptr) return peer_alive_->Gone();
  pollfd p = {sock_, POLLRDHUP, 0};
  return poll(&p, 1, 0) > 0 && (p.revents & (POLLHUP | POLLERR | POLLRDHUP)) != 0;
}

bool EndpointCore::PostQueued(ssize_t* post_error) {
  const size_t max = fabric_->max_in_flight_;
  if (queued_head_ == nullptr || posted_count_ >= max) return true;
  if (fabric_->check_peer_before_post_ && PeerGone()) return false;
  while (queued_head_ != nullptr && posted_count_ < max) {
    Completion* c = queued_head_;
    ssize_t rc = PostOne(c);
    if (rc != 0) {
      // -FI_EAGAIN: retried on the next progress. Another error fails the connection (the caller
      // does): retrying it would leave the operation queued until its deadline, or for ever when
      // nothing else is posted.
      if (rc != -FI_EAGAIN) *post_error = rc;
      return true;
    }
    OpList::Unlink(&queued_head_, &queued_tail_, c);
    --queued_count_;
    c->posted_ = true;
    c->posted_ns_ = NowCoarseNs();
    OpList::Link(&posted_head_, &posted_tail_, c);
    ++posted_count_;
  }
  return true;
}

void EndpointCore::MaybeWakePeer(int64_t now_ns) {
  if (now_ns - last_wake_sent_ns_ < kWakeRepeatNs) return;
  last_wake_sent_ns_ = now_ns;
  (void)send(sock_, &kWakeByte, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
}

absl::Status EndpointCore::Post(bool write, std::span<const Sge> sg, const RemoteRegion& r,
                                uint64_t offset, Completion* c) {
  if (c == nullptr) return absl::InvalidArgumentError("no completion");
  const bool local = fabric_->is_local_;
  absl::Status prepared = OpList::Prepare(
      write, sg, r, offset, id_, fabric_->iov_limit_, SIZE_MAX, c,
      [local](const Registration& reg, void** desc) {
        *desc = local ? fi_mr_desc(reinterpret_cast<const MrRecord*>(reg.handle)->local_mr)
                      : reinterpret_cast<void*>(reg.local_key);
        return true;
      });
  if (!prepared.ok()) return prepared;
  const int64_t now = NowCoarseNs();
  // A caller that drives this endpoint (Wait, Poll) and posts on it is still driving it: its
  // posts mark it, so that the progress thread neither takes the endpoint at the next clock tick
  // nor is woken by these posts (below) while the caller is between its polls. On tcp a post
  // sends inline and a burst of large ones outlasts a tick; a progress thread woken into it, on
  // the caller's CPU, preempted the caller and passed the provider's locks back and forth with it
  // (11,000 context switches in 2 s on 1 MiB writes at depth 32, against 950 for the raw loop).
  // An endpoint nobody polls (callbacks only) is never marked here: its posts wake the progress
  // thread as before. Only a poll makes posts mark (RecentlyPolled), so a caller that stops
  // polling is taken over within a few ticks however often it posts.
  const bool polled = RecentlyPolled(now);
  if (polled) MarkPosting(now);
  if (const int cpu = sched_getcpu(); post_cpu_.load(std::memory_order_relaxed) != cpu) {
    post_cpu_.store(cpu, std::memory_order_relaxed);
  }
  if (fabric_->check_peer_before_post_ && PeerGone()) {
    // Never post to a dead shm peer (see PeerGone): fail the connection instead (idempotent).
    Fail(absl::UnavailableError("the peer closed the connection or died"), /*peer_gone=*/true);
    return health();
  }
  // For Completion::Wait. A Completion reused on the same endpoint keeps its reference: comparing
  // control blocks takes no atomic operation, assigning one takes two.
  if (c->owner_.owner_before(self_) || self_.owner_before(c->owner_)) c->owner_ = self_;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (state_ != State::kOpen) return health_;
    c->core_ = this;
    c->posted_ns_ = now;
    ssize_t rc = -FI_EAGAIN;
    if (queued_head_ == nullptr && posted_count_ < fabric_->max_in_flight_) rc = PostOne(c);
    if (rc == 0) {
      c->posted_ = true;
      OpList::Link(&posted_head_, &posted_tail_, c);
      ++posted_count_;
    } else if (rc == -FI_EAGAIN) {
      c->posted_ = false;
      OpList::Link(&queued_head_, &queued_tail_, c);
      ++queued_count_;
    } else {
      c->core_ = nullptr;
      return FiError(write ? "fi_writemsg" : "fi_readmsg", static_cast<int>(-rc));
    }
    pending_atomic_.store(posted_count_ + queued_count_, std::memory_order_relaxed);
    has_queued_.store(queued_count_ > 0, std::memory_order_relaxed);
    MaybeWakePeer(now);
  }
  // A caller that drives this endpoint (Wait, Poll) most likely reaps the completion itself: then
  // only a long sleep is cut short, one the progress thread chose before that caller's mark (a
  // short one ends within a tick, and the thread watches the endpoint from then on). A sleep this
  // load misses is one the progress thread chose after its reads saw this operation pending: it
  // stores the sleep, then reads the endpoints; this stored pending_atomic_, unlocked mu_ (on x86
  // a locked instruction, a full barrier), then reads the sleep. It then sleeps not at all, or
  // short.
  fabric_->Wake(/*even_short=*/!polled);
  return absl::OkStatus();
}

size_t EndpointCore::Progress(int64_t now_ns) {
  if (!open_.load(std::memory_order_acquire)) return 0;
  constexpr int kBatch = 32;
  Completion* done[kBatch + 1];
  size_t ndone = 0;
  Completion* failed = nullptr;
  bool first_failure = false;  // `failed` is the first operation the provider failed
  int failed_err = 0;
  absl::Status failing;  // why the connection was already failing when `failed` came back
  bool dropped = false;
  absl::Status fail_why;
  {
    if (!cq_mu_.try_lock()) return 0;
    // Checked again under cq_mu_: once Fail has cleared open_ and passed through cq_mu_, no
    // thread touches the provider endpoint (see Fail).
    if (cq_ == nullptr || !open_.load(std::memory_order_acquire)) {
      cq_mu_.unlock();
      return 0;
    }
    fi_cq_entry entries[kBatch];
    ssize_t got = InjectedFault(FaultSite::kCqRead);  // tests only; 0 when off
    if (got == 0) got = fi_cq_read(cq_, entries, kBatch);
    if (got > 0) {
      for (ssize_t i = 0; i < got; ++i) {
        if (entries[i].op_context == &drop_watch_) {
          fail_why = absl::UnavailableError("protocol error: the peer sent a message");
          continue;
        }
        Completion* c = static_cast<Completion*>(entries[i].op_context);
        if (failed == nullptr) {
          if (int fault = InjectedFault(FaultSite::kCompletion); fault != 0) {  // tests only
            failed = c;
            failed_err = fault;
            fail_why = absl::UnavailableError("connection failed after an operation error");
            continue;
          }
        }
        done[ndone++] = c;
      }
    } else if (got == -FI_EAVAIL) {
      fi_cq_err_entry err = {};
      if (fi_cq_readerr(cq_, &err, 0) == 1 && err.op_context == &drop_watch_) {
        dropped = true;  // tcp: the provider dropped the connection (see drop_watch_)
        fail_why = absl::UnavailableError("the provider dropped the connection");
      } else {
        failed = static_cast<Completion*>(err.op_context);
        failed_err = err.err;
        fail_why = absl::UnavailableError("connection failed after an operation error");
      }
    } else if (got != -FI_EAGAIN) {
      fail_why = FiError("fi_cq_read", static_cast<int>(-got));
    } else if (pending_atomic_.load(std::memory_order_relaxed) == 0 ||
               (!has_queued_.load(std::memory_order_relaxed) && now_ns == idle_checked_ns_)) {
      // Nothing completed, and either nothing is outstanding (a target's endpoint, or an idle
      // one: no list to update, no deadline to watch, no peer to keep hot), or nothing is queued
      // and this clock tick's deadline check and wake-up were done by an earlier pass (on the
      // coarse clock they would find the same). A Post racing this check handles its own
      // operation, or marks it queued for the next pass.
      cq_mu_.unlock();
      return 0;
    } else {
      idle_checked_ns_ = now_ns;
    }
    std::lock_guard<std::mutex> l(mu_);
    for (size_t i = 0; i < ndone; ++i) {
      OpList::Unlink(&posted_head_, &posted_tail_, done[i]);
      --posted_count_;
    }
    if (failed != nullptr) {
      OpList::Unlink(&posted_head_, &posted_tail_, failed);
      --posted_count_;
      first_failure = !op_failed_;
      op_failed_ = true;
      // A local Close (or an earlier failure) that cut it off is what it completes with.
      if (state_ != State::kOpen) failing = health_;
    }
    if (dropped) provider_dropped_ = true;
    if (state_ == State::kOpen) {
      ssize_t post_error = 0;
      if (!PostQueued(&post_error) && fail_why.ok()) {
        fail_why = absl::UnavailableError("the peer closed the connection or died");
      }
      if (post_error != 0 && fail_why.ok()) {
        fail_why = FiError("posting a queued operation", static_cast<int>(-post_error));
      }
      // The oldest operation of each list (a queued one waits out an -FI_EAGAIN storm).
      const int64_t timeout_ns = fabric_->op_timeout_ns_;
      if (fail_why.ok() &&
          ((posted_head_ != nullptr && now_ns - posted_head_->posted_ns_ > timeout_ns) ||
           (queued_head_ != nullptr && now_ns - queued_head_->posted_ns_ > timeout_ns))) {
        fail_why = absl::UnavailableError("operation deadline exceeded: the peer does not answer");
      }
      // Keep the target hot while operations are outstanding, not only when they are posted: the
      // ones posted from the queue here, and long ones, need its progress too (shm).
      if (posted_count_ + queued_count_ > 0) MaybeWakePeer(now_ns);
    }
    pending_atomic_.store(posted_count_ + queued_count_, std::memory_order_relaxed);
    has_queued_.store(queued_count_ > 0, std::memory_order_relaxed);
    cq_mu_.unlock();
  }
  // Fail first, so that whoever sees the failed operation finds the connection failed too.
  if (!fail_why.ok()) Fail(std::move(fail_why));
  for (size_t i = 0; i < ndone; ++i) Finish(done[i], absl::OkStatus());
  if (failed != nullptr) {
    // A refused access and a lost peer look alike here (tcp: FI_ECANCELED with a stale errno;
    // shm never reports a refusal). Fail has read the peer's last bytes: a peer whose provider
    // refused the access said so (kRefusedByte). With several operations in flight, the first
    // reported failed is taken for the refused one; the rest complete with fail_why.
    // The refusal wins over a failure of the connection it caused, which another thread may
    // have seen first (the peer's EOF, just after its kRefusedByte).
    absl::Status why = std::move(failing);
    if (first_failure && peer_refused_.load(std::memory_order_relaxed)) {
      why = absl::PermissionDeniedError("the target refused the access");
    } else if (why.ok()) {
      why = absl::UnavailableError(FiError("operation failed", failed_err).message());
    }
    Finish(failed, std::move(why));
  }
  return ndone + (failed != nullptr ? 1 : 0);
}

bool EndpointCore::OnSocketReadable() {
  char buf[64];
  ssize_t n = recv(sock_, buf, sizeof buf, MSG_DONTWAIT);
  if (n > 0) {
    for (ssize_t i = 0; i < n; ++i) {
      if (buf[i] == kRefusedByte) {
        peer_refused_.store(true, std::memory_order_relaxed);  // its EOF, and our CQ error, follow
      } else if (buf[i] != kWakeByte) {
        Fail(absl::UnavailableError("protocol error on the out-of-band socket"));
        return false;
      }
    }
    return true;
  }
  if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
    // A peer whose access our provider refused sees its operation fail and closes; its EOF may
    // reach us before we have read our completion queue's report of the drop. Read it first, so
    // that the peer is told it was refused (kRefusedByte, in Fail) rather than that we left.
    Progress(NowCoarseNs());
    Fail(absl::UnavailableError("the peer closed the connection or died"), /*peer_gone=*/true);
  }
  return false;
}

void FabricCore::Wake(bool even_short) {
  // The first waker of a sleep takes it and writes; the others, posting in the same burst, find
  // it taken and make no system call (one write wakes the thread; ppoll clears it).
  int s = sleeping_.load(std::memory_order_seq_cst);
  while (true) {
    if (s == kAwake || (s == kShortSleep && !even_short)) return;
    if (sleeping_.compare_exchange_weak(s, kAwake, std::memory_order_seq_cst)) break;
  }
  uint64_t one = 1;
  // An eventfd write fails only when the counter would overflow: then a wake-up is pending anyway.
  [[maybe_unused]] ssize_t w = write(wake_fd_, &one, sizeof one);
}

void FabricCore::ProgressLoop() {
  std::vector<std::shared_ptr<EndpointCore>> snap;
  std::vector<pollfd> fds;
  uint64_t seen = EndpointRegistry<EndpointCore>::kNever;
  int64_t hot_until = 0;
  int64_t last_poll = 0;
  uint32_t idle_spins = 0;
  // About 50-100 us of shm polling between yields. Every 64 spins cost small shm operations up to
  // a tenth of their rate (each yield is a system call, a microsecond on a paravirtualized guest,
  // and an arriving operation waits it out); the scheduler still preempts a spinning thread when
  // its slice ends.
  constexpr uint32_t kSpinsPerYield = 1024;
  const int idle_ms =
      std::max<int>(1, static_cast<int>(absl::ToInt64Milliseconds(options_.idle_poll)));
  while (!stop_.load(std::memory_order_relaxed)) {
    if (endpoints_.Snapshot(&seen, &snap)) {
      fds.clear();
      fds.push_back({wake_fd_, POLLIN, 0});
      for (const auto& ep : snap) fds.push_back({ep->sock_, POLLIN, 0});
    }
    int64_t now = NowCoarseNs();
    size_t work = 0;
    bool busy = false;
    bool beside_poster = false;
    for (const auto& ep : snap) {
      // Its caller polls it (Endpoint::Poll, Completion::Wait), or posts between its polls: leave
      // it to them.
      if (ep->Driven(now)) continue;
      const size_t done = ep->Progress(now);
      const bool pending = ep->pending() > 0;
      work += done;
      busy = busy || pending;
      // sched_getcpu: a load (glibc reads it from rseq), and only on a pass that found nothing.
      beside_poster =
          beside_poster || (done == 0 && pending && ep->post_cpu() == sched_getcpu());
    }
    bool hot = busy || now < hot_until;
    if (hot && now - last_poll < 1'000'000) {
      // Spin; give the core away only now and then (a yield is a system call, slow next to a
      // provider's poll), so that a busy machine still runs everything else. Except on the CPU of
      // a thread posting operations this pass waits for: that thread is most likely posting more
      // (a burst outlasts the pass that its first post woke), and spinning here would hold its
      // CPU until the operations posted so far completed (on tcp 1 MiB writes at depth 32,
      // --pin, the burst then went out one or two at a time). It is yielded to at once; once it
      // polls, it drives the endpoint, and this thread leaves it (Driven).
      if (work == 0 && (beside_poster || ++idle_spins % kSpinsPerYield == 0)) sched_yield();
      continue;
    }
    last_poll = now;
    timespec timeout = {0, 0};
    if (!hot) {
      // Long until shown otherwise, then the endpoints are read: a Post whose operation these
      // reads miss sees the sleep, and wakes a long one whatever it finds (see Post).
      sleeping_.store(kLongSleep, std::memory_order_seq_cst);
      const int64_t now2 = NowCoarseNs();
      bool again = stop_.load(std::memory_order_seq_cst);
      bool watch = false;
      for (const auto& ep : snap) {
        again = again || (ep->pending() > 0 && !ep->Driven(now2));
        watch = watch || ep->RecentlyDriven(now2);
      }
      // A driven endpoint is looked at again when its caller may have stopped polling it; a
      // recently driven one takes posts that do not wake a short sleep.
      if (!again) {
        if (watch) {
          int expected = kLongSleep;  // a waker may have taken the sleep already
          sleeping_.compare_exchange_strong(expected, kShortSleep, std::memory_order_seq_cst);
          timeout = timespec{0, driver_recheck_ns_};
        } else {
          timeout = timespec{idle_ms / 1000, (idle_ms % 1000) * 1'000'000L};
        }
      }
    }
    int n = ppoll(fds.data(), fds.size(), &timeout, nullptr);
    sleeping_.store(kAwake, std::memory_order_relaxed);
    if (n <= 0) continue;
    if (fds[0].revents != 0) {
      uint64_t v;
      [[maybe_unused]] ssize_t r = read(wake_fd_, &v, sizeof v);  // resets the eventfd
    }
    for (size_t i = 1; i < fds.size(); ++i) {
      if (fds[i].revents != 0 && snap[i - 1]->OnSocketReadable()) {
        hot_until = NowCoarseNs() + kHotWindowNs;
      }
    }
  }
}

size_t EndpointCore::Poll() {
  const int64_t now = NowCoarseNs();
  MarkDriven(now);
  return Progress(now);
}

}  // namespace internal
}  // namespace sanreg
