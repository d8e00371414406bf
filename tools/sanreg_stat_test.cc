// sanreg_stat_test.cc: starts stat_probe (a process holding four known registrations) and checks
// that `sanreg_stat --json PID` reports exactly their counters and `sanreg_stat --json --regions
// PID` exactly the regions (addresses, lengths, rights, references, states), that the listing names
// the process, that a process gone is reported as such, and that bad flags exit 2.

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "tools/internal/json_reader.h"
#include "tools/internal/run_tool.h"

namespace sanreg {
namespace {

using tools::Json;
using tools::JsonArray;
using tools::JsonObject;
using tools::JsonReader;
using tools::RunResult;
using tools::RunTool;
using tools::ToolPath;

// The probe, with a pipe to its stdin (closing it ends the probe) and one from its stdout.
class Probe {
 public:
  Probe() {
    int in[2], out[2];
    if (pipe(in) != 0 || pipe(out) != 0) return;
    pid_ = fork();
    if (pid_ == 0) {
      dup2(in[0], 0);
      dup2(out[1], 1);
      close(in[1]);
      close(out[0]);
      std::string path = ToolPath("stat_probe");
      execl(path.c_str(), path.c_str(), nullptr);
      _exit(127);
    }
    close(in[0]);
    close(out[1]);
    stdin_ = in[1];
    out_ = fdopen(out[0], "r");
  }
  // Waits for "ready <pid> <arena>". Returns false when the probe failed.
  bool WaitReady() {
    char line[96] = {};
    if (out_ == nullptr || fgets(line, sizeof line, out_) == nullptr) return false;
    std::istringstream in(line);
    std::string word;
    long pid = 0;
    in >> word >> pid >> arena_;
    return word == "ready" && pid == pid_ && arena_ != 0;
  }
  // Ends the probe; returns its exit code.
  int Finish() {
    if (stdin_ >= 0) close(stdin_);
    stdin_ = -1;
    int st = 0;
    if (pid_ > 0 && waitpid(pid_, &st, 0) == pid_) {
      pid_ = -pid_;
      return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    }
    return -1;
  }
  ~Probe() {
    Finish();
    if (out_ != nullptr) fclose(out_);
  }
  pid_t pid() const { return pid_ > 0 ? pid_ : -pid_; }
  // The address of the probe's 32-page arena.
  uint64_t arena() const { return arena_; }

