// bench_cpu.h: keeping a benchmark's threads on chosen CPUs, for comparisons whose two sides must
// run where the other ran (this project's vCPUs can differ twofold in memory latency:
// docs/PERFORMANCE.md, "The machine and this run"), and the Median of the rounds or repetitions in
// which the sides took turns. For benchmarks: the cache's and the data path's comparison
// benchmarks, and sanreg_bench (Median only).
//
// Thread-safety: ThreadCpus and Median from any thread; a ScopedPin belongs to the thread that
// made it.

#ifndef SANREG_REGCACHE_BENCH_CPU_H_
#define SANREG_REGCACHE_BENCH_CPU_H_

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <vector>

namespace sanreg::bench {

// The CPUs the calling thread may run on, in increasing order (empty if the kernel will not say).
inline std::vector<int> ThreadCpus() {
  std::vector<int> cpus;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) != 0) return cpus;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &set)) cpus.push_back(c);
  }
  return cpus;
}

// Keeps the calling thread on `cpu` while it lives, then gives it back the CPUs it had. Does
// nothing when `cpu` is negative or the kernel refuses it.
class ScopedPin {
 public:
  explicit ScopedPin(int cpu) {
    if (cpu < 0 || cpu >= CPU_SETSIZE) return;
    if (pthread_getaffinity_np(pthread_self(), sizeof old_, &old_) != 0) return;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    pinned_ = pthread_setaffinity_np(pthread_self(), sizeof one, &one) == 0;
  }
  ~ScopedPin() {
    if (pinned_) pthread_setaffinity_np(pthread_self(), sizeof old_, &old_);
  }
  ScopedPin(const ScopedPin&) = delete;
  ScopedPin& operator=(const ScopedPin&) = delete;

 private:
  cpu_set_t old_;
  bool pinned_ = false;
};

// The median of `v` (the mean of the middle two when their number is even); 0 when empty.
inline double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

}  // namespace sanreg::bench

#endif  // SANREG_REGCACHE_BENCH_CPU_H_
