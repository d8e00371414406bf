// spi_test.cc: one test per rule of SPI.md, over a connected loopback pair in one process
// (provider from SANREG_FABRIC, default tcp).

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <sys/random.h>

#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "datapath/remote_region.h"
#include "regcache/registrar.h"
#include "spi/extension_table.h"
#include "spi/internal/spi_internal.h"
#include "spi/ws2san.h"

namespace {

struct Upcalled {
  SOCKET s;
  DWORD error;
  DWORD bytes;
};

std::mutex g_mu;
std::condition_variable g_cv;
std::map<LPWSAOVERLAPPED, Upcalled> g_upcalls;  // guarded by g_mu

int Upcall(SOCKET s, LPWSAOVERLAPPED ov, DWORD error, DWORD bytes, LPINT err) {
  {
    std::lock_guard<std::mutex> l(g_mu);
    g_upcalls[ov] = Upcalled{s, error, bytes};
  }
  g_cv.notify_all();
  *err = 0;
  return 0;
}

// Page-aligned anonymous memory.
class Mapped {
 public:
  explicit Mapped(size_t n) : n_(n) {
    p_ = static_cast<char*>(
        mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  }
  ~Mapped() {
    if (p_ != nullptr) munmap(p_, n_);
  }
  char* data() { return p_; }
  size_t size() const { return n_; }
  void Fill(int seed) {
    for (size_t i = 0; i < n_; ++i) p_[i] = static_cast<char>((i * 131 + seed * 7) >> 2);
  }
  void Unmap() {
    munmap(p_, n_);
    p_ = nullptr;
  }

 private:
  char* p_;
  size_t n_;
};

class SpiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    {
      std::lock_guard<std::mutex> l(g_mu);
      g_upcalls.clear();
    }
    WSPUPCALLTABLEEX up{};
    up.lpWPUCompleteOverlappedRequest = &Upcall;
    WSPDATA data;
    ASSERT_EQ(WSPStartupEx(SANREG_WSP_VERSION, &data, nullptr, &up, &p_), 0);
    started_ = true;
    MakePair(&client_, &server_);
    ASSERT_NE(client_, INVALID_SOCKET);
    ASSERT_EQ(sanreg::LoadExtensionTable(p_, client_, &x_, &err_), 0) << err_;
  }
  void TearDown() override {
    if (started_) EXPECT_EQ(p_.lpWSPCleanup(&err_), 0);
  }

  // A connected pair over loopback: *c connected to *s.
  void MakePair(SOCKET* c, SOCKET* s) {
    *c = *s = INVALID_SOCKET;
    int e = 0;
    SOCKET l = p_.lpWSPSocket(AF_INET, SOCK_STREAM, 0, nullptr, 0, 0, &e);
    ASSERT_NE(l, INVALID_SOCKET);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(p_.lpWSPBind(l, reinterpret_cast<sockaddr*>(&a), sizeof a, &e), 0) << e;
    ASSERT_EQ(p_.lpWSPListen(l, 4, &e), 0) << e;
    int alen = sizeof a;
    ASSERT_EQ(p_.lpWSPGetSockName(l, reinterpret_cast<sockaddr*>(&a), &alen, &e), 0) << e;
    SOCKET accepted = INVALID_SOCKET;
    int ae = 0;
    std::thread t([&] { accepted = p_.lpWSPAccept(l, nullptr, nullptr, nullptr, 0, &ae); });
    SOCKET conn = p_.lpWSPSocket(AF_INET, SOCK_STREAM, 0, nullptr, 0, 0, &e);
    int rc = p_.lpWSPConnect(conn, reinterpret_cast<sockaddr*>(&a), sizeof a, nullptr, nullptr,
                             nullptr, nullptr, &e);
    t.join();
    ASSERT_EQ(rc, 0) << e;
    ASSERT_NE(accepted, INVALID_SOCKET) << ae;
    EXPECT_EQ(p_.lpWSPCloseSocket(l, &e), 0);
    *c = conn;
    *s = accepted;
  }

  HANDLE Register(SOCKET s, void* buf, DWORD len, DWORD flags) {
    HANDLE h = x_.reg(s, buf, len, flags, &err_);
    EXPECT_NE(h, nullptr) << err_;
    return h;
  }
  std::vector<uint8_t> RegisterRdma(SOCKET s, void* buf, DWORD len, DWORD flags) {
    std::vector<uint8_t> d(256);
    DWORD n = static_cast<DWORD>(d.size());
    EXPECT_EQ(x_.reg_rdma(s, buf, len, flags, d.data(), &n, &err_), 0) << err_;
    d.resize(n);
    return d;
  }
  // Starts a write (or read) of one buffer; returns the call's result and *err.
  int Rdma(bool write, SOCKET s, void* buf, DWORD len, HANDLE h, std::vector<uint8_t>& desc,
           DWORD offset, WSAOVERLAPPED* ov) {
    if (ov != nullptr) {
      std::lock_guard<std::mutex> l(g_mu);
      g_upcalls.erase(ov);  // a record left by an earlier operation at the same address
    }
    WSABUFEX b{len, static_cast<char*>(buf), h};
    DWORD bytes = 0;
    auto fn = write ? x_.write : x_.read;
    return fn(s, &b, 1, desc.data(), static_cast<DWORD>(desc.size()), offset, &bytes, 0, ov,
              nullptr, nullptr, &err_);
  }
  // Waits for the upcall of ov.
  Upcalled WaitUpcall(WSAOVERLAPPED* ov) {
    std::unique_lock<std::mutex> l(g_mu);
    g_cv.wait(l, [&] { return g_upcalls.count(ov) > 0; });
    Upcalled u = g_upcalls[ov];
    g_upcalls.erase(ov);
    return u;
  }
  // Runs one transfer to completion through the upcall; returns the completion error.
  DWORD RdmaAndWait(bool write, SOCKET s, void* buf, DWORD len, HANDLE h,
                    std::vector<uint8_t>& desc, DWORD offset = 0) {
    WSAOVERLAPPED ov{};
    int rc = Rdma(write, s, buf, len, h, desc, offset, &ov);
    if (rc != SOCKET_ERROR || err_ != WSA_IO_PENDING) {
      ADD_FAILURE() << "rc " << rc << " err " << err_;
      return static_cast<DWORD>(err_);
    }
    Upcalled u = WaitUpcall(&ov);
    EXPECT_EQ(u.s, s);
    EXPECT_EQ(ov.Internal, u.error);
    if (u.error == 0) {
      EXPECT_EQ(u.bytes, len);
    }
    return u.error;
  }

  WSPPROC_TABLE p_{};
  bool started_ = false;
  int err_ = 0;
  SOCKET client_ = INVALID_SOCKET;
  SOCKET server_ = INVALID_SOCKET;
  sanreg::ExtensionTable x_;  // the extension functions
};

// ---- Entry points ----

TEST_F(SpiTest, EveryProcTableMemberIsNonNull) {
  void* members[30];
  static_assert(sizeof members == sizeof(WSPPROC_TABLE));
  std::memcpy(members, &p_, sizeof p_);
  for (void* m : members) EXPECT_NE(m, nullptr);
}

