// sanreg_bench: pin-down workloads over the data path, with and without the registration cache.
//
// A target and an initiator run as two processes (the target is forked first, before this process
// starts any thread): the target exposes one region; the initiator RDMA-writes into it from local
// buffers that each mode registers its own way:
//   nocache  register and deregister around every operation;
//   cache    RegistrationCache over the fabric's registrar (Acquire / release around every op);
//   prereg   every buffer registered once, up front (the limit a cache can reach).
// Workloads:
//   reuse    a rotating set of --buffers buffers;
//   window   a window of the size sliding by half its length over an arena 16 sizes long
//            (successive windows overlap: the cache merges or registers anew);
//   zipf     rotating buffers, each write of a Zipf-distributed number of pages up to the size;
//   churn    a fresh buffer every operation (mmap, write, munmap: the cache must invalidate);
//   evict    a working set twice the cache's region limit (--cache_regions), picked at random;
//   threads  buffer reuse on max(4, --threads) initiator threads sharing one cache and endpoint.
// Every operation is synchronous (register, write, wait for the completion, release), so the
// latency printed is that of one pin-down write; ops/s are summed over --threads threads.
//
// --via: the API both processes go through. cpp: the C++ API (Fabric, Endpoint, RegistrationCache;
// the registrar counted and timed directly). spi: the SAN SPI's C ABI (ws2san.h) as a switch calls
// it, one SPI session per run (see SpiPath); the SPI always caches, so its nocache drops each
// buffer with WSPMemoryRegistrationCacheCallback after deregistering it, and its "reg ms" is the
// time spent inside the SPI's registration calls.
//
// Exit codes: 0 done, 1 a run failed, 2 bad flags (one line on stderr).

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "datapath/completion.h"
#include "datapath/endpoint.h"
#include "datapath/fabric.h"
#include "datapath/fd_io.h"
#include "datapath/remote_region.h"
#include "regcache/bench_cpu.h"
#include "regcache/cache.h"
#include "regcache/pin_registrar.h"
#include "regcache/stats_segment.h"
#include "spi/extension_table.h"
#include "spi/ws2san.h"
#include "tools/internal/cli.h"

ABSL_FLAG(std::string, fabric, "auto",
          "provider: shm, tcp, auto (shm if it opens, else tcp), or verbs / verbs:<device> "
          "(an RDMA device through rdma-core; --via=cpp)");
ABSL_FLAG(std::string, sizes, "4KiB,64KiB,1MiB",
          "comma-separated buffer sizes (bytes, or with a KiB/MiB suffix), 1 B to 64 MiB");
ABSL_FLAG(int64_t, ops, 0,
          "operations per run of a workload, size and mode (summed over threads); "
          "0: run for --duration instead");
ABSL_FLAG(double, duration, 0.25, "seconds per run of a workload, size and mode, when --ops is 0");
ABSL_FLAG(int32_t, threads, 1, "initiator threads (1 to 64), each with its own buffers");
ABSL_FLAG(std::string, workload, "all",
          "comma-separated: reuse, window, zipf, churn, evict, threads (reuse on max(4, --threads) "
          "threads), or all");
ABSL_FLAG(std::string, mode, "all", "comma-separated: nocache, cache, prereg, or all");
ABSL_FLAG(int32_t, buffers, 16, "buffers per thread rotated through by the reuse workload");
ABSL_FLAG(int32_t, cache_regions, 8,
          "evict workload: the cache's region limit (the working set is twice as many buffers)");
ABSL_FLAG(
    int32_t, repeat, 5,
    "runs of each workload, size and mode, interleaved across modes (each repetition starting "
    "at the next mode); the run with the median throughput is reported, and each mode's "
    "ratio to prereg is the median of its runs' ratios to prereg's run of the same "
    "repetition");
ABSL_FLAG(std::string, via, "cpp",
          "API both processes go through: cpp (the C++ API) or spi (the SAN SPI's C ABI, "
          "ws2san.h; sizes up to its SO_MAX_RDMA_SIZE, 16 MiB)");
ABSL_FLAG(std::string, json, "", "write the results as JSON to this file");
ABSL_FLAG(std::string, csv, "", "write the results as CSV to this file");
ABSL_FLAG(std::string, plot, "",
          "render throughput against size for the three modes (buffer reuse, else the first "
          "workload) to this PNG file with gnuplot");
ABSL_FLAG(std::string, progress, "auto",
          "progress line: auto (when stdout is a terminal), on, off");

