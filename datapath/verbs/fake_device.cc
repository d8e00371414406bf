// fake_device.cc: the fake device's state and the VerbsApi entries over it.

#include "datapath/verbs/fake_device.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace sanreg::internal {
namespace {

struct FakeQp;
struct FakeId;

struct FakeContext {
  ibv_context ctx;  // first: a pointer to it is a pointer to this
  ibv_device dev;
  int index;
};

struct FakePd {
  ibv_pd pd;
  int objects = 0;  // MRs, MWs and QPs made in it
};

struct FakeMr {
  ibv_mr mr;
  int access;
  int bound_windows = 0;
};

struct FakeMw {
  ibv_mw mw;
  bool bound = false;
  uint32_t rkey = 0;  // while bound
  uintptr_t addr = 0;
  size_t length = 0;
  int access = 0;
  FakeQp* qp = nullptr;
  FakeMr* mr = nullptr;
};

struct FakeCq {
  ibv_cq cq;
  struct Entry {
    ibv_wc wc;
    FakeQp* qp;
    uint64_t seq;
  };
  std::deque<Entry> entries;
  int qps = 0;
};

// One work request as the device holds it.
struct Work {
  uint64_t seq;
  uint64_t wr_id;
  ibv_wr_opcode opcode;
  bool signalled;
  std::vector<ibv_sge> sge;
  std::vector<uint8_t> inline_data;
  bool is_inline = false;
  uint64_t remote_addr = 0;
  uint32_t rkey = 0;
  ibv_mw* mw = nullptr;
  ibv_mw_bind_info bind = {};
  uint32_t invalidate_rkey = 0;
};

struct FakeQp {
  ibv_qp qp;
  FakeCq* send_cq;
  ibv_qp_cap cap;
  bool sig_all;
  bool error = false;
  bool vanished = false;
  bool active = false;  // made on the connecting side
  FakeQp* peer = nullptr;
  std::deque<Work> sq;
  uint64_t next_seq = 1;
  uint64_t retired = 0;  // completions up to this sequence number were polled
};

struct FakeEvent {
  rdma_cm_event ev;
  std::vector<uint8_t> data;
};

struct FakeChannel {
  rdma_event_channel ch;
  std::deque<FakeEvent*> events;
};

struct FakeId {
  rdma_cm_id id;
  FakeChannel* channel;
  uint16_t port = 0;        // bound or listening port
  uint16_t dst_port = 0;    // active: the port it resolved
  bool listening = false;
  bool active = false;
  FakeId* peer = nullptr;   // connected or connecting peer
  FakeQp* qp = nullptr;
};

class Device {
 public:
  std::mutex mu;
  FakeConfig config;
  FakeStats stats;
  int fail_reg_mr = 0;
  ibv_wc_status fail_work = IBV_WC_SUCCESS;
  bool paused = false;
  std::vector<std::unique_ptr<FakeContext>> contexts;
  std::map<uint32_t, FakeMr*> lkeys;
  std::map<uint32_t, FakeMr*> mr_rkeys;
  std::map<uint32_t, FakeMw*> mw_rkeys;  // bound windows by their current rkey
  std::map<uint32_t, FakeQp*> qps;
  std::map<uint16_t, FakeId*> listeners;
  uint16_t next_port = 20000;
  uint32_t next_qp_num = 100;
  std::map<uint32_t, bool> mw_indexes;  // bits 8-31 of allocated windows' rkeys

  Device() { Configure(FakeConfig()); }

  void Configure(const FakeConfig& c) {
    config = c;
    // Contexts live as long as the process (rdmacm's contexts do too); add the missing ones.
    while (static_cast<int>(contexts.size()) < c.devices) {
      auto fc = std::make_unique<FakeContext>();
      memset(&fc->ctx, 0, sizeof fc->ctx);
      memset(&fc->dev, 0, sizeof fc->dev);
      fc->index = static_cast<int>(contexts.size());
      snprintf(fc->dev.name, sizeof fc->dev.name, "fake%d", fc->index);
      fc->ctx.device = &fc->dev;
      contexts.push_back(std::move(fc));
    }
  }

  static uint32_t Random32() {
    uint32_t v = 0;
    while (getrandom(&v, sizeof v, 0) != sizeof v) {
    }
    return v;
  }

  // A random key in neither key table (nor 0).
  uint32_t NewKey() {
    for (;;) {
      uint32_t k = Random32();
      if (k != 0 && lkeys.count(k) == 0 && mr_rkeys.count(k) == 0 && mw_rkeys.count(k) == 0) {
        return k;
      }
    }
  }