TEST_F(SpiTest, UnsupportedMemberIsWsaeopnotsupp) {
  EXPECT_EQ(p_.lpWSPShutdown(client_, 0, &err_), SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEOPNOTSUPP);
  err_ = 0;
  EXPECT_EQ(p_.lpWSPEventSelect(client_, nullptr, 0, &err_), SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEOPNOTSUPP);
  err_ = 0;
  EXPECT_EQ(p_.lpWSPJoinLeaf(client_, nullptr, 0, nullptr, nullptr, nullptr, nullptr, 0, &err_),
            INVALID_SOCKET);
  EXPECT_EQ(err_, WSAEOPNOTSUPP);
}

TEST_F(SpiTest, StartupReturnsErrorCodesDirectly) {
  WSPUPCALLTABLEEX up{};
  WSPPROC_TABLE t;
  EXPECT_EQ(WSPStartupEx(0x0101, nullptr, nullptr, &up, &t), WSAVERNOTSUPPORTED);
  EXPECT_EQ(WSPStartupEx(SANREG_WSP_VERSION, nullptr, nullptr, &up, nullptr), WSAEFAULT);
}

TEST_F(SpiTest, ProtocolInfoChoosesTheProviderUnlessSanregFabricIsSet) {
  ASSERT_EQ(p_.lpWSPCleanup(&err_), 0);
  started_ = false;
  WSAPROTOCOL_INFOW info{};
  info.szProtocol[0] = 's';
  info.szProtocol[1] = 'h';
  info.szProtocol[2] = 'm';
  WSPUPCALLTABLEEX up{};
  up.lpWPUCompleteOverlappedRequest = &Upcall;
  ASSERT_EQ(WSPStartupEx(SANREG_WSP_VERSION, nullptr, &info, &up, &p_), 0);
  started_ = true;
  const char* env = std::getenv("SANREG_FABRIC");
  std::string provider = sanreg::spi::internal::ProviderForTest();
  if (env == nullptr || *env == '\0') {
    EXPECT_EQ(provider, "shm");
  } else if (std::string(env) == "tcp") {
    EXPECT_NE(provider.find("tcp"), std::string::npos) << provider;
  }
}

TEST_F(SpiTest, IoctlHandsOutAllSevenExtensionFunctions) {
  const GUID ids[] = {WSAID_REGISTERMEMORY,      WSAID_DEREGISTERMEMORY, WSAID_REGISTERRDMAMEMORY,
                      WSAID_DEREGISTERRDMAMEMORY, WSAID_RDMAWRITE,        WSAID_RDMAREAD,
                      WSAID_MEMORYREGISTRATIONCACHECALLBACK};
  std::vector<void*> seen;
  for (GUID g : ids) {
    void* fn = nullptr;
    DWORD got = 0;
    ASSERT_EQ(p_.lpWSPIoctl(client_, SIO_GET_EXTENSION_FUNCTION_POINTER, &g, sizeof g, &fn,
                            sizeof fn, &got, nullptr, nullptr, nullptr, &err_),
              0);
    EXPECT_NE(fn, nullptr);
    EXPECT_EQ(got, sizeof fn);
    for (void* other : seen) EXPECT_NE(fn, other);
    seen.push_back(fn);
  }
}

TEST_F(SpiTest, UnknownGuidIsWsaeinval) {
  GUID g = WSAID_RDMAREAD;
  g.Data1 ^= 0x100;
  void* fn = nullptr;
  DWORD got = 0;
  EXPECT_EQ(p_.lpWSPIoctl(client_, SIO_GET_EXTENSION_FUNCTION_POINTER, &g, sizeof g, &fn,
                          sizeof fn, &got, nullptr, nullptr, nullptr, &err_),
            SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEINVAL);
  EXPECT_EQ(fn, nullptr);
}

TEST_F(SpiTest, InvalidSocketIsWsaenotsock) {
  const SOCKET bad = client_ ^ 0x10000;
  Mapped m(4096);
  EXPECT_EQ(x_.reg(bad, m.data(), 4096, MEM_READ, &err_), nullptr);
  EXPECT_EQ(err_, WSAENOTSOCK);
  EXPECT_EQ(p_.lpWSPCloseSocket(INVALID_SOCKET, &err_), SOCKET_ERROR);
  EXPECT_EQ(err_, WSAENOTSOCK);
  DWORD n = 64;
  std::vector<uint8_t> d(64);
  EXPECT_EQ(x_.reg_rdma(bad, m.data(), 4096, MEM_READ, d.data(), &n, &err_), SOCKET_ERROR);
  EXPECT_EQ(err_, WSAENOTSOCK);
  EXPECT_EQ(Rdma(true, bad, m.data(), 16, nullptr, d, 0, nullptr), SOCKET_ERROR);
  EXPECT_NE(err_, 0);
}

TEST_F(SpiTest, CallsAfterCleanupAreWsanotinitialised) {
  ASSERT_EQ(p_.lpWSPCleanup(&err_), 0);
  started_ = false;
  Mapped m(4096);
  EXPECT_EQ(x_.reg(client_, m.data(), 4096, MEM_READ, &err_), nullptr);
  EXPECT_EQ(err_, WSANOTINITIALISED);
  EXPECT_EQ(p_.lpWSPCleanup(&err_), SOCKET_ERROR);
  EXPECT_EQ(err_, WSANOTINITIALISED);
}

// ---- Registration ----

TEST_F(SpiTest, RegisterMemoryWithBadFlagsIsWsaeinval) {
  Mapped m(4096);
  for (DWORD flags : {DWORD{0}, DWORD{4}, DWORD{0x80000001}}) {
    EXPECT_EQ(x_.reg(client_, m.data(), 4096, flags, &err_), nullptr);
    EXPECT_EQ(err_, WSAEINVAL);
  }
}

TEST_F(SpiTest, RegisterMemoryOfInvalidRangeIsWsaefault) {
  Mapped m(8192);
  char* p = m.data();
  munmap(p + 4096, 4096);  // the second page is gone
  EXPECT_EQ(x_.reg(client_, p, 8192, MEM_READ, &err_), nullptr);
  EXPECT_EQ(err_, WSAEFAULT);
  EXPECT_EQ(x_.reg(client_, nullptr, 4096, MEM_READ, &err_), nullptr);
  EXPECT_EQ(err_, WSAEFAULT);
  EXPECT_EQ(x_.reg(client_, p, 0, MEM_READ, &err_), nullptr);
  EXPECT_EQ(err_, WSAEFAULT);
}

TEST_F(SpiTest, RegisterMemoryOnUnconnectedSocketIsWsaenotconn) {
  SOCKET s = p_.lpWSPSocket(AF_INET, SOCK_STREAM, 0, nullptr, 0, 0, &err_);
  Mapped m(4096);
  EXPECT_EQ(x_.reg(s, m.data(), 4096, MEM_READ, &err_), nullptr);
  EXPECT_EQ(err_, WSAENOTCONN);
}