namespace sanreg {
namespace {

constexpr uint32_t kLocal = kAccessLocalRead | kAccessLocalWrite;
constexpr uint32_t kRemoteRw = kAccessRemoteRead | kAccessRemoteWrite;
constexpr size_t kMaxSize = size_t{64} << 20;
constexpr size_t kSpiMaxSize = size_t{16} << 20;  // the SPI's SO_MAX_RDMA_SIZE (checked per run)
constexpr size_t kWindowSpan = 16;  // the window workload's arena, in buffers of --sizes

[[noreturn]] void Usage(const std::string& msg) { tools::UsageError("sanreg_bench", msg); }

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// ---- flags ----------------------------------------------------------------------------------

bool ParseSize(std::string s, size_t* out) {
  uint64_t mult = 1;
  auto ends = [&](const char* suf) {
    size_t n = std::strlen(suf);
    return s.size() > n && s.compare(s.size() - n, n, suf) == 0;
  };
  if (ends("KiB") || ends("MiB") || ends("GiB")) {
    mult = ends("KiB") ? 1024 : ends("MiB") ? (1 << 20) : (uint64_t{1} << 30);
    s.resize(s.size() - 3);
  } else if (ends("K") || ends("M") || ends("k") || ends("m")) {
    mult = (s.back() == 'K' || s.back() == 'k') ? 1024 : (1 << 20);
    s.pop_back();
  }
  uint64_t v;
  if (!absl::SimpleAtoi(s, &v) || v == 0 || v > kMaxSize / mult) return false;
  *out = v * mult;
  return true;
}

std::vector<std::string> ParseChoices(const std::string& flag, const std::string& value,
                                      const std::vector<std::string>& allowed) {
  std::vector<std::string> out;
  for (absl::string_view p : absl::StrSplit(value, ',')) {
    std::string s(p);
    if (s == "all") return allowed;
    if (std::find(allowed.begin(), allowed.end(), s) == allowed.end()) {
      Usage(absl::StrCat("bad value '", s, "' for --", flag, ": expected ",
                         absl::StrJoin(allowed, ", "), " or all"));
    }
    if (std::find(out.begin(), out.end(), s) == out.end()) out.push_back(s);
  }
  return out;
}

struct Config {
  std::string fabric;
  std::vector<size_t> sizes;
  int64_t ops;
  double duration;
  int threads;
  std::vector<std::string> workloads;
  std::vector<std::string> modes;
  int buffers;
  int cache_regions;
  int repeat;
  std::string via;
  std::string json, csv, plot;
  bool progress;
};

// "verbs" or "verbs:<device>".
bool IsVerbs(const std::string& fabric) {
  return fabric == "verbs" || (fabric.rfind("verbs:", 0) == 0 && fabric.size() > 6);
}

Config ValidatedConfig() {
  Config c;
  c.fabric = absl::GetFlag(FLAGS_fabric);
  if (c.fabric != "auto" && c.fabric != "shm" && c.fabric != "tcp" && !IsVerbs(c.fabric)) {
    Usage(absl::StrCat("bad value '", c.fabric,
                       "' for --fabric: expected shm, tcp, auto, verbs or verbs:<device>"));
  }
  for (absl::string_view p : absl::StrSplit(absl::GetFlag(FLAGS_sizes), ',')) {
    size_t s;
    if (!ParseSize(std::string(p), &s)) {
      Usage(absl::StrCat("bad size '", p, "' in --sizes: expected 1 B to 64 MiB, e.g. 4KiB"));
    }
    c.sizes.push_back(s);
  }
  c.ops = absl::GetFlag(FLAGS_ops);
  if (c.ops < 0 || c.ops > 100000000) Usage("--ops must be 0 to 100000000");
  c.duration = absl::GetFlag(FLAGS_duration);
  if (!(c.duration > 0 && c.duration <= 3600)) Usage("--duration must be over 0, at most 3600 s");
  if (c.ops > 0) c.duration = 0;  // --ops wins
  c.threads = absl::GetFlag(FLAGS_threads);
  if (c.threads < 1 || c.threads > 64) Usage("--threads must be 1 to 64");
  c.workloads = ParseChoices("workload", absl::GetFlag(FLAGS_workload),
                             {"reuse", "window", "zipf", "churn", "evict", "threads"});
  c.modes = ParseChoices("mode", absl::GetFlag(FLAGS_mode), {"nocache", "cache", "prereg"});
  c.buffers = absl::GetFlag(FLAGS_buffers);
  if (c.buffers < 1 || c.buffers > 4096) Usage("--buffers must be 1 to 4096");
  c.cache_regions = absl::GetFlag(FLAGS_cache_regions);
  if (c.cache_regions < 1 || c.cache_regions > 4096) Usage("--cache_regions must be 1 to 4096");
  c.repeat = absl::GetFlag(FLAGS_repeat);
  if (c.repeat < 1 || c.repeat > 100) Usage("--repeat must be 1 to 100");
  c.via = absl::GetFlag(FLAGS_via);
  if (c.via != "cpp" && c.via != "spi") {
    Usage(absl::StrCat("bad value '", c.via, "' for --via: expected cpp or spi"));
  }
  if (c.via == "spi" && IsVerbs(c.fabric)) Usage("--fabric=verbs runs --via=cpp only");
  if (c.via == "spi" && *std::max_element(c.sizes.begin(), c.sizes.end()) > kSpiMaxSize) {
    Usage("--via=spi takes sizes up to 16 MiB (the SPI's SO_MAX_RDMA_SIZE)");
  }
  c.json = absl::GetFlag(FLAGS_json);
  c.csv = absl::GetFlag(FLAGS_csv);
  c.plot = absl::GetFlag(FLAGS_plot);
  if (!c.plot.empty() && (c.plot.size() < 5 || c.plot.substr(c.plot.size() - 4) != ".png")) {
    Usage(absl::StrCat("--plot wants a .png file, not '", c.plot, "'"));
  }
  std::string prog = absl::GetFlag(FLAGS_progress);
  if (prog != "auto" && prog != "on" && prog != "off") {
    Usage(absl::StrCat("bad value '", prog, "' for --progress: expected auto, on or off"));
  }
  c.progress = prog == "on" || (prog == "auto" && isatty(STDOUT_FILENO));
  // Each thread's buffers must fit in memory we may pin: bound the biggest set up front.
  size_t max_size = *std::max_element(c.sizes.begin(), c.sizes.end());
  size_t per_thread =
      static_cast<size_t>(std::max({c.buffers, 2 * c.cache_regions, int{kWindowSpan}})) * max_size;
  if (per_thread * static_cast<size_t>(std::max(c.threads, 4)) > (size_t{8} << 30)) {
    Usage("--sizes x --buffers (or 2 x --cache_regions) x --threads exceeds 8 GiB");
  }
  return c;
}

// ---- the SPI, as a switch calls it (--via=spi) -----------------------------------------------

// The procedure table WSPStartupEx fills and the extension functions WSPIoctl hands out.
struct SpiFunctions {
  WSPPROC_TABLE procs{};
  ExtensionTable x;
};

absl::Status WsaError(const char* call, int err) {
  return absl::UnavailableError(absl::StrCat(call, " failed: Winsock error ", err));
}

// Every operation is polled (the low bit of hEvent set): the provider must never call this.
int UnexpectedUpcall(SOCKET, LPWSAOVERLAPPED, DWORD, DWORD, LPINT) {
  std::fprintf(stderr, "sanreg_bench: the SPI signalled a polled operation\n");
  std::abort();
}

// WSPStartupEx on `provider`, named in the protocol info's szProtocol. Returns its result (0 or
// a Winsock error).
int SpiStartup(const std::string& provider, SpiFunctions* fns) {
  WSAPROTOCOL_INFOW info{};
  for (size_t i = 0; i < provider.size() && i < WSAPROTOCOL_LEN; ++i) {
    info.szProtocol[i] = static_cast<WCHAR>(provider[i]);
  }
  WSPUPCALLTABLEEX upcalls{};
  upcalls.lpWPUCompleteOverlappedRequest = &UnexpectedUpcall;
  WSPDATA data;
  return WSPStartupEx(SANREG_WSP_VERSION, &data, &info, &upcalls, &fns->procs);
}

// Fetches the extension functions with WSPIoctl(SIO_GET_EXTENSION_FUNCTION_POINTER) on `s`.
absl::Status SpiExtensions(SOCKET s, SpiFunctions* fns) {
  int err = 0;
  if (LoadExtensionTable(fns->procs, s, &fns->x, &err) != 0) {
    return WsaError("WSPIoctl(SIO_GET_EXTENSION_FUNCTION_POINTER)", err);
  }
  return absl::OkStatus();
}

// ---- the target process ---------------------------------------------------------------------

// The target's failures go to stderr (the initiator then reports what it saw) and the exit code.
[[noreturn]] void TargetFail(const char* step, const absl::Status& s, int code) {
  std::fprintf(stderr, "sanreg_bench: target: %s: %s\n", step, s.ToString().c_str());
  _exit(code);
}

// Messages up the pipe from the target: the provider it opened (a length-prefixed string), the
// port it listens on, then the region's wire form.
[[noreturn]] void RunTarget(const std::string& fabric, size_t region_bytes, int in, int out) {
  FabricOptions o;
  o.apply_env = false;
  std::unique_ptr<Fabric> f;
  const std::vector<std::string> tries =
      IsVerbs(fabric) ? std::vector<std::string>{fabric} : std::vector<std::string>{"shm", "tcp"};
  for (const std::string& p : tries) {
    if (fabric != "auto" && fabric != p) continue;
    o.provider = p;
    auto opened = Fabric::Open(o);
    if (opened.ok()) {
      f = *std::move(opened);
      break;
    }
    std::fprintf(stderr, "sanreg_bench: target: %s: %s\n", p.c_str(),
                 opened.status().ToString().c_str());
  }
  if (f == nullptr) _exit(3);
  uint32_t n = static_cast<uint32_t>(o.provider.size());
  auto listener = f->Listen("127.0.0.1:0");
  if (!listener.ok()) TargetFail("listen", listener.status(), 4);
  uint16_t port = (*listener)->port();
  if (!WriteFull(out, &n, sizeof n) || !WriteFull(out, o.provider.data(), n) ||
      !WriteFull(out, &port, sizeof port)) {
    _exit(5);
  }
  auto ep = (*listener)->Accept();
  if (!ep.ok()) TargetFail("accept", ep.status(), 6);
  PinRegistrar pin;
  std::unique_ptr<Registrar> reg = f->NewRegistrar(&pin);
  void* p = mmap(nullptr, region_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) _exit(7);
  auto r = reg->Register(reinterpret_cast<uintptr_t>(p), region_bytes, kLocal | kRemoteRw);
  if (!r.ok()) TargetFail("register", r.status(), 8);
  auto region = (*ep)->Expose(*r, p, region_bytes, kRemoteRw);
  if (!region.ok()) TargetFail("expose", region.status(), 9);
  std::array<uint8_t, RemoteRegion::kWireSize> wire;
  if (!region->Serialize(wire).ok() || !WriteFull(out, wire.data(), wire.size())) _exit(10);
  char c;
  if (read(in, &c, 1) < 0) {  // until the initiator closes its end
  }
  ep->reset();
  (void)reg->Deregister(*r);
  _exit(0);
}

// The target through the SPI: it listens with WSPSocket, WSPBind and WSPListen, and for each 'c'
// read from `in` closes the connection it had (WSPDeregisterRdmaMemory, WSPCloseSocket), accepts
// the next one (WSPAccept) and exposes the region on it for writing (WSPRegisterRdmaMemory,
// MEM_WRITE), sending the descriptor up as a length and its bytes. Until `in` closes.
// Messages up the pipe first: the provider it started (a length-prefixed string), the port.
[[noreturn]] void RunSpiTarget(const std::string& fabric, size_t region_bytes, int in, int out) {
  SpiFunctions fns;
  std::string provider;
  for (const char* p : {"shm", "tcp"}) {
    if (fabric != "auto" && fabric != p) continue;
    int rc = SpiStartup(p, &fns);
    if (rc == 0) {
      provider = p;
      break;
    }
    std::fprintf(stderr, "sanreg_bench: target: WSPStartupEx(%s): Winsock error %d\n", p, rc);
  }
  if (provider.empty()) _exit(3);
  int err = 0;
  SOCKET l = fns.procs.lpWSPSocket(AF_INET, SOCK_STREAM, 0, nullptr, 0, 0, &err);
  if (l == INVALID_SOCKET) TargetFail("WSPSocket", WsaError("WSPSocket", err), 4);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int alen = sizeof a;
  if (fns.procs.lpWSPBind(l, reinterpret_cast<sockaddr*>(&a), sizeof a, &err) != 0 ||
      fns.procs.lpWSPListen(l, 1, &err) != 0 ||
      fns.procs.lpWSPGetSockName(l, reinterpret_cast<sockaddr*>(&a), &alen, &err) != 0) {
    TargetFail("listen", WsaError("WSPBind/WSPListen", err), 4);
  }
  uint16_t port = ntohs(a.sin_port);
  uint32_t n = static_cast<uint32_t>(provider.size());
  if (!WriteFull(out, &n, sizeof n) || !WriteFull(out, provider.data(), n) ||
      !WriteFull(out, &port, sizeof port)) {
    _exit(5);
  }
  if (absl::Status s = SpiExtensions(l, &fns); !s.ok()) TargetFail("WSPIoctl", s, 6);
  void* p = mmap(nullptr, region_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) _exit(7);
  SOCKET conn = INVALID_SOCKET;
  uint8_t desc[256];
  DWORD desc_len = 0;
  char c;
  while (ReadFull(in, &c, 1)) {
    if (conn != INVALID_SOCKET) {
      (void)fns.x.dereg_rdma(conn, desc, desc_len, &err);
      (void)fns.procs.lpWSPCloseSocket(conn, &err);
    }
    conn = fns.procs.lpWSPAccept(l, nullptr, nullptr, nullptr, 0, &err);
    if (conn == INVALID_SOCKET) TargetFail("accept", WsaError("WSPAccept", err), 6);
    desc_len = sizeof desc;
    if (fns.x.reg_rdma(conn, p, static_cast<DWORD>(region_bytes), MEM_WRITE, desc, &desc_len,
                       &err) != 0) {
      TargetFail("expose", WsaError("WSPRegisterRdmaMemory", err), 8);
    }
    uint32_t len = desc_len;
    if (!WriteFull(out, &len, sizeof len) || !WriteFull(out, desc, len)) _exit(10);
  }
  if (conn != INVALID_SOCKET) {
    (void)fns.x.dereg_rdma(conn, desc, desc_len, &err);
    (void)fns.procs.lpWSPCloseSocket(conn, &err);
  }
  (void)fns.procs.lpWSPCloseSocket(l, &err);
  (void)fns.procs.lpWSPCleanup(&err);
  _exit(0);
}

// ---- the initiator --------------------------------------------------------------------------

// Counts and times every registration and deregistration made through it.
class TimingRegistrar : public Registrar {
 public:
  explicit TimingRegistrar(Registrar* inner) : inner_(inner) {}
  absl::StatusOr<Registration> Register(uintptr_t addr, size_t length, uint32_t access) override {
    int64_t t = NowNs();
    auto r = inner_->Register(addr, length, access);
    ns_.fetch_add(NowNs() - t, std::memory_order_relaxed);
    registrations_.fetch_add(1, std::memory_order_relaxed);
    return r;
  }
  absl::Status Deregister(const Registration& reg) override {
    int64_t t = NowNs();
    absl::Status s = inner_->Deregister(reg);
    ns_.fetch_add(NowNs() - t, std::memory_order_relaxed);
    return s;
  }
  void Reset() {
    ns_ = 0;
    registrations_ = 0;
  }
  int64_t ns() const { return ns_.load(); }
  uint64_t registrations() const { return registrations_.load(); }

