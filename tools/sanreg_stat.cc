// sanreg_stat: what live processes using sanreg have registered, from their statistics segments.
//
//   sanreg_stat             lists the processes with a segment (dead processes' are removed)
//   sanreg_stat PID         counters, pinned bytes and high-water mark, hit rate, the registration
//                           latency histogram and the memory-event sources of each cache of PID
//   --regions PID           each cache's regions: start, length, rights, references, state, age
//                           (the first 4096 per cache, and how many were left out); the process
//                           lists them when asked, within about 0.1 s
//   --json                  the same as JSON; --watch=S refreshes every S seconds (--count=N times)
//
// A process is read only when the segment's permissions allow (it is 0600: its owner, or root).
// Exit codes: 0 shown, 1 no such process or segment (or not readable, or no answer to --regions),
// 2 bad flags.

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "regcache/stats_segment.h"
#include "tools/internal/cli.h"

ABSL_FLAG(bool, json, false, "print JSON");
ABSL_FLAG(bool, regions, false,
          "with a PID: list each cache's regions (start, length, rights, references, state, age)");
ABSL_FLAG(double, watch, 0, "refresh every this many seconds (0: print once)");
ABSL_FLAG(int32_t, count, 0, "with --watch: stop after this many refreshes (0: until killed)");

namespace sanreg {
namespace {

[[noreturn]] void Usage(const std::string& msg) { tools::UsageError("sanreg_stat", msg); }

std::string Comm(pid_t pid) {
  std::ifstream f(absl::StrCat("/proc/", pid, "/comm"));
  std::string s;
  std::getline(f, s);
  return s.empty() ? "?" : s;
}

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      out += ' ';
    } else {
      out += c;
    }
  }
  return out + "\"";
}

double HitRate(const CacheStats& s) {
  uint64_t lookups = s.hits + s.misses();
  return lookups ? double(s.hits) / double(lookups) : 0;
}

std::string Bytes(uint64_t b) {
  if (b >= (uint64_t{1} << 30)) return absl::StrFormat("%.1f GiB", b / double(1 << 30));
  if (b >= (uint64_t{1} << 20)) return absl::StrFormat("%.1f MiB", b / double(1 << 20));
  if (b >= 1024) return absl::StrFormat("%.1f KiB", b / 1024.0);
  return absl::StrCat(b, " B");
}

int List(bool json) {
  std::vector<pid_t> pids = ListStatsSegments();
  if (json)
    std::printf("{\"processes\": [");
  else
    std::printf("%-8s %-16s %6s %8s %12s %7s\n", "PID", "COMMAND", "caches", "regions", "pinned",
                "hit%");
  bool first = true;
  for (pid_t pid : pids) {
    auto ps = ReadStatsSegment(pid);
    uint64_t regions = 0, pinned = 0, hits = 0, lookups = 0;
    size_t caches = 0;
    if (ps.ok()) {
      caches = ps->caches.size();
      for (const auto& [id, s] : ps->caches) {
        regions += s.regions;
        pinned += s.pinned_bytes;
        hits += s.hits;
        lookups += s.hits + s.misses();
      }
    }
    double hit = lookups ? double(hits) / lookups : 0;
    if (json) {
      std::printf(
          "%s\n  {\"pid\": %d, \"command\": %s, \"readable\": %s, \"caches\": %zu, "
          "\"regions\": %" PRIu64 ", \"pinned_bytes\": %" PRIu64 ", \"hit_rate\": %.6f}",
          first ? "" : ",", int(pid), JsonString(Comm(pid)).c_str(), ps.ok() ? "true" : "false",
          caches, regions, pinned, hit);
    } else if (ps.ok()) {
      std::printf("%-8d %-16s %6zu %8" PRIu64 " %12s %7.1f\n", int(pid), Comm(pid).c_str(), caches,
                  regions, Bytes(pinned).c_str(), hit * 100);
    } else {
      std::printf("%-8d %-16s (%s)\n", int(pid), Comm(pid).c_str(),
                  std::string(ps.status().message()).c_str());
    }
    first = false;
  }
  if (json)
    std::printf("\n]}\n");
  else if (pids.empty())
    std::printf("(no process publishes sanreg statistics)\n");
  return 0;
}