TEST_F(SpiTest, ForgedHandleIsWsaeinval) {
  Mapped m(4096);
  HANDLE h = Register(client_, m.data(), 4096, MEM_READ);
  for (int i = 0; i < 100; ++i) {
    uintptr_t forged;
    ASSERT_EQ(getrandom(&forged, sizeof forged, 0), static_cast<ssize_t>(sizeof forged));
    if (forged == reinterpret_cast<uintptr_t>(h)) continue;
    EXPECT_EQ(x_.dereg(client_, reinterpret_cast<HANDLE>(forged), &err_), SOCKET_ERROR);
    EXPECT_EQ(err_, WSAEINVAL);
  }
  // Near misses: the same slot with another generation, the neighbouring slots.
  for (uintptr_t delta : {uintptr_t{1}, uintptr_t{1} << 32, uintptr_t{3} << 32}) {
    EXPECT_EQ(
        x_.dereg(client_, reinterpret_cast<HANDLE>(reinterpret_cast<uintptr_t>(h) ^ delta), &err_),
        SOCKET_ERROR);
    EXPECT_EQ(err_, WSAEINVAL);
  }
  EXPECT_EQ(x_.dereg(client_, nullptr, &err_), SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEINVAL);
  EXPECT_EQ(x_.dereg(client_, h, &err_), 0);
}

TEST_F(SpiTest, StaleHandleIsWsaeinval) {
  Mapped m(4096);
  HANDLE h = Register(client_, m.data(), 4096, MEM_READ);
  ASSERT_EQ(x_.dereg(client_, h, &err_), 0);
  EXPECT_EQ(x_.dereg(client_, h, &err_), SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEINVAL);
  // The slot is reused by the next registration; the old handle still names nothing.
  HANDLE h2 = Register(client_, m.data(), 4096, MEM_READ);
  EXPECT_NE(h2, h);
  EXPECT_EQ(x_.dereg(client_, h, &err_), SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEINVAL);
  EXPECT_EQ(x_.dereg(client_, h2, &err_), 0);
}

TEST_F(SpiTest, HandleIsValidOnlyOnTheSocketThatRegisteredIt) {
  Mapped src(4096), tgt(4096);
  HANDLE h = Register(client_, src.data(), 4096, MEM_READ);
  EXPECT_EQ(x_.dereg(server_, h, &err_), SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEINVAL);
  // A transfer on the other socket with it is refused too.
  std::vector<uint8_t> desc = RegisterRdma(client_, tgt.data(), 4096, MEM_WRITE);
  WSAOVERLAPPED ov{};
  EXPECT_EQ(Rdma(true, server_, src.data(), 16, h, desc, 0, &ov), SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEINVAL);
  EXPECT_EQ(x_.dereg(client_, h, &err_), 0);
}

TEST_F(SpiTest, RepeatedRegistrationCountsReferences) {
  Mapped src(4096), tgt(4096);
  src.Fill(1);
  std::memset(tgt.data(), 0, 4096);
  HANDLE h1 = Register(client_, src.data(), 4096, MEM_READ);
  HANDLE h2 = Register(client_, src.data(), 4096, MEM_READ);
  std::vector<uint8_t> desc = RegisterRdma(server_, tgt.data(), 4096, MEM_WRITE);
  ASSERT_EQ(x_.dereg(client_, h1, &err_), 0);
  // The other reference still holds the registration: a write through it works.
  ASSERT_EQ(RdmaAndWait(true, client_, src.data(), 4096, h2, desc), 0u);
  EXPECT_EQ(std::memcmp(tgt.data(), src.data(), 4096), 0);
  EXPECT_EQ(x_.dereg(client_, h2, &err_), 0);
}

TEST_F(SpiTest, LastDeregistrationKeepsTheBufferCachedAndTheNextRegistrationIsAHit) {
  Mapped m(1 << 16);
  HANDLE h = Register(client_, m.data(), 1 << 16, MEM_READ);
  ASSERT_EQ(x_.dereg(client_, h, &err_), 0);
  sanreg::CacheStats before = sanreg::spi::internal::CacheStatsForTest();
  h = Register(client_, m.data(), 1 << 16, MEM_READ);
  sanreg::CacheStats after = sanreg::spi::internal::CacheStatsForTest();
  EXPECT_EQ(after.registrations, before.registrations);
  EXPECT_EQ(after.hits, before.hits + 1);
  EXPECT_EQ(x_.dereg(client_, h, &err_), 0);
}

TEST_F(SpiTest, DescriptorProbeReportsNeededSize) {
  Mapped m(4096);
  DWORD n = 0;
  EXPECT_EQ(x_.reg_rdma(server_, m.data(), 4096, MEM_READ, nullptr, &n, &err_), SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEFAULT);
  ASSERT_GT(n, 0u);
  std::vector<uint8_t> d(n - 1);
  DWORD small = n - 1;
  EXPECT_EQ(x_.reg_rdma(server_, m.data(), 4096, MEM_READ, d.data(), &small, &err_), SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEFAULT);
  EXPECT_EQ(small, n);
  d.resize(n + 100);
  DWORD big = n + 100;
  ASSERT_EQ(x_.reg_rdma(server_, m.data(), 4096, MEM_READ, d.data(), &big, &err_), 0);
  EXPECT_EQ(big, n);  // on success: the size written
  d.resize(big);
  EXPECT_EQ(x_.dereg_rdma(server_, d.data(), big, &err_), 0);
  EXPECT_EQ(sanreg::spi::internal::RdmaRegistrationsForTest(), 0u);
}

TEST_F(SpiTest, DeregisterRdmaOfForgedOrTruncatedDescriptorIsWsaeinval) {
  Mapped m(4096);
  std::vector<uint8_t> d = RegisterRdma(server_, m.data(), 4096, MEM_READ);
  std::vector<uint8_t> forged(d.size());
  ASSERT_EQ(getrandom(forged.data(), forged.size(), 0), static_cast<ssize_t>(forged.size()));
  EXPECT_EQ(x_.dereg_rdma(server_, forged.data(), static_cast<DWORD>(forged.size()), &err_),
            SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEINVAL);
  EXPECT_EQ(x_.dereg_rdma(server_, d.data(), static_cast<DWORD>(d.size()) - 1, &err_),
            SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEINVAL);
  // Foreign: the descriptor is not registered on the other socket.
  EXPECT_EQ(x_.dereg_rdma(client_, d.data(), static_cast<DWORD>(d.size()), &err_), SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEINVAL);
  EXPECT_EQ(sanreg::spi::internal::RdmaRegistrationsForTest(), 1u);
  EXPECT_EQ(x_.dereg_rdma(server_, d.data(), static_cast<DWORD>(d.size()), &err_), 0);
  // Stale: deregistered already.
  EXPECT_EQ(x_.dereg_rdma(server_, d.data(), static_cast<DWORD>(d.size()), &err_), SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEINVAL);
}

