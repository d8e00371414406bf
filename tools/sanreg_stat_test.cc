// sanreg_stat_test.cc: starts stat_probe (a process holding three known registrations) and checks
// that `sanreg_stat --json PID` reports exactly them, that the listing names the process, that a
// process gone is reported as such, and that bad flags exit 2.

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "tools/internal/json_reader.h"
#include "tools/internal/run_tool.h"

namespace sanreg {
namespace {

using tools::Json;
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
  // Waits for "ready <pid>". Returns false when the probe failed.
  bool WaitReady() {
    char line[64] = {};
    if (out_ == nullptr || fgets(line, sizeof line, out_) == nullptr) return false;
    return std::string(line) == "ready " + std::to_string(pid_) + "\n";
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

 private:
  pid_t pid_ = -1;
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
  EXPECT_EQ(c.at("registrations").num(), 3);
  EXPECT_EQ(c.at("regions").num(), 3);
  EXPECT_EQ(c.at("pinned_bytes").num(), 7 * page);
  EXPECT_EQ(c.at("pinned_bytes_high_water").num(), 7 * page);
  EXPECT_EQ(c.at("hits").num(), 1);
  EXPECT_EQ(c.at("misses").num(), 3);
  EXPECT_EQ(c.at("misses_absent").num(), 3);
  EXPECT_EQ(c.at("deregistrations").num(), 0);
  EXPECT_EQ(c.at("evictions").num(), 0);
  EXPECT_DOUBLE_EQ(c.at("hit_rate").num(), 0.25);
  double in_histogram = 0;
  for (const Json& b : c.at("registration_latency_ns").arr()) in_histogram += b.num();
  EXPECT_EQ(in_histogram, 3);

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
    EXPECT_EQ(p.obj().at("pinned_bytes").num(), 7 * page);
  }
  EXPECT_EQ(found, 1) << r.out;

  // Human-readable form.
  r = RunTool("sanreg_stat", {std::to_string(probe.pid())});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("28.0 KiB"), std::string::npos) << r.out;

  // Once the probe has exited, its segment is gone and sanreg_stat says so.
  const pid_t gone = probe.pid();
  ASSERT_EQ(probe.Finish(), 0);
  r = RunTool("sanreg_stat", {"--json", std::to_string(gone)});
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.err.find("no sanreg statistics"), std::string::npos) << r.err;
}

TEST(SanregStatTest, BadFlagsExitTwoWithOneLine) {
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"--nope"}, {"--watch=soon"}, {"notapid"}, {"1", "2"}, {"--count=-1"}}) {
    RunResult r = RunTool("sanreg_stat", args);
    SCOPED_TRACE(args[0]);
    EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
}

}  // namespace
}  // namespace sanreg
