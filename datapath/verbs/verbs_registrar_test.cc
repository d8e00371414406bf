// verbs_registrar_test.cc: ibv_reg_mr access flags from the requested rights, failures, and
// re-registration, on the fake device.

#include "datapath/verbs/verbs_registrar.h"

#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cerrno>

#include "datapath/verbs/fake_device.h"
#include "regcache/fake_registrar.h"
#include "regcache/pin_registrar.h"

namespace sanreg::internal {
namespace {

class VerbsRegistrarTest : public ::testing::Test {
 protected:
  void SetUp() override {
    FakeDevice::Get().Reset();
    int n = 0;
    devices_ = api_->get_devices(&n);
    ASSERT_NE(devices_, nullptr);
    pd_ = api_->alloc_pd(devices_[0]);
    mem_ = mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ASSERT_NE(mem_, MAP_FAILED);
  }
  void TearDown() override {
    EXPECT_EQ(api_->dealloc_pd(pd_), 0) << "every region deregistered";
    api_->free_devices(devices_);
    munmap(mem_, kSize);
  }
  uintptr_t addr() const { return reinterpret_cast<uintptr_t>(mem_); }

  static constexpr size_t kSize = 1 << 16;
  const VerbsApi* api_ = FakeDevice::Api();
  ibv_context** devices_ = nullptr;
  ibv_pd* pd_ = nullptr;
  void* mem_ = nullptr;
};

TEST_F(VerbsRegistrarTest, AccessFlagsFollowTheRequestedRights) {
  using R = VerbsRegistrar;
  EXPECT_EQ(R::AccessFlags(kAccessLocalRead, false), 0);
  EXPECT_EQ(R::AccessFlags(kAccessLocalWrite, false), IBV_ACCESS_LOCAL_WRITE);
  EXPECT_EQ(R::AccessFlags(kAccessRemoteRead, false), IBV_ACCESS_REMOTE_READ);
  // Remote write needs local write.
  EXPECT_EQ(R::AccessFlags(kAccessRemoteWrite, false),
            IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
  // With memory windows, remote rights come only from the windows.
  EXPECT_EQ(R::AccessFlags(kAccessRemoteRead, true), IBV_ACCESS_MW_BIND);
  EXPECT_EQ(R::AccessFlags(kAccessAll, true), IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_MW_BIND);
  EXPECT_EQ(R::AccessFlags(kAccessLocalWrite, true), IBV_ACCESS_LOCAL_WRITE);
}

TEST_F(VerbsRegistrarTest, RegistersPinnedRangesAndUnpinsOnDeregister) {
  FakeRegistrar pinner;
  VerbsRegistrar r(api_, pd_, /*memory_windows=*/false, &pinner);
  auto reg = r.Register(addr(), kSize, kAccessLocalWrite | kAccessRemoteRead);
  ASSERT_TRUE(reg.ok()) << reg.status();
  EXPECT_NE(reg->local_key, 0u);
  EXPECT_NE(reg->remote_key, 0u);
  EXPECT_EQ(pinner.live_registrations(), 1u);
  auto* rec = reinterpret_cast<VerbsMr*>(reg->handle);
  EXPECT_EQ(rec->access, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ);
  auto local_only = r.Register(addr(), 4096, kAccessLocalRead);
  ASSERT_TRUE(local_only.ok());
  EXPECT_EQ(local_only->remote_key, 0u) << "no remote right asked for";
  EXPECT_TRUE(r.Deregister(*local_only).ok());
  EXPECT_TRUE(r.Deregister(*reg).ok());
  EXPECT_EQ(pinner.live_registrations(), 0u);
  EXPECT_EQ(FakeDevice::Get().stats().registered_mrs, 0u);
}

TEST_F(VerbsRegistrarTest, FailedRegistrationCarriesErrnoAndLeavesNothingPinned) {
  FakeRegistrar pinner;
  VerbsRegistrar r(api_, pd_, false, &pinner);
  FakeDevice::Get().FailNextRegMr(ENOMEM);
  auto reg = r.Register(addr(), kSize, kAccessLocalWrite);
  ASSERT_FALSE(reg.ok());
  EXPECT_EQ(reg.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(reg.status().message().find("ibv_reg_mr: Cannot allocate memory"),
            absl::string_view::npos)
      << reg.status();
  EXPECT_EQ(pinner.live_registrations(), 0u);
  FakeDevice::Get().FailNextRegMr(EFAULT);
  EXPECT_EQ(r.Register(addr(), kSize, kAccessLocalWrite).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(r.Register(addr(), 0, kAccessLocalWrite).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(pinner.live_registrations(), 0u);
}

TEST_F(VerbsRegistrarTest, ReregisterChangesEveryKeyAndKeepsThePin) {
  PinRegistrar pinner;
  VerbsRegistrar r(api_, pd_, false, &pinner);
  auto reg = r.Register(addr(), kSize, kAccessAll);
  ASSERT_TRUE(reg.ok()) << reg.status();
  auto* rec = reinterpret_cast<VerbsMr*>(reg->handle);
  const uint32_t old_lkey = rec->lkey.load();
  ASSERT_TRUE(VerbsRegistrar::Reregister(api_, pd_, rec).ok());
  EXPECT_NE(rec->lkey.load(), old_lkey);
  {
    std::lock_guard<std::mutex> l(rec->mu);
    EXPECT_NE(rec->mr->rkey, reg->remote_key);
  }
  EXPECT_TRUE(r.Deregister(*reg).ok());
}

}  // namespace
}  // namespace sanreg::internal
