// preload_probe: a program that does not link sanreg. It says which library its munmap resolves to,
// and checks that the memory calls still do their work. hooks_preload_test runs it with and
// without LD_PRELOAD=libsanreg_hooks.so.

#include <dlfcn.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>

int main() {
  Dl_info info;
  void* sym = dlsym(RTLD_DEFAULT, "munmap");
  if (sym == nullptr || dladdr(sym, &info) == 0) return 2;
  std::printf("munmap from %s\n", info.dli_fname);
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  char* p = static_cast<char*>(
      mmap(nullptr, 4 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (p == MAP_FAILED) return 3;
  std::memset(p, 'x', 4 * page);
  if (madvise(p, page, MADV_DONTNEED) != 0 || p[0] != 0) return 4;  // dropped: reads zero
  char* q = static_cast<char*>(mremap(p, 4 * page, 8 * page, MREMAP_MAYMOVE));
  if (q == MAP_FAILED || q[page] != 'x') return 5;
  if (mmap(q, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != q) {
    return 6;
  }
  if (munmap(q, 8 * page) != 0) return 7;
  int id = shmget(IPC_PRIVATE, page, IPC_CREAT | 0600);
  if (id < 0) return 8;
  char* s = static_cast<char*>(shmat(id, nullptr, 0));
  shmctl(id, IPC_RMID, nullptr);
  if (s == reinterpret_cast<char*>(-1)) return 9;
  s[0] = 1;
  if (shmdt(s) != 0) return 10;
#if !defined(__SANITIZE_THREAD__)  // ThreadSanitizer does not support moving the break
  void* top = sbrk(0);
  if (sbrk(static_cast<intptr_t>(page)) != top || sbrk(-static_cast<intptr_t>(page)) == (void*)-1) {
    return 11;
  }
#endif
  std::printf("ok\n");
  return 0;
}