TEST_F(SpiTest, DescriptorIsValidOnlyForThePeerOfItsSocket) {
  SOCKET c2, s2;
  MakePair(&c2, &s2);
  Mapped src(4096), tgt(4096);
  src.Fill(2);
  std::memset(tgt.data(), 0, 4096);
  std::vector<uint8_t> desc = RegisterRdma(server_, tgt.data(), 4096, MEM_WRITE);
  HANDLE h = Register(c2, src.data(), 4096, MEM_READ);
  WSAOVERLAPPED ov{};
  EXPECT_EQ(Rdma(true, c2, src.data(), 4096, h, desc, 0, &ov), SOCKET_ERROR);
  EXPECT_NE(err_, WSA_IO_PENDING);
  EXPECT_NE(err_, 0);
  EXPECT_EQ(tgt.data()[0], 0);
  EXPECT_EQ(std::memcmp(tgt.data(), std::vector<char>(4096, 0).data(), 4096), 0);
}

// ---- Transfers ----

TEST_F(SpiTest, RdmaWriteMovesDataAndCompletesThroughUpcall) {
  const DWORD kN = 1 << 20;
  Mapped src(kN), tgt(kN);
  src.Fill(3);
  std::memset(tgt.data(), 0, kN);
  HANDLE h = Register(client_, src.data(), kN, MEM_READ);
  std::vector<uint8_t> desc = RegisterRdma(server_, tgt.data(), kN, MEM_WRITE);
  ASSERT_EQ(RdmaAndWait(true, client_, src.data(), 1000, h, desc, 4096), 0u);
  EXPECT_EQ(std::memcmp(tgt.data() + 4096, src.data(), 1000), 0);
  EXPECT_EQ(tgt.data()[4095], 0);
  EXPECT_EQ(tgt.data()[4096 + 1000], 0);
  ASSERT_EQ(RdmaAndWait(true, client_, src.data(), kN, h, desc, 0), 0u);
  EXPECT_EQ(std::memcmp(tgt.data(), src.data(), kN), 0);
}

TEST_F(SpiTest, RdmaReadMovesDataAndCompletesThroughUpcall) {
  const DWORD kN = 1 << 20;
  Mapped src(kN), dst(kN);
  src.Fill(4);
  std::memset(dst.data(), 0, kN);
  HANDLE h = Register(client_, dst.data(), kN, MEM_WRITE);
  std::vector<uint8_t> desc = RegisterRdma(server_, src.data(), kN, MEM_READ);
  ASSERT_EQ(RdmaAndWait(false, client_, dst.data(), kN - 8192, h, desc, 8192), 0u);
  EXPECT_EQ(std::memcmp(dst.data(), src.data() + 8192, kN - 8192), 0);
  EXPECT_EQ(dst.data()[kN - 8192], 0);
}

TEST_F(SpiTest, PollingOverlappedWhenHEventLowBitSet) {
  const DWORD kN = 1 << 20;
  Mapped src(kN), tgt(kN);
  src.Fill(5);
  std::memset(tgt.data(), 0, kN);
  HANDLE h = Register(client_, src.data(), kN, MEM_READ);
  std::vector<uint8_t> desc = RegisterRdma(server_, tgt.data(), kN, MEM_WRITE);
  WSAOVERLAPPED ov{};
  ov.hEvent = reinterpret_cast<HANDLE>(uintptr_t{0x1001});
  ASSERT_EQ(Rdma(true, client_, src.data(), kN, h, desc, 0, &ov), SOCKET_ERROR);
  ASSERT_EQ(err_, WSA_IO_PENDING);
  DWORD bytes = 0, flags = 0;
  ASSERT_EQ(p_.lpWSPGetOverlappedResult(client_, &ov, &bytes, TRUE, &flags, &err_), TRUE) << err_;
  EXPECT_EQ(bytes, kN);
  EXPECT_EQ(std::memcmp(tgt.data(), src.data(), kN), 0);
  // Without waiting, once complete: the same answer.
  bytes = 0;
  EXPECT_EQ(p_.lpWSPGetOverlappedResult(client_, &ov, &bytes, FALSE, &flags, &err_), TRUE);
  EXPECT_EQ(bytes, kN);
  // The provider never signalled it: the completion was stored before the upcall would run,
  // and no upcall record exists for it.
  {
    std::lock_guard<std::mutex> l(g_mu);
    EXPECT_EQ(g_upcalls.count(&ov), 0u);
  }
  // Still running, not waiting: WSA_IO_INCOMPLETE.
  WSAOVERLAPPED running{};
  running.hEvent = reinterpret_cast<HANDLE>(uintptr_t{1});
  running.Internal = WSS_OPERATION_IN_PROGRESS;
  EXPECT_EQ(p_.lpWSPGetOverlappedResult(client_, &running, &bytes, FALSE, &flags, &err_), FALSE);
  EXPECT_EQ(err_, WSA_IO_INCOMPLETE);
}

TEST_F(SpiTest, OutOfBoundsTransferIsRefusedAndMovesNothing) {
  Mapped src(8192), tgt(4096);
  src.Fill(6);
  std::memset(tgt.data(), 0, 4096);
  HANDLE h = Register(client_, src.data(), 8192, MEM_READ);
  std::vector<uint8_t> desc = RegisterRdma(server_, tgt.data(), 4096, MEM_WRITE);
  WSAOVERLAPPED ov{};
  EXPECT_EQ(Rdma(true, client_, src.data(), 4096, h, desc, 1, &ov), SOCKET_ERROR);
  EXPECT_NE(err_, WSA_IO_PENDING);
  EXPECT_EQ(Rdma(true, client_, src.data(), 8192, h, desc, 0, &ov), SOCKET_ERROR);
  EXPECT_NE(err_, WSA_IO_PENDING);
  EXPECT_EQ(Rdma(true, client_, src.data(), 1, h, desc, 4096, &ov), SOCKET_ERROR);
  EXPECT_NE(err_, WSA_IO_PENDING);
  // Local buffer outside its registration.
  HANDLE small = Register(client_, src.data(), 100, MEM_READ);
  EXPECT_EQ(Rdma(true, client_, src.data() + 8000, 100, small, desc, 0, &ov), SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEFAULT);
  EXPECT_EQ(std::memcmp(tgt.data(), std::vector<char>(4096, 0).data(), 4096), 0);
}

TEST_F(SpiTest, ForgedDescriptorTransferIsRefusedAndMovesNothing) {
  Mapped src(4096);
  HANDLE h = Register(client_, src.data(), 4096, MEM_READ);
  std::vector<uint8_t> desc(64);
  ASSERT_EQ(getrandom(desc.data(), desc.size(), 0), 64);
  WSAOVERLAPPED ov{};
  EXPECT_EQ(Rdma(true, client_, src.data(), 16, h, desc, 0, &ov), SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEINVAL);
  std::vector<uint8_t> truncated(10);
  EXPECT_EQ(Rdma(true, client_, src.data(), 16, h, truncated, 0, &ov), SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEINVAL);
}

