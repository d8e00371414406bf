// datapath_benchmark.cc: sanreg Write/Read against a minimal raw fi_write/fi_read loop on the same
// provider, sizes and depth, in one run; prints sanreg / raw throughput ratios at the end, as
// markdown tables (also written to --ratios_md=FILE when given).
//
// Each benchmark is NAME/provider/op/size/depth: `depth` operations of `size` bytes are posted,
// then all are waited for (one iteration). Sizes 64 B to 16 MiB, depth 1 (latency) and 32.
//   raw          two endpoints of the type sanreg uses (shm: RDM; tcp: the native provider's
//                connected MSG endpoints), each in its own fabric and domain (as sanreg's pair
//                is); the caller's thread posts and reaps its own completion queue, a second
//                thread progresses the target (polls its queue without pause), as a target in
//                another process must be. The baseline of the ratios.
//   raw1thread   the same, but the caller's thread also drives the target's queue: not a
//                deployable topology (the target is in the caller's thread), kept for reference.
//   sanreg       two Fabrics connected over loopback, each with its progress thread; the caller
//                posts and blocks in Completion::Wait.
//   sanreg-poll  the same, but the caller drives its endpoint with Endpoint::Poll while it waits.
//   alternated   raw, sanreg and sanreg-poll set up side by side in one benchmark, taking turns of
//                a few tens of milliseconds (see BM_Alternated): every mode meets the same spells
//                of the guest's speed. Its table comes second; perf_report.sh checks the 0.9
//                target on it too, with --alternated_repetitions=15.
// Raw writes ask for delivery completion too, as sanreg's do (see endpoint.h).
//
// Run: bazel run -c opt //datapath:datapath_benchmark -- --benchmark_min_time=0.05
// For ratios to compare (tools/perf_report.sh does this): --benchmark_repetitions=5
// --alternated_repetitions=15 --benchmark_enable_random_interleaving=true
// --benchmark_report_aggregates_only=true. Each
// repetition opens new connections, and this guest changes speed for minutes at a time, so
// repetitions run back to back can put one mode's runs in a slow spell and the next mode's in a
// fast one; interleaved, every mode's median draws from the same spells and connections. The
// tables keep the order in which the benchmarks are registered: the separate modes' medians, the
// alternated modes' and, with repetitions, each separate mode's best repetition (see kBest).

#include <benchmark/benchmark.h>
#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "datapath/endpoint.h"
#include "datapath/fabric.h"
#include "datapath/internal/test_util.h"
#include "regcache/bench_cpu.h"
#include "regcache/pin_registrar.h"

namespace sanreg {
namespace {

constexpr size_t kMaxSize = size_t{16} << 20;
constexpr int64_t kSizes[] = {64, 4096, 65536, 1 << 20, 16 << 20};
constexpr int64_t kDepths[] = {1, 32};

// A statistic over the repetitions (with --benchmark_repetitions > 1), beside the median: Google
// Benchmark applies it to every figure of a run, so its real time is the slowest repetition's and
// its bytes/s, the figure the tables read, the fastest's. Why the best repetition as well as the
// median: this guest runs at two speeds for minutes at a time (raw 4 KiB shm operations at about
// 0.8 us in one, 2.5 us in the other), and with 5 repetitions interleaved at random a row's median
// can come from the fast speed for one mode and from the slow one for the other (a 4 KiB shm read
// at 0.30 of raw in one run, docs/PERFORMANCE.md item 4). Each mode's best repetition is its speed
// in the machine's fast spell whenever any of its repetitions fell in one.
constexpr char kBest[] = "max";
double Max(const std::vector<double>& v) {
  return v.empty() ? 0 : *std::max_element(v.begin(), v.end());
}
// --pin: the caller's thread (and the initiator fabric's progress thread) on the first CPU this
// process may use, the target's progress thread (raw: the thread that polls the target's queue) on
// the second, in every mode. Where the CPUs differ (this project's 2-vCPU guest: see
// docs/PERFORMANCE.md), unpinned modes can land their threads differently and run at different
// speeds. Off by default.
bool g_pin = false;
int g_cpus[2] = {-1, -1};  // the first two CPUs of the process, with --pin

// The CPU of role `i` (0: the caller's side, 1: the target's), or -1 (no pinning) without --pin.
int PinCpu(int i) { return g_pin ? g_cpus[i] : -1; }

// kWarmUp: every benchmark runs one untimed iteration first. The first operations on a fresh
// connection pay one-time costs (on shm, the first 16 MiB read of a new sanreg pair takes about
// 65 ms, the next ones under 2 ms), and at 16 MiB a short --benchmark_min_time measures a single
// iteration.

// One side of the raw loop: its own fabric, domain, endpoint, queue and buffer, as a peer in
// another process has (two sides never share a domain, its locks or its progress). The endpoint
// type is the one sanreg runs on that provider: shm FI_EP_RDM with an address vector, tcp the
// native provider's connected FI_EP_MSG endpoints (see fabric.h), with an event queue.
struct RawSide {
  fi_info* info = nullptr;
  fid_fabric* fabric = nullptr;
  fid_domain* domain = nullptr;
  fid_ep* ep = nullptr;
  fid_pep* pep = nullptr;  // tcp target: the passive endpoint, until the connection is up
  fid_eq* eq = nullptr;    // tcp
  fid_cq* cq = nullptr;
  fid_av* av = nullptr;  // shm
  fid_mr* mr = nullptr;
  // Page-aligned and touched, as sanreg's buffers are (testing::Buffer, pinned): a std::vector of
  // kMaxSize starts 16 bytes into a page (malloc's mmap chunk header), which made each of raw's
  // 64 B operations span two cache lines and each 4 KiB one two pages.
  char* buf = nullptr;
  char name[256] = {};
  size_t name_len = 0;

