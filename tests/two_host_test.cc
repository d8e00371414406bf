// two_host_test.cc: the data path across two hosts, emulated by two network namespaces joined by a
// veth pair. A target runs in one namespace and an initiator in the other, over libfabric's tcp
// provider; the initiator reads the target's data and writes its own at several sizes up to 4 MiB,
// and both sides verify the bytes.
//
// Providers: "tcp", and "auto", which must pick tcp for a peer that is not on this host.
//
// Setup (tests/two_hosts.h): namespaces "sanreg_2h_a_<pid>" and "sanreg_2h_b_<pid>" joined by a
// veth pair, deleted after the test, also after a failure. Each side is a child forked from the
// (still single-threaded) test process that enters its namespace before it opens a fabric; the two
// children talk over pipes for the out-of-band bits (the target's port, its region descriptor,
// "done"). The only route between the namespaces is the veth pair, so the data crosses it; the
// test also checks the link's byte counters.
//
// Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and iproute2's `ip`: skipped with a message otherwise.
// Bounded: every pipe read and the wait for the children have deadlines; a stuck child is killed.

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "datapath/endpoint.h"
#include "datapath/fabric.h"
#include "datapath/internal/test_util.h"
#include "regcache/pin_registrar.h"
#include "tests/process_util.h"
#include "tests/two_hosts.h"