TEST_F(SpiTest, ReadOnlyMemoryIsNeverWritableByThePeer) {
  Mapped src(4096), tgt(4096);
  src.Fill(7);
  std::memset(tgt.data(), 0, 4096);
  HANDLE h = Register(client_, src.data(), 4096, MEM_READ);
  std::vector<uint8_t> desc = RegisterRdma(server_, tgt.data(), 4096, MEM_READ);
  WSAOVERLAPPED ov{};
  EXPECT_EQ(Rdma(true, client_, src.data(), 4096, h, desc, 0, &ov), SOCKET_ERROR);
  EXPECT_NE(err_, WSA_IO_PENDING);
  EXPECT_EQ(std::memcmp(tgt.data(), std::vector<char>(4096, 0).data(), 4096), 0);
}

TEST_F(SpiTest, WriteOnlyMemoryIsNeverReadable) {
  Mapped dst(4096), tgt(4096);
  tgt.Fill(8);
  std::memset(dst.data(), 0, 4096);
  HANDLE h = Register(client_, dst.data(), 4096, MEM_WRITE);
  std::vector<uint8_t> desc = RegisterRdma(server_, tgt.data(), 4096, MEM_WRITE);
  WSAOVERLAPPED ov{};
  EXPECT_EQ(Rdma(false, client_, dst.data(), 4096, h, desc, 0, &ov), SOCKET_ERROR);
  EXPECT_NE(err_, WSA_IO_PENDING);
  EXPECT_EQ(std::memcmp(dst.data(), std::vector<char>(4096, 0).data(), 4096), 0);
}

// The same rule against a peer that forges the descriptor (its checksum catches corruption, not
// forgery): MEM_WRITE memory's descriptor given read rights passes the initiator's checks, and the
// target's provider must refuse the read. On tcp, whatever SANREG_FABRIC says: tcp's RDM endpoints
// (tcp;ofi_rxm) make every registration readable, so this is what tcp must be seen to hold.
TEST_F(SpiTest, WriteOnlyMemoryIsNotReadableWithAForgedDescriptorOnTcp) {
  ASSERT_EQ(p_.lpWSPCleanup(&err_), 0);
  started_ = false;
  const char* env = std::getenv("SANREG_FABRIC");
  const std::string saved = env != nullptr ? env : "";
  unsetenv("SANREG_FABRIC");
  WSAPROTOCOL_INFOW info{};
  info.szProtocol[0] = 't';
  info.szProtocol[1] = 'c';
  info.szProtocol[2] = 'p';
  WSPUPCALLTABLEEX up{};
  up.lpWPUCompleteOverlappedRequest = &Upcall;
  const int started = WSPStartupEx(SANREG_WSP_VERSION, nullptr, &info, &up, &p_);
  if (env != nullptr) setenv("SANREG_FABRIC", saved.c_str(), 1);
  ASSERT_EQ(started, 0);
  started_ = true;
  ASSERT_EQ(sanreg::spi::internal::ProviderForTest(), "tcp");
  MakePair(&client_, &server_);
  ASSERT_NE(client_, INVALID_SOCKET);

  Mapped src(4096), dst(4096), tgt(4096);
  HANDLE from = Register(client_, src.data(), 4096, MEM_READ);
  HANDLE into = Register(client_, dst.data(), 4096, MEM_WRITE);
  std::vector<uint8_t> desc = RegisterRdma(server_, tgt.data(), 4096, MEM_WRITE);
  // The peer may write it.
  src.Fill(3);
  ASSERT_EQ(RdmaAndWait(true, client_, src.data(), 4096, from, desc), 0u);
  ASSERT_EQ(std::memcmp(tgt.data(), src.data(), 4096), 0);
  // It may not read it, with a descriptor that says it may.
  tgt.Fill(8);
  std::memset(dst.data(), 0x5a, 4096);
  absl::StatusOr<sanreg::RemoteRegion> region = sanreg::RemoteRegion::Parse(desc);
  ASSERT_TRUE(region.ok()) << region.status();
  ASSERT_EQ(region->rights, uint32_t{sanreg::kAccessRemoteWrite});
  region->rights |= sanreg::kAccessRemoteRead;
  std::vector<uint8_t> forged(desc.size());
  ASSERT_TRUE(region->Serialize(forged).ok());
  const DWORD error = RdmaAndWait(false, client_, dst.data(), 4096, into, forged);
  EXPECT_EQ(error, static_cast<DWORD>(WSAEFAULT)) << "not refused as an access: " << error;
  EXPECT_EQ(std::memcmp(dst.data(), std::vector<char>(4096, 0x5a).data(), 4096), 0)
      << "bytes of the peer's write-only memory were read";
  Mapped expect(4096);
  expect.Fill(8);
  EXPECT_EQ(std::memcmp(tgt.data(), expect.data(), 4096), 0);
}

TEST_F(SpiTest, ReadIntoReadOnlyLocalRegistrationIsRefused) {
  Mapped dst(4096), tgt(4096);
  HANDLE h = Register(client_, dst.data(), 4096, MEM_READ);
  std::vector<uint8_t> desc = RegisterRdma(server_, tgt.data(), 4096, MEM_READ);
  WSAOVERLAPPED ov{};
  EXPECT_EQ(Rdma(false, client_, dst.data(), 4096, h, desc, 0, &ov), SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEINVAL);
}

TEST_F(SpiTest, ProviderReportsItsLimitInSoMaxRdmaSizeAndRefusesLarger) {
  DWORD max = 0;
  int len = sizeof max;
  ASSERT_EQ(p_.lpWSPGetSockOpt(client_, SOL_SOCKET, SO_MAX_RDMA_SIZE,
                               reinterpret_cast<char*>(&max), &len, &err_),
            0);
  EXPECT_EQ(len, static_cast<int>(sizeof max));
  ASSERT_GT(max, 0u);
  Mapped src(size_t{max} + 4096), tgt(size_t{max} + 4096);
  HANDLE h = Register(client_, src.data(), max + 4096, MEM_READ);
  std::vector<uint8_t> desc = RegisterRdma(server_, tgt.data(), max + 4096, MEM_WRITE);
  WSAOVERLAPPED ov{};
  EXPECT_EQ(Rdma(true, client_, src.data(), max + 1, h, desc, 0, &ov), SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEMSGSIZE);
  // SO_MAX_RDMA_SIZE is read-only; SO_RDMA_THRESHOLD_SIZE is the socket's own.
  EXPECT_EQ(p_.lpWSPSetSockOpt(client_, SOL_SOCKET, SO_MAX_RDMA_SIZE,
                               reinterpret_cast<char*>(&max), sizeof max, &err_),
            SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEINVAL);
  DWORD threshold = 12345, got = 0;
  ASSERT_EQ(p_.lpWSPSetSockOpt(client_, SOL_SOCKET, SO_RDMA_THRESHOLD_SIZE,
                               reinterpret_cast<char*>(&threshold), sizeof threshold, &err_),
            0);
  len = sizeof got;
  ASSERT_EQ(p_.lpWSPGetSockOpt(client_, SOL_SOCKET, SO_RDMA_THRESHOLD_SIZE,
                               reinterpret_cast<char*>(&got), &len, &err_),
            0);
  EXPECT_EQ(got, threshold);
  len = 2;
  EXPECT_EQ(p_.lpWSPGetSockOpt(client_, SOL_SOCKET, SO_RDMA_THRESHOLD_SIZE,
                               reinterpret_cast<char*>(&got), &len, &err_),
            SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEFAULT);
}