  // Opens the fabric, domain, queues and registration, and: on shm the endpoint; on tcp the
  // initiator's unconnected endpoint, or the target's listening passive endpoint (`listen`).
  // Returns false when the provider or a call refuses.
  bool Open(const char* prov, uint64_t access, uint64_t key, bool listen) {
    void* p = mmap(nullptr, kMaxSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return false;
    buf = static_cast<char*>(p);
    memset(buf, 0, kMaxSize);
    const bool msg = std::string(prov) == "tcp";
    fi_info* h = fi_allocinfo();
    h->caps = FI_RMA | FI_READ | FI_WRITE | FI_REMOTE_READ | FI_REMOTE_WRITE;
    h->fabric_attr->prov_name = strdup(prov);
    h->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_ALLOCATED;
    h->domain_attr->threading = FI_THREAD_SAFE;
    if (msg) {
      h->ep_attr->type = FI_EP_MSG;
      h->addr_format = FI_SOCKADDR_IN;
      h->domain_attr->data_progress = FI_PROGRESS_MANUAL;
      h->domain_attr->control_progress = FI_PROGRESS_MANUAL;
    } else {
      h->ep_attr->type = FI_EP_RDM;
    }
    int rc = msg ? fi_getinfo(FI_VERSION(1, 17), "127.0.0.1", "0", FI_SOURCE, h, &info)
                 : fi_getinfo(FI_VERSION(1, 17), nullptr, nullptr, 0, h, &info);
    fi_freeinfo(h);
    if (rc) return false;
    fi_cq_attr ca = {};
    ca.format = FI_CQ_FORMAT_CONTEXT;
    ca.size = 256;
    fi_eq_attr ea = {};
    fi_av_attr aa = {};
    aa.type = FI_AV_TABLE;
    name_len = sizeof name;
    if (fi_fabric(info->fabric_attr, &fabric, nullptr) != 0 ||
        fi_domain(fabric, info, &domain, nullptr) != 0 ||
        fi_cq_open(domain, &ca, &cq, nullptr) != 0 ||
        fi_mr_reg(domain, buf, kMaxSize, access, 0, key, 0, &mr, nullptr) != 0) {
      return false;
    }
    if (!msg) {
      return fi_av_open(domain, &aa, &av, nullptr) == 0 &&
             fi_endpoint(domain, info, &ep, nullptr) == 0 && Bind(&av->fid) &&
             fi_getname(&ep->fid, name, &name_len) == 0;
    }
    if (fi_eq_open(fabric, &ea, &eq, nullptr) != 0) return false;
    if (listen) {
      return fi_passive_ep(fabric, info, &pep, nullptr) == 0 &&
             fi_pep_bind(pep, &eq->fid, 0) == 0 && fi_listen(pep) == 0 &&
             fi_getname(&pep->fid, name, &name_len) == 0;
    }
    return fi_endpoint(domain, info, &ep, nullptr) == 0 && Bind(&eq->fid);
  }
  // Binds the completion queue and `queue` (address vector or event queue), and enables.
  bool Bind(fid* queue) {
    return fi_ep_bind(ep, &cq->fid, FI_TRANSMIT | FI_RECV) == 0 && fi_ep_bind(ep, queue, 0) == 0 &&
           fi_enable(ep) == 0;
  }
  // tcp: reads one connection event without blocking. Returns the event, or 0 when none.
  uint32_t CmEvent(fi_eq_cm_entry* entry) {
    uint32_t event = 0;
    ssize_t n = fi_eq_read(eq, &event, entry, sizeof *entry, 0);
    if (n == -FI_EAGAIN) return 0;
    if (n < 0) abort();
    return event;
  }
  ~RawSide() {
    if (mr) fi_close(&mr->fid);
    if (ep) fi_close(&ep->fid);
    if (pep) fi_close(&pep->fid);
    if (av) fi_close(&av->fid);
    if (cq) fi_close(&cq->fid);
    if (eq) fi_close(&eq->fid);
    if (domain) fi_close(&domain->fid);
    if (fabric) fi_close(&fabric->fid);
    if (info) fi_freeinfo(info);
    if (buf) munmap(buf, kMaxSize);
  }
  // Reads up to 16 completions; returns how many (aborts on an error completion).
  int Reap() {
    fi_cq_entry e[16];
    ssize_t n = fi_cq_read(cq, e, 16);
    if (n == -FI_EAVAIL) abort();
    return n > 0 ? static_cast<int>(n) : 0;
  }
};

// The raw loop's two sides: the initiator (0) writes from / reads into its buffer, the target (1)
// exposes its buffer.
struct Raw {
  RawSide side[2];
  fi_addr_t peer = 0;
  bool ok = false;

