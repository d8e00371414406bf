/* switch_test.c: a switch written in C, across two processes, with the session protocol.
 *
 * The child is the receiver (it listens), the parent the sender; both fork before any fabric
 * thread starts. Steps:
 *   1. the sender registers its source for reading and sends the descriptor with WSPSend; the
 *      receiver pulls it with WSPRdmaRead, verifies the data and answers "done"; the sender
 *      deregisters;
 *   2. the receiver registers a target for writing and sends the descriptor; the sender writes it
 *      with WSPRdmaWrite and answers "done"; the receiver verifies, clears it and answers "next"
 *      (the sender writes the target again in step 3 only then);
 *   3. the sender registers a buffer, deregisters it (cached), munmaps it, calls
 *      WSPMemoryRegistrationCacheCallback, maps new memory at the same address with other bytes,
 *      registers it again and writes it: the receiver sees the new bytes;
 *   4. the receiver deregisters its target and says so; the sender's write with the old
 *      descriptor fails (which fails the connection) and the sender closes; the receiver's
 *      memory is unchanged.
 * Completion: polled (hEvent low bit set) with WSPGetOverlappedResult.
 * Exit status 0 on success; a failed check prints its line. */
#define _DEFAULT_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "sanreg/ws2san.h"

#define CHECK(cond)                                                                      \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      fprintf(stderr, "%s: %s:%d: CHECK(%s) err=%d\n", role, __FILE__, __LINE__, #cond, err); \
      exit(1);                                                                           \
    }                                                                                    \
  } while (0)

enum { kSize = 1 << 20, kDesc = 256 };

static const char* role = "?";
static int err;
static WSPPROC_TABLE procs;
static LPFN_WSPREGISTERMEMORY Reg;
static LPFN_WSPDEREGISTERMEMORY Dereg;
static LPFN_WSPREGISTERRDMAMEMORY RegRdma;
static LPFN_WSPDEREGISTERRDMAMEMORY DeregRdma;
static LPFN_WSPRDMAWRITE RdmaWrite;
static LPFN_WSPRDMAREAD RdmaRead;
static LPFN_WSPMEMORYREGISTRATIONCACHECALLBACK CacheCallback;

/* Control messages: one registered buffer each way. */
static char* msg;
static char* in;

static int NoUpcall(SOCKET s, LPWSAOVERLAPPED ov, DWORD error, DWORD bytes, LPINT e) {
  (void)s;
  (void)ov;
  (void)error;
  (void)bytes;
  (void)e;
  fprintf(stderr, "upcall for a polled operation\n");
  abort();
}

static void* Map(size_t n) {
  void* p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(p != MAP_FAILED);
  return p;
}

static void GetFn(SOCKET s, GUID g, void* fn) {
  DWORD got = 0;
  CHECK(procs.lpWSPIoctl(s, SIO_GET_EXTENSION_FUNCTION_POINTER, &g, sizeof g, fn, sizeof(void*),
                         &got, NULL, NULL, NULL, &err) == 0);
}

static void Start(SOCKET* s) {
  WSPUPCALLTABLEEX up;
  WSPDATA data;
  GUID g1 = WSAID_REGISTERMEMORY, g2 = WSAID_DEREGISTERMEMORY, g3 = WSAID_REGISTERRDMAMEMORY,
       g4 = WSAID_DEREGISTERRDMAMEMORY, g5 = WSAID_RDMAWRITE, g6 = WSAID_RDMAREAD,
       g7 = WSAID_MEMORYREGISTRATIONCACHECALLBACK;
  up.lpWPUCompleteOverlappedRequest = NoUpcall;
  CHECK(WSPStartupEx(SANREG_WSP_VERSION, &data, NULL, &up, &procs) == 0);
  *s = procs.lpWSPSocket(AF_INET, SOCK_STREAM, 0, NULL, 0, 0, &err);
  CHECK(*s != INVALID_SOCKET);
  GetFn(*s, g1, &Reg);
  GetFn(*s, g2, &Dereg);
  GetFn(*s, g3, &RegRdma);
  GetFn(*s, g4, &DeregRdma);
  GetFn(*s, g5, &RdmaWrite);
  GetFn(*s, g6, &RdmaRead);
  GetFn(*s, g7, &CacheCallback);
}