TEST_F(SpiTest, CompletionRoutineIsWsaeopnotsupp) {
  Mapped src(4096), tgt(4096);
  HANDLE h = Register(client_, src.data(), 4096, MEM_READ);
  std::vector<uint8_t> desc = RegisterRdma(server_, tgt.data(), 4096, MEM_WRITE);
  WSABUFEX b{16, src.data(), h};
  WSAOVERLAPPED ov{};
  DWORD bytes = 0;
  auto routine = [](DWORD, DWORD, LPWSAOVERLAPPED, DWORD) {};
  EXPECT_EQ(x_.write(client_, &b, 1, desc.data(), 64, 0, &bytes, 0, &ov, routine, nullptr, &err_),
            SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEOPNOTSUPP);
}

TEST_F(SpiTest, DeregisterWhileInFlightIsWsaeinvalAndCloseAbortsTransfersInFlight) {
  // Many large writes, then close at once: the ones still in flight complete with
  // WSA_OPERATION_ABORTED (through the upcall), and their memory is released.
  const DWORD kN = 4 << 20;
  const int kOps = 32;
  Mapped src(kN), tgt(kN);
  HANDLE h = Register(client_, src.data(), kN, MEM_READ);
  std::vector<uint8_t> desc = RegisterRdma(server_, tgt.data(), kN, MEM_WRITE);
  std::vector<WSAOVERLAPPED> ovs(kOps);
  for (int i = 0; i < kOps; ++i) {
    ASSERT_EQ(Rdma(true, client_, src.data(), kN, h, desc, 0, &ovs[i]), SOCKET_ERROR);
    ASSERT_EQ(err_, WSA_IO_PENDING);
  }
  bool last_done;
  {
    std::lock_guard<std::mutex> l(g_mu);
    last_done = g_upcalls.count(&ovs[kOps - 1]) > 0;
  }
  int rc = x_.dereg(client_, h, &err_);
  if (!last_done) {
    // Only meaningful while the last one had not completed when checked (it is then in flight or
    // completing): the deregistration may not take the memory away from under it.
    if (rc == SOCKET_ERROR) {
      EXPECT_EQ(err_, WSAEINVAL);
    }
  }
  ASSERT_EQ(p_.lpWSPCloseSocket(client_, &err_), 0);
  int aborted = 0;
  for (int i = 0; i < kOps; ++i) {
    Upcalled u = WaitUpcall(&ovs[i]);
    EXPECT_TRUE(u.error == 0 || u.error == WSA_OPERATION_ABORTED) << u.error;
    aborted += u.error == WSA_OPERATION_ABORTED;
  }
  EXPECT_GT(aborted, 0);
  // The handle went with the socket.
  EXPECT_EQ(x_.dereg(client_, h, &err_), SOCKET_ERROR);
}

// ---- Caching ----

TEST_F(SpiTest, LastRdmaDeregistrationRevokesPeerAccess) {
  Mapped src(4096), tgt(4096);
  src.Fill(9);
  std::memset(tgt.data(), 0, 4096);
  HANDLE h = Register(client_, src.data(), 4096, MEM_READ);
  std::vector<uint8_t> d1 = RegisterRdma(server_, tgt.data(), 4096, MEM_WRITE);
  std::vector<uint8_t> d2 = RegisterRdma(server_, tgt.data(), 4096, MEM_WRITE);
  EXPECT_EQ(d1, d2);  // the same registration, counted twice
  ASSERT_EQ(x_.dereg_rdma(server_, d1.data(), 64, &err_), 0);
  ASSERT_EQ(RdmaAndWait(true, client_, src.data(), 100, h, d1), 0u);  // one reference left
  EXPECT_EQ(std::memcmp(tgt.data(), src.data(), 100), 0);
  std::memset(tgt.data(), 0, 4096);
  ASSERT_EQ(x_.dereg_rdma(server_, d1.data(), 64, &err_), 0);
  // The peer lost access at once, though the pages stay pinned in the cache.
  WSAOVERLAPPED ov{};
  int rc = Rdma(true, client_, src.data(), 100, h, d1, 0, &ov);
  if (rc == SOCKET_ERROR && err_ == WSA_IO_PENDING) {
    EXPECT_NE(WaitUpcall(&ov).error, 0u);
  } else {
    EXPECT_EQ(rc, SOCKET_ERROR);
  }
  EXPECT_EQ(std::memcmp(tgt.data(), std::vector<char>(4096, 0).data(), 4096), 0);
}

TEST_F(SpiTest, RdmaRegistrationAfterTheLastDeregistrationReExposes) {
  Mapped src(4096), tgt(4096);
  src.Fill(10);
  std::memset(tgt.data(), 0, 4096);
  HANDLE h = Register(client_, src.data(), 4096, MEM_READ);
  std::vector<uint8_t> d1 = RegisterRdma(server_, tgt.data(), 4096, MEM_WRITE);
  ASSERT_EQ(x_.dereg_rdma(server_, d1.data(), 64, &err_), 0);
  sanreg::CacheStats before = sanreg::spi::internal::CacheStatsForTest();
  std::vector<uint8_t> d2 = RegisterRdma(server_, tgt.data(), 4096, MEM_WRITE);
  sanreg::CacheStats after = sanreg::spi::internal::CacheStatsForTest();
  EXPECT_EQ(after.hits, before.hits + 1);  // the pinning stayed cached
  EXPECT_NE(d1, d2);
  EXPECT_EQ(x_.dereg_rdma(server_, d1.data(), 64, &err_), SOCKET_ERROR);  // d1 is stale
  EXPECT_EQ(err_, WSAEINVAL);
  ASSERT_EQ(RdmaAndWait(true, client_, src.data(), 4096, h, d2), 0u);
  EXPECT_EQ(std::memcmp(tgt.data(), src.data(), 4096), 0);
}

TEST_F(SpiTest, CacheCallbackDropsCachedRegistration) {
  Mapped m(1 << 16);
  HANDLE h = Register(client_, m.data(), 1 << 16, MEM_READ);
  ASSERT_EQ(x_.dereg(client_, h, &err_), 0);
  sanreg::CacheStats before = sanreg::spi::internal::CacheStatsForTest();
  ASSERT_EQ(x_.cache_cb(m.data(), 1 << 16, &err_), 0) << err_;
  sanreg::CacheStats mid = sanreg::spi::internal::CacheStatsForTest();
  EXPECT_GT(mid.invalidations, before.invalidations);
  EXPECT_GT(mid.deregistrations, before.deregistrations);  // deregistered before it returned
  h = Register(client_, m.data(), 1 << 16, MEM_READ);
  sanreg::CacheStats after = sanreg::spi::internal::CacheStatsForTest();
  EXPECT_EQ(after.registrations, mid.registrations + 1);  // registered anew
  EXPECT_EQ(x_.dereg(client_, h, &err_), 0);
}

