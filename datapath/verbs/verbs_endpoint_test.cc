// verbs_endpoint_test.cc: the verbs backend's own paths, on the fake device: memory-window
// revocation, inline and selectively signalled posting, error completions mapped to Status, a
// queue pair going to error with operations in flight, device selection. The backend-independent
// suite runs on the fake device in datapath/endpoint_test.cc.

#include <arpa/inet.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "datapath/endpoint.h"
#include "datapath/fabric.h"
#include "datapath/internal/test_util.h"
#include "datapath/verbs/fake_device.h"
#include "regcache/fake_registrar.h"
#include "regcache/pin_registrar.h"

namespace sanreg {
namespace {

using internal::FakeConfig;
using internal::FakeDevice;
using testing::Buffer;
using testing::ConnectedPair;

constexpr uint32_t kLocal = kAccessLocalRead | kAccessLocalWrite;
constexpr uint32_t kRemoteRw = kAccessRemoteRead | kAccessRemoteWrite;

// Waits (up to 10 s) for what another thread does, such as a connection failing on the progress
// thread after its peer closed. Returns whether `done` came true.
template <typename F>
bool Eventually(F done) {
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (!done()) {
    if (absl::Now() > deadline) return false;
    std::this_thread::yield();
  }
  return true;
}

FabricOptions FakeOptions(const std::string& provider = "verbs") {
  FabricOptions o;
  o.provider = provider;
  o.max_in_flight = 16;
  o.apply_env = false;
  o.verbs_api = FakeDevice::Api();
  return o;
}

class VerbsEndpointTest : public ::testing::Test {
 protected:
  void SetUp() override { Start(FakeConfig()); }
  void Start(FakeConfig config) {
    TearDown();
    FakeDevice::Get().Reset(config);
    absl::StatusOr<ConnectedPair> p = ConnectedPair::Make(FakeOptions());
    ASSERT_TRUE(p.ok()) << p.status();
    pair_ = std::make_unique<ConnectedPair>(*std::move(p));
    ireg_ = pair_->initiator_fabric->NewRegistrar(&ipin_);
    treg_ = pair_->target_fabric->NewRegistrar(&tpin_);
    src_ = Make(ireg_.get(), 1 << 16, kLocal);
    tgt_ = Make(treg_.get(), 1 << 16, kLocal | kRemoteRw);
    src_->Fill(7);
    std::memset(tgt_->data(), 0, tgt_->size());
  }
  void TearDown() override {
    src_.reset();
    tgt_.reset();
    pair_.reset();
    ireg_.reset();
    treg_.reset();
    FakeDevice::Get().SetPaused(false);
  }
  static std::unique_ptr<Buffer> Make(Registrar* r, size_t n, uint32_t access) {
    auto b = Buffer::Make(r, n, access);
    EXPECT_TRUE(b.ok()) << b.status();
    return b.ok() ? *std::move(b) : nullptr;
  }
  RemoteRegion Expose(uint32_t rights = kRemoteRw) {
    auto r = pair_->target->Expose(tgt_->reg(), tgt_->data(), tgt_->size(), rights);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : RemoteRegion{};
  }
  // Writes `n` bytes from the start of src_ to `r` at `offset` and waits.
  absl::Status WriteAndWait(const RemoteRegion& r, size_t n, uint64_t offset = 0) {
    Completion c;
    Sge s = src_->sge(0, n);
    absl::Status st = pair_->initiator->Write({&s, 1}, r, offset, &c);
    if (!st.ok()) return st;
    c.Wait();
    return c.status();
  }
  uint32_t ActiveQp() { return FakeDevice::Get().ConnectedQps(true).at(0); }
  uint32_t PassiveQp() { return FakeDevice::Get().ConnectedQps(false).at(0); }

