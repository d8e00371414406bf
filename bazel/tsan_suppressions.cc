// tsan_suppressions.cc: ThreadSanitizer's suppressions for --config=tsan, linked into every binary
// and test of that config (.bazelrc: --custom_malloc, the one label Bazel links into all of them).
//
// libfabric is not built with ThreadSanitizer. Its providers move data into and out of registered
// memory (memcpy, sendmsg, recvmsg, process_vm_readv/writev) on the progress thread and in the
// peer's process, ordered by shared-memory queues and atomics inside libfabric that
// ThreadSanitizer cannot see, so every buffer a transfer touches looks racy. So:
//   called_from_lib  ThreadSanitizer ignores the calls libfabric makes through its interceptors
//                    (those accesses, and libfabric's own pthread locks: both sides of each);
//   race             a report with a libfabric frame on a stack is dropped (what the first misses,
//                    e.g. an access inside libfabric's own code);
//   mutex            libfabric 1.17's destructor tail-calls pthread_mutex_unlock at exit, so that
//                    unlock is seen as called from the dynamic loader (_dl_call_fini), not from
//                    libfabric, while the matching lock was ignored: "unlock of an unlocked
//                    mutex". Only that report, only in a library destructor at exit.
// Races and lock misuse between sanreg's own threads are still reported.

extern "C" const char* __tsan_default_suppressions() {
  return "called_from_lib:libfabric.so.1\n"
         "race:libfabric.so.1\n"
         "mutex:_dl_call_fini\n";
}