  explicit Raw(const char* prov) {
    ok = side[0].Open(prov, FI_WRITE | FI_READ, 1, false) &&
         side[1].Open(prov, FI_REMOTE_READ | FI_REMOTE_WRITE, 2, true) &&
         (side[1].pep != nullptr ? Connect() : InsertAddresses());
  }
  bool InsertAddresses() {
    fi_addr_t back;
    return fi_av_insert(side[0].av, side[1].name, 1, &peer, 0, nullptr) == 1 &&
           fi_av_insert(side[1].av, side[0].name, 1, &back, 0, nullptr) == 1;
  }
  // tcp: connects the initiator to the target's passive endpoint, driving both event queues from
  // this thread (manual progress) until both sides report FI_CONNECTED, for up to 10 s.
  bool Connect() {
    if (fi_connect(side[0].ep, side[1].name, nullptr, 0) != 0) return false;
    bool connected[2] = {false, false};
    const absl::Time deadline = absl::Now() + absl::Seconds(10);
    while (!(connected[0] && connected[1])) {
      if (absl::Now() > deadline) return false;
      fi_eq_cm_entry e = {};
      if (side[0].CmEvent(&e) == FI_CONNECTED) connected[0] = true;
      const uint32_t ev = side[1].CmEvent(&e);
      if (ev == FI_CONNREQ) {
        const bool accepted = fi_endpoint(side[1].domain, e.info, &side[1].ep, nullptr) == 0 &&
                              side[1].Bind(&side[1].eq->fid) &&
                              fi_accept(side[1].ep, nullptr, 0) == 0;
        fi_freeinfo(e.info);
        if (!accepted) return false;
      } else if (ev == FI_CONNECTED) {
        connected[1] = true;
      }
    }
    return true;
  }
  uint64_t remote_addr() const {
    return (side[1].info->domain_attr->mr_mode & FI_MR_VIRT_ADDR)
               ? reinterpret_cast<uint64_t>(side[1].buf)
               : 0;
  }
  // Posts one operation. Returns false on -FI_EAGAIN (the caller reaps and retries).
  bool TryPost(bool write, size_t size) {
    void* desc = fi_mr_desc(side[0].mr);
    iovec iov = {side[0].buf, size};
    fi_rma_iov rma = {remote_addr(), size, fi_mr_key(side[1].mr)};
    fi_msg_rma m = {};
    m.msg_iov = &iov;
    m.desc = &desc;
    m.iov_count = 1;
    m.addr = peer;
    m.rma_iov = &rma;
    m.rma_iov_count = 1;
    ssize_t rc = write ? fi_writemsg(side[0].ep, &m, FI_COMPLETION | FI_DELIVERY_COMPLETE)
                       : fi_readmsg(side[0].ep, &m, FI_COMPLETION);
    if (rc == 0) return true;
    if (rc != -FI_EAGAIN) abort();
    return false;
  }
  // Reaps completions (driving the target's queue too); returns how many.
  int Reap() {
    side[1].Reap();
    return side[0].Reap();
  }
  int ReapInitiator() { return side[0].Reap(); }
};

// Posts `depth` operations and waits for all of them, reaping the initiator's queue whenever the
// provider pushes back (shm in libfabric 1.17 answers -FI_EAGAIN until the initiator's own queue
// is read). `drive_target`: reap the target's queue too, on this thread (raw1thread).
void RawIteration(Raw& raw, bool write, size_t size, int depth, bool drive_target) {
  int posted = 0;
  int done = 0;
  while (done < depth) {
    if (posted < depth && raw.TryPost(write, size)) {
      ++posted;
      continue;
    }
    done += drive_target ? raw.Reap() : raw.ReapInitiator();
  }
}

// Both sides driven by the caller's thread (raw1thread): for reference only.
void BM_Raw(benchmark::State& state, const char* prov, bool write) {
  bench::ScopedPin pin(PinCpu(0));
  Raw raw(prov);
  if (!raw.ok) {
    state.SkipWithError("raw setup failed");
    return;
  }
  const size_t size = static_cast<size_t>(state.range(0));
  const int depth = static_cast<int>(state.range(1));
  RawIteration(raw, write, size, depth, true);  // warm-up, untimed (see kWarmUp)
  for (auto _ : state) RawIteration(raw, write, size, depth, true);
  state.SetBytesProcessed(state.iterations() * depth * static_cast<int64_t>(size));
}

// The target progressed by a thread of its own that polls its completion queue without pause, as
// a target in another process must be: the initiator's thread no longer drives the target's side
// of the protocol. Paused (BM_Alternated, while another mode has its turn), it sleeps instead.
class RawTargetThread {
 public:
  explicit RawTargetThread(fid_cq* cq) : cq_(cq), thread_([this] { Loop(); }) {}
  ~RawTargetThread() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
      run_.store(false);
    }
    cv_.notify_all();
    thread_.join();
  }
  void Pause() { run_.store(false); }  // the thread sleeps after its current poll
  void Resume() {
    {
      std::lock_guard<std::mutex> l(mu_);
      run_.store(true);
    }
    cv_.notify_all();
  }