  FakeRegistrar ipin_;
  FakeRegistrar tpin_;
  std::unique_ptr<ConnectedPair> pair_;
  std::unique_ptr<Registrar> ireg_;
  std::unique_ptr<Registrar> treg_;
  std::unique_ptr<Buffer> src_;
  std::unique_ptr<Buffer> tgt_;
};

TEST_F(VerbsEndpointTest, RevokedWindowRefusesThePeerAtOnceAndTheRegionStaysPinned) {
  RemoteRegion r = Expose();
  ASSERT_TRUE(WriteAndWait(r, 4096).ok());
  EXPECT_EQ(std::memcmp(tgt_->data(), src_->data(), 4096), 0);
  EXPECT_EQ(r.key, r.key & 0xffffffffu);
  EXPECT_NE(r.key, tgt_->reg().remote_key) << "a window's key, not the region's";
  const uint64_t binds = FakeDevice::Get().stats().binds;
  EXPECT_EQ(binds, 1u);

  ASSERT_TRUE(pair_->target->Revoke(r).ok());
  EXPECT_EQ(FakeDevice::Get().stats().invalidations, 1u);
  std::memset(tgt_->data(), 0, 4096);
  absl::Status refused = WriteAndWait(r, 100);
  EXPECT_EQ(refused.code(), absl::StatusCode::kPermissionDenied) << refused;
  EXPECT_EQ(tgt_->data()[0], 0) << "nothing moved";
  EXPECT_EQ(pair_->target->Revoke(r).code(), absl::StatusCode::kNotFound);

  // The region is still registered and pinned: a new connection exposes and uses it as it is.
  EXPECT_EQ(tpin_.live_registrations(), 1u);
  const uint64_t pinned = tpin_.registrations();
  ASSERT_TRUE(pair_->Connect().ok());
  RemoteRegion again = Expose();
  ASSERT_TRUE(WriteAndWait(again, 4096).ok());
  EXPECT_EQ(std::memcmp(tgt_->data(), src_->data(), 4096), 0);
  EXPECT_EQ(tpin_.registrations(), pinned) << "not pinned again";
}

TEST_F(VerbsEndpointTest, AWindowAnswersOnlyOnItsConnection) {
  RemoteRegion first = Expose();
  std::unique_ptr<Endpoint> old_initiator = std::move(pair_->initiator);
  std::unique_ptr<Endpoint> old_target = std::move(pair_->target);
  ASSERT_TRUE(pair_->Connect().ok());
  // The first connection's key, stamped with the second connection's id (a forged descriptor
  // that the initiator's own check lets through): the device refuses it on this QP.
  RemoteRegion forged = first;
  forged.connection = pair_->initiator->connection_id();
  absl::Status s = WriteAndWait(forged, 64);
  EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied) << s;
  for (size_t i = 0; i < 64; ++i) ASSERT_EQ(tgt_->data()[i], 0);
}

TEST_F(VerbsEndpointTest, WithoutWindowsRevokeRegistersAgainAndKeepsThePin) {
  FakeConfig c;
  c.memory_windows = false;
  Start(c);
  RemoteRegion r = Expose();
  EXPECT_EQ(r.key, tgt_->reg().remote_key) << "the region's own key";
  ASSERT_TRUE(WriteAndWait(r, 128).ok());
  const uint64_t pinned = tpin_.registrations();
  ASSERT_TRUE(pair_->target->Revoke(r).ok());
  EXPECT_EQ(WriteAndWait(r, 128).code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(tpin_.live_registrations(), 1u);
  EXPECT_EQ(tpin_.registrations(), pinned) << "not pinned again";
  ASSERT_TRUE(pair_->Connect().ok());
  RemoteRegion again = Expose();
  EXPECT_NE(again.key, r.key);
  ASSERT_TRUE(WriteAndWait(again, 128).ok());
}

// A long-lived registration exposed on many short connections (a server with many clients, or
// security_test's guessed keys, one connection per guess): each connection's windows go back to
// the device when it closes, on either side, and the registration stays registered and pinned.
// Before, the windows stayed allocated until the registration went, and the fake device refused
// new connections after some 45,000 of them.
TEST_F(VerbsEndpointTest, AClosedConnectionFreesItsWindowsAndKeepsTheRegistration) {
  FakeDevice& dev = FakeDevice::Get();
  const uint64_t mrs = dev.stats().registered_mrs;
  const uint64_t windows = dev.stats().allocated_mws;
  for (int round = 0; round < 4; ++round) {
    SCOPED_TRACE(round);
    RemoteRegion rw = Expose();
    RemoteRegion ro = Expose(kAccessRemoteRead);
    EXPECT_EQ(dev.stats().allocated_mws, windows + 2);
    ASSERT_TRUE(WriteAndWait(rw, 256).ok());
    if (round % 2 == 0) {
      pair_->target->Close();  // this side closes
    } else {
      pair_->initiator->Close();  // the peer closes: its disconnect fails this side
      // On the progress thread: the connection reads closed first, its windows go last.
      ASSERT_TRUE(Eventually([&] { return dev.stats().allocated_mws == windows; }))
          << "the closed connection kept its windows";
      EXPECT_FALSE(pair_->target->connected());
    }
    EXPECT_EQ(dev.stats().allocated_mws, windows) << "the closed connection kept its windows";
    EXPECT_EQ(pair_->target->Revoke(rw).code(), absl::StatusCode::kNotFound);
    EXPECT_EQ(pair_->target->Revoke(ro).code(), absl::StatusCode::kNotFound);
    ASSERT_TRUE(pair_->Connect().ok());
  }
  EXPECT_EQ(dev.stats().registered_mrs, mrs);
  EXPECT_EQ(tpin_.live_registrations(), 1u);
  RemoteRegion again = Expose();
  ASSERT_TRUE(WriteAndWait(again, 4096).ok());
  EXPECT_EQ(std::memcmp(tgt_->data(), src_->data(), 4096), 0);
}

// Revoking a descriptor whose registration is gone: deregistering revoked it already (its window
// was deallocated), so Revoke says kNotFound, touches no freed record, and does not invalidate a
// key the device no longer knows (an error completion that would fail the connection).
TEST_F(VerbsEndpointTest, RevokeAfterDeregistrationIsNotFoundAndTheConnectionLives) {
  for (bool windows : {true, false}) {
    SCOPED_TRACE(windows ? "memory windows" : "no windows");
    FakeConfig c;
    c.memory_windows = windows;
    Start(c);
    const uint64_t before = FakeDevice::Get().stats().allocated_mws;
    RemoteRegion r = Expose();
    ASSERT_TRUE(WriteAndWait(r, 64).ok());
    tgt_.reset();  // deregisters
    EXPECT_EQ(FakeDevice::Get().stats().allocated_mws, before);
    EXPECT_EQ(pair_->target->Revoke(r).code(), absl::StatusCode::kNotFound);
    EXPECT_TRUE(pair_->target->connected());
    tgt_ = Make(treg_.get(), 1 << 16, kLocal | kRemoteRw);
    RemoteRegion again = Expose();
    ASSERT_TRUE(WriteAndWait(again, 4096).ok());
    EXPECT_EQ(std::memcmp(tgt_->data(), src_->data(), 4096), 0);
  }
}

// A Revoke waits for its invalidation while holding the region's record; the connection fails
// under it (the peer closes) with another window of the same region exposed. Fail must complete
// the invalidation before it takes the record to free that other window, or the two wait for each
// other for ever.
TEST_F(VerbsEndpointTest, RevokeRacingTheConnectionsFailureReturns) {
  FakeDevice& dev = FakeDevice::Get();
  const uint64_t windows = dev.stats().allocated_mws;
  RemoteRegion a = Expose();
  RemoteRegion b = Expose(kAccessRemoteRead);  // a second window over the same registration
  ASSERT_EQ(dev.stats().allocated_mws, windows + 2);
  dev.SetPaused(true);  // the invalidation stays in flight
  const uint64_t posted = dev.stats().posted;
  absl::Status revoked = absl::UnknownError("not returned");
  std::thread t([&] { revoked = pair_->target->Revoke(a); });
  ASSERT_TRUE(Eventually([&] { return dev.stats().posted > posted; }))
      << "Revoke posted no invalidation";
  pair_->initiator->Close();  // the peer's disconnect fails the target's connection
  t.join();
  dev.SetPaused(false);
  EXPECT_TRUE(revoked.ok()) << revoked;  // cut off with its QP: no access reaches the window
  EXPECT_FALSE(pair_->target->connected());
  // The failing connection frees the other window once Revoke lets go of the region's record.
  EXPECT_TRUE(Eventually([&] { return dev.stats().allocated_mws == windows; }))
      << dev.stats().allocated_mws << " windows left";
  EXPECT_EQ(pair_->target->Revoke(b).code(), absl::StatusCode::kNotFound);
}

TEST_F(VerbsEndpointTest, SmallWritesGoInlineAndOnlyEveryNthIsSignalled) {
  RemoteRegion r = Expose();
  const internal::FakeStats before = FakeDevice::Get().stats();
  // 64 writes of 32 bytes (inline), then 64 of 4 KiB (not inline), all in flight at once.
  constexpr size_t kOps = 128;
  std::vector<Completion> cs(kOps);
  for (size_t i = 0; i < kOps; ++i) {
    const size_t n = i < 64 ? 32 : 4096;
    Sge s = src_->sge(i * 32, n);
    ASSERT_TRUE(pair_->initiator->Write({&s, 1}, r, i * 32, &cs[i]).ok());
  }
  for (auto& c : cs) {
    c.Wait();
    ASSERT_TRUE(c.status().ok()) << c.status();
  }
  EXPECT_EQ(std::memcmp(tgt_->data(), src_->data(), 127 * 32 + 4096), 0);
  const internal::FakeStats after = FakeDevice::Get().stats();
  const uint64_t posted = after.posted - before.posted;
  const uint64_t signalled = after.signalled - before.signalled;
  EXPECT_EQ(after.inlined - before.inlined, 64u);
  // Every 16th, plus at most a few zero-length requests that complete an unsignalled tail (one
  // per pass of the progress thread that found nothing newly posted).
  EXPECT_GE(posted, kOps);
  EXPECT_LE(signalled, kOps / 16 + (posted - kOps));  // kSignalEvery (verbs_backend.h)
  EXPECT_LT(signalled, kOps / 2) << "posted " << posted;
  EXPECT_EQ(pair_->initiator->pending(), 0u);
}

TEST_F(VerbsEndpointTest, ALoneUnsignalledWriteStillCompletes) {
  RemoteRegion r = Expose();
  // One write: unsignalled (not the 16th); the progress thread asks for a completion behind it.
  const internal::FakeStats before = FakeDevice::Get().stats();
  ASSERT_TRUE(WriteAndWait(r, 1000).ok());
  const internal::FakeStats after = FakeDevice::Get().stats();
  EXPECT_EQ(after.posted - before.posted, 2u) << "the write and one zero-length request";
  EXPECT_EQ(after.signalled - before.signalled, 1u);
  EXPECT_EQ(std::memcmp(tgt_->data(), src_->data(), 1000), 0);
}

TEST_F(VerbsEndpointTest, InlineDataIsTakenWhenWriteReturns) {
  RemoteRegion r = Expose();
  FakeDevice::Get().SetPaused(true);  // the device holds the request
  Completion c;
  Sge s = src_->sge(0, 48);
  std::vector<uint8_t> expected(src_->data(), src_->data() + 48);
  ASSERT_TRUE(pair_->initiator->Write({&s, 1}, r, 0, &c).ok());
  std::memset(src_->data(), 0xab, 48);  // the caller reuses its buffer at once
  FakeDevice::Get().SetPaused(false);
  c.Wait();
  ASSERT_TRUE(c.status().ok()) << c.status();
  EXPECT_EQ(std::memcmp(tgt_->data(), expected.data(), 48), 0);
}

TEST_F(VerbsEndpointTest, RemoteAccessErrorIsPermissionDeniedAndFailsTheConnection) {
  RemoteRegion ro = Expose(kAccessRemoteRead);
  // A descriptor whose rights the initiator believes: the target's device refuses the write.
  RemoteRegion forged = ro;
  forged.rights = kRemoteRw;
  absl::Status s = WriteAndWait(forged, 64);
  EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied) << s;
  EXPECT_NE(s.message().find("remote access error"), std::string::npos) << s;
  for (size_t i = 0; i < 64; ++i) ASSERT_EQ(tgt_->data()[i], 0);
  EXPECT_FALSE(pair_->initiator->connected());
  EXPECT_EQ(pair_->initiator->health().code(), absl::StatusCode::kUnavailable);
  Completion late;
  Sge one = src_->sge(0, 1);
  EXPECT_EQ(pair_->initiator->Read({&one, 1}, ro, 0, &late).code(),
            absl::StatusCode::kUnavailable);
}

TEST_F(VerbsEndpointTest, ErrorCompletionsMapToTheirStatus) {
  struct Case {
    ibv_wc_status wc;
    absl::StatusCode code;
  };
  const Case kCases[] = {
      {IBV_WC_REM_ACCESS_ERR, absl::StatusCode::kPermissionDenied},
      {IBV_WC_LOC_PROT_ERR, absl::StatusCode::kPermissionDenied},
      {IBV_WC_REM_INV_REQ_ERR, absl::StatusCode::kInvalidArgument},
      {IBV_WC_RETRY_EXC_ERR, absl::StatusCode::kUnavailable},
      {IBV_WC_RNR_RETRY_EXC_ERR, absl::StatusCode::kUnavailable},
      {IBV_WC_REM_OP_ERR, absl::StatusCode::kUnavailable},
      {IBV_WC_GENERAL_ERR, absl::StatusCode::kInternal},
  };
  for (const Case& c : kCases) {
    SCOPED_TRACE(c.wc);
    Start(FakeConfig());
    RemoteRegion r = Expose();
    FakeDevice::Get().FailNextWork(c.wc);
    absl::Status s = WriteAndWait(r, 64);
    EXPECT_EQ(s.code(), c.code) << s;
    EXPECT_EQ(pair_->initiator->health().code(), absl::StatusCode::kUnavailable);
  }
}

TEST_F(VerbsEndpointTest, QpErrorWithOperationsInFlightCompletesEachOnceWithAnError) {
  RemoteRegion r = Expose();
  constexpr size_t kOps = 40;  // 16 on the QP, the rest queued behind them
  struct Counter {
    std::atomic<int> calls{0};
  };
  std::vector<Counter> counts(kOps);
  std::vector<Completion> cs(kOps);
  auto on_done = [](Completion*, void* arg) { static_cast<Counter*>(arg)->calls.fetch_add(1); };
  FakeDevice::Get().SetPaused(true);
  for (size_t i = 0; i < kOps; ++i) {
    cs[i].set_callback(on_done, &counts[i]);
    Sge s = src_->sge(i * 64, 64);
    ASSERT_TRUE(pair_->initiator->Write({&s, 1}, r, i * 64, &cs[i]).ok());
  }
  EXPECT_EQ(pair_->initiator->pending(), kOps);
  FakeDevice::Get().ForceQpError(ActiveQp());
  FakeDevice::Get().SetPaused(false);
  for (size_t i = 0; i < kOps; ++i) {
    cs[i].Wait();
    EXPECT_FALSE(cs[i].status().ok()) << i;
    EXPECT_EQ(cs[i].status().code(), absl::StatusCode::kUnavailable) << cs[i].status();
  }
  // A callback runs just after its Completion turns done: wait for the last ones.
  for (size_t i = 0; i < kOps; ++i) {
    while (counts[i].calls.load() == 0) std::this_thread::yield();
  }
  for (size_t i = 0; i < kOps; ++i) EXPECT_EQ(counts[i].calls.load(), 1) << i;
  EXPECT_EQ(pair_->initiator->pending(), 0u);
  EXPECT_FALSE(pair_->initiator->connected());
  for (size_t i = 0; i < kOps * 64; ++i) ASSERT_EQ(tgt_->data()[i], 0) << "nothing moved";
}

TEST_F(VerbsEndpointTest, APeerWhoseHostVanishesFailsTheNextOperation) {
  RemoteRegion r = Expose();
  ASSERT_TRUE(WriteAndWait(r, 64).ok());
  FakeDevice::Get().Vanish(PassiveQp());
  absl::Status s = WriteAndWait(r, 64);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_NE(s.message().find("retry"), std::string::npos) << s;
  EXPECT_FALSE(pair_->initiator->connected());
}

TEST_F(VerbsEndpointTest, APeerThatDisconnectsFailsWhatIsInFlight) {
  RemoteRegion r = Expose();
  FakeDevice::Get().SetPaused(true);
  std::vector<Completion> cs(8);
  for (size_t i = 0; i < cs.size(); ++i) {
    Sge s = src_->sge(0, 64);
    ASSERT_TRUE(pair_->initiator->Write({&s, 1}, r, 0, &cs[i]).ok());
  }
  pair_->target->Close();
  for (auto& c : cs) {
    c.Wait();
    EXPECT_EQ(c.status().code(), absl::StatusCode::kUnavailable) << c.status();
  }
  EXPECT_EQ(pair_->initiator->health().code(), absl::StatusCode::kUnavailable);
}

TEST(VerbsDeviceSelectionTest, ByNameOrTheFirstActivePort) {
  FakeConfig c;
  c.devices = 3;
  c.active_ports = 0b110;  // fake0's port is down
  FakeDevice::Get().Reset(c);
  auto f = Fabric::Open(FakeOptions("verbs"));
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->provider_name(), "verbs:fake1");
  f = Fabric::Open(FakeOptions("verbs:fake2"));
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->provider_name(), "verbs:fake2");
  f = Fabric::Open(FakeOptions("verbs:fake0"));
  EXPECT_EQ(f.status().code(), absl::StatusCode::kUnavailable) << f.status();
  EXPECT_NE(f.status().message().find("no active port"), std::string::npos) << f.status();
  f = Fabric::Open(FakeOptions("verbs:mlx5_9"));
  EXPECT_EQ(f.status().code(), absl::StatusCode::kNotFound) << f.status();
  c.active_ports = 0;
  FakeDevice::Get().Reset(c);
  f = Fabric::Open(FakeOptions("verbs"));
  EXPECT_EQ(f.status().code(), absl::StatusCode::kUnavailable) << f.status();
  EXPECT_NE(f.status().message().find("no RDMA device found"), std::string::npos);
  c.devices = 0;
  FakeDevice::Get().Reset(c);
  f = Fabric::Open(FakeOptions("verbs"));
  EXPECT_EQ(f.status(), absl::UnavailableError("no RDMA device found"));
  FakeDevice::Get().Reset();
}