  void Complete(FakeQp* qp, const Work& w, ibv_wc_status status, uint32_t byte_len) {
    FakeCq::Entry e = {};
    e.wc.wr_id = w.wr_id;
    e.wc.status = status;
    switch (w.opcode) {
      case IBV_WR_RDMA_WRITE: e.wc.opcode = IBV_WC_RDMA_WRITE; break;
      case IBV_WR_RDMA_READ: e.wc.opcode = IBV_WC_RDMA_READ; break;
      case IBV_WR_BIND_MW: e.wc.opcode = IBV_WC_BIND_MW; break;
      case IBV_WR_LOCAL_INV: e.wc.opcode = IBV_WC_LOCAL_INV; break;
      default: e.wc.opcode = IBV_WC_SEND; break;
    }
    e.wc.byte_len = byte_len;
    e.wc.qp_num = qp->qp.qp_num;
    e.qp = qp;
    e.seq = w.seq;
    qp->send_cq->entries.push_back(e);
    ++stats.completions;
  }

  // Moves `qp` to error and flushes what it still holds.
  void ErrorQp(FakeQp* qp) {
    qp->error = true;
    qp->qp.state = IBV_QPS_ERR;
    while (!qp->sq.empty()) {
      Complete(qp, qp->sq.front(), IBV_WC_WR_FLUSH_ERR, 0);
      qp->sq.pop_front();
    }
  }

  // Local scatter-gather check: every entry inside a region of the QP's PD, with local write when
  // the device writes into it.
  bool LocalOk(FakeQp* qp, const Work& w, bool device_writes) {
    for (const ibv_sge& s : w.sge) {
      if (s.length == 0) continue;
      auto it = lkeys.find(s.lkey);
      if (it == lkeys.end()) return false;
      FakeMr* mr = it->second;
      const uintptr_t a = reinterpret_cast<uintptr_t>(mr->mr.addr);
      if (mr->mr.pd != qp->qp.pd || s.addr < a || s.addr + s.length > a + mr->mr.length) {
        return false;
      }
      if (device_writes && (mr->access & IBV_ACCESS_LOCAL_WRITE) == 0) return false;
    }
    return true;
  }

  // The target's check of an incoming access. Returns the target bytes, or null.
  uint8_t* RemoteOk(FakeQp* target, uint32_t rkey, uint64_t addr, size_t len, int right) {
    uintptr_t base = 0;
    size_t length = 0;
    int access = 0;
    if (auto it = mr_rkeys.find(rkey); it != mr_rkeys.end()) {
      FakeMr* mr = it->second;
      if (mr->mr.pd != target->qp.pd) return nullptr;
      base = reinterpret_cast<uintptr_t>(mr->mr.addr);
      length = mr->mr.length;
      access = mr->access;
    } else if (auto wt = mw_rkeys.find(rkey); wt != mw_rkeys.end()) {
      FakeMw* mw = wt->second;
      // A type 2 window answers only on the QP it was bound on.
      if (!mw->bound || mw->qp != target || mw->mw.pd != target->qp.pd) return nullptr;
      base = mw->addr;
      length = mw->length;
      access = mw->access;
    } else {
      return nullptr;
    }
    if (addr < base || addr + len < addr || addr + len > base + length) return nullptr;
    if ((access & right) == 0) return nullptr;
    return reinterpret_cast<uint8_t*>(addr);
  }

