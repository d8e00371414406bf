// sanreg_bench_test.cc: runs the sanreg_bench binary (a data dependency) on a tiny workload,
// through the C++ API and through the SPI, and checks its JSON output field by field, and that bad
// flags exit 2 with one line on stderr.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <set>
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
using tools::Slurp;
using tools::TmpDir;

RunResult RunBench(const std::vector<std::string>& args) { return RunTool("sanreg_bench", args); }

// Checks the JSON of a run of every workload and mode at 4 KiB and 64 KiB, kOps operations per
// run, --buffers=4, --cache_regions=2, one thread, through `via`.
void CheckTinyRunJson(const std::string& text, const std::string& via, int kOps) {
  Json doc;
  ASSERT_TRUE(JsonReader(text).Read(&doc)) << text;
  const JsonObject& top = doc.obj();
  ASSERT_TRUE(top.count("provider") && top.at("provider").is_string());
  EXPECT_TRUE(top.at("provider").str() == "shm" || top.at("provider").str() == "tcp");
  ASSERT_TRUE(top.count("via") && top.at("via").is_string());
  EXPECT_EQ(top.at("via").str(), via);
  EXPECT_EQ(top.at("threads").num(), 1);
  const JsonArray& results = top.at("results").arr();
  // reuse, window, zipf, evict and threads in three modes, churn in two (no prereg), two sizes.
  ASSERT_EQ(results.size(), 34u) << text;

  std::set<std::string> seen;
  const std::vector<std::string> kNumbers = {
      "size",        "threads",       "ops",       "seconds",  "ops_per_s",
      "gb_per_s",    "p50_us",        "p99_us",    "hit_rate", "registrations",
      "register_ms", "invalidations", "evictions", "to_prereg"};
  // workload/size -> mode -> {ops_per_s, to_prereg}, for the ratios to prereg below.
  std::map<std::string, std::map<std::string, std::pair<double, double>>> by_row;
  for (const Json& j : results) {
    const JsonObject& o = j.obj();
    const std::string w = o.at("workload").str();
    const std::string m = o.at("mode").str();
    for (const std::string& k : kNumbers) {
      ASSERT_TRUE(o.count(k) && o.at(k).is_number()) << w << " " << m << " lacks " << k;
    }
    SCOPED_TRACE(w + " " + m + " " + std::to_string(o.at("size").num()));
    seen.insert(w + "/" + m);
    by_row[w + "/" + std::to_string(o.at("size").num())][m] = {o.at("ops_per_s").num(),
                                                               o.at("to_prereg").num()};
    const double size = o.at("size").num();
    // The threads workload is buffer reuse on four threads, each with its own four buffers.
    const int threads = w == "threads" ? 4 : 1;
    EXPECT_EQ(o.at("threads").num(), threads);
    EXPECT_TRUE(size == 4096 || size == 65536);
    EXPECT_EQ(o.at("ops").num(), kOps);
    EXPECT_GT(o.at("seconds").num(), 0);
    EXPECT_NEAR(o.at("ops_per_s").num(), kOps / o.at("seconds").num(),
                0.01 * o.at("ops_per_s").num());
    if (w == "zipf") {  // lengths of 1 page up to the size
      EXPECT_LE(o.at("gb_per_s").num(), o.at("ops_per_s").num() * size / 1e9 * 1.01);
      EXPECT_GE(o.at("gb_per_s").num(), o.at("ops_per_s").num() * 4096 / 1e9 * 0.99);
    } else {
      EXPECT_NEAR(o.at("gb_per_s").num(), o.at("ops_per_s").num() * size / 1e9,
                  0.01 * o.at("gb_per_s").num() + 1e-6);
    }
    EXPECT_GT(o.at("p50_us").num(), 0);
    EXPECT_GE(o.at("p99_us").num(), o.at("p50_us").num());
    const double hit = o.at("hit_rate").num();
    const double regs = o.at("registrations").num();
    const double invalidations = o.at("invalidations").num();
    EXPECT_GE(o.at("register_ms").num(), 0);
    // reuse, threads and zipf first use each buffer once before the clock (the warm-up): those
    // operations count in the registrations, not in ops nor in the hit rate.
    const double warm = (w == "reuse" || w == "threads" || w == "zipf") ? 4.0 * threads : 0;
    if (m == "nocache") {
      EXPECT_EQ(hit, 0);
      EXPECT_EQ(regs, kOps + warm);  // one registration per operation
      // Through the SPI, each buffer is dropped from its cache after every operation
      // (WSPMemoryRegistrationCacheCallback); the C++ path has no cache to drop it from.
      EXPECT_EQ(invalidations, via == "spi" ? kOps + warm : 0);
    } else if (m == "prereg") {
      EXPECT_EQ(hit, 1);
      // reuse, zipf: --buffers; evict: 2 x --cache_regions; window: one arena; per thread.
      EXPECT_EQ(regs, (w == "window" ? 1 : 4) * threads);
      EXPECT_EQ(invalidations, 0);
    } else if (w == "reuse" || w == "threads") {
      // Four buffers a thread: the first use of each (in the warm-up) misses, every measured
      // operation hits.
      EXPECT_EQ(regs, 4 * threads);
      EXPECT_EQ(hit, 1);
      EXPECT_EQ(invalidations, 0);
    } else if (w == "window") {
      // 4 KiB windows step by a page over 16 pages: 16 first uses, then hits; 64 KiB windows
      // overlap their predecessors, so some misses replace (merge) what is registered.
      EXPECT_GE(regs, 1);
      EXPECT_LT(regs, kOps);
      if (size == 4096) EXPECT_EQ(regs, 16);
      EXPECT_GT(hit, 0);
    } else if (w == "zipf") {
      // Four buffers; a longer length than registered so far misses (and grows the region).
      EXPECT_GE(regs, 4);
      EXPECT_LT(regs, kOps);
      if (size == 4096) EXPECT_EQ(hit, 1);
    } else if (w == "churn") {
      // A fresh mapping each time: every lookup misses, and the unmaps invalidated regions
      // (through the SPI, the switch's WSPMemoryRegistrationCacheCallback before each munmap).
      EXPECT_EQ(regs, kOps);
      EXPECT_EQ(hit, 0);
      if (via == "spi") {
        EXPECT_EQ(invalidations, kOps);
      } else {
        EXPECT_GT(invalidations, 0);
      }
    } else {
      // Four buffers, a limit of two regions: some misses evict, some lookups hit.
      EXPECT_GT(o.at("evictions").num(), 0);
      EXPECT_GT(regs, 4);
      EXPECT_LT(hit, 1);
      EXPECT_NEAR(regs, kOps * (1 - hit), 1e-6);  // every miss registers
    }
  }
  // One run per mode (--repeat=1): each mode's ratio to prereg is its run's over prereg's; prereg's
  // own, and churn's (no prereg), are 0.
  for (const auto& [row, modes] : by_row) {
    SCOPED_TRACE(row);
    const auto p = modes.find("prereg");
    for (const auto& [m, v] : modes) {
      if (m == "prereg" || p == modes.end()) {
        EXPECT_EQ(v.second, 0) << m;
      } else {
        EXPECT_NEAR(v.second, v.first / p->second.first, 1e-4 * v.second) << m;
      }
    }
  }
  EXPECT_EQ(seen, (std::set<std::string>{
                      "reuse/nocache", "reuse/cache", "reuse/prereg", "window/nocache",
                      "window/cache", "window/prereg", "zipf/nocache", "zipf/cache", "zipf/prereg",
                      "threads/nocache", "threads/cache", "threads/prereg", "churn/nocache",
                      "churn/cache", "evict/nocache", "evict/cache", "evict/prereg"}));
}