// Acceptance: on a machine without RDMA devices (the build machines), opening the real backend
// says so plainly and does not crash.
TEST(VerbsDeviceSelectionTest, RdmaCoreWithoutADeviceSaysNoDeviceFound) {
  FabricOptions o;
  o.provider = "verbs";
  o.apply_env = false;
  auto f = Fabric::Open(o);
  if (f.ok()) GTEST_SKIP() << "this machine has an RDMA device: " << (*f)->provider_name();
  EXPECT_EQ(f.status().code(), absl::StatusCode::kUnavailable) << f.status();
  EXPECT_NE(f.status().message().find("no RDMA device found"), std::string::npos) << f.status();
}

TEST(VerbsConnectionTest, AListenerRefusesAnotherDescriptorVersionAndSaysWhich) {
  FakeDevice::Get().Reset();
  auto f = Fabric::Open(FakeOptions());
  ASSERT_TRUE(f.ok()) << f.status();
  auto l = (*f)->Listen("127.0.0.1:0");
  ASSERT_TRUE(l.ok()) << l.status();
  absl::Status accepted;
  std::thread t([&] { accepted = (*l)->Accept().status(); });
  // A peer speaking descriptor version 9, through the fake rdmacm directly.
  const internal::VerbsApi& v = *FakeDevice::Api();
  rdma_event_channel* ch = v.create_event_channel();
  rdma_cm_id* id = nullptr;
  ASSERT_EQ(v.create_id(ch, &id, nullptr, RDMA_PS_TCP), 0);
  sockaddr_in dst = {};
  dst.sin_family = AF_INET;
  dst.sin_port = htons((*l)->port());
  ASSERT_EQ(v.resolve_addr(id, nullptr, reinterpret_cast<sockaddr*>(&dst), 1000), 0);
  rdma_cm_event* e = nullptr;
  ASSERT_EQ(v.get_cm_event(ch, &e), 0);
  v.ack_cm_event(e);
  ibv_pd* pd = v.alloc_pd(id->verbs);
  ibv_cq* cq = v.create_cq(id->verbs, 4, nullptr, nullptr, 0);
  ibv_qp_init_attr attr = {};
  attr.send_cq = attr.recv_cq = cq;
  attr.qp_type = IBV_QPT_RC;
  attr.cap.max_send_wr = 1;
  attr.cap.max_send_sge = 1;
  ASSERT_EQ(v.create_qp(id, pd, &attr), 0);
  const uint32_t hello[4] = {0x31565253, 9, 0, 0};  // magic "SRV1", version 9
  rdma_conn_param p = {};
  p.private_data = hello;
  p.private_data_len = sizeof hello;
  ASSERT_EQ(v.connect(id, &p), 0);
  t.join();
  EXPECT_EQ(accepted.code(), absl::StatusCode::kFailedPrecondition) << accepted;
  ASSERT_EQ(v.get_cm_event(ch, &e), 0);
  EXPECT_EQ(e->event, RDMA_CM_EVENT_REJECTED);
  ASSERT_GE(e->param.conn.private_data_len, 8);
  uint16_t version = 0;
  std::memcpy(&version, static_cast<const uint8_t*>(e->param.conn.private_data) + 4, 2);
  EXPECT_EQ(version, RemoteRegion::kWireVersion);
  v.ack_cm_event(e);
  v.destroy_qp(id);
  v.destroy_id(id);
  v.destroy_cq(cq);
  v.dealloc_pd(pd);
  v.destroy_event_channel(ch);
}

TEST(VerbsConnectionTest, ConnectingToNobodyIsUnavailableAndCloseStopsAccept) {
  FakeDevice::Get().Reset();
  auto f = Fabric::Open(FakeOptions());
  ASSERT_TRUE(f.ok()) << f.status();
  auto ep = (*f)->Connect("127.0.0.1:1");
  EXPECT_EQ(ep.status().code(), absl::StatusCode::kUnavailable) << ep.status();
  auto l = (*f)->Listen("127.0.0.1:0");
  ASSERT_TRUE(l.ok()) << l.status();
  absl::Status accepted;
  std::thread t([&] { accepted = (*l)->Accept().status(); });
  (*l)->Close();
  t.join();
  EXPECT_EQ(accepted.code(), absl::StatusCode::kCancelled) << accepted;
}

}  // namespace
}  // namespace sanreg