TEST_F(SpiTest, CacheCallbackOfUncachedRangeIsWsaeinval) {
  Mapped m(4096);
  EXPECT_EQ(x_.cache_cb(m.data(), 4096, &err_), SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEINVAL);
  EXPECT_EQ(x_.cache_cb(m.data(), 0, &err_), SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEINVAL);
}

// Once a transfer's completion is reported, the SPI holds nothing of its buffers: deregistering
// them and dropping the range from the cache right away leaves no byte pinned (found by the SPI
// fuzzer: the completed operation's last references went only after the upcall had run).
TEST_F(SpiTest, ACompletedTransferHoldsNoRegistration) {
  Mapped src(4096), dst(4096);
  src.Fill(3);
  std::vector<uint8_t> desc = RegisterRdma(server_, dst.data(), 4096, MEM_WRITE);
  for (int i = 0; i < 50; ++i) {
    HANDLE h = Register(client_, src.data(), 4096, MEM_READ);
    ASSERT_EQ(RdmaAndWait(true, client_, src.data(), 4096, h, desc), 0u);
    ASSERT_EQ(x_.dereg(client_, h, &err_), 0) << err_;
    ASSERT_EQ(x_.cache_cb(src.data(), 4096, &err_), 0) << err_;
    sanreg::spi::internal::FlushCacheForTest();
    // What stays pinned is the target's exposed page only.
    ASSERT_EQ(sanreg::spi::internal::CacheStatsForTest().pinned_bytes, 4096u) << "round " << i;
  }
  EXPECT_EQ(std::memcmp(dst.data(), src.data(), 4096), 0);
  EXPECT_EQ(x_.dereg_rdma(server_, desc.data(), static_cast<DWORD>(desc.size()), &err_), 0);
}

// A mapping changes a page at a time: a callback over other bytes of an exposed range's page
// revokes it too (found by the SPI fuzzer: the revocation compared bytes, the cache pages).
TEST_F(SpiTest, CacheCallbackRevokesRdmaRegistrationsSharingAPageWithTheRange) {
  Mapped src(4096), dst(4096);
  src.Fill(5);
  std::memset(dst.data(), 0, 4096);
  std::vector<uint8_t> desc = RegisterRdma(server_, dst.data() + 100, 100, MEM_WRITE);
  ASSERT_EQ(x_.cache_cb(dst.data() + 300, 100, &err_), 0) << err_;
  HANDLE h = Register(client_, src.data(), 100, MEM_READ);
  EXPECT_NE(RdmaAndWait(true, client_, src.data(), 100, h, desc), 0u);
  for (int i = 0; i < 4096; ++i) ASSERT_EQ(dst.data()[i], 0) << "byte " << i << " was written";
}

TEST_F(SpiTest, CacheCallbackRevokesRdmaRegistrationsOverTheRange) {
  Mapped src(4096), tgt(4096);
  src.Fill(11);
  std::memset(tgt.data(), 0, 4096);
  HANDLE h = Register(client_, src.data(), 4096, MEM_READ);
  std::vector<uint8_t> d = RegisterRdma(server_, tgt.data(), 4096, MEM_WRITE);
  ASSERT_EQ(x_.cache_cb(tgt.data(), 4096, &err_), 0);
  WSAOVERLAPPED ov{};
  int rc = Rdma(true, client_, src.data(), 100, h, d, 0, &ov);
  if (rc == SOCKET_ERROR && err_ == WSA_IO_PENDING) {
    EXPECT_NE(WaitUpcall(&ov).error, 0u);
  }
  EXPECT_EQ(std::memcmp(tgt.data(), std::vector<char>(4096, 0).data(), 4096), 0);
  EXPECT_EQ(x_.dereg_rdma(server_, d.data(), 64, &err_), 0);
}

TEST_F(SpiTest, RdmaRegistrationAfterTheCacheCallbackGetsANewDescriptor) {
  Mapped src(4096), tgt(4096);
  src.Fill(12);
  std::memset(tgt.data(), 0, 4096);
  HANDLE h = Register(client_, src.data(), 4096, MEM_READ);
  std::vector<uint8_t> d1 = RegisterRdma(server_, tgt.data(), 4096, MEM_WRITE);
  ASSERT_EQ(x_.cache_cb(tgt.data(), 4096, &err_), 0);
  std::vector<uint8_t> d2 = RegisterRdma(server_, tgt.data(), 4096, MEM_WRITE);
  EXPECT_NE(d1, d2);
  ASSERT_EQ(RdmaAndWait(true, client_, src.data(), 4096, h, d2), 0u);
  EXPECT_EQ(std::memcmp(tgt.data(), src.data(), 4096), 0);
  EXPECT_EQ(x_.dereg_rdma(server_, d1.data(), 64, &err_), 0);  // the revoked one, still counted
  EXPECT_EQ(sanreg::spi::internal::RdmaRegistrationsForTest(), 1u);
  EXPECT_EQ(x_.dereg_rdma(server_, d2.data(), 64, &err_), 0);
  EXPECT_EQ(sanreg::spi::internal::RdmaRegistrationsForTest(), 0u);
}

// ---- Bad input on every entry point ----

TEST_F(SpiTest, NullErrorPointerFailsWithoutCrashing) {
  Mapped m(4096);
  EXPECT_EQ(x_.reg(client_, m.data(), 4096, MEM_READ, nullptr), nullptr);
  EXPECT_EQ(x_.dereg(client_, nullptr, nullptr), SOCKET_ERROR);
  DWORD n = 64;
  uint8_t d[64] = {};
  EXPECT_EQ(x_.reg_rdma(client_, m.data(), 4096, MEM_READ, d, &n, nullptr), SOCKET_ERROR);
  EXPECT_EQ(x_.dereg_rdma(client_, d, 64, nullptr), SOCKET_ERROR);
  WSABUFEX b{16, m.data(), nullptr};
  WSAOVERLAPPED ov{};
  EXPECT_EQ(x_.write(client_, &b, 1, d, 64, 0, nullptr, 0, &ov, nullptr, nullptr, nullptr),
            SOCKET_ERROR);
  EXPECT_EQ(x_.read(client_, &b, 1, d, 64, 0, nullptr, 0, &ov, nullptr, nullptr, nullptr),
            SOCKET_ERROR);
  EXPECT_EQ(x_.cache_cb(m.data(), 4096, nullptr), SOCKET_ERROR);
  EXPECT_EQ(p_.lpWSPSocket(AF_INET, SOCK_STREAM, 0, nullptr, 0, 0, nullptr), INVALID_SOCKET);
  EXPECT_EQ(p_.lpWSPCloseSocket(client_, nullptr), SOCKET_ERROR);
  EXPECT_EQ(p_.lpWSPShutdown(client_, 0, nullptr), SOCKET_ERROR);
}