TEST(SanregBenchTest, TinyRunWritesJsonWithEveryFieldAndSaneValues) {
  const std::string json_path = TmpDir() + "/bench.json";
  const std::string csv_path = TmpDir() + "/bench.csv";
  const std::string png_path = TmpDir() + "/bench.png";
  const int kOps = 40;
  RunResult r = RunBench({"--sizes=4KiB,64KiB", "--ops=" + std::to_string(kOps), "--repeat=1",
                          "--buffers=4", "--cache_regions=2", "--json=" + json_path,
                          "--csv=" + csv_path, "--plot=" + png_path});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("buffer reuse"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("ops/s"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(" via cpp,"), std::string::npos) << r.out;
  CheckTinyRunJson(Slurp(json_path), "cpp", kOps);

  // The plot is a PNG (gnuplot, from tools/setup.sh).
  EXPECT_EQ(Slurp(png_path).substr(0, 4), "\x89PNG");

  // The CSV holds the same rows: a header and one line per result.
  std::string csv = Slurp(csv_path);
  EXPECT_EQ(csv.rfind("workload,mode,size,", 0), 0u) << csv;
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 35);
}

TEST(SanregBenchTest, TinyRunThroughTheSpiWritesTheSameJson) {
  const std::string json_path = TmpDir() + "/bench_spi.json";
  const int kOps = 40;
  RunResult r = RunBench({"--via=spi", "--sizes=4KiB,64KiB", "--ops=" + std::to_string(kOps),
                          "--repeat=1", "--buffers=4", "--cache_regions=2", "--json=" + json_path});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("buffer reuse"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(" via spi,"), std::string::npos) << r.out;
  CheckTinyRunJson(Slurp(json_path), "spi", kOps);
}

TEST(SanregBenchTest, BadFlagsExitTwoWithOneLine) {
  for (const std::vector<std::string>& args :
       std::vector<std::vector<std::string>>{{"--no_such_flag"},
                                             {"--ops=many"},
                                             {"--sizes=4KiB,0"},
                                             {"--mode=fast"},
                                             {"--workload=reuse,nope"},
                                             {"--fabric=ib"},
                                             {"--threads=0"},
                                             {"--via=rpc"},
                                             {"--via=spi", "--sizes=32MiB"},
                                             {"--via=spi", "--fabric=verbs"},
                                             {"--plot=out.svg"},
                                             {"stray"}}) {
    RunResult r = RunBench(args);
    SCOPED_TRACE(args[0]);
    EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_EQ(r.err.rfind("sanreg_bench: ", 0), 0u) << r.err;
    EXPECT_TRUE(r.out.empty()) << r.out;
  }
}

// The build machines have no RDMA device: --fabric=verbs says so in one line and fails.
TEST(SanregBenchTest, VerbsWithoutADeviceSaysSoPlainly) {
  RunResult r = RunBench({"--fabric=verbs", "--ops=10"});
  if (r.exit_code == 0) GTEST_SKIP() << "this machine has an RDMA device";
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  EXPECT_EQ(r.err, "sanreg_bench: --fabric=verbs: no RDMA device found\n");
  EXPECT_TRUE(r.out.empty()) << r.out;
}

TEST(SanregBenchTest, HelpDescribesTheFlags) {
  RunResult r = RunBench({"--help"});
  std::string all = r.out + r.err;
  for (const char* flag : {"--fabric", "--sizes", "--ops", "--duration", "--threads", "--workload",
                           "--mode", "--via", "--json", "--csv", "--plot"}) {
    EXPECT_NE(all.find(std::string(flag).substr(2)), std::string::npos) << flag;
  }
}

}  // namespace
}  // namespace sanreg
