/* ws2san_c_test.c: ws2san.h compiles as C99, and a C caller gets a full table and the seven
 * extension functions. */
#include "spi/ws2san.h"

#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#define CHECK(cond)                                          \
  do {                                                       \
    if (!(cond)) {                                           \
      fprintf(stderr, "%s:%d: CHECK(%s)\n", __FILE__, __LINE__, #cond); \
      return 1;                                              \
    }                                                        \
  } while (0)

/* Compile-time layout checks (C99 has no _Static_assert). */
typedef char table_has_30_members[sizeof(WSPPROC_TABLE) == 30 * sizeof(void*) ? 1 : -1];
typedef char guid_is_16_bytes[sizeof(GUID) == 16 ? 1 : -1];
typedef char wsabufex_has_handle[offsetof(WSABUFEX, handle) > offsetof(WSABUFEX, buf) ? 1 : -1];
typedef char hevent_is_last[offsetof(WSAOVERLAPPED, hEvent) == 2 * sizeof(ULONG_PTR) + 8 ? 1 : -1];

static int Upcall(SOCKET s, LPWSAOVERLAPPED ov, DWORD error, DWORD bytes, LPINT err) {
  (void)s;
  (void)ov;
  (void)error;
  (void)bytes;
  *err = 0;
  return 0;
}

int main(void) {
  WSPDATA data;
  WSPUPCALLTABLEEX up;
  WSPPROC_TABLE procs;
  GUID ids[7] = {WSAID_REGISTERMEMORY,      WSAID_DEREGISTERMEMORY, WSAID_REGISTERRDMAMEMORY,
                 WSAID_DEREGISTERRDMAMEMORY, WSAID_RDMAWRITE,        WSAID_RDMAREAD,
                 WSAID_MEMORYREGISTRATIONCACHECALLBACK};
  GUID unknown = {0x12345678, 0x1, 0x2, {0, 1, 2, 3, 4, 5, 6, 7}};
  void* members[30];
  int err = 0;
  int i;
  SOCKET s;

  CHECK(SIO_GET_EXTENSION_FUNCTION_POINTER == 0xC8000006u);
  CHECK(SO_MAX_RDMA_SIZE == 0x700D && SO_RDMA_THRESHOLD_SIZE == 0x700E);
  CHECK(MEM_READ == 1 && MEM_WRITE == 2 && MEM_READWRITE == 3);
  CHECK(WSAEINVAL == 10022 && WSA_IO_PENDING == 997 && WSAVERNOTSUPPORTED == 10092);
  CHECK(ids[0].Data1 == 0xC0B422F5 && ids[6].Data4[7] == 0xAF);
  CHECK(INVALID_SOCKET == (SOCKET)~(uintptr_t)0 && SOCKET_ERROR == -1);

  memset(&procs, 0, sizeof procs);
  up.lpWPUCompleteOverlappedRequest = Upcall;
  CHECK(WSPStartupEx(0x0101, &data, NULL, &up, &procs) == WSAVERNOTSUPPORTED);
  CHECK(WSPStartupEx(SANREG_WSP_VERSION, &data, NULL, &up, NULL) == WSAEFAULT);
  CHECK(WSPStartupEx(SANREG_WSP_VERSION, &data, NULL, &up, &procs) == 0);
  memcpy(members, &procs, sizeof procs);
  for (i = 0; i < 30; ++i) CHECK(members[i] != NULL);

  s = procs.lpWSPSocket(AF_INET, SOCK_STREAM, 0, NULL, 0, 0, &err);
  CHECK(s != INVALID_SOCKET);
  for (i = 0; i < 7; ++i) {
    void* fn = NULL;
    DWORD got = 0;
    CHECK(procs.lpWSPIoctl(s, SIO_GET_EXTENSION_FUNCTION_POINTER, &ids[i], sizeof ids[i], &fn,
                           sizeof fn, &got, NULL, NULL, NULL, &err) == 0);
    CHECK(fn != NULL && got == sizeof fn);
  }
  {
    void* fn = NULL;
    DWORD got = 0;
    CHECK(procs.lpWSPIoctl(s, SIO_GET_EXTENSION_FUNCTION_POINTER, &unknown, sizeof unknown, &fn,
                           sizeof fn, &got, NULL, NULL, NULL, &err) == SOCKET_ERROR);
    CHECK(err == WSAEINVAL);
  }
  CHECK(procs.lpWSPShutdown(s, 0, &err) == SOCKET_ERROR && err == WSAEOPNOTSUPP);
  CHECK(procs.lpWSPCloseSocket(s, &err) == 0);
  CHECK(procs.lpWSPCleanup(&err) == 0);
  printf("ok\n");
  return 0;
}
