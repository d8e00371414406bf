// two_hosts.h: two emulated hosts for multi-host tests: two network namespaces joined by a veth
// pair, and the helpers their forked children use (entering a namespace, bounded pipe reads).
//
// TwoHosts::Create makes namespaces "sanreg_<tag>_a_<pid>" and "sanreg_<tag>_b_<pid>" and a veth
// pair between them with the link-local addresses kHostAddrA / kHostAddrB (a /30 of 169.254.0.0/16:
// nothing outside the namespaces sees them); the destructor deletes both namespaces (which deletes
// the pair), also after a failure. Tests with different tags run side by side. A child forked from
// the (still single-threaded) test process calls EnterNamespace before it opens a fabric; the only
// route between the namespaces is the veth pair, so data between the children crosses it.
//
// Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and iproute2's `ip`.
// Thread-safety: test code, one thread.

#ifndef SANREG_TESTS_TWO_HOSTS_H_
#define SANREG_TESTS_TWO_HOSTS_H_

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <tuple>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace sanreg::testing {

inline constexpr const char* kHostAddrA = "169.254.77.1";
inline constexpr const char* kHostAddrB = "169.254.77.2";

// Runs `cmd` through the shell; returns its exit status and, in `out`, what it printed.
inline int Shell(const std::string& cmd, std::string* out = nullptr) {
  FILE* f = popen((cmd + " 2>&1").c_str(), "r");
  if (f == nullptr) return -1;
  char buf[512];
  std::string text;
  while (fgets(buf, sizeof buf, f) != nullptr) text += buf;
  int st = pclose(f);
  if (out != nullptr) *out = text;
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

// Reads exactly `n` bytes from `fd` within `timeout`; false on EOF, error or timeout.
inline bool ReadWithin(int fd, void* p, size_t n, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  char* c = static_cast<char*>(p);
  while (n > 0) {
    const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (ms <= 0) return false;
    pollfd pfd = {fd, POLLIN, 0};
    int r = poll(&pfd, 1, static_cast<int>(ms));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    ssize_t got = read(fd, c, n);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;
    c += got;
    n -= static_cast<size_t>(got);
  }
  return true;
}

// Writes exactly `n` bytes, retrying on EINTR; false on an error or a closed reader.
inline bool WriteAll(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    ssize_t w = write(fd, c, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    c += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

// In a forked child: unless `cond` holds, prints "[role] <printf message> (exit code)" to stderr
// and exits with `code`, which the parent reads as the step that failed. Needs a `const char*
// role` in scope.
#define CHILD_CHECK(cond, code, ...)         \
  do {                                       \
    if (!(cond)) {                           \
      fprintf(stderr, "[%s] ", role);        \
      fprintf(stderr, __VA_ARGS__);          \
      fprintf(stderr, " (exit %d)\n", code); \
      _exit(code);                           \
    }                                        \
  } while (0)

// In a child: moves into the network namespace `ns`. Exits 10 when it cannot.
inline void EnterNamespace(const std::string& ns) {
  int fd = open(("/var/run/netns/" + ns).c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0 || setns(fd, CLONE_NEWNET) != 0) {
    fprintf(stderr, "setns(%s): %s\n", ns.c_str(), strerror(errno));
    _exit(10);
  }
  close(fd);
}

class TwoHosts {
 public:
  TwoHosts() = default;
  TwoHosts(const TwoHosts&) = delete;
  TwoHosts& operator=(const TwoHosts&) = delete;
  ~TwoHosts() {
    // Deleting a namespace deletes the veth end in it, and with it the pair.
    if (created_a_) Shell("ip netns del " + ns_a_);
    if (created_b_) Shell("ip netns del " + ns_b_);
  }

  // Creates the namespaces and the link. Returns OK; kFailedPrecondition when this machine cannot
  // (not root, no `ip`, no namespaces or veth here: the caller skips, with the message); another
  // code when a step that should work failed.
  absl::Status Create(const std::string& tag) {
    if (geteuid() != 0) return absl::FailedPreconditionError("needs root to create namespaces");
    if (Shell("command -v ip") != 0) {
      return absl::FailedPreconditionError("iproute2's `ip` is missing (tools/setup.sh installs it)");
    }
    const std::string pid = std::to_string(getpid());
    ns_a_ = absl::StrCat("sanreg_", tag, "_a_", pid);
    ns_b_ = absl::StrCat("sanreg_", tag, "_b_", pid);
    veth_a_ = absl::StrCat("sr", tag, "a", pid);  // interface names: at most 15 bytes
    veth_b_ = absl::StrCat("sr", tag, "b", pid);
    std::string out;
    if (Shell("ip netns add " + ns_a_, &out) != 0) {
      return absl::FailedPreconditionError("cannot create a network namespace here (" + out + ")");
    }
    created_a_ = true;
    if (Shell("ip netns add " + ns_b_, &out) != 0) return absl::InternalError(out);
    created_b_ = true;
    if (Shell("ip link add " + veth_a_ + " netns " + ns_a_ + " type veth peer name " + veth_b_ +
                  " netns " + ns_b_,
              &out) != 0) {
      return absl::FailedPreconditionError("cannot create a veth pair here (" + out + ")");
    }
    for (const auto& [ns, dev, addr] :
         {std::tuple{ns_a_, veth_a_, kHostAddrA}, std::tuple{ns_b_, veth_b_, kHostAddrB}}) {
      for (const std::string& cmd :
           {"ip -n " + ns + " link set lo up",
            absl::StrCat("ip -n ", ns, " addr add ", addr, "/30 dev ", dev),
            "ip -n " + ns + " link set " + dev + " up"}) {
        if (Shell(cmd, &out) != 0) return absl::InternalError(cmd + ": " + out);
      }
    }
    return absl::OkStatus();
  }

  const std::string& ns_a() const { return ns_a_; }
  const std::string& ns_b() const { return ns_b_; }

  // Bytes both veth ends have received.
  uint64_t RxBytes() const { return RxBytes(ns_a_, veth_a_) + RxBytes(ns_b_, veth_b_); }

 private:
  static uint64_t RxBytes(const std::string& ns, const std::string& dev) {
    std::string out;
    if (Shell("ip netns exec " + ns + " cat /sys/class/net/" + dev + "/statistics/rx_bytes",
              &out) != 0) {
      return 0;
    }
    uint64_t v = 0;
    return absl::SimpleAtoi(absl::StripAsciiWhitespace(out), &v) ? v : 0;
  }

  std::string ns_a_, ns_b_, veth_a_, veth_b_;
  bool created_a_ = false, created_b_ = false;
};

}  // namespace sanreg::testing

#endif  // SANREG_TESTS_TWO_HOSTS_H_