namespace sanreg {
namespace {

using testing::Buffer;
using testing::EnterNamespace;

constexpr const char* kAddrA = testing::kHostAddrA;  // the target's namespace
constexpr uint32_t kLocal = kAccessLocalRead | kAccessLocalWrite;
constexpr size_t kHalf = 4 << 20;     // the target's region: [0, kHalf) its data, then ours
constexpr size_t kRegion = 2 * kHalf;
constexpr uint32_t kTargetSeed = 7;
constexpr uint32_t kFinalSeed = 99;
constexpr absl::Duration kStepTimeout = absl::Seconds(30);
constexpr absl::Duration kChildTimeout = absl::Seconds(90);

// Reads exactly `n` bytes from `fd` within `timeout`; false on EOF, error or timeout.
bool ReadFull(int fd, void* p, size_t n, absl::Duration timeout = kStepTimeout) {
  return testing::ReadWithin(fd, p, n, timeout);
}

bool WriteFull(int fd, const void* p, size_t n) { return testing::WriteAll(fd, p, n); }

// The target, in namespace `ns`: listens on kAddrA, sends its port up `out`, accepts, exposes a
// kRegion region whose first half holds pattern kTargetSeed, sends the descriptor, waits for the
// initiator's "done", then checks that the second half holds pattern kFinalSeed.
[[noreturn]] void RunTarget(const std::string& provider, const std::string& ns, int in, int out) {
  const char* role = "target";
  EnterNamespace(ns);
  FabricOptions o;
  o.provider = provider;
  o.apply_env = false;
  auto fabric = Fabric::Open(o);
  CHILD_CHECK(fabric.ok(), 20, "Fabric::Open: %s", fabric.status().ToString().c_str());
  PinRegistrar pin;
  auto reg = (*fabric)->NewRegistrar(&pin);
  auto buf = Buffer::Make(reg.get(), kRegion, kLocal | kAccessRemoteRead | kAccessRemoteWrite);
  CHILD_CHECK(buf.ok(), 21, "Buffer::Make: %s", buf.status().ToString().c_str());
  (*buf)->Fill(kTargetSeed);
  std::memset((*buf)->data() + kHalf, 0, kHalf);
  auto listener = (*fabric)->Listen(absl::StrCat(kAddrA, ":0"));
  CHILD_CHECK(listener.ok(), 22, "Listen: %s", listener.status().ToString().c_str());
  uint16_t port = (*listener)->port();
  CHILD_CHECK(WriteFull(out, &port, sizeof port), 23, "sending the port");
  auto ep = (*listener)->Accept();
  CHILD_CHECK(ep.ok(), 24, "Accept: %s", ep.status().ToString().c_str());
  auto region = (*ep)->Expose((*buf)->reg(), (*buf)->data(), kRegion,
                              kAccessRemoteRead | kAccessRemoteWrite);
  CHILD_CHECK(region.ok(), 25, "Expose: %s", region.status().ToString().c_str());
  std::array<uint8_t, RemoteRegion::kWireSize> wire;
  CHILD_CHECK(region->Serialize(wire).ok() && WriteFull(out, wire.data(), wire.size()), 26,
              "sending the descriptor");
  char done = 0;
  CHILD_CHECK(ReadFull(in, &done, 1, kChildTimeout) && done == 'D', 27,
              "no 'done' from the initiator");
  for (size_t i = 0; i < kHalf; ++i) {
    CHILD_CHECK((*buf)->data()[kHalf + i] == Buffer::Pattern(kFinalSeed, i), 28,
                "byte %zu of the initiator's final write is wrong", i);
  }
  for (size_t i = 0; i < kHalf; ++i) {
    CHILD_CHECK((*buf)->data()[i] == Buffer::Pattern(kTargetSeed, i), 29,
                "byte %zu of the target's own half changed", i);
  }
  (*ep)->Close();
  _exit(0);
}

// The initiator, in namespace `ns`: connects to the target across the veth pair, reads and
// verifies the target's half at several sizes and offsets, writes its own data into the other
// half and reads it back, then writes pattern kFinalSeed over that half and says "done".
[[noreturn]] void RunInitiator(const std::string& provider, const std::string& ns, int in,
                              int out) {
  const char* role = "initiator";
  EnterNamespace(ns);
  uint16_t port = 0;
  CHILD_CHECK(ReadFull(in, &port, sizeof port), 30, "no port from the target");
  FabricOptions o;
  o.provider = provider;
  o.apply_env = false;
  auto fabric = Fabric::Open(o);
  CHILD_CHECK(fabric.ok(), 31, "Fabric::Open: %s", fabric.status().ToString().c_str());
  PinRegistrar pin;
  auto reg = (*fabric)->NewRegistrar(&pin);
  auto ep = (*fabric)->Connect(absl::StrCat(kAddrA, ":", port));
  CHILD_CHECK(ep.ok(), 32, "Connect: %s", ep.status().ToString().c_str());
  // The peer is another host: "auto" must have picked tcp, too.
  CHILD_CHECK((*ep)->provider_name().find("tcp") != std::string::npos, 45,
              "connected over %s, not tcp", (*ep)->provider_name().c_str());
  std::array<uint8_t, RemoteRegion::kWireSize> wire;
  CHILD_CHECK(ReadFull(in, wire.data(), wire.size()), 33, "no descriptor from the target");
  auto region = RemoteRegion::Parse(wire);
  CHILD_CHECK(region.ok(), 34, "Parse: %s", region.status().ToString().c_str());
  CHILD_CHECK(region->connection == (*ep)->connection_id(), 35, "descriptor of another connection");
  auto local = Buffer::Make(reg.get(), kHalf, kLocal);
  CHILD_CHECK(local.ok(), 36, "Buffer::Make: %s", local.status().ToString().c_str());

  auto wait = [&](Completion& c, const char* what, size_t n) {
    c.Wait();
    CHILD_CHECK(c.status().ok(), 37, "%s of %zu bytes: %s", what, n,
                c.status().ToString().c_str());
  };
  for (size_t n : {size_t{1}, size_t{4096}, size_t{65537}, size_t{1} << 20, kHalf}) {
    // Read: the target's pattern, from an offset that ends the read at the end of its half.
    const size_t from = kHalf - n;
    std::memset((*local)->data(), 0, kHalf);
    Sge s = (*local)->sge(0, n);
    Completion r;
    CHILD_CHECK((*ep)->Read({&s, 1}, *region, from, &r).ok(), 38, "posting a read");
    wait(r, "read", n);
    for (size_t i = 0; i < n; ++i) {
      CHILD_CHECK((*local)->data()[i] == Buffer::Pattern(kTargetSeed, from + i), 39,
                  "read of %zu: byte %zu wrong", n, i);
    }
    // Write ours into the second half, then read it back.
    (*local)->Fill(static_cast<uint32_t>(n));
    Completion w;
    CHILD_CHECK((*ep)->Write({&s, 1}, *region, kHalf, &w).ok(), 40, "posting a write");
    wait(w, "write", n);
    std::memset((*local)->data(), 0, n);
    Completion back;
    CHILD_CHECK((*ep)->Read({&s, 1}, *region, kHalf, &back).ok(), 41, "posting a read-back");
    wait(back, "read-back", n);
    for (size_t i = 0; i < n; ++i) {
      CHILD_CHECK((*local)->data()[i] == Buffer::Pattern(static_cast<uint32_t>(n), i), 42,
                  "read-back of %zu: byte %zu wrong", n, i);
    }
  }
  // A scatter-gather write of the whole second half, in four pieces; the target checks it.
  (*local)->Fill(kFinalSeed);
  const size_t q = kHalf / 4;
  Sge sg[4] = {(*local)->sge(0, q), (*local)->sge(q, q), (*local)->sge(2 * q, q),
               (*local)->sge(3 * q, q)};
  Completion w;
  CHILD_CHECK((*ep)->Write(sg, *region, kHalf, &w).ok(), 43, "posting the final write");
  wait(w, "final write", kHalf);
  const char done = 'D';
  CHILD_CHECK(WriteFull(out, &done, 1), 44, "sending 'done'");
  (*ep)->Close();
  _exit(0);
}

class TwoHostTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    absl::Status s = hosts_.Create("2h");
    if (absl::IsFailedPrecondition(s)) GTEST_SKIP() << s.message();
    ASSERT_TRUE(s.ok()) << s;
  }