 private:
  void Loop() {
    bench::ScopedPin target_pin(PinCpu(1));
    fi_cq_entry e[16];
    while (true) {
      if (!run_.load(std::memory_order_relaxed)) {
        std::unique_lock<std::mutex> l(mu_);
        cv_.wait(l, [this] { return stop_ || run_.load(); });
        if (stop_) return;
      }
      fi_cq_read(cq_, e, 16);
    }
  }
  fid_cq* const cq_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;            // under mu_
  std::atomic<bool> run_{true};  // set under mu_, read without it
  std::thread thread_;           // last: starts once the rest is initialized
};

// The raw loop sanreg is compared with: the caller posts and reaps, RawTargetThread progresses the
// target.
void BM_RawTwoThreads(benchmark::State& state, const char* prov, bool write) {
  bench::ScopedPin pin(PinCpu(0));
  Raw raw(prov);
  if (!raw.ok) {
    state.SkipWithError("raw setup failed");
    return;
  }
  RawTargetThread target(raw.side[1].cq);
  const size_t size = static_cast<size_t>(state.range(0));
  const int depth = static_cast<int>(state.range(1));
  RawIteration(raw, write, size, depth, false);  // warm-up, untimed (see kWarmUp)
  for (auto _ : state) RawIteration(raw, write, size, depth, false);
  state.SetBytesProcessed(state.iterations() * depth * static_cast<int64_t>(size));
}

// sanreg's side of the comparison: two Fabrics connected over loopback (the caller's thread and
// the initiator's progress thread on the first CPU of --pin, the target's progress thread on the
// second), a registered source and an exposed destination of kMaxSize bytes.
struct SanregRig {
  testing::ConnectedPair pair;
  PinRegistrar pin;
  std::unique_ptr<Registrar> ireg, treg;
  std::unique_ptr<testing::Buffer> src, dst;
  RemoteRegion region;
  std::unique_ptr<Completion[]> cs;