static void Send(SOCKET s, const void* p, DWORD n) {
  WSABUF b;
  DWORD sent = 0;
  memcpy(msg, p, n);
  b.len = n;
  b.buf = msg;
  CHECK(procs.lpWSPSend(s, &b, 1, &sent, 0, NULL, NULL, NULL, &err) == 0 && sent == n);
}

static DWORD Recv(SOCKET s) {
  WSABUF b;
  DWORD got = 0, flags = 0;
  b.len = 4096;
  b.buf = in;
  CHECK(procs.lpWSPRecv(s, &b, 1, &got, &flags, NULL, NULL, NULL, &err) == 0);
  return got;
}

/* Runs one transfer, polled; returns the Winsock error (0: success). */
static int Transfer(int write, SOCKET s, char* buf, DWORD len, HANDLE h, void* desc, DWORD dlen) {
  WSABUFEX b;
  WSAOVERLAPPED ov;
  DWORD bytes = 0, flags = 0;
  int rc;
  memset(&ov, 0, sizeof ov);
  ov.hEvent = (HANDLE)(uintptr_t)1;
  b.len = len;
  b.buf = buf;
  b.handle = h;
  rc = (write ? RdmaWrite : RdmaRead)(s, &b, 1, desc, dlen, 0, &bytes, 0, &ov, NULL, NULL, &err);
  if (rc == 0) return 0;
  if (err != WSA_IO_PENDING) return err;
  if (procs.lpWSPGetOverlappedResult(s, &ov, &bytes, TRUE, &flags, &err)) {
    return bytes == len ? 0 : -1;
  }
  return err;
}

static void Fill(char* p, size_t n, int seed) {
  size_t i;
  for (i = 0; i < n; ++i) p[i] = (char)((i * 131 + (size_t)seed * 7) >> 2);
}

static int Same(const char* p, size_t n, int seed) {
  size_t i;
  for (i = 0; i < n; ++i) {
    if (p[i] != (char)((i * 131 + (size_t)seed * 7) >> 2)) return 0;
  }
  return 1;
}

static void Receiver(int port_pipe) {
  SOCKET l, s;
  struct sockaddr_in a;
  int alen = sizeof a;
  char desc[kDesc];
  DWORD dlen = kDesc, n;
  char* local = Map(kSize);
  char* target = Map(kSize);
  HANDLE hlocal;
  unsigned short port;
  role = "receiver";
  Start(&l);
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  CHECK(procs.lpWSPBind(l, (struct sockaddr*)&a, sizeof a, &err) == 0);
  CHECK(procs.lpWSPListen(l, 1, &err) == 0);
  CHECK(procs.lpWSPGetSockName(l, (struct sockaddr*)&a, &alen, &err) == 0);
  port = ntohs(a.sin_port);
  CHECK(write(port_pipe, &port, sizeof port) == sizeof port);
  s = procs.lpWSPAccept(l, NULL, NULL, NULL, 0, &err);
  CHECK(s != INVALID_SOCKET);
  CHECK(Reg(s, msg, 4096, MEM_READ, &err) != NULL);
  CHECK(Reg(s, in, 4096, MEM_WRITE, &err) != NULL);

  /* 1. Pull the sender's source. */
  hlocal = Reg(s, local, kSize, MEM_WRITE, &err);
  CHECK(hlocal != NULL);
  n = Recv(s);
  CHECK(n > 0 && n <= kDesc);
  memcpy(desc, in, n);
  memset(local, 0, kSize);
  CHECK(Transfer(0, s, local, kSize, hlocal, desc, n) == 0);
  CHECK(Same(local, kSize, 1));
  Send(s, "done", 5);

  /* 2. Expose a target for writing. */
  memset(target, 0, kSize);
  CHECK(RegRdma(s, target, kSize, MEM_WRITE, desc, &dlen, &err) == 0);
  Send(s, desc, dlen);
  CHECK(Recv(s) == 5 && strcmp(in, "done") == 0);
  CHECK(Same(target, kSize, 2));
  memset(target, 0, kSize);
  Send(s, "next", 5);

  /* 3. The sender writes from remapped memory: the new bytes arrive. */
  CHECK(Recv(s) == 5 && strcmp(in, "done") == 0);
  CHECK(Same(target, kSize, 4));

  /* 4. Revoke; the sender's write must fail and change nothing. */
  memset(target, 0, kSize);
  CHECK(DeregRdma(s, desc, dlen, &err) == 0);
  Send(s, "revoked", 8);
  {
    /* The refused access fails the connection (as on an RC queue pair): the sender closes once
     * its write has completed with an error, which ends this receive. */
    WSABUF b;
    DWORD got = 0, flags = 0;
    b.len = 4096;
    b.buf = in;
    CHECK(procs.lpWSPRecv(s, &b, 1, &got, &flags, NULL, NULL, NULL, &err) == SOCKET_ERROR);
  }
  for (n = 0; n < kSize; ++n) CHECK(target[n] == 0);
  CHECK(procs.lpWSPCloseSocket(s, &err) == 0);
  CHECK(procs.lpWSPCloseSocket(l, &err) == 0);
  CHECK(procs.lpWSPCleanup(&err) == 0);
  exit(0);
}

