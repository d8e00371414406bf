// verbs_api.h: the one table through which the verbs backend makes every ibv_* and rdma_* call.
//
// The backend never calls rdma-core directly: it calls through a VerbsApi, filled either with
// rdma-core's own functions (RdmaCoreApi(), linking libibverbs and librdmacm) or with the in-process
// fake device (datapath/verbs/fake_device.h), so that the same backend code runs on a real NIC and
// in tests on machines without one. Entries keep rdma-core's signatures and conventions (NULL or -1
// with errno set); the Call* helpers below turn a failure into an absl::Status carrying errno's text.
// ibv_post_send, ibv_poll_cq, ibv_alloc_mw and ibv_dealloc_mw are inline functions in verbs.h
// (dispatching through the context's ops); the real table wraps them in plain functions.
//
// Thread-safety: a VerbsApi is an immutable table; its entries are as thread-safe as rdma-core's.

#ifndef SANREG_DATAPATH_VERBS_VERBS_API_H_
#define SANREG_DATAPATH_VERBS_VERBS_API_H_

#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

#include "absl/status/status.h"

namespace sanreg::internal {

struct VerbsApi {
  const char* name;  // "rdma-core" or "fake"

  // Devices (rdmacm's contexts: an rdma_cm_id resolves to one of these same contexts).
  ibv_context** (*get_devices)(int* num);
  void (*free_devices)(ibv_context** list);
  const char* (*get_device_name)(ibv_device* device);
  int (*query_device)(ibv_context* ctx, ibv_device_attr* attr);
  int (*query_port)(ibv_context* ctx, uint8_t port, ibv_port_attr* attr);

  // Protection domains, memory regions, memory windows.
  ibv_pd* (*alloc_pd)(ibv_context* ctx);
  int (*dealloc_pd)(ibv_pd* pd);
  ibv_mr* (*reg_mr)(ibv_pd* pd, void* addr, size_t length, int access);
  int (*dereg_mr)(ibv_mr* mr);
  ibv_mw* (*alloc_mw)(ibv_pd* pd, ibv_mw_type type);
  int (*dealloc_mw)(ibv_mw* mw);

  // Completion queues and the data path.
  ibv_cq* (*create_cq)(ibv_context* ctx, int cqe, void* cq_context, ibv_comp_channel* channel,
                       int comp_vector);
  int (*destroy_cq)(ibv_cq* cq);
  int (*poll_cq)(ibv_cq* cq, int num_entries, ibv_wc* wc);  // returns count, < 0 on error
  int (*post_send)(ibv_qp* qp, ibv_send_wr* wr, ibv_send_wr** bad_wr);  // returns an errno value

  // rdmacm: connection management.
  rdma_event_channel* (*create_event_channel)();
  void (*destroy_event_channel)(rdma_event_channel* channel);
  int (*create_id)(rdma_event_channel* channel, rdma_cm_id** id, void* context,
                   rdma_port_space ps);
  int (*destroy_id)(rdma_cm_id* id);
  int (*migrate_id)(rdma_cm_id* id, rdma_event_channel* channel);
  int (*bind_addr)(rdma_cm_id* id, sockaddr* addr);
  int (*resolve_addr)(rdma_cm_id* id, sockaddr* src, sockaddr* dst, int timeout_ms);
  int (*resolve_route)(rdma_cm_id* id, int timeout_ms);
  int (*listen)(rdma_cm_id* id, int backlog);
  int (*create_qp)(rdma_cm_id* id, ibv_pd* pd, ibv_qp_init_attr* attr);
  void (*destroy_qp)(rdma_cm_id* id);
  int (*connect)(rdma_cm_id* id, rdma_conn_param* param);
  int (*accept)(rdma_cm_id* id, rdma_conn_param* param);
  int (*reject)(rdma_cm_id* id, const void* private_data, uint8_t len);
  int (*disconnect)(rdma_cm_id* id);
  int (*get_cm_event)(rdma_event_channel* channel, rdma_cm_event** event);
  int (*ack_cm_event)(rdma_cm_event* event);
};

// The table of rdma-core's functions (libibverbs, librdmacm).
const VerbsApi* RdmaCoreApi();

// A Status for a failed call `what` whose errno value is `err`: kResourceExhausted for ENOMEM and
// ENOSPC, kInvalidArgument for EINVAL, kPermissionDenied for EACCES and EPERM, kNotFound for
// ENODEV and ENOENT, kUnavailable otherwise. The message carries strerror(err).
absl::Status VerbsError(const char* what, int err);

// For entries that return 0 or -1 with errno set (rdmacm and most ibv_* calls).
inline absl::Status CallStatus(const char* what, int rc) {
  return rc == 0 ? absl::OkStatus() : VerbsError(what, rc > 0 ? rc : errno);
}

// Maps a work completion's status to the Status the operation completes with:
//   IBV_WC_SUCCESS                                               OK
//   IBV_WC_REM_ACCESS_ERR, LOC_PROT_ERR, LOC_ACCESS_ERR,
//   MW_BIND_ERR                                                  kPermissionDenied
//   IBV_WC_LOC_LEN_ERR, REM_INV_REQ_ERR, LOC_QP_OP_ERR           kInvalidArgument
//   IBV_WC_WR_FLUSH_ERR, RETRY_EXC_ERR, RNR_RETRY_EXC_ERR,
//   REM_ABORT_ERR, REM_OP_ERR, FATAL_ERR, RESP_TIMEOUT_ERR       kUnavailable
//   anything else                                                kInternal
// The message names the verbs status (ibv_wc_status_str).
absl::Status WcStatusToStatus(ibv_wc_status status);

}  // namespace sanreg::internal

#endif  // SANREG_DATAPATH_VERBS_VERBS_API_H_
