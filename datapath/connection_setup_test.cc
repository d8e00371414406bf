// connection_setup_test.cc: what happens before the first byte moves: shm regions a killed process
// leaves behind, and a listener that cannot take a connection telling the connecting side why.

#include <arpa/inet.h>
#include <dirent.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "datapath/endpoint.h"
#include "datapath/fabric.h"
#include "datapath/fd_io.h"
#include "datapath/internal/test_util.h"
#include "datapath/libfabric/liveness.h"

namespace sanreg {
namespace {

using testing::ConnectedPair;

// The shm segments in /dev/shm that belong to process `pid` (see kShmNamePrefix in setup.cc):
// endpoint regions, or with `beacons` the fabrics' liveness beacons.
std::vector<std::string> ShmRegionsOf(pid_t pid, bool beacons = false) {
  struct stat st = {};
  EXPECT_EQ(stat("/proc/self/ns/pid", &st), 0);
  const std::string prefix = absl::StrCat("sanreg-", st.st_ino, "-", pid, "-");
  std::vector<std::string> out;
  DIR* d = opendir("/dev/shm");
  if (d == nullptr) return out;
  while (dirent* e = readdir(d)) {
    if (absl::StartsWith(e->d_name, prefix) && absl::EndsWith(e->d_name, "-alive") == beacons) {
      out.push_back(e->d_name);
    }
  }
  closedir(d);
  return out;
}

FabricOptions Shm() {
  FabricOptions o;
  o.provider = "shm";
  o.apply_env = false;
  return o;
}

// A process killed with its shm endpoints open leaves their regions in /dev/shm (libfabric cannot
// remove them). The next shm fabric opened on the host removes them; a live process's stay.
TEST(ShmRegionsTest, RegionsOfAKilledProcessAreRemovedByTheNextOpen) {
  auto mine = ConnectedPair::Make(Shm());
  ASSERT_TRUE(mine.ok()) << mine.status();
  ASSERT_EQ(ShmRegionsOf(getpid()).size(), 2u);

  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    close(ready[0]);
    auto p = ConnectedPair::Make(Shm());
    char c = p.ok() ? 1 : 0;
    (void)WriteFull(ready[1], &c, 1);
    for (;;) pause();
  }
  close(ready[1]);
  char c = 0;
  ASSERT_TRUE(ReadFull(ready[0], &c, 1));
  close(ready[0]);
  ASSERT_EQ(c, 1) << "the child could not connect over shm";
  EXPECT_EQ(ShmRegionsOf(child).size(), 2u);
  EXPECT_EQ(ShmRegionsOf(child, /*beacons=*/true).size(), 2u);  // one per fabric
  std::vector<std::unique_ptr<internal::LivenessWatch>> watches;
  for (const std::string& b : ShmRegionsOf(child, true)) {
    watches.push_back(internal::LivenessWatch::Open(b));
    ASSERT_NE(watches.back(), nullptr) << b;
    EXPECT_FALSE(watches.back()->Gone()) << b;
  }
  kill(child, SIGKILL);
  int st = 0;
  ASSERT_EQ(waitpid(child, &st, 0), child);
  for (const auto& w : watches) EXPECT_TRUE(w->Gone()) << "the beacon outlived its process";
  EXPECT_EQ(ShmRegionsOf(child).size(), 2u) << "SIGKILL left nothing behind: nothing to test";

  auto next = Fabric::Open(Shm());
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_TRUE(ShmRegionsOf(child).empty());
  EXPECT_TRUE(ShmRegionsOf(child, true).empty());
  EXPECT_EQ(ShmRegionsOf(getpid()).size(), 2u);  // this live process's are untouched
  EXPECT_EQ(ShmRegionsOf(getpid(), true).size(), 3u);

  mine->initiator.reset();
  mine->target.reset();
  EXPECT_TRUE(ShmRegionsOf(getpid()).empty());  // a clean close removes its region
}

// A fabric's beacon reads alive while the fabric is open, and gone once it closes.
TEST(ShmRegionsTest, BeaconReadsGoneOnceItsFabricCloses) {
  auto f = Fabric::Open(Shm());
  ASSERT_TRUE(f.ok()) << f.status();
  std::vector<std::string> before = ShmRegionsOf(getpid(), true);
  ASSERT_EQ(before.size(), 1u);
  auto w = internal::LivenessWatch::Open(before[0]);
  ASSERT_NE(w, nullptr);
  EXPECT_FALSE(w->Gone());
  f->reset();
  EXPECT_TRUE(w->Gone());
  EXPECT_TRUE(ShmRegionsOf(getpid(), true).empty());
  EXPECT_EQ(internal::LivenessWatch::Open(before[0]), nullptr);
}

// The wire form of the out-of-band hello (setup.cc's HelloHeader), to speak it by hand here.
struct WireHello {
  uint32_t magic;
  uint16_t version;
  uint16_t provider_len;
  uint16_t name_len;
  uint16_t refusal;
  uint32_t reserved;
  uint64_t connection_id;
};
static_assert(sizeof(WireHello) == 24);

// A hello whose provider address the listener cannot use: Accept fails with the reason, and the
// connecting side gets a refusal that carries it rather than a bare closed socket.
TEST(ListenerTest, RefusesAnUnusablePeerAddressAndTellsThePeerWhy) {
  FabricOptions o;
  o.provider = "tcp";
  o.apply_env = false;
  auto f = Fabric::Open(o);
  ASSERT_TRUE(f.ok()) << f.status();
  auto l = (*f)->Listen("127.0.0.1:0");
  ASSERT_TRUE(l.ok()) << l.status();
  absl::Status accepted;
  std::thread t([&] { accepted = (*l)->Accept().status(); });

  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in a = {};
  a.sin_family = AF_INET;
  a.sin_port = htons((*l)->port());
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0) << strerror(errno);
  const std::string provider = (*f)->provider_name();
  const std::string bad_name = "xyz";  // not a sockaddr_in
  WireHello h = {0x31485253, 1, static_cast<uint16_t>(provider.size()),
                 static_cast<uint16_t>(bad_name.size()), 0, 0, 0};
  std::string msg(reinterpret_cast<const char*>(&h), sizeof h);
  msg += provider + bad_name;
  ASSERT_TRUE(WriteFull(fd, msg.data(), msg.size()));

  WireHello reply = {};
  ASSERT_TRUE(ReadFull(fd, &reply, sizeof reply)) << "the listener closed without a reply";
  EXPECT_EQ(reply.magic, 0x31485253u);
  EXPECT_NE(reply.refusal, 0) << "a refusal must say so";
  std::string rest(reply.provider_len + reply.name_len, '\0');
  ASSERT_TRUE(ReadFull(fd, rest.data(), rest.size()));
  const std::string reason = rest.substr(reply.provider_len);
  t.join();
  close(fd);
  EXPECT_FALSE(accepted.ok());
  EXPECT_EQ(reply.refusal, static_cast<uint16_t>(accepted.code()));
  EXPECT_EQ(reason, accepted.message());
  EXPECT_NE(reason.find("peer"), std::string::npos) << reason;
}

}  // namespace
}  // namespace sanreg