  // Executes one work request. Returns its completion status.
  ibv_wc_status Execute(FakeQp* qp, const Work& w, uint32_t* byte_len) {
    *byte_len = 0;
    if (w.opcode == IBV_WR_BIND_MW) {
      auto* mw = reinterpret_cast<FakeMw*>(w.mw);
      const ibv_mw_bind_info& b = w.bind;
      auto* mr = reinterpret_cast<FakeMr*>(b.mr);
      if (mw == nullptr || mr == nullptr || mw->mw.type != IBV_MW_TYPE_2 || mw->bound ||
          mw->mw.pd != qp->qp.pd || mr->mr.pd != qp->qp.pd ||
          (mr->access & IBV_ACCESS_MW_BIND) == 0 ||
          ((b.mw_access_flags & IBV_ACCESS_REMOTE_WRITE) != 0 &&
           (mr->access & IBV_ACCESS_LOCAL_WRITE) == 0) ||
          (w.rkey & 0xffffff00u) != (mw->mw.rkey & 0xffffff00u) || mw_rkeys.count(w.rkey) != 0) {
        return IBV_WC_MW_BIND_ERR;
      }
      const uintptr_t a = reinterpret_cast<uintptr_t>(mr->mr.addr);
      if (b.length == 0 || b.addr < a || b.addr + b.length > a + mr->mr.length) {
        return IBV_WC_MW_BIND_ERR;
      }
      mw->bound = true;
      mw->rkey = w.rkey;
      mw->addr = b.addr;
      mw->length = b.length;
      mw->access = static_cast<int>(b.mw_access_flags);
      mw->qp = qp;
      mw->mr = mr;
      ++mr->bound_windows;
      mw_rkeys[w.rkey] = mw;
      ++stats.binds;
      return IBV_WC_SUCCESS;
    }
    if (w.opcode == IBV_WR_LOCAL_INV) {
      auto it = mw_rkeys.find(w.invalidate_rkey);
      if (it == mw_rkeys.end() || it->second->mw.pd != qp->qp.pd) return IBV_WC_MW_BIND_ERR;
      Unbind(it->second);
      ++stats.invalidations;
      return IBV_WC_SUCCESS;
    }
    const bool write = w.opcode == IBV_WR_RDMA_WRITE;
    if (!w.is_inline && !LocalOk(qp, w, !write)) return IBV_WC_LOC_PROT_ERR;
    if (fail_work != IBV_WC_SUCCESS) {
      ibv_wc_status s = fail_work;
      fail_work = IBV_WC_SUCCESS;
      return s;
    }
    FakeQp* target = qp->peer;
    if (target == nullptr || target->vanished || target->error) return IBV_WC_RETRY_EXC_ERR;
    size_t total = w.is_inline ? w.inline_data.size() : 0;
    if (!w.is_inline) {
      for (const ibv_sge& s : w.sge) total += s.length;
    }
    if (total == 0) return IBV_WC_SUCCESS;  // zero length: no key is checked
    uint8_t* remote =
        RemoteOk(target, w.rkey, w.remote_addr, total,
                 write ? IBV_ACCESS_REMOTE_WRITE : IBV_ACCESS_REMOTE_READ);
    if (remote == nullptr) return IBV_WC_REM_ACCESS_ERR;
    if (w.is_inline) {
      memcpy(remote, w.inline_data.data(), total);
    } else {
      for (const ibv_sge& s : w.sge) {
        auto* local = reinterpret_cast<uint8_t*>(s.addr);
        if (write) {
          memcpy(remote, local, s.length);
        } else {
          memcpy(local, remote, s.length);
        }
        remote += s.length;
      }
    }
    *byte_len = write ? 0 : static_cast<uint32_t>(total);
    return IBV_WC_SUCCESS;
  }

  void Unbind(FakeMw* mw) {
    if (!mw->bound) return;
    mw_rkeys.erase(mw->rkey);
    --mw->mr->bound_windows;
    mw->bound = false;
    mw->qp = nullptr;
    mw->mr = nullptr;
  }

  // Runs the work requests of every QP that completes on `cq`.
  void Run(FakeCq* cq) {
    if (paused) return;
    for (auto& [num, qp] : qps) {
      if (qp->send_cq != cq) continue;
      while (!qp->sq.empty() && !qp->error) {
        Work w = std::move(qp->sq.front());
        qp->sq.pop_front();
        uint32_t len = 0;
        ibv_wc_status s = Execute(qp, w, &len);
        if (s != IBV_WC_SUCCESS) {
          Complete(qp, w, s, 0);
          ErrorQp(qp);
          break;
        }
        if (w.signalled) Complete(qp, w, s, len);
      }
    }
  }

  void Queue(FakeChannel* ch, FakeId* id, FakeId* listen_id, rdma_cm_event_type type,
             int status, const void* data, size_t len) {
    auto* e = new FakeEvent();
    memset(&e->ev, 0, sizeof e->ev);
    e->ev.id = &id->id;
    e->ev.listen_id = listen_id != nullptr ? &listen_id->id : nullptr;
    e->ev.event = type;
    e->ev.status = status;
    if (data != nullptr && len > 0) {
      e->data.assign(static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + len);
      e->ev.param.conn.private_data = e->data.data();
      e->ev.param.conn.private_data_len = static_cast<uint8_t>(len);
    }
    ch->events.push_back(e);
    uint64_t one = 1;
    [[maybe_unused]] ssize_t w = write(ch->ch.fd, &one, sizeof one);
  }

  // The side `id` goes away from its connection: the peer is told (when `tell`), QPs go to error.
  void Sever(FakeId* id, bool tell) {
    FakeId* peer = id->peer;
    if (id->qp != nullptr && !id->qp->error) ErrorQp(id->qp);
    if (peer == nullptr) return;
    id->peer = nullptr;
    peer->peer = nullptr;
    if (tell) Queue(peer->channel, peer, nullptr, RDMA_CM_EVENT_DISCONNECTED, 0, nullptr, 0);
  }
};

Device& Dev() {
  static Device* d = new Device();
  return *d;
}

FakeContext* ContextOf(ibv_context* c) { return reinterpret_cast<FakeContext*>(c); }

// ---- table entries ----

ibv_context** GetDevices(int* num) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  if (num != nullptr) *num = d.config.devices;
  if (d.config.devices == 0) {
    errno = ENODEV;
    return nullptr;
  }
  auto** list = new ibv_context*[d.config.devices + 1];
  for (int i = 0; i < d.config.devices; ++i) list[i] = &d.contexts[i]->ctx;
  list[d.config.devices] = nullptr;
  return list;
}