 private:
  pid_t pid_ = -1;
  uint64_t arena_ = 0;
  int stdin_ = -1;
  FILE* out_ = nullptr;
};

Json ParseOrFail(const std::string& text) {
  Json j;
  EXPECT_TRUE(JsonReader(text).Read(&j)) << text;
  return j;
}

TEST(SanregStatTest, ReportsExactlyTheRegistrationsALiveProcessHolds) {
  Probe probe;
  ASSERT_TRUE(probe.WaitReady());
  const long page = sysconf(_SC_PAGESIZE);

  RunResult r = RunTool("sanreg_stat", {"--json", std::to_string(probe.pid())});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  Json doc = ParseOrFail(r.out);
  const JsonObject& top = doc.obj();
  EXPECT_EQ(top.at("pid").num(), probe.pid());
  EXPECT_EQ(top.at("command").str(), "stat_probe");
  ASSERT_EQ(top.at("caches").arr().size(), 1u) << r.out;
  const JsonObject& c = top.at("caches").arr()[0].obj();
  EXPECT_EQ(c.at("registrations").num(), 4);
  EXPECT_EQ(c.at("regions").num(), 3);  // the invalidated one is out of the index
  EXPECT_EQ(c.at("pinned_bytes").num(), 8 * page);
  EXPECT_EQ(c.at("pinned_bytes_high_water").num(), 8 * page);
  EXPECT_EQ(c.at("hits").num(), 1);
  EXPECT_EQ(c.at("misses").num(), 4);
  EXPECT_EQ(c.at("misses_absent").num(), 4);
  EXPECT_EQ(c.at("invalidations").num(), 1);
  EXPECT_EQ(c.at("deregistrations").num(), 0);
  EXPECT_EQ(c.at("evictions").num(), 0);
  EXPECT_DOUBLE_EQ(c.at("hit_rate").num(), 0.2);
  double in_histogram = 0;
  for (const Json& b : c.at("registration_latency_ns").arr()) in_histogram += b.num();
  EXPECT_EQ(in_histogram, 4);
  const double cache_id = c.at("cache").num();

  // The regions, exactly: by address in the index, then the invalidated one still referenced.
  r = RunTool("sanreg_stat", {"--json", "--regions", std::to_string(probe.pid())});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  doc = ParseOrFail(r.out);
  EXPECT_EQ(doc.obj().at("pid").num(), probe.pid());
  ASSERT_EQ(doc.obj().at("caches").arr().size(), 1u) << r.out;
  const JsonObject& rc = doc.obj().at("caches").arr()[0].obj();
  EXPECT_EQ(rc.at("cache").num(), cache_id);
  EXPECT_EQ(rc.at("total").num(), 4);
  EXPECT_EQ(rc.at("left_out").num(), 0);
  struct Want {
    uint64_t page, pages;
    double access;
    std::string rights;
    double references;
    std::string state;
  };
  const std::vector<Want> wants = {
      {0, 1, 1, "local_read", 2, "active"},
      {8, 2, 1, "local_read", 0, "idle"},
      {16, 4, 3, "local_read+local_write", 1, "active"},
      {24, 1, 1, "local_read", 1, "invalidated"},
  };
  const JsonArray& regions = rc.at("regions").arr();
  ASSERT_EQ(regions.size(), wants.size()) << r.out;
  for (size_t i = 0; i < wants.size(); ++i) {
    SCOPED_TRACE(i);
    const JsonObject& g = regions[i].obj();
    EXPECT_EQ(g.at("start").num(), static_cast<double>(probe.arena() + wants[i].page * page));
    EXPECT_EQ(g.at("length").num(), static_cast<double>(wants[i].pages * page));
    EXPECT_EQ(g.at("access").num(), wants[i].access);
    EXPECT_EQ(g.at("rights").str(), wants[i].rights);
    EXPECT_EQ(g.at("references").num(), wants[i].references);
    EXPECT_EQ(g.at("state").str(), wants[i].state);
    EXPECT_GT(g.at("age_ns").num(), 0);
    if (wants[i].references == 0) {
      EXPECT_GT(g.at("idle_ns").num(), 0);
      EXPECT_LE(g.at("idle_ns").num(), g.at("age_ns").num());
    } else {
      EXPECT_EQ(g.at("idle_ns").num(), 0);
    }
  }

  // The same as a table.
  r = RunTool("sanreg_stat", {"--regions", std::to_string(probe.pid())});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("4 region(s)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("local_read+local_write"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("invalidated"), std::string::npos) << r.out;
  char first[32];
  std::snprintf(first, sizeof first, "0x%016llx", static_cast<unsigned long long>(probe.arena()));
  EXPECT_NE(r.out.find(first), std::string::npos) << r.out;

  // The listing names the probe with the same totals.
  r = RunTool("sanreg_stat", {"--json"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  doc = ParseOrFail(r.out);
  int found = 0;
  for (const Json& p : doc.obj().at("processes").arr()) {
    if (p.obj().at("pid").num() != probe.pid()) continue;
    ++found;
    EXPECT_EQ(p.obj().at("caches").num(), 1);
    EXPECT_EQ(p.obj().at("regions").num(), 3);
    EXPECT_EQ(p.obj().at("pinned_bytes").num(), 8 * page);
  }
  EXPECT_EQ(found, 1) << r.out;

  // Human-readable form.
  r = RunTool("sanreg_stat", {std::to_string(probe.pid())});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("32.0 KiB"), std::string::npos) << r.out;

  // Once the probe has exited, its segment is gone and sanreg_stat says so.
  const pid_t gone = probe.pid();
  ASSERT_EQ(probe.Finish(), 0);
  r = RunTool("sanreg_stat", {"--json", std::to_string(gone)});
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.err.find("no sanreg statistics"), std::string::npos) << r.err;
  r = RunTool("sanreg_stat", {"--regions", std::to_string(gone)});
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.err.find("no sanreg statistics"), std::string::npos) << r.err;
}

TEST(SanregStatTest, BadFlagsExitTwoWithOneLine) {
  for (const std::vector<std::string>& args :
       std::vector<std::vector<std::string>>{{"--nope"},
                                             {"--watch=soon"},
                                             {"notapid"},
                                             {"1", "2"},
                                             {"--count=-1"},
                                             {"--regions"},
                                             {"--regions=maybe", "1"}}) {
    RunResult r = RunTool("sanreg_stat", args);
    SCOPED_TRACE(args[0]);
    EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
}

}  // namespace
}  // namespace sanreg
