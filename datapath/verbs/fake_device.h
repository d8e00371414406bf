// fake_device.h: an in-process RDMA device behind the VerbsApi table, for tests.
//
// The build machines have no RDMA device, so the verbs backend is tested against this fake. It
// implements the subset of libibverbs and librdmacm the backend uses, with rdma-core's signatures
// and error conventions, and checks what the verbs specification says a device checks:
//   - memory regions: reg_mr refuses remote write without local write (EINVAL); lkeys and rkeys are
//     32 random bits (getrandom), so a peer cannot guess one; dereg_mr refuses a region that a
//     memory window is bound to (EBUSY);
//   - type 2 memory windows: bound and invalidated by work requests on a queue pair
//     (IBV_WR_BIND_MW, IBV_WR_LOCAL_INV); a bind needs a free window of the QP's PD, a region
//     registered with IBV_ACCESS_MW_BIND covering the range, local write in the region for a
//     remotely writable window, and a new rkey that keeps the window's index (bits 8-31); a bound
//     window is reachable only through the QP it was bound on. Failures: IBV_WC_MW_BIND_ERR;
//   - RC queue pairs connected in process through a fake rdmacm (listen, resolve, connect,
//     accept with private data, reject, disconnect, events on an event channel whose fd polls);
//   - RDMA write and read: local keys, bounds and IBV_ACCESS_LOCAL_WRITE for read targets
//     (IBV_WC_LOC_PROT_ERR); at the target, the rkey must name a region or a bound window of the
//     target QP's PD, cover [remote_addr, remote_addr + length) and grant the remote right
//     (IBV_WC_REM_ACCESS_ERR at the initiator); zero-length operations check no key. A failed work
//     request completes with its error (signalled or not), moves the QP to the error state, and
//     every later one completes with IBV_WC_WR_FLUSH_ERR;
//   - send queue depth (ENOMEM past max_send_wr outstanding: a slot frees when the completion of
//     that work request or of a later one is polled), scatter-gather limit (EINVAL), inline data
//     (copied at post time, up to max_inline_data, EINVAL beyond) and selective signalling (a
//     successful unsignalled work request makes no completion).
// Work requests execute when the CQ they complete on is polled (in order, per QP), unless the
// device is paused: then they stay in flight, which is how tests hold operations in flight.
// Error injection: a failed registration, an error completion, a QP forced to error, a peer whose
// host vanishes (its peers' work requests complete with IBV_WC_RETRY_EXC_ERR, nobody is told).
//
// What it cannot show: real DMA timing and ordering between the CPU and the NIC, memory ordering
// of RDMA writes seen by a polling target, page pinning by the kernel (the registrar pins anyway),
// address resolution over a real network, and every vendor's deviation from the specification.
//
// Thread-safety: all of it; one mutex guards the whole device (it is a test fake, not fast).
// The fake is process-wide (the table's entries are plain functions): tests use it one at a time.

#ifndef SANREG_DATAPATH_VERBS_FAKE_DEVICE_H_
#define SANREG_DATAPATH_VERBS_FAKE_DEVICE_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "datapath/verbs/verbs_api.h"

namespace sanreg::internal {

struct FakeConfig {
  int devices = 2;               // named "fake0", "fake1", ...
  uint32_t active_ports = 0x1;   // bit i: device i's port 1 is active
  bool memory_windows = true;    // type 2 memory windows (IBV_DEVICE_MEM_WINDOW_TYPE_2B)
  uint32_t max_inline = 64;      // max_inline_data a QP gets at most
  int max_sge = 4;
  int max_qp_wr = 512;
};

struct FakeStats {
  uint64_t posted = 0;      // work requests accepted by post_send
  uint64_t signalled = 0;   // of those, with IBV_SEND_SIGNALED
  uint64_t inlined = 0;     // of those, with IBV_SEND_INLINE
  uint64_t completions = 0; // work completions generated
  uint64_t binds = 0;       // memory windows bound
  uint64_t invalidations = 0;
  uint64_t registered_mrs = 0;  // memory regions registered now
  uint64_t allocated_mws = 0;   // memory windows allocated now
};

class FakeDevice {
 public:
  // The process-wide fake device.
  static FakeDevice& Get();
  // Its table (the entries act on Get()).
  static const VerbsApi* Api();

  // Restores the default configuration and clears injected faults and statistics. Objects already
  // made keep working. REQUIRES: no work request executing.
  void Reset(FakeConfig config = FakeConfig());

  // The next reg_mr fails with errno `err`.
  void FailNextRegMr(int err);
  // The next RDMA write or read executed completes with `status` (its QP then goes to error).
  void FailNextWork(ibv_wc_status status);
  // While paused, posted work requests wait in their send queues.
  void SetPaused(bool paused);
  // Moves the QP to the error state: every work request in its send queue completes with
  // IBV_WC_WR_FLUSH_ERR at once (even while paused), later ones too.
  void ForceQpError(uint32_t qp_num);
  // The QP's host disappears: it never answers again, and nobody is told (no disconnect event);
  // work requests its peer executes complete with IBV_WC_RETRY_EXC_ERR.
  void Vanish(uint32_t qp_num);

  // The numbers of connected QPs made by the side that connected (`active`) or accepted.
  std::vector<uint32_t> ConnectedQps(bool active) const;
  FakeStats stats() const;
};

}  // namespace sanreg::internal

#endif  // SANREG_DATAPATH_VERBS_FAKE_DEVICE_H_