void FreeDevices(ibv_context** list) { delete[] list; }

const char* GetDeviceName(ibv_device* dev) { return dev->name; }

int QueryDevice(ibv_context* ctx, ibv_device_attr* attr) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  memset(attr, 0, sizeof *attr);
  attr->max_qp_wr = d.config.max_qp_wr;
  attr->max_qp_rd_atom = 16;
  attr->max_qp_init_rd_atom = 16;
  attr->max_sge = d.config.max_sge;
  attr->max_cqe = 65536;
  attr->max_mr_size = ~uint64_t{0};
  attr->phys_port_cnt = 1;
  if (d.config.memory_windows) {
    attr->device_cap_flags = IBV_DEVICE_MEM_WINDOW | IBV_DEVICE_MEM_WINDOW_TYPE_2B;
  }
  return 0;
}

int QueryPort(ibv_context* ctx, uint8_t port, ibv_port_attr* attr) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  if (port != 1) return EINVAL;
  memset(attr, 0, sizeof *attr);
  const bool up = (d.config.active_ports >> ContextOf(ctx)->index) & 1;
  attr->state = up ? IBV_PORT_ACTIVE : IBV_PORT_DOWN;
  attr->active_mtu = IBV_MTU_4096;
  attr->max_msg_sz = 1u << 31;
  return 0;
}

ibv_pd* AllocPd(ibv_context* ctx) {
  auto* pd = new FakePd();
  memset(&pd->pd, 0, sizeof pd->pd);
  pd->pd.context = ctx;
  return &pd->pd;
}

int DeallocPd(ibv_pd* p) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  auto* pd = reinterpret_cast<FakePd*>(p);
  if (pd->objects != 0) return EBUSY;
  delete pd;
  return 0;
}

ibv_mr* RegMr(ibv_pd* pd, void* addr, size_t length, int access) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  if (d.fail_reg_mr != 0) {
    errno = d.fail_reg_mr;
    d.fail_reg_mr = 0;
    return nullptr;
  }
  const int kNeedsLocalWrite = IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_ATOMIC;
  if (addr == nullptr || length == 0 ||
      ((access & kNeedsLocalWrite) != 0 && (access & IBV_ACCESS_LOCAL_WRITE) == 0)) {
    errno = EINVAL;
    return nullptr;
  }
  auto* mr = new FakeMr();
  memset(&mr->mr, 0, sizeof mr->mr);
  mr->mr.context = pd->context;
  mr->mr.pd = pd;
  mr->mr.addr = addr;
  mr->mr.length = length;
  mr->mr.lkey = d.NewKey();
  d.lkeys[mr->mr.lkey] = mr;
  mr->mr.rkey = d.NewKey();
  d.mr_rkeys[mr->mr.rkey] = mr;
  mr->access = access;
  ++reinterpret_cast<FakePd*>(pd)->objects;
  ++d.stats.registered_mrs;
  return &mr->mr;
}

int DeregMr(ibv_mr* m) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  auto* mr = reinterpret_cast<FakeMr*>(m);
  if (mr->bound_windows != 0) return EBUSY;
  d.lkeys.erase(mr->mr.lkey);
  d.mr_rkeys.erase(mr->mr.rkey);
  --reinterpret_cast<FakePd*>(mr->mr.pd)->objects;
  --d.stats.registered_mrs;
  delete mr;
  return 0;
}

ibv_mw* AllocMw(ibv_pd* pd, ibv_mw_type type) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  if (!d.config.memory_windows || type != IBV_MW_TYPE_2) {
    errno = EOPNOTSUPP;
    return nullptr;
  }
  auto* mw = new FakeMw();
  memset(&mw->mw, 0, sizeof mw->mw);
  mw->mw.context = pd->context;
  mw->mw.pd = pd;
  mw->mw.type = type;
  uint32_t index;
  do {
    index = Device::Random32() & 0xffffff00u;
  } while (index == 0 || d.mw_indexes.count(index) != 0);
  d.mw_indexes[index] = true;
  mw->mw.rkey = index | (Device::Random32() & 0xffu);
  ++reinterpret_cast<FakePd*>(pd)->objects;
  ++d.stats.allocated_mws;
  return &mw->mw;
}

int DeallocMw(ibv_mw* m) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  auto* mw = reinterpret_cast<FakeMw*>(m);
  d.Unbind(mw);  // deallocating a bound window invalidates it
  d.mw_indexes.erase(mw->mw.rkey & 0xffffff00u);
  --reinterpret_cast<FakePd*>(mw->mw.pd)->objects;
  --d.stats.allocated_mws;
  delete mw;
  return 0;
}