static void Sender(unsigned short port) {
  SOCKET s;
  struct sockaddr_in a;
  char desc[kDesc];
  char tdesc[kDesc];
  DWORD dlen = kDesc, tlen;
  char* source = Map(kSize);
  char* remap;
  HANDLE h;
  int rc;
  role = "sender";
  Start(&s);
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(port);
  CHECK(procs.lpWSPConnect(s, (struct sockaddr*)&a, sizeof a, NULL, NULL, NULL, NULL, &err) == 0);
  CHECK(Reg(s, msg, 4096, MEM_READ, &err) != NULL);
  CHECK(Reg(s, in, 4096, MEM_WRITE, &err) != NULL);

  /* 1. Register the source for reading, send its descriptor, wait for "done", deregister. */
  Fill(source, kSize, 1);
  CHECK(RegRdma(s, source, kSize, MEM_READ, desc, &dlen, &err) == 0);
  Send(s, desc, dlen);
  CHECK(Recv(s) == 5 && strcmp(in, "done") == 0);
  CHECK(DeregRdma(s, desc, dlen, &err) == 0);

  /* 2. Write into the receiver's target. */
  tlen = Recv(s);
  CHECK(tlen > 0 && tlen <= kDesc);
  memcpy(tdesc, in, tlen);
  Fill(source, kSize, 2);
  h = Reg(s, source, kSize, MEM_READ, &err);
  CHECK(h != NULL);
  CHECK(Transfer(1, s, source, kSize, h, tdesc, tlen) == 0);
  CHECK(Dereg(s, h, &err) == 0);
  Send(s, "done", 5);
  CHECK(Recv(s) == 5 && strcmp(in, "next") == 0);

  /* 3. Register, deregister (cached), unmap, tell the provider, remap with other bytes. */
  remap = Map(kSize);
  Fill(remap, kSize, 3);
  h = Reg(s, remap, kSize, MEM_READ, &err);
  CHECK(h != NULL);
  CHECK(Dereg(s, h, &err) == 0);
  CHECK(munmap(remap, kSize) == 0);
  rc = CacheCallback(remap, kSize, &err);
  /* 0, or WSAEINVAL when the munmap hook had already dropped it: nothing cached is left. */
  CHECK(rc == 0 || err == WSAEINVAL);
  CHECK(mmap(remap, kSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1,
             0) == remap);
  Fill(remap, kSize, 4);
  h = Reg(s, remap, kSize, MEM_READ, &err);
  CHECK(h != NULL);
  CHECK(Transfer(1, s, remap, kSize, h, tdesc, tlen) == 0);
  Send(s, "done", 5);

  /* 4. After the receiver's deregistration, the old descriptor reaches nothing. */
  CHECK(Recv(s) == 8 && strcmp(in, "revoked") == 0);
  CHECK(Transfer(1, s, remap, kSize, h, tdesc, tlen) != 0);
  CHECK(procs.lpWSPCloseSocket(s, &err) == 0);
  CHECK(procs.lpWSPCleanup(&err) == 0);
}

int main(void) {
  int fds[2];
  pid_t child;
  unsigned short port = 0;
  int status = 0;
  role = "main";
  msg = Map(4096);
  in = Map(4096);
  CHECK(pipe(fds) == 0);
  child = fork();
  CHECK(child >= 0);
  if (child == 0) {
    close(fds[0]);
    Receiver(fds[1]);
  }
  close(fds[1]);
  CHECK(read(fds[0], &port, sizeof port) == sizeof port);
  Sender(port);
  CHECK(waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  printf("switch protocol: ok\n");
  return 0;
}
