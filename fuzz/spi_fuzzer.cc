// spi_fuzzer.cc: every SAN SPI extension function with arbitrary arguments, on a connected
// loopback pair (tcp) started once per process.
//
// An input is a sequence of calls: WSPRegisterMemory / WSPDeregisterMemory on either socket,
// WSPRegisterRdmaMemory / WSPDeregisterRdmaMemory on the server, WSPRdmaWrite / WSPRdmaRead from
// the client with up to four local buffers, and WSPMemoryRegistrationCacheCallback, with
// addresses inside or just outside two mapped arenas (guard pages around each), arbitrary lengths,
// flags, offsets, forged handles and descriptors with a byte changed. A model of what is
// registered (handles per socket with their range and flags, exposed descriptors with theirs)
// predicts the rules of SPI.md that must hold, checked with FUZZ_CHECK:
//   - every failure is one of the errors the function documents;
//   - bad flags are WSAEINVAL; a range in a guard page is refused;
//   - deregistering a live handle (or descriptor) on its socket succeeds; an unknown one, or one
//     from the other socket, is WSAEINVAL;
//   - a descriptor probe with too small a block is WSAEFAULT and reports the size it needs;
//   - a transfer the model allows (handles that cover their buffers with the right flags, a live
//     descriptor with the right rights, in bounds) completes and moves exactly its bytes; one with
//     a changed, deregistered or earlier connection's descriptor fails and moves nothing.
// After every input: everything still registered is deregistered, both arenas are dropped from
// the cache, and the SPI holds no RDMA registration and pins no byte. A refused access fails the
// connection (as on an RC queue pair): the pair is made again before the next call.
//
// Built and run by tools/fuzz.sh (clang, libFuzzer, ASan, UBSan), not by Bazel.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/mman.h>

#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "fuzz/fuzz_input.h"
#include "spi/extension_table.h"
#include "spi/internal/spi_internal.h"
#include "spi/ws2san.h"