ibv_cq* CreateCq(ibv_context* ctx, int cqe, void* cq_context, ibv_comp_channel* channel, int) {
  if (channel != nullptr || cqe <= 0) {  // completion channels are not faked
    errno = EINVAL;
    return nullptr;
  }
  auto* cq = new FakeCq();
  memset(&cq->cq, 0, sizeof cq->cq);
  cq->cq.context = ctx;
  cq->cq.cq_context = cq_context;
  cq->cq.cqe = cqe;
  return &cq->cq;
}

int DestroyCq(ibv_cq* c) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  auto* cq = reinterpret_cast<FakeCq*>(c);
  if (cq->qps != 0) return EBUSY;
  delete cq;
  return 0;
}

int PollCq(ibv_cq* c, int n, ibv_wc* wc) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  auto* cq = reinterpret_cast<FakeCq*>(c);
  d.Run(cq);
  int got = 0;
  while (got < n && !cq->entries.empty()) {
    FakeCq::Entry& e = cq->entries.front();
    wc[got++] = e.wc;
    if (e.seq > e.qp->retired) e.qp->retired = e.seq;
    cq->entries.pop_front();
  }
  return got;
}

int PostSend(ibv_qp* q, ibv_send_wr* wr, ibv_send_wr** bad) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  auto* qp = reinterpret_cast<FakeQp*>(q);
  for (; wr != nullptr; wr = wr->next) {
    *bad = wr;
    if (qp->qp.state != IBV_QPS_RTS && !qp->error) return EINVAL;
    if (wr->opcode != IBV_WR_RDMA_WRITE && wr->opcode != IBV_WR_RDMA_READ &&
        wr->opcode != IBV_WR_BIND_MW && wr->opcode != IBV_WR_LOCAL_INV) {
      return EINVAL;
    }
    if (wr->num_sge < 0 || static_cast<uint32_t>(wr->num_sge) > qp->cap.max_send_sge) {
      return EINVAL;
    }
    const uint64_t outstanding = qp->next_seq - 1 - qp->retired;
    if (outstanding >= qp->cap.max_send_wr) return ENOMEM;
    Work w;
    w.seq = qp->next_seq;
    w.wr_id = wr->wr_id;
    w.opcode = wr->opcode;
    w.signalled = qp->sig_all || (wr->send_flags & IBV_SEND_SIGNALED) != 0;
    if (wr->opcode == IBV_WR_RDMA_WRITE || wr->opcode == IBV_WR_RDMA_READ) {
      w.remote_addr = wr->wr.rdma.remote_addr;
      w.rkey = wr->wr.rdma.rkey;
      w.sge.assign(wr->sg_list, wr->sg_list + wr->num_sge);
      if ((wr->send_flags & IBV_SEND_INLINE) != 0) {
        size_t total = 0;
        for (const ibv_sge& s : w.sge) total += s.length;
        if (wr->opcode != IBV_WR_RDMA_WRITE || total > qp->cap.max_inline_data) return EINVAL;
        // Inline: the data is copied now; the buffer and its key are not looked at again.
        w.is_inline = true;
        for (const ibv_sge& s : w.sge) {
          const auto* p = reinterpret_cast<const uint8_t*>(s.addr);
          w.inline_data.insert(w.inline_data.end(), p, p + s.length);
        }
        w.sge.clear();
        ++d.stats.inlined;
      }
    } else if (wr->opcode == IBV_WR_BIND_MW) {
      w.mw = wr->bind_mw.mw;
      w.rkey = wr->bind_mw.rkey;
      w.bind = wr->bind_mw.bind_info;
    } else {
      w.invalidate_rkey = wr->invalidate_rkey;
    }
    ++qp->next_seq;
    ++d.stats.posted;
    if (w.signalled) ++d.stats.signalled;
    if (qp->error) {
      d.Complete(qp, w, IBV_WC_WR_FLUSH_ERR, 0);
    } else {
      qp->sq.push_back(std::move(w));
    }
  }
  *bad = nullptr;
  return 0;
}

rdma_event_channel* CreateEventChannel() {
  int fd = eventfd(0, EFD_CLOEXEC | EFD_SEMAPHORE);
  if (fd < 0) return nullptr;
  auto* ch = new FakeChannel();
  ch->ch.fd = fd;
  return &ch->ch;
}

void DestroyEventChannel(rdma_event_channel* c) {
  auto* ch = reinterpret_cast<FakeChannel*>(c);
  {
    Device& d = Dev();
    std::lock_guard<std::mutex> l(d.mu);
    for (FakeEvent* e : ch->events) delete e;
  }
  close(ch->ch.fd);
  delete ch;
}