 private:
  Registrar* inner_;
  std::atomic<int64_t> ns_{0};
  std::atomic<uint64_t> registrations_{0};
};

struct Result {
  std::string workload, mode;
  size_t size = 0;
  int threads = 0;
  uint64_t ops = 0;
  double seconds = 0;
  double ops_per_s = 0, gb_per_s = 0;
  double p50_us = 0, p99_us = 0;
  double hit_rate = 0;
  uint64_t registrations = 0;
  double register_ms = 0;
  uint64_t invalidations = 0, evictions = 0;
  // ops_per_s over prereg's, the median over the repetitions of each run's ratio to prereg's run
  // of the same repetition (seconds apart); 0 for prereg itself and when prereg did not run.
  double to_prereg = 0;
};

struct Buffer {
  uint8_t* data = nullptr;
  size_t mapped = 0;
  Registration reg;         // prereg through the C++ API
  HANDLE handle = nullptr;  // prereg through the SPI
};

uint8_t* MapBuffer(size_t size, size_t* mapped) {
  *mapped = (size + 4095) & ~size_t{4095};
  void* p = mmap(nullptr, *mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  std::memset(p, 0x5a, *mapped);
  return static_cast<uint8_t*>(p);
}

// The threads workload runs buffer reuse on kThreadsWorkload threads (or --threads, if more);
// the others on --threads.
constexpr int kThreadsWorkload = 4;
int ThreadsFor(const Config& c, const std::string& workload) {
  return workload == "threads" ? std::max(c.threads, kThreadsWorkload) : c.threads;
}

// What the initiator holds of the target, per --via.
struct Link {
  std::string via;
  // cpp: one fabric, endpoint and exposed region for every run.
  Fabric* fabric = nullptr;
  Endpoint* ep = nullptr;
  RemoteRegion region;
  // spi: the target's SPI listener (127.0.0.1:port) and the pipes that ask it for a connection
  // ('c' down) and bring back the descriptor of its WSPRegisterRdmaMemory (length, bytes, up).
  std::string provider;
  uint16_t port = 0;
  int to_target = -1;
  int from_target = -1;
};

// How a run's operations reach the data path. A path provides:
//   struct ThreadState                        what one initiator thread keeps between operations;
//   Preregister(Buffer*, bytes)               prereg: register a buffer, before the clock;
//   Op(ThreadState&, data, len, buffer, off)  one operation: register as the mode does, write
//                                             [data, data + len) to the target at off, wait for
//                                             the completion, release as the mode does;
//   BeforeUnmap(data, len)                    churn: the buffer's mapping is about to go;
//   StartClock()                              the clock starts, after the warm-up: the hit rate
//                                             counts the lookups from here on;
//   Finish(Result*)                           after the clock: hit rate, registrations, time
//                                             registering, invalidations, evictions of the run;
//   Unregister(Buffer*)                       prereg: after Finish.

// Through the C++ API: RegistrationCache::Acquire (cache) or the fabric's registrar (nocache,
// prereg), all counted and timed by a TimingRegistrar, then Endpoint::Write.
class CppPath {
 public:
  struct ThreadState {
    Completion c;
  };

  CppPath(const Link& link, const std::string& mode)
      : link_(link),
        mode_(mode),
        fabric_reg_(link.fabric->NewRegistrar(&pin_)),
        timing_(fabric_reg_.get()) {}

  absl::Status Start(const std::string& workload, int cache_regions) {
    if (mode_ != "cache") return absl::OkStatus();
    RegistrationCache::Options o;
    if (workload == "evict") o.max_regions = static_cast<size_t>(cache_regions);
    auto c = RegistrationCache::Create(&timing_, o);
    if (!c.ok()) return c.status();
    cache_ = *std::move(c);
    return absl::OkStatus();
  }

  // The clock starts (after the warm-up): the hit rate counts the lookups from here on.
  void StartClock() {
    if (cache_) clock_ = cache_->Stats();
  }

  absl::Status Preregister(Buffer* b, size_t bytes) {
    auto r = timing_.Register(reinterpret_cast<uintptr_t>(b->data), bytes, kAccessLocalRead);
    if (!r.ok()) return r.status();
    b->reg = *r;
    return absl::OkStatus();
  }

  absl::Status Op(ThreadState& ts, uint8_t* data, size_t len, const Buffer* b, uint64_t offset) {
    Registration reg;
    RegionRef ref;
    if (mode_ == "prereg") {
      reg = b->reg;
    } else if (mode_ == "cache") {
      auto r = cache_->Acquire(data, len, kAccessLocalRead);
      if (!r.ok()) return r.status();
      ref = *std::move(r);
    } else {
      auto r = timing_.Register(reinterpret_cast<uintptr_t>(data), len, kAccessLocalRead);
      if (!r.ok()) return r.status();
      reg = *r;
    }
    Sge sge{data, len, ref ? &ref.registration() : &reg};
    ts.c.Reset();
    absl::Status s = link_.ep->Write({&sge, 1}, link_.region, offset, &ts.c);
    if (s.ok()) {
      ts.c.Wait();
      s = ts.c.status();
    }
    if (mode_ == "cache") {
      ref.Reset();
    } else if (mode_ == "nocache") {
      absl::Status d = timing_.Deregister(reg);
      if (s.ok()) s = d;
    }
    return s;
  }

  void BeforeUnmap(uint8_t*, size_t) {}  // the cache's memory hooks see the munmap

  absl::Status Finish(Result* res) {
    if (cache_) {
      cache_->Flush();
      CacheStats st = cache_->Stats();
      const uint64_t hits = st.hits - clock_.hits;
      const uint64_t lookups = hits + st.misses() - clock_.misses();
      res->hit_rate = lookups ? double(hits) / lookups : 0;
      res->invalidations = st.invalidations;
      res->evictions = st.evictions;
    } else {
      res->hit_rate = mode_ == "prereg" ? 1.0 : 0.0;
    }
    // Registrations and their time during the run (prereg's up-front ones are counted too: they
    // are what the mode costs, paid before the clock; the cache's deregistrations on its
    // reclaimer thread too).
    res->registrations = timing_.registrations();
    res->register_ms = timing_.ns() / 1e6;
    cache_.reset();
    return absl::OkStatus();
  }

  void Unregister(Buffer* b) { (void)timing_.Deregister(b->reg); }

 private:
  const Link& link_;
  const std::string mode_;
  PinRegistrar pin_;
  std::unique_ptr<Registrar> fabric_reg_;
  TimingRegistrar timing_;
  std::unique_ptr<RegistrationCache> cache_;  // cache mode; destroyed before the registrars
  CacheStats clock_;                          // at StartClock: the hit rate's baseline
};

// Through the SPI's C ABI, as a switch calls it. Each run is one SPI session, so that it starts
// with an empty cache and its own limits, as a CppPath run does: WSPStartupEx (the cache limits
// from SANREG_CACHE_MAX_REGIONS and SANREG_CACHE_MAX_BYTES, set here), WSPSocket, WSPConnect to
// the target, whose WSPAccept and WSPRegisterRdmaMemory(MEM_WRITE) give the descriptor; a short
// warm-up of the new connection; then per operation:
//   nocache  WSPRegisterMemory, WSPRdmaWrite, WSPDeregisterMemory and
//            WSPMemoryRegistrationCacheCallback on the buffer (the SPI always caches: dropping the
//            range makes the deregistration real, on this thread, and the next registration a
//            real one);
//   cache    WSPRegisterMemory, WSPRdmaWrite, WSPDeregisterMemory (the SPI's cache keeps the
//            pinning); churn also calls WSPMemoryRegistrationCacheCallback before each munmap,
//            as SPI.md asks of a switch;
//   prereg   WSPRdmaWrite with handles registered once, before the clock.
// Writes are polled: the low bit of hEvent set, then WSPGetOverlappedResult(wait = TRUE).
// The counters come from the SPI cache's statistics in this process's segment (what sanreg_stat
// reads), as the difference across the run; the time registering is the time spent inside the
// registration calls above (hits included: the SPI gives no other view of it).
class SpiPath {
 public:
  struct ThreadState {};

  SpiPath(const Link& link, const std::string& mode) : link_(link), mode_(mode) {}
  ~SpiPath() { Stop(); }
  SpiPath(const SpiPath&) = delete;
  SpiPath& operator=(const SpiPath&) = delete;

  absl::Status Start(const std::string& workload, size_t size, int cache_regions) {
    // Read by WSPStartupEx alone; no other thread reads the environment between runs.
    std::string max_regions =
        workload == "evict" && mode_ == "cache" ? absl::StrCat(cache_regions) : "0";
    setenv("SANREG_CACHE_MAX_REGIONS", max_regions.c_str(), 1);
    setenv("SANREG_CACHE_MAX_BYTES", "0", 1);
    setenv("SANREG_CACHE_STATS", "1", 1);  // the counters of the run come from there
    if (int rc = SpiStartup(link_.provider, &fns_); rc != 0) return WsaError("WSPStartupEx", rc);
    started_ = true;
    int err = 0;
    s_ = fns_.procs.lpWSPSocket(AF_INET, SOCK_STREAM, 0, nullptr, 0, 0, &err);
    if (s_ == INVALID_SOCKET) return WsaError("WSPSocket", err);
    char c = 'c';
    if (!WriteFull(link_.to_target, &c, 1)) return absl::UnavailableError("the target is gone");
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(link_.port);
    if (fns_.procs.lpWSPConnect(s_, reinterpret_cast<sockaddr*>(&a), sizeof a, nullptr, nullptr,
                                nullptr, nullptr, &err) != 0) {
      return WsaError("WSPConnect", err);
    }
    uint32_t n = 0;
    if (!ReadFull(link_.from_target, &n, sizeof n) || n == 0 || n > sizeof desc_ ||
        !ReadFull(link_.from_target, desc_, n)) {
      return absl::UnavailableError("the target did not send its descriptor");
    }
    desc_len_ = n;
    if (absl::Status s = SpiExtensions(s_, &fns_); !s.ok()) return s;
    DWORD max_rdma = 0;
    int len = sizeof max_rdma;
    if (fns_.procs.lpWSPGetSockOpt(s_, SOL_SOCKET, SO_MAX_RDMA_SIZE,
                                   reinterpret_cast<char*>(&max_rdma), &len, &err) != 0) {
      return WsaError("WSPGetSockOpt(SO_MAX_RDMA_SIZE)", err);
    }
    if (size > max_rdma) {
      return absl::InvalidArgumentError(
          absl::StrCat(size, " bytes exceed the SPI's SO_MAX_RDMA_SIZE of ", max_rdma));
    }
    // Warm up the connection (the provider's first use of it) from a scratch page, then drop
    // the page from the cache: the run's counters start after this.
    size_t mapped;
    uint8_t* scratch = MapBuffer(4096, &mapped);
    if (scratch == nullptr) return absl::ResourceExhaustedError("mmap");
    absl::Status warm;
    HANDLE h = fns_.x.reg(s_, scratch, 4096, MEM_READ, &err);
    if (h == nullptr) warm = WsaError("WSPRegisterMemory", err);
    for (int i = 0; i < 8 && warm.ok(); ++i) warm = Write(scratch, 4096, h, 0);
    if (h != nullptr) (void)fns_.x.dereg(s_, h, &err);
    (void)fns_.x.cache_cb(scratch, mapped, &err);
    munmap(scratch, mapped);
    if (!warm.ok()) return warm;
    auto before = CacheCounters();
    if (!before.ok()) return before.status();
    before_ = *before;
    return absl::OkStatus();
  }

  // The clock starts (after the warm-up): the hit rate counts the lookups from here on.
  void StartClock() {
    if (auto now = CacheCounters(); now.ok()) clock_ = *now;
  }

  absl::Status Preregister(Buffer* b, size_t bytes) {
    int err = 0;
    const int64_t t = NowNs();
    b->handle = fns_.x.reg(s_, b->data, static_cast<DWORD>(bytes), MEM_READ, &err);
    ns_.fetch_add(NowNs() - t, std::memory_order_relaxed);
    return b->handle != nullptr ? absl::OkStatus() : WsaError("WSPRegisterMemory", err);
  }

  absl::Status Op(ThreadState&, uint8_t* data, size_t len, const Buffer* b, uint64_t offset) {
    if (mode_ == "prereg") return Write(data, len, b->handle, offset);
    int err = 0;
    int64_t t = NowNs();
    HANDLE h = fns_.x.reg(s_, data, static_cast<DWORD>(len), MEM_READ, &err);
    ns_.fetch_add(NowNs() - t, std::memory_order_relaxed);
    if (h == nullptr) return WsaError("WSPRegisterMemory", err);
    absl::Status s = Write(data, len, h, offset);
    t = NowNs();
    absl::Status d;
    if (fns_.x.dereg(s_, h, &err) != 0) {
      d = WsaError("WSPDeregisterMemory", err);
    } else if (mode_ == "nocache" && fns_.x.cache_cb(data, len, &err) != 0) {
      d = WsaError("WSPMemoryRegistrationCacheCallback", err);
    }
    ns_.fetch_add(NowNs() - t, std::memory_order_relaxed);
    return s.ok() ? d : s;
  }

  void BeforeUnmap(uint8_t* data, size_t len) {
    if (mode_ != "cache") return;  // nocache dropped it already
    int err = 0;
    const int64_t t = NowNs();
    (void)fns_.x.cache_cb(data, len, &err);
    ns_.fetch_add(NowNs() - t, std::memory_order_relaxed);
  }

  absl::Status Finish(Result* res) {
    auto after = CacheCounters();
    if (!after.ok()) return after.status();
    const uint64_t hits = after->hits - clock_.hits;
    const uint64_t lookups = hits + after->misses() - clock_.misses();
    res->hit_rate = mode_ == "prereg" ? 1.0 : lookups ? double(hits) / lookups : 0;
    res->registrations = after->registrations - before_.registrations;
    res->register_ms = ns_.load() / 1e6;
    res->invalidations = after->invalidations - before_.invalidations;
    res->evictions = after->evictions - before_.evictions;
    return absl::OkStatus();
  }

  void Unregister(Buffer* b) {
    int err = 0;
    if (b->handle != nullptr) (void)fns_.x.dereg(s_, b->handle, &err);
    b->handle = nullptr;
  }

 private:
  // One polled RDMA write of [data, data + len), registered as `h`, to the target at `offset`.
  absl::Status Write(uint8_t* data, size_t len, HANDLE h, uint64_t offset) {
    WSABUFEX buf{len, reinterpret_cast<char*>(data), h};
    WSAOVERLAPPED ov{};
    ov.hEvent = reinterpret_cast<HANDLE>(uintptr_t{1});  // polled: no upcall
    DWORD bytes = 0, flags = 0;
    int err = 0;
    if (fns_.x.write(s_, &buf, 1, desc_, desc_len_, static_cast<DWORD>(offset), &bytes, 0, &ov,
                     nullptr, nullptr, &err) != 0) {
      if (err != WSA_IO_PENDING) return WsaError("WSPRdmaWrite", err);
      if (!fns_.procs.lpWSPGetOverlappedResult(s_, &ov, &bytes, TRUE, &flags, &err)) {
        return WsaError("WSPRdmaWrite (WSPGetOverlappedResult)", err);
      }
    } else {
      bytes = static_cast<DWORD>(ov.InternalHigh);
    }
    if (bytes != len) {
      return absl::DataLossError(absl::StrCat("WSPRdmaWrite moved ", bytes, " of ", len, " bytes"));
    }
    return absl::OkStatus();
  }

  // The SPI cache's counters, from this process's statistics segment (published now).
  absl::StatusOr<CacheStats> CacheCounters() {
    PublishStatsNow();
    auto ps = ReadStatsSegment(getpid());
    if (!ps.ok()) return ps.status();
    if (ps->caches.size() != 1) {
      return absl::FailedPreconditionError(absl::StrCat("expected the SPI's one cache in ",
                                                        StatsSegmentPath(getpid()), ", found ",
                                                        ps->caches.size()));
    }
    return ps->caches[0].second;
  }

  void Stop() {
    int err = 0;
    if (s_ != INVALID_SOCKET) (void)fns_.procs.lpWSPCloseSocket(s_, &err);
    s_ = INVALID_SOCKET;
    if (started_) (void)fns_.procs.lpWSPCleanup(&err);
    started_ = false;
  }

  const Link& link_;
  const std::string mode_;
  SpiFunctions fns_;
  bool started_ = false;
  SOCKET s_ = INVALID_SOCKET;
  uint8_t desc_[256] = {};
  DWORD desc_len_ = 0;
  CacheStats before_;
  CacheStats clock_;            // at StartClock: the hit rate's baseline
  std::atomic<int64_t> ns_{0};  // inside the registration calls, summed over threads
};

class Bench {
 public:
  Bench(const Config& config, const Link& link) : config_(config), link_(link) {}

  absl::StatusOr<Result> Run(const std::string& workload, const std::string& mode, size_t size,
                             const std::string& label) {
    if (link_.via == "spi") {
      SpiPath path(link_, mode);
      if (absl::Status s = path.Start(workload, size, config_.cache_regions); !s.ok()) return s;
      return Measure(path, workload, mode, size, label);
    }
    CppPath path(link_, mode);
    if (absl::Status s = path.Start(workload, config_.cache_regions); !s.ok()) return s;
    return Measure(path, workload, mode, size, label);
  }

 private:
  template <typename Path>
  absl::StatusOr<Result> Measure(Path& path, const std::string& workload, const std::string& mode,
                                 size_t size, const std::string& label) {
    const int threads = ThreadsFor(config_, workload);
    const int nbuf = workload == "reuse" || workload == "zipf" || workload == "threads"
                         ? config_.buffers
                     : workload == "evict"  ? 2 * config_.cache_regions
                     : workload == "window" ? 1
                                            : 0;
    // window: one arena of kWindowSpan buffers' worth per thread, written from a window of `size`
    // bytes that slides by half its length (page-rounded) every operation.
    const size_t buffer_bytes = workload == "window" ? size * kWindowSpan : size;
    const size_t step = std::max<size_t>(4096, (size / 2) & ~size_t{4095});
    const size_t positions = workload == "window" ? (buffer_bytes - size) / step + 1 : 1;
    // zipf: lengths of k pages, k in [1, size / 4096], with probability proportional to 1 / k.
    std::vector<double> zipf_cdf;
    if (workload == "zipf") {
      size_t n = std::max<size_t>(1, size / 4096);
      double sum = 0;
      for (size_t k = 1; k <= n; ++k) zipf_cdf.push_back(sum += 1.0 / k);
      for (double& v : zipf_cdf) v /= sum;
    }
    // Buffers per thread, mapped (and for prereg, registered) before the clock starts.
    std::vector<std::vector<Buffer>> bufs(threads);
    absl::Status setup;
    for (auto& tb : bufs) {
      for (int i = 0; i < nbuf; ++i) {
        Buffer b;
        b.data = MapBuffer(buffer_bytes, &b.mapped);
        if (b.data == nullptr) return absl::ResourceExhaustedError("mmap");
        if (mode == "prereg") {
          if (absl::Status s = path.Preregister(&b, buffer_bytes); !s.ok()) return s;
        }
        tb.push_back(b);
      }
    }

    const uint64_t ops_total = static_cast<uint64_t>(config_.ops);
    const int64_t deadline_ns =
        config_.duration > 0 ? static_cast<int64_t>(config_.duration * 1e9) : 0;
    std::vector<std::vector<uint32_t>> lat(threads);
    std::vector<absl::Status> errs(threads);
    std::vector<uint64_t> moved(threads, 0);  // bytes written, per thread
    std::atomic<uint64_t> progress{0};
    std::atomic<bool> stop{false};

    auto worker = [&](int t) {
      std::vector<uint32_t>& l = lat[t];
      uint64_t my_ops = ops_total / threads + (static_cast<uint64_t>(t) < ops_total % threads);
      if (deadline_ns > 0) my_ops = UINT64_MAX;
      l.reserve(deadline_ns > 0 ? 1 << 16 : my_ops);
      std::mt19937_64 rng(1234567 + t);
      typename Path::ThreadState state;
      const uint64_t offset = static_cast<uint64_t>(t) * size;
      for (uint64_t i = 0; i < my_ops && !stop.load(std::memory_order_relaxed); ++i) {
        uint8_t* data;
        size_t mapped = 0;
        size_t len = size;
        const Buffer* b = nullptr;
        if (workload == "churn") {
          data = MapBuffer(size, &mapped);
          if (data == nullptr) {
            errs[t] = absl::ResourceExhaustedError("mmap");
            return;
          }
        } else if (workload == "window") {
          b = &bufs[t][0];
          data = b->data + (i % positions) * step;
        } else {
          size_t k = workload == "evict" ? rng() % nbuf : i % nbuf;
          b = &bufs[t][k];
          data = b->data;
          if (workload == "zipf" && size > 4096) {
            double u = std::uniform_real_distribution<double>(0, 1)(rng);
            size_t pages =
                std::lower_bound(zipf_cdf.begin(), zipf_cdf.end(), u) - zipf_cdf.begin() + 1;
            len = std::min(size, pages * 4096);
          }
        }
        int64_t t0 = NowNs();
        absl::Status s = path.Op(state, data, len, b, offset);
        int64_t t1 = NowNs();
        if (!s.ok()) {
          errs[t] = s;
          return;
        }
        if (workload == "churn") {
          path.BeforeUnmap(data, mapped);
          munmap(data, mapped);
        }
        l.push_back(static_cast<uint32_t>(std::min<int64_t>(t1 - t0, UINT32_MAX)));
        moved[t] += len;
        progress.fetch_add(1, std::memory_order_relaxed);
      }
    };

    // Warm-up, before the clock, for the workloads that reuse their buffers (reuse, threads, zipf):
    // one operation on each buffer, so that every mode is measured in its steady state. prereg
    // registers its buffers before the clock; the cache's first use of each buffer is that same
    // one-time registration (counted in regs and reg ms, as prereg's are). The other workloads
    // (window, churn, evict) are about misses and are measured cold.
    if (workload == "reuse" || workload == "threads" || workload == "zipf") {
      typename Path::ThreadState warm;
      for (int t = 0; t < threads; ++t) {
        for (const Buffer& b : bufs[t]) {
          const uint64_t offset = static_cast<uint64_t>(t) * size;
          if (absl::Status s = path.Op(warm, b.data, size, &b, offset); !s.ok()) return s;
        }
      }
    }

    path.StartClock();

    std::mutex mu;
    std::condition_variable cv;
    int finished = 0;  // guarded by mu
    std::vector<int64_t> ends(threads, 0);
    const int64_t start = NowNs();
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t) {
      ts.emplace_back([&, t] {
        worker(t);
        ends[t] = NowNs();
        std::lock_guard<std::mutex> g(mu);
        ++finished;
        cv.notify_all();
      });
    }
    // The progress line (on a terminal) and the --duration clock; the measured time is each
    // worker's own end, not when this loop notices it.
    {
      std::unique_lock<std::mutex> g(mu);
      while (finished < threads) {
        int64_t now = NowNs();
        if (deadline_ns > 0 && now - start >= deadline_ns) stop = true;
        if (config_.progress) {
          uint64_t p = progress.load(std::memory_order_relaxed);
          double frac =
              deadline_ns > 0 ? double(now - start) / deadline_ns : double(p) / double(ops_total);
          std::printf("\r  %-48s %3d%%", label.c_str(), int(std::min(1.0, frac) * 100));
          std::fflush(stdout);
        }
        cv.wait_for(g, std::chrono::milliseconds(100));
      }
    }
    for (auto& th : ts) th.join();
    const int64_t end = *std::max_element(ends.begin(), ends.end());
    if (config_.progress) {
      std::printf("\r%*s\r", 64, "");
      std::fflush(stdout);
    }
    for (auto& e : errs) {
      if (!e.ok()) return e;
    }

    Result res;
    res.workload = workload;
    res.mode = mode;
    res.size = size;
    res.threads = threads;
    std::vector<uint32_t> all;
    for (auto& l : lat) all.insert(all.end(), l.begin(), l.end());
    res.ops = all.size();
    res.seconds = (end - start) / 1e9;
    res.ops_per_s = res.ops / res.seconds;
    uint64_t total_bytes = 0;
    for (uint64_t m : moved) total_bytes += m;
    res.gb_per_s = total_bytes / res.seconds / 1e9;
    std::sort(all.begin(), all.end());
    if (!all.empty()) {
      res.p50_us = all[all.size() / 2] / 1e3;
      res.p99_us = all[std::min(all.size() - 1, all.size() * 99 / 100)] / 1e3;
    }
    if (absl::Status s = path.Finish(&res); !s.ok()) return s;

    for (auto& tb : bufs) {
      for (auto& b : tb) {
        if (mode == "prereg") path.Unregister(&b);
        munmap(b.data, b.mapped);
      }
    }
    return res;
  }

  const Config& config_;
  const Link& link_;
};

std::string SizeName(size_t s) {
  if (s % (1 << 20) == 0) return absl::StrCat(s >> 20, "MiB");
  if (s % 1024 == 0) return absl::StrCat(s >> 10, "KiB");
  return absl::StrCat(s, "B");
}

const char* WorkloadTitle(const std::string& w) {
  if (w == "reuse") return "buffer reuse (a rotating set of buffers)";
  if (w == "churn") return "churn (a fresh mmap'd buffer every operation, unmapped after)";
  if (w == "window") return "sliding window (over an arena of 16 sizes, by half a size per op)";
  if (w == "threads") return "buffer reuse on several initiator threads, one cache";
  if (w == "zipf") return "random lengths (Zipf over 1 .. size/4KiB pages, rotating buffers)";
  return "eviction (random picks from a working set twice the cache's region limit)";
}

void PrintTable(const std::string& workload, const Config& config, const std::vector<Result>& rs) {
  std::printf("\n== %s\n", WorkloadTitle(workload));
  std::printf("%-7s %-8s %10s %8s %9s %9s %6s %7s %9s\n", "size", "mode", "ops/s", "GB/s", "p50 us",
              "p99 us", "hit%", "regs", "reg ms");
  for (const Result& r : rs) {
    if (r.workload != workload) continue;
    std::printf("%-7s %-8s %10.0f %8.3f %9.1f %9.1f %6.1f %7" PRIu64 " %9.1f\n",
                SizeName(r.size).c_str(), r.mode.c_str(), r.ops_per_s, r.gb_per_s, r.p50_us,
                r.p99_us, r.hit_rate * 100, r.registrations, r.register_ms);
  }
  // The comparison the design's target is about: cache against prereg, cache against nocache.
  for (size_t s : config.sizes) {
    const Result *c = nullptr, *p = nullptr, *n = nullptr;
    for (const Result& r : rs) {
      if (r.workload != workload || r.size != s) continue;
      if (r.mode == "cache") c = &r;
      if (r.mode == "prereg") p = &r;
      if (r.mode == "nocache") n = &r;
    }
    if (c == nullptr || (p == nullptr && n == nullptr)) continue;
    std::printf("  %-7s cache", SizeName(s).c_str());
    if (p != nullptr) std::printf(" = %.1f%% of prereg", 100 * c->to_prereg);
    if (n != nullptr) std::printf(", %.2fx nocache", c->ops_per_s / n->ops_per_s);
    std::printf("\n");
  }
}

bool WriteJson(const std::string& path, const std::string& provider, const Config& config,
               double elapsed, const std::vector<Result>& rs) {
  FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) return false;
  std::fprintf(f, "{\n  \"tool\": \"sanreg_bench\",\n  \"provider\": \"%s\",\n  \"via\": \"%s\",\n",
               provider.c_str(), config.via.c_str());
  std::fprintf(f, "  \"threads\": %d,\n  \"repeat\": %d,\n  \"elapsed_s\": %.3f,\n  \"results\": [",
               config.threads, config.repeat, elapsed);
  for (size_t i = 0; i < rs.size(); ++i) {
    const Result& r = rs[i];
    std::fprintf(f,
                 "%s\n    {\"workload\": \"%s\", \"mode\": \"%s\", \"size\": %zu, "
                 "\"threads\": %d, \"ops\": %" PRIu64
                 ", \"seconds\": %.6f, \"ops_per_s\": %.1f, \"gb_per_s\": %.6f, "
                 "\"p50_us\": %.3f, \"p99_us\": %.3f, \"hit_rate\": %.6f, "
                 "\"registrations\": %" PRIu64
                 ", \"register_ms\": %.3f, "
                 "\"invalidations\": %" PRIu64 ", \"evictions\": %" PRIu64 ", \"to_prereg\": %.6f}",
                 i ? "," : "", r.workload.c_str(), r.mode.c_str(), r.size, r.threads, r.ops,
                 r.seconds, r.ops_per_s, r.gb_per_s, r.p50_us, r.p99_us, r.hit_rate,
                 r.registrations, r.register_ms, r.invalidations, r.evictions, r.to_prereg);
  }
  std::fprintf(f, "\n  ]\n}\n");
  return std::fclose(f) == 0;
}

bool WriteCsv(const std::string& path, const std::vector<Result>& rs) {
  FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) return false;
  std::fprintf(f,
               "workload,mode,size,threads,ops,seconds,ops_per_s,gb_per_s,p50_us,p99_us,hit_rate,"
               "registrations,register_ms,invalidations,evictions\n");
  for (const Result& r : rs) {
    std::fprintf(f,
                 "%s,%s,%zu,%d,%" PRIu64 ",%.6f,%.1f,%.6f,%.3f,%.3f,%.6f,%" PRIu64 ",%.3f,%" PRIu64
                 ",%" PRIu64 "\n",
                 r.workload.c_str(), r.mode.c_str(), r.size, r.threads, r.ops, r.seconds,
                 r.ops_per_s, r.gb_per_s, r.p50_us, r.p99_us, r.hit_rate, r.registrations,
                 r.register_ms, r.invalidations, r.evictions);
  }
  return std::fclose(f) == 0;
}