  // Returns an error message, or null when set up.
  const char* Open(const char* prov, int depth) {
    FabricOptions o;
    o.provider = prov;
    o.apply_env = false;
    FabricOptions target = o;
    o.progress_cpu = PinCpu(0);
    target.progress_cpu = PinCpu(1);
    auto p = testing::ConnectedPair::Make(o, target);
    if (!p.ok()) return "sanreg setup failed";
    pair = *std::move(p);
    ireg = pair.initiator_fabric->NewRegistrar(&pin);
    treg = pair.target_fabric->NewRegistrar(&pin);
    auto s = testing::Buffer::Make(ireg.get(), kMaxSize, kAccessLocalRead | kAccessLocalWrite);
    auto d = testing::Buffer::Make(treg.get(), kMaxSize, kAccessAll);
    if (!s.ok() || !d.ok()) return "registration failed";
    src = *std::move(s);
    dst = *std::move(d);
    auto r = pair.target->Expose(dst->reg(), dst->data(), kMaxSize,
                                 kAccessRemoteRead | kAccessRemoteWrite);
    if (!r.ok()) return "expose failed";
    region = *r;
    cs.reset(new Completion[depth]);
    return nullptr;
  }

  // Posts `depth` operations of `size` bytes and waits for all of them. `drive`: the caller
  // reaps completions itself (Endpoint::Poll) while it waits (sanreg-poll), instead of blocking in
  // Completion::Wait until the progress thread hands them over (sanreg).
  void Iteration(bool write, size_t size, int depth, bool drive) {
    Sge s = src->sge(0, size);
    for (int i = 0; i < depth; ++i) {
      Completion& c = cs[i];
      c.Reset();
      absl::Status st = write ? pair.initiator->Write({&s, 1}, region, 0, &c)
                              : pair.initiator->Read({&s, 1}, region, 0, &c);
      if (!st.ok()) {
        std::fprintf(stderr, "post: %s\n", st.ToString().c_str());
        abort();
      }
    }
    for (int i = 0; i < depth; ++i) {
      Completion& c = cs[i];
      if (drive) {
        while (!c.Done()) pair.initiator->Poll();
      }
      c.Wait();
      if (!c.status().ok()) {
        std::fprintf(stderr, "completion: %s\n", c.status().ToString().c_str());
        abort();
      }
    }
  }
};

void BM_Sanreg(benchmark::State& state, const char* prov, bool write, bool drive) {
  bench::ScopedPin caller_pin(PinCpu(0));
  const size_t size = static_cast<size_t>(state.range(0));
  const int depth = static_cast<int>(state.range(1));
  SanregRig rig;
  if (const char* error = rig.Open(prov, depth)) {
    state.SkipWithError(error);
    return;
  }
  rig.Iteration(write, size, depth, drive);  // warm-up, untimed (see kWarmUp)
  for (auto _ : state) rig.Iteration(write, size, depth, drive);
  state.SetBytesProcessed(state.iterations() * depth * static_cast<int64_t>(size));
}

// The three deployable modes of one provider, operation, size and depth, in one process, taking
// turns: kRounds rounds, each giving every mode a turn (in the opposite order in odd rounds) of
// kTurnWarm untimed, then at least kTurnTimed timed (and at least one iteration). Why: this guest
// changes speed for minutes at a time (a 4 KiB shm write at 0.8-0.9 us in one spell, 2.2-2.7 in
// the other), and separate benchmarks, minutes apart with random interleaving, can put one mode in
// the fast spell and the other in the slow one; turns a few tens of milliseconds apart share the
// spell. A mode's untimed start lets the previous mode's threads go quiet first: raw's target
// thread is paused outside raw's turns, and sanreg's progress threads stop spinning within
// kHotWindowNs (20 ms) of the last operation and sleep (datapath/libfabric/core.h). Reports each
// mode's median bytes/s over the rounds, and the median over the rounds of each round's ratio to
// raw (the "sanreg / raw" counters). Each repetition sets up new connections and threads, and its
// rounds share them: a repetition's ratio can sit 10-15% off the row's for all of its rounds, for
// sanreg and sanreg-poll alike, though at tcp 1 MiB depth 1 the two run the same loop (an A/A
// pair). So a row needs repetitions more than rounds: --alternated_repetitions (perf_report.sh:
// 15) gives these benchmarks their own count.
constexpr int kRounds = 5;
// The modes, raw first (the ratios' base); their names are the counters' and the tables' columns.
constexpr const char* kAlternatedModes[] = {"raw", "sanreg", "sanreg-poll"};
constexpr int kModes = static_cast<int>(std::size(kAlternatedModes));
constexpr auto kTurnWarm = std::chrono::milliseconds(30);
constexpr auto kTurnTimed = std::chrono::milliseconds(40);

void BM_Alternated(benchmark::State& state, const char* prov, bool write) {
  bench::ScopedPin pin(PinCpu(0));
  const size_t size = static_cast<size_t>(state.range(0));
  const int depth = static_cast<int>(state.range(1));
  Raw raw(prov);
  if (!raw.ok) {
    state.SkipWithError("raw setup failed");
    return;
  }
  RawTargetThread target(raw.side[1].cq);
  target.Pause();
  SanregRig rig;
  if (const char* error = rig.Open(prov, depth)) {
    state.SkipWithError(error);
    return;
  }
  using Clock = std::chrono::steady_clock;
  // One turn of mode m (kAlternatedModes[m]): returns its bytes/s.
  auto turn = [&](int m) {
    if (m == 0) target.Resume();
    auto iteration = [&] {
      if (m == 0) {
        RawIteration(raw, write, size, depth, false);
      } else {
        rig.Iteration(write, size, depth, /*drive=*/m == 2);
      }
    };
    for (auto start = Clock::now(); Clock::now() - start < kTurnWarm;) iteration();
    int64_t n = 0;
    const auto start = Clock::now();
    auto elapsed = Clock::duration::zero();
    do {
      iteration();
      ++n;
      elapsed = Clock::now() - start;
    } while (elapsed < kTurnTimed);
    if (m == 0) target.Pause();
    return static_cast<double>(n) * depth * static_cast<double>(size) /
           std::chrono::duration<double>(elapsed).count();
  };
  std::vector<double> rates[kModes];
  std::vector<double> ratios[kModes];  // to raw, each round's; raw's own stays empty
  for (auto _ : state) {
    const auto start = Clock::now();
    for (int r = 0; r < kRounds; ++r) {
      double rate[kModes];
      for (int k = 0; k < kModes; ++k) {
        const int m = r % 2 == 0 ? k : kModes - 1 - k;
        rate[m] = turn(m);
        rates[m].push_back(rate[m]);
      }
      for (int m = 1; m < kModes; ++m) ratios[m].push_back(rate[m] / rate[0]);
    }
    state.SetIterationTime(std::chrono::duration<double>(Clock::now() - start).count());
  }
  for (int m = 0; m < kModes; ++m) {
    state.counters[kAlternatedModes[m]] = bench::Median(rates[m]);
    if (m > 0) {
      state.counters[std::string(kAlternatedModes[m]) + " / raw"] = bench::Median(ratios[m]);
    }
  }
}

// Collects bytes/s per benchmark, then prints the comparison as markdown tables: throughput and
// ratios against raw for every provider, operation, size and depth; and, at depth 1, the time per
// operation (the latency of one operation, posting to completion).
class RatioReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& r : runs) {
      // With --benchmark_repetitions, the median (reported after the repetitions) wins; the "max"
      // aggregate's bytes/s is the best repetition's (see kBest).
      if (r.error_occurred) continue;
      const bool best = r.run_type == Run::RT_Aggregate && r.aggregate_name == kBest;
      if (r.run_type == Run::RT_Aggregate && r.aggregate_name != "median" && !best) continue;
      // "sanreg/tcp/write/4096/32/real_time" -> mode "sanreg", key "tcp/write/4096/32".
      const std::string name = r.run_name.str();
      const size_t slash = name.find('/');
      if (slash == std::string::npos) continue;
      const std::string mode = name.substr(0, slash);
      size_t end = slash;
      for (int i = 0; i < 4 && end != std::string::npos; ++i) end = name.find('/', end + 1);
      const std::string key =
          name.substr(slash + 1, end == std::string::npos ? end : end - slash - 1);
      if (mode == "alternated") {
        // Its counters: each mode's bytes/s and the ratios (see BM_Alternated); not its best.
        if (best) continue;
        for (const auto& [counter, value] : r.counters) alternated_[key][counter] = value;
        AddKey(key);
        continue;
      }
      auto it = r.counters.find("bytes_per_second");
      if (it == r.counters.end()) continue;
      (best ? best_ : rates_)[key][mode] = it->second;
      AddKey(key);
    }
    ConsoleReporter::ReportRuns(runs);
  }

  // Lists `key` ("tcp/write/4096/32") in the tables in the order of the calls, whatever order
  // the runs come in (random with --benchmark_enable_random_interleaving).
  void AddKey(const std::string& key) {
    if (std::find(keys_.begin(), keys_.end(), key) == keys_.end()) keys_.push_back(key);
  }

  std::string Markdown() const {
    std::string out = RatioTable(rates_, /*with_raw1thread=*/true);
    if (!alternated_.empty()) {
      out +=
          "\nAlternated: the three modes taking turns in one process (see BM_Alternated), each "
          "mode's median bytes/s over the rounds and the median of the rounds' ratios\n\n" +
          RatioTable(alternated_, /*with_raw1thread=*/false);
    }
    if (!best_.empty()) {
      out +=
          "\nThe best repetition of each mode (the highest bytes/s of its repetitions): the "
          "machine's fast spells, if any repetition of a mode fell in one\n\n" +
          RatioTable(best_, /*with_raw1thread=*/false);
    }
    out +=
        "\nDepth 1: time per operation (us), posting to completion\n\n"
        "| provider | op | size | depth | raw | raw1thread (ref.) | sanreg | sanreg-poll |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|\n";
    for (const std::string& key : keys_) {
      if (key.size() < 2 || key.substr(key.size() - 2) != "/1") continue;
      auto found = rates_.find(key);
      if (found == rates_.end()) continue;
      const auto& m = found->second;
      const double size = std::stod(Field(key, 2));
      char line[512];
      std::snprintf(line, sizeof line, "| %s | %s | %s | %s | %s |\n", Cells(key).c_str(),
                    Us(size, Get(m, "raw")).c_str(), Us(size, Get(m, "raw1thread")).c_str(),
                    Us(size, Get(m, "sanreg")).c_str(), Us(size, Get(m, "sanreg-poll")).c_str());
      out += line;
    }
    return out;
  }

 private:
  using Rates = std::map<std::string, std::map<std::string, double>>;  // key -> mode -> bytes/s

  // Throughput and the ratios to raw, one row per key of `rates`, in the order of AddKey.
  std::string RatioTable(const Rates& rates, bool with_raw1thread) const {
    std::string out = std::string("| provider | op | size | depth | raw MB/s | ") +
                      (with_raw1thread ? "raw1thread MB/s (ref.) | " : "") +
                      "sanreg MB/s | sanreg / raw | sanreg-poll MB/s | sanreg-poll / raw |\n" +
                      (with_raw1thread ? "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
                                       : "|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for (const std::string& key : keys_) {
      auto found = rates.find(key);
      if (found == rates.end()) continue;  // filtered out, or every mode failed
      const auto& m = found->second;
      const double raw = Get(m, "raw");
      out += "| " + Cells(key) + " | " + Mb(raw) + " | ";
      if (with_raw1thread) out += Mb(Get(m, "raw1thread")) + " | ";
      out += Mb(Get(m, "sanreg")) + " | " + RatioOf(m, "sanreg") + " | " +
             Mb(Get(m, "sanreg-poll")) + " | " + RatioOf(m, "sanreg-poll") + " |\n";
    }
    return out;
  }
  // `mode`'s ratio to raw: the one measured with it ("sanreg / raw", BM_Alternated) if any, else
  // the ratio of the two bytes/s.
  static std::string RatioOf(const std::map<std::string, double>& m, const std::string& mode) {
    auto it = m.find(mode + " / raw");
    if (it == m.end()) return Ratio(Get(m, mode.c_str()), Get(m, "raw"));
    char s[32];
    std::snprintf(s, sizeof s, "%.2f", it->second);
    return s;
  }
  static double Get(const std::map<std::string, double>& m, const char* mode) {
    auto it = m.find(mode);
    return it == m.end() ? 0 : it->second;
  }
  static std::string Field(const std::string& key, int i) {
    size_t b = 0;
    for (int k = 0; k < i; ++k) b = key.find('/', b) + 1;
    return key.substr(b, key.find('/', b) - b);
  }
  static std::string Size(const std::string& bytes) {
    const long long n = std::stoll(bytes);
    char s[32];
    if (n >= (1 << 20) && n % (1 << 20) == 0) {
      std::snprintf(s, sizeof s, "%lld MiB", n >> 20);
    } else if (n >= 1024 && n % 1024 == 0) {
      std::snprintf(s, sizeof s, "%lld KiB", n >> 10);
    } else {
      std::snprintf(s, sizeof s, "%lld B", n);
    }
    return s;
  }
  static std::string Cells(const std::string& key) {
    return Field(key, 0) + " | " + Field(key, 1) + " | " + Size(Field(key, 2)) + " | " +
           Field(key, 3);
  }
  static std::string Mb(double rate) {
    if (rate == 0) return "-";
    char s[32];
    std::snprintf(s, sizeof s, rate >= 100e6 ? "%.0f" : "%.2f", rate / 1e6);
    return s;
  }
  static std::string Ratio(double a, double b) {
    if (a == 0 || b == 0) return "-";
    char s[32];
    std::snprintf(s, sizeof s, "%.2f", a / b);
    return s;
  }
  static std::string Us(double size, double rate) {
    if (rate == 0) return "-";
    char s[32];
    std::snprintf(s, sizeof s, "%.1f", 1e6 * size / rate);
    return s;
  }

  Rates rates_;       // medians (or single runs)
  Rates best_;        // the "max" aggregates
  Rates alternated_;  // BM_Alternated's counters: bytes/s by mode, and "<mode> / raw" ratios
  std::vector<std::string> keys_;  // in the order of AddKey
};

}  // namespace
}  // namespace sanreg