int CreateId(rdma_event_channel* c, rdma_cm_id** out, void* context, rdma_port_space ps) {
  auto* id = new FakeId();
  memset(&id->id, 0, sizeof id->id);
  id->id.channel = c;
  id->id.context = context;
  id->id.ps = ps;
  id->channel = reinterpret_cast<FakeChannel*>(c);
  *out = &id->id;
  return 0;
}

void DropEventsOf(FakeChannel* ch, FakeId* id) {
  for (auto it = ch->events.begin(); it != ch->events.end();) {
    if ((*it)->ev.id == &id->id) {
      delete *it;
      it = ch->events.erase(it);
      uint64_t v;
      [[maybe_unused]] ssize_t r = read(ch->ch.fd, &v, sizeof v);  // semaphore: one per event
    } else {
      ++it;
    }
  }
}

int DestroyId(rdma_cm_id* i) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  auto* id = reinterpret_cast<FakeId*>(i);
  if (id->qp != nullptr) {
    errno = EBUSY;  // destroy the QP first
    return -1;
  }
  // A connected id that goes away without disconnecting: the kernel sends the peer a DREQ.
  d.Sever(id, /*tell=*/true);
  if (id->listening) d.listeners.erase(id->port);
  DropEventsOf(id->channel, id);
  delete id;
  return 0;
}

int MigrateId(rdma_cm_id* i, rdma_event_channel* c) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  auto* id = reinterpret_cast<FakeId*>(i);
  auto* to = reinterpret_cast<FakeChannel*>(c);
  for (auto it = id->channel->events.begin(); it != id->channel->events.end();) {
    if ((*it)->ev.id == &id->id) {
      errno = EBUSY;  // rdmacm waits for them to be acked; the backend acks first
      return -1;
    }
    ++it;
  }
  id->channel = to;
  id->id.channel = c;
  return 0;
}

int BindAddr(rdma_cm_id* i, sockaddr* addr) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  auto* id = reinterpret_cast<FakeId*>(i);
  if (addr->sa_family != AF_INET) {
    errno = EAFNOSUPPORT;
    return -1;
  }
  sockaddr_in sin;
  memcpy(&sin, addr, sizeof sin);
  uint16_t port = ntohs(sin.sin_port);
  if (port == 0) {
    // An ephemeral port, as the kernel picks one: the next free one in [kFirstEphemeral, 65535],
    // wrapping around (ports of closed listeners are reused); EADDRINUSE when all are taken.
    constexpr uint32_t kFirstEphemeral = 20000;
    constexpr uint32_t kCount = 65536 - kFirstEphemeral;
    auto advance = [&d] {
      d.next_port = static_cast<uint16_t>(d.next_port == 65535 ? kFirstEphemeral : d.next_port + 1);
    };
    uint32_t tried = 0;
    while (tried < kCount && d.listeners.count(d.next_port) != 0) {
      advance();
      ++tried;
    }
    if (tried == kCount) {
      errno = EADDRINUSE;
      return -1;
    }
    port = d.next_port;
    advance();
  } else if (d.listeners.count(port) != 0) {
    errno = EADDRINUSE;
    return -1;
  }
  id->port = port;
  sin.sin_port = htons(port);
  memcpy(&id->id.route.addr.src_addr, &sin, sizeof sin);
  return 0;
}

// The first device with an active port: where every address resolves in the fake.
ibv_context* RouteDevice(Device& d) {
  for (int i = 0; i < d.config.devices; ++i) {
    if ((d.config.active_ports >> i) & 1) return &d.contexts[i]->ctx;
  }
  return nullptr;
}

int ResolveAddr(rdma_cm_id* i, sockaddr*, sockaddr* dst, int) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  auto* id = reinterpret_cast<FakeId*>(i);
  if (dst == nullptr || dst->sa_family != AF_INET) {
    errno = EAFNOSUPPORT;
    return -1;
  }
  sockaddr_in sin;
  memcpy(&sin, dst, sizeof sin);
  id->dst_port = ntohs(sin.sin_port);
  memcpy(&id->id.route.addr.dst_addr, &sin, sizeof sin);
  id->id.verbs = RouteDevice(d);
  id->id.port_num = 1;
  d.Queue(id->channel, id, nullptr,
          id->id.verbs != nullptr ? RDMA_CM_EVENT_ADDR_RESOLVED : RDMA_CM_EVENT_ADDR_ERROR,
          id->id.verbs != nullptr ? 0 : -ENODEV, nullptr, 0);
  return 0;
}

int ResolveRoute(rdma_cm_id* i, int) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  auto* id = reinterpret_cast<FakeId*>(i);
  if (id->id.verbs == nullptr) {
    errno = EINVAL;
    return -1;
  }
  d.Queue(id->channel, id, nullptr, RDMA_CM_EVENT_ROUTE_RESOLVED, 0, nullptr, 0);
  return 0;
}

