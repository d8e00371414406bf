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
// Exit codes: 0 done, 1 a run failed, 2 bad flags (one line on stderr).

#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "datapath/fd_io.h"
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
#include "datapath/remote_region.h"
#include "regcache/cache.h"
#include "regcache/pin_registrar.h"
#include "tools/internal/cli.h"

ABSL_FLAG(std::string, fabric, "auto", "provider: shm, tcp, or auto (shm if it opens, else tcp)");
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
ABSL_FLAG(int32_t, repeat, 5,
          "runs of each workload, size and mode, interleaved across modes; the run with the "
          "median throughput is reported");
ABSL_FLAG(std::string, via, "cpp", "API the operations go through: cpp (spi: not yet)");
ABSL_FLAG(std::string, json, "", "write the results as JSON to this file");
ABSL_FLAG(std::string, csv, "", "write the results as CSV to this file");
ABSL_FLAG(std::string, plot, "",
          "render throughput against size for the three modes (buffer reuse, else the first "
          "workload) to this PNG file with gnuplot");
ABSL_FLAG(std::string, progress, "auto", "progress line: auto (when stdout is a terminal), on, off");

namespace sanreg {
namespace {

constexpr uint32_t kLocal = kAccessLocalRead | kAccessLocalWrite;
constexpr uint32_t kRemoteRw = kAccessRemoteRead | kAccessRemoteWrite;
constexpr size_t kMaxSize = size_t{64} << 20;
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
  std::string json, csv, plot;
  bool progress;
};

Config ValidatedConfig() {
  Config c;
  c.fabric = absl::GetFlag(FLAGS_fabric);
  if (c.fabric != "auto" && c.fabric != "shm" && c.fabric != "tcp") {
    Usage(absl::StrCat("bad value '", c.fabric, "' for --fabric: expected shm, tcp or auto"));
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
  c.workloads =
      ParseChoices("workload", absl::GetFlag(FLAGS_workload),
                   {"reuse", "window", "zipf", "churn", "evict", "threads"});
  c.modes = ParseChoices("mode", absl::GetFlag(FLAGS_mode), {"nocache", "cache", "prereg"});
  c.buffers = absl::GetFlag(FLAGS_buffers);
  if (c.buffers < 1 || c.buffers > 4096) Usage("--buffers must be 1 to 4096");
  c.cache_regions = absl::GetFlag(FLAGS_cache_regions);
  if (c.cache_regions < 1 || c.cache_regions > 4096) Usage("--cache_regions must be 1 to 4096");
  c.repeat = absl::GetFlag(FLAGS_repeat);
  if (c.repeat < 1 || c.repeat > 100) Usage("--repeat must be 1 to 100");
  std::string via = absl::GetFlag(FLAGS_via);
  if (via == "spi") Usage("--via=spi is not supported yet");
  if (via != "cpp") Usage(absl::StrCat("bad value '", via, "' for --via: expected cpp"));
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
  for (const char* p : {"shm", "tcp"}) {
    if (fabric != "auto" && fabric != p) continue;
    o.provider = p;
    auto opened = Fabric::Open(o);
    if (opened.ok()) {
      f = *std::move(opened);
      break;
    }
    std::fprintf(stderr, "sanreg_bench: target: %s: %s\n", p, opened.status().ToString().c_str());
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
};

struct Buffer {
  uint8_t* data = nullptr;
  size_t mapped = 0;
  Registration reg;  // prereg only
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

class Bench {
 public:
  Bench(const Config& config, Fabric* fabric, Endpoint* ep, RemoteRegion region)
      : config_(config), fabric_(fabric), ep_(ep), region_(region) {}

  absl::StatusOr<Result> Run(const std::string& workload, const std::string& mode, size_t size,
                             const std::string& label) {
    PinRegistrar pin;
    std::unique_ptr<Registrar> fabric_reg = fabric_->NewRegistrar(&pin);
    TimingRegistrar timing(fabric_reg.get());
    std::unique_ptr<RegistrationCache> cache;
    if (mode == "cache") {
      RegistrationCache::Options o;
      if (workload == "evict") o.max_regions = static_cast<size_t>(config_.cache_regions);
      auto c = RegistrationCache::Create(&timing, o);
      if (!c.ok()) return c.status();
      cache = *std::move(c);
    }
    const int threads = ThreadsFor(config_, workload);
    const int nbuf = workload == "reuse" || workload == "zipf" || workload == "threads"
                         ? config_.buffers
                     : workload == "evict"                      ? 2 * config_.cache_regions
                     : workload == "window"                     ? 1
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
          auto r = timing.Register(reinterpret_cast<uintptr_t>(b.data), buffer_bytes,
                                   kAccessLocalRead);
          if (!r.ok()) return r.status();
          b.reg = *r;
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
      Completion c;
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
            size_t pages = std::lower_bound(zipf_cdf.begin(), zipf_cdf.end(), u) -
                           zipf_cdf.begin() + 1;
            len = std::min(size, pages * 4096);
          }
        }
        int64_t t0 = NowNs();
        Registration reg;
        RegionRef ref;
        if (mode == "prereg") {
          reg = b->reg;
        } else if (mode == "cache") {
          auto r = cache->Acquire(data, len, kAccessLocalRead);
          if (!r.ok()) {
            errs[t] = r.status();
            return;
          }
          ref = *std::move(r);
        } else {
          auto r = timing.Register(reinterpret_cast<uintptr_t>(data), len, kAccessLocalRead);
          if (!r.ok()) {
            errs[t] = r.status();
            return;
          }
          reg = *r;
        }
        Sge sge{data, len, ref ? &ref.registration() : &reg};
        c.Reset();
        absl::Status s = ep_->Write({&sge, 1}, region_, offset, &c);
        if (s.ok()) {
          c.Wait();
          s = c.status();
        }
        if (mode == "cache") {
          ref.Reset();
        } else if (mode == "nocache") {
          absl::Status d = timing.Deregister(reg);
          if (s.ok()) s = d;
        }
        int64_t t1 = NowNs();
        if (!s.ok()) {
          errs[t] = s;
          return;
        }
        if (workload == "churn") munmap(data, mapped);
        l.push_back(static_cast<uint32_t>(std::min<int64_t>(t1 - t0, UINT32_MAX)));
        moved[t] += len;
        progress.fetch_add(1, std::memory_order_relaxed);
      }
    };

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
          double frac = deadline_ns > 0 ? double(now - start) / deadline_ns
                                        : double(p) / double(ops_total);
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
    if (cache) {
      cache->Flush();
      CacheStats st = cache->Stats();
      uint64_t lookups = st.hits + st.misses();
      res.hit_rate = lookups ? double(st.hits) / lookups : 0;
      res.invalidations = st.invalidations;
      res.evictions = st.evictions;
    } else {
      res.hit_rate = mode == "prereg" ? 1.0 : 0.0;
    }
    // Registrations and their time during the run (prereg's up-front ones are counted too: they
    // are what the mode costs, paid before the clock).
    res.registrations = timing.registrations();
    res.register_ms = timing.ns() / 1e6;

    cache.reset();
    for (auto& tb : bufs) {
      for (auto& b : tb) {
        if (mode == "prereg") (void)timing.Deregister(b.reg);
        munmap(b.data, b.mapped);
      }
    }
    return res;
  }

