// verbs_api.cc: the rdma-core table, and the errno / work-completion status mappings.

#include "datapath/verbs/verbs_api.h"

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace sanreg::internal {
namespace {

// verbs.h defines these as inline functions (or a macro, for ibv_query_port): plain functions here
// so that the table can point at them.
int QueryPort(ibv_context* ctx, uint8_t port, ibv_port_attr* attr) {
  return ibv_query_port(ctx, port, attr);
}
ibv_mw* AllocMw(ibv_pd* pd, ibv_mw_type type) { return ibv_alloc_mw(pd, type); }
int DeallocMw(ibv_mw* mw) { return ibv_dealloc_mw(mw); }
int PollCq(ibv_cq* cq, int n, ibv_wc* wc) { return ibv_poll_cq(cq, n, wc); }
int PostSend(ibv_qp* qp, ibv_send_wr* wr, ibv_send_wr** bad) { return ibv_post_send(qp, wr, bad); }
ibv_mr* RegMr(ibv_pd* pd, void* addr, size_t length, int access) {
  return ibv_reg_mr(pd, addr, length, access);
}

const char* WcStatusName(ibv_wc_status s) {
  switch (s) {
    case IBV_WC_SUCCESS: return "success";
    case IBV_WC_LOC_LEN_ERR: return "local length error";
    case IBV_WC_LOC_QP_OP_ERR: return "local QP operation error";
    case IBV_WC_LOC_EEC_OP_ERR: return "local EE context operation error";
    case IBV_WC_LOC_PROT_ERR: return "local protection error";
    case IBV_WC_WR_FLUSH_ERR: return "work request flushed error";
    case IBV_WC_MW_BIND_ERR: return "memory management operation error";
    case IBV_WC_BAD_RESP_ERR: return "bad response error";
    case IBV_WC_LOC_ACCESS_ERR: return "local access error";
    case IBV_WC_REM_INV_REQ_ERR: return "remote invalid request error";
    case IBV_WC_REM_ACCESS_ERR: return "remote access error";
    case IBV_WC_REM_OP_ERR: return "remote operation error";
    case IBV_WC_RETRY_EXC_ERR: return "transport retry counter exceeded";
    case IBV_WC_RNR_RETRY_EXC_ERR: return "RNR retry counter exceeded";
    case IBV_WC_LOC_RDD_VIOL_ERR: return "local RDD violation error";
    case IBV_WC_REM_INV_RD_REQ_ERR: return "remote invalid RD request";
    case IBV_WC_REM_ABORT_ERR: return "aborted error";
    case IBV_WC_INV_EECN_ERR: return "invalid EE context number";
    case IBV_WC_INV_EEC_STATE_ERR: return "invalid EE context state";
    case IBV_WC_FATAL_ERR: return "fatal error";
    case IBV_WC_RESP_TIMEOUT_ERR: return "response timeout error";
    case IBV_WC_GENERAL_ERR: return "general error";
    default: return "unknown work completion status";
  }
}

}  // namespace

const VerbsApi* RdmaCoreApi() {
  static const VerbsApi api = {
      "rdma-core",
      rdma_get_devices,
      rdma_free_devices,
      ibv_get_device_name,
      ibv_query_device,
      QueryPort,
      ibv_alloc_pd,
      ibv_dealloc_pd,
      RegMr,
      ibv_dereg_mr,
      AllocMw,
      DeallocMw,
      ibv_create_cq,
      ibv_destroy_cq,
      PollCq,
      PostSend,
      rdma_create_event_channel,
      rdma_destroy_event_channel,
      rdma_create_id,
      rdma_destroy_id,
      rdma_migrate_id,
      rdma_bind_addr,
      rdma_resolve_addr,
      rdma_resolve_route,
      rdma_listen,
      rdma_create_qp,
      rdma_destroy_qp,
      rdma_connect,
      rdma_accept,
      rdma_reject,
      rdma_disconnect,
      rdma_get_cm_event,
      rdma_ack_cm_event,
  };
  return &api;
}

absl::Status VerbsError(const char* what, int err) {
  std::string msg = absl::StrCat(what, ": ", strerror(err));
  switch (err) {
    case ENOMEM:
    case ENOSPC:
      return absl::ResourceExhaustedError(msg);
    case EINVAL:
      return absl::InvalidArgumentError(msg);
    case EACCES:
    case EPERM:
      return absl::PermissionDeniedError(msg);
    case ENODEV:
    case ENOENT:
      return absl::NotFoundError(msg);
    default:
      return absl::UnavailableError(msg);
  }
}

absl::Status WcStatusToStatus(ibv_wc_status status) {
  const std::string msg = absl::StrCat("work completion: ", WcStatusName(status));
  switch (status) {
    case IBV_WC_SUCCESS:
      return absl::OkStatus();
    case IBV_WC_REM_ACCESS_ERR:
    case IBV_WC_LOC_PROT_ERR:
    case IBV_WC_LOC_ACCESS_ERR:
    case IBV_WC_MW_BIND_ERR:
      return absl::PermissionDeniedError(msg);
    case IBV_WC_LOC_LEN_ERR:
    case IBV_WC_REM_INV_REQ_ERR:
    case IBV_WC_LOC_QP_OP_ERR:
      return absl::InvalidArgumentError(msg);
    case IBV_WC_WR_FLUSH_ERR:
    case IBV_WC_RETRY_EXC_ERR:
    case IBV_WC_RNR_RETRY_EXC_ERR:
    case IBV_WC_REM_ABORT_ERR:
    case IBV_WC_REM_OP_ERR:
    case IBV_WC_FATAL_ERR:
    case IBV_WC_RESP_TIMEOUT_ERR:
      return absl::UnavailableError(msg);
    default:
      return absl::InternalError(msg);
  }
}

}  // namespace sanreg::internal