// Renders GB/s against size, one line per mode, for `workload`, with gnuplot (Debian's
// gnuplot-nox, installed by tools/setup.sh). Returns false with a message when it cannot.
bool WritePlot(const std::string& path, const std::string& provider, const Config& config,
               const std::vector<Result>& rs) {
  std::string workload = config.workloads[0];
  for (const std::string& w : config.workloads) {
    if (w == "reuse") workload = w;
  }
  std::string data = path + ".dat";
  FILE* f = std::fopen(data.c_str(), "w");
  if (f == nullptr) return false;
  std::string plots;
  int index = 0;
  for (const std::string& m : config.modes) {
    bool any = false;
    for (const Result& r : rs) {
      if (r.workload != workload || r.mode != m) continue;
      if (!any) std::fprintf(f, "# %s\n", m.c_str());
      any = true;
      std::fprintf(f, "%zu %.6f\n", r.size, r.gb_per_s);
    }
    if (!any) continue;
    std::fprintf(f, "\n\n");
    absl::StrAppend(&plots, plots.empty() ? "" : ", ", "'", data, "' index ", index++,
                    " with linespoints lw 2 title '", m, "'");
  }
  std::fclose(f);
  std::string script = absl::StrCat(
      "set terminal pngcairo size 900,560\n", "set output '", path, "'\n",
      "set title 'sanreg_bench: ", WorkloadTitle(workload), ", ", provider, " via ", config.via,
      "' noenhanced\n",
      "set logscale x 2\nset format x '%.0b %BB'\nset xlabel 'buffer size'\nset ylabel 'GB/s'\n",
      "set key top left\nset grid\nplot ", plots, "\n");
  FILE* g = popen("gnuplot 2>&1", "w");
  if (g == nullptr) return false;
  std::fputs(script.c_str(), g);
  int rc = pclose(g);
  std::remove(data.c_str());
  return rc == 0;
}