TEST_F(SpiTest, NullPointersAndBadCountsAreClearErrors) {
  Mapped src(4096), tgt(4096);
  HANDLE h = Register(client_, src.data(), 4096, MEM_READ);
  std::vector<uint8_t> desc = RegisterRdma(server_, tgt.data(), 4096, MEM_WRITE);
  WSABUFEX b[5];
  for (auto& x : b) x = WSABUFEX{16, src.data(), h};
  WSAOVERLAPPED ov{};
  DWORD bytes = 0;
  EXPECT_EQ(
      x_.write(client_, nullptr, 1, desc.data(), 64, 0, &bytes, 0, &ov, nullptr, nullptr, &err_),
      SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEFAULT);
  EXPECT_EQ(x_.write(client_, b, 1, nullptr, 64, 0, &bytes, 0, &ov, nullptr, nullptr, &err_),
            SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEFAULT);
  EXPECT_EQ(
      x_.write(client_, b, 1, desc.data(), 64, 0, &bytes, 0, nullptr, nullptr, nullptr, &err_),
      SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEFAULT);
  for (DWORD count : {DWORD{0}, DWORD{5}, DWORD{0xFFFFFFFF}}) {
    EXPECT_EQ(
        x_.write(client_, b, count, desc.data(), 64, 0, &bytes, 0, &ov, nullptr, nullptr, &err_),
        SOCKET_ERROR);
    EXPECT_EQ(err_, WSAEINVAL);
  }
  b[0].len = 0;
  EXPECT_EQ(x_.write(client_, b, 1, desc.data(), 64, 0, &bytes, 0, &ov, nullptr, nullptr, &err_),
            SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEFAULT);
  b[0].len = 0xFFFFFFFF;
  EXPECT_EQ(x_.write(client_, b, 1, desc.data(), 64, 0, &bytes, 0, &ov, nullptr, nullptr, &err_),
            SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEFAULT);
  // Offsets past the end, including ones that would wrap.
  for (DWORD off : {DWORD{4096}, DWORD{0xFFFFFFF0}, DWORD{0xFFFFFFFF}}) {
    EXPECT_EQ(Rdma(true, client_, src.data(), 16, h, desc, off, &ov), SOCKET_ERROR);
    EXPECT_NE(err_, WSA_IO_PENDING);
    EXPECT_NE(err_, 0);
  }
  // Registration: NULL desc_len, huge length.
  EXPECT_EQ(x_.reg_rdma(server_, tgt.data(), 4096, MEM_WRITE, desc.data(), nullptr, &err_),
            SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEFAULT);
  EXPECT_EQ(x_.reg(client_, src.data(), 0xFFFFFFFF, MEM_READ, &err_), nullptr);
  EXPECT_EQ(err_, WSAEFAULT);
  // Overlapped result: NULL pointers.
  DWORD flags = 0;
  EXPECT_EQ(p_.lpWSPGetOverlappedResult(client_, nullptr, &bytes, TRUE, &flags, &err_), FALSE);
  EXPECT_EQ(err_, WSAEFAULT);
  // Ioctl: short in/out buffers.
  GUID g = WSAID_RDMAWRITE;
  void* fn = nullptr;
  DWORD got = 0;
  EXPECT_EQ(p_.lpWSPIoctl(client_, SIO_GET_EXTENSION_FUNCTION_POINTER, &g, sizeof g - 1, &fn,
                          sizeof fn, &got, nullptr, nullptr, nullptr, &err_),
            SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEFAULT);
  EXPECT_EQ(p_.lpWSPIoctl(client_, SIO_GET_EXTENSION_FUNCTION_POINTER, &g, sizeof g, &fn, 4, &got,
                          nullptr, nullptr, nullptr, &err_),
            SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEFAULT);
  EXPECT_EQ(std::memcmp(tgt.data(), std::vector<char>(4096, 0).data(), 4096), 0);
}

TEST_F(SpiTest, RandomAndMutatedDescriptorsAreRefusedAndMoveNothing) {
  Mapped src(4096), tgt(4096);
  src.Fill(13);
  std::memset(tgt.data(), 0, 4096);
  HANDLE h = Register(client_, src.data(), 4096, MEM_READ);
  std::vector<uint8_t> desc = RegisterRdma(server_, tgt.data(), 4096, MEM_WRITE);
  WSAOVERLAPPED ov{};
  for (int i = 0; i < 2000; ++i) {
    std::vector<uint8_t> d = desc;
    uint32_t r[2];
    ASSERT_EQ(getrandom(r, sizeof r, 0), static_cast<ssize_t>(sizeof r));
    if (i < 1000) {
      d[r[0] % 64] ^= static_cast<uint8_t>(1u << (r[1] % 8));  // one bit flipped
    } else {
      ASSERT_EQ(getrandom(d.data(), 64, 0), 64);  // random bytes
    }
    EXPECT_EQ(Rdma(true, client_, src.data(), 16, h, d, 0, &ov), SOCKET_ERROR);
    EXPECT_EQ(err_, WSAEINVAL);
    EXPECT_EQ(x_.dereg_rdma(server_, d.data(), 64, &err_), SOCKET_ERROR);
    EXPECT_EQ(err_, WSAEINVAL);
  }
  EXPECT_EQ(std::memcmp(tgt.data(), std::vector<char>(4096, 0).data(), 4096), 0);
  EXPECT_EQ(sanreg::spi::internal::RdmaRegistrationsForTest(), 1u);
}

// ---- Send / Recv ----

TEST_F(SpiTest, SendAndRecvCarryMessagesThroughRegisteredBuffers) {
  Mapped out(4096), in(4096);
  std::memcpy(out.data(), "hello descriptor", 17);
  Register(client_, out.data(), 4096, MEM_READ);
  Register(server_, in.data(), 4096, MEM_WRITE);
  WSABUF sb{17, out.data()};
  DWORD sent = 0;
  ASSERT_EQ(p_.lpWSPSend(client_, &sb, 1, &sent, 0, nullptr, nullptr, nullptr, &err_), 0) << err_;
  EXPECT_EQ(sent, 17u);
  WSABUF rb{4096, in.data()};
  DWORD got = 0, flags = 0;
  ASSERT_EQ(p_.lpWSPRecv(server_, &rb, 1, &got, &flags, nullptr, nullptr, nullptr, &err_), 0)
      << err_;
  EXPECT_EQ(got, 17u);
  EXPECT_STREQ(in.data(), "hello descriptor");
}

TEST_F(SpiTest, SendFromUnregisteredBufferIsWsaefault) {
  Mapped out(4096);
  WSABUF sb{17, out.data()};
  DWORD sent = 0;
  EXPECT_EQ(p_.lpWSPSend(client_, &sb, 1, &sent, 0, nullptr, nullptr, nullptr, &err_),
            SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEFAULT);
  // Registered on the other socket only: still not this socket's.
  Register(server_, out.data(), 4096, MEM_READ);
  EXPECT_EQ(p_.lpWSPSend(client_, &sb, 1, &sent, 0, nullptr, nullptr, nullptr, &err_),
            SOCKET_ERROR);
  EXPECT_EQ(err_, WSAEFAULT);
}

}  // namespace
