// Tests for PinRegistrar: real mlock on real memory. Needs no sandbox (mlock) and, for the memlock
// limit test, root (to drop privileges in a child).

#include "regcache/pin_registrar.h"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <string>

namespace sanreg {
namespace {

const size_t kPage = static_cast<size_t>(sysconf(_SC_PAGESIZE));

// Locked kilobytes of this process, from /proc/self/status (VmLck).
long LockedKb() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmLck:", 0) == 0) return std::stol(line.substr(6));
  }
  return -1;
}

class PinRegistrarTest : public ::testing::Test {
 protected:
  void SetUp() override {
    mem_ = static_cast<char*>(
        mmap(nullptr, 64 * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    ASSERT_NE(mem_, MAP_FAILED);
    base_kb_ = LockedKb();
  }
  void TearDown() override { munmap(mem_, 64 * kPage); }
  uintptr_t At(size_t page) const { return reinterpret_cast<uintptr_t>(mem_ + page * kPage); }
  long LockedPages() const { return (LockedKb() - base_kb_) * 1024 / static_cast<long>(kPage); }

  char* mem_ = nullptr;
  long base_kb_ = 0;
};

TEST_F(PinRegistrarTest, RegisterLocksAndDeregisterUnlocks) {
  PinRegistrar pin;
  auto r = pin.Register(At(1) + 10, 2 * kPage, kAccessLocalRead);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->addr, At(1));
  EXPECT_EQ(r->length, 3 * kPage);
  EXPECT_EQ(LockedPages(), 3);
  EXPECT_EQ(pin.locked_bytes(), 3 * kPage);
  ASSERT_TRUE(pin.Deregister(*r).ok());
  EXPECT_EQ(LockedPages(), 0);
  EXPECT_EQ(pin.locked_bytes(), 0u);
}

TEST_F(PinRegistrarTest, OverlappingRegistrationsKeepSharedPagesLocked) {
  PinRegistrar pin;
  auto a = pin.Register(At(0), 4 * kPage, kAccessLocalRead);
  auto b = pin.Register(At(2), 4 * kPage, kAccessLocalRead);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(LockedPages(), 6);
  ASSERT_TRUE(pin.Deregister(*a).ok());
  // Pages 2-5 are still registered by b: the kernel must still hold them locked.
  EXPECT_EQ(LockedPages(), 4);
  ASSERT_TRUE(pin.Deregister(*b).ok());
  EXPECT_EQ(LockedPages(), 0);
}

TEST_F(PinRegistrarTest, SameRangeTwiceNeedsTwoDeregistrations) {
  PinRegistrar pin;
  auto a = pin.Register(At(0), kPage, kAccessLocalRead);
  auto b = pin.Register(At(0), kPage, kAccessLocalRead);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(pin.Deregister(*a).ok());
  EXPECT_EQ(LockedPages(), 1);
  ASSERT_TRUE(pin.Deregister(*b).ok());
  EXPECT_EQ(LockedPages(), 0);
  EXPECT_EQ(pin.Deregister(*b).code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(PinRegistrarTest, UnmappedRangeIsOutOfRangeAndLocksNothing) {
  PinRegistrar pin;
  ASSERT_EQ(munmap(mem_ + 8 * kPage, kPage), 0);
  auto r = pin.Register(At(6), 4 * kPage, kAccessLocalRead);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kOutOfRange) << r.status();
  EXPECT_EQ(LockedPages(), 0);
  EXPECT_EQ(pin.locked_bytes(), 0u);
}

TEST_F(PinRegistrarTest, BadArgumentsAreInvalid) {
  PinRegistrar pin;
  EXPECT_EQ(pin.Register(At(0), 0, kAccessLocalRead).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(pin.Register(~uintptr_t{0} - 5, 10, kAccessLocalRead).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(pin.Register(At(0), kPage, 0).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(PinRegistrarTest, DestructorUnlocksWhatIsLeft) {
  {
    PinRegistrar pin;
    ASSERT_TRUE(pin.Register(At(0), 5 * kPage, kAccessLocalRead).ok());
    EXPECT_EQ(LockedPages(), 5);
  }
  EXPECT_EQ(LockedPages(), 0);
}

// In a child without CAP_IPC_LOCK and with a 64 KiB RLIMIT_MEMLOCK, pinning 1 MiB is
// kResourceExhausted, and pinning within the limit works.
TEST_F(PinRegistrarTest, MemlockLimitIsResourceExhausted) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to drop CAP_IPC_LOCK in a child";
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    struct rlimit lim = {64 * 1024, 64 * 1024};
    if (setrlimit(RLIMIT_MEMLOCK, &lim) != 0) _exit(10);
    if (setgid(65534) != 0 || setuid(65534) != 0) _exit(11);  // drops every capability
    void* big = mmap(nullptr, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (big == MAP_FAILED) _exit(12);
    PinRegistrar pin;
    auto r = pin.Register(reinterpret_cast<uintptr_t>(big), 1 << 20, kAccessLocalRead);
    if (r.ok()) _exit(13);
    if (r.status().code() != absl::StatusCode::kResourceExhausted) _exit(14);
    if (pin.locked_bytes() != 0) _exit(15);
    auto small = pin.Register(reinterpret_cast<uintptr_t>(big), 4 * kPage, kAccessLocalRead);
    if (!small.ok()) _exit(16);
    _exit(0);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "child step failed (see the exit code in the test)";
}

}  // namespace
}  // namespace sanreg