int main(int argc, char** argv) {
  using namespace sanreg;
  // --ratios_md=FILE: also write the markdown tables there; --pin: see g_pin;
  // --alternated_repetitions=N: the alternated benchmarks' repetitions, instead of
  // --benchmark_repetitions (see kRounds). Our flags, not the library's.
  std::string ratios_md;
  int alternated_repetitions = 0;  // 0: --benchmark_repetitions
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--ratios_md=", 0) == 0) {
      ratios_md = a.substr(12);
    } else if (a == "--pin") {
      g_pin = true;
    } else if (constexpr std::string_view kFlag = "--alternated_repetitions=";
               a.rfind(kFlag, 0) == 0) {
      const char* value = a.c_str() + kFlag.size();
      char* end = nullptr;
      const long n = std::strtol(value, &end, 10);
      if (end == value || *end != '\0' || n < 1 || n > 1000) {
        std::fprintf(stderr, "datapath_benchmark: bad %s (want 1 to 1000)\n", a.c_str());
        return 1;
      }
      alternated_repetitions = static_cast<int>(n);
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  if (g_pin) {
    const std::vector<int> cpus = bench::ThreadCpus();
    for (size_t n = 0; n < 2 && n < cpus.size(); ++n) g_cpus[n] = cpus[n];
    if (g_cpus[1] < 0) {
      std::fprintf(stderr, "datapath_benchmark: --pin needs two CPUs\n");
      return 1;
    }
  }
  RatioReporter reporter;
  for (const char* prov : {"tcp", "shm"}) {
    for (bool write : {true, false}) {
      const std::string suffix = std::string("/") + prov + (write ? "/write" : "/read");
      for (int64_t depth : kDepths) {
        for (int64_t size : kSizes) {
          reporter.AddKey(suffix.substr(1) + "/" + std::to_string(size) + "/" +
                          std::to_string(depth));
          benchmark::RegisterBenchmark(("raw" + suffix).c_str(), BM_RawTwoThreads, prov, write)
              ->Args({size, depth})
              ->ComputeStatistics(kBest, Max)
              ->UseRealTime();
          benchmark::RegisterBenchmark(("raw1thread" + suffix).c_str(), BM_Raw, prov, write)
              ->Args({size, depth})
              ->ComputeStatistics(kBest, Max)
              ->UseRealTime();
          benchmark::RegisterBenchmark(("sanreg" + suffix).c_str(), BM_Sanreg, prov, write, false)
              ->Args({size, depth})
              ->ComputeStatistics(kBest, Max)
              ->UseRealTime();
          benchmark::RegisterBenchmark(("sanreg-poll" + suffix).c_str(), BM_Sanreg, prov, write,
                                       true)
              ->Args({size, depth})
              ->ComputeStatistics(kBest, Max)
              ->UseRealTime();
          benchmark::internal::Benchmark* alternated =
              benchmark::RegisterBenchmark(("alternated" + suffix).c_str(), BM_Alternated, prov,
                                           write)
                  ->Args({size, depth})
                  ->Iterations(1)
                  ->UseManualTime();
          if (alternated_repetitions > 0) alternated->Repetitions(alternated_repetitions);
        }
      }
    }
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  const std::string md = reporter.Markdown();
  std::printf("\nsanreg / raw throughput (raw: the target progressed by its own thread)\n\n%s",
              md.c_str());
  if (!ratios_md.empty()) {
    FILE* f = std::fopen(ratios_md.c_str(), "w");
    if (f == nullptr || std::fputs(md.c_str(), f) < 0 || std::fclose(f) != 0) {
      std::fprintf(stderr, "datapath_benchmark: cannot write %s\n", ratios_md.c_str());
      return 1;
    }
  }
  return 0;
}