namespace {

using sanreg::fuzz::FuzzInput;

constexpr size_t kPage = 4096;
constexpr size_t kArena = 16 * kPage;

// Completions, by overlapped address.
std::mutex g_mu;
std::condition_variable g_cv;
std::map<LPWSAOVERLAPPED, DWORD> g_done;  // guarded by g_mu: the completion's error

int Upcall(SOCKET, LPWSAOVERLAPPED ov, DWORD error, DWORD, LPINT err) {
  {
    std::lock_guard<std::mutex> l(g_mu);
    g_done[ov] = error;
  }
  g_cv.notify_all();
  *err = 0;
  return 0;
}

// kArena bytes between two PROT_NONE guard pages.
char* MapArena() {
  char* p = static_cast<char*>(mmap(nullptr, kArena + 2 * kPage, PROT_READ | PROT_WRITE,
                                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  FUZZ_CHECK(p != MAP_FAILED, "mmap");
  FUZZ_CHECK(mprotect(p, kPage, PROT_NONE) == 0 && mprotect(p + kPage + kArena, kPage, PROT_NONE) == 0,
             "mprotect");
  return p + kPage;
}

bool OneOf(int e, std::initializer_list<int> allowed) {
  for (int a : allowed) {
    if (e == a) return true;
  }
  return false;
}

struct Handle {
  HANDLE h;
  char* buf;
  DWORD len;
  DWORD flags;
  bool doubtful = false;  // a cache callback covered it: the model no longer predicts its use
};

struct Exposed {
  std::vector<uint8_t> desc;
  char* buf;
  DWORD len;
  DWORD flags;
  bool revoked = false;  // a cache callback covered it: the peer lost access
};

class Spi {
 public:
  Spi() {
    WSPUPCALLTABLEEX up{};
    up.lpWPUCompleteOverlappedRequest = &Upcall;
    WSPDATA data;
    FUZZ_CHECK(WSPStartupEx(SANREG_WSP_VERSION, &data, nullptr, &up, &p_) == 0, "WSPStartupEx");
    local_ = MapArena();
    remote_ = MapArena();
    Connect();
    int e = 0;
    FUZZ_CHECK(sanreg::LoadExtensionTable(p_, client_, &x_, &e) == 0, "WSPIoctl %d", e);
  }

  void Run(FuzzInput& in) {
    for (int step = 0; step < 64 && !in.empty(); ++step) {
      if (broken_) Reconnect();
      switch (in.U8() % 8) {
        case 0:
        case 1:
          Register(in);
          break;
        case 2:
          Deregister(in);
          break;
        case 3:
          RegisterRdma(in);
          break;
        case 4:
          DeregisterRdma(in);
          break;
        case 5:
        case 6:
          Transfer(in);
          break;
        case 7:
          CacheCallback(in);
          break;
      }
    }
    Cleanup();
  }

 private:
  void Connect() {
    int e = 0;
    SOCKET l = p_.lpWSPSocket(AF_INET, SOCK_STREAM, 0, nullptr, 0, 0, &e);
    FUZZ_CHECK(l != INVALID_SOCKET, "WSPSocket %d", e);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int alen = sizeof a;
    FUZZ_CHECK(p_.lpWSPBind(l, reinterpret_cast<sockaddr*>(&a), sizeof a, &e) == 0 &&
                   p_.lpWSPListen(l, 1, &e) == 0 &&
                   p_.lpWSPGetSockName(l, reinterpret_cast<sockaddr*>(&a), &alen, &e) == 0,
               "listen %d", e);
    SOCKET accepted = INVALID_SOCKET;
    int ae = 0;
    std::thread t([&] { accepted = p_.lpWSPAccept(l, nullptr, nullptr, nullptr, 0, &ae); });
    client_ = p_.lpWSPSocket(AF_INET, SOCK_STREAM, 0, nullptr, 0, 0, &e);
    const int rc = p_.lpWSPConnect(client_, reinterpret_cast<sockaddr*>(&a), sizeof a, nullptr,
                                   nullptr, nullptr, nullptr, &e);
    t.join();
    FUZZ_CHECK(rc == 0 && accepted != INVALID_SOCKET, "connect %d accept %d", e, ae);
    server_ = accepted;
    p_.lpWSPCloseSocket(l, &e);
    broken_ = false;
  }

  // Closing a socket releases what was registered on it (SPI.md): the model forgets it too.
  void Reconnect() {
    int e = 0;
    p_.lpWSPCloseSocket(client_, &e);
    p_.lpWSPCloseSocket(server_, &e);
    handles_[0].clear();
    handles_[1].clear();
    for (const Exposed& x : exposed_) {
      if (stale_.size() < 8) stale_.push_back(x.desc);
    }
    exposed_.clear();
    Connect();
  }

  SOCKET Sock(int side) const { return side == 0 ? client_ : server_; }

  // An address in or around `arena`: inside, or up to a page before or after (guard pages).
  static char* Addr(FuzzInput& in, char* arena) {
    const int64_t off = static_cast<int64_t>(in.U32() % (kArena + 2 * kPage)) - kPage;
    return arena + off;
  }
  static DWORD Flags(FuzzInput& in) {
    const uint8_t f = in.U8();
    return f < 240 ? (f % 3) + 1 : in.U32();  // mostly MEM_READ, MEM_WRITE, MEM_READWRITE
  }
  static bool InArena(const char* p, DWORD len, const char* arena) {
    return len > 0 && p >= arena && p + len <= arena + kArena;
  }
  static bool TouchesGuard(const char* p, DWORD len, const char* arena) {
    return len > 0 && (p < arena || p + len > arena + kArena) && p < arena + kArena + kPage &&
           p + len > arena - kPage;
  }

  void Register(FuzzInput& in) {
    const int side = in.U8() & 1;
    char* arena = side == 0 ? local_ : remote_;
    char* p = Addr(in, arena);
    const DWORD len = in.U16() % (kArena + kPage);
    const DWORD flags = Flags(in);
    int e = 0;
    HANDLE h = x_.reg(Sock(side), p, len, flags, &e);
    if (h != nullptr) {
      FUZZ_CHECK(flags >= MEM_READ && flags <= MEM_READWRITE, "registered with flags %u", flags);
      FUZZ_CHECK(!TouchesGuard(p, len, arena), "registered a guard page");
      handles_[side].push_back({h, p, len, flags});
      return;
    }
    FUZZ_CHECK(OneOf(e, {WSAENOBUFS, WSAEFAULT, WSAEINVAL, WSAENOTCONN}), "register: %d", e);
    if (flags < MEM_READ || flags > MEM_READWRITE) FUZZ_CHECK(e == WSAEINVAL, "bad flags: %d", e);
    if (e == WSAENOTCONN) broken_ = true;
    FUZZ_CHECK(!(InArena(p, len, arena) && flags >= MEM_READ && flags <= MEM_READWRITE) ||
                   e == WSAENOTCONN || e == WSAENOBUFS,
               "a valid registration refused: %d", e);
  }

  void Deregister(FuzzInput& in) {
    const int side = in.U8() & 1;
    const uint8_t pick = in.U8();
    auto& hs = handles_[side];
    int e = 0;
    if (pick < 200 && !hs.empty()) {
      const size_t i = pick % hs.size();
      const int rc = x_.dereg(Sock(side), hs[i].h, &e);
      FUZZ_CHECK(rc == 0 || (e == WSAENOTCONN && broken_) || hs[i].doubtful,
                 "deregistering a live handle: %d", e);
      hs.erase(hs.begin() + static_cast<long>(i));
      return;
    }
    // A forged handle, or a live one of the other socket.
    auto& other = handles_[1 - side];
    HANDLE h = (pick & 1) && !other.empty() ? other[pick % other.size()].h
                                           : reinterpret_cast<HANDLE>(in.U64());
    for (const Handle& x : hs) {
      if (x.h == h) return;  // the forgery hit a live handle of this socket: not a forgery
    }
    FUZZ_CHECK(x_.dereg(Sock(side), h, &e) == SOCKET_ERROR && OneOf(e, {WSAEINVAL, WSAENOTCONN}),
               "deregistering an unknown handle: %d", e);
  }

  void RegisterRdma(FuzzInput& in) {
    char* p = Addr(in, remote_);
    const DWORD len = in.U16() % (kArena + kPage);
    const DWORD flags = Flags(in);
    std::vector<uint8_t> desc(256);
    DWORD n = in.U8() < 16 ? in.U8() % 64 : static_cast<DWORD>(desc.size());  // sometimes probe
    const DWORD given = n;
    int e = 0;
    if (x_.reg_rdma(server_, p, len, flags, desc.data(), &n, &e) == 0) {
      FUZZ_CHECK(flags >= MEM_READ && flags <= MEM_READWRITE, "exposed with flags %u", flags);
      FUZZ_CHECK(!TouchesGuard(p, len, remote_), "exposed a guard page");
      FUZZ_CHECK(n > 0 && n <= given, "descriptor of %u bytes in a block of %u", n, given);
      desc.resize(n);
      exposed_.push_back({desc, p, len, flags});
      return;
    }
    FUZZ_CHECK(OneOf(e, {WSAENOBUFS, WSAEFAULT, WSAEINVAL, WSAENOTCONN}), "expose: %d", e);
    if (e == WSAENOTCONN) broken_ = true;
    const bool valid = InArena(p, len, remote_) && flags >= MEM_READ && flags <= MEM_READWRITE;
    if (valid && given < 64) FUZZ_CHECK(e == WSAEFAULT && n > given, "probe: %d, needs %u", e, n);
  }

  void DeregisterRdma(FuzzInput& in) {
    const uint8_t pick = in.U8();
    int e = 0;
    if (pick < 200 && !exposed_.empty()) {
      const size_t i = pick % exposed_.size();
      Exposed& x = exposed_[i];
      const int rc = x_.dereg_rdma(server_, x.desc.data(), static_cast<DWORD>(x.desc.size()), &e);
      FUZZ_CHECK(rc == 0 || (e == WSAENOTCONN && broken_) || x.revoked,
                 "deregistering a descriptor: %d", e);
      if (stale_.size() < 8) stale_.push_back(x.desc);
      exposed_.erase(exposed_.begin() + static_cast<long>(i));
      return;
    }
    std::vector<uint8_t> forged(64);
    for (auto& b : forged) b = in.U8();
    if (!exposed_.empty()) {
      forged = exposed_[pick % exposed_.size()].desc;
      forged[in.U8() % forged.size()] ^= static_cast<uint8_t>(in.U8() | 1);
    }
    FUZZ_CHECK(x_.dereg_rdma(server_, forged.data(), static_cast<DWORD>(forged.size()), &e) ==
                       SOCKET_ERROR &&
                   OneOf(e, {WSAEINVAL, WSAEFAULT, WSAENOTCONN}),
               "deregistering a forged descriptor: %d", e);
  }

  void Transfer(FuzzInput& in) {
    const bool write = in.U8() & 1;
    const DWORD count = in.U8() % 5;  // 0 to 4 buffers
    WSABUFEX bufs[4] = {};
    bool allowed = count > 0 && !exposed_.empty();
    DWORD total = 0;
    // A write's sources need any registration; a read's targets local write, MEM_WRITE.
    const DWORD need = write ? MEM_READWRITE : MEM_WRITE;
    for (DWORD i = 0; i < count; ++i) {
      const uint8_t pick = in.U8();
      auto& hs = handles_[0];
      if (pick < 220 && !hs.empty()) {
        const Handle& h = hs[pick % hs.size()];
        const DWORD skip = h.len ? in.U16() % h.len : 0;
        const DWORD len = in.U16() % (h.len - skip + 2);  // sometimes one past the handle
        bufs[i] = {len, h.buf + skip, h.h};
        allowed = allowed && !h.doubtful && len > 0 && skip + len <= h.len && (h.flags & need) != 0;
      } else {
        bufs[i] = {in.U16(), Addr(in, local_), reinterpret_cast<HANDLE>(in.U64())};
        allowed = false;
      }
      // Overlapping local buffers make the moved bytes order-dependent: keep the check simple.
      for (DWORD j = 0; j < i; ++j) {
        if (bufs[i].buf < bufs[j].buf + bufs[j].len && bufs[j].buf < bufs[i].buf + bufs[i].len) {
          allowed = false;
        }
      }
      total += bufs[i].len;
    }
    std::vector<uint8_t> desc(64);
    const Exposed* x = nullptr;
    const uint8_t dpick = in.U8();
    bool forged = false;
    if (dpick >= 192 && dpick < 224 && !stale_.empty()) {
      // Deregistered, or exposed on an earlier connection: refused, nothing moved (unless the
      // same bytes are live again: the same range exposed again hands back its descriptor).
      desc = stale_[dpick % stale_.size()];
      forged = !Live(desc);
      allowed = false;
    } else if (!exposed_.empty()) {
      x = &exposed_[dpick % exposed_.size()];
      desc = x->desc;
      if (x->revoked) {
        forged = !Live(desc);  // refused (SPI.md: the peer loses access at once)
        allowed = false;
      }
      if (dpick >= 224) {
        desc[in.U8() % desc.size()] ^= static_cast<uint8_t>(in.U8() | 1);
        forged = true;
        allowed = false;
      }
    } else {
      for (auto& b : desc) b = in.U8();
      forged = true;
    }
    const DWORD offset = in.U16() % (kArena + 2);
    if (x != nullptr) {
      allowed = allowed && (x->flags & (write ? MEM_WRITE : MEM_READ)) != 0 &&
                uint64_t{offset} + total <= x->len;
    }
    // Patterns, so that what moves can be told apart from what was there.
    for (size_t i = 0; i < kArena; ++i) {
      local_[i] = static_cast<char>(i * 7 + 1);
      remote_[i] = static_cast<char>(i * 13 + 5);
    }
    std::vector<char> local_before(local_, local_ + kArena);
    std::vector<char> remote_before(remote_, remote_ + kArena);

    WSAOVERLAPPED ov{};
    DWORD bytes = 0;
    int e = 0;
    auto fn = write ? x_.write : x_.read;
    const int rc = fn(client_, bufs, count, desc.data(), static_cast<DWORD>(desc.size()), offset,
                      &bytes, 0, &ov, nullptr, nullptr, &e);
    DWORD result = 0;
    if (rc == SOCKET_ERROR && e == WSA_IO_PENDING) {
      std::unique_lock<std::mutex> l(g_mu);
      g_cv.wait(l, [&] { return g_done.count(&ov) > 0; });
      result = g_done[&ov];
      g_done.erase(&ov);
    } else if (rc == SOCKET_ERROR) {
      FUZZ_CHECK(OneOf(e, {WSAEINVAL, WSAEFAULT, WSAEMSGSIZE, WSAENOTCONN, WSAENOBUFS}),
                 "rdma refused with %d", e);
      result = static_cast<DWORD>(e);
    }
    if (rc == SOCKET_ERROR && e == WSA_IO_PENDING && result != 0) {
      broken_ = true;  // a transfer the target refused fails the connection (as on an RC QP)
    }
    if (result == WSAENOTCONN || result == WSAECONNABORTED || result == WSAECONNRESET) {
      broken_ = true;
    }
    if (allowed) {
      FUZZ_CHECK(result == 0 || (result == WSAENOTCONN && broken_), "an allowed %s failed: %u",
                 write ? "write" : "read", result);
    }
    if (forged) FUZZ_CHECK(result != 0, "a %s with a forged descriptor succeeded", write ? "write" : "read");
    if (result != 0) {
      FUZZ_CHECK(std::memcmp(local_, local_before.data(), kArena) == 0 &&
                     std::memcmp(remote_, remote_before.data(), kArena) == 0,
                 "a failed %s moved bytes", write ? "write" : "read");
      return;
    }
    // Succeeded: exactly the buffers' bytes moved, in order, at the offset of the exposed range.
    std::vector<char> want_local = local_before, want_remote = remote_before;
    char* at = x->buf + offset;
    for (DWORD i = 0; i < count; ++i) {
      char* lb = bufs[i].buf;
      char* rb = at;
      if (write) {
        std::memcpy(want_remote.data() + (rb - remote_), local_before.data() + (lb - local_), bufs[i].len);
      } else {
        std::memcpy(want_local.data() + (lb - local_), remote_before.data() + (rb - remote_), bufs[i].len);
      }
      at += bufs[i].len;
    }
    FUZZ_CHECK(std::memcmp(local_, want_local.data(), kArena) == 0 &&
                   std::memcmp(remote_, want_remote.data(), kArena) == 0,
               "a %s of %u bytes at offset %u moved the wrong bytes", write ? "write" : "read",
               total, offset);
  }

  // True when a registered, unrevoked descriptor has exactly these bytes.
  bool Live(const std::vector<uint8_t>& desc) const {
    for (const Exposed& x : exposed_) {
      if (!x.revoked && x.desc == desc) return true;
    }
    return false;
  }

  void CacheCallback(FuzzInput& in) {
    char* arena = (in.U8() & 1) ? remote_ : local_;
    char* p = Addr(in, arena);
    const size_t len = in.U16();
    int e = 0;
    if (x_.cache_cb(p, len, &e) != 0) {
      FUZZ_CHECK(OneOf(e, {WSAEINVAL, WSAEFAULT}), "cache callback: %d", e);
    }
    // What overlaps the range's pages is dropped from the cache: descriptors are revoked, and the
    // model stops predicting the handles' transfers.
    const uintptr_t lo = reinterpret_cast<uintptr_t>(p) & ~(kPage - 1);
    const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + len + kPage - 1) & ~(kPage - 1);
    auto overlaps = [&](const char* b, DWORD n) {
      const uintptr_t s = reinterpret_cast<uintptr_t>(b);
      return len > 0 && s < hi && s + n > lo;
    };
    for (auto& hs : handles_) {
      for (Handle& h : hs) h.doubtful = h.doubtful || overlaps(h.buf, h.len);
    }
    for (Exposed& x : exposed_) x.revoked = x.revoked || overlaps(x.buf, x.len);
  }

  // Deregisters what the model holds, drops both arenas from the cache, and checks that nothing
  // stays registered or pinned.
  void Cleanup() {
    int e = 0;
    for (int side = 0; side < 2; ++side) {
      for (const Handle& h : handles_[side]) {
        FUZZ_CHECK(x_.dereg(Sock(side), h.h, &e) == 0 || broken_ || h.doubtful,
                   "cleanup deregister: %d", e);
      }
      handles_[side].clear();
    }
    for (const Exposed& x : exposed_) {
      FUZZ_CHECK(x_.dereg_rdma(server_, const_cast<uint8_t*>(x.desc.data()),
                               static_cast<DWORD>(x.desc.size()), &e) == 0 ||
                     broken_ || x.revoked,
                 "cleanup deregister rdma: %d", e);
    }
    exposed_.clear();
    if (broken_) Reconnect();
    x_.cache_cb(local_, kArena, &e);
    x_.cache_cb(remote_, kArena, &e);
    sanreg::spi::internal::FlushCacheForTest();
    FUZZ_CHECK(sanreg::spi::internal::RdmaRegistrationsForTest() == 0, "%zu RDMA registrations left",
               sanreg::spi::internal::RdmaRegistrationsForTest());
    const sanreg::CacheStats st = sanreg::spi::internal::CacheStatsForTest();
    FUZZ_CHECK(st.pinned_bytes == 0, "%llu bytes still pinned",
               static_cast<unsigned long long>(st.pinned_bytes));
  }

  WSPPROC_TABLE p_{};
  SOCKET client_ = INVALID_SOCKET;
  SOCKET server_ = INVALID_SOCKET;
  bool broken_ = false;
  char* local_ = nullptr;
  char* remote_ = nullptr;
  std::vector<Handle> handles_[2];  // client's, server's
  std::vector<Exposed> exposed_;     // the server's
  // Descriptors deregistered, or exposed on an earlier connection (kept across Reconnect).
  std::vector<std::vector<uint8_t>> stale_;
  sanreg::ExtensionTable x_;  // the extension functions
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Spi* spi = new Spi();  // one SPI session and pair for the whole run
  FuzzInput in(data, size);
  spi->Run(in);
  return 0;
}