int Listen(rdma_cm_id* i, int) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  auto* id = reinterpret_cast<FakeId*>(i);
  if (id->port == 0 || d.listeners.count(id->port) != 0) {
    errno = EINVAL;
    return -1;
  }
  id->listening = true;
  d.listeners[id->port] = id;
  return 0;
}

int CreateQp(rdma_cm_id* i, ibv_pd* pd, ibv_qp_init_attr* attr) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  auto* id = reinterpret_cast<FakeId*>(i);
  if (id->id.verbs == nullptr || pd->context != id->id.verbs || attr->qp_type != IBV_QPT_RC ||
      attr->send_cq == nullptr || id->qp != nullptr ||
      attr->cap.max_send_wr > static_cast<uint32_t>(d.config.max_qp_wr) ||
      attr->cap.max_send_sge > static_cast<uint32_t>(d.config.max_sge)) {
    errno = EINVAL;
    return -1;
  }
  auto* qp = new FakeQp();
  memset(&qp->qp, 0, sizeof qp->qp);
  qp->qp.context = pd->context;
  qp->qp.pd = pd;
  qp->qp.send_cq = attr->send_cq;
  qp->qp.recv_cq = attr->recv_cq;
  qp->qp.qp_type = IBV_QPT_RC;
  qp->qp.qp_num = d.next_qp_num++;
  qp->qp.state = IBV_QPS_INIT;
  qp->send_cq = reinterpret_cast<FakeCq*>(attr->send_cq);
  attr->cap.max_inline_data = std::min(attr->cap.max_inline_data, d.config.max_inline);
  qp->cap = attr->cap;
  qp->sig_all = attr->sq_sig_all != 0;
  qp->active = id->active;
  ++qp->send_cq->qps;
  ++reinterpret_cast<FakePd*>(pd)->objects;
  d.qps[qp->qp.qp_num] = qp;
  id->qp = qp;
  id->id.qp = &qp->qp;
  id->id.pd = pd;
  return 0;
}

void DestroyQp(rdma_cm_id* i) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  auto* id = reinterpret_cast<FakeId*>(i);
  FakeQp* qp = id->qp;
  if (qp == nullptr) return;
  // Completions still queued for it are dropped with it.
  auto& es = qp->send_cq->entries;
  for (auto it = es.begin(); it != es.end();) it = it->qp == qp ? es.erase(it) : it + 1;
  for (auto& [k, mw] : d.mw_rkeys) {
    if (mw->qp == qp) mw->qp = nullptr;  // still bound, unreachable
  }
  if (qp->peer != nullptr) qp->peer->peer = nullptr;
  --qp->send_cq->qps;
  --reinterpret_cast<FakePd*>(qp->qp.pd)->objects;
  d.qps.erase(qp->qp.qp_num);
  delete qp;
  id->qp = nullptr;
  id->id.qp = nullptr;
}

int Connect(rdma_cm_id* i, rdma_conn_param* param) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  auto* id = reinterpret_cast<FakeId*>(i);
  if (id->id.verbs == nullptr || id->qp == nullptr) {
    errno = EINVAL;
    return -1;
  }
  id->active = true;
  id->qp->active = true;
  auto it = d.listeners.find(id->dst_port);
  if (it == d.listeners.end()) {
    // Nobody listens: the peer's CM rejects (as for an unknown service id).
    d.Queue(id->channel, id, nullptr, RDMA_CM_EVENT_REJECTED, 8, nullptr, 0);
    return 0;
  }
  FakeId* listener = it->second;
  auto* req = new FakeId();
  memset(&req->id, 0, sizeof req->id);
  req->channel = listener->channel;
  req->id.channel = &listener->channel->ch;
  req->id.context = listener->id.context;
  req->id.verbs = id->id.verbs;
  req->id.port_num = 1;
  req->id.ps = listener->id.ps;
  req->peer = id;
  id->peer = req;
  d.Queue(listener->channel, req, listener, RDMA_CM_EVENT_CONNECT_REQUEST, 0,
          param != nullptr ? param->private_data : nullptr,
          param != nullptr ? param->private_data_len : 0);
  return 0;
}

int Accept(rdma_cm_id* i, rdma_conn_param* param) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  auto* id = reinterpret_cast<FakeId*>(i);
  FakeId* peer = id->peer;
  if (id->qp == nullptr) {
    errno = EINVAL;
    return -1;
  }
  if (peer == nullptr || peer->qp == nullptr) {
    errno = ECONNRESET;  // the connecting side went away meanwhile
    return -1;
  }
  id->qp->peer = peer->qp;
  peer->qp->peer = id->qp;
  id->qp->qp.state = IBV_QPS_RTS;
  peer->qp->qp.state = IBV_QPS_RTS;
  d.Queue(peer->channel, peer, nullptr, RDMA_CM_EVENT_ESTABLISHED, 0,
          param != nullptr ? param->private_data : nullptr,
          param != nullptr ? param->private_data_len : 0);
  d.Queue(id->channel, id, nullptr, RDMA_CM_EVENT_ESTABLISHED, 0, nullptr, 0);
  return 0;
}