int Show(pid_t pid, bool json) {
  auto ps = ReadStatsSegment(pid);
  if (!ps.ok()) {
    std::fprintf(stderr, "sanreg_stat: %s\n", std::string(ps.status().message()).c_str());
    return 1;
  }
  const char* const* names = PublishedCounterNames();
  if (json) {
    std::printf("{\"pid\": %d, \"command\": %s, \"published_ns\": %" PRIu64 ", \"caches\": [",
                int(pid), JsonString(Comm(pid)).c_str(), ps->published_ns);
  } else {
    std::printf("pid %d (%s): %zu cache(s)\n", int(pid), Comm(pid).c_str(), ps->caches.size());
  }
  bool first = true;
  for (const auto& [id, s] : ps->caches) {
    PublishedStats p = ToPublished(id, s);
    if (json) {
      std::printf("%s\n  {\"cache\": %" PRIu64, first ? "" : ",", id);
      for (int i = 0; i < PublishedStats::kCounters; ++i) {
        std::printf(", \"%s\": %" PRIu64, names[i], p.counters[i]);
      }
      std::printf(", \"misses\": %" PRIu64 ", \"hit_rate\": %.6f", s.misses(), HitRate(s));
      std::printf(", \"monitor_hooks\": %s, \"monitor_uffd\": %s, \"monitor_notes\": %s",
                  s.monitor_hooks ? "true" : "false", s.monitor_uffd ? "true" : "false",
                  JsonString(s.monitor_notes).c_str());
      std::printf(", \"registration_latency_ns\": [");
      for (int i = 0; i < CacheStats::kLatencyBuckets; ++i) {
        std::printf("%s%" PRIu64, i ? ", " : "", s.registration_latency[i]);
      }
      std::printf("]}");
    } else {
      std::printf("\ncache %" PRIu64 "\n", id);
      std::printf("  pinned %s (high-water %s) in %" PRIu64 " regions; hit rate %.1f%%\n",
                  Bytes(s.pinned_bytes).c_str(), Bytes(s.pinned_bytes_high_water).c_str(),
                  s.regions, HitRate(s) * 100);
      std::printf("  memory events from: %s%s%s%s\n", s.monitor_hooks ? "hooks " : "",
                  s.monitor_uffd ? "userfaultfd " : "",
                  !s.monitor_hooks && !s.monitor_uffd ? "none " : "",
                  s.monitor_notes.empty() ? "" : ("(" + s.monitor_notes + ")").c_str());
      for (int i = 0; i < PublishedStats::kCounters; ++i) {
        std::printf("  %-24s %12" PRIu64 "\n", names[i], p.counters[i]);
      }
      std::printf("  registration latency:\n");
      for (int i = 0; i < CacheStats::kLatencyBuckets; ++i) {
        if (s.registration_latency[i] == 0) continue;
        std::printf("    [%9.1f us, %9.1f us) %10" PRIu64 "\n", (i ? (1ull << i) : 0) / 1e3,
                    (1ull << (i + 1)) / 1e3, s.registration_latency[i]);
      }
    }
    first = false;
  }
  if (json) std::printf("\n]}\n");
  return 0;
}

const char* StateName(RegionInfo::State s) {
  switch (s) {
    case RegionInfo::State::kActive:
      return "active";
    case RegionInfo::State::kIdle:
      return "idle";
    case RegionInfo::State::kInvalidated:
      return "invalidated";
    case RegionInfo::State::kRetired:
      return "retired";
  }
  return "?";
}

// "local_read+remote_write", from Access bits.
std::string Rights(uint32_t access) {
  std::string out;
  const std::pair<uint32_t, const char*> kNames[] = {{kAccessLocalRead, "local_read"},
                                                     {kAccessLocalWrite, "local_write"},
                                                     {kAccessRemoteRead, "remote_read"},
                                                     {kAccessRemoteWrite, "remote_write"}};
  for (const auto& [bit, name] : kNames) {
    if (access & bit) absl::StrAppend(&out, out.empty() ? "" : "+", name);
  }
  return out.empty() ? "none" : out;
}

std::string Seconds(uint64_t ns) {
  double s = ns / 1e9;
  if (s < 60) return absl::StrFormat("%.1f s", s);
  if (s < 3600) return absl::StrFormat("%.1f min", s / 60);
  return absl::StrFormat("%.1f h", s / 3600);
}