int Main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "pin-down workloads: RDMA writes from buffers registered per operation (nocache), through "
      "sanreg's cache (cache) or once up front (prereg), between two processes.\n"
      "Usage: sanreg_bench [--fabric=shm|tcp|auto|verbs[:DEVICE]] [--sizes=4KiB,1MiB] "
      "[--ops=N|--duration=S] "
      "[--threads=N] [--workload=reuse,churn,evict] [--mode=nocache,cache,prereg] "
      "[--via=cpp|spi] [--json=FILE] [--csv=FILE] [--plot=FILE.png]");
  tools::PrecheckArgs("sanreg_bench", argc, argv);
  absl::ParseCommandLine(argc, argv);
  Config config = ValidatedConfig();

  size_t max_size = *std::max_element(config.sizes.begin(), config.sizes.end());
  int max_threads = 1;
  for (const std::string& w : config.workloads)
    max_threads = std::max(max_threads, ThreadsFor(config, w));
  size_t region_bytes = ((max_size * max_threads) + 4095) & ~size_t{4095};
  if (config.via == "spi") {
    // The provider is --fabric's, passed in the protocol info: no environment override of it.
    unsetenv("SANREG_FABRIC");
    unsetenv("SANREG_PROVIDER");
  }

  if (IsVerbs(config.fabric)) {
    // Say plainly when there is no RDMA device, before starting a target. The fabric (and its
    // progress thread) is gone again before the fork below.
    FabricOptions o;
    o.provider = config.fabric;
    o.apply_env = false;
    absl::StatusOr<std::unique_ptr<Fabric>> f = Fabric::Open(o);
    if (!f.ok()) {
      std::fprintf(stderr, "sanreg_bench: --fabric=%s: %s\n", config.fabric.c_str(),
                   std::string(f.status().message()).c_str());
      return 1;
    }
  }

  int down[2], up[2];
  if (pipe(down) != 0 || pipe(up) != 0) {
    std::perror("pipe");
    return 1;
  }
  // Fork before this process starts any thread (the fabric's progress thread).
  std::fflush(stdout);
  pid_t child = fork();
  if (child < 0) {
    std::perror("fork");
    return 1;
  }
  if (child == 0) {
    close(down[1]);
    close(up[0]);
    if (config.via == "spi") RunSpiTarget(config.fabric, region_bytes, down[0], up[1]);
    RunTarget(config.fabric, region_bytes, down[0], up[1]);
  }
  close(down[0]);
  close(up[1]);
  auto fail = [&](const std::string& why) {
    std::fprintf(stderr, "sanreg_bench: %s\n", why.c_str());
    close(down[1]);
    int st;
    waitpid(child, &st, 0);
    return 1;
  };

  uint32_t n = 0;
  std::string provider;
  uint16_t port = 0;
  if (!ReadFull(up[0], &n, sizeof n) || n > 64) return fail("the target did not start");
  provider.resize(n);
  if (!ReadFull(up[0], provider.data(), n) || !ReadFull(up[0], &port, sizeof port)) {
    return fail("the target did not start");
  }
  Link link;
  link.via = config.via;
  link.provider = provider;
  link.port = port;
  link.to_target = down[1];
  link.from_target = up[0];
  std::unique_ptr<Fabric> fabric;
  std::unique_ptr<Endpoint> ep;
  std::string provider_name = provider;
  if (config.via == "cpp") {
    FabricOptions o;
    o.provider = provider;
    o.apply_env = false;
    auto f = Fabric::Open(o);
    if (!f.ok()) return fail(f.status().ToString());
    fabric = *std::move(f);
    provider_name = fabric->provider_name();
    auto e = fabric->Connect(absl::StrCat("127.0.0.1:", port));
    if (!e.ok()) return fail(e.status().ToString());
    ep = *std::move(e);
    std::array<uint8_t, RemoteRegion::kWireSize> wire;
    if (!ReadFull(up[0], wire.data(), wire.size())) return fail("the target failed to expose");
    auto region = RemoteRegion::Parse(wire);
    if (!region.ok()) return fail(region.status().ToString());
    link.fabric = fabric.get();
    link.ep = ep.get();
    link.region = *region;
  }

  std::printf(
      "sanreg_bench: provider %s via %s, %d initiator thread(s), target pid %d; %s per run\n",
      provider_name.c_str(), config.via.c_str(), config.threads, int(child),
      config.duration > 0 ? absl::StrFormat("%.2f s", config.duration).c_str()
                          : absl::StrCat(config.ops, " ops").c_str());
  std::fflush(stdout);
  Bench bench(config, link);
  std::vector<Result> results;
  // Warm up (first faults of the target region, the provider's first connection use): one short
  // run, not reported.
  {
    Config warm = config;
    warm.ops = 200;
    warm.duration = 0;
    warm.progress = false;
    Bench warm_bench(warm, link);
    auto r = warm_bench.Run("reuse", "prereg",
                            *std::min_element(config.sizes.begin(), config.sizes.end()), "warm-up");
    if (!r.ok()) return fail(absl::StrCat("warm-up: ", r.status().ToString()));
  }
  const int64_t start = NowNs();
  for (const std::string& w : config.workloads) {
    for (size_t s : config.sizes) {
      // Every run, per mode (in config.modes order). Each repetition starts at the next mode, so
      // that no mode always runs right after the same other one (the one after nocache inherits
      // its registration churn; the first after the warm-up, a colder target).
      std::vector<std::vector<Result>> runs(config.modes.size());
      for (int rep = 0; rep < config.repeat; ++rep) {
        for (size_t i = 0; i < config.modes.size(); ++i) {
          const size_t k = (i + static_cast<size_t>(rep)) % config.modes.size();
          const std::string& m = config.modes[k];
          if (w == "churn" && m == "prereg") continue;  // fresh buffers cannot be registered early
          std::string label =
              absl::StrCat(w, " ", SizeName(s), " ", m, " (run ", rep + 1, "/", config.repeat, ")");
          auto r = bench.Run(w, m, s, label);
          if (!r.ok()) return fail(absl::StrCat(label, ": ", r.status().ToString()));
          runs[k].push_back(*r);
        }
      }
      // Each mode against prereg, run by run: a repetition's runs are seconds apart, and this
      // guest changes speed for seconds to minutes at a time, so two modes' medians can come from
      // different spells (docs/PERFORMANCE.md, item 5); the median of the paired ratios cannot.
      const auto pk = std::find(config.modes.begin(), config.modes.end(), "prereg");
      const std::vector<Result>* prereg =
          pk == config.modes.end() ? nullptr
                                   : &runs[static_cast<size_t>(pk - config.modes.begin())];
      std::vector<double> to_prereg(runs.size(), 0);
      for (size_t k = 0; k < runs.size(); ++k) {
        if (prereg == nullptr || prereg->empty() || &runs[k] == prereg) continue;
        std::vector<double> ratios;
        for (size_t r = 0; r < runs[k].size() && r < prereg->size(); ++r) {
          ratios.push_back(runs[k][r].ops_per_s / (*prereg)[r].ops_per_s);
        }
        to_prereg[k] = bench::Median(std::move(ratios));
      }
      // The run with the median throughput (the machine is shared: the median is what a run
      // typically sees, where the best would favour whichever mode got luckier).
      for (size_t k = 0; k < runs.size(); ++k) {
        std::vector<Result>& v = runs[k];
        if (v.empty()) continue;  // churn's prereg
        std::sort(v.begin(), v.end(),
                  [](const Result& a, const Result& b) { return a.ops_per_s < b.ops_per_s; });
        results.push_back(v[v.size() / 2]);
        results.back().to_prereg = to_prereg[k];
      }
    }
    PrintTable(w, config, results);
    std::fflush(stdout);
  }
  const double elapsed = (NowNs() - start) / 1e9;
  std::printf("\ndone in %.1f s\n", elapsed);

  ep.reset();
  close(down[1]);
  int st = 0;
  waitpid(child, &st, 0);
  fabric.reset();
  if (!config.json.empty() && !WriteJson(config.json, provider, config, elapsed, results)) {
    std::fprintf(stderr, "sanreg_bench: cannot write %s\n", config.json.c_str());
    return 1;
  }
  if (!config.csv.empty() && !WriteCsv(config.csv, results)) {
    std::fprintf(stderr, "sanreg_bench: cannot write %s\n", config.csv.c_str());
    return 1;
  }
  if (!config.plot.empty() && !WritePlot(config.plot, provider, config, results)) {
    std::fprintf(stderr, "sanreg_bench: cannot render %s with gnuplot (bash tools/setup.sh)\n",
                 config.plot.c_str());
    return 1;
  }
  if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
    std::fprintf(stderr, "sanreg_bench: the target exited with status %d\n", st);
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace sanreg

int main(int argc, char** argv) { return sanreg::Main(argc, argv); }