int Reject(rdma_cm_id* i, const void* data, uint8_t len) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  auto* id = reinterpret_cast<FakeId*>(i);
  FakeId* peer = id->peer;
  id->peer = nullptr;
  if (peer != nullptr) {
    peer->peer = nullptr;
    // IB_CM_REJ_CONSUMER_DEFINED: the status rdmacm reports for an rdma_reject.
    d.Queue(peer->channel, peer, nullptr, RDMA_CM_EVENT_REJECTED, 28, data, len);
  }
  return 0;
}

int Disconnect(rdma_cm_id* i) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  auto* id = reinterpret_cast<FakeId*>(i);
  const bool connected = id->peer != nullptr;
  d.Sever(id, /*tell=*/true);
  if (connected) Dev().Queue(id->channel, id, nullptr, RDMA_CM_EVENT_DISCONNECTED, 0, nullptr, 0);
  return 0;
}

int GetCmEvent(rdma_event_channel* c, rdma_cm_event** out) {
  auto* ch = reinterpret_cast<FakeChannel*>(c);
  // The eventfd counts queued events; a blocking read waits for one, as rdmacm's read does.
  uint64_t v;
  if (read(ch->ch.fd, &v, sizeof v) != sizeof v) return -1;  // errno: EAGAIN when non-blocking
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  if (ch->events.empty()) {
    errno = EAGAIN;
    return -1;
  }
  FakeEvent* e = ch->events.front();
  ch->events.pop_front();
  *out = &e->ev;
  return 0;
}

int AckCmEvent(rdma_cm_event* e) {
  delete reinterpret_cast<FakeEvent*>(e);
  return 0;
}

}  // namespace

FakeDevice& FakeDevice::Get() {
  static FakeDevice device;
  return device;
}

const VerbsApi* FakeDevice::Api() {
  static const VerbsApi api = {
      "fake",
      GetDevices,
      FreeDevices,
      GetDeviceName,
      QueryDevice,
      QueryPort,
      AllocPd,
      DeallocPd,
      RegMr,
      DeregMr,
      AllocMw,
      DeallocMw,
      CreateCq,
      DestroyCq,
      PollCq,
      PostSend,
      CreateEventChannel,
      DestroyEventChannel,
      CreateId,
      DestroyId,
      MigrateId,
      BindAddr,
      ResolveAddr,
      ResolveRoute,
      Listen,
      CreateQp,
      DestroyQp,
      Connect,
      Accept,
      Reject,
      Disconnect,
      GetCmEvent,
      AckCmEvent,
  };
  return &api;
}

void FakeDevice::Reset(FakeConfig config) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  d.Configure(config);
  d.fail_reg_mr = 0;
  d.fail_work = IBV_WC_SUCCESS;
  d.paused = false;
  const FakeStats live = d.stats;  // what exists now survives a reset
  d.stats = FakeStats();
  d.stats.registered_mrs = live.registered_mrs;
  d.stats.allocated_mws = live.allocated_mws;
}

void FakeDevice::FailNextRegMr(int err) {
  std::lock_guard<std::mutex> l(Dev().mu);
  Dev().fail_reg_mr = err;
}

void FakeDevice::FailNextWork(ibv_wc_status status) {
  std::lock_guard<std::mutex> l(Dev().mu);
  Dev().fail_work = status;
}

void FakeDevice::SetPaused(bool paused) {
  std::lock_guard<std::mutex> l(Dev().mu);
  Dev().paused = paused;
}

void FakeDevice::ForceQpError(uint32_t qp_num) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  auto it = d.qps.find(qp_num);
  if (it != d.qps.end()) d.ErrorQp(it->second);
}

void FakeDevice::Vanish(uint32_t qp_num) {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  auto it = d.qps.find(qp_num);
  if (it != d.qps.end()) it->second->vanished = true;
}

std::vector<uint32_t> FakeDevice::ConnectedQps(bool active) const {
  Device& d = Dev();
  std::lock_guard<std::mutex> l(d.mu);
  std::vector<uint32_t> out;
  for (const auto& [num, qp] : d.qps) {
    if (qp->active == active && qp->peer != nullptr) out.push_back(num);
  }
  return out;
}

FakeStats FakeDevice::stats() const {
  std::lock_guard<std::mutex> l(Dev().mu);
  return Dev().stats;
}

}  // namespace sanreg::internal