 private:
  const Config& config_;
  Fabric* fabric_;
  Endpoint* ep_;
  RemoteRegion region_;
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

void PrintTable(const std::string& workload, const Config& config,
                const std::vector<Result>& rs) {
  std::printf("\n== %s\n", WorkloadTitle(workload));
  std::printf("%-7s %-8s %10s %8s %9s %9s %6s %7s %9s\n", "size", "mode", "ops/s", "GB/s",
              "p50 us", "p99 us", "hit%", "regs", "reg ms");
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
    if (p != nullptr) std::printf(" = %.1f%% of prereg", 100 * c->ops_per_s / p->ops_per_s);
    if (n != nullptr) std::printf(", %.2fx nocache", c->ops_per_s / n->ops_per_s);
    std::printf("\n");
  }
}

bool WriteJson(const std::string& path, const std::string& provider, const Config& config,
               double elapsed, const std::vector<Result>& rs) {
  FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) return false;
  std::fprintf(f, "{\n  \"tool\": \"sanreg_bench\",\n  \"provider\": \"%s\",\n", provider.c_str());
  std::fprintf(f, "  \"threads\": %d,\n  \"repeat\": %d,\n  \"elapsed_s\": %.3f,\n  \"results\": [",
               config.threads, config.repeat,
               elapsed);
  for (size_t i = 0; i < rs.size(); ++i) {
    const Result& r = rs[i];
    std::fprintf(f,
                 "%s\n    {\"workload\": \"%s\", \"mode\": \"%s\", \"size\": %zu, "
                 "\"threads\": %d, \"ops\": %" PRIu64
                 ", \"seconds\": %.6f, \"ops_per_s\": %.1f, \"gb_per_s\": %.6f, "
                 "\"p50_us\": %.3f, \"p99_us\": %.3f, \"hit_rate\": %.6f, "
                 "\"registrations\": %" PRIu64 ", \"register_ms\": %.3f, "
                 "\"invalidations\": %" PRIu64 ", \"evictions\": %" PRIu64 "}",
                 i ? "," : "", r.workload.c_str(), r.mode.c_str(), r.size, r.threads, r.ops,
                 r.seconds, r.ops_per_s, r.gb_per_s, r.p50_us, r.p99_us, r.hit_rate,
                 r.registrations, r.register_ms, r.invalidations, r.evictions);
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
    std::fprintf(f, "%s,%s,%zu,%d,%" PRIu64 ",%.6f,%.1f,%.6f,%.3f,%.3f,%.6f,%" PRIu64
                    ",%.3f,%" PRIu64 ",%" PRIu64 "\n",
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
      "set title 'sanreg_bench: ", WorkloadTitle(workload), ", ", provider, "' noenhanced\n",
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
      "Usage: sanreg_bench [--fabric=shm|tcp|auto] [--sizes=4KiB,1MiB] [--ops=N|--duration=S] "
      "[--threads=N] [--workload=reuse,churn,evict] [--mode=nocache,cache,prereg] "
      "[--json=FILE] [--csv=FILE]");
  tools::PrecheckArgs("sanreg_bench", argc, argv);
  absl::ParseCommandLine(argc, argv);
  Config config = ValidatedConfig();

  size_t max_size = *std::max_element(config.sizes.begin(), config.sizes.end());
  int max_threads = 1;
  for (const std::string& w : config.workloads) max_threads = std::max(max_threads, ThreadsFor(config, w));
  size_t region_bytes = ((max_size * max_threads) + 4095) & ~size_t{4095};

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
  FabricOptions o;
  o.provider = provider;
  o.apply_env = false;
  auto fabric = Fabric::Open(o);
  if (!fabric.ok()) return fail(fabric.status().ToString());
  auto ep = (*fabric)->Connect(absl::StrCat("127.0.0.1:", port));
  if (!ep.ok()) return fail(ep.status().ToString());
  std::array<uint8_t, RemoteRegion::kWireSize> wire;
  if (!ReadFull(up[0], wire.data(), wire.size())) return fail("the target failed to expose");
  auto region = RemoteRegion::Parse(wire);
  if (!region.ok()) return fail(region.status().ToString());

  std::printf("sanreg_bench: provider %s, %d initiator thread(s), target pid %d; %s per run\n",
              (*fabric)->provider_name().c_str(), config.threads, int(child),
              config.duration > 0 ? absl::StrFormat("%.2f s", config.duration).c_str()
                                  : absl::StrCat(config.ops, " ops").c_str());
  std::fflush(stdout);
  Bench bench(config, fabric->get(), ep->get(), *region);
  std::vector<Result> results;
  // Warm up (first faults of the target region, the provider's first connection use): one short
  // run, not reported.
  {
    Config warm = config;
    warm.ops = 200;
    warm.duration = 0;
    warm.progress = false;
    Bench warm_bench(warm, fabric->get(), ep->get(), *region);
    auto r = warm_bench.Run("reuse", "prereg", *std::min_element(config.sizes.begin(),
                                                                 config.sizes.end()),
                            "warm-up");
    if (!r.ok()) return fail(absl::StrCat("warm-up: ", r.status().ToString()));
  }
  const int64_t start = NowNs();
  for (const std::string& w : config.workloads) {
    for (size_t s : config.sizes) {
      std::vector<std::vector<Result>> runs;  // per mode, every run
      for (int rep = 0; rep < config.repeat; ++rep) {
        size_t k = 0;
        for (const std::string& m : config.modes) {
          if (w == "churn" && m == "prereg") continue;  // fresh buffers cannot be registered early
          std::string label = absl::StrCat(w, " ", SizeName(s), " ", m, " (run ", rep + 1, "/",
                                           config.repeat, ")");
          auto r = bench.Run(w, m, s, label);
          if (!r.ok()) return fail(absl::StrCat(label, ": ", r.status().ToString()));
          if (rep == 0) runs.emplace_back();
          runs[k++].push_back(*r);
        }
      }
      // The run with the median throughput (the machine is shared: the median is what a run
      // typically sees, where the best would favour whichever mode got luckier).
      for (auto& v : runs) {
        std::sort(v.begin(), v.end(),
                  [](const Result& a, const Result& b) { return a.ops_per_s < b.ops_per_s; });
        results.push_back(v[v.size() / 2]);
      }
    }
    PrintTable(w, config, results);
    std::fflush(stdout);
  }
  const double elapsed = (NowNs() - start) / 1e9;
  std::printf("\ndone in %.1f s\n", elapsed);

  ep->reset();
  close(down[1]);
  int st = 0;
  waitpid(child, &st, 0);
  fabric->reset();
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