int ShowRegions(pid_t pid, bool json) {
  auto pr = ReadRegions(pid, std::chrono::seconds(2));
  if (!pr.ok()) {
    std::fprintf(stderr, "sanreg_stat: %s\n", std::string(pr.status().message()).c_str());
    return 1;
  }
  if (json) {
    std::printf("{\"pid\": %d, \"command\": %s, \"published_ns\": %" PRIu64 ", \"caches\": [",
                int(pid), JsonString(Comm(pid)).c_str(), pr->published_ns);
  } else {
    std::printf("pid %d (%s): %zu cache(s)\n", int(pid), Comm(pid).c_str(), pr->caches.size());
  }
  bool first = true;
  for (const CacheRegions& c : pr->caches) {
    const uint64_t left_out = c.total - c.regions.size();
    if (json) {
      std::printf("%s\n  {\"cache\": %" PRIu64 ", \"total\": %" PRIu64 ", \"left_out\": %" PRIu64
                  ", \"regions\": [",
                  first ? "" : ",", c.cache_id, c.total, left_out);
      for (size_t i = 0; i < c.regions.size(); ++i) {
        const RegionInfo& r = c.regions[i];
        std::printf("%s\n    {\"start\": %" PRIu64 ", \"length\": %" PRIu64
                    ", \"access\": %u, \"rights\": \"%s\", \"references\": %u, \"state\": \"%s\", "
                    "\"age_ns\": %" PRIu64 ", \"idle_ns\": %" PRIu64 "}",
                    i ? "," : "", uint64_t{r.start}, uint64_t{r.length}, r.access,
                    Rights(r.access).c_str(), r.references, StateName(r.state), r.age_ns,
                    r.idle_ns);
      }
      std::printf("%s]}", c.regions.empty() ? "" : "\n  ");
    } else {
      std::printf("\ncache %" PRIu64 ": %" PRIu64 " region(s)\n", c.cache_id, c.total);
      if (!c.regions.empty()) {
        std::printf("  %-18s %10s  %-24s %5s  %-11s %9s %9s\n", "start", "length", "rights", "refs",
                    "state", "age", "idle");
      }
      for (const RegionInfo& r : c.regions) {
        std::printf("  0x%016" PRIxPTR " %10s  %-24s %5u  %-11s %9s %9s\n", r.start,
                    Bytes(r.length).c_str(), Rights(r.access).c_str(), r.references,
                    StateName(r.state), Seconds(r.age_ns).c_str(),
                    r.references ? "-" : Seconds(r.idle_ns).c_str());
      }
      if (left_out > 0) {
        std::printf("  ... and %" PRIu64 " more (the first %zu are listed)\n", left_out,
                    c.regions.size());
      }
    }
    first = false;
  }
  if (json) std::printf("\n]}\n");
  return 0;
}

int Main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "what live processes using sanreg have registered.\n"
      "Usage: sanreg_stat [--json] [--watch=S [--count=N]] [[--regions] PID]");
  tools::PrecheckArgs("sanreg_stat", argc, argv, /*positional_ok=*/true);
  std::vector<char*> rest = absl::ParseCommandLine(argc, argv);
  if (rest.size() > 2) Usage("at most one PID");
  pid_t pid = 0;
  if (rest.size() == 2) {
    int v;
    if (!absl::SimpleAtoi(rest[1], &v) || v <= 0) {
      Usage(absl::StrCat("bad PID '", rest[1], "'"));
    }
    pid = v;
  }
  const bool json = absl::GetFlag(FLAGS_json);
  const bool regions = absl::GetFlag(FLAGS_regions);
  if (regions && pid == 0) Usage("--regions needs a PID");
  const double watch = absl::GetFlag(FLAGS_watch);
  const int count = absl::GetFlag(FLAGS_count);
  if (!(watch >= 0 && watch <= 3600)) Usage("--watch must be 0 to 3600 seconds");
  if (count < 0) Usage("--count must be >= 0");
  for (int n = 0;; ++n) {
    if (watch > 0 && !json && isatty(STDOUT_FILENO)) std::printf("\033[H\033[2J");
    int rc = regions ? ShowRegions(pid, json) : pid ? Show(pid, json) : List(json);
    std::fflush(stdout);
    if (watch <= 0 || rc != 0 || (count > 0 && n + 1 >= count)) return rc;
    std::this_thread::sleep_for(std::chrono::duration<double>(watch));
  }
}

}  // namespace
}  // namespace sanreg

int main(int argc, char** argv) { return sanreg::Main(argc, argv); }
