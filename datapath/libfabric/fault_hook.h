// fault_hook.h: a test-only fault injection point in the libfabric backend's hot path.
//
// Tests (tests/datapath_fault_test.cc, tests/soak_test.cc) install a FaultHook; the data path asks
// it, at three sites, whether to fail there:
//   kPost:       before fi_writemsg/fi_readmsg (EndpointCore::PostOne). A negative fi error
//                (-FI_EAGAIN for a storm, another for a hard failure) is returned instead of
//                calling the provider; the provider never sees the operation.
//   kCqRead:     before fi_cq_read (EndpointCore::Progress). A negative fi error is taken for what
//                fi_cq_read returned, and the provider's queue is not read this time.
//   kCompletion: for each successful completion read. A positive fi error completes that operation
//                in error instead (as an error entry from fi_cq_readerr would), at most one per
//                batch.
// 0 means "no fault": the call goes on as usual.
//
// Why a hook and not wrapped ops tables: fi_writemsg and fi_cq_read are inline calls through the
// provider's per-fid ops tables. Wrapping them from a test means swapping the `rma` and `ops`
// pointers of every endpoint and completion queue, including those opened later by Accept and
// reconnects and those in other processes of a multi-process test, through an accessor into
// EndpointCore, and relying on provider-owned tables staying put. The hook covers every endpoint of
// the process with a few lines in data_path.cc, and its cost when off is one relaxed load of a
// pointer that never changes and one predictable branch per post and per CQ poll.
//
// Thread-safety: the hook is called from any thread that posts or polls, concurrently; it must be
// thread-safe, must not block, and must not call back into the data path. Set it before the
// operations it should see and clear it (nullptr) when done; a hook being cleared may still be
// called by a thread that loaded it just before, so it must stay callable until the fabrics that
// could have seen it are destroyed (a plain function is).

#ifndef SANREG_DATAPATH_LIBFABRIC_FAULT_HOOK_H_
#define SANREG_DATAPATH_LIBFABRIC_FAULT_HOOK_H_

#include <atomic>

namespace sanreg::internal {

enum class FaultSite { kPost, kCqRead, kCompletion };

using FaultHook = int (*)(FaultSite site);

// The installed hook, or nullptr (the default: no fault injection).
inline std::atomic<FaultHook> fault_hook{nullptr};

// What the data path calls at each site: 0, or the fault to inject (see the file comment).
inline int InjectedFault(FaultSite site) {
  FaultHook h = fault_hook.load(std::memory_order_relaxed);
  if (__builtin_expect(h == nullptr, 1)) return 0;
  return h(site);
}

}  // namespace sanreg::internal

#endif  // SANREG_DATAPATH_LIBFABRIC_FAULT_HOOK_H_
