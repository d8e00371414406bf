// process_util.h: helpers for tests that fork: a thread check, bounded waits for children, and a
// leak check a child can run before it exits.
//
// Thread-safety: test code; call from the test's main thread.

#ifndef SANREG_TESTS_PROCESS_UTIL_H_
#define SANREG_TESTS_PROCESS_UTIL_H_

#include <dirent.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

#if defined(__SANITIZE_ADDRESS__)
#define SANREG_TEST_LSAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SANREG_TEST_LSAN 1
#endif
#endif
#ifdef SANREG_TEST_LSAN
#include <sanitizer/lsan_interface.h>
#endif

namespace sanreg::testing {

// True when this process runs one thread of its own (fork is then safe for a child that starts
// threads or takes locks); otherwise false, with how many in *why. ThreadSanitizer runs a
// background thread of its own once the process has started any thread: it is not counted.
inline bool SingleThreaded(std::string* why) {
#if defined(__SANITIZE_THREAD__)
  constexpr int kRuntimeThreads = 1;
#else
  constexpr int kRuntimeThreads = 0;
#endif
  DIR* d = opendir("/proc/self/task");
  if (d == nullptr) return true;
  int n = 0;
  while (dirent* e = readdir(d)) n += e->d_name[0] != '.';
  closedir(d);
  if (n > 1 + kRuntimeThreads) {
    *why = absl::StrCat(n, " threads run: a forked child could inherit a held lock");
  }
  return n <= 1 + kRuntimeThreads;
}

// Under LeakSanitizer: runs a leak check now (reporting what it finds) and returns whether it
// found a leak. A forked child calls it before _exit, which skips the check at exit.
inline bool LeaksFound() {
#ifdef SANREG_TEST_LSAN
  return __lsan_do_recoverable_leak_check() != 0;
#else
  return false;
#endif
}

// Waits for child `pid` until `deadline`; returns its wait status, or kills it and returns -1.
inline int ReapBy(pid_t pid, absl::Time deadline) {
  int pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  if (pidfd >= 0) {
    for (;;) {
      const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
      pollfd pfd = {pidfd, POLLIN, 0};
      int r = ms > 0 ? poll(&pfd, 1, static_cast<int>(ms)) : 0;
      if (r < 0 && errno == EINTR) continue;
      break;
    }
    close(pidfd);
  }
  int status = 0;
  if (waitpid(pid, &status, WNOHANG) != pid) {
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    return -1;
  }
  return status;
}

// Forks; the child runs fn() and exits with what it returns. Returns the child's wait status, or
// -1 when it ran past `limit` (it is killed).
template <typename Fn>
int RunInChild(Fn fn, absl::Duration limit = absl::Seconds(60)) {
  fflush(nullptr);
  pid_t pid = fork();
  if (pid < 0) return -2;
  if (pid == 0) {
    int rc = fn();
    fflush(nullptr);
    _exit(rc);
  }
  return ReapBy(pid, absl::Now() + limit);
}

inline std::string DescribeStatus(int status) {
  if (status == -1) return "timed out (killed)";
  if (status == -2) return "fork failed";
  if (WIFEXITED(status)) return absl::StrCat("exit code ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return absl::StrCat("signal ", WTERMSIG(status));
  return "unknown";
}

}  // namespace sanreg::testing

#endif  // SANREG_TESTS_PROCESS_UTIL_H_