  void TearDown() override {
    for (pid_t& p : children_) {
      if (p > 0) {
        kill(p, SIGKILL);
        waitpid(p, nullptr, 0);
        p = 0;
      }
    }
  }

  // Waits for child `i` until `deadline`; returns its wait status, or kills it and returns -1.
  int Reap(int i, absl::Time deadline) {
    const int status = testing::ReapBy(children_[i], deadline);
    children_[i] = 0;
    return status;
  }

  testing::TwoHosts hosts_;
  pid_t children_[2] = {0, 0};
};

std::string Describe(int status) { return testing::DescribeStatus(status); }

TEST_P(TwoHostTest, TcpMovesDataBothWaysAcrossAVethPair) {
  const uint64_t rx_before = hosts_.RxBytes();
  int t2i[2], i2t[2];  // target -> initiator, initiator -> target
  ASSERT_EQ(pipe2(t2i, O_CLOEXEC), 0);
  ASSERT_EQ(pipe2(i2t, O_CLOEXEC), 0);
  fflush(nullptr);
  // This process has started no thread (it opens no fabric): fork is safe.
  children_[0] = fork();
  ASSERT_GE(children_[0], 0);
  if (children_[0] == 0) {
    close(t2i[0]);
    close(i2t[1]);
    RunTarget(GetParam(), hosts_.ns_a(), i2t[0], t2i[1]);
  }
  children_[1] = fork();
  ASSERT_GE(children_[1], 0);
  if (children_[1] == 0) {
    close(t2i[1]);
    close(i2t[0]);
    RunInitiator(GetParam(), hosts_.ns_b(), t2i[0], i2t[1]);
  }
  for (int fd : {t2i[0], t2i[1], i2t[0], i2t[1]}) close(fd);

  const absl::Time deadline = absl::Now() + kChildTimeout;
  const int initiator = Reap(1, deadline);
  const int target = Reap(0, deadline);
  EXPECT_TRUE(WIFEXITED(initiator) && WEXITSTATUS(initiator) == 0 && initiator != -1)
      << "initiator: " << Describe(initiator) << " (its stderr says where)";
  EXPECT_TRUE(WIFEXITED(target) && WEXITSTATUS(target) == 0 && target != -1)
      << "target: " << Describe(target) << " (its stderr says where)";
  // Reads (and read-backs) of 10.1 MiB and writes of 9.1 MiB crossed the link, plus headers.
  const uint64_t rx_after = hosts_.RxBytes();
  EXPECT_GE(rx_after - rx_before, uint64_t{19} << 20) << "the data did not cross the veth pair";
}

// "auto" sees a peer that is not on this host and must run tcp.
INSTANTIATE_TEST_SUITE_P(Providers, TwoHostTest, ::testing::Values("tcp", "auto"),
                         [](const auto& info) { return std::string(info.param); });

}  // namespace
}  // namespace sanreg
